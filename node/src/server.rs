//! Starts the actors of a node and runs them until SIGTERM or Ctrl-C.
//!
//! The admin server (`admin.listen`) starts with the queue; readiness turns
//! true once the SMTP listener is bound.
//!
//! Shutdown: readiness turns false, the listener closes its sockets, idle
//! sessions get `421` at once, sessions inside a transaction may finish it within the grace
//! period; every message already answered with `250` is in the spool.

use std::error::Error;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use actix::prelude::*;
use smarthost_proto::address::{parse_forward_path, Path};
use smarthost_proto::session::SessionConfig;
use tokio::sync::{oneshot, watch};

use crate::admin::{self, AdminEnv, BadmailEnv};
use crate::auth::{OperatorDb, UserDb};
use crate::auth_guard::{
    AuthGuard, GuardSettings, GuardStats, Ledger, LocalLedger, PasswordChecks, Policy, RedisLedger,
};
use crate::badmail::Badmail;
use crate::body_cache::BodyCache;
use crate::bounce::ReportSettings;
use crate::config::{check_domain_name, Config, DomainKind, QueueBackend};
use crate::delivery::connection::DeliveryEnv;
use crate::delivery::outbound::TlsClients;
use crate::delivery::route::Router;
use crate::delivery_log::DeliveryLog;
use crate::dispatcher::Dispatcher;
use crate::pickup::{Intake, Pickup, PickupEnv, StopPolling};
use crate::webhooks::outbox::{LocalOutbox, RedisOutbox};
use crate::webhooks::Webhooks;
use smarthost_coordinator::membership::{Join, Membership};
use smarthost_coordinator::{
    self as coordinator, Coordinator, CoordinatorOptions, LeaderTick, Shutdown,
};

use crate::admission;
use crate::body_memory::BodyMemory;
use crate::deadlines::Limits;
use crate::fd_limit;
use crate::idempotency::{Idempotency, LocalIdempotency, RedisIdempotency};
use crate::limits::{DomainLimits, LocalLimits, RedisLimits, RedisLimitsOptions};
use crate::listener::{Listener, OpenSessions, StopAccepting, WaitDrained};
use crate::queue::{Attach, DeliverySettings, Drain, Queue, Recover, ReopenLog};
use crate::quota::{LocalQuotas, Quotas, RedisQuotas};
use crate::schedule::RedisSchedule;
use crate::scheduler::RetryPolicy;
use crate::session::SessionEnv;
use crate::session_log::SessionLog;
use crate::sessions::{Board, Sessions};
use crate::spill::SpillConfig;
use crate::spool::{LocalSpool, LocalSpoolOptions, RedisSpool, RedisSpoolOptions, Spool};
use crate::storer::Stores;
use crate::suppression::{LocalSuppressions, RedisSuppressions, Suppressions};
use crate::tls;
use crate::workers::Workers;

/// What a process runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `smarthost run`: the node, and on the Redis backend a coordinator
    /// that contends for leadership.
    All,
    /// `smarthost node`: the data plane; on Redis it heartbeats so the
    /// cluster knows it, but never leads.
    Node,
    /// `smarthost coordinator`: the control plane alone (Redis backend).
    Coordinator,
}

pub fn run(config: Config, role: Role) -> Result<(), Box<dyn Error>> {
    actix::System::new().block_on(async move {
        match role {
            Role::Coordinator => coordinate(config).await,
            Role::All | Role::Node => serve(config, role).await,
        }
    })
}

/// Starts this process's coordinator on the Redis backend, once the node id
/// is this process's ([`claim_node_id`]). A leading coordinator sends its
/// [`LeaderTick`]s to `jobs`.
/// This process in the cluster's membership: its heartbeat says it, and
/// the deliveries it takes are leased to it
/// ([`coordinator::membership::lease_holder`]).
static INSTANCE: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(coordinator::membership::new_instance);

async fn start_coordinator(
    config: &Config,
    lead: bool,
    jobs: Recipient<LeaderTick>,
) -> Result<Addr<Coordinator>, Box<dyn Error>> {
    let redis = coordinator::redis::Redis::connect_lazy(
        &config.queue.redis_url,
        coordinator::redis::RedisOptions {
            response_timeout: config.queue.redis_response_timeout,
            cluster: config.queue.redis_cluster,
        },
    )
    .map_err(|e| format!("queue.redis_url: {e}"))?;
    let mut options = CoordinatorOptions::new(config.node.id.clone());
    options.info.host = config.node.hostname.clone();
    options.info.instance = INSTANCE.clone();
    options.info.smtp = config
        .smtp
        .listen
        .first()
        .map(ToString::to_string)
        .unwrap_or_default();
    options.lead = lead;
    options.node_ttl = config.queue.node_timeout;
    options.heartbeat_interval = config.queue.node_timeout / 6;
    options.tick_interval = options.tick_interval.min(config.queue.node_timeout / 6);
    let node_ttl = options.node_ttl;
    let coordinator = Coordinator::new(redis, options).with_jobs(jobs);
    claim_node_id(&coordinator.membership(), &config.node.id, node_ttl).await?;
    Ok(coordinator.start())
}

/// Makes `node.id` this process's in the cluster. Another process that
/// heartbeats under it is waited for while its heartbeat ages (a crashed
/// predecessor is dead after `node_ttl`); one that heartbeats again is
/// alive, and two live nodes with one id would hand each other's work
/// back: refused.
async fn claim_node_id(
    membership: &Membership,
    id: &str,
    node_ttl: std::time::Duration,
) -> Result<(), Box<dyn Error>> {
    let deadline = tokio::time::Instant::now() + node_ttl * 2;
    let mut last_silent = None;
    loop {
        match membership.join().await {
            Ok(Join::Joined) => return Ok(()),
            Ok(Join::InUse { host, silent_ms }) => {
                if last_silent.is_some_and(|last| silent_ms < last) {
                    return Err(format!(
                        "node.id: {id:?} is in use by a running node on {host:?}; give every node its own node.id"
                    )
                    .into());
                }
                if last_silent.is_none() {
                    tracing::warn!(node = %id, %host, silent_ms,
                        "another process used this node id until recently; waiting until it is dead");
                }
                last_silent = Some(silent_ms);
            }
            Err(error) => tracing::warn!(%error, "cannot join the cluster yet"),
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(
                format!("node.id: cannot claim {id:?} in the cluster (see the log)").into(),
            );
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// The shared queue on Redis: spool, schedule and a queue whose
/// cluster-wide jobs run when this node leads.
async fn redis_queue(
    config: &Config,
    badmail: Option<Arc<Badmail>>,
    webhooks: &Webhooks,
) -> Result<(Queue, Arc<dyn Spool>), Box<dyn Error>> {
    let spool = RedisSpool::open_with(
        &config.queue.redis_url,
        RedisSpoolOptions {
            response_timeout: config.queue.redis_response_timeout,
            cluster: config.queue.redis_cluster,
            min_replicas: config.queue.redis_min_replicas,
            require_fsync: config.queue.redis_require_fsync,
            body_dir: config.spill_dir(),
            ..RedisSpoolOptions::default()
        },
    )
    .await
    .map_err(|e| format!("queue.redis_url: {e}"))?;
    let schedule = RedisSchedule::new(&spool)
        .await
        .map_err(|e| format!("queue.redis_url: {e}"))?
        .with_ready_news(&config.queue.redis_url);
    let spool: Arc<dyn Spool> = Arc::new(spool);
    let queue = Queue::new(spool.clone())
        .with_settings(delivery_settings(config, badmail, webhooks)?)
        .with_schedule(
            Arc::new(schedule),
            coordinator::membership::lease_holder(&config.node.id, &INSTANCE),
            config.queue.lease,
        )
        .with_rescan(config.queue.rescan_interval)
        .led_by_coordinator();
    Ok((queue, spool))
}

/// What the admin API shows of the node in this process: its SMTP
/// logins and live sessions (when it listens), the board of the
/// cluster's sessions, and badmail (when a queue takes mail here).
#[derive(Default)]
struct Listened {
    logins: Option<Arc<GuardStats>>,
    sessions: Option<Sessions>,
    board: Option<Board>,
    badmail: Option<BadmailEnv>,
}

/// The board of every node's SMTP sessions, on the Redis backend.
async fn sessions_board(config: &Config) -> Result<Option<Board>, Box<dyn Error>> {
    if config.queue.backend != QueueBackend::Redis {
        return Ok(None);
    }
    let board = Board::open(
        &config.queue.redis_url,
        config.queue.redis_cluster,
        config.queue.redis_response_timeout,
    )
    .await
    .map_err(|e| format!("queue.redis_url: {e}"))?;
    Ok(Some(board))
}

/// `smarthost coordinator`: membership, leadership and, while it leads, the
/// cluster-wide jobs, until SIGTERM. Its queue accepts no mail; it stores
/// the reports of expired messages, which the nodes deliver.
async fn coordinate(config: Config) -> Result<(), Box<dyn Error>> {
    crate::metrics::install();
    if config.queue.backend != QueueBackend::Redis {
        return Err("the coordinator runs with queue.backend = \"redis\"; a node on the local backend needs none".into());
    }
    let shared = shared_state(&config).await?;
    // A failure its expiry sweep finds and no report covers is kept in
    // badmail here too, when this process can have one; else it stays in
    // the delivery log alone.
    let badmail = match open_badmail(&config).await {
        Ok(badmail) => Some(badmail),
        Err(error) => {
            tracing::warn!(%error, "no badmail: failures no report covers are only logged");
            None
        }
    };
    let (queue, spool) = redis_queue(&config, badmail.clone(), &shared.webhooks).await?;
    let queue = queue.start();
    let coordinator = start_coordinator(&config, true, queue.clone().recipient()).await?;
    // Probes, the cluster view and the shared queue's counts; ready while
    // it runs.
    let (ready, is_ready) = watch::channel(true);
    let board = sessions_board(&config).await?;
    let shared_webhooks = shared.webhooks.clone();
    let admin = start_admin(
        &config,
        &queue,
        &spool,
        Some(&coordinator),
        is_ready,
        shared,
        Listened {
            board,
            badmail: badmail.map(|store| BadmailEnv {
                store,
                intake: intake(&config, &queue, &shared_webhooks),
            }),
            ..Listened::default()
        },
    )?;
    tracing::info!(node = %config.node.id, "coordinator running");
    wait_for_signal(&queue).await;
    ready.send_replace(false);
    let _ = coordinator.send(Shutdown).await;
    admin.stop(true).await;
    tracing::info!("stopped");
    Ok(())
}

/// Raises the open-file limit and refuses limits that cannot fit in it,
/// before anything opens a file.
fn check_file_limit(config: &Config) -> Result<(), Box<dyn Error>> {
    let limit = fd_limit::raise_nofile().map_err(|e| format!("cannot read RLIMIT_NOFILE: {e}"))?;
    fd_limit::check(
        config.smtp.max_connections,
        config.delivery.max_connections,
        limit,
    )?;
    tracing::info!(soft = limit.soft, hard = limit.hard, "open-file limit");
    Ok(())
}

async fn serve(config: Config, role: Role) -> Result<(), Box<dyn Error>> {
    // Before anything counts: a metric recorded without a recorder is lost.
    crate::metrics::install();
    check_file_limit(&config)?;
    let config = Arc::new(config);
    let badmail = open_badmail(&config).await?;
    let shared = shared_state(&config).await?;
    let (queue, spool, limits, location) = match config.queue.backend {
        QueueBackend::Local => {
            let path = config.queue.path.clone();
            let options = LocalSpoolOptions {
                zero_ahead: config.queue.zero_fill_segments,
                ..LocalSpoolOptions::default()
            };
            let spool =
                tokio::task::spawn_blocking(move || LocalSpool::open(&path, options)).await??;
            let spool: Arc<dyn Spool> = Arc::new(spool);
            let queue = Queue::new(spool.clone())
                .with_settings(delivery_settings(
                    &config,
                    Some(badmail.clone()),
                    &shared.webhooks,
                )?)
                .with_holder(coordinator::membership::lease_holder(
                    &config.node.id,
                    &INSTANCE,
                ));
            // The node runs on the local backend: the limits are this node's.
            let limits: Arc<dyn DomainLimits> = Arc::new(LocalLimits::new());
            (
                queue,
                spool,
                limits,
                config.queue.path.display().to_string(),
            )
        }
        QueueBackend::Redis => {
            let url = &config.queue.redis_url;
            let (queue, spool) =
                redis_queue(&config, Some(badmail.clone()), &shared.webhooks).await?;
            // Caps and rates hold for every node on this Redis.
            let limits = RedisLimits::open(
                url,
                &config.node.id,
                RedisLimitsOptions {
                    response_timeout: config.queue.redis_response_timeout,
                    lease_ttl: config.delivery.connection_lease,
                    renew_every: config.delivery.connection_lease / 3,
                    cluster: config.queue.redis_cluster,
                },
            )
            .await
            .map_err(|e| format!("queue.redis_url: {e}"))?;
            let limits: Arc<dyn DomainLimits> = Arc::new(limits);
            (queue, spool, limits, crate::spool::redis::redact(url))
        }
    };
    let bodies = Arc::new(BodyCache::new(config.delivery.body_cache));
    let (queue, storer_env) = queue
        .with_body_cache(bodies.clone())
        .start_with_storer_env();
    let admin_spool = spool.clone();
    let coordinator = match config.queue.backend {
        QueueBackend::Redis => {
            Some(start_coordinator(&config, role == Role::All, queue.clone().recipient()).await?)
        }
        QueueBackend::Local => None,
    };
    let stopping = Arc::new(AtomicBool::new(false));
    let workers = Workers::start_filling(
        Workers::count_for(config.node.threads),
        config.node.thread_busy_percent,
    );
    tracing::info!(
        threads = workers.threads(),
        busy_percent = config.node.thread_busy_percent,
        "connection threads started"
    );
    // See `crate::storer` for why Redis keeps one storer.
    let stores = match config.queue.backend {
        QueueBackend::Local => Stores::start(&workers, storer_env, queue.clone().recipient()),
        QueueBackend::Redis => Stores::only(queue.clone().recipient()),
    };
    let env_tls = TlsClients::new(&config.delivery)?;
    let env = DeliveryEnv {
        config: config.clone(),
        spool,
        queue: queue.clone(),
        router: Router::new(&config.delivery)?,
        tls: env_tls.clone(),
        node_slots: crate::delivery::slots::NodeSlots::new(config.delivery.max_connections),
        limits,
        suppressions: shared.suppressions.clone(),
        stopping: stopping.clone(),
        workers: workers.clone(),
        bodies,
    };
    let dispatcher = Dispatcher::new(Arc::new(env)).start();
    queue.send(Attach(dispatcher.recipient())).await?;
    let recovered = queue.send(Recover).await??;
    match config.queue.backend {
        QueueBackend::Local => tracing::info!(
            messages = recovered.len(),
            spool = %location,
            "spool opened"
        ),
        // The leading coordinator rescans the shared queue.
        QueueBackend::Redis => tracing::info!(redis = %location, "shared queue opened"),
    }

    let (ready, is_ready) = watch::channel(false);
    let sessions = Arc::new(session_env(&config, stores, shared.clone())?);
    let board = sessions_board(&config).await?;
    if let Some(board) = &board {
        actix::spawn(board.clone().publish(sessions.live.clone()));
    }
    let badmail = BadmailEnv {
        store: badmail,
        intake: intake(&config, &queue, &shared.webhooks),
    };
    let pickup = start_pickup(&config, &badmail)?;
    // Every node posts the events of the outbox it shares.
    let webhook_sender = shared.webhooks.enabled().then(|| {
        crate::webhooks::sender::Sender::new(shared.webhooks.clone(), env_tls.verified.clone())
            .start()
    });
    let admin = start_admin(
        &config,
        &queue,
        &admin_spool,
        coordinator.as_ref(),
        is_ready,
        shared,
        Listened {
            logins: Some(sessions.guard.stats().clone()),
            sessions: Some(sessions.live.clone()),
            board,
            badmail: Some(badmail),
        },
    )?;

    let listener = Listener::bind(
        &config.smtp.listen,
        admission::Policy::new(
            config.smtp.max_connections,
            config.smtp.max_connections_per_ip,
            config.smtp.anonymous_connection_share,
        ),
        sessions,
        workers.clone(),
    )
    .await?
    .start();
    ready.send_replace(true);
    tracing::info!(hostname = %config.node.hostname, "smarthost ready");

    wait_for_signal(&queue).await;
    let deadline = tokio::time::Instant::now() + config.node.shutdown_grace;
    ready.send_replace(false);
    listener.send(StopAccepting).await?;
    if let Some(pickup) = &pickup {
        pickup.send(StopPolling).await?;
    }
    if let Some(sender) = &webhook_sender {
        sender.send(crate::webhooks::sender::StopSending).await?;
    }
    let (drained, is_drained) = oneshot::channel();
    listener.send(WaitDrained(drained)).await?;
    if tokio::time::timeout_at(deadline, is_drained).await.is_err() {
        let open = listener.send(OpenSessions).await.unwrap_or(0);
        tracing::warn!(
            open_sessions = open,
            "grace period over; the sessions still open end with the process"
        );
    }
    // Deliveries under way finish and their outcomes are written, within
    // the same grace; the rest are handed back untried. Otherwise a message
    // the next hop took would be sent again by whoever takes it over.
    stopping.store(true, Ordering::SeqCst);
    let (finished, are_finished) = oneshot::channel();
    queue.send(Drain(finished)).await?;
    if tokio::time::timeout_at(deadline, are_finished)
        .await
        .is_err()
    {
        tracing::warn!(
            "grace period over with deliveries still under way; they are attempted again, \
             and a message the next hop already took may arrive twice"
        );
    }
    if let Some(coordinator) = coordinator {
        // Hands leadership over at once instead of after the lease runs out.
        let _ = coordinator.send(Shutdown).await;
    }
    admin.stop(true).await;
    workers.stop();
    tracing::info!("stopped");
    Ok(())
}

/// The admin API on `admin.listen`, answering from this process's queue
/// and, on the Redis backend, its coordinator; `/metrics` shows the SMTP
/// login counters when there is a listener.
fn start_admin(
    config: &Config,
    queue: &Addr<Queue>,
    spool: &Arc<dyn Spool>,
    coordinator: Option<&Addr<Coordinator>>,
    is_ready: watch::Receiver<bool>,
    shared: Shared,
    listened: Listened,
) -> Result<admin::Servers, Box<dyn Error>> {
    let admin = &config.admin;
    let stats = Arc::new(GuardStats::default());
    let guard = AuthGuard::new(
        GuardSettings {
            scope: "admin",
            address: Policy {
                max_failures: admin.token_max_failures,
                window: admin.token_block_duration,
                block_for: admin.token_block_duration,
            },
            user: None,
            trust_for: admin.token_block_duration,
            failure_delay: admin::TOKEN_FAILURE_DELAY,
        },
        shared.ledger,
        stats.clone(),
    );
    let checks = PasswordChecks::new(
        admin.max_token_checks,
        admin::TOKEN_CHECK_QUEUE,
        admin::TOKEN_CHECK_WAIT,
        stats,
    );
    let env = AdminEnv::new(
        queue.clone().recipient(),
        queue.clone().recipient(),
        OperatorDb::new(&config.admin.operators),
        is_ready,
    )
    .with_guard(checks, guard)
    .with_spool(spool.clone())
    .with_send(crate::send_api::SendEnv {
        keys: Arc::new(crate::send_api::ApiKeys::new(&config.api.keys)),
        queue: queue.clone().recipient(),
        webhooks: shared.webhooks.clone(),
        quotas: shared.quotas,
        idempotency: shared.idempotency,
        suppressions: shared.suppressions,
        hostname: config.node.hostname.clone(),
        max_recipients: config.smtp.max_recipients,
        max_message_size: config.smtp.max_message_size,
    })
    .with_messages(admin::MessageQueue {
        replay: queue.clone().recipient(),
        list: queue.clone().recipient(),
        indexed_ids: queue.clone().recipient(),
        show: queue.clone().recipient(),
        retry: queue.clone().recipient(),
        retry_in: queue.clone().recipient(),
        delete: queue.clone().recipient(),
    });
    let env = match coordinator {
        Some(coordinator) => env.with_cluster(coordinator.clone().recipient()),
        None => env,
    };
    let env = match listened.logins {
        Some(stats) => env.with_smtp_logins(stats),
        None => env,
    };
    let env = match listened.sessions {
        Some(live) => env.with_sessions(live),
        None => env,
    };
    let env = match listened.board {
        Some(board) => env.with_board(board),
        None => env,
    };
    let env = match listened.badmail {
        Some(badmail) => env.with_badmail(badmail),
        None => env,
    };
    let open = match config.admin.metrics_listen {
        Some(listen) => {
            let open = admin::start_open(listen, env.clone())
                .map_err(|e| format!("admin.metrics_listen: cannot listen on {listen}: {e}"))?;
            tracing::info!(%listen, "metrics and probes listening");
            Some(open)
        }
        None => None,
    };
    let api = admin::start(config.admin.listen, env).map_err(|e| {
        format!(
            "admin.listen: cannot listen on {}: {e}",
            config.admin.listen
        )
    })?;
    let admin = admin::Servers { api, open };
    if config.admin.operators.is_empty() && !config.admin.listen.ip().is_loopback() {
        tracing::warn!(
            listen = %config.admin.listen,
            "the admin API is open to anyone who can reach it: configure [[admin.operators]]"
        );
    }
    tracing::info!(listen = %config.admin.listen, "admin API listening");
    Ok(admin)
}

/// Opens badmail (`badmail.dir`).
/// Where pickup files and replayed badmail enter the queue.
fn intake(config: &Config, queue: &Addr<Queue>, webhooks: &Webhooks) -> Arc<Intake> {
    Arc::new(Intake {
        queue: queue.clone().recipient(),
        hostname: config.node.hostname.clone(),
        max_message_size: config.smtp.max_message_size,
        max_recipients: config.smtp.max_recipients,
        max_hop_count: config.smtp.max_hop_count,
        webhooks: webhooks.clone(),
    })
}

async fn open_badmail(config: &Config) -> Result<Arc<Badmail>, Box<dyn Error>> {
    let dir = config.badmail_dir();
    let opened = dir.clone();
    let store = tokio::task::spawn_blocking(move || Badmail::open(&opened))
        .await?
        .map_err(|e| format!("badmail.dir: cannot open {}: {e}", dir.display()))?;
    Ok(Arc::new(store))
}

/// Starts watching `pickup.dir`, if it is set.
fn start_pickup(
    config: &Config,
    badmail: &BadmailEnv,
) -> Result<Option<Addr<Pickup>>, Box<dyn Error>> {
    let Some(dir) = &config.pickup.dir else {
        return Ok(None);
    };
    let env = PickupEnv::new(
        dir,
        &config.node.id,
        badmail.intake.clone(),
        badmail.store.clone(),
    )
    .map_err(|e| format!("pickup.dir: cannot use {}: {e}", dir.display()))?;
    Ok(Some(Pickup::new(env, config.pickup.poll_interval).start()))
}

/// Retries, reports and the delivery log, from `[queue]`, `[bounce]` and
/// `[delivery]`; what no report covers goes to `badmail`.
fn delivery_settings(
    config: &Config,
    badmail: Option<Arc<Badmail>>,
    webhooks: &Webhooks,
) -> Result<DeliverySettings, Box<dyn Error>> {
    let copy_to = match &config.bounce.copy_to {
        Some(text) => match parse_forward_path(&format!("<{text}>")) {
            Ok(Path::Mailbox(path)) => Some(path.mailbox),
            _ => return Err(format!("bounce.copy_to: {text:?} is not a mail address").into()),
        },
        None => None,
    };
    let log = DeliveryLog::open(&config.delivery.log_file).map_err(|e| {
        format!(
            "delivery.log_file: cannot open {}: {e}",
            config.delivery.log_file.display()
        )
    })?;
    Ok(DeliverySettings {
        retry: RetryPolicy {
            intervals: config.queue.retry_intervals.clone(),
            max_lifetime: config.queue.max_lifetime,
            delay_notification: config.queue.delay_notification,
        },
        reports: ReportSettings {
            hostname: config.node.hostname.clone(),
            copy_to,
            double_bounce_to: crate::config::double_bounce_to(config),
            max_lifetime: config.queue.max_lifetime,
            badmail,
        },
        log: Some(log),
        webhooks: webhooks.enabled().then(|| webhooks.clone()),
    })
}

/// What the nodes keep in common besides the queue: the failed logins of
/// SMTP AUTH and the admin API, and the sending quotas. In Redis on the
/// Redis backend, so that every node sees the same, else in this process.
#[derive(Clone)]
struct Shared {
    ledger: Arc<dyn Ledger>,
    quotas: Arc<dyn Quotas>,
    idempotency: Arc<dyn Idempotency>,
    suppressions: Arc<dyn Suppressions>,
    webhooks: Webhooks,
}

async fn shared_state(config: &Config) -> Result<Shared, Box<dyn Error>> {
    let queue = &config.queue;
    Ok(match queue.backend {
        QueueBackend::Local => Shared {
            ledger: Arc::new(LocalLedger::default()),
            quotas: Arc::new(LocalQuotas::default()),
            idempotency: {
                let path = queue.path.join("idempotency.jsonl");
                let store =
                    tokio::task::spawn_blocking(move || LocalIdempotency::open(&path)).await??;
                Arc::new(store)
            },
            suppressions: {
                let path = queue.path.join("suppressions.jsonl");
                let list =
                    tokio::task::spawn_blocking(move || LocalSuppressions::open(&path)).await??;
                Arc::new(list)
            },
            webhooks: {
                let path = queue.path.join("webhooks.jsonl");
                let outbox =
                    tokio::task::spawn_blocking(move || LocalOutbox::open(&path)).await??;
                Webhooks::new(config.webhooks.clone(), Arc::new(outbox))
            },
        },
        QueueBackend::Redis => {
            // One multiplexed connection for all of them.
            let timeout = queue.redis_response_timeout;
            let conn = crate::spool::redis::connect(&queue.redis_url, queue.redis_cluster, timeout)
                .await
                .map_err(|e| format!("queue.redis_url: {e}"))?;
            Shared {
                ledger: Arc::new(RedisLedger::new(conn.clone(), timeout)),
                quotas: Arc::new(RedisQuotas::new(conn.clone(), timeout)),
                idempotency: Arc::new(RedisIdempotency::new(conn.clone(), timeout)),
                suppressions: Arc::new(RedisSuppressions::new(conn.clone(), timeout)),
                webhooks: Webhooks::new(
                    config.webhooks.clone(),
                    Arc::new(RedisOutbox::new(conn, timeout)),
                ),
            }
        }
    })
}

fn session_env(
    config: &Config,
    stores: Stores,
    shared: Shared,
) -> Result<SessionEnv, Box<dyn Error>> {
    let smtp = &config.smtp;
    let tls = smtp.tls.as_ref().map(tls::acceptor).transpose()?;
    let local_domains = config
        .domains
        .iter()
        .filter(|d| d.kind == DomainKind::Local)
        // Validated at load; the routing form is lower case with A-labels.
        .map(|d| check_domain_name(&d.name).unwrap_or_else(|_| d.name.to_ascii_lowercase()))
        .collect();
    // The counters of the SMTP logins, for the metrics.
    let stats = Arc::new(GuardStats::default());
    let session = SessionConfig {
        hostname: config.node.hostname.clone(),
        max_message_size: smtp.max_message_size,
        max_session_size: smtp.max_session_size,
        max_recipients: smtp.max_recipients,
        max_hop_count: smtp.max_hop_count,
        junk_command_limit: smtp.junk_command_limit,
        require_tls: smtp.require_tls,
        tls_available: tls.is_some(),
        auth_available: !smtp.users.is_empty(),
        allow_plaintext_auth: smtp.allow_plaintext_auth,
        local_domains,
        postmaster: crate::config::postmaster(config),
    };
    Ok(SessionEnv {
        config: Arc::new(session),
        relay_networks: smtp.relay_networks.clone(),
        tls,
        users: Arc::new(UserDb::new(&smtp.users)),
        checks: Arc::new(PasswordChecks::new(
            smtp.max_password_checks,
            smtp.password_check_queue,
            smtp.password_check_wait,
            stats.clone(),
        )),
        guard: Arc::new(AuthGuard::new(
            GuardSettings {
                scope: "smtp",
                address: Policy {
                    max_failures: smtp.auth_address_max_failures,
                    window: smtp.auth_failure_window,
                    block_for: smtp.auth_block_duration,
                },
                user: Some(Policy {
                    max_failures: smtp.auth_user_max_failures,
                    window: smtp.auth_failure_window,
                    block_for: smtp.auth_block_duration,
                }),
                trust_for: smtp.auth_trust_duration,
                failure_delay: smtp.auth_failure_delay,
            },
            shared.ledger,
            stats,
        )),
        limits: Limits {
            idle: smtp.connection_timeout,
            command: smtp.command_timeout,
            data: smtp.data_timeout,
            min_data_rate: smtp.min_data_rate,
        },
        tls_handshake_timeout: smtp.tls_handshake_timeout,
        greeting_delay: smtp.greeting_delay,
        stores,
        webhooks: shared.webhooks.clone(),
        quotas: shared.quotas,
        body_memory: BodyMemory::new(smtp.max_body_memory),
        body_memory_wait: smtp.body_memory_wait,
        spill: {
            let spill = SpillConfig {
                dir: config.spill_dir(),
                threshold: smtp.body_spill_threshold,
            };
            spill.check()?;
            spill
        },
        session_log: match &config.log.session_log_dir {
            Some(dir) => Some(SessionLog::start(dir, &config.node.hostname).map_err(|e| {
                format!("log.session_log_dir: cannot create {}: {e}", dir.display())
            })?),
            None => None,
        },
        live: Sessions::new(&config.node.id),
    })
}

/// Returns at SIGTERM or Ctrl-C; at SIGHUP has `queue` reopen the
/// delivery log (log rotation) and goes on waiting.
async fn wait_for_signal(queue: &Addr<Queue>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(hangup) => Some(hangup),
        Err(error) => {
            tracing::warn!(%error, "cannot watch SIGHUP; the delivery log is not reopened");
            None
        }
    };
    let hung_up = async |hangup: &mut Option<tokio::signal::unix::Signal>| match hangup {
        Some(hangup) => hangup.recv().await,
        None => std::future::pending().await,
    };
    match signal(SignalKind::terminate()) {
        Ok(mut term) => loop {
            tokio::select! {
                _ = term.recv() => return tracing::info!("SIGTERM received"),
                _ = tokio::signal::ctrl_c() => return tracing::info!("interrupt received"),
                _ = hung_up(&mut hangup) => {
                    tracing::info!("SIGHUP received: reopening the delivery log");
                    queue.do_send(ReopenLog);
                }
            }
        },
        Err(error) => {
            tracing::warn!(%error, "cannot watch SIGTERM; Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
