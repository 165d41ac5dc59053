//! Delivery webhooks against the real binary and a real HTTP endpoint:
//! every event of every recipient reaches an endpoint that was down for a
//! while once it is back, signed (the signatures are checked here); and a
//! node killed in the middle of a run loses none, on the local spool and
//! on Redis.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use smarthost_testkit::free_port;
use smarthost_testkit::redis::RedisServer;
use smarthost_tests::http;
use smarthost_tests::scenario::{dot_stuff, message, route, start_as, submit, Setup};
use smarthost_tests::sink::{Sink, SinkOptions};
use smarthost_tests::webhook::{by_recipient, Receiver};

const SECRET: &str = "a-webhook-secret-of-some-length";
const SHOP_SECRET: &str = "the-shop-endpoint-secret";

/// `[webhooks]` with the endpoint `all` (every event of all mail) at
/// `addr/all`, and `shop` (the key `shop`'s deliveries and bounces only)
/// at `addr/shop`.
fn webhooks(addr: SocketAddr) -> String {
    format!(
        "[webhooks]\nmax_retry_interval = \"2s\"\ntimeout = \"2s\"\n\n\
         [[webhooks.endpoints]]\nname = \"all\"\nurl = \"http://{addr}/all\"\nsecret = \"{SECRET}\"\n\n\
         [[webhooks.endpoints]]\nname = \"shop\"\nurl = \"http://{addr}/shop\"\nsecret = \"{SHOP_SECRET}\"\n\
         accounts = [\"shop\"]\nevents = [\"delivered\", \"bounced\"]\n"
    )
}

fn relay(sink: &Sink, hook: SocketAddr, env: &[(&str, &str)]) -> Setup {
    let sections = format!(
        "{}\n{}\n[[api.keys]]\nname = \"shop\"\ntoken_hash = \"{}\"\nsenders = [\"shop.example\"]\n\n{}",
        route("example.org", sink),
        route("sender.test", sink),
        http::token_hash("shop-token"),
        webhooks(hook),
    );
    let mut env = env.to_vec();
    env.push(("SMARTHOST__QUEUE__RETRY_INTERVALS", "1s"));
    start_as("run", tempfile::tempdir().unwrap(), "", &sections, &env)
}

fn key(recipient: &str, event: &str) -> (String, String) {
    (recipient.to_string(), event.to_string())
}

#[test]
fn a_down_endpoint_gets_every_event_once_it_is_up() {
    let sink = Sink::start(SinkOptions {
        script: Some(serde_json::json!({"rcpt": {
            "bad@example.org": "550 5.1.1 No such user (scripted)",
            "later@example.org": [451, 250],
        }})),
        ..SinkOptions::default()
    });
    let hook = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let setup = relay(&sink, hook, &[]);
    let out = setup
        .relay
        .cli(&["suppression", "add", "gone@example.org"], &[]);
    assert!(out.status.success(), "{out:?}");

    let recipients = [
        "ok@example.org",
        "bad@example.org",
        "later@example.org",
        "gone@example.org",
    ];
    let id = submit(
        &setup.relay,
        "app@sender.test",
        &recipients,
        &dot_stuff(&message("ok@example.org", "hello", "Hello.\r\n")),
    );
    let sent = http::send_with(
        setup.relay.admin_addr(),
        "POST",
        "/api/v1/send",
        Some("shop-token"),
        &[],
        "application/json",
        serde_json::json!({
            "from": "orders@shop.example",
            "to": ["buyer@example.org"],
            "subject": "Shipped",
            "text": "Your order has shipped.\n",
        })
        .to_string()
        .as_bytes(),
    );
    assert_eq!(sent.status, 200, "{}", sent.body);
    let api_id = sent.json()["id"].as_str().unwrap().to_string();

    // ok, later (second try), buyer, and the bounce to app@sender.test.
    sink.wait_for(4, Duration::from_secs(30));
    // The endpoint is down meanwhile: posts fail and are tried again.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !http::get(setup.relay.admin_addr(), "/metrics", None)
        .body
        .contains("smarthost_webhook_posts_total{endpoint=\"all\",result=\"failed\"}")
    {
        assert!(Instant::now() < deadline, "no failed post seen");
        std::thread::sleep(Duration::from_millis(200));
    }

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("posts.jsonl");
    let receiver = Receiver::start(hook, &out, 200);
    let mut expected: BTreeMap<(String, String), usize> = BTreeMap::new();
    for r in recipients {
        expected.insert(key(r, "accepted"), 1);
    }
    expected.insert(key("ok@example.org", "delivered"), 1);
    expected.insert(key("bad@example.org", "bounced"), 1);
    expected.insert(key("later@example.org", "deferred"), 1);
    expected.insert(key("later@example.org", "delivered"), 1);
    expected.insert(key("gone@example.org", "suppressed"), 1);
    expected.insert(key("buyer@example.org", "accepted"), 1);
    expected.insert(key("buyer@example.org", "delivered"), 1);
    let got = receiver.wait_for("/all", SECRET, Duration::from_secs(30), |got| {
        by_recipient(got) == expected
    });
    for g in &got {
        let message = if g.recipient == "buyer@example.org" {
            &api_id
        } else {
            &id
        };
        assert_eq!(&g.message_id, message, "{:?}", g.json);
        let account = (g.recipient == "buyer@example.org").then(|| "shop".to_string());
        assert_eq!(g.account, account, "{:?}", g.json);
        match g.event.as_str() {
            "accepted" => assert_eq!(g.reply, None),
            "bounced" => assert!(g.reply.as_deref().unwrap().starts_with("550 5.1.1")),
            "suppressed" => assert!(
                g.reply.as_deref().unwrap().contains("suppression list"),
                "{:?}",
                g.json
            ),
            "deferred" => assert!(g.reply.as_deref().unwrap().starts_with("451")),
            "delivered" => assert!(g.reply.as_deref().unwrap().starts_with("250")),
            other => panic!("unexpected event {other}"),
        }
    }

    // The shop endpoint, with its own secret: the key's delivery alone.
    // Its posts are retried on their own schedule, so they may come after
    // the others.
    let shop_expected = BTreeMap::from([(key("buyer@example.org", "delivered"), 1)]);
    receiver.wait_for("/shop", SHOP_SECRET, Duration::from_secs(30), |got| {
        by_recipient(got) == shop_expected
    });
    std::thread::sleep(Duration::from_millis(500));
    let shop = receiver.events("/shop", SHOP_SECRET);
    assert_eq!(by_recipient(&shop), shop_expected);
    // Nothing more comes: every event was taken off the outbox.
    std::thread::sleep(Duration::from_secs(3));
    let metrics = http::get(setup.relay.admin_addr(), "/metrics", None).body;
    assert!(
        metrics.contains("smarthost_webhook_outbox_events 0"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("webhook"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    receiver.stop();
}

/// Mail to `count` recipients over `example.org`, a slow sink, and the
/// node killed (SIGKILL) halfway through the deliveries, then started
/// again: every recipient answered `250` has its `accepted` and its
/// `delivered` event at the endpoint.
fn killed_mid_run(env: &[(&str, &str)]) {
    let sink = Sink::start(SinkOptions {
        delay: Duration::from_millis(30),
        ..SinkOptions::default()
    });
    let hook = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("posts.jsonl");
    let receiver = Receiver::start(hook, &out, 200);
    let mut setup = relay(&sink, hook, env);

    let messages = 40;
    let mut ledger: BTreeSet<String> = BTreeSet::new();
    for n in 0..messages {
        let to = [format!("r{n}a@example.org"), format!("r{n}b@example.org")];
        let to: Vec<&str> = to.iter().map(String::as_str).collect();
        submit(
            &setup.relay,
            "app@sender.test",
            &to,
            &dot_stuff(&message(to[0], &format!("m{n}"), "Hello.\r\n")),
        );
        ledger.extend(to.iter().map(|s| s.to_string()));
    }
    // Halfway through the deliveries.
    let deadline = Instant::now() + Duration::from_secs(60);
    while sink.messages().len() < messages / 2 {
        assert!(Instant::now() < deadline, "deliveries stalled");
        std::thread::sleep(Duration::from_millis(20));
    }
    setup.relay.kill();
    let before = sink.messages().len();
    assert!(before < messages, "the run was over before the kill");
    setup.relay.launch();

    let got = receiver.wait_for("/all", SECRET, Duration::from_secs(90), |got| {
        let seen = by_recipient(got);
        ledger.iter().all(|r| {
            seen.contains_key(&key(r, "accepted")) && seen.contains_key(&key(r, "delivered"))
        })
    });
    // Nothing but those: no recipient the ledger does not know, no
    // failure.
    for g in &got {
        assert!(ledger.contains(&g.recipient), "{:?}", g.json);
        assert!(
            matches!(g.event.as_str(), "accepted" | "delivered" | "deferred"),
            "{:?}",
            g.json
        );
    }
    let delivered: BTreeSet<String> = sink
        .messages()
        .iter()
        .flat_map(|m| m.rcpt_tos.clone())
        .collect();
    assert_eq!(delivered, ledger, "every recipient delivered");
}

#[test]
fn a_node_killed_mid_run_loses_no_event_on_the_local_spool() {
    killed_mid_run(&[]);
}

#[test]
fn a_node_killed_mid_run_loses_no_event_on_redis() {
    on_redis(killed_mid_run);
}

/// Runs `test` with the node on a Redis of its own.
fn on_redis(test: fn(&[(&str, &str)])) {
    let redis = RedisServer::start();
    let url = redis.url();
    test(&[
        ("SMARTHOST__QUEUE__BACKEND", "redis"),
        ("SMARTHOST__QUEUE__REDIS_URL", url.as_str()),
        // A node killed comes back under its id once its heartbeat is
        // old, and takes over what it held.
        ("SMARTHOST__QUEUE__NODE_TIMEOUT", "3s"),
    ]);
}

/// Mail that never gets through: one message deleted by an operator (its
/// sender told), one left to expire. Each recipient's `deferred`, then its
/// `bounced` (with the operator's reason) or `expired` event arrives.
fn deleted_and_expired(env: &[(&str, &str)]) {
    let sink = Sink::start(SinkOptions {
        script: Some(serde_json::json!({"rcpt": {
            "stuck@example.org": 451,
            "late@example.org": 451,
        }})),
        ..SinkOptions::default()
    });
    let hook = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(hook, &dir.path().join("posts.jsonl"), 200);
    let mut env = env.to_vec();
    env.push(("SMARTHOST__QUEUE__MAX_LIFETIME", "6s"));
    let setup = relay(&sink, hook, &env);
    let stuck = submit(
        &setup.relay,
        "app@sender.test",
        &["stuck@example.org"],
        &dot_stuff(&message("stuck@example.org", "stuck", "Hello.\r\n")),
    );
    let late = submit(
        &setup.relay,
        "app@sender.test",
        &["late@example.org"],
        &dot_stuff(&message("late@example.org", "late", "Hello.\r\n")),
    );
    receiver.wait_for("/all", SECRET, Duration::from_secs(20), |got| {
        by_recipient(got).contains_key(&key("stuck@example.org", "deferred"))
    });
    let out = setup.relay.cli(&["queue", "delete", &stuck], &[]);
    assert!(out.status.success(), "{out:?}");

    let got = receiver.wait_for("/all", SECRET, Duration::from_secs(40), |got| {
        let seen = by_recipient(got);
        seen.contains_key(&key("stuck@example.org", "bounced"))
            && seen.contains_key(&key("late@example.org", "expired"))
    });
    let bounced = got
        .iter()
        .find(|g| g.event == "bounced")
        .expect("a bounced event");
    assert_eq!(bounced.message_id, stuck);
    assert!(
        bounced.reply.as_deref().unwrap().contains("operator"),
        "{:?}",
        bounced.json
    );
    let expired = got
        .iter()
        .find(|g| g.event == "expired")
        .expect("an expired event");
    assert_eq!(expired.message_id, late);
    assert!(
        expired
            .reply
            .as_deref()
            .unwrap()
            .starts_with("delivery time expired"),
        "{:?}",
        expired.json
    );
    // Neither is reported as anything else.
    for g in &got {
        assert!(
            matches!(
                g.event.as_str(),
                "accepted" | "deferred" | "bounced" | "expired"
            ),
            "{:?}",
            g.json
        );
    }
}

#[test]
fn deleted_and_expired_mail_is_reported_on_the_local_spool() {
    deleted_and_expired(&[]);
}

#[test]
fn deleted_and_expired_mail_is_reported_on_redis() {
    on_redis(deleted_and_expired);
}
