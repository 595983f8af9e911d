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
pub(crate) mod host;
pub(crate) mod image;
pub(crate) mod lock;
pub(crate) mod lower;
pub(crate) mod process;
#[cfg(test)]
mod programs;
pub(crate) mod progress;
pub(crate) mod registry_server;
pub(crate) mod report;
pub(crate) mod store;
pub(crate) mod substitute;
pub(crate) mod vm;

use std::path::{Path, PathBuf};

pub use catalog::Catalog;

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

/// Environment variable that moves the store (default: `target/vmstore`).
pub const STORE_ENV: &str = "XTASK_VMSTORE";

/// Where the workspace and its build outputs are.
#[derive(Debug, Clone)]
pub struct Workspace {
    /// The directory of the workspace's `Cargo.toml` (and `vm.lock`).
    pub root: PathBuf,
    /// Cargo's target directory.
    pub target_dir: PathBuf,
    /// The store (`target/vmstore`, or `XTASK_VMSTORE`).
    pub store_dir: PathBuf,
}

/// Names the workspace to act on (default: found from the current directory).
pub const WORKSPACE_ENV: &str = "XTASK_WORKSPACE";

impl Workspace {
    /// The workspace xtask acts on, found when it runs (never a path compiled into it:
    /// two checkouts may share one target directory, and so one xtask binary): the
    /// toolkit's workspace around the current directory (one with a `vm.lock` or an
    /// `xtask` crate beside its `Cargo.toml`'s `[workspace]`), else the one around this
    /// program (a runner called from another workspace), else the current directory.
    /// The target directory is `CARGO_TARGET_DIR`, else the cargo target directory this
    /// program was built into, else the workspace's `target/`.
    pub fn current() -> Workspace {
        static CURRENT: std::sync::OnceLock<Workspace> = std::sync::OnceLock::new();
        CURRENT.get_or_init(Workspace::discover).clone()
    }

    fn discover() -> Workspace {
        let exe = std::env::current_exe().ok();
        let root = std::env::var_os(WORKSPACE_ENV)
            .map(PathBuf::from)
            .map(|p| std::path::absolute(&p).unwrap_or(p))
            .or_else(|| std::env::current_dir().ok().and_then(|d| toolkit_workspace_above(&d)))
            .or_else(|| exe.as_deref().and_then(toolkit_workspace_above))
            .or_else(|| std::env::current_dir().ok())
            .unwrap_or_else(|| PathBuf::from("."));
        let target_dir = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .map(|p| if p.is_absolute() { p } else { root.join(p) })
            .or_else(|| exe.as_deref().and_then(cargo_target_dir_of))
            .unwrap_or_else(|| root.join("target"));
        // Absolute, as the paths written into `run-vm.sh` must be: a relative
        // `XTASK_VMSTORE` is taken from the current directory.
        let store_dir = std::env::var_os(STORE_ENV)
            .map(PathBuf::from)
            .map(|p| std::path::absolute(&p).unwrap_or(p))
            .unwrap_or_else(|| target_dir.join("vmstore"));
        Workspace { root, target_dir, store_dir }
    }

    /// Where console logs of failed VM runs are kept.
    pub fn log_dir(&self) -> PathBuf {
        self.target_dir.join("vmlogs")
    }
}

/// The nearest directory at or above `start` whose `Cargo.toml` declares a workspace that
/// uses the toolkit (a `vm.lock` or an `xtask` crate beside it).
fn toolkit_workspace_above(start: &Path) -> Option<PathBuf> {
    start
        .ancestors()
        .find(|dir| {
            let declares = std::fs::read_to_string(dir.join("Cargo.toml"))
                .is_ok_and(|t| t.lines().any(|l| l.trim() == "[workspace]"));
            declares && (dir.join("vm.lock").is_file() || dir.join("xtask/Cargo.toml").is_file())
        })
        .map(Path::to_path_buf)
}

/// The cargo target directory a program at `exe` was built into (the nearest directory
/// above it holding cargo's `CACHEDIR.TAG`), if it was.
fn cargo_target_dir_of(exe: &Path) -> Option<PathBuf> {
    exe.ancestors().skip(1).take(4).find(|d| d.join("CACHEDIR.TAG").is_file()).map(Path::to_path_buf)
}
