//! `smarthost coordinator` and `smarthost node` on one Redis: exactly one
//! coordinator leads and hands over when it stops; a node heartbeats to the
//! cluster but never leads.

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use smarthost_testkit::redis::RedisServer;
use smarthost_tests::relay::free_port;
use smarthost_tests::smarthost_bin;

struct Process {
    child: Child,
    log: std::path::PathBuf,
}

impl Process {
    fn start(dir: &Path, role: &str, id: &str, redis: &str) -> Process {
        let config = dir.join(format!("{id}.toml"));
        std::fs::write(
            &config,
            format!(
                "[node]\nid = \"{id}\"\nhostname = \"{id}.test\"\n\
                 [smtp]\nlisten = [\"127.0.0.1:{}\"]\n\
                 [queue]\nbackend = \"redis\"\nredis_url = \"{redis}\"\n\
                 [delivery]\ndns_servers = [\"127.0.0.1:{}\"]\nlog_file = {:?}\n\
                 [admin]\nlisten = \"127.0.0.1:{}\"\n\
                 [log]\nformat = \"json\"\n",
                free_port(),
                free_port(),
                dir.join(format!("{id}-delivery.log")).display().to_string(),
                free_port(),
            ),
        )
        .unwrap();
        let log = dir.join(format!("{id}.log"));
        let out = File::create(&log).unwrap();
        let child = Command::new(smarthost_bin())
            .arg(role)
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start smarthost");
        Process { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn leads(&self) -> bool {
        self.log().contains("coordinator: leading")
    }

    fn terminate(&mut self) {
        // SAFETY: kill(2) with a pid we own and a valid signal number.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "did not stop:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits (bounded) until `done` holds.
fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn members(redis: &RedisServer) -> String {
    let output = Command::new("redis-cli")
        .args([
            "-u",
            &redis.url(),
            "ZRANGE",
            "smarthost:{cluster}:nodes",
            "0",
            "-1",
        ])
        .output()
        .expect("run redis-cli");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn one_coordinator_leads_and_hands_over_and_nodes_only_heartbeat() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let first = Process::start(dir.path(), "coordinator", "coord-a", &redis.url());
    let second = Process::start(dir.path(), "coordinator", "coord-b", &redis.url());
    let node = Process::start(dir.path(), "node", "node-1", &redis.url());

    wait_until("a leader", Duration::from_secs(15), || {
        first.leads() || second.leads()
    });
    // Both contend for a while; never both.
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        first.leads() != second.leads(),
        "exactly one leads:\n{}\n{}",
        first.log(),
        second.log()
    );
    wait_until(
        "all three in the membership",
        Duration::from_secs(15),
        || {
            let m = members(&redis);
            ["coord-a", "coord-b", "node-1"]
                .iter()
                .all(|id| m.contains(id))
        },
    );

    // A coordinator serves the admin API too: the cluster as it sees it
    // (from its next membership read on).
    let nodes = || {
        let out = Command::new(smarthost_bin())
            .args(["queue", "nodes", "--config"])
            .arg(dir.path().join("coord-b.toml"))
            .output()
            .expect("run smarthost queue nodes");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    wait_until("the cluster view", Duration::from_secs(10), || {
        nodes().lines().count() == 3
    });
    let text = nodes();
    let leader = if first.leads() { "coord-a" } else { "coord-b" };
    for id in ["coord-a", "coord-b", "node-1"] {
        let line = text
            .lines()
            .find(|l| l.starts_with(id))
            .unwrap_or_else(|| panic!("{id} missing:\n{text}"));
        assert!(line.contains("alive"), "{text}");
        assert_eq!(line.ends_with("leader"), id == leader, "{text}");
    }

    // The leader stops: the other takes over (the lease is released).
    let (mut leader, follower) = if first.leads() {
        (first, second)
    } else {
        (second, first)
    };
    leader.terminate();
    wait_until("a hand-over", Duration::from_secs(15), || follower.leads());
    assert!(!node.leads(), "a node never leads:\n{}", node.log());
}

#[test]
fn a_node_id_runs_once_and_is_free_again_after_a_clean_stop() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut first = Process::start(dir.path(), "node", "node-1", &redis.url());
    wait_until("node-1 in the membership", Duration::from_secs(15), || {
        members(&redis).contains("node-1")
    });

    // A second process under the same id is refused: two would hand each
    // other's deliveries back.
    let second_dir = tempfile::tempdir().unwrap();
    let mut second = Process::start(second_dir.path(), "node", "node-1", &redis.url());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = second.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "not refused:\n{}", second.log());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    assert!(
        second.log().contains("is in use by a running node"),
        "{}",
        second.log()
    );
    assert!(
        first.child.try_wait().unwrap().is_none(),
        "the first runs on"
    );

    // Stopped cleanly, the id is free at once.
    first.terminate();
    let started = Instant::now();
    let third_dir = tempfile::tempdir().unwrap();
    let third = Process::start(third_dir.path(), "node", "node-1", &redis.url());
    wait_until("the new node-1 ready", Duration::from_secs(15), || {
        third.log().contains("smarthost ready")
    });
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "waited {:?}:\n{}",
        started.elapsed(),
        third.log()
    );
    assert!(
        !third.log().contains("waiting until it is dead"),
        "{}",
        third.log()
    );
}
