//! Serving the control channel ([`guest::control`]): the helper runs the host's commands
//! one at a time on a thread of its own, while PID 1's signal loop goes on reaping
//! children (handing the statuses of the commands back to that thread) and restarting
//! services.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use guest::control::{base64_encode, FromGuest, ToGuest, CONTROL_PORT};
use guest::{Request, Status};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::unistd::Pid;

use crate::services::Supervisor;
use crate::sys::{log, open_port, reap, Result, SHUTDOWN_SIGNALS};

/// Children the control thread waits for, and where their statuses go.
type Waiting = Arc<Mutex<HashMap<Pid, Sender<Status>>>>;

/// What the control thread asks of PID 1's loop, which owns the services (it is woken
/// with a SIGCHLD of its own).
enum Order {
    /// Restart no service: they are about to be ended (a failure point).
    Freeze(Sender<()>),
    /// Start the services of this request's system anew.
    Restart(Box<Request>, Sender<Result<()>>),
}

/// Serves until the host asks for a power-off (or init is asked to shut down).
pub fn serve(request: &Request, supervisor: &mut Supervisor, signals: SigSet) -> Result<Status> {
    let waiting: Waiting = Arc::default();
    let port = open_port(CONTROL_PORT)?;
    let thread_waiting = waiting.clone();
    let request = request.clone();
    let (orders, orders_in) = mpsc::channel();
    std::thread::spawn(move || {
        if let Err(e) = control_loop(port, request, &thread_waiting, &orders) {
            log(&format!("control channel: {e}"));
        }
        // The host is gone or asked for a power-off: end as a shutdown does.
        let _ = kill(Pid::this(), Signal::SIGUSR2);
    });
    log("serving the control channel");
    loop {
        let signal = signals.wait().map_err(|e| format!("sigwait: {e}"))?;
        while let Ok(order) = orders_in.try_recv() {
            match order {
                Order::Freeze(done) => {
                    supervisor.freeze();
                    let _ = done.send(());
                }
                Order::Restart(request, done) => {
                    *supervisor = Supervisor::default();
                    let started = match &request.system {
                        Some(system) => crate::services::read_config(system)
                            .and_then(|config| supervisor.start_all(&config.services)),
                        None => Ok(()),
                    };
                    let _ = done.send(started);
                }
            }
        }
        if signal == Signal::SIGCHLD {
            let (_, ended) = reap(Pid::from_raw(0));
            let mut waiting = waiting.lock().unwrap_or_else(|e| e.into_inner());
            for (pid, how) in ended {
                match waiting.remove(&pid) {
                    Some(tx) => drop(tx.send(how)),
                    None if crate::sessions::claim(pid, &how) => {}
                    None => supervisor.exited(pid, &how),
                }
            }
        } else if SHUTDOWN_SIGNALS.contains(&signal) {
            log(&format!("{signal} received: shutting down"));
            return Ok(Status::Exited(0));
        }
    }
}

fn control_loop(port: std::fs::File, mut request: Request, waiting: &Waiting, orders: &Sender<Order>) -> Result<()> {
    let mut out = port.try_clone().map_err(|e| format!("cannot duplicate the control port: {e}"))?;
    let mut send = |m: &FromGuest| -> Result<()> {
        let mut line = serde_json::to_string(m).map_err(|e| e.to_string())?;
        line.push('\n');
        out.write_all(line.as_bytes()).and_then(|()| out.flush()).map_err(|e| format!("writing to the host: {e}"))
    };
    send(&FromGuest::Ready)?;
    log("control channel ready");
    let mut reader = BufReader::new(port);
    let mut line = String::new();
    loop {
        line.clear();
        // No host connected reads as the end of the input: wait for one (a driver that
        // let go of a kept node, then a shell attaching to it).
        if reader.read_line(&mut line).map_err(|e| format!("reading from the host: {e}"))? == 0 {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<ToGuest>(&line) {
            Ok(ToGuest::Run { argv, timeout_ms }) => {
                let done = run(&argv, timeout_ms, &request, &request.cwd, &[], waiting);
                // The host may have gone meanwhile; the next one asks again.
                let _ = send(&done);
            }
            Ok(ToGuest::RunIn { argv, timeout_ms, cwd, env }) => {
                let done = run(&argv, timeout_ms, &request, &cwd, &env, waiting);
                // The host may have gone meanwhile; the next one asks again.
                let _ = send(&done);
            }
            Ok(ToGuest::PowerOff) => return Ok(()),
            Ok(ToGuest::SaveFailure) => {
                let answer = match save_failure(orders, &request) {
                    Ok(replay) => {
                        request = replay;
                        FromGuest::Ready
                    }
                    Err(error) => FromGuest::Failed { error },
                };
                let _ = send(&answer);
            }
            Err(e) => {
                let _ = send(&FromGuest::Failed { error: format!("not a message: {e}") });
            }
        }
    }
}

/// Asks PID 1's loop for `order` and waits for its answer.
fn ask<T>(orders: &Sender<Order>, order: impl FnOnce(Sender<T>) -> Order) -> Result<T> {
    let (tx, rx) = mpsc::channel();
    orders.send(order(tx)).map_err(|_| "PID 1's loop is gone".to_string())?;
    let _ = kill(Pid::this(), Signal::SIGCHLD);
    rx.recv().map_err(|_| "PID 1's loop did not answer".to_string())
}

/// A failure point on the host's word ([`ToGuest::SaveFailure`]): the services frozen
/// and every process ended, the shares unmounted, the host's `go` awaited; then the
/// request read again (a replay's, or the same), its shares mounted again and its
/// services started. Returns that request.
fn save_failure(orders: &Sender<Order>, current: &Request) -> Result<Request> {
    log("stopping at a failure point for the host to save the VM");
    ask(orders, Order::Freeze)?;
    let stopped = crate::failure::stop_and_wait();
    let (request, parked) = match stopped {
        Ok(stopped) => stopped,
        Err(e) => {
            // Nothing saved: the services run again, as they were asked to.
            let _ = ask(orders, |done| Order::Restart(Box::new(current.clone()), done));
            return Err(e);
        }
    };
    crate::failure::put_back(&request, &parked)?;
    ask(orders, |done| Order::Restart(Box::new(request.clone()), done))??;
    log("services up again after the failure point");
    Ok(request)
}

/// Runs one command in `cwd` with the request's environment and `env`.
fn run(
    argv: &[String],
    timeout_ms: u64,
    request: &Request,
    cwd: &str,
    env: &[(String, String)],
    waiting: &Waiting,
) -> FromGuest {
    let Some((program, args)) = argv.split_first() else {
        return FromGuest::Failed { error: "an empty command".into() };
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(request.env.iter().map(|(k, v)| (k, v)))
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    crate::sys::clean_start(&mut cmd);
    let (tx, rx) = mpsc::channel();
    // Registered before the reaper can see it exit: it takes the same lock.
    let mut child = {
        let mut waiting = waiting.lock().unwrap_or_else(|e| e.into_inner());
        match cmd.spawn() {
            Ok(child) => {
                waiting.insert(Pid::from_raw(child.id() as i32), tx);
                child
            }
            Err(e) => return FromGuest::Failed { error: format!("cannot run `{program}`: {e}") },
        }
    };
    let pid = Pid::from_raw(child.id() as i32);
    // Output is gathered as it comes: a process the command left running in the
    // background may hold the pipes open long after the command itself has ended.
    let drain = |r: Option<Box<dyn Read + Send>>| {
        let buf: Arc<Mutex<Vec<u8>>> = Arc::default();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let shared = buf.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            if let Some(mut r) = r {
                while let Ok(n @ 1..) = r.read(&mut chunk) {
                    shared.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(&chunk[..n]);
                }
            }
            let _ = done_tx.send(());
        });
        (buf, done_rx)
    };
    let stdout = drain(child.stdout.take().map(|r| Box::new(r) as Box<dyn Read + Send>));
    let stderr = drain(child.stderr.take().map(|r| Box::new(r) as Box<dyn Read + Send>));
    let (status, timed_out) = match rx.recv_timeout(Duration::from_millis(timeout_ms)) {
        Ok(status) => (status, false),
        Err(_) => {
            let _ = kill(pid, Signal::SIGKILL);
            (rx.recv().unwrap_or(Status::Signaled(9)), true)
        }
    };
    // The child is reaped by PID 1's loop: forget it here without waiting.
    std::mem::forget(child);
    let (exit, signal) = match status {
        Status::Exited(code) => (Some(code), None),
        Status::Signaled(sig) => (None, Some(sig)),
        Status::Error(_) => (None, None),
    };
    let take = |(buf, done): (Arc<Mutex<Vec<u8>>>, mpsc::Receiver<()>)| {
        let _ = done.recv_timeout(Duration::from_secs(2));
        let bytes = std::mem::take(&mut *buf.lock().unwrap_or_else(|e| e.into_inner()));
        base64_encode(&bytes)
    };
    FromGuest::Done { exit, signal, timed_out, stdout: take(stdout), stderr: take(stderr) }
}
