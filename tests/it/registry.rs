//! Sharing store items through a real OCI registry: Debian's `docker-registry`, from the
//! store (`xtask store registry-program`), on 127.0.0.1 with a temporary configuration
//! and storage. Push, pull, substitutes during builds, and what is refused: an unknown
//! key, a wrong signature, a tampered blob, a registry that stops mid-pull or hangs.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vm_tests::{store_dir, xtask, xtask_env, Run, TIMEOUT};

/// A docker-registry running on 127.0.0.1, killed and reaped when dropped.
struct Registry {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The docker-registry program from the store.
fn registry_program() -> PathBuf {
    let run = xtask(&["store", "registry-program"]);
    run.expect_code(0);
    let program = PathBuf::from(run.stdout.trim_end());
    assert!(program.is_file(), "docker-registry is missing: `xtask store registry-program` printed {run:#?}");
    program
}

impl Registry {
    /// Starts a registry; with `user`, only that user (password `secret`) may use it.
    fn start(user: Option<&str>) -> Registry {
        let program = registry_program();
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        );
        if let Some(user) = user {
            let hash = bcrypt::hash("secret", 4).unwrap();
            std::fs::write(dir.path().join("htpasswd"), format!("{user}:{hash}\n")).unwrap();
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: test\n    path: {}\n",
                dir.path().join("htpasswd").display()
            ));
        }
        std::fs::write(dir.path().join("config.yml"), config).unwrap();
        let log = std::fs::File::create(dir.path().join("log")).unwrap();
        let child = Command::new(&program)
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
        let registry = Registry { child, port, dir };
        let up = vm_tests::wait_until(30, || {
            let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return false };
            let _ = s.write_all(b"GET /v2/ HTTP/1.0\r\n\r\n");
            let mut answer = String::new();
            let _ = s.read_to_string(&mut answer);
            answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.0 401")
        });
        let log = std::fs::read_to_string(registry.dir.path().join("log")).unwrap_or_default();
        assert!(up, "docker-registry did not answer on 127.0.0.1:{port} within 30 s; its log: {log}");
        registry
    }

    fn repo(&self, name: &str) -> String {
        format!("127.0.0.1:{}/{name}", self.port)
    }

    /// Rewrites the manifest `repo:tag` in the registry's storage (as someone with
    /// write access to it could), `edit` changing its JSON.
    fn rewrite_manifest(&self, repo: &str, tag: &str, edit: impl FnOnce(&mut serde_json::Value)) {
        let v2 = self.dir.path().join("data/docker/registry/v2");
        let manifests = v2.join("repositories").join(repo).join("_manifests");
        let current = manifests.join("tags").join(tag).join("current/link");
        let digest = std::fs::read_to_string(&current).unwrap();
        let hex = digest.trim().strip_prefix("sha256:").unwrap().to_string();
        let blob = |hex: &str| v2.join("blobs/sha256").join(&hex[..2]).join(hex).join("data");
        let mut manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(blob(&hex)).unwrap()).unwrap();
        edit(&mut manifest);
        let bytes = serde_json::to_vec(&manifest).unwrap();
        let scratch = self.dir.path().join("manifest");
        std::fs::write(&scratch, &bytes).unwrap();
        let sum = Command::new("sha256sum").arg(&scratch).output().unwrap();
        let hex = String::from_utf8(sum.stdout).unwrap().split_whitespace().next().unwrap().to_string();
        std::fs::create_dir_all(blob(&hex).parent().unwrap()).unwrap();
        std::fs::write(blob(&hex), &bytes).unwrap();
        let revision = manifests.join("revisions/sha256").join(&hex).join("link");
        std::fs::create_dir_all(revision.parent().unwrap()).unwrap();
        std::fs::write(revision, format!("sha256:{hex}")).unwrap();
        std::fs::write(current, format!("sha256:{hex}")).unwrap();
    }

    /// The blob files in the registry's storage, largest first.
    fn blobs(&self) -> Vec<PathBuf> {
        let mut found = Vec::new();
        let mut todo = vec![self.dir.path().join("data")];
        while let Some(dir) = todo.pop() {
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    todo.push(p);
                } else if p.file_name().is_some_and(|n| n == "data") && p.to_string_lossy().contains("/blobs/") {
                    found.push(p);
                }
            }
        }
        found.sort_by_key(|p| std::cmp::Reverse(std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)));
        found
    }
}

/// A key pair made by `store keygen`: (secret key file, the `trusted-key` value).
fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let secret = dir.join(format!("{name}-{}.key", crate::nonce()));
    let run = xtask(&["store", "keygen", "--name", name, "--out", secret.to_str().unwrap()]);
    run.expect_code(0);
    let public = run.stdout.trim().strip_prefix("trusted-key ").expect("keygen prints a trusted-key line").to_string();
    (secret, public)
}

/// A store in a new directory beside the shared one, trusting `keys`, with `extra`
/// lines in its configuration.
struct Store {
    dir: tempfile::TempDir,
}

impl Store {
    fn new(keys: &[&str], extra: &str) -> Store {
        let dir = tempfile::tempdir_in(store_dir().parent().unwrap()).unwrap();
        let mut conf: String = keys.iter().map(|k| format!("trusted-key {k}\n")).collect();
        conf.push_str(extra);
        std::fs::write(dir.path().join("vmstore.conf"), conf).unwrap();
        Store { dir }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    fn run(&self, args: &[&str], substitutes: &str) -> Run {
        let (root, conf) = (self.root(), self.dir.path().join("vmstore.conf"));
        let env = [
            ("XTASK_VMSTORE", root.as_os_str()),
            ("XTASK_STORE_CONFIG", conf.as_os_str()),
            ("XTASK_SUBSTITUTES", substitutes.as_ref()),
        ];
        xtask_env(args, &env)
    }

    fn items(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.root().join("items"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// `store pull ITEM --from TO` fails with exit status 1 saying `why`, and `item` is
    /// not in the store.
    fn assert_pull_refused(&self, item: &str, to: &str, why: &str) {
        let refused = self.run(&["store", "pull", item, "--from", to], "");
        assert_eq!(refused.code, 1, "{refused:#?}");
        assert!(refused.stderr.contains(why), "{refused:#?}");
        assert!(!self.items().iter().any(|n| n == item), "{:?}", self.items());
    }

    /// `store registry-program` with `substitutes` succeeds, having warned `why` and said
    /// that it builds the item here; the store is sound after it. Returns the run.
    fn assert_built_here(&self, substitutes: &str, why: &str) -> Run {
        let built = self.run(&["store", "registry-program"], substitutes);
        built.expect_code(0);
        assert!(built.stderr.contains(why) && built.stderr.contains("building it here"), "{built:#?}");
        self.assert_sound();
        built
    }

    /// Nothing half-written: the store verifies, its scratch is empty, and every item's
    /// references are present.
    fn assert_sound(&self) {
        self.run(&["store", "verify"], "").expect_code(0);
        let tmp: Vec<_> =
            std::fs::read_dir(self.root().join(".tmp")).unwrap().flatten().map(|e| e.file_name()).collect();
        assert!(tmp.is_empty(), "leftovers in .tmp: {tmp:?}");
        for name in self.items() {
            let meta = std::fs::read_to_string(self.root().join("meta").join(format!("{name}.meta"))).unwrap();
            let meta: serde_json::Value = serde_json::from_str(&meta).unwrap();
            for input in meta["inputs"].as_array().unwrap() {
                if input[0] == "ref" {
                    let reference = input[1].as_str().unwrap().trim_start_matches("item:");
                    assert!(self.items().iter().any(|n| n == reference), "{name} is present without {reference}");
                }
            }
        }
    }
}

/// The docker-registry item's closure in the shared store: small, and three items deep.
fn small_closure() -> String {
    let program = registry_program();
    let item = program.parent().unwrap().parent().unwrap();
    item.file_name().unwrap().to_string_lossy().into_owned()
}

/// Pushes `item` again after its manifest was rewritten: its tag removed first, so the
/// push does not find it there.
fn push_again(registry: &Registry, item: &str, to: &str, key: &Path) {
    let tag = item.split('-').next().unwrap();
    let tags = registry.dir.path().join("data/docker/registry/v2/repositories/team/vmstore/_manifests/tags");
    std::fs::remove_dir_all(tags.join(tag)).unwrap();
    push(item, to, key).expect_code(0);
}

fn push(item: &str, to: &str, key: &Path) -> Run {
    xtask(&["store", "push", item, "--to", to, "--key", key.to_str().unwrap()])
}

#[test]
fn the_default_systems_closure_is_pushed_pulled_into_an_empty_store_and_boots() {
    let registry = Registry::start(None);
    let keys = tempfile::tempdir().unwrap();
    let (key, public) = keygen(keys.path(), "team-ci");
    let to = registry.repo("team/vmstore");
    // The first store: the shared one's items, hard-linked (other tests remove and
    // rebuild images in the shared store meanwhile).
    let source = tempfile::tempdir_in(store_dir().parent().unwrap()).unwrap();
    vm_tests::copy_items(source.path(), true, |_| true);
    let env = [("XTASK_VMSTORE", source.path().as_os_str())];
    let pushed = xtask_env(
        &["store", "push", "--system", "minimal", "--to", &to, "--key", key.to_str().unwrap(), "--json"],
        &env,
    );
    pushed.expect_code(0);
    let report: serde_json::Value = serde_json::from_str(&pushed.stdout).unwrap();
    assert!(report["items"].as_u64().unwrap() >= 5, "{pushed:#?}");
    let first = xtask_env(&["vm-image", "--json"], &env);
    first.expect_code(0);
    let first: serde_json::Value = serde_json::from_str(&first.stdout).unwrap();

    let store = Store::new(&[&public], "");
    let pulled = store.run(&["store", "pull", "--system", "minimal", "--from", &to, "--json"], "");
    pulled.expect_code(0);
    assert!(!pulled.stderr.contains("fetching Debian package"), "something was fetched, not pulled: {pulled:#?}");
    let report: serde_json::Value = serde_json::from_str(&pulled.stdout).unwrap();
    let how = report["how"].as_array().unwrap();
    let file_name = |report: &serde_json::Value| {
        Path::new(report["item"].as_str().unwrap()).file_name().unwrap().to_string_lossy().into_owned()
    };
    let image = file_name(&first);
    assert!(
        how.iter().any(|h| h[0] == image && h[1] == "substituted"),
        "the image `{image}` was not a substitute: {pulled:#?}"
    );
    let built: Vec<_> = how.iter().filter(|h| h[1] == "built").collect();
    assert!(built.is_empty(), "built, not pulled: {built:?}");
    store.assert_sound();

    // It boots from the second store alone: no substitutes now.
    let run = store.run(&["run-vm", "--timeout", TIMEOUT, "--", "sh", "-c", "echo booted from pulled items"], "");
    run.expect_code(0);
    assert!(run.stdout.contains("booted from pulled items"), "{run:#?}");
    let second = store.run(&["vm-image", "--json"], "");
    second.expect_code(0);
    let second: serde_json::Value = serde_json::from_str(&second.stdout).unwrap();
    assert_eq!(second["outcome"], "hit", "{second:#}");
    assert_eq!(file_name(&second), image);
    let (a, b) = (second["path"].as_str().unwrap(), first["path"].as_str().unwrap());
    assert_ne!(a, b);
    assert!(std::fs::read(a).unwrap() == std::fs::read(b).unwrap(), "the pulled image differs from the pushed one");
}

#[test]
fn unknown_keys_wrong_signatures_and_tampered_blobs_are_refused_and_built_locally() {
    let registry = Registry::start(None);
    let keys = tempfile::tempdir().unwrap();
    let (key, public) = keygen(keys.path(), "team");
    let (_, stranger) = keygen(keys.path(), "stranger");
    let (_, impostor) = keygen(keys.path(), "team");
    let item = small_closure();
    let to = registry.repo("team/vmstore");
    push(&item, &to, &key).expect_code(0);

    // Signed by a key nobody trusts.
    let store = Store::new(&[&stranger], "");
    store.assert_pull_refused(&item, &to, "signed by an unknown key");
    assert!(store.items().is_empty(), "{:?}", store.items());
    store.assert_sound();
    // As a substitute: a warning saying why, then built here.
    let built = store.assert_built_here(&to, "signed by an unknown key");
    assert!(built.stderr.contains("fetching Debian package"), "{built:#?}");

    // A key of the trusted name that is not the trusted key.
    let store = Store::new(&[&impostor], "");
    store.assert_pull_refused(&item, &to, "wrongly signed");
    assert!(store.items().is_empty());

    // The signature taken out of the manifest: unsigned.
    let tag = item.split('-').next().unwrap();
    registry.rewrite_manifest("team/vmstore", tag, |m| {
        m["annotations"].as_object_mut().unwrap().remove("org.vmstore.signature").expect("a signature");
    });
    let store = Store::new(&[&public], "");
    store.assert_pull_refused(&item, &to, "unsigned");
    assert!(store.items().is_empty());
    store.assert_built_here(&to, "refused: unsigned");
    // Another item's signature and content hash under this item's tag: wrongly signed.
    let other_tag = {
        let shared = store_dir().join("items");
        let deps: Vec<String> = std::fs::read_dir(&shared)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("-libc6-") && !n.ends_with("-alternatives"))
            // amd64's, which the pushed closure has (not an aarch64 guest's).
            .filter(|n| shared.join(n).join("lib/x86_64-linux-gnu").is_dir())
            .collect();
        deps[0].split('-').next().unwrap().to_string()
    };
    let other = {
        let v2 = registry.dir.path().join("data/docker/registry/v2/repositories/team/vmstore/_manifests/tags");
        let digest = std::fs::read_to_string(v2.join(&other_tag).join("current/link")).unwrap();
        let hex = digest.trim().strip_prefix("sha256:").unwrap().to_string();
        let blob =
            registry.dir.path().join("data/docker/registry/v2/blobs/sha256").join(&hex[..2]).join(&hex).join("data");
        serde_json::from_slice::<serde_json::Value>(&std::fs::read(blob).unwrap()).unwrap()
    };
    registry.rewrite_manifest("team/vmstore", tag, |m| {
        for key in ["org.vmstore.signature", "org.vmstore.content-sha256"] {
            m["annotations"][key] = other["annotations"][key].clone();
        }
    });
    let store = Store::new(&[&public], "");
    store.assert_pull_refused(&item, &to, "wrongly signed");
    store.assert_sound();
    push_again(&registry, &item, &to, &key);

    // Another item's layer (whole, matching its digest) under this item's signed
    // manifest: the signature covers the layer's digest and size, so it does not verify.
    registry.rewrite_manifest("team/vmstore", tag, |m| m["layers"] = other["layers"].clone());
    let store = Store::new(&[&public], "");
    store.assert_pull_refused(&item, &to, "wrongly signed");
    store.assert_sound();
    store.assert_built_here(&to, "wrongly signed");
    push_again(&registry, &item, &to, &key);

    // The right key, then a blob changed in the registry's storage.
    let store = Store::new(&[&public], "");
    store.run(&["store", "pull", &item, "--from", &to], "").expect_code(0);
    assert_eq!(store.items().len(), 3, "{:?}", store.items());
    let blob = registry.blobs().into_iter().next().unwrap();
    let mut bytes = std::fs::read(&blob).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&blob, &bytes).unwrap();
    let store = Store::new(&[&public], "");
    store.assert_pull_refused(&item, &to, "altered");
    store.assert_sound();
    store.assert_built_here(&to, "altered content");
}

/// What a proxy does once `limit` bytes came back from the registry.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Then {
    /// Closes every connection and accepts no more.
    Stop,
    /// Goes on at 256 bytes a second.
    Trickle,
}

/// A TCP proxy to `port` that does `then` once `limit` bytes came back from it.
fn cutting_proxy(port: u16, limit: u64) -> u16 {
    slow_proxy(port, limit, Then::Stop)
}

fn slow_proxy(port: u16, limit: u64, then: Then) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = listener.local_addr().unwrap().port();
    let sent = Arc::new(AtomicU64::new(0));
    let stopped = Arc::new(AtomicBool::new(false));
    std::thread::spawn(move || {
        for client in listener.incoming() {
            if stopped.load(Ordering::SeqCst) {
                break;
            }
            let Ok(client) = client else { break };
            let Ok(server) = TcpStream::connect(("127.0.0.1", port)) else { break };
            let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c_in, &mut s_out);
            });
            let (sent, stopped) = (sent.clone(), stopped.clone());
            std::thread::spawn(move || {
                let (mut s_in, mut c_out) = (server, client);
                let mut buf = [0u8; 16384];
                loop {
                    let n = match s_in.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let over = sent.fetch_add(n as u64, Ordering::SeqCst) + n as u64 > limit;
                    if over && then == Then::Stop {
                        stopped.store(true, Ordering::SeqCst);
                        break;
                    }
                    let pieces: Vec<&[u8]> = if over { buf[..n].chunks(256).collect() } else { vec![&buf[..n]] };
                    let mut written = true;
                    for piece in pieces {
                        if over {
                            std::thread::sleep(Duration::from_secs(1));
                        }
                        written = written && c_out.write_all(piece).is_ok();
                    }
                    if !written {
                        break;
                    }
                }
                let _ = c_out.shutdown(std::net::Shutdown::Both);
                let _ = s_in.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    proxy
}

#[test]
fn a_registry_that_stops_mid_pull_or_hangs_leaves_nothing_half_written_and_fails_no_build() {
    let registry = Registry::start(None);
    let keys = tempfile::tempdir().unwrap();
    let (key, public) = keygen(keys.path(), "team");
    let item = small_closure();
    let to = registry.repo("team/vmstore");
    push(&item, &to, &key).expect_code(0);

    // Stopped after 3 MB of the 12 the closure's layers hold.
    let proxy = cutting_proxy(registry.port, 3 << 20);
    let store = Store::new(&[&public], "");
    let cut = store.run(&["store", "pull", &item, "--from", &format!("127.0.0.1:{proxy}/team/vmstore")], "");
    assert_eq!(cut.code, 1, "{cut:#?}");
    assert!(!store.items().contains(&item), "{:?}", store.items());
    store.assert_sound();
    // Pulled again from the registry itself: the rest comes, nothing is left over.
    store.run(&["store", "pull", &item, "--from", &to], "").expect_code(0);
    assert!(store.items().contains(&item));
    store.assert_sound();

    // Substitutes from a registry that stops mid-pull, from one that is down and from
    // one that never answers: warnings, and a local build.
    let proxy = cutting_proxy(registry.port, 3 << 20);
    let down = free_port();
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let store = Store::new(&[&public], "timeout 2\n");
    let substitutes =
        format!("127.0.0.1:{proxy}/team/vmstore 127.0.0.1:{down}/team/vmstore 127.0.0.1:{silent_port}/team/vmstore");
    let started = std::time::Instant::now();
    let built = store.run(&["store", "registry-program"], &substitutes);
    built.expect_code(0);
    assert!(built.stderr.contains("unreachable") && built.stderr.contains("building it here"), "{built:#?}");
    assert!(built.stderr.contains(&format!("127.0.0.1:{silent_port}")), "{built:#?}");
    assert!(started.elapsed() < Duration::from_secs(120), "{:?}", started.elapsed());
    store.assert_sound();
    drop(silent);

    // One that trickles (256 bytes a second, never idle for the timeout): given up on
    // within its deadline (three timeouts and a second per MiB of the layer).
    let trickle = slow_proxy(registry.port, 64 << 10, Then::Trickle);
    let store = Store::new(&[&public], "timeout 2\n");
    let started = std::time::Instant::now();
    let mut cmd = Command::new(vm_tests::xtask_bin());
    cmd.args(["store", "registry-program"])
        .env("XTASK_VMSTORE", store.root())
        .env("XTASK_STORE_CONFIG", store.dir.path().join("vmstore.conf"))
        .env("XTASK_SUBSTITUTES", format!("127.0.0.1:{trickle}/team/vmstore"));
    let built = vm_tests::output_within(cmd, 120);
    built.expect_code(0);
    assert!(built.stderr.contains("no answer within") && built.stderr.contains("building it here"), "{built:#?}");
    assert!(started.elapsed() < Duration::from_secs(90), "{:?}", started.elapsed());
    store.assert_sound();
}

#[test]
fn a_registry_with_basic_auth_takes_pushes_and_pulls_only_with_credentials() {
    let registry = Registry::start(Some("ci"));
    let keys = tempfile::tempdir().unwrap();
    let (key, public) = keygen(keys.path(), "team");
    let item = small_closure();
    let to = registry.repo("team/vmstore");
    let refused = push(&item, &to, &key);
    assert_eq!(refused.code, 1, "{refused:#?}");
    let with = |password: &str| {
        vec![("XTASK_REGISTRY_USERNAME", "ci".to_string()), ("XTASK_REGISTRY_PASSWORD", password.to_string())]
    };
    let env = |pairs: &[(&'static str, String)]| -> Vec<(&'static str, std::ffi::OsString)> {
        pairs.iter().map(|(k, v)| (*k, v.into())).collect()
    };
    let wrong = env(&with("wrong"));
    let wrong: Vec<(&str, &std::ffi::OsStr)> = wrong.iter().map(|(k, v)| (*k, v.as_os_str())).collect();
    let args = ["store", "push", &item, "--to", &to, "--key", key.to_str().unwrap()];
    assert_eq!(xtask_env(&args, &wrong).code, 1);
    let right = env(&with("secret"));
    let right: Vec<(&str, &std::ffi::OsStr)> = right.iter().map(|(k, v)| (*k, v.as_os_str())).collect();
    xtask_env(&args, &right).expect_code(0);
    let again = xtask_env(&args, &right);
    again.expect_code(0);
    assert!(again.stdout.starts_with("pushed 0 items (0 bytes), 3 already there"), "{again:#?}");

    let store = Store::new(&[&public], "");
    let conf = store.dir.path().join("vmstore.conf");
    let root = store.root();
    let mut env = vec![("XTASK_VMSTORE", root.as_os_str()), ("XTASK_STORE_CONFIG", conf.as_os_str())];
    let pull = ["store", "pull", &item, "--from", &to];
    assert_eq!(xtask_env(&pull, &env).code, 1, "pulled without credentials");
    assert!(store.items().is_empty());
    env.extend(right);
    xtask_env(&pull, &env).expect_code(0);
    assert!(store.items().contains(&item), "{:?}", store.items());
    store.assert_sound();
}

#[test]
fn bad_registry_references_keys_and_names_are_usage_errors() {
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("k");
    std::fs::write(&key, "x").unwrap();
    let key = key.to_str().unwrap();
    for bad in ["no-repository", "host/Upper", "host/a b", "host/a,b", "host/a\nb", "ftp://host/a", "host:0/a"] {
        let run = xtask(&["store", "push", "--all", "--to", bad, "--key", key]);
        assert_eq!(run.code, 2, "{bad:?}: {run:#?}");
        assert!(run.stderr.contains(&bad.escape_debug().to_string()), "{bad:?}: {run:#?}");
    }
    let run = xtask(&["store", "push", "--all", "--to", "127.0.0.1:1/a", "--key", key]);
    assert_eq!(run.code, 2, "a key file that holds no key: {run:#?}");
    let missing = keys.path().join("missing.key");
    let run = xtask(&["store", "push", "--all", "--to", "127.0.0.1:1/a", "--key", missing.to_str().unwrap()]);
    assert_eq!(run.code, 2, "{run:#?}");
    assert!(run.stderr.contains("missing.key"), "{run:#?}");
    for bad in ["a b", "a,b", "x\ny"] {
        let run = xtask(&["store", "keygen", "--name", bad, "--out", keys.path().join("n").to_str().unwrap()]);
        assert_eq!(run.code, 2, "{bad:?}: {run:#?}");
    }
    let store = Store::new(&[], "trusted-key team:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n");
    let run = store.run(&["store", "pull", "not an item", "--from", "127.0.0.1:1/a"], "");
    assert_eq!(run.code, 2, "{run:#?}");
    assert!(run.stderr.contains("not an item"), "{run:#?}");
    let broken = Store::new(&[], "substitute host/a b\n");
    let run = broken.run(&["store", "pull", "--system", "minimal", "--from", "127.0.0.1:1/a"], "");
    assert_eq!(run.code, 2, "{run:#?}");
}

#[test]
fn odd_registry_input_is_a_clear_error() {
    let keys = tempfile::tempdir().unwrap();
    let (key, public) = keygen(keys.path(), "team");
    let key_arg = key.to_str().unwrap();
    // Plain HTTP only to this machine's loopback, named as such.
    for bad in ["http://registry.example.org/a", "http://127.0.0.1.nip.io:5000/a", "http://127.evil.example/a"] {
        let run = xtask(&["store", "push", "--all", "--to", bad, "--key", key_arg]);
        assert_eq!(run.code, 2, "{bad}: {run:#?}");
        assert!(run.stderr.contains("plain HTTP") && run.stderr.contains(bad), "{bad}: {run:#?}");
    }
    // A public key where the secret one belongs.
    let public_file = format!("{key_arg}.pub");
    let run = xtask(&["store", "push", "--all", "--to", "127.0.0.1:1/a", "--key", &public_file]);
    assert_eq!(run.code, 2, "a public key given as --key: {run:#?}");
    assert!(run.stderr.contains("public key") && run.stderr.contains(&public_file), "{run:#?}");
    // Item names that are paths, or hold control characters.
    let store = Store::new(&[&public], "");
    let hash = "0123456789abcdef0123456789abcdef";
    for bad in [
        format!("{hash}-a/../../../etc"),
        format!("{hash}-a/b"),
        format!("{hash}-.."),
        format!("{hash}-a..b"),
        format!("{hash}-a\u{1b}[2Jb"),
        format!("{hash}-a\nb"),
    ] {
        let run = store.run(&["store", "pull", &bad, "--from", "127.0.0.1:1/a"], "");
        assert_eq!(run.code, 2, "{bad:?}: {run:#?}");
        assert!(run.stderr.contains(&bad.escape_debug().to_string()), "{bad:?}: {run:#?}");
        assert!(!run.stderr.contains('\u{1b}'), "{bad:?}: a raw escape reached the terminal");
    }

    let registry = Registry::start(None);
    let item = small_closure();
    let to = registry.repo("team/vmstore");
    push(&item, &to, &key).expect_code(0);
    // A tag whose signature does not verify is replaced by the next push, not kept.
    let tag = item.split('-').next().unwrap();
    registry.rewrite_manifest("team/vmstore", tag, |m| {
        m["annotations"]["org.vmstore.signature"] = "team:AAAA".into();
    });
    store.assert_pull_refused(&item, &to, "wrongly signed");
    let pushed = push(&item, &to, &key);
    pushed.expect_code(0);
    assert!(pushed.stdout.contains("pushed 1 items"), "the unverifiable tag was kept: {pushed:#?}");
    store.run(&["store", "pull", &item, "--from", &to], "").expect_code(0);
    store.assert_sound();
    // A revoked key's signature is refused, even where the key is also trusted.
    let revoked = Store::new(&[&public], &format!("revoked-key {public}\n"));
    revoked.assert_pull_refused(&item, &to, "revoked");
    revoked.assert_built_here(&to, "revoked");
}

/// How a [`misbehaving_proxy`] lies.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Lie {
    /// Manifests come padded to 1.5 GiB (still valid and signed: the padding is a field
    /// nobody reads).
    HugeManifest,
    /// `/v2/` asks for a bearer token, whose answer is 1.5 GiB.
    HugeToken,
    /// Each item's layer is swapped for a 3 GiB one: in the manifest, and served.
    HugeLayer,
    /// Blobs over 64 KiB (the layers, not the `.meta`) come one byte a second.
    DripLayers,
}

const HUGE_ANSWER: u64 = 3 << 29;
const HUGE_LAYER: u64 = 3 << 30;
const FAKE_DIGEST: &str = "sha256:abababababababababababababababababababababababababababababababab";

/// An HTTP proxy on 127.0.0.1 in front of the registry at `port` that lies as `lie`
/// says; what it makes up is generated as it is sent, never held or written.
fn misbehaving_proxy(port: u16, lie: Lie) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { break };
            std::thread::spawn(move || {
                let _ = serve_lying(client, port, proxy, lie);
            });
        }
    });
    proxy
}

/// One client connection: requests (GET and HEAD, no bodies) one after the other.
fn serve_lying(client: TcpStream, port: u16, proxy: u16, lie: Lie) -> std::io::Result<()> {
    use std::io::BufRead;
    let mut reader = std::io::BufReader::new(client.try_clone()?);
    let mut out = client;
    loop {
        let mut head = Vec::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            if line == "\r\n" || line == "\n" {
                break;
            }
            head.push(line.trim_end().to_string());
        }
        let Some(first) = head.first().cloned() else { return Ok(()) };
        let mut parts = first.split(' ');
        let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
        let get = method == "GET";
        if lie == Lie::HugeToken && path == "/v2/" {
            let challenge = format!("Bearer realm=\"http://127.0.0.1:{proxy}/token\",service=\"test\"");
            let body = b"{\"errors\":[{\"code\":\"UNAUTHORIZED\",\"message\":\"token\"}]}";
            write_head(&mut out, "401 Unauthorized", &[("WWW-Authenticate", &challenge)], body.len() as u64)?;
            out.write_all(body)?;
            continue;
        }
        if lie == Lie::HugeToken && path.starts_with("/token") {
            write_padded(&mut out, b"{\"token\":\"t\"}", HUGE_ANSWER)?;
            continue;
        }
        if lie == Lie::HugeLayer && path.ends_with(&format!("/blobs/{FAKE_DIGEST}")) {
            write_head(&mut out, "200 OK", &[("Content-Type", "application/octet-stream")], HUGE_LAYER)?;
            if get {
                let zeros = vec![0u8; 1 << 20];
                for _ in 0..HUGE_LAYER >> 20 {
                    out.write_all(&zeros)?;
                }
            }
            continue;
        }
        // Anything else is asked of the registry (HTTP/1.0: the answer ends at EOF).
        let mut upstream = TcpStream::connect(("127.0.0.1", port))?;
        let mut request = format!("{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n");
        for h in &head[1..] {
            let name = h.split(':').next().unwrap_or("").to_ascii_lowercase();
            if name == "accept" || name == "authorization" {
                request.push_str(&format!("{h}\r\n"));
            }
        }
        request.push_str("\r\n");
        upstream.write_all(request.as_bytes())?;
        let mut answer = Vec::new();
        upstream.read_to_end(&mut answer)?;
        let split = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(answer.len());
        let text = String::from_utf8_lossy(&answer[..split]).into_owned();
        let mut body = answer[(split + 4).min(answer.len())..].to_vec();
        let mut lines = text.split("\r\n");
        let status = lines.next().unwrap_or("").split_once(' ').map_or("502 Bad Gateway", |s| s.1).to_string();
        let mut headers: Vec<(String, String)> = Vec::new();
        let mut length = body.len() as u64;
        for l in lines {
            let Some((k, v)) = l.split_once(':') else { continue };
            let k_lower = k.to_ascii_lowercase();
            if k_lower == "content-length" && !get {
                length = v.trim().parse().unwrap_or(0);
            }
            if !["content-length", "connection", "transfer-encoding", "docker-content-digest"]
                .contains(&k_lower.as_str())
            {
                headers.push((k.to_string(), v.trim().to_string()));
            }
        }
        let manifest = path.contains("/manifests/") && status.starts_with("200");
        let header_refs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        match lie {
            Lie::HugeManifest if manifest && get => {
                write_padded_with(&mut out, &status, &header_refs, &body, HUGE_ANSWER)?;
                continue;
            }
            Lie::HugeLayer if manifest => {
                let mut m: serde_json::Value = serde_json::from_slice(&body).unwrap();
                m["layers"][0]["digest"] = FAKE_DIGEST.into();
                m["layers"][0]["size"] = HUGE_LAYER.into();
                body = serde_json::to_vec(&m).unwrap();
                if get {
                    length = body.len() as u64;
                }
            }
            _ => {}
        }
        write_head(&mut out, &status, &header_refs, length)?;
        if !get {
            continue;
        }
        if lie == Lie::DripLayers && path.contains("/blobs/") && body.len() > 64 << 10 {
            for byte in &body {
                out.write_all(std::slice::from_ref(byte))?;
                std::thread::sleep(Duration::from_secs(1));
            }
        } else {
            out.write_all(&body)?;
        }
    }
}

fn write_head(out: &mut impl Write, status: &str, headers: &[(&str, &str)], length: u64) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {status}\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("Content-Length: {length}\r\nConnection: keep-alive\r\n\r\n"));
    out.write_all(head.as_bytes())
}

/// A 200 answer: the JSON object `json` with a field `pad` first that brings it to `size`.
fn write_padded(out: &mut impl Write, json: &[u8], size: u64) -> std::io::Result<()> {
    write_padded_with(out, "200 OK", &[("Content-Type", "application/json")], json, size)
}

fn write_padded_with(
    out: &mut impl Write,
    status: &str,
    headers: &[(&str, &str)],
    json: &[u8],
    size: u64,
) -> std::io::Result<()> {
    let (open, close) = (b"{\"pad\":\"", b"\",");
    let pad = size - (open.len() + close.len() + json.len() - 1) as u64;
    write_head(out, status, headers, size)?;
    out.write_all(open)?;
    let chunk = vec![b'a'; 1 << 20];
    let mut left = pad;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        out.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    out.write_all(close)?;
    out.write_all(&json[1..])
}

/// What a [`measured`] run cost.
#[derive(Debug)]
struct Figures {
    /// The peak resident set of xtask and of every process it waited for (the registry
    /// client among them), from wait4's rusage, and of the registry client while it ran
    /// (its VmHWM, sampled), in MiB.
    peak_rss_mib: u64,
    /// The most bytes the store's directory held while it ran, in MiB.
    peak_disk_mib: u64,
    wall: Duration,
}

/// Bytes the files under `dir` take on disk.
fn disk_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(m) = e.path().symlink_metadata() else { continue };
            total += m.blocks() * 512;
            if m.is_dir() {
                todo.push(e.path());
            }
        }
    }
    total
}

/// Runs `cmd` (killed, and the test failed, after `secs`: a bound on liveness only) and
/// measures it: peak memory of it and its reaped children, peak disk under `watch`, time.
fn measured(mut cmd: Command, secs: u64, watch: &Path) -> (Run, Figures) {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let started = std::time::Instant::now();
    // Reaped by wait4 below, which gives its rusage (std's wait does not).
    #[allow(clippy::zombie_processes)]
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    let pid = child.id() as libc::pid_t;
    let (out, err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let out = std::thread::spawn(move || vm_tests::read_all(out));
    let err = std::thread::spawn(move || vm_tests::read_all(err));
    let mut peak_disk = 0;
    let mut status = 0;
    // SAFETY: a plain struct of integers, filled in by wait4.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let mut sampled = std::time::Instant::now() - Duration::from_secs(1);
    let mut peak_kib = 0;
    // The peaks are sampled from /proc (VmHWM, after exec: this process's own size is not
    // counted, as wait4's ru_maxrss counts the size a child had when it was forked).
    let vm_hwm_kib = |pid: u32| -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let hwm = status.lines().find_map(|l| l.strip_prefix("VmHWM:"));
        hwm.and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok()).unwrap_or(0)
    };
    let figures = |_: &libc::rusage, peak_kib: u64, peak_disk: u64| Figures {
        peak_rss_mib: peak_kib >> 10,
        peak_disk_mib: peak_disk >> 20,
        wall: started.elapsed(),
    };
    loop {
        // SAFETY: `pid` is our child, not yet reaped; the pointers are to locals.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if r == pid {
            break;
        }
        assert_eq!(r, 0, "wait4: {}", std::io::Error::last_os_error());
        peak_kib = peak_kib.max(vm_hwm_kib(pid as u32));
        if started.elapsed() > Duration::from_secs(secs) {
            // SAFETY: as above; the child is not reaped yet.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::wait4(pid, &mut status, 0, &mut usage);
            }
            let figures = figures(&usage, peak_kib, peak_disk);
            panic!("{cmd:?} was still running after {secs} s ({figures:?}); stderr: {}", err.join().unwrap());
        }
        if sampled.elapsed() >= Duration::from_millis(100) {
            peak_disk = peak_disk.max(disk_bytes(watch));
            for helper in vm_tests::children_named(pid as u32, "xtask-registry") {
                peak_kib = peak_kib.max(vm_hwm_kib(helper));
            }
            sampled = std::time::Instant::now();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let figures = figures(&usage, peak_kib, peak_disk);
    let code = if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { -1 };
    let run = Run { code, stdout: out.join().unwrap(), stderr: err.join().unwrap() };
    eprintln!("{:?}: {figures:?}", cmd.get_args().collect::<Vec<_>>());
    (run, figures)
}

/// Builds the registry client as xtask does (the same command, so that xtask's own is a
/// no-op), once: compiling it is not what a measured run is about.
fn registry_client_built() {
    static BUILT: std::sync::Once = std::sync::Once::new();
    BUILT.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let target = vm_tests::store_dir().parent().unwrap().to_path_buf();
        let status = Command::new(cargo)
            .current_dir(vm_tests::workspace_root())
            .args(["build", "--quiet", "--package", "vm-xtask-registry", "--bin", "xtask-registry", "--target-dir"])
            .arg(target)
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("CARGO_BUILD_TARGET")
            .status()
            .expect("running cargo");
        assert!(status.success(), "building xtask-registry");
    });
}

/// The most memory a lookup may cost xtask or its registry client, whatever the registry.
const MAX_RSS_MIB: u64 = 256;

impl Store {
    /// `xtask ARGS` in this store, with `substitutes`, measured.
    fn measured(&self, args: &[&str], substitutes: &str, secs: u64) -> (Run, Figures) {
        registry_client_built();
        let mut cmd = Command::new(vm_tests::xtask_bin());
        cmd.args(args)
            .env("XTASK_VMSTORE", self.root())
            .env("XTASK_STORE_CONFIG", self.dir.path().join("vmstore.conf"))
            .env("XTASK_SUBSTITUTES", substitutes);
        measured(cmd, secs, &self.root())
    }

    /// `store pull ITEM --from FROM` is refused (exit 1, saying `why`) within bounded
    /// memory, nothing of `item` is left, and the store is sound.
    fn assert_pull_refused_cheaply(&self, item: &str, from: &str, why: &str) -> Figures {
        let (run, figures) = self.measured(&["store", "pull", item, "--from", from], "", 120);
        assert_eq!(run.code, 1, "{run:#?}");
        assert!(run.stderr.contains(why), "{run:#?}");
        assert!(!self.items().iter().any(|n| n == item), "{:?}", self.items());
        assert!(figures.peak_rss_mib < MAX_RSS_MIB && figures.wall < Duration::from_secs(120), "{figures:?}");
        self.assert_sound();
        figures
    }

    /// A substitute from `from` is refused (a warning saying `why`) within bounded memory,
    /// and the item is built here.
    fn assert_substitute_refused_cheaply(&self, from: &str, why: &str) -> Figures {
        let (run, figures) = self.measured(&["store", "registry-program"], from, 120);
        run.expect_code(0);
        assert!(run.stderr.contains(why) && run.stderr.contains("building it here"), "{run:#?}");
        assert!(figures.peak_rss_mib < MAX_RSS_MIB, "{figures:?}");
        self.assert_sound();
        figures
    }
}

/// A registry pushed the small closure to, the item, and the trusted key.
fn pushed_registry() -> (Registry, String, String) {
    let registry = Registry::start(None);
    let keys = tempfile::tempdir().unwrap();
    let (key, public) = keygen(keys.path(), "team");
    let item = small_closure();
    push(&item, &registry.repo("team/vmstore"), &key).expect_code(0);
    (registry, item, public)
}

#[test]
fn a_huge_manifest_or_token_answer_is_refused_within_a_small_cap() {
    let (registry, item, public) = pushed_registry();
    for lie in [Lie::HugeManifest, Lie::HugeToken] {
        let proxy = misbehaving_proxy(registry.port, lie);
        let from = format!("127.0.0.1:{proxy}/team/vmstore");
        let store = Store::new(&[&public], "timeout 2\n");
        let pulled = store.assert_pull_refused_cheaply(&item, &from, "over 1048576 bytes");
        let store = Store::new(&[&public], "timeout 2\n");
        let built = store.assert_substitute_refused_cheaply(&from, "over 1048576 bytes");
        eprintln!("{lie:?}: store pull {pulled:?}; substitute {built:?}");
    }
}

#[test]
fn a_layer_swapped_for_a_multi_gib_one_is_refused_before_it_is_fetched() {
    let (registry, item, public) = pushed_registry();
    let proxy = misbehaving_proxy(registry.port, Lie::HugeLayer);
    let from = format!("127.0.0.1:{proxy}/team/vmstore");
    let store = Store::new(&[&public], "timeout 2\n");
    let pulled = store.assert_pull_refused_cheaply(&item, &from, "wrongly signed");
    // Refused before the layer: nothing of it reached the disk.
    assert!(pulled.peak_disk_mib < 64, "{pulled:?}");
    let store = Store::new(&[&public], "timeout 2\n");
    let built = store.assert_substitute_refused_cheaply(&from, "wrongly signed");
    eprintln!("HugeLayer: store pull {pulled:?}; substitute {built:?}");
}

#[test]
fn a_registry_answering_a_byte_a_second_is_given_up_on_at_the_deadline() {
    let (registry, item, public) = pushed_registry();
    let proxy = misbehaving_proxy(registry.port, Lie::DripLayers);
    let from = format!("127.0.0.1:{proxy}/team/vmstore");
    // `timeout 1`: `store pull` gives a lookup 6 s, a layer three lookups and a second
    // per MiB. A substitute is given a sixth of that: `timeout 2` (a second between
    // bytes is then no read timeout: the deadline ends it).
    let store = Store::new(&[&public], "timeout 1\n");
    let pulled = store.assert_pull_refused_cheaply(&item, &from, "no answer within");
    let store = Store::new(&[&public], "timeout 2\n");
    let built = store.assert_substitute_refused_cheaply(&from, "no answer within");
    eprintln!("DripLayers: store pull {pulled:?}; substitute {built:?}");
}
