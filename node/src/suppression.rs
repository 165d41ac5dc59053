//! The suppression list: addresses mail is no longer sent to, because
//! they bounced hard (a `5.1.x` reply: no such mailbox, no such domain) or
//! an operator put them there. Globally, or for one account (an
//! application key or SMTP user, by name): a message is held to the global
//! list and to its sender's account's.
//!
//! A send through the API leaves suppressed recipients out at once and
//! says so; mail that came over SMTP was already accepted, so its
//! suppressed recipients fail at delivery, without a connection, and are
//! bounced like any failure (`550 5.1.1 ... suppressed`).
//!
//! Addresses compare without regard to case ([`address_key`]).
//!
//! [`LocalSuppressions`] keeps the list in memory and in a journal file
//! beside the spool (`suppressions.jsonl`, replayed at start, rewritten
//! when mostly dead), [`RedisSuppressions`] in Redis, for every node.
//!
//! # Redis keys
//!
//! | key | type | value |
//! | --- | --- | --- |
//! | `smarthost:{sup:<scope>}:addresses` | sorted set | the addresses, score 0: listed in order, a page at a time (`ZRANGE BYLEX`) |
//! | `smarthost:{sup:<scope>}:entries` | hash | address → the entry as JSON (reason, source, time) |
//!
//! `<scope>` is `global` or `a:<account>`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use smarthost_coordinator::redis::Connection;
use smarthost_proto::address::{parse_reverse_path, Mailbox};

use crate::journal::Journal;

/// Entries a listing returns at most.
pub const MAX_PAGE: usize = 1000;

/// Whose list: everyone's, or one account's.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    Global,
    Account(String),
}

impl Scope {
    /// `None` or empty: the global list.
    pub fn of(account: Option<&str>) -> Scope {
        match account {
            None | Some("") => Scope::Global,
            Some(name) => Scope::Account(name.to_string()),
        }
    }

    fn tag(&self) -> String {
        match self {
            Scope::Global => "global".into(),
            Scope::Account(name) => format!("a:{name}"),
        }
    }

    pub fn account(&self) -> Option<&str> {
        match self {
            Scope::Global => None,
            Scope::Account(name) => Some(name),
        }
    }
}

/// How an address came to be suppressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// It bounced hard.
    Bounce,
    /// An operator added it.
    Api,
}

/// One suppressed address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// As [`address_key`] makes it.
    pub address: String,
    pub reason: String,
    pub source: Source,
    /// When, in ms since the epoch.
    pub at_ms: u64,
}

/// The form an address is kept and looked up in: the local part lower
/// case (almost every mailbox ignores case), the domain in routing form.
/// The failure of a suppressed recipient (by its [`address_key`]): the
/// bounce's text, and how a webhook event knows it.
pub fn refusal(address_key: &str) -> String {
    format!("550 5.1.1 <{address_key}>: recipient is on the suppression list")
}

pub fn address_key(mailbox: &Mailbox) -> String {
    format!(
        "{}@{}",
        mailbox.local_part.to_lowercase(),
        mailbox.domain.to_ascii_lowercase()
    )
}

/// An address as an operator wrote it, checked as SMTP checks it.
pub fn parse_address(text: &str) -> Result<String, String> {
    let text = text.trim();
    if text.is_empty() || text.contains(['<', '>']) {
        return Err(format!("not an address: {text:?}"));
    }
    match parse_reverse_path(&format!("<{text}>")) {
        Ok(Some(path)) => Ok(address_key(&path.mailbox)),
        Ok(None) => Err("an address is required".into()),
        Err(e) => Err(format!("{e}: {text:?}")),
    }
}

/// Whether a permanent reply says the mailbox or its domain does not
/// exist (`5.1.x`, RFC 3463 "addressing status"): the address is added to
/// the list. Other permanent failures (policy, content) say nothing about
/// the address.
pub fn is_hard_bounce(reply: &str) -> bool {
    reply
        .split_whitespace()
        .nth(1)
        .is_some_and(|status| status.starts_with("5.1."))
}

#[async_trait]
pub trait Suppressions: Send + Sync + 'static {
    /// Which of `addresses` (in [`address_key`] form) are suppressed for
    /// mail of `account`: on its list or on the global one.
    async fn find(&self, account: Option<&str>, addresses: &[String]) -> Result<Vec<bool>, String>;
    /// Adds or replaces entries; answers how many were not there before.
    async fn add(&self, scope: &Scope, entries: Vec<Entry>) -> Result<usize, String>;
    /// Takes an address off; `false` when it was not on.
    async fn remove(&self, scope: &Scope, address: &str) -> Result<bool, String>;
    /// Up to `limit` entries after `after`, in address order, and whether
    /// more follow.
    async fn list(
        &self,
        scope: &Scope,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Entry>, bool), String>;
}

/// One line of the local journal.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Record {
    Add {
        scope: Option<String>,
        entry: Entry,
    },
    Remove {
        scope: Option<String>,
        address: String,
    },
}

/// The list of this node (the local backend), kept in a journal file.
pub struct LocalSuppressions {
    state: Mutex<LocalState>,
}

struct LocalState {
    entries: BTreeMap<(Scope, String), Entry>,
    journal: Journal,
}

impl LocalSuppressions {
    /// Opens (or starts) the journal at `path` and replays it.
    pub fn open(path: &Path) -> Result<LocalSuppressions, String> {
        let fail = |e: std::io::Error| format!("{}: {e}", path.display());
        let mut entries = BTreeMap::new();
        let journal = Journal::open(path, |record| match record {
            Record::Add { scope, entry } => {
                entries.insert((Scope::of(scope.as_deref()), entry.address.clone()), entry);
            }
            Record::Remove { scope, address } => {
                entries.remove(&(Scope::of(scope.as_deref()), address));
            }
        })
        .map_err(fail)?;
        let mut state = LocalState { entries, journal };
        state.compact_if_mostly_dead()?;
        Ok(LocalSuppressions {
            state: Mutex::new(state),
        })
    }
}

impl LocalState {
    fn write(&mut self, records: &[Record]) -> Result<(), String> {
        self.journal
            .append(records)
            .map_err(|e| format!("{}: {e}", self.journal.path().display()))
    }

    /// Rewrites the journal with the live entries only.
    fn compact_if_mostly_dead(&mut self) -> Result<(), String> {
        if !self.journal.mostly_dead(self.entries.len()) {
            return Ok(());
        }
        let records = self.entries.iter().map(|((scope, _), entry)| Record::Add {
            scope: scope.account().map(str::to_string),
            entry: entry.clone(),
        });
        self.journal
            .rewrite(records)
            .map_err(|e| format!("{}: {e}", self.journal.path().display()))
    }
}

#[async_trait]
impl Suppressions for LocalSuppressions {
    async fn find(&self, account: Option<&str>, addresses: &[String]) -> Result<Vec<bool>, String> {
        let state = self.state.lock().expect("not poisoned");
        let account = Scope::of(account);
        Ok(addresses
            .iter()
            .map(|address| {
                state
                    .entries
                    .contains_key(&(Scope::Global, address.clone()))
                    || (account != Scope::Global
                        && state
                            .entries
                            .contains_key(&(account.clone(), address.clone())))
            })
            .collect())
    }

    async fn add(&self, scope: &Scope, entries: Vec<Entry>) -> Result<usize, String> {
        let mut state = self.state.lock().expect("not poisoned");
        let records: Vec<Record> = entries
            .iter()
            .map(|entry| Record::Add {
                scope: scope.account().map(str::to_string),
                entry: entry.clone(),
            })
            .collect();
        state.write(&records)?;
        let mut added = 0;
        for entry in entries {
            let key = (scope.clone(), entry.address.clone());
            if state.entries.insert(key, entry).is_none() {
                added += 1;
            }
        }
        state.compact_if_mostly_dead()?;
        Ok(added)
    }

    async fn remove(&self, scope: &Scope, address: &str) -> Result<bool, String> {
        let mut state = self.state.lock().expect("not poisoned");
        let key = (scope.clone(), address.to_string());
        if !state.entries.contains_key(&key) {
            return Ok(false);
        }
        let record = Record::Remove {
            scope: scope.account().map(str::to_string),
            address: address.to_string(),
        };
        state.write(&[record])?;
        state.entries.remove(&key);
        state.compact_if_mostly_dead()?;
        Ok(true)
    }

    async fn list(
        &self,
        scope: &Scope,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Entry>, bool), String> {
        use std::ops::Bound;
        let state = self.state.lock().expect("not poisoned");
        let from = match after {
            Some(after) => Bound::Excluded((scope.clone(), after.to_string())),
            None => Bound::Included((scope.clone(), String::new())),
        };
        let mut page: Vec<Entry> = state
            .entries
            .range((from, Bound::Unbounded))
            .take_while(|((s, _), _)| s == scope)
            .take(limit + 1)
            .map(|(_, entry)| entry.clone())
            .collect();
        let more = page.len() > limit;
        page.truncate(limit);
        Ok((page, more))
    }
}

/// The list of the whole cluster, in Redis.
pub struct RedisSuppressions {
    conn: Connection,
    timeout: Duration,
}

impl RedisSuppressions {
    /// The store on `conn`, a connection the node's other shared stores
    /// use too.
    pub fn new(conn: Connection, timeout: Duration) -> RedisSuppressions {
        RedisSuppressions { conn, timeout }
    }

    fn addresses_key(scope: &Scope) -> String {
        format!("smarthost:{{sup:{}}}:addresses", scope.tag())
    }

    fn entries_key(scope: &Scope) -> String {
        format!("smarthost:{{sup:{}}}:entries", scope.tag())
    }

    async fn bounded<T>(
        &self,
        request: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, String> {
        crate::spool::redis::bounded(self.timeout, "suppression list", request).await
    }
}

/// Entries written to Redis per round trip by [`RedisSuppressions::add`].
const ADD_BATCH: usize = 1000;

#[async_trait]
impl Suppressions for RedisSuppressions {
    async fn find(&self, account: Option<&str>, addresses: &[String]) -> Result<Vec<bool>, String> {
        if addresses.is_empty() {
            return Ok(Vec::new());
        }
        let mut scopes = vec![Scope::Global];
        if let Some(account) = account.filter(|a| !a.is_empty()) {
            scopes.push(Scope::Account(account.to_string()));
        }
        let mut pipe = redis::pipe();
        for scope in &scopes {
            pipe.cmd("HMGET")
                .arg(RedisSuppressions::entries_key(scope))
                .arg(addresses);
        }
        let mut conn = self.conn.clone();
        let found: Vec<Vec<Option<String>>> = self.bounded(pipe.query_async(&mut conn)).await?;
        Ok((0..addresses.len())
            .map(|i| {
                found
                    .iter()
                    .any(|scope| scope.get(i).is_some_and(Option::is_some))
            })
            .collect())
    }

    async fn add(&self, scope: &Scope, entries: Vec<Entry>) -> Result<usize, String> {
        let mut added = 0;
        for batch in entries.chunks(ADD_BATCH) {
            let mut pipe = redis::pipe();
            pipe.atomic();
            let mut zadd = redis::cmd("ZADD");
            zadd.arg(RedisSuppressions::addresses_key(scope));
            let mut hset = redis::cmd("HSET");
            hset.arg(RedisSuppressions::entries_key(scope));
            for entry in batch {
                zadd.arg(0).arg(&entry.address);
                let json = serde_json::to_string(entry).map_err(|e| e.to_string())?;
                hset.arg(&entry.address).arg(json);
            }
            pipe.add_command(zadd).add_command(hset).ignore();
            let mut conn = self.conn.clone();
            let (new,): (usize,) = self.bounded(pipe.query_async(&mut conn)).await?;
            added += new;
        }
        Ok(added)
    }

    async fn remove(&self, scope: &Scope, address: &str) -> Result<bool, String> {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("ZREM")
            .arg(RedisSuppressions::addresses_key(scope))
            .arg(address)
            .cmd("HDEL")
            .arg(RedisSuppressions::entries_key(scope))
            .arg(address)
            .ignore();
        let mut conn = self.conn.clone();
        let (removed,): (usize,) = self.bounded(pipe.query_async(&mut conn)).await?;
        Ok(removed > 0)
    }

    async fn list(
        &self,
        scope: &Scope,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Entry>, bool), String> {
        let from = match after {
            Some(after) => format!("({after}"),
            None => "-".into(),
        };
        let mut conn = self.conn.clone();
        let mut addresses: Vec<String> = self
            .bounded(
                redis::cmd("ZRANGE")
                    .arg(RedisSuppressions::addresses_key(scope))
                    .arg(from)
                    .arg("+")
                    .arg("BYLEX")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(limit + 1)
                    .query_async(&mut conn),
            )
            .await?;
        let more = addresses.len() > limit;
        addresses.truncate(limit);
        if addresses.is_empty() {
            return Ok((Vec::new(), false));
        }
        let values: Vec<Option<String>> = self
            .bounded(
                redis::cmd("HMGET")
                    .arg(RedisSuppressions::entries_key(scope))
                    .arg(&addresses)
                    .query_async(&mut conn),
            )
            .await?;
        let entries = values
            .into_iter()
            .flatten()
            .filter_map(|json| serde_json::from_str(&json).ok())
            .collect();
        Ok((entries, more))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smarthost_testkit::redis::RedisServer;
    use std::io::Write;

    fn entry(address: &str) -> Entry {
        Entry {
            address: address.into(),
            reason: "550 5.1.1 no such user".into(),
            source: Source::Bounce,
            at_ms: 1,
        }
    }

    #[test]
    fn addresses_compare_without_case_and_hard_bounces_are_5_1() {
        assert_eq!(
            parse_address(" Bob@Example.ORG ").unwrap(),
            "bob@example.org"
        );
        assert!(parse_address("bob@").is_err());
        assert!(parse_address("<bob@example.org>").is_err());
        assert!(parse_address("").is_err());
        assert!(is_hard_bounce("550 5.1.1 <a@b>: no such user"));
        assert!(is_hard_bounce("550 5.1.10 null MX"));
        assert!(!is_hard_bounce("550 5.7.1 relaying denied"));
        assert!(!is_hard_bounce("450 4.1.1 try later"));
        assert!(!is_hard_bounce("550 no such user"));
    }

    async fn suite(list: &dyn Suppressions) {
        let shop = Scope::Account("shop".into());
        assert_eq!(
            list.add(&Scope::Global, vec![entry("a@x.example")]).await,
            Ok(1)
        );
        assert_eq!(
            list.add(&shop, vec![entry("b@x.example"), entry("c@x.example")])
                .await,
            Ok(2)
        );
        assert_eq!(list.add(&shop, vec![entry("b@x.example")]).await, Ok(0));
        let asked = ["a@x.example", "b@x.example", "d@x.example"].map(String::from);
        // The global list holds for everyone, an account's for its mail.
        assert_eq!(list.find(None, &asked).await, Ok(vec![true, false, false]));
        assert_eq!(
            list.find(Some("shop"), &asked).await,
            Ok(vec![true, true, false])
        );
        assert_eq!(
            list.find(Some("news"), &asked).await,
            Ok(vec![true, false, false])
        );
        // Pages in address order.
        let (page, more) = list.list(&shop, None, 1).await.unwrap();
        assert_eq!((page[0].address.as_str(), more), ("b@x.example", true));
        let (page, more) = list.list(&shop, Some("b@x.example"), 10).await.unwrap();
        assert_eq!(
            (page.len(), page[0].address.as_str(), more),
            (1, "c@x.example", false)
        );
        assert_eq!(
            list.list(&Scope::Global, None, 10).await.unwrap().0.len(),
            1
        );
        assert_eq!(list.remove(&shop, "b@x.example").await, Ok(true));
        assert_eq!(list.remove(&shop, "b@x.example").await, Ok(false));
        assert_eq!(
            list.find(Some("shop"), &asked).await,
            Ok(vec![true, false, false])
        );
    }

    #[tokio::test]
    async fn the_local_list_follows_the_rules_and_outlives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("suppressions.jsonl");
        suite(&LocalSuppressions::open(&path).unwrap()).await;
        // A torn last line, as a crash mid-write leaves it.
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        file.write_all(b"{\"op\":\"add\",\"sco").unwrap();
        let list = LocalSuppressions::open(&path).unwrap();
        let asked = ["a@x.example", "c@x.example", "b@x.example"].map(String::from);
        assert_eq!(
            list.find(Some("shop"), &asked).await,
            Ok(vec![true, true, false])
        );
        // What is added after it is not lost with it.
        list.add(&Scope::Global, vec![entry("b@x.example")])
            .await
            .unwrap();
        let list = LocalSuppressions::open(&path).unwrap();
        assert_eq!(
            list.find(Some("shop"), &asked).await,
            Ok(vec![true, true, true])
        );
    }

    #[tokio::test]
    async fn the_local_journal_is_rewritten_when_mostly_dead() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("suppressions.jsonl");
        let list = LocalSuppressions::open(&path).unwrap();
        for _ in 0..600 {
            list.add(&Scope::Global, vec![entry("a@x.example")])
                .await
                .unwrap();
            list.remove(&Scope::Global, "a@x.example").await.unwrap();
        }
        list.add(&Scope::Global, vec![entry("kept@x.example")])
            .await
            .unwrap();
        let lines = std::fs::read_to_string(&path).unwrap().lines().count();
        assert!(lines < 1002, "{lines} lines");
        let list = LocalSuppressions::open(&path).unwrap();
        assert_eq!(
            list.find(None, &["kept@x.example".into(), "a@x.example".into()])
                .await,
            Ok(vec![true, false])
        );
    }

    #[tokio::test]
    async fn the_redis_list_follows_the_rules() {
        let server = RedisServer::start();
        let timeout = Duration::from_secs(2);
        let conn = crate::spool::redis::connect(&server.url(), false, timeout)
            .await
            .unwrap();
        let list = RedisSuppressions::new(conn, timeout);
        suite(&list).await;
        // Large imports go in batches.
        let many: Vec<Entry> = (0..2500)
            .map(|i| entry(&format!("u{i}@y.example")))
            .collect();
        assert_eq!(list.add(&Scope::Global, many).await, Ok(2500));
        let (page, more) = list.list(&Scope::Global, None, MAX_PAGE).await.unwrap();
        assert_eq!((page.len(), more), (MAX_PAGE, true));
    }
}
