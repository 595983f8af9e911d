//! What a host needs, as the README says it: `cargo xtask` run with `PATH` holding only
//! the Rust toolchain (cargo, rustc and the C compiler driver `cc` it links with), apt
//! (apt-get, apt-cache), dpkg-deb with the tar it runs, and QEMU (qemu-system-x86_64,
//! qemu-img), and with installing turned off, builds an image of `hello` and runs a
//! command in it, from an empty store: Debian's packages fetched as `vm.lock` pins them,
//! the image written with the tools from the store. (rustup's `cargo` proxy puts its own
//! directory, `~/.cargo/bin`, which holds only the toolchain's programs, first on the
//! `PATH` it passes on.)

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use vm_tests::{store_dir, workspace_root, Run, TIMEOUT};

/// The host programs the README lists, found on this machine's `PATH`.
pub const HOST_PROGRAMS: &[&str] =
    &["cargo", "rustc", "cc", "apt-get", "apt-cache", "dpkg-deb", "tar", "qemu-system-x86_64", "qemu-img"];

/// A directory of links to [`HOST_PROGRAMS`] and nothing else; fails naming a missing one.
fn restricted_path(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let path = std::env::var_os("PATH").unwrap_or_default();
    for program in HOST_PROGRAMS {
        let found = std::env::split_paths(&path)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
            .unwrap_or_else(|| panic!("`{program}`, which the README says a host needs, is not on PATH"));
        std::os::unix::fs::symlink(&found, bin.join(program)).unwrap();
    }
    bin
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
}
