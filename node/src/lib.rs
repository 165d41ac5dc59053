//! The smarthost data plane.
//!
//! - [`config`]: the one typed configuration, loaded and validated once.
//! - [`spool`]: the `Spool` trait and the embedded local spool.
//! - [`queue`]: the `Queue` actor, which batches enqueues into group commits.
//! - [`cli`]: the `smarthost` command line.
//! - [`server`]: starts the actors of a node.

pub mod cli;
pub mod config;
pub mod queue;
pub mod server;
pub mod spool;
