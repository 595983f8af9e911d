//! Block devices as mounts name them: `LABEL=`, `UUID=` (read from an ext2/3/4
//! superblock) or a `/dev` path, each waited for while the kernel's device scan goes on.

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::sys::Result;

/// How long the root device may take to appear (the SCSI/ATA scan is asynchronous,
/// and slow under TCG).
pub(crate) const ROOT_WAIT: Duration = Duration::from_secs(60);
/// The block device a mount source names: `LABEL=NAME` or `UUID=...` (an ext2/3/4
/// file system's, looked for among the block devices), or a path, each waited for as
/// the root device is. Any other source (a 9p tag, `tmpfs`) is returned as it is.
pub fn resolve_device(source: &str) -> Result<String> {
    let wanted = if let Some(label) = source.strip_prefix("LABEL=") {
        (None, Some(label))
    } else if let Some(uuid) = source.strip_prefix("UUID=") {
        (Some(uuid.to_ascii_lowercase()), None)
    } else if source.starts_with("/dev/") {
        let deadline = Instant::now() + ROOT_WAIT;
        while !Path::new(source).exists() {
            if Instant::now() >= deadline {
                return Err(format!("the device {source} did not appear (waited {ROOT_WAIT:?})"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        return Ok(source.to_string());
    } else {
        return Ok(source.to_string());
    };
    let deadline = Instant::now() + ROOT_WAIT;
    loop {
        let entries = fs::read_dir("/sys/class/block").map_err(|e| format!("cannot list /sys/class/block: {e}"))?;
        for entry in entries.flatten() {
            let dev = Path::new("/dev").join(entry.file_name());
            let Some((uuid, label)) = ext_ids(&dev) else { continue };
            if wanted.0.as_deref().is_some_and(|u| u == uuid) || wanted.1.is_some_and(|l| l == label) {
                return Ok(dev.to_string_lossy().into_owned());
            }
        }
        if Instant::now() >= deadline {
            return Err(format!("no block device holds a file system with {source} (waited {ROOT_WAIT:?})"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Finds the block device holding the ext4 file system with `uuid`, waiting for it.
pub(crate) fn find_root(uuid: &str) -> Result<PathBuf> {
    let deadline = Instant::now() + ROOT_WAIT;
    loop {
        let entries = fs::read_dir("/sys/class/block").map_err(|e| format!("cannot list /sys/class/block: {e}"))?;
        for entry in entries.flatten() {
            let dev = Path::new("/dev").join(entry.file_name());
            if ext4_uuid(&dev).is_some_and(|u| u == uuid) {
                return Ok(dev);
            }
        }
        if Instant::now() >= deadline {
            return Err(format!("no block device holds the root file system UUID={uuid} (waited {ROOT_WAIT:?})"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The UUID of the ext2/3/4 file system on `dev`, if it holds one.
fn ext4_uuid(dev: &Path) -> Option<String> {
    ext_ids(dev).map(|(uuid, _)| uuid)
}

/// The UUID and the label of the ext2/3/4 file system on `dev`, if it holds one.
fn ext_ids(dev: &Path) -> Option<(String, String)> {
    let mut sb = [0u8; 2048];
    File::open(dev).ok()?.read_exact(&mut sb).ok()?;
    // The superblock starts at byte 1024: magic 0xEF53 at 0x38, UUID at 0x68, the
    // volume name (16 bytes, NUL-padded) at 0x78.
    if sb[1024 + 0x38..1024 + 0x3a] != [0x53, 0xef] {
        return None;
    }
    let u = &sb[1024 + 0x68..1024 + 0x78];
    let hex: String = u.iter().map(|b| format!("{b:02x}")).collect();
    let uuid = format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..]);
    let name = &sb[1024 + 0x78..1024 + 0x88];
    let label = String::from_utf8_lossy(&name[..name.iter().position(|&b| b == 0).unwrap_or(16)]).into_owned();
    Some((uuid, label))
}
