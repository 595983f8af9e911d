//! A command in the VM starts and runs as on a freshly installed Debian machine: a clean
//! process state (no signal blocked or ignored, a session and process group of its own,
//! descriptors 0-2 only) whichever way it is run, and a normal Linux around it (devpts,
//! `/dev/shm`, `/dev/fd`, `/tmp` and `/var/tmp`, `nobody`, the loopback, `/etc/hosts`).

use std::process::Command;

use crate::nonce;
use vm_tests::{output_within, workspace_root, xtask, TIMEOUT};

/// Prints a command's process state: the signal masks its child inherits (grep's), whether
/// it leads its own session and process group, and a child's open descriptors (`ls`'s,
/// 3 being the directory it reads).
pub const PROCESS_STATE: &str = "grep -E '^Sig(Blk|Ign):' /proc/self/status
read -r pid comm state ppid pgrp sid rest </proc/self/stat
if [ \"$pid\" = \"$pgrp\" ] && [ \"$pid\" = \"$sid\" ]; then echo 'leads its session and group'; \
else echo \"pid $pid, group $pgrp, session $sid\"; fi
echo descriptors $(ls /proc/self/fd)";

/// What [`PROCESS_STATE`] prints on a host, for a command started from a shell.
pub const CLEAN: &str = "SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n\
leads its session and group\ndescriptors 0 1 2 3\n";

/// Prints `missing:` and what the machine lacks of a normal Linux, with busybox's tools.
pub const NORMAL_LINUX: &str = "m=
check() { \"$@\" >/dev/null 2>&1 || m=\"$m [$*]\"; }
check grep -q ' /dev/pts devpts ' /proc/mounts
check sh -c 'exec 3<>/dev/ptmx && test -c /dev/pts/0'
check grep -q ' /dev/shm tmpfs ' /proc/mounts
check test -k /tmp -a -w /tmp
check test -k /var/tmp -a -w /var/tmp
check test \"$(readlink /dev/fd)\" = /proc/self/fd
check test -e /dev/stdin -a -e /dev/stdout -a -e /dev/stderr
check grep -q '^nobody:x:65534:65534:' /etc/passwd
check grep -q '^nogroup:x:65534:' /etc/group
check grep -q '^127.0.0.1[[:space:]]*localhost' /etc/hosts
check grep -q '^hosts:' /etc/nsswitch.conf
check ip route get 127.0.0.1
echo \"missing:$m\"";

#[test]
fn run_vm_commands_start_clean_warm_and_cold() {
    for (system, warmth) in [("minimal", "--warm"), ("minimal", "--cold"), ("hello", "--warm")] {
        let run = xtask(&["run-vm", "--system", system, warmth, "--timeout", TIMEOUT, "--", "sh", "-c", PROCESS_STATE]);
        run.expect_code(0);
        assert_eq!(run.stdout, CLEAN, "{system} {warmth}: {run:#?}");
    }
    // A service too (setsid was there before): nothing blocked.
    let service = "p=$(pidof hello-service); grep '^SigBlk:' /proc/$p/status
read -r pid comm state ppid pgrp sid rest </proc/$p/stat; [ \"$pid\" = \"$sid\" ] && echo 'leads its session'";
    let run = xtask(&["run-vm", "--system", "hello", "--timeout", TIMEOUT, "--", "sh", "-c", service]);
    run.expect_code(0);
    assert_eq!(run.stdout, "SigBlk:\t0000000000000000\nleads its session\n", "{run:#?}");
}

/// A build step, on a VM without a system item.
#[test]
fn a_build_step_starts_clean_in_a_normal_linux() {
    let env = format!("NONCE={}", nonce());
    let args = ["build-in-vm", "--timeout", TIMEOUT, "--name", "process-state", "--env", &env, "--"];
    let script = format!("{PROCESS_STATE}\n{NORMAL_LINUX}");
    let run = xtask(&[&args[..], &["sh", "-c", &script]].concat());
    run.expect_code(0);
    assert!(run.stderr.contains(&format!("{CLEAN}missing:\n")), "the build step's output (on stderr): {run:#?}");
}

/// The minimal system over the shares (no root image), and `hello` with its root image
/// and services.
#[test]
fn every_system_is_a_normal_linux() {
    for system in ["minimal", "hello"] {
        let run = xtask(&["run-vm", "--system", system, "--timeout", TIMEOUT, "--", "sh", "-c", NORMAL_LINUX]);
        run.expect_code(0);
        assert_eq!(run.stdout, "missing:\n", "{system}: {run:#?}");
    }
}

/// `vm-checks`' process-state and Linux checks, through `cargo xtask test` and through
/// cargo's runner.
#[test]
fn tests_start_clean_in_a_normal_linux() {
    let tests = ["--test", "normal_linux", "--test", "clean_process", "--", "--ignored"];
    let mut args = vec!["test", "--system", "hello", "--timeout", TIMEOUT, "-p", "vm-checks"];
    args.extend(tests);
    let run = xtask(&args);
    run.expect_code(0);
    assert!(run.stdout.contains("test result: ok. 1 passed; 0 failed"), "{run:#?}");
    assert!(run.stdout.contains("test result: ok. 4 passed; 0 failed"), "{run:#?}");
    // In cargo's order (by name), whatever the order asked, each said once.
    let running: Vec<&str> = run.stderr.lines().filter(|l| l.starts_with("     Running ")).collect();
    assert_eq!(running.len(), 2, "{run:#?}");
    assert!(
        running[0].starts_with("     Running tests/clean_process.rs (target/debug/deps/clean_process-"),
        "{run:#?}"
    );
    assert!(running[1].starts_with("     Running tests/normal_linux.rs (target/debug/deps/normal_linux-"), "{run:#?}");

    let runner = vm_tests::runner_config("hello", TIMEOUT);
    let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cargo.current_dir(workspace_root()).args(["test", "-p", "vm-checks", "--config", &runner]).args(tests);
    let run = output_within(cargo, 900);
    run.expect_code(0);
    // Cargo says `Running`; the runner does not say it again.
    assert_eq!(run.stderr.matches("     Running ").count(), 2, "{run:#?}");
    assert!(run.stdout.contains("test result: ok. 1 passed; 0 failed"), "{run:#?}");
    assert!(run.stdout.contains("test result: ok. 4 passed; 0 failed"), "{run:#?}");
}
