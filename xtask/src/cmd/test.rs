//! `cargo xtask test` and `cargo xtask test-runner`: the workspace's test binaries run
//! inside a VM of a system (its services up first), one after another as `cargo test`
//! runs them, their output streamed; exit status 101 when a test failed.
//!
//! `test` builds the selected test binaries with `cargo test --no-run` (read through
//! `cargo_metadata`'s messages); `test-runner` is cargo's runner for one binary
//! (`target.<triple>.runner`), so plain `cargo test` runs in the VM. Each binary is a
//! store item with its shared-library closure (as a `Package::Host`); the workspace's
//! sources (and nothing else of it: [`crate::vm::workspace_view`]) are shared read-only
//! at its own path, with a tmpfs over `target/tmp` (`CARGO_TARGET_TMPDIR`).

use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{bail, Context, Result};
use guest::{Mode, MountSpec};

use super::run_vm::{self, request};
use super::{usage_error, VmOpts};
use crate::vm::qemu::{self, Disk, DiskFormat, Share};
use crate::vm::{shell_quote, workspace_view, GuestRequest, Sink, VmRun};
use crate::{lower::packages, lower::system, Workspace};

/// The 9p tag of the workspace share.
const WORKSPACE_TAG: &str = "workspace";
/// Exit status when a test failed (as `cargo test`).
pub const EXIT_TEST_FAILED: i32 = 101;

#[derive(Debug, Clone, clap::Args)]
pub struct Test {
    #[command(flatten)]
    pub vm: VmOpts,
    /// Arguments for `cargo test` (`-p CRATE`, `--test NAME`, `--lib`, ...), then `--`
    /// and the arguments every test binary gets (`--nocapture`, a filter, ...).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "CARGO TEST ARGS")]
    pub args: Vec<String>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct TestRunner {
    #[command(flatten)]
    pub vm: VmOpts,
    /// The test binary cargo built, then its arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true, value_name = "BINARY [ARGS]")]
    pub args: Vec<String>,
}

/// One test binary and how cargo would run it.
#[derive(Debug, Clone)]
pub struct TestBinary {
    pub path: PathBuf,
    /// The package's directory: the working directory and `CARGO_MANIFEST_DIR`.
    pub package_dir: PathBuf,
    pub package: String,
    /// As cargo says it: `unittests src/lib.rs`, `tests/it.rs`, ...
    pub label: String,
}

impl Test {
    pub fn run(self, ws: &Workspace) -> Result<i32> {
        let (cargo_args, test_args) = match self.args.iter().position(|a| a == "--") {
            Some(i) => (self.args[..i].to_vec(), self.args[i + 1..].to_vec()),
            None => (self.args.clone(), Vec::new()),
        };
        // The system is checked before anything is built; the test binaries are built
        // while the VM boots.
        let shared = Shared { root: ws.root.clone(), target_dir: ws.target_dir.clone() };
        run_in_vm(ws, &shared, &self.vm, || build_test_binaries(ws, &cargo_args), &test_args)
    }
}

impl TestRunner {
    pub fn run(self, ws: &Workspace) -> Result<i32> {
        let (binary, test_args) = self.args.split_first().expect("clap requires the binary");
        let path = std::path::absolute(binary).with_context(|| format!("finding `{binary}`"))?;
        if !path.is_file() {
            return Err(usage_error(format!("`{binary}` is not a test binary (cargo runs its runner with one)")));
        }
        // Cargo runs the runner in the package's directory, with its manifest directory set.
        let package_dir = std::env::var_os("CARGO_MANIFEST_DIR")
            .map(PathBuf::from)
            .unwrap_or(std::env::current_dir().context("the current directory")?);
        let package = std::env::var("CARGO_PKG_NAME").unwrap_or_default();
        let label = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        // The binary's own workspace is shared, wherever it is: found before anything boots.
        let shared = Shared::of_binary(&path, &package_dir)?;
        let binary = TestBinary { path, package_dir, package, label };
        run_in_vm(ws, &shared, &self.vm, || Ok(vec![binary]), test_args)
    }
}

/// The workspace whose sources a test VM sees, and its target directory (whose `tmp`,
/// `CARGO_TARGET_TMPDIR`, is writable there).
#[derive(Debug, Clone)]
pub struct Shared {
    pub root: PathBuf,
    pub target_dir: PathBuf,
}

impl Shared {
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
        let target_dir = binary
            .ancestors()
            .find(|d| d.join("CACHEDIR.TAG").is_file())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| root.join("target"));
        Ok(Shared { root: root.to_path_buf(), target_dir })
    }
}

/// `cargo test --no-run` with `cargo_args`; the test executables it built.
pub fn build_test_binaries(ws: &Workspace, cargo_args: &[String]) -> Result<Vec<TestBinary>> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut child = crate::process::command(&cargo)
        .args(["test", "--no-run", "--message-format=json-render-diagnostics"])
        .args(cargo_args)
        .current_dir(&ws.root)
        .stdout(Stdio::piped())
        .spawn()
        .context("running `cargo test --no-run`")?;
    let stdout = child.stdout.take().context("cargo's stdout")?;
    let mut binaries = Vec::new();
    for message in cargo_metadata::Message::parse_stream(BufReader::new(stdout)) {
        if let cargo_metadata::Message::CompilerArtifact(artifact) = message.context("reading cargo's messages")? {
            let Some(executable) = artifact.executable else { continue };
            if !artifact.profile.test {
                continue;
            }
            let package_dir =
                artifact.manifest_path.parent().map(|p| p.as_std_path().to_path_buf()).unwrap_or_default();
            let src = artifact.target.src_path.strip_prefix(&package_dir).unwrap_or(&artifact.target.src_path);
            let unittests = artifact.target.kind.iter().any(|k| k == "lib" || k == "bin");
            let label = if unittests { format!("unittests {src}") } else { src.to_string() };
            let package = artifact.target.name.clone();
            binaries.push(TestBinary { path: executable.into_std_path_buf(), package_dir, package, label });
        }
    }
    let status = child.wait().context("waiting for cargo")?;
    if !status.success() {
        bail!("`cargo test --no-run {}` failed ({status})", cargo_args.join(" "));
    }
    Ok(binaries)
}

/// Boots the selected system once and runs the test binaries `binaries` gives in it, one
/// after another. What QEMU needs is made first; the binaries (`cargo test --no-run`),
/// their items, the packages and the system item are made while the VM boots.
fn run_in_vm(
    ws: &Workspace,
    shared: &Shared,
    opts: &VmOpts,
    binaries: impl FnOnce() -> Result<Vec<TestBinary>>,
    test_args: &[String],
) -> Result<i32> {
    let store = opts.open_store(ws)?;
    let declared = opts.valid_system(&store, ws)?;
    let mut system = declared.virtualized();
    run_vm::add_root_image_modules(&mut system);
    let accel = qemu::choose_accel(opts.accel)?;
    let boot = system::lower_boot(&store, ws, &system, opts.verbose)?;
    let root_image = run_vm::root_image(&store, &system, &boot)?;
    let root_device = root_image.as_ref().map(|(_, device)| device.clone());
    // What the request is made of, for the exit status's message once the VM has ended.
    let names = std::cell::RefCell::new(Vec::new());
    let later = || -> Result<guest::Request> {
        let binaries = binaries()?;
        if binaries.is_empty() {
            eprintln!("no test binaries to run");
        }
        let mut lowered = system::lower_packages(&store, ws, &system, opts.verbose, boot.clone())?;
        let commands = add_test_binaries(shared, &store, &mut lowered, &binaries, test_args)?;
        *names.borrow_mut() = binaries.iter().map(|b| b.path.display().to_string()).collect();
        let system_item = system::system_item(&store, &system, &lowered)?;
        let script = format!("{RUN_FUNCTION}\n{}\nexit $failed\n", commands.join("\n"));
        let argv = vec!["sh".into(), "-c".into(), script];
        let mut req = request(&system, &lowered, &system_item, root_device.as_deref(), Mode::Command, argv);
        req.mounts = workspace_mounts(shared);
        Ok(req)
    };
    let xchg = store.scratch("xchg")?;
    let runtime = store.scratch("run")?;
    let mut spec = opts.spec(accel, &store, &boot, xchg.path().to_path_buf());
    let mount_points: Vec<PathBuf> =
        shared.target_dir.join("tmp").strip_prefix(&shared.root).map(Path::to_path_buf).into_iter().collect();
    let view = workspace_view::stage(&store, &shared.root, &[&shared.target_dir, &ws.store_dir], &mount_points)?;
    spec.shares.push(Share { tag: WORKSPACE_TAG.into(), path: view.path().to_path_buf(), readonly: true });
    if let Some((path, _)) = &root_image {
        spec.disks.push(Disk { path: path.clone(), format: DiskFormat::Raw, readonly: true });
    }
    let run = VmRun {
        timeout: opts.timeout,
        verbose: opts.verbose,
        stdout: Sink::TestStdout,
        snapshots: Some((store.clone(), opts.warmth())),
        ..VmRun::new(
            spec,
            GuestRequest::Later(Mode::Command, Box::new(later)),
            xchg.path(),
            runtime.path(),
            ws.log_dir(),
            "test",
        )
    };
    let status = run.run()?;
    let names = names.borrow().clone();
    match run_vm::exit_code(&status, &names) {
        0 => Ok(0),
        EXIT_TEST_FAILED => Ok(EXIT_TEST_FAILED),
        other => bail!("the test script in the guest ended with status {other}"),
    }
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
    let resolver = packages::LibraryResolver::from_host();
    let mut commands = Vec::new();
    for binary in binaries {
        let program = packages::host_program(store, &resolver, &binary.path)
            .with_context(|| format!("adding the test binary `{}` to the store", binary.path.display()))?;
        for link in program.links {
            if !lowered.links.contains(&link) {
                lowered.links.push(link);
            }
        }
        let name = binary.path.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let shown = binary.path.strip_prefix(&shared.root).unwrap_or(&binary.path).display().to_string();
        let label = format!("{} ({shown})", binary.label);
        commands.push(run_line(binary, &label, &format!("{}/bin/{name}", program.item.guest_path()), test_args));
        for item in store.closure(std::slice::from_ref(&program.item))? {
            if !lowered.packages.contains(&item) {
                lowered.packages.push(item);
            }
        }
    }
    Ok(commands)
}

/// The guest's shell function that runs one binary as cargo would, says how it ended,
/// and remembers a failure in `$failed` (101, as `cargo test`).
const RUN_FUNCTION: &str = r#"failed=0
run() {
    dir=$1; label=$2; shift 2
    echo "     Running $label" >&2
    (cd "$dir" && exec "$@")
    s=$?
    if [ "$s" -ne 0 ]; then
        echo "error: test failed: $label (exit status $s)" >&2
        failed=101
    fi
}"#;

/// One `run` line of the guest's script for `binary`, at `guest_path` in the store.
fn run_line(binary: &TestBinary, label: &str, guest_path: &str, test_args: &[String]) -> String {
    let dir = binary.package_dir.to_string_lossy();
    let mut words = vec![
        "run".to_string(),
        shell_quote(&dir),
        shell_quote(label),
        "env".to_string(),
        shell_quote(&format!("CARGO_MANIFEST_DIR={dir}")),
        shell_quote(&format!("CARGO_PKG_NAME={}", binary.package)),
        shell_quote(guest_path),
    ];
    words.extend(test_args.iter().map(|a| shell_quote(a)));
    words.join(" ")
}

/// The workspace's sources at its host path, read-only; a tmpfs over `target/tmp`
/// (writable, for `CARGO_TARGET_TMPDIR`).
fn workspace_mounts(shared: &Shared) -> Vec<MountSpec> {
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
    let tmp = shared.target_dir.join("tmp");
    if tmp.starts_with(&shared.root) {
        mounts.push(tmpfs(&tmp));
    }
    mounts
}
