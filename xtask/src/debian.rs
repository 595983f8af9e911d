//! Debian packages as store items: a package name is resolved once to a version and the
//! `.deb`'s sha256 (a *pin*, kept in the store's `.pins/`), fetched with
//! `apt-get download`, checked against the pin and unpacked with `dpkg-deb -x`; no root
//! is needed for any of it.

use std::fs;
use std::path::Path;
use std::process::Stdio;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use crate::host;
use crate::store::{self, Item, Recipe, Store};

/// A package resolved to an exact version and `.deb` hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    pub package: String,
    pub version: String,
    pub sha256: String,
    pub size: u64,
}

/// The fields of one `apt-cache show` stanza that matter here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stanza {
    pub package: String,
    pub version: String,
    pub sha256: String,
    pub size: u64,
    pub depends: Vec<String>,
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
            "Package" => s.package = value.to_string(),
            "Version" => s.version = value.to_string(),
            "SHA256" => s.sha256 = value.to_string(),
            "Size" => s.size = value.parse().unwrap_or(0),
            "Depends" | "Pre-Depends" => s.depends.extend(
                value
                    .split(',')
                    .filter_map(|d| d.split('|').next())
                    .filter_map(|d| d.split_whitespace().next())
                    .map(str::to_string),
            ),
            _ => {}
        }
    }
    (!s.package.is_empty() && !s.version.is_empty() && !s.sha256.is_empty()).then_some(s)
}

/// Looks a package up in apt's lists (the candidate version).
pub fn show(package: &str) -> Result<Stanza> {
    host::ensure(&[host::APT_GET])?;
    host::apt_update_once()?;
    let out = host::command("apt-cache")
        .args(["show", "--no-all-versions", package])
        .output()
        .context("running apt-cache show")?;
    let text = String::from_utf8_lossy(&out.stdout);
    match parse_stanza(&text) {
        Some(s) => Ok(s),
        None if host::is_root() => bail!(
            "Debian package `{package}` is unknown to apt (apt-cache: {}); check the name, or run `apt-get update`",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        None => bail!(
            "Debian package `{package}` is unknown to apt; check the name, or run `sudo apt-get update` if apt has never been updated here"
        ),
    }
}

/// Returns the pin recorded for `name`, resolving it with `resolve` the first time.
/// `resolve` maps the name to the stanza of the package actually fetched (for a
/// metapackage, the package it depends on).
pub fn pin(store: &Store, name: &str, resolve: impl FnOnce(&str) -> Result<Stanza>) -> Result<Pin> {
    let path = store.pins_dir().join(format!("debian-{name}.json"));
    if let Ok(text) = fs::read_to_string(&path) {
        if let Ok(pin) = serde_json::from_str(&text) {
            return Ok(pin);
        }
    }
    let s = resolve(name)?;
    let pin = Pin { package: s.package, version: s.version, sha256: s.sha256, size: s.size };
    let tmp = path.with_extension(format!("json.{}", std::process::id()));
    fs::write(&tmp, serde_json::to_vec_pretty(&pin)?).with_context(|| format!("writing `{}`", tmp.display()))?;
    fs::rename(&tmp, &path).with_context(|| format!("writing `{}`", path.display()))?;
    Ok(pin)
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
        let status = host::command("dpkg-deb").arg("-x").arg(&deb).arg(out).status().context("running dpkg-deb")?;
        ensure!(status.success(), "`dpkg-deb -x {}` failed ({status})", deb.display());
        Ok(())
    })
}

/// Fetches the pinned `.deb` into `dir` and checks its sha256.
fn download(pin: &Pin, dir: &Path) -> Result<std::path::PathBuf> {
    let size = if pin.size > 0 { format!(" ({:.1} MB)", pin.size as f64 / 1e6) } else { String::new() };
    // apt-get writes the .deb (under a partial name) in `dir`: its growth is the progress.
    let _step = crate::progress::step(&format!("fetching Debian package {} {}{size}", pin.package, pin.version))
        .watch_dir(dir, (pin.size > 0).then_some(pin.size));
    let mut cmd = host::command("apt-get");
    cmd.args(["download", "-q"]);
    if host::is_root() {
        // apt's download sandbox user cannot write into a root-owned directory.
        cmd.args(["-o", "APT::Sandbox::User=root"]);
    }
    let out = cmd
        .arg(format!("{}={}", pin.package, pin.version))
        .current_dir(dir)
        .stdout(Stdio::null())
        .output()
        .context("running apt-get download")?;
    if !out.status.success() {
        bail!(
            "`apt-get download {}={}` failed: {}\nif Debian no longer has this version, remove the pin in the store's `.pins/` to re-resolve",
            pin.package,
            pin.version,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let deb = fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| format!("apt-get download left no .deb for `{}`", pin.package))?;
    let actual = store::sha256_file(&deb)?;
    ensure!(
        actual == pin.sha256,
        "sha256 mismatch for Debian package {} {}: pinned {}, downloaded {}; refusing it",
        pin.package,
        pin.version,
        pin.sha256,
        actual
    );
    Ok(deb)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_apt_cache_show() {
        let text = "Package: linux-image-amd64\nSource: linux-signed-amd64 (6.1.192+2)\nVersion: 6.1.192-2\n\
                    Depends: linux-image-6.1.0-56-amd64 (= 6.1.192-2), foo | bar\nSize: 1480\n\
                    SHA256: abc123\nDescription: x\n\nPackage: other\n";
        let s = parse_stanza(text).unwrap();
        assert_eq!(s.package, "linux-image-amd64");
        assert_eq!(s.version, "6.1.192-2");
        assert_eq!(s.sha256, "abc123");
        assert_eq!(s.size, 1480);
        assert_eq!(s.depends, vec!["linux-image-6.1.0-56-amd64", "foo"]);
        assert_eq!(parse_stanza("N: Unable to locate package x\n"), None);
    }
}
