//! Builds the guest helper (the `guest` crate) as a static binary, from the source of the
//! `guest` crate this program was built with ([`guest::SOURCE_DIR`], wherever cargo
//! keeps it; never the user's workspace), and adds it to the store by content. A
//! fingerprint of its sources (paths, sizes, mtimes) lets an unchanged helper skip the
//! cargo invocation altogether on the hot path. A packaged source (a registry's, a vendor
//! directory's) is built from a copy of its own ([`standalone_source`]).
//!
//! [`standalone_source`]: crate::sources::standalone_source

use fs_err as fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use object::Object;
use sha2::{Digest, Sha256};

use crate::store::{self, Item, Recipe, Store};
use crate::Workspace;
use os_configs::Arch;

const RUSTFLAGS: &str = "-C target-feature=+crt-static -C strip=symbols";

pub fn build(store: &Store, ws: &Workspace, arch: Arch, verbose: bool) -> Result<Item> {
    let target_dir = ws.target_dir.join("guest-helper");
    let memo = match arch {
        Arch::X86_64 => target_dir.join("last-build"),
        other => target_dir.join(format!("last-build-{other}")),
    };
    let source = Path::new(guest::SOURCE_DIR);
    let fingerprint = source_fingerprint(source)?;
    if let Some(item) = fs::read_to_string(&memo)
        .ok()
        .and_then(|m| m.strip_prefix(&format!("{fingerprint} ")).map(str::to_string))
        .and_then(|name| store.lookup(name.trim_end()))
    {
        return Ok(item);
    }
    let built_from = crate::sources::standalone_source(source, &target_dir.join("source"))?;
    let manifest = built_from.join("Cargo.toml");
    let binary = crate::lower::packages::cargo_build_static(
        &manifest,
        "vm-xtask-guest",
        "guest",
        &target_dir,
        RUSTFLAGS,
        arch,
        verbose,
    )
    .with_context(|| format!("building the guest helper for {arch} from `{}`", source.display()))?;
    check_static(&binary)?;
    let name = match arch {
        Arch::X86_64 => "guest-helper".to_string(),
        other => format!("guest-helper-{other}"),
    };
    let recipe = Recipe::new("file", &name).input_content("content", &store::sha256_file(&binary)?);
    let item = store.realise(&recipe, |out| {
        fs::copy(&binary, out).with_context(|| format!("copying `{}`", binary.display()))?;
        Ok(())
    })?;
    // Best effort: without the memo the next run just asks cargo again.
    let _ = fs::write(&memo, format!("{fingerprint} {}\n", item.file_name()));
    Ok(item)
}

/// Paths, sizes and modification times of everything cargo reads to build the helper
/// from `source`: its files and those of the workspace around it (when it is in one).
fn source_fingerprint(source: &Path) -> Result<String> {
    let mut files = Vec::new();
    if let Some(parent) = source.parent() {
        files.extend(["Cargo.lock", "Cargo.toml", ".cargo/config.toml"].map(|f| parent.join(f)));
    }
    files.push(source.join("Cargo.lock"));
    collect_files(source, &mut files)?;
    files.sort();
    let mut hasher = Sha256::new();
    hasher.update(RUSTFLAGS);
    for file in files {
        let (len, mtime) = match fs::metadata(&file) {
            Ok(m) => (m.len(), m.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())),
            Err(_) => (u64::MAX, None),
        };
        hasher.update(file.as_os_str().as_encoded_bytes());
        hasher.update(format!("\0{len}\0{}\n", mtime.map(|d| d.as_nanos()).unwrap_or(0)));
    }
    Ok(store::hex(&hasher.finalize()))
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("listing `{}`", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            if entry.file_name() != "target" {
                collect_files(&path, out)?;
            }
        } else {
            out.push(path);
        }
    }
    Ok(())
}

/// The helper runs before any library exists in the guest: it must have no interpreter.
fn check_static(binary: &Path) -> Result<()> {
    let data = fs::read(binary).with_context(|| format!("reading `{}`", binary.display()))?;
    let file = object::File::parse(&*data).with_context(|| format!("parsing `{}`", binary.display()))?;
    if file.section_by_name_bytes(b".interp").is_some() {
        bail!("the guest helper `{}` is dynamically linked; it must be static", binary.display());
    }
    Ok(())
}
