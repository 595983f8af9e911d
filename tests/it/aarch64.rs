//! aarch64 guests on this x86_64 host, under emulation: `--arch aarch64` on `run-vm`,
//! `build-in-vm`, `test` and `scenario`, with arm64 Debian packages and workspace crates
//! built for aarch64; warm starts; and what cannot work refused, naming it.

use vm_tests::{xtask, TIMEOUT};

/// `xtask run-vm --arch aarch64 [--system SYSTEM] --timeout T -- COMMAND...`
fn run_arm(system: &str, command: &[&str]) -> vm_tests::Run {
    let mut args = vec!["run-vm", "--arch", "aarch64", "--system", system, "--timeout", TIMEOUT, "--"];
    args.extend_from_slice(command);
    xtask(&args)
}

#[test]
fn an_arm64_guest_runs_busybox_and_a_dynamically_linked_debian_program() {
    let run = run_arm("minimal", &["sh", "-c", "uname -m; uname -r"]);
    run.expect_code(0);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines[0], "aarch64", "{run:#?}");
    assert!(lines[1].ends_with("-arm64"), "not Debian's arm64 kernel: {run:#?}");

    // jq with its libraries (libjq1, libonig5, libc6: arm64's), through arm64's loader;
    // its ELF header says AArch64 (e_machine 183, 0xb7). Its exit status is ours.
    let script = "echo '{\"a\":[1,2]}' | jq -c .a && od -An -tx1 -j18 -N2 \"$(readlink -f \"$(command -v jq)\")\"; \
                  exit 3";
    let run = run_arm("debian-jq", &["sh", "-c", script]);
    run.expect_code(3);
    let words: Vec<&str> = run.stdout.split_whitespace().collect();
    assert_eq!(words, ["[1,2]", "b7", "00"], "{run:#?}");
}

#[test]
fn an_arm64_build_stores_what_the_guest_wrote_apart_from_the_x86_64_one() {
    let name = format!("arch-{}", crate::nonce());
    let build = |arch: &str| {
        let run = xtask(&[
            "build-in-vm",
            "--arch",
            arch,
            "--name",
            &name,
            "--timeout",
            TIMEOUT,
            "--",
            "sh",
            "-c",
            "uname -m > $out/machine",
        ]);
        run.expect_code(0);
        let item = std::path::PathBuf::from(run.stdout.trim());
        (item.clone(), std::fs::read_to_string(item.join("machine")).unwrap())
    };
    let (arm, arm_machine) = build("aarch64");
    let (x86, x86_machine) = build("x86_64");
    assert_eq!((arm_machine.as_str(), x86_machine.as_str()), ("aarch64\n", "x86_64\n"));
    assert_ne!(arm, x86, "the two architectures' builds are one store item");
}

#[test]
fn a_crate_suite_built_for_aarch64_passes_and_fails_in_an_arm64_vm() {
    // `in_vm` asks the hello service (a workspace crate, built for aarch64 too) and checks
    // the kernel is arm64's; `fails` fails on purpose.
    let run = xtask(&[
        "test",
        "--arch",
        "aarch64",
        "--system",
        "hello",
        "--no-replay",
        "--timeout",
        TIMEOUT,
        "-p",
        "vm-checks",
        "--test",
        "in_vm",
        "--test",
        "fails",
        "--no-fail-fast",
        "--",
        "--ignored",
    ]);
    run.expect_code(101);
    assert!(
        run.stderr.contains("Running tests/in_vm.rs (target/aarch64-unknown-linux-musl/debug/deps/in_vm-"),
        "{run:#?}"
    );
    assert!(run.stdout.contains("test result: ok. 4 passed; 0 failed"), "{run:#?}");
    assert!(run.stdout.contains("deliberate failure after the service said \"hello-service v1:"), "{run:#?}");
    assert!(run.stderr.contains("error: 1 target failed:\n    `-p vm-checks --test fails`"), "{run:#?}");
}

#[test]
fn arm64_nodes_play_a_scenario_and_a_warm_start_restores_an_arm64_guest() {
    let run = xtask(&["scenario", "hello-pair", "--arch", "aarch64", "--timeout", TIMEOUT]);
    run.expect_code(0);
    assert!(run.stderr.contains("scenario `hello-pair`: passed"), "{run:#?}");

    let warm = || xtask(&["run-vm", "--arch", "aarch64", "--warm", "--timeout", TIMEOUT, "--", "uname", "-m"]);
    warm().expect_code(0);
    let run = warm();
    run.expect_code(0);
    assert_eq!(run.stdout, "aarch64\n");
    assert!(!run.stderr.contains("making a snapshot"), "the second warm run made a snapshot again: {run:#?}");
}

#[test]
fn what_cannot_work_for_another_architecture_is_refused_naming_it() {
    let run = xtask(&["run-vm", "--arch", "riscv64", "--", "true"]);
    run.expect_code(2);
    assert!(run.stderr.contains("`riscv64` is not a supported guest architecture; supported: x86_64, aarch64"));

    let run = xtask(&["run-vm", "--arch", "aarch64", "--accel", "kvm", "--", "true"]);
    run.expect_code(2);
    assert!(run.stderr.contains("KVM runs guests of this host's architecture only"), "{run:#?}");

    // A host program is this host's x86_64 binary.
    let run = run_arm("host-findmnt", &["true"]);
    run.expect_code(2);
    assert!(run.stderr.contains("is a program for this host (x86_64), not for the system's architecture aarch64"));
    assert!(run.stderr.contains("nothing was built"), "{run:#?}");

    // What arm64 does not have, named: a Debian package built for amd64 only, a module
    // of amd64's kernel only.
    let run = run_arm("invalid-on-aarch64", &["true"]);
    run.expect_code(2);
    assert!(
        run.stderr.contains("Debian package `grub-pc-bin` does not exist in xtask's Debian index for arm64"),
        "{run:#?}"
    );
    assert!(run.stderr.contains("kernel module `kvm_intel` is neither a module of the system's kernel"), "{run:#?}");

    let run = xtask(&["test", "--arch", "aarch64", "--isolate", "-p", "vm-checks", "--test", "trivial"]);
    run.expect_code(2);
    assert!(run.stderr.contains("--isolate with an aarch64 guest"), "{run:#?}");

    let run = xtask(&["test", "--arch", "aarch64", "-p", "vm-checks", "--doc"]);
    run.expect_code(2);
    assert!(run.stderr.contains("cargo builds doctests for the host only"), "{run:#?}");
}
