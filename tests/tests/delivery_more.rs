//! More outbound delivery end to end, against the real relay and real
//! peers: a per-domain rate, the one "delayed" report, 8-bit content for a
//! server without 8BITMIME, UTF-8 addresses for a server without SMTPUTF8,
//! AUTH over verified TLS to a second relay, a null MX, and falling back
//! to the next MX host.
//!
//! Every wait is bounded; only 127.0.0.0/8 is used.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, SystemTime};

use mail_parser::MessageParser;
use serde_json::{json, Value};
use smarthost_tests::ca::TestCa;
use smarthost_tests::dns::{DnsRecord, DnsServer};
use smarthost_tests::relay::Relay;
use smarthost_tests::scenario::{
    assert_failure_report, assert_report, delivery_log, delivery_status, dot_stuff, lines_for,
    message, route, start, start_with_env, submit, wait_for_log, Setup, ARRIVAL,
};
use smarthost_tests::sink::{Sink, SinkOptions};
use smarthost_tests::smtp::{queued_id, Client};

/// The `time` of a delivery-log line.
#[track_caller]
fn log_time(line: &Value) -> SystemTime {
    let text = line["time"]
        .as_str()
        .unwrap_or_else(|| panic!("no time in {line}"));
    humantime::parse_rfc3339(text).unwrap_or_else(|e| panic!("{e}: time {text:?} in {line}"))
}

#[test]
fn a_domain_rate_spaces_its_messages() {
    const MESSAGES: usize = 10;
    let sink = Sink::start(SinkOptions::default());
    let setup = start(
        "",
        &format!("{}rate = \"5/s\"\n", route("slow.test", &sink)),
        None,
    );

    let ids: Vec<String> = (0..MESSAGES)
        .map(|i| {
            submit(
                &setup.relay,
                "app@sender.test",
                &["user@slow.test"],
                &message("user@slow.test", &format!("rate {i}"), "Not too fast.\r\n"),
            )
        })
        .collect();

    let lines = wait_for_log(&setup.log_file, ARRIVAL, |lines| {
        ids.iter().all(|id| {
            lines_for(lines, id)
                .iter()
                .any(|l| l["outcome"] == "delivered")
        })
    });
    // Anything sent twice would arrive soon after the last one.
    std::thread::sleep(Duration::from_secs(1));
    let got = sink.messages();
    let mut subjects: Vec<String> = got.iter().filter_map(|m| m.header("Subject")).collect();
    subjects.sort();
    let mut expected: Vec<String> = (0..MESSAGES).map(|i| format!("rate {i}")).collect();
    expected.sort();
    assert_eq!(subjects, expected, "every message arrives, once");

    let times: Vec<SystemTime> = lines
        .iter()
        .filter(|l| l["domain"] == "slow.test" && l["outcome"] == "delivered")
        .map(log_time)
        .collect();
    assert_eq!(times.len(), MESSAGES, "{lines:#?}");
    let first = *times.iter().min().unwrap();
    let last = *times.iter().max().unwrap();
    let span = last.duration_since(first).unwrap_or_default();
    // 10 messages at 5/s: 9 gaps of 200 ms.
    assert!(
        span >= Duration::from_millis(1600),
        "10 messages at 5/s took only {span:?}:\n{lines:#?}"
    );
}

#[test]
fn a_long_delay_is_reported_to_the_sender_once() {
    let sink =
        Sink::start(SinkOptions::default().script(json!({"rcpt": {"slow@later.test": 451}})));
    let reports = Sink::start(SinkOptions::default());
    let setup = start_with_env(
        tempfile::tempdir().unwrap(),
        "",
        &format!(
            "{}{}",
            route("later.test", &sink),
            route("sender.test", &reports)
        ),
        &[
            ("SMARTHOST__QUEUE__RETRY_INTERVALS", "1s"),
            ("SMARTHOST__QUEUE__DELAY_NOTIFICATION", "1s"),
        ],
    );

    let id = submit(
        &setup.relay,
        "app@sender.test",
        &["slow@later.test"],
        &message("slow@later.test", "delayed", "This takes a while.\r\n"),
    );
    let got = reports.wait_for(1, ARRIVAL);
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(got[0].rcpt_tos, ["app@sender.test"]);
    assert_report(&got[0], "slow@later.test", "delayed", "4.");

    // Attempts go on, and none of them brings a second report.
    let attempts_then = lines_for(&delivery_log(&setup.log_file), &id).len();
    std::thread::sleep(Duration::from_secs(3));
    let lines = delivery_log(&setup.log_file);
    let ours = lines_for(&lines, &id);
    assert!(
        ours.len() > attempts_then,
        "the relay keeps trying: {ours:#?}"
    );
    assert!(ours.iter().all(|l| l["outcome"] == "deferred"), "{ours:#?}");
    let got = reports.messages();
    assert_eq!(got.len(), 1, "one delayed report only: {got:#?}");
    assert!(sink.messages().is_empty());
}

#[test]
fn eight_bit_mail_is_converted_for_a_server_without_8bitmime() {
    let sink = Sink::start(SinkOptions::default().no_8bitmime());
    let setup = start("", &route("seven.test", &sink), None);

    let text = "Grüße aus Köln — ünïcödé ✓\r\nÄrger mit Umlauten: äöüß\r\n";
    let content = message("user@seven.test", "downgraded", text);
    assert!(!content.is_ascii());
    // `submit` says BODY=8BITMIME for content that is not ASCII.
    submit(
        &setup.relay,
        "app@sender.test",
        &["user@seven.test"],
        &content,
    );

    let got = sink.wait_for(1, ARRIVAL);
    assert_eq!(got.len(), 1);
    let got = &got[0];
    assert!(
        got.body.iter().all(|&b| b < 0x80),
        "only 7-bit bytes may go to a server without 8BITMIME:\n{}",
        got.text()
    );
    assert!(
        !got.mail_options
            .iter()
            .any(|o| o.starts_with("BODY=8BITMIME")),
        "{:?}",
        got.mail_options
    );
    let parsed = MessageParser::default()
        .parse(&got.body)
        .expect("a parsable message");
    let original = MessageParser::default()
        .parse(content.as_bytes())
        .expect("a parsable message");
    let decoded = parsed.body_text(0).expect("a text body");
    assert_eq!(
        decoded.replace("\r\n", "\n"),
        text.replace("\r\n", "\n"),
        "the text survives the conversion:\n{}",
        got.text()
    );
    assert_eq!(decoded, original.body_text(0).unwrap());
    assert_eq!(parsed.subject(), Some("downgraded"));
}

#[test]
fn utf8_addresses_are_not_sent_to_a_server_without_smtputf8() {
    let sink = Sink::start(SinkOptions::default().no_smtputf8());
    let reports = Sink::start(SinkOptions::default());
    let setup = start(
        "",
        &format!(
            "{}{}",
            route("utf8.test", &sink),
            route("sender.test", &reports)
        ),
        None,
    );

    let rcpt = "用户@utf8.test";
    let (mut c, greeting) = Client::connect(setup.relay.smtp);
    assert_eq!(greeting.code, 220);
    let ehlo = c.expect("EHLO app.example", 250);
    assert!(ehlo.text.contains("SMTPUTF8"), "{ehlo:?}");
    c.expect("MAIL FROM:<app@sender.test> SMTPUTF8 BODY=8BITMIME", 250);
    c.expect(&format!("RCPT TO:<{rcpt}>"), 250);
    let id = queued_id(&c.send_data(&dot_stuff(&message(
        rcpt,
        "utf8 address",
        "An address the server cannot take.\r\n",
    ))));
    c.expect("QUIT", 221);

    let lines = wait_for_log(&setup.log_file, ARRIVAL, |lines| {
        !lines_for(lines, &id).is_empty()
    });
    let ours = lines_for(&lines, &id);
    assert_eq!(ours.len(), 1, "{ours:#?}");
    assert_eq!(ours[0]["outcome"], "failed", "{}", ours[0]);
    assert_eq!(ours[0]["recipient"], rcpt, "{}", ours[0]);
    let reply = ours[0]["reply"].as_str().unwrap_or("");
    assert!(
        reply.starts_with("553 5.6.7") || (reply.starts_with('5') && reply.contains("5.6.7")),
        "a 5.6.7 reply: {reply:?}"
    );

    let got = reports.wait_for(1, ARRIVAL);
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(got[0].rcpt_tos, ["app@sender.test"]);
    assert_eq!(got[0].mail_from, "", "reports are sent from <>");
    // A report in message/delivery-status stays 7-bit: the address goes as
    // utf-8-addr-xtext (RFC 6533 3).
    let xtext: String = rcpt
        .chars()
        .map(|c| {
            if c.is_ascii() {
                c.to_string()
            } else {
                format!("\\x{{{:x}}}", c as u32)
            }
        })
        .collect();
    let status = delivery_status(&got[0]);
    for expected in [
        "action:failed".to_string(),
        "status:5.6.7".to_string(),
        format!("final-recipient:utf-8;{xtext}"),
    ] {
        assert!(status.contains(&expected), "{expected} in:\n{status}");
    }
    assert!(sink.messages().is_empty(), "nothing was sent raw");
    assert_eq!(sink.stats().messages, 0);
}

/// A second relay that takes mail only from authenticated clients, over
/// STARTTLS with a certificate of `ca`.
fn auth_relay(ca: &TestCa) -> Relay {
    Relay::start(
        &format!(
            "relay_networks = []\n\n{}\n[[smtp.users]]\nname = \"app\"\npassword_hash = {:?}\n",
            ca.smtp_tls_section(),
            smarthost_node::auth::hash_password("s3cret")
        ),
        "",
    )
}

/// A relay that sends `auth.test` to `smart_host` over verified TLS,
/// logging in with `password`.
fn relay_with_login(ca: &TestCa, smart_host: &Relay, password: &str) -> Setup {
    start(
        &format!("tls_ca_file = {:?}", ca.ca_cert.display().to_string()),
        &format!(
            "[[domains]]\nname = \"auth.test\"\nsmart_host = \"[127.0.0.1]:{}\"\n\
             tls = \"required\"\nauth = {{ user = \"app\", password = {password:?} }}\n",
            smart_host.smtp.port()
        ),
        None,
    )
}

#[test]
fn a_smart_host_that_wants_auth_gets_it_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::create(dir.path());
    let mut b = auth_relay(&ca);

    let a = relay_with_login(&ca, &b, "s3cret");
    let id = submit(
        &a.relay,
        "app@sender.test",
        &["user@auth.test"],
        &message("user@auth.test", "authenticated", "Logged in.\r\n"),
    );
    let lines = wait_for_log(&a.log_file, ARRIVAL, |lines| {
        !lines_for(lines, &id).is_empty()
    });
    let ours = lines_for(&lines, &id);
    assert_eq!(ours.len(), 1, "{ours:#?}");
    assert_eq!(ours[0]["outcome"], "delivered", "{}", ours[0]);
    assert_eq!(ours[0]["tls"], true, "{}", ours[0]);

    // The same with a wrong password: B takes nothing.
    let wrong = relay_with_login(&ca, &b, "wrong");
    let wrong_id = submit(
        &wrong.relay,
        "app@sender.test",
        &["user@auth.test"],
        &message("user@auth.test", "not authenticated", "Wrong password.\r\n"),
    );
    let lines = wait_for_log(&wrong.log_file, ARRIVAL, |lines| {
        !lines_for(lines, &wrong_id).is_empty()
    });
    let ours = lines_for(&lines, &wrong_id);
    assert!(
        ours.iter().all(|l| l["outcome"] != "delivered"),
        "{ours:#?}"
    );
    // A refused login is not the recipient's fault: the delivery waits for
    // the operator to fix the password, as with any host that fails.
    assert_eq!(ours[0]["outcome"], "deferred", "{}", ours[0]);
    let reply = ours[0]["reply"].as_str().unwrap_or("");
    assert!(
        reply.contains("AUTH") && reply.contains("535"),
        "the reply names the refused login: {reply:?}"
    );
    std::thread::sleep(Duration::from_secs(3));

    b.terminate(Duration::from_secs(30));
    let records = b.spool_records();
    let subjects: BTreeMap<String, _> = records
        .iter()
        .map(|r| {
            let body = b.spool_body(&r.id);
            let text = String::from_utf8_lossy(&body).into_owned();
            let subject = text
                .split("\r\n")
                .find_map(|l| l.strip_prefix("Subject: "))
                .unwrap_or("")
                .to_string();
            (subject, text)
        })
        .collect();
    assert_eq!(
        subjects.keys().collect::<Vec<_>>(),
        ["authenticated"],
        "only the authenticated relay's message reached B"
    );
    let stored = &subjects["authenticated"];
    // The top field with its continuation lines, unfolded.
    let mut header = stored.split("\r\n");
    let mut received = header.next().unwrap_or("").to_string();
    for line in header.take_while(|l| l.starts_with([' ', '\t'])) {
        received.push_str(line);
    }
    assert!(
        stored.starts_with("Received:"),
        "B's trace header comes first:\n{stored}"
    );
    assert!(
        received.contains("with ESMTPSA"),
        "B saw TLS and AUTH: {received}"
    );
}

#[test]
fn a_null_mx_fails_at_once() {
    let reports = Sink::start(SinkOptions::default());
    let dns = DnsServer::start(&[DnsRecord::null_mx("nullmx.test")]);
    let setup = start(
        &format!("dns_servers = [\"{}\"]", dns.addr()),
        &route("sender.test", &reports),
        None,
    );

    let id = submit(
        &setup.relay,
        "app@sender.test",
        &["user@nullmx.test"],
        &message("user@nullmx.test", "null mx", "Nobody takes this.\r\n"),
    );
    let lines = wait_for_log(&setup.log_file, ARRIVAL, |lines| {
        !lines_for(lines, &id).is_empty()
    });
    let ours = lines_for(&lines, &id);
    assert_eq!(ours.len(), 1, "{ours:#?}");
    assert_eq!(ours[0]["outcome"], "failed", "{}", ours[0]);
    assert_eq!(ours[0]["attempt"], 1, "{}", ours[0]);
    let reply = ours[0]["reply"].as_str().unwrap_or("");
    assert!(
        reply.starts_with('5') && reply.to_ascii_lowercase().contains("null mx"),
        "{reply:?}"
    );

    let got = reports.wait_for(1, ARRIVAL);
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(got[0].rcpt_tos, ["app@sender.test"]);
    assert_failure_report(&got[0], "user@nullmx.test");
}

#[test]
fn mail_goes_to_the_next_mx_when_the_first_does_not_answer() {
    let sink = Sink::start(SinkOptions::default());
    // Nothing listens on the sink's port at 127.0.0.9.
    let dead = Ipv4Addr::new(127, 0, 0, 9);
    assert!(
        std::net::TcpStream::connect_timeout(
            &(dead, sink.addr().port()).into(),
            Duration::from_secs(2)
        )
        .is_err(),
        "something listens on {dead}:{}",
        sink.addr().port()
    );
    let dns = DnsServer::start(&[
        DnsRecord::mx("fallback.test", "mx1.fallback.test", 10),
        DnsRecord::mx("fallback.test", "mx2.fallback.test", 20),
        DnsRecord::a("mx1.fallback.test", dead),
        DnsRecord::a("mx2.fallback.test", Ipv4Addr::LOCALHOST),
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

    let id = submit(
        &setup.relay,
        "app@sender.test",
        &["user@fallback.test"],
        &message("user@fallback.test", "fallback", "Second choice.\r\n"),
    );
    let got = sink.wait_for(1, ARRIVAL);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].rcpt_tos, ["user@fallback.test"]);

    let lines = wait_for_log(&setup.log_file, ARRIVAL, |lines| {
        !lines_for(lines, &id).is_empty()
    });
    let ours = lines_for(&lines, &id);
    assert_eq!(ours.len(), 1, "one attempt: {ours:#?}");
    assert_eq!(ours[0]["outcome"], "delivered", "{}", ours[0]);
    assert_eq!(ours[0]["remote_ip"], "127.0.0.1", "{}", ours[0]);
    assert_eq!(ours[0]["remote_host"], "mx2.fallback.test", "{}", ours[0]);
}

#[test]
fn sighup_reopens_the_delivery_log_for_rotation() {
    let sink = Sink::start(SinkOptions::default());
    let setup = start(&format!("smart_host = \"{}\"", sink.smart_host()), "", None);
    let delivered = |id: String| {
        move |lines: &[Value]| {
            lines_for(lines, &id)
                .iter()
                .any(|l| l["outcome"] == "delivered")
        }
    };
    let before = submit(
        &setup.relay,
        "app@sender.test",
        &["user@example.org"],
        &message("user@example.org", "before", "Before the rotation.\r\n"),
    );
    wait_for_log(&setup.log_file, ARRIVAL, delivered(before.clone()));

    // Rotate as logrotate does: move the file away, then SIGHUP.
    let rotated = setup.log_file.with_extension("log.1");
    std::fs::rename(&setup.log_file, &rotated).unwrap();
    setup.relay.send_signal(libc::SIGHUP);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !setup.log_file.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "no new delivery log after SIGHUP:\n{}",
            setup.relay.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let after = submit(
        &setup.relay,
        "app@sender.test",
        &["user@example.org"],
        &message("user@example.org", "after", "After the rotation.\r\n"),
    );
    let new_lines = wait_for_log(&setup.log_file, ARRIVAL, delivered(after.clone()));
    assert!(lines_for(&new_lines, &before).is_empty(), "{new_lines:?}");
    let old_lines = delivery_log(&rotated);
    assert!(!lines_for(&old_lines, &before).is_empty(), "{old_lines:?}");
    assert!(lines_for(&old_lines, &after).is_empty(), "{old_lines:?}");
    assert!(setup.relay.log().contains("delivery log reopened"));
    assert_eq!(
        smarthost_tests::http::get(setup.relay.admin_addr(), "/healthz", None).status,
        200
    );
}
