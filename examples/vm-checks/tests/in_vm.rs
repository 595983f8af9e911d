//! What only the `hello` VM has. Ignored by a plain `cargo test` on the host; with
//! `--ignored` there, each fails at once saying how to run it.

use std::path::Path;
use std::process::Command;

use vm_checks::{ask_hello_service, require_hello_vm};

#[test]
#[ignore = "needs the hello VM"]
fn the_system_is_the_one_declared() {
    require_hello_vm();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let debian_arch = if cfg!(target_arch = "aarch64") { "-arm64" } else { "-amd64" };
    assert!(release.trim().ends_with(debian_arch), "not Debian's kernel for this architecture: {release}");
    // The shared-store image's root is an ext4 file system under an overlay: both
    // modules are loaded in this kernel.
    let modules = std::fs::read_to_string("/proc/modules").unwrap();
    for module in ["ext4", "overlay"] {
        assert!(modules.lines().any(|l| l.starts_with(&format!("{module} "))), "{module} is not loaded");
    }
}

#[test]
#[ignore = "needs the hello VM"]
fn root_mounts_a_file_system() {
    require_hello_vm();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("mnt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("CARGO_TARGET_TMPDIR is writable");
    let status = Command::new("mount").args(["-t", "tmpfs", "-o", "size=1m", "vm-checks"]).arg(&dir).status();
    assert!(status.is_ok_and(|s| s.success()), "mounting a tmpfs as root failed");
    std::fs::write(dir.join("f"), "x").unwrap();
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(mounts.lines().any(|l| l.starts_with("vm-checks ") && l.contains(" tmpfs ")), "{mounts}");
    assert!(Command::new("umount").arg(&dir).status().unwrap().success());
}

#[test]
#[ignore = "needs the hello VM"]
fn the_workspace_is_there_read_only() {
    require_hello_vm();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixture.txt");
    assert_eq!(std::fs::read_to_string(&fixture).unwrap(), "a fixture of vm-checks\n");
    assert!(std::fs::write(fixture.with_extension("new"), "x").is_err(), "the workspace is writable");
}

#[test]
#[ignore = "needs the hello VM"]
fn the_hello_service_answers() {
    require_hello_vm();
    let answer = ask_hello_service().unwrap();
    assert!(answer.starts_with("hello-service "), "{answer:?}");
}
