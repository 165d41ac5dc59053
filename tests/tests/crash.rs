//! 250 means durable: a relay killed with SIGKILL while 20 clients are
//! sending keeps every message it acknowledged, and recovers them on restart.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use smarthost_tests::relay::Relay;
use smarthost_tests::smtp::{message_of_size, queued_id, Client};

const CLIENTS: usize = 20;
const MAX_PER_CLIENT: usize = 200;

#[test]
fn every_acknowledged_message_survives_sigkill() {
    let mut relay = Relay::start("", "");
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
                let deadline = Instant::now() + Duration::from_secs(30);
                for _ in 0..MAX_PER_CLIENT {
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
    let deadline = Instant::now() + Duration::from_secs(20);
    while acknowledged.lock().unwrap().len() < 100 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    relay.kill();
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.join().unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(
        acknowledged.len() >= 100,
        "only {} messages before the crash",
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
