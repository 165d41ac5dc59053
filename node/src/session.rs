//! The I/O shell of one SMTP session: it owns the socket, feeds the bytes to
//! the I/O-free [`smarthost_proto::session::Session`] and carries out what it
//! asks for — write a reply, start TLS, check a password, store a message.
//!
//! Replies are gathered while pipelined commands are still buffered and
//! written in one go when the session needs more input (RFC 2920).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix::Recipient;
use ipnet::IpNet;
use smarthost_proto::envelope::{ClientInfo, MessageId, MessageRecord};
use smarthost_proto::received;
use smarthost_proto::session::{
    Action, AuthRefusal, IncomingMessage, PeerInfo, Session, SessionConfig, StoreFailure,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

use crate::auth::UserDb;
use crate::auth_guard::{AuthGuard, PasswordChecks, Refusal};
use crate::body_memory::{BodyMemory, Reservation};
use crate::queue::Enqueue;
use crate::spool::NewMessage;

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
    pub idle_timeout: Duration,
    pub queue: Recipient<Enqueue>,
    /// The node's budget for bodies in memory (`smtp.max_body_memory`).
    pub body_memory: Arc<BodyMemory>,
    /// How long a new DATA may wait for it (`smtp.body_memory_wait`).
    pub body_memory_wait: Duration,
}

impl SessionEnv {
    pub fn hostname(&self) -> &str {
        &self.config.hostname
    }

    fn relay_allowed(&self, ip: IpAddr) -> bool {
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
}

/// Why a session loop ended early.
enum End {
    ClientGone,
    Failed(std::io::Error),
}

/// Runs one session to its end. Never panics on client input; every error
/// is logged and ends only this session.
pub async fn run(
    socket: TcpStream,
    peer: SocketAddr,
    env: Arc<SessionEnv>,
    shutdown: watch::Receiver<bool>,
) {
    let _ = socket.set_nodelay(true);
    let ip = peer.ip().to_canonical();
    let session = Session::new(
        env.config.clone(),
        PeerInfo {
            ip,
            relay_allowed: env.relay_allowed(ip),
        },
    );
    let span = tracing::info_span!("smtp", %peer);
    async move {
        tracing::debug!("session opened");
        let mut conn = Connection::Plain(socket);
        match drive(&mut conn, session, ip, &env, shutdown).await {
            Ok(()) | Err(End::ClientGone) => {}
            Err(End::Failed(error)) => tracing::debug!(%error, "session ended by an I/O error"),
        }
        conn.close().await;
        tracing::debug!("session closed");
    }
    .instrument(span)
    .await
}

async fn drive(
    conn: &mut Connection,
    mut session: Session,
    ip: IpAddr,
    env: &SessionEnv,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), End> {
    let mut out = session.greeting().to_wire();
    let mut buf = vec![0u8; 16 * 1024];
    // The share of the body budget the message under way holds, from
    // DATA until it is stored or refused.
    let mut body: Option<Reservation> = None;
    loop {
        while let Some(action) = session.next_action() {
            match action {
                Action::Reply(reply) => out.extend_from_slice(&reply.to_wire()),
                Action::Close(reply) => {
                    out.extend_from_slice(&reply.to_wire());
                    return send(conn, &mut out).await;
                }
                Action::StartTls(reply) => {
                    out.extend_from_slice(&reply.to_wire());
                    send(conn, &mut out).await?;
                    start_tls(conn, env).await?;
                    session.tls_established();
                }
                Action::Authenticate { username, password } => {
                    let reply = match check_password(env, ip, username, password).await {
                        Ok(ok) => session.auth_result(ok),
                        Err(refusal) => session.auth_refused(refusal),
                    };
                    out.extend_from_slice(&reply.to_wire());
                }
                Action::ReserveBody { declared } => {
                    // What pipelined commands got so far goes out first:
                    // the client may be waiting for it, not for us.
                    send(conn, &mut out).await?;
                    body = reserve_body(env, declared).await;
                    out.extend_from_slice(&session.body_reserved(body.is_some()).to_wire());
                }
                Action::Message(message) => {
                    let result = store(env, ip, message).await;
                    body = None;
                    out.extend_from_slice(&session.message_stored(result).to_wire());
                }
            }
        }
        // Pipelined input may have grown the body; a message refused at
        // its end holds nothing any more.
        account_body(env, &mut session, &mut body, 0);
        send(conn, &mut out).await?;
        if session.is_closed() {
            return Ok(());
        }
        if *shutdown.borrow() && session.is_idle() {
            out.extend_from_slice(&session.shutdown_reply().to_wire());
            return send(conn, &mut out).await;
        }
        tokio::select! {
            read = tokio::time::timeout(env.idle_timeout, conn.read(&mut buf)) => match read {
                Err(_elapsed) => {
                    tracing::info!("client idle too long");
                    out.extend_from_slice(&session.timeout_reply().to_wire());
                    return send(conn, &mut out).await;
                }
                Ok(Ok(0)) => return Err(End::ClientGone),
                Ok(Ok(n)) => {
                    account_body(env, &mut session, &mut body, n as u64);
                    session.push_input(&buf[..n]);
                }
                Ok(Err(error)) => return Err(End::Failed(error)),
            },
            // Wakes the loop so an idle session can be closed at once.
            _ = shutdown.changed() => {}
        }
    }
}

/// A share of the body budget for a new DATA: the declared size (capped
/// by the reservation itself at the budget) or a first step.
async fn reserve_body(env: &SessionEnv, declared: Option<u64>) -> Option<Reservation> {
    let want = declared.unwrap_or(0).min(env.config.max_message_size);
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

/// Keeps the body's reservation as large as what the session holds plus
/// `incoming` octets about to be pushed, and lets the session drop the
/// body when the budget cannot cover it. Outside DATA the reservation is
/// given back. Octets past `max_message_size` are not kept (that message
/// gets `552`), so they are not counted either.
fn account_body(
    env: &SessionEnv,
    session: &mut Session,
    body: &mut Option<Reservation>,
    incoming: u64,
) {
    let Some(size) = session.data_size() else {
        *body = None;
        return;
    };
    if let Some(reservation) = body {
        let held = (size + incoming).min(env.config.max_message_size);
        if !reservation.grow_to(held) {
            tracing::info!(
                size,
                held = reservation.bytes(),
                "no memory left for a message body under way: it is read to its end and refused with 452"
            );
            session.discard_body();
            *body = None;
        }
    }
}

async fn send(conn: &mut Connection, out: &mut Vec<u8>) -> Result<(), End> {
    if out.is_empty() {
        return Ok(());
    }
    let result = conn.write_all(out).await;
    out.clear();
    result.map_err(End::Failed)
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
    match tokio::time::timeout(env.idle_timeout, acceptor.accept(socket)).await {
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
        Err(_elapsed) => Err(End::ClientGone),
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

/// Prepends our `Received:` line and hands the message to the queue; the
/// answer comes only once the spool has it durably.
async fn store(
    env: &SessionEnv,
    ip: IpAddr,
    message: IncomingMessage,
) -> Result<MessageId, StoreFailure> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let now_ms = now.as_millis() as u64;
    let id = MessageId::new(now_ms, rand::random());
    let IncomingMessage {
        envelope,
        helo,
        auth_user,
        tls,
        data,
    } = message;
    let for_rcpt = match envelope.recipients.as_slice() {
        [only] => Some(&only.address),
        _ => None,
    };
    let header = received::received_header(
        env.hostname(),
        &helo,
        ip,
        received::with_protocol(true, tls, auth_user.is_some()),
        &id,
        for_rcpt,
        now.as_secs(),
    );
    // In place: a second copy of a large body would double what it takes.
    let mut body = data;
    body.splice(0..0, header.bytes());
    let sender = envelope
        .sender
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default();
    let recipients = envelope.recipients.len();
    let client = ClientInfo {
        ip,
        helo,
        auth_user,
        tls,
    };
    let size = body.len() as u64;
    let record = MessageRecord::new(id.clone(), now_ms, size, client, envelope);
    match env.queue.send(Enqueue(NewMessage { record, body })).await {
        Ok(Ok(())) => {
            tracing::info!(message_id = %id, from = %sender, recipients, size, "message accepted");
            Ok(id)
        }
        Ok(Err(error)) => {
            tracing::error!(%error, "message not stored");
            Err(StoreFailure::Unavailable)
        }
        Err(error) => {
            tracing::error!(%error, "queue unreachable");
            Err(StoreFailure::Unavailable)
        }
    }
}
