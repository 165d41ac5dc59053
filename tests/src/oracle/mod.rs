//! The oracle-checked workload: a seeded generator submits mixed mail to
//! the real relay (one node or a cluster, on the local spool, one Redis or
//! a Redis Cluster) while a seeded schedule injects faults; scripted
//! receivers answer each recipient as its address says; at the end the
//! oracle checks the relay's promise — every recipient answered `250` is
//! delivered or reported failed, once — against what arrived and what
//! the relay logged. See `docs/reliability.md`.
//!
//! - `rng`: the seeded generator every choice comes from.
//! - `workload`: messages, recipients and their fates.
//! - `receiver`: the scripted SMTP receivers.
//! - `client`: submission and the ledger.
//! - `faults`: the fault schedule.
//! - `check`: the oracle itself (pure).

pub mod check;
pub mod client;
pub mod faults;
pub mod history;
pub mod receiver;
pub mod rng;
pub mod workload;

use std::fs::File;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use smarthost_testkit::redis::{RedisCluster, RedisServer, HISTORY_ARGS};

use crate::proxy::{Proxy, RedisLink};
use crate::scenario::{delivery_log, start_as, Setup};
use check::{LogLine, Observed, Verdict};
use client::Entry;
use faults::{Fault, FaultKind};
use receiver::Receivers;
use rng::Rng;
use workload::{Shape, POSTMASTER, SENDER_DOMAIN};

/// How long a Redis queue may take to empty once every recipient has its
/// outcome: an index entry orphaned by a kill is cleaned by the first
/// rescan (every 5 s here) past its grace, six response timeouts (2 s
/// here) plus 30 s of clock skew (`dangling_grace` in
/// `node/src/spool/redis.rs`), counted from the message's receive time.
const ORPHAN_WAIT: Duration = Duration::from_secs(60);

/// Where the queue lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The local spool; one `smarthost run`.
    Local,
    /// One Redis server: one `smarthost run`, or that many `smarthost
    /// node` and one `smarthost coordinator`.
    Redis { nodes: usize },
    /// A Redis Cluster of three primaries, nodes as for `Redis`.
    Cluster { nodes: usize },
}

impl Backend {
    fn split(&self) -> bool {
        matches!(self, Backend::Redis { nodes } | Backend::Cluster { nodes } if *nodes > 1)
    }

    fn nodes(&self) -> usize {
        match self {
            Backend::Local => 1,
            Backend::Redis { nodes } | Backend::Cluster { nodes } => *nodes,
        }
    }
}

/// One run: the backend, the seed and the size of the workload, the
/// faults. [`Plan::new`] fills in the defaults and the `ORACLE_*`
/// environment variables.
#[derive(Clone, Debug)]
pub struct Plan {
    pub name: String,
    pub backend: Backend,
    pub seed: u64,
    /// Messages submitted, spread evenly over `seconds`.
    pub messages: usize,
    pub seconds: u64,
    pub clients: usize,
    pub shape: Shape,
    pub fault_kinds: Vec<FaultKind>,
    /// On average one fault every this long while mail is submitted.
    pub fault_every: Duration,
    /// `queue.max_lifetime`: how long `451`-for-ever recipients take to
    /// fail.
    pub max_lifetime: Duration,
    /// Where the logs of a failed run are copied.
    pub artifacts: Option<PathBuf>,
}

/// `ORACLE_<name>` as a number, if set.
fn env_number(name: &str) -> Option<u64> {
    let value = std::env::var(format!("ORACLE_{name}")).ok()?;
    Some(
        value
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("ORACLE_{name}={value:?} is not a number")),
    )
}

/// A seed from the clock, for runs that explore.
pub fn clock_seed() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64 % 1_000_000_000)
        .unwrap_or(1)
}

impl Plan {
    /// A run of the test `name` on `backend` with `seed` unless
    /// `ORACLE_SEED` says otherwise; `ORACLE_SECONDS` and
    /// `ORACLE_MESSAGES` scale it (by default 60 messages over 10 s).
    pub fn new(name: &str, backend: Backend, seed: u64, faults: &[FaultKind]) -> Plan {
        let seconds = env_number("SECONDS").unwrap_or(10).max(1);
        let messages =
            env_number("MESSAGES").unwrap_or(if seconds > 10 { seconds * 6 } else { 60 }) as usize;
        Plan {
            name: name.to_string(),
            backend,
            seed: env_number("SEED").unwrap_or(seed),
            messages,
            seconds,
            clients: 6,
            shape: Shape {
                messages,
                domains: 40,
                max_recipients: 6,
                max_size: 3_000_000,
            },
            fault_kinds: faults.to_vec(),
            fault_every: Duration::from_millis(env_number("FAULT_EVERY_MS").unwrap_or(2_000)),
            // A killed coordinator's lease (15 s) must run out before the
            // next one leads and promotes retries again: give mail time
            // to outlive that.
            max_lifetime: Duration::from_secs(env_number("MAX_LIFETIME").unwrap_or(
                if faults.contains(&FaultKind::KillCoordinator) {
                    30
                } else {
                    15
                },
            )),
            artifacts: None,
        }
    }

    fn window(&self) -> Duration {
        Duration::from_secs(self.seconds)
    }

    fn faults(&self) -> Vec<Fault> {
        let count = (self.window().as_millis() / self.fault_every.as_millis().max(1)) as usize;
        faults::schedule(self.seed, &self.fault_kinds, self.window(), count.max(1))
    }
}

/// A tmpfs mounted for the spool, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Tmpfs {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        assert!(
            root,
            "the disk-full fault mounts a tmpfs and must run as root (as CI does)"
        );
        std::fs::create_dir_all(path).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "cannot mount a tmpfs on {}",
            path.display()
        );
        Tmpfs(path.to_path_buf())
    }

    fn filler(&self) -> PathBuf {
        self.0.join("filler")
    }

    /// Writes a file until the disk is full.
    fn fill(&self) {
        let Ok(mut file) = File::create(self.filler()) else {
            return;
        };
        let chunk = vec![0u8; 1 << 20];
        for _ in 0..4096 {
            if file.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = file.sync_all();
    }

    fn free(&self) {
        let _ = std::fs::remove_file(self.filler());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The processes of one run. Field order is drop order: the relays stop
/// before the proxies, Redis and the tmpfs under them go.
struct Deployment {
    nodes: Vec<Setup>,
    coordinator: Option<Setup>,
    /// Each process's own link to Redis, in the order they started, when
    /// the run cuts them.
    redis_links: Vec<RedisLink>,
    receiver_proxies: Vec<Proxy>,
    redis: Option<RedisServer>,
    cluster: Option<RedisCluster>,
    tmpfs: Option<Tmpfs>,
    _dir: tempfile::TempDir,
}

impl Deployment {
    fn start(plan: &Plan, receivers: &Receivers) -> Deployment {
        let dir = tempfile::tempdir().expect("a directory for the run");
        let cuts_receivers = plan.fault_kinds.contains(&FaultKind::CutReceivers);
        let mut receiver_proxies = Vec::new();
        let routes: String = receivers
            .addrs()
            .iter()
            .enumerate()
            .map(|(i, (domain, addr))| {
                let addr = if cuts_receivers && i % 3 == 0 && domain != SENDER_DOMAIN {
                    receiver_proxies.push(Proxy::start(*addr));
                    receiver_proxies.last().unwrap().addr()
                } else {
                    *addr
                };
                format!(
                    "[[domains]]\nname = \"{domain}\"\nsmart_host = \"[{}]:{}\"\n",
                    addr.ip(),
                    addr.port()
                )
            })
            .collect();
        let tmpfs = plan
            .fault_kinds
            .contains(&FaultKind::DiskFull)
            .then(|| Tmpfs::mount(&dir.path().join("disk"), "256m"));
        let cuts_redis = plan.fault_kinds.contains(&FaultKind::CutRedis);
        let (redis, cluster) = match plan.backend {
            Backend::Local => (None, None),
            // Servers keep their whole write history, which explains a
            // failed run ([`history`]).
            Backend::Redis { .. } => (Some(RedisServer::start_with(&HISTORY_ARGS)), None),
            // Clients reach the primaries at the host they dialled, so
            // that each process can have a link of its own to cut.
            Backend::Cluster { .. } => (
                None,
                Some(RedisCluster::start_with(!cuts_redis, &HISTORY_ARGS)),
            ),
        };
        let mut redis_links = Vec::new();
        let lifetime = format!("{}s", plan.max_lifetime.as_secs());
        let spool = tmpfs
            .as_ref()
            .map(|t| t.0.join("spool").display().to_string());
        let mut launch = |command: &'static str, id: &str| {
            let url = match (&redis, &cluster) {
                (Some(redis), _) if cuts_redis => {
                    redis_links.push(RedisLink::server(redis.port()));
                    redis_links.last().unwrap().url()
                }
                (Some(redis), _) => redis.url(),
                (_, Some(cluster)) if cuts_redis => {
                    // 127.0.0.2 for the first process, .3 for the next, …
                    let ip = Ipv4Addr::new(127, 0, 0, 2 + redis_links.len() as u8);
                    redis_links.push(RedisLink::cluster(ip, &cluster.ports()));
                    redis_links.last().unwrap().url()
                }
                (_, Some(cluster)) => cluster.urls(),
                _ => String::new(),
            };
            let mut env: Vec<(&str, &str)> = vec![
                ("SMARTHOST__QUEUE__RETRY_INTERVALS", "1s"),
                ("SMARTHOST__QUEUE__MAX_LIFETIME", &lifetime),
                ("SMARTHOST__QUEUE__DELAY_NOTIFICATION", "1h"),
                ("SMARTHOST__BOUNCE__DOUBLE_BOUNCE_TO", POSTMASTER),
                ("SMARTHOST__NODE__ID", id),
                // More connection threads than this machine may have cores:
                // sessions, storers and deliveries on several threads, and
                // every hand-over between them, whatever the machine. A
                // thread counts as busy at 1 % of the time, so the thread
                // that takes new work changes all the time and the work
                // lands on every thread, steered and at random.
                ("SMARTHOST__NODE__THREADS", "3"),
                ("SMARTHOST__NODE__THREAD_BUSY_PERCENT", "1"),
            ];
            if let Some(spool) = &spool {
                env.push(("SMARTHOST__QUEUE__PATH", spool));
            }
            if plan.backend != Backend::Local {
                env.extend([
                    ("SMARTHOST__QUEUE__BACKEND", "redis"),
                    ("SMARTHOST__QUEUE__REDIS_URL", url.as_str()),
                    ("SMARTHOST__QUEUE__REDIS_RESPONSE_TIMEOUT", "2s"),
                    ("SMARTHOST__QUEUE__NODE_TIMEOUT", "3s"),
                    // Orphaned index entries (a remove cut short by a kill)
                    // go at the first rescan past their grace: see
                    // `ORPHAN_WAIT`.
                    ("SMARTHOST__QUEUE__RESCAN_INTERVAL", "5s"),
                ]);
            }
            if matches!(plan.backend, Backend::Cluster { .. }) {
                env.push(("SMARTHOST__QUEUE__REDIS_CLUSTER", "true"));
            }
            start_as(
                command,
                tempfile::tempdir().unwrap(),
                "connection_lease = \"3s\"",
                &routes,
                &env,
            )
        };
        let (nodes, coordinator) = if plan.backend.split() {
            let coordinator = launch("coordinator", "coord");
            let nodes = (0..plan.backend.nodes())
                .map(|i| launch("node", &format!("node-{i}")))
                .collect();
            (nodes, Some(coordinator))
        } else {
            (vec![launch("run", "node-0")], None)
        };
        Deployment {
            nodes,
            coordinator,
            redis_links,
            receiver_proxies,
            redis,
            cluster,
            tmpfs,
            _dir: dir,
        }
    }

    fn smtp_addrs(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(|n| n.relay.smtp).collect()
    }

    /// The delivery logs of every process, read now.
    fn log_lines(&self) -> Vec<LogLine> {
        self.nodes
            .iter()
            .chain(&self.coordinator)
            .flat_map(|s| read_log(&s.log_file))
            .collect()
    }

    /// `messages` of `/api/v1/queue`: of each node on the local spool, of
    /// the first node on the shared queue.
    fn queued(&self) -> Vec<Option<u64>> {
        self.queue_counts()
            .iter()
            .map(|c| c.as_ref().and_then(|c| c["messages"].as_u64()))
            .collect()
    }

    /// [`Deployment::queued`] with the reports recorded and not known to
    /// be queued (`pending_reports`), which the run waits for too; entries
    /// of reports already queued, or of a record write that lost a race,
    /// count there until the leader's next pass drops them, so they are
    /// waited for but not a finding.
    fn queued_or_pending(&self) -> Vec<Option<u64>> {
        self.queue_counts()
            .iter()
            .map(|c| {
                let c = c.as_ref()?;
                Some(c["messages"].as_u64()? + c["pending_reports"].as_u64().unwrap_or(0))
            })
            .collect()
    }

    /// The whole `/api/v1/queue` answer of the same nodes.
    fn queue_counts(&self) -> Vec<Option<serde_json::Value>> {
        let nodes = match self.cluster.is_some() || self.redis.is_some() {
            true => &self.nodes[..1],
            false => &self.nodes[..],
        };
        nodes
            .iter()
            .map(|n| queue_counts(n.relay.admin_addr()))
            .collect()
    }
}

/// The delivery log lines of one process (a line cut by a kill is skipped).
fn read_log(path: &Path) -> Vec<LogLine> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|l| LogLine {
            message_id: l["message_id"].as_str().unwrap_or("").to_string(),
            recipient: l["recipient"].as_str().unwrap_or("").to_string(),
            outcome: l["outcome"].as_str().unwrap_or("").to_string(),
        })
        .collect()
}

/// The answer of `GET /api/v1/queue`, or `None` when the node does not
/// answer (it may be restarting).
fn queue_counts(admin: SocketAddr) -> Option<serde_json::Value> {
    use std::io::Read;
    let mut stream = TcpStream::connect_timeout(&admin, Duration::from_secs(2)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    stream
        .write_all(
            format!("GET /api/v1/queue HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200") {
        return None;
    }
    serde_json::from_str(body.trim()).ok()
}

/// Carries out one fault: start, hold, undo. Returns what it did.
fn inject(
    deployment: &Mutex<Deployment>,
    addrs: &RwLock<Vec<SocketAddr>>,
    fault: &Fault,
) -> String {
    let hold = || thread::sleep(fault.hold);
    match fault.kind {
        FaultKind::KillNode => {
            let i = {
                let mut d = deployment.lock().unwrap();
                let i = fault.target % d.nodes.len();
                d.nodes[i].relay.kill();
                i
            };
            hold();
            let mut d = deployment.lock().unwrap();
            d.nodes[i].relay.launch();
            *addrs.write().unwrap() = d.smtp_addrs();
            format!("node {i} killed and started again")
        }
        FaultKind::KillCoordinator => {
            let mut d = deployment.lock().unwrap();
            let Some(c) = d.coordinator.as_mut() else {
                return "no coordinator process to kill".into();
            };
            c.relay.kill();
            drop(d);
            hold();
            let mut d = deployment.lock().unwrap();
            d.coordinator.as_mut().unwrap().relay.launch();
            "coordinator killed and started again".into()
        }
        FaultKind::RestartRedis => {
            let mut d = deployment.lock().unwrap();
            if let Some(cluster) = d.cluster.as_mut() {
                let i = fault.target % 3;
                cluster.restart_node(i);
                return format!("Redis Cluster primary {i} killed and started again");
            }
            let Some(redis) = d.redis.as_mut() else {
                return "no Redis to kill".into();
            };
            redis.kill();
            drop(d);
            hold();
            deployment.lock().unwrap().redis.as_mut().unwrap().restart();
            "Redis killed and started again from its AOF".into()
        }
        FaultKind::CutRedis => {
            let i = {
                let d = deployment.lock().unwrap();
                if d.redis_links.is_empty() {
                    return "no Redis link to cut".into();
                }
                let i = fault.target % d.redis_links.len();
                d.redis_links[i].cut();
                i
            };
            hold();
            deployment.lock().unwrap().redis_links[i].restore();
            format!("link {i} to Redis (0 is the first process started) cut and restored")
        }
        FaultKind::CutReceivers => {
            for p in &deployment.lock().unwrap().receiver_proxies {
                p.cut();
            }
            hold();
            for p in &deployment.lock().unwrap().receiver_proxies {
                p.restore();
            }
            "links to a third of the receivers cut and restored".into()
        }
        FaultKind::DiskFull => {
            let d = deployment.lock().unwrap();
            let Some(tmpfs) = d.tmpfs.as_ref() else {
                return "no spool disk to fill".into();
            };
            tmpfs.fill();
            drop(d);
            hold();
            if let Some(tmpfs) = deployment.lock().unwrap().tmpfs.as_ref() {
                tmpfs.free();
            }
            "spool disk filled and freed".into()
        }
    }
}

/// What a run found.
pub struct Outcome {
    pub verdict: Verdict,
    pub faults: Vec<String>,
}

/// Runs `plan` and panics, with the seed and the differences, unless the
/// oracle finds the promise kept.
pub fn run(plan: &Plan) -> Outcome {
    let started = Instant::now();
    let faults = plan.faults();
    let kills = faults.iter().any(|f| f.kind.kills());
    eprintln!(
        "oracle {}: seed {} on {:?}: {} messages over {} s from {} clients, {} faults \
         (reproduce: ORACLE_SEED={} cargo test -p smarthost-tests --test oracle {} -- --nocapture)",
        plan.name,
        plan.seed,
        plan.backend,
        plan.messages,
        plan.seconds,
        plan.clients,
        faults.len(),
        plan.seed,
        plan.name
    );
    let domains: Vec<String> = (0..plan.shape.domains).map(workload::domain).collect();
    let receivers = Receivers::start(&domains, started);
    let deployment = Deployment::start(plan, &receivers);
    let addrs = RwLock::new(deployment.smtp_addrs());
    let deployment = Mutex::new(deployment);
    let ledger: Mutex<Vec<Entry>> = Mutex::new(Vec::new());
    let next = AtomicUsize::new(0);
    let t0 = Instant::now();
    let fault_log: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let spacing = plan.window() / plan.messages.max(1) as u32;

    thread::scope(|scope| {
        scope.spawn(|| {
            for fault in &faults {
                let due = t0 + fault.at;
                thread::sleep(due.saturating_duration_since(Instant::now()));
                let start = t0.elapsed();
                let what = inject(&deployment, &addrs, fault);
                fault_log.lock().unwrap().push(format!(
                    "{fault}: {what} (from {} to {})",
                    check::secs(start),
                    check::secs(t0.elapsed())
                ));
            }
        });
        for _ in 0..plan.clients {
            scope.spawn(|| loop {
                let n = next.fetch_add(1, Ordering::SeqCst);
                if n >= plan.messages {
                    return;
                }
                thread::sleep((t0 + spacing * n as u32).saturating_duration_since(Instant::now()));
                let message = workload::message(plan.seed, n, &plan.shape);
                let node = Rng::new(plan.seed).fork(n as u64).range(0, 1 << 16) as usize;
                let (node, addr) = {
                    let addrs = addrs.read().unwrap();
                    (node % addrs.len(), addrs[node % addrs.len()])
                };
                let entry = client::submit_entry(addr, node, &message, || t0.elapsed());
                ledger.lock().unwrap().push(entry);
            });
        }
    });
    let submitted = t0.elapsed();
    let mut ledger = ledger.into_inner().unwrap();
    ledger.sort_by_key(|e| e.n);
    let deployment = deployment.into_inner().unwrap();
    let faults_done = fault_log.into_inner().unwrap();

    // Every fate resolves within the lifetime plus a few retries.
    let limit = plan.max_lifetime + Duration::from_secs(60);
    let deadline = Instant::now() + limit;
    let mut waited_out = false;
    // Once every recipient has its outcome the queue empties within a few
    // ticks, or on Redis within `ORPHAN_WAIT`; one that stays full longer
    // is a finding, not worth the whole wait.
    let settle = match plan.backend {
        Backend::Local => Duration::from_secs(15),
        _ => ORPHAN_WAIT,
    };
    let mut all_resolved_since: Option<Instant> = None;
    loop {
        let arrivals = receivers.arrivals();
        let log = deployment.log_lines();
        let observed = Observed {
            ledger: &ledger,
            arrivals: &arrivals,
            strays: &[],
            log: &log,
            queued: &[],
            faults: !faults.is_empty(),
            kills,
            logged_when_stored: plan.backend != Backend::Local,
        };
        let open = check::unresolved(&observed);
        if open == 0 && deployment.queued_or_pending().iter().all(|q| *q == Some(0)) {
            break;
        }
        let since = match open {
            0 => *all_resolved_since.get_or_insert_with(Instant::now),
            _ => {
                all_resolved_since = None;
                Instant::now()
            }
        };
        if Instant::now() > deadline || since.elapsed() > settle {
            waited_out = true;
            break;
        }
        thread::sleep(Duration::from_millis(500));
    }
    let resolved = t0.elapsed();
    if !waited_out {
        // A delivery done twice would show within a few retries.
        thread::sleep(Duration::from_secs(2));
    }
    let arrivals = receivers.arrivals();
    let strays = receivers.strays();
    let log = deployment.log_lines();
    let queued = deployment.queued();
    let verdict = check::check(&Observed {
        ledger: &ledger,
        arrivals: &arrivals,
        strays: &strays,
        log: &log,
        queued: &queued,
        faults: !faults.is_empty(),
        kills,
        logged_when_stored: plan.backend != Backend::Local,
    });
    let summary = format!(
        "oracle {}: seed {} on {:?}: submitted in {}, resolved at {}{}; {} receiver connections\n\
         faults:\n  {}\nqueue at the end: {}\n{}",
        plan.name,
        plan.seed,
        plan.backend,
        check::secs(submitted),
        check::secs(resolved),
        if waited_out {
            format!(" (gave up waiting at {})", check::secs(t0.elapsed()))
        } else {
            String::new()
        },
        receivers.connections(),
        if faults_done.is_empty() {
            "none".to_string()
        } else {
            faults_done.join("\n  ")
        },
        deployment
            .queue_counts()
            .iter()
            .map(|c| c.as_ref().map_or("no answer".into(), |c| c.to_string()))
            .collect::<Vec<_>>()
            .join("; "),
        verdict.render(40)
    );
    eprintln!("{summary}");
    if !verdict.violations.is_empty() {
        let kept = plan
            .artifacts
            .as_ref()
            .map(|dir| keep_logs(dir, plan, &deployment, &summary, &verdict.violations));
        drop(deployment);
        panic!(
            "oracle {}: the relay broke its promise with seed {} on {:?} ({} violations); \
             reproduce with ORACLE_SEED={} cargo test -p smarthost-tests --test oracle {} -- --nocapture{}",
            plan.name,
            plan.seed,
            plan.backend,
            verdict.violations.len(),
            plan.seed,
            plan.name,
            kept.map(|p| format!("; logs kept in {}", p.display()))
                .unwrap_or_default()
        );
    }
    Outcome {
        verdict,
        faults: faults_done,
    }
}

/// The queue ids in the violations' text: runs of at least 20 lowercase
/// hex digits.
fn message_ids(violations: &[String]) -> Vec<String> {
    let mut ids: Vec<String> = violations
        .iter()
        .flat_map(|v| {
            v.split(|c: char| !matches!(c, '0'..='9' | 'a'..='f'))
                .filter(|t| t.len() >= 20)
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// Copies every process's log and delivery log and the summary to
/// `dir/<name>-<seed>/`.
/// On Redis, `redis-history.txt` gives every write to the keys of the
/// messages the violations name ([`history::trace`]).
fn keep_logs(
    dir: &Path,
    plan: &Plan,
    deployment: &Deployment,
    summary: &str,
    violations: &[String],
) -> PathBuf {
    let dir = dir.join(format!("{}-{}", plan.name, plan.seed));
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("summary.txt"), summary);
    let servers: Vec<(String, PathBuf)> = match (&deployment.redis, &deployment.cluster) {
        (Some(redis), _) => vec![(redis.port().to_string(), redis.append_only_dir())],
        (_, Some(cluster)) => cluster
            .append_only_dirs()
            .into_iter()
            .map(|(port, dir)| (port.to_string(), dir))
            .collect(),
        _ => Vec::new(),
    };
    if !servers.is_empty() {
        let ids = message_ids(violations);
        let _ = std::fs::write(
            dir.join("redis-history.txt"),
            history::trace(&servers, &ids),
        );
    }
    let named = deployment
        .nodes
        .iter()
        .enumerate()
        .map(|(i, s)| (format!("node-{i}"), s))
        .chain(
            deployment
                .coordinator
                .iter()
                .map(|s| ("coordinator".to_string(), s)),
        );
    for (name, setup) in named {
        let _ = std::fs::write(dir.join(format!("{name}.log")), setup.relay.log());
        let lines: Vec<String> = delivery_log(&setup.log_file)
            .iter()
            .map(|l| l.to_string())
            .collect();
        let _ = std::fs::write(dir.join(format!("{name}.delivery.log")), lines.join("\n"));
    }
    dir
}
