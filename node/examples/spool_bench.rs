//! Stores N messages of 2 KB from 20 concurrent senders through the Queue
//! actor into a local spool and prints the rate and the number of store
//! calls (one fsync each). For comparison, it then stores as many messages
//! straight into a second spool, one store call per message. Last, one
//! writer stores 2,000 messages a call at a time in a segment made ahead of
//! use (zeros, `LocalSpoolOptions::zero_ahead`) and in one that grows with
//! each write, and prints how long the calls took.
//!
//! ```text
//! cargo run --release -p smarthost-node --example spool_bench -- [N] [DIR]
//! ```
//!
//! DIR defaults to a temporary directory (put it on the disk you care about).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Actor;
use smarthost_node::queue::{Enqueue, Queue, Stats};
use smarthost_node::spool::{LocalSpool, LocalSpoolOptions, NewMessage, Spool};
use smarthost_proto::address::Mailbox;
use smarthost_proto::envelope::{ClientInfo, Envelope, MessageId, MessageRecord, Recipient};

const SENDERS: u64 = 20;
const BODY: usize = 2048;

fn message(n: u64) -> NewMessage {
    let envelope = Envelope {
        sender: Some(Mailbox {
            local_part: "app".into(),
            domain: "sender.example".into(),
        }),
        recipients: vec![Recipient {
            address: Mailbox {
                local_part: format!("user{n}"),
                domain: format!("example{}.org", n % 10),
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
    let received = 1_700_000_000_000 + n;
    let record = MessageRecord::new(
        MessageId::new(received, n),
        received,
        BODY as u64,
        client,
        envelope,
    );
    NewMessage {
        record,
        body: vec![b'x'; BODY].into(),
    }
}

fn report(what: &str, n: u64, secs: f64, fsyncs: u64) {
    println!(
        "{what}: {n} messages in {secs:.2} s = {:.0} messages/s, {fsyncs} store calls (fsyncs), {:.1} messages per fsync",
        n as f64 / secs,
        n as f64 / fsyncs.max(1) as f64
    );
}

#[actix::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let total: u64 = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(20_000);
    let tmp = tempfile::tempdir()?;
    let root = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| tmp.path().into());
    let per_sender = total / SENDERS;
    let total = per_sender * SENDERS;

    // Through the Queue: concurrent enqueues share fsyncs.
    let spool = LocalSpool::open(&root.join("queued"), LocalSpoolOptions::default())?;
    let queue = Queue::new(Arc::new(spool)).start();
    let started = Instant::now();
    let senders: Vec<_> = (0..SENDERS)
        .map(|s| {
            let queue = queue.clone();
            tokio::spawn(async move {
                for i in 0..per_sender {
                    let message = message(s * per_sender + i);
                    queue.send(Enqueue(message)).await??;
                }
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            })
        })
        .collect();
    for sender in senders {
        sender.await?.map_err(|e| e.to_string())?;
    }
    let secs = started.elapsed().as_secs_f64();
    let stats = queue.send(Stats).await?;
    report("queue (group commit)", total, secs, stats.store_calls);

    // Straight into the spool: one fsync per message.
    let direct: Arc<dyn Spool> = Arc::new(LocalSpool::open(
        &root.join("direct"),
        LocalSpoolOptions::default(),
    )?);
    let direct_total = total.min(2000);
    let per_sender = direct_total / SENDERS;
    let started = Instant::now();
    let senders: Vec<_> = (0..SENDERS)
        .map(|s| {
            let spool = direct.clone();
            tokio::spawn(async move {
                for i in 0..per_sender {
                    spool.store(vec![message(s * per_sender + i)]).await?;
                }
                Ok::<_, smarthost_node::spool::SpoolError>(())
            })
        })
        .collect();
    for sender in senders {
        sender.await??;
    }
    let direct_total = per_sender * SENDERS;
    report(
        "spool without the queue",
        direct_total,
        started.elapsed().as_secs_f64(),
        direct_total,
    );

    for zero_ahead in [true, false, true, false] {
        let mut calls = one_writer(&root, zero_ahead, 2000).await?;
        calls.sort();
        let at = |q: f64| calls[((calls.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
        println!(
            "one writer, {}: {} store calls, median {:.0} µs, p90 {:.0} µs, p99 {:.0} µs",
            if zero_ahead {
                "segment made ahead"
            } else {
                "segment growing"
            },
            calls.len(),
            at(0.5),
            at(0.9),
            at(0.99)
        );
    }
    Ok(())
}

/// How long each of `count` store calls of one message took, one after
/// the other, in the second segment of a new spool (8 MiB segments): made
/// ahead of use with `zero_ahead`, growing with each write without.
async fn one_writer(
    root: &Path,
    zero_ahead: bool,
    count: usize,
) -> Result<Vec<Duration>, Box<dyn std::error::Error>> {
    std::fs::create_dir_all(root)?;
    let tmp = tempfile::Builder::new()
        .prefix("one-writer-")
        .tempdir_in(root)?;
    let dir = tmp.path().join("spool");
    let options = LocalSpoolOptions {
        segment_size: 8 << 20,
        zero_ahead,
        ..LocalSpoolOptions::default()
    };
    let spool = LocalSpool::open(&dir, options)?;
    let segments = || {
        std::fs::read_dir(&dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".journal"))
                    .count()
            })
            .unwrap_or(0)
    };
    // The first segment, in batches small enough (about 40 KB an fsync)
    // for a spare; past half of it the next one is made ahead (by the
    // housekeeping thread, within a second).
    let mut n = 0;
    let mut waited = false;
    while segments() < 2 {
        let batch: Vec<NewMessage> = (n..n + 16).map(message).collect();
        n += 16;
        spool.store(batch).await?;
        if !waited && n * BODY as u64 > 5 << 20 {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            waited = true;
        }
    }
    let mut calls = Vec::with_capacity(count);
    for i in 0..count as u64 {
        let started = Instant::now();
        spool.store(vec![message(n + i)]).await?;
        calls.push(started.elapsed());
    }
    drop(spool);
    Ok(calls)
}
