//! The admin API and `smarthost queue`, against the real relay: health and
//! readiness through a shutdown, queue counts, suspending and resuming a
//! domain while its mail waits, and operator tokens with their roles.

use std::process::Output;
use std::time::{Duration, Instant};

use smarthost_tests::http::{self, token_hash};
use smarthost_tests::relay::{free_port, Relay};
use smarthost_tests::sink::{Sink, SinkOptions};
use smarthost_tests::smtp::{queued_id, Client};

const POLL: Duration = Duration::from_millis(100);

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `smarthost queue ARGS` against `relay`; panics unless it succeeds.
fn queue_ok(relay: &Relay, args: &[&str]) -> String {
    let output = queue(relay, args, None);
    assert!(output.status.success(), "queue {args:?}: {}", text(&output));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn queue(relay: &Relay, args: &[&str], token: Option<&str>) -> Output {
    let mut all = vec!["queue"];
    all.extend_from_slice(args);
    match token {
        Some(token) => relay.cli(&all, &[("SMARTHOST_TOKEN", token)]),
        None => relay.cli(&all, &[]),
    }
}

/// The number on the summary line named `name` (a count or a domain).
fn count(summary: &str, name: &str) -> Option<usize> {
    summary.lines().find_map(|line| {
        let rest = line.trim_start().strip_prefix(name)?;
        rest.trim().parse().ok()
    })
}

/// Waits (at most 20 s) until `queue summary` shows `messages` messages,
/// and returns that summary.
fn wait_for_summary(relay: &Relay, messages: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let summary = queue_ok(relay, &["summary"]);
        if count(&summary, "messages") == Some(messages) {
            return summary;
        }
        assert!(
            Instant::now() < deadline,
            "the queue never held {messages} messages:\n{summary}"
        );
        std::thread::sleep(POLL);
    }
}

fn submit(relay: &Relay, to: &str, subject: &str) -> String {
    let (mut c, greeting) = Client::connect(relay.smtp);
    assert_eq!(greeting.code, 220);
    c.expect("EHLO app.example", 250);
    let reply = c.send_message(
        "app@sender.test",
        &[to],
        &format!("From: app@sender.test\r\nTo: {to}\r\nSubject: {subject}\r\n\r\nHello.\r\n"),
    );
    let id = queued_id(&reply);
    c.expect("QUIT", 221);
    id
}

#[test]
fn readiness_turns_false_at_sigterm_while_health_stays_true() {
    let mut relay = Relay::start_with_env("", "", &[("SMARTHOST__NODE__SHUTDOWN_GRACE", "20s")]);
    let admin = relay.admin_addr();
    assert_eq!(http::get(admin, "/healthz", None).status, 200);
    let ready = http::get(admin, "/readyz", None);
    assert_eq!(ready.status, 200, "{ready:?}");

    // A client in the middle of a message keeps the process alive.
    let (mut busy, _) = Client::connect(relay.smtp);
    busy.expect("EHLO busy.example", 250);
    busy.expect("MAIL FROM:<app@example.com>", 250);
    busy.expect("RCPT TO:<user@example.org>", 250);
    busy.expect("DATA", 354);
    busy.send_raw(b"Subject: in flight\r\n\r\nfirst half\r\n");

    relay.send_sigterm();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ready = http::get(admin, "/readyz", None);
        if ready.status == 503 {
            break;
        }
        assert_eq!(ready.status, 200, "{ready:?}");
        assert!(Instant::now() < deadline, "still ready after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(http::get(admin, "/healthz", None).status, 200);
    assert_eq!(http::get(admin, "/readyz", None).status, 503);

    busy.send_raw(b"second half\r\n.\r\n");
    queued_id(&busy.read_reply());
    let status = relay.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "exit status {status}");
}

#[test]
fn queue_summary_counts_accepted_messages() {
    // Nothing listens there: the mail is deferred and stays queued.
    let dead = free_port();
    let relay = Relay::start(
        "",
        &format!("[[domains]]\nname = \"deferred.test\"\nsmart_host = \"[127.0.0.1]:{dead}\"\n"),
    );
    let empty = queue_ok(&relay, &["summary"]);
    assert_eq!(count(&empty, "messages"), Some(0), "{empty}");

    submit(&relay, "a@deferred.test", "one");
    submit(&relay, "b@deferred.test", "two");
    let summary = wait_for_summary(&relay, 2);
    assert_eq!(count(&summary, "deferred.test"), Some(2), "{summary}");

    let json = http::get(relay.admin_addr(), "/api/v1/queue", None).json();
    assert_eq!(json["messages"], 2, "{json}");
    // The unversioned path of earlier releases answers the same.
    let old = http::get(relay.admin_addr(), "/api/queue", None).json();
    assert_eq!(old["deliveries_by_domain"], json["deliveries_by_domain"]);
    assert_eq!(json["deliveries_by_domain"]["deferred.test"], 2, "{json}");
    for key in ["ready", "deferred", "in_flight", "waiting", "store_calls"] {
        assert!(json[key].is_u64(), "{key} in {json}");
    }
    // `--json` prints the API's answer.
    let printed: serde_json::Value =
        serde_json::from_str(&queue_ok(&relay, &["summary", "--json"])).unwrap();
    assert_eq!(printed["messages"], 2, "{printed}");
    assert_eq!(
        printed["deliveries_by_domain"],
        json["deliveries_by_domain"]
    );
}

#[test]
fn work_in_flight_is_shown_by_node() {
    // The sink pauses before each reply: the delivery stays in flight.
    let sink = Sink::start(SinkOptions::default().delay(Duration::from_secs(2)));
    let relay = Relay::start(
        "",
        &format!(
            "[[domains]]\nname = \"slow.test\"\nsmart_host = \"{}\"\n",
            sink.smart_host()
        ),
    );
    let node = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    submit(&relay, "a@slow.test", "slow");
    let deadline = Instant::now() + Duration::from_secs(20);
    let json = loop {
        let json = http::get(relay.admin_addr(), "/api/v1/queue", None).json();
        if json["in_flight"] == 1 {
            break json;
        }
        assert!(Instant::now() < deadline, "never in flight: {json}");
        std::thread::sleep(Duration::from_millis(50));
    };
    // On the local backend every delivery is this node's (`node.id`, by
    // default the host name).
    assert_eq!(
        json["in_flight_by_node"],
        serde_json::json!({ node.trim(): 1 }),
        "{json}"
    );
    let summary = queue_ok(&relay, &["summary"]);
    assert!(
        summary.contains(&format!("in flight, by node\n  {}  1\n", node.trim())),
        "{summary}"
    );
}

#[test]
fn a_suspended_domain_keeps_its_mail_until_resumed() {
    let sink = Sink::start(SinkOptions::default());
    let relay = Relay::start(
        "",
        &format!(
            "[[domains]]\nname = \"held.test\"\nsmart_host = \"{}\"\n",
            sink.smart_host()
        ),
    );
    let said = queue_ok(&relay, &["suspend", "Held.Test"]);
    assert!(said.contains("held.test suspended"), "{said}");

    for n in 1..=3 {
        submit(&relay, &format!("user{n}@held.test"), &format!("held {n}"));
    }
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(sink.messages().len(), 0, "delivered while suspended");
    let summary = queue_ok(&relay, &["summary"]);
    assert_eq!(count(&summary, "messages"), Some(3), "{summary}");
    assert_eq!(count(&summary, "held.test"), Some(3), "{summary}");
    assert!(
        summary.contains("suspended domains: held.test\n"),
        "{summary}"
    );

    let said = queue_ok(&relay, &["resume", "held.test", "--json"]);
    let state: serde_json::Value = serde_json::from_str(&said).unwrap();
    assert_eq!(
        state,
        serde_json::json!({"domain": "held.test", "suspended": false})
    );
    let arrived = sink.wait_for(3, Duration::from_secs(30));
    assert_eq!(arrived.len(), 3);
    let summary = wait_for_summary(&relay, 0);
    assert!(summary.contains("suspended domains: none\n"), "{summary}");
}

#[test]
fn operators_need_a_valid_token_and_each_role_its_rights() {
    let relay = Relay::start(
        "",
        &format!(
            "[[admin.operators]]\nname = \"ops\"\ntoken_hash = \"{}\"\nrole = \"admin\"\n\n\
             [[admin.operators]]\nname = \"noc\"\ntoken_hash = \"{}\"\nrole = \"viewer\"\n\n\
             [[admin.operators]]\nname = \"desk\"\ntoken_hash = \"{}\"\nrole = \"operator\"\n",
            token_hash("admin-secret-token"),
            token_hash("viewer-secret-token"),
            token_hash("operator-secret-token"),
        ),
    );
    let admin = relay.admin_addr();
    let suspend = "/api/v1/domains/example.org/suspend";

    // The probes and the metrics stay open.
    assert_eq!(http::get(admin, "/healthz", None).status, 200);
    assert_eq!(http::get(admin, "/readyz", None).status, 200);
    let metrics = http::get(admin, "/metrics", None);
    assert_eq!(metrics.status, 200, "{metrics:?}");

    let refused = http::get(admin, "/api/v1/queue", None);
    assert_eq!(refused.status, 401, "{refused:?}");
    assert!(refused.header("www-authenticate").is_some(), "{refused:?}");
    assert_eq!(
        http::get(admin, "/api/v1/queue", Some("wrong-token")).status,
        401
    );
    assert_eq!(http::post(admin, suspend, None).status, 401);
    assert_eq!(http::post(admin, suspend, Some("wrong-token")).status, 401);

    let seen = http::get(admin, "/api/v1/queue", Some("viewer-secret-token"));
    assert_eq!(seen.status, 200, "{seen:?}");
    assert_eq!(seen.json()["messages"], 0);
    let forbidden = http::post(admin, suspend, Some("viewer-secret-token"));
    assert_eq!(forbidden.status, 403, "{forbidden:?}");

    let done = http::post(admin, suspend, Some("admin-secret-token"));
    assert_eq!(done.status, 200, "{done:?}");
    assert_eq!(done.json()["domain"], "example.org");
    assert_eq!(done.json()["suspended"], true);

    // An operator steers the mail but may not drop a quarantined entry,
    // which no report names; an admin may (here: nothing is there).
    let operator = Some("operator-secret-token");
    assert_eq!(http::get(admin, "/api/v1/queue", operator).status, 200);
    assert_eq!(http::post(admin, suspend, operator).status, 200);
    let drop = "/api/v1/quarantine/00000000000000000001.journal.64.bad";
    let forbidden = http::request(admin, "DELETE", drop, operator);
    assert_eq!(forbidden.status, 403, "{forbidden:?}");
    assert!(
        forbidden.json()["error"]
            .as_str()
            .unwrap()
            .contains("\"desk\" has the operator role"),
        "{forbidden:?}"
    );
    assert_eq!(
        http::request(admin, "DELETE", drop, Some("admin-secret-token")).status,
        404
    );

    // The command line says what went wrong and fails.
    let output = queue(&relay, &["summary"], None);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(text(&output).contains("HTTP 401"), "{}", text(&output));
    let output = queue(
        &relay,
        &["resume", "example.org"],
        Some("viewer-secret-token"),
    );
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(text(&output).contains("HTTP 403"), "{}", text(&output));
    let output = queue(&relay, &["summary"], Some("viewer-secret-token"));
    assert!(output.status.success(), "{}", text(&output));
    let output = relay.cli(
        &[
            "queue",
            "resume",
            "example.org",
            "--token",
            "admin-secret-token",
        ],
        &[],
    );
    assert!(output.status.success(), "{}", text(&output));
    assert!(
        text(&output).contains("example.org resumed"),
        "{}",
        text(&output)
    );
}

/// `queue show` and `GET /api/v1/messages/{id}`: a message deferred for
/// one domain and delivered to another shows each recipient where it
/// stands, with the deferral's reply; a malformed id is `400`, an unknown
/// one `404`, and a delivered message is no longer there.
#[test]
fn a_queued_message_shows_each_recipient_where_it_stands() {
    let sink = Sink::start(SinkOptions::default());
    let later = Sink::start(SinkOptions::default().script(serde_json::json!({"rcpt": {
        "b@later.test": 451
    }})));
    let relay = Relay::start(
        "",
        &format!(
            "[[domains]]\nname = \"now.test\"\nsmart_host = \"{}\"\n\n\
             [[domains]]\nname = \"later.test\"\nsmart_host = \"{}\"\n",
            sink.smart_host(),
            later.smart_host()
        ),
    );
    let (mut c, _) = Client::connect(relay.smtp);
    c.expect("EHLO app.example", 250);
    c.expect("MAIL FROM:<app@sender.test> ENVID=order-17", 250);
    c.expect("RCPT TO:<a@now.test>", 250);
    c.expect("RCPT TO:<b@later.test>", 250);
    let id = queued_id(&c.send_data("Subject: half now\r\n\r\nHello.\r\n"));
    c.expect("QUIT", 221);
    sink.wait_for(1, Duration::from_secs(20));

    let admin = relay.admin_addr();
    let path = format!("/api/v1/messages/{id}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let view = loop {
        let view = http::get(admin, &path, None).json();
        if view["recipients"][1]["attempts"].as_u64() >= Some(1) {
            break view;
        }
        assert!(Instant::now() < deadline, "never attempted: {view}");
        std::thread::sleep(POLL);
    };
    assert_eq!(view["id"], id.as_str(), "{view}");
    assert_eq!(view["sender"], "app@sender.test");
    assert_eq!(view["envid"], "order-17");
    assert_eq!(view["client"]["helo"], "app.example");
    let a = &view["recipients"][0];
    assert_eq!(
        (&a["address"], &a["state"]),
        (&"a@now.test".into(), &"done".into()),
        "{view}"
    );
    let b = &view["recipients"][1];
    assert_eq!(b["state"], "deferred", "{view}");
    assert!(
        b["last_reply"].as_str().unwrap().starts_with("451"),
        "{view}"
    );
    assert!(b["next_attempt_ms"].as_u64().unwrap() > view["received_ms"].as_u64().unwrap());

    let table = queue_ok(&relay, &["show", &id]);
    assert!(table.contains(&format!("message   {id}")), "{table}");
    assert!(table.contains("sender    app@sender.test"), "{table}");
    let row = table
        .lines()
        .find(|l| l.starts_with("b@later.test"))
        .unwrap();
    assert!(row.contains("deferred") && row.contains("451"), "{table}");
    let json: serde_json::Value =
        serde_json::from_str(&queue_ok(&relay, &["show", &id, "--json"])).unwrap();
    assert_eq!(json["recipients"], view["recipients"]);

    let bad = http::get(admin, "/api/v1/messages/..%2F..%2Fetc", None);
    assert_eq!(bad.status, 400, "{bad:?}");
    assert!(bad.json()["error"]
        .as_str()
        .unwrap()
        .contains("not a message id"));
    let gone = http::get(admin, "/api/v1/messages/0000000000000000000000000000", None);
    assert_eq!(gone.status, 404, "{gone:?}");
    let output = queue(&relay, &["show", "0000000000000000000000000000"], None);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(text(&output).contains("HTTP 404"), "{}", text(&output));

    // A suspended domain shows as such.
    queue_ok(&relay, &["suspend", "later.test"]);
    let view = http::get(admin, &path, None).json();
    assert_eq!(view["recipients"][1]["state"], "suspended", "{view}");
}

/// The routes `node/src/admin.rs` registers, as (method, path): the open
/// ones in `open_routes`, the API ones in `api` under `/api/v1`; a resource's
/// methods follow it, on its line or the next ones.
fn served_routes() -> std::collections::BTreeSet<(String, String)> {
    let source = include_str!("../../node/src/admin.rs");
    let body = |head: &str| {
        let start = source.find(head).expect("the function is there");
        let end = start + source[start..].find("\n}\n").expect("its end");
        &source[start..end]
    };
    let mut routes = std::collections::BTreeSet::new();
    for (head, prefix) in [
        ("pub fn open_routes(", ""),
        ("fn dashboard(", ""),
        ("fn api(", "/api/v1"),
    ] {
        for resource in body(head).split("web::resource(\"").skip(1) {
            let path = resource.split('"').next().unwrap();
            for method in ["get", "post", "delete", "put"] {
                if resource.contains(&format!(".{method}(")) {
                    routes.insert((method.to_string(), format!("{prefix}{path}")));
                }
            }
        }
    }
    routes
}

/// `docs/openapi.json` describes exactly the routes the admin server
/// registers, and each operation, called on the real relay, answers with
/// a status the file documents and a body that has the documented fields.
#[test]
fn the_openapi_file_matches_the_routes_and_their_answers() {
    let spec: serde_json::Value =
        serde_json::from_str(include_str!("../../docs/openapi.json")).unwrap();
    let mut documented = std::collections::BTreeSet::new();
    for (path, operations) in spec["paths"].as_object().unwrap() {
        for method in operations.as_object().unwrap().keys() {
            documented.insert((method.clone(), path.clone()));
        }
    }
    let served = served_routes();
    assert!(served.len() >= 9, "{served:?}");
    assert_eq!(
        documented, served,
        "docs/openapi.json against node/src/admin.rs"
    );

    // Every operation, with an admin token, on a relay holding one message.
    let dead = free_port();
    let relay = Relay::start(
        "",
        &format!(
            "[[domains]]\nname = \"deferred.test\"\nsmart_host = \"[127.0.0.1]:{dead}\"\n\n\
             [[admin.operators]]\nname = \"ops\"\ntoken_hash = \"{}\"\nrole = \"admin\"\n",
            token_hash("admin-secret-token"),
        ),
    );
    let id = submit(&relay, "a@deferred.test", "documented");
    let schemas = &spec["components"]["schemas"];
    for (method, path) in &documented {
        let concrete = path
            .replace("{id}", &id)
            .replace("{domain}", "deferred.test")
            .replace("{location}", "00000000000000000001.journal.64.bad")
            .replace("{name}", "0000000000001-pickup-0");
        let open = spec["paths"][path][method]["security"] == serde_json::json!([]);
        let token = (!open).then_some("admin-secret-token");
        let answer = http::request(relay.admin_addr(), &method.to_uppercase(), &concrete, token);
        let documented = &spec["paths"][path][method]["responses"][answer.status.to_string()];
        assert!(
            documented.is_object(),
            "{method} {concrete} answered {} which docs/openapi.json does not list: {answer:?}",
            answer.status
        );
        let Some(schema) = documented["content"]["application/json"]["schema"].as_object() else {
            continue;
        };
        let schema = match schema.get("$ref").and_then(|r| r.as_str()) {
            Some(r) => &schemas[r.rsplit('/').next().unwrap()],
            None => &serde_json::Value::Object(schema.clone()),
        };
        let body = answer.json();
        for field in schema["required"].as_array().into_iter().flatten() {
            let field = field.as_str().unwrap();
            assert!(
                body.get(field).is_some(),
                "{method} {concrete}: no {field:?} in {body}"
            );
        }
        // Without a token the API refuses as documented.
        if !open {
            let refused =
                http::request(relay.admin_addr(), &method.to_uppercase(), &concrete, None);
            assert_eq!(refused.status, 401, "{method} {concrete}");
            assert!(spec["paths"][path][method]["responses"]["401"].is_object());
        }
    }
}

/// A message deferred with an hour to wait goes out at once after
/// `queue retry`; a viewer may not retry, and a retry of a message with
/// nothing deferred says so.
#[test]
fn a_retry_sends_a_deferred_message_now() {
    let sink = Sink::start(
        SinkOptions::default().script(serde_json::json!({"rcpt": {"b@later.test": [451, 250]}})),
    );
    let relay = Relay::start_with_env(
        "",
        &format!(
            "[[domains]]\nname = \"later.test\"\nsmart_host = \"{}\"\n\n\
             [[admin.operators]]\nname = \"ops\"\ntoken_hash = \"{}\"\nrole = \"admin\"\n\n\
             [[admin.operators]]\nname = \"noc\"\ntoken_hash = \"{}\"\nrole = \"viewer\"\n",
            sink.smart_host(),
            token_hash("admin-secret-token"),
            token_hash("viewer-secret-token"),
        ),
        &[("SMARTHOST__QUEUE__RETRY_INTERVALS", "1h")],
    );
    let id = submit(&relay, "b@later.test", "retried by hand");
    let admin = relay.admin_addr();
    let path = format!("/api/v1/messages/{id}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while http::get(admin, &path, Some("viewer-secret-token")).json()["recipients"][0]["state"]
        != "deferred"
    {
        assert!(Instant::now() < deadline, "never deferred");
        std::thread::sleep(POLL);
    }

    let refused = http::post(admin, &format!("{path}/retry"), Some("viewer-secret-token"));
    assert_eq!(refused.status, 403, "{refused:?}");
    let started = Instant::now();
    let said = relay.cli(
        &["queue", "retry", &id],
        &[("SMARTHOST_TOKEN", "admin-secret-token")],
    );
    assert!(said.status.success(), "{}", text(&said));
    assert_eq!(
        String::from_utf8_lossy(&said.stdout),
        format!("{id}: 1 deferred delivery is due now\n")
    );
    let arrived = sink.wait_for(1, Duration::from_secs(20));
    assert_eq!(arrived.len(), 1);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "an hour's wait cut to {:?}",
        started.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut gone = http::get(admin, &path, Some("viewer-secret-token"));
    while gone.status != 404 {
        assert!(Instant::now() < deadline, "still queued: {gone:?}");
        std::thread::sleep(POLL);
        gone = http::get(admin, &path, Some("viewer-secret-token"));
    }
    let again = http::post(admin, &format!("{path}/retry"), Some("admin-secret-token"));
    assert_eq!(again.status, 404, "{again:?}");
}

/// `queue delete` takes a waiting message out of the queue: by default
/// its sender gets a non-delivery report naming the operator's delete,
/// with `--silent` nobody hears; a viewer may not delete, and a notify
/// that is neither `bounce` nor `silent` is `400`.
#[test]
fn a_deleted_message_is_reported_to_its_sender_unless_silent() {
    let dead = free_port();
    let bounces = Sink::start(SinkOptions::default());
    let relay = Relay::start_with_env(
        "",
        &format!(
            "[[domains]]\nname = \"deferred.test\"\nsmart_host = \"[127.0.0.1]:{dead}\"\n\n\
             [[domains]]\nname = \"sender.test\"\nsmart_host = \"{}\"\n\n\
             [[admin.operators]]\nname = \"ops\"\ntoken_hash = \"{}\"\nrole = \"admin\"\n\n\
             [[admin.operators]]\nname = \"noc\"\ntoken_hash = \"{}\"\nrole = \"viewer\"\n",
            bounces.smart_host(),
            token_hash("admin-secret-token"),
            token_hash("viewer-secret-token"),
        ),
        &[("SMARTHOST__QUEUE__RETRY_INTERVALS", "1h")],
    );
    let admin = relay.admin_addr();
    let viewer = Some("viewer-secret-token");
    let wait_deferred = |id: &str| {
        let path = format!("/api/v1/messages/{id}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while http::get(admin, &path, viewer).json()["recipients"][0]["state"] != "deferred" {
            assert!(Instant::now() < deadline, "never deferred");
            std::thread::sleep(POLL);
        }
    };
    let delete = |args: &[&str]| {
        let mut all = vec!["queue", "delete"];
        all.extend_from_slice(args);
        let output = relay.cli(&all, &[("SMARTHOST_TOKEN", "admin-secret-token")]);
        assert!(output.status.success(), "{}", text(&output));
        String::from_utf8_lossy(&output.stdout).into_owned()
    };

    let id = submit(&relay, "a@deferred.test", "deleted with a report");
    wait_deferred(&id);
    let path = format!("/api/v1/messages/{id}");
    let refused = http::request(admin, "DELETE", &path, viewer);
    assert_eq!(refused.status, 403, "{refused:?}");
    let bad = http::request(
        admin,
        "DELETE",
        &format!("{path}?notify=maybe"),
        Some("admin-secret-token"),
    );
    assert_eq!(bad.status, 400, "{bad:?}");
    assert_eq!(
        delete(&[&id]),
        format!("{id}: 1 recipient deleted, the sender gets a report\n")
    );
    let reports = bounces.wait_for(1, Duration::from_secs(20));
    assert_eq!(reports[0].rcpt_tos, ["app@sender.test"]);
    smarthost_tests::scenario::assert_failure_report(&reports[0], "a@deferred.test");
    let report = String::from_utf8_lossy(&reports[0].body);
    assert!(
        report.contains("deleted from the queue by an operator"),
        "{report}"
    );
    assert_eq!(http::get(admin, &path, viewer).status, 404);

    let id = submit(&relay, "b@deferred.test", "deleted silently");
    wait_deferred(&id);
    assert_eq!(
        delete(&[&id, "--silent"]),
        format!("{id}: 1 recipient deleted, silently\n")
    );
    assert_eq!(
        http::get(admin, &format!("/api/v1/messages/{id}"), viewer).status,
        404
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(bounces.messages().len(), 1, "no report for a silent delete");
    let summary = queue(&relay, &["summary"], viewer);
    assert_eq!(
        count(&String::from_utf8_lossy(&summary.stdout), "messages"),
        Some(0)
    );
    assert!(relay
        .log()
        .contains("message deleted from the queue by an operator"));
}

/// Every page of `GET /api/v1/messages` with `query`, following
/// `next_cursor`: the ids of each page.
fn list_pages(relay: &Relay, query: &str) -> Vec<Vec<String>> {
    let mut pages = Vec::new();
    let mut cursor = String::new();
    for _ in 0..50 {
        let path = format!("/api/v1/messages?{query}{cursor}");
        let answer = http::get(relay.admin_addr(), &path, None);
        assert_eq!(answer.status, 200, "{path}: {answer:?}");
        let page = answer.json();
        let ids: Vec<String> = page["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect();
        if !ids.is_empty() {
            pages.push(ids);
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = format!("&cursor={next}"),
            None => return pages,
        }
    }
    panic!("{query}: more than 50 pages");
}

/// The queue is listed a page at a time, whole or by domain and state,
/// on the local spool and on Redis; bad queries get a precise `400`.
fn messages_are_listed_in_pages(env: &[(&str, &str)]) {
    let dead = free_port();
    let mut env = env.to_vec();
    env.push(("SMARTHOST__QUEUE__RETRY_INTERVALS", "1h"));
    let relay = Relay::start_with_env(
        "",
        &format!(
            "[[domains]]\nname = \"a.test\"\nsmart_host = \"[127.0.0.1]:{dead}\"\n\n\
             [[domains]]\nname = \"b.test\"\nsmart_host = \"[127.0.0.1]:{dead}\"\n"
        ),
        &env,
    );
    queue_ok(&relay, &["suspend", "b.test"]);
    let mut ids: Vec<String> = (0..3)
        .map(|n| submit(&relay, "x@a.test", &format!("to a {n}")))
        .collect();
    for n in 0..2 {
        let (mut c, _) = Client::connect(relay.smtp);
        c.expect("EHLO app.example", 250);
        let reply = c.send_message(
            "app@sender.test",
            &["y@b.test", "z@a.test"],
            &format!("Subject: to both {n}\r\n\r\nHello.\r\n"),
        );
        ids.push(queued_id(&reply));
        c.expect("QUIT", 221);
    }
    let (to_a, to_b) = (ids.clone(), ids[3..].to_vec());

    // The whole queue, two at a time, in receive order.
    let pages = list_pages(&relay, "limit=2");
    assert!(pages.iter().all(|p| p.len() <= 2), "{pages:?}");
    let listed: Vec<String> = pages.concat();
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(listed, sorted, "receive order");
    let mut all = ids.clone();
    all.sort();
    assert_eq!(listed, all);

    // By domain, in id order.
    let mut a: Vec<String> = list_pages(&relay, "domain=a.test&limit=2").concat();
    let mut want_a = to_a.clone();
    want_a.sort();
    assert_eq!(a, want_a);
    assert_eq!(list_pages(&relay, "domain=B.TEST").concat(), to_b);
    // By state: b.test is suspended; a.test's attempts fail and wait an
    // hour.
    assert_eq!(list_pages(&relay, "state=suspended").concat(), to_b);
    assert!(list_pages(&relay, "domain=a.test&state=suspended").is_empty());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        a = list_pages(&relay, "domain=a.test&state=deferred").concat();
        if a == want_a {
            break;
        }
        assert!(Instant::now() < deadline, "never all deferred: {a:?}");
        std::thread::sleep(POLL);
    }
    let page = http::get(relay.admin_addr(), "/api/v1/messages?domain=b.test", None).json();
    let both = &page["messages"][0];
    assert_eq!(both["recipients"][0]["state"], "suspended", "{page}");
    assert_eq!(both["recipients"][1]["state"], "deferred", "{page}");

    // The command line: a table, or one JSON object per line.
    let table = queue_ok(&relay, &["list"]);
    assert!(table.starts_with("ID "), "{table}");
    for id in &ids {
        assert!(table.contains(&format!("\n{id}  ")), "{id} in {table}");
    }
    assert!(table.contains("    y@b.test  suspended"), "{table}");
    let json = queue_ok(&relay, &["list", "--domain", "b.test", "--json"]);
    let listed: Vec<String> = json
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(listed, to_b);
    let two = queue_ok(&relay, &["list", "--limit", "2", "--json"]);
    assert_eq!(two.lines().count(), 2, "{two}");
    assert_eq!(
        queue_ok(&relay, &["list", "--domain", "c.test"]),
        "no messages\n"
    );

    // A deleted message leaves every listing.
    queue_ok(&relay, &["delete", "--silent", &to_b[0]]);
    assert_eq!(list_pages(&relay, "domain=b.test").concat(), &to_b[1..]);
    assert_eq!(list_pages(&relay, "").concat().len(), 4);

    // Bad queries.
    let cursor = http::get(relay.admin_addr(), "/api/v1/messages?limit=1", None).json()
        ["next_cursor"]
        .as_str()
        .unwrap()
        .to_string();
    for (query, error) in [
        (
            "state=bounced".to_string(),
            "state=\"bounced\": expected one of queued, deferred, suspended",
        ),
        ("limit=0".to_string(), "limit=0: expected 1 to 1000"),
        ("limit=1001".to_string(), "limit=1001: expected 1 to 1000"),
        (
            "cursor=zzz".to_string(),
            "cursor=\"zzz\" is not a cursor of this listing",
        ),
        (
            format!("domain=a.test&cursor={cursor}"),
            "is not a cursor of this listing",
        ),
        ("domain=-a-.test".to_string(), "-a-.test"),
    ] {
        let answer = http::get(
            relay.admin_addr(),
            &format!("/api/v1/messages?{query}"),
            None,
        );
        assert_eq!(answer.status, 400, "{query}: {answer:?}");
        let said = answer.json()["error"].as_str().unwrap().to_string();
        assert!(said.contains(error), "{query}: {said}");
    }
    let output = queue(&relay, &["list", "--state", "bounced"], None);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
}

#[test]
fn messages_are_listed_in_pages_on_the_local_spool() {
    messages_are_listed_in_pages(&[]);
}

#[test]
fn messages_are_listed_in_pages_on_redis() {
    on_redis(messages_are_listed_in_pages);
}

/// Runs `test` with the environment of a relay whose queue is on a Redis
/// server of its own.
fn on_redis(test: fn(&[(&str, &str)])) {
    let redis = smarthost_testkit::redis::RedisServer::start();
    let url = redis.url();
    test(&[
        ("SMARTHOST__QUEUE__BACKEND", "redis"),
        ("SMARTHOST__QUEUE__REDIS_URL", url.as_str()),
    ]);
}

/// `queue retry --domain` makes every deferred delivery to a domain due
/// now and `queue delete --domain` fails every recipient at a domain, a
/// page at a time with progress on stderr, leaving each message's other
/// domain as it was; a viewer may do neither, and a bulk call without a
/// domain is a precise `400`.
fn a_domain_is_retried_and_deleted_a_page_at_a_time(env: &[(&str, &str)]) {
    const MESSAGES: usize = 5;
    // later.test refuses each recipient once, then takes it; other.test
    // never answers.
    let script: serde_json::Map<String, serde_json::Value> = (0..MESSAGES)
        .map(|n| (format!("x{n}@later.test"), serde_json::json!([451, 250])))
        .collect();
    let sink = Sink::start(SinkOptions::default().script(serde_json::json!({ "rcpt": script })));
    let bounces = Sink::start(SinkOptions::default());
    let dead = free_port();
    let mut env = env.to_vec();
    env.push(("SMARTHOST__QUEUE__RETRY_INTERVALS", "1h"));
    let relay = Relay::start_with_env(
        "",
        &format!(
            "[[domains]]\nname = \"later.test\"\nsmart_host = \"{}\"\n\n\
             [[domains]]\nname = \"other.test\"\nsmart_host = \"[127.0.0.1]:{dead}\"\n\n\
             [[domains]]\nname = \"sender.test\"\nsmart_host = \"{}\"\n\n\
             [[admin.operators]]\nname = \"ops\"\ntoken_hash = \"{}\"\nrole = \"admin\"\n\n\
             [[admin.operators]]\nname = \"noc\"\ntoken_hash = \"{}\"\nrole = \"viewer\"\n",
            sink.smart_host(),
            bounces.smart_host(),
            token_hash("admin-secret-token"),
            token_hash("viewer-secret-token"),
        ),
        &env,
    );
    let admin = relay.admin_addr();
    let (ops, viewer) = (Some("admin-secret-token"), Some("viewer-secret-token"));
    for n in 0..MESSAGES {
        let (mut c, _) = Client::connect(relay.smtp);
        c.expect("EHLO app.example", 250);
        let reply = c.send_message(
            "app@sender.test",
            &[&format!("x{n}@later.test"), &format!("y{n}@other.test")],
            &format!("Subject: to both {n}\r\n\r\nHello.\r\n"),
        );
        assert_eq!(reply.code, 250, "{reply:?}");
        c.expect("QUIT", 221);
    }
    // Every delivery deferred, an hour to wait.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let counts = http::get(admin, "/api/v1/queue", viewer).json();
        if counts["deferred"] == 2 * MESSAGES as u64 {
            break;
        }
        assert!(Instant::now() < deadline, "never all deferred: {counts}");
        std::thread::sleep(POLL);
    }

    let refused = http::post(admin, "/api/v1/messages/retry?domain=later.test", viewer);
    assert_eq!(refused.status, 403, "{refused:?}");
    let refused = http::request(
        admin,
        "DELETE",
        "/api/v1/messages?domain=other.test",
        viewer,
    );
    assert_eq!(refused.status, 403, "{refused:?}");
    let unfiltered = http::post(admin, "/api/v1/messages/retry", ops);
    assert_eq!(unfiltered.status, 400, "{unfiltered:?}");
    assert!(
        unfiltered.json()["error"]
            .as_str()
            .unwrap()
            .contains("domain= or sender= is required"),
        "{unfiltered:?}"
    );

    let run = |args: &[&str]| {
        let mut all = vec!["queue"];
        all.extend_from_slice(args);
        let output = relay.cli(&all, &[("SMARTHOST_TOKEN", "admin-secret-token")]);
        assert!(output.status.success(), "{}", text(&output));
        (
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    // other.test first, while later.test waits its hour too.
    let (said, progress) = run(&["delete", "--domain", "other.test", "--batch", "2"]);
    assert_eq!(
        said,
        "other.test: 5 recipients deleted from 5 messages, the senders get reports\n"
    );
    assert_eq!(progress.lines().count(), 3, "{progress}");
    let reports = bounces.wait_for(MESSAGES, Duration::from_secs(20));
    for report in &reports {
        let body = String::from_utf8_lossy(&report.body);
        assert!(body.contains("@other.test"), "{body}");
        assert!(
            !body.contains("@later.test"),
            "only other.test is reported: {body}"
        );
        assert!(
            body.contains("deleted from the queue by an operator"),
            "{body}"
        );
    }
    let counts = http::get(admin, "/api/v1/queue", viewer).json();
    assert_eq!(counts["messages"], MESSAGES as u64, "{counts}");
    assert_eq!(counts["deferred"], MESSAGES as u64, "{counts}");
    assert!(
        counts["deliveries_by_domain"].get("other.test").is_none(),
        "{counts}"
    );

    let (said, progress) = run(&["retry", "--domain", "later.test", "--batch", "2"]);
    assert_eq!(
        said,
        "later.test: 5 deferred deliveries due now, of 5 messages queued for the domain\n"
    );
    assert_eq!(
        progress.lines().collect::<Vec<_>>(),
        [
            "later.test: 2 messages looked at, 2 deferred deliveries due now",
            "later.test: 4 messages looked at, 4 deferred deliveries due now",
            "later.test: 5 messages looked at, 5 deferred deliveries due now",
        ]
    );
    let arrived = sink.wait_for(MESSAGES, Duration::from_secs(20));
    let mut to: Vec<String> = arrived.iter().flat_map(|m| m.rcpt_tos.clone()).collect();
    to.sort();
    assert_eq!(
        to,
        (0..MESSAGES)
            .map(|n| format!("x{n}@later.test"))
            .collect::<Vec<_>>()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while http::get(admin, "/api/v1/queue", viewer).json()["messages"] != 0 {
        assert!(Instant::now() < deadline, "the queue never emptied");
        std::thread::sleep(POLL);
    }
    // With --json, each page's answer on a line of its own.
    let (said, _) = run(&["retry", "--domain", "later.test", "--json"]);
    let page: serde_json::Value = serde_json::from_str(said.trim_end()).unwrap();
    assert_eq!(
        page,
        serde_json::json!({"domain": "later.test", "examined": 0, "deliveries": 0, "next_cursor": null})
    );
    assert_eq!(bounces.messages().len(), MESSAGES, "one report per message");
}

#[test]
fn a_domain_is_retried_and_deleted_a_page_at_a_time_on_the_local_spool() {
    a_domain_is_retried_and_deleted_a_page_at_a_time(&[]);
}

#[test]
fn a_domain_is_retried_and_deleted_a_page_at_a_time_on_redis() {
    on_redis(a_domain_is_retried_and_deleted_a_page_at_a_time);
}

/// The messages of one sender are listed, retried and deleted a page at
/// a time (`?sender=`, `queue list|retry|delete --sender`), the address
/// matched with its domain in any case; the other sender's stay.
fn a_sender_is_listed_retried_and_deleted_a_page_at_a_time(env: &[(&str, &str)]) {
    // Each recipient is refused once, then taken.
    let script: serde_json::Map<String, serde_json::Value> = (0..5)
        .map(|n| (format!("x{n}@later.test"), serde_json::json!([451, 250])))
        .collect();
    let sink = Sink::start(SinkOptions::default().script(serde_json::json!({ "rcpt": script })));
    let mut env = env.to_vec();
    env.push(("SMARTHOST__QUEUE__RETRY_INTERVALS", "1h"));
    let relay = Relay::start_with_env(
        "",
        &format!(
            "[[domains]]\nname = \"later.test\"\nsmart_host = \"{}\"\n",
            sink.smart_host()
        ),
        &env,
    );
    let admin = relay.admin_addr();
    let mut alice = Vec::new();
    let mut bob = Vec::new();
    for n in 0..5 {
        let from = if n < 3 {
            "alice@app.test"
        } else {
            "Bob@App.Test"
        };
        let (mut c, _) = Client::connect(relay.smtp);
        c.expect("EHLO app.example", 250);
        let reply = c.send_message(
            from,
            &[&format!("x{n}@later.test")],
            &format!("Subject: from {from} {n}\r\n\r\nHello.\r\n"),
        );
        let id = queued_id(&reply);
        if n < 3 {
            alice.push(id)
        } else {
            bob.push(id)
        }
        c.expect("QUIT", 221);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while http::get(admin, "/api/v1/queue", None).json()["deferred"] != 5 {
        assert!(Instant::now() < deadline, "never all deferred");
        std::thread::sleep(POLL);
    }
    alice.sort();
    bob.sort();
    let pages = list_pages(&relay, "sender=alice@app.test&limit=2");
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [2, 1]);
    assert_eq!(pages.concat(), alice);
    assert_eq!(list_pages(&relay, "sender=Bob@APP.TEST").concat(), bob);
    assert_eq!(
        list_pages(&relay, "sender=%3CBob@app.test%3E").concat(),
        bob
    );
    assert!(
        list_pages(&relay, "sender=bob@app.test").is_empty(),
        "local parts keep their case"
    );
    assert_eq!(
        list_pages(&relay, "sender=alice@app.test&domain=later.test").concat(),
        alice
    );
    let bad = http::get(admin, "/api/v1/messages?sender=no-domain", None);
    assert_eq!(bad.status, 400, "{bad:?}");
    assert!(
        bad.json()["error"]
            .as_str()
            .unwrap()
            .starts_with("sender=\"no-domain\""),
        "{bad:?}"
    );
    let both = http::post(
        admin,
        "/api/v1/messages/retry?sender=alice@app.test&domain=later.test",
        None,
    );
    assert_eq!(both.status, 400, "{both:?}");

    let run = |args: &[&str]| {
        let mut all = vec!["queue"];
        all.extend_from_slice(args);
        let output = relay.cli(&all, &[]);
        assert!(output.status.success(), "{}", text(&output));
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let listed = run(&["list", "--sender", "alice@app.test", "--json"]);
    assert_eq!(listed.lines().count(), 3, "{listed}");
    assert_eq!(
        run(&["retry", "--sender", "alice@app.test", "--batch", "2"]),
        "alice@app.test: 3 deferred deliveries due now, of 3 messages queued from the sender\n"
    );
    let arrived = sink.wait_for(3, Duration::from_secs(20));
    let mut to: Vec<String> = arrived.iter().flat_map(|m| m.rcpt_tos.clone()).collect();
    to.sort();
    assert_eq!(to, ["x0@later.test", "x1@later.test", "x2@later.test"]);
    assert_eq!(
        run(&["delete", "--sender", "Bob@app.test", "--silent"]),
        "Bob@app.test: 2 recipients deleted from 2 messages, silently\n"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while http::get(admin, "/api/v1/queue", None).json()["messages"] != 0 {
        assert!(Instant::now() < deadline, "the queue never emptied");
        std::thread::sleep(POLL);
    }
    assert_eq!(
        run(&["list", "--sender", "alice@app.test"]),
        "no messages\n"
    );
    assert_eq!(sink.messages().len(), 3, "Bob's were deleted, not sent");
}

#[test]
fn a_sender_is_listed_retried_and_deleted_a_page_at_a_time_on_the_local_spool() {
    a_sender_is_listed_retried_and_deleted_a_page_at_a_time(&[]);
}

#[test]
fn a_sender_is_listed_retried_and_deleted_a_page_at_a_time_on_redis() {
    on_redis(a_sender_is_listed_retried_and_deleted_a_page_at_a_time);
}

/// `GET /api/v1/sessions` and `smarthost sessions` show each live SMTP
/// session with what it did so far, and forget it when it ends.
#[test]
fn live_sessions_are_shown_until_they_end() {
    let sink = Sink::start(SinkOptions::default());
    let relay = Relay::start(
        "",
        &format!(
            "[[domains]]\nname = \"dest.test\"\nsmart_host = \"{}\"\n",
            sink.smart_host()
        ),
    );
    let (quiet, _) = Client::connect(relay.smtp);
    let (mut busy, _) = Client::connect(relay.smtp);
    busy.expect("EHLO app.example", 250);
    for n in 0..2 {
        let reply = busy.send_message(
            "app@sender.test",
            &["a@dest.test"],
            &format!("Subject: {n}\r\n\r\nHello.\r\n"),
        );
        assert_eq!(reply.code, 250, "{reply:?}");
    }

    let said = relay.cli(&["sessions", "--json"], &[]);
    assert!(said.status.success(), "{}", text(&said));
    let views: Vec<serde_json::Value> = serde_json::from_slice(&said.stdout).unwrap();
    assert_eq!(views.len(), 2, "{views:?}");
    let busy_view = views
        .iter()
        .find(|v| v["helo"] == "app.example")
        .expect("the session that said EHLO");
    assert_eq!(busy_view["messages"], 2, "{busy_view}");
    assert_eq!(busy_view["tls"], false);
    assert_eq!(busy_view["user"], serde_json::Value::Null);
    assert!(
        !busy_view["node"].as_str().unwrap().is_empty(),
        "{busy_view}"
    );
    assert_eq!(busy_view["server"], relay.smtp.to_string());
    assert!(busy_view["client"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    let quiet_view = views.iter().find(|v| v["helo"].is_null()).unwrap();
    assert_eq!(quiet_view["messages"], 0);

    let table = relay.cli(&["sessions"], &[]);
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    assert!(table.starts_with("NODE "), "{table}");
    assert_eq!(table.lines().count(), 3, "{table}");
    assert!(table.contains("app.example"), "{table}");

    busy.expect("QUIT", 221);
    drop(quiet);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = http::get(relay.admin_addr(), "/api/v1/sessions", None).json();
        if left == serde_json::json!([]) {
            break;
        }
        assert!(Instant::now() < deadline, "sessions still shown: {left}");
        std::thread::sleep(POLL);
    }
    assert_eq!(
        String::from_utf8_lossy(&relay.cli(&["sessions"], &[]).stdout),
        "no SMTP sessions\n"
    );
}
