//! Stand-alone bootable disk images (the reference's `qemu-image`, `system-qemu-image`
//! and `system-disk-image`): an MBR, GRUB (i386-pc) in the MBR and the gap after it, one
//! ext4 partition holding the system's closure under `/store`, registered in a store
//! database, and a `grub.cfg` generated from the system. For UEFI firmware instead: a
//! GPT disk whose first partition is an EFI system partition (FAT, made with dosfstools
//! and mtools from the store, with a fixed volume ID and times) holding GRUB's
//! x86_64-efi image as `EFI/BOOT/BOOTX64.EFI` (for an aarch64 system, which has UEFI
//! images only, its arm64-efi image as `EFI/BOOT/BOOTAA64.EFI`), and whose second is the
//! same ext4 root.
//!
//! Built on the host without root: the partition table with `sfdisk --no-tell-kernel`,
//! the file system with `mke2fs -d` straight into the partition's offset of the image
//! file, GRUB's `boot.img` and `core.img` written into the file, `qemu-img convert` for
//! qcow2. sfdisk, mke2fs, debugfs and grub-mkimage are Debian's, from the store
//! ([`crate::debian::image_tools`]), not the host's. Everything that would vary between builds
//! is fixed: UUIDs, hash seed, disk identifier, timestamps and owners.

use fs_err as fs;
use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use guest::image::{Registration, StoreDb};
use guest::Mode;
use os_configs::{Arch, Firmware, System};

use crate::debian::image_tools::{self, StoreTools};
use crate::process::{self, Stdin};
use crate::store::{self, Item, Recipe, Store};
use crate::vm::qemu::DiskFormat;
use crate::{host, lower::system, Workspace};

/// Where the root file system starts on a disk for `firmware`: after the gap GRUB's
/// core.img is in (BIOS), or after the EFI system partition (UEFI).
pub(crate) fn root_offset(firmware: Firmware) -> u64 {
    match firmware {
        Firmware::Bios => PARTITION_OFFSET,
        Firmware::Uefi => PARTITION_OFFSET + ESP_SIZE,
    }
}

/// What a disk for `firmware` keeps free after the root file system.
fn tail(firmware: Firmware) -> u64 {
    match firmware {
        Firmware::Bios => 0,
        Firmware::Uefi => GPT_TAIL,
    }
}

/// Version of the image layout and of the way it is built; part of every image recipe,
/// so a change to the builder makes new items instead of passing for the old ones.
const LAYOUT_VERSION: &str = "vm-image-v4";
/// Modules the initrd of an image loads besides the base ones: the disk on QEMU's
/// default `pc` machine (IDE: ata_piix, and sd for `/dev/sda`), virtio disks on PCI,
/// ext4 (with crc32c, which it asks the crypto API for rather than depending on it) and
/// overlayfs for volatile roots.
pub const IMAGE_MODULES: &[&str] =
    &["ata_piix", "ata_generic", "sd_mod", "virtio_pci", "crc32c_generic", "ext4", "overlay"];
/// Those of an aarch64 image: its disk is virtio on PCI (`virt` has no IDE).
pub const IMAGE_MODULES_AARCH64: &[&str] = &["virtio_pci", "crc32c_generic", "ext4", "overlay"];

/// The modules an image's initrd loads for a guest of `arch`.
pub fn image_modules(arch: Arch) -> &'static [&'static str] {
    match arch {
        Arch::X86_64 => IMAGE_MODULES,
        Arch::Aarch64 => IMAGE_MODULES_AARCH64,
    }
}
/// GRUB modules built into `core.img`; no others are installed in the image.
const GRUB_MODULES: &[&str] =
    &["biosdisk", "part_msdos", "ext2", "normal", "linux", "configfile", "search", "serial", "terminal", "echo"];
/// GRUB modules built into the UEFI image (`BOOTX64.EFI`).
const GRUB_EFI_MODULES: &[&str] =
    &["part_gpt", "ext2", "normal", "linux", "configfile", "search", "serial", "terminal", "echo", "efi_gop"];
/// The first partition starts at 1 MiB; GRUB's core.img goes into the gap before it.
pub(crate) const PARTITION_OFFSET: u64 = 1 << 20;
/// The EFI system partition of a UEFI image, from [`PARTITION_OFFSET`] on.
pub(crate) const ESP_SIZE: u64 = 16 << 20;
/// What a GPT disk keeps free at its end: room for the backup table (33 sectors).
pub(crate) const GPT_TAIL: u64 = 1 << 20;
/// The directories made on the EFI system partition, and where GRUB's image goes: the
/// path UEFI firmware boots from removable media.
pub(crate) const ESP_DIRS: [&str; 2] = ["::/EFI", "::/EFI/BOOT"];
pub(crate) const ESP_BOOT_FILE: &str = "::/EFI/BOOT/BOOTX64.EFI";

/// Where GRUB's image goes on the EFI system partition of an image for `arch`: the
/// removable-media path its firmware boots (`BOOTX64.EFI`, `BOOTAA64.EFI`).
pub(crate) fn esp_boot_file(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => ESP_BOOT_FILE,
        Arch::Aarch64 => "::/EFI/BOOT/BOOTAA64.EFI",
    }
}
/// mtools' environment: its "now" from SOURCE_DATE_EPOCH, written as local time (UTC),
/// and no check of the FAT's geometry against a drive's.
pub(crate) const MTOOLS_ENV: [(&str, &str); 3] =
    [("SOURCE_DATE_EPOCH", FIXED_TIME), ("TZ", "UTC"), ("MTOOLS_SKIP_CHECK", "1")];
pub(crate) const SECTOR: u64 = 512;
const BLOCK: u64 = 4096;
const INODE_SIZE: u64 = 256;
/// The root file system's label.
const LABEL: &str = "vmroot";
/// The time every inode and the file system itself carry (as the store's items do).
pub(crate) const FIXED_TIME: &str = "1";

/// A system's closure as it goes into an image: every store item, and the system item
/// that ties them together.
#[derive(Debug, Clone)]
pub struct Closure {
    pub system_name: String,
    /// The system item: `boot.json` (the request the helper runs), `system.json` (what
    /// it sets up first: files, homes, links, mounts, services), links to the kernel and
    /// initrd, and the list of items it refers to.
    pub system: Item,
    /// Every item, the system item last.
    pub items: Vec<Item>,
    /// Links made in the image's root (`/bin` and friends).
    pub links: Vec<(String, String)>,
    /// The guest's architecture.
    pub arch: Arch,
    /// The kernel and initrd as GRUB finds them in the image.
    pub kernel: String,
    pub initrd: String,
    pub kernel_args: Vec<String>,
}

/// Lowers `system` for booting from a disk: its kernel, an initrd that can find and
/// mount the disk, its packages, and a system item.
pub fn closure(store: &Store, ws: &Workspace, system: &System, verbose: bool) -> Result<Closure> {
    let mut disk_system = system.clone();
    disk_system.initrd_modules.extend(image_modules(system.arch).iter().map(|m| m.to_string()));
    let mut lowered = system::lower(store, ws, &disk_system, verbose)?;
    // File systems checked at boot: Debian's e2fsck (run through libc6's loader) joins
    // the closure.
    if system::checks_file_systems(system) {
        let (argv, items) =
            image_tools::guest_e2fsck(store, system.arch).context("getting e2fsck for the file system checks")?;
        lowered.fsck = argv;
        lowered.packages.extend(items);
    }
    let kernel_item = lowered.kernel.item.clone().with_context(|| {
        format!("system `{}` boots a kernel from the host; a disk image needs a kernel from the store", system.name)
    })?;
    let kernel_rel = lowered
        .kernel
        .image
        .strip_prefix(&kernel_item.path)
        .context("the kernel image is not inside its store item")?;
    let kernel = format!("{}/{}", kernel_item.guest_path(), kernel_rel.display());
    let initrd = format!("{}/initrd", lowered.initrd.guest_path());
    let mut items = vec![kernel_item, lowered.initrd.clone()];
    // Each once: a Debian system's libc6 is also the image tools' (for e2fsck).
    for item in &lowered.packages {
        if !items.contains(item) {
            items.push(item.clone());
        }
    }

    // TERM is fixed: the image must not depend on the terminal it was built from. The
    // links are part of the image's root file system.
    let request = system::root_request(system, &lowered, Mode::Interactive, vec!["/bin/sh".into()], "linux".into());
    let request_json = serde_json::to_string_pretty(&request)?;
    // What the helper sets up before the request, as `run-vm` does: /etc files, users'
    // homes, links, mounts, services.
    let config_json = serde_json::to_string_pretty(&system::system_config(&disk_system, &lowered))?;
    let mut recipe = Recipe::new("system", &format!("system-{}", system.name))
        .param("request", request_json.clone())
        .param("config", config_json.clone())
        .param("kernel", kernel.clone())
        .param("initrd", initrd.clone());
    for item in &items {
        recipe = recipe.input_item("item", item);
    }
    let references: String = items.iter().map(|i| format!("{}\n", i.guest_path())).collect();
    let system_item = store.realise(&recipe, |out| {
        fs::create_dir(out)?;
        fs::write(out.join(guest::image::BOOT_REQUEST_FILE), &request_json)?;
        fs::write(out.join(guest::SYSTEM_CONFIG_FILE), &config_json)?;
        std::os::unix::fs::symlink(&kernel, out.join("kernel"))?;
        std::os::unix::fs::symlink(&initrd, out.join("initrd"))?;
        fs::write(out.join("references"), &references)?;
        Ok(())
    })?;
    items.push(system_item.clone());
    Ok(Closure {
        system_name: system.name.clone(),
        arch: system.arch,
        system: system_item,
        items,
        links: lowered.links,
        kernel,
        initrd,
        kernel_args: lowered.kernel_args,
    })
}

/// The shared-store image's smallest size (the reference's `system-qemu-image/shared-store`).
pub const SHARED_STORE_IMAGE_SIZE: u64 = 16 << 20;
/// Version of the shared-store image's layout; part of its recipe.
const SHARED_STORE_LAYOUT_VERSION: &str = "shared-store-image-v3";
/// Top-level directories of the shared-store image's root.
const SHARED_STORE_DIRS: &[&str] = &["dev", "proc", "sys", "tmp", "run", "root", "etc", "mnt", "var", "store", "xchg"];

/// The small disk image `run-vm` boots a system's root from while the store is shared
/// over 9p (the reference's `system-qemu-image/shared-store`): an MBR with one ext4
/// partition (the guest's `/dev/vda1`) holding the root skeleton that does not depend on
/// any package: the top-level directories, the system's `/etc` files (`passwd`, `group`,
/// `hostname`, ...) and the home directories with their owners. No store items, no
/// links into them, no GRUB (QEMU boots the kernel directly): a change to a package
/// leaves it as it is. An item holding `disk.raw`.
pub fn shared_store_image(store: &Store, system_name: &str, config: &guest::SystemConfig) -> Result<Item> {
    let skeleton = serde_json::json!({ "dirs": SHARED_STORE_DIRS, "files": config.files, "homes": config.homes });
    let skeleton = serde_json::to_string_pretty(&skeleton)?;
    let mut fp = Footprint {
        entries: (SHARED_STORE_DIRS.len() + config.files.len() + config.homes.len() * 3) as u64,
        ..Footprint::default()
    };
    for f in &config.files {
        fp.bytes += f.contents.len() as u64;
        fp.blocks += (f.contents.len() as u64).div_ceil(BLOCK);
    }
    // Directories: the top-level ones, and those the files and homes add.
    fp.blocks += fp.entries;
    let layout =
        Layout::new(Layout::minimum(&fp, Firmware::Bios).size.max(SHARED_STORE_IMAGE_SIZE), &fp, Firmware::Bios);
    let tools = image_tools::tools(store).context("getting the image tools")?;
    let recipe = Recipe::new("shared-store-image", &format!("shared-store-image-{system_name}"))
        .param("layout", SHARED_STORE_LAYOUT_VERSION)
        .param("size", layout.size.to_string())
        .param("inodes", layout.inodes.to_string())
        .param("skeleton", skeleton)
        .input_item("image-tools", &tools.wrappers);
    // One identity (disk signature, file system UUID) for every such image of one layout:
    // what a guest reads of its partition table before anything is mounted is then the
    // same for every system, so systems alike but for their `/etc` files (a scenario's
    // nodes) share a snapshot ([`crate::vm::snapshot`]).
    let uuid = uuid_for(&crate::store::sha256_bytes(
        format!("{SHARED_STORE_LAYOUT_VERSION}\0{}\0{}", layout.size, layout.inodes).as_bytes(),
    ));
    store.realise(&recipe, |out| {
        let scratch = store.scratch("shared-store-image")?;
        let root = scratch.path().join("root");
        let owners = stage_skeleton(config, &root)?;
        let mut entries = Vec::new();
        list(&root, Path::new(""), &mut entries)?;
        fix_times(&root, &entries)?;
        let raw = scratch.path().join("disk.raw");
        let progress = Progress { steps: false, verbose: false, expected_bytes: 0, profile: false };
        let job =
            RawImage { root: &root, mounts: &[], owners: &owners, layout, uuid: &uuid, tools: &tools, boot: None };
        let built = write_raw(&raw, job, progress);
        store::remove_tree(&root)?;
        built?;
        store_disk(&raw, out, DiskFormat::Raw, progress)
    })
}

/// The first line `cmd FLAG` prints (a tool's version), remembered in the store's cache
/// while the program is unchanged ([`host::remembered`]).
fn version_line(store: &Store, mut cmd: Command, flag: &str) -> Result<String> {
    let shown = format!("{} {flag}", crate::process::describe(&cmd));
    let program = PathBuf::from(cmd.get_program());
    let mut ask = || -> Result<String> {
        let out = crate::process::output(cmd.arg(flag))?;
        let text = if out.stdout.is_empty() { out.stderr } else { out.stdout };
        let first = String::from_utf8_lossy(&text).lines().next().unwrap_or_default().to_string();
        ensure!(out.status.success() && !first.is_empty(), "`{shown}` failed ({})", out.status);
        Ok(first)
    };
    let resolved =
        if program.components().count() > 1 { Some(program) } else { host::which(&program.to_string_lossy()) };
    match resolved {
        Some(path) => host::remembered(&store.cache_dir(), &path, &shown, ask),
        None => ask(),
    }
}

/// Makes the shared-store image's root tree in `root`; returns the owners to give the
/// home directories (relative path, uid, gid).
fn stage_skeleton(config: &guest::SystemConfig, root: &Path) -> Result<Vec<(String, u32, u32)>> {
    let mkdirs = |rel: &Path| -> Result<()> {
        let mut dir = root.to_path_buf();
        for part in rel.components() {
            dir.push(part);
            if !dir.exists() {
                fs::create_dir(&dir).with_context(|| format!("creating `{}`", dir.display()))?;
                fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
            }
        }
        Ok(())
    };
    fs::create_dir(root).with_context(|| format!("creating `{}`", root.display()))?;
    fs::set_permissions(root, std::fs::Permissions::from_mode(0o755))?;
    for dir in SHARED_STORE_DIRS {
        mkdirs(Path::new(dir))?;
    }
    fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777))?;
    for f in &config.files {
        let rel = Path::new(f.path.trim_start_matches('/'));
        if let Some(parent) = rel.parent() {
            mkdirs(parent)?;
        }
        let path = root.join(rel);
        fs::write(&path, &f.contents).with_context(|| format!("writing `{}`", path.display()))?;
        fs::set_permissions(&path, std::fs::Permissions::from_mode(f.mode))?;
    }
    let mut owners = Vec::new();
    for h in &config.homes {
        let rel = h.path.trim_start_matches('/');
        mkdirs(Path::new(rel))?;
        fs::set_permissions(root.join(rel), std::fs::Permissions::from_mode(0o700))?;
        owners.push((rel.to_string(), h.uid, h.gid));
    }
    Ok(owners)
}

/// Gives every path under `root` (and `root`) the fixed time: the file system records
/// them (ctime is fixed later, in the file system: it cannot be set on the host).
fn fix_times(root: &Path, entries: &[String]) -> Result<()> {
    let t = nix::sys::time::TimeSpec::new(1, 0);
    for rel in entries.iter().rev() {
        let path = root.join(rel);
        nix::sys::stat::utimensat(None, &path, &t, &t, nix::sys::stat::UtimensatFlags::NoFollowSymlink)
            .with_context(|| format!("setting times of `{}`", path.display()))?;
    }
    nix::sys::stat::utimensat(None, root, &t, &t, nix::sys::stat::UtimensatFlags::NoFollowSymlink)?;
    Ok(())
}

/// What the closure takes on an ext4 file system with 4 KiB blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Footprint {
    /// Apparent size of the files.
    pub bytes: u64,
    /// Data blocks: files, directories and long symlinks.
    pub blocks: u64,
    /// Files, directories and links.
    pub entries: u64,
}

/// Measures the closure's items.
pub fn footprint(closure: &Closure) -> Result<Footprint> {
    let mut fp = Footprint::default();
    for item in &closure.items {
        measure(&item.path, &mut fp)?;
    }
    Ok(fp)
}

fn measure(path: &Path, fp: &mut Footprint) -> Result<()> {
    let meta = fs::symlink_metadata(path).with_context(|| format!("reading `{}`", path.display()))?;
    fp.entries += 1;
    if meta.is_dir() {
        let entries: Vec<_> = fs::read_dir(path).with_context(|| format!("listing `{}`", path.display()))?.collect();
        // A directory entry is 8 bytes plus the name, padded to 4: 64 bytes is generous.
        fp.blocks += (entries.len() as u64 * 64).div_ceil(BLOCK).max(1);
        for entry in entries {
            measure(&entry?.path(), fp)?;
        }
    } else if meta.is_file() {
        fp.bytes += meta.len();
        fp.blocks += meta.len().div_ceil(BLOCK);
    } else if meta.len() >= 60 {
        // Shorter symlink targets live in the inode itself.
        fp.blocks += 1;
    }
    Ok(())
}

/// The sizes of an image's parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// The whole disk, in bytes (a multiple of 1 MiB).
    pub size: u64,
    /// The root file system, in 4 KiB blocks.
    pub fs_blocks: u64,
    /// Inodes in the root file system.
    pub inodes: u64,
    /// The firmware it boots with: an MBR disk for BIOS, a GPT disk with an EFI system
    /// partition for UEFI.
    pub firmware: Firmware,
}

impl Layout {
    /// The layout of a disk of `size` bytes (rounded up to a MiB) for a closure.
    pub fn new(size: u64, fp: &Footprint, firmware: Firmware) -> Layout {
        let size = size.div_ceil(1 << 20) << 20;
        // Room for the system's own files besides the closure's.
        let inodes = (fp.entries + 64) * 5 / 4 + 1024;
        let fs_blocks = size.saturating_sub(root_offset(firmware) + tail(firmware)) / BLOCK;
        Layout { size, fs_blocks, inodes, firmware }
    }

    /// The smallest disk that holds the closure: its data, the inode tables, the journal
    /// mke2fs makes for that size, the 5% reserved for root, and allocation overhead.
    pub fn minimum(fp: &Footprint, firmware: Firmware) -> Layout {
        let around = root_offset(firmware) + tail(firmware);
        let mut size = around + fp.blocks * BLOCK;
        // The journal grows with the file system; two rounds reach the fixed point.
        for _ in 0..3 {
            let layout = Layout::new(size, fp, firmware);
            let inode_blocks = (layout.inodes * INODE_SIZE).div_ceil(BLOCK);
            let journal = journal_blocks(layout.fs_blocks);
            let used = fp.blocks + inode_blocks + journal + 1024;
            let fs_blocks = used * 100 / 94 + 256;
            size = around + fs_blocks * BLOCK;
        }
        Layout::new(size, fp, firmware)
    }

    /// The default: the minimum plus a quarter of the closure (at least 64 MiB) of free
    /// space, rounded up to 64 MiB.
    pub fn default_for(fp: &Footprint, firmware: Firmware) -> Layout {
        let min = Layout::minimum(fp, firmware).size;
        let headroom = (fp.blocks * BLOCK / 4).max(64 << 20);
        Layout::new((min + headroom).div_ceil(64 << 20) << 26, fp, firmware)
    }

    /// Where the root file system starts on the disk.
    pub fn root_offset(&self) -> u64 {
        root_offset(self.firmware)
    }
}

/// Journal size mke2fs picks for a file system of `blocks` 4 KiB blocks
/// (`ext2fs_default_journal_size` in e2fsprogs 1.47).
fn journal_blocks(blocks: u64) -> u64 {
    match blocks {
        0..2048 => 0,
        2048..32768 => 1024,
        32768..262144 => 4096,
        262144..524288 => 8192,
        524288..4194304 => 16384,
        4194304..8388608 => 32768,
        8388608..16777216 => 65536,
        16777216..33554432 => 131072,
        _ => 262144,
    }
}

/// What an image is asked to be, besides its system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageOptions {
    pub format: DiskFormat,
    pub layout: Layout,
    /// Root read-only with a tmpfs overlay.
    pub volatile: bool,
    /// The helper checks the store against the database at every boot.
    pub verify_store: bool,
}

/// Which builder writes the partition table and the file system (`--builder`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Builder {
    /// On the host, rootless, with e2fsprogs and fdisk from Debian packages in the store.
    Host,
    /// Inside a VM, with e2fsprogs and fdisk from Debian packages in the store.
    Vm,
}

/// The versions of the host's tools that write the image: `qemu-img` for a qcow2 image
/// (the rest come from the store, named by their items in the recipe). Part of the
/// recipe, so a new QEMU makes a new image rather than passing for the old one.
pub fn tool_versions(store: &Store, format: DiskFormat) -> Result<String> {
    Ok(match format {
        DiskFormat::Qcow2 => version_line(store, crate::process::command(host::QEMU_IMG.program), "--version")?,
        DiskFormat::Raw => String::new(),
    })
}

/// The recipe of an image of `closure` (`uefi`: the UEFI tools, for a UEFI image).
/// Which builder writes it is not in it: both run the same tools and write the same bytes.
pub fn recipe(
    closure: &Closure,
    opts: &ImageOptions,
    tools: &StoreTools,
    uefi: Option<&StoreTools>,
    tool_versions: &str,
) -> Recipe {
    let volatile = if opts.volatile { "-volatile" } else { "" };
    let firmware = if opts.layout.firmware == Firmware::Uefi { "-uefi" } else { "" };
    let arch = match closure.arch {
        Arch::X86_64 => String::new(),
        other => format!("-{other}"),
    };
    let name = format!("vm-image-{}{arch}-{}{volatile}{firmware}", closure.system_name, opts.format.name());
    let mut recipe = Recipe::new("vm-image", &name)
        .param("layout", LAYOUT_VERSION)
        .param("format", opts.format.name())
        .param("size", opts.layout.size.to_string())
        .param("inodes", opts.layout.inodes.to_string())
        .param("volatile", opts.volatile.to_string())
        .param("verify-store", opts.verify_store.to_string())
        .param("grub-modules", GRUB_MODULES.join(","))
        .param("tools", tool_versions)
        .input_item("image-tools", &tools.wrappers);
    // A BIOS image's recipe is what it was before images could be for UEFI.
    if opts.layout.firmware == Firmware::Uefi {
        recipe =
            recipe.param("firmware", opts.layout.firmware.name()).param("grub-efi-modules", GRUB_EFI_MODULES.join(","));
    }
    if let Some(uefi) = uefi {
        recipe = recipe.input_item("uefi-tools", &uefi.wrappers);
    }
    if closure.arch != Arch::X86_64 {
        recipe = recipe.param("arch", closure.arch.name());
    }
    for item in &closure.items {
        recipe = recipe.input_item("item", item);
    }
    recipe
}

/// The image file's name inside its item.
pub fn file_name(format: DiskFormat) -> String {
    format!("disk.{}", format.name())
}

/// A UUID made from the recipe's hash: fixed for the same inputs, different otherwise.
pub fn uuid_for(recipe_hash: &str) -> String {
    let h = recipe_hash;
    format!("{}-{}-4{}-8{}-{}", &h[0..8], &h[8..12], &h[13..16], &h[17..20], &h[20..32])
}

/// `grub.cfg`: boot the system's kernel and initrd at once, on the serial console and
/// the screen, naming the root file system by UUID and the system item.
pub fn grub_cfg(closure: &Closure, opts: &ImageOptions, uuid: &str) -> String {
    // aarch64's `virt` has no PC serial port: its UART is a PL011, and its firmware's
    // console is that UART already (GRUB's own `serial` is for PCs).
    let (serial, terminals, console) = match closure.arch {
        Arch::X86_64 => ("serial --unit=0 --speed=115200\n", "serial console", "console=ttyS0"),
        Arch::Aarch64 => ("", "console", "console=ttyAMA0"),
    };
    let mut args = vec!["console=tty0".to_string(), console.to_string(), "quiet".to_string()];
    args.push(format!("{}=UUID={uuid}", guest::image::ROOT_ARG));
    args.push(format!("{}={}", guest::image::SYSTEM_ARG, closure.system.guest_path()));
    if opts.volatile {
        args.push(guest::image::VOLATILE_ARG.to_string());
    }
    if opts.verify_store {
        args.push(guest::image::VERIFY_STORE_ARG.to_string());
    }
    args.extend(closure.kernel_args.iter().cloned());
    format!(
        "# Generated by `cargo xtask vm-image` for system `{name}`.\n\
         {serial}\
         terminal_input {terminals}\n\
         terminal_output {terminals}\n\
         set timeout=0\n\
         set default=0\n\
         menuentry \"{name}\" {{\n\
         \x20   search --no-floppy --fs-uuid --set=root {uuid}\n\
         \x20   linux {kernel} {args}\n\
         \x20   initrd {initrd}\n\
         }}\n",
        name = closure.system_name,
        kernel = closure.kernel,
        initrd = closure.initrd,
        args = args.join(" "),
    )
}

/// The store database: every item with the content hash the store recorded for it.
pub fn store_db(store: &Store, closure: &Closure) -> Result<StoreDb> {
    let mut items = Vec::new();
    for item in &closure.items {
        let references = if item == &closure.system {
            closure.items.iter().filter(|i| *i != item).map(|i| i.guest_path().into_string()).collect()
        } else {
            Vec::new()
        };
        items.push(Registration {
            path: item.guest_path().into_string(),
            sha256: store.meta(item)?.content_sha256,
            references,
        });
    }
    Ok(StoreDb { version: guest::image::STORE_DB_VERSION, items })
}

/// How much a build says, and whether it shows the commands it runs.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Step lines (and, on a terminal, bars for mke2fs and qemu-img: `crate::progress`).
    pub steps: bool,
    pub verbose: bool,
    /// What mke2fs is to write (the closure), for its bar; 0: not known.
    pub expected_bytes: u64,
    /// Record when each step starts ([`take_profile`]): the bench's profile of a build.
    pub profile: bool,
}

/// The steps' starts recorded by builds with [`Progress::profile`], in order.
static PROFILE: std::sync::Mutex<Vec<(&'static str, std::time::Instant)>> = std::sync::Mutex::new(Vec::new());

/// The steps recorded since the last call, each with the time until the next one (the
/// last one until now), in seconds.
#[cfg(feature = "bench")]
pub fn take_profile() -> Vec<(&'static str, f64)> {
    let marks = std::mem::take(&mut *PROFILE.lock().unwrap_or_else(|e| e.into_inner()));
    let now = std::time::Instant::now();
    let ends = marks.iter().skip(1).map(|(_, t)| *t).chain([now]);
    marks.iter().zip(ends).map(|((name, start), end)| (*name, (end - *start).as_secs_f64())).collect()
}

impl Progress {
    /// Step lines unless `--quiet`.
    pub fn for_stderr(verbose: bool) -> Progress {
        Progress { steps: crate::progress::shown() || verbose, verbose, expected_bytes: 0, profile: false }
    }

    /// Records that step `name` starts now, when profiling.
    pub fn mark(&self, name: &'static str) {
        if self.profile {
            PROFILE.lock().unwrap_or_else(|e| e.into_inner()).push((name, std::time::Instant::now()));
        }
    }

    pub(crate) fn step(&self, msg: &str) {
        if self.steps {
            eprintln!("vm-image: {msg}");
        }
    }
}

/// One image to build, for either builder: the closure, the options, the UUID (from
/// the recipe's hash) and the tools.
#[derive(Clone, Copy)]
pub struct ImageJob<'a> {
    pub store: &'a Store,
    pub closure: &'a Closure,
    pub opts: &'a ImageOptions,
    pub uuid: &'a str,
    pub tools: &'a StoreTools,
    /// The UEFI tools, for a UEFI image.
    pub uefi: Option<&'a StoreTools>,
    pub progress: Progress,
}

/// Builds the image into the directory `out` (created), as `disk.FORMAT`, on the host.
/// `scratch` holds the staging tree and the raw image meanwhile.
pub fn build_on_host(job: &ImageJob, out: &Path) -> Result<()> {
    let ImageJob { store, closure, opts, uuid, tools, uefi, progress } = *job;
    let scratch = store.scratch("vm-image")?;
    let root = scratch.path().join("root");
    progress.mark("stage");
    progress.step(&format!("staging the closure of `{}` ({} items)", closure.system_name, closure.items.len()));
    let progress = match crate::progress::mode() {
        crate::progress::Mode::Bars => Progress { expected_bytes: footprint(closure)?.bytes, ..progress },
        _ => progress,
    };
    let started = std::time::Instant::now();
    // With a user namespace, mke2fs sees the store's items bind-mounted on empty
    // directories of a small tree; without, the tree holds hard links to their files.
    let items = if host::userns_bind_mounts() { Staging::MountPoints } else { Staging::HardLinks };
    let (entries, mounts) = stage(store, closure, opts, uuid, &root, items)?;
    if progress.verbose {
        let how = match items {
            Staging::MountPoints => format!("{} items to bind-mount", mounts.len()),
            Staging::HardLinks => "items as hard links".into(),
        };
        eprintln!("  ({} entries staged, {how}, in {:.2} s)", entries.len(), started.elapsed().as_secs_f64());
    }
    // A qcow2 image's raw intermediate goes to memory when there is room: mke2fs writes
    // it a third faster there, and it never reaches the disk.
    let memory = match opts.format {
        DiskFormat::Qcow2 => store.memory_scratch("vm-image", opts.layout.size),
        DiskFormat::Raw => None,
    };
    let raw = memory.as_ref().map_or(scratch.path(), |m| m.path()).join("disk.raw");
    if progress.verbose {
        eprintln!("  (the raw image is written to `{}`)", raw.display());
    }
    progress.mark("grub");
    let boot = match opts.layout.firmware {
        Firmware::Bios => {
            let (mbr, core) = grub_boot_code(store, tools)?;
            Boot::Bios { mbr, core }
        }
        Firmware::Uefi => {
            let uefi = uefi.context("a UEFI image needs the UEFI tools")?;
            Boot::Uefi { esp: efi_system_partition(store, tools, uefi, closure.arch, uuid, scratch.path())? }
        }
    };
    let job =
        RawImage { root: &root, mounts: &mounts, owners: &[], layout: opts.layout, uuid, tools, boot: Some(boot) };
    let built = write_raw(&raw, job, progress);
    // The staging tree has read-only directories; removed here, before the scratch goes,
    // as a step of its own.
    progress.mark("unstage");
    store::remove_tree(&root)?;
    built?;
    store_disk(&raw, out, opts.format, progress)
}

/// Puts the finished raw image into the item directory `out` (created): moved as it is,
/// or converted to qcow2.
pub(crate) fn store_disk(raw: &Path, out: &Path, format: DiskFormat, progress: Progress) -> Result<()> {
    fs::create_dir(out).with_context(|| format!("creating `{}`", out.display()))?;
    let dest = out.join(file_name(format));
    progress.mark(format.name());
    match format {
        DiskFormat::Raw => fs::rename(raw, &dest).with_context(|| format!("moving the image to `{}`", dest.display())),
        DiskFormat::Qcow2 => {
            progress.step("converting to qcow2");
            let mut cmd = crate::process::command(host::QEMU_IMG.program);
            // `-t unsafe`: no flush of the new file when done (which waited for the disk:
            // half of the conversion's time for a 1.4 GiB image here); the store flushes
            // the item when it commits it, and the thread below starts that early.
            cmd.args(["convert", "-t", "unsafe", "-f", "raw", "-O", "qcow2"]);
            cmd.arg(raw).arg(&dest);
            let total = fs::metadata(raw).map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512).ok();
            let _bar = crate::progress::file_bar("qemu-img convert", &dest, total);
            // The store flushes the item to disk when it commits it: have the disk write
            // the image back while qemu-img is still converting, not all after.
            let converted = std::sync::atomic::AtomicBool::new(false);
            std::thread::scope(|s| {
                s.spawn(|| {
                    while !converted.load(std::sync::atomic::Ordering::Relaxed) {
                        std::thread::sleep(std::time::Duration::from_millis(100));
                        if let Ok(file) = File::open(&dest) {
                            let _ = store::start_file_writeback(&file);
                        }
                    }
                });
                let ran = process::run(&cmd).map(drop);
                converted.store(true, std::sync::atomic::Ordering::Relaxed);
                ran
            })
        }
    }
}

/// How [`stage`] puts the store's items into the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Staging {
    /// Recreated, with hard links to the store's files.
    HardLinks,
    /// Empty directories, for the items to be bind-mounted on (items that are not
    /// directories are hard-linked).
    MountPoints,
}

/// Makes the image's root tree in `root`: the store items, `grub.cfg`, the store
/// database, the system's links and the usual top-level directories. Returns every path
/// made in it (relative, sorted) and, for [`Staging::MountPoints`], the bind mounts to
/// make (item, mount point).
pub(crate) fn stage(
    store: &Store,
    closure: &Closure,
    opts: &ImageOptions,
    uuid: &str,
    root: &Path,
    staging: Staging,
) -> Result<(Vec<String>, Vec<host::BindMount>)> {
    let mut dirs: BTreeSet<String> =
        ["dev", "proc", "sys", "tmp", "run", "root", "etc", "mnt", "boot", "boot/grub", "var", "var/lib", "store"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    let db_path = guest::image::STORE_DB.trim_start_matches('/');
    if let Some(parent) = Path::new(db_path).parent() {
        dirs.insert(parent.to_string_lossy().into_owned());
    }
    fs::create_dir(root).with_context(|| format!("creating `{}`", root.display()))?;
    for dir in &dirs {
        fs::create_dir_all(root.join(dir)).with_context(|| format!("creating `{dir}` in the staging tree"))?;
    }
    // Modes set explicitly: what create_dir leaves depends on the caller's umask.
    for dir in std::iter::once(root.to_path_buf()).chain(dirs.iter().map(|d| root.join(d))) {
        fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    }
    fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777))?;
    fs::set_permissions(root.join("root"), std::fs::Permissions::from_mode(0o700))?;
    fs::write(root.join("boot/grub/grub.cfg"), grub_cfg(closure, opts, uuid)).context("writing grub.cfg")?;
    let db = store_db(store, closure)?;
    fs::write(root.join(db_path), serde_json::to_vec_pretty(&db)?).context("writing the store database")?;
    for (link, target) in &closure.links {
        let path = root.join(link.trim_start_matches('/'));
        if let Some(parent) = path.parent() {
            if !parent.exists() {
                fs::create_dir_all(parent)?;
                fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755))?;
            }
        }
        std::os::unix::fs::symlink(target, &path).with_context(|| format!("linking `{link}` in the staging tree"))?;
    }
    let mut items: Vec<&Item> = closure.items.iter().collect();
    items.sort_by_key(|i| i.file_name());
    let mut mounts = Vec::new();
    for item in items {
        let dst = root.join("store").join(item.file_name());
        if staging == Staging::MountPoints && item.path.is_dir() {
            fs::create_dir(&dst).with_context(|| format!("creating `{}`", dst.display()))?;
            mounts.push((item.path.clone(), dst));
        } else {
            link_tree(&item.path, &dst)?;
        }
    }
    let mut entries = Vec::new();
    list(root, Path::new(""), &mut entries)?;
    fix_times(root, &entries)?;
    Ok((entries, mounts))
}

/// Recreates `src` at `dst`: directories (with the store's modes), symlinks, and files
/// as hard links to the store's (copies when a link is refused), in sorted order.
fn link_tree(src: &Path, dst: &Path) -> Result<()> {
    let meta = fs::symlink_metadata(src).with_context(|| format!("reading `{}`", src.display()))?;
    if meta.is_dir() {
        fs::create_dir(dst).with_context(|| format!("creating `{}`", dst.display()))?;
        let mut names: Vec<_> = fs::read_dir(src)?.map(|e| e.map(|e| e.file_name())).collect::<Result<_, _>>()?;
        names.sort();
        for name in names {
            link_tree(&src.join(&name), &dst.join(&name))?;
        }
        fs::set_permissions(dst, std::fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    } else if meta.is_symlink() {
        std::os::unix::fs::symlink(fs::read_link(src)?, dst)
            .with_context(|| format!("creating link `{}`", dst.display()))?;
    } else if fs::hard_link(src, dst).is_err() {
        fs::copy(src, dst).with_context(|| format!("copying `{}` to `{}`", src.display(), dst.display()))?;
    }
    Ok(())
}

/// Every path under `dir`, relative, parents before children, in sorted order.
pub(crate) fn list(dir: &Path, rel: &Path, out: &mut Vec<String>) -> Result<()> {
    let mut names: Vec<_> = fs::read_dir(dir)
        .with_context(|| format!("listing `{}`", dir.display()))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let rel = rel.join(&name);
        let text = rel.to_str().with_context(|| format!("`{}` is not UTF-8", path.display()))?;
        // The debugfs script that gives the shared-store image's homes their owners
        // quotes paths so; nothing in the store needs these characters.
        if text.contains(['"', '\n', '\\']) {
            bail!("`{}`: the image builder cannot name files containing `\"`, `\\` or newlines", path.display());
        }
        out.push(text.to_string());
        if fs::symlink_metadata(&path)?.is_dir() {
            list(&path, &rel, out)?;
        }
    }
    Ok(())
}

/// What [`write_raw`] writes.
struct RawImage<'a> {
    /// The staging tree the file system is made of.
    root: &'a Path,
    /// Bind mounts made for mke2fs: source, mount point.
    mounts: &'a [host::BindMount],
    /// Inodes not owned by root: path relative to the root, uid, gid.
    owners: &'a [(String, u32, u32)],
    layout: Layout,
    uuid: &'a str,
    tools: &'a StoreTools,
    /// How it boots, if it does.
    boot: Option<Boot>,
}

/// What makes a disk boot.
enum Boot {
    /// GRUB's boot code for BIOS: the MBR's and core.img.
    Bios { mbr: Vec<u8>, core: Vec<u8> },
    /// The EFI system partition's FAT file system, a file.
    Uefi { esp: PathBuf },
}

/// Writes the raw image `raw`: partition table, file system of the staging tree, fixed
/// inodes and GRUB's boot code, as `job` says.
fn write_raw(raw: &Path, job: RawImage, progress: Progress) -> Result<()> {
    let RawImage { root, mounts, owners, layout, uuid, tools, boot } = job;
    let file = File::create(raw).with_context(|| format!("creating `{}`", raw.display()))?;
    file.set_len(layout.size).with_context(|| format!("sizing `{}`", raw.display()))?;
    drop(file);

    progress.mark("sfdisk");
    let mut sfdisk = tools.command("sfdisk")?;
    sfdisk.args(SFDISK_ARGS).arg(raw);
    process::run_with(&sfdisk, Stdin::Bytes(partition_table(uuid, &layout).as_bytes()))
        .context("writing the partition table")?;

    progress.mark("mke2fs");
    progress.step(&format!("making the ext4 file system ({} MiB) with the closure", (layout.fs_blocks * BLOCK) >> 20));
    let mut mke2fs = tools.command("mke2fs")?;
    mke2fs
        .args(mke2fs_options(&layout, uuid))
        .arg("-d")
        .arg(root)
        .arg(raw)
        .arg(layout.fs_blocks.to_string())
        .env("E2FSPROGS_FAKE_TIME", FIXED_TIME);
    if !mounts.is_empty() {
        mke2fs = host::with_bind_mounts(&mke2fs, mounts);
    }
    let bar =
        crate::progress::file_bar("mke2fs -d", raw, (progress.expected_bytes > 0).then_some(progress.expected_bytes));
    let made = process::run(&mke2fs);
    drop(bar);
    made.with_context(|| {
        format!(
            "making the root file system ({} MiB); if it ran out of space, give a larger --size",
            (layout.fs_blocks * BLOCK) >> 20
        )
    })?;

    // mke2fs copies ctime, atime (which its own reading may have just updated) and
    // owners from the staging tree; make them fixed, then give `owners` theirs.
    progress.mark("inodes");
    let fixed = guest::ext4::Fixed { time: FIXED_TIME.parse()?, uid: 0, gid: 0 };
    let started = std::time::Instant::now();
    let inodes =
        guest::ext4::normalise_inodes(raw, layout.root_offset(), fixed).context("fixing inode times and owners")?;
    if progress.verbose {
        eprintln!("  ({inodes} inodes given fixed times and owners in {:.2} s)", started.elapsed().as_secs_f64());
    }
    if !owners.is_empty() {
        let fs_spec = format!("{}?offset={}", raw.display(), layout.root_offset());
        let script: String = owners
            .iter()
            .map(|(path, uid, gid)| format!("sif \"/{path}\" uid {uid}\nsif \"/{path}\" gid {gid}\n"))
            .collect();
        progress.mark("debugfs");
        let mut debugfs = tools.command("debugfs")?;
        debugfs.args(["-w", "-f", "-"]).arg(&fs_spec).env("E2FSPROGS_FAKE_TIME", FIXED_TIME);
        let out = process::run_with(&debugfs, Stdin::Bytes(script.as_bytes())).context("setting owners")?;
        let errors = String::from_utf8_lossy(&out.stderr);
        let errors: Vec<&str> = errors.lines().filter(|l| !l.starts_with("debugfs ")).collect();
        if !errors.is_empty() {
            bail!("debugfs could not set owners: {}", errors.join("; "));
        }
    }

    let Some(boot) = boot else {
        return Ok(());
    };
    progress.mark("boot-code");
    let mut file = File::options().write(true).open(raw).with_context(|| format!("opening `{}`", raw.display()))?;
    match boot {
        Boot::Bios { mbr, core } => {
            file.write_all(&mbr).context("writing GRUB's boot.img into the MBR")?;
            file.seek(SeekFrom::Start(SECTOR))?;
            file.write_all(&core).context("writing GRUB's core.img after the MBR")?;
        }
        Boot::Uefi { esp } => {
            let mut fat = File::open(&esp).with_context(|| format!("opening `{}`", esp.display()))?;
            file.seek(SeekFrom::Start(PARTITION_OFFSET))?;
            std::io::copy(&mut fat, &mut file).context("writing the EFI system partition")?;
        }
    }
    file.sync_all()?;
    drop(file);

    // No e2fsck here: it would cost as much as making the file system; the end-to-end
    // tests run `e2fsck -fn` on every image they build.
    Ok(())
}

/// sfdisk's options: it writes into the file or disk it is given and nothing else.
pub(crate) const SFDISK_ARGS: [&str; 3] = ["--no-tell-kernel", "--no-reread", "--quiet"];

/// The sfdisk script of the partition table. For BIOS: one bootable Linux partition from
/// 1 MiB to the end. For UEFI, a GPT: the EFI system partition from 1 MiB, then the root
/// file system's. The disk's and partitions' identifiers come from the UUID too: sfdisk
/// would pick random ones.
pub(crate) fn partition_table(uuid: &str, layout: &Layout) -> String {
    match layout.firmware {
        Firmware::Bios => format!(
            "label: dos\nlabel-id: 0x{}\nunit: sectors\n{},,L,*\n",
            &uuid.replace('-', "")[..8],
            PARTITION_OFFSET / SECTOR
        ),
        Firmware::Uefi => {
            let id = |what: &str| uuid_for(&crate::store::sha256_bytes(format!("{uuid}\0{what}").as_bytes()));
            format!(
                "label: gpt\nlabel-id: {disk}\nunit: sectors\nfirst-lba: {first}\n\
                 start={first}, size={esp}, type={ESP_TYPE}, uuid={esp_id}, name=\"EFI system partition\"\n\
                 start={root}, size={root_size}, type={LINUX_TYPE}, uuid={root_id}, name=\"root\"\n",
                disk = id("disk"),
                first = PARTITION_OFFSET / SECTOR,
                esp = ESP_SIZE / SECTOR,
                esp_id = id("esp"),
                root = layout.root_offset() / SECTOR,
                root_size = layout.fs_blocks * BLOCK / SECTOR,
                root_id = id("root"),
            )
        }
    }
}

/// GPT's partition types: an EFI system partition, Linux data.
const ESP_TYPE: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
const LINUX_TYPE: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";

/// mke2fs's options for the root file system, before `-d DIR DEVICE BLOCKS`; it runs
/// with `E2FSPROGS_FAKE_TIME` set to [`FIXED_TIME`].
pub(crate) fn mke2fs_options(layout: &Layout, uuid: &str) -> Vec<String> {
    let mut args: Vec<String> = ["-q", "-F", "-t", "ext4", "-b", &BLOCK.to_string(), "-I", &INODE_SIZE.to_string()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(["-N".into(), layout.inodes.to_string(), "-L".into(), LABEL.into(), "-U".into(), uuid.into()]);
    // The disk is fresh (zeros) in both builders. Saying so makes mke2fs mark the inode
    // tables zeroed whatever it writes to: it would for a file (where discarding zeroes)
    // but not for a block device.
    args.push("-E".into());
    args.push(format!("offset={},hash_seed={uuid},root_owner=0:0,assume_storage_prezeroed=1", layout.root_offset()));
    args
}

/// GRUB for BIOS without `grub-install` (which refuses image files): returns the first
/// 440 bytes of `boot.img`, for the MBR (the disk identifier and partition table after
/// them stay), and `core.img`, for sector 1, where boot.img and core.img's own first
/// sector look for it by default. core.img (grub-mkimage's output) is a store item: it
/// depends only on GRUB's version and the modules built in.
pub(crate) fn grub_boot_code(store: &Store, tools: &StoreTools) -> Result<(Vec<u8>, Vec<u8>)> {
    let dir = tools.grub_i386_pc();
    let boot_path = dir.join("boot.img");
    let recipe = Recipe::new("grub-core", "grub-core-i386-pc")
        .param("prefix", GRUB_PREFIX)
        .param("modules", GRUB_MODULES.join(","))
        .input_item("image-tools", &tools.wrappers);
    let item = store.realise(&recipe, |out| {
        fs::create_dir(out)?;
        let mut mkimage = tools.command("grub-mkimage")?;
        mkimage.args(["-O", "i386-pc", "-p", GRUB_PREFIX, "-d"]).arg(&dir).arg("-o").arg(out.join("core.img"));
        mkimage.args(GRUB_MODULES);
        process::run(&mkimage).map(drop).context("making GRUB's core.img")
    })?;
    let core = item.path.join("core.img");
    let core_bytes = fs::read(&core).with_context(|| format!("reading `{}`", core.display()))?;
    let gap = PARTITION_OFFSET - SECTOR;
    ensure!(
        core_bytes.len() as u64 <= gap,
        "GRUB's core.img ({} bytes) does not fit in the {gap}-byte gap",
        core_bytes.len()
    );
    let boot = fs::read(&boot_path).with_context(|| format!("reading `{}`", boot_path.display()))?;
    ensure!(boot.len() == SECTOR as usize, "`{}` is not one sector long", boot_path.display());
    let mut mbr = boot[..440].to_vec();
    // As grub-bios-setup does for hard disks: no-op the jump that would trust the BIOS's
    // drive number only for floppies.
    mbr[0x66] = 0x90;
    mbr[0x67] = 0x90;
    Ok((mbr, core_bytes))
}

/// Where GRUB's core.img looks for its configuration: the first partition.
const GRUB_PREFIX: &str = "(hd0,msdos1)/boot/grub";
/// Where GRUB's UEFI image looks for it: the second partition of the GPT.
const GRUB_EFI_PREFIX: &str = "(hd0,gpt2)/boot/grub";

/// The EFI system partition of a UEFI image, made in `dir`: a FAT file system (volume ID
/// from `uuid`, times fixed) holding GRUB's x86_64-efi image as the removable-media path
/// firmware boots, `EFI/BOOT/BOOTX64.EFI`. The GRUB image (grub-mkimage's output) is a
/// store item: it depends only on GRUB's version and the modules built in.
fn efi_system_partition(
    store: &Store,
    tools: &StoreTools,
    uefi: &StoreTools,
    arch: Arch,
    uuid: &str,
    dir: &Path,
) -> Result<PathBuf> {
    let grub = grub_efi_image(store, tools, uefi, arch)?;
    let esp = dir.join("esp.fat");
    File::create(&esp).and_then(|f| f.set_len(ESP_SIZE)).with_context(|| format!("creating `{}`", esp.display()))?;
    let mut mkfs = uefi.command("mkfs.fat")?;
    mkfs.args(mkfs_fat_options(uuid)).arg(&esp);
    process::run(&mkfs).context("making the EFI system partition's file system")?;
    let mtools = |program: &str, args: &[&std::ffi::OsStr]| -> Result<()> {
        let mut cmd = uefi.command(program)?;
        cmd.arg("-i").arg(&esp).args(args).envs(MTOOLS_ENV);
        process::run(&cmd).map(drop).with_context(|| format!("writing the EFI system partition ({program})"))
    };
    mtools("mmd", &ESP_DIRS.map(std::ffi::OsStr::new))?;
    mtools("mcopy", &[grub.as_os_str(), esp_boot_file(arch).as_ref()])?;
    Ok(esp)
}

/// mkfs.fat's options for the EFI system partition, before the file: no time or random
/// value in it (`--invariant`), the volume ID from the image's UUID.
pub(crate) fn mkfs_fat_options(uuid: &str) -> [String; 5] {
    ["--invariant".into(), "-i".into(), uuid[..8].to_string(), "-n".into(), "EFI".into()]
}

/// GRUB's UEFI image for `arch` (x86_64-efi's `BOOTX64.EFI`, arm64-efi's `BOOTAA64.EFI`,
/// a store item's), with [`GRUB_EFI_MODULES`] built in, looking for its configuration at
/// [`GRUB_EFI_PREFIX`]. The host's (x86_64) `grub-mkimage` makes either.
pub(crate) fn grub_efi_image(store: &Store, tools: &StoreTools, uefi: &StoreTools, arch: Arch) -> Result<PathBuf> {
    let (format, file, name) = match arch {
        Arch::X86_64 => ("x86_64-efi", "BOOTX64.EFI", "grub-efi-x86_64"),
        Arch::Aarch64 => ("arm64-efi", "BOOTAA64.EFI", "grub-efi-arm64"),
    };
    let mut recipe = Recipe::new("grub-efi", name)
        .param("prefix", GRUB_EFI_PREFIX)
        .param("modules", GRUB_EFI_MODULES.join(","))
        .input_item("image-tools", &tools.wrappers)
        .input_item("uefi-tools", &uefi.wrappers);
    let modules = match arch {
        Arch::X86_64 => uefi.grub_x86_64_efi(),
        other => {
            let (item, dir) = image_tools::grub_efi_modules(store, other)?;
            recipe = recipe.input_item("grub-efi-modules", &item);
            dir
        }
    };
    let item = store.realise(&recipe, |out| {
        fs::create_dir(out)?;
        let mut mkimage = tools.command("grub-mkimage")?;
        mkimage.args(["-O", format, "-p", GRUB_EFI_PREFIX, "-d"]).arg(&modules);
        mkimage.arg("-o").arg(out.join(file)).args(GRUB_EFI_MODULES);
        process::run(&mkimage).map(drop).context("making GRUB's UEFI image")
    })?;
    Ok(item.path.join(file))
}

/// The first byte offset at which two files differ (a shorter file differs where it
/// ends), or `None` when they are identical.
pub fn first_difference(a: &Path, b: &Path) -> Result<Option<u64>> {
    let mut fa = File::open(a).with_context(|| format!("opening `{}`", a.display()))?;
    let mut fb = File::open(b).with_context(|| format!("opening `{}`", b.display()))?;
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let mut offset = 0u64;
    loop {
        let na = crate::store::read_full(&mut fa, &mut ba).with_context(|| format!("reading `{}`", a.display()))?;
        let nb = crate::store::read_full(&mut fb, &mut bb).with_context(|| format!("reading `{}`", b.display()))?;
        let n = na.min(nb);
        if let Some(i) = ba[..n].iter().zip(&bb[..n]).position(|(x, y)| x != y) {
            return Ok(Some(offset + i as u64));
        }
        if na != nb {
            return Ok(Some(offset + n as u64));
        }
        if na == 0 {
            return Ok(None);
        }
        offset += n as u64;
    }
}

/// Where a byte offset of a raw image for `firmware` falls, for messages.
pub fn region(offset: u64, firmware: Firmware) -> String {
    let root = root_offset(firmware);
    match (firmware, offset) {
        (Firmware::Bios, 0..440) => "GRUB's boot code in the MBR".to_string(),
        (Firmware::Bios, 440..512) => "the MBR's partition table".to_string(),
        (Firmware::Bios, 512..PARTITION_OFFSET) => "GRUB's core.img".to_string(),
        (Firmware::Uefi, 0..PARTITION_OFFSET) => "the protective MBR and the GPT".to_string(),
        (Firmware::Uefi, PARTITION_OFFSET..) if offset < root => "the EFI system partition".to_string(),
        _ if offset >= root => format!("the root file system, block {}", (offset - root) / BLOCK),
        _ => "the backup GPT".to_string(),
    }
}

/// The path of the built image file in an image item.
pub fn image_path(item: &Item, format: DiskFormat) -> PathBuf {
    item.path.join(file_name(format))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(mib: u64) -> Footprint {
        Footprint { bytes: mib << 20, blocks: (mib << 20) / BLOCK, entries: 5000 }
    }

    #[test]
    fn minimum_covers_data_inodes_and_journal() {
        let min = Layout::minimum(&fp(400), Firmware::Bios);
        assert!(min.size > (400 << 20) + (16 << 20) + 5000 * INODE_SIZE, "{min:?}");
        assert!(min.size < 520 << 20, "{min:?}");
        assert_eq!(min.size % (1 << 20), 0);
        let default = Layout::default_for(&fp(400), Firmware::Bios);
        assert!(default.size >= min.size + (64 << 20), "{default:?}");
        assert_eq!(default.size % (64 << 20), 0);
        assert_eq!(Layout::new(1, &fp(1), Firmware::Bios).size, 1 << 20);
    }

    #[test]
    fn journal_follows_mke2fs() {
        assert_eq!(journal_blocks(1000), 0);
        assert_eq!(journal_blocks(150_000), 4096);
        assert_eq!(journal_blocks(300_000), 8192);
        assert_eq!(journal_blocks(1 << 20), 16384);
    }

    #[test]
    fn uuid_is_well_formed_and_follows_the_hash() {
        let u = uuid_for("0123456789abcdef0123456789abcdef");
        assert_eq!(u, "01234567-89ab-4def-8123-456789abcdef");
        assert_ne!(u, uuid_for("1123456789abcdef0123456789abcdef"));
    }

    #[test]
    fn grub_cfg_names_kernel_root_and_system() {
        let item = |name: &str| Item { hash: "h".repeat(32), name: name.into(), path: PathBuf::from("/s") };
        let closure = Closure {
            system_name: "minimal".into(),
            arch: Arch::X86_64,
            system: item("system-minimal"),
            items: vec![],
            links: vec![],
            kernel: "/store/k/boot/vmlinuz".into(),
            initrd: "/store/i/initrd".into(),
            kernel_args: vec!["vm.boot-check".into()],
        };
        let layout = Layout::new(1 << 30, &fp(1), Firmware::Bios);
        let opts = ImageOptions { format: DiskFormat::Raw, layout, volatile: true, verify_store: false };
        let cfg = grub_cfg(&closure, &opts, "u-u");
        let hs = "h".repeat(32);
        assert!(
            cfg.contains(&format!(
                "    linux /store/k/boot/vmlinuz console=tty0 console=ttyS0 quiet vm.root=UUID=u-u \
             vm.system=/store/{hs}-system-minimal vm.volatile vm.boot-check\n"
            )),
            "{cfg}"
        );
        assert!(cfg.contains("    initrd /store/i/initrd\n"), "{cfg}");
        assert!(cfg.contains("--fs-uuid --set=root u-u"), "{cfg}");
        assert!(!cfg.contains("verify-store"));
        assert!(cfg.contains("\nserial --unit=0 --speed=115200\nterminal_input serial console\n"), "{cfg}");
        // aarch64: the PL011 UART, the firmware's console (GRUB's `serial` is for PCs).
        let cfg = grub_cfg(&Closure { arch: Arch::Aarch64, ..closure }, &opts, "u-u");
        assert!(cfg.contains(" console=tty0 console=ttyAMA0 quiet "), "{cfg}");
        assert!(
            cfg.contains("\nterminal_input console\nterminal_output console\n") && !cfg.contains("serial"),
            "{cfg}"
        );
    }

    #[test]
    fn first_difference_finds_the_offset() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let mut data = vec![7u8; (1 << 20) + 100];
        fs::write(&a, &data).unwrap();
        fs::write(&b, &data).unwrap();
        assert_eq!(first_difference(&a, &b).unwrap(), None);
        data[(1 << 20) + 5] = 8;
        fs::write(&b, &data).unwrap();
        assert_eq!(first_difference(&a, &b).unwrap(), Some((1 << 20) + 5));
        fs::write(&b, &data[..10]).unwrap();
        assert_eq!(first_difference(&a, &b).unwrap(), Some(10));
    }

    #[test]
    fn regions_of_the_disk() {
        assert_eq!(region(0, Firmware::Bios), "GRUB's boot code in the MBR");
        assert_eq!(region(446, Firmware::Bios), "the MBR's partition table");
        assert_eq!(region(600, Firmware::Bios), "GRUB's core.img");
        assert_eq!(region(PARTITION_OFFSET + 2 * BLOCK + 1, Firmware::Bios), "the root file system, block 2");
        assert_eq!(region(600, Firmware::Uefi), "the protective MBR and the GPT");
        assert_eq!(region(PARTITION_OFFSET + 5, Firmware::Uefi), "the EFI system partition");
        let root = PARTITION_OFFSET + ESP_SIZE;
        assert_eq!(region(root + 3 * BLOCK, Firmware::Uefi), "the root file system, block 3");
    }

    #[test]
    fn a_uefi_disk_has_an_esp_then_the_root_and_room_for_the_backup_gpt() {
        let bios = Layout::new(1 << 30, &fp(1), Firmware::Bios);
        let uefi = Layout::new(1 << 30, &fp(1), Firmware::Uefi);
        assert_eq!(uefi.root_offset(), 17 << 20);
        assert_eq!(uefi.fs_blocks, bios.fs_blocks - ((ESP_SIZE + GPT_TAIL) / BLOCK));
        assert!(uefi.root_offset() + uefi.fs_blocks * BLOCK + GPT_TAIL <= uefi.size);
        let min = Layout::minimum(&fp(400), Firmware::Uefi);
        assert!(min.size >= Layout::minimum(&fp(400), Firmware::Bios).size + ESP_SIZE + GPT_TAIL, "{min:?}");
        let table = partition_table("01234567-89ab-4def-8123-456789abcdef", &uefi);
        assert!(table.starts_with("label: gpt\n"), "{table}");
        assert!(table.contains(&format!("start=2048, size={}, type={ESP_TYPE}", ESP_SIZE / SECTOR)), "{table}");
        assert!(table.contains(&format!("start={}, size={}, type={LINUX_TYPE}", 17 << 11, uefi.fs_blocks * 8)));
        assert_eq!(table, partition_table("01234567-89ab-4def-8123-456789abcdef", &uefi), "fixed identifiers");
        assert_ne!(table, partition_table("11234567-89ab-4def-8123-456789abcdef", &uefi));
    }
}
