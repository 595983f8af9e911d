//! Where the source of `xtask-registry` (the OCI registry client behind `cargo xtask store
//! push/pull` and substitutes) is: the engine builds that program from it on first use,
//! wherever cargo keeps this crate. The program itself is `src/main.rs` (feature
//! `client`).

#![deny(missing_docs)]

/// This crate's directory (its `Cargo.toml`), as cargo gave it when the crate was built.
pub const SOURCE_DIR: &str = env!("CARGO_MANIFEST_DIR");
