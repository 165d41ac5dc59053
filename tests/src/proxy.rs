//! A TCP proxy that a test can cut: the network between one node and Redis
//! failing, while both ends keep running. [`RedisLink`]: one process's
//! link to one Redis server or to every primary of a Redis Cluster, cut
//! and restored as one. A proxy may also hold every byte for a while each
//! way ([`Proxy::with_latency`]): a Redis whose round trips are slow.

use std::io;
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

struct Shared {
    target: SocketAddr,
    /// How long each byte is held before it is passed on, each way.
    latency: Duration,
    cut: AtomicBool,
    stopping: AtomicBool,
    /// Connections forwarded to the target so far.
    forwarded: AtomicUsize,
    /// Both sockets of every open pair, to cut them.
    open: Mutex<Vec<TcpStream>>,
}

/// Forwards 127.0.0.1:<port> (or an address of the test's choosing) to a
/// target until it is cut.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accepting: Option<thread::JoinHandle<()>>,
}

impl Proxy {
    /// A proxy on a free port of 127.0.0.1.
    pub fn start(target: SocketAddr) -> Proxy {
        Proxy::start_on(([127, 0, 0, 1], 0).into(), target)
    }

    /// A proxy listening on `listen` (port 0: a free one).
    pub fn start_on(listen: SocketAddr, target: SocketAddr) -> Proxy {
        Proxy::start_with(listen, target, Duration::ZERO)
    }

    /// A proxy on a free port of 127.0.0.1 that passes bytes on `latency`
    /// after they came, each way: a round trip through it takes twice
    /// that, however many requests share it.
    pub fn with_latency(target: SocketAddr, latency: Duration) -> Proxy {
        Proxy::start_with(([127, 0, 0, 1], 0).into(), target, latency)
    }

    fn start_with(listen: SocketAddr, target: SocketAddr, latency: Duration) -> Proxy {
        let listener =
            TcpListener::bind(listen).unwrap_or_else(|e| panic!("bind the proxy to {listen}: {e}"));
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            target,
            latency,
            cut: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            forwarded: AtomicUsize::new(0),
            open: Mutex::new(Vec::new()),
        });
        let accepting = {
            let shared = shared.clone();
            thread::spawn(move || accept_loop(listener, shared))
        };
        Proxy {
            addr,
            shared,
            accepting: Some(accepting),
        }
    }

    /// Where clients connect instead of the target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops every open connection and every new one until [`Proxy::restore`].
    pub fn cut(&self) {
        self.shared.cut.store(true, Ordering::SeqCst);
        for socket in self.shared.open.lock().unwrap().drain(..) {
            let _ = socket.shutdown(Shutdown::Both);
        }
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.shared.cut.store(false, Ordering::SeqCst);
    }

    /// How many connections it has forwarded to the target so far.
    pub fn forwarded(&self) -> usize {
        self.shared.forwarded.load(Ordering::SeqCst)
    }
}

/// One process's link to Redis, through proxies of its own: to one server,
/// or to every primary of a Redis Cluster started with
/// `RedisCluster::start_without_endpoints`. Such a cluster tells clients
/// no host, only ports, so a client seeded at `ip:<port of a primary>`
/// reaches every primary at `ip:<its port>`: the link listens there, one
/// proxy per primary, forwarding to `127.0.0.1:<the same port>` where the
/// servers listen. Each process whose link may be cut alone gets its own
/// loopback `ip` (127.0.0.2, 127.0.0.3, …; Linux routes all of 127/8).
pub struct RedisLink {
    proxies: Vec<Proxy>,
    /// `redis://<proxy>/` of each proxy.
    seeds: Vec<String>,
}

impl RedisLink {
    /// A link to the one server on `127.0.0.1:port`.
    pub fn server(port: u16) -> RedisLink {
        RedisLink::of(vec![Proxy::start(([127, 0, 0, 1], port).into())])
    }

    /// A link from the client seeded at `ip` to the cluster's primaries on
    /// `127.0.0.1:ports`; `ip` must not be 127.0.0.1, where the servers
    /// listen on the same ports.
    pub fn cluster(ip: Ipv4Addr, ports: &[u16]) -> RedisLink {
        assert_ne!(ip, Ipv4Addr::LOCALHOST, "the servers listen there");
        let proxies = ports
            .iter()
            .map(|&port| Proxy::start_on((ip, port).into(), ([127, 0, 0, 1], port).into()))
            .collect();
        RedisLink::of(proxies)
    }

    fn of(proxies: Vec<Proxy>) -> RedisLink {
        let seeds = proxies
            .iter()
            .map(|p| format!("redis://{}/", p.addr()))
            .collect();
        RedisLink { proxies, seeds }
    }

    /// What the process is given as `queue.redis_url`: the server's
    /// proxy, or every primary's proxy as seeds.
    pub fn url(&self) -> String {
        self.seeds.join(",")
    }

    /// The URL of the first proxy alone: a single seed.
    pub fn seed(&self) -> &str {
        &self.seeds[0]
    }

    /// Cuts the link to every server.
    pub fn cut(&self) {
        self.proxies.iter().for_each(Proxy::cut);
    }

    pub fn restore(&self) {
        self.proxies.iter().for_each(Proxy::restore);
    }

    /// The proxies, one per server in the order of the ports given.
    pub fn proxies(&self) -> &[Proxy] {
        &self.proxies
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.cut();
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(handle) = self.accepting.take() {
            let _ = handle.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for client in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else { continue };
        if shared.cut.load(Ordering::SeqCst) {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        let Ok(server) = TcpStream::connect_timeout(&shared.target, Duration::from_secs(5)) else {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        shared.forwarded.fetch_add(1, Ordering::SeqCst);
        if let Err(error) = pipe(client, server, &shared) {
            eprintln!("proxy: cannot forward a connection: {error}");
        }
    }
}

/// Copies both ways on two threads (four with a latency); either side
/// closing closes both.
fn pipe(client: TcpStream, server: TcpStream, shared: &Shared) -> io::Result<()> {
    {
        let mut open = shared.open.lock().unwrap();
        open.push(client.try_clone()?);
        open.push(server.try_clone()?);
    }
    let latency = shared.latency;
    let copy = move |from: TcpStream, to: TcpStream| {
        thread::spawn(move || {
            if latency.is_zero() {
                let (mut from, mut to) = (&from, &to);
                let _ = io::copy(&mut from, &mut to);
            } else {
                copy_late(&from, &to, latency);
            }
            let _ = to.shutdown(Shutdown::Both);
            let _ = from.shutdown(Shutdown::Both);
        });
    };
    copy(client.try_clone()?, server.try_clone()?);
    copy(server, client);
    Ok(())
}

/// Copies `from` to `to`, each read passed on `latency` after it came: a
/// reader stamps what it reads, a writer waits for each stamp, so that
/// reads that come close together also leave close together.
fn copy_late(from: &TcpStream, to: &TcpStream, latency: Duration) {
    let (tx, rx) = std::sync::mpsc::channel::<(std::time::Instant, Vec<u8>)>();
    let Ok(mut writer) = to.try_clone() else {
        return;
    };
    let writing = thread::spawn(move || {
        for (due, bytes) in rx {
            thread::sleep(due.saturating_duration_since(std::time::Instant::now()));
            if io::Write::write_all(&mut writer, &bytes).is_err() {
                return;
            }
        }
    });
    let mut buf = vec![0; 64 * 1024];
    let mut reader = from;
    while let Ok(n) = io::Read::read(&mut reader, &mut buf) {
        if n == 0
            || tx
                .send((std::time::Instant::now() + latency, buf[..n].to_vec()))
                .is_err()
        {
            break;
        }
    }
    drop(tx);
    let _ = writing.join();
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    /// An echo server on loopback.
    fn echo() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || {
            for socket in listener.incoming().take(16) {
                let Ok(mut socket) = socket else { continue };
                thread::spawn(move || {
                    let mut reader = socket.try_clone().unwrap();
                    let _ = io::copy(&mut reader, &mut socket);
                });
            }
        });
        addr
    }

    fn round_trip(addr: SocketAddr) -> io::Result<Vec<u8>> {
        let mut socket = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        socket.set_read_timeout(Some(Duration::from_secs(2)))?;
        socket.write_all(b"ping")?;
        let mut answer = [0u8; 4];
        socket.read_exact(&mut answer)?;
        Ok(answer.to_vec())
    }

    #[test]
    fn forwards_until_cut_and_again_after_restore() {
        let proxy = Proxy::start(echo());
        assert_eq!(round_trip(proxy.addr()).unwrap(), b"ping");

        let mut open = TcpStream::connect(proxy.addr()).unwrap();
        open.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        open.write_all(b"x").unwrap();
        let mut one = [0u8; 1];
        open.read_exact(&mut one).unwrap();

        proxy.cut();
        // The open connection is closed, and new ones get nothing through.
        let mut rest = Vec::new();
        assert!(matches!(open.read_to_end(&mut rest), Ok(0) | Err(_)));
        assert!(round_trip(proxy.addr()).is_err());

        proxy.restore();
        assert_eq!(round_trip(proxy.addr()).unwrap(), b"ping");
    }
}
