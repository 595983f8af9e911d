//! `cargo xtask image-tools`: fetches the image tools (Debian's e2fsprogs, fdisk and GRUB,
//! as `vm.lock` pins them) into the store and prints the directory of their wrappers, so
//! they can be run by hand, e.g. `$(cargo xtask image-tools)/e2fsck -fn 'IMG?offset=1048576'`.

use anyhow::Result;

use crate::{debian::image_tools as tools, Workspace};

pub fn run(ws: &Workspace) -> Result<i32> {
    let store = crate::cmd::open_store(ws, false)?;
    let tools = tools::tools(&store)?;
    println!("{}", tools.bin_dir().display());
    Ok(0)
}
