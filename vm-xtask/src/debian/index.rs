//! xtask's own Debian index: apt's package lists for the release `vm.lock` names, kept in
//! a directory of its own (`<store>/debian-index/<key>/`, or `XTASK_DEBIAN_INDEX`) and
//! made rootless with `apt-get update` under a configuration of its own (`apt.conf`:
//! its own lists, cache, empty dpkg status, no preferences, no host configuration
//! parts), its own sources (signed by Debian's archive keys, so apt verifies every
//! `InRelease`), its own architecture. The host's apt lists are never read for a
//! decision and never written: empty, stale or fresh, the result is the same.
//!
//! The sources are the workspace's `vm.sources` (beside the lock file, the one-line
//! `sources.list` format) when there is one, else the host's configured Debian mirrors
//! with the suites of the lock's release (`RELEASE`, `RELEASE-updates` on a main mirror,
//! `RELEASE-security` on a security mirror), else `deb.debian.org`. The key of the
//! directory is a hash of the sources and the configuration, so each set of sources
//! has its own lists.
//!
//! The lists are fetched on first use and refreshed only when something needed is
//! missing from them (a package, a version) or on `lock --update`, saying so in one line.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use fs_err as fs;
use sha2::{Digest, Sha256};

use crate::host;
use os_configs::Arch;

/// Moves the index (default: `debian-index/` in the store's directory).
pub const INDEX_ENV: &str = "XTASK_DEBIAN_INDEX";
/// The workspace's own sources, beside the lock file.
pub const SOURCES_FILE: &str = "vm.sources";
/// Debian's archive keys, in Debian's `debian-archive-keyring` package.
pub const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
/// Where the lists come from when the host names no Debian mirror.
const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
const DEFAULT_SECURITY_MIRROR: &str = "http://deb.debian.org/debian-security";
/// Debian's release names and aliases: a host source with one of these suites (or one
/// of their `-updates`, `-security`, `-backports` suites) is a Debian mirror.
const DEBIAN_SUITES: &[&str] = &[
    "buster",
    "bullseye",
    "bookworm",
    "trixie",
    "forky",
    "duke",
    "sid",
    "stable",
    "oldstable",
    "oldoldstable",
    "testing",
    "unstable",
];

/// The indexes (directories) refreshed in this process: each at most once, whatever asks.
static REFRESHED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// The index of one set of sources: its directory and the configuration apt runs with.
#[derive(Debug, Clone)]
pub struct Index {
    dir: PathBuf,
    sources: String,
    /// Where the sources came from, for messages.
    origin: String,
    mirrors: Vec<String>,
    /// The architecture whose packages it lists.
    arch: Arch,
}

impl Index {
    /// The amd64 index for this workspace's lock file and store (nothing fetched yet).
    pub fn current() -> Result<Index> {
        Index::for_arch(Arch::X86_64)
    }

    /// The index of `arch`'s packages for this workspace's lock file and store (nothing
    /// fetched yet).
    pub fn for_arch(arch: Arch) -> Result<Index> {
        let ws = crate::Workspace::current();
        let base = std::env::var_os(INDEX_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| ws.store_dir.join(crate::store::DEBIAN_INDEX));
        let lock = crate::debian::lock::path();
        let release = crate::debian::lock::release()?;
        let workspace_sources = lock.parent().unwrap_or(Path::new(".")).join(SOURCES_FILE);
        let (sources, origin) = match fs::read_to_string(&workspace_sources) {
            Ok(text) => (text, format!("`{}`", workspace_sources.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let entries = host_entries();
                (default_sources(&entries, &release)?, "the host's Debian mirrors".to_string())
            }
            Err(e) => return Err(e).context("reading the workspace's Debian sources"),
        };
        Index::of_arch(&base, sources, origin, arch)
    }

    /// The amd64 index of `sources` (a `sources.list`) under `base`.
    #[cfg(test)]
    pub fn new(base: &Path, sources: String, origin: String) -> Result<Index> {
        Index::of_arch(base, sources, origin, Arch::X86_64)
    }

    /// The index of `arch`'s packages from `sources` under `base`, in a directory keyed
    /// by both (amd64's by the sources alone, as before there were others).
    fn of_arch(base: &Path, sources: String, origin: String, arch: Arch) -> Result<Index> {
        let mirrors = super::one_line_uris(&sources);
        if mirrors.is_empty() {
            bail!("{origin} names no Debian mirror (no `deb URI SUITE COMPONENT...` line)");
        }
        let qualifier = match arch {
            Arch::X86_64 => String::new(),
            other => format!("{}\n", other.debian()),
        };
        let key = hex(&Sha256::digest(format!("{CONF_VERSION}\n{qualifier}{sources}").as_bytes()))[..16].to_string();
        Ok(Index { dir: base.join(key), sources, origin, mirrors, arch })
    }

    /// The index's directory (its lists, caches and sources).
    #[cfg(test)]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The mirrors of its sources, in order.
    pub fn mirrors(&self) -> &[String] {
        &self.mirrors
    }

    /// Where the sources came from: the workspace's file or the host's mirrors.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The configuration file apt reads (`APT_CONFIG`).
    pub fn config(&self) -> PathBuf {
        self.dir.join("apt.conf")
    }

    /// `program` (apt-get, apt-cache, apt-helper) with this index's configuration.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> std::process::Command {
        let mut cmd = crate::process::command(program);
        cmd.env("APT_CONFIG", self.config()).env("LC_ALL", "C");
        cmd
    }

    /// Makes the directory and its configuration; fetches the lists when it has none.
    pub fn ready(&self) -> Result<&Index> {
        self.prepare()?;
        if !self.has_lists() {
            self.update("no lists yet")?;
        }
        Ok(self)
    }

    /// Fetches the lists again (at most once per process), saying why in one line;
    /// returns whether it did.
    pub fn refresh(&self, why: &str) -> Result<bool> {
        if self.refreshed() {
            return Ok(false);
        }
        self.prepare()?;
        self.update(why)?;
        Ok(true)
    }

    fn refreshed(&self) -> bool {
        REFRESHED.lock().unwrap_or_else(|e| e.into_inner()).contains(&self.dir)
    }

    fn has_lists(&self) -> bool {
        fs::read_dir(self.dir.join("lists"))
            .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().contains("_Packages")))
            .unwrap_or(false)
    }

    /// Makes the directory, its configuration and sources (no list is fetched).
    pub fn prepare(&self) -> Result<()> {
        for sub in ["lists/partial", "cache/archives/partial", "parts", "preferences.d", "trusted.gpg.d"] {
            create_private_dirs(&self.dir.join(sub))?;
        }
        let d = self.dir.display();
        let arch = self.arch.debian();
        let mut conf = format!(
            "// xtask's own Debian index ({CONF_VERSION}): nothing of the host's apt state is read or written.\n\
             Dir::State \"{d}/\";\nDir::State::Lists \"{d}/lists/\";\nDir::State::status \"{d}/status\";\n\
             Dir::Cache \"{d}/cache/\";\nDir::Etc::SourceList \"{d}/sources.list\";\n\
             Dir::Etc::SourceParts \"{d}/parts/\";\nDir::Etc::Parts \"{d}/parts/\";\n\
             Dir::Etc::Preferences \"{d}/preferences\";\nDir::Etc::PreferencesParts \"{d}/preferences.d/\";\n\
             Dir::Etc::Trusted \"{d}/trusted.gpg\";\nDir::Etc::TrustedParts \"{d}/trusted.gpg.d/\";\n\
             APT::Architecture \"{arch}\";\nAPT::Architectures {{ \"{arch}\"; }};\n\
             Acquire::Languages \"none\";\nAcquire::GzipIndexes \"true\";\n\
             Acquire::CompressionTypes::Order {{ \"xz\"; \"gz\"; }};\nDir::Cache::srcpkgcache \"\";\n\
             APT::Install-Recommends \"false\";\nAPT::Install-Suggests \"false\";\n"
        );
        if host::is_root() {
            // apt's download sandbox user cannot write into a private root-owned directory.
            conf.push_str("APT::Sandbox::User \"root\";\n");
        }
        write_if_changed(&self.config(), &conf)?;
        write_if_changed(&self.dir.join("sources.list"), &self.sources)?;
        write_if_changed(&self.dir.join("status"), "")?;
        Ok(())
    }

    /// `apt-get update` into the index, under its lock (another run may be updating it).
    fn update(&self, why: &str) -> Result<()> {
        host::ensure(&[host::APT_GET])?;
        let _lock = self.lock()?;
        {
            let mut refreshed = REFRESHED.lock().unwrap_or_else(|e| e.into_inner());
            if refreshed.contains(&self.dir) {
                return Ok(());
            }
            refreshed.push(self.dir.clone());
        }
        // apt stalls rather than fails when the disk fills under it: make sure first.
        if let Some(full) = crate::store::space::explain_dir(&self.dir, Some(LISTS_BYTES)) {
            bail!("{full}\nxtask's Debian index needs about {} MiB for Debian's package lists", LISTS_BYTES >> 20);
        }
        let suites: Vec<String> = self.sources.lines().filter_map(suite_words).collect();
        eprintln!(
            "xtask's Debian index: {why}; fetching the {} package lists of {} from {} into `{}`",
            self.arch.debian(),
            suites.join(", "),
            self.origin,
            self.dir.display()
        );
        let out = crate::process::output(self.command("apt-get").args(["update", "-q"]))?;
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        // apt-get update exits 0 with `W:`/`E:` lines for a source it could not fetch.
        let errors: Vec<&str> = said.lines().filter(|l| l.starts_with("E:") || l.starts_with("W:")).collect();
        if !out.status.success() || !self.has_lists() || errors.iter().any(|l| l.starts_with("E:")) {
            // What apt left half-fetched is not kept.
            if let Ok(partial) = fs::read_dir(self.dir.join("lists/partial")) {
                for entry in partial.flatten() {
                    let _ = fs::remove_file(entry.path());
                }
            }
            let err = anyhow::anyhow!(
                "fetching the package lists of xtask's Debian index failed ({}): {}\nthe sources are {} ({}); check \
                 the network and the mirrors, or put a `{SOURCES_FILE}` of your own beside vm.lock",
                out.status,
                if errors.is_empty() {
                    said.lines().last().unwrap_or("no output").to_string()
                } else {
                    errors.join(" ")
                },
                self.origin,
                self.dir.join("sources.list").display()
            );
            return Err(crate::store::space::annotate(err, &self.dir, None));
        }
        Ok(())
    }

    fn lock(&self) -> Result<std::fs::File> {
        let path = self.dir.join("xtask.lock");
        let file = std::fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening `{}`", path.display()))?;
        file.lock().with_context(|| format!("locking `{}`", path.display()))?;
        Ok(file)
    }
}

/// What fetching the lists takes on disk, with a margin: Debian 12's are about 20 MB
/// compressed, apt's cache of them 36 MB.
const LISTS_BYTES: u64 = 80 << 20;

/// Bumped when the configuration written changes meaning: a new directory then.
const CONF_VERSION: &str = "index-2";

/// `SUITE` words of a `deb` line, for the message: `URI SUITE`.
fn suite_words(line: &str) -> Option<String> {
    let line = line.split('#').next()?;
    let mut words: Vec<&str> = line.split_whitespace().collect();
    if words.first() != Some(&"deb") {
        return None;
    }
    words.remove(0);
    if words.first().is_some_and(|w| w.starts_with('[')) {
        let end = words.iter().position(|w| w.ends_with(']'))?;
        words.drain(..=end);
    }
    Some(words.get(1)?.to_string())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn create_private_dirs(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating `{}`", dir.display()))
        .map_err(|e| crate::store::space::annotate(e, dir, None))
}

fn write_if_changed(path: &Path, text: &str) -> Result<()> {
    if fs::read_to_string(path).is_ok_and(|t| t == text) {
        return Ok(());
    }
    crate::store::write_atomically(path, text.as_bytes()).map_err(|e| crate::store::space::annotate(e, path, None))
}

/// One `deb` source of the host's apt configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceEntry {
    pub uri: String,
    pub suites: Vec<String>,
    pub components: Vec<String>,
}

/// The `deb` sources of the host (`/etc/apt/sources.list`, and `sources.list.d/` in both
/// formats), in order.
pub fn host_entries() -> Vec<SourceEntry> {
    let mut entries = Vec::new();
    if let Ok(text) = fs::read_to_string("/etc/apt/sources.list") {
        entries.extend(one_line_entries(&text));
    }
    let mut parts: Vec<_> =
        fs::read_dir("/etc/apt/sources.list.d").map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    parts.sort();
    for path in parts {
        let Ok(text) = fs::read_to_string(&path) else { continue };
        match path.extension().and_then(|e| e.to_str()) {
            Some("sources") => entries.extend(deb822_entries(&text)),
            Some("list") => entries.extend(one_line_entries(&text)),
            _ => {}
        }
    }
    entries
}

/// Entries of `deb` lines in the one-line format: `deb [options] URI suite components`.
pub fn one_line_entries(text: &str) -> Vec<SourceEntry> {
    let mut found = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default();
        let mut words: Vec<&str> = line.split_whitespace().collect();
        if words.first() != Some(&"deb") {
            continue;
        }
        words.remove(0);
        if words.first().is_some_and(|w| w.starts_with('[')) {
            let Some(end) = words.iter().position(|w| w.ends_with(']')) else { continue };
            words.drain(..=end);
        }
        if let [uri, suite, components @ ..] = words.as_slice() {
            found.push(SourceEntry {
                uri: uri.to_string(),
                suites: vec![suite.to_string()],
                components: components.iter().map(|c| c.to_string()).collect(),
            });
        }
    }
    found
}

/// Entries of the stanzas with `Types: deb` in the deb822 format (`Enabled: no` skipped).
pub fn deb822_entries(text: &str) -> Vec<SourceEntry> {
    let mut found = Vec::new();
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
                l.split_once(':').filter(|(k, _)| k.trim().eq_ignore_ascii_case(name)).map(|(_, v)| v.trim())
            })
        };
        let words = |name: &str| -> Vec<String> {
            field(name).map(|v| v.split_whitespace().map(str::to_string).collect()).unwrap_or_default()
        };
        let is_deb = field("Types").is_some_and(|t| t.split_whitespace().any(|t| t == "deb"));
        if !is_deb || field("Enabled") == Some("no") {
            continue;
        }
        for uri in words("URIs") {
            found.push(SourceEntry { uri, suites: words("Suites"), components: words("Components") });
        }
    }
    found
}

/// A suite's release: `bookworm-security` is `bookworm`'s.
fn release_of(suite: &str) -> &str {
    let suite = suite.trim_end_matches('/');
    for tail in ["-updates", "-security", "-backports", "-proposed-updates", "/updates"] {
        if let Some(release) = suite.strip_suffix(tail) {
            return release;
        }
    }
    suite
}

/// The sources of the index when the workspace has none: the host's Debian mirrors
/// (main and security) with the suites of `release`, signed by Debian's archive keys.
pub fn default_sources(entries: &[SourceEntry], release: &str) -> Result<String> {
    if !Path::new(KEYRING).is_file() {
        bail!(
            "Debian's archive keys (`{KEYRING}`) are not on this machine: install them (`apt-get install \
             debian-archive-keyring`), or put a `{SOURCES_FILE}` of your own beside vm.lock"
        );
    }
    sources_for(entries, release, KEYRING)
}

/// [`default_sources`] with the keyring given.
pub fn sources_for(entries: &[SourceEntry], release: &str, keyring: &str) -> Result<String> {
    if release.is_empty() || !release.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        bail!("vm.lock names an unusual Debian release {release:?}");
    }
    let debian = |e: &&SourceEntry| e.suites.iter().any(|s| DEBIAN_SUITES.contains(&release_of(s)));
    let security = |e: &SourceEntry| e.suites.iter().any(|s| s.ends_with("-security") || s.ends_with("/updates"));
    let mut main = Vec::new();
    let mut secure = Vec::new();
    for entry in entries.iter().filter(debian) {
        let list = if security(entry) { &mut secure } else { &mut main };
        if !list.contains(&entry.uri) {
            list.push(entry.uri.clone());
        }
    }
    if main.is_empty() {
        main.push(DEFAULT_MIRROR.to_string());
    }
    if secure.is_empty() {
        secure.push(DEFAULT_SECURITY_MIRROR.to_string());
    }
    let mut text = String::new();
    for uri in &main {
        text.push_str(&format!("deb [signed-by={keyring}] {uri} {release} main\n"));
        text.push_str(&format!("deb [signed-by={keyring}] {uri} {release}-updates main\n"));
    }
    for uri in &secure {
        text.push_str(&format!("deb [signed-by={keyring}] {uri} {release}-security main\n"));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_from_both_formats() {
        let list = "# comment\ndeb http://deb.debian.org/debian bookworm main\n\
                    deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian bookworm main contrib\n\
                    deb-src http://src.example/debian bookworm main\n";
        let found = one_line_entries(list);
        assert_eq!(found.len(), 2);
        assert_eq!(found[1].uri, "http://mirror.example/debian");
        assert_eq!(found[1].components, ["main", "contrib"]);
        let sources = "Types: deb\n# http://snapshot.debian.org/archive/debian/20250520T000000Z\n\
                       URIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\n\
                       Types: deb-src\nURIs: http://src.example/debian\n\n\
                       Types: deb\nURIs: http://off.example/debian\nEnabled: no\n\n\
                       Types: deb\nURIs: http://a.example/d http://b.example/d\nSuites: trixie-security\n";
        let found = deb822_entries(sources);
        let uris: Vec<&str> = found.iter().map(|e| e.uri.as_str()).collect();
        assert_eq!(uris, ["http://deb.debian.org/debian", "http://a.example/d", "http://b.example/d"]);
        assert_eq!(found[0].suites, ["bookworm", "bookworm-updates"]);
    }

    #[test]
    fn only_debian_mirrors_are_taken_with_the_locked_release() {
        let entries = [
            SourceEntry { uri: "http://m.example/debian".into(), suites: vec!["trixie".into()], components: vec![] },
            SourceEntry {
                uri: "https://deb.nodesource.com/node_20.x".into(),
                suites: vec!["nodistro".into()],
                components: vec![],
            },
            SourceEntry {
                uri: "https://packages.example/apt".into(),
                suites: vec!["cloud-sdk-bookworm".into()],
                components: vec![],
            },
            SourceEntry {
                uri: "http://s.example/debian-security".into(),
                suites: vec!["trixie-security".into()],
                components: vec![],
            },
        ];
        let text = sources_for(&entries, "bookworm", "/k.gpg").unwrap();
        assert_eq!(
            text,
            "deb [signed-by=/k.gpg] http://m.example/debian bookworm main\n\
             deb [signed-by=/k.gpg] http://m.example/debian bookworm-updates main\n\
             deb [signed-by=/k.gpg] http://s.example/debian-security bookworm-security main\n"
        );
        // No Debian mirror on the host: Debian's own.
        let text = sources_for(&entries[1..3], "bookworm", "/k.gpg").unwrap();
        assert!(text.starts_with("deb [signed-by=/k.gpg] http://deb.debian.org/debian bookworm main\n"), "{text}");
        assert!(text.contains("http://deb.debian.org/debian-security bookworm-security main"), "{text}");
        assert!(sources_for(&entries, "bookworm main\ndeb x", "/k.gpg").is_err());
    }

    #[test]
    fn the_directory_is_keyed_by_the_sources() {
        let base = Path::new("/nonexistent");
        let a = Index::new(base, "deb http://a/debian bookworm main\n".into(), "a".into()).unwrap();
        let b = Index::new(base, "deb http://b/debian bookworm main\n".into(), "b".into()).unwrap();
        assert_ne!(a.dir(), b.dir());
        assert_eq!(a.mirrors(), ["http://a/debian"]);
        assert!(Index::new(base, "# nothing\n".into(), "empty".into()).is_err());
        assert_eq!(suite_words("deb [trusted=yes] file:/r ./ main").as_deref(), Some("./"));
    }
}
