//! Hostile content against the real binary over real sockets: control
//! characters meant to forge log lines, NUL in DATA, mail for `postmaster`
//! meant to be relayed, and more message bodies at once than the node has
//! memory for. Each case asserts the exact reply, and where that is the
//! point, what reached the log, the spool, a drop directory or a sink.

use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine;
use smarthost_tests::relay::Relay;
use smarthost_tests::sink::{Sink, SinkOptions};
use smarthost_tests::smtp::{queued_id, Client, Reply};

/// A fake log line after a line feed, an escape sequence that clears a
/// terminal, C1 controls and DEL: all inside one AUTH user name.
const FORGED_USER: &str = "nobody\n2026-12-02T12:00:00.000000Z  INFO smtp: authenticated user=app\x1b[2J\u{85}\u{9b}31m\x7f";

/// A relay that offers AUTH in clear (so no TLS is needed to send the
/// user name), with `format` logs.
fn auth_relay(format: &str) -> Relay {
    let hash = smarthost_node::auth::hash_password("s3cret");
    Relay::start_with_env(
        "relay_networks = []\nallow_plaintext_auth = true\nauth_failure_delay = \"10ms\"",
        &format!("[[smtp.users]]\nname = \"app\"\npassword_hash = \"{hash}\"\n"),
        &[("SMARTHOST__LOG__FORMAT", format)],
    )
}

/// Fails a login as [`FORGED_USER`] and sends a message whose sender
/// carries C1 controls (legal UTF-8 in an SMTPUTF8 address) into the log.
fn send_hostile_strings(relay: &Relay) -> String {
    let (mut c, _) = Client::connect(relay.smtp);
    c.expect("EHLO client.example", 250);
    let plain = base64::engine::general_purpose::STANDARD
        .encode(format!("\0{FORGED_USER}\0wrong").as_bytes());
    let r = c.expect(&format!("AUTH PLAIN {plain}"), 535);
    assert_eq!(r.status(), Some("5.7.8"));
    let r = c.expect("AUTH PLAIN AGFwcABzM2NyZXQ=", 235);
    assert_eq!(r.status(), Some("2.7.0"));
    let sender = "\u{85}evil\u{9b}@example.com";
    c.expect(&format!("MAIL FROM:<{sender}> SMTPUTF8"), 250);
    c.expect("RCPT TO:<user@example.org>", 250);
    let id = queued_id(&c.send_data("Subject: x\r\n\r\nbody\r\n"));
    c.expect("QUIT", 221);
    id
}

/// Waits (at most 10 s) until the log has a line with `needle`.
fn wait_for_log(relay: &Relay, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = relay.log();
        if log.contains(needle) || Instant::now() > deadline {
            return log;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What no log line may contain raw, whatever a client sent.
fn assert_no_raw_controls(log: &str) {
    for (n, line) in log.lines().enumerate() {
        let bad: Vec<char> = line
            .chars()
            .filter(|c| c.is_control() || matches!(c, '\u{2028}' | '\u{2029}'))
            .collect();
        assert!(bad.is_empty(), "line {n} carries {bad:?}: {line:?}");
    }
}

#[test]
fn log_injection_is_escaped_in_the_text_log() {
    let mut relay = auth_relay("text");
    let id = send_hostile_strings(&relay);
    wait_for_log(&relay, &format!("message_id={id}"));
    relay.terminate(Duration::from_secs(20));
    let log = relay.log();
    assert_no_raw_controls(&log);
    // The forged line is there, escaped, inside the real one; no line
    // starts with it.
    let failed = log
        .lines()
        .find(|l| l.contains("authentication failed"))
        .unwrap_or_else(|| panic!("no failed login logged:\n{log}"));
    assert!(
        failed.contains(
            "user=nobody\\n2026-12-02T12:00:00.000000Z  INFO smtp: authenticated user=app\\u{1b}[2J\\u{85}\\u{9b}31m\\u{7f}"
        ),
        "{failed}"
    );
    assert!(
        !log.lines()
            .any(|l| l.starts_with("2026-12-02T12:00:00.000000Z")),
        "{log}"
    );
    let forged = log
        .lines()
        .filter(|l| l.contains("INFO smtp: authenticated user=app"))
        .count();
    assert_eq!(
        forged, 1,
        "only the escaped copy inside the failure line:\n{log}"
    );
    let accepted = log
        .lines()
        .find(|l| l.contains("message accepted"))
        .unwrap_or_else(|| panic!("no accepted message logged:\n{log}"));
    assert!(
        accepted.contains("from=\\u{85}evil\\u{9b}@example.com"),
        "{accepted}"
    );
}

#[test]
fn log_injection_is_escaped_in_the_json_log() {
    let mut relay = auth_relay("json");
    let id = send_hostile_strings(&relay);
    wait_for_log(&relay, &id);
    relay.terminate(Duration::from_secs(20));
    let log = relay.log();
    assert_no_raw_controls(&log);
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect();
    let failed = lines
        .iter()
        .find(|l| l["fields"]["message"] == "authentication failed")
        .unwrap_or_else(|| panic!("no failed login logged:\n{log}"));
    // The value survives exactly, escaped only on the wire.
    assert_eq!(failed["fields"]["user"], FORGED_USER);
    let accepted = lines
        .iter()
        .find(|l| l["fields"]["message"] == "message accepted")
        .unwrap_or_else(|| panic!("no accepted message logged:\n{log}"));
    assert_eq!(accepted["fields"]["from"], "\u{85}evil\u{9b}@example.com");
    assert!(log.contains("\\u0085evil\\u009b"), "{log}");
}

#[test]
fn nul_in_data_is_refused_and_nothing_is_relayed() {
    let sink = Sink::start(SinkOptions::default());
    let relay = Relay::start(
        "",
        &format!("[delivery]\nsmart_host = \"{}\"\n", sink.smart_host()),
    );
    let (mut c, _) = Client::connect(relay.smtp);
    let ehlo = c.expect("EHLO client.example", 250);
    assert!(
        !ehlo.text.contains("BINARYMIME") && !ehlo.text.contains("CHUNKING"),
        "{ehlo:?}"
    );
    for data in [
        "Subject: nul\r\n\r\nbefore\0after\r\n",
        // `\0.\0` at the start of a line neither ends DATA nor hides a command.
        "Subject: nul dot\r\n\r\nline\r\n\0.\0\r\nRSET\r\nMAIL FROM:<x@example.com>\r\n",
        "Subject: nul header\0\r\n\r\nbody\r\n",
    ] {
        c.expect("MAIL FROM:<app@example.com>", 250);
        c.expect("RCPT TO:<user@example.org>", 250);
        let r = c.send_data(data);
        assert_eq!(r.code, 554, "{data:?}: {r:?}");
        assert_eq!(r.text, "5.6.0 Message contains NUL characters", "{data:?}");
        // Still in step: the transaction is over, the session goes on.
        assert_eq!(
            c.expect("RCPT TO:<user@example.org>", 503).status(),
            Some("5.5.1")
        );
    }
    let r = c.expect("MAIL FROM:<app@example.com> BODY=BINARYMIME", 555);
    assert_eq!(r.status(), Some("5.5.4"));
    c.expect("MAIL FROM:<app@example.com>", 250);
    c.expect("RCPT TO:<user@example.org>", 250);
    let clean = "Subject: clean\r\n\r\n8-bit is fine: \u{e9}\r\n";
    queued_id(&c.send_data(clean));
    c.expect("QUIT", 221);

    let got = sink.wait_for(1, Duration::from_secs(30));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].header("Subject").as_deref(), Some("clean"));
    assert!(!got[0].body.contains(&0), "no NUL relayed");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(sink.messages().len(), 1, "nothing else relayed");
}

/// Files delivered into a drop directory's `new/`.
fn dropped(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir.join("new"))
        .map(|entries| {
            entries
                .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn postmaster_is_delivered_to_the_configured_mailbox_never_relayed() {
    let sink = Sink::start(SinkOptions::default());
    let drop = tempfile::tempdir().unwrap();
    let relay = Relay::start(
        // An outsider: no relay rights, no AUTH.
        "relay_networks = []\npostmaster = \"ops@ops.test\"",
        &format!(
            "[delivery]\nsmart_host = \"{}\"\n\n[[domains]]\nname = \"ops.test\"\nkind = \"local\"\ndrop_dir = {:?}\n",
            sink.smart_host(),
            drop.path().display().to_string()
        ),
    );
    let (mut c, _) = Client::connect(relay.smtp);
    c.expect("EHLO outsider.example", 250);
    c.expect("MAIL FROM:<someone@outsider.example>", 250);
    for rcpt in [
        "postmaster",
        "PostMaster",
        "postmaster@relay.test",
        "POSTMASTER@Relay.Test",
    ] {
        let r = c.expect(&format!("RCPT TO:<{rcpt}>"), 250);
        assert_eq!(r.text, "2.1.5 Ok", "{rcpt}");
    }
    // Anyone else's postmaster is still relaying, and refused.
    let r = c.expect("RCPT TO:<postmaster@example.org>", 550);
    assert_eq!(r.text, "5.7.1 Relaying denied");
    queued_id(&c.send_data("Subject: to the postmaster\r\n\r\nhello\r\n"));
    c.expect("QUIT", 221);

    let deadline = Instant::now() + Duration::from_secs(30);
    while dropped(drop.path()).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let files = dropped(drop.path());
    assert_eq!(files.len(), 1, "one copy for the one mailbox");
    assert!(
        files[0].contains("Delivered-To: ops@ops.test"),
        "{}",
        files[0]
    );
    assert!(files[0].contains("Subject: to the postmaster"));
    std::thread::sleep(Duration::from_secs(1));
    assert!(sink.messages().is_empty(), "nothing went to the smart host");
    assert_eq!(
        sink.stats().connections_total,
        0,
        "the smart host was never called"
    );
}

#[test]
fn postmaster_without_a_mailbox_is_refused_with_550_5_1_1() {
    let sink = Sink::start(SinkOptions::default());
    // The client is in relay_networks (127.0.0.0/8 by default): even a
    // client that may relay does not get postmaster mail relayed.
    let relay = Relay::start(
        "",
        &format!("[delivery]\nsmart_host = \"{}\"\n", sink.smart_host()),
    );
    let (mut c, _) = Client::connect(relay.smtp);
    c.expect("EHLO client.example", 250);
    c.expect("MAIL FROM:<app@example.com>", 250);
    for rcpt in ["postmaster", "Postmaster@relay.test"] {
        let r = c.expect(&format!("RCPT TO:<{rcpt}>"), 550);
        assert_eq!(
            r.text, "5.1.1 No postmaster mailbox is configured on this host",
            "{rcpt}"
        );
    }
    let r = c.expect("DATA", 554);
    assert_eq!(r.status(), Some("5.5.1"));
    c.expect("QUIT", 221);
    std::thread::sleep(Duration::from_secs(1));
    let mut relay = relay;
    relay.terminate(Duration::from_secs(20));
    assert!(relay.spool_records().is_empty());
    assert!(sink.messages().is_empty());
}

/// Opens a session and goes as far as the reply to DATA.
fn to_data(relay: &Relay, mail: &str) -> (Client, Reply) {
    let (mut c, _) = Client::connect(relay.smtp);
    c.expect("EHLO client.example", 250);
    c.expect(mail, 250);
    c.expect("RCPT TO:<user@example.org>", 250);
    let r = c.cmd("DATA");
    (c, r)
}

/// `n` bytes of message in 1000-byte lines, ending with CRLF.
fn body(n: usize) -> Vec<u8> {
    let line = [b"x".repeat(998), b"\r\n".to_vec()].concat();
    line.iter().copied().cycle().take(n / 1000 * 1000).collect()
}

#[test]
fn body_memory_budget_gives_452_to_the_message_over_it() {
    // Budget 10 MB; A and B declare 4 MB each and hold it from DATA on
    // (bodies are kept in memory: the spill threshold is the size limit).
    let mut relay = Relay::start(
        "max_message_size = \"4MB\"\nmax_body_memory = \"10MB\"\nbody_memory_wait = \"300ms\"\n\
         body_spill_threshold = \"4MB\"",
        "",
    );
    let (mut a, r) = to_data(&relay, "MAIL FROM:<a@example.com> SIZE=4000000");
    assert_eq!(r.code, 354);
    let (mut b, r) = to_data(&relay, "MAIL FROM:<b@example.com> SIZE=4000000");
    assert_eq!(r.code, 354);
    // D declares 4 MB too: only 2 MB are left, and it waits, then gets 452.
    let started = Instant::now();
    let (mut d, r) = to_data(&relay, "MAIL FROM:<d@example.com> SIZE=4000000");
    assert_eq!(
        (r.code, r.text.as_str()),
        (452, "4.3.1 Insufficient system storage")
    );
    assert!(started.elapsed() >= Duration::from_millis(300), "it waited");
    // C declares nothing and sends 3 MB: past 2 MB there is no memory. It
    // is read to its end and refused there, in step.
    let (mut c, r) = to_data(&relay, "MAIL FROM:<c@example.com>");
    assert_eq!(r.code, 354);
    c.send_raw(&body(3_000_000));
    c.send_raw(b".\r\n");
    let r = c.read_reply();
    assert_eq!(
        (r.code, r.text.as_str()),
        (452, "4.3.1 Insufficient system storage")
    );
    c.expect("NOOP", 250);
    // A and B finish within what they declared.
    for client in [&mut a, &mut b] {
        client.send_raw(&body(3_900_000));
        client.send_raw(b".\r\n");
        queued_id(&client.read_reply());
    }
    // Now D's DATA (its transaction was kept) finds memory.
    let r = d.cmd("DATA");
    assert_eq!(r.code, 354);
    d.send_raw(&body(1_000_000));
    d.send_raw(b".\r\n");
    queued_id(&d.read_reply());
    // And C can send again.
    c.expect("MAIL FROM:<c@example.com>", 250);
    c.expect("RCPT TO:<user@example.org>", 250);
    c.expect("DATA", 354);
    c.send_raw(&body(3_000_000));
    c.send_raw(b".\r\n");
    queued_id(&c.read_reply());
    relay.terminate(Duration::from_secs(20));
    let senders: Vec<String> = relay
        .spool_records()
        .iter()
        .map(|r| r.envelope.sender.as_ref().unwrap().to_string())
        .collect();
    assert_eq!(senders.len(), 4, "{senders:?}");
    for s in [
        "a@example.com",
        "b@example.com",
        "c@example.com",
        "d@example.com",
    ] {
        assert!(senders.iter().any(|x| x == s), "{s} stored: {senders:?}");
    }
}

/// Starts the peak resident memory of a process again from what it holds
/// now, so that [`peak_rss`] measures what comes after, not the start.
fn reset_peak_rss(pid: u32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("resetting VmHWM");
}

/// The peak resident memory of a process so far, in bytes (`VmHWM`).
fn peak_rss(pid: u32) -> u64 {
    status_bytes(pid, "VmHWM:")
}

/// The resident memory of a process now, in bytes (`VmRSS`).
fn rss(pid: u32) -> u64 {
    status_bytes(pid, "VmRSS:")
}

fn status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/PID/status"));
    kb * 1024
}

/// 24 clients send 2 MB each at once, 100 KB at a time each, against a
/// body budget of 8 MB; returns how many were stored, the relay's peak RSS
/// growth in bytes from the first DATA on, and the relay, stopped.
///
/// Once every message is answered, the memory the bodies took must go
/// back: the relay's RSS falls to within what delivery holds (up to two
/// copies of one message, and 2 MB for the rest) of what it was with
/// every client in DATA, within 10 s.
fn many_concurrent_large_messages(spill_threshold: &str) -> (usize, u64, Relay) {
    // Each DATA first takes 256 KiB, so all 24 get their 354 at once.
    let mut relay = Relay::start(
        &format!(
            "max_message_size = \"2MB\"\nmax_body_memory = \"8MB\"\nbody_memory_wait = \"1s\"\n\
             body_spill_threshold = \"{spill_threshold}\""
        ),
        // Delivery holds the body it sends in memory: one at a time here,
        // so that what is measured is reception.
        "[delivery]\nmax_connections = 1\n",
    );
    reset_peak_rss(relay.pid());
    let before = peak_rss(relay.pid());
    // Every client is inside DATA before any body byte is sent.
    let mut clients: Vec<Client> = (0..CLIENTS)
        .map(|i| {
            let (c, r) = to_data(&relay, &format!("MAIL FROM:<c{i}@example.com>"));
            assert_eq!(r.code, 354, "client {i}: {r:?}");
            // A loaded CI machine may take a while to read 48 MB.
            c.set_read_timeout(Duration::from_secs(120));
            c
        })
        .collect();
    let in_data = rss(relay.pid());
    // Then all bodies grow together, 100 KB at a time each.
    let whole = body(SIZE);
    for piece in whole.chunks(100_000) {
        for c in clients.iter_mut() {
            c.send_raw(piece);
        }
    }
    let mut stored = 0;
    for c in clients.iter_mut() {
        c.send_raw(b".\r\n");
        let r = c.read_reply();
        match r.code {
            250 => stored += 1,
            452 => assert_eq!(r.text, "4.3.1 Insufficient system storage"),
            _ => panic!("{r:?}"),
        }
    }
    let peak = peak_rss(relay.pid());
    let kept_for_delivery = 2 * SIZE as u64 + 2_000_000;
    let given_back = Instant::now() + Duration::from_secs(10);
    let mut after = rss(relay.pid());
    while after > in_data + kept_for_delivery && Instant::now() < given_back {
        std::thread::sleep(Duration::from_millis(100));
        after = rss(relay.pid());
    }
    assert!(
        after <= in_data + kept_for_delivery,
        "RSS {} MB with every message answered, {} MB with every client in DATA",
        after >> 20,
        in_data >> 20
    );
    relay.terminate(Duration::from_secs(20));
    let grown = peak.saturating_sub(before);
    eprintln!(
        "{stored}/{CLIENTS} stored; RSS peak {} MB, grown {} MB; {} MB in DATA, {} MB after",
        peak >> 20,
        grown >> 20,
        in_data >> 20,
        after >> 20
    );
    (stored, grown, relay)
}

const CLIENTS: usize = 24;
const SIZE: usize = 2_000_000;
const BUDGET: u64 = 8_000_000;

#[test]
fn body_memory_stays_bounded_under_many_concurrent_large_messages() {
    // 48 MB of bodies at once against 8 MB, all kept in memory.
    let (stored, grown, relay) = many_concurrent_large_messages("2MB");
    assert!(stored >= 1, "the budget lets some through");
    assert!(
        stored < CLIENTS,
        "40 MB of bodies cannot all fit in 8 MB at once"
    );
    assert_eq!(relay.spool_records().len(), stored);
    assert!(
        grown < 2 * BUDGET,
        "RSS grew by {grown} bytes, more than twice the {BUDGET}-byte budget"
    );
}

#[test]
fn bodies_written_to_disk_as_they_arrive_all_fit_the_budget() {
    // The same 48 MB, but no session holds more than 256 KiB of its body:
    // every message is stored, whole, and memory stays within the budget.
    let (stored, grown, relay) = many_concurrent_large_messages("256KiB");
    assert_eq!(stored, CLIENTS, "every message fits");
    let records = relay.spool_records();
    assert_eq!(records.len(), CLIENTS);
    let whole = body(SIZE);
    for record in &records {
        let stored = relay.spool_body(&record.id);
        assert!(stored.starts_with(b"Received: "), "{}", record.id);
        assert!(stored.ends_with(&whole), "{} stored whole", record.id);
        assert_eq!(record.size, stored.len() as u64);
    }
    // Delivery, outside the budget, reads the one body it sends out of its
    // journal frame: up to two copies of one message, and 1 MB for the
    // rest of the process.
    let delivery = 2 * SIZE as u64 + 1_000_000;
    assert!(
        grown < BUDGET + delivery,
        "RSS grew by {grown} bytes: more than the {BUDGET}-byte budget and {delivery} for delivery"
    );
}
