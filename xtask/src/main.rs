//! `cargo xtask` of this repository: the engine, with this workspace's systems and
//! scenarios (`vms/`).

fn main() -> std::process::ExitCode {
    vm_xtask::cli::main(vms::catalog())
}
