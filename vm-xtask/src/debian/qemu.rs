//! Which `qemu-system-x86_64` runs the VMs: the host's, or Debian's `qemu-system-x86`
//! with its dependency closure and firmware from the store, run through the store's
//! libc6 loader (no root, nothing installed).
//!
//! `--qemu host|store` (or `XTASK_QEMU`) chooses; without either, the host's is used
//! when it has one, it is installed when running as root (as before), and otherwise the
//! store's is used, said once on stderr. The store's is a wrapper script in the
//! `qemu-store` item (`bin/qemu-system-x86_64`) that finds the store from its own path,
//! so every caller (VMs, snapshots, the bench, `run-vm.sh`) runs it as a plain program.
//!
//! aarch64 guests run on `qemu-system-aarch64` ([`program_for`]): the host's when it has
//! one (or with `--qemu host`), else Debian's `qemu-system-arm` from the store in the same
//! way (`qemu-store-qemu-system-aarch64`); it is never installed on the host.

use std::path::PathBuf;
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};

use crate::store::{Item, Recipe, Store};
use crate::{debian, host, Workspace};
use os_configs::Arch;

/// Chooses the QEMU: `host` or `store`.
pub const QEMU_ENV: &str = "XTASK_QEMU";
/// The Debian package QEMU comes from, with its closure.
pub const PACKAGE: &str = "qemu-system-x86";
/// Firmware directories (`-L`), by package: QEMU's own images (microvm's qboot), SeaBIOS,
/// iPXE's option ROMs.
const DATA_DIRS: &[(&str, &str)] =
    &[("qemu-system-data", "usr/share/qemu"), ("seabios", "usr/share/seabios"), ("ipxe-qemu", "usr/lib/ipxe/qemu")];
/// The program, inside qemu-system-x86.
const QEMU_BIN: &str = "usr/bin/qemu-system-x86_64";
/// QEMU's loadable modules (the TCG accelerator is one), in qemu-system-common.
const MODULES: (&str, &str) = ("qemu-system-common", "usr/lib/x86_64-linux-gnu/qemu");

/// Where the QEMU that runs VMs comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Choice {
    /// The host's `qemu-system-x86_64` (installed first when running as root).
    Host,
    /// Debian's `qemu-system-x86` from the store, locked in vm.lock.
    Store,
}

static PROGRAM: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
static PROGRAM_AARCH64: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();

/// Debian's QEMU for aarch64 guests: `qemu-system-aarch64`, in `qemu-system-arm`.
pub const AARCH64: Flavour = Flavour {
    package: "qemu-system-arm",
    program: "qemu-system-aarch64",
    bin: "usr/bin/qemu-system-aarch64",
    data_dirs: &[("qemu-system-data", "usr/share/qemu")],
};

/// Debian's QEMU for x86_64 guests.
const X86_64: Flavour =
    Flavour { package: PACKAGE, program: "qemu-system-x86_64", bin: QEMU_BIN, data_dirs: DATA_DIRS };

/// One of Debian's QEMU system emulators: its package, program and firmware directories.
#[derive(Debug, Clone, Copy)]
pub struct Flavour {
    pub package: &'static str,
    pub program: &'static str,
    bin: &'static str,
    data_dirs: &'static [(&'static str, &'static str)],
}

/// The QEMU that runs guests of `arch`, found (and made, for the store's) once per
/// process. For x86_64, [`program`]. For aarch64: the host's `qemu-system-aarch64` when
/// it has one (and `XTASK_QEMU` is not `store`), else Debian's `qemu-system-arm` from the
/// store (not installed on the host: x86_64's VMs do not need it).
pub fn program_for(arch: Arch) -> Result<PathBuf> {
    match arch {
        Arch::X86_64 => program(),
        Arch::Aarch64 => PROGRAM_AARCH64
            .get_or_init(|| {
                let choice = std::env::var(QEMU_ENV).ok();
                let on_host = host::which(AARCH64.program);
                match (choice.as_deref(), on_host) {
                    (Some("host"), None) => Err(format!(
                        "{QEMU_ENV}=host: there is no `{}` on PATH; install Debian's `{}`",
                        AARCH64.program, AARCH64.package
                    )),
                    (Some("host") | None | Some(""), Some(_)) => Ok(PathBuf::from(AARCH64.program)),
                    _ => {
                        let store =
                            Store::open(&Workspace::current().store_dir, false).map_err(|e| format!("{e:#}"))?;
                        let item = flavour_from_store(&store, AARCH64).map_err(|e| format!("{e:#}"))?;
                        Ok(item.path.join("bin").join(AARCH64.program))
                    }
                }
            })
            .clone()
            .map_err(anyhow::Error::msg),
    }
}

/// The `qemu-system-x86_64` to run, found (and made, for the store's) once per process.
pub fn program() -> Result<PathBuf> {
    PROGRAM.get_or_init(|| choose().map_err(|e| format!("{e:#}"))).clone().map_err(anyhow::Error::msg)
}

/// [`program_for`] `arch` as an absolute path (the host's found on `PATH`), for what is
/// remembered about the program's file.
pub fn absolute_for(arch: Arch) -> Result<PathBuf> {
    let program = program_for(arch)?;
    if program.is_absolute() {
        return Ok(program);
    }
    host::which(&program.to_string_lossy()).with_context(|| format!("`{}` is not on PATH", program.display()))
}

/// The program as [`program_for`] `arch` found it, or the plain name when it was not
/// asked yet.
pub fn known_for(arch: Arch) -> PathBuf {
    let (found, name) = match arch {
        Arch::X86_64 => (&PROGRAM, host::QEMU_SYSTEM.program),
        Arch::Aarch64 => (&PROGRAM_AARCH64, AARCH64.program),
    };
    found.get().and_then(|p| p.as_ref().ok().cloned()).unwrap_or_else(|| PathBuf::from(name))
}

fn choose() -> Result<PathBuf> {
    let choice = match std::env::var(QEMU_ENV).ok().as_deref() {
        None | Some("") => None,
        Some("host") => Some(Choice::Host),
        Some("store") => Some(Choice::Store),
        Some(other) => bail!("{QEMU_ENV}={other:?} is neither `host` nor `store`"),
    };
    let on_host = host::which(host::QEMU_SYSTEM.program);
    let can_install =
        host::is_root() && host::which("apt-get").is_some() && std::env::var_os(host::NO_INSTALL_ENV).is_none();
    // The host's is run by its name, found on PATH.
    let host_qemu = || -> Result<PathBuf> {
        host::ensure(&[host::QEMU_SYSTEM])?;
        Ok(PathBuf::from(host::QEMU_SYSTEM.program))
    };
    match choice {
        Some(Choice::Host) => host_qemu(),
        None if on_host.is_some() || can_install => host_qemu(),
        Some(Choice::Store) | None => {
            if choice.is_none() {
                eprintln!(
                    "no `{}` on this host, and xtask cannot install it (not root, or {} set): \
                     using Debian's `{PACKAGE}` from the store (locked in vm.lock; `--qemu host` to insist on \
                     the host's)",
                    host::QEMU_SYSTEM.program,
                    host::NO_INSTALL_ENV
                );
            }
            let store = Store::open(&Workspace::current().store_dir, false)?;
            Ok(from_store(&store)?.path.join("bin").join(host::QEMU_SYSTEM.program))
        }
    }
}

/// The `qemu-store` item: the wrapper script over the unpacked closure of
/// [`PACKAGE`].
pub fn from_store(store: &Store) -> Result<Item> {
    flavour_from_store(store, X86_64)
}

/// The wrapper script over the unpacked closure of `flavour`'s package: `qemu-store`
/// for x86_64, `qemu-store-PROGRAM` for the others.
fn flavour_from_store(store: &Store, flavour: Flavour) -> Result<Item> {
    let Flavour { package, program, bin, data_dirs } = flavour;
    let packages = debian::Unpacked::closure(store, package, "QEMU")?;
    let item_of = |package: &str| packages.item(package);
    // Paths relative to the store's directory of items, found from the script's own path.
    let rel = |item: &Item, sub: &str| format!("$s/{}/{sub}", item.file_name());
    let (libc6, qemu) = (item_of("libc6")?, item_of(package)?);
    let libs = packages.lib_dirs(|i| format!("$s/{}", i.file_name()));
    let mut data = Vec::new();
    for (data_package, dir) in data_dirs {
        data.push(format!("-L \"{}\"", rel(item_of(data_package)?, dir)));
    }
    let modules = rel(item_of(MODULES.0)?, MODULES.1);
    let script = format!(
        "#!/bin/sh\n# {program} from Debian's packages in the store, through libc6's loader.\n\
         s=$(cd \"${{0%/*}}/../..\" && pwd) || exit 127\n\
         QEMU_MODULE_DIR=\"{modules}\" exec \"${{0%/*}}/../{}\" --inhibit-cache --library-path \"{}\" \
         \"{}\" {} \"$@\"\n",
        debian::loader_link(program),
        libs.join(":"),
        rel(qemu, bin),
        data.join(" ")
    );
    let name = if program == X86_64.program { "qemu-store".to_string() } else { format!("qemu-store-{program}") };
    let mut recipe = Recipe::new("qemu-store", &name).param("script", script.clone());
    for (_, item) in &packages.items {
        recipe = recipe.reference(item);
    }
    store.realise(&recipe, |out| {
        let _step = crate::progress::step(&format!("making QEMU from {} Debian packages", packages.items.len()));
        // The same command with the items' paths: a QEMU that does not run is never stored.
        let mut check = packages.command(package, bin)?;
        check.arg("-version");
        // QEMU shows as `qemu-system-x86` (in `ps`, to `pkill`), not `ld-linux`.
        debian::write_loader_wrapper(out, libc6, program, &script, &check)
    })
}

/// The options of `-sandbox`: seccomp filters that deny obsolete system calls,
/// privilege changes, spawning processes and resource control to QEMU.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// Whether the QEMU for `arch` accepts [`SANDBOX`] (it needs seccomp support).
/// The answer is remembered in `cache_dir` ([`remembered`]).
pub fn qemu_supports_sandbox(cache_dir: &std::path::Path, arch: Arch) -> bool {
    let Ok(qemu) = absolute_for(arch) else { return false };
    let question = format!("-sandbox {} -version", SANDBOX);
    let answer = crate::host::remembered(cache_dir, &qemu, &question, || {
        // Options are parsed in order: an unsupported -sandbox fails before -version exits.
        let supported = crate::process::output(crate::process::command(&qemu).args(["-sandbox", SANDBOX, "-version"]))
            .is_ok_and(|o| o.status.success());
        Ok(if supported { "yes" } else { "no" }.to_string())
    });
    answer.is_ok_and(|a| a == "yes")
}
