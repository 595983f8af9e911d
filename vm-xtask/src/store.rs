//! The store: every artifact is an item under `target/vmstore/items/<hash>-<name>`,
//! where the hash covers a canonical encoding of the recipe that made it (see [`Recipe`]).
//!
//! `items/` holds items and nothing else: it is what guests see (read-only, as `/store`).
//! The bookkeeping lives beside it: `meta/<item>.meta` (what made each item and its
//! content hash), `.tmp/` (builds in progress, scratch space such as a VM's exchange
//! directory), `.locks/` and `.cache/`. Items are built in `.tmp/`, fsynced and
//! renamed into place, then the `.meta` is written the same way; an item counts as
//! present only when both exist. A `flock` per item makes concurrent runs build it once.
//! Leftovers of a killed run are removed by the next run that takes the item's lock, and
//! are never served. With registries configured, a missing item is first looked up as a
//! substitute ([`crate::substitute`]), committed the same way once verified.

pub mod fd;
pub mod ingest;
pub mod space;

pub use fd::{guest_kind, start_file_writeback, DirFd, Kind};

use fs_err as fs;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use camino::{Utf8Path, Utf8PathBuf};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Version tag of the recipe encoding; changing the encoding changes every hash.
const RECIPE_ENCODING: &[u8] = b"vmstore-recipe-v1\n";
/// The input label of references ([`Recipe::reference`]).
const REFERENCE: &str = "ref";
/// Modification time given to everything in an item (for reproducible images).
const FIXED_MTIME_SECS: i64 = 1;

/// A description of how to make an item: kind, name, parameters and inputs. Two recipes
/// with the same encoding make the same item; host paths must never be put in one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipe {
    kind: String,
    name: String,
    params: Vec<(String, String)>,
    inputs: Vec<(String, String)>,
}

impl Recipe {
    /// A recipe of `kind` (what builds it) producing an item called `name`.
    pub fn new(kind: &str, name: &str) -> Recipe {
        Recipe { kind: kind.into(), name: sanitize_name(name), params: Vec::new(), inputs: Vec::new() }
    }

    /// Adds a parameter (part of the hash).
    pub fn param(mut self, key: &str, value: impl Into<String>) -> Recipe {
        self.params.push((key.into(), value.into()));
        self
    }

    /// Adds another item as an input, identified by its hash and name.
    pub fn input_item(mut self, label: &str, item: &Item) -> Recipe {
        self.inputs.push((label.into(), format!("item:{}", item.file_name())));
        self
    }

    /// Adds another item as a reference: an input the new item points to at run time,
    /// so it belongs to the new item's closure ([`Store::closure`]).
    pub fn reference(self, item: &Item) -> Recipe {
        self.input_item(REFERENCE, item)
    }

    /// Adds content (a file or a tree) identified by its sha256 from [`hash_path`].
    pub fn input_content(mut self, label: &str, sha256: &str) -> Recipe {
        self.inputs.push((label.into(), format!("sha256:{sha256}")));
        self
    }

    /// The item's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The canonical encoding: a version tag, then length-prefixed fields, parameters
    /// and inputs sorted by key so the order they were added in does not matter.
    pub fn encode(&self) -> Vec<u8> {
        fn field(out: &mut Vec<u8>, s: &str) {
            out.extend_from_slice(&(s.len() as u64).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        let mut out = RECIPE_ENCODING.to_vec();
        field(&mut out, &self.kind);
        field(&mut out, &self.name);
        for list in [&self.params, &self.inputs] {
            let mut sorted = list.clone();
            sorted.sort();
            out.extend_from_slice(&(sorted.len() as u64).to_le_bytes());
            for (k, v) in &sorted {
                field(&mut out, k);
                field(&mut out, v);
            }
        }
        out
    }

    /// The hash naming the item: the first 32 hex digits of sha256 over [`Recipe::encode`].
    pub fn hash(&self) -> String {
        let digest = hex(&Sha256::digest(self.encode()));
        digest[..32].to_string()
    }
}

/// Keeps store names to characters that are safe in paths, URLs and kernel command lines.
fn sanitize_name(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || "+-._".contains(c) { c } else { '_' }).collect()
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An item present in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub hash: String,
    pub name: String,
    /// Absolute path on the host.
    pub path: PathBuf,
}

impl Item {
    /// `<hash>-<name>`: the item's file name in the store.
    pub fn file_name(&self) -> String {
        format!("{}-{}", self.hash, self.name)
    }

    /// Where the guest sees this item (the store is shared at a fixed mount point): UTF-8
    /// by construction, as the mount point, the hash and the sanitized name are.
    pub fn guest_path(&self) -> Utf8PathBuf {
        Utf8Path::new(guest::STORE_MOUNT).join(self.file_name())
    }
}

/// What the store records beside each item.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    pub kind: String,
    pub name: String,
    /// sha256 of the item's content (see [`hash_path`]).
    pub content_sha256: String,
    pub params: Vec<(String, String)>,
    pub inputs: Vec<(String, String)>,
}

/// Something wrong with a store entry, found by [`Store::verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The entry's file name in the store.
    pub entry: String,
    pub what: String,
}

/// Whether an item came from the store or was just made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Hit,
    Built,
    /// Fetched from a registry ([`crate::substitute`]) instead of built.
    Substituted,
}

/// Where an item may come from instead of being built (registries: [`crate::substitute`]):
/// asked by [`Store::realise`] with the item's lock held, before it builds.
pub trait Substitutes: Send + Sync {
    /// Commits `item` (of `recipe`) at `tmp` when a source has it, verified; the bytes
    /// received, or `None` (then the item is built here).
    fn substitute(&self, store: &Store, recipe: &Recipe, item: &Item, tmp: &Path) -> Option<u64>;
}

/// The store directory and its conventions.
#[derive(Clone)]
pub struct Store {
    root: PathBuf,
    explain: bool,
    /// Asked before an item is built; none unless given ([`Store::with_substitutes`]).
    substitutes: Option<std::sync::Arc<dyn Substitutes>>,
    /// Where each item found or made is written down ([`Store::recording`]).
    recorder: Option<Recorder>,
}

/// The items a store found or made, in order, each `hit|built FILE_NAME` or `substituted
/// BYTES FILE_NAME`.
pub type Recorder = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("root", &self.root).field("substitutes", &self.substitutes.is_some()).finish()
    }
}

/// The directory of items, the only one guests see.
const ITEMS: &str = "items";
/// The directory of `.meta` records.
const METAS: &str = "meta";
/// Where xtask's own Debian index lives in a store ([`crate::debian::index`]).
pub const DEBIAN_INDEX: &str = "debian-index";
/// The bookkeeping directories beside [`ITEMS`] (`.pins`: what earlier versions pinned
/// Debian packages in, before `vm.lock`; unused, not stray).
const BOOKKEEPING: [&str; 7] = [METAS, ".tmp", ".locks", ".cache", ".layout", ".pins", DEBIAN_INDEX];
/// What [`Store::open`] writes to `.layout`; an older store has none.
const LAYOUT: &str = "2: items/ holds only items; bookkeeping beside it\n";

/// Where the items a process finds or makes are recorded (see [`Store::record`]).
pub const RECORD_ENV: &str = "XTASK_RECORD_ITEMS";

/// Test-only fault injection: `XTASK_FAULT_COMMIT=N` aborts the process at step N of
/// committing an item (see [`Store::commit`]), to prove that a crash at any point
/// leaves either no item or a complete one.
pub const FAULT_ENV: &str = "XTASK_FAULT_COMMIT";

fn fault_point(step: u32) {
    static AT: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    let at = AT.get_or_init(|| std::env::var(FAULT_ENV).ok().and_then(|v| v.parse().ok()));
    if *at == Some(step) {
        eprintln!("{FAULT_ENV}: aborting at commit step {step}");
        std::process::abort();
    }
}

/// Scratch directories' names: `scratch-PID-NAME.RANDOM` once in use, `.new-scratch-RANDOM`
/// while being made (before their lock is held).
const SCRATCH_PREFIX: &str = "scratch-";
const NEW_SCRATCH_PREFIX: &str = ".new-scratch-";
const MEMORY_NEW_PREFIX: &str = ".xtask-new-scratch-";
/// The lock file in a scratch directory.
const SCRATCH_LOCK: &str = ".lock";

/// Scratch space (a private directory, mode 0700) in use while this value lives: it holds
/// a `flock` on the directory's `.lock` file, which tells other runs it is in use (a
/// PID would not: a store may be shared across PID namespaces, and PIDs are reused).
/// The directory is made under a `.new-` name, its lock taken, and only then renamed
/// to its `scratch-` name, so no run ever sees a scratch directory whose lock is not
/// held yet (the lock file likewise gets its name once locked). Removed when dropped,
/// or by a later run once the lock is free.
#[derive(Debug)]
pub struct Scratch {
    path: PathBuf,
    _lock: nix::fcntl::Flock<File>,
}

impl Scratch {
    fn create(parent: &Path, new_prefix: &str, prefix: &str) -> Result<Scratch> {
        let made = tempfile::Builder::new()
            .prefix(new_prefix)
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir_in(parent)
            .with_context(|| format!("creating a directory in `{}`", parent.display()))?
            .keep();
        let locked = (|| -> Result<(nix::fcntl::Flock<File>, PathBuf)> {
            use std::os::unix::fs::OpenOptionsExt;
            // The lock file, too, gets its name only once it is locked.
            let unnamed = made.join(format!("{SCRATCH_LOCK}.new"));
            let lock = File::options()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(nix::libc::O_NOFOLLOW)
                .open(&unnamed)?;
            let lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
                .map_err(|(_, e)| io::Error::from(e))?;
            fs::rename(&unnamed, made.join(SCRATCH_LOCK))?;
            let random = made.file_name().unwrap_or_default().to_string_lossy();
            let path = parent.join(format!("{prefix}{}", random.trim_start_matches(new_prefix)));
            fs::rename(&made, &path)?;
            Ok((lock, path))
        })();
        match locked {
            Ok((lock, path)) => Ok(Scratch { path, _lock: lock }),
            Err(e) => {
                let _ = remove_tree(&made);
                Err(e.context(format!("locking a scratch directory in `{}`", parent.display())))
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = remove_tree(&self.path);
    }
}

/// Whether the entry `name` at `path` is scratch (`prefix...`, or `new_prefix...` while
/// being made) that no run uses any more: its lock can be taken. Scratch of the
/// earlier kind, without a lock, is dead when no process has its PID; a directory
/// being made that has no lock yet is left alone.
fn scratch_is_dead(path: &Path, name: &str, prefix: &str, new_prefix: &str) -> bool {
    let (scratch, new) = (name.starts_with(prefix), name.starts_with(new_prefix));
    if !scratch && !new {
        return false;
    }
    let lock = DirFd::open(path).and_then(|dir| dir.open_file(std::ffi::OsStr::new(SCRATCH_LOCK)));
    match lock {
        // Taken, the lock is let go at once: no run takes a dead run's scratch to use it.
        Ok(lock) => nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock).is_ok(),
        Err(_) if scratch => {
            let pid = name[prefix.len()..].split('-').next().and_then(|p| p.parse().ok());
            pid.is_some_and(|pid| !process_alive(pid))
        }
        Err(_) => false,
    }
}

/// A directory inside its own private scratch ([`Store::private_subdir`]): a VM's
/// exchange directory ([`Store::exchange`]), a workspace's view; removed with its
/// scratch when dropped.
#[derive(Debug)]
pub struct Exchange {
    _scratch: Scratch,
    dir: PathBuf,
}

impl Exchange {
    /// The directory shared with the guest.
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

/// Creates the directory `path` (which must not exist), private to the user (mode 0700).
pub fn create_private_dir(path: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(path)
        .map_err(anyhow::Error::from)
        .with_context(|| format!("creating `{}`", path.display()))
}

/// Makes `path` (and its parents) a directory private to the user: made mode 0700, or
/// made 0700 if it is open to others (left so by an earlier version); a link there is
/// an error, not followed.
pub fn ensure_private_dir(path: &Path) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).with_context(|| format!("creating `{}`", parent.display()))?;
    }
    match create_private_dir(path) {
        Err(e) if e.downcast_ref::<io::Error>().is_some_and(|e| e.kind() == io::ErrorKind::AlreadyExists) => {}
        other => other?,
    }
    let meta = fs::symlink_metadata(path)?;
    if !meta.is_dir() {
        bail!("`{}` is not a directory (a link?); remove it", path.display());
    }
    if meta.permissions().mode() & 0o7077 != 0 {
        fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("making `{}` private to its owner (mode 0700)", path.display()))?;
    }
    Ok(())
}

/// Creates the file `path`, which must not exist, private to the user (mode 0600): with
/// `O_CREAT|O_EXCL|O_NOFOLLOW`, so nothing planted there (a link) is ever written through.
pub fn create_private_file(path: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(path)
        .with_context(|| format!("creating `{}`", path.display()))
}

/// Reads from `file` until `buf` is full or the file ends; returns how much was read.
pub fn read_full(file: &mut impl std::io::Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Writes `bytes` to `path` as a whole or not at all: a temporary beside it, written and
/// fsynced, renamed over `path`, then the directory fsynced. Used for every record the
/// store keeps (`.meta`, memos).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomically_with_mode(path, bytes, 0o666)
}

/// [`write_atomically`], the file readable and writable by its owner alone (a request
/// that may hold `--env` values).
pub fn write_private_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomically_with_mode(path, bytes, 0o600)
}

fn write_atomically_with_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let (dir, name) = fd::split(path).with_context(|| format!("writing `{}`", path.display()))?;
    let tmp = dir.join(format!(".{}.{}.tmp", name.to_string_lossy(), std::process::id()));
    let written = (|| -> io::Result<()> {
        let mut f =
            File::options().write(true).create_new(true).mode(mode).custom_flags(nix::libc::O_NOFOLLOW).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        fd::sync_dir(dir)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written.with_context(|| format!("writing `{}`", path.display()))
}

/// `path`'s directory and last component (it must have both).
pub fn split_path(path: &Path) -> Result<(&Path, &std::ffi::OsStr)> {
    fd::split(path).with_context(|| format!("splitting `{}`", path.display()))
}

/// The tmpfs for [`Store::memory_scratch`].
pub const MEMORY_SCRATCH: &str = "/dev/shm";
const MEMORY_SCRATCH_PREFIX: &str = "xtask-scratch-";
/// Set to `1` to keep intermediate files on disk, in the store's `.tmp`.
pub const NO_SHM_ENV: &str = "XTASK_NO_SHM";

impl Store {
    /// Opens (creating if needed) the store at `root`. With `explain`, every lookup says
    /// on stderr whether it was a hit or a build.
    /// The same store, writing down each item it finds or makes (`store push --system`).
    pub fn recording(self) -> (Store, Recorder) {
        let recorder = Recorder::default();
        (Store { recorder: Some(recorder.clone()), ..self }, recorder)
    }

    /// The same store, asking `substitutes` (if any) before it builds an item.
    pub fn with_substitutes(self, substitutes: Option<std::sync::Arc<dyn Substitutes>>) -> Store {
        Store { substitutes, ..self }
    }

    pub fn open(root: &Path, explain: bool) -> Result<Store> {
        let root = std::path::absolute(root).with_context(|| format!("finding the store `{}`", root.display()))?;
        let fresh = !root.join(".layout").exists();
        for sub in [ITEMS, METAS, ".tmp", ".locks", ".cache"] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir).with_context(|| format!("creating store directory `{}`", dir.display()))?;
        }
        // Scratch (exchange directories, requests, builds in progress) is the user's
        // alone, whatever it holds.
        let tmp = root.join(".tmp");
        let private = fs::symlink_metadata(&tmp).is_ok_and(|m| m.is_dir() && m.permissions().mode() & 0o7077 == 0);
        if !private {
            fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("making `{}` private to its owner (mode 0700)", tmp.display()))?;
        }
        let store = Store { root, explain, substitutes: None, recorder: None };
        if fresh {
            store.move_earlier_layout()?;
            write_atomically(&store.root.join(".layout"), LAYOUT.as_bytes())?;
        }
        store.remove_dead_scratch()?;
        Ok(store)
    }

    /// Moves the items and `.meta` files of a store made by an earlier version (all side
    /// by side in the store's top directory) into `items/` and `meta/`.
    fn move_earlier_layout(&self) -> Result<()> {
        let mut moved = 0;
        for entry in fs::read_dir(&self.root).with_context(|| format!("listing `{}`", self.root.display()))? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            let from = self.root.join(&name);
            let to = match name.strip_suffix(".meta") {
                Some(base) if is_item_name(base) => self.root.join(METAS).join(&name),
                None if is_item_name(&name) => self.root.join(ITEMS).join(&name),
                _ => continue,
            };
            // Moving a directory to another parent rewrites its `..`: it must be writable.
            let dir = fs::symlink_metadata(&from)?.is_dir();
            if dir {
                fs::set_permissions(&from, std::fs::Permissions::from_mode(0o755))?;
            }
            fs::rename(&from, &to).with_context(|| format!("moving `{}` to `{}`", from.display(), to.display()))?;
            if dir {
                fs::set_permissions(&to, std::fs::Permissions::from_mode(0o555))?;
            }
            moved += 1;
        }
        if moved > 0 {
            eprintln!(
                "store: moved {moved} entries of an earlier layout into `{}/items` and `meta` (guests now see \
                    only items)",
                self.root.display()
            );
        }
        Ok(())
    }

    /// Removes the scratch directories of runs that ended without removing their own
    /// (killed runs): those whose lock ([`Scratch`]) nobody holds. The PID in a name
    /// decides nothing (a store may be shared across PID namespaces, and PIDs are
    /// reused), except for scratch made before scratch had locks.
    fn remove_dead_scratch(&self) -> Result<()> {
        // Memory scratch of killed runs: best effort, it may belong to another user.
        for entry in fs::read_dir(MEMORY_SCRATCH).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if scratch_is_dead(&entry.path(), &name, MEMORY_SCRATCH_PREFIX, MEMORY_NEW_PREFIX) {
                let _ = remove_tree(&entry.path());
            }
        }
        let tmp = self.tmp_dir();
        for entry in fs::read_dir(&tmp).with_context(|| format!("listing `{}`", tmp.display()))?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if scratch_is_dead(&entry.path(), &name, SCRATCH_PREFIX, NEW_SCRATCH_PREFIX) {
                remove_leftover(&entry.path())?;
            }
        }
        Ok(())
    }

    /// Scratch space in memory (a directory in the tmpfs at [`MEMORY_SCRATCH`]) for
    /// `needed` bytes of intermediate files that never become an item, when that tmpfs
    /// and the machine's available memory have room for them with a margin; `None`
    /// otherwise, or with `XTASK_NO_SHM=1`. Removed when dropped, or by a later run if
    /// this process is killed.
    pub fn memory_scratch(&self, name: &str, needed: u64) -> Option<Scratch> {
        if std::env::var_os(NO_SHM_ENV).is_some_and(|v| v == "1") {
            return None;
        }
        let dir = Path::new(MEMORY_SCRATCH);
        let stat = nix::sys::statvfs::statvfs(dir).ok()?;
        let free = stat.blocks_available() as u64 * stat.fragment_size() as u64;
        let available = fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
            let line = m.lines().find(|l| l.starts_with("MemAvailable:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib * 1024)
        })?;
        if free < needed + (256 << 20) || available < needed + (1 << 30) {
            return None;
        }
        Scratch::create(
            dir,
            MEMORY_NEW_PREFIX,
            &format!("{MEMORY_SCRATCH_PREFIX}{}-{}.", std::process::id(), sanitize_name(name)),
        )
        .ok()
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory holding the items and nothing else: what guests see as the store.
    pub fn items_dir(&self) -> PathBuf {
        self.root.join(ITEMS)
    }

    /// Scratch space for builds in progress (the same file system as the items).
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join(".tmp")
    }

    /// Directory for small memos that are not items (probes of host tools).
    pub fn cache_dir(&self) -> PathBuf {
        self.root.join(".cache")
    }

    /// Directory for scratch space that is not an item (e.g. a VM's exchange directory),
    /// removed when dropped, or by a later run if this process is killed.
    /// It is private to the user (mode 0700), and in use while its lock is held.
    pub fn scratch(&self, name: &str) -> Result<Scratch> {
        let prefix = format!("{SCRATCH_PREFIX}{}-{}.", std::process::id(), sanitize_name(name));
        Scratch::create(&self.tmp_dir(), NEW_SCRATCH_PREFIX, &prefix)
            .with_context(|| format!("creating a scratch directory in `{}`", self.root.display()))
    }

    /// A VM's exchange directory: `xchg/` (mode 0700), the directory shared with the
    /// guest, inside private scratch space (mode 0700), so that whatever the guest does to
    /// the share's root, the path to it stays the user's alone.
    pub fn exchange(&self) -> Result<Exchange> {
        self.private_subdir("xchg", "xchg")
    }

    /// The directory `sub` (mode 0700) inside new private scratch named after `name`:
    /// what is shared with a guest is such a directory, never scratch itself (which
    /// holds its lock).
    pub fn private_subdir(&self, name: &str, sub: &str) -> Result<Exchange> {
        let scratch = self.scratch(name)?;
        let dir = scratch.path().join(sub);
        create_private_dir(&dir)?;
        Ok(Exchange { _scratch: scratch, dir })
    }

    /// Where `recipe`'s item lives, whether or not it exists.
    pub fn item_for(&self, recipe: &Recipe) -> Item {
        let hash = recipe.hash();
        let path = self.items_dir().join(format!("{hash}-{}", recipe.name));
        Item { hash, name: recipe.name.clone(), path }
    }

    /// The present item called `file_name` (`<hash>-<name>`), if there is one.
    pub fn lookup(&self, file_name: &str) -> Option<Item> {
        let item = self.parse_entry(file_name)?;
        self.is_present(&item).then_some(item)
    }

    fn meta_path(&self, item: &Item) -> PathBuf {
        self.root.join(METAS).join(format!("{}.meta", item.file_name()))
    }

    /// Whether the item is complete: its content and its `.meta` are both in place.
    pub fn is_present(&self, item: &Item) -> bool {
        let present = fs::symlink_metadata(&item.path).is_ok() && self.meta_path(item).is_file();
        if present {
            self.record(item, "hit");
        }
        present
    }

    /// Reads an item's recorded metadata.
    pub fn meta(&self, item: &Item) -> Result<Meta> {
        let path = self.meta_path(item);
        let text = fs::read_to_string(&path).with_context(|| format!("reading `{}`", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing `{}`", path.display()))
    }

    /// The items `roots` refer to, directly or not, and the roots themselves: each once,
    /// references before the items that refer to them.
    pub fn closure(&self, roots: &[Item]) -> Result<Vec<Item>> {
        let mut seen = std::collections::BTreeSet::new();
        let mut order = Vec::new();
        for root in roots {
            self.visit_references(root, &mut seen, &mut order)?;
        }
        Ok(order)
    }

    fn visit_references(
        &self,
        item: &Item,
        seen: &mut std::collections::BTreeSet<String>,
        order: &mut Vec<Item>,
    ) -> Result<()> {
        if !seen.insert(item.file_name()) {
            return Ok(());
        }
        let meta = self.meta(item)?;
        for file_name in referenced(&meta.inputs) {
            let referenced = self
                .lookup(file_name)
                .with_context(|| format!("store item `{}` refers to `{file_name}`, which is missing", item.name))?;
            self.visit_references(&referenced, seen, order)?;
        }
        order.push(item.clone());
        Ok(())
    }

    /// Returns the item for `recipe`, running `build` to make it when it is not present.
    /// `build` gets a path that does not exist yet and must create it (a file or a
    /// directory). On error nothing is stored.
    pub fn realise(&self, recipe: &Recipe, build: impl FnOnce(&Path) -> Result<()>) -> Result<Item> {
        self.realise_with_outcome(recipe, build).map(|(item, _)| item)
    }

    /// Like [`Store::realise`], also saying whether it was a hit.
    pub fn realise_with_outcome(
        &self,
        recipe: &Recipe,
        build: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<(Item, Outcome)> {
        let item = self.item_for(recipe);
        if self.is_present(&item) {
            self.say("hit", &item);
            return Ok((item, Outcome::Hit));
        }
        let _lock = self.lock(&item)?;
        if self.is_present(&item) {
            self.say("hit", &item);
            return Ok((item, Outcome::Hit));
        }
        self.clear_leftovers(&item)?;
        let tmp = self.tmp_for(&item);
        if let Some(bytes) = self.substitutes.as_ref().and_then(|s| s.substitute(self, recipe, &item, &tmp)) {
            self.say("substituted", &item);
            self.record(&item, &format!("substituted {bytes}"));
            return Ok((item, Outcome::Substituted));
        }
        if self.explain {
            eprintln!("store: building {} ({})", item.file_name(), self.why(recipe, &item));
        }
        let build = |tmp: &Path| build(tmp).with_context(|| format!("building store item `{}`", item.name));
        self.fill(recipe, &item, &tmp, None, build)?;
        self.say("built", &item);
        self.record(&item, "built");
        Ok((item, Outcome::Built))
    }

    /// Puts an item made elsewhere into the store: `fill` gets a path that does not exist
    /// and must create the item's content there, which is committed as a build is, but
    /// only if its content hash is `content_sha256`; otherwise nothing is stored. Under
    /// the item's lock; a present item is a hit and `fill` is not called. No substitute
    /// is looked up.
    pub fn insert_verified(
        &self,
        recipe: &Recipe,
        content_sha256: &str,
        fill: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<(Item, Outcome)> {
        let item = self.item_for(recipe);
        let _lock = self.lock(&item)?;
        if self.is_present(&item) {
            return Ok((item, Outcome::Hit));
        }
        self.clear_leftovers(&item)?;
        let tmp = self.tmp_for(&item);
        self.fill(recipe, &item, &tmp, Some(content_sha256), fill)?;
        Ok((item, Outcome::Built))
    }

    /// With the item's lock held and its leftovers cleared: `fill` makes the item at `tmp`
    /// (a path that does not exist yet), then it is committed, only if its content hash is
    /// `expected` when one is given. On error nothing is stored.
    pub(crate) fn fill(
        &self,
        recipe: &Recipe,
        item: &Item,
        tmp: &Path,
        expected: Option<&str>,
        fill: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<()> {
        let done = fill(tmp).and_then(|()| self.commit(recipe, item, tmp, expected));
        if let Err(err) = done {
            remove_tree(tmp).ok();
            return Err(space::annotate(err, &self.tmp_dir(), None));
        }
        Ok(())
    }

    /// Where this process builds `item` before committing it.
    fn tmp_for(&self, item: &Item) -> PathBuf {
        self.tmp_dir().join(format!("{}.{}", item.file_name(), std::process::id()))
    }

    /// The recipe an item's `.meta` records (its hash names the item).
    pub fn recipe_of(meta: &Meta) -> Recipe {
        Recipe {
            kind: meta.kind.clone(),
            name: meta.name.clone(),
            params: meta.params.clone(),
            inputs: meta.inputs.clone(),
        }
    }

    /// The file names of the items a recipe refers to ([`Recipe::reference`]).
    pub fn references(recipe: &Recipe) -> Vec<String> {
        referenced(&recipe.inputs).map(String::from).collect()
    }

    /// The `.meta` of an item, as stored (the bytes a pushed item's signature covers).
    pub fn meta_bytes(&self, item: &Item) -> Result<Vec<u8>> {
        let path = self.meta_path(item);
        fs::read(&path).with_context(|| format!("reading `{}`", path.display()))
    }

    /// With `XTASK_RECORD_ITEMS=FILE`, appends each item this process finds or makes to
    /// FILE, a line `hit|built FILE_NAME` or `substituted BYTES FILE_NAME` each (what
    /// `store push --system` pushes, `store pull --system` reports and the bench counts).
    fn record(&self, item: &Item, how: &str) {
        if let Some(recorder) = &self.recorder {
            recorder.lock().unwrap_or_else(|e| e.into_inner()).push(format!("{how} {}", item.file_name()));
        }
        if let Some(file) = std::env::var_os(RECORD_ENV) {
            let line = format!("{how} {}\n", item.file_name());
            let written =
                File::options().create(true).append(true).open(&file).and_then(|mut f| f.write_all(line.as_bytes()));
            if let Err(e) = written {
                eprintln!("warning: recording `{}` in `{}`: {e}", item.file_name(), Path::new(&file).display());
            }
        }
    }

    /// Moves a finished build into place: canonical, hashed, flushed to disk, renamed,
    /// and only then recorded, each record written, flushed and renamed in turn. A crash
    /// at any step (see [`FAULT_ENV`]) leaves either no item (at most a temporary or an
    /// unrecorded directory, which is never served and is removed by the next build) or
    /// a complete one.
    fn commit(&self, recipe: &Recipe, item: &Item, tmp: &Path, expected: Option<&str>) -> Result<()> {
        if fs::symlink_metadata(tmp).is_err() {
            bail!("the build of `{}` produced nothing", item.name);
        }
        fault_point(1);
        canonicalize(tmp, true)?;
        // The disk writes the item back while it is hashed; the flush below waits for less.
        fd::start_writeback(tmp).with_context(|| format!("writing `{}` back", tmp.display()))?;
        let content_sha256 = hash_path(tmp)?;
        if let Some(expected) = expected.filter(|e| *e != content_sha256) {
            bail!("the content of `{}` was altered: its sha256 is {content_sha256}, not {expected}", item.name);
        }
        fault_point(2);
        fd::sync_tree(tmp).with_context(|| format!("flushing `{}` to disk", tmp.display()))?;
        fault_point(3);
        fs::rename(tmp, &item.path)
            .with_context(|| format!("moving `{}` to `{}`", tmp.display(), item.path.display()))?;
        fault_point(4);
        if fs::symlink_metadata(&item.path)?.is_dir() {
            fs::set_permissions(&item.path, std::fs::Permissions::from_mode(0o555))
                .with_context(|| format!("making `{}` read-only", item.path.display()))?;
        }
        fd::sync_dir(&self.items_dir()).context("flushing the store's items directory")?;
        fd::sync_dir(&self.tmp_dir()).context("flushing the store's .tmp directory")?;
        fault_point(5);
        let meta = Meta {
            kind: recipe.kind.clone(),
            name: recipe.name.clone(),
            content_sha256,
            params: recipe.params.clone(),
            inputs: recipe.inputs.clone(),
        };
        write_atomically(&self.meta_path(item), &serde_json::to_vec_pretty(&meta)?)?;
        fault_point(6);
        Ok(())
    }

    /// Takes the item's build lock, waiting (and saying so) while another process has it.
    fn lock(&self, item: &Item) -> Result<File> {
        let path = self.root.join(".locks").join(format!("{}.lock", item.file_name()));
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening lock `{}`", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                if crate::progress::shown() {
                    eprintln!("waiting for another process building `{}`", item.name);
                }
                file.lock().with_context(|| format!("locking `{}`", path.display()))?;
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking `{}`", path.display()))
            }
        }
        Ok(file)
    }

    /// With the lock held: removes an incomplete item at the final path and temporary
    /// directories left by killed builds of the same item.
    fn clear_leftovers(&self, item: &Item) -> Result<()> {
        if fs::symlink_metadata(&item.path).is_ok() {
            eprintln!("removing incomplete store item `{}`", item.path.display());
            remove_tree(&item.path)?;
        }
        let prefix = format!("{}.", item.file_name());
        let tmp_dir = self.tmp_dir();
        for entry in fs::read_dir(&tmp_dir).with_context(|| format!("listing `{}`", tmp_dir.display()))? {
            let entry = entry?;
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                remove_leftover(&entry.path())?;
            }
        }
        Ok(())
    }

    /// Re-hashes every item against its recorded hash and looks for anything that is
    /// not a complete item: in `items/`, in `meta/` and beside them. Returns the problems
    /// found (none: the store is sound). A record that cannot be read is a problem, not
    /// a reason to stop.
    pub fn verify(&self) -> Result<Vec<Problem>> {
        let list = |dir: &Path| -> Result<Vec<String>> {
            let mut names: Vec<String> = fs::read_dir(dir)
                .with_context(|| format!("listing `{}`", dir.display()))?
                .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect::<io::Result<_>>()?;
            names.sort();
            Ok(names)
        };
        let items = list(&self.items_dir())?;
        let metas = list(&self.root.join(METAS))?;
        let mut problems = Vec::new();
        for name in list(&self.root)? {
            if name != ITEMS && !BOOKKEEPING.contains(&name.as_str()) {
                problems.push(Problem { entry: name, what: "not part of the store (stray entry)".into() });
            }
        }
        for name in &metas {
            let base = name.strip_suffix(".meta").filter(|b| is_item_name(b));
            match base {
                Some(base) if items.iter().any(|n| n == base) => {}
                Some(_) => {
                    problems.push(Problem { entry: format!("{METAS}/{name}"), what: "a .meta without its item".into() })
                }
                None => problems.push(Problem {
                    entry: format!("{METAS}/{name}"),
                    what: "not a record of an item (an interrupted write?)".into(),
                }),
            }
        }
        for name in &items {
            let entry = format!("{ITEMS}/{name}");
            let Some(item) = self.parse_entry(name) else {
                problems.push(Problem { entry, what: "not a store item (stray entry)".into() });
                continue;
            };
            if !self.is_present(&item) {
                problems.push(Problem { entry, what: "incomplete: no .meta (an interrupted build?)".into() });
                continue;
            }
            let recorded = match self.meta(&item) {
                Ok(meta) => meta.content_sha256,
                Err(e) => {
                    problems.push(Problem { entry, what: format!("its record is damaged: {e:#}") });
                    continue;
                }
            };
            match hash_path(&item.path) {
                Ok(actual) if actual == recorded => {}
                Ok(actual) => problems.push(Problem {
                    entry: entry.clone(),
                    what: format!("content changed: recorded sha256 {recorded}, found {actual}"),
                }),
                Err(e) => problems.push(Problem { entry: entry.clone(), what: format!("unreadable: {e:#}") }),
            }
            if let Some(w) = first_writable(&item.path)? {
                problems.push(Problem { entry, what: format!("`{}` is writable", w.display()) });
            }
        }
        Ok(problems)
    }

    /// The item named `<hash>-<name>` (present or not), if `file_name` has that form.
    fn parse_entry(&self, file_name: &str) -> Option<Item> {
        let (hash, name) = file_name.split_once('-')?;
        is_item_name(file_name).then(|| Item {
            hash: hash.to_string(),
            name: name.to_string(),
            path: self.items_dir().join(file_name),
        })
    }

    /// The item a [`Problem::entry`] (or an item's file name) is about, if it is about one.
    pub fn item_of_entry(&self, entry: &str) -> Option<Item> {
        let base = entry
            .strip_prefix(&format!("{ITEMS}/"))
            .or_else(|| entry.strip_prefix(&format!("{METAS}/")).and_then(|m| m.strip_suffix(".meta")))
            .unwrap_or(entry);
        self.parse_entry(base)
    }

    /// The present items called `name`, whatever their recipe.
    pub fn items_named(&self, name: &str) -> Result<Vec<Item>> {
        Ok(self.entries()?.into_iter().filter(|item| item.name == name && self.is_present(item)).collect())
    }

    /// Every present item, by file name.
    pub fn items(&self) -> Result<Vec<Item>> {
        Ok(self.entries()?.into_iter().filter(|item| self.is_present(item)).collect())
    }

    /// The entries of `items/` named as items are, present or not, by file name.
    fn entries(&self) -> Result<Vec<Item>> {
        let dir = self.items_dir();
        let mut items = Vec::new();
        for entry in fs::read_dir(&dir).with_context(|| format!("listing `{}`", dir.display()))? {
            let entry = entry.with_context(|| format!("listing `{}`", dir.display()))?;
            items.extend(self.parse_entry(&entry.file_name().to_string_lossy()));
        }
        items.sort_by_key(Item::file_name);
        Ok(items)
    }

    /// Removes a store entry as [`Store::verify`] names it (an item and its `.meta`, a
    /// record, or a stray entry), under the item's lock.
    pub fn remove_entry(&self, entry: &str) -> Result<()> {
        if let Some(item) = self.item_of_entry(entry) {
            let _lock = self.lock(&item)?;
            remove_tree(&self.meta_path(&item))?;
            return remove_tree(&item.path);
        }
        if entry.is_empty() || entry.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
            bail!("`{entry}` is not an entry of the store");
        }
        remove_tree(&self.root.join(entry))
    }

    /// Why `recipe` is being built: how it differs from the newest other item of the
    /// same name, if there is one (for `--explain`).
    fn why(&self, recipe: &Recipe, item: &Item) -> String {
        let suffix = format!("-{}.meta", recipe.name);
        let mut newest: Option<(std::time::SystemTime, PathBuf)> = None;
        for entry in fs::read_dir(self.root.join(METAS)).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_same_name = name.strip_suffix(&suffix).is_some_and(|h| h.len() == 32 && h != item.hash);
            let modified = entry.metadata().and_then(|m| m.modified()).ok();
            if let (true, Some(modified)) = (is_same_name, modified) {
                if newest.as_ref().is_none_or(|(t, _)| modified > *t) {
                    newest = Some((modified, entry.path()));
                }
            }
        }
        let Some((_, path)) = newest else { return "no earlier item of this name".to_string() };
        let Ok(old) =
            fs::read_to_string(&path).map_err(anyhow::Error::from).and_then(|t| Ok(serde_json::from_str::<Meta>(&t)?))
        else {
            return "an earlier item's record is unreadable".to_string();
        };
        let mut changes = Vec::new();
        for (key, value) in &recipe.params {
            if !old.params.iter().any(|(k, v)| k == key && v == value) {
                changes.push(format!("parameter `{key}`"));
            }
        }
        let shown = |v: &str| match v.strip_prefix("item:") {
            Some(file) => file.split_once('-').map(|(_, n)| n.to_string()).unwrap_or_else(|| file.to_string()),
            None => "new content".to_string(),
        };
        for (label, value) in &recipe.inputs {
            if !old.inputs.iter().any(|(l, v)| l == label && v == value) {
                changes.push(format!("input `{label}` ({})", shown(value)));
            }
        }
        // An input that is gone, not replaced by a new one of the same name.
        for (label, value) in &old.inputs {
            let replaced = recipe.inputs.iter().any(|(l, v)| l == label && shown(v) == shown(value));
            if !replaced {
                changes.push(format!("input `{label}` (without {})", shown(value)));
            }
        }
        changes.dedup();
        let old_name = path.file_name().map(|n| n.to_string_lossy().trim_end_matches(".meta").to_string());
        format!(
            "was {}: changed {}",
            old_name.unwrap_or_default(),
            if changes.is_empty() { "nothing recorded".to_string() } else { changes.join(", ") }
        )
    }

    fn say(&self, what: &str, item: &Item) {
        if self.explain {
            eprintln!("store: {what} {}", item.file_name());
        }
    }
}

fn process_alive(pid: i32) -> bool {
    // Signal 0 checks existence; EPERM means it exists but belongs to someone else.
    !matches!(nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None), Err(nix::errno::Errno::ESRCH))
}

/// The first file or directory in a tree that has a write bit set.
fn first_writable(path: &Path) -> Result<Option<PathBuf>> {
    let meta = fs::symlink_metadata(path).with_context(|| format!("reading `{}`", path.display()))?;
    if meta.file_type().is_symlink() {
        return Ok(None);
    }
    if meta.mode() & 0o222 != 0 {
        return Ok(Some(path.to_path_buf()));
    }
    if meta.is_dir() {
        for entry in fs::read_dir(path).with_context(|| format!("listing `{}`", path.display()))? {
            if let Some(w) = first_writable(&entry?.path())? {
                return Ok(Some(w));
            }
        }
    }
    Ok(None)
}

/// Makes a built tree canonical: no write bits, no setuid/setgid/sticky, fixed times.
fn canonicalize(path: &Path, top: bool) -> Result<()> {
    let meta = fs::symlink_metadata(path).with_context(|| format!("reading `{}`", path.display()))?;
    let ft = meta.file_type();
    if ft.is_dir() {
        for entry in fs::read_dir(path).with_context(|| format!("listing `{}`", path.display()))? {
            canonicalize(&entry?.path(), false)?;
        }
    }
    if !ft.is_symlink() {
        let exec = meta.mode() & 0o111 != 0 || ft.is_dir();
        let mode = if exec { 0o555 } else { 0o444 };
        // The item's own directory stays writable until it has been moved into place
        // (moving a directory to another parent rewrites its `..`).
        let mode = if top && ft.is_dir() { mode | 0o200 } else { mode };
        fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("setting permissions of `{}`", path.display()))?;
    }
    let t = nix::sys::time::TimeSpec::new(FIXED_MTIME_SECS, 0);
    nix::sys::stat::utimensat(None, path, &t, &t, nix::sys::stat::UtimensatFlags::NoFollowSymlink)
        .with_context(|| format!("setting times of `{}`", path.display()))?;
    Ok(())
}

/// Removes a file or tree, first making read-only directories writable, through
/// directory descriptors: a link anywhere in it (the top included) is removed, never
/// followed, so a tree someone else wrote cannot make this touch anything outside it.
/// What is already gone counts as removed, at every step: two xtask processes may clean
/// up the same leftovers of a killed run at once.
pub fn remove_tree(path: &Path) -> Result<()> {
    fd::remove_path(path).with_context(|| format!("removing `{}`", path.display()))
}

/// [`remove_tree`] for what a killed run left: a grandchild of that run may still be
/// writing into it for a moment (`dpkg-deb` dies with xtask, the `tar` it started does
/// not), which makes a removal fail with "directory not empty"; retried for up to 10 s.
fn remove_leftover(path: &Path) -> Result<()> {
    let mut tries = 0;
    loop {
        match remove_tree(path) {
            Err(_) if tries < 100 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            done => return done,
        }
    }
}

/// Whether `file_name` has the form of an item's: `<32 hex digits>-<name>`.
fn is_item_name(file_name: &str) -> bool {
    check_item_file_name(file_name).is_ok()
}

/// Why `file_name` cannot be an item's file name (`<hash>-<name>`: 32 lowercase hex
/// digits, `-`, then a name of the characters [`Recipe::new`] keeps, without `..`), if
/// it cannot. Names that come from elsewhere (a registry's records, the command line) are
/// checked with it before they become paths.
pub fn check_item_file_name(file_name: &str) -> std::result::Result<(), &'static str> {
    let Some((hash, name)) = file_name.split_once('-') else {
        return Err("it is not <hash>-<name>");
    };
    if hash.len() != 32 || !hash.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err("its hash is not 32 lowercase hex digits");
    }
    if name.is_empty() || file_name.len() > 255 {
        return Err("its name is empty or too long");
    }
    if name.contains('/') || name.contains("..") || name.chars().any(char::is_control) {
        return Err("its name holds `/`, `..` or a control character");
    }
    if name.chars().any(|c| !(c.is_ascii_alphanumeric() || "+-._".contains(c))) {
        return Err("its name holds a character no item name has (only letters, digits and `+-._`)");
    }
    Ok(())
}

/// sha256 of some bytes, as hex.
pub fn sha256_bytes(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// sha256 of a file's bytes, as hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    guest::image::file_hash(path).with_context(|| format!("reading `{}`", path.display()))
}

/// The file names of the items that a recipe's or `.meta`'s `inputs` refer to.
fn referenced(inputs: &[(String, String)]) -> impl Iterator<Item = &str> {
    inputs.iter().filter(|(label, _)| label == REFERENCE).map(|(_, v)| v.strip_prefix("item:").unwrap_or(v))
}

/// sha256 of a file or tree's content ([`guest::image::tree_hash`], which the guest
/// helper uses to verify an image's store): names, types, the executable bit, file
/// contents and link targets. Owners, times and other mode bits do not count. Special
/// files (devices, FIFOs, sockets) are refused.
pub fn hash_path(path: &Path) -> Result<String> {
    guest::image::tree_hash(path).with_context(|| format!("hashing `{}`", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_is_versioned_length_prefixed_and_order_independent() {
        let a = Recipe::new("k", "n").param("x", "1").param("y", "2");
        let b = Recipe::new("k", "n").param("y", "2").param("x", "1");
        assert_eq!(a.encode(), b.encode());
        assert_eq!(a.hash(), b.hash());
        let enc = Recipe::new("k", "n").encode();
        let mut expected = RECIPE_ENCODING.to_vec();
        for s in ["k", "n"] {
            expected.extend_from_slice(&(s.len() as u64).to_le_bytes());
            expected.extend_from_slice(s.as_bytes());
        }
        expected.extend_from_slice(&0u64.to_le_bytes());
        expected.extend_from_slice(&0u64.to_le_bytes());
        assert_eq!(enc, expected);
        // Length prefixes keep ("ab", "c") and ("a", "bc") apart.
        assert_ne!(Recipe::new("k", "n").param("ab", "c").hash(), Recipe::new("k", "n").param("a", "bc").hash());
        assert_ne!(Recipe::new("k", "n").param("a", "1").hash(), Recipe::new("k", "n").input_content("a", "1").hash());
        assert_eq!(a.hash().len(), 32);
    }

    #[test]
    fn names_are_sanitized() {
        assert_eq!(Recipe::new("k", "busybox-static_1:1.35/x").name(), "busybox-static_1_1.35_x");
    }

    #[test]
    fn realise_builds_once_then_hits_and_cleans_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), false).unwrap();
        let recipe = Recipe::new("test", "thing").param("v", "1");
        let item = store.item_for(&recipe);
        // A leftover from a killed build, and junk at the final path without a .meta.
        fs::create_dir_all(dir.path().join(".tmp").join(format!("{}.999", item.file_name()))).unwrap();
        fs::create_dir_all(&item.path).unwrap();
        fs::write(item.path.join("junk"), "x").unwrap();
        assert!(!store.is_present(&item));

        let (built, outcome) = store
            .realise_with_outcome(&recipe, |out| {
                fs::create_dir_all(out.join("sub/dir"))?;
                fs::write(out.join("file"), "hello")?;
                Ok(())
            })
            .unwrap();
        assert_eq!(outcome, Outcome::Built);
        assert_eq!(fs::read_to_string(built.path.join("file")).unwrap(), "hello");
        assert!(!built.path.join("junk").exists());
        assert_eq!(fs::read_dir(dir.path().join(".tmp")).unwrap().count(), 0);
        let mode = fs::metadata(built.path.join("file")).unwrap().mode();
        assert_eq!(mode & 0o777, 0o444);
        assert_eq!(store.verify().unwrap(), vec![], "a fresh item is sound and read-only");
        assert_eq!(store.meta(&built).unwrap().content_sha256, hash_path(&built.path).unwrap());

        let (_, outcome) = store.realise_with_outcome(&recipe, |_| panic!("must not rebuild")).unwrap();
        assert_eq!(outcome, Outcome::Hit);
    }

    #[test]
    fn verify_finds_changed_missing_stray_and_incomplete_entries() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), false).unwrap();
        let build = |name: &str| {
            store
                .realise(&Recipe::new("test", name), |out| {
                    fs::create_dir(out)?;
                    fs::write(out.join("a"), "aaaa")?;
                    fs::write(out.join("b"), "bbbb")?;
                    Ok(())
                })
                .unwrap()
        };
        let (flipped, deleted, stray) = (build("flipped"), build("deleted"), build("stray"));
        let (empty_meta, bad_meta) = (build("empty-meta"), build("bad-meta"));
        let _sound = build("sound");
        assert_eq!(store.verify().unwrap(), vec![]);

        let writable = |p: &Path| fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(flipped.path.join("a"), std::fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(flipped.path.join("a"), "aaab").unwrap();
        fs::set_permissions(flipped.path.join("a"), std::fs::Permissions::from_mode(0o444)).unwrap();
        writable(&deleted.path);
        fs::remove_file(deleted.path.join("b")).unwrap();
        fs::set_permissions(&deleted.path, std::fs::Permissions::from_mode(0o555)).unwrap();
        writable(&stray.path);
        fs::write(stray.path.join("extra"), "x").unwrap();
        fs::create_dir(dir.path().join("junk")).unwrap();
        fs::write(dir.path().join("items/junk"), "x").unwrap();
        fs::write(store.meta_path(&empty_meta), "").unwrap();
        fs::write(store.meta_path(&bad_meta), "{ not json").unwrap();

        let problems = store.verify().unwrap();
        let entries: Vec<String> = problems.iter().map(|p| p.entry.clone()).collect();
        let damaged = [&flipped, &deleted, &stray, &empty_meta, &bad_meta].map(|i| format!("items/{}", i.file_name()));
        for entry in damaged.iter().chain(&["junk".to_string(), "items/junk".to_string()]) {
            assert!(entries.contains(entry), "{entry} not reported: {problems:?}");
        }
        assert!(problems.iter().any(|p| p.what.contains("is writable")), "{problems:?}");
        assert!(problems.iter().filter(|p| p.what.contains("record is damaged")).count() == 2, "{problems:?}");
        assert!(!entries.iter().any(|e| e.ends_with("-sound")), "{problems:?}");
        for e in &entries {
            store.remove_entry(e).unwrap();
        }
        assert_eq!(store.verify().unwrap(), vec![]);
        assert!(store.remove_entry("../outside").is_err());
        // An item by its file name alone.
        let again = build("again");
        store.remove_entry(&again.file_name()).unwrap();
        assert!(!store.is_present(&again) && !again.path.exists());
    }

    /// The scratch of a dead run (say a VM's exchange directory, which its guest filled
    /// with links and read-only directories) is removed without following a link: what
    /// the links point to keeps its files and modes.
    #[test]
    fn dead_scratch_is_removed_without_following_links() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("keep"), "keep").unwrap();
        fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o555)).unwrap();
        let root = dir.path().join("store");
        Store::open(&root, false).unwrap();
        // pid_max is at most 2^22: this process does not exist.
        let scratch = root.join(".tmp/scratch-4194304-xchg.abc");
        fs::create_dir_all(scratch.join("out/deep")).unwrap();
        std::os::unix::fs::symlink(&outside, scratch.join("out/link")).unwrap();
        std::os::unix::fs::symlink(&outside, scratch.join("out/deep/link")).unwrap();
        fs::set_permissions(scratch.join("out/deep"), std::fs::Permissions::from_mode(0o000)).unwrap();
        fs::set_permissions(scratch.join("out"), std::fs::Permissions::from_mode(0o500)).unwrap();
        Store::open(&root, false).unwrap();
        assert!(fs::symlink_metadata(&scratch).is_err(), "the dead run's scratch is still there");
        assert_eq!(fs::read_to_string(outside.join("keep")).unwrap(), "keep");
        assert_eq!(fs::metadata(&outside).unwrap().permissions().mode() & 0o777, 0o555);
    }

    /// Files written from guest data go into private directories, made anew: a link
    /// planted at the name is never written through, a directory left open is closed.
    #[test]
    fn private_files_never_follow_a_planted_link() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, "keep").unwrap();
        let logs = dir.path().join("a/logs");
        ensure_private_dir(&logs).unwrap();
        assert_eq!(fs::metadata(&logs).unwrap().permissions().mode() & 0o7777, 0o700);
        fs::set_permissions(&logs, std::fs::Permissions::from_mode(0o777)).unwrap();
        ensure_private_dir(&logs).unwrap();
        assert_eq!(fs::metadata(&logs).unwrap().permissions().mode() & 0o7777, 0o700);
        let planted = logs.join("run.log");
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        assert!(create_private_file(&planted).is_err(), "a planted link was followed");
        assert_eq!(fs::read_to_string(&victim).unwrap(), "keep");
        fs::remove_file(&planted).unwrap();
        let mut file = create_private_file(&planted).unwrap();
        file.write_all(b"guest text").unwrap();
        assert_eq!(fs::metadata(&planted).unwrap().permissions().mode() & 0o7777, 0o600);
        // A link where the directory should be is an error, not followed.
        let linked = dir.path().join("linked");
        std::os::unix::fs::symlink(dir.path(), &linked).unwrap();
        assert!(ensure_private_dir(&linked).is_err());
    }

    /// Whether scratch is in use is its lock's say, not its PID's: a run in another PID
    /// namespace (whose PID means nothing here) keeps its scratch while it holds the
    /// lock, and a dead run's scratch goes even when its PID now names a live process.
    #[test]
    fn scratch_lives_as_long_as_its_lock_whatever_its_pid() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let store = Store::open(&root, false).unwrap();
        let live = store.scratch("xchg").unwrap();
        fs::write(live.path().join("data"), "x").unwrap();
        // The same scratch seen from another PID namespace: a PID that does not exist here.
        let foreign = root.join(".tmp").join(live.path().file_name().unwrap().to_string_lossy().replacen(
            &format!("scratch-{}-", std::process::id()),
            "scratch-4194304-",
            1,
        ));
        fs::rename(live.path(), &foreign).unwrap();
        // A dead run's scratch whose PID is now a live process's (this one's): its lock
        // is free.
        let dead = {
            let s = store.scratch("xchg").unwrap();
            let kept = root.join(".tmp").join(format!("{}.dead", s.path().file_name().unwrap().to_string_lossy()));
            fs::rename(s.path(), &kept).unwrap();
            kept
        };
        drop(store);
        Store::open(&root, false).unwrap();
        assert!(foreign.join("data").is_file(), "a live run's scratch was removed");
        assert!(fs::symlink_metadata(&dead).is_err(), "a dead run's scratch was kept");
        drop(live);
    }

    /// A store of the earlier layout (items and `.meta` files side by side in the top
    /// directory) is moved to the new one when opened.
    #[test]
    fn an_earlier_layout_is_moved() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), false).unwrap();
        let item = store
            .realise(&Recipe::new("test", "old"), |out| {
                fs::create_dir(out)?;
                fs::write(out.join("f"), "f")?;
                Ok(())
            })
            .unwrap();
        let old_item = dir.path().join(item.file_name());
        fs::rename(&item.path, &old_item).unwrap();
        fs::rename(store.meta_path(&item), dir.path().join(format!("{}.meta", item.file_name()))).unwrap();
        fs::remove_file(dir.path().join(".layout")).unwrap();
        let store = Store::open(dir.path(), false).unwrap();
        assert!(store.is_present(&item) && !old_item.exists());
        assert_eq!(store.verify().unwrap(), vec![]);
        assert!(dir.path().join(".layout").is_file());
    }

    /// A crash at any step of a commit leaves no item or a complete one; the next build
    /// succeeds and the store verifies. Each step runs in a child process (this test
    /// binary, running `commit_fault_child`) that aborts there.
    #[test]
    fn a_crash_at_any_commit_step_leaves_no_item_or_a_complete_one() {
        let exe = std::env::current_exe().unwrap();
        for step in 1..=6 {
            let dir = tempfile::tempdir().unwrap();
            let mut child = crate::process::command(&exe);
            child
                .args(["--exact", "store::tests::commit_fault_child", "--ignored", "--nocapture"])
                .env(FAULT_ENV, step.to_string())
                .env("XTASK_FAULT_STORE", dir.path());
            let out = crate::process::output(&child).unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "step {step}: the child did not abort: {stderr}");
            assert!(stderr.contains(&format!("aborting at commit step {step}")), "step {step}: {stderr}");
            let store = Store::open(dir.path(), false).unwrap();
            let item = store.item_for(&fault_recipe());
            for p in store.verify().unwrap() {
                assert!(p.what.starts_with("incomplete"), "step {step}: damage after a crash: {p:?}");
            }
            if store.is_present(&item) {
                assert_eq!(store.meta(&item).unwrap().content_sha256, hash_path(&item.path).unwrap());
            }
            let built = store.realise(&fault_recipe(), fault_build).unwrap();
            assert_eq!(fs::read_to_string(built.path.join("sub/f")).unwrap(), "content");
            assert_eq!(store.verify().unwrap(), vec![], "step {step}");
        }
    }

    fn fault_recipe() -> Recipe {
        Recipe::new("test", "crash")
    }

    fn fault_build(out: &Path) -> Result<()> {
        fs::create_dir_all(out.join("sub"))?;
        fs::write(out.join("sub/f"), "content")?;
        Ok(())
    }

    #[test]
    #[ignore = "run by a_crash_at_any_commit_step_leaves_no_item_or_a_complete_one"]
    fn commit_fault_child() {
        let dir = std::env::var_os("XTASK_FAULT_STORE").expect("run by the parent test");
        let store = Store::open(Path::new(&dir), false).unwrap();
        store.realise(&fault_recipe(), fault_build).unwrap();
    }

    #[test]
    fn failed_build_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), false).unwrap();
        let recipe = Recipe::new("test", "broken");
        let err = store
            .realise(&recipe, |out| {
                fs::create_dir(out)?;
                fs::write(out.join("half"), "x")?;
                bail!("boom")
            })
            .unwrap_err();
        assert!(format!("{err:#}").contains("boom"));
        assert!(!store.is_present(&store.item_for(&recipe)));
        assert!(!store.item_for(&recipe).path.exists());
        assert_eq!(fs::read_dir(dir.path().join(".tmp")).unwrap().count(), 0);
    }

    #[test]
    fn tree_hash_covers_names_content_exec_bit_and_links() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("t");
        fs::create_dir(&t).unwrap();
        fs::write(t.join("a"), "1").unwrap();
        let h1 = hash_path(&t).unwrap();
        fs::set_permissions(t.join("a"), std::fs::Permissions::from_mode(0o755)).unwrap();
        let h2 = hash_path(&t).unwrap();
        assert_ne!(h1, h2);
        std::os::unix::fs::symlink("a", t.join("b")).unwrap();
        let h3 = hash_path(&t).unwrap();
        assert_ne!(h2, h3);
        fs::write(t.join("a"), "2").unwrap();
        assert_ne!(h3, hash_path(&t).unwrap());
        nix::unistd::mkfifo(&t.join("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        assert!(hash_path(&t).is_err());
    }

    /// Two cleaners removing the same leftovers at once both succeed: what the other
    /// removed first counts as removed.
    #[test]
    fn concurrent_removals_of_one_tree_both_succeed() {
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let tree = dir.path().join("leftover");
            for d in 0..20 {
                let sub = tree.join(format!("d{d}"));
                fs::create_dir_all(&sub).unwrap();
                for f in 0..50 {
                    fs::write(sub.join(format!("f{f}")), "x").unwrap();
                }
                fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o555)).unwrap();
            }
            let (a, b) = (tree.clone(), tree.clone());
            let one = std::thread::spawn(move || remove_tree(&a));
            let two = std::thread::spawn(move || remove_tree(&b));
            one.join().unwrap().unwrap();
            two.join().unwrap().unwrap();
            assert!(!tree.exists());
        }
    }
}
