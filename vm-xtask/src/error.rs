//! Exit statuses and the error that carries one: the bottom of the tree, so that any layer
//! can say "this is a usage error" (exit 2) or "the VM ran out of time" (exit 124) by the
//! error's type, and the command line maps errors to statuses by type, never by text.

use std::fmt;

/// Exit status for bad command-line input (and a system or catalog that cannot work):
/// nothing was built.
pub const EXIT_USAGE: i32 = 2;

/// Exit status when a VM is killed for running past `--timeout` (as `timeout(1)`).
pub const EXIT_TIMEOUT: i32 = 124;

/// An error with the exit status it ends the program with.
#[derive(Debug)]
pub struct Failure {
    /// The exit status.
    pub code: i32,
    /// What to print after `error: `.
    pub message: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

/// A usage error: exit status 2, nothing built.
pub fn usage_error(message: String) -> anyhow::Error {
    Failure { code: EXIT_USAGE, message }.into()
}

/// The exit status an error ends the program with: a [`Failure`]'s anywhere in its chain,
/// else 1.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    err.chain().find_map(|e| e.downcast_ref::<Failure>()).map(|f| f.code).unwrap_or(1)
}
