//! Shells on the attach channel ([`guest::attach`]): a thread that waits for the host's
//! client on the port, opens a pseudo-terminal of the size the client asks for, starts a
//! shell on it (a session of its own with the terminal as its controlling one, the
//! request's environment, a clean process state) and relays bytes both ways until the
//! shell ends (then [`Frame::Exit`]) or the client goes (then the session is hung up).
//!
//! PID 1's loops reap every child: the shell's status reaches its session through
//! [`claim`], which they ask first.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use guest::attach::{Decoder, Frame, ATTACH_PORT};
use guest::{Request, Status};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::pty::{openpty, Winsize};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::sys::{clean_start, log, open_port, Result};

/// The sessions' shells, and where each one's status goes.
static SHELLS: Mutex<Option<HashMap<Pid, Sender<Status>>>> = Mutex::new(None);

/// How often the port is looked at while no client is connected (a read returns at once
/// then: the port cannot be waited on).
const IDLE_POLL: Duration = Duration::from_millis(200);
/// How long a hung-up shell has to end before its session is killed.
const HANGUP_GRACE: Duration = Duration::from_secs(3);
/// How long the terminal is still read after the shell ended.
const DRAIN: Duration = Duration::from_secs(1);

/// Hands `status` to the session whose shell `pid` was; false when it was no shell.
pub(crate) fn claim(pid: Pid, status: &Status) -> bool {
    let mut shells = SHELLS.lock().unwrap_or_else(|e| e.into_inner());
    match shells.as_mut().and_then(|s| s.remove(&pid)) {
        Some(tx) => {
            let _ = tx.send(status.clone());
            true
        }
        None => false,
    }
}

/// Serves sessions on the attach port for the rest of the VM's life, when the request
/// asks for it.
pub(crate) fn start(request: &Request) -> Result<()> {
    // Once: a guest restored at its failure point still has its server (a replay).
    static STARTED: AtomicBool = AtomicBool::new(false);
    if !request.attach || STARTED.swap(true, Ordering::SeqCst) {
        return Ok(());
    }
    let port = open_port(ATTACH_PORT)?;
    let request = request.clone();
    std::thread::spawn(move || {
        if let Err(e) = serve(port, &request) {
            log(&format!("attach: {e}"));
        }
    });
    Ok(())
}

/// A session's terminal: its size and type.
type Opening = (u16, u16, String);

/// Serves one session after another on `port`.
fn serve(mut port: File, request: &Request) -> Result<()> {
    let mut decoder = Decoder::default();
    let mut next = None;
    loop {
        let opening = match next.take() {
            Some(opening) => opening,
            None => wait_for_client(&mut port, &mut decoder)?,
        };
        match session(&mut port, &mut decoder, opening, request) {
            Ok(opened) => next = opened,
            Err(e) => {
                // A client that broke the protocol: what it sent is dropped.
                log(&format!("attach: {e}"));
                decoder = Decoder::default();
            }
        }
    }
}

/// Waits for a client to open a session on `port`.
fn wait_for_client(port: &mut File, decoder: &mut Decoder) -> Result<Opening> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match decoder.next_frame() {
            Some(Ok(Frame::Open { rows, cols, term })) => return Ok((rows, cols, term)),
            Some(Ok(other)) => log(&format!("attach: ignored {other:?} outside a session")),
            Some(Err(e)) => {
                log(&format!("attach: {e}"));
                *decoder = Decoder::default();
            }
            None => {
                let n = port.read(&mut buf).map_err(|e| format!("reading the port: {e}"))?;
                if n == 0 {
                    // No client: look again later.
                    *decoder = Decoder::default();
                    std::thread::sleep(IDLE_POLL);
                }
                decoder.push(&buf[..n]);
            }
        }
    }
}

/// Serves the session `opening` asks for until its shell has ended (and that is said),
/// or its client has gone; returns the next session's opening when a new client came
/// meanwhile (one that connected before this session's end was seen here).
fn session(port: &mut File, decoder: &mut Decoder, opening: Opening, request: &Request) -> Result<Option<Opening>> {
    let (rows, cols, term) = opening;
    let size = Winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    let pty = openpty(Some(&size), None).map_err(|e| format!("cannot open a pseudo-terminal: {e}"))?;
    let (statuses, status_rx) = mpsc::channel();
    let shell = spawn_shell(request, &term, pty.slave, statuses)?;
    log(&format!("attach: a shell ({shell}) on a {cols}x{rows} terminal"));
    let mut master = File::from(pty.master);
    let gone = Arc::new(AtomicBool::new(false));
    let out = {
        let master = master.try_clone().map_err(|e| e.to_string())?;
        let port = port.try_clone().map_err(|e| e.to_string())?;
        let gone = gone.clone();
        std::thread::spawn(move || relay_out(master, port, status_rx, &gone))
    };
    let mut buf = vec![0u8; 16 * 1024];
    let mut next = None;
    // The client's frames, until the shell's end has been said or the client leaves.
    'session: loop {
        while let Some(frame) = decoder.next_frame() {
            match frame? {
                Frame::Data(bytes) => {
                    let _ = master.write_all(&bytes);
                }
                Frame::Resize { rows, cols } => resize(&master, rows, cols),
                Frame::Open { rows, cols, term } => {
                    // A new client: this one has gone.
                    next = Some((rows, cols, term));
                    hang_up(shell, &gone, &out);
                    break 'session;
                }
                Frame::Exit(_) => log("attach: ignored an Exit from the client"),
            }
        }
        if out.is_finished() {
            break;
        }
        let mut fds = [PollFd::new(port.as_fd(), PollFlags::POLLIN)];
        if poll(&mut fds, PollTimeout::from(100u16)).unwrap_or(0) == 0 {
            continue;
        }
        match port.read(&mut buf) {
            Ok(0) | Err(_) => {
                hang_up(shell, &gone, &out);
                break;
            }
            Ok(n) => decoder.push(&buf[..n]),
        }
    }
    let _ = out.join();
    Ok(next)
}

/// Ends a session whose client has gone: its process group is hung up, and killed if it
/// has not ended after [`HANGUP_GRACE`].
fn hang_up(shell: Pid, gone: &AtomicBool, out: &std::thread::JoinHandle<()>) {
    gone.store(true, Ordering::SeqCst);
    let group = Pid::from_raw(-shell.as_raw());
    let _ = kill(group, Signal::SIGHUP);
    let _ = kill(group, Signal::SIGCONT);
    let deadline = std::time::Instant::now() + HANGUP_GRACE;
    while !out.is_finished() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = kill(group, Signal::SIGKILL);
}

/// Starts `/bin/sh` on the terminal `slave`: the request's environment with `TERM`, in
/// `/root`, a session of its own whose controlling terminal it is.
fn spawn_shell(request: &Request, term: &str, slave: OwnedFd, statuses: Sender<Status>) -> Result<Pid> {
    let stdio = |fd: &OwnedFd| fd.try_clone().map(Stdio::from).map_err(|e| format!("the terminal: {e}"));
    let mut cmd = Command::new("/bin/sh");
    cmd.env_clear()
        .envs(request.env.iter().filter(|(k, _)| k != "TERM").map(|(k, v)| (k, v)))
        .env("TERM", term)
        .current_dir(if std::path::Path::new("/root").is_dir() { "/root" } else { "/" })
        .stdin(stdio(&slave)?)
        .stdout(stdio(&slave)?)
        .stderr(stdio(&slave)?);
    clean_start(&mut cmd);
    // After `clean_start`'s setsid: the terminal becomes the new session's.
    // SAFETY: only an async-signal-safe call (ioctl) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if nix::libc::ioctl(0, nix::libc::TIOCSCTTY, 1) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // Registered before PID 1 can reap it: the reaper asks under the same lock.
    let mut shells = SHELLS.lock().unwrap_or_else(|e| e.into_inner());
    let child = cmd.spawn().map_err(|e| format!("cannot start /bin/sh: {e}"))?;
    let pid = Pid::from_raw(child.id() as i32);
    shells.get_or_insert_with(HashMap::new).insert(pid, statuses);
    Ok(pid)
}

/// Copies what the terminal shows to the port until the shell has ended and its output
/// is drained (then says [`Frame::Exit`]), or the client is gone and the shell ended.
fn relay_out(mut master: File, mut port: File, statuses: Receiver<Status>, gone: &AtomicBool) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut ended: Option<(Status, std::time::Instant)> = None;
    loop {
        if ended.is_none() {
            ended = statuses.try_recv().ok().map(|s| (s, std::time::Instant::now()));
        }
        // What the shell's leftovers print after it ended is drained for a moment only.
        let draining = ended.as_ref().is_some_and(|(_, at)| at.elapsed() < DRAIN);
        let mut fds = [PollFd::new(master.as_fd(), PollFlags::POLLIN)];
        let ready = poll(&mut fds, PollTimeout::from(100u16)).unwrap_or(0);
        let readable = ready > 0 && fds[0].revents().is_some_and(|r| r.contains(PollFlags::POLLIN));
        let n = if readable { master.read(&mut buf).unwrap_or(0) } else { 0 };
        if n > 0 && (ended.is_none() || draining) {
            if !gone.load(Ordering::SeqCst) {
                let _ = port.write_all(&Frame::data(&buf[..n]));
            }
            continue;
        }
        // Nothing more to show: once the shell has ended, the session is over.
        if let Some((status, _)) = &ended {
            if !gone.load(Ordering::SeqCst) {
                let code = match status {
                    Status::Exited(c) => *c as u8,
                    Status::Signaled(s) => 128u8.saturating_add(*s as u8),
                    Status::Error(_) => 1,
                };
                let _ = port.write_all(&Frame::Exit(code).encode());
            }
            return;
        }
        if ready > 0 && !readable {
            // Hung up with the shell still there (it closed the terminal): wait for it.
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Gives the terminal of `master` a new size (its foreground program gets SIGWINCH).
fn resize(master: &File, rows: u16, cols: u16) {
    let size = Winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads a `winsize` from a valid pointer.
    unsafe {
        nix::libc::ioctl(master.as_raw_fd(), nix::libc::TIOCSWINSZ, &size);
    }
}
