//! Builds the guest helper (the `guest` crate) as a static binary and adds it to the
//! store by content.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use object::Object;

use crate::store::{self, Item, Recipe, Store};
use crate::Workspace;

/// The target the helper is built for: explicit, so `+crt-static` applies to it alone and
/// not to build scripts and proc-macros.
const TARGET: &str = "x86_64-unknown-linux-gnu";

pub fn build(store: &Store, ws: &Workspace, verbose: bool) -> Result<Item> {
    let target_dir = ws.target_dir.join("guest-helper");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--release", "--package", "guest", "--bin", "guest", "--target", TARGET])
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(&ws.root)
        .env("RUSTFLAGS", "-C target-feature=+crt-static");
    if !verbose {
        cmd.arg("--quiet");
    }
    let status = cmd.status().context("running cargo to build the guest helper")?;
    if !status.success() {
        bail!("building the guest helper (`cargo build -p guest --target {TARGET}`) failed ({status})");
    }
    let binary = target_dir.join(TARGET).join("release/guest");
    check_static(&binary)?;
    let recipe = Recipe::new("file", "guest-helper").input_content("content", &store::sha256_file(&binary)?);
    store.realise(&recipe, |out| {
        std::fs::copy(&binary, out).with_context(|| format!("copying `{}`", binary.display()))?;
        Ok(())
    })
}

/// The helper runs before any library exists in the guest: it must have no interpreter.
fn check_static(binary: &Path) -> Result<()> {
    let data = std::fs::read(binary).with_context(|| format!("reading `{}`", binary.display()))?;
    let file = object::File::parse(&*data).with_context(|| format!("parsing `{}`", binary.display()))?;
    let dynamic = file.section_by_name_bytes(b".interp").is_some();
    if dynamic {
        bail!("the guest helper `{}` is dynamically linked; it must be static", binary.display());
    }
    Ok(())
}
