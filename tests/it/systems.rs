//! Systems declared in `vms/` (and the tests' fixtures): a service built from this workspace answering a
//! command, the inner loop (edit the service, run again: only small items rebuilt),
//! `run-vm.sh` without cargo, users and host name, a host program with its libraries,
//! and validation errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::nonce;
use vm_tests::{run_vm_on, store_dir, workspace_root, xtask, Run, TIMEOUT};

/// The query the tests send to the `hello` system's service (busybox's nc).
const ASK_HELLO: &str = "nc 127.0.0.1 7878 </dev/null";

/// The tests' xtask lists this repository's systems and the test fixtures; the
/// repository's own `cargo xtask systems` lists only what a user would boot.
#[test]
fn systems_are_listed_one_line_each_and_fixtures_only_by_the_tests() {
    let run = xtask(&["systems"]);
    run.expect_code(0);
    for name in ["minimal", "hello", "host-findmnt", "boot-check", "invalid-no-root"] {
        let line = run.stdout.lines().find(|l| l.split_whitespace().next() == Some(name));
        let line = line.unwrap_or_else(|| panic!("`{name}` not listed: {}", run.stdout));
        assert!(line.len() > name.len() + 10, "no description for {name}: {line:?}");
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let out = Command::new(cargo).args(["xtask", "systems"]).current_dir(workspace_root()).output().unwrap();
    let own = vm_tests::Run::from(out);
    own.expect_code(0);
    let names: Vec<&str> = own.stdout.lines().filter_map(|l| l.split_whitespace().next()).collect();
    assert!(names.starts_with(&["minimal", "debian-base", "hello"]), "{own:#?}");
    for fixture in ["invalid-no-root", "boot-check", "host-findmnt", "fs-order", "data-disk", "debian-jq-strace"] {
        assert!(!names.contains(&fixture), "`cargo xtask systems` lists the test fixture `{fixture}`: {own:#?}");
    }
    assert!(!own.stdout.contains("(for tests)"), "{own:#?}");
}

#[test]
fn workspace_service_answers_a_command() {
    let run = run_vm_on("hello", &["sh", "-c", ASK_HELLO]);
    run.expect_code(0);
    assert_eq!(run.stdout, "hello-service v1: hello from the VM\n");
}

#[test]
fn users_groups_homes_and_hostname_are_as_declared() {
    let script = "hostname; cat /etc/hostname; id alice; id hello; \
                  stat -c '%n %U:%G %a' /home/alice /var/lib/hello /root; \
                  ps -o user,args | grep '[h]ello-service' | sed 's/ .*//'; \
                  mount | grep -c ' /var/cache/hello type tmpfs'";
    let run = run_vm_on("hello", &["sh", "-c", script]);
    run.expect_code(0);
    let expected = "hello-vm\nhello-vm\n\
        uid=1000(alice) gid=100(users) groups=100(users),900(hello)\n\
        uid=900(hello) gid=900(hello) groups=900(hello)\n\
        /home/alice alice:users 700\n/var/lib/hello hello:hello 700\n/root root:root 700\n\
        hello\n1\n";
    assert_eq!(run.stdout, expected, "{run:#?}");
}

#[test]
fn file_systems_needed_for_boot_are_mounted_before_services_and_the_others_after() {
    // The service saw /early mounted and /late not; the command sees both.
    let run = run_vm_on("fs-order", &["sh", "-c", "cat /run/probe; grep -c ' /late ' /proc/mounts"]);
    run.expect_code(0);
    assert_eq!(run.stdout, "1\n0\n1\n", "{run:#?}");
}

#[test]
fn host_program_runs_with_its_shared_libraries() {
    let script = "findmnt --version; findmnt -n -o FSTYPE /store; findmnt -n -o OPTIONS /store | cut -d, -f1; \
                  ls /lib/x86_64-linux-gnu";
    let run = run_vm_on("host-findmnt", &["sh", "-c", script]);
    run.expect_code(0);
    assert!(run.stdout.starts_with("findmnt from util-linux"), "{run:#?}");
    let mount: Vec<&str> = run.stdout.lines().skip(1).take(2).collect();
    assert_eq!(mount, ["9p", "ro"], "findmnt does not see the read-only store share: {run:#?}");
    for lib in ["libc.so.6", "libmount.so.1", "libsmartcols.so.1", "libselinux.so.1"] {
        assert!(run.stdout.lines().any(|l| l == lib), "{lib} not linked in the guest: {run:#?}");
    }
}

#[test]
fn run_vm_sh_runs_without_cargo() {
    let made = xtask(&["run-vm", "--system", "hello", "--script"]);
    made.expect_code(0);
    let script = PathBuf::from(made.stdout.trim_end());
    assert!(script.starts_with(store_dir()) && made.stdout.ends_with("-run-vm-hello.sh\n"), "{made:#?}");
    // Same inputs, same item.
    assert_eq!(xtask(&["run-vm", "--system", "hello", "--script"]).stdout, made.stdout);
    // The shared-store image is attached by its absolute path, read-only.
    let text = std::fs::read_to_string(&script).unwrap();
    let image = text
        .split_whitespace()
        .find(|w| w.contains("-shared-store-image-hello/disk.raw"))
        .unwrap_or_else(|| panic!("no shared-store image in the script: {text}"));
    assert!(image.contains(&format!("file={}/", store_dir().display())), "{image}");
    assert!(image.contains("format=raw") && image.ends_with(",readonly=on"), "{image}");
    // No cargo, no xtask, no environment to speak of: only the script.
    let out = Command::new("timeout")
        .arg(TIMEOUT)
        .arg(&script)
        .args([
            "--",
            "sh",
            "-c",
            &format!("{ASK_HELLO}; grep -c '^/dev/vda1 ' /proc/mounts; echo to-stderr >&2; exit 5"),
        ])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .current_dir("/")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "stdout: {stdout}\nstderr: {stderr}");
    assert_eq!(stdout, "hello-service v1: hello from the VM\n1\n", "stderr: {stderr}");
    assert_eq!(stderr, "to-stderr\n");
}

/// Every command that boots or builds a system checks it first: run-vm, build-in-vm,
/// vm-image and test.
#[test]
fn no_root_file_system_is_refused_before_building() {
    let name = format!("invalid-{}", crate::nonce());
    for args in [
        vec!["run-vm", "--system", "invalid-no-root", "--explain", "--", "true"],
        vec!["build-in-vm", "--system", "invalid-no-root", "--explain", "--name", &name, "--", "true"],
        vec!["vm-image", "--system", "invalid-no-root", "--explain"],
        vec!["test", "--system", "invalid-no-root", "--explain", "-p", "vm-checks", "--test", "in_vm"],
    ] {
        let run = xtask(&args);
        run.expect_code(2);
        assert!(
            run.stderr
                .contains("system `invalid-no-root`, field `file_systems`: no file system is mounted on `/`; fix: "),
            "{args:?}: {run:#?}"
        );
        assert!(run.stderr.contains("nothing was built") && !run.stderr.contains("store: build"), "{args:?}: {run:#?}");
    }
    assert!(vm_tests::store_entries_named(&name).is_empty());
}

#[test]
fn vm_image_refuses_a_system_that_cannot_work_before_building() {
    let run = xtask(&["vm-image", "--system", "invalid-no-root", "--explain"]);
    run.expect_code(2);
    assert!(run.stderr.contains("system `invalid-no-root`, field `file_systems`: no file system is mounted on `/`"));
    assert!(!run.stderr.contains("store: build") && run.stdout.is_empty(), "{run:#?}");
}

#[test]
fn module_not_in_the_kernel_is_refused_before_building() {
    let run = xtask(&["run-vm", "--system", "invalid-module", "--explain", "--", "true"]);
    run.expect_code(2);
    assert!(run.stderr.contains("system `invalid-module`, field `initrd_modules[0]`: kernel module `no_such_module`"));
    assert!(run.stderr.contains("fix: remove it, or choose a `kernel` that has it"), "{run:#?}");
    assert!(!run.stderr.contains("store: build"), "something was built: {run:#?}");
}

/// A copy of the workspace without its build outputs, as a developer's checkout.
fn copy_workspace(dest: &Path) {
    std::fs::create_dir_all(dest).unwrap();
    for entry in std::fs::read_dir(workspace_root()).unwrap().flatten() {
        let name = entry.file_name();
        if name == "target" || name == ".git" {
            continue;
        }
        let status = Command::new("cp").arg("-a").arg(entry.path()).arg(dest).status().unwrap();
        assert!(status.success(), "cp -a {}", entry.path().display());
    }
}

/// `cargo xtask ARGS` in `dir`, with its own target directory (kept between test runs so
/// the copy's xtask compiles once) and the store the other tests use.
fn cargo_xtask_in(dir: &Path, args: &[&str]) -> Run {
    let target = store_dir().parent().unwrap().join("systems-inner-loop");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let out = Command::new(cargo)
        .arg("xtask")
        .args(args)
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", &target)
        .env("XTASK_VMSTORE", store_dir())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    vm_tests::Run::from(out)
}

/// Names of the items `--explain` says were built.
fn built(run: &Run) -> Vec<String> {
    let mut names: Vec<String> = run
        .stderr
        .lines()
        .filter_map(|l| l.strip_prefix("store: built "))
        .map(|f| f.split_once('-').map(|(_, name)| name.to_string()).unwrap_or_default())
        .collect();
    names.sort();
    names
}

#[test]
fn edited_service_shows_new_behaviour_and_only_small_items_are_rebuilt() {
    let tmp = tempfile::tempdir().unwrap();
    let ws = tmp.path().join("ws");
    copy_workspace(&ws);
    // `cp -a` keeps the sources' times, and the copy's target directory is kept between
    // test runs (so dependencies compile once): without new times, cargo would take the
    // builds of an earlier run's copy for fresh (it compares times, and the copy's path
    // does not count), including an xtask that names that copy as its workspace.
    let status = Command::new("find").arg(&ws).args(["-type", "f", "-exec", "touch", "{}", "+"]).status().unwrap();
    assert!(status.success());
    // The answer, then where the root comes from: the shared-store image's partition,
    // read-only under the overlay.
    let ask = format!(
        "{ASK_HELLO}; grep -c '^overlay / overlay ' /proc/mounts; \
         grep '^/dev/vda1 ' /proc/mounts | cut -d' ' -f1,3,4 | cut -d, -f1"
    );
    let args = ["run-vm", "--system", "hello", "--explain", "--timeout", TIMEOUT, "--", "sh", "-c", &ask];
    let root = "1\n/dev/vda1 ext4 ro\n";

    // As a developer would: run once (this compiles the copy's xtask), edit, run again.
    let before = cargo_xtask_in(&ws, &args);
    before.expect_code(0);
    assert_eq!(before.stdout, format!("hello-service v1: hello from the VM\n{root}"), "{before:#?}");

    let version = format!("v2-{}", nonce());
    let main_rs = ws.join("examples/hello-service/src/main.rs");
    let source = std::fs::read_to_string(&main_rs).unwrap();
    assert!(source.contains("const VERSION: &str = \"v1\";"));
    std::fs::write(
        &main_rs,
        source.replace("const VERSION: &str = \"v1\";", &format!("const VERSION: &str = \"{version}\";")),
    )
    .unwrap();
    let started = Instant::now();
    let after = cargo_xtask_in(&ws, &args);
    let elapsed = started.elapsed();
    after.expect_code(0);
    assert_eq!(after.stdout, format!("hello-service {version}: hello from the VM\n{root}"), "{after:#?}");
    // The changed package and the system item that refers to it; the kernel, the
    // initrd (the boot image) and the shared-store image are hits.
    assert_eq!(built(&after), ["hello-service-hello-service", "system-hello"], "{after:#?}");
    // With why: the binary's content, and the system item's reference to it.
    let why = |name: &str| {
        after.stderr.lines().find(|l| l.starts_with("store: building ") && l.contains(name)).unwrap_or("").to_string()
    };
    assert!(why("-hello-service-hello-service (was ").contains("changed input `binary` (new content)"), "{after:#?}");
    assert!(why("-system-hello (was ").contains("input `ref` (hello-service-hello-service)"), "{after:#?}");
    for big in ["-initrd-", "-linux-image-", "-shared-store-image-hello"] {
        assert!(
            after.stderr.lines().any(|l| l.starts_with("store: hit ") && l.contains(big)),
            "`{big}` item is not a hit: {after:#?}"
        );
    }
    eprintln!("inner loop (edit -> result): {:.1}s", elapsed.as_secs_f64());

    // The crate builds while the VM boots: a compile error stops the VM and is the
    // error, with cargo's message, and the command never runs.
    std::fs::write(&main_rs, format!("{source}\nfn broken() -> u32 {{ \"not a number\" }}\n")).unwrap();
    let failed = cargo_xtask_in(&ws, &args);
    assert_ne!(failed.code, 0, "{failed:#?}");
    assert_eq!(failed.stdout, "", "{failed:#?}");
    assert!(failed.stderr.contains("mismatched types"), "cargo's error is shown: {failed:#?}");
    assert!(failed.stderr.contains("building package `hello-service` of system `hello`"), "{failed:#?}");
}
