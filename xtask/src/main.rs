//! `cargo xtask`: parses flags and dispatches to the subcommands in `xtask::cmd`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use xtask::cmd::scenario::ScenarioCmd;
use xtask::cmd::test::{Test, TestRunner};
use xtask::cmd::{bench::Bench, build_in_vm::BuildInVm, lock::Lock, run_vm::RunVm, vm_image::VmImage, EXIT_USAGE};
use xtask::vm::Failure;
use xtask::Workspace;

/// Build Linux VM images and run code in real VMs, from cargo.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Boot a system and run COMMAND in it (exit status = COMMAND's), or a shell.
    RunVm(RunVm),
    /// Run a build command in a VM; store what it writes to $out and print the path.
    BuildInVm(BuildInVm),
    /// Build a bootable disk image of a system; print its path.
    VmImage(VmImage),
    /// List the named systems.
    Systems,
    /// Lock every Debian package the systems and image tools use in `vm.lock`; with
    /// --update [PACKAGE...], move pins forward and print what changed.
    Lock(Lock),
    /// Fetch the image tools (e2fsprogs, fdisk, GRUB) into the store; print their directory.
    ImageTools,
    /// Inspect the store.
    #[command(subcommand)]
    Store(xtask::cmd::store::StoreCmd),
    /// Measure against floors measured in the same run; write target/bench/latest.json.
    Bench(Bench),
    /// Build the workspace's test binaries and run them in a VM of a system.
    Test(Test),
    /// Cargo's runner: run one test binary in a VM (`target.<triple>.runner`).
    TestRunner(TestRunner),
    /// Boot a scenario's VMs on their virtual networks and run its script.
    Scenario(ScenarioCmd),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_USAGE as u8 } else { 0 });
        }
    };
    let ws = Workspace::current();
    let result = match cli.command {
        Cmd::RunVm(cmd) => cmd.run(&ws),
        Cmd::BuildInVm(cmd) => cmd.run(&ws),
        Cmd::VmImage(cmd) => cmd.run(&ws),
        Cmd::Systems => Ok(xtask::cmd::systems::run()),
        Cmd::Lock(cmd) => cmd.run(),
        Cmd::ImageTools => xtask::cmd::image_tools::run(&ws),
        Cmd::Store(cmd) => cmd.run(&ws),
        Cmd::Bench(cmd) => cmd.run(&ws),
        Cmd::Test(cmd) => cmd.run(&ws),
        Cmd::TestRunner(cmd) => cmd.run(&ws),
        Cmd::Scenario(cmd) => cmd.run(&ws),
    };
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(err) => {
            eprintln!("error: {err:#}");
            let code = err.downcast_ref::<Failure>().map(|f| f.code).unwrap_or(1);
            ExitCode::from(code.clamp(1, 255) as u8)
        }
    }
}
