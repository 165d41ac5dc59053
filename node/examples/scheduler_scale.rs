//! The cost of one completion in the in-memory scheduler next to a large
//! queue: DEFERRED deliveries waiting for a retry (over 1 000 domains),
//! then COMPLETIONS due deliveries of one domain taken and completed one
//! by one. Prints the time per completion, per expiry sweep (with nothing
//! to expire) and per promote (with nothing due).
//!
//! ```text
//! cargo run --release -p smarthost-node --example scheduler_scale -- [DEFERRED] [COMPLETIONS]
//! ```

use std::time::{Duration, Instant};

use smarthost_node::delivery::{MessageOutcome, RcptOutcome, RcptResult};
use smarthost_node::scheduler::{RetryPolicy, Scheduler};
use smarthost_proto::address::Mailbox;
use smarthost_proto::envelope::{ClientInfo, Envelope, MessageId, MessageRecord, Recipient};

const T0: u64 = 1_700_000_000_000;

fn record(n: u64, domain: &str) -> MessageRecord {
    let envelope = Envelope {
        sender: Some(Mailbox {
            local_part: "app".into(),
            domain: "sender.example".into(),
        }),
        recipients: vec![Recipient {
            address: Mailbox {
                local_part: format!("user{n}"),
                domain: domain.into(),
            },
            notify: None,
            orcpt: None,
        }],
        ..Envelope::default()
    };
    let client = ClientInfo {
        ip: "192.0.2.1".parse().expect("literal address"),
        helo: "app.sender.example".into(),
        auth_user: None,
        tls: false,
    };
    MessageRecord::new(MessageId::new(T0 + n, n), T0, 2048, client, envelope)
}

fn arg(n: usize, default: u64) -> u64 {
    std::env::args()
        .nth(n)
        .map(|a| a.parse().expect("a number"))
        .unwrap_or(default)
}

fn main() {
    let deferred = arg(1, 600_000);
    let completions = arg(2, 1_000);
    let policy = RetryPolicy {
        intervals: vec![Duration::from_secs(900)],
        max_lifetime: Duration::from_secs(2 * 86_400),
        delay_notification: Duration::from_secs(43_200),
    };
    let mut scheduler = Scheduler::default();
    let started = Instant::now();
    for n in 0..deferred {
        let mut r = record(n, &format!("example{}.org", n % 1000));
        r.deliveries[0].next_attempt_ms = T0 + 3_600_000;
        scheduler.insert(r, T0);
    }
    for n in deferred..deferred + completions {
        scheduler.insert(record(n, "due.example"), T0);
    }
    println!(
        "filed {deferred} deferred and {completions} due deliveries in {:.2?}",
        started.elapsed()
    );

    let started = Instant::now();
    let mut done = 0u64;
    while let Some((job, _)) = scheduler.take("due.example", 1).pop() {
        let outcome = MessageOutcome {
            recipients: vec![RcptOutcome {
                recipient: 0,
                result: RcptResult::Delivered,
                reply: "250 ok".into(),
            }],
            remote: None,
            latency: Duration::ZERO,
        };
        scheduler.complete(&job.id, "due.example", &outcome, T0 + 1, &policy, 0.0);
        done += 1;
    }
    let per = started.elapsed() / done.max(1) as u32;
    println!("{done} completions: {per:.2?} per completion (take + complete)");

    let started = Instant::now();
    for _ in 0..100 {
        assert!(scheduler.expire(T0 + 1, &policy).is_empty());
    }
    println!("expiry sweep, nothing due: {:.2?}", started.elapsed() / 100);
    let started = Instant::now();
    for _ in 0..100 {
        assert!(scheduler.promote(T0 + 1).is_empty());
    }
    println!("promote, nothing due: {:.2?}", started.elapsed() / 100);
    let counts = scheduler.counts();
    println!(
        "left: {} messages, {} deferred",
        counts.messages, counts.deferred
    );
}
