//! The subcommands, one module each, and the options they share.

pub mod bench;
pub mod build_in_vm;
pub mod image_tools;
pub mod lock;
pub mod run_vm;
pub mod store;
pub mod systems;
pub mod vm_image;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use os_configs::{Kernel, System};

use crate::host;
use crate::qemu::{self, Accel, AccelChoice, Console, Share, VmSpec};
use crate::store::Store;
use crate::system::Lowered;
use crate::vm::Failure;
use crate::Workspace;

/// Exit status for bad command-line input.
pub const EXIT_USAGE: i32 = 2;

/// A usage error: exit status 2, nothing built.
pub fn usage_error(message: String) -> anyhow::Error {
    Failure { code: EXIT_USAGE, message }.into()
}

/// Options of every subcommand that boots a VM.
#[derive(Debug, Clone, clap::Args)]
pub struct VmOpts {
    /// The system to boot (see `cargo xtask systems`).
    #[arg(long, default_value = os_configs::DEFAULT_SYSTEM)]
    pub system: String,
    /// Accelerator: auto uses KVM when it works here, else TCG.
    #[arg(long, value_enum, default_value_t)]
    pub accel: AccelChoice,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256, value_parser = parse_memory)]
    pub memory: u32,
    /// Kill the VM after this long (seconds, or with a unit: 90s, 5m, 1h).
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Boot this bzImage instead of the system's kernel (needs --modules).
    #[arg(long, requires = "modules")]
    pub kernel: Option<PathBuf>,
    /// The modules tree (`/lib/modules/RELEASE`) of the --kernel image.
    #[arg(long, requires = "kernel")]
    pub modules: Option<PathBuf>,
    /// Show kernel and helper messages on stderr and print QEMU's command line.
    #[arg(short, long)]
    pub verbose: bool,
    /// Say for every store item whether it was found or built.
    #[arg(long)]
    pub explain: bool,
}

impl VmOpts {
    /// The named system, with the kernel override applied.
    pub fn system(&self) -> Result<System> {
        let mut system = os_configs::by_name(&self.system).ok_or_else(|| {
            let names: Vec<String> = os_configs::all().into_iter().map(|s| s.name).collect();
            usage_error(format!("unknown system `{}`; known systems: {}", self.system, names.join(", ")))
        })?;
        if let (Some(image), Some(modules)) = (&self.kernel, &self.modules) {
            system.kernel = Kernel::Path { image: image.clone(), modules: modules.clone() };
        }
        Ok(system)
    }

    pub fn open_store(&self, ws: &Workspace) -> Result<Store> {
        Store::open(&ws.store_dir, self.explain)
    }

    /// The QEMU configuration for booting `lowered` with the store and `xchg` shared.
    pub fn spec(&self, accel: Accel, store: &Store, lowered: &Lowered, xchg: PathBuf) -> VmSpec {
        VmSpec {
            accel,
            memory_mib: self.memory,
            kernel: lowered.boot_image.clone(),
            initrd: lowered.initrd.path.join("initrd"),
            kernel_args: lowered.kernel_args.clone(),
            tsc_khz: if accel == Accel::Tcg { qemu::host_tsc_khz() } else { None },
            console: Console::Stdio,
            shares: vec![
                Share { tag: guest::STORE_TAG.into(), path: store.root().to_path_buf(), readonly: true },
                Share { tag: guest::XCHG_TAG.into(), path: xchg, readonly: false },
            ],
            disks: Vec::new(),
            ports: Vec::new(),
            sandbox: host::qemu_supports_sandbox(&store.cache_dir()),
        }
    }
}

fn parse_memory(s: &str) -> std::result::Result<u32, String> {
    let mib: u32 = s.parse().map_err(|_| format!("`{s}` is not a number of MiB"))?;
    if mib < 64 {
        return Err(format!("{mib} MiB is too little for the guest kernel; give at least 64"));
    }
    Ok(mib)
}

/// Parses `90`, `90s`, `5m` or `1h`.
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let (num, mult) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1.0),
        Some((i, 'm')) => (&s[..i], 60.0),
        Some((i, 'h')) => (&s[..i], 3600.0),
        _ => (s, 1.0),
    };
    let n: f64 = num.parse().map_err(|_| format!("`{s}` is not a duration (e.g. 90, 90s, 5m, 1h)"))?;
    if !(n > 0.0 && n.is_finite()) {
        return Err(format!("`{s}`: the duration must be positive"));
    }
    Ok(Duration::from_secs_f64(n * mult))
}

/// Parses a size: bytes, or with a binary unit (`100MiB`, `2GiB`, also `M`, `G`, `K`).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("`{s}` is not a size (e.g. 100MiB, 2GiB)"))?;
    let mult: u64 = match unit {
        "" | "B" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        _ => return Err(format!("`{s}`: unknown size unit `{unit}` (use KiB, MiB, GiB or TiB)")),
    };
    let size = n.checked_mul(mult).ok_or_else(|| format!("`{s}` is too large"))?;
    if size == 0 {
        return Err(format!("`{s}`: the size must be positive"));
    }
    Ok(size)
}

/// Parses `KEY=VALUE`.
pub fn parse_key_value(s: &str) -> std::result::Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("`{s}` is not of the form NAME=VALUE")),
    }
}

/// Whether `name` can be an environment variable's name.
pub fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("100MiB"), Ok(100 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12XB").unwrap_err().contains("unknown size unit"));
        assert!(parse_size("0").is_err());
        assert!(parse_size("MiB").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("0").is_err());
    }

    #[test]
    fn key_values_and_names() {
        assert_eq!(parse_key_value("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert!(parse_key_value("novalue").is_err());
        assert!(parse_key_value("=x").is_err());
        assert!(is_env_name("_x1"));
        assert!(!is_env_name("1x"));
        assert!(!is_env_name("a-b"));
    }

    #[test]
    fn memory() {
        assert_eq!(parse_memory("256"), Ok(256));
        assert!(parse_memory("0").is_err());
        assert!(parse_memory("lots").is_err());
    }
}
