//! Scenarios: several VMs on a virtual network, driven by a Rust function.

use std::io::Write;
use std::process::{Command, Stdio};

use vm_tests::{children_named, output_within, process_gone, send_signal, wait_until, xtask, xtask_bin, xtask_env};

fn scenario(args: &[&str]) -> vm_tests::Run {
    let mut cmd = Command::new(xtask_bin());
    cmd.arg("scenario").args(args);
    output_within(cmd, 900)
}

/// hello-pair: the client reaches the server's service by name, fails while cut off,
/// and reaches it again once back.
#[test]
fn hello_pair_passes() {
    let run = scenario(&["hello-pair"]);
    run.expect_code(0);
    assert!(run.stderr.contains("scenario `hello-pair`: passed"), "{run:#?}");
    assert!(run.stdout.is_empty(), "{run:#?}");
    let logs = vm_tests::workspace_root().join("target/vmlogs");
    let served = std::fs::read_dir(logs).unwrap().flatten().any(|e| {
        e.file_name().to_string_lossy().starts_with("scenario-hello-pair-server-")
            && std::fs::read_to_string(e.path()).unwrap_or_default().contains("serving the control channel")
    });
    assert!(served, "no console log of the server node in target/vmlogs");
}

/// sixteen: sixteen nodes of one system start at once, restored from one snapshot of that
/// system (made once, by the first), each with its own host name, addresses and hardware
/// address (the script checks them), and every one answers the next on their network.
#[test]
fn sixteen_nodes_of_one_system_share_one_snapshot_and_all_answer() {
    let run = scenario(&["sixteen"]);
    run.expect_code(0);
    assert!(run.stderr.contains("scenario `sixteen`: passed"), "{run:#?}");
    let made = run.stderr.matches("making a snapshot").count();
    assert!(made <= 1, "{made} snapshots made for sixteen nodes of one system: {run:#?}");
    assert!(!run.stderr.contains("did not load"), "{run:#?}");
    // A second run makes none, whatever the first found.
    let again = scenario(&["sixteen"]);
    again.expect_code(0);
    assert!(!again.stderr.contains("making a snapshot"), "{again:#?}");
}

/// A failing step names the node, the command, its status and output, and shows the
/// node's console tail.
#[test]
fn a_failing_scenario_shows_node_command_status_output_and_console() {
    let dir = tempfile::tempdir().unwrap();
    let junit = dir.path().join("scenario.xml");
    let run = scenario(&["hello-pair-broken", "--junit", junit.to_str().unwrap()]);
    run.expect_code(1);
    // The JUnit report, read back by another parser: the scenario's suite, its script failed.
    let xml = std::fs::read_to_string(&junit).unwrap_or_else(|e| panic!("no JUnit report ({e}): {run:#?}"));
    let doc = roxmltree::Document::parse(&xml).unwrap_or_else(|e| panic!("not XML ({e}): {xml}"));
    let suite = doc.descendants().find(|n| n.has_tag_name("testsuite")).expect("a testsuite");
    assert_eq!(
        (suite.attribute("name"), suite.attribute("tests"), suite.attribute("failures")),
        (Some("hello-pair-broken"), Some("1"), Some("1"))
    );
    let failure = doc.descendants().find(|n| n.has_tag_name("failure")).expect("a failure");
    assert!(failure.attribute("message").unwrap_or_default().contains("node `client`"), "{xml}");
    for needle in [
        "error: scenario `hello-pair-broken` failed: node `client`",
        "`echo asking; nc -w 3 server 7879 </dev/null` should have succeeded, but it ended with exit status 1",
        "stdout: \"asking\\n\"",
        "stderr: \"nc: can't connect to remote host (10.77.0.1): Connection refused\\n\"",
        "last console lines (full log: ",
        "  | guest[",
    ] {
        assert!(run.stderr.contains(needle), "missing {needle:?}: {run:#?}");
    }
}

/// `--keep` leaves the nodes up after the script; `--shell NODE` runs commands there;
/// Ctrl-C ends every node.
#[test]
fn kept_nodes_take_a_shell_and_end_with_ctrl_c() {
    let kept = vm_tests::workspace_root().join("target/scenarios/hello-pair-broken.json");
    let _ = std::fs::remove_file(&kept);
    let keeper = Command::new(xtask_bin())
        .args(["scenario", "hello-pair-broken", "--keep"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = keeper.id();
    // Should an assertion fail, the kept scenario (and its nodes, which die with it) must
    // not outlive the test.
    let _guard = KillOnDrop(pid);
    assert!(wait_until(600, || kept.is_file()), "the scenario never said its nodes were kept");
    let qemus = children_named(pid, "qemu-system-x86");
    assert_eq!(qemus.len(), 2, "two nodes should be up: {qemus:?}");

    let mut shell = Command::new(xtask_bin())
        .args(["scenario", "hello-pair-broken", "--shell", "server"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The last command floods the node's console: its log stays bounded.
    let flood = b"hostname\ncat /etc/hosts\nhead -c 3000000 /dev/zero | tr '\\0' x > /dev/console; echo flooded\n";
    shell.stdin.take().unwrap().write_all(flood).unwrap();
    let out = shell.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.starts_with("server\n"), "{stdout}");
    assert!(stdout.contains("10.77.0.1 server\n10.77.0.2 client\n"), "{stdout}");
    assert!(stdout.ends_with("flooded\n"), "{stdout}");

    // The nodes are among the workspace's running VMs, each with a shell on a terminal.
    let listed = xtask(&["attach"]);
    for node in ["server", "client"] {
        let row = format!("hello-pair-broken-{node}-{pid} ");
        let line = listed.stdout.lines().find(|l| l.starts_with(&row));
        let line = line.unwrap_or_else(|| panic!("`attach` does not list {row}:\n{}", listed.stdout));
        assert!(line.ends_with(&format!("scenario hello-pair-broken: node {node}")), "{line}");
    }
    let mut attach = Command::new(xtask_bin())
        .args(["attach", &format!("hello-pair-broken-client-{pid}")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    attach.stdin.take().unwrap().write_all(b"echo on-$(hostname) $(tty)\nexit 5\n").unwrap();
    let out = attach.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(5), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("on-client /dev/pts/"), "{stdout}");

    send_signal(pid, "INT");
    let out = keeper.wait_with_output().unwrap();
    assert!(!out.status.success());
    for q in qemus {
        assert!(wait_until(30, || process_gone(q)), "node QEMU {q} outlived Ctrl-C");
    }
    let log = vm_tests::workspace_root().join(format!("target/vmlogs/scenario-hello-pair-broken-server-{pid}.log"));
    let size = std::fs::metadata(&log).unwrap_or_else(|e| panic!("{}: {e}", log.display())).len();
    assert!(size <= (256 << 10) + (1 << 20) + 4096, "the console log holds {size} bytes");
    let text = String::from_utf8_lossy(&std::fs::read(&log).unwrap()).into_owned();
    assert!(text.contains("bytes of console output not kept ...]"), "no note of what was left out");
    let run = xtask_env(&["scenario", "hello-pair-broken", "--shell", "server"], &[]);
    assert_ne!(run.code, 0, "a shell attached to a scenario no longer running: {run:#?}");
}

/// SIGKILLs a process that is still running when dropped.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if !process_gone(self.0) {
            let _ = Command::new("kill").args(["-KILL", &self.0.to_string()]).status();
        }
    }
}

#[test]
fn unknown_scenarios_are_usage_errors() {
    let run = scenario(&["no-such-scenario"]);
    run.expect_code(2);
    assert!(run.stderr.contains("known scenarios: hello-pair"), "{run:#?}");
    let list = scenario(&["--list"]);
    list.expect_code(0);
    assert!(list.stdout.contains("hello-pair ") && list.stdout.contains("hello-pair-broken "), "{list:#?}");
}
