//! `cargo xtask test` and cargo's runner (the workspace's tests in a VM), `run-vm
//! --forward`, and output that streams while the command runs.

use std::io::{BufRead, BufReader, Read};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vm_tests::{output_within, workspace_root, xtask, xtask_bin, Run, TIMEOUT};

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// `xtask test --system hello [XTASK ARGS] -p vm-checks CARGO ARGS`.
pub(crate) fn xtask_test(xtask_args: &[&str], args: &[&str]) -> Run {
    let mut all = vec!["test", "--system", "hello", "--timeout", TIMEOUT];
    all.extend_from_slice(xtask_args);
    all.extend(["-p", "vm-checks"]);
    all.extend_from_slice(args);
    xtask(&all)
}

#[test]
fn vm_tests_pass_in_the_vm_and_fail_clearly_on_the_host() {
    // On the host (as root here), each fails at once, saying how to run it.
    let mut host = cargo();
    host.args(["test", "-q", "-p", "vm-checks", "--test", "in_vm", "--", "--ignored"]);
    let host = output_within(host, 300);
    assert_ne!(host.code, 0, "{host:#?}");
    assert!(host.stdout.contains("cargo xtask test --system hello -p vm-checks"), "{host:#?}");

    let run = xtask_test(&[], &["--test", "in_vm", "--", "--ignored"]);
    run.expect_code(0);
    assert!(run.stdout.contains("test result: ok. 4 passed; 0 failed"), "{run:#?}");
    assert!(run.stderr.contains("     Running tests/in_vm.rs (target/debug/deps/in_vm-"), "{run:#?}");
    // Nothing changed: nothing is built again.
    let again = xtask_test(&["--explain"], &["--test", "in_vm", "--", "--ignored"]);
    again.expect_code(0);
    assert!(!again.stderr.contains("store: building"), "{again:#?}");
    assert!(again.stderr.contains("-host-in_vm-"), "the test binary's item is not named: {again:#?}");
}

/// The VM boots while cargo builds the tests: when cargo fails, the run ends with its
/// error, not a test result.
#[test]
fn a_failing_test_build_ends_the_run_with_cargos_error() {
    let run = xtask(&["test", "--system", "hello", "--timeout", TIMEOUT, "-p", "no-such-crate"]);
    assert!(run.code != 0 && run.code != 101, "{run:#?}");
    assert!(run.stderr.contains("`no-such-crate` did not match any packages"), "cargo's own error: {run:#?}");
    assert!(run.stderr.contains("`cargo test --no-run -p no-such-crate` failed"), "{run:#?}");
    assert!(!run.stdout.contains("test result"), "{run:#?}");
}

#[test]
fn a_failing_test_gives_101_and_its_panic_message() {
    let run = xtask_test(&[], &["--test", "fails", "--", "--ignored"]);
    run.expect_code(101);
    // As under `cargo test`: the captured panic in the report on stdout; and on stderr
    // too, with the failed binary.
    assert!(run.stdout.contains("deliberate failure after the service said \"hello-service v1"), "{run:#?}");
    // Cargo's words.
    assert!(run.stderr.contains("error: test failed, to rerun pass `-p vm-checks --test fails`"), "{run:#?}");
    assert!(run.stderr.contains("---- fails_on_purpose stdout ----"), "{run:#?}");
    assert!(run.stderr.contains("panicked at examples/vm-checks/tests/fails.rs"), "{run:#?}");
    assert!(run.stderr.contains("deliberate failure after the service said \"hello-service v1"), "{run:#?}");
    assert!(!run.stderr.contains("test result:"), "only the failure reports are copied: {run:#?}");
    let nocapture = xtask_test(&[], &["--test", "fails", "--", "--ignored", "--nocapture"]);
    nocapture.expect_code(101);
    assert!(nocapture.stderr.contains("panicked at examples/vm-checks/tests/fails.rs"), "{nocapture:#?}");
    assert!(nocapture.stderr.contains("deliberate failure after the service said"), "{nocapture:#?}");
}

/// As `cargo test`: the binaries in cargo's order (`fails` before `in_vm`), the run stops
/// at the first failed binary; with `--no-fail-fast` the others run and the failed ones
/// are listed at the end; `--junit` writes the results as JUnit XML.
#[test]
fn a_failure_stops_the_run_unless_no_fail_fast() {
    let run = xtask_test(&[], &["--test", "in_vm", "--test", "fails", "--", "--ignored"]);
    run.expect_code(101);
    assert!(run.stderr.contains("     Running tests/fails.rs"), "{run:#?}");
    assert!(!run.stderr.contains("     Running tests/in_vm.rs"), "ran on after a failure: {run:#?}");
    assert!(!run.stderr.contains("target failed"), "{run:#?}");

    // The same run writes its results as JUnit XML, read back here by another parser.
    let dir = tempfile::tempdir().unwrap();
    let junit = dir.path().join("results.xml");
    let junit_arg = junit.to_str().unwrap();
    let bad = xtask_test(&["--junit", "/no/such/dir/results.xml"], &["--test", "fails"]);
    bad.expect_code(2);
    assert!(bad.stderr.contains("--junit `/no/such/dir/results.xml`: give a file in a directory that exists"));
    let args = ["--no-fail-fast", "--test", "in_vm", "--test", "fails", "--", "--ignored"];
    let run = xtask_test(&["--junit", junit_arg], &args);
    run.expect_code(101);
    assert!(run.stdout.contains("test result: ok. 4 passed"), "in_vm did not run: {run:#?}");
    let xml = std::fs::read_to_string(&junit).unwrap_or_else(|e| panic!("no JUnit report ({e}): {run:#?}"));
    let doc = roxmltree::Document::parse(&xml).unwrap_or_else(|e| panic!("not XML ({e}): {xml}"));
    let root = doc.root_element();
    assert_eq!(
        (root.tag_name().name(), root.attribute("tests"), root.attribute("failures")),
        ("testsuites", Some("5"), Some("1"))
    );
    let suites: Vec<_> = root.children().filter(|n| n.has_tag_name("testsuite")).collect();
    let names: Vec<&str> = suites.iter().filter_map(|s| s.attribute("name")).collect();
    assert!(names.len() == 2 && names[0].starts_with("tests/fails.rs (") && names[1].starts_with("tests/in_vm.rs ("));
    let cases = |suite: &roxmltree::Node| -> Vec<(String, bool)> {
        let case = suite.children().filter(|n| n.has_tag_name("testcase"));
        case.map(|c| (c.attribute("name").unwrap().to_string(), c.children().any(|f| f.has_tag_name("failure"))))
            .collect()
    };
    assert_eq!(cases(&suites[0]), [("fails_on_purpose".to_string(), true)], "{xml}");
    let in_vm = cases(&suites[1]);
    assert!(in_vm.len() == 4 && in_vm.iter().all(|(_, failed)| !failed), "{xml}");
    let failure = suites[0].descendants().find(|n| n.has_tag_name("failure")).unwrap();
    let message = failure.attribute("message").unwrap_or_default();
    assert!(message.contains("deliberate failure after the service said"), "{xml}");
    let out = suites[0].descendants().find(|n| n.has_tag_name("system-out")).and_then(|n| n.text());
    assert!(out.unwrap_or_default().contains("panicked at examples/vm-checks/tests/fails.rs"), "{xml}");
    for case in root.descendants().filter(|n| n.has_tag_name("testcase")) {
        let time: f64 = case.attribute("time").and_then(|t| t.parse().ok()).unwrap_or(-1.0);
        assert!(time >= 0.0, "a testcase without its time: {xml}");
    }
    let end = "error: test failed, to rerun pass `-p vm-checks --test fails`";
    let fails = run.stderr.find(end).unwrap_or_else(|| panic!("{run:#?}"));
    let in_vm = run.stderr.find("     Running tests/in_vm.rs").unwrap_or_else(|| panic!("{run:#?}"));
    assert!(fails < in_vm, "not in cargo's order: {run:#?}");
    // Then the line that replays the failure (the VM saved after the last binary).
    let summary = "error: 1 target failed:\n    `-p vm-checks --test fails`\nreplay: cargo xtask replay test-";
    assert!(run.stderr.contains(summary), "{run:#?}");
    assert!(run.stderr.trim_end().lines().last().is_some_and(|l| l.starts_with("replay: ")), "{run:#?}");
}

/// Plain `cargo test` with xtask as cargo's runner: the binary runs in the VM. The
/// runner is the built xtask binary, never `cargo run`, so it cannot wait on the lock
/// cargo holds while it runs tests: a run that hangs fails here.
#[test]
fn cargo_runs_test_binaries_in_the_vm_through_its_runner() {
    let runner = vm_tests::runner_config("hello", TIMEOUT);
    for (test, code, needle) in
        [("in_vm", 0, "test result: ok. 4 passed"), ("fails", 101, "deliberate failure after the service said")]
    {
        let mut cmd = cargo();
        cmd.args(["test", "-p", "vm-checks", "--test", test, "--config", &runner, "--", "--ignored"]);
        let run = output_within(cmd, 600);
        assert_eq!(run.code, code, "{test}: {run:#?}");
        assert!(run.stdout.contains(needle), "{test}: {run:#?}");
    }
}

/// A crate of its own workspace, outside this repository (in a temporary directory,
/// not a git work tree), whose test reads a fixture by `CARGO_MANIFEST_DIR`, writes to
/// `CARGO_TARGET_TMPDIR` and needs the VM; run by plain `cargo test` there with xtask as
/// the runner.
#[test]
fn the_runner_shares_the_workspace_of_a_crate_outside_this_repository() {
    let dir = tempfile::tempdir().unwrap();
    let krate = dir.path().join("elsewhere crate");
    std::fs::create_dir_all(krate.join("tests")).unwrap();
    std::fs::create_dir_all(krate.join("src")).unwrap();
    let manifest = "[package]\nname = \"elsewhere\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[workspace]\n";
    std::fs::write(krate.join("Cargo.toml"), manifest).unwrap();
    std::fs::write(krate.join("src/lib.rs"), "").unwrap();
    std::fs::write(krate.join("tests/fixture.txt"), "from elsewhere\n").unwrap();
    let test = r#"
#[test]
fn reads_its_fixture_in_the_vm() {
    assert!(std::path::Path::new("/store").is_dir(), "not in a VM of xtask's");
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixture.txt");
    assert_eq!(std::fs::read_to_string(fixture).unwrap(), "from elsewhere
");
    let scratch = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("x");
    std::fs::write(&scratch, "written").expect("CARGO_TARGET_TMPDIR is writable");
}
"#;
    std::fs::write(krate.join("tests/in_vm.rs"), test).unwrap();
    let runner = vm_tests::runner_config("minimal", TIMEOUT);
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(&krate).args(["test", "--offline", "--config", &runner]).env_remove("CARGO_TARGET_DIR");
    let run = output_within(cmd, 600);
    assert_eq!(run.code, 0, "{run:#?}");
    assert!(run.stdout.contains("test reads_its_fixture_in_the_vm ... ok"), "{run:#?}");

    // Where its workspace cannot be found, the runner says so before booting: exit 2.
    let binary = std::fs::read_dir(krate.join("target/debug/deps"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("in_vm-") && p.extension().is_none())
        .expect("the test binary");
    let gone = dir.path().join("no such package");
    let run = vm_tests::xtask_env(
        &["test-runner", "--system", "minimal", binary.to_str().unwrap()],
        &[("CARGO_MANIFEST_DIR", gone.as_os_str())],
    );
    assert_eq!(run.code, 2, "{run:#?}");
    assert!(run.stderr.contains("no such package` has no Cargo.toml"), "{run:#?}");
    assert!(!run.stderr.contains("vm: booting"), "a VM was booted: {run:#?}");
}

/// `xtask test --manifest-path` runs the tests of the workspace that manifest is in,
/// sharing that workspace (not xtask's); its doctests (none here) boot no VM that
/// outlives cargo: nothing runs in the crate's directory once the command has ended.
#[test]
fn test_shares_the_workspace_its_manifest_names() {
    let dir = tempfile::tempdir().unwrap();
    let krate = dir.path().join("other crate");
    std::fs::create_dir_all(krate.join("tests")).unwrap();
    std::fs::create_dir_all(krate.join("src")).unwrap();
    let manifest = "[package]\nname = \"other\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[workspace]\n";
    std::fs::write(krate.join("Cargo.toml"), manifest).unwrap();
    std::fs::write(krate.join("src/lib.rs"), "pub fn f() -> u32 { 1 }\n").unwrap();
    std::fs::write(krate.join("tests/fixture.txt"), "from the other workspace\n").unwrap();
    let test = r#"
#[test]
fn reads_its_fixture_in_the_vm() {
    assert!(std::path::Path::new("/store").is_dir(), "not in a VM of xtask's");
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixture.txt");
    assert_eq!(std::fs::read_to_string(fixture).unwrap(), "from the other workspace\n");
    assert_eq!(other::f(), 1);
}
"#;
    std::fs::write(krate.join("tests/in_vm.rs"), test).unwrap();
    let manifest_path = krate.join("Cargo.toml");
    let args = ["test", "--system", "minimal", "--timeout", TIMEOUT, "--manifest-path"];
    let run = xtask(&[&args[..], &[manifest_path.to_str().unwrap(), "--offline"]].concat());
    run.expect_code(0);
    assert!(run.stdout.contains("test reads_its_fixture_in_the_vm ... ok"), "{run:#?}");

    // The doctests' VM, started with cargo, ends with it.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = running_in(&krate);
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "still running in the crate's directory: {left:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The command lines of the processes whose working directory is `dir`.
fn running_in(dir: &std::path::Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if std::fs::read_link(entry.path().join("cwd")).is_ok_and(|cwd| cwd == dir) {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            found.push(String::from_utf8_lossy(&cmdline).replace('\0', " "));
        }
    }
    found
}

/// `xtask test --doc` runs a crate's doctests in one VM (kept while cargo runs them):
/// they see the VM and the crate's files, every runner call rustdoc makes lands in the
/// same VM (each doctest leaves a line in the guest's `/tmp`, and the last one, run one
/// at a time in name order, finds them all; its addresses are not randomized), and a
/// failing one gives cargo's words and 101.
#[test]
fn doctests_run_in_one_kept_vm() {
    let dir = tempfile::tempdir().unwrap();
    let krate = dir.path().join("docs");
    std::fs::create_dir_all(krate.join("src")).unwrap();
    let manifest = "[package]\nname = \"docs\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[workspace]\n";
    std::fs::write(krate.join("Cargo.toml"), manifest).unwrap();
    let mut lib = String::new();
    for i in 0..6 {
        lib.push_str(&format!(
            "/// ```\n/// assert!(std::path::Path::new(\"/store\").is_dir(), \"not in the VM\");\n\
             /// let me = std::fs::read_to_string(concat!(env!(\"CARGO_MANIFEST_DIR\"), \"/Cargo.toml\")).unwrap();\n\
             /// assert!(me.contains(\"name = \\\"docs\\\"\"));\n\
             /// use std::io::Write;\n\
             /// let mut runs = std::fs::OpenOptions::new().append(true).create(true)\n\
             ///     .open(\"/tmp/docs-runs\").unwrap();\n\
             /// writeln!(runs, \"f{i}\").unwrap();\n/// assert_eq!(docs::f{i}(), {i});\n/// ```\n\
             pub fn f{i}() -> u32 {{ {i} }}\n"
        ));
    }
    lib.push_str(
        "/// ```\n/// let runs = std::fs::read_to_string(\"/tmp/docs-runs\").unwrap_or_default();\n\
         /// assert_eq!(runs.lines().count(), 6, \"the doctests ran in other VMs: {runs:?}\");\n\
         /// let persona = std::fs::read_to_string(\"/proc/self/personality\").unwrap();\n\
         /// let persona = u32::from_str_radix(persona.trim(), 16).unwrap();\n\
         /// assert_eq!(persona & 0x0040000, 0, \"not randomized as on a host: {persona:x}\");\n/// ```\n\
         pub fn zz_last() {}\n",
    );
    std::fs::write(krate.join("src/lib.rs"), &lib).unwrap();
    let manifest_path = krate.join("Cargo.toml");
    let args = ["test", "--system", "minimal", "--timeout", TIMEOUT, "--doc", "--manifest-path"];
    let run = xtask(&[&args[..], &[manifest_path.to_str().unwrap(), "--", "--test-threads=1"]].concat());
    run.expect_code(0);
    assert!(run.stdout.contains("test result: ok. 7 passed; 0 failed"), "{run:#?}");

    // A failing doctest: cargo's words, 101.
    lib.push_str("/// ```\n/// assert_eq!(1 + 1, 3, \"fails on purpose\");\n/// ```\npub fn broken() {}\n");
    std::fs::write(krate.join("src/lib.rs"), &lib).unwrap();
    let run = xtask(&[&args[..], &[manifest_path.to_str().unwrap(), "--", "--test-threads=1"]].concat());
    run.expect_code(101);
    assert!(run.stdout.contains("fails on purpose"), "{run:#?}");
    assert!(run.stdout.contains("test result: FAILED. 7 passed; 1 failed"), "{run:#?}");
    assert!(run.stderr.contains("error: doctest failed, to rerun pass `--doc`"), "{run:#?}");
}

/// Kills and reaps a child when dropped.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn a_forwarded_port_reaches_the_service_from_the_host() {
    let port = free_port();
    let forward = format!("{port}:7878");
    let child = Command::new(xtask_bin())
        .args(["run-vm", "--system", "hello", "--forward", &forward, "--timeout", TIMEOUT, "--", "sleep", "120"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut vm = Reaped(child);
    let deadline = Instant::now() + Duration::from_secs(240);
    let answer = loop {
        let read = TcpStream::connect(("127.0.0.1", port)).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            let mut answer = String::new();
            s.read_to_string(&mut answer).map(|_| answer)
        });
        match read {
            Ok(answer) if !answer.is_empty() => break answer,
            _ if Instant::now() > deadline => {
                let _ = vm.0.kill();
                let mut err = String::new();
                let _ = vm.0.stderr.take().unwrap().read_to_string(&mut err);
                panic!("nothing answered on 127.0.0.1:{port}; xtask's stderr: {err}");
            }
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    assert!(answer.starts_with("hello-service v1: hello from the VM"), "{answer:?}");
    drop(vm);
    // Without --forward the guest has no network interface but the loopback.
    let run = xtask(&["run-vm", "--timeout", TIMEOUT, "--", "ls", "/sys/class/net"]);
    run.expect_code(0);
    assert_eq!(run.stdout, "lo\n", "{run:#?}");
}

/// The first line of a command's output reaches the host while the command is still
/// running (it sleeps long after), from `run-vm` and from `run-vm.sh`.
#[test]
fn output_streams_while_the_command_runs() {
    let script = xtask(&["run-vm", "--script"]);
    script.expect_code(0);
    let command = ["--", "sh", "-c", "echo first; sleep 15; echo second"];
    let mut xtask_run = Command::new(xtask_bin());
    xtask_run.args(["run-vm", "--timeout", TIMEOUT]).args(command);
    let mut script_run = Command::new(script.stdout.trim_end());
    script_run.args(command);
    for (what, mut cmd) in [("run-vm", xtask_run), ("run-vm.sh", script_run)] {
        let child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
        let mut vm = Reaped(child);
        let mut lines = BufReader::new(vm.0.stdout.take().unwrap()).lines();
        let first = lines.next().expect("no output").unwrap();
        assert_eq!(first, "first", "{what}");
        assert!(vm.0.try_wait().unwrap().is_none(), "{what}: the first line came only after the command ended");
        assert_eq!(lines.next().expect("no second line").unwrap(), "second", "{what}");
        assert!(vm.0.wait().unwrap().success(), "{what}");
    }
}

/// A test binary running past `--timeout` stops the VM: exit status 124, the test still
/// running named (libtest names it as it starts, one test at a time on the VM's one
/// CPU), the console's tail shown.
#[test]
fn a_hanging_test_is_ended_by_the_timeout_and_named() {
    let run = xtask(&[
        "test",
        "--system",
        "hello",
        "--timeout",
        "20s",
        "-p",
        "vm-checks",
        "--test",
        "hangs",
        "--",
        "--ignored",
    ]);
    run.expect_code(124);
    assert!(run.stdout.contains("test hangs_on_purpose ... "), "{run:#?}");
    for needle in [
        "`tests/hangs.rs (target/debug/deps/hangs-",
        "ran past its timeout of 20s and was killed; the test still running: hangs_on_purpose",
        "last console lines (full log: ",
    ] {
        assert!(run.stderr.contains(needle), "missing {needle:?}: {run:#?}");
    }
}

/// Through cargo's runner the timeout holds for the one binary cargo hands it: the runner
/// names the binary and the test, and fails with 124, which cargo passes on; a bad
/// `--timeout` is a usage error.
#[test]
fn the_runner_ends_a_hanging_test_and_names_it() {
    let runner = vm_tests::runner_config("hello", "20s");
    let mut cmd = cargo();
    cmd.args(["test", "-p", "vm-checks", "--test", "hangs", "--config", &runner, "--", "--ignored"]);
    let run = output_within(cmd, 600);
    assert_eq!(run.code, 124, "{run:#?}");
    let (_, message) = run.stderr.split_once("error: `").unwrap_or_else(|| panic!("{run:#?}"));
    assert!(message.contains("target/debug/deps/hangs-"), "the binary is not named: {run:#?}");
    let named = "ran past its timeout of 20s and was killed; the test still running: hangs_on_purpose";
    assert!(message.contains(named), "{run:#?}");

    let bad = xtask(&["test", "--timeout", "never", "-p", "vm-checks"]);
    bad.expect_code(2);
    assert!(
        bad.stderr.contains("`never` is not a duration; give 1s to 7d (e.g. 90, 90s, 5m, 1h, 2d), or `none`"),
        "{bad:#?}"
    );
}

/// With tests on several threads, libtest names a test running for over 60 s: the line
/// reaches stderr while the test still runs, and the timeout then names that test.
#[test]
fn a_slow_test_is_named_on_stderr_while_it_runs() {
    let child = Command::new(xtask_bin())
        .args(["test", "--system", "hello", "--timeout", "100s", "-p", "vm-checks", "--test", "hangs"])
        .args(["--", "--ignored", "--test-threads=2"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut vm = Reaped(child);
    let mut lines = BufReader::new(vm.0.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let slow = "test hangs_on_purpose has been running for over 60 seconds";
    loop {
        let line = lines.next().unwrap_or_else(|| panic!("no slow-test line on stderr: {seen:#?}")).unwrap();
        if line == slow {
            break;
        }
        seen.push(line);
    }
    assert!(vm.0.try_wait().unwrap().is_none(), "the slow-test line came only after the run ended");
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let status = vm.0.wait().unwrap();
    assert_eq!(status.code(), Some(124), "{rest:#?}");
    let rest = rest.join("\n");
    assert!(
        rest.contains("ran past its timeout of 100s and was killed; the test still running: hangs_on_purpose"),
        "{rest}"
    );
}

/// `debian-base`, Debian's own userland, runs the workspace's tests and doctests: the
/// test binary's libraries are the system's (its libc6), `/bin/sh` is dash and runs with
/// an empty `argv[0]`, and the base commands are Debian's. On busybox's `minimal` that
/// one test fails as it should: busybox's `sh` exits 127.
#[test]
fn debian_base_runs_tests_with_debians_userland() {
    let test = |system: &str, filter: &[&str]| {
        let mut args = vec!["test", "--system", system, "--timeout", TIMEOUT, "-p", "vm-checks"];
        args.extend(["--test", "debian_base", "--", "--ignored"]);
        args.extend_from_slice(filter);
        xtask(&args)
    };
    let run = test("debian-base", &[]);
    run.expect_code(0);
    assert!(run.stdout.contains("test result: ok. 3 passed; 0 failed"), "{run:#?}");
    let run = test("minimal", &["--exact", "sh_runs_with_an_empty_argv0"]);
    run.expect_code(101);
    assert!(run.stdout.contains("/bin/sh with an empty argv[0]: exit status: 127"), "{run:#?}");

    // Doctests too, in the VM kept for them: their libraries' links are made beside the system's.
    let dir = tempfile::tempdir().unwrap();
    let krate = dir.path().join("docs");
    std::fs::create_dir_all(krate.join("src")).unwrap();
    let manifest = "[package]\nname = \"docs\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[workspace]\n";
    std::fs::write(krate.join("Cargo.toml"), manifest).unwrap();
    let lib = "/// ```\n/// use std::os::unix::process::CommandExt;\n\
               /// assert_eq!(std::fs::read_to_string(\"/proc/sys/kernel/hostname\").unwrap(), \"debian-base\\n\");\n\
               /// let sh = std::process::Command::new(\"/bin/sh\").arg0(\"\").args([\"-c\", \"true\"]).status();\n\
               /// assert!(sh.unwrap().success());\n/// ```\npub fn f() {}\n";
    std::fs::write(krate.join("src/lib.rs"), lib).unwrap();
    let manifest_path = krate.join("Cargo.toml");
    let args = ["test", "--system", "debian-base", "--timeout", TIMEOUT, "--doc", "--manifest-path"];
    let run = xtask(&[&args[..], &[manifest_path.to_str().unwrap()]].concat());
    run.expect_code(0);
    assert!(run.stdout.contains("test result: ok. 1 passed; 0 failed"), "{run:#?}");
}

/// `--partition count:K/N` and `hash:K/N`, as cargo-nextest: over K = 1..N the shares run
/// every test exactly once; a share that cannot be is a usage error.
#[test]
fn partitions_share_the_tests_among_ci_jobs() {
    for bad in ["3/2", "count:0/4", "count:3/2", "slice:1/2", "count:1/0"] {
        let run = xtask_test(&["--partition", bad], &["--test", "in_vm"]);
        run.expect_code(2);
        assert!(run.stderr.contains("give count:K/N or hash:K/N"), "{bad}: {run:#?}");
    }
    let mut list = cargo();
    list.args(["test", "-q", "-p", "vm-checks", "--test", "in_vm", "--", "--ignored", "--list", "--format", "terse"]);
    let list = output_within(list, 600);
    list.expect_code(0);
    let mut all: Vec<String> = list.stdout.lines().filter_map(|l| l.strip_suffix(": test")).map(String::from).collect();
    all.sort();
    assert_eq!(all.len(), 4, "{list:#?}");
    for kind in ["count", "hash"] {
        let mut seen = Vec::new();
        for k in 1..=2 {
            let share = format!("{kind}:{k}/2");
            let run = xtask_test(&["--partition", &share], &["--test", "in_vm", "--", "--ignored"]);
            run.expect_code(0);
            let ran = run.stdout.lines().filter_map(|l| l.strip_prefix("test ")?.strip_suffix(" ... ok"));
            let ran: Vec<String> = ran.map(String::from).collect();
            if kind == "count" {
                assert_eq!(ran.len(), 2, "{share}: {run:#?}");
            }
            seen.extend(ran);
        }
        seen.sort();
        assert_eq!(seen, all, "{kind}: the shares together are not every test once");
    }
}

/// Where the tests look for a virtiofsd: the ones xtask looks for (`vm::virtiofs`).
const VIRTIOFSD: &[&str] = &["/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd"];

/// `xtask test --system hello --cold --verbose [WARMTH] -p vm-checks --test shares` of
/// the read-only test, `XTASK_VIRTIOFSD` set to `virtiofsd` or unset.
fn shares_test(extra: &[&str], virtiofsd: Option<&str>) -> Run {
    assert!(
        VIRTIOFSD.iter().any(|p| std::path::Path::new(p).is_file()),
        "this test needs a virtiofsd: {} (qemu-system-common) or {} (virtiofsd)",
        VIRTIOFSD[1],
        VIRTIOFSD[0]
    );
    let mut cmd = Command::new(xtask_bin());
    cmd.args(["test", "--system", "hello", "--timeout", TIMEOUT, "--verbose"]).args(extra);
    cmd.args(["-p", "vm-checks", "--test", "shares", "--", "--ignored", "--nocapture", "--exact"]);
    cmd.arg("the_workspace_share_is_read_only_even_remounted").stdin(Stdio::null());
    match virtiofsd {
        Some(v) => cmd.env("XTASK_VIRTIOFSD", v),
        None => cmd.env_remove("XTASK_VIRTIOFSD"),
    };
    output_within(cmd, 600)
}

/// The workspace share of a VM that boots cold and saves no failure (`--no-replay`) goes
/// over virtiofs where the host has a virtiofsd, and over 9p with it hidden, when the VM is
/// restored from a snapshot, or when a failure would be saved (QEMU saves no VM with a
/// virtiofs device); said once with `--verbose`; read-only from the guest (even remounted
/// read-write) either way.
#[test]
fn the_workspace_goes_over_virtiofs_where_the_host_has_it_and_9p_otherwise() {
    let run = shares_test(&["--cold", "--no-replay"], None);
    run.expect_code(0);
    assert!(run.stdout.contains("workspace share: virtiofs ro,"), "{run:#?}");
    assert!(run.stdout.contains("test result: ok. 1 passed"), "{run:#?}");
    assert_eq!(run.stderr.matches("share workspace: ").count(), 1, "{run:#?}");
    assert!(run.stderr.contains("share workspace: virtiofs ("), "{run:#?}");
    assert!(run.stderr.contains("-device vhost-user-fs-device,chardev=vfs0,tag=workspace"), "{run:#?}");
    assert!(!run.stderr.contains("mount_tag=workspace"), "{run:#?}");

    for hidden in ["none", "/nonexistent/virtiofsd"] {
        let run = shares_test(&["--cold", "--no-replay"], Some(hidden));
        run.expect_code(0);
        assert!(run.stdout.contains("workspace share: 9p ro,"), "{run:#?}");
        assert!(run.stderr.contains(&format!("share workspace: 9p (XTASK_VIRTIOFSD={hidden}")), "{run:#?}");
        assert!(!run.stderr.contains("vhost-user-fs-device"), "{run:#?}");
    }

    let saving = shares_test(&["--cold"], None);
    saving.expect_code(0);
    assert!(saving.stdout.contains("workspace share: 9p ro,"), "{saving:#?}");
    assert!(saving.stderr.contains("share workspace: 9p (a failure is saved for replay"), "{saving:#?}");

    // Made (if it is not there) and restored: a snapshot keeps the VM on 9p.
    let warm = shares_test(&["--warm"], None);
    warm.expect_code(0);
    assert!(warm.stdout.contains("workspace share: 9p ro,"), "{warm:#?}");
    assert!(warm.stderr.contains("share workspace: 9p (the VM is restored from a snapshot"), "{warm:#?}");
}

/// With no virtiofsd on the host (each one hidden under `/dev/null` in a mount namespace of
/// the test's own) and the store's QEMU, the store's virtiofsd (its `qemu-system-common`)
/// serves the workspace.
#[test]
fn the_store_qemus_virtiofsd_serves_when_the_host_has_none() {
    const HIDE: &str = "for p in \"$@\"; do [ \"$p\" = -- ] && break; [ -e \"$p\" ] && \
                        { mount --bind /dev/null \"$p\" || exit 125; }; done; \
                        while [ \"$1\" != -- ]; do shift; done; shift; exec \"$@\"";
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--", "sh", "-c", HIDE, "sh"]).args(VIRTIOFSD).arg("--").arg(xtask_bin());
    cmd.args([
        "test",
        "--system",
        "hello",
        "--timeout",
        TIMEOUT,
        "--cold",
        "--no-replay",
        "--verbose",
        "--qemu",
        "store",
    ]);
    cmd.args(["-p", "vm-checks", "--test", "shares", "--", "--ignored", "--nocapture", "--exact"]);
    cmd.arg("the_workspace_share_is_read_only_even_remounted").env_remove("XTASK_VIRTIOFSD");
    let run = output_within(cmd, 900);
    run.expect_code(0);
    assert!(run.stdout.contains("workspace share: virtiofs ro,"), "{run:#?}");
    let said = run.stderr.lines().find(|l| l.starts_with("share workspace: virtiofs ("));
    let said = said.unwrap_or_else(|| panic!("which virtiofsd is not said: {run:#?}"));
    assert!(said.contains("-qemu-system-common-") && said.ends_with("/usr/lib/qemu/virtiofsd)"), "{said}");
}

/// virtiofsd dies with xtask, even SIGKILLed, its sandboxed child too.
#[test]
fn virtiofsd_dies_with_a_sigkilled_xtask() {
    let mut cmd = Command::new(xtask_bin());
    let hangs = ["-p", "vm-checks", "--test", "hangs"];
    cmd.args(["test", "--system", "hello", "--cold", "--no-replay", "--timeout", TIMEOUT]).args(hangs);
    cmd.args(["--", "--ignored"]).env_remove("XTASK_VIRTIOFSD");
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let pid = child.id();
    let mut servers = Vec::new();
    let found = vm_tests::wait_until(300, || {
        servers = vm_tests::children_named(pid, "virtiofsd");
        let sandboxed: Vec<u32> = servers.iter().flat_map(|&p| vm_tests::children_named(p, "virtiofsd")).collect();
        servers.extend(&sandboxed);
        !sandboxed.is_empty() && !vm_tests::children_named(pid, "qemu-system").is_empty()
    });
    if !found {
        let _ = child.kill();
        let _ = child.wait();
        panic!("no virtiofsd (and its sandboxed child) under xtask {pid}: {servers:?}");
    }
    vm_tests::send_signal(pid, "KILL");
    let _ = child.wait();
    let left = |servers: &[u32]| servers.iter().copied().filter(|&p| !vm_tests::process_gone(p)).collect::<Vec<_>>();
    assert!(vm_tests::wait_until(10, || left(&servers).is_empty()), "outlived xtask: {:?}", left(&servers));
}
