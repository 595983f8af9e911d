//! The library behind `cargo xtask`: a store of build artifacts under `target/`, kernels
//! and initrds made from Debian's packages, a QEMU runner, and the subcommands built on
//! them. `main.rs` only parses flags and dispatches to [`cmd`].

pub mod cmd;
pub mod host;
pub mod image;
pub mod lock;
pub mod lower;
pub mod process;
pub mod programs;
pub mod progress;
pub mod registry_server;
pub mod report;
pub mod store;
pub mod substitute;
pub mod vm;

use std::path::{Path, PathBuf};

/// Environment variable that moves the store (default: `target/vmstore`).
pub const STORE_ENV: &str = "XTASK_VMSTORE";

/// Where the workspace and its build outputs are.
#[derive(Debug, Clone)]
pub struct Workspace {
    pub root: PathBuf,
    pub target_dir: PathBuf,
    pub store_dir: PathBuf,
}

impl Workspace {
    /// The workspace this xtask was built from.
    pub fn current() -> Workspace {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf();
        let target_dir = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .map(|p| if p.is_absolute() { p } else { root.join(p) })
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
