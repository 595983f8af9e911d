//! The subcommands, one module each, and the options they share.

pub mod attach;
#[cfg(feature = "bench")]
pub mod bench;
pub mod build_in_vm;
pub mod image_tools;
pub mod lock;
pub mod replay;
pub mod run_vm;
pub mod scenario;
pub mod store;
pub mod systems;
pub mod test;
pub mod vm_image;

use anyhow::Result;
use os_configs::{Kernel, System};

pub use crate::error::usage_error;

pub use crate::machine::{open_store, VmOpts};
pub use crate::parse::*;

impl VmOpts {
    /// The named system, with the architecture and kernel overrides applied.
    pub fn system(&self) -> Result<System> {
        let name = self.system.clone().unwrap_or_else(|| crate::Catalog::current().default_name());
        let mut system = lookup_system(&name)?;
        if let Some(arch) = self.arch {
            system.arch = arch;
        }
        if let (Some(image), Some(modules)) = (&self.kernel, &self.modules) {
            system.kernel = Kernel::Path { image: image.clone(), modules: modules.clone() };
        }
        Ok(system)
    }
}

/// The named system; an unknown name is a usage error listing the known ones.
pub fn lookup_system(name: &str) -> Result<System> {
    let catalog = crate::Catalog::current();
    catalog.system(name).cloned().ok_or_else(|| {
        let names: Vec<&str> = catalog.all_systems().iter().map(|s| s.name.as_str()).collect();
        match names.is_empty() {
            true => usage_error(format!(
                "unknown system `{name}`: the workspace declares no systems (its xtask hands them to \
                 `vm_xtask::cli::main` in a `Catalog`)"
            )),
            false => usage_error(format!("unknown system `{name}`; known systems: {}", names.join(", "))),
        }
    })
}
