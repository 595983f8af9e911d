//! virtiofs for large read-only shares (the workspace of `cargo xtask test`): which
//! virtiofsd serves them (the host's, else the store QEMU's, else none and they stay on
//! 9p), and a virtiofsd per share for one run, unprivileged, confined and read-only.
//!
//! Each virtiofsd runs in a user and mount namespace of its own (`unshare --user
//! --map-root-user --mount`: the invoking user as root there, with no more rights over
//! the host than that user has), where the shared directory is bind-mounted over itself
//! read-only before virtiofsd starts; virtiofsd then sandboxes itself (`sandbox=namespace`:
//! new mount, PID and network namespaces, `pivot_root` into the shared directory), so
//! whatever the guest asks, no path reaches outside the share and nothing in it can be
//! written (`EROFS`), whichever virtiofsd it is (QEMU 7.2's has no read-only option). It
//! listens on a socket xtask made in the run's private directory (`--fd`), dies with xtask
//! (`PR_SET_PDEATHSIG`, which virtiofsd passes on to its sandboxed child as `SIGTERM`) and
//! is killed and reaped when the run ends. QEMU's `vhost-user-fs-device` needs the guest's
//! RAM shared with virtiofsd (a `memfd` backend, [`crate::vm::qemu::memory_args`]).
//!
//! QEMU 7.2's vhost-user-fs device blocks migration, and a warm start's RAM is a file of
//! its own: a VM that is snapshotted or restored keeps 9p for every share
//! ([`crate::vm::VmRun::run`] decides once the snapshot is known).

use std::ffi::OsString;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::OnceLock;

use anyhow::{Context, Result};

use crate::process::command;
use crate::store::Store;
use crate::vm::qemu::{VhostUserFs, VmSpec};

/// `XTASK_VIRTIOFSD`: the virtiofsd to run (a path), or `none` for 9p everywhere.
pub const VIRTIOFSD_ENV: &str = "XTASK_VIRTIOFSD";
/// The guest's kernel module for virtiofs (it brings `fuse` along).
pub const MODULE: &str = "virtiofs";
/// Where Debian puts virtiofsd: its own package's (the Rust one), then QEMU's (C, 7.2).
pub const HOST_PROGRAMS: &[&str] = &["/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd"];
/// QEMU's virtiofsd inside the store's qemu-system-common.
const STORE_PROGRAM: (&str, &str) = ("qemu-system-common", "usr/lib/qemu/virtiofsd");
/// The descriptor virtiofsd finds its listening socket on.
const SOCKET_FD: RawFd = 3;

/// The virtiofsd to run: the program and the words before its own options (the store's
/// runs through libc6's loader).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Virtiofsd {
    pub argv: Vec<OsString>,
}

/// Whether large shares go over virtiofs here: the virtiofsd, or why not.
pub type Availability = std::result::Result<Virtiofsd, String>;

static FOUND: OnceLock<Availability> = OnceLock::new();

/// The virtiofsd of this host, found once per process: [`VIRTIOFSD_ENV`], else the
/// first of [`HOST_PROGRAMS`] there is, else the store QEMU's when the VMs run the store's
/// QEMU; and user namespaces, which confine it. `Err` says why the shares stay on 9p.
pub fn virtiofsd(store: &Store) -> Availability {
    FOUND.get_or_init(|| find(store)).clone()
}

fn find(store: &Store) -> Availability {
    let program = match std::env::var_os(VIRTIOFSD_ENV) {
        Some(v) if v == "none" => return Err(format!("{VIRTIOFSD_ENV}=none")),
        Some(v) if !v.is_empty() => {
            let path = PathBuf::from(&v);
            if !crate::host::is_executable(&path) {
                return Err(format!("{VIRTIOFSD_ENV}={} is not an executable file", path.display()));
            }
            Virtiofsd { argv: vec![v] }
        }
        _ => match HOST_PROGRAMS.iter().map(Path::new).find(|p| crate::host::is_executable(p)) {
            Some(path) => Virtiofsd { argv: vec![path.into()] },
            None => from_store(store)
                .ok_or_else(|| format!("no virtiofsd ({}, nor the store QEMU's)", HOST_PROGRAMS.join(", ")))?,
        },
    };
    if !crate::host::userns_bind_mounts() {
        return Err("no user namespaces here, which confine virtiofsd to a read-only share".to_string());
    }
    Ok(program)
}

/// The store QEMU's virtiofsd, when the VMs run the store's QEMU (its closure is then
/// unpacked already) and its qemu-system-common has one.
fn from_store(store: &Store) -> Option<Virtiofsd> {
    let qemu = crate::debian::qemu::program().ok()?;
    if !qemu.starts_with(store.items_dir()) {
        return None;
    }
    let packages = crate::debian::Unpacked::closure(store, crate::debian::qemu::PACKAGE, "QEMU").ok()?;
    if !packages.item(STORE_PROGRAM.0).ok()?.path.join(STORE_PROGRAM.1).is_file() {
        return None;
    }
    let cmd = packages.command(STORE_PROGRAM.0, STORE_PROGRAM.1).ok()?;
    let mut argv = vec![cmd.get_program().to_os_string()];
    argv.extend(cmd.get_args().map(|a| a.to_os_string()));
    Some(Virtiofsd { argv })
}

/// The virtiofsd processes of one run, killed and reaped when dropped.
#[derive(Debug, Default)]
pub struct Servers {
    /// The tags now served over virtiofs.
    pub tags: Vec<String>,
    children: Vec<Child>,
    _sockets: Vec<crate::vm::attach::Socket>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Moves the read-only shares of `spec` tagged `tags` from 9p to virtiofs: a virtiofsd
/// each, started now, its socket in `runtime` (or a private directory when that path is
/// too long for a socket), its messages on stderr when `verbose`.
pub fn serve(
    virtiofsd: &Virtiofsd,
    spec: &mut VmSpec,
    tags: &[String],
    runtime: &Path,
    verbose: bool,
) -> Result<Servers> {
    let mut servers = Servers::default();
    let mut kept = Vec::new();
    for share in std::mem::take(&mut spec.shares) {
        if !share.readonly || !tags.contains(&share.tag) {
            kept.push(share);
            continue;
        }
        let name = format!("virtiofs-{}.sock", servers.tags.len());
        let Some(socket) = crate::vm::attach::Socket::new(runtime, &name)? else {
            kept.push(share);
            continue;
        };
        let listener = UnixListener::bind(&socket.path)
            .with_context(|| format!("listening on `{}` for virtiofsd", socket.path.display()))?;
        let mut cmd = confined(virtiofsd, &share.path);
        let fd = listener.as_raw_fd();
        // SAFETY: dup2 and fcntl are async-signal-safe. The copy at SOCKET_FD is not
        // close-on-exec; a socket already there (dup2 does nothing) is made so by hand.
        unsafe {
            cmd.pre_exec(move || {
                use nix::libc::{dup2, fcntl, F_SETFD};
                let done = if fd == SOCKET_FD { fcntl(fd, F_SETFD, 0) } else { dup2(fd, SOCKET_FD) };
                if done < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        if !verbose {
            cmd.stderr(Stdio::null());
        }
        let child = cmd.spawn().with_context(|| format!("starting `{}`", crate::process::describe(&cmd)))?;
        // virtiofsd holds the socket now: should it die, QEMU's connection is refused.
        drop(listener);
        servers.children.push(child);
        spec.vhost_user_fs.push(VhostUserFs { tag: share.tag.clone(), socket: socket.path.clone() });
        servers._sockets.push(socket);
        servers.tags.push(share.tag);
    }
    spec.shares = kept;
    Ok(servers)
}

/// virtiofsd serving `dir` read-only: in a user and mount namespace where `dir` is
/// bind-mounted over itself read-only, listening on [`SOCKET_FD`], sandboxed into `dir`.
fn confined(virtiofsd: &Virtiofsd, dir: &Path) -> std::process::Command {
    const SCRIPT: &str = "dir=$1; shift; mount --bind \"$dir\" \"$dir\" && mount -o remount,bind,ro \"$dir\" \
                          || exit 125; exec \"$@\"";
    let mut cmd = command("unshare");
    cmd.args(["--user", "--map-root-user", "--mount", "--", "sh", "-c", SCRIPT, "sh"]).arg(dir);
    cmd.args(&virtiofsd.argv);
    cmd.arg(format!("--fd={SOCKET_FD}"));
    cmd.arg("-o").arg(source_option(dir));
    // The descriptor limit as it is (raising it takes a privilege the namespace lacks).
    cmd.args(["-o", "sandbox=namespace", "-o", "cache=auto", "--rlimit-nofile=0"]);
    cmd
}

/// `source=DIR`, with the backslashes and commas of `DIR` escaped as FUSE's option
/// parser wants them (a comma would end the option).
fn source_option(dir: &Path) -> OsString {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let mut bytes = b"source=".to_vec();
    for &b in dir.as_os_str().as_bytes() {
        if b == b',' || b == b'\\' {
            bytes.push(b'\\');
        }
        bytes.push(b);
    }
    OsString::from_vec(bytes)
}

/// The guest's mounts of the shares now on virtiofs (`tags`), made virtiofs mounts:
/// the 9p options dropped, the mount flags (`ro`, `nosuid`, ...) kept.
pub fn retarget(mounts: &mut [guest::MountSpec], tags: &[String]) {
    const FLAGS: &[&str] = &["ro", "nosuid", "nodev", "noexec"];
    for m in mounts.iter_mut().filter(|m| m.fs_type == "9p" && tags.contains(&m.source)) {
        m.fs_type = "virtiofs".into();
        m.options = m.options.split(',').filter(|o| FLAGS.contains(o)).collect::<Vec<_>>().join(",");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_tagged_9p_mounts_become_virtiofs_mounts_keeping_their_flags() {
        let mount = |source: &str, fs_type: &str| guest::MountSpec {
            source: source.into(),
            target: "/w".into(),
            fs_type: fs_type.into(),
            options: "ro,trans=virtio,version=9p2000.L,msize=512000,cache=loose".into(),
            check: guest::Check::None,
        };
        let mut mounts = vec![mount("ws", "9p"), mount("other", "9p"), mount("ws", "tmpfs")];
        retarget(&mut mounts, &["ws".to_string()]);
        assert_eq!((mounts[0].fs_type.as_str(), mounts[0].options.as_str()), ("virtiofs", "ro"));
        assert_eq!(mounts[1].fs_type, "9p");
        assert_eq!(mounts[2].fs_type, "tmpfs");
    }

    #[test]
    fn commas_and_backslashes_in_the_shared_directory_are_escaped() {
        assert_eq!(source_option(Path::new("/a,b\\c/d")), "source=/a\\,b\\\\c/d");
    }

    #[test]
    fn virtiofsd_runs_in_its_own_namespaces_over_a_read_only_bind_mount() {
        let cmd = confined(&Virtiofsd { argv: vec!["/v/virtiofsd".into()] }, Path::new("/s/view"));
        let shown = crate::process::describe(&cmd);
        assert!(shown.starts_with("unshare --user --map-root-user --mount -- sh -c"), "{shown}");
        assert!(shown.contains("mount -o remount,bind,ro"), "{shown}");
        assert!(
            shown.ends_with(
                "sh /s/view /v/virtiofsd --fd=3 -o source=/s/view -o sandbox=namespace -o cache=auto \
                 --rlimit-nofile=0"
            ),
            "{shown}"
        );
    }
}
