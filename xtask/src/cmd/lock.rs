//! `cargo xtask lock [--update [PACKAGE...]]`: the workspace's lock file `vm.lock`.
//! Without `--update`, adds every package the named systems and the image tools use that
//! it lacks; with it, moves pins forward to what apt's lists offer now and prints what
//! changed. Either way, the dependency closure of every named system's Debian packages
//! is locked too.

use anyhow::{Context, Result};

use crate::{lock, lower::debian};

#[derive(Debug, Clone, clap::Args)]
pub struct Lock {
    /// Re-resolve the pins (all, or the PACKAGEs given) to apt's current candidates.
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
            let resolved = debian::resolve_many(&names)?;
            let changes = lock::update(&names, |name| resolved.get(name).cloned().context("not resolved"))?;
            if changes.is_empty() {
                eprintln!("{}: no changes", path.display());
            }
            for change in changes {
                println!("{change}");
            }
            lock_closures()?;
        } else {
            let locked = lock::read(&path)?;
            let missing: Vec<String> = lock::wanted().into_iter().filter(|n| !locked.contains_key(n)).collect();
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

/// Locks the dependency closure of each named system's Debian packages (resolving those
/// the lock lacks, or whose pins moved).
fn lock_closures() -> Result<()> {
    let qemu = crate::vm::qemu_program::PACKAGE.to_string();
    debian::closure::closure(&[qemu]).context("locking QEMU's Debian packages (`--qemu store`)")?;
    for system in lock::locked_systems() {
        let roots = crate::lower::system::debian_packages(&system);
        if !roots.is_empty() {
            debian::closure::closure(&roots)
                .with_context(|| format!("locking the Debian packages of `{}`", system.name))?;
        }
    }
    Ok(())
}
