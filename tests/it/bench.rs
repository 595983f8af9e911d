//! `bench --quick --json` runs end to end, prints the report as one JSON document on
//! stdout and writes it to `target/bench/latest.json` (no timing is asserted): every
//! figure, the snapshot's size and times, and the scaling figures' step profiles.

use vm_tests::xtask;

#[test]
fn quick_bench_prints_and_writes_a_valid_report() {
    let run = xtask(&["bench", "--quick", "--json"]);
    run.expect_code(0);
    let printed: serde_json::Value =
        serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {run:#?}"));
    let path = printed["report_path"].as_str().expect("no report path");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    for key in ["accel", "runs", "machine", "figures", "snapshot"] {
        assert_eq!(printed[key], report[key], "{key} differs between stdout and {path}");
    }
    assert!(matches!(report["accel"].as_str(), Some("tcg" | "kvm")), "{report}");
    // The snapshot was made again: its state has tens of MiB, and saving took time.
    let snapshot = &report["snapshot"];
    assert!(snapshot["bytes"].as_u64().unwrap_or(0) > 1 << 20, "{snapshot}");
    for key in ["boot_s", "save_s", "make_s"] {
        assert!(snapshot[key].as_f64().unwrap_or(0.0) > 0.0, "{key}: {snapshot}");
    }
    let figures = report["figures"].as_array().expect("figures");
    let names: Vec<&str> = figures.iter().filter_map(|f| f["name"].as_str()).collect();
    for name in [
        "boot-to-result",
        "boot-to-result-warm",
        "xtask-test",
        "xtask-test-warm",
        "doctests",
        "scenario",
        "inner-loop",
        "inner-loop-warm",
        "inner-loop-vs-run-vm",
        "cache-hit",
        "cache-hit-vm-image",
        "image-build",
        "scaling-64MiB",
        "scaling-256MiB",
        "substitutes",
        "image-build-uefi",
        "uefi-boot",
        "tree-walk",
        "replay-restore",
        "replay-to-result",
        "isolate-32",
        "boot-to-result-aarch64",
    ] {
        assert!(names.contains(&name), "figure {name} missing: {names:?}");
    }
    for f in figures {
        for key in ["ours_s", "floor_s", "ratio"] {
            let v = f[key].as_f64().unwrap_or(-1.0);
            assert!(v > 0.0 && v.is_finite(), "{key} of {} is {v}", f["name"]);
        }
        if f["name"] == "isolate-32" {
            let memory = &f["vm_memory"];
            assert!(memory["pss_bytes"].as_u64().unwrap_or(0) > 0 && memory["vms"].as_u64().unwrap_or(0) >= 2, "{f}");
        }
        if f["name"] == "substitutes" {
            assert!(f["ours_bytes"].as_u64().unwrap_or(0) > 0 && f["floor_bytes"].as_u64().unwrap_or(0) > 0, "{f}");
        }
        if f["name"].as_str().unwrap().starts_with("scaling-") {
            assert!(f["mib_per_s"].as_f64().unwrap_or(0.0) > 0.0, "{f}");
            // Each step of ours and of the floor, timed: mke2fs in both.
            for key in ["steps", "floor_steps"] {
                let steps = f[key].as_array().unwrap_or_else(|| panic!("no {key}: {f}"));
                assert!(steps.iter().any(|s| s["name"] == "mke2fs"), "{key} without mke2fs: {f}");
                let total: f64 = steps.iter().map(|s| s["s"].as_f64().unwrap()).sum();
                assert!(
                    total > 0.0
                        && total <= f[if key == "steps" { "ours_s" } else { "floor_s" }].as_f64().unwrap() * 1.5
                );
            }
            assert!(run.stderr.contains(&format!("{} profile (s): ", f["name"].as_str().unwrap())), "no profile line");
        }
        // The table, on stderr with --json, has a line per figure.
        let name = f["name"].as_str().unwrap();
        assert!(run.stderr.lines().any(|l| l.starts_with(name)), "no table line for {name}");
    }
}
