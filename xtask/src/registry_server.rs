//! Debian's `docker-registry` (CNCF distribution) from the store, as QEMU comes when the
//! host has none: the package and libc6, locked in `vm.lock`, unpacked in the store and
//! run through libc6's loader by a wrapper script (`...-docker-registry-store/bin/
//! docker-registry`). A real OCI registry on 127.0.0.1 for trying `store push`/`pull`
//! and substitutes without a registry of one's own, and for the tests.

use fs_err as fs;
use std::os::unix::fs::PermissionsExt;

use anyhow::{Context, Result};

use crate::lower::debian;
use crate::store::{Item, Recipe, Store};

/// The Debian package.
pub const PACKAGE: &str = "docker-registry";
/// The program, inside the package.
const BIN: &str = "usr/bin/docker-registry";
/// The dynamic loader, inside libc6.
const LOADER: &str = "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2";
const LIB_DIR: &str = "lib/x86_64-linux-gnu";
/// In the wrapper's item: a link to libc6's loader named as the registry.
const LOADER_LINK: &str = "libexec/docker-registry";

/// The `docker-registry-store` item: the wrapper over the unpacked package and libc6.
pub fn from_store(store: &Store) -> Result<Item> {
    let closure = debian::closure::closure(&[PACKAGE.to_string()]).context("locking docker-registry's packages")?;
    let pin_of = |name: &str| {
        closure
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p.clone())
            .with_context(|| format!("`{name}` is not locked"))
    };
    let registry = debian::unpacked(store, &pin_of(PACKAGE)?).context("unpacking docker-registry")?;
    let libc6 = debian::unpacked(store, &pin_of("libc6")?).context("unpacking libc6")?;
    let script = format!(
        "#!/bin/sh\n# docker-registry from Debian's package in the store, through libc6's loader.\n\
         s=$(cd \"${{0%/*}}/../..\" && pwd) || exit 127\n\
         exec \"${{0%/*}}/../{LOADER_LINK}\" --inhibit-cache --library-path \"$s/{}/{LIB_DIR}\" \
         \"$s/{}/{BIN}\" \"$@\"\n",
        libc6.file_name(),
        registry.file_name(),
    );
    let recipe = Recipe::new("docker-registry-store", "docker-registry-store")
        .param("script", script.clone())
        .reference(&registry)
        .reference(&libc6);
    store.realise(&recipe, |out| {
        let mut check = crate::process::command(libc6.path.join(LOADER));
        check.args(["--inhibit-cache", "--library-path"]).arg(libc6.path.join(LIB_DIR)).arg(registry.path.join(BIN));
        check.arg("--version");
        crate::process::run(&check).context("docker-registry from the store does not run")?;
        let link = out.join(LOADER_LINK);
        fs::create_dir_all(link.parent().context("a parent")?)?;
        std::os::unix::fs::symlink(format!("../../{}/{LOADER}", libc6.file_name()), &link)?;
        let bin = out.join("bin");
        fs::create_dir_all(&bin)?;
        let file = bin.join("docker-registry");
        fs::write(&file, &script).with_context(|| format!("writing `{}`", file.display()))?;
        fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755))?;
        Ok(())
    })
}
