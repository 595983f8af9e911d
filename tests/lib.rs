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

/// Runs `xtask ARGS` with extra environment variables (and stdin from /dev/null).
pub fn xtask_env(args: &[&str], envs: &[(&str, &std::ffi::OsStr)]) -> Run {
    let mut cmd = Command::new(xtask_bin());
    cmd.args(args).stdin(Stdio::null());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("running xtask");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Pids of the processes whose parent is `ppid` and whose command name starts with `comm`.
pub fn children_named(ppid: u32, comm: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // pid (comm) state ppid ...
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        let name = &stat[open + 1..close];
        let ppid_field = stat[close + 2..].split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok());
        if ppid_field == Some(ppid) && name.starts_with(comm) {
            found.push(pid);
        }
    }
    found
}

/// Whether `pid` is gone (or a zombie nobody has reaped yet: it runs no more).
pub fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rfind(')').and_then(|i| stat[i + 2..].chars().next()) == Some('Z'),
    }
}

/// Polls `cond` every 10 ms until it holds or `secs` pass; returns whether it held.
pub fn wait_until(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    cond()
}

/// Sends `signal` (a number) to `pid` with kill(1).
pub fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill").args([&format!("-{signal}"), &pid.to_string()]).status().unwrap();
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// Directories in the store's `.tmp` whose names contain `needle`.
pub fn tmp_entries_containing(store: &Path, needle: &str) -> Vec<String> {
    std::fs::read_dir(store.join(".tmp"))
        .map(|d| {
            d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.contains(needle)).collect()
        })
        .unwrap_or_default()
}
