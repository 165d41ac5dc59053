//! The envelope of an accepted message and the records every spool stores.
//!
//! A message is stored once; its recipients are grouped by destination
//! domain into deliveries, and retries and outcomes are kept per delivery.
//! Records are encoded with `bincode` behind a version byte so that a node
//! of a newer release can still read what an older one wrote.

use std::fmt;
use std::net::IpAddr;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::address::Mailbox;

/// The version byte written in front of every encoded record.
pub const RECORD_VERSION: u8 = 1;

/// A queue-wide unique message id: the acceptance time in milliseconds and
/// 64 random bits, as 28 lower-case hex digits (sortable by time).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MessageId(pub String);

impl MessageId {
    pub fn new(unix_millis: u64, random: u64) -> Self {
        MessageId(format!(
            "{:012x}{:016x}",
            unix_millis & 0xffff_ffff_ffff,
            random
        ))
    }

    /// An id in the form [`MessageId::new`] makes (28 lower-case hex
    /// digits), as an operator or a client hands one back; `None` for
    /// anything else, so that nothing else reaches the queue's keys.
    pub fn parse(text: &str) -> Option<MessageId> {
        let valid = text.len() == 28
            && text
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        valid.then(|| MessageId(text.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// When the message was received, in ms since the epoch, as the id's
    /// first 12 hex digits carry it; `None` for an id not made by
    /// [`MessageId::new`].
    pub fn received_ms(&self) -> Option<u64> {
        let hex = self.0.get(..12)?;
        u64::from_str_radix(hex, 16).ok()
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The `BODY=` parameter of MAIL (RFC 6152, RFC 3030).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum BodyType {
    #[default]
    SevenBit,
    EightBitMime,
    BinaryMime,
}

/// The DSN `RET=` parameter (RFC 3461): what a bounce carries back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ret {
    Full,
    Headers,
}

/// The DSN `NOTIFY=` parameter of one recipient (RFC 3461). `never` excludes
/// the others.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notify {
    pub never: bool,
    pub success: bool,
    pub failure: bool,
    pub delay: bool,
}

/// One envelope recipient with its DSN parameters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    pub address: Mailbox,
    pub notify: Option<Notify>,
    /// `ORCPT=` as received: `addr-type;xtext-address`.
    pub orcpt: Option<String>,
}

/// The SMTP envelope of one message as accepted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// `None` is the null reverse path `<>` (bounces must not be answered).
    pub sender: Option<Mailbox>,
    pub recipients: Vec<Recipient>,
    pub body: BodyType,
    pub smtputf8: bool,
    pub ret: Option<Ret>,
    /// `ENVID=` as received (xtext).
    pub envid: Option<String>,
}

impl Envelope {
    /// The sender as the queue's listings know it ([`sender_key`]).
    pub fn sender_key(&self) -> String {
        sender_key(self.sender.as_ref())
    }
}

/// A sender as the queue's listings index it: the address as parsed
/// (domain in its routing form), or `<>` for the null reverse path.
pub fn sender_key(sender: Option<&Mailbox>) -> String {
    sender.map_or_else(|| "<>".to_string(), ToString::to_string)
}

/// Who handed the message to us.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientInfo {
    pub ip: IpAddr,
    pub helo: String,
    pub auth_user: Option<String>,
    pub tls: bool,
}

/// Where one delivery stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeliveryState {
    /// Waiting for its next attempt (at once for new mail).
    Queued,
    /// Deferred after a temporary failure.
    Deferred,
    /// Held by an operator: kept, not attempted.
    Suspended,
}

/// The recipients of one message that share a destination domain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    pub domain: String,
    /// Indices into [`Envelope::recipients`].
    pub recipients: Vec<u32>,
    pub state: DeliveryState,
    pub attempts: u32,
    pub next_attempt_ms: u64,
    /// The last temporary failure, for the delay and expiry reports.
    pub last_error: Option<String>,
    /// The one `Action: delayed` report has been sent.
    pub delay_notified: bool,
}

/// The spool's record of one message, without its body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageRecord {
    pub id: MessageId,
    pub received_ms: u64,
    pub size: u64,
    pub client: ClientInfo,
    pub envelope: Envelope,
    /// What is left to deliver; the message is removed when this is empty.
    pub deliveries: Vec<Delivery>,
}

impl MessageRecord {
    /// A new record whose recipients are grouped into one delivery per
    /// domain, in the order the domains first appear.
    pub fn new(
        id: MessageId,
        received_ms: u64,
        size: u64,
        client: ClientInfo,
        envelope: Envelope,
    ) -> Self {
        let deliveries = split_deliveries(&envelope, received_ms);
        MessageRecord {
            id,
            received_ms,
            size,
            client,
            envelope,
            deliveries,
        }
    }
}

/// Groups the recipients of an envelope by domain.
pub fn split_deliveries(envelope: &Envelope, now_ms: u64) -> Vec<Delivery> {
    let mut deliveries: Vec<Delivery> = Vec::new();
    for (index, rcpt) in envelope.recipients.iter().enumerate() {
        let domain = &rcpt.address.domain;
        match deliveries.iter_mut().find(|d| &d.domain == domain) {
            Some(d) => d.recipients.push(index as u32),
            None => deliveries.push(Delivery {
                domain: domain.clone(),
                recipients: vec![index as u32],
                state: DeliveryState::Queued,
                attempts: 0,
                next_attempt_ms: now_ms,
                last_error: None,
                delay_notified: false,
            }),
        }
    }
    deliveries
}

/// Decoding a stored record failed.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("empty record")]
    Empty,
    #[error("record version {0} is newer than this release understands ({RECORD_VERSION})")]
    UnknownVersion(u8),
    #[error("malformed record: {0}")]
    Malformed(String),
}

fn bincode_config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Encodes a record behind the version byte.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(value, &mut out);
    out
}

/// Appends what [`encode`] gives to `out`. The value is serialised
/// straight into `out`: what is encoded can carry a message body of
/// megabytes, which should not be copied through a buffer of its own.
pub fn encode_into<T: Serialize>(value: &T, out: &mut Vec<u8>) {
    out.push(RECORD_VERSION);
    // Serialising plain data structs into a Vec cannot fail.
    bincode::serde::encode_into_std_write(value, out, bincode_config())
        .expect("records are plain data and always encode");
}

/// Decodes a record written by [`encode`] (this or an older version).
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, RecordError> {
    let (value, used) = decode_prefix(bytes)?;
    if used != bytes.len() {
        return Err(RecordError::Malformed(format!(
            "{} trailing bytes",
            bytes.len() - used
        )));
    }
    Ok(value)
}

/// Decodes the value at the start of `bytes`, written by [`encode`] in
/// front of more, and says how many bytes it took (the version byte
/// included): how a large value is read a part at a time.
pub fn decode_prefix<T: DeserializeOwned>(bytes: &[u8]) -> Result<(T, usize), RecordError> {
    let (&version, rest) = bytes.split_first().ok_or(RecordError::Empty)?;
    if version != RECORD_VERSION {
        return Err(RecordError::UnknownVersion(version));
    }
    let (value, used) = bincode::serde::decode_from_slice(rest, bincode_config())
        .map_err(|e| RecordError::Malformed(e.to_string()))?;
    Ok((value, 1 + used))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_carries_its_receive_time() {
        let id = MessageId::new(1_764_000_000_123, 0xdead_beef);
        assert_eq!(id.received_ms(), Some(1_764_000_000_123));
        assert_eq!(MessageId("zz".into()).received_ms(), None);
        assert_eq!(
            MessageId("xyz0000000000000000000000000".into()).received_ms(),
            None
        );
    }

    fn rcpt(local: &str, domain: &str) -> Recipient {
        Recipient {
            address: Mailbox {
                local_part: local.into(),
                domain: domain.into(),
            },
            notify: None,
            orcpt: None,
        }
    }

    fn record() -> MessageRecord {
        let envelope = Envelope {
            sender: Some(Mailbox {
                local_part: "app".into(),
                domain: "example.com".into(),
            }),
            recipients: vec![
                rcpt("a", "example.org"),
                rcpt("b", "example.net"),
                rcpt("c", "example.org"),
            ],
            ..Envelope::default()
        };
        let client = ClientInfo {
            ip: "127.0.0.1".parse().unwrap(),
            helo: "app.example.com".into(),
            auth_user: None,
            tls: false,
        };
        MessageRecord::new(MessageId::new(1, 2), 1000, 42, client, envelope)
    }

    #[test]
    fn recipients_are_grouped_by_domain_in_order() {
        let r = record();
        let summary: Vec<_> = r
            .deliveries
            .iter()
            .map(|d| (d.domain.as_str(), d.recipients.clone()))
            .collect();
        assert_eq!(
            summary,
            vec![("example.org", vec![0, 2]), ("example.net", vec![1])]
        );
        assert!(r.deliveries.iter().all(|d| d.next_attempt_ms == 1000));
    }

    #[test]
    fn records_round_trip_behind_the_version_byte() {
        let r = record();
        let bytes = encode(&r);
        assert_eq!(bytes[0], RECORD_VERSION);
        let back: MessageRecord = decode(&bytes).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn unknown_versions_and_garbage_are_errors_not_panics() {
        let mut bytes = encode(&record());
        bytes[0] = 99;
        assert!(matches!(
            decode::<MessageRecord>(&bytes),
            Err(RecordError::UnknownVersion(99))
        ));
        assert!(matches!(
            decode::<MessageRecord>(&[]),
            Err(RecordError::Empty)
        ));
        assert!(decode::<MessageRecord>(&[RECORD_VERSION, 0xff, 0xff]).is_err());
        let mut long = encode(&record());
        long.push(0);
        assert!(decode::<MessageRecord>(&long).is_err());
    }

    #[test]
    fn message_ids_sort_by_time() {
        let a = MessageId::new(1_700_000_000_000, u64::MAX);
        let b = MessageId::new(1_700_000_000_001, 0);
        assert!(a < b);
        assert_eq!(a.as_str().len(), 28);
    }
}
