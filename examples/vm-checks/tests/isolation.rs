//! Whether each test has a machine of its own (`cargo xtask test --isolate`): each test
//! leaves a marker file named after itself in `/tmp` and fails if another test's marker
//! is there. In one VM shared by the three, all but the first to run fail.
//!
//!     cargo xtask test --isolate -p vm-checks --test isolation -- --ignored

use std::path::PathBuf;

const TESTS: [&str; 3] = ["first", "second", "third"];

fn marker(name: &str) -> PathBuf {
    PathBuf::from(format!("/tmp/vm-checks-isolation-{name}"))
}

/// Leaves `name`'s marker, then looks for the others'.
fn alone(name: &str) {
    std::fs::write(marker(name), name).expect("writing the marker");
    let others: Vec<&str> = TESTS.iter().copied().filter(|t| *t != name && marker(t).exists()).collect();
    assert!(others.is_empty(), "`{name}` sees the markers of {others:?}: it shares its machine with them");
}

#[test]
#[ignore = "needs a VM of its own: cargo xtask test --isolate -p vm-checks --test isolation -- --ignored"]
fn first() {
    alone("first");
}

#[test]
#[ignore = "needs a VM of its own: cargo xtask test --isolate -p vm-checks --test isolation -- --ignored"]
fn second() {
    alone("second");
}

#[test]
#[ignore = "needs a VM of its own: cargo xtask test --isolate -p vm-checks --test isolation -- --ignored"]
fn third() {
    alone("third");
}
