//! Subcommands that are reports, not the server: `candela doctor` (check a compute
//! device against the CPU) and `candela plan` (what a model and a KV budget mean for a
//! machine). `candela fetch` is `engine::fetch::resolve` and lives in `main.rs`.
//!
//! Depends on `engine` and `kv`; nothing depends on it.

pub mod doctor;
pub mod plan;
