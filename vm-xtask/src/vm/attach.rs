//! Shells in running VMs (`cargo xtask attach`): every VM of `run-vm`, `test` and a
//! scenario's nodes serves the attach channel ([`guest::attach`]) on a unix socket, and
//! says so in the workspace's registry of running VMs (`target/vms/ID.json`: what it
//! is, since when, the process that runs it and the socket), removed when it ends. The
//! client connects, puts the terminal in raw mode (so Ctrl-C, line editing and the
//! window's size are the guest terminal's) and relays until the shell ends.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use guest::attach::{Decoder, Frame};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use serde::{Deserialize, Serialize};

use crate::error::usage_error;

/// A VM that serves the attach channel: where it registers, and what it is.
#[derive(Debug, Clone)]
pub struct Attachable {
    /// The workspace's registry of running VMs ([`registry_dir`]).
    pub dir: PathBuf,
    /// What it is, as `attach` lists it: `run-vm minimal: make check`.
    pub what: String,
}

/// The registry of running VMs under a target directory.
pub fn registry_dir(target_dir: &Path) -> PathBuf {
    target_dir.join("vms")
}

/// The ID of the VM this process runs under `label` (`run-vm`, `test`, a node's name).
pub fn id(label: &str) -> String {
    format!("{label}-{}", std::process::id())
}

/// The longest path a unix socket's address holds (`sun_path` is 108 bytes, NUL included).
const SOCKET_PATH_MAX: usize = 107;

/// The attach channel's socket, and the private directory made for it when it is not in
/// the place asked for (removed when this is dropped).
#[derive(Debug)]
pub struct Socket {
    /// Its path.
    pub path: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl Socket {
    /// `dir/name` when that path fits a socket's address; else `name` in a private
    /// directory made under the temporary directory (a deep target directory); none when
    /// that does not fit either (the VM then serves no shells).
    pub fn new(dir: &Path, name: &str) -> Result<Option<Socket>> {
        let fits = |p: &Path| p.as_os_str().len() <= SOCKET_PATH_MAX;
        let path = dir.join(name);
        if fits(&path) {
            return Ok(Some(Socket { path, _dir: None }));
        }
        let short = tempfile::Builder::new().prefix("xtask-attach.").tempdir().context("a directory for a socket")?;
        let path = short.path().join(name);
        Ok(fits(&path).then_some(Socket { path, _dir: Some(short) }))
    }
}

/// A running VM, as the registry has it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    /// What `attach ID` names it by.
    pub id: String,
    /// What it is.
    pub what: String,
    /// When it started, in seconds since the epoch.
    pub since: u64,
    /// The process that runs it, and that process's start time (clock ticks after boot),
    /// which a reused PID does not share.
    pub pid: i32,
    /// See `pid`.
    pub start: u64,
    /// The attach channel's socket.
    pub socket: PathBuf,
}

/// The start time of process `pid` (clock ticks after boot).
fn process_start(pid: i32) -> Option<u64> {
    crate::process::stat(pid).map(|(_, _, start)| start)
}

/// The registration of a running VM: its registry entry, removed when this is dropped.
#[derive(Debug)]
pub struct Registration {
    path: PathBuf,
}

impl Registration {
    /// Writes the entry of the VM `id` (this process's) serving its attach channel on
    /// `socket` (which must outlive it).
    pub fn new(attachable: &Attachable, id: &str, socket: &Path) -> Result<Registration> {
        crate::store::ensure_private_dir(&attachable.dir)?;
        let pid = std::process::id() as i32;
        let entry = Entry {
            id: id.to_string(),
            what: attachable.what.clone(),
            since: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default(),
            pid,
            start: process_start(pid).unwrap_or_default(),
            socket: socket.to_path_buf(),
        };
        let path = attachable.dir.join(format!("{id}.json"));
        crate::store::write_atomically(&path, &serde_json::to_vec_pretty(&entry)?)?;
        Ok(Registration { path })
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_file(self.path.with_extension("lock"));
    }
}

/// The running VMs of the registry `dir`, oldest first; entries of processes that are
/// gone are removed.
pub fn list(dir: &Path) -> Vec<Entry> {
    let mut entries = Vec::new();
    for file in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = file.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let Some(entry) = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<Entry>(&b).ok()) else {
            continue;
        };
        if process_start(entry.pid) != Some(entry.start) {
            let _ = std::fs::remove_file(&path);
            let _ = std::fs::remove_file(path.with_extension("lock"));
            continue;
        }
        entries.push(entry);
    }
    entries.sort_by(|a, b| (a.since, &a.id).cmp(&(b.since, &b.id)));
    entries
}

/// The running VM `id` of the registry `dir`; an unknown ID is a usage error listing the
/// running ones.
pub fn find(dir: &Path, id: &str) -> Result<Entry> {
    let entries = list(dir);
    if let Some(entry) = entries.iter().find(|e| e.id == id) {
        return Ok(entry.clone());
    }
    let shown = id.escape_debug();
    Err(match entries.is_empty() {
        true => usage_error(format!("no running VM `{shown}`: this workspace runs none now")),
        false => {
            let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
            usage_error(format!("no running VM `{shown}`; running: {}", ids.join(", ")))
        }
    })
}

/// Ctrl-]: leaves the session (the shell is hung up), as telnet's escape.
const DETACH: u8 = 0x1d;

/// Opens a shell in the VM of `entry` on this terminal and relays until it ends; returns
/// its exit status (0 when detached with Ctrl-]). Without a terminal on stdin, stdin is
/// typed into the guest's terminal and its end ends the shell (Ctrl-D).
pub fn attach(dir: &Path, entry: &Entry) -> Result<i32> {
    // One client at a time: a second one would wait unheard behind the first.
    let lock_path = dir.join(format!("{}.lock", entry.id));
    let lock = std::fs::File::options().create(true).truncate(false).write(true).open(&lock_path)?;
    if lock.try_lock().is_err() {
        return Err(usage_error(format!("VM `{}` has a shell attached already; one at a time", entry.id)));
    }
    let mut stream = UnixStream::connect(&entry.socket)
        .with_context(|| format!("connecting to VM `{}` (`{}`)", entry.id, entry.socket.display()))?;
    let stdin = std::io::stdin();
    let terminal = std::io::IsTerminal::is_terminal(&stdin);
    let (rows, cols) = window_size().unwrap_or((24, 80));
    let term = std::env::var("TERM").ok().filter(|t| {
        t.len() <= guest::attach::MAX_TERM && t.chars().all(|c| c.is_ascii_alphanumeric() || "._+-".contains(c))
    });
    let open = Frame::Open { rows, cols, term: term.unwrap_or_else(|| "linux".into()) };
    stream.write_all(&open.encode()).context("opening the session")?;
    let (winch_read, winch_write) = UnixStream::pair()?;
    winch_read.set_nonblocking(true)?;
    let winch = signal_hook::low_level::pipe::register(signal_hook::consts::SIGWINCH, winch_write)?;
    let raw = terminal.then(RawTerminal::enter).transpose()?;
    if terminal {
        eprint!("attached to `{}`: Ctrl-] leaves (the shell is hung up)\r\n", entry.id);
    }
    let result = relay(&mut stream, terminal, &winch_read);
    drop(raw);
    signal_hook::low_level::unregister(winch);
    drop(lock);
    let _ = std::fs::remove_file(&lock_path);
    result
}

/// The relay of [`attach`]: stdin to the guest, the guest's terminal to stdout.
fn relay(stream: &mut UnixStream, terminal: bool, winch: &UnixStream) -> Result<i32> {
    let mut stdin = std::io::stdin().lock();
    let mut stdout = std::io::stdout().lock();
    let mut decoder = Decoder::default();
    let mut buf = vec![0u8; 16 * 1024];
    let mut stdin_open = true;
    loop {
        let reader = stream.try_clone()?;
        let stdin_fd = std::io::stdin();
        let mut fds =
            vec![PollFd::new(reader.as_fd(), PollFlags::POLLIN), PollFd::new(winch.as_fd(), PollFlags::POLLIN)];
        if stdin_open {
            fds.push(PollFd::new(stdin_fd.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => bail!("waiting for the terminal or the VM: {e}"),
        }
        let ready = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
        let (guest_ready, winch_ready) = (ready(&fds[0]), ready(&fds[1]));
        let stdin_ready = fds.get(2).is_some_and(ready);
        drop(fds);
        if winch_ready {
            let mut drained = [0u8; 64];
            while matches!((&*winch).read(&mut drained), Ok(n) if n > 0) {}
            if let Some((rows, cols)) = window_size() {
                stream.write_all(&Frame::Resize { rows, cols }.encode())?;
            }
        }
        if stdin_ready {
            let n = stdin.read(&mut buf).unwrap_or(0);
            if n == 0 {
                // Typed input has ended: end the shell as Ctrl-D at a line's start does.
                stdin_open = false;
                stream.write_all(&Frame::data(b"\x04"))?;
            } else if terminal && buf[..n].contains(&DETACH) {
                let before = buf[..n].iter().position(|&b| b == DETACH).unwrap_or(0);
                stream.write_all(&Frame::data(&buf[..before]))?;
                eprint!("\r\ndetached; the shell in the VM is hung up\r\n");
                return Ok(0);
            } else {
                stream.write_all(&Frame::data(&buf[..n]))?;
            }
        }
        if guest_ready {
            let n = stream.read(&mut buf).unwrap_or(0);
            if n == 0 {
                bail!("the VM ended during the session (powered off, or stopped by its host)");
            }
            decoder.push(&buf[..n]);
            while let Some(frame) = decoder.next_frame() {
                match frame.map_err(|e| anyhow::anyhow!("the guest broke the attach protocol: {e}"))? {
                    Frame::Data(bytes) => {
                        stdout.write_all(&bytes)?;
                        stdout.flush()?;
                    }
                    Frame::Exit(code) => return Ok(i32::from(code)),
                    other => bail!("the guest broke the attach protocol: it sent {other:?}"),
                }
            }
        }
    }
}

/// The terminal's size on stdin (or stdout), if it is one.
fn window_size() -> Option<(u16, u16)> {
    let mut size = nix::libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    for fd in [0, 1] {
        // SAFETY: TIOCGWINSZ writes a `winsize` through a valid pointer.
        if unsafe { nix::libc::ioctl(fd, nix::libc::TIOCGWINSZ, &mut size) } == 0 && size.ws_row > 0 {
            return Some((size.ws_row, size.ws_col));
        }
    }
    None
}

/// The terminal on stdin in raw mode while this lives; restored when dropped.
struct RawTerminal {
    saved: nix::sys::termios::Termios,
}

impl RawTerminal {
    fn enter() -> Result<RawTerminal> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let saved = tcgetattr(std::io::stdin()).context("reading the terminal's settings")?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(std::io::stdin(), SetArg::TCSANOW, &raw).context("setting the terminal to raw mode")?;
        Ok(RawTerminal { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(std::io::stdin(), nix::sys::termios::SetArg::TCSANOW, &self.saved);
    }
}

/// Lists `entries` as `attach` does: ID, when it started (UTC), how long it has run,
/// what it is.
pub fn print_list(entries: &[Entry]) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default();
    let width = entries.iter().map(|e| e.id.len()).max().unwrap_or(0).max(2);
    println!("{:<width$}  {:<12}  {:>7}  WHAT", "ID", "SINCE", "RUNNING");
    for e in entries {
        let (since, running) = when(e.since, now);
        let what: String = e.what.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
        println!("{:<width$}  {since:<12}  {running:>7}  {what}", e.id);
    }
}

/// A moment (seconds since the epoch) as its time of day (UTC) and how long ago it was
/// at `now` (`42s`, `5m`, `3h`).
pub fn when(at: u64, now: u64) -> (String, String) {
    let ago = match now.saturating_sub(at) {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s => format!("{}h", s / 3600),
    };
    let day = at % 86_400;
    (format!("{:02}:{:02}:{:02} UTC", day / 3600, day / 60 % 60, day % 60), ago)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_too_deep_for_its_address_goes_to_a_private_directory() {
        let shallow = Socket::new(Path::new("/run/x"), "attach.sock").unwrap().unwrap();
        assert_eq!(shallow.path, Path::new("/run/x/attach.sock"));
        let deep = PathBuf::from(format!("/{}", "d".repeat(120)));
        let moved = Socket::new(&deep, "attach.sock").unwrap().unwrap();
        assert!(moved.path.as_os_str().len() <= SOCKET_PATH_MAX && moved.path.ends_with("attach.sock"));
        let dir = moved.path.parent().unwrap().to_path_buf();
        assert!(dir.is_dir());
        drop(moved);
        assert!(!dir.exists(), "the private directory outlived its socket");
    }

    #[test]
    fn entries_of_ended_processes_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let attachable = Attachable { dir: dir.path().join("vms"), what: "run-vm minimal: true".into() };
        let registration = Registration::new(&attachable, "run-vm-1", Path::new("/nowhere.sock")).unwrap();
        let listed = list(&attachable.dir);
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].what, "run-vm minimal: true");
        assert_eq!(find(&attachable.dir, "run-vm-1").unwrap().socket, Path::new("/nowhere.sock"));
        assert!(find(&attachable.dir, "run-vm-2").is_err());
        // A process that is gone (its start time no longer matches).
        let mut stale = listed[0].clone();
        stale.id = "gone".into();
        stale.start += 1;
        std::fs::write(attachable.dir.join("gone.json"), serde_json::to_vec(&stale).unwrap()).unwrap();
        assert_eq!(list(&attachable.dir).len(), 1);
        assert!(!attachable.dir.join("gone.json").exists());
        drop(registration);
        assert!(list(&attachable.dir).is_empty());
    }
}
