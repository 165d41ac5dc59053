//! One queued message as an operator sees it (`GET /api/v1/messages/{id}`,
//! `smarthost queue show`): its envelope, and per recipient where it
//! stands. A pure function of the record and the suspended domains.
//!
//! Pages of messages (`GET /api/v1/messages`, `smarthost queue list`) are
//! made of the same views, with the cursor that continues them.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use smarthost_proto::envelope::{Delivery, DeliveryState, MessageId, MessageRecord};

use super::Index;
use crate::spool::ListCursor;

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
                let state = delivery.map_or("done", |d| state_of(d, suspended));
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

/// Where a pending delivery stands: `queued`, `deferred` or `suspended`.
fn state_of(delivery: &Delivery, suspended: &BTreeSet<String>) -> &'static str {
    if suspended.contains(&delivery.domain) {
        return "suspended";
    }
    match delivery.state {
        DeliveryState::Queued => "queued",
        DeliveryState::Deferred => "deferred",
        DeliveryState::Suspended => "suspended",
    }
}

/// The states a listing can ask for.
pub const LISTED_STATES: [&str; 3] = ["queued", "deferred", "suspended"];

/// Which messages a listing wants.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listing {
    /// Only messages with a delivery pending in this domain (the routing
    /// form: lower case, A-labels); `None`: the whole queue.
    pub domain: Option<String>,
    /// Only messages from this sender
    /// ([`smarthost_proto::envelope::sender_key`]).
    pub sender: Option<String>,
    /// Only messages with a delivery in this state (one of
    /// [`LISTED_STATES`]), in `domain` when one is given.
    pub state: Option<String>,
    /// Where the previous page ended.
    pub after: Option<PageCursor>,
}

impl Listing {
    /// The index the listing walks: the domain's when one is given (the
    /// sender is then a filter), else the sender's; `None`: the whole
    /// queue.
    pub fn index(&self) -> Option<Index> {
        match (&self.domain, &self.sender) {
            (Some(domain), _) => Some(Index::Domain(domain.clone())),
            (None, Some(sender)) => Some(Index::Sender(sender.clone())),
            (None, None) => None,
        }
    }

    /// Whether `record` is one the listing wants; the index it came from
    /// is already known to match.
    pub fn wants(&self, record: &MessageRecord, suspended: &BTreeSet<String>) -> bool {
        if self
            .sender
            .as_ref()
            .is_some_and(|sender| record.envelope.sender_key() != *sender)
        {
            return false;
        }
        let Some(state) = &self.state else {
            return true;
        };
        record.deliveries.iter().any(|d| {
            self.domain
                .as_ref()
                .is_none_or(|domain| &d.domain == domain)
                && state_of(d, suspended) == state
        })
    }
}

/// Where a page of a listing ended. The whole queue is listed in receive
/// order, a domain or a sender in id order (which starts with the receive
/// time), so the two cursors differ; both are opaque to clients.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PageCursor {
    Queue(ListCursor),
    Indexed(MessageId),
}

impl PageCursor {
    /// The text a client sends back: `<received ms>-<id>` or `<id>`.
    pub fn token(&self) -> String {
        match self {
            PageCursor::Queue(c) => format!("{}-{}", c.received_ms, c.id),
            PageCursor::Indexed(id) => id.to_string(),
        }
    }

    /// The cursor of a listing of the whole queue (`indexed` false) or of
    /// one domain or sender; `None` when `token` is not one this listing
    /// made.
    pub fn parse(token: &str, indexed: bool) -> Option<PageCursor> {
        if indexed {
            return MessageId::parse(token).map(PageCursor::Indexed);
        }
        let (received, rest) = token.split_once('-')?;
        Some(PageCursor::Queue(ListCursor {
            received_ms: received.parse().ok()?,
            id: MessageId::parse(rest)?,
        }))
    }
}

/// One page of a listing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessagePage {
    /// Fewer than asked for when a state filter left some out, or at the
    /// end.
    pub messages: Vec<MessageView>,
    /// Pass it as `cursor` for the next page; `None`: this was the last.
    pub next_cursor: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::suite::message;

    #[test]
    fn cursors_come_back_as_they_were_given() {
        let id = MessageId::new(1_700_000_000_123, 42);
        let queue = PageCursor::Queue(ListCursor {
            received_ms: 1_700_000_000_123,
            id: id.clone(),
        });
        assert_eq!(PageCursor::parse(&queue.token(), false), Some(queue));
        let domain = PageCursor::Indexed(id.clone());
        assert_eq!(PageCursor::parse(&domain.token(), true), Some(domain));
        // A cursor of one kind of listing is not one of the other.
        let queue_token = format!("5-{id}");
        assert_eq!(PageCursor::parse(&queue_token, true), None);
        assert_eq!(PageCursor::parse(id.as_str(), false), None);
        for bad in [
            "",
            "-",
            "x-",
            "12-",
            "12-XYZ",
            "1-0000",
            "abc-0123456789abcdef0123456789",
        ] {
            assert_eq!(PageCursor::parse(bad, false), None, "{bad}");
            assert_eq!(PageCursor::parse(bad, true), None, "{bad}");
        }
    }

    #[test]
    fn a_sender_filter_wants_that_sender_only_and_a_domain_comes_first() {
        let record = message(0, 100).record;
        let none = BTreeSet::new();
        let listing = |domain: Option<&str>, sender: Option<&str>| Listing {
            domain: domain.map(str::to_string),
            sender: sender.map(str::to_string),
            state: None,
            after: None,
        };
        let ours = "app@sender.example";
        assert!(listing(None, Some(ours)).wants(&record, &none));
        assert!(!listing(None, Some("other@sender.example")).wants(&record, &none));
        assert!(!listing(None, Some("<>")).wants(&record, &none));
        let mut bounce = record.clone();
        bounce.envelope.sender = None;
        assert!(listing(None, Some("<>")).wants(&bounce, &none));
        assert_eq!(
            listing(None, Some(ours)).index(),
            Some(Index::Sender(ours.into()))
        );
        assert_eq!(
            listing(Some("example.org"), Some(ours)).index(),
            Some(Index::Domain("example.org".into()))
        );
        assert_eq!(listing(None, None).index(), None);
    }

    #[test]
    fn a_state_filter_looks_at_the_listed_domain_only() {
        // Message 0: example.org and example.net, both queued.
        let mut record = message(0, 100).record;
        record.deliveries[0].state = DeliveryState::Deferred;
        let none = BTreeSet::new();
        let listing = |domain: Option<&str>, state: &str| Listing {
            domain: domain.map(str::to_string),
            sender: None,
            state: Some(state.to_string()),
            after: None,
        };
        assert!(listing(None, "deferred").wants(&record, &none));
        assert!(listing(None, "queued").wants(&record, &none));
        assert!(listing(Some("example.org"), "deferred").wants(&record, &none));
        assert!(!listing(Some("example.net"), "deferred").wants(&record, &none));
        assert!(!listing(None, "suspended").wants(&record, &none));
        let held = BTreeSet::from(["example.net".to_string()]);
        assert!(listing(Some("example.net"), "suspended").wants(&record, &held));
        assert!(Listing::default().wants(&record, &none));
    }

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
