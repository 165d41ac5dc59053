//! The smarthost data plane.
//!
//! - [`config`]: the one typed configuration, loaded and validated once.
//! - [`spool`]: the `Spool` trait and the embedded local spool.
//! - [`cli`]: the `smarthost` command line.
//! - [`server`]: starts the actors of a node.

pub mod cli;
pub mod config;
pub mod server;
pub mod spool;
