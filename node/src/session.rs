//! The I/O shell of one SMTP session: it owns the socket, feeds the bytes to
//! the I/O-free [`smarthost_proto::session::Session`] and carries out what it
//! asks for — write a reply, start TLS, check a password, store a message.
//!
//! Replies are gathered while pipelined commands are still buffered and
//! written in one go when the session needs more input (RFC 2920).
//!
//! Every wait has a deadline ([`crate::deadlines`]): a silent client, a
//! command line or a message that trickles in too slowly, a TLS handshake
//! that does not finish and a client that does not read its replies all end
//! the session. A client outside `relay_networks` waits `greeting_delay`
//! for the greeting and is refused if it talks first.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use smarthost_proto::envelope::{ClientInfo, MessageId};
use smarthost_proto::reply::{EnhancedStatus, Reply};
use smarthost_proto::session::{
    Action, AuthRefusal, IncomingMessage, PeerInfo, Session, SessionConfig, StoreFailure,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

use crate::admission;
use crate::auth::UserDb;
use crate::auth_guard::{AuthGuard, PasswordChecks, Refusal};
use crate::body_memory::{BodyMemory, Reservation};
use crate::deadlines::{Deadlines, Expired, Limits};
use crate::listener::Slot;
use crate::quota::Quotas;
use crate::session_log::{Entry as SessionLogEntry, SessionLog};
use crate::sessions::{Sessions, Tracked};
use crate::spill::{Spill, SpillConfig};
use crate::spool::Body;
use crate::storer::Stores;

/// What every session of a node shares.
pub struct SessionEnv {
    pub config: Arc<SessionConfig>,
    pub relay_networks: Vec<IpNet>,
    pub tls: Option<TlsAcceptor>,
    pub users: Arc<UserDb>,
    /// The node's bound on password checks running at once.
    pub checks: Arc<PasswordChecks>,
    /// Failed logins per address and user name: delays and blocks.
    pub guard: Arc<AuthGuard>,
    /// Idle, command and DATA limits.
    pub limits: Limits,
    pub tls_handshake_timeout: Duration,
    /// How long clients outside `relay_networks` wait for the greeting.
    pub greeting_delay: Duration,
    /// Where each thread's sessions store their messages.
    pub stores: Stores,
    /// Where the `accepted` events go.
    pub webhooks: crate::webhooks::Webhooks,
    /// Where the users' sending quotas are counted.
    pub quotas: Arc<dyn Quotas>,
    /// The node's budget for bodies in memory (`smtp.max_body_memory`).
    pub body_memory: Arc<BodyMemory>,
    /// How long a new DATA may wait for it (`smtp.body_memory_wait`).
    pub body_memory_wait: Duration,
    /// Where large bodies go while they arrive.
    pub spill: SpillConfig,
    /// The W3C session log (`log.session_log_dir`), when kept.
    pub session_log: Option<SessionLog>,
    /// The live sessions, for the admin API.
    pub live: Sessions,
}

impl SessionEnv {
    pub fn hostname(&self) -> &str {
        &self.config.hostname
    }

    /// The client is in `relay_networks`.
    pub fn relay_allowed(&self, ip: IpAddr) -> bool {
        self.relay_networks.iter().any(|net| net.contains(&ip))
    }
}

/// The client connection, before and after STARTTLS.
enum Connection {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// The socket is inside the TLS handshake (or the handshake failed).
    Detached,
}

fn detached() -> std::io::Error {
    std::io::Error::from(std::io::ErrorKind::NotConnected)
}

impl Connection {
    async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Connection::Plain(s) => s.read(buf).await,
            Connection::Tls(s) => s.read(buf).await,
            Connection::Detached => Err(detached()),
        }
    }

    async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Connection::Plain(s) => s.write_all(bytes).await,
            Connection::Tls(s) => {
                s.write_all(bytes).await?;
                s.flush().await
            }
            Connection::Detached => Err(detached()),
        }
    }

    async fn close(&mut self) {
        let _ = match self {
            Connection::Plain(s) => s.shutdown().await,
            Connection::Tls(s) => s.shutdown().await,
            Connection::Detached => Ok(()),
        };
    }

    /// Closes, then waits for the client to close too, reading and
    /// dropping what it still sends (at most `LINGER_READS` reads): a
    /// client closes once it has the last reply. Until then the kernel
    /// can send that reply again if it was lost, which it cannot once the
    /// process (and, in a container, its network) is gone.
    async fn linger(&mut self) {
        self.close().await;
        let mut sink = [0u8; 4096];
        for _ in 0..LINGER_READS {
            if !matches!(self.read(&mut sink).await, Ok(n) if n > 0) {
                break;
            }
        }
    }
}

/// How long a session that ends because the node stops waits for its
/// client to close (`Connection::linger`), within `node.shutdown_grace`.
const LINGER: Duration = Duration::from_secs(5);
const LINGER_READS: usize = 64;

/// Why a session loop ended early.
enum End {
    ClientGone,
    Failed(std::io::Error),
}

/// Runs one session to its end. Never panics on client input; every error
/// is logged and ends only this session. `slot` is its place in the
/// listener, freed when the session ends.
pub async fn run(
    socket: TcpStream,
    peer: SocketAddr,
    env: Arc<SessionEnv>,
    shutdown: watch::Receiver<bool>,
    slot: Slot,
) {
    let _ = socket.set_nodelay(true);
    let server = socket.local_addr().unwrap_or(peer);
    let ip = peer.ip().to_canonical();
    let relay_allowed = env.relay_allowed(ip);
    let session = Session::new(env.config.clone(), PeerInfo { ip, relay_allowed });
    let span = tracing::info_span!("smtp", %peer);
    async move {
        tracing::debug!("session opened");
        let delay = if relay_allowed {
            Duration::ZERO
        } else {
            env.greeting_delay
        };
        let socket = match greeting_delay(socket, delay, &env).await {
            BeforeGreeting::Silent(socket) => socket,
            BeforeGreeting::Talked => {
                slot.refused(admission::Refusal::EarlyTalker);
                tracing::debug!("client talked before the greeting");
                return;
            }
            BeforeGreeting::Gone => return,
        };
        let mut conn = Connection::Plain(socket);
        let answers = Answers {
            env: &env,
            client: ip,
            server,
            live: env.live.open(peer, server),
        };
        let stopping = shutdown.clone();
        let ended = drive(&mut conn, session, &answers, shutdown, &slot).await;
        if let Err(End::Failed(error)) = &ended {
            tracing::debug!(%error, "session ended by an I/O error");
        }
        if ended.is_ok() && *stopping.borrow() {
            let _ = tokio::time::timeout(LINGER, conn.linger()).await;
        } else {
            let _ = tokio::time::timeout(env.limits.idle, conn.close()).await;
        }
        tracing::debug!("session closed");
    }
    .instrument(span)
    .await
}

/// What a client did while it waited for the greeting.
enum BeforeGreeting {
    Silent(TcpStream),
    Talked,
    Gone,
}

/// Waits `delay` before the greeting (postscreen's "greet pause"): a client
/// that sends anything meanwhile does not wait for the server as SMTP
/// requires, which is what spam engines and flooders do. It gets `554
/// 5.5.0` and the connection closes.
async fn greeting_delay(
    mut socket: TcpStream,
    delay: Duration,
    env: &SessionEnv,
) -> BeforeGreeting {
    if delay.is_zero() {
        return BeforeGreeting::Silent(socket);
    }
    let mut probe = [0u8; 1];
    match tokio::time::timeout(delay, socket.peek(&mut probe)).await {
        Err(_silent) => BeforeGreeting::Silent(socket),
        Ok(Ok(0)) | Ok(Err(_)) => BeforeGreeting::Gone,
        Ok(Ok(_)) => {
            let reply = Reply::new(
                554,
                EnhancedStatus(5, 5, 0),
                format!(
                    "{} Error: talked before the greeting; wait for the server",
                    env.hostname()
                ),
            );
            let _ = tokio::time::timeout(delay.max(Duration::from_secs(1)), async {
                let _ = socket.write_all(&reply.to_wire()).await;
                let _ = socket.shutdown().await;
                // Reads what the client sent, so that closing sends a FIN
                // after the reply rather than a reset that may discard it.
                let mut sink = [0u8; 4096];
                for _ in 0..16 {
                    if !matches!(socket.read(&mut sink).await, Ok(n) if n > 0) {
                        break;
                    }
                }
            })
            .await;
            BeforeGreeting::Talked
        }
    }
}

/// Where replies to commands go: to the client, and with the command
/// they answer to the session log when it is kept.
struct Answers<'a> {
    env: &'a SessionEnv,
    client: IpAddr,
    server: SocketAddr,
    /// The session's entry among the live ones.
    live: Tracked,
}

impl Answers<'_> {
    /// Adds `reply` to `out`; a final one is logged with its command,
    /// `since` being when that command's last octets arrived.
    fn give(&self, out: &mut Vec<u8>, session: &mut Session, reply: &Reply, since: Instant) {
        let wire = reply.to_wire();
        if let Some(log) = &self.env.session_log {
            if !matches!(reply.code, 334 | 354) {
                if let Some(command) = session.take_logged() {
                    log.record(SessionLogEntry {
                        at: std::time::SystemTime::now(),
                        client: self.client,
                        user: session.auth_user().map(str::to_string),
                        server: self.server,
                        verb: command.verb,
                        args: command.args,
                        status: reply.code,
                        sent: wire.len() as u64,
                        received: command.bytes,
                        took: since.elapsed(),
                    });
                }
            }
        }
        out.extend_from_slice(&wire);
    }
}

async fn drive(
    conn: &mut Connection,
    mut session: Session,
    answers: &Answers<'_>,
    mut shutdown: watch::Receiver<bool>,
    slot: &Slot,
) -> Result<(), End> {
    let (env, ip) = (answers.env, answers.client);
    // When the input being answered arrived.
    let mut since = Instant::now();
    let mut out = session.greeting().to_wire();
    let mut buf = vec![0u8; READ_SIZE as usize];
    // The share of the body budget the message under way holds, from
    // DATA until it is stored or refused.
    let mut body: Option<Reservation> = None;
    // What of the message under way is already on disk.
    let mut spill: Option<Spill> = None;
    // The id and arrival time of the message under way, from DATA on: its
    // `Received:` line, written before the body, names them.
    let mut arriving: Option<Arrival> = None;
    let mut clock = Deadlines::new(env.limits, Instant::now());
    let write_limit = env.limits.idle;
    loop {
        // A command was answered: the next one gets its own deadline.
        let mut answered = false;
        while let Some(action) = session.next_action() {
            answered = true;
            match action {
                Action::Reply(reply) => answers.give(&mut out, &mut session, &reply, since),
                Action::Close(reply) => {
                    answers.give(&mut out, &mut session, &reply, since);
                    return send(conn, &mut out, write_limit).await;
                }
                Action::StartTls(reply) => {
                    answers.give(&mut out, &mut session, &reply, since);
                    send(conn, &mut out, write_limit).await?;
                    start_tls(conn, env).await?;
                    session.tls_established();
                }
                Action::Authenticate { username, password } => {
                    // Not to be evicted while its login is being checked.
                    slot.busy();
                    let reply = match check_password(env, ip, username, password).await {
                        Ok(ok) => {
                            if ok {
                                slot.authenticated();
                            }
                            let reply = session.auth_result(ok);
                            let user = session.auth_user().unwrap_or_default();
                            if let Some(rules) = env.users.senders_of(user) {
                                session.restrict_senders(rules.to_vec());
                            }
                            reply
                        }
                        Err(refusal) => session.auth_refused(refusal),
                    };
                    answers.give(&mut out, &mut session, &reply, since);
                }
                Action::ReserveBody { declared } => {
                    // What pipelined commands got so far goes out first:
                    // the client may be waiting for it, not for us.
                    send(conn, &mut out, write_limit).await?;
                    body = reserve_body(env, declared).await;
                    let reply = if body.is_some() {
                        let arrival = Arrival::now();
                        let reply = session.body_reserved(&arrival.id, arrival.at.as_secs());
                        arriving = Some(arrival);
                        reply
                    } else {
                        session.body_refused()
                    };
                    answers.give(&mut out, &mut session, &reply, since);
                }
                Action::Message(message) => {
                    // The session hands over a message only after a body
                    // was reserved, so the arrival is there.
                    let arrival = arriving.take().unwrap_or_else(Arrival::now);
                    let result = store(env, ip, arrival, message, spill.take()).await;
                    if result.is_ok() {
                        answers.live.message_accepted();
                    }
                    body = None;
                    let reply = session.message_stored(result);
                    answers.give(&mut out, &mut session, &reply, since);
                }
            }
        }
        if answered {
            answers
                .live
                .show(session.helo(), session.auth_user(), session.is_tls());
        }
        // Pipelined input may have grown the body; a large one goes to
        // disk, and a message refused at its end holds nothing any more.
        spill_body(env, &mut session, &mut spill).await;
        account_body(env, &mut session, &mut body, 0);
        send(conn, &mut out, write_limit).await?;
        if session.is_closed() {
            return Ok(());
        }
        if *shutdown.borrow() && session.is_idle() {
            out.extend_from_slice(&session.shutdown_reply().to_wire());
            return send(conn, &mut out, write_limit).await;
        }
        let now = Instant::now();
        if session.is_receiving_data() {
            if !clock.in_data() {
                clock.data(now);
                slot.busy();
            }
        } else if answered || clock.in_data() {
            clock.command(now);
            slot.progressed();
        }
        let (deadline, limit) = clock.deadline();
        tokio::select! {
            read = tokio::time::timeout_at(deadline.into(), conn.read(&mut buf)) => match read {
                Err(_elapsed) => return timed_out(conn, &mut out, env, limit).await,
                Ok(Ok(0)) => return Err(End::ClientGone),
                Ok(Ok(n)) => {
                    since = Instant::now();
                    clock.received(n, since);
                    account_body(env, &mut session, &mut body, n as u64);
                    session.push_input(&buf[..n]);
                }
                Ok(Err(error)) => return Err(End::Failed(error)),
            },
            // Wakes the loop so an idle session can be closed at once.
            _ = shutdown.changed() => {}
            () = slot.evicted() => {
                tracing::debug!("idle session closed to make room");
                let reply = Reply::new(
                    421,
                    EnhancedStatus(4, 7, 0),
                    format!("{} Too many connections, closing idle session", env.hostname()),
                );
                out.extend_from_slice(&reply.to_wire());
                return send(conn, &mut out, write_limit).await;
            }
        }
    }
}

/// Writes what the message under way holds to disk once one more read
/// could take it to `smtp.body_spill_threshold`, so that a session never
/// holds more than that of its body; drops the
/// file of a message that ended. A file that cannot be written makes the
/// message fail as if memory had run out (`452 4.3.1` at its end).
async fn spill_body(env: &SessionEnv, session: &mut Session, spill: &mut Option<Spill>) {
    let Some(kept) = session.kept_body_len() else {
        *spill = None;
        return;
    };
    if (kept as u64) + READ_SIZE < env.spill.threshold
        || env.spill.threshold >= env.config.max_message_size
    {
        return;
    }
    let bytes = session.take_body_so_far();
    let written = match spill {
        Some(spill) => spill.append(bytes).await,
        None => match Spill::create(&env.spill.dir).await {
            Ok(created) => spill.insert(created).append(bytes).await,
            Err(error) => Err(error),
        },
    };
    match written {
        Ok(buffer) => session.reuse_body_buffer(buffer),
        Err(error) => {
            tracing::error!(dir = %env.spill.dir.display(), %error,
                "cannot write a message body to disk: it is read to its end and refused with 452");
            session.discard_body();
            *spill = None;
        }
    }
}

/// Bytes read from the socket at a time.
const READ_SIZE: u64 = 16 * 1024;

/// A share of the body budget for a new DATA: the declared size (capped
/// by the reservation itself at the budget, and at the spill threshold,
/// the most a session holds) or a first step.
async fn reserve_body(env: &SessionEnv, declared: Option<u64>) -> Option<Reservation> {
    let want = declared
        .unwrap_or(0)
        .min(env.config.max_message_size)
        .min(env.spill.threshold);
    let reservation = env.body_memory.reserve(want, env.body_memory_wait).await;
    if reservation.is_none() {
        tracing::info!(
            in_use = env.body_memory.used(),
            limit = env.body_memory.limit(),
            "no memory for a message body within smtp.body_memory_wait: 452"
        );
    }
    reservation
}

/// Keeps the body's reservation as large as what the session holds in
/// memory plus `incoming` octets about to be pushed, and lets the session
/// drop the body when the budget cannot cover it. Outside DATA the
/// reservation is given back. Octets past `max_message_size` are not kept
/// (that message gets `552`), so they are not counted either; octets
/// written to disk are not held.
fn account_body(
    env: &SessionEnv,
    session: &mut Session,
    body: &mut Option<Reservation>,
    incoming: u64,
) {
    let Some(kept) = session.kept_body_len() else {
        *body = None;
        return;
    };
    if let Some(reservation) = body {
        let held = (kept as u64 + incoming).min(env.config.max_message_size);
        if !reservation.grow_to(held) {
            tracing::info!(
                kept,
                held = reservation.bytes(),
                "no memory left for a message body under way: it is read to its end and refused with 452"
            );
            session.discard_body();
            *body = None;
        }
    }
}

/// A limit ran out: `421 4.4.2` and the end of the session.
async fn timed_out(
    conn: &mut Connection,
    out: &mut Vec<u8>,
    env: &SessionEnv,
    limit: Expired,
) -> Result<(), End> {
    tracing::info!(limit = limit.name(), "client too slow, session closed");
    let reply = Reply::new(
        421,
        EnhancedStatus(4, 4, 2),
        format!("{} {}", env.hostname(), limit.reply_text()),
    );
    out.extend_from_slice(&reply.to_wire());
    send(conn, out, env.limits.idle).await
}

/// Writes what is gathered; a client that does not read its replies within
/// `limit` is given up.
async fn send(conn: &mut Connection, out: &mut Vec<u8>, limit: Duration) -> Result<(), End> {
    if out.is_empty() {
        return Ok(());
    }
    let result = tokio::time::timeout(limit, conn.write_all(out)).await;
    out.clear();
    match result {
        Ok(written) => written.map_err(End::Failed),
        Err(_elapsed) => Err(End::ClientGone),
    }
}

/// Replaces the plain connection with TLS over the same socket. Whatever
/// the client sent after STARTTLS and before the handshake is part of the
/// handshake, never read as commands.
async fn start_tls(conn: &mut Connection, env: &SessionEnv) -> Result<(), End> {
    let acceptor = env
        .tls
        .clone()
        .ok_or_else(|| End::Failed(std::io::Error::other("STARTTLS without a certificate")))?;
    let socket = match std::mem::replace(conn, Connection::Detached) {
        Connection::Plain(socket) => socket,
        other => {
            *conn = other;
            return Err(End::Failed(std::io::Error::other("TLS already active")));
        }
    };
    match tokio::time::timeout(env.tls_handshake_timeout, acceptor.accept(socket)).await {
        Ok(Ok(tls)) => {
            let (_, state) = tls.get_ref();
            tracing::debug!(version = ?state.protocol_version(), "TLS established");
            *conn = Connection::Tls(Box::new(tls));
            Ok(())
        }
        Ok(Err(error)) => {
            tracing::info!(%error, "TLS handshake failed");
            Err(End::ClientGone)
        }
        Err(_elapsed) => {
            tracing::debug!("TLS handshake not finished in time");
            Err(End::ClientGone)
        }
    }
}

/// Verifies a password off the async threads (argon2 is deliberately slow)
/// in one of the node's few check slots, unless failed logins blocked the
/// address or the user name; a failure waits a delay that grows with the
/// failures, to slow down guessing.
async fn check_password(
    env: &SessionEnv,
    ip: IpAddr,
    username: String,
    password: String,
) -> Result<bool, AuthRefusal> {
    let users = env.users.clone();
    let user = username.clone();
    let (ok, trusted) = env
        .guard
        .check(&env.checks, ip, Some(&username), move |memory| {
            users.verify_in(&user, &password, memory)
        })
        .await
        .map_err(|refusal| match refusal {
            Refusal::Busy => AuthRefusal::Busy,
            Refusal::AddressBlocked { .. } => AuthRefusal::AddressBlocked,
            Refusal::UserBlocked { .. } => AuthRefusal::UserBlocked,
        })?;
    if ok {
        tracing::info!(user = %username, "authenticated");
        env.guard.succeeded(ip, Some(&username)).await;
    } else {
        tracing::warn!(user = %username, "authentication failed");
        let delay = env.guard.failed(ip, Some(&username), trusted).await;
        tokio::time::sleep(delay).await;
    }
    Ok(ok)
}

/// A message's id and the time its DATA began.
struct Arrival {
    id: MessageId,
    /// Since the Unix epoch.
    at: Duration,
}

impl Arrival {
    fn now() -> Arrival {
        let at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Arrival {
            id: MessageId::new(at.as_millis() as u64, rand::random()),
            at,
        }
    }
}

/// Hands the message, which starts with our `Received:` line, to the
/// queue; the answer comes only once the spool has it durably.
async fn store(
    env: &SessionEnv,
    ip: IpAddr,
    arrival: Arrival,
    message: IncomingMessage,
    spill: Option<Spill>,
) -> Result<MessageId, StoreFailure> {
    let started = std::time::Instant::now();
    let Arrival { id, at } = arrival;
    let now_ms = at.as_millis() as u64;
    let IncomingMessage {
        envelope,
        helo,
        auth_user,
        tls,
        data,
    } = message;
    if let Some(user) = &auth_user {
        let quotas = env.users.quotas_of(user);
        match env.quotas.take(&format!("user:{user}"), quotas).await {
            Ok(Ok(())) => {}
            Ok(Err(wait)) => {
                let retry_after_secs = crate::quota::retry_after_secs(wait);
                tracing::info!(%user, retry_after_secs, "sending quota reached");
                crate::metrics::quota_refused("smtp");
                return Err(StoreFailure::OverQuota { retry_after_secs });
            }
            Err(error) => {
                tracing::warn!(%error, %user, "quota not checked");
                return Err(StoreFailure::Unavailable);
            }
        }
    }
    let body = match spill {
        None => Body::from(data),
        Some(spill) => match spill.finish(data).await {
            Ok(body) => body,
            Err(error) => {
                tracing::error!(%error, "cannot write the end of a message body to disk");
                crate::metrics::message_not_stored();
                return Err(StoreFailure::Unavailable);
            }
        },
    };
    let client = ClientInfo {
        ip,
        helo,
        auth_user,
        tls,
    };
    crate::submit::enqueue(
        env.stores.here(),
        &env.webhooks,
        id,
        now_ms,
        client,
        envelope,
        body,
        started,
    )
    .await
}
