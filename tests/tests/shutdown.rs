//! SIGTERM: the listener closes, idle sessions get 421 4.3.2 at once, a
//! message in the middle of DATA is finished and spooled, and the process
//! exits cleanly.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use smarthost_tests::relay::Relay;
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

    let status = relay.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "exit status {status}");
    let records = relay.spool_records();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].id.as_str(), id);
}
