//! Faults injected for real (killed processes, corrupted items, a full disk, a broken
//! QEMU, hostile guests), each checked for a clear error, the right exit status, and
//! nothing half-written left in the store.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::nonce;
use vm_tests::{
    children_named, process_gone, read_all, send_signal, store_dir, store_entries_named, tmp_entries_containing,
    wait_until, xtask, xtask_bin, xtask_env, Run, TIMEOUT,
};

fn spawn(args: &[&str], envs: &[(&str, &OsStr)]) -> Child {
    let mut cmd = Command::new(xtask_bin());
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

fn finish(child: Child) -> Run {
    let out = child.wait_with_output().unwrap();
    vm_tests::Run::from(out)
}

/// The xchg scratch directories of process `pid` in which the guest has created
/// `out/NAME`.
fn guest_wrote(pid: u32, name: &str) -> bool {
    let prefix = format!("scratch-{pid}-xchg.");
    fs::read_dir(store_dir().join(".tmp"))
        .map(|d| {
            d.flatten().any(|e| {
                // The exchange directory is `xchg/` inside its private scratch.
                e.file_name().to_string_lossy().starts_with(&prefix) && e.path().join("xchg/out").join(name).exists()
            })
        })
        .unwrap_or(false)
}

fn wait_for_qemu(pid: u32) -> u32 {
    let mut qemu = Vec::new();
    assert!(
        wait_until(120, || {
            qemu = children_named(pid, "qemu-system");
            !qemu.is_empty()
        }),
        "xtask {pid} never started QEMU"
    );
    qemu[0]
}

#[test]
fn sigterm_and_sigint_stop_qemu_with_143_and_130() {
    for (signal, code) in [("TERM", 143), ("INT", 130)] {
        let n = nonce();
        let child = spawn(
            &[
                "build-in-vm",
                "--name",
                "sig",
                "--env",
                &format!("N={n}"),
                "--",
                "sh",
                "-c",
                "touch $out/started; sleep 1000",
            ],
            &[],
        );
        let pid = child.id();
        let qemu = wait_for_qemu(pid);
        assert!(wait_until(120, || guest_wrote(pid, "started")), "the guest never started");
        send_signal(pid, signal);
        let run = finish(child);
        assert_eq!(run.code, code, "SIG{signal}: {run:#?}");
        assert!(run.stderr.contains("interrupted"), "{run:#?}");
        assert!(process_gone(qemu), "QEMU {qemu} outlived xtask after SIG{signal}");
        assert!(tmp_entries_containing(&store_dir(), &format!("scratch-{pid}-")).is_empty(), "scratch left behind");
        assert!(tmp_entries_containing(&store_dir(), &format!("-sig.{pid}")).is_empty(), "item temp left behind");
    }
}

#[test]
fn sigkill_to_xtask_mid_vm_build_kills_qemu_and_the_rerun_completes() {
    let n = nonce();
    let args = [
        "build-in-vm",
        "--name",
        "killed",
        "--env",
        &format!("N={n}"),
        "--timeout",
        TIMEOUT,
        "--",
        "sh",
        "-c",
        "touch $out/started; sleep 4; echo done > $out/result",
    ];
    let child = spawn(&args, &[]);
    let pid = child.id();
    let qemu = wait_for_qemu(pid);
    assert!(wait_until(120, || guest_wrote(pid, "started")), "the guest never started");
    send_signal(pid, "KILL");
    let killed = finish(child);
    assert_eq!(killed.code, -1, "xtask was not killed: {killed:#?}");
    assert!(wait_until(10, || process_gone(qemu)), "QEMU {qemu} outlived a SIGKILLed xtask");
    assert!(store_entries_named("killed").iter().all(|e| !e.contains(&n)), "nothing may be stored");

    let run = xtask(&args);
    run.expect_code(0);
    let out = Path::new(run.stdout.trim_end());
    assert_eq!(fs::read_to_string(out.join("result")).unwrap(), "done\n");
    assert!(out.join("started").exists());
    assert!(
        tmp_entries_containing(&store_dir(), &format!("scratch-{pid}-")).is_empty(),
        "the killed run's scratch remains"
    );
    assert!(
        tmp_entries_containing(&store_dir(), &format!("-killed.{pid}")).is_empty(),
        "the killed run's temp remains"
    );
}

/// A private store holding hard links to the shared store's items, to damage freely.
fn private_store_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir_in(store_dir().parent().unwrap()).unwrap();
    vm_tests::copy_items(dir.path(), true, |_| true);
    dir
}

fn make_writable(dir: &Path) {
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn sigkill_during_kernel_fetch_then_rerun_completes() {
    let store = tempfile::tempdir_in(store_dir().parent().unwrap()).unwrap();
    // Everything but the kernel's package (QEMU's, when it comes from the store, among
    // them): the kernel is what is fetched.
    vm_tests::run_vm(&["true"]).expect_code(0);
    vm_tests::copy_items(store.path(), true, |name| !name.contains("-linux-image-"));
    let env = [("XTASK_VMSTORE", store.path().as_os_str())];
    let child = spawn(&["run-vm", "--timeout", TIMEOUT, "--", "true"], &env);
    let pid = child.id();
    let in_progress =
        || tmp_entries_containing(store.path(), "linux-image").iter().any(|n| n.ends_with(&format!(".{pid}")));
    assert!(wait_until(120, in_progress), "never saw the kernel being fetched");
    send_signal(pid, "KILL");
    finish(child);
    std::thread::sleep(Duration::from_millis(500));
    let run = xtask_env(&["run-vm", "--explain", "--timeout", TIMEOUT, "--", "uname", "-r"], &env);
    run.expect_code(0);
    assert!(run.stdout.trim_end().ends_with("-amd64"));
    assert!(tmp_entries_containing(store.path(), &format!(".{pid}")).is_empty(), "the killed fetch's temp remains");
}

#[test]
fn junk_at_an_item_path_is_replaced_not_served() {
    let n = nonce();
    let args = [
        "build-in-vm",
        "--explain",
        "--name",
        "junk",
        "--env",
        &format!("N={n}"),
        "--timeout",
        TIMEOUT,
        "--",
        "sh",
        "-c",
        "echo good > $out/f",
    ];
    let first = xtask(&args);
    first.expect_code(0);
    let item = PathBuf::from(first.stdout.trim_end());
    // Make it look like a directory a killed run left: no .meta, and junk inside.
    let meta = format!("{}.meta", item.file_name().unwrap().to_string_lossy());
    fs::remove_file(store_dir().join("meta").join(meta)).unwrap();
    make_writable(&item);
    fs::write(item.join("junk"), "junk").unwrap();
    let second = xtask(&args);
    second.expect_code(0);
    assert_eq!(second.stdout, first.stdout);
    assert!(second.stderr.contains("removing incomplete store item"), "{second:#?}");
    assert!(second.stderr.contains("vm: booting"), "junk was served as a hit: {second:#?}");
    assert!(!item.join("junk").exists());
    assert_eq!(fs::read_to_string(item.join("f")).unwrap(), "good\n");
}

#[test]
fn two_concurrent_builds_of_one_item_build_it_once() {
    let n = nonce();
    let args = [
        "build-in-vm",
        "--explain",
        "--name",
        "twice",
        "--env",
        &format!("N={n}"),
        "--timeout",
        TIMEOUT,
        "--",
        "sh",
        "-c",
        "echo $N >> $out/f",
    ];
    let a = spawn(&args, &[]);
    let b = spawn(&args, &[]);
    let (a, b) = (finish(a), finish(b));
    a.expect_code(0);
    b.expect_code(0);
    assert_eq!(a.stdout, b.stdout);
    let boots = [&a, &b].iter().filter(|r| r.stderr.contains("vm: booting")).count();
    assert_eq!(boots, 1, "the item was built {boots} times:\n{a:#?}\n{b:#?}");
    assert_eq!(fs::read_to_string(Path::new(a.stdout.trim_end()).join("f")).unwrap(), format!("{n}\n"));
}

#[test]
fn a_waiter_proceeds_when_the_lock_holder_is_killed() {
    let n = nonce();
    let args = [
        "build-in-vm",
        "--explain",
        "--name",
        "holder",
        "--env",
        &format!("N={n}"),
        "--timeout",
        TIMEOUT,
        "--",
        "sh",
        "-c",
        "touch $out/started; sleep 3; echo $N > $out/f",
    ];
    let holder = spawn(&args, &[]);
    let hpid = holder.id();
    assert!(wait_until(120, || guest_wrote(hpid, "started")), "the holder's guest never started");
    let mut waiter = spawn(&args, &[]);
    let mut stderr = waiter.stderr.take().unwrap();
    let reader = std::thread::spawn(move || read_all(&mut stderr));
    std::thread::sleep(Duration::from_millis(1500));
    send_signal(hpid, "KILL");
    finish(holder);
    let out = read_all(waiter.stdout.take().unwrap());
    let status = waiter.wait().unwrap();
    let err = reader.join().unwrap();
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(err.contains("waiting for another process"), "the waiter never waited: {err}");
    assert!(err.contains("vm: booting"), "the waiter did not build: {err}");
    assert_eq!(fs::read_to_string(Path::new(out.trim_end()).join("f")).unwrap(), format!("{n}\n"));
}

#[test]
fn builds_needing_items_in_opposite_orders_do_not_deadlock() {
    let dir = tempfile::tempdir().unwrap();
    let n = nonce();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    fs::write(&a, format!("a{n}")).unwrap();
    fs::write(&b, format!("b{n}")).unwrap();
    let ia = format!("A={}", a.display());
    let ib = format!("B={}", b.display());
    let one = spawn(
        &[
            "build-in-vm",
            "--name",
            "order1",
            "--input",
            &ia,
            "--input",
            &ib,
            "--timeout",
            TIMEOUT,
            "--",
            "sh",
            "-c",
            "cat $A $B > $out/f",
        ],
        &[],
    );
    let two = spawn(
        &[
            "build-in-vm",
            "--name",
            "order2",
            "--input",
            &ib,
            "--input",
            &ia,
            "--timeout",
            TIMEOUT,
            "--",
            "sh",
            "-c",
            "cat $B $A > $out/f",
        ],
        &[],
    );
    let (one, two) = (finish(one), finish(two));
    one.expect_code(0);
    two.expect_code(0);
    assert_eq!(fs::read_to_string(Path::new(one.stdout.trim_end()).join("f")).unwrap(), format!("a{n}b{n}"));
    assert_eq!(fs::read_to_string(Path::new(two.stdout.trim_end()).join("f")).unwrap(), format!("b{n}a{n}"));
}

#[test]
fn a_package_that_does_not_match_its_pin_is_refused() {
    let store = tempfile::tempdir_in(store_dir().parent().unwrap()).unwrap();
    // The workspace's lock file, copied, with one hex digit of busybox's sha256 changed.
    let (lock, sha) = vm_tests::locked_field("busybox-static", "sha256");
    let flipped = format!("{}{}", if sha.starts_with('0') { '1' } else { '0' }, &sha[1..]);
    let lock_file = store.path().join("vm.lock");
    fs::write(&lock_file, lock.replace(&sha, &flipped)).unwrap();
    // The kernel comes from the shared store (hard links), so only busybox is fetched.
    vm_tests::copy_items(store.path(), true, |name| name.contains("linux-image") || name.contains("vmlinux"));
    let env = [("XTASK_VMSTORE", store.path().as_os_str()), ("XTASK_LOCK", lock_file.as_os_str())];
    let run = xtask_env(&["run-vm", "--timeout", TIMEOUT, "--", "true"], &env);
    assert_eq!(run.code, 1, "{run:#?}");
    assert!(run.stderr.contains("sha256 mismatch for Debian package busybox-static"), "{run:#?}");
    assert!(run.stderr.contains(&flipped) && run.stderr.contains(&sha), "both hashes must be named: {run:#?}");
    let stored: Vec<_> = fs::read_dir(store.path().join("items"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("busybox"))
        .collect();
    assert!(stored.is_empty(), "something was stored: {stored:?}");
    assert_eq!(fs::read_dir(store.path().join(".tmp")).unwrap().count(), 0, "temporaries left behind");
}

/// Runs `script` with `sh` as root of a private user and mount namespace (`unshare -rm`:
/// no root needed), where it mounts what it likes; its stdout and stderr.
fn in_private_mounts(script: &str) -> (String, String) {
    let out = Command::new("unshare")
        .args(["-rm", "sh", "-c", script])
        .stdin(Stdio::null())
        .output()
        .expect("running unshare (util-linux)");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "unshare failed: {stderr}");
    (String::from_utf8_lossy(&out.stdout).into_owned(), stderr)
}

#[test]
fn a_full_file_system_is_a_clear_error_with_nothing_left() {
    let store = tempfile::tempdir().unwrap();
    // A 20 MiB tmpfs as the store, in a private mount namespace (no root needed with -r).
    let script = format!(
        "mount -t tmpfs -o size=20m tmpfs '{0}' && XTASK_VMSTORE='{0}' '{1}' run-vm --timeout {2} -- true; \
         code=$?; echo \"exit=$code\"; ls -A '{0}/.tmp'; ls '{0}/items' | grep -v '^$' | sed 's/^/item:/'; exit 0",
        store.path().display(),
        xtask_bin().display(),
        TIMEOUT
    );
    let (stdout, stderr) = in_private_mounts(&script);
    assert!(stdout.contains("exit=1"), "expected a failure: {stdout}\n{stderr}");
    assert!(
        stderr.contains(&format!("no space left on device in `{}", store.path().display())),
        "the full disk is not said, or not where: {stderr}"
    );
    let leftovers: Vec<&str> = stdout.lines().filter(|l| !l.starts_with("exit=") && !l.starts_with("item:")).collect();
    assert!(leftovers.is_empty(), "temporaries left in .tmp: {leftovers:?}");
    assert!(
        !stdout.contains("item:")
            || stdout.lines().filter(|l| l.starts_with("item:")).all(|l| !l.contains("linux-image")),
        "a half-fetched kernel was stored: {stdout}"
    );
}

#[test]
fn a_corrupt_initrd_fails_as_soon_as_qemu_exits() {
    // Make sure everything is built, then damage the initrd in a private copy of the store.
    vm_tests::run_vm(&["true"]).expect_code(0);
    let store = private_store_copy();
    let initrds: Vec<PathBuf> = fs::read_dir(store.path().join("items"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir() && p.to_string_lossy().contains("-initrd-"))
        .collect();
    assert!(!initrds.is_empty());
    for dir in &initrds {
        make_writable(dir);
        fs::remove_file(dir.join("initrd")).unwrap();
        fs::write(dir.join("initrd"), vec![0x5a; 4096]).unwrap();
    }
    let started = std::time::Instant::now();
    // Cold: a snapshot of the VM (made by other tests) holds the initrd as it was.
    let args = ["run-vm", "--cold", "--timeout", "300", "--", "true"];
    let run = xtask_env(&args, &[("XTASK_VMSTORE", store.path().as_os_str())]);
    assert_eq!(run.code, 1, "{run:#?}");
    assert!(run.stderr.contains("without reporting a status"), "{run:#?}");
    assert!(started.elapsed() < Duration::from_secs(200), "waited for the timeout instead of QEMU's exit");
}

#[test]
fn a_broken_kernel_image_is_reported_with_qemus_message() {
    vm_tests::run_vm(&["true"]).expect_code(0);
    let modules = vm_tests::items()
        .into_iter()
        .map(|p| p.join("lib/modules"))
        .find(|p| p.is_dir())
        .and_then(|p| fs::read_dir(p).unwrap().flatten().next().map(|e| e.path()))
        .expect("no kernel in the store");
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("vmlinuz");
    fs::write(&junk, b"this is not a kernel").unwrap();
    let run = xtask(&[
        "run-vm",
        "--timeout",
        "300",
        "--kernel",
        junk.to_str().unwrap(),
        "--modules",
        modules.to_str().unwrap(),
        "--",
        "true",
    ]);
    assert_eq!(run.code, 1, "{run:#?}");
    assert!(run.stderr.contains("QEMU failed"), "{run:#?}");
    assert!(run.stderr.contains("qemu"), "QEMU's own message is missing: {run:#?}");
}

#[test]
fn a_kernel_from_a_host_path_boots() {
    vm_tests::run_vm(&["true"]).expect_code(0);
    let amd64 = |p: &std::path::PathBuf| p.to_string_lossy().contains("-amd64-") && p.join("lib/modules").is_dir();
    let kernel_item = vm_tests::items().into_iter().find(amd64).expect("no amd64 kernel in the store");
    let release = fs::read_dir(kernel_item.join("lib/modules")).unwrap().flatten().next().unwrap().file_name();
    let release = release.to_string_lossy();
    let image = kernel_item.join(format!("boot/vmlinuz-{release}"));
    let modules = kernel_item.join(format!("lib/modules/{release}"));
    let run = xtask(&[
        "run-vm",
        "--timeout",
        TIMEOUT,
        "--kernel",
        image.to_str().unwrap(),
        "--modules",
        modules.to_str().unwrap(),
        "--",
        "uname",
        "-r",
    ]);
    run.expect_code(0);
    assert_eq!(run.stdout.trim_end(), release);
}

fn fake_tool_dir(script: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("qemu-system-x86_64");
    fs::write(&fake, script).unwrap();
    fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

#[test]
fn missing_or_failing_qemu_says_what_to_do() {
    vm_tests::run_vm(&["true"]).expect_code(0);
    let empty = tempfile::tempdir().unwrap();
    let run = xtask_env(
        &["--qemu", "host", "run-vm", "--accel", "tcg", "--", "true"],
        &[("PATH", empty.path().as_os_str()), ("XTASK_NO_INSTALL", OsStr::new("1"))],
    );
    assert_eq!(run.code, 1, "{run:#?}");
    assert!(run.stderr.contains("missing host program(s): qemu-system-x86_64"), "{run:#?}");
    assert!(run.stderr.contains("apt-get install --no-install-recommends qemu-system-x86"), "{run:#?}");

    let fake =
        fake_tool_dir("#!/bin/sh\necho 'qemu-system-x86_64: -machine microvm: unsupported machine type' >&2\nexit 1\n");
    let path = std::env::join_paths([fake.path(), Path::new("/usr/bin"), Path::new("/bin")]).unwrap();
    let run = xtask_env(&["--qemu", "host", "run-vm", "--accel", "tcg", "--", "true"], &[("PATH", path.as_os_str())]);
    assert_eq!(run.code, 1, "{run:#?}");
    assert!(run.stderr.contains("QEMU failed"), "{run:#?}");
    assert!(run.stderr.contains("unsupported machine type"), "QEMU's message is missing: {run:#?}");
    assert!(run.stderr.contains("qemu-system-x86"), "no hint at the package: {run:#?}");
}

#[test]
fn accel_kvm_fails_with_the_reason_where_kvm_cannot_work() {
    let usable = fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok()
        && fs::read_to_string("/proc/cpuinfo").unwrap().split_whitespace().any(|f| f == "vmx" || f == "svm");
    let run = xtask(&["run-vm", "--accel", "kvm", "--timeout", TIMEOUT, "--", "true"]);
    if usable {
        run.expect_code(0);
    } else {
        run.expect_code(1);
        assert!(run.stderr.contains("KVM is not usable here"), "{run:#?}");
        let auto = xtask(&["run-vm", "--timeout", TIMEOUT, "--", "true"]);
        auto.expect_code(0);
        assert_eq!(auto.stderr.matches("using TCG").count(), 1, "auto must say so once: {auto:#?}");
    }
}

#[test]
fn exit_statuses_1_and_22_pass_through() {
    vm_tests::run_vm(&["false"]).expect_code(1);
    vm_tests::run_vm(&["sh", "-c", "exit 22"]).expect_code(22);
}

#[test]
fn the_guest_cannot_write_the_store_even_after_remounting() {
    let marker = format!("written-by-guest-{}", nonce());
    let script = format!("mount -o remount,rw /store; touch /store/{marker} && echo wrote");
    let run = vm_tests::run_vm(&["sh", "-c", &script]);
    assert!(!run.stdout.contains("wrote"), "{run:#?}");
    assert!(!vm_tests::items_dir().join(&marker).exists());
}

#[test]
fn hostile_outputs_are_refused_and_nothing_is_stored() {
    // Links are checked by xtask. Special files are refused by xtask too, but the 9p
    // export already refuses to create them, which the guest's command then reports.
    for (what, script, needles) in [
        (
            "abs-link",
            "ln -s /etc/passwd $out/pw",
            &["`$out/pw` is a symbolic link to `/etc/passwd`, which is absolute"][..],
        ),
        (
            "escape",
            "mkdir $out/d; ln -s ../../x $out/d/up",
            &["`$out/d/up` is a symbolic link to `../../x`, which leads outside"][..],
        ),
        ("fifo", "mkfifo $out/p", &["special file", "mkfifo: /xchg/out/p"][..]),
        ("device", "mknod $out/null c 1 3", &["special file", "mknod: /xchg/out/null"][..]),
    ] {
        let name = format!("hostile-{what}-{}", nonce());
        let run = xtask(&["build-in-vm", "--name", &name, "--timeout", TIMEOUT, "--", "sh", "-c", script]);
        assert_eq!(run.code, 1, "{what}: {run:#?}");
        assert!(needles.iter().any(|n| run.stderr.contains(n)), "{what}: {run:#?}");
        assert!(run.stdout.is_empty(), "{what}: a path was printed");
        assert!(store_entries_named(&name).is_empty(), "{what}: stored anyway");
        assert!(tmp_entries_containing(&store_dir(), &name).is_empty(), "{what}: temp left behind");
    }
}

#[test]
fn qemu_runs_sandboxed_without_defaults_or_network() {
    let run = xtask(&["run-vm", "-v", "--timeout", TIMEOUT, "--", "ls", "/sys/class/net"]);
    run.expect_code(0);
    assert_eq!(run.stdout, "lo\n", "the guest has a network device");
    let cmdline = run
        .stderr
        .lines()
        .find(|l| l.starts_with("+ ") && l.contains("qemu-system-x86_64 "))
        .expect("no QEMU command line");
    assert!(cmdline.contains("-nodefaults"));
    assert!(
        cmdline.contains("-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"),
        "{cmdline}"
    );
    for net in ["-netdev", "-nic", "-net "] {
        assert!(!cmdline.contains(net), "{cmdline}");
    }
}

#[test]
fn a_guest_writing_a_qcow2_header_into_a_raw_disk_stays_raw() {
    let n = nonce();
    let script = "printf 'QFI\\373' | dd of=/dev/vda conv=notrunc 2>/dev/null; echo $N > $out/n";
    let run = xtask(&[
        "build-in-vm",
        "-v",
        "--name",
        "rawdisk",
        "--env",
        &format!("N={n}"),
        "--disk-image",
        "raw",
        "--disk-size",
        "1MiB",
        "--timeout",
        TIMEOUT,
        "--",
        "sh",
        "-c",
        script,
    ]);
    run.expect_code(0);
    let cmdline = run
        .stderr
        .lines()
        .find(|l| l.starts_with("+ ") && l.contains("qemu-system-x86_64 "))
        .expect("no QEMU command line");
    assert!(cmdline.contains("format=raw"), "{cmdline}");
    let disk = fs::read(Path::new(run.stdout.trim_end()).join("disk.raw")).unwrap();
    assert_eq!(disk.len(), 1 << 20, "the raw disk must stay a 1 MiB raw file");
    assert!(disk.starts_with(b"QFI\xfb"));
}

#[test]
fn a_command_killed_by_the_out_of_memory_killer_fails() {
    // The shell holds the whole output of the pipeline in memory: more than the guest has.
    let run = xtask(&[
        "run-vm",
        "--memory",
        "128",
        "--timeout",
        TIMEOUT,
        "--",
        "sh",
        "-c",
        "x=$(head -c 300000000 /dev/zero | tr '\\0' a); echo survived",
    ]);
    assert_ne!(run.code, 0, "{run:#?}");
    assert!(!run.stdout.contains("survived"), "{run:#?}");
    // Either the OOM killer's SIGKILL is reported, or the guest died without a status.
    assert!(run.stderr.contains("signal 9") || run.stderr.contains("without reporting a status"), "{run:#?}");
}

/// Every process descended from `pid`, with its command name.
fn descendants(pid: u32) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    let mut parents = vec![pid];
    while let Some(parent) = parents.pop() {
        for entry in fs::read_dir("/proc").unwrap().flatten() {
            let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
            let stat = fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            // `PID (COMM) STATE PPID ...`: the name may hold spaces, the last `)` ends it.
            let Some((head, rest)) = stat.rsplit_once(") ") else { continue };
            let ppid = rest.split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(parent) {
                let comm = head.split_once(" (").map(|(_, c)| c.to_string()).unwrap_or_default();
                found.push((child, comm));
                parents.push(child);
            }
        }
    }
    found
}

#[test]
fn sigkill_to_xtask_mid_image_build_leaves_no_image_tool_running() {
    let store = private_store_copy();
    let env = [("XTASK_VMSTORE", store.path().as_os_str())];
    // A size no other test asks for: this image is built, not found.
    let size = format!("{}M", 1100 + std::process::id() % 97);
    let child = spawn(&["vm-image", "--system", "hello", "--format", "qcow2", "--size", &size], &env);
    let pid = child.id();
    let mut seen = Vec::new();
    assert!(
        wait_until(600, || {
            seen = descendants(pid);
            seen.iter().any(|(_, comm)| comm == "qemu-img")
        }),
        "xtask {pid} never ran qemu-img convert"
    );
    // Stopped, the tools cannot finish on their own before they are looked at: only
    // dying with xtask (PR_SET_PDEATHSIG's SIGKILL, which a stopped process gets too)
    // ends them.
    for (tool, _) in &seen {
        // (One may have ended since it was seen.)
        let _ = Command::new("kill").args(["-STOP", &tool.to_string()]).status();
    }
    send_signal(pid, "KILL");
    finish(child);
    let left: Vec<&(u32, String)> = seen.iter().filter(|(tool, _)| !wait_until(10, || process_gone(*tool))).collect();
    for (tool, _) in &left {
        let _ = Command::new("kill").args(["-KILL", &tool.to_string()]).status();
    }
    assert!(left.is_empty(), "outlived a SIGKILLed xtask: {left:?}");
}

#[test]
fn a_full_file_system_under_the_debian_index_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let index = dir.path().join("index");
    fs::create_dir(&index).unwrap();
    let lock = dir.path().join("vm.lock");
    fs::copy(vm_tests::workspace_root().join("vm.lock"), &lock).unwrap();
    // A 1 MiB tmpfs as xtask's Debian index (its lists are tens of MB).
    let script = format!(
        "mount -t tmpfs -o size=1m tmpfs '{0}' && XTASK_DEBIAN_INDEX='{0}' XTASK_LOCK='{1}' '{2}' lock --update \
         busybox-static; echo \"exit=$?\"; find '{0}' -name '*Packages*' | sed 's/^/list:/'; exit 0",
        index.display(),
        lock.display(),
        xtask_bin().display(),
    );
    let (stdout, stderr) = in_private_mounts(&script);
    assert!(stdout.contains("exit=1"), "expected a failure: {stdout}\n{stderr}");
    assert!(
        stderr.contains(&format!("no space left on device in `{}", index.display())),
        "the full disk is not said, or not where: {stderr}"
    );
    assert!(!stdout.contains("list:"), "a half-fetched list was left: {stdout}");
    assert_eq!(fs::read(&lock).unwrap(), fs::read(vm_tests::workspace_root().join("vm.lock")).unwrap());
}

/// Runs xtask with `args` on a store of hard links to the shared store's items (but
/// those whose name contains `without`) whose scratch `.tmp` is a tmpfs of `size`, in a
/// private mount namespace: every build and fetch then works in that small file system.
/// Returns xtask's exit status, stderr, and what was left in `.tmp` and `items`.
fn with_small_scratch(size: &str, without: &str, args: &[&str]) -> (i32, String, Vec<String>, Vec<String>) {
    vm_tests::run_vm(&["true"]).expect_code(0);
    let store = tempfile::tempdir_in(store_dir().parent().unwrap()).unwrap();
    vm_tests::copy_items(store.path(), true, |name| !name.contains(without));
    let tmp = store.path().join(".tmp");
    fs::create_dir(&tmp).unwrap();
    let words: Vec<String> = args.iter().map(|a| format!("'{}'", a.replace('\'', "'\\''"))).collect();
    let script = format!(
        "mount -t tmpfs -o size={size} tmpfs '{0}/.tmp' && XTASK_VMSTORE='{0}' '{1}' {2}; echo \"exit=$?\"",
        store.path().display(),
        xtask_bin().display(),
        words.join(" ")
    );
    let (stdout, stderr) = in_private_mounts(&script);
    let code = stdout.lines().find_map(|l| l.strip_prefix("exit=")).and_then(|c| c.parse().ok()).unwrap_or(-1);
    let names = |dir: &Path| -> Vec<String> {
        fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()
    };
    let left = names(&tmp);
    let items = names(&store.path().join("items"));
    (code, stderr, left, items)
}

#[test]
fn a_full_file_system_while_unpacking_is_a_clear_error_with_nothing_left() {
    // The kernel's .deb (70 MB) fits in 100 MiB; unpacked it does not.
    let (code, stderr, left, items) = with_small_scratch("100m", "-linux-image-", &["run-vm", "--", "true"]);
    assert_eq!(code, 1, "expected a failure: {stderr}");
    assert!(stderr.contains("unpacking Debian package linux-image-"), "the fetch did not fit: {stderr}");
    let first = stderr.lines().find(|l| l.starts_with("error: ")).unwrap_or_default();
    assert!(first.contains("no space left on device in `"), "the full disk is not said first: {stderr}");
    assert!(first.contains("/.tmp/"), "the full directory is not named: {stderr}");
    assert_eq!(first.matches("no space left on device in").count(), 1, "said more than once: {stderr}");
    assert!(left.is_empty(), "temporaries left in .tmp: {left:?}");
    assert!(!items.iter().any(|i| i.contains("-linux-image-")), "a half-unpacked kernel was stored: {items:?}");
}

#[test]
fn a_full_file_system_while_ingesting_a_guests_output_is_a_clear_error_with_nothing_left() {
    // 60 MiB of output fits in the exchange directory; its copy into the item does not.
    let script = "head -c 62914560 /dev/zero > $out/big";
    let name = format!("full-{}", nonce());
    let args = ["build-in-vm", "--timeout", TIMEOUT, "--name", &name, "--", "sh", "-c", script];
    let (code, stderr, left, items) = with_small_scratch("100m", "\0", &args);
    assert_eq!(code, 1, "expected a failure: {stderr}");
    let first = stderr.lines().find(|l| l.starts_with("error: ")).unwrap_or_default();
    assert!(first.contains("no space left on device in `"), "the full disk is not said first: {stderr}");
    assert!(first.contains("/.tmp"), "the full directory is not named: {stderr}");
    assert!(left.is_empty(), "temporaries left in .tmp: {left:?}");
    assert!(!items.iter().any(|i| i.ends_with(&name)), "a half-ingested output was stored: {items:?}");
}
