//! A real `redis-server` for tests: its own process on a free loopback port,
//! its own data directory, append-only file on with an fsync per write.
//! Killed when dropped. [`RedisCluster`]: three of them made into a Redis
//! Cluster of three primaries with `redis-cli --cluster create`; with
//! [`RedisCluster::start_without_endpoints`] each client reaches the
//! primaries at the host it dialled, so a test can put its own proxies
//! between one client and the cluster.
//!
//! With `SMARTHOST_TEST_REDIS=container` a [`RedisServer`] runs in a Docker
//! container instead (see `container.rs`), with the same settings and
//! the same kill, restart, pause and resume; [`RedisCluster`] always runs
//! processes, because its nodes announce their own addresses to each other
//! and to clients.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use crate::container::RedisContainer;
use crate::free_port;
use std::time::{Duration, Instant};

/// Where a [`RedisServer`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A `redis-server` child process on the test machine: the default,
    /// quick and with nothing to set up but the Debian package.
    Process,
    /// A container of a Docker engine, started through testcontainers.
    Container,
}

impl Backend {
    /// The back end `SMARTHOST_TEST_REDIS` asks for: `process` (the
    /// default when unset) or `container`. Any other value stops the test,
    /// so that a typo cannot quietly run the other one.
    pub fn from_env() -> Backend {
        match std::env::var("SMARTHOST_TEST_REDIS") {
            Err(std::env::VarError::NotPresent) => Backend::Process,
            Ok(v) if v.is_empty() || v == "process" => Backend::Process,
            Ok(v) if v == "container" => Backend::Container,
            Ok(v) => panic!("SMARTHOST_TEST_REDIS={v:?}: expected \"process\" or \"container\""),
            Err(e) => panic!("SMARTHOST_TEST_REDIS: {e}"),
        }
    }
}

/// The settings every test server starts with, whatever its back end:
/// no snapshots, the append-only file with an fsync per write, and no
/// eviction (the spool must never lose a key to memory pressure).
const SETTINGS: [&str; 8] = [
    "--save",
    "",
    "--appendonly",
    "yes",
    "--appendfsync",
    "always",
    "--maxmemory-policy",
    "noeviction",
];

/// Settings that keep a server's whole write history in its append-only
/// file, each command after the time it ran (`#TS:` lines): no rewrites,
/// which would fold the history into a snapshot. For tests that must
/// explain afterwards what happened to a key.
pub const HISTORY_ARGS: [&str; 4] = [
    "--aof-timestamp-enabled",
    "yes",
    "--auto-aof-rewrite-percentage",
    "0",
];

/// How long a starting server (which may be replaying its AOF) gets to
/// answer `PING`.
const START_TIMEOUT: Duration = Duration::from_secs(15);

pub struct RedisServer {
    dir: tempfile::TempDir,
    port: u16,
    extra_args: Vec<String>,
    backend: Backend,
    child: Option<Child>,
    /// The container of the container back end; it outlives a kill, so a
    /// restart finds its data.
    container: Option<RedisContainer>,
    /// Whether the container's `redis-server` runs (not killed).
    container_running: bool,
    /// The Docker network of the container back end: one per primary,
    /// shared by its replicas.
    network: String,
}

impl RedisServer {
    /// A server with `--appendonly yes --appendfsync always`, on the
    /// back end `SMARTHOST_TEST_REDIS` names ([`Backend::from_env`]).
    pub fn start() -> RedisServer {
        RedisServer::start_with(&[])
    }

    /// A server with more arguments after the defaults (a later
    /// `--appendfsync everysec` overrides the default one).
    pub fn start_with(extra_args: &[&str]) -> RedisServer {
        RedisServer::start_on(Backend::from_env(), extra_args)
    }

    /// [`RedisServer::start_with`] on the given back end, whatever the
    /// environment says.
    pub fn start_on(backend: Backend, extra_args: &[&str]) -> RedisServer {
        RedisServer::start_in(backend, extra_args, None)
    }

    /// A server on `backend`; a container joins `network`, or a new
    /// network of its own when that is `None`.
    fn start_in(backend: Backend, extra_args: &[&str], network: Option<&str>) -> RedisServer {
        let port = free_port();
        let network = match network {
            Some(network) => network.to_string(),
            None => format!("smarthost-test-redis-{}-{port}", std::process::id()),
        };
        let mut server = RedisServer {
            dir: tempfile::tempdir().expect("a data directory for redis-server"),
            port,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            backend,
            child: None,
            container: None,
            container_running: false,
            network,
        };
        server.spawn();
        server
    }

    /// A replica of this server (`--replicaof`) on the same back end,
    /// returned once this server reports it in sync. A container replica
    /// reaches its primary's container over the primary's network.
    pub fn start_replica(&self) -> RedisServer {
        let (host, port) = match &self.container {
            Some(container) => {
                let (ip, port) = container.bridge_address();
                (ip.to_string(), port)
            }
            None => ("127.0.0.1".to_string(), self.port),
        };
        let replica = RedisServer::start_in(
            self.backend,
            &["--replicaof", &host, &port.to_string()],
            Some(&self.network),
        );
        self.wait_for_replica();
        replica
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Waits (bounded) until this server has a replica whose link is up.
    fn wait_for_replica(&self) {
        let deadline = Instant::now() + START_TIMEOUT;
        while !has_replica_online(self.port) {
            assert!(
                Instant::now() < deadline,
                "no replica of port {} came up within {START_TIMEOUT:?}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Where the server keeps its append-only file (`appendonlydir`): its
    /// write history, whole if the server started with [`HISTORY_ARGS`]. (A server in a
    /// container keeps it inside the container.)
    pub fn append_only_dir(&self) -> PathBuf {
        self.dir.path().join("appendonlydir")
    }

    fn log_file(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    fn spawn(&mut self) {
        match self.backend {
            Backend::Process => self.spawn_process(),
            Backend::Container => self.spawn_container(),
        }
    }

    fn spawn_container(&mut self) {
        match &self.container {
            Some(container) => container.start_again(),
            None => {
                // Inside the container: every address of its own network
                // namespace (the port is published on 127.0.0.1 only), a
                // data directory of the image's redis-server package.
                let mut args: Vec<String> = [
                    "--port",
                    "6379",
                    "--bind",
                    "0.0.0.0",
                    "--protected-mode",
                    "no",
                    "--dir",
                    "/var/lib/redis",
                ]
                .iter()
                .chain(SETTINGS.iter())
                .map(|s| s.to_string())
                .collect();
                args.extend(self.extra_args.iter().cloned());
                self.container = Some(RedisContainer::start(self.port, &args, &self.network));
            }
        }
        self.container_running = true;
        self.wait_until_ready();
    }

    fn spawn_process(&mut self) {
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(SETTINGS)
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.log_file())
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = match command.spawn() {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "redis-server is not installed; these tests need a real Redis \
                 (scripts/test.sh installs redis-server)"
            ),
            Err(e) => panic!("cannot start redis-server: {e}"),
        };
        self.child = Some(child);
        self.wait_until_ready();
    }

    fn wait_until_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if ping(self.port) {
                return;
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                let log = match &self.container {
                    Some(container) => container.log(),
                    None => std::fs::read_to_string(self.log_file()).unwrap_or_default(),
                };
                panic!(
                    "redis-server on port {} did not answer PING within {START_TIMEOUT:?} \
                     (exit status {exited:?}); its log:\n{log}",
                    self.port
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server at once (SIGKILL): what it had not written to its
    /// AOF is lost, as in a crash.
    pub fn kill(&mut self) {
        if let Some(container) = &self.container {
            if self.container_running {
                container.kill();
                self.container_running = false;
            }
        }
        if let Some(mut child) = self.child.take() {
            // A paused server must be able to die.
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server without closing its connections (SIGSTOP): it
    /// accepts nothing and answers nothing until [`RedisServer::resume`].
    pub fn pause(&self) {
        match &self.container {
            Some(container) => container.pause(),
            None => self.signal("-STOP"),
        }
    }

    pub fn resume(&self) {
        match &self.container {
            Some(container) => container.resume(),
            None => self.signal("-CONT"),
        }
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("a running server").id();
        let status = Command::new("kill")
            .arg(signal)
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {pid}: {status}");
    }

    /// Starts the server again on the same port and data directory; it
    /// reloads its AOF before it answers.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        match self.container.take() {
            // Removed at once, running or not.
            Some(container) => drop(container),
            None => self.kill(),
        }
    }
}

/// Whether a server on `port` answers `PING` (not `-LOADING`).
fn ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let timeout = Some(Duration::from_millis(500));
    if stream.set_read_timeout(timeout).is_err() || stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut reply = [0u8; 7];
    stream.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
}

/// How long a one-shot command may take before the test gives up.
const ONE_SHOT: Duration = Duration::from_secs(10);

/// Sends one command to the server on `port` and returns its reply as
/// text: the line of a simple string, integer or error (with its type
/// byte), or the contents of a bulk string. `None` if the server cannot be
/// reached or does not answer within half a second.
pub fn command(port: u16, args: &[&str]) -> Option<String> {
    command_within(port, args, Duration::from_millis(500))
}

/// How often `name` ran, from the text of `INFO commandstats`
/// (`cmdstat_<name>:calls=<n>,…`); 0 when it never did.
pub fn command_calls(stats: &str, name: &str) -> u64 {
    stats
        .lines()
        .find_map(|line| {
            line.strip_prefix("cmdstat_")?
                .strip_prefix(name)?
                .strip_prefix(":calls=")
        })
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

/// [`command`] with a reply timeout of its own: for one-shot commands a
/// test relies on (`FLUSHALL` with `appendfsync always` on a loaded
/// machine can take well over the polling timeout).
pub fn command_within(port: u16, args: &[&str], timeout: Duration) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    stream.write_all(request.as_bytes()).ok()?;
    let mut reader = std::io::BufReader::new(stream);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut reader, &mut line).ok()?;
    let line = line.trim_end().to_string();
    match line.strip_prefix('$') {
        Some(len) => {
            let len: i64 = len.parse().ok()?;
            if len < 0 {
                return Some(String::new());
            }
            let mut body = vec![0u8; len as usize + 2];
            reader.read_exact(&mut body).ok()?;
            body.truncate(len as usize);
            String::from_utf8(body).ok()
        }
        None => Some(line),
    }
}

/// Whether the server on `port` has a replica whose link is up.
fn has_replica_online(port: u16) -> bool {
    command(port, &["INFO", "replication"]).is_some_and(|info| info.contains("state=online"))
}

/// How long `redis-cli --cluster create` and the nodes' agreement on the
/// slot map may take.
const CLUSTER_TIMEOUT: Duration = Duration::from_secs(30);

/// A Redis Cluster of three primaries (no replicas), each a [`RedisServer`]
/// with `--cluster-enabled yes`, its `nodes.conf` in its own data
/// directory and its cluster bus on a free port; all on 127.0.0.1. The
/// 16384 slots are spread over the three by `redis-cli --cluster create`.
/// Killed when dropped.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
    /// Indices of nodes killed by [`RedisCluster::kill`].
    dead: Vec<usize>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        RedisCluster::start_nodes(3, 0, "5000", &[])
    }

    /// Three primaries that announce no address to clients
    /// (`cluster-preferred-endpoint-type unknown-endpoint`): `CLUSTER
    /// SLOTS` gives each primary's port with a null host, which a client
    /// takes as "the host you asked", and `MOVED` names no host either.
    /// A client seeded at `127.0.0.1` reaches the servers themselves; a
    /// client seeded at another loopback address, say `127.0.0.3:<port of
    /// node 0>`, reaches every primary at `127.0.0.3:<its port>`, where a
    /// test can listen with one proxy per primary that only this client
    /// goes through (the servers listen on `127.0.0.1` alone, the cluster
    /// bus stays direct). With announced addresses
    /// (`cluster-announce-ip`/`-port`) every client would get the same
    /// ones, and one client's link could not be cut alone.
    pub fn start_without_endpoints() -> RedisCluster {
        RedisCluster::start_with(false, &[])
    }

    /// Three primaries with more arguments for each server, announcing
    /// their addresses or not ([`RedisCluster::start_without_endpoints`]).
    pub fn start_with(announce_endpoints: bool, extra_args: &[&str]) -> RedisCluster {
        let mut args = Vec::from(extra_args);
        if !announce_endpoints {
            args.extend(["--cluster-preferred-endpoint-type", "unknown-endpoint"]);
        }
        RedisCluster::start_nodes(3, 0, "5000", &args)
    }

    /// Three primaries, each with one replica (six servers), and a node
    /// timeout of one second: a primary that dies is replaced by its
    /// replica within a few seconds.
    pub fn start_with_replicas() -> RedisCluster {
        RedisCluster::start_nodes(6, 1, "1000", &[])
    }

    fn start_nodes(
        count: usize,
        replicas: usize,
        node_timeout_ms: &str,
        extra_args: &[&str],
    ) -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..count)
            .map(|_| {
                let bus = free_port().to_string();
                let mut args = vec![
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-port",
                    &bus,
                    "--cluster-node-timeout",
                    node_timeout_ms,
                ];
                args.extend_from_slice(extra_args);
                RedisServer::start_on(Backend::Process, &args)
            })
            .collect();
        let mut cluster = RedisCluster {
            nodes,
            dead: Vec::new(),
        };
        cluster.create(replicas);
        cluster.wait_until_ok();
        if replicas > 0 {
            cluster.wait_for_replicas();
        }
        cluster
    }

    fn create(&mut self, replicas: usize) {
        let addrs: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let out = tempfile::NamedTempFile::new().expect("a file for redis-cli's output");
        let mut child = match Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .stdout(out.reopen().expect("redis-cli output"))
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "redis-cli is not installed; the Redis Cluster tests need it \
                 (scripts/test.sh installs redis-tools)"
            ),
            Err(e) => panic!("cannot start redis-cli: {e}"),
        };
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for redis-cli") {
                break Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let output = std::fs::read_to_string(out.path()).unwrap_or_default();
        assert!(
            status.is_some_and(|s| s.success()),
            "redis-cli --cluster create {addrs:?}: {status:?}\n{output}"
        );
    }

    /// Waits until every node still running says `cluster_state:ok` (all
    /// slots served, as far as it knows).
    pub fn wait_until_ok(&self) {
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        loop {
            let states: Vec<Option<String>> = self
                .living()
                .map(|n| command(n.port(), &["CLUSTER", "INFO"]))
                .collect();
            if states
                .iter()
                .all(|s| s.as_deref().is_some_and(|s| s.contains("cluster_state:ok")))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster is not ok after {CLUSTER_TIMEOUT:?}: {states:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn living(&self) -> impl Iterator<Item = &RedisServer> {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.dead.contains(i))
            .map(|(_, n)| n)
    }

    /// Waits until every primary has a replica whose link is up.
    fn wait_for_replicas(&self) {
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        loop {
            let linked = self
                .primaries()
                .into_iter()
                .all(|i| has_replica_online(self.nodes[i].port()));
            if linked {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the replicas did not come up within {CLUSTER_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The indices of the nodes running as primaries now.
    pub fn primaries(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| !self.dead.contains(i))
            .filter(|&i| {
                command(self.nodes[i].port(), &["INFO", "replication"])
                    .is_some_and(|info| info.contains("role:master"))
            })
            .collect()
    }

    /// Kills node `i` for good (SIGKILL): with replicas, the cluster fails
    /// its slots over to the replica; see [`RedisCluster::wait_until_ok`].
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
        self.dead.push(i);
    }

    /// Every node's URL, comma-separated: a seed list for the client.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(RedisServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The URL of one node, enough as the only seed.
    pub fn url(&self) -> String {
        self.nodes[0].url()
    }

    /// Each server's append-only directory, by port.
    pub fn append_only_dirs(&self) -> Vec<(u16, PathBuf)> {
        self.nodes
            .iter()
            .map(|n| (n.port(), n.append_only_dir()))
            .collect()
    }

    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(RedisServer::port).collect()
    }

    /// The writes each primary has run since it started, in node order:
    /// `INFO commandstats` calls of the commands that change keys
    /// (scripts included, as they run their own), which a test's traffic
    /// leaves behind even when it deletes every key it wrote.
    pub fn writes_per_node(&self) -> Vec<u64> {
        const WRITES: &[&str] = &[
            "set",
            "mset",
            "del",
            "unlink",
            "zadd",
            "zrem",
            "sadd",
            "srem",
            "hset",
            "hdel",
            "pexpire",
            "pexpireat",
            "psetex",
            "zpopmin",
            "zremrangebyscore",
            "evalsha",
            "eval",
        ];
        self.nodes
            .iter()
            .map(|n| {
                let stats = command_within(n.port(), &["INFO", "commandstats"], ONE_SHOT)
                    .expect("INFO commandstats");
                WRITES.iter().map(|name| command_calls(&stats, name)).sum()
            })
            .collect()
    }

    /// The number of keys on each primary (`DBSIZE`), in node order.
    pub fn keys_per_node(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .map(|n| {
                let reply = command_within(n.port(), &["DBSIZE"], ONE_SHOT).expect("DBSIZE");
                reply
                    .trim_start_matches(':')
                    .parse()
                    .unwrap_or_else(|_| panic!("DBSIZE reply {reply:?}"))
            })
            .collect()
    }

    /// The index (in node order) of the primary that serves `key`.
    pub fn node_of(&self, key: &str) -> usize {
        let asked = self.living().next().expect("a running node").port();
        let slot: u16 = command_within(asked, &["CLUSTER", "KEYSLOT", key], ONE_SHOT)
            .and_then(|r| r.trim_start_matches(':').parse().ok())
            .expect("CLUSTER KEYSLOT");
        // CLUSTER NODES: `<id> <ip:port@bus> <flags> <master> <ping> <pong>
        // <epoch> <link> <slot or range>...`, one line per node.
        let nodes = command_within(asked, &["CLUSTER", "NODES"], ONE_SHOT).expect("CLUSTER NODES");
        let serves = |ranges: &[&str]| {
            ranges.iter().any(|r| {
                let (from, to) = r.split_once('-').unwrap_or((r, r));
                matches!((from.parse::<u16>(), to.parse::<u16>()), (Ok(a), Ok(b)) if a <= slot && slot <= b)
            })
        };
        let port = nodes
            .lines()
            .map(|line| line.split_whitespace().collect::<Vec<_>>())
            .find(|fields| fields.len() > 8 && serves(&fields[8..]))
            .and_then(|fields| {
                let addr = fields[1].split('@').next()?;
                addr.rsplit_once(':')?.1.parse::<u16>().ok()
            })
            .unwrap_or_else(|| panic!("no node serves slot {slot}:\n{nodes}"));
        self.nodes
            .iter()
            .position(|n| n.port() == port)
            .expect("the node is one of ours")
    }

    /// Deletes every key on every primary.
    pub fn flush_all(&self) {
        for node in &self.nodes {
            let reply = command_within(node.port(), &["FLUSHALL"], ONE_SHOT);
            assert_eq!(reply.as_deref(), Some("+OK"), "FLUSHALL on {}", node.port());
        }
    }

    /// Kills node `i` (SIGKILL) and starts it again on the same port,
    /// data directory and `nodes.conf`; returns once the cluster is ok
    /// again.
    pub fn restart_node(&mut self, i: usize) {
        self.nodes[i].restart();
        self.wait_until_ok();
    }
}
