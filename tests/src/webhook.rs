//! A webhook endpoint (`peers/webhook_receiver.py`, Python's HTTP server)
//! that keeps every post it answered `200`, and the checks of what it got:
//! each post's signature is verified here, with the endpoint's secret.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_lc_rs::hmac;
use serde_json::Value;

const PYTHON: &str = "/usr/bin/python3";

pub struct Receiver {
    child: Child,
    addr: SocketAddr,
    out: PathBuf,
}

/// One event as the endpoint got it.
#[derive(Clone, Debug)]
pub struct Got {
    pub id: String,
    pub event: String,
    pub message_id: String,
    pub recipient: String,
    pub account: Option<String>,
    pub reply: Option<String>,
    pub json: Value,
}

impl Receiver {
    /// Listens on `addr`, answering every post with `status`; the posts
    /// it answers `2xx` go to `out` (kept across restarts of the
    /// endpoint).
    pub fn start(addr: SocketAddr, out: &Path, status: u16) -> Receiver {
        let mut child = Command::new(PYTHON)
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/webhook_receiver.py"))
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--out")
            .arg(out)
            .arg("--status")
            .arg(status.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {PYTHON} webhook_receiver.py: {e}"));
        let stdout = child.stdout.take().expect("stdout");
        let (ready, is_ready) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.trim() == "READY" {
                    let _ = ready.send(());
                }
            }
        });
        is_ready
            .recv_timeout(Duration::from_secs(20))
            .expect("the webhook endpoint listens");
        Receiver {
            child,
            addr,
            out: out.to_path_buf(),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/events", self.addr)
    }

    pub fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Every event posted to `path` so far, each post's signature checked
    /// against `secret` (and its timestamp within five minutes of now).
    #[track_caller]
    pub fn events(&self, path: &str, secret: &str) -> Vec<Got> {
        events_in(&self.out, path, secret)
    }

    /// Waits (at most `timeout`) until `done` holds for the events posted
    /// to `path`.
    #[track_caller]
    pub fn wait_for(
        &self,
        path: &str,
        secret: &str,
        timeout: Duration,
        done: impl Fn(&[Got]) -> bool,
    ) -> Vec<Got> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.events(path, secret);
            if done(&got) {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "the webhook endpoint got {} events within {timeout:?}: {:#?}",
                got.len(),
                got.iter()
                    .map(|g| (&g.event, &g.recipient))
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The events of the posts to `path` kept in `out`, signatures checked.
#[track_caller]
pub fn events_in(out: &Path, path: &str, secret: &str) -> Vec<Got> {
    let text = std::fs::read_to_string(out).unwrap_or_default();
    let mut got = Vec::new();
    for line in text.lines() {
        let post: Value = serde_json::from_str(line).expect("a kept post");
        if post["path"] != path {
            continue;
        }
        let headers = &post["headers"];
        let body = post["body"].as_str().expect("a body");
        let timestamp = headers["smarthost-timestamp"]
            .as_str()
            .expect("a Smarthost-Timestamp header");
        let signature = headers["smarthost-signature"]
            .as_str()
            .expect("a Smarthost-Signature header");
        assert_eq!(headers["content-type"], "application/json", "{post}");
        let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
        let expected = hmac::sign(&key, format!("{timestamp}.{body}").as_bytes());
        let hex: String = expected
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(signature, format!("v1={hex}"), "a bad signature on {post}");
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let sent: u64 = timestamp.parse().expect("a Unix time");
        assert!(now.abs_diff(sent) < 300, "timestamp {sent}, now {now}");
        let body: Value = serde_json::from_str(body).expect("a JSON body");
        for event in body["events"].as_array().expect("an events array") {
            let text = |name: &str| event[name].as_str().map(str::to_string);
            got.push(Got {
                id: text("id").expect("an id"),
                event: text("event").expect("an event"),
                message_id: text("message_id").expect("a message_id"),
                recipient: text("recipient").expect("a recipient"),
                account: text("account"),
                reply: text("reply"),
                json: event.clone(),
            });
        }
    }
    got
}

/// The events got, by (recipient, event), counting repeats of one id once.
pub fn by_recipient(got: &[Got]) -> BTreeMap<(String, String), usize> {
    let mut seen = std::collections::BTreeSet::new();
    let mut counts = BTreeMap::new();
    for g in got {
        if seen.insert(g.id.clone()) {
            *counts
                .entry((g.recipient.clone(), g.event.clone()))
                .or_insert(0) += 1;
        }
    }
    counts
}
