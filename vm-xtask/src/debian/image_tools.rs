//! The programs that write disk images — e2fsprogs' `mke2fs`, `e2fsck` and `debugfs`,
//! fdisk's `sfdisk`, GRUB's `grub-mkimage` with its i386-pc images — from Debian's
//! packages pinned in `vm.lock`, unpacked in the store and run through the dynamic loader
//! of the store's libc6 with the packages' library directories. Nothing is taken from
//! the host: both image builders (on the host and in a VM) run these, so an image's
//! recipe names the packages (by their items) rather than asking host tools' versions.
//!
//! The `vm-image-tools` item holds a wrapper script per program in `bin/` that finds the
//! store from its own path (`bin/` of an item in the store's directory of items), so the
//! same script runs in the guest (`/store/...`) and on the host.

use fs_err as fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::debian;
use crate::debian::{LIB_DIRS, LOADER};
use crate::store::{Item, Recipe, Store};
use os_configs::Arch;

/// Debian packages the image tools come from: the programs' packages and the shared
/// libraries their programs load (checked when the tools item is made).
pub const PACKAGES: &[&str] = &[
    "e2fsprogs",
    "fdisk",
    "grub-common",
    "grub-pc-bin",
    "libblkid1",
    "libc6",
    "libcom-err2",
    "libdevmapper1.02.1",
    "libext2fs2",
    "libfdisk1",
    "liblzma5",
    "libpcre2-8-0",
    "libreadline8",
    "libselinux1",
    "libsmartcols1",
    "libss2",
    "libtinfo6",
    "libudev1",
    "libuuid1",
];
/// The programs, and the package that has each.
pub const PROGRAMS: &[(&str, &str)] = &[
    ("mke2fs", "e2fsprogs"),
    ("e2fsck", "e2fsprogs"),
    ("debugfs", "e2fsprogs"),
    ("sfdisk", "fdisk"),
    ("grub-mkimage", "grub-common"),
];
/// The packages of the tools that make UEFI images: the EFI system partition's FAT
/// (dosfstools' `mkfs.fat`, mtools' `mmd` and `mcopy`), GRUB's x86_64-efi modules, and
/// OVMF (the firmware, for booting the image), besides libc6.
pub const UEFI_PACKAGES: &[&str] = &["dosfstools", "grub-efi-amd64-bin", "libc6", "mtools", "ovmf"];
/// The UEFI tools' programs, and the package that has each.
pub const UEFI_PROGRAMS: &[(&str, &str)] = &[("mkfs.fat", "dosfstools"), ("mmd", "mtools"), ("mcopy", "mtools")];
/// GRUB's x86_64-efi modules, inside grub-efi-amd64-bin.
const GRUB_X86_64_EFI: &str = "usr/lib/grub/x86_64-efi";
/// OVMF's firmware code and its variables store's template (4 MiB flash), inside ovmf.
const OVMF_CODE: &str = "usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "usr/share/OVMF/OVMF_VARS_4M.fd";

/// A set of tools made of Debian packages: the packages, the programs (each with its
/// package), the name of the item of their wrappers, and whether they convert character
/// sets (then they find the C library's conversion modules, `GCONV_PATH`, in libc6's
/// item, not the host's).
struct ToolSet {
    packages: &'static [&'static str],
    programs: &'static [(&'static str, &'static str)],
    item: &'static str,
    gconv: bool,
}

const IMAGE_SET: ToolSet = ToolSet { packages: PACKAGES, programs: PROGRAMS, item: "vm-image-tools", gconv: false };
/// mtools converts file names to the FAT's code page with iconv.
const UEFI_SET: ToolSet =
    ToolSet { packages: UEFI_PACKAGES, programs: UEFI_PROGRAMS, item: "vm-image-uefi-tools", gconv: true };
/// The C library's conversion modules, inside libc6.
const GCONV: &str = "usr/lib/x86_64-linux-gnu/gconv";

/// mke2fs's configuration, inside e2fsprogs.
const MKE2FS_CONF: &str = "etc/mke2fs.conf";
/// GRUB's BIOS images and modules, inside grub-pc-bin.
const GRUB_I386_PC: &str = "usr/lib/grub/i386-pc";

/// The image tools: the unpacked packages, and an item with a wrapper script per program.
pub struct StoreTools {
    packages: Packages,
    /// `bin/<program>`: runs the program through libc6's loader.
    pub wrappers: Item,
}

impl StoreTools {
    /// A command running `program` on the host, through the store's loader.
    pub fn command(&self, program: &str) -> Result<Command> {
        self.packages.command(program)
    }

    /// GRUB's i386-pc directory: `boot.img`, the modules `grub-mkimage` builds in.
    pub fn grub_i386_pc(&self) -> PathBuf {
        self.packages.package("grub-pc-bin").path.join(GRUB_I386_PC)
    }

    /// GRUB's x86_64-efi directory (the UEFI tools'): the modules `grub-mkimage` builds in.
    pub fn grub_x86_64_efi(&self) -> PathBuf {
        self.packages.package("grub-efi-amd64-bin").path.join(GRUB_X86_64_EFI)
    }

    /// OVMF's code and the template of its variables store (the UEFI tools').
    pub fn ovmf(&self) -> (PathBuf, PathBuf) {
        let ovmf = &self.packages.package("ovmf").path;
        (ovmf.join(OVMF_CODE), ovmf.join(OVMF_VARS))
    }

    /// The store's directory of the wrappers, for a `PATH`.
    pub fn bin_dir(&self) -> PathBuf {
        self.wrappers.path.join("bin")
    }

    /// How a guest runs `program` with no shell: libc6's loader and its arguments, with
    /// the items' paths as the guest sees them.
    pub fn guest_argv(&self, program: &str) -> Result<Vec<String>> {
        let (item, rel) = self.packages.program(program)?;
        Ok(vec![
            format!("{}/{LOADER}", self.packages.package("libc6").guest_path()),
            "--inhibit-cache".into(),
            "--library-path".into(),
            self.packages.lib_dirs(|item| item.guest_path().into_string()).join(":"),
            format!("{}/{rel}", item.guest_path()),
        ])
    }

    /// Every item the tools are made of.
    pub fn items(&self) -> Vec<Item> {
        let mut items: Vec<Item> = self.packages.0.iter().map(|(_, item)| item.clone()).collect();
        items.push(self.wrappers.clone());
        items
    }
}

/// The unpacked packages of a [`ToolSet`], by name, and the set.
struct Packages(Vec<(String, Item)>, &'static ToolSet);

impl Packages {
    fn package(&self, name: &str) -> &Item {
        &self.0.iter().find(|(p, _)| p == name).expect("a package of the tool set").1
    }

    /// The program's path inside its package (`sbin/`, `usr/sbin/`, `bin/`, `usr/bin/`).
    fn program(&self, program: &str) -> Result<(&Item, String)> {
        let package = self.1.programs.iter().find(|(p, _)| *p == program).map(|(_, pkg)| *pkg);
        let package = package.with_context(|| format!("`{program}` is not one of the image tools"))?;
        let item = self.package(package);
        for dir in ["sbin", "usr/sbin", "bin", "usr/bin"] {
            let rel = format!("{dir}/{program}");
            if item.path.join(&rel).is_file() {
                return Ok((item, rel));
            }
        }
        bail!("Debian package `{package}` (`{}`) has no `{program}`", item.path.display())
    }

    /// The library directories of the packages, each as `base(item)/DIR`.
    fn lib_dirs(&self, base: impl Fn(&Item) -> String) -> Vec<String> {
        let mut dirs = Vec::new();
        for (_, item) in &self.0 {
            for dir in LIB_DIRS {
                if item.path.join(dir).is_dir() {
                    dirs.push(format!("{}/{dir}", base(item)));
                }
            }
        }
        dirs
    }

    fn command(&self, program: &str) -> Result<Command> {
        let (item, rel) = self.program(program)?;
        let mut cmd = crate::process::command(self.package("libc6").path.join(LOADER));
        let libs = self.lib_dirs(|i| i.path.display().to_string()).join(":");
        cmd.args(["--inhibit-cache", "--library-path", &libs]).arg(item.path.join(rel));
        if let Some(e2fsprogs) = self.e2fsprogs() {
            cmd.env("MKE2FS_CONFIG", e2fsprogs.path.join(MKE2FS_CONF));
        }
        if self.1.gconv {
            cmd.env("GCONV_PATH", self.package("libc6").path.join(GCONV));
        }
        Ok(cmd)
    }

    /// e2fsprogs, whose `mke2fs.conf` mke2fs is given, when the set has it.
    fn e2fsprogs(&self) -> Option<&Item> {
        self.0.iter().find(|(p, _)| p == "e2fsprogs").map(|(_, item)| item)
    }
}

/// GRUB's EFI modules for `arch` (not x86_64's: those are in [`UEFI_PACKAGES`]): the
/// package's item (`grub-efi-arm64-bin`, Debian's arm64 package, only unpacked) and the
/// directory `grub-mkimage -d` takes.
pub fn grub_efi_modules(store: &Store, arch: Arch) -> Result<(Item, PathBuf)> {
    let (package, dir) = match arch {
        Arch::Aarch64 => ("grub-efi-arm64-bin", "usr/lib/grub/arm64-efi"),
        Arch::X86_64 => ("grub-efi-amd64-bin", GRUB_X86_64_EFI),
    };
    let pin = debian::pin(&debian::qualified(package, arch))?;
    let item = debian::unpacked(store, &pin).with_context(|| format!("unpacking Debian package `{package}`"))?;
    let modules = item.path.join(dir);
    Ok((item, modules))
}

/// Debian's UEFI firmware for aarch64 guests (AAVMF, in `qemu-efi-aarch64`): its code
/// and the template of its variables store (64 MiB flash each).
pub fn aavmf(store: &Store) -> Result<(PathBuf, PathBuf)> {
    let item = debian::unpacked(store, &debian::pin(AAVMF_PACKAGE)?)?;
    Ok((item.path.join("usr/share/AAVMF/AAVMF_CODE.fd"), item.path.join("usr/share/AAVMF/AAVMF_VARS.fd")))
}

/// The package of [`aavmf`].
pub const AAVMF_PACKAGE: &str = "qemu-efi-aarch64";

/// How a guest of `arch` runs e2fsck, with no shell (its loader and arguments, the
/// items' paths as the guest sees them), and the items that takes: the image tools'
/// for x86_64; for another architecture, that architecture's e2fsprogs with its
/// dependency closure, through its own libc6's loader.
pub fn guest_e2fsck(store: &Store, arch: Arch) -> Result<(Vec<String>, Vec<Item>)> {
    if arch == Arch::X86_64 {
        let tools = tools(store)?;
        return Ok((tools.guest_argv("e2fsck")?, tools.items()));
    }
    let closure = debian::closure::closure(&[debian::qualified("e2fsprogs", arch)])?;
    let mut items = Vec::new();
    for (name, pin) in &closure {
        items.push((name.clone(), debian::unpacked(store, pin).with_context(|| format!("unpacking `{name}`"))?));
    }
    let item = |package: &str| {
        let name = debian::qualified(package, arch);
        items.iter().find(|(n, _)| *n == name).map(|(_, i)| i.clone()).context("a package of e2fsprogs' closure")
    };
    let (libc6, e2fsprogs) = (item("libc6")?, item("e2fsprogs")?);
    let program = ["sbin/e2fsck", "usr/sbin/e2fsck"]
        .into_iter()
        .find(|p| e2fsprogs.path.join(p).is_file())
        .context("Debian package e2fsprogs has no e2fsck")?;
    let mut lib_dirs = Vec::new();
    for (_, i) in &items {
        for dir in debian::lib_dirs(arch).iter().filter(|d| i.path.join(d).is_dir()) {
            lib_dirs.push(format!("{}/{dir}", i.guest_path()));
        }
    }
    let argv = vec![
        format!("{}/{}", libc6.guest_path(), debian::loader(arch)),
        "--inhibit-cache".into(),
        "--library-path".into(),
        lib_dirs.join(":"),
        format!("{}/{program}", e2fsprogs.guest_path()),
    ];
    Ok((argv, items.into_iter().map(|(_, i)| i).collect()))
}

/// Fetches and unpacks the tool packages (as `vm.lock` pins them) and makes the wrappers.
pub fn tools(store: &Store) -> Result<StoreTools> {
    tools_of(store, &IMAGE_SET)
}

/// The tools that make UEFI images ([`UEFI_PACKAGES`]), as [`tools`] makes the others.
pub fn uefi_tools(store: &Store) -> Result<StoreTools> {
    tools_of(store, &UEFI_SET)
}

fn tools_of(store: &Store, set: &'static ToolSet) -> Result<StoreTools> {
    let mut packages = Vec::new();
    for name in set.packages {
        let pin = debian::pin(name)?;
        let item = debian::unpacked(store, &pin).with_context(|| format!("unpacking Debian package `{name}`"))?;
        packages.push((name.to_string(), item));
    }
    let tools = Packages(packages, set);
    let mut recipe = Recipe::new("image-tools", set.item)
        .param("loader", LOADER)
        .param("lib-dirs", LIB_DIRS.join(":"))
        .param("wrapper", "relative-v2");
    if set.gconv {
        recipe = recipe.param("gconv", GCONV);
    }
    for (name, item) in &tools.0 {
        recipe = recipe.input_item(name, item);
    }
    // Paths relative to the store's directory of items, which the script finds from
    // its own path (`$s/ITEM/bin/PROGRAM`).
    let rel = |item: &Item| format!("$s/{}", item.file_name());
    let loader = format!("{}/{LOADER}", rel(tools.package("libc6")));
    let lib_path = tools.lib_dirs(rel).join(":");
    let mut env = match tools.e2fsprogs() {
        Some(e2fsprogs) => format!("MKE2FS_CONFIG=\"{}/{MKE2FS_CONF}\" ", rel(e2fsprogs)),
        None => String::new(),
    };
    if set.gconv {
        env.push_str(&format!("GCONV_PATH=\"{}/{GCONV}\" ", rel(tools.package("libc6"))));
    }
    let wrappers = store.realise(&recipe, |out| {
        let bin = out.join("bin");
        fs::create_dir_all(&bin)?;
        for (program, _) in set.programs {
            check_libraries(&tools, program)?;
            let (item, path) = tools.program(program)?;
            let prog = format!("{}/{path}", rel(item));
            let script = format!(
                "#!/bin/sh\n# {program} from Debian's packages in the store, through libc6's loader.\n\
                 s=$(cd \"${{0%/*}}/../..\" && pwd) || exit 127\n\
                 {env}exec \"{loader}\" --inhibit-cache --library-path \"{lib_path}\" \
                     \"{prog}\" \"$@\"\n",
            );
            let file = bin.join(program);
            fs::write(&file, script).with_context(|| format!("writing `{}`", file.display()))?;
            fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755))?;
        }
        Ok(())
    })?;
    Ok(StoreTools { packages: tools, wrappers })
}

/// Checks that the loader finds every library `program` needs among the packages (and
/// not on the host, which the guest does not have).
fn check_libraries(tools: &Packages, program: &str) -> Result<()> {
    let cmd = tools.command(program)?;
    // `ld.so --list PROGRAM` prints the libraries it would load.
    let args: Vec<_> = cmd.get_args().map(|a| a.to_os_string()).collect();
    let mut list = crate::process::command(cmd.get_program());
    list.args(&args[..3]).arg("--list").args(&args[3..]);
    let out = crate::process::run(&list)?;
    let text = String::from_utf8_lossy(&out.stdout);
    let roots: Vec<&Path> = tools.0.iter().map(|(_, i)| i.path.as_path()).collect();
    for line in text.lines() {
        let Some((lib, rest)) = line.split_once("=>") else { continue };
        let path = rest.split_whitespace().next().unwrap_or_default();
        if !roots.iter().any(|r| Path::new(path).starts_with(r)) {
            bail!(
                "`{program}` needs `{}`, which none of the image tools' Debian packages has (found: `{}`); \
                 add its package to tools::PACKAGES",
                lib.trim(),
                rest.trim()
            );
        }
    }
    Ok(())
}
