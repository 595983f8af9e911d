//! `vm-image`: images that boot with a plain `qemu-system-x86_64 -drive file=...` (no
//! `-kernel`, nothing from the host), checked with `qemu-img check` and `e2fsck`,
//! persistent and volatile roots, the store verification, size errors, caching and
//! `--check`. The `boot-check` system prints a marker line and powers off. The boot,
//! check and volatile tests run for both builders (`--builder host|vm`).

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vm_tests::{store_dir, store_entries_named, xtask};

/// How long one boot may take under TCG (BIOS, GRUB, kernel, helper: ~10 s here).
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
const MARKER: &str = "vm-image boot-check: ok";

/// Which builder a test uses, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Builder {
    Host,
    /// `--builder vm`, with a `--size` no host-built test uses: both builders write the
    /// same bytes, so the same recipe would find the host's image in the store instead of
    /// building one in a VM. And with no `/sbin` on `PATH`: the VM builder must not need
    /// the host's e2fsprogs or fdisk.
    Vm,
}

/// The size of the VM-built test images.
const VM_BUILDER_SIZE: &str = "640MiB";

impl Builder {
    fn args(self) -> Vec<&'static str> {
        match self {
            Builder::Host => Vec::new(),
            Builder::Vm => vec!["--builder", "vm", "--size", VM_BUILDER_SIZE],
        }
    }
}

/// `xtask vm-image ARGS` with the host builder; returns the image path (the last stdout
/// line).
fn vm_image(args: &[&str]) -> (PathBuf, vm_tests::Run) {
    vm_image_with(Builder::Host, args)
}

/// Builds an image with `builder`, which really runs: an image the VM builder stored in
/// an earlier run of the tests is rebuilt in a VM with `--check` and compared.
fn build_image(builder: Builder, args: &[&str]) -> (PathBuf, vm_tests::Run) {
    let before = vm_tests::items();
    let (image, run) = vm_image_with(builder, args);
    let item = image.parent().unwrap().to_path_buf();
    if builder == Builder::Vm && before.contains(&item) {
        let mut check = args.to_vec();
        check.push("--check");
        let (again, checked) = vm_image_with(builder, &check);
        assert_eq!(again, image);
        assert!(checked.stderr.contains("the rebuilt image is identical to"), "{checked:#?}");
    } else if builder == Builder::Vm {
        assert!(run.stderr.contains("store: building"), "the image was found in the store: {run:#?}");
    }
    (image, run)
}

fn vm_image_with(builder: Builder, args: &[&str]) -> (PathBuf, vm_tests::Run) {
    let mut all = vec!["vm-image", "--explain"];
    all.extend_from_slice(args);
    all.extend(builder.args());
    let run = match builder {
        Builder::Host => xtask(&all),
        Builder::Vm => vm_tests::xtask_env(&all, &[("PATH", std::ffi::OsStr::new("/usr/local/bin:/usr/bin:/bin"))]),
    };
    run.expect_code(0);
    let path = PathBuf::from(run.stdout.lines().last().expect("vm-image printed no path"));
    assert!(path.is_file(), "vm-image printed `{}`, which is not a file: {run:#?}", path.display());
    (path, run)
}

/// A writable copy of a stored image in `dir` (the store's copy is read-only).
fn copy_image(image: &Path, dir: &Path) -> PathBuf {
    let copy = dir.join(image.file_name().unwrap());
    let status = Command::new("cp").arg("--sparse=always").arg(image).arg(&copy).status().unwrap();
    assert!(status.success());
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&copy, fs::Permissions::from_mode(0o644)).unwrap();
    copy
}

/// Kills and reaps QEMU when dropped.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The plain command line a user types: no -kernel, the disk on QEMU's default bus.
fn qemu(image: &Path, format: &str) -> Command {
    let mut cmd = Command::new(vm_tests::qemu_system());
    cmd.args(["-m", "512", "-display", "none", "-no-reboot", "-monitor", "none"])
        .arg("-drive")
        .arg(format!("file={},format={format}", image.display()));
    cmd
}

/// Boots the image with the serial console in a file; waits (with a timeout) for QEMU
/// to end and returns the console text.
fn boot(image: &Path, format: &str) -> String {
    boot_with(qemu(image, format), image)
}

/// [`boot`] with UEFI firmware, `ovmf` ([`with_ovmf`]).
fn boot_uefi(image: &Path, format: &str, ovmf: &(PathBuf, PathBuf)) -> String {
    let dir = image.parent().unwrap();
    boot_with(with_ovmf(qemu(image, format), ovmf, dir), image)
}

fn boot_with(mut qemu: Command, image: &Path) -> String {
    let log = image.with_extension("console.log");
    let _ = fs::remove_file(&log);
    let child = qemu
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting qemu-system-x86_64");
    let mut qemu = Qemu(child);
    let deadline = Instant::now() + BOOT_TIMEOUT;
    loop {
        if let Some(status) = qemu.0.try_wait().unwrap() {
            let console = fs::read_to_string(&log).unwrap_or_default();
            let stderr = vm_tests::read_all(qemu.0.stderr.take().unwrap());
            assert!(status.success(), "QEMU failed ({status}): {stderr}\nconsole:\n{console}");
            return console;
        }
        if Instant::now() >= deadline {
            let console = fs::read_to_string(&log).unwrap_or_default();
            panic!("the VM did not power off within {BOOT_TIMEOUT:?}; console:\n{console}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn marker_line(console: &str) -> &str {
    console.lines().find(|l| l.contains(MARKER)).unwrap_or_else(|| panic!("no boot marker on the console:\n{console}"))
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().to_string()
}

/// `e2fsck -fn` (Debian's, from the store) on the image's root partition.
fn e2fsck_root(raw: &Path) {
    e2fsck_root_at(raw, 1 << 20);
}

fn e2fsck_root_at(raw: &Path, offset: u64) {
    let out = Command::new(vm_tests::image_tools_dir().join("e2fsck"))
        .arg("-fn")
        .arg(format!("{}?offset={offset}", raw.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "e2fsck -fn on the root partition of `{}` failed: {}{}",
        raw.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn qemu_img_check(image: &Path) {
    let out = Command::new("qemu-img").args(["check", "-f", "qcow2"]).arg(image).output().unwrap();
    assert!(out.status.success(), "qemu-img check `{}`: {}", image.display(), String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).contains("No errors were found"));
}

#[test]
fn qcow2_image_boots_keeps_its_writes_and_passes_checks() {
    qcow2_image_boots(Builder::Host);
}

#[test]
fn vm_built_qcow2_image_boots_keeps_its_writes_and_passes_checks() {
    qcow2_image_boots(Builder::Vm);
}

fn qcow2_image_boots(builder: Builder) {
    let (image, first) = build_image(builder, &["--system", "boot-check", "--format", "qcow2"]);
    assert!(image.to_string_lossy().ends_with("-vm-image-boot-check-qcow2/disk.qcow2"), "{}", image.display());
    // The same inputs again: a cache hit, with the same path at once.
    let started = Instant::now();
    let (again, second) = vm_image_with(builder, &["--system", "boot-check", "--format", "qcow2"]);
    assert_eq!(again, image, "{first:#?}");
    assert!(!second.stderr.contains("store: building"), "the second run built something: {second:#?}");
    assert!(started.elapsed() < Duration::from_secs(30));
    if builder == Builder::Host {
        // Rebuilt with its raw intermediate on disk and the closure staged as hard links
        // (the fallbacks for machines without room in /dev/shm or user namespaces): the
        // same bytes.
        let args = ["vm-image", "--system", "boot-check", "--format", "qcow2", "--check"];
        let off = [("XTASK_NO_SHM", "1".as_ref()), ("XTASK_NO_USERNS", "1".as_ref())];
        let checked = vm_tests::xtask_env(&args, &off);
        checked.expect_code(0);
        assert!(checked.stderr.contains("the rebuilt image is identical to"), "{checked:#?}");
    }

    qemu_img_check(&image);
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("root.raw");
    let status = Command::new("qemu-img").args(["convert", "-f", "qcow2", "-O", "raw"]).arg(&image).arg(&raw).status();
    assert!(status.unwrap().success());
    e2fsck_root(&raw);

    let copy = copy_image(&image, dir.path());
    let line = marker_line(&boot(&copy, "qcow2")).to_string();
    assert!(line.contains("root=persistent boots=1"), "{line}");
    assert!(line.contains("-system-boot-check"), "{line}");
    // The count written at the first boot is on the disk at the second.
    let line = marker_line(&boot(&copy, "qcow2")).to_string();
    assert!(line.contains("root=persistent boots=2"), "{line}");
    qemu_img_check(&copy);
}

/// The UEFI firmware `vm-image` names for a UEFI image (Debian's OVMF in the store): its
/// code, and the template of its variables store.
fn ovmf_named_by(run: &vm_tests::Run) -> (PathBuf, PathBuf) {
    let code = run.stderr.split("readonly=on,file=").nth(1).and_then(|rest| rest.split_whitespace().next());
    let vars = run.stderr.split("(VARS.fd: a writable copy of ").nth(1).and_then(|rest| rest.split(')').next());
    let (Some(code), Some(vars)) = (code, vars) else { panic!("vm-image named no UEFI firmware: {run:#?}") };
    let found = (PathBuf::from(code), PathBuf::from(vars));
    assert!(found.0.is_file() && found.1.is_file(), "{found:?}");
    found
}

/// `cmd` with UEFI firmware: OVMF's code read-only, and a fresh copy of its variables
/// store in `dir` (no boot entry from an earlier boot).
fn with_ovmf(mut cmd: Command, (code, vars): &(PathBuf, PathBuf), dir: &Path) -> Command {
    let copy = dir.join("OVMF_VARS.fd");
    let _ = fs::remove_file(&copy);
    fs::copy(vars, &copy).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&copy, fs::Permissions::from_mode(0o644)).unwrap();
    cmd.arg("-drive").arg(format!("if=pflash,format=raw,unit=0,readonly=on,file={}", code.display()));
    cmd.arg("-drive").arg(format!("if=pflash,format=raw,unit=1,file={}", copy.display()));
    cmd
}

/// `--firmware uefi`: a GPT disk whose EFI system partition has GRUB for UEFI; Debian's
/// OVMF (from the store, as vm-image says) boots it with a fresh variables store each
/// time, the root persists between boots, and `--check` rebuilds it bit for bit. The
/// default system boots to its shell, knowing it was booted by UEFI.
#[test]
fn uefi_image_boots_with_ovmf_and_rebuilds_bit_for_bit() {
    let (image, run) = vm_image(&["--system", "boot-check", "--firmware", "uefi", "--format", "raw", "--check"]);
    assert!(run.stderr.contains("the rebuilt image is identical to"), "{run:#?}");
    assert!(image.to_string_lossy().ends_with("-vm-image-boot-check-raw-uefi/disk.raw"), "{}", image.display());
    let ovmf = ovmf_named_by(&run);
    let table = Command::new(vm_tests::image_tools_dir().join("sfdisk")).arg("--dump").arg(&image).output().unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("label: gpt"), "{table}");
    assert!(
        table.contains("start=        2048, size=       32768, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B"),
        "{table}"
    );
    assert!(table.contains("start=       34816,"), "{table}");
    e2fsck_root_at(&image, 17 << 20);

    let dir = tempfile::tempdir().unwrap();
    let copy = copy_image(&image, dir.path());
    let line = marker_line(&boot_uefi(&copy, "raw", &ovmf)).to_string();
    assert!(line.contains("root=persistent boots=1"), "{line}");
    let line = marker_line(&boot_uefi(&copy, "raw", &ovmf)).to_string();
    assert!(line.contains("root=persistent boots=2"), "{line}");

    let (image, run) = vm_image(&["--firmware", "uefi", "--format", "qcow2"]);
    let copy = copy_image(&image, dir.path());
    let ask =
        "echo uefi-$(cat /sys/firmware/efi/fw_platform_size)-$((6*7)) $(grep -c '^/dev/sda2 / ext4 rw' /proc/mounts)\n";
    let steps = [("[minimal:~]# ", ask), ("uefi-64-42 1", "poweroff\n")];
    let qemu = with_ovmf(qemu(&copy, "qcow2"), &ovmf_named_by(&run), dir.path());
    assert_powered_off(&converse_with(qemu, &steps), 2);
}

/// `--arch aarch64`: a GPT disk whose EFI system partition has GRUB's arm64-efi image as
/// `EFI/BOOT/BOOTAA64.EFI`; Debian's AAVMF (from the store, as vm-image says) boots it on
/// QEMU's `virt` machine to the system's shell, and `--check` rebuilds it bit for bit.
/// BIOS, which aarch64 machines do not have, is refused.
#[test]
fn aarch64_uefi_image_boots_with_aavmf_to_a_shell_and_rebuilds_bit_for_bit() {
    let (image, run) = vm_image(&["--arch", "aarch64", "--format", "raw", "--check"]);
    assert!(run.stderr.contains("the rebuilt image is identical to"), "{run:#?}");
    assert!(image.to_string_lossy().ends_with("-vm-image-minimal-aarch64-raw-uefi/disk.raw"), "{}", image.display());
    assert!(run.stderr.contains("Debian's AAVMF from the store"), "{run:#?}");
    let aavmf = ovmf_named_by(&run);
    let table = Command::new(vm_tests::image_tools_dir().join("sfdisk")).arg("--dump").arg(&image).output().unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("label: gpt"), "{table}");
    e2fsck_root_at(&image, 17 << 20);

    let dir = tempfile::tempdir().unwrap();
    let copy = copy_image(&image, dir.path());
    let mut qemu = Command::new(vm_tests::qemu_system_aarch64());
    qemu.args(["-machine", "virt", "-cpu", "cortex-a57", "-m", "512", "-display", "none", "-no-reboot"])
        .args(["-monitor", "none", "-nic", "none", "-drive"])
        .arg(format!("file={},format=raw", copy.display()));
    let ask = "echo uefi-$(cat /sys/firmware/efi/fw_platform_size)-$(uname -m) $(grep -c '^/dev/vda2 / ext4 rw' \
               /proc/mounts)\n";
    let steps = [("[minimal:~]# ", ask), ("uefi-64-aarch64 1", "poweroff\n")];
    assert_powered_off(&converse_with(with_ovmf(qemu, &aavmf, dir.path()), &steps), 2);

    let run = xtask(&["vm-image", "--arch", "aarch64", "--firmware", "bios"]);
    run.expect_code(2);
    assert!(run.stderr.contains("--firmware bios: aarch64 systems boot with UEFI only"), "{run:#?}");
    let run = xtask(&["vm-image", "--arch", "aarch64", "--system", "bios-only"]);
    run.expect_code(2);
    assert!(run.stderr.contains("has bootloader GrubBios, for BIOS only"), "{run:#?}");
}

/// The VM builder writes the same UEFI image as the host builder.
#[test]
fn vm_built_uefi_image_equals_the_host_builders() {
    vm_built_image_equals_the_host_builders(&["--system", "boot-check", "--format", "raw", "--firmware", "uefi"]);
}

/// Builds the image of `args` in a VM, then rebuilds it with the host builder
/// (`--check`): the same bytes.
fn vm_built_image_equals_the_host_builders(args: &[&str]) {
    let (image, _) = build_image(Builder::Vm, args);
    let mut check = vec!["vm-image", "--builder", "host", "--size", VM_BUILDER_SIZE, "--check"];
    check.extend(args);
    let run = xtask(&check);
    run.expect_code(0);
    assert!(run.stderr.contains("the rebuilt image is identical to"), "{run:#?}");
    assert_eq!(run.stdout.lines().last().map(PathBuf::from), Some(image));
}

/// A system's bootloader says which firmware its images are for: a UEFI-only one's are
/// UEFI images by default; asking for a firmware its bootloader has not is an error
/// naming what it supports (exit 2, nothing built); so is a firmware that does not exist.
#[test]
fn the_bootloader_decides_the_firmware_and_refuses_others() {
    let (image, _) = vm_image(&["--system", "uefi-only", "--format", "raw"]);
    assert!(image.to_string_lossy().ends_with("-vm-image-uefi-only-raw-uefi/disk.raw"), "{}", image.display());
    let run = xtask(&["vm-image", "--system", "uefi-only", "--firmware", "bios"]);
    run.expect_code(2);
    assert!(run
        .stderr
        .contains("--firmware bios: system `uefi-only` has bootloader GrubEfi, which boots with uefi only"));
    let run = xtask(&["vm-image", "--system", "bios-only", "--firmware", "uefi"]);
    run.expect_code(2);
    assert!(run.stderr.contains("has bootloader GrubBios, which boots with bios only"), "{run:#?}");
    assert!(run.stderr.contains("`Bootloader::Grub` (BIOS and UEFI)"), "{run:#?}");
    assert!(store_entries_named("vm-image-bios-only-qcow2-uefi").is_empty(), "something was stored");
    let run = xtask(&["vm-image", "--firmware", "coreboot"]);
    run.expect_code(2);
    assert!(run.stderr.contains("`coreboot` is not a firmware images are made for: bios or uefi"), "{run:#?}");
}

#[test]
fn volatile_raw_image_is_never_written() {
    volatile_raw_image(Builder::Host);
}

/// Also checks that the host builder rebuilds the VM-built image bit for bit.
#[test]
fn vm_built_volatile_raw_image_is_never_written_and_equals_the_host_builders() {
    vm_built_image_equals_the_host_builders(&["--system", "boot-check", "--format", "raw", "--volatile"]);
    volatile_raw_image(Builder::Vm);
}

fn volatile_raw_image(builder: Builder) {
    let (image, _) = vm_image_with(builder, &["--system", "boot-check", "--format", "raw", "--volatile"]);
    e2fsck_root(&image);
    let dir = tempfile::tempdir().unwrap();
    let copy = copy_image(&image, dir.path());
    let before = sha256(&copy);
    assert_eq!(before, sha256(&image));
    for _ in 0..2 {
        let console = boot(&copy, "raw");
        let line = marker_line(&console);
        // Each boot starts from the image as built: the previous boot's count is gone.
        assert!(line.contains("root=volatile boots=1"), "{line}");
    }
    assert_eq!(sha256(&copy), before, "booting the volatile image changed the image file");
}

/// The root file system is checked at each boot (`check: true`, read-only for a
/// volatile root): a damage that mounting does not notice stops the boot, named.
#[test]
fn the_root_is_checked_at_boot_and_a_failed_check_stops_it() {
    let (image, _) = vm_image(&["--system", "boot-check", "--format", "raw", "--volatile"]);
    let dir = tempfile::tempdir().unwrap();
    let copy = copy_image(&image, dir.path());
    let console = boot(&copy, "raw");
    marker_line(&console);
    assert!(console.contains("checked (e2fsck -n)"), "the root was not checked:\n{console}");

    // A wrong link count on the root directory, and the file system marked as having
    // errors (so the check is not skipped as clean): the kernel mounts it all the same.
    let commands = dir.path().join("damage");
    fs::write(&commands, "sif <2> links_count 9\nssv state 2\n").unwrap();
    let out = Command::new(vm_tests::image_tools_dir().join("debugfs"))
        .arg("-w")
        .arg("-f")
        .arg(&commands)
        .arg(format!("{}?offset=1048576", copy.display()))
        .output()
        .expect("running debugfs (Debian's e2fsprogs)");
    assert!(out.status.success(), "debugfs: {}", String::from_utf8_lossy(&out.stderr));
    let console = boot(&copy, "raw");
    assert!(!console.contains(MARKER), "the damaged root booted:\n{console}");
    let failed = console.lines().find(|l| l.starts_with("vm-image: boot failed: file system check of /dev/"));
    let failed = failed.unwrap_or_else(|| panic!("no boot error naming the check:\n{console}"));
    assert!(failed.contains("(e2fsck -n, exit status 4)") && failed.contains("ref count"), "{failed}");
}

/// Boots a copy of `image` with the serial console on QEMU's stdio and runs `steps` on
/// it; the last step is expected to power the VM off.
fn converse_with_image(image: &Path, steps: &[(&str, &str)]) -> vm_tests::Conversation {
    let dir = tempfile::tempdir().unwrap();
    let copy = copy_image(image, dir.path());
    converse_with(qemu(&copy, "qcow2"), steps)
}

/// Runs `qemu` with the serial console on its stdio and runs `steps` on it.
fn converse_with(mut qemu: Command, steps: &[(&str, &str)]) -> vm_tests::Conversation {
    let child = qemu
        .args(["-serial", "stdio"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut qemu = Qemu(child);
    vm_tests::converse(&mut qemu.0, steps, BOOT_TIMEOUT)
}

fn assert_powered_off(talk: &vm_tests::Conversation, steps: usize) {
    let seen = &talk.console;
    assert_eq!(talk.steps, steps, "the shell did not answer as expected; console:\n{seen}");
    let status = talk.status.unwrap_or_else(|| panic!("`poweroff` did not end the VM; console:\n{seen}"));
    assert!(status.success(), "QEMU failed ({status}); console:\n{seen}");
}

#[test]
fn default_system_image_gives_a_root_shell_and_poweroff_ends_it() {
    let (image, _) = vm_image(&["--format", "qcow2"]);
    // What every system has, booted from a disk too: `nobody`, /var/tmp and /dev/shm
    // open to all, devpts, /dev/fd.
    let ask = "echo answer-$((6*7)) $(grep -c ' / ext4 rw' /proc/mounts) $(grep -c '^nobody:x:65534:' /etc/passwd) \
               $(stat -c %a /var/tmp /dev/shm) $(grep -c ' /dev/pts devpts ' /proc/mounts) $(readlink /dev/fd)\n";
    let steps = [("[minimal:~]# ", ask), ("answer-42 1 1 1777 1777 1 /proc/self/fd", "poweroff\n")];
    assert_powered_off(&converse_with_image(&image, &steps), 2);
}

#[test]
fn hello_system_image_starts_its_service_at_boot() {
    let (image, _) = vm_image(&["--system", "hello", "--format", "qcow2"]);
    // The service (started by the helper from the system item, as the user `hello`)
    // answers on its port; the host name and a user's home come from the system too.
    let ask = "nc 127.0.0.1 7878 </dev/null; echo $(hostname) \
               $(ps -o user,args | grep '[h]ello-service' | cut -d' ' -f1) $(stat -c %U:%G /home/alice)\n";
    let steps =
        [("[hello:~]# ", ask), ("hello-service v1: hello from the VM\nhello-vm hello alice:users\n", "poweroff\n")];
    assert_powered_off(&converse_with_image(&image, &steps), 2);
}

/// A declared disk, by label: checked (repairing, as it is mounted read-write) and
/// mounted by the helper at boot.
#[test]
fn a_declared_disk_is_checked_repaired_and_mounted() {
    let (image, _) = vm_image(&["--system", "data-disk", "--format", "qcow2"]);
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("content");
    fs::create_dir(&content).unwrap();
    fs::write(content.join("greeting"), "from the data disk\n").unwrap();
    let data = dir.path().join("data.raw");
    let made = Command::new(vm_tests::image_tools_dir().join("mke2fs"))
        .args(["-q", "-t", "ext4", "-L", "vmdata", "-d"])
        .arg(&content)
        .arg(&data)
        .arg("16M")
        .output()
        .expect("running mke2fs");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    // A damage e2fsck -p repairs by itself; marked, so the check is not skipped.
    let commands = dir.path().join("damage");
    fs::write(&commands, "sif <2> links_count 9\nssv state 2\n").unwrap();
    let damaged = Command::new(vm_tests::image_tools_dir().join("debugfs"))
        .arg("-w")
        .arg("-f")
        .arg(&commands)
        .arg(&data)
        .output()
        .unwrap();
    assert!(damaged.status.success(), "{}", String::from_utf8_lossy(&damaged.stderr));

    let copy = copy_image(&image, dir.path());
    let child = qemu(&copy, "qcow2")
        .arg("-drive")
        .arg(format!("file={},format=raw", data.display()))
        .args(["-serial", "stdio"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut qemu = Qemu(child);
    let steps = [
        ("[data-disk:~]# ", "cat /data/greeting; grep -c ' /data ext4 rw' /proc/mounts\n"),
        ("from the data disk\n1\n", "poweroff\n"),
    ];
    let talk = vm_tests::converse(&mut qemu.0, &steps, BOOT_TIMEOUT);
    assert_powered_off(&talk, 2);
    assert!(talk.console.contains("errors corrected (e2fsck -p)"), "no repair on the console:\n{}", talk.console);
    let check = Command::new(vm_tests::image_tools_dir().join("e2fsck")).arg("-fn").arg(&data).output().unwrap();
    assert!(check.status.success(), "the disk was not repaired: {}", String::from_utf8_lossy(&check.stdout));
}

#[test]
fn too_small_size_is_a_clear_error_and_stores_nothing() {
    // A combination no other test builds, so its absence afterwards means something.
    let name = "vm-image-boot-check-qcow2-volatile";
    assert!(store_entries_named(name).is_empty(), "another test built `{name}`; pick another combination");
    let run = xtask(&["vm-image", "--system", "boot-check", "--volatile", "--size", "64MiB"]);
    run.expect_code(2);
    assert!(run.stderr.contains("--size 64 MiB is too small for system `boot-check`"), "{run:#?}");
    let needs = run.stderr.split("needs at least ").nth(1).and_then(|s| s.split(' ').next()).expect("no minimum");
    assert!(needs.parse::<u64>().unwrap() > 64, "{run:#?}");
    assert!(run.stderr.contains("its closure is "), "the closure's size is not named: {run:#?}");
    assert!(run.stdout.is_empty(), "{run:#?}");
    assert!(store_entries_named(name).is_empty(), "a refused image left something in the store");
}

/// Flips one byte of busybox inside the image's store: a boot that verifies the store
/// must name the damaged item and stop, where the intact image boots.
#[test]
fn store_verification_detects_a_flipped_byte() {
    let (image, _) = vm_image(&["--system", "boot-check", "--format", "raw", "--verify-store"]);
    let dir = tempfile::tempdir().unwrap();
    let copy = copy_image(&image, dir.path());
    let console = boot(&copy, "raw");
    // The kernel, the initrd, busybox, e2fsck's packages and wrappers (the root is
    // checked at boot), the system item.
    let verified =
        console.lines().find_map(|l| l.strip_prefix("store verified: ")).unwrap_or_else(|| panic!("{console}"));
    let items: usize = verified.split(' ').next().unwrap().parse().unwrap();
    assert!(verified.ends_with(" items match their registered hashes") && items >= 4, "{verified}");
    marker_line(&console);

    let copy = copy_image(&image, dir.path());
    // The image's busybox: x86_64's, not an aarch64 guest's.
    let busybox = vm_tests::items()
        .into_iter()
        .map(|p| p.join("bin/busybox"))
        .find(|p| p.is_file() && !p.to_string_lossy().contains("busybox-static") && vm_tests::is_x86_64_elf(p))
        .expect("no busybox item in the store");
    let mut block = vec![0u8; 4096];
    fs::File::open(&busybox).unwrap().read_exact(&mut block).unwrap();
    // Files start on 4 KiB blocks, and the partition on a 1 MiB boundary.
    let mut file = fs::File::options().read(true).write(true).open(&copy).unwrap();
    let mut buf = vec![0u8; 4096];
    let mut offset = 0u64;
    let found = loop {
        match file.read_exact(&mut buf) {
            Ok(()) if buf == block => break offset,
            Ok(()) => offset += 4096,
            Err(_) => panic!("busybox's first block is not in the image"),
        }
    };
    use std::io::{Seek, SeekFrom};
    file.seek(SeekFrom::Start(found + 1000)).unwrap();
    file.write_all(&[block[1000] ^ 0x01]).unwrap();
    drop(file);
    let console = boot(&copy, "raw");
    assert!(console.contains(&format!("store verification failed for 1 of {items} items")), "{console}");
    let failure = console.lines().find(|l| l.contains("store verification failed")).unwrap();
    assert!(failure.contains("-busybox-"), "the damaged item is not named: {failure}");
    assert!(!console.contains(MARKER), "the damaged system booted anyway:\n{console}");
}

#[test]
fn check_rebuilds_bit_for_bit() {
    let run = xtask(&["vm-image", "--system", "boot-check", "--format", "raw", "--volatile", "--check"]);
    run.expect_code(0);
    assert!(run.stderr.contains("the rebuilt image is identical to"), "{run:#?}");
    assert!(run.stdout.trim_end().ends_with("/disk.raw"), "{run:#?}");
}

/// The same image built in a store at another path is byte-identical: no host path gets
/// into an image (the recipe has none, and the builder writes none). The second build
/// stages the closure as hard links (`XTASK_NO_USERNS=1`) where the first bind-mounted
/// the items in a user namespace (where the machine allows it): both give the same bytes.
/// So is a UEFI image (its EFI system partition's FAT included).
#[test]
fn a_store_elsewhere_builds_a_byte_identical_raw_image() {
    // BIOS and UEFI for x86_64, UEFI for aarch64.
    let firmwares: [&[&str]; 3] =
        [&["--firmware", "bios"], &["--firmware", "uefi"], &["--firmware", "uefi", "--arch", "aarch64"]];
    let images: Vec<PathBuf> = firmwares
        .iter()
        .map(|f| vm_image(&[&["--system", "boot-check", "--format", "raw", "--size", "600MiB"], *f].concat()).0)
        .collect();
    // Another store: hard links to every item but the images (and GRUB's), under another
    // directory.
    let other = tempfile::tempdir_in(store_dir().parent().unwrap()).unwrap();
    let store = other.path().join("somewhere/else/store");
    fs::create_dir_all(&store).unwrap();
    vm_tests::copy_items(&store, true, |name| !name.contains("-vm-image-") && !name.contains("-grub-"));
    for (firmware, image) in firmwares.iter().zip(images) {
        let args = ["vm-image", "--explain", "--system", "boot-check", "--format", "raw", "--size", "600MiB"];
        let args = [&args[..], firmware].concat();
        let env = [("XTASK_VMSTORE", store.as_os_str()), ("XTASK_NO_USERNS", "1".as_ref())];
        let run = vm_tests::xtask_env(&args, &env);
        run.expect_code(0);
        assert!(run.stderr.contains("store: building"), "the image must be built anew: {run:#?}");
        let again = PathBuf::from(run.stdout.lines().last().unwrap());
        assert_eq!(again.parent().unwrap().file_name(), image.parent().unwrap().file_name(), "same recipe, same item");
        assert_ne!(again, image);
        assert!(fs::read(&again).unwrap() == fs::read(&image).unwrap(), "the two {firmware:?} raw images differ");
    }
}
