//! End-to-end tests: each boots real VMs through the `xtask` binary and checks what the
//! guest did. They need QEMU (installed by xtask itself when running as root) and
//! reach Debian's archive on first use to fetch the kernel and busybox.

mod aarch64;
mod adopt;
mod attach;
mod bench;
mod build_in_vm;
mod cli;
mod crate_suites;
mod debian;
mod docs;
mod faults;
mod gdb;
mod guest_boundary;
mod host;
mod isolate;
mod json;
mod limits;
mod lock;
mod normal;
mod progress;
mod registry;
mod replay;
mod run_vm;
mod scenario;
mod store;
mod systems;
mod test_cmd;
mod tidy;
mod trust;
mod vm_image;
mod warm;

/// A string unique to this test run, so builds are fresh rather than cache hits.
pub fn nonce() -> String {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    format!("{}-{}", std::process::id(), t.as_nanos())
}
