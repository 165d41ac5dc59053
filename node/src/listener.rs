//! The Listener actor: accepts SMTP connections on every configured address,
//! admits them under the node's connection policy ([`crate::admission`]) and
//! runs one session per connection.
//!
//! Sessions are plain async tasks (see [`crate::session`]) on the node's
//! worker threads ([`crate::workers`]); each holds a
//! [`Slot`] that tells the listener when it ends, when it authenticates and
//! when it is idle, so the counts stay right however a session finishes and
//! the longest-idle anonymous session can be evicted to make room.
//!
//! Failures of `accept()` (out of file descriptors above all) pause
//! accepting with a growing pause and are logged once per interval with a
//! count; refusals are likewise counted and logged once per interval, so
//! neither a flood nor a descriptor shortage can flood the log.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures_util::stream;
use smarthost_proto::reply::{EnhancedStatus, Reply};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{oneshot, watch, Notify};

use crate::admission::{Admission, Admitted, Policy, Refusal, RefusalCounts};
use crate::session::{self, SessionEnv};
use crate::workers::Workers;

/// How often counted refusals and accept failures are logged, at most.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(5);

/// Stop accepting and ask open sessions to finish.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopAccepting;

/// Answers once no session is open any more.
#[derive(Message)]
#[rtype(result = "()")]
pub struct WaitDrained(pub oneshot::Sender<()>);

/// The number of open sessions.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct OpenSessions;

/// Sent by a session's slot when the session ends.
#[derive(Message)]
#[rtype(result = "()")]
struct SessionEnded {
    id: u64,
}

/// Sent by a session when its client logged in.
#[derive(Message)]
#[rtype(result = "()")]
struct Authenticated {
    id: u64,
}

/// Sent by a session that turned its client away (an early talker).
#[derive(Message)]
#[rtype(result = "()")]
struct Refused(Refusal);

/// Accept failures: how long to pause before the next `accept()` and when
/// to log. Failing again at once would spin a core and write a log line
/// per attempt; the pause grows from [`AcceptBackoff::FIRST_PAUSE`] to
/// [`AcceptBackoff::MAX_PAUSE`] while failures go on, and one line per
/// [`REPORT_INTERVAL`] says how many there were.
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    pause: Duration,
    unreported: u64,
    last_report: Option<Instant>,
}

impl AcceptBackoff {
    pub const FIRST_PAUSE: Duration = Duration::from_millis(10);
    pub const MAX_PAUSE: Duration = Duration::from_secs(1);

    /// An accept failed at `now`: the pause before the next attempt, and
    /// the number of failures to log now (none when logged recently).
    pub fn failed(&mut self, now: Instant) -> (Duration, Option<u64>) {
        self.pause = if self.pause.is_zero() {
            Self::FIRST_PAUSE
        } else {
            (self.pause * 2).min(Self::MAX_PAUSE)
        };
        self.unreported += 1;
        (self.pause, self.report(now))
    }

    /// An accept succeeded: the pause starts over. When failures went
    /// unlogged and the interval allows, their count to log as a recovery.
    pub fn succeeded(&mut self, now: Instant) -> Option<u64> {
        if self.pause.is_zero() {
            return None;
        }
        self.pause = Duration::ZERO;
        if self.unreported == 0 {
            return None;
        }
        self.report(now)
    }

    fn report(&mut self, now: Instant) -> Option<u64> {
        if self
            .last_report
            .is_some_and(|last| now.duration_since(last) < REPORT_INTERVAL)
        {
            return None;
        }
        self.last_report = Some(now);
        Some(std::mem::take(&mut self.unreported))
    }
}

/// Accepts from `socket` for ever, pausing after failures.
fn accept_stream(socket: TcpListener) -> impl futures_util::Stream<Item = (TcpStream, SocketAddr)> {
    stream::unfold(
        (socket, AcceptBackoff::default()),
        |(socket, mut backoff)| async move {
            loop {
                match socket.accept().await {
                    Ok(accepted) => {
                        if let Some(failures) = backoff.succeeded(Instant::now()) {
                            tracing::info!(failures, "accepting connections again");
                        }
                        return Some((accepted, (socket, backoff)));
                    }
                    Err(error) => {
                        let (pause, report) = backoff.failed(Instant::now());
                        if let Some(failures) = report {
                            tracing::warn!(
                                %error,
                                failures,
                                pause_ms = pause.as_millis() as u64,
                                "accept failed; pausing accepts (failures counted since the last report)"
                            );
                        }
                        tokio::time::sleep(pause).await;
                    }
                }
            }
        },
    )
}

/// What a session and the listener share about it.
#[derive(Debug)]
struct Status {
    /// When the session last completed a command, in ms since the
    /// listener's epoch.
    progress_ms: AtomicU64,
    /// Receiving or storing a message: not to be evicted.
    busy: AtomicBool,
    evict: Notify,
}

impl Status {
    fn idle_since(&self) -> Option<u64> {
        (!self.busy.load(Ordering::Relaxed)).then(|| self.progress_ms.load(Ordering::Relaxed))
    }
}

/// A session's place in the listener: it reports progress, login and
/// refusals, hears about eviction, and frees the place when dropped.
pub struct Slot {
    listener: Addr<Listener>,
    id: u64,
    epoch: Instant,
    status: Arc<Status>,
}

impl Slot {
    /// A command was completed: the session is waiting for the next one.
    pub fn progressed(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.status.progress_ms.store(ms, Ordering::Relaxed);
        self.status.busy.store(false, Ordering::Relaxed);
    }

    /// The session receives or stores a message.
    pub fn busy(&self) {
        self.status.busy.store(true, Ordering::Relaxed);
    }

    pub fn authenticated(&self) {
        self.listener.do_send(Authenticated { id: self.id });
    }

    pub fn refused(&self, refusal: Refusal) {
        self.listener.do_send(Refused(refusal));
    }

    /// Completes when the listener evicts this session to make room.
    pub async fn evicted(&self) {
        self.status.evict.notified().await
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.listener.do_send(SessionEnded { id: self.id });
    }
}

pub struct Listener {
    sockets: Vec<TcpListener>,
    accepting: Vec<SpawnHandle>,
    admission: Admission,
    slots: HashMap<u64, Arc<Status>>,
    refusals: RefusalCounts,
    epoch: Instant,
    env: Arc<SessionEnv>,
    workers: Workers,
    shutdown: watch::Sender<bool>,
    drain_waiters: Vec<oneshot::Sender<()>>,
}

/// Connections the kernel completes and holds for us while the listener
/// is busy. The usual 128 is too few for a burst of clients at a relay
/// that serves a thousand at once: past it the kernel drops the clients'
/// handshakes, and a client that thinks it is connected then waits for a
/// greeting that never comes. (The kernel caps it at `net.core.somaxconn`.)
const LISTEN_BACKLOG: u32 = 1024;

fn listen(address: SocketAddr) -> io::Result<TcpListener> {
    let socket = match address {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(LISTEN_BACKLOG)
}

impl Listener {
    /// Binds every address first, so a busy port is an error at start-up.
    pub async fn bind(
        addresses: &[SocketAddr],
        policy: Policy,
        env: Arc<SessionEnv>,
        workers: Workers,
    ) -> io::Result<Listener> {
        let mut sockets = Vec::with_capacity(addresses.len());
        for address in addresses {
            let socket = listen(*address).map_err(|e| {
                io::Error::new(e.kind(), format!("cannot listen on {address}: {e}"))
            })?;
            sockets.push(socket);
        }
        Ok(Listener {
            sockets,
            accepting: Vec::new(),
            admission: Admission::new(policy),
            slots: HashMap::new(),
            refusals: RefusalCounts::default(),
            epoch: Instant::now(),
            env,
            workers,
            shutdown: watch::channel(false).0,
            drain_waiters: Vec::new(),
        })
    }

    /// Counts a refusal for the aggregated log line and the metrics.
    fn count_refusal(&mut self, refusal: Refusal) {
        self.refusals.add(refusal);
        crate::metrics::connection_refused(refusal.label());
    }

    fn refuse(&self, mut socket: TcpStream, refusal: Refusal) {
        let text = match refusal {
            Refusal::AddressFull => "Too many connections from your address, try again later",
            _ => "Too many connections, try again later",
        };
        let reply = Reply::new(
            421,
            EnhancedStatus(4, 7, 0),
            format!("{} {}", self.env.hostname(), text),
        );
        actix::spawn(async move {
            let _ = socket.write_all(&reply.to_wire()).await;
            let _ = socket.shutdown().await;
        });
    }

    fn wake_drain_waiters(&mut self) {
        if self.admission.open() == 0 {
            for waiter in self.drain_waiters.drain(..) {
                let _ = waiter.send(());
            }
        }
    }

    /// One line per interval for everything refused or evicted in it.
    fn report_refusals(&mut self) {
        if let Some(counts) = self.refusals.take() {
            tracing::warn!(
                node_full = counts.node_full,
                address_full = counts.address_full,
                early_talker = counts.early_talker,
                evicted = counts.evicted,
                open_sessions = self.admission.open(),
                anonymous_sessions = self.admission.anonymous(),
                interval_s = REPORT_INTERVAL.as_secs(),
                "connections refused or evicted"
            );
        }
    }
}

impl Actor for Listener {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        for socket in std::mem::take(&mut self.sockets) {
            if let Ok(address) = socket.local_addr() {
                tracing::info!(%address, "listening for SMTP");
            }
            self.accepting.push(ctx.add_stream(accept_stream(socket)));
        }
        ctx.run_interval(REPORT_INTERVAL, |listener, _| listener.report_refusals());
    }

    fn stopping(&mut self, _ctx: &mut Self::Context) -> Running {
        self.report_refusals();
        Running::Stop
    }
}

impl StreamHandler<(TcpStream, SocketAddr)> for Listener {
    /// A new connection: admit it under the policy (evicting an idle
    /// anonymous session when it must) or answer 421 and close.
    fn handle(&mut self, (socket, peer): (TcpStream, SocketAddr), ctx: &mut Self::Context) {
        let ip: IpAddr = peer.ip().to_canonical();
        let trusted = self.env.relay_allowed(ip);
        let slots = &self.slots;
        let admitted = self.admission.admit(ip, trusted, |id| {
            slots.get(&id).and_then(|status| status.idle_since())
        });
        let Admitted { id, evict } = match admitted {
            Ok(admitted) => admitted,
            Err(refusal) => {
                self.count_refusal(refusal);
                self.refuse(socket, refusal);
                return;
            }
        };
        if let Some(victim) = evict.and_then(|victim| self.slots.get(&victim)) {
            victim.evict.notify_one();
            self.count_refusal(Refusal::Evicted);
        }
        let status = Arc::new(Status {
            progress_ms: AtomicU64::new(self.epoch.elapsed().as_millis() as u64),
            busy: AtomicBool::new(false),
            evict: Notify::new(),
        });
        self.slots.insert(id, status.clone());
        crate::metrics::connection_admitted(self.admission.open());
        let slot = Slot {
            listener: ctx.address(),
            id,
            epoch: self.epoch,
            status,
        };
        let env = self.env.clone();
        let shutdown = self.shutdown.subscribe();
        self.workers.spawn_connection(socket, peer, move |socket| {
            session::run(socket, peer, env, shutdown, slot)
        });
    }

    fn finished(&mut self, _ctx: &mut Self::Context) {}
}

impl Handler<SessionEnded> for Listener {
    type Result = ();

    fn handle(&mut self, msg: SessionEnded, _ctx: &mut Self::Context) {
        self.admission.release(msg.id);
        self.slots.remove(&msg.id);
        crate::metrics::sessions_open(self.admission.open());
        self.wake_drain_waiters();
    }
}

impl Handler<Authenticated> for Listener {
    type Result = ();

    fn handle(&mut self, msg: Authenticated, _ctx: &mut Self::Context) {
        self.admission.authenticated(msg.id);
    }
}

impl Handler<Refused> for Listener {
    type Result = ();

    fn handle(&mut self, msg: Refused, _ctx: &mut Self::Context) {
        self.count_refusal(msg.0);
    }
}

impl Handler<StopAccepting> for Listener {
    type Result = ();

    /// Closes the listening sockets and tells the sessions to finish.
    fn handle(&mut self, _msg: StopAccepting, ctx: &mut Self::Context) {
        for handle in self.accepting.drain(..) {
            ctx.cancel_future(handle);
        }
        let _ = self.shutdown.send(true);
        tracing::info!(open_sessions = self.admission.open(), "stopped accepting");
    }
}

impl Handler<WaitDrained> for Listener {
    type Result = ();

    fn handle(&mut self, msg: WaitDrained, _ctx: &mut Self::Context) {
        self.drain_waiters.push(msg.0);
        self.wake_drain_waiters();
    }
}

impl Handler<OpenSessions> for Listener {
    type Result = usize;

    fn handle(&mut self, _msg: OpenSessions, _ctx: &mut Self::Context) -> usize {
        self.admission.open()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_failures_pause_longer_and_are_logged_once_per_interval() {
        let t0 = Instant::now();
        let mut b = AcceptBackoff::default();
        let ms = Duration::from_millis;
        // A burst of failures 1 ms apart (plus the pause): pauses double
        // up to 1 s, only the first failure is logged at once.
        let mut now = t0;
        let mut pauses = Vec::new();
        let mut reports = Vec::new();
        for _ in 0..10 {
            let (pause, report) = b.failed(now);
            pauses.push(pause.as_millis());
            reports.extend(report);
            now += pause + ms(1);
        }
        assert_eq!(pauses, [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000]);
        assert_eq!(reports, [1], "one line so far: {reports:?}");
        // More than the interval later the next failure reports the count.
        let (_, report) = b.failed(t0 + REPORT_INTERVAL + ms(1));
        assert_eq!(report, Some(10));
        // A success starts the pause over; the recovery is reported only
        // when the interval allows.
        assert_eq!(b.succeeded(t0 + REPORT_INTERVAL + ms(2)), None);
        assert_eq!(b.failed(t0 + REPORT_INTERVAL + ms(3)), (ms(10), None));
        assert_eq!(b.succeeded(t0 + REPORT_INTERVAL * 3), Some(1));
        assert_eq!(b.succeeded(t0 + REPORT_INTERVAL * 4), None);
    }

    #[test]
    fn a_listener_that_never_failed_reports_nothing() {
        let mut b = AcceptBackoff::default();
        assert_eq!(b.succeeded(Instant::now()), None);
    }
}
