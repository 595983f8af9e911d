//! A system booted as a VM: the options every command that boots one shares ([`VmOpts`]),
//! the store it is opened with, the request the guest helper gets, the shared-store image
//! and the QEMU configuration. [`Machine`] puts them together for a virtualized system
//! (`run-vm`, `test`, the doctests' kept VM, scenario nodes); `build-in-vm` ([`build`]) and
//! the image builder ([`image_builder`]) assemble theirs from the same parts.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use guest::{Mode, Request};
use os_configs::{Device, System};

use crate::lower::system::Lowered;
use crate::parse::{parse_memory, parse_timeout, Timeout};
use crate::store::{Item, Store};
use crate::vm::qemu::{self, Accel, AccelChoice, Disk, DiskFormat, GdbStub, Share, VmSpec};
use crate::vm::{GuestRequest, VmRun};
use crate::Workspace;

pub mod build;
pub mod image_builder;
use crate::{image, lower::system};

/// The workspace's store, asking the workspace's configured registries before it builds an
/// item ([`crate::substitute::configured`]).
pub fn open_store(ws: &Workspace, explain: bool) -> Result<Store> {
    Ok(Store::open(&ws.store_dir, explain)?.with_substitutes(crate::substitute::configured(ws)))
}

/// Options of every subcommand that boots a VM.
#[derive(Debug, Clone, clap::Args)]
pub struct VmOpts {
    /// The system to boot (default: the workspace's default, marked in `cargo xtask
    /// systems`).
    #[arg(long)]
    pub system: Option<String>,
    /// The guest's architecture instead of the system's: x86_64 or aarch64 (arm64). A
    /// guest of another architecture than the host's runs under emulation.
    #[arg(long, value_name = "ARCH", value_parser = crate::parse::parse_arch)]
    pub arch: Option<os_configs::Arch>,
    /// Accelerator: auto uses KVM when it works here, else TCG.
    #[arg(long, value_enum, default_value_t)]
    pub accel: AccelChoice,
    /// Guest memory in MiB (64 to 65536).
    #[arg(long, default_value_t = 256, value_parser = parse_memory)]
    pub memory: u32,
    /// Kill the VM after this long (seconds, or with a unit: 90s, 5m, 1h, 2d; 1s to 7d),
    /// or `none`; for `test` and `test-runner`, the time each test binary may take
    /// (default 10m).
    #[arg(long, value_parser = parse_timeout)]
    pub timeout: Option<Timeout>,
    /// Boot this bzImage instead of the system's kernel (needs --modules).
    #[arg(long, requires = "modules")]
    pub kernel: Option<PathBuf>,
    /// The modules tree (`/lib/modules/RELEASE`) of the --kernel image.
    #[arg(long, requires = "kernel")]
    pub modules: Option<PathBuf>,
    /// Show kernel and helper messages on stderr, and the command lines of QEMU and of
    /// the host tools run.
    #[arg(short, long)]
    pub verbose: bool,
    /// Say for every store item whether it was found or built.
    #[arg(long)]
    pub explain: bool,
    /// Restore the guest from a snapshot of this VM at its snapshot point, making the
    /// snapshot first if there is none (a snapshot that exists is used anyway).
    #[arg(long, conflicts_with = "cold")]
    pub warm: bool,
    /// Boot cold even when a snapshot of this VM exists.
    #[arg(long)]
    pub cold: bool,
}

/// `--gdb PORT` and `--gdb-wait` (`run-vm`, `test`): QEMU's gdb stub.
#[derive(Debug, Clone, clap::Args)]
pub struct GdbOpts {
    /// Expose QEMU's gdb stub on 127.0.0.1:PORT, for a debugger of the guest's kernel
    /// (`target remote 127.0.0.1:PORT`); the VM boots cold (no snapshot is restored).
    #[arg(long, value_name = "PORT", value_parser = parse_gdb_port, conflicts_with = "warm")]
    pub gdb: Option<u16>,
    /// With --gdb: hold the guest's CPU before its first instruction until gdb attaches
    /// and continues it.
    #[arg(long, requires = "gdb")]
    pub gdb_wait: bool,
}

/// Parses `--gdb PORT`: a TCP port from 1 to 65535.
fn parse_gdb_port(s: &str) -> std::result::Result<u16, String> {
    match s.parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(format!("`{s}` is not a TCP port from 1 to 65535")),
    }
}

impl GdbOpts {
    /// The stub asked for, its port checked free on 127.0.0.1 before anything is built
    /// (a port in use is a usage error: QEMU would only fail once the VM is made).
    pub fn stub(&self) -> Result<Option<GdbStub>> {
        let Some(port) = self.gdb else { return Ok(None) };
        check_port_free(port, "--gdb")?;
        Ok(Some(GdbStub { port, wait: self.gdb_wait }))
    }
}

/// A usage error unless `port` can be bound on 127.0.0.1 now (`flag` names who wants it).
pub fn check_port_free(port: u16, flag: &str) -> Result<()> {
    match std::net::TcpListener::bind(("127.0.0.1", port)) {
        Ok(_) => Ok(()),
        Err(e) => {
            Err(crate::error::usage_error(format!("{flag} {port}: 127.0.0.1:{port} cannot be listened on ({e})")))
        }
    }
}

/// The gdb to tell the user about: Debian's from the store (made on first use; gdb-minimal,
/// locked in vm.lock), or plain `gdb` when it cannot be made, said why.
pub fn gdb_program(store: &Store) -> String {
    match crate::debian::gdb::program(store) {
        Ok(path) => path.display().to_string(),
        Err(e) => {
            eprintln!("note: Debian's gdb from the store could not be made ({e:#}); the host's `gdb` is named");
            "gdb".to_string()
        }
    }
}

/// Says on stderr how to attach gdb to QEMU's stub of a VM booting `kernel`: the gdb
/// command line, with the kernel's ELF image when QEMU boots one (symbols from a kernel
/// built with them; Debian's are stripped, but the image gives gdb the architecture).
pub fn say_how_to_attach(store: &Store, stub: GdbStub, kernel: &std::path::Path) {
    let gdb = gdb_program(store);
    let mut magic = [0u8; 4];
    let elf = std::fs::File::open(kernel).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic)).is_ok()
        && &magic == b"\x7fELF";
    let file =
        if elf { format!(" {}", crate::process::shell_quote(&kernel.display().to_string())) } else { String::new() };
    let held = if stub.wait { "the guest is held before its first instruction until gdb continues it; " } else { "" };
    eprintln!(
        "gdb stub on 127.0.0.1:{port} ({held}booting cold, no snapshot); attach with:\n    \
         {gdb}{file} -ex 'target remote 127.0.0.1:{port}'",
        port = stub.port
    );
}

/// How long a test binary may run when `--timeout` does not say (`test`, `test-runner`).
pub const TEST_BINARY_TIMEOUT: Duration = Duration::from_secs(600);

impl VmOpts {
    /// The VM's timeout: none unless `--timeout` gives one.
    pub fn vm_timeout(&self) -> Option<Duration> {
        match self.timeout {
            Some(Timeout::After(t)) => Some(t),
            Some(Timeout::Never) | None => None,
        }
    }

    /// How long each test binary may run: `--timeout`, [`TEST_BINARY_TIMEOUT`] unless
    /// given, none with `--timeout none`.
    pub fn test_binary_timeout(&self) -> Option<Duration> {
        match self.timeout {
            Some(Timeout::After(t)) => Some(t),
            Some(Timeout::Never) => None,
            None => Some(TEST_BINARY_TIMEOUT),
        }
    }

    /// Whether runs restore snapshots: `--cold`, `--warm`, or when one exists.
    pub fn warmth(&self) -> crate::vm::snapshot::Warmth {
        use crate::vm::snapshot::Warmth;
        match (self.cold, self.warm) {
            (true, _) => Warmth::Cold,
            (_, true) => Warmth::Make,
            _ => Warmth::IfStored,
        }
    }

    /// The store, opened for this command (with --verbose, host commands are shown from
    /// here on).
    pub fn open_store(&self, ws: &Workspace) -> Result<Store> {
        crate::process::set_verbose(self.verbose);
        open_store(ws, self.explain)
    }

    /// The QEMU configuration for booting `lowered` with the store and `xchg` shared.
    pub fn spec(&self, accel: Accel, store: &Store, lowered: &Lowered, xchg: PathBuf) -> VmSpec {
        spec(accel, self.memory, store, lowered, xchg)
    }
}

/// The QEMU configuration for booting `lowered` with `memory_mib` of memory, the store
/// shared read-only and `xchg` writable, sandboxed where QEMU can be.
pub fn spec(accel: Accel, memory_mib: u32, store: &Store, lowered: &Lowered, xchg: PathBuf) -> VmSpec {
    let shares = vec![
        Share { tag: guest::STORE_TAG.into(), path: store.items_dir(), readonly: true },
        Share { tag: guest::XCHG_TAG.into(), path: xchg, readonly: false },
    ];
    let direct = VmSpec::direct(accel, memory_mib, crate::lower::system::boot_of(lowered), shares);
    VmSpec {
        arch: lowered.arch,
        sandbox: crate::debian::qemu::qemu_supports_sandbox(&store.cache_dir(), lowered.arch),
        // The TSC is x86's.
        tsc_khz: direct.tsc_khz.filter(|_| lowered.arch == os_configs::Arch::X86_64),
        ..direct
    }
}

/// Modules the initrd needs to mount the shared-store image as a volatile root: ext4
/// (with crc32c, which it asks the crypto API for) and overlayfs.
pub const SHARED_STORE_MODULES: &[&str] = &["crc32c_generic", "ext4", "overlay"];

/// Whether `run-vm` boots `system` (virtualized) with the shared-store image as its
/// root: when its root skeleton has anything beyond what every system has (root's
/// entries in `/etc/passwd` and `/etc/group`, `/etc/hostname`, `/root`). Without the
/// image the helper writes those few files into the initramfs instead, and the boot
/// loads no ext4 or overlay modules.
pub fn uses_shared_store_image(system: &System) -> bool {
    !system.users.is_empty() || !system.groups.is_empty() || !system.etc_files.is_empty()
}

/// The request for `argv` (a shell when interactive) on a lowered system.
pub fn request(
    system: &System,
    lowered: &Lowered,
    system_item: &Item,
    root_device: Option<&str>,
    mode: Mode,
    argv: Vec<String>,
) -> Request {
    let term = std::env::var("TERM").unwrap_or_else(|_| "linux".to_string());
    Request {
        // The system item's configuration makes the links.
        system: Some(system_item.guest_path().into_string()),
        root_device: root_device.map(str::to_string),
        ..system::root_request(system, lowered, mode, argv, term)
    }
}

/// `declared` virtualized (the store shared, a volatile root), with the modules its
/// shared-store image needs in its initrd.
pub fn virtualize(declared: &System) -> System {
    let mut system = declared.virtualized();
    add_root_image_modules(&mut system);
    system
}

/// Adds the modules that mounting the shared-store image takes to `system`'s initrd,
/// when it boots from one ([`uses_shared_store_image`]).
pub fn add_root_image_modules(system: &mut System) {
    if uses_shared_store_image(system) {
        system.initrd_modules.extend(SHARED_STORE_MODULES.iter().map(|m| m.to_string()));
    }
}

/// The shared-store image `run-vm` boots `system` (virtualized) from, and its root
/// device, when the system needs one ([`uses_shared_store_image`]). The root skeleton
/// holds no packages: made once, found on every later run.
pub fn root_image(store: &Store, system: &System, boot: &Lowered) -> Result<Option<(PathBuf, String)>> {
    if !uses_shared_store_image(system) {
        return Ok(None);
    }
    let config = system::system_config(system, boot);
    let item = image::shared_store_image(store, &system.name, &config)
        .with_context(|| format!("making the shared-store image of system `{}`", system.name))?;
    let device = match system.root_file_system().map(|fs| &fs.device) {
        Some(Device::Path(device)) => device.clone(),
        other => bail!("the virtualized system `{}` has root device {other:?}, not a path", system.name),
    };
    Ok(Some((image::image_path(&item, DiskFormat::Raw), device)))
}

/// A system made ready to boot as a VM with the store shared and a volatile root: checked
/// that it can work here, virtualized, what QEMU needs made (kernel, initrd, the
/// shared-store image). Its packages and system item ([`Machine::lower`]) can be made
/// while the VM boots.
pub struct Machine<'a> {
    /// The workspace it runs for.
    pub ws: &'a Workspace,
    /// The command's options.
    pub opts: &'a VmOpts,
    /// The store, opened with the workspace's substitutes.
    pub store: Store,
    /// The system, virtualized, with what its root image needs in its initrd.
    pub system: System,
    /// The accelerator chosen.
    pub accel: Accel,
    /// The system lowered as far as booting needs (kernel, initrd).
    pub boot: Lowered,
    /// The shared-store image and its root device, when the system has one.
    pub root_image: Option<(PathBuf, String)>,
    /// QEMU's gdb stub, when asked for (`--gdb`).
    pub gdb: Option<GdbStub>,
}

impl<'a> Machine<'a> {
    /// Checks `declared` (as declared: virtualizing it would paper over a missing root;
    /// exit 2 and nothing built when it cannot work here) and makes what QEMU needs to
    /// boot `system`, `declared` virtualized ([`virtualize`]) and then adapted by the
    /// caller (a network module, a host name).
    pub fn prepare(
        ws: &'a Workspace,
        opts: &'a VmOpts,
        store: &Store,
        declared: &System,
        system: System,
    ) -> Result<Machine<'a>> {
        crate::lower::validate::check_here(declared, store, ws)?;
        let accel = qemu::accel_for(system.arch, opts.accel)?;
        let boot = system::lower_boot(store, ws, &system, opts.verbose)?;
        let root_image = root_image(store, &system, &boot)?;
        Ok(Machine { ws, opts, store: store.clone(), system, accel, boot, root_image, gdb: None })
    }

    /// Exposes QEMU's gdb stub (when `stub` is one), saying on stderr how to attach.
    pub fn debug_with(&mut self, stub: Option<GdbStub>) {
        if let Some(stub) = stub {
            say_how_to_attach(&self.store, stub, &self.boot.boot_image);
        }
        self.gdb = stub;
    }

    /// The QEMU configuration, with `xchg` shared and the root image attached.
    pub fn spec(&self, xchg: PathBuf) -> VmSpec {
        let mut spec = self.opts.spec(self.accel, &self.store, &self.boot, xchg);
        if let Some((path, _)) = &self.root_image {
            spec.disks.push(Disk { path: path.clone(), format: DiskFormat::Raw, readonly: true });
        }
        spec.gdb = self.gdb;
        spec
    }

    /// The system's packages lowered and its system item made.
    pub fn lower(&self) -> Result<(Lowered, Item)> {
        let lowered = self.lower_packages()?;
        let system_item = system::system_item(&self.store, &self.system, &lowered)?;
        Ok((lowered, system_item))
    }

    /// The system's packages lowered (more can be added before its system item is made).
    pub fn lower_packages(&self) -> Result<Lowered> {
        system::lower_packages(&self.store, self.ws, &self.system, self.opts.verbose, self.boot.clone())
    }

    /// The request running `argv` in `mode` on the lowered system.
    pub fn request(&self, lowered: &Lowered, system_item: &Item, mode: Mode, argv: Vec<String>) -> Request {
        let device = self.root_image.as_ref().map(|(_, device)| device.as_str());
        request(&self.system, lowered, system_item, device, mode, argv)
    }

    /// How the VM is listed among the workspace's running VMs (`cargo xtask attach`).
    pub fn attachable(&self, what: &str) -> crate::vm::attach::Attachable {
        let dir = crate::vm::attach::registry_dir(&self.ws.target_dir);
        crate::vm::attach::Attachable { dir, what: what.to_string() }
    }

    /// A run of the VM of `spec` (with the command's timeout, verbosity and snapshots),
    /// its console log named after `label`, serving shells (`cargo xtask attach`).
    pub fn run<'r>(
        &self,
        spec: VmSpec,
        request: GuestRequest<'r>,
        xchg: &crate::store::Exchange,
        runtime: &crate::store::Scratch,
        label: &str,
    ) -> VmRun<'r> {
        VmRun {
            timeout: self.opts.vm_timeout(),
            verbose: self.opts.verbose,
            snapshots: Some((self.store.clone(), self.opts.warmth())),
            attach: Some(self.attachable(&format!("{label} {}", self.system.name))),
            ..VmRun::new(spec, request, xchg.path(), runtime.path(), self.ws.log_dir(), label)
        }
    }
}

/// The exit status xtask reports for a guest status; a signal death is never success.
/// A command's own non-zero exit is its business, as in a shell; anything else is said
/// on stderr.
pub fn exit_code(status: &guest::Status, argv: &[String]) -> i32 {
    let (code, message) = crate::vm::exit_status(status, &format!("`{}`", argv.join(" ")));
    if let (Some(message), false) = (message, matches!(status, guest::Status::Exited(_))) {
        eprintln!("error: {message}");
    }
    code
}

/// Finds or makes every item `run-vm` boots `system` (as declared) with: the lowered
/// virtualized system, its shared-store image and its system item.
pub fn realise_virtualized(store: &Store, ws: &Workspace, system: &System) -> Result<()> {
    let mut system = system.virtualized();
    add_root_image_modules(&mut system);
    let boot = system::lower_boot(store, ws, &system, false)?;
    root_image(store, &system, &boot)?;
    let lowered = system::lower_packages(store, ws, &system, false, boot)?;
    system::system_item(store, &system, &lowered)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_systems_with_more_than_root_get_the_shared_store_image() {
        assert!(!uses_shared_store_image(&os_configs::minimal().virtualized()));
        let mut with_a_user = os_configs::minimal();
        with_a_user.users.push(os_configs::User::new("alice", 1000, "users"));
        assert!(uses_shared_store_image(&with_a_user.virtualized()));
    }
}
