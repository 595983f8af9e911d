//! `cargo xtask bench`: measures the toolkit against floors measured in the same run
//! (a bare QEMU boot, `true`, ...) and prints ratios, so figures from a noisy, shared
//! machine still compare. Writes `target/bench/latest.json`.

use std::fs;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::VmOpts;
use crate::cpio::CpioWriter;
use crate::kernel::ModuleIndex;
use crate::qemu::{self, Accel, Console, Share, VmSpec};
use crate::store::{Item, Recipe, Store};
use crate::{host, initrd, system, Workspace};

#[derive(Debug, Clone, clap::Args)]
pub struct Bench {
    /// Fewer repetitions (for CI): 1 warm-up and 3 measured runs instead of 2 and 7.
    #[arg(long)]
    pub quick: bool,
    #[command(flatten)]
    pub vm: VmOpts,
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
}

#[derive(Debug, Serialize)]
struct Report {
    accel: String,
    runs: usize,
    machine: String,
    figures: Vec<Figure>,
}

impl Bench {
    pub fn run(self, ws: &Workspace) -> Result<i32> {
        let (warmup, runs) = if self.quick { (1, 3) } else { (2, 7) };
        let accel = qemu::choose_accel(self.vm.accel)?;
        let store = self.vm.open_store(ws)?;
        let system = self.vm.system()?;
        let xtask = std::env::current_exe().context("finding the xtask binary")?;
        let lowered = system::lower(&store, ws, &system, false)?;
        let mut figures = Vec::new();

        // boot-to-result: `run-vm -- true`, warm, against a bare QEMU booting the same
        // kernel with a busybox initramfs that loads the same modules, mounts a 9p
        // share, writes a file there and powers off.
        let accel_flag = ["--accel", accel.name()];
        let ours = measure(warmup, runs, || {
            run_quiet(Command::new(&xtask).arg("run-vm").args(accel_flag).args(["--", "true"]))
        })?;
        let floor_initrd = floor_initrd(&store, &lowered.kernel)?;
        let floor_spec = |xchg: &Path| VmSpec {
            accel,
            memory_mib: self.vm.memory,
            kernel: lowered.boot_image.clone(),
            initrd: floor_initrd.path.join("initrd"),
            kernel_args: Vec::new(),
            tsc_khz: if accel == Accel::Tcg { qemu::host_tsc_khz() } else { None },
            console: Console::File("/dev/null".into()),
            shares: vec![Share { tag: guest::XCHG_TAG.into(), path: xchg.to_path_buf(), readonly: false }],
            disks: Vec::new(),
            ports: Vec::new(),
            sandbox: host::qemu_supports_sandbox(&store.cache_dir()),
        };
        let scratch = store.scratch("bench")?;
        let floor = measure(warmup, runs, || {
            let marker = scratch.path().join("done");
            let _ = fs::remove_file(&marker);
            run_quiet(Command::new(host::QEMU_SYSTEM.program).args(qemu::args(&floor_spec(scratch.path()))))?;
            if !marker.exists() {
                bail!("the bare QEMU floor did not write its marker: its boot failed");
            }
            Ok(())
        })?;
        figures.push(figure(
            "boot-to-result",
            ours,
            floor,
            accel,
            "xtask run-vm -- true",
            "bare qemu + busybox initramfs",
        ));

        // cache-hit: a build-in-vm whose result is stored, timed as the xtask binary
        // alone and through cargo, against `true`.
        let build = ["build-in-vm", "--name", "bench-cache-hit", "--", "sh", "-c", "echo hit > $out/f"];
        run_quiet(Command::new(&xtask).args(build))?;
        let hit = measure(warmup, runs.max(5), || run_quiet(Command::new(&xtask).args(build)))?;
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let hit_cargo = measure(warmup, runs.max(5), || {
            run_quiet(Command::new(&cargo).current_dir(&ws.root).arg("xtask").args(build))
        })?;
        let t = measure(warmup, runs.max(5), || run_quiet(&mut Command::new("true")))?;
        figures.push(figure("cache-hit", hit, t, accel, "xtask build-in-vm (stored)", "true"));
        figures.push(figure("cache-hit-cargo", hit_cargo, t, accel, "cargo xtask build-in-vm (stored)", "true"));

        for f in &figures {
            println!(
                "{:<18} ours {:>8.3}s  floor {:>8.3}s  ratio {:>6.2}  [{}]",
                f.name, f.ours_s, f.floor_s, f.ratio, f.accel
            );
        }
        let report = Report { accel: accel.name().into(), runs, machine: machine_description(), figures };
        let out = report_path(ws);
        fs::create_dir_all(out.parent().unwrap_or(Path::new(".")))?;
        fs::write(&out, serde_json::to_vec_pretty(&report)?).with_context(|| format!("writing `{}`", out.display()))?;
        println!("{}", out.display());
        Ok(0)
    }
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

fn run_quiet(cmd: &mut Command) -> Result<()> {
    let out = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).output()?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// The floor's initramfs: busybox and the same modules as the real initrd, and a shell
/// script as `/init`.
fn floor_initrd(store: &Store, kernel: &crate::kernel::KernelTree) -> Result<Item> {
    let busybox = system::busybox(store)?;
    let recipe =
        kernel.identify(Recipe::new("bench-floor-initrd", "bench-floor-initrd"))?.input_item("busybox", &busybox);
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
            cpio.file(&format!("m/{}.ko", m.name), 0o644, &fs::read(&m.path)?)?;
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
