//! The one typed configuration of a node, loaded once and validated at load.
//!
//! A TOML file, overridden by `SMARTHOST__SECTION__KEY` environment variables.
//! Durations are written `"30s"`, `"5m"`; sizes `"10MB"`.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Files laid over this one, in order, before the environment: keys
    /// they set replace the file's (an array such as `[[smtp.users]]` as a
    /// whole). Relative paths start at the including file's folder. For
    /// credentials kept apart from the rest, e.g. in a Kubernetes Secret.
    /// Read from the file given with `--config` only; included files
    /// include nothing further.
    pub include: Vec<PathBuf>,
    pub node: NodeConfig,
    pub smtp: SmtpConfig,
    pub queue: QueueConfig,
    pub delivery: DeliveryConfig,
    pub domains: Vec<DomainConfig>,
    pub bounce: BounceConfig,
    pub admin: AdminConfig,
    pub api: ApiConfig,
    pub suppression: SuppressionConfig,
    pub log: LogConfig,
    pub pickup: PickupConfig,
    pub badmail: BadmailConfig,
    pub webhooks: WebhooksConfig,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Defaults to the host name.
    pub id: String,
    /// The name in the greeting, EHLO and `Received:`; defaults to the host name.
    pub hostname: String,
    /// How long open SMTP sessions may take to finish after SIGTERM.
    #[serde(with = "human::duration")]
    pub shutdown_grace: Duration,
    /// Threads for SMTP sessions and outbound deliveries; 0: one per core.
    pub threads: usize,
    /// A thread busy this share of the time takes no new work while
    /// another is not; 0: new work goes round all threads.
    pub thread_busy_percent: u8,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SmtpConfig {
    pub listen: Vec<SocketAddr>,
    pub max_connections: usize,
    /// Clients outside `relay_networks` only.
    pub max_connections_per_ip: usize,
    /// Clients outside `relay_networks` that have not authenticated hold at
    /// most this share of `max_connections`; the rest is kept for trusted
    /// and authenticated clients.
    pub anonymous_connection_share: f64,
    /// A client silent this long is dropped (`421 4.4.2`).
    #[serde(with = "human::duration")]
    pub connection_timeout: Duration,
    /// A command line must be complete this long after the server began to
    /// wait for it, however slowly its bytes come.
    #[serde(with = "human::duration")]
    pub command_timeout: Duration,
    /// The whole message after `354` must arrive within this.
    #[serde(with = "human::duration")]
    pub data_timeout: Duration,
    /// Bytes per second a message must average after the first
    /// `connection_timeout` of credit; 0: no minimum.
    #[serde(with = "human::size")]
    pub min_data_rate: u64,
    /// The TLS handshake after STARTTLS must finish within this.
    #[serde(with = "human::duration")]
    pub tls_handshake_timeout: Duration,
    /// Clients outside `relay_networks` wait this long for the greeting;
    /// one that talks first is refused (`554 5.5.0`). 0s: no wait.
    #[serde(with = "human::duration")]
    pub greeting_delay: Duration,
    #[serde(with = "human::size")]
    pub max_message_size: u64,
    #[serde(with = "human::size")]
    pub max_session_size: u64,
    pub max_recipients: usize,
    pub require_tls: bool,
    pub max_hop_count: usize,
    /// NOOP, RSET, VRFY and HELP a client may send before each further
    /// one counts as an error (20 errors close the session).
    pub junk_command_limit: u32,
    pub relay_networks: Vec<IpNet>,
    pub tls: Option<TlsConfig>,
    pub users: Vec<SmtpUser>,
    /// Offer AUTH on connections without TLS (off: passwords never travel in clear).
    pub allow_plaintext_auth: bool,
    /// How long a failed AUTH waits before its 535 reply: this after the
    /// first failure of the address in `auth_failure_window`, doubling with
    /// each further one, at most 16 times this.
    #[serde(with = "human::duration")]
    pub auth_failure_delay: Duration,
    /// Password checks (argon2) that run at once on this node; each holds
    /// the memory cost of its hash (19 MiB for `smarthost hash-password`).
    pub max_password_checks: usize,
    /// AUTH commands that may wait for a check slot; past it `454 4.7.0`.
    pub password_check_queue: usize,
    /// The longest wait for a check slot; then `454 4.7.0`.
    #[serde(with = "human::duration")]
    pub password_check_wait: Duration,
    /// Failed logins are forgotten this long after the last one.
    #[serde(with = "human::duration")]
    pub auth_failure_window: Duration,
    /// The failed login from one address (an IPv6 /64) that makes this
    /// many in the window blocks the address for `auth_block_duration`
    /// (`421 4.7.0`, no check runs); 0: never.
    pub auth_address_max_failures: u32,
    /// The failed login for one user name (from any addresses) that makes
    /// this many blocks the name for `auth_block_duration` (`454 4.7.0`),
    /// except from addresses that logged in as it within
    /// `auth_trust_duration`; 0: never.
    pub auth_user_max_failures: u32,
    #[serde(with = "human::duration")]
    pub auth_block_duration: Duration,
    /// How long a login as a user exempts its address from that user
    /// name's block.
    #[serde(with = "human::duration")]
    pub auth_trust_duration: Duration,
    /// The mailbox that takes mail for `postmaster` and
    /// `postmaster@<node.hostname>` from anyone (RFC 5321 4.5.1). Unset:
    /// `bounce.copy_to`; neither set: such mail gets `550 5.1.1`.
    pub postmaster: Option<String>,
    /// Memory for message bodies being received, summed over every
    /// session of the node. Past it, a new DATA waits `body_memory_wait`
    /// and then gets `452 4.3.1`; a message under way that needs more is
    /// read to its end and refused with `452 4.3.1`.
    #[serde(with = "human::size")]
    pub max_body_memory: u64,
    /// How long a new DATA waits for body memory before `452 4.3.1`.
    #[serde(with = "human::duration")]
    pub body_memory_wait: Duration,
    /// A body is written to disk while it arrives once this much of it is
    /// held, so that no session holds more.
    #[serde(with = "human::size")]
    pub body_spill_threshold: u64,
    /// Where those bodies go (nameless files); unset: `<queue.path>/incoming`.
    pub body_spill_dir: Option<PathBuf>,
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
    /// The senders the user may use in `MAIL FROM`: addresses or whole
    /// domains. Empty (the default): any sender.
    #[serde(default)]
    pub senders: Vec<String>,
    /// At most so many messages a minute, as for `[[api.keys]]`.
    #[serde(default)]
    pub messages_per_minute: Option<u32>,
    /// At most so many messages a day.
    #[serde(default)]
    pub messages_per_day: Option<u32>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
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
    /// Local spool: write each journal segment over zeros laid down ahead
    /// of use, so that an append's fsync has no file size to write.
    pub zero_fill_segments: bool,
    /// The Redis server, or with `redis_cluster` one or more
    /// comma-separated seed nodes of a Redis Cluster.
    pub redis_url: String,
    /// `redis_url` names seed nodes of a Redis Cluster.
    pub redis_cluster: bool,
    /// With the Redis backend: every spool write waits until this many
    /// replicas have it (`WAIT`), else the client gets a temporary failure.
    pub redis_min_replicas: u32,
    /// With the Redis backend: refuse to start, and refuse new mail, unless
    /// every Redis primary fsyncs each write before acknowledging it
    /// (`appendfsync always`, or `WAITAOF`). Without it the node accepts
    /// the persistence it finds at start (and warns when that is memory
    /// only), and refuses new mail only while it is weaker than that.
    pub redis_require_fsync: bool,
    /// The longest wait for Redis to answer one operation (reconnecting
    /// included) before the spool reports it unavailable.
    #[serde(with = "human::duration")]
    pub redis_response_timeout: Duration,
    /// With the Redis backend: how long a delivery taken by this node stays
    /// its own before another node may take it; renewed every third of it
    /// while the delivery runs.
    #[serde(with = "human::duration")]
    pub lease: Duration,
    /// With the Redis backend: how often the stored messages are checked
    /// for deliveries that are in no schedule key (a node stopped between
    /// storing a message and scheduling it) and scheduled again.
    #[serde(with = "human::duration")]
    pub rescan_interval: Duration,
    /// With the Redis backend: a node whose heartbeat is older is dead, and
    /// the leader puts its running deliveries back at once. Nodes heartbeat
    /// every sixth of it.
    #[serde(with = "human::duration")]
    pub node_timeout: Duration,
    #[serde(with = "human::durations")]
    pub retry_intervals: Vec<Duration>,
    #[serde(with = "human::duration")]
    pub max_lifetime: Duration,
    #[serde(with = "human::duration")]
    pub delay_notification: Duration,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
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
    /// Extra trust roots (PEM) for verifying servers, besides the system's.
    pub tls_ca_file: Option<PathBuf>,
    /// DNS servers for MX lookups (`ip:port`); empty: the system's resolv.conf.
    pub dns_servers: Vec<SocketAddr>,
    /// The port of MX hosts (25; another port only for tests and odd networks).
    pub mx_port: u16,
    #[serde(with = "human::duration")]
    pub connect_timeout: Duration,
    /// Waiting for the 220 greeting (RFC 5321 4.5.3.2: 5 minutes).
    #[serde(with = "human::duration")]
    pub greeting_timeout: Duration,
    /// Waiting for the reply to EHLO, MAIL, RCPT, DATA, STARTTLS, AUTH (5 minutes).
    #[serde(with = "human::duration")]
    pub command_timeout: Duration,
    /// Sending the message and waiting for the reply to the final dot (10 minutes).
    #[serde(with = "human::duration")]
    pub data_timeout: Duration,
    /// The delivery log: one JSON line per attempt and recipient.
    pub log_file: PathBuf,
    /// Redis backend: how long a connection's slot under a domain's cap
    /// outlives a node that stopped renewing it (renewed every third).
    #[serde(with = "human::duration")]
    pub connection_lease: Duration,
    /// Memory for copies of the bodies this node just stored, so that
    /// their first delivery need not read them back from the spool; 0
    /// keeps none.
    #[serde(with = "human::size")]
    pub body_cache: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
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
    /// Where failures of messages from `<>` (double bounces) are reported;
    /// unset: the postmaster ([`postmaster`]).
    pub double_bounce_to: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// A second address for the open routes alone (`/metrics`, `/healthz`,
    /// `/readyz`), for Prometheus and the kubelet, so that `listen` can stay
    /// on loopback; unset: only `listen` serves them.
    pub metrics_listen: Option<SocketAddr>,
    /// Who may use `/api/*`. None: the API is open (keep `listen` on loopback).
    pub operators: Vec<AdminOperator>,
    /// Token checks (argon2, one per operator) that run at once; more wait
    /// (up to 16, at most 5 s) or get `503`.
    pub max_token_checks: usize,
    /// The wrong token from one address that makes this many (forgotten
    /// `token_block_duration` after the last one) blocks the address for
    /// `token_block_duration`: `429`, no check runs; 0: never.
    pub token_max_failures: u32,
    #[serde(with = "human::duration")]
    pub token_block_duration: Duration,
}

/// The HTTP send API (`POST /api/v1/send` on the admin server).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// The applications that may send; none: every send is refused (`401`).
    pub keys: Vec<ApiKey>,
}

/// The suppression list.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SuppressionConfig {
    /// Recipients a server answers with `5.1.x` (no such mailbox or
    /// domain) are added to the list of the message's account (the
    /// global one for mail from no account).
    pub learn_from_bounces: bool,
}

impl Default for SuppressionConfig {
    fn default() -> Self {
        SuppressionConfig {
            learn_from_bounces: true,
        }
    }
}

/// An application's key.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    pub name: String,
    /// The argon2 PHC string of the key's bearer token, from
    /// `smarthost hash-password`.
    pub token_hash: String,
    /// The senders it may use: addresses (`noreply@app.example`) or whole
    /// domains (`app.example`). At least one.
    pub senders: Vec<String>,
    /// At most so many messages a minute (a burst of as many, refilled
    /// evenly), for the whole cluster; absent or 0: no limit.
    #[serde(default)]
    pub messages_per_minute: Option<u32>,
    /// At most so many messages a day, the same way.
    #[serde(default)]
    pub messages_per_day: Option<u32>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminOperator {
    pub name: String,
    /// The argon2 PHC string of the operator's bearer token, from
    /// `smarthost hash-password`.
    pub token_hash: String,
    pub role: OperatorRole,
}

/// What an operator may do through the admin API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OperatorRole {
    /// Everything an operator may, and what drops mail without a trace
    /// (a quarantined entry, which no report can name).
    Admin,
    /// Read, and steer the mail: retry, delete (with a report unless
    /// silent), suspend and resume, take quarantined messages back.
    Operator,
    /// Read only.
    Viewer,
}

/// The pickup directory: applications drop `.eml` files there instead of
/// speaking SMTP, as with the IIS SMTP Service.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PickupConfig {
    /// The directory watched; unset: no pickup.
    pub dir: Option<PathBuf>,
    /// How often it is looked at.
    #[serde(with = "human::duration")]
    pub poll_interval: Duration,
}

/// Delivery webhooks: events about each recipient posted to applications.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhooksConfig {
    pub endpoints: Vec<WebhookEndpoint>,
    /// An event not posted by then is dropped (and counted).
    #[serde(with = "human::duration")]
    pub max_age: Duration,
    /// The longest wait between two posts of an event that failed.
    #[serde(with = "human::duration")]
    pub max_retry_interval: Duration,
    /// How long a post may take.
    #[serde(with = "human::duration")]
    pub timeout: Duration,
    /// At most so many events in one post.
    pub batch_size: usize,
    /// Events the outbox holds at most (the cluster's, on Redis): past it
    /// new events are dropped and counted, so that an endpoint gone for
    /// days cannot fill the disk or Redis.
    pub max_waiting: u64,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        WebhooksConfig {
            endpoints: Vec::new(),
            max_age: Duration::from_secs(3 * 24 * 3600),
            max_retry_interval: Duration::from_secs(600),
            timeout: Duration::from_secs(10),
            batch_size: 100,
            max_waiting: 1_000_000,
        }
    }
}

/// One endpoint that takes events.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookEndpoint {
    /// Names the endpoint in the outbox, the logs and the metrics.
    pub name: String,
    /// `http://` or `https://`.
    pub url: String,
    /// The key of the posts' HMAC-SHA256 signature.
    pub secret: String,
    /// Events about mail of these application keys or SMTP users only;
    /// empty: about all mail.
    #[serde(default)]
    pub accounts: Vec<String>,
    /// These events only; empty: all of them.
    #[serde(default)]
    pub events: Vec<crate::webhooks::EventKind>,
}

/// Where what can neither be delivered nor bounced is kept.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BadmailConfig {
    /// Unset: `badmail` in `queue.path`.
    pub dir: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
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
    /// Where the W3C SMTP session log goes, a file per UTC day; unset: it
    /// is not kept.
    pub session_log_dir: Option<PathBuf>,
}

/// Deserializes a unit enum from one of its names (in any case), with an
/// error that lists the names allowed.
macro_rules! named_values {
    ($ty:ident { $($name:literal => $variant:ident),+ $(,)? }) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                match text.to_ascii_lowercase().as_str() {
                    $($name => Ok($ty::$variant),)+
                    _ => Err(serde::de::Error::custom(format!(
                        "unknown value {text:?}; expected one of {}",
                        [$(concat!("\"", $name, "\"")),+].join(", ")
                    ))),
                }
            }
        }
    };
}

named_values!(QueueBackend { "local" => Local, "redis" => Redis });
named_values!(TlsPolicy { "opportunistic" => Opportunistic, "required" => Required, "disabled" => Disabled });
named_values!(DomainKind { "remote" => Remote, "local" => Local });
named_values!(LogFormat { "text" => Text, "json" => Json });
named_values!(OperatorRole { "admin" => Admin, "operator" => Operator, "viewer" => Viewer });

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
            shutdown_grace: Duration::from_secs(30),
            threads: 0,
            thread_busy_percent: 80,
        }
    }
}

impl Default for SmtpConfig {
    fn default() -> Self {
        SmtpConfig {
            listen: vec!["127.0.0.1:2525".parse().expect("literal address")],
            max_connections: 1000,
            max_connections_per_ip: 20,
            anonymous_connection_share: 0.8,
            connection_timeout: Duration::from_secs(60),
            command_timeout: Duration::from_secs(60),
            data_timeout: Duration::from_secs(600),
            min_data_rate: 500,
            tls_handshake_timeout: Duration::from_secs(10),
            greeting_delay: Duration::from_millis(500),
            max_message_size: 10_000_000,
            max_session_size: 50_000_000,
            max_recipients: 100,
            require_tls: false,
            max_hop_count: 50,
            junk_command_limit: 100,
            relay_networks: vec!["127.0.0.0/8".parse().expect("literal network")],
            tls: None,
            users: Vec::new(),
            allow_plaintext_auth: false,
            auth_failure_delay: Duration::from_secs(1),
            max_password_checks: 4,
            password_check_queue: 32,
            password_check_wait: Duration::from_secs(5),
            auth_failure_window: Duration::from_secs(15 * 60),
            auth_address_max_failures: 10,
            auth_user_max_failures: 20,
            auth_block_duration: Duration::from_secs(15 * 60),
            auth_trust_duration: Duration::from_secs(7 * 86400),
            postmaster: None,
            max_body_memory: 256_000_000,
            body_memory_wait: Duration::from_secs(5),
            body_spill_threshold: 256 * 1024,
            body_spill_dir: None,
        }
    }
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            backend: QueueBackend::Local,
            path: PathBuf::from("./spool"),
            zero_fill_segments: true,
            redis_url: "redis://127.0.0.1:6379".to_string(),
            redis_cluster: false,
            redis_response_timeout: Duration::from_secs(5),
            redis_min_replicas: 0,
            redis_require_fsync: false,
            lease: Duration::from_secs(15 * 60),
            rescan_interval: Duration::from_secs(60),
            node_timeout: Duration::from_secs(30),
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
            tls_ca_file: None,
            dns_servers: Vec::new(),
            mx_port: 25,
            connect_timeout: Duration::from_secs(30),
            greeting_timeout: Duration::from_secs(300),
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(600),
            log_file: PathBuf::from("./delivery.log"),
            connection_lease: Duration::from_secs(30),
            body_cache: 32 * 1024 * 1024,
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: "127.0.0.1:8025".parse().expect("literal address"),
            metrics_listen: None,
            operators: Vec::new(),
            max_token_checks: 2,
            token_max_failures: 10,
            token_block_duration: Duration::from_secs(15 * 60),
        }
    }
}

impl Default for PickupConfig {
    fn default() -> Self {
        PickupConfig {
            dir: None,
            poll_interval: Duration::from_secs(1),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".to_string(),
            session_log_dir: None,
        }
    }
}

/// Why a configuration could not be loaded or is not usable.
///
/// Every message names the key it is about (`smtp.max_message_size: …`), so
/// that an operator can find the line to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("{origin}: {message}")]
    Syntax { origin: String, message: String },
    /// A key holds a value of the wrong type or form, or is not known.
    #[error("{key}: {message}")]
    Value { key: String, message: String },
    /// The values parse but do not make a working configuration.
    #[error("{}", .0.join("; "))]
    Invalid(Vec<String>),
}

fn read_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn toml_source(text: &str) -> config::File<config::FileSourceString, config::FileFormat> {
    config::File::from_str(text, config::FileFormat::Toml)
}

/// The `include` key of one file's text (none when it has no such key).
fn includes(text: &str, origin: &str) -> Result<Vec<PathBuf>, ConfigError> {
    let file = config::Config::builder()
        .add_source(toml_source(text))
        .build()
        .map_err(|e| ConfigError::from_source(e, origin))?;
    match file.get::<Vec<PathBuf>>("include") {
        Ok(paths) => Ok(paths),
        Err(config::ConfigError::NotFound(_)) => Ok(Vec::new()),
        Err(e) => Err(ConfigError::from_source(e, origin)),
    }
}

impl ConfigError {
    /// One line per problem, each starting with the key it is about.
    pub fn messages(&self) -> Vec<String> {
        match self {
            ConfigError::Invalid(errors) => errors.clone(),
            other => vec![other.to_string()],
        }
    }

    fn from_source(err: config::ConfigError, origin: &str) -> Self {
        match err {
            config::ConfigError::FileParse { cause, .. } => ConfigError::Syntax {
                origin: origin.to_string(),
                message: cause.to_string(),
            },
            other => {
                let (key, message) = key_and_message(other);
                ConfigError::Value {
                    key: key.clone(),
                    message,
                }
                .with_unknown_field_named(key)
            }
        }
    }

    /// Turns serde's "unknown field `x`, expected one of …" into an error on
    /// the unknown key itself, naming its section and the keys it allows.
    fn with_unknown_field_named(self, section: String) -> Self {
        let ConfigError::Value { message, .. } = &self else {
            return self;
        };
        let Some(rest) = message.strip_prefix("unknown field `") else {
            return self;
        };
        let Some((name, allowed)) = rest.split_once('`') else {
            return self;
        };
        let allowed: Vec<&str> = allowed.split('`').skip(1).step_by(2).collect();
        let allowed = if allowed.is_empty() {
            "none".to_string()
        } else {
            allowed.join(", ")
        };
        if section.is_empty() {
            ConfigError::Value {
                key: name.to_string(),
                message: format!("unknown section; the sections are {allowed}"),
            }
        } else {
            let table = match section.rsplit_once('[') {
                Some((array, _)) => format!("[[{array}]]"),
                None => format!("[{section}]"),
            };
            ConfigError::Value {
                key: format!("{section}.{name}"),
                message: format!("unknown key in {table}; the keys there are {allowed}"),
            }
        }
    }
}

/// The most bad keys one load names.
const MAX_BAD_KEYS: usize = 50;

/// The smallest `smtp.body_spill_threshold`: four reads from the socket,
/// so that what goes to disk at a time is not tiny.
pub const MIN_SPILL_THRESHOLD: u64 = 64 * 1024;

/// `merged` without `key` (`section.name` or a top-level `name`); `None`
/// for a key it cannot take out (inside an array of tables).
fn without_key(merged: &config::Config, key: &str) -> Option<config::Config> {
    use config::Source;
    let mut map = merged.collect().ok()?;
    match key.split_once('.') {
        None => {
            map.remove(key)?;
        }
        Some((section, name)) if !section.contains('[') && !name.contains(['.', '[']) => {
            let table = map.remove(section)?;
            let mut table = table.into_table().ok()?;
            table.remove(name)?;
            map.insert(section.to_string(), table.into());
        }
        Some(_) => return None,
    }
    map.into_iter()
        .try_fold(config::Config::builder(), |builder, (name, value)| {
            builder.set_override(name, value)
        })
        .ok()?
        .build()
        .ok()
}

/// The key path and the bare message of an error from the `config` crate.
fn key_and_message(err: config::ConfigError) -> (String, String) {
    match err {
        config::ConfigError::At { error, key, .. } => {
            let (inner_key, message) = key_and_message(*error);
            (tidy_key(&key.unwrap_or(inner_key)), message)
        }
        config::ConfigError::Type {
            unexpected,
            expected,
            key,
            ..
        } => (
            tidy_key(&key.unwrap_or_default()),
            format!("expected {expected}, found {unexpected}"),
        ),
        config::ConfigError::NotFound(key) => (tidy_key(&key), "missing required key".to_string()),
        other => (String::new(), other.to_string()),
    }
}

/// `domains[0]name` (how the `config` crate joins an index and a field) to
/// `domains[0].name`.
fn tidy_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 2);
    let mut after_index = false;
    for c in key.chars() {
        if after_index && c != '.' && c != '[' {
            out.push('.');
        }
        after_index = c == ']';
        out.push(c);
    }
    out
}

/// Keys whose environment value is a comma-separated list.
const ENV_LIST_KEYS: &[&str] = &[
    "smtp.listen",
    "smtp.relay_networks",
    "queue.retry_intervals",
    "delivery.dns_servers",
];

/// The `SMARTHOST__SECTION__KEY` environment source.
fn environment() -> config::Environment {
    ENV_LIST_KEYS.iter().fold(
        config::Environment::with_prefix("SMARTHOST")
            .prefix_separator("__")
            .separator("__")
            .list_separator(",")
            .try_parsing(true),
        |env, key| env.with_list_parse_key(key),
    )
}

impl Config {
    /// `smtp.body_spill_dir`, or `incoming` in the queue's directory.
    pub fn spill_dir(&self) -> PathBuf {
        self.smtp
            .body_spill_dir
            .clone()
            .unwrap_or_else(|| self.queue.path.join("incoming"))
    }

    /// `badmail.dir`, or `badmail` in the queue's directory.
    pub fn badmail_dir(&self) -> PathBuf {
        self.badmail
            .dir
            .clone()
            .unwrap_or_else(|| self.queue.path.join("badmail"))
    }

    /// Loads the configuration: the defaults, then the TOML file when one is
    /// given, then `SMARTHOST__SECTION__KEY` environment variables
    /// (`SMARTHOST__SMTP__MAX_RECIPIENTS=5`; lists are comma-separated).
    ///
    /// This parses; [`Config::validate`] checks that the values work
    /// together. [`Config::load_validated`] does both.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_from(path, environment())
    }

    /// [`Config::load`] followed by [`Config::validate`].
    pub fn load_validated(path: Option<&Path>) -> Result<Config, ConfigError> {
        let config = Self::load(path)?;
        config.validate().map_err(ConfigError::Invalid)?;
        Ok(config)
    }

    fn load_from(path: Option<&Path>, env: config::Environment) -> Result<Config, ConfigError> {
        let mut builder = config::Config::builder();
        let origin = match path {
            Some(path) => {
                let text = read_file(path)?;
                let includes = includes(&text, &path.display().to_string())?;
                builder = builder.add_source(toml_source(&text));
                let folder = path.parent().unwrap_or(Path::new(""));
                for include in &includes {
                    let include = folder.join(include);
                    let text = read_file(&include)?;
                    let origin = include.display().to_string();
                    if !self::includes(&text, &origin)?.is_empty() {
                        return Err(ConfigError::Value {
                            key: "include".into(),
                            message: format!("{origin} is included and may not include others"),
                        });
                    }
                    builder = builder.add_source(toml_source(&text));
                }
                match includes.len() {
                    0 => path.display().to_string(),
                    _ => format!("{} (with its includes)", path.display()),
                }
            }
            None => "the environment".to_string(),
        };
        let mut merged = builder
            .add_source(env)
            .build()
            .map_err(|e| ConfigError::from_source(e, &origin))?;
        // Every bad key (unknown, or a value of the wrong type) is named,
        // not only the first: each is taken out and the rest deserialized
        // again, in whatever order serde meets them.
        let mut bad = Vec::new();
        loop {
            let err = match merged.clone().try_deserialize() {
                Ok(config) if bad.is_empty() => return Ok(config),
                Ok(_) => return Err(ConfigError::Invalid(bad)),
                Err(e) => ConfigError::from_source(e, &origin),
            };
            let without = match &err {
                ConfigError::Value { key, .. } if bad.len() < MAX_BAD_KEYS => {
                    without_key(&merged, key)
                }
                _ => None,
            };
            bad.push(err.to_string());
            match without {
                Some(rest) => merged = rest,
                None if bad.len() == 1 => return Err(err),
                None => return Err(ConfigError::Invalid(bad)),
            }
        }
    }

    /// Checks that the values make a working configuration. Returns every
    /// problem found, not only the first, each naming its key.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut errors = Errors::default();
        self.validate_node(&mut errors);
        self.validate_smtp(&mut errors);
        self.validate_queue(&mut errors);
        self.validate_delivery(&mut errors);
        self.validate_domains(&mut errors);
        for (key, value) in [
            ("bounce.copy_to", &self.bounce.copy_to),
            ("bounce.double_bounce_to", &self.bounce.double_bounce_to),
        ] {
            if let Some(Err(e)) = value.as_deref().map(check_address) {
                errors.add(key, e);
            }
        }
        self.validate_admin(&mut errors);
        self.validate_api(&mut errors);
        self.validate_pickup(&mut errors);
        self.validate_webhooks(&mut errors);
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            errors.add(
                "log.level",
                format!(
                    "`{}` is not a filter such as \"info\" or \"smarthost=debug\": {e}",
                    self.log.level
                ),
            );
        } else if let Some(word) = bare_target(&self.log.level) {
            errors.add(
                "log.level",
                format!(
                    "`{word}` is not a level ({}); as a bare word it would name a log \
                     target and silence every other line (for a target write \
                     \"{word}=debug\")",
                    LOG_LEVELS.join(", ")
                ),
            );
        }
        errors.into_result()
    }

    fn validate_node(&self, errors: &mut Errors) {
        if self.node.id.trim().is_empty() {
            errors.add("node.id", "must not be empty");
        }
        let hostname = &self.node.hostname;
        if hostname.trim().is_empty() {
            errors.add("node.hostname", "must not be empty");
        } else if hostname
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            errors.add(
                "node.hostname",
                format!("{hostname:?} contains spaces or control characters"),
            );
        }
        if self.node.thread_busy_percent > 100 {
            errors.add("node.thread_busy_percent", "must be 0 to 100");
        }
    }

    fn validate_smtp(&self, errors: &mut Errors) {
        let smtp = &self.smtp;
        if smtp.listen.is_empty() {
            errors.add(
                "smtp.listen",
                "needs at least one address such as \"0.0.0.0:2525\"",
            );
        }
        for (i, addr) in smtp.listen.iter().enumerate() {
            if smtp.listen[..i].contains(addr) {
                errors.add("smtp.listen", format!("{addr} is listed twice"));
            }
        }
        errors.positive("smtp.max_connections", smtp.max_connections as u64);
        errors.positive(
            "smtp.max_connections_per_ip",
            smtp.max_connections_per_ip as u64,
        );
        errors.positive("smtp.max_recipients", smtp.max_recipients as u64);
        errors.positive("smtp.max_hop_count", smtp.max_hop_count as u64);
        errors.positive("smtp.max_message_size", smtp.max_message_size);
        errors.positive("smtp.max_session_size", smtp.max_session_size);
        errors.nonzero([
            ("smtp.connection_timeout", smtp.connection_timeout),
            ("smtp.command_timeout", smtp.command_timeout),
            ("smtp.data_timeout", smtp.data_timeout),
            ("smtp.tls_handshake_timeout", smtp.tls_handshake_timeout),
        ]);
        if !(smtp.anonymous_connection_share > 0.0 && smtp.anonymous_connection_share <= 1.0) {
            errors.add(
                "smtp.anonymous_connection_share",
                format!(
                    "{} is not a share between 0 (excluded) and 1, such as 0.8",
                    smtp.anonymous_connection_share
                ),
            );
        }
        if smtp.greeting_delay >= smtp.connection_timeout {
            errors.add(
                "smtp.greeting_delay",
                format!(
                    "{:?} is not shorter than smtp.connection_timeout ({:?})",
                    smtp.greeting_delay, smtp.connection_timeout
                ),
            );
        }
        if smtp.body_spill_threshold < MIN_SPILL_THRESHOLD {
            errors.add(
                "smtp.body_spill_threshold",
                format!(
                    "{} bytes is less than {MIN_SPILL_THRESHOLD}: bodies would go to disk in \
                     pieces smaller than a read",
                    smtp.body_spill_threshold
                ),
            );
        }
        if smtp.max_body_memory < smtp.max_message_size {
            errors.add(
                "smtp.max_body_memory",
                format!(
                    "{} bytes is less than smtp.max_message_size ({} bytes): \
                     one message of the largest size must fit",
                    smtp.max_body_memory, smtp.max_message_size
                ),
            );
        }
        if smtp.max_message_size > smtp.max_session_size {
            errors.add(
                "smtp.max_message_size",
                format!(
                    "{} bytes is larger than smtp.max_session_size ({} bytes)",
                    smtp.max_message_size, smtp.max_session_size
                ),
            );
        }
        match &smtp.tls {
            Some(tls) => {
                if let Err(e) = check_certificates(&tls.cert) {
                    errors.add("smtp.tls.cert", e);
                }
                if let Err(e) = check_private_key(&tls.key) {
                    errors.add("smtp.tls.key", e);
                }
            }
            None if smtp.require_tls => {
                errors.add("smtp.require_tls", "needs [smtp.tls] with cert and key");
            }
            None if !smtp.users.is_empty() && !smtp.allow_plaintext_auth => errors.add(
                "smtp.users",
                "AUTH is only offered after STARTTLS: add [smtp.tls], \
                 or set smtp.allow_plaintext_auth = true",
            ),
            None => {}
        }
        errors.positive("smtp.max_password_checks", smtp.max_password_checks as u64);
        errors.nonzero([
            ("smtp.auth_failure_window", smtp.auth_failure_window),
            ("smtp.auth_block_duration", smtp.auth_block_duration),
            ("smtp.auth_trust_duration", smtp.auth_trust_duration),
        ]);
        if let Some(postmaster) = &smtp.postmaster {
            match mailbox(postmaster) {
                Err(e) => errors.add("smtp.postmaster", e),
                Ok(m) if m.needs_smtputf8() => errors.add(
                    "smtp.postmaster",
                    format!("{postmaster:?} must be an ASCII address"),
                ),
                Ok(m)
                    if m.local_part.eq_ignore_ascii_case("postmaster")
                        && m.domain.eq_ignore_ascii_case(&self.node.hostname) =>
                {
                    errors.add(
                        "smtp.postmaster",
                        format!(
                            "{postmaster:?} is this node's own postmaster address, \
                             which would send such mail round in a loop"
                        ),
                    )
                }
                Ok(_) => {}
            }
        }
        for (i, user) in smtp.users.iter().enumerate() {
            let key = format!("smtp.users[{i}]");
            if user.name.is_empty() {
                errors.add(format!("{key}.name"), "must not be empty");
            } else if smtp.users[..i].iter().any(|u| u.name == user.name) {
                errors.add(
                    format!("{key}.name"),
                    format!("user {:?} is listed twice", user.name),
                );
            }
            if let Err(e) = crate::auth::check_password_hash(&user.password_hash) {
                errors.add(format!("{key}.password_hash"), e);
            }
            for (j, sender) in user.senders.iter().enumerate() {
                if let Err(e) = smarthost_proto::address::SenderRule::parse(sender) {
                    errors.add(format!("{key}.senders[{j}]"), e);
                }
            }
        }
    }

    fn validate_admin(&self, errors: &mut Errors) {
        let admin = &self.admin;
        if self.smtp.listen.contains(&admin.listen) {
            errors.add(
                "admin.listen",
                format!("{} is also in smtp.listen", admin.listen),
            );
        }
        if let Some(metrics) = admin.metrics_listen {
            if metrics == admin.listen {
                errors.add("admin.metrics_listen", format!("{metrics} is admin.listen"));
            } else if self.smtp.listen.contains(&metrics) {
                errors.add(
                    "admin.metrics_listen",
                    format!("{metrics} is also in smtp.listen"),
                );
            }
        }
        errors.positive("admin.max_token_checks", admin.max_token_checks as u64);
        errors.nonzero([("admin.token_block_duration", admin.token_block_duration)]);
        for (i, operator) in admin.operators.iter().enumerate() {
            let key = format!("admin.operators[{i}]");
            if operator.name.trim().is_empty() {
                errors.add(format!("{key}.name"), "must not be empty");
            } else if admin.operators[..i].iter().any(|o| o.name == operator.name) {
                errors.add(
                    format!("{key}.name"),
                    format!("operator {:?} is listed twice", operator.name),
                );
            }
            if let Err(e) = crate::auth::check_password_hash(&operator.token_hash) {
                errors.add(format!("{key}.token_hash"), e);
            }
        }
    }

    fn validate_pickup(&self, errors: &mut Errors) {
        errors.nonzero([("pickup.poll_interval", self.pickup.poll_interval)]);
        if let Some(dir) = &self.pickup.dir {
            if dir.as_os_str().is_empty() {
                errors.add(
                    "pickup.dir",
                    "must not be empty (leave it out for no pickup)",
                );
            } else if *dir == self.badmail_dir() {
                errors.add(
                    "pickup.dir",
                    format!("{} is also the badmail directory", dir.display()),
                );
            }
        }
    }

    fn validate_webhooks(&self, errors: &mut Errors) {
        let webhooks = &self.webhooks;
        errors.nonzero([
            ("webhooks.max_age", webhooks.max_age),
            ("webhooks.max_retry_interval", webhooks.max_retry_interval),
            ("webhooks.timeout", webhooks.timeout),
        ]);
        errors.positive("webhooks.batch_size", webhooks.batch_size as u64);
        errors.positive("webhooks.max_waiting", webhooks.max_waiting);
        let endpoints = &webhooks.endpoints;
        for (i, endpoint) in endpoints.iter().enumerate() {
            let at = format!("webhooks.endpoints[{i}]");
            let name = &endpoint.name;
            if name.is_empty()
                || name
                    .chars()
                    .any(|c| c == '/' || c.is_whitespace() || c.is_control())
            {
                errors.add(format!("{at}.name"), "must be a word without spaces or `/`");
            } else if endpoints[..i].iter().any(|e| e.name == *name) {
                errors.add(format!("{at}.name"), format!("{name:?} is listed twice"));
            }
            match awc::http::Uri::try_from(endpoint.url.as_str()) {
                Ok(uri)
                    if matches!(uri.scheme_str(), Some("http" | "https"))
                        && uri.host().is_some() => {}
                _ => errors.add(
                    format!("{at}.url"),
                    format!("{:?} is not an http:// or https:// URL", endpoint.url),
                ),
            }
            if endpoint.secret.len() < 16 {
                errors.add(
                    format!("{at}.secret"),
                    "must be at least 16 characters (e.g. `openssl rand -hex 32`)",
                );
            }
        }
    }

    fn validate_api(&self, errors: &mut Errors) {
        let keys = &self.api.keys;
        for (i, key) in keys.iter().enumerate() {
            let at = format!("api.keys[{i}]");
            if key.name.trim().is_empty() {
                errors.add(format!("{at}.name"), "must not be empty");
            } else if keys[..i].iter().any(|k| k.name == key.name) {
                errors.add(
                    format!("{at}.name"),
                    format!("key {:?} is listed twice", key.name),
                );
            }
            if let Err(e) = crate::auth::check_password_hash(&key.token_hash) {
                errors.add(format!("{at}.token_hash"), e);
            }
            if key.senders.is_empty() {
                errors.add(
                    format!("{at}.senders"),
                    "must name at least one address or domain",
                );
            }
            for (j, sender) in key.senders.iter().enumerate() {
                if let Err(e) = smarthost_proto::address::SenderRule::parse(sender) {
                    errors.add(format!("{at}.senders[{j}]"), e);
                }
            }
        }
    }

    fn validate_queue(&self, errors: &mut Errors) {
        let queue = &self.queue;
        if queue.lease < Duration::from_secs(1) {
            errors.add("queue.lease", "must be at least 1s");
        }
        errors.nonzero([("queue.rescan_interval", queue.rescan_interval)]);
        if queue.node_timeout < Duration::from_secs(1) {
            errors.add("queue.node_timeout", "must be at least 1s");
        }
        if queue.path.as_os_str().is_empty() {
            errors.add("queue.path", "must not be empty");
        }
        if queue.retry_intervals.is_empty() {
            errors.add(
                "queue.retry_intervals",
                "needs at least one interval such as \"15m\"",
            );
        }
        errors.nonzero(
            queue
                .retry_intervals
                .iter()
                .enumerate()
                .map(|(i, interval)| (format!("queue.retry_intervals[{i}]"), *interval)),
        );
        errors.nonzero([
            ("queue.max_lifetime", queue.max_lifetime),
            ("queue.redis_response_timeout", queue.redis_response_timeout),
        ]);
        if queue.redis_require_fsync && queue.backend != QueueBackend::Redis {
            errors.add(
                "queue.redis_require_fsync",
                "applies to queue.backend = \"redis\" only (the local spool always fsyncs)",
            );
        }
        if queue.backend == QueueBackend::Redis {
            if let Err(e) =
                smarthost_coordinator::redis::seeds(&queue.redis_url, queue.redis_cluster)
            {
                errors.add("queue.redis_url", e);
            }
        }
    }

    fn validate_delivery(&self, errors: &mut Errors) {
        let delivery = &self.delivery;
        if let Some(smart_host) = &delivery.smart_host {
            if let Err(e) = parse_smart_host(smart_host) {
                errors.add("delivery.smart_host", e);
            }
        }
        errors.positive("delivery.max_connections", delivery.max_connections as u64);
        errors.positive(
            "delivery.max_connections_per_domain",
            delivery.max_connections_per_domain as u64,
        );
        errors.positive(
            "delivery.max_messages_per_connection",
            delivery.max_messages_per_connection as u64,
        );
        if let Some(ca) = &delivery.tls_ca_file {
            if let Err(e) = std::fs::metadata(ca) {
                errors.add(
                    "delivery.tls_ca_file",
                    format!("cannot read {}: {e}", ca.display()),
                );
            }
        }
        errors.positive("delivery.mx_port", delivery.mx_port as u64);
        errors.nonzero([
            ("delivery.connect_timeout", delivery.connect_timeout),
            ("delivery.greeting_timeout", delivery.greeting_timeout),
            ("delivery.command_timeout", delivery.command_timeout),
            ("delivery.data_timeout", delivery.data_timeout),
        ]);
        if delivery.connection_lease < Duration::from_secs(1) {
            errors.add("delivery.connection_lease", "must be at least 1s");
        }
    }

    fn validate_domains(&self, errors: &mut Errors) {
        let mut seen: Vec<String> = Vec::new();
        for (i, domain) in self.domains.iter().enumerate() {
            let key = format!("domains[{i}]");
            match check_domain_name(&domain.name) {
                Ok(ascii) if seen.contains(&ascii) => errors.add(
                    format!("{key}.name"),
                    format!("domain {:?} is listed twice", domain.name),
                ),
                Ok(ascii) => seen.push(ascii),
                Err(e) => errors.add(format!("{key}.name"), e),
            }
            match (domain.kind, &domain.drop_dir) {
                (DomainKind::Local, None) => errors.add(
                    format!("{key}.drop_dir"),
                    format!("domain {:?} has kind = \"local\" and needs a drop_dir", domain.name),
                ),
                (DomainKind::Local, Some(dir)) if dir.as_os_str().is_empty() => {
                    errors.add(format!("{key}.drop_dir"), "must not be empty")
                }
                (DomainKind::Remote, Some(_)) => errors.add(
                    format!("{key}.drop_dir"),
                    format!(
                        "domain {:?} has kind = \"remote\"; drop_dir only applies to kind = \"local\"",
                        domain.name
                    ),
                ),
                _ => {}
            }
            if let Some(smart_host) = &domain.smart_host {
                if let Err(e) = parse_smart_host(smart_host) {
                    errors.add(format!("{key}.smart_host"), e);
                }
            }
            if domain.max_connections == Some(0) {
                errors.add(format!("{key}.max_connections"), "must be greater than 0");
            }
            if let Some(rate) = &domain.rate {
                if let Err(e) = parse_rate(rate) {
                    errors.add(format!("{key}.rate"), e);
                }
            }
            if let Some(auth) = &domain.auth {
                if auth.user.is_empty() {
                    errors.add(format!("{key}.auth.user"), "must not be empty");
                }
                if domain.tls.unwrap_or(self.delivery.tls) == TlsPolicy::Disabled {
                    errors.add(
                        format!("{key}.auth"),
                        "needs TLS: with tls = \"disabled\" the password would travel in clear",
                    );
                }
            }
        }
    }
}

/// Validation problems, each as `key: message`.
#[derive(Default)]
struct Errors(Vec<String>);

impl Errors {
    fn add(&mut self, key: impl std::fmt::Display, message: impl std::fmt::Display) {
        self.0.push(format!("{key}: {message}"));
    }

    fn positive(&mut self, key: &str, value: u64) {
        if value == 0 {
            self.add(key, "must be greater than 0");
        }
    }

    /// Each `(key, duration)` that is zero is an error of its key.
    fn nonzero<K: std::fmt::Display>(
        &mut self,
        durations: impl IntoIterator<Item = (K, Duration)>,
    ) {
        for (key, duration) in durations {
            if duration.is_zero() {
                self.add(key, "must be longer than 0s");
            }
        }
    }

    fn into_result(self) -> Result<(), Vec<String>> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self.0)
        }
    }
}

/// Parses a rate such as `"50/s"`, `"300/m"` or `"1000/h"` into a count and
/// the period it is allowed in.
pub fn parse_rate(text: &str) -> Result<(u32, Duration), String> {
    let invalid = || format!("`{text}` is not a rate such as \"50/s\" (N/s, N/m or N/h)");
    let (count, unit) = text.trim().split_once('/').ok_or_else(invalid)?;
    let count: u32 = count.trim().parse().map_err(|_| invalid())?;
    let period = match unit.trim() {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        _ => return Err(invalid()),
    };
    if count == 0 {
        return Err(format!("`{text}`: the count must be greater than 0"));
    }
    Ok((count, period))
}

/// Where an upstream smart host is reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SmartHost {
    pub host: SmartHostName,
    /// 25 when not given.
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SmartHostName {
    /// A host name, looked up in DNS (IDNA A-labels, lower case).
    Name(String),
    /// An address literal: `[192.0.2.1]`, `[2001:db8::1]`, or a bare IPv4
    /// address. No DNS lookup.
    Ip(IpAddr),
}

/// Parses `host`, `host:port`, `[ip]` or `[ip]:port`.
pub fn parse_smart_host(text: &str) -> Result<SmartHost, String> {
    let text = text.trim();
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (literal, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("`{text}`: missing `]` after the address literal"))?;
        let literal = literal.strip_prefix("IPv6:").unwrap_or(literal);
        let ip: IpAddr = literal
            .parse()
            .map_err(|_| format!("`{text}`: `{literal}` is not an IP address"))?;
        let port =
            match after {
                "" => None,
                _ => Some(after.strip_prefix(':').ok_or_else(|| {
                    format!("`{text}`: expected `:port` after the address literal")
                })?),
            };
        (SmartHostName::Ip(ip), port)
    } else {
        if text.matches(':').count() > 1 {
            return Err(format!(
                "`{text}`: put an IPv6 address in brackets, as in \"[2001:db8::1]:25\""
            ));
        }
        let (host, port) = match text.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (text, None),
        };
        let host = match host.parse::<std::net::Ipv4Addr>() {
            Ok(ip) => SmartHostName::Ip(IpAddr::V4(ip)),
            Err(_) => {
                SmartHostName::Name(check_domain_name(host).map_err(|e| format!("`{text}`: {e}"))?)
            }
        };
        (host, port)
    };
    let port = match port {
        None => 25,
        Some(port) => match port.parse::<u16>() {
            Ok(port) if port > 0 => port,
            _ => return Err(format!("`{text}`: `{port}` is not a port number (1-65535)")),
        },
    };
    Ok(SmartHost { host, port })
}

/// Checks a domain name and returns its routing form: IDNA A-labels, lower
/// case.
pub fn check_domain_name(name: &str) -> Result<String, String> {
    let invalid = |why: &str| format!("{name:?} is not a valid domain name: {why}");
    if name.is_empty() {
        return Err("must not be empty".to_string());
    }
    let ascii = idna::domain_to_ascii(name).map_err(|_| invalid("IDNA conversion failed"))?;
    if ascii.len() > 253 {
        return Err(invalid("longer than 253 characters"));
    }
    for label in ascii.split('.') {
        if label.is_empty() {
            return Err(invalid("empty label"));
        }
        if label.len() > 63 {
            return Err(invalid("a label is longer than 63 characters"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(invalid("only letters, digits, '-' and '.' are allowed"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(invalid("a label starts or ends with '-'"));
        }
    }
    Ok(ascii)
}

/// A configured address as the SMTP grammar reads it (`user@example.com`,
/// no angle brackets).
pub fn mailbox(address: &str) -> Result<smarthost_proto::address::Mailbox, String> {
    match smarthost_proto::address::parse_forward_path(&format!("<{address}>")) {
        Ok(smarthost_proto::address::Path::Mailbox(path)) => Ok(path.mailbox),
        _ => Err(format!(
            "{address:?} is not a mail address such as \"postmaster@example.com\""
        )),
    }
}

/// The levels `log.level` may name alone.
const LOG_LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// The first directive of a `tracing` filter that is a bare word other
/// than a level, such as a misspelt level (`"chatty"`): valid filter
/// syntax, but it would enable one target and nothing else.
fn bare_target(filter: &str) -> Option<&str> {
    filter.split(',').map(str::trim).find(|directive| {
        !directive.is_empty()
            && !directive.contains(['=', '[', '{'])
            && !LOG_LEVELS.contains(&directive.to_ascii_lowercase().as_str())
    })
}

/// The mailbox for this node's postmaster: `smtp.postmaster`, else
/// `bounce.copy_to` (both validated at load).
pub fn postmaster(config: &Config) -> Option<smarthost_proto::address::Mailbox> {
    let text = config
        .smtp
        .postmaster
        .as_ref()
        .or(config.bounce.copy_to.as_ref())?;
    mailbox(text).ok()
}

/// Where double bounces go: `bounce.double_bounce_to`, else the
/// postmaster; `None`: they are logged and dropped.
pub fn double_bounce_to(config: &Config) -> Option<smarthost_proto::address::Mailbox> {
    match &config.bounce.double_bounce_to {
        Some(text) => mailbox(text).ok(),
        None => postmaster(config),
    }
}

fn check_address(address: &str) -> Result<(), String> {
    match address.rsplit_once('@') {
        Some((local, domain)) if !local.is_empty() => check_domain_name(domain).map(|_| ()),
        _ => Err(format!(
            "{address:?} is not a mail address such as \"postmaster@example.com\""
        )),
    }
}

fn check_certificates(path: &Path) -> Result<(), String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    let where_ = path.display();
    std::fs::File::open(path).map_err(|e| format!("cannot read {where_}: {e}"))?;
    let mut count = 0;
    for cert in
        CertificateDer::pem_file_iter(path).map_err(|e| format!("cannot read {where_}: {e}"))?
    {
        cert.map_err(|e| format!("{where_}: not a PEM certificate: {e}"))?;
        count += 1;
    }
    if count == 0 {
        return Err(format!("{where_} holds no PEM certificate"));
    }
    Ok(())
}

fn check_private_key(path: &Path) -> Result<(), String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::PrivateKeyDer;
    let where_ = path.display();
    std::fs::File::open(path).map_err(|e| format!("cannot read {where_}: {e}"))?;
    PrivateKeyDer::from_pem_file(path)
        .map(|_| ())
        .map_err(|e| format!("{where_} holds no PEM private key: {e}"))
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

    /// A size given as a string (`"10MB"`) or a plain number of bytes.
    ///
    /// A visitor rather than an untagged enum, so that the reason a text is
    /// not a size reaches the error message (and with it the key's name).
    /// Numbers arrive as any integer type, or as a float from environment
    /// variables such as `1e6`.
    pub mod size {
        use serde::de::{Deserializer, Error, Visitor};
        use std::fmt;

        struct SizeVisitor;

        impl Visitor<'_> for SizeVisitor {
            type Value = u64;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size such as \"10MB\" or a number of bytes")
            }

            fn visit_u64<E: Error>(self, n: u64) -> Result<u64, E> {
                Ok(n)
            }

            fn visit_i64<E: Error>(self, n: i64) -> Result<u64, E> {
                u64::try_from(n).map_err(|_| E::custom(format!("size {n} is negative")))
            }

            fn visit_f64<E: Error>(self, n: f64) -> Result<u64, E> {
                if n >= 0.0 && n.fract() == 0.0 && n <= u64::MAX as f64 {
                    Ok(n as u64)
                } else {
                    Err(E::custom(format!(
                        "size {n} is not a whole number of bytes"
                    )))
                }
            }

            fn visit_str<E: Error>(self, text: &str) -> Result<u64, E> {
                super::parse_size(text).map_err(E::custom)
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
            d.deserialize_any(SizeVisitor)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    /// Loads `toml` with `env` as the only environment variables.
    fn load(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(toml.as_bytes()).unwrap();
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::load_from(Some(file.path()), environment().source(Some(env)))
    }

    fn load_err(toml: &str, env: &[(&str, &str)]) -> String {
        load(toml, env).unwrap_err().to_string()
    }

    #[test]
    fn a_log_level_must_be_a_level_or_a_target_directive() {
        for good in [
            "info",
            "WARN",
            "smarthost=debug,info",
            "off",
            "info,actix_web=warn",
        ] {
            let toml = format!("[log]\nlevel = {good:?}");
            assert_eq!(load(&toml, &[]).unwrap().validate(), Ok(()), "{good}");
        }
        for bad in ["chatty", "info,verbose"] {
            let errors = invalid(&format!("[log]\nlevel = {bad:?}"));
            assert_eq!(errors.len(), 1, "{bad}: {errors:?}");
            assert!(errors[0].starts_with("log.level: `"), "{bad}: {errors:?}");
            assert!(errors[0].contains("is not a level"), "{bad}: {errors:?}");
        }
    }

    fn invalid(toml: &str) -> Vec<String> {
        load(toml, &[]).unwrap().validate().unwrap_err()
    }

    /// Writes `files` (name, text) into a new folder and loads the first
    /// with `env`.
    fn load_files(files: &[(&str, &str)], env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::load_from(
            Some(&dir.path().join(files[0].0)),
            environment().source(Some(env)),
        )
    }

    fn load_files_err(files: &[(&str, &str)]) -> String {
        load_files(files, &[]).unwrap_err().to_string()
    }

    #[test]
    fn included_files_lay_their_keys_over_the_file_and_under_the_environment() {
        let main = r#"
            include = ["secret/credentials.toml"]
            [smtp]
            max_recipients = 7
            max_connections = 10
            [[smtp.users]]
            name = "replaced"
            password_hash = "x"
        "#;
        let credentials = r#"
            [smtp]
            max_connections = 20
            [[smtp.users]]
            name = "app"
            password_hash = "h1"
            [[smtp.users]]
            name = "billing"
            password_hash = "h2"
        "#;
        let files = [
            ("smarthost.toml", main),
            ("secret/credentials.toml", credentials),
        ];
        let config = load_files(&files, &[("SMARTHOST__SMTP__MAX_CONNECTIONS", "30")]).unwrap();
        let users: Vec<&str> = config.smtp.users.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(
            users,
            ["app", "billing"],
            "the included array replaces the file's"
        );
        assert_eq!(config.smtp.max_recipients, 7, "keys not included stay");
        assert_eq!(
            config.smtp.max_connections, 30,
            "the environment comes last"
        );
        assert_eq!(config.include, [PathBuf::from("secret/credentials.toml")]);
    }

    #[test]
    fn a_missing_or_nested_include_is_refused_with_its_path() {
        let missing = load_files_err(&[("a.toml", "include = [\"nowhere.toml\"]")]);
        assert!(
            missing.starts_with("cannot read ") && missing.contains("nowhere.toml"),
            "{missing}"
        );
        let nested = load_files_err(&[
            ("a.toml", "include = [\"b.toml\"]"),
            ("b.toml", "include = [\"c.toml\"]"),
            ("c.toml", ""),
        ]);
        assert!(
            nested.starts_with("include: ") && nested.contains("b.toml is included"),
            "{nested}"
        );
        let bad = load_files_err(&[("a.toml", "include = [\"b.toml\"]"), ("b.toml", "[smtp")]);
        assert!(
            bad.contains("b.toml"),
            "a syntax error names the included file: {bad}"
        );
    }

    #[test]
    fn an_empty_file_gives_the_defaults_and_they_validate() {
        let config = load("", &[]).unwrap();
        assert_eq!(config.smtp.max_message_size, 10_000_000);
        assert_eq!(config.smtp.listen, SmtpConfig::default().listen);
        assert_eq!(config.queue.retry_intervals.len(), 4);
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn sizes_are_text_or_numbers_from_file_and_environment() {
        let size =
            |toml: &str, env: &[(&str, &str)]| load(toml, env).unwrap().smtp.max_message_size;
        assert_eq!(size("[smtp]\nmax_message_size = \"10MB\"", &[]), 10_000_000);
        assert_eq!(size("[smtp]\nmax_message_size = 10000000", &[]), 10_000_000);
        assert_eq!(size("[smtp]\nmax_message_size = \"1MiB\"", &[]), 1 << 20);
        assert_eq!(
            size("", &[("SMARTHOST__SMTP__MAX_MESSAGE_SIZE", "1MB")]),
            1_000_000
        );
        assert_eq!(
            size("", &[("SMARTHOST__SMTP__MAX_MESSAGE_SIZE", "2500")]),
            2500
        );
    }

    #[test]
    fn a_bad_size_names_its_key() {
        let err = load_err("[smtp]\nmax_message_size = \"10XB\"", &[]);
        assert!(
            err.starts_with("smtp.max_message_size: unknown size unit `xb`"),
            "{err}"
        );
        let err = load_err("", &[("SMARTHOST__SMTP__MAX_SESSION_SIZE", "lots")]);
        assert!(err.starts_with("smtp.max_session_size: "), "{err}");
        let err = load_err("[smtp]\nmax_message_size = -1", &[]);
        assert!(err.starts_with("smtp.max_message_size: "), "{err}");
    }

    #[test]
    fn environment_overrides_the_file_including_keys_with_underscores() {
        let config = load(
            "[smtp]\nmax_recipients = 100\n[queue]\npath = \"/var/spool/smarthost\"",
            &[
                ("SMARTHOST__SMTP__MAX_RECIPIENTS", "5"),
                ("SMARTHOST__QUEUE__PATH", "/x"),
                ("SMARTHOST__SMTP__REQUIRE_TLS", "true"),
                ("SMARTHOST__SMTP__CONNECTION_TIMEOUT", "2m"),
                ("SMARTHOST__NODE__HOSTNAME", "relay.example.com"),
                ("SMARTHOST__LOG__FORMAT", "json"),
            ],
        )
        .unwrap();
        assert_eq!(config.smtp.max_recipients, 5);
        assert_eq!(config.queue.path, PathBuf::from("/x"));
        assert!(config.smtp.require_tls);
        assert_eq!(config.smtp.connection_timeout, Duration::from_secs(120));
        assert_eq!(config.node.hostname, "relay.example.com");
        assert_eq!(config.log.format, LogFormat::Json);
    }

    #[test]
    fn environment_lists_are_comma_separated() {
        let config = load(
            "",
            &[
                ("SMARTHOST__SMTP__LISTEN", "127.0.0.1:2525,127.0.0.1:2526"),
                ("SMARTHOST__SMTP__RELAY_NETWORKS", "10.0.0.0/8"),
                ("SMARTHOST__QUEUE__RETRY_INTERVALS", "1m,5m"),
            ],
        )
        .unwrap();
        assert_eq!(config.smtp.listen.len(), 2);
        assert_eq!(config.smtp.listen[1].port(), 2526);
        assert_eq!(
            config.smtp.relay_networks,
            vec!["10.0.0.0/8".parse::<IpNet>().unwrap()]
        );
        assert_eq!(
            config.queue.retry_intervals,
            vec![Duration::from_secs(60), Duration::from_secs(300)]
        );
    }

    #[test]
    fn unknown_keys_name_their_section_and_the_allowed_keys() {
        let err = load_err("[smtp]\nmax_recipient = 5", &[]);
        assert!(
            err.starts_with("smtp.max_recipient: unknown key in [smtp]"),
            "{err}"
        );
        assert!(err.contains("max_recipients"), "{err}");
        let err = load_err("[smpt]\nlisten = []", &[]);
        assert!(err.starts_with("smpt: unknown section"), "{err}");
        assert!(err.contains("smtp"), "{err}");
        let err = load_err("[[domains]]\nname = \"a.example\"\nrates = \"1/s\"", &[]);
        assert!(
            err.starts_with("domains[0].rates: unknown key in [[domains]]"),
            "{err}"
        );
        let err = load_err("", &[("SMARTHOST__QUEUE__PATHS", "/x")]);
        assert!(
            err.starts_with("queue.paths: unknown key in [queue]"),
            "{err}"
        );
    }

    #[test]
    fn every_unknown_key_is_named_at_once() {
        let err = load(
            "[smtp]\nbogus_one = 1\nmax_recipient = 5\n[queue]\nbogus_two = 2\n[smpt]\nlisten = []",
            &[],
        )
        .unwrap_err();
        let messages = err.messages();
        let keys: Vec<&str> = messages
            .iter()
            .map(|m| m.split(':').next().unwrap())
            .collect();
        assert_eq!(keys.len(), 4, "{messages:?}");
        for key in [
            "smtp.bogus_one",
            "smtp.max_recipient",
            "queue.bogus_two",
            "smpt",
        ] {
            assert!(keys.contains(&key), "{key} in {messages:?}");
        }
        // Values of the wrong type among them are named as well, whichever
        // comes first.
        let err = load(
            "[smtp]\nbogus = 1\nmax_recipients = \"many\"\n[queue]\nmax_lifetime = 3",
            &[],
        )
        .unwrap_err();
        let mut keys: Vec<String> = err
            .messages()
            .iter()
            .map(|m| m.split(':').next().unwrap().to_string())
            .collect();
        keys.sort();
        assert_eq!(
            keys,
            ["queue.max_lifetime", "smtp.bogus", "smtp.max_recipients"],
            "{:?}",
            err.messages()
        );
    }

    #[test]
    fn type_errors_name_their_key() {
        let err = load_err("[queue]\nmax_lifetime = \"two days\"", &[]);
        assert!(err.starts_with("queue.max_lifetime: "), "{err}");
        let err = load_err("[queue]\nbackend = \"postgres\"", &[]);
        assert!(err.starts_with("queue.backend: "), "{err}");
        assert!(err.contains("redis"), "{err}");
        let err = load_err("[[domains]]\nkind = \"local\"", &[]);
        assert!(err.starts_with("domains[0].name: missing"), "{err}");
        let err = load_err("[smtp]\nlisten = [\"nowhere\"]", &[]);
        assert!(err.starts_with("smtp.listen"), "{err}");
    }

    #[test]
    fn toml_syntax_errors_name_the_file() {
        let err = load("[smtp\n", &[]).unwrap_err();
        assert!(matches!(err, ConfigError::Syntax { .. }), "{err}");
    }

    #[test]
    fn session_limits_have_defaults_and_are_checked() {
        let config = load("", &[]).unwrap();
        let smtp = &config.smtp;
        assert_eq!(smtp.max_connections_per_ip, 20);
        assert_eq!(smtp.command_timeout, Duration::from_secs(60));
        assert_eq!(smtp.data_timeout, Duration::from_secs(600));
        assert_eq!(smtp.min_data_rate, 500);
        assert_eq!(smtp.tls_handshake_timeout, Duration::from_secs(10));
        assert_eq!(smtp.greeting_delay, Duration::from_millis(500));
        assert_eq!(smtp.anonymous_connection_share, 0.8);
        let config = load(
            "[smtp]\nmin_data_rate = \"1KB\"\nanonymous_connection_share = 0.5",
            &[("SMARTHOST__SMTP__GREETING_DELAY", "0s")],
        )
        .unwrap();
        assert_eq!(config.smtp.min_data_rate, 1000);
        assert_eq!(config.smtp.anonymous_connection_share, 0.5);
        assert!(config.smtp.greeting_delay.is_zero());
        config.validate().unwrap();
        let errors = invalid(
            "[smtp]\ncommand_timeout = \"0s\"\ndata_timeout = \"0s\"\n\
             tls_handshake_timeout = \"0s\"\nanonymous_connection_share = 0.0\n\
             connection_timeout = \"1s\"\ngreeting_delay = \"2s\"",
        );
        let keys: Vec<&str> = errors
            .iter()
            .map(|e| e.split(':').next().unwrap())
            .collect();
        assert_eq!(
            keys,
            [
                "smtp.command_timeout",
                "smtp.data_timeout",
                "smtp.tls_handshake_timeout",
                "smtp.anonymous_connection_share",
                "smtp.greeting_delay",
            ],
            "{errors:?}"
        );
        assert!(invalid("[smtp]\nanonymous_connection_share = 1.5")[0]
            .contains("between 0 (excluded) and 1"),);
    }

    #[test]
    fn validation_reports_every_problem_with_its_key() {
        let errors = invalid(
            r#"
            [node]
            hostname = ""
            [smtp]
            listen = []
            max_recipients = 0
            max_message_size = "60MB"
            max_session_size = "50MB"
            [queue]
            lease = "0s"
            retry_intervals = []
            [delivery]
            smart_host = "[not-an-ip]:25"
            [[domains]]
            name = "example.org"
            kind = "local"
            [[domains]]
            name = "Example.org"
            rate = "fast"
            smart_host = "mx.example.net:99999"
            "#,
        );
        let keys: Vec<&str> = errors
            .iter()
            .map(|e| e.split(':').next().unwrap())
            .collect();
        assert_eq!(
            keys,
            [
                "node.hostname",
                "smtp.listen",
                "smtp.max_recipients",
                "smtp.max_message_size",
                "queue.lease",
                "queue.retry_intervals",
                "delivery.smart_host",
                "domains[0].drop_dir",
                "domains[1].name",
                "domains[1].smart_host",
                "domains[1].rate",
            ],
            "{errors:#?}"
        );
    }

    #[test]
    fn requiring_fsync_is_off_by_default_and_for_redis_only() {
        let config = load("[queue]\nbackend = \"redis\"", &[]).unwrap();
        assert!(!config.queue.redis_require_fsync);
        let config = load(
            "[queue]\nbackend = \"redis\"\nredis_require_fsync = true",
            &[],
        )
        .unwrap();
        assert!(config.queue.redis_require_fsync);
        let errors = invalid("[queue]\nredis_require_fsync = true");
        assert_eq!(
            errors,
            ["queue.redis_require_fsync: applies to queue.backend = \"redis\" only (the local spool always fsyncs)"]
        );
        let err = load_err("[queue]\nredis_require_fsync = \"maybe\"", &[]);
        assert!(err.contains("redis_require_fsync"), "{err}");
    }

    #[test]
    fn the_redis_backend_loads_with_its_lease_and_rescan_interval() {
        let config = load("[queue]\nbackend = \"redis\"", &[]).unwrap();
        assert_eq!(config.queue.backend, QueueBackend::Redis);
        assert_eq!(config.queue.lease, Duration::from_secs(15 * 60));
        assert_eq!(config.queue.rescan_interval, Duration::from_secs(60));
        let config = load(
            "[queue]\nbackend = \"redis\"\nlease = \"30s\"\nrescan_interval = \"10s\"\nnode_timeout = \"6s\"\nredis_min_replicas = 1",
            &[],
        )
        .unwrap();
        assert_eq!(config.queue.lease, Duration::from_secs(30));
        assert_eq!(config.queue.rescan_interval, Duration::from_secs(10));
        assert_eq!(config.queue.node_timeout, Duration::from_secs(6));
        assert_eq!(config.queue.redis_min_replicas, 1);
        let errors = invalid(
            "[queue]\nlease = \"500ms\"\nrescan_interval = \"0s\"\nnode_timeout = \"900ms\"",
        );
        assert_eq!(
            errors,
            [
                "queue.lease: must be at least 1s",
                "queue.rescan_interval: must be longer than 0s",
                "queue.node_timeout: must be at least 1s"
            ]
        );
    }

    #[test]
    fn a_redis_cluster_is_named_by_one_or_more_seed_urls() {
        let config = load("[queue]\nbackend = \"redis\"", &[]).unwrap();
        assert!(!config.queue.redis_cluster);
        let config = load(
            "[queue]\nbackend = \"redis\"\nredis_cluster = true\n\
             redis_url = \"redis://10.0.0.1:7000,redis://10.0.0.2:7000\"",
            &[],
        )
        .unwrap();
        assert!(config.queue.redis_cluster);
        config.validate().unwrap();
        let config = load(
            "",
            &[
                ("SMARTHOST__QUEUE__BACKEND", "redis"),
                ("SMARTHOST__QUEUE__REDIS_CLUSTER", "true"),
                (
                    "SMARTHOST__QUEUE__REDIS_URL",
                    "redis://:secret@a:7000,redis://:secret@b:7001",
                ),
            ],
        )
        .unwrap();
        assert!(config.queue.redis_cluster);
        assert_eq!(
            config.queue.redis_url, "redis://:secret@a:7000,redis://:secret@b:7001",
            "a seed list is one string, not a list key"
        );
        config.validate().unwrap();

        // Several servers need the cluster; every seed must be a URL; no
        // password in the message.
        let errors = invalid(
            "[queue]\nbackend = \"redis\"\n\
             redis_url = \"redis://:secret@a:7000,redis://b:7001\"",
        );
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].starts_with("queue.redis_url: ")
                && errors[0].contains("queue.redis_cluster = true")
                && !errors[0].contains("secret"),
            "{errors:?}"
        );
        let errors = invalid(
            "[queue]\nbackend = \"redis\"\nredis_cluster = true\n\
             redis_url = \"redis://a:7000,a:7001\"",
        );
        assert_eq!(errors, ["queue.redis_url: a:7001: not a redis:// URL"]);
        let errors = invalid("[queue]\nbackend = \"redis\"\nredis_url = \"\"");
        assert_eq!(errors, ["queue.redis_url: no redis URL"]);
        let err = load_err("[queue]\nredis_cluster = \"maybe\"", &[]);
        assert!(err.contains("redis_cluster"), "{err}");
    }

    #[test]
    fn the_open_routes_may_have_an_address_of_their_own() {
        assert_eq!(load("", &[]).unwrap().admin.metrics_listen, None);
        let config = load("[admin]\nmetrics_listen = \"0.0.0.0:9090\"", &[]).unwrap();
        assert_eq!(
            config.admin.metrics_listen,
            Some("0.0.0.0:9090".parse().unwrap())
        );
        config.validate().unwrap();
        assert_eq!(
            invalid("[admin]\nmetrics_listen = \"127.0.0.1:8025\""),
            ["admin.metrics_listen: 127.0.0.1:8025 is admin.listen"]
        );
        assert_eq!(
            invalid("[admin]\nmetrics_listen = \"127.0.0.1:2525\""),
            ["admin.metrics_listen: 127.0.0.1:2525 is also in smtp.listen"]
        );
        let env = load("", &[("SMARTHOST__ADMIN__METRICS_LISTEN", "[::]:9090")]).unwrap();
        assert_eq!(env.admin.metrics_listen, Some("[::]:9090".parse().unwrap()));
    }

    #[test]
    fn the_redis_response_timeout_is_a_duration_above_zero() {
        let config = load("", &[]).unwrap();
        assert_eq!(config.queue.redis_response_timeout, Duration::from_secs(5));
        let config = load("[queue]\nredis_response_timeout = \"750ms\"", &[]).unwrap();
        assert_eq!(
            config.queue.redis_response_timeout,
            Duration::from_millis(750)
        );
        let errors = invalid("[queue]\nredis_response_timeout = \"0s\"");
        assert_eq!(
            errors,
            ["queue.redis_response_timeout: must be longer than 0s"]
        );
    }

    #[test]
    fn tls_files_and_user_hashes_are_checked() {
        let errors = invalid(
            r#"
            [smtp.tls]
            cert = "/nonexistent/cert.pem"
            key = "/nonexistent/key.pem"
            [[smtp.users]]
            name = "app"
            password_hash = "secret"
            [[smtp.users]]
            name = "app"
            password_hash = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$Tt0Yl1xFw1v0BA6fyKUsI0VR5Ko9ZtVN4Nh2Ajm9b1Q"
            "#,
        );
        let keys: Vec<&str> = errors
            .iter()
            .map(|e| e.split(':').next().unwrap())
            .collect();
        assert_eq!(
            keys,
            [
                "smtp.tls.cert",
                "smtp.tls.key",
                "smtp.users[0].password_hash",
                "smtp.users[1].name",
            ],
            "{errors:#?}"
        );
    }

    #[test]
    fn api_keys_need_unique_names_usable_hashes_and_senders() {
        let hash = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$Tt0Yl1xFw1v0BA6fyKUsI0VR5Ko9ZtVN4Nh2Ajm9b1Q";
        let config = load(
            &format!(
                "[[api.keys]]\nname = \"shop\"\ntoken_hash = \"{hash}\"\n\
                 senders = [\"shop.example\", \"alerts@ops.example\"]\n"
            ),
            &[],
        )
        .unwrap();
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(config.api.keys[0].senders.len(), 2);
        let errors = invalid(&format!(
            "[[api.keys]]\nname = \"shop\"\ntoken_hash = \"secret\"\nsenders = []\n\
             [[api.keys]]\nname = \"shop\"\ntoken_hash = \"{hash}\"\nsenders = [\"a@\"]\n"
        ));
        let keys: Vec<&str> = errors
            .iter()
            .map(|e| e.split(':').next().unwrap())
            .collect();
        assert_eq!(
            keys,
            [
                "api.keys[0].token_hash",
                "api.keys[0].senders",
                "api.keys[1].name",
                "api.keys[1].senders[0]",
            ],
            "{errors:#?}"
        );
    }

    #[test]
    fn operators_need_unique_names_usable_hashes_and_a_known_role() {
        let hash = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$Tt0Yl1xFw1v0BA6fyKUsI0VR5Ko9ZtVN4Nh2Ajm9b1Q";
        let config = load(
            &format!(
                "[[admin.operators]]\nname = \"ops\"\ntoken_hash = \"{hash}\"\nrole = \"admin\"\n\
                 [[admin.operators]]\nname = \"noc\"\ntoken_hash = \"{hash}\"\nrole = \"Viewer\"\n\
                 [[admin.operators]]\nname = \"desk\"\ntoken_hash = \"{hash}\"\nrole = \"operator\"\n"
            ),
            &[],
        )
        .unwrap();
        assert_eq!(config.validate(), Ok(()));
        let roles: Vec<OperatorRole> = config.admin.operators.iter().map(|o| o.role).collect();
        assert_eq!(
            roles,
            [
                OperatorRole::Admin,
                OperatorRole::Viewer,
                OperatorRole::Operator
            ]
        );

        let errors = invalid(&format!(
            "[[admin.operators]]\nname = \"ops\"\ntoken_hash = \"secret\"\nrole = \"admin\"\n\
             [[admin.operators]]\nname = \"ops\"\ntoken_hash = \"{hash}\"\nrole = \"viewer\"\n\
             [[admin.operators]]\nname = \"\"\ntoken_hash = \"{hash}\"\nrole = \"viewer\"\n"
        ));
        let keys: Vec<&str> = errors
            .iter()
            .map(|e| e.split(':').next().unwrap())
            .collect();
        assert_eq!(
            keys,
            [
                "admin.operators[0].token_hash",
                "admin.operators[1].name",
                "admin.operators[2].name",
            ],
            "{errors:#?}"
        );

        let err = load_err(
            &format!(
                "[[admin.operators]]\nname = \"ops\"\ntoken_hash = \"{hash}\"\nrole = \"root\"\n"
            ),
            &[],
        );
        assert!(err.starts_with("admin.operators[0].role: "), "{err}");
        assert!(err.contains("\"admin\", \"operator\", \"viewer\""), "{err}");
        let err = load_err(
            "[[admin.operators]]\nname = \"ops\"\nrole = \"admin\"\n",
            &[],
        );
        assert!(
            err.starts_with("admin.operators[0].token_hash: missing"),
            "{err}"
        );
    }

    #[test]
    fn users_without_tls_need_plaintext_auth_allowed() {
        let users = "[[smtp.users]]\nname = \"app\"\npassword_hash = \"$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$Tt0Yl1xFw1v0BA6fyKUsI0VR5Ko9ZtVN4Nh2Ajm9b1Q\"\n";
        let errors = invalid(users);
        assert!(
            errors[0].starts_with("smtp.users: AUTH is only offered after STARTTLS"),
            "{errors:?}"
        );
        let config = load(
            &format!("[smtp]\nallow_plaintext_auth = true\n{users}"),
            &[],
        )
        .unwrap();
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn pickup_is_off_unless_a_dir_is_given_and_badmail_sits_in_the_queue() {
        let config = load("[queue]\npath = \"/var/spool/smarthost\"", &[]).unwrap();
        assert_eq!(config.pickup.dir, None);
        assert_eq!(config.pickup.poll_interval, Duration::from_secs(1));
        assert_eq!(
            config.badmail_dir(),
            PathBuf::from("/var/spool/smarthost/badmail")
        );
        let config = load(
            "[pickup]\ndir = \"/srv/pickup\"\npoll_interval = \"250ms\"\n\
             [badmail]\ndir = \"/srv/badmail\"",
            &[],
        )
        .unwrap();
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(config.pickup.dir, Some(PathBuf::from("/srv/pickup")));
        assert_eq!(config.pickup.poll_interval, Duration::from_millis(250));
        assert_eq!(config.badmail_dir(), PathBuf::from("/srv/badmail"));

        let errors = invalid(
            "[pickup]\ndir = \"/srv/x\"\npoll_interval = \"0s\"\n[badmail]\ndir = \"/srv/x\"",
        );
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors
            .iter()
            .any(|e| e.starts_with("pickup.poll_interval: ")));
        assert!(errors
            .iter()
            .any(|e| e.starts_with("pickup.dir: ") && e.contains("badmail")));
    }

    #[test]
    fn double_bounces_go_to_their_own_address_else_the_postmaster() {
        let config = load("", &[]).unwrap();
        assert_eq!(double_bounce_to(&config), None);
        let config = load("[smtp]\npostmaster = \"ops@example.com\"", &[]).unwrap();
        assert_eq!(
            double_bounce_to(&config).unwrap().to_string(),
            "ops@example.com"
        );
        let config = load(
            "[smtp]\npostmaster = \"ops@example.com\"\n[bounce]\ndouble_bounce_to = \"mail-admin@example.com\"",
            &[],
        )
        .unwrap();
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(
            double_bounce_to(&config).unwrap().to_string(),
            "mail-admin@example.com"
        );
        let errors = invalid("[bounce]\ndouble_bounce_to = \"mail-admin\"");
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("bounce.double_bounce_to: ")),
            "{errors:?}"
        );
    }

    #[test]
    fn the_postmaster_is_a_usable_address_and_falls_back_to_the_bounce_copy() {
        let config = load("", &[]).unwrap();
        assert_eq!(postmaster(&config), None);
        let config = load("[bounce]\ncopy_to = \"reports@example.com\"", &[]).unwrap();
        assert_eq!(
            postmaster(&config).unwrap().to_string(),
            "reports@example.com"
        );
        let config = load(
            "[smtp]\npostmaster = \"Ops@Example.com\"\n[bounce]\ncopy_to = \"reports@example.com\"",
            &[],
        )
        .unwrap();
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(postmaster(&config).unwrap().to_string(), "Ops@example.com");
        for (value, why) in [
            ("postmaster", "is not a mail address"),
            ("ops", "is not a mail address"),
            ("a b@example.com", "is not a mail address"),
            ("jörg@example.com", "must be an ASCII address"),
            (
                "PostMaster@relay.example",
                "this node's own postmaster address",
            ),
        ] {
            let errors = invalid(&format!(
                "[node]\nhostname = \"relay.example\"\n[smtp]\npostmaster = {value:?}"
            ));
            assert_eq!(errors.len(), 1, "{value}: {errors:?}");
            assert!(
                errors[0].starts_with("smtp.postmaster: ") && errors[0].contains(why),
                "{value}: {errors:?}"
            );
        }
    }

    #[test]
    fn body_memory_has_a_default_and_must_hold_the_largest_message() {
        let config = load("", &[]).unwrap();
        assert_eq!(config.smtp.max_body_memory, 256_000_000);
        assert_eq!(config.smtp.body_memory_wait, Duration::from_secs(5));
        let config = load(
            "[smtp]\nmax_body_memory = \"20MB\"\nbody_memory_wait = \"250ms\"",
            &[("SMARTHOST__SMTP__MAX_BODY_MEMORY", "30MB")],
        )
        .unwrap();
        assert_eq!(config.smtp.max_body_memory, 30_000_000);
        assert_eq!(config.smtp.body_memory_wait, Duration::from_millis(250));
        assert_eq!(config.validate(), Ok(()));
        let errors = invalid("[smtp]\nmax_body_memory = \"9MB\"");
        assert_eq!(
            errors,
            [
                "smtp.max_body_memory: 9000000 bytes is less than smtp.max_message_size \
              (10000000 bytes): one message of the largest size must fit"
            ]
        );
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("50/s"), Ok((50, Duration::from_secs(1))));
        assert_eq!(parse_rate("300/m"), Ok((300, Duration::from_secs(60))));
        assert_eq!(
            parse_rate(" 1000 / h "),
            Ok((1000, Duration::from_secs(3600)))
        );
        for bad in ["", "50", "50/d", "x/s", "-1/s", "0/s", "50/"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn smart_hosts() {
        let ok = |text: &str| parse_smart_host(text).unwrap();
        let name = |n: &str| SmartHostName::Name(n.to_string());
        let ip = |a: &str| SmartHostName::Ip(a.parse().unwrap());
        assert_eq!(
            ok("mx.example.net"),
            SmartHost {
                host: name("mx.example.net"),
                port: 25
            }
        );
        assert_eq!(
            ok("MX.Example.net:587"),
            SmartHost {
                host: name("mx.example.net"),
                port: 587
            }
        );
        assert_eq!(
            ok("[127.0.0.1]:2600"),
            SmartHost {
                host: ip("127.0.0.1"),
                port: 2600
            }
        );
        assert_eq!(
            ok("[2001:db8::1]"),
            SmartHost {
                host: ip("2001:db8::1"),
                port: 25
            }
        );
        assert_eq!(
            ok("[IPv6:2001:db8::1]:26"),
            SmartHost {
                host: ip("2001:db8::1"),
                port: 26
            }
        );
        assert_eq!(
            ok("192.0.2.7:25"),
            SmartHost {
                host: ip("192.0.2.7"),
                port: 25
            }
        );
        for bad in [
            "",
            "host:",
            "host:0",
            "host:x",
            "[127.0.0.1",
            "[x]:25",
            "2001:db8::1",
            "bad_name:25",
            "[::1]25",
        ] {
            assert!(parse_smart_host(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn domain_names() {
        assert_eq!(check_domain_name("Example.ORG").unwrap(), "example.org");
        assert_eq!(
            check_domain_name("bücher.example").unwrap(),
            "xn--bcher-kva.example"
        );
        for bad in [
            "",
            "a..b",
            "-a.example",
            "a_b.example",
            "a b",
            &"x".repeat(64),
        ] {
            assert!(check_domain_name(bad).is_err(), "{bad}");
        }
    }
}
