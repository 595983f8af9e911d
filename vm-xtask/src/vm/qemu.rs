//! QEMU command lines, built from small pure functions over a [`VmSpec`], and the choice
//! of accelerator.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use os_configs::Arch;

/// `--accel`: what the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum AccelChoice {
    /// KVM when it works here, else TCG.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

/// The accelerator a VM runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// Why KVM cannot be used here, or `None` when it can: `/dev/kvm` must open read-write
/// and the CPU must advertise hardware virtualization (vmx or svm).
pub fn kvm_unusable_reason() -> Option<String> {
    kvm_unusable_reason_from(Path::new("/dev/kvm"), &std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default())
}

fn kvm_unusable_reason_from(dev: &Path, cpuinfo: &str) -> Option<String> {
    if let Err(e) = OpenOptions::new().read(true).write(true).open(dev) {
        return Some(format!("{} cannot be opened read-write ({e})", dev.display()));
    }
    let virt = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if !virt {
        return Some("the CPU does not advertise vmx or svm".to_string());
    }
    None
}

/// Picks the accelerator. `auto` falls back to TCG with one line on stderr; `kvm` fails
/// when KVM cannot work, saying why.
pub fn choose_accel(choice: AccelChoice) -> Result<Accel> {
    match choice {
        AccelChoice::Tcg => Ok(Accel::Tcg),
        AccelChoice::Kvm => match kvm_unusable_reason() {
            None => Ok(Accel::Kvm),
            Some(why) => bail!("--accel kvm: KVM is not usable here: {why}; use --accel tcg or auto"),
        },
        AccelChoice::Auto => match kvm_unusable_reason() {
            None => Ok(Accel::Kvm),
            Some(why) => {
                if crate::progress::shown() {
                    eprintln!("note: using TCG (software emulation): {why}");
                }
                Ok(Accel::Tcg)
            }
        },
    }
}

/// Where the serial console goes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Console {
    /// Written to this file (or FIFO) by QEMU.
    File(PathBuf),
    /// On QEMU's stdin/stdout, multiplexed with the monitor (Ctrl-a x quits).
    Stdio,
}

/// A host directory shared over 9p.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Share {
    pub tag: String,
    pub path: PathBuf,
    pub readonly: bool,
}

/// A share served by virtiofsd over vhost-user ([`crate::vm::virtiofs`]): QEMU connects
/// to its socket; the guest mounts `tag` as `virtiofs`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VhostUserFs {
    pub tag: String,
    pub socket: PathBuf,
}

/// Disk image formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
pub enum DiskFormat {
    Qcow2,
    Raw,
}

impl DiskFormat {
    pub fn name(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        }
    }
}

/// A disk on the virtio block bus (the guest's `/dev/vda`, `/dev/vdb`, ...).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Disk {
    pub path: PathBuf,
    pub format: DiskFormat,
    pub readonly: bool,
}

/// A named virtio serial port whose output QEMU writes to `path` (a FIFO the host reads).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Port {
    pub name: String,
    pub path: PathBuf,
}

/// Everything that determines a QEMU command line.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmSpec {
    /// The guest's architecture: which QEMU runs it, on which machine.
    #[serde(default, with = "arch_name")]
    pub arch: Arch,
    pub accel: Accel,
    pub memory_mib: u32,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Extra kernel arguments, after the ones this module always passes.
    pub kernel_args: Vec<String>,
    /// The host's TSC frequency: microvm has no timer to calibrate the TSC against, and
    /// without this a boot now and then hangs calibrating it.
    pub tsc_khz: Option<u64>,
    pub console: Console,
    pub shares: Vec<Share>,
    /// Shares served by virtiofsd; with any, the guest's RAM is shared memory (a memfd).
    pub vhost_user_fs: Vec<VhostUserFs>,
    pub disks: Vec<Disk>,
    pub ports: Vec<Port>,
    /// Run QEMU under its seccomp sandbox (when the host's QEMU supports it).
    pub sandbox: bool,
    /// TCP ports of the host's loopback forwarded to the guest. None: no network device
    /// at all; some: QEMU's user network, restricted (the guest reaches nothing outside),
    /// with the guest at [`GUEST_ADDRESS`]. Connections arrive at the guest's 127.0.0.1
    /// (its interface accepts loopback addresses), so services that listen there only,
    /// as most do, are reached.
    pub forwards: Vec<Forward>,
    /// QEMU's user network without restriction: the guest reaches the host's network
    /// and beyond through NAT (`build-in-vm --net`: no longer hermetic).
    pub outside: bool,
    /// A unix socket QEMU listens on for the control channel's serial port
    /// ([`guest::control`]); none without.
    pub control: Option<PathBuf>,
    /// Network interfaces joined to a virtual LAN: datagrams over unix sockets to a hub
    /// that xtask runs (no root, no bridge). In order: `eth0`, `eth1`, ...
    pub lans: Vec<Lan>,
    /// A unix socket QEMU listens on for the snapshot handshake's serial port
    /// ([`guest::snapshot`]): for a guest saved at, or restored from, its snapshot point.
    pub snapshot_port: Option<PathBuf>,
    /// A unix socket QEMU listens on for the attach channel's serial port
    /// ([`guest::attach`]): shells in the running guest (`cargo xtask attach`).
    pub attach: Option<PathBuf>,
    /// QEMU's gdb stub, for a debugger on the host's loopback (`run-vm --gdb`).
    pub gdb: Option<GdbStub>,
    /// The guest's RAM as a file instead of anonymous memory: a warm start's
    /// ([`crate::vm::snapshot`]).
    pub memory_file: Option<MemoryFile>,
}

/// [`Arch`] in saved specs, by its name (`x86_64`, `aarch64`).
mod arch_name {
    use os_configs::Arch;

    pub fn serialize<S: serde::Serializer>(arch: &Arch, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(arch.name())
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Arch, D::Error> {
        let name: String = serde::Deserialize::deserialize(d)?;
        Arch::parse(&name).ok_or_else(|| serde::de::Error::custom(format!("unknown architecture `{name}`")))
    }
}

/// Guest RAM backed by a file: `shared`, the guest's writes reach the file (a snapshot
/// being made); else the file is mapped copy-on-write and never written (a restore).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemoryFile {
    pub path: PathBuf,
    pub shared: bool,
}

/// QEMU's gdb stub: listening on the host's 127.0.0.1 at `port`; with `wait`, the guest's
/// CPU stopped before its first instruction until gdb continues it (`-S`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GdbStub {
    pub port: u16,
    pub wait: bool,
}

/// The gdb stub's arguments (none without one).
pub fn gdb_args(gdb: Option<GdbStub>) -> Vec<OsString> {
    match gdb {
        None => Vec::new(),
        Some(GdbStub { port, wait }) => {
            let mut args = os(&["-gdb", &format!("tcp:127.0.0.1:{port}")]);
            if wait {
                args.push("-S".into());
            }
            args
        }
    }
}

impl VmSpec {
    /// A VM that boots `kernel` and `initrd` directly, with `shares` and nothing else: no
    /// disk, port or network, the console on stdio (change what differs with struct
    /// update syntax).
    pub fn direct(accel: Accel, memory_mib: u32, boot: (PathBuf, PathBuf, Vec<String>), shares: Vec<Share>) -> VmSpec {
        let (kernel, initrd, kernel_args) = boot;
        VmSpec {
            arch: Arch::X86_64,
            accel,
            memory_mib,
            kernel,
            initrd,
            kernel_args,
            tsc_khz: if accel == Accel::Tcg { host_tsc_khz() } else { None },
            console: Console::Stdio,
            shares,
            vhost_user_fs: Vec::new(),
            disks: Vec::new(),
            ports: Vec::new(),
            sandbox: false,
            forwards: Vec::new(),
            outside: false,
            control: None,
            lans: Vec::new(),
            snapshot_port: None,
            attach: None,
            gdb: None,
            memory_file: None,
        }
    }
}

/// One network interface on a LAN of xtask's hub: QEMU's `dgram` netdev bound at
/// `local`, sending to the hub's socket `hub`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Lan {
    pub local: PathBuf,
    pub hub: PathBuf,
    pub mac: String,
}

/// The LAN interfaces: a `dgram` netdev on unix sockets and a virtio-net device each.
pub fn lan_args(lans: &[Lan]) -> Vec<OsString> {
    let mut args = Vec::new();
    for (i, lan) in lans.iter().enumerate() {
        let mut netdev = path_arg(&format!("dgram,id=lan{i},local.type=unix,local.path="), &lan.local);
        netdev.push(path_arg(",remote.type=unix,remote.path=", &lan.hub));
        args.extend(["-netdev".into(), netdev]);
        args.extend(os(&["-device", &format!("virtio-net-device,netdev=lan{i},mac={}", lan.mac)]));
    }
    args
}

/// A TCP port forwarded from the host's 127.0.0.1 to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Forward {
    pub host: u16,
    pub guest: u16,
}

/// The guest's address on QEMU's user network (its default DHCP address, where
/// `hostfwd` rules send connections).
pub const GUEST_ADDRESS: &str = "10.0.2.15/24";
/// The guest's network interface (the only one, virtio-net).
pub const GUEST_INTERFACE: &str = "eth0";
/// The kernel module of the guest's network device.
pub const NET_MODULE: &str = "virtio_net";

/// The network: QEMU's user network (no root, no bridge), restricted so the guest
/// reaches neither the host nor anything beyond, with the forwarded ports; nothing
/// without forwards.
pub fn net_args(forwards: &[Forward], outside: bool) -> Vec<OsString> {
    if forwards.is_empty() && !outside {
        return Vec::new();
    }
    let mut netdev = format!("user,id=net0,restrict={}", if outside { "off" } else { "on" });
    for f in forwards {
        netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{}-127.0.0.1:{}", f.host, f.guest));
    }
    os(&["-netdev", &netdev, "-device", "virtio-net-device,netdev=net0"])
}

fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

/// `prefix` followed by `path`, with commas doubled as QEMU's option syntax requires.
pub(crate) fn path_arg(prefix: &str, path: &Path) -> OsString {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let mut bytes = prefix.as_bytes().to_vec();
    for &b in path.as_os_str().as_bytes() {
        bytes.push(b);
        if b == b',' {
            bytes.push(b',');
        }
    }
    OsString::from_vec(bytes)
}

/// The machine: for x86_64, microvm (no PCI, no firmware tables to scan, virtio over
/// MMIO); for aarch64, `virt` (virtio over MMIO too, described by its device tree), with
/// a Cortex-A57 (`max` adds pointer authentication, which costs much under TCG). Nothing
/// QEMU would add by default, and a guest reboot ends QEMU.
pub fn machine_args(arch: Arch) -> Vec<OsString> {
    let machine: &[&str] = match arch {
        Arch::X86_64 => &["-machine", "microvm"],
        Arch::Aarch64 => &["-machine", "virt", "-cpu", "cortex-a57"],
    };
    [os(machine), os(&["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-smp", "1"])].concat()
}

pub fn accel_args(accel: Accel) -> Vec<OsString> {
    match accel {
        Accel::Kvm => os(&["-accel", "kvm", "-cpu", "host"]),
        Accel::Tcg => os(&["-accel", "tcg"]),
    }
}

/// The accelerator for a guest of `arch` on this host: as [`choose_accel`] chooses when
/// it is the host's architecture; TCG otherwise (KVM runs only the host's), and asking
/// for KVM then is a usage error.
pub fn accel_for(arch: Arch, choice: AccelChoice) -> Result<Accel> {
    if cfg!(target_arch = "x86_64") && arch == Arch::X86_64 {
        return choose_accel(choice);
    }
    match choice {
        AccelChoice::Kvm => Err(crate::error::usage_error(format!(
            "--accel kvm: KVM runs guests of this host's architecture only, and the guest is {arch}; use --accel tcg \
             or auto"
        ))),
        _ => Ok(Accel::Tcg),
    }
}

pub use crate::debian::qemu::SANDBOX;

pub fn sandbox_args(sandbox: bool) -> Vec<OsString> {
    if sandbox {
        os(&["-sandbox", SANDBOX])
    } else {
        Vec::new()
    }
}

/// The guest's RAM: `mib` MiB, anonymous or from `file` (a memory backend the machine
/// takes as its RAM), or, for virtiofsd (`shared`), a memfd both processes map.
pub fn memory_args(mib: u32, file: Option<&MemoryFile>, shared: bool) -> Vec<OsString> {
    let mut args = os(&["-m", &mib.to_string()]);
    let backend = match file {
        Some(file) => {
            let mut backend = path_arg(&format!("memory-backend-file,id=ram,size={mib}M,mem-path="), &file.path);
            backend.push(if file.shared { ",share=on" } else { ",share=off" });
            backend
        }
        None if shared => format!("memory-backend-memfd,id=ram,size={mib}M,share=on").into(),
        None => return args,
    };
    args.extend(["-object".into(), backend]);
    args.extend(os(&["-machine", "memory-backend=ram"]));
    args
}

/// The shares served by virtiofsd: a socket chardev and a `vhost-user-fs-device` (virtio
/// over MMIO, as microvm has it) each. virtiofsd (libvhost-user) takes no legacy virtio
/// device, which QEMU's virtio-mmio transport is unless told otherwise: with any such
/// share, every transport is virtio 1.0.
pub fn vhost_user_fs_args(shares: &[VhostUserFs]) -> Vec<OsString> {
    if shares.is_empty() {
        return Vec::new();
    }
    let mut args = os(&["-global", "virtio-mmio.force-legacy=false"]);
    for (i, share) in shares.iter().enumerate() {
        args.extend(["-chardev".into(), path_arg(&format!("socket,id=vfs{i},path="), &share.socket)]);
        args.extend(os(&["-device", &format!("vhost-user-fs-device,chardev=vfs{i},tag={}", share.tag)]));
    }
    args
}

/// The kernel command line, as a list joined by spaces.
pub fn kernel_cmdline(spec: &VmSpec) -> Vec<String> {
    // reboot=t: a triple fault, which QEMU turns into an exit under -no-reboot; panic=-1:
    // reboot at once on a panic, so a dying guest ends the VM instead of hanging it;
    // pci=off: microvm has no PCI bus, and probing for one only costs time;
    // cryptomgr.notests: the kernel's self-tests of its crypto algorithms took 0.17 s of
    // a 1 s boot under TCG.
    // On aarch64's virt machine, the console is the PL011 UART, and PSCI reboots.
    let words: &[&str] = match spec.arch {
        Arch::X86_64 => &["console=ttyS0", "reboot=t", "panic=-1", "quiet", "pci=off"],
        Arch::Aarch64 => &["console=ttyAMA0", "panic=-1", "quiet"],
    };
    let mut cmdline: Vec<String> =
        words.iter().chain(&["cryptomgr.notests", "rdinit=/init"]).map(|s| s.to_string()).collect();
    if let Some(khz) = spec.tsc_khz {
        cmdline.push(format!("tsc_early_khz={khz}"));
    }
    cmdline.extend(spec.kernel_args.iter().cloned());
    cmdline
}

pub fn kernel_args(spec: &VmSpec) -> Vec<OsString> {
    vec![
        "-kernel".into(),
        spec.kernel.clone().into(),
        "-initrd".into(),
        spec.initrd.clone().into(),
        "-append".into(),
        kernel_cmdline(spec).join(" ").into(),
    ]
}

pub fn console_args(console: &Console) -> Vec<OsString> {
    match console {
        Console::File(path) => {
            vec!["-chardev".into(), path_arg("file,id=console,path=", path), "-serial".into(), "chardev:console".into()]
        }
        Console::Stdio => os(&["-serial", "mon:stdio"]),
    }
}

/// The 9p shares. A writable share is `security_model=mapped-xattr`: what the guest
/// makes there is created with QEMU's private modes (0600 files, 0700 directories) and
/// owned by QEMU's user, and the modes and owners the guest gives (setuid bits, a
/// world-writable directory, another owner) are only recorded in `user.virtfs.*`
/// attributes, never applied on the host ([`crate::store::fd::GUEST_MODE_XATTR`]). A
/// read-only share (the store) shows the host's modes as they are (`none`): the guest
/// cannot change them there.
pub fn share_args(shares: &[Share]) -> Vec<OsString> {
    let mut args = Vec::new();
    for (i, share) in shares.iter().enumerate() {
        let model = if share.readonly { "none" } else { "mapped-xattr" };
        let mut fsdev = path_arg(&format!("local,id=fs{i},security_model={model},path="), &share.path);
        if share.readonly {
            fsdev.push(",readonly=on");
        }
        args.extend(["-fsdev".into(), fsdev]);
        args.extend(os(&["-device", &format!("virtio-9p-device,fsdev=fs{i},mount_tag={}", share.tag)]));
    }
    args
}

pub fn disk_args(disks: &[Disk]) -> Vec<OsString> {
    let mut args = Vec::new();
    for (i, disk) in disks.iter().enumerate() {
        // The format is always explicit, so a guest that writes a qcow2 header into a raw
        // disk cannot change how QEMU opens it next time.
        let mut drive = path_arg(&format!("if=none,id=disk{i},format={},file=", disk.format.name()), &disk.path);
        if disk.readonly {
            drive.push(",readonly=on");
        }
        args.extend(["-drive".into(), drive]);
        args.extend(os(&["-device", &format!("virtio-blk-device,drive=disk{i}")]));
    }
    args
}

/// The virtio serial ports: the output ports (files), and the control, snapshot and
/// attach channels (server sockets that do not wait for a client: xtask connects once
/// QEMU runs).
pub fn port_args(spec: &VmSpec) -> Vec<OsString> {
    let sockets = [
        (spec.control.as_deref(), "control", guest::control::CONTROL_PORT),
        (spec.snapshot_port.as_deref(), "snapshot", guest::SNAPSHOT_PORT),
        (spec.attach.as_deref(), "attach", guest::attach::ATTACH_PORT),
    ];
    if spec.ports.is_empty() && sockets.iter().all(|(path, _, _)| path.is_none()) {
        return Vec::new();
    }
    let mut args = os(&["-device", "virtio-serial-device"]);
    for (i, port) in spec.ports.iter().enumerate() {
        args.extend(["-chardev".into(), path_arg(&format!("file,id=port{i},path="), &port.path)]);
        args.extend(os(&["-device", &format!("virtserialport,chardev=port{i},name={}", port.name)]));
    }
    for (path, id, name) in sockets {
        if let Some(path) = path {
            let mut chardev = path_arg(&format!("socket,id={id},path="), path);
            chardev.push(",server=on,wait=off");
            args.extend(["-chardev".into(), chardev]);
            args.extend(os(&["-device", &format!("virtserialport,chardev={id},name={name}")]));
        }
    }
    args
}

/// The whole argument list (without the program name).
pub fn args(spec: &VmSpec) -> Vec<OsString> {
    [
        machine_args(spec.arch),
        accel_args(spec.accel),
        sandbox_args(spec.sandbox),
        memory_args(spec.memory_mib, spec.memory_file.as_ref(), !spec.vhost_user_fs.is_empty()),
        kernel_args(spec),
        console_args(&spec.console),
        share_args(&spec.shares),
        vhost_user_fs_args(&spec.vhost_user_fs),
        disk_args(&spec.disks),
        port_args(spec),
        net_args(&spec.forwards, spec.outside),
        lan_args(&spec.lans),
        gdb_args(spec.gdb),
    ]
    .concat()
}

/// The host's TSC frequency in kHz, from `/proc/cpuinfo`.
pub fn host_tsc_khz() -> Option<u64> {
    parse_cpu_mhz(&std::fs::read_to_string("/proc/cpuinfo").ok()?)
}

fn parse_cpu_mhz(cpuinfo: &str) -> Option<u64> {
    let line = cpuinfo.lines().find(|l| l.starts_with("cpu MHz"))?;
    let mhz: f64 = line.split(':').nth(1)?.trim().parse().ok()?;
    Some((mhz * 1000.0).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        let shares = vec![
            Share { tag: "store".into(), path: "/s".into(), readonly: true },
            Share { tag: "xchg".into(), path: "/x".into(), readonly: false },
        ];
        VmSpec {
            tsc_khz: Some(2596122),
            console: Console::File("/r/console".into()),
            disks: vec![Disk { path: "/x/disk.raw".into(), format: DiskFormat::Raw, readonly: false }],
            ports: vec![Port { name: "stdout".into(), path: "/r/out".into() }],
            sandbox: true,
            ..VmSpec::direct(Accel::Tcg, 256, ("/s/vmlinux".into(), "/s/initrd".into(), vec!["foo=1".into()]), shares)
        }
    }

    fn strings(args: Vec<OsString>) -> Vec<String> {
        args.into_iter().map(|a| a.into_string().unwrap()).collect()
    }

    #[test]
    fn ram_from_a_file_is_a_memory_backend_shared_or_private() {
        let shared = MemoryFile { path: "/t/a,b/ram".into(), shared: true };
        assert_eq!(
            strings(memory_args(256, Some(&shared), false)),
            [
                "-m",
                "256",
                "-object",
                "memory-backend-file,id=ram,size=256M,mem-path=/t/a,,b/ram,share=on",
                "-machine",
                "memory-backend=ram"
            ]
        );
        let private = MemoryFile { path: "/i/ram".into(), shared: false };
        assert!(strings(memory_args(64, Some(&private), false))[3].ends_with("mem-path=/i/ram,share=off"));
        assert_eq!(strings(memory_args(64, None, false)), ["-m", "64"]);
    }

    #[test]
    fn a_share_over_virtiofs_is_a_vhost_user_device_on_shared_memory() {
        let s =
            VmSpec { vhost_user_fs: vec![VhostUserFs { tag: "ws".into(), socket: "/r,1/v.sock".into() }], ..spec() };
        let args = strings(args(&s));
        let at = |word: &str| args.iter().position(|a| a == word).unwrap();
        assert_eq!(args[at("-object") + 1], "memory-backend-memfd,id=ram,size=256M,share=on");
        assert!(args.windows(2).any(|w| w == ["-machine", "memory-backend=ram"]), "{args:?}");
        assert!(args.windows(2).any(|w| w == ["-global", "virtio-mmio.force-legacy=false"]), "{args:?}");
        assert!(args.windows(4).any(|w| w
            == [
                "-chardev",
                "socket,id=vfs0,path=/r,,1/v.sock",
                "-device",
                "vhost-user-fs-device,chardev=vfs0,tag=ws"
            ]));
        // The 9p shares stay as they were.
        assert_eq!(args.iter().filter(|a| a.starts_with("virtio-9p-device")).count(), 2);
    }

    #[test]
    #[rustfmt::skip]
    fn tcg_command_line_with_shares_disk_and_port() {
        let args = strings(args(&spec()));
        let expected = [
            "-machine", "microvm", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-smp", "1",
            "-accel", "tcg",
            "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            "-m", "256",
            "-kernel", "/s/vmlinux", "-initrd", "/s/initrd",
            "-append", "console=ttyS0 reboot=t panic=-1 quiet pci=off cryptomgr.notests rdinit=/init \
                tsc_early_khz=2596122 foo=1",
            "-chardev", "file,id=console,path=/r/console", "-serial", "chardev:console",
            "-fsdev", "local,id=fs0,security_model=none,path=/s,readonly=on",
            "-device", "virtio-9p-device,fsdev=fs0,mount_tag=store",
            "-fsdev", "local,id=fs1,security_model=mapped-xattr,path=/x",
            "-device", "virtio-9p-device,fsdev=fs1,mount_tag=xchg",
            "-drive", "if=none,id=disk0,format=raw,file=/x/disk.raw",
            "-device", "virtio-blk-device,drive=disk0",
            "-device", "virtio-serial-device",
            "-chardev", "file,id=port0,path=/r/out",
            "-device", "virtserialport,chardev=port0,name=stdout",
        ];
        assert_eq!(args, expected);
    }

    #[test]
    fn kvm_and_interactive_console() {
        let mut s = spec();
        s.accel = Accel::Kvm;
        s.console = Console::Stdio;
        s.shares.clear();
        s.disks.clear();
        s.ports.clear();
        s.tsc_khz = None;
        s.sandbox = false;
        let args = strings(args(&s));
        assert!(!args.iter().any(|a| a == "-sandbox"));
        assert_eq!(args[9..13], ["-accel", "kvm", "-cpu", "host"]);
        assert!(args.ends_with(&["-serial".to_string(), "mon:stdio".to_string()]));
        assert!(!args.iter().any(|a| a.contains("virtio")));
        assert!(!args.iter().any(|a| a.contains("tsc_early_khz")));
    }

    #[test]
    fn every_drive_names_its_format() {
        let disks = [
            Disk { path: "/a".into(), format: DiskFormat::Raw, readonly: false },
            Disk { path: "/b".into(), format: DiskFormat::Qcow2, readonly: false },
        ];
        let args = strings(disk_args(&disks));
        let drives: Vec<&String> = args.iter().filter(|a| a.contains("file=")).collect();
        assert_eq!(drives.len(), 2);
        assert!(drives.iter().all(|d| d.contains(",format=raw,") || d.contains(",format=qcow2,")));
    }

    #[test]
    fn forwards_give_a_restricted_user_network_and_none_give_no_network() {
        assert!(net_args(&[], false).is_empty());
        assert_eq!(strings(net_args(&[], true))[1], "user,id=net0,restrict=off");
        let args = strings(net_args(&[Forward { host: 8080, guest: 7878 }, Forward { host: 2222, guest: 22 }], false));
        assert_eq!(
            args,
            [
                "-netdev",
                "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:8080-127.0.0.1:7878,\
                 hostfwd=tcp:127.0.0.1:2222-127.0.0.1:22",
                "-device",
                "virtio-net-device,netdev=net0"
            ]
        );
    }

    #[test]
    fn the_gdb_stub_listens_on_the_loopback_and_may_hold_the_cpu() {
        assert!(gdb_args(None).is_empty());
        assert_eq!(strings(gdb_args(Some(GdbStub { port: 1234, wait: false }))), ["-gdb", "tcp:127.0.0.1:1234"]);
        let s = VmSpec { gdb: Some(GdbStub { port: 4321, wait: true }), ..spec() };
        assert!(strings(args(&s)).ends_with(&["-gdb".into(), "tcp:127.0.0.1:4321".into(), "-S".into()]));
    }

    #[test]
    fn commas_in_paths_are_escaped() {
        let args = strings(console_args(&Console::File("/a,b/log".into())));
        assert_eq!(args[1], "file,id=console,path=/a,,b/log");
    }

    #[test]
    fn readonly_disk() {
        let args = strings(disk_args(&[Disk { path: "/i.qcow2".into(), format: DiskFormat::Qcow2, readonly: true }]));
        assert_eq!(args[1], "if=none,id=disk0,format=qcow2,file=/i.qcow2,readonly=on");
    }

    #[test]
    fn kvm_needs_device_and_cpu_flags() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("kvm");
        assert!(kvm_unusable_reason_from(&missing, "flags : vmx").unwrap().contains("cannot be opened"));
        let present = dir.path().join("kvm-file");
        std::fs::write(&present, "").unwrap();
        assert!(kvm_unusable_reason_from(&present, "flags\t: fpu sse").unwrap().contains("vmx or svm"));
        assert_eq!(kvm_unusable_reason_from(&present, "flags\t: fpu svm sse"), None);
    }

    #[test]
    fn tsc_from_cpuinfo() {
        assert_eq!(parse_cpu_mhz("model name: x\ncpu MHz\t\t: 2596.122\n"), Some(2596122));
        assert_eq!(parse_cpu_mhz("nothing"), None);
    }
}
