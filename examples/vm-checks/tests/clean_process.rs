//! A test starts in the VM as under `cargo test` on a host: no signal blocked, none
//! ignored but SIGPIPE (which Rust's runtime ignores itself), a session and a process
//! group of its own (not PID 1's), only descriptors 0-2 open, and the variables cargo sets
//! when it runs a test binary.
//! Its own binary, so no other test opens descriptors meanwhile.

/// A hexadecimal mask of `/proc/self/status` (`SigBlk`, `SigIgn`, ...).
fn status_mask(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find_map(|l| l.strip_prefix(&format!("{field}:"))).unwrap();
    u64::from_str_radix(line.trim(), 16).unwrap()
}

#[test]
#[ignore = "needs the hello VM"]
fn the_test_starts_with_a_clean_process_state() {
    vm_checks::require_hello_vm();
    assert_eq!(status_mask("SigBlk"), 0, "signals blocked: {:#x}", status_mask("SigBlk"));
    let sigpipe = 1u64 << (libc::SIGPIPE - 1);
    assert_eq!(
        status_mask("SigIgn"),
        sigpipe,
        "signals ignored (Rust ignores SIGPIPE only): {:#x}",
        status_mask("SigIgn")
    );
    // SAFETY: plain system calls without arguments to check.
    let (sid, pgrp) = unsafe { (libc::getsid(0), libc::getpgrp()) };
    assert!(sid > 1 && pgrp > 1, "session {sid}, process group {pgrp}: init's, not the test's own");
    let own = format!("/proc/{}/fd", std::process::id());
    let mut open = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let target = std::fs::read_link(entry.path()).unwrap_or_default();
        // The directory being read is the one descriptor this test opened.
        if target.to_string_lossy() != own {
            open.push(format!("{} -> {}", entry.file_name().to_string_lossy(), target.display()));
        }
    }
    open.sort();
    assert_eq!(open.len(), 3, "descriptors other than 0-2 open: {open:?}");
    assert!(open.iter().all(|d| ["0 ", "1 ", "2 "].iter().any(|n| d.starts_with(n))), "{open:?}");
    // What cargo sets for a test binary.
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set"));
    assert_eq!(var("CARGO_PKG_NAME"), "vm-checks");
    assert_eq!(var("CARGO_PKG_VERSION"), env!("CARGO_PKG_VERSION"));
    assert_eq!(var("CARGO_MANIFEST_DIR"), env!("CARGO_MANIFEST_DIR"));
    assert_eq!(var("CARGO_MANIFEST_PATH"), concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"));
    assert_eq!(var("CARGO_PKG_VERSION_MAJOR"), env!("CARGO_PKG_VERSION_MAJOR"));
}
