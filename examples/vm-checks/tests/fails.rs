//! A test that fails on purpose, to show how a failure looks (exit status 101, the
//! panic message on stderr): `cargo xtask test --system hello -p vm-checks --test fails
//! -- --ignored`. Before failing it writes `failed-here` in `CARGO_TARGET_TMPDIR`, which
//! the VM that `cargo xtask replay` restores still has.

#[test]
#[ignore = "fails on purpose"]
fn fails_on_purpose() {
    vm_checks::require_hello_vm();
    let answer = vm_checks::ask_hello_service().unwrap();
    let note = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("failed-here");
    std::fs::write(&note, format!("the service said {:?}\n", answer.trim())).unwrap();
    panic!("deliberate failure after the service said {:?}", answer.trim());
}
