//! `cargo xtask scenario NAME`: boots a scenario's nodes on their virtual networks and
//! runs its script ([`crate::vm::scenario`]); `--keep` leaves the nodes up afterwards, and
//! `--shell NODE` (from another terminal) runs commands on a kept node.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use guest::control::{base64_decode, FromGuest, ToGuest};
use serde::{Deserialize, Serialize};

use super::{usage_error, VmOpts};
use crate::vm::scenario::{self, Driver};
use crate::Workspace;

#[derive(Debug, Clone, clap::Args)]
pub struct ScenarioCmd {
    /// The scenario (`--list` shows them).
    #[arg(required_unless_present = "list")]
    pub name: Option<String>,
    /// List the scenarios.
    #[arg(long)]
    pub list: bool,
    /// Leave the nodes up at the end (or at a failure) until Ctrl-C.
    #[arg(long)]
    pub keep: bool,
    /// Attach a shell to NODE of a kept scenario (one command per line).
    #[arg(long, value_name = "NODE")]
    pub shell: Option<String>,
    /// Also write the result as JUnit XML to FILE (a `testsuite` for the scenario, a
    /// `testcase` for its script, with the failure and the nodes' console tails).
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
    /// Do not save the nodes when the script fails (saved, `cargo xtask replay ID`
    /// restores them; `XTASK_REPLAY_KEEP` is how many failures are kept).
    #[arg(long)]
    pub no_replay: bool,
    #[command(flatten)]
    pub vm: VmOpts,
}

/// What `--keep` records for `--shell`.
#[derive(Debug, Serialize, Deserialize)]
struct Kept {
    pid: u32,
    /// Node name, control socket, console log.
    nodes: Vec<(String, PathBuf, PathBuf)>,
}

fn kept_path(ws: &Workspace, name: &str) -> PathBuf {
    ws.target_dir.join("scenarios").join(format!("{name}.json"))
}

impl ScenarioCmd {
    pub fn run(self, ws: &Workspace) -> Result<i32> {
        if self.list {
            for s in crate::Catalog::current().all_scenarios() {
                println!("{:<20} {}", s.name, s.description);
            }
            return Ok(0);
        }
        let name = self.name.clone().unwrap_or_default();
        let Some(scenario) = crate::Catalog::current().scenario(&name) else {
            let names: Vec<&str> = crate::Catalog::current().all_scenarios().iter().map(|s| s.name.as_str()).collect();
            return Err(usage_error(format!("unknown scenario `{name}`; known scenarios: {}", names.join(", "))));
        };
        if let Some(node) = &self.shell {
            return shell(ws, &name, node);
        }
        if let Some(file) = &self.junit {
            crate::suite::junit::check_file(file)?;
        }
        let store = self.vm.open_store(ws)?;
        let saving = !self.no_replay && crate::vm::replay::keep()? > 0;
        let mut driver = Driver::prepare(ws, &self.vm, &store, scenario)?;
        eprintln!("scenario `{name}`: {}", scenario.description);
        let started = std::time::Instant::now();
        let result = (scenario.script)(&mut driver);
        if let Some(file) = &self.junit {
            crate::suite::junit::write_scenario(file, &name, started.elapsed(), &result)?;
        }
        match &result {
            Ok(()) => eprintln!("scenario `{name}`: passed"),
            Err(e) => {
                eprintln!("error: scenario `{name}` failed: {e:#}");
                if saving {
                    save_failure(ws, &store, &mut driver, &name, e)?;
                }
            }
        }
        if self.keep {
            let nodes = driver.release();
            let kept = Kept { pid: std::process::id(), nodes: nodes.clone() };
            let path = kept_path(ws, &name);
            std::fs::create_dir_all(path.parent().expect("a parent"))?;
            crate::store::write_atomically(&path, &serde_json::to_vec_pretty(&kept)?)?;
            eprintln!("the nodes are kept up until Ctrl-C; attach with `cargo xtask scenario {name} --shell NODE`:");
            for (node, _, console) in &nodes {
                eprintln!("  {node}: console log {}", console.display());
            }
            // Ctrl-C ends the nodes here, so their console logs are completed.
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                signal_hook::flag::register(signal, stop.clone()).context("handling Ctrl-C")?;
            }
            let stopped = driver.wait_all(&stop);
            let _ = std::fs::remove_file(&path);
            if stopped {
                eprintln!("scenario `{name}`: the kept nodes were ended");
                return Ok(130);
            }
        }
        Ok(if result.is_ok() { 0 } else { 1 })
    }
}

/// Saves the running nodes of a failed scenario for `cargo xtask replay`, and says the
/// line that replays them (or why they were not saved).
fn save_failure(
    ws: &Workspace,
    store: &crate::store::Store,
    driver: &mut Driver,
    name: &str,
    error: &anyhow::Error,
) -> Result<()> {
    use crate::vm::replay;
    let scratch = replay::saving_dir(&ws.target_dir)?;
    let (vms, bytes, save_s) = match driver.save_failure(scratch.path()) {
        Ok(saved) => saved,
        Err(e) => {
            eprintln!("replay: the failure was not saved ({e:#})");
            return Ok(());
        }
    };
    let first_line = format!("{error:#}").lines().next().unwrap_or_default().chars().take(200).collect();
    let saved = replay::Failure {
        what: format!("scenario {name}"),
        failed: Some(first_line),
        scenario: Some(name.to_string()),
        vms,
        staged: None,
        bytes,
        save_s,
    };
    replay::keep_failure(store, &ws.target_dir, &format!("scenario-{name}"), scratch, saved, "the nodes")
}

/// Reads commands from stdin, one a line, runs each on `node` of the kept scenario
/// `name`, and prints its output and status.
fn shell(ws: &Workspace, name: &str, node: &str) -> Result<i32> {
    let path = kept_path(ws, name);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("no kept run of scenario `{name}`: start one with `--keep`"))?;
    let kept: Kept = serde_json::from_str(&text).with_context(|| format!("reading `{}`", path.display()))?;
    // Ended by Ctrl-C, the keeper could not remove its record.
    let keeper = nix::unistd::Pid::from_raw(kept.pid as i32);
    if nix::sys::signal::kill(keeper, None).is_err() {
        let _ = std::fs::remove_file(&path);
        bail!("the kept run of scenario `{name}` (process {}) has ended; start one with `--keep`", kept.pid);
    }
    let Some((_, socket, _)) = kept.nodes.iter().find(|(n, _, _)| n == node) else {
        let names: Vec<&str> = kept.nodes.iter().map(|(n, _, _)| n.as_str()).collect();
        return Err(usage_error(format!("scenario `{name}` has no node `{node}`; its nodes: {}", names.join(", "))));
    };
    let stream = UnixStream::connect(socket)
        .with_context(|| format!("connecting to node `{node}` (is the kept scenario still running?)"))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    eprintln!("node `{node}` of scenario `{name}`: one command a line; end with Ctrl-D");
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let timeout = std::time::Duration::from_secs(600);
        let message =
            ToGuest::Run { argv: vec!["sh".into(), "-c".into(), line], timeout_ms: timeout.as_millis() as u64 };
        writer.write_all(format!("{}\n", serde_json::to_string(&message)?).as_bytes())?;
        let answer = scenario::read_message(&mut reader, timeout + scenario::ANSWER_GRACE)
            .with_context(|| format!("node `{node}` gave no answer"))?;
        match answer {
            FromGuest::Done { exit, signal, stdout, stderr, .. } => {
                std::io::stdout().write_all(&base64_decode(&stdout).unwrap_or_default())?;
                std::io::stderr().write_all(&base64_decode(&stderr).unwrap_or_default())?;
                if exit != Some(0) {
                    eprintln!("[exit {exit:?}, signal {signal:?}]");
                }
            }
            other => eprintln!("[{other:?}]"),
        }
    }
    Ok(0)
}
