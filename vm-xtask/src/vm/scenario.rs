//! Scenarios: several VMs on virtual networks, driven by an ordinary Rust function
//! (`cargo xtask scenario NAME`). Each node is a [`System`] booted as `run-vm` boots it,
//! in request mode `serve`: once its services are up, the guest helper runs the
//! driver's commands over a control channel (a virtio serial port on a unix socket,
//! [`guest::control`]). Nodes boot in parallel; their LANs are hubs in xtask
//! ([`hub`]), so a node can be cut off and put back; every node's name is in every
//! node's `/etc/hosts`. Each call has a timeout, and a failure names the node, the
//! command, its status and output, and shows the node's console tail.

pub mod hub;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use guest::control::{base64_decode, FromGuest, ToGuest};
use guest::{Mode, NetConfig};
use os_configs::{EtcFile, System};

use crate::machine::Machine;
use crate::machine::{self, VmOpts};
use crate::store::Store;
use crate::vm::qemu::{self, Console, Lan as LanSpec};
use crate::{vm, Workspace};

/// A scenario: nodes, the networks joining them, and the script that drives them.
pub struct Scenario {
    /// What `cargo xtask scenario NAME` calls it.
    pub name: String,
    /// One line, for `scenario --list`.
    pub description: String,
    /// Each node's name (also its host name) and system.
    pub nodes: Vec<(String, System)>,
    /// Each network's name and the nodes on it.
    pub networks: Vec<(String, Vec<String>)>,
    /// Drives the nodes: starts them, runs commands, cuts links; an error fails the
    /// scenario (exit 1) and is printed with the node's console tail.
    pub script: fn(&mut Driver) -> Result<()>,
}

/// How long a node may take to boot and bring its services up.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
/// How long past a command's own timeout its answer may take to arrive whole.
pub const ANSWER_GRACE: Duration = Duration::from_secs(30);
/// A command's timeout unless a call says otherwise.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// The address of node `i` on network `lan`.
fn address(lan: usize, i: usize) -> String {
    format!("10.77.{lan}.{}", i + 1)
}

/// Its hardware address there.
fn mac(lan: usize, i: usize) -> String {
    format!("52:54:00:77:{lan:02x}:{:02x}", i + 1)
}

/// What the script drives: the scenario's nodes and networks.
pub struct Driver {
    name: String,
    nodes: BTreeMap<String, Node>,
    lans: Vec<hub::Lan>,
    /// Holds the unix sockets of the LANs and the control channels.
    _sockets: tempfile::TempDir,
    /// A directory private to the user for the script's files ([`Driver::private_dir`]).
    files: crate::store::Scratch,
}

/// One node: its QEMU once started, and its control channel.
pub struct Node {
    name: String,
    spec: qemu::VmSpec,
    /// QEMU's monitor socket, when a failure can be saved ([`Node::save_failure`]).
    monitor: Option<PathBuf>,
    /// The request its guest reads, for a saved failure's record.
    request: Option<guest::Request>,
    /// The snapshot it is restored from instead of booting ([`Node::prefer_snapshot`]).
    warm: Option<crate::vm::snapshot::WarmStart>,
    /// A restore begun by [`Node::spawn`], finished by [`Node::connect`].
    pending: Option<(vm::RestoreFds, crate::vm::snapshot::Restore)>,
    control_path: PathBuf,
    console: PathBuf,
    /// The FIFO QEMU writes the console into, in the private socket directory.
    console_fifo: PathBuf,
    /// Copies the console into its log, bounded ([`vm::BoundedLog`]), while QEMU runs.
    console_relay: Option<vm::Relay>,
    /// The console's last bytes, for errors.
    console_tail: std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<u8>>>,
    qemu: Option<Child>,
    control: Option<(BufReader<UnixStream>, UnixStream)>,
    _xchg: crate::store::Exchange,
    /// Its entry among the workspace's running VMs, for `cargo xtask attach`, and the
    /// attach channel's socket.
    _registration: Option<(vm::attach::Registration, vm::attach::Socket)>,
}

/// How a command on a node ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Its exit code, when it exited.
    pub exit: Option<i32>,
    /// The signal that killed it, when one did.
    pub signal: Option<i32>,
    /// Whether it was killed for running past its timeout.
    pub timed_out: bool,
    /// What it wrote on stdout (as UTF-8, lossily).
    pub stdout: String,
    /// What it wrote on stderr (as UTF-8, lossily).
    pub stderr: String,
}

impl Outcome {
    fn status(&self) -> String {
        match (self.timed_out, self.exit, self.signal) {
            (true, _, _) => "timed out".to_string(),
            (_, Some(code), _) => format!("exit status {code}"),
            (_, _, Some(sig)) => format!("killed by signal {sig}"),
            _ => "no status".to_string(),
        }
    }
}

impl Driver {
    /// Lowers every node's system and prepares its VM; starts nothing yet.
    pub fn prepare(ws: &Workspace, opts: &VmOpts, store: &Store, scenario: &Scenario) -> Result<Driver> {
        let sockets = socket_dir()?;
        let files = store.scratch("scenario")?;
        let names: Vec<String> = scenario.nodes.iter().map(|(n, _)| n.clone()).collect();
        for (net, members) in &scenario.networks {
            if let Some(m) = members.iter().find(|m| !names.contains(m)) {
                bail!("scenario `{}`: network `{net}` names `{m}`, which is not a node", scenario.name);
            }
        }
        let lans = start_lans(scenario, sockets.path())?;
        // Every node's name, by its address on the first network it is on.
        let mut hosts = String::from("127.0.0.1 localhost\n");
        for node in &names {
            let on = scenario
                .networks
                .iter()
                .enumerate()
                .find_map(|(l, (_, m))| m.iter().position(|n| n == node).map(|i| address(l, i)));
            if let Some(addr) = on {
                hosts.push_str(&format!("{addr} {node}\n"));
            }
        }
        let log_dir = ws.log_dir();
        crate::store::ensure_private_dir(&log_dir)?;
        let mut nodes = BTreeMap::new();
        for (node, declared) in &scenario.nodes {
            let lans_of = lans_of(scenario, &lans, node);
            let plan = NodePlan {
                scenario: &scenario.name,
                node,
                declared,
                hosts: &hosts,
                lans: &lans_of,
                sockets: sockets.path(),
            };
            let prepared = plan
                .prepare(ws, opts, store)
                .with_context(|| format!("preparing node `{node}` of scenario `{}`", scenario.name))?;
            nodes.insert(node.clone(), prepared);
        }
        Ok(Driver { name: scenario.name.clone(), nodes, lans, _sockets: sockets, files })
    }

    /// The scenario's nodes restored from the saved failure `record` (its states in
    /// `dir`), on new networks, each serving its control channel again.
    pub fn restore(
        ws: &Workspace,
        store: &Store,
        scenario: &Scenario,
        record: &vm::replay::Record,
        dir: &Path,
    ) -> Result<Driver> {
        let sockets = socket_dir()?;
        let files = store.scratch("replay")?;
        let lans = start_lans(scenario, sockets.path())?;
        crate::store::ensure_private_dir(&ws.log_dir())?;
        let changed =
            |why: &str| anyhow!("scenario `{}` changed since `{}` was saved: {why}", scenario.name, record.id);
        let mut nodes = BTreeMap::new();
        for saved in &record.vms {
            let name = &saved.name;
            if !scenario.nodes.iter().any(|(n, _)| n == name) {
                return Err(changed(&format!("it has no node `{name}`")));
            }
            let xchg = store.exchange()?;
            let mut spec = saved.spec_for_restore(xchg.path(), &files.path().join(format!("{name}.ram")))?;
            let now = lans_of(scenario, &lans, name);
            if now.len() != spec.lans.len() {
                return Err(changed(&format!("node `{name}` is on other networks")));
            }
            for (lan, (_, _, port)) in spec.lans.iter_mut().zip(now) {
                (lan.local, lan.hub) = (port.qemu, port.hub);
            }
            let mut request = saved.request.clone();
            request.replay = true;
            vm::write_request(xchg.path(), &request)?;
            let console = ws.log_dir().join(format!("replay-{}-{name}-{}.log", record.id, std::process::id()));
            let attachable = vm::attach::Attachable {
                dir: vm::attach::registry_dir(&ws.target_dir),
                what: format!("replay {}: node {name}", record.id),
            };
            let label = format!("replay-{}-{name}", record.id);
            let mut node = Node::serving(name, spec, sockets.path(), console, xchg, Some((attachable, label)))?;
            node.save_failures(sockets.path());
            nodes.insert(name.clone(), node);
        }
        for saved in &record.vms {
            let node = nodes.get_mut(&saved.name).expect("inserted above");
            node.restore(&dir.join(&saved.state))?;
        }
        Ok(Driver { name: scenario.name.clone(), nodes, lans, _sockets: sockets, files })
    }

    /// Saves every running node at a failure point, into `scratch`: each node's record
    /// (its state a file `NODE.state` there), the states' bytes and the seconds taken.
    pub fn save_failure(&mut self, scratch: &Path) -> Result<(Vec<vm::replay::SavedVm>, u64, f64)> {
        let mut saved = Vec::new();
        let (mut bytes, mut seconds) = (0, 0.0);
        for node in self.nodes.values_mut().filter(|n| n.control.is_some()) {
            let state = format!("{}.state", node.name);
            let (b, s) = node.save_failure(&scratch.join(&state))?;
            bytes += b;
            seconds += s;
            let request = node.request.clone().context("the node's request is not known")?;
            saved.push(vm::replay::SavedVm { name: node.name.clone(), state, spec: node.spec.clone(), request });
        }
        if saved.is_empty() {
            bail!("no node was running");
        }
        Ok((saved, bytes, seconds))
    }

    /// Boots every node (in parallel) and waits until each one's services are up.
    pub fn start_all(&mut self) -> Result<()> {
        for node in self.nodes.values_mut() {
            node.spawn()?;
        }
        // All at once: a node restored or connected in turn would wait for every node
        // before it to be up.
        std::thread::scope(|scope| {
            let starts: Vec<_> = self.nodes.values_mut().map(|node| scope.spawn(move || node.connect())).collect();
            let results: Vec<Result<()>> = starts
                .into_iter()
                .map(|start| start.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
                .collect();
            results.into_iter().collect()
        })
    }

    /// A directory private to the user (mode 0700), removed when the scenario ends: where
    /// a script puts what it copies from its nodes ([`Node::copy_from_node`]).
    pub fn private_dir(&self) -> &Path {
        self.files.path()
    }

    /// The node called `name`.
    pub fn node(&mut self, name: &str) -> Result<&mut Node> {
        let scenario = &self.name;
        self.nodes.get_mut(name).ok_or_else(|| anyhow!("scenario `{scenario}` has no node `{name}`"))
    }

    /// Cuts `node` off every network (frames to and from it are dropped).
    pub fn block(&self, node: &str) -> Result<()> {
        self.set_blocked(node, true)
    }

    /// Puts `node` back on its networks.
    pub fn unblock(&self, node: &str) -> Result<()> {
        self.set_blocked(node, false)
    }

    fn set_blocked(&self, node: &str, blocked: bool) -> Result<()> {
        let lans: Vec<&hub::Lan> = self.lans.iter().filter(|l| l.ports.contains_key(node)).collect();
        if lans.is_empty() {
            bail!("scenario `{}`: node `{node}` is on no network", self.name);
        }
        for lan in lans {
            lan.set_blocked(node, blocked);
        }
        Ok(())
    }

    /// The nodes' control sockets (for `--keep`): the driver lets go of them, so a
    /// shell can attach.
    pub fn release(&mut self) -> Vec<(String, PathBuf, PathBuf)> {
        self.nodes
            .values_mut()
            .map(|n| {
                n.control = None;
                (n.name.clone(), n.control_path.clone(), n.console.clone())
            })
            .collect()
    }

    /// Waits until every node's QEMU has ended, or `stop` is set (by Ctrl-C): then ends
    /// them all. Either way each console's log is completed. Returns whether it was stopped.
    pub fn wait_all(&mut self, stop: &std::sync::atomic::AtomicBool) -> bool {
        let stopped = loop {
            if stop.load(std::sync::atomic::Ordering::SeqCst) {
                break true;
            }
            if !self.nodes.values_mut().any(|n| n.running()) {
                break false;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        for node in self.nodes.values_mut() {
            let _ = node.crash();
        }
        stopped
    }
}

/// A private directory (0700) for a scenario's sockets, short enough for their addresses.
fn socket_dir() -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("xtask-scn.")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .tempdir()
        .context("making a socket directory")
}

/// A hub per network of `scenario`, its sockets in `dir`.
fn start_lans(scenario: &Scenario, dir: &Path) -> Result<Vec<hub::Lan>> {
    let mut lans = Vec::new();
    for (i, (net, members)) in scenario.networks.iter().enumerate() {
        lans.push(hub::Lan::start(dir, i, net, members)?);
    }
    Ok(lans)
}

/// The networks `node` is on: (network index, its index there, its hub port).
fn lans_of(scenario: &Scenario, lans: &[hub::Lan], node: &str) -> Vec<(usize, usize, hub::Port)> {
    let mut on = Vec::new();
    for (l, (_, members)) in scenario.networks.iter().enumerate() {
        if let Some(i) = members.iter().position(|m| m == node) {
            on.push((l, i, lans[l].ports[node].clone()));
        }
    }
    on
}

/// What makes one node of a scenario.
struct NodePlan<'a> {
    scenario: &'a str,
    node: &'a str,
    declared: &'a System,
    /// `/etc/hosts` of every node.
    hosts: &'a str,
    /// The networks it is on: (network index, its index there, its hub port).
    lans: &'a [(usize, usize, hub::Port)],
    /// Where the unix sockets go.
    sockets: &'a Path,
}

impl NodePlan<'_> {
    /// Lowers the node's system and prepares its VM (started by [`Node::spawn`]).
    fn prepare(&self, ws: &Workspace, opts: &VmOpts, store: &Store) -> Result<Node> {
        let NodePlan { scenario, node, declared, hosts, lans, sockets } = *self;
        // `--arch` moves every node to that architecture.
        let declared = &System { arch: opts.arch.unwrap_or(declared.arch), ..declared.clone() };
        let mut system = declared.virtualized();
        system.name = format!("{scenario}-{node}");
        system.hostname = node.to_string();
        system.etc_files.retain(|f| f.path != "hosts");
        system.etc_files.push(EtcFile { path: "hosts".into(), contents: hosts.to_string(), mode: 0o644 });
        machine::add_root_image_modules(&mut system);
        system.initrd_modules.push(qemu::NET_MODULE.to_string());
        let machine = Machine::prepare(ws, opts, store, declared, system)?;
        let (lowered, system_item) = machine.lower()?;
        let mut request = machine.request(&lowered, &system_item, Mode::Serve, vec!["serve".into()]);
        request.attach = true;
        request.nets = lans
            .iter()
            .enumerate()
            .map(|(k, (l, i, _))| NetConfig {
                interface: format!("eth{k}"),
                address: format!("{}/24", address(*l, *i)),
                gateway: None,
                nameserver: None,
                // Set by the guest: restored from a snapshot of its system, its device
                // has the snapshot's address.
                mac: Some(mac(*l, *i)),
            })
            .collect();
        let xchg = store.exchange()?;
        vm::write_request(xchg.path(), &request)?;
        let mut spec = machine.spec(xchg.path().to_path_buf());
        spec.lans = lans
            .iter()
            .map(|(l, i, port)| LanSpec { local: port.qemu.clone(), hub: port.hub.clone(), mac: mac(*l, *i) })
            .collect();
        let console = ws.log_dir().join(format!("scenario-{scenario}-{node}-{}.log", std::process::id()));
        let attach = (machine.attachable(&format!("scenario {scenario}: node {node}")), format!("{scenario}-{node}"));
        let name = node;
        let mut node = Node::serving(name, spec, sockets, console, xchg, Some(attach))?;
        node.request = Some(request);
        node.save_failures(sockets);
        // Restored from a snapshot of its own VM, made on the first run (not with --cold).
        let runtime = sockets.join(format!("{name}.run"));
        crate::store::create_private_dir(&runtime)?;
        let warmth = match opts.warmth() {
            crate::vm::snapshot::Warmth::Cold => crate::vm::snapshot::Warmth::Cold,
            _ => crate::vm::snapshot::Warmth::Make,
        };
        node.prefer_snapshot(store, warmth, &runtime)?;
        Ok(node)
    }
}

impl Node {
    /// A VM of `spec` whose guest serves the control channel (its request, in `xchg`,
    /// in [`Mode::Serve`]): its control socket and console FIFO go in the private
    /// directory `sockets`, its console's log (bounded) at `console`. Started by
    /// [`Node::start`].
    pub fn serving(
        name: &str,
        mut spec: qemu::VmSpec,
        sockets: &Path,
        console: PathBuf,
        xchg: crate::store::Exchange,
        attach: Option<(vm::attach::Attachable, String)>,
    ) -> Result<Node> {
        let console_fifo = sockets.join(format!("{name}.console"));
        nix::unistd::mkfifo(&console_fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .with_context(|| format!("making `{}`", console_fifo.display()))?;
        spec.console = Console::File(console_fifo.clone());
        let control_path = sockets.join(format!("{name}.control"));
        spec.control = Some(control_path.clone());
        let mut registration = None;
        if let Some((attachable, label)) = attach {
            if let Some(socket) = vm::attach::Socket::new(sockets, &format!("{name}.attach"))? {
                spec.attach = Some(socket.path.clone());
                let id = vm::attach::id(&label);
                registration = Some((vm::attach::Registration::new(&attachable, &id, &socket.path)?, socket));
            }
        }
        Ok(Node {
            name: name.to_string(),
            spec,
            monitor: None,
            request: None,
            warm: None,
            pending: None,
            control_path,
            console,
            console_fifo,
            console_relay: None,
            console_tail: Default::default(),
            qemu: None,
            control: None,
            _xchg: xchg,
            _registration: registration,
        })
    }

    /// Starts its QEMU and waits until the guest says it is up.
    pub fn start(&mut self) -> Result<()> {
        self.spawn()?;
        self.connect()
    }

    /// Whether its QEMU still runs.
    pub fn is_running(&mut self) -> bool {
        self.running()
    }

    /// Its QEMU's process ID, once started.
    pub fn pid(&self) -> Option<u32> {
        self.qemu.as_ref().map(std::process::Child::id)
    }

    /// Starts its QEMU ([`Node::start`]'s first half).
    pub fn spawn(&mut self) -> Result<()> {
        match self.warm.as_ref().map(|w| w.restore.clone()) {
            Some(restore) => {
                let fds = self.spawn_restoring(Some(&restore.state))?.expect("restoring");
                self.pending = Some((fds, restore));
            }
            None => drop(self.spawn_restoring(None)?),
        }
        Ok(())
    }

    /// Restores the node from a snapshot of its VM's shape (its system, its devices)
    /// instead of booting it, when one is stored or `warmth` makes it now; the snapshot's
    /// handshake socket goes in `runtime`, a private directory of its own.
    pub fn prefer_snapshot(
        &mut self,
        store: &Store,
        warmth: crate::vm::snapshot::Warmth,
        runtime: &Path,
    ) -> Result<()> {
        self.warm = crate::vm::snapshot::prepare(store, &mut self.spec, runtime, warmth)?;
        Ok(())
    }

    /// Starts its QEMU, restoring the saved state `restore` when given: then what the
    /// handshake takes is returned.
    fn spawn_restoring(&mut self, restore: Option<&Path>) -> Result<Option<vm::RestoreFds>> {
        let _ = std::fs::remove_file(&self.console);
        if let Some(dir) = self.console.parent() {
            crate::store::ensure_private_dir(dir)?;
        }
        // A new file, private, never through a link: the guest's console is written there.
        let log = crate::store::create_private_file(&self.console)?;
        let sinks: Vec<Box<dyn Write + Send>> = vec![Box::new(vm::BoundedLog::new(log))];
        self.console_relay = Some(vm::Relay::start(&self.console_fifo, sinks, Some(self.console_tail.clone()))?);
        let mut args = qemu::args(&self.spec);
        if let Some(monitor) = &self.monitor {
            args.push("-monitor".into());
            let mut arg = qemu::path_arg("unix:", monitor);
            arg.push(",server=on,wait=off");
            args.push(arg);
        }
        if restore.is_some() {
            args.extend(crate::vm::snapshot::restore_args());
        }
        let mut cmd = vm::qemu_command(self.spec.arch, &args, false);
        let fds = restore.map(|state| vm::RestoreFds::install(&mut cmd, state)).transpose()?;
        let child = cmd
            .stderr(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("starting QEMU for node `{}`", self.name))?;
        self.qemu = Some(child);
        Ok(fds)
    }

    /// Gives the node a snapshot port and a monitor (sockets in `sockets`), so that it can
    /// stop at a failure point and be saved ([`Node::save_failure`]), or be restored.
    pub fn save_failures(&mut self, sockets: &Path) {
        self.spec.snapshot_port = Some(sockets.join(format!("{}.snapshot", self.name)));
        self.monitor = Some(sockets.join(format!("{}.monitor", self.name)));
    }

    /// Has the guest stop at a failure point and saves the VM into `state`; the guest then
    /// mounts its shares again, starts its services and serves again. Returns the state's
    /// bytes and the seconds saving took.
    pub fn save_failure(&mut self, state: &Path) -> Result<(u64, f64)> {
        use crate::vm::replay::{FailureSaver, Saved};
        let (Some(socket), Some(monitor)) = (self.spec.snapshot_port.clone(), self.monitor.clone()) else {
            bail!("node `{}` was not started to be saved", self.name);
        };
        let saver = FailureSaver::new(state.to_path_buf(), monitor);
        let watching = saver.start(socket);
        let answer = self.ask(&ToGuest::SaveFailure, Duration::from_secs(300));
        saver.stop();
        let _ = watching.join();
        match (answer, saver.outcome()) {
            (Ok(FromGuest::Ready), Some(Saved::Done { bytes, save_s })) => Ok((bytes, save_s)),
            (_, Some(Saved::Failed(why))) => Err(self.error(&format!("could not be saved: {why}"))),
            (Ok(FromGuest::Failed { error }), _) => Err(self.error(&format!("could not stop to be saved: {error}"))),
            (Ok(other), _) => Err(self.error(&format!("said {other:?} when asked to stop to be saved"))),
            (Err(e), _) => Err(e),
        }
    }

    /// Starts its QEMU restoring the saved state `state` (a failure point's), and waits
    /// until the guest serves again.
    pub fn restore(&mut self, state: &Path) -> Result<()> {
        let Some(socket) = self.spec.snapshot_port.clone() else {
            bail!("node `{}` has no snapshot port to be restored through", self.name);
        };
        let fds = self.spawn_restoring(Some(state))?.expect("restoring");
        let stream = self.connect_stream()?;
        let restore = crate::vm::snapshot::Restore {
            state: state.to_path_buf(),
            socket,
            waiting: guest::snapshot::WAITING_AT_FAILURE,
        };
        let pid = self.pid().unwrap_or_default() as i32;
        let alive = || nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
        if let Err(e) = fds.handshake(&restore, alive) {
            return Err(self.error(&format!("its saved state did not load: {e:#}")));
        }
        self.await_ready(stream, BOOT_TIMEOUT)
    }

    /// Connects to the control channel and waits for the guest to say it is up
    /// ([`Node::start`]'s second half).
    pub fn connect(&mut self) -> Result<()> {
        if let Some((fds, restore)) = self.pending.take() {
            let pid = nix::unistd::Pid::from_raw(self.pid().unwrap_or_default() as i32);
            if let Err(e) = fds.handshake(&restore, || nix::sys::signal::kill(pid, None).is_ok()) {
                // The snapshot did not load: it is removed and the node boots cold.
                let warm = self.warm.take().expect("a restore begun from a snapshot");
                crate::vm::snapshot::discard(&warm, &format!("{e:#}"));
                self.crash()?;
                self.spec = warm.cold.clone();
                self.spawn()?;
            }
        }
        let started = Instant::now();
        let stream = self.connect_stream()?;
        self.await_ready(stream, BOOT_TIMEOUT.saturating_sub(started.elapsed()))
    }

    /// Connects to the control channel's socket (within the boot's time, while QEMU runs).
    fn connect_stream(&mut self) -> Result<UnixStream> {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            match UnixStream::connect(&self.control_path) {
                Ok(s) => return Ok(s),
                Err(_) if Instant::now() < deadline && self.running() => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(self.error(&format!("cannot reach its control channel ({e})"))),
            }
        }
    }

    /// Waits (at most `within`) on the control channel `stream` for the guest to say it
    /// is up.
    fn await_ready(&mut self, stream: UnixStream, within: Duration) -> Result<()> {
        let remaining = within.max(Duration::from_secs(1));
        let writer = stream.try_clone()?;
        let mut reader = BufReader::new(stream);
        match read_message(&mut reader, remaining) {
            Ok(FromGuest::Ready) => {}
            Ok(other) => return Err(self.error(&format!("said {other:?} instead of being ready"))),
            Err(e) => return Err(self.error(&format!("did not come up within {}s: {e:#}", BOOT_TIMEOUT.as_secs()))),
        }
        self.control = Some((reader, writer));
        Ok(())
    }

    fn running(&mut self) -> bool {
        self.qemu.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// An error about this node, with its console's tail.
    fn error(&self, what: &str) -> anyhow::Error {
        anyhow!(
            "node `{}`: {what}\nlast console lines (full log: {}):\n{}",
            self.name,
            self.console.display(),
            vm::console_tail(&self.console_tail)
        )
    }

    /// Sends `message` and returns the guest's answer, all of it within `timeout`.
    pub fn ask(&mut self, message: &ToGuest, timeout: Duration) -> Result<FromGuest> {
        let name = self.name.clone();
        let Some((reader, writer)) = &mut self.control else {
            bail!("node `{name}` is not running");
        };
        let line = format!("{}\n", serde_json::to_string(message)?);
        writer.write_all(line.as_bytes()).context("writing to the control channel")?;
        read_message(reader, timeout)
    }

    /// Runs `command` (with `sh -c`) and returns how it ended, within `timeout`.
    pub fn execute(&mut self, command: &str, timeout: Duration) -> Result<Outcome> {
        let name = self.name.clone();
        let Some((reader, writer)) = &mut self.control else {
            bail!("node `{name}` is not running (start it with start_all)");
        };
        let message = ToGuest::Run {
            argv: vec!["sh".into(), "-c".into(), command.into()],
            timeout_ms: timeout.as_millis() as u64,
        };
        let line = format!("{}\n", serde_json::to_string(&message)?);
        let answer = writer
            .write_all(line.as_bytes())
            .map_err(anyhow::Error::from)
            .and_then(|()| read_message(reader, timeout + ANSWER_GRACE));
        match answer {
            Ok(FromGuest::Done { exit, signal, timed_out, stdout, stderr }) => {
                let text = |b64: &str| String::from_utf8_lossy(&base64_decode(b64).unwrap_or_default()).into_owned();
                Ok(Outcome { exit, signal, timed_out, stdout: text(&stdout), stderr: text(&stderr) })
            }
            Ok(FromGuest::Failed { error }) => Err(self.error(&format!("`{command}` could not run: {error}"))),
            Ok(FromGuest::Ready) => Err(self.error(&format!("`{command}`: the guest said it was ready again"))),
            Err(e) => Err(self.error(&format!("`{command}`: no answer ({e:#})"))),
        }
    }

    fn failure(&self, command: &str, wanted: &str, o: &Outcome) -> anyhow::Error {
        self.error(&format!(
            "`{command}` {wanted}, but it ended with {}\n  stdout: {:?}\n  stderr: {:?}",
            o.status(),
            o.stdout,
            o.stderr
        ))
    }

    /// Runs `command`, which must exit 0 within the default timeout; its stdout.
    pub fn succeed(&mut self, command: &str) -> Result<String> {
        self.succeed_within(command, COMMAND_TIMEOUT)
    }

    /// Runs `command`, which must exit 0 within `timeout`; its stdout.
    pub fn succeed_within(&mut self, command: &str, timeout: Duration) -> Result<String> {
        let o = self.execute(command, timeout)?;
        if o.exit == Some(0) && !o.timed_out {
            Ok(o.stdout)
        } else {
            Err(self.failure(command, "should have succeeded", &o))
        }
    }

    /// Runs `command`, which must fail (a non-zero exit, a signal, or its timeout); its
    /// stderr.
    pub fn fail(&mut self, command: &str) -> Result<String> {
        self.fail_within(command, COMMAND_TIMEOUT)
    }

    /// Runs `command`, which must fail (a non-zero exit, a signal, or `timeout`); its stderr.
    pub fn fail_within(&mut self, command: &str, timeout: Duration) -> Result<String> {
        let o = self.execute(command, timeout)?;
        if o.exit == Some(0) && !o.timed_out {
            Err(self.failure(command, "should have failed", &o))
        } else {
            Ok(o.stderr)
        }
    }

    /// Runs `command` until it succeeds, for at most `timeout`; its stdout.
    pub fn wait_until_succeeds(&mut self, command: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
            let o = self.execute(command, left)?;
            if o.exit == Some(0) && !o.timed_out {
                return Ok(o.stdout);
            }
            if Instant::now() >= deadline {
                return Err(self.failure(command, &format!("should have succeeded within {}s", timeout.as_secs()), &o));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until something listens on TCP `port` (any address).
    pub fn wait_for_port(&mut self, port: u16, timeout: Duration) -> Result<()> {
        let cmd = format!("grep -qE ':{port:04X} [0-9A-F]+:0000 0A' /proc/net/tcp /proc/net/tcp6");
        self.wait_until_succeeds(&cmd, timeout).map(drop)
    }

    /// Waits until `path` exists.
    pub fn wait_for_file(&mut self, path: &str, timeout: Duration) -> Result<()> {
        self.wait_until_succeeds(&format!("test -e {}", crate::process::shell_quote(path)), timeout).map(drop)
    }

    /// Copies the file at `guest_path` on the node to `host_path`, which must not exist:
    /// it is made with `O_CREAT|O_EXCL|O_NOFOLLOW`, mode 0600 (put it in
    /// [`Driver::private_dir`]).
    pub fn copy_from_node(&mut self, guest_path: &str, host_path: &Path) -> Result<()> {
        let command = format!("cat {}", crate::process::shell_quote(guest_path));
        let name = self.name.clone();
        let Some((reader, writer)) = &mut self.control else { bail!("node `{name}` is not running") };
        let message = ToGuest::Run { argv: vec!["sh".into(), "-c".into(), command.clone()], timeout_ms: 60_000 };
        writer.write_all(format!("{}\n", serde_json::to_string(&message)?).as_bytes())?;
        match read_message(reader, Duration::from_secs(60) + ANSWER_GRACE)? {
            FromGuest::Done { exit: Some(0), stdout, .. } => {
                let bytes = base64_decode(&stdout).context("the guest's output is not base64")?;
                let mut file = crate::store::create_private_file(host_path)?;
                file.write_all(&bytes).with_context(|| format!("writing `{}`", host_path.display()))
            }
            other => Err(self.error(&format!("copying `{guest_path}` failed: {other:?}"))),
        }
    }

    /// Powers the node off cleanly and waits for its QEMU to end.
    pub fn shutdown(&mut self) -> Result<()> {
        if let Some((_, writer)) = &mut self.control {
            let line = format!("{}\n", serde_json::to_string(&ToGuest::PowerOff)?);
            let _ = writer.write_all(line.as_bytes());
        }
        self.control = None;
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.running() {
            if Instant::now() > deadline {
                return Err(self.error("did not power off within 60s"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.end_console();
        Ok(())
    }

    /// Kills the node's QEMU at once, as a power cut would.
    pub fn crash(&mut self) -> Result<()> {
        self.control = None;
        if let Some(child) = &mut self.qemu {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.end_console();
        Ok(())
    }

    /// Once QEMU has ended: the console's log is completed.
    fn end_console(&mut self) {
        if let Some(relay) = self.console_relay.take() {
            relay.finish();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.crash();
    }
}

/// The longest message a guest may send (a command's output travels in one line).
const MAX_MESSAGE: usize = 64 << 20;

/// Reads one message from the control channel, all of it within `timeout`: a guest that
/// sends its answer a byte at a time cannot hold the caller past it, nor past
/// [`MAX_MESSAGE`] bytes.
pub fn read_message(reader: &mut BufReader<UnixStream>, timeout: Duration) -> Result<FromGuest> {
    let deadline = Instant::now() + timeout;
    let mut line = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("no whole answer on the control channel within {}s ({} bytes came)", timeout.as_secs(), line.len());
        }
        reader.get_ref().set_read_timeout(Some(left)).context("setting the control channel's timeout")?;
        let buf = match reader.fill_buf() {
            Ok(buf) => buf,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("reading the control channel"),
        };
        if buf.is_empty() {
            bail!("the control channel closed (the node stopped?)");
        }
        let (take, whole) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        if line.len() + take > MAX_MESSAGE {
            bail!("a message longer than {MAX_MESSAGE} bytes on the control channel");
        }
        line.extend_from_slice(&buf[..take]);
        reader.consume(take);
        if whole {
            break;
        }
    }
    serde_json::from_slice(&line).map_err(|e| anyhow!("a garbled message on the control channel: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_that_drips_its_answer_cannot_hold_a_read_past_its_timeout() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let mut theirs = theirs;
            // One byte at a time, never a whole line, until the reader is gone.
            while theirs.write_all(b"{").is_ok() {
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(ours);
            let _ = tx.send(read_message(&mut reader, Duration::from_secs(1)).map_err(|e| format!("{e:#}")));
        });
        // A bound on liveness, far above the timeout: the read must end at all.
        let result = rx.recv_timeout(Duration::from_secs(60)).expect("the read outlived its timeout");
        let err = result.expect_err("a dripped half line is no message");
        assert!(err.contains("no whole answer on the control channel within 1s"), "{err}");
    }

    #[test]
    fn a_whole_message_is_read_and_a_closed_channel_said() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        theirs.write_all(format!("{}\n", serde_json::to_string(&FromGuest::Ready).unwrap()).as_bytes()).unwrap();
        drop(theirs);
        let mut reader = BufReader::new(ours);
        assert!(matches!(read_message(&mut reader, Duration::from_secs(5)), Ok(FromGuest::Ready)));
        let err = read_message(&mut reader, Duration::from_secs(5)).unwrap_err();
        assert!(format!("{err}").contains("closed"), "{err}");
    }
}
