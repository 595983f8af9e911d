//! `cargo xtask test --partition count:K/N` or `hash:K/N` (cargo-nextest's syntax and
//! meaning): N CI jobs share the tests, job K running its share. Each test binary's tests
//! are listed first (`BINARY --list --format terse` with the run's test arguments, on
//! the host: listing runs no test), then `count:K/N` takes the K-th of every N tests of
//! each binary, in the listed order, and `hash:K/N` the tests whose name's hash (sha256 of
//! the binary's `cargo test` selection and the test's name) is K-1 modulo N, which does
//! not move when other tests are added. Over K = 1..N every test runs exactly once. A
//! binary that is no libtest harness (it cannot list) counts as one test; a binary with
//! no test in the share does not run.

use std::path::Path;

use sha2::{Digest, Sha256};

use super::TestBinary;

/// A share of the tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Partition {
    /// `count:K/N`: the K-th of every N tests of a binary.
    Count { k: u64, n: u64 },
    /// `hash:K/N`: the tests whose hash is K-1 modulo N.
    Hash { k: u64, n: u64 },
}

/// Parses `count:K/N` or `hash:K/N` (1 ≤ K ≤ N).
pub fn parse(s: &str) -> std::result::Result<Partition, String> {
    let form = "give count:K/N or hash:K/N, with 1 <= K <= N (e.g. count:1/3)";
    let Some((kind, share)) = s.split_once(':') else {
        return Err(format!("`{}` is no partition; {form}", s.escape_debug()));
    };
    let number = |t: &str| t.parse::<u64>().ok().filter(|_| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()));
    let (k, n) = match share.split_once('/').map(|(k, n)| (number(k), number(n))) {
        Some((Some(k), Some(n))) if k >= 1 && k <= n => (k, n),
        _ => return Err(format!("`{}` is no share K/N; {form}", share.escape_debug())),
    };
    match kind {
        "count" => Ok(Partition::Count { k, n }),
        "hash" => Ok(Partition::Hash { k, n }),
        other => Err(format!("`{}` is no kind of partition; {form}", other.escape_debug())),
    }
}

impl Partition {
    /// Whether the test `name`, the `index`-th (from 0) of the binary selected by `binary`
    /// (`-p PKG --test NAME`), is in this share.
    pub fn selects(self, binary: &str, index: u64, name: &str) -> bool {
        match self {
            Partition::Count { k, n } => index % n == k - 1,
            Partition::Hash { k, n } => {
                let digest = Sha256::new().chain_update(binary).chain_update([0]).chain_update(name).finalize();
                let hash = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"));
                hash % n == k - 1
            }
        }
    }
}

/// The binaries of this share, each with the arguments that run its share of tests (the
/// run's flags, then `--exact` and the tests' names).
pub fn apply(binaries: Vec<TestBinary>, test_args: &[String], partition: Partition) -> Vec<TestBinary> {
    let mut share = Vec::new();
    for (mut binary, tests) in listed(binaries, test_args, Some(partition)) {
        if let Some(chosen) = tests {
            binary.args = Some(exact_args(test_args, &chosen));
        }
        share.push(binary);
    }
    share
}

/// Each binary with the tests it runs with `test_args` (in `partition`'s share, when
/// there is one), as it lists them: `None` for a binary that is no libtest harness (one
/// unit); a binary with no test to run is left out.
pub fn listed(
    binaries: Vec<TestBinary>,
    test_args: &[String],
    partition: Option<Partition>,
) -> Vec<(TestBinary, Option<Vec<String>>)> {
    let mut share = Vec::new();
    for (i, binary) in binaries.into_iter().enumerate() {
        let id = if binary.rerun.is_empty() { binary.label.clone() } else { binary.rerun.clone() };
        match list(&binary.path, &binary.package_dir, &binary.env, test_args) {
            None => {
                // No libtest harness: one unit, counted among the binaries.
                if partition.is_none_or(|p| p.selects("", i as u64, &id)) {
                    share.push((binary, None));
                }
            }
            Some(names) => {
                let chosen: Vec<String> = (0u64..)
                    .zip(&names)
                    .filter(|(index, name)| partition.is_none_or(|p| p.selects(&id, *index, name)))
                    .map(|(_, name)| name.clone())
                    .collect();
                if !chosen.is_empty() {
                    share.push((binary, Some(chosen)));
                }
            }
        }
    }
    share
}

/// The arguments that run exactly the tests `names` with `test_args`' flags (the run's
/// filters are applied by the listing).
pub fn exact_args(test_args: &[String], names: &[String]) -> Vec<String> {
    let mut args = split_args(test_args).1;
    args.push("--exact".into());
    args.extend(names.iter().cloned());
    args
}

/// The tests `binary` would run with `test_args`, as it lists them; `None` when it cannot
/// list (no libtest harness).
fn list(binary: &Path, dir: &Path, env: &[(String, String)], test_args: &[String]) -> Option<Vec<String>> {
    let mut cmd = crate::process::command(binary);
    cmd.args(["--list", "--format", "terse"]).args(split_args(test_args).0).current_dir(dir);
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    // A binary that cannot be run to list its tests is no libtest harness to this.
    let out = crate::process::output(&cmd).ok().filter(|out| out.status.success())?;
    let text = String::from_utf8_lossy(&out.stdout);
    let names = text.lines().filter_map(|l| l.strip_suffix(": test")).map(str::to_string).collect();
    Some(names)
}

/// libtest's options that take a value.
const WITH_VALUE: &[&str] = &["--test-threads", "--skip", "--logfile", "--format", "--color", "-Z", "--shuffle-seed"];

/// The test arguments split in two: those that choose which tests are listed (filters,
/// `--skip`, `--exact`, `--ignored`, `--include-ignored`; not `--format`, the listing's
/// own), and those the share runs with (the flags: the share names its tests itself,
/// with `--exact` added once, and `--skip` is applied by the listing).
fn split_args(test_args: &[String]) -> (Vec<String>, Vec<String>) {
    let (mut listing, mut flags) = (Vec::new(), Vec::new());
    let mut args = test_args.iter();
    while let Some(arg) = args.next() {
        let name = arg.split('=').next().unwrap_or(arg);
        let mut words = vec![arg.clone()];
        if WITH_VALUE.contains(&name) && !arg.contains('=') {
            words.extend(args.next().cloned());
        }
        let selects = !arg.starts_with('-') || ["--exact", "--ignored", "--include-ignored", "--skip"].contains(&name);
        if selects {
            listing.extend(words.iter().cloned());
        }
        if arg.starts_with('-') && name != "--exact" && name != "--skip" {
            flags.extend(words);
        }
    }
    (listing, flags)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_parse_as_nextest_writes_them() {
        assert_eq!(parse("count:1/3"), Ok(Partition::Count { k: 1, n: 3 }));
        assert_eq!(parse("hash:2/2"), Ok(Partition::Hash { k: 2, n: 2 }));
        for bad in ["3/2", "count:3/2", "count:0/4", "count:1/0", "slice:1/2", "count:1", "count:a/2", "count:+1/2", ""]
        {
            let err = parse(bad).expect_err(bad);
            assert!(err.contains("give count:K/N or hash:K/N"), "{bad}: {err}");
        }
    }

    #[test]
    fn every_test_is_in_exactly_one_share() {
        let names: Vec<String> = (0..97).map(|i| format!("module::test_{i}")).collect();
        for n in 1..=5 {
            for make in [|k, n| Partition::Count { k, n }, |k, n| Partition::Hash { k, n }] {
                let mut seen = vec![0; names.len()];
                for k in 1..=n {
                    for (i, name) in names.iter().enumerate() {
                        if make(k, n).selects("-p a --test b", i as u64, name) {
                            seen[i] += 1;
                        }
                    }
                }
                assert!(seen.iter().all(|&s| s == 1), "n = {n}: {seen:?}");
            }
        }
        // Counted shares are as even as they can be; hashed ones do not move when a
        // test is added before them.
        let share = |k| (0..97u64).filter(|i| Partition::Count { k, n: 4 }.selects("", *i, "")).count();
        assert_eq!((share(1), share(2), share(4)), (25, 24, 24));
        let hash = Partition::Hash { k: 1, n: 3 };
        assert_eq!(hash.selects("b", 0, "t"), hash.selects("b", 40, "t"));
    }

    #[test]
    fn filters_choose_the_listing_and_flags_stay_for_the_run() {
        let args: Vec<String> =
            ["--ignored", "net", "--test-threads", "2", "--skip", "slow", "--nocapture"].map(String::from).into();
        let (listing, flags) = split_args(&args);
        assert_eq!(listing, ["--ignored", "net", "--skip", "slow"]);
        assert_eq!(flags, ["--ignored", "--test-threads", "2", "--nocapture"]);
    }
}
