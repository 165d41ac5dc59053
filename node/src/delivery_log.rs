//! The delivery log: one JSON line per attempt and recipient, for the
//! operator who has to answer "what happened to my mail?".

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Serialize;

use crate::delivery::{MessageOutcome, RcptResult};
use crate::scheduler::Completion;

pub struct DeliveryLog {
    path: PathBuf,
    file: BufWriter<File>,
}

/// One line of the log.
#[derive(Serialize)]
struct Line<'a> {
    time: String,
    message_id: &'a str,
    domain: &'a str,
    recipient: String,
    remote_host: Option<&'a str>,
    remote_ip: Option<String>,
    /// Whether the message travelled over TLS.
    tls: bool,
    tls_version: Option<&'a str>,
    reply: &'a str,
    outcome: &'static str,
    attempt: u32,
    latency_ms: u64,
}

impl DeliveryLog {
    /// Opens the log for appending, creating it (and its directory).
    pub fn open(path: &Path) -> io::Result<DeliveryLog> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(DeliveryLog {
            path: path.to_path_buf(),
            file: BufWriter::new(file),
        })
    }

    /// Opens the file at the log's path again (after a rotation moved the
    /// old one away); on failure the old file stays in use.
    pub fn reopen(&mut self) -> io::Result<()> {
        *self = DeliveryLog::open(&self.path)?;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the lines of one attempt (or of an expiry, without outcome).
    pub fn write(
        &mut self,
        completion: &Completion,
        outcome: Option<&MessageOutcome>,
    ) -> io::Result<()> {
        let remote = outcome.and_then(|o| o.remote.as_ref());
        let latency_ms = outcome.map_or(0, |o| o.latency.as_millis() as u64);
        let time = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        for note in &completion.notes {
            let recipient = completion
                .record
                .envelope
                .recipients
                .get(note.recipient as usize)
                .map(|r| r.address.to_string())
                .unwrap_or_default();
            let line = Line {
                time: time.clone(),
                message_id: completion.record.id.as_str(),
                domain: &completion.domain,
                recipient,
                remote_host: remote.map(|r| r.host.as_str()),
                remote_ip: remote.and_then(|r| r.ip).map(|ip| ip.to_string()),
                tls: remote.is_some_and(|r| r.tls.is_some()),
                tls_version: remote.and_then(|r| r.tls.as_deref()),
                reply: &note.reply,
                outcome: match note.result {
                    RcptResult::Delivered => "delivered",
                    RcptResult::Deferred => "deferred",
                    RcptResult::Failed => "failed",
                },
                attempt: completion.attempt,
                latency_ms,
            };
            // Remote replies and addresses are chosen by others: the same
            // escaping as the JSON log, so a line is one line on any viewer.
            let json = serde_json::to_vec(&line)?;
            self.file
                .write_all(&crate::telemetry::escape_json_extras(&json))?;
            self.file.write_all(b"\n")?;
        }
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::delivery::{RcptOutcome, RemoteInfo};
    use crate::scheduler::{apply_outcome, RetryPolicy};
    use crate::spool::suite::message;
    use smarthost_proto::envelope::MessageRecord;

    /// What the queue records for `outcome` of `record`'s first attempt.
    fn complete(record: &MessageRecord, outcome: &MessageOutcome) -> Completion {
        let policy = RetryPolicy {
            intervals: vec![Duration::from_secs(1)],
            max_lifetime: Duration::from_secs(60),
            delay_notification: Duration::from_secs(30),
        };
        apply_outcome(
            record,
            "example.org",
            outcome,
            record.received_ms,
            &policy,
            0.0,
        )
    }

    #[test]
    fn one_json_line_per_recipient_with_every_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs/delivery.log");
        let mut log = DeliveryLog::open(&path).unwrap();
        let record = message(0, 10).record;
        let outcome = MessageOutcome {
            recipients: vec![RcptOutcome {
                recipient: 0,
                result: RcptResult::Delivered,
                reply: "250 2.0.0 ok".into(),
            }],
            remote: Some(RemoteInfo {
                host: "mx.example.org".into(),
                ip: Some("127.0.0.1".parse().unwrap()),
                tls: Some("TLSv1_3".into()),
            }),
            latency: Duration::from_millis(42),
        };
        let completion = complete(&record, &outcome);
        log.write(&completion, Some(&outcome)).unwrap();
        log.write(&completion, None).unwrap();
        drop(log);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        let line = &lines[0];
        assert_eq!(line["message_id"], record.id.as_str());
        assert_eq!(line["domain"], "example.org");
        assert_eq!(line["recipient"], "a@example.org");
        assert_eq!(line["remote_host"], "mx.example.org");
        assert_eq!(line["remote_ip"], "127.0.0.1");
        assert_eq!(line["tls"], true);
        assert_eq!(line["tls_version"], "TLSv1_3");
        assert_eq!(line["reply"], "250 2.0.0 ok");
        assert_eq!(line["outcome"], "delivered");
        assert_eq!(line["attempt"], 1);
        assert_eq!(line["latency_ms"], 42);
        assert!(lines[1]["remote_host"].is_null());
        assert_eq!(lines[1]["tls"], false);
    }

    #[test]
    fn a_hostile_remote_reply_stays_on_one_line_with_its_exact_text() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("delivery.log");
        let mut log = DeliveryLog::open(&path).unwrap();
        let record = message(0, 10).record;
        let reply = "550 no\r\n{\"forged\":1}\x1b[2J\u{85}\u{9b}\x7f\u{2028}";
        let outcome = MessageOutcome {
            recipients: vec![RcptOutcome {
                recipient: 0,
                result: RcptResult::Failed,
                reply: reply.into(),
            }],
            remote: None,
            latency: Duration::from_millis(1),
        };
        let completion = complete(&record, &outcome);
        log.write(&completion, Some(&outcome)).unwrap();
        drop(log);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.matches('\n').count(), 1, "{text:?}");
        assert!(
            !text.trim_end().contains(crate::telemetry::must_escape),
            "{text:?}"
        );
        let line: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(line["reply"], reply);
    }
}
