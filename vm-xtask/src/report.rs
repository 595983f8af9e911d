//! Machine-readable results: what `--json` prints on stdout, one JSON document per run
//! (and nothing else there).

use fs_err as fs;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::store::{Item, Outcome, Store};

/// A store item a command produced (`build-in-vm`, `vm-image`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ItemReport {
    /// What the command prints without `--json`: the item, or the image file in it.
    pub path: String,
    /// The item's directory (or file) in the store.
    pub item: String,
    /// The item's name (`--name`, `vm-image-SYSTEM-FORMAT`, ...).
    pub name: String,
    /// The recipe hash the item is stored under.
    pub hash: String,
    /// The sha256 of the item's content, as recorded in its `.meta`.
    pub content_sha256: String,
    /// Apparent size of `path` in bytes (a directory: its files added up).
    pub size_bytes: u64,
    /// `hit` (found in the store) or `built`.
    pub outcome: &'static str,
    /// Wall time of the whole command, in seconds.
    pub wall_s: f64,
}

impl ItemReport {
    pub fn new(store: &Store, item: &Item, path: &Path, outcome: Outcome, started: Instant) -> Result<ItemReport> {
        let meta = store.meta(item).with_context(|| format!("reading the record of `{}`", item.file_name()))?;
        Ok(ItemReport {
            path: path.display().to_string(),
            item: item.path.display().to_string(),
            name: item.name.clone(),
            hash: item.hash.clone(),
            content_sha256: meta.content_sha256,
            size_bytes: apparent_size(path)?,
            outcome: match outcome {
                Outcome::Hit => "hit",
                Outcome::Built => "built",
                Outcome::Substituted => "substituted",
            },
            wall_s: started.elapsed().as_secs_f64(),
        })
    }
}

/// The apparent size of a file, or of every file under a directory (links count as
/// their own length, never followed).
pub fn apparent_size(path: &Path) -> Result<u64> {
    let meta = fs::symlink_metadata(path).with_context(|| format!("reading `{}`", path.display()))?;
    if !meta.is_dir() {
        return Ok(meta.len());
    }
    let mut total = 0;
    for entry in fs::read_dir(path).with_context(|| format!("listing `{}`", path.display()))? {
        total += apparent_size(&entry?.path())?;
    }
    Ok(total)
}

/// The one JSON document of a run, pretty-printed, ended by a newline.
pub fn to_json(value: &impl Serialize) -> Result<String> {
    Ok(serde_json::to_string_pretty(value)? + "\n")
}

/// Prints `value` as the run's JSON document on stdout.
pub fn print_json(value: &impl Serialize) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(to_json(value)?.as_bytes())?;
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item_reports_carry_the_records_hash_and_the_size() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), false).unwrap();
        let started = Instant::now();
        let recipe = crate::store::Recipe::new("test", "report-me");
        let (item, outcome) = store
            .realise_with_outcome(&recipe, |out| {
                fs::create_dir(out)?;
                fs::write(out.join("a"), "12345")?;
                fs::create_dir(out.join("d"))?;
                fs::write(out.join("d/b"), "678")?;
                Ok(())
            })
            .unwrap();
        let report = ItemReport::new(&store, &item, &item.path, outcome, started).unwrap();
        let value: serde_json::Value = serde_json::from_str(&to_json(&report).unwrap()).unwrap();
        assert_eq!(value["name"], "report-me");
        assert_eq!(value["outcome"], "built");
        assert_eq!(value["size_bytes"], 8);
        assert_eq!(value["hash"], item.hash.as_str());
        assert_eq!(value["content_sha256"], store.meta(&item).unwrap().content_sha256.as_str());
        assert_eq!(value["content_sha256"].as_str().unwrap().len(), 64);
        assert!(value["wall_s"].as_f64().unwrap() >= 0.0);
        let (again, outcome) = store.realise_with_outcome(&recipe, |_| unreachable!()).unwrap();
        assert_eq!(ItemReport::new(&store, &again, &again.path, outcome, started).unwrap().outcome, "hit");
    }
}
