//! Debian packages as store items: a package name is resolved once, in xtask's own
//! Debian index ([`index`]), to a version, its pool path and the `.deb`'s sha256 (a
//! *pin*, kept in the workspace's lock file `vm.lock`, see [`crate::debian::lock`]), fetched by
//! its pool path from the index's mirrors, checked against the pin and unpacked with
//! `dpkg-deb -x`; no root is needed for any of it, and the host's apt lists play no part.

use fs_err as fs;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};

use crate::host;
use crate::store::{self, Item, Recipe, Store};
use index::Index;
use os_configs::Arch;

pub mod closure;
pub mod gdb;
pub mod image_tools;
pub mod index;
pub mod lock;
pub mod profile;
pub mod qemu;
pub mod registry_server;

/// A package resolved to an exact version, where the archive keeps it and its `.deb`'s
/// hash: one entry of the lock file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pin {
    pub package: String,
    pub version: String,
    pub architecture: String,
    /// The `.deb`'s path in the archive (`Filename:`, `pool/main/...`), relative to a
    /// mirror's root.
    pub filename: String,
    pub sha256: String,
    pub size: u64,
    /// The packages (names of other pins) this one's `Depends` and `Pre-Depends` resolved
    /// to, when its dependency closure has been locked ([`closure`]); `None` otherwise.
    pub depends: Option<Vec<String>>,
}

/// The fields of one `apt-cache show` stanza that matter here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stanza {
    /// Package, version, architecture, pool path, size and sha256 (`depends` unset: that
    /// is the lock's, resolved against a closure).
    pub pin: Pin,
    /// The first alternative of each `Depends`/`Pre-Depends` clause.
    pub depends: Vec<String>,
    /// Each `Depends`/`Pre-Depends` clause: its alternatives, names only.
    pub relations: Vec<Vec<String>>,
    /// The virtual packages it provides.
    pub provides: Vec<String>,
}

/// Parses the first stanza of `apt-cache show` output.
pub fn parse_stanza(text: &str) -> Option<Stanza> {
    let mut s = Stanza::default();
    for line in text.lines() {
        if line.is_empty() {
            break;
        }
        let Some((key, value)) = line.split_once(": ") else { continue };
        match key {
            "Package" => s.pin.package = value.to_string(),
            "Version" => s.pin.version = value.to_string(),
            "SHA256" => s.pin.sha256 = value.to_string(),
            "Architecture" => s.pin.architecture = value.to_string(),
            "Filename" => s.pin.filename = value.to_string(),
            "Size" => s.pin.size = value.parse().unwrap_or(0),
            "Depends" | "Pre-Depends" => {
                for clause in value.split(',') {
                    let alternatives: Vec<String> = clause.split('|').filter_map(relation_name).collect();
                    s.depends.extend(alternatives.first().cloned());
                    s.relations.push(alternatives);
                }
            }
            "Provides" => s.provides.extend(value.split(',').filter_map(relation_name)),
            _ => {}
        }
    }
    let p = &s.pin;
    (!p.package.is_empty() && !p.version.is_empty() && !p.sha256.is_empty()).then_some(s)
}

/// The package a relation names: `libc6 (>= 2.34)` and `python3:any` name `libc6` and
/// `python3`.
fn relation_name(relation: &str) -> Option<String> {
    let name = relation.split_whitespace().next()?;
    Some(name.split(':').next().unwrap_or(name).to_string())
}

/// Every stanza of `apt-cache show` output.
pub fn parse_stanzas(text: &str) -> Vec<Stanza> {
    text.split("\n\n").filter_map(parse_stanza).collect()
}

/// The candidate stanzas xtask's own Debian index ([`index`]) has for `names` (those it
/// knows); a name it does not know makes it fetch its lists again, once per process.
fn show(index: &Index, names: &[String]) -> Result<Vec<Stanza>> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    index.ready()?;
    let ask = || -> Result<Vec<Stanza>> {
        let out = crate::process::output(index.command("apt-cache").args(["show", "--no-all-versions"]).args(names))?;
        Ok(parse_stanzas(&String::from_utf8_lossy(&out.stdout)))
    };
    let mut stanzas = ask()?;
    let missing: Vec<&str> =
        names.iter().filter(|n| !stanzas.iter().any(|s| &s.pin.package == *n)).map(String::as_str).collect();
    if !missing.is_empty() && index.refresh(&format!("it does not know {}", missing.join(", ")))? {
        stanzas = ask()?;
    }
    Ok(stanzas)
}

/// `name` as the lock file knows a package of `arch`: as it is for amd64, with Debian's
/// architecture qualifier otherwise (`busybox-static:arm64`).
pub fn qualified(name: &str, arch: Arch) -> String {
    match arch {
        Arch::X86_64 => name.to_string(),
        other => format!("{name}:{}", other.debian()),
    }
}

/// The package and architecture of a name [`qualified`] (or not: amd64).
pub fn unqualified(name: &str) -> (&str, Arch) {
    match name.rsplit_once(':') {
        Some((bare, qualifier)) => match Arch::parse(qualifier) {
            Some(arch) => (bare, arch),
            None => (name, Arch::X86_64),
        },
        None => (name, Arch::X86_64),
    }
}

/// A Debian kernel package for `arch`: Debian names kernels after their architecture, so
/// one named for amd64 (`linux-image-amd64`, `linux-image-6.1.0-57-amd64`) is taken as
/// the same kernel for `arch` (`linux-image-arm64`); other names are left as they are.
pub fn kernel_package(package: &str, arch: Arch) -> String {
    match (arch, package.strip_suffix("-amd64")) {
        (Arch::X86_64, _) | (_, None) => package.to_string(),
        (other, Some(stem)) => format!("{stem}-{}", other.debian()),
    }
}

/// What `name` ([`qualified`]) resolves to today in xtask's own Debian index of its
/// architecture: its candidate, or, for a kernel metapackage (`linux-image-amd64`), the
/// real image package it depends on.
pub fn resolve(name: &str) -> Result<Stanza> {
    let (bare, arch) = unqualified(name);
    let index = Index::for_arch(arch)?;
    resolve_in(&index, bare)
}

fn resolve_in(index: &Index, name: &str) -> Result<Stanza> {
    let stanza = show(index, &[name.to_string()])?.into_iter().find(|s| s.pin.package == name).with_context(|| {
        format!(
            "Debian package `{name}` is unknown to xtask's Debian index (release {}, from {}); check the name",
            crate::debian::lock::release().unwrap_or_default(),
            index.origin()
        )
    })?;
    match stanza.depends.iter().find(|d| is_versioned_image_package(d)) {
        Some(real) if is_image_metapackage(&stanza.pin.package) => resolve_in(index, &real.clone()),
        _ => Ok(stanza),
    }
}

/// [`resolve`] for many names, asking `apt-cache` once (it takes most of a second to
/// start); by name.
pub fn resolve_many(names: &[String]) -> Result<std::collections::BTreeMap<String, Stanza>> {
    let mut resolved = std::collections::BTreeMap::new();
    if names.is_empty() {
        return Ok(resolved);
    }
    // Other architectures' packages (few), one by one.
    let (native, others): (Vec<String>, Vec<String>) =
        names.iter().cloned().partition(|n| unqualified(n).1 == Arch::X86_64);
    for name in others {
        let stanza = resolve(&name)?;
        resolved.insert(name, stanza);
    }
    let names = &native;
    if names.is_empty() {
        return Ok(resolved);
    }
    let index = Index::current()?;
    let stanzas = show(&index, names)?;
    for name in names {
        match stanzas.iter().find(|s| &s.pin.package == name) {
            Some(s) if is_image_metapackage(name) => {
                resolved.insert(name.clone(), resolve_in(&index, &s.pin.package)?);
            }
            Some(s) => {
                resolved.insert(name.clone(), s.clone());
            }
            // An unknown name: asked alone, for its own error.
            None => {
                resolved.insert(name.clone(), resolve_in(&index, name)?);
            }
        }
    }
    Ok(resolved)
}

/// `linux-image-6.1.0-56-amd64`, not `linux-image-amd64`.
pub fn is_versioned_image_package(name: &str) -> bool {
    name.strip_prefix("linux-image-").is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
}

fn is_image_metapackage(name: &str) -> bool {
    name.starts_with("linux-image-") && !is_versioned_image_package(name)
}

/// The pin of `name` in the workspace's lock file; a package not in it yet is resolved
/// ([`resolve`]) and added.
pub fn pin(name: &str) -> Result<Pin> {
    lock::pin(name, resolve)
}

/// A Debian package's closure, locked and unpacked in the store (a program run on the
/// host through libc6's loader: the store QEMU, gdb).
pub struct Unpacked {
    /// Each package's item, by name.
    pub items: Vec<(String, Item)>,
    /// Whose closure it is, for messages.
    what: String,
}

impl Unpacked {
    /// Locks (in `vm.lock`) and unpacks `package` with its closure, for `what` ("QEMU").
    pub fn closure(store: &Store, package: &str, what: &str) -> Result<Unpacked> {
        let closure =
            closure::closure(&[package.to_string()]).with_context(|| format!("locking {what}'s Debian packages"))?;
        let mut items = Vec::new();
        for (name, pin) in &closure {
            items.push((name.clone(), unpacked(store, pin).with_context(|| format!("unpacking `{name}`"))?));
        }
        Ok(Unpacked { items, what: what.to_string() })
    }

    /// The item of `package`.
    pub fn item(&self, package: &str) -> Result<&Item> {
        self.items
            .iter()
            .find(|(n, _)| n == package)
            .map(|(_, i)| i)
            .with_context(|| format!("`{package}` is not in {}'s closure", self.what))
    }

    /// A command running `program` (a path inside the item of `package`) through libc6's
    /// loader with the packages' libraries, as the wrapper script does with the items'
    /// own paths: the check a wrapper is made with.
    pub fn command(&self, package: &str, program: &str) -> Result<std::process::Command> {
        let libs = self.lib_dirs(|i| i.path.display().to_string()).join(":");
        let mut cmd = crate::process::command(self.item("libc6")?.path.join(LOADER));
        cmd.args(["--inhibit-cache", "--library-path", &libs]).arg(self.item(package)?.path.join(program));
        Ok(cmd)
    }

    /// The packages' library directories ([`LIB_DIRS`] that exist), each as `base(item)/DIR`.
    pub fn lib_dirs(&self, base: impl Fn(&Item) -> String) -> Vec<String> {
        let mut dirs = Vec::new();
        for (_, item) in &self.items {
            for dir in LIB_DIRS.iter().filter(|d| item.path.join(d).is_dir()) {
                dirs.push(format!("{}/{dir}", base(item)));
            }
        }
        dirs
    }
}

/// libc6's dynamic loader, inside its package: the store's Debian programs run through it.
pub const LOADER: &str = "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2";
/// Where Debian's packages put shared libraries.
pub const LIB_DIRS: &[&str] = &["lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu"];

/// libc6's dynamic loader inside its package for `arch`.
pub fn loader(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => LOADER,
        Arch::Aarch64 => "lib/aarch64-linux-gnu/ld-linux-aarch64.so.1",
    }
}

/// Where Debian's packages for `arch` put shared libraries.
pub fn lib_dirs(arch: Arch) -> &'static [&'static str] {
    match arch {
        Arch::X86_64 => LIB_DIRS,
        Arch::Aarch64 => &["lib/aarch64-linux-gnu", "usr/lib/aarch64-linux-gnu"],
    }
}

/// Where a [`write_loader_wrapper`] item has the loader under the name `name`; its script
/// execs `"${0%/*}/../` and this.
pub fn loader_link(name: &str) -> String {
    format!("libexec/{name}")
}

/// Fills the item directory `out` with a wrapper that runs program `name`, from Debian's
/// packages in the store, through libc6's loader: `libexec/NAME`, a link to the loader
/// under the program's name (a process is named after the file it was started from, so
/// it shows as NAME, not `ld-linux`), and `bin/NAME`, the `script` that execs it. `check`
/// runs the program through the loader by the items' own paths first: a wrapper over a
/// program that does not run is never stored.
pub fn write_loader_wrapper(
    out: &Path,
    libc6: &Item,
    name: &str,
    script: &str,
    check: &std::process::Command,
) -> Result<()> {
    crate::process::run(check).with_context(|| format!("`{name}` from the store does not run"))?;
    let link = out.join(loader_link(name));
    fs::create_dir_all(link.parent().context("a parent")?)?;
    std::os::unix::fs::symlink(format!("../../{}/{LOADER}", libc6.file_name()), &link)?;
    let bin = out.join("bin");
    fs::create_dir_all(&bin)?;
    let file = bin.join(name);
    fs::write(&file, script)?;
    fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    Ok(())
}

/// The unpacked package as a store item (its whole file tree, as `dpkg-deb -x` gives it).
pub fn unpacked(store: &Store, pin: &Pin) -> Result<Item> {
    store.realise(&unpacked_recipe(pin), |out| {
        host::ensure(&[host::APT_GET, host::DPKG_DEB])?;
        let scratch = store.scratch(&pin.package)?;
        let deb = download(store, pin, scratch.path())?;
        let _step = crate::progress::step(&format!("unpacking Debian package {} {}", pin.package, pin.version));
        crate::process::run(crate::process::command("dpkg-deb").arg("-x").arg(&deb).arg(out))
            .map_err(|e| store::space::annotate(e, out, None))?;
        // While the .deb is here: what its maintainer script would link.
        alternatives_from(store, pin, &deb)?;
        Ok(())
    })
}

/// The recipe of a package's unpacked tree.
fn unpacked_recipe(pin: &Pin) -> Recipe {
    Recipe::new("debian-package", &format!("{}-{}", pin.package, pin.version))
        .param("package", &pin.package)
        .param("version", &pin.version)
        .param("sha256", &pin.sha256)
}

/// One link `update-alternatives --install` makes in a package's `postinst`: the link,
/// the alternative's name, the file it points to, and its priority (a `--slave` link has
/// its master's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alternative {
    pub link: String,
    pub name: String,
    pub path: String,
    pub priority: i64,
}

fn alternatives_recipe(pin: &Pin) -> Recipe {
    Recipe::new("debian-alternatives", &format!("{}-{}-alternatives", pin.package, pin.version))
        .param("package", &pin.package)
        .param("version", &pin.version)
        .param("sha256", &pin.sha256)
}

/// The `update-alternatives` links the package's `postinst` makes, as an item (a file
/// `alternatives`, a line `PRIORITY NAME LINK PATH` each): made when the package is
/// unpacked, else from a fresh download.
pub fn alternatives(store: &Store, pin: &Pin) -> Result<Item> {
    let item = store.item_for(&alternatives_recipe(pin));
    if store.is_present(&item) {
        return Ok(item);
    }
    let scratch = store.scratch(&pin.package)?;
    let deb = download(store, pin, scratch.path())?;
    alternatives_from(store, pin, &deb)
}

fn alternatives_from(store: &Store, pin: &Pin, deb: &Path) -> Result<Item> {
    store.realise(&alternatives_recipe(pin), |out| {
        let control = store.scratch("control")?;
        crate::process::run(crate::process::command("dpkg-deb").arg("-e").arg(deb).arg(control.path().join("c")))?;
        let postinst = fs::read_to_string(control.path().join("c/postinst")).unwrap_or_default();
        let lines: String = parse_alternatives(&postinst)
            .iter()
            .map(|a| format!("{} {} {} {}\n", a.priority, a.name, a.link, a.path))
            .collect();
        fs::create_dir(out)?;
        fs::write(out.join("alternatives"), lines)?;
        Ok(())
    })
}

/// Reads an alternatives item's file.
pub fn read_alternatives(item: &Item) -> Result<Vec<Alternative>> {
    let text = fs::read_to_string(item.path.join("alternatives"))
        .with_context(|| format!("reading `{}`", item.path.join("alternatives").display()))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut w = l.split(' ');
            let priority = w.next()?.parse().ok()?;
            let (name, link, path) = (w.next()?, w.next()?, w.next()?);
            Some(Alternative { link: link.into(), name: name.into(), path: path.into(), priority })
        })
        .collect())
}

/// The `update-alternatives --install LINK NAME PATH PRIORITY [--slave LINK NAME PATH]...`
/// calls of a maintainer script (lines joined at a trailing `\`); one with a shell
/// variable or an unusual word in it is left out.
pub fn parse_alternatives(script: &str) -> Vec<Alternative> {
    let joined = script.replace("\\\n", " ");
    let mut found = Vec::new();
    for line in joined.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(at) = words.windows(2).position(|w| w[0] == "update-alternatives" && w[1] == "--install") else {
            continue;
        };
        let plain = |w: &&str| w.starts_with('/') && !w.contains(['$', '`', '"', '\'', ' ']);
        let rest = &words[at + 2..];
        let (Some(link), Some(name), Some(path), Some(priority)) =
            (rest.first(), rest.get(1), rest.get(2), rest.get(3))
        else {
            continue;
        };
        let Ok(priority) = priority.parse::<i64>() else { continue };
        if !plain(link) || !plain(path) || name.contains(['$', '/']) {
            continue;
        }
        found.push(Alternative { link: link.to_string(), name: name.to_string(), path: path.to_string(), priority });
        let mut slaves = &rest[4..];
        while let [flag, link, name, path, tail @ ..] = slaves {
            if *flag != "--slave" {
                break;
            }
            if plain(link) && plain(path) && !name.contains(['$', '/']) {
                found.push(Alternative {
                    link: link.to_string(),
                    name: name.to_string(),
                    path: path.to_string(),
                    priority,
                });
            }
            slaves = tail;
        }
    }
    found
}

/// Fetches the pinned `.deb` into `dir` by its pool path from each mirror of xtask's
/// Debian index in turn, with apt's own downloader (`apt-helper download-file`), and
/// checks its sha256. No package list is needed for it.
fn download(store: &Store, pin: &Pin, dir: &Path) -> Result<std::path::PathBuf> {
    let what = format!("{} {}", pin.package, pin.version);
    if pin.filename.is_empty() {
        bail!("vm.lock has no pool path for Debian package {what}; run `cargo xtask lock --update {}`", pin.package);
    }
    let index = Index::current()?;
    index.prepare()?;
    let size = if pin.size > 0 { format!(" ({:.1} MB)", pin.size as f64 / 1e6) } else { String::new() };
    // apt-helper writes the .deb in `dir`: its growth is the progress.
    let _step = crate::progress::step(&format!("fetching Debian package {what}{size}"))
        .watch_dir(dir, (pin.size > 0).then_some(pin.size));
    let needed = (pin.size > 0).then_some(pin.size);
    if let Some(full) = store::space::explain_dir(dir, needed) {
        bail!("{full}\nfetching Debian package {what} needs {} bytes there", pin.size);
    }
    let deb = dir.join(format!("{}_{}.deb", pin.package, pin.architecture));
    let mut tried = Vec::new();
    for mirror in index.mirrors() {
        let url = format!("{}/{}", mirror.trim_end_matches('/'), pin.filename.replace('+', "%2b"));
        let mut cmd = index.command(APT_HELPER);
        // The hash is checked here, not by apt-helper: a mismatch is said as such, naming both.
        cmd.args(["download-file", &url]).arg(&deb);
        let out = crate::process::output(&cmd)?;
        if out.status.success() && deb.is_file() {
            let actual = store::sha256_file(&deb)?;
            ensure!(
                actual == pin.sha256,
                "sha256 mismatch for Debian package {what}: locked {}, downloaded {actual}; refusing it",
                pin.sha256
            );
            return Ok(deb);
        }
        let _ = fs::remove_file(&deb);
        let said = String::from_utf8_lossy(&out.stderr).into_owned();
        if store::space::said_full(&said) {
            let err = anyhow::anyhow!("fetching Debian package {what} from {url} failed: {}", said.trim());
            return Err(store::space::annotate(err, dir, needed));
        }
        tried.push((url.clone(), fetch_failure(&said, &url)));
    }
    Err(not_on_mirrors(store, pin, &index, &tried))
}

/// Why apt-helper could not fetch `url`: the reason on its `E: Failed to fetch URL
/// REASON` line (`404  Not Found`, `Could not resolve ...`), else its last line.
fn fetch_failure(said: &str, url: &str) -> String {
    let reason = said.lines().find_map(|l| l.strip_prefix("E: Failed to fetch ")?.strip_prefix(url).map(str::trim));
    let last = || said.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("failed").trim();
    reason.filter(|r| !r.is_empty()).unwrap_or_else(last).to_string()
}

/// The error for a pinned package no mirror gave: gone from the mirrors (Debian drops
/// superseded versions) or not reachable, with the ways out.
fn not_on_mirrors(store: &Store, pin: &Pin, index: &Index, tried: &[(String, String)]) -> anyhow::Error {
    let what = format!("{} {}", pin.package, pin.version);
    let answers: Vec<String> = tried.iter().map(|(url, said)| format!("{url}: {said}")).collect();
    let gone =
        !tried.is_empty() && tried.iter().all(|(_, said)| said.contains("404") || said.contains("File not found"));
    let item = store.item_for(&unpacked_recipe(pin));
    let ways_out = format!(
        "two ways out: a registry substitute that has its store item `{}` (a `substitute` line in \
         vmstore.conf naming a registry that has it), or `cargo xtask lock --update {}` to lock the version the \
         mirrors offer now (and commit vm.lock)",
        item.file_name(),
        pin.package
    );
    if gone {
        anyhow::anyhow!(
            "cannot fetch Debian package {what} (locked in vm.lock, pool path `{}`): the mirrors no longer have \
             it (Debian drops superseded versions; asked {}: {}); {ways_out}",
            pin.filename,
            index.origin(),
            answers.join("; ")
        )
    } else {
        anyhow::anyhow!(
            "cannot fetch Debian package {what} (locked in vm.lock, pool path `{}`) from {} ({}); check the \
             network and the mirrors (a `{}` beside vm.lock names others), or {ways_out}",
            pin.filename,
            index.origin(),
            if answers.is_empty() { "no mirror".to_string() } else { answers.join("; ") },
            index::SOURCES_FILE
        )
    }
}

/// apt's downloader, in Debian's `apt` package.
pub const APT_HELPER: &str = "/usr/lib/apt/apt-helper";

/// URIs of `deb` lines in the one-line format: `deb [options] URI suite components`.
pub fn one_line_uris(text: &str) -> Vec<String> {
    let mut uris = Vec::new();
    for entry in index::one_line_entries(text) {
        if !uris.contains(&entry.uri) {
            uris.push(entry.uri);
        }
    }
    uris
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_apt_cache_show() {
        let text = "Package: linux-image-amd64\nSource: linux-signed-amd64 (6.1.192+2)\nVersion: 6.1.192-2\n\
                    Architecture: amd64\n\
                    Filename: pool/main/l/linux-signed-amd64/linux-image-amd64_6.1.192-2_amd64.deb\n\
                    Depends: linux-image-6.1.0-56-amd64 (= 6.1.192-2), foo | bar\nSize: 1480\n\
                    SHA256: abc123\nDescription: x\n\nPackage: other\n";
        let s = parse_stanza(text).unwrap();
        assert_eq!(s.pin.package, "linux-image-amd64");
        assert_eq!(s.pin.version, "6.1.192-2");
        assert_eq!(s.pin.sha256, "abc123");
        assert_eq!(s.pin.size, 1480);
        assert_eq!(s.pin.architecture, "amd64");
        assert_eq!(s.pin.filename, "pool/main/l/linux-signed-amd64/linux-image-amd64_6.1.192-2_amd64.deb");
        assert_eq!(s.depends, vec!["linux-image-6.1.0-56-amd64", "foo"]);
        assert_eq!(s.relations, vec![vec!["linux-image-6.1.0-56-amd64".to_string()], vec!["foo".into(), "bar".into()]]);
        let s = parse_stanza(
            "Package: p\nVersion: 1\nSHA256: x\nPre-Depends: libc6:any (>= 2)\nProvides: awk (= 1), x-www\n",
        )
        .unwrap();
        assert_eq!((s.depends, s.provides), (vec!["libc6".to_string()], vec!["awk".to_string(), "x-www".into()]));
        assert_eq!(parse_stanza("N: Unable to locate package x\n"), None);
    }

    #[test]
    fn fetch_failures_give_apts_reason() {
        let url = "http://m.example/debian/pool/x.deb";
        let said = format!(
            "Err:1 {url}\n  404  Not Found [IP: 1.2.3.4 80]\n\
             E: Failed to fetch {url}  404  Not Found [IP: 1.2.3.4 80]\n\
             E: Download Failed\n"
        );
        assert_eq!(fetch_failure(&said, url), "404  Not Found [IP: 1.2.3.4 80]");
        assert_eq!(fetch_failure("E: Download Failed\n", url), "E: Download Failed");
    }

    #[test]
    fn mirrors_of_a_sources_list() {
        let list = "# comment\ndeb http://deb.debian.org/debian bookworm main\n\
                    deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian bookworm main\n\
                    deb http://deb.debian.org/debian bookworm-updates main\n\
                    deb-src http://src.example/debian bookworm main\n";
        assert_eq!(one_line_uris(list), ["http://deb.debian.org/debian", "http://mirror.example/debian"]);
    }

    #[test]
    fn alternatives_are_read_from_postinst() {
        let postinst = "#!/bin/sh\nset -e\nif [ \"$1\" = \"configure\" ]; then\n        \
                        update-alternatives --install /usr/bin/awk awk /usr/bin/mawk 5 \\\n            \
                        --slave /usr/share/man/man1/awk.1.gz awk.1.gz /usr/share/man/man1/mawk.1.gz \\\n            \
                        --slave /usr/bin/nawk nawk /usr/bin/mawk\nfi\n\
                        update-alternatives --install /usr/bin/x x \"$dir/x\" 10\n\
                        update-alternatives --remove awk /usr/bin/mawk\n";
        let found = parse_alternatives(postinst);
        let links: Vec<(&str, &str, i64)> =
            found.iter().map(|a| (a.link.as_str(), a.path.as_str(), a.priority)).collect();
        assert_eq!(
            links,
            [
                ("/usr/bin/awk", "/usr/bin/mawk", 5),
                ("/usr/share/man/man1/awk.1.gz", "/usr/share/man/man1/mawk.1.gz", 5),
                ("/usr/bin/nawk", "/usr/bin/mawk", 5)
            ]
        );
        assert!(parse_alternatives("update-alternatives --install /a a /b notanumber\n").is_empty());
    }

    #[test]
    fn metapackages_are_told_from_image_packages() {
        assert!(is_versioned_image_package("linux-image-6.1.0-56-amd64"));
        assert!(!is_versioned_image_package("linux-image-amd64"));
        assert!(!is_versioned_image_package("linux-headers-6.1.0-56-amd64"));
        assert!(is_image_metapackage("linux-image-amd64"));
        assert!(!is_image_metapackage("busybox-static"));
    }
}
