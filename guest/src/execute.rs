//! Carrying out a request once the machine is up: its directories, links and host
//! name, the system's configuration and services, then its program (a command, an
//! interactive shell, or serving the host) under PID 1's supervision.

use std::fs::{self, OpenOptions};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use guest::{Mode, Request, Status};
use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::serve;
use crate::services::{self, Supervisor};
use crate::sys::{block_signals, clean_start, handled_signals, log, port_device, reap, Result, SHUTDOWN_SIGNALS};

/// Applies the request's system item, if it names one, and starts its services.
/// `root_has_files`: the root file system already holds its `/etc` files and homes.
pub(crate) fn start_system(request: &Request, root_has_files: bool, supervisor: &mut Supervisor) -> Result<()> {
    match &request.system {
        Some(system) => start_config(&services::read_config(system)?, root_has_files, supervisor),
        None => crate::base::etc(),
    }
}

/// Applies a system configuration and starts its services, each up before the next.
pub(crate) fn start_config(
    config: &guest::SystemConfig,
    root_has_files: bool,
    supervisor: &mut Supervisor,
) -> Result<()> {
    block_signals()?;
    services::apply(config, root_has_files)?;
    crate::base::etc()?;
    supervisor.start_all(&config.services)?;
    log("services up");
    // File systems not needed for boot: once the services are up.
    for m in &config.late_mounts {
        services::mount_checked(m, &config.fsck)?;
    }
    Ok(())
}

/// The request's directories, links and host name, on a machine with what every
/// system has ([`crate::base::machine`]).
pub(crate) fn prepare(request: &Request) -> Result<()> {
    crate::base::machine()?;
    for dir in &request.dirs {
        fs::create_dir_all(dir).map_err(|e| format!("cannot create {dir}: {e}"))?;
    }
    for (link, target) in &request.links {
        if let Some(parent) = Path::new(link).parent() {
            fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        std::os::unix::fs::symlink(target, link).map_err(|e| format!("cannot link {link} -> {target}: {e}"))?;
    }
    nix::unistd::sethostname(&request.hostname)
        .map_err(|e| format!("cannot set host name {}: {e}", request.hostname))?;
    Ok(())
}

fn output(port: &Option<String>) -> Result<Stdio> {
    match port {
        None => Ok(Stdio::inherit()),
        Some(name) => {
            let dev = port_device(name)?;
            let file =
                OpenOptions::new().write(true).open(&dev).map_err(|e| format!("cannot open {}: {e}", dev.display()))?;
            Ok(Stdio::from(file))
        }
    }
}

/// Runs the request's program; services that exit meanwhile are restarted when asked.
pub(crate) fn execute_supervised(request: &Request, supervisor: &mut Supervisor) -> Result<Status> {
    let signals = handled_signals();
    block_signals()?;

    crate::sessions::start(request)?;
    if request.mode == Mode::Serve {
        return serve::serve(request, supervisor, signals);
    }
    let mut cmd = Command::new(&request.argv[0]);
    cmd.args(&request.argv[1..]).env_clear().envs(request.env.iter().map(|(k, v)| (k, v))).current_dir(&request.cwd);
    clean_start(&mut cmd);
    match request.mode {
        Mode::Command => {
            cmd.stdin(Stdio::null()).stdout(output(&request.stdout_port)?).stderr(output(&request.stderr_port)?);
        }
        Mode::Serve => unreachable!("served above"),
        Mode::Interactive => {
            // The serial console: the PC's UART, or the PL011 of aarch64's `virt` machine.
            let tty = if cfg!(target_arch = "aarch64") { "/dev/ttyAMA0" } else { "/dev/ttyS0" };
            let open =
                || OpenOptions::new().read(true).write(true).open(tty).map_err(|e| format!("cannot open {tty}: {e}"));
            cmd.stdin(open()?).stdout(open()?).stderr(open()?);
            // After `clean_start`'s setsid: the terminal becomes the new session's.
            // SAFETY: only an async-signal-safe call (ioctl) between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    if nix::libc::ioctl(0, nix::libc::TIOCSCTTY, 1) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
    }
    let child = cmd.spawn().map_err(|e| format!("cannot run `{}`: {e}", request.argv[0]))?;
    let main_pid = Pid::from_raw(child.id() as i32);
    log(&format!("running {:?}", request.argv));

    loop {
        let signal = signals.wait().map_err(|e| format!("sigwait: {e}"))?;
        if signal == Signal::SIGCHLD {
            let (status, others) = reap(main_pid);
            for (pid, how) in others {
                if !crate::sessions::claim(pid, &how) {
                    supervisor.exited(pid, &how);
                }
            }
            if let Some(status) = status {
                return Ok(status);
            }
        } else if SHUTDOWN_SIGNALS.contains(&signal) {
            log(&format!("{signal} received: shutting down"));
            return Ok(match request.mode {
                Mode::Interactive | Mode::Serve => Status::Exited(0),
                Mode::Command => Status::Error(format!(
                    "the guest was shut down ({signal} to init) before `{}` exited",
                    request.argv[0]
                )),
            });
        }
    }
}

/// After the program of a request with `keep` ended: goes on reaping children (the
/// attach channel's shells, services to restart) until init is asked to shut down.
pub(crate) fn keep(supervisor: &mut Supervisor) -> Result<()> {
    let signals = handled_signals();
    log("the program ended; the VM is kept until it is shut down (`poweroff`)");
    loop {
        let signal = signals.wait().map_err(|e| format!("sigwait: {e}"))?;
        if signal == Signal::SIGCHLD {
            let (_, ended) = reap(Pid::from_raw(0));
            for (pid, how) in ended {
                if !crate::sessions::claim(pid, &how) {
                    supervisor.exited(pid, &how);
                }
            }
        } else if SHUTDOWN_SIGNALS.contains(&signal) {
            log(&format!("{signal} received: shutting down"));
            return Ok(());
        }
    }
}
