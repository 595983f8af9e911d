//! A build step in a VM (`cargo xtask build-in-vm`, the reference's
//! `expression->derivation-in-linux-vm`): its command runs in a VM of a system and what it
//! writes to `$out` becomes a store item keyed by everything that went in. Same inputs
//! again: the stored item, no VM.

use fs_err as fs;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use guest::Request;
use os_configs::System;

use super::VmOpts;
use crate::store::ingest::{self, Limits};
use crate::store::{self, DirFd, Item, Outcome, Recipe, Store};
use crate::vm::qemu::{self, Disk, DiskFormat};
use crate::vm::{GuestRequest, Sink, VmRun};
use crate::{host, lower::system, Workspace};

/// The longest item name (`--name`) or input name: every store file named after it
/// (`<32 hex digits>-NAME.meta.<pid>` is the longest) then fits in 255 bytes.
pub const MAX_NAME_LEN: usize = 200;

/// What a build step is made of.
#[derive(Debug, Clone)]
pub struct BuildStep<'a> {
    /// The result's name ([`check_item_name`]).
    pub name: &'a str,
    /// Files or directories the guest finds read-only at `$NAME`: (NAME, host path).
    pub inputs: &'a [(String, String)],
    /// Variables for the command; their values are kept out of the recipe (as sha256).
    pub env: &'a [(String, String)],
    /// A fresh disk of this format and size as `/dev/vda`, `disk.FORMAT` in the result.
    pub disk: Option<(DiskFormat, u64)>,
    /// A network reaching beyond the host: the result is no longer hermetic.
    pub net: bool,
    /// The most the result may hold, disk image included.
    pub max_output: u64,
    /// The command; it writes its results into `$out`.
    pub command: &'a [String],
}

/// Runs `step` in a VM of `declared` (checked first: exit 2, nothing built, when it cannot
/// work here), or finds its stored result. Returns the store, the result and whether it
/// was found or built.
pub fn build(ws: &Workspace, opts: &VmOpts, declared: &System, step: &BuildStep) -> Result<(Store, Item, Outcome)> {
    let store = opts.open_store(ws)?;
    crate::lower::validate::check_here(declared, &store, ws)?;
    let mut system = declared.clone();
    if step.net {
        system.initrd_modules.push(qemu::NET_MODULE.to_string());
    }
    let inputs = add_inputs(&store, step.inputs)?;
    let lowered = system::lower(&store, ws, &system, opts.verbose)?;
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), lowered.path.clone()),
        ("HOME".into(), "/tmp".into()),
        ("TMPDIR".into(), "/tmp".into()),
        ("out".into(), format!("{}/out", guest::XCHG_MOUNT)),
    ];
    env.extend(inputs.iter().map(|(name, item, rel)| (name.clone(), guest_input_path(item, rel))));
    env.sort();
    // `--env` values may be secrets: the recipe (and so the `.meta`, and what `store
    // push` sends) holds each one's sha256 instead, so another value is still
    // another item. A build without `--env` has the recipe it always had.
    let mut hashed: Vec<(String, String)> =
        step.env.iter().map(|(key, value)| (key.clone(), store::sha256_bytes(value.as_bytes()))).collect();
    hashed.sort();
    let recipe_env = env.clone();
    env.extend(step.env.iter().cloned());
    env.sort();
    let disk = step.disk;

    let mut recipe = Recipe::new("build-in-vm", step.name)
        .param("argv", serde_json::to_string(&step.command)?)
        .param("env", serde_json::to_string(&recipe_env)?)
        .param("memory-mib", opts.memory.to_string())
        .param("kernel-args", lowered.kernel_args.join(" "))
        .param("disk", disk.map(|(f, s)| format!("{}:{s}", f.name())).unwrap_or_default());
    if !hashed.is_empty() {
        recipe = recipe.param("env-sha256", serde_json::to_string(&hashed)?);
    }
    // Only a build with a network says so: the others keep their items' hashes.
    if step.net {
        recipe = recipe.param("net", "user");
    }
    for (label, item) in lowered.items() {
        recipe = recipe.input_item(label, item);
    }
    for (name, item, _) in &inputs {
        recipe = recipe.input_item(&format!("input:{name}"), item);
    }

    let (item, outcome) = store.realise_with_outcome(&recipe, |out| {
        let accel = qemu::accel_for(lowered.arch, opts.accel)?;
        let xchg = store.exchange()?;
        let runtime = store.scratch("run")?;
        let out_dir = xchg.path().join("out");
        store::create_private_dir(&out_dir)?;
        let mut spec = opts.spec(accel, &store, &lowered, xchg.path().to_path_buf());
        spec.outside = step.net;
        let disk_path = match disk {
            Some((format, size)) => {
                let path = runtime.path().join(format!("disk.{}", format.name()));
                create_disk(&path, format, size)?;
                std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
                spec.disks.push(Disk { path: path.clone(), format, readonly: false });
                Some((path, format))
            }
            None => None,
        };
        let request = Request {
            nets: if step.net {
                vec![guest::NetConfig {
                    interface: qemu::GUEST_INTERFACE.into(),
                    address: qemu::GUEST_ADDRESS.into(),
                    gateway: Some("10.0.2.2".into()),
                    nameserver: Some("10.0.2.3".into()),
                    mac: None,
                }]
            } else {
                Vec::new()
            },
            ..system::command_request(&lowered, step.command.to_vec(), env.clone(), "builder")
        };
        if opts.explain {
            eprintln!("vm: booting to build `{}`", step.name);
        }
        let request = GuestRequest::Now(Box::new(request));
        let label = format!("build-{}", recipe.name());
        let status = VmRun {
            timeout: opts.vm_timeout(),
            verbose: opts.verbose,
            // stdout carries only the result's path.
            stdout: Sink::Stderr,
            snapshots: Some((store.clone(), opts.warmth())),
            ..VmRun::new(spec, request, xchg.path(), runtime.path(), ws.log_dir(), label)
        }
        .run()?;
        crate::vm::require_success(&status, "the build command", "; nothing was stored")?;
        // The guest is gone: copy what it left, through descriptors, into the new item.
        let xchg_dir = DirFd::open(xchg.path()).context("opening the exchange directory")?;
        let out_fd = xchg_dir.open_dir(OsStr::new("out")).map_err(|e| {
            anyhow!("`$out` is no longer a directory (the build removed it, or put a link or a file there): {e}")
        })?;
        // The disk image counts against the limit too (checked not to exceed it alone).
        let limit = step.max_output - disk.map(|(_, size)| size).unwrap_or(0);
        ingest::copy_dir(&out_fd, "$out", out, &Limits::guest_output(limit))
            .context("taking what the build wrote to $out")?;
        if let Some((path, format)) = disk_path {
            let dest = out.join(format!("disk.{}", format.name()));
            if fs::symlink_metadata(&dest).is_ok() {
                bail!("the build wrote `$out/disk.{}`, where the disk image goes", format.name());
            }
            fs::rename(&path, &dest).with_context(|| format!("moving the disk image into `{}`", dest.display()))?;
        }
        Ok(())
    })?;
    Ok((store, item, outcome))
}

/// Adds every input to the store by content. Returns (name, item, path of the content
/// inside the item).
fn add_inputs(store: &Store, inputs: &[(String, String)]) -> Result<Vec<(String, Item, Option<String>)>> {
    inputs
        .iter()
        .map(|(name, path)| {
            let (item, rel) = add_path(store, Path::new(path))
                .with_context(|| format!("adding input `{name}` (`{path}`) to the store"))?;
            Ok((name.clone(), item, rel))
        })
        .collect()
}

/// Why `name` cannot name a store item, if it cannot: it must be 1 to [`MAX_NAME_LEN`]
/// bytes of ASCII letters, digits and `+-._`, not begin with `.` or `-`, hold no `..`,
/// and not look like the store's own files (`NAME.meta`, `NAME.lock`, `NAME.meta.PID`).
pub fn check_item_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() {
        return Err("give a name".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!("the name is {} bytes long; give at most {MAX_NAME_LEN}", name.len()));
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || "+-._".contains(c)) {
        return Err("a name may hold only ASCII letters, digits and `+`, `-`, `.`, `_`".into());
    }
    if name.starts_with('.') || name.starts_with('-') {
        return Err("a name must not begin with `.` or `-`".into());
    }
    if name.contains("..") {
        return Err("a name must not hold `..`".into());
    }
    if name.split('.').skip(1).any(|part| part == "meta" || part == "lock") {
        return Err("`.meta` and `.lock` name the store's own files; choose another name".into());
    }
    Ok(())
}

/// Adds a file or directory to the store by content. A file keeps its name inside the
/// item directory, which is returned as the second value.
///
/// The content is copied into scratch space first (following `path` itself if it is a
/// link, never a link inside a directory: those are kept, and must resolve inside it),
/// and the copy is what is hashed and stored: the recipe always matches the content,
/// even if `path` or what it points to changes meanwhile.
pub fn add_path(store: &Store, path: &Path) -> Result<(Item, Option<String>)> {
    let real = path.canonicalize().with_context(|| format!("reading `{}`", path.display()))?;
    let file_name = real.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "input".to_string());
    let scratch = store.scratch("input")?;
    let copy = scratch.path().join("content");
    let rel = if fs::metadata(&real).with_context(|| format!("reading `{}`", real.display()))?.is_dir() {
        let dir = DirFd::open(&real).with_context(|| format!("opening `{}`", real.display()))?;
        ingest::copy_dir(&dir, &path.display().to_string(), &copy, &Limits::host())?;
        None
    } else {
        let mut from = fs::File::open(&real).with_context(|| format!("opening `{}`", real.display()))?;
        if !from.metadata()?.is_file() {
            bail!("`{}` is neither a regular file nor a directory", path.display());
        }
        fs::create_dir(&copy)?;
        let mut to = fs::File::create_new(copy.join(&file_name))?;
        std::io::copy(&mut from, &mut to).with_context(|| format!("copying `{}`", path.display()))?;
        use std::os::unix::fs::PermissionsExt;
        let exec = from.metadata()?.permissions().mode() & 0o111 != 0;
        to.set_permissions(std::fs::Permissions::from_mode(if exec { 0o755 } else { 0o644 }))?;
        Some(file_name.clone())
    };
    let sha = store::hash_path(&copy)?;
    let recipe =
        Recipe::new("input", &file_name).param("file", rel.clone().unwrap_or_default()).input_content("content", &sha);
    let item = store.realise(&recipe, |out| {
        fs::rename(&copy, out).with_context(|| format!("moving the copy of `{}` into the store", path.display()))
    })?;
    Ok((item, rel))
}

fn guest_input_path(item: &Item, rel: &Option<String>) -> String {
    match rel {
        Some(rel) => format!("{}/{rel}", item.guest_path()),
        None => item.guest_path().into_string(),
    }
}

fn create_disk(path: &PathBuf, format: DiskFormat, size: u64) -> Result<()> {
    host::ensure(&[host::QEMU_IMG])?;
    let mut create = crate::process::command(host::QEMU_IMG.program);
    create.args(["create", "-q", "-f", format.name()]).arg(path).arg(size.to_string());
    crate::process::run(&create).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item_names() {
        for good in ["hello", "a", "libfoo.so.1", "x+y-z_1.2", "metadata", "a.metal", &"n".repeat(MAX_NAME_LEN)] {
            assert_eq!(check_item_name(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "a/b",
            "a\nb",
            "a b",
            "a,b",
            "..",
            "a..b",
            ".hidden",
            "-x",
            "x.meta",
            "x.lock",
            "x.meta.123",
            "é",
            &"n".repeat(MAX_NAME_LEN + 1),
        ] {
            assert!(check_item_name(bad).is_err(), "{bad:?}");
        }
        // The longest store file named after an item: `<hash>-NAME.meta.<pid>`.
        let longest = format!("{}-{}.meta.{}", "0".repeat(32), "n".repeat(MAX_NAME_LEN), 4_194_304);
        assert!(longest.len() <= 255, "{}", longest.len());
    }
}
