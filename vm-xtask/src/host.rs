//! The host's own tools (QEMU, apt, dpkg-deb): finding them, and installing the missing
//! ones from Debian's packages when running as root, or saying exactly what to run. The
//! tools that write disk images are not the host's: see [`crate::debian::image_tools`].

use std::path::PathBuf;
use std::process::Command;

use crate::process::command;
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};

/// A program the toolkit runs, and the Debian package that ships it.
#[derive(Debug, Clone, Copy)]
pub struct Tool {
    pub program: &'static str,
    pub package: &'static str,
}

pub const QEMU_SYSTEM: Tool = Tool { program: "qemu-system-x86_64", package: "qemu-system-x86" };
pub const QEMU_IMG: Tool = Tool { program: "qemu-img", package: "qemu-utils" };
pub const APT_GET: Tool = Tool { program: "apt-get", package: "apt" };
pub const DPKG_DEB: Tool = Tool { program: "dpkg-deb", package: "dpkg" };
/// When set, missing host programs are reported instead of installed.
pub const NO_INSTALL_ENV: &str = "XTASK_NO_INSTALL";

/// Finds `program` on `PATH`.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(program)).find(|p| is_executable(p))
}

/// Whether `path` is a file someone may execute.
pub fn is_executable(path: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Makes sure every tool is on `PATH`. Missing ones are installed with `apt-get` when
/// running as root (saying so on stderr); otherwise the error names the command to run.
pub fn ensure(tools: &[Tool]) -> Result<()> {
    let missing: Vec<Tool> = tools.iter().copied().filter(is_missing).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let programs: Vec<&str> = missing.iter().map(|t| t.program).collect();
    let mut packages: Vec<String> = missing.iter().map(|t| t.package.to_string()).collect();
    packages.dedup();
    if !is_root() || which("apt-get").is_none() || std::env::var_os(NO_INSTALL_ENV).is_some() {
        bail!(
            "missing host program(s): {}; install them with:\n    sudo apt-get install --no-install-recommends {}",
            programs.join(", "),
            packages.join(" ")
        );
    }
    if packages.iter().any(|p| p == QEMU_SYSTEM.package) {
        // qemu-system-x86 and qemu-utils must come from the same QEMU release (a newer
        // qemu-utils from backports "Breaks" Debian 12's qemu-system-common).
        let version = candidate_version(QEMU_SYSTEM.package)?;
        packages.retain(|p| p != QEMU_IMG.package);
        packages.push(format!("{}={version}", QEMU_IMG.package));
    }
    eprintln!("installing missing host program(s) {}: apt-get install {}", programs.join(", "), packages.join(" "));
    apt_update_once()?;
    let mut install = command("apt-get");
    install
        .args(["install", "-y", "-q", "--no-install-recommends", "--allow-downgrades"])
        .args(&packages)
        .env("DEBIAN_FRONTEND", "noninteractive");
    crate::process::run(&install).context("installing them failed; install them by hand and retry")?;
    for t in &missing {
        if is_missing(t) {
            bail!("`{}` is still missing after installing `{}`", t.program, t.package);
        }
    }
    Ok(())
}

/// A tool is missing when its program is not on `PATH`.
fn is_missing(tool: &Tool) -> bool {
    which(tool.program).is_none()
}

fn candidate_version(package: &str) -> Result<String> {
    apt_update_once()?;
    let out = crate::process::output(command("apt-cache").args(["policy", package]))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Candidate:").map(|v| v.trim().to_string()))
        .filter(|v| v != "(none)")
        .with_context(|| format!("Debian package `{package}` is not available from apt's sources"))
}

/// Runs `apt-get update` at most once per process, and only as root when apt has no
/// package lists yet (a fresh machine).
pub fn apt_update_once() -> Result<()> {
    static DONE: OnceLock<()> = OnceLock::new();
    if DONE.get().is_some() || !is_root() || has_package_lists() {
        return Ok(());
    }
    eprintln!("apt has no package lists yet: running apt-get update");
    crate::process::run(command("apt-get").args(["update", "-q"]))?;
    let _ = DONE.set(());
    Ok(())
}

fn has_package_lists() -> bool {
    std::fs::read_dir("/var/lib/apt/lists")
        .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().contains("_Packages")))
        .unwrap_or(false)
}

/// The one-line answer `ask` gives to `question` about the program at `program`,
/// remembered in `cache_dir` for as long as the program's file keeps its size and
/// modification time (asking means running the program: milliseconds, on every run).
/// A memo that cannot be read or written only means asking again.
pub fn remembered(
    cache_dir: &std::path::Path,
    program: &std::path::Path,
    question: &str,
    ask: impl FnOnce() -> Result<String>,
) -> Result<String> {
    let key = std::fs::metadata(program).ok().and_then(|meta| {
        Some(format!("{question}\n{}\n{}\n{:?}\n", program.display(), meta.len(), meta.modified().ok()?))
    });
    let Some(key) = key else { return ask() };
    let memo = cache_dir.join(format!("memo-{}", &crate::store::sha256_bytes(key.as_bytes())[..32]));
    if let Some(answer) = std::fs::read_to_string(&memo).ok().and_then(|t| t.strip_prefix(&key).map(str::to_string)) {
        return Ok(answer);
    }
    let answer = ask()?;
    // Whole or not at all: another xtask may be reading it. Only speed depends on it.
    let _ = crate::store::write_atomically(&memo, format!("{key}{answer}").as_bytes());
    Ok(answer)
}

/// Set to `1` to make image builds stage the closure as a tree of hard links instead of
/// bind-mounting the store's items in a user namespace.
pub const NO_USERNS_ENV: &str = "XTASK_NO_USERNS";

/// Whether this process may make a user and mount namespace and bind-mount in it
/// (`unshare --user --map-root-user --mount`, util-linux): unprivileged user namespaces
/// are allowed, and [`NO_USERNS_ENV`] does not turn them off. Asked once per process.
pub fn userns_bind_mounts() -> bool {
    static ANSWER: OnceLock<bool> = OnceLock::new();
    *ANSWER.get_or_init(|| {
        if std::env::var_os(NO_USERNS_ENV).is_some_and(|v| v == "1") {
            return false;
        }
        crate::process::output(command("unshare").args(["--user", "--map-root-user", "--mount", "--", "true"]))
            .is_ok_and(|o| o.status.success())
    })
}

/// A bind mount: the source, and the mount point it is seen at.
pub type BindMount = (PathBuf, PathBuf);

/// `cmd`, run in a new user and mount namespace after bind-mounting each `(source,
/// mount point)` pair: the mounts are seen by `cmd` alone and vanish with it. Its
/// environment is kept.
pub fn with_bind_mounts(cmd: &Command, mounts: &[BindMount]) -> Command {
    const SCRIPT: &str = "while [ \"$1\" != -- ]; do mount --bind \"$1\" \"$2\" || exit 125; shift 2; done; \
                          shift; exec \"$@\"";
    let mut wrapped = command("unshare");
    wrapped.args(["--user", "--map-root-user", "--mount", "--", "sh", "-c", SCRIPT, "sh"]);
    for (source, target) in mounts {
        wrapped.arg(source).arg(target);
    }
    wrapped.arg("--").arg(cmd.get_program()).args(cmd.get_args());
    for (key, value) in cmd.get_envs() {
        match value {
            Some(value) => wrapped.env(key, value),
            None => wrapped.env_remove(key),
        };
    }
    wrapped
}
