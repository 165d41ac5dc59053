//! One queued message as an operator sees it (`GET /api/v1/messages/{id}`,
//! `smarthost queue show`): its envelope, and per recipient where it
//! stands. A pure function of the record and the suspended domains.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use smarthost_proto::envelope::{DeliveryState, MessageRecord};

/// A queued message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageView {
    pub id: String,
    /// When the final dot was answered, in Unix milliseconds.
    pub received_ms: u64,
    pub size: u64,
    /// `""` for the null sender `<>`.
    pub sender: String,
    /// `ENVID=`, as received.
    pub envid: Option<String>,
    pub client: ClientView,
    pub recipients: Vec<RecipientView>,
}

/// Who handed the message in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientView {
    pub ip: String,
    pub helo: String,
    pub user: Option<String>,
    pub tls: bool,
}

/// One recipient and the delivery it waits in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecipientView {
    pub address: String,
    pub domain: String,
    /// `queued` (due now or new), `deferred` (waiting for its next
    /// attempt), `suspended` (its domain is held) or `done` (delivered or
    /// failed: the delivery log says which).
    pub state: String,
    /// Attempts made for its domain so far.
    pub attempts: u32,
    /// When it is tried next, in Unix milliseconds; `None` when done.
    pub next_attempt_ms: Option<u64>,
    /// The last reply or error of its domain's attempts.
    pub last_reply: Option<String>,
}

impl MessageView {
    pub fn of(record: &MessageRecord, suspended: &BTreeSet<String>) -> MessageView {
        let envelope = &record.envelope;
        let recipients = envelope
            .recipients
            .iter()
            .enumerate()
            .map(|(index, rcpt)| {
                let delivery = record
                    .deliveries
                    .iter()
                    .find(|d| d.recipients.contains(&(index as u32)));
                let state = match delivery {
                    None => "done",
                    Some(d) if suspended.contains(&d.domain) => "suspended",
                    Some(d) => match d.state {
                        DeliveryState::Queued => "queued",
                        DeliveryState::Deferred => "deferred",
                        DeliveryState::Suspended => "suspended",
                    },
                };
                RecipientView {
                    address: rcpt.address.to_string(),
                    domain: rcpt.address.domain.clone(),
                    state: state.to_string(),
                    attempts: delivery.map_or(0, |d| d.attempts),
                    next_attempt_ms: delivery.map(|d| d.next_attempt_ms),
                    last_reply: delivery.and_then(|d| d.last_error.clone()),
                }
            })
            .collect();
        MessageView {
            id: record.id.to_string(),
            received_ms: record.received_ms,
            size: record.size,
            sender: envelope
                .sender
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            envid: envelope.envid.clone(),
            client: ClientView {
                ip: record.client.ip.to_string(),
                helo: record.client.helo.clone(),
                user: record.client.auth_user.clone(),
                tls: record.client.tls,
            },
            recipients,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::suite::message;

    #[test]
    fn each_recipient_shows_the_state_of_its_domain() {
        // Message 0: a@example.org and b@example.net.
        let mut record = message(0, 100).record;
        let none = BTreeSet::new();
        let view = MessageView::of(&record, &none);
        assert_eq!(view.sender, "app@sender.example");
        let states: Vec<(&str, &str)> = view
            .recipients
            .iter()
            .map(|r| (r.address.as_str(), r.state.as_str()))
            .collect();
        assert_eq!(
            states,
            [("a@example.org", "queued"), ("b@example.net", "queued")]
        );

        // example.org was tried and deferred; example.net is done.
        record.deliveries[0].state = DeliveryState::Deferred;
        record.deliveries[0].attempts = 2;
        record.deliveries[0].last_error = Some("451 4.3.0 try later".into());
        record.deliveries.remove(1);
        record.envelope.sender = None;
        let view = MessageView::of(&record, &none);
        assert_eq!(view.sender, "");
        let org = &view.recipients[0];
        assert_eq!(
            (org.state.as_str(), org.attempts, org.last_reply.as_deref()),
            ("deferred", 2, Some("451 4.3.0 try later"))
        );
        let net = &view.recipients[1];
        assert_eq!((net.state.as_str(), net.next_attempt_ms), ("done", None));

        // A suspended domain shows as such whatever its delivery's state.
        let held = BTreeSet::from(["example.org".to_string()]);
        assert_eq!(
            MessageView::of(&record, &held).recipients[0].state,
            "suspended"
        );
    }
}
