//! `cargo xtask store verify [--repair]`: re-hashes every store item against the hash
//! recorded when it was stored, and reports (or repairs) what does not match.

use anyhow::Result;
use serde::Serialize;

use crate::lower::debian::{self, Pin};
use crate::store::{Meta, Store};
use crate::{lower::system, Workspace};

#[derive(Debug, Clone, clap::Subcommand)]
pub enum StoreCmd {
    /// Check every item against its recorded content hash; exit 1 if any is damaged.
    #[command(after_help = "Examples:
  cargo xtask store verify
  cargo xtask store verify --repair --json")]
    Verify {
        /// Remove damaged entries and rebuild the items that can be rebuilt on their own.
        #[arg(long)]
        repair: bool,
        /// Print one JSON document on stdout: the store, each problem, and with
        /// --repair what was removed and rebuilt and what is still damaged.
        #[arg(long)]
        json: bool,
    },
}

/// What `store verify --json` prints.
#[derive(Debug, Default, Serialize)]
pub struct VerifyReport {
    pub store: String,
    /// Whether the store is sound at the end (after the repair, with --repair).
    pub ok: bool,
    /// What was found wrong.
    pub problems: Vec<ProblemReport>,
    /// With --repair: each damaged entry, removed, and whether it was rebuilt now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repaired: Option<Vec<RepairReport>>,
    /// With --repair: what is still damaged after it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub still_damaged: Option<Vec<ProblemReport>>,
    pub wall_s: f64,
}

#[derive(Debug, Serialize)]
pub struct ProblemReport {
    pub entry: String,
    pub what: String,
}

#[derive(Debug, Serialize)]
pub struct RepairReport {
    pub entry: String,
    pub rebuilt: bool,
}

fn problem_reports(problems: &[crate::store::Problem]) -> Vec<ProblemReport> {
    problems.iter().map(|p| ProblemReport { entry: p.entry.clone(), what: p.what.clone() }).collect()
}

impl StoreCmd {
    pub fn run(self, ws: &Workspace) -> Result<i32> {
        let started = std::time::Instant::now();
        let StoreCmd::Verify { repair, json } = self;
        let store = Store::open(&ws.store_dir, false)?;
        let problems = store.verify()?;
        let mut report = VerifyReport {
            store: store.root().display().to_string(),
            problems: problem_reports(&problems),
            ..VerifyReport::default()
        };
        // Text lines on stdout, unless the JSON document is the result.
        let say = |line: String| {
            if !json {
                println!("{line}");
            }
        };
        let finish = |mut report: VerifyReport, ok: bool| -> Result<i32> {
            report.ok = ok;
            report.wall_s = started.elapsed().as_secs_f64();
            if json {
                crate::report::print_json(&report)?;
            }
            Ok(if ok { 0 } else { 1 })
        };
        for p in &problems {
            say(format!("{}: {}", p.entry, p.what));
        }
        if problems.is_empty() {
            say(format!("store verified: every item matches its recorded hash ({})", store.root().display()));
            return finish(report, true);
        }
        if !repair {
            eprintln!(
                "error: {} damaged store entries; `cargo xtask store verify --repair` removes and rebuilds them",
                problems.len()
            );
            return finish(report, false);
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
        let mut repaired = Vec::new();
        for (entry, meta) in metas {
            let rebuilt = meta.as_ref().map(|m| rebuild(&store, m)).transpose()? == Some(true);
            match rebuilt {
                true => say(format!("{entry}: removed and rebuilt")),
                false => say(format!("{entry}: removed; it is rebuilt the next time it is needed")),
            }
            repaired.push(RepairReport { entry: entry.to_string(), rebuilt });
        }
        let left = store.verify()?;
        report.repaired = Some(repaired);
        report.still_damaged = Some(problem_reports(&left));
        if left.is_empty() {
            say("store repaired".to_string());
            finish(report, true)
        } else {
            for p in &left {
                eprintln!("still damaged: {}: {}", p.entry, p.what);
            }
            finish(report, false)
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
