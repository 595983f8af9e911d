//! The snapshot point ([`guest::snapshot`]): with `vm.snapshot-wait` on the kernel
//! command line, the helper waits here, modules loaded and nothing mounted, until the
//! host says `go`; then it takes the host's clock and fresh random bytes, so that every
//! guest restored from one saved state is its own machine.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;

use guest::snapshot::parse_go;

use crate::sys::{log, open_port, Result};

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: u64 = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: u64 = 0x5207;

/// Waits for the host's `go`, saying `waiting` (a line) every few milliseconds.
pub fn wait_for_go(waiting: &str) -> Result<()> {
    let mut port = open_port(guest::SNAPSHOT_PORT)?;
    log("waiting for the host (snapshot point)");
    let mut line = Vec::new();
    loop {
        // With no host connected a write may fail: the host connects later (a restore).
        let _ = port.write_all(format!("{waiting}\n").as_bytes());
        let mut fds = [nix::libc::pollfd { fd: port.as_raw_fd(), events: nix::libc::POLLIN, revents: 0 }];
        // SAFETY: poll on one valid descriptor.
        let ready = unsafe { nix::libc::poll(fds.as_mut_ptr(), 1, 20) };
        if ready <= 0 || fds[0].revents & nix::libc::POLLIN == 0 {
            continue;
        }
        let mut buf = [0u8; 4096];
        let n = port.read(&mut buf).unwrap_or(0);
        line.extend_from_slice(&buf[..n]);
        let Some(end) = line.iter().position(|b| *b == b'\n') else {
            line.truncate(8192);
            continue;
        };
        let text = String::from_utf8_lossy(&line[..end]).into_owned();
        line.drain(..=end);
        if let Some((secs, nanos, entropy)) = parse_go(&text) {
            become_unique(secs, nanos, &entropy)?;
            log("go");
            return Ok(());
        }
    }
}

/// Sets the clock and feeds the random-number generator, then reseeds it.
fn become_unique(secs: u64, nanos: u32, entropy: &[u8]) -> Result<()> {
    let ts = nix::sys::time::TimeSpec::new(secs as i64, nanos as i64);
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts)
        .map_err(|e| format!("cannot set the clock: {e}"))?;
    let random =
        OpenOptions::new().write(true).open("/dev/urandom").map_err(|e| format!("cannot open /dev/urandom: {e}"))?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + entropy.len());
    info.extend_from_slice(&((entropy.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(entropy.len() as i32).to_ne_bytes());
    info.extend_from_slice(entropy);
    // SAFETY: the ioctls read `info` (a rand_pool_info of the stated size) and nothing.
    unsafe {
        if nix::libc::ioctl(random.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) != 0 {
            return Err(format!("cannot add entropy: {}", std::io::Error::last_os_error()));
        }
        if nix::libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG as _) != 0 {
            return Err(format!("cannot reseed the random-number generator: {}", std::io::Error::last_os_error()));
        }
    }
    Ok(())
}
