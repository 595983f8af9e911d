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
//!    directories (both skipped when they come from the root device), links, then starts the
//!    services and waits until each is up (a service that exits before it is up, or is not up
//!    within [`SERVICE_READY_SECS`], is an error). Then it runs the request's command (or shell).
//!    Services run on until the end; their output goes to `/var/log/NAME.log`.
//! 4. It writes a [`Status`] line to [`STATUS_FILE`] in the exchange directory, syncs and
//!    powers the VM off (`reboot(2)`; the host runs QEMU with `-no-reboot`). A missing
//!    status file means the guest never finished: the host reports that as an error.
//!
//! This library is that protocol, shared by both sides so that they cannot disagree: the
//! helper (this crate's binary, `src/main.rs`) and the engine (`vm-xtask`), which writes
//! requests, system items and disk images and reads statuses. Its public items are public
//! for the engine only: a workspace that uses the toolkit never calls them, and they
//! change with [`PROTOCOL_VERSION`], not with this crate's version. So are those of
//! [`control`] (the control channel of a kept VM), [`image`] (what a disk image carries)
//! and [`ext4`] (the inode pass both image builders run). [`SOURCE_DIR`] is how the engine
//! finds the helper's source to build it.

#![deny(missing_docs)]

use serde::{Deserialize, Serialize};

pub mod attach;
pub mod control;
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

/// Where this crate's source is (wherever cargo keeps it: a path, a git checkout, the
/// registry's cache): the host builds the helper from here, never from the workspace of
/// whoever uses the toolkit.
pub const SOURCE_DIR: &str = env!("CARGO_MANIFEST_DIR");
/// The system configuration, relative to a system item.
pub const SYSTEM_CONFIG_FILE: &str = "system.json";
/// How long the helper waits for a service to be up.
pub const SERVICE_READY_SECS: u64 = 60;
/// Where a service's stdout and stderr go (`NAME` replaced by its name).
pub const SERVICE_LOG: &str = "/var/log/NAME.log";
/// Kernel argument: after loading its modules, and before mounting anything, the helper
/// waits on the virtio serial port [`SNAPSHOT_PORT`] for the host's `go` (see
/// [`snapshot`]): the point where a booted guest is saved, and restored from.
pub const SNAPSHOT_WAIT_ARG: &str = "vm.snapshot-wait";
/// The virtio serial port of the snapshot handshake.
pub const SNAPSHOT_PORT: &str = "snapshot";

/// The snapshot handshake: while it waits, the helper writes [`snapshot::WAITING`] on
/// [`SNAPSHOT_PORT`] every few milliseconds; the host saves the guest then (a guest saved
/// there restores into the same loop). To go on, the host sends one line
/// `go SECONDS NANOSECONDS HEX`: the host's clock (the guest's is set to it) and fresh
/// random bytes (added to the kernel's pool, which is then reseeded), so that every
/// restored guest is its own machine.
pub mod snapshot {
    /// What the waiting helper writes, a line at a time.
    pub const WAITING: &str = "waiting";
    /// What the helper writes instead at a failure point ([`crate::Request::save_failure`]):
    /// a line of its own, so that a host watching for failures never takes a line left
    /// from the snapshot point for one.
    pub const WAITING_AT_FAILURE: &str = "waiting at a failure";

    /// The `go` line for the host's clock and `entropy`.
    pub fn go_line(secs: u64, nanos: u32, entropy: &[u8]) -> String {
        let hex: String = entropy.iter().map(|b| format!("{b:02x}")).collect();
        format!("go {secs} {nanos} {hex}\n")
    }

    /// Parses a `go` line: (seconds, nanoseconds, entropy).
    pub fn parse_go(line: &str) -> Option<(u64, u32, Vec<u8>)> {
        let mut words = line.trim_end().split(' ');
        if words.next()? != "go" {
            return None;
        }
        let secs = words.next()?.parse().ok()?;
        let nanos = words.next()?.parse().ok().filter(|n| *n < 1_000_000_000)?;
        let hex = words.next()?;
        if hex.len() % 2 != 0 || hex.len() > 1024 || words.next().is_some() {
            return None;
        }
        let bytes =
            (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok()).collect::<Option<_>>()?;
        Some((secs, nanos, bytes))
    }
}

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
    /// Network interfaces to bring up, each with its address (QEMU's user network for
    /// forwarded ports, or a LAN of a scenario); none: no network.
    #[serde(default)]
    pub nets: Vec<NetConfig>,
    /// Serve shells on the attach channel ([`attach::ATTACH_PORT`]) while the VM runs.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub attach: bool,
    /// Keep the VM up after a [`Mode::Command`] program ends, until it is shut down
    /// (`poweroff` in it, or the host); the status is the program's.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep: bool,
    /// When the [`Mode::Command`] program fails, stop at the failure point before the
    /// status is written: every process ended, the shares unmounted (QEMU saves no VM
    /// with 9p mounted), mounts inside them parked, then wait on [`SNAPSHOT_PORT`] as at
    /// the snapshot point while the host saves the VM. On `go` the request is read
    /// again: the same one ends the run with the program's status; one with
    /// [`Request::replay`] is a replay's (see [`replay`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub save_failure: bool,
    /// A request read by a guest restored at its failure point: its shares are mounted
    /// again where they were, the parked mounts put back, the system's services started
    /// anew, and then this request's program runs.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replay: bool,
}

/// What a replay finds of the failure: the guest script of `cargo xtask test` writes
/// the failed binary's command line (its directory, cargo's variables, its arguments)
/// to [`replay::RERUN`], a shell script, before the VM is saved.
pub mod replay {
    /// The failed test binary's command line, as a shell script.
    pub const RERUN: &str = "/run/xtask/rerun-failed";
}

/// A network interface of the guest, brought up with its address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// The interface, e.g. `eth0`.
    pub interface: String,
    /// Its IPv4 address and prefix length, e.g. `10.0.2.15/24`.
    pub address: String,
    /// A default route through this address (QEMU's user network's `10.0.2.2`): given for
    /// a network that reaches out.
    #[serde(default)]
    pub gateway: Option<String>,
    /// The name server written to `/etc/resolv.conf` (QEMU's user network answers DNS at
    /// `10.0.2.3`); none: the file is left as it is.
    #[serde(default)]
    pub nameserver: Option<String>,
    /// The interface's hardware address, e.g. `52:54:00:77:00:01`, set before it is
    /// brought up; none: the device's own. A guest restored from a snapshot its
    /// interface was probed in has the snapshot's address until it sets its own.
    #[serde(default)]
    pub mac: Option<String>,
}

/// A hardware address `aa:bb:cc:dd:ee:ff` (hexadecimal, six bytes), or None.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next().filter(|p| p.len() == 2)?;
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// What a system item asks the helper to set up (the file [`SYSTEM_CONFIG_FILE`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SystemConfig {
    /// Must equal [`PROTOCOL_VERSION`].
    pub version: u32,
    /// The guest's host name, set when the item is applied (`/etc/hostname` is one of the files).
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
    /// Mounted in order once every service is up: the file systems not needed for boot
    /// ([`SystemConfig::mounts`] are, and come before the services).
    #[serde(default)]
    pub late_mounts: Vec<MountSpec>,
    /// How the root file system is checked before it is used (a disk image's root).
    #[serde(default)]
    pub root_check: Check,
    /// The command line that runs `e2fsck` (the checks' program, from the store), to
    /// which the options and the device are added. Empty when nothing is checked.
    #[serde(default)]
    pub fsck: Vec<String>,
}

/// A file system the helper mounts (a system's `FileSystem`, as the engine lowers it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountSpec {
    /// A device (`/dev/vdb1`, `LABEL=NAME`, `UUID=...`, found among the block devices
    /// and waited for), a 9p tag, or a virtual file system's name.
    pub source: String,
    /// The mount point, an absolute path in the guest.
    pub target: String,
    /// The file system type, as `mount -t` takes it: `ext4`, `tmpfs`, `9p`, ...
    pub fs_type: String,
    /// Comma-separated; `ro` makes a read-only mount.
    pub options: String,
    /// How the device is checked before it is mounted.
    #[serde(default)]
    pub check: Check,
}

/// How a block device's ext2/3/4 file system is checked (`e2fsck`) before it is
/// mounted. A failed check stops the boot with e2fsck's message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Check {
    /// Not checked.
    #[default]
    None,
    /// `e2fsck -n`: nothing is written (a read-only or volatile file system); any
    /// inconsistency fails the boot.
    ReadOnly,
    /// `e2fsck -p`: what is safe to repair is repaired; anything else fails the boot.
    Repair,
}

impl Check {
    /// e2fsck's option, if the file system is checked.
    pub fn option(self) -> Option<&'static str> {
        match self {
            Check::None => None,
            Check::ReadOnly => Some("-n"),
            Check::Repair => Some("-p"),
        }
    }
}

/// A file the helper writes (`/etc/passwd`, `/etc/group`, a system's `/etc` files).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSpec {
    /// Absolute.
    pub path: String,
    /// The whole file, as text.
    pub contents: String,
    /// Permission bits, e.g. `0o644`.
    pub mode: u32,
}

/// A home directory the helper creates, mode 0700.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HomeSpec {
    /// Absolute.
    pub path: String,
    /// The owner's user id.
    pub uid: u32,
    /// The owner's primary group id.
    pub gid: u32,
}

/// A service as the helper runs it: a system's service with its account resolved to ids.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    /// Names the service in the helper's messages and its log, [`SERVICE_LOG`].
    pub name: String,
    /// The program (looked up in `PATH` from `env`) and its arguments.
    pub argv: Vec<String>,
    /// The whole environment.
    pub env: Vec<(String, String)>,
    /// The user id it runs as.
    pub uid: u32,
    /// The group id it runs as.
    pub gid: u32,
    /// Its supplementary group ids.
    pub groups: Vec<u32>,
    /// Its working directory (its user's home).
    pub cwd: String,
    /// Started again when it exits (at most [`MAX_RESTARTS`] times, a second apart).
    pub restart: bool,
    /// When it counts as up.
    pub ready: Readiness,
}

/// How many times a restarting service is started again before the helper gives up on it.
pub const MAX_RESTARTS: u32 = 5;

/// When a service counts as up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Readiness {
    /// As soon as it is started.
    Started,
    /// Once this file exists.
    File(String),
    /// Once it accepts TCP connections on this port of 127.0.0.1.
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
    /// Serve the control channel ([`control`]): run the host's commands one at a time
    /// until it asks for a power-off; `argv` is not run.
    Serve,
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

/// The largest status file the host reads; anything longer is refused.
pub const STATUS_MAX_BYTES: usize = 4096;
/// The longest text of an `error` status, in bytes.
pub const STATUS_ERROR_MAX_BYTES: usize = 1024;
/// The largest exit code in an `exit` status.
pub const STATUS_MAX_EXIT: i32 = 255;
/// The largest signal number in a `signal` status (Linux's `SIGRTMAX`).
pub const STATUS_MAX_SIGNAL: i32 = 64;
/// How many characters of an invalid status an error message quotes (escaped).
const STATUS_QUOTE_CHARS: usize = 64;

impl Status {
    /// The one-line encoding written to the status file. An error's text has its
    /// control characters escaped and is cut to [`STATUS_ERROR_MAX_BYTES`], so what the
    /// helper writes always decodes.
    pub fn encode(&self) -> String {
        match self {
            Status::Exited(code) => format!("exit {code}\n"),
            Status::Signaled(sig) => format!("signal {sig}\n"),
            Status::Error(msg) => {
                let mut text = escape_controls(&msg.replace('\n', " "));
                if text.len() > STATUS_ERROR_MAX_BYTES {
                    let mut end = STATUS_ERROR_MAX_BYTES;
                    while !text.is_char_boundary(end) {
                        end -= 1;
                    }
                    text.truncate(end);
                }
                format!("error {text}\n")
            }
        }
    }

    /// Parses what [`Status::encode`] wrote, strictly: one line ended by a newline, at
    /// most [`STATUS_MAX_BYTES`], either `exit N` (N in 0..=255, plain decimal),
    /// `signal N` (N in 1..=64) or `error TEXT` (at most [`STATUS_ERROR_MAX_BYTES`];
    /// control characters come back escaped, so the text is safe to show). Anything else
    /// is an error that quotes at most a short, escaped prefix of what was found.
    pub fn decode(bytes: &[u8]) -> Result<Status, String> {
        let invalid = |why: &str| {
            Err(format!(
                "{why}; expected `exit N` (N in 0..={STATUS_MAX_EXIT}), `signal N` (N in 1..={STATUS_MAX_SIGNAL}) \
                 or `error TEXT`, ended by a newline; it begins \"{}\"",
                quote_prefix(bytes)
            ))
        };
        if bytes.len() > STATUS_MAX_BYTES {
            return invalid(&format!("the status is longer than {STATUS_MAX_BYTES} bytes"));
        }
        let Ok(text) = std::str::from_utf8(bytes) else { return invalid("the status is not UTF-8") };
        let Some(line) = text.strip_suffix('\n') else {
            return invalid("the status does not end with a newline (empty, or cut short)");
        };
        if line.contains('\n') {
            return invalid("the status has more than one line");
        }
        if let Some(n) = line.strip_prefix("exit ") {
            return match decimal(n, 0, STATUS_MAX_EXIT) {
                Some(code) => Ok(Status::Exited(code)),
                None => invalid(&format!("the exit code is not a number in 0..={STATUS_MAX_EXIT}")),
            };
        }
        if let Some(n) = line.strip_prefix("signal ") {
            return match decimal(n, 1, STATUS_MAX_SIGNAL) {
                Some(sig) => Ok(Status::Signaled(sig)),
                None => invalid(&format!("the signal is not a number in 1..={STATUS_MAX_SIGNAL}")),
            };
        }
        if let Some(msg) = line.strip_prefix("error ") {
            if msg.len() > STATUS_ERROR_MAX_BYTES {
                return invalid(&format!("the error text is longer than {STATUS_ERROR_MAX_BYTES} bytes"));
            }
            return Ok(Status::Error(escape_controls(msg)));
        }
        invalid("the status is of no known kind")
    }
}

/// `s` as a number in `min..=max`, written in plain decimal: digits only, no sign, no
/// leading zero, so no reader (a shell's arithmetic included) can take it otherwise.
fn decimal(s: &str, min: i32, max: i32) -> Option<i32> {
    let plain =
        !s.is_empty() && s.len() <= 3 && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    let n: i32 = if plain { s.parse().ok()? } else { return None };
    (min..=max).contains(&n).then_some(n)
}

/// Control characters (a terminal's escape sequences among them) escaped as `\u{1b}`.
fn escape_controls(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect()
}

/// At most [`STATUS_QUOTE_CHARS`] characters of `bytes`, escaped for showing.
fn quote_prefix(bytes: &[u8]) -> String {
    let head = &bytes[..bytes.len().min(STATUS_QUOTE_CHARS * 4)];
    let lossy = String::from_utf8_lossy(head);
    let text: String = lossy.chars().take(STATUS_QUOTE_CHARS).collect();
    let mut quoted = text.escape_debug().to_string();
    if text.len() < lossy.len() || head.len() < bytes.len() {
        quoted.push_str("...");
    }
    quoted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trips() {
        for s in [
            Status::Exited(0),
            Status::Exited(7),
            Status::Exited(255),
            Status::Signaled(1),
            Status::Signaled(9),
            Status::Signaled(64),
            Status::Error("cannot mount /xchg: no such device".into()),
        ] {
            assert_eq!(Status::decode(s.encode().as_bytes()), Ok(s));
        }
    }

    #[test]
    fn the_helpers_own_errors_always_decode() {
        let long = Status::Error(format!("{}\u{1b}[2J\nnext", "é".repeat(2000)));
        let decoded = Status::decode(long.encode().as_bytes()).unwrap();
        let Status::Error(text) = decoded else { panic!("not an error: {decoded:?}") };
        assert!(text.len() <= STATUS_ERROR_MAX_BYTES && !text.chars().any(char::is_control), "{text:?}");
        let short = Status::Error("bad\u{1b}[2J\nthing".into()).encode();
        assert_eq!(Status::decode(short.as_bytes()), Ok(Status::Error("bad\\u{1b}[2J thing".into())));
    }
    #[test]
    fn argv_files_split_on_nul() {
        assert_eq!(parse_argv_file(b"sh\0-c\0echo a b\0"), ["sh", "-c", "echo a b"]);
        assert_eq!(parse_argv_file(b"sh\0-c\0\0"), ["sh", "-c", ""]);
        assert!(parse_argv_file(b"").is_empty());
    }

    #[test]
    fn hardware_addresses_parse_and_junk_is_refused() {
        assert_eq!(parse_mac("52:54:00:77:0a:FF"), Some([0x52, 0x54, 0, 0x77, 0x0a, 0xff]));
        for junk in
            ["", "52:54:00:77:0a", "52:54:00:77:0a:ff:01", "52:54:00:77:0a:f", "52:54:00:77:0a:fg", "5:54:00:77:0a:ff1"]
        {
            assert_eq!(parse_mac(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn truncated_or_junk_status_is_rejected() {
        for junk in [
            &b"exit 0"[..],
            b"exit x\n",
            b"",
            b"\n",
            b"done 0\n",
            b"exit 99999999999999999999\n",
            b"exit 256\n",
            b"exit -1\n",
            b"exit +1\n",
            b"exit 07\n",
            b"exit 7junk\n",
            b"exit  7\n",
            b"exit 7 \n",
            b"exit 0\nexit 1\n",
            b"signal 0\n",
            b"signal 65\n",
            b"signal 2147483647\n",
            b"signal -9\n",
            b"signal a[$(reboot)]\n",
            b"exit \xff\n",
            b"EXIT 0\n",
        ] {
            let err = Status::decode(junk).expect_err(&String::from_utf8_lossy(junk));
            assert!(err.contains("expected `exit N` (N in 0..=255)"), "{err}");
        }
    }

    #[test]
    fn oversized_statuses_and_errors_are_rejected() {
        let mut big = b"exit 0\n".to_vec();
        big.resize(1 << 20, b'a');
        let err = Status::decode(&big).unwrap_err();
        assert!(err.contains("longer than 4096 bytes"), "{err}");
        let long_error = format!("error {}\n", "x".repeat(STATUS_ERROR_MAX_BYTES + 1));
        assert!(Status::decode(long_error.as_bytes()).unwrap_err().contains("longer than 1024 bytes"));
        let at_limit = format!("error {}\n", "x".repeat(STATUS_ERROR_MAX_BYTES));
        assert!(Status::decode(at_limit.as_bytes()).is_ok());
    }

    #[test]
    fn errors_quote_a_short_escaped_prefix_only() {
        let secret = format!("exit 1\u{1b}]0;title\u{7}{}SECRET-TAIL\n", "y".repeat(200));
        let err = Status::decode(secret.as_bytes()).unwrap_err();
        assert!(!err.contains("SECRET-TAIL"), "{err}");
        assert!(!err.chars().any(char::is_control), "{err:?}");
        assert!(err.contains(r"exit 1\u{1b}]0;title\u{7}yyy") && err.contains("..."), "{err}");
        assert!(err.len() < 400, "{err}");
        let control = Status::decode(b"error a\x1b[31mred\x07\n").unwrap();
        assert_eq!(control, Status::Error(r"a\u{1b}[31mred\u{7}".into()));
    }
}
