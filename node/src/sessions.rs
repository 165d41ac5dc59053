//! The live SMTP sessions of this node, for `GET /api/v1/sessions` and
//! `smarthost sessions`: what the IIS manager showed as "current
//! sessions". Each session registers when its greeting goes out, updates
//! its entry as it goes (HELO, login, TLS, messages) and leaves when it
//! ends; the registry holds one small entry per live session, so it is
//! bounded by `smtp.max_connections`.
//!
//! On the Redis backend each node also publishes its sessions on a board
//! ([`Board`]): one key per node, `smarthost:{sessions}:<node id>`, the
//! JSON list, written again when it changed and kept alive otherwise, with
//! a TTL so that a node that died drops off. A node answers for the
//! cluster by reading the keys of the live nodes (`MGET`, one slot).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use smarthost_coordinator::redis::Connection;

/// One live session, as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionView {
    /// The node the client is connected to (`node.id`).
    pub node: String,
    /// The client's address and port.
    pub client: String,
    /// The relay's address and port the client connected to.
    pub server: String,
    /// The name of the client's last HELO or EHLO; `null` before it.
    pub helo: Option<String>,
    /// The user that logged in; `null` without a login.
    pub user: Option<String>,
    pub tls: bool,
    /// When the client connected (Unix ms).
    pub connected_ms: u64,
    /// Messages accepted in this session.
    pub messages: u64,
}

/// The registry; cheap to clone, shared by the listener's sessions and
/// the admin server.
#[derive(Clone)]
pub struct Sessions {
    /// This node's `node.id`, shown with each session.
    node: Arc<str>,
    inner: Arc<Mutex<Registry>>,
}

#[derive(Default)]
struct Registry {
    next: u64,
    live: HashMap<u64, SessionView>,
    /// Bumped at every change, so that a publisher sees whether to write.
    version: u64,
}

impl Sessions {
    pub fn new(node: &str) -> Sessions {
        Sessions {
            node: node.into(),
            inner: Arc::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers a session; it leaves when the returned entry is dropped.
    pub fn open(&self, client: SocketAddr, server: SocketAddr) -> Tracked {
        let view = SessionView {
            node: self.node.to_string(),
            client: client.to_string(),
            server: server.to_string(),
            helo: None,
            user: None,
            tls: false,
            connected_ms: crate::now_ms(),
            messages: 0,
        };
        let mut registry = self.lock();
        registry.next += 1;
        registry.version += 1;
        let id = registry.next;
        registry.live.insert(id, view);
        Tracked {
            sessions: self.clone(),
            id,
        }
    }

    /// The live sessions, the longest connected first.
    pub fn snapshot(&self) -> Vec<SessionView> {
        self.versioned().1
    }

    /// The live sessions and the version they are at.
    fn versioned(&self) -> (u64, Vec<SessionView>) {
        let registry = self.lock();
        let mut views: Vec<SessionView> = registry.live.values().cloned().collect();
        sort(&mut views);
        (registry.version, views)
    }

    pub fn node(&self) -> &str {
        &self.node
    }
}

/// A session's entry in the registry, for as long as the session lives.
pub struct Tracked {
    sessions: Sessions,
    id: u64,
}

impl Tracked {
    /// Sets what the session shows now.
    pub fn show(&self, helo: Option<&str>, user: Option<&str>, tls: bool) {
        let mut registry = self.sessions.lock();
        let Some(view) = registry.live.get_mut(&self.id) else {
            return;
        };
        if view.helo.as_deref() == helo && view.user.as_deref() == user && view.tls == tls {
            return;
        }
        view.helo = helo.map(str::to_string);
        view.user = user.map(str::to_string);
        view.tls = tls;
        registry.version += 1;
    }

    /// One more message accepted.
    pub fn message_accepted(&self) {
        let mut registry = self.sessions.lock();
        if let Some(view) = registry.live.get_mut(&self.id) {
            view.messages += 1;
            registry.version += 1;
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        let mut registry = self.sessions.lock();
        registry.live.remove(&self.id);
        registry.version += 1;
    }
}

/// The longest connected first.
pub fn sort(views: &mut [SessionView]) {
    views.sort_by(|a, b| {
        (a.connected_ms, &a.node, &a.client).cmp(&(b.connected_ms, &b.node, &b.client))
    });
}

/// How often a node publishes its sessions (when they changed) or keeps
/// its key alive.
pub const PUBLISH_EVERY: Duration = Duration::from_secs(2);
/// How long a node's key outlives its last write: a node that stopped
/// drops off within it.
pub const BOARD_TTL: Duration = Duration::from_secs(10);

/// The key of `node`'s sessions on the board.
pub fn board_key(node: &str) -> String {
    format!("smarthost:{{sessions}}:{node}")
}

/// The sessions of every node, on Redis.
#[derive(Clone)]
pub struct Board {
    conn: Connection,
}

impl Board {
    /// Connects to the server at `url` (a Redis Cluster with `cluster`).
    pub async fn open(url: &str, cluster: bool, timeout: Duration) -> Result<Board, String> {
        let conn = crate::spool::redis::connect(url, cluster, timeout).await?;
        Ok(Board { conn })
    }

    /// Publishes `sessions` every [`PUBLISH_EVERY`] until the process
    /// ends: the list when it changed, else only the key's TTL. A failure
    /// is logged once and tried again at the next turn.
    pub async fn publish(self, sessions: Sessions) {
        let key = board_key(sessions.node());
        let ttl = BOARD_TTL.as_millis() as u64;
        let mut written: Option<u64> = None;
        let mut failing = false;
        let mut every = tokio::time::interval(PUBLISH_EVERY);
        loop {
            every.tick().await;
            let (version, views) = sessions.versioned();
            let mut conn = self.conn.clone();
            let result: redis::RedisResult<()> = if written == Some(version) {
                conn.pexpire(&key, ttl as i64).await
            } else {
                let json = serde_json::to_string(&views).expect("plain data");
                conn.pset_ex(&key, json, ttl).await
            };
            match result {
                Ok(()) => {
                    written = Some(version);
                    failing = false;
                }
                Err(error) => {
                    written = None;
                    if !failing {
                        tracing::warn!(%error, "cannot publish this node's SMTP sessions");
                    }
                    failing = true;
                }
            }
        }
    }

    /// The published sessions of `nodes`, the longest connected first; a
    /// node without a key (stopped, or not yet published) shows none.
    pub async fn read(&self, nodes: &[String]) -> Result<Vec<SessionView>, String> {
        if nodes.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = nodes.iter().map(|n| board_key(n)).collect();
        let mut conn = self.conn.clone();
        let lists: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut conn)
            .await
            .map_err(|e| format!("redis sessions: {e}"))?;
        let mut views = Vec::new();
        for (node, list) in nodes.iter().zip(lists) {
            let Some(list) = list else { continue };
            match serde_json::from_str::<Vec<SessionView>>(&list) {
                Ok(list) => views.extend(list),
                Err(error) => tracing::warn!(%node, %error, "unreadable sessions on the board"),
            }
        }
        sort(&mut views);
        Ok(views)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn a_session_shows_what_it_did_and_leaves_when_it_ends() {
        let sessions = Sessions::new("node-a");
        let first = sessions.open(addr("10.0.0.5:40000"), addr("10.0.0.1:25"));
        let second = sessions.open(addr("10.0.0.6:40001"), addr("10.0.0.1:25"));
        first.show(Some("app.example"), None, true);
        first.show(Some("app.example"), Some("app"), true);
        first.message_accepted();
        first.message_accepted();
        let views = sessions.snapshot();
        assert_eq!(views.len(), 2);
        let shown = views.iter().find(|v| v.client == "10.0.0.5:40000").unwrap();
        assert_eq!(shown.helo.as_deref(), Some("app.example"));
        assert_eq!(shown.user.as_deref(), Some("app"));
        assert!(shown.tls);
        assert_eq!(shown.messages, 2);
        assert_eq!(shown.server, "10.0.0.1:25");
        assert_eq!(shown.node, "node-a");
        let quiet = views.iter().find(|v| v.client == "10.0.0.6:40001").unwrap();
        assert_eq!((quiet.helo.as_deref(), quiet.messages), (None, 0));

        drop(first);
        assert_eq!(sessions.snapshot().len(), 1);
        drop(second);
        assert!(sessions.snapshot().is_empty());
    }
}
