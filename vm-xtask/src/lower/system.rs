//! Lowering a [`System`] value to the store items a VM boots from: kernel image, initrd
//! (guest helper and modules), the userland packages, and the system item that ties
//! them together for the guest helper (`system.json`: `/etc` files, users, mounts,
//! services).

use fs_err as fs;
use std::path::PathBuf;

use anyhow::{Context, Result};
use guest::{Check, FileSpec, HomeSpec, Mode, MountSpec, Readiness, Request, ServiceSpec, SystemConfig};
use os_configs::{Arch, Device, FileSystem, Package, Ready, Restart, System};

use crate::lower::kernel::{self, KernelTree};
use crate::store::{Item, Recipe, Store};
use crate::{debian, lower::helper, lower::initrd, lower::packages, Workspace};

/// Everything needed to boot a system.
#[derive(Debug, Clone)]
pub struct Lowered {
    /// The guest's architecture.
    pub arch: Arch,
    pub kernel: KernelTree,
    /// What QEMU's `-kernel` gets.
    pub boot_image: PathBuf,
    pub initrd: Item,
    /// Store items of the userland packages.
    pub packages: Vec<Item>,
    /// Links the guest helper creates before running anything (`/bin` and friends).
    pub links: Vec<(String, String)>,
    /// The guest's `PATH`.
    pub path: String,
    pub kernel_args: Vec<String>,
    /// The command line that runs e2fsck in the guest, when the system's file systems
    /// are checked (a disk image's: see `image::closure`); empty otherwise.
    pub fsck: Vec<String>,
}

impl Lowered {
    /// Every store item the VM reads, so a recipe built in the VM depends on them all.
    pub fn items(&self) -> Vec<(&'static str, &Item)> {
        let mut items = vec![("initrd", &self.initrd)];
        if let Some(k) = &self.kernel.item {
            items.push(("kernel", k));
        }
        items.extend(self.packages.iter().map(|p| ("package", p)));
        items
    }

    /// Adds the links of a host program's libraries ([`packages::host_program`]: its
    /// loader and `/lib/x86_64-linux-gnu/SONAME`), as a test binary brings them.
    ///
    /// Where the system lays out a link's directory itself (a system with Debian
    /// packages links `/lib64` and `/lib/x86_64-linux-gnu` into its profile, read-only),
    /// the system's library of that name is the one the loader finds, as on a machine
    /// with those packages installed, and the host's is linked in `/lib` instead (a real
    /// directory in every guest, the loader's last default one), for the libraries the
    /// system lacks. The program's loader is then the system's (its libc6's).
    pub fn add_library_links(&mut self, links: Vec<(String, String)>) {
        add_library_links(&mut self.links, links);
    }
}

/// [`Lowered::add_library_links`] on the guest's links `existing`.
fn add_library_links(existing: &mut Vec<(String, String)>, links: Vec<(String, String)>) {
    let new = library_links_to_make(existing, links);
    existing.extend(new);
}

/// Of a host program's library links, those still to make in a guest where `made` are
/// made already, each where [`Lowered::add_library_links`] puts it.
pub fn library_links_to_make(made: &[(String, String)], links: Vec<(String, String)>) -> Vec<(String, String)> {
    let mut new: Vec<(String, String)> = Vec::new();
    for (link, target) in links {
        let under_a_link =
            made.iter().any(|(l, _)| link.strip_prefix(l.as_str()).is_some_and(|rest| rest.starts_with('/')));
        let link = match link.rsplit_once('/') {
            Some((_, name)) if under_a_link => format!("/lib/{name}"),
            _ => link,
        };
        if !made.iter().chain(&new).any(|(l, _)| *l == link) {
            new.push((link, target));
        }
    }
    new
}

/// Builds (or finds) everything `system` needs to boot.
pub fn lower(store: &Store, ws: &Workspace, system: &System, verbose: bool) -> Result<Lowered> {
    let boot = lower_boot(store, ws, system, verbose)?;
    lower_packages(store, ws, system, verbose, boot)
}

/// The part of [`lower`] QEMU needs to start: kernel, boot image and initrd (no
/// packages yet; `PATH` is `/bin`).
pub fn lower_boot(store: &Store, ws: &Workspace, system: &System, verbose: bool) -> Result<Lowered> {
    let kernel = kernel::resolve(store, &system.kernel, system.arch)
        .with_context(|| format!("getting the kernel of system `{}`", system.name))?;
    let boot_image = kernel::boot_image(store, &kernel)?;
    let helper = helper::build(store, ws, system.arch, verbose)?;
    let initrd = initrd::initrd(store, &kernel, &helper, &system.initrd_modules)
        .with_context(|| format!("building the initrd of system `{}`", system.name))?;
    Ok(Lowered {
        arch: system.arch,
        kernel,
        boot_image,
        initrd,
        packages: Vec::new(),
        links: Vec::new(),
        path: "/bin".to_string(),
        kernel_args: system.kernel_args.clone(),
        fsck: Vec::new(),
    })
}

/// The rest of [`lower`]: `system`'s packages, added to what [`lower_boot`] made.
///
/// A system with Debian packages gets their dependency closure ([`debian::closure`]),
/// each package its own item, and a profile of them all laid out as Debian lays out a
/// system ([`debian::profile`]), busybox's applets included when it has busybox.
pub fn lower_packages(store: &Store, ws: &Workspace, system: &System, verbose: bool, boot: Lowered) -> Result<Lowered> {
    let mut packages = Vec::new();
    let mut links = Vec::new();
    let mut path = Vec::new();
    let mut resolver = None;
    let debian_roots = debian_packages(system);
    let mut busybox_item = None;
    for package in &system.packages {
        match package {
            Package::Crate { package, bin } => {
                let item = packages::crate_binary(store, ws, package, bin, system.arch, verbose)
                    .with_context(|| format!("building package `{package}` of system `{}`", system.name))?;
                path.push(format!("{}/bin", item.guest_path()));
                packages.push(item);
            }
            Package::Host { path: program } => {
                let resolver = resolver.get_or_insert_with(packages::LibraryResolver::from_host);
                let host = packages::host_program(store, resolver, program).with_context(|| {
                    format!("adding host program `{}` of system `{}`", program.display(), system.name)
                })?;
                path.push(format!("{}/bin", host.item.guest_path()));
                for link in host.links {
                    if !links.contains(&link) {
                        links.push(link);
                    }
                }
                packages.extend(store.closure(std::slice::from_ref(&host.item))?);
            }
            Package::Busybox => {
                let item = busybox(store, system.arch)?;
                if debian_roots.is_empty() {
                    let bin = format!("{}/bin", item.guest_path());
                    for link in ["/bin", "/sbin", "/usr/bin", "/usr/sbin"] {
                        links.push((link.to_string(), bin.clone()));
                    }
                    path.push("/bin".to_string());
                }
                busybox_item = Some(item.clone());
                packages.push(item);
            }
            Package::Debian { .. } => {}
        }
    }
    if !debian_roots.is_empty() {
        let closure = debian::closure::closure(&debian_roots)
            .with_context(|| format!("resolving the Debian packages of system `{}`", system.name))?;
        let (mut unpacked, mut alternatives) = (Vec::new(), Vec::new());
        for (_, pin) in &closure {
            unpacked.push(debian::unpacked(store, pin)?);
            alternatives.push(debian::alternatives(store, pin)?);
        }
        let profile = debian::profile::profile(store, &unpacked, &alternatives, busybox_item.as_ref())
            .with_context(|| format!("laying out the Debian packages of system `{}`", system.name))?;
        links.extend(debian::profile::guest_links(&profile, &etc_written(system))?);
        path.extend(["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(String::from));
        packages.extend(unpacked);
        packages.push(profile);
    }
    if path.is_empty() {
        path.push("/bin".to_string());
    }
    Ok(Lowered { packages, links, path: path.join(":"), ..boot })
}

/// The Debian packages `system` declares, in order, by their names in the lock
/// ([`debian::qualified`] for the system's architecture).
pub fn debian_packages(system: &System) -> Vec<String> {
    system
        .packages
        .iter()
        .filter_map(|p| match p {
            Package::Debian { package } => Some(debian::qualified(package, system.arch)),
            _ => None,
        })
        .collect()
}

/// The entries of `/etc` the guest helper writes for `system` (by their first component),
/// which a Debian package's `/etc` file does not replace.
fn etc_written(system: &System) -> Vec<String> {
    let mut names: Vec<String> = ["passwd", "group", "hostname"].map(String::from).to_vec();
    names.extend(system.etc_files.iter().filter_map(|f| f.path.split('/').next().map(str::to_string)));
    names
}

/// The system item: `system.json` ([`SystemConfig`]) for the guest helper, referring to
/// every package item. Small, and the only item besides the changed package's that a
/// change to a package makes anew.
pub fn system_item(store: &Store, system: &System, lowered: &Lowered) -> Result<Item> {
    let config = system_config(system, lowered);
    let json = serde_json::to_string_pretty(&config)?;
    let mut recipe = Recipe::new("system", &format!("system-{}", system.name)).param("config", json.clone());
    for item in &lowered.packages {
        recipe = recipe.reference(item);
    }
    store
        .realise(&recipe, |out| {
            fs::create_dir(out)?;
            fs::write(out.join(guest::SYSTEM_CONFIG_FILE), &json)?;
            Ok(())
        })
        .with_context(|| format!("making the system item of system `{}`", system.name))
}

/// What the guest helper sets up for `system` (already validated).
pub fn system_config(system: &System, lowered: &Lowered) -> SystemConfig {
    let gid_of = |name: &str| system.groups.iter().find(|g| g.name == name).map(|g| g.gid).unwrap_or(0);
    let mut passwd = String::from("root:x:0:0:root:/root:/bin/sh\n");
    let mut homes = vec![HomeSpec { path: "/root".into(), uid: 0, gid: 0 }];
    for u in &system.users {
        let gid = gid_of(&u.group);
        passwd.push_str(&format!("{}:x:{}:{gid}:{}:{}:{}\n", u.name, u.uid, u.comment, u.home, u.shell));
        homes.push(HomeSpec { path: u.home.clone(), uid: u.uid, gid });
    }
    let mut group = String::from("root:x:0:\n");
    for g in &system.groups {
        let members: Vec<&str> =
            system.users.iter().filter(|u| u.supplementary_groups.contains(&g.name)).map(|u| u.name.as_str()).collect();
        group.push_str(&format!("{}:x:{}:{}\n", g.name, g.gid, members.join(",")));
    }
    let mut files = vec![
        FileSpec { path: "/etc/passwd".into(), contents: passwd, mode: 0o644 },
        FileSpec { path: "/etc/group".into(), contents: group, mode: 0o644 },
        FileSpec { path: "/etc/hostname".into(), contents: format!("{}\n", system.hostname), mode: 0o644 },
    ];
    files.extend(system.etc_files.iter().map(|f| FileSpec {
        path: format!("/etc/{}", f.path),
        contents: f.contents.clone(),
        mode: f.mode,
    }));
    // The root and the store are the helper's own doing; the other file systems (a
    // tmpfs, a disk by path, label or UUID) are mounted from here: those needed for boot
    // before the services start, the others once they are up. (A 9p share other than the
    // store's is refused by validation: the VM is given none.)
    let (mut mounts, mut late_mounts) = (Vec::new(), Vec::new());
    for fs in system.file_systems.iter().filter(|fs| fs.mount_point != "/" && fs.mount_point != guest::STORE_MOUNT) {
        let source = match &fs.device {
            Device::Virtual(source) | Device::Path(source) => source.clone(),
            Device::Label(label) => format!("LABEL={label}"),
            Device::Uuid(uuid) => format!("UUID={uuid}"),
            Device::Share(_) => continue,
        };
        let spec = MountSpec {
            source,
            target: fs.mount_point.clone(),
            fs_type: fs.fs_type.clone(),
            options: fs.options.clone(),
            check: check_of(fs, false),
        };
        if fs.needed_for_boot {
            mounts.push(spec);
        } else {
            late_mounts.push(spec);
        }
    }
    let root_check = system.root_file_system().map(|fs| check_of(fs, system.volatile_root)).unwrap_or_default();
    let services = system
        .services
        .iter()
        .map(|s| {
            let user = system.users.iter().find(|u| u.name == s.user);
            let (uid, gid, home) = match user {
                Some(u) => (u.uid, gid_of(&u.group), u.home.clone()),
                None => (0, 0, "/root".to_string()),
            };
            let groups = user.map(|u| u.supplementary_groups.iter().map(|g| gid_of(g)).collect()).unwrap_or_default();
            let mut env = vec![
                ("PATH".to_string(), lowered.path.clone()),
                ("HOME".to_string(), home.clone()),
                ("USER".to_string(), s.user.clone()),
                ("LOGNAME".to_string(), s.user.clone()),
            ];
            env.extend(s.env.iter().cloned());
            ServiceSpec {
                name: s.name.clone(),
                argv: std::iter::once(s.program.clone()).chain(s.args.iter().cloned()).collect(),
                env,
                uid,
                gid,
                groups,
                cwd: home,
                restart: s.restart == Restart::Always,
                ready: match &s.ready {
                    Ready::Started => Readiness::Started,
                    Ready::File(path) => Readiness::File(path.clone()),
                    Ready::TcpPort(port) => Readiness::TcpPort(*port),
                },
            }
        })
        .collect();
    SystemConfig {
        version: guest::PROTOCOL_VERSION,
        hostname: system.hostname.clone(),
        mounts,
        files,
        homes,
        links: lowered.links.clone(),
        services,
        late_mounts,
        root_check,
        fsck: lowered.fsck.clone(),
    }
}

/// Whether any of `system`'s file systems is checked before it is mounted (so its disk
/// image needs e2fsck).
pub fn checks_file_systems(system: &System) -> bool {
    system.file_systems.iter().any(|fs| check_of(fs, system.volatile_root) != Check::None)
}

/// How a file system is checked: a block device's when `check` is set, read-only when
/// it is mounted read-only (`ro`, or a volatile root), repaired otherwise.
pub fn check_of(fs: &FileSystem, volatile: bool) -> Check {
    if !fs.check || !fs.device.is_block() {
        Check::None
    } else if volatile || fs.options.split(',').any(|o| o == "ro") {
        Check::ReadOnly
    } else {
        Check::Repair
    }
}

/// The Debian package [`busybox`] comes from.
pub use crate::debian::lock::BUSYBOX_PACKAGE;

/// Debian's static busybox for `arch` with a link per applet in `bin/`.
pub fn busybox(store: &Store, arch: Arch) -> Result<Item> {
    let pin = debian::pin(&debian::qualified(BUSYBOX_PACKAGE, arch))?;
    let deb = debian::unpacked(store, &pin)?;
    let mut recipe = Recipe::new("busybox", &format!("busybox-{}", pin.version)).input_item("deb", &deb);
    // The applets are listed by a busybox that runs here: for another architecture, the
    // amd64 one of the same Debian release (built with the same configuration).
    let lister = match arch {
        Arch::X86_64 => deb.clone(),
        _ => debian::unpacked(store, &debian::pin(BUSYBOX_PACKAGE)?)?,
    };
    if arch != Arch::X86_64 {
        recipe = recipe.param("arch", arch.name()).input_item("lister", &lister);
    }
    store.realise(&recipe, |out| {
        let src = deb.path.join("bin/busybox");
        let bin = out.join("bin");
        fs::create_dir_all(&bin)?;
        fs::copy(&src, bin.join("busybox")).with_context(|| format!("copying `{}`", src.display()))?;
        let list = crate::process::run(crate::process::command(lister.path.join("bin/busybox")).arg("--list"))?;
        for applet in String::from_utf8_lossy(&list.stdout).lines() {
            if !applet.is_empty() && applet != "busybox" && !applet.contains('/') {
                std::os::unix::fs::symlink("busybox", bin.join(applet))?;
            }
        }
        Ok(())
    })
}

/// A request for `argv` in `mode` with `env`, run in `cwd` on a VM named `hostname`, and
/// nothing else: no links, directories, ports, system item, root device, mounts or
/// network (callers add what differs with struct update syntax).
pub fn bare_request(mode: Mode, argv: Vec<String>, env: Vec<(String, String)>, cwd: &str, hostname: &str) -> Request {
    Request {
        version: guest::PROTOCOL_VERSION,
        mode,
        argv,
        env,
        cwd: cwd.into(),
        links: Vec::new(),
        dirs: Vec::new(),
        hostname: hostname.into(),
        stdout_port: None,
        stderr_port: None,
        system: None,
        argv_file: None,
        root_device: None,
        mounts: Vec::new(),
        nets: Vec::new(),
        attach: false,
        keep: false,
        save_failure: false,
        replay: false,
    }
}

/// The request that runs `argv` (a command, no system item) with `env` in `/tmp`, as the
/// builder VMs do; callers add what differs with struct update syntax.
pub fn command_request(lowered: &Lowered, argv: Vec<String>, env: Vec<(String, String)>, hostname: &str) -> Request {
    Request { links: lowered.links.clone(), ..bare_request(Mode::Command, argv, env, "/tmp", hostname) }
}

/// The boot triple of a lowered system for [`crate::vm::qemu::VmSpec::direct`]: kernel,
/// initrd, kernel arguments.
pub fn boot_of(lowered: &Lowered) -> (PathBuf, PathBuf, Vec<String>) {
    (lowered.boot_image.clone(), lowered.initrd.path.join("initrd"), lowered.kernel_args.clone())
}

/// The request that runs `argv` as root on a lowered system (a shell on the console when
/// interactive), with `TERM` set to `term`. Links come from the system's configuration
/// or its image, so the request makes none; callers set `system` and `root_device`.
pub fn root_request(system: &System, lowered: &Lowered, mode: Mode, argv: Vec<String>, term: String) -> Request {
    let env = vec![
        ("PATH".into(), lowered.path.clone()),
        ("HOME".into(), "/root".into()),
        ("USER".into(), "root".into()),
        ("TERM".into(), term),
        ("PS1".into(), format!("[{}:\\w]# ", system.name)),
    ];
    Request { dirs: vec!["/root".into()], ..bare_request(mode, argv, env, "/root", &system.hostname) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_library_under_a_directory_the_system_links_goes_to_lib() {
        let owned = |links: &[(&str, &str)]| -> Vec<(String, String)> {
            links.iter().map(|(l, t)| (l.to_string(), t.to_string())).collect()
        };
        let host = owned(&[
            ("/lib64/ld-linux-x86-64.so.2", "/store/a-ld/ld-linux-x86-64.so.2"),
            ("/lib/x86_64-linux-gnu/libc.so.6", "/store/b-libc/libc.so.6"),
        ]);
        // Busybox only: the host's libraries where they are on the host, once.
        let mut busybox = owned(&[("/bin", "/store/c-busybox/bin")]);
        add_library_links(&mut busybox, host.clone());
        add_library_links(&mut busybox, host.clone());
        assert_eq!(busybox[1..], host[..]);
        // A Debian profile's directories: the system's libraries win, the host's are in /lib.
        let mut debian = owned(&[("/lib64", "usr/lib64"), ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu")]);
        add_library_links(&mut debian, host);
        assert_eq!(
            debian[2..],
            owned(&[
                ("/lib/ld-linux-x86-64.so.2", "/store/a-ld/ld-linux-x86-64.so.2"),
                ("/lib/libc.so.6", "/store/b-libc/libc.so.6"),
            ])[..]
        );
    }
}
