//! Running one VM: writes the request into the exchange directory, starts QEMU under a
//! guard that kills and reaps it (on timeout, Ctrl-C, SIGTERM, and xtask's own death),
//! relays the guest's output, and reads back the status the guest helper wrote.

use std::collections::VecDeque;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use guest::{Mode, Request, Status};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::host;
use crate::vm::qemu::{self, Console, Port, VmSpec};

pub use crate::error::{Failure, EXIT_TIMEOUT};

/// Where a guest stream ends up on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    Stdout,
    Stderr,
    /// Stdout, with libtest's failure reports copied to stderr as well ([`FailureEcho`]).
    TestStdout,
    /// Nowhere but the run's [`Watch`] (which keeps it: `test --isolate` prints each
    /// test's output whole once its VM has ended).
    WatchOnly,
}

/// Copies the failure reports libtest writes on stdout (from `---- NAME stdout ----` to
/// the `failures:` list) to `out` as they pass, so a failed test's panic message is on
/// stderr too while stdout stays what `cargo test` prints. Lines are cut at 64 KiB (the
/// bytes come from the guest).
pub struct FailureEcho<W: Write> {
    line: Vec<u8>,
    inside: bool,
    out: W,
}

impl<W: Write> FailureEcho<W> {
    const LINE_CAP: usize = 64 * 1024;

    pub fn new(out: W) -> FailureEcho<W> {
        FailureEcho { line: Vec::new(), inside: false, out }
    }

    fn end_line(&mut self) -> std::io::Result<()> {
        let line = String::from_utf8_lossy(&self.line);
        let text = line.trim_end_matches('\n');
        if text.starts_with("---- ") && text.ends_with(" ----") {
            self.inside = true;
        } else if text == "failures:" {
            self.inside = false;
        }
        if self.inside {
            self.out.write_all(&self.line)?;
            self.out.flush()?;
        }
        self.line.clear();
        Ok(())
    }
}

impl<W: Write> Write for FailureEcho<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for &b in buf {
            self.line.push(b);
            if b == b'\n' || self.line.len() >= Self::LINE_CAP {
                self.end_line()?;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// Watches a guest command's output as it comes and may end the run: the per-binary
/// timeout of `cargo xtask test` ([`crate::suite`]).
pub trait Watch: Send + Sync {
    /// Bytes of the command's stdout (`stderr` false) or stderr, as they come.
    fn output(&self, stderr: bool, bytes: &[u8]);
    /// Asked every few milliseconds once the request is written: a message stops the VM
    /// and is the run's error (exit status [`EXIT_TIMEOUT`], the console's tail after it).
    fn expired(&self) -> Option<String>;
}

/// A [`Watch`] as a relay's sink.
struct WatchSink {
    watch: Arc<dyn Watch>,
    stderr: bool,
}

impl Write for WatchSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.watch.output(self.stderr, buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Makes a request while its VM boots ([`GuestRequest::Later`]).
pub type LaterRequest<'a> = Box<dyn FnOnce() -> Result<Request> + 'a>;

/// The request a VM's guest helper runs: written before QEMU starts, or made while the
/// VM boots: QEMU starts first and the guest helper waits for the request file, so
/// building what the request names (a workspace crate, the system item) overlaps the
/// boot. A failure to make it stops the VM and is the run's error.
pub enum GuestRequest<'a> {
    Now(Box<Request>),
    /// Made later; its mode is known now (a shell takes the terminal from the start).
    Later(Mode, LaterRequest<'a>),
}

impl GuestRequest<'_> {
    pub fn mode(&self) -> Mode {
        match self {
            GuestRequest::Now(request) => request.mode,
            GuestRequest::Later(mode, _) => *mode,
        }
    }
}

/// One VM run.
pub struct VmRun<'a> {
    /// QEMU's configuration; the console and ports are filled in by [`VmRun::run`].
    pub spec: VmSpec,
    pub request: GuestRequest<'a>,
    /// The directory shared read-write as `/xchg`.
    pub xchg: PathBuf,
    /// Scratch space for FIFOs.
    pub runtime: PathBuf,
    /// Where console logs are kept.
    pub log_dir: PathBuf,
    /// Names the log file.
    pub label: String,
    pub timeout: Option<Duration>,
    /// Copy the console (kernel and helper messages) to stderr, and print QEMU's command.
    pub verbose: bool,
    /// Where the guest command's stdout and stderr go.
    pub stdout: Sink,
    pub stderr: Sink,
    /// Where snapshots are kept and whether to use one: the guest is restored from a
    /// snapshot of this VM's shape instead of booting cold ([`crate::vm::snapshot::prepare`],
    /// once the ports are known); a snapshot that does not load is removed and the VM
    /// boots cold.
    pub snapshots: Option<(crate::store::Store, crate::vm::snapshot::Warmth)>,
    /// Sees the command's output and may end the run ([`Watch`]).
    pub watch: Option<Arc<dyn Watch>>,
    /// Serve shells on the attach channel, registered as a running VM
    /// ([`crate::vm::attach`]); the ID is [`crate::vm::attach::id`] of the label.
    pub attach: Option<crate::vm::attach::Attachable>,
    /// Read-only shares (by tag) served over virtiofs instead of 9p when the VM boots
    /// cold and this host has a virtiofsd ([`crate::vm::virtiofs`]); the guest's mounts of
    /// them are changed to match. Said once with `verbose`.
    pub large_shares: Vec<String>,
    /// Save the VM if its program fails ([`crate::vm::replay`]): the guest stops at its
    /// failure point and this saver saves it; the shares stay on 9p (virtiofs blocks it).
    pub save_failure: Option<crate::vm::replay::FailureSaver>,
    /// A saved VM to restore instead of booting (a replay); one that does not load is
    /// the run's error.
    pub restore: Option<crate::vm::snapshot::Restore>,
}

/// A snapshot that did not load: the run goes on with a cold boot.
#[derive(Debug)]
struct WarmFailed(String);

impl fmt::Display for WarmFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for WarmFailed {}

/// How many bytes of console output are kept for error messages.
const CONSOLE_TAIL_BYTES: usize = 16 * 1024;
const CONSOLE_TAIL_LINES: usize = 25;
/// How many bytes of QEMU's own messages are kept for error messages.
const QEMU_STDERR_BYTES: usize = 16 * 1024;

impl<'a> VmRun<'a> {
    /// A run of `spec` for `request`, its exchange directory `xchg`, its FIFOs in `runtime`
    /// and its console log in `log_dir` named after `label`: no timeout, quiet, the
    /// command's output on stdout and stderr, no snapshot (change what differs with
    /// struct update syntax).
    pub fn new(
        spec: VmSpec,
        request: GuestRequest<'a>,
        xchg: &Path,
        runtime: &Path,
        log_dir: PathBuf,
        label: impl Into<String>,
    ) -> VmRun<'a> {
        VmRun {
            spec,
            request,
            xchg: xchg.to_path_buf(),
            runtime: runtime.to_path_buf(),
            log_dir,
            label: label.into(),
            timeout: None,
            verbose: false,
            stdout: Sink::Stdout,
            stderr: Sink::Stderr,
            snapshots: None,
            watch: None,
            attach: None,
            large_shares: Vec::new(),
            save_failure: None,
            restore: None,
        }
    }

    /// Boots the VM, waits for it to end and returns the status the guest reported.
    /// Every way of ending without a status is an error carrying the console's tail.
    pub fn run(mut self) -> Result<Status> {
        crate::debian::qemu::program_for(self.spec.arch)?;
        let interactive = self.request.mode() == Mode::Interactive;
        // Console logs hold guest text: a private directory, files made anew there.
        crate::store::ensure_private_dir(&self.log_dir)?;
        let log_path = self.log_dir.join(format!("{}-{}.log", self.label, std::process::id()));

        let mut relays = Vec::new();
        let mut ports = (None, None);
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        if interactive {
            self.spec.console = Console::Stdio;
        } else {
            let fifo = self.fifo("console")?;
            // A log of an earlier run with this PID is replaced.
            let _ = fs::remove_file(&log_path);
            let log = crate::store::create_private_file(&log_path)?;
            let mut sinks: Vec<Box<dyn Write + Send>> = vec![Box::new(BoundedLog::new(log))];
            if self.verbose {
                sinks.push(Box::new(std::io::stderr()));
            }
            relays.push(Relay::start(&fifo, sinks, Some(tail.clone()))?);
            self.spec.console = Console::File(fifo);
            for (name, sink) in [("stdout", self.stdout), ("stderr", self.stderr)] {
                let fifo = self.fifo(name)?;
                let mut out: Vec<Box<dyn Write + Send>> = match sink {
                    Sink::Stdout => vec![Box::new(std::io::stdout())],
                    Sink::Stderr => vec![Box::new(std::io::stderr())],
                    Sink::TestStdout => {
                        vec![Box::new(std::io::stdout()), Box::new(FailureEcho::new(std::io::stderr()))]
                    }
                    Sink::WatchOnly => vec![],
                };
                if let Some(watch) = &self.watch {
                    out.push(Box::new(WatchSink { watch: watch.clone(), stderr: name == "stderr" }));
                }
                relays.push(Relay::start(&fifo, out, None)?);
                self.spec.ports.push(Port { name: name.to_string(), path: fifo });
            }
            ports = (Some("stdout".to_string()), Some("stderr".to_string()));
        }

        let socket = match &self.attach {
            Some(_) => crate::vm::attach::Socket::new(&self.runtime, "attach.sock")?,
            None => None,
        };
        let registration = match (&self.attach, &socket) {
            (Some(attachable), Some(socket)) => {
                self.spec.attach = Some(socket.path.clone());
                let id = crate::vm::attach::id(&self.label);
                Some(crate::vm::attach::Registration::new(attachable, &id, &socket.path)?)
            }
            _ => None,
        };
        let attach = registration.is_some();
        // Only the RAM and the devices are saved: a VM that writes a disk is not.
        let saver = self.save_failure.take().filter(|_| self.spec.disks.iter().all(|d| d.readonly));
        let mut extra_args = Vec::new();
        if let Some(saver) = &saver {
            // The failure point's handshake is the snapshot point's, on the same port.
            self.spec.snapshot_port.get_or_insert_with(|| self.runtime.join("snapshot.sock"));
            extra_args.push("-monitor".into());
            extra_args.push(qemu::path_arg("unix:", &saver.monitor));
            extra_args.last_mut().expect("pushed").push(",server=on,wait=off");
        }
        let (store, warmth) = match self.snapshots.take() {
            Some((store, warmth)) => (Some(store), warmth),
            None => (None, crate::vm::snapshot::Warmth::Cold),
        };
        let warm = match &store {
            Some(store) if self.restore.is_none() => {
                crate::vm::snapshot::prepare(store, &mut self.spec, &self.runtime, warmth)?
            }
            _ => None,
        };
        let no_virtiofs = if warm.is_some() {
            Some("the VM is restored from a snapshot, which virtiofs would block")
        } else if self.restore.is_some() {
            Some("the VM is a saved failure restored, which virtiofs would block")
        } else if saver.is_some() {
            Some("a failure is saved for replay, which virtiofs would block (`--no-replay` allows it)")
        } else {
            None
        };
        let servers = self.serve_large_shares(store.as_ref(), no_virtiofs)?;
        let virtiofs_tags = servers.as_ref().map(|s| s.tags.clone()).unwrap_or_default();
        if let Some(saver) = &saver {
            saver.set_spec(&self.spec);
        }
        let finish_request = {
            let saver = saver.clone();
            move |request: &mut Request| {
                crate::vm::virtiofs::retarget(&mut request.mounts, &virtiofs_tags);
                (request.stdout_port, request.stderr_port) = ports.clone();
                request.attach = attach;
                if let Some(saver) = &saver {
                    request.save_failure = true;
                    saver.set_request(request);
                }
            }
        };
        let mut later = match self.request {
            GuestRequest::Now(request) => {
                let mut request = *request;
                finish_request(&mut request);
                write_request(&self.xchg, &request)?;
                None
            }
            GuestRequest::Later(_, make) => Some(make),
        };
        let status_path = self.xchg.join(guest::STATUS_FILE);
        let _ = fs::remove_file(&status_path);

        let mut args = qemu::args(&self.spec);
        args.extend(extra_args.iter().cloned());
        if self.verbose {
            let shown: Vec<String> = args.iter().map(|a| crate::process::shell_quote(&a.to_string_lossy())).collect();
            eprintln!("+ {} {}", crate::debian::qemu::known_for(self.spec.arch).display(), shown.join(" "));
        }
        let saved_tty = interactive.then(save_terminal).flatten();
        let started = Instant::now();
        let xchg = self.xchg.clone();
        let saver_thread = Arc::new(Mutex::new(None));
        let mut started_fn = {
            let (saver, saver_thread) = (saver.clone(), saver_thread.clone());
            let socket = self.spec.snapshot_port.clone();
            let replay = self.restore.is_some();
            move || {
                if replay {
                    // Called once the guest has taken `go`.
                    eprintln!("restored in {:.2} s", started.elapsed().as_secs_f64());
                }
                if let Some(make) = later.take() {
                    let mut request = make()?;
                    finish_request(&mut request);
                    write_request(&xchg, &request)?;
                }
                if let (Some(saver), Some(socket)) = (&saver, &socket) {
                    *saver_thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(saver.start(socket.clone()));
                }
                Ok(())
            }
        };
        let mut ended = None;
        if let Some(restore) = self.restore.take() {
            let mut restore_args = args.clone();
            restore_args.extend(crate::vm::snapshot::restore_args());
            match run_qemu(self.spec.arch, &restore_args, interactive, None, None, Some(&restore), &mut started_fn) {
                Err(e) if e.downcast_ref::<WarmFailed>().is_some() => bail!("the saved VM did not load: {e:#}"),
                other => ended = Some(other),
            }
        } else if let Some(warm) = warm {
            let mut warm_args = args.clone();
            warm_args.extend(crate::vm::snapshot::restore_args());
            let restore = Some(&warm.restore);
            match run_qemu(
                self.spec.arch,
                &warm_args,
                interactive,
                self.timeout,
                self.watch.as_deref(),
                restore,
                &mut started_fn,
            ) {
                Err(e) if e.downcast_ref::<WarmFailed>().is_some() => {
                    crate::vm::snapshot::discard(&warm, &format!("{e:#}"));
                    self.spec = warm.cold.clone();
                    if let Some(saver) = &saver {
                        saver.set_spec(&self.spec);
                    }
                }
                other => ended = Some(other),
            }
        }
        let ended = match ended {
            Some(ended) => ended,
            None => {
                let mut args = qemu::args(&self.spec);
                args.extend(extra_args);
                run_qemu(self.spec.arch, &args, interactive, self.timeout, self.watch.as_deref(), None, &mut started_fn)
            }
        };
        // Not waited for: its outcome is set before the guest went on to end the run, and
        // the thread ends by itself (stopped, or QEMU's socket gone).
        if let Some(saver) = &saver {
            saver.stop();
            drop(saver_thread.lock().unwrap_or_else(|e| e.into_inner()).take());
        }
        if let Some(t) = saved_tty {
            restore_terminal(&t);
        }
        drop(servers);
        drop(registration);
        drop(socket);
        for relay in relays {
            relay.finish();
        }
        let tail_text = console_tail(&tail);
        let (qemu_status, qemu_stderr) = match ended {
            Ok(QemuEnd::Exited(status, stderr)) => (status, stderr),
            Ok(QemuEnd::TimedOut) => {
                return Err(Failure {
                    code: EXIT_TIMEOUT,
                    message: format!(
                        "the VM ran past its timeout of {}s and was killed{}",
                        self.timeout.map(|t| t.as_secs_f64()).unwrap_or_default(),
                        console_note(interactive, &tail_text, &log_path)
                    ),
                }
                .into())
            }
            Ok(QemuEnd::Expired(message)) => {
                return Err(Failure {
                    code: EXIT_TIMEOUT,
                    message: format!("{message}{}", console_note(interactive, &tail_text, &log_path)),
                }
                .into())
            }
            Ok(QemuEnd::Interrupted(sig)) => {
                let _ = fs::remove_file(&log_path);
                return Err(Failure {
                    code: 128 + sig as i32,
                    message: format!("interrupted by {sig}: the VM was stopped"),
                }
                .into());
            }
            Err(e) => return Err(e),
        };
        let elapsed = started.elapsed();
        match read_status(&self.xchg) {
            StatusFile::Found(bytes) => match Status::decode(&bytes) {
                Ok(Status::Error(msg)) => {
                    bail!("the guest helper failed: {msg}{}", console_note(interactive, &tail_text, &log_path))
                }
                Ok(status) => {
                    let _ = fs::remove_file(&log_path);
                    if self.verbose {
                        eprintln!("vm: {} in {:.2}s", status.encode().trim_end(), elapsed.as_secs_f64());
                    }
                    Ok(status)
                }
                Err(why) => {
                    bail!(
                        "the guest wrote an invalid status: {why}{}",
                        console_note(interactive, &tail_text, &log_path)
                    )
                }
            },
            StatusFile::Refused(why) => bail!(
                "the guest left an unusable status file (`{}` in the exchange directory): {why}; it was not read{}",
                guest::STATUS_FILE,
                console_note(interactive, &tail_text, &log_path)
            ),
            StatusFile::Missing if interactive && qemu_status.success() => {
                eprintln!("the VM ended without the guest reporting a status (Ctrl-a x, or a guest crash)");
                Ok(Status::Exited(0))
            }
            StatusFile::Missing if !qemu_status.success() => bail!(
                "QEMU failed ({qemu_status}): {}\n(is the `{}` package installed and working?){}",
                qemu_stderr.trim(),
                host::QEMU_SYSTEM.package,
                console_note(interactive, &tail_text, &log_path)
            ),
            StatusFile::Missing => bail!(
                "the guest stopped without reporting a status (kernel panic, a crash of the guest helper, or \
                    out of memory?){}",
                console_note(interactive, &tail_text, &log_path)
            ),
        }
    }

    /// Moves [`VmRun::large_shares`] to virtiofs unless `no_virtiofs` says why not (a VM
    /// restored or saved) and a virtiofsd is found in `store`'s way; says which, once, when verbose.
    fn serve_large_shares(
        &mut self,
        store: Option<&crate::store::Store>,
        no_virtiofs: Option<&str>,
    ) -> Result<Option<crate::vm::virtiofs::Servers>> {
        let tags = std::mem::take(&mut self.large_shares);
        if tags.is_empty() {
            return Ok(None);
        }
        let found = match (no_virtiofs, store) {
            (Some(why), _) => Err(why.to_string()),
            (None, Some(store)) => crate::vm::virtiofs::virtiofsd(store),
            (None, None) => Err("no store to find the store QEMU's virtiofsd in".to_string()),
        };
        let virtiofsd = match found {
            Ok(virtiofsd) => virtiofsd,
            Err(why) => {
                if self.verbose {
                    eprintln!("share {}: 9p ({why})", tags.join(", "));
                }
                return Ok(None);
            }
        };
        let servers = crate::vm::virtiofs::serve(&virtiofsd, &mut self.spec, &tags, &self.runtime, self.verbose)?;
        if self.verbose {
            // The program itself (the store's runs through the loader, named first).
            let program = virtiofsd.argv.last().map(|p| p.to_string_lossy()).unwrap_or_default();
            let left: Vec<&String> = tags.iter().filter(|t| !servers.tags.contains(t)).collect();
            eprintln!("share {}: virtiofs ({program})", servers.tags.join(", "));
            if !left.is_empty() {
                eprintln!("share {left:?}: 9p (not read-only, or no socket path fits)");
            }
        }
        Ok(Some(servers))
    }

    fn fifo(&self, name: &str) -> Result<PathBuf> {
        let path = self.runtime.join(name);
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .with_context(|| format!("creating FIFO `{}`", path.display()))?;
        Ok(path)
    }
}

/// The console's last lines for an error message (none for an interactive run: they
/// were on the terminal).
fn console_note(interactive: bool, tail: &str, log: &Path) -> String {
    if interactive {
        return String::new();
    }
    format!("\nlast console lines (full log: {}):\n{tail}", log.display())
}

/// What the guest left where its status goes.
#[derive(Debug, PartialEq, Eq)]
enum StatusFile {
    /// Nothing there.
    Missing,
    /// A regular file's first [`guest::STATUS_MAX_BYTES`] + 1 bytes (one more than is
    /// valid, so an oversized status is seen as one).
    Found(Vec<u8>),
    /// Something that is not read (a symbolic link, a directory, a FIFO, a device), and why.
    Refused(String),
}

/// Reads the status the guest wrote, trusting nothing about it: the guest owns the
/// exchange directory. The file is found relative to the directory (`openat`), never
/// through a symbolic link (`O_NOFOLLOW`), only if it is a regular file (checked before
/// opening, so no device is ever opened, and again on the open file), without waiting
/// (`O_NONBLOCK`: a FIFO cannot block), and with a size cap. QEMU has exited, so
/// nothing changes it meanwhile.
fn read_status(xchg: &Path) -> StatusFile {
    use crate::store::{DirFd, Kind};
    use nix::sys::stat::SFlag;

    let name = std::ffi::OsStr::new(guest::STATUS_FILE);
    let dir = match DirFd::open(xchg) {
        Ok(dir) => dir,
        Err(e) => return StatusFile::Refused(format!("cannot open the exchange directory: {e}")),
    };
    match dir.stat(name) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return StatusFile::Missing,
        Err(e) => return StatusFile::Refused(format!("cannot examine it: {e}")),
        Ok(st) if Kind::of(&st) != Kind::File => {
            let why = match SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT {
                SFlag::S_IFLNK => "it is a symbolic link",
                SFlag::S_IFDIR => "it is a directory",
                SFlag::S_IFIFO => "it is a FIFO",
                SFlag::S_IFCHR | SFlag::S_IFBLK => "it is a device node",
                SFlag::S_IFSOCK => "it is a socket",
                _ => "it is not a regular file",
            };
            return StatusFile::Refused(why.into());
        }
        Ok(_) => {}
    }
    // Opened without following a link or blocking, and checked again on the open file.
    let file = match dir.open_file(name) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return StatusFile::Missing,
        Err(e) => return StatusFile::Refused(format!("cannot open it: {e}")),
    };
    // Through the mapped share, a link the guest made is a file holding its text.
    match crate::store::guest_kind(&file, 0o600) {
        Ok((Kind::File, _)) => {}
        Ok((Kind::Symlink, _)) => return StatusFile::Refused("it is a symbolic link".into()),
        Ok(_) => return StatusFile::Refused("it is not a regular file".into()),
        Err(e) => return StatusFile::Refused(format!("cannot examine it: {e}")),
    }
    let mut bytes = Vec::new();
    match file.take(guest::STATUS_MAX_BYTES as u64 + 1).read_to_end(&mut bytes) {
        Ok(_) => StatusFile::Found(bytes),
        Err(e) => StatusFile::Refused(format!("cannot read it: {e}")),
    }
}

/// The last lines of the console a [`Relay`] kept in `tail`, for an error message.
pub(crate) fn console_tail(tail: &Mutex<VecDeque<u8>>) -> String {
    let bytes: Vec<u8> = tail.lock().map(|t| t.iter().copied().collect()).unwrap_or_default();
    tail_lines(&bytes)
}

/// The last lines of console output, each shown as `  | LINE`, for an error message.
pub fn tail_lines(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(CONSOLE_TAIL_LINES);
    lines[start..]
        .iter()
        .map(|l| format!("  | {}", escape_controls(l.trim_end_matches('\r'))))
        .collect::<Vec<_>>()
        .join("\n")
}

/// As [`escape_controls`], line by line.
fn escape_controls_keeping_lines(s: &str) -> String {
    s.lines().map(|l| escape_controls(l.trim_end_matches('\r'))).collect::<Vec<_>>().join("\n")
}

/// The guest's text with control characters (a terminal's escape sequences among them)
/// escaped, tabs kept, for showing on the host's terminal.
fn escape_controls(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() && c != '\t' { c.escape_default().to_string() } else { c.to_string() })
        .collect()
}

/// A console log of bounded size, whatever the guest prints: the first [`LOG_HEAD`]
/// bytes (the boot) as they come, then only the last [`LOG_TAIL`] bytes, written with a
/// note of what was left out when the log is dropped.
pub(crate) struct BoundedLog {
    file: File,
    written: u64,
    tail: VecDeque<u8>,
    dropped: u64,
}

const LOG_HEAD: u64 = 256 * 1024;
const LOG_TAIL: usize = 1024 * 1024;

impl BoundedLog {
    pub(crate) fn new(file: File) -> BoundedLog {
        BoundedLog { file, written: 0, tail: VecDeque::new(), dropped: 0 }
    }
}

impl Write for BoundedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let head = (LOG_HEAD.saturating_sub(self.written) as usize).min(buf.len());
        self.file.write_all(&buf[..head])?;
        self.written += head as u64;
        self.tail.extend(&buf[head..]);
        let excess = self.tail.len().saturating_sub(LOG_TAIL);
        self.tail.drain(..excess);
        self.dropped += excess as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl Drop for BoundedLog {
    fn drop(&mut self) {
        if self.dropped > 0 {
            let _ = writeln!(self.file, "\n[... {} bytes of console output not kept ...]", self.dropped);
        }
        let (a, b) = self.tail.as_slices();
        let _ = self.file.write_all(a).and_then(|()| self.file.write_all(b));
    }
}

/// Copies what QEMU writes into a FIFO to the given sinks, on a thread.
///
/// Both ends are opened here, before QEMU starts: the read end without blocking, then
/// a write end that xtask keeps until QEMU has exited. So QEMU's own open never waits,
/// the reader never sees end-of-file before QEMU has written everything, and it does
/// see it once QEMU is gone, whether or not QEMU ever opened the FIFO.
pub(crate) struct Relay {
    keeper: File,
    thread: JoinHandle<()>,
}

impl Relay {
    pub(crate) fn start(
        fifo: &Path,
        mut sinks: Vec<Box<dyn Write + Send>>,
        tail: Option<Arc<Mutex<VecDeque<u8>>>>,
    ) -> Result<Relay> {
        let mut reader = OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(fifo)
            .with_context(|| format!("opening FIFO `{}`", fifo.display()))?;
        let keeper =
            OpenOptions::new().write(true).open(fifo).with_context(|| format!("opening FIFO `{}`", fifo.display()))?;
        let flags = nix::fcntl::fcntl(reader.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)?;
        let blocking = nix::fcntl::OFlag::from_bits_truncate(flags) & !nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(reader.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(blocking))?;
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match reader.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                // A sink that fails (a closed pipe) is dropped; the others go on.
                sinks.retain_mut(|s| s.write_all(&buf[..n]).and_then(|()| s.flush()).is_ok());
                if let Some(tail) = &tail {
                    if let Ok(mut t) = tail.lock() {
                        t.extend(&buf[..n]);
                        let excess = t.len().saturating_sub(CONSOLE_TAIL_BYTES);
                        t.drain(..excess);
                    }
                }
            }
        });
        Ok(Relay { keeper, thread })
    }

    /// Call once QEMU has exited: drains what is left and waits for the thread.
    pub(crate) fn finish(self) {
        drop(self.keeper);
        let _ = self.thread.join();
    }
}

enum QemuEnd {
    Exited(ExitStatus, String),
    TimedOut,
    /// Ended by a [`Watch`], with its message.
    Expired(String),
    Interrupted(Signal),
}

/// The signal that asked xtask to stop (0 = none), set by the handlers below.
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

fn install_signal_handlers() -> Result<()> {
    static INSTALLED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
                let n = sig as i32;
                // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
                unsafe { signal_hook::low_level::register(n, move || STOP_SIGNAL.store(n, Ordering::SeqCst)) }
                    .map_err(|e| format!("installing a handler for {sig}: {e}"))?;
            }
            Ok(())
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// Kills and reaps QEMU when dropped, unless it has already been reaped.
struct QemuGuard {
    pid: Pid,
    done: mpsc::Receiver<std::io::Result<ExitStatus>>,
    reaped: bool,
}

impl Drop for QemuGuard {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = kill(self.pid, Signal::SIGKILL);
            let _ = self.done.recv();
        }
    }
}

/// Writes the request where the guest helper reads it, whole or not at all (it may be
/// looking for it already).
pub fn write_request(xchg: &Path, request: &Request) -> Result<()> {
    // The request may hold secrets (`--env` values): it is the user's alone.
    crate::store::write_private_atomically(&xchg.join(guest::REQUEST_FILE), &serde_json::to_vec_pretty(request)?)
}

/// Runs QEMU under a guard until it ends, calling `started` once it is running (an
/// error there stops QEMU); the timeout counts from `started`'s return.
fn run_qemu(
    arch: os_configs::Arch,
    args: &[std::ffi::OsString],
    interactive: bool,
    timeout: Option<Duration>,
    watch: Option<&dyn Watch>,
    warm: Option<&crate::vm::snapshot::Restore>,
    started: &mut dyn FnMut() -> Result<()>,
) -> Result<QemuEnd> {
    install_signal_handlers()?;
    let mut cmd = qemu_command(arch, args, interactive);
    let restore = match warm {
        Some(w) => Some(RestoreFds::install(&mut cmd, &w.state).map_err(|e| WarmFailed(format!("{e:#}")))?),
        None => None,
    };
    let mut child = cmd.spawn().with_context(|| {
        format!("starting `{}` (install Debian's `{}`)", host::QEMU_SYSTEM.program, host::QEMU_SYSTEM.package)
    })?;
    let mut stderr_pipe = child.stderr.take().context("QEMU's stderr")?;
    // QEMU's messages, drained to the end (QEMU never blocks on a full pipe) and kept up
    // to a cap, for an error message.
    let stderr_thread = std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut buf = [0u8; 8192];
        while let Ok(n @ 1..) = stderr_pipe.read(&mut buf) {
            let room = QEMU_STDERR_BYTES.saturating_sub(kept.len());
            kept.extend_from_slice(&buf[..n.min(room)]);
        }
        escape_controls_keeping_lines(&String::from_utf8_lossy(&kept))
    });
    let (tx, rx) = mpsc::channel();
    let mut guard = QemuGuard { pid: Pid::from_raw(child.id() as i32), done: rx, reaped: false };
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    if let (Some(warm), Some(restore)) = (warm, restore) {
        let handshake = restore.handshake(warm, || kill(guard.pid, None).is_ok());
        if let Err(e) = handshake {
            drop(guard);
            let stderr = stderr_thread.join().unwrap_or_default();
            return Err(WarmFailed(format!("{e:#}; QEMU said: {}", stderr.trim())).into());
        }
    }
    // On an error the guard, dropped, stops QEMU; a stop signal that came meanwhile
    // (Ctrl-C also ends a cargo build in progress) is what it is reported as.
    if let Err(e) = started() {
        drop(guard);
        let sig = STOP_SIGNAL.load(Ordering::SeqCst);
        if sig != 0 {
            return Ok(QemuEnd::Interrupted(Signal::try_from(sig).unwrap_or(Signal::SIGINT)));
        }
        return Err(e);
    }
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        match guard.done.recv_timeout(Duration::from_millis(20)) {
            Ok(status) => {
                guard.reaped = true;
                let status = status.context("waiting for QEMU")?;
                let stderr = stderr_thread.join().unwrap_or_default();
                return Ok(QemuEnd::Exited(status, stderr));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => bail!("lost track of the QEMU process"),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        let sig = STOP_SIGNAL.load(Ordering::SeqCst);
        if sig != 0 {
            drop(guard);
            return Ok(QemuEnd::Interrupted(Signal::try_from(sig).unwrap_or(Signal::SIGINT)));
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            drop(guard);
            return Ok(QemuEnd::TimedOut);
        }
        if let Some(message) = watch.and_then(|w| w.expired()) {
            drop(guard);
            return Ok(QemuEnd::Expired(message));
        }
    }
}

/// The descriptors a restoring QEMU starts with: the saved state on descriptor 3, and a
/// monitor on descriptor 4 (one end of a socket pair; [`crate::vm::snapshot::restore_args`])
/// through which it is told to load it; ours is the other end.
pub struct RestoreFds {
    _state: File,
    ours: std::os::unix::net::UnixStream,
    _theirs: std::os::unix::net::UnixStream,
}

impl RestoreFds {
    /// Opens `state` and has `cmd` start with the descriptors in place.
    pub fn install(cmd: &mut Command, state: &Path) -> Result<RestoreFds> {
        let file = File::open(state).with_context(|| format!("opening the saved state `{}`", state.display()))?;
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().context("a socket pair for QEMU's monitor")?;
        let fds = [(file.as_raw_fd(), 3), (theirs.as_raw_fd(), crate::vm::snapshot::MONITOR_FD)];
        // SAFETY: fcntl and dup2 are async-signal-safe. Each descriptor is first copied
        // above the targets, so that placing one cannot close the other.
        unsafe {
            cmd.pre_exec(move || {
                let mut high = [0; 2];
                for (i, (fd, _)) in fds.iter().enumerate() {
                    high[i] = nix::libc::fcntl(*fd, nix::libc::F_DUPFD_CLOEXEC, 10);
                    if high[i] < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for (i, (_, target)) in fds.iter().enumerate() {
                    if nix::libc::dup2(high[i], *target) != *target {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        Ok(RestoreFds { _state: file, ours, _theirs: theirs })
    }

    /// Once QEMU runs: has it load the state, waits (a minute at most, while `alive`) for
    /// the guest to say it waits, and tells it to go on.
    pub fn handshake(self, restore: &crate::vm::snapshot::Restore, alive: impl FnMut() -> bool) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        crate::vm::snapshot::start_restore(self.ours)?;
        let mut stream = crate::vm::snapshot::wait_for_waiting(&restore.socket, restore.waiting, deadline, alive)?;
        crate::vm::snapshot::send_go(&mut stream)
    }
}

/// QEMU's command with the rules every VM's QEMU runs under: it dies with xtask (even
/// a SIGKILLed one), it cannot `mknod` ([`deny_mknod`]), and unless `interactive` it is
/// in its own process group with stdin and stdout closed, so Ctrl-C reaches only xtask,
/// which then stops it (QEMU itself would exit 0 on SIGINT, as if all went well).
/// stderr is piped.
pub fn qemu_command(arch: os_configs::Arch, args: &[std::ffi::OsString], interactive: bool) -> Command {
    // QEMU dies with xtask, even when xtask is SIGKILLed.
    let mut cmd = crate::process::command(crate::debian::qemu::known_for(arch));
    cmd.args(args).stderr(Stdio::piped());
    if !interactive {
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
    }
    // SAFETY: seccomp (with a static filter) and setpgid are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            // The guest must not make device nodes, FIFOs or sockets on the host through
            // its 9p shares, whoever runs QEMU: it never gets to call mknod.
            deny_mknod()?;
            // Off the terminal's process group, Ctrl-C reaches only xtask, which then
            // stops QEMU (QEMU itself would exit 0 on SIGINT, as if all went well).
            if !interactive && nix::libc::setpgid(0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// Installs a seccomp filter on the calling process (and so on what it executes) that
/// fails `mknod` and `mknodat` with `EPERM`. QEMU's 9p server creates a guest's device
/// nodes, FIFOs and sockets with `mknodat`, and needs it for nothing else; as root it would
/// make real device nodes on the host. Async-signal-safe: for `pre_exec`.
pub fn deny_mknod() -> std::io::Result<()> {
    use nix::libc::{
        sock_filter, sock_fprog, BPF_ABS, BPF_JEQ, BPF_JMP, BPF_K, BPF_LD, BPF_RET, BPF_W, SECCOMP_RET_ALLOW,
        SECCOMP_RET_ERRNO,
    };
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    const fn stmt(code: u32, k: u32) -> sock_filter {
        sock_filter { code: code as u16, jt: 0, jf: 0, k }
    }
    const fn jump(k: u32, jt: u8, jf: u8) -> sock_filter {
        sock_filter { code: (BPF_JMP | BPF_JEQ | BPF_K) as u16, jt, jf, k }
    }
    static FILTER: [sock_filter; 7] = [
        // seccomp_data: nr at offset 0, arch at 4.
        stmt(BPF_LD | BPF_W | BPF_ABS, 4),
        jump(AUDIT_ARCH_X86_64, 0, 3),
        stmt(BPF_LD | BPF_W | BPF_ABS, 0),
        jump(nix::libc::SYS_mknod as u32, 2, 0),
        jump(nix::libc::SYS_mknodat as u32, 1, 0),
        stmt(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        stmt(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | nix::libc::EPERM as u32),
    ];
    let prog = sock_fprog { len: FILTER.len() as u16, filter: FILTER.as_ptr() as *mut sock_filter };
    // SAFETY: plain system calls; `prog` points to a static filter that outlives them.
    unsafe {
        // Lets an unprivileged process install the filter; QEMU gains no privileges anyway.
        if nix::libc::prctl(nix::libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if nix::libc::prctl(nix::libc::PR_SET_SECCOMP, nix::libc::SECCOMP_MODE_FILTER, &prog as *const sock_fprog) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn save_terminal() -> Option<nix::sys::termios::Termios> {
    nix::sys::termios::tcgetattr(std::io::stdin()).ok()
}

fn restore_terminal(t: &nix::sys::termios::Termios) {
    let _ = nix::sys::termios::tcsetattr(std::io::stdin(), nix::sys::termios::SetArg::TCSANOW, t);
}

/// The one mapping from a guest's status to xtask's exit status, as a shell maps a
/// command's: its exit code; 128 + the signal that killed it; 1 when the guest helper
/// itself failed. With it, what to say when the status is not 0 (`what` names the
/// command: "the build command", "`uname -r`").
pub fn exit_status(status: &Status, what: &str) -> (i32, Option<String>) {
    match status {
        Status::Exited(0) => (0, None),
        Status::Exited(code) => (*code, Some(format!("{what} exited with status {code}"))),
        Status::Signaled(sig) => {
            let name = nix::sys::signal::Signal::try_from(*sig).map(|s| s.as_str()).unwrap_or("?");
            (128 + sig, Some(format!("{what} was killed by signal {sig} ({name}) in the guest")))
        }
        Status::Error(msg) => (1, Some(format!("the guest helper failed: {msg}"))),
    }
}

/// [`exit_status`] as a result: `Ok` for status 0, else a [`Failure`] with that exit
/// status, its message followed by `then` ("; nothing was stored").
pub fn require_success(status: &Status, what: &str, then: &str) -> Result<()> {
    match exit_status(status, what) {
        (0, _) => Ok(()),
        (code, message) => Err(Failure { code, message: format!("{}{then}", message.unwrap_or_default()) }.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_reports_are_copied_and_nothing_else() {
        let report = "running 2 tests\ntest a ... ok\ntest b ... FAILED\n\nfailures:\n\n---- b stdout ----\n\n\
                      thread 'b' panicked at t.rs:1:1:\nboom\n\n\nfailures:\n    b\n\ntest result: FAILED. 1 passed\n";
        let mut echo = FailureEcho::new(Vec::new());
        // In pieces, as a pipe gives it.
        for chunk in report.as_bytes().chunks(7) {
            echo.write_all(chunk).unwrap();
        }
        assert_eq!(
            String::from_utf8(echo.out).unwrap(),
            "---- b stdout ----\n\nthread 'b' panicked at t.rs:1:1:\nboom\n\n\n"
        );
        let mut long = FailureEcho::new(Vec::new());
        long.write_all(&vec![b'x'; 200_000]).unwrap();
        assert!(long.line.len() < 64 * 1024 && long.out.is_empty());
    }

    #[test]
    fn quotes_shell_words() {
        assert_eq!(crate::process::shell_quote("-m"), "-m");
        assert_eq!(crate::process::shell_quote("a b"), "'a b'");
        assert_eq!(crate::process::shell_quote("it's"), r"'it'\''s'");
        assert_eq!(crate::process::shell_quote(""), "''");
    }

    /// Under the filter neither root nor an unprivileged user can make a device node, a
    /// FIFO or a socket node (what QEMU's 9p server would make for a guest); without it
    /// they can (the control). Each try runs in a child that reports what it made in its
    /// exit status.
    #[test]
    fn the_qemu_filter_denies_special_files_to_root_and_to_other_users() {
        use nix::libc;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
        let paths: Vec<std::ffi::CString> = ["dev", "fifo", "sock"]
            .iter()
            .map(|n| std::ffi::CString::new(dir.path().join(n).into_os_string().into_encoded_bytes()).unwrap())
            .collect();
        let made = |uid: Option<u32>, filtered: bool| -> i32 {
            let paths = paths.clone();
            let mut cmd = Command::new("true");
            // SAFETY: only async-signal-safe calls (setgid, setuid, seccomp, mknod, unlink, _exit).
            unsafe {
                cmd.pre_exec(move || {
                    if let Some(uid) = uid {
                        if libc::setgid(uid) != 0 || libc::setuid(uid) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    if filtered {
                        deny_mknod()?;
                    }
                    let mut mask = 0;
                    let kinds = [libc::S_IFCHR, libc::S_IFIFO, libc::S_IFSOCK];
                    for (i, (path, kind)) in paths.iter().zip(kinds).enumerate() {
                        if libc::mknod(path.as_ptr(), kind | 0o600, libc::makedev(1, 3)) == 0 {
                            mask |= 1 << i;
                            libc::unlink(path.as_ptr());
                        }
                    }
                    libc::_exit(mask)
                });
            }
            cmd.status().expect("starting a child").code().unwrap()
        };
        assert!(nix::unistd::geteuid().is_root(), "this test runs as root (to try both users)");
        assert_eq!(made(None, false), 0b111, "the control: root makes all three without the filter");
        assert_eq!(made(Some(65534), false), 0b110, "the control: a user makes FIFOs and sockets");
        assert_eq!(made(None, true), 0, "root made a special file under the filter");
        assert_eq!(made(Some(65534), true), 0, "a user made a special file under the filter");
    }

    #[test]
    fn the_console_log_is_bounded_and_keeps_its_head_and_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let mut log = BoundedLog::new(File::create(&path).unwrap());
        for i in 0..100_000u32 {
            log.write_all(format!("line {i:08}\n").as_bytes()).unwrap();
        }
        drop(log);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.len() as u64 <= LOG_HEAD + LOG_TAIL as u64 + 100, "{} bytes", text.len());
        assert!(text.starts_with("line 00000000\n"));
        assert!(text.ends_with("line 00099999\n"));
        assert!(text.contains("bytes of console output not kept"));
    }

    #[test]
    fn console_tail_keeps_last_lines() {
        let tail = Mutex::new((0..40).flat_map(|i| format!("line {i}\r\n").into_bytes()).collect::<VecDeque<u8>>());
        let text = console_tail(&tail);
        assert_eq!(text.lines().count(), CONSOLE_TAIL_LINES);
        assert!(text.ends_with("  | line 39"));
    }

    #[test]
    fn status_is_read_only_from_a_regular_file_and_capped() {
        let dir = tempfile::tempdir().unwrap();
        let status = dir.path().join(guest::STATUS_FILE);
        assert_eq!(read_status(dir.path()), StatusFile::Missing);
        fs::write(&status, "exit 3\n").unwrap();
        assert_eq!(read_status(dir.path()), StatusFile::Found(b"exit 3\n".to_vec()));
        fs::write(&status, vec![b'a'; 1 << 20]).unwrap();
        assert_eq!(read_status(dir.path()), StatusFile::Found(vec![b'a'; guest::STATUS_MAX_BYTES + 1]));
        fs::remove_file(&status).unwrap();

        let secret = dir.path().join("secret");
        fs::write(&secret, "exit 0\n").unwrap();
        std::os::unix::fs::symlink(&secret, &status).unwrap();
        assert_eq!(read_status(dir.path()), StatusFile::Refused("it is a symbolic link".into()));
        fs::remove_file(&status).unwrap();

        fs::create_dir(&status).unwrap();
        assert_eq!(read_status(dir.path()), StatusFile::Refused("it is a directory".into()));
        fs::remove_dir(&status).unwrap();

        // A link the guest made through the mapped share: a file holding the link's text.
        fs::write(&status, secret.as_os_str().as_encoded_bytes()).unwrap();
        let c = std::ffi::CString::new(status.as_os_str().as_encoded_bytes()).unwrap();
        let word = (nix::libc::S_IFLNK | 0o777).to_le_bytes();
        // SAFETY: plain system call with NUL-terminated strings and a 4-byte buffer.
        let set = unsafe {
            nix::libc::setxattr(c.as_ptr(), c"user.virtfs.mode".as_ptr(), word.as_ptr().cast(), word.len(), 0)
        };
        assert_eq!(set, 0, "{}", std::io::Error::last_os_error());
        assert_eq!(read_status(dir.path()), StatusFile::Refused("it is a symbolic link".into()));
        fs::remove_file(&status).unwrap();

        // No writer ever opens it: a blocking open would wait for ever.
        nix::unistd::mkfifo(&status, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert_eq!(read_status(dir.path()), StatusFile::Refused("it is a FIFO".into()));
    }

    #[test]
    fn qemu_messages_keep_their_lines_and_lose_control_characters() {
        assert_eq!(escape_controls_keeping_lines("a\r\nb\x1b[0m\n"), "a\nb\\u{1b}[0m");
    }

    #[test]
    fn console_lines_have_control_characters_escaped() {
        let tail = Mutex::new(b"ok\ttab\n\x1b]0;owned\x07\x1b[2J\r\n".iter().copied().collect::<VecDeque<u8>>());
        assert_eq!(console_tail(&tail), "  | ok\ttab\n  | \\u{1b}]0;owned\\u{7}\\u{1b}[2J");
    }
}
