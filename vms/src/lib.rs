//! This repository's own systems and scenarios: what `cargo xtask systems` and `cargo
//! xtask scenario --list` show here, declared as any workspace declares its own and handed
//! to the engine by `xtask/src/main.rs` ([`catalog`]).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Result};
use vm_xtask::systems::{
    debian_base, minimal, with_debian, Bootloader, Device, EtcFile, FileSystem, Group, Package, Ready, Restart,
    Service, System, User,
};
use vm_xtask::{Catalog, Driver, Scenario};

/// This repository's systems and scenarios; `minimal` is the default system.
pub fn catalog() -> Catalog {
    Catalog::new().systems(systems()).scenarios(scenarios()).default_system("minimal")
}

/// The systems, in the order `cargo xtask systems` lists them.
pub fn systems() -> Vec<System> {
    let mut all = vec![minimal(), debian_base(), hello()];
    all.extend(debian_examples());
    all
}

/// The scenarios.
pub fn scenarios() -> Vec<Scenario> {
    vec![hello_pair(), hello_pair_broken(), sixteen()]
}

/// The systems the end-to-end tests boot besides [`systems`]: made for one test each, or
/// made to be refused (`invalid-...`). Registered only by the tests' own xtask
/// (`tests/fixtures/xtask.rs`).
pub fn test_fixtures() -> Vec<System> {
    vec![
        boot_check(),
        System {
            name: "bios-only".to_string(),
            description: "(for tests) minimal with GRUB for BIOS only: no UEFI image".to_string(),
            bootloader: Bootloader::GrubBios,
            ..minimal()
        },
        System {
            name: "uefi-only".to_string(),
            description: "(for tests) minimal with GRUB for UEFI only: its images are for UEFI".to_string(),
            bootloader: Bootloader::GrubEfi,
            ..minimal()
        },
        host_findmnt(),
        fs_order(),
        data_disk(),
        with_debian(
            "debian-jq-strace",
            "(for tests) two Debian packages sharing libraries: jq and strace",
            &["jq", "strace"],
        ),
        invalid_no_root(),
        invalid_module(),
        with_debian(
            "invalid-debian-conflict",
            "(for tests) two Debian packages that conflict (busybox, busybox-static): refused before anything is built",
            &["busybox", "busybox-static"],
        ),
        with_debian(
            "invalid-debian-unresolvable",
            "(for tests) a Debian package whose dependency nothing provides (`xtask-fixture-app`, from a test's own \
             apt repository): refused before anything is built",
            &["xtask-fixture-app"],
        ),
        System {
            initrd_modules: vec!["kvm_intel".to_string()],
            ..with_debian(
                "invalid-on-aarch64",
                "(for tests) a Debian package (grub-pc-bin) and an initrd module (kvm_intel) that amd64 has and arm64 \
                 has not: refused with --arch aarch64",
                &["grub-pc-bin"],
            )
        },
        with_debian(
            "invalid-debian-unknown",
            "(for tests) a Debian package apt does not know: refused before anything is built",
            &["jq", "no-such-package-xtask"],
        ),
    ]
}

/// The port the `hello` system's service listens on.
pub const HELLO_PORT: u16 = 7878;

/// A system running a service built from this workspace (`examples/hello-service`):
/// it answers on TCP port [`HELLO_PORT`] with its greeting, runs as the user `hello`,
/// and has a user `alice` to log in as.
pub fn hello() -> System {
    let mut service = Service::new("hello", "hello-service");
    service.args = vec![HELLO_PORT.to_string()];
    service.env = vec![("HELLO_GREETING_FILE".to_string(), "/etc/hello/greeting".to_string())];
    service.user = "hello".to_string();
    service.restart = Restart::Always;
    service.ready = Ready::TcpPort(HELLO_PORT);
    System {
        hostname: "hello-vm".to_string(),
        packages: vec![
            Package::Busybox,
            Package::Crate { package: "hello-service".to_string(), bin: "hello-service".to_string() },
        ],
        services: vec![service],
        groups: vec![Group { name: "users".to_string(), gid: 100 }, Group { name: "hello".to_string(), gid: 900 }],
        users: vec![
            User {
                comment: "the hello service".to_string(),
                home: "/var/lib/hello".to_string(),
                ..User::new("hello", 900, "hello")
            },
            User {
                comment: "Alice".to_string(),
                supplementary_groups: vec!["hello".to_string()],
                ..User::new("alice", 1000, "users")
            },
        ],
        etc_files: vec![EtcFile {
            path: "hello/greeting".to_string(),
            contents: "hello from the VM".to_string(),
            mode: 0o644,
        }],
        file_systems: vec![
            FileSystem::block("/", Device::Label("vmroot".to_string()), "ext4"),
            FileSystem::tmpfs("/var/cache/hello"),
        ],
        ..System::base(
            "hello",
            "minimal plus a service built from this workspace (examples/hello-service) on port 7878",
        )
    }
}

/// The example systems with programs from Debian's packages.
pub fn debian_examples() -> Vec<System> {
    vec![
        with_debian("debian-jq", "minimal plus Debian's jq (with libjq1, libonig5 and libc6)", &["jq"]),
        with_debian("debian-python3", "minimal plus Debian's python3 and its standard library", &["python3"]),
        with_debian("debian-iproute2", "minimal plus Debian's iproute2 (`ip`, `ss`, ...)", &["iproute2"]),
        with_debian("debian-e2fsprogs", "minimal plus Debian's e2fsprogs (`mke2fs`, `e2fsck`, ...)", &["e2fsprogs"]),
        with_debian("debian-strace", "minimal plus Debian's strace", &["strace"]),
        with_debian("debian-mawk", "minimal plus Debian's mawk, as `awk` (its update-alternatives link)", &["mawk"]),
    ]
}

/// `minimal`, which, booted from a disk image, counts the boot on its root file system,
/// prints a marker line (`vm-image boot-check: ok ...`) and powers off: for tests of
/// `cargo xtask vm-image`.
pub fn boot_check() -> System {
    System {
        name: "boot-check".to_string(),
        description: "minimal; from a disk image: print a boot marker and power off (for tests)".to_string(),
        kernel_args: vec!["vm.boot-check".to_string()],
        ..minimal()
    }
}

/// `minimal` plus a program from the host with its shared libraries: `findmnt` (from
/// util-linux, an essential package every Debian host has).
pub fn host_findmnt() -> System {
    System {
        packages: vec![Package::Busybox, Package::Host { path: PathBuf::from("/usr/bin/findmnt") }],
        ..System::base("host-findmnt", "minimal plus the host's /usr/bin/findmnt with its shared-library closure")
    }
}

/// `minimal` with a file system needed for boot (`/early`) and one that is not
/// (`/late`), and a service that writes, when it starts, which of the two is mounted
/// (`/run/probe`: a count per line): for tests of the order.
pub fn fs_order() -> System {
    let mut probe = Service::new("probe", "sh");
    probe.args = vec![
        "-c".to_string(),
        "{ grep -c ' /early ' /proc/mounts; grep -c ' /late ' /proc/mounts; } > /run/probe.tmp; \
         mv /run/probe.tmp /run/probe; exec sleep 2147483647"
            .to_string(),
    ];
    probe.ready = Ready::File("/run/probe".to_string());
    System {
        packages: vec![Package::Busybox],
        services: vec![probe],
        file_systems: vec![
            FileSystem::block("/", Device::Label("vmroot".to_string()), "ext4"),
            FileSystem { needed_for_boot: true, ..FileSystem::tmpfs("/early") },
            FileSystem::tmpfs("/late"),
        ],
        ..System::base(
            "fs-order",
            "(for tests) a file system needed for boot, mounted before the services, and one mounted after them",
        )
    }
}

/// `minimal` with a second disk: the ext4 file system labelled `vmdata`, checked and
/// mounted on `/data` (a disk image's; `run-vm` drops it): for tests.
pub fn data_disk() -> System {
    System {
        packages: vec![Package::Busybox],
        file_systems: vec![
            FileSystem::block("/", Device::Label("vmroot".to_string()), "ext4"),
            FileSystem::block("/data", Device::Label("vmdata".to_string()), "ext4"),
        ],
        ..System::base("data-disk", "(for tests) minimal plus a disk labelled vmdata, checked and mounted on /data")
    }
}

/// A system that cannot work: it has no root file system (for tests of validation).
pub fn invalid_no_root() -> System {
    System {
        file_systems: vec![FileSystem::tmpfs("/scratch")],
        packages: vec![Package::Busybox],
        ..System::base("invalid-no-root", "(for tests) no root file system: refused before anything is built")
    }
}

/// A system that cannot work: its initrd module is not in the kernel (for tests).
pub fn invalid_module() -> System {
    System {
        initrd_modules: vec!["no_such_module".to_string()],
        packages: vec![Package::Busybox],
        ..System::base(
            "invalid-module",
            "(for tests) an initrd module the kernel lacks: refused before anything is built",
        )
    }
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
    let mut system = hello();
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
        nodes: vec![("server".into(), server()), ("client".into(), minimal())],
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
            // Its own hardware address, though restored from a snapshot of its system.
            let mac = d.node("client")?.succeed("cat /sys/class/net/eth0/address")?;
            ensure!(mac.trim() == "52:54:00:77:00:02", "the client's hardware address: {mac:?}");
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

/// The nodes of [`sixteen`].
const SIXTEEN: usize = 16;

fn sixteen_name(i: usize) -> String {
    format!("node{:02}", i % SIXTEEN + 1)
}

/// Sixteen hello servers on one network, each asked by another by name: a larger
/// scenario's start (`cargo xtask bench --only scenario`).
pub fn sixteen() -> Scenario {
    let names: Vec<String> = (0..SIXTEEN).map(sixteen_name).collect();
    Scenario {
        name: "sixteen".into(),
        description: "sixteen hello servers on one network, each asked by the next by name".into(),
        nodes: names.iter().map(|n| (n.clone(), server())).collect(),
        networks: vec![("lan".into(), names)],
        script: |d: &mut Driver| -> Result<()> {
            d.start_all()?;
            for i in 0..SIXTEEN {
                d.node(&sixteen_name(i))?.wait_for_port(7878, Duration::from_secs(60))?;
            }
            // Restored from one snapshot, each has its own hardware address.
            let mut macs = std::collections::BTreeSet::new();
            for i in 0..SIXTEEN {
                macs.insert(d.node(&sixteen_name(i))?.succeed("cat /sys/class/net/eth0/address")?);
            }
            ensure!(macs.len() == SIXTEEN, "the nodes' hardware addresses are not all different: {macs:?}");
            for i in 0..SIXTEEN {
                let (node, asked) = (sixteen_name(i), sixteen_name(i + 1));
                let answer = d.node(&node)?.succeed(&format!("nc {asked} 7878 </dev/null"))?;
                ensure!(answer.starts_with("hello-service v1: "), "{node} asked {asked} and got {answer:?}");
            }
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
            // Left for a replay of the failure to find.
            d.node("client")?.succeed("echo about to ask port 7879 > /tmp/before-failing")?;
            d.node("client")?.succeed("echo asking; nc -w 3 server 7879 </dev/null")?;
            Ok(())
        },
        ..hello_pair()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_catalog_is_usable_and_lists_no_test_fixture() {
        assert!(catalog().problems().is_empty(), "{:?}", catalog().problems());
        let all = Catalog::new().systems(systems()).systems(test_fixtures());
        assert!(all.problems().is_empty(), "{:?}", all.problems());
        for system in systems() {
            assert!(!system.description.contains("(for tests)"), "{}", system.name);
        }
    }
}
