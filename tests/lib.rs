//! Shared harness for the end-to-end tests in `it/`: builds the xtask binary once and
//! runs it the way a user would, capturing its exit status and output.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| if p.is_absolute() { p } else { workspace_root().join(p) })
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// The store the xtask uses.
pub fn store_dir() -> PathBuf {
    target_dir().join("vmstore")
}

/// Builds `xtask` once per test process and returns its path.
pub fn xtask_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "--package", "xtask"])
            .current_dir(workspace_root())
            .status()
            .expect("running cargo build -p xtask");
        assert!(status.success(), "cargo build -p xtask failed");
        target_dir().join("debug/xtask")
    })
}

/// What one xtask invocation did.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Panics with the whole output unless the exit status is `code`.
    pub fn expect_code(&self, code: i32) -> &Run {
        assert_eq!(self.code, code, "expected exit status {code}; got {self:#?}");
        self
    }
}

/// Every VM in the tests runs under this timeout, so a hang fails instead of blocking.
pub const TIMEOUT: &str = "300";

/// Runs `xtask ARGS` with stdin from /dev/null.
pub fn xtask(args: &[&str]) -> Run {
    let out = Command::new(xtask_bin()).args(args).stdin(Stdio::null()).output().expect("running xtask");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `xtask run-vm --timeout T -- COMMAND...`
pub fn run_vm(command: &[&str]) -> Run {
    let mut args = vec!["run-vm", "--timeout", TIMEOUT, "--"];
    args.extend_from_slice(command);
    xtask(&args)
}

/// Store entries whose name ends with `-NAME` (items and their `.meta` files).
pub fn store_entries_named(name: &str) -> Vec<String> {
    let suffix = format!("-{name}");
    std::fs::read_dir(store_dir())
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(&suffix) || n.ends_with(&format!("{suffix}.meta")))
                .collect()
        })
        .unwrap_or_default()
}

/// Reads everything from a pipe into a string.
pub fn read_all(mut r: impl Read) -> String {
    let mut s = String::new();
    let _ = r.read_to_string(&mut s);
    s
}
