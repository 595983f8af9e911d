//! The engine behind `cargo xtask`: build Linux VM images and run code in real VMs,
//! without root, from a workspace's own `xtask` crate. A store of build artifacts under
//! `target/`, kernels and initrds made from Debian's packages, a QEMU runner, and the
//! subcommands built on them.
//!
//! A workspace declares its systems (plain values of the [`systems`] vocabulary) and
//! scenarios in a [`Catalog`] and hands it to [`cli::main`]:
//!
//! ```no_run
//! use vm_xtask::systems::{self, Package};
//! use vm_xtask::{cli, Catalog};
//!
//! fn main() -> std::process::ExitCode {
//!     let mut jq = systems::minimal();
//!     jq.name = "jq".into();
//!     jq.packages.push(Package::Debian { package: "jq".into() });
//!     cli::main(Catalog::new().systems([systems::minimal(), jq]))
//! }
//! ```

#![deny(missing_docs)]

pub mod catalog;
pub mod cli;
pub(crate) mod cmd;
pub(crate) mod debian;
pub(crate) mod error;
pub(crate) mod host;
pub(crate) mod image;
pub(crate) mod lower;
pub(crate) mod machine;
pub(crate) mod parse;
pub(crate) mod process;
#[cfg(test)]
mod programs;
pub(crate) mod progress;
pub(crate) mod report;
pub(crate) mod sources;
pub(crate) mod store;
pub(crate) mod substitute;
pub(crate) mod suite;
pub(crate) mod vm;
mod workspace;

pub use catalog::Catalog;
pub use workspace::{Workspace, STORE_ENV, WORKSPACE_ENV};

/// Not part of the API: what this crate's own integration tests reach (no semver promise).
#[doc(hidden)]
pub mod testing {
    pub use crate::store::fd::DirFd;
    pub use crate::store::ingest::{copy_dir, Limits};
}
/// The vocabulary of systems: [`systems::System`], [`systems::Package`],
/// [`systems::FileSystem`], ... (the `vm-xtask-systems` crate).
pub use os_configs as systems;
/// A scenario, the driver its script gets, the nodes the driver hands out and how a
/// command run on a node ended.
pub use vm::scenario::{Driver, Node, Outcome, Scenario};
