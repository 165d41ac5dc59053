//! Large bodies go to disk while they arrive (`smtp.body_spill_threshold`)
//! and reach the smart host byte for byte, on the local spool and on
//! Redis: the real binary, real clients, an aiosmtpd sink and a real
//! `redis-server`.

use std::path::Path;
use std::time::Duration;

use smarthost_testkit::redis::RedisServer;
use smarthost_tests::scenario::{
    assert_delivered_unchanged, message, start_with_env, submit, Setup, ARRIVAL,
};
use smarthost_tests::sink::{Sink, SinkOptions};

/// A text of about `bytes` bytes in lines of every length up to 900,
/// some starting with dots (stuffed on the wire, unstuffed in the spool).
fn large_text(bytes: usize, seed: usize) -> String {
    let mut text = String::with_capacity(bytes + 1000);
    let mut n = seed;
    while text.len() < bytes {
        n = n
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let len = (n >> 33) % 900;
        if n.is_multiple_of(7) {
            text.push('.');
        }
        for i in 0..len {
            text.push((b'a' + ((i + n % 26) % 26) as u8) as char);
        }
        text.push_str("\r\n");
    }
    text
}

/// A relay whose mail goes to `sink`, spilling bodies past 64 KiB into
/// `spill_dir`, with `env` on top (the queue backend).
fn relay(sink: &Sink, spill_dir: &Path, env: &[(&str, &str)]) -> Setup {
    let dir = spill_dir.display().to_string();
    let mut all = vec![
        ("SMARTHOST__SMTP__BODY_SPILL_THRESHOLD", "64KiB"),
        ("SMARTHOST__SMTP__BODY_SPILL_DIR", dir.as_str()),
    ];
    all.extend_from_slice(env);
    start_with_env(
        tempfile::tempdir().unwrap(),
        &format!("smart_host = \"{}\"", sink.smart_host()),
        "",
        &all,
    )
}

/// Three large messages (one over several spill writes) and a small one
/// arrive unchanged, and nothing is left in the spill directory.
fn large_bodies_arrive_unchanged(env: &[(&str, &str)]) -> Setup {
    let sink = Sink::start(SinkOptions::default());
    let spill = tempfile::tempdir().unwrap();
    let setup = relay(&sink, spill.path(), env);
    let sizes = [70_000, 300_000, 3_000_000, 500];
    let submitted: Vec<String> = sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| {
            let text = message(
                "user@example.org",
                &format!("large {i}"),
                &large_text(size, i),
            );
            submit(
                &setup.relay,
                "app@sender.test",
                &["user@example.org"],
                &text,
            );
            text
        })
        .collect();
    let got = sink.wait_for(sizes.len(), ARRIVAL);
    for (i, text) in submitted.iter().enumerate() {
        let subject = format!("large {i}");
        let delivered = got
            .iter()
            .find(|m| m.header("Subject").as_deref() == Some(subject.as_str()))
            .unwrap_or_else(|| panic!("{subject} arrived"));
        assert_delivered_unchanged(delivered, text);
    }
    let metrics = smarthost_tests::http::get(setup.relay.admin_addr(), "/metrics", None);
    let spilled = metrics.samples()["smarthost_spilled_bytes_total"];
    assert!(
        (3_300_000.0..3_400_000.0).contains(&spilled),
        "all but the small message went to disk: {spilled} bytes"
    );
    let left: Vec<_> = std::fs::read_dir(spill.path()).unwrap().collect();
    assert!(left.is_empty(), "nothing named is left: {left:?}");
    setup
}

#[test]
fn large_bodies_arrive_unchanged_from_the_local_spool() {
    let mut setup = large_bodies_arrive_unchanged(&[]);
    setup.relay.terminate(Duration::from_secs(20));
}

#[test]
fn large_bodies_arrive_unchanged_from_redis_and_leave_no_staged_parts() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut setup = large_bodies_arrive_unchanged(&[
        ("SMARTHOST__QUEUE__BACKEND", "redis"),
        ("SMARTHOST__QUEUE__REDIS_URL", url.as_str()),
    ]);
    setup.relay.terminate(Duration::from_secs(20));
    let staged = smarthost_testkit::redis::command(
        redis.port(),
        &[
            "EVAL",
            "return #redis.call('KEYS', ARGV[1])",
            "0",
            "smarthost:*:body-parts",
        ],
    );
    assert_eq!(staged.as_deref(), Some(":0"), "staged parts left");
}

#[test]
fn a_spill_directory_that_cannot_be_written_stops_the_node_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-directory");
    std::fs::write(&file, b"x").unwrap();
    let config = dir.path().join("smarthost.toml");
    std::fs::write(
        &config,
        format!(
            "[smtp]\nlisten = [\"127.0.0.1:{}\"]\nbody_spill_dir = {:?}\n\
             [queue]\npath = {:?}\n",
            smarthost_tests::relay::free_port(),
            file.join("incoming").display().to_string(),
            dir.path().join("spool").display().to_string(),
        ),
    )
    .unwrap();
    let out = std::process::Command::new(smarthost_tests::smarthost_bin())
        .arg("--config")
        .arg(&config)
        .arg("run")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("smtp.body_spill_dir: cannot write message bodies to"),
        "{stderr}"
    );
}
