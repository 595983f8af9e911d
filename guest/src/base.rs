//! What every system has, whatever its packages and configuration, as a freshly installed
//! Debian machine has it: devpts at `/dev/pts` (with `/dev/ptmx`), a tmpfs at `/dev/shm`,
//! `/dev/fd` and the standard stream links, `/tmp` and `/var/tmp` open to all (sticky),
//! the loopback interface up, and in `/etc` the `nobody`/`nogroup` account, `localhost`
//! in `hosts` and an `nsswitch.conf`. A system's own files come first: only what they
//! lack is added.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use nix::mount::{mount, MsFlags};

use crate::sys::Result;

/// Devices, directories and the loopback interface, once `/` is the final root.
pub(crate) fn machine() -> Result<()> {
    let mounted = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let is_mounted = |target: &str| mounted.lines().any(|l| l.split(' ').nth(1) == Some(target));
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
    // A devpts of its own, its ptmx open to all as Debian's /dev/ptmx is.
    for (target, fs_type, flags, options) in [
        ("/dev/pts", "devpts", flags, "newinstance,ptmxmode=0666,mode=0620,gid=5"),
        ("/dev/shm", "tmpfs", flags | MsFlags::MS_NODEV, "mode=1777"),
    ] {
        if is_mounted(target) {
            continue;
        }
        fs::create_dir_all(target).map_err(|e| format!("cannot create {target}: {e}"))?;
        mount(Some(fs_type), target, Some(fs_type), flags, Some(options))
            .map_err(|e| format!("cannot mount {fs_type} on {target}: {e}"))?;
    }
    // devtmpfs makes /dev/ptmx, which opens the devpts mounted beside it; without one, a link.
    let mut links = vec![("/dev/fd", "/proc/self/fd")];
    links.extend([("/dev/stdin", "/proc/self/fd/0"), ("/dev/stdout", "/proc/self/fd/1")]);
    links.extend([("/dev/stderr", "/proc/self/fd/2"), ("/dev/ptmx", "pts/ptmx")]);
    for (link, target) in links {
        if fs::symlink_metadata(link).is_err() {
            std::os::unix::fs::symlink(target, link).map_err(|e| format!("cannot link {link} -> {target}: {e}"))?;
        }
    }
    for dir in ["/tmp", "/var/tmp"] {
        fs::create_dir_all(dir).map_err(|e| format!("cannot create {dir}: {e}"))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o1777))
            .map_err(|e| format!("cannot set the mode of {dir}: {e}"))?;
    }
    crate::services::loopback_up()
}

/// `/etc` as the system's own files left it, with what every Debian system has added
/// where they lack it. Runs after the system's files are written, before its services.
pub(crate) fn etc() -> Result<()> {
    fs::create_dir_all("/etc").map_err(|e| format!("cannot create /etc: {e}"))?;
    add_entry("/etc/passwd", "root", "root:x:0:0:root:/root:/bin/sh")?;
    add_entry("/etc/passwd", "nobody", "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin")?;
    add_entry("/etc/group", "root", "root:x:0:")?;
    add_entry("/etc/group", "nogroup", "nogroup:x:65534:")?;
    let localhost = "127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n";
    match read("/etc/hosts")? {
        None => {
            let hostname = nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default();
            let own = if hostname.is_empty() || hostname == "localhost" {
                String::new()
            } else {
                format!("127.0.1.1\t{hostname}\n")
            };
            fs::write("/etc/hosts", format!("{localhost}{own}"))
                .map_err(|e| format!("cannot write /etc/hosts: {e}"))?;
        }
        // A system's own (a scenario node's) without localhost: added.
        Some(hosts)
            if !hosts
                .lines()
                .any(|l| l.split('#').next().unwrap_or("").split_whitespace().skip(1).any(|n| n == "localhost")) =>
        {
            append("/etc/hosts", &hosts, localhost)?;
        }
        Some(_) => {}
    }
    write_absent(
        "/etc/nsswitch.conf",
        "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\nnetworks: files\n\
         protocols: files\nservices: files\nethers: files\nrpc: files\n",
    )
}

/// Appends `line` to the colon-separated database `path` unless it has an entry `name`.
fn add_entry(path: &str, name: &str, line: &str) -> Result<()> {
    let text = read(path)?.unwrap_or_default();
    if text.lines().any(|l| l.split(':').next() == Some(name)) {
        return Ok(());
    }
    append(path, &text, &format!("{line}\n"))
}

/// The text of `path`, if there is a file.
fn read(path: &str) -> Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {path}: {e}")),
    }
}

/// Appends `lines` to `path`, whose text is `text` (a line it did not end is ended first).
fn append(path: &str, text: &str, lines: &str) -> Result<()> {
    let separator = if text.is_empty() || text.ends_with('\n') { "" } else { "\n" };
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o644)
        .open(path)
        .map_err(|e| format!("cannot open {path}: {e}"))?;
    file.write_all(format!("{separator}{lines}").as_bytes()).map_err(|e| format!("cannot write {path}: {e}"))
}

/// Writes `contents` to `path` unless something is there already.
fn write_absent(path: &str, contents: &str) -> Result<()> {
    if fs::symlink_metadata(Path::new(path)).is_ok() {
        return Ok(());
    }
    fs::write(path, contents).map_err(|e| format!("cannot write {path}: {e}"))
}
