//! The initrd: an uncompressed cpio archive holding the guest helper as `/init` and the
//! kernel modules the VM's devices need, in load order.

use std::fs;
use std::io::BufWriter;

use anyhow::{Context, Result};

use crate::cpio::CpioWriter;
use crate::kernel::{KernelTree, ModuleIndex};
use crate::store::{self, Item, Recipe, Store};

/// Modules every VM needs: the virtio MMIO transport (QEMU's `microvm` machine), 9p
/// over virtio for the shares, virtio serial ports for the command's output, and virtio
/// block devices for disks.
pub const BASE_MODULES: &[&str] = &["virtio_mmio", "9pnet_virtio", "9p", "virtio_console", "virtio_blk"];

/// Builds (or finds) the initrd for `kernel` with the helper and `extra` modules.
/// The result is an item holding the file `initrd`.
pub fn initrd(store: &Store, kernel: &KernelTree, helper: &Item, extra: &[String]) -> Result<Item> {
    let mut wanted: Vec<String> = BASE_MODULES.iter().map(|m| m.to_string()).collect();
    wanted.extend(extra.iter().cloned());
    let mut recipe = kernel
        .identify(Recipe::new("initrd", &format!("initrd-{}", kernel.release)))?
        .input_item("helper", helper)
        .param("modules", wanted.join(","));
    // A kernel from the store is identified by its item; one from the host by content,
    // so its modules' content must count too.
    let modules = if kernel.item.is_none() {
        let modules = ModuleIndex::read(kernel)?.closure(&wanted)?;
        for m in &modules {
            recipe = recipe.input_content(&format!("module:{}", m.name), &store::sha256_file(&m.path)?);
        }
        Some(modules)
    } else {
        None
    };
    store.realise(&recipe, |out| {
        let modules = match modules {
            Some(m) => m,
            None => ModuleIndex::read(kernel)?.closure(&wanted)?,
        };
        fs::create_dir(out)?;
        let file = fs::File::create(out.join("initrd")).context("creating initrd")?;
        let mut cpio = CpioWriter::new(BufWriter::new(file));
        for dir in ["dev", "proc", "sys", "tmp", "run", "root", "etc", "lib", guest::MODULE_DIR] {
            cpio.dir(dir, 0o755)?;
        }
        cpio.char_device("dev/console", 0o600, 5, 1)?;
        let helper_bytes = fs::read(&helper.path).context("reading the guest helper")?;
        cpio.file("init", 0o755, &helper_bytes)?;
        let mut order = String::new();
        for m in &modules {
            let data = fs::read(&m.path).with_context(|| format!("reading `{}`", m.path.display()))?;
            let file_name = format!("{}.ko", m.name);
            cpio.file(&format!("{}/{file_name}", guest::MODULE_DIR), 0o644, &data)?;
            order.push_str(&file_name);
            order.push('\n');
        }
        cpio.file(guest::MODULE_ORDER, 0o644, order.as_bytes())?;
        cpio.finish()?;
        Ok(())
    })
}
