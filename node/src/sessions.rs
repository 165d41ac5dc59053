//! The live SMTP sessions of this node, for `GET /api/v1/sessions` and
//! `smarthost sessions`: what the IIS manager showed as "current
//! sessions". Each session registers when its greeting goes out, updates
//! its entry as it goes (HELO, login, TLS, messages) and leaves when it
//! ends; the registry holds one small entry per live session, so it is
//! bounded by `smtp.max_connections`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

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
            connected_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            messages: 0,
        };
        let mut registry = self.lock();
        registry.next += 1;
        let id = registry.next;
        registry.live.insert(id, view);
        Tracked {
            sessions: self.clone(),
            id,
        }
    }

    /// The live sessions, the longest connected first.
    pub fn snapshot(&self) -> Vec<SessionView> {
        let mut views: Vec<SessionView> = self.lock().live.values().cloned().collect();
        views.sort_by(|a, b| (a.connected_ms, &a.client).cmp(&(b.connected_ms, &b.client)));
        views
    }

    pub fn len(&self) -> usize {
        self.lock().live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
        if let Some(view) = registry.live.get_mut(&self.id) {
            if view.helo.as_deref() != helo {
                view.helo = helo.map(str::to_string);
            }
            if view.user.as_deref() != user {
                view.user = user.map(str::to_string);
            }
            view.tls = tls;
        }
    }

    /// One more message accepted.
    pub fn message_accepted(&self) {
        if let Some(view) = self.sessions.lock().live.get_mut(&self.id) {
            view.messages += 1;
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.sessions.lock().live.remove(&self.id);
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
        assert_eq!(sessions.len(), 1);
        drop(second);
        assert!(sessions.is_empty());
    }
}
