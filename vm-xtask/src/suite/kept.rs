//! A test VM kept for one cargo command: rustdoc runs every doctest through cargo's
//! runner, one binary each, so without it each doctest boots a VM of its own. A *keeper*
//! (this program again, detached) boots the system once in serve mode
//! ([`crate::vm::scenario::Node`]), shares the workspace as `test` does, and listens on a
//! unix socket in a private directory under the target directory, keyed by the system,
//! the options, the workspace and the cargo process (its PID and start time). `test
//! --doc` starts it together with cargo ([`start_ahead`]), so that the VM boots while
//! cargo builds; else the first runner call that rustdoc makes starts it. A keeper names
//! itself in its directory: a runner call finding it still booting waits for it. Each
//! runner call, one at a time under that directory's lock, puts its binary in the
//! keeper's share of binaries, asks the keeper to run it, and prints its output and
//! status. The keeper adds the libraries the binary
//! loads to the store (each file read, hashed and stored once while the keeper lives),
//! and the runner calls find the workspace once per package and cargo process: what a
//! call costs on the host is small beside the doctest's run.
//! The keeper powers the VM off and removes its directory once that cargo process has
//! ended.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use guest::control::{base64_decode, FromGuest, ToGuest};
use guest::{Mode, MountSpec};

use super::{workspace_mounts, Shared, TestBinary};
use crate::lower::{packages, system};
use crate::machine::{Machine, VmOpts};
use crate::process::{shell_quote, stat};
use crate::vm::scenario::{self, Node};
use crate::Workspace;
use os_configs::System;

/// Set in the keeper's environment: its directory.
const KEEPER_ENV: &str = "XTASK_TEST_KEEPER";
/// Set in the keeper's environment: the cargo process it serves, `PID:START`.
const CARGO_ENV: &str = "XTASK_TEST_KEEPER_CARGO";
/// The 9p tag and the guest's mount point of the kept VM's binaries.
const BINS_TAG: &str = "doctest-bins";
const BINS_MOUNT: &str = "/run/xtask-doctests";
/// How long a runner waits for a keeper to come up (a cold boot, packages made first).
const START_TIMEOUT: Duration = Duration::from_secs(600);

/// A process by its PID and start time (clock ticks after boot), which a reused PID
/// does not share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Process {
    pub pid: i32,
    pub start: u64,
}

impl Process {
    fn alive(self) -> bool {
        stat(self.pid).is_some_and(|(_, _, start)| start == self.start)
    }

    fn of(pid: i32) -> Option<Process> {
        stat(pid).map(|(_, _, start)| Process { pid, start })
    }
}

impl std::fmt::Display for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.pid, self.start)
    }
}

/// A process as `PID:START` ([`Process`]'s `Display`).
pub fn parse_process(text: &str) -> Result<Process, String> {
    let parsed = text.split_once(':').and_then(|(pid, start)| {
        Some(Process { pid: pid.parse().ok().filter(|p| *p > 0)?, start: start.parse().ok()? })
    });
    parsed.ok_or_else(|| format!("`{text}` is not PID:START"))
}

/// The cargo process a runner call belongs to when rustdoc made it (a doctest): the
/// nearest `cargo` among its ancestors.
pub fn doctest_cargo() -> Option<Process> {
    let parent = nix::unistd::getppid().as_raw();
    if stat(parent)?.0 != "rustdoc" {
        return None;
    }
    let mut pid = parent;
    for _ in 0..8 {
        let (name, ppid, start) = stat(pid)?;
        if name == "cargo" {
            return Some(Process { pid, start });
        }
        pid = ppid;
    }
    None
}

/// The private directory of what the runner calls of `cargo` share whatever their
/// keeper: the workspaces found for their packages.
fn cargo_dir(ws: &Workspace, cargo: Process) -> PathBuf {
    let hash = crate::store::sha256_bytes(format!("{}\0{}", cargo.pid, cargo.start).as_bytes());
    ws.target_dir.join("xtask-runner").join(format!("cargo-{}", &hash[..16]))
}

/// The workspace a doctest of `cargo`'s shares ([`Shared::of_binary`]), found once per
/// package directory while that cargo process runs (`cargo locate-project` costs about
/// as much as running a doctest) and remembered in its private directory.
pub fn doctest_workspace(ws: &Workspace, binary: &Path, package_dir: &Path, cargo: Process) -> Result<Shared> {
    let dir = cargo_dir(ws, cargo);
    let hash = crate::store::sha256_bytes(package_dir.as_os_str().as_encoded_bytes());
    let file = dir.join(format!("workspace-{}", &hash[..16]));
    if let Ok(root) = std::fs::read(&file) {
        let root = PathBuf::from(std::ffi::OsString::from_vec(root));
        if package_dir.join("Cargo.toml").is_file() && root.join("Cargo.toml").is_file() {
            return Ok(Shared::in_workspace(&root, binary));
        }
    }
    let shared = Shared::of_binary(binary, package_dir)?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating `{}`", dir.display()))?;
    // Whole or not at all: other runner calls read it meanwhile.
    let mut new = tempfile::NamedTempFile::new_in(&dir).context("remembering the workspace")?;
    new.write_all(shared.root.as_os_str().as_encoded_bytes())?;
    new.persist(&file).context("remembering the workspace")?;
    Ok(shared)
}

/// Whether this process is a keeper (started by [`run`]).
pub fn is_keeper() -> bool {
    std::env::var_os(KEEPER_ENV).is_some()
}

/// The private directory of the keeper for `cargo`, the system and options, and the
/// workspace shared.
fn keeper_dir(ws: &Workspace, opts: &VmOpts, shared: &Shared, cargo: Process) -> Result<PathBuf> {
    let key = format!(
        "{:?}\0{}\0{}\0{}\0{}",
        opts,
        shared.root.display(),
        shared.target_dir.display(),
        cargo.pid,
        cargo.start
    );
    let hash = crate::store::sha256_bytes(key.as_bytes());
    let dir = ws.target_dir.join("xtask-runner").join(&hash[..16]);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating `{}`", dir.display()))?;
    Ok(dir)
}

/// Runs `binary` in the VM kept for `cargo` (starting it first when none is up yet);
/// prints its output; returns its exit status as cargo's runner.
pub fn run(
    ws: &Workspace,
    shared: &Shared,
    opts: &VmOpts,
    binary: &TestBinary,
    test_args: &[String],
    cargo: Process,
) -> Result<i32> {
    let dir = keeper_dir(ws, opts, shared, cargo)?;
    // One runner call at a time: rustdoc runs doctests on several threads.
    let lock = lock_dir(&dir)?;
    let socket = dir.join("socket");
    if UnixStream::connect(&socket).is_err() {
        match keeper_of(&dir).filter(|keeper| keeper.alive()) {
            // Started with cargo, still booting.
            Some(keeper) => await_keeper(&dir, || (!keeper.alive()).then(|| "it ended".to_string()))?,
            None => start_keeper(&dir, cargo)?,
        }
    }
    let bins = PathBuf::from(std::fs::read_to_string(dir.join("bins")).context("the kept VM's binaries")?);
    // The binary goes in the kept VM's own share, not the store: it is thrown away after.
    // A link to the same file where it can be one (rustdoc's directory and the share on
    // one file system), else a copy.
    let name = binary.path.file_name().unwrap_or_default().to_string_lossy().into_owned();
    let staged = tempfile::Builder::new().prefix("run.").tempdir_in(&bins).context("staging the binary")?;
    if std::fs::hard_link(&binary.path, staged.path().join(&name)).is_err() {
        std::fs::copy(&binary.path, staged.path().join(&name))
            .with_context(|| format!("copying `{}`", binary.path.display()))?;
    }
    let run_dir = staged.path().file_name().unwrap_or_default().to_string_lossy().into_owned();
    let guest_binary = format!("{BINS_MOUNT}/{run_dir}/{name}");
    let timeout = opts.test_binary_timeout().unwrap_or(Duration::from_secs(24 * 3600));
    let mut argv = vec![guest_binary];
    argv.extend(test_args.iter().cloned());
    let call = Call {
        binary: binary.path.clone(),
        run: ToGuest::RunIn {
            argv,
            timeout_ms: timeout.as_millis() as u64,
            cwd: binary.package_dir.to_string_lossy().into_owned(),
            env: binary.env.clone(),
        },
    };
    let answer = ask(&socket, &call, timeout + scenario::ANSWER_GRACE)?;
    drop(staged);
    drop(lock);
    match answer {
        FromGuest::Done { exit, signal, timed_out, stdout, stderr } => {
            let stdout = base64_decode(&stdout).unwrap_or_default();
            std::io::stdout().write_all(&stdout)?;
            std::io::stderr().write_all(&base64_decode(&stderr).unwrap_or_default())?;
            if timed_out {
                let running = super::running_test(&String::from_utf8_lossy(&stdout));
                eprintln!(
                    "error: `{}` ran past its timeout of {}s{}",
                    binary.path.display(),
                    timeout.as_secs(),
                    running.map(|t| format!(" (test `{t}` was running)")).unwrap_or_default()
                );
                return Ok(124);
            }
            Ok(exit.unwrap_or_else(|| 128 + signal.unwrap_or(0)))
        }
        FromGuest::Failed { error } => bail!("the kept VM could not run `{}`: {error}", binary.path.display()),
        FromGuest::Ready => bail!("the kept VM answered `ready` to a command"),
    }
}

/// Takes the lock of the keeper's directory `dir` (held while the returned file is open).
fn lock_dir(dir: &Path) -> Result<std::fs::File> {
    let path = dir.join("lock");
    let lock = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening `{}`", path.display()))?;
    lock.lock().context("waiting for the other doctests")?;
    Ok(lock)
}

/// A runner call, as the keeper takes it: the binary (on the host: the keeper adds the
/// libraries it loads to the store), and how to run it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Call {
    binary: PathBuf,
    run: ToGuest,
}

/// The guest's command that makes `links` (each `(link, target)`).
fn link_command(links: &[(String, String)]) -> Vec<String> {
    let mut script = String::from("set -e\n");
    for (link, target) in links {
        let parent = Path::new(link).parent().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
        script.push_str(&format!(
            "mkdir -p {} && ln -sfn {} {}\n",
            shell_quote(&parent),
            shell_quote(target),
            shell_quote(link)
        ));
    }
    vec!["sh".into(), "-c".into(), script]
}

/// Hands `message` to the keeper listening at `socket`; its answer, within `timeout`.
fn ask(socket: &Path, message: &Call, timeout: Duration) -> Result<FromGuest> {
    let stream = UnixStream::connect(socket).context("reaching the kept VM")?;
    let mut writer = stream.try_clone()?;
    writer.write_all(format!("{}\n", serde_json::to_string(message)?).as_bytes()).context("asking the kept VM")?;
    scenario::read_message(&mut BufReader::new(stream), timeout).context("the kept VM's answer")
}

/// Starts a keeper for `dir` (this program again, with the same arguments, detached)
/// and waits until it listens.
fn start_keeper(dir: &Path, cargo: Process) -> Result<()> {
    let log_path = dir.join("keeper.log");
    let log = std::fs::File::create(&log_path).with_context(|| format!("creating `{}`", log_path.display()))?;
    let _ = std::fs::remove_file(dir.join("socket"));
    let mut cmd = std::process::Command::new(std::env::current_exe().context("finding this program")?);
    cmd.args(std::env::args_os().skip(1))
        .env(KEEPER_ENV, dir)
        .env(CARGO_ENV, cargo.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // Its own session: not ended with this runner call, nor by a Ctrl-C meant for cargo's
    // children (it ends when cargo does).
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| nix::unistd::setsid().map(drop).map_err(std::io::Error::from));
    }
    let mut child = cmd.spawn().context("starting the keeper of the doctests' VM")?;
    let started = await_keeper(dir, || child.try_wait().ok().flatten().map(|status| status.to_string()));
    if started.is_err() {
        let _ = child.kill();
    }
    // Reaped by init once it ends; this process is gone long before.
    std::mem::forget(child);
    started
}

/// Waits until the keeper of `dir` listens; `ended` says how it ended, if it has.
fn await_keeper(dir: &Path, mut ended: impl FnMut() -> Option<String>) -> Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if UnixStream::connect(dir.join("socket")).is_ok() {
            return Ok(());
        }
        if let Some(how) = ended() {
            let said = std::fs::read_to_string(dir.join("keeper.log")).unwrap_or_default();
            let tail: Vec<&str> = said.lines().rev().take(20).collect::<Vec<_>>().into_iter().rev().collect();
            bail!("the VM for the doctests did not start ({how}):\n{}", tail.join("\n"));
        }
        if Instant::now() > deadline {
            bail!("the VM for the doctests did not start within {}s", START_TIMEOUT.as_secs());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The keeper that named itself in `dir`, if one did.
fn keeper_of(dir: &Path) -> Option<Process> {
    parse_process(std::fs::read_to_string(dir.join("keeper")).ok()?.trim()).ok()
}

/// Names this process as the keeper of `dir`.
fn claim(dir: &Path) -> Result<()> {
    let me = Process::of(std::process::id() as i32).context("reading this process's start time")?;
    let mut new = tempfile::NamedTempFile::new_in(dir).context("naming the keeper")?;
    new.write_all(me.to_string().as_bytes())?;
    new.persist(dir.join("keeper")).context("naming the keeper")?;
    Ok(())
}

/// `test --doc`, once it has started cargo (`cargo_pid`, running the doctests with
/// `runner`, a command line of this program's `test-runner`): starts the keeper for
/// that cargo process now, detached ([`keep_ahead`]), so that the VM boots while cargo
/// builds the doctests.
pub fn start_ahead(ws: &Workspace, runner: &[String], cargo_args: &[String], cargo_pid: u32) -> Result<()> {
    let cargo = Process::of(cargo_pid as i32).context("cargo ended at once")?;
    // The runner calls look for the nearest `cargo` above rustdoc: this one, unless
    // `CARGO` names something else.
    if stat(cargo.pid).is_none_or(|(name, _, _)| name != "cargo") {
        return Ok(());
    }
    // Cargo acts on the workspace of the manifest it is given, else of its directory.
    let package_dir = match super::manifest_arg(cargo_args) {
        Some(manifest) => ws.root.join(manifest).parent().map(Path::to_path_buf).unwrap_or_else(|| ws.root.clone()),
        None => ws.root.clone(),
    };
    let (program, args) = runner.split_first().context("no runner")?;
    let mut cmd = std::process::Command::new(program);
    cmd.args(args)
        .args(["--keep-for-cargo", &cargo.to_string()])
        .current_dir(&package_dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| nix::unistd::setsid().map(drop).map_err(std::io::Error::from));
    }
    let child = cmd.spawn().context("starting the keeper of the doctests' VM")?;
    // Reaped once `test` ends; it ends with cargo.
    std::mem::forget(child);
    Ok(())
}

/// The keeper [`start_ahead`] starts, in the directory of the package cargo acts on:
/// becomes the keeper for `cargo`'s doctests, unless one is up already.
pub fn keep_ahead(ws: &Workspace, opts: &VmOpts, cargo: Process) -> Result<i32> {
    let package_dir = std::env::current_dir().context("the current directory")?;
    // As a runner call finds it for a doctest, built under the temporary directory.
    let shared = super::Shared::of_binary(&std::env::temp_dir().join("rustdoctest"), &package_dir)?;
    let dir = keeper_dir(ws, opts, &shared, cargo)?;
    let lock = lock_dir(&dir)?;
    if UnixStream::connect(dir.join("socket")).is_ok() || keeper_of(&dir).is_some_and(Process::alive) {
        return Ok(0);
    }
    let log = std::fs::File::create(dir.join("keeper.log")).context("creating the keeper's log")?;
    for fd in [1, 2] {
        nix::unistd::dup2(std::os::fd::AsRawFd::as_raw_fd(&log), fd).context("logging the keeper")?;
    }
    claim(&dir)?;
    drop(lock);
    Ok(keep_in(ws, opts, &opts.system()?, &shared, &dir, cargo))
}

/// The keeper: boots the system once, serves runner calls until the cargo process ends.
pub fn keep(ws: &Workspace, opts: &VmOpts, system: &System, shared: &Shared) -> Result<i32> {
    let dir = PathBuf::from(std::env::var_os(KEEPER_ENV).context("no keeper directory")?);
    let cargo = std::env::var(CARGO_ENV).ok().and_then(|v| parse_process(&v).ok());
    let cargo = cargo.context("no cargo process to serve")?;
    claim(&dir)?;
    Ok(keep_in(ws, opts, system, shared, &dir, cargo))
}

/// The keeper of `dir`, serving `cargo`'s doctests; its exit status.
fn keep_in(ws: &Workspace, opts: &VmOpts, system: &System, shared: &Shared, dir: &Path, cargo: Process) -> i32 {
    let result = serve(ws, opts, system, shared, dir, cargo);
    if let Err(e) = &result {
        eprintln!("error: {e:#}");
    }
    // Nothing of it is left once cargo has ended; a failure's log is kept for the runner
    // that started it to show.
    if result.is_ok() {
        let _ = std::fs::remove_dir_all(dir);
        let _ = std::fs::remove_dir_all(cargo_dir(ws, cargo));
    } else {
        let _ = std::fs::remove_file(dir.join("socket"));
    }
    i32::from(result.is_err())
}

fn serve(ws: &Workspace, opts: &VmOpts, system: &System, shared: &Shared, dir: &Path, cargo: Process) -> Result<()> {
    let store = opts.open_store(ws)?;
    let machine = Machine::prepare(ws, opts, &store, system, crate::machine::virtualize(system))?;
    let (lowered, system_item) = machine.lower()?;
    let store = &machine.store;
    let mut request = machine.request(&lowered, &system_item, Mode::Serve, vec!["serve".into()]);
    request.attach = true;
    request.mounts = workspace_mounts(shared, os_configs::Arch::X86_64);
    // The binaries: a share of their own, read-only and cached in the guest (the
    // exchange directory is not, and a binary paged in from it costs a read per page).
    let bins = store.private_subdir("doctest-bins", "bins")?;
    request.mounts.push(MountSpec {
        source: BINS_TAG.into(),
        target: BINS_MOUNT.into(),
        fs_type: "9p".into(),
        options: "ro,trans=virtio,version=9p2000.L,msize=512000,cache=loose".into(),
        check: guest::Check::None,
    });
    let xchg = store.exchange()?;
    crate::vm::write_request(xchg.path(), &request)?;
    let mut spec = machine.spec(xchg.path().to_path_buf());
    spec.shares.push(crate::vm::qemu::Share { tag: BINS_TAG.into(), path: bins.path().to_path_buf(), readonly: true });
    let _view = super::share_workspace(ws, store, shared, &mut spec)?;
    // Where the runner calls put their binaries.
    std::fs::write(dir.join("bins"), bins.path().as_os_str().as_encoded_bytes())?;
    let console = ws.log_dir().join(format!("test-doctests-{}.log", std::process::id()));
    let attach = (machine.attachable("test --doc: the doctests' kept VM"), "doctests".to_string());
    let mut node = Node::serving("doctests", spec, dir, console, xchg, Some(attach))?;
    if !boot_while_alive(&mut node, cargo)? {
        // Cargo ended first (no doctests, or a build failed): nothing to serve.
        return Ok(());
    }
    // The links already made in the guest (the system's, at boot): a runner call's
    // others are made first, where they can be made beside the system's.
    let mut made: std::collections::BTreeSet<(String, String)> = lowered.links.iter().cloned().collect();
    // One resolver for every call: each library is read, hashed and stored once.
    let libraries = Libraries { store, resolver: packages::LibraryResolver::from_host() };
    let ready = dir.join("socket.new");
    let _ = std::fs::remove_file(&ready);
    let listener = UnixListener::bind(&ready).with_context(|| format!("listening at `{}`", ready.display()))?;
    listener.set_nonblocking(true)?;
    std::fs::rename(&ready, dir.join("socket"))?;
    eprintln!("serving the doctests of cargo process {} in one VM", cargo.pid);
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(e) = answer(&mut node, &libraries, &mut made, stream) {
                    eprintln!("a runner call failed: {e:#}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => wait_for_call(&listener),
            Err(e) => return Err(e).context("accepting a runner call"),
        }
        if !cargo.alive() {
            let _ = std::fs::remove_file(dir.join("socket"));
            return node.shutdown();
        }
        if !node.is_running() {
            bail!("the VM stopped");
        }
    }
}

/// Boots `node` unless `cargo` ends first (then its QEMU is stopped at once): whether it
/// booted.
fn boot_while_alive(node: &mut Node, cargo: Process) -> Result<bool> {
    use std::sync::atomic::{AtomicBool, Ordering};
    node.spawn()?;
    let qemu = node.pid();
    let (booted, gone) = (AtomicBool::new(false), AtomicBool::new(false));
    let result = std::thread::scope(|scope| {
        scope.spawn(|| {
            while !booted.load(Ordering::Relaxed) {
                if !cargo.alive() {
                    gone.store(true, Ordering::Relaxed);
                    if let Some(pid) = qemu {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid as i32),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let result = node.connect();
        booted.store(true, Ordering::Relaxed);
        result
    });
    match result {
        Ok(()) => Ok(true),
        Err(_) if gone.load(Ordering::Relaxed) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Waits until a runner call comes, or 200 ms have passed (then cargo is looked at again).
fn wait_for_call(listener: &UnixListener) {
    use std::os::fd::AsFd;
    let mut fds = [nix::poll::PollFd::new(listener.as_fd(), nix::poll::PollFlags::POLLIN)];
    let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(200u16));
}

/// Where the keeper puts the libraries of the binaries it runs.
struct Libraries<'a> {
    store: &'a crate::store::Store,
    resolver: packages::LibraryResolver,
}

/// One runner call: the binary's libraries stored and the links to them made (those not
/// made yet), its message handed to the guest, the guest's answer handed back.
fn answer(
    node: &mut Node,
    libraries: &Libraries,
    made: &mut std::collections::BTreeSet<(String, String)>,
    stream: UnixStream,
) -> Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut writer = stream.try_clone()?;
    let mut line = String::new();
    std::io::Read::take(BufReader::new(stream), 1 << 20).read_line(&mut line).context("reading a runner call")?;
    if line.is_empty() {
        // A runner making sure the keeper listens.
        return Ok(());
    }
    let call: Call = serde_json::from_str(&line).context("a garbled runner call")?;
    let timeout = match &call.run {
        ToGuest::Run { timeout_ms, .. } | ToGuest::RunIn { timeout_ms, .. } => {
            Duration::from_millis(*timeout_ms) + scenario::ANSWER_GRACE
        }
        ToGuest::PowerOff | ToGuest::SaveFailure => bail!("a runner call may only run a binary in the kept VM"),
    };
    let links = match packages::host_libraries(libraries.store, &libraries.resolver, &call.binary) {
        Ok(found) => found.links,
        Err(e) => {
            let error = format!("adding the libraries of `{}` to the store: {e:#}", call.binary.display());
            writer.write_all(format!("{}\n", serde_json::to_string(&FromGuest::Failed { error })?).as_bytes())?;
            return Ok(());
        }
    };
    let new = system::library_links_to_make(&made.iter().cloned().collect::<Vec<_>>(), links);
    if !new.is_empty() {
        let links = ToGuest::Run { argv: link_command(&new), timeout_ms: 60_000 };
        match node.ask(&links, Duration::from_secs(60) + scenario::ANSWER_GRACE)? {
            FromGuest::Done { exit: Some(0), .. } => made.extend(new),
            other => bail!("making the libraries' links in the kept VM failed: {other:?}"),
        }
    }
    let reply = node.ask(&call.run, timeout)?;
    writer.write_all(format!("{}\n", serde_json::to_string(&reply)?).as_bytes())?;
    Ok(())
}
