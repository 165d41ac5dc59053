//! The Redis spool, schedule and limits on a real Redis Cluster of three
//! primaries (`smarthost_testkit::redis::RedisCluster`): the shared suites,
//! the two-nodes race, the round trips of the cluster paths, the data spread
//! over the primaries, script reloading and the durability probe.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use smarthost_testkit::redis::{command, RedisCluster};

use crate::delivery::RcptResult;
use crate::limits::{suite as limits_suite, DomainLimits, RedisLimits, RedisLimitsOptions};
use crate::schedule::redis::{RedisSchedule, ACTIVE_KEY};
use crate::schedule::suite::{self as schedule_suite, outcome, policy, Fixture};
use crate::schedule::Schedule;
use crate::spool::redis::{body_key, dangling_grace, record_key, INDEX_KEY, STORE_TIMEOUTS};
use crate::spool::suite::{self as spool_suite, id, message, receive_from_now, receiving_now};
use crate::spool::{Durability, NewMessage, RedisSpool, RedisSpoolOptions, Spool, SpoolError};
use smarthost_proto::envelope::MessageId;

fn options() -> RedisSpoolOptions {
    RedisSpoolOptions {
        response_timeout: Duration::from_secs(2),
        cluster: true,
        ..RedisSpoolOptions::default()
    }
}

/// Opens a spool on the cluster; test messages are received from then on,
/// since starting a cluster on a loaded machine can outlast the store window.
async fn open(cluster: &RedisCluster) -> RedisSpool {
    let spool = RedisSpool::open_with(&cluster.urls(), options())
        .await
        .expect("open on the cluster");
    receive_from_now();
    spool
}

/// The time `ago` before now, in ms since the epoch.
fn ms_ago(ago: Duration) -> u64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    now.saturating_sub(ago).as_millis() as u64
}

/// A node: a spool and a schedule on the cluster.
pub(crate) async fn node(cluster: &RedisCluster) -> (Arc<RedisSpool>, Arc<RedisSchedule>) {
    let spool = Arc::new(open(cluster).await);
    let schedule = Arc::new(RedisSchedule::new(&spool).await.expect("schedule"));
    (spool, schedule)
}

/// Stores messages `numbers` (all due) and schedules them.
async fn queue(spool: &RedisSpool, schedule: &RedisSchedule, numbers: std::ops::Range<u64>) {
    let batch: Vec<_> = numbers.map(|n| message(n, 100)).collect();
    let records = batch.iter().map(|m| m.record.clone()).collect();
    spool.store(batch).await.unwrap();
    schedule.insert(records, u64::MAX / 2).await.unwrap();
}

/// Asserts that every primary took writes, so that the test exercised
/// requests to all three.
fn assert_spread(cluster: &RedisCluster) {
    let writes = cluster.writes_per_node();
    assert!(
        writes.iter().all(|&n| n > 0),
        "writes per primary: {writes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_the_spool_suite_on_a_cluster() {
    receiving_now(async {
        let cluster = RedisCluster::start();
        let urls = cluster.urls();
        spool_suite::run(|| {
            let urls = urls.clone();
            async move {
                Arc::new(RedisSpool::open_with(&urls, options()).await.expect("open"))
                    as Arc<dyn Spool>
            }
        })
        .await;
        assert_spread(&cluster);
    })
    .await
}

#[tokio::test]
async fn a_stored_batch_is_spread_over_the_primaries_and_each_message_stays_in_one_slot() {
    receiving_now(async {
        let cluster = RedisCluster::start();
        let spool = open(&cluster).await;
        let batch: Vec<NewMessage> = (0..100).map(|n| message(n, 2048)).collect();
        spool.store(batch).await.unwrap();
        assert_spread(&cluster);
        let mut used = HashSet::new();
        for n in 0..100 {
            let node = cluster.node_of(&record_key(&id(n)));
            assert_eq!(cluster.node_of(&body_key(&id(n))), node, "message {n}");
            used.insert(node);
        }
        assert_eq!(used.len(), 3, "the 100 messages are on all three primaries");
        // The index is one key on one primary and lists them all.
        let index = cluster.node_of(INDEX_KEY);
        let count = command(cluster.ports()[index], &["ZCARD", INDEX_KEY]);
        assert_eq!(count.as_deref(), Some(":100"));
        assert_eq!(spool.list().await.unwrap().len(), 100);
        for n in [0, 42, 99] {
            assert_eq!(
                spool.read_body(&id(n)).await.unwrap(),
                message(n, 2048).body
            );
        }
    })
    .await
}

#[tokio::test]
async fn round_trips_on_a_cluster() {
    receiving_now(async {
        let cluster = RedisCluster::start();
        let spool = open(&cluster).await;
        let mut trips = smarthost_testkit::since_last(|| spool.round_trips());
        let batch: Vec<NewMessage> = (0..100).map(|n| message(n, 2048)).collect();
        spool.store(batch).await.unwrap();
        assert_eq!(
            trips(),
            2,
            "a store of 100: the index, then every message at once"
        );
        assert_eq!(spool.list().await.unwrap().len(), 100);
        assert_eq!(trips(), 2, "list: the index, then every record at once");
        spool.read_body(&id(5)).await.unwrap();
        assert_eq!(trips(), 1, "read_body");
        let mut record = message(5, 2048).record;
        record.deliveries[0].attempts = 1;
        spool.update(record).await.unwrap();
        assert_eq!(trips(), 1, "update");
        spool.remove(&id(5)).await.unwrap();
        assert_eq!(trips(), 2, "remove: the message, then the index entry");
        assert!(matches!(
            spool.remove(&id(5)).await,
            Err(crate::spool::SpoolError::NotFound(_))
        ));
    })
    .await
}

#[tokio::test]
async fn every_primary_is_asked_about_durability() {
    let cluster = RedisCluster::start();
    assert_eq!(
        open(&cluster).await.durability(),
        Durability::AofFsyncAlways
    );
    // One primary of three fsyncs only every second: a write that lands
    // there is only in memory, so the spool says so.
    let weak = cluster.ports()[2];
    let reply = command(weak, &["CONFIG", "SET", "appendfsync", "everysec"]);
    assert_eq!(reply.as_deref(), Some("+OK"));
    assert_eq!(open(&cluster).await.durability(), Durability::Memory);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_the_schedule_suite_on_a_cluster() {
    receiving_now(async {
        let cluster = RedisCluster::start();
        schedule_suite::run(|| async {
            cluster.flush_all();
            receive_from_now();
            let (spool, schedule) = node(&cluster).await;
            Fixture {
                schedule: schedule as Arc<dyn Schedule>,
                spool: Some(spool as Arc<dyn Spool>),
            }
        })
        .await;
        assert_spread(&cluster);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_taking_at_once_on_a_cluster_never_get_the_same_delivery() {
    receiving_now(async {
        let cluster = RedisCluster::start();
        let (spool, a) = node(&cluster).await;
        let (_, b) = node(&cluster).await;
        // 300 messages, two deliveries each over three domains.
        queue(&spool, &a, 0..300).await;
        let domains = ["example.org", "example.net", "example.com"];
        let homes: HashSet<usize> = domains
            .iter()
            .map(|d| cluster.node_of(&format!("smarthost:{{d:{d}}}:ready")))
            .collect();
        assert!(homes.len() > 1, "the domains share one primary");
        assert_spread(&cluster);
        let lease = Duration::from_secs(60);
        let run = |s: Arc<RedisSchedule>, holder: &'static str| {
            tokio::spawn(async move {
                let mut got = Vec::new();
                loop {
                    let mut any = false;
                    for domain in domains {
                        let jobs = s.take(domain, 7, holder, lease).await.unwrap();
                        any |= !jobs.is_empty();
                        got.extend(jobs.into_iter().map(|(r, i)| (r.id.clone(), i)));
                    }
                    if !any {
                        return got;
                    }
                }
            })
        };
        let (from_a, from_b) = (run(a.clone(), "node-a"), run(b.clone(), "node-b"));
        let (from_a, from_b) = (from_a.await.unwrap(), from_b.await.unwrap());
        assert!(!from_a.is_empty() && !from_b.is_empty(), "both took some");
        let all: HashSet<_> = from_a.iter().chain(&from_b).cloned().collect();
        assert_eq!(all.len(), from_a.len() + from_b.len(), "no delivery twice");
        assert_eq!(all.len(), 600);
        let counts = a.counts().await.unwrap();
        assert_eq!((counts.in_flight, counts.ready), (600, 0));
    })
    .await
}

#[tokio::test]
async fn schedule_round_trips_on_a_cluster() {
    receiving_now(async {
        let cluster = RedisCluster::start();
        let (spool, s) = node(&cluster).await;
        let mut trips = smarthost_testkit::since_last(|| s.round_trips());
        let batch: Vec<_> = (0..30).map(|n| message(n * 3, 100)).collect();
        let records = batch.iter().map(|m| m.record.clone()).collect();
        spool.store(batch).await.unwrap();
        s.insert(records, u64::MAX / 2).await.unwrap();
        assert_eq!(
            trips(),
            3,
            "insert: the domain sets, the domains, the domain sets again"
        );
        let jobs = s
            .take("example.org", 20, "node-a", Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(jobs.len(), 20);
        assert_eq!(trips(), 2, "take of 20: the script, then the records");
        let t0 = jobs[0].0.received_ms;
        let delivered = outcome(&[(0, RcptResult::Delivered), (1, RcptResult::Delivered)]);
        let id = jobs[1].0.id.clone();
        s.complete(&id, "example.org", &delivered, t0, &policy(), 0.0, None)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(trips(), 2, "complete: the record, then the domain");
        // The message's other delivery: done, so its index entry goes too
        // (another slot than the domain's, in the same request).
        let net = s
            .take("example.net", 30, "node-a", Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(trips(), 2, "take");
        assert!(net.iter().any(|(r, _)| r.id == id));
        let done = s
            .complete(&id, "example.net", &delivered, t0, &policy(), 0.0, None)
            .await
            .unwrap()
            .unwrap();
        assert!(done.message_done());
        assert_eq!(
            trips(),
            2,
            "complete: the record, then the domain and the index"
        );
        // Work filed in ready gives no timer: nothing is due yet.
        s.promote(t0).await.unwrap();
        assert_eq!(trips(), 1, "promote with no domain due: the timers");
        // The leases' timers are, far enough ahead.
        s.promote(u64::MAX / 2).await.unwrap();
        assert_eq!(
            trips(),
            3,
            "promote: the timers, the domains, the timers back"
        );
        s.promote(t0).await.unwrap();
        assert_eq!(trips(), 1, "promote with no domain due: the timers");
        s.reclaim_expired_leases().await.unwrap();
        assert_eq!(trips(), 1, "reclaim with no lease due: the timers");
        let counts = s.counts().await.unwrap();
        assert_eq!(trips(), 2, "counts");
        assert_eq!(counts.messages, 29);
        assert_eq!(counts.in_flight, 19 + net.len() - 1);
        let active = command(
            cluster.ports()[cluster.node_of(ACTIVE_KEY)],
            &["SCARD", ACTIVE_KEY],
        );
        assert_eq!(active.as_deref(), Some(":2"), "example.org and example.net");
    })
    .await
}

/// Deliveries that finish at once on a cluster write their records (a
/// call each, every record being in a slot of its own) in one request
/// and are filed together: a call per domain and a `ZREM` per listing for
/// each batch, not a filing and two removals each. 120 deliveries of 60
/// messages end as one by one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_at_once_are_filed_together_on_a_cluster() {
    receiving_now(async {
        let cluster = RedisCluster::start();
        let (spool, s) = node(&cluster).await;
        queue(&spool, &s, 0..60).await;
        let taken = schedule_suite::take_all_of_sixty(&*s).await;
        let before = (s.commands(), s.round_trips());
        let shared: Arc<dyn Schedule> = s.clone();
        let done = schedule_suite::complete_all_at_once(&shared, &taken).await;
        let sent = s.commands() - before.0;
        let trips = s.round_trips() - before.1;
        eprintln!("{trips} round trips for 120 completions");
        assert!(done.iter().all(|&d| d), "every delivery recorded");
        // A record write each, and a read and a write again for a half of
        // a message that lost its record's race to the other half: at most
        // 240; then a few per batch. One by one, a filing each and the
        // removals of the 48 finished messages from the index and their
        // sender's listing add 216 (408 in all, measured).
        eprintln!("{sent} commands for 120 completions");
        assert!(sent <= 240 + 40, "{sent} commands for 120 completions");
        // The record writes go together too: a few requests for each
        // batch, where one by one each completion made one or more.
        assert!(trips <= 20, "{trips} round trips for 120 completions");
        let kept = schedule_suite::only_the_retries_are_left(&*s, &taken).await;
        let port = cluster.ports()[cluster.node_of(INDEX_KEY)];
        let indexed = command(port, &["ZCARD", INDEX_KEY]);
        assert_eq!(
            indexed,
            Some(format!(":{}", kept.len())),
            "the index holds the retries only"
        );
    })
    .await
}

#[tokio::test]
async fn scripts_lost_in_a_restart_of_a_primary_are_loaded_again() {
    receiving_now(async {
        let mut cluster = RedisCluster::start();
        let (spool, s) = node(&cluster).await;
        queue(&spool, &s, 0..2).await;
        // The primary of example.org's keys restarts from its AOF with an
        // empty script cache.
        cluster.restart_node(cluster.node_of("smarthost:{d:example.org}:ready"));
        let deadline = Instant::now() + Duration::from_secs(15);
        let jobs = loop {
            match s
                .take("example.org", 5, "node-a", Duration::from_secs(60))
                .await
            {
                Ok(jobs) => break jobs,
                Err(e) => assert!(Instant::now() < deadline, "{e}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(jobs.len(), 1, "message 0's example.org delivery");

        // The limits reload theirs too.
        let limits = RedisLimits::open(&cluster.urls(), "n1", limits_options())
            .await
            .unwrap();
        assert!(limits
            .acquire_connection("example.org", 1)
            .await
            .unwrap()
            .is_some());
    })
    .await
}

fn limits_options() -> RedisLimitsOptions {
    RedisLimitsOptions {
        response_timeout: Duration::from_secs(2),
        cluster: true,
        ..RedisLimitsOptions::default()
    }
}

#[tokio::test]
async fn passes_the_limits_suite_on_a_cluster() {
    let cluster = RedisCluster::start();
    let limits = RedisLimits::open(&cluster.urls(), "n1", limits_options())
        .await
        .unwrap();
    limits_suite::cap_and_release(&limits).await;
    limits_suite::rate_spaces_reservations(&limits).await;
    // Several domains, so several slots: their keys are on more than one
    // primary.
    let domains = ["a.test", "b.test", "c.test", "d.test", "e.test", "f.test"];
    let mut leases = Vec::new();
    for domain in domains {
        leases.push(limits.acquire_connection(domain, 2).await.unwrap().unwrap());
    }
    let homes: HashSet<usize> = domains
        .iter()
        .map(|d| cluster.node_of(&crate::limits::redis::conns_key(d)))
        .collect();
    assert!(homes.len() > 1, "{homes:?}");
    let keys = cluster.keys_per_node();
    assert!(keys.iter().filter(|&&n| n > 0).count() > 1, "{keys:?}");
    for lease in leases {
        limits.release(lease).await.unwrap();
    }
}

#[tokio::test]
async fn a_dead_nodes_leases_are_reclaimed_on_a_cluster() {
    receiving_now(async {
        let cluster = RedisCluster::start();
        let (spool, a) = node(&cluster).await;
        let (_, b) = node(&cluster).await;
        schedule_suite::dead_holders_are_reclaimed(spool, a, b).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_expiry_sweeps_at_once_on_a_cluster_report_each_delivery_once() {
    receiving_now(async {
        let cluster = RedisCluster::start();
        let (spool, a) = node(&cluster).await;
        let (_, b) = node(&cluster).await;
        schedule_suite::two_sweeps_at_once_report_each_delivery_once(spool, a, b).await;
        assert_spread(&cluster);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_loses_no_message_acknowledged_with_a_replica() {
    receiving_now(async {
    let mut cluster = RedisCluster::start_with_replicas();
    let spool = RedisSpool::open_with(
        &cluster.urls(),
        RedisSpoolOptions {
            min_replicas: 1,
            ..options()
        },
    )
    .await
    .expect("open on the cluster");
    receive_from_now();
    let mut acknowledged = Vec::new();
    for n in 0..60 {
        receive_from_now();
        spool
            .store(vec![message(n, 500)])
            .await
            .expect("store before");
        acknowledged.push(id(n));
    }
    // A primary that holds messages but not the index: with its replica
    // promoted (and no replica left behind it) its slots refuse writes
    // from then on, the others go on.
    let index_home = cluster.node_of(INDEX_KEY);
    let victim = (0..60)
        .map(|n| cluster.node_of(&record_key(&id(n))))
        .find(|&node| node != index_home)
        .expect("messages on another primary than the index");
    let on_victim: Vec<MessageId> = (0..60)
        .map(id)
        .filter(|m| cluster.node_of(&record_key(m)) == victim)
        .collect();
    assert!(!on_victim.is_empty());
    cluster.kill(victim);
    let killed = Instant::now();

    // Submissions go on (bounded): refused while the cluster fails over,
    // and, for the lost primary's slots, as long as it has no replica.
    let mut refused = 0;
    let mut after = 0;
    let mut first_after = None;
    for n in 1000..1400 {
        if killed.elapsed() > Duration::from_secs(40) || after >= 20 {
            break;
        }
        receive_from_now();
        match spool.store(vec![message(n, 500)]).await {
            Ok(()) => {
                acknowledged.push(id(n));
                after += 1;
                first_after.get_or_insert(killed.elapsed());
            }
            Err(SpoolError::Unavailable(_)) => {
                refused += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(other) => panic!("store {n}: {other}"),
        }
    }
    eprintln!(
        "after the kill: first store acknowledged after {first_after:?}; {after} stored, {refused} refused within {:?}",
        killed.elapsed()
    );
    assert!(after >= 20, "the other primaries stopped taking mail");
    cluster.wait_until_ok();

    // Everything acknowledged is there, those of the lost primary too.
    let listed: HashSet<MessageId> = spool
        .list()
        .await
        .expect("list after the failover")
        .into_iter()
        .map(|r| r.id)
        .collect();
    for m in &acknowledged {
        assert!(listed.contains(m), "{m} was acknowledged and is gone");
    }
    for m in &on_victim {
        spool
            .read_body(m)
            .await
            .expect("the body survived the failover");
    }
    })
    .await
}

/// An unreadable record on a cluster: set aside across its slot and the
/// index slot, skipped by the listing, the domain and the expiry sweep,
/// and listed.
#[tokio::test]
async fn an_unreadable_record_is_set_aside_on_a_cluster() {
    receiving_now(async {
        let cluster = RedisCluster::start();
        let (spool, s) = node(&cluster).await;
        queue(&spool, &s, 0..6).await;
        let key = record_key(&id(3));
        let port = cluster.ports()[cluster.node_of(&key)];
        // Version byte 99 ("c"): a record of a newer release.
        assert!(command(port, &["SETRANGE", &key, "0", "c"]).is_some());
        let listed: Vec<MessageId> = spool
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(listed, [0, 1, 2, 4, 5].map(id));
        let quarantined = spool.quarantined(10).await.unwrap();
        assert_eq!(quarantined.len(), 1);
        assert_eq!(quarantined[0].location, id(3).0);
        assert!(
            quarantined[0].reason.contains("version 99"),
            "{quarantined:?}"
        );
        // Its deliveries are dropped where they wait; the others go on.
        let taken = s
            .take("example.org", 10, "node-a", Duration::from_secs(60))
            .await
            .unwrap();
        let taken: Vec<MessageId> = taken.into_iter().map(|(r, _)| r.id.clone()).collect();
        assert_eq!(taken, [0, 2, 5].map(id), "3 is gone");
        let expired = s.expire(u64::MAX / 2, &policy(), None).await.unwrap();
        let expired: HashSet<MessageId> =
            expired.into_iter().map(|c| c.record.id.clone()).collect();
        assert_eq!(
            expired,
            HashSet::from([0, 1, 2, 4, 5].map(id)),
            "every other message, in its deliveries not in flight"
        );
    })
    .await
}

/// A batch that waited in an overloaded node until less than a response
/// timeout is left of its store window (see "Consistency" in
/// `spool::redis`) is refused (`451`, the client sends it again) before
/// anything of it is written; one inside its window is stored.
#[tokio::test]
async fn a_store_past_its_window_is_refused_before_it_writes_anything() {
    let cluster = RedisCluster::start();
    let spool = open(&cluster).await;
    let timeout = options().response_timeout;
    let received = |ago: Duration, n: u64| {
        let mut m = message(n, 100);
        m.record.received_ms = ms_ago(ago);
        m
    };
    spool.store(vec![received(timeout * 3, 1)]).await.unwrap();

    let last_chance = timeout * (STORE_TIMEOUTS - 1) + timeout / 2;
    let batch = vec![received(Duration::ZERO, 2), received(last_chance, 3)];
    match spool.store(batch).await {
        Err(SpoolError::Unavailable(why)) => assert!(why.contains("received"), "{why}"),
        other => panic!("a store past its window: {other:?}"),
    }
    let index = cluster.ports()[cluster.node_of(INDEX_KEY)];
    for n in [2, 3] {
        let home = cluster.ports()[cluster.node_of(&record_key(&id(n)))];
        let exists = command(home, &["EXISTS", &record_key(&id(n)), &body_key(&id(n))]);
        assert_eq!(exists.as_deref(), Some(":0"), "message {n} was written");
        let score = command(index, &["ZSCORE", INDEX_KEY, id(n).as_str()]);
        assert_eq!(score.as_deref(), Some(""), "message {n} was indexed");
    }
    let listed: Vec<MessageId> = spool
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(listed, [id(1)]);
}

/// The overload race of issue 8: a batch that waited past the orphan grace
/// writes its index entry, its message's primary answers slowly, and
/// meanwhile another node's listing meets the entry without its record
/// and deletes it as an orphan. The store must then not be acknowledged:
/// an acknowledged message that no listing, rescan or expiry sweep can find
/// is lost once its schedule entry is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_reader_cleans_away_the_index_entry_of_an_acknowledged_store() {
    let cluster = RedisCluster::start();
    // The writer waits up to 5 s for a reply; the reader's grace is that
    // of a 2 s response timeout.
    let writer = RedisSpool::open_with(
        &cluster.urls(),
        RedisSpoolOptions {
            cluster: true,
            ..RedisSpoolOptions::default()
        },
    )
    .await
    .expect("open on the cluster");
    let reader = open(&cluster).await;
    let index_home = cluster.node_of(INDEX_KEY);
    let n = (0..100)
        .find(|&n| cluster.node_of(&record_key(&id(n))) != index_home)
        .expect("a message on another primary than the index");
    let home = cluster.ports()[cluster.node_of(&record_key(&id(n)))];
    let index = cluster.ports()[index_home];
    let mut m = message(n, 100);
    m.record.received_ms =
        ms_ago(dangling_grace(options().response_timeout) + Duration::from_secs(5));

    // The message's primary holds writes for 3 s (reads go on).
    let paused = command(home, &["CLIENT", "PAUSE", "3000", "WRITE"]);
    assert_eq!(paused.as_deref(), Some("+OK"));
    let store = tokio::spawn(async move { writer.store(vec![m]).await });
    let deadline = Instant::now() + Duration::from_secs(5);
    while !store.is_finished()
        && command(index, &["ZSCORE", INDEX_KEY, id(n).as_str()]).as_deref() == Some("")
    {
        assert!(Instant::now() < deadline, "neither indexed nor refused");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Another node lists the queue while the message keys are on their way.
    assert!(reader.list().await.unwrap().iter().all(|r| r.id != id(n)));
    let stored = store.await.unwrap();
    assert_eq!(
        command(home, &["CLIENT", "UNPAUSE"]).as_deref(),
        Some("+OK")
    );

    let listed = reader.list().await.unwrap();
    if stored.is_ok() {
        assert!(
            listed.iter().any(|r| r.id == id(n)),
            "message {n} was acknowledged and no listing finds it any more"
        );
    }
    match stored {
        Err(SpoolError::Unavailable(_)) => {}
        other => panic!("a store past its window: {other:?}"),
    }
    // Refused before its message writes: nothing of it is left to deliver.
    let exists = command(home, &["EXISTS", &record_key(&id(n)), &body_key(&id(n))]);
    assert_eq!(exists.as_deref(), Some(":0"));
    assert!(listed.is_empty(), "{listed:?}");
}
