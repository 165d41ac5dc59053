//! Numbered test traffic for the multi-node tests: messages `tag n` to
//! three domains, submitted from several threads, and what arrived of them
//! at a sink.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::scenario::{dot_stuff, message, Setup};
use crate::sink::Sink;
use crate::smtp::Client;

/// The destination domains, all routed to one sink.
pub const DOMAINS: [&str; 3] = ["a.test", "b.test", "c.test"];

/// Message `n` of `tag`: its subject and recipient, at the `n % 3`-th
/// domain.
pub fn subject_and_recipient(tag: &str, n: usize) -> (String, String) {
    let domain = DOMAINS[n % DOMAINS.len()];
    (format!("{tag} {n}"), format!("user{n}@{domain}"))
}

/// Submits one message; the code of the first reply that is not a
/// go-ahead (or the final reply): `250` accepted, `4xx` refused for now.
pub fn submit(addr: SocketAddr, subject: &str, to: &str) -> u16 {
    let (mut c, greeting) = Client::connect(addr);
    if greeting.code != 220 {
        return greeting.code;
    }
    for (line, want) in [
        ("EHLO app.example".to_string(), 250),
        ("MAIL FROM:<app@sender.test>".to_string(), 250),
        (format!("RCPT TO:<{to}>"), 250),
        ("DATA".to_string(), 354),
    ] {
        let reply = c.cmd(&line);
        if reply.code != want {
            let _ = c.try_read_reply();
            return reply.code;
        }
    }
    c.send_raw(dot_stuff(&message(to, subject, "Hello.\r\n")).as_bytes());
    c.send_raw(b".\r\n");
    let code = c.read_reply().code;
    c.send_raw(b"QUIT\r\n");
    let _ = c.try_read_reply();
    code
}

/// Submits messages `0..count` of `tag` round-robin to `addrs` from
/// `threads` threads; panics unless every one is accepted with `250`.
/// Returns their subjects.
pub fn submit_all(addrs: &[SocketAddr], tag: &str, count: usize, threads: usize) -> Vec<String> {
    std::thread::scope(|scope| {
        for t in 0..threads {
            scope.spawn(move || {
                for n in (t..count).step_by(threads) {
                    let (subject, to) = subject_and_recipient(tag, n);
                    let addr = addrs[n % addrs.len()];
                    assert_eq!(submit(addr, &subject, &to), 250, "{subject} to {addr}");
                }
            });
        }
    });
    (0..count)
        .map(|n| subject_and_recipient(tag, n).0)
        .collect()
}

/// How many times each subject arrived at the sink.
pub fn arrivals(sink: &Sink) -> BTreeMap<String, usize> {
    let mut got = BTreeMap::new();
    for m in sink.messages() {
        *got.entry(m.header("Subject").unwrap_or_default())
            .or_default() += 1;
    }
    got
}

/// Waits (at most `timeout`) until every one of `subjects` arrived; panics
/// with what is missing and the nodes' logs otherwise.
pub fn wait_for_all(
    sink: &Sink,
    subjects: &[String],
    timeout: Duration,
    what: &str,
    nodes: &[Setup],
) {
    let deadline = Instant::now() + timeout;
    loop {
        let got = arrivals(sink);
        let missing: Vec<&String> = subjects.iter().filter(|s| !got.contains_key(*s)).collect();
        if missing.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            for setup in nodes {
                eprintln!("--- node log ---\n{}", setup.relay.log());
            }
            panic!(
                "{what}: {} of {} messages did not arrive within {timeout:?}: {missing:?}; sink {:?}",
                missing.len(),
                subjects.len(),
                sink.stats()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
