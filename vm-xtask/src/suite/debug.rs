//! `cargo xtask test --debug NAME`: the one test named exactly NAME, found among the test
//! binaries before anything boots (listed on the host with libtest's `--list`), run
//! alone (`--exact NAME`) under Debian's `gdbserver` in the guest, its port forwarded to
//! the host's loopback, and the gdb command line to attach with said on stderr.

use anyhow::{Context, Result};

use super::TestBinary;
use crate::error::usage_error;

/// The port gdbserver listens on in the guest (forwarded from the host's).
pub const GUEST_PORT: u16 = 2345;

/// The guest's shell script `sh -c SCRIPT gdbserver gdbserver ARGS...` runs gdbserver
/// under: gdbserver's own status is 0 whatever its child did, so the child's status is
/// read from what gdbserver says on stderr (copied there as it comes) and is the
/// script's, as the test's own would be (a signal as 128 + its number).
const STATUS_OF_CHILD: &str = r#"log=/tmp/gdbserver-$$.log
{ { "$@" 2>&1 >&3 3>&-; } | tee "$log" >&2; } 3>&1
s=$(sed -n 's/^Child exited with status \([0-9]*\)$/\1/p' "$log" | tail -n 1)
[ -n "$s" ] && exit "$s"
s=$(sed -n 's/^Child terminated with signal = \(0x[0-9a-fA-F]*\).*/\1/p' "$log" | tail -n 1)
[ -n "$s" ] && exit $((128 + s))
echo "gdbserver ended without saying how the test ended" >&2
exit 1"#;

/// A test run under gdbserver, reached from the host at 127.0.0.1:`host_port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Debug {
    pub host_port: u16,
}

/// The one binary of `binaries` with a test named exactly `name`, made to run that test
/// alone (`--exact NAME`, after `test_args`) under gdbserver. None, or several, is a
/// usage error naming what there is.
pub fn choose(binaries: Vec<TestBinary>, name: &str, test_args: &[String]) -> Result<TestBinary> {
    let mut found = Vec::new();
    for binary in binaries {
        if lists(&binary, name)? {
            found.push(binary);
        }
    }
    match found.len() {
        0 => Err(usage_error(format!(
            "--debug {name}: no test binary built has a test of that exact name \
             (`cargo xtask test -- --list` lists them)"
        ))),
        1 => {
            let mut binary = found.remove(0);
            let mut args = test_args.to_vec();
            args.extend(["--exact".to_string(), name.to_string()]);
            binary.args = Some(args);
            binary.under = ["sh", "-c", STATUS_OF_CHILD, "gdbserver", "gdbserver", "--once"]
                .iter()
                .map(|w| w.to_string())
                .chain([format!(":{GUEST_PORT}")])
                .collect();
            Ok(binary)
        }
        _ => {
            let reruns: Vec<String> = found.iter().map(|b| format!("`{}`", b.rerun)).collect();
            Err(usage_error(format!(
                "--debug {name}: several test binaries have a test of that name; choose one with its \
                 cargo arguments: {}",
                reruns.join(", ")
            )))
        }
    }
}

/// Whether `binary` has a test named exactly `name`: libtest's `--list` on the host (it
/// runs no test), in the package's directory with cargo's variables.
fn lists(binary: &TestBinary, name: &str) -> Result<bool> {
    let mut cmd = crate::process::command(&binary.path);
    cmd.args(["--list", "--format", "terse", "--exact", name])
        .current_dir(&binary.package_dir)
        .envs(binary.env.iter().map(|(k, v)| (k, v)));
    let out = crate::process::output(&cmd).with_context(|| format!("listing the tests of {}", binary.label))?;
    let listed =
        String::from_utf8_lossy(&out.stdout).lines().any(|l| l.split_once(": ").is_some_and(|(n, _)| n == name));
    Ok(listed)
}

/// Says on stderr how to attach gdb (`gdb`) to the test waiting under gdbserver.
pub fn say_how_to_attach(gdb: &str, binary: &TestBinary, name: &str, debug: Debug) {
    let path = crate::process::shell_quote(&binary.path.display().to_string());
    eprintln!(
        "the test `{name}` of {} runs under gdbserver in the guest; once it says `Listening on port \
         {GUEST_PORT}`, attach with:\n    {gdb} {path} -ex 'target remote 127.0.0.1:{}'",
        binary.label, debug.host_port
    );
}

/// A TCP port on 127.0.0.1 free now, for gdbserver's forward.
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).context("finding a free port on 127.0.0.1")?;
    Ok(listener.local_addr()?.port())
}
