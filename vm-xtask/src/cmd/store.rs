//! `cargo xtask store verify [--repair]`: re-hashes every store item against the hash
//! recorded when it was stored, and reports (or repairs) what does not match.
//! `store keygen`, `store push` and `store pull`: sharing items through an OCI registry
//! (see [`crate::substitute`]); `store registry-program`: a local registry from the store.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

use super::usage_error;
use crate::substitute::{self, Moved, Registry};

use crate::debian::{self, Pin};
use crate::store::{Meta, Store};
use crate::{lower::system, Workspace};

#[derive(Debug, Clone, clap::Subcommand)]
pub enum StoreCmd {
    /// Check every item against its recorded content hash; exit 1 if any is damaged.
    #[command(after_help = "Examples:
  cargo xtask store verify
  cargo xtask store verify --repair --json")]
    Verify {
        /// Remove damaged entries and rebuild the items that can be rebuilt on their own.
        #[arg(long)]
        repair: bool,
        /// Print one JSON document on stdout: the store, each problem, and with
        /// --repair what was removed and rebuilt and what is still damaged.
        #[arg(long)]
        json: bool,
    },
    /// Make an ed25519 key pair for signing pushed items: FILE (secret, mode 0600) and
    /// FILE.pub (the `trusted-key` line's value for vmstore.conf).
    #[command(after_help = "Examples:
  cargo xtask store keygen --name team-ci --out ~/.config/vmstore/team-ci.key")]
    Keygen {
        /// The key's name (letters, digits, `-`, `_`, `.`), recorded in each signature.
        #[arg(long)]
        name: String,
        /// Where to write the secret key; the public key goes to FILE.pub.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Push items, signed, to an OCI registry: one item (by its file name in the store), a
    /// system's items (what `run-vm --system NAME` and `vm-image --system NAME` use), or
    /// every item; each with its references, references first.
    #[command(after_help = "Examples:
  cargo xtask store push --system my-service --to registry.example.org/team/vmstore --key team-ci.key
  cargo xtask store push --all --to 127.0.0.1:5000/vmstore")]
    Push {
        /// An item's file name (`<hash>-<name>`).
        #[arg(conflicts_with_all = ["system", "all"], required_unless_present_any = ["system", "all"])]
        item: Option<String>,
        #[arg(long, conflicts_with = "all")]
        system: Option<String>,
        #[arg(long)]
        all: bool,
        /// REGISTRY/REPOSITORY (`http://` for a registry without TLS; loopback hosts use it by default).
        #[arg(long)]
        to: String,
        /// The secret key (default: $XTASK_SIGNING_KEY).
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
        /// Print one JSON document: items pushed, already there, bytes sent.
        #[arg(long)]
        json: bool,
    },
    /// Pull items from an OCI registry into the store: items by file name (with their
    /// references), or a system's items (as substitutes while lowering it as `push
    /// --system` does). Only items signed by a key trusted in vmstore.conf are taken.
    #[command(after_help = "Examples:
  cargo xtask store pull --system my-service --from registry.example.org/team/vmstore")]
    Pull {
        /// Items' file names (`<hash>-<name>`).
        #[arg(required_unless_present = "system", conflicts_with = "system")]
        items: Vec<String>,
        #[arg(long)]
        system: Option<String>,
        /// REGISTRY/REPOSITORY.
        #[arg(long)]
        from: String,
        /// Print one JSON document: items pulled, already present, bytes received.
        #[arg(long)]
        json: bool,
    },
    /// Print the path of Debian's docker-registry from the store (made on first use): a
    /// local OCI registry (`docker-registry serve CONFIG.yml`).
    #[command(after_help = "Example:
  cargo xtask store registry-program")]
    RegistryProgram,
    /// Print the path of Debian's gdb (`gdb-minimal`) from the store (made on first use):
    /// the debugger to attach to `run-vm --gdb` and `test --debug` with.
    #[command(after_help = "Example:
  cargo xtask store gdb-program      # then: GDB -ex 'target remote 127.0.0.1:PORT'")]
    GdbProgram,
}

/// What `store push --json` and `store pull --json` print.
#[derive(Debug, Serialize)]
pub struct MovedReport {
    pub registry: String,
    #[serde(flatten)]
    pub moved: Moved,
    /// `pull --system`: each item used, and how it came (`substituted`, `hit`, `built`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub how: Option<Vec<(String, String)>>,
    pub wall_s: f64,
}

/// What `store verify --json` prints.
#[derive(Debug, Default, Serialize)]
pub struct VerifyReport {
    pub store: String,
    /// Whether the store is sound at the end (after the repair, with --repair).
    pub ok: bool,
    /// What was found wrong.
    pub problems: Vec<ProblemReport>,
    /// With --repair: each damaged entry, removed, and whether it was rebuilt now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repaired: Option<Vec<RepairReport>>,
    /// With --repair: what is still damaged after it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub still_damaged: Option<Vec<ProblemReport>>,
    pub wall_s: f64,
}

#[derive(Debug, Serialize)]
pub struct ProblemReport {
    pub entry: String,
    pub what: String,
}

#[derive(Debug, Serialize)]
pub struct RepairReport {
    pub entry: String,
    pub rebuilt: bool,
}

fn problem_reports(problems: &[crate::store::Problem]) -> Vec<ProblemReport> {
    problems.iter().map(|p| ProblemReport { entry: p.entry.clone(), what: p.what.clone() }).collect()
}

impl StoreCmd {
    pub fn run(self, ws: &Workspace) -> Result<i32> {
        let started = std::time::Instant::now();
        let (repair, json) = match self {
            StoreCmd::Verify { repair, json } => (repair, json),
            StoreCmd::Keygen { name, out } => return keygen(ws, &name, &out),
            StoreCmd::Push { item, system, all, to, key, json } => {
                let what = match (item, system) {
                    (Some(item), _) => What::Item(item),
                    (None, Some(system)) => What::System(system),
                    (None, None) => {
                        debug_assert!(all, "clap requires one of them");
                        What::All
                    }
                };
                return push(ws, what, &to, key, json, started);
            }
            StoreCmd::Pull { items, system, from, json } => return pull(ws, &items, system, &from, json, started),
            StoreCmd::GdbProgram => {
                let store = crate::cmd::open_store(ws, false)?;
                println!("{}", crate::debian::gdb::program(&store)?.display());
                return Ok(0);
            }
            StoreCmd::RegistryProgram => {
                let store = crate::cmd::open_store(ws, false)?;
                let item = crate::debian::registry_server::from_store(&store)?;
                println!("{}", item.path.join("bin/docker-registry").display());
                return Ok(0);
            }
        };
        let store = crate::cmd::open_store(ws, false)?;
        let problems = store.verify()?;
        let mut report = VerifyReport {
            store: store.root().display().to_string(),
            problems: problem_reports(&problems),
            ..VerifyReport::default()
        };
        // Text lines on stdout, unless the JSON document is the result.
        let say = |line: String| {
            if !json {
                println!("{line}");
            }
        };
        let finish = |mut report: VerifyReport, ok: bool| -> Result<i32> {
            report.ok = ok;
            report.wall_s = started.elapsed().as_secs_f64();
            if json {
                crate::report::print_json(&report)?;
            }
            Ok(if ok { 0 } else { 1 })
        };
        for p in &problems {
            say(format!("{}: {}", p.entry, p.what));
        }
        if problems.is_empty() {
            say(format!("store verified: every item matches its recorded hash ({})", store.root().display()));
            return finish(report, true);
        }
        if !repair {
            eprintln!(
                "error: {} damaged store entries; `cargo xtask store verify --repair` removes and rebuilds them",
                problems.len()
            );
            return finish(report, false);
        }
        let mut entries: Vec<&str> = problems.iter().map(|p| p.entry.as_str()).collect();
        entries.dedup();
        // Read how each was made, remove them all, then rebuild: an item is never rebuilt
        // from a damaged input.
        let metas: Vec<(&str, Option<Meta>)> =
            entries.iter().map(|e| (*e, store.item_of_entry(e).and_then(|item| store.meta(&item).ok()))).collect();
        for entry in &entries {
            store.remove_entry(entry)?;
        }
        let mut repaired = Vec::new();
        for (entry, meta) in metas {
            let rebuilt = meta.as_ref().map(|m| rebuild(&store, m)).transpose()? == Some(true);
            match rebuilt {
                true => say(format!("{entry}: removed and rebuilt")),
                false => say(format!("{entry}: removed; it is rebuilt the next time it is needed")),
            }
            repaired.push(RepairReport { entry: entry.to_string(), rebuilt });
        }
        let left = store.verify()?;
        report.repaired = Some(repaired);
        report.still_damaged = Some(problem_reports(&left));
        if left.is_empty() {
            say("store repaired".to_string());
            finish(report, true)
        } else {
            for p in &left {
                eprintln!("still damaged: {}: {}", p.entry, p.what);
            }
            finish(report, false)
        }
    }
}

/// Rebuilds an item from its metadata alone, where its kind allows; `false` otherwise.
fn rebuild(store: &Store, meta: &Meta) -> Result<bool> {
    let param = |k: &str| meta.params.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
    match meta.kind.as_str() {
        "debian-package" => {
            let (Some(package), Some(version), Some(sha256)) = (param("package"), param("version"), param("sha256"))
            else {
                return Ok(false);
            };
            // The pool path, for a version apt no longer offers, is in the lock file.
            let locked = crate::debian::lock::read(&crate::debian::lock::path())?
                .into_values()
                .find(|p| p.package == package && p.version == version && p.sha256 == sha256);
            let pin = locked.unwrap_or(Pin { package, version, sha256, ..Pin::default() });
            debian::unpacked(store, &pin)?;
            Ok(true)
        }
        "busybox" => {
            let arch = param("arch").and_then(|a| os_configs::Arch::parse(&a)).unwrap_or_default();
            system::busybox(store, arch)?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

fn registry_arg(text: &str) -> Result<Registry> {
    Registry::parse(text).map_err(|e| usage_error(format!("{e:#}")))
}

fn keygen(ws: &Workspace, name: &str, out: &Path) -> Result<i32> {
    let name_ok =
        !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if !name_ok {
        return Err(usage_error(format!("key name `{}` must be 1 to 64 of A-Z a-z 0-9 - _ .", name.escape_debug())));
    }
    if out.exists() {
        return Err(usage_error(format!("`{}` exists; keygen does not overwrite a key", out.display())));
    }
    let public = substitute::keygen(ws, name, out)?;
    let key = fs_err::read_to_string(&public)?;
    eprintln!("secret key: {} (keep it secret; `store push --key` signs with it)", out.display());
    eprintln!("public key: {}; to trust it, add to vmstore.conf:", public.display());
    println!("trusted-key {}", key.trim());
    Ok(0)
}

/// The items `run-vm --system NAME` and `vm-image --system NAME` use, found in this
/// process by making them in `store` (asking `substitutes`, and only those), each with
/// how it came (`hit`, `built`, `substituted BYTES`).
pub fn system_items(
    ws: &Workspace,
    store: &Store,
    name: &str,
    substitutes: Option<std::sync::Arc<dyn crate::store::Substitutes>>,
) -> Result<Vec<(String, crate::store::Item)>> {
    let (store, recorder) = store.clone().with_substitutes(substitutes).recording();
    let system = super::lookup_system(name)?;
    crate::lower::validate::check_here(&system, &store, ws)?;
    crate::machine::realise_virtualized(&store, ws, &system)
        .with_context(|| format!("finding the items `run-vm --system {name}` uses"))?;
    /// `vm-image` with its defaults.
    #[derive(clap::Parser)]
    struct Defaults {
        #[command(flatten)]
        image: super::vm_image::VmImage,
    }
    let defaults = <Defaults as clap::Parser>::try_parse_from(["vm-image", "--system", name])
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    defaults.image.realise(ws, &store).with_context(|| format!("finding the items `vm-image --system {name}` uses"))?;
    let lines = recorder.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut items: Vec<(String, crate::store::Item)> = Vec::new();
    for line in lines {
        // `hit NAME`, `built NAME`, `substituted BYTES NAME`: how is all but the name.
        let (how, name) = line.rsplit_once(' ').context("a recorded line")?;
        let item = store.lookup(name).with_context(|| format!("`{name}` was used but is not in the store"))?;
        if !items.iter().any(|(_, i)| *i == item) {
            items.push((how.to_string(), item));
        }
    }
    Ok(items)
}

/// What `store push` pushes (with the closure of each).
enum What {
    Item(String),
    System(String),
    All,
}

fn push(
    ws: &Workspace,
    what: What,
    to: &str,
    key: Option<PathBuf>,
    json: bool,
    started: std::time::Instant,
) -> Result<i32> {
    let registry = registry_arg(to)?;
    let key = key.or_else(|| std::env::var_os(substitute::SIGNING_KEY_ENV).map(PathBuf::from)).ok_or_else(|| {
        usage_error(format!("no signing key: give --key FILE or set {}", substitute::SIGNING_KEY_ENV))
    })?;
    if !key.is_file() {
        return Err(usage_error(format!("the signing key `{}` is not a file", key.display())));
    }
    // NAME:BASE64, read as the helper reads it to sign: a public key is refused.
    if let Err(why) = substitute::check_secret_key(ws, &key)? {
        return Err(usage_error(format!("--key `{}`: {why}", key.display())));
    }
    let store = crate::cmd::open_store(ws, false)?;
    let roots = match what {
        What::Item(name) => vec![store.lookup(&name).ok_or_else(|| {
            usage_error(format!("`{}` is not an item in the store `{}`", name.escape_debug(), store.root().display()))
        })?],
        What::System(system) => system_items(ws, &store, &system, None)?.into_iter().map(|(_, i)| i).collect(),
        What::All => store.items()?,
    };
    let items = store.closure(&roots)?;
    let moved = substitute::push(ws, &store, &registry, &items, &key)?;
    report(&registry, moved, None, json, started, "pushed")
}

fn pull(
    ws: &Workspace,
    items: &[String],
    system: Option<String>,
    from: &str,
    json: bool,
    started: std::time::Instant,
) -> Result<i32> {
    let registry = registry_arg(from)?;
    // Every name is checked before anything is fetched: none becomes a path unchecked.
    for name in items {
        if let Err(why) = crate::store::check_item_file_name(name) {
            return Err(usage_error(format!(
                "`{}` is not an item's file name (<hash>-<name>): {why}",
                name.escape_debug()
            )));
        }
    }
    let config = substitute::Config::load(ws).map_err(|e| usage_error(format!("{e:#}")))?;
    if config.trusted.is_empty() {
        return Err(usage_error(format!(
            "no trusted keys in `{}`: add a `trusted-key NAME:BASE64` line (from `store keygen`)",
            config.source
        )));
    }
    let store = crate::cmd::open_store(ws, false)?;
    let mut moved = Moved::default();
    let mut how = None;
    if let Some(system) = system {
        let used = system_items(ws, &store, &system, Some(substitute::only(ws, &registry)?))?;
        for (came, _) in &used {
            match came.split_once(' ') {
                Some(("substituted", bytes)) => {
                    moved.items += 1;
                    moved.bytes += bytes.parse::<u64>().unwrap_or(0);
                }
                _ => moved.present += 1,
            }
        }
        let word = |came: String| came.split(' ').next().unwrap_or_default().to_string();
        how = Some(used.into_iter().map(|(came, item)| (item.file_name(), word(came))).collect());
    } else {
        let mut helper = substitute::Helper::start(ws)?;
        for name in items {
            let how = (&registry, (config.trusted.as_slice(), config.revoked.as_slice()), config.pull_timeout());
            substitute::pull(&store, &mut helper, how, name, &mut moved)?;
        }
    }
    report(&registry, moved, how, json, started, "pulled")
}

fn report(
    registry: &Registry,
    moved: Moved,
    how: Option<Vec<(String, String)>>,
    json: bool,
    started: std::time::Instant,
    verb: &str,
) -> Result<i32> {
    if json {
        let report =
            MovedReport { registry: registry.to_string(), moved, how, wall_s: started.elapsed().as_secs_f64() };
        crate::report::print_json(&report)?;
    } else {
        println!("{verb} {} items ({} bytes), {} already there, `{registry}`", moved.items, moved.bytes, moved.present);
    }
    Ok(0)
}
