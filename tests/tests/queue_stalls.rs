//! Stalls of the queue and the delivery connections under load, end to end
//! on the default local spool: a run like a new user's (many clients, every
//! message to several domains) delivers every recipient exactly once, and a
//! message whose body cannot be read costs no connection per attempt.
//! Every wait is bounded.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use smarthost_tests::scenario::{assert_failure_report, message, start, submit, POLL};
use smarthost_tests::sink::{Sink, SinkOptions};
use smarthost_tests::smtp::Client;

const DOMAINS: [&str; 4] = ["one.test", "two.test", "three.test", "four.test"];

/// Every (subject, recipient) the sink got, with how often.
fn arrivals(sink: &Sink) -> BTreeMap<(String, String), usize> {
    let mut seen = BTreeMap::new();
    for got in sink.messages() {
        let subject = got.header("Subject").unwrap_or_default();
        for rcpt in &got.rcpt_tos {
            *seen.entry((subject.clone(), rcpt.clone())).or_insert(0) += 1;
        }
    }
    seen
}

#[test]
fn many_clients_many_domains_every_recipient_arrives_once() {
    let sink = Sink::start(SinkOptions::default());
    // The relay opens up to 100 connections per domain to the one sink; on a
    // loaded machine the sink may miss a greeting timeout. That is deferred,
    // as it should be, and retried soon, so the run still ends in time.
    let setup = start(
        &format!("smart_host = \"{}\"", sink.smart_host()),
        "",
        Some("2s"),
    );
    let smtp = setup.relay.smtp;

    // 10 clients at once, 30 messages each, every message to 4 domains.
    let (clients, per_client) = (10, 30);
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            std::thread::spawn(move || {
                let (mut client, greeting) = Client::connect(smtp);
                assert_eq!(greeting.code, 220);
                client.expect("EHLO app.example", 250);
                for m in 0..per_client {
                    let n = c * per_client + m;
                    let to: Vec<String> = DOMAINS.iter().map(|d| format!("u{n}@{d}")).collect();
                    let to: Vec<&str> = to.iter().map(String::as_str).collect();
                    let content = message(to[0], &format!("load {n}"), "Some text.\r\n");
                    let reply = client.send_message("app@sender.test", &to, &content);
                    assert_eq!(reply.code, 250, "message {n}: {reply:?}");
                }
                client.expect("QUIT", 221);
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("a client failed");
    }

    let want = clients * per_client * DOMAINS.len();
    let deadline = Instant::now() + Duration::from_secs(150);
    let mut seen = arrivals(&sink);
    while seen.len() < want && Instant::now() < deadline {
        std::thread::sleep(POLL * 10);
        seen = arrivals(&sink);
    }
    // A little longer, for duplicates on their way.
    std::thread::sleep(Duration::from_secs(2));
    let seen = arrivals(&sink);
    let log = setup.relay.log();
    let stuck = log.matches("cannot record a delivery outcome").count();
    assert_eq!(
        seen.len(),
        want,
        "{} of {want} recipients arrived; {stuck} log lines say an outcome could not be recorded",
        seen.len()
    );
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    assert_eq!(stuck, 0, "outcomes that could not be recorded");
}

#[test]
fn an_unreadable_body_opens_no_connection_per_attempt() {
    let sink = Sink::start(SinkOptions::default());
    // Without the body cache, which would deliver the copy it kept of
    // the body instead of reading the spoiled one.
    let setup = start(
        &format!("smart_host = \"{}\"\nbody_cache = 0", sink.smart_host()),
        "",
        None,
    );
    let relay = &setup.relay;
    let cli = |args: &[&str]| {
        let output = relay.cli(args, &[]);
        assert!(output.status.success(), "{args:?}: {output:?}");
    };
    // Held until its body is spoiled on disk.
    cli(&["queue", "suspend", "held.test"]);
    let marker = "spoil-this-body-0123456789abcdef";
    let content = message("user@held.test", "unreadable", &format!("{marker}\r\n"));
    submit(relay, "app@sender.test", &["user@held.test"], &content);

    // The journal keeps the body as it came; overwrite it in place (the
    // frame's checksum no longer matches).
    let mut spoiled = 0;
    for entry in std::fs::read_dir(&relay.spool).expect("the spool directory") {
        let path = entry.expect("a spool entry").path();
        let Ok(mut bytes) = std::fs::read(&path) else {
            continue;
        };
        let found: Vec<usize> = bytes
            .windows(marker.len())
            .enumerate()
            .filter(|(_, w)| *w == marker.as_bytes())
            .map(|(i, _)| i)
            .collect();
        for at in &found {
            bytes[*at..*at + marker.len()].fill(b'X');
        }
        if !found.is_empty() {
            std::fs::write(&path, &bytes).expect("spoil the body");
            spoiled += found.len();
        }
    }
    assert_eq!(spoiled, 1, "the body is in the journal once");
    let before = sink.stats().connections_total;
    cli(&["queue", "resume", "held.test"]);

    // The sender hears that the message cannot be delivered: one
    // connection, for the report.
    let got = sink.wait_for(1, Duration::from_secs(30));
    assert_failure_report(&got[0], "user@held.test");
    std::thread::sleep(Duration::from_secs(5));
    let connections = sink.stats().connections_total - before;
    assert!(
        connections <= 1,
        "{connections} connections for one report and a message that cannot be read"
    );
    assert_eq!(sink.messages().len(), 1, "only the report arrived");
}
