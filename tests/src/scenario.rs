//! The building blocks of the end-to-end delivery scenarios: a relay with
//! a delivery log and short network timeouts, routes to sinks, submission
//! over SMTP, and checks of the delivery log and of delivery status
//! notifications. Every wait is bounded.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mail_parser::{MessageParser, MimeHeaders};
use serde_json::Value;

use crate::relay::Relay;
use crate::sink::{ReceivedMessage, Sink};
use crate::smtp::{queued_id, Client};

pub const ARRIVAL: Duration = Duration::from_secs(30);
pub const POLL: Duration = Duration::from_millis(50);

/// A relay plus the directory its delivery log (and drop dirs) live in.
pub struct Setup {
    pub relay: Relay,
    pub log_file: PathBuf,
    _dir: tempfile::TempDir,
}

/// Starts a relay whose `[delivery]` section holds `delivery_lines` plus a
/// delivery log and short network timeouts, followed by `sections`;
/// `retry` (such as `"1s"`) sets `[queue] retry_intervals`.
pub fn start(delivery_lines: &str, sections: &str, retry: Option<&str>) -> Setup {
    start_in(
        tempfile::tempdir().unwrap(),
        delivery_lines,
        sections,
        retry,
    )
}

pub fn start_in(
    dir: tempfile::TempDir,
    delivery_lines: &str,
    sections: &str,
    retry: Option<&str>,
) -> Setup {
    let env: Vec<(&str, &str)> = retry
        .map(|r| vec![("SMARTHOST__QUEUE__RETRY_INTERVALS", r)])
        .unwrap_or_default();
    start_with_env(dir, delivery_lines, sections, &env)
}

/// [`start_in`] with environment variables for the relay, for the keys of
/// the `[queue]` section the harness writes itself
/// (`SMARTHOST__QUEUE__RETRY_INTERVALS`, `SMARTHOST__QUEUE__DELAY_NOTIFICATION`).
pub fn start_with_env(
    dir: tempfile::TempDir,
    delivery_lines: &str,
    sections: &str,
    env: &[(&str, &str)],
) -> Setup {
    start_as("run", dir, delivery_lines, sections, env)
}

/// [`start_with_env`] running `smarthost COMMAND` (`run`, `node` or
/// `coordinator`).
pub fn start_as(
    command: &'static str,
    dir: tempfile::TempDir,
    delivery_lines: &str,
    sections: &str,
    env: &[(&str, &str)],
) -> Setup {
    let log_file = dir.path().join("delivery.log");
    let delivery = format!(
        "[delivery]\nlog_file = {:?}\nconnect_timeout = \"5s\"\ngreeting_timeout = \"10s\"\n\
         command_timeout = \"10s\"\ndata_timeout = \"20s\"\n{delivery_lines}\n\n{sections}",
        log_file.display().to_string()
    );
    let relay = Relay::start_as(command, "", &delivery, env);
    Setup {
        relay,
        log_file,
        _dir: dir,
    }
}

/// A `[[domains]]` entry that routes `name` to `sink`.
pub fn route(name: &str, sink: &Sink) -> String {
    format!(
        "[[domains]]\nname = \"{name}\"\nsmart_host = \"{}\"\n",
        sink.smart_host()
    )
}

/// RFC 5321 4.5.2: a line that starts with a dot gets one more.
pub fn dot_stuff(content: &str) -> String {
    content
        .split_inclusive("\r\n")
        .map(|line| {
            if line.starts_with('.') {
                format!(".{line}")
            } else {
                line.to_string()
            }
        })
        .collect()
}

/// Submits `content` (CRLF line ends, as the author wrote it) and returns
/// the queue id from the 250 reply.
pub fn submit(relay: &Relay, from: &str, to: &[&str], content: &str) -> String {
    submit_to(relay.smtp, from, to, content)
}

/// [`submit`] to the SMTP server at `addr`.
pub fn submit_to(addr: SocketAddr, from: &str, to: &[&str], content: &str) -> String {
    let (mut c, greeting) = Client::connect(addr);
    assert_eq!(greeting.code, 220);
    c.expect("EHLO app.example", 250);
    let body = if content.is_ascii() {
        ""
    } else {
        " BODY=8BITMIME"
    };
    c.expect(&format!("MAIL FROM:<{from}>{body}"), 250);
    for rcpt in to {
        c.expect(&format!("RCPT TO:<{rcpt}>"), 250);
    }
    let reply = c.send_data(&dot_stuff(content));
    let id = queued_id(&reply);
    c.expect("QUIT", 221);
    id
}

/// A message with its own Message-ID and Date, so a relay has nothing to
/// add but its trace header.
pub fn message(to: &str, subject: &str, body: &str) -> String {
    format!(
        "From: app@sender.test\r\nTo: {to}\r\nSubject: {subject}\r\n\
         Date: Thu, 05 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{}@sender.test>\r\n\
         MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Transfer-Encoding: 8bit\r\n\r\n{body}",
        subject.replace(' ', "-")
    )
}

/// The delivered bytes are the submitted bytes under one `Received:` field.
#[track_caller]
pub fn assert_delivered_unchanged(got: &ReceivedMessage, submitted: &str) {
    assert!(
        got.body.starts_with(b"Received:"),
        "the relay's trace header comes first:\n{}",
        got.text()
    );
    assert!(
        got.body.ends_with(submitted.as_bytes()),
        "the message must end with exactly what was submitted:\n{}",
        got.text()
    );
    assert_eq!(
        String::from_utf8_lossy(got.without_first_received()),
        submitted,
        "only the Received: field may be added"
    );
}

/// The delivery log so far, one JSON object per line.
pub fn delivery_log(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: not JSON: {l:?}")))
        .collect()
}

/// How many deliveries each node's delivery log records, in node order.
pub fn delivered_per_node(nodes: &[Setup]) -> Vec<usize> {
    nodes
        .iter()
        .map(|s| {
            delivery_log(&s.log_file)
                .iter()
                .filter(|l| l["outcome"] == "delivered")
                .count()
        })
        .collect()
}

/// Waits (at most `timeout`) until the delivery log holds lines for which
/// `done` is true; returns the log, or panics with it.
#[track_caller]
pub fn wait_for_log(path: &Path, timeout: Duration, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let lines = delivery_log(path);
        if done(&lines) {
            return lines;
        }
        if Instant::now() >= deadline {
            panic!(
                "the delivery log did not show what was expected within {timeout:?}:\n{}",
                lines
                    .iter()
                    .map(Value::to_string)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        std::thread::sleep(POLL);
    }
}

pub fn lines_for<'a>(lines: &'a [Value], message_id: &str) -> Vec<&'a Value> {
    lines
        .iter()
        .filter(|l| l["message_id"] == message_id)
        .collect()
}

/// `dsn` is an RFC 3464 report from `<>` that `recipient` failed for good.
#[track_caller]
pub fn assert_failure_report(dsn: &ReceivedMessage, recipient: &str) {
    assert_report(dsn, recipient, "failed", "5.");
}

/// `dsn` is an RFC 3464 report from `<>` to one address whose
/// message/delivery-status part says `Action: action` and a `Status:`
/// starting with `status` for `recipient`.
#[track_caller]
pub fn assert_report(dsn: &ReceivedMessage, recipient: &str, action: &str, status: &str) {
    assert_eq!(dsn.mail_from, "", "reports are sent from <>");
    assert_eq!(dsn.rcpt_tos.len(), 1);
    let fields = delivery_status(dsn);
    for expected in [
        format!("action:{action}"),
        format!("status:{status}"),
        format!("final-recipient:rfc822;{}", recipient.to_ascii_lowercase()),
    ] {
        assert!(
            fields.contains(&expected),
            "{expected} in the delivery status:\n{fields}"
        );
    }
}

/// The message/delivery-status part of the multipart/report `dsn`, lower
/// case, without blanks; panics when `dsn` is no such report.
#[track_caller]
pub fn delivery_status(dsn: &ReceivedMessage) -> String {
    let parsed = MessageParser::default()
        .parse(&dsn.body)
        .expect("a parsable report");
    let ctype = parsed.content_type().expect("a Content-Type");
    assert!(
        ctype.ctype().eq_ignore_ascii_case("multipart")
            && ctype
                .subtype()
                .is_some_and(|s| s.eq_ignore_ascii_case("report")),
        "{ctype:?}"
    );
    assert_eq!(
        ctype.attribute("report-type").map(str::to_ascii_lowercase),
        Some("delivery-status".to_string())
    );
    let status = parsed
        .parts
        .iter()
        .find(|p| {
            p.content_type().is_some_and(|c| {
                c.ctype().eq_ignore_ascii_case("message")
                    && c.subtype()
                        .is_some_and(|s| s.eq_ignore_ascii_case("delivery-status"))
            })
        })
        .unwrap_or_else(|| panic!("no message/delivery-status part:\n{}", dsn.text()));
    String::from_utf8_lossy(status.contents())
        .to_ascii_lowercase()
        .replace([' ', '\t'], "")
}
