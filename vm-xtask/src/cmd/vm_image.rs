//! `cargo xtask vm-image`: a stand-alone bootable disk image of a system, as a store
//! item (the reference's `system-qemu-image` and, with `--volatile`, `system-disk-image`).
//! `--check` rebuilds a stored image and compares it bit for bit. `--firmware uefi`
//! makes a GPT disk with an EFI system partition for UEFI firmware (OVMF).

use anyhow::{Context, Result};

use super::{parse_bounded_size, usage_error};
use crate::error::Failure;
use crate::image::{self, Builder, ImageOptions, Layout, Progress};
use crate::store::{Outcome, Store};
use crate::vm::qemu::DiskFormat;
use crate::{debian::image_tools as tools, host, machine::image_builder, Workspace};

#[derive(Debug, Clone, clap::Args)]
pub struct VmImage {
    /// The system to make an image of (see `cargo xtask systems`).
    #[arg(long, default_value_t = crate::Catalog::current().default_name())]
    pub system: String,
    /// The guest's architecture instead of the system's: x86_64 or aarch64 (arm64; its
    /// images are for UEFI).
    #[arg(long, value_name = "ARCH", value_parser = crate::parse::parse_arch)]
    pub arch: Option<os_configs::Arch>,
    /// The image's format.
    #[arg(long, value_enum, default_value = "qcow2")]
    pub format: DiskFormat,
    /// The whole disk's size (e.g. 2GiB); default: the closure plus a quarter of it (at
    /// least 64 MiB) of free space. 1MiB to 16TiB.
    #[arg(long, value_parser = parse_bounded_size)]
    pub size: Option<u64>,
    /// The firmware the image boots with: `bios` (an MBR disk with GRUB for BIOS) or
    /// `uefi` (a GPT disk with an EFI system partition holding GRUB for UEFI); default: the
    /// first the system's bootloader supports (BIOS for `Bootloader::Grub`).
    #[arg(long, value_parser = parse_firmware, value_name = "bios|uefi")]
    pub firmware: Option<os_configs::Firmware>,
    /// Mount the root read-only with a tmpfs overlay: writes vanish at power-off and the
    /// image is never written (a USB-stick image).
    #[arg(long)]
    pub volatile: bool,
    /// Have the guest hash every store item against the image's store database at each
    /// boot, and stop the boot on a mismatch.
    #[arg(long)]
    pub verify_store: bool,
    /// Where the image is built: on the host (rootless, fast) or inside a VM with
    /// Debian's tools from the store (the reference's way). Both write the same bytes.
    #[arg(long, value_enum, default_value = "host")]
    pub builder: Builder,
    /// Rebuild the image (building it first if it is not stored yet) and compare the two
    /// bit for bit; exit non-zero naming the first differing offset.
    #[arg(long)]
    pub check: bool,
    /// Print the commands run.
    #[arg(short, long)]
    pub verbose: bool,
    /// Say for every store item whether it was found or built.
    #[arg(long)]
    pub explain: bool,
    /// Print one JSON document on stdout (image path, item, hash, content sha256, size,
    /// hit or built, wall time) instead of the path.
    #[arg(long)]
    pub json: bool,
}

impl VmImage {
    pub fn run(self, ws: &Workspace) -> Result<i32> {
        let started = std::time::Instant::now();
        crate::process::set_verbose(self.verbose);
        let store = crate::cmd::open_store(ws, self.explain)?;
        let (item, outcome, path) = self.realise(ws, &store)?;
        if self.json {
            crate::report::print_json(&crate::report::ItemReport::new(&store, &item, &path, outcome, started)?)?;
        } else {
            println!("{}", path.display());
        }
        Ok(0)
    }

    /// Makes (or finds) the image in `store`, checks it with `--check`: the item, how it
    /// came, and the image file's path.
    pub fn realise(&self, ws: &Workspace, store: &Store) -> Result<(crate::store::Item, Outcome, std::path::PathBuf)> {
        let mut system = super::lookup_system(&self.system)?;
        if let Some(arch) = self.arch {
            system.arch = arch;
        }
        // The image tools come from the store; QEMU from the host or the store.
        if self.builder == Builder::Vm {
            crate::debian::qemu::program()?;
        }
        let mut host_tools = vec![];
        if self.format == DiskFormat::Qcow2 {
            host_tools.push(host::QEMU_IMG);
        }
        host::ensure(&host_tools)?;
        // As run-vm does: a system that cannot work (or a field that cannot act) is
        // refused before anything is built.
        crate::lower::validate::check_here(&system, store, ws)?;
        let firmware = self.firmware(&system)?;
        let closure = image::closure(store, ws, &system, self.verbose)
            .with_context(|| format!("lowering system `{}` for a disk image", system.name))?;
        let footprint = image::footprint(&closure)?;
        let minimum = Layout::minimum(&footprint, firmware);
        let layout = match self.size {
            None => Layout::default_for(&footprint, firmware),
            Some(size) => {
                let layout = Layout::new(size, &footprint, firmware);
                if layout.size < minimum.size {
                    return Err(usage_error(format!(
                        "--size {} is too small for system `{}`: its closure is {} ({} files and directories), \
                         and an image of it needs at least {}; give --size {} or more, or leave --size out \
                         (default {})",
                        mib(layout.size),
                        system.name,
                        mib(footprint.bytes),
                        footprint.entries,
                        mib(minimum.size),
                        size_arg(minimum.size),
                        mib(Layout::default_for(&footprint, firmware).size)
                    )));
                }
                layout
            }
        };
        let opts =
            ImageOptions { format: self.format, layout, volatile: self.volatile, verify_store: self.verify_store };
        let tools = tools::tools(store).context("getting the image tools")?;
        let uefi = match firmware {
            os_configs::Firmware::Uefi => Some(tools::uefi_tools(store).context("getting the UEFI tools")?),
            os_configs::Firmware::Bios => None,
        };
        let versions = image::tool_versions(store, self.format)?;
        let recipe = image::recipe(&closure, &opts, &tools, uefi.as_ref(), &versions);
        let uuid = image::uuid_for(&recipe.hash());
        let progress = Progress::for_stderr(self.verbose);
        let job = image::ImageJob {
            store,
            closure: &closure,
            opts: &opts,
            uuid: &uuid,
            tools: &tools,
            uefi: uefi.as_ref(),
            progress,
        };
        let build = |out: &std::path::Path| match self.builder {
            Builder::Host => image::build_on_host(&job, out),
            Builder::Vm => image_builder::build(&job, ws, out),
        };
        let (item, outcome) = store.realise_with_outcome(&recipe, build)?;
        let path = image::image_path(&item, self.format);
        if self.check {
            self.check(store, &item, outcome, &path, firmware, build)?;
        }
        if let (Some(uefi), true) = (&uefi, crate::progress::shown()) {
            let (firmware, (code, vars), qemu) = match system.arch {
                os_configs::Arch::X86_64 => ("OVMF", uefi.ovmf(), "qemu-system-x86_64 -machine pc"),
                os_configs::Arch::Aarch64 => {
                    ("AAVMF", tools::aavmf(store)?, "qemu-system-aarch64 -machine virt -cpu cortex-a57 -nic none")
                }
            };
            eprintln!(
                "vm-image: a UEFI image; it boots with Debian's {firmware} from the store, e.g.\n  \
                 {qemu} -m 512 -drive if=pflash,format=raw,readonly=on,file={} \
                 -drive if=pflash,format=raw,file=VARS.fd -drive file={},format={}\n  \
                 (VARS.fd: a writable copy of {})",
                code.display(),
                path.display(),
                self.format.name(),
                vars.display()
            );
        }
        Ok((item, outcome, path))
    }

    /// The firmware the image is for: `--firmware`, if the system's bootloader supports
    /// it, else the bootloader's first.
    fn firmware(&self, system: &os_configs::System) -> Result<os_configs::Firmware> {
        // An aarch64 machine has no BIOS: its images are for UEFI.
        let supported: Vec<os_configs::Firmware> = system
            .bootloader
            .firmwares()
            .iter()
            .copied()
            .filter(|f| system.arch == os_configs::Arch::X86_64 || *f == os_configs::Firmware::Uefi)
            .collect();
        let uefi_only = system.arch != os_configs::Arch::X86_64;
        if uefi_only && self.firmware == Some(os_configs::Firmware::Bios) {
            return Err(usage_error(format!(
                "--firmware bios: {} systems boot with UEFI only; give --firmware uefi or leave it out",
                system.arch
            )));
        }
        if uefi_only && supported.is_empty() && system.bootloader != os_configs::Bootloader::Direct {
            return Err(usage_error(format!(
                "system `{}` has bootloader {:?}, for BIOS only, and {} systems boot with UEFI only; declare \
                 `Bootloader::Grub` or `GrubEfi`",
                system.name, system.bootloader, system.arch
            )));
        }
        let names = || supported.iter().map(|f| f.name()).collect::<Vec<_>>().join(", ");
        match (self.firmware, supported.first()) {
            (_, None) => Err(usage_error(format!(
                "system `{}` has no bootloader ({:?}: QEMU loads its kernel), so it has no disk image; declare \
                 `Bootloader::Grub`, `GrubBios` or `GrubEfi`",
                system.name, system.bootloader
            ))),
            (Some(asked), Some(_)) if !supported.contains(&asked) => Err(usage_error(format!(
                "--firmware {}: system `{}` has bootloader {:?}, which boots with {} only; give --firmware {} \
                 or a system whose bootloader is `Bootloader::Grub` (BIOS and UEFI)",
                asked.name(),
                system.name,
                system.bootloader,
                names(),
                supported[0].name()
            ))),
            (Some(asked), Some(_)) => Ok(asked),
            (None, Some(first)) => Ok(*first),
        }
    }

    /// Rebuilds the image in scratch space and compares it with the stored one.
    fn check(
        &self,
        store: &Store,
        item: &crate::store::Item,
        outcome: Outcome,
        stored: &std::path::Path,
        firmware: os_configs::Firmware,
        build: impl Fn(&std::path::Path) -> Result<()>,
    ) -> Result<()> {
        if outcome == Outcome::Built {
            eprintln!("vm-image --check: `{}` was not in the store; built it, now rebuilding it", item.file_name());
        }
        let scratch = store.scratch("vm-image-check")?;
        let out = scratch.path().join("out");
        build(&out).context("rebuilding the image for --check")?;
        let rebuilt = image::image_path(item, self.format);
        let rebuilt = out.join(rebuilt.file_name().context("image file name")?);
        match image::first_difference(stored, &rebuilt)? {
            None => {
                let len = std::fs::metadata(stored)?.len();
                eprintln!("vm-image --check: the rebuilt image is identical to `{}` ({len} bytes)", stored.display());
                Ok(())
            }
            Some(offset) => {
                let kept = store.tmp_dir().join(format!("{}.check-{}", item.file_name(), std::process::id()));
                let kept_note = match std::fs::rename(&rebuilt, &kept) {
                    Ok(()) => format!("; the rebuilt image is kept at `{}`", kept.display()),
                    Err(_) => String::new(),
                };
                let region = match self.format {
                    DiskFormat::Raw => format!(" ({})", image::region(offset, firmware)),
                    DiskFormat::Qcow2 => String::new(),
                };
                Err(Failure {
                    code: 1,
                    message: format!(
                        "vm-image --check: the rebuilt image differs from `{}`: first difference at byte offset \
                         {offset}{region}{kept_note}",
                        stored.display()
                    ),
                }
                .into())
            }
        }
    }
}

/// `--firmware`'s value.
fn parse_firmware(text: &str) -> Result<os_configs::Firmware, String> {
    match text {
        "bios" => Ok(os_configs::Firmware::Bios),
        "uefi" => Ok(os_configs::Firmware::Uefi),
        _ => Err(format!("`{text}` is not a firmware images are made for: bios or uefi")),
    }
}

fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes.div_ceil(1 << 20))
}

fn size_arg(bytes: u64) -> String {
    format!("{}MiB", bytes.div_ceil(1 << 20))
}
