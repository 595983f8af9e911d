//! The initrd: an uncompressed cpio archive holding the guest helper as `/init` and the
//! kernel modules the VM's devices need, in load order.

use fs_err as fs;
use std::io::BufWriter;

use anyhow::{Context, Result};

use crate::lower::cpio::CpioWriter;
use crate::lower::kernel::{KernelTree, ModuleIndex};
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
        .param("modules", wanted.join(","))
        .param("module-signatures", "stripped");
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
            let data = strip_signature(&data).to_vec();
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

/// The trailer that ends a signed module: the signature, its description (12 bytes,
/// ending with the signature's length, big-endian) and this marker.
const SIGNATURE_MARKER: &[u8] = b"~Module signature appended~\n";

/// A module without its appended signature (as it is, when it has none). The kernel
/// loads unsigned modules unless it enforces signatures (Debian's does not, outside
/// Secure Boot): verifying one costs a SHA-256 of the whole module and an RSA check,
/// which take long in an emulated CPU.
pub fn strip_signature(module: &[u8]) -> &[u8] {
    let Some(rest) = module.strip_suffix(SIGNATURE_MARKER) else { return module };
    let Some(info_start) = rest.len().checked_sub(12) else { return module };
    let info = &rest[info_start..];
    let sig_len = u32::from_be_bytes([info[8], info[9], info[10], info[11]]) as usize;
    match info_start.checked_sub(sig_len) {
        Some(end) => &rest[..end],
        None => module,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_stripped_and_unsigned_modules_kept() {
        let module = b"\x7fELF module body".to_vec();
        assert_eq!(strip_signature(&module), &module[..]);
        let mut signed = module.clone();
        let signature = vec![0xAB; 300];
        signed.extend_from_slice(&signature);
        // struct module_signature: algorithm, hash, id type, signer and key id lengths,
        // padding, then the signature's length (big-endian).
        signed.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0]);
        signed.extend_from_slice(&(signature.len() as u32).to_be_bytes());
        signed.extend_from_slice(SIGNATURE_MARKER);
        assert_eq!(strip_signature(&signed), &module[..]);
        // A marker with a length that does not fit is left alone.
        let mut broken = module.clone();
        broken.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0]);
        broken.extend_from_slice(&u32::MAX.to_be_bytes());
        broken.extend_from_slice(SIGNATURE_MARKER);
        assert_eq!(strip_signature(&broken), &broken[..]);
    }
}
