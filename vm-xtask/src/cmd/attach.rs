//! `cargo xtask attach [ID]`: a shell on a terminal of its own in a running VM of this
//! workspace (`run-vm`, `test`, a scenario's node), over the VM's attach channel
//! ([`crate::vm::attach`]); without an ID, the running VMs listed.

use anyhow::Result;

use crate::vm::attach;
use crate::Workspace;

#[derive(Debug, Clone, clap::Args)]
pub struct Attach {
    /// The VM, as listed by `cargo xtask attach` (e.g. `run-vm-41236`).
    pub id: Option<String>,
}

impl Attach {
    /// Returns the shell's exit status (0 when listing, or detached with Ctrl-]).
    pub fn run(self, ws: &Workspace) -> Result<i32> {
        let dir = attach::registry_dir(&ws.target_dir);
        match &self.id {
            None => {
                let entries = attach::list(&dir);
                if entries.is_empty() {
                    eprintln!("no VM of this workspace is running (`cargo xtask run-vm --keep -- CMD` keeps one up)");
                } else {
                    attach::print_list(&entries);
                }
                Ok(0)
            }
            Some(id) => attach::attach(&dir, &attach::find(&dir, id)?),
        }
    }
}
