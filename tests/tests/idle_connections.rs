//! A delivery connection that runs out of work waits a moment for more
//! before it says `QUIT`: mail that trickles in, a message at a time,
//! shares one connection instead of opening one for each message.

use std::time::{Duration, Instant};

use smarthost_tests::scenario::{message, route, start, submit};
use smarthost_tests::sink::{Sink, SinkOptions};

const DOMAIN: &str = "trickle.test";

/// Waits, looking often, until the sink has `n` messages.
fn delivered(sink: &Sink, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while sink.messages().len() < n {
        assert!(Instant::now() < deadline, "message {n} not delivered");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn mail_that_trickles_in_shares_a_connection() {
    const MESSAGES: usize = 10;
    let sink = Sink::start(SinkOptions::default());
    let setup = start(
        "max_messages_per_connection = 20",
        &route(DOMAIN, &sink),
        None,
    );
    for n in 0..MESSAGES {
        let to = format!("user{n}@{DOMAIN}");
        submit(
            &setup.relay,
            "app@sender.test",
            &[&to],
            &message(&to, &format!("trickle {n}"), "One at a time.\r\n"),
        );
        // Delivered before the next is sent: the domain's line is empty
        // each time, and only a connection that waited finds the next.
        delivered(&sink, n + 1);
    }
    sink.assert_each_subject_once(MESSAGES, Duration::from_secs(30));
    let stats = sink.stats();
    // One connection when every message comes within the wait; a slow
    // machine may miss it now and then.
    assert!(
        stats.connections_total <= MESSAGES as u64 / 2,
        "{} connections for {MESSAGES} messages: {stats:?}",
        stats.connections_total
    );
}
