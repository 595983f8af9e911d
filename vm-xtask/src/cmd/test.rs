//! `cargo xtask test` and `cargo xtask test-runner`: their flags, handed to
//! [`crate::suite`], which runs the test binaries in a VM. `test` builds the selected
//! binaries with `cargo test --no-run`, and the doctests with `cargo test --doc` and
//! `test-runner` as the target's runner; `test-runner` is cargo's runner for one binary
//! (`target.<triple>.runner`), so plain `cargo test` runs in the VM.

use std::path::PathBuf;

use anyhow::{Context, Result};

use super::{usage_error, VmOpts};
use crate::machine::GdbOpts;
use crate::suite::{self, junit, Shared, SuiteRun, TestBinary, Words};
use crate::Workspace;

#[derive(Debug, Clone, clap::Args)]
pub struct Test {
    #[command(flatten)]
    pub vm: VmOpts,
    /// Also write the results as JUnit XML to FILE (a `testsuite` per test binary, a
    /// `testcase` per test, with failures and their output), for CI.
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
    /// Run only this share of the tests, for N CI jobs: `count:K/N` (the K-th of every N
    /// tests of each binary) or `hash:K/N` (by the test's name), as cargo-nextest; the
    /// doctests run in share 1.
    #[arg(long, value_name = "KIND:K/N", value_parser = suite::partition::parse)]
    pub partition: Option<suite::partition::Partition>,
    #[command(flatten)]
    pub gdb: GdbOpts,
    /// Run only the test named exactly NAME (`--exact NAME`), under gdbserver in the guest
    /// on a port forwarded to the host's loopback, waiting for gdb: the gdb command line
    /// to attach with is said on stderr. No per-binary timeout unless --timeout gives one.
    #[arg(long, value_name = "NAME", conflicts_with_all = ["junit", "partition"])]
    pub debug: Option<String>,
    /// Run every test in a VM of its own (`--exact NAME`, in its package's directory),
    /// each restored from the same snapshot of the system's VM (made first if missing, as
    /// with --warm): its memory copy-on-write, its disk changes its own, so nothing one
    /// test writes is seen by another. Several VMs at once (twice the cores, as memory
    /// allows; `XTASK_ISOLATE_JOBS=N` says how many); --timeout is each test's.
    #[arg(long, conflicts_with_all = ["debug", "gdb", "cold"])]
    pub isolate: bool,
    /// Do not save the VM when a test binary fails (saved, `cargo xtask replay ID`
    /// restores it); the workspace may then be shared over virtiofs. `XTASK_REPLAY_KEEP`
    /// is how many saved failures are kept (5; 0 saves none).
    #[arg(long)]
    pub no_replay: bool,
    /// Arguments for `cargo test` (`-p CRATE`, `--test NAME`, `--lib`, ...), then `--`
    /// and the arguments every test binary gets (`--nocapture`, a filter, ...).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "CARGO TEST ARGS")]
    pub args: Vec<String>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct TestRunner {
    #[command(flatten)]
    pub vm: VmOpts,
    /// Boot the VM that the runner calls of the doctests of cargo process PID:START will
    /// share, before the first of them comes (`test --doc` starts it with cargo).
    #[arg(long, hide = true, value_name = "PID:START", value_parser = suite::kept::parse_process)]
    pub keep_for_cargo: Option<suite::kept::Process>,
    /// The test binary cargo built, then its arguments.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        required_unless_present = "keep_for_cargo",
        value_name = "BINARY [ARGS]"
    )]
    pub args: Vec<String>,
}

impl Test {
    pub fn run(self, ws: &Workspace) -> Result<i32> {
        let (cargo_args, test_args) = match self.args.iter().position(|a| a == "--") {
            Some(i) => (self.args[..i].to_vec(), self.args[i + 1..].to_vec()),
            None => (self.args.clone(), Vec::new()),
        };
        // As cargo's: `--doc` runs the doctests alone; with no target chosen, the doctests
        // run after the test binaries.
        let first_share = matches!(
            self.partition,
            None | Some(
                suite::partition::Partition::Count { k: 1, .. } | suite::partition::Partition::Hash { k: 1, .. }
            )
        );
        let arch = self.vm.system()?.arch;
        let native = arch == os_configs::Arch::X86_64;
        // Tests are listed by running each binary on the host, which cannot run another
        // architecture's: a VM per test needs the list; a share is then of whole binaries.
        if self.isolate && !native {
            return Err(crate::error::usage_error(format!(
                "--isolate with an {arch} guest: each binary's tests are listed by running it on this host, \
                 which cannot run {arch} programs; run without --isolate"
            )));
        }
        if self.partition.is_some() && !native {
            eprintln!(
                "note: with {arch} guests a --partition share is made of whole test binaries (their tests cannot \
                 be listed on this host)"
            );
        }
        if cargo_args.iter().any(|a| a == "--doc") {
            if !native {
                return Err(crate::error::usage_error(format!(
                    "--doc with an {arch} guest: cargo builds doctests for the host only; run them without --arch"
                )));
            }
            if !first_share {
                eprintln!("the doctests run in share 1 of a --partition: none in this one");
                return Ok(0);
            }
            return self.doctests(ws, &cargo_args, &test_args);
        }
        let with_doctests = !cargo_args.iter().any(|a| selects_targets(a)) && first_share && self.debug.is_none();
        if with_doctests && !native {
            // As `cargo test --target` for another architecture: its doctests are not run.
            eprintln!("note: the doctests are not run in {arch} guests (cargo builds them for the host only)");
        }
        let with_doctests = with_doctests && native;
        if self.debug.is_some() && !native {
            return Err(crate::error::usage_error(format!(
                "--debug with an {arch} guest: the gdbserver it runs is x86_64's; debug without --arch"
            )));
        }
        let no_fail_fast = cargo_args.iter().any(|a| a == "--no-fail-fast");
        // The system is checked before anything is built; the test binaries are built
        // while the VM boots.
        let words = if no_fail_fast { Words::NoFailFast } else { Words::FailFast };
        // The workspace cargo acts on: the one `--manifest-path` names, else xtask's.
        let shared = match suite::manifest_arg(&cargo_args) {
            Some(manifest) => Shared::of_manifest(ws, &manifest)?,
            None => Shared { root: ws.root.clone(), target_dir: ws.target_dir.clone() },
        };
        let system = self.vm.system()?;
        if let Some(file) = &self.junit {
            junit::check_file(file)?;
        }
        let gdb = self.gdb.stub()?;
        let run = SuiteRun {
            shared: &shared,
            system: &system,
            test_args: &test_args,
            words,
            junit: self.junit.as_deref(),
            gdb,
            debug: None,
            replay: !self.no_replay,
        };
        if let Some(name) = &self.debug {
            return self.debug(ws, &cargo_args, name, run);
        }
        let code = if self.isolate {
            let build = || {
                let binaries = suite::build_test_binaries(ws, &cargo_args, system.arch)?;
                Ok(suite::partition::listed(binaries, &test_args, self.partition))
            };
            suite::isolate::run(ws, &self.vm, run, build)?
        } else {
            let build = || match self.partition {
                None => suite::build_test_binaries(ws, &cargo_args, system.arch),
                Some(share) => Ok(suite::partition::apply(
                    suite::build_test_binaries(ws, &cargo_args, system.arch)?,
                    &test_args,
                    share,
                )),
            };
            suite::run_in_vm(ws, &self.vm, run, build)?
        };
        if with_doctests && (code == 0 || no_fail_fast) {
            let doc = self.doctests(ws, &cargo_args, &test_args)?;
            return Ok(if code != 0 { code } else { doc });
        }
        Ok(code)
    }

    /// `--debug NAME`: the binaries built first (a name no binary has is a usage error
    /// before anything boots), then the one with the test, alone under gdbserver.
    fn debug(&self, ws: &Workspace, cargo_args: &[String], name: &str, run: SuiteRun) -> Result<i32> {
        let binary =
            suite::debug::choose(suite::build_test_binaries(ws, cargo_args, run.system.arch)?, name, run.test_args)?;
        let debug = suite::debug::Debug { host_port: suite::debug::free_port()? };
        let gdb = crate::machine::gdb_program(&self.vm.open_store(ws)?);
        suite::debug::say_how_to_attach(&gdb, &binary, name, debug);
        let mut opts = self.vm.clone();
        // A test waiting for a debugger is not hung: no per-binary timeout unless asked.
        opts.timeout.get_or_insert(crate::parse::Timeout::Never);
        suite::run_in_vm(ws, &opts, SuiteRun { debug: Some(debug), ..run }, || Ok(vec![binary]))
    }

    /// `cargo test --doc` with `cargo_args`, this program's `test-runner` (with this
    /// command's own options) as the runner: every doctest of the run in one VM.
    fn doctests(&self, ws: &Workspace, cargo_args: &[String], test_args: &[String]) -> Result<i32> {
        let argv: Vec<String> = std::env::args().collect();
        let at = argv.iter().position(|a| a == "test").context("finding `test` in the command line")?;
        let own = runner_options(&argv[at + 1..argv.len() - self.args.len()]);
        let exe = std::env::current_exe().context("finding this program")?;
        let mut runner = vec![exe.to_string_lossy().into_owned()];
        runner.extend(argv[1..at].iter().cloned());
        runner.push("test-runner".into());
        runner.extend(own);
        suite::doctests(ws, &runner, cargo_args, test_args)
    }
}

/// `test`'s own options without `--junit FILE`, `--partition SHARE` and `--isolate` (the
/// runner it passes them to has none of them).
fn runner_options(own: &[String]) -> Vec<String> {
    let mut kept = Vec::new();
    let mut skip = false;
    for arg in own {
        if std::mem::take(&mut skip) {
            continue;
        }
        let name = arg.split('=').next().unwrap_or(arg);
        match name {
            "--junit" | "--partition" => skip = !arg.contains('='),
            // The doctests run in one kept VM, as without it.
            "--isolate" => {}
            // The doctests' kept VM saves no failure.
            "--no-replay" => {}
            _ => kept.push(arg.clone()),
        }
    }
    kept
}

/// Whether a `cargo test` argument chooses targets (then cargo runs no doctests unless
/// `--doc`).
fn selects_targets(arg: &str) -> bool {
    let name = arg.split('=').next().unwrap_or(arg);
    [
        "--lib",
        "--bin",
        "--bins",
        "--test",
        "--tests",
        "--bench",
        "--benches",
        "--example",
        "--examples",
        "--all-targets",
    ]
    .contains(&name)
}

impl TestRunner {
    pub fn run(self, ws: &Workspace) -> Result<i32> {
        if let Some(cargo) = self.keep_for_cargo {
            return suite::kept::keep_ahead(ws, &self.vm, cargo);
        }
        let (binary, test_args) = self.args.split_first().context("no test binary")?;
        let path = std::path::absolute(binary).with_context(|| format!("finding `{binary}`"))?;
        if !path.is_file() {
            return Err(usage_error(format!("`{binary}` is not a test binary (cargo runs its runner with one)")));
        }
        // Cargo runs the runner in the package's directory, with its manifest directory set.
        let package_dir = std::env::var_os("CARGO_MANIFEST_DIR")
            .map(PathBuf::from)
            .unwrap_or(std::env::current_dir().context("the current directory")?);
        let label = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        // The binary's own workspace is shared, wherever it is: found before anything boots
        // (once per cargo command for its doctests).
        let doctest_cargo = suite::kept::doctest_cargo();
        let shared = match doctest_cargo {
            Some(cargo) => suite::kept::doctest_workspace(ws, &path, &package_dir, cargo)?,
            None => Shared::of_binary(&path, &package_dir)?,
        };
        if suite::kept::is_keeper() {
            return suite::kept::keep(ws, &self.vm, &self.vm.system()?, &shared);
        }
        // Cargo's variables for the binary, as cargo gave them to its runner (not
        // `CARGO`, the host's cargo, which the guest has not).
        let env = std::env::vars().filter(|(k, _)| k.starts_with("CARGO_")).collect();
        let binary = TestBinary { path, package_dir, label, env, rerun: String::new(), args: None, under: vec![] };
        // Doctests, one binary each: all of one cargo command's in one VM, kept meanwhile.
        if let Some(cargo) = doctest_cargo {
            return suite::kept::run(ws, &shared, &self.vm, &binary, test_args, cargo);
        }
        // Cargo says `Running` and how a failure is run again itself.
        let system = self.vm.system()?;
        let run = SuiteRun {
            shared: &shared,
            system: &system,
            test_args,
            words: Words::Runner,
            junit: None,
            gdb: None,
            debug: None,
            replay: true,
        };
        suite::run_in_vm(ws, &self.vm, run, || Ok(vec![binary]))
    }
}
