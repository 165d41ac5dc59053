//! 250 means durable: a relay killed with SIGKILL while 20 clients are
//! sending keeps every message it acknowledged, and recovers them on restart,
//! whether the journal segment it was writing grew with each write or was
//! made ahead of use (zeros, `queue.zero_fill_segments`).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use smarthost_node::spool::LocalSpoolOptions;
use smarthost_tests::relay::Relay;
use smarthost_tests::smtp::{message_of_size, queued_id, Client};

const CLIENTS: usize = 20;

#[test]
fn every_acknowledged_message_survives_sigkill() {
    let relay = Relay::start("", "");
    crash_under_load(relay, 200, Duration::from_secs(30), |acknowledged| {
        acknowledged >= 100
    });
}

/// The same past the first segment: the relay is killed while it writes
/// into a segment made ahead (a segment's length of zeros, written before
/// use), after the one before it was cut to its frames.
#[test]
fn every_acknowledged_message_survives_sigkill_in_a_segment_made_ahead() {
    let relay = Relay::start("", "");
    let spool = relay.spool.clone();
    let second = spool.join("00000000000000000002.journal");
    let mut seen = None;
    crash_under_load(relay, 3000, Duration::from_secs(240), move |acknowledged| {
        if !second.exists() {
            return false;
        }
        // Some way into the new segment.
        let since = *seen.get_or_insert(acknowledged);
        if acknowledged < since + 500 {
            return false;
        }
        let len = |name: &str| std::fs::metadata(spool.join(name)).unwrap().len();
        let segment = LocalSpoolOptions::default().segment_size;
        assert_eq!(len("00000000000000000002.journal"), segment, "made ahead");
        assert!(
            len("00000000000000000001.journal") < segment,
            "cut to its frames"
        );
        true
    });
}

/// Sends from `CLIENTS` clients, up to `per_client` messages each for up to
/// `run`, kills the relay once `kill_now(acknowledged so far)` says
/// so, and checks that every acknowledged message is in its spool, before
/// and after a restart.
fn crash_under_load(
    mut relay: Relay,
    per_client: usize,
    run: Duration,
    mut kill_now: impl FnMut(usize) -> bool,
) {
    let addr = relay.smtp;
    let acknowledged = Arc::new(Mutex::new(BTreeSet::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let body = message_of_size("crash", 2048);

    let workers: Vec<_> = (0..CLIENTS)
        .map(|n| {
            let acknowledged = acknowledged.clone();
            let stop = stop.clone();
            let body = body.clone();
            std::thread::spawn(move || {
                let (mut c, _) = Client::connect(addr);
                c.expect(&format!("EHLO client{n}.example"), 250);
                let deadline = Instant::now() + run;
                for _ in 0..per_client {
                    if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                        break;
                    }
                    // Any failure here is the crash: stop this client.
                    let Some(reply) = send_one(&mut c, &body) else {
                        break;
                    };
                    acknowledged.lock().unwrap().insert(queued_id(&reply));
                }
            })
        })
        .collect();

    // Let the clients get going, then crash the relay under load.
    let deadline = Instant::now() + run;
    let mut due = false;
    while !due && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        let count = acknowledged.lock().unwrap().len();
        due = kill_now(count);
    }
    relay.kill();
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.join().unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(
        due,
        "not crashed as planned: {} messages acknowledged in {run:?}",
        acknowledged.len()
    );

    let spooled: BTreeSet<String> = relay
        .spool_records()
        .iter()
        .map(|r| r.id.to_string())
        .collect();
    let lost: Vec<_> = acknowledged.difference(&spooled).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged messages lost: {lost:?}",
        lost.len()
    );

    // The restarted relay recovers the same spool and reports it.
    relay.launch();
    relay.terminate(Duration::from_secs(20));
    let log = relay.log();
    assert!(
        log.contains(&format!("\"messages\":{}", spooled.len())),
        "restart must report {} spooled messages:\n{log}",
        spooled.len()
    );
    let after: BTreeSet<String> = relay
        .spool_records()
        .iter()
        .map(|r| r.id.to_string())
        .collect();
    assert_eq!(after, spooled);
    for record in relay.spool_records().iter().take(5) {
        assert_eq!(relay.spool_body(&record.id).len() as u64, record.size);
    }
}

/// One transaction; `None` if the connection broke (the relay died).
fn send_one(c: &mut Client, body: &str) -> Option<smarthost_tests::smtp::Reply> {
    c.send_raw(b"MAIL FROM:<app@example.com>\r\nRCPT TO:<user@example.org>\r\nDATA\r\n");
    for _ in 0..3 {
        let reply = c.try_read_reply()?;
        if reply.code >= 400 {
            return None;
        }
    }
    c.send_raw(body.as_bytes());
    c.send_raw(b".\r\n");
    let reply = c.try_read_reply()?;
    (reply.code == 250).then_some(reply)
}
