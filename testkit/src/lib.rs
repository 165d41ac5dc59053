//! Helpers for the tests of the smarthost crates; never part of a release.
//!
//! - [`redis`]: a real `redis-server` in its own process on a free loopback
//!   port, with its own data directory, that a test can kill, pause, resume
//!   and restart. Tests of the Redis spool and of the coordinator use it;
//!   [`redis::RedisCluster`] joins three into a Redis Cluster.

pub mod redis;
