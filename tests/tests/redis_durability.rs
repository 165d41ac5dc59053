//! The Redis settings that make a `250` durable are guarded while the node
//! runs: the real binary on a real `redis-server`, whose settings are
//! changed with `CONFIG SET` under it.

use std::process::Command;
use std::time::{Duration, Instant};

use smarthost_testkit::redis::{command, RedisServer};
use smarthost_tests::scenario::{dot_stuff, message, start_with_env, Setup};
use smarthost_tests::smarthost_bin;
use smarthost_tests::smtp::Client;

/// The node re-reads the settings every 5 s; a change shows within this.
const NOTICED: Duration = Duration::from_secs(20);

/// A relay on `redis` that delivers nowhere (mail stays queued).
fn node(redis: &RedisServer, extra_env: &[(&str, &str)]) -> Setup {
    let url = redis.url();
    let mut env = vec![
        ("SMARTHOST__QUEUE__BACKEND", "redis"),
        ("SMARTHOST__QUEUE__REDIS_URL", url.as_str()),
        ("SMARTHOST__QUEUE__REDIS_RESPONSE_TIMEOUT", "2s"),
        ("SMARTHOST__NODE__ID", "node-a"),
    ];
    env.extend_from_slice(extra_env);
    start_with_env(
        tempfile::tempdir().unwrap(),
        "smart_host = \"[127.0.0.1]:9\"",
        "",
        &env,
    )
}

/// Submits one message; returns the reply to the final dot (a refusal
/// must be `451 4.3.0`).
fn submit(setup: &Setup, subject: &str) -> u16 {
    let (mut c, greeting) = Client::connect(setup.relay.smtp);
    assert_eq!(greeting.code, 220);
    c.expect("EHLO app.example", 250);
    let text = message("user@example.org", subject, "Hello.\r\n");
    let reply = c.send_message("app@sender.test", &["user@example.org"], &dot_stuff(&text));
    if reply.code != 250 {
        assert_eq!(
            (reply.code, reply.status()),
            (451, Some("4.3.0")),
            "{reply:?}"
        );
    }
    let _ = c.cmd("QUIT");
    reply.code
}

/// Submits until the reply is `code`, within [`NOTICED`].
fn submit_until(setup: &Setup, code: u16, what: &str) {
    let deadline = Instant::now() + NOTICED;
    let mut n = 0;
    while submit(setup, &format!("{what} {n}")) != code {
        n += 1;
        assert!(
            Instant::now() < deadline,
            "{what}: no {code} within {NOTICED:?}\n{}",
            setup.relay.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn config_set(redis: &RedisServer, name: &str, value: &str) {
    assert_eq!(
        command(redis.port(), &["CONFIG", "SET", name, value]).as_deref(),
        Some("+OK")
    );
}

#[test]
fn an_eviction_policy_set_under_a_running_node_refuses_mail_until_it_is_undone() {
    let redis = RedisServer::start();
    let setup = node(&redis, &[]);
    assert_eq!(submit(&setup, "before"), 250);

    config_set(&redis, "maxmemory-policy", "allkeys-lru");
    submit_until(&setup, 451, "while evicting");
    assert!(
        setup
            .relay
            .log()
            .contains("maxmemory-policy is allkeys-lru"),
        "{}",
        setup.relay.log()
    );
    config_set(&redis, "maxmemory-policy", "noeviction");
    submit_until(&setup, 250, "after");
}

#[test]
fn a_weaker_appendfsync_refuses_mail_until_it_is_restored() {
    let redis = RedisServer::start();
    let setup = node(&redis, &[]);
    assert_eq!(submit(&setup, "before"), 250);

    config_set(&redis, "appendfsync", "everysec");
    submit_until(&setup, 451, "while everysec");
    let log = setup.relay.log();
    assert_eq!(
        log.matches("refusing new mail").count(),
        1,
        "logged once per change:\n{log}"
    );
    config_set(&redis, "appendfsync", "always");
    submit_until(&setup, 250, "after");
    assert!(setup.relay.log().contains("accepting new mail"));
}

/// Runs `smarthost run` on `redis` with `env` until it exits (bounded);
/// returns its status and log.
fn run_to_exit(redis: &RedisServer, env: &[(&str, &str)]) -> (std::process::ExitStatus, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("smarthost.toml");
    let free = smarthost_tests::relay::free_port;
    std::fs::write(
        &config,
        format!(
            "[smtp]\nlisten = [\"127.0.0.1:{}\"]\n\n[admin]\nlisten = \"127.0.0.1:{}\"\n\n\
             [queue]\nbackend = \"redis\"\nredis_url = \"{}\"\npath = {:?}\n",
            free(),
            free(),
            redis.url(),
            dir.path().join("spool").display().to_string()
        ),
    )
    .unwrap();
    let mut child = Command::new(smarthost_bin())
        .arg("run")
        .arg("--config")
        .arg(&config)
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start smarthost");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            let log = String::from_utf8_lossy(&out.stderr).into_owned()
                + &String::from_utf8_lossy(&out.stdout);
            return (out.status, log);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "smarthost still runs after 20 s:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_node_refuses_to_start_on_an_evicting_redis_or_without_a_required_fsync() {
    let lru = RedisServer::start_with(&["--maxmemory-policy", "volatile-lru"]);
    let (status, log) = run_to_exit(&lru, &[]);
    assert!(!status.success());
    assert!(log.contains("maxmemory-policy is volatile-lru"), "{log}");

    let everysec = RedisServer::start_with(&["--appendfsync", "everysec"]);
    let (status, log) = run_to_exit(
        &everysec,
        &[("SMARTHOST__QUEUE__REDIS_REQUIRE_FSYNC", "true")],
    );
    assert!(!status.success());
    assert!(log.contains("queue.redis_require_fsync"), "{log}");
}
