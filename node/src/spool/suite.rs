//! The test body every [`Spool`] implementation must pass.
//!
//! [`run`] takes a factory that opens the implementation on the same,
//! initially empty storage each time it is called; the suite drops its
//! handle before calling it again to check that a reopened spool sees
//! everything that was acknowledged.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use smarthost_proto::address::Mailbox;
use smarthost_proto::envelope::{
    ClientInfo, DeliveryState, Envelope, MessageId, MessageRecord, Recipient,
};

use super::{
    Body, Change, ListCursor, NewMessage, Spool, SpoolError, BODY_CHUNK, READ_WHOLE_UP_TO,
};

const BASE_MS: u64 = 1_700_000_000_000;

tokio::task_local! {
    /// When test message 0 is received, where not at [`BASE_MS`]: see
    /// [`receiving_now`].
    static RECEIVED_FROM: Arc<AtomicU64>;
}

/// Runs `test` with test messages received from now on (message `n` at
/// that moment plus `n` ms) rather than in 2023: a Redis Cluster spool
/// refuses to store a message received longer ago than its store window
/// (see "Consistency" in [`crate::spool::redis`]). [`receive_from_now`]
/// moves that moment on; a task spawned inside `test` does not inherit it.
pub async fn receiving_now<F: Future>(test: F) -> F::Output {
    RECEIVED_FROM
        .scope(Arc::new(AtomicU64::new(now_ms())), test)
        .await
}

/// Inside [`receiving_now`], the next test messages are received from now
/// on (a test or fixture that runs long calls it before it stores more);
/// elsewhere nothing changes.
pub fn receive_from_now() {
    let _ = RECEIVED_FROM.try_with(|from| from.store(now_ms(), Ordering::SeqCst));
}

/// When test message 0 is received.
fn received_base() -> u64 {
    RECEIVED_FROM
        .try_with(|from| from.load(Ordering::SeqCst))
        .unwrap_or(BASE_MS)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn rcpt(local: &str, domain: &str) -> Recipient {
    Recipient {
        address: Mailbox {
            local_part: local.into(),
            domain: domain.into(),
        },
        notify: None,
        orcpt: None,
    }
}

/// The id of test message `n`.
pub fn id(n: u64) -> MessageId {
    MessageId::new(BASE_MS + n, n.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// Test message `n`, received at `BASE_MS + n` (see [`receiving_now`]),
/// with a body of about `body_len` bytes that names it.
pub fn message(n: u64, body_len: usize) -> NewMessage {
    let mut body = format!("Subject: message {n}\r\n\r\n").into_bytes();
    body.extend(
        (0..body_len.saturating_sub(body.len())).map(|i| b'a' + ((i as u64 + n) % 26) as u8),
    );
    let domains = ["example.org", "example.net", "example.com"];
    let envelope = Envelope {
        sender: Some(Mailbox {
            local_part: "app".into(),
            domain: "sender.example".into(),
        }),
        recipients: vec![
            rcpt("a", domains[(n % 3) as usize]),
            rcpt("b", domains[((n + 1) % 3) as usize]),
        ],
        ..Envelope::default()
    };
    let client = ClientInfo {
        ip: "192.0.2.1".parse().expect("literal address"),
        helo: "app.sender.example".into(),
        auth_user: None,
        tls: false,
    };
    let received = received_base() + n;
    let record = MessageRecord::new(id(n), received, body.len() as u64, client, envelope);
    NewMessage {
        record,
        body: body.into(),
    }
}

/// Everything a spool holds: records by id and their bodies.
async fn snapshot(spool: &dyn Spool) -> BTreeMap<MessageId, (MessageRecord, Vec<u8>)> {
    let mut all = BTreeMap::new();
    for record in spool.list().await.expect("list") {
        let body = spool
            .read_body(&record.id)
            .await
            .expect("read_body of a listed message")
            .to_vec()
            .expect("read the part on disk");
        all.insert(record.id.clone(), (record, body));
    }
    all
}

async fn listed(spool: &dyn Spool, n: u64) -> Option<MessageRecord> {
    listed_id(spool, &id(n)).await
}

async fn listed_id(spool: &dyn Spool, id: &MessageId) -> Option<MessageRecord> {
    spool
        .list()
        .await
        .expect("list")
        .into_iter()
        .find(|r| r.id == *id)
}

/// Runs the whole contract against the spool that `open` returns.
pub async fn run<F, Fut>(mut open: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Arc<dyn Spool>>,
{
    let spool = open().await;
    receive_from_now();
    assert!(
        spool.list().await.expect("list").is_empty(),
        "the suite needs an empty spool"
    );

    // Store, list and read back one message.
    let first = message(1, 3000);
    spool.store(vec![first.clone()]).await.expect("store one");
    assert_eq!(spool.list().await.unwrap(), vec![first.record.clone()]);
    assert_eq!(spool.read_body(&id(1)).await.unwrap(), first.body);

    // A batch of many, including an empty body.
    let batch: Vec<NewMessage> = (1000..1300)
        .map(|n| message(n, (n as usize % 5) * 900))
        .collect();
    spool.store(batch.clone()).await.expect("store a batch");
    for m in &batch {
        assert_eq!(spool.read_body(&m.record.id).await.unwrap(), m.body);
        assert_eq!(
            listed_id(&*spool, &m.record.id).await.as_ref(),
            Some(&m.record)
        );
    }
    assert_eq!(spool.list().await.unwrap().len(), 301);

    // An empty batch is a no-op.
    spool.store(Vec::new()).await.expect("store nothing");

    // Update replaces the record and keeps the body.
    let mut updated = first.record.clone();
    updated.deliveries[0].state = DeliveryState::Deferred;
    updated.deliveries[0].attempts = 1;
    updated.deliveries[0].next_attempt_ms += 900_000;
    updated.deliveries.pop();
    spool.update(updated.clone()).await.expect("update");
    assert_eq!(listed(&*spool, 1).await, Some(updated.clone()));
    assert_eq!(spool.read_body(&id(1)).await.unwrap(), first.body);

    // Remove, and what is gone is NotFound.
    spool.remove(&id(1)).await.expect("remove");
    assert_eq!(listed(&*spool, 1).await, None);
    assert!(matches!(spool.read_body(&id(1)).await, Err(SpoolError::NotFound(i)) if i == id(1)));
    assert!(matches!(
        spool.remove(&id(1)).await,
        Err(SpoolError::NotFound(_))
    ));
    assert!(matches!(
        spool.update(updated).await,
        Err(SpoolError::NotFound(_))
    ));
    assert!(matches!(
        spool.read_body(&id(999_999)).await,
        Err(SpoolError::NotFound(_))
    ));
    for n in (1000..1300).step_by(2) {
        spool.remove(&id(n)).await.expect("remove from the batch");
    }

    // Several changes at once: applied in order, unknown ids fail alone.
    let mut changed = message(1001, 0).record;
    changed.deliveries[0].attempts = 3;
    let failed = spool
        .apply(vec![
            Change::Update(Arc::new(changed.clone())),
            Change::Remove(id(1003)),
            Change::Remove(id(999_998)),
        ])
        .await;
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(matches!(&failed[0], (i, SpoolError::NotFound(_)) if *i == id(999_998)));
    assert_eq!(listed(&*spool, 1001).await, Some(changed.clone()));
    assert_eq!(listed(&*spool, 1003).await, None);
    assert!(spool.apply(Vec::new()).await.is_empty());
    spool
        .apply(vec![Change::Update(Arc::new(message(1001, 0).record))])
        .await
        .is_empty()
        .then_some(())
        .expect("apply restores the record");

    // Oldest first, whatever order they were stored in.
    receive_from_now();
    let mut shuffled: Vec<NewMessage> = (2000..2050).rev().map(|n| message(n, 100)).collect();
    shuffled.swap(3, 40);
    spool.store(shuffled).await.expect("store out of order");
    let list = spool.list().await.unwrap();
    assert!(
        list.windows(2)
            .all(|w| (w[0].received_ms, &w[0].id) <= (w[1].received_ms, &w[1].id)),
        "list is oldest first"
    );
    assert_eq!(list.len(), 149 + 50);

    // 200 concurrent stores all land.
    receive_from_now();
    let tasks: Vec<_> = (3000..3200)
        .map(|n| {
            let spool = spool.clone();
            let m = message(n, 2048);
            tokio::spawn(async move { spool.store(vec![m]).await })
        })
        .collect();
    for task in tasks {
        task.await.expect("store task").expect("concurrent store");
    }
    for n in 3000..3200 {
        assert_eq!(
            spool.read_body(&id(n)).await.unwrap(),
            message(n, 2048).body
        );
    }

    // A reopened spool sees exactly what was acknowledged.
    let before = snapshot(&*spool).await;
    assert_eq!(before.len(), 149 + 50 + 200);
    drop(spool);
    let spool = open().await;
    let after = snapshot(&*spool).await;
    assert_eq!(after.len(), before.len());
    assert!(
        after == before,
        "reopened spool differs from what was stored"
    );
    assert_eq!(
        spool.list().await.unwrap(),
        before.values().map(|(r, _)| r.clone()).collect::<Vec<_>>()
    );

    // And it keeps working.
    receive_from_now();
    spool
        .store(vec![message(4000, 10)])
        .await
        .expect("store after reopen");
    spool.remove(&id(4000)).await.expect("remove after reopen");

    // Paged listing: every message once, in list order, for any page size,
    // also where a page boundary falls between messages received in the
    // same millisecond.
    let same_ms: Vec<NewMessage> = (5000..5006)
        .map(|n| {
            let mut m = message(n, 10);
            m.record.received_ms = received_base() + 5000;
            m
        })
        .collect();
    spool.store(same_ms).await.expect("store same-ms messages");
    let all = spool.list().await.unwrap();
    assert_eq!(all.len(), 149 + 50 + 200 + 6);
    for limit in [1, 4, 7, 1000] {
        let mut paged = Vec::new();
        let mut cursor = None;
        for _ in 0..=all.len() {
            let (page, next) = spool
                .list_page(cursor.as_ref(), limit)
                .await
                .expect("list a page");
            assert!(page.len() <= limit);
            paged.extend(page);
            match next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        assert_eq!(paged, all, "pages of {limit}");
    }

    // A cursor stays good when its message leaves meanwhile; a message
    // stored meanwhile that sorts before the cursor is not listed, one
    // that sorts after it is. (Messages received now: a Redis Cluster
    // spool refuses one received longer ago than its store window.)
    receive_from_now();
    let fresh: Vec<MessageRecord> = {
        let fresh: Vec<NewMessage> = (7000..7007).map(|n| message(n, 10)).collect();
        spool.store(fresh.clone()).await.expect("store");
        fresh.into_iter().map(|m| m.record).collect()
    };
    let (_, next) = spool
        .list_page(Some(&ListCursor::of(&fresh[0])), 4)
        .await
        .expect("list a page");
    let cursor = next.expect("more than one page");
    assert_eq!(cursor, ListCursor::of(&fresh[4]));
    spool
        .remove(&fresh[4].id)
        .await
        .expect("remove the cursor's message");
    let mut before = message(6000, 10);
    before.record.received_ms = fresh[0].received_ms;
    let mut after = message(6001, 10);
    after.record.received_ms = fresh[6].received_ms;
    spool
        .store(vec![before.clone(), after.clone()])
        .await
        .expect("store around the cursor");
    let (page, next) = spool.list_page(Some(&cursor), 3).await.expect("next page");
    let mut expected = vec![fresh[5].clone(), fresh[6].clone()];
    let new = after.record.clone();
    if ListCursor::of(&new) < ListCursor::of(&fresh[6]) {
        expected.insert(1, new);
    } else {
        expected.push(new);
    }
    expected.truncate(3);
    assert_eq!(page, expected);
    assert_eq!(next, None, "the page holds the rest");
    // Past the last message: an empty page and no cursor.
    let listed = spool.list().await.unwrap();
    let last = ListCursor::of(listed.last().expect("listed"));
    assert_eq!(
        spool
            .list_page(Some(&last), 10)
            .await
            .expect("past the end"),
        (Vec::new(), None)
    );
    // A page of none is empty, with no cursor.
    assert_eq!(
        spool.list_page(None, 0).await.expect("a page of none"),
        (Vec::new(), None)
    );
    spool.remove(&id(6000)).await.expect("remove");
    spool.remove(&id(6001)).await.expect("remove");
    for record in fresh.iter().filter(|r| r.id != fresh[4].id) {
        spool.remove(&record.id).await.expect("remove");
    }
    for n in 5000..5006 {
        spool
            .remove(&id(n))
            .await
            .expect("remove a same-ms message");
    }

    // Bodies partly on disk, of sizes around the chunk size, stored alone,
    // in a batch with bodies in memory, and with changes to others; read
    // back whole, also after a reopen.
    receive_from_now();
    let sizes = [
        0,
        1,
        BODY_CHUNK - 1,
        BODY_CHUNK,
        BODY_CHUNK + 1,
        3 * BODY_CHUNK + 7,
        READ_WHOLE_UP_TO as usize,
        READ_WHOLE_UP_TO as usize + 1,
        5 * READ_WHOLE_UP_TO as usize + 13,
    ];
    let spilled_batch: Vec<NewMessage> = sizes
        .iter()
        .enumerate()
        .map(|(i, &len)| spilled(8000 + i as u64, len))
        .chain([message(8100, 500)])
        .collect();
    spool
        .store(vec![spilled(8200, 2 * BODY_CHUNK)])
        .await
        .expect("store a spilled body alone");
    spool
        .store(spilled_batch.clone())
        .await
        .expect("store spilled bodies");
    let mut changed = message(8100, 500).record;
    changed.deliveries[0].attempts = 2;
    let failed = spool
        .store_and_apply(
            vec![spilled(8300, BODY_CHUNK + 100)],
            vec![Change::Update(Arc::new(changed.clone()))],
        )
        .await
        .expect("store a spilled body with a change");
    assert!(failed.is_empty(), "{failed:?}");
    let expected: Vec<(MessageId, Vec<u8>)> = spilled_batch
        .iter()
        .chain(&[
            spilled(8200, 2 * BODY_CHUNK),
            spilled(8300, BODY_CHUNK + 100),
        ])
        .map(|m| {
            (
                m.record.id.clone(),
                m.body.to_vec().expect("read the spilled body"),
            )
        })
        .collect();
    for (id, body) in &expected {
        let read = spool.read_body(id).await.unwrap();
        assert_eq!(&read, body, "{id}");
        // Whole up to READ_WHOLE_UP_TO; well past it, the rest stays on
        // disk for delivery.
        let len = body.len() as u64;
        if len <= READ_WHOLE_UP_TO {
            assert!(read.rest().is_none(), "{id}: {len} bytes are read whole");
        } else if len > 2 * READ_WHOLE_UP_TO {
            assert!(
                read.rest().is_some(),
                "{id}: {len} bytes are not read whole"
            );
        }
        assert!(read.head().len() as u64 <= READ_WHOLE_UP_TO + 16, "{id}");
    }
    drop(spool);
    let spool = open().await;
    for (id, body) in &expected {
        assert_eq!(
            &spool.read_body(id).await.unwrap(),
            body,
            "{id} after a reopen"
        );
        let record = listed_id(&*spool, id).await.expect("listed after a reopen");
        assert_eq!(record.size, body.len() as u64);
    }
    assert_eq!(listed_id(&*spool, &id(8100)).await, Some(changed));
    for (id, _) in &expected {
        spool.remove(id).await.expect("remove a spilled message");
    }
}

/// Test message `n` of [`message`] with all but the first bytes of its
/// body in a nameless file, as a large body received over SMTP is.
pub fn spilled(n: u64, body_len: usize) -> NewMessage {
    use std::io::Write;
    let m = message(n, body_len);
    let bytes = m.body.into_head();
    let (head, rest) = bytes.split_at(bytes.len().min(20));
    let mut file = tempfile::tempfile().expect("a temporary file");
    file.write_all(rest).expect("write the body");
    NewMessage {
        record: m.record,
        body: Body::spilled(head.to_vec(), file, rest.len() as u64),
    }
}
