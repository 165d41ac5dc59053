//! Where accepted mail is kept until it is delivered.
//!
//! One trait, [`Spool`], with one implementation per queue backend; every
//! implementation passes the same test suite ([`suite`]). A spool answers only
//! when what it was given is durable: the SMTP `250` after DATA waits for it.

use async_trait::async_trait;
use smarthost_proto::envelope::{MessageId, MessageRecord};

pub mod local;
pub mod redis;
#[cfg(test)]
pub mod redis_server;
#[cfg(test)]
pub mod suite;

pub use self::redis::{Durability, RedisSpool, RedisSpoolOptions};
pub use local::{LocalSpool, LocalSpoolOptions};

/// A message to store: its record and its body (headers and content, as
/// received, with our `Received:` line in front).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewMessage {
    pub record: MessageRecord,
    pub body: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The spool cannot write or read right now (disk full, I/O error,
    /// backend unreachable). Clients get a temporary failure.
    #[error("spool unavailable: {0}")]
    Unavailable(String),
    #[error("no message {0} in the spool")]
    NotFound(MessageId),
    /// Stored data that cannot be read back.
    #[error("corrupt spool data: {0}")]
    Corrupt(String),
}

#[async_trait]
pub trait Spool: Send + Sync + 'static {
    /// Stores a batch of new messages and returns once all of them are
    /// durable (one fsync or one acknowledged round trip for the batch).
    /// On error none of them may be reported as stored.
    async fn store(&self, batch: Vec<NewMessage>) -> Result<(), SpoolError>;

    /// Replaces the record of a stored message (its deliveries changed).
    async fn update(&self, record: MessageRecord) -> Result<(), SpoolError>;

    /// Removes a message whose deliveries are all done.
    async fn remove(&self, id: &MessageId) -> Result<(), SpoolError>;

    /// Every stored message's current record, oldest first.
    async fn list(&self) -> Result<Vec<MessageRecord>, SpoolError>;

    /// The body of a stored message.
    async fn read_body(&self, id: &MessageId) -> Result<Vec<u8>, SpoolError>;
}
