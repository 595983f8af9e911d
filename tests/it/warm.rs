//! Warm start: a guest restored from a snapshot of its VM at the snapshot point gives
//! the results a cold boot gives, is its own machine (clock, random numbers), and a
//! snapshot that does not load falls back to a cold boot.

use std::fs;
use std::time::{SystemTime, UNIX_EPOCH};

use vm_tests::{xtask, xtask_env, TIMEOUT};

fn run_vm(flag: &str, command: &str) -> vm_tests::Run {
    xtask(&["run-vm", flag, "--timeout", TIMEOUT, "--", "sh", "-c", command])
}

#[test]
fn warm_and_cold_runs_give_the_same_results() {
    let command = "echo out; echo err >&2; uname -r; exit 3";
    let warm = run_vm("--warm", command);
    let cold = run_vm("--cold", command);
    warm.expect_code(3);
    cold.expect_code(3);
    assert_eq!(warm.stdout, cold.stdout);
    assert!(warm.stdout.starts_with("out\n"), "{warm:#?}");
    let lines = |r: &vm_tests::Run| {
        r.stderr
            .lines()
            .filter(|l| !l.starts_with("note:") && !l.starts_with("making a snapshot"))
            .map(String::from)
            .collect::<Vec<_>>()
    };
    assert_eq!(lines(&warm), lines(&cold));
    // The hello system (services, a root disk) too.
    let ask = "nc 127.0.0.1 7878 </dev/null";
    let warm = xtask(&["run-vm", "--system", "hello", "--warm", "--timeout", TIMEOUT, "--", "sh", "-c", ask]);
    let cold = xtask(&["run-vm", "--system", "hello", "--cold", "--timeout", TIMEOUT, "--", "sh", "-c", ask]);
    warm.expect_code(0);
    cold.expect_code(0);
    assert_eq!(warm.stdout, cold.stdout);
    assert!(warm.stdout.starts_with("hello-service v1"), "{warm:#?}");
}

#[test]
fn restored_guests_are_their_own_machines() {
    let command = "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s";
    let first = run_vm("--warm", command);
    let second = run_vm("--warm", command);
    first.expect_code(0);
    second.expect_code(0);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    let parse = |r: &vm_tests::Run| {
        let mut lines = r.stdout.lines();
        let random = lines.next().unwrap().to_string();
        let clock: i64 = lines.next().unwrap().trim().parse().unwrap();
        (random, clock)
    };
    let ((r1, c1), (r2, c2)) = (parse(&first), parse(&second));
    assert_eq!(r1.len(), 32, "{first:#?}");
    assert_ne!(r1, r2, "two restored guests read the same random bytes");
    // Each clock was set from the host's at restore: within a second of the host's then
    // (and the second run ended just now).
    assert!((now - c2).abs() <= 2 && c1 <= c2, "guest clocks {c1}, {c2}; host {now}");
}

#[test]
fn a_snapshot_that_does_not_load_falls_back_to_a_cold_boot() {
    run_vm("--warm", "true").expect_code(0);
    // A private store: the items as hard links, the snapshots as copies to damage.
    let dir = tempfile::tempdir_in(vm_tests::store_dir().parent().unwrap()).unwrap();
    vm_tests::copy_items(dir.path(), true, |name| !name.ends_with("-vm-snapshot"));
    vm_tests::copy_items(dir.path(), false, |name| name.ends_with("-vm-snapshot"));
    let mut damaged = 0;
    for item in fs::read_dir(dir.path().join("items")).unwrap().flatten() {
        if item.file_name().to_string_lossy().ends_with("-vm-snapshot") {
            let state = item.path().join("state");
            let mut perms = fs::metadata(&state).unwrap().permissions();
            std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o644);
            fs::set_permissions(&state, perms).unwrap();
            fs::write(&state, b"not a saved VM").unwrap();
            damaged += 1;
        }
    }
    assert!(damaged > 0, "no snapshot in the store");
    let env = [("XTASK_VMSTORE", dir.path().as_os_str())];
    let run = xtask_env(&["run-vm", "--timeout", TIMEOUT, "--", "sh", "-c", "echo fine"], &env);
    run.expect_code(0);
    assert_eq!(run.stdout, "fine\n");
    assert_eq!(run.stderr.matches("did not load").count(), 1, "{run:#?}");
    assert!(run.stderr.contains("booting cold, and removing it"), "{run:#?}");
    let again = xtask_env(&["run-vm", "--timeout", TIMEOUT, "--", "true"], &env);
    again.expect_code(0);
    assert!(!again.stderr.contains("did not load"), "the damaged snapshot was kept: {again:#?}");
}
