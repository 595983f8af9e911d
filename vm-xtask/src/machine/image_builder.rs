//! The VM image builder (`vm-image --builder vm`), the reference's `initialize-hard-disk`
//! run by `expression->derivation-in-linux-vm`: a VM gets a fresh disk as `/dev/vda`,
//! partitions it, makes the ext4 file system with the closure, fixes the inodes, installs
//! GRUB, checks the file system and powers off.
//!
//! The closure reaches the VM on a second disk, `/dev/vdb`, read-only: an ext4 file
//! system of its items made on the host by the store's `mke2fs -d` from the same
//! hard-link tree as the host builder stages (no copy of the data), which the guest
//! mounts and bind-mounts the items from. Reading 400 MB of small files over 9p took
//! twice as long. The store share stays for the tools and the helper.
//!
//! The guest runs e2fsprogs and fdisk from Debian's packages in the store
//! ([`crate::debian::image_tools`]), through the dynamic loader of Debian's libc6 package with
//! the packages' library directories, so nothing is installed on the host or in the
//! guest. The host builder runs the very same programs, with the same options, the same
//! staging tree and the same GRUB images, so both builders write the same bytes.

use fs_err as fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use os_configs::{Firmware, System};

use crate::debian::image_tools::StoreTools;
use crate::image::{self, Closure, ImageJob, ImageOptions, Progress};
use crate::process::shell_quote;
use crate::store::{self, Item};
use crate::vm::qemu::{self, AccelChoice, Disk, DiskFormat, VmSpec};
use crate::vm::{GuestRequest, Sink, VmRun};
use crate::{lower::system, Workspace};

/// Guest memory of the builder VM.
const MEMORY_MIB: u32 = 512;
/// The builder VM is killed after this long (under TCG the default system takes about
/// a minute).
const TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Where the host puts the builder's inputs in the exchange directory.
const INPUT_DIR: &str = "in";

/// Builds the image into `out` (created) as `disk.FORMAT`, in a VM.
pub fn build(job: &ImageJob, ws: &Workspace, out: &Path) -> Result<()> {
    let ImageJob { store, closure, opts, uuid, tools, uefi, progress } = *job;
    let xchg = store.exchange()?;
    let input = xchg.path().join(INPUT_DIR);
    fs::create_dir_all(input.join("files"))?;
    let runtime = store.scratch("run")?;

    // The same staging tree as the host builder's; the guest recreates it in a tmpfs,
    // with the store items bind-mounted from the store share.
    progress.step(&format!("staging the closure of `{}` ({} items)", closure.system_name, closure.items.len()));
    let staging = store.scratch("vm-image")?;
    let root = staging.path().join("root");
    let (entries, _) = image::stage(store, closure, opts, uuid, &root, image::Staging::HardLinks)?;
    let item_names: Vec<String> = closure.items.iter().map(Item::file_name).collect();
    let tree = tree_commands(&root, &entries, &item_names, &input.join("files"));
    let closure_disk = runtime.path().join("closure.ext4");
    let made = match tree.is_ok() {
        true => closure_disk_image(closure, tools, &root.join("store"), &closure_disk, progress),
        false => Ok(()),
    };
    store::remove_tree(&root)?;
    let tree = tree?;
    made?;

    // GRUB's boot code, made on the host (as a store item) as the host builder does.
    let uefi_bin = match opts.layout.firmware {
        Firmware::Bios => {
            let (mbr, core) = image::grub_boot_code(store, tools)?;
            fs::write(input.join("mbr"), mbr)?;
            fs::write(input.join("core.img"), core)?;
            None
        }
        Firmware::Uefi => {
            let uefi = uefi.context("a UEFI image needs the UEFI tools")?;
            fs::copy(image::grub_efi_image(store, tools, uefi, closure.arch)?, input.join("BOOTX64.EFI"))?;
            Some(format!("{}/bin", uefi.wrappers.guest_path()))
        }
    };
    fs::write(input.join("table"), image::partition_table(uuid, &opts.layout))?;
    let tools_dir = tools.wrappers.guest_path();
    let uefi_bin = uefi_bin.as_deref().map(|bin| (bin, image::esp_boot_file(closure.arch)));
    let script = guest_script(&tree, opts, uuid, tools_dir.as_str(), uefi_bin, progress.verbose);
    fs::write(input.join("build.sh"), script)?;

    let disk = runtime.path().join("disk.raw");
    let file = fs::File::create(&disk).with_context(|| format!("creating `{}`", disk.display()))?;
    file.set_len(opts.layout.size).with_context(|| format!("sizing `{}`", disk.display()))?;
    drop(file);

    // ext4 (and the crc32c it asks for by name, not as a module dependency) for the
    // closure's disk.
    let builder = System { initrd_modules: vec!["ext4".into(), "crc32c_generic".into()], ..os_configs::minimal() };
    let lowered = system::lower(store, ws, &builder, progress.verbose)
        .with_context(|| format!("lowering system `{}` to build the image in", builder.name))?;
    let accel = qemu::choose_accel(AccelChoice::Auto)?;
    let spec = VmSpec {
        disks: vec![
            Disk { path: disk.clone(), format: DiskFormat::Raw, readonly: false },
            Disk { path: closure_disk.clone(), format: DiskFormat::Raw, readonly: true },
        ],
        ..super::spec(accel, MEMORY_MIB, store, &lowered, xchg.path().to_path_buf())
    };
    let argv = vec!["/bin/sh".into(), format!("{}/{INPUT_DIR}/build.sh", guest::XCHG_MOUNT)];
    let env = vec![
        ("PATH".into(), format!("{}/bin:{}", tools.wrappers.guest_path(), lowered.path)),
        ("HOME".into(), "/tmp".into()),
    ];
    let request = system::command_request(&lowered, argv, env, "image-builder");
    progress.step(&format!(
        "booting a VM to partition the disk, make the file system ({} MiB) with the closure and install GRUB",
        opts.layout.size >> 20
    ));
    let request = GuestRequest::Now(Box::new(request));
    let label = format!("vm-image-{}", closure.system_name);
    let status = VmRun {
        timeout: Some(TIMEOUT),
        verbose: progress.verbose,
        stdout: Sink::Stderr,
        ..VmRun::new(spec, request, xchg.path(), runtime.path(), ws.log_dir(), label)
    }
    .run()
    .context("building the image in a VM")?;
    crate::vm::require_success(&status, "building the image in a VM: the build script", "; nothing was stored")?;
    image::store_disk(&disk, out, opts.format, progress)
}

/// The closure's disk: an ext4 file system at `disk` holding `items` (a directory with
/// one hard-link tree per item, as staged), made by the store's `mke2fs -d`, sized to
/// fit.
fn closure_disk_image(
    closure: &Closure,
    tools: &StoreTools,
    items: &Path,
    disk: &Path,
    progress: Progress,
) -> Result<()> {
    progress.step(&format!("making the closure's disk ({} items) for the VM", closure.items.len()));
    let fp = image::footprint(closure)?;
    let inodes = fp.entries * 5 / 4 + 1024;
    // Data, inode tables (256 bytes each), directories' overhead, and 10% plus 16 MiB.
    let blocks = (fp.blocks + inodes / 16 + 4096) * 11 / 10;
    let mut cmd = tools.command("mke2fs")?;
    cmd.args(["-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-O", "^has_journal,^metadata_csum", "-m", "0"])
        .arg("-N")
        .arg(inodes.to_string())
        .args(["-E", "root_owner=0:0", "-d"])
        .arg(items)
        .arg(disk)
        .arg(blocks.to_string());
    crate::process::run(&cmd).map(drop).context("making the closure's disk")
}

/// Shell commands that recreate the staging tree at `$r` in the guest: directories,
/// files (copied into `files`, which the guest sees as `$in/files`), links, the store
/// items bind-mounted from the closure's disk (at `$c`), and every time set to 1, as on
/// the host.
fn tree_commands(root: &Path, entries: &[String], items: &[String], files: &Path) -> Result<Vec<String>> {
    let meta = |rel: &str| {
        let path = root.join(rel);
        fs::symlink_metadata(&path).with_context(|| format!("reading `{}`", path.display()))
    };
    let mut cmds = vec![format!("chmod {:o} \"$r\"", meta("")?.mode() & 0o7777)];
    let mut touched = Vec::new();
    let in_item = |rel: &str| items.iter().any(|i| rel.starts_with(&format!("store/{i}/")));
    for (n, rel) in entries.iter().enumerate() {
        if in_item(rel) {
            continue;
        }
        let m = meta(rel)?;
        let dest = format!("\"$r\"/{}", shell_quote(rel));
        if let Some(item) = items.iter().find(|i| rel == &format!("store/{i}")) {
            let source = format!("\"$c\"/{}", shell_quote(item));
            let make = if m.is_dir() { "mkdir" } else { "touch" };
            cmds.push(format!("{make} {dest} && mount --bind {source} {dest}"));
            continue;
        }
        if m.is_dir() {
            cmds.push(format!("mkdir {dest} && chmod {:o} {dest}", m.mode() & 0o7777));
        } else if m.is_symlink() {
            let target = fs::read_link(root.join(rel))?;
            cmds.push(format!("ln -s {} {dest}", shell_quote(&target.to_string_lossy())));
        } else if m.is_file() {
            fs::copy(root.join(rel), files.join(n.to_string()))
                .with_context(|| format!("copying `{rel}` of the staging tree"))?;
            cmds.push(format!("cp \"$in\"/files/{n} {dest} && chmod {:o} {dest}", m.mode() & 0o7777));
        } else {
            bail!("`{rel}` in the staging tree is a special file");
        }
        touched.push(dest);
    }
    // Children before parents, then the root: creating an entry changes its parent's time.
    for dest in touched.iter().rev() {
        cmds.push(format!("touch -h -d @1 {dest}"));
    }
    cmds.push("touch -h -d @1 \"$r\"".to_string());
    Ok(cmds)
}

/// The script the guest runs (busybox sh): the host builder's steps, on `/dev/vda`, with
/// the tools in `tools/bin` (named by path: busybox sh prefers its own applets, and it
/// has a small `mke2fs`); for a UEFI image, `uefi_bin` is the UEFI tools' directory and
/// where GRUB's image goes on the EFI system partition.
fn guest_script(
    tree: &[String],
    opts: &ImageOptions,
    uuid: &str,
    tools: &str,
    uefi_bin: Option<(&str, &str)>,
    verbose: bool,
) -> String {
    let offset = opts.layout.root_offset();
    let mke2fs: Vec<String> = image::mke2fs_options(&opts.layout, uuid).iter().map(|a| shell_quote(a)).collect();
    let mut s = String::from("set -eu\n");
    if verbose {
        s.push_str("set -x\n");
    }
    s.push_str(&format!(
        "in={xchg}/{INPUT_DIR}\nt={tools}/bin\ndisk=/dev/vda\nr=/tmp/root\nexport E2FSPROGS_FAKE_TIME={time}\n\
         i=0\nwhile [ ! -b \"$disk\" ]; do\n  i=$((i + 1))\n  \
         [ \"$i\" -lt 300 ] || {{ echo \"the disk $disk did not appear\" >&2; exit 1; }}\n  sleep 0.1\ndone\n\
         c=/tmp/closure\nmkdir \"$c\" \"$r\"\n\
         i=0\nwhile [ ! -b /dev/vdb ]; do\n  i=$((i + 1))\n  \
         [ \"$i\" -lt 300 ] || {{ echo 'the closure disk /dev/vdb did not appear' >&2; exit 1; }}\n  sleep 0.1\ndone\n\
         mount -t ext4 -o ro /dev/vdb \"$c\"\n",
        xchg = guest::XCHG_MOUNT,
        time = image::FIXED_TIME,
        tools = shell_quote(tools),
    ));
    for cmd in tree {
        s.push_str(cmd);
        s.push('\n');
    }
    // The partition table goes into a file of the disk's size first: libfdisk takes a
    // block device's geometry from the kernel, and a file's from its defaults, and the
    // MBR's CHS fields would differ from the host builder's.
    // An MBR is one sector; a GPT is its first MiB and its last (the backup).
    let table = match uefi_bin {
        None => "dd if=/tmp/table.img of=\"$disk\" bs=512 count=1 conv=notrunc 2>/dev/null".to_string(),
        Some(_) => format!(
            "dd if=/tmp/table.img of=\"$disk\" bs=1M count=1 conv=notrunc 2>/dev/null\n\
             dd if=/tmp/table.img of=\"$disk\" bs=1M skip={last} seek={last} count=1 conv=notrunc 2>/dev/null",
            last = (opts.layout.size - image::GPT_TAIL) >> 20
        ),
    };
    let boot = match uefi_bin {
        None => "dd if=\"$in\"/mbr of=\"$disk\" bs=440 count=1 conv=notrunc 2>/dev/null\n\
                 dd if=\"$in\"/core.img of=\"$disk\" bs=512 seek=1 conv=notrunc 2>/dev/null"
            .to_string(),
        // The EFI system partition as the host builder makes it, with the same tools.
        Some((bin, boot_file)) => {
            let env: Vec<String> = image::MTOOLS_ENV.iter().map(|(k, v)| format!("{k}={}", shell_quote(v))).collect();
            let env = env.join(" ");
            format!(
                "u={bin}\ne=/tmp/esp.fat\ntruncate -s {esp_size} \"$e\"\n\
                 \"$u\"/mkfs.fat {mkfs} \"$e\" >/dev/null\n\
                 {env} \"$u\"/mmd -i \"$e\" {dirs}\n\
                 {env} \"$u\"/mcopy -i \"$e\" \"$in\"/BOOTX64.EFI {boot_file}\n\
                 dd if=\"$e\" of=\"$disk\" bs=1M seek={esp_at} conv=notrunc 2>/dev/null",
                bin = shell_quote(bin),
                esp_size = image::ESP_SIZE,
                mkfs = image::mkfs_fat_options(uuid).iter().map(|a| shell_quote(a)).collect::<Vec<_>>().join(" "),
                dirs = image::ESP_DIRS.join(" "),
                boot_file = boot_file,
                esp_at = image::PARTITION_OFFSET >> 20,
            )
        }
    };
    s.push_str(&format!(
        "truncate -s {size} /tmp/table.img\n\
         \"$t\"/sfdisk {sfdisk} /tmp/table.img < \"$in\"/table\n\
         {table}\n\
         \"$t\"/mke2fs {mke2fs} -d \"$r\" \"$disk\" {blocks}\n\
         /init normalise-inodes \"$disk\" {offset} {time}\n\
         {boot}\n\
         sync\n\
         if ! \"$t\"/e2fsck -f -n \"$disk?offset={offset}\" >/tmp/e2fsck.log 2>&1; then\n  \
         cat /tmp/e2fsck.log >&2\n  echo 'the new root file system does not pass e2fsck -fn' >&2\n  exit 1\nfi\n",
        size = opts.layout.size,
        sfdisk = image::SFDISK_ARGS.join(" "),
        mke2fs = mke2fs.join(" "),
        blocks = opts.layout.fs_blocks,
        time = image::FIXED_TIME,
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn tree_commands_recreate_the_staging_tree() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let files = dir.path().join("files");
        fs::create_dir_all(root.join("boot/grub")).unwrap();
        fs::create_dir_all(root.join("store/h-item/bin")).unwrap();
        fs::create_dir_all(&files).unwrap();
        fs::write(root.join("boot/grub/grub.cfg"), "cfg").unwrap();
        fs::write(root.join("store/h-item/bin/x"), "x").unwrap();
        fs::set_permissions(root.join("boot/grub/grub.cfg"), std::fs::Permissions::from_mode(0o644)).unwrap();
        fs::set_permissions(root.join("boot"), std::fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(root.join("boot/grub"), std::fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::symlink("/store/h-item/bin", root.join("bin")).unwrap();
        let mut entries = Vec::new();
        image::list(&root, Path::new(""), &mut entries).unwrap();
        let cmds = tree_commands(&root, &entries, &["h-item".to_string()], &files).unwrap();
        let text = cmds.join("\n");
        assert!(text.contains("ln -s /store/h-item/bin \"$r\"/bin"), "{text}");
        assert!(text.contains("mkdir \"$r\"/boot/grub && chmod 700 \"$r\"/boot/grub"), "{text}");
        assert!(text.contains("mkdir \"$r\"/store/h-item && mount --bind \"$c\"/h-item \"$r\"/store/h-item"), "{text}");
        assert!(!text.contains("bin/x"), "an item's content is copied instead of mounted: {text}");
        let grub = entries.iter().position(|e| e == "boot/grub/grub.cfg").unwrap();
        assert!(text.contains(&format!("cp \"$in\"/files/{grub} \"$r\"/boot/grub/grub.cfg && chmod 644")), "{text}");
        assert_eq!(fs::read_to_string(files.join(grub.to_string())).unwrap(), "cfg");
        // Times: children before parents, the root last, the mounted item never.
        let pos = |s: &str| cmds.iter().position(|c| c == s).unwrap_or_else(|| panic!("no `{s}` in {text}"));
        assert!(pos("touch -h -d @1 \"$r\"/boot/grub/grub.cfg") < pos("touch -h -d @1 \"$r\"/boot"));
        assert_eq!(cmds.last().unwrap(), "touch -h -d @1 \"$r\"");
        assert!(!text.contains("touch -h -d @1 \"$r\"/store/h-item"), "{text}");
    }
}
