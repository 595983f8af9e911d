//! `run-vm --keep` and `attach`: a shell on a terminal of its own in a running VM,
//! driven through a pseudo-terminal as a person at a terminal would.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_tests::{wait_until, xtask, xtask_bin};

/// A program running on a pseudo-terminal of `rows` x `cols`, and what it has shown.
pub(crate) struct Terminal {
    master: std::fs::File,
    shown: Arc<Mutex<Vec<u8>>>,
    pub(crate) child: Child,
}

impl Terminal {
    pub(crate) fn spawn(mut cmd: Command, rows: u16, cols: u16) -> Terminal {
        let (mut master, mut slave) = (0, 0);
        let size = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: openpty writes two descriptors and reads the size.
        let r = unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), &size) };
        assert_eq!(r, 0, "openpty failed");
        // SAFETY: both descriptors were just opened and are owned here.
        let (master, slave) = unsafe { (std::fs::File::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        let io = || Stdio::from(slave.try_clone().unwrap());
        let child = cmd.stdin(io()).stdout(io()).stderr(io()).spawn().unwrap();
        drop(slave);
        let shown = Arc::new(Mutex::new(Vec::new()));
        let (mut reader, into) = (master.try_clone().unwrap(), shown.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                into.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Terminal { master, shown, child }
    }

    pub(crate) fn shown(&self) -> String {
        String::from_utf8_lossy(&self.shown.lock().unwrap()).into_owned()
    }

    /// Waits until the terminal has shown `text` after the first `from` bytes; returns
    /// where it ends.
    pub(crate) fn expect(&self, text: &str, from: usize) -> usize {
        let found = wait_until(120, || self.shown().get(from..).is_some_and(|s| s.contains(text)));
        let shown = self.shown();
        assert!(found, "the terminal never showed {text:?}; it shows:\n{}", &shown[from.min(shown.len())..]);
        from + shown[from..].find(text).unwrap() + text.len()
    }

    pub(crate) fn type_in(&mut self, keys: &str) {
        self.master.write_all(keys.as_bytes()).unwrap();
    }
}

#[test]
fn a_kept_vm_gives_a_shell_on_a_real_terminal_with_ctrl_c_and_its_window_size() {
    // The command leaves a file behind and says when it has ended.
    let mut vm = Command::new(xtask_bin())
        .args(["run-vm", "--keep", "--", "sh", "-c", "echo left-by-the-command > /tmp/marker; echo command-done"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let id = format!("run-vm-{}", vm.id());
    let stdout = vm.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        match lines.next() {
            Some(Ok(line)) if line == "command-done" => break,
            Some(Ok(_)) => {}
            _ => {
                let _ = vm.kill();
                let mut err = String::new();
                vm.stderr.take().unwrap().read_to_string(&mut err).unwrap();
                panic!("the kept VM's command never finished; its stderr:\n{err}");
            }
        }
        assert!(Instant::now() < deadline, "the command did not finish in 10 minutes");
    }

    // Listed, with what it runs; an unknown ID is a usage error naming the running ones.
    let listed = xtask(&["attach"]);
    listed.expect_code(0);
    let row = listed.stdout.lines().find(|l| l.starts_with(&format!("{id} "))).unwrap_or_else(|| {
        panic!("`attach` does not list {id}:\n{}", listed.stdout);
    });
    assert!(row.contains("run-vm minimal: sh -c"), "{row}");
    let unknown = xtask(&["attach", "no-such-vm"]);
    unknown.expect_code(2);
    assert!(unknown.stderr.contains("no-such-vm") && unknown.stderr.contains(&id), "{}", unknown.stderr);

    // A shell on a 33x77 terminal: what the command left, the terminal's size, Ctrl-C.
    let mut attach = Command::new(xtask_bin());
    attach.args(["attach", &id]).env("TERM", "xterm");
    let mut term = Terminal::spawn(attach, 33, 77);
    let mut at = term.expect("# ", 0);
    term.type_in("cat /tmp/marker; stty size; tty; echo $TERM\r");
    at = term.expect("left-by-the-command", at);
    at = term.expect("33 77", at);
    at = term.expect("/dev/pts/", at);
    at = term.expect("xterm", at);
    term.type_in("sleep 600; echo sleep-was-not-interrupted\r");
    std::thread::sleep(Duration::from_secs(2));
    term.type_in("\x03");
    term.type_in("echo after-$((40+2))\r");
    at = term.expect("after-42", at);
    assert!(!term.shown()[at..].contains("sleep-was-not-interrupted"));
    // The shell's exit status is attach's.
    term.type_in("exit 7\r");
    assert!(wait_until(60, || matches!(term.child.try_wait(), Ok(Some(_)))), "attach did not end with the shell");
    assert_eq!(term.child.wait().unwrap().code(), Some(7), "{}", term.shown());

    // A second session, typed from a pipe, powers the VM off: run-vm ends with the
    // command's status.
    let mut second = Command::new(xtask_bin()).args(["attach", &id]).stdin(Stdio::piped()).spawn().unwrap();
    second.stdin.take().unwrap().write_all(b"poweroff\n").unwrap();
    assert!(wait_until(120, || matches!(vm.try_wait(), Ok(Some(_)))), "poweroff did not end the kept VM");
    assert_eq!(vm.wait().unwrap().code(), Some(0));
    let _ = second.wait();
    let gone = xtask(&["attach"]);
    assert!(!gone.stdout.contains(&id), "the ended VM is still listed:\n{}", gone.stdout);
}
