//! Every program xtask starts, declared in one place with where it comes from: a Debian
//! package the host has (docs/running.md lists what a host needs), the Rust toolchain, or a
//! Debian package locked in `vm.lock` and run from the store. A unit test reads xtask's
//! sources and fails when code starts a program (a string literal given to
//! `Command::new(` or `command(`, the first word of an xshell `cmd!`, or a `host::` tool)
//! that is not declared here.

/// Where a program comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The host, from this Debian package. `essential` packages are on every Debian host;
    /// the others (QEMU's) xtask installs as root or names in its error.
    Host { package: &'static str, essential: bool },
    /// The Rust toolchain the workspace is built with.
    Toolchain,
    /// This Debian package, pinned in `vm.lock`, unpacked in the store and run from there
    /// (through the store's libc6 loader for dynamically linked programs).
    Store { package: &'static str },
    /// A program xtask itself made: the xtask binary, a store item's script.
    Built,
}

/// A program xtask starts.
#[derive(Debug, Clone, Copy)]
pub struct Program {
    /// Its name on `PATH`, or its absolute path.
    pub name: &'static str,
    pub source: Source,
    /// What xtask runs it for.
    pub used_for: &'static str,
}

const fn host(name: &'static str, package: &'static str, essential: bool, used_for: &'static str) -> Program {
    Program { name, source: Source::Host { package, essential }, used_for }
}

const fn store(name: &'static str, package: &'static str, used_for: &'static str) -> Program {
    Program { name, source: Source::Store { package }, used_for }
}

/// The programs.
pub const PROGRAMS: &[Program] = &[
    host("qemu-system-x86_64", "qemu-system-x86", false, "every VM (the host's; see the store's below)"),
    host(
        "qemu-system-aarch64",
        "qemu-system-arm",
        false,
        "aarch64 guests, when the host has it (else the store's, below; never installed)",
    ),
    host("qemu-img", "qemu-utils", false, "qcow2 images and disks"),
    host("apt-get", "apt", true, "xtask's own Debian index (`apt-get update`, no root), closures (`--simulate`)"),
    host("apt-cache", "apt", true, "resolving a package not locked yet, `lock --update`, over xtask's index"),
    host("/usr/lib/apt/apt-helper", "apt", true, "fetching a locked package by its pool path"),
    host("dpkg-deb", "dpkg", true, "unpacking Debian packages (it runs tar)"),
    host("ldconfig", "libc-bin", true, "finding a host program's libraries (`Package::Host`)"),
    host("unshare", "util-linux", true, "mke2fs in a user namespace (else the staging tree is hard links)"),
    host("sh", "dash", true, "the bind mounts in that namespace"),
    host("git", "git", false, "a workspace's sources for test VMs (`git ls-files`; without it, a walk)"),
    host(
        "/usr/libexec/virtiofsd",
        "virtiofsd",
        false,
        "the workspace share of `test` over virtiofs (through `unshare`; else QEMU's below, else 9p)",
    ),
    host("/usr/lib/qemu/virtiofsd", "qemu-system-common", false, "the same, QEMU 7.2's virtiofsd"),
    host("timeout", "coreutils", true, "bench: the floor's bare QEMU"),
    host("true", "coreutils", true, "bench: the cache-hit floor"),
    Program { name: "cargo", source: Source::Toolchain, used_for: "the guest helper and workspace crates" },
    Program { name: "cc", source: Source::Toolchain, used_for: "tests only: a C fixture with an RPATH" },
    Program {
        name: "rustc",
        source: Source::Toolchain,
        used_for: "aarch64 guests: whether its standard library is there",
    },
    Program {
        name: "rustup",
        source: Source::Toolchain,
        used_for: "aarch64 guests: `rustup target add aarch64-unknown-linux-musl` when it is not there",
    },
    store("busybox", "busybox-static", "the guest's userland; `busybox --list` for its links"),
    store("mke2fs", "e2fsprogs", "image file systems"),
    store("e2fsck", "e2fsprogs", "checking VM-built images"),
    store("debugfs", "e2fsprogs", "owners of the shared-store image's homes"),
    store("sfdisk", "fdisk", "partition tables"),
    store("grub-mkimage", "grub-common", "GRUB's core.img and UEFI image"),
    store("mkfs.fat", "dosfstools", "the EFI system partition of UEFI images"),
    store("mmd", "mtools", "the EFI system partition of UEFI images"),
    store("mcopy", "mtools", "the EFI system partition of UEFI images"),
    store("ld-linux-x86-64.so.2", "libc6", "the loader the store's tools run through"),
    store(
        "qemu-system-x86_64",
        "qemu-system-x86",
        "every VM when the host has no QEMU and xtask is not root, or with `--qemu store` (with its closure \
            and firmware)",
    ),
    store(
        "qemu-system-aarch64",
        "qemu-system-arm",
        "aarch64 guests when the host has no `qemu-system-aarch64` (with its closure)",
    ),
    store(
        "virtiofsd",
        "qemu-system-x86",
        "the workspace share over virtiofs when the VMs run the store's QEMU (its closure's qemu-system-common)",
    ),
    store("docker-registry", "docker-registry", "a local OCI registry (`store registry-program`; the tests)"),
    store("gdb", "gdb-minimal", "the debugger to attach to `run-vm --gdb` and `test --debug` (`store gdb-program`)"),
    Program { name: "xtask", source: Source::Built, used_for: "bench: the subcommands measured" },
    Program {
        name: "xtask-registry",
        source: Source::Built,
        used_for: "the OCI registry client of `store push`/`pull` and substitutes (built from the \
                   `vm-xtask-registry` crate's source)",
    },
];

/// The declaration of `name` (a name, or an absolute path whose file name is declared
/// for the host).
pub fn declared(name: &str) -> Option<&'static Program> {
    PROGRAMS.iter().find(|p| p.name == name).or_else(|| {
        let base = name.rsplit('/').next()?;
        name.starts_with('/')
            .then(|| PROGRAMS.iter().find(|p| p.name == base && matches!(p.source, Source::Host { .. })))
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// Programs started in `text`: string literals given to `Command::new(` or
    /// `command(`, the first word of an xshell `cmd!(SHELL, "...")` unless it is
    /// interpolated, and `host::NAME.program` tools (as `host::NAME`).
    fn started(text: &str) -> Vec<String> {
        let mut found = Vec::new();
        for (i, _) in text.match_indices("cmd!(") {
            let rest = &text[i..];
            let literal = rest.split_once('"').and_then(|(_, r)| r.split('"').next()).unwrap_or_default();
            let program = literal.split_whitespace().next().unwrap_or_default();
            if !program.is_empty() && !program.starts_with('{') {
                found.push(program.to_string());
            }
        }
        for opener in ["Command::new(", "command("] {
            for (i, _) in text.match_indices(opener) {
                let rest = &text[i + opener.len()..];
                if let Some(literal) = rest.strip_prefix('"').and_then(|r| r.split('"').next()) {
                    found.push(literal.to_string());
                } else if let Some(tool) = rest.strip_prefix("host::").or_else(|| rest.strip_prefix("crate::host::")) {
                    if let Some(name) = tool.strip_suffix_at(".program") {
                        found.push(format!("host::{name}"));
                    }
                }
            }
        }
        found
    }

    trait StripSuffixAt {
        fn strip_suffix_at(&self, suffix: &str) -> Option<&str>;
    }

    impl StripSuffixAt for str {
        /// The identifier before `suffix` when `self` starts with `IDENT` + `suffix`.
        fn strip_suffix_at(&self, suffix: &str) -> Option<&str> {
            let end = self.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))?;
            self[end..].starts_with(suffix).then(|| &self[..end])
        }
    }

    fn sources(dir: &Path, out: &mut Vec<(String, String)>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push((path.display().to_string(), std::fs::read_to_string(&path).unwrap()));
            }
        }
    }

    /// The host tools `host.rs` names, by constant.
    fn host_tool(name: &str) -> Option<crate::host::Tool> {
        use crate::host::*;
        Some(match name {
            "QEMU_SYSTEM" => QEMU_SYSTEM,
            "QEMU_IMG" => QEMU_IMG,
            "APT_GET" => APT_GET,
            "DPKG_DEB" => DPKG_DEB,
            _ => return None,
        })
    }

    #[test]
    fn every_program_started_is_declared() {
        let mut files = Vec::new();
        sources(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut files);
        assert!(files.len() > 20, "found only {} source files", files.len());
        let mut undeclared = Vec::new();
        let mut seen = 0;
        for (file, text) in &files {
            // This file's own examples are not programs started.
            if file.ends_with("programs.rs") {
                continue;
            }
            for program in started(text) {
                seen += 1;
                let name = match program.strip_prefix("host::") {
                    Some(constant) => match host_tool(constant) {
                        Some(tool) => tool.program.to_string(),
                        None => {
                            undeclared.push(format!("{file}: `host::{constant}` is not a known host tool"));
                            continue;
                        }
                    },
                    None => program,
                };
                if declared(&name).is_none() {
                    undeclared.push(format!("{file}: `{name}`"));
                }
            }
        }
        assert!(seen > 15, "the scan found only {seen} programs started; is it still looking at the right code?");
        assert!(undeclared.is_empty(), "programs started but not declared in programs::PROGRAMS: {undeclared:#?}");
    }

    #[test]
    fn the_scan_finds_what_it_should() {
        let code = r#"let a = Command::new("frobnicate"); crate::process::command("cp").arg("x");
                      Command::new(host::QEMU_IMG.program); tools.command("sfdisk")?; Command::new(&dynamic);
                      cmd!(sh, "timeout 300 {qemu}"); cmd!(sh, "{xtask} vm-image");"#;
        assert_eq!(started(code), ["timeout", "frobnicate", "host::QEMU_IMG", "cp", "sfdisk"]);
        assert!(declared("frobnicate").is_none());
        assert!(declared("/sbin/ldconfig").is_some());
        assert!(declared("/usr/sbin/mke2fs").is_none(), "a store program must not be taken from the host");
    }

    #[test]
    fn declarations_agree_with_the_code() {
        for program in PROGRAMS {
            assert!(!program.used_for.is_empty(), "`{}` says not what it is used for", program.name);
        }
        for constant in ["QEMU_SYSTEM", "QEMU_IMG", "APT_GET", "DPKG_DEB"] {
            let tool = host_tool(constant).unwrap();
            let program = declared(tool.program).unwrap_or_else(|| panic!("`{}` is not declared", tool.program));
            assert!(
                matches!(program.source, Source::Host { package, .. } if package == tool.package),
                "{program:?} vs host::{constant}"
            );
        }
        for (name, package) in crate::debian::image_tools::PROGRAMS {
            let program = declared(name).unwrap_or_else(|| panic!("image tool `{name}` is not declared"));
            assert_eq!(program.source, Source::Store { package }, "{name}");
        }
        let wanted = crate::debian::lock::wanted(&[]);
        for program in PROGRAMS {
            if let Source::Store { package } = program.source {
                assert!(
                    wanted.iter().any(|w| w == package),
                    "`{package}` ({}) is not one the lock holds",
                    program.name
                );
            }
        }
        assert_eq!(declared(crate::debian::APT_HELPER).map(|p| p.name), Some(crate::debian::APT_HELPER));
    }
}
