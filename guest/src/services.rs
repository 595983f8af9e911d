//! A system item's configuration applied at boot (mounts, `/etc` files, home directories,
//! links, host name), and its services: started in order, waited for until up, and
//! restarted when they exit if the system asks for it.

use std::fs::{self, OpenOptions};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use guest::{Readiness, ServiceSpec, Status, SystemConfig};
use nix::mount::{mount, MsFlags};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{Gid, Pid, Uid};

use crate::sys::{log, Result};

/// Reads `system.json` from the system item at `system` (a path in the guest).
pub fn read_config(system: &str) -> Result<SystemConfig> {
    let path = Path::new(system).join(guest::SYSTEM_CONFIG_FILE);
    let text = fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let config: SystemConfig =
        serde_json::from_str(&text).map_err(|e| format!("bad system configuration {}: {e}", path.display()))?;
    if config.version != guest::PROTOCOL_VERSION {
        return Err(format!(
            "system configuration {} has version {} but this helper speaks {}",
            path.display(),
            config.version,
            guest::PROTOCOL_VERSION
        ));
    }
    Ok(config)
}

/// Sets the system up in the (volatile) root: host name, loopback, mounts, files, homes
/// and links. With `root_has_files`, the root file system came with the files and homes
/// (the shared-store image): they are not written again.
pub fn apply(config: &SystemConfig, root_has_files: bool) -> Result<()> {
    nix::unistd::sethostname(&config.hostname).map_err(|e| format!("cannot set host name {}: {e}", config.hostname))?;
    loopback_up()?;
    for m in &config.mounts {
        mount_checked(m, &config.fsck)?;
    }
    let (files, homes) = if root_has_files { (&[][..], &[][..]) } else { (&config.files[..], &config.homes[..]) };
    for f in files {
        if let Some(parent) = Path::new(&f.path).parent() {
            fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        fs::write(&f.path, &f.contents).map_err(|e| format!("cannot write {}: {e}", f.path))?;
        fs::set_permissions(&f.path, fs::Permissions::from_mode(f.mode))
            .map_err(|e| format!("cannot set the mode of {}: {e}", f.path))?;
    }
    for h in homes {
        fs::create_dir_all(&h.path).map_err(|e| format!("cannot create {}: {e}", h.path))?;
        nix::unistd::chown(h.path.as_str(), Some(Uid::from_raw(h.uid)), Some(Gid::from_raw(h.gid)))
            .map_err(|e| format!("cannot give {} to {}:{}: {e}", h.path, h.uid, h.gid))?;
        fs::set_permissions(&h.path, fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("cannot set the mode of {}: {e}", h.path))?;
    }
    for (link, target) in &config.links {
        if let Some(parent) = Path::new(link).parent() {
            fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        // A disk image's root may have the link already.
        if fs::read_link(link).is_ok_and(|t| t == Path::new(target)) {
            continue;
        }
        std::os::unix::fs::symlink(target, link).map_err(|e| format!("cannot link {link} -> {target}: {e}"))?;
    }
    Ok(())
}

/// Mounts one of a system's file systems: a device named by label or UUID is looked
/// for (and waited for), and checked first when the system asks (`fsck`: e2fsck's
/// command line).
pub fn mount_checked(m: &guest::MountSpec, fsck: &[String]) -> Result<()> {
    let device = crate::devices::resolve_device(&m.source)?;
    check(fsck, &device, m.check)?;
    mount_spec(&guest::MountSpec { source: device, ..m.clone() })
}

/// Runs e2fsck on `device` as `how` says; an error (with e2fsck's words) unless the file
/// system is clean or was repaired.
pub fn check(fsck: &[String], device: &str, how: guest::Check) -> Result<()> {
    let Some(option) = how.option() else { return Ok(()) };
    let Some((program, args)) = fsck.split_first() else {
        return Err(format!("{device} is to be checked, but the system item names no e2fsck"));
    };
    let out = Command::new(program)
        .args(args)
        .arg(option)
        .arg(device)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run e2fsck ({program}) on {device}: {e}"))?;
    let said = String::from_utf8_lossy(&[out.stdout, out.stderr].concat()).trim().replace('\n', " | ");
    match out.status.code() {
        Some(0) => log(&format!("file system on {device} checked (e2fsck {option}): {said}")),
        Some(1) => log(&format!("file system on {device}: errors corrected (e2fsck {option}): {said}")),
        Some(2) => {
            return Err(format!(
                "e2fsck {option} repaired the file system on {device} and asks for a reboot: boot again ({said})"
            ))
        }
        code => {
            let code = code.map_or_else(|| "killed by a signal".to_string(), |c| format!("exit status {c}"));
            return Err(format!(
                "file system check of {device} failed (e2fsck {option}, {code}): {said}; \
                 repair it with e2fsck from another system"
            ));
        }
    }
    Ok(())
}

/// Mounts one [`guest::MountSpec`], creating its target first where it is missing.
pub fn mount_spec(m: &guest::MountSpec) -> Result<()> {
    if !Path::new(&m.target).is_dir() {
        fs::create_dir_all(&m.target).map_err(|e| format!("cannot create {}: {e}", m.target))?;
    }
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for opt in m.options.split(',').filter(|o| !o.is_empty()) {
        match opt {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            other => data.push(other),
        }
    }
    let data = data.join(",");
    mount(Some(m.source.as_str()), m.target.as_str(), Some(m.fs_type.as_str()), flags, Some(data.as_str()))
        .map_err(|e| format!("cannot mount {} ({}) on {}: {e}", m.source, m.fs_type, m.target))
}

/// Brings up `net.interface` with its IPv4 address (and `lo`): QEMU's user network
/// forwards the host's ports to it.
pub fn network_up(net: &guest::NetConfig) -> Result<()> {
    use nix::libc;
    let (addr, prefix) = net.address.split_once('/').unwrap_or((&net.address, "24"));
    let addr: std::net::Ipv4Addr = addr.parse().map_err(|e| format!("bad address {}: {e}", net.address))?;
    let prefix: u32 = prefix.parse().ok().filter(|p| *p <= 32).ok_or(format!("bad prefix in {}", net.address))?;
    let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - prefix) };
    let mac = match &net.mac {
        Some(text) => Some(guest::parse_mac(text).ok_or(format!("bad hardware address {text}"))?),
        None => None,
    };
    loopback_up()?;
    // The driver names the interface once the device is probed: wait a little for it.
    let sys = Path::new("/sys/class/net").join(&net.interface);
    for _ in 0..500 {
        if sys.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // SAFETY: a plain socket and ioctls on a zeroed, NUL-terminated `ifreq`.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(format!("cannot open a socket: {}", std::io::Error::last_os_error()));
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (i, b) in net.interface.bytes().take(libc::IFNAMSIZ - 1).enumerate() {
            ifr.ifr_name[i] = b as libc::c_char;
        }
        let mut steps = Vec::new();
        if let Some(mac) = mac {
            ifr.ifr_ifru.ifru_hwaddr.sa_family = libc::ARPHRD_ETHER;
            for (i, b) in mac.iter().enumerate() {
                ifr.ifr_ifru.ifru_hwaddr.sa_data[i] = *b as libc::c_char;
            }
            steps.push(("set the hardware address of", libc::ioctl(fd, libc::SIOCSIFHWADDR as _, &ifr)));
        }
        ifr.ifr_ifru.ifru_addr = sockaddr(u32::from(addr));
        steps.push(("set the address of", libc::ioctl(fd, libc::SIOCSIFADDR as _, &ifr)));
        ifr.ifr_ifru.ifru_netmask = sockaddr(mask);
        steps.push(("set the netmask of", libc::ioctl(fd, libc::SIOCSIFNETMASK as _, &ifr)));
        let got = libc::ioctl(fd, libc::SIOCGIFFLAGS as _, &mut ifr);
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        steps.push(("bring up", if got == 0 { libc::ioctl(fd, libc::SIOCSIFFLAGS as _, &ifr) } else { got }));
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if let Some((what, _)) = steps.iter().find(|(_, r)| *r != 0) {
            return Err(format!("cannot {what} {}: {err}", net.interface));
        }
    }
    if let Some(gateway) = &net.gateway {
        default_route(gateway)?;
    }
    if let Some(server) = &net.nameserver {
        fs::write("/etc/resolv.conf", format!("nameserver {server}\n"))
            .map_err(|e| format!("cannot write /etc/resolv.conf: {e}"))?;
    }
    // The host's forwarded connections are addressed to the guest's 127.0.0.1, so that
    // services listening on the loopback only are reached: the interface accepts them.
    let localnet = format!("/proc/sys/net/ipv4/conf/{}/route_localnet", net.interface);
    fs::write(&localnet, "1").map_err(|e| format!("cannot write {localnet}: {e}"))?;
    Ok(())
}

/// An IPv4 address (host order) as the `sockaddr` the interface and route ioctls take.
fn sockaddr(ip: u32) -> nix::libc::sockaddr {
    use nix::libc;
    // SAFETY: sockaddr_in is plain data; an all-zero value is valid.
    let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sin.sin_family = libc::AF_INET as libc::sa_family_t;
    sin.sin_addr.s_addr = ip.to_be();
    // SAFETY: sockaddr_in fits in sockaddr (16 bytes both) and is read as one.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// Adds the default route through `gateway`.
fn default_route(gateway: &str) -> Result<()> {
    use nix::libc;
    let gw: std::net::Ipv4Addr = gateway.parse().map_err(|e| format!("bad gateway {gateway}: {e}"))?;
    // SAFETY: a plain socket and one ioctl on a zeroed `rtentry`.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(format!("cannot open a socket: {}", std::io::Error::last_os_error()));
        }
        let mut route: libc::rtentry = std::mem::zeroed();
        route.rt_dst = sockaddr(0);
        route.rt_genmask = sockaddr(0);
        route.rt_gateway = sockaddr(u32::from(gw));
        route.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
        let result = libc::ioctl(fd, libc::SIOCADDRT as _, &route);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if result != 0 {
            return Err(format!("cannot add a default route through {gateway}: {err}"));
        }
    }
    Ok(())
}

/// Brings `lo` up, so services can listen on 127.0.0.1.
pub(crate) fn loopback_up() -> Result<()> {
    use nix::libc;
    // SAFETY: a plain socket and two ioctls on a zeroed, NUL-terminated `ifreq`.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(format!("cannot open a socket to bring lo up: {}", std::io::Error::last_os_error()));
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo".iter().enumerate() {
            ifr.ifr_name[i] = *b as libc::c_char;
        }
        let mut result = libc::ioctl(fd, libc::SIOCGIFFLAGS as _, &mut ifr);
        if result == 0 {
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            result = libc::ioctl(fd, libc::SIOCSIFFLAGS as _, &ifr);
        }
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if result != 0 {
            return Err(format!("cannot bring lo up: {err}"));
        }
    }
    Ok(())
}

struct Running {
    spec: ServiceSpec,
    pid: Pid,
    restarts: u32,
}

/// The running services.
#[derive(Default)]
pub struct Supervisor {
    running: Vec<Running>,
    /// No service is restarted (they are being ended for a failure point).
    frozen: bool,
}

impl Supervisor {
    /// Restarts no service from now on (they are about to be ended).
    pub fn freeze(&mut self) {
        self.frozen = true;
    }

    /// Starts every service in order, each up before the next starts.
    pub fn start_all(&mut self, specs: &[ServiceSpec]) -> Result<()> {
        for spec in specs {
            let pid = spawn(spec)?;
            self.running.push(Running { spec: spec.clone(), pid, restarts: 0 });
            self.wait_ready(self.running.len() - 1)?;
            log(&format!("service {} up (pid {pid})", spec.name));
        }
        Ok(())
    }

    fn wait_ready(&mut self, index: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(guest::SERVICE_READY_SECS);
        loop {
            let r = &self.running[index];
            let up = match &r.spec.ready {
                Readiness::Started => true,
                Readiness::File(path) => Path::new(path).exists(),
                Readiness::TcpPort(port) => {
                    let addr = SocketAddr::from(([127, 0, 0, 1], *port));
                    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
                }
            };
            if up {
                return Ok(());
            }
            match waitpid(r.pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(_, code)) => return Err(self.died(index, &Status::Exited(code))),
                Ok(WaitStatus::Signaled(_, sig, _)) => return Err(self.died(index, &Status::Signaled(sig as i32))),
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "service {} is not up after {}s ({:?}); its log: {}",
                    r.spec.name,
                    guest::SERVICE_READY_SECS,
                    r.spec.ready,
                    log_tail(&r.spec.name)
                ));
            }
            // Short: under TCG a service takes about 0.1 s to come up; a check costs little.
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn died(&self, index: usize, how: &Status) -> String {
        let name = &self.running[index].spec.name;
        format!("service {name} ended ({}) before it was up; its log: {}", how.encode().trim_end(), log_tail(name))
    }

    /// Called for a reaped child that is not the main program: restarts the service it
    /// was, when asked to and under the limit.
    pub fn exited(&mut self, pid: Pid, how: &Status) {
        let Some(r) = self.running.iter_mut().find(|r| r.pid == pid) else { return };
        log(&format!("service {} ended ({})", r.spec.name, how.encode().trim_end()));
        if !r.spec.restart || self.frozen {
            return;
        }
        if r.restarts >= guest::MAX_RESTARTS {
            log(&format!("service {} ended {} times; not restarting it", r.spec.name, r.restarts + 1));
            return;
        }
        std::thread::sleep(Duration::from_secs(1));
        match spawn(&r.spec) {
            Ok(pid) => {
                r.pid = pid;
                r.restarts += 1;
                log(&format!("service {} restarted (pid {pid})", r.spec.name));
            }
            Err(e) => log(&format!("cannot restart service {}: {e}", r.spec.name)),
        }
    }
}

fn log_path(name: &str) -> String {
    guest::SERVICE_LOG.replace("NAME", name)
}

fn log_tail(name: &str) -> String {
    let text = fs::read_to_string(log_path(name)).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

fn spawn(spec: &ServiceSpec) -> Result<Pid> {
    let log = log_path(&spec.name);
    if let Some(dir) = Path::new(&log).parent() {
        fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let open =
        || OpenOptions::new().create(true).append(true).open(&log).map_err(|e| format!("cannot open {log}: {e}"));
    let groups: Vec<Gid> = spec.groups.iter().map(|g| Gid::from_raw(*g)).collect();
    let mut cmd = Command::new(&spec.argv[0]);
    cmd.args(&spec.argv[1..])
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&spec.cwd)
        .stdin(Stdio::null())
        .stdout(open()?)
        .stderr(open()?);
    let (uid, gid) = (Uid::from_raw(spec.uid), Gid::from_raw(spec.gid));
    crate::sys::clean_start(&mut cmd);
    // The groups, then the group, then the user: std's own `uid` and `gid` would drop
    // root before a `pre_exec` could set the supplementary groups.
    // SAFETY: setgroups, setgid and setuid are async-signal-safe; `groups` is allocated
    // before fork.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setgroups(&groups)?;
            nix::unistd::setgid(gid)?;
            nix::unistd::setuid(uid)?;
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| format!("cannot start service {} (`{}`): {e}", spec.name, spec.argv[0]))?;
    Ok(Pid::from_raw(child.id() as i32))
}
