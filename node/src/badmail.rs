//! Badmail: mail that can neither be delivered nor bounced, kept with its
//! reason until an operator replays or deletes it (the IIS "Badmail"
//! folder). Today that is a pickup file that cannot be queued (no
//! recipient, a bad address, too large) and a failed report from `<>`
//! that has nowhere to go.
//!
//! One directory (`badmail.dir`, by default `badmail` in `queue.path`),
//! two files per entry: `<name>.eml`, the message, and `<name>.json`, the
//! [`Entry`] (source, reason, time, the envelope if known). The message is
//! put in place first, so a crash in between leaves a message without its
//! note (listed with an unknown reason), never a note without a message.
//! Names are made here (`<ms>-<source>-<random>`) and an operator's name
//! is checked against that form ([`valid_name`]) before it touches a path.
//!
//! The methods do blocking file I/O: call them on the blocking pool.

use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};

use serde::{Deserialize, Serialize};
use smarthost_proto::address::{parse_forward_path, parse_reverse_path, Path as SmtpPath};
use smarthost_proto::envelope::{sender_key, Envelope};

/// Where an entry came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// A file of the pickup directory that could not be queued.
    Pickup,
    /// A failed report from `<>` that no postmaster could be told of.
    Report,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Pickup => "pickup",
            Source::Report => "report",
        }
    }
}

/// An envelope as badmail keeps it: plain text, readable by a person and
/// by a replay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptEnvelope {
    /// `<>` for the null reverse path.
    pub sender: String,
    pub recipients: Vec<String>,
}

impl From<&Envelope> for KeptEnvelope {
    fn from(envelope: &Envelope) -> Self {
        KeptEnvelope {
            sender: sender_key(envelope.sender.as_ref()),
            recipients: envelope
                .recipients
                .iter()
                .map(|r| r.address.to_string())
                .collect(),
        }
    }
}

impl KeptEnvelope {
    /// The envelope to queue `body` with again; the addresses are checked
    /// as SMTP checks them.
    pub fn to_envelope(&self, body: &[u8]) -> Result<Envelope, String> {
        let sender = match self.sender.as_str() {
            "<>" => None,
            text => Some(
                parse_reverse_path(&format!("<{text}>"))
                    .map_err(|e| format!("sender {text:?}: {e}"))?
                    .ok_or_else(|| format!("sender {text:?}: not an address"))?
                    .mailbox,
            ),
        };
        let mut recipients = Vec::with_capacity(self.recipients.len());
        for text in &self.recipients {
            match parse_forward_path(&format!("<{text}>")) {
                Ok(SmtpPath::Mailbox(m)) => recipients.push(m.mailbox),
                Ok(_) => return Err(format!("recipient {text:?}: needs a domain")),
                Err(e) => return Err(format!("recipient {text:?}: {e}")),
            }
        }
        if recipients.is_empty() {
            return Err("no recipient".into());
        }
        Ok(crate::submit::envelope_of(sender, recipients, body))
    }
}

/// What is known of an entry: its note, and the message's size.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The entry's name, as the admin API takes it.
    pub name: String,
    pub source: Source,
    pub reason: String,
    /// When it was kept, in ms since the epoch.
    pub at_ms: u64,
    /// The message's size in octets.
    #[serde(default)]
    pub bytes: u64,
    /// The pickup file's name, for a pickup entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// `None` when the message was refused before an envelope was known.
    #[serde(default)]
    pub envelope: Option<KeptEnvelope>,
}

/// What to note about a message being kept.
#[derive(Clone, Debug)]
pub struct Note {
    pub source: Source,
    pub reason: String,
    pub file: Option<String>,
    pub envelope: Option<KeptEnvelope>,
}

/// The longest name an entry may have.
const MAX_NAME: usize = 80;

/// Whether `name` is one this store could have made: letters, digits,
/// `-` and `_`, at most [`MAX_NAME`]; never a path, a dot or empty.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The name of a new entry: sorted by time, then unique.
fn new_name(source: Source, at_ms: u64) -> String {
    format!(
        "{at_ms:013}-{}-{:016x}",
        source.name(),
        rand::random::<u64>()
    )
}

/// The badmail directory of this node.
#[derive(Debug)]
pub struct Badmail {
    dir: PathBuf,
    /// Entries kept, as counted at open and since (for the gauge).
    entries: AtomicI64,
}

impl Badmail {
    /// Opens `dir`, making it if needed, and counts what is in it.
    pub fn open(dir: &Path) -> io::Result<Badmail> {
        fs::create_dir_all(dir)?;
        let badmail = Badmail {
            dir: dir.to_path_buf(),
            entries: AtomicI64::new(0),
        };
        let count = badmail.names()?.len();
        badmail.entries.store(count as i64, Ordering::Relaxed);
        crate::metrics::badmail_entries(count as i64);
        Ok(badmail)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn message_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.eml"))
    }

    fn note_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    /// Moves `file` (a claimed pickup file) into badmail with `note`;
    /// answers the entry's name.
    pub fn keep_file(&self, file: &Path, note: Note) -> io::Result<String> {
        let name = new_name(note.source, crate::now_ms());
        let target = self.message_path(&name);
        if fs::rename(file, &target).is_err() {
            // Another file system: copy, make it durable, then let go.
            fs::copy(file, &target)?;
            fs::File::open(&target)?.sync_all()?;
            fs::remove_file(file)?;
        }
        let bytes = fs::metadata(&target)?.len();
        self.write_note(&name, bytes, note)?;
        Ok(name)
    }

    /// Keeps `message` with `note`; answers the entry's name.
    pub fn keep_bytes(&self, message: &[u8], note: Note) -> io::Result<String> {
        let name = new_name(note.source, crate::now_ms());
        write_durably(&self.message_path(&name), message)?;
        self.write_note(&name, message.len() as u64, note)?;
        Ok(name)
    }

    /// Keeps `message` with `note` as `name` unless that entry exists
    /// already (the same failure reported again); `true` if kept now.
    pub fn keep_once(&self, name: &str, message: &[u8], note: Note) -> io::Result<bool> {
        if !valid_name(name) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name:?} is not a badmail name"),
            ));
        }
        if self.message_path(name).exists() {
            return Ok(false);
        }
        write_durably(&self.message_path(name), message)?;
        self.write_note(name, message.len() as u64, note)?;
        Ok(true)
    }

    fn write_note(&self, name: &str, bytes: u64, note: Note) -> io::Result<()> {
        let entry = Entry {
            name: name.to_string(),
            source: note.source,
            reason: note.reason,
            at_ms: crate::now_ms(),
            bytes,
            file: note.file,
            envelope: note.envelope,
        };
        let json = serde_json::to_vec_pretty(&entry).expect("plain data");
        write_durably(&self.note_path(name), &json)?;
        fs::File::open(&self.dir)?.sync_all()?;
        let now = self.entries.fetch_add(1, Ordering::Relaxed) + 1;
        crate::metrics::badmail_kept(entry.source, now);
        tracing::warn!(
            badmail = %name,
            source = entry.source.name(),
            reason = %entry.reason,
            "message kept in badmail"
        );
        Ok(())
    }

    /// The names of the entries, oldest first.
    fn names(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for item in fs::read_dir(&self.dir)? {
            let file = item?.file_name();
            let Some(name) = file.to_str().and_then(|f| f.strip_suffix(".eml")) else {
                continue;
            };
            if valid_name(name) {
                names.push(name.to_string());
            }
        }
        names.sort_unstable();
        Ok(names)
    }

    /// At most `limit` entries, oldest first, and how many there are.
    pub fn list(&self, limit: usize) -> io::Result<(Vec<Entry>, usize)> {
        let names = self.names()?;
        let total = names.len();
        let entries = names
            .iter()
            .take(limit)
            .filter_map(|name| self.entry(name).transpose())
            .collect::<io::Result<_>>()?;
        Ok((entries, total))
    }

    /// The entry called `name` (a [`valid_name`]), if there is one.
    pub fn entry(&self, name: &str) -> io::Result<Option<Entry>> {
        let bytes = match fs::metadata(self.message_path(name)) {
            Ok(meta) => meta.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let entry = match fs::read(self.note_path(name)) {
            Ok(json) => serde_json::from_slice(&json).ok(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        Ok(Some(entry.unwrap_or_else(|| Entry {
            name: name.to_string(),
            source: if name.contains("-report-") {
                Source::Report
            } else {
                Source::Pickup
            },
            reason: "unknown: the entry's note is missing or unreadable".into(),
            at_ms: 0,
            bytes,
            file: None,
            envelope: None,
        })))
    }

    /// The entry called `name` with its message, if there is one.
    pub fn read(&self, name: &str) -> io::Result<Option<(Entry, Vec<u8>)>> {
        let Some(entry) = self.entry(name)? else {
            return Ok(None);
        };
        match fs::read(self.message_path(name)) {
            Ok(message) => Ok(Some((entry, message))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Deletes the entry called `name`; `false` if there was none.
    pub fn delete(&self, name: &str) -> io::Result<bool> {
        let found = match fs::remove_file(self.message_path(name)) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(e),
        };
        match fs::remove_file(self.note_path(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        if found {
            let now = self.entries.fetch_sub(1, Ordering::Relaxed) - 1;
            crate::metrics::badmail_entries(now.max(0));
        }
        Ok(found)
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename, synced.
fn write_durably(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut file = tempfile::NamedTempFile::new_in(dir)?;
    file.write_all(bytes)?;
    file.as_file().sync_all()?;
    file.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_the_store_could_make_are_valid() {
        let made = new_name(Source::Pickup, 1_764_777_983_000);
        assert!(valid_name(&made), "{made}");
        assert!(made.starts_with("1764777983000-pickup-"), "{made}");
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "a\\b",
            "%2e%2e",
            "x.eml",
            ".hidden",
            "a b",
            "a\0b",
            "é",
            &"a".repeat(MAX_NAME + 1),
        ] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        assert!(valid_name(&"a".repeat(MAX_NAME)));
    }

    #[test]
    fn entries_are_kept_listed_read_and_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let badmail = Badmail::open(&dir.path().join("badmail")).unwrap();
        let picked = dir.path().join("order.eml");
        fs::write(&picked, b"Subject: no recipient\r\n\r\nhi\r\n").unwrap();
        let first = badmail
            .keep_file(
                &picked,
                Note {
                    source: Source::Pickup,
                    reason: "To: at least one recipient is required".into(),
                    file: Some("order.eml".into()),
                    envelope: None,
                },
            )
            .unwrap();
        assert!(!picked.exists(), "moved, not copied");
        let envelope = KeptEnvelope {
            sender: "<>".into(),
            recipients: vec!["a@example.org".into()],
        };
        let second = badmail
            .keep_bytes(
                b"report",
                Note {
                    source: Source::Report,
                    reason: "550 no such user".into(),
                    file: None,
                    envelope: Some(envelope.clone()),
                },
            )
            .unwrap();
        let (listed, total) = badmail.list(10).unwrap();
        assert_eq!(total, 2);
        let names: Vec<&str> = listed.iter().map(|e| e.name.as_str()).collect();
        let mut expected = [first.as_str(), second.as_str()];
        expected.sort();
        assert_eq!(names, expected);
        let (only, total) = badmail.list(1).unwrap();
        assert_eq!((only.len(), total), (1, 2), "bounded");

        let (entry, message) = badmail.read(&second).unwrap().unwrap();
        assert_eq!(message, b"report");
        assert_eq!(entry.source, Source::Report);
        assert_eq!(entry.envelope, Some(envelope));
        assert_eq!(entry.bytes, 6);
        let (entry, _) = badmail.read(&first).unwrap().unwrap();
        assert_eq!(entry.file.as_deref(), Some("order.eml"));
        assert!(entry.reason.contains("recipient"));

        // Reopened, the store counts what is there.
        let again = Badmail::open(badmail.dir()).unwrap();
        assert_eq!(again.entries.load(Ordering::Relaxed), 2);

        assert!(badmail.delete(&first).unwrap());
        assert!(!badmail.delete(&first).unwrap(), "gone");
        assert!(badmail.read(&first).unwrap().is_none());
        assert_eq!(badmail.list(10).unwrap().1, 1);
    }

    #[test]
    fn a_message_without_its_note_is_listed_with_an_unknown_reason() {
        let dir = tempfile::tempdir().unwrap();
        let badmail = Badmail::open(dir.path()).unwrap();
        fs::write(dir.path().join("1-pickup-ab.eml"), b"x").unwrap();
        fs::write(dir.path().join("stray.json"), b"{}").unwrap();
        fs::write(dir.path().join("not valid.eml"), b"x").unwrap();
        let (listed, total) = badmail.list(10).unwrap();
        assert_eq!(total, 1);
        assert_eq!(listed[0].name, "1-pickup-ab");
        assert!(listed[0].reason.starts_with("unknown"));
    }
}
