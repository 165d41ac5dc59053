//! The pickup directory and badmail against the real binary: `.eml` files
//! dropped in the directory (one with IIS `X-Sender`/`X-Receiver` lines,
//! one with headers only) arrive at a real SMTP sink with their envelope
//! and are removed; a file that cannot be queued goes to badmail with its
//! reason (a line over 998 octets named by its number), where the admin
//! API and `smarthost badmail` list, replay and delete it; so does a
//! failed report from `<>` with no postmaster to tell. Names that could
//! reach outside badmail are refused.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use smarthost_testkit::redis::RedisServer;
use smarthost_tests::http;
use smarthost_tests::relay::Relay;
use smarthost_tests::scenario::{dot_stuff, message};
use smarthost_tests::sink::{ReceivedMessage, Sink, SinkOptions};
use smarthost_tests::smtp::{queued_id, Client};

/// Writes `name` into `dir` as a writer should: under a temporary name,
/// then renamed into place.
fn drop_file(dir: &Path, name: &str, content: &[u8]) {
    let temporary = dir.join(format!("{name}.tmp"));
    std::fs::write(&temporary, content).unwrap();
    std::fs::rename(&temporary, dir.join(name)).unwrap();
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A relay with `smtp_lines`, watching `pickup` every 200 ms, that routes
/// example.org to `sink`.
fn relay_with_pickup(smtp_lines: &str, pickup: &Path, sink: &Sink) -> Relay {
    Relay::start(
        smtp_lines,
        &format!(
            "[pickup]\ndir = {:?}\npoll_interval = \"200ms\"\n\n\
             [[domains]]\nname = \"example.org\"\nsmart_host = \"{}\"\n",
            pickup.display().to_string(),
            sink.smart_host()
        ),
    )
}

/// `GET /api/v1/badmail` until it lists `n` entries (at most 20 s).
#[track_caller]
fn badmail_with(relay: &Relay, n: u64, token: Option<&str>) -> serde_json::Value {
    badmail_within(relay, n, token, Duration::from_secs(20))
}

#[track_caller]
fn badmail_within(
    relay: &Relay,
    n: u64,
    token: Option<&str>,
    limit: Duration,
) -> serde_json::Value {
    let deadline = Instant::now() + limit;
    loop {
        let answer = http::get(relay.admin_addr(), "/api/v1/badmail", token);
        assert_eq!(answer.status, 200, "{answer:?}");
        let listing = answer.json();
        if listing["total"] == n {
            return listing;
        }
        assert!(
            Instant::now() < deadline,
            "badmail holds {listing} rather than {n} entries:\n{}",
            relay.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The names in `dir` (the claim directory apart), sorted.
fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name != ".taking")
        .collect();
    names.sort();
    names
}

fn sorted(mut list: Vec<String>) -> Vec<String> {
    list.sort();
    list
}

fn by_subject<'a>(messages: &'a [ReceivedMessage], subject: &str) -> &'a ReceivedMessage {
    messages
        .iter()
        .find(|m| m.header("Subject").as_deref() == Some(subject))
        .unwrap_or_else(|| panic!("no message {subject:?} in {messages:?}"))
}

#[test]
fn dropped_files_are_queued_with_their_envelope_and_bad_ones_kept_in_badmail() {
    let sink = Sink::start(SinkOptions::default());
    let pickup = tempfile::tempdir().unwrap();
    let relay = relay_with_pickup("", pickup.path(), &sink);
    let dir = pickup.path();
    drop_file(
        dir,
        "iis.eml",
        b"X-Sender: <app@sender.test>\r\nX-Receiver: alice@example.org\r\n\
          x-receiver: <bob@example.org>\r\nFrom: someone-else@sender.test\r\n\
          To: not-the-envelope@example.org\r\nSubject: iis form\r\n\r\nHello from IIS.\r\n",
    );
    drop_file(
        dir,
        "Headers.EML",
        b"From: App <app@sender.test>\nTo: carol@example.org\nBcc: dave@example.org\n\
          Subject: headers only\n\nHello from headers.\n",
    );
    drop_file(
        dir,
        "nobody.eml",
        b"From: app@sender.test\nSubject: no recipient\n\nlost\n",
    );
    drop_file(dir, "notes.txt", b"not mail");

    let received = sink.wait_for(2, Duration::from_secs(20));
    assert_eq!(received.len(), 2, "{received:?}");
    let iis = by_subject(&received, "iis form");
    assert_eq!(iis.mail_from, "app@sender.test");
    assert_eq!(
        sorted(iis.rcpt_tos.clone()),
        ["alice@example.org", "bob@example.org"]
    );
    let body = iis.text();
    assert!(!body.to_ascii_lowercase().contains("x-sender"), "{body}");
    assert!(!body.to_ascii_lowercase().contains("x-receiver"), "{body}");
    assert!(body.ends_with("\r\n\r\nHello from IIS.\r\n"), "{body}");
    let trace = iis.header("Received").unwrap();
    assert!(trace.contains("by relay.test with pickup"), "{trace}");

    let headers = by_subject(&received, "headers only");
    assert_eq!(headers.mail_from, "app@sender.test");
    assert_eq!(
        sorted(headers.rcpt_tos.clone()),
        ["carol@example.org", "dave@example.org"]
    );
    let body = headers.text();
    assert!(!body.contains("dave@"), "Bcc is taken out: {body}");
    assert!(
        !body.replace("\r\n", "").contains('\n'),
        "CRLF line ends: {body:?}"
    );
    assert!(headers.header("Message-ID").is_some(), "{body}");

    // The bad file is in badmail with its reason; the queued ones are gone,
    // what is not an .eml file is left alone.
    let listing = badmail_with(&relay, 1, None);
    let entry = &listing["entries"][0];
    assert_eq!(entry["source"], "pickup", "{listing}");
    assert_eq!(entry["file"], "nobody.eml", "{listing}");
    let reason = entry["reason"].as_str().unwrap();
    assert!(reason.contains("recipient"), "{reason}");
    let name = entry["name"].as_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while names_in(dir) != ["notes.txt"] {
        assert!(Instant::now() < deadline, "left: {:?}", names_in(dir));
        std::thread::sleep(Duration::from_millis(100));
    }
    let kept = relay.spool.join("badmail").join(format!("{name}.eml"));
    assert_eq!(
        std::fs::read(&kept).unwrap(),
        b"From: app@sender.test\nSubject: no recipient\n\nlost\n",
        "kept as it was dropped"
    );

    let listed = relay.cli(&["badmail", "list"], &[]);
    assert!(listed.status.success(), "{}", text(&listed));
    let shown = String::from_utf8_lossy(&listed.stdout);
    assert!(
        shown.contains(name) && shown.contains("pickup") && shown.contains("recipient"),
        "{shown}"
    );
    let json = relay.cli(&["badmail", "list", "--json"], &[]);
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(json["entries"][0]["name"], name);

    let metrics = http::get(relay.admin_addr(), "/metrics", None).samples();
    assert_eq!(
        metrics.get("smarthost_badmail_total{source=\"pickup\"}"),
        Some(&1.0),
        "{metrics:?}"
    );
    assert_eq!(metrics.get("smarthost_badmail_entries"), Some(&1.0));
    assert_eq!(sink.messages().len(), 2, "nothing more arrived");
}

#[test]
fn a_node_takes_again_what_it_had_claimed_and_leaves_other_nodes_claims_alone() {
    let sink = Sink::start(SinkOptions::default());
    let pickup = tempfile::tempdir().unwrap();
    // As a node that stopped while taking a file leaves it; beside it, a
    // file another node sharing the directory is taking.
    let mine = pickup.path().join(".taking").join("node-a");
    let theirs = pickup.path().join(".taking").join("node-b");
    std::fs::create_dir_all(&mine).unwrap();
    std::fs::create_dir_all(&theirs).unwrap();
    std::fs::write(
        mine.join("left.eml"),
        "From: app@sender.test\r\nTo: grace@example.org\r\nSubject: claimed before\r\n\r\nx\r\n",
    )
    .unwrap();
    std::fs::write(
        theirs.join("busy.eml"),
        "From: app@sender.test\r\nTo: heidi@example.org\r\nSubject: not ours\r\n\r\nx\r\n",
    )
    .unwrap();
    let _relay = Relay::start_with_env(
        "",
        &format!(
            "[pickup]\ndir = {:?}\npoll_interval = \"100ms\"\n\n\
             [[domains]]\nname = \"example.org\"\nsmart_host = \"{}\"\n",
            pickup.path().display().to_string(),
            sink.smart_host()
        ),
        &[("SMARTHOST__NODE__ID", "node-a")],
    );
    let received = sink.wait_for(1, Duration::from_secs(20));
    assert_eq!(received[0].rcpt_tos, ["grace@example.org"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while mine.join("left.eml").exists() {
        assert!(Instant::now() < deadline, "the claimed file stays");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Many passes later another node's claim is still its own.
    std::thread::sleep(Duration::from_secs(1));
    assert!(theirs.join("busy.eml").exists());
    assert_eq!(sink.messages().len(), 1);
}

/// Whether a file called `name` is in `dir` or claimed in it.
fn still_there(dir: &Path, name: &str) -> bool {
    dir.join(name).exists()
        || std::fs::read_dir(dir.join(".taking"))
            .unwrap()
            .any(|node| node.unwrap().path().join(name).exists())
}

#[test]
fn a_file_the_queue_cannot_take_stays_until_it_can() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    let sink = Sink::start(SinkOptions::default());
    let pickup = tempfile::tempdir().unwrap();
    let relay = Relay::start_with_env(
        "",
        &format!(
            "[pickup]\ndir = {:?}\npoll_interval = \"200ms\"\n\n\
             [[domains]]\nname = \"example.org\"\nsmart_host = \"{}\"\n",
            pickup.path().display().to_string(),
            sink.smart_host()
        ),
        &[
            ("SMARTHOST__QUEUE__BACKEND", "redis"),
            ("SMARTHOST__QUEUE__REDIS_URL", url.as_str()),
            ("SMARTHOST__QUEUE__REDIS_RESPONSE_TIMEOUT", "1s"),
        ],
    );
    // The shared queue is down: the file is not taken. (Killed rather than
    // paused: a store that timed out may still be carried out once the
    // server wakes, and the file queued again makes a second copy, the
    // at-least-once of a client that got 451.)
    redis.kill();
    drop_file(
        pickup.path(),
        "wait.eml",
        b"From: app@sender.test\r\nTo: ivan@example.org\r\nSubject: wait\r\n\r\nx\r\n",
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while relay
        .log()
        .matches("the queue did not take a pickup file")
        .count()
        < 2
    {
        assert!(Instant::now() < deadline, "{}", relay.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(still_there(pickup.path(), "wait.eml"), "{}", relay.log());
    assert!(sink.messages().is_empty());

    redis.restart();
    let received = sink.wait_for(1, Duration::from_secs(30));
    assert_eq!(received[0].rcpt_tos, ["ivan@example.org"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while still_there(pickup.path(), "wait.eml") {
        assert!(Instant::now() < deadline, "the file stays once queued");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(sink.messages().len(), 1, "queued once");
}

#[test]
fn a_badmail_entry_is_replayed_once_its_cause_is_gone_and_deleted_for_good() {
    let sink = Sink::start(SinkOptions::default());
    let pickup = tempfile::tempdir().unwrap();
    let mut relay = relay_with_pickup("max_message_size = \"2KB\"", pickup.path(), &sink);
    let lines = "0123456789abcdef".repeat(4) + "\r\n";
    let large = format!(
        "From: app@sender.test\r\nTo: erin@example.org\r\nSubject: large\r\n\r\n{}",
        lines.repeat(80)
    );
    drop_file(pickup.path(), "large.eml", large.as_bytes());
    drop_file(
        pickup.path(),
        "empty.eml",
        b"X-Sender: app@sender.test\r\nX-Receiver: frank@example.org\r\n",
    );
    let listing = badmail_with(&relay, 2, None);
    let entry = |file: &str| {
        listing["entries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["file"] == file)
            .unwrap_or_else(|| panic!("no entry for {file}: {listing}"))
            .clone()
    };
    let large_entry = entry("large.eml");
    assert!(
        large_entry["reason"]
            .as_str()
            .unwrap()
            .contains("smtp.max_message_size"),
        "{large_entry}"
    );
    let large_name = large_entry["name"].as_str().unwrap().to_string();
    let empty_name = entry("empty.eml")["name"].as_str().unwrap().to_string();

    // Still too large: the replay says why and the entry stays.
    let replay = format!("/api/v1/badmail/{large_name}/replay");
    let refused = http::post(relay.admin_addr(), &replay, None);
    assert_eq!(refused.status, 409, "{refused:?}");
    assert!(refused.body.contains("max_message_size"), "{refused:?}");
    assert_eq!(badmail_with(&relay, 2, None)["total"], 2);

    // The cause removed (a larger limit), the replay queues it.
    relay.terminate(Duration::from_secs(20));
    let config = std::fs::read_to_string(&relay.config).unwrap();
    std::fs::write(
        &relay.config,
        config.replace("max_message_size = \"2KB\"", "max_message_size = \"10MB\""),
    )
    .unwrap();
    relay.launch();
    let replayed = relay.cli(&["badmail", "replay", &large_name], &[]);
    assert!(replayed.status.success(), "{}", text(&replayed));
    assert!(
        text(&replayed).contains("queued again as"),
        "{}",
        text(&replayed)
    );
    let received = sink.wait_for(1, Duration::from_secs(20));
    assert_eq!(received[0].rcpt_tos, ["erin@example.org"]);
    assert_eq!(received[0].mail_from, "app@sender.test");
    assert!(
        received[0].text().ends_with(&lines.repeat(80)),
        "the whole body"
    );

    // Replayed entries leave badmail; a delete drops the other.
    let listing = badmail_with(&relay, 1, None);
    assert_eq!(listing["entries"][0]["name"], empty_name.as_str());
    let deleted = relay.cli(&["badmail", "delete", &empty_name], &[]);
    assert!(deleted.status.success(), "{}", text(&deleted));
    assert_eq!(
        badmail_with(&relay, 0, None)["entries"],
        serde_json::json!([])
    );
    let listed = relay.cli(&["badmail", "list"], &[]);
    assert_eq!(String::from_utf8_lossy(&listed.stdout), "badmail: empty\n");
    let again = relay.cli(&["badmail", "delete", &empty_name], &[]);
    assert_eq!(again.status.code(), Some(1), "{}", text(&again));
    assert!(text(&again).contains("HTTP 404"), "{}", text(&again));
    assert!(
        relay
            .spool
            .join("badmail")
            .read_dir()
            .unwrap()
            .next()
            .is_none(),
        "no file is left"
    );
}

#[test]
fn a_failed_report_with_no_postmaster_to_tell_is_kept_and_replayed_to_the_sink() {
    let sink = Sink::start(SinkOptions::default().script(serde_json::json!({
        "rcpt": {"gone@example.org": ["550 5.1.1 no such user", 250]}
    })));
    // No smtp.postmaster, bounce.copy_to or bounce.double_bounce_to.
    let relay = Relay::start(
        "",
        &format!(
            "[[domains]]\nname = \"example.org\"\nsmart_host = \"{}\"\n",
            sink.smart_host()
        ),
    );
    let (mut client, greeting) = Client::connect(relay.smtp);
    assert_eq!(greeting.code, 220);
    client.expect("EHLO app.example", 250);
    let report = message("gone@example.org", "a failed report", "Undeliverable.\r\n");
    let reply = client.send_message("", &["gone@example.org"], &dot_stuff(&report));
    queued_id(&reply);
    client.expect("QUIT", 221);

    let listing = badmail_with(&relay, 1, None);
    let entry = &listing["entries"][0];
    assert_eq!(entry["source"], "report", "{listing}");
    assert_eq!(
        entry["envelope"],
        serde_json::json!({"sender": "<>", "recipients": ["gone@example.org"]}),
        "{listing}"
    );
    let reason = entry["reason"].as_str().unwrap();
    assert!(
        reason.contains("gone@example.org: 550 5.1.1 no such user"),
        "{reason}"
    );
    assert!(sink.messages().is_empty(), "refused, not delivered");
    let metrics = http::get(relay.admin_addr(), "/metrics", None).samples();
    assert_eq!(
        metrics.get("smarthost_badmail_total{source=\"report\"}"),
        Some(&1.0),
        "{metrics:?}"
    );

    // The 5.1.1 put the recipient on the global suppression list, which
    // would fail the replay at once: the operator takes it off first.
    let removed = relay.cli(&["suppression", "remove", "gone@example.org"], &[]);
    assert!(removed.status.success(), "{}", text(&removed));

    // The recipient takes it now: replayed with its envelope, it arrives.
    let name = entry["name"].as_str().unwrap();
    let replayed = relay.cli(&["badmail", "replay", name], &[]);
    assert!(replayed.status.success(), "{}", text(&replayed));
    let received = sink.wait_for(1, Duration::from_secs(20));
    assert_eq!(received[0].mail_from, "", "still from <>");
    assert_eq!(received[0].rcpt_tos, ["gone@example.org"]);
    assert_eq!(
        received[0].header("Subject").as_deref(),
        Some("a failed report")
    );
    assert_eq!(
        badmail_with(&relay, 0, None)["entries"],
        serde_json::json!([])
    );
}

#[test]
fn badmail_names_never_reach_outside_badmail_and_roles_are_kept() {
    let relay = Relay::start(
        "",
        &format!(
            "[[admin.operators]]\nname = \"ops\"\ntoken_hash = \"{}\"\nrole = \"admin\"\n\n\
             [[admin.operators]]\nname = \"desk\"\ntoken_hash = \"{}\"\nrole = \"operator\"\n\n\
             [[admin.operators]]\nname = \"eyes\"\ntoken_hash = \"{}\"\nrole = \"viewer\"\n",
            http::token_hash("admin-secret-token"),
            http::token_hash("operator-secret-token"),
            http::token_hash("viewer-secret-token"),
        ),
    );
    let admin = relay.admin_addr();
    let token = Some("admin-secret-token");
    // Files beside badmail that a path could name.
    let outside = relay.spool.join("secret");
    std::fs::write(outside.with_extension("eml"), b"keep me").unwrap();
    std::fs::write(outside.with_extension("json"), b"{}").unwrap();
    for name in [
        "..",
        "..%2Fsecret",
        "%2e%2e%2fsecret",
        "..%5Csecret",
        "secret.eml",
        ".hidden",
        "a%00b",
    ] {
        for (method, path) in [
            ("DELETE", format!("/api/v1/badmail/{name}")),
            ("POST", format!("/api/v1/badmail/{name}/replay")),
        ] {
            let answer = http::request(admin, method, &path, token);
            assert_eq!(answer.status, 400, "{method} {path}: {answer:?}");
            assert!(
                answer.json()["error"]
                    .as_str()
                    .unwrap()
                    .contains("not a badmail entry's name"),
                "{answer:?}"
            );
        }
    }
    assert_eq!(
        std::fs::read(outside.with_extension("eml")).unwrap(),
        b"keep me"
    );
    assert!(outside.with_extension("json").exists());
    let absent = "/api/v1/badmail/0000000000001-pickup-00";
    let answer = http::request(admin, "DELETE", absent, token);
    assert_eq!(answer.status, 404, "{answer:?}");
    let answer = http::post(admin, &format!("{absent}/replay"), token);
    assert_eq!(answer.status, 404, "{answer:?}");
    for limit in ["0", "1001", "x"] {
        let answer = http::get(admin, &format!("/api/v1/badmail?limit={limit}"), token);
        assert_eq!(answer.status, 400, "limit={limit}: {answer:?}");
    }

    // Viewers list, operators replay, only admins delete.
    let viewer = Some("viewer-secret-token");
    let operator = Some("operator-secret-token");
    assert_eq!(http::get(admin, "/api/v1/badmail", viewer).status, 200);
    assert_eq!(http::get(admin, "/api/v1/badmail", None).status, 401);
    assert_eq!(
        http::post(admin, &format!("{absent}/replay"), viewer).status,
        403
    );
    assert_eq!(
        http::post(admin, &format!("{absent}/replay"), operator).status,
        404
    );
    assert_eq!(http::request(admin, "DELETE", absent, operator).status, 403);

    // The command line refuses such a name before it asks.
    let output = relay.cli(
        &["badmail", "delete", "../secret"],
        &[("SMARTHOST_TOKEN", "admin-secret-token")],
    );
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    assert!(outside.with_extension("eml").exists());
}

#[test]
fn a_file_that_went_round_too_often_is_kept_as_a_loop() {
    let sink = Sink::start(SinkOptions::default());
    let pickup = tempfile::tempdir().unwrap();
    let relay = relay_with_pickup("max_hop_count = 3", pickup.path(), &sink);
    let hops = |n: usize| -> Vec<u8> {
        let mut file = "Received: from a by b\r\n".repeat(n).into_bytes();
        file.extend_from_slice(
            format!("From: app@sender.test\r\nTo: alice@example.org\r\nSubject: {n} hops\r\n\r\nHi.\r\n")
                .as_bytes(),
        );
        file
    };
    // As in DATA: the fields the message came with are counted.
    drop_file(pickup.path(), "three.eml", &hops(3));
    drop_file(pickup.path(), "four.eml", &hops(4));
    let listing = badmail_with(&relay, 1, None);
    let entry = &listing["entries"][0];
    assert_eq!(entry["file"], "four.eml", "{listing}");
    let reason = entry["reason"].as_str().unwrap();
    assert!(reason.contains("mail loop"), "{reason}");
    let received = sink.wait_for(1, Duration::from_secs(20));
    assert_eq!(received[0].header("Subject").as_deref(), Some("3 hops"));
}

#[test]
fn a_file_with_a_line_over_998_octets_is_kept_with_that_line_named() {
    let sink = Sink::start(SinkOptions::default());
    let pickup = tempfile::tempdir().unwrap();
    let relay = relay_with_pickup("", pickup.path(), &sink);
    let file = |subject: &str, long: usize| -> Vec<u8> {
        format!(
            "X-Sender: app@sender.test\nX-Receiver: alice@example.org\n\
             From: app@sender.test\nSubject: {subject}\n\nfirst\n{}\nlast\n",
            "x".repeat(long)
        )
        .into_bytes()
    };
    // 998 octets is the most SMTP allows on a line (RFC 5321 4.5.3.1.6).
    drop_file(pickup.path(), "fits.eml", &file("fits", 998));
    drop_file(pickup.path(), "long.eml", &file("too long", 999));
    let listing = badmail_with(&relay, 1, None);
    let entry = &listing["entries"][0];
    assert_eq!(entry["file"], "long.eml", "{listing}");
    assert_eq!(
        entry["reason"], "message: line 7 is longer than 998 octets",
        "{listing}"
    );
    let received = sink.wait_for(1, Duration::from_secs(20));
    assert_eq!(received[0].header("Subject").as_deref(), Some("fits"));
    assert!(received[0]
        .text()
        .contains(&format!("\r\n{}\r\n", "x".repeat(998))));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(sink.messages().len(), 1, "nothing more arrived");
}

/// A coordinator alone keeps badmail too: a message from `<>` that expires
/// while its domain is suspended is failed by the coordinator's expiry
/// sweep, with no postmaster to tell, and kept there with its reason.
#[test]
fn a_coordinator_keeps_what_its_expiry_sweep_cannot_report() {
    let redis = RedisServer::start();
    let url = redis.url();
    let start = |command: &'static str, id: &str| {
        Relay::start_as(
            command,
            "",
            "",
            &[
                ("SMARTHOST__QUEUE__BACKEND", "redis"),
                ("SMARTHOST__QUEUE__REDIS_URL", url.as_str()),
                ("SMARTHOST__QUEUE__MAX_LIFETIME", "3s"),
                ("SMARTHOST__NODE__ID", id),
            ],
        )
    };
    let node = start("node", "n1");
    let coordinator = start("coordinator", "c1");
    let suspended = node.cli(&["queue", "suspend", "example.org"], &[]);
    assert!(suspended.status.success(), "{}", text(&suspended));

    let (mut client, greeting) = Client::connect(node.smtp);
    assert_eq!(greeting.code, 220);
    client.expect("EHLO app.example", 250);
    let report = message(
        "held@example.org",
        "an expiring report",
        "Undeliverable.\r\n",
    );
    let id = queued_id(&client.send_message("", &["held@example.org"], &dot_stuff(&report)));
    client.expect("QUIT", 221);

    // The sweep runs every 30 s: the one after the message is 3 s old.
    let listing = badmail_within(&coordinator, 1, None, Duration::from_secs(60));
    let entry = &listing["entries"][0];
    assert_eq!(entry["source"], "report", "{listing}");
    let reason = entry["reason"].as_str().unwrap();
    assert!(reason.contains("delivery time expired"), "{reason}");
    assert!(
        coordinator.log().contains(&id),
        "the coordinator expired it:\n{}",
        coordinator.log()
    );
    assert_eq!(
        http::get(node.admin_addr(), "/api/v1/badmail", None).json()["total"],
        0,
        "kept where it was found, once"
    );
}
