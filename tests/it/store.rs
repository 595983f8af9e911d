//! `store verify`: damage found in a copy of real store items, and repaired.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use vm_tests::{store_dir, xtask_env};

#[test]
fn verify_reports_a_flipped_byte_a_deleted_file_and_a_stray_file_and_repair_rebuilds() {
    vm_tests::run_vm(&["true"]).expect_code(0);
    // A private store with real copies (not links) of the busybox items (their pins are
    // in the workspace's vm.lock).
    let store = tempfile::tempdir_in(store_dir().parent().unwrap()).unwrap();
    vm_tests::copy_items(store.path(), false, |name| name.contains("-busybox"));
    let env = [("XTASK_VMSTORE", store.path().as_os_str())];
    let clean = xtask_env(&["store", "verify"], &env);
    clean.expect_code(0);
    assert!(clean.stdout.contains("store verified"), "{clean:#?}");

    let item = |suffix: &str| {
        fs::read_dir(store.path().join("items"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                // (Not the package's small `...-alternatives` item.)
                p.is_dir() && name.contains(suffix) && !name.ends_with("-alternatives")
            })
            .unwrap()
    };
    let busybox = item("-busybox-1");
    let deb = item("-busybox-static-");
    let writable = |p: &std::path::Path, mode: u32| fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
    // Flip one byte of the busybox binary.
    let bin = busybox.join("bin/busybox");
    let mut bytes = fs::read(&bin).unwrap();
    bytes[1000] ^= 0x01;
    writable(&bin, 0o755);
    fs::write(&bin, &bytes).unwrap();
    writable(&bin, 0o555);
    // Delete a file from the unpacked package, and add a stray one.
    let usr = deb.join("usr");
    writable(&deb, 0o755);
    fs::write(deb.join("stray"), "x").unwrap();
    writable(&deb, 0o555);
    let copyright = fs::read_dir(usr.join("share/doc")).unwrap().flatten().next().unwrap().path();
    let doc_file = fs::read_dir(&copyright).unwrap().flatten().next().unwrap().path();
    writable(&copyright, 0o755);
    fs::remove_file(&doc_file).unwrap();
    writable(&copyright, 0o555);

    let damaged = xtask_env(&["store", "verify"], &env);
    damaged.expect_code(1);
    for dir in [&busybox, &deb] {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        assert!(damaged.stdout.contains(&format!("{name}: content changed")), "{name} not reported: {damaged:#?}");
    }

    let repaired = xtask_env(&["store", "verify", "--repair"], &env);
    repaired.expect_code(0);
    assert!(repaired.stdout.contains("removed and rebuilt"), "{repaired:#?}");
    assert_eq!(fs::read(busybox.join("bin/busybox")).unwrap().len(), bytes.len());
    assert_ne!(fs::read(busybox.join("bin/busybox")).unwrap(), bytes, "the flipped byte survived");
    assert!(!deb.join("stray").exists());
    xtask_env(&["store", "verify"], &env).expect_code(0);
}

/// The exchange directory holding `started-MARKER`, once a guest made it.
fn exchange_with(marker: &str) -> Option<std::path::PathBuf> {
    let tmp = store_dir().join(".tmp");
    fs::read_dir(&tmp)
        .ok()?
        .flatten()
        .map(|e| e.path().join("xchg"))
        .find(|x| x.join(format!("started-{marker}")).exists())
}

/// A store shared with a run in another PID namespace (a container), where this run's
/// PID means nothing: opening the store there, which removes dead runs' scratch, leaves
/// this live run's exchange directory alone (its lock is held).
#[test]
fn a_run_keeps_its_scratch_while_the_store_is_opened_in_another_pid_namespace() {
    let marker = crate::nonce();
    let script = "touch /xchg/started-$1; i=0; while [ ! -e /xchg/go-$1 ]; do \
                  i=$((i + 1)); if [ $i -gt 120 ]; then exit 3; fi; sleep 1; done; echo went";
    let vm = std::process::Command::new(vm_tests::xtask_bin())
        .args(["run-vm", "--timeout", vm_tests::TIMEOUT, "--", "sh", "-c", script, "sh", &marker])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    assert!(vm_tests::wait_until(300, || exchange_with(&marker).is_some()), "the guest never started");
    let xchg = exchange_with(&marker).unwrap();
    // The store opened from a new PID namespace (xtask is PID 1 there).
    let other = std::process::Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc"])
        .arg(vm_tests::xtask_bin())
        .args(["run-vm", "--script"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(other.status.success(), "{}", String::from_utf8_lossy(&other.stderr));
    let go = fs::write(xchg.join(format!("go-{marker}")), "");
    let out = vm.wait_with_output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(go.is_ok(), "the live run's exchange directory was removed ({go:?}); the run: {stderr}");
    assert_eq!((out.status.code(), &*stdout), (Some(0), "went\n"), "{stderr}");
}
