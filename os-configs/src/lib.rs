//! The vocabulary for describing a virtual machine's system as plain Rust values (the
//! reference's `operating-system` and `file-system` records), and a few systems to start
//! from ([`minimal`], [`debian_base`], [`with_debian`]). A workspace names its own
//! systems and hands them to the engine (`vm_xtask::Catalog`).
//!
//! A system is data: [`System`] and the records it holds have public fields and no
//! behaviour beyond small constructors and [`System::virtualized`]. Checking that a
//! system can work (packages exist, modules are in the kernel, ...) is done by `xtask`
//! before anything is built. The engine re-exports this crate as `vm_xtask::systems`.
//!
//! A system with a service, a Debian package, a user and a tmpfs, declared as a
//! workspace's `xtask` declares its own (start from [`System::base`] or a named system,
//! and fill in the rest with struct update syntax):
//!
//! ```
//! use vm_xtask_systems::{FileSystem, Group, Package, Ready, Restart, Service, System, User};
//!
//! let mut web = Service::new("web", "busybox");
//! web.args = ["httpd", "-f", "-p", "8080", "-h", "/var/www"].map(String::from).to_vec();
//! web.user = "www".into();
//! web.restart = Restart::Always;
//! web.ready = Ready::TcpPort(8080);
//!
//! let mut system = System {
//!     packages: vec![Package::Busybox, Package::Debian { package: "jq".into() }],
//!     services: vec![web],
//!     groups: vec![Group { name: "www".into(), gid: 900 }],
//!     users: vec![User { home: "/var/www".into(), ..User::new("www", 900, "www") }],
//!     ..System::base("web", "busybox's httpd on port 8080, and jq")
//! };
//! // Beside the root file system `System::base` declares: memory, emptied at every boot.
//! system.file_systems.push(FileSystem::tmpfs("/var/cache/web"));
//!
//! // What `cargo xtask run-vm --system web` boots: the store shared at /store, the tmpfs kept.
//! let vm = system.virtualized();
//! let points: Vec<&str> = vm.file_systems.iter().map(|fs| fs.mount_point.as_str()).collect();
//! assert_eq!(points, ["/", "/store", "/var/cache/web"]);
//! assert_eq!(vm.services[0].ready, Ready::TcpPort(8080));
//! ```

#![deny(missing_docs)]

use std::path::PathBuf;

/// A whole system: what kernel boots it, what the guest needs loaded, which file systems
/// it mounts, what software, services, users and `/etc` files it has.
///
/// Start from [`System::base`] (or a named system such as [`minimal`]) and change what
/// differs:
///
/// ```
/// use vm_xtask_systems::{Package, System};
///
/// let tools = System {
///     hostname: "tools-vm".into(),
///     kernel_args: vec!["quiet".into()],
///     packages: vec![Package::Busybox, Package::Debian { package: "curl".into() }],
///     ..System::base("tools", "busybox and curl")
/// };
/// assert_eq!(tools.root_file_system().unwrap().fs_type, "ext4");
/// assert!(tools.virtualized().volatile_root);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct System {
    /// Name used on the command line (`--system NAME`) and in store item names.
    pub name: String,
    /// One line saying what the system is for.
    pub description: String,
    /// The guest's host name.
    pub hostname: String,
    /// The guest's processor architecture (`cargo xtask ... --arch` overrides it).
    pub arch: Arch,
    /// The kernel that boots the system (a Debian kernel package named for amd64, such as
    /// `linux-image-amd64`, is taken for the system's architecture: `linux-image-arm64`).
    pub kernel: Kernel,
    /// Extra arguments appended to the kernel command line.
    pub kernel_args: Vec<String>,
    /// Kernel modules loaded by the guest helper before anything else, besides the ones
    /// the VM's devices need (virtio transport, 9p, console, block).
    pub initrd_modules: Vec<String>,
    /// How the kernel gets loaded.
    pub bootloader: Bootloader,
    /// File systems; exactly one has the mount point `/`.
    pub file_systems: Vec<FileSystem>,
    /// Whether the root file system is volatile: writes go to memory and vanish at
    /// power-off.
    pub volatile_root: bool,
    /// Software: their `bin/` directories make up the guest's `PATH`.
    pub packages: Vec<Package>,
    /// Programs the guest helper starts at boot, in order, before the shell or command.
    pub services: Vec<Service>,
    /// Accounts besides `root` (uid 0), which every system has.
    pub users: Vec<User>,
    /// Groups besides `root` (gid 0), which every system has.
    pub groups: Vec<Group>,
    /// Files under `/etc` besides `passwd`, `group` and `hostname`, which are generated.
    pub etc_files: Vec<EtcFile>,
}

/// Where the kernel image and its modules come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kernel {
    /// A Debian kernel package (for example `linux-image-amd64`), fetched with
    /// `apt-get download` and pinned by the `.deb`'s sha256 on first use.
    Debian {
        /// The package's name; a metapackage is followed to the kernel image it depends on.
        package: String,
    },
    /// A kernel on the host: a bzImage (`vmlinuz`) and its modules tree
    /// (the directory that holds `kernel/` and `modules.builtin`, usually
    /// `/lib/modules/RELEASE`).
    Path {
        /// The bzImage, e.g. `/boot/vmlinuz-RELEASE`.
        image: PathBuf,
        /// The modules tree of that kernel, e.g. `/lib/modules/RELEASE`.
        modules: PathBuf,
    },
}

/// A guest processor architecture. Guests of either run on any host: a guest of another
/// architecture than the host's runs under emulation (QEMU's TCG).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub enum Arch {
    /// 64-bit x86 (Debian's `amd64`), booted on QEMU's `microvm` machine.
    #[default]
    X86_64,
    /// 64-bit ARM (Debian's `arm64`), booted on QEMU's `virt` machine.
    Aarch64,
}

impl Arch {
    /// Every supported architecture.
    pub const ALL: [Arch; 2] = [Arch::X86_64, Arch::Aarch64];

    /// The kernel's name for it (`uname -m`): `x86_64`, `aarch64`.
    pub fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }

    /// Debian's name for it: `amd64`, `arm64`.
    pub fn debian(self) -> &'static str {
        match self {
            Arch::X86_64 => "amd64",
            Arch::Aarch64 => "arm64",
        }
    }

    /// The architecture named `name`, by the kernel's name or Debian's.
    ///
    /// ```
    /// use vm_xtask_systems::Arch;
    ///
    /// assert_eq!(Arch::parse("arm64"), Some(Arch::Aarch64));
    /// assert_eq!(Arch::parse("x86_64"), Some(Arch::X86_64));
    /// assert_eq!(Arch::parse("riscv64"), None);
    /// ```
    pub fn parse(name: &str) -> Option<Arch> {
        Arch::ALL.into_iter().find(|a| a.name() == name || a.debian() == name)
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How the kernel gets loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bootloader {
    /// GRUB for either firmware, as `cargo xtask vm-image --firmware` chooses: BIOS
    /// (unless told otherwise) or UEFI (see [`Bootloader::GrubBios`] and
    /// [`Bootloader::GrubEfi`]).
    Grub,
    /// GRUB for BIOS only (i386-pc) in the MBR of a disk image with an MBR partition table.
    GrubBios,
    /// GRUB for UEFI only (x86_64-efi, as `EFI/BOOT/BOOTX64.EFI` on an EFI system
    /// partition of a GPT disk).
    GrubEfi,
    /// No bootloader: QEMU loads the kernel and initrd itself (`cargo xtask run-vm`).
    Direct,
}

/// The firmware a disk image boots with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Firmware {
    /// A PC BIOS (SeaBIOS, QEMU's default).
    Bios,
    /// UEFI (OVMF).
    Uefi,
}

impl Firmware {
    /// As on the command line: `bios`, `uefi`.
    pub fn name(self) -> &'static str {
        match self {
            Firmware::Bios => "bios",
            Firmware::Uefi => "uefi",
        }
    }
}

impl Bootloader {
    /// The firmwares a disk image with this bootloader can boot with, the default first;
    /// none for [`Bootloader::Direct`].
    pub fn firmwares(self) -> &'static [Firmware] {
        match self {
            Bootloader::Grub => &[Firmware::Bios, Firmware::Uefi],
            Bootloader::GrubBios => &[Firmware::Bios],
            Bootloader::GrubEfi => &[Firmware::Uefi],
            Bootloader::Direct => &[],
        }
    }
}

/// A file system to mount (the reference's `file-system` record).
///
/// ```
/// use vm_xtask_systems::{Device, FileSystem};
///
/// let cache = FileSystem::tmpfs("/var/cache/app");
/// let data = FileSystem {
///     options: "noatime".into(),
///     ..FileSystem::block("/data", Device::Label("data".into()), "ext4")
/// };
/// assert!(!cache.device.is_block() && data.device.is_block());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSystem {
    /// An absolute path in the guest.
    pub mount_point: String,
    /// What the file system lives on: a disk, a share, or nothing (memory).
    pub device: Device,
    /// The file system type, as `mount -t` takes it: `ext4`, `tmpfs`, `9p`, ...
    pub fs_type: String,
    /// Mount options, as `mount -o` takes them (comma-separated; may be empty).
    pub options: String,
    /// Mounted by the initrd, before the system's services start.
    pub needed_for_boot: bool,
    /// Checked (`fsck`) before mounting; only meaningful for block devices.
    pub check: bool,
}

/// What a file system lives on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Device {
    /// A block device by path, e.g. `/dev/vda1`.
    Path(String),
    /// A block device holding a file system with this label.
    Label(String),
    /// A block device holding a file system with this UUID.
    Uuid(String),
    /// A directory shared by the host over 9p, by mount tag (e.g. `store`).
    Share(String),
    /// No device: a virtual file system (`tmpfs`, `proc`, ...); the name is what
    /// `mount` shows as its source.
    Virtual(String),
}

impl Device {
    /// Whether the device is real hardware (a disk) rather than a share or memory.
    pub fn is_block(&self) -> bool {
        matches!(self, Device::Path(_) | Device::Label(_) | Device::Uuid(_))
    }
}

/// Software installed into the guest. Each becomes a store item with its references
/// recorded (shared libraries of a host program, for instance).
///
/// ```
/// use vm_xtask_systems::Package;
///
/// let packages = vec![
///     Package::Busybox,
///     Package::Debian { package: "jq".into() },
///     Package::Crate { package: "hello-service".into(), bin: "hello-service".into() },
///     Package::Host { path: "/usr/bin/strace".into() },
/// ];
/// assert_eq!(packages.len(), 4);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Package {
    /// Debian's `busybox-static`: one static binary providing `sh`, `ls`, `uname`, ...
    Busybox,
    /// Any Debian package, fetched with `apt-get download` and pinned by sha256.
    Debian {
        /// The package's name, e.g. `jq`; its dependencies come with it.
        package: String,
    },
    /// A binary target of a package in this cargo workspace, built statically by cargo.
    Crate {
        /// The cargo package (its `name` in `Cargo.toml`).
        package: String,
        /// The binary target of that package.
        bin: String,
    },
    /// A program on the host with its shared libraries (read from the ELF's needed
    /// libraries and resolved as the dynamic loader would) and its interpreter.
    Host {
        /// The program's absolute path on the host.
        path: PathBuf,
    },
}

/// A program the guest helper starts at boot.
///
/// ```
/// use vm_xtask_systems::{Ready, Restart, Service};
///
/// let mut hello = Service::new("hello", "hello-service");
/// hello.args = vec!["7878".into()];
/// hello.env = vec![("RUST_LOG".into(), "info".into())];
/// hello.user = "hello".into();
/// hello.restart = Restart::Always;
/// hello.ready = Ready::TcpPort(7878);
/// assert_eq!(Service::new("sleeper", "sleep").ready, Ready::Started);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// Names the service in logs (`/var/log/NAME.log` holds its output).
    pub name: String,
    /// The program: a name found in one of the system's packages, or an absolute path.
    pub program: String,
    /// The program's arguments (not its name).
    pub args: Vec<String>,
    /// Environment besides `PATH`, `HOME` and `USER`.
    pub env: Vec<(String, String)>,
    /// The account it runs as (`root` or one of [`System::users`]).
    pub user: String,
    /// Whether the helper starts it again when it exits.
    pub restart: Restart,
    /// What "up" means: the command (or shell) starts once every service is up.
    pub ready: Ready,
}

/// Whether a service is started again when it exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// Not started again: once it has exited, it stays down.
    Never,
    /// Started again (at most a few times in a row, a second apart).
    Always,
}

/// When a service counts as up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ready {
    /// As soon as it is started.
    Started,
    /// Once this file exists.
    File(String),
    /// Once it accepts TCP connections on this port of 127.0.0.1.
    TcpPort(u16),
}

/// A user account (a line of `/etc/passwd`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// The login name.
    pub name: String,
    /// The numeric user id; 0 is `root`'s.
    pub uid: u32,
    /// The primary group's name: `root` or one of [`System::groups`].
    pub group: String,
    /// Supplementary groups, by name.
    pub supplementary_groups: Vec<String>,
    /// Full name or purpose (the GECOS field).
    pub comment: String,
    /// Created at boot, owned by the user, mode 0700.
    pub home: String,
    /// The login shell, an absolute path in the guest.
    pub shell: String,
}

/// A group (a line of `/etc/group`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// The group's name.
    pub name: String,
    /// The numeric group id; 0 is `root`'s.
    pub gid: u32,
}

/// A file under `/etc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcFile {
    /// Relative to `/etc`, e.g. `motd` or `hello/config`.
    pub path: String,
    /// The whole file, as text.
    pub contents: String,
    /// Permission bits, e.g. `0o644`.
    pub mode: u32,
}

impl Kernel {
    /// Debian's default kernel for amd64.
    pub fn debian_default() -> Kernel {
        Kernel::Debian { package: "linux-image-amd64".to_string() }
    }
}

impl FileSystem {
    /// A file system on a block device.
    pub fn block(mount_point: &str, device: Device, fs_type: &str) -> FileSystem {
        FileSystem {
            mount_point: mount_point.to_string(),
            device,
            fs_type: fs_type.to_string(),
            options: String::new(),
            needed_for_boot: false,
            check: true,
        }
    }

    /// A `tmpfs` at `mount_point`.
    pub fn tmpfs(mount_point: &str) -> FileSystem {
        FileSystem {
            mount_point: mount_point.to_string(),
            device: Device::Virtual("tmpfs".to_string()),
            fs_type: "tmpfs".to_string(),
            options: String::new(),
            needed_for_boot: false,
            check: false,
        }
    }
}

impl Service {
    /// A service running `program` as root, never restarted, up once started.
    pub fn new(name: &str, program: &str) -> Service {
        Service {
            name: name.to_string(),
            program: program.to_string(),
            args: Vec::new(),
            env: Vec::new(),
            user: "root".to_string(),
            restart: Restart::Never,
            ready: Ready::Started,
        }
    }
}

impl User {
    /// An account with its own home under `/home`, and `sh` as its shell.
    pub fn new(name: &str, uid: u32, group: &str) -> User {
        User {
            name: name.to_string(),
            uid,
            group: group.to_string(),
            supplementary_groups: Vec::new(),
            comment: String::new(),
            home: format!("/home/{name}"),
            shell: "/bin/sh".to_string(),
        }
    }
}

impl System {
    /// A system with Debian's kernel, booted by GRUB, its root the ext4 file system
    /// labelled `vmroot` (a disk image's), and nothing else: the starting point of the
    /// named systems (fill in the rest with struct update syntax).
    pub fn base(name: &str, description: &str) -> System {
        System {
            name: name.to_string(),
            description: description.to_string(),
            hostname: name.to_string(),
            arch: Arch::X86_64,
            kernel: Kernel::debian_default(),
            kernel_args: Vec::new(),
            initrd_modules: Vec::new(),
            bootloader: Bootloader::Grub,
            file_systems: vec![FileSystem::block("/", Device::Label("vmroot".to_string()), "ext4")],
            volatile_root: false,
            packages: Vec::new(),
            services: Vec::new(),
            users: Vec::new(),
            groups: Vec::new(),
            etc_files: Vec::new(),
        }
    }

    /// The file system mounted on `/`, if there is one.
    pub fn root_file_system(&self) -> Option<&FileSystem> {
        self.file_systems.iter().find(|fs| fs.mount_point == "/")
    }

    /// The system as it runs in a VM that shares the host's store (the reference's
    /// `virtualized-operating-system`): root on `/dev/vda1`, the store over 9p
    /// (read-only) at `/store`, a volatile root, and no bootloader (QEMU loads the
    /// kernel). File systems bound to real devices are dropped: the VM has none of them.
    ///
    /// `run-vm` boots a system with users, groups or `/etc` files from the small
    /// shared-store image (`/dev/vda1`: those files and homes, under a tmpfs overlay);
    /// the others get no disk: their volatile root is the initramfs the kernel unpacks
    /// into memory, which the guest helper fills from the system item (`/etc`, homes,
    /// links) — what an empty ext4 image under a tmpfs overlay would give.
    pub fn virtualized(&self) -> System {
        let mut file_systems = vec![
            FileSystem {
                needed_for_boot: true,
                check: false,
                ..FileSystem::block("/", Device::Path("/dev/vda1".to_string()), "ext4")
            },
            FileSystem {
                mount_point: "/store".to_string(),
                device: Device::Share("store".to_string()),
                fs_type: "9p".to_string(),
                options: "trans=virtio,ro".to_string(),
                needed_for_boot: true,
                check: false,
            },
        ];
        file_systems.extend(
            self.file_systems
                .iter()
                .filter(|fs| fs.mount_point != "/" && fs.mount_point != "/store" && !fs.device.is_block())
                .cloned(),
        );
        System { bootloader: Bootloader::Direct, volatile_root: true, file_systems, ..self.clone() }
    }
}

/// The smallest useful system: Debian's kernel and a busybox userland.
pub fn minimal() -> System {
    System {
        packages: vec![Package::Busybox],
        ..System::base("minimal", "Debian's kernel with a busybox userland (sh, ls, uname, ...)")
    }
}

/// The Debian packages of [`debian_base`]: Debian's own base userland, what a test suite
/// expects of a root shell on a freshly installed Debian machine.
pub const DEBIAN_BASE_PACKAGES: &[&str] = &[
    // `/bin/sh` (dash ships the link), and bash for the scripts that ask for it.
    "dash",
    "bash",
    // The commands of the essential set: `env`, `cat`, `sleep`, `stty`, `find`, `grep`,
    // `sed`, `awk`, `diff`, `tar`, `gzip`, `hostname`, `which`, `getent`, ...
    "coreutils",
    "findutils",
    "grep",
    "sed",
    "mawk",
    "diffutils",
    "tar",
    "gzip",
    "hostname",
    "debianutils",
    "libc-bin",
    // `mount`, `umount`, `losetup`, `unshare`, `nsenter`, `su`, `script`, `logger`, ...
    "util-linux",
    "mount",
    "bsdutils",
    // `ps`, `kill`, `pgrep`, `pkill`, `sysctl`, `free`.
    "procps",
    // `ip` and `ss`, for tests of network namespaces and links.
    "iproute2",
    "make",
    // `tput`, `clear`, `reset`, and the terminfo of the usual terminals.
    "ncurses-bin",
    "ncurses-base",
    // `/etc/os-release`, `/etc/debian_version`.
    "base-files",
    // What debootstrap installs for init-system-helpers' `usrmerge | usr-is-merged` (the
    // root is laid out merged already), rather than usrmerge, which brings all of perl.
    "usr-is-merged",
];

/// Debian's kernel with Debian's own base userland instead of busybox: dash as `/bin/sh`,
/// coreutils, util-linux, procps, make, ... ([`DEBIAN_BASE_PACKAGES`]): for test suites
/// that expect a normal root shell on Debian (`cargo xtask test --system debian-base`).
pub fn debian_base() -> System {
    System {
        packages: DEBIAN_BASE_PACKAGES.iter().map(|p| Package::Debian { package: p.to_string() }).collect(),
        ..System::base(
            "debian-base",
            "Debian's kernel with Debian's base userland (dash as /bin/sh, bash, coreutils, util-linux, procps, \
             make, ...): for test suites",
        )
    }
}

/// `minimal` plus Debian packages (each with its dependency closure, laid out as Debian
/// lays out a system: `/usr/bin/jq`, `/lib64/ld-linux-x86-64.so.2`, ...).
pub fn with_debian(name: &str, description: &str, packages: &[&str]) -> System {
    let mut all = vec![Package::Busybox];
    all.extend(packages.iter().map(|p| Package::Debian { package: p.to_string() }));
    System { packages: all, ..System::base(name, description) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtualized_roots_on_vda1_shares_the_store_and_drops_disks() {
        let mut system = minimal();
        system.services.push(Service::new("sleeper", "sleep"));
        system.file_systems.push(FileSystem::block("/", Device::Label("vmroot".into()), "ext4"));
        system.file_systems.push(FileSystem::tmpfs("/var/cache/hello"));
        system.file_systems.push(FileSystem::block("/data", Device::Uuid("1234".into()), "ext4"));
        let v = system.virtualized();
        let root = v.root_file_system().unwrap();
        assert_eq!(root.device, Device::Path("/dev/vda1".into()));
        assert!(v.volatile_root);
        assert_eq!(v.bootloader, Bootloader::Direct);
        let store = v.file_systems.iter().find(|f| f.mount_point == "/store").unwrap();
        assert_eq!((store.device.clone(), store.fs_type.as_str()), (Device::Share("store".into()), "9p"));
        assert!(store.options.split(',').any(|o| o == "ro"));
        let points: Vec<&str> = v.file_systems.iter().map(|f| f.mount_point.as_str()).collect();
        assert_eq!(points, ["/", "/store", "/var/cache/hello"]);
        assert_eq!(v.services, system.services);
    }
}
