//! The oracle-checked workload on every backend, with faults: mixed mail
//! (1–6 recipients over 40 domains, 1 KB to 3 MB, 8-bit and UTF-8, some
//! from `<>`) to scripted receivers, and the check that every recipient
//! answered `250` was delivered or reported failed, once. Each test has a
//! fixed seed; `ORACLE_SEED` replays another, `ORACLE_SECONDS` and
//! `ORACLE_MESSAGES` make a run longer. See `docs/reliability.md`.

use std::path::PathBuf;

use smarthost_tests::oracle::faults::FaultKind::{self, *};
use smarthost_tests::oracle::{clock_seed, run, Backend, Plan};

fn plan(name: &str, backend: Backend, seed: u64, faults: &[FaultKind]) -> Plan {
    let mut plan = Plan::new(name, backend, seed, faults);
    plan.artifacts = Some(PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("oracle"));
    plan
}

#[test]
fn local_spool() {
    run(&plan("local_spool", Backend::Local, 1, &[]));
}

#[test]
fn local_spool_with_faults() {
    run(&plan(
        "local_spool_with_faults",
        Backend::Local,
        2,
        &[KillNode, CutReceivers, DiskFull],
    ));
}

#[test]
fn one_redis_one_node_with_faults() {
    run(&plan(
        "one_redis_one_node_with_faults",
        Backend::Redis { nodes: 1 },
        3,
        &[KillNode, RestartRedis, CutRedis, CutReceivers],
    ));
}

#[test]
fn one_redis_three_nodes_with_faults() {
    run(&plan(
        "one_redis_three_nodes_with_faults",
        Backend::Redis { nodes: 3 },
        4,
        &[
            KillNode,
            KillCoordinator,
            RestartRedis,
            CutRedis,
            CutReceivers,
        ],
    ));
}

#[test]
fn redis_cluster_one_node() {
    run(&plan(
        "redis_cluster_one_node",
        Backend::Cluster { nodes: 1 },
        5,
        &[],
    ));
}

#[test]
fn redis_cluster_three_nodes_with_faults() {
    run(&plan(
        "redis_cluster_three_nodes_with_faults",
        Backend::Cluster { nodes: 3 },
        6,
        &[
            KillNode,
            KillCoordinator,
            RestartRedis,
            CutRedis,
            CutReceivers,
        ],
    ));
}

/// One more run with a seed from the clock, printed at the start: over
/// many CI runs this explores seeds the fixed ones do not.
#[test]
fn clock_seed_on_one_redis_with_faults() {
    run(&plan(
        "clock_seed_on_one_redis_with_faults",
        Backend::Redis { nodes: 3 },
        clock_seed(),
        &[
            KillNode,
            KillCoordinator,
            RestartRedis,
            CutRedis,
            CutReceivers,
        ],
    ));
}
