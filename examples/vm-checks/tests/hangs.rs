//! A test that never ends, to show how a timeout looks (exit status 124, the test named,
//! the VM's console tail): `cargo xtask test --system hello --timeout 20s -p vm-checks
//! --test hangs -- --ignored`.

#[test]
#[ignore = "hangs on purpose"]
fn hangs_on_purpose() {
    vm_checks::require_hello_vm();
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
