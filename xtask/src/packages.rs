//! Packages that are not Debian's: binaries of crates in this workspace (found with
//! `cargo_metadata`, built statically by cargo) and programs on the host with their
//! shared-library closure (the ELF's `DT_NEEDED` entries resolved as `ld.so` would, and
//! its interpreter). Each is a store item; an item's references (a program's libraries)
//! are recorded as `ref` inputs of its recipe, so [`Store::closure`] computes closures.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use object::read::elf::{Dyn, FileHeader, ProgramHeader};

use crate::store::{self, Item, Recipe, Store};
use crate::Workspace;

/// The target crate packages are built for: explicit, so `+crt-static` applies to it
/// alone and not to build scripts and proc-macros (as for the guest helper).
pub const TARGET: &str = "x86_64-unknown-linux-gnu";
pub const RUSTFLAGS: &str = "-C target-feature=+crt-static";

/// The workspace's packages and their binary targets, from `cargo metadata`.
pub fn workspace_bins(ws: &Workspace) -> Result<BTreeMap<String, Vec<String>>> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .manifest_path(ws.root.join("Cargo.toml"))
        .no_deps()
        .exec()
        .context("reading the workspace's packages with `cargo metadata`")?;
    let mut bins = BTreeMap::new();
    for package in metadata.workspace_packages() {
        let names =
            package.targets.iter().filter(|t| t.kind.iter().any(|k| k == "bin")).map(|t| t.name.clone()).collect();
        bins.insert(package.name.clone(), names);
    }
    Ok(bins)
}

/// Builds `bin` of workspace package `package` as a static binary and adds it to the
/// store by content, as an item holding `bin/<bin>`. Unchanged sources give the same
/// binary and so the same item (cargo's own incremental build decides what to compile).
pub fn crate_binary(store: &Store, ws: &Workspace, package: &str, bin: &str, verbose: bool) -> Result<Item> {
    let target_dir = ws.target_dir.join("vm-packages");
    let binary = cargo_build_static(ws, package, bin, &target_dir, RUSTFLAGS, verbose)?;
    if elf_info(&binary)?.interpreter.is_some() {
        bail!("`{}` is dynamically linked; packages of this workspace must be static", binary.display());
    }
    let recipe = Recipe::new("crate-binary", &format!("{package}-{bin}"))
        .param("bin", bin)
        .input_content("binary", &store::sha256_file(&binary)?);
    store.realise(&recipe, |out| {
        fs::create_dir_all(out.join("bin"))?;
        fs::copy(&binary, out.join("bin").join(bin)).with_context(|| format!("copying `{}`", binary.display()))?;
        Ok(())
    })
}

/// Builds `bin` of workspace package `package` for [`TARGET`] in release mode with
/// `rustflags` (which, with an explicit target, reach neither build scripts nor
/// proc-macros) into `target_dir`; returns the binary's path.
pub fn cargo_build_static(
    ws: &Workspace,
    package: &str,
    bin: &str,
    target_dir: &Path,
    rustflags: &str,
    verbose: bool,
) -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = crate::host::command(cargo);
    cmd.args(["build", "--release", "--package", package, "--bin", bin, "--target", TARGET])
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(&ws.root)
        .env("RUSTFLAGS", rustflags);
    if !verbose {
        cmd.arg("--quiet");
    }
    let status = cmd.status().with_context(|| format!("running cargo to build `{bin}` of package `{package}`"))?;
    if !status.success() {
        bail!("building `{bin}` of package `{package}` (`cargo build -p {package} --bin {bin} --target {TARGET}`) failed ({status})");
    }
    Ok(target_dir.join(TARGET).join("release").join(bin))
}

/// What the dynamic loader needs to know about an ELF file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfInfo {
    /// `DT_NEEDED`: the sonames of the libraries it links.
    pub needed: Vec<String>,
    /// `PT_INTERP`: the dynamic loader, for executables.
    pub interpreter: Option<String>,
}

/// Reads an x86-64 ELF file's needed libraries and interpreter.
pub fn elf_info(path: &Path) -> Result<ElfInfo> {
    let data = fs::read(path).with_context(|| format!("reading `{}`", path.display()))?;
    parse_elf(&data).with_context(|| format!("reading the ELF headers of `{}`", path.display()))
}

fn parse_elf(data: &[u8]) -> Result<ElfInfo> {
    let header = object::elf::FileHeader64::<object::Endianness>::parse(data)?;
    let endian = header.endian()?;
    let mut interpreter = None;
    for ph in header.program_headers(endian, data)? {
        if let Some(interp) = ph.interpreter(endian, data)? {
            interpreter = Some(String::from_utf8_lossy(interp).into_owned());
        }
    }
    let sections = header.sections(endian, data)?;
    let mut needed = Vec::new();
    if let Some((dyns, link)) = sections.dynamic(endian, data)? {
        let strings = sections.strings(endian, data, link)?;
        for d in dyns {
            if d.tag32(endian) == Some(object::elf::DT_NEEDED) {
                needed.push(String::from_utf8_lossy(d.string(endian, strings)?).into_owned());
            }
        }
    }
    Ok(ElfInfo { needed, interpreter })
}

/// Where `ld.so` finds libraries here: the cache `ldconfig -p` prints (x86-64 entries),
/// then the standard directories.
pub struct LibraryResolver {
    cache: BTreeMap<String, PathBuf>,
}

/// Directories searched after the cache, in `ld.so`'s order for Debian's multiarch glibc.
const LIBRARY_DIRS: &[&str] =
    &["/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib"];

impl LibraryResolver {
    pub fn from_host() -> LibraryResolver {
        let text = crate::host::command("ldconfig")
            .arg("-p")
            .output()
            .or_else(|_| crate::host::command("/sbin/ldconfig").arg("-p").output())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        LibraryResolver { cache: parse_ldconfig(&text) }
    }

    pub fn resolve(&self, soname: &str) -> Option<PathBuf> {
        if let Some(path) = self.cache.get(soname) {
            return Some(path.clone());
        }
        LIBRARY_DIRS.iter().map(|d| Path::new(d).join(soname)).find(|p| p.is_file())
    }
}

/// The x86-64 entries of `ldconfig -p`: `\tlibc.so.6 (libc6,x86-64) => /lib/.../libc.so.6`.
fn parse_ldconfig(text: &str) -> BTreeMap<String, PathBuf> {
    let mut cache = BTreeMap::new();
    for line in text.lines() {
        let Some((left, path)) = line.trim().split_once(" => ") else { continue };
        let Some((name, flags)) = left.split_once(" (") else { continue };
        if flags.contains("x86-64") {
            cache.entry(name.to_string()).or_insert_with(|| PathBuf::from(path));
        }
    }
    cache
}

/// A host program in the store, and where its libraries must appear in the guest.
#[derive(Debug, Clone)]
pub struct HostProgram {
    /// The item holding `bin/<name>`.
    pub item: Item,
    /// Links to make in the guest: the interpreter at its `PT_INTERP` path, every
    /// library of the closure in `/lib/x86_64-linux-gnu`.
    pub links: Vec<(String, String)>,
}

/// Adds `path` and its shared-library closure to the store: one item per library
/// (`lib-<soname>`, referring to the libraries it needs) and one for the program
/// (`host-<name>`, referring to its libraries and interpreter).
pub fn host_program(store: &Store, resolver: &LibraryResolver, path: &Path) -> Result<HostProgram> {
    let name =
        path.file_name().and_then(|n| n.to_str()).with_context(|| format!("`{}` has no file name", path.display()))?;
    let info = elf_info(path)?;
    let mut libs = BTreeMap::new();
    let mut refs = Vec::new();
    for soname in &info.needed {
        refs.push(library(store, resolver, soname, &mut libs, &mut Vec::new())?);
    }
    let mut links = Vec::new();
    if let Some(interp) = &info.interpreter {
        let interp_path = Path::new(interp);
        let soname = interp_path.file_name().and_then(|n| n.to_str()).context("interpreter without a file name")?;
        let item = library_file(store, soname, interp_path, &[])?;
        links.push((interp.clone(), format!("{}/{soname}", item.guest_path())));
        refs.push(item);
    }
    for (soname, item) in &libs {
        links.push((format!("/lib/x86_64-linux-gnu/{soname}"), format!("{}/{soname}", item.guest_path())));
    }
    let mut recipe = Recipe::new("host-program", &format!("host-{name}"))
        .param("name", name)
        .input_content("binary", &store::sha256_file(path)?);
    for r in &refs {
        recipe = recipe.reference(r);
    }
    let item = store.realise(&recipe, |out| {
        fs::create_dir_all(out.join("bin"))?;
        fs::copy(path, out.join("bin").join(name)).with_context(|| format!("copying `{}`", path.display()))?;
        Ok(())
    })?;
    Ok(HostProgram { item, links })
}

/// The item of library `soname` and, first, of everything it needs.
fn library(
    store: &Store,
    resolver: &LibraryResolver,
    soname: &str,
    done: &mut BTreeMap<String, Item>,
    stack: &mut Vec<String>,
) -> Result<Item> {
    if let Some(item) = done.get(soname) {
        return Ok(item.clone());
    }
    if stack.iter().any(|s| s == soname) {
        bail!("shared libraries need each other in a cycle: {} -> {soname}", stack.join(" -> "));
    }
    let path = resolver.resolve(soname).with_context(|| {
        format!("shared library `{soname}` is not in `ldconfig -p` nor in {}", LIBRARY_DIRS.join(", "))
    })?;
    stack.push(soname.to_string());
    let mut refs = Vec::new();
    for needed in elf_info(&path)?.needed {
        refs.push(library(store, resolver, &needed, done, stack)?);
    }
    stack.pop();
    let item = library_file(store, soname, &path, &refs)?;
    done.insert(soname.to_string(), item.clone());
    Ok(item)
}

fn library_file(store: &Store, soname: &str, path: &Path, refs: &[Item]) -> Result<Item> {
    let mut recipe = Recipe::new("host-library", &format!("lib-{soname}"))
        .param("soname", soname)
        .input_content("library", &store::sha256_file(path)?);
    for r in refs {
        recipe = recipe.reference(r);
    }
    store.realise(&recipe, |out| {
        fs::create_dir(out)?;
        fs::copy(path, out.join(soname)).with_context(|| format!("copying `{}`", path.display()))?;
        Ok(())
    })
}

/// The names of the programs an item provides (its `bin/`, `sbin/`, `usr/bin/`, ...).
pub fn programs_in(item_path: &Path) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for dir in ["bin", "sbin", "usr/bin", "usr/sbin"] {
        for entry in fs::read_dir(item_path.join(dir)).into_iter().flatten().flatten() {
            names.insert(entry.file_name().to_string_lossy().into_owned());
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldconfig_output_keeps_x86_64_entries() {
        let text = "3 libs found in cache `/etc/ld.so.cache'\n\
            \tlibc.so.6 (libc6,x86-64) => /lib/x86_64-linux-gnu/libc.so.6\n\
            \tlibc.so.6 (libc6) => /lib/i386-linux-gnu/libc.so.6\n\
            \tlibz.so.1 (libc6,x86-64) => /lib/x86_64-linux-gnu/libz.so.1\n";
        let cache = parse_ldconfig(text);
        assert_eq!(cache.len(), 2);
        assert_eq!(cache["libc.so.6"], Path::new("/lib/x86_64-linux-gnu/libc.so.6"));
    }

    #[test]
    fn host_program_closure_has_libraries_and_interpreter() {
        // Any dynamically linked program of the host will do; /bin/sh always exists.
        let sh = fs::canonicalize("/bin/sh").unwrap();
        let info = elf_info(&sh).unwrap();
        assert!(info.needed.iter().any(|n| n.starts_with("libc.so")), "{info:?}");
        assert!(info.interpreter.as_deref().is_some_and(|i| i.contains("ld-linux")), "{info:?}");

        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), false).unwrap();
        let program = host_program(&store, &LibraryResolver::from_host(), &sh).unwrap();
        let closure = store.closure(std::slice::from_ref(&program.item)).unwrap();
        let names: Vec<&str> = closure.iter().map(|i| i.name.as_str()).collect();
        assert!(names.contains(&"lib-libc.so.6"), "{names:?}");
        assert!(names.iter().any(|n| n.starts_with("lib-ld-linux")), "{names:?}");
        assert!(program.links.iter().any(|(l, _)| Some(l.as_str()) == info.interpreter.as_deref()));
        assert!(programs_in(&program.item.path).contains(sh.file_name().unwrap().to_str().unwrap()));
    }

    #[test]
    fn dynamic_binaries_name_their_interpreter_and_truncated_files_are_errors() {
        let helper = fs::read("/proc/self/exe").unwrap();
        // The test binary itself is dynamic (the crate binaries are checked for the opposite);
        // a truncated file is an error, not a guess.
        assert!(parse_elf(&helper).unwrap().interpreter.is_some());
        assert!(parse_elf(&helper[..100]).is_err());
    }
}
