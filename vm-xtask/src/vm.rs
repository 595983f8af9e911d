//! Running VMs: QEMU's arguments ([`qemu`]), which QEMU runs them ([`qemu_program`]),
//! the runner that boots one, relays its output and reads the guest's status ([`run`],
//! whose items are re-exported here), warm starts from a saved guest ([`snapshot`]),
//! `run-vm.sh` ([`script`]), several VMs on a network ([`scenario`]), shells in running
//! VMs ([`attach`]), and large read-only shares over virtiofs ([`virtiofs`]).

pub mod attach;
pub mod qemu;
pub mod replay;
pub mod run;
pub mod scenario;
pub mod script;
pub mod snapshot;
pub mod virtiofs;
pub mod workspace_view;

pub use run::*;
