//! Queues a message a client handed over, over SMTP or HTTP alike.

use std::time::Instant;

use actix::Recipient;
use smarthost_proto::envelope::{ClientInfo, Envelope, MessageId, MessageRecord};
use smarthost_proto::session::StoreFailure;

use crate::queue::Enqueue;
use crate::spool::{Body, NewMessage};

/// Hands the message to the queue and answers once the spool has it
/// durably: the `250` of SMTP, the `200` of the send API. `started` is when
/// the message arrived, for the acceptance latency.
pub async fn enqueue(
    queue: &Recipient<Enqueue>,
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
    match queue.send(Enqueue(NewMessage { record, body })).await {
        Ok(Ok(())) => {
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
