//! The embedded local spool: a crash-safe journal in one directory.
//!
//! The directory holds numbered segment files (`00000000000000000001.journal`,
//! …) and a `LOCK` file that one process holds with an advisory lock. A
//! segment starts with a header, then every change is appended to the
//! newest ("active") segment as one frame:
//!
//! ```text
//! header: ["SMHJRNL2"][8-byte spool key][u32 LE crc32 of the key]
//! frame:  [u32 LE payload length][u32 LE crc32 of key ++ payload][payload]
//! ```
//!
//! where the payload is a versioned [`envelope::encode`] of a [`JournalEntry`]:
//! a new message with its body, a new record for a message, or a removal.
//! A batch of new messages is written at once (in calls of at most a MiB)
//! and made durable with one `fdatasync` (group commit), and every write that arrives while one
//! is made durable goes into the next one together: the Queue's new
//! messages and its record changes share an fsync when they meet. New messages written with changes to
//! others (`store_and_apply`: delivery reports with the records they are
//! about) are preceded by a group entry giving their length, so that a
//! write torn by a crash is cut off whole, never kept in part. The key is random, made when the spool is
//! created and written into every segment's header; mixing it into the
//! checksum means bytes inside a message body can never pass for a frame,
//! which is what makes it safe to look for the next frame after damage.
//! Segments written before the key existed (no header, plain crc32 of the
//! payload) are still read; new frames always go into keyed segments.
//!
//! `open` replays the segments in order into an in-memory index of the live
//! messages (record and where its body is); bodies stay on disk. A bad
//! frame (short, wrong checksum, zero-filled) with no valid frame after it
//! in the last segment is a torn tail left by a crash or a power loss and
//! is cut off: nothing after it was acknowledged (zeros to the end are
//! kept as room for the next write). A bad region with valid
//! frames after it, or in an older segment, is damage to acknowledged
//! mail: its bytes are copied to `quarantine/<segment file>.<offset>.bad`
//! in the spool directory, an error is logged, and replay goes on at the
//! next valid frame, so one bad sector costs the entries it hit and nothing
//! else. (In an unkeyed segment a frame found by searching could be part of
//! a message body, so there `open` stops with [`SpoolError::Corrupt`] unless
//! the damaged frame's own length leads to the next valid one.)
//!
//! Segments are written over zeros made ahead of use ([`SPARE_FILE`]), so
//! that an append never makes its file longer and its `fdatasync` has no
//! metadata to write; an all-zero rest of the last segment is where the
//! next write goes, not a torn tail.
//!
//! Segments rotate at [`LocalSpoolOptions::segment_size`]. A removal only
//! hides a message if the segments that hold its earlier entries are still
//! read before it, so a segment is deleted when it holds nothing live *and*
//! every older segment its removals shadow is already gone. Old segments with
//! little live data are compacted: their live messages are written again into
//! the active segment, after which the old file is deleted. Both happen at
//! `open`, and then on the spool's housekeeping thread, off the write path:
//! it compacts a sparse segment once it has been out of use for
//! [`LocalSpoolOptions::compact_after`] and deletes a segment once nothing
//! in it is live. Compaction holds the index only in short steps (finding
//! members, placing a batch of copies); bodies are read, copies built and
//! synced with it unlocked, and a copy is placed only if its message has
//! not changed since it was read. A dead segment leaves the journal by a rename to
//! `….deleting`, made durable; its space is then given back a megabyte at a
//! time, each step synced, with the index unlocked. Freeing a whole segment
//! at once holds up every fsync on the file system for tens of
//! milliseconds (more with the `discard` mount option), and every write
//! would wait for it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, IoSlice, IoSliceMut, Read, Seek, SeekFrom};
use std::ops::Bound;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use smarthost_proto::envelope::{self, MessageId, MessageRecord};

use super::{
    page_of, Body, Change, ListCursor, NewMessage, SpilledPart, Spool, SpoolError, BODY_CHUNK,
    READ_WHOLE_UP_TO,
};

/// How long `open` waits for a lock that another holder is letting go.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Bytes in front of every payload: its length and its crc32.
const FRAME_HEADER: u64 = 8;
const SEGMENT_SUFFIX: &str = ".journal";
/// A dead segment is renamed to this (after its own name) before its space
/// is given back, so that it leaves the journal at once and durably.
const DELETING_SUFFIX: &str = ".deleting";
/// A dead segment is shrunk by this much at a time, each step synced, before
/// it is unlinked: freeing a whole segment in one go (with the `discard`
/// mount option, trimming it too) holds up every fsync on the file system
/// for tens of milliseconds; a step of this size, about half a millisecond.
const SHRINK_STEP: u64 = 1024 * 1024;
const LOCK_FILE: &str = "LOCK";
/// The next segment, made ahead of use: a file of zeros as long as a
/// segment, written and synced, which takes the next segment's name when
/// the active one fills. A write into it changes no file size, so its
/// `fdatasync` writes the data alone: no inode, and on a journaling file
/// system no journal commit (half the time of an append's there). It is
/// made by the housekeeping thread once the active segment is half full,
/// so that a quiet spool writes no zeros, and left out when making it
/// fails (a full disk): the next segment is then made as before. Replay
/// takes an all-zero rest of the last segment as its end.
const SPARE_FILE: &str = "next-segment.spare";
/// The spare while its zeros are written; a leftover is removed at open.
const SPARE_PARTIAL: &str = "next-segment.partial";
/// Zeros written (and synced) at a time into a spare, so that the
/// journal's own fsyncs never wait behind a whole segment's worth.
const ZERO_STEP: usize = 256 * 1024;
/// A segment whose writes have carried more than this per fsync gets no
/// spare: there the zeros (each byte written twice) cost more than the
/// inode writes they spare (one per fsync).
const ZERO_AHEAD_UP_TO: u64 = 128 * 1024;
/// After a spare could not be made, the wait before the next try.
const SPARE_RETRY: Duration = Duration::from_secs(60);
/// Where damaged journal bytes are kept, inside the spool directory, as
/// `<segment file name>.<byte offset>.bad`. The admin API lists them.
pub const QUARANTINE_DIR: &str = "quarantine";
/// The first bytes of a keyed segment.
const SEGMENT_MAGIC: [u8; 8] = *b"SMHJRNL2";
/// Magic, key and the key's crc32.
const SEGMENT_HEADER: u64 = 20;

/// The spool's key, mixed into every frame checksum of a keyed segment.
type Key = [u8; 8];

/// How the frames of one segment are checksummed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Checksum {
    /// A segment written before keyed checksums: crc32 of the payload.
    Plain,
    /// crc32 of the spool key followed by the payload.
    Keyed(Key),
}

impl Checksum {
    fn of(self, payload: &[u8]) -> u32 {
        self.of_parts(&[payload])
    }

    /// [`Checksum::of`] the parts one after the other.
    fn of_parts(self, parts: &[&[u8]]) -> u32 {
        let mut hasher = self.hasher();
        for part in parts {
            hasher.update(part);
        }
        hasher.finalize()
    }

    /// A hasher to be fed the payload: [`Checksum::of`] a piece at a time.
    fn hasher(self) -> crc32fast::Hasher {
        let mut hasher = crc32fast::Hasher::new();
        if let Checksum::Keyed(key) = self {
            hasher.update(&key);
        }
        hasher
    }

    /// Where the first frame starts.
    fn start(self) -> u64 {
        match self {
            Checksum::Plain => 0,
            Checksum::Keyed(_) => SEGMENT_HEADER,
        }
    }
}

fn segment_header(key: &Key) -> [u8; SEGMENT_HEADER as usize] {
    let mut header = [0u8; SEGMENT_HEADER as usize];
    header[..8].copy_from_slice(&SEGMENT_MAGIC);
    header[8..16].copy_from_slice(key);
    header[16..].copy_from_slice(&crc32fast::hash(key).to_le_bytes());
    header
}

/// What the first bytes of a segment file say about it.
#[derive(Debug, PartialEq, Eq)]
enum Header {
    Keyed(Key),
    /// Empty, or cut short while its header was written: holds nothing.
    Torn,
    /// A keyed segment whose key cannot be trusted.
    Damaged,
    /// No header: written before keyed checksums.
    Plain,
}

fn read_header(file: &File, file_len: u64) -> io::Result<Header> {
    let mut bytes = [0u8; SEGMENT_HEADER as usize];
    let n = file_len.min(SEGMENT_HEADER) as usize;
    file.read_exact_at(&mut bytes[..n], 0)?;
    if n < SEGMENT_HEADER as usize && SEGMENT_MAGIC.starts_with(&bytes[..n.min(8)]) {
        return Ok(Header::Torn);
    }
    if n < SEGMENT_HEADER as usize {
        return Ok(Header::Plain);
    }
    let key: Key = bytes[8..16].try_into().expect("8 bytes");
    let key_ok = crc32fast::hash(&key).to_le_bytes() == bytes[16..20];
    Ok(match (bytes[..8] == SEGMENT_MAGIC, key_ok) {
        (true, true) => Header::Keyed(key),
        (true, false) => Header::Damaged,
        // A damaged magic; the key's own checksum shows it is a header.
        (false, true) => Header::Keyed(key),
        (false, false) => Header::Plain,
    })
}

/// How a [`LocalSpool`] lays out its journal.
#[derive(Clone, Debug)]
pub struct LocalSpoolOptions {
    /// A new segment is started before a write would take the active one
    /// past this size. A single batch larger than this gets a segment of its
    /// own.
    pub segment_size: u64,
    /// An old segment whose live data is less than this fraction of its
    /// size is compacted.
    pub compact_below: f64,
    /// The longest a removal written without an fsync waits for one
    /// when no other write syncs it.
    pub removals_synced_within: std::time::Duration,
    /// A segment is compacted only once it has been out of use this long:
    /// what is live in it then waits for a retry, instead of being on its
    /// way out (and dead in a moment) as when it has just rotated.
    pub compact_after: std::time::Duration,
    /// Segments are written over zeros laid down ahead of use, so that an
    /// append never makes the file longer and its fsync has no metadata
    /// to write (see [`SPARE_FILE`]). Off where that buys nothing: on a
    /// copy-on-write file system every write allocates anyway.
    pub zero_ahead: bool,
}

impl Default for LocalSpoolOptions {
    fn default() -> Self {
        LocalSpoolOptions {
            segment_size: 64 * 1024 * 1024,
            compact_below: 0.25,
            removals_synced_within: std::time::Duration::from_secs(1),
            compact_after: std::time::Duration::from_secs(2),
            zero_ahead: true,
        }
    }
}

/// One change in the journal.
#[derive(Debug, Serialize, Deserialize)]
enum JournalEntry {
    /// A new message. The body is the last field, so its bytes are the tail
    /// of the encoded payload and can be read back without decoding.
    Message {
        record: MessageRecord,
        #[serde(with = "body_bytes")]
        body: Vec<u8>,
    },
    /// The current record of a stored message.
    Update { record: MessageRecord },
    /// The message is gone.
    Remove { id: MessageId },
    /// The frames in the next `len` bytes were written together (new
    /// messages with the changes that called for them, such as a delivery
    /// report and the record of the failure it reports): a write torn by
    /// a crash is cut off whole, so that replay keeps all of them or none.
    Group { len: u64 },
}

/// Serialises a body as one byte string rather than a sequence of `u8`s.
pub(crate) mod body_bytes {
    use std::fmt;

    use serde::de::{self, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(body: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(body)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        deserializer.deserialize_byte_buf(BodyVisitor)
    }

    struct BodyVisitor;

    impl<'de> Visitor<'de> for BodyVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("message body bytes")
        }

        fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut body = Vec::with_capacity(seq.size_hint().unwrap_or(0));
            while let Some(byte) = seq.next_element()? {
                body.push(byte);
            }
            Ok(body)
        }
    }
}

/// Appends one frame for `entry` to `buf` and returns the frame's length.
/// The payload is encoded in place behind a header filled in afterwards,
/// not through a payload buffer. New messages go through
/// [`Frames::push_message`] instead, which leaves their bodies where they are.
fn push_frame(buf: &mut Vec<u8>, entry: &JournalEntry, key: &Key) -> Result<u64, SpoolError> {
    let start = buf.len();
    let payload_start = start + FRAME_HEADER as usize;
    buf.resize(payload_start, 0);
    envelope::encode_into(entry, buf);
    let payload_len = buf.len() - payload_start;
    let Ok(len) = u32::try_from(payload_len) else {
        buf.truncate(start);
        return Err(SpoolError::Unavailable(format!(
            "journal entry of {payload_len} bytes is too large"
        )));
    };
    let crc = Checksum::Keyed(*key).of(&buf[payload_start..]);
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 4..payload_start].copy_from_slice(&crc.to_le_bytes());
    Ok(FRAME_HEADER + payload_len as u64)
}

/// The start of a [`JournalEntry::Message`] payload up to its body's
/// bytes: it encodes to exactly the bytes that come before them, so that a
/// body is written into the journal after it from where it is (memory, or
/// a [`SpilledPart`] on disk) without being copied into the frame.
#[derive(Serialize)]
enum MessageHead<'a> {
    Message {
        record: &'a MessageRecord,
        body_len: u64,
    },
}

/// A body in a journal write: the bytes in memory as received, or the
/// part of them on disk.
enum Part {
    Memory(bytes::Bytes),
    Disk(SpilledPart),
}

impl Part {
    fn for_each_chunk(
        &self,
        mut f: impl FnMut(&[u8]) -> Result<(), SpoolError>,
    ) -> Result<(), SpoolError> {
        match self {
            Part::Memory(bytes) => f(bytes),
            Part::Disk(part) => part.for_each_chunk(f),
        }
    }
}

/// The frames of one journal write, built before the state is locked:
/// new messages first, then changes to stored ones.
#[derive(Default)]
struct Frames {
    buf: Vec<u8>,
    /// The bodies, each written where `buf` is at `.0`, in order: the
    /// bytes written are `buf` with these spliced in.
    spliced: Vec<(usize, Part)>,
    /// Bytes in `spliced`, kept as they are added: every new message adds
    /// a part, and a batch asks for the length at each.
    spliced_len: u64,
    /// Each new message's record, its frame's offset in `buf` and length,
    /// and its body's length.
    messages: Vec<(Arc<MessageRecord>, u64, u64, u64)>,
    /// Each change, its frame's offset in `buf` and length.
    changes: Vec<(Change, u64, u64)>,
}

impl Frames {
    /// Bytes in the write: `buf` and the spliced parts.
    fn len(&self) -> u64 {
        self.buf.len() as u64 + self.spliced_len
    }

    /// A new message's frame: its header, record and body length go into
    /// `buf`, the body is written from where it is, never copied into
    /// `buf`. The checksum is taken over the body first (read from disk
    /// for a spilled part), so the frame is whole once written.
    fn push_message(&mut self, message: NewMessage, key: &Key) -> Result<(), SpoolError> {
        let body_len = message.body.len();
        let offset = self.len();
        let NewMessage { record, body } = message;
        let start = self.buf.len();
        let payload_start = start + FRAME_HEADER as usize;
        self.buf.resize(payload_start, 0);
        let head = MessageHead::Message {
            record: &record,
            body_len,
        };
        envelope::encode_into(&head, &mut self.buf);
        let mut parts = Vec::with_capacity(2);
        let rest = body.rest().cloned();
        let in_memory = body.shared_head();
        if !in_memory.is_empty() {
            parts.push(Part::Memory(in_memory));
        }
        parts.extend(rest.map(Part::Disk));
        let payload_len = (self.buf.len() - payload_start) as u64 + body_len;
        let Ok(len) = u32::try_from(payload_len) else {
            self.buf.truncate(start);
            return Err(SpoolError::Unavailable(format!(
                "journal entry of {payload_len} bytes is too large"
            )));
        };
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(key);
        hasher.update(&self.buf[payload_start..]);
        for part in &parts {
            if let Err(err) = part.for_each_chunk(|chunk| {
                hasher.update(chunk);
                Ok(())
            }) {
                self.buf.truncate(start);
                return Err(err);
            }
        }
        let crc = hasher.finalize();
        self.buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
        self.buf[start + 4..payload_start].copy_from_slice(&crc.to_le_bytes());
        let at = self.buf.len();
        self.spliced_len += body_len;
        self.spliced
            .extend(parts.into_iter().map(|part| (at, part)));
        self.messages.push((
            Arc::new(record),
            offset,
            FRAME_HEADER + payload_len,
            body_len,
        ));
        Ok(())
    }

    /// Puts `other`'s frames after these, as one write.
    fn append(&mut self, other: Frames) {
        let shift = self.len();
        let buf_shift = self.buf.len();
        self.buf.extend_from_slice(&other.buf);
        self.spliced_len += other.spliced_len;
        self.spliced.extend(
            other
                .spliced
                .into_iter()
                .map(|(at, part)| (at + buf_shift, part)),
        );
        self.messages.extend(
            other
                .messages
                .into_iter()
                .map(|(record, offset, len, body_len)| (record, offset + shift, len, body_len)),
        );
        self.changes.extend(
            other
                .changes
                .into_iter()
                .map(|(change, offset, len)| (change, offset + shift, len)),
        );
    }

    fn push_change(&mut self, change: Change, key: &Key) -> Result<(), SpoolError> {
        // The shared record stays in the index; the entry encodes a copy.
        let entry = match &change {
            Change::Update(record) => JournalEntry::Update {
                record: (**record).clone(),
            },
            Change::Remove(id) => JournalEntry::Remove { id: id.clone() },
        };
        let offset = self.len();
        let len = push_frame(&mut self.buf, &entry, key)?;
        self.changes.push((change, offset, len));
        Ok(())
    }
}

/// Where one frame lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Loc {
    segment: u64,
    offset: u64,
    /// The whole frame, header included.
    len: u64,
}

/// What the index knows of one live message.
#[derive(Debug)]
struct Live {
    /// Shared with the schedule, which holds the same record.
    record: Arc<MessageRecord>,
    /// The `Message` frame that holds the body.
    body: Loc,
    body_len: u64,
    /// The `Update` frame with the current record, if it is not `body`'s.
    latest: Option<Loc>,
    /// Every existing segment holding an entry of this message: a removal
    /// must outlive them all.
    segments: Vec<u64>,
}

#[derive(Debug)]
struct Segment {
    file: Arc<File>,
    len: u64,
    /// Bytes of frames that the index still points at.
    live: u64,
    /// Older segments whose entries this segment's removals hide.
    shadows: BTreeSet<u64>,
    checksum: Checksum,
    /// When it stopped being the active segment; `None` when that was
    /// before the spool was opened.
    retired: Option<Instant>,
}

impl Segment {
    /// A segment as opened: its length and live bytes are counted as it
    /// is replayed or written.
    fn new(file: File, checksum: Checksum) -> Segment {
        Segment {
            file: Arc::new(file),
            len: checksum.start(),
            live: 0,
            shadows: BTreeSet::new(),
            checksum,
            retired: None,
        }
    }

    /// Its file, if nothing else (a body being read) holds it open.
    fn only_handle(self) -> Option<File> {
        Arc::try_unwrap(self.file).ok()
    }
}

/// Creates segment `number` with its header, durably.
fn create_segment(dir: &Path, number: u64, key: &Key) -> Result<Segment, SpoolError> {
    let path = dir.join(segment_name(number));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| io_error(format_args!("creating {}", path.display()), e))?;
    let written = file
        .write_all_at(&segment_header(key), 0)
        .and_then(|()| file.sync_data())
        .map_err(|e| io_error(format_args!("writing {}", path.display()), e))
        .and_then(|()| sync_dir(dir));
    if let Err(err) = written {
        let _ = fs::remove_file(&path);
        return Err(err);
    }
    Ok(Segment::new(file, Checksum::Keyed(*key)))
}

/// Writes [`SPARE_FILE`] in `dir`: `size` bytes of zeros, a step at a
/// time, each synced, then renamed into place. Answers it open.
fn make_spare(dir: &Path, size: u64) -> io::Result<File> {
    let partial = dir.join(SPARE_PARTIAL);
    let made = (|| {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&partial)?;
        let zeros = vec![0u8; ZERO_STEP];
        let mut at = 0;
        while at < size {
            let n = (size - at).min(ZERO_STEP as u64) as usize;
            file.write_all_at(&zeros[..n], at)?;
            file.sync_data()?;
            at += n as u64;
        }
        fs::rename(&partial, dir.join(SPARE_FILE))?;
        File::open(dir)?.sync_all()?;
        Ok(file)
    })();
    if made.is_err() {
        let _ = fs::remove_file(&partial);
    }
    made
}

/// Whether every byte of `file` from `from` to `end` is zero.
fn zeros_from(file: &File, from: u64, end: u64) -> io::Result<bool> {
    let mut window = vec![0u8; ZERO_STEP];
    let mut at = from;
    while at < end {
        let n = (end - at).min(ZERO_STEP as u64) as usize;
        file.read_exact_at(&mut window[..n], at)?;
        if window[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
        at += n as u64;
    }
    Ok(true)
}

fn segment_name(number: u64) -> String {
    format!("{number:020}{SEGMENT_SUFFIX}")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn io_error(what: impl std::fmt::Display, err: io::Error) -> SpoolError {
    SpoolError::Unavailable(format!("{what}: {err}"))
}

/// Takes segment files out of the journal, durably, by renaming them to
/// `….deleting`; [`give_back`] frees their space.
fn delete_segments(dir: &Path, numbers: &[u64]) -> Result<(), SpoolError> {
    for &n in numbers {
        let path = dir.join(segment_name(n));
        match fs::rename(&path, deleting_path(&path)) {
            Ok(()) => tracing::debug!(segment = %path.display(), "deleted dead journal segment"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(format_args!("deleting {}", path.display()), e)),
        }
    }
    sync_dir(dir)
}

fn deleting_path(segment: &Path) -> PathBuf {
    let mut name = segment.as_os_str().to_owned();
    name.push(DELETING_SUFFIX);
    PathBuf::from(name)
}

/// Frees the space of a segment taken out of the journal at `path`.
/// With `file`, its only open handle, it is first shrunk [`SHRINK_STEP`] at
/// a time; without (a reader such as a delivery still has it open) it is
/// only unlinked, so that the reader keeps what it reads and the space
/// goes when it closes. A crash part way leaves a `….deleting` file that
/// the next open finishes.
fn give_back(path: &Path, file: Option<File>) {
    let shrunk = (|| -> io::Result<()> {
        if let Some(file) = file {
            let mut len = file.metadata()?.len();
            while len > 0 {
                len = len.saturating_sub(SHRINK_STEP);
                file.set_len(len)?;
                file.sync_data()?;
            }
        }
        fs::remove_file(path)
    })();
    match shrunk {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(error) => tracing::warn!(file = %path.display(), %error,
            "cannot free a deleted journal segment; the next open tries again"),
    }
}

fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error(format_args!("syncing directory {}", dir.display()), e))
}

/// The file of the quarantine directory `dir` named `name`, if `name` is
/// one the quarantine makes (`<segment file>.<offset>.bad`: letters,
/// digits and dots, never a path).
fn quarantine_file(dir: &Path, name: &str) -> Option<PathBuf> {
    // As listed, or the file's name alone.
    let name = name
        .strip_prefix(QUARANTINE_DIR)
        .and_then(|rest| rest.strip_prefix('/'))
        .unwrap_or(name);
    let plain = !name.starts_with('.')
        && name.ends_with(".bad")
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '.');
    plain.then(|| dir.join(name))
}

/// The `*.bad` files of the quarantine directory `dir`, in name order, at
/// most `limit`; none when the directory does not exist.
fn list_quarantine(dir: &Path, limit: usize) -> Result<Vec<super::Quarantined>, SpoolError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error(format_args!("listing {}", dir.display()), e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| io_error(format_args!("listing {}", dir.display()), e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".bad") {
            names.push(name);
        }
    }
    names.sort();
    names.truncate(limit);
    let mut listed = Vec::with_capacity(names.len());
    for name in names {
        let path = dir.join(&name);
        let meta = match fs::metadata(&path) {
            Ok(meta) => meta,
            // Removed by an operator meanwhile.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_error(format_args!("reading {}", path.display()), e)),
        };
        let at_ms = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as u64);
        listed.push(super::Quarantined {
            location: format!("{QUARANTINE_DIR}/{name}"),
            reason: "unreadable journal frame".into(),
            at_ms,
            bytes: meta.len(),
        });
    }
    Ok(listed)
}

/// The journal and its index; one writer at a time.
#[derive(Debug)]
struct State {
    dir: PathBuf,
    options: LocalSpoolOptions,
    segments: BTreeMap<u64, Segment>,
    active: u64,
    /// A failed write left bytes past the end of the active segment that
    /// could not be cut off yet; the next write does it first.
    dirty_tail: bool,
    messages: HashMap<MessageId, Live>,
    /// The live messages in listing order (receive time, id), so that a
    /// page of a listing starts where it should without a sort.
    order: BTreeSet<ListCursor>,
    /// The key of the active segment, which every new frame is written with.
    key: Key,
    /// Durable writes to the journal since open (each one fsync).
    journal_writes: u64,
    /// `journal_writes` and the active segment's length when it started
    /// (or the spool was opened): what its writes carried per fsync.
    active_since: (u64, u64),
    /// The active segment holds removals written without an fsync; the
    /// next write that syncs, or a rotation, makes them durable.
    unsynced: bool,
    /// Fsyncs made for such removals alone (not by a write).
    late_syncs: u64,
    /// An old segment may hold nothing live any more, or the active one
    /// rotated: work for the housekeeping thread.
    chores_due: bool,
    /// Compacted copies could not be synced: the segments they were copied
    /// from stay until the spool is opened again.
    deletions_held: bool,
    /// The next segment, zeroed ahead ([`SPARE_FILE`]).
    spare: Option<File>,
    /// No spare is made again before this (the last try failed).
    spare_retry: Option<Instant>,
}

fn add_live(segments: &mut BTreeMap<u64, Segment>, loc: Loc) {
    if let Some(s) = segments.get_mut(&loc.segment) {
        s.live += loc.len;
    }
}

/// Whether the segment, if an old one (not `active`), holds nothing live
/// any more: work for the housekeeping thread.
fn drop_live(segments: &mut BTreeMap<u64, Segment>, loc: Loc, active: u64) -> bool {
    segments.get_mut(&loc.segment).is_some_and(|s| {
        s.live -= loc.len;
        s.live == 0 && loc.segment != active
    })
}

impl State {
    fn path(&self, segment: u64) -> PathBuf {
        self.dir.join(segment_name(segment))
    }

    /// Up to `max` live records from `from` on, in listing order, each
    /// passed through `f`.
    fn listed<T>(
        &self,
        from: Bound<ListCursor>,
        max: usize,
        f: impl Fn(&Arc<MessageRecord>) -> T,
    ) -> Vec<T> {
        self.order
            .range((from, Bound::Unbounded))
            .take(max)
            .map(|key| f(&self.messages[&key.id].record))
            .collect()
    }

    fn active_segment(&mut self) -> &mut Segment {
        self.segments
            .get_mut(&self.active)
            .expect("the active segment is always open")
    }

    /// Records a new message (or a new copy of one) written at `body`.
    fn insert_message(&mut self, record: Arc<MessageRecord>, body: Loc, body_len: u64) {
        let mut segments = vec![body.segment];
        if let Some(old) = self.messages.remove(&record.id) {
            self.chores_due |= drop_live(&mut self.segments, old.body, self.active);
            if let Some(latest) = old.latest {
                self.chores_due |= drop_live(&mut self.segments, latest, self.active);
            }
            self.order.remove(&ListCursor::of(&old.record));
            segments = old.segments;
            if !segments.contains(&body.segment) {
                segments.push(body.segment);
            }
        }
        add_live(&mut self.segments, body);
        self.order.insert(ListCursor::of(&record));
        self.messages.insert(
            record.id.clone(),
            Live {
                record,
                body,
                body_len,
                latest: None,
                segments,
            },
        );
    }

    /// Records a new record written at `at`; false if the message is unknown.
    fn update_record(&mut self, record: Arc<MessageRecord>, at: Loc) -> bool {
        let Some(live) = self.messages.get_mut(&record.id) else {
            return false;
        };
        if live.record.received_ms != record.received_ms {
            self.order.remove(&ListCursor::of(&live.record));
            self.order.insert(ListCursor::of(&record));
        }
        if let Some(old) = live.latest.replace(at) {
            self.chores_due |= drop_live(&mut self.segments, old, self.active);
        }
        add_live(&mut self.segments, at);
        if !live.segments.contains(&at.segment) {
            live.segments.push(at.segment);
        }
        live.record = record;
        true
    }

    /// Forgets a message removed by an entry in `segment`; false if unknown.
    fn forget(&mut self, id: &MessageId, segment: u64) -> bool {
        let Some(live) = self.messages.remove(id) else {
            return false;
        };
        self.order.remove(&ListCursor::of(&live.record));
        self.chores_due |= drop_live(&mut self.segments, live.body, self.active);
        if let Some(latest) = live.latest {
            self.chores_due |= drop_live(&mut self.segments, latest, self.active);
        }
        if let Some(s) = self.segments.get_mut(&segment) {
            s.shadows
                .extend(live.segments.into_iter().filter(|&n| n != segment));
        }
        true
    }

    /// Writes `frames` at the end of the active segment (a new one if they
    /// would overfill it) with one durable write, then indexes them.
    /// Returns the records of the new messages, as the index keeps them.
    fn write(&mut self, frames: Frames) -> Result<Vec<Arc<MessageRecord>>, SpoolError> {
        if frames.buf.is_empty() {
            return Ok(Vec::new());
        }
        let total = frames.len();
        let mut buf = frames.buf;
        let mut spliced = frames.spliced;
        let mut shift = 0;
        if !frames.messages.is_empty() && !frames.changes.is_empty() {
            let mut grouped = Vec::with_capacity(buf.len() + 32);
            let group = JournalEntry::Group { len: total };
            shift = push_frame(&mut grouped, &group, &self.key)?;
            grouped.extend_from_slice(&buf);
            buf = grouped;
            for (at, _) in &mut spliced {
                *at += shift as usize;
            }
        }
        // Removals alone are not worth an fsync: one lost to a power
        // failure only means the message is delivered again (at least
        // once), and the next write that syncs covers them.
        let sync = !frames.messages.is_empty()
            || frames
                .changes
                .iter()
                .any(|(change, _, _)| !matches!(change, Change::Remove(_)));
        let rotated = self.rotate_if_full(total + shift)?;
        let before = self.active_segment().len;
        let start = self.append_spliced(&buf, &spliced, sync)? + shift;
        let from = self.spare_from();
        let halfway = before < from && self.active_segment().len >= from;
        let segment = self.active;
        let at = |offset: u64, len: u64| Loc {
            segment,
            offset: start + offset,
            len,
        };
        let mut stored = Vec::with_capacity(frames.messages.len());
        for (record, offset, len, body_len) in frames.messages {
            stored.push(record.clone());
            self.insert_message(record, at(offset, len), body_len);
        }
        for (change, offset, len) in frames.changes {
            match change {
                Change::Update(record) => {
                    self.update_record(record, at(offset, len));
                }
                Change::Remove(id) => {
                    self.forget(&id, segment);
                }
            }
        }
        self.chores_due |= rotated || (halfway && self.options.zero_ahead);
        Ok(stored)
    }

    /// Writes `buf` at the end of the active segment, with the bodies
    /// spliced in where [`Frames::spliced`] says: those in memory go to
    /// the kernel as they are, with the frames around them, in `pwritev`
    /// calls of at most [`MAX_WRITE`]; those on disk are copied a chunk at
    /// a time. With `sync` it waits until they are durable. Returns the
    /// offset it was written at. On failure the segment is cut back to
    /// where it ended.
    fn append_spliced(
        &mut self,
        buf: &[u8],
        spliced: &[(usize, Part)],
        sync: bool,
    ) -> Result<u64, SpoolError> {
        self.clean_tail()?;
        let path = self.path(self.active);
        let segment = self.active_segment();
        let start = segment.len;
        let file = segment.file.clone();
        let written = (|| -> io::Result<u64> {
            let mut at = start;
            let mut slices = Vec::with_capacity(2 * spliced.len() + 1);
            let mut done = 0;
            for (splice_at, part) in spliced {
                slices.push(IoSlice::new(&buf[done..*splice_at]));
                done = *splice_at;
                match part {
                    Part::Memory(bytes) => slices.push(IoSlice::new(bytes)),
                    Part::Disk(part) => {
                        at = write_all_vectored_at(&file, &mut slices, at)?;
                        slices.clear();
                        part.for_each_chunk(|chunk| {
                            file.write_all_at(chunk, at)
                                .map_err(|e| SpoolError::Unavailable(e.to_string()))?;
                            at += chunk.len() as u64;
                            Ok(())
                        })
                        .map_err(|e| io::Error::other(e.to_string()))?;
                    }
                }
            }
            slices.push(IoSlice::new(&buf[done..]));
            at = write_all_vectored_at(&file, &mut slices, at)?;
            if sync {
                file.sync_data()?;
            }
            Ok(at)
        })();
        let segment = self.active_segment();
        match written {
            Ok(end) => {
                segment.len = end;
                if sync {
                    self.journal_writes += 1;
                }
                self.unsynced = !sync;
                Ok(start)
            }
            Err(err) => {
                if let Err(cut) = file.set_len(start).and_then(|()| file.sync_data()) {
                    tracing::warn!(segment = %path.display(), offset = start, error = %cut,
                        "could not cut back a failed journal write; retrying before the next one");
                    self.dirty_tail = true;
                }
                Err(io_error(format_args!("writing {}", path.display()), err))
            }
        }
    }

    /// Makes removals written without an fsync durable: before the
    /// segment is left for the next (every older segment is complete
    /// and on disk), and when the spool has been quiet a while.
    fn sync_active(&mut self) -> Result<(), SpoolError> {
        if !self.unsynced {
            return Ok(());
        }
        let path = self.path(self.active);
        self.active_segment()
            .file
            .sync_data()
            .map_err(|e| io_error(format_args!("syncing {}", path.display()), e))?;
        self.unsynced = false;
        self.late_syncs += 1;
        Ok(())
    }

    /// Cuts off what a failed write left behind, if anything.
    fn clean_tail(&mut self) -> Result<(), SpoolError> {
        if !self.dirty_tail {
            return Ok(());
        }
        let path = self.path(self.active);
        let segment = self.active_segment();
        segment
            .file
            .set_len(segment.len)
            .and_then(|()| segment.file.sync_data())
            .map_err(|e| io_error(format_args!("truncating {}", path.display()), e))?;
        self.dirty_tail = false;
        Ok(())
    }

    /// Starts a new segment if `incoming` bytes would overfill the active
    /// one. Returns whether it did.
    fn rotate_if_full(&mut self, incoming: u64) -> Result<bool, SpoolError> {
        let active = self.active_segment();
        if active.len <= active.checksum.start()
            || active.len + incoming <= self.options.segment_size
        {
            return Ok(false);
        }
        self.clean_tail()?;
        self.sync_active()?;
        // An older segment ends at its last frame, as replay expects of it.
        self.cut_to_length(self.active)?;
        let next = self.active + 1;
        let ahead = self.spare.take().and_then(|spare| {
            self.use_spare(spare, next)
                .inspect_err(
                    |error| tracing::warn!(%error, "cannot use the segment made ahead; making one"),
                )
                .ok()
        });
        // On failure nothing was written to it; the old segment stays active.
        let segment = match ahead {
            Some(segment) => segment,
            None => create_segment(&self.dir, next, &self.key)?,
        };
        self.active_segment().retired = Some(Instant::now());
        self.segments.insert(next, segment);
        self.active = next;
        self.active_since = (self.journal_writes, self.active_segment().len);
        tracing::debug!(segment = %self.path(next).display(), "started a new journal segment");
        Ok(true)
    }

    /// Cuts segment `number`'s file to the length of its frames, durably,
    /// if it is longer (made ahead of use, see [`SPARE_FILE`]).
    fn cut_to_length(&self, number: u64) -> Result<(), SpoolError> {
        let path = self.path(number);
        let segment = &self.segments[&number];
        let (file, len) = (&segment.file, segment.len);
        file.metadata()
            .and_then(|m| match m.len() > len {
                true => file.set_len(len).and_then(|()| file.sync_data()),
                false => Ok(()),
            })
            .map_err(|e| io_error(format_args!("cutting {}", path.display()), e))
    }

    /// How full the active segment is when the next is made ahead
    /// ([`SPARE_FILE`]): half, so that a quiet spool writes no zeros.
    fn spare_from(&self) -> u64 {
        self.options.segment_size / 2
    }

    /// Makes `spare` segment `number`: its header, then its name.
    fn use_spare(&self, spare: File, number: u64) -> Result<Segment, SpoolError> {
        let path = self.path(number);
        let spare_path = self.dir.join(SPARE_FILE);
        let placed = spare
            .write_all_at(&segment_header(&self.key), 0)
            .and_then(|()| spare.sync_data())
            .and_then(|()| fs::rename(&spare_path, &path))
            .map_err(|e| io_error(format_args!("making {}", path.display()), e))
            .and_then(|()| sync_dir(&self.dir));
        if let Err(error) = placed {
            let _ = fs::remove_file(&spare_path);
            let _ = fs::remove_file(&path);
            return Err(error);
        }
        tracing::debug!(segment = %path.display(), "started a journal segment made ahead");
        Ok(Segment::new(spare, Checksum::Keyed(self.key)))
    }

    /// The sparse old segments that have settled: their live messages are
    /// worth writing again so the files can go.
    fn compaction_candidates(&self) -> BTreeSet<u64> {
        let ratio = self.options.compact_below;
        let settled = |s: &Segment| {
            s.retired
                .is_none_or(|at| at.elapsed() >= self.options.compact_after)
        };
        self.segments
            .iter()
            .filter(|&(&n, s)| {
                n != self.active
                    && s.live > 0
                    && (s.live as f64) < s.len as f64 * ratio
                    && settled(s)
            })
            .map(|(&n, _)| n)
            .collect()
    }

    /// The live messages with an entry in `segments`, among up to `max`
    /// from `from` on in listing order, and where the next look starts
    /// (`None` at the end, or once nothing in `segments` is live). In
    /// steps, so the index is never held for a pass over every message;
    /// old segments mostly hold old mail, found early in that order.
    fn members(
        &self,
        segments: &BTreeSet<u64>,
        from: Bound<ListCursor>,
        max: usize,
    ) -> (Vec<Member>, Option<ListCursor>) {
        // What was found before has been moved out (or changed since).
        if segments
            .iter()
            .all(|n| self.segments.get(n).is_none_or(|s| s.live == 0))
        {
            return (Vec::new(), None);
        }
        let mut found = Vec::new();
        let (mut looked, mut last) = (0, None);
        for key in self.order.range((from, Bound::Unbounded)).take(max) {
            looked += 1;
            last = Some(key);
            let live = &self.messages[&key.id];
            let inside = segments.contains(&live.body.segment)
                || live.latest.is_some_and(|l| segments.contains(&l.segment));
            if let (true, Some(source)) = (inside, self.segments.get(&live.body.segment)) {
                found.push(Member {
                    record: live.record.clone(),
                    body: live.body,
                    body_len: live.body_len,
                    file: source.file.clone(),
                    checksum: source.checksum,
                });
            }
        }
        let next = if looked == max { last.cloned() } else { None };
        (found, next)
    }

    /// Appends the copies whose message the index still holds as it was
    /// read, and points the index at them. A copy of a record changed or
    /// removed since would bring the old one back at the next replay, so
    /// those are left out (their segment stays sparse and is compacted
    /// again). Not synced: the caller syncs before the old segments can be
    /// deleted. Returns how many copies, and bytes, were placed.
    fn place_copies(&mut self, copies: Copies) -> Result<(usize, usize), SpoolError> {
        let all = copies.placed.len();
        let kept: Vec<_> = copies
            .placed
            .into_iter()
            .filter(|(member, _, _)| {
                self.messages.get(&member.record.id).is_some_and(|live| {
                    Arc::ptr_eq(&live.record, &member.record) && live.body == member.body
                })
            })
            .collect();
        if kept.is_empty() {
            return Ok((0, 0));
        }
        // Usually all of them: then the frames go as they were built.
        let (buf, kept) = if kept.len() == all {
            let kept = kept
                .into_iter()
                .map(|(m, offset, len)| (m.record, offset, len, m.body_len))
                .collect::<Vec<_>>();
            (copies.buf, kept)
        } else {
            let mut buf = Vec::with_capacity(copies.buf.len());
            let mut moved = Vec::with_capacity(kept.len());
            for (member, offset, len) in kept {
                moved.push((member.record, buf.len() as u64, len, member.body_len));
                buf.extend_from_slice(&copies.buf[offset as usize..(offset + len) as usize]);
            }
            (buf, moved)
        };
        self.chores_due |= self.rotate_if_full(buf.len() as u64)?;
        let start = self.append_spliced(&buf, &[], false)?;
        let placed = (kept.len(), buf.len());
        for (record, offset, len, body_len) in kept {
            let at = Loc {
                segment: self.active,
                offset: start + offset,
                len,
            };
            self.insert_message(record, at, body_len);
        }
        Ok(placed)
    }

    /// The old segments that hold nothing live and whose removals shadow
    /// no segment that is still there.
    fn dead_segments(&self) -> Vec<u64> {
        if self.deletions_held {
            return Vec::new();
        }
        self.segments
            .iter()
            .filter(|&(&n, s)| {
                n != self.active
                    && s.live == 0
                    && s.shadows.iter().all(|o| !self.segments.contains_key(o))
            })
            .map(|(&n, _)| n)
            .collect()
    }

    /// Takes deleted segments out of the index.
    fn close_segments(&mut self, numbers: &[u64]) -> Vec<(u64, Segment)> {
        numbers
            .iter()
            .filter_map(|&n| Some((n, self.segments.remove(&n)?)))
            .collect()
    }

    /// Reads one segment into the index, from its first frame on. Damage
    /// is dealt with by [`State::recover`]: a torn tail of the last
    /// segment is cut off, a bad region before valid frames (or in an
    /// older segment) is quarantined and skipped.
    fn replay(&mut self, number: u64, last: bool) -> Result<(), SpoolError> {
        let path = self.path(number);
        let segment = &self.segments[&number];
        let (file, checksum) = (segment.file.clone(), segment.checksum);
        let file_len = file
            .metadata()
            .map_err(|e| io_error(format_args!("reading {}", path.display()), e))?
            .len();
        let read_error = |e| io_error(format_args!("reading {}", path.display()), e);
        let mut reader = BufReader::with_capacity(1 << 20, &*file);
        let mut pos = checksum.start();
        reader.seek(SeekFrom::Start(pos)).map_err(read_error)?;
        let mut len = file_len;
        // Damage inside a group, found (and dealt with) when the group
        // started: where it is and what was done about it.
        let mut known: Option<(u64, Recovery)> = None;
        while pos < file_len {
            let payload = match read_frame(&mut reader, file_len - pos, checksum) {
                Ok(payload) => payload,
                Err(FrameError::Io(e)) => return Err(read_error(e)),
                Err(FrameError::Bad(reason)) => {
                    let recovery = match known.take() {
                        Some((at, recovery)) if at == pos => recovery,
                        // The unused rest of a segment made ahead of use
                        // (or a tail torn to zeros): nothing there was
                        // ever acknowledged, and the next write goes there.
                        _ if last && zeros_from(&file, pos, file_len).map_err(read_error)? => {
                            len = pos;
                            break;
                        }
                        _ => self.recover(number, &file, pos, file_len, last, &reason)?,
                    };
                    match recovery {
                        Recovery::Resync(next) => {
                            pos = next;
                            reader.seek(SeekFrom::Start(pos)).map_err(read_error)?;
                            continue;
                        }
                        Recovery::Truncated => len = pos,
                        Recovery::QuarantinedTail => {}
                    }
                    break;
                }
            };
            let loc = Loc {
                segment: number,
                offset: pos,
                len: FRAME_HEADER + payload.len() as u64,
            };
            // The checksum matched, so an entry that does not decode was
            // written that way (by a newer release?): never cut it off.
            let entry: JournalEntry = envelope::decode(&payload).map_err(|e| {
                SpoolError::Corrupt(format!("{} at offset {pos}: {e}", path.display()))
            })?;
            match entry {
                JournalEntry::Message { record, body } => {
                    if !payload.ends_with(&body) {
                        return Err(SpoolError::Corrupt(format!(
                            "{} at offset {pos}: body is not at the end of its entry",
                            path.display()
                        )));
                    }
                    self.insert_message(Arc::new(record), loc, body.len() as u64);
                }
                JournalEntry::Update { record } => {
                    // Unknown: the message was compacted into a later segment.
                    self.update_record(Arc::new(record), loc);
                }
                JournalEntry::Remove { id } => {
                    self.forget(&id, number);
                }
                JournalEntry::Group { len: group_len } => {
                    let first = pos + loc.len;
                    let damage = group_damage(&file, first, first + group_len, file_len, checksum)
                        .map_err(read_error)?;
                    if let Some(bad) = damage {
                        let reason = "a write of entries that belong together is incomplete";
                        match self.recover(number, &file, bad, file_len, last, reason)? {
                            Recovery::Truncated => {
                                // Torn by a crash: none of it was acknowledged.
                                tracing::warn!(segment = %path.display(), offset = pos,
                                    "cutting off the whole of a torn journal write");
                                file.set_len(pos)
                                    .and_then(|()| file.sync_all())
                                    .map_err(|e| {
                                        io_error(format_args!("truncating {}", path.display()), e)
                                    })?;
                                len = pos;
                                break;
                            }
                            // Damage to written entries: those before it are kept.
                            recovery => known = Some((bad, recovery)),
                        }
                    }
                }
            }
            pos += loc.len;
        }
        self.segments
            .get_mut(&number)
            .expect("segment being replayed is open")
            .len = len;
        Ok(())
    }

    /// Deals with the bad frame at `pos` of segment `number` (`end` long).
    ///
    /// The next valid frame is where the damaged frame's own length says,
    /// if a valid frame is there; otherwise the first offset after `pos`
    /// where one is. None in the last segment: a torn tail, cut off. None
    /// in an older one: its tail is quarantined (those segments were
    /// complete and durable when the next one started). Found: the bytes
    /// in between are quarantined and replay goes on there.
    fn recover(
        &self,
        number: u64,
        file: &File,
        pos: u64,
        end: u64,
        last: bool,
        reason: &str,
    ) -> Result<Recovery, SpoolError> {
        let path = self.path(number);
        let read_error = |e| io_error(format_args!("reading {}", path.display()), e);
        let checksum = self.segments[&number].checksum;
        let by_length = match frame_len_at(file, pos, end).map_err(read_error)? {
            Some(len) => {
                let next = pos + FRAME_HEADER + len;
                (next < end && valid_frame_at(file, next, end, checksum).map_err(read_error)?)
                    .then_some(next)
            }
            None => None,
        };
        let next = match by_length {
            Some(next) => Some(next),
            None => match find_frame(file, pos + 1, end, checksum).map_err(read_error)? {
                Found::At(next) => Some(next),
                Found::Nothing => None,
                Found::GaveUp { checked, at } => {
                    return Err(SpoolError::Corrupt(format!(
                        "{} at offset {pos}: {reason}; no valid entry found up to offset {at} \
                         after checking {checked} bytes of candidates. Copy the file aside, \
                         then cut it at offset {pos} (losing the entries after it) or restore \
                         it from a backup, and start again",
                        path.display()
                    )))
                }
            },
        };
        match next {
            None if last => {
                tracing::warn!(segment = %path.display(), offset = pos,
                    dropped_bytes = end - pos, %reason,
                    "cutting off a torn journal tail");
                file.set_len(pos)
                    .and_then(|()| file.sync_all())
                    .map_err(|e| io_error(format_args!("truncating {}", path.display()), e))?;
                Ok(Recovery::Truncated)
            }
            Some(next) if checksum == Checksum::Plain && by_length.is_none() => {
                Err(SpoolError::Corrupt(format!(
                    "{} at offset {pos}: {reason}; valid entries follow from offset {next}, \
                     but in a segment written before keyed checksums they cannot be told \
                     apart from message content. Copy the file aside, then remove bytes \
                     {pos}..{next} from it (the entries in them are lost) or restore it \
                     from a backup, and start again",
                    path.display()
                )))
            }
            next => {
                let to = next.unwrap_or(end);
                let kept = self.quarantine(number, file, pos, to)?;
                tracing::error!(segment = %path.display(), offset = pos, bytes = to - pos,
                    quarantine = %kept.display(), %reason,
                    "damaged journal entries quarantined; the messages in them are lost, \
                     replay goes on at the next valid entry");
                Ok(match next {
                    Some(next) => Recovery::Resync(next),
                    None => Recovery::QuarantinedTail,
                })
            }
        }
    }

    /// Copies bytes `from..to` of segment `number` to the quarantine
    /// directory, durably; returns the copy's path.
    fn quarantine(
        &self,
        number: u64,
        file: &File,
        from: u64,
        to: u64,
    ) -> Result<PathBuf, SpoolError> {
        let dir = self.dir.join(QUARANTINE_DIR);
        fs::create_dir_all(&dir)
            .map_err(|e| io_error(format_args!("creating {}", dir.display()), e))?;
        let path = dir.join(format!("{}.{from}.bad", segment_name(number)));
        let write_error = |e| io_error(format_args!("writing {}", path.display()), e);
        let out = File::create(&path).map_err(write_error)?;
        let mut chunk = vec![0u8; 1 << 20];
        let mut at = from;
        while at < to {
            let n = (to - at).min(chunk.len() as u64) as usize;
            file.read_exact_at(&mut chunk[..n], at)
                .map_err(|e| io_error("reading damaged journal bytes", e))?;
            out.write_all_at(&chunk[..n], at - from)
                .map_err(write_error)?;
            at += n as u64;
        }
        out.sync_all().map_err(write_error)?;
        sync_dir(&dir)?;
        sync_dir(&self.dir)?;
        Ok(path)
    }
}

/// Where the frames from `from` to `to` stop being valid, if they do
/// before `to`; a frame reaching past `to` ends the check.
fn group_damage(
    file: &File,
    from: u64,
    to: u64,
    end: u64,
    checksum: Checksum,
) -> io::Result<Option<u64>> {
    let mut at = from;
    while at < to {
        if !valid_frame_at(file, at, end, checksum)? {
            return Ok(Some(at));
        }
        let len = frame_len_at(file, at, end)?.expect("a valid frame has a length");
        at += FRAME_HEADER + len;
    }
    Ok(None)
}

/// What [`State::recover`] did.
enum Recovery {
    /// Replay goes on at this offset.
    Resync(u64),
    /// The segment ends here now.
    Truncated,
    /// The rest of the segment is damaged and kept in quarantine.
    QuarantinedTail,
}

enum FrameError {
    Io(io::Error),
    /// Short, oversized, empty or with the wrong checksum.
    Bad(String),
}

/// Reads one frame's payload; `remaining` is what is left of the file.
fn read_frame(
    reader: &mut impl Read,
    remaining: u64,
    checksum: Checksum,
) -> Result<Vec<u8>, FrameError> {
    if remaining < FRAME_HEADER {
        return Err(FrameError::Bad(format!(
            "{remaining} bytes, less than a frame header"
        )));
    }
    let mut header = [0u8; FRAME_HEADER as usize];
    reader.read_exact(&mut header).map_err(FrameError::Io)?;
    let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
    let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
    if len == 0 {
        // Every entry has at least its version byte: this is zeroed space.
        return Err(FrameError::Bad("empty entry (zero-filled?)".into()));
    }
    if u64::from(len) > remaining - FRAME_HEADER {
        return Err(FrameError::Bad(format!(
            "entry of {len} bytes but only {} left",
            remaining - FRAME_HEADER
        )));
    }
    let mut payload = vec![0u8; len as usize];
    reader.read_exact(&mut payload).map_err(FrameError::Io)?;
    if checksum.of(&payload) != crc {
        return Err(FrameError::Bad("checksum mismatch".into()));
    }
    Ok(payload)
}

/// The payload length in the frame header at `pos`, if it is one a frame
/// could have there.
fn frame_len_at(file: &File, pos: u64, end: u64) -> io::Result<Option<u64>> {
    if end.saturating_sub(pos) < FRAME_HEADER {
        return Ok(None);
    }
    let mut len = [0u8; 4];
    file.read_exact_at(&mut len, pos)?;
    let len = u64::from(u32::from_le_bytes(len));
    Ok((len > 0 && len <= end - pos - FRAME_HEADER).then_some(len))
}

/// Whether a whole frame at `pos` passes its checksum and decodes.
fn valid_frame_at(file: &File, pos: u64, end: u64, checksum: Checksum) -> io::Result<bool> {
    let Some(len) = frame_len_at(file, pos, end)? else {
        return Ok(false);
    };
    let mut frame = vec![0u8; (FRAME_HEADER + len) as usize];
    file.read_exact_at(&mut frame, pos)?;
    let crc = u32::from_le_bytes(frame[4..8].try_into().expect("4 bytes"));
    let payload = &frame[FRAME_HEADER as usize..];
    if payload[0] != envelope::RECORD_VERSION || checksum.of(payload) != crc {
        return Ok(false);
    }
    Ok(match envelope::decode::<JournalEntry>(payload) {
        Ok(JournalEntry::Message { body, .. }) => payload.ends_with(&body),
        Ok(_) => true,
        Err(_) => false,
    })
}

/// What a search for the next frame found.
enum Found {
    At(u64),
    Nothing,
    /// Candidates worth this many bytes were checked without a result, up
    /// to this offset; the search stopped there.
    GaveUp {
        checked: u64,
        at: u64,
    },
}

/// Bytes of candidate frames one search reads before it gives up. Text
/// rarely starts a plausible frame; random binary content can, and each
/// candidate is read whole, so this bounds a search to seconds.
const SEARCH_BUDGET: u64 = 4 << 30;

/// The first offset in `from..end` where a valid frame starts. Reads the
/// file a window at a time and checks a whole frame only where the header
/// and version byte could start one.
fn find_frame(file: &File, from: u64, end: u64, checksum: Checksum) -> io::Result<Found> {
    const WINDOW: u64 = 1 << 20;
    let mut checked = 0u64;
    let probe = FRAME_HEADER + 1; // header and the version byte
    let mut window = vec![0u8; (WINDOW + probe) as usize];
    let mut base = from;
    while base + probe <= end {
        let n = (end - base).min(WINDOW + probe) as usize;
        file.read_exact_at(&mut window[..n], base)?;
        let offsets = (n as u64 + 1 - probe).min(WINDOW) as usize;
        for i in 0..offsets {
            let at = base + i as u64;
            let len = u64::from(u32::from_le_bytes(
                window[i..i + 4].try_into().expect("4 bytes"),
            ));
            if len == 0
                || len > end - at - FRAME_HEADER
                || window[i + FRAME_HEADER as usize] != envelope::RECORD_VERSION
            {
                continue;
            }
            if checked > SEARCH_BUDGET {
                return Ok(Found::GaveUp { checked, at });
            }
            checked += FRAME_HEADER + len;
            if valid_frame_at(file, at, end, checksum)? {
                return Ok(Found::At(at));
            }
        }
        base += offsets as u64;
    }
    Ok(Found::Nothing)
}

/// Most buffers one `pwritev` takes on Linux (`IOV_MAX`).
const MAX_SLICES: usize = 1024;

/// Most bytes one write call carries. A write that covers an aligned
/// 2 MiB of the file may be given a 2 MiB page-cache folio, and on a
/// virtual machine that hands its free 2 MiB blocks back to the host such
/// a folio is dear: 600 MB written 2 MiB a call at aligned offsets, each
/// call followed by an `fdatasync`, took 0.4–1.9 CPU s in 6 runs of 10
/// here, a MiB a call (or 2 MiB 4 KiB off) never more than 0.37 s
/// (`scripts/fsync_probe.py sizes`). At 200 sessions with 100 KB messages
/// a commit carries 2–4 MB, and the node spent a quarter of its CPU
/// copying them into the page cache.
const MAX_WRITE: usize = 1 << 20;

/// Writes all of `slices` at `at`, in calls of at most [`MAX_WRITE`]
/// bytes and [`MAX_SLICES`] buffers; returns the offset after them. Empty
/// slices are fine.
fn write_all_vectored_at(file: &File, slices: &mut [IoSlice<'_>], mut at: u64) -> io::Result<u64> {
    let mut slices = slices;
    IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        let (mut n, mut bytes) = (0, 0);
        while n < slices.len().min(MAX_SLICES) && bytes + slices[n].len() <= MAX_WRITE {
            bytes += slices[n].len();
            n += 1;
        }
        let result = if n == 0 {
            // The first buffer alone is larger than a call takes.
            rustix::io::pwrite(file, &slices[0][..MAX_WRITE], at)
        } else {
            rustix::io::pwritev(file, &slices[..n], at)
        };
        match result {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => {
                at += written as u64;
                IoSlice::advance_slices(&mut slices, written);
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(errno) => return Err(errno.into()),
        }
    }
    Ok(at)
}

/// Fills all of `slices` from `at` on, as few calls as the kernel allows.
fn read_exact_vectored_at(
    file: &File,
    slices: &mut [IoSliceMut<'_>],
    mut at: u64,
) -> io::Result<()> {
    let mut slices = slices;
    IoSliceMut::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        let n = slices.len().min(MAX_SLICES);
        match rustix::io::preadv(file, &mut slices[..n], at) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(read) => {
                at += read as u64;
                IoSliceMut::advance_slices(&mut slices, read);
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(errno) => return Err(errno.into()),
        }
    }
    Ok(())
}

/// Reads the frame at `loc`, checks it, and returns its last `body_len`
/// bytes: the body, read into a buffer of its own rather than cut out of
/// the frame's.
fn read_body_at(
    file: &File,
    checksum: Checksum,
    loc: Loc,
    body_len: u64,
) -> Result<Vec<u8>, SpoolError> {
    let (frame, body) = FrameHead::read(file, loc, body_len, body_len)?;
    let mut hasher = frame.hasher(checksum);
    hasher.update(&body);
    frame.check_crc(hasher.finalize())?;
    Ok(body)
}

/// [`read_body_at`] for a body past [`READ_WHOLE_UP_TO`]: the frame is
/// checked a chunk at a time, and the body handed back as its first chunk
/// and its place in the segment, to be read again as it is sent (frames
/// are never rewritten, and the handle outlives a compaction).
fn read_large_body_at(
    file: &Arc<File>,
    checksum: Checksum,
    loc: Loc,
    body_len: u64,
) -> Result<Body, SpoolError> {
    let first_len = (BODY_CHUNK as u64).min(body_len);
    let (frame, first) = FrameHead::read(file, loc, body_len, first_len)?;
    let rest_at = loc.offset + frame.bytes.len() as u64 + first_len;
    let body = Body::stored(first, file.clone(), rest_at, body_len - first_len);
    // Checked as it is read: only a chunk is held at a time.
    let mut hasher = frame.hasher(checksum);
    body.for_each_chunk(|chunk| {
        hasher.update(chunk);
        Ok(())
    })?;
    frame.check_crc(hasher.finalize())?;
    Ok(body)
}

/// The part of a message frame before its body: the frame header and the
/// message's head, checked with the body.
struct FrameHead {
    loc: Loc,
    bytes: Vec<u8>,
}

impl FrameHead {
    /// The head of the frame at `loc`, whose body is `body_len` bytes, and
    /// the first `first` bytes of that body, in one read.
    fn read(
        file: &File,
        loc: Loc,
        body_len: u64,
        first: u64,
    ) -> Result<(FrameHead, Vec<u8>), SpoolError> {
        let head_len = loc
            .len
            .checked_sub(body_len)
            .filter(|&n| n >= FRAME_HEADER)
            .ok_or_else(|| corrupt_body(loc))?;
        let mut bytes = vec![0u8; head_len as usize];
        let mut body = vec![0u8; first as usize];
        read_exact_vectored_at(
            file,
            &mut [IoSliceMut::new(&mut bytes), IoSliceMut::new(&mut body)],
            loc.offset,
        )
        .map_err(|e| io_error("reading a message body", e))?;
        Ok((FrameHead { loc, bytes }, body))
    }

    /// A hasher fed the frame's payload up to the body: the body's bytes
    /// go after, as they are read.
    fn hasher(&self, checksum: Checksum) -> crc32fast::Hasher {
        let mut hasher = checksum.hasher();
        hasher.update(&self.bytes[FRAME_HEADER as usize..]);
        hasher
    }

    /// Whether the frame's length and `crc`, the checksum of its payload
    /// as read, are those in its header.
    fn check_crc(&self, crc: u32) -> Result<(), SpoolError> {
        let len = u32::from_le_bytes(self.bytes[..4].try_into().expect("4 bytes"));
        let stored = u32::from_le_bytes(self.bytes[4..8].try_into().expect("4 bytes"));
        if u64::from(len) != self.loc.len - FRAME_HEADER || crc != stored {
            return Err(corrupt_body(self.loc));
        }
        Ok(())
    }
}

fn corrupt_body(loc: Loc) -> SpoolError {
    SpoolError::Corrupt(format!(
        "message body in segment {} at offset {} fails its checksum",
        loc.segment, loc.offset
    ))
}

/// A live message of a segment being compacted, as the index held it.
struct Member {
    record: Arc<MessageRecord>,
    body: Loc,
    body_len: u64,
    /// The segment that holds the body; the handle outlives its deletion.
    file: Arc<File>,
    checksum: Checksum,
}

/// Members written out again as `Message` frames, each with its offset
/// and length in `buf`; read and built with the index unlocked.
#[derive(Default)]
struct Copies {
    buf: Vec<u8>,
    placed: Vec<(Member, u64, u64)>,
}

impl Copies {
    fn push(&mut self, member: Member, key: &Key) -> Result<(), SpoolError> {
        let body = read_body_at(&member.file, member.checksum, member.body, member.body_len)?;
        let record = (*member.record).clone();
        let offset = self.buf.len() as u64;
        let len = push_frame(&mut self.buf, &JournalEntry::Message { record, body }, key)?;
        self.placed.push((member, offset, len));
        Ok(())
    }
}

/// Messages of the index a step of compaction looks through, and bytes of
/// copies it writes at once, each with the index locked: at a million
/// queued messages a whole pass would hold every write up for a third of
/// a second.
const COMPACT_SCAN_STEP: usize = 16_384;
const COMPACT_WRITE_STEP: usize = 256 << 10;

/// Does the spool's chores when a write rings, and syncs removals that no
/// later write synced every `period`, until the spool is closed. It holds
/// the spool only while it works.
fn keep_house(inner: Weak<Inner>, bell: Arc<Doorbell>, period: Duration) {
    let mut synced = Instant::now();
    loop {
        let Some(rung) = bell.wait(period.saturating_sub(synced.elapsed())) else {
            return;
        };
        let Some(inner) = inner.upgrade() else {
            return;
        };
        // Compaction waits for segments to settle; the tick finds them.
        let due = synced.elapsed() >= period;
        if rung || due {
            if let Err(error) = inner.do_chores() {
                tracing::warn!(%error, "journal housekeeping failed; trying again");
            }
            if let Err(error) = inner.make_spare() {
                tracing::warn!(%error, "cannot make the next journal segment ahead; \
                    it is made when needed");
            }
        }
        if due {
            if let Err(error) = inner.state().and_then(|mut state| state.sync_active()) {
                tracing::warn!(%error, "cannot sync the journal; trying again");
            }
            synced = Instant::now();
        }
    }
}

/// How writes wake the housekeeping thread, and how the last handle of
/// the spool stops it.
#[derive(Debug, Default)]
struct Doorbell {
    state: Mutex<Rung>,
    wake: Condvar,
}

#[derive(Debug, Default)]
struct Rung {
    chores: bool,
    closing: bool,
}

impl Doorbell {
    fn lock(&self) -> MutexGuard<'_, Rung> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks for the chores; a bell already rung is not rung again.
    fn ring(&self) {
        let mut rung = self.lock();
        if !rung.chores {
            rung.chores = true;
            self.wake.notify_one();
        }
    }

    fn close(&self) {
        self.lock().closing = true;
        self.wake.notify_one();
    }

    /// Waits at most `timeout` for a ring: whether there was one, or
    /// `None` when the spool is closing.
    fn wait(&self, timeout: Duration) -> Option<bool> {
        let (mut rung, _) = self
            .wake
            .wait_timeout_while(self.lock(), timeout, |r| !r.chores && !r.closing)
            .unwrap_or_else(|e| e.into_inner());
        if rung.closing {
            return None;
        }
        Some(std::mem::take(&mut rung.chores))
    }
}

/// Stops the housekeeping thread when the last handle of the spool goes,
/// before the spool itself closes: a spool dropped is a spool closed, its
/// directory free to open again.
#[derive(Debug)]
struct Housekeeper {
    bell: Arc<Doorbell>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Housekeeper {
    fn drop(&mut self) {
        self.bell.close();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[derive(Debug)]
struct Inner {
    state: Mutex<State>,
    /// Writes waiting for the next journal write (group commit).
    commits: Mutex<Commits>,
    /// The active segment's key (it never changes while the spool is
    /// open), so frames can be built before the state is locked.
    key: Key,
    /// Wakes the housekeeping thread.
    bell: Arc<Doorbell>,
    /// Held (and locked) for as long as the spool is open.
    _lock: File,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Ok(state) = self.state.get_mut() {
            if let Err(error) = state.sync_active() {
                tracing::warn!(%error, "cannot sync the journal at close");
            }
        }
    }
}

impl Inner {
    fn state(&self) -> Result<MutexGuard<'_, State>, SpoolError> {
        self.state
            .lock()
            .map_err(|_| SpoolError::Unavailable("spool state poisoned by an earlier panic".into()))
    }

    /// Compacts the segments due, then deletes the segments
    /// that hold nothing live, with the state unlocked but for the moments
    /// it is read and changed. A segment leaves the index only once its
    /// deletion is durable, so that the segments whose removals shadow it
    /// stay until then.
    fn do_chores(&self) -> Result<(), SpoolError> {
        self.state()?.chores_due = false;
        self.compact()?;
        loop {
            let (dir, dead) = {
                let state = self.state()?;
                (state.dir.clone(), state.dead_segments())
            };
            if dead.is_empty() {
                return Ok(());
            }
            delete_segments(&dir, &dead)?;
            let closed = self.state()?.close_segments(&dead);
            for (n, segment) in closed {
                let path = deleting_path(&dir.join(segment_name(n)));
                give_back(&path, segment.only_handle());
            }
        }
    }

    /// Makes the next segment ahead of use ([`SPARE_FILE`]) once the
    /// active one is half full, with the state unlocked while the zeros
    /// are written.
    fn make_spare(&self) -> Result<(), SpoolError> {
        let (dir, size) = {
            let mut state = self.state()?;
            let size = state.options.segment_size;
            let len = state.active_segment().len;
            let (writes, since) = state.active_since;
            let fsyncs = state.journal_writes - writes;
            let due = state.options.zero_ahead
                && state.spare.is_none()
                && state.spare_retry.is_none_or(|at| Instant::now() >= at)
                && len >= state.spare_from()
                && fsyncs > 0
                && len.saturating_sub(since) / fsyncs <= ZERO_AHEAD_UP_TO;
            if !due {
                return Ok(());
            }
            (state.dir.clone(), size)
        };
        match make_spare(&dir, size) {
            Ok(spare) => {
                self.state()?.spare = Some(spare);
                Ok(())
            }
            Err(e) => {
                self.state()?.spare_retry = Some(Instant::now() + SPARE_RETRY);
                Err(io_error(
                    format_args!("zeroing {}", dir.join(SPARE_PARTIAL).display()),
                    e,
                ))
            }
        }
    }

    /// Writes the live messages of the settled sparse segments again into
    /// the active one, a step at a time: the index is locked to find them
    /// and to place each batch of copies, not while bodies are read, frames
    /// built and the copies synced. A body that cannot be read stops the
    /// compaction (logged; the journal stays correct, it only keeps more on
    /// disk).
    fn compact(&self) -> Result<(), SpoolError> {
        let candidates = self.state()?.compaction_candidates();
        if candidates.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let mut moved = (0, 0);
        let mut from = Bound::Unbounded;
        loop {
            let (members, next) = self.state()?.members(&candidates, from, COMPACT_SCAN_STEP);
            let mut copies = Copies::default();
            for member in members {
                if let Err(error) = copies.push(member, &self.key) {
                    tracing::warn!(%error, "journal compaction failed");
                    return self.place_synced(copies, &mut moved);
                }
                if copies.buf.len() >= COMPACT_WRITE_STEP {
                    self.place_synced(std::mem::take(&mut copies), &mut moved)?;
                }
            }
            self.place_synced(copies, &mut moved)?;
            match next {
                Some(cursor) => from = Bound::Excluded(cursor),
                None => break,
            }
        }
        if moved.0 > 0 {
            let segments: Vec<String> = candidates.iter().map(|&n| segment_name(n)).collect();
            tracing::info!(
                ?segments,
                messages = moved.0,
                bytes = moved.1,
                ms = started.elapsed().as_millis() as u64,
                "compacted journal segments"
            );
        }
        Ok(())
    }

    /// Places `copies` and syncs them at once, with the index unlocked:
    /// left to the next write's fsync they would make that write wait. If
    /// the sync fails, the copies may not be on disk while the index points
    /// at them, so no segment is deleted until the spool is opened again
    /// (and replays the originals).
    fn place_synced(&self, copies: Copies, moved: &mut (usize, usize)) -> Result<(), SpoolError> {
        if copies.placed.is_empty() {
            return Ok(());
        }
        let (placed, file) = {
            let mut state = self.state()?;
            let placed = state.place_copies(copies)?;
            (placed, state.active_segment().file.clone())
        };
        if placed.0 == 0 {
            return Ok(());
        }
        if let Err(error) = file.sync_data() {
            self.state()?.deletions_held = true;
            tracing::error!(%error, "cannot sync compacted journal entries; \
                no journal segment is deleted until the spool is opened again");
            return Err(io_error("syncing compacted journal entries", error));
        }
        moved.0 += placed.0;
        moved.1 += placed.1;
        Ok(())
    }

    fn commits(&self) -> MutexGuard<'_, Commits> {
        self.commits.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a write; `true` when the caller is to run [`Inner::commit`]
    /// (no commit is running, so none would take it).
    fn enqueue(&self, write: PendingWrite) -> bool {
        let mut commits = self.commits();
        commits.pending.push(write);
        !std::mem::replace(&mut commits.running, true)
    }

    /// Writes what is queued, as one journal write and one fsync, and
    /// again while more arrived meanwhile.
    fn commit(&self) {
        /// A commit that panics lets the next write start another, rather
        /// than leave every later write waiting for it.
        struct Running<'a>(&'a Inner);
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    self.0.commits().running = false;
                }
            }
        }
        let _running = Running(self);
        loop {
            let writes = {
                let mut commits = self.commits();
                if commits.pending.is_empty() {
                    commits.running = false;
                    return;
                }
                std::mem::take(&mut commits.pending)
            };
            self.write_together(writes);
        }
    }

    /// One journal write for `writes`; each hears its own part of the
    /// result. A change to an unknown message fails alone; a failed
    /// write fails them all.
    fn write_together(&self, writes: Vec<PendingWrite>) {
        // New messages are encoded before the state is locked, so that
        // encoding overlaps the write before.
        let mut frames = Frames::default();
        let mut parts = Vec::with_capacity(writes.len());
        for write in writes {
            let mut own = Frames::default();
            let encoded = write
                .batch
                .into_iter()
                .try_for_each(|message| own.push_message(message, &self.key));
            match encoded {
                Ok(()) => {
                    let messages = own.messages.len();
                    frames.append(own);
                    parts.push((messages, write.changes, Vec::new(), write.reply));
                }
                Err(error) => {
                    let _ = write.reply.send(Err(error));
                }
            }
        }
        let stored = self.state().and_then(|mut state| {
            for (_, changes, failed, _) in &mut parts {
                for change in std::mem::take(changes) {
                    let id = change.id().clone();
                    if !state.messages.contains_key(&id) {
                        failed.push((id.clone(), SpoolError::NotFound(id)));
                        continue;
                    }
                    frames.push_change(change, &self.key)?;
                }
            }
            let stored = state.write(frames)?;
            if state.chores_due {
                self.bell.ring();
            }
            Ok(stored)
        });
        match stored {
            Ok(stored) => {
                let mut stored = stored.into_iter();
                for (messages, _, failed, reply) in parts {
                    let _ = reply.send(Ok((stored.by_ref().take(messages).collect(), failed)));
                }
            }
            Err(error) => {
                for (_, _, _, reply) in parts {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
    }
}

/// The writes waiting for the journal, and whether a commit runs.
#[derive(Default)]
struct Commits {
    pending: Vec<PendingWrite>,
    running: bool,
}

impl std::fmt::Debug for Commits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Commits")
            .field("pending", &self.pending.len())
            .field("running", &self.running)
            .finish()
    }
}

type WriteResult = Result<(Vec<Arc<MessageRecord>>, Vec<(MessageId, SpoolError)>), SpoolError>;

/// New messages and changes to write, and who waits for them.
struct PendingWrite {
    batch: Vec<NewMessage>,
    changes: Vec<Change>,
    reply: tokio::sync::oneshot::Sender<WriteResult>,
}

/// The embedded spool: see the module documentation.
#[derive(Clone, Debug)]
pub struct LocalSpool {
    /// Dropped first: the thread is stopped before the spool closes.
    _housekeeper: Arc<Housekeeper>,
    inner: Arc<Inner>,
}

impl LocalSpool {
    /// Opens (creating if needed) the spool in `path`, replays its journal
    /// and takes the directory's lock. Blocking: call it at startup or
    /// from `spawn_blocking`.
    pub fn open(path: &Path, options: LocalSpoolOptions) -> Result<LocalSpool, SpoolError> {
        let sync_period = options.removals_synced_within;
        fs::create_dir_all(path)
            .map_err(|e| io_error(format_args!("creating {}", path.display()), e))?;
        let lock_path = path.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|e| io_error(format_args!("opening {}", lock_path.display()), e))?;
        // A lock can stay held for a moment after its owner let go: a child
        // process forked meanwhile shares the descriptor until it execs, and
        // a restarting node may still be exiting. Ask again for a short while.
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        loop {
            match lock.try_lock() {
                Ok(()) => break,
                Err(fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(fs::TryLockError::WouldBlock) => {
                    return Err(SpoolError::Unavailable(format!(
                        "spool {} is in use by another process",
                        path.display()
                    )))
                }
                Err(fs::TryLockError::Error(e)) => {
                    return Err(io_error(format_args!("locking {}", lock_path.display()), e))
                }
            }
        }

        let mut numbers = Vec::new();
        let entries = fs::read_dir(path)
            .map_err(|e| io_error(format_args!("listing {}", path.display()), e))?;
        for entry in entries {
            let entry =
                entry.map_err(|e| io_error(format_args!("listing {}", path.display()), e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(n) = parse_segment_name(name) {
                numbers.push(n);
            } else if name == SPARE_FILE || name == SPARE_PARTIAL {
                // Made ahead by the process before; made again when due.
                let path = entry.path();
                fs::remove_file(&path)
                    .map_err(|e| io_error(format_args!("removing {}", path.display()), e))?;
            } else if name
                .strip_suffix(DELETING_SUFFIX)
                .is_some_and(|segment| parse_segment_name(segment).is_some())
            {
                // Deleted before a crash, its space not yet freed.
                let path = entry.path();
                give_back(&path, OpenOptions::new().write(true).open(&path).ok());
            }
        }
        numbers.sort_unstable();

        // Every keyed segment carries the spool's key; a spool without one
        // (new, or written before keyed checksums) gets a fresh one.
        let mut headers = Vec::with_capacity(numbers.len());
        let mut files = Vec::with_capacity(numbers.len());
        for &n in &numbers {
            let segment_path = path.join(segment_name(n));
            let open_error = |e| io_error(format_args!("opening {}", segment_path.display()), e);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&segment_path)
                .map_err(open_error)?;
            let len = file.metadata().map_err(open_error)?.len();
            headers.push(read_header(&file, len).map_err(open_error)?);
            files.push(file);
        }
        let known = headers.iter().rev().find_map(|h| match h {
            Header::Keyed(key) => Some(*key),
            _ => None,
        });
        let key_known = known.is_some();
        let key = known.unwrap_or_else(rand::random);

        let mut state = State {
            dir: path.to_path_buf(),
            options,
            segments: BTreeMap::new(),
            active: 0,
            dirty_tail: false,
            messages: HashMap::new(),
            order: BTreeSet::new(),
            key,
            journal_writes: 0,
            active_since: (0, 0),
            unsynced: false,
            late_syncs: 0,
            chores_due: false,
            deletions_held: false,
            spare: None,
            spare_retry: None,
        };
        for ((&n, file), header) in numbers.iter().zip(files).zip(headers) {
            let segment_path = state.path(n);
            let checksum = match header {
                Header::Keyed(key) => Checksum::Keyed(key),
                Header::Plain => Checksum::Plain,
                Header::Torn => {
                    // Created, then a crash before its header was durable:
                    // nothing was ever written to it. Give it its header.
                    file.set_len(0)
                        .and_then(|()| file.write_all_at(&segment_header(&key), 0))
                        .and_then(|()| file.sync_data())
                        .map_err(|e| {
                            io_error(format_args!("writing {}", segment_path.display()), e)
                        })?;
                    Checksum::Keyed(key)
                }
                Header::Damaged if !key_known => {
                    return Err(SpoolError::Corrupt(format!(
                        "{} at offset 0: the segment header is damaged and no other segment \
                         holds the spool key; restore the file from a backup",
                        segment_path.display()
                    )));
                }
                Header::Damaged => {
                    tracing::error!(segment = %segment_path.display(),
                        "journal segment header damaged; reading it with the spool key");
                    Checksum::Keyed(key)
                }
            };
            state.segments.insert(n, Segment::new(file, checksum));
        }
        for (i, &n) in numbers.iter().enumerate() {
            state.replay(n, i + 1 == numbers.len())?;
        }
        match numbers.last() {
            Some(&last) if state.segments[&last].checksum == Checksum::Keyed(key) => {
                state.active = last;
            }
            last => {
                // A new spool, or one written before keyed checksums: new
                // frames go into a new keyed segment.
                if let Some(&last) = last {
                    state.cut_to_length(last)?;
                }
                let next = last.map_or(1, |n| n + 1);
                let segment = create_segment(path, next, &key)?;
                state.segments.insert(next, segment);
                state.active = next;
            }
        }
        state.active_since = (0, state.active_segment().len);
        tracing::info!(spool = %path.display(), messages = state.messages.len(),
            segments = state.segments.len(), "opened local spool");
        let bell = Arc::new(Doorbell::default());
        let inner = Arc::new(Inner {
            state: Mutex::new(state),
            commits: Mutex::new(Commits::default()),
            key,
            bell: bell.clone(),
            _lock: lock,
        });
        // What replay left to do is done before the spool is used, and the
        // thread starts with nothing to do.
        if let Err(error) = inner.do_chores() {
            tracing::warn!(%error, "journal housekeeping failed; trying again");
        }
        let weak = Arc::downgrade(&inner);
        let rings = bell.clone();
        let thread = std::thread::Builder::new()
            .name("spool-housekeeping".into())
            .spawn(move || keep_house(weak, rings, sync_period))
            .map_err(|e| io_error("starting the spool's housekeeping thread", e))?;
        let housekeeper = Arc::new(Housekeeper {
            bell,
            thread: Some(thread),
        });
        Ok(LocalSpool {
            _housekeeper: housekeeper,
            inner,
        })
    }

    /// Runs `f` on the blocking pool.
    async fn blocking<T, F>(&self, f: F) -> Result<T, SpoolError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, SpoolError> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| SpoolError::Unavailable(format!("spool task failed: {e}")))?
    }

    /// Stores `batch` and applies `changes` with one durable write. A
    /// change to an unknown message fails alone (it is listed); a failed
    /// write fails everything (`Err`). Answers with the stored records
    /// and the failed changes.
    ///
    /// Writes that arrive while one is being made durable go together
    /// into the next: the storers' batches of new messages and the Queue's batch of
    /// record changes share one fsync when they meet.
    async fn write(&self, batch: Vec<NewMessage>, changes: Vec<Change>) -> WriteResult {
        if batch.is_empty() && changes.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        let write = PendingWrite {
            batch,
            changes,
            reply,
        };
        if self.inner.enqueue(write) {
            let inner = self.inner.clone();
            // Detached: the commit answers every write it takes, also
            // when the caller that started it has gone away.
            tokio::task::spawn_blocking(move || inner.commit());
        }
        answer
            .await
            .map_err(|_| SpoolError::Unavailable("spool write task failed".into()))?
    }

    /// Applies one change to an existing message.
    async fn change(&self, change: Change) -> Result<(), SpoolError> {
        match self.write(Vec::new(), vec![change]).await?.1.pop() {
            Some((_, error)) => Err(error),
            None => Ok(()),
        }
    }
}

#[async_trait]
impl Spool for LocalSpool {
    async fn store(&self, batch: Vec<NewMessage>) -> Result<(), SpoolError> {
        self.write(batch, Vec::new()).await.map(|_| ())
    }

    /// The records the index keeps, not copies.
    async fn store_shared(
        &self,
        batch: Vec<NewMessage>,
    ) -> Result<Vec<Arc<MessageRecord>>, SpoolError> {
        Ok(self.write(batch, Vec::new()).await?.0)
    }

    async fn update(&self, record: MessageRecord) -> Result<(), SpoolError> {
        self.change(Change::Update(Arc::new(record))).await
    }

    async fn remove(&self, id: &MessageId) -> Result<(), SpoolError> {
        self.change(Change::Remove(id.clone())).await
    }

    /// Every change in one journal write: one fsync for the lot.
    async fn apply(&self, changes: Vec<Change>) -> Vec<(MessageId, SpoolError)> {
        let ids: Vec<MessageId> = changes.iter().map(|c| c.id().clone()).collect();
        match self.write(Vec::new(), changes).await {
            Ok((_, failed)) => failed,
            Err(error) => ids.into_iter().map(|id| (id, error.clone())).collect(),
        }
    }

    /// New messages and changes in one journal write: one fsync.
    async fn store_and_apply(
        &self,
        batch: Vec<NewMessage>,
        changes: Vec<Change>,
    ) -> Result<Vec<(MessageId, SpoolError)>, SpoolError> {
        Ok(self.write(batch, changes).await?.1)
    }

    async fn list(&self) -> Result<Vec<MessageRecord>, SpoolError> {
        self.blocking(|inner| {
            let state = inner.state()?;
            Ok(state.listed(Bound::Unbounded, usize::MAX, |r| (**r).clone()))
        })
        .await
    }

    /// The records the index holds, not copies: the schedule filled from
    /// them at start-up shares them.
    async fn list_shared(&self) -> Result<Vec<Arc<MessageRecord>>, SpoolError> {
        self.blocking(|inner| {
            let state = inner.state()?;
            Ok(state.listed(Bound::Unbounded, usize::MAX, Arc::clone))
        })
        .await
    }

    /// Walks the ordered index from the cursor: a page costs what it
    /// lists, whatever the length of the queue.
    async fn list_page(
        &self,
        after: Option<&ListCursor>,
        limit: usize,
    ) -> Result<(Vec<MessageRecord>, Option<ListCursor>), SpoolError> {
        let from = after.map_or(Bound::Unbounded, |a| Bound::Excluded(a.clone()));
        self.blocking(move |inner| {
            let state = inner.state()?;
            let records = state.listed(from, limit.saturating_add(1), |r| (**r).clone());
            Ok(page_of(records, limit))
        })
        .await
    }

    /// The files under `quarantine/` in the spool directory (frames that
    /// could not be read, named `<segment file>.<byte offset>.bad`), in
    /// name order, with their size and modification time.
    async fn quarantined(&self, limit: usize) -> Result<Vec<super::Quarantined>, SpoolError> {
        self.blocking(move |inner| {
            let dir = inner.state()?.dir.join(QUARANTINE_DIR);
            list_quarantine(&dir, limit)
        })
        .await
    }

    /// The local quarantine keeps damaged journal bytes, not records: a
    /// file listed there is not a message that can be taken back.
    async fn replay_quarantined(
        &self,
        location: &str,
    ) -> Result<Option<MessageRecord>, SpoolError> {
        let location = location.to_string();
        let listed = self
            .blocking(move |inner| {
                let dir = inner.state()?.dir.join(QUARANTINE_DIR);
                Ok(quarantine_file(&dir, &location).is_some_and(|path| path.exists()))
            })
            .await?;
        match listed {
            true => Err(SpoolError::Corrupt(
                "the local spool sets aside damaged journal bytes, whose messages were lost; \
                 there is no message to take back (the file stays for inspection, or delete it)"
                    .into(),
            )),
            false => Ok(None),
        }
    }

    async fn delete_quarantined(&self, location: &str) -> Result<bool, SpoolError> {
        let location = location.to_string();
        self.blocking(move |inner| {
            let dir = inner.state()?.dir.join(QUARANTINE_DIR);
            let Some(path) = quarantine_file(&dir, &location) else {
                return Ok(false);
            };
            match fs::remove_file(&path) {
                Ok(()) => {
                    sync_dir(&dir)?;
                    Ok(true)
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
                Err(e) => Err(io_error(format_args!("removing {}", path.display()), e)),
            }
        })
        .await
    }

    async fn read_body(&self, id: &MessageId) -> Result<Body, SpoolError> {
        let id = id.clone();
        self.blocking(move |inner| {
            let (file, checksum, loc, body_len) = {
                let state = inner.state()?;
                let live = state
                    .messages
                    .get(&id)
                    .ok_or_else(|| SpoolError::NotFound(id.clone()))?;
                let segment = &state.segments[&live.body.segment];
                (
                    segment.file.clone(),
                    segment.checksum,
                    live.body,
                    live.body_len,
                )
            };
            // The file handle stays readable even if compaction deletes
            // the segment meanwhile, and frames are never rewritten.
            if body_len > READ_WHOLE_UP_TO {
                read_large_body_at(&file, checksum, loc, body_len)
            } else {
                read_body_at(&file, checksum, loc, body_len).map(Body::from)
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::process::Command;

    use super::*;
    use crate::spool::suite::{self, id, message};

    fn options(segment_size: u64) -> LocalSpoolOptions {
        LocalSpoolOptions {
            segment_size,
            ..LocalSpoolOptions::default()
        }
    }

    fn open(dir: &Path, options: &LocalSpoolOptions) -> LocalSpool {
        LocalSpool::open(dir, options.clone()).expect("open the spool")
    }

    /// Waits, at most 10 s, until the housekeeping thread has brought
    /// `done` about.
    async fn eventually(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "not done in 10 s: {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Buffers larger than a call takes, more buffers than a call takes,
    /// empty ones and ones that cross a call's end all land in order.
    #[test]
    fn vectored_writes_are_cut_into_calls_and_land_whole() {
        let file = tempfile::tempfile().unwrap();
        let pattern = |len: usize, seed: u8| -> Vec<u8> {
            (0..len)
                .map(|i| (i as u8).wrapping_mul(31) ^ seed)
                .collect()
        };
        let mut buffers = vec![pattern(10, 1), pattern(MAX_WRITE * 5 / 2, 2), Vec::new()];
        buffers.extend((0..MAX_SLICES + 500).map(|i| pattern(100, i as u8)));
        buffers.extend([pattern(MAX_WRITE * 2 / 3, 3), pattern(MAX_WRITE * 2 / 3, 4)]);
        let mut slices: Vec<IoSlice<'_>> = buffers.iter().map(|b| IoSlice::new(b)).collect();
        let end = write_all_vectored_at(&file, &mut slices, 7).unwrap();
        let expected: Vec<u8> = buffers.concat();
        assert_eq!(end, 7 + expected.len() as u64);
        let mut written = vec![0u8; expected.len()];
        file.read_exact_at(&mut written, 7).unwrap();
        assert!(
            written == expected,
            "the bytes differ from what was written"
        );
    }

    fn deleting_files(dir: &Path) -> Vec<PathBuf> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_str().unwrap().ends_with(DELETING_SUFFIX))
            .collect()
    }

    fn segment_files(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_str().unwrap().ends_with(SEGMENT_SUFFIX))
            .collect();
        files.sort();
        files
    }

    /// The key in a keyed segment's header.
    fn key_of(segment: &Path) -> Key {
        let bytes = fs::read(segment).unwrap();
        assert_eq!(bytes[..8], SEGMENT_MAGIC);
        bytes[8..16].try_into().unwrap()
    }

    /// A frame as releases before keyed checksums wrote it.
    fn plain_frame(entry: &JournalEntry) -> Vec<u8> {
        let mut payload = Vec::new();
        envelope::encode_into(entry, &mut payload);
        let mut frame = (payload.len() as u32).to_le_bytes().to_vec();
        frame.extend(crc32fast::hash(&payload).to_le_bytes());
        frame.extend(payload);
        frame
    }

    fn new_message(n: u64) -> JournalEntry {
        let m = message(n, 500);
        JournalEntry::Message {
            record: m.record,
            body: m.body.into_head(),
        }
    }

    fn ids(records: &[MessageRecord]) -> Vec<MessageId> {
        records.iter().map(|r| r.id.clone()).collect()
    }

    /// Around every size at which bincode's length prefix grows.
    #[test]
    fn a_message_head_and_its_body_encode_as_the_whole_entry() {
        let record = message(1, 0).record;
        for len in [0, 1, 250, 251, 252, 65_535, 65_536, 65_537, 300_000] {
            let body = vec![b'x'; len];
            let whole = envelope::encode(&JournalEntry::Message {
                record: record.clone(),
                body: body.clone(),
            });
            let mut head = envelope::encode(&MessageHead::Message {
                record: &record,
                body_len: len as u64,
            });
            head.extend_from_slice(&body);
            assert!(head == whole, "a body of {len} bytes");
        }
    }

    /// Writes that arrive while the journal is busy go into the next
    /// journal write together, each answered with its own result.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_that_meet_share_one_journal_write() {
        async fn until(what: &str, done: impl Fn() -> bool) {
            for _ in 0..5000 {
                if done() {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            panic!("{what} within 5 s");
        }
        let dir = tempfile::tempdir().unwrap();
        let spool = open(dir.path(), &options(64 << 20));
        spool.store(vec![message(1, 500)]).await.unwrap();
        let writes = |spool: &LocalSpool| spool.inner.state().unwrap().journal_writes;
        let before = writes(&spool);
        // The journal is busy: the first write waits for it, the next two
        // queue behind.
        let (release, released) = std::sync::mpsc::channel::<()>();
        let (locked, is_locked) = std::sync::mpsc::channel();
        let busy = std::thread::spawn({
            let inner = spool.inner.clone();
            move || {
                let _state = inner.state.lock().unwrap();
                locked.send(()).unwrap();
                let _ = released.recv();
            }
        });
        is_locked.recv().unwrap();
        let first = tokio::spawn({
            let spool = spool.clone();
            async move { spool.store(vec![message(2, 500)]).await }
        });
        until("the first write is taken", || {
            let commits = spool.inner.commits();
            commits.running && commits.pending.is_empty()
        })
        .await;
        let second = tokio::spawn({
            let spool = spool.clone();
            async move { spool.store(vec![message(3, 500)]).await }
        });
        let third = tokio::spawn({
            let spool = spool.clone();
            async move {
                spool
                    .apply(vec![Change::Remove(id(1)), Change::Remove(id(9))])
                    .await
            }
        });
        until("two writes queue", || {
            spool.inner.commits().pending.len() == 2
        })
        .await;
        release.send(()).unwrap();
        busy.join().unwrap();
        first.await.unwrap().unwrap();
        second.await.unwrap().unwrap();
        let failed = third.await.unwrap();
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert_eq!(failed[0].0, id(9));
        assert_eq!(
            writes(&spool) - before,
            2,
            "the first alone, then the other two"
        );
        drop(spool);
        let spool = open(dir.path(), &options(64 << 20));
        assert_eq!(ids(&spool.list().await.unwrap()), [id(2), id(3)]);
    }

    /// A write of removals alone gets no fsync of its own: the next write
    /// that syncs covers it, and so does the start of a new segment or,
    /// when nothing else comes, the housekeeping thread within about a second.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn removals_alone_wait_for_the_next_fsync() {
        let dir = tempfile::tempdir().unwrap();
        // The thread syncs only when the test has made its checks.
        let options = LocalSpoolOptions {
            removals_synced_within: std::time::Duration::from_secs(5),
            ..options(64 << 10)
        };
        let spool = open(dir.path(), &options);
        let state = |spool: &LocalSpool| {
            let state = spool.inner.state().unwrap();
            (state.journal_writes, state.unsynced, state.late_syncs)
        };
        spool
            .store(vec![message(1, 100), message(2, 100), message(3, 100)])
            .await
            .unwrap();
        assert_eq!(state(&spool), (1, false, 0));
        // A removal: written, not synced.
        spool.remove(&id(1)).await.unwrap();
        assert_eq!(state(&spool), (1, true, 0));
        // A store syncs it along with itself.
        spool.store(vec![message(4, 100)]).await.unwrap();
        assert_eq!(state(&spool), (2, false, 0));
        // An update is synced like a store.
        spool.remove(&id(2)).await.unwrap();
        let mut record = message(3, 100).record;
        record.deliveries[0].attempts = 1;
        spool.update(record).await.unwrap();
        assert_eq!(state(&spool), (3, false, 0));
        // A removal left alone is synced by the thread.
        spool.remove(&id(3)).await.unwrap();
        assert_eq!(state(&spool), (3, true, 0));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while state(&spool).1 {
            assert!(std::time::Instant::now() < deadline, "never synced");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(state(&spool), (3, false, 1));
        // Before a new segment starts, the old one's removals are synced
        // (the state stays locked, so the thread cannot do it).
        spool.remove(&id(4)).await.unwrap();
        {
            let mut state = spool.inner.state().unwrap();
            assert!(state.unsynced);
            let active = state.active;
            assert!(state.rotate_if_full(100 << 10).unwrap());
            assert_ne!(state.active, active);
            assert_eq!((state.unsynced, state.late_syncs), (false, 2));
        }
        spool.store(vec![message(5, 100)]).await.unwrap();
        drop(spool);
        let spool = open(dir.path(), &options);
        assert_eq!(ids(&spool.list().await.unwrap()), [id(5)]);
    }

    /// A torn write of a spilled body is cut off at the next open like
    /// any other, and the messages written before it stay.
    /// Bodies go to the journal from their own buffers: the frame buffer
    /// holds only what comes before each. A write of more buffers than one
    /// `pwritev` takes, with bodies on disk and empty ones among them,
    /// reads back whole, before and after a reopen.
    #[tokio::test]
    async fn bodies_are_written_from_where_they_are() {
        let key = [7u8; 8];
        let mut frames = Frames::default();
        frames.push_message(message(1, 100_000), &key).unwrap();
        assert!(
            frames.buf.len() < 1_000,
            "{} bytes copied",
            frames.buf.len()
        );
        assert_eq!(frames.messages[0].2, frames.len());

        let dir = tempfile::tempdir().unwrap();
        let spool = open(dir.path(), &options(64 << 20));
        let batch: Vec<NewMessage> = (0..1_500u64)
            .map(|n| match n % 500 {
                7 => suite::spilled(n, 2 * super::super::BODY_CHUNK + 3),
                8 => NewMessage {
                    body: Vec::new().into(),
                    ..message(n, 0)
                },
                _ => message(n, 40 + (n as usize * 13) % 3_000),
            })
            .collect();
        let expected: Vec<Vec<u8>> = batch.iter().map(|m| m.body.to_vec().unwrap()).collect();
        spool.store(batch).await.unwrap();
        async fn reads_back(spool: &LocalSpool, expected: &[Vec<u8>]) {
            for (n, body) in expected.iter().enumerate() {
                let read = spool.read_body(&id(n as u64)).await.unwrap();
                assert!(read == *body, "message {n}");
            }
        }
        reads_back(&spool, &expected).await;
        drop(spool);
        reads_back(&open(dir.path(), &options(64 << 20)), &expected).await;
    }

    #[tokio::test]
    async fn a_torn_spilled_body_is_cut_off_whole() {
        let dir = tempfile::tempdir().unwrap();
        let spool = open(dir.path(), &options(64 << 20));
        spool.store(vec![message(1, 500)]).await.unwrap();
        spool
            .store(vec![suite::spilled(2, 3 * super::super::BODY_CHUNK)])
            .await
            .unwrap();
        drop(spool);
        let segment = segment_files(dir.path()).pop().unwrap();
        let len = fs::metadata(&segment).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&segment)
            .unwrap()
            .set_len(len - 1000)
            .unwrap();
        let spool = open(dir.path(), &options(64 << 20));
        assert_eq!(ids(&spool.list().await.unwrap()), vec![id(1)]);
        assert_eq!(spool.read_body(&id(1)).await.unwrap(), message(1, 500).body);
    }

    /// A set-aside frame holds no message to take back; it can be
    /// deleted, by the name listed or the file's own, and nothing outside
    /// the quarantine directory can be named.
    #[tokio::test]
    async fn set_aside_frames_are_deleted_not_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let spool = open(dir.path(), &LocalSpoolOptions::default());
        let quarantine = dir.path().join(QUARANTINE_DIR);
        fs::create_dir_all(&quarantine).unwrap();
        for name in [
            "00000000000000000001.journal.64.bad",
            "00000000000000000002.journal.8.bad",
        ] {
            fs::write(quarantine.join(name), [0u8; 16]).unwrap();
        }
        fs::write(dir.path().join("outside.bad"), b"not to be touched").unwrap();
        let listed = "quarantine/00000000000000000001.journal.64.bad";
        let err = spool.replay_quarantined(listed).await.unwrap_err();
        assert!(
            matches!(&err, SpoolError::Corrupt(why) if why.contains("no message")),
            "{err}"
        );
        assert!(spool
            .replay_quarantined("nothing.bad")
            .await
            .unwrap()
            .is_none());

        assert!(spool.delete_quarantined(listed).await.unwrap());
        assert!(!spool.delete_quarantined(listed).await.unwrap(), "gone");
        assert!(spool
            .delete_quarantined("00000000000000000002.journal.8.bad")
            .await
            .unwrap());
        for name in [
            "../outside.bad",
            "quarantine/../outside.bad",
            ".bad",
            "notes.txt",
        ] {
            assert!(!spool.delete_quarantined(name).await.unwrap(), "{name}");
        }
        assert!(dir.path().join("outside.bad").exists());
        assert!(spool.quarantined(10).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn set_aside_frames_are_listed_in_name_order() {
        let dir = tempfile::tempdir().unwrap();
        let spool = open(dir.path(), &LocalSpoolOptions::default());
        assert!(
            spool.quarantined(10).await.unwrap().is_empty(),
            "no directory yet"
        );
        let quarantine = dir.path().join(QUARANTINE_DIR);
        fs::create_dir_all(&quarantine).unwrap();
        fs::write(
            quarantine.join("00000000000000000002.journal.64.bad"),
            [0u8; 24],
        )
        .unwrap();
        fs::write(
            quarantine.join("00000000000000000001.journal.4096.bad"),
            [1u8; 8],
        )
        .unwrap();
        fs::write(quarantine.join("notes.txt"), b"not a frame").unwrap();
        let listed = spool.quarantined(10).await.unwrap();
        let names: Vec<_> = listed.iter().map(|q| q.location.as_str()).collect();
        assert_eq!(
            names,
            [
                "quarantine/00000000000000000001.journal.4096.bad",
                "quarantine/00000000000000000002.journal.64.bad"
            ]
        );
        assert_eq!((listed[0].bytes, listed[1].bytes), (8, 24));
        assert!(listed.iter().all(|q| q.at_ms > 0));
        assert_eq!(spool.quarantined(1).await.unwrap(), listed[..1]);
    }

    /// A page of a listing costs what it lists, not the length of the
    /// queue: 200 pages of 100 from the middle of 50 000 messages. A
    /// listing that copies and sorts every record for each page (tenths
    /// of a second each in a debug build) blows the budget long before
    /// the end, so the test stops there.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_listing_page_does_not_walk_the_whole_queue() {
        const MESSAGES: u64 = 50_000;
        const PAGE: u64 = 100;
        let budget = std::time::Duration::from_secs(5);
        let dir = tempfile::tempdir().unwrap();
        let spool = open(dir.path(), &LocalSpoolOptions::default());
        for start in (0..MESSAGES).step_by(5_000) {
            let batch = (start..start + 5_000).map(|n| message(n, 10)).collect();
            spool.store(batch).await.unwrap();
        }
        let from = MESSAGES / 2;
        let mut cursor = ListCursor::of(&message(from, 10).record);
        let started = std::time::Instant::now();
        for page in 0..200 {
            let (records, next) = spool.list_page(Some(&cursor), PAGE as usize).await.unwrap();
            let first = from + 1 + page * PAGE;
            assert_eq!(
                ids(&records),
                (first..first + PAGE).map(id).collect::<Vec<_>>()
            );
            cursor = next.expect("more pages");
            assert!(
                started.elapsed() < budget,
                "only {page} pages in {budget:?}"
            );
        }
    }

    async fn suite_on(options: LocalSpoolOptions) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool");
        suite::run(|| {
            let path = path.clone();
            let options = options.clone();
            async move { Arc::new(LocalSpool::open(&path, options).expect("open")) as Arc<dyn Spool> }
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn passes_the_spool_suite() {
        suite_on(LocalSpoolOptions::default()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn passes_the_spool_suite_with_tiny_segments() {
        // Rotation, compaction and deletion happen all the time here.
        suite_on(LocalSpoolOptions {
            segment_size: 16 * 1024,
            compact_below: 0.5,
            compact_after: Duration::ZERO,
            ..LocalSpoolOptions::default()
        })
        .await;
    }

    /// Writers at once on tiny segments, each storing, updating and
    /// removing its own messages in a seeded random order, while the
    /// housekeeping thread compacts and deletes behind them: the spool
    /// then holds exactly what was stored and not removed, with the latest
    /// records and the right bodies, and so does it after a reopen.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_writers_and_housekeeping_keep_exactly_the_live_messages() {
        use rand::{Rng, SeedableRng};

        const WRITERS: u64 = 8;
        const STEPS: u64 = 150;
        let dir = tempfile::tempdir().unwrap();
        let opts = LocalSpoolOptions {
            segment_size: 16 * 1024,
            compact_below: 0.6,
            compact_after: Duration::ZERO,
            removals_synced_within: Duration::from_millis(5),
            ..LocalSpoolOptions::default()
        };
        let spool = open(dir.path(), &opts);
        let mut writers = Vec::new();
        for writer in 0..WRITERS {
            let spool = spool.clone();
            writers.push(tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed + writer);
                // What this writer expects: message number → attempts.
                let mut live: BTreeMap<u64, u32> = BTreeMap::new();
                for step in 0..STEPS {
                    let n = writer * 10_000 + step;
                    let size = rng.random_range(100..3000);
                    spool.store(vec![message(n, size)]).await.unwrap();
                    live.insert(n, 0);
                    let pick = *live.keys().nth(rng.random_range(0..live.len())).unwrap();
                    match rng.random_range(0..3) {
                        0 => {
                            spool.remove(&id(pick)).await.unwrap();
                            live.remove(&pick);
                        }
                        1 => {
                            let record = spool
                                .list()
                                .await
                                .unwrap()
                                .into_iter()
                                .find(|r| r.id == id(pick))
                                .unwrap();
                            let mut record = record;
                            record.deliveries[0].attempts += 1;
                            spool.update(record).await.unwrap();
                            *live.get_mut(&pick).unwrap() += 1;
                        }
                        _ => {}
                    }
                }
                live
            }));
        }
        let mut expected: BTreeMap<u64, u32> = BTreeMap::new();
        for writer in writers {
            expected.extend(writer.await.unwrap());
        }
        let check = |records: Vec<MessageRecord>| {
            let found: BTreeMap<u64, u32> = records
                .iter()
                .map(|r| {
                    let n = expected
                        .keys()
                        .find(|&&n| id(n) == r.id)
                        .unwrap_or_else(|| panic!("{} was removed or never stored", r.id));
                    (*n, r.deliveries[0].attempts)
                })
                .collect();
            assert_eq!(found, expected);
        };
        check(spool.list().await.unwrap());
        drop(spool);
        let spool = open(dir.path(), &opts);
        check(spool.list().await.unwrap());
        for &n in expected.keys() {
            let body = spool.read_body(&id(n)).await.unwrap();
            assert_eq!(body.to_vec().unwrap(), message(n, body.len() as usize).body);
        }
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_off_on_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let opts = options(1 << 20);
        let spool = open(dir.path(), &opts);
        for n in 0..3 {
            spool.store(vec![message(n, 500)]).await.unwrap();
        }
        drop(spool);
        let segment = segment_files(dir.path()).pop().unwrap();
        let good_len = fs::metadata(&segment).unwrap().len();

        // A crash in the middle of writing a fourth entry.
        let mut frame = Vec::new();
        let m = message(3, 500);
        push_frame(
            &mut frame,
            &JournalEntry::Message {
                record: m.record,
                body: m.body.into_head(),
            },
            &key_of(&segment),
        )
        .unwrap();
        let mut file = OpenOptions::new().append(true).open(&segment).unwrap();
        file.write_all(&frame[..frame.len() / 2]).unwrap();
        drop(file);

        let spool = open(dir.path(), &opts);
        assert_eq!(ids(&spool.list().await.unwrap()), vec![id(0), id(1), id(2)]);
        assert_eq!(fs::metadata(&segment).unwrap().len(), good_len);
        spool.store(vec![message(4, 500)]).await.unwrap();
        drop(spool);

        // Garbage shorter than a header is a torn tail too.
        let mut file = OpenOptions::new().append(true).open(&segment).unwrap();
        file.write_all(&[0xff; 5]).unwrap();
        drop(file);
        let spool = open(dir.path(), &opts);
        assert_eq!(
            ids(&spool.list().await.unwrap()),
            vec![id(0), id(1), id(2), id(4)]
        );
        assert_eq!(spool.read_body(&id(4)).await.unwrap(), message(4, 500).body);
    }

    /// A report (new message) stored with changes to other messages, as
    /// the Queue writes them.
    async fn store_report_with(spool: &LocalSpool, report: u64, changes: Vec<Change>) {
        let failed = spool
            .store_and_apply(vec![message(report, 500)], changes)
            .await
            .unwrap();
        assert!(failed.is_empty(), "{failed:?}");
    }

    #[tokio::test]
    async fn new_messages_written_with_changes_replay_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        // Small segments: the combined writes start new ones.
        let opts = options(1500);
        let spool = open(dir.path(), &opts);
        for n in 0..3 {
            spool.store(vec![message(n, 500)]).await.unwrap();
        }
        let mut updated = message(1, 500).record;
        updated.deliveries.truncate(1);
        let failed = spool
            .store_and_apply(
                vec![message(10, 500), message(11, 500)],
                vec![
                    Change::Update(Arc::new(updated.clone())),
                    Change::Remove(id(2)),
                    Change::Remove(id(99)),
                ],
            )
            .await
            .unwrap();
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].0, id(99));
        store_report_with(&spool, 12, vec![Change::Remove(id(0))]).await;
        assert!(segment_files(dir.path()).len() > 1, "rotated");
        drop(spool);

        let spool = open(dir.path(), &opts);
        assert_eq!(
            ids(&spool.list().await.unwrap()),
            vec![id(1), id(10), id(11), id(12)]
        );
        let listed = spool.list().await.unwrap();
        assert_eq!(listed[0], updated);
        for n in [1, 10, 11, 12] {
            assert_eq!(spool.read_body(&id(n)).await.unwrap(), message(n, 500).body);
        }
    }

    #[tokio::test]
    async fn a_torn_write_of_a_report_with_its_change_keeps_neither() {
        let dir = tempfile::tempdir().unwrap();
        let opts = options(1 << 20);
        for cut in [3u64, 40, 600] {
            let spool = open(dir.path(), &opts);
            spool.store(vec![message(0, 500)]).await.unwrap();
            let segment = segment_files(dir.path()).pop().unwrap();
            let before = fs::metadata(&segment).unwrap().len();
            store_report_with(&spool, 10, vec![Change::Remove(id(0))]).await;
            drop(spool);

            // A crash while the write was under way kept only its start.
            let len = fs::metadata(&segment).unwrap().len();
            let file = OpenOptions::new().write(true).open(&segment).unwrap();
            file.set_len(len - cut).unwrap();
            drop(file);

            // The record change is lost, so the report must be too: else
            // the recipient is tried again and reported a second time.
            let spool = open(dir.path(), &opts);
            assert_eq!(ids(&spool.list().await.unwrap()), vec![id(0)], "cut {cut}");
            assert_eq!(fs::metadata(&segment).unwrap().len(), before, "cut {cut}");
            spool.store(vec![message(1, 500)]).await.unwrap();
            drop(spool);
            let spool = open(dir.path(), &opts);
            assert_holds(&spool, &[0, 1]).await;
            spool.remove(&id(0)).await.unwrap();
            spool.remove(&id(1)).await.unwrap();
        }
    }

    #[tokio::test]
    async fn damage_inside_a_write_of_a_report_with_its_change_costs_only_the_entry_hit() {
        let dir = tempfile::tempdir().unwrap();
        let opts = options(1 << 20);
        let spool = open(dir.path(), &opts);
        spool.store(vec![message(0, 500)]).await.unwrap();
        let segment = segment_files(dir.path()).pop().unwrap();
        let before = fs::metadata(&segment).unwrap().len();
        let mut updated = message(0, 500).record;
        updated.deliveries.truncate(1);
        store_report_with(&spool, 10, vec![Change::Update(Arc::new(updated.clone()))]).await;
        spool.store(vec![message(1, 500)]).await.unwrap();
        drop(spool);

        // A bad byte in the report's body, acknowledged mail after it.
        let file = OpenOptions::new().write(true).open(&segment).unwrap();
        file.write_all_at(b"#", before + 300).unwrap();
        drop(file);

        let spool = open(dir.path(), &opts);
        assert_holds(&spool, &[0, 1]).await;
        assert_eq!(spool.list().await.unwrap()[0], updated);
        assert_eq!(spool.quarantined(10).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_checksum_mismatch_at_the_tail_drops_only_that_entry() {
        let dir = tempfile::tempdir().unwrap();
        let opts = options(1 << 20);
        let spool = open(dir.path(), &opts);
        spool.store(vec![message(0, 500)]).await.unwrap();
        spool.store(vec![message(1, 500)]).await.unwrap();
        drop(spool);
        let segment = segment_files(dir.path()).pop().unwrap();
        let len = fs::metadata(&segment).unwrap().len();
        let file = OpenOptions::new().write(true).open(&segment).unwrap();
        file.write_all_at(b"X", len - 1).unwrap();
        drop(file);

        let spool = open(dir.path(), &opts);
        assert_eq!(ids(&spool.list().await.unwrap()), vec![id(0)]);
    }

    /// Where each entry of a spool of `count` single-message stores ends:
    /// the segment's length before the first store, then after each.
    async fn store_one_by_one(spool: &LocalSpool, segment: &Path, count: u64) -> Vec<u64> {
        let mut ends = vec![fs::metadata(segment).unwrap().len()];
        for n in 0..count {
            spool.store(vec![message(n, 500)]).await.unwrap();
            ends.push(fs::metadata(segment).unwrap().len());
        }
        ends
    }

    fn quarantined(dir: &Path, segment: &Path, offset: u64) -> Vec<u8> {
        let name = segment.file_name().unwrap().to_str().unwrap();
        let path = dir.join("quarantine").join(format!("{name}.{offset}.bad"));
        fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    async fn assert_holds(spool: &LocalSpool, numbers: &[u64]) {
        let expected: Vec<MessageId> = numbers.iter().copied().map(id).collect();
        assert_eq!(ids(&spool.list().await.unwrap()), expected);
        for &n in numbers {
            assert_eq!(spool.read_body(&id(n)).await.unwrap(), message(n, 500).body);
        }
    }

    /// A tail of zeros (a power loss after the file grew but before its
    /// blocks were written, or a segment made ahead of use) is where the
    /// next write goes: not damage, and not cut off.
    #[tokio::test]
    async fn a_zero_filled_tail_takes_the_next_write() {
        let dir = tempfile::tempdir().unwrap();
        let opts = options(1 << 20);
        let spool = open(dir.path(), &opts);
        let segment = segment_files(dir.path()).pop().unwrap();
        let ends = store_one_by_one(&spool, &segment, 3).await;
        drop(spool);

        let mut file = OpenOptions::new().append(true).open(&segment).unwrap();
        file.write_all(&[0u8; 4096]).unwrap();
        drop(file);
        let size = ends[3] + 4096;

        let spool = open(dir.path(), &opts);
        assert_holds(&spool, &[0, 1, 2]).await;
        assert!(
            !dir.path().join("quarantine").exists(),
            "a zero tail is not damage"
        );
        spool.store(vec![message(3, 500)]).await.unwrap();
        assert_eq!(fs::metadata(&segment).unwrap().len(), size);
        drop(spool);
        assert_holds(&open(dir.path(), &opts), &[0, 1, 2, 3]).await;
    }

    /// The length of the active segment's frames.
    fn active_len(spool: &LocalSpool) -> u64 {
        let state = spool.inner.state().unwrap();
        state.segments[&state.active].len
    }

    fn ahead_options() -> LocalSpoolOptions {
        LocalSpoolOptions {
            segment_size: 16 * 1024,
            removals_synced_within: Duration::from_millis(10),
            compact_after: Duration::from_secs(3600),
            ..LocalSpoolOptions::default()
        }
    }

    /// Stores messages from `*n` on until `done`.
    async fn store_until(spool: &LocalSpool, n: &mut u64, done: impl Fn() -> bool) {
        while !done() {
            spool.store(vec![message(*n, 500)]).await.unwrap();
            *n += 1;
        }
    }

    /// Fills the first segment past half, waits for the spare, and
    /// stores into the segment made from it: answers that segment.
    async fn into_a_segment_made_ahead(dir: &Path, spool: &LocalSpool, n: &mut u64) -> PathBuf {
        let spare = dir.join(SPARE_FILE);
        store_until(spool, n, || active_len(spool) >= 8 * 1024).await;
        eventually("the spare is made", || spare.exists()).await;
        assert_eq!(fs::metadata(&spare).unwrap().len(), 16 * 1024);
        store_until(spool, n, || segment_files(dir).len() == 2).await;
        assert!(!spare.exists(), "the spare became the segment");
        segment_files(dir)[1].clone()
    }

    /// Once the active segment is half full, the next one is made ahead
    /// (zeros, a segment long); writes into it never make the file
    /// longer; the rotation after it cuts it to its frames; a reopen
    /// reads every message back, removes the spare and writes on into the
    /// zeros.
    #[tokio::test]
    async fn segments_made_ahead_take_writes_without_growing() {
        let dir = tempfile::tempdir().unwrap();
        let opts = ahead_options();
        let spool = open(dir.path(), &opts);
        let mut n = 0;
        let second = into_a_segment_made_ahead(dir.path(), &spool, &mut n).await;
        store_until(&spool, &mut n, || active_len(&spool) >= 4 * 1024).await;
        assert_eq!(fs::metadata(&second).unwrap().len(), 16 * 1024);

        // Past half again: the next spare, and the rotation to it.
        store_until(&spool, &mut n, || active_len(&spool) >= 8 * 1024).await;
        eventually("the spare is made", || dir.path().join(SPARE_FILE).exists()).await;
        store_until(&spool, &mut n, || segment_files(dir.path()).len() == 3).await;
        let second_len = spool.inner.state().unwrap().segments[&2].len;
        assert!(second_len < 16 * 1024);
        assert_eq!(fs::metadata(&second).unwrap().len(), second_len);
        let third = segment_files(dir.path())[2].clone();
        assert_eq!(fs::metadata(&third).unwrap().len(), 16 * 1024);
        let third_len = active_len(&spool);
        drop(spool);

        let spool = open(dir.path(), &opts);
        assert_holds(&spool, &(0..n).collect::<Vec<_>>()).await;
        assert!(!dir.path().join("quarantine").exists());
        assert!(!dir.path().join(SPARE_FILE).exists());
        assert_eq!(active_len(&spool), third_len);
        spool.store(vec![message(n, 500)]).await.unwrap();
        assert_eq!(fs::metadata(&third).unwrap().len(), 16 * 1024);
        drop(spool);
        assert_holds(&open(dir.path(), &opts), &(0..=n).collect::<Vec<_>>()).await;
    }

    /// A write torn by a crash inside a segment made ahead (its bytes,
    /// then the zeros after them) is a torn tail: cut off, the messages
    /// before it kept.
    #[tokio::test]
    async fn a_torn_write_into_zeros_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let opts = ahead_options();
        let spool = open(dir.path(), &opts);
        let mut n = 0;
        let segment = into_a_segment_made_ahead(dir.path(), &spool, &mut n).await;
        let end = active_len(&spool);
        drop(spool);

        // A frame header that promises 300 bytes, and half of them.
        let file = OpenOptions::new().write(true).open(&segment).unwrap();
        let mut torn = 300u32.to_le_bytes().to_vec();
        torn.extend([0xab; 154]);
        file.write_all_at(&torn, end).unwrap();
        drop(file);

        let spool = open(dir.path(), &opts);
        assert_holds(&spool, &(0..n).collect::<Vec<_>>()).await;
        assert!(
            !dir.path().join("quarantine").exists(),
            "a torn tail is not damage"
        );
        assert_eq!(active_len(&spool), end);
        spool.store(vec![message(n, 500)]).await.unwrap();
        drop(spool);
        assert_holds(&open(dir.path(), &opts), &(0..=n).collect::<Vec<_>>()).await;
    }

    /// A spare left by the process before (whole, or cut short by a crash
    /// while its zeros were written) is removed at open and never read.
    #[tokio::test]
    async fn a_leftover_spare_is_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let opts = ahead_options();
        let spool = open(dir.path(), &opts);
        spool.store(vec![message(0, 500)]).await.unwrap();
        drop(spool);
        fs::write(dir.path().join(SPARE_FILE), vec![0u8; 16 * 1024]).unwrap();
        fs::write(dir.path().join(SPARE_PARTIAL), vec![0u8; 1000]).unwrap();
        let spool = open(dir.path(), &opts);
        assert!(!dir.path().join(SPARE_FILE).exists());
        assert!(!dir.path().join(SPARE_PARTIAL).exists());
        assert_holds(&spool, &[0]).await;
        assert_eq!(segment_files(dir.path()).len(), 1);
    }

    /// Writes of large messages (more than [`ZERO_AHEAD_UP_TO`] per fsync)
    /// get no spare: there the zeros cost more than they save.
    #[tokio::test]
    async fn large_writes_get_no_spare() {
        let dir = tempfile::tempdir().unwrap();
        let opts = LocalSpoolOptions {
            segment_size: 1 << 20,
            ..ahead_options()
        };
        let spool = open(dir.path(), &opts);
        for n in 0..3 {
            spool.store(vec![message(n, 200 * 1024)]).await.unwrap();
        }
        assert!(active_len(&spool) >= 512 * 1024);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!dir.path().join(SPARE_FILE).exists());
        assert!(!dir.path().join(SPARE_PARTIAL).exists());
    }

    /// A spare that cannot be made (here its file cannot be created)
    /// leaves the next segment to be made as before.
    #[tokio::test]
    async fn without_a_spare_the_next_segment_is_made_as_before() {
        let dir = tempfile::tempdir().unwrap();
        let opts = ahead_options();
        let spool = open(dir.path(), &opts);
        let blocker = dir.path().join(SPARE_PARTIAL);
        fs::create_dir(&blocker).unwrap();
        let mut n = 0;
        store_until(&spool, &mut n, || active_len(&spool) >= 8 * 1024).await;
        eventually("a try failed", || {
            spool.inner.state().unwrap().spare_retry.is_some()
        })
        .await;
        store_until(&spool, &mut n, || segment_files(dir.path()).len() == 2).await;
        let second = segment_files(dir.path())[1].clone();
        assert_eq!(fs::metadata(&second).unwrap().len(), active_len(&spool));
        drop(spool);
        fs::remove_dir(&blocker).unwrap();
        assert_holds(&open(dir.path(), &opts), &(0..n).collect::<Vec<_>>()).await;
    }

    /// Opens a spool of 40 messages after `damage` changed its segment,
    /// and checks that exactly `lost` are gone and that the bytes from the
    /// start of the first lost one to the end of the last are quarantined.
    async fn reopen_after_damage(damage: impl Fn(&File, &[u64]), lost: std::ops::Range<u64>) {
        let dir = tempfile::tempdir().unwrap();
        let opts = options(1 << 20);
        let spool = open(dir.path(), &opts);
        let segment = segment_files(dir.path()).pop().unwrap();
        let ends = store_one_by_one(&spool, &segment, 40).await;
        drop(spool);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&segment)
            .unwrap();
        damage(&file, &ends);
        drop(file);
        let (from, to) = (ends[lost.start as usize], ends[lost.end as usize]);
        let damaged = fs::read(&segment).unwrap()[from as usize..to as usize].to_vec();

        let spool = open(dir.path(), &opts);
        let mut kept: Vec<u64> = (0..40).filter(|n| !lost.contains(n)).collect();
        assert_holds(&spool, &kept).await;
        assert_eq!(quarantined(dir.path(), &segment, from), damaged);

        // The spool goes on, and opens the same way again.
        spool.store(vec![message(40, 500)]).await.unwrap();
        drop(spool);
        kept.push(40);
        assert_holds(&open(dir.path(), &opts), &kept).await;
    }

    #[tokio::test]
    async fn a_damaged_entry_amid_acknowledged_mail_is_quarantined_and_the_rest_kept() {
        // A flipped byte inside message 20's entry.
        reopen_after_damage(
            |file, ends| {
                let at = ends[20] + 100;
                let mut byte = [0u8];
                file.read_exact_at(&mut byte, at).unwrap();
                file.write_all_at(&[byte[0] ^ 0x55], at).unwrap();
            },
            20..21,
        )
        .await;
    }

    #[tokio::test]
    async fn a_damaged_entry_length_is_skipped_by_finding_the_next_entry() {
        // Message 20's length field says more than the file holds.
        reopen_after_damage(
            |file, ends| {
                file.write_all_at(&0xfff0_0000u32.to_le_bytes(), ends[20])
                    .unwrap()
            },
            20..21,
        )
        .await;
    }

    #[tokio::test]
    async fn a_zeroed_block_amid_acknowledged_mail_is_quarantined_and_the_rest_kept() {
        // Zeroes from the start of message 20 into the middle of 22.
        reopen_after_damage(
            |file, ends| {
                let len = (ends[22] + 100 - ends[20]) as usize;
                file.write_all_at(&vec![0u8; len], ends[20]).unwrap();
            },
            20..23,
        )
        .await;
    }

    /// Stores messages 0 to 5 of 1500 bytes one by one in segments of
    /// `opts` (4096 bytes: several segments); returns the segment files.
    async fn six_in_several_segments(dir: &Path, opts: &LocalSpoolOptions) -> Vec<PathBuf> {
        let spool = open(dir, opts);
        for n in 0..6 {
            spool.store(vec![message(n, 1500)]).await.unwrap();
        }
        drop(spool);
        let files = segment_files(dir);
        assert!(files.len() >= 3, "expected several segments, got {files:?}");
        files
    }

    #[tokio::test]
    async fn damage_in_an_older_segment_is_quarantined_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let opts = options(4096);
        let files = six_in_several_segments(dir.path(), &opts).await;
        let file = OpenOptions::new().write(true).open(&files[0]).unwrap();
        file.write_all_at(b"X", 100).unwrap();
        drop(file);

        let spool = open(dir.path(), &opts);
        let expected: Vec<MessageId> = (1..6).map(id).collect();
        assert_eq!(ids(&spool.list().await.unwrap()), expected);
        for n in 1..6 {
            assert_eq!(
                spool.read_body(&id(n)).await.unwrap(),
                message(n, 1500).body
            );
        }
        let kept: Vec<PathBuf> = fs::read_dir(dir.path().join("quarantine"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(kept.len(), 1, "{kept:?}");
        let name = kept[0].file_name().unwrap().to_str().unwrap();
        let first = files[0].file_name().unwrap().to_str().unwrap();
        let offset: u64 = name
            .strip_prefix(&format!("{first}."))
            .and_then(|rest| rest.strip_suffix(".bad"))
            .and_then(|offset| offset.parse().ok())
            .unwrap_or_else(|| panic!("unexpected quarantine file {name}"));
        let bytes = fs::read(&kept[0]).unwrap();
        assert!(offset <= 100 && 100 < offset + bytes.len() as u64);
        assert_eq!(bytes[(100 - offset) as usize], b'X');
    }

    #[tokio::test]
    async fn frames_inside_a_message_body_are_never_taken_for_entries() {
        // Message 20's body holds what look like journal entries: a removal
        // of message 5 and a new message 99, framed with the plain checksum
        // and with a guessed key. Its own length field is then damaged, so
        // the search for the next entry runs across that body.
        let dir = tempfile::tempdir().unwrap();
        let opts = options(1 << 20);
        let spool = open(dir.path(), &opts);
        let segment = segment_files(dir.path()).pop().unwrap();
        let ends = store_one_by_one(&spool, &segment, 20).await;
        let mut forged = plain_frame(&JournalEntry::Remove { id: id(5) });
        forged.extend(plain_frame(&new_message(99)));
        push_frame(&mut forged, &JournalEntry::Remove { id: id(5) }, &[0; 8]).unwrap();
        push_frame(&mut forged, &new_message(99), &[0; 8]).unwrap();
        let mut carrier = message(20, 500);
        let mut body = carrier.body.into_head();
        body.extend(&forged);
        carrier.body = body.into();
        spool.store(vec![carrier]).await.unwrap();
        let carrier_at = *ends.last().unwrap();
        for n in 21..25 {
            spool.store(vec![message(n, 500)]).await.unwrap();
        }
        drop(spool);
        let file = OpenOptions::new().write(true).open(&segment).unwrap();
        file.write_all_at(&u32::MAX.to_le_bytes(), carrier_at)
            .unwrap();
        drop(file);

        let spool = open(dir.path(), &opts);
        let kept: Vec<u64> = (0..25).filter(|&n| n != 20).collect();
        assert_holds(&spool, &kept).await;
        let bad = quarantined(dir.path(), &segment, carrier_at);
        assert!(bad.windows(forged.len()).any(|w| w == forged));
    }

    #[tokio::test]
    async fn a_spool_from_before_keyed_checksums_opens_and_moves_on() {
        // One unkeyed segment with three messages and a zero-filled tail.
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join(segment_name(1));
        let mut bytes: Vec<u8> = (0..3).flat_map(|n| plain_frame(&new_message(n))).collect();
        let good_len = bytes.len() as u64;
        bytes.extend([0u8; 512]);
        fs::write(&old, &bytes).unwrap();

        let opts = options(1 << 20);
        let spool = open(dir.path(), &opts);
        assert_holds(&spool, &[0, 1, 2]).await;
        assert_eq!(fs::metadata(&old).unwrap().len(), good_len);
        // New entries go into a new, keyed segment.
        spool.store(vec![message(3, 500)]).await.unwrap();
        spool.remove(&id(1)).await.unwrap();
        drop(spool);
        let files = segment_files(dir.path());
        assert_eq!(files, [old.clone(), dir.path().join(segment_name(2))]);
        key_of(&files[1]);
        assert_holds(&open(dir.path(), &opts), &[0, 2, 3]).await;
    }

    #[tokio::test]
    async fn a_large_body_damaged_after_it_was_stored_is_refused_when_read() {
        let dir = tempfile::tempdir().unwrap();
        let spool = open(dir.path(), &options(1 << 24));
        let len = 3 * READ_WHOLE_UP_TO as usize;
        spool.store(vec![message(1, len)]).await.unwrap();
        let body = spool.read_body(&id(1)).await.unwrap();
        assert!(body.rest().is_some(), "read a chunk at a time");
        assert_eq!(body, message(1, len).body);

        // One byte well past the first chunk, which is read with the
        // frame's head: only the check of the streamed rest can see it.
        let segment = &segment_files(dir.path())[0];
        let at = fs::metadata(segment).unwrap().len() - READ_WHOLE_UP_TO;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(segment)
            .unwrap();
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, at).unwrap();
        file.write_all_at(&[byte[0] ^ 0x20], at).unwrap();
        match spool.read_body(&id(1)).await {
            Err(SpoolError::Corrupt(why)) => assert!(why.contains("checksum"), "{why}"),
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn an_unkeyed_segment_that_needs_a_search_is_refused_with_directions() {
        // Message 1's length field is damaged: in an unkeyed segment the
        // next entry cannot be found safely, so nothing is guessed.
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join(segment_name(1));
        let frames: Vec<Vec<u8>> = (0..3).map(|n| plain_frame(&new_message(n))).collect();
        let mut bytes = frames.concat();
        let at = frames[0].len();
        bytes[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        fs::write(&old, &bytes).unwrap();

        match LocalSpool::open(dir.path(), options(1 << 20)) {
            Err(SpoolError::Corrupt(why)) => {
                assert!(why.contains(&old.display().to_string()), "{why}");
                assert!(why.contains(&format!("offset {at}")), "{why}");
                assert!(why.contains("remove bytes"), "{why}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        assert_eq!(fs::read(&old).unwrap(), bytes, "the segment was changed");

        // Damage that the entry's own length steps over is quarantined.
        let mut bytes = frames.concat();
        bytes[at + 50] ^= 0x55;
        fs::write(&old, &bytes).unwrap();
        let spool = open(dir.path(), &options(1 << 20));
        assert_holds(&spool, &[0, 2]).await;
        assert_eq!(
            quarantined(dir.path(), &old, at as u64),
            bytes[at..at + frames[1].len()]
        );
    }

    #[tokio::test]
    async fn a_damaged_segment_header_is_read_with_the_spool_key() {
        let dir = tempfile::tempdir().unwrap();
        let opts = options(4096);
        let files = six_in_several_segments(dir.path(), &opts).await;
        // The checksum of the key in the last segment's header.
        let file = OpenOptions::new()
            .write(true)
            .open(&files[files.len() - 1])
            .unwrap();
        file.write_all_at(&[0xff, 0xff], 17).unwrap();
        drop(file);

        let spool = open(dir.path(), &opts);
        assert_eq!(
            ids(&spool.list().await.unwrap()),
            (0..6).map(id).collect::<Vec<_>>()
        );
        for n in 0..6 {
            assert_eq!(
                spool.read_body(&id(n)).await.unwrap(),
                message(n, 1500).body
            );
        }
    }

    #[tokio::test]
    async fn dead_segments_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let opts = options(8 * 1024);
        let spool = open(dir.path(), &opts);
        for n in 0..20 {
            spool.store(vec![message(n, 2000)]).await.unwrap();
        }
        assert!(segment_files(dir.path()).len() >= 5);
        for n in 0..19 {
            spool.remove(&id(n)).await.unwrap();
        }
        eventually("dead segments deleted and their space given back", || {
            segment_files(dir.path()).len() <= 2 && deleting_files(dir.path()).is_empty()
        })
        .await;
        assert_eq!(
            spool.read_body(&id(19)).await.unwrap(),
            message(19, 2000).body
        );
        drop(spool);

        let spool = open(dir.path(), &opts);
        assert_eq!(ids(&spool.list().await.unwrap()), vec![id(19)]);
    }

    #[tokio::test]
    async fn a_large_body_being_read_survives_the_deletion_of_its_segment() {
        let dir = tempfile::tempdir().unwrap();
        let opts = LocalSpoolOptions {
            segment_size: 64 * 1024,
            compact_below: 0.9,
            compact_after: Duration::ZERO,
            ..LocalSpoolOptions::default()
        };
        let spool = open(dir.path(), &opts);
        let large = message(1, 3 * READ_WHOLE_UP_TO as usize);
        spool
            .store(vec![message(0, 200 * 1024), large.clone()])
            .await
            .unwrap();
        let first = segment_files(dir.path())[0].clone();
        let body = spool.read_body(&id(1)).await.unwrap();
        assert!(body.rest().is_some(), "read a chunk at a time");
        // Message 1 is compacted into a new segment and the first one,
        // dead, is deleted while the delivery still reads from it.
        spool.remove(&id(0)).await.unwrap();
        spool.store(vec![message(2, 2000)]).await.unwrap();
        eventually("the first segment deleted", || {
            !first.exists() && deleting_files(dir.path()).is_empty()
        })
        .await;
        assert_eq!(body.to_vec().unwrap(), large.body);
        assert_eq!(
            spool.read_body(&id(1)).await.unwrap().to_vec().unwrap(),
            large.body
        );
    }

    #[tokio::test]
    async fn a_segment_deleted_before_a_crash_is_freed_at_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        let opts = options(8 * 1024);
        let spool = open(dir.path(), &opts);
        spool.store(vec![message(1, 2000)]).await.unwrap();
        drop(spool);
        // Renamed out of the journal, then a crash while it was shrunk.
        let doomed = deleting_path(&dir.path().join(segment_name(7)));
        fs::write(&doomed, vec![b'x'; 3 * SHRINK_STEP as usize + 100]).unwrap();
        let stranger = dir.path().join("notes.deleting");
        fs::write(&stranger, b"not ours").unwrap();

        let spool = open(dir.path(), &opts);
        assert!(!doomed.exists(), "{doomed:?} left behind");
        assert!(
            stranger.exists(),
            "a file the spool did not name was deleted"
        );
        assert_eq!(ids(&spool.list().await.unwrap()), vec![id(1)]);
    }

    #[tokio::test]
    async fn removals_outlive_the_segments_they_hide() {
        // Message 0 lives in the first segment next to message 1; its
        // removal sits in a later segment with nothing live. That later
        // segment must stay until the first one is gone, or 0 comes back.
        let dir = tempfile::tempdir().unwrap();
        let opts = LocalSpoolOptions {
            segment_size: 4096,
            compact_below: 0.0,
            ..LocalSpoolOptions::default()
        };
        let spool = open(dir.path(), &opts);
        spool
            .store(vec![message(0, 1000), message(1, 1000)])
            .await
            .unwrap();
        spool.store(vec![message(2, 3000)]).await.unwrap();
        spool.remove(&id(0)).await.unwrap();
        spool.store(vec![message(3, 3000)]).await.unwrap();
        spool.remove(&id(2)).await.unwrap();
        spool.store(vec![message(4, 3000)]).await.unwrap();
        drop(spool);

        let spool = open(dir.path(), &opts);
        assert_eq!(ids(&spool.list().await.unwrap()), vec![id(1), id(3), id(4)]);
        spool.remove(&id(1)).await.unwrap();
        spool.remove(&id(3)).await.unwrap();
        drop(spool);
        let spool = open(dir.path(), &opts);
        assert_eq!(ids(&spool.list().await.unwrap()), vec![id(4)]);
        assert_eq!(segment_files(dir.path()).len(), 1);
    }

    #[tokio::test]
    async fn compaction_keeps_live_messages_and_frees_the_segment() {
        let dir = tempfile::tempdir().unwrap();
        let opts = LocalSpoolOptions {
            segment_size: 8 * 1024,
            compact_below: 0.5,
            compact_after: Duration::ZERO,
            ..LocalSpoolOptions::default()
        };
        let spool = open(dir.path(), &opts);
        for n in 0..3 {
            spool.store(vec![message(n, 2500)]).await.unwrap();
        }
        let first = segment_files(dir.path())[0].clone();
        // One of three left in the first segment; updated, so its latest
        // record is elsewhere.
        spool.remove(&id(0)).await.unwrap();
        spool.remove(&id(1)).await.unwrap();
        let mut record = message(2, 2500).record;
        record.deliveries[0].attempts = 3;
        spool.update(record.clone()).await.unwrap();
        // Fill up until the active segment rotates.
        for n in 10..16 {
            spool.store(vec![message(n, 2500)]).await.unwrap();
        }
        eventually("the sparse first segment compacted", || !first.exists()).await;
        assert_eq!(
            spool.read_body(&id(2)).await.unwrap(),
            message(2, 2500).body
        );
        drop(spool);

        let spool = open(dir.path(), &opts);
        let list = spool.list().await.unwrap();
        assert_eq!(list[0], record);
        assert_eq!(
            ids(&list),
            [2, 10, 11, 12, 13, 14, 15]
                .into_iter()
                .map(id)
                .collect::<Vec<_>>()
        );
        assert_eq!(
            spool.read_body(&id(2)).await.unwrap(),
            message(2, 2500).body
        );
    }

    #[tokio::test]
    async fn a_segment_is_compacted_once_it_has_settled_not_as_it_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let opts = LocalSpoolOptions {
            segment_size: 8 * 1024,
            compact_below: 0.5,
            compact_after: Duration::from_millis(500),
            removals_synced_within: Duration::from_millis(20),
            ..LocalSpoolOptions::default()
        };
        let spool = open(dir.path(), &opts);
        for n in 0..3 {
            spool.store(vec![message(n, 2500)]).await.unwrap();
        }
        let first = segment_files(dir.path())[0].clone();
        spool.remove(&id(0)).await.unwrap();
        spool.remove(&id(1)).await.unwrap();
        let rotated = Instant::now();
        spool.store(vec![message(3, 2500)]).await.unwrap();
        // Sparse and out of use, but only just: message 2 may be on its
        // way out, so it is left where it is for now.
        tokio::time::sleep(Duration::from_millis(100)).await;
        if rotated.elapsed() < opts.compact_after {
            assert!(first.exists(), "{first:?} compacted as it rotated");
        }
        eventually("the settled sparse segment compacted", || !first.exists()).await;
        assert!(rotated.elapsed() >= opts.compact_after);
        assert_eq!(
            spool.read_body(&id(2)).await.unwrap(),
            message(2, 2500).body
        );
        drop(spool);
        let spool = open(dir.path(), &opts);
        assert_eq!(ids(&spool.list().await.unwrap()), vec![id(2), id(3)]);
    }

    /// Compaction reads and copies with the index unlocked, so a message
    /// may change between its copy and the copy's placing: such a copy
    /// must not be written, or the next replay would bring the old record
    /// (or a removed message) back. Its members are found a step at a time.
    #[tokio::test]
    async fn a_copy_of_a_message_changed_while_it_was_compacted_is_not_placed() {
        let dir = tempfile::tempdir().unwrap();
        let opts = LocalSpoolOptions {
            segment_size: 8 * 1024,
            compact_below: 0.5,
            // The housekeeping thread leaves the segment alone.
            compact_after: Duration::from_secs(3600),
            ..LocalSpoolOptions::default()
        };
        let spool = open(dir.path(), &opts);
        for n in 0..4 {
            spool.store(vec![message(n, 1500)]).await.unwrap();
        }
        spool.remove(&id(0)).await.unwrap();
        for n in 10..14 {
            spool.store(vec![message(n, 1500)]).await.unwrap();
        }
        let first = BTreeSet::from([1]);
        let inner = spool.inner.clone();
        let copies = |found: Vec<Member>| {
            let mut copies = Copies::default();
            for member in found {
                copies.push(member, &inner.key).unwrap();
            }
            copies
        };
        // One message per step: 1, 2, 3, then the messages of the later
        // segments, which are not members.
        let mut steps = Vec::new();
        let mut from = Bound::Unbounded;
        loop {
            let (found, next) = inner.state().unwrap().members(&first, from, 1);
            steps.push(ids(&found
                .iter()
                .map(|m| (*m.record).clone())
                .collect::<Vec<_>>()));
            match next {
                Some(cursor) => from = Bound::Excluded(cursor),
                None => break,
            }
        }
        let members: Vec<MessageId> = steps.iter().flatten().cloned().collect();
        assert_eq!(members, vec![id(1), id(2), id(3)], "steps {steps:?}");
        assert!(
            steps.len() >= 7,
            "one message looked at per step: {steps:?}"
        );

        let (found, _) = inner
            .state()
            .unwrap()
            .members(&first, Bound::Unbounded, 100);
        let stale = copies(found);
        let mut changed = message(1, 1500).record;
        changed.deliveries[0].attempts = 3;
        spool.update(changed.clone()).await.unwrap();
        spool.remove(&id(2)).await.unwrap();
        let placed = inner.state().unwrap().place_copies(stale).unwrap();
        assert_eq!(placed.0, 1, "only message 3 is as it was copied");

        // Message 1 is copied again as it is now.
        let (found, _) = inner
            .state()
            .unwrap()
            .members(&first, Bound::Unbounded, 100);
        assert_eq!(
            ids(&found
                .iter()
                .map(|m| (*m.record).clone())
                .collect::<Vec<_>>()),
            vec![id(1)]
        );
        assert_eq!(
            inner
                .state()
                .unwrap()
                .place_copies(copies(found))
                .unwrap()
                .0,
            1
        );
        drop((inner, spool));

        let spool = open(dir.path(), &opts);
        let list = spool.list().await.unwrap();
        assert_eq!(
            ids(&list),
            [1, 3, 10, 11, 12, 13]
                .into_iter()
                .map(id)
                .collect::<Vec<_>>()
        );
        assert_eq!(list[0], changed);
        for n in [1, 3] {
            assert_eq!(
                spool.read_body(&id(n)).await.unwrap(),
                message(n, 1500).body
            );
        }
    }

    #[tokio::test]
    async fn a_second_open_of_the_same_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let opts = LocalSpoolOptions::default();
        let spool = open(dir.path(), &opts);
        match LocalSpool::open(dir.path(), opts.clone()) {
            Err(SpoolError::Unavailable(why)) => assert!(why.contains("in use"), "{why}"),
            other => panic!("expected the second open to be refused, got {other:?}"),
        }
        drop(spool);
        open(dir.path(), &opts);
    }

    #[tokio::test]
    async fn a_dropped_spool_opens_again_at_once_while_its_housekeeping_was_due() {
        // Each round rotates through small segments and leaves sparse and
        // dead ones behind, so the housekeeping thread has work when the
        // spool is dropped; the next open must find the directory free and
        // exactly the messages kept.
        let dir = tempfile::tempdir().unwrap();
        let opts = LocalSpoolOptions {
            segment_size: 4096,
            compact_below: 0.9,
            ..LocalSpoolOptions::default()
        };
        let mut kept = Vec::new();
        for round in 0..20 {
            let spool = open(dir.path(), &opts);
            assert_eq!(ids(&spool.list().await.unwrap()), kept, "round {round}");
            for n in 0..6 {
                spool
                    .store(vec![message(round * 10 + n, 3000)])
                    .await
                    .unwrap();
            }
            for n in 0..5 {
                spool.remove(&id(round * 10 + n)).await.unwrap();
            }
            kept.push(id(round * 10 + 5));
            drop(spool);
        }
        let spool = open(dir.path(), &opts);
        for (round, id) in kept.iter().enumerate() {
            let n = round as u64 * 10 + 5;
            assert_eq!(spool.read_body(id).await.unwrap(), message(n, 3000).body);
        }
    }

    /// A tmpfs mounted for one test, unmounted when dropped.
    struct Tmpfs {
        dir: tempfile::TempDir,
    }

    impl Tmpfs {
        fn mount(size: &str) -> Tmpfs {
            let dir = tempfile::tempdir().unwrap();
            let status = Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir.path())
                .status();
            match status {
                Ok(s) if s.success() => Tmpfs { dir },
                other => panic!(
                    "this test fills a small tmpfs and must be able to mount one (run as root): \
                     mount -t tmpfs failed: {other:?}"
                ),
            }
        }
    }

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }

    #[tokio::test]
    async fn a_full_disk_fails_the_write_and_keeps_what_was_stored() {
        let fs = Tmpfs::mount("256k");
        let path = fs.dir.path().join("spool");
        let filler = fs.dir.path().join("filler");
        fs::write(&filler, vec![0u8; 64 * 1024]).unwrap();
        let spare = fs.dir.path().join("spare");
        fs::write(&spare, vec![0u8; 12 * 1024]).unwrap();
        let opts = LocalSpoolOptions::default();
        let spool = open(&path, &opts);

        let segment = segment_files(&path).pop().unwrap();
        let len = || fs::metadata(&segment).unwrap().len();
        let mut stored = Vec::new();
        let mut good_len = len();
        let error = loop {
            let n = stored.len() as u64;
            match spool.store(vec![message(n, 4000)]).await {
                Ok(()) => stored.push(n),
                Err(e) => break e,
            }
            good_len = len();
            assert!(n < 1000, "the tmpfs never filled up");
        };
        assert!(matches!(error, SpoolError::Unavailable(_)), "{error:?}");
        assert!(stored.len() >= 10, "only {} stored", stored.len());
        assert_eq!(len(), good_len, "the failed write was not cut back");
        // A batch fails as a whole, after writing part of itself.
        fs::remove_file(&spare).unwrap();
        let batch: Vec<_> = (500..510).map(|n| message(n, 4000)).collect();
        assert!(spool.store(batch).await.is_err());
        assert_eq!(len(), good_len, "the failed batch was not cut back");
        assert_eq!(
            ids(&spool.list().await.unwrap()),
            stored.iter().copied().map(id).collect::<Vec<_>>()
        );
        for &n in &stored {
            assert_eq!(
                spool.read_body(&id(n)).await.unwrap(),
                message(n, 4000).body
            );
        }

        // Space comes back; the spool goes on where it stopped.
        fs::remove_file(&filler).unwrap();
        spool
            .store(vec![message(900, 4000)])
            .await
            .expect("store once space is back");
        stored.push(900);
        drop(spool);

        let spool = open(&path, &opts);
        let list = spool.list().await.unwrap();
        assert_eq!(
            ids(&list),
            stored.iter().copied().map(id).collect::<Vec<_>>()
        );
        for &n in &stored {
            assert_eq!(
                spool.read_body(&id(n)).await.unwrap(),
                message(n, 4000).body
            );
        }
    }
}
