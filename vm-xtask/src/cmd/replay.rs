//! `cargo xtask replay [ID] [-- CMD ...]`: a saved failure ([`crate::vm::replay`])
//! restored, its shares mounted again and the system's services started: a shell on the
//! console, or CMD run there; without an ID, the saved failures listed.

use std::path::Path;

use anyhow::{bail, Context, Result};
use guest::Mode;

use crate::vm::qemu::{MemoryFile, Port};
use crate::vm::replay::{self, Record};
use crate::vm::{GuestRequest, VmRun};
use crate::Workspace;

#[derive(Debug, Clone, clap::Args)]
pub struct Replay {
    /// The saved failure, as `cargo xtask test` named it (`test-3`); without one, the
    /// saved failures are listed.
    pub id: Option<String>,
    /// Copy the console (kernel and helper messages) to stderr, and print QEMU's command.
    #[arg(short, long)]
    pub verbose: bool,
    /// The command to run there; without one, a shell on the console.
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
        crate::process::set_verbose(self.verbose);
        let store = crate::machine::open_store(ws, false)?;
        let qemu = crate::vm::snapshot::qemu_version(&store)?;
        if qemu != record.qemu {
            bail!("`{id}` was saved by {} and only that QEMU loads it; this is {qemu}", record.qemu);
        }
        for (what, path) in [("kernel", &record.spec.kernel), ("initrd", &record.spec.initrd)] {
            if !path.exists() {
                bail!("the {what} `{}` that `{id}` booted is no longer in the store", path.display());
            }
        }
        let xchg = store.exchange()?;
        let runtime = store.scratch("replay")?;
        let view = record.staged.as_ref().map(|s| s.stage(&store)).transpose()?;
        let interactive = self.command.is_empty();
        let spec = spec(&record, xchg.path(), runtime.path(), view.as_ref().map(|v| v.path()), interactive)?;
        let request = request(&record, &self.command);
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
                state: dir.join(id).join(replay::STATE_FILE),
                socket: spec.snapshot_port.clone().context("the saved VM has no snapshot port")?,
                waiting: guest::snapshot::WAITING_AT_FAILURE,
            }),
            attach: record.spec.attach.is_some().then_some(attachable),
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
}

/// The failed run's spec with its per-run paths made this run's: the exchange directory,
/// the staged workspace, the handshake's socket, the RAM (a new private file: the state
/// holds all of it). The output ports are made again by [`VmRun`] for a command; a shell
/// has no use for them, but the VM has them, so they write to files here.
fn spec(
    record: &Record,
    xchg: &Path,
    runtime: &Path,
    view: Option<&Path>,
    interactive: bool,
) -> Result<crate::vm::qemu::VmSpec> {
    let mut spec = record.spec.clone();
    for share in &mut spec.shares {
        if share.tag == guest::XCHG_TAG {
            share.path = xchg.to_path_buf();
        } else if let (Some(staged), Some(view)) = (&record.staged, view) {
            if share.tag == staged.tag {
                share.path = view.to_path_buf();
            }
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
    if spec.memory_file.is_some() {
        let ram = runtime.join("ram");
        let file = crate::store::create_private_file(&ram)?;
        file.set_len(u64::from(spec.memory_mib) << 20)?;
        spec.memory_file = Some(MemoryFile { path: ram, shared: false });
    }
    if !spec.vhost_user_fs.is_empty() {
        bail!("`{}` had a virtiofs share, which no saved VM can have", record.id);
    }
    Ok(spec)
}

/// The replay's request: the failed run's, with `command` (or a shell) to run in the
/// workspace's directory.
fn request(record: &Record, command: &[String]) -> guest::Request {
    let mut request = record.request.clone();
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
