//! Debian's gdb from the store, as QEMU comes when the host has none: `gdb-minimal` (no
//! Python) with its dependency closure, locked in `vm.lock`, unpacked in the store and
//! run through libc6's loader by a wrapper script (`...-gdb-store/bin/gdb`). The debugger
//! `run-vm --gdb` and `test --debug` tell the user to attach with, and the tests' gdb:
//! nothing installed on the host. `gdbserver`, the other half, runs in the guest
//! (`test --debug` adds its package to the system for that run).

use anyhow::Result;

use crate::debian;
use crate::store::{Item, Recipe, Store};

/// The Debian package of the debugger.
pub const PACKAGE: &str = "gdb-minimal";
/// The Debian package of the debugger's server, run in the guest by `test --debug`.
pub const SERVER_PACKAGE: &str = "gdbserver";
/// The program, inside the package.
const BIN: &str = "usr/bin/gdb";
/// gdb's data directory, in the wrapper item: empty (gdb-minimal ships none), so that
/// nothing of a host's own gdb (`/usr/share/gdb`, its Python) is read.
const DATA_DIR: &str = "share/gdb";

/// The `gdb-store` item: the wrapper over the unpacked closure of [`PACKAGE`].
pub fn from_store(store: &Store) -> Result<Item> {
    let packages = debian::Unpacked::closure(store, PACKAGE, "gdb")?;
    let item_of = |package: &str| packages.item(package);
    let rel = |item: &Item, sub: &str| format!("$s/{}/{sub}", item.file_name());
    let (libc6, gdb) = (item_of("libc6")?, item_of(PACKAGE)?);
    let libs = packages.lib_dirs(|i| format!("$s/{}", i.file_name()));
    // No init file (system-wide or the user's) and no host data: what the user types runs.
    let script = format!(
        "#!/bin/sh\n# gdb from Debian's gdb-minimal in the store, through libc6's loader.\n\
         s=$(cd \"${{0%/*}}/../..\" && pwd) || exit 127\n\
         exec \"${{0%/*}}/../{}\" --inhibit-cache --library-path \"{}\" \"{}\" \
         --data-directory \"${{0%/*}}/../{DATA_DIR}\" -nx \"$@\"\n",
        debian::loader_link("gdb"),
        libs.join(":"),
        rel(gdb, BIN),
    );
    let mut recipe = Recipe::new("gdb-store", "gdb-store").param("script", script.clone());
    for (_, item) in &packages.items {
        recipe = recipe.reference(item);
    }
    store.realise(&recipe, |out| {
        let _step = crate::progress::step(&format!("making gdb from {} Debian packages", packages.items.len()));
        let mut check = packages.command(PACKAGE, BIN)?;
        check.args(["-nx", "--version"]);
        debian::write_loader_wrapper(out, libc6, "gdb", &script, &check)?;
        fs_err::create_dir_all(out.join(DATA_DIR))?;
        Ok(())
    })
}

/// The program of the `gdb-store` item.
pub fn program(store: &Store) -> Result<std::path::PathBuf> {
    Ok(from_store(store)?.path.join("bin/gdb"))
}
