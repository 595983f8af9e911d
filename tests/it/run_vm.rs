//! `run-vm`: output, exit statuses, interactive shell, and guests that crash or hang.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vm_tests::{run_vm, xtask, xtask_bin};

#[test]
fn prints_the_guest_kernel_release_and_nothing_else() {
    let run = run_vm(&["uname", "-r"]);
    run.expect_code(0);
    let release = run.stdout.trim_end();
    assert!(
        release.starts_with(|c: char| c.is_ascii_digit()) && release.ends_with("-amd64"),
        "stdout is not a Debian kernel release: {:?}",
        run.stdout
    );
    assert_eq!(run.stdout.lines().count(), 1, "stdout has more than the command's output: {:?}", run.stdout);
    // The host's kernel is not the guest's: the guest's modules tree names the same release.
    let modules = vm_tests::items_dir();
    let found =
        std::fs::read_dir(&modules).unwrap().flatten().any(|e| e.path().join("lib/modules").join(release).is_dir());
    assert!(found, "no kernel item in the store has modules for release {release}");
}

#[test]
fn stdout_and_stderr_stay_apart_without_kernel_messages() {
    let run = run_vm(&["sh", "-c", "echo to-stdout; echo to-stderr >&2"]);
    run.expect_code(0);
    assert_eq!(run.stdout, "to-stdout\n");
    assert!(run.stderr.contains("to-stderr\n"), "stderr: {:?}", run.stderr);
    for noise in ["guest[", "reboot:", "] "] {
        assert!(!run.stderr.contains(noise), "console noise {noise:?} in stderr: {:?}", run.stderr);
        assert!(!run.stdout.contains(noise), "console noise {noise:?} in stdout: {:?}", run.stdout);
    }
}

#[test]
fn exit_status_is_the_commands() {
    run_vm(&["sh", "-c", "exit 7"]).expect_code(7);
    run_vm(&["true"]).expect_code(0);
}

#[test]
fn signal_death_is_a_failure() {
    let run = run_vm(&["sh", "-c", "kill -9 $$"]);
    run.expect_code(128 + 9);
    assert!(run.stderr.contains("signal 9"), "stderr: {:?}", run.stderr);
}

#[test]
fn environment_and_busybox_userland() {
    let run = run_vm(&[
        "sh",
        "-c",
        "echo $PATH; hostname; ls /store >/dev/null && echo store-ok; touch /store/x 2>/dev/null || echo store-ro",
    ]);
    run.expect_code(0);
    assert_eq!(run.stdout, "/bin\nminimal\nstore-ok\nstore-ro\n");
}

#[test]
fn missing_program_fails_clearly() {
    let run = run_vm(&["no-such-program"]);
    assert_ne!(run.code, 0);
    assert!(run.stderr.contains("no-such-program"), "stderr: {:?}", run.stderr);
}

#[test]
fn kernel_panic_is_an_error_not_a_hang() {
    let started = Instant::now();
    let run = xtask(&["run-vm", "--timeout", "300", "--", "sh", "-c", "echo c > /proc/sysrq-trigger; sleep 1000"]);
    assert_eq!(run.code, 1, "{run:#?}");
    assert!(run.stderr.contains("without reporting a status"), "stderr: {:?}", run.stderr);
    assert!(run.stderr.contains("last console lines"), "no console tail: {:?}", run.stderr);
    let log = run.stderr.split("(full log: ").nth(1).and_then(|s| s.split("):").next()).expect("no log path");
    let log_text = std::fs::read_to_string(log).expect("the console log is kept after a failure");
    assert!(log_text.contains("Kernel panic"), "the console log lacks the panic: {log_text}");
    // Far below the 300 s timeout: the error came from the guest ending, not from waiting.
    assert!(started.elapsed() < Duration::from_secs(250));
}

#[test]
fn a_hanging_guest_is_killed_at_the_timeout() {
    let run = xtask(&["run-vm", "--timeout", "8", "--", "sleep", "1000"]);
    run.expect_code(124);
    assert!(run.stderr.contains("timeout"), "stderr: {:?}", run.stderr);
}

#[test]
fn unknown_system_is_a_usage_error() {
    let run = xtask(&["run-vm", "--system", "no-such-system", "--", "true"]);
    run.expect_code(2);
    assert!(run.stderr.contains("unknown system `no-such-system`"), "stderr: {:?}", run.stderr);
    assert!(run.stderr.contains("minimal"), "known systems not listed: {:?}", run.stderr);
}

/// Types into the serial console like a person: waits for the prompt (`~` is root's home
/// from the system's /etc/passwd), runs a command,
/// then `poweroff`.
#[test]
fn interactive_shell_on_the_console() {
    let mut child = Command::new(xtask_bin())
        .args(["run-vm", "--timeout", "300"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let steps = [("[minimal:~]# ", "echo answer-$((6*7))\n"), ("answer-42", "poweroff\n")];
    let talk = vm_tests::converse(&mut child, &steps, Duration::from_secs(300));
    let _ = child.kill();
    let status = child.wait().unwrap();
    assert_eq!(talk.steps, 2, "the shell never answered; console: {}", talk.console);
    assert_eq!(talk.status.and_then(|s| s.code()), Some(0), "{status}; console: {}", talk.console);
}
