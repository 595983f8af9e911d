//! `cargo xtask test --isolate`: every test in a VM of its own. Each binary's tests are
//! listed on the host ([`super::partition::listed`]: the run's filters, and a
//! `--partition` share, applied), then each test runs alone (`--exact NAME` with the
//! run's flags, by the guest script a normal run uses) in a VM restored from the one
//! snapshot of the system's VM (made first when missing, as with `--warm`): its RAM the
//! snapshot's file mapped private, copy-on-write, its root a volatile overlay, its `/tmp`
//! and `target/tmp` its own, the workspace read-only, so nothing one test writes is seen
//! by another. Several VMs run at once ([`jobs`]). A test's output is printed whole when
//! its VM ends; each binary's reads as libtest's: `running N tests`, a line per test, the
//! failures' output, `test result: ...`, then cargo's words after a failed binary.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use guest::{Mode, Status};

use super::{partition, Shared, SuiteRun, TestBinary, Words, EXIT_TEST_FAILED};
use crate::error::{usage_error, Failure, EXIT_TIMEOUT};
use crate::machine::{Machine, VmOpts};
use crate::vm::qemu::Share;
use crate::vm::snapshot::Warmth;
use crate::vm::{GuestRequest, Sink, VmRun};
use crate::Workspace;

/// Names how many VMs run at once, instead of [`jobs`]'s choice.
pub const JOBS_ENV: &str = "XTASK_ISOLATE_JOBS";
/// What QEMU itself takes besides the guest's RAM, at most (MiB), for [`jobs`].
const QEMU_OVERHEAD_MIB: u64 = 64;
/// At most this much of a test's stdout, and of its stderr, is kept.
const OUTPUT_CAP: usize = 16 << 20;

/// How many VMs run at once: [`JOBS_ENV`] when set (1 to 256), else twice the cores (a
/// restored VM spends much of its short life not computing: QEMU starting, its state
/// loading, the guest waiting on 9p), but no more than the available memory holds with
/// each guest's whole RAM written (its pages are the snapshot's, shared, until written)
/// plus QEMU's own.
pub fn jobs(memory_mib: u32) -> Result<usize> {
    if let Some(value) = std::env::var_os(JOBS_ENV) {
        let value = value.to_string_lossy();
        return match value.parse::<usize>() {
            Ok(n @ 1..=256) => Ok(n),
            _ => Err(usage_error(format!("{JOBS_ENV}=`{}`: give a number of VMs from 1 to 256", value.escape_debug()))),
        };
    }
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let per_vm = u64::from(memory_mib) + QEMU_OVERHEAD_MIB;
    let by_memory = available_mib().map_or(usize::MAX, |mib| (mib / per_vm) as usize);
    Ok((2 * cores).min(by_memory).max(1))
}

/// `MemAvailable` of `/proc/meminfo`, in MiB.
fn available_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find_map(|l| l.strip_prefix("MemAvailable:"))?;
    Some(line.trim().trim_end_matches("kB").trim().parse::<u64>().ok()? / 1024)
}

/// One test run alone: its binary (with the arguments that run it alone) and its name
/// (none for a binary that is no libtest harness: it runs whole).
struct Unit {
    binary: usize,
    name: Option<String>,
    /// The guest script's `run` line.
    line: String,
}

/// How a test's VM ended.
enum Ended {
    Status(Status),
    /// Past its timeout: the message.
    TimedOut(String),
    Error(anyhow::Error),
}

/// A test's VM, ended: what the test printed, and how it ended.
struct UnitEnd {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    ended: Ended,
    started: Instant,
    finished: Instant,
}

/// Lists the tests of the binaries `binaries` builds and runs each in a VM of its own
/// (see the module's doc). Returns 0, or [`EXIT_TEST_FAILED`]; a test past its timeout
/// is an error with [`EXIT_TIMEOUT`].
pub fn run(
    ws: &Workspace,
    opts: &VmOpts,
    run: SuiteRun,
    binaries: impl FnOnce() -> Result<Vec<(TestBinary, Option<Vec<String>>)>>,
) -> Result<i32> {
    let SuiteRun { shared, system, test_args, words, junit, .. } = run;
    let jobs = jobs(opts.memory)?;
    let store = opts.open_store(ws)?;
    let mut virtualized = crate::machine::virtualize(system);
    // As a normal run's VM, so that both restore the same snapshot.
    if crate::vm::virtiofs::virtiofsd(&store).is_ok() {
        virtualized.initrd_modules.push(crate::vm::virtiofs::MODULE.to_string());
    }
    let machine = Machine::prepare(ws, opts, &store, system, virtualized)?;
    let binaries = binaries()?;
    let store = &machine.store;
    let mut lowered = machine.lower_packages()?;
    let just_binaries: Vec<TestBinary> = binaries.iter().map(|(b, _)| b.clone()).collect();
    let added = super::add_binaries(shared, store, &mut lowered, &just_binaries)?;
    let system_item = crate::lower::system::system_item(store, &machine.system, &lowered)?;
    let mut units = Vec::new();
    let mut labels = Vec::new();
    for (i, ((binary, names), (label, path))) in binaries.iter().zip(added).enumerate() {
        match names {
            None => units.push(Unit { binary: i, name: None, line: super::run_line(binary, &label, &path, test_args) }),
            Some(names) => {
                for name in names {
                    let mut alone = binary.clone();
                    alone.args = Some(partition::exact_args(test_args, std::slice::from_ref(name)));
                    let line = super::run_line(&alone, &label, &path, test_args);
                    units.push(Unit { binary: i, name: Some(name.clone()), line });
                }
            }
        }
        labels.push(label);
    }
    if units.is_empty() {
        eprintln!("no tests to run");
    }
    // The workspace's sources, staged once, shared read-only with every test's VM.
    let mut probe = machine.spec(Path::new("/").to_path_buf());
    let (_view, _staged) = super::share_workspace(ws, store, shared, &mut probe)?;
    let workspace = probe.shares.pop().context("the workspace's share")?;
    let jobs = jobs.min(units.len().max(1));
    let vms = Vms {
        machine: &machine,
        lowered: &lowered,
        system_item: &system_item,
        workspace,
        shared,
        labels: &labels,
        limit: opts.test_binary_timeout(),
        gate: Gate::default(),
    };
    let mut report = Report::new(&binaries, &labels, &units, words, junit.is_some());
    if !units.is_empty() {
        report.announce(0);
    }
    let started = Instant::now();
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let (tx, rx) = mpsc::channel::<(usize, UnitEnd)>();
    std::thread::scope(|scope| {
        for worker in 0..jobs {
            let (tx, vms, units, next, stop) = (tx.clone(), &vms, &units, &next, &stop);
            scope.spawn(move || loop {
                // The first test's VM makes the snapshot if it is missing; the others
                // wait until it has been restored from it.
                if worker > 0 {
                    vms.gate.wait();
                }
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(unit) = units.get(i) else { break };
                let end = vms.run(i, unit);
                vms.gate.open();
                if tx.send((i, end)).is_err() {
                    break;
                }
            });
        }
        drop(tx);
        for (i, end) in rx {
            if report.take(&units, i, end) {
                stop.store(true, Ordering::SeqCst);
            }
        }
    });
    report.finish(started, units.len(), jobs);
    if let Some(file) = junit {
        super::junit::write(&report.junit.report("cargo xtask test --isolate"), file)?;
    }
    report.outcome()
}

/// What every test's VM is made of, and the gate the first one opens.
struct Vms<'a> {
    machine: &'a Machine<'a>,
    lowered: &'a crate::lower::system::Lowered,
    system_item: &'a crate::store::Item,
    /// The staged workspace, shared read-only.
    workspace: Share,
    shared: &'a Shared,
    /// Each binary's label.
    labels: &'a [String],
    /// Each test's timeout (the per-binary `--timeout`).
    limit: Option<Duration>,
    gate: Gate,
}

impl Vms<'_> {
    /// Runs the `index`-th test `unit` in a VM of its own, restored from the snapshot.
    fn run(&self, index: usize, unit: &Unit) -> UnitEnd {
        let what = match &unit.name {
            Some(name) => format!("the test `{name}` of `{}`", self.labels[unit.binary]),
            None => format!("`{}`", self.labels[unit.binary]),
        };
        let watch = Arc::new(Capture::new(self.limit, what));
        let started = Instant::now();
        let ended = match self.vm(index, unit, watch.clone()) {
            Ok(status) => Ended::Status(status),
            Err(e) => match e.downcast_ref::<Failure>() {
                Some(f) if f.code == EXIT_TIMEOUT => Ended::TimedOut(f.message.clone()),
                _ => Ended::Error(e),
            },
        };
        let [stdout, stderr] = std::mem::take(&mut *watch.lock());
        UnitEnd { stdout, stderr, ended, started, finished: Instant::now() }
    }

    fn vm(&self, index: usize, unit: &Unit, watch: Arc<Capture>) -> Result<Status> {
        let machine = self.machine;
        let store = &machine.store;
        let script = format!(
            "{} replay_rerun={}\n{}\n{}\n{}\n",
            Words::Runner.settings(),
            guest::replay::RERUN,
            super::RUN_FUNCTION,
            unit.line,
            super::SUMMARY
        );
        let argv = vec!["sh".into(), "-c".into(), script];
        let mut request = machine.request(self.lowered, self.system_item, Mode::Command, argv);
        request.mounts = super::workspace_mounts(self.shared, self.lowered.arch);
        let xchg = store.exchange()?;
        let runtime = store.scratch("run")?;
        let mut spec = machine.spec(xchg.path().to_path_buf());
        spec.shares.push(self.workspace.clone());
        let gate = &self.gate;
        // Asked for once QEMU runs: restored, the snapshot made first if it was missing.
        let later = move || {
            gate.open();
            Ok(request)
        };
        let run = VmRun {
            // The timeout is the watch's, per test.
            timeout: None,
            watch: Some(watch),
            stdout: Sink::WatchOnly,
            stderr: Sink::WatchOnly,
            snapshots: Some((store.clone(), Warmth::Make)),
            ..machine.run(
                spec,
                GuestRequest::Later(Mode::Command, Box::new(later)),
                &xchg,
                &runtime,
                &format!("test-{index}"),
            )
        };
        run.run()
    }
}

/// Shut until the first VM has started (or ended): the other workers wait for it.
#[derive(Default)]
struct Gate {
    open: Mutex<bool>,
    opened: Condvar,
}

impl Gate {
    fn open(&self) {
        *self.open.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.opened.notify_all();
    }

    fn wait(&self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        while !*open {
            open = self.opened.wait(open).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// A test VM's [`crate::vm::Watch`]: keeps the test's stdout and stderr (each up to
/// [`OUTPUT_CAP`]), and ends the VM past the test's timeout, naming the test.
struct Capture {
    limit: Option<Duration>,
    what: String,
    since: Mutex<Option<Instant>>,
    output: Mutex<[Vec<u8>; 2]>,
}

impl Capture {
    fn new(limit: Option<Duration>, what: String) -> Capture {
        Capture { limit, what, since: Mutex::default(), output: Mutex::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, [Vec<u8>; 2]> {
        self.output.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl crate::vm::Watch for Capture {
    fn output(&self, stderr: bool, bytes: &[u8]) {
        let mut output = self.lock();
        let kept = &mut output[usize::from(stderr)];
        let room = OUTPUT_CAP.saturating_sub(kept.len());
        kept.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    fn expired(&self) -> Option<String> {
        let limit = self.limit?;
        let since = *self.since.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(Instant::now);
        (since.elapsed() >= limit).then(|| {
            format!(
                "{} ran past its timeout of {} in its VM and was killed (give a longer --timeout, or --timeout none)",
                self.what,
                super::shown(limit)
            )
        })
    }
}

/// libtest's summary counts (`test result: ok. 1 passed; 0 failed; ...`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counts {
    passed: u64,
    failed: u64,
    ignored: u64,
    measured: u64,
    filtered: u64,
}

impl Counts {
    /// The counts of a `test result: ` line's rest.
    fn parse(rest: &str) -> Counts {
        let mut counts = Counts::default();
        let words: Vec<&str> = rest.split([' ', ';']).filter(|w| !w.is_empty()).collect();
        for pair in words.windows(2) {
            let Ok(n) = pair[0].parse::<u64>() else { continue };
            match pair[1] {
                "passed" => counts.passed = n,
                "failed" => counts.failed = n,
                "ignored" => counts.ignored = n,
                "measured" => counts.measured = n,
                "filtered" => counts.filtered = n,
                _ => {}
            }
        }
        counts
    }
}

/// A test binary's output (one test's), read as libtest writes it.
#[derive(Debug, Default, PartialEq, Eq)]
struct Parsed {
    /// The lines to show: the test's `test NAME ... ok` line, and what it printed
    /// (`--nocapture`).
    shown: Vec<String>,
    /// Its failure's section (`---- NAME stdout ----` and what the test printed).
    failure: Vec<String>,
    /// Its summary, if it came.
    counts: Option<Counts>,
}

/// Reads one test's stdout: libtest's `running 1 test`, the test's line, its failure
/// section and the list of failures, and its summary.
fn parse(stdout: &str) -> Parsed {
    #[derive(PartialEq)]
    enum Part {
        Lines,
        Sections,
        List,
    }
    let mut parsed = Parsed::default();
    let mut part = Part::Lines;
    for line in stdout.lines() {
        if let Some(rest) = line.strip_prefix("test result: ") {
            parsed.counts = Some(Counts::parse(rest));
            part = Part::Lines;
            continue;
        }
        match part {
            Part::Lines if line == "failures:" => part = Part::Sections,
            Part::Lines if line.starts_with("running ") && (line.ends_with(" tests") || line.ends_with(" test")) => {}
            Part::Lines => parsed.shown.push(line.to_string()),
            Part::Sections if line == "failures:" => part = Part::List,
            Part::Sections => parsed.failure.push(line.to_string()),
            Part::List => {}
        }
    }
    trim_blank(&mut parsed.shown);
    trim_blank(&mut parsed.failure);
    parsed
}

/// Drops `lines`' blank lines at the start and the end.
fn trim_blank(lines: &mut Vec<String>) {
    while lines.last().is_some_and(|l| l.trim().is_empty()) {
        lines.pop();
    }
    let first = lines.iter().position(|l| !l.trim().is_empty()).unwrap_or(lines.len());
    lines.drain(..first);
}

/// A binary's results so far.
#[derive(Default)]
struct BinaryResults {
    /// Its tests' results, waiting while an earlier binary is shown.
    waiting: BTreeMap<usize, UnitEnd>,
    done: usize,
    counts: Counts,
    /// The first test's `filtered out` count, and how many tests ran.
    filtered: Option<u64>,
    failures: Vec<Vec<String>>,
    failed: Vec<String>,
    /// Whether it failed otherwise (no harness, or a crash).
    broken: bool,
    started: Option<Instant>,
    finished: Option<Instant>,
}

/// What the run prints, binary by binary in cargo's order, each test's as its VM ends.
struct Report<'a> {
    binaries: &'a [(TestBinary, Option<Vec<String>>)],
    labels: &'a [String],
    /// How many tests each binary has.
    sizes: Vec<usize>,
    results: Vec<BinaryResults>,
    /// The binary shown now.
    current: usize,
    /// Whether its `Running` line was said.
    announced: bool,
    words: Words,
    junit: super::junit::Collector,
    with_junit: bool,
    failed_binaries: Vec<String>,
    failed_tests: usize,
    timed_out: Vec<String>,
    error: Option<anyhow::Error>,
    stopped: bool,
}

impl<'a> Report<'a> {
    fn new(
        binaries: &'a [(TestBinary, Option<Vec<String>>)],
        labels: &'a [String],
        units: &[Unit],
        words: Words,
        with_junit: bool,
    ) -> Report<'a> {
        let mut sizes = vec![0; binaries.len()];
        for unit in units {
            sizes[unit.binary] += 1;
        }
        let results = binaries.iter().map(|_| BinaryResults::default()).collect();
        Report {
            binaries,
            labels,
            sizes,
            results,
            current: 0,
            announced: false,
            words,
            junit: super::junit::Collector::default(),
            with_junit,
            failed_binaries: Vec::new(),
            failed_tests: 0,
            timed_out: Vec::new(),
            error: None,
            stopped: false,
        }
    }

    /// Lines on stdout (read for `--junit` too).
    fn out(&mut self, text: &str) {
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(text.as_bytes());
        let _ = stdout.flush();
        if self.with_junit {
            let now = Instant::now();
            for line in text.lines() {
                self.junit.line(line, now);
            }
        }
    }

    /// Takes the `i`-th test's end; returns whether the run stops (a failed binary
    /// failing fast, or an error).
    fn take(&mut self, units: &[Unit], i: usize, end: UnitEnd) -> bool {
        if self.stopped {
            return true;
        }
        self.results[units[i].binary].waiting.insert(i, end);
        while self.current < self.binaries.len() && !self.stopped {
            let current = self.current;
            if !self.announced {
                self.announce(current);
            }
            let waiting = std::mem::take(&mut self.results[current].waiting);
            for (i, end) in waiting {
                self.show(&units[i], end);
            }
            if self.results[current].done < self.sizes[current] {
                break;
            }
            self.end_binary(current);
            self.current += 1;
            self.announced = false;
        }
        self.stopped
    }

    fn announce(&mut self, binary: usize) {
        self.announced = true;
        if self.sizes[binary] == 0 {
            return;
        }
        let label = &self.labels[binary];
        if self.words != Words::Runner {
            eprintln!("     Running {label}");
        }
        if self.with_junit {
            self.junit.running(label);
        }
        if self.binaries[binary].1.is_some() {
            let n = self.sizes[binary];
            self.out(&format!("\nrunning {n} test{}\n", if n == 1 { "" } else { "s" }));
        }
    }

    /// Shows a test's output and takes its counts.
    fn show(&mut self, unit: &Unit, end: UnitEnd) {
        let results = &mut self.results[unit.binary];
        results.done += 1;
        results.started = Some(results.started.map_or(end.started, |s| s.min(end.started)));
        results.finished = Some(results.finished.map_or(end.finished, |f| f.max(end.finished)));
        let stdout = String::from_utf8_lossy(&end.stdout).into_owned();
        let code = match end.ended {
            Ended::Status(Status::Exited(code)) => Some(code),
            Ended::Status(Status::Signaled(sig)) => Some(128 + sig),
            Ended::Status(Status::Error(message)) => {
                self.fail(anyhow::anyhow!("the guest helper failed: {message}"));
                None
            }
            Ended::TimedOut(message) => {
                self.timed_out.push(message);
                Some(EXIT_TIMEOUT)
            }
            Ended::Error(e) => {
                self.fail(e);
                None
            }
        };
        let Some(name) = &unit.name else {
            // No libtest harness: its output as it is.
            self.out(&stdout);
            let _ = std::io::stderr().write_all(&end.stderr);
            if code != Some(0) {
                self.results[unit.binary].broken = true;
            }
            return;
        };
        let mut parsed = parse(&stdout);
        let failed = code != Some(0);
        if failed && !parsed.shown.iter().any(|l| l.starts_with(&format!("test {name} ... FAILED"))) {
            // It ended before libtest said so (a crash, a timeout).
            parsed.shown.retain(|l| !l.starts_with(&format!("test {name} ... ")));
            parsed.shown.push(format!("test {name} ... FAILED"));
        }
        let mut text = parsed.shown.join("\n");
        text.push('\n');
        self.out(&text);
        let _ = std::io::stderr().write_all(&end.stderr);
        let results = &mut self.results[unit.binary];
        if let Some(counts) = parsed.counts {
            results.counts.passed += counts.passed;
            results.counts.failed += counts.failed;
            results.counts.ignored += counts.ignored;
            results.counts.measured += counts.measured;
            results.filtered.get_or_insert(counts.filtered);
        }
        if failed {
            if parsed.counts.is_none_or(|c| c.failed == 0) {
                results.counts.failed += 1;
            }
            if let Some(code) = code.filter(|c| *c != EXIT_TEST_FAILED) {
                let how = match code {
                    EXIT_TIMEOUT => "it ran past its timeout, and its VM was killed".to_string(),
                    c if c > 128 => format!("the test binary was killed by signal {}", c - 128),
                    c => format!("the test binary exited with status {c}"),
                };
                parsed.failure.push(format!("---- {name} ----"));
                parsed.failure.push(how);
            }
            if !parsed.failure.is_empty() {
                results.failures.push(parsed.failure);
            }
            results.failed.push(name.clone());
            self.failed_tests += 1;
        }
    }

    /// libtest's end of a binary's output (its failures, its summary) and cargo's words.
    fn end_binary(&mut self, binary: usize) {
        if self.sizes[binary] == 0 {
            return;
        }
        let results = std::mem::take(&mut self.results[binary]);
        let failed = !results.failed.is_empty() || results.broken;
        if self.binaries[binary].1.is_some() {
            let mut text = String::new();
            if !results.failed.is_empty() {
                text.push_str("\nfailures:\n\n");
                let sections: Vec<String> = results.failures.iter().map(|f| f.join("\n")).collect();
                if !sections.is_empty() {
                    text.push_str(&sections.join("\n\n"));
                    text.push_str("\n\n");
                    // As a normal run: the failures' reports on stderr too.
                    eprintln!("{}\n", sections.join("\n\n"));
                }
                text.push_str("failures:\n");
                for name in &results.failed {
                    text.push_str(&format!("    {name}\n"));
                }
            }
            let c = results.counts;
            let filtered = results.filtered.map_or(0, |f| (f + 1).saturating_sub(self.sizes[binary] as u64));
            let took = match (results.started, results.finished) {
                (Some(s), Some(f)) => (f - s).as_secs_f64(),
                _ => 0.0,
            };
            text.push_str(&format!(
                "\ntest result: {}. {} passed; {} failed; {} ignored; {} measured; {filtered} filtered out; \
                 finished in {took:.2}s\n\n",
                if failed { "FAILED" } else { "ok" },
                c.passed,
                c.failed,
                c.ignored,
                c.measured,
            ));
            self.out(&text);
        }
        if failed {
            let rerun = &self.binaries[binary].0.rerun;
            if self.words != Words::Runner {
                eprintln!("error: test failed, to rerun pass `{rerun}`");
            }
            self.failed_binaries.push(rerun.clone());
            if self.words == Words::FailFast {
                self.stopped = true;
            }
        }
    }

    /// An error that is no test's failure: the run stops at it.
    fn fail(&mut self, e: anyhow::Error) {
        self.error.get_or_insert(e);
        self.stopped = true;
    }

    /// The run's last line on stderr.
    fn finish(&mut self, started: Instant, tests: usize, jobs: usize) {
        if self.words == Words::NoFailFast && !self.failed_binaries.is_empty() {
            let n = self.failed_binaries.len();
            let list: Vec<String> = self.failed_binaries.iter().map(|r| format!("\n    `{r}`")).collect();
            eprintln!("error: {n} target{} failed:{}", if n == 1 { "" } else { "s" }, list.concat());
        }
        eprintln!(
            "isolated: {tests} test{} in a VM each, restored from one snapshot ({jobs} at a time): {} failed, \
             in {:.1} s",
            if tests == 1 { "" } else { "s" },
            self.failed_tests,
            started.elapsed().as_secs_f64()
        );
    }

    /// The run's exit status, or its error.
    fn outcome(&mut self) -> Result<i32> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        if let Some(first) = self.timed_out.first() {
            let more = match self.timed_out.len() {
                1 => String::new(),
                n => format!(" ({} more tests ran past it too)", n - 1),
            };
            return Err(Failure { code: EXIT_TIMEOUT, message: format!("{first}{more}") }.into());
        }
        Ok(if self.failed_binaries.is_empty() { 0 } else { EXIT_TEST_FAILED })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tests_output_is_read_as_libtest_writes_it() {
        let passed = "\nrunning 1 test\ntest a::b ... ok\n\ntest result: ok. 1 passed; 0 failed; 0 ignored; \
                      0 measured; 2 filtered out; finished in 0.00s\n\n";
        let p = parse(passed);
        assert_eq!(p.shown, ["test a::b ... ok"]);
        assert!(p.failure.is_empty());
        assert_eq!(p.counts, Some(Counts { passed: 1, filtered: 2, ..Counts::default() }));
        let failed = "\nrunning 1 test\ntest c ... FAILED\n\nfailures:\n\n---- c stdout ----\nthread 'c' panicked \
                      at x.rs:1:1:\nboom\n\n\nfailures:\n    c\n\ntest result: FAILED. 0 passed; 1 failed; 0 \
                      ignored; 0 measured; 0 filtered out; finished in 0.01s\n\n";
        let p = parse(failed);
        assert_eq!(p.shown, ["test c ... FAILED"]);
        assert_eq!(p.failure, ["---- c stdout ----", "thread 'c' panicked at x.rs:1:1:", "boom"]);
        assert_eq!(p.counts, Some(Counts { failed: 1, ..Counts::default() }));
        // What a test prints with --nocapture is shown; a crash leaves no summary.
        let p = parse("\nrunning 1 test\ntest d ... hello\nworld\n");
        assert_eq!((p.shown, p.counts), (vec!["test d ... hello".to_string(), "world".to_string()], None));
    }

    #[test]
    fn a_bad_number_of_vms_is_a_usage_error() {
        // SAFETY (set_var): this test alone reads or writes the variable.
        std::env::set_var(JOBS_ENV, "0");
        let err = jobs(256).unwrap_err();
        assert_eq!(crate::error::exit_code(&err), crate::error::EXIT_USAGE);
        assert!(err.to_string().contains("XTASK_ISOLATE_JOBS=`0`"), "{err}");
        std::env::set_var(JOBS_ENV, "3");
        assert_eq!(jobs(256).unwrap(), 3);
        std::env::remove_var(JOBS_ENV);
        assert!(jobs(256).unwrap() >= 1);
    }
}
