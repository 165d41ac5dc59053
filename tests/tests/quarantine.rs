//! A record the node cannot read (here: a record version from a newer
//! release) is set aside on the Redis backend instead of stalling its
//! domain, and operators see it in `GET /api/v1/quarantine` and
//! `smarthost queue quarantine`.

use std::process::Command;
use std::time::{Duration, Instant};

use smarthost_testkit::redis::RedisServer;
use smarthost_tests::http;
use smarthost_tests::relay::free_port;
use smarthost_tests::scenario::{dot_stuff, message, start_with_env, Setup};
use smarthost_tests::smtp::{queued_id, Client};

fn submit(setup: &Setup, to: &str, subject: &str) -> String {
    let (mut c, greeting) = Client::connect(setup.relay.smtp);
    assert_eq!(greeting.code, 220);
    c.expect("EHLO app.example", 250);
    let text = message(to, subject, "Hello.\r\n");
    let reply = c.send_message("app@sender.test", &[to], &dot_stuff(&text));
    let id = queued_id(&reply);
    c.expect("QUIT", 221);
    id
}

fn redis_cli(redis: &RedisServer, args: &[&str]) -> String {
    let output = Command::new("redis-cli")
        .arg("-p")
        .arg(redis.port().to_string())
        .args(args)
        .output()
        .expect("redis-cli runs");
    assert!(output.status.success(), "redis-cli {args:?}: {output:?}");
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

#[test]
fn an_unreadable_record_is_quarantined_and_listed_for_operators() {
    let redis = RedisServer::start();
    let url = redis.url();
    // Nothing listens at the smart host: deliveries are retried every
    // second, so the node keeps reading the records.
    let dead = free_port();
    let setup = start_with_env(
        tempfile::tempdir().unwrap(),
        &format!("smart_host = \"[127.0.0.1]:{dead}\""),
        "",
        &[
            ("SMARTHOST__QUEUE__BACKEND", "redis"),
            ("SMARTHOST__QUEUE__REDIS_URL", url.as_str()),
            ("SMARTHOST__QUEUE__RETRY_INTERVALS", "1s"),
        ],
    );
    let bad = submit(&setup, "a@example.org", "bad");
    let good = submit(&setup, "b@example.org", "good");
    // The first byte of a record is its version: 99 is from a release this
    // one does not know.
    let key = format!("smarthost:{{m:{bad}}}:record");
    assert_ne!(
        redis_cli(&redis, &["STRLEN", &key]),
        "0",
        "the record is stored"
    );
    // A deferral rewrites the record, and one under way may overwrite the
    // change: it is made again, while the record is still there, until the
    // node has set the record aside.
    let corrupt = || {
        redis_cli(
            &redis,
            &[
                "EVAL",
                "if redis.call('EXISTS', KEYS[1]) == 1 then \
                 return redis.call('SETRANGE', KEYS[1], 0, 'c') end return 0",
                "1",
                &key,
            ],
        )
    };
    corrupt();

    let deadline = Instant::now() + Duration::from_secs(30);
    let listed = loop {
        let output = setup.relay.cli(&["queue", "quarantine"], &[]);
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "queue quarantine: {text}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        if text.contains(&bad) {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "never quarantined:\n{text}\n{}",
            setup.relay.log()
        );
        std::thread::sleep(Duration::from_millis(200));
        corrupt();
    };
    assert!(listed.contains("version 99"), "{listed}");
    assert!(!listed.contains(&good), "{listed}");

    let json = http::get(setup.relay.admin_addr(), "/api/v1/quarantine", None).json();
    let entries = json.as_array().expect("a list");
    assert_eq!(entries.len(), 1, "{json}");
    assert_eq!(entries[0]["location"], bad.as_str(), "{json}");
    assert!(
        entries[0]["reason"]
            .as_str()
            .unwrap()
            .contains("version 99"),
        "{json}"
    );
    assert!(entries[0]["bytes"].as_u64().unwrap() > 0, "{json}");
    assert!(entries[0]["at_ms"].as_u64().unwrap() > 0, "{json}");
    let printed = setup.relay.cli(&["queue", "quarantine", "--json"], &[]);
    let printed: serde_json::Value = serde_json::from_slice(&printed.stdout).unwrap();
    assert_eq!(
        printed, json,
        "`queue quarantine --json` prints the API's answer"
    );

    // The record is out of the queue; the other message is still there,
    // retried as before.
    assert_eq!(redis_cli(&redis, &["EXISTS", &key]), "0");
    let quarantined = format!("smarthost:{{m:{bad}}}:quarantined");
    assert_eq!(redis_cli(&redis, &["EXISTS", &quarantined]), "1");
    let good_key = format!("smarthost:{{m:{good}}}:record");
    assert_eq!(redis_cli(&redis, &["EXISTS", &good_key]), "1");
    let log = setup.relay.log();
    assert_eq!(
        log.matches("an unreadable message was set aside").count(),
        1,
        "logged once:\n{log}"
    );

    // A replay is refused, with the reason, while the record still
    // cannot be read...
    let quarantine = |args: &[&str]| {
        let mut all = vec!["queue", "quarantine"];
        all.extend_from_slice(args);
        let output = setup.relay.cli(&all, &[]);
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (ok, _, said) = quarantine(&["replay", &bad]);
    assert!(
        !ok && said.contains("409") && said.contains("version 99"),
        "{said}"
    );
    // ...and takes the message back once it reads, as after an upgrade to
    // a release that knows its version (here: the version byte restored).
    let restore_version = "local r = redis.call('HGET', KEYS[1], 'record') \
         redis.call('HSET', KEYS[1], 'record', string.char(1) .. string.sub(r, 2)) return 1";
    assert_eq!(
        redis_cli(&redis, &["EVAL", restore_version, "1", &quarantined]),
        "1"
    );
    let (ok, said, err) = quarantine(&["replay", &bad]);
    assert!(ok, "{said}{err}");
    assert_eq!(
        said,
        format!("{bad}: message {bad} is queued again (1 delivery)\n")
    );
    assert_eq!(redis_cli(&redis, &["EXISTS", &quarantined]), "0");
    assert_eq!(redis_cli(&redis, &["EXISTS", &key]), "1");
    let admin = setup.relay.admin_addr();
    let view = http::get(admin, &format!("/api/v1/messages/{bad}"), None);
    assert_eq!(view.status, 200, "{view:?}");
    assert_eq!(view.json()["recipients"][0]["address"], "a@example.org");
    assert_eq!(quarantine(&[]).1, "quarantine: empty\n");
    let again = http::post(admin, &format!("/api/v1/quarantine/{bad}/replay"), None);
    assert_eq!(again.status, 404, "{again:?}");

    // Another unreadable record, deleted for good.
    let worse = submit(&setup, "c@example.org", "worse");
    let worse_key = format!("smarthost:{{m:{worse}}}:record");
    assert_ne!(redis_cli(&redis, &["STRLEN", &worse_key]), "0");
    redis_cli(&redis, &["SETRANGE", &worse_key, "0", "c"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !quarantine(&[]).1.contains(&worse) {
        assert!(Instant::now() < deadline, "never quarantined");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (ok, said, err) = quarantine(&["delete", &worse]);
    assert!(ok, "{said}{err}");
    assert_eq!(said, format!("{worse}: deleted\n"));
    let worse_quarantined = format!("smarthost:{{m:{worse}}}:quarantined");
    assert_eq!(redis_cli(&redis, &["EXISTS", &worse_quarantined]), "0");
    assert_eq!(quarantine(&[]).1, "quarantine: empty\n");
    let (ok, _, said) = quarantine(&["delete", &worse]);
    assert!(!ok && said.contains("404"), "{said}");
    let (ok, _, said) = quarantine(&["delete", "../etc/passwd"]);
    assert!(!ok && said.contains("is not an entry"), "{said}");
}
