//! `cargo xtask bench`: measures the toolkit against floors measured in the same run
//! (a bare QEMU boot, `true`, ...) and prints ratios, so figures from a noisy, shared
//! machine still compare. Writes `target/bench/latest.json`.

mod substitutes;

use fs_err as fs;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use xshell::{cmd, Shell};

use super::VmOpts;
use crate::image::{self, Closure, ImageOptions, Layout, Progress};
use crate::lower::cpio::CpioWriter;
use crate::lower::kernel::ModuleIndex;
use crate::store::{self, Item, Recipe, Store};
use crate::vm::qemu::DiskFormat;
use crate::vm::qemu::{self, Accel, Console, Share, VmSpec};
use crate::{host, lower::initrd, lower::system, Workspace};

#[derive(Debug, Clone, clap::Args)]
pub struct Bench {
    /// Fewer repetitions (for CI): 1 warm-up and 3 measured runs instead of 2 and 7.
    #[arg(long)]
    pub quick: bool,
    /// Print the report as one JSON document on stdout (the table goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Measure only these groups of figures (repeatable; the floors they are measured
    /// against come along).
    #[arg(long, value_enum, value_name = "GROUP")]
    pub only: Vec<Group>,
    #[command(flatten)]
    pub vm: VmOpts,
}

/// The groups of figures `--only` selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Group {
    /// boot-to-result.
    Boot,
    /// boot-to-result-warm and the snapshot's size and times.
    Warm,
    /// xtask-test and xtask-test-warm.
    Test,
    /// doctests: 100 doctests, a binary each, in one kept VM.
    Doctests,
    Scenario,
    /// inner-loop, inner-loop-warm, inner-loop-vs-run-vm.
    InnerLoop,
    /// cache-hit, cache-hit-vm-image, cache-hit-cargo.
    CacheHit,
    /// scaling-*, with each step's profile.
    Scaling,
    /// image-build and (not with --quick) image-build-vm.
    ImageBuild,
    /// substitutes: a cold start from a registry, and the bytes moved.
    Substitutes,
    /// image-build-uefi and uefi-boot: a UEFI image against the BIOS one.
    Uefi,
    /// tree-walk: a guest walk of the workspace's sources, virtiofs against 9p.
    TreeWalk,
    /// replay-restore and replay-to-result: a saved failure restored (`cargo xtask replay`).
    Replay,
    /// isolate-32: 32 tests each in a VM of its own (`test --isolate`) against all in one
    /// VM, and each VM's host memory.
    Isolate,
    /// boot-to-result-aarch64: an aarch64 guest's cold `run-vm -- true` (emulated) against
    /// the x86_64 guest's.
    Aarch64,
}

/// One measured figure.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub name: String,
    pub ours_s: f64,
    pub floor_s: f64,
    pub ratio: f64,
    pub accel: String,
    /// What "ours" and the floor are.
    pub ours: String,
    pub floor: String,
    /// For the scaling figures: closure MiB per second of image building.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mib_per_s: Option<f64>,
    /// For the scaling figures: each step of ours and of the floor, median seconds.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<Step>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub floor_steps: Vec<Step>,
    /// For `substitutes`: bytes received from the registry (ours) and `.deb` bytes
    /// fetched from Debian's archive (the floor).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ours_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub floor_bytes: Option<u64>,
    /// For `isolate-32`: the host memory of each VM while several ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm_memory: Option<VmMemory>,
}

/// The host memory of the QEMU processes of a run, per VM: sampled while they ran, each
/// sample's sum over the processes divided by their number, the highest such mean kept.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct VmMemory {
    /// Proportional set size (shared pages divided among the processes that map them:
    /// the snapshot's RAM, QEMU's libraries), from `/proc/PID/smaps_rollup`; the RSS
    /// where that file is missing.
    pub pss_bytes: u64,
    /// The pages of a process's own (`Private_Clean` + `Private_Dirty`): what one more
    /// VM costs once the shared pages are there.
    pub private_bytes: u64,
    pub rss_bytes: u64,
    /// The most VMs seen running at once.
    pub vms: usize,
    /// How many samples (with two VMs or more) were taken.
    pub samples: usize,
}

/// One step of a profiled figure.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub name: String,
    pub s: f64,
}

/// The warm start's snapshot, made again once by the bench.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotReport {
    /// The saved state's size.
    pub bytes: u64,
    /// Booting to the snapshot point, as `run-vm` reports it.
    pub boot_s: f64,
    /// Saving the state, as `run-vm` reports it.
    pub save_s: f64,
    /// The whole `run-vm --warm -- true` that made it.
    pub make_s: f64,
}

/// What `target/bench/latest.json` holds.
#[derive(Debug, Serialize)]
pub struct Report {
    pub accel: String,
    pub runs: usize,
    pub machine: String,
    pub figures: Vec<Figure>,
    pub snapshot: Option<SnapshotReport>,
    /// With `--only`: the groups measured.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub only: Vec<Group>,
}

/// What `bench --json` prints on stdout: the report and where it was written.
#[derive(Debug, Serialize)]
pub struct JsonOutput<'a> {
    #[serde(flatten)]
    pub report: &'a Report,
    pub report_path: String,
}

impl Bench {
    pub fn run(self, ws: &Workspace) -> Result<i32> {
        let (warmup, runs) = if self.quick { (1, 3) } else { (2, 7) };
        let accel = qemu::choose_accel(self.vm.accel)?;
        let store = self.vm.open_store(ws)?;
        let system = self.vm.system()?;
        let xtask = std::env::current_exe().context("finding the xtask binary")?;
        let lowered = system::lower(&store, ws, &system, false)?;
        let wanted = |group: Group| self.only.is_empty() || self.only.contains(&group);
        // The scaling figures' packages are made first: writing a GiB of them leaves the
        // disk of a machine like this one slow for a while.
        let sizes: &[u64] = if self.quick { &[64, 256] } else { &[64, 256, 1024] };
        let mut packages = Vec::new();
        for &mib in sizes.iter().filter(|_| wanted(Group::Scaling)) {
            packages.push((mib, random_packages(&store, mib)?));
        }
        quiesce();
        let sh = Shell::new().context("xshell")?;
        sh.change_dir(&ws.root);
        let b = Bencher { ws, store: &store, xtask: &xtask, accel, warmup, runs, opts: &self, sh };

        let mut figures = Vec::new();
        let mut snapshot = None;
        // The bare boot is the floor of the VM figures.
        let on_boot =
            [Group::Boot, Group::Warm, Group::Test, Group::Doctests, Group::Scenario, Group::InnerLoop, Group::Replay];
        if on_boot.into_iter().any(wanted) {
            let bare = BareBoot::new(&b, &lowered)?;
            let boot = b.boot_to_result(&bare)?;
            let (floor_boot, our_boot) = (boot.floor_s, boot.ours_s);
            figures.push(boot);
            if wanted(Group::Warm) {
                figures.push(b.boot_to_result_warm(floor_boot)?);
                snapshot = b.snapshot()?;
            }
            if wanted(Group::Test) {
                figures.extend(b.xtask_test(&bare)?);
            }
            if wanted(Group::Doctests) {
                figures.push(b.doctests(floor_boot)?);
            }
            if wanted(Group::Scenario) {
                figures.extend(b.scenario(floor_boot)?);
            }
            if wanted(Group::InnerLoop) {
                figures.extend(b.inner_loop(floor_boot, our_boot)?);
            }
            if wanted(Group::Replay) {
                figures.extend(b.replay(floor_boot)?);
            }
        }
        if wanted(Group::TreeWalk) {
            figures.push(b.tree_walk()?);
        }
        if wanted(Group::Isolate) {
            figures.push(b.isolate()?);
        }
        if wanted(Group::Aarch64) {
            figures.push(b.boot_to_result_aarch64()?);
        }
        if wanted(Group::CacheHit) {
            figures.extend(b.cache_hits()?);
        }
        let closure = image::closure(&store, ws, &system, false)?;
        // Before image-build: right after that figure, which deletes many large images,
        // the 1 GiB runs here were often half as long again.
        let (scaling, rates) = b.scaling(&closure, packages)?;
        figures.extend(scaling);
        if wanted(Group::ImageBuild) {
            figures.extend(b.image_build(&closure)?);
        }
        if wanted(Group::Substitutes) {
            figures.push(b.substitutes(&system.name)?);
        }
        if wanted(Group::Uefi) {
            figures.extend(b.uefi()?);
        }

        let machine = machine_description();
        let report = Report { accel: accel.name().into(), runs, machine, figures, snapshot, only: self.only.clone() };
        self.print(&report, &rates);
        let out = report_path(ws);
        fs::create_dir_all(out.parent().unwrap_or(Path::new(".")))?;
        fs::write(&out, serde_json::to_vec_pretty(&report)?).with_context(|| format!("writing `{}`", out.display()))?;
        if self.json {
            crate::report::print_json(&JsonOutput { report: &report, report_path: out.display().to_string() })?;
        } else {
            println!("{}", out.display());
        }
        Ok(0)
    }

    /// The table, the scaling rates and the profiles: on stdout, unless the JSON document
    /// is the result (then on stderr).
    fn print(&self, report: &Report, rates: &[(u64, f64, f64)]) {
        let json = self.json;
        let say = |line: String| if json { eprintln!("{line}") } else { println!("{line}") };
        for f in &report.figures {
            say(format!(
                "{:<20} ours {:>8.3}s  floor {:>8.3}s  ratio {:>6.2}  [{}]",
                f.name, f.ours_s, f.floor_s, f.ratio, f.accel
            ));
        }
        for f in report.figures.iter().filter(|f| f.ours_bytes.is_some()) {
            say(format!(
                "{}: {} bytes received from the registry, {} bytes of .debs fetched to build",
                f.name,
                f.ours_bytes.unwrap_or(0),
                f.floor_bytes.unwrap_or(0)
            ));
        }
        for f in report.figures.iter() {
            if let Some(m) = f.vm_memory {
                let mib = |b: u64| b as f64 / f64::from(1 << 20);
                say(format!(
                    "{}: host memory per VM ({} at once): PSS {:.1} MiB, private {:.1} MiB, RSS {:.1} MiB",
                    f.name,
                    m.vms,
                    mib(m.pss_bytes),
                    mib(m.private_bytes),
                    mib(m.rss_bytes)
                ));
            }
        }
        if let Some(s) = &report.snapshot {
            say(format!(
                "snapshot: {:.1} MiB, saved in {:.2} s after booting to its point in {:.2} s ({:.2} s in all)",
                s.bytes as f64 / f64::from(1 << 20),
                s.save_s,
                s.boot_s,
                s.make_s
            ));
        }
        for f in report.figures.iter().filter(|f| !f.steps.is_empty()) {
            let steps = |steps: &[Step]| steps.iter().map(|s| format!("{} {:.2}", s.name, s.s)).collect::<Vec<_>>();
            say(format!("{} profile (s): {}", f.name, steps(&f.steps).join(", ")));
            say(format!("{} floor profile (s): {}", f.name, steps(&f.floor_steps).join(", ")));
        }
        for (mib, rate, _) in rates {
            say(format!("scaling: closure with {mib:>4} MiB of data: {rate:.1} MiB/s"));
        }
        // What each added MiB costs between two sizes: constant if the cost is linear.
        for pair in rates.windows(2) {
            let ((a, _, ta), (b, _, tb)) = (pair[0], pair[1]);
            say(format!(
                "scaling: from {a} to {b} MiB of data: {:.2} ms per added MiB",
                1000.0 * (tb - ta) / (b - a) as f64
            ));
        }
        let first = rates.iter().find(|(m, _, _)| *m >= 256);
        if let (Some(first), Some(last)) = (first, rates.last().filter(|last| Some(last.0) != first.map(|f| f.0))) {
            say(format!(
                "scaling: throughput at {} MiB is {:.0}% of that at {} MiB",
                last.0,
                100.0 * last.1 / first.1,
                first.0
            ));
        }
    }
}

/// What every figure's measurement shares: the workspace, the store, the xtask binary
/// measured, the accelerator and the repetitions.
struct Bencher<'a> {
    ws: &'a Workspace,
    store: &'a Store,
    xtask: &'a Path,
    accel: Accel,
    warmup: usize,
    runs: usize,
    opts: &'a Bench,
    /// The commands measured are written with xshell's `cmd!` (run through
    /// [`crate::process`]), in the workspace's root.
    sh: Shell,
}

impl Bencher<'_> {
    /// `xtask run-vm --accel ACCEL WARMTH --timeout 300 -- true`.
    fn run_true(&self, warmth: &str) -> Command {
        let (xtask, accel) = (self.xtask, self.accel.name());
        cmd!(self.sh, "{xtask} run-vm --accel {accel} {warmth} --timeout 300 -- true").into()
    }

    fn measure(&self, f: impl FnMut() -> Result<()>) -> Result<f64> {
        measure(self.warmup, self.runs, f)
    }

    /// boot-to-result: `run-vm -- true`, cold, against the bare boot, taken in turn.
    fn boot_to_result(&self, bare: &BareBoot) -> Result<Figure> {
        let run = self.run_true("--cold");
        let [(ours, _), (floor, _)] =
            alternating(self.warmup, self.runs, || timed(|| run_quiet(&run)), || timed(|| bare.boot(&self.sh)))?;
        Ok(self.figure("boot-to-result", ours, floor, "xtask run-vm -- true", "bare qemu + busybox initramfs"))
    }

    /// boot-to-result-aarch64: `run-vm --arch aarch64 -- true`, cold (the guest emulated
    /// by TCG, whatever `--accel` says), against the same run of the x86_64 guest, taken
    /// in turn.
    fn boot_to_result_aarch64(&self) -> Result<Figure> {
        let xtask = self.xtask;
        let arm: Command = cmd!(self.sh, "{xtask} run-vm --arch aarch64 --cold --timeout 300 -- true").into();
        let x86 = self.run_true("--cold");
        let [(ours, _), (floor, _)] =
            alternating(self.warmup, self.runs, || timed(|| run_quiet(&arm)), || timed(|| run_quiet(&x86)))?;
        Ok(self.figure(
            "boot-to-result-aarch64",
            ours,
            floor,
            "xtask run-vm --arch aarch64 -- true (TCG)",
            "xtask run-vm -- true (x86_64)",
        ))
    }

    /// boot-to-result-warm: the same run restored from its snapshot (made in the first
    /// warm-up run) against the cold floor.
    fn boot_to_result_warm(&self, floor_boot: f64) -> Result<Figure> {
        let run = self.run_true("--warm");
        let ours = self.measure(|| run_quiet(&run))?;
        Ok(self.figure(
            "boot-to-result-warm",
            ours,
            floor_boot,
            "xtask run-vm --warm -- true (restored from its snapshot)",
            "bare qemu + busybox initramfs, cold",
        ))
    }

    /// The snapshot of `run-vm -- true`'s VM made again (its item removed first): its
    /// size, and the times `run-vm` reports for booting to the snapshot point and saving.
    fn snapshot(&self) -> Result<Option<SnapshotReport>> {
        for item in self.store.items_named(crate::vm::snapshot::ITEM_NAME)? {
            self.store.remove_entry(&item.file_name())?;
        }
        let started = Instant::now();
        let out = crate::process::run(&self.run_true("--warm"))?;
        let make_s = started.elapsed().as_secs_f64();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let Some(said) = stderr.lines().find_map(crate::vm::snapshot::parse_saved_line) else {
            bail!("`run-vm --warm` made no snapshot, or did not say so: {}", crate::process::last_lines(&stderr));
        };
        Ok(Some(SnapshotReport { bytes: said.bytes, boot_s: said.boot_s, save_s: said.save_s, make_s }))
    }

    /// xtask-test: `cargo xtask test` of the example crate (its binaries already built),
    /// cold and restored from a snapshot, against running the same binaries on the host
    /// plus the bare boot.
    fn xtask_test(&self, bare: &BareBoot) -> Result<Vec<Figure>> {
        let selection = ["-p", "vm-checks", "--test", "in_vm"];
        let binaries =
            crate::suite::build_test_binaries(self.ws, &selection.map(String::from), os_configs::Arch::X86_64)?;
        let (xtask, accel) = (self.xtask, self.accel.name());
        let test = |warmth: &str| -> Command {
            cmd!(self.sh, "{xtask} test --accel {accel} {warmth} --system hello --timeout 300 {selection...}")
                .args(["--", "--ignored"])
                .into()
        };
        // Cold, in turn with the bare boot: the two are alike, and a change in the
        // machine's speed meanwhile falls on both.
        let cold = test("--cold");
        let [(cold, _), (floor_boot, _)] =
            alternating(self.warmup, self.runs, || timed(|| run_quiet(&cold)), || timed(|| bare.boot(&self.sh)))?;
        let warm = test("--warm");
        let warm = self.measure(|| run_quiet(&warm))?;
        let host_run = self.measure(|| {
            for b in &binaries {
                // On the host they fail at once (not in the VM): only their time counts.
                crate::process::output(crate::process::command(&b.path).arg("--ignored").current_dir(&b.package_dir))?;
            }
            Ok(())
        })?;
        const FLOOR: &str = "the same binaries on the host + bare qemu boot";
        Ok(vec![
            self.figure(
                "xtask-test",
                cold,
                host_run + floor_boot,
                "xtask test --cold --system hello -p vm-checks --test in_vm -- --ignored (built)",
                FLOOR,
            ),
            self.figure("xtask-test-warm", warm, host_run + floor_boot, "the same, --warm", FLOOR),
        ])
    }

    /// replay-restore and replay-to-result: a failure of the example crate's `fails` test
    /// saved once, then `replay ID -- true`: the restore (QEMU started to the guest taking
    /// `go`, as the command says it) and the whole command, against the bare cold boot.
    fn replay(&self, floor_boot: f64) -> Result<Vec<Figure>> {
        let (xtask, accel) = (self.xtask, self.accel.name());
        let fails =
            cmd!(self.sh, "{xtask} test --accel {accel} --system hello --timeout 300 -p vm-checks --test fails")
                .args(["--", "--ignored"]);
        let out = fails.ignore_status().output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        let id = stderr.lines().find_map(|l| l.strip_prefix("replay: cargo xtask replay "));
        let Some(id) = id.and_then(|rest| rest.split_whitespace().next()).map(str::to_string) else {
            bail!("the failing test saved no failure for replay: {}", crate::process::last_lines(&stderr));
        };
        let replay: Command = cmd!(self.sh, "{xtask} replay {id} -- true").into();
        let restores = std::cell::RefCell::new(Vec::new());
        let whole = self.measure(|| {
            let out = crate::process::run(&replay)?;
            let stderr = String::from_utf8_lossy(&out.stderr);
            let said = stderr.lines().find_map(|l| l.strip_prefix("restored in ")?.strip_suffix(" s")?.parse().ok());
            let Some(said) = said else { bail!("`replay` did not say its restore time: {stderr}") };
            restores.borrow_mut().push(Duration::from_secs_f64(said));
            Ok(())
        })?;
        let mut restores = restores.into_inner();
        // The warm-up runs' too: all are alike.
        restores.sort();
        let restore = median(&restores).as_secs_f64();
        let _ = std::fs::remove_dir_all(crate::vm::replay::dir(&self.ws.target_dir).join(&id));
        Ok(vec![
            self.figure(
                "replay-restore",
                restore,
                floor_boot,
                "xtask replay ID -- true: QEMU started to the guest at its failure point again (target: 0.5 s)",
                "bare qemu + busybox initramfs, cold",
            ),
            self.figure(
                "replay-to-result",
                whole,
                floor_boot,
                "xtask replay ID -- true: the whole command (shares staged and mounted, services started)",
                "bare qemu + busybox initramfs, cold",
            ),
        ])
    }

    /// isolate-32: `test --isolate` of 32 trivial tests (`vm-checks`' `trivial`), each in
    /// a VM of its own restored from the snapshot, against the same 32 in one VM restored
    /// from it (`--warm`), taken in turn (target: a ratio of 1.5); then one more isolated
    /// run with its QEMU processes' memory sampled ([`VmMemory`], target: 16 MiB of PSS per VM).
    fn isolate(&self) -> Result<Figure> {
        let selection = ["-p", "vm-checks", "--test", "trivial"];
        crate::suite::build_test_binaries(self.ws, &selection.map(String::from), os_configs::Arch::X86_64)?;
        let (xtask, accel) = (self.xtask, self.accel.name());
        let test = |how: &str| -> Command {
            cmd!(self.sh, "{xtask} test --accel {accel} {how} --no-replay --timeout 300 {selection...}")
                .args(["--", "--ignored"])
                .into()
        };
        let (isolated, shared) = (test("--isolate"), test("--warm"));
        let [(ours, _), (floor, _)] =
            alternating(self.warmup, self.runs, || timed(|| run_quiet(&isolated)), || timed(|| run_quiet(&shared)))?;
        let memory = vm_memory(isolated)?;
        let jobs = crate::suite::isolate::jobs(self.opts.vm.memory)?;
        Ok(Figure {
            vm_memory: Some(memory),
            ..self.figure(
                "isolate-32",
                ours,
                floor,
                &format!(
                    "xtask test --isolate -p vm-checks --test trivial -- --ignored: 32 tests, a VM each restored \
                     from the snapshot, {jobs} at a time (target: 1.5)"
                ),
                "the same 32 tests in one VM restored from the snapshot (--warm)",
            )
        })
    }

    /// tree-walk: the guest's walk of this workspace's sources (`find` + `stat`, done by
    /// `vm-checks`' `tree_walk` test in its own process, the guest's dentries and inodes
    /// dropped before each of its walks) in `xtask test --cold`, the workspace over
    /// virtiofs, against the same over 9p (`XTASK_VIRTIOFSD=none`), taken in turn; the
    /// guest's own times, so the boot is not in it.
    fn tree_walk(&self) -> Result<Figure> {
        use crate::vm::virtiofs::VIRTIOFSD_ENV;
        if let Err(why) = crate::vm::virtiofs::virtiofsd(self.store) {
            bail!("the tree-walk figure needs a virtiofsd: {why}");
        }
        let selection = ["-p", "vm-checks", "--test", "shares"];
        crate::suite::build_test_binaries(self.ws, &selection.map(String::from), os_configs::Arch::X86_64)?;
        let (xtask, accel) = (self.xtask, self.accel.name());
        let walk = |over: &'static str| {
            let mut cmd: Command = cmd!(
                self.sh,
                "{xtask} test --accel {accel} --cold --no-replay --system hello --timeout 300 {selection...}"
            )
            .args(["--", "--ignored", "--nocapture", "--exact", "tree_walk"])
            .into();
            match over {
                "9p" => cmd.env(VIRTIOFSD_ENV, "none"),
                _ => cmd.env_remove(VIRTIOFSD_ENV),
            };
            move || -> Result<(Duration, Profile)> {
                let out = crate::process::run(&cmd)?;
                let stdout = String::from_utf8_lossy(&out.stdout);
                // `tree-walk: KIND SECONDS ...` and `tree-walk-programs: KIND SECONDS`.
                let said = |label: &str| -> Result<f64> {
                    let line = stdout.lines().find_map(|l| l.split_once(label)).map(|(_, rest)| rest);
                    let words: Vec<&str> = line.unwrap_or_default().split_whitespace().collect();
                    match words[..] {
                        [kind, secs, ..] if kind == over => Ok(secs.parse()?),
                        _ => bail!(
                            "the guest did not say `{label}` over {over}: {}",
                            crate::process::last_lines(&stdout)
                        ),
                    }
                };
                let walks = said("tree-walk: ")?;
                Ok((Duration::from_secs_f64(walks), vec![("find + stat programs", said("tree-walk-programs: ")?)]))
            }
        };
        let [(ours, our_steps), (floor, floor_steps)] =
            alternating(self.warmup, self.runs, walk("virtiofs"), walk("9p"))?;
        Ok(Figure {
            steps: median_steps(&our_steps),
            floor_steps: median_steps(&floor_steps),
            ..self.figure(
                "tree-walk",
                ours,
                floor,
                "the guest's walks of the workspace's sources (readdir + lstat, caches dropped), over virtiofs",
                "the same over 9p",
            )
        })
    }

    /// doctests: 100 small doctests of a crate of edition 2021 (rustdoc runs each as a
    /// binary of its own, through the runner) in the minimal system, against twice
    /// `cargo test --doc` on the host plus a bare boot (so the target, at most twice the
    /// host's time plus one boot, is a ratio of 1). Both sides compile the doctests on
    /// every run, as rustdoc does.
    fn doctests(&self, floor_boot: f64) -> Result<Figure> {
        let dir = tempfile::tempdir().context("a directory for the doctests' crate")?;
        let manifest = "[package]\nname = \"doctests\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[workspace]\n";
        fs::create_dir_all(dir.path().join("src"))?;
        fs::write(dir.path().join("Cargo.toml"), manifest)?;
        let lib: String = (0..100)
            .map(|i| {
                format!("/// ```\n/// assert_eq!(doctests::f{i}(), {i});\n/// ```\npub fn f{i}() -> u32 {{ {i} }}\n")
            })
            .collect();
        fs::write(dir.path().join("src/lib.rs"), lib)?;
        let manifest = dir.path().join("Cargo.toml");
        let (xtask, accel) = (self.xtask, self.accel.name());
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let ours: Command =
            cmd!(self.sh, "{xtask} test --accel {accel} --system minimal --doc --manifest-path {manifest}").into();
        let host: Command = cmd!(self.sh, "{cargo} test --doc --manifest-path {manifest}").into();
        let [(ours, _), (host, _)] =
            alternating(self.warmup, self.runs, || timed(|| run_quiet(&ours)), || timed(|| run_quiet(&host)))?;
        Ok(self.figure(
            "doctests",
            ours,
            2.0 * host + floor_boot,
            "xtask test --system minimal --doc: 100 doctests, a binary each, in one kept VM",
            "2 × cargo test --doc on the host + bare qemu boot",
        ))
    }

    /// scenario: `hello-pair` end to end (two nodes booting at once, a request, the link
    /// cut for a 3 s timeout and restored) against one bare boot.
    /// scenario-16: `sixteen` end to end (sixteen nodes started at once, each asked by
    /// another over their network, then ended).
    fn scenario(&self, floor_boot: f64) -> Result<Vec<Figure>> {
        let (xtask, accel) = (self.xtask, self.accel.name());
        let mut figures = Vec::new();
        for (figure, name) in [("scenario", "hello-pair"), ("scenario-16", "sixteen")] {
            let scenario = cmd!(self.sh, "{xtask} scenario --accel {accel} {name}").into();
            let ours = self.measure(|| run_quiet(&scenario))?;
            figures.push(self.figure(figure, ours, floor_boot, &format!("xtask scenario {name}"), "bare qemu boot"));
        }
        Ok(figures)
    }

    /// inner-loop: touch the `hello` system's service source, then ask the service in a
    /// VM (cold, then restored from a snapshot), against cargo building that crate the
    /// same way plus the floor's boot; and cold against our own boot-to-result.
    fn inner_loop(&self, floor_boot: f64, our_boot: f64) -> Result<Vec<Figure>> {
        let ws = self.ws;
        let service_src = ws.root.join("examples/hello-service/src/main.rs");
        if crate::Catalog::current().system("hello").is_none() || !service_src.is_file() {
            bail!("the inner-loop figure needs the `hello` system and `{}`", service_src.display());
        }
        let touch = || -> Result<()> {
            let file = fs::File::options().append(true).open(&service_src)?;
            file.set_modified(std::time::SystemTime::now()).context("touching the service's source")?;
            Ok(())
        };
        let (xtask, accel, nc) = (self.xtask, self.accel.name(), "nc 127.0.0.1 7878 </dev/null");
        let mut loops = Vec::new();
        for warmth in ["--cold", "--warm"] {
            let ask: Command =
                cmd!(self.sh, "{xtask} run-vm --accel {accel} {warmth} --system hello --timeout 300 -- sh -c {nc}")
                    .into();
            loops.push(self.measure(|| {
                touch()?;
                run_quiet(&ask)
            })?);
        }
        let cargo_build = self.measure(|| {
            touch()?;
            let dir = ws.target_dir.join("vm-packages");
            crate::lower::packages::cargo_build_static(
                &ws.root.join("Cargo.toml"),
                "hello-service",
                "hello-service",
                &dir,
                crate::lower::packages::RUSTFLAGS,
                os_configs::Arch::X86_64,
                false,
            )
            .map(drop)
        })?;
        const WHAT: &str = "touch service source; xtask run-vm --system hello -- nc ...";
        Ok(vec![
            self.figure(
                "inner-loop",
                loops[0],
                cargo_build + floor_boot,
                WHAT,
                "cargo build of the crate + bare qemu boot",
            ),
            self.figure(
                "inner-loop-warm",
                loops[1],
                cargo_build + floor_boot,
                "the same, --warm (restored from its snapshot)",
                "cargo build of the crate + bare qemu boot (cold)",
            ),
            // What the system, its service and the store cost on top of building the
            // crate and booting.
            self.figure(
                "inner-loop-vs-run-vm",
                loops[0],
                cargo_build + our_boot,
                WHAT,
                "cargo build of the crate + xtask run-vm -- true",
            ),
        ])
    }

    /// cache-hit: a stored `vm-image`, and a `build-in-vm` whose result is stored, timed
    /// as the xtask binary alone and through cargo, against `true`.
    fn cache_hits(&self) -> Result<Vec<Figure>> {
        let (warmup, runs) = (self.warmup, self.runs.max(5));
        let (xtask, sh) = (self.xtask, &self.sh);
        let image = cmd!(sh, "{xtask} vm-image").into();
        run_quiet(&image)?;
        let image_hit = measure(warmup, runs, || run_quiet(&image))?;
        let build = ["build-in-vm", "--name", "bench-cache-hit", "--", "sh", "-c", "echo hit > $out/f"];
        let direct = cmd!(sh, "{xtask} {build...}").into();
        run_quiet(&direct)?;
        let hit = measure(warmup, runs, || run_quiet(&direct))?;
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let through_cargo = cmd!(sh, "{cargo} xtask {build...}").into();
        let hit_cargo = measure(warmup, runs, || run_quiet(&through_cargo))?;
        let t = measure(warmup, runs, || run_quiet(&cmd!(sh, "true").into()))?;
        Ok(vec![
            self.figure("cache-hit", hit, t, "xtask build-in-vm (stored)", "true"),
            self.figure("cache-hit-vm-image", image_hit, t, "xtask vm-image (stored)", "true"),
            self.figure("cache-hit-cargo", hit_cargo, t, "cargo xtask build-in-vm (stored)", "true"),
        ])
    }

    /// scaling: an image build with packages of random data added to the closure, built
    /// through the library (the data is in no system) and stored, as vm-image does, each
    /// step profiled; against the floor, also profiled. Also the rates: (MiB of data,
    /// MiB/s of closure, seconds).
    fn scaling(&self, closure: &Closure, packages: Vec<(u64, Vec<Item>)>) -> Result<(Vec<Figure>, Vec<Rate>)> {
        let mut figures = Vec::new();
        let mut rates = Vec::new();
        for (mib, items) in packages {
            let mut big = closure.clone();
            for (i, item) in items.into_iter().enumerate() {
                big.items.insert(i, item);
            }
            let reps = if self.opts.quick { 1 } else { 5 };
            // One build first, untimed, for ours and the floor alike: the first to read
            // the closure after the VM figures (or the packages' writing) found it
            // partly out of the page cache, and paid for reading it from disk.
            let floor_image = FloorImage::stage(self.store, &big)?;
            let [(ours, steps), (floor, floor_steps)] = alternating(
                1,
                reps,
                || cold_library_image(self.store, &big, os_configs::Firmware::Bios),
                || floor_image.build(),
            )?;
            drop(floor_image);
            let bytes = image::footprint(&big)?.bytes as f64 / f64::from(1 << 20);
            rates.push((mib, bytes / ours, ours));
            let mut f = self.figure(
                &format!("scaling-{mib}MiB"),
                ours,
                floor,
                "image-build (stored), closure + random packages",
                FLOOR_IMAGE,
            );
            f.mib_per_s = Some(bytes / ours);
            f.steps = median_steps(&steps);
            f.floor_steps = median_steps(&floor_steps);
            figures.push(f);
        }
        Ok((figures, rates))
    }

    /// image-build: `vm-image` of the system, cold (its image removed from the store
    /// before each run, everything else stored), against mke2fs -d of the same tree (made
    /// beforehand) into a raw file plus qemu-img convert to qcow2; with the full bench,
    /// also the VM builder.
    fn image_build(&self, closure: &Closure) -> Result<Vec<Figure>> {
        let (_, image_item) = self.stored_image(&[])?;
        let cold_image = |args: &[&str]| self.cold_image(&image_item, args);
        let (warmup, runs) = (self.warmup.min(1), self.runs.min(5));
        let floor_image = FloorImage::stage(self.store, closure)?;
        let [(ours, _), (floor, _)] = alternating(warmup, runs, || cold_image(&[]), || floor_image.build())?;
        drop(floor_image);
        let mut figures = vec![self.figure("image-build", ours, floor, "xtask vm-image (cold)", FLOOR_IMAGE)];
        if !self.opts.quick {
            // The VM builder writes the same bytes, so it makes the same item. Last: the
            // disk traffic of its VM would still be settling during the figures after it.
            let ours = cold_image(&["--builder", "vm"])?.0.as_secs_f64();
            figures.push(self.figure("image-build-vm", ours, floor, "xtask vm-image --builder vm (cold)", FLOOR_IMAGE));
        }
        Ok(figures)
    }

    /// image-build-uefi: `vm-image --firmware uefi`, cold, against the BIOS image, cold,
    /// in turn; uefi-boot: the UEFI image booted stand-alone with Debian's OVMF (a fresh
    /// variables store each time) until the system's shell starts, against the BIOS
    /// image with QEMU's BIOS, in turn.
    fn uefi(&self) -> Result<Vec<Figure>> {
        let (bios, bios_item) = self.stored_image(&[])?;
        let (uefi, uefi_item) = self.stored_image(&["--firmware", "uefi"])?;
        let (warmup, runs) = (self.warmup.min(1), self.runs.min(5));
        let [(build_uefi, _), (build_bios, _)] = alternating(
            warmup,
            runs,
            || self.cold_image(&uefi_item, &["--firmware", "uefi"]),
            || self.cold_image(&bios_item, &[]),
        )?;
        let ovmf = crate::debian::image_tools::uefi_tools(self.store)?.ovmf();
        let scratch = self.store.scratch("bench-uefi")?;
        let boot = |image: &Path, ovmf: Option<&(PathBuf, PathBuf)>| -> Result<(Duration, Profile)> {
            let mut qemu = crate::process::command(crate::debian::qemu::program()?);
            qemu.args(["-machine", "pc", "-m", "512", "-accel", self.accel.name(), "-display", "none", "-no-reboot"]);
            qemu.args(["-monitor", "none", "-serial", "stdio", "-drive"]);
            qemu.arg(format!("file={},format=qcow2,snapshot=on", image.display()));
            if let Some((code, vars)) = ovmf {
                let copy = scratch.path().join("OVMF_VARS.fd");
                let _ = fs::remove_file(&copy);
                fs::copy(vars, &copy)?;
                fs::set_permissions(&copy, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
                qemu.arg("-drive").arg(format!("if=pflash,format=raw,unit=0,readonly=on,file={}", code.display()));
                qemu.arg("-drive").arg(format!("if=pflash,format=raw,unit=1,file={}", copy.display()));
            }
            timed(|| until_shell(qemu))
        };
        // A boot takes 10-20 s under TCG: once each for --quick.
        let (warmup, runs) = if self.opts.quick { (0, 1) } else { (warmup, runs) };
        let [(boot_uefi, _), (boot_bios, _)] =
            alternating(warmup, runs, || boot(&uefi, Some(&ovmf)), || boot(&bios, None))?;
        Ok(vec![
            self.figure(
                "image-build-uefi",
                build_uefi,
                build_bios,
                "xtask vm-image --firmware uefi (cold)",
                "xtask vm-image (BIOS, cold)",
            ),
            self.figure(
                "uefi-boot",
                boot_uefi,
                boot_bios,
                "the UEFI image, stand-alone with OVMF, to the system's shell",
                "the BIOS image, stand-alone with QEMU's BIOS, to the system's shell",
            ),
        ])
    }

    /// `vm-image ARGS`, built or found: the image's path and its item's name.
    fn stored_image(&self, args: &[&str]) -> Result<(PathBuf, String)> {
        let xtask = self.xtask;
        let out = crate::process::run(&cmd!(self.sh, "{xtask} vm-image {args...}").into())?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let path = PathBuf::from(stdout.lines().last().unwrap_or_default());
        let item = path.parent().and_then(Path::file_name).context("vm-image printed no image path")?;
        let item = item.to_string_lossy().into_owned();
        Ok((path, item))
    }

    /// `vm-image ARGS` timed cold: its image `item` removed from the store first, the
    /// disk's dirty pages written back (untimed).
    fn cold_image(&self, item: &str, args: &[&str]) -> Result<(Duration, Profile)> {
        self.store.remove_entry(item)?;
        quiesce();
        let xtask = self.xtask;
        let start = Instant::now();
        run_quiet(&cmd!(self.sh, "{xtask} vm-image {args...}").into())?;
        Ok((start.elapsed(), Vec::new()))
    }

    /// substitutes: a cold start from a registry against the same built here.
    fn substitutes(&self, system: &str) -> Result<Figure> {
        let m = substitutes::measure(self.ws, self.store, self.xtask, system, self.accel.name())?;
        Ok(Figure {
            ours_bytes: Some(m.pulled_bytes),
            floor_bytes: Some(m.built_bytes),
            ..self.figure(
                "substitutes",
                m.pulled_s,
                m.built_s,
                "xtask run-vm -- true, cold, every item from a registry",
                "the same, built here (kernel fetched and unpacked, initrd, helper)",
            )
        })
    }

    fn figure(&self, name: &str, ours: f64, floor: f64, what: &str, floor_what: &str) -> Figure {
        figure(name, ours, floor, self.accel, what, floor_what)
    }
}

/// A scaling figure's rate: MiB of added data, MiB/s of closure, seconds.
type Rate = (u64, f64, f64);

/// Each step's median over runs (steps in the first run's order).
fn median_steps(runs: &[Vec<(&'static str, f64)>]) -> Vec<Step> {
    let Some(first) = runs.first() else { return Vec::new() };
    first
        .iter()
        .map(|(name, _)| {
            let mut times: Vec<Duration> = runs
                .iter()
                .filter_map(|r| r.iter().find(|(n, _)| n == name))
                .map(|(_, s)| Duration::from_secs_f64(*s))
                .collect();
            times.sort();
            Step { name: name.to_string(), s: median(&times).as_secs_f64() }
        })
        .collect()
}

fn figure(name: &str, ours: f64, floor: f64, accel: Accel, what: &str, floor_what: &str) -> Figure {
    Figure {
        name: name.into(),
        ours_s: ours,
        floor_s: floor,
        ratio: if floor > 0.0 { ours / floor } else { f64::NAN },
        accel: accel.name().into(),
        ours: what.into(),
        floor: floor_what.into(),
        mib_per_s: None,
        steps: Vec::new(),
        floor_steps: Vec::new(),
        ours_bytes: None,
        floor_bytes: None,
        vm_memory: None,
    }
}

/// Runs `cmd` (an xtask running VMs) to its end, sampling its QEMU processes' memory
/// every 50 ms ([`VmMemory`]); its failure is the error.
fn vm_memory(mut cmd: Command) -> Result<VmMemory> {
    use std::process::Stdio;
    let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().context("starting the run to measure")?;
    let stderr = child.stderr.take().context("its stderr")?;
    let said = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let parent = child.id();
    let mut memory = VmMemory::default();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        let vms = qemu_children(parent);
        memory.vms = memory.vms.max(vms.len());
        if vms.len() >= 2 {
            let sums = vms.iter().filter_map(|pid| process_memory(*pid)).fold([0u64; 3], |mut a, m| {
                (0..3).for_each(|i| a[i] += m[i]);
                a
            });
            let n = vms.len() as u64;
            memory.samples += 1;
            memory.pss_bytes = memory.pss_bytes.max(sums[0] / n);
            memory.private_bytes = memory.private_bytes.max(sums[1] / n);
            memory.rss_bytes = memory.rss_bytes.max(sums[2] / n);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let said = said.join().unwrap_or_default();
    if !status.success() {
        bail!("the measured run failed ({status}): {}", crate::process::last_lines(&said));
    }
    if memory.samples == 0 {
        bail!("no two QEMU processes were seen running at once: {}", crate::process::last_lines(&said));
    }
    Ok(memory)
}

/// The QEMU processes whose parent is `parent` (their command line names QEMU: the
/// host's, or the store's through its loader).
fn qemu_children(parent: u32) -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // After the command's name in parentheses: state, then the parent's PID.
            let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse().ok());
            ppid == Some(parent)
                && fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(crate::host::QEMU_SYSTEM.program))
        })
        .collect()
}

/// A process's PSS, private and resident bytes (`smaps_rollup`; its RSS for all three
/// where that file is missing).
fn process_memory(pid: u32) -> Option<[u64; 3]> {
    let kib = |text: &str, key: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    match fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) {
        Ok(text) => {
            let private = kib(&text, "Private_Clean:") + kib(&text, "Private_Dirty:");
            Some([kib(&text, "Pss:"), private, kib(&text, "Rss:")])
        }
        Err(_) => {
            let rss = kib(&fs::read_to_string(format!("/proc/{pid}/status")).ok()?, "VmRSS:");
            Some([rss, rss, rss])
        }
    }
}

/// Median wall time of `runs` calls after `warmup` unmeasured ones.
fn measure(warmup: usize, runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed());
    }
    times.sort();
    Ok(median(&times).as_secs_f64())
}

fn median(sorted: &[Duration]) -> Duration {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2
    }
}

fn run_quiet(cmd: &Command) -> Result<()> {
    crate::process::run(cmd).map(drop)
}

/// Runs `qemu` (its serial console on stdout) until the guest's helper says it starts
/// the system's shell (or command), then stops it.
fn until_shell(mut qemu: Command) -> Result<()> {
    use std::io::BufRead;
    use std::process::Stdio;
    let mut child = qemu.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?;
    let stdout = child.stdout.take().context("QEMU's stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            if String::from_utf8_lossy(&line).contains("]: running [") {
                let _ = tx.send(());
                return;
            }
        }
    });
    let seen = rx.recv_timeout(Duration::from_secs(600)).is_ok();
    let _ = child.kill();
    let _ = child.wait();
    anyhow::ensure!(seen, "the image did not boot to its shell within 600 s");
    Ok(())
}

/// The floor's initramfs: busybox and the same modules as the real initrd (without
/// their signatures, as there), and a shell script as `/init`.
fn floor_initrd(store: &Store, kernel: &crate::lower::kernel::KernelTree) -> Result<Item> {
    let busybox = system::busybox(store, os_configs::Arch::X86_64)?;
    let recipe = kernel
        .identify(Recipe::new("bench-floor-initrd", "bench-floor-initrd"))?
        .input_item("busybox", &busybox)
        .param("module-signatures", "stripped");
    store.realise(&recipe, |out| {
        let wanted: Vec<String> = initrd::BASE_MODULES.iter().map(|m| m.to_string()).collect();
        let modules = ModuleIndex::read(kernel)?.closure(&wanted)?;
        fs::create_dir(out)?;
        let file = fs::File::create(out.join("initrd"))?;
        let mut cpio = CpioWriter::new(BufWriter::new(file));
        for dir in ["bin", "dev", "proc", "xchg", "m"] {
            cpio.dir(dir, 0o755)?;
        }
        cpio.char_device("dev/console", 0o600, 5, 1)?;
        cpio.file("bin/busybox", 0o755, &fs::read(busybox.path.join("bin/busybox"))?)?;
        let mut script = String::from("#!/bin/busybox sh\n");
        for m in &modules {
            let module = fs::read(&m.path)?;
            cpio.file(&format!("m/{}.ko", m.name), 0o644, initrd::strip_signature(&module))?;
            script.push_str(&format!("/bin/busybox insmod /m/{}.ko\n", m.name));
        }
        script.push_str(&format!(
            "/bin/busybox mount -t 9p -o trans=virtio,version=9p2000.L {} /xchg\n\
             echo done > /xchg/done\n/bin/busybox sync\n/bin/busybox reboot -f\n",
            guest::XCHG_TAG
        ));
        cpio.file("init", 0o755, script.as_bytes())?;
        cpio.finish()?;
        Ok(())
    })
}

fn machine_description() -> String {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split(':').nth(1)))
        .unwrap_or("?")
        .trim()
        .to_string();
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    format!("{model}, {cpus} CPUs")
}

/// Where `latest.json` goes.
pub fn report_path(ws: &Workspace) -> PathBuf {
    ws.target_dir.join("bench/latest.json")
}

/// Writes dirty pages back before an image build is timed (untimed), so that no build
/// pays for writing back what an earlier one, or the making of its inputs, left behind.
fn quiesce() {
    nix::unistd::sync();
}

const FLOOR_IMAGE: &str = "mke2fs -d of the staged tree + qemu-img convert -t unsafe";

/// What `vm-image` builds by default for `closure`: qcow2, the default size.
fn default_qcow2(closure: &Closure, firmware: os_configs::Firmware) -> Result<ImageOptions> {
    let layout = Layout::default_for(&image::footprint(closure)?, firmware);
    Ok(ImageOptions { format: DiskFormat::Qcow2, layout, volatile: false, verify_store: false })
}

/// A profile: each step's name and seconds.
type Profile = Vec<(&'static str, f64)>;

/// Builds and stores a qcow2 image of `closure` as `vm-image` does (host builder), then
/// removes it; returns the time it took to build and store, and each step's.
fn cold_library_image(store: &Store, closure: &Closure, firmware: os_configs::Firmware) -> Result<(Duration, Profile)> {
    let opts = default_qcow2(closure, firmware)?;
    let quiet = Progress { steps: false, verbose: false, expected_bytes: 0, profile: true };
    quiesce();
    image::take_profile();
    let start = Instant::now();
    quiet.mark("tools");
    let tools = crate::debian::image_tools::tools(store)?;
    let uefi = match firmware {
        os_configs::Firmware::Uefi => Some(crate::debian::image_tools::uefi_tools(store)?),
        os_configs::Firmware::Bios => None,
    };
    let recipe = image::recipe(closure, &opts, &tools, uefi.as_ref(), &image::tool_versions(store, opts.format)?);
    let uuid = image::uuid_for(&recipe.hash());
    let item = store.realise(&recipe, |out| {
        let uefi = uefi.as_ref();
        let job = image::ImageJob { store, closure, opts: &opts, uuid: &uuid, tools: &tools, uefi, progress: quiet };
        image::build_on_host(&job, out)?;
        // What is left: hashing the item and committing it.
        quiet.mark("store");
        Ok(())
    })?;
    let took = start.elapsed();
    let profile = image::take_profile();
    store.remove_entry(&item.file_name())?;
    Ok((took, profile))
}

/// The floor of the VM figures: a bare QEMU booting the same kernel, with the same flags
/// and command line, and a busybox initramfs that loads the same modules, mounts a 9p
/// share, writes a file there and powers off.
struct BareBoot {
    qemu: PathBuf,
    args: Vec<std::ffi::OsString>,
    scratch: crate::store::Scratch,
}

impl BareBoot {
    fn new(b: &Bencher, lowered: &crate::lower::system::Lowered) -> Result<BareBoot> {
        let initrd = floor_initrd(b.store, &lowered.kernel)?;
        let scratch = b.store.scratch("bench")?;
        let spec = VmSpec {
            console: Console::File(scratch.path().join("console")),
            sandbox: crate::debian::qemu::qemu_supports_sandbox(&b.store.cache_dir(), os_configs::Arch::X86_64),
            ..VmSpec::direct(
                b.accel,
                b.opts.vm.memory,
                (lowered.boot_image.clone(), initrd.path.join("initrd"), Vec::new()),
                vec![Share { tag: guest::XCHG_TAG.into(), path: scratch.path().to_path_buf(), readonly: false }],
            )
        };
        let args = qemu::args(&spec);
        Ok(BareBoot { qemu: crate::debian::qemu::program()?, args, scratch })
    }

    /// One boot to the marker and power-off.
    fn boot(&self, sh: &Shell) -> Result<()> {
        let marker = self.scratch.path().join("done");
        let _ = fs::remove_file(&marker);
        let (qemu, args) = (&self.qemu, &self.args);
        let ran = run_quiet(&cmd!(sh, "timeout 300 {qemu} {args...}").into());
        if ran.is_err() || !marker.exists() {
            let console = fs::read(self.scratch.path().join("console")).unwrap_or_default();
            bail!(
                "the bare QEMU floor failed or did not write its marker ({ran:?}); console:\n{}",
                crate::vm::tail_lines(&console)
            );
        }
        Ok(())
    }
}

/// The wall time of `f`, with no profile.
fn timed(f: impl FnOnce() -> Result<()>) -> Result<(Duration, Profile)> {
    let start = Instant::now();
    f()?;
    Ok((start.elapsed(), Vec::new()))
}

/// The floor of building an image of a closure: its tree staged beforehand (as the
/// image builder stages it), then, in each timed [`FloorImage::build`], `mke2fs -d` into a
/// raw file of the image's file system size and `qemu-img convert` to qcow2.
struct FloorImage {
    scratch: crate::store::Scratch,
    fs_kib: u64,
    tools: crate::debian::image_tools::StoreTools,
}

impl FloorImage {
    fn stage(store: &Store, closure: &Closure) -> Result<FloorImage> {
        let opts = default_qcow2(closure, os_configs::Firmware::Bios)?;
        let uuid = image::uuid_for(&"0".repeat(32));
        let scratch = store.scratch("bench-floor-image")?;
        image::stage(store, closure, &opts, &uuid, &scratch.path().join("root"), image::Staging::HardLinks)?;
        // The same mke2fs as the image builder's: Debian's, from the store.
        let tools = crate::debian::image_tools::tools(store)?;
        Ok(FloorImage { scratch, fs_kib: opts.layout.fs_blocks * 4, tools })
    }

    /// One build, after the disk has written back what came before: its time and profile.
    /// Its files are removed at once, before the kernel writes them back: the floor
    /// leaves no disk traffic behind for the next build.
    fn build(&self) -> Result<(Duration, Profile)> {
        let (root, raw, qcow2) = (self.path("root"), self.path("disk.raw"), self.path("disk.qcow2"));
        quiesce();
        let start = Instant::now();
        run_quiet(
            self.tools
                .command("mke2fs")?
                .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-d"])
                .arg(&root)
                .arg(&raw)
                .arg(format!("{}k", self.fs_kib)),
        )?;
        let made = start.elapsed();
        run_quiet(
            // As the image builder converts: no flush at the end.
            crate::process::command(host::QEMU_IMG.program)
                .args(["convert", "-t", "unsafe", "-f", "raw", "-O", "qcow2"])
                .arg(&raw)
                .arg(&qcow2),
        )?;
        let took = start.elapsed();
        for file in [&raw, &qcow2] {
            fs::remove_file(file)?;
        }
        Ok((took, vec![("mke2fs", made.as_secs_f64()), ("qcow2", (took - made).as_secs_f64())]))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.scratch.path().join(name)
    }
}

impl Drop for FloorImage {
    /// The staging tree has read-only directories; removed before the scratch goes.
    fn drop(&mut self) {
        let _ = store::remove_tree(&self.path("root"));
    }
}

/// Medians of ours and of the floor over `runs` runs of each after `warmup` unmeasured
/// ones, the two taken in turn (ours first, then the floor first, and so on), so that a
/// change in the machine's speed during the measurement (the disk, another job) falls on
/// both alike. Also each measured run's profile, ours and the floor's.
fn alternating(
    warmup: usize,
    runs: usize,
    mut ours: impl FnMut() -> Result<(Duration, Profile)>,
    mut floor: impl FnMut() -> Result<(Duration, Profile)>,
) -> Result<[(f64, Vec<Profile>); 2]> {
    let mut results: [(Vec<Duration>, Vec<Profile>); 2] = Default::default();
    for i in 0..warmup + runs {
        let order = if i % 2 == 0 { [0, 1] } else { [1, 0] };
        for side in order {
            let (took, profile) = if side == 0 { ours()? } else { floor()? };
            if i >= warmup {
                results[side].0.push(took);
                results[side].1.push(profile);
            }
        }
    }
    Ok(results.map(|(mut times, profiles)| {
        times.sort();
        (median(&times).as_secs_f64(), profiles)
    }))
}

/// Packages of generated data for the scaling figures: one per [`PACKAGE_MIB`] MiB.
const PACKAGE_MIB: u64 = 64;
/// The size of each file in a generated package.
const FILE_MIB: u64 = 16;

/// Store items holding `mib` MiB of pseudo-random (incompressible, deterministic) data
/// in all: packages of [`PACKAGE_MIB`] MiB, each of files of [`FILE_MIB`] MiB, as a real
/// closure has many packages of many files. (`mke2fs -d` copies a single file larger
/// than 512 MiB several times slower per byte: the file's extents no longer fit in its
/// inode.)
fn random_packages(store: &Store, mib: u64) -> Result<Vec<Item>> {
    let mut items = Vec::new();
    for package in 0..mib.div_ceil(PACKAGE_MIB) {
        let size = PACKAGE_MIB.min(mib - package * PACKAGE_MIB);
        let recipe = Recipe::new("bench-data", &format!("bench-data-{package}"))
            .param("mib", size.to_string())
            .param("file-mib", FILE_MIB.to_string());
        items.push(store.realise(&recipe, |out| {
            fs::create_dir(out)?;
            let mut block = vec![0u8; 1 << 20];
            for file in 0..size.div_ceil(FILE_MIB) {
                let mut w = BufWriter::new(fs::File::create(out.join(format!("data-{file}")))?);
                let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ (package << 32) ^ file;
                for _ in 0..FILE_MIB.min(size - file * FILE_MIB) {
                    for chunk in block.chunks_exact_mut(8) {
                        // xorshift64*: fast, and enough to defeat compression and deduplication.
                        x ^= x >> 12;
                        x ^= x << 25;
                        x ^= x >> 27;
                        chunk.copy_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
                    }
                    std::io::Write::write_all(&mut w, &block)?;
                }
                std::io::Write::flush(&mut w)?;
            }
            Ok(())
        })?);
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The document on a constructed report (`bench --quick --json` runs end to end in
    /// the vm-tests, about 80 s under TCG here).
    #[test]
    fn the_json_document_holds_the_report_and_its_path() {
        let mut f = figure("scaling-64MiB", 1.5, 1.25, Accel::Tcg, "ours", "floor");
        f.mib_per_s = Some(300.0);
        f.steps = vec![Step { name: "mke2fs".into(), s: 1.0 }];
        let report = Report {
            accel: "tcg".into(),
            runs: 3,
            machine: "test, 2 CPUs".into(),
            figures: vec![figure("boot-to-result", 1.2, 1.0, Accel::Tcg, "ours", "floor"), f],
            snapshot: Some(SnapshotReport { bytes: 65 << 20, boot_s: 1.5, save_s: 0.9, make_s: 3.0 }),
            only: Vec::new(),
        };
        let text = crate::report::to_json(&JsonOutput { report: &report, report_path: "/t/bench/latest.json".into() })
            .unwrap();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["accel"], "tcg");
        assert_eq!(value["runs"], 3);
        assert_eq!(value["report_path"], "/t/bench/latest.json");
        let figures = value["figures"].as_array().unwrap();
        assert_eq!(figures.len(), 2);
        assert_eq!(figures[0]["name"], "boot-to-result");
        assert!((figures[0]["ratio"].as_f64().unwrap() - 1.2).abs() < 1e-9);
        assert!(figures[0].get("mib_per_s").is_none());
        assert_eq!(figures[1]["mib_per_s"], 300.0);
        assert!(figures[0].get("steps").is_none());
        assert_eq!(figures[1]["steps"][0]["name"], "mke2fs");
        assert_eq!(value["snapshot"]["bytes"], 65 << 20);
        assert!(value.get("only").is_none());
        // Exactly one document.
        assert_eq!(serde_json::Deserializer::from_str(&text).into_iter::<serde_json::Value>().count(), 1);
    }
}
