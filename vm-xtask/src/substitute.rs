//! Sharing store items through OCI registries: `store push`/`store pull`, and
//! substitutes (a missing item is looked up in the configured registries before it is
//! built). The registry protocol, compression and ed25519 live in a separate workspace
//! binary, `xtask-registry` (`store-registry/`), built on first use and driven over
//! stdin/stdout, so xtask's own build stays small; the store logic stays here.
//!
//! What comes back is checked before anything enters the store: the helper reads the
//! manifest with a small cap, verifies the signature over (item file name, content
//! sha256, `.meta`, layer digest and size) against the trusted keys before it downloads
//! the layer (at most the signed size, within a deadline that grows with the signed
//! size only) and unpacks it with checked names into scratch space;
//! here the `.meta` must give the item's recipe hash (and equal the recipe being built),
//! the unpacked tree is ingested through directory descriptors ([`store::ingest`]), and
//! the commit refuses content whose hash is not the signed one.

use fs_err as fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::json;

use crate::store::{self, ingest, DirFd, Item, Kind, Meta, Recipe, Store};
use crate::Workspace;

/// The workspace file that configures substitutes and trusted keys (in the workspace's
/// root), unless `XTASK_STORE_CONFIG` names another.
pub const CONFIG_FILE: &str = "vmstore.conf";
pub const CONFIG_ENV: &str = "XTASK_STORE_CONFIG";
/// Registries to look substitutes up in, separated by spaces; replaces the file's
/// `substitute` lines (empty: none).
pub const SUBSTITUTES_ENV: &str = "XTASK_SUBSTITUTES";
/// The signing key `store push` uses when `--key` is not given.
pub const SIGNING_KEY_ENV: &str = "XTASK_SIGNING_KEY";
/// The helper's package and binary.
pub const HELPER: &str = "xtask-registry";
/// How long a registry may take to answer a lookup by default.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest item accepted from a registry (unpacked, and its compressed layer).
pub const MAX_ITEM_BYTES: u64 = 64 << 30;

/// The keys a signature is checked against: the trusted ones, and the revoked ones
/// (refused even if also trusted), each `NAME:BASE64`.
pub type Keys<'a> = (&'a [String], &'a [String]);

/// A registry and repository: `[http://|https://]HOST[:PORT]/REPOSITORY`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registry {
    pub registry: String,
    pub repository: String,
    /// Plain HTTP: `http://`, or a loopback host without a scheme.
    pub insecure: bool,
}

impl std::fmt::Display for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)
    }
}

impl Registry {
    /// Parses a registry reference, naming it in the error.
    pub fn parse(text: &str) -> Result<Registry> {
        let bad = |why: &str| anyhow::anyhow!("registry `{}` {why}", text.escape_debug());
        let (scheme, rest) = match text.split_once("://") {
            Some(("http", rest)) => (Some(true), rest),
            Some(("https", rest)) => (Some(false), rest),
            Some(_) => return Err(bad("has a scheme other than http:// or https://")),
            None => (None, text),
        };
        let (host, repository) =
            rest.split_once('/').ok_or_else(|| bad("is not REGISTRY/REPOSITORY (e.g. 127.0.0.1:5000/team/store)"))?;
        let (name, port) = match host.rsplit_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (host, None),
        };
        let name_ok = !name.is_empty()
            && name.len() <= 253
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
        if !name_ok {
            return Err(bad("has an invalid host name (letters, digits, `.` and `-`)"));
        }
        if port.is_some_and(|p| p.parse::<u16>().ok().filter(|p| *p > 0).is_none()) {
            return Err(bad("has an invalid port (1 to 65535)"));
        }
        // The distribution spec's repository names: lowercase components joined by `/`.
        let component_ok = |c: &str| {
            !c.is_empty()
                && c.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
                && c.as_bytes()[0].is_ascii_alphanumeric()
                && c.as_bytes()[c.len() - 1].is_ascii_alphanumeric()
        };
        if repository.len() > 255 || !repository.split('/').all(component_ok) {
            return Err(bad("has an invalid repository (lowercase letters, digits, `.`, `_`, `-`, joined by `/`)"));
        }
        // Loopback: `localhost` or an IPv4 literal in 127.0.0.0/8; a host *name* such as
        // `127.0.0.1.example.org` is not.
        let loopback = name == "localhost" || name.parse::<std::net::Ipv4Addr>().is_ok_and(|ip| ip.is_loopback());
        if scheme == Some(true) && !loopback {
            return Err(bad(
                "asks for plain HTTP to a host that is not this machine's loopback (`localhost`, 127.x.y.z): \
                 a registry elsewhere is reached over HTTPS only; drop `http://`",
            ));
        }
        Ok(Registry {
            registry: host.to_string(),
            repository: repository.to_string(),
            insecure: scheme.unwrap_or(loopback),
        })
    }
}

/// The workspace's configuration of substitutes.
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub substitutes: Vec<Registry>,
    /// `NAME:BASE64` public keys whose signatures are trusted.
    pub trusted: Vec<String>,
    /// `NAME:BASE64` public keys whose signatures are refused, even if also trusted.
    pub revoked: Vec<String>,
    pub timeout: Option<Duration>,
    /// Where it was read from, for messages.
    pub source: String,
}

impl Config {
    /// How long `store pull` gives a registry to answer a lookup: six lookup timeouts.
    pub fn pull_timeout(&self) -> Duration {
        self.timeout.unwrap_or(DEFAULT_TIMEOUT) * 6
    }

    /// The configuration: [`CONFIG_FILE`] (or `XTASK_STORE_CONFIG`), then
    /// `XTASK_SUBSTITUTES`. A file that does not exist is an empty configuration.
    pub fn load(ws: &Workspace) -> Result<Config> {
        let path = std::env::var_os(CONFIG_ENV).map(PathBuf::from).unwrap_or_else(|| ws.root.join(CONFIG_FILE));
        let mut config = match fs::read_to_string(&path) {
            Ok(text) => Config::parse(&text).with_context(|| format!("in `{}`", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Config::default(),
            Err(e) => return Err(e).context("reading the store's configuration"),
        };
        config.source = path.display().to_string();
        if let Some(list) = std::env::var_os(SUBSTITUTES_ENV) {
            let list = list.to_string_lossy().into_owned();
            config.substitutes = list
                .split_whitespace()
                .map(Registry::parse)
                .collect::<Result<_>>()
                .with_context(|| format!("in {SUBSTITUTES_ENV}"))?;
        }
        Ok(config)
    }

    /// `substitute REGISTRY/REPOSITORY`, `trusted-key NAME:BASE64`, `timeout SECONDS`
    /// lines; `#` comments and blank lines.
    pub fn parse(text: &str) -> Result<Config> {
        let mut config = Config::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let at = || format!("line {}", n + 1);
            let (key, value) = line.split_once(char::is_whitespace).map(|(k, v)| (k, v.trim())).unwrap_or((line, ""));
            match key {
                "substitute" => config.substitutes.push(Registry::parse(value).with_context(at)?),
                "trusted-key" => {
                    check_public_key(value).with_context(at)?;
                    config.trusted.push(value.to_string());
                }
                "revoked-key" => {
                    check_public_key(value).with_context(at)?;
                    config.revoked.push(value.to_string());
                }
                "timeout" => {
                    let secs: u64 = value
                        .parse()
                        .ok()
                        .filter(|s| (1..=3600).contains(s))
                        .with_context(|| format!("{}: timeout {value:?} is not 1 to 3600 seconds", at()))?;
                    config.timeout = Some(Duration::from_secs(secs));
                }
                other => bail!("{}: unknown setting `{}`", at(), other.escape_debug()),
            }
        }
        Ok(config)
    }
}

/// A public key's form: `NAME:BASE64` (32 bytes, so 44 characters of base64).
pub fn check_public_key(key: &str) -> Result<()> {
    let ok = key.split_once(':').is_some_and(|(name, b64)| {
        !name.is_empty()
            && name.len() <= 64
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            && b64.len() == 44
            && b64.ends_with('=')
            && b64.bytes().all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b))
    });
    if !ok {
        bail!("`{}` is not a public key (NAME:BASE64, as `store keygen` writes)", key.escape_debug());
    }
    Ok(())
}

/// The helper's answer to one request.
#[derive(Debug, Deserialize, Default)]
pub struct Answer {
    pub ok: bool,
    pub why: Option<String>,
    pub error: Option<String>,
    pub pushed: Option<bool>,
    #[serde(default)]
    pub bytes: u64,
    pub meta: Option<String>,
    pub content_sha256: Option<String>,
    pub layer_bytes: Option<u64>,
    /// Set here, not by the client: it gave no answer in time and was killed.
    #[serde(skip)]
    pub given_up: bool,
}

/// The registry client gave no answer in time and was killed (mid-transfer, or on a
/// lookup): the registry is not asked again by this process.
#[derive(Debug)]
pub struct GivenUp(pub String);

impl std::fmt::Display for GivenUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for GivenUp {}

impl Answer {
    /// What went wrong, as a sentence.
    pub fn says(&self) -> String {
        let error = self.error.clone().unwrap_or_default();
        match self.why.as_deref() {
            Some("unsigned") => format!("refused: unsigned ({error})"),
            Some("unknown-key") => format!("refused: signed by an unknown key ({error})"),
            Some("bad-signature") => format!("refused: wrongly signed ({error})"),
            Some("revoked") => format!("refused: signed by a revoked key ({error})"),
            Some("altered") => format!("refused: altered content ({error})"),
            Some("oversized") => format!("refused: too large ({error})"),
            Some("missing") => format!("not in the registry ({error})"),
            Some("unreachable") => format!("registry unreachable ({error})"),
            _ => error,
        }
    }
}

/// A running `xtask-registry`.
pub struct Helper {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<std::io::Result<String>>,
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Builds `xtask-registry` (cargo, into the workspace's target directory) once per
/// process, from the source of the `vm-xtask-registry` crate this engine was built with
/// (wherever cargo keeps it, never the workspace's own crates; a packaged one from a copy,
/// [`standalone_source`](crate::sources::standalone_source)), and returns its path.
pub fn helper_program(ws: &Workspace) -> Result<PathBuf> {
    static BUILT: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let source = crate::sources::standalone_source(
                std::path::Path::new(vm_xtask_registry::SOURCE_DIR),
                &ws.target_dir.join("registry-client-source"),
            )
            .map_err(|e| format!("{e:#}"))?;
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let mut cmd = crate::process::command(cargo);
            cmd.current_dir(&source)
                .args(["build", "--quiet", "--manifest-path"])
                .arg(source.join("Cargo.toml"))
                .args(["--package", "vm-xtask-registry", "--bin", HELPER, "--features", "client", "--target-dir"])
                .arg(&ws.target_dir)
                .env_remove("RUSTFLAGS")
                .env_remove("CARGO_ENCODED_RUSTFLAGS")
                .env_remove("CARGO_BUILD_TARGET");
            let _step = crate::progress::step("building the registry client (xtask-registry), once");
            crate::process::run(&cmd).map_err(|e| format!("{e:#}"))?;
            Ok(ws.target_dir.join("debug").join(HELPER))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

impl Helper {
    pub fn start(ws: &Workspace) -> Result<Helper> {
        let program = helper_program(ws)?;
        let mut child = crate::process::command(&program)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting `{}`", program.display()))?;
        let stdin = child.stdin.take().context("the helper's stdin")?;
        let stdout = child.stdout.take().context("the helper's stdout")?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Helper { child, stdin, lines })
    }

    /// Sends one request and waits for its answer, at most `timeout` (then the helper is
    /// killed: it is not used again).
    pub fn call(&mut self, request: &serde_json::Value, timeout: Option<Duration>) -> Result<Answer> {
        let line = serde_json::to_string(request)?;
        writeln!(self.stdin, "{line}").and_then(|()| self.stdin.flush()).context("writing to the registry client")?;
        let got = match timeout {
            Some(t) => self.lines.recv_timeout(t),
            None => self.lines.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match got {
            Ok(Ok(line)) => serde_json::from_str(&line).context("parsing the registry client's answer"),
            Ok(Err(e)) => Err(e).context("reading the registry client's answer"),
            Err(RecvTimeoutError::Timeout) => {
                let _ = self.child.kill();
                Ok(Answer {
                    why: Some("unreachable".into()),
                    error: Some(format!("no answer within {} s", timeout.unwrap_or_default().as_secs())),
                    given_up: true,
                    ..Answer::default()
                })
            }
            Err(RecvTimeoutError::Disconnected) => bail!("the registry client exited"),
        }
    }
}

fn at(registry: &Registry, tag: &str, timeout: Duration) -> serde_json::Value {
    json!({
        "registry": registry.registry,
        "repository": registry.repository,
        "tag": tag,
        "insecure": registry.insecure,
        "timeout_ms": timeout.as_millis() as u64,
    })
}

/// A pull request for `file_name`, into `dir` (or only the record), that the helper
/// gives up at `deadline` (a total, not per read).
fn pull_request(
    (registry, file_name, keys): (&Registry, &str, Keys),
    timeout: Duration,
    deadline: Duration,
    dir: Option<&Path>,
) -> serde_json::Value {
    let hash = file_name.split('-').next().unwrap_or_default();
    with(
        at(registry, hash, timeout),
        json!({
            "op": "pull",
            "item": file_name,
            "trusted": keys.0,
            "revoked": keys.1,
            "dir": dir,
            "max_bytes": MAX_ITEM_BYTES,
            "deadline_ms": deadline.as_millis() as u64,
        }),
    )
}

/// How long xtask waits for the helper past a request's deadline (which the helper keeps
/// itself) before it kills it.
const GRACE: Duration = Duration::from_secs(2);

/// The deadline of fetching an item whose layer is signed as `layer_bytes` long: three
/// timeouts and a second per MiB.
fn fetch_deadline(timeout: Duration, layer_bytes: Option<u64>) -> Duration {
    timeout * 3 + Duration::from_secs(layer_bytes.unwrap_or(0) / MIN_BYTES_PER_S)
}

fn with(mut base: serde_json::Value, more: serde_json::Value) -> serde_json::Value {
    if let (Some(b), serde_json::Value::Object(m)) = (base.as_object_mut(), more) {
        b.extend(m);
    }
    base
}

/// Why the file `key` is not a secret key `store push` can sign with (a public key, say),
/// if it is not: the helper reads it as it would to sign.
pub fn check_secret_key(ws: &Workspace, key: &Path) -> Result<std::result::Result<(), String>> {
    let mut helper = Helper::start(ws)?;
    let answer = helper.call(&json!({"op": "check-key", "key": key}), None)?;
    Ok(if answer.ok { Ok(()) } else { Err(answer.error.unwrap_or_default()) })
}

/// Makes a key pair with the helper: `secret` (mode 0600) and `secret.pub`.
pub fn keygen(ws: &Workspace, name: &str, secret: &Path) -> Result<PathBuf> {
    let public = PathBuf::from(format!("{}.pub", secret.display()));
    let mut helper = Helper::start(ws)?;
    let answer = helper.call(&json!({"op": "keygen", "name": name, "secret": secret, "public": public}), None)?;
    if !answer.ok {
        bail!("{}", answer.says());
    }
    Ok(public)
}

/// What a push or a pull moved.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Moved {
    /// Items sent or received.
    pub items: u64,
    /// Items the other side had already.
    pub present: u64,
    pub bytes: u64,
}

/// Pushes `items` (in this order: references first) to `registry`, signed with `key`.
/// A tag already there is kept only if its signature verifies (by `key`, or a key
/// trusted and not revoked in the configuration); any other is replaced.
pub fn push(ws: &Workspace, store: &Store, registry: &Registry, items: &[Item], key: &Path) -> Result<Moved> {
    let mut helper = Helper::start(ws)?;
    let mut moved = Moved::default();
    let config = Config::load(ws)?;
    let timeout = config.timeout.unwrap_or(DEFAULT_TIMEOUT) * 6;
    for item in items {
        let meta = store.meta_bytes(item)?;
        let parsed: Meta =
            serde_json::from_slice(&meta).with_context(|| format!("parsing the record of `{}`", item.name))?;
        // A signature vouches for the content: what is signed is what is here now.
        if store::hash_path(&item.path)? != parsed.content_sha256 {
            bail!(
                "`{}` does not match its recorded hash (damaged?); `cargo xtask store verify --repair` first",
                item.file_name()
            );
        }
        let request = with(
            at(registry, &item.hash, timeout),
            json!({
                "op": "push",
                "item": item.file_name(),
                "path": item.path,
                "meta": String::from_utf8(meta).context("a .meta that is not UTF-8")?,
                "content_sha256": parsed.content_sha256,
                "key": key,
                "trusted": config.trusted,
                "revoked": config.revoked,
            }),
        );
        let answer = helper.call(&request, None)?;
        if !answer.ok {
            bail!("pushing `{}` to `{registry}`: {}", item.file_name(), answer.says());
        }
        match answer.pushed {
            Some(true) => moved.items += 1,
            _ => moved.present += 1,
        }
        moved.bytes += answer.bytes;
        if crate::progress::shown() {
            let what = if answer.pushed == Some(true) { "pushed" } else { "already there:" };
            eprintln!("{what} {}", item.file_name());
        }
    }
    Ok(moved)
}

/// The slowest transfer a substitute may take: a registry slower than this is given up
/// on (and the item built here).
const MIN_BYTES_PER_S: u64 = 1 << 20;

/// A verified `.meta` from a registry: it names `file_name` (its recipe's hash and name)
/// and records the content sha256 that was signed.
fn checked_meta(file_name: &str, answer: &Answer) -> Result<(Recipe, String)> {
    let text = answer.meta.as_deref().context("no .meta in the answer")?;
    let meta: Meta = serde_json::from_str(text).context("the `.meta` is not a store record")?;
    let recipe = Store::recipe_of(&meta);
    let named = format!("{}-{}", recipe.hash(), recipe.name());
    if named != file_name {
        bail!("refused: altered record: its recipe makes `{named}`, not `{file_name}`");
    }
    let signed = answer.content_sha256.as_deref().unwrap_or_default();
    if meta.content_sha256 != signed {
        bail!("refused: altered record: it records content {}, the signature {signed}", meta.content_sha256);
    }
    Ok((recipe, meta.content_sha256))
}

/// Downloads `file_name` from `registry` into scratch space, the whole answer awaited at
/// most `deadline`, checks its record again ([`checked_meta`]) and ingests it into `tmp`
/// (which must not exist). Returns the bytes received; a refusal or failure is an error
/// whose text says which.
fn fetch_into(
    store: &Store,
    helper: &mut Helper,
    what: (&Registry, &str, Keys),
    timeout: Duration,
    deadline: Duration,
    tmp: &Path,
) -> Result<u64> {
    let scratch = store.scratch("pull")?;
    let file_name = what.1;
    let request = pull_request(what, timeout, deadline, Some(scratch.path()));
    let answer = helper.call(&request, Some(deadline + GRACE))?;
    if answer.given_up {
        return Err(GivenUp(answer.says()).into());
    }
    if !answer.ok {
        bail!("{}", answer.says());
    }
    checked_meta(file_name, &answer)?;
    ingest_pulled(scratch.path(), tmp)?;
    Ok(answer.bytes)
}

/// Copies `scratch/item` (a file or a directory the helper unpacked from a layer) into
/// `to` through directory descriptors, as a guest's output is ingested.
fn ingest_pulled(scratch: &Path, to: &Path) -> Result<()> {
    let dir = DirFd::open(scratch).with_context(|| format!("opening `{}`", scratch.display()))?;
    let name = std::ffi::OsStr::new("item");
    let st = dir.stat(name).context("the pulled item")?;
    let limits = ingest::Limits::output(MAX_ITEM_BYTES);
    match Kind::of(&st) {
        Kind::Dir => {
            let src = dir.open_dir(name).context("opening the pulled item")?;
            ingest::copy_dir_with(&src, "the pulled item", to, &limits, ingest::Links::Any)?;
        }
        Kind::File => {
            let mut from = dir.open_file(name).context("opening the pulled item")?;
            let mode = if st.st_mode & 0o111 != 0 { 0o700 } else { 0o600 };
            let (parent, file) = store::split_path(to)?;
            let mut out = DirFd::open(parent)?.create_file(file, mode).context("copying the pulled item")?;
            std::io::copy(&mut from, &mut out).context("copying the pulled item")?;
        }
        _ => bail!("the pulled item is neither a file nor a directory"),
    }
    Ok(())
}

/// Pulls `file_name` and its closure from `registry` into `store`: references first,
/// each item committed only once it is whole and verified. Each record is looked up
/// within `timeout` (in all), each item fetched within [`fetch_deadline`]. Returns the
/// item.
pub fn pull(
    store: &Store,
    helper: &mut Helper,
    (registry, keys, timeout): (&Registry, Keys, Duration),
    file_name: &str,
    moved: &mut Moved,
) -> Result<Item> {
    // A reference comes from the registry's record: checked before it names a path.
    if let Err(why) = store::check_item_file_name(file_name) {
        bail!("pulling `{}` from `{registry}`: not an item's file name: {why}", file_name.escape_debug());
    }
    if let Some(item) = store.lookup(file_name) {
        moved.present += 1;
        return Ok(item);
    }
    let request = pull_request((registry, file_name, keys), timeout, timeout, None);
    let answer = helper.call(&request, Some(timeout + GRACE))?;
    if !answer.ok {
        bail!("pulling `{file_name}` from `{registry}`: {}", answer.says());
    }
    let (recipe, content) = checked_meta(file_name, &answer).with_context(|| format!("pulling `{file_name}`"))?;
    for reference in Store::references(&recipe) {
        pull(store, helper, (registry, keys, timeout), &reference, moved)?;
    }
    let mut got = 0;
    let deadline = fetch_deadline(timeout, answer.layer_bytes);
    let (item, _) = store
        .insert_verified(&recipe, &content, |tmp| {
            got = fetch_into(store, helper, (registry, file_name, keys), timeout, deadline, tmp)?;
            Ok(())
        })
        .with_context(|| format!("pulling `{file_name}` from `{registry}`"))?;
    moved.items += 1;
    moved.bytes += got;
    if crate::progress::shown() {
        eprintln!("pulled {file_name}");
    }
    Ok(item)
}

/// The registries of the workspace's configuration, as the store's [`Substitutes`]: a
/// helper started on first need, and the registries found unreachable (not asked again).
pub struct Registries {
    state: Mutex<RegistriesState>,
}

struct RegistriesState {
    /// Where the registry client is built.
    ws: Workspace,
    config: Config,
    helper: Option<Helper>,
    down: Vec<Registry>,
}

/// The workspace's configured registries (`vmstore.conf`, `XTASK_SUBSTITUTES`), loaded
/// once per process and shared by every store opened with them; `None` when there are
/// none (or the configuration is broken: said once, as a warning).
pub fn configured(ws: &Workspace) -> Option<Arc<dyn crate::store::Substitutes>> {
    static STATE: OnceLock<Option<Arc<Registries>>> = OnceLock::new();
    let registries = STATE.get_or_init(|| match Config::load(ws) {
        Ok(config) if !config.substitutes.is_empty() => Some(Arc::new(Registries::new(ws, config))),
        Ok(_) => None,
        Err(e) => {
            eprintln!("warning: substitutes are off: {e:#}");
            None
        }
    });
    registries.clone().map(|r| r as Arc<dyn crate::store::Substitutes>)
}

/// The registry `registry` alone as the store's [`Substitutes`], with the workspace's
/// trusted and revoked keys (`store pull --system`).
pub fn only(ws: &Workspace, registry: &Registry) -> Result<Arc<dyn crate::store::Substitutes>> {
    let config = Config { substitutes: vec![registry.clone()], ..Config::load(ws)? };
    Ok(Arc::new(Registries::new(ws, config)))
}

impl Registries {
    fn new(ws: &Workspace, config: Config) -> Registries {
        Registries { state: Mutex::new(RegistriesState { ws: ws.clone(), config, helper: None, down: Vec::new() }) }
    }
}

impl crate::store::Substitutes for Registries {
    /// Looks `item` up in the configured registries and commits it at `tmp` when one has
    /// it, signed by a trusted key, with the content the signature names. Any failure is a
    /// warning (then the item is built here).
    fn substitute(&self, store: &Store, recipe: &Recipe, item: &Item, tmp: &Path) -> Option<u64> {
        substitute(&self.state, store, recipe, item, tmp)
    }
}

/// Called by the store, with the item's lock held, before it builds `item`: looks it up
/// in the configured registries and commits it at `tmp` when one has it, signed by a
/// trusted key, with the content the signature names. Any failure is a warning (then the
/// item is built here); the bytes received when the item is now in the store.
fn substitute(state: &Mutex<RegistriesState>, store: &Store, recipe: &Recipe, item: &Item, tmp: &Path) -> Option<u64> {
    let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
    let timeout = state.config.timeout.unwrap_or(DEFAULT_TIMEOUT);
    let file_name = item.file_name();
    for registry in state.config.substitutes.clone() {
        if state.down.contains(&registry) {
            continue;
        }
        let (trusted, revoked) = (state.config.trusted.clone(), state.config.revoked.clone());
        let keys = (trusted.as_slice(), revoked.as_slice());
        let warn =
            |what: &str| eprintln!("warning: substitute `{file_name}` from `{registry}`: {what}; building it here");
        if state.helper.is_none() {
            match Helper::start(&state.ws) {
                Ok(h) => state.helper = Some(h),
                Err(e) => {
                    // Said once: without the client no registry can be asked.
                    warn(&format!("{e:#}"));
                    state.down = state.config.substitutes.clone();
                    return None;
                }
            }
        }
        let helper = state.helper.as_mut().expect("started above");
        // The record first, within the timeout: a registry that is down or slow costs
        // one timeout, once per process.
        let request = pull_request((&registry, &file_name, keys), timeout, timeout, None);
        let answer = match helper.call(&request, Some(timeout + GRACE)) {
            Ok(a) => a,
            Err(e) => {
                state.helper = None;
                warn(&format!("{e:#}"));
                continue;
            }
        };
        if !answer.ok {
            match answer.why.as_deref() {
                Some("missing") => {}
                Some("unreachable") => {
                    warn(&answer.says());
                    state.down.push(registry.clone());
                    if answer.given_up {
                        state.helper = None;
                    }
                }
                _ => warn(&answer.says()),
            }
            continue;
        }
        let checked = checked_meta(&file_name, &answer).and_then(|(pulled, content)| {
            if pulled.encode() != recipe.encode() {
                bail!("refused: altered record: it is not this recipe");
            }
            Ok(content)
        });
        let content = match checked {
            Ok(c) => c,
            Err(e) => {
                warn(&format!("{e:#}"));
                continue;
            }
        };
        let _step = crate::progress::step(&format!("fetching `{}` from `{registry}`", item.name));
        let mut bytes = 0;
        // However slowly a registry sends, the build goes on here after this long (the
        // layer's size is signed: a registry cannot stretch it).
        let deadline = fetch_deadline(timeout, answer.layer_bytes);
        let filled = store.fill(recipe, item, tmp, Some(&content), |tmp| {
            let at = (&registry, file_name.as_str(), keys);
            bytes = fetch_into(store, helper, at, timeout, deadline, tmp)?;
            Ok(())
        });
        match filled {
            Ok(()) => return Some(bytes),
            Err(e) => {
                warn(&format!("{e:#}"));
                // A helper given up on mid-transfer was killed: start another next time.
                if e.chain().any(|c| c.is::<GivenUp>()) {
                    state.helper = None;
                    state.down.push(registry.clone());
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_references_are_checked() {
        let r = Registry::parse("127.0.0.1:5000/team/store").unwrap();
        assert_eq!((r.registry.as_str(), r.repository.as_str(), r.insecure), ("127.0.0.1:5000", "team/store", true));
        assert!(!Registry::parse("registry.example.org/a").unwrap().insecure);
        assert!(!Registry::parse("https://localhost/a").unwrap().insecure);
        assert!(Registry::parse("localhost:5000/a").unwrap().insecure);
        assert!(Registry::parse("127.1.2.3/a").unwrap().insecure);
        assert!(Registry::parse("http://127.0.0.1:5000/a").unwrap().insecure);
        // Names that only look like loopback are other hosts: HTTPS, and never plain HTTP.
        for host in ["127.0.0.1.nip.io", "127.evil.example", "127.0.0.256", "localhost.example.org", "128.0.0.1"] {
            assert!(!Registry::parse(&format!("{host}/a")).unwrap().insecure, "{host}");
            let err = Registry::parse(&format!("http://{host}/a")).unwrap_err().to_string();
            assert!(err.contains("plain HTTP"), "{host}: {err}");
        }
        assert!(Registry::parse("http://registry.example.org/a").is_err());
        for bad in [
            "",
            "host",
            "host/",
            "host/Upper",
            "ho st/a",
            "host/a b",
            "host/a,b",
            "host/a\nb",
            "host:0/a",
            "host:99999/a",
            "ftp://host/a",
            "host/a//b",
            "host/-a",
            "/a",
        ] {
            let err = Registry::parse(bad).unwrap_err().to_string();
            assert!(err.contains(&bad.escape_debug().to_string()), "{bad:?}: {err}");
        }
    }

    #[test]
    fn the_configuration_is_parsed_strictly() {
        let c = Config::parse(
            "# team\nsubstitute 127.0.0.1:5000/team/store\n\
             trusted-key ci:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\ntimeout 3\n",
        )
        .unwrap();
        assert_eq!(c.substitutes.len(), 1);
        assert_eq!(c.trusted, vec!["ci:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".to_string()]);
        assert_eq!(c.timeout, Some(Duration::from_secs(3)));
        let c = Config::parse("revoked-key ci:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n").unwrap();
        assert_eq!(c.revoked, vec!["ci:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".to_string()]);
        assert!(Config::parse("revoked-key ci:short").is_err());
        for bad in ["substitute nope", "trusted-key ci:short", "timeout 0", "frobnicate 1", "trusted-key a b:AAAA"] {
            assert!(Config::parse(bad).is_err(), "{bad}");
        }
    }
}
