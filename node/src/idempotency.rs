//! `Idempotency-Key` on `POST /api/v1/send`: an application that sends
//! again after a lost answer queues the message once and gets the same
//! id back.
//!
//! A key is claimed before the message is built and queued; once queued,
//! the claim becomes the answer, kept for [`KEPT_FOR`]. A claim whose
//! request never finished (its node died) lapses after [`CLAIM_FOR`], so the
//! key is usable again. Each key is scoped to the application key that
//! sent it and remembers a fingerprint of the request: the same key with
//! another request is refused, not answered with someone else's message.
//!
//! On the Redis backend the keys are in Redis, for every node: a retry that
//! lands on another node finds the first answer. On the local backend they
//! are in this process, at most [`LOCAL_CAPACITY`]; the answers are also
//! written to a journal beside the spool (`idempotency.jsonl`, fsynced
//! before the send is answered, replayed at start), so a restart keeps
//! them. Claims are not written: one that dies with its process has lapsed
//! anyway.
//!
//! # Redis keys
//!
//! | key | value | expires |
//! | --- | --- | --- |
//! | `smarthost:idem:<key name>:<SHA-256 of the Idempotency-Key, hex>` | `p <fingerprint>` while claimed, then `d <fingerprint> <message id> <recipients>` | [`CLAIM_FOR`], then [`KEPT_FOR`] |

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::Script;
use serde::{Deserialize, Serialize};
use smarthost_coordinator::redis::Connection;

use crate::journal::Journal;

/// How long an answer is kept.
pub const KEPT_FOR: Duration = Duration::from_secs(24 * 3600);
/// How long a claim holds without an answer: longer than any send takes.
pub const CLAIM_FOR: Duration = Duration::from_secs(60);
/// Keys kept at most on the local backend; past it the oldest go first.
pub const LOCAL_CAPACITY: usize = 100_000;
/// The longest `Idempotency-Key` taken.
pub const MAX_KEY_LEN: usize = 255;

/// The answer a key stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub fingerprint: String,
    pub id: String,
    pub recipients: usize,
}

/// What claiming a key found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The key is this request's: send, then [`Idempotency::answer`] or
    /// [`Idempotency::release`].
    Claimed,
    /// A request with this key is under way.
    InProgress,
    /// A request with this key was answered.
    Answered(Answer),
}

/// Whether an `Idempotency-Key` header is one: 1 to [`MAX_KEY_LEN`]
/// printable ASCII characters.
pub fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(format!("must be 1 to {MAX_KEY_LEN} characters"));
    }
    if !key.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        return Err("must be printable ASCII".into());
    }
    Ok(())
}

/// The SHA-256 of `parts`, in hex: a request's fingerprint, and the name
/// of an `Idempotency-Key` in the store (bounded in length whatever the
/// client sent).
pub fn sha256_hex(parts: &[&[u8]]) -> String {
    let mut context = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for part in parts {
        // Lengths first, so that no two lists of parts hash alike.
        context.update(&(part.len() as u64).to_be_bytes());
        context.update(part);
    }
    context
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[async_trait]
pub trait Idempotency: Send + Sync + 'static {
    /// Claims `key` of application key `scope` for a request with
    /// `fingerprint`, or says who has it.
    async fn claim(&self, scope: &str, key: &str, fingerprint: &str) -> Result<Claim, String>;
    /// The claimed request was answered: keep the answer.
    async fn answer(&self, scope: &str, key: &str, answer: &Answer) -> Result<(), String>;
    /// The claimed request failed: the key is free again.
    async fn release(&self, scope: &str, key: &str) -> Result<(), String>;
}

/// What a stored value says.
fn parse(value: &str) -> Option<Claim> {
    let mut words = value.split(' ');
    match (words.next()?, words.next()?) {
        ("p", _) => Some(Claim::InProgress),
        ("d", fingerprint) => Some(Claim::Answered(Answer {
            fingerprint: fingerprint.to_string(),
            id: words.next()?.to_string(),
            recipients: words.next()?.parse().ok()?,
        })),
        _ => None,
    }
}

fn claimed(fingerprint: &str) -> String {
    format!("p {fingerprint}")
}

fn answered(answer: &Answer) -> String {
    format!(
        "d {} {} {}",
        answer.fingerprint, answer.id, answer.recipients
    )
}

/// The keys of this node (the local backend): in memory, the answers
/// also in a journal file.
pub struct LocalIdempotency {
    state: Arc<Mutex<LocalState>>,
    /// Written off the async threads; taken before `state` when both are.
    journal: Arc<Mutex<Journal>>,
}

/// One line of the journal: an answer, and when it was given.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    name: String,
    fingerprint: String,
    id: String,
    recipients: usize,
    /// Wall-clock ms since the epoch ([`crate::now_ms`]).
    at_ms: u64,
}

#[derive(Default)]
struct LocalState {
    values: HashMap<String, (String, Instant)>,
    /// Keys in the order they were last set, with that expiry: the
    /// expiries of one kind only grow, so the front goes first.
    order: VecDeque<(Instant, String)>,
}

impl LocalState {
    fn set(&mut self, name: String, value: String, now: Instant, ttl: Duration) {
        let expires = now + ttl;
        self.values.insert(name.clone(), (value, expires));
        self.order.push_back((expires, name));
        self.trim(now);
    }

    /// Forgets expired keys, and the oldest past the capacity.
    fn trim(&mut self, now: Instant) {
        while let Some((expires, name)) = self.order.front() {
            let current = self.values.get(name).map(|(_, e)| *e);
            let stale = current != Some(*expires);
            let over = self.values.len() > LOCAL_CAPACITY || self.order.len() > 2 * LOCAL_CAPACITY;
            if !(stale || *expires <= now || over) {
                break;
            }
            let (expires, name) = self.order.pop_front().expect("a front");
            if !stale && (expires <= now || over) {
                self.values.remove(&name);
            }
        }
    }

    /// Takes back an answer from the journal, unless it is older than
    /// [`KEPT_FOR`].
    fn replay(&mut self, record: Record, now: Instant, now_ms: u64) {
        let age = Duration::from_millis(now_ms.saturating_sub(record.at_ms));
        let Some(left) = KEPT_FOR.checked_sub(age).filter(|left| !left.is_zero()) else {
            return;
        };
        let answer = Answer {
            fingerprint: record.fingerprint,
            id: record.id,
            recipients: record.recipients,
        };
        self.set(record.name, answered(&answer), now, left);
    }

    /// The live answers, oldest first, as the journal keeps them.
    fn records(&self, now: Instant, now_ms: u64) -> Vec<Record> {
        self.order
            .iter()
            .filter(|(expires, _)| *expires > now)
            .filter_map(|(expires, name)| {
                let (value, current) = self.values.get(name)?;
                if current != expires {
                    // Set again since: the later entry stands.
                    return None;
                }
                let Some(Claim::Answered(answer)) = parse(value) else {
                    return None;
                };
                // Given KEPT_FOR before it expires.
                let left = (*expires - now).as_millis() as u64;
                Some(Record {
                    name: name.clone(),
                    fingerprint: answer.fingerprint,
                    id: answer.id,
                    recipients: answer.recipients,
                    at_ms: (now_ms + left).saturating_sub(KEPT_FOR.as_millis() as u64),
                })
            })
            .collect()
    }
}

impl LocalIdempotency {
    /// Opens (or starts) the journal at `path` and takes back the answers
    /// in it that are still kept, at most [`LOCAL_CAPACITY`] (the newest).
    pub fn open(path: &Path) -> Result<LocalIdempotency, String> {
        let fail = |e: std::io::Error| format!("{}: {e}", path.display());
        let (now, now_ms) = (Instant::now(), crate::now_ms());
        let mut state = LocalState::default();
        let mut journal =
            Journal::open(path, |record| state.replay(record, now, now_ms)).map_err(fail)?;
        if journal.mostly_dead(state.values.len()) {
            journal.rewrite(state.records(now, now_ms)).map_err(fail)?;
        }
        Ok(LocalIdempotency {
            state: Arc::new(Mutex::new(state)),
            journal: Arc::new(Mutex::new(journal)),
        })
    }
}

/// Writes `record` to the journal and fsyncs it, rewriting the journal
/// first when most of its lines are dead (expired, replaced, or past the
/// capacity).
fn journal_answer(
    journal: &Mutex<Journal>,
    state: &Mutex<LocalState>,
    record: Record,
) -> Result<(), String> {
    let mut journal = journal.lock().expect("not poisoned");
    let live = state.lock().expect("not poisoned").values.len();
    let written = if journal.mostly_dead(live) {
        // The answer being written is in `state` already.
        let records = state
            .lock()
            .expect("not poisoned")
            .records(Instant::now(), crate::now_ms());
        journal.rewrite(records)
    } else {
        journal.append(&[record])
    };
    written.map_err(|e| format!("{}: {e}", journal.path().display()))
}

fn name(scope: &str, key: &str) -> String {
    format!("{scope}:{}", sha256_hex(&[key.as_bytes()]))
}

#[async_trait]
impl Idempotency for LocalIdempotency {
    async fn claim(&self, scope: &str, key: &str, fingerprint: &str) -> Result<Claim, String> {
        let now = Instant::now();
        let name = name(scope, key);
        let mut state = self.state.lock().expect("not poisoned");
        state.trim(now);
        if let Some((value, expires)) = state.values.get(&name) {
            if *expires > now {
                return Ok(parse(value).unwrap_or(Claim::InProgress));
            }
        }
        state.set(name, claimed(fingerprint), now, CLAIM_FOR);
        Ok(Claim::Claimed)
    }

    async fn answer(&self, scope: &str, key: &str, answer: &Answer) -> Result<(), String> {
        let name = name(scope, key);
        let record = Record {
            name: name.clone(),
            fingerprint: answer.fingerprint.clone(),
            id: answer.id.clone(),
            recipients: answer.recipients,
            at_ms: crate::now_ms(),
        };
        self.state.lock().expect("not poisoned").set(
            name,
            answered(answer),
            Instant::now(),
            KEPT_FOR,
        );
        let (journal, state) = (self.journal.clone(), self.state.clone());
        tokio::task::spawn_blocking(move || journal_answer(&journal, &state, record))
            .await
            .map_err(|e| format!("idempotency journal: {e}"))?
    }

    async fn release(&self, scope: &str, key: &str) -> Result<(), String> {
        let mut state = self.state.lock().expect("not poisoned");
        state.values.remove(&name(scope, key));
        Ok(())
    }
}

/// KEYS[1] the key; ARGV: the claim, its TTL in ms. Returns the value
/// already there, or nothing when this claim was set.
const CLAIM: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return false
end
return redis.call('GET', KEYS[1])
";

/// The keys of the whole cluster, in Redis.
pub struct RedisIdempotency {
    conn: Connection,
    timeout: Duration,
    claim: Script,
}

impl RedisIdempotency {
    /// The store on `conn`, a connection the node's other shared stores
    /// use too.
    pub fn new(conn: Connection, timeout: Duration) -> RedisIdempotency {
        RedisIdempotency {
            conn,
            timeout,
            claim: Script::new(CLAIM),
        }
    }

    pub fn key(scope: &str, key: &str) -> String {
        format!("smarthost:idem:{}", name(scope, key))
    }

    async fn bounded<T>(
        &self,
        request: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, String> {
        crate::spool::redis::bounded(self.timeout, "idempotency key", request).await
    }
}

#[async_trait]
impl Idempotency for RedisIdempotency {
    async fn claim(&self, scope: &str, key: &str, fingerprint: &str) -> Result<Claim, String> {
        let mut conn = self.conn.clone();
        let found: Option<String> = self
            .bounded(
                self.claim
                    .key(RedisIdempotency::key(scope, key))
                    .arg(claimed(fingerprint))
                    .arg(CLAIM_FOR.as_millis() as u64)
                    .invoke_async(&mut conn),
            )
            .await?;
        Ok(match found {
            None => Claim::Claimed,
            // Gone between the SET and the GET: taken a moment ago.
            Some(value) => parse(&value).unwrap_or(Claim::InProgress),
        })
    }

    async fn answer(&self, scope: &str, key: &str, answer: &Answer) -> Result<(), String> {
        let mut conn = self.conn.clone();
        self.bounded(
            redis::cmd("SET")
                .arg(RedisIdempotency::key(scope, key))
                .arg(answered(answer))
                .arg("PX")
                .arg(KEPT_FOR.as_millis() as u64)
                .query_async::<()>(&mut conn),
        )
        .await
    }

    async fn release(&self, scope: &str, key: &str) -> Result<(), String> {
        let mut conn = self.conn.clone();
        self.bounded(
            redis::cmd("DEL")
                .arg(RedisIdempotency::key(scope, key))
                .query_async::<()>(&mut conn),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smarthost_testkit::redis::RedisServer;

    #[test]
    fn keys_are_printable_and_bounded() {
        assert!(check_key("order-42/retry").is_ok());
        assert!(check_key("").is_err());
        assert!(check_key(&"k".repeat(MAX_KEY_LEN + 1)).is_err());
        assert!(check_key("tab\there").is_err());
        assert!(check_key("ключ").is_err());
        assert_ne!(sha256_hex(&[b"ab", b"c"]), sha256_hex(&[b"a", b"bc"]));
        assert_eq!(sha256_hex(&[b"x"]).len(), 64);
    }

    #[test]
    fn values_read_back() {
        let answer = Answer {
            fingerprint: "f00".into(),
            id: "0123-abcd".into(),
            recipients: 3,
        };
        assert_eq!(parse(&answered(&answer)), Some(Claim::Answered(answer)));
        assert_eq!(parse(&claimed("f00")), Some(Claim::InProgress));
        assert_eq!(parse("x"), None);
    }

    async fn suite(store: &dyn Idempotency) {
        let answer = Answer {
            fingerprint: "f1".into(),
            id: "id-1".into(),
            recipients: 2,
        };
        assert_eq!(store.claim("shop", "k1", "f1").await, Ok(Claim::Claimed));
        assert_eq!(store.claim("shop", "k1", "f1").await, Ok(Claim::InProgress));
        // Another application's key of the same name is its own.
        assert_eq!(store.claim("news", "k1", "f1").await, Ok(Claim::Claimed));
        store.answer("shop", "k1", &answer).await.unwrap();
        assert_eq!(
            store.claim("shop", "k1", "f2").await,
            Ok(Claim::Answered(answer))
        );
        // A failed request frees its key.
        assert_eq!(store.claim("shop", "k2", "f1").await, Ok(Claim::Claimed));
        store.release("shop", "k2").await.unwrap();
        assert_eq!(store.claim("shop", "k2", "f1").await, Ok(Claim::Claimed));
    }

    #[tokio::test]
    async fn local_keys_follow_the_rules() {
        let dir = tempfile::tempdir().unwrap();
        suite(&LocalIdempotency::open(&dir.path().join("idempotency.jsonl")).unwrap()).await;
    }

    fn answer(id: &str) -> Answer {
        Answer {
            fingerprint: "f1".into(),
            id: id.into(),
            recipients: 1,
        }
    }

    fn lines(path: &Path) -> usize {
        std::fs::read_to_string(path).unwrap().lines().count()
    }

    #[tokio::test]
    async fn local_answers_outlive_a_restart_and_claims_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("idempotency.jsonl");
        let store = LocalIdempotency::open(&path).unwrap();
        assert_eq!(store.claim("shop", "k1", "f1").await, Ok(Claim::Claimed));
        store.answer("shop", "k1", &answer("id-1")).await.unwrap();
        assert_eq!(store.claim("shop", "k2", "f1").await, Ok(Claim::Claimed));
        drop(store);
        let store = LocalIdempotency::open(&path).unwrap();
        assert_eq!(
            store.claim("shop", "k1", "f1").await,
            Ok(Claim::Answered(answer("id-1")))
        );
        // The claim died with the process.
        assert_eq!(store.claim("shop", "k2", "f1").await, Ok(Claim::Claimed));
        assert_eq!(store.claim("news", "k1", "f1").await, Ok(Claim::Claimed));
    }

    #[tokio::test]
    async fn a_torn_last_line_is_dropped_and_what_follows_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("idempotency.jsonl");
        let store = LocalIdempotency::open(&path).unwrap();
        store.answer("shop", "k1", &answer("id-1")).await.unwrap();
        drop(store);
        // A crash mid-write.
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(&mut file, b"{\"name\":\"shop:ab").unwrap();
        let store = LocalIdempotency::open(&path).unwrap();
        store.answer("shop", "k2", &answer("id-2")).await.unwrap();
        drop(store);
        let store = LocalIdempotency::open(&path).unwrap();
        assert_eq!(
            store.claim("shop", "k1", "f1").await,
            Ok(Claim::Answered(answer("id-1")))
        );
        assert_eq!(
            store.claim("shop", "k2", "f1").await,
            Ok(Claim::Answered(answer("id-2")))
        );
        assert_eq!(lines(&path), 2);
    }

    /// A journal of answers to keys `k<i>` of `shop`, given at `at_ms(i)`.
    fn write_journal(path: &Path, count: usize, at_ms: impl Fn(usize) -> u64) {
        let mut text = String::new();
        for i in 0..count {
            let record = Record {
                name: name("shop", &format!("k{i}")),
                fingerprint: "f1".into(),
                id: format!("id-{i}"),
                recipients: 1,
                at_ms: at_ms(i),
            };
            text += &serde_json::to_string(&record).unwrap();
            text.push('\n');
        }
        std::fs::write(path, text).unwrap();
    }

    #[tokio::test]
    async fn answers_older_than_kept_for_are_dropped_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("idempotency.jsonl");
        let now_ms = crate::now_ms();
        let kept_ms = KEPT_FOR.as_millis() as u64;
        // 1500 answers past their time, then one an hour old.
        write_journal(&path, 1501, |i| {
            if i < 1500 {
                now_ms - kept_ms - 1000
            } else {
                now_ms - 3_600_000
            }
        });
        let store = LocalIdempotency::open(&path).unwrap();
        assert_eq!(store.claim("shop", "k0", "f1").await, Ok(Claim::Claimed));
        assert_eq!(
            store.claim("shop", "k1500", "f1").await,
            Ok(Claim::Answered(answer("id-1500")))
        );
        // Mostly dead: rewritten with the live answer, still an hour old.
        assert_eq!(lines(&path), 1);
        let record: Record =
            serde_json::from_str(std::fs::read_to_string(&path).unwrap().trim()).unwrap();
        let at = now_ms - 3_600_000;
        assert!(record.at_ms.abs_diff(at) < 5_000, "{}", record.at_ms);
    }

    #[tokio::test]
    async fn the_journal_is_rewritten_while_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("idempotency.jsonl");
        let store = LocalIdempotency::open(&path).unwrap();
        for _ in 0..1100 {
            store.answer("shop", "k1", &answer("id-1")).await.unwrap();
        }
        store.answer("shop", "k2", &answer("id-2")).await.unwrap();
        assert!(lines(&path) < 1002, "{} lines", lines(&path));
        drop(store);
        let store = LocalIdempotency::open(&path).unwrap();
        for (key, id) in [("k1", "id-1"), ("k2", "id-2")] {
            assert_eq!(
                store.claim("shop", key, "f1").await,
                Ok(Claim::Answered(answer(id)))
            );
        }
    }

    #[tokio::test]
    async fn the_newest_answers_are_taken_back_up_to_the_capacity() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("idempotency.jsonl");
        let now_ms = crate::now_ms();
        write_journal(&path, LOCAL_CAPACITY + 10, |i| now_ms - 200_000 + i as u64);
        let store = LocalIdempotency::open(&path).unwrap();
        assert_eq!(store.state.lock().unwrap().values.len(), LOCAL_CAPACITY);
        let last = LOCAL_CAPACITY + 9;
        assert_eq!(
            store.claim("shop", &format!("k{last}"), "f1").await,
            Ok(Claim::Answered(answer(&format!("id-{last}"))))
        );
        assert_eq!(
            store.claim("shop", "k10", "f1").await,
            Ok(Claim::Answered(answer("id-10")))
        );
        // The ten oldest are forgotten.
        assert_eq!(store.claim("shop", "k9", "f1").await, Ok(Claim::Claimed));
    }

    #[test]
    fn local_keys_are_bounded_and_expire() {
        let mut state = LocalState::default();
        let t0 = Instant::now();
        for i in 0..LOCAL_CAPACITY + 10 {
            state.set(format!("k{i}"), "p f".into(), t0, CLAIM_FOR);
        }
        assert_eq!(state.values.len(), LOCAL_CAPACITY);
        assert!(!state.values.contains_key("k0"));
        assert!(state
            .values
            .contains_key(&format!("k{}", LOCAL_CAPACITY + 9)));
        // An answer set after its claim outlives the claim's expiry.
        state.set("k9".into(), "d f id 1".into(), t0, KEPT_FOR);
        state.trim(t0 + CLAIM_FOR);
        assert_eq!(state.values.len(), 1);
        assert!(state.values.contains_key("k9"));
        state.trim(t0 + KEPT_FOR);
        assert!(state.values.is_empty() && state.order.is_empty());
    }

    #[tokio::test]
    async fn redis_keys_follow_the_rules_and_expire() {
        let server = RedisServer::start();
        let timeout = Duration::from_secs(2);
        let conn = crate::spool::redis::connect(&server.url(), false, timeout)
            .await
            .unwrap();
        let store = RedisIdempotency::new(conn, timeout);
        suite(&store).await;
        let mut conn = store.conn.clone();
        let ttl = |key: String| {
            let mut conn = conn.clone();
            async move {
                redis::cmd("PTTL")
                    .arg(key)
                    .query_async::<i64>(&mut conn)
                    .await
                    .unwrap()
            }
        };
        let claim_ttl = ttl(RedisIdempotency::key("news", "k1")).await;
        assert!(claim_ttl > 50_000 && claim_ttl <= 60_000, "{claim_ttl}");
        let answer_ttl = ttl(RedisIdempotency::key("shop", "k1")).await;
        assert!(answer_ttl > 86_000_000, "{answer_ttl}");
        let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    }
}
