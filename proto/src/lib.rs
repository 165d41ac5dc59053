//! I/O-free SMTP for smarthost.
//!
//! Everything here is pure: bytes in, values out. The node crate owns the
//! sockets, the clock, TLS, the password store and the spool, and feeds
//! this code; that keeps the protocol testable byte by byte and fuzzable.
//!
//! - [`address`]: RFC 5321 paths and mailboxes: quoted local parts, address
//!   literals, IDNA domains turned into A-labels, SMTPUTF8 local parts,
//!   source routes stripped, `<Postmaster>`.
//! - [`command`]: one command line into a typed [`command::Command`], with
//!   the MAIL and RCPT ESMTP parameters (SIZE, BODY, SMTPUTF8, DSN, AUTH).
//! - [`data`]: the DATA phase: an incremental reader that only stops at
//!   `<CRLF>.<CRLF>`, unstuffs dots, refuses bare CR/LF (smuggling), long
//!   lines and oversize messages, and counts `Received:` fields for loops.
//! - [`session`]: the server session state machine. Bytes go in, [`session::Action`]s
//!   come out; TLS, logins and storage are asked of the shell and answered
//!   back. Relay rules, limits and every reply code live here.
//! - [`received`]: the `Received:` trace field and RFC 5322 dates.
//! - [`client`]: the client side: a reply parser, EHLO capabilities, the
//!   planner of one outbound transaction (MAIL, RCPT, DATA, with or without
//!   pipelining) with a result per recipient, the dot-stuffing body encoder
//!   and AUTH PLAIN/LOGIN.
//! - [`reply`]: replies with RFC 3463 enhanced status codes, and their wire form.
//! - [`envelope`]: the envelope and the queue records, with their versioned
//!   `bincode` encoding, shared by every spool.
//! - [`dsn`]: RFC 3464 delivery status notifications (bounces, delay and
//!   success reports) built from a record and the stored message, and the
//!   rules for who gets one: `NOTIFY=`, `RET=`, never to the null sender.
//! - [`mime8`]: the RFC 6152 downgrade of an 8-bit message to 7-bit MIME
//!   (quoted-printable or base64 per part) for servers without 8BITMIME,
//!   or the typed reason it cannot be done.

pub mod address;
pub mod client;
pub mod command;
pub mod data;
pub mod dsn;
pub mod envelope;
pub mod mime8;
pub mod received;
pub mod reply;
pub mod session;
