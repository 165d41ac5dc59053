//! The smarthost data plane.
//!
//! - [`config`]: the one typed configuration, loaded and validated once.
//! - [`auth`]: argon2 password hashes and the SMTP AUTH user table.
//! - [`telemetry`]: logs to standard error, text or JSON.
//! - [`spool`]: the `Spool` trait and the embedded local spool.
//! - [`queue`]: the `Queue` actor, which batches enqueues into group commits.
//! - [`listener`]: the Listener actor: accepts connections under the limits.
//! - [`session`]: the I/O shell of one SMTP session around `proto::session`.
//! - [`tls`]: the STARTTLS server configuration.
//! - [`cli`]: the `smarthost` command line.
//! - [`server`]: starts the actors of a node.

pub mod auth;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod listener;
pub mod queue;
pub mod scheduler;
pub mod server;
pub mod session;
pub mod spool;
pub mod telemetry;
pub mod tls;
