//! Debian packages as store items: a package name is resolved once to a version, its
//! pool path and the `.deb`'s sha256 (a *pin*, kept in the workspace's lock file
//! `vm.lock`, see [`crate::lock`]), fetched with `apt-get download` (or, when apt's lists
//! no longer offer that version, by its pool path from the Debian mirror apt uses),
//! checked against the pin and unpacked with `dpkg-deb -x`; no root is needed for any
//! of it.

use fs_err as fs;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};

use crate::store::{self, Item, Recipe, Store};
use crate::{host, lock};

pub mod closure;
pub mod profile;

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

/// Looks a package up in apt's lists (the candidate version).
pub fn show(package: &str) -> Result<Stanza> {
    host::ensure(&[host::APT_GET])?;
    host::apt_update_once()?;
    let out =
        crate::process::output(crate::process::command("apt-cache").args(["show", "--no-all-versions", package]))?;
    let text = String::from_utf8_lossy(&out.stdout);
    match parse_stanza(&text) {
        Some(s) => Ok(s),
        None if host::is_root() => bail!(
            "Debian package `{package}` is unknown to apt (apt-cache: {}); check the name, or run `apt-get update`",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        None => bail!(
            "Debian package `{package}` is unknown to apt; check the name, or run `sudo apt-get update` if \
                apt has never been updated here"
        ),
    }
}

/// What `name` resolves to today in apt's lists: its candidate, or, for a kernel
/// metapackage (`linux-image-amd64`), the real image package it depends on.
pub fn resolve(name: &str) -> Result<Stanza> {
    let stanza = show(name)?;
    match stanza.depends.iter().find(|d| is_versioned_image_package(d)) {
        Some(real) if is_image_metapackage(&stanza.pin.package) => show(real),
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
    host::ensure(&[host::APT_GET])?;
    host::apt_update_once()?;
    let out =
        crate::process::output(crate::process::command("apt-cache").args(["show", "--no-all-versions"]).args(names))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let stanzas = parse_stanzas(&text);
    for name in names {
        match stanzas.iter().find(|s| &s.pin.package == name) {
            Some(s) if is_image_metapackage(name) => {
                resolved.insert(name.clone(), resolve(&s.pin.package)?);
            }
            Some(s) => {
                resolved.insert(name.clone(), s.clone());
            }
            // An unknown name: asked alone, for its own error.
            None => {
                resolved.insert(name.clone(), resolve(name)?);
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

/// libc6's dynamic loader, inside its package: the store's Debian programs run through it.
pub const LOADER: &str = "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2";
/// Where Debian's packages put shared libraries.
pub const LIB_DIRS: &[&str] = &["lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu"];

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
    let recipe = Recipe::new("debian-package", &format!("{}-{}", pin.package, pin.version))
        .param("package", &pin.package)
        .param("version", &pin.version)
        .param("sha256", &pin.sha256);
    store.realise(&recipe, |out| {
        host::ensure(&[host::APT_GET, host::DPKG_DEB])?;
        let scratch = store.scratch(&pin.package)?;
        let deb = download(pin, scratch.path())?;
        let _step = crate::progress::step(&format!("unpacking Debian package {} {}", pin.package, pin.version));
        crate::process::run(crate::process::command("dpkg-deb").arg("-x").arg(&deb).arg(out))?;
        // While the .deb is here: what its maintainer script would link.
        alternatives_from(store, pin, &deb)?;
        Ok(())
    })
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
    let deb = download(pin, scratch.path())?;
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

/// Fetches the pinned `.deb` into `dir` and checks its sha256: with `apt-get download`
/// of exactly that version, or, when apt's lists do not offer it (they moved on, or
/// were never updated), by its pool path from the mirrors in apt's sources.
fn download(pin: &Pin, dir: &Path) -> Result<std::path::PathBuf> {
    let size = if pin.size > 0 { format!(" ({:.1} MB)", pin.size as f64 / 1e6) } else { String::new() };
    // apt-get writes the .deb (under a partial name) in `dir`: its growth is the progress.
    let _step = crate::progress::step(&format!("fetching Debian package {} {}{size}", pin.package, pin.version))
        .watch_dir(dir, (pin.size > 0).then_some(pin.size));
    let mut cmd = crate::process::command("apt-get");
    cmd.args(["download", "-q"]);
    if host::is_root() {
        // apt's download sandbox user cannot write into a root-owned directory.
        cmd.args(["-o", "APT::Sandbox::User=root"]);
    }
    let out = crate::process::output(cmd.arg(format!("{}={}", pin.package, pin.version)).current_dir(dir))?;
    let deb = if out.status.success() {
        fs::read_dir(dir)?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .with_context(|| format!("apt-get download left no .deb for `{}`", pin.package))?
    } else {
        let apt_error = String::from_utf8_lossy(&out.stderr).trim().to_string();
        from_pool(pin, dir, &apt_error)?
    };
    let actual = store::sha256_file(&deb)?;
    ensure!(
        actual == pin.sha256,
        "sha256 mismatch for Debian package {} {}: locked {}, downloaded {}; refusing it",
        pin.package,
        pin.version,
        pin.sha256,
        actual
    );
    Ok(deb)
}

/// Fetches the pinned `.deb` by its pool path from each mirror apt's sources name, in
/// turn, with apt's own downloader (`apt-helper download-file`, which checks the hash).
fn from_pool(pin: &Pin, dir: &Path, apt_error: &str) -> Result<std::path::PathBuf> {
    let what = format!("{} {}", pin.package, pin.version);
    let fix = format!(
        "run `cargo xtask lock --update {}` to lock the version apt offers now (and commit vm.lock), \
         or `sudo apt-get update` if apt's lists are older than the lock",
        pin.package
    );
    if pin.filename.is_empty() {
        bail!(
            "`apt-get download {}={}` failed: {apt_error}\nvm.lock has no pool path for {what}; {fix}",
            pin.package,
            pin.version
        );
    }
    let mirrors = mirrors();
    let helper = Path::new(APT_HELPER);
    let mut tried = Vec::new();
    eprintln!("apt's lists do not offer {what}; fetching it by its pool path `{}` from apt's mirrors", pin.filename);
    for mirror in &mirrors {
        let url = format!("{}/{}", mirror.trim_end_matches('/'), pin.filename.replace('+', "%2b"));
        let deb = dir.join(format!("{}_{}.deb", pin.package, pin.architecture));
        let mut cmd = crate::process::command(helper);
        if host::is_root() {
            cmd.args(["-o", "APT::Sandbox::User=root"]);
        }
        let out =
            crate::process::output(cmd.args(["download-file", &url]).arg(&deb).arg(format!("SHA256:{}", pin.sha256)))?;
        if out.status.success() && deb.is_file() {
            return Ok(deb);
        }
        let _ = fs::remove_file(&deb);
        tried
            .push(format!("{url}: {}", String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("failed").trim()));
    }
    bail!(
        "cannot fetch Debian package {what} (locked in vm.lock, pool path `{}`): apt's lists do not offer it \
         (`apt-get download`: {apt_error}) and no mirror in apt's sources has it ({}); {fix}",
        pin.filename,
        if tried.is_empty() { "apt's sources name no mirror".to_string() } else { tried.join("; ") }
    )
}

/// apt's downloader, in Debian's `apt` package.
pub const APT_HELPER: &str = "/usr/lib/apt/apt-helper";

/// The `deb` URIs of apt's sources (`/etc/apt/sources.list`, and `sources.list.d/` in
/// both formats), in order, each once.
fn mirrors() -> Vec<String> {
    let mut texts = Vec::new();
    texts.extend(fs::read_to_string("/etc/apt/sources.list").ok().map(|t| (false, t)));
    let mut parts: Vec<_> =
        fs::read_dir("/etc/apt/sources.list.d").map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    parts.sort();
    for path in parts {
        let deb822 = path.extension().is_some_and(|e| e == "sources");
        if deb822 || path.extension().is_some_and(|e| e == "list") {
            texts.extend(fs::read_to_string(&path).ok().map(|t| (deb822, t)));
        }
    }
    let mut uris = Vec::new();
    for (deb822, text) in texts {
        for uri in if deb822 { deb822_uris(&text) } else { one_line_uris(&text) } {
            if !uris.contains(&uri) {
                uris.push(uri);
            }
        }
    }
    uris
}

/// URIs of `deb` lines in the one-line format: `deb [options] URI suite components`.
pub fn one_line_uris(text: &str) -> Vec<String> {
    let mut uris = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default();
        let mut words = line.split_whitespace();
        if words.next() != Some("deb") {
            continue;
        }
        let mut rest: Vec<&str> = words.collect();
        if rest.first().is_some_and(|w| w.starts_with('[')) {
            let end = rest.iter().position(|w| w.ends_with(']')).unwrap_or(0);
            rest.drain(..=end);
        }
        uris.extend(rest.first().map(|u| u.to_string()));
    }
    uris
}

/// URIs of the stanzas with `Types: deb` in the deb822 format (`Enabled: no` skipped).
pub fn deb822_uris(text: &str) -> Vec<String> {
    let mut uris = Vec::new();
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
                l.split_once(':').filter(|(k, _)| k.trim().eq_ignore_ascii_case(name)).map(|(_, v)| v.trim())
            })
        };
        let is_deb = field("Types").is_some_and(|t| t.split_whitespace().any(|t| t == "deb"));
        if is_deb && field("Enabled") != Some("no") {
            uris.extend(field("URIs").into_iter().flat_map(|u| u.split_whitespace().map(str::to_string)));
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
    fn mirrors_from_both_source_formats() {
        let list = "# comment\ndeb http://deb.debian.org/debian bookworm main\n\
                    deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian bookworm main\n\
                    deb-src http://src.example/debian bookworm main\n";
        assert_eq!(one_line_uris(list), ["http://deb.debian.org/debian", "http://mirror.example/debian"]);
        let sources = "Types: deb\n# http://snapshot.debian.org/archive/debian/20250520T000000Z\n\
                       URIs: http://deb.debian.org/debian\nSuites: bookworm\n\n\
                       Types: deb-src\nURIs: http://src.example/debian\n\n\
                       Types: deb\nURIs: http://off.example/debian\nEnabled: no\n\n\
                       Types: deb\nURIs: http://a.example/d http://b.example/d\n";
        assert_eq!(deb822_uris(sources), ["http://deb.debian.org/debian", "http://a.example/d", "http://b.example/d"]);
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
