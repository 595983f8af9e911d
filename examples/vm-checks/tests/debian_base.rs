//! What the `debian-base` system gives a test suite: Debian's own base userland, with
//! dash as `/bin/sh` (which runs with an empty `argv[0]`, where busybox's `sh` exits
//! 127) and the commands a root shell on a Debian machine has, Debian's builds of them.

use std::os::unix::process::CommandExt;
use std::process::Command;

/// How to run these tests.
const HOW: &str =
    "run them in the VM: cargo xtask test --system debian-base -p vm-checks --test debian_base -- --ignored";

/// Panics, saying how to run the tests, unless this runs in a VM of `debian-base`.
fn require_debian_base_vm() {
    let name = vm_checks::hostname();
    assert_eq!(name, "debian-base", "this runs on `{name}`, not in the `debian-base` VM; {HOW}");
}

/// `program args...`: its exit status and its output (stdout and stderr).
fn run(program: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("running {program}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
#[ignore = "needs the debian-base VM"]
fn bin_sh_is_debians_dash() {
    require_debian_base_vm();
    // What the kernel runs for /bin/sh: dash's binary, from Debian's package.
    let (ok, exe) = run("/bin/sh", &["-c", "readlink /proc/$$/exe"]);
    let exe = exe.trim_end();
    assert!(
        ok && exe.starts_with("/store/") && exe.contains("-dash-") && exe.ends_with("/bin/dash"),
        "/bin/sh runs {exe}"
    );
    let release = std::fs::read_to_string("/etc/os-release").unwrap();
    assert!(release.contains("ID=debian"), "{release}");
}

/// Test suites exec `/bin/sh` with an empty `argv[0]` (nix's `execve` tests do): dash
/// runs, busybox's `sh` cannot tell which applet it is and exits 127. No `debian-base`
/// check, so that on `minimal` it fails for that reason.
#[test]
#[ignore = "needs the debian-base VM"]
fn sh_runs_with_an_empty_argv0() {
    let out = Command::new("/bin/sh").arg0("").args(["-c", "echo ran"]).output().unwrap();
    assert!(
        out.status.success() && out.stdout == b"ran\n",
        "/bin/sh with an empty argv[0]: {}, stdout {:?}, stderr {:?}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
#[ignore = "needs the debian-base VM"]
fn the_base_commands_are_debians() {
    require_debian_base_vm();
    let expected: &[(&str, &[&str], &str)] = &[
        ("env", &["--version"], "GNU coreutils"),
        ("bash", &["--version"], "GNU bash"),
        ("find", &["--version"], "GNU findutils"),
        ("grep", &["--version"], "GNU grep"),
        ("sed", &["--version"], "GNU sed"),
        ("awk", &["-W", "version"], "mawk"),
        ("diff", &["--version"], "GNU diffutils"),
        ("tar", &["--version"], "GNU tar"),
        ("gzip", &["--version"], "gzip"),
        ("mount", &["--version"], "util-linux"),
        ("unshare", &["--version"], "util-linux"),
        ("ps", &["--version"], "procps-ng"),
        ("ip", &["-V"], "iproute2"),
        ("make", &["--version"], "GNU Make"),
        ("tput", &["-T", "xterm", "cols"], "80"),
        ("which", &["sh"], "/usr/bin/sh"),
        ("getent", &["passwd", "nobody"], "nobody:x:65534:65534"),
        ("hostname", &[], "debian-base"),
    ];
    let mut wrong = Vec::new();
    for (program, args, says) in expected {
        let (ok, text) = run(program, args);
        if !ok || !text.contains(says) {
            wrong.push(format!("`{program} {}` (success: {ok}) does not say {says:?}: {text}", args.join(" ")));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
