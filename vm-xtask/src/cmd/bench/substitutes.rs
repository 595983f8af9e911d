//! The `substitutes` figure: a cold `run-vm -- true` in an empty store with every item
//! from a registry (Debian's docker-registry from the store, on 127.0.0.1) against the
//! same cold start built here (the kernel fetched and unpacked, the initrd written, the
//! guest helper added), with the bytes each moved.

use fs_err as fs;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::store::Store;
use crate::substitute::{self, CONFIG_ENV, SUBSTITUTES_ENV};
use crate::Workspace;

/// What the figure measured.
pub struct Measured {
    /// Wall time from substitutes, and built here.
    pub pulled_s: f64,
    pub built_s: f64,
    /// Bytes received from the registry, and `.deb` bytes fetched from Debian's archive.
    pub pulled_bytes: u64,
    pub built_bytes: u64,
}

/// The registry, killed and reaped when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn measure(ws: &Workspace, store: &Store, xtask: &Path, system: &str, accel: &str) -> Result<Measured> {
    let scratch = store.scratch("bench-substitutes")?;
    let dir = scratch.path();
    let program = crate::debian::registry_server::from_store(store)?.path.join("bin/docker-registry");
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let config = format!(
        "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
         http:\n  addr: 127.0.0.1:{port}\n",
        dir.join("registry").display()
    );
    fs::write(dir.join("registry.yml"), config)?;
    let _server = Server(
        crate::process::command(&program)
            .arg("serve")
            .arg(dir.join("registry.yml"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting `{}`", program.display()))?,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("the bench's docker-registry did not listen on 127.0.0.1:{port}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let key = dir.join("bench.key");
    let public = substitute::keygen(ws, "bench", &key)?;
    fs::write(dir.join("vmstore.conf"), format!("trusted-key {}", fs::read_to_string(public)?))?;
    let registry = format!("127.0.0.1:{port}/bench/vmstore");
    let mut push = crate::process::command(xtask);
    push.args(["store", "push", "--system", system, "--to", &registry, "--key"]).arg(&key);
    crate::process::run(&push).context("pushing the system's items for the bench")?;

    let cold = |name: &str, substitutes: &str| -> Result<(f64, String)> {
        let root = dir.join(name);
        let record = dir.join(format!("{name}.record"));
        let mut run = crate::process::command(xtask);
        run.args(["run-vm", "--system", system, "--accel", accel, "--cold", "--timeout", "300", "--", "true"])
            .env(crate::STORE_ENV, &root)
            .env(SUBSTITUTES_ENV, substitutes)
            .env(CONFIG_ENV, dir.join("vmstore.conf"))
            .env(crate::store::RECORD_ENV, &record);
        super::quiesce();
        let start = Instant::now();
        crate::process::run(&run).with_context(|| format!("the cold start ({name})"))?;
        let took = start.elapsed().as_secs_f64();
        Ok((took, fs::read_to_string(&record).unwrap_or_default()))
    };
    let (built_s, built) = cold("built", "")?;
    let (pulled_s, pulled) = cold("pulled", &registry)?;
    // Substituted items say how many bytes came; built Debian packages are `.deb`s of the
    // size the lock records.
    let pulled_bytes =
        pulled.lines().filter_map(|l| l.strip_prefix("substituted ")?.split(' ').next()?.parse::<u64>().ok()).sum();
    let built_store = Store::open(&dir.join("built"), false)?;
    let pins = crate::debian::lock::read(&crate::debian::lock::path())?;
    let mut built_bytes = 0;
    for name in built.lines().filter_map(|l| l.strip_prefix("built ")) {
        let Some(item) = built_store.lookup(name) else { continue };
        let meta = built_store.meta(&item)?;
        if meta.kind != "debian-package" {
            continue;
        }
        let param = |k: &str| meta.params.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
        let (package, sha256) = (param("package"), param("sha256"));
        built_bytes += pins
            .values()
            .find(|p| Some(&p.package) == package.as_ref() && Some(&p.sha256) == sha256.as_ref())
            .map_or(0, |p| p.size);
    }
    // Read-only items: removed through the store's own removal, not the scratch's.
    for name in ["built", "pulled"] {
        crate::store::remove_tree(&dir.join(name))?;
    }
    Ok(Measured { pulled_s, built_s, pulled_bytes, built_bytes })
}
