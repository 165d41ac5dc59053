//! The suppression list against the real binary and a real sink: a hard
//! bounce (`550 5.1.1`) puts the recipient on its key's list; the send API
//! then leaves it out (or refuses a send with no one left); an address an
//! operator suppressed through the CLI fails at delivery without reaching
//! the sink and is bounced; imports report bad lines; the list outlives a
//! restart on the local backend. On the Redis backend two nodes hold to
//! one list: what is added or removed through one holds on the other.

use std::time::{Duration, Instant};

use smarthost_testkit::redis::RedisServer;
use smarthost_tests::http;
use smarthost_tests::relay::Relay;
use smarthost_tests::scenario::submit;
use smarthost_tests::sink::{ReceivedMessage, Sink, SinkOptions};

const KEY: &str = "shop-token";
const OPERATOR: &str = "operator-token";

fn relay(sink: &Sink) -> Relay {
    relay_with_env(sink, &[])
}

/// A relay with the key `shop` (sending as shop.example) and an operator,
/// routing example.org and shop.example to `sink`; `env` for the relay.
fn relay_with_env(sink: &Sink, env: &[(&str, &str)]) -> Relay {
    Relay::start_with_env(
        "",
        &format!(
            "[[domains]]\nname = \"example.org\"\nsmart_host = \"{host}\"\n\n\
             [[domains]]\nname = \"shop.example\"\nsmart_host = \"{host}\"\n\n\
             [[api.keys]]\nname = \"shop\"\ntoken_hash = \"{key}\"\nsenders = [\"shop.example\"]\n\n\
             [[admin.operators]]\nname = \"ops\"\ntoken_hash = \"{operator}\"\nrole = \"operator\"\n",
            host = sink.smart_host(),
            key = http::token_hash(KEY),
            operator = http::token_hash(OPERATOR),
        ),
        env,
    )
}

fn send(relay: &Relay, to: &[&str], subject: &str) -> http::Response {
    let json = serde_json::json!({
        "from": "orders@shop.example", "to": to, "subject": subject, "text": "Hello.\n",
    });
    http::send_body(
        relay.admin_addr(),
        "POST",
        "/api/v1/send",
        Some(KEY),
        "application/json",
        json.to_string().as_bytes(),
    )
}

fn listed(relay: &Relay, account: Option<&str>) -> Vec<serde_json::Value> {
    let path = match account {
        Some(account) => format!("/api/v1/suppressions?account={account}"),
        None => "/api/v1/suppressions".to_string(),
    };
    let answer = http::get(relay.admin_addr(), &path, Some(OPERATOR));
    assert_eq!(answer.status, 200, "{answer:?}");
    answer.json()["entries"].as_array().unwrap().clone()
}

fn cli(relay: &Relay, args: &[&str]) -> String {
    let out = relay.cli(args, &[("SMARTHOST_TOKEN", OPERATOR)]);
    assert!(out.status.success(), "{args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Submits mail over SMTP from app@shop.example to blocked@example.org,
/// which is suppressed, and carol@example.org; waits until `arrivals`
/// messages in all reached the sink, and checks that the sender got a
/// report for blocked@ that names the suppression list and that blocked@
/// never reached the sink. Answers what arrived.
fn smtp_mail_to_blocked_is_bounced(
    relay: &Relay,
    sink: &Sink,
    arrivals: usize,
) -> Vec<ReceivedMessage> {
    submit(
        relay,
        "app@shop.example",
        &["blocked@example.org", "carol@example.org"],
        "Subject: to blocked\r\n\r\nHello.\r\n",
    );
    let received = sink.wait_for(arrivals, Duration::from_secs(30));
    let report = received
        .iter()
        .find(|m| m.mail_from.is_empty() && m.rcpt_tos == ["app@shop.example"])
        .unwrap_or_else(|| panic!("no report to app@shop.example: {received:?}"));
    let text = report.text();
    assert!(
        text.contains("5.1.1") && text.contains("suppression list"),
        "{text}"
    );
    assert!(
        received.iter().any(|m| m.rcpt_tos == ["carol@example.org"]),
        "{received:?}"
    );
    let all_rcpts: Vec<&String> = received.iter().flat_map(|m| &m.rcpt_tos).collect();
    assert!(
        !all_rcpts
            .iter()
            .any(|r| r.eq_ignore_ascii_case("blocked@example.org")),
        "{all_rcpts:?}"
    );
    received
}

#[test]
fn hard_bounces_and_operators_suppress_addresses_for_api_and_smtp_mail() {
    let sink = Sink::start(SinkOptions::default().script(serde_json::json!({"rcpt": {
        "gone@example.org": "550 5.1.1 <gone@example.org>: no such user",
    }})));
    let mut relay = relay(&sink);

    // A hard bounce puts the address on the key's list.
    let answer = send(&relay, &["alice@example.org", "gone@example.org"], "first");
    assert_eq!(answer.status, 200, "{answer:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let entries = loop {
        let entries = listed(&relay, Some("shop"));
        if !entries.is_empty() {
            break entries;
        }
        assert!(Instant::now() < deadline, "the hard bounce was not learned");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(entries[0]["address"], "gone@example.org", "{entries:?}");
    assert_eq!(entries[0]["source"], "bounce");
    assert!(entries[0]["reason"].as_str().unwrap().contains("5.1.1"));
    assert!(listed(&relay, None).is_empty(), "not on the global list");

    // The send API leaves it out, whatever its case, or refuses a send
    // to no one else.
    let answer = send(&relay, &["Gone@Example.org"], "second");
    assert_eq!(answer.status, 422, "{answer:?}");
    assert_eq!(answer.json()["code"], "recipients_suppressed");
    assert_eq!(answer.json()["field"], "to");
    let answer = send(&relay, &["gone@example.org", "bob@example.org"], "third");
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.json()["recipients"], 1);
    assert_eq!(
        answer.json()["suppressed"],
        serde_json::json!(["gone@example.org"])
    );

    // An operator suppresses an address for everyone; SMTP mail to it is
    // taken, then fails at delivery without a connection and is bounced.
    let out = cli(
        &relay,
        &[
            "suppression",
            "add",
            "Blocked@example.org",
            "--reason",
            "complaint",
        ],
    );
    assert!(out.contains("1 suppressed (1 new)"), "{out}");
    // first (alice) + its bounce of gone + third (bob) + carol + the
    // bounce of blocked.
    let received = smtp_mail_to_blocked_is_bounced(&relay, &sink, 5);
    let all_rcpts: Vec<&String> = received.iter().flat_map(|m| &m.rcpt_tos).collect();
    assert_eq!(
        all_rcpts
            .iter()
            .filter(|r| *r == &"gone@example.org")
            .count(),
        0,
        "the sink refused gone@ and never took it"
    );

    // Imports say which lines are not addresses; removal and listing by
    // the CLI.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("list.csv");
    std::fs::write(
        &file,
        "email,name\nx@example.org,X\nnot-an-address,Y\ny@example.org\n",
    )
    .unwrap();
    let out = cli(
        &relay,
        &[
            "suppression",
            "import",
            file.to_str().unwrap(),
            "--account",
            "shop",
        ],
    );
    assert!(out.contains("2 suppressed (2 new)"), "{out}");
    assert!(out.contains("not an address: not-an-address"), "{out}");
    let out = cli(&relay, &["suppression", "list", "--account", "shop"]);
    let addresses: Vec<&str> = out.lines().filter_map(|l| l.split('\t').next()).collect();
    assert_eq!(
        addresses,
        ["gone@example.org", "x@example.org", "y@example.org"],
        "{out}"
    );
    let out = cli(
        &relay,
        &[
            "suppression",
            "remove",
            "x@example.org",
            "--account",
            "shop",
        ],
    );
    assert!(out.contains("x@example.org taken off the list"), "{out}");
    let out = relay.cli(
        &[
            "suppression",
            "remove",
            "x@example.org",
            "--account",
            "shop",
        ],
        &[("SMARTHOST_TOKEN", OPERATOR)],
    );
    assert!(!out.status.success(), "{out:?}");

    // A page at a time.
    let answer = http::get(
        relay.admin_addr(),
        "/api/v1/suppressions?account=shop&limit=1",
        Some(OPERATOR),
    );
    assert_eq!(
        answer.json()["next_cursor"],
        "gone@example.org",
        "{answer:?}"
    );

    // The list outlives a restart.
    relay.terminate(Duration::from_secs(20));
    relay.launch();
    let shop: Vec<serde_json::Value> = listed(&relay, Some("shop"));
    assert_eq!(shop.len(), 2, "{shop:?}");
    let global = listed(&relay, None);
    assert_eq!(global.len(), 1);
    assert_eq!(global[0]["address"], "blocked@example.org");
    assert_eq!(global[0]["reason"], "complaint");
}

#[test]
fn on_redis_the_nodes_hold_to_one_list() {
    let redis = RedisServer::start();
    let sink = Sink::start(SinkOptions::default());
    let url = redis.url();
    let nodes: Vec<Relay> = ["n1", "n2"]
        .into_iter()
        .map(|id| {
            relay_with_env(
                &sink,
                &[
                    ("SMARTHOST__QUEUE__BACKEND", "redis"),
                    ("SMARTHOST__QUEUE__REDIS_URL", &url),
                    ("SMARTHOST__NODE__ID", id),
                ],
            )
        })
        .collect();

    // An operator suppresses an address through node 1, with the CLI;
    // the send API of both nodes refuses it or leaves it out.
    let out = cli(
        &nodes[0],
        &[
            "suppression",
            "add",
            "Blocked@example.org",
            "--reason",
            "complaint",
        ],
    );
    assert!(out.contains("1 suppressed (1 new)"), "{out}");
    for (i, node) in nodes.iter().enumerate() {
        let answer = send(node, &["blocked@example.org"], "refused");
        assert_eq!(answer.status, 422, "node {i}: {answer:?}");
        assert_eq!(answer.json()["code"], "recipients_suppressed");
        let answer = send(
            node,
            &["blocked@example.org", "alice@example.org"],
            "left out",
        );
        assert_eq!(answer.status, 200, "node {i}: {answer:?}");
        assert_eq!(answer.json()["recipients"], 1);
        assert_eq!(
            answer.json()["suppressed"],
            serde_json::json!(["blocked@example.org"])
        );
    }
    // SMTP mail through node 2 fails at delivery: two to alice, carol,
    // the report.
    smtp_mail_to_blocked_is_bounced(&nodes[1], &sink, 4);

    // An address added to the key's list through node 1's API is on node
    // 2's list and left out of its sends; taken off through node 2, it
    // gets mail through node 1 again.
    let answer = http::send_body(
        nodes[0].admin_addr(),
        "POST",
        "/api/v1/suppressions",
        Some(OPERATOR),
        "application/json",
        serde_json::json!({
            "addresses": ["dave@example.org"], "account": "shop", "reason": "unsubscribed",
        })
        .to_string()
        .as_bytes(),
    );
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.json()["added"], 1, "{answer:?}");
    let shop = listed(&nodes[1], Some("shop"));
    assert_eq!(shop.len(), 1, "{shop:?}");
    assert_eq!(shop[0]["address"], "dave@example.org");
    assert_eq!(shop[0]["source"], "api");
    assert_eq!(shop[0]["reason"], "unsubscribed");
    assert_eq!(listed(&nodes[1], None).len(), 1, "blocked@ only");
    let answer = send(
        &nodes[1],
        &["dave@example.org", "erin@example.org"],
        "not dave",
    );
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(
        answer.json()["suppressed"],
        serde_json::json!(["dave@example.org"])
    );
    let answer = http::request(
        nodes[1].admin_addr(),
        "DELETE",
        "/api/v1/suppressions/dave@example.org?account=shop",
        Some(OPERATOR),
    );
    assert_eq!(answer.status, 200, "{answer:?}");
    assert!(listed(&nodes[0], Some("shop")).is_empty());
    let answer = send(&nodes[0], &["dave@example.org"], "dave again");
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.json()["recipients"], 1, "{answer:?}");
    assert_eq!(answer.json()["suppressed"], serde_json::Value::Null);

    let received = sink.wait_for(6, Duration::from_secs(30));
    let dave: Vec<Option<String>> = received
        .iter()
        .filter(|m| m.rcpt_tos.iter().any(|r| r == "dave@example.org"))
        .map(|m| m.header("Subject"))
        .collect();
    assert_eq!(dave, [Some("dave again".to_string())], "{received:?}");
    std::thread::sleep(Duration::from_secs(1));
    let all_rcpts: Vec<String> = sink
        .messages()
        .into_iter()
        .flat_map(|m| m.rcpt_tos)
        .collect();
    assert_eq!(sink.messages().len(), 6, "{all_rcpts:?}");
    assert!(
        !all_rcpts.iter().any(|r| r == "blocked@example.org"),
        "{all_rcpts:?}"
    );
}
