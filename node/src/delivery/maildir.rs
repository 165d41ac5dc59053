//! Local delivery into a drop directory laid out as a Maildir: each message
//! is written under `tmp/`, flushed to disk, then renamed into `new/`, so
//! a reader that watches `new/` only ever sees complete files.
//!
//! This is a blocking file operation; the caller runs it off the async
//! executor (`spawn_blocking`).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use smarthost_proto::address::Mailbox;
use smarthost_proto::envelope::MessageId;

use crate::spool::{Body, SpoolError};

/// Tells deliveries within one process apart.
static SEQUENCE: AtomicU64 = AtomicU64::new(0);

/// Writes `body` into `drop_dir/new/`, preceded by one `Delivered-To:`
/// field per recipient, and returns the file's path.
///
/// The `tmp/`, `new/` and `cur/` directories are created when missing.
/// The file name follows the Maildir convention, `seconds.unique.host`,
/// with the process id, a per-process counter and the message id as the
/// unique part, so two deliveries never choose the same name; the file is
/// created exclusively in `tmp/` to make sure of it. When this returns,
/// the file and its entry in `new/` are on disk.
pub fn deliver(
    drop_dir: &Path,
    id: &MessageId,
    recipients: &[&Mailbox],
    body: &Body,
) -> io::Result<PathBuf> {
    let tmp = drop_dir.join("tmp");
    let new = drop_dir.join("new");
    for dir in [&tmp, &new, &drop_dir.join("cur")] {
        fs::create_dir_all(dir)?;
    }

    let (name, mut file) = create_unique(&tmp, id)?;
    let tmp_path = tmp.join(&name);
    let written = write_and_sync(&mut file, recipients, body);
    drop(file);
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp_path);
        return Err(e);
    }

    let final_path = new.join(&name);
    if let Err(e) = fs::rename(&tmp_path, &final_path) {
        let _ = fs::remove_file(&tmp_path);
        return Err(e);
    }
    // The rename is durable only once the directory itself is flushed.
    File::open(&new)?.sync_all()?;
    Ok(final_path)
}

/// Creates a new file in `tmp` under a name no other delivery uses.
fn create_unique(tmp: &Path, id: &MessageId) -> io::Result<(String, File)> {
    let host = host_part();
    let pid = std::process::id();
    loop {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let seq = SEQUENCE.fetch_add(1, Ordering::Relaxed);
        let name = format!(
            "{}.M{}P{}Q{}R{}.{}",
            now.as_secs(),
            now.subsec_micros(),
            pid,
            seq,
            id,
            host
        );
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(tmp.join(&name))
        {
            Ok(file) => return Ok((name, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

fn write_and_sync(file: &mut File, recipients: &[&Mailbox], body: &Body) -> io::Result<()> {
    let mut head = String::new();
    for rcpt in recipients {
        head.push_str(&format!("Delivered-To: {rcpt}\r\n"));
    }
    let mut out = io::BufWriter::new(&mut *file);
    out.write_all(head.as_bytes())?;
    body.for_each_chunk(|chunk| {
        out.write_all(chunk)
            .map_err(|e| SpoolError::Unavailable(e.to_string()))
    })
    .map_err(io::Error::other)?;
    out.flush()?;
    drop(out);
    file.sync_all()
}

/// This machine's name for the last part of a file name, with the
/// characters Maildir reserves (`/` and `:`) escaped as its readers expect.
/// Read once per process rather than once per message: it only helps
/// keep file names unique, which a rename while running does not affect.
fn host_part() -> &'static str {
    static HOST: OnceLock<String> = OnceLock::new();
    HOST.get_or_init(|| {
        let host = fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        let host = if host.is_empty() {
            "localhost".to_string()
        } else {
            host
        };
        host.replace('/', "\\057").replace(':', "\\072")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mailbox(local: &str, domain: &str) -> Mailbox {
        Mailbox {
            local_part: local.into(),
            domain: domain.into(),
        }
    }

    fn entries(dir: &Path) -> Vec<PathBuf> {
        let mut list: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        list.sort();
        list
    }

    #[test]
    fn a_delivery_lands_in_new_with_its_delivered_to_fields() {
        let dir = tempfile::tempdir().unwrap();
        let drop_dir = dir.path().join("drop");
        let id = MessageId::new(1_795_888_842_000, 7);
        let a = mailbox("a", "example.org");
        let b = mailbox("john doe", "example.org");
        let body = b"Subject: hi\r\n\r\nhello\r\n";

        let path = deliver(&drop_dir, &id, &[&a, &b], &Body::from(body.to_vec())).unwrap();

        assert_eq!(path.parent().unwrap(), drop_dir.join("new"));
        assert_eq!(entries(&drop_dir.join("new")), vec![path.clone()]);
        assert!(entries(&drop_dir.join("tmp")).is_empty());
        assert!(entries(&drop_dir.join("cur")).is_empty());
        assert_eq!(
            fs::read(&path).unwrap(),
            b"Delivered-To: a@example.org\r\n\
              Delivered-To: \"john doe\"@example.org\r\n\
              Subject: hi\r\n\r\nhello\r\n"
        );
        let name = path.file_name().unwrap().to_str().unwrap();
        assert!(name.contains(id.as_str()), "{name}");
        assert!(!name.contains('/') && !name.contains(':'), "{name}");
    }

    #[test]
    fn deliveries_of_one_message_do_not_collide() {
        let dir = tempfile::tempdir().unwrap();
        let id = MessageId::new(1, 2);
        let a = mailbox("a", "example.org");
        let first = deliver(dir.path(), &id, &[&a], &Body::from(b"one\r\n".to_vec())).unwrap();
        let second = deliver(dir.path(), &id, &[&a], &Body::from(b"two\r\n".to_vec())).unwrap();
        assert_ne!(first, second);
        assert_eq!(entries(&dir.path().join("new")).len(), 2);
        assert_eq!(
            fs::read(&first).unwrap(),
            b"Delivered-To: a@example.org\r\none\r\n"
        );
        assert_eq!(
            fs::read(&second).unwrap(),
            b"Delivered-To: a@example.org\r\ntwo\r\n"
        );
    }

    #[test]
    fn deliveries_from_many_threads_all_arrive() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let a = mailbox("a", "example.org");
                    for i in 0..10 {
                        let body = format!("{t}-{i}\r\n");
                        deliver(
                            &path,
                            &MessageId::new(1, 1),
                            &[&a],
                            &Body::from(body.into_bytes()),
                        )
                        .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(entries(&path.join("new")).len(), 80);
        assert!(entries(&path.join("tmp")).is_empty());
    }

    #[test]
    fn an_unusable_drop_directory_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        fs::write(&file, b"x").unwrap();
        let a = mailbox("a", "example.org");
        assert!(deliver(
            &file,
            &MessageId::new(1, 2),
            &[&a],
            &Body::from(b"x".to_vec())
        )
        .is_err());
    }
}
