//! The failure point ([`guest::Request::save_failure`]): when the program of a test run
//! fails, the helper makes the VM one QEMU can save (no 9p or virtiofs mounted), waits
//! while the host saves it, and then either ends the run or, restored by a replay, puts
//! the shares back and carries out the replay's request.
//!
//! What is kept is everything in the guest's memory: the root and every tmpfs (the
//! files the tests wrote), the kernel's state (modules, interfaces, addresses). What is
//! not: processes. QEMU will not save a guest with a 9p share mounted, and every program
//! runs from one, so they are ended first; a replay starts the system's services anew.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use guest::Request;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::sys::{log, Result};

/// Where mounts inside the shares wait while the shares are unmounted.
const PARK: &str = "/run/xtask/parked";

/// A mount moved out of a share, and where it goes back.
pub struct Parked {
    target: PathBuf,
    parked: PathBuf,
}

/// Stops at the failure point and waits for the host; returns the replay's request when
/// this guest was restored by one (its shares mounted again), or None when the run ends
/// here.
pub fn save_point() -> Result<Option<Request>> {
    log("the program failed: stopping at the failure point for the host to save the VM");
    let (request, parked) = stop_and_wait()?;
    if !request.replay {
        return Ok(None);
    }
    put_back(&request, &parked)?;
    Ok(Some(request))
}

/// Ends every other process, parks the mounts inside the shares, unmounts the shares and
/// waits for the host's `go`; then mounts the exchange directory and the store again and
/// reads the request. If the shares cannot be unmounted, they are mounted again and that
/// is the error: nothing is saved.
pub fn stop_and_wait() -> Result<(Request, Vec<Parked>)> {
    end_processes();
    let parked = park_mounts()?;
    if let Err(e) = unmount_shares() {
        remount_missing_shares();
        for p in parked.iter().rev() {
            let _ = move_mount(&p.parked, &p.target);
        }
        return Err(e);
    }
    crate::snapshot::wait_for_go(guest::snapshot::WAITING_AT_FAILURE)?;
    crate::mount_shares()?;
    let request = crate::read_request()?;
    if request.replay {
        log("restored at the failure point (replay)");
    }
    Ok((request, parked))
}

/// Mounts `request`'s shares again where they were, and puts the parked mounts back.
pub fn put_back(request: &Request, parked: &[Parked]) -> Result<()> {
    for m in request.mounts.iter().filter(|m| is_share(&m.fs_type)) {
        crate::services::mount_spec(m)?;
    }
    for p in parked.iter().rev() {
        move_mount(&p.parked, &p.target)?;
    }
    Ok(())
}

/// After a failed unmount: the exchange directory and the store mounted again where
/// they are no longer.
fn remount_missing_shares() {
    let mounted: Vec<PathBuf> = mounts().unwrap_or_default().into_iter().map(|m| m.target).collect();
    if !mounted.iter().any(|t| t == Path::new(guest::XCHG_MOUNT)) {
        let _ = crate::mount_9p(guest::XCHG_TAG, guest::XCHG_MOUNT, MsFlags::empty(), "cache=none");
    }
    if !mounted.iter().any(|t| t == Path::new(guest::STORE_MOUNT)) {
        let _ = crate::mount_9p(guest::STORE_TAG, guest::STORE_MOUNT, MsFlags::MS_RDONLY, "cache=loose");
    }
}

/// Ends every process but this one and reaps them: nothing may hold a file of a share.
fn end_processes() {
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(5)),
            Ok(_) => {}
            Err(_) => return,
        }
    }
    log("some processes did not end within 5 s of SIGKILL");
}

fn is_share(fs_type: &str) -> bool {
    matches!(fs_type, "9p" | "virtiofs")
}

/// One line of `/proc/self/mountinfo`: its ID, its parent's, where and what.
struct MountLine {
    id: u32,
    parent: u32,
    target: PathBuf,
    fs_type: String,
}

fn mounts() -> Result<Vec<MountLine>> {
    let text = fs::read_to_string("/proc/self/mountinfo").map_err(|e| format!("cannot read mountinfo: {e}"))?;
    Ok(text.lines().filter_map(parse_mountinfo).collect())
}

fn parse_mountinfo(line: &str) -> Option<MountLine> {
    let words: Vec<&str> = line.split(' ').collect();
    let dash = words.iter().position(|w| *w == "-")?;
    Some(MountLine {
        id: words.first()?.parse().ok()?,
        parent: words.get(1)?.parse().ok()?,
        target: PathBuf::from(unescape(words.get(4)?)),
        fs_type: words.get(dash + 1)?.to_string(),
    })
}

/// mountinfo's octal escapes (`\040` for a space) undone.
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal =
            bytes.get(i + 1..i + 4).filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push(d.iter().fold(0u8, |n, c| n.wrapping_mul(8).wrapping_add(c - b'0')));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Moves every mount whose parent is a share (a tmpfs over `target/tmp`) under [`PARK`],
/// with what is mounted inside it, so that the shares can be unmounted and its files kept.
fn park_mounts() -> Result<Vec<Parked>> {
    let all = mounts()?;
    let shares: Vec<u32> = all.iter().filter(|m| is_share(&m.fs_type)).map(|m| m.id).collect();
    let mut parked = Vec::new();
    for (i, m) in all.iter().filter(|m| !is_share(&m.fs_type) && shares.contains(&m.parent)).enumerate() {
        let to = Path::new(PARK).join(i.to_string());
        fs::create_dir_all(&to).map_err(|e| format!("cannot create {}: {e}", to.display()))?;
        move_mount(&m.target, &to)?;
        parked.push(Parked { target: m.target.clone(), parked: to });
    }
    Ok(parked)
}

fn move_mount(from: &Path, to: &Path) -> Result<()> {
    mount(Some(from), to, None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| format!("cannot move the mount {} to {}: {e}", from.display(), to.display()))
}

/// Unmounts every share, the innermost first.
fn unmount_shares() -> Result<()> {
    let mut shares: Vec<MountLine> = mounts()?.into_iter().filter(|m| is_share(&m.fs_type)).collect();
    shares.sort_by_key(|m| std::cmp::Reverse(m.target.components().count()));
    for m in shares {
        umount2(&m.target, MntFlags::empty()).map_err(|e| format!("cannot unmount {}: {e}", m.target.display()))?;
    }
    log("shares unmounted: waiting for the host to save the VM");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_give_ids_targets_and_types() {
        let line = "36 25 0:32 / /home/a\\040b/ws rw,relatime - 9p workspace ro,trans=virtio";
        let m = parse_mountinfo(line).unwrap();
        assert_eq!((m.id, m.parent, m.fs_type.as_str()), (36, 25, "9p"));
        assert_eq!(m.target, Path::new("/home/a b/ws"));
        let tagged = "40 36 0:33 / /w/target/tmp rw shared:1 - tmpfs tmpfs rw,mode=1777";
        assert_eq!(parse_mountinfo(tagged).unwrap().fs_type, "tmpfs");
        assert!(parse_mountinfo("garbage").is_none());
        assert_eq!(unescape("a\\134b\\012"), "a\\b\n");
    }
}
