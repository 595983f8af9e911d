//! The workspace share as the `hello` VM sees it: how it is mounted (said on stdout as
//! `workspace share: TYPE OPTIONS`), that nothing in it can be written even after
//! remounting it read-write, and how long a `find` + `stat` over it takes (`tree-walk:
//! TYPE SECONDS s ...`, the bench's figure).

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use vm_checks::require_hello_vm;

/// The workspace's root: this crate is `examples/vm-checks` in it.
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("the workspace's root")
}

/// `(type, options)` of the mount at `target`, the last one there.
fn mount_at(target: &Path) -> (String, String) {
    let mounts = fs::read_to_string("/proc/self/mounts").expect("reading /proc/self/mounts");
    let target = target.to_string_lossy().replace(' ', "\\040");
    mounts
        .lines()
        .rev()
        .find_map(|l| {
            let words: Vec<&str> = l.split(' ').collect();
            (words.get(1) == Some(&target.as_str())).then(|| (words[2].to_string(), words[3].to_string()))
        })
        .unwrap_or_else(|| panic!("nothing is mounted at {target}:\n{mounts}"))
}

/// Every way of writing tried here fails: a new file, an existing one opened for writing,
/// a new directory, a change of mode.
fn assert_unwritable(root: &Path) {
    let fixture = root.join("examples/vm-checks/tests/fixture.txt");
    assert!(fs::write(root.join("written-by-the-guest"), "x").is_err(), "a new file was written");
    assert!(OpenOptions::new().write(true).open(&fixture).is_err(), "a source opened for writing");
    assert!(fs::create_dir(root.join("made-by-the-guest")).is_err(), "a directory was made");
    // Its own mode again: harmless if it were allowed, and it must not be.
    let mode = fs::metadata(&fixture).expect("the fixture is shared").permissions();
    assert!(fs::set_permissions(&fixture, mode).is_err(), "a source's mode was changed");
}

#[test]
#[ignore = "needs the hello VM"]
fn the_workspace_share_is_read_only_even_remounted() {
    require_hello_vm();
    let root = workspace_root();
    let (kind, options) = mount_at(&root);
    println!("workspace share: {kind} {options}");
    assert!(options.split(',').any(|o| o == "ro"), "the workspace is mounted {options}");
    assert_unwritable(&root);
    // The guest is root: it can make its mount read-write; the host still refuses.
    let remount = Command::new("mount").args(["-o", "remount,rw"]).arg(&root).status();
    assert!(remount.is_ok_and(|s| s.success()), "remounting the workspace read-write failed");
    let (_, options) = mount_at(&root);
    assert!(options.split(',').any(|o| o == "rw"), "still {options} after remounting");
    assert_unwritable(&root);
}

/// Walks of the workspace's sources, each with the guest's dentries and inodes dropped
/// first, so every one asks the host.
const WALKS: usize = 20;

/// `find ROOT -exec stat {} +`, in this process: every directory read, every entry's
/// `lstat`. In this process (no `find` or `stat` started) so that what is measured is the
/// share, not process starts under an emulated CPU; the caches are dropped before each
/// walk (dentries and inodes only: this binary's pages stay).
#[test]
#[ignore = "needs the hello VM"]
fn tree_walk() {
    require_hello_vm();
    let root = workspace_root();
    let (kind, _) = mount_at(&root);
    let mut total = std::time::Duration::ZERO;
    let mut entries = 0;
    for _ in 0..WALKS {
        fs::write("/proc/sys/vm/drop_caches", "2").expect("dropping the guest's dentries and inodes");
        let started = Instant::now();
        entries = walk(&root);
        total += started.elapsed();
    }
    assert!(entries > 100, "only {entries} entries in the workspace");
    // One `find` + `stat` as programs, for comparison (not the figure).
    fs::write("/proc/sys/vm/drop_caches", "2").expect("dropping the guest's dentries and inodes");
    let started = Instant::now();
    let status = Command::new("sh")
        .args(["-c", "find \"$1\" -exec stat -- {} + >/dev/null", "sh"])
        .arg(&root)
        .status()
        .expect("running find");
    assert!(status.success(), "find + stat failed: {status}");
    let programs = started.elapsed().as_secs_f64();
    println!("tree-walk: {kind} {:.6} s for {WALKS} walks of {entries} entries", total.as_secs_f64());
    println!("tree-walk-programs: {kind} {programs:.6} s");
}

/// Entries under `dir`, each `lstat`ed, directories read and walked in.
fn walk(dir: &Path) -> usize {
    let mut n = 0;
    for entry in fs::read_dir(dir).expect("reading a directory of the share") {
        let path = entry.expect("a directory entry").path();
        let meta = fs::symlink_metadata(&path).expect("stat of an entry");
        n += 1;
        if meta.is_dir() {
            n += walk(&path);
        }
    }
    n
}
