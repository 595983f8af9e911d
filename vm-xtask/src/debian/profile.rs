//! A system's Debian packages as one tree laid out as Debian lays a system out, with
//! merged `/usr`: the *profile*, a store item made of symbolic links into the packages'
//! items (as the guest sees them, under `/store`). The guest links `/usr` to the
//! profile's, `/bin`, `/sbin` and `/lib64` into it as merged-`/usr` Debian does, each
//! entry of its `usr/lib` into `/lib`, and each entry of its `etc` into `/etc`.
//!
//! A package's `bin`, `sbin` and `lib*` directories are merged into `usr/`. Where only
//! one package has a directory, the profile links the whole directory; where several
//! do, it is a directory of its own, merged entry by entry. A file is linked; a symbolic
//! link of a package is copied as it is (so a relative link such as python3-minimal's
//! `usr/bin/python3 -> python3.11` finds its target in another package). When two
//! packages have the same file, the first one (in the closure's order: the declared
//! packages first) wins, as a program declared by the system wins over busybox's applet
//! of the same name, which comes last.

use fs_err as fs;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::debian::{read_alternatives, Alternative};
use crate::store::{Item, Recipe, Store};

/// Top-level directories merged into `usr/`.
pub const MERGED: &[&str] = &["bin", "sbin", "lib", "lib32", "lib64", "libx32"];
/// Top-level entries a package has that the profile leaves out: its own control files
/// and the state directories, which the guest keeps writable.
const LEFT_OUT: &[&str] = &["DEBIAN", "var", "run", "tmp", "dev", "proc", "sys"];

/// An entry to merge: its name, where it is on the host and where the guest sees it.
#[derive(Debug, Clone)]
struct Entry {
    name: OsString,
    host: PathBuf,
    guest: String,
}

/// The profile of `packages` (unpacked Debian packages, in priority order), with the
/// applets in `bin/` of `busybox` (when given) last, and the `update-alternatives` links
/// of `alternatives` (the packages' [`crate::debian::alternatives`] items): for each
/// link, the alternative with the highest priority, as `update-alternatives` chooses in
/// its automatic mode (where the link's directory is the profile's own: `usr/bin`,
/// `usr/sbin`, or one several packages share).
pub fn profile(store: &Store, packages: &[Item], alternatives: &[Item], busybox: Option<&Item>) -> Result<Item> {
    let mut recipe = Recipe::new("debian-profile", "debian-profile").param("layout", "merged-usr-v2");
    for item in packages.iter().chain(busybox) {
        recipe = recipe.reference(item);
    }
    for item in alternatives {
        recipe = recipe.input_item("alternatives", item);
    }
    let order: Vec<String> = packages.iter().chain(busybox).map(Item::file_name).collect();
    recipe = recipe.param("order", order.join(" "));
    store.realise(&recipe, |out| {
        let _step = crate::progress::step(&format!("linking a profile of {} Debian packages", packages.len()));
        let (mut top, mut usr) = (Vec::new(), Vec::new());
        for item in packages {
            for entry in entries(&item.path, item.guest_path().as_str())? {
                let name = entry.name.to_string_lossy();
                if name == "usr" {
                    usr.extend(entries(&entry.host, &entry.guest)?);
                } else if MERGED.contains(&name.as_ref()) {
                    usr.push(entry);
                } else if !LEFT_OUT.contains(&name.as_ref()) {
                    top.push(entry);
                }
            }
        }
        if let Some(busybox) = busybox {
            usr.push(Entry {
                name: "bin".into(),
                host: busybox.path.join("bin"),
                guest: format!("{}/bin", busybox.guest_path()),
            });
        }
        fs::create_dir(out)?;
        merge(&out.join("usr"), usr, true, &["bin", "lib", "sbin"])?;
        merge(out, top, false, &["etc"])?;
        let mut chosen: BTreeMap<String, Alternative> = BTreeMap::new();
        for item in alternatives {
            for alt in read_alternatives(item)? {
                if chosen.get(&alt.link).is_none_or(|c| c.priority < alt.priority) {
                    chosen.insert(alt.link.clone(), alt);
                }
            }
        }
        for alt in chosen.values() {
            link_alternative(out, alt)?;
        }
        Ok(())
    })
}

/// Links `alt.link` (mapped into merged `/usr`) to `alt.path` in the profile at `out`,
/// over what a package or busybox has there, when its directory is one of the profile's
/// own (not a link to a package's).
fn link_alternative(out: &Path, alt: &Alternative) -> Result<()> {
    let rel = alt.link.trim_start_matches('/');
    let rel = match rel.split_once('/') {
        Some((top, rest)) if MERGED.contains(&top) => format!("usr/{top}/{rest}"),
        _ => rel.to_string(),
    };
    let at = out.join(&rel);
    let mut dir = out.to_path_buf();
    for part in Path::new(&rel).parent().into_iter().flat_map(|p| p.components()) {
        dir.push(part);
        if !fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
            return Ok(());
        }
    }
    if fs::symlink_metadata(&at).is_ok_and(|m| m.is_dir()) {
        return Ok(());
    }
    let _ = fs::remove_file(&at);
    symlink(&alt.path, &at).with_context(|| format!("linking `{}` to `{}`", at.display(), alt.path))
}

/// The entries of directory `host` (sorted by name), `guest` being its guest path.
fn entries(host: &Path, guest: &str) -> Result<Vec<Entry>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(host).with_context(|| format!("reading `{}`", host.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        found.push(Entry { guest: format!("{guest}/{}", name.to_string_lossy()), host: entry.path(), name });
    }
    found.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(found)
}

/// Makes `dir` (when `create`) and merges `merged` into it: by name, the first one
/// wins, and directories several entries have are merged in turn, as are those named in
/// `real` even when one entry has them.
fn merge(dir: &Path, merged: Vec<Entry>, create: bool, real: &[&str]) -> Result<()> {
    if create {
        fs::create_dir(dir).with_context(|| format!("creating `{}`", dir.display()))?;
    }
    let mut by_name: BTreeMap<OsString, Vec<Entry>> = BTreeMap::new();
    for entry in merged {
        by_name.entry(entry.name.clone()).or_default().push(entry);
    }
    for (name, same) in by_name {
        let at = dir.join(&name);
        let first = &same[0];
        let kind = fs::symlink_metadata(&first.host)?.file_type();
        if kind.is_symlink() {
            symlink(fs::read_link(&first.host)?, &at)?;
            continue;
        }
        let dirs: Vec<Entry> = if kind.is_dir() {
            same.iter().filter(|e| fs::symlink_metadata(&e.host).is_ok_and(|m| m.is_dir())).cloned().collect()
        } else {
            Vec::new()
        };
        if dirs.len() > 1 || (!dirs.is_empty() && real.iter().any(|r| name == *r)) {
            let mut inner = Vec::new();
            for d in &dirs {
                inner.extend(entries(&d.host, &d.guest)?);
            }
            merge(&at, inner, true, &[])?;
        } else {
            symlink(&first.guest, &at).with_context(|| format!("linking `{}`", at.display()))?;
        }
    }
    Ok(())
}

/// The links the guest makes for a profile: `/usr`, the merged top-level directories,
/// and each entry of the profile's `etc` not in `written` (the files the system writes
/// in `/etc` itself, by their first component).
///
/// `/lib` stays a directory (a VM without a disk boots with the kernel's modules in
/// `/lib/modules`): each entry of the profile's `usr/lib` is linked into it instead.
pub fn guest_links(profile: &Item, written: &[String]) -> Result<Vec<(String, String)>> {
    let mut links = vec![("/usr".to_string(), format!("{}/usr", profile.guest_path()))];
    for dir in MERGED {
        if *dir == "lib" {
            for entry in entries(&profile.path.join("usr/lib"), "/usr/lib").unwrap_or_default() {
                if entry.name != "modules" {
                    links.push((format!("/lib/{}", entry.name.to_string_lossy()), entry.guest));
                }
            }
        } else if *dir == "bin" || *dir == "sbin" || fs::symlink_metadata(profile.path.join("usr").join(dir)).is_ok() {
            links.push((format!("/{dir}"), format!("usr/{dir}")));
        }
    }
    let etc = profile.path.join("etc");
    if etc.is_dir() {
        for entry in entries(&etc, &format!("{}/etc", profile.guest_path()))? {
            let name = entry.name.to_string_lossy().into_owned();
            if !written.contains(&name) {
                links.push((format!("/etc/{name}"), entry.guest));
            }
        }
    }
    Ok(links)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, rel: &str, contents: &str) {
        let path = root.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, contents).unwrap();
    }

    #[test]
    fn packages_merge_into_merged_usr_with_the_first_winning() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store"), false).unwrap();
        let make = |name: &str, build: &dyn Fn(&Path)| {
            store
                .realise(&Recipe::new("test", name), |out| {
                    fs::create_dir(out)?;
                    build(out);
                    Ok(())
                })
                .unwrap()
        };
        let libc = make("libc6", &|o| {
            write(o, "lib/x86_64-linux-gnu/libc.so.6", "libc");
            write(o, "usr/lib/x86_64-linux-gnu/gconv/x", "g");
            fs::create_dir_all(o.join("lib64")).unwrap();
            symlink("/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", o.join("lib64/ld-linux-x86-64.so.2")).unwrap();
            write(o, "etc/ld.so.conf", "");
            write(o, "DEBIAN/control", "");
        });
        let py = make("python3-minimal", &|o| {
            fs::create_dir_all(o.join("usr/bin")).unwrap();
            symlink("python3.11", o.join("usr/bin/python3")).unwrap();
            write(o, "usr/share/python3/x", "");
        });
        let py311 = make("python3.11-minimal", &|o| {
            write(o, "usr/bin/python3.11", "py");
            write(o, "usr/lib/x86_64-linux-gnu/libpython.so", "");
            write(o, "bin/sh", "not busybox");
        });
        let busybox = make("busybox", &|o| {
            write(o, "bin/busybox", "bb");
            symlink("busybox", o.join("bin/ls")).unwrap();
            symlink("busybox", o.join("bin/sh")).unwrap();
        });
        let alternatives = make("mawk-alternatives", &|o| {
            fs::write(
                o.join("alternatives"),
                "5 awk /usr/bin/awk /usr/bin/mawk\n5 nawk /usr/bin/nawk /usr/bin/mawk\n\
                                              1 awk /usr/bin/awk /usr/bin/lesser\n5 x /usr/share/x/y /usr/bin/mawk\n",
            )
            .unwrap();
        });
        let profile = profile(&store, &[py, libc.clone(), py311.clone()], &[alternatives], Some(&busybox)).unwrap();
        let p = &profile.path;
        let link = |rel: &str| {
            fs::read_link(p.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}")).to_string_lossy().into_owned()
        };
        // Merged /usr: libc6's lib/ and usr/lib/ are one directory.
        assert_eq!(
            link("usr/lib/x86_64-linux-gnu/libc.so.6"),
            format!("{}/lib/x86_64-linux-gnu/libc.so.6", libc.guest_path())
        );
        assert_eq!(
            link("usr/lib/x86_64-linux-gnu/gconv"),
            format!("{}/usr/lib/x86_64-linux-gnu/gconv", libc.guest_path())
        );
        // A directory one package has is linked whole (its absolute links resolve in the guest).
        assert_eq!(link("usr/lib64"), format!("{}/lib64", libc.guest_path()));
        // A relative link is copied, so it resolves in the profile; a lone directory is linked whole.
        assert_eq!(link("usr/bin/python3"), "python3.11");
        assert_eq!(link("usr/bin/python3.11"), format!("{}/usr/bin/python3.11", py311.guest_path()));
        assert!(fs::symlink_metadata(p.join("usr/share")).unwrap().file_type().is_symlink());
        // Busybox comes last: its `sh` loses to a package's, its `ls` is there.
        assert_eq!(link("usr/bin/sh"), format!("{}/bin/sh", py311.guest_path()));
        assert_eq!(link("usr/bin/ls"), "busybox");
        // The alternative with the highest priority, over busybox's applet; none where
        // the directory is a package's (usr/share is linked whole).
        assert_eq!(link("usr/bin/awk"), "/usr/bin/mawk");
        assert_eq!(link("usr/bin/nawk"), "/usr/bin/mawk");
        assert!(!p.join("usr/share/x").exists());
        assert!(!p.join("DEBIAN").exists());
        let links = guest_links(&profile, &["passwd".into()]).unwrap();
        assert!(links.contains(&("/lib64".into(), "usr/lib64".into())), "{links:?}");
        assert!(links.contains(&("/lib/x86_64-linux-gnu".into(), "/usr/lib/x86_64-linux-gnu".into())), "{links:?}");
        assert!(!links.iter().any(|(l, _)| l == "/lib"), "{links:?}");
        assert!(links.contains(&("/etc/ld.so.conf".into(), format!("{}/etc/ld.so.conf", profile.guest_path()))));
        assert!(!links.iter().any(|(l, _)| l == "/libx32"));
        assert_eq!(links[0], ("/usr".to_string(), format!("{}/usr", profile.guest_path())));
    }
}
