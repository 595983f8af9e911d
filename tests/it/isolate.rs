//! `cargo xtask test --isolate`: each test in a VM of its own, restored from one snapshot,
//! so that what a test writes is invisible to every other test.

use vm_tests::{xtask, xtask_env};

use crate::test_cmd::xtask_test;

/// `vm-checks`' `isolation` tests each leave a marker in `/tmp` and fail on another's: in
/// one shared VM the later ones fail; isolated, all pass, beside a failing binary whose
/// failure is reported as cargo reports it (and in the JUnit XML).
#[test]
fn a_file_one_test_writes_is_invisible_to_the_others() {
    let shared =
        xtask_test(&["--warm", "--no-replay"], &["--test", "isolation", "--", "--ignored", "--test-threads=1"]);
    shared.expect_code(101);
    assert!(shared.stdout.contains("test result: FAILED. 1 passed; 2 failed"), "{shared:#?}");
    assert!(shared.stdout.contains("it shares its machine with them"), "{shared:#?}");

    let dir = tempfile::tempdir().unwrap();
    let junit = dir.path().join("results.xml");
    let args = ["--no-fail-fast", "--test", "fails", "--test", "isolation", "--", "--ignored"];
    let run = xtask_test(&["--isolate", "--junit", junit.to_str().unwrap()], &args);
    run.expect_code(101);
    let isolation = run.stdout.split("running 3 tests").nth(1).unwrap_or_else(|| panic!("{run:#?}"));
    for name in ["first", "second", "third"] {
        assert!(isolation.contains(&format!("test {name} ... ok\n")), "{name}: {run:#?}");
    }
    assert!(isolation.contains("test result: ok. 3 passed; 0 failed; 0 ignored"), "{run:#?}");
    // The failing binary, in cargo's words: its panic on stdout and stderr, the rerun line.
    assert!(run.stdout.contains("test fails_on_purpose ... FAILED"), "{run:#?}");
    assert!(run.stdout.contains("test result: FAILED. 0 passed; 1 failed"), "{run:#?}");
    for out in [&run.stdout, &run.stderr] {
        assert!(out.contains("deliberate failure after the service said"), "{run:#?}");
    }
    assert!(run.stderr.contains("     Running tests/fails.rs ("), "{run:#?}");
    assert!(run.stderr.contains("     Running tests/isolation.rs ("), "{run:#?}");
    assert!(run.stderr.contains("error: test failed, to rerun pass `-p vm-checks --test fails`"), "{run:#?}");
    assert!(run.stderr.contains("error: 1 target failed:\n    `-p vm-checks --test fails`"), "{run:#?}");
    assert!(run.stderr.contains("isolated: 4 tests in a VM each"), "{run:#?}");
    // Every test's VM restored the snapshot the shared run made (or found).
    assert!(!run.stderr.contains("making a snapshot"), "{run:#?}");
    let xml = std::fs::read_to_string(&junit).unwrap_or_else(|e| panic!("no JUnit report ({e}): {run:#?}"));
    let doc = roxmltree::Document::parse(&xml).unwrap();
    let root = doc.root_element();
    assert_eq!((root.attribute("tests"), root.attribute("failures")), (Some("4"), Some("1")), "{xml}");

    // Combinations that cannot work, and a bad number of VMs, are usage errors.
    for bad in [&["--debug", "first"][..], &["--gdb", "1234"], &["--cold"]] {
        let mut args = vec!["test", "--isolate"];
        args.extend_from_slice(bad);
        let run = xtask(&args);
        run.expect_code(2);
        assert!(run.stderr.contains("'--isolate' cannot be used with"), "{bad:?}: {run:#?}");
    }
    let env = [("XTASK_ISOLATE_JOBS", std::ffi::OsStr::new("many"))];
    let run = xtask_env(&["test", "--isolate", "-p", "vm-checks", "--test", "isolation"], &env);
    run.expect_code(2);
    assert!(run.stderr.contains("XTASK_ISOLATE_JOBS=`many`: give a number of VMs from 1 to 256"), "{run:#?}");
}
