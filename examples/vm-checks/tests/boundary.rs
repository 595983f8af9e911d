//! What a test VM can reach, tried as a hostile test would: every mount but the shares (9p
//! and virtiofs) is undone, every 9p share it can find is mounted (where it is not yet), and every file
//! there is listed (`FILE TAG PATH`), the store's entries by name (`STORE-ENTRY NAME`), and any
//! line holding the marker `XTASK-SENTINEL-` (`SENTINEL TAG PATH: LINE`). The host
//! (`tests/it/guest_boundary.rs`) reads the list. Unmounts what later tests need: run it
//! alone (`--test boundary`).

use std::ffi::CString;
use std::io::Read;
use std::path::{Path, PathBuf};

/// At most this much is read of all files together: a share that holds more than sources
/// is a failure by itself.
const READ_CAP: u64 = 64 << 20;

#[test]
#[ignore = "needs a VM, and unmounts what other tests need: run it alone"]
fn sees_only_what_it_must() {
    // Every mount but the kernel's own and the shares themselves (the guest reports
    // through one) goes: what hid something is gone.
    let keep = ["/", "/proc", "/sys", "/dev"];
    let shared = |kind: &str| kind == "9p" || kind == "virtiofs";
    let all = mounts();
    // A mount with a share below it (a workspace under /tmp) stays too: undoing it would
    // take the share along, out of reach, and keep its channel busy for a new mount.
    let holds_share = |target: &str| {
        all.iter().any(|(_, t, k)| shared(k) && t.len() > target.len() && t.starts_with(&format!("{target}/")))
    };
    for (_, target, kind) in all.iter().rev() {
        if !shared(kind) && !keep.contains(&target.as_str()) && !holds_share(target) {
            // Programs are in the store: system calls only from here on.
            let _ = umount(target);
        }
    }
    let mut budget = Budget { bytes: READ_CAP, entries: ENTRY_CAP };
    let mut seen = Vec::new();
    for (tag, target, kind) in mounts() {
        if shared(&kind) && !seen.contains(&tag) {
            println!("TAG {tag} mounted=true at {target}");
            show(&tag, Path::new(&target), &mut budget);
            seen.push(tag);
        }
    }
    // And every share not mounted yet, mounted.
    for tag in nine_p_tags().into_iter().filter(|t| !seen.contains(t)) {
        let at = PathBuf::from(format!("/boundary-{tag}"));
        let _ = std::fs::create_dir_all(&at);
        let mounted = mount_9p(&tag, &at);
        println!("TAG {tag} mounted={} at {}", mounted.is_ok(), at.display());
        if mounted.is_ok() {
            show(&tag, &at, &mut budget);
        }
    }
    println!("READ {} bytes", READ_CAP - budget.bytes);
    assert!(budget.bytes > 0 && budget.entries > 0, "more than sources and items are shared");
}

/// At most this many files and directories are listed.
const ENTRY_CAP: u64 = 50_000;

struct Budget {
    bytes: u64,
    entries: u64,
}

/// `(source, mount point, type)` of each mount, in order.
fn mounts() -> Vec<(String, String, String)> {
    let text = std::fs::read_to_string("/proc/self/mounts").expect("reading /proc/self/mounts");
    text.lines()
        .filter_map(|l| {
            let mut words = l.split(' ');
            Some((words.next()?.to_string(), words.next()?.to_string(), words.next()?.to_string()))
        })
        .collect()
}

/// The store's entries by name; every other share's files listed and searched.
fn show(tag: &str, at: &Path, budget: &mut Budget) {
    if tag == "store" {
        for entry in std::fs::read_dir(at).expect("listing the store share").flatten() {
            println!("STORE-ENTRY {}", entry.file_name().to_string_lossy());
        }
    } else {
        list(tag, at, at, budget);
    }
}

fn c_string(s: &str) -> CString {
    CString::new(s).expect("no NUL in a path")
}

fn umount(target: &str) -> std::io::Result<()> {
    let target = c_string(target);
    // SAFETY: a valid NUL-terminated path.
    match unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

fn mount_9p(tag: &str, at: &Path) -> std::io::Result<()> {
    let (source, target) = (c_string(tag), c_string(&at.to_string_lossy()));
    let (kind, options) = (c_string("9p"), c_string("trans=virtio,version=9p2000.L"));
    // SAFETY: valid NUL-terminated strings that outlive the call.
    let done = unsafe {
        libc::mount(source.as_ptr(), target.as_ptr(), kind.as_ptr(), libc::MS_RDONLY, options.as_ptr().cast())
    };
    match done {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// The mount tags of the VM's 9p devices.
fn nine_p_tags() -> Vec<String> {
    let Ok(devices) = std::fs::read_dir("/sys/bus/virtio/drivers/9pnet_virtio") else { return Vec::new() };
    let mut tags: Vec<String> = devices
        .flatten()
        .filter_map(|d| std::fs::read_to_string(d.path().join("mount_tag")).ok())
        .map(|t| t.trim_end_matches(['\0', '\n']).to_string())
        .collect();
    tags.sort();
    tags.dedup();
    tags
}

fn list(tag: &str, root: &Path, dir: &Path, budget: &mut Budget) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        if budget.bytes == 0 || budget.entries == 0 {
            return;
        }
        budget.entries -= 1;
        let path = entry.path();
        let shown = path.strip_prefix(root).unwrap_or(&path).display().to_string();
        let Ok(kind) = entry.file_type() else { continue };
        if kind.is_dir() {
            println!("DIR {tag} {shown}");
            list(tag, root, &path, budget);
        } else if kind.is_file() {
            println!("FILE {tag} {shown}");
            let Ok(file) = std::fs::File::open(&path) else { continue };
            let mut text = Vec::new();
            let _ = file.take(budget.bytes.min(1 << 20)).read_to_end(&mut text);
            budget.bytes = budget.bytes.saturating_sub(text.len() as u64);
            for line in String::from_utf8_lossy(&text).lines().filter(|l| l.contains("XTASK-SENTINEL-")) {
                println!("SENTINEL {tag} {shown}: {line}");
            }
        }
    }
}
