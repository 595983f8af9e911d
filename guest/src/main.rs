//! The guest helper: PID 1 inside the VM. It loads the initrd's kernel modules, mounts
//! the shares, runs what the host asked for, writes the exit status back and powers the
//! VM off. Whatever goes wrong, it reports and powers off: it never leaves the VM hanging.

use std::ffi::CString;
use std::fs::{self, File};
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use guest::{Request, Status};
use nix::mount::{mount, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

mod base;
mod devices;
mod disk;
mod execute;
mod failure;
mod serve;
mod services;
mod sessions;
mod snapshot;
mod sys;

use execute::{execute_supervised, prepare, start_system};
use sys::{log, Result};

fn main() {
    // Not PID 1: a tool that the VM image builder's script runs.
    if std::process::id() != 1 {
        std::process::exit(tool(&std::env::args().skip(1).collect::<Vec<_>>()));
    }
    log("started");
    let status = match run() {
        Ok(status) => status,
        Err(err) => {
            log(&format!("error: {err}"));
            Status::Error(err)
        }
    };
    finish(&status);
}

/// How long the helper waits for the host's request.
const REQUEST_WAIT: Duration = Duration::from_secs(3600);

/// `normalise-inodes IMAGE OFFSET TIME`: gives every inode of the ext4 file system at
/// byte OFFSET of IMAGE the access and change time TIME and root as owner.
fn tool(args: &[String]) -> i32 {
    let parsed = match args {
        [cmd, image, offset, time] if cmd == "normalise-inodes" => {
            offset.parse().ok().zip(time.parse().ok()).map(|(o, t)| (image, o, t))
        }
        _ => None,
    };
    let Some((image, offset, time)) = parsed else {
        eprintln!("usage: /init normalise-inodes IMAGE OFFSET TIME (as PID 1, this program is the VM's init)");
        return 2;
    };
    match guest::ext4::normalise_inodes(Path::new(image), offset, guest::ext4::Fixed { time, uid: 0, gid: 0 }) {
        Ok(_) => 0,
        Err(e) => {
            eprintln!("normalise-inodes: {e}");
            1
        }
    }
}

fn run() -> Result<Status> {
    mount_basics()?;
    load_modules()?;
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if cmdline.split_whitespace().any(|w| w == guest::SNAPSHOT_WAIT_ARG) {
        // What every request's machine has (no share, nothing of the request's) is in
        // the snapshot, not done again by every run restored from it.
        base::machine()?;
        snapshot::wait_for_go(guest::snapshot::WAITING)?;
    }
    // Booted from a disk image (`vm-image`): no shares, no status file; never returns.
    if let Some(args) = fs::read_to_string("/proc/cmdline").ok().and_then(|l| guest::image::BootArgs::parse(&l)) {
        disk::boot(&args);
    }
    mount_shares()?;
    let mut request = read_request()?;
    log("shares mounted");
    if let Some(device) = &request.root_device {
        disk::shared_store_root(device)?;
        log(&format!("root file system {device} mounted (volatile)"));
    }
    prepare(&request)?;
    let mut supervisor = services::Supervisor::default();
    start_system(&request, request.root_device.is_some(), &mut supervisor)?;
    for net in &request.nets {
        services::network_up(net)?;
    }
    for m in &request.mounts {
        services::mount_spec(m)?;
    }
    if let Some(file) = &request.argv_file {
        let path = Path::new(guest::XCHG_MOUNT).join(file);
        let bytes = fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let argv = guest::parse_argv_file(&bytes);
        if !argv.is_empty() {
            request.argv = argv;
        }
    }
    let status = execute_supervised(&request, &mut supervisor)?;
    let failed = !matches!(status, Status::Exited(0));
    if request.save_failure && request.mode == guest::Mode::Command && failed {
        match failure::save_point() {
            Ok(Some(replay)) => return replay_request(&replay),
            Ok(None) => {}
            // Not saved (the host says so): the run ends with the program's status.
            Err(e) => log(&format!("the VM cannot be saved: {e}")),
        }
    }
    if request.keep && request.mode == guest::Mode::Command {
        log(&format!("the program ended: {}", status.encode().trim_end()));
        execute::keep(&mut supervisor)?;
    }
    Ok(status)
}

/// A replay's request, in a guest restored at its failure point: the system's services
/// started anew (their processes were ended before the VM was saved), then its program.
fn replay_request(request: &Request) -> Result<Status> {
    let mut supervisor = services::Supervisor::default();
    if let Some(system) = &request.system {
        let config = services::read_config(system)?;
        sys::block_signals()?;
        supervisor.start_all(&config.services)?;
    }
    let status = execute_supervised(request, &mut supervisor)?;
    if request.keep && request.mode == guest::Mode::Command {
        execute::keep(&mut supervisor)?;
    }
    Ok(status)
}

/// The exchange directory (read-write) and the store (read-only), over 9p.
pub(crate) fn mount_shares() -> Result<()> {
    mount_9p(guest::XCHG_TAG, guest::XCHG_MOUNT, MsFlags::empty(), "cache=none")?;
    mount_9p(guest::STORE_TAG, guest::STORE_MOUNT, MsFlags::MS_RDONLY, "cache=loose")
}

fn mount_basics() -> Result<()> {
    for (src, target, fstype) in [
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
        ("devtmpfs", "/dev", "devtmpfs"),
        ("tmpfs", "/tmp", "tmpfs"),
        ("tmpfs", "/run", "tmpfs"),
    ] {
        fs::create_dir_all(target).map_err(|e| format!("cannot create {target}: {e}"))?;
        mount(Some(src), target, Some(fstype), MsFlags::MS_NOSUID, None::<&str>)
            .map_err(|e| format!("cannot mount {fstype} on {target}: {e}"))?;
    }
    Ok(())
}

fn load_modules() -> Result<()> {
    let order = match fs::read_to_string(guest::MODULE_ORDER) {
        Ok(order) => order,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("cannot read {}: {e}", guest::MODULE_ORDER)),
    };
    let params = CString::default();
    for name in order.lines().filter(|l| !l.is_empty()) {
        let path = Path::new(guest::MODULE_DIR).join(name);
        let file = File::open(&path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        match nix::kmod::finit_module(&file, &params, nix::kmod::ModuleInitFlags::empty()) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => return Err(format!("cannot load module {}: {e}", path.display())),
        }
    }
    log("modules loaded");
    Ok(())
}

pub(crate) fn mount_9p(tag: &str, target: &str, flags: MsFlags, cache: &str) -> Result<()> {
    fs::create_dir_all(target).map_err(|e| format!("cannot create {target}: {e}"))?;
    let options = format!("trans=virtio,version=9p2000.L,msize=512000,{cache}");
    // The virtio transport may still be probing its devices; give it a moment.
    let mut last = None;
    for _ in 0..200 {
        match mount(Some(tag), target, Some("9p"), flags, Some(options.as_str())) {
            Ok(()) => return Ok(()),
            Err(e @ (nix::errno::Errno::ENOENT | nix::errno::Errno::ENODEV)) => {
                last = Some(e);
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(format!("cannot mount 9p share `{tag}` on {target}: {e}")),
        }
    }
    Err(format!(
        "cannot mount 9p share `{tag}` on {target}: {} (is the share passed to QEMU?)",
        last.map(|e| e.to_string()).unwrap_or_default()
    ))
}

/// Reads the request, waiting for it: the host may still be building what it names
/// while the VM boots (it writes the file whole, by renaming it into place). The host
/// stops the VM if that fails; an hour without a request is an error here too.
pub(crate) fn read_request() -> Result<Request> {
    let path = Path::new(guest::XCHG_MOUNT).join(guest::REQUEST_FILE);
    let started = std::time::Instant::now();
    let mut waited = false;
    let text = loop {
        match fs::read_to_string(&path) {
            Ok(text) => break text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && started.elapsed() < REQUEST_WAIT => {
                if !waited {
                    log("waiting for the request");
                    waited = true;
                }
                // Often at first (a small crate builds in a fraction of a second), then
                // rarely, so a long build is not slowed by an emulated CPU polling.
                let pause = if started.elapsed() < Duration::from_secs(2) { 5 } else { 100 };
                std::thread::sleep(Duration::from_millis(pause));
            }
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        }
    };
    if waited {
        log("request received");
    }
    let request: Request = serde_json::from_str(&text).map_err(|e| format!("bad request {}: {e}", path.display()))?;
    if request.version != guest::PROTOCOL_VERSION {
        return Err(format!(
            "request version {} but this helper speaks {}; rebuild the initrd",
            request.version,
            guest::PROTOCOL_VERSION
        ));
    }
    if request.argv.is_empty() {
        return Err("request has an empty argv".to_string());
    }
    Ok(request)
}

fn finish(status: &Status) -> ! {
    // Stop whatever the program left behind so nothing writes after the status.
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    nix::unistd::sync();
    let path = Path::new(guest::XCHG_MOUNT).join(guest::STATUS_FILE);
    // Whatever the command left at that name (a link, a directory) goes first: the
    // status is a new regular file, never written through a link.
    if fs::remove_file(&path).is_err() {
        let _ = fs::remove_dir_all(&path);
    }
    let written = File::options().write(true).create_new(true).open(&path).and_then(|mut f| {
        f.write_all(status.encode().as_bytes())?;
        f.sync_all()
    });
    match written {
        Ok(()) => log(&format!("status written: {}", status.encode().trim_end())),
        Err(e) => log(&format!("cannot write {}: {e}", path.display())),
    }
    nix::unistd::sync();
    // The host runs QEMU with -no-reboot, so a reboot ends the VM at once. A disk image
    // that failed before its root was mounted is booted by anyone's QEMU: power off.
    let disk_boot = fs::read_to_string("/proc/cmdline").ok().and_then(|l| guest::image::BootArgs::parse(&l)).is_some();
    let _ = reboot(if disk_boot { RebootMode::RB_POWER_OFF } else { RebootMode::RB_AUTOBOOT });
    // Unreachable unless reboot failed: exiting PID 1 panics the kernel, and the kernel
    // runs with panic=-1, which reboots too.
    std::process::exit(1)
}
