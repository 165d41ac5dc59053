//! A node on `queue.backend = "redis"`: the real binary, a real
//! `redis-server` with an fsync per write, and an aiosmtpd sink as the
//! smart host.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use smarthost_testkit::redis::RedisServer;
use smarthost_tests::relay::free_port;
use smarthost_tests::scenario::{dot_stuff, message, start_with_env, Setup, ARRIVAL};
use smarthost_tests::sink::{Sink, SinkOptions};
use smarthost_tests::smtp::{queued_id, Client};

/// A relay on `redis` whose mail all goes to `smart_host`, as node `id`.
fn node(redis: &RedisServer, smart_host: &str, id: &str, extra_env: &[(&str, &str)]) -> Setup {
    let url = redis.url();
    let mut env = vec![
        ("SMARTHOST__QUEUE__BACKEND", "redis"),
        ("SMARTHOST__QUEUE__REDIS_URL", url.as_str()),
        ("SMARTHOST__QUEUE__REDIS_RESPONSE_TIMEOUT", "1s"),
        ("SMARTHOST__QUEUE__RETRY_INTERVALS", "1s"),
        ("SMARTHOST__NODE__ID", id),
    ];
    env.extend_from_slice(extra_env);
    start_with_env(
        tempfile::tempdir().unwrap(),
        &format!("smart_host = \"{smart_host}\""),
        "",
        &env,
    )
}

/// Submits one message with subject `subject`; returns the final reply code.
fn try_submit(setup: &Setup, subject: &str) -> u16 {
    let (mut c, greeting) = Client::connect(setup.relay.smtp);
    assert_eq!(greeting.code, 220);
    c.expect("EHLO app.example", 250);
    let text = message("user@example.org", subject, "Hello.\r\n");
    let reply = c.send_message("app@sender.test", &["user@example.org"], &dot_stuff(&text));
    if reply.code == 250 {
        queued_id(&reply);
    } else {
        assert_eq!(reply.status(), Some("4.3.0"), "{reply:?}");
    }
    let _ = c.cmd("QUIT");
    reply.code
}

fn submit_ok(setup: &Setup, subject: &str) {
    let code = try_submit(setup, subject);
    assert_eq!(code, 250, "{subject} not accepted:\n{}", setup.relay.log());
}

/// Waits for every one of `subjects` at the sink, then a little longer,
/// and checks that each arrived exactly once and nothing else did, but
/// for messages refused with `451` whose subject starts with `while`: a
/// store that Redis carried out after the node stopped waiting is
/// delivered (at most once); the client was told to try again.
fn assert_each_delivered_once(sink: &Sink, subjects: &[String], node: &Setup) {
    let arrived = || {
        let mut got: BTreeMap<String, usize> = BTreeMap::new();
        for m in sink.messages() {
            *got.entry(m.header("Subject").unwrap_or_default())
                .or_default() += 1;
        }
        got
    };
    let deadline = Instant::now() + ARRIVAL + ARRIVAL;
    while !subjects.iter().all(|s| arrived().contains_key(s)) {
        assert!(
            Instant::now() < deadline,
            "missing after {:?}: {:?}\n{}",
            ARRIVAL + ARRIVAL,
            subjects
                .iter()
                .filter(|s| !arrived().contains_key(*s))
                .collect::<Vec<_>>(),
            node.relay.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Anything delivered twice would show up within a few retry ticks.
    std::thread::sleep(Duration::from_secs(2));
    let mut got = arrived();
    let want: BTreeMap<String, usize> = subjects.iter().map(|s| (s.clone(), 1)).collect();
    let refused = |s: &String| s.starts_with("while");
    assert!(got.iter().all(|(s, n)| !refused(s) || *n == 1), "{got:?}");
    got.retain(|s, _| !refused(s));
    assert_eq!(got, want);
}

#[test]
fn a_node_on_redis_delivers_every_message_once() {
    let redis = RedisServer::start();
    let sink = Sink::start(SinkOptions::default());
    let setup = node(&redis, &sink.smart_host(), "node-a", &[]);
    let subjects: Vec<String> = (0..50).map(|n| format!("message {n}")).collect();
    for subject in &subjects {
        submit_ok(&setup, subject);
    }
    assert_each_delivered_once(&sink, &subjects, &setup);
}

#[test]
fn without_redis_mail_is_refused_for_now_and_nothing_accepted_is_lost() {
    let mut redis = RedisServer::start();
    // Nothing listens at the smart host yet: what is accepted stays queued.
    let port = free_port();
    let setup = node(&redis, &format!("[127.0.0.1]:{port}"), "node-a", &[]);
    let mut subjects: Vec<String> = (0..10).map(|n| format!("before {n}")).collect();
    for subject in &subjects {
        submit_ok(&setup, subject);
    }

    // A hung Redis, then a dead one: never a 250.
    redis.pause();
    assert_eq!(try_submit(&setup, "while paused"), 451);
    redis.kill();
    // Down for ten seconds: every attempt meanwhile is refused.
    let down_since = Instant::now();
    let mut n = 0;
    while down_since.elapsed() < Duration::from_secs(10) && n < 20 {
        assert_eq!(try_submit(&setup, &format!("while down {n}")), 451);
        n += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(n >= 3, "only {n} attempts while Redis was down");

    // Back from its AOF on the same port: the node accepts again by itself.
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut n = 0;
    loop {
        let subject = format!("after {n}");
        n += 1;
        if try_submit(&setup, &subject) == 250 {
            subjects.push(subject);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never accepted again:\n{}",
            setup.relay.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for n in 0..5 {
        let subject = format!("later {n}");
        submit_ok(&setup, &subject);
        subjects.push(subject);
    }

    let sink = Sink::start(SinkOptions::default().port(port));
    assert_each_delivered_once(&sink, &subjects, &setup);
}

#[test]
fn another_node_delivers_what_a_killed_node_had_in_flight() {
    let redis = RedisServer::start();
    // A smart host that accepts connections and never says a word: the
    // first node's deliveries hang in flight, under its leases.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap();
    // The thread keeps every connection open until the test process ends.
    std::thread::spawn(move || {
        let open: Vec<_> = silent.incoming().map_while(Result::ok).collect();
        drop(open);
    });
    let lease = [("SMARTHOST__QUEUE__LEASE", "3s")];
    let mut first = node(
        &redis,
        &format!("[127.0.0.1]:{}", silent_addr.port()),
        "node-a",
        &lease,
    );
    let subjects: Vec<String> = (0..10).map(|n| format!("in flight {n}")).collect();
    for subject in &subjects {
        submit_ok(&first, subject);
    }
    // Wait until the first node is connected (its work leased), then crash it.
    std::thread::sleep(Duration::from_secs(2));
    first.relay.kill();

    let sink = Sink::start(SinkOptions::default());
    let second = node(&redis, &sink.smart_host(), "node-b", &lease);
    assert_each_delivered_once(&sink, &subjects, &second);
    assert!(
        second
            .relay
            .log()
            .contains("reclaimed deliveries whose lease ran out"),
        "{}",
        second.relay.log()
    );
}

#[test]
fn with_a_replica_required_mail_waits_for_it_and_is_refused_without_it() {
    let primary = RedisServer::start();
    let replica = primary.start_replica();
    let sink = Sink::start(SinkOptions::default());
    let setup = node(
        &primary,
        &sink.smart_host(),
        "node-a",
        &[("SMARTHOST__QUEUE__REDIS_MIN_REPLICAS", "1")],
    );
    // Until the replica is in sync nothing is acknowledged; then all is.
    // A refused message may have been stored all the same (the primary
    // has it, the replica did not confirm in time): it is delivered, and
    // so is the client's next try, under its own subject here.
    let mut subjects = Vec::new();
    submit_until_accepted(&setup, "while syncing", &mut subjects);
    for n in 0..5 {
        let subject = format!("replicated {n}");
        submit_ok(&setup, &subject);
        subjects.push(subject);
    }

    // The replica stops answering: the node refuses for now.
    replica.pause();
    assert_eq!(try_submit(&setup, "while the replica is away"), 451);
    replica.resume();
    submit_until_accepted(&setup, "while resyncing", &mut subjects);
    assert_each_delivered_once(&sink, &subjects, &setup);
}

/// Submits `<tag> <n>` for n = 0, 1, … until one is accepted (within
/// 15 s) and adds that one, renamed `accepted <tag>`, to `subjects`: the
/// refused ones keep a subject starting with "while".
fn submit_until_accepted(setup: &Setup, tag: &str, subjects: &mut Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(15);
    for n in 0.. {
        if try_submit(setup, &format!("{tag} {n}")) != 250 {
            assert!(Instant::now() < deadline, "{}", setup.relay.log());
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        // Accepted: not a refused one after all.
        let accepted = format!("accepted {tag} {n}");
        submit_ok(setup, &accepted);
        subjects.push(accepted);
        return;
    }
}

/// Two nodes on one Redis whose mail goes to `sink`, retrying after an
/// hour, and a message to user@example.org accepted by the first; returns
/// the nodes and the message's path in the admin API once the second node
/// shows it deferred after one attempt.
fn deferred_on_two_nodes(
    redis: &RedisServer,
    sink: &Sink,
    subject: &str,
) -> (Setup, Setup, String) {
    let hour = [("SMARTHOST__QUEUE__RETRY_INTERVALS", "1h")];
    let a = node(redis, &sink.smart_host(), "node-a", &hour);
    let b = node(redis, &sink.smart_host(), "node-b", &hour);
    let (mut c, _) = Client::connect(a.relay.smtp);
    c.expect("EHLO app.example", 250);
    let text = message("user@example.org", subject, "Hello.\r\n");
    let id = queued_id(&c.send_message("app@sender.test", &["user@example.org"], &text));
    let _ = c.cmd("QUIT");
    let path = format!("/api/v1/messages/{id}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let view = smarthost_tests::http::get(b.relay.admin_addr(), &path, None).json();
        if view["recipients"][0]["state"] == "deferred" {
            assert_eq!(view["recipients"][0]["attempts"], 1, "{view}");
            return (a, b, path);
        }
        assert!(Instant::now() < deadline, "never deferred: {view}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// On a shared queue any node shows and retries any message: one node
/// accepts a message the smart host defers (with an hour to wait), a
/// second node shows where it stands and retries it, and it is
/// delivered once.
#[test]
fn any_node_shows_and_retries_a_message_of_the_shared_queue() {
    let redis = RedisServer::start();
    let sink = Sink::start(
        SinkOptions::default()
            .script(serde_json::json!({"rcpt": {"user@example.org": [451, 250]}})),
    );
    let (_a, b, path) = deferred_on_two_nodes(&redis, &sink, "shown and retried");
    assert!(sink.messages().is_empty());

    let retried = smarthost_tests::http::post(b.relay.admin_addr(), &format!("{path}/retry"), None);
    assert_eq!(retried.status, 200, "{retried:?}");
    assert_eq!(retried.json()["deliveries"], 1);
    let arrived = sink.wait_for(1, ARRIVAL);
    assert_eq!(arrived.len(), 1);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(sink.messages().len(), 1, "delivered once");
}

/// On a shared queue any node deletes any message: the message one node
/// accepted (deferred for an hour) is deleted through another, whose
/// report reaches the sender; the queue ends empty on both.
#[test]
fn any_node_deletes_a_message_of_the_shared_queue_and_the_sender_hears() {
    let redis = RedisServer::start();
    let sink = Sink::start(
        SinkOptions::default().script(serde_json::json!({"rcpt": {"user@example.org": [451]}})),
    );
    let (a, b, path) = deferred_on_two_nodes(&redis, &sink, "deleted elsewhere");
    let deleted = smarthost_tests::http::request(b.relay.admin_addr(), "DELETE", &path, None);
    assert_eq!(deleted.status, 200, "{deleted:?}");
    assert_eq!(deleted.json()["recipients"], 1);
    let report = sink.wait_for(1, ARRIVAL);
    assert_eq!(report[0].rcpt_tos, ["app@sender.test"]);
    assert_eq!(report[0].mail_from, "");
    for node in [&a, &b] {
        let gone = smarthost_tests::http::get(node.relay.admin_addr(), &path, None);
        assert_eq!(gone.status, 404, "{gone:?}");
    }
    let queued = smarthost_tests::http::get(a.relay.admin_addr(), "/api/v1/queue", None).json();
    assert_eq!(queued["messages"], 0, "{queued}");
}
