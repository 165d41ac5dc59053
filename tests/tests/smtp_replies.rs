//! Every reply a client can meet, asserted over a real socket against the
//! real binary.

use std::net::IpAddr;
use std::time::Duration;

use smarthost_tests::ca::TestCa;
use smarthost_tests::relay::Relay;
use smarthost_tests::smtp::{message_of_size, queued_id, Client};

const LOCAL_DOMAIN: &str =
    "[[domains]]\nname = \"local.test\"\nkind = \"local\"\ndrop_dir = \"/tmp/smarthost-drop\"\n\
    [[domains]]\nname = \"bücher.test\"\nkind = \"local\"\ndrop_dir = \"/tmp/smarthost-drop\"\n";

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

#[test]
fn greeting_ehlo_and_an_accepted_message() {
    let mut relay = Relay::start("", "");
    let (mut c, greeting) = Client::connect(relay.smtp);
    assert_eq!(greeting.code, 220);
    assert!(greeting.text.starts_with("relay.test "), "{greeting:?}");
    let ehlo = c.expect("EHLO client.example", 250);
    for ext in [
        "PIPELINING",
        "SIZE 10000000",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "DSN",
    ] {
        assert!(
            ehlo.text.lines().any(|l| l == ext),
            "{ext} missing in {ehlo:?}"
        );
    }
    assert!(
        !ehlo.text.contains("STARTTLS"),
        "no certificate, no STARTTLS: {ehlo:?}"
    );
    assert!(!ehlo.text.contains("AUTH"), "no users, no AUTH: {ehlo:?}");
    let reply = c.send_message(
        "app@example.com",
        &["user@example.org", "other@example.net"],
        &message_of_size("hello", 2048),
    );
    assert_eq!(reply.status(), Some("2.0.0"));
    let id = queued_id(&reply);
    assert_eq!(c.expect("QUIT", 221).status(), Some("2.0.0"));
    relay.terminate(Duration::from_secs(20));

    let records = relay.spool_records();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].id.as_str(), id);
    let domains: Vec<_> = records[0]
        .deliveries
        .iter()
        .map(|d| d.domain.as_str())
        .collect();
    assert_eq!(domains, ["example.org", "example.net"]);
    let body = relay.spool_body(&records[0].id);
    assert!(
        body.starts_with(b"Received: from client.example"),
        "{}",
        String::from_utf8_lossy(&body[..200])
    );
    assert!(body.ends_with(b"lazy dog 0123456789.\r\n"));
}

#[test]
fn command_errors_get_precise_replies() {
    let relay = Relay::start("", "");
    let (mut c, _) = Client::connect(relay.smtp);
    assert_eq!(
        c.expect("MAIL FROM:<a@example.com>", 503).status(),
        Some("5.5.1")
    );
    c.expect("EHLO client.example", 250);
    assert_eq!(c.expect("FROBNICATE", 500).status(), Some("5.5.1"));
    assert_eq!(
        c.expect("RCPT TO:<a@example.org>", 503).status(),
        Some("5.5.1")
    );
    assert_eq!(c.expect("DATA", 503).status(), Some("5.5.1"));
    assert_eq!(
        c.expect("MAIL FROM:<not an address>", 501).status(),
        Some("5.1.7")
    );
    assert_eq!(
        c.expect("MAIL FROM:<a@example.com> FOO=BAR", 555).status(),
        Some("5.5.4")
    );
    c.expect("MAIL FROM:<a@example.com>", 250);
    assert_eq!(
        c.expect("MAIL FROM:<a@example.com>", 503).status(),
        Some("5.5.1")
    );
    assert_eq!(c.expect("RCPT TO:<@@>", 501).status(), Some("5.1.3"));
    assert_eq!(c.expect("DATA", 554).status(), Some("5.5.1"));
    assert_eq!(c.expect("VRFY user", 252).status(), Some("2.5.0"));
    assert_eq!(c.expect("NOOP", 250).status(), Some("2.0.0"));
    assert_eq!(c.expect("RSET", 250).status(), Some("2.0.0"));
    assert_eq!(c.expect("HELP", 214).status(), Some("2.0.0"));
    let long = format!("NOOP {}", "x".repeat(2000));
    assert_eq!(c.expect(&long, 500).status(), Some("5.5.2"));
    assert_eq!(
        c.expect("NOOP", 250).status(),
        Some("2.0.0"),
        "the session goes on after a long line"
    );
    assert_eq!(
        c.expect("STARTTLS", 454).status(),
        Some("4.7.0"),
        "no certificate configured"
    );
    assert_eq!(c.expect("QUIT", 221).status(), Some("2.0.0"));
    assert!(c.is_closed());
}

#[test]
fn pipelined_commands_are_answered_in_order() {
    let relay = Relay::start("", "");
    let (mut c, _) = Client::connect(relay.smtp);
    c.expect("EHLO client.example", 250);
    c.send_raw(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nRCPT TO:<bad address>\r\nRCPT TO:<c@example.org>\r\nDATA\r\n");
    let codes: Vec<u16> = (0..5).map(|_| c.read_reply().code).collect();
    assert_eq!(codes, [250, 250, 501, 250, 354]);
    c.send_raw(b"Subject: pipelined\r\n\r\nbody\r\n.\r\nNOOP\r\n");
    assert_eq!(c.read_reply().code, 250);
    assert_eq!(c.read_reply().code, 250);
}

#[test]
fn relaying_needs_a_relay_network_but_local_domains_take_mail_from_anyone() {
    let relay = Relay::start("relay_networks = [\"127.0.0.2/32\"]", LOCAL_DOMAIN);
    let (mut c, _) = Client::connect_from(ip("127.0.0.1"), relay.smtp);
    c.expect("EHLO outsider.example", 250);
    c.expect("MAIL FROM:<someone@outsider.example>", 250);
    for trick in [
        "RCPT TO:<victim@remote.example>",
        "RCPT TO:<victim%remote.example@local.test>",
        "RCPT TO:<remote.example!victim@local.test>",
        "RCPT TO:<@local.test:victim@remote.example>",
        "RCPT TO:<victim@[192.0.2.1]>",
    ] {
        let reply = c.expect(trick, 550);
        assert_eq!(reply.status(), Some("5.7.1"), "{trick}");
    }
    assert_eq!(
        c.expect("RCPT TO:<user@local.test>", 250).status(),
        Some("2.1.5")
    );
    assert_eq!(
        c.expect("RCPT TO:<user@LOCAL.test>", 250).status(),
        Some("2.1.5")
    );
    // An IDNA domain configured in Unicode matches its A-label form.
    assert_eq!(
        c.expect("RCPT TO:<user@xn--bcher-kva.test>", 250).status(),
        Some("2.1.5")
    );

    let (mut trusted, _) = Client::connect_from(ip("127.0.0.2"), relay.smtp);
    trusted.expect("EHLO app.example", 250);
    trusted.expect("MAIL FROM:<app@app.example>", 250);
    assert_eq!(
        trusted
            .expect("RCPT TO:<user@remote.example>", 250)
            .status(),
        Some("2.1.5")
    );
}

#[test]
fn too_many_connections_get_421() {
    let relay = Relay::start("max_connections = 2\nmax_connections_per_ip = 10", "");
    let (_a, ga) = Client::connect(relay.smtp);
    let (_b, gb) = Client::connect(relay.smtp);
    assert_eq!((ga.code, gb.code), (220, 220));
    let (mut third, refused) = Client::connect(relay.smtp);
    assert_eq!(refused.code, 421);
    assert_eq!(refused.status(), Some("4.7.0"));
    assert!(third.is_closed());
}

#[test]
fn too_many_connections_from_one_address_get_421() {
    // Clients in relay_networks are not limited per address.
    let relay = Relay::start(
        "max_connections = 10\nmax_connections_per_ip = 1\nrelay_networks = [\"127.0.0.1/32\"]",
        "",
    );
    // Not 127.0.0.1: the start-up probe of the harness comes from there.
    let (_a, ga) = Client::connect_from(ip("127.0.0.5"), relay.smtp);
    assert_eq!(ga.code, 220);
    let (_b, refused) = Client::connect_from(ip("127.0.0.5"), relay.smtp);
    assert_eq!((refused.code, refused.status()), (421, Some("4.7.0")));
    let (_c, other) = Client::connect_from(ip("127.0.0.3"), relay.smtp);
    assert_eq!(other.code, 220, "another address still gets in");
}

#[test]
fn an_idle_client_is_dropped_with_421() {
    let relay = Relay::start("connection_timeout = \"1s\"", "");
    let (mut c, _) = Client::connect(relay.smtp);
    c.expect("EHLO slow.example", 250);
    std::thread::sleep(Duration::from_millis(1500));
    let reply = c.read_reply();
    assert_eq!((reply.code, reply.status()), (421, Some("4.4.2")));
    assert!(c.is_closed());
}

#[test]
fn size_limits_are_advertised_and_enforced() {
    let relay = Relay::start(
        "max_message_size = \"4KB\"\nmax_session_size = \"10KB\"",
        "",
    );
    let (mut c, _) = Client::connect(relay.smtp);
    let ehlo = c.expect("EHLO client.example", 250);
    assert!(ehlo.text.lines().any(|l| l == "SIZE 4000"), "{ehlo:?}");
    assert_eq!(
        c.expect("MAIL FROM:<a@example.com> SIZE=5000", 552)
            .status(),
        Some("5.3.4")
    );
    let big = c.send_message(
        "a@example.com",
        &["b@example.org"],
        &message_of_size("big", 6000),
    );
    assert_eq!((big.code, big.status()), (552, Some("5.3.4")));

    let (mut c, _) = Client::connect(relay.smtp);
    c.expect("EHLO client.example", 250);
    for _ in 0..2 {
        let ok = c.send_message(
            "a@example.com",
            &["b@example.org"],
            &message_of_size("ok", 3500),
        );
        assert_eq!(ok.code, 250, "{ok:?}");
    }
    // A third message of 3.5 KB takes the session past 10 KB.
    let over = c.send_message(
        "a@example.com",
        &["b@example.org"],
        &message_of_size("over", 3500),
    );
    assert_eq!((over.code, over.status()), (552, Some("5.3.4")));
}

#[test]
fn too_many_recipients_get_452() {
    let relay = Relay::start("max_recipients = 2", "");
    let (mut c, _) = Client::connect(relay.smtp);
    c.expect("EHLO client.example", 250);
    c.expect("MAIL FROM:<a@example.com>", 250);
    c.expect("RCPT TO:<one@example.org>", 250);
    c.expect("RCPT TO:<two@example.org>", 250);
    assert_eq!(
        c.expect("RCPT TO:<three@example.org>", 452).status(),
        Some("4.5.3")
    );
    c.expect("DATA", 354);
    c.send_raw(b"Subject: two\r\n\r\nhi\r\n.\r\n");
    assert_eq!(c.read_reply().code, 250);
}

#[test]
fn a_mail_loop_is_refused() {
    let relay = Relay::start("max_hop_count = 3", "");
    let (mut c, _) = Client::connect(relay.smtp);
    c.expect("EHLO client.example", 250);
    let hops = |n: usize| {
        let mut text = String::new();
        for i in 0..n {
            text.push_str(&format!("Received: from hop{i}.example by hop{i}.example; Sat, 28 Nov 2026 10:00:00 +0000\r\n"));
        }
        text + "Subject: loop\r\n\r\nbody\r\n"
    };
    let ok = c.send_message("a@example.com", &["b@example.org"], &hops(3));
    assert_eq!(ok.code, 250, "{ok:?}");
    let looped = c.send_message("a@example.com", &["b@example.org"], &hops(4));
    assert_eq!((looped.code, looped.status()), (554, Some("5.4.6")));
}

#[test]
fn smuggled_commands_after_a_bare_lf_dot_are_never_executed() {
    let mut relay = Relay::start("", "");
    let (mut c, _) = Client::connect(relay.smtp);
    c.expect("EHLO client.example", 250);
    c.expect("MAIL FROM:<a@example.com>", 250);
    c.expect("RCPT TO:<b@example.org>", 250);
    c.expect("DATA", 354);
    c.send_raw(
        b"Subject: smuggle\r\n\r\nhello\n.\nMAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\nevil\r\n.\r\n",
    );
    let reply = c.read_reply();
    assert_eq!(
        (reply.code, reply.status()),
        (554, Some("5.6.0")),
        "{reply:?}"
    );
    // Nothing else was answered: the smuggled commands were message data.
    assert_eq!(c.expect("NOOP", 250).code, 250);
    // Bare CR variants too.
    c.expect("MAIL FROM:<a@example.com>", 250);
    c.expect("RCPT TO:<b@example.org>", 250);
    c.expect("DATA", 354);
    c.send_raw(b"Subject: cr\r\n\r\nhello\r.\rRSET\r\n.\r\n");
    let reply = c.read_reply();
    assert_eq!(
        (reply.code, reply.status()),
        (554, Some("5.6.0")),
        "{reply:?}"
    );
    c.expect("QUIT", 221);
    relay.terminate(Duration::from_secs(20));
    assert!(
        relay.spool_records().is_empty(),
        "no smuggled message was queued"
    );
}

#[test]
fn require_tls_refuses_mail_before_starttls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::create(dir.path());
    let relay = Relay::start("require_tls = true", &ca.smtp_tls_section());
    let (mut c, _) = Client::connect(relay.smtp);
    let ehlo = c.expect("EHLO client.example", 250);
    assert!(ehlo.text.lines().any(|l| l == "STARTTLS"), "{ehlo:?}");
    assert_eq!(
        c.expect("MAIL FROM:<a@example.com>", 530).status(),
        Some("5.7.0")
    );
    c.expect("STARTTLS", 220);
    let mut c = c.start_tls(ca.client_config());
    let ehlo = c.expect("EHLO client.example", 250);
    assert!(!ehlo.text.contains("STARTTLS"), "{ehlo:?}");
    let reply = c.send_message(
        "a@example.com",
        &["b@example.org"],
        "Subject: tls\r\n\r\nhi\r\n",
    );
    assert_eq!(reply.code, 250);
    assert_eq!(c.expect("STARTTLS", 503).status(), Some("5.5.1"));
}

#[test]
fn plaintext_pipelined_after_starttls_is_discarded() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::create(dir.path());
    let relay = Relay::start("", &ca.smtp_tls_section());
    let (mut c, _) = Client::connect(relay.smtp);
    c.expect("EHLO client.example", 250);
    c.send_raw(b"STARTTLS\r\nMAIL FROM:<injected@example.com>\r\n");
    assert_eq!(c.read_reply().code, 220);
    let mut c = c.start_tls(ca.client_config());
    // The injected MAIL must not have started a transaction, and the
    // session state is fresh: EHLO is needed again.
    assert_eq!(
        c.expect("MAIL FROM:<a@example.com>", 503).status(),
        Some("5.5.1")
    );
    c.expect("EHLO client.example", 250);
    assert_eq!(
        c.expect("RCPT TO:<b@example.org>", 503).status(),
        Some("5.5.1")
    );
}

#[test]
fn auth_over_tls_lets_an_outsider_relay() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::create(dir.path());
    let hash = smarthost_node::auth::hash_password("s3cret");
    let users = format!("[[smtp.users]]\nname = \"app\"\npassword_hash = \"{hash}\"\n");
    let relay = Relay::start(
        "relay_networks = []\nauth_failure_delay = \"200ms\"",
        &format!("{}{users}", ca.smtp_tls_section()),
    );
    let (mut c, _) = Client::connect(relay.smtp);
    let ehlo = c.expect("EHLO outsider.example", 250);
    assert!(
        !ehlo.text.contains("AUTH"),
        "no AUTH offered in clear: {ehlo:?}"
    );
    assert_eq!(
        c.expect("AUTH PLAIN AGFwcABzM2NyZXQ=", 538).status(),
        Some("5.7.11")
    );
    c.expect("MAIL FROM:<a@outsider.example>", 250);
    assert_eq!(
        c.expect("RCPT TO:<b@example.org>", 550).status(),
        Some("5.7.1")
    );
    c.expect("RSET", 250);
    c.expect("STARTTLS", 220);
    let mut c = c.start_tls(ca.client_config());
    let ehlo = c.expect("EHLO outsider.example", 250);
    assert!(
        ehlo.text.lines().any(|l| l == "AUTH PLAIN LOGIN"),
        "{ehlo:?}"
    );
    // "\0app\0wrong"
    assert_eq!(
        c.expect("AUTH PLAIN AGFwcAB3cm9uZw==", 535).status(),
        Some("5.7.8")
    );
    // LOGIN with the right password: "app" / "s3cret".
    c.expect("AUTH LOGIN", 334);
    c.expect("YXBw", 334);
    assert_eq!(c.expect("czNjcmV0", 235).status(), Some("2.7.0"));
    assert_eq!(
        c.expect("AUTH PLAIN AGFwcABzM2NyZXQ=", 503).status(),
        Some("5.5.1")
    );
    let reply = c.send_message(
        "a@outsider.example",
        &["b@example.org"],
        "Subject: auth\r\n\r\nhi\r\n",
    );
    assert_eq!(reply.code, 250, "{reply:?}");
}

/// The longest line is 998 octets before its CRLF, not counting the dot a
/// client adds to a line that starts with one (RFC 5321 4.5.3.1.6): such a
/// line is taken, and kept with one dot; one octet more is refused.
#[test]
fn the_longest_line_is_taken_when_it_starts_with_a_dot() {
    let mut relay = Relay::start("", "");
    let line = format!(".{}", "x".repeat(997));
    assert_eq!(line.len(), 998);
    let (mut c, _) = Client::connect(relay.smtp);
    c.expect("EHLO client.example", 250);
    let stuffed = format!("Subject: dots\r\n\r\n.{line}\r\n");
    let ok = c.send_message("a@example.com", &["b@example.org"], &stuffed);
    assert_eq!(ok.code, 250, "{ok:?}");
    let id = queued_id(&ok);

    let longer = format!("Subject: dots\r\n\r\n.{line}x\r\n");
    let refused = c.send_message("a@example.com", &["b@example.org"], &longer);
    assert_eq!((refused.code, refused.status()), (500, Some("5.5.2")));
    drop(c);

    relay.terminate(Duration::from_secs(30));
    let record = relay
        .spool_records()
        .into_iter()
        .find(|r| r.id.as_str() == id)
        .expect("the message is queued");
    let body = String::from_utf8(relay.spool_body(&record.id)).unwrap();
    assert!(body.ends_with(&format!("\r\n\r\n{line}\r\n")), "{body:?}");
}
