//! Outbound delivery: where a domain's mail goes, the SMTP client that takes
//! it there, and local drop directories.
//!
//! The throttle actors decide *when* a connection may open; this module
//! decides *where* it goes and carries one connection's messages.
//!
//! - [`route`]: the next hops of a domain: MX records, smart hosts,
//!   address literals.
//! - [`outbound`]: one SMTP connection to the first hop that answers, with
//!   STARTTLS and AUTH by policy, sending jobs through `proto::client`.
//! - [`connection`]: the Delivery actor, one per outbound connection (or
//!   pass over a drop directory), reporting each outcome to the queue.
//! - [`maildir`]: local domains, written into their drop directory.

pub mod connection;
pub mod maildir;
pub mod outbound;
pub mod route;
pub mod slots;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use smarthost_proto::envelope::MessageRecord;

use crate::config::{
    parse_rate, parse_smart_host, Config, DomainAuth, DomainKind, SmartHost, TlsPolicy,
};
use crate::spool::Body;

/// One message's delivery to one domain, with its body, ready to send.
#[derive(Clone, Debug)]
pub struct Job {
    pub record: Arc<MessageRecord>,
    /// Index into `record.deliveries`.
    pub delivery: usize,
    pub body: Arc<Body>,
}

impl Job {
    /// The envelope recipients of this delivery: (index in the envelope, recipient).
    pub fn recipients(&self) -> impl Iterator<Item = (u32, &smarthost_proto::envelope::Recipient)> {
        self.record.deliveries[self.delivery]
            .recipients
            .iter()
            .map(|&i| (i, &self.record.envelope.recipients[i as usize]))
    }

    pub fn domain(&self) -> &str {
        &self.record.deliveries[self.delivery].domain
    }
}

/// What became of one recipient in one attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RcptResult {
    Delivered,
    /// Temporary: try again later.
    Deferred,
    /// Permanent: report to the sender.
    Failed,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RcptOutcome {
    /// Index into the envelope's recipients.
    pub recipient: u32,
    pub result: RcptResult,
    /// The server's reply (`550 5.1.1 no such user`) or, when there was
    /// none, what happened (`connection refused`).
    pub reply: String,
}

/// The server a message went to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RemoteInfo {
    pub host: String,
    pub ip: Option<IpAddr>,
    /// The negotiated TLS version (`TLSv1_3`), if TLS was used.
    pub tls: Option<String>,
}

/// The result of one attempt at one job.
#[derive(Clone, Debug)]
pub struct MessageOutcome {
    pub recipients: Vec<RcptOutcome>,
    pub remote: Option<RemoteInfo>,
    pub latency: Duration,
}

impl MessageOutcome {
    /// Every recipient of `job` with the same result and text (a connection
    /// that failed, a route that does not exist).
    pub fn all(job: &Job, result: RcptResult, reply: impl Into<String>, latency: Duration) -> Self {
        Self::all_of(&job.record, job.delivery, result, &reply.into(), latency)
    }

    /// The same for the delivery `delivery` of `record`, body not needed.
    pub fn all_of(
        record: &MessageRecord,
        delivery: usize,
        result: RcptResult,
        reply: &str,
        latency: Duration,
    ) -> Self {
        MessageOutcome {
            recipients: record.deliveries[delivery]
                .recipients
                .iter()
                .map(|&recipient| RcptOutcome {
                    recipient,
                    result,
                    reply: reply.to_string(),
                })
                .collect(),
            remote: None,
            latency,
        }
    }
}

/// Where a domain's mail goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// The domain's MX hosts (or its A/AAAA records when it has no MX).
    Mx,
    SmartHost(SmartHost),
    /// Written into a drop directory on this node.
    Local(std::path::PathBuf),
}

/// Everything that decides how one destination domain is served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainPolicy {
    pub domain: String,
    pub route: Route,
    pub tls: TlsPolicy,
    pub auth: Option<(String, String)>,
    /// Connections to this domain at once: per node with
    /// [`crate::limits::LocalLimits`], per cluster with
    /// [`crate::limits::RedisLimits`].
    pub max_connections: usize,
    /// At most `.0` messages per `.1`.
    pub rate: Option<(u32, Duration)>,
    pub max_messages_per_connection: usize,
}

impl DomainPolicy {
    /// The policy of `domain` (routing form): its `[[domains]]` entry over
    /// the `[delivery]` defaults. The configuration is validated, so the
    /// values parse.
    pub fn for_domain(config: &Config, domain: &str) -> DomainPolicy {
        let delivery = &config.delivery;
        let entry = config.domains.iter().find(|d| {
            crate::config::check_domain_name(&d.name)
                .map(|name| name == domain)
                .unwrap_or(false)
        });
        let smart_host = entry
            .and_then(|d| d.smart_host.as_deref())
            .or(delivery.smart_host.as_deref())
            .and_then(|text| parse_smart_host(text).ok());
        let route = match (
            entry.map(|d| d.kind),
            entry.and_then(|d| d.drop_dir.clone()),
        ) {
            (Some(DomainKind::Local), Some(dir)) => Route::Local(dir),
            _ => smart_host.map(Route::SmartHost).unwrap_or(Route::Mx),
        };
        DomainPolicy {
            domain: domain.to_string(),
            route,
            tls: entry.and_then(|d| d.tls).unwrap_or(delivery.tls),
            auth: entry
                .and_then(|d| d.auth.as_ref())
                .map(|DomainAuth { user, password }| (user.clone(), password.clone())),
            max_connections: entry
                .and_then(|d| d.max_connections)
                .unwrap_or(delivery.max_connections_per_domain),
            rate: entry
                .and_then(|d| d.rate.as_deref())
                .and_then(|r| parse_rate(r).ok()),
            max_messages_per_connection: delivery.max_messages_per_connection,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(toml: &str) -> Config {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, toml).unwrap();
        Config::load(Some(&path)).unwrap()
    }

    #[test]
    fn domain_entries_override_the_delivery_defaults() {
        let config = config(
            r#"
            [delivery]
            smart_host = "[127.0.0.1]:2600"
            max_connections_per_domain = 7
            [[domains]]
            name = "Example.ORG"
            smart_host = "mx.example.net:2525"
            max_connections = 2
            rate = "50/s"
            tls = "required"
            auth = { user = "u", password = "p" }
            [[domains]]
            name = "local.test"
            kind = "local"
            drop_dir = "/tmp/drop"
            "#,
        );
        let org = DomainPolicy::for_domain(&config, "example.org");
        assert_eq!(
            org.route,
            Route::SmartHost(parse_smart_host("mx.example.net:2525").unwrap())
        );
        assert_eq!(org.max_connections, 2);
        assert_eq!(org.rate, Some((50, Duration::from_secs(1))));
        assert_eq!(org.tls, TlsPolicy::Required);
        assert_eq!(org.auth, Some(("u".into(), "p".into())));

        let other = DomainPolicy::for_domain(&config, "example.com");
        assert_eq!(
            other.route,
            Route::SmartHost(parse_smart_host("[127.0.0.1]:2600").unwrap())
        );
        assert_eq!(other.max_connections, 7);
        assert_eq!(other.rate, None);
        assert_eq!(other.tls, TlsPolicy::Opportunistic);

        let local = DomainPolicy::for_domain(&config, "local.test");
        assert_eq!(local.route, Route::Local("/tmp/drop".into()));
    }

    #[test]
    fn without_a_smart_host_mail_goes_to_the_mx() {
        let config = config("");
        assert_eq!(
            DomainPolicy::for_domain(&config, "example.com").route,
            Route::Mx
        );
    }
}
