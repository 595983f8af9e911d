//! A crate's source as cargo can build it on its own: the engine builds the guest helper
//! and the registry client from the source of the crates it was compiled with, wherever
//! cargo keeps them (a path, a git checkout, the registry's cache, a `vendor/`
//! directory).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use fs_err as fs;

/// The directory to build a program of the toolkit's own crates (the guest helper, the
/// registry client) from: `source` itself when it is in a workspace of its own (this
/// repository, a git checkout), else, for a crate as `cargo package` made it (it has a
/// `Cargo.toml.orig`: in cargo's registry cache, a `cargo vendor` directory, an unpacked
/// `.crate`), a copy of it under `scratch`, made its own workspace root. Cargo may then
/// write the copy's lock file (the cache may be read-only), and no workspace the crate
/// sits in (a vendor directory's) claims it. The copy's name holds a hash of the source's
/// files (paths and contents: a `.crate`'s files all have the same mtime) and the copy
/// keeps their mtimes: a changed source gets a fresh copy, an unchanged one keeps cargo's
/// fingerprints. Copies are made aside and renamed into place, so concurrent runs never
/// see half of one.
pub fn standalone_source(source: &Path, scratch: &Path) -> Result<PathBuf> {
    use sha2::{Digest, Sha256};

    if !source.join("Cargo.toml.orig").is_file() {
        return Ok(source.to_path_buf());
    }
    let mut files = Vec::new();
    crate_files(source, Path::new(""), &mut files)?;
    files.sort();
    let mut hasher = Sha256::new();
    let mut stamped = Vec::new();
    for rel in files {
        let path = source.join(&rel);
        let mtime = fs::metadata(&path)?.modified().with_context(|| format!("the mtime of `{}`", path.display()))?;
        hasher.update(rel.as_os_str().as_encoded_bytes());
        hasher.update("\0");
        hasher.update(crate::store::sha256_file(&path)?);
        hasher.update("\n");
        stamped.push((rel, mtime));
    }
    let name = source.file_name().context("a crate directory's name")?.to_string_lossy().into_owned();
    let dest = scratch.join(format!("{name}-{}", &crate::store::hex(&hasher.finalize())[..16]));
    if dest.join("Cargo.toml").is_file() {
        return Ok(dest);
    }
    fs::create_dir_all(scratch)?;
    let temp = tempfile::Builder::new()
        .prefix(".copy-")
        .tempdir_in(scratch)
        .with_context(|| format!("making a directory in `{}`", scratch.display()))?;
    for (rel, mtime) in &stamped {
        let to = temp.path().join(rel);
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent)?;
        }
        let mut bytes = fs::read(source.join(rel))?;
        if rel == Path::new("Cargo.toml") && !bytes.split(|&b| b == b'\n').any(|line| line == b"[workspace]") {
            bytes.extend_from_slice(b"\n# Added by vm-xtask: this copy is a workspace of its own.\n[workspace]\n");
        }
        fs::write(&to, &bytes)?;
        std::fs::File::options()
            .write(true)
            .open(&to)
            .and_then(|f| f.set_modified(*mtime))
            .with_context(|| format!("setting the mtime of `{}`", to.display()))?;
    }
    let temp = temp.keep();
    if let Err(e) = std::fs::rename(&temp, &dest) {
        let _ = std::fs::remove_dir_all(&temp);
        // Another run put the same copy there first.
        if !dest.join("Cargo.toml").is_file() {
            return Err(e)
                .with_context(|| format!("renaming a copy of `{}` to `{}`", source.display(), dest.display()));
        }
    }
    Ok(dest)
}

/// The regular files under `dir` (relative to the crate's root, `rel` being `dir`'s),
/// but those of a `target` directory at the top.
fn crate_files(dir: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let rel = rel.join(entry.file_name());
        if kind.is_dir() && rel != Path::new("target") {
            crate_files(&entry.path(), &rel, out)?;
        } else if kind.is_file() {
            out.push(rel);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packaged_crates_are_built_from_a_copy_that_is_its_own_workspace() {
        let dir = tempfile::tempdir().unwrap();
        let (crate_dir, scratch) = (dir.path().join("vendor/guest-0.1.0"), dir.path().join("scratch"));
        fs::create_dir_all(crate_dir.join("src")).unwrap();
        fs::write(crate_dir.join("Cargo.toml"), "[package]\nname = \"guest\"\n").unwrap();
        fs::write(crate_dir.join("src/main.rs"), "fn main() {}\n").unwrap();
        // Not packaged (no Cargo.toml.orig): built where it is.
        assert_eq!(standalone_source(&crate_dir, &scratch).unwrap(), crate_dir);
        fs::write(crate_dir.join("Cargo.toml.orig"), "[package]\nname = \"guest\"\n").unwrap();
        let copy = standalone_source(&crate_dir, &scratch).unwrap();
        assert!(copy.starts_with(&scratch) && copy.file_name().unwrap().to_string_lossy().starts_with("guest-0.1.0-"));
        let manifest = fs::read_to_string(copy.join("Cargo.toml")).unwrap();
        assert!(manifest.starts_with("[package]\nname = \"guest\"\n") && manifest.ends_with("\n[workspace]\n"));
        let mtime = |p: &Path| fs::metadata(p).unwrap().modified().unwrap();
        assert_eq!(mtime(&copy.join("src/main.rs")), mtime(&crate_dir.join("src/main.rs")));
        assert_eq!(standalone_source(&crate_dir, &scratch).unwrap(), copy, "an unchanged source: the same copy");
        fs::write(crate_dir.join("src/main.rs"), "fn main() { println!(); }\n").unwrap();
        let changed = standalone_source(&crate_dir, &scratch).unwrap();
        assert_ne!(changed, copy);
        assert_eq!(fs::read_to_string(changed.join("src/main.rs")).unwrap(), "fn main() { println!(); }\n");
        let leftovers: Vec<_> = fs::read_dir(&scratch).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(leftovers.len(), 2, "{leftovers:?}");
    }
}
