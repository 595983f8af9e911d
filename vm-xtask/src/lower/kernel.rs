//! Kernels: where a system's kernel image and modules come from, the uncompressed
//! `vmlinux` that boots fast, and kernel-module dependency closures read from each
//! module's `.modinfo` (Debian ships no `modules.dep`).

use fs_err as fs;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use object::{Object, ObjectSection};
use os_configs::{Arch, Kernel};

use crate::debian;
use crate::store::{self, Item, Recipe, Store};

/// A kernel on disk: its image, its modules tree, and what identifies it in recipes.
#[derive(Debug, Clone)]
pub struct KernelTree {
    /// The bzImage (`vmlinuz`).
    pub image: PathBuf,
    /// The directory holding `kernel/` and `modules.builtin`.
    pub modules_dir: PathBuf,
    /// The kernel release (`uname -r`), the modules directory's name.
    pub release: String,
    /// The store item the tree lives in, when it came from the store.
    pub item: Option<Item>,
}

impl KernelTree {
    /// Adds what identifies this kernel to a recipe: the store item it lives in, or,
    /// for a kernel on the host, the image's content.
    pub fn identify(&self, recipe: Recipe) -> Result<Recipe> {
        Ok(match &self.item {
            Some(item) => recipe.input_item("kernel", item),
            None => recipe.input_content("kernel", &store::sha256_file(&self.image)?),
        })
    }
}

/// Finds (fetching if needed) the kernel a system of `arch` asks for.
pub fn resolve(store: &Store, kernel: &Kernel, arch: Arch) -> Result<KernelTree> {
    match kernel {
        Kernel::Debian { package } => {
            // A metapackage (linux-image-amd64) is locked as the real image it names.
            let package = debian::kernel_package(package, arch);
            let pin = debian::pin(&debian::qualified(&package, arch))?;
            if pin.architecture != arch.debian() {
                bail!(
                    "Debian package {} is a kernel for {}, not for the system's architecture {arch} ({}); name a \
                     kernel package for {}",
                    pin.package,
                    pin.architecture,
                    arch.debian(),
                    arch.debian()
                );
            }
            let item = debian::unpacked(store, &pin)?;
            let modules_root = item.path.join("lib/modules");
            let release = single_dir_name(&modules_root)
                .with_context(|| format!("Debian package {} has no kernel modules", pin.package))?;
            let image = item.path.join(format!("boot/vmlinuz-{release}"));
            if !image.is_file() {
                bail!("Debian package {} has no `boot/vmlinuz-{release}`", pin.package);
            }
            Ok(KernelTree { image, modules_dir: modules_root.join(&release), release, item: Some(item) })
        }
        Kernel::Path { image, modules } => {
            if !image.is_file() {
                bail!("kernel image `{}` does not exist; give the path of a bzImage (vmlinuz)", image.display());
            }
            let mut header = [0u8; 0x40];
            let read = fs::File::open(image).and_then(|mut f| std::io::Read::read(&mut f, &mut header));
            read.with_context(|| format!("reading `{}`", image.display()))?;
            if is_arm64_image(&header) != (arch == Arch::Aarch64) {
                let what = if is_arm64_image(&header) { "an arm64 kernel" } else { "not an arm64 kernel" };
                bail!("kernel image `{}` is {what}, and the system's architecture is {arch}", image.display());
            }
            if !modules.join("kernel").is_dir() {
                bail!(
                    "kernel modules directory `{}` has no `kernel/` subdirectory; give a `/lib/modules/RELEASE` tree",
                    modules.display()
                );
            }
            let release = modules
                .canonicalize()?
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .context("kernel modules directory has no name")?;
            Ok(KernelTree { image: image.clone(), modules_dir: modules.clone(), release, item: None })
        }
    }
}

fn single_dir_name(dir: &Path) -> Result<String> {
    let names: Vec<String> = fs::read_dir(dir)
        .with_context(|| format!("listing `{}`", dir.display()))?
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    match names.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!("expected one kernel release in `{}`, found {:?}", dir.display(), names),
    }
}

/// The image QEMU boots: the uncompressed ELF `vmlinux` (booted through PVH, which
/// skips the in-guest decompression that costs seconds under TCG) when it can be
/// extracted, else the bzImage itself. An arm64 `Image` (Debian's `vmlinuz` for arm64 is
/// one, uncompressed) is booted as it is.
pub fn boot_image(store: &Store, tree: &KernelTree) -> Result<PathBuf> {
    let recipe = tree.identify(Recipe::new("vmlinux", &format!("vmlinux-{}", tree.release)))?;
    let item = store.item_for(&recipe);
    if store.is_present(&item) {
        return Ok(item.path.join("vmlinux"));
    }
    let image = fs::read(&tree.image).with_context(|| format!("reading `{}`", tree.image.display()))?;
    if is_arm64_image(&image) || find_xz(&image).is_none() {
        return Ok(tree.image.clone());
    }
    let item = store.realise(&recipe, |out| {
        let vmlinux = extract_vmlinux(&image)?;
        fs::create_dir(out)?;
        fs::write(out.join("vmlinux"), vmlinux)?;
        Ok(())
    })?;
    Ok(item.path.join("vmlinux"))
}

/// Whether `image` is an arm64 kernel `Image`: its header's magic, `ARM\x64` at 0x38.
pub fn is_arm64_image(image: &[u8]) -> bool {
    image.get(0x38..0x3c) == Some(b"ARM\x64")
}

const XZ_MAGIC: &[u8] = b"\xfd7zXZ\x00";

fn find_xz(image: &[u8]) -> Option<usize> {
    image.windows(XZ_MAGIC.len()).position(|w| w == XZ_MAGIC)
}

/// Decompresses the XZ stream inside a bzImage: the kernel's ELF image.
pub fn extract_vmlinux(image: &[u8]) -> Result<Vec<u8>> {
    use xz2::stream::{Action, Status, Stream};
    let start = find_xz(image).context("the kernel image holds no XZ stream")?;
    let mut input = &image[start..];
    let mut stream = Stream::new_stream_decoder(u64::MAX, 0).context("creating an XZ decoder")?;
    let mut out = Vec::with_capacity(64 << 20);
    // Decode exactly one stream: what follows it is the rest of the bzImage.
    loop {
        if out.len() == out.capacity() {
            out.reserve(out.capacity());
        }
        let before = stream.total_in();
        let status =
            stream.process_vec(input, &mut out, Action::Run).context("decompressing the kernel image's XZ stream")?;
        input = &input[(stream.total_in() - before) as usize..];
        match status {
            Status::StreamEnd => break,
            _ if input.is_empty() && out.len() < out.capacity() => {
                bail!("the kernel image's XZ stream is truncated")
            }
            _ => {}
        }
    }
    if !out.starts_with(b"\x7fELF") {
        bail!("the kernel image's XZ stream is not an ELF vmlinux");
    }
    Ok(out)
}

/// A loadable module and its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    pub name: String,
    pub path: PathBuf,
}

/// Module names use `_`; file names may use `-`.
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// Reads the `key=value` strings of a module's `.modinfo` section.
pub fn modinfo(path: &Path) -> Result<Vec<(String, String)>> {
    let data = fs::read(path).with_context(|| format!("reading module `{}`", path.display()))?;
    parse_modinfo(&data).with_context(|| format!("reading .modinfo of `{}`", path.display()))
}

fn parse_modinfo(elf: &[u8]) -> Result<Vec<(String, String)>> {
    let file = object::File::parse(elf).context("not an ELF file")?;
    let section = file.section_by_name(".modinfo").context("no .modinfo section")?;
    let data = section.data().context("unreadable .modinfo section")?;
    Ok(data
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .filter_map(|s| {
            let s = String::from_utf8_lossy(s);
            s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect())
}

/// The modules named in `depends=`.
pub fn depends(info: &[(String, String)]) -> Vec<String> {
    info.iter()
        .filter(|(k, _)| k == "depends")
        .flat_map(|(_, v)| v.split(',').filter(|d| !d.is_empty()).map(normalize).collect::<Vec<_>>())
        .collect()
}

/// The modules of a kernel tree, by normalized name, and the names built into the kernel.
pub struct ModuleIndex {
    files: BTreeMap<String, PathBuf>,
    builtin: BTreeSet<String>,
    release: String,
}

impl ModuleIndex {
    pub fn read(tree: &KernelTree) -> Result<ModuleIndex> {
        let mut files = BTreeMap::new();
        walk_modules(&tree.modules_dir.join("kernel"), &mut files)?;
        let builtin_path = tree.modules_dir.join("modules.builtin");
        let builtin = fs::read_to_string(&builtin_path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| Path::new(l).file_stem())
            .map(|s| normalize(&s.to_string_lossy()))
            .collect();
        Ok(ModuleIndex { files, builtin, release: tree.release.clone() })
    }

    /// `wanted` and everything they depend on, dependencies first. Modules built into
    /// the kernel are left out; a name that is neither a module nor built in is an error.
    pub fn closure(&self, wanted: &[String]) -> Result<Vec<Module>> {
        let mut order = Vec::new();
        let mut seen = BTreeSet::new();
        for name in wanted {
            self.visit(&normalize(name), &mut seen, &mut order, &mut Vec::new())?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<Module>,
        stack: &mut Vec<String>,
    ) -> Result<()> {
        if seen.contains(name) || self.builtin.contains(name) {
            return Ok(());
        }
        if stack.iter().any(|s| s == name) {
            bail!("kernel modules depend on each other in a cycle: {} -> {name}", stack.join(" -> "));
        }
        let path = self.files.get(name).with_context(|| {
            format!("kernel module `{name}` is neither a module of kernel {} nor built into it", self.release)
        })?;
        stack.push(name.to_string());
        for dep in depends(&modinfo(path)?) {
            self.visit(&dep, seen, order, stack)?;
        }
        stack.pop();
        seen.insert(name.to_string());
        order.push(Module { name: name.to_string(), path: path.clone() });
        Ok(())
    }
}

fn walk_modules(dir: &Path, files: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("listing `{}`", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            walk_modules(&path, files)?;
        } else if let Some(stem) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".ko")) {
            files.insert(normalize(stem), path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_depends_from_modinfo_strings() {
        let info = vec![
            ("license".to_string(), "GPL".to_string()),
            ("depends".to_string(), "virtio_ring,virtio,virtio_pci-modern-dev".to_string()),
            ("name".to_string(), "virtio_pci".to_string()),
        ];
        assert_eq!(depends(&info), vec!["virtio_ring", "virtio", "virtio_pci_modern_dev"]);
        let none = vec![("depends".to_string(), String::new())];
        assert!(depends(&none).is_empty());
    }

    fn fake_module(modinfo: &[u8]) -> Vec<u8> {
        use object::write::Object as Writer;
        use object::{Architecture, BinaryFormat, Endianness, SectionKind};
        let mut obj = Writer::new(BinaryFormat::Elf, Architecture::X86_64, Endianness::Little);
        let section = obj.add_section(Vec::new(), b".modinfo".to_vec(), SectionKind::ReadOnlyData);
        obj.append_section_data(section, modinfo, 1);
        obj.write().unwrap()
    }

    #[test]
    fn reads_modinfo_section_of_an_elf_module() {
        let elf = fake_module(b"license=GPL\0depends=virtio,virtio_ring\0name=virtio_mmio\0\0");
        let info = parse_modinfo(&elf).unwrap();
        assert_eq!(info[0], ("license".to_string(), "GPL".to_string()));
        assert_eq!(depends(&info), vec!["virtio", "virtio_ring"]);
        assert!(parse_modinfo(b"not an elf").is_err());
    }

    #[test]
    fn closure_orders_dependencies_first_and_skips_builtins() {
        let dir = tempfile::tempdir().unwrap();
        let release = dir.path().join("6.1.0-test");
        let kdir = release.join("kernel/drivers");
        fs::create_dir_all(&kdir).unwrap();
        fs::write(kdir.join("a.ko"), fake_module(b"depends=b,c\0")).unwrap();
        fs::write(kdir.join("b.ko"), fake_module(b"depends=c-d\0")).unwrap();
        fs::write(kdir.join("c-d.ko"), fake_module(b"depends=\0")).unwrap();
        fs::write(kdir.join("loop.ko"), fake_module(b"depends=loop2\0")).unwrap();
        fs::write(kdir.join("loop2.ko"), fake_module(b"depends=loop\0")).unwrap();
        fs::write(release.join("modules.builtin"), "kernel/lib/c.ko\n").unwrap();
        let tree = KernelTree {
            image: dir.path().join("vmlinuz"),
            modules_dir: release,
            release: "6.1.0-test".into(),
            item: None,
        };
        let index = ModuleIndex::read(&tree).unwrap();
        let names: Vec<String> = index.closure(&["a".to_string()]).unwrap().into_iter().map(|m| m.name).collect();
        assert_eq!(names, vec!["c_d", "b", "a"]);
        let err = index.closure(&["nope".to_string()]).unwrap_err().to_string();
        assert!(err.contains("`nope` is neither a module of kernel 6.1.0-test nor built into it"), "{err}");
        assert!(index.closure(&["loop".to_string()]).unwrap_err().to_string().contains("cycle"));
    }

    #[test]
    fn no_xz_stream_is_an_error() {
        assert!(extract_vmlinux(b"MZ not a kernel").is_err());
    }
}
