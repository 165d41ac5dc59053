//! The coordinator's connection to Redis: a [`ConnectionManager`] that
//! reconnects by itself, with a deadline on every request.
//!
//! Every Redis error, a refused or lost connection and a reply that does not
//! come within the response timeout are [`CoordError::Unavailable`]; nothing
//! here panics or waits without bound. Scripts are sent as `EVALSHA`; after
//! a Redis restart empties the script cache the first call of each script
//! also loads it (`SCRIPT LOAD`, then `EVALSHA` again).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, FromRedisValue, Pipeline, ScriptInvocation};

use crate::CoordError;

/// How the coordinator talks to Redis.
#[derive(Clone, Debug)]
pub struct RedisOptions {
    /// The longest wait for a connection or for the reply to one request
    /// (reconnecting included) before it is `Unavailable`.
    pub response_timeout: Duration,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            response_timeout: Duration::from_secs(5),
        }
    }
}

/// A shared handle on one Redis server; clones share the connection and
/// the request counter.
#[derive(Clone)]
pub struct Redis {
    conn: ConnectionManager,
    timeout: Duration,
    requests: Arc<AtomicU64>,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis")
            .field("timeout", &self.timeout)
            .field("requests", &self.requests())
            .finish()
    }
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

fn manager_config(timeout: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_response_timeout(Some(timeout))
        .set_connection_timeout(Some(timeout))
        // A few quick reconnect tries, so that a request to a server that
        // refuses connections fails at once; the next request starts a new
        // reconnect.
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(1))
}

impl Redis {
    /// Connects now: fails if the server cannot be reached within the
    /// response timeout.
    pub async fn connect(url: &str, options: RedisOptions) -> Result<Redis, CoordError> {
        let shown = redact(url);
        let timeout = options.response_timeout;
        let client = redis::Client::open(url)
            .map_err(|e| CoordError::Unavailable(format!("redis url {shown}: {e}")))?;
        let conn = tokio::time::timeout(
            timeout,
            client.get_connection_manager_with_config(manager_config(timeout)),
        )
        .await
        .map_err(|_| {
            CoordError::Unavailable(format!("redis at {shown}: no connection in {timeout:?}"))
        })?
        .map_err(|e| CoordError::Unavailable(format!("redis at {shown}: {e}")))?;
        Ok(Redis::from_manager(conn, timeout))
    }

    /// Connects on the first request, so that a coordinator can start while
    /// Redis is down; only a malformed URL fails here. Must be called inside
    /// a tokio runtime.
    pub fn connect_lazy(url: &str, options: RedisOptions) -> Result<Redis, CoordError> {
        let shown = redact(url);
        let timeout = options.response_timeout;
        let client = redis::Client::open(url)
            .map_err(|e| CoordError::Unavailable(format!("redis url {shown}: {e}")))?;
        let conn = ConnectionManager::new_lazy_with_config(client, manager_config(timeout))
            .map_err(|e| CoordError::Unavailable(format!("redis at {shown}: {e}")))?;
        Ok(Redis::from_manager(conn, timeout))
    }

    /// Wraps a connection manager made elsewhere; `response_timeout` bounds
    /// every request made through it.
    pub fn from_manager(conn: ConnectionManager, response_timeout: Duration) -> Redis {
        Redis {
            conn,
            timeout: response_timeout,
            requests: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Requests sent since this handle was made (by it and its clones): a
    /// command, a pipeline or a script call counts one.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    async fn bounded<T>(
        &self,
        what: &str,
        request: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, CoordError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let timeout = self.timeout;
        match tokio::time::timeout(timeout, request).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(CoordError::Unavailable(format!("redis {what}: {e}"))),
            Err(_) => Err(CoordError::Unavailable(format!(
                "redis {what}: no reply within {timeout:?}"
            ))),
        }
    }

    pub(crate) async fn query<T: FromRedisValue>(
        &self,
        what: &str,
        cmd: &Cmd,
    ) -> Result<T, CoordError> {
        let mut conn = self.conn.clone();
        self.bounded(what, cmd.query_async(&mut conn)).await
    }

    pub(crate) async fn query_pipe<T: FromRedisValue>(
        &self,
        what: &str,
        pipe: &Pipeline,
    ) -> Result<T, CoordError> {
        let mut conn = self.conn.clone();
        self.bounded(what, pipe.query_async(&mut conn)).await
    }

    pub(crate) async fn invoke<T: FromRedisValue>(
        &self,
        what: &str,
        script: &ScriptInvocation<'_>,
    ) -> Result<T, CoordError> {
        let mut conn = self.conn.clone();
        self.bounded(what, script.invoke_async(&mut conn)).await
    }
}

/// A Redis `TIME` reply (`[seconds, microseconds]`) in milliseconds.
pub(crate) fn time_ms(reply: &[String]) -> Result<u64, CoordError> {
    let part = |i: usize| reply.get(i).and_then(|s| s.parse::<u64>().ok());
    match (part(0), part(1)) {
        (Some(secs), Some(micros)) => Ok(secs * 1000 + micros / 1000),
        _ => Err(CoordError::Corrupt(format!("redis TIME reply {reply:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_replies() {
        let ok = |s: &[&str]| time_ms(&s.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(ok(&["1700000000", "123456"]).unwrap(), 1_700_000_000_123);
        assert_eq!(ok(&["0", "999"]).unwrap(), 0);
        assert!(ok(&["1700000000"]).is_err());
        assert!(ok(&["x", "1"]).is_err());
    }

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(
            redact("redis://user:secret@host:6379/0"),
            "redis://***@host:6379/0"
        );
        assert_eq!(redact("redis://host:6379/"), "redis://host:6379/");
    }
}
