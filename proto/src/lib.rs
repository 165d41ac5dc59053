//! I/O-free SMTP for smarthost.
//!
//! Everything here is pure: bytes in, values out. The node crate owns the
//! sockets and feeds this code.
//!
//! - [`address`]: RFC 5321 paths and mailboxes (quoted local parts, address
//!   literals, IDNA domains, SMTPUTF8 local parts).
//! - [`reply`]: replies with RFC 3463 enhanced status codes, and their wire form.
//! - [`envelope`]: the envelope and the queue records, with their versioned
//!   `bincode` encoding, shared by every spool.

pub mod address;
pub mod command;
pub mod data;
pub mod envelope;
pub mod received;
pub mod reply;
pub mod session;
