//! Where accepted mail is kept until it is delivered.
//!
//! One trait, [`Spool`], with one implementation per queue backend; every
//! implementation passes the same test suite ([`suite`]). A spool answers only
//! when what it was given is durable: the SMTP `250` after DATA waits for it.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use smarthost_proto::envelope::{MessageId, MessageRecord};

use crate::schedule::Schedule;

pub mod local;
pub mod redis;
#[cfg(test)]
pub mod suite;

pub use self::redis::{Durability, RedisSpool, RedisSpoolOptions};
pub use local::{LocalSpool, LocalSpoolOptions};

/// A message to store: its record and its body (headers and content, as
/// received, with our `Received:` line in front).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewMessage {
    pub record: MessageRecord,
    pub body: Body,
}

/// How much of a spilled body is read into memory at a time: below the
/// size from which the allocator maps blocks (128 KiB, set at start), so
/// that the buffer comes from the heap and is not mapped, faulted in and
/// unmapped again for every message.
pub const BODY_CHUNK: usize = 64 * 1024;

/// Bodies up to this size are read whole for delivery; a larger one comes
/// back with its first [`BODY_CHUNK`] in memory and the rest in a file
/// (see [`Spool::read_body`]), so that many deliveries of large messages
/// at once do not hold them all.
pub const READ_WHOLE_UP_TO: u64 = 256 * 1024;

/// A message body: its first bytes in memory and, for a large message,
/// the rest on disk ([`SpilledPart`]), so that it is never held whole.
/// Cloning it shares the bytes in memory (the body cache keeps the
/// bodies it was handed this way), it does not copy them.
#[derive(Clone, Debug, Default)]
pub struct Body {
    head: Bytes,
    /// The memory `head` takes: the capacity of the buffer it was
    /// received into, which it keeps (see [`Body::held`]).
    held: usize,
    rest: Option<SpilledPart>,
}

/// The part of a body on disk: a file written while the body arrived (an
/// unlinked temporary one: it goes away with the last handle, also when
/// the process dies), or the place of a stored body in the spool's own
/// files, which are never rewritten while a handle is open.
#[derive(Clone, Debug)]
pub struct SpilledPart {
    file: Arc<std::fs::File>,
    /// Where the part starts in `file`.
    offset: u64,
    len: u64,
}

impl SpilledPart {
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Up to `size` bytes from `at` on (none at the end). Reads from
    /// disk.
    pub fn chunk_at(&self, at: u64, size: usize) -> Result<Vec<u8>, SpoolError> {
        use std::os::unix::fs::FileExt;
        let mut chunk = vec![0u8; size.min(self.len.saturating_sub(at) as usize)];
        self.file
            .read_exact_at(&mut chunk, self.offset + at)
            .map_err(|e| {
                SpoolError::Unavailable(format!("reading a message body from disk: {e}"))
            })?;
        Ok(chunk)
    }

    /// Hands the bytes to `f` in order, [`BODY_CHUNK`] at a time. Reads
    /// from disk: call it where blocking is fine.
    pub fn for_each_chunk(
        &self,
        mut f: impl FnMut(&[u8]) -> Result<(), SpoolError>,
    ) -> Result<(), SpoolError> {
        use std::os::unix::fs::FileExt;
        let mut chunk = vec![0u8; BODY_CHUNK.min(self.len as usize)];
        let mut at = 0u64;
        while at < self.len {
            let n = chunk.len().min((self.len - at) as usize);
            self.file
                .read_exact_at(&mut chunk[..n], self.offset + at)
                .map_err(|e| {
                    SpoolError::Unavailable(format!("reading a message body from disk: {e}"))
                })?;
            f(&chunk[..n])?;
            at += n as u64;
        }
        Ok(())
    }
}

impl Body {
    /// `head` followed by the first `len` bytes of `file`.
    pub fn spilled(head: Vec<u8>, file: std::fs::File, len: u64) -> Body {
        Body::stored(head, Arc::new(file), 0, len)
    }

    /// `head` followed by the `len` bytes of `file` from `offset` on.
    pub fn stored(head: Vec<u8>, file: Arc<std::fs::File>, offset: u64, len: u64) -> Body {
        Body {
            held: head.capacity(),
            head: head.into(),
            rest: Some(SpilledPart { file, offset, len }),
        }
    }

    pub fn len(&self) -> u64 {
        self.head.len() as u64 + self.rest.as_ref().map_or(0, SpilledPart::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes held in memory: the whole body unless part is on disk.
    pub fn head(&self) -> &[u8] {
        &self.head
    }

    /// [`Body::head`], taken: the whole body when nothing is on disk.
    /// Copied only when the bytes are shared.
    pub fn into_head(self) -> Vec<u8> {
        Vec::from(self.head)
    }

    /// The memory [`Body::head`] takes, spare capacity included: what
    /// keeping the body costs.
    pub fn held(&self) -> usize {
        self.held
    }

    /// [`Body::head`], shared: no copy.
    pub fn shared_head(&self) -> Bytes {
        self.head.clone()
    }

    /// What follows [`Body::head`] on disk, if anything.
    pub fn rest(&self) -> Option<&SpilledPart> {
        self.rest.as_ref()
    }

    /// Hands the whole body to `f` in order (see
    /// [`SpilledPart::for_each_chunk`]).
    pub fn for_each_chunk(
        &self,
        mut f: impl FnMut(&[u8]) -> Result<(), SpoolError>,
    ) -> Result<(), SpoolError> {
        if !self.head.is_empty() {
            f(&self.head)?;
        }
        match &self.rest {
            Some(rest) => rest.for_each_chunk(f),
            None => Ok(()),
        }
    }

    /// The whole body in memory, read from disk if part of it is there.
    pub fn to_vec(&self) -> Result<Vec<u8>, SpoolError> {
        if self.rest.is_none() {
            return Ok(self.head.to_vec());
        }
        let mut out = Vec::with_capacity(self.len() as usize);
        self.for_each_chunk(|chunk| {
            out.extend_from_slice(chunk);
            Ok(())
        })?;
        Ok(out)
    }
}

impl From<Vec<u8>> for Body {
    /// Keeps the buffer as it is, spare capacity included: giving that
    /// back (`shrink_to_fit`) remaps a large buffer and costs more page
    /// faults than the memory is worth. [`Body::held`] counts it.
    fn from(head: Vec<u8>) -> Body {
        Body {
            held: head.capacity(),
            head: Bytes::from(head),
            rest: None,
        }
    }
}

impl From<Bytes> for Body {
    fn from(head: Bytes) -> Body {
        Body {
            held: head.len(),
            head,
            rest: None,
        }
    }
}

/// Equal when the bytes are: a spilled body is read to compare it.
impl PartialEq for Body {
    fn eq(&self, other: &Body) -> bool {
        match (&self.rest, &other.rest) {
            (None, None) => self.head == other.head,
            _ => self.len() == other.len() && self.to_vec().ok() == other.to_vec().ok(),
        }
    }
}

impl Eq for Body {}

impl PartialEq<Body> for Vec<u8> {
    fn eq(&self, other: &Body) -> bool {
        other == self
    }
}

/// Equal to the same bytes in memory.
impl PartialEq<Vec<u8>> for Body {
    fn eq(&self, other: &Vec<u8>) -> bool {
        match &self.rest {
            None => self.head == *other,
            Some(_) => self.to_vec().is_ok_and(|bytes| bytes == *other),
        }
    }
}

#[derive(Clone, Debug, thiserror::Error)]
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

/// A change to a stored message, for [`Spool::apply`]. The new record is
/// shared: a spool that keeps records in memory keeps this one, the same
/// the schedule holds, rather than a copy of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Update(Arc<MessageRecord>),
    Remove(MessageId),
}

impl Change {
    pub fn id(&self) -> &MessageId {
        match self {
            Change::Update(record) => &record.id,
            Change::Remove(id) => id,
        }
    }
}

/// Something the spool set aside because it could not read it (a record of
/// a newer release, a damaged frame), so that it stalls nothing; listed for
/// operators by [`Spool::quarantined`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Quarantined {
    /// Where it is: the message id (Redis) or the file under
    /// `<queue.path>/quarantine` (local).
    pub location: String,
    /// Why it was set aside.
    pub reason: String,
    /// When, in ms since the epoch.
    pub at_ms: u64,
    /// How many bytes were set aside.
    pub bytes: u64,
}

/// Where a paged listing ([`Spool::list_page`]) goes on: messages are
/// listed in (receive time, id) order, and the next page starts after this
/// one.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ListCursor {
    pub received_ms: u64,
    pub id: MessageId,
}

impl ListCursor {
    pub fn of(record: &MessageRecord) -> ListCursor {
        ListCursor {
            received_ms: record.received_ms,
            id: record.id.clone(),
        }
    }
}

/// What [`Spool::store_scheduled`] did with a batch it stored.
#[derive(Debug)]
pub struct Stored {
    /// The records, shared with the schedule.
    pub records: Vec<Arc<MessageRecord>>,
    /// The domains that got due work ([`Schedule::insert`]), or why the
    /// messages are not scheduled yet.
    pub scheduled: Result<Vec<String>, SpoolError>,
}

#[async_trait]
pub trait Spool: Send + Sync + 'static {
    /// Stores a batch of new messages and returns once all of them are
    /// durable (one fsync or one acknowledged round trip for the batch).
    /// On error none of them may be reported as stored.
    async fn store(&self, batch: Vec<NewMessage>) -> Result<(), SpoolError>;

    /// [`Spool::store`], answering with the stored records, shared: a
    /// spool that keeps its records in memory hands out the ones it keeps,
    /// so that the schedule shares them instead of keeping a copy of each.
    /// This default copies them before it stores.
    async fn store_shared(
        &self,
        batch: Vec<NewMessage>,
    ) -> Result<Vec<Arc<MessageRecord>>, SpoolError> {
        let records = batch.iter().map(|m| Arc::new(m.record.clone())).collect();
        self.store(batch).await?;
        Ok(records)
    }

    /// Stores `batch` like [`Spool::store_shared`], then files it in
    /// `schedule`: a failed store is the error; a failed insert leaves the
    /// messages stored (durable, to be inserted again) and is in
    /// [`Stored::scheduled`]. This default does one after the other; the
    /// Redis spool on one server runs both in one transaction.
    async fn store_scheduled(
        &self,
        batch: Vec<NewMessage>,
        schedule: &dyn Schedule,
        now_ms: u64,
    ) -> Result<Stored, SpoolError> {
        let records = self.store_shared(batch).await?;
        let scheduled = schedule.insert_shared(records.clone(), now_ms).await;
        Ok(Stored { records, scheduled })
    }

    /// Replaces the record of a stored message (its deliveries changed).
    async fn update(&self, record: MessageRecord) -> Result<(), SpoolError>;

    /// Removes a message whose deliveries are all done.
    async fn remove(&self, id: &MessageId) -> Result<(), SpoolError>;

    /// Every stored message's current record, oldest first.
    async fn list(&self) -> Result<Vec<MessageRecord>, SpoolError>;

    /// [`Spool::list`] as shared records: a spool that keeps its records
    /// in memory hands out the ones it holds, so that the schedule filled
    /// from them at start-up shares them instead of keeping a copy of
    /// each. This default wraps what `list` returns.
    async fn list_shared(&self) -> Result<Vec<Arc<MessageRecord>>, SpoolError> {
        Ok(self.list().await?.into_iter().map(Arc::new).collect())
    }

    /// Up to `limit` messages after `after` (from the oldest when `None`)
    /// in (receive time, id) order, and the cursor of the next page
    /// (`None`: this was the last). A message stored or removed meanwhile
    /// may or may not be listed; nothing older than the cursor is listed
    /// again. This default lists everything and slices it; a backend
    /// keeps an index in this order so that a page costs the same
    /// whatever the length of the queue.
    async fn list_page(
        &self,
        after: Option<&ListCursor>,
        limit: usize,
    ) -> Result<(Vec<MessageRecord>, Option<ListCursor>), SpoolError> {
        let mut records = self.list().await?;
        records.sort_by_key(ListCursor::of);
        let page: Vec<MessageRecord> = records
            .into_iter()
            .filter(|r| after.is_none_or(|a| ListCursor::of(r) > *a))
            .take(limit.saturating_add(1))
            .collect();
        Ok(page_of(page, limit))
    }

    /// What was set aside as unreadable, oldest first, at most `limit`.
    /// A spool that never sets anything aside has nothing to list.
    async fn quarantined(&self, _limit: usize) -> Result<Vec<Quarantined>, SpoolError> {
        Ok(Vec::new())
    }

    /// Takes back what was set aside under `location` (a name
    /// [`Spool::quarantined`] listed) once it reads again, after an
    /// upgrade to a release that knows its format: the message is stored
    /// again and its record returned, for the schedule. `Ok(None)`:
    /// nothing is set aside there. `Corrupt` when it still cannot be read,
    /// or when what this spool sets aside is not a message it can take
    /// back.
    async fn replay_quarantined(
        &self,
        _location: &str,
    ) -> Result<Option<MessageRecord>, SpoolError> {
        Ok(None)
    }

    /// Drops what was set aside under `location` for good; `false` when
    /// nothing was.
    async fn delete_quarantined(&self, _location: &str) -> Result<bool, SpoolError> {
        Ok(false)
    }

    /// The body of a stored message, checked: whole in memory up to
    /// [`READ_WHOLE_UP_TO`], else its first bytes in memory and the rest
    /// on disk, to be read a chunk at a time as it is sent.
    async fn read_body(&self, id: &MessageId) -> Result<Body, SpoolError>;

    /// Stores `batch` and applies `changes` to other messages as one step:
    /// a backend that can makes both durable together (the local spool:
    /// one journal write, one fsync), so that a crash never keeps a
    /// delivery report without the record change that called for it.
    /// `Err`: nothing was written. `Ok`: the batch is stored; the changes
    /// that failed are listed. This default stores, then applies.
    async fn store_and_apply(
        &self,
        batch: Vec<NewMessage>,
        changes: Vec<Change>,
    ) -> Result<Vec<(MessageId, SpoolError)>, SpoolError> {
        if !batch.is_empty() {
            self.store(batch).await?;
        }
        Ok(self.apply(changes).await)
    }

    /// Applies changes in order and returns those that failed. A backend
    /// that can makes them durable together (one fsync, one round trip);
    /// this default applies them one by one.
    async fn apply(&self, changes: Vec<Change>) -> Vec<(MessageId, SpoolError)> {
        let mut failed = Vec::new();
        for change in changes {
            let result = match &change {
                Change::Update(record) => self.update((**record).clone()).await,
                Change::Remove(id) => self.remove(id).await,
            };
            if let Err(error) = result {
                failed.push((change.id().clone(), error));
            }
        }
        failed
    }
}

/// Splits up to `limit + 1` listed records into a page of `limit` and the
/// cursor of the next page, if there is one.
pub(crate) fn page_of(
    mut records: Vec<MessageRecord>,
    limit: usize,
) -> (Vec<MessageRecord>, Option<ListCursor>) {
    if records.len() <= limit {
        return (records, None);
    }
    records.truncate(limit);
    let next = records.last().map(ListCursor::of);
    (records, next)
}
