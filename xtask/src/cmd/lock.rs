//! `cargo xtask lock [--update [PACKAGE...]]`: the workspace's lock file `vm.lock`.
//! Without `--update`, adds every package the named systems and the image tools use that
//! it lacks; with it, moves pins forward to what apt's lists offer now and prints what
//! changed.

use anyhow::Result;

use crate::{debian, lock};

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
            let changes = lock::update(&self.packages, debian::resolve)?;
            if changes.is_empty() {
                eprintln!("{}: no changes", path.display());
            }
            for change in changes {
                println!("{change}");
            }
        } else {
            let added = lock::fill(&lock::wanted(), debian::resolve)?;
            if added.is_empty() {
                eprintln!("{}: every package the systems and image tools use is locked", path.display());
            }
        }
        Ok(0)
    }
}
