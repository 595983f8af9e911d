//! `cargo xtask systems`: the named systems, one line each (or, with `--json`, one JSON
//! document).

use anyhow::Result;
use serde::Serialize;

#[derive(Debug, Clone, clap::Args)]
pub struct Systems {
    /// Print one JSON document on stdout: each system's name, description, host name,
    /// architecture, packages, services and file systems.
    #[arg(long)]
    pub json: bool,
}

/// One system, as `--json` shows it.
#[derive(Debug, Serialize)]
pub struct SystemReport {
    pub name: String,
    pub description: String,
    pub default: bool,
    pub hostname: String,
    /// `x86_64` or `aarch64`.
    pub arch: String,
    /// `busybox`, `debian:NAME`, `crate:PACKAGE/BIN`, `host:PATH`.
    pub packages: Vec<String>,
    pub services: Vec<String>,
    /// Mount points, in order.
    pub file_systems: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct SystemsReport {
    pub systems: Vec<SystemReport>,
}

pub fn report() -> SystemsReport {
    let catalog = crate::Catalog::current();
    let default = catalog.default_name();
    let systems = catalog
        .all_systems()
        .iter()
        .cloned()
        .map(|s| SystemReport {
            default: s.name == default,
            hostname: s.hostname.clone(),
            arch: s.arch.name().to_string(),
            packages: s
                .packages
                .iter()
                .map(|p| match p {
                    os_configs::Package::Busybox => "busybox".to_string(),
                    os_configs::Package::Debian { package } => format!("debian:{package}"),
                    os_configs::Package::Crate { package, bin } => format!("crate:{package}/{bin}"),
                    os_configs::Package::Host { path } => format!("host:{}", path.display()),
                })
                .collect(),
            services: s.services.iter().map(|v| v.name.clone()).collect(),
            file_systems: s.file_systems.iter().map(|f| f.mount_point.clone()).collect(),
            name: s.name,
            description: s.description,
        })
        .collect();
    SystemsReport { systems }
}

impl Systems {
    pub fn run(self) -> Result<i32> {
        if self.json {
            crate::report::print_json(&report())?;
            return Ok(0);
        }
        let catalog = crate::Catalog::current();
        let systems = catalog.all_systems();
        let width = systems.iter().map(|s| s.name.len()).max().unwrap_or(0);
        for s in systems {
            let default = if s.name == catalog.default_name() { " (default)" } else { "" };
            // Another architecture than the default's is said.
            let arch = match s.arch {
                os_configs::Arch::X86_64 => String::new(),
                other => format!("[{other}] "),
            };
            println!("{:width$}  {arch}{}{default}", s.name, s.description);
        }
        Ok(0)
    }
}
