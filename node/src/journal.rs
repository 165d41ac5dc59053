//! An append-only file of JSON lines that holds a small store of the
//! local backend across restarts (the suppression list, the webhook
//! outbox): each change is a line, the file is replayed at start and
//! rewritten with the live state once most of its lines are dead.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

pub struct Journal {
    path: PathBuf,
    file: File,
    /// Lines in the file, live or dead.
    lines: usize,
}

impl Journal {
    /// Opens (or starts) the journal at `path`, handing each line to
    /// `replay` in order. A line that cannot be read (a torn last line,
    /// written when the process died) is skipped.
    pub fn open<T: DeserializeOwned>(
        path: &Path,
        mut replay: impl FnMut(T),
    ) -> io::Result<Journal> {
        let mut lines = 0;
        match File::open(path) {
            Ok(file) => {
                for line in io::BufReader::new(file).lines() {
                    let line = line?;
                    match serde_json::from_str::<T>(&line) {
                        Ok(record) => {
                            lines += 1;
                            replay(record);
                        }
                        Err(_) => {
                            tracing::warn!(path = %path.display(), "unreadable journal line skipped")
                        }
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Journal {
            path: path.to_path_buf(),
            file,
            lines,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `records` in one write; durable once [`Journal::sync`] (or
    /// a handle from [`Journal::sync_handle`]) has synced.
    pub fn append<T: Serialize>(&mut self, records: &[T]) -> io::Result<()> {
        let mut buf = Vec::new();
        for record in records {
            serde_json::to_writer(&mut buf, record)?;
            buf.push(b'\n');
        }
        self.file.write_all(&buf)?;
        self.lines += records.len();
        Ok(())
    }

    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// A handle that syncs the current file without holding the journal,
    /// so that writers can append while one of them syncs for all
    /// (group commit). After a rewrite it syncs the old file, harmlessly:
    /// the rewrite made the new one durable.
    pub fn sync_handle(&self) -> io::Result<File> {
        self.file.try_clone()
    }

    /// Rewrites the journal as `live` (the records that rebuild the present
    /// state) when fewer than a third of its lines are live, through a new
    /// file renamed over the old one. Returns whether it did.
    pub fn compact_if_mostly_dead<T: Serialize>(
        &mut self,
        live: usize,
        records: impl Iterator<Item = T>,
    ) -> io::Result<bool> {
        if self.lines <= 2 * live + 1000 {
            return Ok(false);
        }
        let new = self.path.with_extension("jsonl.new");
        let mut file = File::create(&new)?;
        let mut buf = Vec::new();
        let mut written = 0;
        for record in records {
            serde_json::to_writer(&mut buf, &record)?;
            buf.push(b'\n');
            written += 1;
        }
        file.write_all(&buf)?;
        file.sync_all()?;
        std::fs::rename(&new, &self.path)?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        self.lines = written;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_replayed_in_order_and_a_torn_one_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.jsonl");
        let mut journal = Journal::open::<u32>(&path, |_| panic!("empty")).unwrap();
        journal.append(&[1u32, 2, 3]).unwrap();
        journal.sync().unwrap();
        drop(journal);
        // A line written whole by another hand, then one cut short.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"4\n{\"torn")
            .unwrap();
        let mut seen = Vec::new();
        Journal::open::<u32>(&path, |n| seen.push(n)).unwrap();
        assert_eq!(seen, [1, 2, 3, 4]);
    }

    #[test]
    fn a_mostly_dead_journal_is_rewritten_with_the_live_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.jsonl");
        let mut journal = Journal::open::<u32>(&path, |_| {}).unwrap();
        let many: Vec<u32> = (0..1500).collect();
        journal.append(&many).unwrap();
        assert!(!journal.compact_if_mostly_dead(1000, 0..1000u32).unwrap());
        assert!(journal
            .compact_if_mostly_dead(2, [7u32, 9].into_iter())
            .unwrap());
        journal.append(&[11u32]).unwrap();
        drop(journal);
        let mut seen = Vec::new();
        Journal::open::<u32>(&path, |n| seen.push(n)).unwrap();
        assert_eq!(seen, [7, 9, 11]);
    }
}
