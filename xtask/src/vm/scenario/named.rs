//! The named scenarios (`cargo xtask scenario NAME`; `--list` lists them).

use std::time::Duration;

use anyhow::{ensure, Result};
use os_configs::System;

use super::{Driver, Scenario};

/// Every named scenario.
pub fn all() -> Vec<Scenario> {
    vec![hello_pair(), hello_pair_broken()]
}

/// The scenario called `name`.
pub fn by_name(name: &str) -> Option<Scenario> {
    all().into_iter().find(|s| s.name == name)
}

/// Prints a command's process state: the signal masks its children inherit, whether it
/// leads its own session and process group, and a child's open descriptors (3 being
/// the directory `ls` reads).
const PROCESS_STATE: &str = "grep -E '^Sig(Blk|Ign):' /proc/self/status
read -r pid comm state ppid pgrp sid rest </proc/self/stat
if [ \"$pid\" = \"$pgrp\" ] && [ \"$pid\" = \"$sid\" ]; then echo 'leads its session and group'; \
else echo \"pid $pid, group $pgrp, session $sid\"; fi
echo descriptors $(ls /proc/self/fd)";

/// What [`PROCESS_STATE`] prints for a command started from a shell on a host.
const CLEAN_STATE: &str =
    "SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\nleads its session and group\ndescriptors 0 1 2 3\n";

/// The `hello` system with its service listening on every address (not only the
/// loopback), so other nodes reach it.
fn server() -> System {
    let mut system = os_configs::hello();
    for service in &mut system.services {
        if service.name == "hello" {
            service.args = vec!["7878".into(), "0.0.0.0".into()];
        }
    }
    system
}

/// A server runs `hello-service`; a client gets its answer by host name; with the client
/// cut off the network its request fails within its timeout, and once it is back, works.
pub fn hello_pair() -> Scenario {
    Scenario {
        name: "hello-pair".into(),
        description: "a client asks the hello service on a server node by name; the link is cut and restored".into(),
        nodes: vec![("server".into(), server()), ("client".into(), os_configs::minimal())],
        networks: vec![("lan".into(), vec!["server".into(), "client".into()])],
        script: |d: &mut Driver| -> Result<()> {
            d.start_all()?;
            d.node("server")?.wait_for_port(7878, Duration::from_secs(60))?;
            let answer = d.node("client")?.succeed("nc server 7878 </dev/null")?;
            ensure!(answer.starts_with("hello-service v1: "), "the client got {answer:?}");
            let state = d.node("client")?.succeed(PROCESS_STATE)?;
            ensure!(state == CLEAN_STATE, "a command's process state: {state:?}, not {CLEAN_STATE:?}");
            // The nodes' own /etc/hosts, with localhost added, and what every system has.
            d.node("client")?
                .succeed("grep -qw localhost /etc/hosts && grep -q '^nobody:' /etc/passwd && test -k /var/tmp")?;
            // The nodes reach each other and nothing else: one route, their network's.
            let routes = d.node("client")?.succeed("ip route")?;
            ensure!(routes.lines().count() == 1 && routes.starts_with("10.77.0.0/24 dev eth0"), "routes: {routes:?}");
            let log = d.private_dir().join("hello.log");
            d.node("server")?.copy_from_node("/var/log/hello.log", &log)?;
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let _ = std::fs::remove_file(&log);
            ensure!(text.contains("listening on port 7878"), "the server's log, copied: {text:?}");
            d.block("client")?;
            d.node("client")?.fail_within("nc -w 3 server 7878 </dev/null", Duration::from_secs(20))?;
            d.unblock("client")?;
            d.node("client")?.wait_until_succeeds("nc -w 3 server 7878 </dev/null", Duration::from_secs(60))?;
            d.node("client")?.shutdown()?;
            d.node("server")?.crash()?;
            Ok(())
        },
    }
}

/// Fails on purpose, to show what a failure looks like: the client asks a port nothing
/// listens on.
pub fn hello_pair_broken() -> Scenario {
    Scenario {
        name: "hello-pair-broken".into(),
        description: "fails on purpose: the client asks a port the server does not listen on".into(),
        script: |d: &mut Driver| -> Result<()> {
            d.start_all()?;
            d.node("server")?.wait_for_port(7878, Duration::from_secs(60))?;
            d.node("client")?.succeed("echo asking; nc -w 3 server 7879 </dev/null")?;
            Ok(())
        },
        ..hello_pair()
    }
}
