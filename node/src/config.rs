//! The one typed configuration of a node, loaded once and validated at load.
//!
//! A TOML file, overridden by `SMARTHOST__SECTION__KEY` environment variables.
//! Durations are written `"30s"`, `"5m"`; sizes `"10MB"`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub node: NodeConfig,
    pub smtp: SmtpConfig,
    pub queue: QueueConfig,
    pub delivery: DeliveryConfig,
    pub domains: Vec<DomainConfig>,
    pub bounce: BounceConfig,
    pub admin: AdminConfig,
    pub log: LogConfig,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Defaults to the host name.
    pub id: String,
    /// The name in the greeting, EHLO and `Received:`; defaults to the host name.
    pub hostname: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SmtpConfig {
    pub listen: Vec<SocketAddr>,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    #[serde(with = "human::duration")]
    pub connection_timeout: Duration,
    #[serde(with = "human::size")]
    pub max_message_size: u64,
    #[serde(with = "human::size")]
    pub max_session_size: u64,
    pub max_recipients: usize,
    pub require_tls: bool,
    pub max_hop_count: usize,
    pub relay_networks: Vec<IpNet>,
    pub tls: Option<TlsConfig>,
    pub users: Vec<SmtpUser>,
    /// Offer AUTH on connections without TLS (off: passwords never travel in clear).
    pub allow_plaintext_auth: bool,
    /// How long a failed AUTH waits before its 535 reply.
    #[serde(with = "human::duration")]
    pub auth_failure_delay: Duration,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpUser {
    pub name: String,
    /// An argon2 PHC string from `smarthost hash-password`.
    pub password_hash: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueBackend {
    #[default]
    Local,
    Redis,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueConfig {
    pub backend: QueueBackend,
    pub path: PathBuf,
    pub redis_url: String,
    #[serde(with = "human::durations")]
    pub retry_intervals: Vec<Duration>,
    #[serde(with = "human::duration")]
    pub max_lifetime: Duration,
    #[serde(with = "human::duration")]
    pub delay_notification: Duration,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsPolicy {
    #[default]
    Opportunistic,
    Required,
    Disabled,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeliveryConfig {
    pub smart_host: Option<String>,
    pub max_connections: usize,
    pub max_connections_per_domain: usize,
    pub max_messages_per_connection: usize,
    pub tls: TlsPolicy,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DomainKind {
    #[default]
    Remote,
    Local,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainAuth {
    pub user: String,
    pub password: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainConfig {
    pub name: String,
    #[serde(default)]
    pub kind: DomainKind,
    pub drop_dir: Option<PathBuf>,
    pub smart_host: Option<String>,
    pub max_connections: Option<usize>,
    /// `"50/s"`, `"1000/h"`.
    pub rate: Option<String>,
    pub tls: Option<TlsPolicy>,
    pub auth: Option<DomainAuth>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BounceConfig {
    pub copy_to: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: SocketAddr,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `smarthost=debug`.
    pub level: String,
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            id: host_name(),
            hostname: host_name(),
        }
    }
}

impl Default for SmtpConfig {
    fn default() -> Self {
        SmtpConfig {
            listen: vec!["127.0.0.1:2525".parse().expect("literal address")],
            max_connections: 1000,
            max_connections_per_ip: 50,
            connection_timeout: Duration::from_secs(60),
            max_message_size: 10_000_000,
            max_session_size: 50_000_000,
            max_recipients: 100,
            require_tls: false,
            max_hop_count: 50,
            relay_networks: vec!["127.0.0.0/8".parse().expect("literal network")],
            tls: None,
            users: Vec::new(),
            allow_plaintext_auth: false,
            auth_failure_delay: Duration::from_secs(1),
        }
    }
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            backend: QueueBackend::Local,
            path: PathBuf::from("./spool"),
            redis_url: "redis://127.0.0.1:6379".to_string(),
            retry_intervals: [15 * 60, 30 * 60, 3600, 4 * 3600]
                .into_iter()
                .map(Duration::from_secs)
                .collect(),
            max_lifetime: Duration::from_secs(2 * 86400),
            delay_notification: Duration::from_secs(12 * 3600),
        }
    }
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            smart_host: None,
            max_connections: 500,
            max_connections_per_domain: 100,
            max_messages_per_connection: 20,
            tls: TlsPolicy::Opportunistic,
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: "127.0.0.1:8025".parse().expect("literal address"),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".to_string(),
        }
    }
}

/// Human forms of durations (`"30s"`, `"5m"`, `"2d"`) and sizes (`"10MB"`).
pub mod human {
    /// Parses `"10MB"`, `"512KiB"`, `"1GB"` or a plain number of bytes.
    /// KB/MB/GB are decimal (as SIZE is counted), KiB/MiB/GiB binary.
    pub fn parse_size(text: &str) -> Result<u64, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (digits, unit) = text.split_at(split);
        let number: u64 = digits
            .parse()
            .map_err(|_| format!("`{text}` is not a size such as \"10MB\""))?;
        let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1_000,
            "m" | "mb" => 1_000_000,
            "g" | "gb" => 1_000_000_000,
            "kib" => 1 << 10,
            "mib" => 1 << 20,
            "gib" => 1 << 30,
            other => {
                return Err(format!(
                    "unknown size unit `{other}` in `{text}` (use B, KB, MB, GB, KiB, MiB or GiB)"
                ))
            }
        };
        number
            .checked_mul(factor)
            .ok_or_else(|| format!("size `{text}` is too large"))
    }

    pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
        humantime::parse_duration(text.trim())
            .map_err(|e| format!("`{text}` is not a duration such as \"30s\" or \"5m\": {e}"))
    }

    /// A size given as a string or a plain number of bytes.
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum SizeOrNumber {
        Number(u64),
        Text(String),
    }

    pub mod size {
        use serde::{de::Error, Deserialize, Deserializer};

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
            match super::SizeOrNumber::deserialize(d)? {
                super::SizeOrNumber::Number(n) => Ok(n),
                super::SizeOrNumber::Text(t) => super::parse_size(&t).map_err(D::Error::custom),
            }
        }
    }

    pub mod duration {
        use serde::{de::Error, Deserialize, Deserializer};
        use std::time::Duration;

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
            let text = String::deserialize(d)?;
            super::parse_duration(&text).map_err(D::Error::custom)
        }
    }

    pub mod durations {
        use serde::{de::Error, Deserialize, Deserializer};
        use std::time::Duration;

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
            Vec::<String>::deserialize(d)?
                .iter()
                .map(|t| super::parse_duration(t).map_err(D::Error::custom))
                .collect()
        }
    }
}
