//! Debugging: `run-vm --gdb PORT --gdb-wait` (QEMU's gdb stub, the guest held until gdb
//! continues it) and `test --debug NAME` (one test under gdbserver in the guest), each
//! driven by Debian's gdb from the store (`store gdb-program`: gdb-minimal, locked in
//! vm.lock, nothing of the host's), and the flags' usage errors.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vm_tests::{output_within, xtask, xtask_bin, Run, TIMEOUT};

/// Debian's gdb from the store; a prerequisite that cannot be made fails the test, saying so.
fn gdb() -> PathBuf {
    let made = xtask(&["store", "gdb-program"]);
    assert_eq!(made.code, 0, "the tests' gdb (Debian's gdb-minimal from the store) could not be made: {made:#?}");
    let path = PathBuf::from(made.stdout.trim_end());
    assert!(path.is_file(), "`store gdb-program` printed `{}`, no file: {made:#?}", path.display());
    path
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `gdb -batch` with `args`, ended if still running after 10 minutes.
fn gdb_batch(args: &[&str]) -> Run {
    let mut cmd = Command::new(gdb());
    cmd.arg("-batch").args(args);
    output_within(cmd, 600)
}

/// An xtask run in the background: its stderr read line by line as it comes.
struct Background {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: String,
    stdout: std::thread::JoinHandle<String>,
}

impl Background {
    fn start(args: &[&str]) -> Background {
        let mut child = Command::new(xtask_bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let stdout = std::thread::spawn(move || vm_tests::read_all(out));
        let err = BufReader::new(child.stderr.take().unwrap());
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in err.lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Background { child, lines, stderr: String::new(), stdout }
    }

    /// Reads stderr until a line contains `needle` (panicking if xtask ends first, or
    /// after 10 minutes rather than hanging); returns that line.
    fn wait_for(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(600);
        while Instant::now() < deadline {
            match self.lines.recv_timeout(Duration::from_secs(1)) {
                Ok(line) => {
                    self.stderr.push_str(&line);
                    self.stderr.push('\n');
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let _ = self.child.kill();
        panic!("xtask never said `{needle}`; its stderr:\n{}", self.stderr);
    }

    /// Waits for xtask to end (killing it after 10 minutes): its status and output.
    fn finish(mut self) -> Run {
        let deadline = Instant::now() + Duration::from_secs(600);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("xtask was still running after 10 minutes; stderr:\n{}", self.stderr);
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.stderr.push_str(&line);
            self.stderr.push('\n');
        }
        Run { code: status.code().unwrap_or(-1), stdout: self.stdout.join().unwrap(), stderr: self.stderr }
    }
}

#[test]
fn gdb_attaches_to_a_held_guest_reads_its_registers_and_continues_it() {
    let gdb = gdb();
    let port = free_port();
    let port_arg = port.to_string();
    let mut vm = Background::start(&[
        "run-vm",
        "--gdb",
        &port_arg,
        "--gdb-wait",
        "--timeout",
        TIMEOUT,
        "--",
        "echo",
        "ran-under-gdb",
    ]);
    let hint = vm.wait_for(&format!("-ex 'target remote 127.0.0.1:{port}'"));
    assert!(hint.contains(&gdb.display().to_string()), "the hint names another gdb: {hint}");
    assert!(hint.contains("vmlinux"), "the hint names no kernel image: {hint}");
    // gdb retries the connection while QEMU starts (the hint comes before QEMU does).
    let target = format!("target remote 127.0.0.1:{port}");
    let run = gdb_batch(&[
        "-ex",
        "set tcp connect-timeout 300",
        "-ex",
        &target,
        "-ex",
        "info registers rip",
        "-ex",
        "bt",
        "-ex",
        "continue",
    ]);
    assert_eq!(run.code, 0, "{run:#?}");
    // Held before the first instruction: the reset vector.
    assert!(run.stdout.lines().any(|l| l.starts_with("rip") && l.contains("0xfff0")), "{run:#?}");
    assert!(run.stdout.contains("#0  0x000000000000fff0 in ?? ()"), "{run:#?}");
    // Continued, the guest ran the command and powered off: QEMU's stub says it exited.
    assert!(run.stdout.contains("[Inferior 1 (process 1) exited normally]"), "{run:#?}");
    let vm = vm.finish();
    assert_eq!(vm.code, 0, "{vm:#?}");
    assert_eq!(vm.stdout, "ran-under-gdb\n", "{vm:#?}");
    assert!(vm.stderr.contains("booting cold, no snapshot"), "{vm:#?}");
}

#[test]
fn test_debug_runs_one_test_under_gdbserver_and_gdb_sees_it_end() {
    for (test, target, gdb_says, code, result) in [
        ("fails_on_purpose", "fails", "exited with code 0145]", 101, "test fails_on_purpose ... FAILED"),
        ("the_hello_service_answers", "in_vm", "exited normally]", 0, "test result: ok. 1 passed; 0 failed"),
    ] {
        let mut vm = Background::start(&[
            "test",
            "--system",
            "hello",
            "--timeout",
            TIMEOUT,
            "--debug",
            test,
            "-p",
            "vm-checks",
            "--test",
            target,
            "--",
            "--ignored",
        ]);
        let hint = vm.wait_for("-ex 'target remote 127.0.0.1:");
        // `    GDB BINARY -ex 'target remote 127.0.0.1:PORT'`
        let words: Vec<&str> = hint.split_whitespace().collect();
        let binary = words[1];
        assert!(binary.contains(&format!("/debug/deps/{target}-")), "{hint}");
        let remote = hint.split("-ex '").nth(1).unwrap().trim_end_matches('\'');
        vm.wait_for("Listening on port 2345");
        let run = gdb_batch(&[binary, "-ex", remote, "-ex", "continue"]);
        assert_eq!(run.code, 0, "{run:#?}");
        assert!(run.stdout.contains(gdb_says), "{test}: {run:#?}");
        let vm = vm.finish();
        assert_eq!(vm.code, code, "{test}: {vm:#?}");
        assert!(vm.stdout.contains(result), "{test}: {vm:#?}");
        assert!(vm.stdout.contains("running 1 test"), "{test}: {vm:#?}");
    }
}

#[test]
fn bad_debugging_flags_are_usage_errors_before_anything_boots() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port().to_string();
    let cases: &[(&[&str], &str)] = &[
        (&["run-vm", "--gdb", "0", "--", "true"], "not a TCP port from 1 to 65535"),
        (&["run-vm", "--gdb", "gdb", "--", "true"], "not a TCP port from 1 to 65535"),
        (&["run-vm", "--gdb", "70000", "--", "true"], "not a TCP port from 1 to 65535"),
        (&["run-vm", "--gdb-wait", "--", "true"], "--gdb <PORT>"),
        (&["test", "--gdb-wait", "-p", "vm-checks"], "--gdb <PORT>"),
        (&["run-vm", "--gdb", "1234", "--warm", "--", "true"], "cannot be used with"),
        (&["run-vm", "--gdb", &taken_port, "--", "true"], "cannot be listened on"),
        (&["test", "--gdb", &taken_port, "-p", "vm-checks"], "cannot be listened on"),
        (
            &["test", "--system", "hello", "--debug", "no_such_test", "-p", "vm-checks", "--test", "fails"],
            "no test binary built has a test of that exact name",
        ),
    ];
    for (args, says) in cases {
        let run = xtask(args);
        assert_eq!(run.code, 2, "{args:?}: {run:#?}");
        assert!(run.stderr.contains(says), "{args:?}: {run:#?}");
        assert!(!run.stderr.contains("TCG") && !run.stderr.contains("sharing"), "{args:?} booted: {run:#?}");
    }
    drop(taken);
}
