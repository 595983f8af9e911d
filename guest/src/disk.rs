//! Booting from a disk image (`cargo xtask vm-image`): find the root file system by UUID, mount it
//! (read-only under a tmpfs overlay when volatile), make it `/`, optionally verify the store
//! against the image's database, apply the system item's configuration and start its services, run
//! the system's request and power off. No shares, no `/xchg`: everything comes from the disk.

use std::fs::{self};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use guest::image::{BootArgs, StoreDb};
use guest::{Request, Status};
use nix::mount::{mount, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::devices::{find_root, ROOT_WAIT};
use crate::execute::{execute_supervised, prepare, start_config};
use crate::services::{self, Supervisor};
use crate::sys::{log, Result};

/// Where the root file system is assembled before it becomes `/`.
const NEW_ROOT: &str = "/sysroot";
const LOWER: &str = "/run/vm-root/lower";
const OVERLAY: &str = "/run/vm-root/overlay";

/// The disk boot, once the initrd's modules are loaded. Never returns: the machine is
/// powered off at the end, whatever happened.
pub fn boot(args: &BootArgs) -> ! {
    let status = match run(args) {
        Ok(status) => status,
        Err(err) => {
            log(&format!("error: {err}"));
            Status::Error(err)
        }
    };
    power_off(&status)
}

fn run(args: &BootArgs) -> Result<Status> {
    let device = find_root(&args.root_uuid)?;
    // Read-only at first, whatever comes next: the root is checked (as the system item
    // asks, which is on it) before anything is written to it.
    mount_root(&device, args.volatile)?;
    switch_root(&[])?;
    check_root(&device, args)?;
    log(&format!("root file system {} mounted{}", device.display(), if args.volatile { " (volatile)" } else { "" }));
    if args.verify_store {
        verify_store()?;
    }
    if args.boot_check {
        return boot_check(args);
    }
    let request = read_request(&args.system)?;
    prepare(&request)?;
    // The system item's configuration, as over 9p: files, homes, links, mounts, services.
    let mut supervisor = Supervisor::default();
    if Path::new(&args.system).join(guest::SYSTEM_CONFIG_FILE).exists() {
        start_config(&services::read_config(&args.system)?, false, &mut supervisor)?;
    } else {
        crate::base::etc()?;
    }
    execute_supervised(&request, &mut supervisor)
}

/// Checks the root file system as the system item's configuration asks (a volatile
/// root read-only, whatever it asks: its image is never written), then makes a
/// persistent root writable.
fn check_root(device: &Path, args: &BootArgs) -> Result<()> {
    let config_path = Path::new(&args.system).join(guest::SYSTEM_CONFIG_FILE);
    if config_path.exists() {
        let config = services::read_config(&args.system)?;
        let how = match config.root_check {
            guest::Check::Repair if args.volatile => guest::Check::ReadOnly,
            how => how,
        };
        services::check(&config.fsck, &device.to_string_lossy(), how)?;
    }
    if !args.volatile {
        mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REMOUNT, None::<&str>)
            .map_err(|e| format!("cannot make the root file system {} writable: {e}", device.display()))?;
    }
    Ok(())
}

fn mkdir(path: &str) -> Result<()> {
    fs::create_dir_all(path).map_err(|e| format!("cannot create {path}: {e}"))
}

/// The shared-store image as the root (a request's `root_device`): waits for `device`,
/// mounts it read-only under a tmpfs overlay and makes it `/`, the shares moved along.
pub fn shared_store_root(device: &str) -> Result<()> {
    let path = Path::new(device);
    let deadline = Instant::now() + ROOT_WAIT;
    while !path.exists() {
        if Instant::now() >= deadline {
            return Err(format!(
                "the root device {device} did not appear (waited {ROOT_WAIT:?}); is the image attached?"
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    mount_root(path, true)?;
    switch_root(&[guest::STORE_MOUNT, guest::XCHG_MOUNT])
}

fn mount_root(device: &Path, volatile: bool) -> Result<()> {
    mkdir(NEW_ROOT)?;
    let dev = device.to_string_lossy();
    if !volatile {
        // Read-only until checked ([`check_root`] makes it writable).
        return mount(Some(device), NEW_ROOT, Some("ext4"), MsFlags::MS_RDONLY, None::<&str>)
            .map_err(|e| format!("cannot mount {dev} (ext4) read-only on {NEW_ROOT}: {e}"));
    }
    // Read-only lower layer: a clean ext4 mounted read-only is never written, so the
    // image file stays as it was; every write lands in the tmpfs and vanishes.
    mkdir(LOWER)?;
    mount(Some(device), LOWER, Some("ext4"), MsFlags::MS_RDONLY, None::<&str>)
        .map_err(|e| format!("cannot mount {dev} (ext4) read-only on {LOWER}: {e}"))?;
    mkdir(OVERLAY)?;
    mount(Some("tmpfs"), OVERLAY, Some("tmpfs"), MsFlags::empty(), Some("mode=0755"))
        .map_err(|e| format!("cannot mount a tmpfs on {OVERLAY}: {e}"))?;
    mkdir(&format!("{OVERLAY}/upper"))?;
    mkdir(&format!("{OVERLAY}/work"))?;
    let options = format!("lowerdir={LOWER},upperdir={OVERLAY}/upper,workdir={OVERLAY}/work");
    mount(Some("overlay"), NEW_ROOT, Some("overlay"), MsFlags::empty(), Some(options.as_str()))
        .map_err(|e| format!("cannot mount the overlay on {NEW_ROOT}: {e}"))
}

/// Moves the initrd's mounts into the new root and makes it `/` (the initrd is the
/// kernel's rootfs, which cannot be pivoted away: move the new root over it and chroot).
fn switch_root(extra: &[&str]) -> Result<()> {
    for &dir in ["/proc", "/sys", "/dev", "/tmp", "/run"].iter().chain(extra) {
        let target = format!("{NEW_ROOT}{dir}");
        mkdir(&target)?;
        mount(Some(dir), target.as_str(), None::<&str>, MsFlags::MS_MOVE, None::<&str>)
            .map_err(|e| format!("cannot move {dir} to {target}: {e}"))?;
    }
    std::env::set_current_dir(NEW_ROOT).map_err(|e| format!("cannot enter {NEW_ROOT}: {e}"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| format!("cannot move {NEW_ROOT} to /: {e}"))?;
    nix::unistd::chroot(".").map_err(|e| format!("cannot chroot into the root file system: {e}"))?;
    std::env::set_current_dir("/").map_err(|e| format!("cannot enter /: {e}"))
}

/// Hashes every item registered in the image's store database and compares.
fn verify_store() -> Result<()> {
    let path = guest::image::STORE_DB;
    let text = fs::read_to_string(path).map_err(|e| format!("cannot read the store database {path}: {e}"))?;
    let db: StoreDb = serde_json::from_str(&text).map_err(|e| format!("bad store database {path}: {e}"))?;
    if db.version != guest::image::STORE_DB_VERSION {
        return Err(format!(
            "store database {path} has version {}, expected {}",
            db.version,
            guest::image::STORE_DB_VERSION
        ));
    }
    log(&format!("verifying {} store items", db.items.len()));
    let mut bad = Vec::new();
    for item in &db.items {
        match guest::image::tree_hash(Path::new(&item.path)) {
            Ok(actual) if actual == item.sha256 => {}
            Ok(actual) => bad.push(format!("{}: registered sha256 {}, found {actual}", item.path, item.sha256)),
            Err(e) => bad.push(format!("{}: {e}", item.path)),
        }
    }
    if !bad.is_empty() {
        return Err(format!(
            "store verification failed for {} of {} items: {}",
            bad.len(),
            db.items.len(),
            bad.join("; ")
        ));
    }
    say(&format!("store verified: {} items match their registered hashes", db.items.len()));
    Ok(())
}

/// Counts the boot on the root file system and prints the marker line.
fn boot_check(args: &BootArgs) -> Result<Status> {
    let path = Path::new(guest::image::BOOT_COUNT_FILE);
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let count: u64 = fs::read_to_string(path).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0) + 1;
    fs::write(path, format!("{count}\n")).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let root = if args.volatile { "volatile" } else { "persistent" };
    say(&format!("{} ok system={} root={root} boots={count}", guest::image::BOOT_CHECK_MARKER, args.system));
    Ok(Status::Exited(0))
}

fn read_request(system: &str) -> Result<Request> {
    let path = Path::new(system).join(guest::image::BOOT_REQUEST_FILE);
    let text = fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let request: Request = serde_json::from_str(&text).map_err(|e| format!("bad request {}: {e}", path.display()))?;
    if request.version != guest::PROTOCOL_VERSION || request.argv.is_empty() {
        return Err(format!("{} is not a request this helper runs (version {})", path.display(), request.version));
    }
    Ok(request)
}

/// A line on the console (not a log line: tests and users look for it).
fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn power_off(status: &Status) -> ! {
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    if let Status::Error(msg) = status {
        say(&format!("vm-image: boot failed: {msg}"));
    }
    nix::unistd::sync();
    // A clean file system for the next boot (and for e2fsck on the image file).
    if let Err(e) = mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY, None::<&str>) {
        log(&format!("cannot remount / read-only: {e}"));
    }
    nix::unistd::sync();
    log("powering off");
    let _ = reboot(RebootMode::RB_POWER_OFF);
    std::process::exit(1)
}
