//! Helpers for the black-box tests in `tests/tests/`: start the real
//! `smarthost` binary on free loopback ports and talk to it over sockets,
//! and start the real peers it delivers to.
//!
//! - `relay`: the binary with a generated configuration and its own spool.
//! - `smtp`: a raw blocking SMTP client that asserts exact replies.
//! - `ca`: a throw-away CA and server certificate for TLS tests.
//! - `sink`: an SMTP server (aiosmtpd) that keeps what it is sent.
//! - `dns`: a DNS server (dnsmasq) answering MX and A from test records.
//! - `scenario`: a relay with a delivery log, submission, and the checks of
//!   the delivery scenarios (delivery log, delivery status notifications).
//! - `http`: a raw HTTP client for the relay's admin API.
//! - `proxy`: a TCP proxy a test can cut (a node losing its link to Redis).
//! - `oracle`: the oracle-checked workload with faults (`docs/reliability.md`).
//! - `traffic`: numbered messages to three domains for the multi-node tests.
//! - `webhook`: a webhook endpoint that keeps what it is posted, and checks
//!   the signatures.

use std::path::PathBuf;

pub mod ca;
pub mod dns;
pub mod http;
pub mod oracle;
pub mod proxy;
pub mod relay;
pub mod scenario;
pub mod sink;
pub mod smtp;
pub mod traffic;
pub mod webhook;

/// The `smarthost` binary under test: `$SMARTHOST_BIN` when set, otherwise
/// the one built next to the test binary (tests run from
/// `target/<profile>/deps/`, the binary lives in `target/<profile>/`).
///
/// Panics when it does not exist: build it first with `cargo build --bins`.
pub fn smarthost_bin() -> PathBuf {
    let path = match std::env::var_os("SMARTHOST_BIN") {
        Some(path) => PathBuf::from(path),
        None => {
            let exe = std::env::current_exe().expect("the path of the test binary");
            let mut dir = exe.parent().expect("the test binary has a directory");
            if dir.ends_with("deps") {
                dir = dir.parent().expect("deps has a parent directory");
            }
            dir.join(format!("smarthost{}", std::env::consts::EXE_SUFFIX))
        }
    };
    assert!(
        path.is_file(),
        "the smarthost binary is not at {}: build it first with `cargo build --bins` \
         (or point SMARTHOST_BIN at it)",
        path.display()
    );
    path
}
