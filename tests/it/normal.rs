//! A command in the VM starts as on a freshly installed Debian machine: a clean process
//! state (no signal blocked or ignored, a session and process group of its own,
//! descriptors 0-2 only) whichever way it is run.

use crate::nonce;
use vm_tests::{xtask, TIMEOUT};

/// Prints a command's process state: the signal masks its child inherits (grep's), whether
/// it leads its own session and process group, and a child's open descriptors (`ls`'s,
/// 3 being the directory it reads).
pub const PROCESS_STATE: &str = "grep -E '^Sig(Blk|Ign):' /proc/self/status
read -r pid comm state ppid pgrp sid rest </proc/self/stat
if [ \"$pid\" = \"$pgrp\" ] && [ \"$pid\" = \"$sid\" ]; then echo 'leads its session and group'; \
else echo \"pid $pid, group $pgrp, session $sid\"; fi
echo descriptors $(ls /proc/self/fd)";

/// What [`PROCESS_STATE`] prints on a host, for a command started from a shell.
pub const CLEAN: &str = "SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n\
leads its session and group\ndescriptors 0 1 2 3\n";

#[test]
fn run_vm_commands_start_clean_warm_and_cold() {
    for (system, warmth) in [("minimal", "--warm"), ("minimal", "--cold"), ("hello", "--warm")] {
        let run = xtask(&["run-vm", "--system", system, warmth, "--timeout", TIMEOUT, "--", "sh", "-c", PROCESS_STATE]);
        run.expect_code(0);
        assert_eq!(run.stdout, CLEAN, "{system} {warmth}: {run:#?}");
    }
    // A service too (setsid was there before): nothing blocked.
    let service = "p=$(pidof hello-service); grep '^SigBlk:' /proc/$p/status
read -r pid comm state ppid pgrp sid rest </proc/$p/stat; [ \"$pid\" = \"$sid\" ] && echo 'leads its session'";
    let run = xtask(&["run-vm", "--system", "hello", "--timeout", TIMEOUT, "--", "sh", "-c", service]);
    run.expect_code(0);
    assert_eq!(run.stdout, "SigBlk:\t0000000000000000\nleads its session\n", "{run:#?}");
}

/// A build step, on a VM without a system item.
#[test]
fn a_build_step_starts_clean() {
    let env = format!("NONCE={}", nonce());
    let args = ["build-in-vm", "--timeout", TIMEOUT, "--name", "process-state", "--env", &env, "--"];
    let run = xtask(&[&args[..], &["sh", "-c", PROCESS_STATE]].concat());
    run.expect_code(0);
    assert!(run.stderr.contains(CLEAN), "the build step's output (on stderr): {run:#?}");
}
