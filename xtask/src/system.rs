//! Lowering a [`System`] value to the store items a VM boots from: kernel image, initrd
//! (guest helper and modules) and the userland packages.

use std::fs;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use os_configs::{Package, System};

use crate::kernel::{self, KernelTree};
use crate::store::{Item, Recipe, Store};
use crate::{debian, helper, initrd, Workspace};

/// Everything needed to boot a system.
#[derive(Debug, Clone)]
pub struct Lowered {
    pub kernel: KernelTree,
    /// What QEMU's `-kernel` gets.
    pub boot_image: PathBuf,
    pub initrd: Item,
    /// Store items of the userland packages.
    pub packages: Vec<Item>,
    /// Links the guest helper creates before running anything (`/bin` and friends).
    pub links: Vec<(String, String)>,
    /// The guest's `PATH`.
    pub path: String,
    pub kernel_args: Vec<String>,
}

impl Lowered {
    /// Every store item the VM reads, so a recipe built in the VM depends on them all.
    pub fn items(&self) -> Vec<(&'static str, &Item)> {
        let mut items = vec![("initrd", &self.initrd)];
        if let Some(k) = &self.kernel.item {
            items.push(("kernel", k));
        }
        items.extend(self.packages.iter().map(|p| ("package", p)));
        items
    }
}

/// Builds (or finds) everything `system` needs to boot.
pub fn lower(store: &Store, ws: &Workspace, system: &System, verbose: bool) -> Result<Lowered> {
    let kernel = kernel::resolve(store, &system.kernel)
        .with_context(|| format!("getting the kernel of system `{}`", system.name))?;
    let boot_image = kernel::boot_image(store, &kernel)?;
    let helper = helper::build(store, ws, verbose)?;
    let initrd = initrd::initrd(store, &kernel, &helper, &system.initrd_modules)
        .with_context(|| format!("building the initrd of system `{}`", system.name))?;
    let mut packages = Vec::new();
    let mut links = Vec::new();
    let mut path = Vec::new();
    for package in &system.packages {
        match package {
            Package::Busybox => {
                let item = busybox(store)?;
                let bin = format!("{}/bin", item.guest_path());
                for link in ["/bin", "/sbin", "/usr/bin", "/usr/sbin"] {
                    links.push((link.to_string(), bin.clone()));
                }
                path.push("/bin".to_string());
                packages.push(item);
            }
            Package::Debian { package } => {
                let pin = debian::pin(store, package, debian::show)?;
                let item = debian::unpacked(store, &pin)?;
                for dir in ["usr/bin", "bin", "usr/sbin", "sbin"] {
                    if item.path.join(dir).is_dir() {
                        path.push(format!("{}/{dir}", item.guest_path()));
                    }
                }
                packages.push(item);
            }
        }
    }
    if path.is_empty() {
        path.push("/bin".to_string());
    }
    Ok(Lowered {
        kernel,
        boot_image,
        initrd,
        packages,
        links,
        path: path.join(":"),
        kernel_args: system.kernel_args.clone(),
    })
}

/// Debian's static busybox with a link per applet in `bin/`.
pub fn busybox(store: &Store) -> Result<Item> {
    let pin = debian::pin(store, "busybox-static", debian::show)?;
    let deb = debian::unpacked(store, &pin)?;
    let recipe = Recipe::new("busybox", &format!("busybox-{}", pin.version)).input_item("deb", &deb);
    store.realise(&recipe, |out| {
        let src = deb.path.join("bin/busybox");
        let bin = out.join("bin");
        fs::create_dir_all(&bin)?;
        fs::copy(&src, bin.join("busybox")).with_context(|| format!("copying `{}`", src.display()))?;
        let list = crate::host::command(&src).arg("--list").output().context("running busybox --list")?;
        if !list.status.success() {
            bail!("`busybox --list` failed ({})", list.status);
        }
        for applet in String::from_utf8_lossy(&list.stdout).lines() {
            if !applet.is_empty() && applet != "busybox" && !applet.contains('/') {
                std::os::unix::fs::symlink("busybox", bin.join(applet))?;
            }
        }
        Ok(())
    })
}
