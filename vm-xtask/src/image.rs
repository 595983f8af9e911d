//! Bootable disk images: layout, staging, the file system, GRUB, the shared-store image
//! and comparison ([`build`], whose items are re-exported here, with the host builder).
//! The same steps in a VM are the machine layer's (`machine::image_builder`); the tools
//! both run come from Debian's packages in the store (`debian::image_tools`).

pub mod build;

pub use build::*;
