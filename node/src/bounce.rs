//! Delivery status notifications (RFC 3464) for what could not be
//! delivered or is late: built from a completion and queued like any mail,
//! from the null sender `<>`, to the original sender and, for failures, to
//! `bounce.copy_to`.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use smarthost_proto::address::Mailbox;
use smarthost_proto::dsn::{self, DsnAction, DsnRecipient, DsnReport};
use smarthost_proto::envelope::{
    BodyType, ClientInfo, Envelope, MessageId, MessageRecord, Recipient,
};
use smarthost_proto::mime8;
use smarthost_proto::reply::EnhancedStatus;

use crate::delivery::RcptResult;
use crate::scheduler::{Completion, RecipientNote};
use crate::spool::NewMessage;

/// Who reports, and who gets a copy of every failure report.
#[derive(Clone, Debug)]
pub struct ReportSettings {
    pub hostname: String,
    pub copy_to: Option<Mailbox>,
    /// For `Will-Retry-Until` in delay reports.
    pub max_lifetime: Duration,
}

impl Default for ReportSettings {
    fn default() -> Self {
        ReportSettings {
            hostname: "localhost".to_string(),
            copy_to: None,
            max_lifetime: Duration::from_secs(2 * 86400),
        }
    }
}

/// Whether a completion calls for any report. Never for a message from
/// `<>`: reports are not answered with reports.
pub fn needs_report(completion: &Completion) -> bool {
    dsn::may_send_dsn(&completion.record.envelope)
        && (completion.failed().next().is_some() || !completion.delayed.is_empty())
}

fn recipient(completion: &Completion, index: u32) -> Option<&Recipient> {
    completion.record.envelope.recipients.get(index as usize)
}

/// The report block of one recipient.
fn block(
    completion: &Completion,
    note: &RecipientNote,
    action: DsnAction,
    now_unix: u64,
    settings: &ReportSettings,
) -> Option<DsnRecipient> {
    let rcpt = recipient(completion, note.recipient)?;
    let is_reply = note
        .reply
        .get(..3)
        .is_some_and(|c| c.bytes().all(|b| b.is_ascii_digit()));
    let fallback = match action {
        DsnAction::Failed if note.reply.contains("expired") => EnhancedStatus(5, 4, 7),
        DsnAction::Failed => EnhancedStatus(5, 0, 0),
        _ => EnhancedStatus(4, 0, 0),
    };
    let mut status = dsn::status_of_reply(&note.reply, fallback);
    if action == DsnAction::Failed && status.0 != 5 {
        // A temporary error that outlived the queue: the failure is final.
        status = EnhancedStatus(5, 4, 7);
    }
    let mut block = DsnRecipient::new(rcpt, action, status);
    block.remote_mta = completion.remote_host.clone();
    if is_reply {
        block.diagnostic = Some(note.reply.clone());
    } else {
        block.reason = Some(note.reply.clone());
    }
    block.last_attempt_unix = Some(now_unix);
    if action == DsnAction::Delayed {
        block.will_retry_until_unix =
            Some(completion.record.received_ms / 1000 + settings.max_lifetime.as_secs());
    }
    Some(block)
}

/// Builds the report messages a completion calls for.
pub fn reports(
    completion: &Completion,
    original: &[u8],
    settings: &ReportSettings,
    now_ms: u64,
) -> Vec<NewMessage> {
    if !dsn::may_send_dsn(&completion.record.envelope) {
        return Vec::new();
    }
    let sender = completion
        .record
        .envelope
        .sender
        .clone()
        .expect("checked above");
    let now_unix = now_ms / 1000;
    let wanted = |note: &&RecipientNote, action| {
        recipient(completion, note.recipient).is_some_and(|r| dsn::should_notify(r, action))
    };

    let failed: Vec<&RecipientNote> = completion.failed().collect();
    let failed_for_sender: Vec<&RecipientNote> = failed
        .iter()
        .copied()
        .filter(|n| wanted(n, DsnAction::Failed))
        .collect();
    let delayed: Vec<RecipientNote> = completion
        .delayed
        .iter()
        .map(|&i| RecipientNote {
            recipient: i,
            result: RcptResult::Deferred,
            reply: completion
                .record
                .deliveries
                .iter()
                .find(|d| d.domain == completion.domain)
                .and_then(|d| d.last_error.clone())
                .unwrap_or_default(),
        })
        .collect();
    let delayed_for_sender: Vec<&RecipientNote> = delayed
        .iter()
        .filter(|n| wanted(n, DsnAction::Delayed))
        .collect();

    let build = |notes: &[&RecipientNote], action, to: Vec<Mailbox>| {
        let blocks: Vec<DsnRecipient> = notes
            .iter()
            .filter_map(|n| block(completion, n, action, now_unix, settings))
            .collect();
        report_message(completion, original, settings, now_ms, blocks, to)
    };

    let mut messages = Vec::new();
    let copy = settings.copy_to.clone().filter(|_| !failed.is_empty());
    match copy {
        // The sender sees the same failures as the copy: one message.
        Some(copy) if failed_for_sender.len() == failed.len() => messages.push(build(
            &failed,
            DsnAction::Failed,
            vec![sender.clone(), copy],
        )),
        Some(copy) => {
            if !failed_for_sender.is_empty() {
                messages.push(build(
                    &failed_for_sender,
                    DsnAction::Failed,
                    vec![sender.clone()],
                ));
            }
            messages.push(build(&failed, DsnAction::Failed, vec![copy]));
        }
        None if !failed_for_sender.is_empty() => messages.push(build(
            &failed_for_sender,
            DsnAction::Failed,
            vec![sender.clone()],
        )),
        None => {}
    }
    if !delayed_for_sender.is_empty() {
        messages.push(build(&delayed_for_sender, DsnAction::Delayed, vec![sender]));
    }
    messages
}

/// One report, queued from `<>`.
fn report_message(
    completion: &Completion,
    original: &[u8],
    settings: &ReportSettings,
    now_ms: u64,
    blocks: Vec<DsnRecipient>,
    to: Vec<Mailbox>,
) -> NewMessage {
    let id = MessageId::new(now_ms, rand::random());
    let body = dsn::build(&DsnReport {
        reporting_mta: &settings.hostname,
        dsn_id: id.as_str(),
        date_unix: now_ms / 1000,
        envelope: &completion.record.envelope,
        arrival_unix: completion.record.received_ms / 1000,
        original,
        recipients: blocks,
        return_cap: dsn::DEFAULT_RETURN_CAP,
    });
    let envelope = Envelope {
        sender: None,
        smtputf8: to.iter().any(Mailbox::needs_smtputf8),
        recipients: to
            .into_iter()
            .map(|address| Recipient {
                address,
                notify: None,
                orcpt: None,
            })
            .collect(),
        body: if mime8::is_8bit(&body) {
            BodyType::EightBitMime
        } else {
            BodyType::SevenBit
        },
        ret: None,
        envid: None,
    };
    let client = ClientInfo {
        ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        helo: settings.hostname.clone(),
        auth_user: None,
        tls: false,
    };
    let record = MessageRecord::new(id, now_ms, body.len() as u64, client, envelope);
    NewMessage { record, body }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use smarthost_proto::envelope::Notify;

    use super::*;
    use crate::delivery::{MessageOutcome, RcptOutcome, RemoteInfo};
    use crate::scheduler::{apply_outcome, RetryPolicy};
    use crate::spool::suite::message;

    fn settings(copy: bool) -> ReportSettings {
        ReportSettings {
            hostname: "relay.test".into(),
            copy_to: copy.then(|| Mailbox {
                local_part: "postmaster".into(),
                domain: "copy.test".into(),
            }),
            max_lifetime: Duration::from_secs(3600),
        }
    }

    fn policy() -> RetryPolicy {
        RetryPolicy {
            intervals: vec![Duration::from_secs(60)],
            max_lifetime: Duration::from_secs(3600),
            delay_notification: Duration::from_secs(600),
        }
    }

    /// Recipient 0 of test message 0 (at example.org) gets `result`.
    fn completion(
        record: &MessageRecord,
        result: RcptResult,
        reply: &str,
        at_ms: u64,
    ) -> Completion {
        let outcome = MessageOutcome {
            recipients: vec![RcptOutcome {
                recipient: 0,
                result,
                reply: reply.into(),
            }],
            remote: Some(RemoteInfo {
                host: "mx.example.org".into(),
                ip: None,
                tls: None,
            }),
            latency: Duration::ZERO,
        };
        apply_outcome(record, "example.org", &outcome, at_ms, &policy(), 0.0)
    }

    /// Recipient 0 refused with 550 5.1.1 at the time the message arrived.
    fn no_such_user(record: &MessageRecord) -> Completion {
        completion(
            record,
            RcptResult::Failed,
            "550 5.1.1 no such user",
            record.received_ms,
        )
    }

    fn text(message: &NewMessage) -> String {
        String::from_utf8_lossy(&message.body).into_owned()
    }

    #[test]
    fn a_failure_goes_to_the_sender_and_the_copy_from_the_null_sender() {
        let original = message(0, 200);
        let record = &original.record;
        let c = no_such_user(record);
        assert!(needs_report(&c));
        let reports = reports(&c, &original.body, &settings(true), record.received_ms);
        assert_eq!(reports.len(), 1);
        let report = &reports[0];
        assert_eq!(report.record.envelope.sender, None);
        let to: Vec<String> = report
            .record
            .envelope
            .recipients
            .iter()
            .map(|r| r.address.to_string())
            .collect();
        assert_eq!(to, ["app@sender.example", "postmaster@copy.test"]);
        let body = text(report);
        assert!(body.contains("report-type=delivery-status"), "{body}");
        assert!(body.contains("Action: failed"));
        assert!(body.contains("Status: 5.1.1"));
        assert!(body.contains("Final-Recipient: rfc822; a@example.org"));
        assert!(body.contains("Remote-MTA: dns; mx.example.org"));
        assert!(body.contains("Diagnostic-Code: smtp; 550 5.1.1 no such user"));
        assert_eq!(report.record.deliveries.len(), 2, "one delivery per domain");
    }

    #[test]
    fn a_report_is_never_answered_with_a_report() {
        let mut original = message(0, 200);
        original.record.envelope.sender = None;
        let record = &original.record;
        let c = no_such_user(record);
        assert!(!needs_report(&c));
        assert!(reports(&c, &original.body, &settings(true), record.received_ms).is_empty());
    }

    #[test]
    fn notify_never_silences_the_sender_but_not_the_copy() {
        let mut original = message(0, 200);
        original.record.envelope.recipients[0].notify = Some(Notify {
            never: true,
            ..Notify::default()
        });
        let record = &original.record;
        let c = no_such_user(record);
        let reports = reports(&c, &original.body, &settings(true), record.received_ms);
        assert_eq!(reports.len(), 1);
        assert_eq!(
            reports[0].record.envelope.recipients[0].address.to_string(),
            "postmaster@copy.test"
        );
        let c = no_such_user(record);
        assert!(
            super::reports(&c, &original.body, &settings(false), record.received_ms).is_empty()
        );
    }

    #[test]
    fn a_late_delivery_is_reported_once_as_delayed_to_the_sender_only() {
        let original = message(0, 200);
        let record = &original.record;
        let late = record.received_ms + 600_000;
        let c = completion(record, RcptResult::Deferred, "451 4.3.0 try later", late);
        assert_eq!(c.delayed, [0]);
        let reports = reports(&c, &original.body, &settings(true), late);
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].record.envelope.recipients.len(), 1);
        let body = text(&reports[0]);
        assert!(body.contains("Action: delayed"), "{body}");
        assert!(body.contains("Status: 4.3.0"));
        assert!(body.contains("Will-Retry-Until:"));
    }

    #[test]
    fn an_expired_delivery_fails_with_5_4_7() {
        let original = message(0, 200);
        let record = &original.record;
        let late = record.received_ms + 3_600_000;
        let c = completion(record, RcptResult::Deferred, "connection refused", late);
        assert_eq!(c.notes[0].result, RcptResult::Failed);
        let reports = reports(&c, &original.body, &settings(false), late);
        let body = text(&reports[0]);
        assert!(body.contains("Status: 5.4.7"), "{body}");
    }
}
