//! The virtual LANs of a scenario: a hub per LAN, in xtask, that each node's QEMU sends
//! its Ethernet frames to (a `dgram` netdev on unix sockets: no root, no bridge, no
//! route to anything else) and that repeats every frame to the other nodes on the LAN,
//! except to or from a node that is blocked.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};

/// One node's end of a LAN: the hub's socket and the node's (QEMU's) socket.
#[derive(Debug, Clone)]
pub struct Port {
    pub hub: PathBuf,
    pub qemu: PathBuf,
}

/// A running LAN.
pub struct Lan {
    pub ports: BTreeMap<String, Port>,
    blocked: Arc<Mutex<BTreeSet<String>>>,
}

impl Lan {
    /// Binds the hub's socket for every node in `dir` and starts repeating frames.
    pub fn start(dir: &Path, index: usize, name: &str, nodes: &[String]) -> Result<Lan> {
        let blocked: Arc<Mutex<BTreeSet<String>>> = Arc::default();
        let mut ports = BTreeMap::new();
        let mut sockets = Vec::new();
        for (i, node) in nodes.iter().enumerate() {
            let port =
                Port { hub: dir.join(format!("l{index}n{i}.hub")), qemu: dir.join(format!("l{index}n{i}.qemu")) };
            let socket = UnixDatagram::bind(&port.hub)
                .with_context(|| format!("binding the hub of network `{name}` at `{}`", port.hub.display()))?;
            sockets.push((node.clone(), Arc::new(socket), port.qemu.clone()));
            ports.insert(node.clone(), port);
        }
        let sockets = Arc::new(sockets);
        for i in 0..sockets.len() {
            let (sockets, blocked) = (sockets.clone(), blocked.clone());
            std::thread::spawn(move || repeat(&sockets, i, &blocked));
        }
        Ok(Lan { ports, blocked })
    }

    /// Cuts `node` off the LAN (frames to and from it are dropped), or puts it back.
    pub fn set_blocked(&self, node: &str, blocked: bool) {
        let mut set = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
        if blocked {
            set.insert(node.to_string());
        } else {
            set.remove(node);
        }
    }
}

/// Repeats what node `from` sends to every other node, unless either end is blocked.
/// Runs as long as xtask does.
fn repeat(sockets: &[(String, Arc<UnixDatagram>, PathBuf)], from: usize, blocked: &Mutex<BTreeSet<String>>) {
    let mut frame = vec![0u8; 65536];
    let (name, socket, _) = &sockets[from];
    while let Ok(n) = socket.recv(&mut frame) {
        let blocked = blocked.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if blocked.contains(name) {
            continue;
        }
        for (to, (other, out, qemu)) in sockets.iter().enumerate() {
            // Sent from the receiver's own hub socket, the address its QEMU expects. Never
            // waiting: a node whose QEMU does not read (still being restored, or stopped)
            // has what is sent to it dropped, as a switch drops frames for a full port,
            // instead of holding up this node's frames to every other node.
            if to != from && !blocked.contains(other) {
                let _ = send_now(out, &frame[..n], qemu);
            }
        }
    }
}

/// Sends `frame` to `to` from `socket` unless that would wait.
fn send_now(socket: &UnixDatagram, frame: &[u8], to: &Path) -> nix::Result<usize> {
    use nix::sys::socket::{sendto, MsgFlags, UnixAddr};
    sendto(socket.as_raw_fd(), frame, &UnixAddr::new(to)?, MsgFlags::MSG_DONTWAIT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A node whose QEMU does not read (not restored yet, or stopped) must not stop the
    /// LAN: what is sent to it is dropped, as a switch drops frames for a full port.
    #[test]
    fn a_node_that_does_not_read_does_not_stop_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let nodes: Vec<String> = ["a", "stalled", "c"].iter().map(|s| s.to_string()).collect();
        let lan = Lan::start(dir.path(), 0, "lan", &nodes).unwrap();
        let bind = |node: &str| {
            let port = &lan.ports[node];
            // As QEMU's `dgram` netdev: bound, not connected, sending to the hub's address.
            (UnixDatagram::bind(&port.qemu).unwrap(), port.hub.clone())
        };
        let (a, _stalled, c) = (bind("a"), bind("stalled"), bind("c"));
        c.0.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 64];
        // Far more than a unix datagram socket's queue holds.
        for i in 0..200u32 {
            a.0.send_to(&i.to_ne_bytes(), &a.1).unwrap();
            let n = c.0.recv(&mut buf).unwrap_or_else(|e| panic!("frame {i} did not reach c: {e}"));
            assert_eq!(&buf[..n], &i.to_ne_bytes());
        }
    }
}
