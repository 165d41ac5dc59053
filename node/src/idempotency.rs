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
//! are in this process, at most [`LOCAL_CAPACITY`], and a restart forgets
//! them.
//!
//! # Redis keys
//!
//! | key | value | expires |
//! | --- | --- | --- |
//! | `smarthost:idem:<key name>:<SHA-256 of the Idempotency-Key, hex>` | `p <fingerprint>` while claimed, then `d <fingerprint> <message id> <recipients>` | [`CLAIM_FOR`], then [`KEPT_FOR`] |

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::Script;
use smarthost_coordinator::redis::Connection;

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

/// The keys of this process (the local backend).
#[derive(Default)]
pub struct LocalIdempotency {
    state: Mutex<LocalState>,
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
        let mut state = self.state.lock().expect("not poisoned");
        state.set(name(scope, key), answered(answer), Instant::now(), KEPT_FOR);
        Ok(())
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
        suite(&LocalIdempotency::default()).await;
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
