//! An item as a layer: a deterministic tar (sorted names, owner 0, time 1 s after the
//! epoch, modes 0444/0555 as in the store), gzip-compressed; and the way back, for a
//! layer nobody vouches for: only directories, regular files and symbolic links, every
//! name below `item/` checked, every parent one this unpacking made itself (so nothing is
//! written through a link), files made with `O_CREAT|O_EXCL|O_NOFOLLOW`, sizes and counts
//! bounded. xtask then ingests the result through directory descriptors as it does a
//! guest's output, which refuses links leading outside the item.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The top entry's name.
const TOP: &str = "item";
/// Most entries a layer may hold.
const MAX_ENTRIES: u64 = 1_000_000;

/// The gzip-compressed tar of the file or directory at `path`.
pub fn pack(path: &Path) -> Result<Vec<u8>> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(3));
    let mut tar = tar::Builder::new(gz);
    tar.follow_symlinks(false);
    add(&mut tar, path, PathBuf::from(TOP))?;
    let gz = tar.into_inner().context("finishing the tar")?;
    gz.finish().context("compressing")
}

fn add<W: Write>(tar: &mut tar::Builder<W>, path: &Path, name: PathBuf) -> Result<()> {
    let meta = std::fs::symlink_metadata(path).with_context(|| format!("reading `{}`", path.display()))?;
    let mut header = tar::Header::new_gnu();
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(1);
    let ft = meta.file_type();
    if ft.is_dir() {
        header.set_entry_type(tar::EntryType::Directory);
        header.set_mode(0o555);
        header.set_size(0);
        tar.append_data(&mut header, &name, std::io::empty())
            .with_context(|| format!("adding `{}`", path.display()))?;
        let mut names: Vec<_> = std::fs::read_dir(path)
            .with_context(|| format!("listing `{}`", path.display()))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<_>>()?;
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for n in names {
            add(tar, &path.join(&n), name.join(&n))?;
        }
    } else if ft.is_symlink() {
        let target = std::fs::read_link(path).with_context(|| format!("reading `{}`", path.display()))?;
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_mode(0o777);
        header.set_size(0);
        tar.append_link(&mut header, &name, &target).with_context(|| format!("adding `{}`", path.display()))?;
    } else if ft.is_file() {
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(if meta.mode() & 0o111 != 0 { 0o555 } else { 0o444 });
        header.set_size(meta.len());
        let file = std::fs::File::open(path).with_context(|| format!("opening `{}`", path.display()))?;
        tar.append_data(&mut header, &name, file.take(meta.len()))
            .with_context(|| format!("adding `{}`", path.display()))?;
    } else {
        bail!("`{}` is a special file", path.display());
    }
    Ok(())
}

/// Unpacks the layer `file` as `to` (a new file or directory), as the module doc says.
pub fn unpack(file: &Path, to: &Path, max_bytes: u64) -> Result<()> {
    let parent = to.parent().context("no parent")?;
    let f = std::fs::File::open(file).with_context(|| format!("opening `{}`", file.display()))?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(f));
    let mut dirs: HashSet<Vec<u8>> = HashSet::new();
    let mut seen: HashSet<Vec<u8>> = HashSet::new();
    let (mut bytes, mut entries) = (0u64, 0u64);
    for entry in archive.entries().context("reading the tar")? {
        let mut entry = entry.context("reading the tar")?;
        entries += 1;
        if entries > MAX_ENTRIES {
            bail!("more than {MAX_ENTRIES} entries");
        }
        let raw = entry.path_bytes().into_owned();
        let name = check_name(&raw)?;
        let shown = String::from_utf8_lossy(&name).escape_debug().to_string();
        if !seen.insert(name.clone()) {
            bail!("`{shown}` appears twice");
        }
        let up = name.iter().rposition(|b| *b == b'/').map(|i| name[..i].to_vec());
        match &up {
            None if name != TOP.as_bytes() => bail!("`{shown}` is not below `{TOP}`"),
            Some(up) if !dirs.contains(up) => bail!("`{shown}` is not in a directory of the layer"),
            _ => {}
        }
        let path = parent.join(OsStr::from_bytes(&name));
        let exec = entry.header().mode().context("a mode")? & 0o111 != 0;
        match entry.header().entry_type() {
            tar::EntryType::Directory => {
                std::fs::create_dir(&path).with_context(|| format!("creating `{shown}`"))?;
                dirs.insert(name);
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = entry.size();
                bytes = bytes.saturating_add(size);
                if bytes > max_bytes {
                    bail!("`{shown}` brings the item over {max_bytes} bytes");
                }
                let mut out = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(nix_o_nofollow())
                    .mode(if exec { 0o700 } else { 0o600 })
                    .open(&path)
                    .with_context(|| format!("creating `{shown}`"))?;
                let copied = std::io::copy(&mut (&mut entry).take(size), &mut out)
                    .with_context(|| format!("writing `{shown}`"))?;
                if copied != size {
                    bail!("`{shown}` is truncated");
                }
            }
            tar::EntryType::Symlink => {
                let target = entry.link_name_bytes().context("a link without a target")?.into_owned();
                if target.is_empty() || target.contains(&0) {
                    bail!("`{shown}` is a link with an invalid target");
                }
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &path)
                    .with_context(|| format!("creating `{shown}`"))?;
            }
            other => bail!("`{shown}` is a {other:?} entry; a layer holds only directories, files and links"),
        }
    }
    if !seen.contains(TOP.as_bytes()) {
        bail!("the layer holds no `{TOP}`");
    }
    Ok(())
}

fn nix_o_nofollow() -> i32 {
    // O_NOFOLLOW on x86_64 and aarch64 Linux.
    0o400000
}

/// The entry's name, checked: relative, no `.`, `..` or empty components, no NUL.
fn check_name(raw: &[u8]) -> Result<Vec<u8>> {
    let trimmed = raw.strip_suffix(b"/").unwrap_or(raw);
    let ok = !trimmed.is_empty()
        && !trimmed.contains(&0)
        && trimmed.split(|b| *b == b'/').all(|c| !c.is_empty() && c != b"." && c != b".." && c.len() <= 255);
    if !ok {
        bail!("entry name `{}` is not a plain relative path", String::from_utf8_lossy(raw).escape_debug());
    }
    Ok(trimmed.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_packed_tree_unpacks_the_same_and_packs_to_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("sub/deep")).unwrap();
        std::fs::write(tree.join("sub/deep/f"), "data").unwrap();
        std::fs::write(tree.join("x"), "exec").unwrap();
        std::fs::set_permissions(tree.join("x"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("/absolute/elsewhere", tree.join("abs")).unwrap();
        std::os::unix::fs::symlink("sub/deep/f", tree.join("rel")).unwrap();
        let long = "n".repeat(200);
        std::fs::write(tree.join("sub").join(&long), "long name").unwrap();
        let packed = pack(&tree).unwrap();
        assert_eq!(packed, pack(&tree).unwrap(), "packing is deterministic");
        let layer = dir.path().join("layer");
        std::fs::write(&layer, &packed).unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        unpack(&layer, &out.join("item"), 1 << 20).unwrap();
        let item = out.join("item");
        assert_eq!(std::fs::read_to_string(item.join("sub/deep/f")).unwrap(), "data");
        assert_eq!(std::fs::read_to_string(item.join("sub").join(&long)).unwrap(), "long name");
        assert_eq!(std::fs::read_link(item.join("abs")).unwrap(), Path::new("/absolute/elsewhere"));
        assert!(std::fs::metadata(item.join("x")).unwrap().permissions().mode() & 0o111 != 0);
        assert!(std::fs::metadata(item.join("sub/deep/f")).unwrap().permissions().mode() & 0o111 == 0);
        let over = dir.path().join("over");
        std::fs::create_dir(&over).unwrap();
        assert!(unpack(&layer, &over.join("item"), 10).is_err(), "the size bound holds");
    }

    /// A tar entry: name, type, link target, data.
    type Entry<'a> = (&'a str, tar::EntryType, &'a str, &'a [u8]);

    /// A layer of `entries`, gzip-compressed.
    fn layer(entries: &[Entry]) -> Vec<u8> {
        let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
        for (name, kind, target, data) in entries {
            let mut h = tar::Header::new_old();
            // Written raw: the tar crate refuses to write `..` itself.
            let bytes = name.as_bytes();
            h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
            h.set_entry_type(*kind);
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
            if !target.is_empty() {
                h.set_link_name(target).unwrap();
            }
            h.set_cksum();
            tar.append(&h, *data).unwrap();
        }
        tar.into_inner().unwrap().finish().unwrap()
    }

    #[test]
    fn hostile_layers_are_refused_and_write_nothing_outside() {
        use tar::EntryType::{Block, Char, Directory, Fifo, Link, Regular, Symlink};
        let cases: Vec<(&str, Vec<Entry>)> = vec![
            ("dot-dot", vec![("item", Directory, "", b""), ("item/../escape", Regular, "", b"x")]),
            ("absolute", vec![("/tmp/escape", Regular, "", b"x")]),
            ("not below item", vec![("other", Regular, "", b"x")]),
            (
                "through a link",
                vec![
                    ("item", Directory, "", b""),
                    ("item/l", Symlink, "/tmp", b""),
                    ("item/l/escape", Regular, "", b"x"),
                ],
            ),
            (
                "a link replaced",
                vec![("item", Directory, "", b""), ("item/l", Symlink, "../..", b""), ("item/l", Regular, "", b"x")],
            ),
            ("hard link", vec![("item", Directory, "", b""), ("item/h", Link, "/etc/passwd", b"")]),
            ("device", vec![("item", Directory, "", b""), ("item/d", Char, "", b"")]),
            ("block", vec![("item", Directory, "", b""), ("item/d", Block, "", b"")]),
            ("fifo", vec![("item", Directory, "", b""), ("item/d", Fifo, "", b"")]),
            ("no parent", vec![("item", Directory, "", b""), ("item/a/b", Regular, "", b"x")]),
            ("empty", vec![]),
        ];
        for (what, entries) in cases {
            let scratch = tempfile::tempdir().unwrap();
            let file = scratch.path().join("layer");
            std::fs::write(&file, layer(&entries)).unwrap();
            let out = scratch.path().join("out");
            std::fs::create_dir(&out).unwrap();
            assert!(unpack(&file, &out.join("item"), 1 << 20).is_err(), "{what}: accepted");
            assert!(!scratch.path().join("escape").exists() && !Path::new("/tmp/escape").exists(), "{what}");
        }
    }
}
