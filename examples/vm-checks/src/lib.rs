//! Helpers for tests that only pass inside a VM of the `hello` system
//! (`cargo xtask test --system hello -p vm-checks -- --ignored`): each test first makes
//! sure it is there, and fails with a message saying how to run it otherwise.

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

/// The `hello` system's host name.
pub const HELLO_HOSTNAME: &str = "hello-vm";
/// Where the `hello` system's service listens.
pub const HELLO_PORT: u16 = 7878;
/// How to run these tests.
pub const HOW: &str = "run them in the VM: cargo xtask test --system hello -p vm-checks -- --ignored";

/// The host name, from the kernel.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_string()
}

/// Panics, saying how to run the tests, unless this runs in the `hello` VM.
pub fn require_hello_vm() {
    let name = hostname();
    assert_eq!(name, HELLO_HOSTNAME, "this runs on `{name}`, not in the `hello` VM; {HOW}");
}

/// The `hello` service's answer, read within a few seconds (never a hang).
pub fn ask_hello_service() -> Result<String, String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, HELLO_PORT));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("nothing answers on {addr} ({e}); {HOW}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).map_err(|e| format!("reading from {addr}: {e}"))?;
    Ok(answer)
}
