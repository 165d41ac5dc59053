//! The admin API and `smarthost queue`, against the real relay: health and
//! readiness through a shutdown, queue counts, suspending and resuming a
//! domain while its mail waits, and operator tokens with their roles.

use std::process::Output;
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use smarthost_tests::http;
use smarthost_tests::relay::{free_port, Relay};
use smarthost_tests::sink::{Sink, SinkOptions};
use smarthost_tests::smtp::{queued_id, Client};

const POLL: Duration = Duration::from_millis(100);

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `smarthost queue ARGS` against `relay`; panics unless it succeeds.
fn queue_ok(relay: &Relay, args: &[&str]) -> String {
    let output = queue(relay, args, None);
    assert!(output.status.success(), "queue {args:?}: {}", text(&output));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn queue(relay: &Relay, args: &[&str], token: Option<&str>) -> Output {
    let mut all = vec!["queue"];
    all.extend_from_slice(args);
    match token {
        Some(token) => relay.cli(&all, &[("SMARTHOST_TOKEN", token)]),
        None => relay.cli(&all, &[]),
    }
}

/// The number on the summary line named `name` (a count or a domain).
fn count(summary: &str, name: &str) -> Option<usize> {
    summary.lines().find_map(|line| {
        let rest = line.trim_start().strip_prefix(name)?;
        rest.trim().parse().ok()
    })
}

/// Waits (at most 20 s) until `queue summary` shows `messages` messages,
/// and returns that summary.
fn wait_for_summary(relay: &Relay, messages: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let summary = queue_ok(relay, &["summary"]);
        if count(&summary, "messages") == Some(messages) {
            return summary;
        }
        assert!(
            Instant::now() < deadline,
            "the queue never held {messages} messages:\n{summary}"
        );
        std::thread::sleep(POLL);
    }
}

fn submit(relay: &Relay, to: &str, subject: &str) -> String {
    let (mut c, greeting) = Client::connect(relay.smtp);
    assert_eq!(greeting.code, 220);
    c.expect("EHLO app.example", 250);
    let reply = c.send_message(
        "app@sender.test",
        &[to],
        &format!("From: app@sender.test\r\nTo: {to}\r\nSubject: {subject}\r\n\r\nHello.\r\n"),
    );
    let id = queued_id(&reply);
    c.expect("QUIT", 221);
    id
}

/// An argon2id hash of `token` at the lowest cost, so that the debug
/// binary checks it quickly; the relay takes the cost from the hash.
fn token_hash(token: &str) -> String {
    let salt = SaltString::encode_b64(token.as_bytes()).unwrap();
    let params = Params::new(Params::MIN_M_COST, 1, 1, None).unwrap();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password(token.as_bytes(), &salt)
        .unwrap()
        .to_string()
}

#[test]
fn readiness_turns_false_at_sigterm_while_health_stays_true() {
    let mut relay = Relay::start_with_env("", "", &[("SMARTHOST__NODE__SHUTDOWN_GRACE", "20s")]);
    let admin = relay.admin_addr();
    assert_eq!(http::get(admin, "/healthz", None).status, 200);
    let ready = http::get(admin, "/readyz", None);
    assert_eq!(ready.status, 200, "{ready:?}");

    // A client in the middle of a message keeps the process alive.
    let (mut busy, _) = Client::connect(relay.smtp);
    busy.expect("EHLO busy.example", 250);
    busy.expect("MAIL FROM:<app@example.com>", 250);
    busy.expect("RCPT TO:<user@example.org>", 250);
    busy.expect("DATA", 354);
    busy.send_raw(b"Subject: in flight\r\n\r\nfirst half\r\n");

    relay.send_sigterm();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ready = http::get(admin, "/readyz", None);
        if ready.status == 503 {
            break;
        }
        assert_eq!(ready.status, 200, "{ready:?}");
        assert!(Instant::now() < deadline, "still ready after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(http::get(admin, "/healthz", None).status, 200);
    assert_eq!(http::get(admin, "/readyz", None).status, 503);

    busy.send_raw(b"second half\r\n.\r\n");
    queued_id(&busy.read_reply());
    let status = relay.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "exit status {status}");
}

#[test]
fn queue_summary_counts_accepted_messages() {
    // Nothing listens there: the mail is deferred and stays queued.
    let dead = free_port();
    let relay = Relay::start(
        "",
        &format!("[[domains]]\nname = \"deferred.test\"\nsmart_host = \"[127.0.0.1]:{dead}\"\n"),
    );
    let empty = queue_ok(&relay, &["summary"]);
    assert_eq!(count(&empty, "messages"), Some(0), "{empty}");

    submit(&relay, "a@deferred.test", "one");
    submit(&relay, "b@deferred.test", "two");
    let summary = wait_for_summary(&relay, 2);
    assert_eq!(count(&summary, "deferred.test"), Some(2), "{summary}");

    let json = http::get(relay.admin_addr(), "/api/queue", None).json();
    assert_eq!(json["messages"], 2, "{json}");
    assert_eq!(json["deliveries_by_domain"]["deferred.test"], 2, "{json}");
    for key in ["ready", "deferred", "in_flight", "waiting", "store_calls"] {
        assert!(json[key].is_u64(), "{key} in {json}");
    }
}

#[test]
fn a_suspended_domain_keeps_its_mail_until_resumed() {
    let sink = Sink::start(SinkOptions::default());
    let relay = Relay::start(
        "",
        &format!(
            "[[domains]]\nname = \"held.test\"\nsmart_host = \"{}\"\n",
            sink.smart_host()
        ),
    );
    let said = queue_ok(&relay, &["suspend", "Held.Test"]);
    assert!(said.contains("held.test suspended"), "{said}");

    for n in 1..=3 {
        submit(&relay, &format!("user{n}@held.test"), &format!("held {n}"));
    }
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(sink.messages().len(), 0, "delivered while suspended");
    let summary = queue_ok(&relay, &["summary"]);
    assert_eq!(count(&summary, "messages"), Some(3), "{summary}");
    assert_eq!(count(&summary, "held.test"), Some(3), "{summary}");
    assert!(
        summary.contains("suspended domains: held.test\n"),
        "{summary}"
    );

    let said = queue_ok(&relay, &["resume", "held.test"]);
    assert!(said.contains("held.test resumed"), "{said}");
    let arrived = sink.wait_for(3, Duration::from_secs(30));
    assert_eq!(arrived.len(), 3);
    let summary = wait_for_summary(&relay, 0);
    assert!(summary.contains("suspended domains: none\n"), "{summary}");
}

#[test]
fn operators_need_a_valid_token_and_viewers_may_only_read() {
    let relay = Relay::start(
        "",
        &format!(
            "[[admin.operators]]\nname = \"ops\"\ntoken_hash = \"{}\"\nrole = \"admin\"\n\n\
             [[admin.operators]]\nname = \"noc\"\ntoken_hash = \"{}\"\nrole = \"viewer\"\n",
            token_hash("admin-secret-token"),
            token_hash("viewer-secret-token"),
        ),
    );
    let admin = relay.admin_addr();
    let suspend = "/api/domains/example.org/suspend";

    // The probes and the metrics stay open.
    assert_eq!(http::get(admin, "/healthz", None).status, 200);
    assert_eq!(http::get(admin, "/readyz", None).status, 200);
    let metrics = http::get(admin, "/metrics", None);
    assert_eq!(metrics.status, 200, "{metrics:?}");

    let refused = http::get(admin, "/api/queue", None);
    assert_eq!(refused.status, 401, "{refused:?}");
    assert!(refused.header("www-authenticate").is_some(), "{refused:?}");
    assert_eq!(
        http::get(admin, "/api/queue", Some("wrong-token")).status,
        401
    );
    assert_eq!(http::post(admin, suspend, None).status, 401);
    assert_eq!(http::post(admin, suspend, Some("wrong-token")).status, 401);

    let seen = http::get(admin, "/api/queue", Some("viewer-secret-token"));
    assert_eq!(seen.status, 200, "{seen:?}");
    assert_eq!(seen.json()["messages"], 0);
    let forbidden = http::post(admin, suspend, Some("viewer-secret-token"));
    assert_eq!(forbidden.status, 403, "{forbidden:?}");

    let done = http::post(admin, suspend, Some("admin-secret-token"));
    assert_eq!(done.status, 200, "{done:?}");
    assert_eq!(done.json()["domain"], "example.org");
    assert_eq!(done.json()["suspended"], true);

    // The command line says what went wrong and fails.
    let output = queue(&relay, &["summary"], None);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(text(&output).contains("HTTP 401"), "{}", text(&output));
    let output = queue(
        &relay,
        &["resume", "example.org"],
        Some("viewer-secret-token"),
    );
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(text(&output).contains("HTTP 403"), "{}", text(&output));
    let output = queue(&relay, &["summary"], Some("viewer-secret-token"));
    assert!(output.status.success(), "{}", text(&output));
    let output = relay.cli(
        &[
            "queue",
            "resume",
            "example.org",
            "--token",
            "admin-secret-token",
        ],
        &[],
    );
    assert!(output.status.success(), "{}", text(&output));
    assert!(
        text(&output).contains("example.org resumed"),
        "{}",
        text(&output)
    );
}
