//! What holds an application to its limits, across two nodes on one real
//! Redis: a key's quota and an SMTP user's quota are spent on both nodes
//! together (`429` with `Retry-After`, `450 4.7.1`), and a request sent
//! twice with one `Idempotency-Key`, to one node and then the other or to
//! both at once, queues one message. The sink counts what arrives.

use std::time::Duration;

use base64::Engine as _;
use smarthost_testkit::redis::RedisServer;
use smarthost_tests::http;
use smarthost_tests::scenario::{route, start_as, Setup};
use smarthost_tests::sink::{Sink, SinkOptions};
use smarthost_tests::smtp::Client;

/// The key with quotas.
const SHOP: &str = "shop-token";
/// A key without.
const ORDERS: &str = "orders-token";
const KEY_PER_MINUTE: usize = 4;
const USER_PER_MINUTE: usize = 3;

/// Two `smarthost run` nodes on `redis`, each with the keys `shop` (with
/// quotas) and `orders` (without), and the SMTP user `app` (password
/// `pw`, with a quota).
fn two_nodes(redis: &RedisServer, sink: &Sink) -> Vec<Setup> {
    let sections = format!(
        "{}\n[[api.keys]]\nname = \"shop\"\ntoken_hash = \"{}\"\nsenders = [\"shop.example\"]\n\
         messages_per_minute = {KEY_PER_MINUTE}\nmessages_per_day = 1000\n\n\
         [[api.keys]]\nname = \"orders\"\ntoken_hash = \"{}\"\nsenders = [\"shop.example\"]\n\n\
         [[smtp.users]]\nname = \"app\"\npassword_hash = \"{}\"\n\
         messages_per_minute = {USER_PER_MINUTE}\n",
        route("example.org", sink),
        http::token_hash(SHOP),
        http::token_hash(ORDERS),
        http::token_hash("pw"),
    );
    ["n1", "n2"]
        .into_iter()
        .map(|id| {
            start_as(
                "run",
                tempfile::tempdir().unwrap(),
                "",
                &sections,
                &[
                    ("SMARTHOST__QUEUE__BACKEND", "redis"),
                    ("SMARTHOST__QUEUE__REDIS_URL", &redis.url()),
                    ("SMARTHOST__NODE__ID", id),
                    ("SMARTHOST__SMTP__ALLOW_PLAINTEXT_AUTH", "true"),
                ],
            )
        })
        .collect()
}

fn send(node: &Setup, token: &str, key: Option<&str>, subject: &str) -> http::Response {
    let json = serde_json::json!({
        "from": "orders@shop.example",
        "to": ["alice@example.org"],
        "subject": subject,
        "text": "Your order has shipped.\n",
    });
    let headers: Vec<(&str, &str)> = key.map(|k| ("Idempotency-Key", k)).into_iter().collect();
    http::send_with(
        node.relay.admin_addr(),
        "POST",
        "/api/v1/send",
        Some(token),
        &headers,
        "application/json",
        json.to_string().as_bytes(),
    )
}

/// One message from the SMTP user `app` through `node`; the reply to its
/// end of data.
fn send_as_user(node: &Setup, subject: &str) -> String {
    let (mut client, greeting) = Client::connect(node.relay.smtp);
    assert_eq!(greeting.code, 220);
    client.expect("EHLO app.test", 250);
    let plain = base64::engine::general_purpose::STANDARD.encode("\0app\0pw");
    client.expect(&format!("AUTH PLAIN {plain}"), 235);
    let reply = client.send_message(
        "orders@shop.example",
        &["bob@example.org"],
        &format!("Subject: {subject}\r\n\r\nHello.\r\n"),
    );
    client.cmd("QUIT");
    format!("{} {}", reply.code, reply.text)
}

#[test]
fn quotas_are_shared_by_the_nodes_and_a_retried_send_queues_once() {
    let redis = RedisServer::start();
    let sink = Sink::start(SinkOptions::default());
    let nodes = two_nodes(&redis, &sink);

    // The key's quota: spent half on each node, then refused on both.
    for i in 0..KEY_PER_MINUTE {
        let answer = send(&nodes[i % 2], SHOP, None, &format!("quota {i}"));
        assert_eq!(answer.status, 200, "send {i}: {answer:?}");
    }
    for node in &nodes {
        let answer = send(node, SHOP, None, "one too many");
        assert_eq!(answer.status, 429, "{answer:?}");
        assert_eq!(answer.json()["code"], "quota_exceeded", "{answer:?}");
        let retry: u64 = answer.header("retry-after").unwrap().parse().unwrap();
        // A minute's quota of 4 refills one message every 15 s.
        assert!((1..=15).contains(&retry), "{answer:?}");
        assert_eq!(answer.json()["retry_after"], retry, "{answer:?}");
    }

    // The SMTP user's quota, the same way.
    for i in 0..USER_PER_MINUTE {
        let reply = send_as_user(&nodes[i % 2], &format!("smtp {i}"));
        assert!(reply.starts_with("250 2.0.0"), "message {i}: {reply}");
    }
    for node in &nodes {
        let reply = send_as_user(node, "one too many");
        assert!(
            reply.starts_with("450 4.7.1 Sending quota reached, try again in "),
            "{reply}"
        );
    }

    // Idempotency, with the key without quotas.
    let first = send(&nodes[0], ORDERS, Some("order-42"), "order 42");
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(first.header("idempotent-replayed"), None);
    let again = send(&nodes[1], ORDERS, Some("order-42"), "order 42");
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.json()["id"], first.json()["id"]);
    let reused = send(&nodes[1], ORDERS, Some("order-42"), "another order");
    assert_eq!(reused.status, 422, "{reused:?}");
    assert_eq!(reused.json()["field"], "Idempotency-Key");
    let bad = send(&nodes[0], ORDERS, Some(&"k".repeat(300)), "order 43");
    assert_eq!(bad.status, 400, "{bad:?}");
    assert_eq!(bad.json()["field"], "Idempotency-Key");

    // Both nodes at once with one key: one queues, the other gets the
    // same answer or is told to wait.
    let racers: Vec<_> = nodes
        .iter()
        .map(|node| {
            let addr = node.relay.admin_addr();
            std::thread::spawn(move || {
                let json = serde_json::json!({
                    "from": "orders@shop.example", "to": ["alice@example.org"],
                    "subject": "race", "text": "x",
                });
                http::send_with(
                    addr,
                    "POST",
                    "/api/v1/send",
                    Some(ORDERS),
                    &[("Idempotency-Key", "race-1")],
                    "application/json",
                    json.to_string().as_bytes(),
                )
            })
        })
        .collect();
    let answers: Vec<http::Response> = racers.into_iter().map(|t| t.join().unwrap()).collect();
    let fresh = answers
        .iter()
        .filter(|a| a.status == 200 && a.header("idempotent-replayed").is_none())
        .count();
    assert_eq!(fresh, 1, "{answers:?}");
    for answer in &answers {
        assert!([200, 409].contains(&answer.status), "{answer:?}");
    }

    // Exactly what was answered 200 arrives: 4 + 3 + 1 + 1.
    let expected = KEY_PER_MINUTE + USER_PER_MINUTE + 2;
    sink.wait_for(expected, Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(2));
    let subjects: Vec<String> = sink
        .messages()
        .iter()
        .filter_map(|m| m.header("Subject"))
        .collect();
    assert_eq!(subjects.len(), expected, "{subjects:?}");
    assert_eq!(subjects.iter().filter(|s| *s == "order 42").count(), 1);
    assert_eq!(subjects.iter().filter(|s| *s == "race").count(), 1);
    assert!(
        !subjects.iter().any(|s| s == "one too many"),
        "{subjects:?}"
    );
}
