//! The dependency closure of a system's Debian packages: every package their `Depends`
//! and `Pre-Depends` bring, transitively, with alternatives and virtual packages chosen
//! as apt chooses them, plus libc6 (the loader every dynamically linked program needs).
//!
//! apt itself resolves it, once: `apt-get --simulate install` against an empty dpkg
//! status (nothing installed, no root needed) names every package and version it would
//! install; `apt-cache show` gives each one's fields; each package's dependencies are then
//! matched to the packages of the closure. All of it is written to `vm.lock` (each
//! package's pin gets a `depends` list), and later builds walk the lock alone, so the
//! closure is the same on every machine and apt is not asked again. A package already
//! locked keeps its locked version.
//!
//! What apt refuses (a package it does not know, a dependency nothing satisfies, two
//! packages that conflict) becomes a [`Refusal`] naming the package and the chain of
//! dependencies from the declared package to it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

use anyhow::{bail, Context, Result};
use os_configs::Arch;

use super::index::Index;
use super::{parse_stanzas, Pin, Stanza};
use crate::{debian::lock, host};

/// The package every closure includes: glibc, with the dynamic loader.
pub const LIBC: &str = "libc6";

/// Why a set of Debian packages cannot be installed together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The declared package the problem is in the closure of, when apt named one.
    pub root: Option<String>,
    /// What is wrong, with the chain from the declared package to the one at fault.
    pub message: String,
    pub fix: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}; fix: {}", self.message, self.fix)
    }
}

impl std::error::Error for Refusal {}

/// The closure of `roots` (Debian package names as a system declares them), as pins in
/// a stable order: the roots, then their dependencies breadth first. Resolved with apt
/// and locked when the lock does not have it all yet.
pub fn closure(roots: &[String]) -> Result<Vec<(String, Pin)>> {
    let arch = roots.first().map(|r| super::unqualified(r).1).unwrap_or_default();
    if let Some(other) = roots.iter().find(|r| super::unqualified(r).1 != arch) {
        bail!("the Debian packages {} are not all of one architecture (`{other}` is not {arch})", roots.join(", "));
    }
    let mut roots = roots.to_vec();
    let libc = super::qualified(LIBC, arch);
    if !roots.is_empty() && !roots.contains(&libc) {
        roots.push(libc);
    }
    if let Some(found) = walk(&lock::snapshot()?, &roots) {
        return Ok(found);
    }
    let resolved = resolve(&roots, arch)?;
    lock::record_closure(&roots, resolved)?;
    walk(&lock::snapshot()?, &roots).context("the lock file lacks part of a closure just written to it")
}

/// The closure of `roots` in `pins`, or `None` when a package of it is not locked or
/// its dependencies are not.
pub fn walk(pins: &lock::Pins, roots: &[String]) -> Option<Vec<(String, Pin)>> {
    let mut seen = BTreeSet::new();
    let mut queue: VecDeque<&String> = roots.iter().collect();
    let mut found = Vec::new();
    while let Some(name) = queue.pop_front() {
        if !seen.insert(name.clone()) {
            continue;
        }
        let pin = pins.get(name)?;
        queue.extend(pin.depends.as_ref()?.iter());
        found.push((name.clone(), pin.clone()));
    }
    Some(found)
}

/// Asks apt, over xtask's own Debian index of `arch`, for the closure of `roots` (and
/// each package's fields): the pins, each with its dependencies among them, by their
/// names in the lock ([`super::qualified`]). When apt refuses, the index is fetched again
/// once (it may predate a package) before the refusal is believed.
fn resolve(qualified_roots: &[String], arch: Arch) -> Result<Vec<(String, Pin)>> {
    host::ensure(&[host::APT_GET])?;
    let roots: Vec<String> = qualified_roots.iter().map(|r| super::unqualified(r).0.to_string()).collect();
    let roots = &roots[..];
    let index = Index::for_arch(arch)?;
    index.ready()?;
    let _step = crate::progress::step(&format!("resolving the Debian dependencies of {}", roots.join(", ")));
    let simulate = || {
        let mut simulate = index.command("apt-get");
        simulate.args(["--simulate", "-q", "install"]).args(roots);
        crate::process::output(&simulate)
    };
    let mut out = simulate()?;
    if !out.status.success() && index.refresh(&format!("apt cannot install {} from it", roots.join(", ")))? {
        out = simulate()?;
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let said = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
        let mut refused = refusal(roots, &said, || dependency_graph(&index, roots));
        if arch != Arch::X86_64 {
            // Said of the packages of the system's architecture: the name may be amd64's only.
            refused.message.push_str(&format!(" for {} (the system's architecture is {arch})", arch.debian()));
        }
        return Err(refused.into());
    }
    let chosen = installs(&stdout);
    let wanted: Vec<String> = chosen.iter().map(|(p, v)| format!("{p}={v}")).collect();
    let shown = crate::process::output(index.command("apt-cache").arg("show").args(&wanted))?;
    let stanzas = parse_stanzas(&String::from_utf8_lossy(&shown.stdout));
    let mut pins = Vec::new();
    for (package, version) in &chosen {
        let stanza = stanzas
            .iter()
            .find(|s| &s.pin.package == package && &s.pin.version == version)
            .with_context(|| format!("apt-cache show says nothing of {package} {version}, which apt would install"))?;
        let depends = dependencies(stanza, &stanzas).iter().map(|d| super::qualified(d, arch)).collect();
        pins.push((super::qualified(package, arch), Pin { depends: Some(depends), ..stanza.pin.clone() }));
    }
    Ok(pins)
}

/// The `(package, version)` of every `Inst` line of `apt-get --simulate`.
pub fn installs(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("Inst "))
        .filter_map(|l| {
            let (package, rest) = l.split_once(' ')?;
            let version = rest.strip_prefix('(')?.split_whitespace().next()?;
            Some((package.split(':').next()?.to_string(), version.to_string()))
        })
        .collect()
}

/// The packages among `closure` that satisfy `stanza`'s dependencies: for each one, the
/// first alternative that is in it by name, else one that provides it.
pub fn dependencies(stanza: &Stanza, closure: &[Stanza]) -> Vec<String> {
    let mut found = BTreeSet::new();
    for clause in &stanza.relations {
        let pick = clause.iter().find_map(|alt| {
            closure
                .iter()
                .find(|s| &s.pin.package == alt)
                .or_else(|| closure.iter().find(|s| s.provides.contains(alt)))
                .map(|s| s.pin.package.clone())
        });
        found.extend(pick.filter(|p| p != &stanza.pin.package));
    }
    found.into_iter().collect()
}

/// Turns apt's refusal into one naming the package at fault and the chain to it.
fn refusal(roots: &[String], said: &str, graph: impl FnOnce() -> BTreeMap<String, Vec<String>>) -> Refusal {
    let lines: Vec<&str> = said.lines().map(str::trim).collect();
    // `E: Unable to locate package NAME`, `E: Package 'NAME' has no installation candidate`.
    for line in &lines {
        let unknown = line
            .strip_prefix("E: Unable to locate package ")
            .or_else(|| line.strip_prefix("E: Package '").and_then(|l| l.split('\'').next()));
        if let Some(name) = unknown {
            let virtual_of: Vec<&str> = lines
                .iter()
                .skip_while(|l| !l.starts_with(&format!("Package {name} is a virtual package")))
                .skip(1)
                .take_while(|l| !l.is_empty())
                .filter_map(|l| l.split_whitespace().next())
                .collect();
            return Refusal {
                root: Some(name.to_string()),
                message: if virtual_of.is_empty() {
                    format!("Debian package `{name}` does not exist in xtask's Debian index")
                } else {
                    format!(
                        "Debian package `{name}` is virtual: several packages provide it ({})",
                        virtual_of.join(", ")
                    )
                },
                fix: if virtual_of.is_empty() {
                    "check the name (in the release vm.lock names; a `vm.sources` beside vm.lock can add mirrors)"
                        .into()
                } else {
                    "declare the one you want instead".into()
                },
            };
        }
    }
    // ` PKG : Depends: DEP but it is not installable` / ` PKG : Conflicts: OTHER ...`.
    let problems: Vec<&str> = lines
        .iter()
        .skip_while(|l| !l.contains("have unmet dependencies"))
        .skip(1)
        .take_while(|l| !l.starts_with("E:"))
        .copied()
        .filter(|l| !l.is_empty())
        .collect();
    let mut conflict = None;
    let mut unmet = None;
    let mut current = "";
    for line in &problems {
        let (package, relation) = match line.split_once(" : ") {
            Some((p, r)) => {
                current = p.trim();
                (current, r.trim())
            }
            None => (current, *line),
        };
        if relation.starts_with("Conflicts:") || relation.starts_with("Breaks:") {
            conflict.get_or_insert((package.to_string(), relation.to_string()));
        } else if relation.starts_with("Depends:") || relation.starts_with("PreDepends:") {
            unmet.get_or_insert((package.to_string(), relation.to_string()));
        }
    }
    let graph = graph();
    if let Some((package, relation)) = unmet {
        let (root, chain) = chain(roots, &graph, &package);
        return Refusal {
            root,
            message: format!(
                "a dependency of Debian package `{package}` cannot be resolved: {relation} (needed by {chain})"
            ),
            fix: "choose another package".into(),
        };
    }
    if let Some((package, relation)) = conflict {
        let (root, chain) = chain(roots, &graph, &package);
        return Refusal {
            root,
            message: format!(
                "Debian package `{package}` conflicts with another package of the system: {relation} ({chain})"
            ),
            fix: "declare only one of the conflicting packages".into(),
        };
    }
    let said: Vec<&str> = lines.iter().filter(|l| l.starts_with("E:")).copied().collect();
    Refusal {
        root: None,
        message: format!("apt cannot install {} together: {}", roots.join(", "), said.join(" ")),
        fix: "remove or replace the package apt names".into(),
    }
}

/// Who depends on whom, as `apt-cache depends --recurse` tells (every alternative).
fn dependency_graph(index: &Index, roots: &[String]) -> BTreeMap<String, Vec<String>> {
    let mut depends = index.command("apt-cache");
    depends
        .args(["depends", "--recurse", "--no-recommends", "--no-suggests", "--no-conflicts", "--no-breaks"])
        .args(["--no-replaces", "--no-enhances"])
        .args(roots);
    let out = crate::process::output(&depends);
    parse_depends(&out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default())
}

/// Parses `apt-cache depends` output: a package name at the start of a line, then its
/// `Depends:`/`PreDepends:` lines indented.
pub fn parse_depends(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut graph: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current = None;
    for line in text.lines() {
        if !line.starts_with(' ') {
            current = Some(line.trim().trim_start_matches('<').trim_end_matches('>').to_string());
            continue;
        }
        let line = line.trim().trim_start_matches('|');
        let dep = line.strip_prefix("Depends: ").or_else(|| line.strip_prefix("PreDepends: "));
        if let (Some(package), Some(dep)) = (&current, dep) {
            let dep = dep.trim().trim_start_matches('<').trim_end_matches('>');
            graph.entry(package.clone()).or_default().push(dep.split(':').next().unwrap_or(dep).to_string());
        }
    }
    graph
}

/// The shortest chain of dependencies from one of `roots` to `target`, written
/// `root -> ... -> target`, and that root.
pub fn chain(roots: &[String], graph: &BTreeMap<String, Vec<String>>, target: &str) -> (Option<String>, String) {
    let mut parent: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue: VecDeque<&str> = roots.iter().map(String::as_str).collect();
    let mut seen: BTreeSet<&str> = queue.iter().copied().collect();
    while let Some(node) = queue.pop_front() {
        if node == target {
            let mut path = vec![node];
            while let Some(p) = parent.get(path.last().unwrap()) {
                path.push(p);
            }
            path.reverse();
            return (Some(path[0].to_string()), format!("declared package {}", path.join(" -> ")));
        }
        for next in graph.get(node).into_iter().flatten() {
            if seen.insert(next) {
                parent.insert(next, node);
                queue.push_back(next);
            }
        }
    }
    (None, format!("`{target}`, a dependency of {}", roots.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stanza(package: &str, relations: &[&[&str]], provides: &[&str]) -> Stanza {
        Stanza {
            pin: Pin { package: package.into(), version: "1".into(), ..Pin::default() },
            relations: relations.iter().map(|c| c.iter().map(|s| s.to_string()).collect()).collect(),
            provides: provides.iter().map(|s| s.to_string()).collect(),
            ..Stanza::default()
        }
    }

    #[test]
    fn dependencies_are_matched_to_the_closure_by_name_alternative_and_provides() {
        let closure = vec![
            stanza("app", &[&["libc6"], &["mawk", "gawk"], &["mail-transport-agent"], &["app"]], &[]),
            stanza("libc6", &[&["libgcc-s1"]], &[]),
            stanza("libgcc-s1", &[&["libc6"]], &[]),
            stanza("gawk", &[], &["awk"]),
            stanza("exim4", &[], &["mail-transport-agent"]),
        ];
        // `mawk` is not in the closure: the next alternative is taken; a virtual package
        // goes to its provider; a package is not its own dependency; cycles are fine.
        assert_eq!(dependencies(&closure[0], &closure), ["exim4", "gawk", "libc6"]);
        assert_eq!(dependencies(&closure[1], &closure), ["libgcc-s1"]);
        assert_eq!(dependencies(&closure[2], &closure), ["libc6"]);
    }

    #[test]
    fn apt_simulation_is_read() {
        let text = "NOTE: This is only a simulation!\nInst gcc-12-base (12.2.0-14 Debian:12.15/oldstable [amd64])\n\
                    Inst libc6 (2.36-9+deb12u14 Debian:12.15/oldstable [amd64]) []\nConf libc6 (2.36-9)\n\
                    Inst python3:amd64 (3.11.2-1+b1 Debian:12.15/oldstable [amd64])\n";
        assert_eq!(
            installs(text),
            [
                ("gcc-12-base".to_string(), "12.2.0-14".to_string()),
                ("libc6".into(), "2.36-9+deb12u14".into()),
                ("python3".into(), "3.11.2-1+b1".into())
            ]
        );
    }

    #[test]
    fn refusals_name_the_package_and_the_chain() {
        let roots = vec!["no-such".to_string()];
        let r = refusal(&roots, "Reading package lists...\nE: Unable to locate package no-such\n", BTreeMap::new);
        assert_eq!(r.root.as_deref(), Some("no-such"));
        assert!(r.message.contains("`no-such` does not exist"), "{r}");
        let said = "Package awk is a virtual package provided by:\n  original-awk 2022\n  mawk 1.3.4\n\n\
                    E: Package 'awk' has no installation candidate\n";
        let r = refusal(&["awk".to_string()], said, BTreeMap::new);
        assert!(r.message.contains("virtual") && r.message.contains("original-awk, mawk"), "{r}");

        let graph = parse_depends("app\n  Depends: libmid\n |Depends: <other>\nlibmid\n  PreDepends: libgone:any\n");
        assert_eq!(graph["app"], ["libmid", "other"]);
        let roots = vec!["libc6".to_string(), "app".to_string()];
        assert_eq!(
            chain(&roots, &graph, "libgone"),
            (Some("app".into()), "declared package app -> libmid -> libgone".into())
        );
        assert_eq!(chain(&roots, &graph, "app").1, "declared package app");
    }
}
