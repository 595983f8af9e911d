//! The guest is hostile: whatever it leaves in the exchange directory (the status, files
//! planted where the host might look) must neither leak host data nor be evaluated, and
//! a forged status is a clear error, never a crash, a hang or a false success.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::nonce;
use vm_tests::{xtask, xtask_bin, xtask_env, Run, TIMEOUT};

/// Runs `xtask ARGS` with `envs`, failing (instead of hanging) if it has not ended after
/// `secs`: a host that blocks on what the guest left is one of the bugs looked for.
fn xtask_within(secs: u64, args: &[&str], envs: &[(&str, &OsStr)]) -> Run {
    let mut cmd = Command::new(xtask_bin());
    cmd.args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    vm_tests::output_within(cmd, secs)
}

/// Ends the VM at once from the guest (sysrq `b`: no sync, no shutdown; the 9p share
/// has no cache, so what was written is on the host already).
const REBOOT_NOW: &str = "echo b > /proc/sysrq-trigger; sleep 1000";

/// Has the guest run `script`, then end the VM at once, so the guest helper never
/// writes a status of its own over what the script left.
fn forge(script: &str, envs: &[(&str, &OsStr)]) -> Run {
    let script = format!("{script}; {REBOOT_NOW}");
    xtask_within(400, &["run-vm", "--timeout", TIMEOUT, "--", "sh", "-c", &script], envs)
}

fn assert_clear_failure(run: &Run, what: &str, needle: &str) {
    assert_eq!(run.code, 1, "{what}: expected exit status 1; got {run:#?}");
    assert!(run.stderr.contains(needle), "{what}: stderr lacks {needle:?}: {:?}", run.stderr);
    assert!(!run.stderr.contains("panicked"), "{what}: xtask panicked: {:?}", run.stderr);
    assert!(run.stderr.len() < 32 * 1024, "{what}: {} bytes of stderr", run.stderr.len());
    assert!(!run.stderr.contains('\u{1b}'), "{what}: a raw escape character reached the terminal");
}

#[test]
fn a_status_linked_to_host_secrets_is_not_followed() {
    let marker = format!("host-secret-{}", nonce());
    let secret_dir = tempfile::tempdir().unwrap();
    let secret = secret_dir.path().join("secret");
    fs::write(&secret, format!("{marker}\n")).unwrap();
    let envs: [(&str, &OsStr); 1] = [("XTASK_TEST_SECRET", OsStr::new(&marker))];
    for target in ["/proc/self/environ", &secret.to_string_lossy()] {
        let run = forge(&format!("ln -sf {target} /xchg/status"), &envs);
        assert!(!run.stdout.contains(&marker), "host data in stdout via a link to {target}: {run:#?}");
        assert!(!run.stderr.contains(&marker), "host data in stderr via a link to {target}: {run:#?}");
        assert_clear_failure(&run, target, "symbolic link");
    }
}

/// (A FIFO or a device node cannot be planted: QEMU's 9p server refuses `mknod` in the
/// exchange directory. The host would refuse to read one all the same; see the unit
/// tests of `vm::read_status`.)
#[test]
fn forged_statuses_are_clear_errors() {
    for (what, script, needle) in [
        ("a huge exit code", "echo 'exit 99999999999999999999' > /xchg/status", "not a number in 0..=255"),
        ("a negative exit code", "echo 'exit -1' > /xchg/status", "not a number in 0..=255"),
        ("an exit code with junk", "echo 'exit 7junk' > /xchg/status", "not a number in 0..=255"),
        ("signal 0", "echo 'signal 0' > /xchg/status", "not a number in 1..=64"),
        ("signal 65", "echo 'signal 65' > /xchg/status", "not a number in 1..=64"),
        ("a 1 MB status", "head -c 1048576 /dev/zero | tr '\\0' 7 > /xchg/status", "longer than 4096 bytes"),
        ("a directory", "mkdir /xchg/status", "it is a directory"),
    ] {
        let run = forge(script, &[]);
        assert_clear_failure(&run, what, needle);
        assert!(run.stderr.contains("the guest"), "{what}: {:?}", run.stderr);
    }
}

#[test]
fn a_guest_error_text_is_shown_escaped() {
    let run = forge(r"printf 'error \033]0;owned\007\033[2J\n' > /xchg/status", &[]);
    assert_clear_failure(&run, "an error with escape sequences", r"the guest helper failed: \u{1b}]0;owned\u{7}");
}

/// `run-vm --script`'s path (made once per test process).
fn script_path() -> PathBuf {
    static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let run = xtask(&["run-vm", "--script"]);
        run.expect_code(0);
        PathBuf::from(run.stdout.trim_end())
    })
    .clone()
}

/// The script's status function, with a driver printing what it found in file `$1`.
fn status_driver(dir: &Path) -> PathBuf {
    let text = fs::read_to_string(script_path()).unwrap();
    let start = text.find("vm_status() {").expect("the script has no vm_status function");
    let end = start + text[start..].find("\n}\n").expect("vm_status does not end") + 3;
    let driver = dir.join("driver.sh");
    let body = &text[start..end];
    fs::write(
        &driver,
        format!("{body}vm_status \"$1\"\nprintf '%s %s [%s]\\n' \"$st_kind\" \"$st_code\" \"$st_text\"\n"),
    )
    .unwrap();
    driver
}

/// The shells the script must work in: (name, program and arguments before the script).
fn shells() -> Vec<(&'static str, Vec<PathBuf>)> {
    let mut found = Vec::new();
    for name in ["bash", "dash"] {
        let path = ["/bin", "/usr/bin"].iter().map(|d| Path::new(d).join(name)).find(|p| p.is_file());
        let path = path.unwrap_or_else(|| panic!("`{name}` is missing: install Debian's `{name}` package"));
        found.push((name, vec![path]));
    }
    // Debian's busybox-static, which the store has fetched for the minimal system.
    let _ = script_path();
    let busybox = fs::read_dir(vm_tests::items_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("-busybox-static-"))
        .map(|e| e.path().join("bin/busybox"))
        // This host's: an aarch64 guest's busybox does not run here.
        .find(|p| p.is_file() && vm_tests::is_x86_64_elf(p))
        .expect("no busybox-static item with bin/busybox in the store (run-vm --script should have fetched it)");
    found.push(("busybox sh", vec![busybox, PathBuf::from("sh")]));
    found
}

#[test]
fn the_scripts_status_check_holds_in_bash_dash_and_busybox() {
    let dir = tempfile::tempdir().unwrap();
    let driver = status_driver(dir.path());
    let status = dir.path().join("status");
    let decoy = dir.path().join("decoy");
    fs::write(&decoy, "exit 0\n").unwrap();
    let mut big = b"exit 0\n".to_vec();
    big.resize(1 << 20, b'7');
    // What each forged status must give: (content, kind, exit status).
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        ("exit 0", b"exit 0\n".to_vec(), "exit", "0"),
        ("exit 7", b"exit 7\n".to_vec(), "exit", "7"),
        ("exit 255", b"exit 255\n".to_vec(), "exit", "255"),
        ("signal 9", b"signal 9\n".to_vec(), "signal", "137"),
        ("signal 64", b"signal 64\n".to_vec(), "signal", "192"),
        ("error", b"error it broke\n".to_vec(), "error", "1"),
        ("exit 256", b"exit 256\n".to_vec(), "invalid", "1"),
        ("exit 1e30", b"exit 99999999999999999999\n".to_vec(), "invalid", "1"),
        ("exit -1", b"exit -1\n".to_vec(), "invalid", "1"),
        ("exit 7junk", b"exit 7junk\n".to_vec(), "invalid", "1"),
        ("exit 010", b"exit 010\n".to_vec(), "invalid", "1"),
        ("exit 1+1", b"exit 1+1\n".to_vec(), "invalid", "1"),
        ("no newline", b"exit 0".to_vec(), "invalid", "1"),
        ("two lines", b"exit 0\nexit 1\n".to_vec(), "invalid", "1"),
        ("NUL", b"exit 0\0\n".to_vec(), "invalid", "1"),
        ("signal 0", b"signal 0\n".to_vec(), "invalid", "1"),
        ("signal 65", b"signal 65\n".to_vec(), "invalid", "1"),
        ("signal 010", b"signal 010\n".to_vec(), "invalid", "1"),
        ("signal evaluated", b"signal qemu_status[$(printf PW >&2; printf NED >&2)]\n".to_vec(), "invalid", "1"),
        ("signal variable", b"signal HOME\n".to_vec(), "invalid", "1"),
        ("1 MB", big, "invalid", "1"),
        ("empty", Vec::new(), "invalid", "1"),
    ];
    for (shell, prefix) in shells() {
        let run = |what: &str| {
            let out = Command::new("timeout")
                .arg("20")
                .args(&prefix)
                .arg(&driver)
                .arg(&status)
                .stdin(Stdio::null())
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(out.status.success(), "{shell}, {what}: the driver failed ({}): {stderr}", out.status);
            assert!(!stderr.contains("PWNED"), "{shell}, {what}: guest text was evaluated: {stderr}");
            stdout
        };
        for (what, content, kind, code) in &cases {
            let _ = fs::remove_file(&status);
            fs::write(&status, content).unwrap();
            let got = run(what);
            assert!(got.starts_with(&format!("{kind} {code} [")), "{shell}, {what}: got {got:?}");
        }
        let _ = fs::remove_file(&status);
        assert!(run("missing").starts_with("missing 1 "), "{shell}: a missing status");
        std::os::unix::fs::symlink(&decoy, &status).unwrap();
        let got = run("a symbolic link");
        assert!(got.starts_with("invalid 1 [it is a symbolic link"), "{shell}, a symbolic link: got {got:?}");
        fs::remove_file(&status).unwrap();
        fs::create_dir(&status).unwrap();
        let got = run("a directory");
        assert!(got.starts_with("invalid 1 [it is not a regular file"), "{shell}, a directory: got {got:?}");
        fs::remove_dir(&status).unwrap();
        nix_mkfifo(&status);
        let got = run("a FIFO");
        assert!(got.starts_with("invalid 1 [it is not a regular file"), "{shell}, a FIFO: got {got:?}");
        fs::remove_file(&status).unwrap();
    }
}

fn nix_mkfifo(path: &Path) {
    let status = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(status.success());
}

/// Runs the real `run-vm.sh` with `shell` (the `#!` line's `/bin/sh` when `None`).
fn run_script(shell: Option<&str>, args: &[&str], envs: &[(&str, &OsStr)]) -> Run {
    let script = script_path();
    // The script has no timeout of its own.
    let mut cmd = Command::new("timeout");
    cmd.arg(TIMEOUT).args(shell).arg(&script);
    cmd.arg("--").args(args).stdin(Stdio::null());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    vm_tests::Run::from(out)
}

#[test]
fn the_script_never_evaluates_a_forged_status() {
    let forge = r#"printf 'signal qemu_status[$(printf PW >&2; printf NED >&2)]\n' > /xchg/status"#;
    let evaluated = format!("{forge}; {REBOOT_NOW}");
    let run = run_script(Some("bash"), &["sh", "-c", &evaluated], &[]);
    assert!(!run.stderr.contains("PWNED"), "the host shell ran guest text: {run:#?}");
    assert_eq!(run.code, 1, "{run:#?}");
    assert!(run.stderr.contains("invalid status: the signal is not a number in 1..=64"), "{run:#?}");
    // `exit 256` in dash is `exit 0`: a forged success.
    let run = run_script(None, &["sh", "-c", &format!("echo 'exit 256' > /xchg/status; {REBOOT_NOW}")], &[]);
    assert_eq!(run.code, 1, "{run:#?}");
    assert!(run.stderr.contains("the exit code is not a number in 0..=255"), "{run:#?}");
}

#[test]
fn the_script_reads_nothing_the_guest_can_replace() {
    let marker = format!("host-secret-{}", nonce());
    let envs: [(&str, &OsStr); 1] = [("XTASK_TEST_SECRET", OsStr::new(&marker))];
    for (what, plant) in [
        ("stdout", "rm -f /xchg/stdout; ln -s /proc/self/environ /xchg/stdout; echo out".to_string()),
        ("stderr", "rm -f /xchg/stderr; ln -s /proc/self/environ /xchg/stderr; echo out".to_string()),
        ("the status", format!("ln -sf /proc/self/environ /xchg/status; {REBOOT_NOW}")),
        (
            "the console log",
            format!("rm -f /xchg/console.log; ln -s /proc/self/environ /xchg/console.log; {REBOOT_NOW}"),
        ),
        ("QEMU's log", format!("rm -f /xchg/qemu.log; ln -s /proc/self/environ /xchg/qemu.log; {REBOOT_NOW}")),
    ] {
        let run = run_script(None, &["sh", "-c", &plant], &envs);
        assert!(!run.stdout.contains(&marker), "{what}: host data in stdout: {run:#?}");
        assert!(!run.stderr.contains(&marker), "{what}: host data in stderr: {run:#?}");
        if plant.ends_with("echo out") {
            run.expect_code(0);
            assert_eq!(run.stdout, "out\n", "{what}");
        } else {
            assert_eq!(run.code, 1, "{what}: {run:#?}");
        }
    }
}

#[test]
fn the_script_works_from_a_temporary_directory_with_commas_and_spaces() {
    let base = tempfile::tempdir().unwrap();
    let tmp = base.path().join("a,b c,,d");
    fs::create_dir(&tmp).unwrap();
    let run = run_script(None, &["sh", "-c", "echo hi; exit 3"], &[("TMPDIR", tmp.as_os_str())]);
    assert_eq!((run.code, run.stdout.as_str()), (3, "hi\n"), "{run:#?}");
    assert_eq!(fs::read_dir(&tmp).unwrap().count(), 0, "the per-run directory was left behind");
    // A relative TMPDIR, even one that looks like an option, is taken from the current
    // directory: QEMU is given absolute paths.
    fs::create_dir(base.path().join("-a,b")).unwrap();
    let script = script_path();
    let out = Command::new(&script)
        .args(["--", "sh", "-c", "echo rel"])
        .env("TMPDIR", "-a,b")
        .current_dir(base.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!((out.status.code(), &*String::from_utf8_lossy(&out.stdout)), (Some(0), "rel\n"), "{stderr}");
    assert_eq!(fs::read_dir(base.path().join("-a,b")).unwrap().count(), 0, "the per-run directory was left behind");
}

#[test]
fn a_relative_store_gives_a_script_with_absolute_paths() {
    let store = vm_tests::store_dir();
    let parent = store.parent().unwrap();
    let name = store.file_name().unwrap();
    let out = Command::new(xtask_bin())
        .args(["run-vm", "--script"])
        .current_dir(parent)
        .env("XTASK_VMSTORE", name)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let script = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim_end());
    assert!(script.is_absolute(), "{}", script.display());
    let text = fs::read_to_string(&script).unwrap();
    for option in ["-kernel ", "-initrd "] {
        let path = text.split(option).nth(1).unwrap_or_else(|| panic!("no {option}in the script"));
        assert!(path.starts_with('/'), "{option}is not absolute: {}", &path[..path.len().min(80)]);
    }
    let items = store.join("items");
    assert!(text.contains(&format!("path={},readonly=on", items.display())), "the store share is not absolute");
    // And it runs from anywhere.
    let run = Command::new(&script).args(["--", "true"]).current_dir("/").stdin(Stdio::null()).output().unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert_eq!(fs::metadata(&script).unwrap().permissions().mode() & 0o111, 0o111);
}

#[test]
fn run_vm_still_reports_ordinary_statuses() {
    // The strict reading leaves honest statuses alone.
    let run = xtask_env(&["run-vm", "--timeout", TIMEOUT, "--", "sh", "-c", "exit 255"], &[]);
    run.expect_code(255);
}

/// What a hostile guest does to the host directory shared with it: setuid, setgid and
/// sticky bits and open modes on files, directories and the share's root, new owners on
/// all of them, and a symbolic link. `$1` is a directory inside the share (the share
/// itself or `$out`), `$2` the share's root. Then it says `ready-MARKER` and waits (at
/// most 240 s) for the host's `seen-MARKER`, so that a watcher on the host looks while
/// the guest's files are there.
const CHMOD_EVERYTHING: &str = r#"set -e
d=$1 x=$2 m=$3
cp /bin/sh "$d/suid"; chmod 4755 "$d/suid"
cp /bin/sh "$d/sgid"; chmod 2755 "$d/sgid"
echo data > "$d/open"; chmod 0777 "$d/open"
echo data > "$d/plain"; chmod 0644 "$d/plain"
mkdir "$d/sgid-dir" "$d/sticky-dir" "$d/open-dir"
chmod 2755 "$d/sgid-dir"; chmod 1777 "$d/sticky-dir"; chmod 0777 "$d/open-dir"
cp /bin/sh "$d/open-dir/suid"; chmod 4777 "$d/open-dir/suid"
ln -s suid "$d/link"
chown -R 1000:1000 "$d"; chown 4242:4242 "$d/suid" "$d/sgid-dir"
chmod 1777 "$x"; chown 1000:1000 "$x"; chmod 0777 "$x"
ls -ln "$d" >&2
touch "$x/ready-$m"
i=0
while [ ! -e "$x/seen-$m" ]; do
    i=$((i + 1)); if [ $i -gt 240 ]; then echo "the host never looked" >&2; exit 3; fi
    sleep 1
done
"#;

/// What a watcher of host directories found over a run.
#[derive(Debug, Default)]
struct Watched {
    polls: usize,
    /// Entries with setuid, setgid or sticky bits, group or other access, or an owner
    /// other than the user running the tests; and what uid 65534 could enter or run.
    violations: std::collections::BTreeSet<String>,
    /// The names of the entries seen, below the directory holding `ready-MARKER`.
    seen: std::collections::BTreeSet<String>,
}

/// Polls `top` (a store's `.tmp`, or a `TMPDIR`) while a VM runs: `top` itself must give
/// neither group nor other any access, and nothing under `scratch` (the entries of `top`
/// it selects) may have setuid, setgid or sticky bits, group or other access, or an
/// owner or group other than ours; uid 65534 must neither read, enter nor execute
/// `top` or anything under it. When the guest's `ready-MARKER` appears, the watcher
/// records what it sees beside it and answers with `seen-MARKER`.
fn watch(
    top: PathBuf,
    scratch: fn(&str) -> bool,
    marker: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Watched> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    std::thread::spawn(move || {
        let me = fs::metadata("/proc/self").unwrap();
        let (uid, gid) = (me.uid(), me.gid());
        let mut watched = Watched::default();
        let ready = format!("ready-{marker}");
        loop {
            let ending = stop.load(std::sync::atomic::Ordering::SeqCst);
            watched.polls += 1;
            let mut all = vec![top.clone()];
            if let Ok(m) = fs::symlink_metadata(&top) {
                if m.mode() & 0o077 != 0 {
                    watched.violations.insert(format!("{} has mode {:o}", top.display(), m.mode() & 0o7777));
                }
            }
            let mut todo: Vec<(PathBuf, bool)> = fs::read_dir(&top)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| (e.path(), scratch(&e.file_name().to_string_lossy())))
                .collect();
            let mut ready_dir = None;
            while let Some((path, checked)) = todo.pop() {
                let Ok(m) = fs::symlink_metadata(&path) else { continue };
                all.push(path.clone());
                if path.file_name().is_some_and(|n| n.to_string_lossy() == ready) {
                    ready_dir = path.parent().map(Path::to_path_buf);
                }
                if checked {
                    let mode = m.mode() & 0o7777;
                    if !m.file_type().is_symlink() && mode & 0o7077 != 0 {
                        watched.violations.insert(format!("{} has mode {mode:o}", path.display()));
                    }
                    if (m.uid(), m.gid()) != (uid, gid) {
                        watched.violations.insert(format!("{} is owned by {}:{}", path.display(), m.uid(), m.gid()));
                    }
                }
                if m.is_dir() {
                    todo.extend(fs::read_dir(&path).into_iter().flatten().flatten().map(|e| (e.path(), checked)));
                }
            }
            // What another user can reach: one process per poll tries everything seen.
            let out = Command::new("setpriv")
                .args(["--reuid", "65534", "--regid", "65534", "--clear-groups", "sh", "-c"])
                .arg(r#"for p do if [ -r "$p" ] || [ -x "$p" ]; then printf '%s\n' "$p"; fi; done"#)
                .arg("sh")
                .args(&all)
                .output()
                .expect("running setpriv");
            assert!(out.status.success(), "setpriv failed: {}", String::from_utf8_lossy(&out.stderr));
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                watched.violations.insert(format!("uid 65534 can read, enter or execute {line}"));
            }
            if let Some(dir) = ready_dir {
                let seen_file = dir.join(format!("seen-{marker}"));
                if watched.seen.is_empty() {
                    for path in all.iter().filter(|p| p.starts_with(&dir)) {
                        watched.seen.insert(path.strip_prefix(&dir).unwrap().to_string_lossy().into_owned());
                    }
                    let _ = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&seen_file);
                }
            }
            if ending {
                return watched;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    })
}

/// Runs `run` with a watcher on `top` and checks what it saw: no guest-chosen mode or
/// owner anywhere in the scratch, nothing another user reaches, and the guest's files
/// really seen (in `inside`, a directory below the one with the marker, or that one).
fn watched(top: PathBuf, scratch: fn(&str) -> bool, inside: &str, run: impl FnOnce(&str) -> Run) -> Run {
    let marker = nonce();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = watch(top, scratch, marker.clone(), stop.clone());
    let result = run(&marker);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let watched = watcher.join().unwrap();
    let prefix = if inside.is_empty() { String::new() } else { format!("{inside}/") };
    for name in ["suid", "sgid", "open", "sgid-dir", "sticky-dir", "open-dir/suid", "link"] {
        assert!(
            watched.seen.contains(&format!("{prefix}{name}")),
            "the watcher never saw the guest's `{name}` ({} polls, saw {:?}); {result:#?}",
            watched.polls,
            watched.seen
        );
    }
    assert!(watched.violations.is_empty(), "guest-chosen modes or owners on the host: {:#?}", watched.violations);
    result
}

/// Scratch a guest may write into: an exchange directory's (other scratch holds what the
/// host made: other tests' workspace views, shared read-only with the user's own modes,
/// doctest binaries, runtime FIFOs).
fn store_scratch(name: &str) -> bool {
    name.starts_with("scratch-") && name.contains("-xchg.")
}

/// The store's `.tmp`, once xtask has opened the store (which makes it private).
fn store_tmp() -> PathBuf {
    let _ = script_path();
    vm_tests::store_dir().join(".tmp")
}

#[test]
fn guest_modes_and_owners_never_reach_the_host_in_run_vm() {
    let run = watched(store_tmp(), store_scratch, "", |marker| {
        xtask_within(
            400,
            &["run-vm", "--timeout", TIMEOUT, "--", "sh", "-c", CHMOD_EVERYTHING, "sh", "/xchg", "/xchg", marker],
            &[],
        )
    });
    run.expect_code(0);
}

#[test]
fn guest_modes_and_owners_never_reach_the_host_in_build_in_vm_nor_the_store() {
    let tmp = store_tmp();
    let name = format!("modes-{}", nonce());
    let run = watched(tmp, store_scratch, "out", |marker| {
        let script = format!("{CHMOD_EVERYTHING}\nrm \"$x/ready-$m\" \"$x/seen-$m\"");
        xtask_within(
            400,
            &[
                "build-in-vm",
                "--name",
                &name,
                "--timeout",
                TIMEOUT,
                "--",
                "sh",
                "-c",
                &script,
                "sh",
                "/xchg/out",
                "/xchg",
                marker,
            ],
            &[],
        )
    });
    run.expect_code(0);
    let item = PathBuf::from(run.stdout.trim_end());
    // The executable bit is the guest's; nothing else of its modes is kept.
    for (file, mode) in [("suid", 0o555), ("sgid", 0o555), ("open", 0o555), ("plain", 0o444), ("open-dir/suid", 0o555)]
    {
        let got = fs::symlink_metadata(item.join(file)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(got, mode, "`{file}` in the item has mode {got:o}");
    }
    for dir in ["", "sgid-dir", "sticky-dir", "open-dir"] {
        let got = fs::symlink_metadata(item.join(dir)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(got, 0o555, "`{dir}` in the item has mode {got:o}");
    }
    assert_eq!(fs::read_link(item.join("link")).unwrap(), Path::new("suid"), "the guest's link was not kept");
    assert_eq!(fs::read_to_string(item.join("plain")).unwrap(), "data\n");
}

#[test]
fn guest_modes_and_owners_never_reach_the_host_in_run_vm_sh() {
    // The user's own TMPDIR, private to them.
    let tmpdir = tempfile::Builder::new().permissions(fs::Permissions::from_mode(0o700)).tempdir().unwrap();
    let top = tmpdir.path().to_path_buf();
    let run = watched(
        top.clone(),
        |_| true,
        "",
        |marker| {
            let mut cmd = Command::new(script_path());
            cmd.args(["--", "sh", "-c", CHMOD_EVERYTHING, "sh", "/xchg", "/xchg", marker]).env("TMPDIR", &top);
            vm_tests::output_within(cmd, 400)
        },
    );
    run.expect_code(0);
}

/// The sha256 of `text`, in hex, by the host's `sha256sum`.
fn sha256_hex(text: &str) -> String {
    let out = Command::new("sh").args(["-c", "printf %s \"$1\" | sha256sum", "sh", text]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().to_string()
}

/// The files under `dirs` holding `needle` (`grep -r`, which follows no link).
fn files_holding(needle: &str, dirs: &[PathBuf]) -> String {
    let dirs: Vec<&PathBuf> = dirs.iter().filter(|d| d.exists()).collect();
    let out = Command::new("grep").args(["-rlF", "--", needle]).args(&dirs).output().unwrap();
    assert!(out.status.code() == Some(0) || out.status.code() == Some(1), "grep failed: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn env_values_are_stored_nowhere_in_clear() {
    let secret = format!("sentinel-secret-{}", nonce());
    let other = format!("{secret}-other");
    let name = format!("secret-{}", nonce());
    // The guest proves it saw the value without writing it anywhere: its hash.
    let build = |value: &str| {
        let env = format!("SECRET={value}");
        let script = "printf %s \"$SECRET\" | sha256sum | cut -c1-64 > $out/sum";
        let run =
            xtask(&["build-in-vm", "--name", &name, "--env", &env, "--timeout", TIMEOUT, "--", "sh", "-c", script]);
        run.expect_code(0);
        PathBuf::from(run.stdout.trim_end())
    };
    let item = build(&secret);
    assert_eq!(
        fs::read_to_string(item.join("sum")).unwrap().trim(),
        sha256_hex(&secret),
        "the guest saw another value"
    );
    let store = vm_tests::store_dir();
    let logs = store.parent().unwrap().join("vmlogs");
    let found = files_holding(&secret, &[store.clone(), logs]);
    assert!(found.is_empty(), "the --env value is stored in clear in:\n{found}");
    // The recipe holds its hash: another value is another item.
    let file_name = item.file_name().unwrap().to_string_lossy().into_owned();
    let meta = fs::read_to_string(store.join("meta").join(format!("{file_name}.meta"))).unwrap();
    assert!(meta.contains(&sha256_hex(&secret)), "the record does not hold the value's hash: {meta}");
    let second = build(&other);
    assert_ne!(second, item, "another --env value gave the same item");
    assert_eq!(build(&secret), item, "the same value gave another item");
}

/// The console log of a failed run (guest text) is kept in a directory private to the
/// user, as a file of its own: even a log directory an earlier version left open to
/// everyone is made private again before anything is written there.
#[test]
fn console_logs_are_written_only_into_a_private_directory() {
    let logs = vm_tests::store_dir().parent().unwrap().join("vmlogs");
    fs::create_dir_all(&logs).unwrap();
    fs::set_permissions(&logs, fs::Permissions::from_mode(0o777)).unwrap();
    let marker = format!("console-{}", nonce());
    // No status: the run fails and keeps its console log.
    let run = forge(&format!("echo {marker} > /dev/console"), &[]);
    assert_eq!(run.code, 1, "{run:#?}");
    let mode = fs::symlink_metadata(&logs).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o700, "the log directory has mode {mode:o}");
    let kept: Vec<PathBuf> = fs::read_dir(&logs)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| fs::read_to_string(p).is_ok_and(|t| t.contains(&marker)))
        .collect();
    assert_eq!(kept.len(), 1, "the log holding the guest's text: {kept:?}; {run:#?}");
    let mode = fs::symlink_metadata(&kept[0]).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o600, "{} has mode {mode:o}", kept[0].display());
}
