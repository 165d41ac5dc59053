//! Hostile clients against the logins of the real binary, over real
//! sockets: floods of AUTH and of admin tokens must keep the node's memory
//! bounded (`smtp.max_password_checks`, `admin.max_token_checks`), and
//! guessing must end in a block, per address and per user name, without
//! locking the real user out (`docs/security.md`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Barrier};
use std::time::Instant;

use smarthost_testkit::redis::RedisServer;
use smarthost_tests::ca::TestCa;
use smarthost_tests::http;
use smarthost_tests::relay::Relay;
use smarthost_tests::smtp::{Client, Reply};

const PASSWORD: &str = "s3cret";

/// `[[smtp.users]]` entries with the hash `smarthost hash-password` writes
/// (argon2id, m=19456 KiB): the memory the bound is about.
fn users(names: &[&str]) -> String {
    let hash = smarthost_node::auth::hash_password(PASSWORD);
    names
        .iter()
        .map(|name| format!("[[smtp.users]]\nname = \"{name}\"\npassword_hash = \"{hash}\"\n"))
        .collect()
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn auth_plain(user: &str, password: &str) -> String {
    format!(
        "AUTH PLAIN {}",
        base64(format!("\0{user}\0{password}").as_bytes())
    )
}

fn loopback(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// A session from `source` after EHLO, without TLS (the relays of the
/// guessing tests allow AUTH in clear to keep the tests short).
fn session_from(source: IpAddr, relay: SocketAddr) -> Client {
    let (mut client, greeting) = Client::connect_from(source, relay);
    assert_eq!(greeting.code, 220);
    client.expect("EHLO attacker.test", 250);
    client
}

fn assert_reply(reply: &Reply, code: u16, status: &str, text: &str) {
    assert_eq!(reply.code, code, "{reply:?}");
    assert_eq!(reply.status(), Some(status), "{reply:?}");
    assert!(reply.text.contains(text), "{reply:?} should say {text:?}");
}

/// `VmRSS` and `VmHWM` (the peak) of a process, in KiB.
/// The right password from a blocked address: `421 4.7.0`, no check.
fn assert_address_blocked(client: &mut Client) {
    let reply = client.cmd(&auth_plain("app", PASSWORD));
    assert_reply(
        &reply,
        421,
        "4.7.0",
        "Too many failed logins from your address",
    );
}

fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {status}"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn log_lines_with(relay: &Relay, text: &str) -> usize {
    relay.log().lines().filter(|l| l.contains(text)).count()
}

/// The peak RSS allowed during the floods: the checks' own memory
/// (`checks × 19 MiB`) plus 100 MiB for the rest of the process and the
/// connections. Without the bound the same flood took one GiB and more.
fn bound_kib(checks: u64) -> u64 {
    checks * 19 * 1024 + 100 * 1024
}

#[test]
fn an_auth_flood_over_starttls_keeps_memory_bounded_and_the_node_answers() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::create(dir.path());
    // No block: every AUTH reaches the bound on checks.
    let relay = Relay::start(
        "relay_networks = []\nmax_connections_per_ip = 500\nmax_password_checks = 4\n\
         password_check_queue = 32\nauth_address_max_failures = 0\nauth_user_max_failures = 0\n\
         auth_failure_delay = \"10ms\"",
        &format!("{}{}", ca.smtp_tls_section(), users(&["app"])),
    );
    let pid = relay.pid();
    let (before, _) = memory_kib(pid);
    let clients = 100;
    let barrier = Arc::new(Barrier::new(clients));
    let tls = ca.client_config();
    let started = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|i| {
            let (barrier, tls, addr) = (barrier.clone(), tls.clone(), relay.smtp);
            std::thread::spawn(move || {
                let (mut client, _) = Client::connect(addr);
                client.expect("EHLO flood.test", 250);
                client.expect("STARTTLS", 220);
                let mut client = client.start_tls(tls);
                client.expect("EHLO flood.test", 250);
                barrier.wait();
                client.cmd(&auth_plain("app", &format!("guess-{i}")))
            })
        })
        .collect();
    let replies: Vec<Reply> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let elapsed = started.elapsed();
    let (after, peak) = memory_kib(pid);
    let refused = replies.iter().filter(|r| r.code == 454).count();
    let checked = replies.iter().filter(|r| r.code == 535).count();
    eprintln!(
        "{clients} AUTH over STARTTLS in {elapsed:?}: {checked} checked (535), {refused} refused \
         (454); RSS {before} KiB before, {after} KiB after, peak {peak} KiB"
    );
    for reply in &replies {
        match reply.code {
            535 => assert_reply(reply, 535, "5.7.8", "credentials invalid"),
            _ => assert_reply(reply, 454, "4.7.0", "Too many logins in progress"),
        }
    }
    assert!(
        checked >= 36,
        "4 slots and 32 places in the queue: {checked}"
    );
    assert!(
        peak < bound_kib(4),
        "peak RSS {peak} KiB, bound {} KiB",
        bound_kib(4)
    );

    // The node still answers, and the real user logs in.
    let (client, _) = Client::connect(relay.smtp);
    let mut client = {
        let mut c = client;
        c.expect("EHLO app.test", 250);
        c.expect("STARTTLS", 220);
        c.start_tls(tls)
    };
    client.expect("EHLO app.test", 250);
    client.expect(&auth_plain("app", PASSWORD), 235);
}

#[test]
fn guessing_from_one_address_is_blocked_and_the_user_still_logs_in() {
    let relay = Relay::start(
        "relay_networks = []\nallow_plaintext_auth = true\nauth_address_max_failures = 5\n\
         auth_failure_delay = \"10ms\"\nauth_block_duration = \"1m\"",
        &users(&["app"]),
    );
    let attacker = loopback(2);
    let mut client = session_from(attacker, relay.smtp);
    for i in 1..=5 {
        let reply = client.cmd(&auth_plain("app", &format!("guess-{i}")));
        assert_reply(&reply, 535, "5.7.8", "credentials invalid");
    }
    // Blocked: no check runs, the session ends.
    let reply = client.cmd(&auth_plain("app", "guess-6"));
    assert_reply(
        &reply,
        421,
        "4.7.0",
        "Too many failed logins from your address",
    );
    assert!(client.is_closed());
    // Even the right password: the address is blocked, not the guess.
    let mut client = session_from(attacker, relay.smtp);
    assert_address_blocked(&mut client);

    // The real user, from its own address, is not affected.
    let mut client = session_from(loopback(1), relay.smtp);
    client.expect(&auth_plain("app", PASSWORD), 235);

    // The block was logged once, however many attempts it refused.
    for _ in 0..3 {
        let mut client = session_from(attacker, relay.smtp);
        assert_eq!(client.cmd(&auth_plain("app", "again")).code, 421);
    }
    assert_eq!(log_lines_with(&relay, "address blocked"), 1);
    assert_eq!(log_lines_with(&relay, "authentication failed"), 5);
}

#[test]
fn guessing_one_user_from_many_addresses_blocks_the_name_but_not_its_usual_address() {
    let relay = Relay::start(
        "relay_networks = []\nallow_plaintext_auth = true\nauth_address_max_failures = 10\n\
         auth_user_max_failures = 4\nauth_failure_delay = \"10ms\"\nauth_block_duration = \"1m\"",
        &users(&["app", "other"]),
    );
    // The real client of `app` logs in from 127.0.0.1.
    session_from(loopback(1), relay.smtp).expect(&auth_plain("app", PASSWORD), 235);

    // Four attacker addresses, one guess each: the fourth blocks the name.
    for last in 2..=5 {
        let mut client = session_from(loopback(last), relay.smtp);
        let reply = client.cmd(&auth_plain("app", &format!("guess-{last}")));
        assert_reply(&reply, 535, "5.7.8", "credentials invalid");
    }
    // A new address: the name is blocked, even with the right password;
    // the session goes on, and another user logs in.
    let mut client = session_from(loopback(6), relay.smtp);
    let reply = client.cmd(&auth_plain("app", PASSWORD));
    assert_reply(&reply, 454, "4.7.0", "Too many failed logins for this user");
    client.expect(&auth_plain("other", PASSWORD), 235);

    // The real client's address logged in before: it still gets in.
    session_from(loopback(1), relay.smtp).expect(&auth_plain("app", PASSWORD), 235);
    assert_eq!(log_lines_with(&relay, "user name blocked"), 1);
}

fn admin_relay(extra: &str, env: &[(&str, &str)]) -> (Relay, String) {
    let token = "the-operator-token";
    let hash = smarthost_node::auth::hash_password(token);
    let relay = Relay::start_with_env(
        "",
        &format!(
            "[admin]\nmax_token_checks = 2\ntoken_max_failures = 5\n\
             token_block_duration = \"1m\"\n{extra}\n[[admin.operators]]\nname = \"ops\"\n\
             token_hash = \"{hash}\"\nrole = \"admin\"\n"
        ),
        env,
    );
    (relay, token.to_string())
}

#[test]
fn a_flood_of_wrong_admin_tokens_is_bounded_and_throttled() {
    let (relay, token) = admin_relay("", &[]);
    let admin = relay.admin_addr();
    let pid = relay.pid();
    let (before, _) = memory_kib(pid);
    let requests = 40;
    let barrier = Arc::new(Barrier::new(requests));
    let threads: Vec<_> = (0..requests)
        .map(|i| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                http::get(admin, "/api/v1/queue", Some(&format!("wrong-{i}"))).status
            })
        })
        .collect();
    let statuses: Vec<u16> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let (after, peak) = memory_kib(pid);
    let count = |code| statuses.iter().filter(|s| **s == code).count();
    eprintln!(
        "{requests} wrong tokens at once: {} × 401, {} × 503, {} × 429; RSS {before} KiB before, \
         {after} KiB after, peak {peak} KiB",
        count(401),
        count(503),
        count(429)
    );
    assert_eq!(
        count(401) + count(503) + count(429),
        requests,
        "{statuses:?}"
    );
    assert!(count(401) >= 5, "{statuses:?}");
    assert!(
        count(401) <= 2 + 16,
        "at most the slots and the queue are checked: {statuses:?}"
    );
    assert!(
        peak < bound_kib(2),
        "peak RSS {peak} KiB, bound {} KiB",
        bound_kib(2)
    );

    // The address is blocked now: even the right token waits.
    let blocked = http::get(admin, "/api/v1/queue", Some("wrong-again"));
    assert_eq!(blocked.status, 429, "{}", blocked.body);
    let retry: u64 = blocked.header("Retry-After").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "Retry-After: {retry}");
    assert!(
        blocked.body.contains("too many wrong tokens"),
        "{}",
        blocked.body
    );
    assert_eq!(http::get(admin, "/api/v1/queue", Some(&token)).status, 429);
    // From another address the operator gets in.
    let other = http::request_from(loopback(2), admin, "GET", "/api/v1/queue", Some(&token));
    assert_eq!(other.status, 200, "{}", other.body);
    assert_eq!(log_lines_with(&relay, "address blocked"), 1);
}

#[test]
fn on_redis_a_block_is_shared_by_the_nodes() {
    let redis = RedisServer::start();
    let url = redis.url();
    let env = |id: &'static str, url: &str| {
        vec![
            ("SMARTHOST__QUEUE__BACKEND".to_string(), "redis".to_string()),
            ("SMARTHOST__QUEUE__REDIS_URL".to_string(), url.to_string()),
            ("SMARTHOST__NODE__ID".to_string(), id.to_string()),
        ]
    };
    let start = |id: &'static str| {
        let env = env(id, &url);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Relay::start_with_env(
            "relay_networks = []\nallow_plaintext_auth = true\nauth_address_max_failures = 3\n\
             auth_failure_delay = \"10ms\"\nauth_block_duration = \"1m\"",
            &users(&["app"]),
            &env,
        )
    };
    let first = start("node-a");
    let second = start("node-b");
    let attacker = loopback(3);
    let mut client = session_from(attacker, first.smtp);
    for i in 1..=3 {
        let reply = client.cmd(&auth_plain("app", &format!("guess-{i}")));
        assert_reply(&reply, 535, "5.7.8", "credentials invalid");
    }
    // The other node refuses the address at once, without a check.
    let mut client = session_from(attacker, second.smtp);
    assert_address_blocked(&mut client);
    assert_eq!(log_lines_with(&second, "authentication failed"), 0);
    // Both let the real user in from its own address.
    session_from(loopback(1), first.smtp).expect(&auth_plain("app", PASSWORD), 235);
    session_from(loopback(1), second.smtp).expect(&auth_plain("app", PASSWORD), 235);
}
