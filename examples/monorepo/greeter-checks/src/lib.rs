//! Helpers for the tests that need the `greeter` VM (`cargo xtask test --system greeter
//! -p greeter-checks -- --ignored`): each test first makes sure it runs there, and fails
//! saying how to run it otherwise.

use std::io::Read;
use std::net::TcpStream;
use std::time::Duration;

/// How to run these tests.
pub const HOW: &str = "run them in the VM: cargo xtask test --system greeter -p greeter-checks -- --ignored";

/// Panics, saying how to run the tests, unless this runs in the `greeter` VM.
pub fn require_greeter_vm() {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    assert_eq!(name.trim(), "greeter-vm", "this runs on `{}`, not in the `greeter` VM; {HOW}", name.trim());
}

/// The greeter's answer on 127.0.0.1:7070, read within a few seconds (never a hang).
pub fn ask_greeter() -> Result<String, String> {
    let mut stream = TcpStream::connect_timeout(&([127, 0, 0, 1], 7070).into(), Duration::from_secs(5))
        .map_err(|e| format!("nothing answers on port 7070 ({e}); {HOW}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).map_err(|e| e.to_string())?;
    Ok(answer)
}
