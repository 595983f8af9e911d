//! The lock file `vm.lock` in the workspace: every Debian package the systems and the
//! image tools use, pinned to a version, its architecture, its pool path in the archive
//! and the `.deb`'s sha256. Committed like `Cargo.lock`, so two checkouts of one commit
//! fetch the same packages and compute the same item hashes, whatever the host's apt
//! lists say on either machine. Its `release` line names the Debian release whose suites
//! xtask's own Debian index follows.
//!
//! Builds read it. A package it does not have yet is resolved in xtask's own Debian index
//! ([`crate::debian::resolve`]) and added, saying so on stderr; `cargo xtask lock
//! --update [PACKAGE]` moves pins forward on purpose. The format is a small subset of
//! TOML written by hand, one table per package sorted by name, one field per line, so a
//! change reads as a small diff:
//!
//! ```toml
//! ["busybox-static"]
//! package = "busybox-static"
//! version = "1:1.35.0-4+deb12u1+b1"
//! architecture = "amd64"
//! filename = "pool/main/b/busybox/busybox-static_1.35.0-4+deb12u1+b1_amd64.deb"
//! size = 928188
//! sha256 = "3d3fdbe9..."
//! ```
//!
//! The table's name is what a system asks for; `package` is what it resolved to (they
//! differ for a metapackage such as `linux-image-amd64`).

use fs_err as fs;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};

use crate::debian::{Pin, Stanza};

/// The lock file's name in the workspace's root.
pub const LOCK_FILE: &str = "vm.lock";
/// Names another lock file to use instead of the workspace's (for tests working on a copy).
pub const LOCK_ENV: &str = "XTASK_LOCK";
const FORMAT_VERSION: &str = "1";
/// The Debian release a lock file without a `release` line is for.
pub const DEFAULT_RELEASE: &str = "bookworm";
const HEADER: &str = "# vm.lock: the Debian packages this workspace's systems and image tools use, with the\n\
                      # exact version, pool path and .deb sha256 of each. Written by `cargo xtask`; commit it.\n\
                      # `cargo xtask lock --update [PACKAGE]` moves pins forward and says what changed.\n";

/// The pins, by the name they were asked for.
pub type Pins = BTreeMap<String, Pin>;

/// The lock file this run reads and adds to.
pub fn path() -> PathBuf {
    std::env::var_os(LOCK_ENV).map(PathBuf::from).unwrap_or_else(|| crate::Workspace::current().root.join(LOCK_FILE))
}

/// The lock file's pins, read once per process and kept up to date with what it adds.
static LOADED: Mutex<Option<Pins>> = Mutex::new(None);

/// The pin of `name`: from the lock file, or resolved with `resolve` and added to it.
pub fn pin(name: &str, resolve: impl FnOnce(&str) -> Result<Stanza>) -> Result<Pin> {
    let path = path();
    let mut loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
    if loaded.is_none() {
        *loaded = Some(read(&path)?);
    }
    if let Some(pin) = loaded.as_ref().and_then(|pins| pins.get(name)) {
        return Ok(pin.clone());
    }
    // Another run may be adding to the same file: read, add and write under its lock.
    let _guard = lock_dir(&path)?;
    let mut pins = read(&path)?;
    if let Some(pin) = pins.get(name).cloned() {
        *loaded = Some(pins);
        return Ok(pin);
    }
    let pin = resolve(name)?.pin;
    check_fields(name, &pin)?;
    pins.insert(name.to_string(), pin.clone());
    write(&path, &pins)?;
    eprintln!(
        "{}: `{name}` was not locked; added {} {} ({}); commit the lock file",
        path.display(),
        pin.package,
        pin.version,
        pin.architecture
    );
    *loaded = Some(pins);
    Ok(pin)
}

/// The lock file's pins as this run sees them (read once, then kept up to date).
pub fn snapshot() -> Result<Pins> {
    let mut loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
    if loaded.is_none() {
        *loaded = Some(read(&path())?);
    }
    Ok(loaded.clone().unwrap_or_default())
}

/// Writes a dependency closure apt resolved for `roots`: each package's pin with its
/// `depends`, by its name in the lock. A package already locked keeps its locked version
/// (only its `depends` is set); the others are added. Says on stderr what was added.
pub fn record_closure(roots: &[String], resolved: Vec<(String, Pin)>) -> Result<()> {
    let path = path();
    let _guard = lock_dir(&path)?;
    let mut pins = read(&path)?;
    let mut added = Vec::new();
    for (name, pin) in resolved {
        check_fields(&name, &pin)?;
        match pins.get_mut(&name) {
            Some(locked) => locked.depends = pin.depends,
            None => {
                added.push(format!("{name} {}", pin.version));
                pins.insert(name, pin);
            }
        }
    }
    write(&path, &pins)?;
    eprintln!(
        "{}: locked the Debian dependency closure of {}{}; commit the lock file",
        path.display(),
        roots.join(", "),
        if added.is_empty() { String::new() } else { format!(" (added {})", added.join(", ")) }
    );
    *LOADED.lock().unwrap_or_else(|e| e.into_inner()) = Some(pins);
    Ok(())
}

/// Re-resolves the pins named in `names` (all of them when empty; a name not in the lock
/// is added) with `resolve`, writes the lock file and returns what changed: the name and
/// a line saying how.
pub fn update(names: &[String], resolve: impl Fn(&str) -> Result<Stanza>) -> Result<Vec<(String, String)>> {
    let path = path();
    let _guard = lock_dir(&path)?;
    let mut pins = read(&path)?;
    let names: Vec<String> = if names.is_empty() { pins.keys().cloned().collect() } else { names.to_vec() };
    let mut changes = Vec::new();
    for name in &names {
        let mut new = resolve(name).with_context(|| format!("resolving `{name}`"))?.pin;
        check_fields(name, &new)?;
        match pins.get(name) {
            Some(old) if Pin { depends: None, ..old.clone() } == new => new.depends = old.depends.clone(),
            Some(old) if old.package == new.package => {
                changes.push((name.clone(), format!("{name}: {} -> {}", old.version, new.version)))
            }
            Some(old) => changes.push((
                name.clone(),
                format!("{name}: {} {} -> {} {}", old.package, old.version, new.package, new.version),
            )),
            None => changes.push((name.clone(), format!("{name}: added {} {}", new.package, new.version))),
        }
        pins.insert(name.clone(), new);
    }
    write(&path, &pins)?;
    *LOADED.lock().unwrap_or_else(|e| e.into_inner()) = Some(pins);
    Ok(changes)
}

/// Adds every name in `names` that the lock does not have yet; returns the added names.
pub fn fill(names: &[String], resolve: impl Fn(&str) -> Result<Stanza>) -> Result<Vec<String>> {
    let before = read(&path())?;
    let mut added = Vec::new();
    for name in names {
        if !before.contains_key(name) {
            pin(name, &resolve)?;
            added.push(name.clone());
        }
    }
    Ok(added)
}

/// The pins in the lock file at `path` (none when there is no file yet).
pub fn read(path: &Path) -> Result<Pins> {
    match fs::read_to_string(path) {
        Ok(text) => parse(&text).with_context(|| format!("reading the lock file `{}`", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Pins::new()),
        Err(e) => Err(e).with_context(|| format!("reading the lock file `{}`", path.display())),
    }
}

fn write(path: &Path, pins: &Pins) -> Result<()> {
    let release = release_at(path)?;
    crate::store::write_atomically(path, format_for(&release, pins).as_bytes())
}

/// The Debian release the workspace's lock file is for (its `release` line): the suites
/// xtask's own Debian index follows ([`crate::debian::index`]).
pub fn release() -> Result<String> {
    release_at(&path())
}

fn release_at(path: &Path) -> Result<String> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(DEFAULT_RELEASE.to_string()),
        Err(e) => return Err(e).with_context(|| format!("reading the lock file `{}`", path.display())),
    };
    let before_tables = text.lines().take_while(|l| !l.trim_start().starts_with('['));
    let release = before_tables
        .filter_map(|l| l.split_once('=').filter(|(k, _)| k.trim() == "release"))
        .map(|(_, v)| v.trim().trim_matches('"').to_string())
        .next();
    Ok(release.unwrap_or_else(|| DEFAULT_RELEASE.to_string()))
}

/// Holds the lock of the lock file's directory (`flock`): its writers take it.
fn lock_dir(path: &Path) -> Result<fs::File> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let file = fs::File::open(dir).with_context(|| format!("opening `{}`", dir.display()))?;
    file.lock().with_context(|| format!("locking `{}`", dir.display()))?;
    Ok(file)
}

/// Strings go into the file between double quotes, unescaped: refuse what would need
/// escaping (nothing Debian names or versions contain).
fn check_fields(name: &str, pin: &Pin) -> Result<()> {
    for value in [name, &pin.package, &pin.version, &pin.architecture, &pin.filename, &pin.sha256] {
        if value.is_empty() || value.contains(['"', '\\', '\n']) || value.chars().any(char::is_control) {
            bail!("cannot lock `{name}`: apt gave an empty or unusual field {value:?} (package {pin:?})");
        }
    }
    Ok(())
}

/// The lock file's text for [`DEFAULT_RELEASE`]: sorted by name, one field per line.
#[cfg(test)]
pub fn format(pins: &Pins) -> String {
    format_for(DEFAULT_RELEASE, pins)
}

/// The lock file's text for Debian release `release`.
pub fn format_for(release: &str, pins: &Pins) -> String {
    let mut s = format!("{HEADER}\nversion = {FORMAT_VERSION}\nrelease = \"{release}\"\n");
    for (name, p) in pins {
        s.push_str(&format!(
            "\n[\"{name}\"]\npackage = \"{}\"\nversion = \"{}\"\narchitecture = \"{}\"\nfilename = \"{}\"\n\
             size = {}\nsha256 = \"{}\"\n",
            p.package, p.version, p.architecture, p.filename, p.size, p.sha256
        ));
        if let Some(depends) = &p.depends {
            let names: Vec<String> = depends.iter().map(|d| format!("\"{d}\"")).collect();
            s.push_str(&format!("depends = [{}]\n", names.join(", ")));
        }
    }
    s
}

/// Parses what [`format`] writes (comments and blank lines anywhere).
pub fn parse(text: &str) -> Result<Pins> {
    let mut pins = Pins::new();
    let mut current: Option<(String, Pin, Vec<&str>)> = None;
    let mut version = None;
    let finish = |current: Option<(String, Pin, Vec<&str>)>, pins: &mut Pins| -> Result<()> {
        if let Some((name, pin, seen)) = current {
            for key in ["package", "version", "architecture", "filename", "size", "sha256"] {
                if !seen.contains(&key) {
                    bail!("package `{name}` has no `{key}`");
                }
            }
            if pins.insert(name.clone(), pin).is_some() {
                bail!("package `{name}` is there twice");
            }
        }
        Ok(())
    };
    for (n, line) in text.lines().enumerate() {
        let at = || format!("line {}: `{line}`", n + 1);
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(header) = line.strip_prefix("[\"").and_then(|l| l.strip_suffix("\"]")) {
            finish(current.take(), &mut pins)?;
            current = Some((header.to_string(), Pin::default(), Vec::new()));
            continue;
        }
        let (key, value) = line.split_once('=').with_context(|| format!("{}: expected `key = value`", at()))?;
        let (key, value) = (key.trim(), value.trim());
        let string = || {
            value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .filter(|v| !v.contains('"'))
                .map(str::to_string)
                .with_context(|| format!("{}: expected a string in double quotes", at()))
        };
        let Some((_, pin, seen)) = current.as_mut() else {
            match key {
                "version" => version = Some(value.to_string()),
                "release" => {
                    let release = string()?;
                    if release.is_empty() || !release.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
                        bail!("{}: expected a Debian release name such as \"{DEFAULT_RELEASE}\"", at());
                    }
                }
                _ => bail!("{}: unknown key before the first package", at()),
            }
            continue;
        };
        match key {
            "package" => pin.package = string()?,
            "version" => pin.version = string()?,
            "architecture" => pin.architecture = string()?,
            "filename" => pin.filename = string()?,
            "sha256" => pin.sha256 = string()?,
            "size" => pin.size = value.parse().with_context(|| format!("{}: expected a number", at()))?,
            "depends" => {
                pin.depends = Some(strings(value).with_context(|| format!("{}: expected a list of strings", at()))?)
            }
            _ => bail!("{}: unknown key", at()),
        }
        seen.push(match key {
            "package" => "package",
            "version" => "version",
            "architecture" => "architecture",
            "filename" => "filename",
            "sha256" => "sha256",
            "depends" => "depends",
            _ => "size",
        });
    }
    finish(current, &mut pins)?;
    match version.as_deref() {
        Some(FORMAT_VERSION) => Ok(pins),
        Some(v) => bail!("format version {v} is not the one this xtask reads ({FORMAT_VERSION})"),
        None if pins.is_empty() => Ok(pins),
        None => bail!("no `version = {FORMAT_VERSION}` line"),
    }
}

/// `["a", "b"]`: names in double quotes, comma-separated, in brackets.
fn strings(value: &str) -> Option<Vec<String>> {
    let inner = value.strip_prefix('[')?.strip_suffix(']')?.trim();
    if inner.is_empty() {
        return Some(Vec::new());
    }
    inner
        .split(',')
        .map(|v| v.trim().strip_prefix('"')?.strip_suffix('"').filter(|v| !v.is_empty() && !v.contains('"')))
        .map(|v| v.map(str::to_string))
        .collect()
}

/// The Debian package of the busybox every system with [`os_configs::Package::Busybox`] gets.
pub const BUSYBOX_PACKAGE: &str = "busybox-static";

/// Every Debian package name `systems` (the workspace's named systems), the engine's own VMs (the
/// image builder boots `minimal`), the image tools (UEFI's too, aarch64's), QEMU (aarch64's too), gdb
/// and gdbserver from the store ask for (not their dependencies).
pub fn wanted(systems: &[os_configs::System]) -> Vec<String> {
    let mut names: Vec<String> = crate::debian::image_tools::PACKAGES.iter().map(|p| p.to_string()).collect();
    names.extend(crate::debian::image_tools::UEFI_PACKAGES.iter().map(|p| p.to_string()));
    names.push(crate::debian::qemu::PACKAGE.to_string());
    names.push(crate::debian::qemu::AARCH64.package.to_string());
    // aarch64's UEFI images: AAVMF, and GRUB's arm64-efi modules.
    names.push(crate::debian::image_tools::AAVMF_PACKAGE.to_string());
    names.push(crate::debian::qualified("grub-efi-arm64-bin", os_configs::Arch::Aarch64));
    names.push(crate::debian::registry_server::PACKAGE.to_string());
    names.push(crate::debian::gdb::PACKAGE.to_string());
    names.push(crate::debian::gdb::SERVER_PACKAGE.to_string());
    for system in std::iter::once(os_configs::minimal()).chain(systems.iter().cloned()) {
        let named = |package: &str| crate::debian::qualified(package, system.arch);
        if let os_configs::Kernel::Debian { package } = &system.kernel {
            names.push(named(&crate::debian::kernel_package(package, system.arch)));
        }
        for package in &system.packages {
            match package {
                os_configs::Package::Busybox => names.push(named(BUSYBOX_PACKAGE)),
                os_configs::Package::Debian { package } => names.push(named(package)),
                _ => {}
            }
        }
    }
    names.sort();
    names.dedup();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pin(package: &str, version: &str) -> Pin {
        Pin {
            package: package.into(),
            version: version.into(),
            architecture: "amd64".into(),
            filename: format!("pool/main/x/{package}_{version}_amd64.deb"),
            sha256: "ab".repeat(32),
            size: 1234,
            depends: None,
        }
    }

    #[test]
    fn format_and_parse_round_trip_sorted() {
        let mut pins = Pins::new();
        pins.insert("zlib1g".into(), pin("zlib1g", "1:1.2.13"));
        pins.insert("linux-image-amd64".into(), pin("linux-image-6.1.0-56-amd64", "6.1.192-2"));
        pins.insert(
            "libstdc++6".into(),
            Pin { depends: Some(vec!["libc6".into(), "libgcc-s1".into()]), ..pin("libstdc++6", "12.2.0-14") },
        );
        pins.insert("libc6".into(), Pin { depends: Some(vec![]), ..pin("libc6", "2.36") });
        let text = format(&pins);
        assert_eq!(parse(&text).unwrap(), pins);
        let order: Vec<usize> = ["[\"libstdc++6\"]", "[\"linux-image-amd64\"]", "[\"zlib1g\"]"]
            .iter()
            .map(|h| text.find(h).unwrap())
            .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{text}");
        assert!(text.contains("\n[\"linux-image-amd64\"]\npackage = \"linux-image-6.1.0-56-amd64\"\n"), "{text}");
        assert!(text.contains("sha256 = \"abab"));
        assert!(text.contains("\ndepends = [\"libc6\", \"libgcc-s1\"]\n"), "{text}");
        assert!(text.contains("\ndepends = []\n"), "{text}");
        assert!(text.starts_with("# vm.lock"));
        assert_eq!(format(&parse(&text).unwrap()), text, "not stable");
    }

    #[test]
    fn bad_files_are_refused() {
        let good = format(&Pins::from([("a".into(), pin("a", "1"))]));
        assert!(parse(&good.replace("size = 1234\n", "")).unwrap_err().to_string().contains("has no `size`"));
        assert!(parse(&good.replace("version = 1\n", "version = 9\n")).is_err());
        assert!(parse(&good.replace("size = 1234", "size = many")).is_err());
        assert!(parse(&good.replace("sha256 = \"", "sha256 = ")).is_err());
        assert!(parse(&good.replace("size = 1234", "colour = \"blue\"")).is_err());
        assert!(parse(&format!("{good}depends = [\"a\" \"b\"]\n")).is_err());
        assert!(parse(&format!("{good}depends = [a]\n")).is_err());
        assert_eq!(
            parse(&format!("{good}depends = [ \"x\",\"y\" ]\n")).unwrap()["a"].depends,
            Some(vec!["x".into(), "y".into()])
        );
        assert_eq!(parse("").unwrap(), Pins::new());
    }

    #[test]
    fn locked_pins_win_and_missing_ones_are_added() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("vm.lock");
        let locked = pin("busybox-static", "1:1.30");
        fs::write(&file, format(&Pins::from([("busybox-static".into(), locked.clone())]))).unwrap();
        std::env::set_var(LOCK_ENV, &file);
        *LOADED.lock().unwrap() = None;
        // Apt's candidate is newer: the lock wins, apt is not even asked.
        let asked = std::cell::Cell::new(0);
        let candidate = |name: &str| {
            asked.set(asked.get() + 1);
            Ok(Stanza { pin: pin(name, "9.9"), ..Stanza::default() })
        };
        assert_eq!(super::pin("busybox-static", candidate).unwrap(), locked);
        assert_eq!(asked.get(), 0);
        // A package the lock lacks is resolved and written down.
        assert_eq!(super::pin("jq", candidate).unwrap().version, "9.9");
        assert_eq!(asked.get(), 1);
        let on_disk = read(&file).unwrap();
        assert_eq!(on_disk.len(), 2);
        assert_eq!(on_disk["busybox-static"], locked);
        // Moving forward on purpose says what changed.
        let changes = update(&["busybox-static".to_string()], candidate).unwrap();
        assert_eq!(changes, [("busybox-static".to_string(), "busybox-static: 1:1.30 -> 9.9".to_string())]);
        assert_eq!(read(&file).unwrap()["busybox-static"].version, "9.9");
        assert!(update(&[], candidate).unwrap().is_empty());
        std::env::remove_var(LOCK_ENV);
        *LOADED.lock().unwrap() = None;
    }
}
