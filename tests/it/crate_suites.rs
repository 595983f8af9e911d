//! A widely used crate's own test suite gives in the VM what it gives on the host: nix's
//! (Unix APIs: signals, process groups and sessions, ptys, users, mounts in namespaces,
//! sockets, timers, ...), at the version `tests/fixtures/nix-suite/Cargo.lock` pins.
//! Cargo fetches the crate from crates.io (checking the `.crate` against the lock's
//! checksum); the test copies it to `target/crate-suites/` and builds its tests there once
//! with the `Cargo.lock` the crate ships (`--locked`). The same binaries then run on the
//! host (`cargo test`, its doctests too) and in VMs of `debian-base` (the same `cargo
//! test` with xtask's `test-runner` as cargo's runner: a VM per test binary, and one kept
//! for all the doctests). libtest's `test NAME ... ok|FAILED|ignored` lines of
//! both runs are compared: a test that passes on the host and not in the VM fails this
//! test, but for the [`EXCEPTIONS`].
//!
//! The tests run as root in the VM. On the host they run as whoever runs this (root in
//! CI): where that is not root, nix's own macros (`skip_if_not_root!`,
//! `require_capability!`) make its root-only tests return early and pass there, and they
//! still have to pass in the VM, where they run for real: the VM run must say no such skip.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use vm_tests::{output_within, store_dir, workspace_root, Run};

/// The crate, as cargo unpacks it.
const CRATE: &str = "nix-0.32.0";

/// Tests that can pass on the host and fail in the VM, because they need what no VM here
/// has: a name prefix, why, and whether they are left out on the host (`--skip`). They
/// run in the VM all the same, and are not compared.
const EXCEPTIONS: &[(&str, &str, bool)] = &[
    (
        "test_kmod::",
        "they build a kernel module with `make`, which needs a C compiler and the headers of the running kernel \
         (`linux-headers-*`): debian-base has make but neither; on a host that has them they would load the \
         module into the host's own kernel, so they do not run there",
        true,
    ),
    (
        "src/sys/socket/mod.rs - sys::socket::sendmsg (line 1731)",
        "the doctest sends a UDP datagram to 1.2.3.4, which needs a route off the machine: a test VM has no \
         network device, only loopback (ENETUNREACH)",
        false,
    ),
];

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// The directory cargo unpacked the pinned crate into (fetching it from crates.io when
/// it has not yet), found through the fixture's lock.
fn fetched_crate() -> PathBuf {
    let fixture = workspace_root().join("tests/fixtures/nix-suite/Cargo.toml");
    let mut metadata = cargo();
    metadata.args(["metadata", "--locked", "--format-version", "1", "--manifest-path"]).arg(&fixture);
    let run = output_within(metadata, 600);
    assert_eq!(run.code, 0, "cargo could not fetch the pinned nix crate from crates.io: {run:#?}");
    let metadata: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let manifest = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "nix")
        .and_then(|p| p["manifest_path"].as_str())
        .expect("nix in the fixture's metadata")
        .to_string();
    let dir = Path::new(&manifest).parent().unwrap().to_path_buf();
    assert!(dir.ends_with(CRATE), "cargo unpacked {} (the fixture pins {CRATE})", dir.display());
    dir
}

/// A copy of the crate to build its tests in, made once (then kept, so its build is
/// kept too): a workspace of its own, under this workspace's target directory.
fn suite_dir() -> PathBuf {
    let fetched = fetched_crate();
    let lock = std::fs::read_to_string(workspace_root().join("tests/fixtures/nix-suite/Cargo.lock")).unwrap();
    let dir = store_dir().parent().unwrap().join("crate-suites").join(CRATE);
    let marker = dir.join(".copied-from");
    let want = format!("{}\n{lock}", fetched.display());
    if std::fs::read_to_string(&marker).ok().as_deref() != Some(want.as_str()) {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
        let copied = Command::new("cp").arg("-r").arg(&fetched).arg(&dir).status().unwrap();
        assert!(copied.success(), "copying {} to {}", fetched.display(), dir.display());
        // Its own workspace, not a member of this one.
        let manifest = dir.join("Cargo.toml");
        let text = std::fs::read_to_string(&manifest).unwrap();
        std::fs::write(&manifest, format!("{text}\n[workspace]\n")).unwrap();
        std::fs::write(&marker, want).unwrap();
    }
    dir
}

/// `cargo test --locked --all-features [ARGS]` in the suite's directory.
fn cargo_test(dir: &Path, args: &[&str], secs: u64) -> Run {
    let mut cmd = cargo();
    cmd.current_dir(dir).args(["test", "--locked", "--all-features"]).args(args);
    // Its own target directory, whatever this run's is.
    cmd.env_remove("CARGO_TARGET_DIR");
    output_within(cmd, secs)
}

/// Each test's outcome (`ok`, `FAILED`, `ignored`) by name, from libtest's lines; a name
/// met again (in another binary) gets `#2`, `#3`, ... Output a test lets through (a child
/// process writing to the same stdout, as nix's kmod tests run `make`) can come between
/// `test NAME ... ` and the outcome, which then ends a later line. The lines must account
/// for every test the `test result:` lines count.
fn outcomes(run: &Run, side: &str) -> BTreeMap<String, String> {
    let outcome_of = |text: &str| {
        let text = text.trim_end();
        let text = text.split_once(", ").map_or(text, |(word, _)| word);
        ["ok", "FAILED", "ignored"].into_iter().find(|o| text.ends_with(o)).map(str::to_string)
    };
    let lines: Vec<&str> = run.stdout.lines().collect();
    let mut found = BTreeMap::new();
    for (i, line) in lines.iter().enumerate() {
        let Some((name, rest)) = line.strip_prefix("test ").and_then(|l| l.split_once(" ... ")) else { continue };
        let later = lines[i + 1..].iter().take_while(|l| !l.starts_with("test ")).copied();
        let outcome = std::iter::once(rest).chain(later).find_map(outcome_of).unwrap_or_else(|| rest.to_string());
        let mut key = name.to_string();
        let mut n = 1;
        while found.contains_key(&key) {
            n += 1;
            key = format!("{name}#{n}");
        }
        found.insert(key, outcome);
    }
    let counted: usize = run
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix("test result: "))
        .flat_map(|l| l.split("; "))
        .filter_map(|part| {
            let (n, what) = part.rsplit_once(' ')?;
            let n: usize = n.rsplit(' ').next()?.parse().ok()?;
            ["passed", "failed", "ignored"].contains(&what).then_some(n)
        })
        .sum();
    assert!(counted > 0 && found.len() == counted, "{side}: {} test lines for {counted} tests counted", found.len());
    let odd: Vec<_> = found.iter().filter(|(_, o)| !["ok", "FAILED", "ignored"].contains(&o.as_str())).collect();
    assert!(odd.is_empty(), "{side}: lines without an outcome: {odd:?}");
    found
}

fn count(outcomes: &BTreeMap<String, String>, outcome: &str) -> usize {
    outcomes.values().filter(|o| *o == outcome).count()
}

#[test]
fn nix_test_suite_passes_in_the_vm_where_it_passes_on_the_host() {
    let start = Instant::now();
    let dir = suite_dir();
    let built = cargo_test(&dir, &["--no-run"], 1800);
    let build_time = start.elapsed();
    assert_eq!(built.code, 0, "building nix's tests: {built:#?}");

    let start = Instant::now();
    let mut args = vec!["--no-fail-fast", "--"];
    args.extend(EXCEPTIONS.iter().filter(|e| e.2).flat_map(|(prefix, ..)| ["--skip", *prefix]));
    let host = cargo_test(&dir, &args, 600);
    let host_time = start.elapsed();
    assert!(host.code == 0 || host.code == 101, "{host:#?}");
    let runner = vm_tests::runner_config("debian-base", "600");
    let start = Instant::now();
    let vm = cargo_test(&dir, &["--no-fail-fast", "--config", &runner], 3600);
    let vm_time = start.elapsed();
    assert!(vm.code == 0 || vm.code == 101, "{vm:#?}");
    assert!(!vm.stderr.contains("Compiling"), "the VM run built the tests again: {vm:#?}");

    let (on_host, in_vm) = (outcomes(&host, "host"), outcomes(&vm, "VM"));
    let excepted = |name: &str| EXCEPTIONS.iter().any(|(prefix, ..)| name.starts_with(prefix));
    let mut regressions = Vec::new();
    for (name, outcome) in &on_host {
        let there = in_vm.get(name).map(String::as_str).unwrap_or("not run");
        if outcome == "ok" && there != "ok" && !excepted(name) {
            regressions.push(format!("{name}: ok on the host, {there} in the VM"));
        }
    }
    let better: Vec<&String> = in_vm
        .iter()
        .filter(|(n, o)| *o == "ok" && on_host.get(*n).is_some_and(|h| h != "ok"))
        .map(|(n, _)| n)
        .collect();
    eprintln!(
        "nix's tests: {} on the host ({} passed, {} failed, {} ignored), {} in the VM ({} passed, {} failed, \
         {} ignored); passing in the VM only: {better:?}; fetched and built in {build_time:.1?}, run on the host in \
         {host_time:.1?}, in the VM in {vm_time:.1?}",
        on_host.len(),
        count(&on_host, "ok"),
        count(&on_host, "FAILED"),
        count(&on_host, "ignored"),
        in_vm.len(),
        count(&in_vm, "ok"),
        count(&in_vm, "FAILED"),
        count(&in_vm, "ignored"),
    );
    let failing: Vec<&String> = on_host.iter().filter(|(_, o)| *o == "FAILED").map(|(n, _)| n).collect();
    eprintln!("failing on the host: {failing:?}");
    assert!(
        regressions.is_empty(),
        "tests that pass on the host fail in the VM:\n{}\n\nthe VM run's output:\n{}\n{}",
        regressions.join("\n"),
        vm.stdout,
        vm.stderr
    );
    // The same tests ran, and the root-only ones ran for real in the VM.
    let only_host: Vec<&String> = on_host.keys().filter(|n| !in_vm.contains_key(*n)).collect();
    let only_vm: Vec<&String> = in_vm.keys().filter(|n| !excepted(n) && !on_host.contains_key(*n)).collect();
    assert!(
        only_host.is_empty() && only_vm.is_empty(),
        "the VM ran other tests than the host: on the host only {only_host:?}, in the VM only {only_vm:?}"
    );
    assert!(count(&in_vm, "ok") >= 500, "only {} of nix's tests passed in the VM", count(&in_vm, "ok"));
    let doctests = in_vm.iter().filter(|(n, o)| n.contains(" (line ") && *o == "ok").count();
    assert!(doctests >= 100, "only {doctests} of nix's doctests passed in the VM");
    for skip in ["requires root privileges", "requires capability"] {
        assert!(!vm.stderr.contains(skip), "a root-only test was skipped in the VM: {}", vm.stderr);
    }
}
