//! Outbound delivery end to end: the real relay hands mail to real SMTP
//! sinks — through a smart host, through MX records served by dnsmasq, to a
//! local drop directory — within per-domain connection caps, retrying after
//! temporary failures, bouncing permanent ones, with or without TLS, and
//! writing one delivery-log line per attempt and recipient.
//!
//! Everything here is written against the configuration contract
//! (`[delivery]`, `[[domains]]`, `[queue]`, `[bounce]`); every wait is
//! bounded.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::json;
use smarthost_tests::ca::TestCa;
use smarthost_tests::dns::{DnsRecord, DnsServer};
use smarthost_tests::scenario::{
    assert_delivered_unchanged, assert_failure_report, delivery_log, dot_stuff, lines_for, message,
    route, start, start_in, submit, wait_for_log, ARRIVAL, POLL,
};
use smarthost_tests::sink::{Sink, SinkOptions};
use smarthost_tests::smtp::{queued_id, Client};

#[test]
fn smart_host_gets_every_message_byte_for_byte() {
    let sink = Sink::start(SinkOptions::default());
    let setup = start(&format!("smart_host = \"{}\"", sink.smart_host()), "", None);

    let ascii = message(
        "user@example.org",
        "plain ascii",
        "Hello.\r\n.a line that starts with a dot\r\n..two dots\r\n.\r\nend\r\n",
    );
    let eight_bit = message(
        "user@example.org",
        "eight bit",
        "Grüße aus Köln — ünïcödé ✓\r\n.Ärger mit Punkten\r\n\r\n",
    );
    submit(
        &setup.relay,
        "app@sender.test",
        &["user@example.org"],
        &ascii,
    );
    submit(
        &setup.relay,
        "app@sender.test",
        &["user@example.org", "other@example.org"],
        &eight_bit,
    );

    let got = sink.wait_for(2, ARRIVAL);
    let by_subject = |s: &str| {
        got.iter()
            .find(|m| m.header("Subject").as_deref() == Some(s))
            .unwrap_or_else(|| panic!("no message {s:?} in {got:?}"))
    };
    let plain = by_subject("plain ascii");
    assert_delivered_unchanged(plain, &ascii);
    assert_eq!(plain.mail_from, "app@sender.test");
    assert_eq!(plain.rcpt_tos, ["user@example.org"]);

    let eight = by_subject("eight bit");
    assert_delivered_unchanged(eight, &eight_bit);
    let rcpts: BTreeSet<_> = got
        .iter()
        .filter(|m| m.header("Subject").as_deref() == Some("eight bit"))
        .flat_map(|m| m.rcpt_tos.iter().cloned())
        .collect();
    assert_eq!(
        rcpts,
        BTreeSet::from([
            "other@example.org".to_string(),
            "user@example.org".to_string()
        ])
    );
    assert!(
        eight.mail_options.contains(&"BODY=8BITMIME".to_string()),
        "8-bit content goes out with BODY=8BITMIME to a server that offers it: {:?}",
        eight.mail_options
    );
    assert!(
        eight.helo.as_deref() == Some("relay.test"),
        "EHLO names the relay: {:?}",
        eight.helo
    );
}

#[test]
fn mx_records_route_mail_to_the_domains_server() {
    let sink = Sink::start(SinkOptions::default());
    let dns = DnsServer::start(&[
        DnsRecord::mx("example.test", "mx1.example.test", 10),
        DnsRecord::a("mx1.example.test", std::net::Ipv4Addr::LOCALHOST),
    ]);
    let setup = start(
        &format!(
            "dns_servers = [\"{}\"]\nmx_port = {}",
            dns.addr(),
            sink.addr().port()
        ),
        "",
        None,
    );

    let content = message("user@example.test", "via mx", "Found by MX.\r\n");
    submit(
        &setup.relay,
        "app@sender.test",
        &["user@example.test"],
        &content,
    );
    let got = sink.wait_for(1, ARRIVAL);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].rcpt_tos, ["user@example.test"]);
    assert_delivered_unchanged(&got[0], &content);
    assert!(
        dns.log().contains("example.test"),
        "the relay asked our DNS server:\n{}",
        dns.log()
    );
}

#[test]
fn connections_per_domain_stay_under_the_cap_and_nothing_is_duplicated() {
    const MESSAGES: usize = 200;
    const SUBMITTERS: usize = 4;
    // A pause before every reply holds connections open long enough for
    // any excess parallelism to show.
    let sink = Sink::start(SinkOptions::default().delay(Duration::from_millis(10)));
    let setup = start(
        &format!(
            "smart_host = \"{}\"\nmax_connections_per_domain = 3",
            sink.smart_host()
        ),
        "",
        None,
    );

    std::thread::scope(|scope| {
        for worker in 0..SUBMITTERS {
            let relay = &setup.relay;
            scope.spawn(move || {
                let (mut c, _) = Client::connect(relay.smtp);
                c.expect("EHLO app.example", 250);
                for i in (worker..MESSAGES).step_by(SUBMITTERS) {
                    let reply = c.send_message(
                        "app@sender.test",
                        &["user@throttle.test"],
                        &format!("Subject: throttle-{i}\r\n\r\nmessage {i}\r\n"),
                    );
                    queued_id(&reply);
                }
                c.expect("QUIT", 221);
            });
        }
    });

    sink.assert_each_subject_once(MESSAGES, Duration::from_secs(50));

    let stats = sink.stats();
    let peak = stats
        .peak_concurrent_by_domain
        .get("throttle.test")
        .copied()
        .unwrap_or(0);
    assert!((1..=3).contains(&peak), "peak per domain {peak}: {stats:?}");
    assert!(stats.peak_concurrent <= 3, "{stats:?}");
}

#[test]
fn a_temporary_failure_is_retried_until_accepted() {
    let sink = Sink::start(SinkOptions::default().script(json!({"data": [451, 451, 250]})));
    let setup = start(
        &format!("smart_host = \"{}\"", sink.smart_host()),
        "",
        Some("1s"),
    );

    let content = message("user@retry.test", "retried", "Third time lucky.\r\n");
    let submitted = Instant::now();
    let id = submit(
        &setup.relay,
        "app@sender.test",
        &["user@retry.test"],
        &content,
    );
    let got = sink.wait_for(1, ARRIVAL);
    let elapsed = submitted.elapsed();
    assert!(
        elapsed >= Duration::from_secs(2),
        "two 1 s retry intervals passed first, not {elapsed:?}"
    );
    assert_eq!(got.len(), 1);
    assert_delivered_unchanged(&got[0], &content);

    let lines = wait_for_log(&setup.log_file, Duration::from_secs(10), |lines| {
        lines_for(lines, &id)
            .iter()
            .any(|l| l["outcome"] == "delivered")
    });
    let attempts: Vec<(u64, String)> = lines_for(&lines, &id)
        .iter()
        .map(|l| {
            (
                l["attempt"].as_u64().unwrap_or(0),
                l["outcome"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(
        attempts,
        [
            (1, "deferred".to_string()),
            (2, "deferred".to_string()),
            (3, "delivered".to_string())
        ]
    );
}

#[test]
fn a_permanent_failure_bounces_to_the_sender_with_a_copy() {
    let sink = Sink::start(SinkOptions::default().script(json!({"rcpt": {"fail@dest.test": 550}})));
    let bounces = Sink::start(SinkOptions::default());
    let setup = start(
        &format!("smart_host = \"{}\"", sink.smart_host()),
        &format!(
            "{}\n{}\n[bounce]\ncopy_to = \"postmaster@copy.test\"\n",
            route("sender.test", &bounces),
            route("copy.test", &bounces)
        ),
        None,
    );

    submit(
        &setup.relay,
        "app@sender.test",
        &["fail@dest.test"],
        &message("fail@dest.test", "doomed", "This will not arrive.\r\n"),
    );
    bounces.wait_for(2, ARRIVAL);
    std::thread::sleep(Duration::from_secs(1));
    let got = bounces.messages();
    assert_eq!(got.len(), 2, "one report to the sender, one copy: {got:#?}");
    assert!(sink.messages().is_empty());

    let rcpts: BTreeSet<String> = got.iter().flat_map(|m| m.rcpt_tos.clone()).collect();
    assert_eq!(
        rcpts,
        BTreeSet::from([
            "app@sender.test".to_string(),
            "postmaster@copy.test".to_string()
        ])
    );
    for dsn in &got {
        assert_failure_report(dsn, "fail@dest.test");
    }
}

/// A report refused by the sender's server cannot go back to anyone:
/// it goes to the postmaster (`bounce.double_bounce_to`), whole, once;
/// and when the postmaster refuses too, nothing more is sent.
#[test]
fn a_report_that_cannot_be_delivered_goes_to_the_postmaster_once() {
    let sink = Sink::start(SinkOptions::default().script(json!({"rcpt": {"fail@dest.test": 550}})));
    let senders =
        Sink::start(SinkOptions::default().script(json!({"rcpt": {"app@sender.test": 550}})));
    let admin =
        Sink::start(SinkOptions::default().script(json!({"rcpt": {"refuses@admin.test": 550}})));
    let start_relay = |postmaster: &str| {
        start(
            &format!("smart_host = \"{}\"", sink.smart_host()),
            &format!(
                "{}\n{}\n[bounce]\ndouble_bounce_to = \"{postmaster}\"\n",
                route("sender.test", &senders),
                route("admin.test", &admin)
            ),
            None,
        )
    };

    let setup = start_relay("hostmaster@admin.test");
    let id = submit(
        &setup.relay,
        "app@sender.test",
        &["fail@dest.test"],
        &message("fail@dest.test", "doomed", "This will not arrive.\r\n"),
    );
    let got = admin.wait_for(1, ARRIVAL);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(admin.messages().len(), 1, "one notice: {got:#?}");
    let notice = &got[0];
    assert_eq!(notice.rcpt_tos, ["hostmaster@admin.test"]);
    // The notice names the report's failure, and returns the report whole,
    // which names the original failure and its message.
    assert_failure_report(notice, "app@sender.test");
    let text = String::from_utf8_lossy(&notice.body);
    assert!(text.contains("Subject: Postmaster Notice"), "{text}");
    assert!(text.contains("Content-Type: message/rfc822"), "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("final-recipient: rfc822; fail@dest.test"),
        "{text}"
    );
    assert!(text.contains("Subject: doomed"), "{text}");
    assert!(sink.messages().is_empty());
    let lines = wait_for_log(&setup.log_file, Duration::from_secs(10), |lines| {
        lines_for(lines, &id)
            .iter()
            .any(|l| l["outcome"] == "failed")
    });
    assert_eq!(lines_for(&lines, &id).len(), 1, "{lines:#?}");
    drop(setup);

    // The postmaster refuses its notice: no triple bounce, and the queue
    // ends empty.
    let setup = start_relay("refuses@admin.test");
    submit(
        &setup.relay,
        "app@sender.test",
        &["fail@dest.test"],
        &message("fail@dest.test", "doomed again", "Nor will this.\r\n"),
    );
    wait_for_log(&setup.log_file, Duration::from_secs(20), |lines| {
        lines
            .iter()
            .any(|l| l["recipient"] == "refuses@admin.test" && l["outcome"] == "failed")
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        admin.messages().len(),
        1,
        "nothing more reached the postmaster"
    );
    let failed_notices = delivery_log(&setup.log_file)
        .into_iter()
        .filter(|l| l["recipient"] == "refuses@admin.test")
        .count();
    assert_eq!(failed_notices, 1);
}

#[test]
fn required_tls_needs_a_trusted_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::create(dir.path());
    let sink = Sink::start(SinkOptions::default().tls(&ca.server_cert, &ca.server_key));

    // The sink's certificate is not trusted: the attempt is deferred and
    // nothing goes out in clear.
    let untrusted = start(
        &format!("smart_host = \"{}\"\ntls = \"required\"", sink.smart_host()),
        "",
        None,
    );
    let id = submit(
        &untrusted.relay,
        "app@sender.test",
        &["user@tls.test"],
        &message(
            "user@tls.test",
            "untrusted",
            "Not over an unverified channel.\r\n",
        ),
    );
    let lines = wait_for_log(&untrusted.log_file, Duration::from_secs(15), |lines| {
        lines_for(lines, &id)
            .iter()
            .any(|l| l["outcome"] == "deferred")
    });
    assert!(
        lines_for(&lines, &id)
            .iter()
            .all(|l| l["outcome"] == "deferred"),
        "{lines:?}"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        sink.messages().is_empty(),
        "nothing may arrive without verified TLS"
    );

    // With the CA as a trust root the same delivery goes through, encrypted.
    let trusted = start(
        &format!(
            "smart_host = \"{}\"\ntls = \"required\"\ntls_ca_file = {:?}",
            sink.smart_host(),
            ca.ca_cert.display().to_string()
        ),
        "",
        None,
    );
    let content = message("user@tls.test", "trusted", "Over verified TLS.\r\n");
    let id = submit(
        &trusted.relay,
        "app@sender.test",
        &["user@tls.test"],
        &content,
    );
    let got = sink.wait_for(1, ARRIVAL);
    assert_eq!(got.len(), 1, "only the trusted relay delivered");
    assert!(got[0].tls, "delivered over STARTTLS");
    assert_delivered_unchanged(&got[0], &content);
    let lines = wait_for_log(&trusted.log_file, Duration::from_secs(10), |lines| {
        lines_for(lines, &id)
            .iter()
            .any(|l| l["outcome"] == "delivered")
    });
    assert!(lines_for(&lines, &id)
        .iter()
        .any(|l| l["outcome"] == "delivered" && l["tls"] == true));
}

#[test]
fn a_local_domain_is_delivered_into_its_drop_dir() {
    let dir = tempfile::tempdir().unwrap();
    let drop_dir = dir.path().join("drop").join("local.test");
    std::fs::create_dir_all(&drop_dir).unwrap();
    let setup = start_in(
        dir,
        "",
        &format!(
            "[[domains]]\nname = \"local.test\"\nkind = \"local\"\ndrop_dir = {:?}\n",
            drop_dir.display().to_string()
        ),
        None,
    );

    let content = message("user@local.test", "dropped", "Into the maildir.\r\n");
    submit(
        &setup.relay,
        "app@sender.test",
        &["user@local.test"],
        &content,
    );

    let new = drop_dir.join("new");
    let deadline = Instant::now() + ARRIVAL;
    let files = loop {
        let files: Vec<PathBuf> = std::fs::read_dir(&new)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        if !files.is_empty() || Instant::now() >= deadline {
            break files;
        }
        std::thread::sleep(POLL);
    };
    assert_eq!(files.len(), 1, "one file in {}", new.display());
    let stored = std::fs::read(&files[0]).unwrap();
    assert!(
        stored.ends_with(content.as_bytes()),
        "the drop file holds the message:\n{}",
        String::from_utf8_lossy(&stored)
    );
}

#[test]
fn the_delivery_log_has_one_line_per_attempt_and_recipient() {
    let sink = Sink::start(SinkOptions::default().script(json!({
        "rcpt": {"later@log.test": [451, 250], "bad@log.test": 550},
    })));
    let setup = start(
        &format!("smart_host = \"{}\"", sink.smart_host()),
        "",
        Some("1s"),
    );

    let id = submit(
        &setup.relay,
        "app@sender.test",
        &["ok@log.test", "later@log.test", "bad@log.test"],
        &message("ok@log.test", "logged", "Three recipients.\r\n"),
    );
    wait_for_log(&setup.log_file, ARRIVAL, |lines| {
        lines_for(lines, &id).len() >= 4
    });
    // Anything logged twice would show up right after.
    std::thread::sleep(Duration::from_secs(2));
    let lines = delivery_log(&setup.log_file);
    let ours = lines_for(&lines, &id);

    for line in &ours {
        for field in [
            "message_id",
            "domain",
            "recipient",
            "remote_host",
            "remote_ip",
            "tls",
            "reply",
            "outcome",
            "attempt",
            "latency_ms",
        ] {
            assert!(line.get(field).is_some(), "{field} missing in {line}");
        }
        assert_eq!(line["domain"], "log.test", "{line}");
        assert_eq!(line["remote_ip"], "127.0.0.1", "{line}");
        assert!(
            line["remote_host"].as_str().is_some_and(|h| !h.is_empty()),
            "{line}"
        );
        assert_eq!(line["tls"], false, "{line}");
        assert!(line["latency_ms"].as_u64().is_some(), "{line}");
        assert!(line["attempt"].as_u64().is_some_and(|a| a >= 1), "{line}");
    }

    let mut seen: Vec<(String, u64, String, String)> = ours
        .iter()
        .map(|l| {
            (
                l["recipient"].as_str().unwrap_or("").to_string(),
                l["attempt"].as_u64().unwrap_or(0),
                l["outcome"].as_str().unwrap_or("").to_string(),
                l["reply"].as_str().unwrap_or("").chars().take(3).collect(),
            )
        })
        .collect();
    seen.sort();
    let expected = [
        ("bad@log.test", 1, "failed", "550"),
        ("later@log.test", 1, "deferred", "451"),
        ("later@log.test", 2, "delivered", "250"),
        ("ok@log.test", 1, "delivered", "250"),
    ]
    .map(|(r, a, o, c)| (r.to_string(), a, o.to_string(), c.to_string()));
    assert_eq!(seen, expected, "{ours:#?}");

    // Each recipient got the message exactly once.
    let got = sink.messages();
    let mut delivered: Vec<String> = got.iter().flat_map(|m| m.rcpt_tos.clone()).collect();
    delivered.retain(|r| r.ends_with("@log.test"));
    delivered.sort();
    assert_eq!(delivered, ["later@log.test", "ok@log.test"]);
}

/// The helpers above, checked against the sink with hand-made input, so a
/// failure of the scenarios is never theirs.
#[test]
fn the_checks_accept_what_a_correct_relay_sends() {
    let sink = Sink::start(SinkOptions::default());
    let content = message(
        "user@example.org",
        "helper check",
        "Grüße\r\n.dot\r\n.\r\nend\r\n",
    );
    let received = "Received: from app.example (127.0.0.1)\r\n\tby relay.test with ESMTP id 1;\r\n\tThu, 05 Nov 2026 10:00:01 +0000\r\n";
    let report = "From: Mail Delivery System <MAILER-DAEMON@relay.test>\r\n\
        To: app@sender.test\r\nSubject: Undelivered Mail\r\nMIME-Version: 1.0\r\n\
        Content-Type: multipart/report; report-type=delivery-status; boundary=\"b1\"\r\n\r\n\
        --b1\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n\
        --b1\r\nContent-Type: message/delivery-status\r\n\r\n\
        Reporting-MTA: dns; relay.test\r\n\r\n\
        Final-Recipient: rfc822; fail@dest.test\r\nAction: failed\r\nStatus: 5.1.1\r\n\
        Diagnostic-Code: smtp; 550 5.1.1 No such user\r\n\r\n\
        --b1\r\nContent-Type: text/rfc822-headers\r\n\r\nSubject: doomed\r\n\r\n\
        --b1--\r\n";

    let (mut c, _) = Client::connect(sink.addr());
    c.expect("EHLO relay.test", 250);
    c.expect("MAIL FROM:<app@sender.test> BODY=8BITMIME", 250);
    c.expect("RCPT TO:<user@example.org>", 250);
    assert_eq!(
        c.send_data(&dot_stuff(&format!("{received}{content}")))
            .code,
        250
    );
    c.expect("MAIL FROM:<>", 250);
    c.expect("RCPT TO:<app@sender.test>", 250);
    assert_eq!(c.send_data(&dot_stuff(report)).code, 250);
    c.expect("QUIT", 221);

    let got = sink.wait_for(2, Duration::from_secs(10));
    assert_delivered_unchanged(&got[0], &content);
    assert_failure_report(&got[1], "fail@dest.test");
}
