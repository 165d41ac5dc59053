//! Logs: `tracing` events written to standard error, as text (coloured on a
//! terminal) or JSON lines.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global log subscriber.
///
/// The filter is `log.level` unless `RUST_LOG` is set, which overrides it
/// while debugging without editing the configuration. When a subscriber
/// is already installed (in tests, for one) it is kept.
pub fn init(log: &LogConfig) {
    let mut rejected = None;
    let filter = match std::env::var("RUST_LOG") {
        Ok(env) if !env.trim().is_empty() => EnvFilter::try_new(&env).unwrap_or_else(|e| {
            rejected = Some(format!("RUST_LOG={env:?} is not a valid filter ({e})"));
            configured_filter(log)
        }),
        _ => configured_filter(log),
    };
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(filter);
    let installed = match log.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    if let (Ok(()), Some(rejected)) = (installed, rejected) {
        tracing::warn!("{rejected}; using log.level = {:?}", log.level);
    }
}

/// `log.level`, which validation has checked; `info` if it is unusable anyway.
fn configured_filter(log: &LogConfig) -> EnvFilter {
    EnvFilter::try_new(&log.level).unwrap_or_else(|_| EnvFilter::new("info"))
}
