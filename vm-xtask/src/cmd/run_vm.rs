//! `cargo xtask run-vm`: boot a system (virtualized: the store shared, a volatile root)
//! and run a command in it once its services are up (its exit status is ours), or give
//! a shell on the serial console; or, with `--script`, make `run-vm.sh`, which does the
//! same without cargo.

use std::path::PathBuf;

use anyhow::Result;
use guest::{Mode, NetConfig, Request};

use super::VmOpts;
use crate::lower::system::Lowered;
use crate::machine::{self, exit_code, GdbOpts, Machine};
use crate::store::Item;
use crate::vm::qemu::VmSpec;
use crate::vm::{GuestRequest, LaterRequest};
use crate::{vm::qemu, vm::script, Workspace};

#[derive(Debug, Clone, clap::Args)]
pub struct RunVm {
    #[command(flatten)]
    pub vm: VmOpts,
    #[command(flatten)]
    pub gdb: GdbOpts,
    /// Print the path of a `run-vm.sh` store item that boots the system the same way
    /// without cargo (`$(cargo xtask run-vm --script) -- COMMAND`), instead of booting.
    #[arg(long, conflicts_with_all = ["command", "gdb"])]
    pub script: bool,
    /// Forward the host's TCP port HOST (on 127.0.0.1) to the guest's port GUEST; gives
    /// the guest a network interface (QEMU's user network, reaching nothing else).
    /// Repeatable. Without it the guest has no network at all.
    #[arg(long = "forward", value_name = "HOST:GUEST", value_parser = parse_forward)]
    pub forwards: Vec<qemu::Forward>,
    /// Keep the VM up after the command ends, until Ctrl-C here or `poweroff` in it;
    /// `cargo xtask attach` opens shells in it meanwhile. The exit status is still the
    /// command's.
    #[arg(long, requires = "command", conflicts_with = "script")]
    pub keep: bool,
    /// The command to run in the guest; without one, an interactive shell on the console.
    #[arg(last = true)]
    pub command: Vec<String>,
}

/// Parses `--forward HOST:GUEST` (TCP ports, 1 to 65535).
fn parse_forward(s: &str) -> std::result::Result<qemu::Forward, String> {
    let port = |p: &str| p.parse::<u16>().ok().filter(|p| *p > 0);
    match s.split_once(':').map(|(h, g)| (port(h), port(g))) {
        Some((Some(host), Some(guest))) => Ok(qemu::Forward { host, guest }),
        _ => Err(format!("`{s}` is not HOST:GUEST, two TCP ports from 1 to 65535 (e.g. 8080:7878)")),
    }
}

impl RunVm {
    /// Returns the exit status for xtask: the command's own.
    pub fn run(self, ws: &Workspace) -> Result<i32> {
        let declared = self.vm.system()?;
        let stub = self.gdb.stub()?;
        let networked = !self.forwards.is_empty();
        let store = self.vm.open_store(ws)?;
        let mut system = machine::virtualize(&declared);
        if networked {
            system.initrd_modules.push(qemu::NET_MODULE.to_string());
        }
        let mut machine = Machine::prepare(ws, &self.vm, &store, &declared, system)?;
        machine.debug_with(stub);
        let nets: Vec<NetConfig> = match networked {
            false => Vec::new(),
            true => vec![NetConfig {
                interface: qemu::GUEST_INTERFACE.into(),
                address: qemu::GUEST_ADDRESS.into(),
                gateway: None,
                nameserver: None,
                mac: None,
            }],
        };
        let spec = |xchg: PathBuf| VmSpec { forwards: self.forwards.clone(), ..machine.spec(xchg) };
        let request = |lowered: &Lowered, item: &Item, mode, argv| Request {
            nets: nets.clone(),
            keep: self.keep,
            ..machine.request(lowered, item, mode, argv)
        };
        let interactive = self.command.is_empty();
        let (mode, argv) = match interactive {
            true => (Mode::Interactive, vec!["/bin/sh".to_string()]),
            false => (Mode::Command, self.command.clone()),
        };
        if self.script {
            let (lowered, system_item) = machine.lower()?;
            let request = |mode| request(&lowered, &system_item, mode, argv.clone());
            // The script's exchange directory is made per run; this path is replaced.
            let item = script::script_item(
                &machine.store,
                &machine.system.name,
                &spec("/xchg".into()),
                &request(Mode::Command),
                &request(Mode::Interactive),
            )?;
            println!("{}", item.path.display());
            return Ok(0);
        }
        let xchg = machine.store.exchange()?;
        let runtime = machine.store.scratch("run")?;
        if interactive {
            eprintln!("booting `{}`: a shell on the serial console; `poweroff` or Ctrl-a x ends it", declared.name);
        }
        // A shell takes the terminal from the start, so nothing is built under it; a
        // command's VM boots while its packages are built (what QEMU needs came first).
        let guest_request = if interactive {
            let (lowered, system_item) = machine.lower()?;
            GuestRequest::Now(Box::new(request(&lowered, &system_item, mode, argv)))
        } else {
            let later = || {
                let (lowered, system_item) = machine.lower()?;
                Ok(request(&lowered, &system_item, mode, argv))
            };
            GuestRequest::Later(mode, Box::new(later) as LaterRequest)
        };
        let mut run = machine.run(spec(xchg.path().to_path_buf()), guest_request, &xchg, &runtime, "run-vm");
        let shown = match interactive {
            true => "a shell".to_string(),
            false => self.command.iter().map(|w| crate::process::shell_quote(w)).collect::<Vec<_>>().join(" "),
        };
        run.attach = Some(machine.attachable(&format!("run-vm {}: {shown}", declared.name)));
        if self.keep {
            eprintln!(
                "the VM stays up after the command: `cargo xtask attach {}` opens a shell in it; `poweroff` there, \
                 or Ctrl-C here, ends it",
                crate::vm::attach::id("run-vm")
            );
        }
        Ok(exit_code(&run.run()?, &self.command))
    }
}
