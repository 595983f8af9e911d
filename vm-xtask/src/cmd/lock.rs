//! `cargo xtask lock [--update [PACKAGE...]]`: the workspace's lock file `vm.lock`.
//! Without `--update`, adds every package the named systems and the image tools use that
//! it lacks; with it, fetches xtask's own Debian index again, moves pins forward to what
//! it offers now and prints what changed (package, old and new version, what uses it).
//! Either way, the dependency closure of every named system's Debian packages is locked
//! too. No root is needed: the index is xtask's own ([`debian::index`]).

use anyhow::{Context, Result};

use crate::debian::{self, lock};

#[derive(Debug, Clone, clap::Args)]
pub struct Lock {
    /// Re-resolve the pins (all, or the PACKAGEs given) to the versions Debian's mirrors
    /// offer now (fetching xtask's own Debian index again).
    #[arg(long)]
    pub update: bool,
    /// With --update: only these packages (a package not locked yet is added).
    #[arg(requires = "update")]
    pub packages: Vec<String>,
}

impl Lock {
    pub fn run(self) -> Result<i32> {
        let path = lock::path();
        if self.update {
            let names: Vec<String> =
                if self.packages.is_empty() { lock::read(&path)?.into_keys().collect() } else { self.packages.clone() };
            debian::index::Index::current()?.refresh("`lock --update` asks for what the mirrors offer now")?;
            let resolved = debian::resolve_many(&names)?;
            let changes = lock::update(&names, |name| resolved.get(name).cloned().context("not resolved"))?;
            lock_closures()?;
            if changes.is_empty() {
                eprintln!("{}: no changes", path.display());
            }
            let pins = lock::snapshot()?;
            for (name, change) in changes {
                let users = users(&pins, &name);
                let users = if users.is_empty() { String::new() } else { format!(" (used by {})", users.join(", ")) };
                println!("{change}{users}");
            }
        } else {
            let locked = lock::read(&path)?;
            let missing: Vec<String> =
                lock::wanted(&locked_systems()).into_iter().filter(|n| !locked.contains_key(n)).collect();
            let resolved = debian::resolve_many(&missing)?;
            let added = lock::fill(&missing, |name| resolved.get(name).cloned().context("not resolved"))?;
            if added.is_empty() {
                eprintln!("{}: every package the systems and image tools use is locked", path.display());
            }
            lock_closures()?;
        }
        Ok(0)
    }
}

/// The workspace's named systems whose packages the lock holds: all but those made to be
/// refused (`invalid-...`), which ask for what cannot be locked.
fn locked_systems() -> Vec<os_configs::System> {
    crate::Catalog::current().all_systems().iter().filter(|s| !s.name.starts_with("invalid-")).cloned().collect()
}

/// Locks the dependency closure of each named system's Debian packages (resolving those
/// the lock lacks, or whose pins moved).
fn lock_closures() -> Result<()> {
    let qemu = crate::debian::qemu::PACKAGE.to_string();
    debian::closure::closure(&[qemu]).context("locking QEMU's Debian packages (`--qemu store`)")?;
    let qemu = crate::debian::qemu::AARCH64.package.to_string();
    debian::closure::closure(&[qemu]).context("locking the Debian packages of QEMU for aarch64 guests")?;
    for package in [crate::debian::gdb::PACKAGE, crate::debian::gdb::SERVER_PACKAGE] {
        debian::closure::closure(&[package.to_string()])
            .with_context(|| format!("locking the Debian packages of `{package}` (`--gdb`, `--debug`)"))?;
    }
    for system in locked_systems() {
        let roots = crate::lower::system::debian_packages(&system);
        if !roots.is_empty() {
            debian::closure::closure(&roots)
                .with_context(|| format!("locking the Debian packages of `{}`", system.name))?;
        }
    }
    Ok(())
}

/// What uses the package locked as `name`: the named systems whose Debian packages,
/// kernel or busybox have it in their closure, the image tools, QEMU from the store,
/// docker-registry, gdb and gdbserver.
fn users(pins: &lock::Pins, name: &str) -> Vec<String> {
    let package = pins.get(name).map(|p| p.package.clone()).unwrap_or_else(|| name.to_string());
    let uses = |roots: Vec<String>| match debian::closure::walk(pins, &roots) {
        Some(closure) => closure.iter().any(|(n, p)| n == name || p.package == package),
        None => roots.iter().any(|r| r == name),
    };
    let mut users = Vec::new();
    for system in locked_systems() {
        let named = |package: &str| debian::qualified(package, system.arch);
        let mut roots = crate::lower::system::debian_packages(&system);
        if !roots.is_empty() {
            roots.push(named(debian::closure::LIBC));
        }
        if let os_configs::Kernel::Debian { package } = &system.kernel {
            roots.push(named(&debian::kernel_package(package, system.arch)));
        }
        if system.packages.iter().any(|p| matches!(p, os_configs::Package::Busybox)) {
            roots.push(named(crate::debian::lock::BUSYBOX_PACKAGE));
        }
        if uses(roots) {
            users.push(format!("system {}", system.name));
        }
    }
    if uses(crate::debian::image_tools::PACKAGES.iter().map(|p| p.to_string()).collect()) {
        users.push("the image tools".to_string());
    }
    if uses(crate::debian::image_tools::UEFI_PACKAGES.iter().map(|p| p.to_string()).collect()) {
        users.push("UEFI images".to_string());
    }
    if uses(vec![crate::debian::qemu::PACKAGE.to_string(), debian::closure::LIBC.to_string()]) {
        users.push("QEMU from the store".to_string());
    }
    if uses(vec![crate::debian::qemu::AARCH64.package.to_string(), debian::closure::LIBC.to_string()]) {
        users.push("QEMU for aarch64 guests from the store".to_string());
    }
    if uses(vec![crate::debian::registry_server::PACKAGE.to_string()]) {
        users.push("docker-registry".to_string());
    }
    if uses(vec![crate::debian::gdb::PACKAGE.to_string()]) {
        users.push("gdb from the store".to_string());
    }
    if uses(vec![crate::debian::gdb::SERVER_PACKAGE.to_string()]) {
        users.push("`test --debug`".to_string());
    }
    users
}
