//! Queues a message a client handed over, over SMTP or HTTP alike.

use std::time::Instant;

use actix::Recipient;
use smarthost_proto::address::Mailbox;
use smarthost_proto::envelope::{
    BodyType, ClientInfo, Envelope, MessageId, MessageRecord, Recipient as Rcpt,
};
use smarthost_proto::session::StoreFailure;

use crate::queue::Enqueue;
use crate::spool::{Body, NewMessage};
use crate::webhooks::Webhooks;

/// The envelope of a message that came whole rather than over SMTP (the
/// send API, the pickup directory): no DSN parameters, `8BITMIME` and
/// `SMTPUTF8` as the bytes and addresses need them.
pub fn envelope_of(sender: Option<Mailbox>, recipients: Vec<Mailbox>, body: &[u8]) -> Envelope {
    let smtputf8 = sender.as_ref().is_some_and(Mailbox::needs_smtputf8)
        || recipients.iter().any(Mailbox::needs_smtputf8);
    Envelope {
        sender,
        recipients: recipients
            .into_iter()
            .map(|address| Rcpt {
                address,
                notify: None,
                orcpt: None,
            })
            .collect(),
        body: if body.is_ascii() {
            BodyType::SevenBit
        } else {
            BodyType::EightBitMime
        },
        smtputf8,
        ..Envelope::default()
    }
}

/// Hands the message to the queue and answers once the spool has it
/// durably, and its `accepted` webhook events are written: the `250` of
/// SMTP, the `200` of the send API. `started` is when the message arrived,
/// for the acceptance latency.
#[allow(clippy::too_many_arguments)]
pub async fn enqueue(
    queue: &Recipient<Enqueue>,
    webhooks: &Webhooks,
    id: MessageId,
    now_ms: u64,
    client: ClientInfo,
    envelope: Envelope,
    body: Body,
    started: Instant,
) -> Result<MessageId, StoreFailure> {
    let sender = envelope
        .sender
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default();
    let recipients = envelope.recipients.len();
    let size = body.len();
    let record = MessageRecord::new(id.clone(), now_ms, size, client, envelope);
    let events = webhooks
        .wanted(record.client.auth_user.as_deref())
        .then(|| record.clone());
    match queue.send(Enqueue(NewMessage { record, body })).await {
        Ok(Ok(())) => {
            if let Some(record) = events {
                webhooks.record_accepted(&record).await;
            }
            tracing::info!(message_id = %id, from = %sender, recipients, size, "message accepted");
            crate::metrics::message_received(recipients, size, started.elapsed());
            Ok(id)
        }
        Ok(Err(error)) => {
            tracing::error!(%error, "message not stored");
            crate::metrics::message_not_stored();
            Err(StoreFailure::Unavailable)
        }
        Err(error) => {
            tracing::error!(%error, "queue unreachable");
            crate::metrics::message_not_stored();
            Err(StoreFailure::Unavailable)
        }
    }
}
