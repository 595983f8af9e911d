//! `cargo xtask build-in-vm`: its flags, checked, handed to [`crate::machine::build`],
//! which runs the build step in a VM and stores what it writes to `$out`; the result's
//! path (or, with `--json`, its report) printed.

use fs_err as fs;

use anyhow::Result;

use super::{is_env_name, parse_bounded_size, parse_key_value, usage_error, VmOpts};
use crate::machine::build::{self, check_item_name, BuildStep, MAX_NAME_LEN};
use crate::report::ItemReport;
use crate::vm::qemu::DiskFormat;
use crate::Workspace;

/// Default size of the fresh disk given with `--disk-image` (as in the reference).
const DEFAULT_DISK_SIZE: u64 = 100 << 20;
/// Names the build's environment sets itself.
const RESERVED_ENV: &[&str] = &["out", "PATH", "HOME", "TMPDIR"];

#[derive(Debug, Clone, clap::Args)]
pub struct BuildInVm {
    /// Name of the resulting store item: 1 to 200 ASCII letters, digits and `+-._`, not
    /// beginning with `.` or `-`.
    #[arg(long)]
    pub name: String,
    /// Add PATH to the store by content; the guest finds it read-only at `$NAME`.
    #[arg(long = "input", value_name = "NAME=PATH", value_parser = parse_key_value)]
    pub inputs: Vec<(String, String)>,
    /// Set an environment variable for the build command.
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub env: Vec<(String, String)>,
    /// Give the guest a fresh disk of this format as /dev/vda; it becomes `disk.FORMAT`
    /// in the output.
    #[arg(long, value_enum)]
    pub disk_image: Option<DiskFormat>,
    /// Size of the --disk-image disk (e.g. 100MiB, 2GiB; 1MiB to 16TiB).
    #[arg(long, value_parser = parse_bounded_size, requires = "disk_image")]
    pub disk_size: Option<u64>,
    /// Give the build a network that reaches the host and beyond (QEMU's user network,
    /// NAT, DNS at 10.0.2.3). The result then depends on more than its inputs: it is no
    /// longer hermetic. Without it the guest has no network at all.
    #[arg(long)]
    pub net: bool,
    /// The most the build may store: what it writes to `$out`, with the disk image
    /// (1MiB to 16TiB).
    #[arg(long, value_name = "SIZE", value_parser = parse_bounded_size, default_value = "8GiB")]
    pub max_output: u64,
    /// Print one JSON document on stdout (path, hash, content sha256, size, hit or
    /// built, wall time) instead of the path.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub vm: VmOpts,
    /// The build command; it writes its results into `$out`.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

impl BuildInVm {
    pub fn run(self, ws: &Workspace) -> Result<i32> {
        let started = std::time::Instant::now();
        self.validate()?;
        let step = BuildStep {
            name: &self.name,
            inputs: &self.inputs,
            env: &self.env,
            disk: self.disk_image.map(|f| (f, self.disk_size.unwrap_or(DEFAULT_DISK_SIZE))),
            net: self.net,
            max_output: self.max_output,
            command: &self.command,
        };
        let (store, item, outcome) = build::build(ws, &self.vm, &self.vm.system()?, &step)?;
        if self.json {
            crate::report::print_json(&ItemReport::new(&store, &item, &item.path, outcome, started)?)?;
        } else {
            println!("{}", item.path.display());
        }
        Ok(0)
    }

    fn validate(&self) -> Result<()> {
        if let Err(why) = check_item_name(&self.name) {
            return Err(usage_error(format!("--name `{}`: {why}", self.name.escape_debug())));
        }
        let disk = self.disk_image.map(|_| self.disk_size.unwrap_or(DEFAULT_DISK_SIZE)).unwrap_or(0);
        if disk > self.max_output {
            return Err(usage_error(format!(
                "the disk image ({disk} bytes) alone is over --max-output ({} bytes); raise --max-output",
                self.max_output
            )));
        }
        for (name, path) in &self.inputs {
            let shown = format!("--input {}={}", name.escape_debug(), path.escape_debug());
            if !is_env_name(name) || RESERVED_ENV.contains(&name.as_str()) {
                return Err(usage_error(format!(
                    "{shown}: `{}` must be an environment variable name (ASCII letters, digits and `_`, \
                     not beginning with a digit) other than {}",
                    name.escape_debug(),
                    RESERVED_ENV.join(", ")
                )));
            }
            if name.len() > MAX_NAME_LEN {
                return Err(usage_error(format!(
                    "{shown}: the name is {} bytes long; give at most {MAX_NAME_LEN}",
                    name.len()
                )));
            }
            if fs::symlink_metadata(path).is_err() {
                return Err(usage_error(format!("{shown}: `{}` does not exist", path.escape_debug())));
            }
            // The input is stored under its file name.
            let file_name = fs::canonicalize(path).ok().and_then(|p| p.file_name().map(|n| n.len()));
            if file_name.is_some_and(|len| len > MAX_NAME_LEN) {
                return Err(usage_error(format!(
                    "{shown}: the file's name is longer than {MAX_NAME_LEN} bytes, too long for a store item; \
                     rename it or link to it under a shorter name"
                )));
            }
        }
        for (key, _) in &self.env {
            if !is_env_name(key) || RESERVED_ENV.contains(&key.as_str()) {
                return Err(usage_error(format!(
                    "--env {key}=...: `{key}` must be an environment variable name other than {}",
                    RESERVED_ENV.join(", ")
                )));
            }
        }
        Ok(())
    }
}
