//! Failures saved for replay: a test VM whose program fails stops at its failure point
//! ([`guest::Request::save_failure`]: processes ended, shares unmounted, waiting on the
//! snapshot port), as does each node of a failed scenario when asked
//! ([`guest::control::ToGuest::SaveFailure`]), and [`FailureSaver`], on the host, saves
//! it then through QEMU's monitor (`migrate` to a descriptor it is handed: the RAM and
//! the devices) into a private directory of the target directory, `vm-replay/ID/`, with
//! a [`Record`] of what restoring it takes (each VM's QEMU spec and request, QEMU's
//! version, the workspace's view). `cargo xtask replay ID` restores it (`-incoming`, as a
//! warm start) and has the guest mount its shares again, start its services and run a
//! shell or a command there.
//!
//! Saved failures are the newest [`keep`] of each label (`test`, `scenario-NAME`;
//! `XTASK_REPLAY_KEEP`, 5 unless set; 0 saves none); older ones are removed as a new one
//! is kept.

use fs_err as fs;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::error::usage_error;
use crate::vm::qemu::VmSpec;
use crate::vm::snapshot::{self, Monitor};

/// The directory of saved failures in a target directory.
pub fn dir(target_dir: &Path) -> PathBuf {
    target_dir.join("vm-replay")
}

/// The saved state, inside a failure's directory.
pub const STATE_FILE: &str = "state";
/// The record, inside a failure's directory.
pub const RECORD_FILE: &str = "replay.json";
/// Version of [`Record`]'s layout.
const RECORD_VERSION: u32 = 1;

/// How many saved failures are kept (`XTASK_REPLAY_KEEP`; 0: none is saved).
pub fn keep() -> Result<usize> {
    match std::env::var("XTASK_REPLAY_KEEP") {
        Err(_) => Ok(5),
        Ok(v) => v.trim().parse().map_err(|_| {
            usage_error(format!("XTASK_REPLAY_KEEP=`{v}`: give how many failures to keep for replay (0 for none)"))
        }),
    }
}

/// A read-only tree shared with the VM that a replay stages anew (the workspace's view:
/// [`crate::vm::workspace_view::stage`]'s arguments).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StagedShare {
    pub tag: String,
    pub root: PathBuf,
    pub exclude: Vec<PathBuf>,
    pub mount_points: Vec<PathBuf>,
}

impl StagedShare {
    /// Stages the view (it lives as long as what is returned).
    pub fn stage(&self, store: &crate::store::Store) -> Result<crate::store::Exchange> {
        let exclude: Vec<&Path> = self.exclude.iter().map(PathBuf::as_path).collect();
        crate::vm::workspace_view::stage(store, &self.root, &exclude, &self.mount_points)
    }
}

/// What restoring a saved failure takes, beside its state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub version: u32,
    pub id: String,
    /// Seconds since the epoch when it was saved.
    pub saved_at: u64,
    /// What ran (`test debian-base`) and what failed, as the run said it.
    pub what: String,
    pub failed: Option<String>,
    /// `qemu-system-x86_64 --version`'s first line: only that QEMU loads the state.
    pub qemu: String,
    /// The scenario whose nodes these are; none for a test run's one VM.
    pub scenario: Option<String>,
    /// Each VM saved: a test run's one, or a scenario's nodes.
    pub vms: Vec<SavedVm>,
    pub staged: Option<StagedShare>,
    /// The saved states' size, and how long saving took.
    pub bytes: u64,
    pub save_s: f64,
}

/// One VM of a saved failure.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedVm {
    /// `test`, or the scenario's node.
    pub name: String,
    /// Its state's file, in the failure's directory.
    pub state: String,
    /// QEMU's spec as the failed run had it (its per-run paths are replaced on replay).
    pub spec: VmSpec,
    /// The request its guest had.
    pub request: guest::Request,
}

/// What the saver saw: the state saved (its size and time) or why not.
#[derive(Debug, Clone)]
pub enum Saved {
    Done { bytes: u64, save_s: f64 },
    Failed(String),
}

/// Saves the VM of one run at its failure point, if it comes to one: a thread that
/// waits on the snapshot port for the guest to say it waits, saves the VM into
/// [`FailureSaver::state`] through the monitor, and tells the guest to go on.
#[derive(Clone)]
pub struct FailureSaver {
    /// Where the state goes (a private scratch directory until the run keeps it).
    pub state: PathBuf,
    /// The monitor's socket QEMU listens on (`-monitor unix:...`).
    pub monitor: PathBuf,
    outcome: Arc<Mutex<Option<Saved>>>,
    /// QEMU's spec and the guest's request as the run had them.
    ran: Arc<Mutex<(Option<VmSpec>, Option<guest::Request>)>>,
    stop: Arc<AtomicBool>,
}

impl FailureSaver {
    pub fn new(state: PathBuf, monitor: PathBuf) -> FailureSaver {
        FailureSaver { state, monitor, outcome: Arc::default(), ran: Arc::default(), stop: Arc::default() }
    }

    /// What happened, once the run is over: None when the guest never stopped at a
    /// failure point.
    pub fn outcome(&self) -> Option<Saved> {
        self.outcome.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Notes the spec QEMU runs.
    pub fn set_spec(&self, spec: &VmSpec) {
        self.ran.lock().unwrap_or_else(|e| e.into_inner()).0 = Some(spec.clone());
    }

    /// Notes the request the guest reads.
    pub fn set_request(&self, request: &guest::Request) {
        self.ran.lock().unwrap_or_else(|e| e.into_inner()).1 = Some(request.clone());
    }

    /// The spec and request the run had ([`FailureSaver::set_spec`], [`FailureSaver::set_request`]).
    pub fn ran(&self) -> Option<(VmSpec, guest::Request)> {
        let ran = self.ran.lock().unwrap_or_else(|e| e.into_inner());
        Some((ran.0.clone()?, ran.1.clone()?))
    }

    /// Watches `socket` (the snapshot port) until [`FailureSaver::stop`].
    pub fn start(&self, socket: PathBuf) -> std::thread::JoinHandle<()> {
        let saver = self.clone();
        std::thread::spawn(move || {
            let Some(mut stream) = saver.wait_for_failure(&socket) else { return };
            let started = Instant::now();
            let saved = match saver.save() {
                Ok(bytes) => Saved::Done { bytes, save_s: started.elapsed().as_secs_f64() },
                Err(e) => Saved::Failed(format!("{e:#}")),
            };
            *saver.outcome.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
            // Whatever happened, the guest goes on to write its status.
            let _ = snapshot::send_go(&mut stream);
        })
    }

    /// Ends the watch (the run is over).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Connects to the snapshot port and reads until the guest says it waits.
    fn wait_for_failure(&self, socket: &Path) -> Option<UnixStream> {
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(_) if self.stopped() => return None,
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        stream.set_read_timeout(Some(Duration::from_millis(200))).ok()?;
        let mut reader = BufReader::new(stream.try_clone().ok()?);
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(_) if line.trim_end() == guest::snapshot::WAITING_AT_FAILURE => return Some(stream),
                Ok(0) => return None,
                // Anything else on the port is not for us; the line is cut at 4 KiB.
                Ok(_) => {}
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(_) => return None,
            }
            if self.stopped() {
                return None;
            }
        }
    }

    /// Saves the running VM (its RAM and devices) to [`FailureSaver::state`].
    fn save(&self) -> Result<u64> {
        let mut hmp = Monitor::connect(&self.monitor)?;
        let file = crate::store::create_private_file(&self.state)?;
        // The same stream format as a warm start's (a restore says the same).
        snapshot::expect_ok(&hmp.ask("migrate_set_capability x-ignore-shared on")?)?;
        hmp.send_fd("replay", file.as_raw_fd())?;
        drop(file);
        snapshot::expect_ok(&hmp.ask("migrate fd:replay")?)?;
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let info = hmp.ask("info migrate")?;
            if info.contains("Migration status: completed") {
                break;
            }
            if info.contains("Migration status: failed") || info.contains("cancelled") {
                bail!("QEMU could not save the VM: {}", info.trim());
            }
            if Instant::now() > deadline {
                let _ = hmp.ask("migrate_cancel");
                bail!("saving the VM took over 5 minutes");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // A completed migration leaves the VM paused.
        let _ = hmp.ask("cont")?;
        Ok(fs::metadata(&self.state)?.len())
    }
}

/// A failure's ID: letters, digits and `-` (`test-3`).
pub fn check_id(id: &str) -> Result<()> {
    if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(usage_error(format!(
            "`{}` is not a replay ID: IDs are letters, digits and `-`; `cargo xtask replay` lists them",
            id.escape_debug()
        )));
    }
    Ok(())
}

/// The saved failures in `dir`, oldest first.
pub fn list(dir: &Path) -> Vec<Record> {
    let mut records: Vec<Record> =
        std::fs::read_dir(dir).into_iter().flatten().flatten().filter_map(|e| read_record(&e.path()).ok()).collect();
    records.sort_by_key(|r| (r.saved_at, number(&r.id)));
    records
}

fn number(id: &str) -> u64 {
    id.rsplit('-').next().and_then(|n| n.parse().ok()).unwrap_or(0)
}

fn read_record(failure_dir: &Path) -> Result<Record> {
    let bytes = fs::read(failure_dir.join(RECORD_FILE))?;
    let record: Record = serde_json::from_slice(&bytes).context("not a replay record")?;
    if record.version != RECORD_VERSION {
        bail!("a replay record of another version ({})", record.version);
    }
    Ok(record)
}

/// The saved failure `id` in `dir`, or a usage error listing those there are.
pub fn find(dir: &Path, id: &str) -> Result<Record> {
    check_id(id)?;
    match read_record(&dir.join(id)) {
        Ok(record) if record.id == id => Ok(record),
        _ => {
            let ids: Vec<String> = list(dir).into_iter().map(|r| r.id).collect();
            let known = if ids.is_empty() { "none is saved".to_string() } else { format!("saved: {}", ids.join(", ")) };
            Err(usage_error(format!("no saved failure `{id}` in `{}` ({known})", dir.display())))
        }
    }
}

impl SavedVm {
    /// Its spec for a restore in this run: the exchange share at `xchg`, and the RAM, if
    /// it had a file, a new private one at `ram` (sized, empty: the state holds all of it).
    /// The rest of its per-run paths are the caller's to make its own.
    pub fn spec_for_restore(&self, xchg: &Path, ram: &Path) -> Result<VmSpec> {
        let mut spec = self.spec.clone();
        for share in spec.shares.iter_mut().filter(|s| s.tag == guest::XCHG_TAG) {
            share.path = xchg.to_path_buf();
        }
        if spec.memory_file.is_some() {
            crate::store::create_private_file(ram)?.set_len(u64::from(spec.memory_mib) << 20)?;
            spec.memory_file = Some(crate::vm::qemu::MemoryFile { path: ram.to_path_buf(), shared: false });
        }
        Ok(spec)
    }
}

/// A private directory in the saved failures' directory of `target_dir`, where a
/// failure's states are written until [`keep_failure`] keeps them (removed when dropped
/// otherwise).
pub fn saving_dir(target_dir: &Path) -> Result<tempfile::TempDir> {
    let dir = self::dir(target_dir);
    crate::store::ensure_private_dir(&dir)?;
    Ok(tempfile::Builder::new().prefix(".saving-").tempdir_in(&dir)?)
}

/// A failure a run saved, for [`keep_failure`]: the [`Record`]'s own fields.
pub struct Failure {
    /// What ran (`test debian-base`, `scenario NAME`) and what failed, as the run said it.
    pub what: String,
    pub failed: Option<String>,
    pub scenario: Option<String>,
    pub vms: Vec<SavedVm>,
    pub staged: Option<StagedShare>,
    pub bytes: u64,
    pub save_s: f64,
}

/// Keeps a saved failure: its states (in `scratch`, from [`saving_dir`], beside nothing
/// else) and its record become `target_dir`'s `vm-replay/ID/` under a new ID made from
/// `label` (`test`, `scenario-NAME`); then only the newest [`keep`] of that label stay.
/// Says the line that replays it (`left`: what it holds, "the VM", "the nodes").
pub fn keep_failure(
    store: &crate::store::Store,
    target_dir: &Path,
    label: &str,
    scratch: tempfile::TempDir,
    saved: Failure,
    left: &str,
) -> Result<()> {
    let dir = self::dir(target_dir);
    let arch = saved.vms.first().map(|vm| vm.spec.arch).unwrap_or_default();
    let qemu = crate::vm::snapshot::qemu_version(store, arch)?;
    let keep = keep()?;
    let (bytes, save_s) = (saved.bytes, saved.save_s);
    let scratch = scratch.keep();
    let id = keep_saved(&dir, label, &scratch, saved, qemu, keep).inspect_err(|_| {
        let _ = fs::remove_dir_all(&scratch);
    })?;
    let mib = bytes as f64 / f64::from(1 << 20);
    eprintln!(
        "replay: cargo xtask replay {id}   ({left} as the failure left it: {mib:.1} MiB in {}, saved in {save_s:.1} s)",
        dir.join(&id).display()
    );
    Ok(())
}

/// [`keep_failure`]'s part on disk: the record of `saved` (saved by `qemu`) written in
/// `scratch`, which becomes `dir/ID/`; older ones of the label pruned to `keep`. Returns
/// the ID.
fn keep_saved(dir: &Path, label: &str, scratch: &Path, saved: Failure, qemu: String, keep: usize) -> Result<String> {
    crate::store::ensure_private_dir(dir)?;
    let next = list(dir).iter().map(|r| number(&r.id)).max().unwrap_or(0) + 1;
    let label: String = label.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
    let (id, target) = (next..)
        .map(|n| format!("{label}-{n}"))
        .map(|id| {
            let target = dir.join(&id);
            (id, target)
        })
        .find(|(_, target)| !target.exists())
        .expect("an unbounded range");
    let Failure { what, failed, scenario, vms, staged, bytes, save_s } = saved;
    let record = Record {
        version: RECORD_VERSION,
        id: id.clone(),
        saved_at: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs(),
        what,
        failed,
        qemu,
        scenario,
        vms,
        staged,
        bytes,
        save_s,
    };
    let bytes = serde_json::to_vec_pretty(&record)?;
    crate::store::write_private_atomically(&scratch.join(RECORD_FILE), &bytes)?;
    fs::rename(scratch, &target).with_context(|| format!("keeping the saved failure as `{}`", target.display()))?;
    prune(dir, &label, keep);
    Ok(id)
}

/// Removes all but the newest `keep` saved failures of `label`.
fn prune(dir: &Path, label: &str, keep: usize) {
    let records: Vec<Record> =
        list(dir).into_iter().filter(|r| r.id.rsplit_once('-').is_some_and(|(l, _)| l == label)).collect();
    for old in records.iter().take(records.len().saturating_sub(keep)) {
        let _ = fs::remove_dir_all(dir.join(&old.id));
    }
}

/// Prints the saved failures, newest last: ID, when saved (UTC), how long ago, the
/// state's size, what failed.
pub fn print_list(records: &[Record]) {
    if records.is_empty() {
        eprintln!("no failure is saved for replay (a test binary that fails under `cargo xtask test` is)");
        return;
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let width = records.iter().map(|r| r.id.len()).max().unwrap_or(0).max(2);
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{:<width$}  {:<12}  {:>5}  {:>9}  WHAT", "ID", "SAVED", "AGO", "SIZE");
    for r in records {
        let (at, ago) = crate::vm::attach::when(r.saved_at, now);
        let size = format!("{:.1} MiB", r.bytes as f64 / f64::from(1 << 20));
        let failed = r.failed.as_deref().map(|f| format!(": {f}")).unwrap_or_default();
        let what: String =
            format!("{}{failed}", r.what).chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
        let _ = writeln!(out, "{:<width$}  {at:<12}  {ago:>5}  {size:>9}  {what}", r.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_plain_words() {
        assert!(check_id("test-3").is_ok());
        for bad in ["", "../x", "a b", "a,b", "x\n", "é"] {
            let err = check_id(bad).unwrap_err();
            assert_eq!(crate::error::exit_code(&err), crate::error::EXIT_USAGE, "{bad:?}");
        }
    }
}
