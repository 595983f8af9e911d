//! `cargo xtask run-vm`: boot a system and run a command in it (its exit status is
//! ours), or give a shell on the serial console.

use anyhow::Result;
use guest::{Mode, Request, Status};

use super::VmOpts;
use crate::vm::{Sink, VmRun};
use crate::{qemu, system, Workspace};

#[derive(Debug, Clone, clap::Args)]
pub struct RunVm {
    #[command(flatten)]
    pub vm: VmOpts,
    /// The command to run in the guest; without one, an interactive shell on the console.
    #[arg(last = true)]
    pub command: Vec<String>,
}

impl RunVm {
    /// Returns the exit status for xtask: the command's own.
    pub fn run(self, ws: &Workspace) -> Result<i32> {
        let system = self.vm.system()?;
        let accel = qemu::choose_accel(self.vm.accel)?;
        let store = self.vm.open_store(ws)?;
        let lowered = system::lower(&store, ws, &system, self.vm.verbose)?;
        let xchg = store.scratch("xchg")?;
        let runtime = store.scratch("run")?;
        let interactive = self.command.is_empty();
        let argv = if interactive { vec!["/bin/sh".to_string()] } else { self.command.clone() };
        let term = std::env::var("TERM").unwrap_or_else(|_| "linux".to_string());
        let request = Request {
            version: guest::PROTOCOL_VERSION,
            mode: if interactive { Mode::Interactive } else { Mode::Command },
            argv,
            env: vec![
                ("PATH".into(), lowered.path.clone()),
                ("HOME".into(), "/root".into()),
                ("USER".into(), "root".into()),
                ("TERM".into(), term),
                ("PS1".into(), format!("[{}:\\w]# ", system.name)),
            ],
            cwd: "/root".into(),
            links: lowered.links.clone(),
            dirs: vec!["/root".into()],
            hostname: system.name.clone(),
            stdout_port: None,
            stderr_port: None,
        };
        if interactive {
            eprintln!("booting `{}`: a shell on the serial console; `poweroff` or Ctrl-a x ends it", system.name);
        }
        let run = VmRun {
            spec: self.vm.spec(accel, &store, &lowered, xchg.path().to_path_buf()),
            request,
            xchg: xchg.path().to_path_buf(),
            runtime: runtime.path().to_path_buf(),
            log_dir: ws.log_dir(),
            label: "run-vm".into(),
            timeout: self.vm.timeout,
            verbose: self.vm.verbose,
            stdout: Sink::Stdout,
            stderr: Sink::Stderr,
        };
        Ok(exit_code(&run.run()?, &self.command))
    }
}

/// The exit status xtask reports for a guest status; a signal death is never success.
pub fn exit_code(status: &Status, argv: &[String]) -> i32 {
    match status {
        Status::Exited(code) => *code,
        Status::Signaled(sig) => {
            let name = nix::sys::signal::Signal::try_from(*sig).map(|s| s.as_str()).unwrap_or("?");
            eprintln!("error: `{}` was killed by signal {sig} ({name}) in the guest", argv.join(" "));
            128 + sig
        }
        Status::Error(msg) => {
            eprintln!("error: {msg}");
            1
        }
    }
}
