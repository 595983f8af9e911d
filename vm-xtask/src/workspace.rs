//! Where the workspace xtask acts on is, its target directory and its store: found when
//! xtask runs, never compiled into it.

use std::path::{Path, PathBuf};

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
    /// program (a runner called from another workspace), else the workspace of the package
    /// cargo runs (`CARGO_MANIFEST_DIR` at run time) or around the current directory,
    /// else the current directory.
    /// The target directory is `CARGO_TARGET_DIR`, else the cargo target directory this
    /// program was built into, else the workspace's `target/`.
    pub fn current() -> Workspace {
        static CURRENT: std::sync::OnceLock<Workspace> = std::sync::OnceLock::new();
        CURRENT.get_or_init(Workspace::discover).clone()
    }

    fn discover() -> Workspace {
        let env = |name: &str| std::env::var_os(name);
        Workspace::discover_with(&env, std::env::current_dir().ok(), std::env::current_exe().ok())
    }

    /// [`Workspace::current`]'s rules over an environment, a current directory and this
    /// program's path.
    fn discover_with(
        env: &dyn Fn(&str) -> Option<std::ffi::OsString>,
        cwd: Option<PathBuf>,
        exe: Option<PathBuf>,
    ) -> Workspace {
        let absolute = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
        let root = env(WORKSPACE_ENV)
            .map(PathBuf::from)
            .map(absolute)
            .or_else(|| cwd.as_deref().and_then(toolkit_workspace_above))
            .or_else(|| exe.as_deref().and_then(toolkit_workspace_above))
            // `cargo run` (and cargo's runner) names the package it runs, at run time: its
            // workspace is the one cargo acted on.
            .or_else(|| env("CARGO_MANIFEST_DIR").and_then(|d| cargo_workspace_above(Path::new(&d))))
            .or_else(|| cwd.as_deref().and_then(cargo_workspace_above))
            .or_else(|| cwd.clone())
            .unwrap_or_else(|| PathBuf::from("."));
        let target_dir = env("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .map(|p| if p.is_absolute() { p } else { root.join(p) })
            .or_else(|| exe.as_deref().and_then(cargo_target_dir_of))
            .unwrap_or_else(|| root.join("target"));
        // Absolute, as the paths written into `run-vm.sh` must be: a relative
        // `XTASK_VMSTORE` is taken from the current directory.
        let store_dir = env(STORE_ENV).map(PathBuf::from).map(absolute).unwrap_or_else(|| target_dir.join("vmstore"));
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
            declares_workspace(dir) && (dir.join("vm.lock").is_file() || dir.join("xtask/Cargo.toml").is_file())
        })
        .map(Path::to_path_buf)
}

/// The nearest directory at or above `start` whose `Cargo.toml` declares a workspace.
fn cargo_workspace_above(start: &Path) -> Option<PathBuf> {
    start.ancestors().find(|dir| declares_workspace(dir)).map(Path::to_path_buf)
}

/// Whether `dir/Cargo.toml` declares a workspace.
fn declares_workspace(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("Cargo.toml")).is_ok_and(|t| t.lines().any(|l| l.trim() == "[workspace]"))
}

/// The cargo target directory a program at `exe` was built into (the nearest directory
/// above it holding cargo's `CACHEDIR.TAG`), if it was.
fn cargo_target_dir_of(exe: &Path) -> Option<PathBuf> {
    exe.ancestors().skip(1).take(4).find(|d| d.join("CACHEDIR.TAG").is_file()).map(Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A workspace whose xtask is not at `xtask/` and which has no `vm.lock` yet, run from
    /// a subdirectory by `cargo run` (which names the package at run time): its root.
    #[test]
    fn a_workspace_with_its_xtask_elsewhere_and_no_lock_is_found_from_a_subdirectory() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("mono");
        std::fs::create_dir_all(root.join("tools/xtask/src")).unwrap();
        std::fs::create_dir_all(root.join("services/api/src")).unwrap();
        std::fs::write(root.join("Cargo.toml"), "[workspace]\nmembers = [\"tools/xtask\", \"services/api\"]\n")
            .unwrap();
        std::fs::write(root.join("tools/xtask/Cargo.toml"), "[package]\nname = \"xtask\"\n").unwrap();
        std::fs::write(root.join("services/api/Cargo.toml"), "[package]\nname = \"api\"\n").unwrap();
        let manifest_dir = root.join("tools/xtask").into_os_string();
        let env = |name: &str| (name == "CARGO_MANIFEST_DIR").then(|| manifest_dir.clone());
        let cwd = Some(root.join("services/api/src"));
        let ws = Workspace::discover_with(&env, cwd.clone(), None);
        assert_eq!(ws.root, root);
        assert_eq!(ws.store_dir, root.join("target/vmstore"));
        // Without cargo's variable, the workspace around the current directory.
        assert_eq!(Workspace::discover_with(&|_| None, cwd, None).root, root);
        // A `vm.lock` in a nested workspace around the current directory wins.
        std::fs::write(root.join("services/api/Cargo.toml"), "[package]\nname = \"api\"\n[workspace]\n").unwrap();
        std::fs::write(root.join("services/api/vm.lock"), "").unwrap();
        let nested = Workspace::discover_with(&env, Some(root.join("services/api/src")), None);
        assert_eq!(nested.root, root.join("services/api"));
    }
}
