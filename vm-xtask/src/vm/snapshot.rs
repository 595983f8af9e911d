//! Warm start: a booted guest saved once at its snapshot point (modules loaded, nothing
//! mounted, waiting for the host: [`guest::snapshot`]) and restored for later runs of
//! the same VM shape, instead of a cold boot.
//!
//! The snapshot is a store item keyed by everything the saved state depends on: QEMU's
//! arguments with the per-run paths (exchange directory, output ports, console, the
//! handshake's socket) replaced by placeholders and the store's directory by `/store`
//! (so the kernel, initrd, memory size, machine and devices count, and so do the
//! store items attached as disks), and QEMU's version. It is made by booting the VM to
//! the snapshot point, its RAM a shared file (`ram`), and saving it with the monitor's
//! `migrate` and the `x-ignore-shared` capability: the saved stream (`state`) holds the
//! devices' state only, the RAM is the file. A run maps that file as its guest's RAM,
//! private and copy-on-write (the item is never written), and loads only the devices'
//! state (`-incoming defer`, then `migrate_incoming fd:3` on a monitor on a socket pair);
//! once the guest says it waits, it sends `go` with the host's clock and fresh random
//! bytes. A snapshot that fails to load is removed, said in one line, and the run boots
//! cold.
//!
//! QEMU 7.2 opens a file-backed RAM's file read-write even for a private mapping (8.2
//! falls back to read-only), and `readonly=on` makes the guest's RAM read-only; a user
//! who cannot open the read-only item for writing (anyone but root) gets a private copy
//! of its RAM file for each run instead, its data only (the file is sparse).

use fs_err as fs;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::store::{Item, Recipe, Store};
use crate::vm::qemu::{self, Console, DiskFormat, MemoryFile, VmSpec};
use crate::{host, vm};

/// The devices' saved state, inside the snapshot item.
const STATE_FILE: &str = "state";
/// The guest's RAM at the snapshot point, inside the snapshot item.
const RAM_FILE: &str = "ram";
/// The descriptor a restoring QEMU reads the saved state from, and its monitor's.
const STATE_FD: i32 = 3;
pub const MONITOR_FD: i32 = 4;
/// The snapshot items' name.
pub const ITEM_NAME: &str = "vm-snapshot";
/// The hardware address of a network interface in a snapshot's shape: a restored guest
/// sets its own.
const PLACEHOLDER_MAC: &str = "52:54:00:77:ff:ff";

/// A saved VM to restore instead of booting: a snapshot's, or a failure's (a replay).
#[derive(Debug, Clone)]
pub struct Restore {
    /// The saved state (the devices', and for a failure the RAM too).
    pub state: PathBuf,
    /// The handshake's socket (the spec's `snapshot_port`).
    pub socket: PathBuf,
    /// The line the restored guest says it waits with.
    pub waiting: &'static str,
}

/// A run restored from a snapshot.
#[derive(Debug, Clone)]
pub struct WarmStart {
    pub restore: Restore,
    pub item: Item,
    /// The spec for a cold boot, should the snapshot not load.
    pub cold: VmSpec,
    store: Store,
}

/// Whether a run uses snapshots: not at all (`--cold`), when one is stored, or making
/// it first when it is not (`--warm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Warmth {
    Cold,
    IfStored,
    Make,
}

/// Prepares `spec` for a warm start when `warmth` allows and a snapshot of its shape is
/// stored (or, with [`Warmth::Make`], made now): the spec gets the handshake's port
/// (its socket in `runtime`) and the kernel argument that makes the guest wait. Without
/// a snapshot the spec stays as it was: a cold boot, exactly as ever. Shapes with a disk
/// that is not a store item (a fresh build disk), or with QEMU's gdb stub, always boot cold.
pub fn prepare(store: &Store, spec: &mut VmSpec, runtime: &Path, warmth: Warmth) -> Result<Option<WarmStart>> {
    // A VM under gdb boots cold: a restore would skip what the debugger is there to see
    // (with `-S`, the first instruction), and a snapshot is never made with a debugger on.
    let debugged = spec.gdb.is_some();
    if warmth == Warmth::Cold || debugged || spec.disks.iter().any(|d| !d.path.starts_with(store.items_dir())) {
        return Ok(None);
    }
    let mut warm = spec.clone();
    warm.kernel_args.push(guest::SNAPSHOT_WAIT_ARG.to_string());
    warm.snapshot_port = Some(runtime.join("snapshot.sock"));
    warm.memory_file = Some(MemoryFile { path: RAM_FILE.into(), shared: false });
    let recipe = recipe(store, &warm)?;
    let item = store.item_for(&recipe);
    let item = if store.is_present(&item) {
        item
    } else if warmth == Warmth::Make {
        eprintln!("making a snapshot of this VM at its snapshot point (once: later runs restore it)");
        store.realise(&recipe, |out| make(store, &warm, out))?
    } else {
        return Ok(None);
    };
    warm.memory_file = Some(MemoryFile { path: private_ram(&item.path.join(RAM_FILE), runtime)?, shared: false });
    let cold = std::mem::replace(spec, warm);
    Ok(Some(WarmStart {
        restore: Restore {
            state: item.path.join(STATE_FILE),
            socket: spec.snapshot_port.clone().expect("set above"),
            waiting: guest::snapshot::WAITING,
        },
        item,
        cold,
        store: store.clone(),
    }))
}

/// The RAM file a restore maps: the item's own when this user can open it read-write
/// (QEMU 7.2 asks for that, though it never writes a private mapping), else a copy of
/// its data in `runtime`.
fn private_ram(ram: &Path, runtime: &Path) -> Result<PathBuf> {
    if nix::unistd::access(ram, nix::unistd::AccessFlags::W_OK).is_ok() {
        return Ok(ram.to_path_buf());
    }
    let copy = runtime.join(RAM_FILE);
    copy_sparse(ram, &copy).with_context(|| format!("copying the snapshot's RAM to `{}`", copy.display()))?;
    Ok(copy)
}

/// Copies `from`'s data (not its holes) to a new private file `to` of the same size.
fn copy_sparse(from: &Path, to: &Path) -> Result<()> {
    use nix::unistd::{lseek, Whence};
    use std::os::fd::AsRawFd;
    let src = fs::File::open(from)?;
    let dst = crate::store::create_private_file(to)?;
    let len = src.metadata()?.len();
    dst.set_len(len)?;
    let mut at = 0i64;
    while (at as u64) < len {
        let Ok(data) = lseek(src.as_raw_fd(), at, Whence::SeekData) else { break };
        let hole = lseek(src.as_raw_fd(), data, Whence::SeekHole)?;
        let (mut off_in, mut off_out) = (data, data);
        while off_in < hole {
            let left = (hole - off_in) as usize;
            let n = nix::fcntl::copy_file_range(&src, Some(&mut off_in), &dst, Some(&mut off_out), left)?;
            if n == 0 {
                bail!("`{}` ended early", from.display());
            }
        }
        at = hole;
    }
    Ok(())
}

/// The snapshot's recipe: `spec`'s arguments with every per-run path replaced (the RAM
/// file is the item's: its arguments, `memory-backend-file`, say what the item holds).
fn recipe(store: &Store, spec: &VmSpec) -> Result<Recipe> {
    let args = shape_args(&store.items_dir(), spec);
    let qemu = qemu_version(store, spec.arch)?;
    let mut recipe = Recipe::new("vm-snapshot", ITEM_NAME).param("args", args.join("\n")).param("qemu", qemu);
    for (i, disk) in spec.disks.iter().enumerate().filter(|(_, d)| d.format == DiskFormat::Raw) {
        recipe = recipe.param(&format!("disk{i}"), &partition_tables(&disk.path)?);
    }
    Ok(recipe)
}

/// What a guest knows of a raw disk at the snapshot point, where nothing is mounted: its
/// size and what the kernel read to find its partitions (the first MiB, before the first
/// partition, and for GPT the last, the backup table's). Disks alike in these are one
/// shape, whatever their file systems hold: a scenario's nodes of one system, each with
/// its own `/etc` files, share a snapshot.
fn partition_tables(disk: &Path) -> Result<String> {
    // The MBR, or GPT's protective MBR, header and entries, are in the first sectors and
    // GPT's backup in the last: a MiB each holds them (and covers more than that where a
    // partition starts earlier than our images' do: fewer disks alike, never a wrong one).
    const HEAD: u64 = 1 << 20;
    const TAIL: u64 = 1 << 20;
    let read = || -> std::io::Result<String> {
        let mut file = fs::File::open(disk)?;
        let size = file.metadata()?.len();
        let mut head = vec![0u8; HEAD.min(size) as usize];
        file.read_exact(&mut head)?;
        use sha2::Digest;
        let mut hasher = sha2::Sha256::new();
        hasher.update(&head);
        // The protective MBR's partition type, 0xee: a GPT disk.
        if head.get(450) == Some(&0xee) {
            let mut tail = vec![0u8; TAIL.min(size) as usize];
            std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(size - tail.len() as u64))?;
            file.read_exact(&mut tail)?;
            hasher.update(&tail);
        }
        Ok(format!("{size} {:x}", hasher.finalize()))
    };
    read().with_context(|| format!("reading the partition tables of `{}`", disk.display()))
}

/// QEMU's arguments for `spec` with every per-run path replaced by a fixed one, and the
/// store's items directory `items` by the guest's store path.
fn shape_args(items: &Path, spec: &VmSpec) -> Vec<String> {
    let mut shape = spec.clone();
    shape.sandbox = false;
    // Nothing is mounted at the snapshot point: a share's place on the host (the exchange
    // directory, a test run's staged workspace) is per run; the store's is the store's.
    for share in shape.shares.iter_mut().filter(|s| s.tag != guest::STORE_TAG) {
        share.path = match share.tag.as_str() {
            guest::XCHG_TAG => "/xchg".into(),
            tag => format!("/share-{tag}").into(),
        };
    }
    for (i, port) in shape.ports.iter_mut().enumerate() {
        port.path = format!("/port{i}").into();
    }
    shape.console = match shape.console {
        Console::File(_) => Console::File("/console".into()),
        Console::Stdio => Console::Stdio,
    };
    shape.snapshot_port = Some("/snapshot.sock".into());
    if shape.attach.is_some() {
        shape.attach = Some("/attach.sock".into());
    }
    if shape.control.is_some() {
        shape.control = Some("/control.sock".into());
    }
    for (i, lan) in shape.lans.iter_mut().enumerate() {
        (lan.local, lan.hub) = (format!("/lan{i}").into(), format!("/hub{i}").into());
        // Set by the guest after the snapshot point (`NetConfig::mac`).
        lan.mac = PLACEHOLDER_MAC.into();
    }
    // A raw disk is known by its partition tables ([`partition_tables`]), not its path.
    for (i, disk) in shape.disks.iter_mut().enumerate().filter(|(_, d)| d.format == DiskFormat::Raw) {
        disk.path = format!("/disk{i}").into();
    }
    shape.memory_file = Some(MemoryFile { path: format!("/{RAM_FILE}").into(), shared: false });
    qemu::args(&shape)
        .iter()
        .map(|a| a.to_string_lossy().replace(&*items.to_string_lossy(), guest::STORE_MOUNT))
        .collect()
}

/// The first line of `--version` of the QEMU for `arch`, remembered while QEMU is
/// unchanged.
pub(crate) fn qemu_version(store: &Store, arch: os_configs::Arch) -> Result<String> {
    let program = crate::debian::qemu::absolute_for(arch)?;
    host::remembered(&store.cache_dir(), &program, "version", || {
        // A QEMU that fails even this is reported by the run itself, with its hint.
        let out = crate::process::output(crate::process::command(&program).arg("--version"))?;
        Ok(String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or_default().to_string())
    })
}

/// Boots `spec`'s VM to the snapshot point, its RAM the file `out/ram`, and saves its
/// devices' state as `out/state`.
fn make(store: &Store, spec: &VmSpec, out: &Path) -> Result<()> {
    fs::create_dir(out)?;
    let scratch = store.scratch("snapshot")?;
    let dir = scratch.path();
    let mut spec = spec.clone();
    // The guest runs nothing but the helper before the snapshot point: QEMU may spawn
    // the `cat` that writes the state (its sandbox would forbid that).
    spec.sandbox = false;
    for share in &mut spec.shares {
        if share.tag == guest::XCHG_TAG {
            share.path = dir.join("xchg");
            crate::store::create_private_dir(&share.path)?;
        }
    }
    for (i, port) in spec.ports.iter_mut().enumerate() {
        port.path = dir.join(format!("port{i}"));
    }
    if let Console::File(path) = &mut spec.console {
        *path = dir.join("console");
    }
    let socket = dir.join("snapshot.sock");
    spec.snapshot_port = Some(socket.clone());
    if spec.attach.is_some() {
        spec.attach = Some(dir.join("attach.sock"));
    }
    // A scenario node's sockets: its own here (the hub's is none: nothing is sent).
    if spec.control.is_some() {
        spec.control = Some(dir.join("control.sock"));
    }
    for (i, lan) in spec.lans.iter_mut().enumerate() {
        (lan.local, lan.hub) = (dir.join(format!("lan{i}")), dir.join(format!("hub{i}")));
    }
    let ram = out.join(RAM_FILE);
    spec.memory_file = Some(MemoryFile { path: ram.clone(), shared: true });
    let monitor = dir.join("monitor.sock");
    let mut args = qemu::args(&spec);
    let mut mon = OsString::from("unix:");
    mon.push(&monitor);
    mon.push(",server=on,wait=off");
    args.extend(["-monitor".into(), mon]);
    let started = Instant::now();
    let mut child = vm::qemu_command(spec.arch, &args, false).spawn().context("starting QEMU to make a snapshot")?;
    let made = (|| -> Result<Saved> {
        let deadline = Instant::now() + Duration::from_secs(120);
        wait_for_waiting(&socket, guest::snapshot::WAITING, deadline, || matches!(child.try_wait(), Ok(None)))?;
        let booted = Instant::now();
        let mut hmp = Monitor::connect(&monitor)?;
        let state = out.join(STATE_FILE);
        let shown = state.to_string_lossy();
        if shown.contains(['\'', '"', '\\', '\n']) {
            bail!("the store's path `{shown}` has a quote, backslash or newline: QEMU cannot save there");
        }
        // The RAM (shared, in `out/ram`) stays out of the stream.
        expect_ok(&hmp.ask("migrate_set_capability x-ignore-shared on")?)?;
        hmp.ask(&format!("migrate \"exec:cat > '{shown}'\""))?;
        loop {
            let info = hmp.ask("info migrate")?;
            if info.contains("Migration status: completed") {
                break;
            }
            if info.contains("Migration status: failed") || Instant::now() > deadline {
                bail!("saving the VM failed: {}", info.trim());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = hmp.ask("quit");
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let ram_bytes = punch_zero_pages(&ram)?;
        let save_s = booted.elapsed().as_secs_f64();
        let bytes = fs::metadata(&state)?.len() + ram_bytes;
        Ok(Saved { bytes, boot_s: (booted - started).as_secs_f64(), save_s })
    })();
    let _ = child.kill();
    let status = child.wait();
    match made {
        Ok(saved) => {
            eprintln!("{}", saved.line());
            Ok(())
        }
        Err(e) => {
            let mut stderr = String::new();
            if let Some(mut s) = child.stderr.take() {
                let _ = s.read_to_string(&mut stderr);
            }
            let console = fs::read(dir.join("console")).unwrap_or_default();
            bail!("{e:#} (QEMU: {status:?}: {})\nconsole:\n{}", stderr.trim(), vm::tail_lines(&console));
        }
    }
}

/// Makes `path`'s all-zero pages holes (the guest's RAM: most of it never written, or
/// zeroed), so the item holds its data only. Returns the bytes of data left.
fn punch_zero_pages(path: &Path) -> Result<u64> {
    use nix::fcntl::{fallocate, FallocateFlags};
    use std::os::fd::AsRawFd;
    let mut file = fs::OpenOptions::new().read(true).write(true).open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let (mut at, mut data) = (0i64, 0u64);
    loop {
        let n = crate::store::read_full(&mut file, &mut buf)?;
        if n == 0 {
            break;
        }
        for (i, page) in buf[..n].chunks(4096).enumerate() {
            if page.iter().all(|b| *b == 0) {
                let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
                fallocate(file.as_raw_fd(), flags, at + (i * 4096) as i64, page.len() as i64)?;
            } else {
                data += page.len() as u64;
            }
        }
        at += n as i64;
    }
    Ok(data)
}

/// The arguments that make QEMU wait for a restore: a monitor on descriptor
/// [`MONITOR_FD`] (one end of a socket pair) and no migration until it is told.
pub fn restore_args() -> Vec<OsString> {
    let chardev = format!("socket,id=restore,fd={MONITOR_FD}");
    ["-chardev", &chardev, "-mon", "chardev=restore", "-incoming", "defer"].iter().map(OsString::from).collect()
}

/// Starts loading the devices' state from descriptor 3, through the monitor at the
/// other end of the socket pair: the stream was saved with `x-ignore-shared`, and the
/// loading side must say so too.
pub fn start_restore(monitor: UnixStream) -> Result<()> {
    let mut hmp = Monitor::from_stream(monitor)?;
    expect_ok(&hmp.ask("migrate_set_capability x-ignore-shared on")?)?;
    expect_ok(&hmp.ask(&format!("migrate_incoming fd:{STATE_FD}"))?)
}

/// A monitor's answer to a command that says nothing when it works.
pub(crate) fn expect_ok(answer: &str) -> Result<()> {
    let said: Vec<&str> = answer.lines().skip(1).filter(|l| !l.trim().is_empty() && !l.starts_with("(qemu)")).collect();
    if said.iter().any(|l| l.contains("rror")) {
        bail!("QEMU's monitor: {}", said.join("; ").trim());
    }
    Ok(())
}

/// What making a snapshot took, as said on stderr.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Saved {
    /// The saved state's size.
    pub bytes: u64,
    /// From starting QEMU to the guest waiting at the snapshot point.
    pub boot_s: f64,
    /// Saving the state.
    pub save_s: f64,
}

const SAVED_PREFIX: &str = "snapshot saved: ";

impl Saved {
    /// The line said on stderr ([`parse_saved_line`] reads it back).
    pub fn line(&self) -> String {
        format!(
            "{SAVED_PREFIX}{} bytes ({:.1} MiB) in {:.2} s, after booting to the snapshot point in {:.2} s",
            self.bytes,
            self.bytes as f64 / f64::from(1 << 20),
            self.save_s,
            self.boot_s
        )
    }
}

/// The [`Saved`] a line of `run-vm`'s stderr reports, if it is that line.
#[cfg(any(test, feature = "bench"))]
pub fn parse_saved_line(line: &str) -> Option<Saved> {
    let (saved, booted) = line.strip_prefix(SAVED_PREFIX)?.split_once(", after booting to the snapshot point in ")?;
    let words: Vec<&str> = saved.split_whitespace().collect();
    match (&words[..], booted.strip_suffix(" s")) {
        ([bytes, "bytes", _, _, "in", save, "s"], Some(boot)) => {
            Some(Saved { bytes: bytes.parse().ok()?, boot_s: boot.parse().ok()?, save_s: save.parse().ok()? })
        }
        _ => None,
    }
}

/// Connects to the handshake's socket and reads until the guest says it waits (the line
/// `waiting`), while `alive` (QEMU runs) and before `deadline`. Returns the connection.
pub fn wait_for_waiting(
    socket: &Path,
    waiting: &str,
    deadline: Instant,
    mut alive: impl FnMut() -> bool,
) -> Result<UnixStream> {
    let stream = loop {
        match UnixStream::connect(socket) {
            Ok(s) => break s,
            Err(e) if !alive() || Instant::now() > deadline => bail!("QEMU ended before the guest waited ({e})"),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    stream.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(_) if line.trim_end() == waiting => return Ok(stream),
            Ok(0) => bail!("QEMU closed the snapshot port"),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => bail!("reading the snapshot port: {e}"),
        }
        if !alive() || Instant::now() > deadline {
            bail!("the guest never said it waits for the host");
        }
    }
}

/// Tells a waiting guest to go on, with the host's clock and fresh random bytes.
pub fn send_go(stream: &mut UnixStream) -> Result<()> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
    let mut entropy = [0u8; 64];
    fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut entropy)).context("reading /dev/urandom")?;
    let line = guest::snapshot::go_line(now.as_secs(), now.subsec_nanos(), &entropy);
    stream.write_all(line.as_bytes()).context("sending go to the guest")
}

/// Removes a snapshot that failed to load, saying so.
pub fn discard(warm: &WarmStart, why: &str) {
    eprintln!("the VM snapshot `{}` did not load ({why}); booting cold, and removing it", warm.item.file_name());
    let _ = warm.store.remove_entry(&format!("items/{}", warm.item.file_name()));
}

/// QEMU's human monitor on a unix socket.
pub(crate) struct Monitor {
    stream: UnixStream,
}

impl Monitor {
    pub(crate) fn connect(path: &Path) -> Result<Monitor> {
        let stream =
            UnixStream::connect(path).with_context(|| format!("connecting to QEMU's monitor `{}`", path.display()))?;
        Monitor::from_stream(stream)
    }

    fn from_stream(stream: UnixStream) -> Result<Monitor> {
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut m = Monitor { stream };
        m.read_prompt()?;
        Ok(m)
    }

    fn read_prompt(&mut self) -> Result<String> {
        let mut text = Vec::new();
        let mut buf = [0u8; 4096];
        while !text.ends_with(b"(qemu) ") {
            let n = self.stream.read(&mut buf).context("reading QEMU's monitor")?;
            if n == 0 {
                break;
            }
            text.extend_from_slice(&buf[..n]);
        }
        Ok(String::from_utf8_lossy(&text).into_owned())
    }

    /// Hands QEMU the descriptor `fd` under `name` (`getfd`: the descriptor rides with
    /// the command's bytes, as SCM_RIGHTS), for a later `migrate fd:NAME`.
    pub(crate) fn send_fd(&mut self, name: &str, fd: std::os::fd::RawFd) -> Result<()> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        use std::os::fd::AsRawFd;
        let command = format!("getfd {name}\n");
        let iov = [std::io::IoSlice::new(command.as_bytes())];
        let fds = [fd];
        sendmsg::<()>(self.stream.as_raw_fd(), &iov, &[ControlMessage::ScmRights(&fds)], MsgFlags::empty(), None)
            .context("handing QEMU a descriptor")?;
        expect_ok(&self.read_prompt()?)
    }

    pub(crate) fn ask(&mut self, command: &str) -> Result<String> {
        self.stream.write_all(format!("{command}\n").as_bytes())?;
        if command == "quit" {
            return Ok(String::new());
        }
        self.read_prompt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nothing is mounted at the snapshot point: where a share is on the host (a test run's
    /// staged workspace, in scratch of its own) is no part of the VM's shape; its tag is.
    #[test]
    fn per_run_paths_are_no_part_of_the_shape() {
        let spec = |view: &str, xchg: &str, control: &str| {
            let shares = vec![
                qemu::Share { tag: guest::XCHG_TAG.into(), path: xchg.into(), readonly: false },
                qemu::Share { tag: "workspace".into(), path: view.into(), readonly: true },
            ];
            let boot = ("/s/items/k/vmlinux".into(), "/s/items/i/initrd".into(), vec![]);
            VmSpec {
                console: Console::File(format!("{control}.console").into()),
                control: Some(control.into()),
                ..VmSpec::direct(qemu::Accel::Tcg, 256, boot, shares)
            }
        };
        let items = Path::new("/s/items");
        let one = shape_args(items, &spec("/t/.tmp/scratch-1-view.a/view", "/t/xchg-1", "/run/a/n.control"));
        let two = shape_args(items, &spec("/t/.tmp/scratch-2-view.b/view", "/t/xchg-2", "/run/b/n.control"));
        assert_eq!(one, two);
        let other_tag = {
            let mut s = spec("/v", "/x", "/c");
            s.shares[1].tag = "sources".into();
            shape_args(items, &s)
        };
        assert_ne!(one, other_tag);
    }

    #[test]
    fn the_saved_line_reads_back() {
        let saved = Saved { bytes: 68_157_440, boot_s: 1.52, save_s: 0.87 };
        assert_eq!(parse_saved_line(&saved.line()), Some(saved));
        assert_eq!(parse_saved_line("snapshot saved: lots"), None);
        assert_eq!(parse_saved_line("guest[0.1]: started"), None);
    }

    #[test]
    fn raw_disks_are_known_by_size_and_partition_tables_not_file_systems() {
        let dir = tempfile::tempdir().unwrap();
        let disk = |name: &str, mbr_type: u8, at: u64, byte: u8| {
            let mut bytes = vec![0u8; 4 << 20];
            bytes[450] = mbr_type;
            bytes[at as usize] = byte;
            let path = dir.path().join(name);
            fs::write(&path, bytes).unwrap();
            partition_tables(&path).unwrap()
        };
        let mib = 1 << 20;
        // MBR: what the partition holds does not count, its table does.
        assert_eq!(disk("a", 0x83, 2 * mib, 1), disk("b", 0x83, 2 * mib, 2));
        assert_eq!(disk("c", 0x83, 4 * mib - 1, 1), disk("d", 0x83, 4 * mib - 1, 2));
        assert_ne!(disk("e", 0x83, 440, 1), disk("f", 0x83, 440, 2));
        // GPT: the backup table at the end counts too.
        assert_ne!(disk("g", 0xee, 4 * mib - 1, 1), disk("h", 0xee, 4 * mib - 1, 2));
        assert_eq!(disk("i", 0xee, 2 * mib, 1), disk("j", 0xee, 2 * mib, 2));
        // The size counts.
        fs::write(dir.path().join("k"), vec![0u8; 5 << 20]).unwrap();
        assert_ne!(partition_tables(&dir.path().join("k")).unwrap(), disk("l", 0, 2 * mib, 0));
        assert!(partition_tables(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn zero_pages_become_holes_and_a_copy_keeps_the_data_only() {
        let dir = tempfile::tempdir().unwrap();
        let ram = dir.path().join("ram");
        let mut content = vec![0u8; 64 << 12];
        content[5 << 12] = 1;
        content[(40 << 12) + 4095] = 2;
        fs::write(&ram, &content).unwrap();
        assert_eq!(punch_zero_pages(&ram).unwrap(), 2 << 12);
        assert_eq!(fs::read(&ram).unwrap(), content);
        let copy = dir.path().join("copy");
        copy_sparse(&ram, &copy).unwrap();
        assert_eq!(fs::read(&copy).unwrap(), content);
        let blocks = |p: &Path| std::os::unix::fs::MetadataExt::blocks(&fs::metadata(p).unwrap());
        assert!(blocks(&ram) < 64 * 8 && blocks(&copy) < 64 * 8, "{} {}", blocks(&ram), blocks(&copy));
    }
}
