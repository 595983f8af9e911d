//! `cargo xtask replay`: a test binary that fails under `cargo xtask test` leaves its VM
//! saved at the failure, and a replay restores it: the files the test wrote, the failed
//! binary at hand to run again (and failing the same way), a shell on a real terminal. A
//! failed scenario leaves its nodes saved, restored on their networks.

use std::process::Command;

use vm_tests::{wait_until, workspace_root, xtask, xtask_bin, Run, TIMEOUT};

use crate::attach::Terminal;

/// `xtask test --system hello [ARGS] -p vm-checks --test fails -- --ignored`, with
/// `XTASK_REPLAY_KEEP` set when given.
fn failing_test(args: &[&str], keep: Option<&str>) -> Run {
    let mut cmd = Command::new(xtask_bin());
    cmd.args(["test", "--system", "hello", "--timeout", TIMEOUT]).args(args);
    cmd.args(["-p", "vm-checks", "--test", "fails", "--", "--ignored"]);
    match keep {
        Some(n) => cmd.env("XTASK_REPLAY_KEEP", n),
        None => cmd.env_remove("XTASK_REPLAY_KEEP"),
    };
    vm_tests::output_within(cmd, 600)
}

/// The ID in the run's `replay: cargo xtask replay ID` line.
fn replay_id(run: &Run) -> String {
    let line = run.stderr.lines().find_map(|l| l.strip_prefix("replay: cargo xtask replay "));
    let line = line.unwrap_or_else(|| panic!("no replay line: {run:#?}"));
    assert!(line.contains(" MiB in ") && line.contains("vm-replay"), "the saved state's size and place: {line}");
    line.split_whitespace().next().unwrap().to_string()
}

#[test]
fn a_failed_test_is_replayed_with_its_files_and_its_binary_at_hand() {
    let replays = workspace_root().join("target/vm-replay");
    let run = failing_test(&[], None);
    run.expect_code(101);
    let id = replay_id(&run);
    assert!(id.starts_with("test-") && replays.join(&id).join("state").is_file(), "{run:#?}");
    let listed = xtask(&["replay"]);
    listed.expect_code(0);
    let row = listed.stdout.lines().find(|l| l.starts_with(&format!("{id} ")));
    let row = row.unwrap_or_else(|| panic!("`replay` does not list {id}:\n{}", listed.stdout));
    assert!(row.contains("test hello: tests/fails.rs") && row.contains(" MiB"), "{row}");

    // The file the test wrote before failing, in the tmpfs over target/tmp; the command
    // runs in the workspace's directory.
    let shown = xtask(&["replay", &id, "--", "cat", "target/tmp/failed-here"]);
    shown.expect_code(0);
    assert_eq!(shown.stdout, "the service said \"hello-service v1: hello from the VM\"\n", "{shown:#?}");

    // The failed binary again, in the restored VM: the service is up again, the test
    // fails the same way, 101.
    let again = xtask(&["replay", &id, "--", "sh", "/run/xtask/rerun-failed"]);
    again.expect_code(101);
    assert!(again.stdout.contains("deliberate failure after the service said \"hello-service v1"), "{again:#?}");

    // A shell on a real terminal, in the same state; Ctrl-C reaches its foreground program.
    let mut replay = Command::new(xtask_bin());
    replay.args(["replay", &id]).env("TERM", "xterm");
    let mut term = Terminal::spawn(replay, 30, 90);
    let mut at = term.expect("runs the failed binary again", 0);
    at = term.expect("# ", at);
    term.type_in("cat target/tmp/failed-here; echo $TERM\r");
    at = term.expect("hello from the VM", at);
    at = term.expect("xterm", at);
    term.type_in("sleep 600; echo sleep-was-not-interrupted\r");
    std::thread::sleep(std::time::Duration::from_secs(2));
    term.type_in("\x03");
    term.type_in("echo after-$((40+2))\r");
    at = term.expect("after-42", at);
    assert!(!term.shown()[at..].contains("sleep-was-not-interrupted"));
    term.type_in("poweroff\r");
    assert!(wait_until(120, || matches!(term.child.try_wait(), Ok(Some(_)))), "poweroff did not end the replay");
    assert_eq!(term.child.wait().unwrap().code(), Some(0), "{}", term.shown());

    // A replay changes nothing saved: the file is still as the test left it.
    let still = xtask(&["replay", &id, "--", "cat", "target/tmp/failed-here"]);
    still.expect_code(0);
    assert_eq!(still.stdout, shown.stdout);

    // Only the newest are kept: with XTASK_REPLAY_KEEP=1 the next one replaces it.
    let next = failing_test(&[], Some("1"));
    next.expect_code(101);
    let next_id = replay_id(&next);
    assert_ne!(next_id, id);
    assert!(!replays.join(&id).exists(), "{id} was not pruned");
    assert!(replays.join(&next_id).join("state").is_file());
    let _ = std::fs::remove_dir_all(replays.join(&next_id));
}

/// A scenario that fails leaves its nodes saved; a replay restores them on their
/// networks: what a step wrote before the failure, the services up again, the nodes
/// reaching each other by name.
#[test]
fn a_failed_scenario_is_replayed_on_its_networks() {
    let run = xtask(&["scenario", "hello-pair-broken"]);
    run.expect_code(1);
    let id = replay_id(&run);
    assert!(id.starts_with("scenario-hello-pair-broken-"), "{id}");
    let client = |command: &[&str]| {
        let mut args = vec!["replay", id.as_str(), "--node", "client", "--"];
        args.extend_from_slice(command);
        xtask(&args)
    };
    let file = client(&["cat", "/tmp/before-failing"]);
    file.expect_code(0);
    assert_eq!(file.stdout, "about to ask port 7879\n", "{file:#?}");
    let asked = client(&["sh", "-c", "nc -w 3 server 7878 </dev/null && hostname"]);
    asked.expect_code(0);
    assert_eq!(asked.stdout, "hello-service v1: hello from the VM\nclient\n", "{asked:#?}");
    let failing = client(&["nc", "-w", "3", "server", "7879"]);
    assert_eq!(failing.code, 1, "{failing:#?}");
    let nobody = xtask(&["replay", &id, "--node", "nobody", "--", "true"]);
    nobody.expect_code(2);
    assert!(nobody.stderr.contains("has no node `nobody` (saved: client, server)"), "{nobody:#?}");
    let _ = std::fs::remove_dir_all(workspace_root().join("target/vm-replay").join(&id));
}

#[test]
fn no_failure_is_saved_when_asked_and_bad_ids_are_refused() {
    let run = failing_test(&["--no-replay"], None);
    run.expect_code(101);
    assert!(!run.stderr.contains("replay:"), "{run:#?}");
    let none = failing_test(&[], Some("0"));
    none.expect_code(101);
    assert!(!none.stderr.contains("replay:"), "{none:#?}");
    let scenario = xtask(&["scenario", "hello-pair-broken", "--no-replay"]);
    scenario.expect_code(1);
    assert!(!scenario.stderr.contains("replay:"), "{scenario:#?}");
    let bad = failing_test(&[], Some("many"));
    bad.expect_code(2);
    assert!(bad.stderr.contains("XTASK_REPLAY_KEEP=`many`"), "{bad:#?}");

    let unknown = xtask(&["replay", "test-999999"]);
    unknown.expect_code(2);
    assert!(unknown.stderr.contains("no saved failure `test-999999`"), "{unknown:#?}");
    for bad in ["../../etc", "a b", "x,y", "new\nline", ""] {
        let refused = xtask(&["replay", bad, "--", "true"]);
        refused.expect_code(2);
        assert!(refused.stderr.contains("is not a replay ID"), "{bad:?}: {refused:#?}");
    }
}
