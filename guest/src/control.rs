//! The control channel (request mode [`Mode::Serve`](crate::Mode::Serve)): a virtio
//! serial port named [`CONTROL_PORT`] on which the helper, once the system's services are
//! up, says [`FromGuest::Ready`] and then runs the commands the host sends, one at a
//! time, answering each with its status and its stdout and stderr kept apart. Each
//! message is one line of JSON; output travels base64-encoded, so any bytes pass.
//!
//! Public for the engine only (`cargo xtask test`'s kept VM and a scenario's nodes speak
//! it), like the rest of this crate.

use serde::{Deserialize, Serialize};

/// The virtio serial port of the control channel.
pub const CONTROL_PORT: &str = "control";

/// What the host asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ToGuest {
    /// Run `argv` (with the request's environment, stdin from `/dev/null`); kill it
    /// after `timeout_ms`.
    Run {
        /// The program (looked up in the request's `PATH`) and its arguments.
        argv: Vec<String>,
        /// How long it may run, in milliseconds.
        timeout_ms: u64,
    },
    /// Run `argv` as [`ToGuest::Run`] does, in the directory `cwd`, with `env` added to
    /// the request's environment: a program started with no shell in between.
    RunIn {
        /// The program (looked up in `PATH`, from `env` if it sets one) and its arguments.
        argv: Vec<String>,
        /// How long it may run, in milliseconds.
        timeout_ms: u64,
        /// Its working directory.
        cwd: String,
        /// Variables added to (or replacing those of) the request's environment.
        env: Vec<(String, String)>,
    },
    /// Stop everything and power off (the status file says `exit 0`).
    PowerOff,
    /// Stop at a failure point, as a failed test run does ([`crate::Request::save_failure`]):
    /// every process ended, the shares unmounted, waiting on the snapshot port while the
    /// host saves the VM; then the request is read again, the shares mounted again, the
    /// services started anew, and [`FromGuest::Ready`] is the answer (to the host that
    /// asked, or to a replay's, whose request this then is).
    SaveFailure,
}

/// What the guest answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FromGuest {
    /// The system is up: its services started and ready.
    Ready,
    /// A command ended: its exit code, or the signal that killed it, and its output.
    Done {
        /// Its exit code, when it exited.
        exit: Option<i32>,
        /// The signal that killed it, when one did.
        signal: Option<i32>,
        /// Whether it was killed for running past its `timeout_ms`.
        timed_out: bool,
        /// What it wrote on stdout, base64-encoded ([`base64_encode`]).
        stdout: String,
        /// What it wrote on stderr, base64-encoded.
        stderr: String,
    },
    /// The command could not be run at all.
    Failed {
        /// Why, in one line.
        error: String,
    },
}

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64, with padding.
pub fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | (*b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes [`base64_encode`]'s output; `None` for anything else.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let text = text.as_bytes();
    if !text.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    for chunk in text.chunks(4) {
        let mut n = 0u32;
        let mut pad = 0;
        for (i, &c) in chunk.iter().enumerate() {
            let v = match c {
                b'=' if i >= 2 => {
                    pad += 1;
                    0
                }
                _ if pad > 0 => return None,
                _ => ALPHABET.iter().position(|&a| a == c)? as u32,
            };
            n |= v << (18 - 6 * i);
        }
        out.extend_from_slice(&n.to_be_bytes()[1..4 - pad]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for len in 0..70 {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let text = base64_encode(&bytes);
            assert_eq!(base64_decode(&text), Some(bytes), "{text}");
        }
        assert_eq!(base64_encode(b"hi\n"), "aGkK");
        assert_eq!(base64_encode(b"a"), "YQ==");
        assert_eq!(base64_decode("Y=Q="), None);
        assert_eq!(base64_decode("abc"), None);
    }

    #[test]
    fn messages_are_one_line_of_json() {
        let m = ToGuest::Run { argv: vec!["sh".into(), "-c".into(), "echo a\nb".into()], timeout_ms: 5 };
        let line = serde_json::to_string(&m).unwrap();
        assert!(!line.contains('\n'));
        assert_eq!(serde_json::from_str::<ToGuest>(&line).unwrap(), m);
    }
}
