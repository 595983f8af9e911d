//! Normalising the inodes of an ext4 file system that `mke2fs -d` has just written into
//! an image file: `mke2fs` copies each inode's owner, access time and change time from
//! the staging tree, which a rootless build cannot choose (a change time is always
//! "now"). This pass sets them to fixed values in place, directly in the inode tables,
//! and recomputes each inode's checksum.
//!
//! It does what a `debugfs` script of `set_inode_field` commands (one per field and
//! path) does to the inodes, in milliseconds instead of about a second for a few
//! thousand files. Both image builders run it: the host's `xtask`, and the guest helper
//! (`/init normalise-inodes`) in the VM builder; it is public for the engine only.

use std::fs::File;
use std::io::{self, Result};
use std::os::unix::fs::FileExt;
use std::path::Path;

fn fail<T>(msg: String) -> Result<T> {
    Err(io::Error::other(msg))
}

fn context<T>(r: Result<T>, what: &str) -> Result<T> {
    r.map_err(|e| io::Error::new(e.kind(), format!("{what}: {e}")))
}

const SUPERBLOCK_OFFSET: u64 = 1024;
const MAGIC: u16 = 0xEF53;
const ROOT_INO: u32 = 2;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_CSUM_SEED: u32 = 0x2000;
const RO_COMPAT_METADATA_CSUM: u32 = 0x400;
const BG_INODE_UNINIT: u16 = 0x1;
/// `i_extra_isize` from which the inode holds the high half of its checksum.
const CSUM_HI_EXTRA_END: u16 = 4;

/// What every normalised inode gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fixed {
    /// Access and change time, seconds since the epoch (nanoseconds 0).
    pub time: u32,
    /// Owner: user id.
    pub uid: u32,
    /// Owner: group id.
    pub gid: u32,
}

/// The file system's geometry, from its superblock.
struct Geometry {
    block_size: u64,
    groups: u64,
    inodes_per_group: u32,
    inode_size: usize,
    first_ino: u32,
    desc_size: u64,
    gdt_offset: u64,
    /// The inode checksum seed, when inodes carry checksums.
    csum_seed: Option<u32>,
    first_data_block: u64,
    blocks_per_group: u64,
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// CRC32C as the kernel and e2fsprogs use it for metadata: no inversion on the way in
/// or out (the seed carries it).
fn crc32c_raw(seed: u32, data: &[u8]) -> u32 {
    !crc32c::crc32c_append(!seed, data)
}

impl Geometry {
    fn read(file: &File, offset: u64) -> Result<Geometry> {
        let mut sb = [0u8; 1024];
        context(file.read_exact_at(&mut sb, offset + SUPERBLOCK_OFFSET), "reading the superblock")?;
        if le16(&sb, 0x38) != MAGIC {
            return fail(format!("no ext2/3/4 superblock at byte {}", offset + SUPERBLOCK_OFFSET));
        }
        let log_block = le32(&sb, 0x18);
        if log_block > 6 {
            return fail(format!("unsupported block size (log {log_block})"));
        }
        let block_size = 1024u64 << log_block;
        let incompat = le32(&sb, 0x60);
        let ro_compat = le32(&sb, 0x64);
        let blocks = u64::from(le32(&sb, 0x04))
            | if incompat & INCOMPAT_64BIT != 0 { u64::from(le32(&sb, 0x150)) << 32 } else { 0 };
        let first_data_block = u64::from(le32(&sb, 0x14));
        let blocks_per_group = u64::from(le32(&sb, 0x20));
        let inodes_per_group = le32(&sb, 0x28);
        if blocks_per_group == 0 || inodes_per_group == 0 {
            return fail("the superblock has empty groups".into());
        }
        let desc_size = if incompat & INCOMPAT_64BIT != 0 { u64::from(le16(&sb, 0xFE)) } else { 32 };
        if desc_size < 32 {
            return fail(format!("unsupported group descriptor size {desc_size}"));
        }
        let csum_seed = (ro_compat & RO_COMPAT_METADATA_CSUM != 0).then(|| {
            if incompat & INCOMPAT_CSUM_SEED != 0 {
                le32(&sb, 0x270)
            } else {
                crc32c_raw(!0, &sb[0x68..0x78])
            }
        });
        Ok(Geometry {
            block_size,
            groups: (blocks - first_data_block).div_ceil(blocks_per_group),
            inodes_per_group,
            inode_size: usize::from(le16(&sb, 0x58)),
            first_ino: le32(&sb, 0x54),
            desc_size,
            gdt_offset: offset + (first_data_block + 1) * block_size,
            csum_seed,
            first_data_block,
            blocks_per_group,
        })
    }

    fn checksum(&self, seed: u32, ino: u32, inode: &[u8]) -> u32 {
        let mut copy = inode.to_vec();
        put16(&mut copy, 0x7C, 0);
        if self.has_csum_hi(inode) {
            put16(&mut copy, 0x82, 0);
        }
        let crc = crc32c_raw(seed, &ino.to_le_bytes());
        let crc = crc32c_raw(crc, &inode[0x64..0x68]);
        crc32c_raw(crc, &copy)
    }

    fn has_csum_hi(&self, inode: &[u8]) -> bool {
        self.inode_size > 128 && le16(inode, 0x80) >= CSUM_HI_EXTRA_END
    }
}

/// Sets access and change times and owners of the root directory and of every other
/// inode in use that is not reserved (files, directories, links, `lost+found`) to
/// `fixed`, in the file system at byte `offset` of `image`. Returns how many inodes it
/// looked at. Refuses a file system whose existing checksums do not verify.
pub fn normalise_inodes(image: &Path, offset: u64, fixed: Fixed) -> Result<u32> {
    let file = context(File::options().read(true).write(true).open(image), &format!("opening {}", image.display()))?;
    let geo = Geometry::read(&file, offset)?;
    let mut gdt = vec![0u8; (geo.groups * geo.desc_size) as usize];
    context(file.read_exact_at(&mut gdt, geo.gdt_offset), "reading the group descriptors")?;
    let mut seen = 0;
    for group in 0..geo.groups {
        let d = &gdt[(group * geo.desc_size) as usize..((group + 1) * geo.desc_size) as usize];
        if le16(d, 0x12) & BG_INODE_UNINIT != 0 {
            continue;
        }
        let wide = geo.desc_size >= 64;
        let table = u64::from(le32(d, 0x08)) | if wide { u64::from(le32(d, 0x28)) << 32 } else { 0 };
        let unused = u32::from(le16(d, 0x1C)) | if wide { u32::from(le16(d, 0x32)) << 16 } else { 0 };
        let used = geo.inodes_per_group.saturating_sub(unused);
        if used == 0 {
            continue;
        }
        let mut inodes = vec![0u8; used as usize * geo.inode_size];
        let at = offset + table * geo.block_size;
        context(file.read_exact_at(&mut inodes, at), &format!("reading the inode table of group {group}"))?;
        let mut changed = false;
        for (index, inode) in inodes.chunks_exact_mut(geo.inode_size).enumerate() {
            let ino = group as u32 * geo.inodes_per_group + index as u32 + 1;
            if (ino != ROOT_INO && ino < geo.first_ino) || le16(inode, 0) == 0 || le16(inode, 0x1A) == 0 {
                continue;
            }
            seen += 1;
            if let Some(seed) = geo.csum_seed {
                let stored = u32::from(le16(inode, 0x7C))
                    | if geo.has_csum_hi(inode) { u32::from(le16(inode, 0x82)) << 16 } else { 0 };
                let mask = if geo.has_csum_hi(inode) { !0 } else { 0xFFFF };
                if geo.checksum(seed, ino, inode) & mask != stored {
                    return fail(format!("inode {ino} of {} fails its checksum before it is changed", image.display()));
                }
            }
            let before = inode.to_vec();
            put32(inode, 0x08, fixed.time);
            put32(inode, 0x0C, fixed.time);
            put16(inode, 0x02, fixed.uid as u16);
            put16(inode, 0x78, (fixed.uid >> 16) as u16);
            put16(inode, 0x18, fixed.gid as u16);
            put16(inode, 0x7A, (fixed.gid >> 16) as u16);
            let extra = if geo.inode_size > 128 { le16(inode, 0x80) } else { 0 };
            // i_ctime_extra and i_atime_extra (nanoseconds and epoch bits), when present.
            if extra >= 8 {
                put32(inode, 0x84, 0);
            }
            if extra >= 16 {
                put32(inode, 0x8C, 0);
            }
            if let Some(seed) = geo.csum_seed {
                let crc = geo.checksum(seed, ino, inode);
                put16(inode, 0x7C, crc as u16);
                if geo.has_csum_hi(inode) {
                    put16(inode, 0x82, (crc >> 16) as u16);
                }
            }
            changed |= before != *inode;
        }
        if changed {
            context(file.write_all_at(&inodes, at), &format!("writing the inode table of group {group}"))?;
        }
    }
    clear_kbytes_written(&file, offset, &geo)?;
    Ok(seen)
}

/// Sets `s_kbytes_written` to 0 in the superblock and its backups (with their checksums):
/// mke2fs counts there what it wrote, which depends on how it could copy the files (with
/// `FIEMAP` or `SEEK_DATA`, or by reading them), so on the file system the files came
/// from, not on what the image holds.
fn clear_kbytes_written(file: &File, offset: u64, geo: &Geometry) -> Result<()> {
    const KBYTES_WRITTEN: usize = 0x178;
    const CHECKSUM: usize = 0x3FC;
    let primary = offset + SUPERBLOCK_OFFSET;
    let backups = (1..geo.groups).map(|g| offset + (g * geo.blocks_per_group + geo.first_data_block) * geo.block_size);
    for at in std::iter::once(primary).chain(backups) {
        let mut sb = [0u8; 1024];
        context(file.read_exact_at(&mut sb, at), "reading a superblock")?;
        if le16(&sb, 0x38) != MAGIC || sb[KBYTES_WRITTEN..KBYTES_WRITTEN + 8] == [0; 8] {
            continue;
        }
        sb[KBYTES_WRITTEN..KBYTES_WRITTEN + 8].fill(0);
        if geo.csum_seed.is_some() {
            let crc = crc32c_raw(!0, &sb[..CHECKSUM]);
            put32(&mut sb, CHECKSUM, crc);
        }
        context(file.write_all_at(&sb, at), "writing a superblock")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn run(cmd: &mut Command) -> String {
        let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
        assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }

    /// e2fsprogs' `program`, as the image builders run it: Debian's, from the store, through
    /// `cargo xtask image-tools` (which fetches the packages `vm.lock` pins on first use).
    fn tool(program: &str) -> Command {
        static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
        let dir = DIR.get_or_init(|| {
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
            let out = Command::new(cargo)
                .args(["run", "--quiet", "--package", "xtask", "--", "image-tools"])
                .current_dir(workspace)
                .output()
                .expect("running `cargo xtask image-tools`");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "`cargo xtask image-tools` failed: {stderr}");
            std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim_end())
        });
        Command::new(dir.join(program))
    }

    /// A file system made by mke2fs -d at an offset into a file, from a tree whose
    /// inodes have the current time, gets fixed times and owners, and still passes
    /// e2fsck (so the checksums are right).
    #[test]
    fn normalised_inodes_have_fixed_fields_and_valid_checksums() {
        let dir = std::env::temp_dir().join(format!("ext4-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let tree = dir.join("tree");
        std::fs::create_dir_all(tree.join("sub/deeper")).unwrap();
        std::fs::write(tree.join("sub/file"), "contents").unwrap();
        std::os::unix::fs::symlink("sub/file", tree.join("link")).unwrap();
        let image = dir.join("image");
        let offset = 1 << 20;
        // Two block groups: a backup superblock in the second.
        std::fs::File::create(&image).unwrap().set_len(offset + (160 << 20)).unwrap();
        run(tool("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-E", &format!("offset={offset}"), "-d"])
            .arg(&tree)
            .arg(&image)
            .arg("40000"));
        let fixed = Fixed { time: 1, uid: 70000, gid: 7 };
        let seen = normalise_inodes(&image, offset, fixed).unwrap();
        // The root, lost+found, sub, sub/deeper, sub/file and link.
        assert_eq!(seen, 6);
        let spec = format!("{}?offset={offset}", image.display());
        run(tool("e2fsck").args(["-fn", &spec]));
        // mke2fs's count of what it wrote is gone, from the superblock and its backup (in
        // group 1, at block 32768), with checksums e2fsck accepts.
        for superblock in [&["-c"][..], &["-c", "-s", "32768", "-b", "4096"][..]] {
            let stats = run(tool("debugfs").args(superblock).args(["-R", "stats", &spec]));
            assert!(stats.contains("Filesystem magic number:  0xEF53"), "{stats}");
            assert!(!stats.contains("Lifetime writes"), "{superblock:?}: {stats}");
        }
        for path in ["/", "/sub/deeper", "/sub/file", "/link", "/lost+found"] {
            let stat = run(tool("debugfs").args(["-R", &format!("stat \"{path}\""), &spec]));
            assert!(stat.contains("User: 70000   Group:     7"), "{path}: {stat}");
            assert!(stat.contains(" ctime: 0x00000001:00000000"), "{path}: {stat}");
            assert!(stat.contains(" atime: 0x00000001:00000000"), "{path}: {stat}");
        }
        // A second pass finds nothing to change, and a corrupted checksum is refused.
        assert_eq!(normalise_inodes(&image, offset, fixed).unwrap(), 6);
        let file = File::options().read(true).write(true).open(&image).unwrap();
        let geo = Geometry::read(&file, offset).unwrap();
        let mut d = vec![0u8; geo.desc_size as usize];
        file.read_exact_at(&mut d, geo.gdt_offset).unwrap();
        let root = offset + u64::from(le32(&d, 0x08)) * geo.block_size + geo.inode_size as u64;
        // Flip the checksum's low byte (writing a fixed value is a no-op when the random
        // UUID made the checksum end in that value: one run in 256).
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, root + 0x7C).unwrap();
        file.write_all_at(&[!byte[0]], root + 0x7C).unwrap();
        let err = normalise_inodes(&image, offset, fixed).unwrap_err().to_string();
        assert!(err.contains("inode 2") && err.contains("checksum"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_without_a_file_system_is_refused() {
        let image = std::env::temp_dir().join(format!("ext4-test-empty-{}", std::process::id()));
        std::fs::write(&image, vec![0u8; 8192]).unwrap();
        let err = normalise_inodes(&image, 0, Fixed { time: 1, uid: 0, gid: 0 }).unwrap_err().to_string();
        assert!(err.contains("no ext2/3/4 superblock"), "{err}");
        std::fs::remove_file(&image).unwrap();
    }
}
