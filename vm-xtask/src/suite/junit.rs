//! `cargo xtask test --junit FILE`: the run's results as JUnit XML, as CI systems read
//! it (GitHub Actions, GitLab, Jenkins), written by `quick-junit`. Read from what the test
//! binaries print (libtest's lines: `running N tests`, `test NAME ... ok|FAILED|ignored`,
//! the `---- NAME stdout ----` sections of the failures, `test result: ...`) and the
//! `Running LABEL` line before each binary: one `testsuite` per binary, one `testcase` per
//! test. libtest on stable Rust reports no time per test: a test's time is the time from
//! the previous result of its binary (or the binary's start) to its own, which is the
//! test's own time when the tests run one at a time (`--test-threads=1`) and an upper
//! bound's share otherwise; a suite's time is its binary's.

use std::time::{Duration, Instant};

use quick_junit::{NonSuccessKind, Report, TestCase, TestCaseStatus, TestSuite};

/// At most this much captured output is kept per failed test.
const OUTPUT_CAP: usize = 256 * 1024;

/// One test's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Passed,
    Failed,
    Ignored,
}

/// A test, as its binary reported it.
#[derive(Debug, Clone)]
pub struct Case {
    pub name: String,
    pub outcome: Outcome,
    pub time: Duration,
    /// For a failure: what the test printed (its `---- NAME stdout ----` section).
    pub output: String,
}

/// A binary's tests.
#[derive(Debug, Clone, Default)]
pub struct Suite {
    pub cases: Vec<Case>,
    pub time: Duration,
    /// Whether its `test result:` line came (else the binary ended early: crashed,
    /// timed out, or was no libtest harness).
    pub finished: bool,
}

/// Reads libtest's output as it comes, a line at a time.
#[derive(Default)]
pub struct Collector {
    /// Each binary's `Running` label, in order.
    labels: Vec<String>,
    suites: Vec<Suite>,
    /// When the current suite started, and its last result came.
    started: Option<Instant>,
    last: Option<Instant>,
    /// The failure whose output is being read, by its index in the current suite.
    capturing: Option<usize>,
}

impl Collector {
    /// A binary's `Running LABEL` line (stderr).
    pub fn running(&mut self, label: &str) {
        self.labels.push(label.to_string());
    }

    /// A line of the binaries' stdout.
    pub fn line(&mut self, line: &str, now: Instant) {
        if line.starts_with("running ") && line.ends_with(" tests") || line == "running 1 test" {
            self.suites.push(Suite::default());
            (self.started, self.last, self.capturing) = (Some(now), Some(now), None);
            return;
        }
        let Some(suite) = self.suites.last_mut() else { return };
        if line.starts_with("test result: ") {
            suite.finished = true;
            suite.time = self.started.map(|s| now - s).unwrap_or_default();
            self.capturing = None;
            return;
        }
        if let Some(name) = line.strip_prefix("---- ").and_then(|l| l.strip_suffix(" stdout ----")) {
            self.capturing = suite.cases.iter().position(|c| c.name == name && c.outcome == Outcome::Failed);
            return;
        }
        if line == "failures:" || line == "successes:" {
            self.capturing = None;
            return;
        }
        if let Some(i) = self.capturing {
            let output = &mut suite.cases[i].output;
            if output.len() < OUTPUT_CAP {
                output.push_str(line);
                output.push('\n');
            }
            return;
        }
        let Some((name, after)) = line.strip_prefix("test ").and_then(|l| l.rsplit_once(" ... ")) else { return };
        let outcome = match after.split_whitespace().next() {
            Some("ok") => Outcome::Passed,
            Some("FAILED") => Outcome::Failed,
            Some("ignored" | "ignored,") => Outcome::Ignored,
            _ => return,
        };
        let time = self.last.map(|l| now - l).unwrap_or_default();
        self.last = Some(now);
        suite.cases.push(Case { name: name.to_string(), outcome, time, output: String::new() });
    }

    /// The suites so far, each with its binary's label.
    pub fn suites(&self) -> Vec<(String, Suite)> {
        self.suites
            .iter()
            .enumerate()
            .map(|(i, s)| (self.labels.get(i).cloned().unwrap_or_else(|| format!("binary {}", i + 1)), s.clone()))
            .collect()
    }

    /// The JUnit report of the run (`name`: what ran).
    pub fn report(&self, name: &str) -> Report {
        let mut report = Report::new(name);
        let mut total = Duration::ZERO;
        for (label, suite) in self.suites() {
            let mut test_suite = TestSuite::new(label.as_str());
            test_suite.set_time(suite.time);
            total += suite.time;
            for case in &suite.cases {
                let status = match case.outcome {
                    Outcome::Passed => TestCaseStatus::success(),
                    Outcome::Ignored => TestCaseStatus::skipped(),
                    Outcome::Failed => {
                        let mut status = TestCaseStatus::non_success(NonSuccessKind::Failure);
                        status.set_message(failure_message(&case.output));
                        status
                    }
                };
                let mut test_case = TestCase::new(case.name.as_str(), status);
                test_case.set_classname(label.as_str()).set_time(case.time);
                if case.outcome == Outcome::Failed {
                    test_case.set_system_out_lossy(case.output.as_bytes());
                }
                test_suite.add_test_case(test_case);
            }
            if !suite.finished {
                // The binary ended before libtest's summary: say so as a failed case, so
                // that CI shows it.
                let mut status = TestCaseStatus::non_success(NonSuccessKind::Error);
                status.set_message("the test binary ended before reporting its results (crashed or timed out)");
                let mut test_case = TestCase::new("(binary)", status);
                test_case.set_classname(label.as_str());
                test_suite.add_test_case(test_case);
            }
            report.add_test_suite(test_suite);
        }
        report.set_time(total);
        report
    }
}

/// Writes `report` to `file` as JUnit XML.
pub fn write(report: &Report, file: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    let mut text = Vec::new();
    report.serialize(&mut text).context("writing the JUnit report")?;
    std::fs::write(file, text).with_context(|| format!("writing the JUnit report `{}`", file.display()))
}

/// The line of a failure's output that says why: libtest's panic message (the line after
/// `thread '...' panicked at ...`), else the first line.
fn failure_message(output: &str) -> String {
    let mut lines = output.lines();
    while let Some(line) = lines.next() {
        // `thread 'NAME' panicked at FILE:LINE:COL:`, or with the thread's id after the
        // name (`thread 'NAME' (87) panicked at ...`), as recent Rust says it.
        if line.starts_with("thread '") && line.contains(" panicked at ") {
            if let Some(next) = lines.next() {
                return next.to_string();
            }
            return line.to_string();
        }
    }
    output.lines().find(|l| !l.trim().is_empty()).unwrap_or("failed").to_string()
}

/// `--junit FILE` is refused before anything is built unless FILE can be written: a
/// directory that exists, a name that is no directory.
pub fn check_file(file: &std::path::Path) -> anyhow::Result<()> {
    let parent = file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    if file.is_dir() || !parent.is_dir() {
        return Err(crate::error::usage_error(format!(
            "--junit `{}`: give a file in a directory that exists",
            file.display().to_string().escape_debug()
        )));
    }
    Ok(())
}

/// Writes scenario `name`'s result to `file` as JUnit XML: a `testsuite` named after it
/// with one `testcase`, its script, failed with the error (its first line the message,
/// the whole the output).
pub fn write_scenario(
    file: &std::path::Path,
    name: &str,
    time: std::time::Duration,
    result: &anyhow::Result<()>,
) -> anyhow::Result<()> {
    let status = match result {
        Ok(()) => TestCaseStatus::success(),
        Err(e) => {
            let mut status = TestCaseStatus::non_success(NonSuccessKind::Failure);
            status.set_message(format!("{e}"));
            status
        }
    };
    let mut case = TestCase::new("script", status);
    case.set_classname(name).set_time(time);
    if let Err(e) = result {
        case.set_system_out_lossy(format!("{e:#}").as_bytes());
    }
    let mut suite = TestSuite::new(name);
    suite.set_time(time).add_test_case(case);
    let mut report = Report::new(format!("cargo xtask scenario {name}"));
    report.set_time(time).add_test_suite(suite);
    write(&report, file)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUN: &str = "
running 3 tests
test a::passes ... ok
test b::fails ... FAILED
test c::skipped ... ignored, needs a VM

failures:

---- b::fails stdout ----
printed before the panic

thread 'b::fails' panicked at src/lib.rs:9:5:
assertion `left == right` failed
  left: 1
 right: 2
note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace


failures:
    b::fails

test result: FAILED. 1 passed; 1 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.00s

running 1 test
test only ... ok

test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s

running 2 tests
test started ... ";

    #[test]
    fn libtest_output_becomes_suites_cases_failures_and_an_unfinished_binary() {
        let mut c = Collector::default();
        let t0 = Instant::now();
        c.running("unittests src/lib.rs (target/debug/deps/a-1)");
        c.running("tests/it.rs (target/debug/deps/it-2)");
        // In pieces, as the relay hands them over.
        let mut lines = super::super::Lines::default();
        for (i, chunk) in RUN.as_bytes().chunks(7).enumerate() {
            lines.push(chunk, |line| c.line(line, t0 + Duration::from_millis(i as u64)));
        }
        let suites = c.suites();
        assert_eq!(suites.len(), 3);
        let (label, first) = &suites[0];
        assert_eq!(label, "unittests src/lib.rs (target/debug/deps/a-1)");
        let names: Vec<(&str, &Outcome)> = first.cases.iter().map(|c| (c.name.as_str(), &c.outcome)).collect();
        assert_eq!(
            names,
            [("a::passes", &Outcome::Passed), ("b::fails", &Outcome::Failed), ("c::skipped", &Outcome::Ignored)]
        );
        assert!(first.cases[1].output.contains("printed before the panic"), "{:?}", first.cases[1].output);
        assert!(first.finished && first.time > Duration::ZERO);
        assert_eq!(suites[1].0, "tests/it.rs (target/debug/deps/it-2)");
        assert_eq!(suites[2].0, "binary 3");
        assert!(!suites[2].1.finished);
        let xml = c.report("cargo xtask test").to_string().unwrap();
        assert!(xml.contains("tests=\"5\"") && xml.contains("failures=\"1\"") && xml.contains("errors=\"1\""), "{xml}");
        assert!(xml.contains("message=\"assertion `left == right` failed\""), "{xml}");
    }

    #[test]
    fn the_failure_message_is_the_panic_message() {
        assert_eq!(failure_message("x\nthread 't' panicked at a.rs:1:1:\nboom\n"), "boom");
        assert_eq!(failure_message("\nthread 't' (87) panicked at a.rs:1:1:\nbang\n"), "bang");
        assert_eq!(failure_message("\n\nfirst words\n"), "first words");
        assert_eq!(failure_message("just this\n"), "just this");
        assert_eq!(failure_message(""), "failed");
    }
}
