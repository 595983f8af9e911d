//! Numeric options and names are checked before anything is built or booted: a value out
//! of range is a usage error (exit status 2) naming the option and the valid range,
//! never a panic.

use crate::nonce;
use vm_tests::{store_entries_named, xtask};

/// Values no option accepts.
const BAD_VALUES: [&str; 7] = ["0", "-1", "1e30", "1e19", "18446744073709551616", "", "1.5.3"];

fn assert_refused(args: &[&str], option: &str, range: &str) {
    let run = xtask(args);
    assert_eq!(run.code, 2, "{args:?}: expected exit status 2; got {run:#?}");
    assert!(!run.stderr.contains("panicked"), "{args:?}: xtask panicked: {:?}", run.stderr);
    assert!(run.stderr.contains(option), "{args:?}: the message does not name {option}: {:?}", run.stderr);
    assert!(run.stderr.contains(range), "{args:?}: the message does not give the range {range:?}: {:?}", run.stderr);
    assert!(run.stdout.is_empty(), "{args:?}: printed {:?}", run.stdout);
}

#[test]
fn out_of_range_numbers_are_usage_errors_naming_the_range() {
    let name = format!("limits-{}", nonce());
    for value in BAD_VALUES {
        let timeout = format!("--timeout={value}");
        let memory = format!("--memory={value}");
        assert_refused(&["run-vm", &timeout, "--", "true"], "--timeout", "1s to 7d");
        assert_refused(&["run-vm", &memory, "--", "true"], "--memory", "64 to 65536");
        let build = |option: &str, flag: &str, range: &str| {
            assert_refused(&["build-in-vm", "--name", &name, "--disk-image", "raw", option, "--", "true"], flag, range)
        };
        build(&timeout, "--timeout", "1s to 7d");
        build(&memory, "--memory", "64 to 65536");
        build(&format!("--disk-size={value}"), "--disk-size", "1MiB to 16TiB");
        build(&format!("--max-output={value}"), "--max-output", "1MiB to 16TiB");
        assert_refused(&["vm-image", &format!("--size={value}")], "--size", "1MiB to 16TiB");
    }
    assert!(store_entries_named(&name).is_empty(), "something was stored");
}

#[test]
fn the_ranges_ends_are_accepted() {
    // `--script` makes the script and boots nothing, so these only get past parsing.
    for args in [
        ["run-vm", "--timeout=1", "--script"],
        ["run-vm", "--timeout=7d", "--script"],
        ["run-vm", "--memory=64", "--script"],
        ["run-vm", "--memory=65536", "--script"],
    ] {
        xtask(&args).expect_code(0);
    }
    assert_refused(&["run-vm", "--timeout=7d1s", "--script"], "--timeout", "1s to 7d");
    assert_refused(&["run-vm", "--timeout=604801", "--script"], "--timeout", "1s to 7d");
    assert_refused(&["run-vm", "--memory=65537", "--script"], "--memory", "64 to 65536");
}

/// Names that would not survive as a store file name, a path or an environment variable.
fn bad_names(n: &str) -> Vec<String> {
    vec![
        format!("a/{n}"),
        format!("a\n{n}"),
        format!("a {n}"),
        format!("a,{n}"),
        "..".to_string(),
        format!("a..{n}"),
        format!("{n}.meta"),
        format!("{n}.lock"),
        format!(".{n}"),
        format!("-{n}"),
        format!("{n}{}", "x".repeat(300)),
        String::new(),
    ]
}

#[test]
fn bad_item_and_input_names_are_usage_errors() {
    let n = format!("names{}", nonce().replace('-', ""));
    let input = tempfile::NamedTempFile::new().unwrap();
    for name in bad_names(&n) {
        let run = xtask(&["build-in-vm", &format!("--name={name}"), "--", "true"]);
        assert_eq!(run.code, 2, "--name {name:?}: {run:#?}");
        assert!(run.stderr.contains("--name"), "--name {name:?}: {:?}", run.stderr);
        let input_arg = format!("--input={name}={}", input.path().display());
        let run = xtask(&["build-in-vm", "--name", &n, &input_arg, "--", "true"]);
        assert_eq!(run.code, 2, "--input {name:?}: {run:#?}");
        assert!(run.stderr.contains("--input"), "--input {name:?}: {:?}", run.stderr);
    }
    let stored: Vec<String> = std::fs::read_dir(vm_tests::store_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|f| f.contains(&n))
        .collect();
    assert!(stored.is_empty(), "stored: {stored:?}");
    // The longest accepted name: built and stored under it.
    let longest = format!("{n}{}", "y".repeat(200 - n.len()));
    let run = xtask(&["build-in-vm", "--timeout", vm_tests::TIMEOUT, "--name", &longest, "--", "true"]);
    run.expect_code(0);
    assert!(run.stdout.trim_end().ends_with(&format!("-{longest}")), "{run:#?}");
}
