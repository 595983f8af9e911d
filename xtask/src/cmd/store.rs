//! `cargo xtask store verify [--repair]`: re-hashes every store item against the hash
//! recorded when it was stored, and reports (or repairs) what does not match.

use anyhow::Result;

use crate::debian::{self, Pin};
use crate::store::{Meta, Store};
use crate::{system, Workspace};

#[derive(Debug, Clone, clap::Subcommand)]
pub enum StoreCmd {
    /// Check every item against its recorded content hash; exit 1 if any is damaged.
    Verify {
        /// Remove damaged entries and rebuild the items that can be rebuilt on their own.
        #[arg(long)]
        repair: bool,
    },
}

impl StoreCmd {
    pub fn run(self, ws: &Workspace) -> Result<i32> {
        let StoreCmd::Verify { repair } = self;
        let store = Store::open(&ws.store_dir, false)?;
        let problems = store.verify()?;
        for p in &problems {
            println!("{}: {}", p.entry, p.what);
        }
        if problems.is_empty() {
            println!("store verified: every item matches its recorded hash ({})", store.root().display());
            return Ok(0);
        }
        if !repair {
            eprintln!(
                "error: {} damaged store entries; `cargo xtask store verify --repair` removes and rebuilds them",
                problems.len()
            );
            return Ok(1);
        }
        let mut entries: Vec<&str> = problems.iter().map(|p| p.entry.as_str()).collect();
        entries.dedup();
        // Read how each was made, remove them all, then rebuild: an item is never rebuilt
        // from a damaged input.
        let metas: Vec<(&str, Option<Meta>)> =
            entries.iter().map(|e| (*e, store.item_of_entry(e).and_then(|item| store.meta(&item).ok()))).collect();
        for entry in &entries {
            store.remove_entry(entry)?;
        }
        for (entry, meta) in metas {
            match meta.as_ref().map(|m| rebuild(&store, m)).transpose()? {
                Some(true) => println!("{entry}: removed and rebuilt"),
                _ => println!("{entry}: removed; it is rebuilt the next time it is needed"),
            }
        }
        let left = store.verify()?;
        if left.is_empty() {
            println!("store repaired");
            Ok(0)
        } else {
            for p in &left {
                eprintln!("still damaged: {}: {}", p.entry, p.what);
            }
            Ok(1)
        }
    }
}

/// Rebuilds an item from its metadata alone, where its kind allows; `false` otherwise.
fn rebuild(store: &Store, meta: &Meta) -> Result<bool> {
    let param = |k: &str| meta.params.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
    match meta.kind.as_str() {
        "debian-package" => {
            let (Some(package), Some(version), Some(sha256)) = (param("package"), param("version"), param("sha256"))
            else {
                return Ok(false);
            };
            // The pool path, for a version apt no longer offers, is in the lock file.
            let locked = crate::lock::read(&crate::lock::path())?
                .into_values()
                .find(|p| p.package == package && p.version == version && p.sha256 == sha256);
            let pin = locked.unwrap_or(Pin { package, version, sha256, ..Pin::default() });
            debian::unpacked(store, &pin)?;
            Ok(true)
        }
        "busybox" => {
            system::busybox(store)?;
            Ok(true)
        }
        _ => Ok(false),
    }
}
