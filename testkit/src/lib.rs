//! Helpers for the tests of the smarthost crates; never part of a release.
//!
//! - [`redis`]: a real `redis-server` in its own process on a free loopback
//!   port, with its own data directory, that a test can kill, pause, resume
//!   and restart. Tests of the Redis spool and of the coordinator use it;
//!   [`redis::RedisCluster`] joins three into a Redis Cluster. With
//!   `SMARTHOST_TEST_REDIS=container` the server runs in a Docker
//!   container instead (`container.rs`, through testcontainers).

pub mod container;
pub mod redis;

/// A free port on loopback: nothing listens on it once this returns, so
/// a server started next can bind it (unless another process takes it
/// first).
///
/// The port is drawn below the kernel's ephemeral range, which outgoing
/// connections take their local ports from: a server a test kills and
/// starts again on the same port would otherwise find it taken by some
/// other test's client in between.
pub fn free_port() -> u16 {
    free_port_on(std::net::Ipv4Addr::LOCALHOST)
}

/// [`free_port`] on the given address.
pub fn free_port_on(ip: std::net::Ipv4Addr) -> u16 {
    use rand::Rng;
    // Ports handed out before in this process: free again until their
    // server starts, so drawing one twice (say, for a relay's SMTP and
    // admin listeners) would give both servers the same port.
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let below = ephemeral_low().saturating_sub(1);
    // Room for a Redis Cluster bus port at port + 10000 as well.
    let (low, high) = (10_000u16, below.saturating_sub(10_000));
    if high > low {
        let mut rng = rand::rng();
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        for _ in 0..200 {
            let port = rng.random_range(low..=high);
            if !given.contains(&port) && std::net::TcpListener::bind((ip, port)).is_ok() {
                given.insert(port);
                return port;
            }
        }
    }
    std::net::TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .unwrap_or_else(|e| panic!("no free port on {ip}: {e}"))
        .port()
}

/// The first port of the kernel's ephemeral range (Linux's default if it
/// cannot be read).
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// A counter of what `total` grew by since the previous call (the first
/// call: since this one), for tests that count requests per operation.
pub fn since_last(total: impl Fn() -> u64) -> impl FnMut() -> u64 {
    let mut last = total();
    move || {
        let now = total();
        let grown = now - last;
        last = now;
        grown
    }
}
