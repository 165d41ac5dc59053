//! Three nodes on one Redis: the real binary three times as `smarthost
//! node` (each its own `node.id`, SMTP and admin port) and once as
//! `smarthost coordinator`, one real `redis-server` with an fsync per
//! write, and one aiosmtpd sink as the smart host of three domains,
//! answering after a short pause so that connections overlap. The test of
//! a cut link runs three `smarthost run` instead.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use smarthost_testkit::redis::RedisServer;
use smarthost_tests::http;
use smarthost_tests::proxy::Proxy;
use smarthost_tests::scenario::{delivered_per_node, route, start_as, Setup};
use smarthost_tests::sink::{Sink, SinkOptions};
use smarthost_tests::traffic::{
    arrivals, subject_and_recipient, submit, submit_all, wait_for_all, DOMAINS,
};

/// The cluster-wide cap on connections to one domain.
const CAP: u64 = 2;
/// Client threads submitting at once.
const SUBMITTERS: usize = 6;
/// Duplicates tolerated (deliveries are at least once), printed when seen.
const HANDFUL: usize = 5;

/// `smarthost COMMAND` on `redis_url` with the smart host of all three
/// domains at `sink`, at most two connections to each domain, and the
/// given delivery lease and node timeout.
fn start(
    command: &'static str,
    redis_url: &str,
    sink: &Sink,
    id: &str,
    lease: &str,
    node_timeout: &str,
) -> Setup {
    let routes: String = DOMAINS.iter().map(|d| route(d, sink)).collect();
    start_as(
        command,
        tempfile::tempdir().unwrap(),
        // Slots of a killed node free up after 3 s instead of 30 s.
        &format!("max_connections_per_domain = {CAP}\nconnection_lease = \"3s\""),
        &routes,
        &[
            ("SMARTHOST__QUEUE__BACKEND", "redis"),
            ("SMARTHOST__QUEUE__REDIS_URL", redis_url),
            ("SMARTHOST__QUEUE__REDIS_RESPONSE_TIMEOUT", "1s"),
            ("SMARTHOST__QUEUE__RETRY_INTERVALS", "1s"),
            ("SMARTHOST__QUEUE__LEASE", lease),
            ("SMARTHOST__QUEUE__NODE_TIMEOUT", node_timeout),
            ("SMARTHOST__NODE__ID", id),
        ],
    )
}

/// `smarthost run` (node and coordinator in one process).
fn node(redis_url: &str, sink: &Sink, id: &str, lease: &str) -> Setup {
    start("run", redis_url, sink, id, lease, "30s")
}

/// Three `smarthost node` processes and one `smarthost coordinator`, as a
/// cluster is deployed; nodes are dead 3 s after their last heartbeat.
struct Cluster {
    nodes: Vec<Setup>,
    coordinator: Setup,
}

fn cluster(redis: &RedisServer, sink: &Sink, lease: &str) -> Cluster {
    let coordinator = start("coordinator", &redis.url(), sink, "coord", lease, "3s");
    let nodes = ["node-a", "node-b", "node-c"]
        .iter()
        .map(|id| start("node", &redis.url(), sink, id, lease, "3s"))
        .collect();
    Cluster { nodes, coordinator }
}

fn sink() -> Sink {
    Sink::start(SinkOptions::default().delay(Duration::from_millis(20)))
}

/// Waits (at most `timeout`) until every one of `subjects` arrived, then a
/// little longer for late duplicates; panics on a loss or on more than a
/// handful of duplicates, which it prints. Returns the duplicates.
fn assert_all_arrived(
    sink: &Sink,
    subjects: &[String],
    timeout: Duration,
    nodes: &[Setup],
) -> usize {
    wait_for_all(sink, subjects, timeout, "every accepted message", nodes);
    // A delivery done twice would show up within a few retry ticks.
    std::thread::sleep(Duration::from_secs(3));
    let duplicates: Vec<(String, usize)> = arrivals(sink)
        .into_iter()
        .filter(|(s, n)| *n > 1 && subjects.contains(s))
        .collect();
    let extra: usize = duplicates.iter().map(|(_, n)| n - 1).sum();
    if extra > 0 {
        eprintln!("duplicates (at least once): {duplicates:?}");
    }
    assert!(extra <= HANDFUL, "{extra} duplicates: {duplicates:?}");
    extra
}

/// Prints how many deliveries each node logged, to show the work spread.
fn print_spread(nodes: &[Setup]) {
    eprintln!("delivered per node: {:?}", delivered_per_node(nodes));
}

#[track_caller]
fn assert_cap_held(sink: &Sink) {
    let stats = sink.stats();
    eprintln!("sink: {stats:?}");
    for domain in DOMAINS {
        let peak = stats.peak_concurrent_by_domain.get(domain).copied();
        assert!(peak.is_some(), "no connection for {domain}: {stats:?}");
        assert!(peak <= Some(CAP), "{domain} above the cap: {stats:?}");
    }
}

#[test]
fn three_nodes_share_the_queue_and_the_domain_caps() {
    let redis = RedisServer::start();
    let sink = sink();
    let Cluster { nodes, coordinator } = cluster(&redis, &sink, "15m");
    let addrs: Vec<SocketAddr> = nodes.iter().map(|s| s.relay.smtp).collect();
    let watch = WorkInFlight::watch(coordinator.relay.admin_addr());
    let subjects = submit_all(&addrs, "shared", 600, SUBMITTERS);
    let duplicates = assert_all_arrived(&sink, &subjects, Duration::from_secs(90), &nodes);
    eprintln!("duplicates: {duplicates}");
    watch.assert_spread_over(&["node-a", "node-b", "node-c"]);
    print_spread(&nodes);
    assert_cap_held(&sink);
    assert!(
        coordinator.relay.log().contains("coordinator: leading"),
        "{}",
        coordinator.relay.log()
    );
    // Any node tells who is in the cluster and who leads.
    let out = nodes[1].relay.cli(&["queue", "nodes"], &[]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "coord   alive  leader\nnode-a  alive\nnode-b  alive\nnode-c  alive\n"
    );
    let out = nodes[1].relay.cli(&["queue", "nodes", "--json"], &[]);
    let view: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(view["leader"], "coord", "{view}");
    assert_eq!(view["live"].as_array().map(Vec::len), Some(4), "{view}");
    assert_metrics_add_up(&nodes, &coordinator, &sink, &redis, subjects.len());
    the_sessions_of_every_node_are_shown_by_any(&nodes, &coordinator);
}

/// `in_flight_by_node` of `GET /api/v1/queue`, sampled every 50 ms (for at
/// most 3 minutes) while the cluster works.
struct WorkInFlight {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sampler: std::thread::JoinHandle<Vec<serde_json::Value>>,
}

impl WorkInFlight {
    fn watch(admin: SocketAddr) -> WorkInFlight {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let sampler = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(180);
            let mut samples = Vec::new();
            while !stopped.load(Ordering::Relaxed) && Instant::now() < deadline {
                let queue = http::get(admin, "/api/v1/queue", None).json();
                if queue["in_flight"].as_u64() > Some(0) {
                    samples.push(queue["in_flight_by_node"].clone());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            samples
        });
        WorkInFlight { stop, sampler }
    }

    /// Work was seen in flight, only on these nodes, and on more than one
    /// of them.
    fn assert_spread_over(self, nodes: &[&str]) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let samples = self.sampler.join().unwrap();
        assert!(!samples.is_empty(), "no work ever seen in flight");
        let mut seen = std::collections::BTreeSet::new();
        for sample in &samples {
            let by_node = sample.as_object().expect("in_flight_by_node: an object");
            for (node, n) in by_node {
                assert!(nodes.contains(&node.as_str()), "{node} in {sample}");
                assert!(n.as_u64() > Some(0), "{sample}");
                seen.insert(node.clone());
            }
        }
        eprintln!(
            "in flight by node: {} samples, nodes {seen:?}",
            samples.len()
        );
        assert!(seen.len() >= 2, "work in flight on {seen:?} only");
    }
}

/// A session on node-a and one on node-c are listed by node-b and by the
/// coordinator (from the board, within a publishing period), each with
/// its node, and leave the list when they end.
fn the_sessions_of_every_node_are_shown_by_any(nodes: &[Setup], coordinator: &Setup) {
    use smarthost_tests::smtp::Client;
    let open = |node: &Setup, helo: &str| {
        let (mut client, _) = Client::connect(node.relay.smtp);
        client.expect(&format!("EHLO {helo}"), 250);
        client
    };
    let mut a = open(&nodes[0], "client-a.example");
    let mut c = open(&nodes[2], "client-c.example");
    let shown = |asked: &Setup| -> Vec<(String, String)> {
        let views = http::get(asked.relay.admin_addr(), "/api/v1/sessions", None).json();
        let mut pairs: Vec<(String, String)> = views
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                (
                    v["node"].as_str().unwrap().to_string(),
                    v["helo"].as_str().unwrap_or("-").to_string(),
                )
            })
            .collect();
        pairs.sort();
        pairs
    };
    let expected = vec![
        ("node-a".to_string(), "client-a.example".to_string()),
        ("node-c".to_string(), "client-c.example".to_string()),
    ];
    for asked in [&nodes[1], coordinator] {
        let deadline = Instant::now() + Duration::from_secs(15);
        while shown(asked) != expected {
            assert!(Instant::now() < deadline, "{:?}", shown(asked));
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    a.expect("QUIT", 221);
    c.expect("QUIT", 221);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !shown(&nodes[1]).is_empty() {
        assert!(Instant::now() < deadline, "{:?}", shown(&nodes[1]));
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The nodes' `/metrics` count what they took and delivered; only the
/// leading coordinator shows the shared queue, so a sum over all counts it
/// once.
fn assert_metrics_add_up(
    nodes: &[Setup],
    coordinator: &Setup,
    sink: &Sink,
    redis: &RedisServer,
    accepted: usize,
) {
    let scrape = |setup: &Setup| {
        let page = http::get(setup.relay.admin_addr(), "/metrics", None);
        assert_eq!(page.status, 200, "{page:?}");
        page.samples()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let leader = loop {
        let leader = scrape(coordinator);
        if leader.get("smarthost_queue_messages") == Some(&0.0) {
            break leader;
        }
        assert!(
            Instant::now() < deadline,
            "the queue never emptied: {leader:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(leader.get("smarthost_coordinator_leader"), Some(&1.0));
    let (mut received, mut delivered, mut news) = (0.0, 0.0, 0.0);
    let sent = |samples: &std::collections::BTreeMap<String, f64>, component: &str| {
        let key = format!("smarthost_redis_commands_total{{component=\"{component}\"}}");
        samples.get(&key).copied().unwrap_or(0.0)
    };
    let mut schedule_commands = sent(&leader, "schedule");
    let mut all_commands = schedule_commands + sent(&leader, "spool");
    for node in nodes {
        let samples = scrape(node);
        assert!(sent(&samples, "spool") > 0.0, "{samples:#?}");
        schedule_commands += sent(&samples, "schedule");
        all_commands += sent(&samples, "spool") + sent(&samples, "schedule");
        assert_eq!(
            samples.get("smarthost_ready_news_subscribed"),
            Some(&1.0),
            "each node hears the others' ready news: {samples:?}"
        );
        news += samples
            .get("smarthost_ready_news_total")
            .copied()
            .unwrap_or(0.0);
        assert_eq!(samples.get("smarthost_coordinator_leader"), Some(&0.0));
        assert!(
            !samples.keys().any(|k| k.starts_with("smarthost_queue_")),
            "a node that does not lead shows no queue: {samples:#?}"
        );
        received += samples["smarthost_messages_received_total"];
        // A node may have delivered nothing: others held the domains' caps.
        let its_deliveries = samples
            .get("smarthost_recipient_outcomes_total{outcome=\"delivered\"}")
            .copied()
            .unwrap_or(0.0);
        // One that delivered took and completed through its schedule.
        assert!(
            its_deliveries == 0.0 || sent(&samples, "schedule") > 0.0,
            "{its_deliveries} delivered without a schedule command: {samples:#?}"
        );
        delivered += its_deliveries;
    }
    assert_eq!(received, accepted as f64);
    // The server ran every command the processes say they sent (and
    // more: the scripts' own, this test's).
    let stats = smarthost_testkit::redis::command(redis.port(), &["INFO", "stats"]).unwrap();
    let processed: f64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    eprintln!(
        "Redis commands: {all_commands} sent ({schedule_commands} by the schedules), \
         {processed} run by the server, for {accepted} messages"
    );
    assert!(
        (1.0..=processed).contains(&all_commands),
        "the processes sent {all_commands} commands, the server ran {processed}"
    );
    // Each domain's first message, queued on one node, is news to the two
    // others.
    assert!(news > 0.0, "no node heard of another's work at once");
    // At least once: a duplicate may have been delivered and recorded.
    let arrived: usize = sink.messages().iter().map(|m| m.rcpt_tos.len()).sum();
    assert!(
        (accepted as f64..=arrived as f64).contains(&delivered),
        "{delivered} delivered by the nodes' count, {accepted} accepted, {arrived} arrived"
    );
}

#[test]
fn a_node_killed_mid_run_loses_nothing() {
    let redis = RedisServer::start();
    let sink = sink();
    // Leases far longer than the test: only the coordinator's finding the
    // node dead can give its deliveries to the others.
    let Cluster {
        mut nodes,
        coordinator,
    } = cluster(&redis, &sink, "10m");
    let addrs: Vec<SocketAddr> = nodes.iter().map(|s| s.relay.smtp).collect();
    let subjects = submit_all(&addrs, "killed", 300, SUBMITTERS);
    sink.wait_for(100, Duration::from_secs(60));
    nodes[0].relay.kill();
    let killed = Instant::now();
    let at_kill = sink.messages().len();
    eprintln!("node-a killed with {at_kill} of 300 at the sink");
    assert!(at_kill < 300, "everything arrived before the kill");
    let duplicates = assert_all_arrived(&sink, &subjects, Duration::from_secs(60), &nodes);
    eprintln!(
        "duplicates: {duplicates}; the rest arrived within {:?} of the kill (3 s of that waiting for duplicates)",
        killed.elapsed()
    );
    print_spread(&nodes);
    assert_cap_held(&sink);
    let log = coordinator.relay.log();
    assert!(log.contains("coordinator: node is dead"), "{log}");
    let out = nodes[1].relay.cli(&["queue", "nodes"], &[]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("node-a  dead\n"),
        "{out:?}"
    );
    eprintln!(
        "{}",
        log.lines()
            .filter(|l| l.contains("dead node"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn a_node_cut_from_redis_stops_accepting_while_the_others_carry_on() {
    let redis = RedisServer::start();
    let redis_addr: SocketAddr = redis
        .url()
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .parse()
        .unwrap();
    let proxy = Proxy::start(redis_addr);
    let sink = sink();
    let cut_url = format!("redis://{}/", proxy.addr());
    let nodes = vec![
        node(&redis.url(), &sink, "node-a", "3s"),
        node(&redis.url(), &sink, "node-b", "3s"),
        node(&cut_url, &sink, "node-c", "3s"),
    ];
    let addrs: Vec<SocketAddr> = nodes.iter().map(|s| s.relay.smtp).collect();
    let (others, cut) = (&addrs[..2], addrs[2]);

    let mut accepted = submit_all(&addrs, "before", 30, SUBMITTERS);

    proxy.cut();
    let mut refused = Vec::new();
    for n in 0..5 {
        let (subject, to) = subject_and_recipient("refused", n);
        let code = submit(cut, &subject, &to);
        assert!((400..500).contains(&code), "{subject}: {code}");
        eprintln!("{subject}: {code}");
        refused.push(subject);
    }
    let during = submit_all(others, "during", 60, SUBMITTERS);
    accepted.extend(during.iter().cloned());
    // The other two deliver what they took while the node is still cut off.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = arrivals(&sink);
        if during.iter().all(|s| got.contains_key(s)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "mail taken by the others did not arrive while one node was cut off: {:?}",
            sink.stats()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for n in 5..8 {
        let (subject, to) = subject_and_recipient("refused", n);
        let code = submit(cut, &subject, &to);
        assert!((400..500).contains(&code), "{subject}: {code}");
        refused.push(subject);
    }

    proxy.restore();
    let restored = Instant::now();
    let mut n = 0;
    loop {
        let (subject, to) = subject_and_recipient("after", n);
        n += 1;
        let code = submit(cut, &subject, &to);
        if code == 250 {
            accepted.push(subject);
            break;
        }
        assert!((400..500).contains(&code), "{subject}: {code}");
        refused.push(subject);
        assert!(
            restored.elapsed() < Duration::from_secs(30),
            "the node did not accept again within 30 s of the restore:\n{}",
            nodes[2].relay.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "the cut node accepted again {:?} after the restore, after {} refusals",
        restored.elapsed(),
        n - 1
    );
    for n in 0..10 {
        let (subject, to) = subject_and_recipient("later", n);
        assert_eq!(submit(cut, &subject, &to), 250, "{subject}");
        accepted.push(subject);
    }

    let duplicates = assert_all_arrived(&sink, &accepted, Duration::from_secs(60), &nodes);
    let got = arrivals(&sink);
    let refused_delivered: Vec<&String> = refused.iter().filter(|s| got.contains_key(*s)).collect();
    eprintln!(
        "duplicates: {duplicates}; refused but delivered: {refused_delivered:?}; sink: {:?}",
        sink.stats()
    );
    print_spread(&nodes);
}

#[test]
fn the_coordinator_promotes_retries_and_expires_old_mail_for_the_nodes() {
    let redis = RedisServer::start();
    // The first DATA is refused for now, every later one accepted.
    let sink = Sink::start(SinkOptions::default().script(serde_json::json!({"data": [451, 250]})));
    let routes: String = ["a.test", "b.test", "sender.test"]
        .iter()
        .map(|d| route(d, &sink))
        .collect();
    let url = redis.url();
    let launch = |command: &'static str, id: &str| {
        let env = [
            ("SMARTHOST__QUEUE__BACKEND", "redis"),
            ("SMARTHOST__QUEUE__REDIS_URL", &*url),
            ("SMARTHOST__QUEUE__RETRY_INTERVALS", "1s"),
            ("SMARTHOST__QUEUE__MAX_LIFETIME", "10s"),
            ("SMARTHOST__QUEUE__NODE_TIMEOUT", "3s"),
            ("SMARTHOST__NODE__ID", id),
        ];
        start_as(command, tempfile::tempdir().unwrap(), "", &routes, &env)
    };
    let nodes = [launch("node", "node-a"), launch("node", "node-b")];
    let out = nodes[0].relay.cli(&["queue", "suspend", "b.test"], &[]);
    assert!(out.status.success(), "{out:?}");

    // Without a coordinator nothing expires and no retry is promoted.
    assert_eq!(submit(nodes[0].relay.smtp, "old", "user@b.test"), 250);
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(submit(nodes[1].relay.smtp, "retried", "user@a.test"), 250);
    std::thread::sleep(Duration::from_secs(3));
    assert!(sink.messages().is_empty(), "{:?}", sink.stats());
    assert!(
        nodes
            .iter()
            .any(|n| n.relay.log().contains("no coordinator leads the cluster")),
        "no node warned that nobody leads"
    );

    // The coordinator comes: the retry is promoted and delivered, the old
    // message (suspended, past its lifetime) expires with a report, which
    // a node delivers.
    let coordinator = launch("coordinator", "coord");
    let got = sink.wait_for(2, Duration::from_secs(20));
    let retried = got
        .iter()
        .find(|m| m.header("Subject").as_deref() == Some("retried"))
        .unwrap_or_else(|| panic!("the retry never came: {got:?}"));
    assert_eq!(retried.rcpt_tos, ["user@a.test"]);
    let report = got
        .iter()
        .find(|m| m.mail_from.is_empty())
        .unwrap_or_else(|| panic!("no report: {got:?}\n{}", coordinator.relay.log()));
    assert_eq!(report.rcpt_tos, ["app@sender.test"]);
    assert!(report.text().contains("user@b.test"), "{}", report.text());
    assert!(coordinator.relay.log().contains("delivery expired"));
}
