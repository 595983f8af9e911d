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

/// The store's items (what guests see as `/store`).
pub fn items_dir() -> PathBuf {
    store_dir().join("items")
}

/// The paths of the shared store's items.
pub fn items() -> Vec<PathBuf> {
    std::fs::read_dir(items_dir()).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default()
}

/// Copies the shared store's items whose file names satisfy `keep`, with their `.meta`
/// records, into the store at `to`: as hard links (`cp -al`), or as real copies.
pub fn copy_items(to: &Path, hard_links: bool, mut keep: impl FnMut(&str) -> bool) {
    for sub in ["items", "meta"] {
        std::fs::create_dir_all(to.join(sub)).unwrap();
    }
    for item in items() {
        let name = item.file_name().unwrap().to_string_lossy().into_owned();
        if !keep(&name) {
            continue;
        }
        let flags = if hard_links { "-al" } else { "-a" };
        let meta = format!("{name}.meta");
        let copied = Command::new("cp").arg(flags).arg(&item).arg(to.join("items")).status().unwrap().success()
            && std::fs::copy(store_dir().join("meta").join(&meta), to.join("meta").join(&meta)).is_ok();
        if !copied {
            // Another test may remove an item (an image it rebuilds) while this copies:
            // then it is left out, half-copied parts and all.
            assert!(!item.exists(), "copying {}", item.display());
            let _ = Command::new("rm").arg("-rf").arg(to.join("items").join(&name)).status();
            let _ = std::fs::remove_file(to.join("meta").join(&meta));
        }
    }
}

/// The `qemu-system-x86_64` tests start themselves: the host's when it has one, else
/// the store's (`xtask --qemu store` makes it), as xtask chooses.
pub fn qemu_system() -> PathBuf {
    qemu_for("qemu-system-x86_64", "-qemu-store", &[])
}

/// The `qemu-system-aarch64` tests start themselves, as xtask chooses it for aarch64
/// guests: the host's when it has one, else the store's (made by a run of one).
pub fn qemu_system_aarch64() -> PathBuf {
    qemu_for("qemu-system-aarch64", "-qemu-store-qemu-system-aarch64", &["--arch", "aarch64"])
}

fn qemu_for(program: &str, item_suffix: &str, run_args: &[&str]) -> PathBuf {
    if let Some(found) = which(program) {
        return found;
    }
    let args = [&["--qemu", "store", "run-vm"], run_args, &["--timeout", TIMEOUT, "--", "true"]].concat();
    let made = xtask(&args);
    assert_eq!(made.code, 0, "{made:#?}");
    items()
        .into_iter()
        .find(|i| i.to_string_lossy().ends_with(item_suffix))
        .map(|i| i.join("bin").join(program))
        .unwrap_or_else(|| panic!("no `{program}` on this host, and xtask made none in the store"))
}

/// Builds the tests' xtask once per test process and returns its path: this repository's
/// `xtask` with the systems made for tests registered too (`xtask_fixtures.rs`).
pub fn xtask_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "--package", "vm-tests", "--bin", "xtask-fixtures"])
            .current_dir(workspace_root())
            .status()
            .expect("running cargo build -p vm-tests --bin xtask-fixtures");
        assert!(status.success(), "cargo build -p vm-tests --bin xtask-fixtures failed");
        target_dir().join("debug/xtask-fixtures")
    })
}

/// The image tools' directory (`xtask image-tools`: e2fsprogs, fdisk and GRUB from the
/// store, as `vm.lock` pins them), so tests check images without the host's e2fsprogs.
pub fn image_tools_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let run = xtask(&["image-tools"]);
        run.expect_code(0);
        let dir = PathBuf::from(run.stdout.trim_end());
        assert!(dir.join("e2fsck").is_file(), "`xtask image-tools` printed `{}`: {run:#?}", dir.display());
        dir
    })
}

/// The workspace's lock file `vm.lock`, and the value of `field` of the package locked
/// as `name` in it.
pub fn locked_field(name: &str, field: &str) -> (String, String) {
    let lock = std::fs::read_to_string(workspace_root().join("vm.lock")).expect("reading the workspace's vm.lock");
    let table = lock
        .split(&format!("[\"{name}\"]\n"))
        .nth(1)
        .unwrap_or_else(|| panic!("vm.lock has no `{name}`"))
        .split("\n\n")
        .next()
        .unwrap();
    let value = table
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field} = ")))
        .unwrap_or_else(|| panic!("`{name}` in vm.lock has no `{field}`"))
        .trim_matches('"')
        .to_string();
    (lock, value)
}

/// What one xtask invocation did.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<std::process::Output> for Run {
    fn from(out: std::process::Output) -> Run {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
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

/// Whether `path` is an x86_64 ELF file (machine 62): this host's, not an aarch64 guest's.
pub fn is_x86_64_elf(path: &Path) -> bool {
    let mut header = [0u8; 20];
    std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut header)).is_ok() && header[18..20] == [62, 0]
}

/// `program` as found on `PATH`, if it is there.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(program)).find(|p| p.is_file())
}

/// Runs `xtask ARGS` with stdin from /dev/null.
pub fn xtask(args: &[&str]) -> Run {
    let out = Command::new(xtask_bin()).args(args).stdin(Stdio::null()).output().expect("running xtask");
    Run::from(out)
}

/// `xtask run-vm --timeout T -- COMMAND...`
pub fn run_vm(command: &[&str]) -> Run {
    let mut args = vec!["run-vm", "--timeout", TIMEOUT, "--"];
    args.extend_from_slice(command);
    xtask(&args)
}

/// `xtask run-vm --system SYSTEM --timeout T -- COMMAND...`
pub fn run_vm_on(system: &str, command: &[&str]) -> Run {
    let mut args = vec!["run-vm", "--system", system, "--timeout", TIMEOUT, "--"];
    args.extend_from_slice(command);
    xtask(&args)
}

/// Store entries whose name ends with `-NAME` (items and their `.meta` files).
pub fn store_entries_named(name: &str) -> Vec<String> {
    let suffix = format!("-{name}");
    ["items", "meta"]
        .iter()
        .flat_map(|sub| std::fs::read_dir(store_dir().join(sub)).into_iter().flatten().flatten())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(&suffix) || n.ends_with(&format!("{suffix}.meta")))
        .collect()
}

/// Runs `cmd` (stdin from /dev/null) to its end, failing instead of hanging if it is
/// still running after `secs`: it is killed and the test panics with its stderr.
pub fn output_within(mut cmd: Command, secs: u64) -> Run {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // A process group of its own: past the deadline the whole group is killed, so that a
    // grandchild (a test binary cargo started) holding the pipes cannot keep this waiting.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    let (out, err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let out = std::thread::spawn(move || read_all(out));
    let err = std::thread::spawn(move || read_all(err));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            kill_group(child.id());
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} was still running after {secs} s; stderr: {}", err.join().unwrap());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    // It has ended, but what it started may still hold the pipes: until the deadline.
    while !(out.is_finished() && err.is_finished()) {
        if std::time::Instant::now() > deadline {
            kill_group(child.id());
            let stderr = err.join().unwrap();
            panic!("{cmd:?} ended, but what it started still held its output after {secs} s; stderr: {stderr}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Run { code: status.code().unwrap_or(-1), stdout: out.join().unwrap(), stderr: err.join().unwrap() }
}

/// Kills the process group `pgid` (a command [`output_within`] started leads its own).
fn kill_group(pgid: u32) {
    let _ = Command::new("kill").args(["-KILL", "--", &format!("-{pgid}")]).status();
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
    Run::from(out)
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

/// How a [`converse`] ended.
#[derive(Debug)]
pub struct Conversation {
    /// How many (expect, send) steps were taken.
    pub steps: usize,
    /// Everything the program printed, carriage returns dropped (a read may end between
    /// "\r" and "\n").
    pub console: String,
    /// The program's exit status, if it ended before the deadline.
    pub status: Option<std::process::ExitStatus>,
}

/// Talks to `child` (started with piped stdin and stdout) like a person at a serial
/// console: waits until its output contains each step's text, then types the step's
/// line; returns once the child has ended or `timeout` has passed. The caller kills a
/// child that is still running.
pub fn converse(child: &mut std::process::Child, steps: &[(&str, &str)], timeout: std::time::Duration) -> Conversation {
    use std::io::Write;
    use std::sync::mpsc::{channel, RecvTimeoutError};
    let mut stdout = child.stdout.take().expect("the child's stdout must be piped");
    let mut stdin = child.stdin.take().expect("the child's stdin must be piped");
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + timeout;
    let mut console = String::new();
    let mut done = 0;
    let mut status = None;
    while std::time::Instant::now() < deadline && status.is_none() {
        match rx.recv_timeout(std::time::Duration::from_millis(200)) {
            Ok(bytes) => console = (console + &String::from_utf8_lossy(&bytes)).replace('\r', ""),
            Err(RecvTimeoutError::Disconnected) => std::thread::sleep(std::time::Duration::from_millis(100)),
            Err(RecvTimeoutError::Timeout) => {}
        }
        if let Some((expect, send)) = steps.get(done) {
            if console.contains(expect) {
                stdin.write_all(send.as_bytes()).expect("typing into the console");
                done += 1;
            }
        }
        status = child.try_wait().expect("waiting for the child");
    }
    Conversation { steps: done, console, status }
}

/// The `--config` that makes xtask cargo's runner for x86_64, with `--system SYSTEM
/// --timeout TIMEOUT`.
pub fn runner_config(system: &str, timeout: &str) -> String {
    format!(
        "target.x86_64-unknown-linux-gnu.runner=[\"{}\", \"test-runner\", \"--system\", \"{system}\", \
            \"--timeout\", \"{timeout}\"]",
        xtask_bin().display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The harness ends a command at its deadline even when what it started holds its output:
    /// the whole process group is killed (a test binary cargo started once hung a run).
    #[test]
    fn the_harness_ends_a_hang_held_by_a_grandchild() {
        let started = std::time::Instant::now();
        for script in ["sleep 600 & echo started", "sleep 600 & sleep 600"] {
            let mut cmd = std::process::Command::new("sh");
            cmd.args(["-c", script]);
            let ended = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| output_within(cmd, 2)));
            assert!(ended.is_err(), "`{script}` did not fail at the deadline");
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(60), "the harness waited on the hang");
    }
}
