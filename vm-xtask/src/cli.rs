//! The command line of `cargo xtask`: a workspace's `xtask` binary hands its
//! [`Catalog`] to [`main`], which parses the flags and dispatches to the subcommands
//! (the crate-private module `cmd`).
//!
//! ```no_run
//! // xtask/src/main.rs of a workspace
//! use vm_xtask::{cli, systems, Catalog};
//!
//! fn main() -> std::process::ExitCode {
//!     cli::main(Catalog::new().systems([systems::minimal()]))
//! }
//! ```

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

#[cfg(feature = "bench")]
use crate::cmd::bench::Bench;
use crate::cmd::scenario::ScenarioCmd;
use crate::cmd::test::{Test, TestRunner};
use crate::cmd::{build_in_vm::BuildInVm, lock::Lock, run_vm::RunVm, vm_image::VmImage};
use crate::error::{exit_code, EXIT_USAGE};
use crate::{Catalog, Workspace};

/// Build Linux VM images and run code in real VMs, from cargo.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", version, after_help = EXAMPLES)]
struct Cli {
    /// Print nothing but results (stdout) and errors: no progress, no step lines.
    #[arg(long, global = true)]
    quiet: bool,
    /// Which QEMU runs the VMs: the host's, or Debian's from the store (default: the
    /// host's when it has one or can install it as root, else the store's).
    #[arg(long, global = true, value_enum, value_name = "FROM")]
    qemu: Option<crate::debian::qemu::Choice>,
    #[command(subcommand)]
    command: Cmd,
}

const EXAMPLES: &str = "Examples:
  cargo xtask run-vm -- uname -r
  cargo xtask build-in-vm --name hello --json -- sh -c 'echo hi > $out/greeting'
  cargo xtask completions bash > ~/.local/share/bash-completion/completions/xtask";

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Boot a system and run COMMAND in it (exit status = COMMAND's), or a shell.
    #[command(after_help = "Examples:
  cargo xtask run-vm -- uname -r
  cargo xtask run-vm --system my-service -- nc 127.0.0.1 8080
  cargo xtask run-vm --system my-service --forward 8080:8080
  cargo xtask run-vm --gdb 1234 --gdb-wait -- true   # then attach gdb as it says")]
    RunVm(RunVm),
    /// Run a build command in a VM; store what it writes to $out and print the path.
    #[command(after_help = "Examples:
  cargo xtask build-in-vm --name hello -- sh -c 'echo hi > $out/greeting'
  cargo xtask build-in-vm --name data --input SRC=./data --json -- sh -c 'cp -r $SRC $out/'")]
    BuildInVm(BuildInVm),
    /// Build a bootable disk image of a system; print its path.
    #[command(after_help = "Examples:
  cargo xtask vm-image --system my-service --format raw
  cargo xtask vm-image --json")]
    VmImage(VmImage),
    /// List the named systems.
    #[command(after_help = "Examples:
  cargo xtask systems
  cargo xtask systems --json")]
    Systems(crate::cmd::systems::Systems),
    /// Lock every Debian package the systems and image tools use in `vm.lock`; with
    /// --update [PACKAGE...], move pins forward and print what changed.
    #[command(after_help = "Examples:
  cargo xtask lock
  cargo xtask lock --update linux-image-amd64")]
    Lock(Lock),
    /// Fetch the image tools (e2fsprogs, fdisk, GRUB) into the store; print their directory.
    #[command(after_help = "Example:
  cargo xtask image-tools")]
    ImageTools,
    /// Inspect the store.
    #[command(
        subcommand,
        after_help = "Example:
  cargo xtask store verify --repair"
    )]
    Store(crate::cmd::store::StoreCmd),
    /// Measure against floors measured in the same run; write target/bench/latest.json.
    #[cfg(feature = "bench")]
    #[command(after_help = "Examples:
  cargo xtask bench --quick
  cargo xtask bench --only scaling --only image-build
  cargo xtask bench --json > bench.json")]
    Bench(Bench),
    /// Build the workspace's test binaries and run them in a VM of a system.
    #[command(after_help = "Examples:
  cargo xtask test --system my-service -p my-service-checks -- --ignored
  cargo xtask test --debug my_test -p my-service-checks   # one test under gdbserver; attach as it says")]
    Test(Test),
    /// Cargo's runner: run one test binary in a VM (`target.<triple>.runner`).
    #[command(after_help = r#"Example:
  cargo test --config 'target.x86_64-unknown-linux-gnu.runner="target/debug/xtask test-runner --system my-service"' \
    -p my-service-checks -- --ignored"#)]
    TestRunner(TestRunner),
    /// Open a shell in a running VM of this workspace (run-vm, test, a scenario's node);
    /// without ID, list them.
    #[command(after_help = "Examples:
  cargo xtask attach
  cargo xtask attach run-vm-41236")]
    Attach(crate::cmd::attach::Attach),
    /// Restore the VM of a test binary that failed under `cargo xtask test`, as the
    /// failure left it, and open a shell there (or run COMMAND); without ID, list them.
    #[command(after_help = "Examples:
  cargo xtask replay
  cargo xtask replay test-3
  cargo xtask replay test-3 -- sh /run/xtask/rerun-failed")]
    Replay(crate::cmd::replay::Replay),
    /// Boot a scenario's VMs on their virtual networks and run its script.
    #[command(after_help = "Examples:
  cargo xtask scenario --list
  cargo xtask scenario my-pair --keep
  cargo xtask scenario my-pair --shell server")]
    Scenario(ScenarioCmd),
    /// Print a completion script for SHELL on stdout (it completes `xtask`, the binary
    /// in target/debug; `cargo xtask` itself is completed by cargo's own script).
    #[command(after_help = "Examples:
  cargo xtask completions zsh > ~/.zfunc/_xtask
  source <(cargo xtask completions bash)
  cargo xtask completions fish > ~/.config/fish/completions/xtask.fish")]
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// The name completion scripts complete.
const COMPLETED_NAME: &str = "xtask";

/// Runs `cargo xtask` with the workspace's systems and scenarios: parses the process's
/// arguments, runs the subcommand, and returns its exit status (2 for a usage error, the
/// guest command's status for `run-vm`, 1 for other errors, printed on stderr).
pub fn main(catalog: Catalog) -> ExitCode {
    let problems = catalog.problems();
    if !problems.is_empty() {
        eprintln!("error: the workspace's catalog of systems and scenarios: {}", problems.join("; "));
        return ExitCode::from(EXIT_USAGE as u8);
    }
    catalog.install();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_USAGE as u8 } else { 0 });
        }
    };
    crate::progress::set_quiet(cli.quiet);
    if let Some(choice) = cli.qemu {
        // Read by every QEMU use of this process (and passed on to the xtask the bench runs).
        let value = match choice {
            crate::debian::qemu::Choice::Host => "host",
            crate::debian::qemu::Choice::Store => "store",
        };
        std::env::set_var(crate::debian::qemu::QEMU_ENV, value);
    }
    let ws = Workspace::current();
    let result = match cli.command {
        Cmd::RunVm(cmd) => cmd.run(&ws),
        Cmd::BuildInVm(cmd) => cmd.run(&ws),
        Cmd::VmImage(cmd) => cmd.run(&ws),
        Cmd::Systems(cmd) => cmd.run(),
        Cmd::Lock(cmd) => cmd.run(),
        Cmd::ImageTools => crate::cmd::image_tools::run(&ws),
        Cmd::Store(cmd) => cmd.run(&ws),
        #[cfg(feature = "bench")]
        Cmd::Bench(cmd) => cmd.run(&ws),
        Cmd::Test(cmd) => cmd.run(&ws),
        Cmd::TestRunner(cmd) => cmd.run(&ws),
        Cmd::Scenario(cmd) => cmd.run(&ws),
        Cmd::Attach(cmd) => cmd.run(&ws),
        Cmd::Replay(cmd) => cmd.run(&ws),
        Cmd::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), COMPLETED_NAME, &mut std::io::stdout());
            Ok(0)
        }
    };
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(err) => {
            eprintln!("error: {err:#}");
            let code = exit_code(&err);
            ExitCode::from(code.clamp(1, 255) as u8)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every subcommand, at every depth, and the top level show an example in `--help`.
    #[test]
    fn every_subcommand_help_has_an_example() {
        fn walk(cmd: &clap::Command, path: &str, found: &mut Vec<String>) {
            let help = cmd.clone().render_long_help().to_string();
            let lines: Vec<&str> = help.lines().collect();
            let example = lines.windows(2).any(|w| {
                (w[0] == "Example:" || w[0] == "Examples:") && w[1].starts_with("  cargo ") && w[1].len() > 10
            });
            if !example {
                found.push(path.to_string());
            }
            for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
                walk(sub, &format!("{path} {}", sub.get_name()), found);
            }
        }
        let mut cli = Cli::command();
        cli.build();
        let mut missing = Vec::new();
        walk(&cli, "cargo xtask", &mut missing);
        assert!(missing.is_empty(), "no example in --help of: {missing:?}");
    }

    #[test]
    fn the_cli_is_consistent() {
        Cli::command().debug_assert();
    }
}
