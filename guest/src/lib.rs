//! The contract between the host (`xtask`) and the guest helper that runs as PID 1 in
//! the VM: where things are mounted, what the host asks for, and how the guest answers.
//!
//! 1. The kernel starts `/init` (the helper) from the initrd. The initrd holds the kernel
//!    modules to load in [`MODULE_ORDER`], one file name per line, in dependency order.
//! 2. The helper mounts `/proc`, `/sys`, `/dev`, the host's store read-only at
//!    [`STORE_MOUNT`] and the exchange directory read-write at [`XCHG_MOUNT`], both over 9p.
//! 3. It reads a [`Request`] (JSON) from [`REQUEST_FILE`] in the exchange directory.
//!    When the request names a [`Request::root_device`] (the shared-store image), the
//!    helper waits for that block device, mounts its ext4 file system read-only under a
//!    tmpfs overlay (a volatile root: writes vanish at power-off), moves `/proc`, `/sys`,
//!    `/dev`, `/tmp`, `/run` and both shares into it and makes it `/`. That root already
//!    holds what does not depend on packages (`/etc` files, home directories).
//!    When the request names a system item, the helper applies that item's
//!    [`SYSTEM_CONFIG_FILE`] ([`SystemConfig`]): host name, mounts, `/etc` files, home
//!    directories (both skipped when they come from the root device), links, then starts the services and waits until each is up (a service
//!    that exits before it is up, or is not up within [`SERVICE_READY_SECS`], is an
//!    error). Then it runs the request's command (or shell). Services run on until the
//!    end; their output goes to `/var/log/NAME.log`.
//! 4. It writes a [`Status`] line to [`STATUS_FILE`] in the exchange directory, syncs and
//!    powers the VM off (`reboot(2)`; the host runs QEMU with `-no-reboot`). A missing
//!    status file means the guest never finished: the host reports that as an error.

use serde::{Deserialize, Serialize};

pub mod ext4;
pub mod image;

/// Version of the request format; bumped on every incompatible change.
///
/// - 1: the command, environment, links, directories, host name, output ports.
/// - 2: adds `system` (a system item to apply, with services) and `argv_file`.
/// - 3: adds `root_device` (the shared-store image as a volatile root); a disk image's
///   system item (`vm.system=`) may hold a [`SYSTEM_CONFIG_FILE`] too, which the helper
///   applies (services started) before running its boot request.
/// - 4: adds `mounts` (more 9p shares, tmpfs) and `net` (a network interface to bring
///   up), both applied after the system item, before the command.
pub const PROTOCOL_VERSION: u32 = 4;
/// The system configuration, relative to a system item.
pub const SYSTEM_CONFIG_FILE: &str = "system.json";
/// How long the helper waits for a service to be up.
pub const SERVICE_READY_SECS: u64 = 60;
/// Where a service's stdout and stderr go (`NAME` replaced by its name).
pub const SERVICE_LOG: &str = "/var/log/NAME.log";
/// Where the host's store appears in the guest (read-only).
pub const STORE_MOUNT: &str = "/store";
/// Where the exchange directory appears in the guest (read-write).
pub const XCHG_MOUNT: &str = "/xchg";
/// 9p mount tag of the store share.
pub const STORE_TAG: &str = "store";
/// 9p mount tag of the exchange share.
pub const XCHG_TAG: &str = "xchg";
/// The request, relative to the exchange directory.
pub const REQUEST_FILE: &str = "request.json";
/// The status, relative to the exchange directory.
pub const STATUS_FILE: &str = "status";
/// Directory of kernel modules inside the initrd.
pub const MODULE_DIR: &str = "/lib/vm-modules";
/// File listing the modules in [`MODULE_DIR`] in load order.
pub const MODULE_ORDER: &str = "/lib/vm-modules/order";

/// What the guest is asked to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Must equal [`PROTOCOL_VERSION`].
    pub version: u32,
    /// Run one command, or a shell on the serial console.
    pub mode: Mode,
    /// The program and its arguments; the program is looked up in `PATH` from `env`.
    pub argv: Vec<String>,
    /// The whole environment of the program.
    pub env: Vec<(String, String)>,
    /// Working directory of the program.
    pub cwd: String,
    /// Symbolic links to create before running (`link`, `target`), e.g. `/bin`.
    pub links: Vec<(String, String)>,
    /// Directories to create before running.
    pub dirs: Vec<String>,
    /// Host name of the guest.
    pub hostname: String,
    /// Name of the virtio serial port that receives the program's stdout
    /// (`None`: the console).
    pub stdout_port: Option<String>,
    /// Name of the virtio serial port that receives the program's stderr.
    pub stderr_port: Option<String>,
    /// The system item (its path in the guest) whose [`SYSTEM_CONFIG_FILE`] is applied
    /// before running `argv`.
    #[serde(default)]
    pub system: Option<String>,
    /// A file in the exchange directory holding the arguments, each ended by a NUL byte,
    /// used instead of `argv` when present: written by `run-vm.sh`, which has no JSON
    /// encoder. Empty: `argv` stands.
    #[serde(default)]
    pub argv_file: Option<String>,
    /// A block device (e.g. `/dev/vda1`) whose ext4 file system becomes the root,
    /// read-only under a tmpfs overlay, before anything else is set up. Its `/etc` files
    /// and home directories stand for the system item's [`SystemConfig::files`] and
    /// [`SystemConfig::homes`], which are then not written again.
    #[serde(default)]
    pub root_device: Option<String>,
    /// Mounted in order after the system item is applied, before the command runs (a
    /// 9p share by its tag, with `fs_type` `9p`; a tmpfs over part of it, ...). Each
    /// target is created first when it is missing and its parent is writable.
    #[serde(default)]
    pub mounts: Vec<MountSpec>,
    /// A network interface to bring up (QEMU's user networking), none when absent.
    #[serde(default)]
    pub net: Option<NetConfig>,
}

/// The guest's one network interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// The interface, e.g. `eth0`.
    pub interface: String,
    /// Its IPv4 address and prefix length, e.g. `10.0.2.15/24`.
    pub address: String,
}

/// What a system item asks the helper to set up (the file [`SYSTEM_CONFIG_FILE`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SystemConfig {
    /// Must equal [`PROTOCOL_VERSION`].
    pub version: u32,
    pub hostname: String,
    /// Mounted in order, after the store and exchange shares.
    pub mounts: Vec<MountSpec>,
    /// Written in order (parents created): `/etc/passwd`, `/etc/group`, the system's files.
    pub files: Vec<FileSpec>,
    /// Home directories, created with their owners and mode 0700.
    pub homes: Vec<HomeSpec>,
    /// Symbolic links (`link`, `target`), e.g. `/bin` to busybox's.
    pub links: Vec<(String, String)>,
    /// Started in order; each must be up before the next starts.
    pub services: Vec<ServiceSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountSpec {
    pub source: String,
    pub target: String,
    pub fs_type: String,
    /// Comma-separated; `ro` makes a read-only mount.
    pub options: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSpec {
    /// Absolute.
    pub path: String,
    pub contents: String,
    pub mode: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HomeSpec {
    pub path: String,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub name: String,
    /// The program (looked up in `PATH` from `env`) and its arguments.
    pub argv: Vec<String>,
    /// The whole environment.
    pub env: Vec<(String, String)>,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub cwd: String,
    /// Started again when it exits (at most [`MAX_RESTARTS`] times, a second apart).
    pub restart: bool,
    pub ready: Readiness,
}

/// How many times a restarting service is started again before the helper gives up on it.
pub const MAX_RESTARTS: u32 = 5;

/// When a service counts as up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Readiness {
    Started,
    File(String),
    TcpPort(u16),
}

/// Parses an [`Request::argv_file`]: arguments each ended by a NUL byte.
pub fn parse_argv_file(bytes: &[u8]) -> Vec<String> {
    match bytes.strip_suffix(&[0]) {
        None => Vec::new(),
        Some(args) => args.split(|&b| b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect(),
    }
}

/// How the request runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Run `argv` with stdin from `/dev/null`; its exit status is the VM's.
    Command,
    /// Run `argv` (a shell) on the serial console as its controlling terminal.
    Interactive,
}

/// How the request ended, as written to [`STATUS_FILE`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// The program exited with this code.
    Exited(i32),
    /// The program was killed by this signal.
    Signaled(i32),
    /// The helper itself failed; the message says why.
    Error(String),
}

impl Status {
    /// The one-line encoding written to the status file.
    pub fn encode(&self) -> String {
        match self {
            Status::Exited(code) => format!("exit {code}\n"),
            Status::Signaled(sig) => format!("signal {sig}\n"),
            Status::Error(msg) => format!("error {}\n", msg.replace('\n', " ")),
        }
    }

    /// Parses what [`Status::encode`] wrote; `None` for anything else.
    pub fn decode(text: &str) -> Option<Status> {
        let line = text.strip_suffix('\n')?;
        let (kind, rest) = line.split_once(' ')?;
        match kind {
            "exit" => rest.parse().ok().map(Status::Exited),
            "signal" => rest.parse().ok().map(Status::Signaled),
            "error" => Some(Status::Error(rest.to_string())),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trips() {
        for s in [
            Status::Exited(0),
            Status::Exited(7),
            Status::Signaled(9),
            Status::Error("cannot mount /xchg: no such device".into()),
        ] {
            assert_eq!(Status::decode(&s.encode()), Some(s));
        }
    }

    #[test]
    fn argv_files_split_on_nul() {
        assert_eq!(parse_argv_file(b"sh\0-c\0echo a b\0"), ["sh", "-c", "echo a b"]);
        assert_eq!(parse_argv_file(b"sh\0-c\0\0"), ["sh", "-c", ""]);
        assert!(parse_argv_file(b"").is_empty());
    }

    #[test]
    fn truncated_or_junk_status_is_rejected() {
        assert_eq!(Status::decode("exit 0"), None, "no newline: write was cut short");
        assert_eq!(Status::decode("exit x\n"), None);
        assert_eq!(Status::decode(""), None);
        assert_eq!(Status::decode("done 0\n"), None);
    }
}
