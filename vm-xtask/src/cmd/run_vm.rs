//! `cargo xtask run-vm`: boot a system (virtualized: the store shared, a volatile root)
//! and run a command in it once its services are up (its exit status is ours), or give
//! a shell on the serial console; or, with `--script`, make `run-vm.sh`, which does the
//! same without cargo.

use std::path::PathBuf;

use anyhow::Result;
use guest::{Mode, NetConfig, Request, Status};
use os_configs::System;

use super::VmOpts;
use crate::lower::system::Lowered;
use crate::machine::{add_root_image_modules, request, root_image};
use crate::store::Item;
use crate::vm::qemu::{Disk, DiskFormat};
use crate::vm::{GuestRequest, LaterRequest, VmRun};
use crate::{lower::system, vm::qemu, vm::script, Workspace};

#[derive(Debug, Clone, clap::Args)]
pub struct RunVm {
    #[command(flatten)]
    pub vm: VmOpts,
    /// Print the path of a `run-vm.sh` store item that boots the system the same way
    /// without cargo (`$(cargo xtask run-vm --script) -- COMMAND`), instead of booting.
    #[arg(long, conflicts_with = "command")]
    pub script: bool,
    /// Forward the host's TCP port HOST (on 127.0.0.1) to the guest's port GUEST; gives
    /// the guest a network interface (QEMU's user network, reaching nothing else).
    /// Repeatable. Without it the guest has no network at all.
    #[arg(long = "forward", value_name = "HOST:GUEST", value_parser = parse_forward)]
    pub forwards: Vec<qemu::Forward>,
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
        let store = self.vm.open_store(ws)?;
        // The system as declared: virtualizing it would paper over a missing root.
        let declared = self.vm.valid_system(&store, ws)?;
        let mut system = declared.virtualized();
        add_root_image_modules(&mut system);
        let nets: Vec<NetConfig> = if self.forwards.is_empty() {
            Vec::new()
        } else {
            system.initrd_modules.push(qemu::NET_MODULE.to_string());
            vec![NetConfig {
                interface: qemu::GUEST_INTERFACE.into(),
                address: qemu::GUEST_ADDRESS.into(),
                gateway: None,
                nameserver: None,
            }]
        };
        let accel = qemu::choose_accel(self.vm.accel)?;
        // What QEMU needs comes first; the packages and the system item (say, a
        // workspace crate cargo rebuilds) are made while the VM boots.
        let boot = system::lower_boot(&store, ws, &system, self.vm.verbose)?;
        let root_image = root_image(&store, &system, &boot)?;
        let root_device = root_image.as_ref().map(|(_, device)| device.clone());
        let spec = |xchg: PathBuf| {
            let mut spec = self.vm.spec(accel, &store, &boot, xchg);
            if let Some((path, _)) = &root_image {
                spec.disks.push(Disk { path: path.clone(), format: DiskFormat::Raw, readonly: true });
            }
            spec.forwards = self.forwards.clone();
            spec
        };
        let request = |system: &System, lowered: &Lowered, item: &Item, device: Option<&str>, mode, argv| Request {
            nets: nets.clone(),
            ..request(system, lowered, item, device, mode, argv)
        };
        let lower = |boot: Lowered| -> Result<(Lowered, Item)> {
            let lowered = system::lower_packages(&store, ws, &system, self.vm.verbose, boot)?;
            let system_item = system::system_item(&store, &system, &lowered)?;
            Ok((lowered, system_item))
        };
        let interactive = self.command.is_empty();
        let (mode, argv) = match interactive {
            true => (Mode::Interactive, vec!["/bin/sh".to_string()]),
            false => (Mode::Command, self.command.clone()),
        };
        if self.script {
            let (lowered, system_item) = lower(boot.clone())?;
            let request = |mode| request(&system, &lowered, &system_item, root_device.as_deref(), mode, argv.clone());
            // The script's exchange directory is made per run; this path is replaced.
            let item = script::script_item(
                &store,
                &system.name,
                &spec("/xchg".into()),
                &request(Mode::Command),
                &request(Mode::Interactive),
            )?;
            println!("{}", item.path.display());
            return Ok(0);
        }
        let xchg = store.exchange()?;
        let runtime = store.scratch("run")?;
        if interactive {
            eprintln!("booting `{}`: a shell on the serial console; `poweroff` or Ctrl-a x ends it", system.name);
        }
        // A shell takes the terminal from the start, so nothing is built under it; a
        // command's VM boots while its packages are built.
        let guest_request = if interactive {
            let (lowered, system_item) = lower(boot.clone())?;
            GuestRequest::Now(Box::new(request(&system, &lowered, &system_item, root_device.as_deref(), mode, argv)))
        } else {
            let later = || {
                let (lowered, system_item) = lower(boot.clone())?;
                Ok(request(&system, &lowered, &system_item, root_device.as_deref(), mode, argv))
            };
            GuestRequest::Later(mode, Box::new(later) as LaterRequest)
        };
        let spec = spec(xchg.path().to_path_buf());
        let run = VmRun {
            timeout: self.vm.vm_timeout(),
            verbose: self.vm.verbose,
            snapshots: Some((store.clone(), self.vm.warmth())),
            ..VmRun::new(spec, guest_request, xchg.path(), runtime.path(), ws.log_dir(), "run-vm")
        };
        Ok(exit_code(&run.run()?, &self.command))
    }
}

/// The exit status xtask reports for a guest status; a signal death is never success.
pub fn exit_code(status: &Status, argv: &[String]) -> i32 {
    let (code, message) = crate::vm::exit_status(status, &format!("`{}`", argv.join(" ")));
    // A command's own non-zero exit is its business, as in a shell: said only otherwise.
    if let (Some(message), false) = (message, matches!(status, Status::Exited(_))) {
        eprintln!("error: {message}");
    }
    code
}
