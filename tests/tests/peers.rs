//! The peers the relay delivers to, tested on their own so that a delivery
//! test failure is never the peer's fault: the SMTP sink keeps exactly what
//! it is sent, over plain TCP and STARTTLS, fails on script and counts
//! connections; dnsmasq answers MX and A as a real DNS server.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use smarthost_tests::ca::TestCa;
use smarthost_tests::dns::{DnsRecord, DnsServer};
use smarthost_tests::sink::{strip_first_received, Sink, SinkOptions};
use smarthost_tests::smtp::Client;

/// Sends the file `message` with Python's smtplib (which dot-stuffs);
/// `tls_ca` turns on STARTTLS verified against that CA.
const SMTPLIB: &str = r#"
import smtplib, ssl, sys
port, message_file, tls_ca, body = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
with open(message_file, "rb") as f:
    message = f.read()
with smtplib.SMTP("127.0.0.1", int(port), local_hostname="python.example", timeout=15) as s:
    s.ehlo()
    if tls_ca:
        s.starttls(context=ssl.create_default_context(cafile=tls_ca))
        s.ehlo()
    options = ["BODY=8BITMIME"] if body == "8bit" else []
    s.sendmail("app@example.com", ["user@example.org"], message, mail_options=options)
print("sent")
"#;

fn smtplib_send(sink: &Sink, message: &[u8], tls_ca: Option<&std::path::Path>, body: &str) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("message.eml");
    std::fs::write(&file, message).unwrap();
    let ca = tls_ca.map(|p| p.display().to_string()).unwrap_or_default();
    let output = Command::new("python3")
        .args(["-c", SMTPLIB, &sink.addr().port().to_string()])
        .arg(&file)
        .args([&ca, body])
        .output()
        .expect("run python3 (scripts/test.sh installs it)");
    assert!(
        output.status.success(),
        "smtplib failed:\n{}{}\nsink log:\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        sink.log()
    );
}

/// Headers, 8-bit UTF-8, a line that starts with a dot, a lone-dot-looking
/// line and a blank line at the end: what a sink must keep unchanged.
fn tricky_message(subject: &str) -> Vec<u8> {
    format!(
        "From: app@example.com\r\nTo: user@example.org\r\nSubject: {subject}\r\n\
         Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n\
         Grüße aus Köln — ünïcödé\r\n.dots at the start\r\n.\r\n..\r\nlast line\r\n\r\n"
    )
    .into_bytes()
}

#[test]
fn smtplib_plain_message_is_stored_byte_for_byte() {
    let sink = Sink::start(SinkOptions::default());
    let message = tricky_message("plain");
    smtplib_send(&sink, &message, None, "8bit");

    let got = sink.wait_for(1, Duration::from_secs(10));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body, message, "{:?}", got[0].text());
    assert_eq!(got[0].mail_from, "app@example.com");
    assert_eq!(got[0].rcpt_tos, ["user@example.org"]);
    assert!(!got[0].tls);
    assert!(
        got[0].mail_options.contains(&"BODY=8BITMIME".to_string()),
        "{:?}",
        got[0].mail_options
    );
    assert_eq!(got[0].helo.as_deref(), Some("python.example"));
    assert_eq!(got[0].header("Subject").as_deref(), Some("plain"));
}

#[test]
fn smtplib_starttls_is_recorded_as_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::create(dir.path());
    let sink = Sink::start(SinkOptions::default().tls(&ca.server_cert, &ca.server_key));
    let message = tricky_message("over tls");
    smtplib_send(&sink, &message, Some(&ca.ca_cert), "8bit");

    let got = sink.wait_for(1, Duration::from_secs(10));
    assert!(got[0].tls, "the message came over STARTTLS");
    assert_eq!(got[0].body, message);
}

#[test]
fn the_sink_undoes_dot_stuffing_exactly_once() {
    let sink = Sink::start(SinkOptions::default());
    let (mut c, greeting) = Client::connect(sink.addr());
    assert_eq!(greeting.code, 220);
    c.expect("EHLO client.example", 250);
    // On the wire: stuffed as a client must; stored: as the author wrote it.
    let reply = c.send_message(
        "a@example.com",
        &["b@example.org"],
        "Subject: dots\r\n\r\n..dots\r\n...two\r\nplain\r\n",
    );
    assert_eq!(reply.code, 250, "{reply:?}");
    c.expect("QUIT", 221);

    let got = sink.wait_for(1, Duration::from_secs(10));
    assert_eq!(
        got[0].body,
        b"Subject: dots\r\n\r\n.dots\r\n..two\r\nplain\r\n"
    );
}

#[test]
fn extensions_can_be_hidden() {
    let sink = Sink::start(SinkOptions::default());
    let (mut c, _) = Client::connect(sink.addr());
    let ehlo = c.expect("EHLO client.example", 250).text.to_uppercase();
    assert!(
        ehlo.contains("8BITMIME") && ehlo.contains("SMTPUTF8"),
        "{ehlo}"
    );
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");

    let sink = Sink::start(SinkOptions::default().no_8bitmime().no_smtputf8());
    let (mut c, _) = Client::connect(sink.addr());
    let ehlo = c.expect("EHLO client.example", 250).text.to_uppercase();
    assert!(
        !ehlo.contains("8BITMIME") && !ehlo.contains("SMTPUTF8"),
        "{ehlo}"
    );
    assert_eq!(c.cmd("MAIL FROM:<a@example.com> BODY=8BITMIME").code, 555);
    assert_eq!(c.cmd("MAIL FROM:<a@example.com> SMTPUTF8").code, 501);
    c.expect("MAIL FROM:<a@example.com>", 250);
}

#[test]
fn scripted_replies_fail_then_accept_across_attempts() {
    let sink = Sink::start(SinkOptions::default().script(json!({
        "rcpt": {"fail@x.test": 550, "later@x.test": [451, 250]},
        "data": [451, "452 4.3.1 Insufficient storage (scripted)", 250],
    })));

    // Attempt 1: the recipients as scripted, then DATA 451.
    let (mut c, _) = Client::connect(sink.addr());
    c.expect("EHLO client.example", 250);
    c.expect("MAIL FROM:<a@example.com>", 250);
    assert_eq!(c.cmd("RCPT TO:<fail@x.test>").code, 550);
    assert_eq!(c.cmd("RCPT TO:<Later@X.test>").code, 451);
    c.expect("RCPT TO:<ok@x.test>", 250);
    c.expect("DATA", 354);
    c.send_raw(b"Subject: one\r\n\r\nbody\r\n.\r\n");
    assert_eq!(c.read_reply().code, 451);

    // Attempt 2, same connection: later@ is now accepted, DATA gets 452.
    c.expect("RSET", 250);
    c.expect("MAIL FROM:<a@example.com>", 250);
    assert_eq!(c.cmd("RCPT TO:<fail@x.test>").code, 550);
    c.expect("RCPT TO:<later@x.test>", 250);
    let reply = c.send_data("Subject: two\r\n\r\nbody\r\n");
    assert_eq!(reply.code, 452);
    assert_eq!(reply.status(), Some("4.3.1"));
    c.expect("QUIT", 221);
    assert!(sink.messages().is_empty(), "nothing was accepted yet");

    // Attempt 3, a new connection: the last scripted reply repeats from now on.
    let (mut c, _) = Client::connect(sink.addr());
    c.expect("EHLO client.example", 250);
    let reply = c.send_message(
        "a@example.com",
        &["later@x.test"],
        "Subject: three\r\n\r\nbody\r\n",
    );
    assert_eq!(reply.code, 250, "{reply:?}");
    let reply = c.send_message(
        "a@example.com",
        &["later@x.test"],
        "Subject: four\r\n\r\nbody\r\n",
    );
    assert_eq!(reply.code, 250, "{reply:?}");
    let got = sink.wait_for(2, Duration::from_secs(10));
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].header("Subject").as_deref(), Some("three"));
    assert_eq!(got[1].header("Subject").as_deref(), Some("four"));
}

#[test]
fn peak_concurrency_counts_connections_held_open() {
    let sink = Sink::start(SinkOptions::default().delay(Duration::from_millis(100)));
    let mut clients = Vec::new();
    for domain in ["x.test", "x.test", "x.test", "y.test"] {
        let (mut c, _) = Client::connect(sink.addr());
        c.expect("EHLO client.example", 250);
        c.expect("MAIL FROM:<a@example.com>", 250);
        c.expect(&format!("RCPT TO:<user@{domain}>"), 250);
        c.expect(&format!("RCPT TO:<other@{domain}.other>"), 250);
        clients.push(c);
    }
    let stats = sink.stats();
    assert_eq!(stats.connections_total, 4, "{stats:?}");
    assert_eq!(stats.connections_open, 4, "{stats:?}");
    assert_eq!(stats.peak_concurrent, 4, "{stats:?}");
    assert_eq!(stats.peak_concurrent_by_domain["x.test"], 3, "{stats:?}");
    assert_eq!(stats.peak_concurrent_by_domain["y.test"], 1, "{stats:?}");
    assert!(!stats.peak_concurrent_by_domain.contains_key("x.test.other"));

    for mut c in clients {
        c.expect("QUIT", 221);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while sink.stats().connections_open > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let stats = sink.stats();
    assert_eq!(stats.connections_open, 0, "{stats:?}");
    assert_eq!(stats.peak_concurrent, 4, "peaks are kept: {stats:?}");
}

#[test]
fn a_sink_listens_on_another_loopback_address() {
    let ip = Ipv4Addr::new(127, 0, 0, 7);
    let sink = Sink::start(SinkOptions::default().ip(ip));
    assert_eq!(sink.addr().ip(), IpAddr::V4(ip));
    assert_eq!(
        sink.smart_host(),
        format!("[127.0.0.7]:{}", sink.addr().port())
    );
    let (_c, greeting) = Client::connect(sink.addr());
    assert_eq!(greeting.code, 220);
}

#[test]
fn only_the_first_received_field_is_stripped() {
    let data = b"Received: from a\r\n\tby relay.test; date\r\nReceived: from b\r\nSubject: s\r\n\r\nbody\r\n";
    assert_eq!(
        strip_first_received(data),
        b"Received: from b\r\nSubject: s\r\n\r\nbody\r\n"
    );
    let no_trace = b"Subject: s\r\n\r\nReceived: in the body\r\n";
    assert_eq!(strip_first_received(no_trace), no_trace);
}

#[tokio::test]
async fn dnsmasq_answers_mx_a_null_mx_and_nxdomain() {
    use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
    use hickory_resolver::net::runtime::TokioRuntimeProvider;
    use hickory_resolver::proto::rr::RData;
    use hickory_resolver::Resolver;

    let dns = DnsServer::start(&[
        DnsRecord::mx("example.test", "mx1.example.test", 10),
        DnsRecord::mx("example.test", "mx2.example.test", 20),
        DnsRecord::a("mx1.example.test", Ipv4Addr::LOCALHOST),
        DnsRecord::a("mx2.example.test", Ipv4Addr::new(127, 0, 0, 2)),
        DnsRecord::null_mx("nomail.test"),
    ]);
    let server: SocketAddr = dns.addr();
    let mut udp = ConnectionConfig::udp();
    udp.port = server.port();
    let mut tcp = ConnectionConfig::tcp();
    tcp.port = server.port();
    let config = ResolverConfig::from_name_servers(vec![NameServerConfig::new(
        server.ip(),
        true,
        vec![udp, tcp],
    )]);
    let resolver = Resolver::builder_with_config(config, TokioRuntimeProvider::default())
        .build()
        .expect("a resolver");

    let mx = resolver.mx_lookup("example.test.").await.expect("MX");
    let mut hosts: Vec<(u16, String)> = mx
        .answers()
        .iter()
        .filter_map(|r| match &r.data {
            RData::MX(mx) => Some((mx.preference, mx.exchange.to_ascii())),
            _ => None,
        })
        .collect();
    hosts.sort();
    assert_eq!(
        hosts,
        [
            (10, "mx1.example.test.".to_string()),
            (20, "mx2.example.test.".to_string())
        ]
    );

    let a = resolver
        .lookup_ip("mx2.example.test.")
        .await
        .expect("A of mx2");
    assert_eq!(
        a.iter().collect::<Vec<_>>(),
        [IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))]
    );

    let null = resolver.mx_lookup("nomail.test.").await.expect("null MX");
    let records: Vec<(u16, String)> = null
        .answers()
        .iter()
        .filter_map(|r| match &r.data {
            RData::MX(mx) => Some((mx.preference, mx.exchange.to_ascii())),
            _ => None,
        })
        .collect();
    assert_eq!(records, [(0, ".".to_string())], "RFC 7505 null MX");

    for name in ["unknown.test.", "mx3.example.test.", "example.org."] {
        let err = resolver.mx_lookup(name).await.expect_err("no such domain");
        assert!(err.is_nx_domain(), "{name}: {err:?}\n{}", dns.log());
    }
}
