//! A test that fails on purpose, to show how a failure looks (exit status 101, the
//! panic message on stderr): `cargo xtask test --system hello -p vm-checks --test fails
//! -- --ignored`.

#[test]
#[ignore = "fails on purpose"]
fn fails_on_purpose() {
    vm_checks::require_hello_vm();
    let answer = vm_checks::ask_hello_service().unwrap();
    panic!("deliberate failure after the service said {:?}", answer.trim());
}
