//! Ingest's memory grows with a tree's depth, not with its entries: 200,000 files with
//! 200-byte names, in directories nested 100 deep (paths of 20 KB, far past `PATH_MAX`,
//! made and read through directory descriptors), are copied with this process's peak
//! resident memory under 256 MiB. Its own test binary, so the peak is this copy's alone.

use std::ffi::OsString;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStringExt;

use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{mkdirat, Mode};
use vm_xtask::testing::{copy_dir, Limits};

const FILES: usize = 200_000;
const DEPTH: usize = 100;
const NAME_BYTES: usize = 200;

fn name(i: usize, kind: u8) -> OsString {
    let mut name = format!("{kind}{i:0>width$}", kind = kind as char, width = NAME_BYTES - 1).into_bytes();
    name.truncate(NAME_BYTES);
    OsString::from_vec(name)
}

/// Peak resident memory of this process, in KiB.
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM in /proc/self/status");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn ingesting_a_wide_deep_tree_keeps_memory_bounded_by_depth() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("out");
    std::fs::create_dir(&src).unwrap();
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    let mut level = std::fs::File::open(&src).unwrap();
    let per_level = FILES / DEPTH;
    for depth in 0..DEPTH {
        for i in 0..per_level {
            let file = openat(
                Some(level.as_raw_fd()),
                name(depth * per_level + i, b'f').as_os_str(),
                OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o644),
            )
            .unwrap();
            nix::unistd::close(file).unwrap();
        }
        let sub = name(depth, b'd');
        mkdirat(Some(level.as_raw_fd()), sub.as_os_str(), Mode::from_bits_truncate(0o755)).unwrap();
        let fd = openat(Some(level.as_raw_fd()), sub.as_os_str(), flags, Mode::empty()).unwrap();
        // SAFETY: `fd` was just opened and is owned by nothing else.
        level = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    }
    drop(level);
    // The peak from here on is the copy's.
    std::fs::write("/proc/self/clear_refs", "5").expect("resetting the peak resident memory");
    let before = peak_rss_kib();
    let source = xtask_dir(&src);
    copy_dir(&source, "$out", &dir.path().join("copy"), &Limits::output(1 << 30)).expect("copying the tree");
    let peak = peak_rss_kib();
    eprintln!("peak resident memory while ingesting {FILES} files nested {DEPTH} deep: {} MiB", peak / 1024);
    assert!(peak < 256 * 1024, "peak resident memory {} MiB (from {} MiB before)", peak / 1024, before / 1024);
}

fn xtask_dir(path: &std::path::Path) -> vm_xtask::testing::DirFd {
    vm_xtask::testing::DirFd::open(path).unwrap()
}
