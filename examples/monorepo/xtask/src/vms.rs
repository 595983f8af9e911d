//! This workspace's systems and scenarios: `greeter`, a VM running the `greeter` service
//! with Debian's jq beside it, and `greeter-pair`, a client node asking a server node.

use std::time::Duration;

use anyhow::{ensure, Result};
use vm_xtask::systems::{minimal, with_debian, Package, Ready, Service, System};
use vm_xtask::{Driver, Scenario};

/// The port the greeter listens on.
const PORT: u16 = 7070;

/// The systems `cargo xtask systems` lists.
pub fn systems() -> Vec<System> {
    vec![greeter("127.0.0.1")]
}

/// The scenarios `cargo xtask scenario` runs.
pub fn scenarios() -> Vec<Scenario> {
    vec![greeter_pair()]
}

/// Debian's kernel and busybox, Debian's jq, and the `greeter` crate of this workspace
/// running as a service on `address`, port [`PORT`].
fn greeter(address: &str) -> System {
    let mut system = with_debian("greeter", "the greeter service on port 7070, with Debian's jq", &["jq"]);
    system.hostname = "greeter-vm".into();
    system.packages.push(Package::Crate { package: "greeter".into(), bin: "greeter".into() });
    let mut service = Service::new("greeter", "greeter");
    service.args = vec![format!("{address}:{PORT}")];
    service.ready = Ready::TcpPort(PORT);
    system.services.push(service);
    system
}

/// A server node runs the greeter on every address; a client node asks it by host name.
fn greeter_pair() -> Scenario {
    Scenario {
        name: "greeter-pair".into(),
        description: "a client node asks the greeter on a server node by host name".into(),
        nodes: vec![("server".into(), greeter("0.0.0.0")), ("client".into(), minimal())],
        networks: vec![("lan".into(), vec!["server".into(), "client".into()])],
        script: |d: &mut Driver| -> Result<()> {
            d.start_all()?;
            d.node("server")?.wait_for_port(PORT, Duration::from_secs(60))?;
            let answer = d.node("client")?.succeed(&format!("nc server {PORT} </dev/null"))?;
            ensure!(answer == "hello from greeter\n", "the client got {answer:?}");
            Ok(())
        },
    }
}
