//! A node restarted under the same id while the leader still holds a
//! dead list from before the restart: the leader's reclaim must put back
//! what the stopped process held, never what the new process took since.
//! Real Redis, the real spool, schedule and membership.

use std::time::Duration;

use smarthost_coordinator::membership::{lease_holder, Join, Membership, NodeInfo};
use smarthost_coordinator::redis::{Redis, RedisOptions};
use smarthost_node::schedule::{RedisSchedule, Schedule};
use smarthost_node::spool::{NewMessage, RedisSpool, RedisSpoolOptions, Spool};
use smarthost_proto::address::Mailbox;
use smarthost_proto::envelope::{ClientInfo, Envelope, MessageId, MessageRecord, Recipient};
use smarthost_testkit::redis::RedisServer;

const TTL: Duration = Duration::from_secs(30);
const LEASE: Duration = Duration::from_secs(600);

fn message(n: u64) -> NewMessage {
    let envelope = Envelope {
        sender: Some(Mailbox {
            local_part: "app".into(),
            domain: "sender.example".into(),
        }),
        recipients: vec![Recipient {
            address: Mailbox {
                local_part: format!("user{n}"),
                domain: "example.org".into(),
            },
            notify: None,
            orcpt: None,
        }],
        ..Envelope::default()
    };
    let client = ClientInfo {
        ip: "192.0.2.1".parse().unwrap(),
        helo: "app.sender.example".into(),
        auth_user: None,
        tls: false,
    };
    let received = 1_700_000_000_000 + n;
    let record = MessageRecord::new(MessageId::new(received, n), received, 10, client, envelope);
    NewMessage {
        record,
        body: b"Subject: x\r\n\r\nx\r\n".to_vec().into(),
    }
}

struct Cluster {
    schedule: RedisSchedule,
    redis: Redis,
    _spool: RedisSpool,
}

async fn cluster(server: &RedisServer, messages: u64) -> Cluster {
    let spool = RedisSpool::open_with(
        &server.url(),
        RedisSpoolOptions {
            // The grace for orphaned leases is two replies and a second.
            response_timeout: Duration::from_millis(500),
            ..RedisSpoolOptions::default()
        },
    )
    .await
    .unwrap();
    let schedule = RedisSchedule::new(&spool).await.unwrap();
    let batch: Vec<NewMessage> = (0..messages).map(message).collect();
    let records = batch.iter().map(|m| m.record.clone()).collect();
    spool.store(batch).await.unwrap();
    schedule.insert(records, u64::MAX / 2).await.unwrap();
    let redis = Redis::connect(&server.url(), RedisOptions::default())
        .await
        .unwrap();
    Cluster {
        schedule,
        redis,
        _spool: spool,
    }
}

/// A process of `node` and the holder of the leases it takes.
fn process(redis: &Redis, node: &str) -> (Membership, String) {
    let info = NodeInfo::new("host");
    let holder = lease_holder(node, &info.instance);
    (
        Membership::new(redis.clone(), node, TTL).with_info(info),
        holder,
    )
}

async fn take_one(schedule: &RedisSchedule, holder: &str) -> MessageId {
    let jobs = schedule
        .take("example.org", 1, holder, LEASE)
        .await
        .unwrap();
    assert_eq!(jobs.len(), 1);
    jobs[0].0.id.clone()
}

#[tokio::test]
async fn a_stale_dead_list_does_not_reclaim_the_leases_of_a_node_restarted_since() {
    let server = RedisServer::start();
    let c = cluster(&server, 3).await;

    // The first process of node-a takes work, then stops cleanly.
    let (first, first_holder) = process(&c.redis, "node-a");
    assert_eq!(first.join().await.unwrap(), Join::Joined);
    let left_behind = take_one(&c.schedule, &first_holder).await;
    assert!(first.stop().await.unwrap());

    // The leader reads the membership: node-a is dead. It acts on this
    // list for a few seconds more.
    let (leader, _) = process(&c.redis, "leader");
    leader.join().await.unwrap();
    let stale = leader.members().await.unwrap();
    assert_eq!(
        stale.dead.iter().map(|n| n.id.as_str()).collect::<Vec<_>>(),
        ["node-a"]
    );

    // Meanwhile node-a starts again (a clean stop lets it at once) and
    // takes work.
    let (second, second_holder) = process(&c.redis, "node-a");
    assert_eq!(second.join().await.unwrap(), Join::Joined);
    assert_ne!(first_holder, second_holder);
    let running = take_one(&c.schedule, &second_holder).await;

    // The leader's tick with the stale list: only the stopped process's
    // lease comes back.
    let reclaimed = c
        .schedule
        .reclaim_holders(&stale.dead_holders())
        .await
        .unwrap();
    assert_eq!(reclaimed, 1, "the new process's lease was reclaimed too");
    let counts = c.schedule.counts().await.unwrap();
    assert_eq!((counts.in_flight, counts.ready), (1, 2), "{counts:?}");
    let again = take_one(&c.schedule, "node-b").await;
    assert_eq!(
        again, left_behind,
        "the stopped process's delivery is due again"
    );
    assert_ne!(again, running);

    // A fresh read: node-a is alive.
    let members = leader.members().await.unwrap();
    assert!(members.dead.is_empty(), "{members:?}");
}

#[tokio::test]
async fn a_restarted_node_puts_back_what_its_crashed_predecessor_held() {
    let server = RedisServer::start();
    let c = cluster(&server, 3).await;
    let first = lease_holder("node-a", "00000000000000aa");
    let second = lease_holder("node-a", "00000000000000bb");
    // Another node whose id ends like this one's.
    let other = lease_holder("x@node-a", "00000000000000cc");
    let orphan = take_one(&c.schedule, &first).await;
    take_one(&c.schedule, &second).await;
    take_one(&c.schedule, &other).await;
    // Past the grace for leases on their way (two replies and a second).
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_eq!(c.schedule.renew_leases(&second, LEASE).await.unwrap(), 1);
    let counts = c.schedule.counts().await.unwrap();
    assert_eq!((counts.in_flight, counts.ready), (2, 1), "{counts:?}");
    assert_eq!(take_one(&c.schedule, "node-b").await, orphan);
}
