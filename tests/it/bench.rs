//! `bench --quick` runs end to end and writes the JSON report (no timing is asserted).

use vm_tests::xtask;

#[test]
fn quick_bench_writes_a_valid_report() {
    let run = xtask(&["bench", "--quick"]);
    run.expect_code(0);
    let path = run.stdout.lines().last().expect("no report path printed");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    assert!(matches!(report["accel"].as_str(), Some("tcg" | "kvm")), "{report}");
    let figures = report["figures"].as_array().expect("figures");
    let names: Vec<&str> = figures.iter().filter_map(|f| f["name"].as_str()).collect();
    for name in [
        "boot-to-result",
        "boot-to-result-warm",
        "xtask-test",
        "scenario",
        "inner-loop",
        "inner-loop-vs-run-vm",
        "cache-hit",
        "cache-hit-vm-image",
        "image-build",
        "scaling-64MiB",
        "scaling-256MiB",
    ] {
        assert!(names.contains(&name), "figure {name} missing: {names:?}");
    }
    for f in figures {
        for key in ["ours_s", "floor_s", "ratio"] {
            let v = f[key].as_f64().unwrap_or(-1.0);
            assert!(v > 0.0 && v.is_finite(), "{key} of {} is {v}", f["name"]);
        }
        if f["name"].as_str().unwrap().starts_with("scaling-") {
            assert!(f["mib_per_s"].as_f64().unwrap_or(0.0) > 0.0, "{f}");
        }
        // The printed table has a line per figure.
        assert!(run.stdout.contains(f["name"].as_str().unwrap()));
    }
}
