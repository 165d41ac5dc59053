//! A journal: an append-only file of JSON lines beside the spool, in which
//! the local backend keeps what must outlive a restart besides the queue
//! (the suppression list, the answered idempotency keys).
//!
//! Each append is written and fsynced before the caller goes on. At start
//! the lines are replayed in order; an unreadable line is skipped, and a
//! torn last line (a crash mid-write) is cut off, so the next append starts
//! a line of its own. When most lines are dead the owner rewrites the
//! journal with what is live, through a new file renamed over the old one.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Dead lines tolerated on top of twice the live ones before a rewrite.
const SLACK: usize = 1000;

pub struct Journal {
    path: PathBuf,
    file: File,
    /// Lines in the file, live or dead.
    lines: usize,
}

impl Journal {
    /// Opens (or starts) the journal at `path` and hands each record to
    /// `replay`, oldest first.
    pub fn open<T: DeserializeOwned>(
        path: &Path,
        mut replay: impl FnMut(T),
    ) -> std::io::Result<Journal> {
        let mut lines = 0;
        let mut torn_at = None;
        match File::open(path) {
            Ok(file) => {
                let mut reader = BufReader::new(file);
                let mut line = Vec::new();
                let mut offset = 0u64;
                loop {
                    line.clear();
                    let read = reader.read_until(b'\n', &mut line)?;
                    if read == 0 {
                        break;
                    }
                    if line.last() != Some(&b'\n') {
                        torn_at = Some(offset);
                        break;
                    }
                    offset += read as u64;
                    lines += 1;
                    match serde_json::from_slice::<T>(&line) {
                        Ok(record) => replay(record),
                        Err(error) => tracing::warn!(
                            path = %path.display(),
                            line = lines,
                            %error,
                            "unreadable journal line skipped"
                        ),
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        if let Some(offset) = torn_at {
            tracing::warn!(path = %path.display(), line = lines + 1, "torn last journal line dropped");
            file.set_len(offset)?;
            file.sync_data()?;
        }
        Ok(Journal {
            path: path.to_path_buf(),
            file,
            lines,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `records`, one line each, and fsyncs.
    pub fn append<T: Serialize>(&mut self, records: &[T]) -> std::io::Result<()> {
        self.write(records)?;
        self.file.sync_data()
    }

    /// Appends `records` without a sync: durable once a handle from
    /// [`Journal::sync_handle`] has synced (or a later [`Journal::append`]).
    pub fn write<T: Serialize>(&mut self, records: &[T]) -> std::io::Result<()> {
        let mut buf = Vec::new();
        for record in records {
            serde_json::to_writer(&mut buf, record)?;
            buf.push(b'\n');
        }
        self.file.write_all(&buf)?;
        self.lines += records.len();
        Ok(())
    }

    /// A handle that syncs the file without holding the journal, so that
    /// writers go on appending while one of them syncs for all (group
    /// commit). After a rewrite it syncs the old file, harmlessly: the
    /// rewrite made the new one durable; take a new handle.
    pub fn sync_handle(&self) -> std::io::Result<File> {
        self.file.try_clone()
    }

    /// Whether the journal is worth rewriting when `live` records would
    /// be left: more than twice as many lines, and [`SLACK`] more.
    pub fn mostly_dead(&self, live: usize) -> bool {
        self.lines > 2 * live + SLACK
    }

    /// Replaces the journal with `records`: written to a new file, fsynced,
    /// renamed over the old one.
    pub fn rewrite<T: Serialize>(
        &mut self,
        records: impl IntoIterator<Item = T>,
    ) -> std::io::Result<()> {
        let new = self.path.with_extension("jsonl.new");
        let mut buf = Vec::new();
        let mut lines = 0;
        for record in records {
            serde_json::to_writer(&mut buf, &record)?;
            buf.push(b'\n');
            lines += 1;
        }
        let mut file = File::create(&new)?;
        file.write_all(&buf)?;
        file.sync_all()?;
        std::fs::rename(&new, &self.path)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        self.lines = lines;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(path: &Path) -> (Vec<u32>, Journal) {
        let mut seen = Vec::new();
        let journal = Journal::open(path, |n: u32| seen.push(n)).unwrap();
        (seen, journal)
    }

    #[test]
    fn records_come_back_in_order_and_a_torn_line_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.jsonl");
        let (seen, mut journal) = read(&path);
        assert!(seen.is_empty());
        journal.append(&[1u32, 2]).unwrap();
        journal.append(&[3u32]).unwrap();
        drop(journal);
        // An unreadable line is skipped; a torn last line is cut off.
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(b"\"x\"\n12").unwrap();
        let (seen, mut journal) = read(&path);
        assert_eq!(seen, [1, 2, 3]);
        // The next record starts a line of its own.
        journal.append(&[4u32]).unwrap();
        assert_eq!(read(&path).0, [1, 2, 3, 4]);
        assert_eq!(read(&path).1.lines, 5);
    }

    #[test]
    fn a_rewrite_keeps_only_what_it_is_given() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.jsonl");
        let (_, mut journal) = read(&path);
        let many: Vec<u32> = (0..SLACK as u32 + 10).collect();
        journal.append(&many).unwrap();
        assert!(journal.mostly_dead(1));
        assert!(!journal.mostly_dead(SLACK));
        journal.rewrite([7u32, 8]).unwrap();
        assert!(!journal.mostly_dead(0));
        journal.append(&[9u32]).unwrap();
        assert_eq!(read(&path).0, [7, 8, 9]);
        assert!(!path.with_extension("jsonl.new").exists());
    }
}
