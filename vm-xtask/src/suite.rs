//! A workspace's test suite in a VM (`cargo xtask test` and `test-runner` parse their
//! flags and call here): the test binaries run inside a VM of a system (its services up
//! first), one after another in `cargo test`'s order and with its words, their output
//! streamed; exit status 101 when a test failed. Each binary has a timeout (`--timeout`,
//! 10 minutes unless given): a binary running past it stops the VM, naming the test that
//! was still running.
//!
//! The binaries are those `cargo test --no-run` built (read through `cargo_metadata`'s
//! messages), or the one cargo runs its runner with. Each binary is a store item with its
//! shared-library closure (as a `Package::Host`); the workspace's sources (and nothing
//! else of it: [`crate::vm::workspace_view`]) are shared read-only at its own path, with
//! a tmpfs over `target/tmp` (`CARGO_TARGET_TMPDIR`). Doctests run through the runner,
//! all of one cargo command's in one VM ([`kept`]).

use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use guest::{Mode, MountSpec};
use os_configs::Arch;

use crate::error::usage_error;
use crate::machine::{Machine, VmOpts};
use crate::process::shell_quote;
use crate::vm::qemu::{self, Share};
use crate::vm::{GuestRequest, Sink, VmRun};
use crate::{lower::packages, lower::system, Workspace};

pub mod debug;
pub mod isolate;
pub mod junit;
pub mod kept;
pub mod partition;

/// The 9p tag of the workspace share.
const WORKSPACE_TAG: &str = "workspace";
/// Exit status when a test failed (as `cargo test`).
pub const EXIT_TEST_FAILED: i32 = 101;

/// One test binary and how cargo would run it.
#[derive(Debug, Clone)]
pub struct TestBinary {
    pub path: PathBuf,
    /// The package's directory: the working directory.
    pub package_dir: PathBuf,
    /// As cargo says it: `unittests src/lib.rs`, `tests/it.rs`, ...
    pub label: String,
    /// The variables cargo sets when it runs it (`CARGO_MANIFEST_DIR`, `CARGO_PKG_NAME`, ...).
    pub env: Vec<(String, String)>,
    /// What `cargo test` would run again for it: `-p vm-checks --test in_vm`; empty for
    /// the runner's binary (cargo says it itself).
    pub rerun: String,
    /// The arguments it runs with, when not the run's (`--partition`'s share of it).
    pub args: Option<Vec<String>>,
    /// The command it runs under in the guest, if any (gdbserver, for `test --debug`).
    pub under: Vec<String>,
}

/// Where cargo runs a binary among the others: by package, then the library's unit
/// tests, the binaries', the integration tests, the benchmarks, the examples', each by
/// name (the order of cargo's units).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct CargoOrder {
    pub package: String,
    pub version: String,
    pub kind: u8,
    pub target: String,
}

impl CargoOrder {
    /// The rank of a target of `kinds` (cargo_metadata's words), and the option that
    /// selects it (`--lib`, `--bin`, `--test`, `--bench`, `--example`).
    pub fn kind(kinds: &[String]) -> (u8, &'static str) {
        let has = |k: &str| kinds.iter().any(|x| x == k);
        if has("bin") {
            (1, "--bin")
        } else if has("test") {
            (2, "--test")
        } else if has("bench") {
            (3, "--bench")
        } else if has("example") {
            (4, "--example")
        } else {
            (0, "--lib")
        }
    }
}

/// The name and version of the package cargo's id `repr` names (`path+file:///x/vm-checks#0.1.0`,
/// `path+file:///x/dir#name@0.1.0`, `registry+https://...#name@1.2.3`, or the older
/// `name 0.1.0 (path+file:///x)`).
pub fn package_name_version(repr: &str) -> (String, String) {
    if let Some((url, fragment)) = repr.rsplit_once('#') {
        return match fragment.rsplit_once('@') {
            Some((name, version)) => (name.to_string(), version.to_string()),
            None => {
                let name = url.trim_end_matches('/').rsplit('/').next().unwrap_or_default();
                (name.to_string(), fragment.to_string())
            }
        };
    }
    let mut words = repr.split_whitespace();
    (words.next().unwrap_or_default().to_string(), words.next().unwrap_or_default().to_string())
}

/// The variables cargo sets when it runs a test binary of package `name` `version` at
/// `package_dir` (those it knows without reading the manifest).
fn cargo_env(package_dir: &Path, name: &str, version: &str) -> Vec<(String, String)> {
    let dir = package_dir.to_string_lossy().into_owned();
    let core = version.split(['-', '+']).next().unwrap_or_default();
    let mut parts = core.split('.');
    let mut part = || parts.next().unwrap_or_default().to_string();
    let pre = version.split_once('-').map(|(_, p)| p.split('+').next().unwrap_or_default()).unwrap_or_default();
    vec![
        ("CARGO_MANIFEST_DIR".into(), dir.clone()),
        ("CARGO_MANIFEST_PATH".into(), format!("{dir}/Cargo.toml")),
        ("CARGO_PKG_NAME".into(), name.into()),
        ("CARGO_PKG_VERSION".into(), version.into()),
        ("CARGO_PKG_VERSION_MAJOR".into(), part()),
        ("CARGO_PKG_VERSION_MINOR".into(), part()),
        ("CARGO_PKG_VERSION_PATCH".into(), part()),
        ("CARGO_PKG_VERSION_PRE".into(), pre.into()),
    ]
}

/// The workspace whose sources a test VM sees, and its target directory (whose `tmp`,
/// `CARGO_TARGET_TMPDIR`, is writable there).
#[derive(Debug, Clone)]
pub struct Shared {
    pub root: PathBuf,
    pub target_dir: PathBuf,
}

impl Shared {
    /// `CARGO_TARGET_TMPDIR` of test binaries built for `arch`: `target/tmp`, or, built for
    /// another architecture than the host's (`--target`), `target/TRIPLE/tmp`.
    pub fn tmp_dir(&self, arch: Arch) -> PathBuf {
        match arch {
            Arch::X86_64 => self.target_dir.join("tmp"),
            other => self.target_dir.join(packages::target(other)).join("tmp"),
        }
    }

    /// The workspace of a test binary cargo runs the runner with: the one cargo reports
    /// for its package's directory (any workspace, not only xtask's), and the target
    /// directory the binary was built in.
    pub fn of_binary(binary: &Path, package_dir: &Path) -> Result<Shared> {
        let how = "run it through cargo (`cargo test` with xtask's `test-runner` as the target's runner), which \
                   sets CARGO_MANIFEST_DIR to the package's directory";
        if !package_dir.join("Cargo.toml").is_file() {
            return Err(usage_error(format!(
                "the test binary's package directory `{}` has no Cargo.toml, so its workspace cannot be shared \
                 with the VM; {how}",
                package_dir.display()
            )));
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let out = crate::process::output(
            crate::process::command(&cargo)
                .args(["locate-project", "--workspace", "--message-format", "plain"])
                .current_dir(package_dir),
        )?;
        let manifest = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let root = Path::new(&manifest).parent().filter(|_| out.status.success() && !manifest.is_empty());
        let Some(root) = root else {
            return Err(usage_error(format!(
                "cargo finds no workspace for the test binary's package `{}` ({}); {how}",
                package_dir.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        };
        Ok(Shared::in_workspace(root, binary))
    }

    /// The workspace of `cargo test --manifest-path MANIFEST` (relative to `ws`'s root,
    /// where cargo runs), and the target directory cargo builds it in.
    pub fn of_manifest(ws: &Workspace, manifest: &Path) -> Result<Shared> {
        let manifest = ws.root.join(manifest);
        let mut query = cargo_metadata::MetadataCommand::new();
        query.manifest_path(&manifest).no_deps();
        let out = crate::process::output(&query.cargo_command())?;
        if !out.status.success() {
            return Err(usage_error(format!(
                "cargo finds no workspace for `--manifest-path {}`: {}; give the `Cargo.toml` of a package or \
                 workspace",
                manifest.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let metadata = cargo_metadata::MetadataCommand::parse(String::from_utf8_lossy(&out.stdout))
            .context("parsing `cargo metadata`")?;
        Ok(Shared {
            root: metadata.workspace_root.into_std_path_buf(),
            target_dir: metadata.target_directory.into_std_path_buf(),
        })
    }

    /// The workspace at `root` shared for `binary`: with the target directory the binary
    /// was built in (the nearest with a `CACHEDIR.TAG`), else the workspace's.
    pub fn in_workspace(root: &Path, binary: &Path) -> Shared {
        let target_dir = binary
            .ancestors()
            .find(|d| d.join("CACHEDIR.TAG").is_file())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| root.join("target"));
        Shared { root: root.to_path_buf(), target_dir }
    }
}

/// The manifest `cargo test` arguments name (`--manifest-path FILE`), if they do.
pub fn manifest_arg(cargo_args: &[String]) -> Option<PathBuf> {
    cargo_args.iter().enumerate().find_map(|(i, arg)| match arg.strip_prefix("--manifest-path") {
        Some("") => cargo_args.get(i + 1).map(PathBuf::from),
        Some(rest) => rest.strip_prefix('=').map(PathBuf::from),
        None => None,
    })
}

/// `cargo test --no-run` with `cargo_args`, for guests of `arch` (`--target` added for
/// another architecture than the host's); the test executables it built, in the order
/// `cargo test` runs them ([`CargoOrder`]).
pub fn build_test_binaries(ws: &Workspace, cargo_args: &[String], arch: Arch) -> Result<Vec<TestBinary>> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cargo = crate::process::command(&cargo);
    if arch != Arch::X86_64 {
        packages::cross_build(&mut cargo, &ws.root, arch)?;
    }
    cargo.args(["test", "--no-run", "--message-format=json-render-diagnostics"]);
    if arch != Arch::X86_64 {
        cargo.args(["--target", packages::target(arch)]);
    }
    let mut child = cargo
        .args(cargo_args)
        .current_dir(&ws.root)
        .stdout(Stdio::piped())
        .spawn()
        .context("running `cargo test --no-run`")?;
    let stdout = child.stdout.take().context("cargo's stdout")?;
    let mut binaries: Vec<(CargoOrder, TestBinary)> = Vec::new();
    for message in cargo_metadata::Message::parse_stream(BufReader::new(stdout)) {
        if let cargo_metadata::Message::CompilerArtifact(artifact) = message.context("reading cargo's messages")? {
            let Some(executable) = artifact.executable else { continue };
            if !artifact.profile.test {
                continue;
            }
            let package_dir =
                artifact.manifest_path.parent().map(|p| p.as_std_path().to_path_buf()).unwrap_or_default();
            let src = artifact.target.src_path.strip_prefix(&package_dir).unwrap_or(&artifact.target.src_path);
            let (kind, option) = CargoOrder::kind(&artifact.target.kind);
            let unittests = kind <= 1;
            let label = if unittests { format!("unittests {src}") } else { src.to_string() };
            let (package, version) = package_name_version(&artifact.package_id.repr);
            let target = artifact.target.name.clone();
            let rerun = match option {
                "--lib" => format!("-p {package} --lib"),
                _ => format!("-p {package} {option} {target}"),
            };
            let env = cargo_env(&package_dir, &package, &version);
            let binary = TestBinary {
                path: executable.into_std_path_buf(),
                package_dir,
                label,
                env,
                rerun,
                args: None,
                under: vec![],
            };
            binaries.push((CargoOrder { package, version, kind, target }, binary));
        }
    }
    binaries.sort_by(|a, b| a.0.cmp(&b.0));
    let binaries = binaries.into_iter().map(|(_, b)| b).collect();
    let status = child.wait().context("waiting for cargo")?;
    if !status.success() {
        bail!("`cargo test --no-run {}` failed ({status})", cargo_args.join(" "));
    }
    Ok(binaries)
}

/// `cargo test --doc` with `cargo_args` and `runner` (a command line of this program's
/// `test-runner`) as the target's runner: every doctest of the run in one VM ([`kept`]).
/// Returns cargo's exit status.
pub fn doctests(ws: &Workspace, runner: &[String], cargo_args: &[String], test_args: &[String]) -> Result<i32> {
    let words: Vec<String> = runner.iter().map(|w| serde_json::to_string(w).unwrap_or_default()).collect();
    let config = format!("target.{}.runner=[{}]", packages::TARGET, words.join(", "));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = crate::process::command(&cargo);
    cmd.args(["test", "--doc"])
        .args(cargo_args.iter().filter(|a| *a != "--doc"))
        .args(["--config", &config, "--"])
        .args(test_args)
        .current_dir(&ws.root);
    // Each of rustdoc's threads compiles a doctest, then runs it; in the VM the doctests
    // take turns, so with a thread per core the cores would wait with them. Twice as many
    // keep compiling meanwhile (unless told how many).
    let told = test_args.iter().any(|a| a.starts_with("--test-threads"));
    if !told && std::env::var_os("RUST_TEST_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        cmd.arg(format!("--test-threads={}", 2 * cores));
    }
    let mut child = cmd.spawn().context("running `cargo test --doc`")?;
    // The VM boots while cargo builds: the first doctest finds it up, or nearly.
    if let Err(e) = kept::start_ahead(ws, runner, cargo_args, child.id()) {
        eprintln!("warning: the doctests' VM starts with the first doctest, not ahead of them: {e:#}");
    }
    let status = child.wait().context("waiting for `cargo test --doc`")?;
    Ok(status.code().unwrap_or(EXIT_TEST_FAILED))
}

/// What a run of test binaries in a VM is given besides the binaries: the workspace shared,
/// the system, the binaries' arguments, cargo's words, and where its JUnit XML goes.
#[derive(Debug, Clone, Copy)]
pub struct SuiteRun<'a> {
    /// The sources the VM sees.
    pub shared: &'a Shared,
    /// The system booted (as declared).
    pub system: &'a os_configs::System,
    /// The arguments every binary gets unless it has its own.
    pub test_args: &'a [String],
    /// What the guest script says around the binaries.
    pub words: Words,
    /// Where the results go as JUnit XML (written whatever the outcome).
    pub junit: Option<&'a Path>,
    /// QEMU's gdb stub (`--gdb`).
    pub gdb: Option<qemu::GdbStub>,
    /// The one test binary runs under gdbserver, reached through this forward (`--debug`).
    pub debug: Option<debug::Debug>,
    /// Save the VM when a binary fails, for `cargo xtask replay` ([`crate::vm::replay`]).
    pub replay: bool,
}

/// Boots `run.system` once and runs the test binaries `binaries` gives in it, one after
/// another, `run.shared`'s sources shared. What QEMU needs is made first; the binaries
/// (`cargo test --no-run`), their items, the packages and the system item are made while
/// the VM boots. Returns the exit status: 0, [`EXIT_TEST_FAILED`], or the guest's
/// otherwise.
pub fn run_in_vm(
    ws: &Workspace,
    opts: &VmOpts,
    run: SuiteRun,
    binaries: impl FnOnce() -> Result<Vec<TestBinary>>,
) -> Result<i32> {
    let SuiteRun { shared, system, test_args, words, junit, gdb, debug, replay } = run;
    let store = opts.open_store(ws)?;
    let mut virtualized = crate::machine::virtualize(system);
    if debug.is_some() {
        virtualized.packages.push(os_configs::Package::Debian { package: crate::debian::gdb::SERVER_PACKAGE.into() });
        virtualized.initrd_modules.push(qemu::NET_MODULE.to_string());
    }
    // The workspace goes over virtiofs where it can ([`VmRun::large_shares`]): its module
    // in the initrd whenever a virtiofsd is there, so a snapshot's shape does not depend
    // on whether the run that made it booted cold.
    if crate::vm::virtiofs::virtiofsd(&store).is_ok() {
        virtualized.initrd_modules.push(crate::vm::virtiofs::MODULE.to_string());
    }
    let mut machine = Machine::prepare(ws, opts, &store, system, virtualized)?;
    machine.debug_with(gdb);
    let store = &machine.store;
    // What the request is made of, for the exit status's message once the VM has ended.
    let names = std::cell::RefCell::new(Vec::new());
    let watch = Arc::new(TestWatch::new(opts.test_binary_timeout()));
    let later = || -> Result<guest::Request> {
        let binaries = binaries()?;
        if let [binary] = &binaries[..] {
            // Under cargo's runner no `Running` line names it in the guest's output.
            watch.lock().binary.get_or_insert_with(|| binary.path.display().to_string());
        }
        if binaries.is_empty() {
            eprintln!("no test binaries to run");
        }
        let mut lowered = machine.lower_packages()?;
        let commands = add_test_binaries(shared, store, &mut lowered, &binaries, test_args)?;
        *names.borrow_mut() = binaries.iter().map(|b| b.path.display().to_string()).collect();
        let system_item = system::system_item(store, &machine.system, &lowered)?;
        let script = format!(
            "{} replay_rerun={}\n{RUN_FUNCTION}\n{}\n{SUMMARY}\n",
            words.settings(),
            guest::replay::RERUN,
            commands.join("\n")
        );
        let argv = vec!["sh".into(), "-c".into(), script];
        let mut req = machine.request(&lowered, &system_item, Mode::Command, argv);
        req.mounts = workspace_mounts(shared, machine.system.arch);
        if debug.is_some() {
            req.nets = vec![guest::NetConfig {
                interface: qemu::GUEST_INTERFACE.into(),
                address: qemu::GUEST_ADDRESS.into(),
                gateway: None,
                nameserver: None,
                mac: None,
            }];
        }
        Ok(req)
    };
    let xchg = store.exchange()?;
    let runtime = store.scratch("run")?;
    let mut spec = machine.spec(xchg.path().to_path_buf());
    if let Some(debug) = debug {
        spec.forwards.push(qemu::Forward { host: debug.host_port, guest: debug::GUEST_PORT });
    }
    let (_view, staged) = share_workspace(ws, store, shared, &mut spec)?;
    // A failure is saved unless the run is under a debugger (gdb has the VM then).
    let saving = match replay && gdb.is_none() && debug.is_none() && crate::vm::replay::keep()? > 0 {
        true => Some(FailureSaving::new(ws, &runtime)?),
        false => None,
    };
    let request = GuestRequest::Later(Mode::Command, Box::new(later));
    let vm_run = VmRun {
        // The timeout is the watch's, per binary.
        timeout: None,
        watch: Some(watch.clone()),
        stdout: Sink::TestStdout,
        large_shares: vec![WORKSPACE_TAG.into()],
        save_failure: saving.as_ref().map(|s| s.saver.clone()),
        ..machine.run(spec, request, &xchg, &runtime, "test")
    };
    let status = vm_run.run();
    if let Some(file) = junit {
        // Written whatever the outcome: a run that failed or timed out is what CI must see.
        junit::write(&watch.lock().junit.report("cargo xtask test"), file)?;
    }
    let status = status?;
    let names = names.borrow().clone();
    match crate::machine::exit_code(&status, &names) {
        0 => Ok(0),
        EXIT_TEST_FAILED => {
            if let Some(saving) = saving {
                let failed = watch.lock().binary.clone();
                saving.keep(ws, store, &format!("test {}", system.name), failed, staged)?;
            }
            Ok(EXIT_TEST_FAILED)
        }
        other => bail!("the test script in the guest ended with status {other}"),
    }
}

/// A test run's failure being saved: the saver, and the private directory its state is
/// written to until it is kept.
struct FailureSaving {
    saver: crate::vm::replay::FailureSaver,
    scratch: tempfile::TempDir,
    _monitor: crate::vm::attach::Socket,
}

impl FailureSaving {
    fn new(ws: &Workspace, runtime: &crate::store::Scratch) -> Result<FailureSaving> {
        let scratch = crate::vm::replay::saving_dir(&ws.target_dir)?;
        let monitor = crate::vm::attach::Socket::new(runtime.path(), "monitor.sock")?
            .context("no path for QEMU's monitor socket fits a socket's address")?;
        let state = scratch.path().join(crate::vm::replay::STATE_FILE);
        Ok(FailureSaving {
            saver: crate::vm::replay::FailureSaver::new(state, monitor.path.clone()),
            scratch,
            _monitor: monitor,
        })
    }

    /// Keeps the saved state, if the guest stopped at its failure point and it was saved,
    /// and says the line that replays it; says why not otherwise.
    fn keep(
        self,
        ws: &Workspace,
        store: &crate::store::Store,
        what: &str,
        failed: Option<String>,
        staged: crate::vm::replay::StagedShare,
    ) -> Result<()> {
        use crate::vm::replay::{self, Saved};
        let (bytes, save_s) = match self.saver.outcome() {
            Some(Saved::Done { bytes, save_s }) => (bytes, save_s),
            Some(Saved::Failed(why)) => {
                eprintln!("replay: the failure was not saved ({why})");
                return Ok(());
            }
            None => {
                eprintln!("replay: the failure was not saved (the guest did not stop at its failure point)");
                return Ok(());
            }
        };
        let Some((spec, request)) = self.saver.ran() else { return Ok(()) };
        let saved = replay::Failure {
            what: what.to_string(),
            failed,
            scenario: None,
            vms: vec![replay::SavedVm { name: "test".into(), state: replay::STATE_FILE.into(), spec, request }],
            staged: Some(staged),
            bytes,
            save_s,
        };
        replay::keep_failure(store, &ws.target_dir, "test", self.scratch, saved, "the VM")
    }
}

/// Shares `shared`'s sources with the VM of `spec` ([`workspace_view`], read-only at the
/// workspace's path); the view lives as long as what is returned.
fn share_workspace(
    ws: &Workspace,
    store: &crate::store::Store,
    shared: &Shared,
    spec: &mut qemu::VmSpec,
) -> Result<(crate::store::Exchange, crate::vm::replay::StagedShare)> {
    let mount_points: Vec<PathBuf> =
        shared.tmp_dir(spec.arch).strip_prefix(&shared.root).map(Path::to_path_buf).into_iter().collect();
    let staged = crate::vm::replay::StagedShare {
        tag: WORKSPACE_TAG.into(),
        root: shared.root.clone(),
        exclude: vec![shared.target_dir.clone(), ws.store_dir.clone()],
        mount_points,
    };
    let view = staged.stage(store)?;
    spec.shares.push(Share { tag: WORKSPACE_TAG.into(), path: view.path().to_path_buf(), readonly: true });
    Ok((view, staged))
}

/// Adds each test binary with its shared-library closure to the store and to `lowered`
/// (its links and packages); returns the guest script's `run` line for each.
fn add_test_binaries(
    shared: &Shared,
    store: &crate::store::Store,
    lowered: &mut system::Lowered,
    binaries: &[TestBinary],
    test_args: &[String],
) -> Result<Vec<String>> {
    let added = add_binaries(shared, store, lowered, binaries)?;
    Ok(binaries.iter().zip(added).map(|(binary, (label, path))| run_line(binary, &label, &path, test_args)).collect())
}

/// Adds each test binary with its shared-library closure to the store and to `lowered`
/// (its links and packages); returns each one's label (`tests/x.rs (target/...)`) and
/// its path in the guest.
fn add_binaries(
    shared: &Shared,
    store: &crate::store::Store,
    lowered: &mut system::Lowered,
    binaries: &[TestBinary],
) -> Result<Vec<(String, String)>> {
    let resolver = packages::LibraryResolver::from_host();
    let mut added = Vec::new();
    for binary in binaries {
        let program = packages::host_program(store, &resolver, &binary.path)
            .with_context(|| format!("adding the test binary `{}` to the store", binary.path.display()))?;
        lowered.add_library_links(program.links);
        let name = binary.path.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let shown = binary.path.strip_prefix(&shared.root).unwrap_or(&binary.path).display().to_string();
        added.push((format!("{} ({shown})", binary.label), format!("{}/bin/{name}", program.item.guest_path())));
        for item in store.closure(std::slice::from_ref(&program.item))? {
            if !lowered.packages.contains(&item) {
                lowered.packages.push(item);
            }
        }
    }
    Ok(added)
}

/// What the guest script says around the binaries, as cargo would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Words {
    /// `cargo test`: stop after the first failed binary.
    FailFast,
    /// `cargo test --no-fail-fast`: run them all, then list the failed ones.
    NoFailFast,
    /// Cargo's runner: one binary; cargo says `Running` and how it failed itself.
    Runner,
}

impl Words {
    /// The script's variables for [`RUN_FUNCTION`] and [`SUMMARY`].
    fn settings(self) -> &'static str {
        match self {
            Words::FailFast => "announce=1 fail_fast=1",
            Words::NoFailFast => "announce=1 fail_fast=",
            Words::Runner => "announce= fail_fast=",
        }
    }
}

/// The guest's shell function that runs one binary as cargo would, in its package's
/// directory with cargo's variables: `Running` before it, and after a failure cargo's
/// `error: test failed, to rerun pass ...` (and the exit status unless 101, the
/// harness's own) and, failing fast, the end of the script with status 101.
const RUN_FUNCTION: &str = r#"failed=0 failures=
run() {
    dir=$1; label=$2; rerun=$3; path=$4; again=$5; shift 5
    [ -n "$announce" ] && echo "     Running $label" >&2
    (cd "$dir" && exec "$@")
    s=$?
    [ "$s" -eq 0 ] && return
    mkdir -p "${replay_rerun%/*}" && printf '#!/bin/sh\n%s\n' "$again" >"$replay_rerun" && chmod +x "$replay_rerun"
    failed=$((failed + 1))
    failures="$failures
    \`$rerun\`"
    if [ -n "$announce" ]; then
        echo "error: test failed, to rerun pass \`$rerun\`" >&2
        if [ "$s" -ne 101 ]; then
            if [ "$s" -gt 128 ]; then how="signal: $((s - 128))"; else how="exit status: $s"; fi
            printf '
Caused by:
  process didn'"'"'t exit successfully: `%s` (%s)
' "$path" "$how" >&2
        fi
        [ -n "$fail_fast" ] && exit 101
    else
        exit "$s"
    fi
}"#;

/// The end of the guest script: without failing fast, the failed binaries listed as
/// cargo lists them; status 101 if any failed.
const SUMMARY: &str = r#"if [ "$failed" -gt 0 ]; then
    if [ -z "$fail_fast" ] && [ -n "$announce" ]; then
        [ "$failed" -eq 1 ] && t=target || t=targets
        echo "error: $failed $t failed:$failures" >&2
    fi
    exit 101
fi"#;

/// One `run` line of the guest's script for `binary`, at `guest_path` in the store: the
/// command runs in the package's directory, and after a failure the same command line
/// (`cd DIR && exec ...`) is written to [`guest::replay::RERUN`] for a replay.
fn run_line(binary: &TestBinary, label: &str, guest_path: &str, test_args: &[String]) -> String {
    let dir = shell_quote(&binary.package_dir.to_string_lossy());
    let shown = binary.path.to_string_lossy();
    let mut command = vec!["env".to_string()];
    command.extend(binary.env.iter().map(|(k, v)| shell_quote(&format!("{k}={v}"))));
    command.extend(binary.under.iter().map(|w| shell_quote(w)));
    command.push(shell_quote(guest_path));
    command.extend(binary.args.as_deref().unwrap_or(test_args).iter().map(|a| shell_quote(a)));
    let again = format!("cd {dir} && exec {}", command.join(" "));
    let mut words = vec!["run".to_string(), dir, shell_quote(label), shell_quote(&binary.rerun)];
    words.extend([shell_quote(&shown), shell_quote(&again)]);
    words.extend(command);
    words.join(" ")
}

/// The workspace's sources at its host path, read-only; a tmpfs over `target/tmp`
/// (writable, for `CARGO_TARGET_TMPDIR` of test binaries built for `arch`).
fn workspace_mounts(shared: &Shared, arch: Arch) -> Vec<MountSpec> {
    let root = shared.root.to_string_lossy().into_owned();
    let mut mounts = vec![MountSpec {
        source: WORKSPACE_TAG.into(),
        target: root,
        fs_type: "9p".into(),
        options: "ro,trans=virtio,version=9p2000.L,msize=512000,cache=loose".into(),
        check: guest::Check::None,
    }];
    let tmpfs = |dir: &Path| MountSpec {
        source: "tmpfs".into(),
        target: dir.to_string_lossy().into_owned(),
        fs_type: "tmpfs".into(),
        options: "mode=1777".into(),
        check: guest::Check::None,
    };
    // Its mount point is made in the staged view when it is inside the workspace.
    let tmp = shared.tmp_dir(arch);
    if tmp.starts_with(&shared.root) {
        mounts.push(tmpfs(&tmp));
    }
    mounts
}

/// How long a test may run before it is named on stderr (libtest's own notice, copied).
const SLOW_NOTICE: &str = " has been running for over ";

/// The per-binary timeout of a test run ([`crate::vm::Watch`]): the clock starts when the
/// request is written and again at each `Running` line; libtest's lines on stdout tell
/// which tests are running, so a timeout names them, and its notice of a test running
/// for over 60 s is copied to stderr as it comes.
struct TestWatch {
    limit: Option<Duration>,
    state: Mutex<WatchState>,
}

#[derive(Default)]
struct WatchState {
    /// When the binary (or the run, before the first `Running`) started.
    since: Option<Instant>,
    /// The binary running, as its `Running` line says it.
    binary: Option<String>,
    progress: Progress,
    /// The binaries' stderr, for their `Running` lines.
    stderr: Lines,
    /// The results, for `--junit`.
    junit: junit::Collector,
}

impl TestWatch {
    fn new(limit: Option<Duration>) -> TestWatch {
        TestWatch { limit, state: Mutex::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WatchState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl crate::vm::Watch for TestWatch {
    fn output(&self, stderr: bool, bytes: &[u8]) {
        let mut state = self.lock();
        let WatchState { since, binary, progress, stderr: stderr_lines, junit } = &mut *state;
        let now = Instant::now();
        if !stderr {
            for slow in progress.feed_each(bytes, |line| junit.line(line, now)) {
                eprintln!("{slow}");
            }
            return;
        }
        stderr_lines.push(bytes, |line| {
            if let Some(label) = line.strip_prefix("     Running ") {
                junit.running(label);
                *binary = Some(label.to_string());
                *since = Some(now);
                progress.running.clear();
            }
        });
    }

    fn expired(&self) -> Option<String> {
        let limit = self.limit?;
        let mut state = self.lock();
        let since = *state.since.get_or_insert_with(Instant::now);
        if since.elapsed() < limit {
            return None;
        }
        let binary = state.binary.as_deref().map_or_else(|| "the test binary".to_string(), |b| format!("`{b}`"));
        let running = state.progress.running();
        let which = match running.as_slice() {
            [] => "no test had said it started (libtest names a test when it starts with --test-threads=1, \
                   and after 60 s otherwise)"
                .to_string(),
            [one] => format!("the test still running: {one}"),
            many => format!("the tests still running: {}", many.join(", ")),
        };
        Some(format!(
            "{binary} ran past its timeout of {} and was killed; {which} (give a longer --timeout, or \
             --timeout none)",
            shown(limit)
        ))
    }
}

/// `limit` as `--timeout` takes it: `10m`, `20s`, `1.5s`.
fn shown(limit: Duration) -> String {
    let secs = limit.as_secs_f64();
    match limit.as_secs() {
        s if s >= 60 && s % 60 == 0 && limit.subsec_nanos() == 0 => format!("{}m", s / 60),
        _ => format!("{secs}s"),
    }
}

/// A stream (a test binary's stdout or stderr) cut into lines as it comes, each handed
/// over whole and cut to [`Lines::CAP`] bytes (the bytes come from the guest).
#[derive(Default)]
struct Lines {
    line: Vec<u8>,
}

impl Lines {
    const CAP: usize = 64 * 1024;

    /// Takes the next bytes; gives `each` every line they end.
    fn push(&mut self, bytes: &[u8], mut each: impl FnMut(&str)) {
        for &b in bytes {
            if b != b'\n' {
                if self.line.len() < Self::CAP {
                    self.line.push(b);
                }
                continue;
            }
            each(&String::from_utf8_lossy(&std::mem::take(&mut self.line)));
        }
    }

    /// The line not ended yet.
    fn partial(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.line)
    }
}

/// Which tests of a libtest binary are running, from its output (stdout): `test NAME ... `
/// when it starts (one test at a time), `test NAME has been running for over 60 seconds`,
/// and `test NAME ... ok|FAILED|ignored` when it ends.
#[derive(Default)]
struct Progress {
    lines: Lines,
    running: Vec<String>,
}

/// The test still running when `stdout`, a test binary's output, ends, if libtest named one.
fn running_test(stdout: &str) -> Option<String> {
    let mut progress = Progress::default();
    progress.feed(stdout.as_bytes());
    progress.running().into_iter().next()
}

impl Progress {
    /// Takes the next bytes; returns the lines naming a slow test.
    fn feed(&mut self, bytes: &[u8]) -> Vec<String> {
        self.feed_each(bytes, |_| {})
    }

    /// [`Progress::feed`], giving `each` every line the bytes end, as well.
    fn feed_each(&mut self, bytes: &[u8], mut each: impl FnMut(&str)) -> Vec<String> {
        let mut slow = Vec::new();
        let Progress { lines, running } = self;
        lines.push(bytes, |line| {
            each(line);
            let Some(rest) = line.strip_prefix("test ") else { return };
            if let Some((name, _)) = rest.split_once(SLOW_NOTICE) {
                started(running, name);
                slow.push(line.to_string());
            } else if let Some((name, after)) = rest.split_once(" ... ") {
                let ended = ["ok", "FAILED", "ignored", "bench:"].iter().any(|r| after.starts_with(r));
                if ended {
                    running.retain(|n| n != name);
                } else {
                    // Started, and printing (`--nocapture`) on the same line.
                    started(running, name);
                }
            }
        });
        slow
    }

    /// The tests running now, oldest first (the line being written included).
    fn running(&self) -> Vec<String> {
        let mut running = self.running.clone();
        if let Some(name) = self.lines.partial().strip_prefix("test ").and_then(|l| l.strip_suffix(" ... ")) {
            started(&mut running, name);
        }
        running
    }
}

/// Adds `name` to the tests `running`, unless it is there.
fn started(running: &mut Vec<String>, name: &str) {
    if !running.iter().any(|n| n == name) {
        running.push(name.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_manifest_is_read_from_either_spelling() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let found = manifest_arg(&args(&["-p", "x", "--manifest-path", "a b/Cargo.toml"]));
        assert_eq!(found, Some(PathBuf::from("a b/Cargo.toml")));
        assert_eq!(manifest_arg(&args(&["--manifest-path=c/Cargo.toml"])), Some(PathBuf::from("c/Cargo.toml")));
        assert_eq!(manifest_arg(&args(&["--manifest-pathology"])), None);
        assert_eq!(manifest_arg(&args(&["--manifest-path"])), None);
        assert_eq!(manifest_arg(&args(&["--lib"])), None);
    }

    #[test]
    fn a_process_is_pid_and_start_time() {
        let p = kept::parse_process("123:456").unwrap();
        assert_eq!((p.pid, p.start), (123, 456));
        assert_eq!(kept::parse_process(&p.to_string()), Ok(p));
        for bad in ["", "123", "0:1", "-1:2", "1:x", "x:1", "1:2:3"] {
            assert!(kept::parse_process(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn progress_names_the_tests_still_running() {
        let mut p = Progress::default();
        assert!(p.feed(b"\nrunning 3 tests\ntest a ... ok\ntest b ... ").is_empty());
        assert_eq!(p.running(), ["b"]);
        p.feed(b"ok\ntest c ... ");
        assert_eq!(p.running(), ["c"]);
        // Many threads: a test is named only after 60 s, and copied to stderr.
        let mut p = Progress::default();
        let slow = p.feed(b"running 2 tests\ntest x ... ok\ntest hangs has been running for over 60 seconds\n");
        assert_eq!(slow, ["test hangs has been running for over 60 seconds"]);
        assert_eq!(p.running(), ["hangs"]);
        p.feed(b"test hangs ... FAILED\n");
        assert!(p.running().is_empty());
        // A test printing on its own line (--nocapture) is still running.
        let mut p = Progress::default();
        p.feed(b"test talks ... hello\nmore\n");
        assert_eq!(p.running(), ["talks"]);
    }

    #[test]
    fn binaries_are_in_cargos_order() {
        let order = |package: &str, kind: &str, target: &str| CargoOrder {
            package: package.into(),
            version: "0.1.0".into(),
            kind: CargoOrder::kind(&[kind.to_string()]).0,
            target: target.into(),
        };
        // As cargo's messages come (build order), and as `cargo test` runs them.
        let mut got = [
            order("b", "lib", "b"),
            order("a", "test", "b_t"),
            order("a", "test", "a_t"),
            order("a", "bin", "zbin"),
            order("a", "bin", "abin"),
            order("a", "lib", "a"),
        ];
        got.sort();
        let names: Vec<String> = got.iter().map(|o| format!("{}:{}", o.package, o.target)).collect();
        assert_eq!(names, ["a:a", "a:abin", "a:zbin", "a:a_t", "a:b_t", "b:b"]);
    }

    #[test]
    fn package_ids_give_names_and_versions() {
        let v = |name: &str, version: &str| (name.to_string(), version.to_string());
        assert_eq!(package_name_version("path+file:///w/examples/vm-checks#0.1.0"), v("vm-checks", "0.1.0"));
        assert_eq!(package_name_version("path+file:///w/tests#vm-tests@0.1.0"), v("vm-tests", "0.1.0"));
        let registry = "registry+https://github.com/rust-lang/crates.io-index#libc@0.2.191";
        assert_eq!(package_name_version(registry), v("libc", "0.2.191"));
        assert_eq!(package_name_version("guest 0.1.0 (path+file:///w/guest)"), v("guest", "0.1.0"));
    }
}
