//! `cargo xtask run-vm`: boot a system (virtualized: the store shared, a volatile root)
//! and run a command in it once its services are up (its exit status is ours), or give
//! a shell on the serial console; or, with `--script`, make `run-vm.sh`, which does the
//! same without cargo.

use anyhow::Result;
use guest::{Mode, Request, Status};
use os_configs::System;

use super::VmOpts;
use crate::store::Item;
use crate::system::Lowered;
use crate::vm::{Sink, VmRun};
use crate::{qemu, script, system, validate, Workspace};

#[derive(Debug, Clone, clap::Args)]
pub struct RunVm {
    #[command(flatten)]
    pub vm: VmOpts,
    /// Print the path of a `run-vm.sh` store item that boots the system the same way
    /// without cargo (`$(cargo xtask run-vm --script) -- COMMAND`), instead of booting.
    #[arg(long, conflicts_with = "command")]
    pub script: bool,
    /// The command to run in the guest; without one, an interactive shell on the console.
    #[arg(last = true)]
    pub command: Vec<String>,
}

/// The request for `argv` (a shell when interactive) on a lowered system.
pub fn request(system: &System, lowered: &Lowered, system_item: &Item, mode: Mode, argv: Vec<String>) -> Request {
    let term = std::env::var("TERM").unwrap_or_else(|_| "linux".to_string());
    Request {
        version: guest::PROTOCOL_VERSION,
        mode,
        argv,
        env: vec![
            ("PATH".into(), lowered.path.clone()),
            ("HOME".into(), "/root".into()),
            ("USER".into(), "root".into()),
            ("TERM".into(), term),
            ("PS1".into(), format!("[{}:\\w]# ", system.name)),
        ],
        cwd: "/root".into(),
        // The system item's configuration makes the links.
        links: Vec::new(),
        dirs: vec!["/root".into()],
        hostname: system.hostname.clone(),
        stdout_port: None,
        stderr_port: None,
        system: Some(system_item.guest_path()),
        argv_file: None,
    }
}

impl RunVm {
    /// Returns the exit status for xtask: the command's own.
    pub fn run(self, ws: &Workspace) -> Result<i32> {
        let declared = self.vm.system()?;
        let store = self.vm.open_store(ws)?;
        // The system as declared: virtualizing it would paper over a missing root.
        validate::check(&declared, &mut validate::HostFacts::new(&store, ws))?;
        let system = declared.virtualized();
        let accel = qemu::choose_accel(self.vm.accel)?;
        let lowered = system::lower(&store, ws, &system, self.vm.verbose)?;
        let system_item = system::system_item(&store, &system, &lowered)?;
        let shell = vec!["/bin/sh".to_string()];
        if self.script {
            // The script's exchange directory is made per run; this path is replaced.
            let spec = self.vm.spec(accel, &store, &lowered, "/xchg".into());
            let command = request(&system, &lowered, &system_item, Mode::Command, shell.clone());
            let interactive = request(&system, &lowered, &system_item, Mode::Interactive, shell);
            let item = script::script_item(&store, &system.name, &spec, &command, &interactive)?;
            println!("{}", item.path.display());
            return Ok(0);
        }
        let xchg = store.scratch("xchg")?;
        let runtime = store.scratch("run")?;
        let interactive = self.command.is_empty();
        let request = if interactive {
            request(&system, &lowered, &system_item, Mode::Interactive, shell)
        } else {
            request(&system, &lowered, &system_item, Mode::Command, self.command.clone())
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
