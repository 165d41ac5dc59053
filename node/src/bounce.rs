//! Delivery status notifications (RFC 3464) for what could not be
//! delivered or is late: built from a completion and queued like any mail,
//! from the null sender `<>`, to the original sender and, for failures, to
//! `bounce.copy_to`. A message from `<>` that fails (most often a report
//! itself: a double bounce) cannot go back; it goes to the postmaster, and
//! with no postmaster (or when the postmaster's notice fails) to badmail.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use smarthost_proto::address::Mailbox;
use smarthost_proto::dsn::{self, DsnAction, DsnRecipient, DsnReport};
use smarthost_proto::envelope::{
    BodyType, ClientInfo, Envelope, MessageId, MessageRecord, Recipient,
};
use smarthost_proto::mime8;
use smarthost_proto::reply::EnhancedStatus;

use crate::badmail::{Badmail, KeptEnvelope, Note, Source};
use crate::delivery::RcptResult;
use crate::scheduler::{Completion, RecipientNote};
use crate::spool::NewMessage;

/// Who reports, and who gets a copy of every failure report.
#[derive(Clone, Debug)]
pub struct ReportSettings {
    pub hostname: String,
    pub copy_to: Option<Mailbox>,
    /// Where failures of messages from `<>` are reported; `None`: they go
    /// to badmail.
    pub double_bounce_to: Option<Mailbox>,
    /// For `Will-Retry-Until` in delay reports.
    pub max_lifetime: Duration,
    /// Where failures that no report covers are kept ([`unreported`]);
    /// `None`: they are only in the delivery log.
    pub badmail: Option<Arc<Badmail>>,
}

impl Default for ReportSettings {
    fn default() -> Self {
        ReportSettings {
            hostname: "localhost".to_string(),
            copy_to: None,
            double_bounce_to: None,
            max_lifetime: Duration::from_secs(2 * 86400),
            badmail: None,
        }
    }
}

/// A double bounce returns the failed message whole when it is a report
/// (at most the original's cap plus the report around it), so the
/// postmaster sees whose mail it was.
const DOUBLE_BOUNCE_RETURN_CAP: usize = 2 * dsn::DEFAULT_RETURN_CAP;

/// Whether a completion calls for any report. A message from `<>` is
/// never answered to its sender; its failures go to the postmaster, but
/// never those of the postmaster's own notices (no triple bounce).
pub fn needs_report(completion: &Completion, settings: &ReportSettings) -> bool {
    if dsn::may_send_dsn(&completion.record.envelope) {
        completion.failed().next().is_some() || !completion.delayed.is_empty()
    } else {
        !double_bounced(completion, settings).is_empty()
            || (settings.badmail.is_some() && !unreported(completion, settings).is_empty())
    }
}

/// The failures of a message from `<>` that no report covers: all of them
/// when there is no postmaster to tell, else those of the postmaster's
/// own notices. They are kept in badmail rather than dropped.
pub fn unreported<'a>(
    completion: &'a Completion,
    settings: &ReportSettings,
) -> Vec<&'a RecipientNote> {
    if dsn::may_send_dsn(&completion.record.envelope) {
        return Vec::new();
    }
    let postmaster = settings.double_bounce_to.as_ref();
    completion
        .failed()
        .filter(|n| {
            postmaster.is_none_or(|postmaster| {
                recipient(completion, n.recipient).is_some_and(|r| r.address == *postmaster)
            })
        })
        .collect()
}

/// The badmail entry of a completion's [`unreported`] failures, if any:
/// its name is the same however often the completion is reported (a
/// write tried again keeps one entry), and its note names each recipient
/// with its reply.
pub fn badmail_entry(completion: &Completion, settings: &ReportSettings) -> Option<(String, Note)> {
    let failed = unreported(completion, settings);
    let first = failed.first()?;
    let record = &completion.record;
    let name = format!(
        "{:013}-report-{}-{}",
        record.received_ms, record.id, first.recipient
    );
    let failed: Vec<(&Recipient, &str)> = failed
        .iter()
        .filter_map(|n| Some((recipient(completion, n.recipient)?, n.reply.as_str())))
        .collect();
    let why = match settings.double_bounce_to {
        None => {
            "a message from <> failed and no postmaster is set to be told \
                 (bounce.double_bounce_to, smtp.postmaster, bounce.copy_to)"
        }
        Some(_) => "a notice to the postmaster failed",
    };
    let replies: Vec<String> = failed
        .iter()
        .map(|(r, reply)| format!("{}: {reply}", r.address))
        .collect();
    let note = Note {
        source: Source::Report,
        reason: format!("{why}: {}", replies.join("; ")),
        file: None,
        envelope: Some(KeptEnvelope {
            sender: "<>".into(),
            recipients: failed.iter().map(|(r, _)| r.address.to_string()).collect(),
        }),
    };
    Some((name, note))
}

/// The failures of a message from `<>` that go to the postmaster: all but
/// those of the postmaster itself.
fn double_bounced<'a>(
    completion: &'a Completion,
    settings: &ReportSettings,
) -> Vec<&'a RecipientNote> {
    let Some(postmaster) = &settings.double_bounce_to else {
        return Vec::new();
    };
    completion
        .failed()
        .filter(|n| recipient(completion, n.recipient).is_some_and(|r| r.address != *postmaster))
        .collect()
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
        let failed = double_bounced(completion, settings);
        let Some(postmaster) = settings
            .double_bounce_to
            .as_ref()
            .filter(|_| !failed.is_empty())
        else {
            return Vec::new();
        };
        let blocks = failed
            .iter()
            .filter_map(|n| block(completion, n, DsnAction::Failed, now_ms / 1000, settings))
            .collect();
        return vec![report_message(
            completion,
            original,
            settings,
            now_ms,
            blocks,
            Addressing::Postmaster(postmaster),
        )];
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
        report_message(
            completion,
            original,
            settings,
            now_ms,
            blocks,
            Addressing::Sender(to),
        )
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

/// Who a report goes to.
enum Addressing<'a> {
    /// The original sender (and copies).
    Sender(Vec<Mailbox>),
    /// The postmaster alone, for a message from `<>`.
    Postmaster(&'a Mailbox),
}

/// One report, queued from `<>`.
fn report_message(
    completion: &Completion,
    original: &[u8],
    settings: &ReportSettings,
    now_ms: u64,
    blocks: Vec<DsnRecipient>,
    addressing: Addressing,
) -> NewMessage {
    let id = MessageId::new(now_ms, rand::random());
    let (to, postmaster, return_cap) = match addressing {
        Addressing::Sender(to) => (to, None, dsn::DEFAULT_RETURN_CAP),
        Addressing::Postmaster(postmaster) => (
            vec![postmaster.clone()],
            Some(postmaster),
            DOUBLE_BOUNCE_RETURN_CAP,
        ),
    };
    let body = dsn::build(&DsnReport {
        reporting_mta: &settings.hostname,
        dsn_id: id.as_str(),
        date_unix: now_ms / 1000,
        envelope: &completion.record.envelope,
        arrival_unix: completion.record.received_ms / 1000,
        original,
        recipients: blocks,
        return_cap,
        postmaster,
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
    NewMessage {
        record,
        body: body.into(),
    }
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
            double_bounce_to: None,
            max_lifetime: Duration::from_secs(3600),
            badmail: None,
        }
    }

    fn postmaster() -> Mailbox {
        Mailbox {
            local_part: "hostmaster".into(),
            domain: "relay.test".into(),
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

    /// Who a report goes to.
    fn to(message: &NewMessage) -> Vec<String> {
        let recipients = &message.record.envelope.recipients;
        recipients.iter().map(|r| r.address.to_string()).collect()
    }

    fn text(message: &NewMessage) -> String {
        String::from_utf8_lossy(message.body.head()).into_owned()
    }

    #[test]
    fn a_failure_goes_to_the_sender_and_the_copy_from_the_null_sender() {
        let original = message(0, 200);
        let record = &original.record;
        let c = no_such_user(record);
        assert!(needs_report(&c, &settings(false)));
        let reports = reports(
            &c,
            original.body.head(),
            &settings(true),
            record.received_ms,
        );
        assert_eq!(reports.len(), 1);
        let report = &reports[0];
        assert_eq!(report.record.envelope.sender, None);
        assert_eq!(to(report), ["app@sender.example", "postmaster@copy.test"]);
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
        assert!(!needs_report(&c, &settings(true)));
        assert!(reports(
            &c,
            original.body.head(),
            &settings(true),
            record.received_ms
        )
        .is_empty());
    }

    #[test]
    fn a_failed_message_from_the_null_sender_goes_whole_to_the_postmaster() {
        let mut original = message(0, 200);
        original.record.envelope.sender = None;
        // A failed report is as large as the original's cap plus its own parts.
        let mut body = original.body.into_head();
        body.extend(std::iter::repeat_n(b'x', dsn::DEFAULT_RETURN_CAP));
        body.extend_from_slice(b"\r\n");
        original.body = body.into();
        let record = &original.record;
        let c = no_such_user(record);
        let with_postmaster = ReportSettings {
            double_bounce_to: Some(postmaster()),
            ..settings(true)
        };
        assert!(needs_report(&c, &with_postmaster));
        let reports = reports(
            &c,
            original.body.head(),
            &with_postmaster,
            record.received_ms,
        );
        assert_eq!(reports.len(), 1, "to the postmaster only, not the copy");
        let notice = &reports[0];
        assert_eq!(notice.record.envelope.sender, None);
        assert_eq!(to(notice), ["hostmaster@relay.test"]);
        let body = text(notice);
        assert!(body.contains("To: <hostmaster@relay.test>"), "{body}");
        assert!(body.contains("Subject: Postmaster Notice"), "{body}");
        assert!(body.contains("Final-Recipient: rfc822; a@example.org"));
        assert!(body.contains("Status: 5.1.1"));
        assert!(
            body.contains("Content-Type: message/rfc822"),
            "returned whole"
        );
        assert!(notice.body.len() > dsn::DEFAULT_RETURN_CAP as u64);
    }

    #[test]
    fn a_postmaster_notice_that_fails_is_not_reported_again() {
        let mut original = message(0, 200);
        original.record.envelope.sender = None;
        original.record.envelope.recipients[0].address = postmaster();
        let record = &original.record;
        let with_postmaster = ReportSettings {
            double_bounce_to: Some(postmaster()),
            ..settings(false)
        };
        let outcome = MessageOutcome {
            recipients: vec![RcptOutcome {
                recipient: 0,
                result: RcptResult::Failed,
                reply: "550 5.1.1 no such user".into(),
            }],
            remote: None,
            latency: Duration::ZERO,
        };
        let domain = &record.deliveries[0].domain.clone();
        let c = apply_outcome(record, domain, &outcome, record.received_ms, &policy(), 0.0);
        assert_eq!(c.failed().count(), 1);
        assert!(!needs_report(&c, &with_postmaster));
        assert!(reports(
            &c,
            original.body.head(),
            &with_postmaster,
            record.received_ms
        )
        .is_empty());
    }

    #[test]
    fn failures_no_report_covers_are_for_badmail_and_only_those() {
        let dir = tempfile::tempdir().unwrap();
        let badmail = Arc::new(Badmail::open(dir.path()).unwrap());
        let mut original = message(0, 200);
        original.record.envelope.sender = None;
        let record = &original.record;
        let c = no_such_user(record);
        // No postmaster: the failure is kept, with the envelope to replay.
        let keeping = ReportSettings {
            badmail: Some(badmail.clone()),
            ..settings(false)
        };
        assert!(!needs_report(&c, &settings(false)), "nowhere to keep it");
        assert!(needs_report(&c, &keeping));
        assert!(reports(&c, original.body.head(), &keeping, 0).is_empty());
        let (name, note) = badmail_entry(&c, &keeping).unwrap();
        assert!(crate::badmail::valid_name(&name), "{name}");
        assert_eq!(badmail_entry(&c, &keeping).unwrap().0, name, "stable");
        assert_eq!(note.source, Source::Report);
        assert!(
            note.reason.contains("a@example.org: 550 5.1.1"),
            "{}",
            note.reason
        );
        let envelope = note.envelope.unwrap();
        assert_eq!(
            (envelope.sender.as_str(), envelope.recipients),
            ("<>", vec!["a@example.org".to_string()])
        );
        // With a postmaster the failure is reported, not kept...
        let reported = ReportSettings {
            double_bounce_to: Some(postmaster()),
            ..keeping.clone()
        };
        assert!(badmail_entry(&c, &reported).is_none());
        // ...unless it is the postmaster's own notice that failed.
        let mut notice = message(0, 200);
        notice.record.envelope.sender = None;
        notice.record.envelope.recipients[0].address = postmaster();
        let c = no_such_user(&notice.record);
        assert!(reports(&c, notice.body.head(), &reported, 0).is_empty());
        let (_, note) = badmail_entry(&c, &reported).unwrap();
        assert!(note.reason.starts_with("a notice to the postmaster failed"));
        // A sender's message is reported to the sender, never kept.
        let original = message(0, 200);
        assert!(badmail_entry(&no_such_user(&original.record), &keeping).is_none());
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
        let reports = reports(
            &c,
            original.body.head(),
            &settings(true),
            record.received_ms,
        );
        assert_eq!(reports.len(), 1);
        assert_eq!(
            reports[0].record.envelope.recipients[0].address.to_string(),
            "postmaster@copy.test"
        );
        let c = no_such_user(record);
        assert!(super::reports(
            &c,
            original.body.head(),
            &settings(false),
            record.received_ms
        )
        .is_empty());
    }

    #[test]
    fn a_late_delivery_is_reported_once_as_delayed_to_the_sender_only() {
        let original = message(0, 200);
        let record = &original.record;
        let late = record.received_ms + 600_000;
        let c = completion(record, RcptResult::Deferred, "451 4.3.0 try later", late);
        assert_eq!(c.delayed, [0]);
        let reports = reports(&c, original.body.head(), &settings(true), late);
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
        let reports = reports(&c, original.body.head(), &settings(false), late);
        let body = text(&reports[0]);
        assert!(body.contains("Status: 5.4.7"), "{body}");
    }
}
