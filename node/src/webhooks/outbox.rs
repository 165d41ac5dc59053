//! The webhook outbox: events waiting to be posted, durable, each with
//! the time it is due. The local backend keeps it in memory and in a
//! journal beside the spool; the Redis backend in Redis, shared by every
//! node, each event leased to the node posting it.
//!
//! An entry is one event for one endpoint, named `<endpoint>/<event id>`:
//! an event written again (a step repeated after a crash) while its entry
//! waits is the same entry.
//!
//! # Redis keys
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `smarthost:{hooks}:due` | sorted set | entry names, scored by when each is due (ms); a taken entry by when its lease ends |
//! | `smarthost:{hooks}:entries` | hash | entry name → the entry as JSON |

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use redis::Script;
use serde::{Deserialize, Serialize};
use smarthost_coordinator::redis::Connection;

use super::Event;
use crate::journal::Journal;

/// One event for one endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub endpoint: String,
    pub event: Event,
    /// When the entry was written (ms): it is dropped past `max_age`.
    pub created_ms: u64,
    /// Posts that failed so far.
    #[serde(default)]
    pub failures: u32,
}

impl Entry {
    pub fn new(endpoint: &str, event: Event, now_ms: u64) -> Entry {
        Entry {
            endpoint: endpoint.to_string(),
            event,
            created_ms: now_ms,
            failures: 0,
        }
    }

    pub fn name(&self) -> String {
        format!("{}/{}", self.endpoint, self.event.id)
    }
}

#[async_trait]
pub trait Outbox: Send + Sync {
    /// Adds entries, due now; durable when it returns. An entry already
    /// waiting stays as it is.
    async fn add(&self, entries: Vec<Entry>) -> Result<(), String>;

    /// At most `max` entries due at `now_ms`, earliest first, each leased
    /// for `lease` (not handed out again before it ends).
    async fn take(&self, now_ms: u64, max: usize, lease: Duration) -> Result<Vec<Entry>, String>;

    /// Removes entries that were posted (or dropped).
    async fn done(&self, names: &[String]) -> Result<(), String>;

    /// Puts back entries whose post failed, due at `due_ms`, with their
    /// counts of failures, in one step; an entry removed meanwhile stays
    /// removed.
    async fn retry(&self, entries: &[Entry], due_ms: u64) -> Result<(), String>;

    /// How many entries wait.
    async fn count(&self) -> Result<u64, String>;
}

/// One line of the local journal. A failed post is not journaled: after a
/// restart every entry is due at once.
#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Line {
    Add { entry: Box<Entry> },
    Done { name: String },
}

/// The outbox of this node (the local backend).
pub struct LocalOutbox {
    inner: Arc<LocalInner>,
}

struct LocalInner {
    state: Mutex<LocalState>,
    /// The highest write made durable; one writer syncs for all that
    /// wrote before it (group commit).
    synced: Mutex<u64>,
}

#[derive(Default)]
struct LocalState {
    entries: HashMap<String, (Entry, u64)>,
    due: BTreeSet<(u64, String)>,
    journal: Option<Journal>,
    sync: Option<std::fs::File>,
    /// Writes made so far.
    written: u64,
}

impl LocalState {
    fn insert(&mut self, entry: Entry, due_ms: u64) {
        let name = entry.name();
        if let Some((_, old)) = self.entries.insert(name.clone(), (entry, due_ms)) {
            self.due.remove(&(old, name.clone()));
        }
        self.due.insert((due_ms, name));
    }

    fn remove(&mut self, name: &str) -> bool {
        match self.entries.remove(name) {
            Some((_, due)) => self.due.remove(&(due, name.to_string())),
            None => false,
        }
    }

    fn compact(&mut self) -> std::io::Result<()> {
        let Some(journal) = &mut self.journal else {
            return Ok(());
        };
        let live = self.entries.values().map(|(entry, _)| Line::Add {
            entry: Box::new(entry.clone()),
        });
        if journal.mostly_dead(self.entries.len()) {
            journal.rewrite(live)?;
            self.sync = Some(journal.sync_handle()?);
        }
        Ok(())
    }
}

impl LocalOutbox {
    /// Opens (or starts) the outbox journal at `path` and replays it.
    pub fn open(path: &std::path::Path) -> Result<LocalOutbox, String> {
        let fail = |e: std::io::Error| format!("{}: {e}", path.display());
        let mut state = LocalState::default();
        let journal = Journal::open(path, |line: Line| match line {
            Line::Add { entry } => {
                if !state.entries.contains_key(&entry.name()) {
                    state.insert(*entry, 0);
                }
            }
            Line::Done { name } => {
                state.remove(&name);
            }
        })
        .map_err(fail)?;
        state.sync = Some(journal.sync_handle().map_err(fail)?);
        state.journal = Some(journal);
        state.compact().map_err(fail)?;
        Ok(LocalOutbox::with(state))
    }

    /// An outbox without a file, for tests.
    pub fn in_memory() -> LocalOutbox {
        LocalOutbox::with(LocalState::default())
    }

    fn with(state: LocalState) -> LocalOutbox {
        LocalOutbox {
            inner: Arc::new(LocalInner {
                state: Mutex::new(state),
                synced: Mutex::new(0),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LocalState> {
        self.inner.state.lock().expect("not poisoned")
    }
}

impl LocalInner {
    /// Removes entries; the lines saying so are not synced: one lost in a
    /// crash posts its event again.
    fn done(&self, names: &[String]) -> std::io::Result<()> {
        let mut state = self.state.lock().expect("not poisoned");
        let gone: Vec<Line> = names
            .iter()
            .filter(|name| state.remove(name))
            .map(|name| Line::Done { name: name.clone() })
            .collect();
        if let Some(journal) = &mut state.journal {
            journal.write(&gone)?;
        }
        state.compact()
    }

    fn add(&self, entries: Vec<Entry>) -> std::io::Result<()> {
        let (written, sync) = {
            let mut state = self.state.lock().expect("not poisoned");
            let new: Vec<Line> = entries
                .into_iter()
                .filter(|e| !state.entries.contains_key(&e.name()))
                .map(|entry| Line::Add {
                    entry: Box::new(entry),
                })
                .collect();
            if new.is_empty() {
                return Ok(());
            }
            if let Some(journal) = &mut state.journal {
                journal.write(&new)?;
            }
            for line in new {
                if let Line::Add { entry } = line {
                    state.insert(*entry, 0);
                }
            }
            state.written += 1;
            let sync = match &state.sync {
                Some(file) => Some(file.try_clone()?),
                None => None,
            };
            (state.written, sync)
        };
        let Some(sync) = sync else {
            return Ok(());
        };
        let mut synced = self.synced.lock().expect("not poisoned");
        if *synced >= written {
            return Ok(());
        }
        // Everything written up to now is covered by this one sync.
        let upto = self.state.lock().expect("not poisoned").written;
        sync.sync_data()?;
        *synced = upto;
        Ok(())
    }
}

#[async_trait]
impl Outbox for LocalOutbox {
    async fn add(&self, entries: Vec<Entry>) -> Result<(), String> {
        // A sync may take milliseconds: off the runtime's threads.
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.add(entries))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("webhook outbox: {e}"))
    }

    async fn take(&self, now_ms: u64, max: usize, lease: Duration) -> Result<Vec<Entry>, String> {
        let mut state = self.state();
        let names: Vec<String> = state
            .due
            .iter()
            .take_while(|(due, _)| *due <= now_ms)
            .take(max)
            .map(|(_, name)| name.clone())
            .collect();
        let until = now_ms + lease.as_millis() as u64;
        let mut taken = Vec::with_capacity(names.len());
        for name in names {
            if let Some((entry, _)) = state.entries.get(&name) {
                let entry = entry.clone();
                state.insert(entry.clone(), until);
                taken.push(entry);
            }
        }
        Ok(taken)
    }

    async fn done(&self, names: &[String]) -> Result<(), String> {
        if names.is_empty() {
            return Ok(());
        }
        // A write, and now and then a rewrite with its syncs: off the
        // runtime's threads, as an add is.
        let inner = self.inner.clone();
        let names = names.to_vec();
        tokio::task::spawn_blocking(move || inner.done(&names))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("webhook outbox: {e}"))
    }

    async fn retry(&self, entries: &[Entry], due_ms: u64) -> Result<(), String> {
        let mut state = self.state();
        for entry in entries {
            if state.entries.contains_key(&entry.name()) {
                state.insert(entry.clone(), due_ms);
            }
        }
        Ok(())
    }

    async fn count(&self) -> Result<u64, String> {
        Ok(self.state().entries.len() as u64)
    }
}

/// The outbox of the cluster, in Redis.
pub struct RedisOutbox {
    conn: Connection,
    timeout: Duration,
}

const DUE_KEY: &str = "smarthost:{hooks}:due";
const ENTRIES_KEY: &str = "smarthost:{hooks}:entries";

static TAKE: std::sync::LazyLock<Script> =
    std::sync::LazyLock::new(|| Script::new(include_str!("take.lua")));
static RETRY: std::sync::LazyLock<Script> =
    std::sync::LazyLock::new(|| Script::new(include_str!("retry.lua")));

impl RedisOutbox {
    /// The outbox on `conn`, a connection the node's other shared stores
    /// use too.
    pub fn new(conn: Connection, timeout: Duration) -> RedisOutbox {
        RedisOutbox { conn, timeout }
    }

    async fn bounded<T>(
        &self,
        request: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, String> {
        crate::spool::redis::bounded(self.timeout, "webhook outbox", request).await
    }
}

/// Entries written per round trip.
const ADD_BATCH: usize = 500;

#[async_trait]
impl Outbox for RedisOutbox {
    async fn add(&self, entries: Vec<Entry>) -> Result<(), String> {
        let now = crate::now_ms();
        for batch in entries.chunks(ADD_BATCH) {
            let mut pipe = redis::pipe();
            pipe.atomic();
            for entry in batch {
                let name = entry.name();
                let json = serde_json::to_string(entry).map_err(|e| e.to_string())?;
                pipe.cmd("HSETNX")
                    .arg(ENTRIES_KEY)
                    .arg(&name)
                    .arg(json)
                    .ignore();
                pipe.cmd("ZADD")
                    .arg(DUE_KEY)
                    .arg("NX")
                    .arg(now)
                    .arg(&name)
                    .ignore();
            }
            let mut conn = self.conn.clone();
            self.bounded(pipe.query_async::<()>(&mut conn)).await?;
        }
        Ok(())
    }

    async fn take(&self, now_ms: u64, max: usize, lease: Duration) -> Result<Vec<Entry>, String> {
        let mut conn = self.conn.clone();
        let mut invocation = TAKE.key(DUE_KEY);
        invocation
            .key(ENTRIES_KEY)
            .arg(now_ms)
            .arg(max)
            .arg(now_ms + lease.as_millis() as u64);
        // Name, entry, name, entry, ...
        let found: Vec<String> = self.bounded(invocation.invoke_async(&mut conn)).await?;
        let mut taken = Vec::with_capacity(found.len() / 2);
        let mut unreadable = Vec::new();
        for pair in found.chunks_exact(2) {
            match serde_json::from_str::<Entry>(&pair[1]) {
                Ok(entry) => taken.push(entry),
                Err(error) => {
                    tracing::error!(%error, entry = %pair[0], "unreadable webhook outbox entry dropped");
                    unreadable.push(pair[0].clone());
                }
            }
        }
        self.done(&unreadable).await?;
        Ok(taken)
    }

    async fn done(&self, names: &[String]) -> Result<(), String> {
        if names.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("ZREM")
            .arg(DUE_KEY)
            .arg(names)
            .ignore()
            .cmd("HDEL")
            .arg(ENTRIES_KEY)
            .arg(names)
            .ignore();
        let mut conn = self.conn.clone();
        self.bounded(pipe.query_async::<()>(&mut conn)).await
    }

    async fn retry(&self, entries: &[Entry], due_ms: u64) -> Result<(), String> {
        for batch in entries.chunks(ADD_BATCH) {
            let mut invocation = RETRY.key(DUE_KEY);
            invocation.key(ENTRIES_KEY).arg(due_ms);
            for entry in batch {
                let json = serde_json::to_string(entry).map_err(|e| e.to_string())?;
                invocation.arg(entry.name()).arg(json);
            }
            let mut conn = self.conn.clone();
            self.bounded(invocation.invoke_async::<()>(&mut conn))
                .await?;
        }
        Ok(())
    }

    async fn count(&self) -> Result<u64, String> {
        let mut conn = self.conn.clone();
        self.bounded(redis::cmd("ZCARD").arg(DUE_KEY).query_async(&mut conn))
            .await
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::webhooks::{Event, EventKind};
    use smarthost_testkit::redis::RedisServer;

    fn entry(endpoint: &str, id: &str, created_ms: u64) -> Entry {
        Entry::new(
            endpoint,
            Event {
                id: id.into(),
                event: EventKind::Delivered,
                time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
                message_id: "m".into(),
                sender: "a@example.org".into(),
                recipient: "b@example.org".into(),
                account: None,
                reply: Some("250 ok".into()),
                attempt: 1,
                remote_host: None,
            },
            created_ms,
        )
    }

    fn names(entries: &[Entry]) -> Vec<String> {
        let mut names: Vec<String> = entries.iter().map(Entry::name).collect();
        names.sort();
        names
    }

    /// The rules every outbox follows.
    async fn suite(outbox: &dyn Outbox) {
        let lease = Duration::from_secs(30);
        let now = crate::now_ms();
        assert_eq!(outbox.count().await, Ok(0));
        assert!(outbox.take(now, 10, lease).await.unwrap().is_empty());

        outbox
            .add(vec![
                entry("a", "1", now),
                entry("a", "2", now),
                entry("b", "1", now),
            ])
            .await
            .unwrap();
        // The same entry again is the same entry.
        outbox.add(vec![entry("a", "1", now)]).await.unwrap();
        assert_eq!(outbox.count().await, Ok(3));

        // Taken entries are leased: not handed out again before the lease
        // ends, then handed out again.
        let later = crate::now_ms() + 5;
        let first = outbox.take(later, 2, lease).await.unwrap();
        assert_eq!(first.len(), 2);
        let rest = outbox.take(later, 10, lease).await.unwrap();
        assert_eq!(rest.len(), 1);
        assert!(outbox.take(later, 10, lease).await.unwrap().is_empty());
        let after_lease = later + lease.as_millis() as u64 + 1;
        let again = outbox.take(after_lease, 10, lease).await.unwrap();
        assert_eq!(
            names(&again),
            names(&[first.clone(), rest.clone()].concat())
        );

        // A failed post waits until it is due, with its failures counted.
        let mut failed = again[0].clone();
        failed.failures = 3;
        let due = after_lease + 60_000;
        outbox
            .retry(std::slice::from_ref(&failed), due)
            .await
            .unwrap();
        let mut done: Vec<String> = again[1..].iter().map(Entry::name).collect();
        outbox.done(&done).await.unwrap();
        assert_eq!(outbox.count().await, Ok(1));
        let far = after_lease + lease.as_millis() as u64 + 1;
        assert!(outbox
            .take(far.min(due - 1), 10, lease)
            .await
            .unwrap()
            .is_empty());
        let back = outbox.take(due, 10, lease).await.unwrap();
        assert_eq!(back, [failed.clone()]);

        // A retry of an entry done meanwhile does not bring it back.
        done = vec![failed.name()];
        outbox.done(&done).await.unwrap();
        outbox
            .retry(std::slice::from_ref(&failed), due)
            .await
            .unwrap();
        assert_eq!(outbox.count().await, Ok(0));
        assert!(outbox
            .take(u64::MAX / 2, 10, lease)
            .await
            .unwrap()
            .is_empty());
        outbox.done(&[]).await.unwrap();
    }

    #[tokio::test]
    async fn the_local_outbox_follows_the_rules() {
        suite(&LocalOutbox::in_memory()).await;
        let dir = tempfile::tempdir().unwrap();
        suite(&LocalOutbox::open(&dir.path().join("webhooks.jsonl")).unwrap()).await;
    }

    #[tokio::test]
    async fn the_local_outbox_keeps_what_was_not_posted_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("webhooks.jsonl");
        let now = crate::now_ms();
        {
            let outbox = LocalOutbox::open(&path).unwrap();
            let many: Vec<Entry> = (0..3000).map(|i| entry("a", &i.to_string(), now)).collect();
            outbox.add(many).await.unwrap();
            let taken = outbox
                .take(now, 2990, Duration::from_secs(60))
                .await
                .unwrap();
            let names: Vec<String> = taken.iter().map(Entry::name).collect();
            outbox.done(&names).await.unwrap();
            // Leased and failed entries are due at once after a restart.
            let left = outbox.take(now, 10, Duration::from_secs(60)).await.unwrap();
            assert_eq!(left.len(), 10);
            outbox.retry(&left[..1], now + 3_600_000).await.unwrap();
        }
        let lines = std::fs::read_to_string(&path).unwrap().lines().count();
        assert!(lines < 3000, "rewritten when mostly done: {lines} lines");
        let outbox = LocalOutbox::open(&path).unwrap();
        assert_eq!(outbox.count().await, Ok(10));
        assert_eq!(
            outbox
                .take(now, 100, Duration::from_secs(60))
                .await
                .unwrap()
                .len(),
            10
        );
    }

    #[tokio::test]
    async fn concurrent_adds_are_all_durable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("webhooks.jsonl");
        let outbox = Arc::new(LocalOutbox::open(&path).unwrap());
        let now = crate::now_ms();
        let adds: Vec<_> = (0..50)
            .map(|i| {
                let outbox = outbox.clone();
                tokio::spawn(
                    async move { outbox.add(vec![entry("a", &format!("{i}"), now)]).await },
                )
            })
            .collect();
        for add in adds {
            add.await.unwrap().unwrap();
        }
        drop(outbox);
        let outbox = LocalOutbox::open(&path).unwrap();
        assert_eq!(outbox.count().await, Ok(50));
    }

    #[tokio::test]
    async fn the_redis_outbox_follows_the_rules() {
        let server = RedisServer::start();
        let timeout = Duration::from_secs(2);
        let conn = crate::spool::redis::connect(&server.url(), false, timeout)
            .await
            .unwrap();
        let outbox = RedisOutbox::new(conn, timeout);
        suite(&outbox).await;
        // An entry that cannot be read is dropped, not handed out forever.
        let mut raw = redis::Client::open(server.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let _: () = redis::pipe()
            .cmd("HSET")
            .arg(ENTRIES_KEY)
            .arg("a/bad")
            .arg("{not json")
            .cmd("ZADD")
            .arg(DUE_KEY)
            .arg(0)
            .arg("a/bad")
            .query_async(&mut raw)
            .await
            .unwrap();
        assert!(outbox
            .take(crate::now_ms(), 10, Duration::from_secs(1))
            .await
            .unwrap()
            .is_empty());
        assert_eq!(outbox.count().await, Ok(0));
    }
}
