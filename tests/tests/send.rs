//! `smarthost send` and `POST /api/v1/send` against the real binary: a
//! message built from the command line or from JSON (text, HTML, an
//! attachment, a header, Bcc) goes through the relay to a real sink, and
//! Python's `email` package, a MIME parser independent of ours, reads it
//! back with the attachment byte for byte. Bad requests get a precise
//! answer and queue nothing. An `Idempotency-Key` answered before a
//! restart is answered the same after it.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use smarthost_tests::http;
use smarthost_tests::relay::Relay;
use smarthost_tests::sink::{Sink, SinkOptions};

/// What Python's `email` parser makes of a message: subject, the media
/// types of its parts in order, and each attachment's name and bytes (hex).
const READ_BACK: &str = r#"
import email, email.policy, json, sys
m = email.message_from_bytes(sys.stdin.buffer.read(), policy=email.policy.default)
print(json.dumps({
    "subject": m["subject"],
    "defects": [str(d) for d in m.defects],
    "types": [p.get_content_type() for p in m.walk()],
    "text": m.get_body(("plain",)).get_content(),
    "html": m.get_body(("html",)).get_content(),
    "attachments": {a.get_filename(): a.get_payload(decode=True).hex() for a in m.iter_attachments()},
    "job": m["X-Job"],
    "bcc": m["Bcc"],
}))
"#;

fn read_back(message: &[u8]) -> serde_json::Value {
    let mut python = Command::new("python3")
        .args(["-c", READ_BACK])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    python.stdin.take().unwrap().write_all(message).unwrap();
    let out = python.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_message_from_the_command_line_arrives_as_valid_mime() {
    let sink = Sink::start(SinkOptions::default());
    let relay = Relay::start(
        "",
        &format!(
            "[[domains]]\nname = \"example.org\"\nsmart_host = \"{}\"\n",
            sink.smart_host()
        ),
    );
    let dir = tempfile::tempdir().unwrap();
    let body = dir.path().join("body.txt");
    std::fs::write(&body, "Hello,\n\n.the report is attached.\n").unwrap();
    let html = dir.path().join("body.html");
    std::fs::write(&html, "<p>Hello, the <b>report</b> is attached.</p>\n").unwrap();
    let report = dir.path().join("report.pdf");
    let bytes: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    std::fs::write(&report, &bytes).unwrap();
    let path = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let out = relay.cli(
        &[
            "send",
            "--from",
            "app@sender.test",
            "--to",
            "alice@example.org",
            "--cc",
            "bob@example.org",
            "--bcc",
            "audit@example.org",
            "--subject",
            "Monthly report ✓",
            "--body",
            &path(&body),
            "--html",
            &path(&html),
            "--attach",
            &path(&report),
            "--header",
            "X-Job: 42",
        ],
        &[],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("queued as "), "{stdout}");

    let received = sink.wait_for(1, Duration::from_secs(20));
    let message = &received[0];
    let mut rcpts = message.rcpt_tos.clone();
    rcpts.sort();
    assert_eq!(
        rcpts,
        ["alice@example.org", "audit@example.org", "bob@example.org"]
    );
    let parsed = read_back(&message.body);
    assert_eq!(parsed["defects"], serde_json::json!([]), "{parsed}");
    assert_eq!(parsed["subject"], "Monthly report ✓", "{parsed}");
    assert_eq!(parsed["job"], "42");
    assert_eq!(parsed["bcc"], serde_json::Value::Null, "Bcc is not shown");
    assert_eq!(
        parsed["types"],
        serde_json::json!([
            "multipart/mixed",
            "multipart/alternative",
            "text/plain",
            "text/html",
            "application/pdf"
        ]),
        "{parsed}"
    );
    assert_eq!(
        parsed["text"].as_str().unwrap().replace("\r\n", "\n"),
        "Hello,\n\n.the report is attached.\n"
    );
    assert!(parsed["html"].as_str().unwrap().contains("<b>report</b>"));
    assert_eq!(
        parsed["attachments"]["report.pdf"].as_str(),
        Some(hex(&bytes).as_str()),
        "the attachment byte for byte"
    );
    assert!(message.header("Message-ID").is_some() && message.header("Date").is_some());
}

#[test]
fn a_bad_address_is_named_and_nothing_is_sent() {
    let mut relay = Relay::start("", "");
    let out = relay.cli(
        &[
            "send",
            "--from",
            "app@sender.test",
            "--to",
            "bob@",
            "--body",
            "/dev/null",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("error: to[0]: "), "{stderr}");
    let out = relay.cli(
        &[
            "send",
            "--from",
            "app@sender.test",
            "--to",
            "bob@example.org",
            "--subject",
            "a\nBcc: x@example.org",
            "--body",
            "/dev/null",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).starts_with("error: subject: control character"),
        "{out:?}"
    );
    relay.terminate(Duration::from_secs(20));
    assert!(relay.spool_records().is_empty(), "nothing queued");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A relay with one application key, `shop`, that may send as anyone at
/// shop.example and as alerts@ops.example, routing example.org to `sink`.
fn relay_with_a_key(sink: &Sink) -> Relay {
    Relay::start(
        "",
        &format!(
            "[[domains]]\nname = \"example.org\"\nsmart_host = \"{}\"\n\n\
             [[api.keys]]\nname = \"shop\"\ntoken_hash = \"{}\"\n\
             senders = [\"shop.example\", \"alerts@ops.example\"]\n",
            sink.smart_host(),
            http::token_hash("shop-token")
        ),
    )
}

fn send_json(relay: &Relay, token: Option<&str>, json: &serde_json::Value) -> http::Response {
    http::send_body(
        relay.admin_addr(),
        "POST",
        "/api/v1/send",
        token,
        "application/json",
        json.to_string().as_bytes(),
    )
}

#[test]
fn a_json_send_with_html_and_an_attachment_arrives_as_valid_mime() {
    use base64::Engine as _;
    let sink = Sink::start(SinkOptions::default());
    let relay = relay_with_a_key(&sink);
    let bytes: Vec<u8> = (0..=255u8).rev().cycle().take(100_000).collect();
    let answer = send_json(
        &relay,
        Some("shop-token"),
        &serde_json::json!({
            "from": {"name": "The Shop", "email": "orders@shop.example"},
            "to": ["alice@example.org"],
            "bcc": ["audit@example.org"],
            "subject": "Your invoice ✓",
            "text": "Hello,\nyour invoice is attached.\n",
            "html": "<p>Hello, your <b>invoice</b> is attached.</p>",
            "headers": {"X-Job": "42"},
            "attachments": [{
                "filename": "report.pdf",
                "content_type": "application/pdf",
                "content": base64::engine::general_purpose::STANDARD.encode(&bytes),
            }],
        }),
    );
    assert_eq!(answer.status, 200, "{answer:?}");
    let json = answer.json();
    assert_eq!(json["recipients"], 2, "{json}");
    let id = json["id"].as_str().unwrap().to_string();

    let received = sink.wait_for(1, Duration::from_secs(20));
    let message = &received[0];
    let mut rcpts = message.rcpt_tos.clone();
    rcpts.sort();
    assert_eq!(rcpts, ["alice@example.org", "audit@example.org"]);
    let received_line = message.header("Received").unwrap();
    assert!(
        received_line.contains("with HTTP") && received_line.contains(&id),
        "{received_line}"
    );
    let parsed = read_back(&message.body);
    assert_eq!(parsed["defects"], serde_json::json!([]), "{parsed}");
    assert_eq!(parsed["subject"], "Your invoice ✓");
    assert_eq!(parsed["job"], "42");
    assert_eq!(parsed["bcc"], serde_json::Value::Null);
    assert_eq!(
        parsed["attachments"]["report.pdf"].as_str(),
        Some(hex(&bytes).as_str()),
        "the attachment byte for byte"
    );
    assert!(parsed["html"].as_str().unwrap().contains("<b>invoice</b>"));
}

#[test]
fn bad_sends_get_a_precise_answer_and_queue_nothing() {
    let sink = Sink::start(SinkOptions::default());
    let mut relay = relay_with_a_key(&sink);
    let good =
        serde_json::json!({"from": "alerts@ops.example", "to": ["a@example.org"], "text": "x"});
    // No key, a wrong key.
    let answer = send_json(&relay, None, &good);
    assert_eq!(answer.status, 401, "{answer:?}");
    let answer = send_json(&relay, Some("not-the-token"), &good);
    assert_eq!(answer.status, 401, "{answer:?}");
    // (status, code, field) for each bad request.
    let cases: Vec<(serde_json::Value, u16, &str, Option<&str>)> = vec![
        (
            serde_json::json!({"from": "sales@ops.example", "to": ["a@example.org"]}),
            403,
            "sender_not_allowed",
            Some("from"),
        ),
        (
            serde_json::json!({"from": "alerts@ops.example", "to": ["a@"]}),
            400,
            "invalid_field",
            Some("to[0]"),
        ),
        (
            serde_json::json!({"from": "alerts@ops.example", "to": ["a@example.org"],
                               "subject": "a\r\nBcc: b@example.org"}),
            400,
            "invalid_field",
            Some("subject"),
        ),
        (
            serde_json::json!({"from": "alerts@ops.example"}),
            400,
            "invalid_field",
            Some("to"),
        ),
        (
            serde_json::json!({"from": "alerts@ops.example", "to": ["a@example.org"],
                               "attachments": [{"filename": "a", "content_type": "text/plain",
                                                "content": "%%%"}]}),
            400,
            "invalid_field",
            Some("attachments[0].content"),
        ),
        (
            serde_json::json!({"from": "alerts@ops.example", "to": "a@example.org"}),
            400,
            "invalid_json",
            None,
        ),
    ];
    for (json, status, code, field) in cases {
        let answer = send_json(&relay, Some("shop-token"), &json);
        assert_eq!(answer.status, status, "{json}: {answer:?}");
        let body = answer.json();
        assert_eq!(body["code"], code, "{json}: {body}");
        assert_eq!(body["field"].as_str(), field, "{json}: {body}");
        assert!(body["error"].is_string(), "{body}");
    }
    let answer = http::send_body(
        relay.admin_addr(),
        "POST",
        "/api/v1/send",
        Some("shop-token"),
        "text/plain",
        b"hello",
    );
    assert_eq!(answer.status, 415, "{answer:?}");
    relay.terminate(Duration::from_secs(20));
    assert!(relay.spool_records().is_empty(), "nothing queued");
}

#[test]
fn a_raw_message_is_sent_to_its_headers_recipients_without_its_bcc() {
    let sink = Sink::start(SinkOptions::default());
    let relay = relay_with_a_key(&sink);
    let raw = "From: Alerts <alerts@ops.example>\nTo: alice@example.org\n\
               Bcc: audit@example.org\nSubject: disk full\n\n\
               /var is at 98 %.\n.\nA line with a dot above.\n";
    let answer = http::send_body(
        relay.admin_addr(),
        "POST",
        "/api/v1/send",
        Some("shop-token"),
        "message/rfc822",
        raw.as_bytes(),
    );
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.json()["recipients"], 2);
    let received = sink.wait_for(1, Duration::from_secs(20));
    let message = &received[0];
    let mut rcpts = message.rcpt_tos.clone();
    rcpts.sort();
    assert_eq!(rcpts, ["alice@example.org", "audit@example.org"]);
    let text = message.text();
    assert!(!text.contains("audit@"), "Bcc taken out: {text}");
    assert!(message.header("Message-ID").is_some() && message.header("Date").is_some());
    assert!(
        text.ends_with("\r\n\r\n/var is at 98 %.\r\n.\r\nA line with a dot above.\r\n"),
        "{text}"
    );

    // A raw message without a From is refused, naming the header.
    let answer = http::send_body(
        relay.admin_addr(),
        "POST",
        "/api/v1/send",
        Some("shop-token"),
        "message/rfc822",
        b"To: alice@example.org\r\n\r\nhi\r\n",
    );
    assert_eq!(answer.status, 400, "{answer:?}");
    assert_eq!(answer.json()["field"], "From");
}

#[test]
fn an_idempotency_key_is_answered_the_same_after_a_restart() {
    let sink = Sink::start(SinkOptions::default());
    let mut relay = relay_with_a_key(&sink);
    let send = |relay: &Relay, key: &str| {
        let json = serde_json::json!({
            "from": "orders@shop.example", "to": ["alice@example.org"],
            "subject": "order 42", "text": "Shipped.\n",
        });
        http::send_with(
            relay.admin_addr(),
            "POST",
            "/api/v1/send",
            Some("shop-token"),
            &[("Idempotency-Key", key)],
            "application/json",
            json.to_string().as_bytes(),
        )
    };
    let first = send(&relay, "order-42");
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(first.header("idempotent-replayed"), None);
    sink.wait_for(1, Duration::from_secs(20));

    let status = relay.terminate(Duration::from_secs(20));
    assert!(status.success(), "{status}");
    relay.launch();
    let again = send(&relay, "order-42");
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.json()["id"], first.json()["id"]);
    assert_eq!(again.json()["recipients"], 1);
    // Another key is another message.
    let other = send(&relay, "order-43");
    assert_eq!(other.status, 200, "{other:?}");
    assert_eq!(other.header("idempotent-replayed"), None);
    assert_ne!(other.json()["id"], first.json()["id"]);

    sink.wait_for(2, Duration::from_secs(20));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(sink.messages().len(), 2, "the replayed send queued nothing");
}
