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
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
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
