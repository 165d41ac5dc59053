//! The connection to Redis shared by the coordinator and the node: one
//! server through a [`ConnectionManager`], or a Redis Cluster through a
//! [`ClusterConnection`], behind one [`Connection`] type; and the
//! coordinator's [`Redis`] handle on it, with a deadline on every request.
//!
//! Every Redis error, a refused or lost connection and a reply that does not
//! come within the response timeout are [`CoordError::Unavailable`]; nothing
//! here panics or waits without bound. Scripts are sent as `EVALSHA`; after
//! a Redis restart empties the script cache the first call of each script
//! also loads it (`SCRIPT LOAD`, then `EVALSHA` again).
//!
//! # Redis Cluster
//!
//! With `cluster` set, the URL is a comma-separated list of seed nodes; the
//! client learns the slot map from them and follows it. Every key of the
//! application carries a hash tag, and every script and transaction touches
//! the keys of one slot. Pipelines are what differs: one server takes a
//! pipeline over any keys, a cluster node only the keys of its slots. So on
//! a cluster [`Connection`] sends a pipeline as it is when its keys are all
//! in one slot, and otherwise splits it ([`plan`]): the commands of each
//! slot go as one pipeline to that slot's primary, commands without a key
//! (`SCRIPT LOAD`, `FLUSHALL`, …) alone, routed by the client (`SCRIPT LOAD`
//! to every node), all at once over the multiplexed connections, so the
//! whole still costs about one round trip. The replies come back in the
//! order of the pipeline. Commands of different slots are then not ordered
//! against each other: a caller that needs one write to land before another
//! in a different slot sends them as two requests. A `MULTI`/`EXEC` over
//! several slots cannot be split and fails with a client error.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::{try_join_all, BoxFuture, FutureExt};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{
    MultipleNodeRoutingInfo, Route, RoutingInfo, SingleNodeRoutingInfo, Slot, SlotAddr,
};
use redis::{
    Arg, Cmd, ErrorKind, FromRedisValue, Pipeline, RedisError, RedisFuture, ScriptInvocation, Value,
};

use crate::CoordError;

/// How the coordinator talks to Redis.
#[derive(Clone, Debug)]
pub struct RedisOptions {
    /// The longest wait for a connection or for the reply to one request
    /// (reconnecting included) before it is `Unavailable`.
    pub response_timeout: Duration,
    /// The URL lists seed nodes of a Redis Cluster, not one server.
    pub cluster: bool,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            response_timeout: Duration::from_secs(5),
            cluster: false,
        }
    }
}

/// The seed URLs of `url`: one server's URL, or (`cluster`) one or more
/// comma-separated seed nodes. Each must be a `redis://` or `rediss://`
/// URL the client accepts. Errors name no password.
pub fn seeds(url: &str, cluster: bool) -> Result<Vec<String>, String> {
    let seeds: Vec<String> = url
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    if seeds.is_empty() {
        return Err("no redis URL".to_string());
    }
    if seeds.len() > 1 && !cluster {
        return Err(format!(
            "{} lists {} servers; several seed nodes need a Redis Cluster (queue.redis_cluster = true)",
            redact(url),
            seeds.len()
        ));
    }
    for seed in &seeds {
        if !(seed.starts_with("redis://") || seed.starts_with("rediss://")) {
            return Err(format!("{}: not a redis:// URL", redact(seed)));
        }
        redis::Client::open(seed.as_str()).map_err(|e| format!("{}: {e}", redact(seed)))?;
    }
    Ok(seeds)
}

/// The URL (or comma-separated seed URLs) without passwords, for logs and
/// messages.
pub fn redact(url: &str) -> String {
    url.split(',')
        .map(|one| match (one.find("://"), one.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                format!("{}://***@{}", &one[..scheme], &one[at + 1..])
            }
            _ => one.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
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

fn cluster_builder(seeds: &[String], timeout: Duration) -> ClusterClientBuilder {
    ClusterClientBuilder::new(seeds.iter().map(String::as_str))
        .connection_timeout(timeout)
        .response_timeout(timeout)
        // As with one server: a few quick tries (a redirection, a node
        // that restarts), then the request fails and the next one tries
        // again.
        .retries(2)
        .max_retry_wait(1000)
}

fn cluster_config(timeout: Duration) -> ClusterConfig {
    ClusterConfig::new()
        .set_connection_timeout(timeout)
        .set_response_timeout(timeout)
}

/// A connection to one Redis server or to a Redis Cluster. Clones share
/// the underlying connections; both kinds reconnect by themselves.
#[derive(Clone)]
pub enum Connection {
    /// One server.
    Server(ConnectionManager),
    /// A Redis Cluster: pipelines over several slots are split (see the
    /// module doc).
    Cluster(ClusterConnection),
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Connection::Server(_) => "Connection::Server",
            Connection::Cluster(_) => "Connection::Cluster",
        })
    }
}

impl Connection {
    /// Connects now: fails if Redis (one server, or the cluster's slot map
    /// from a seed) cannot be reached within `timeout`. The error names
    /// the server without its password.
    pub async fn connect(
        url: &str,
        cluster: bool,
        timeout: Duration,
    ) -> Result<Connection, String> {
        let shown = redact(url);
        let seeds = seeds(url, cluster)?;
        let connecting = async {
            if cluster {
                let client = cluster_builder(&seeds, timeout)
                    .build()
                    .map_err(|e| format!("redis cluster {shown}: {e}"))?;
                client
                    .get_async_connection_with_config(cluster_config(timeout))
                    .await
                    .map(Connection::Cluster)
                    .map_err(|e| format!("redis cluster at {shown}: {e}"))
            } else {
                let client = redis::Client::open(seeds[0].as_str())
                    .map_err(|e| format!("redis url {shown}: {e}"))?;
                client
                    .get_connection_manager_with_config(manager_config(timeout))
                    .await
                    .map(Connection::Server)
                    .map_err(|e| format!("redis at {shown}: {e}"))
            }
        };
        tokio::time::timeout(timeout, connecting)
            .await
            .map_err(|_| format!("redis at {shown}: no connection in {timeout:?}"))?
    }

    /// Connects on the first request, so that a process can start while
    /// Redis is down; only a malformed URL fails here. Must be called
    /// inside a tokio runtime.
    pub fn connect_lazy(url: &str, cluster: bool, timeout: Duration) -> Result<Connection, String> {
        let shown = redact(url);
        let seeds = seeds(url, cluster)?;
        if cluster {
            let client = cluster_builder(&seeds, timeout)
                .build()
                .map_err(|e| format!("redis cluster {shown}: {e}"))?;
            Ok(Connection::Cluster(
                client.get_pending_async_connection_with_config(cluster_config(timeout)),
            ))
        } else {
            let client = redis::Client::open(seeds[0].as_str())
                .map_err(|e| format!("redis url {shown}: {e}"))?;
            ConnectionManager::new_lazy_with_config(client, manager_config(timeout))
                .map(Connection::Server)
                .map_err(|e| format!("redis at {shown}: {e}"))
        }
    }

    /// Whether this is a Redis Cluster (and multi-slot pipelines are split).
    pub fn is_cluster(&self) -> bool {
        matches!(self, Connection::Cluster(_))
    }

    /// Sends `cmd` to the server, or to every primary of the cluster, and
    /// returns each reply: for settings that each node has on its own
    /// (`CONFIG GET`, `COMMAND INFO`).
    pub async fn on_every_primary(&mut self, cmd: &Cmd) -> redis::RedisResult<Vec<Value>> {
        match self {
            Connection::Server(conn) => Ok(vec![cmd.query_async(conn).await?]),
            Connection::Cluster(conn) => {
                let routing = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
                match conn.route_command(cmd.clone(), routing).await? {
                    // One (address, reply) pair per primary.
                    Value::Map(replies) => Ok(replies.into_iter().map(|(_, v)| v).collect()),
                    other => Ok(vec![other]),
                }
            }
        }
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Server(conn) => conn.req_packed_command(cmd),
            Connection::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Server(conn) => conn.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(conn) => {
                if pipeline.is_transaction() {
                    // An atomic pipeline (`pipe().atomic()`) is one
                    // transaction: it must be in one slot, and the cluster
                    // client says so if not.
                    conn.req_packed_commands(pipeline, offset, count)
                } else {
                    split_pipeline(conn.clone(), pipeline)
                }
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Server(conn) => conn.get_db(),
            Connection::Cluster(conn) => conn.get_db(),
        }
    }
}

/// Where one command of a pipeline must go on a Redis Cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Place {
    /// The primary of the slot of its (first) key.
    Slot(Slot),
    /// No key: wherever the client routes it (`SCRIPT LOAD` to every node,
    /// `FLUSHALL` to every primary, `TIME` to any node).
    Unkeyed,
    /// `MULTI`, `EXEC`, `DISCARD`: only beside the commands of one slot.
    Transaction,
}

/// The [`Place`] of `cmd`: its first key's slot (for a script, the first of
/// its `KEYS`), or what kind of keyless command it is.
pub(crate) fn place(cmd: &Cmd) -> Place {
    let args: Vec<&[u8]> = cmd
        .args_iter()
        .filter_map(|a| match a {
            Arg::Simple(bytes) => Some(bytes),
            _ => None,
        })
        .collect();
    let name = args
        .first()
        .map(|n| n.to_ascii_uppercase())
        .unwrap_or_default();
    let key = match name.as_slice() {
        b"MULTI" | b"EXEC" | b"DISCARD" => return Place::Transaction,
        b"EVAL" | b"EVALSHA" | b"EVAL_RO" | b"EVALSHA_RO" | b"FCALL" | b"FCALL_RO" => {
            let keys = args
                .get(2)
                .and_then(|n| std::str::from_utf8(n).ok())
                .and_then(|n| n.parse::<usize>().ok())
                .unwrap_or(0);
            if keys == 0 {
                None
            } else {
                args.get(3)
            }
        }
        b"SCRIPT" | b"FLUSHALL" | b"FLUSHDB" | b"WAITAOF" | b"WAIT" | b"PING" | b"TIME"
        | b"CONFIG" | b"COMMAND" | b"INFO" | b"DBSIZE" | b"CLUSTER" | b"ECHO" => None,
        _ => args.get(1),
    };
    match key {
        Some(key) => Place::Slot(Slot::for_key(key)),
        None => Place::Unkeyed,
    }
}

/// One request of a split pipeline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Part {
    /// These commands (indices into the pipeline, in order) as one
    /// pipeline to the primary of `slot`.
    Slot(Slot, Vec<usize>),
    /// This command on its own, routed by the client.
    Alone(usize),
}

/// How a cluster connection sends a pipeline whose commands are at
/// `places`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Plan {
    /// As it is: at most one slot, so one node takes it all (keyless
    /// commands such as `TIME` or `WAITAOF` go along to that node).
    Whole,
    /// These requests, all at once.
    Split(Vec<Part>),
}

/// Splits a pipeline by slot (see the module doc). Sans-IO.
pub(crate) fn plan(places: &[Place]) -> Result<Plan, String> {
    let mut parts: Vec<Part> = Vec::new();
    let mut slots = 0;
    let mut transaction = false;
    for (i, place) in places.iter().enumerate() {
        match place {
            Place::Slot(slot) => {
                let existing = parts.iter_mut().find_map(|p| match p {
                    Part::Slot(s, indices) if s == slot => Some(indices),
                    _ => None,
                });
                match existing {
                    Some(indices) => indices.push(i),
                    None => {
                        slots += 1;
                        parts.push(Part::Slot(*slot, vec![i]));
                    }
                }
            }
            Place::Unkeyed => parts.push(Part::Alone(i)),
            Place::Transaction => transaction = true,
        }
    }
    match (slots, transaction) {
        // One node takes it all, keyless commands and MULTI/EXEC included.
        (1, _) => Ok(Plan::Whole),
        (0, true) => Ok(Plan::Whole),
        (0, false) if parts.is_empty() => Ok(Plan::Whole),
        // Keyless commands alone, each where the client routes it (a
        // pipeline would go to one random node: `SCRIPT LOAD` must reach
        // every node).
        (0, false) => Ok(Plan::Split(parts)),
        (_, true) => Err(format!(
            "a MULTI/EXEC over {slots} hash slots cannot run on Redis Cluster"
        )),
        (_, false) => Ok(Plan::Split(parts)),
    }
}

/// Sends a non-transaction pipeline to a cluster by [`plan`]; the replies
/// come back in pipeline order, server errors in place as in a pipeline.
fn split_pipeline(
    conn: ClusterConnection,
    pipeline: &Pipeline,
) -> BoxFuture<'_, redis::RedisResult<Vec<Value>>> {
    async move {
        let commands: Vec<&Cmd> = pipeline.cmd_iter().collect();
        let places: Vec<Place> = commands.iter().map(|c| place(c)).collect();
        let parts = match plan(&places)
            .map_err(|e| RedisError::from((ErrorKind::Client, "pipeline", e)))?
        {
            Plan::Whole => {
                let mut conn = conn;
                return conn.req_packed_commands(pipeline, 0, commands.len()).await;
            }
            Plan::Split(parts) => parts,
        };
        let requests = parts.iter().map(|part| {
            let mut conn = conn.clone();
            let commands = &commands;
            async move {
                match part {
                    Part::Slot(slot, indices) => {
                        let mut sub = redis::pipe();
                        for &i in indices {
                            sub.add_command(commands[i].clone());
                        }
                        let route = SingleNodeRoutingInfo::SpecificNode(Route::with_slot(
                            *slot,
                            SlotAddr::Master,
                        ));
                        conn.route_pipeline(sub, 0, indices.len(), route).await
                    }
                    Part::Alone(i) => Ok(vec![conn.req_packed_command(commands[*i]).await?]),
                }
            }
        });
        let replies = try_join_all(requests).await?;
        let mut ordered: Vec<Option<Value>> = vec![None; commands.len()];
        for (part, values) in parts.iter().zip(replies) {
            let indices = match part {
                Part::Slot(_, indices) => indices.clone(),
                Part::Alone(i) => vec![*i],
            };
            if values.len() != indices.len() {
                return Err(RedisError::from((
                    ErrorKind::Client,
                    "pipeline",
                    format!("{} replies to {} commands", values.len(), indices.len()),
                )));
            }
            for (i, value) in indices.into_iter().zip(values) {
                ordered[i] = Some(value);
            }
        }
        Ok(ordered
            .into_iter()
            .map(|v| v.unwrap_or(Value::Nil))
            .collect())
    }
    .boxed()
}

/// A shared handle on Redis (a server or a cluster); clones share the
/// connection and the request counter.
#[derive(Clone)]
pub struct Redis {
    conn: Connection,
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

impl Redis {
    /// Connects now: fails if Redis cannot be reached within the response
    /// timeout.
    pub async fn connect(url: &str, options: RedisOptions) -> Result<Redis, CoordError> {
        let timeout = options.response_timeout;
        let conn = Connection::connect(url, options.cluster, timeout)
            .await
            .map_err(CoordError::Unavailable)?;
        Ok(Redis::from_connection(conn, timeout))
    }

    /// Connects on the first request, so that a coordinator can start while
    /// Redis is down; only a malformed URL fails here. Must be called inside
    /// a tokio runtime.
    pub fn connect_lazy(url: &str, options: RedisOptions) -> Result<Redis, CoordError> {
        let timeout = options.response_timeout;
        let conn = Connection::connect_lazy(url, options.cluster, timeout)
            .map_err(CoordError::Unavailable)?;
        Ok(Redis::from_connection(conn, timeout))
    }

    /// Wraps a connection manager made elsewhere; `response_timeout` bounds
    /// every request made through it.
    pub fn from_manager(conn: ConnectionManager, response_timeout: Duration) -> Redis {
        Redis::from_connection(Connection::Server(conn), response_timeout)
    }

    /// Wraps a connection made elsewhere (a server or a cluster).
    pub fn from_connection(conn: Connection, response_timeout: Duration) -> Redis {
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
        assert_eq!(
            redact("redis://:pw@a:7000,redis://b:7001,rediss://u:pw@c:7002"),
            "redis://***@a:7000,redis://b:7001,rediss://***@c:7002"
        );
    }

    #[test]
    fn seed_lists() {
        assert_eq!(
            seeds("redis://127.0.0.1:6379", false).unwrap(),
            ["redis://127.0.0.1:6379"]
        );
        assert_eq!(
            seeds("redis://a:7000, redis://b:7001,", true).unwrap(),
            ["redis://a:7000", "redis://b:7001"]
        );
        let err = seeds("redis://:secret@a:7000,redis://b:7001", false).unwrap_err();
        assert!(err.contains("queue.redis_cluster"), "{err}");
        assert!(!err.contains("secret"), "{err}");
        assert!(seeds("", true).is_err());
        assert!(seeds(" , ", true).is_err());
        let err = seeds("http://user:secret@a:7000", true).unwrap_err();
        assert!(
            err.contains("not a redis:// URL") && !err.contains("secret"),
            "{err}"
        );
        assert!(seeds("redis://a:notaport", true).is_err());
    }

    fn cmd(args: &[&str]) -> Cmd {
        let mut cmd = redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        cmd
    }

    fn slot(key: &str) -> Place {
        Place::Slot(Slot::for_key(key))
    }

    #[test]
    fn commands_are_placed_by_their_first_key() {
        #[rustfmt::skip]
        let cases: &[(&[&str], Place)] = &[
            (&["GET", "smarthost:{m:1}:record"], slot("{m:1}")),
            (&["SET", "smarthost:{m:1}:body", "x", "XX"], slot("{m:1}")),
            (&["DEL", "smarthost:{m:1}:record", "smarthost:{m:1}:body"], slot("{m:1}")),
            (&["ZADD", "smarthost:{index}:messages", "1", "a"], slot("{index}")),
            (&["EVALSHA", "abc", "2", "smarthost:{d:x}:ready", "smarthost:{d:x}:leases", "7"], slot("{d:x}")),
            (&["evalsha", "abc", "1", "smarthost:{cluster}:nodes"], slot("{cluster}")),
            (&["EVALSHA", "abc", "0", "arg"], Place::Unkeyed),
            (&["SCRIPT", "LOAD", "return 1"], Place::Unkeyed),
            (&["TIME"], Place::Unkeyed),
            (&["CONFIG", "GET", "appendonly"], Place::Unkeyed),
            (&["WAITAOF", "1", "0", "100"], Place::Unkeyed),
            (&["FLUSHALL"], Place::Unkeyed),
            (&["MULTI"], Place::Transaction),
            (&["exec"], Place::Transaction),
        ];
        for (args, want) in cases {
            assert_eq!(place(&cmd(args)), *want, "{args:?}");
        }
        // The hash tag decides: the record and body of a message share a
        // slot, two messages (almost always) do not.
        assert_eq!(
            place(&cmd(&["GET", "smarthost:{m:1}:record"])),
            place(&cmd(&["GET", "smarthost:{m:1}:body"]))
        );
        assert_ne!(slot("{m:1}"), slot("{m:2}"));
    }

    #[test]
    fn pipelines_are_split_by_slot() {
        let (a, b) = (slot("{m:1}"), slot("{m:2}"));
        let (sa, sb) = (Slot::for_key("{m:1}"), Slot::for_key("{m:2}"));
        let t = Place::Transaction;
        let u = Place::Unkeyed;
        // One slot: as it is, keyless commands and transactions included.
        assert_eq!(plan(&[a, a]), Ok(Plan::Whole));
        assert_eq!(plan(&[t, a, a, t, u]), Ok(Plan::Whole));
        assert_eq!(plan(&[u, a]), Ok(Plan::Whole));
        assert_eq!(plan(&[]), Ok(Plan::Whole));
        // Several slots: one pipeline per slot, in order; keyless alone.
        assert_eq!(
            plan(&[a, b, a, u, b]),
            Ok(Plan::Split(vec![
                Part::Slot(sa, vec![0, 2]),
                Part::Slot(sb, vec![1, 4]),
                Part::Alone(3),
            ]))
        );
        // No key at all: each alone, where the client routes it.
        assert_eq!(
            plan(&[u, u]),
            Ok(Plan::Split(vec![Part::Alone(0), Part::Alone(1)]))
        );
        assert_eq!(plan(&[u]), Ok(Plan::Split(vec![Part::Alone(0)])));
        // A transaction over two slots cannot be had.
        let err = plan(&[t, a, b, t]).unwrap_err();
        assert!(err.contains("2 hash slots"), "{err}");
    }
}
