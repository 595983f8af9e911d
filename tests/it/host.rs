//! What a host needs, as docs/running.md says it: `cargo xtask` run with `PATH` holding only
//! the Rust toolchain (cargo, rustc and the C compiler driver `cc` it links with), apt
//! (apt-get, apt-cache), dpkg-deb with the tar it runs, and QEMU (qemu-system-x86_64,
//! qemu-img; QEMU may be missing, and then comes from the store), and with installing
//! turned off, builds an image of `hello`, runs a command in it and builds an item in a
//! VM, from an empty store: Debian's packages fetched as `vm.lock` pins them,
//! the image written with the tools from the store. (rustup's `cargo` proxy puts its own
//! directory, `~/.cargo/bin`, which holds only the toolchain's programs, first on the
//! `PATH` it passes on.)

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use vm_tests::{store_dir, workspace_root, Run, TIMEOUT};

/// The host programs the README and docs/running.md list, found on this machine's `PATH`.
pub const HOST_PROGRAMS: &[&str] =
    &["cargo", "rustc", "cc", "apt-get", "apt-cache", "dpkg-deb", "tar", "qemu-system-x86_64", "qemu-img"];

/// A directory of links to [`HOST_PROGRAMS`] and nothing else; fails naming a missing one
/// (but for QEMU, which then comes from the store).
fn restricted_path(dir: &Path) -> PathBuf {
    links_to(dir, HOST_PROGRAMS, &["qemu-system-x86_64"])
}

/// `dir/bin` with a link to each of `programs` found on `PATH`; one not found fails the
/// test unless it is `optional`.
fn links_to(dir: &Path, programs: &[&str], optional: &[&str]) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let path = std::env::var_os("PATH").unwrap_or_default();
    for program in programs {
        let found = std::env::split_paths(&path).map(|d| d.join(program)).find(|p| p.is_file());
        match found {
            Some(found) => std::os::unix::fs::symlink(&found, bin.join(program)).unwrap(),
            None if optional.contains(program) => {}
            None => panic!("`{program}`, which docs/running.md says a host needs, is not on PATH"),
        }
    }
    bin
}

#[test]
fn an_unprivileged_user_without_qemu_runs_the_default_system() {
    // Everything but QEMU's choice is in the store already (made by this test run).
    vm_tests::run_vm(&["true"]).expect_code(0);
    let tmp = tempfile::tempdir_in(store_dir().parent().unwrap()).unwrap();
    let bin = links_to(tmp.path(), &["apt-get", "apt-cache", "dpkg-deb", "tar"], &[]);
    assert!(!bin.join("qemu-system-x86_64").exists());
    // The user's own store (the items as hard links: read-only to it) and target dir.
    let store = tmp.path().join("store");
    vm_tests::copy_items(&store, true, |_| true);
    let target = tmp.path().join("target");
    let memo = Path::new("guest-helper/last-build");
    std::fs::create_dir_all(target.join("guest-helper")).unwrap();
    std::fs::copy(store_dir().parent().unwrap().join(memo), target.join(memo)).expect("the guest helper's memo");
    let lock = tmp.path().join("vm.lock");
    std::fs::copy(workspace_root().join("vm.lock"), &lock).unwrap();
    let mut cmd = Command::new(vm_tests::xtask_bin());
    cmd.args(["run-vm", "--timeout", TIMEOUT, "--", "uname", "-r"])
        .env_clear()
        .env("PATH", &bin)
        .env("HOME", tmp.path())
        .env("XTASK_VMSTORE", &store)
        .env("CARGO_TARGET_DIR", &target)
        .env("XTASK_LOCK", &lock);
    // (/proc/self belongs to the effective user.)
    if std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap()) == 0 {
        // nobody (supplementary groups dropped by std): the directories it writes become its own.
        for dir in
            [tmp.path(), &store, &store.join("items"), &store.join("meta"), &target, &target.join("guest-helper")]
        {
            std::os::unix::fs::chown(dir, Some(65534), Some(65534)).unwrap();
        }
        std::os::unix::fs::chown(&lock, Some(65534), Some(65534)).unwrap();
        std::os::unix::process::CommandExt::uid(&mut cmd, 65534);
        std::os::unix::process::CommandExt::gid(&mut cmd, 65534);
    }
    let run = vm_tests::output_within(cmd, 1800);
    run.expect_code(0);
    assert!(run.stdout.trim().ends_with("-amd64"), "{run:#?}");
    assert!(run.stderr.contains("using Debian's `qemu-system-x86` from the store"), "{run:#?}");
}

/// `cargo xtask ARGS` in the workspace with `PATH` = `bin` alone, installing turned off,
/// and the store at `store`.
fn cargo_xtask(bin: &Path, store: &Path, args: &[&str]) -> Run {
    let started = Instant::now();
    let out = Command::new(bin.join("cargo"))
        .arg("xtask")
        .args(args)
        .current_dir(workspace_root())
        .env("PATH", bin)
        .env("XTASK_NO_INSTALL", "1")
        .env("XTASK_VMSTORE", store)
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    eprintln!("cargo xtask {}: {:.1} s", args.join(" "), started.elapsed().as_secs_f64());
    vm_tests::Run::from(out)
}

#[test]
fn a_host_with_only_what_the_readme_lists_builds_and_runs_hello() {
    let tmp = tempfile::tempdir_in(store_dir().parent().unwrap()).unwrap();
    let bin = restricted_path(tmp.path());
    for absent in ["sfdisk", "mke2fs", "e2fsck", "debugfs", "grub-mkimage", "sh", "unshare"] {
        assert!(!bin.join(absent).exists());
    }
    let store = tmp.path().join("store");

    let image = cargo_xtask(&bin, &store, &["vm-image", "--system", "hello"]);
    image.expect_code(0);
    let path = PathBuf::from(image.stdout.lines().last().unwrap_or_default());
    assert!(path.starts_with(&store) && path.is_file(), "{image:#?}");
    assert!(image.stderr.contains("fetching Debian package linux-image-"), "the kernel was not fetched: {image:#?}");
    assert!(image.stderr.contains("fetching Debian package e2fsprogs "), "e2fsprogs was not fetched: {image:#?}");
    assert!(!image.stderr.contains("was not locked"), "vm.lock changed: {image:#?}");

    let args = ["run-vm", "--system", "hello", "--timeout", TIMEOUT, "--", "nc", "127.0.0.1", "7878"];
    let run = cargo_xtask(&bin, &store, &args);
    run.expect_code(0);
    assert_eq!(run.stdout, "hello-service v1: hello from the VM\n", "{run:#?}");

    let args =
        ["build-in-vm", "--name", "bare-host", "--timeout", TIMEOUT, "--", "sh", "-c", "uname -r > $out/release"];
    let built = cargo_xtask(&bin, &store, &args);
    built.expect_code(0);
    let out = PathBuf::from(built.stdout.lines().last().unwrap_or_default());
    assert!(out.starts_with(&store), "{built:#?}");
    let release = std::fs::read_to_string(out.join("release")).unwrap();
    assert!(release.trim_end().ends_with("-amd64"), "{release}");
}
