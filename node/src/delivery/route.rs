//! Where a domain's mail goes: the hosts to try, in order, with their
//! addresses.
//!
//! A smart host given as an IP address and a domain that is an address
//! literal need no DNS. Otherwise MX records are looked up (RFC 5321 5.1):
//! sorted by preference, equal preferences shuffled; no MX means the
//! domain's own addresses (implicit MX); a null MX (RFC 7505) means the
//! domain takes no mail. The ordering is a pure function, [`order_mx`].

use std::net::{IpAddr, SocketAddr};

use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::NetError;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::TokioResolver;
use rand::seq::SliceRandom;
use rand::Rng;

use super::{DomainPolicy, Route};
use crate::config::{DeliveryConfig, SmartHostName};

/// One host to try, with its addresses in the order to try them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NextHop {
    /// The host name (no trailing dot), or the IP address as text for a
    /// literal; it is the TLS server name too.
    pub name: String,
    pub addrs: Vec<SocketAddr>,
}

/// Why no host could be found. The text carries the reply code and the
/// RFC 3463 status to report (`550 5.1.2 …`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// Try again later (SERVFAIL, timeouts, unreachable name servers).
    #[error("{0}")]
    Temporary(String),
    /// The domain cannot take mail: bounce.
    #[error("{0}")]
    Permanent(String),
}

impl RouteError {
    pub fn is_permanent(&self) -> bool {
        matches!(self, RouteError::Permanent(_))
    }
}

/// The resolver could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up the DNS resolver: {0}")]
pub struct ResolverSetupError(String);

/// The MX records of a domain, put in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MxPlan {
    /// No MX records: the domain itself is the host (implicit MX).
    Implicit,
    /// `MX 0 .`: the domain accepts no mail (RFC 7505).
    Null,
    /// Host names (lower case, no trailing dot), most preferred first.
    Hosts(Vec<String>),
}

/// Orders MX records `(preference, exchange)`: lowest preference first,
/// hosts of equal preference shuffled with `rng` so that load spreads,
/// duplicates dropped. A record whose exchange is the root (`.`) is a null
/// MX when it is the only kind there; next to real hosts it is ignored.
pub fn order_mx<R: Rng + ?Sized>(records: &[(u16, String)], rng: &mut R) -> MxPlan {
    if records.is_empty() {
        return MxPlan::Implicit;
    }
    let mut hosts: Vec<(u16, String)> = records
        .iter()
        .map(|(pref, name)| (*pref, name.trim_end_matches('.').to_ascii_lowercase()))
        .filter(|(_, name)| !name.is_empty())
        .collect();
    if hosts.is_empty() {
        return MxPlan::Null;
    }
    hosts.sort_by_key(|(pref, _)| *pref);
    let mut ordered: Vec<String> = Vec::with_capacity(hosts.len());
    for group in hosts.chunk_by_mut(|a, b| a.0 == b.0) {
        group.shuffle(rng);
        for (_, name) in group.iter() {
            if !ordered.contains(name) {
                ordered.push(name.clone());
            }
        }
    }
    MxPlan::Hosts(ordered)
}

/// The IP address of a domain that is an address literal: `[192.0.2.1]`,
/// `[IPv6:2001:db8::1]`.
pub fn address_literal(domain: &str) -> Option<IpAddr> {
    let inner = domain.strip_prefix('[')?.strip_suffix(']')?;
    let inner = inner
        .strip_prefix("IPv6:")
        .or_else(|| inner.strip_prefix("ipv6:"))
        .unwrap_or(inner);
    inner.parse().ok()
}

/// Finds next hops with one shared, caching resolver.
#[derive(Clone)]
pub struct Router {
    resolver: TokioResolver,
    mx_port: u16,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("mx_port", &self.mx_port)
            .finish_non_exhaustive()
    }
}

impl Router {
    /// A router that asks `dns_servers` (UDP, falling back to TCP, on
    /// exactly those addresses and ports) or, when none are given, the
    /// servers of the system's resolver configuration. Answers are cached.
    pub fn new(config: &DeliveryConfig) -> Result<Router, ResolverSetupError> {
        Router::with_options(config, |_| {})
    }

    /// [`Router::new`] with resolver options changed by `adjust`.
    fn with_options(
        config: &DeliveryConfig,
        adjust: impl FnOnce(&mut ResolverOpts),
    ) -> Result<Router, ResolverSetupError> {
        let provider = TokioRuntimeProvider::default();
        let mut builder = if config.dns_servers.is_empty() {
            TokioResolver::builder(provider).map_err(|e| ResolverSetupError(e.to_string()))?
        } else {
            let servers = config
                .dns_servers
                .iter()
                .map(|server| {
                    let mut ns = NameServerConfig::udp_and_tcp(server.ip());
                    for connection in &mut ns.connections {
                        connection.port = server.port();
                    }
                    ns
                })
                .collect();
            TokioResolver::builder_with_config(ResolverConfig::from_name_servers(servers), provider)
        };
        adjust(builder.options_mut());
        let resolver = builder
            .build()
            .map_err(|e| ResolverSetupError(e.to_string()))?;
        Ok(Router {
            resolver,
            mx_port: config.mx_port,
        })
    }

    /// The hosts to try for `policy`, in order. A local route has none.
    pub async fn next_hops(&self, policy: &DomainPolicy) -> Result<Vec<NextHop>, RouteError> {
        match &policy.route {
            Route::Local(_) => Ok(Vec::new()),
            Route::SmartHost(smart_host) => match &smart_host.host {
                SmartHostName::Ip(ip) => Ok(vec![literal_hop(*ip, smart_host.port)]),
                SmartHostName::Name(name) => {
                    self.only_hop(name, smart_host.port, || {
                        RouteError::Temporary(format!("451 4.4.4 smart host {name} has no address"))
                    })
                    .await
                }
            },
            Route::Mx => self.mx_hops(&policy.domain).await,
        }
    }

    async fn mx_hops(&self, domain: &str) -> Result<Vec<NextHop>, RouteError> {
        if let Some(ip) = address_literal(domain) {
            return Ok(vec![literal_hop(ip, self.mx_port)]);
        }
        let records = match self.resolver.mx_lookup(fqdn(domain)).await {
            Ok(lookup) => lookup
                .answers()
                .iter()
                .filter_map(|record| match &record.data {
                    RData::MX(mx) => Some((mx.preference, mx.exchange.to_ascii())),
                    _ => None,
                })
                .collect(),
            Err(e) if e.is_nx_domain() => {
                return Err(RouteError::Permanent(format!(
                    "550 5.1.2 domain {domain} does not exist"
                )))
            }
            Err(e) if e.is_no_records_found() => Vec::new(),
            Err(e) => return Err(temporary("MX", domain, &e)),
        };
        match order_mx(&records, &mut rand::rng()) {
            MxPlan::Null => Err(RouteError::Permanent(format!(
                "556 5.1.10 {domain} does not accept mail (null MX)"
            ))),
            MxPlan::Implicit => {
                self.only_hop(domain, self.mx_port, || {
                    RouteError::Permanent(format!(
                        "550 5.1.2 domain {domain} has no MX and no address records"
                    ))
                })
                .await
            }
            MxPlan::Hosts(hosts) => {
                let mut hops = Vec::with_capacity(hosts.len());
                let mut last_error = None;
                for host in hosts {
                    match self.addresses(&host, self.mx_port).await {
                        Ok(addrs) if !addrs.is_empty() => hops.push(NextHop { name: host, addrs }),
                        Ok(_) => {}
                        Err(e) => last_error = Some(e),
                    }
                }
                if hops.is_empty() {
                    // A broken MX set is more often a passing mistake than a
                    // final answer: defer rather than bounce.
                    return Err(match last_error {
                        Some(RouteError::Temporary(text)) => RouteError::Temporary(text),
                        _ => RouteError::Temporary(format!(
                            "451 4.4.4 no MX host of {domain} has an address"
                        )),
                    });
                }
                Ok(hops)
            }
        }
    }

    /// `host` as the one hop to try, or `no_address` when it has no
    /// address.
    async fn only_hop(
        &self,
        host: &str,
        port: u16,
        no_address: impl FnOnce() -> RouteError,
    ) -> Result<Vec<NextHop>, RouteError> {
        let addrs = self.addresses(host, port).await?;
        if addrs.is_empty() {
            return Err(no_address());
        }
        Ok(vec![NextHop {
            name: host.to_string(),
            addrs,
        }])
    }

    /// The A and AAAA addresses of `host` with `port`; none when the name
    /// has no such records or does not exist.
    async fn addresses(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, RouteError> {
        match self.resolver.lookup_ip(fqdn(host)).await {
            Ok(lookup) => Ok(lookup.iter().map(|ip| SocketAddr::new(ip, port)).collect()),
            Err(e) if e.is_no_records_found() => Ok(Vec::new()),
            Err(e) => Err(temporary("address", host, &e)),
        }
    }
}

fn literal_hop(ip: IpAddr, port: u16) -> NextHop {
    NextHop {
        name: ip.to_string(),
        addrs: vec![SocketAddr::new(ip, port)],
    }
}

/// The name with a trailing dot, so that no search domain is tried.
fn fqdn(name: &str) -> String {
    if name.ends_with('.') {
        name.to_string()
    } else {
        format!("{name}.")
    }
}

fn temporary(kind: &str, name: &str, error: &NetError) -> RouteError {
    RouteError::Temporary(format!(
        "451 4.4.3 {kind} lookup for {name} failed: {error}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse_smart_host, TlsPolicy};
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn records(list: &[(u16, &str)]) -> Vec<(u16, String)> {
        list.iter().map(|(p, n)| (*p, n.to_string())).collect()
    }

    fn hosts(plan: MxPlan) -> Vec<String> {
        match plan {
            MxPlan::Hosts(hosts) => hosts,
            other => panic!("expected hosts, got {other:?}"),
        }
    }

    #[test]
    fn mx_ordering_table() {
        let mut rng = StdRng::seed_from_u64(7);
        let cases: &[(&[(u16, &str)], MxPlan)] = &[
            (&[], MxPlan::Implicit),
            (&[(0, ".")], MxPlan::Null),
            (&[(0, "")], MxPlan::Null),
            (
                &[(20, "b.example."), (10, "A.example.")],
                MxPlan::Hosts(vec!["a.example".into(), "b.example".into()]),
            ),
            // A null MX next to real hosts is ignored.
            (
                &[(0, "."), (10, "mx.example.")],
                MxPlan::Hosts(vec!["mx.example".into()]),
            ),
            // The same host twice is tried once, at its best preference.
            (
                &[(30, "a.example."), (10, "a.example"), (20, "b.example")],
                MxPlan::Hosts(vec!["a.example".into(), "b.example".into()]),
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(&order_mx(&records(input), &mut rng), expected, "{input:?}");
        }
    }

    #[test]
    fn equal_preferences_are_shuffled_within_their_group() {
        let input = records(&[
            (10, "a1"),
            (20, "b1"),
            (10, "a2"),
            (20, "b2"),
            (10, "a3"),
            (5, "first"),
        ]);
        let mut seen_first = std::collections::HashSet::new();
        for seed in 0..64 {
            let order = hosts(order_mx(&input, &mut StdRng::seed_from_u64(seed)));
            assert_eq!(order[0], "first");
            let mut group: Vec<_> = order[1..4].to_vec();
            group.sort();
            assert_eq!(group, ["a1", "a2", "a3"]);
            let mut group: Vec<_> = order[4..].to_vec();
            group.sort();
            assert_eq!(group, ["b1", "b2"]);
            seen_first.insert(order[1].clone());
        }
        assert_eq!(
            seen_first.len(),
            3,
            "every host of a group comes first sometimes"
        );
    }

    #[test]
    fn address_literals() {
        assert_eq!(
            address_literal("[192.0.2.1]"),
            Some("192.0.2.1".parse().unwrap())
        );
        assert_eq!(
            address_literal("[IPv6:2001:db8::1]"),
            Some("2001:db8::1".parse().unwrap())
        );
        assert_eq!(address_literal("example.com"), None);
        assert_eq!(address_literal("[example.com]"), None);
    }

    fn policy(domain: &str, route: Route) -> DomainPolicy {
        DomainPolicy {
            domain: domain.into(),
            route,
            tls: TlsPolicy::Opportunistic,
            auth: None,
            max_connections: 1,
            rate: None,
            max_messages_per_connection: 1,
        }
    }

    /// A router whose name server does not answer: the paths that need no
    /// DNS must not ask it.
    fn router_without_dns() -> Router {
        Router::new(&DeliveryConfig {
            dns_servers: vec!["127.0.0.1:9".parse().unwrap()],
            mx_port: 2525,
            ..DeliveryConfig::default()
        })
        .unwrap()
    }

    #[tokio::test]
    async fn ip_smart_hosts_and_literals_need_no_dns() {
        let router = router_without_dns();
        let smart = parse_smart_host("[192.0.2.7]:2600").unwrap();
        assert_eq!(
            router
                .next_hops(&policy("example.com", Route::SmartHost(smart)))
                .await
                .unwrap(),
            vec![NextHop {
                name: "192.0.2.7".into(),
                addrs: vec!["192.0.2.7:2600".parse().unwrap()],
            }]
        );
        assert_eq!(
            router
                .next_hops(&policy("[IPv6:2001:db8::5]", Route::Mx))
                .await
                .unwrap(),
            vec![NextHop {
                name: "2001:db8::5".into(),
                addrs: vec!["[2001:db8::5]:2525".parse().unwrap()],
            }]
        );
        assert_eq!(
            router
                .next_hops(&policy("local.test", Route::Local("/tmp".into())))
                .await
                .unwrap(),
            vec![]
        );
    }

    #[tokio::test]
    async fn an_unanswering_name_server_is_a_temporary_failure() {
        let config = DeliveryConfig {
            dns_servers: vec!["127.0.0.1:9".parse().unwrap()],
            ..DeliveryConfig::default()
        };
        let router = Router::with_options(&config, |options| {
            options.timeout = std::time::Duration::from_millis(200);
            options.attempts = 1;
        })
        .unwrap();
        let err = router
            .next_hops(&policy("example.com", Route::Mx))
            .await
            .unwrap_err();
        assert!(!err.is_permanent(), "{err}");
        assert!(err.to_string().starts_with("451 4.4.3 "), "{err}");
    }
}
