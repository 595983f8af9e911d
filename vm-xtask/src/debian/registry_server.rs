//! Debian's `docker-registry` (CNCF distribution) from the store, as QEMU comes when the
//! host has none: the package and libc6, locked in `vm.lock`, unpacked in the store and
//! run through libc6's loader by a wrapper script (`...-docker-registry-store/bin/
//! docker-registry`). A real OCI registry on 127.0.0.1 for trying `store push`/`pull`
//! and substitutes without a registry of one's own, and for the tests.

use anyhow::{Context, Result};

use crate::debian;
use crate::store::{Item, Recipe, Store};

/// The Debian package.
pub const PACKAGE: &str = "docker-registry";
/// The program, inside the package.
const BIN: &str = "usr/bin/docker-registry";
/// libc6's libraries.
const LIB_DIR: &str = "lib/x86_64-linux-gnu";

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
         exec \"${{0%/*}}/../{}\" --inhibit-cache --library-path \"$s/{}/{LIB_DIR}\" \
         \"$s/{}/{BIN}\" \"$@\"\n",
        debian::loader_link(PACKAGE),
        libc6.file_name(),
        registry.file_name(),
    );
    let recipe = Recipe::new("docker-registry-store", "docker-registry-store")
        .param("script", script.clone())
        .reference(&registry)
        .reference(&libc6);
    store.realise(&recipe, |out| {
        let mut check = crate::process::command(libc6.path.join(debian::LOADER));
        check.args(["--inhibit-cache", "--library-path"]).arg(libc6.path.join(LIB_DIR)).arg(registry.path.join(BIN));
        check.arg("--version");
        debian::write_loader_wrapper(out, &libc6, PACKAGE, &script, &check)
    })
}
