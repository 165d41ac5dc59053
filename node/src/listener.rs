//! The Listener: accepts SMTP connections on every configured address,
//! admits them under the node's connection policy ([`crate::admission`]) and
//! runs one session per connection.
//!
//! Every connection thread ([`crate::workers`]) accepts on its own
//! listening socket, one per address and thread in an `SO_REUSEPORT`
//! group, and each connection is admitted and served where it was
//! accepted, never handed to another thread. Which socket of the group a
//! new connection reaches is chosen by a small BPF program that the
//! listener attaches to the group whenever the thread to fill changes
//! ([`crate::load`]): all go to that thread, or, when every thread is busy,
//! each to one at random. A thread never stops accepting on its own
//! socket, so a connection already queued there is never stranded.
//! The admission state is shared behind a lock ([`Gate`]).
//! Sessions are plain async tasks (see [`crate::session`]); each holds a
//! [`Slot`] that updates the gate when it ends, when it authenticates and
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
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures_util::{stream, StreamExt};
use smarthost_proto::reply::{EnhancedStatus, Reply};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{oneshot, watch, Notify};

use crate::admission::{Admission, Admitted, Policy, Refusal, RefusalCounts};
use crate::load::Target;
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
    gate: Arc<Gate>,
    id: u64,
    status: Arc<Status>,
}

impl Slot {
    /// A command was completed: the session is waiting for the next one.
    pub fn progressed(&self) {
        let ms = self.gate.epoch.elapsed().as_millis() as u64;
        self.status.progress_ms.store(ms, Ordering::Relaxed);
        self.status.busy.store(false, Ordering::Relaxed);
    }

    /// The session receives or stores a message.
    pub fn busy(&self) {
        self.status.busy.store(true, Ordering::Relaxed);
    }

    pub fn authenticated(&self) {
        self.gate.lock().admission.authenticated(self.id);
    }

    pub fn refused(&self, refusal: Refusal) {
        self.gate.lock().count_refusal(refusal);
    }

    /// Completes when the listener evicts this session to make room.
    pub async fn evicted(&self) {
        self.status.evict.notified().await
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut state = self.gate.lock();
        state.admission.release(self.id);
        state.slots.remove(&self.id);
        crate::metrics::sessions_open(state.admission.open());
        state.wake_drain_waiters();
    }
}

/// What every accepting thread shares: the admission of connections and
/// the open sessions. A lock, not an actor, so that a connection is
/// admitted, served and let go on the thread that accepted it.
struct Gate {
    state: Mutex<GateState>,
    epoch: Instant,
    env: Arc<SessionEnv>,
    shutdown: watch::Sender<bool>,
}

/// The state behind the gate's lock.
struct GateState {
    admission: Admission,
    slots: HashMap<u64, Arc<Status>>,
    refusals: RefusalCounts,
    drain_waiters: Vec<oneshot::Sender<()>>,
}

impl GateState {
    /// Counts a refusal for the aggregated log line and the metrics.
    fn count_refusal(&mut self, refusal: Refusal) {
        self.refusals.add(refusal);
        crate::metrics::connection_refused(refusal.label());
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

impl Gate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new connection: admit it under the policy (evicting an idle
    /// anonymous session when it must) and run its session on this
    /// thread, or answer 421 and close.
    fn admit(self: &Arc<Self>, socket: TcpStream, peer: SocketAddr) {
        let ip: IpAddr = peer.ip().to_canonical();
        let trusted = self.env.relay_allowed(ip);
        let (id, status) = {
            let mut state = self.lock();
            let GateState {
                admission, slots, ..
            } = &mut *state;
            let Admitted { id, evict } = match admission.admit(ip, trusted, |id| {
                slots.get(&id).and_then(|status| status.idle_since())
            }) {
                Ok(admitted) => admitted,
                Err(refusal) => {
                    state.count_refusal(refusal);
                    drop(state);
                    self.refuse(socket, refusal);
                    return;
                }
            };
            if let Some(victim) = evict.and_then(|victim| slots.get(&victim)) {
                victim.evict.notify_one();
                state.count_refusal(Refusal::Evicted);
            }
            let status = Arc::new(Status {
                progress_ms: AtomicU64::new(self.epoch.elapsed().as_millis() as u64),
                busy: AtomicBool::new(false),
                evict: Notify::new(),
            });
            state.slots.insert(id, status.clone());
            crate::metrics::connection_admitted(state.admission.open());
            (id, status)
        };
        let slot = Slot {
            gate: self.clone(),
            id,
            status,
        };
        let shutdown = self.shutdown.subscribe();
        let env = self.env.clone();
        // On this thread, whose reactor already polls the socket.
        actix::spawn(session::run(socket, peer, env, shutdown, slot));
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
}

/// Accepts from `socket` on the calling thread until the listener stops
/// accepting, and serves each connection there.
async fn accept_until_stopped(socket: TcpListener, gate: Arc<Gate>) {
    let mut stopped = gate.shutdown.subscribe();
    let connections = accept_stream(socket);
    futures_util::pin_mut!(connections);
    loop {
        tokio::select! {
            accepted = connections.next() => match accepted {
                Some((socket, peer)) => gate.admit(socket, peer),
                None => return,
            },
            _ = stopped.wait_for(|stopped| *stopped) => return,
        }
    }
}

/// Steers each group's new connections to the thread to fill, until the
/// listener stops accepting; then lets the groups' handles go, so that the
/// sockets close with the threads' own.
async fn steer_until_stopped(
    groups: Vec<std::net::TcpListener>,
    threads: usize,
    mut target: watch::Receiver<Target>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut steered = false;
    loop {
        let now = *target.borrow_and_update();
        // Left alone, the kernel spreads connections by their addresses.
        if steered || now != Target::All {
            for group in &groups {
                if let Err(error) = steer(group, now, threads) {
                    tracing::warn!(
                        %error,
                        "cannot steer new connections to a thread; the kernel spreads them"
                    );
                    return;
                }
            }
            steered = true;
        }
        tokio::select! {
            changed = target.changed() => if changed.is_err() { return },
            _ = stopped.wait_for(|stopped| *stopped) => return,
        }
    }
}

/// The socket option that sets a group's program (`asm-generic/socket.h`,
/// as on x86-64 and arm64; the libc crate does not name it for Linux).
#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;

/// Sends the new connections of `socket`'s `SO_REUSEPORT` group of
/// `threads` sockets to `target`'s: the program returns the index of the
/// socket in the group, which is the order the threads listened in.
#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
fn steer(socket: &std::net::TcpListener, target: Target, threads: usize) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let op = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let program = match target {
        Target::Thread(thread) => vec![op(libc::BPF_RET | libc::BPF_K, thread as u32)],
        Target::All => vec![
            op(
                libc::BPF_LD | libc::BPF_W | libc::BPF_ABS,
                (libc::SKF_AD_OFF + libc::SKF_AD_RANDOM) as u32,
            ),
            op(libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K, threads as u32),
            op(libc::BPF_RET | libc::BPF_A, 0),
        ],
    };
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: the descriptor is open for as long as `socket` lives, and the
    // kernel copies the program before the call returns.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
)))]
fn steer(_socket: &std::net::TcpListener, _target: Target, _threads: usize) -> io::Result<()> {
    Err(io::ErrorKind::Unsupported.into())
}

pub struct Listener {
    /// The listening sockets of each connection thread: one per address,
    /// all of an address in one `SO_REUSEPORT` group.
    sockets: Vec<Vec<std::net::TcpListener>>,
    /// A handle on each group, to steer its connections (none with one
    /// thread).
    groups: Vec<std::net::TcpListener>,
    gate: Arc<Gate>,
    workers: Workers,
}

/// Connections the kernel completes and holds for us while the listener
/// is busy. The usual 128 is too few for a burst of clients at a relay
/// that serves a thousand at once: past it the kernel drops the clients'
/// handshakes, and a client that thinks it is connected then waits for a
/// greeting that never comes. (The kernel caps it at `net.core.somaxconn`.)
const LISTEN_BACKLOG: u32 = 1024;

fn listen(address: SocketAddr, shared: bool) -> io::Result<std::net::TcpListener> {
    let socket = match address {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    if shared {
        socket.set_reuseport(true)?;
    }
    socket.bind(address)?;
    socket.listen(LISTEN_BACKLOG)?.into_std()
}

/// One listening socket per thread on `address`. A port another process
/// listens on is an error here, as without `SO_REUSEPORT`: a plain socket
/// is bound first, and the group takes its port (the one the system chose
/// for port 0).
fn listen_on_each(address: SocketAddr, threads: usize) -> io::Result<Vec<std::net::TcpListener>> {
    let plain = listen(address, false)?;
    if threads <= 1 {
        return Ok(vec![plain]);
    }
    let address = plain.local_addr()?;
    drop(plain);
    (0..threads).map(|_| listen(address, true)).collect()
}

impl Listener {
    /// Binds every address first, so a busy port is an error at start-up.
    pub async fn bind(
        addresses: &[SocketAddr],
        policy: Policy,
        env: Arc<SessionEnv>,
        workers: Workers,
    ) -> io::Result<Listener> {
        let threads = workers.threads();
        let mut sockets: Vec<Vec<std::net::TcpListener>> =
            (0..threads).map(|_| Vec::new()).collect();
        let mut groups = Vec::new();
        for address in addresses {
            let group = listen_on_each(*address, threads).map_err(|e| {
                io::Error::new(e.kind(), format!("cannot listen on {address}: {e}"))
            })?;
            if threads > 1 {
                groups.push(group[0].try_clone()?);
            }
            for (thread, socket) in group.into_iter().enumerate() {
                sockets[thread].push(socket);
            }
        }
        Ok(Listener {
            sockets,
            groups,
            gate: Arc::new(Gate {
                state: Mutex::new(GateState {
                    admission: Admission::new(policy),
                    slots: HashMap::new(),
                    refusals: RefusalCounts::default(),
                    drain_waiters: Vec::new(),
                }),
                epoch: Instant::now(),
                env,
                shutdown: watch::channel(false).0,
            }),
            workers,
        })
    }
}

impl Actor for Listener {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        for (thread, sockets) in std::mem::take(&mut self.sockets).into_iter().enumerate() {
            for socket in sockets {
                if thread == 0 {
                    if let Ok(address) = socket.local_addr() {
                        tracing::info!(%address, "listening for SMTP");
                    }
                }
                let gate = self.gate.clone();
                self.workers.run_on(thread, move || async move {
                    match TcpListener::from_std(socket) {
                        Ok(socket) => accept_until_stopped(socket, gate).await,
                        Err(error) => tracing::error!(%error, "cannot accept on a thread"),
                    }
                });
            }
        }
        let groups = std::mem::take(&mut self.groups);
        if !groups.is_empty() {
            actix::spawn(steer_until_stopped(
                groups,
                self.workers.threads(),
                self.workers.target(),
                self.gate.shutdown.subscribe(),
            ));
        }
        ctx.run_interval(REPORT_INTERVAL, |listener, _| {
            listener.gate.lock().report_refusals()
        });
    }

    fn stopping(&mut self, _ctx: &mut Self::Context) -> Running {
        self.gate.lock().report_refusals();
        Running::Stop
    }
}

impl Handler<StopAccepting> for Listener {
    type Result = ();

    /// Closes the listening sockets and tells the sessions to finish.
    fn handle(&mut self, _msg: StopAccepting, _ctx: &mut Self::Context) {
        let _ = self.gate.shutdown.send(true);
        tracing::info!(
            open_sessions = self.gate.lock().admission.open(),
            "stopped accepting"
        );
    }
}

impl Handler<WaitDrained> for Listener {
    type Result = ();

    fn handle(&mut self, msg: WaitDrained, _ctx: &mut Self::Context) {
        let mut state = self.gate.lock();
        state.drain_waiters.push(msg.0);
        state.wake_drain_waiters();
    }
}

impl Handler<OpenSessions> for Listener {
    type Result = usize;

    fn handle(&mut self, _msg: OpenSessions, _ctx: &mut Self::Context) -> usize {
        self.gate.lock().admission.open()
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

    #[actix::test]
    async fn the_threads_listen_on_one_port_and_a_port_in_use_is_refused() {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let group = listen_on_each(any, 3).unwrap();
        assert_eq!(group.len(), 3);
        let address = group[0].local_addr().unwrap();
        assert_ne!(address.port(), 0);
        assert!(group.iter().all(|s| s.local_addr().unwrap() == address));

        // Another node on the same port, with threads or without, fails
        // as it would without SO_REUSEPORT.
        for threads in [1, 2] {
            let error = listen_on_each(address, threads).unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::AddrInUse, "{threads} threads");
        }
        let plain = std::net::TcpListener::bind(any).unwrap();
        let error = listen_on_each(plain.local_addr().unwrap(), 2).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::AddrInUse);
    }

    /// The kernel spreads new connections over the sockets of a group by
    /// their addresses and ports: forty connections from forty ports
    /// all reach one socket of two once in about 5 × 10¹¹ runs.
    #[actix::test]
    async fn connections_are_spread_over_the_threads_sockets() {
        let group = listen_on_each(SocketAddr::from(([127, 0, 0, 1], 0)), 2).unwrap();
        let address = group[0].local_addr().unwrap();
        let accepted = accepted_by_each(&group, address, 40);
        assert!(accepted.iter().all(|&n| n > 0), "{accepted:?}");
    }

    /// Connects `count` clients to `address` and counts what each socket
    /// of `group` accepted.
    fn accepted_by_each(
        group: &[std::net::TcpListener],
        address: SocketAddr,
        count: usize,
    ) -> Vec<usize> {
        let clients: Vec<_> = (0..count)
            .map(|_| std::net::TcpStream::connect(address).unwrap())
            .collect();
        let accepted: Vec<usize> = group
            .iter()
            .map(|socket| {
                socket.set_nonblocking(true).unwrap();
                std::iter::from_fn(|| socket.accept().ok()).count()
            })
            .collect();
        assert_eq!(
            accepted.iter().sum::<usize>(),
            clients.len(),
            "{accepted:?}"
        );
        accepted
    }

    #[actix::test]
    async fn new_connections_go_to_the_thread_they_are_steered_to() {
        let group = listen_on_each(SocketAddr::from(([127, 0, 0, 1], 0)), 3).unwrap();
        let address = group[0].local_addr().unwrap();
        let handle = group[0].try_clone().unwrap();
        for thread in [2, 0, 1] {
            steer(&handle, Target::Thread(thread), 3).unwrap();
            let mut expected = vec![0; 3];
            expected[thread] = 20;
            assert_eq!(accepted_by_each(&group, address, 20), expected);
        }
        // At random: a socket gets none of 60 once in about 10¹⁰ runs.
        steer(&handle, Target::All, 3).unwrap();
        let spread = accepted_by_each(&group, address, 60);
        assert!(spread.iter().all(|&n| n > 0), "{spread:?}");
    }

    #[test]
    fn a_listener_that_never_failed_reports_nothing() {
        let mut b = AcceptBackoff::default();
        assert_eq!(b.succeeded(Instant::now()), None);
    }
}
