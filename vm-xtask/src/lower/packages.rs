//! Packages that are not Debian's: binaries of crates in this workspace (found with
//! `cargo_metadata`, built statically by cargo) and programs on the host with their
//! shared-library closure (the ELF's `DT_NEEDED` entries resolved as `ld.so` would, and
//! its interpreter). Each is a store item; an item's references (a program's libraries)
//! are recorded as `ref` inputs of its recipe, so [`Store::closure`] computes closures.

use fs_err as fs;
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use object::read::elf::{Dyn, FileHeader, ProgramHeader};

use crate::store::{self, Item, Recipe, Store};
use crate::Workspace;
use os_configs::Arch;

/// The target crate packages are built for: explicit, so `+crt-static` applies to it
/// alone and not to build scripts and proc-macros (as for the guest helper).
pub const TARGET: &str = "x86_64-unknown-linux-gnu";
pub const RUSTFLAGS: &str = "-C target-feature=+crt-static";

/// The Rust target static binaries for `arch` are built for: glibc's for x86_64 (the
/// host's, linked by the host's `cc`), musl's for aarch64, linked by Rust's own `rust-lld`
/// (no cross C toolchain is needed; the target's standard library is added with rustup).
pub fn target(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => TARGET,
        Arch::Aarch64 => "aarch64-unknown-linux-musl",
    }
}

/// Makes `cmd` (a cargo build in `dir`) build for `arch`: its Rust target made ready
/// ([`target`]) and, for another architecture than the host's, linked by `rust-lld`.
/// The caller passes `--target` (`cargo test --no-run` needs it among its own arguments).
pub fn cross_build(cmd: &mut std::process::Command, dir: &Path, arch: Arch) -> Result<()> {
    let triple = target(arch);
    ensure_rust_target(dir, triple)?;
    if arch != Arch::X86_64 {
        let var = format!("CARGO_TARGET_{}_LINKER", triple.to_uppercase().replace('-', "_"));
        cmd.env(var, "rust-lld");
    }
    Ok(())
}

/// Makes sure the toolchain that builds in `dir` has the standard library of `target`,
/// adding it with rustup (said on stderr) when it does not.
fn ensure_rust_target(dir: &Path, target: &str) -> Result<()> {
    if target == TARGET {
        return Ok(());
    }
    let sysroot =
        crate::process::output(crate::process::command("rustc").args(["--print", "sysroot"]).current_dir(dir))
            .context("asking rustc for its sysroot")?;
    let rustlib = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim()).join("lib/rustlib");
    // One rustup at a time adds to a toolchain (runs in parallel would race): under a lock
    // in the toolchain's own directory, the check and the adding.
    let lock = rustlib.join(".vm-xtask-target-add.lock");
    let lock = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock)
        .and_then(|f| f.lock().map(|()| f))
        .with_context(|| format!("locking `{}`", lock.display()))?;
    if rustlib.join(target).join("lib").is_dir() {
        return Ok(());
    }
    let _step =
        crate::progress::step(&format!("adding Rust's standard library for {target} (rustup target add {target})"));
    let added =
        crate::process::output(crate::process::command("rustup").args(["target", "add", target]).current_dir(dir));
    drop(lock);
    match added {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => bail!(
            "`rustup target add {target}` failed ({}): {}; add it by hand, it builds programs for the guest",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => Err(e).with_context(|| {
            format!(
                "the toolchain lacks Rust's standard library for {target}; add it with `rustup target add {target}`"
            )
        }),
    }
}

/// The workspace's packages and their binary targets, from `cargo metadata`.
pub fn workspace_bins(ws: &Workspace) -> Result<BTreeMap<String, Vec<String>>> {
    let mut query = cargo_metadata::MetadataCommand::new();
    query.manifest_path(ws.root.join("Cargo.toml")).no_deps();
    // cargo_metadata's own runner would not give cargo the death signal: it goes through
    // the process layer, and cargo_metadata parses what it printed.
    let out = crate::process::run(&query.cargo_command()).context("reading the workspace's packages")?;
    let metadata = cargo_metadata::MetadataCommand::parse(String::from_utf8_lossy(&out.stdout))
        .context("parsing `cargo metadata`")?;
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
/// Once per xtask process: the nodes of a scenario that run the same package get the
/// same build, and cargo is asked once.
pub fn crate_binary(
    store: &Store,
    ws: &Workspace,
    package: &str,
    bin: &str,
    arch: Arch,
    verbose: bool,
) -> Result<Item> {
    type Built = std::sync::Mutex<HashMap<(PathBuf, PathBuf, String, String, Arch), Item>>;
    static BUILT: std::sync::OnceLock<Built> = std::sync::OnceLock::new();
    let key = (ws.root.clone(), store.items_dir(), package.to_string(), bin.to_string(), arch);
    let built = BUILT.get_or_init(Default::default);
    if let Some(item) = built.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        if item.path.exists() {
            return Ok(item.clone());
        }
    }
    let target_dir = ws.target_dir.join("vm-packages");
    let manifest = ws.root.join("Cargo.toml");
    let binary = cargo_build_static(&manifest, package, bin, &target_dir, RUSTFLAGS, arch, verbose)?;
    if elf_info(&binary)?.interpreter.is_some() {
        bail!("`{}` is dynamically linked; packages of this workspace must be static", binary.display());
    }
    let recipe = Recipe::new("crate-binary", &format!("{package}-{bin}"))
        .param("bin", bin)
        .input_content("binary", &store::sha256_file(&binary)?);
    let item = store.realise(&recipe, |out| {
        fs::create_dir_all(out.join("bin"))?;
        fs::copy(&binary, out.join("bin").join(bin)).with_context(|| format!("copying `{}`", binary.display()))?;
        Ok(())
    })?;
    built.lock().unwrap_or_else(|e| e.into_inner()).insert(key, item.clone());
    Ok(item)
}

/// Builds `bin` of package `package` of the workspace (or package) whose manifest is
/// `manifest`, wherever it is, for `arch` ([`target`]) in release mode with `rustflags`
/// (which, with an explicit target, reach neither build scripts nor proc-macros) into
/// `target_dir`; returns the binary's path.
pub fn cargo_build_static(
    manifest: &Path,
    package: &str,
    bin: &str,
    target_dir: &Path,
    rustflags: &str,
    arch: Arch,
    verbose: bool,
) -> Result<PathBuf> {
    let triple = target(arch);
    let dir = manifest.parent().context("a manifest's directory")?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = crate::process::command(cargo);
    cross_build(&mut cmd, dir, arch)?;
    cmd.args(["build", "--release", "--package", package, "--bin", bin, "--target", triple]);
    cmd.arg("--manifest-path").arg(manifest);
    cmd.arg("--target-dir").arg(target_dir).current_dir(dir).env("RUSTFLAGS", rustflags);
    if !verbose {
        cmd.arg("--quiet");
    }
    let status = cmd.status().with_context(|| format!("running cargo to build `{bin}` of package `{package}`"))?;
    if !status.success() {
        bail!(
            "building `{bin}` of package `{package}` (`cargo build -p {package} --bin {bin} --target \
            {triple}`) failed ({status})"
        );
    }
    Ok(target_dir.join(triple).join("release").join(bin))
}

/// What the dynamic loader needs to know about an ELF file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfInfo {
    /// `DT_NEEDED`: the sonames of the libraries it links.
    pub needed: Vec<String>,
    /// `PT_INTERP`: the dynamic loader, for executables.
    pub interpreter: Option<String>,
    /// `DT_RPATH`: directories searched first (`:`-separated entries, `$ORIGIN` unexpanded).
    pub rpath: Vec<String>,
    /// `DT_RUNPATH`: directories searched before the cache; an object with one ignores
    /// `DT_RPATH`.
    pub runpath: Vec<String>,
}

/// Reads an x86-64 ELF file's needed libraries and interpreter.
/// Only the parts it needs are read (a test binary's debug information is most of it).
pub fn elf_info(path: &Path) -> Result<ElfInfo> {
    let file = std::fs::File::open(path).with_context(|| format!("reading `{}`", path.display()))?;
    let data = object::read::ReadCache::new(file);
    parse_elf(&data).with_context(|| format!("reading the ELF headers of `{}`", path.display()))
}

fn parse_elf<'d, R: object::ReadRef<'d>>(data: R) -> Result<ElfInfo> {
    let header = object::elf::FileHeader64::<object::Endianness>::parse(data)?;
    let endian = header.endian()?;
    let mut interpreter = None;
    for ph in header.program_headers(endian, data)? {
        if let Some(interp) = ph.interpreter(endian, data)? {
            interpreter = Some(String::from_utf8_lossy(interp).into_owned());
        }
    }
    let sections = header.sections(endian, data)?;
    let (mut needed, mut rpath, mut runpath) = (Vec::new(), Vec::new(), Vec::new());
    if let Some((dyns, link)) = sections.dynamic(endian, data)? {
        let strings = sections.strings(endian, data, link)?;
        for d in dyns {
            let list = match d.tag32(endian) {
                Some(object::elf::DT_NEEDED) => &mut needed,
                Some(object::elf::DT_RPATH) => &mut rpath,
                Some(object::elf::DT_RUNPATH) => &mut runpath,
                _ => continue,
            };
            let name = u32::try_from(d.d_val(endian)).ok().and_then(|at| strings.get(at).ok());
            list.push(String::from_utf8_lossy(name.context("a dynamic entry's string is out of bounds")?).into_owned());
        }
    }
    Ok(ElfInfo { needed, interpreter, rpath, runpath })
}

/// Where `ld.so` finds libraries here: the cache `ldconfig -p` prints (x86-64 entries),
/// then the standard directories. A resolver also remembers what it read of each library
/// file and the item it made of it, by the file's identity ([`FileId`]): one kept for
/// many programs (the doctests' keeper) reads, hashes and stores an unchanged library once.
pub struct LibraryResolver {
    cache: BTreeMap<String, PathBuf>,
    seen: RefCell<HashMap<(PathBuf, FileId), ElfInfo>>,
    made: RefCell<HashMap<LibraryKey, Item>>,
}

/// A library item by what it is made of: the soname, the file and its identity, and the
/// items of the libraries it needs.
type LibraryKey = (String, PathBuf, FileId, Vec<String>);

/// A file as it is now: a file replaced or written to (its change time moves whatever
/// its modification time says) is another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileId {
    pub fn of(path: &Path) -> Result<FileId> {
        use std::os::unix::fs::MetadataExt;
        let m = fs::metadata(path).with_context(|| format!("reading `{}`", path.display()))?;
        Ok(FileId {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }
}

/// Directories searched after the cache, in `ld.so`'s order for Debian's multiarch glibc.
const LIBRARY_DIRS: &[&str] =
    &["/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib"];

impl LibraryResolver {
    pub fn from_host() -> LibraryResolver {
        let text = crate::process::output(crate::process::command("ldconfig").arg("-p"))
            .or_else(|_| crate::process::output(crate::process::command("/sbin/ldconfig").arg("-p")))
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        LibraryResolver { cache: parse_ldconfig(&text), seen: RefCell::default(), made: RefCell::default() }
    }

    /// `soname` as `ld.so` finds it for an object whose entries give `search`: its
    /// RPATH/RUNPATH directories first, then the cache and the standard directories.
    pub fn resolve_for(&self, soname: &str, search: &SearchPath) -> Option<PathBuf> {
        let has_runpath = !search.runpath.is_empty();
        if let Some(found) = search.dirs(has_runpath).map(|d| d.join(soname)).find(|p| p.is_file()) {
            return Some(found);
        }
        self.resolve(soname)
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

/// The shared-library closure of a host program, in the store.
pub struct HostLibraries {
    /// The items the program needs: its libraries and interpreter.
    pub items: Vec<Item>,
    /// Links to make in the guest: the interpreter at its `PT_INTERP` path, every
    /// library of the closure in `/lib/x86_64-linux-gnu`.
    pub links: Vec<(String, String)>,
}

/// Adds the shared-library closure of the program at `path` to the store (one item per
/// library, `lib-<soname>`, referring to the libraries it needs), not the program.
pub fn host_libraries(store: &Store, resolver: &LibraryResolver, path: &Path) -> Result<HostLibraries> {
    let info = elf_info(path)?;
    // `$ORIGIN` of a program is the directory of its real path (`/proc/self/exe`).
    let real = fs::canonicalize(path).with_context(|| format!("reading `{}`", path.display()))?;
    let search = SearchPath::of(&info, &real, None);
    let mut libs = BTreeMap::new();
    let mut items = Vec::new();
    for soname in &info.needed {
        items.push(library(store, resolver, soname, &search, &mut libs, &mut Vec::new())?);
    }
    let mut links = Vec::new();
    if let Some(interp) = &info.interpreter {
        let interp_path = Path::new(interp);
        let soname = interp_path.file_name().and_then(|n| n.to_str()).context("interpreter without a file name")?;
        let item = library_file(store, resolver, soname, interp_path, &[])?;
        links.push((interp.clone(), format!("{}/{soname}", item.guest_path())));
        items.push(item);
    }
    for (soname, item) in &libs {
        links.push((format!("/lib/x86_64-linux-gnu/{soname}"), format!("{}/{soname}", item.guest_path())));
    }
    Ok(HostLibraries { items, links })
}

/// Adds `path` and its shared-library closure to the store: one item per library
/// (`lib-<soname>`, referring to the libraries it needs) and one for the program
/// (`host-<name>`, referring to its libraries and interpreter).
pub fn host_program(store: &Store, resolver: &LibraryResolver, path: &Path) -> Result<HostProgram> {
    let name =
        path.file_name().and_then(|n| n.to_str()).with_context(|| format!("`{}` has no file name", path.display()))?;
    let HostLibraries { items: refs, links } = host_libraries(store, resolver, path)?;
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
    search: &SearchPath,
    done: &mut BTreeMap<String, Item>,
    stack: &mut Vec<String>,
) -> Result<Item> {
    if let Some(item) = done.get(soname) {
        return Ok(item.clone());
    }
    if stack.iter().any(|s| s == soname) {
        bail!("shared libraries need each other in a cycle: {} -> {soname}", stack.join(" -> "));
    }
    let path = resolver.resolve_for(soname, search).with_context(|| {
        let own: Vec<String> = search.dirs(!search.runpath.is_empty()).map(|d| d.display().to_string()).collect();
        let own = if own.is_empty() { String::new() } else { format!(" (RPATH/RUNPATH: {})", own.join(":")) };
        format!("shared library `{soname}` is not in `ldconfig -p` nor in {}{own}", LIBRARY_DIRS.join(", "))
    })?;
    stack.push(soname.to_string());
    let id = FileId::of(&path)?;
    let info = match resolver.seen.borrow().get(&(path.clone(), id)) {
        Some(info) => info.clone(),
        None => elf_info(&path)?,
    };
    resolver.seen.borrow_mut().insert((path.clone(), id), info.clone());
    let inner = SearchPath::of(&info, &path, Some(search));
    let mut refs = Vec::new();
    for needed in &info.needed {
        refs.push(library(store, resolver, needed, &inner, done, stack)?);
    }
    stack.pop();
    let item = library_file(store, resolver, soname, &path, &refs)?;
    done.insert(soname.to_string(), item.clone());
    Ok(item)
}

/// The item of library `soname` at `path`, needing `refs`: made once per resolver while
/// the file stays the same.
fn library_file(store: &Store, resolver: &LibraryResolver, soname: &str, path: &Path, refs: &[Item]) -> Result<Item> {
    let key = (soname.to_string(), path.to_path_buf(), FileId::of(path)?, refs.iter().map(Item::file_name).collect());
    if let Some(item) = resolver.made.borrow().get(&key) {
        return Ok(item.clone());
    }
    let item = store_library_file(store, soname, path, refs)?;
    resolver.made.borrow_mut().insert(key, item.clone());
    Ok(item)
}

fn store_library_file(store: &Store, soname: &str, path: &Path, refs: &[Item]) -> Result<Item> {
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

/// A `DT_RPATH` or `DT_RUNPATH` entry as directories: `:`-separated, empty parts
/// dropped, `$ORIGIN` and `${ORIGIN}` replaced by `origin` (the directory of the object
/// that holds the entry). Other tokens (`$LIB`, `$PLATFORM`) are kept as they are: a
/// directory holding one is not found.
pub fn expand_search_path(entry: &str, origin: &Path) -> Vec<PathBuf> {
    let origin = origin.to_string_lossy();
    entry
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| PathBuf::from(d.replace("${ORIGIN}", &origin).replace("$ORIGIN", &origin)))
        .collect()
}

/// Where one object's own entries send the search for the libraries it needs, before
/// the cache and the standard directories (as `ld.so`): without a `DT_RUNPATH`, its
/// `DT_RPATH` and then those of the objects that loaded it; with one, that alone.
#[derive(Debug, Clone, Default)]
pub struct SearchPath {
    pub rpath: Vec<PathBuf>,
    pub runpath: Vec<PathBuf>,
}

impl SearchPath {
    /// For the libraries the object at `path` (described by `info`) needs, `loaders`
    /// being the search path of the object that loaded it (none for a program).
    pub fn of(info: &ElfInfo, path: &Path, loaders: Option<&SearchPath>) -> SearchPath {
        let origin = path.parent().unwrap_or(Path::new("/"));
        let expand = |entries: &[String]| -> Vec<PathBuf> {
            entries.iter().flat_map(|e| expand_search_path(e, origin)).collect()
        };
        // Every loader's DT_RPATH (those without a DT_RUNPATH) is inherited.
        let inherited = loaders.map(|l| l.rpath.clone()).unwrap_or_default();
        if info.runpath.is_empty() {
            let mut rpath = expand(&info.rpath);
            rpath.extend(inherited);
            SearchPath { rpath, runpath: Vec::new() }
        } else {
            SearchPath { rpath: inherited, runpath: expand(&info.runpath) }
        }
    }

    /// The directories to try, in order, before the cache.
    fn dirs(&self, object_has_runpath: bool) -> impl Iterator<Item = &PathBuf> {
        let rpath = if object_has_runpath { &[][..] } else { &self.rpath[..] };
        rpath.iter().chain(self.runpath.iter())
    }
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
        assert!(parse_elf(helper.as_slice()).unwrap().interpreter.is_some());
        assert!(parse_elf(&helper[..100]).is_err());
    }
}

#[cfg(test)]
mod rpath_tests {
    use super::*;
    use std::process::Command;

    /// Compiles with the host's `cc` (see docs/running.md: the tests need a C compiler); fails
    /// saying so when there is none.
    fn cc(args: &[&str], dir: &Path) {
        let out = Command::new("cc")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap_or_else(|e| panic!("this test needs a C compiler as `cc` (Debian: apt-get install gcc): {e}"));
        assert!(out.status.success(), "cc {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// `prog` linking `libfixture.so.1` (which links `libfixturedep.so.1`), both found only
    /// in `$ORIGIN/lib`: through DT_RUNPATH (`new_dtags`) or DT_RPATH.
    fn fixture(dir: &Path, new_dtags: bool) -> PathBuf {
        fs::create_dir_all(dir.join("lib")).unwrap();
        fs::write(dir.join("dep.c"), "int fixture_dep(void) { return 41; }\n").unwrap();
        fs::write(dir.join("fixture.c"), "int fixture_dep(void);\nint fixture(void) { return fixture_dep() + 1; }\n")
            .unwrap();
        fs::write(dir.join("prog.c"), "int fixture(void);\nint main(void) { return fixture() == 42 ? 0 : 1; }\n")
            .unwrap();
        let dtags = if new_dtags { "-Wl,--enable-new-dtags" } else { "-Wl,--disable-new-dtags" };
        cc(&["-shared", "-fPIC", "-Wl,-soname,libfixturedep.so.1", "-o", "lib/libfixturedep.so.1", "dep.c"], dir);
        cc(
            &[
                "-shared",
                "-fPIC",
                "-Wl,-soname,libfixture.so.1",
                "-o",
                "lib/libfixture.so.1",
                "fixture.c",
                "lib/libfixturedep.so.1",
                dtags,
                "-Wl,-rpath,$ORIGIN",
            ],
            dir,
        );
        cc(&["-o", "prog", "prog.c", "lib/libfixture.so.1", dtags, "-Wl,-rpath,$ORIGIN/lib"], dir);
        // The program really runs with what its entries name, and only through them.
        let run = Command::new(dir.join("prog")).env_remove("LD_LIBRARY_PATH").status().unwrap();
        assert!(run.success(), "the fixture program does not run: {run}");
        dir.join("prog")
    }

    #[test]
    fn libraries_found_through_rpath_and_runpath_with_origin_are_in_the_closure() {
        for new_dtags in [true, false] {
            let tmp = tempfile::tempdir().unwrap();
            let prog = fixture(&tmp.path().join("fixture"), new_dtags);
            let info = elf_info(&prog).unwrap();
            let entries = if new_dtags { &info.runpath } else { &info.rpath };
            assert_eq!(entries, &["$ORIGIN/lib".to_string()], "{info:?}");

            let store = Store::open(&tmp.path().join("store"), false).unwrap();
            let program = host_program(&store, &LibraryResolver::from_host(), &prog)
                .unwrap_or_else(|e| panic!("new_dtags={new_dtags}: {e:#}"));
            let closure = store.closure(std::slice::from_ref(&program.item)).unwrap();
            let names: Vec<&str> = closure.iter().map(|i| i.name.as_str()).collect();
            for lib in ["lib-libfixture.so.1", "lib-libfixturedep.so.1", "lib-libc.so.6"] {
                assert!(names.contains(&lib), "new_dtags={new_dtags}: {lib} missing from {names:?}");
            }
            let fixture = closure.iter().find(|i| i.name == "lib-libfixture.so.1").unwrap();
            assert_eq!(
                fs::read(fixture.path.join("libfixture.so.1")).unwrap(),
                fs::read(tmp.path().join("fixture/lib/libfixture.so.1")).unwrap()
            );
            assert!(program.links.iter().any(|(l, _)| l == "/lib/x86_64-linux-gnu/libfixturedep.so.1"));
        }
    }

    /// A resolver kept for many programs makes each library's item once, and another once
    /// the file has changed (and then the items of the libraries needing it).
    #[test]
    fn a_kept_resolver_stores_each_library_once_and_again_once_changed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("fixture");
        let prog = fixture(&dir, true);
        let store = Store::open(&tmp.path().join("store"), false).unwrap();
        let resolver = LibraryResolver::from_host();
        // The items of the whole closure, by name.
        let closure = |libs: &HostLibraries| -> BTreeMap<String, Item> {
            store.closure(&libs.items).unwrap().into_iter().map(|i| (i.name.clone(), i)).collect()
        };
        let first = host_libraries(&store, &resolver, &prog).unwrap();
        let made = resolver.made.borrow().clone();
        let again = host_libraries(&store, &resolver, &prog).unwrap();
        assert_eq!(first.links, again.links);
        assert_eq!(first.items, again.items);
        assert_eq!(*resolver.made.borrow(), made, "made again");

        // The same size and modification time, other bytes: another file all the same.
        let path = dir.join("lib/libfixturedep.so.1");
        let modified = fs::metadata(&path).unwrap().modified().unwrap();
        let mut bytes = fs::read(&path).unwrap();
        // A padding byte of the ELF identification: read by nothing.
        bytes[10] ^= 1;
        fs::write(&path, &bytes).unwrap();
        fs::File::options().write(true).open(&path).unwrap().set_modified(modified).unwrap();
        let changed = host_libraries(&store, &resolver, &prog).unwrap();
        let (was, now) = (closure(&first), closure(&changed));
        let dep = &now["lib-libfixturedep.so.1"];
        assert_ne!(was["lib-libfixturedep.so.1"], *dep);
        assert_eq!(fs::read(dep.path.join("libfixturedep.so.1")).unwrap(), bytes);
        assert_ne!(was["lib-libfixture.so.1"], now["lib-libfixture.so.1"]);
        assert_eq!(was["lib-libc.so.6"], now["lib-libc.so.6"]);
        assert_ne!(first.links, changed.links);
    }

    #[test]
    fn origin_and_search_paths_are_expanded() {
        let origin = Path::new("/opt/app/bin");
        assert_eq!(
            expand_search_path("$ORIGIN/../lib:${ORIGIN}/x::/usr/lib", origin),
            [PathBuf::from("/opt/app/bin/../lib"), PathBuf::from("/opt/app/bin/x"), PathBuf::from("/usr/lib")]
        );
    }
}
