//! The Listener actor: accepts SMTP connections on every configured address,
//! enforces the node's connection limits and runs one session per connection.
//!
//! Sessions are plain async tasks (see [`crate::session`]); each holds a
//! guard that tells the listener when it ends, so the counts stay right
//! however a session finishes.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use actix::prelude::*;
use futures_util::stream;
use smarthost_proto::reply::{EnhancedStatus, Reply};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

use crate::session::{self, SessionEnv};

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

/// Sent by a session's guard when the session ends.
#[derive(Message)]
#[rtype(result = "()")]
struct SessionEnded {
    ip: IpAddr,
}

/// Why a connection was turned away.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    NodeFull,
    AddressFull,
}

/// The node-wide and per-address connection counts.
#[derive(Debug)]
pub struct ConnectionLimits {
    max_total: usize,
    max_per_ip: usize,
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

impl ConnectionLimits {
    pub fn new(max_total: usize, max_per_ip: usize) -> Self {
        ConnectionLimits {
            max_total,
            max_per_ip,
            total: 0,
            per_ip: HashMap::new(),
        }
    }

    /// Counts a new connection from `ip`, or says why it may not open.
    pub fn admit(&mut self, ip: IpAddr) -> Result<(), Refusal> {
        if self.total >= self.max_total {
            return Err(Refusal::NodeFull);
        }
        let count = self.per_ip.entry(ip).or_insert(0);
        if *count >= self.max_per_ip {
            return Err(Refusal::AddressFull);
        }
        *count += 1;
        self.total += 1;
        Ok(())
    }

    pub fn release(&mut self, ip: IpAddr) {
        if let Some(count) = self.per_ip.get_mut(&ip) {
            *count -= 1;
            if *count == 0 {
                self.per_ip.remove(&ip);
            }
            self.total -= 1;
        }
    }

    pub fn total(&self) -> usize {
        self.total
    }
}

pub struct Listener {
    sockets: Vec<TcpListener>,
    accepting: Vec<SpawnHandle>,
    limits: ConnectionLimits,
    env: Arc<SessionEnv>,
    shutdown: watch::Sender<bool>,
    drain_waiters: Vec<oneshot::Sender<()>>,
}

impl Listener {
    /// Binds every address first, so a busy port is an error at start-up.
    pub async fn bind(
        addresses: &[SocketAddr],
        limits: ConnectionLimits,
        env: Arc<SessionEnv>,
    ) -> io::Result<Listener> {
        let mut sockets = Vec::with_capacity(addresses.len());
        for address in addresses {
            let socket = TcpListener::bind(address).await.map_err(|e| {
                io::Error::new(e.kind(), format!("cannot listen on {address}: {e}"))
            })?;
            sockets.push(socket);
        }
        Ok(Listener {
            sockets,
            accepting: Vec::new(),
            limits,
            env,
            shutdown: watch::channel(false).0,
            drain_waiters: Vec::new(),
        })
    }

    fn refuse(&self, mut socket: TcpStream, refusal: Refusal) {
        let text = match refusal {
            Refusal::NodeFull => "Too many connections, try again later",
            Refusal::AddressFull => "Too many connections from your address, try again later",
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
        if self.limits.total() == 0 {
            for waiter in self.drain_waiters.drain(..) {
                let _ = waiter.send(());
            }
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
            let accepted = stream::unfold(socket, |socket| async move {
                let next = socket.accept().await;
                Some((next, socket))
            });
            self.accepting.push(ctx.add_stream(accepted));
        }
    }
}

impl StreamHandler<io::Result<(TcpStream, SocketAddr)>> for Listener {
    /// A new connection: admit it under the limits or answer 421 and close.
    fn handle(&mut self, item: io::Result<(TcpStream, SocketAddr)>, ctx: &mut Self::Context) {
        let (socket, peer) = match item {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of descriptors and the like: log, keep accepting.
                tracing::warn!(%error, "accept failed");
                return;
            }
        };
        let ip = peer.ip().to_canonical();
        if let Err(refusal) = self.limits.admit(ip) {
            tracing::info!(%peer, ?refusal, "connection refused");
            self.refuse(socket, refusal);
            return;
        }
        let guard = SessionGuard {
            listener: ctx.address(),
            ip,
        };
        let env = self.env.clone();
        let shutdown = self.shutdown.subscribe();
        actix::spawn(async move {
            let _guard = guard;
            session::run(socket, peer, env, shutdown).await;
        });
    }

    fn finished(&mut self, _ctx: &mut Self::Context) {}
}

/// Tells the listener that its session ended, whichever way it ended.
struct SessionGuard {
    listener: Addr<Listener>,
    ip: IpAddr,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.listener.do_send(SessionEnded { ip: self.ip });
    }
}

impl Handler<SessionEnded> for Listener {
    type Result = ();

    fn handle(&mut self, msg: SessionEnded, _ctx: &mut Self::Context) {
        self.limits.release(msg.ip);
        self.wake_drain_waiters();
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
        tracing::info!(open_sessions = self.limits.total(), "stopped accepting");
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
        self.limits.total()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_count_per_node_and_per_address() {
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let mut limits = ConnectionLimits::new(3, 2);
        assert_eq!(limits.admit(a), Ok(()));
        assert_eq!(limits.admit(a), Ok(()));
        assert_eq!(limits.admit(a), Err(Refusal::AddressFull));
        assert_eq!(limits.admit(b), Ok(()));
        assert_eq!(limits.admit(b), Err(Refusal::NodeFull));
        limits.release(a);
        assert_eq!(limits.total(), 2);
        assert_eq!(limits.admit(b), Ok(()));
        assert_eq!(limits.admit(b), Err(Refusal::NodeFull));
    }

    #[test]
    fn releasing_an_unknown_address_changes_nothing() {
        let mut limits = ConnectionLimits::new(1, 1);
        limits.release("127.0.0.9".parse().unwrap());
        assert_eq!(limits.total(), 0);
        assert_eq!(limits.admit("127.0.0.9".parse().unwrap()), Ok(()));
    }
}
