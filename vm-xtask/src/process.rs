//! Every child process xtask starts goes through here. A command is described with the
//! standard library's [`Command`] builder (made by [`command`]: it dies with xtask, by
//! `PR_SET_PDEATHSIG`) and run to its end by [`run`] or [`output`], which hand it to
//! `duct`: stdin fed or closed, stdout and stderr captured, the child given the same
//! death signal. With `--verbose` each command line is shown on stderr before it runs;
//! a failure names the program, its arguments and the tail of its output. Long-lived
//! children whose pipes xtask serves itself (QEMU, a scenario's nodes, a streamed `cargo
//! test`) are spawned from [`command`] directly. What may be started at all is declared
//! in [`crate::programs`].

use std::ffi::OsStr;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context, Result};

static VERBOSE: AtomicBool = AtomicBool::new(false);

/// Shows every command line [`run`] and [`output`] start, on stderr (`--verbose`).
pub fn set_verbose(on: bool) {
    VERBOSE.store(on, Ordering::Relaxed);
}

fn verbose() -> bool {
    VERBOSE.load(Ordering::Relaxed)
}

/// A command for `program` that dies with xtask (`PR_SET_PDEATHSIG`), so a killed xtask
/// leaves no download, unpack, image write or VM running into a directory the next run
/// removes.
pub fn command(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    // SAFETY: prctl is async-signal-safe.
    unsafe { cmd.pre_exec(die_with_parent) };
    cmd
}

fn die_with_parent() -> std::io::Result<()> {
    if unsafe { nix::libc::prctl(nix::libc::PR_SET_PDEATHSIG, nix::libc::SIGKILL) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// What a command is given on stdin.
#[derive(Debug, Clone, Copy)]
pub enum Stdin<'a> {
    Null,
    Bytes(&'a [u8]),
}

/// Runs `cmd` to its end, stdin closed, its output captured; a failure (it could not
/// start, or it exited unsuccessfully) names the program, its arguments and the tail of
/// its stderr.
pub fn run(cmd: &Command) -> Result<Output> {
    run_with(cmd, Stdin::Null)
}

/// [`run`], with `stdin` on its standard input.
pub fn run_with(cmd: &Command, stdin: Stdin) -> Result<Output> {
    let out = output_with(cmd, stdin)?;
    if !out.status.success() {
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        bail!("`{}` failed ({}): {}", describe(cmd), out.status, last_lines(&text));
    }
    Ok(out)
}

/// Runs `cmd` to its end, stdin closed, its output captured, whatever its exit status
/// (the caller reads it); only failing to start it is an error, naming it.
pub fn output(cmd: &Command) -> Result<Output> {
    output_with(cmd, Stdin::Null)
}

fn output_with(cmd: &Command, stdin: Stdin) -> Result<Output> {
    let shown = describe(cmd);
    if verbose() {
        eprintln!("+ {shown}");
    }
    let started = std::time::Instant::now();
    let out = expression(cmd, stdin)
        .stdout_capture()
        .stderr_capture()
        .unchecked()
        .run()
        .with_context(|| format!("starting `{shown}`"))?;
    if verbose() {
        eprintln!("  ({:.2} s, {})", started.elapsed().as_secs_f64(), out.status);
    }
    Ok(out)
}

/// `cmd` as a duct expression: its program, arguments, environment changes and
/// directory, and the death signal.
fn expression(cmd: &Command, stdin: Stdin) -> duct::Expression {
    let mut expr = duct::cmd(cmd.get_program(), cmd.get_args()).before_spawn(|c| {
        // SAFETY: prctl is async-signal-safe.
        unsafe { c.pre_exec(die_with_parent) };
        Ok(())
    });
    for (key, value) in cmd.get_envs() {
        expr = match value {
            Some(value) => expr.env(key, value),
            None => expr.env_remove(key),
        };
    }
    if let Some(dir) = cmd.get_current_dir() {
        expr = expr.dir(dir);
    }
    match stdin {
        Stdin::Null => expr.stdin_null(),
        Stdin::Bytes(bytes) => expr.stdin_bytes(bytes.to_vec()),
    }
}

/// A command as a shell would take it: the program, then the arguments, quoted where
/// needed.
pub fn describe(cmd: &Command) -> String {
    let mut words = vec![cmd.get_program().to_string_lossy().into_owned()];
    words.extend(cmd.get_args().map(|a| shell_quote(&a.to_string_lossy())));
    words.join(" ")
}

/// The last 10 non-empty lines of a host program's output, for an error message (a
/// guest's console goes through [`crate::vm::tail_lines`], which escapes it).
pub fn last_lines(text: &str) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

/// Quotes an argument for display as a shell word.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// `(command name, parent PID, start time in clock ticks after boot)` of process `pid`,
/// from `/proc/PID/stat`; the start time tells a process from a later one with its PID.
pub fn stat(pid: i32) -> Option<(String, i32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The name is in parentheses and may hold anything, parentheses included.
    let (head, rest) = text.rsplit_once(')')?;
    let name = head.split_once('(')?.1.to_string();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state (3), ppid (4), ... starttime (22).
    Some((name, fields.get(1)?.parse().ok()?, fields.get(19)?.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_names_the_program_its_arguments_and_its_stderr() {
        let mut cmd = command("sh");
        cmd.args(["-c", "echo one; echo two >&2; exit 3", "with space"]);
        let err = run(&cmd).unwrap_err().to_string();
        assert!(err.contains("`sh -c"), "{err}");
        assert!(err.contains("'with space'"), "{err}");
        assert!(err.contains("exit status: 3"), "{err}");
        assert!(err.contains("one\ntwo"), "{err}");
    }

    #[test]
    fn stdin_environment_and_directory_reach_the_child() {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = command("sh");
        cmd.args(["-c", "cat; printf \" $X \"; pwd; [ -z \"$HOME\" ]"]).env("X", "y").env_remove("HOME");
        cmd.current_dir(dir.path());
        let out = run_with(&cmd, Stdin::Bytes(b"in")).unwrap();
        let real = std::fs::canonicalize(dir.path()).unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("in y {}\n", real.display()));
    }

    #[test]
    fn a_program_that_does_not_exist_is_named() {
        let missing = "/nonexistent/prog";
        let err = output(&command(missing)).unwrap_err();
        assert!(format!("{err:#}").contains("starting `/nonexistent/prog`"), "{err:#}");
    }
}
