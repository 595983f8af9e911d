//! `run-vm.sh` (the reference's `system-qemu-image/shared-store-script`): a shell script,
//! stored as an item, that boots a system with the host's store shared, the way
//! `cargo xtask run-vm --system NAME` does, with no cargo and no xtask: absolute paths to
//! QEMU, the kernel, the initrd and the store, and the guest's requests, are written in.
//!
//! Per run it makes a private temporary directory holding the command's output files,
//! the console log, QEMU's messages and, in `xchg/`, the exchange directory, which alone
//! is shared with the guest. It writes the request there (and, for a command, the
//! arguments NUL-separated into `argv`, which the helper reads instead of the request's
//! `argv`), boots, prints the command's output as it is written (through FIFOs) and
//! exits with the status the guest wrote, as `run-vm` does.
//!
//! The guest is not trusted: it can put anything in the exchange directory. So nothing
//! the script reads back is there except the status, which is read only if it is a
//! regular file (not a symbolic link), at most [`guest::STATUS_MAX_BYTES`] of it, and is
//! checked character by character before any number in it reaches `exit` or shell
//! arithmetic ([`STATUS_FUNCTION`]); guest text is shown with anything but printable
//! ASCII replaced.

use fs_err as fs;
use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Context, Result};
use guest::Request;

use crate::process::shell_quote;
use crate::store::{Item, Recipe, Store};
use crate::vm::qemu::{self, Console, Port, VmSpec};

/// Stands for the per-run directory in QEMU's arguments until they are quoted.
const RUN: &str = "@RUN@";
/// The file in the exchange directory holding the command's arguments.
pub const ARGV_FILE: &str = "argv";

/// Makes (or finds) the script for `system_name`. `spec` is the VM as `run-vm` boots it
/// (its exchange share, console and ports are replaced); `command` and `interactive`
/// are the requests for a run with and without a command.
pub fn script_item(
    store: &Store,
    system_name: &str,
    spec: &VmSpec,
    command: &Request,
    interactive: &Request,
) -> Result<Item> {
    // The script runs later, with another PATH: QEMU by its absolute path.
    let qemu = crate::debian::qemu::absolute_for(spec.arch)?;
    let text = script_text(system_name, &qemu, spec, command, interactive)?;
    let recipe = Recipe::new("run-vm-script", &format!("run-vm-{system_name}.sh")).param("script", text.clone());
    store.realise(&recipe, |out| {
        fs::write(out, &text).with_context(|| format!("writing `{}`", out.display()))?;
        fs::set_permissions(out, std::fs::Permissions::from_mode(0o755))?;
        Ok(())
    })
}

/// QEMU's arguments as shell words, with the per-run directory as `"$run_q"` (its path
/// with commas doubled, as QEMU's option values need).
fn qemu_words(qemu: &Path, spec: &VmSpec) -> String {
    let mut text = shell_quote(&qemu.to_string_lossy());
    let args: Vec<OsString> = qemu::args(spec);
    for arg in &args {
        let arg = arg.to_string_lossy();
        let word = if arg.contains(RUN) {
            format!("'{}'", arg.replace('\'', r"'\''")).replace(RUN, "'\"$run_q\"'")
        } else {
            shell_quote(&arg)
        };
        // One option and its value per line.
        text.push_str(if arg.starts_with('-') { " \\\n    " } else { " " });
        text.push_str(&word);
    }
    text
}

fn with_xchg(spec: &VmSpec, console: Console, ports: Vec<Port>) -> VmSpec {
    let mut spec = spec.clone();
    for share in &mut spec.shares {
        if share.tag == guest::XCHG_TAG {
            share.path = Path::new(RUN).join("xchg");
        }
    }
    spec.console = console;
    spec.ports = ports;
    spec
}

/// A shell function that reads the status the guest wrote into the file `$1`, trusting
/// nothing about it, and sets `st_kind` (`exit`, `signal`, `error`, `missing` or
/// `invalid`), `st_code` (the exit status to give: the code, 128 + the signal, or 1),
/// `st_n` (the signal), `st_text` (an error's text, or why the status is invalid) and
/// `st_quote` (the start of an invalid status). It accepts what [`guest::Status::decode`]
/// accepts. The file is read only if it is a regular file, not a symbolic link (QEMU has
/// exited: nothing changes it meanwhile); numbers are checked to be plain decimal of a few
/// digits and in range before `exit` or arithmetic sees them. `st_text` and `st_quote`
/// are guest text: show them through `tr -c ' -~' '?'`. Plain POSIX sh (bash, dash and
/// busybox sh are tested).
pub const STATUS_FUNCTION: &str = r#"vm_status() {
    st_kind=invalid st_code=1 st_n= st_text= st_quote=
    st_nl='
'
    if [ -L "$1" ]; then st_text='it is a symbolic link; it was not read'; return 0; fi
    if [ ! -e "$1" ]; then st_kind=missing st_text='no status'; return 0; fi
    if [ ! -f "$1" ]; then st_text='it is not a regular file; it was not read'; return 0; fi
    st_quote=$(head -c 64 "$1" | LC_ALL=C tr -c ' -~' '?')
    st_size=$(head -c 4097 "$1" | wc -c | tr -dc 0-9)
    if [ "$st_size" -gt 4096 ]; then st_text='it is longer than 4096 bytes'; return 0; fi
    if [ "$(head -c 4096 "$1" | tr -d '\000' | wc -c | tr -dc 0-9)" -ne "$st_size" ]; then
        st_text='it holds a NUL byte'; return 0
    fi
    st_raw=$(head -c 4096 "$1"; echo .)
    st_raw=${st_raw%.}
    case $st_raw in
        *"$st_nl") st_line=${st_raw%"$st_nl"} ;;
        *) st_text='it does not end with a newline (empty, or cut short)'; return 0 ;;
    esac
    case $st_line in *"$st_nl"*) st_text='it has more than one line'; return 0 ;; esac
    case $st_line in
        "exit "*)
            st_n=${st_line#exit }
            case $st_n in
                '' | *[!0-9]* | 0?* | ????*) st_text='the exit code is not a number in 0..=255'; return 0 ;;
            esac
            if [ "$st_n" -gt 255 ]; then st_text='the exit code is not a number in 0..=255'; return 0; fi
            st_kind=exit st_code=$st_n ;;
        "signal "*)
            st_n=${st_line#signal }
            case $st_n in
                '' | *[!0-9]* | 0* | ???*) st_text='the signal is not a number in 1..=64'; return 0 ;;
            esac
            if [ "$st_n" -gt 64 ]; then st_text='the signal is not a number in 1..=64'; return 0; fi
            st_kind=signal st_code=$((128 + st_n)) ;;
        "error "*)
            st_text=${st_line#error }
            if [ "$(printf '%s' "$st_text" | wc -c | tr -dc 0-9)" -gt 1024 ]; then
                st_text='the error text is longer than 1024 bytes'; return 0
            fi
            st_kind=error ;;
        *) st_text='it is of no known kind' ;;
    esac
    return 0
}"#;

pub fn script_text(
    system_name: &str,
    qemu: &Path,
    spec: &VmSpec,
    command: &Request,
    interactive: &Request,
) -> Result<String> {
    let run = Path::new(RUN);
    let command_spec = with_xchg(
        spec,
        Console::File(run.join("console")),
        vec![
            Port { name: "stdout".into(), path: run.join("stdout") },
            Port { name: "stderr".into(), path: run.join("stderr") },
        ],
    );
    let interactive_spec = with_xchg(spec, Console::Stdio, Vec::new());
    let mut command = command.clone();
    command.argv_file = Some(ARGV_FILE.to_string());
    command.stdout_port = Some("stdout".into());
    command.stderr_port = Some("stderr".into());
    let command_json = serde_json::to_string_pretty(&command)?;
    let interactive_json = serde_json::to_string_pretty(interactive)?;
    let request = guest::REQUEST_FILE;
    let status = guest::STATUS_FILE;
    Ok(format!(
        r#"#!/bin/sh
# run-vm.sh for system `{system_name}`: boots it with the host's store shared read-only,
# as `cargo xtask run-vm --system {system_name}` does. Generated by that command; needs
# neither cargo nor xtask, only QEMU and the store items named below.
#
#   run-vm.sh                     a shell on the serial console (`poweroff` or Ctrl-a x ends it)
#   run-vm.sh -- COMMAND [ARG...] runs COMMAND after the services are up; prints its
#                                 output and exits with its status
#
# Only "$run/xchg" is shared with the guest, which may leave anything there: the
# command's output, the console log and QEMU's messages are kept beside it, and the
# status is checked before it is used.
set -u
# Everything made here (the exchange directory, the request, output, logs) is the
# user's alone; QEMU keeps the guest's modes and owners out of the host's.
umask 077
if [ "${{1:-}}" = "--" ]; then shift; fi
{status_function}
# Shows guest text: anything but printable ASCII (and, with -n, newlines and tabs) as `?`.
vm_show() {{
    if [ "${{1:-}}" = -n ]; then LC_ALL=C tr -d '\r' | LC_ALL=C tr -c '\t\n -~' '?'
    else LC_ALL=C tr -c ' -~' '?'; fi
}}
tmp=${{TMPDIR:-/tmp}}
case $tmp in /*) ;; *) tmp=$(pwd)/$tmp ;; esac
run=$(mktemp -d "$tmp/run-vm.XXXXXX") || exit 1
trap 'rm -rf "$run"' EXIT
xchg=$run/xchg
mkdir "$xchg" || exit 1
# In QEMU's option values a comma separates options: one in the path is doubled.
run_q=$(printf '%s\n' "$run" | sed 's/,/,,/g')
if [ $# -eq 0 ]; then
    cat >"$xchg/{request}" <<'END_OF_REQUEST'
{interactive_json}
END_OF_REQUEST
    {interactive_qemu}
    qemu_status=$?
else
    cat >"$xchg/{request}" <<'END_OF_REQUEST'
{command_json}
END_OF_REQUEST
    printf '%s\0' "$@" >"$xchg/{argv}"
    # The command's output streams through FIFOs as it is written; the console's log
    # keeps its first 256 KiB and its last 1 MiB, however much the guest writes.
    mkfifo "$run/stdout" "$run/stderr" "$run/console" || exit 1
    cat "$run/stdout" &
    out_pid=$!
    cat "$run/stderr" >&2 &
    err_pid=$!
    {{ head -c 262144; tail -c 1048576; }} <"$run/console" >"$run/console.log" &
    con_pid=$!
    {command_qemu} </dev/null >"$run/qemu.log" 2>&1
    qemu_status=$?
    # A reader still waiting to open its FIFO (QEMU never opened it) gets a writer that
    # closes at once: end of file. Opening read-write never blocks.
    exec 3<>"$run/stdout" 4<>"$run/stderr" 5<>"$run/console"
    exec 3>&- 4>&- 5>&-
    wait "$out_pid" "$err_pid" "$con_pid"
fi
vm_status "$xchg/{status}"
case $st_kind in
    exit) exit "$st_code" ;;
    signal)
        echo "error: \`${{1:-/bin/sh}}\` was killed by signal $st_n in the guest" >&2
        exit "$st_code" ;;
    error) printf 'error: the guest helper failed: %s\n' "$(printf '%s' "$st_text" | vm_show)" >&2 ;;
    missing)
        if [ $# -eq 0 ]; then exit $qemu_status; fi
        echo "error: the guest stopped without reporting a status (QEMU exit status $qemu_status)" >&2 ;;
    *) printf 'error: the guest left an invalid status: %s; it begins "%s"\n' "$st_text" "$st_quote" >&2 ;;
esac
if [ -s "$run/console.log" ]; then
    echo "last console lines:" >&2
    tail -c 16384 "$run/console.log" | tail -n 25 | vm_show -n | sed 's/^/  | /' >&2
fi
if [ -s "$run/qemu.log" ]; then head -c 16384 "$run/qemu.log" | vm_show -n >&2; fi
exit 1
"#,
        status_function = STATUS_FUNCTION,
        argv = ARGV_FILE,
        interactive_qemu = qemu_words(qemu, &interactive_spec),
        command_qemu = qemu_words(qemu, &command_spec),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::qemu::{Accel, Share};

    fn spec() -> VmSpec {
        let shares = vec![
            Share { tag: "store".into(), path: "/s".into(), readonly: true },
            Share { tag: "xchg".into(), path: "/tmp/scratch".into(), readonly: false },
        ];
        let boot = ("/s/k-vmlinux/vmlinux".into(), "/s/i-initrd/initrd".into(), Vec::new());
        VmSpec { tsc_khz: None, ..VmSpec::direct(Accel::Tcg, 256, boot, shares) }
    }

    fn request() -> Request {
        let bare =
            crate::lower::system::bare_request(guest::Mode::Command, vec!["true".into()], Vec::new(), "/root", "h");
        Request { system: Some("/store/x-system-h".into()), ..bare }
    }

    #[test]
    fn script_names_absolute_paths_and_a_per_run_exchange_directory() {
        let text = script_text("h", Path::new("/usr/bin/qemu-system-x86_64"), &spec(), &request(), &request()).unwrap();
        assert!(text.starts_with("#!/bin/sh\n"));
        assert!(text.contains("/usr/bin/qemu-system-x86_64 \\\n"));
        assert!(text.contains("\\\n    -kernel /s/k-vmlinux/vmlinux \\\n"), "{text}");
        assert!(text.contains("'local,id=fs1,security_model=mapped-xattr,path='\"$run_q\"'/xchg'"), "{text}");
        assert!(text.contains("'file,id=port0,path='\"$run_q\"'/stdout'"), "{text}");
        assert!(text.contains("'file,id=console,path='\"$run_q\"'/console'"), "{text}");
        assert!(
            text.contains("{ head -c 262144; tail -c 1048576; } <\"$run/console\" >\"$run/console.log\" &"),
            "{text}"
        );
        assert!(!text.contains("/tmp/scratch") && !text.contains(RUN), "{text}");
        assert!(text.contains(STATUS_FUNCTION));
        assert!(text.contains("\"argv_file\": \"argv\""));
        assert!(text.contains("mon:stdio"));
    }
}
