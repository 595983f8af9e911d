//! What only the `greeter` VM has: the service up and answering, and Debian's jq.
//! Ignored by a plain `cargo test` on the host.

use std::process::Command;

use greeter_checks::{ask_greeter, require_greeter_vm};

#[test]
#[ignore = "needs the greeter VM"]
fn the_greeter_answers() {
    require_greeter_vm();
    assert_eq!(ask_greeter().unwrap(), "hello from greeter\n");
}

#[test]
#[ignore = "needs the greeter VM"]
fn jq_reads_json() {
    require_greeter_vm();
    let out = Command::new("jq").args(["-n", "-c", "{answer: (6 * 7)}"]).output().expect("running jq");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "{\"answer\":42}\n");
}
