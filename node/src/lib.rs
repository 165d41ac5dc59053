//! The smarthost data plane.
//!
//! - [`config`]: the one typed configuration, loaded and validated once.
//! - [`auth`]: argon2 password hashes and the SMTP AUTH user table.
//! - [`auth_guard`]: the bound on password checks at once and the
//!   throttle of failed logins (per address and user, local or in Redis).
//! - [`telemetry`]: logs to standard error, text or JSON.
//! - [`spool`]: the `Spool` trait and the embedded local spool.
//! - [`storer`]: the Storer actor, one per connection thread, which batches
//!   enqueues into group commits.
//! - [`queue`]: the `Queue` actor, which hears of stored messages, hands due
//!   deliveries out and records their outcomes.
//! - [`schedule`]: the `Schedule` trait: the queue's scheduling state, in
//!   memory (one node) or in Redis (shared by the cluster).
//! - [`scheduler`]: which deliveries are due; retries, expiry (pure).
//! - [`dispatcher`]: the Dispatcher actor, one throttle per active domain.
//! - [`limits`]: the `DomainLimits` trait: per-domain connection leases and
//!   rate, in-process or cluster-wide in Redis.
//! - [`throttle`]: the DomainThrottle actor: connection cap, rate, reuse.
//! - [`delivery`]: routes, the outbound SMTP client, the Delivery actor
//!   (one per outbound connection) and local drop directories.
//! - [`bounce`]: delivery status notifications for failures and delays.
//! - [`badmail`]: what can neither be delivered nor bounced, kept with its
//!   reason until an operator replays or deletes it.
//! - [`pickup`]: the Pickup actor: queues `.eml` files dropped in a
//!   directory.
//! - [`delivery_log`]: one JSON line per attempt and recipient.
//! - [`journal`]: the append-only JSON-line files of the local backend
//!   (the suppression list, the answered idempotency keys).
//! - [`listener`]: the Listener actor: accepts connections under the limits,
//!   backs off when `accept()` fails.
//! - [`workers`]: the threads that run sessions and outbound deliveries.
//! - [`admission`]: which connections are admitted, refused or evicted (pure).
//! - [`deadlines`]: the idle, command and DATA deadlines of a session (pure).
//! - [`fd_limit`]: the open-file limit raised and checked at start-up.
//! - [`session`]: the I/O shell of one SMTP session around `proto::session`.
//! - [`body_memory`]: the node-wide budget for message bodies in memory.
//! - [`tls`]: the STARTTLS server configuration.
//! - [`admin`]: the admin HTTP server: health, readiness, the queue API,
//!   `/metrics`.
//! - [`metrics`]: the Prometheus metrics: names, recorder, scraped states.
//! - [`admin_client`]: the client side of that API, for `smarthost queue`.
//! - [`cli`]: the `smarthost` command line.
//! - [`server`]: starts the actors of a node.

pub mod admin;
pub mod admin_client;
pub mod admission;
pub mod auth;
pub mod auth_guard;
pub mod badmail;
pub mod body_cache;
pub mod body_memory;
pub mod bounce;
pub mod cli;
pub mod compose;
pub mod config;
pub mod deadlines;
pub mod delivery;
pub mod delivery_log;
pub mod dispatcher;
pub mod fd_limit;
pub mod idempotency;
pub mod journal;
pub mod limits;
pub mod listener;
pub mod load;
pub mod malloc;
pub mod metrics;
pub mod pickup;
pub mod queue;
pub mod quota;
#[cfg(test)]
mod redis_cluster_tests;
pub mod schedule;
pub mod scheduler;
pub mod send_api;
pub mod server;
pub mod session;
pub mod session_log;
pub mod sessions;
pub mod spill;
pub mod spool;
pub mod storer;
pub mod submit;
pub mod suppression;
pub mod telemetry;
pub mod throttle;
pub mod tls;
pub mod webhooks;
pub mod workers;

/// Wall-clock milliseconds since the Unix epoch, as records, leases and
/// timers keep time (0 for a clock set before 1970).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
