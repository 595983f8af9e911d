//! The VM image builder (`vm-image --builder vm`), the reference's `initialize-hard-disk`
//! run by `expression->derivation-in-linux-vm`: a VM gets a fresh disk as `/dev/vda`,
//! partitions it, makes the ext4 file system with the closure (read from the store
//! share), fixes the inodes, installs GRUB, checks the file system and powers off.
//!
//! The guest runs e2fsprogs and fdisk from Debian's packages in the store, through the
//! dynamic loader of Debian's libc6 package with the packages' library directories, so
//! nothing is installed on the host or in the guest. It runs them with the same options,
//! the same staging tree and the same GRUB images as the host builder, so with the same
//! tool versions both builders write the same bytes.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use guest::{Mode, Request, Status};

use crate::image::{self, Closure, DiskTools, ImageOptions, Progress};
use crate::qemu::{self, AccelChoice, Console, Disk, DiskFormat, Share, VmSpec};
use crate::store::{self, Item, Recipe, Store};
use crate::vm::{shell_quote, Failure, Sink, VmRun};
use crate::{debian, host, system, Workspace};

/// Debian packages the guest runs: e2fsprogs and fdisk, and the shared libraries their
/// programs load (checked when the tools item is made).
const TOOL_PACKAGES: &[&str] = &[
    "e2fsprogs",
    "fdisk",
    "libc6",
    "libext2fs2",
    "libcom-err2",
    "libss2",
    "libblkid1",
    "libuuid1",
    "libfdisk1",
    "libsmartcols1",
    "libreadline8",
    "libtinfo6",
];
/// The programs the guest runs, and the package that has each.
const TOOL_PROGRAMS: &[(&str, &str)] = &[("mke2fs", "e2fsprogs"), ("e2fsck", "e2fsprogs"), ("sfdisk", "fdisk")];
/// The dynamic loader, inside libc6.
const LOADER: &str = "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2";
/// Where Debian's packages put shared libraries.
const LIB_DIRS: &[&str] = &["lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu"];
/// mke2fs's configuration, inside e2fsprogs.
const MKE2FS_CONF: &str = "etc/mke2fs.conf";
/// Guest memory of the builder VM.
const MEMORY_MIB: u32 = 512;
/// The builder VM is killed after this long (under TCG the default system takes about
/// a minute).
const TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Where the host puts the builder's inputs in the exchange directory.
const INPUT_DIR: &str = "in";

/// The disk tools from Debian's packages: the unpacked packages, and an item with a
/// wrapper script per program for the guest's `PATH`.
pub struct StoreTools {
    packages: ToolPackages,
    /// `bin/<program>`: runs the program through libc6's loader.
    pub wrappers: Item,
}

/// The unpacked [`TOOL_PACKAGES`], by name.
struct ToolPackages {
    packages: Vec<(String, Item)>,
}

impl ToolPackages {
    fn package(&self, name: &str) -> &Item {
        &self.packages.iter().find(|(p, _)| p == name).expect("a package of TOOL_PACKAGES").1
    }

    /// The program's path inside its package (`sbin/` or `usr/sbin/`).
    fn program(&self, program: &str) -> Result<(&Item, String)> {
        let package = TOOL_PROGRAMS.iter().find(|(p, _)| *p == program).map(|(_, pkg)| *pkg);
        let package = package.with_context(|| format!("`{program}` is not one of the VM builder's tools"))?;
        let item = self.package(package);
        for dir in ["sbin", "usr/sbin", "bin", "usr/bin"] {
            let rel = format!("{dir}/{program}");
            if item.path.join(&rel).is_file() {
                return Ok((item, rel));
            }
        }
        bail!("Debian package `{package}` (`{}`) has no `{program}`", item.path.display())
    }

    fn lib_path(&self, base: impl Fn(&Item) -> String) -> String {
        let mut dirs = Vec::new();
        for (_, item) in &self.packages {
            for dir in LIB_DIRS {
                if item.path.join(dir).is_dir() {
                    dirs.push(format!("{}/{dir}", base(item)));
                }
            }
        }
        dirs.join(":")
    }

    fn host_command(&self, program: &str) -> Result<Command> {
        let (item, rel) = self.program(program)?;
        let mut cmd = Command::new(self.package("libc6").path.join(LOADER));
        cmd.args(["--inhibit-cache", "--library-path", &self.lib_path(|i| i.path.display().to_string())])
            .arg(item.path.join(rel))
            .env("MKE2FS_CONFIG", self.mke2fs_conf());
        Ok(cmd)
    }

    fn mke2fs_conf(&self) -> PathBuf {
        self.package("e2fsprogs").path.join(MKE2FS_CONF)
    }
}

impl DiskTools for StoreTools {
    fn command(&self, program: &str) -> Result<Command> {
        self.packages.host_command(program)
    }

    fn mke2fs_conf(&self) -> PathBuf {
        self.packages.mke2fs_conf()
    }
}

impl StoreTools {
    /// How a guest runs `program` with no shell: libc6's loader and its arguments.
    pub fn guest_argv(&self, program: &str) -> Result<Vec<String>> {
        let (item, rel) = self.packages.program(program)?;
        Ok(vec![
            format!("{}/{LOADER}", self.packages.package("libc6").guest_path()),
            "--inhibit-cache".into(),
            "--library-path".into(),
            self.packages.lib_path(Item::guest_path),
            format!("{}/{rel}", item.guest_path()),
        ])
    }

    /// Every item the tools are made of.
    pub fn items(&self) -> Vec<Item> {
        let mut items: Vec<Item> = self.packages.packages.iter().map(|(_, item)| item.clone()).collect();
        items.push(self.wrappers.clone());
        items
    }
}

/// Fetches and unpacks the tool packages (pinned on first use) and makes the wrappers.
pub fn tools(store: &Store) -> Result<StoreTools> {
    let mut packages = Vec::new();
    for name in TOOL_PACKAGES {
        let pin = debian::pin(store, name, debian::show)?;
        let item = debian::unpacked(store, &pin).with_context(|| format!("unpacking Debian package `{name}`"))?;
        packages.push((name.to_string(), item));
    }
    let tools = ToolPackages { packages };
    let mut recipe =
        Recipe::new("image-tools", "vm-image-tools").param("loader", LOADER).param("lib-dirs", LIB_DIRS.join(":"));
    for (name, item) in &tools.packages {
        recipe = recipe.input_item(name, item);
    }
    let guest_loader = format!("{}/{LOADER}", tools.package("libc6").guest_path());
    let guest_lib_path = tools.lib_path(Item::guest_path);
    let guest_conf = format!("{}/{MKE2FS_CONF}", tools.package("e2fsprogs").guest_path());
    let wrappers = store.realise(&recipe, |out| {
        let bin = out.join("bin");
        fs::create_dir_all(&bin)?;
        for (program, _) in TOOL_PROGRAMS {
            check_libraries(&tools, program)?;
            let (item, rel) = tools.program(program)?;
            let script = format!(
                "#!/bin/sh\n# {program} from Debian's packages, through libc6's loader.\n\
                 MKE2FS_CONFIG={conf} exec {loader} --inhibit-cache --library-path {libs} {prog} \"$@\"\n",
                conf = shell_quote(&guest_conf),
                loader = shell_quote(&guest_loader),
                libs = shell_quote(&guest_lib_path),
                prog = shell_quote(&format!("{}/{rel}", item.guest_path())),
            );
            let path = bin.join(program);
            fs::write(&path, script).with_context(|| format!("writing `{}`", path.display()))?;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
        }
        Ok(())
    })?;
    Ok(StoreTools { packages: tools, wrappers })
}

/// Checks that the loader finds every library `program` needs among the packages (and
/// not on the host, which the guest does not have).
fn check_libraries(tools: &ToolPackages, program: &str) -> Result<()> {
    let mut cmd = tools.host_command(program)?;
    // `ld.so --list PROGRAM` prints the libraries it would load.
    let args: Vec<_> = cmd.get_args().map(|a| a.to_os_string()).collect();
    let mut list = Command::new(cmd.get_program());
    list.args(&args[..3]).arg("--list").args(&args[3..]);
    cmd = list;
    let shown = image::describe(&cmd);
    let out = cmd.output().with_context(|| format!("running `{shown}`"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "`{shown}` failed ({}): {text}{}", out.status, String::from_utf8_lossy(&out.stderr));
    let roots: Vec<&Path> = tools.packages.iter().map(|(_, i)| i.path.as_path()).collect();
    for line in text.lines() {
        let Some((lib, rest)) = line.split_once("=>") else { continue };
        let path = rest.split_whitespace().next().unwrap_or_default();
        if !roots.iter().any(|r| Path::new(path).starts_with(r)) {
            bail!(
                "`{program}` needs `{}`, which none of the VM builder's Debian packages has (found: `{}`); \
                 add its package to TOOL_PACKAGES",
                lib.trim(),
                rest.trim()
            );
        }
    }
    Ok(())
}

/// Builds the image into `out` (created) as `disk.FORMAT`, in a VM.
#[allow(clippy::too_many_arguments)]
pub fn build(
    store: &Store,
    ws: &Workspace,
    closure: &Closure,
    opts: &ImageOptions,
    uuid: &str,
    tools: &StoreTools,
    out: &Path,
    progress: Progress,
) -> Result<()> {
    let xchg = store.scratch("xchg")?;
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
    store::remove_tree(&root)?;
    let tree = tree?;

    let (mbr, core) = image::grub_boot_code(store, progress)?;
    fs::write(input.join("mbr"), mbr)?;
    fs::write(input.join("core.img"), core)?;
    fs::write(input.join("table"), image::partition_table(uuid))?;
    let script = guest_script(&tree, opts, uuid, &tools.wrappers.guest_path(), progress.verbose);
    fs::write(input.join("build.sh"), script)?;

    let disk = runtime.path().join("disk.raw");
    let file = fs::File::create(&disk).with_context(|| format!("creating `{}`", disk.display()))?;
    file.set_len(opts.layout.size).with_context(|| format!("sizing `{}`", disk.display()))?;
    drop(file);

    let builder = os_configs::minimal();
    let lowered = system::lower(store, ws, &builder, progress.verbose)
        .with_context(|| format!("lowering system `{}` to build the image in", builder.name))?;
    let accel = qemu::choose_accel(AccelChoice::Auto)?;
    let spec = VmSpec {
        accel,
        memory_mib: MEMORY_MIB,
        kernel: lowered.boot_image.clone(),
        initrd: lowered.initrd.path.join("initrd"),
        kernel_args: lowered.kernel_args.clone(),
        tsc_khz: if accel == qemu::Accel::Tcg { qemu::host_tsc_khz() } else { None },
        console: Console::Stdio,
        shares: vec![
            Share { tag: guest::STORE_TAG.into(), path: store.items_dir(), readonly: true },
            Share { tag: guest::XCHG_TAG.into(), path: xchg.path().to_path_buf(), readonly: false },
        ],
        disks: vec![Disk { path: disk.clone(), format: DiskFormat::Raw, readonly: false }],
        ports: Vec::new(),
        sandbox: host::qemu_supports_sandbox(&store.cache_dir()),
        forwards: Vec::new(),
    };
    let request = Request {
        version: guest::PROTOCOL_VERSION,
        mode: Mode::Command,
        argv: vec!["/bin/sh".into(), format!("{}/{INPUT_DIR}/build.sh", guest::XCHG_MOUNT)],
        env: vec![
            ("PATH".into(), format!("{}/bin:{}", tools.wrappers.guest_path(), lowered.path)),
            ("HOME".into(), "/tmp".into()),
        ],
        cwd: "/tmp".into(),
        links: lowered.links.clone(),
        dirs: Vec::new(),
        hostname: "image-builder".into(),
        stdout_port: None,
        stderr_port: None,
        system: None,
        argv_file: None,
        root_device: None,
        mounts: Vec::new(),
        net: None,
    };
    progress.step(&format!(
        "booting a VM to partition the disk, make the file system ({} MiB) with the closure and install GRUB",
        opts.layout.size >> 20
    ));
    let status = VmRun {
        spec,
        request,
        later: None,
        xchg: xchg.path().to_path_buf(),
        runtime: runtime.path().to_path_buf(),
        log_dir: ws.log_dir(),
        label: format!("vm-image-{}", closure.system_name),
        timeout: Some(TIMEOUT),
        verbose: progress.verbose,
        stdout: Sink::Stderr,
        stderr: Sink::Stderr,
    }
    .run()
    .context("building the image in a VM")?;
    match status {
        Status::Exited(0) => {}
        Status::Exited(code) => {
            return Err(Failure {
                code: 1,
                message: format!(
                    "building the image in a VM: the build script exited with status {code}; nothing was stored"
                ),
            }
            .into())
        }
        Status::Signaled(sig) => bail!("building the image in a VM: the build script was killed by signal {sig}"),
        Status::Error(msg) => bail!("building the image in a VM: the guest helper failed: {msg}"),
    }
    image::store_disk(&disk, out, opts.format, progress)
}

/// Shell commands that recreate the staging tree at `$r` in the guest: directories,
/// files (copied into `files`, which the guest sees as `$in/files`), links, the store
/// items bind-mounted from the store share, and every time set to 1, as on the host.
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
            let source = shell_quote(&format!("{}/{item}", guest::STORE_MOUNT));
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
/// has a small `mke2fs`).
fn guest_script(tree: &[String], opts: &ImageOptions, uuid: &str, tools: &str, verbose: bool) -> String {
    let offset = image::PARTITION_OFFSET;
    let mke2fs: Vec<String> = image::mke2fs_options(&opts.layout, uuid).iter().map(|a| shell_quote(a)).collect();
    let mut s = String::from("set -eu\n");
    if verbose {
        s.push_str("set -x\n");
    }
    s.push_str(&format!(
        "in={xchg}/{INPUT_DIR}\nt={tools}/bin\ndisk=/dev/vda\nr=/tmp/root\nexport E2FSPROGS_FAKE_TIME={time}\n\
         i=0\nwhile [ ! -b \"$disk\" ]; do\n  i=$((i + 1))\n  \
         [ \"$i\" -lt 300 ] || {{ echo \"the disk $disk did not appear\" >&2; exit 1; }}\n  sleep 0.1\ndone\n\
         mkdir \"$r\"\n",
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
    s.push_str(&format!(
        "truncate -s {size} /tmp/table.img\n\
         \"$t\"/sfdisk {sfdisk} /tmp/table.img < \"$in\"/table\n\
         dd if=/tmp/table.img of=\"$disk\" bs=512 count=1 conv=notrunc 2>/dev/null\n\
         \"$t\"/mke2fs {mke2fs} -d \"$r\" \"$disk\" {blocks}\n\
         /init normalise-inodes \"$disk\" {offset} {time}\n\
         dd if=\"$in\"/mbr of=\"$disk\" bs=440 count=1 conv=notrunc 2>/dev/null\n\
         dd if=\"$in\"/core.img of=\"$disk\" bs=512 seek=1 conv=notrunc 2>/dev/null\n\
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
        fs::set_permissions(root.join("boot/grub/grub.cfg"), fs::Permissions::from_mode(0o644)).unwrap();
        fs::set_permissions(root.join("boot"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(root.join("boot/grub"), fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::symlink("/store/h-item/bin", root.join("bin")).unwrap();
        let mut entries = Vec::new();
        image::list(&root, Path::new(""), &mut entries).unwrap();
        let cmds = tree_commands(&root, &entries, &["h-item".to_string()], &files).unwrap();
        let text = cmds.join("\n");
        assert!(text.contains("ln -s /store/h-item/bin \"$r\"/bin"), "{text}");
        assert!(text.contains("mkdir \"$r\"/boot/grub && chmod 700 \"$r\"/boot/grub"), "{text}");
        assert!(text.contains("mkdir \"$r\"/store/h-item && mount --bind /store/h-item \"$r\"/store/h-item"), "{text}");
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
