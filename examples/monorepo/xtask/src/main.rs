//! `cargo xtask` of this workspace: the vm-xtask engine, handed this workspace's systems
//! and scenarios (`vms.rs`).

mod vms;

use vm_xtask::{cli, Catalog};

fn main() -> std::process::ExitCode {
    cli::main(Catalog::new().systems(vms::systems()).scenarios(vms::scenarios()))
}
