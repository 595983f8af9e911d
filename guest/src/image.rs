//! The contract of a stand-alone disk image (`cargo xtask vm-image`): the kernel
//! arguments GRUB passes to the helper, the store database the image carries, and the
//! content hash both sides compute over store items.
//!
//! The helper boots from the disk when the kernel command line has [`ROOT_ARG`]: it
//! finds the ext4 file system with that UUID, mounts it as `/` (read-only under a tmpfs
//! overlay with [`VOLATILE_ARG`]), reads the [`Request`](crate::Request) in the system
//! item named by [`SYSTEM_ARG`] ([`BOOT_REQUEST_FILE`]), applies the item's
//! [`SystemConfig`](crate::SystemConfig) ([`SYSTEM_CONFIG_FILE`](crate::SYSTEM_CONFIG_FILE):
//! `/etc` files, homes, links, mounts, services started and up) when it holds one, and
//! runs the request; when it ends (or
//! `poweroff`), it syncs, remounts `/` read-only and powers the machine off.
//!
//! Public for the engine only: its image builder writes what the helper reads here, and
//! its store hashes items with [`tree_hash`], as the helper's `vm.verify-store` does.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// `vm.root=UUID=<uuid>`: the root file system, by ext4 UUID.
pub const ROOT_ARG: &str = "vm.root";
/// `vm.system=/store/<hash>-system-<name>`: the system item to run.
pub const SYSTEM_ARG: &str = "vm.system";
/// `vm.volatile`: mount the root read-only with a tmpfs overlay; writes vanish.
pub const VOLATILE_ARG: &str = "vm.volatile";
/// `vm.verify-store`: hash every registered item before running the system; a
/// mismatch stops the boot.
pub const VERIFY_STORE_ARG: &str = "vm.verify-store";
/// `vm.boot-check`: instead of the system's request, count the boot in
/// [`BOOT_COUNT_FILE`], print [`BOOT_CHECK_MARKER`] and power off (for tests).
pub const BOOT_CHECK_ARG: &str = "vm.boot-check";
/// Start of the line `vm.boot-check` prints on the console.
pub const BOOT_CHECK_MARKER: &str = "vm-image boot-check:";
/// Where `vm.boot-check` counts boots (on the root file system).
pub const BOOT_COUNT_FILE: &str = "/var/lib/vm-boot-check/count";
/// The request a system item holds for the helper, relative to the item.
pub const BOOT_REQUEST_FILE: &str = "boot.json";
/// The store database in the image: every item with its content hash and references.
pub const STORE_DB: &str = "/var/lib/vmstore/db.json";
/// Version of [`StoreDb`]'s format.
pub const STORE_DB_VERSION: u32 = 1;

/// The store database of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreDb {
    /// Must equal [`STORE_DB_VERSION`].
    pub version: u32,
    /// Every item in the image's store.
    pub items: Vec<Registration>,
}

/// One registered store item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    /// The item's path in the image (`/store/<hash>-<name>`).
    pub path: String,
    /// [`tree_hash`] of the item.
    pub sha256: String,
    /// Paths of the items this one refers to.
    pub references: Vec<String>,
}

/// The boot parameters read from the kernel command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootArgs {
    /// UUID of the root file system (from `vm.root=UUID=...`).
    pub root_uuid: String,
    /// The system item to run (from [`SYSTEM_ARG`]); empty when not given.
    pub system: String,
    /// Whether the root is volatile ([`VOLATILE_ARG`]).
    pub volatile: bool,
    /// Whether the store is checked before the system runs ([`VERIFY_STORE_ARG`]).
    pub verify_store: bool,
    /// Whether this boot only checks that the image boots ([`BOOT_CHECK_ARG`]).
    pub boot_check: bool,
}

impl BootArgs {
    /// Parses a kernel command line; `None` when it does not ask for a disk boot.
    pub fn parse(cmdline: &str) -> Option<BootArgs> {
        let mut args = BootArgs::default();
        let mut root = None;
        for word in cmdline.split_whitespace() {
            let (key, value) = word.split_once('=').unwrap_or((word, ""));
            match key {
                ROOT_ARG => root = value.strip_prefix("UUID=").map(str::to_ascii_lowercase),
                SYSTEM_ARG => args.system = value.to_string(),
                VOLATILE_ARG => args.volatile = true,
                VERIFY_STORE_ARG => args.verify_store = true,
                BOOT_CHECK_ARG => args.boot_check = true,
                _ => {}
            }
        }
        args.root_uuid = root?;
        Some(args)
    }
}

/// Version tag of the tree-content encoding.
const TREE_ENCODING: &[u8] = b"vmstore-tree-v1\n";

/// sha256 of a file's bytes, as hex. A large file is read by a second thread while this
/// one hashes: reading it from the page cache then adds nothing to the hashing time
/// (about a third, read and hashed in turn, with the CPU's SHA instructions).
pub fn file_hash(path: &Path) -> io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    if file.metadata()?.len() < PIPELINED_HASH_MIN {
        let mut buf = vec![0u8; HASH_BUF];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        return Ok(hex(&hasher.finalize()));
    }
    // Full buffers go to the hasher, and come back empty to be filled again; an empty
    // buffer sent full is the end of the file, an error ends the reader.
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<io::Result<Vec<u8>>>(HASH_BUFFERS);
    let (empty_tx, empty_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    for _ in 0..HASH_BUFFERS {
        let _ = empty_tx.send(vec![0u8; HASH_BUF]);
    }
    std::thread::scope(|s| {
        s.spawn(move || {
            while let Ok(mut buf) = empty_rx.recv() {
                buf.resize(HASH_BUF, 0);
                let read = file.read(&mut buf).map(|n| {
                    buf.truncate(n);
                    buf
                });
                let last = !matches!(&read, Ok(buf) if !buf.is_empty());
                if full_tx.send(read).is_err() || last {
                    return;
                }
            }
        });
        loop {
            // The reader sends an end or an error before it stops, so this cannot hang.
            let buf = full_rx.recv().map_err(|_| io::Error::other("the reading thread stopped"))??;
            if buf.is_empty() {
                return Ok(hex(&hasher.finalize()));
            }
            hasher.update(&buf);
            let _ = empty_tx.send(buf);
        }
    })
}

/// Files at least this large are hashed by [`file_hash`] with a reading thread.
const PIPELINED_HASH_MIN: u64 = 8 << 20;
/// [`file_hash`]'s reads; and how many buffers the reading thread may fill ahead.
const HASH_BUF: usize = 1 << 20;
const HASH_BUFFERS: usize = 3;

/// sha256 of a file or tree's content: names, types, the executable bit, file contents
/// and link targets. Owners, times and other mode bits do not count. Special files
/// (devices, FIFOs, sockets) are refused. The host's store names items by it, and the
/// guest checks an image's store with it.
pub fn tree_hash(path: &Path) -> io::Result<String> {
    let mut hasher = Sha256::new();
    hasher.update(TREE_ENCODING);
    hash_entry(path, Path::new(""), &mut hasher)?;
    Ok(hex(&hasher.finalize()))
}

fn hash_entry(path: &Path, rel: &Path, hasher: &mut Sha256) -> io::Result<()> {
    let with_path = |e: io::Error| io::Error::new(e.kind(), format!("`{}`: {e}", path.display()));
    let meta = fs::symlink_metadata(path).map_err(with_path)?;
    let ft = meta.file_type();
    let rel_bytes = rel.as_os_str().as_encoded_bytes();
    hasher.update((rel_bytes.len() as u64).to_le_bytes());
    hasher.update(rel_bytes);
    if ft.is_symlink() {
        let target = fs::read_link(path).map_err(with_path)?;
        let t = target.as_os_str().as_encoded_bytes();
        hasher.update(b"l");
        hasher.update((t.len() as u64).to_le_bytes());
        hasher.update(t);
    } else if ft.is_file() {
        hasher.update(if meta.mode() & 0o111 != 0 { b"x" } else { b"f" });
        hasher.update(file_hash(path).map_err(with_path)?.as_bytes());
    } else if ft.is_dir() {
        hasher.update(b"d");
        let mut names: Vec<_> =
            fs::read_dir(path).map_err(with_path)?.map(|e| e.map(|e| e.file_name())).collect::<io::Result<_>>()?;
        names.sort();
        for name in names {
            hash_entry(&path.join(&name), &rel.join(&name), hasher)?;
        }
    } else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("`{}` is a special file (device, FIFO or socket); the store holds none", path.display()),
        ));
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pipelined_file_hash_is_the_plain_sha256() {
        let dir = std::env::temp_dir().join(format!("file-hash-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let sizes = [0, 1, HASH_BUF - 1, PIPELINED_HASH_MIN as usize, PIPELINED_HASH_MIN as usize + HASH_BUF + 7];
        for size in sizes {
            let bytes: Vec<u8> = (0..size).map(|i| (i * 7 + i / 4093) as u8).collect();
            let path = dir.join(format!("f{size}"));
            fs::write(&path, &bytes).unwrap();
            assert_eq!(file_hash(&path).unwrap(), hex(&Sha256::digest(&bytes)), "size {size}");
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn boot_args_from_the_command_line() {
        let line = "BOOT_IMAGE=/x console=ttyS0 vm.root=UUID=AB-cd vm.system=/store/h-system-minimal vm.volatile quiet";
        let args = BootArgs::parse(line).unwrap();
        assert_eq!(args.root_uuid, "ab-cd");
        assert_eq!(args.system, "/store/h-system-minimal");
        assert!(args.volatile && !args.verify_store && !args.boot_check);
        assert_eq!(BootArgs::parse("console=ttyS0 rdinit=/init"), None);
        assert_eq!(BootArgs::parse("vm.root=/dev/sda1"), None, "only UUID= names a root");
        let all = BootArgs::parse("vm.root=UUID=x vm.verify-store vm.boot-check").unwrap();
        assert!(all.verify_store && all.boot_check && !all.volatile);
    }
}
