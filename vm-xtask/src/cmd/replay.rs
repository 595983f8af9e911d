//! `cargo xtask replay [ID] [--node NAME] [-- CMD ...]`: a saved failure
//! ([`crate::vm::replay`]) restored, its shares mounted again and the system's services
//! started: a test run's VM (a shell on its console, or CMD run there) or a scenario's
//! nodes on their networks (a shell on one, through its attach channel, or CMD run there
//! over the control channel); without an ID, the saved failures listed.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use guest::Mode;

use crate::error::usage_error;
use crate::vm::qemu::Port;
use crate::vm::replay::{self, Record, SavedVm};
use crate::vm::scenario::Driver;
use crate::vm::{GuestRequest, VmRun};
use crate::Workspace;

#[derive(Debug, Clone, clap::Args)]
pub struct Replay {
    /// The saved failure, as `cargo xtask test` or `scenario` named it (`test-3`,
    /// `scenario-hello-pair-4`); without one, the saved failures are listed.
    pub id: Option<String>,
    /// A scenario's node to open the shell on or run COMMAND on (default: its first node);
    /// every node is restored, and `cargo xtask attach` reaches the others.
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,
    /// Copy the console (kernel and helper messages) to stderr, and print QEMU's command.
    #[arg(short, long)]
    pub verbose: bool,
    /// The command to run there; without one, a shell.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

impl Replay {
    /// Returns the command's (or the shell's) exit status; 0 when listing.
    pub fn run(self, ws: &Workspace) -> Result<i32> {
        let dir = replay::dir(&ws.target_dir);
        let Some(id) = &self.id else {
            replay::print_list(&replay::list(&dir));
            return Ok(0);
        };
        let record = replay::find(&dir, id)?;
        if self.node.is_some() && record.scenario.is_none() {
            return Err(usage_error(format!("`{id}` is a test run's failure: it has no nodes (no --node)")));
        }
        crate::process::set_verbose(self.verbose);
        let store = crate::machine::open_store(ws, false)?;
        let arch = record.vms.first().map(|vm| vm.spec.arch).unwrap_or_default();
        let qemu = crate::vm::snapshot::qemu_version(&store, arch)?;
        if qemu != record.qemu {
            bail!("`{id}` was saved by {} and only that QEMU loads it; this is {qemu}", record.qemu);
        }
        for vm in &record.vms {
            for (what, path) in [("kernel", &vm.spec.kernel), ("initrd", &vm.spec.initrd)] {
                if !path.exists() {
                    bail!("the {what} `{}` that `{id}` booted is no longer in the store", path.display());
                }
            }
        }
        match &record.scenario {
            Some(name) => self.scenario(ws, &store, &record, &dir, name),
            None => self.test(ws, &store, &record, &dir),
        }
    }

    /// A test run's VM restored: the shell on its console, or the command.
    fn test(&self, ws: &Workspace, store: &crate::store::Store, record: &Record, dir: &Path) -> Result<i32> {
        let id = &record.id;
        let [vm] = &record.vms[..] else { bail!("`{id}` holds {} VMs, not a test run's one", record.vms.len()) };
        let xchg = store.exchange()?;
        let runtime = store.scratch("replay")?;
        let view = record.staged.as_ref().map(|s| s.stage(store)).transpose()?;
        let interactive = self.command.is_empty();
        let view_path = view.as_ref().map(|v| v.path());
        let spec = spec(record, vm, xchg.path(), runtime.path(), view_path, interactive)?;
        let request = request(record, vm, &self.command);
        if interactive {
            let failed = record.failed.as_deref().map(|f| format!(" when {f} failed")).unwrap_or_default();
            eprintln!(
                "replay {id}: the VM as it was{failed}; `sh {}` runs the failed binary again; `poweroff` or \
                 Ctrl-a x ends it",
                guest::replay::RERUN
            );
        }
        let attachable = crate::vm::attach::Attachable {
            dir: crate::vm::attach::registry_dir(&ws.target_dir),
            what: format!("replay {id}"),
        };
        let run = VmRun {
            verbose: self.verbose,
            restore: Some(crate::vm::snapshot::Restore {
                state: dir.join(id).join(&vm.state),
                socket: spec.snapshot_port.clone().context("the saved VM has no snapshot port")?,
                waiting: guest::snapshot::WAITING_AT_FAILURE,
            }),
            attach: vm.spec.attach.is_some().then_some(attachable),
            ..VmRun::new(
                spec,
                GuestRequest::Now(Box::new(request)),
                xchg.path(),
                runtime.path(),
                ws.log_dir(),
                "replay",
            )
        };
        let argv = if interactive { vec!["/bin/sh".to_string()] } else { self.command.clone() };
        Ok(crate::machine::exit_code(&run.run()?, &argv))
    }

    /// A scenario's nodes restored on their networks: a shell on one of them (through
    /// its attach channel), or the command run there; then every node powered off.
    fn scenario(
        &self,
        ws: &Workspace,
        store: &crate::store::Store,
        record: &Record,
        dir: &Path,
        name: &str,
    ) -> Result<i32> {
        let id = &record.id;
        let Some(scenario) = crate::Catalog::current().scenario(name) else {
            bail!("`{id}` is a failure of scenario `{name}`, which this workspace no longer has");
        };
        let node = match &self.node {
            Some(node) if record.vms.iter().any(|v| &v.name == node) => node.clone(),
            Some(node) => {
                let saved: Vec<&str> = record.vms.iter().map(|v| v.name.as_str()).collect();
                return Err(usage_error(format!("`{id}` has no node `{node}` (saved: {})", saved.join(", "))));
            }
            None => record.vms.first().map(|v| v.name.clone()).context("no node was saved")?,
        };
        let started = std::time::Instant::now();
        let mut driver = Driver::restore(ws, store, scenario, record, &dir.join(id))?;
        eprintln!(
            "replay {id}: scenario `{name}` as it was when it failed ({} nodes restored in {:.2} s); node `{node}`",
            record.vms.len(),
            started.elapsed().as_secs_f64()
        );
        let code = if self.command.is_empty() {
            let registry = crate::vm::attach::registry_dir(&ws.target_dir);
            let entry = crate::vm::attach::find(&registry, &crate::vm::attach::id(&format!("replay-{id}-{node}")))?;
            crate::vm::attach::attach(&registry, &entry)?
        } else {
            let words: Vec<String> = self.command.iter().map(|w| crate::process::shell_quote(w)).collect();
            let outcome = driver.node(&node)?.execute(&words.join(" "), Duration::from_secs(3600))?;
            print!("{}", outcome.stdout);
            eprint!("{}", outcome.stderr);
            match (outcome.exit, outcome.signal) {
                (Some(code), _) => code,
                (None, Some(signal)) => 128 + signal,
                (None, None) => 1,
            }
        };
        for saved in &record.vms {
            let _ = driver.node(&saved.name)?.shutdown();
        }
        Ok(code)
    }
}

/// The failed run's spec with its per-run paths made this run's: the exchange directory,
/// the staged workspace, the handshake's socket, the RAM (a new private file: the state
/// holds all of it). The output ports are made again by [`VmRun`] for a command; a shell
/// has no use for them, but the VM has them, so they write to files here.
fn spec(
    record: &Record,
    vm: &SavedVm,
    xchg: &Path,
    runtime: &Path,
    view: Option<&Path>,
    interactive: bool,
) -> Result<crate::vm::qemu::VmSpec> {
    let mut spec = vm.spec_for_restore(xchg, &runtime.join("ram"))?;
    if let (Some(staged), Some(view)) = (&record.staged, view) {
        for share in spec.shares.iter_mut().filter(|s| s.tag == staged.tag) {
            share.path = view.to_path_buf();
        }
    }
    let made_by_the_run = |p: &Port| p.name == "stdout" || p.name == "stderr";
    if interactive {
        for port in spec.ports.iter_mut().filter(|p| made_by_the_run(p)) {
            port.path = runtime.join(&port.name);
        }
    } else {
        spec.ports.retain(|p| !made_by_the_run(p));
    }
    spec.snapshot_port = Some(runtime.join("snapshot.sock"));
    spec.attach = None;
    spec.gdb = None;
    if !spec.vhost_user_fs.is_empty() {
        bail!("`{}` had a virtiofs share, which no saved VM can have", record.id);
    }
    Ok(spec)
}

/// The replay's request: the failed run's, with `command` (or a shell) to run in the
/// workspace's directory.
fn request(record: &Record, vm: &SavedVm, command: &[String]) -> guest::Request {
    let mut request = vm.request.clone();
    if let Some(staged) = &record.staged {
        request.cwd = staged.root.to_string_lossy().into_owned();
    }
    request.replay = true;
    request.save_failure = false;
    request.keep = false;
    request.argv_file = None;
    if command.is_empty() {
        request.mode = Mode::Interactive;
        request.argv = vec!["/bin/sh".into()];
        let term = std::env::var("TERM").unwrap_or_else(|_| "linux".into());
        request.env.retain(|(k, _)| k != "TERM");
        request.env.push(("TERM".into(), term));
    } else {
        request.mode = Mode::Command;
        request.argv = command.to_vec();
    }
    request
}
