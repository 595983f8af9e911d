//! The end-to-end tests' own `xtask`: this repository's catalog plus the systems made
//! only for tests (`vms::test_fixtures`: made for one test, or made to be refused), so
//! that `cargo xtask systems` lists only what a user would boot.

fn main() -> std::process::ExitCode {
    vm_xtask::cli::main(vms::catalog().systems(vms::test_fixtures()))
}
