//! SIGTERM: the listener closes, idle sessions get 421 4.3.2 at once, a
//! message in the middle of DATA is finished and spooled, a session's last
//! reply waits for its client to close, deliveries under way are finished
//! and recorded, and the process exits cleanly.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use smarthost_tests::http;
use smarthost_tests::relay::Relay;
use smarthost_tests::scenario::{message, start, submit, ARRIVAL};
use smarthost_tests::sink::{Sink, SinkOptions};
use smarthost_tests::smtp::{queued_id, Client};

#[test]
fn sigterm_drains_sessions_without_cutting_a_message() {
    let mut relay = Relay::start("", "");
    let (mut idle, _) = Client::connect(relay.smtp);
    idle.expect("EHLO idle.example", 250);
    let (mut busy, _) = Client::connect(relay.smtp);
    busy.expect("EHLO busy.example", 250);
    busy.expect("MAIL FROM:<app@example.com>", 250);
    busy.expect("RCPT TO:<user@example.org>", 250);
    busy.expect("DATA", 354);
    busy.send_raw(b"Subject: in flight\r\n\r\nfirst half\r\n");

    relay.send_sigterm();
    let reply = idle.read_reply();
    assert_eq!(
        (reply.code, reply.status()),
        (421, Some("4.3.2")),
        "{reply:?}"
    );
    assert!(idle.is_closed());
    drop(idle);

    // The listener is closed: new clients are turned away by the kernel.
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect_timeout(&relay.smtp, Duration::from_millis(200)).is_ok() {
        assert!(Instant::now() < deadline, "still accepting after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }

    // The message in flight is finished, acknowledged, and then the
    // session is closed as well.
    busy.send_raw(b"second half\r\n.\r\n");
    let id = queued_id(&busy.read_reply());
    let bye = busy.read_reply();
    assert_eq!((bye.code, bye.status()), (421, Some("4.3.2")), "{bye:?}");

    // The node waits for the client to close after its last reply, so
    // that the kernel can still send it again if it was lost; then exits.
    std::thread::sleep(Duration::from_millis(500));
    assert!(relay.is_running(), "exited before the client closed");
    drop(busy);
    let status = relay.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "exit status {status}");
    let records = relay.spool_records();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].id.as_str(), id);
}

/// A delivery under way when SIGTERM comes is finished and its outcome
/// recorded before the process exits: the restarted relay sends none of
/// them again.
#[test]
fn sigterm_finishes_deliveries_under_way_and_none_is_sent_twice() {
    // Every reply of the sink comes late: each delivery takes seconds.
    let sink = Sink::start(SinkOptions::default().delay(Duration::from_millis(700)));
    let mut setup = start(
        &format!(
            "smart_host = \"{}\"\nmax_connections_per_domain = 4",
            sink.smart_host()
        ),
        "",
        None,
    );
    let sent = 4;
    for n in 0..sent {
        let to = format!("user{n}@example.org");
        let text = message(&to, &format!("in flight {n}"), "Hello.\r\n");
        submit(&setup.relay, "app@sender.test", &[&to], &text);
    }
    // The sink has the first message; its 250 is on the way (the sink
    // waits before every reply), and the others are in their sessions.
    sink.wait_for(1, ARRIVAL);
    setup.relay.send_sigterm();
    let status = setup.relay.wait_exit(Duration::from_secs(40));
    assert!(status.success(), "exit status {status}");
    let log = setup.relay.log();
    assert!(
        !log.contains("deliveries still under way"),
        "the deliveries did not finish within the grace:\n{log}"
    );

    setup.relay.launch();
    let subjects = || {
        let mut subjects: Vec<String> = sink
            .messages()
            .iter()
            .filter_map(|m| m.header("Subject"))
            .collect();
        subjects.sort();
        subjects
    };
    let every: Vec<String> = (0..sent).map(|n| format!("in flight {n}")).collect();
    // Until the queue is empty: whatever it holds is sent before the end.
    let deadline = Instant::now() + ARRIVAL;
    while http::get(setup.relay.admin_addr(), "/api/v1/queue", None).json()["messages"] != 0 {
        assert!(
            Instant::now() < deadline,
            "still queued; arrived: {:?}",
            subjects()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(subjects(), every, "every message once");
}
