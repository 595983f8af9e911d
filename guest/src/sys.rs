//! What every part of the helper shares: its error type, its log line on the console,
//! the virtio serial ports, and the signals PID 1 handles and how it reaps children.

use std::fs;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use guest::Status;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

pub(crate) type Result<T> = std::result::Result<T, String>;

pub(crate) fn log(msg: &str) {
    // Seconds since boot (CLOCK_BOOTTIME, as /proc/uptime, which is not mounted yet at first).
    let uptime = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| format!("{}.{:02}", t.tv_sec(), t.tv_nsec() / 10_000_000))
        .unwrap_or_else(|_| "?".to_string());
    // The console is the only place this can go; a failed write has nowhere to be reported.
    let _ = writeln!(std::io::stderr(), "guest[{uptime}]: {msg}");
}

/// Finds `/dev/vportNpM` for the virtio serial port called `name`. Ports are announced
/// by the host after the device is up and added by the driver asynchronously, so this
/// waits for them (a few seconds at most, for a loaded host).
pub(crate) fn port_device(name: &str) -> Result<PathBuf> {
    let class = Path::new("/sys/class/virtio-ports");
    for _ in 0..1000 {
        for entry in fs::read_dir(class).into_iter().flatten().flatten() {
            let port_name = fs::read_to_string(entry.path().join("name")).unwrap_or_default();
            let dev = Path::new("/dev").join(entry.file_name());
            if port_name.trim_end() == name && dev.exists() {
                return Ok(dev);
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(format!("no virtio serial port named `{name}` appeared in {}", class.display()))
}

/// Opens the virtio serial port called `name` for reading and writing ([`port_device`]).
pub(crate) fn open_port(name: &str) -> Result<fs::File> {
    let dev = port_device(name)?;
    fs::OpenOptions::new().read(true).write(true).open(&dev).map_err(|e| format!("cannot open {}: {e}", dev.display()))
}

/// Signals that ask PID 1 to shut down (busybox `poweroff` sends SIGUSR2, `reboot`
/// SIGTERM, `halt` SIGUSR1; Ctrl-Alt-Del is SIGINT).
pub(crate) const SHUTDOWN_SIGNALS: [Signal; 5] =
    [Signal::SIGUSR1, Signal::SIGUSR2, Signal::SIGTERM, Signal::SIGINT, Signal::SIGPWR];

pub(crate) fn handled_signals() -> SigSet {
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGCHLD);
    for s in SHUTDOWN_SIGNALS {
        signals.add(s);
    }
    signals
}

/// Blocks the signals PID 1 handles, to receive them with sigwait. Children inherit the
/// mask: [`clean_start`] empties it in each.
pub(crate) fn block_signals() -> Result<()> {
    handled_signals().thread_block().map_err(|e| format!("cannot block signals: {e}"))
}

/// Makes `cmd` start as a program started from a shell on a host does: no signal blocked
/// and every signal's disposition the default (PID 1 blocks the signals it waits for and
/// Rust's runtime ignores SIGPIPE: a child inherits both), a session and a process group
/// of its own (not PID 1's session 0), and no descriptor but the 0-2 it is given. Other
/// `pre_exec` steps may follow; they must not call `setsid` again.
pub(crate) fn clean_start(cmd: &mut Command) {
    // SAFETY: `reset_process` makes only async-signal-safe calls and allocates nothing.
    unsafe {
        cmd.pre_exec(reset_process);
    }
}

/// The work of [`clean_start`], between fork and exec.
fn reset_process() -> std::io::Result<()> {
    use nix::libc;
    let last = |r: libc::c_int| if r < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) };
    // SAFETY: plain system calls on a local, initialised signal set.
    unsafe {
        let mut empty = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        last(libc::sigemptyset(empty.as_mut_ptr()))?;
        let errno = libc::pthread_sigmask(libc::SIG_SETMASK, empty.as_ptr(), std::ptr::null_mut());
        if errno != 0 {
            return Err(std::io::Error::from_raw_os_error(errno));
        }
        // Handled signals reset at exec by themselves, ignored ones do not. SIGKILL,
        // SIGSTOP and the C library's own real-time signals refuse a disposition: the
        // calls fail for those, harmlessly.
        for signal in 1..=libc::SIGRTMAX() {
            libc::signal(signal, libc::SIG_DFL);
        }
        last(libc::setsid())?;
        // Close-on-exec rather than closed: std's own pipe (reporting a failed exec) is
        // among them and must stay open until exec.
        let flags = libc::CLOSE_RANGE_CLOEXEC as libc::c_long;
        last(
            libc::syscall(libc::SYS_close_range, 3 as libc::c_long, libc::c_long::from(u32::MAX), flags) as libc::c_int
        )?;
    }
    Ok(())
}

/// Reaps every exited child (PID 1 adopts orphans); returns the main child's status
/// once it has exited, and how the other children ended.
pub(crate) fn reap(main_pid: Pid) -> (Option<Status>, Vec<(Pid, Status)>) {
    let mut found = None;
    let mut others = Vec::new();
    loop {
        let (pid, status) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => (pid, Status::Exited(code)),
            Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, Status::Signaled(sig as i32)),
            Ok(WaitStatus::StillAlive) | Err(_) => return (found, others),
            Ok(_) => continue,
        };
        if pid == main_pid {
            found = Some(status);
        } else {
            others.push((pid, status));
        }
    }
}
