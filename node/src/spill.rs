//! Large message bodies go to disk while they arrive.
//!
//! A session keeps the body of the message under way in memory until one
//! more read could take it to `smtp.body_spill_threshold`; then what it
//! holds is appended to a nameless file in `smtp.body_spill_dir` and it
//! starts again from nothing, so a session never holds more than the
//! threshold whatever the size of its message. The spool then copies the file into its own
//! storage a chunk at a time ([`crate::spool::Body`]). The file has no name:
//! it goes away when the message is stored or refused, and when the process
//! dies, so a crash leaves nothing to clean up.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::spool::Body;

/// Where and from what size bodies are spilled.
#[derive(Clone, Debug)]
pub struct SpillConfig {
    pub dir: PathBuf,
    /// Bodies are spilled once this many of their bytes are held.
    pub threshold: u64,
}

impl SpillConfig {
    /// Creates the directory and a file in it, so that a directory that
    /// cannot take bodies stops the node at start rather than failing
    /// large messages later.
    pub fn check(&self) -> Result<(), String> {
        std::fs::create_dir_all(&self.dir)
            .and_then(|()| tempfile::tempfile_in(&self.dir).map(drop))
            .map_err(|e| {
                format!(
                    "smtp.body_spill_dir: cannot write message bodies to {}: {e}",
                    self.dir.display()
                )
            })
    }
}

/// The part of the message under way already on disk.
#[derive(Debug)]
pub struct Spill {
    /// Shared only with the write under way.
    file: Arc<File>,
    len: u64,
}

impl Spill {
    /// A new, nameless file in `dir`.
    pub async fn create(dir: &Path) -> std::io::Result<Spill> {
        let dir = dir.to_path_buf();
        let file = tokio::task::spawn_blocking(move || tempfile::tempfile_in(dir))
            .await
            .map_err(std::io::Error::other)??;
        Ok(Spill {
            file: Arc::new(file),
            len: 0,
        })
    }

    /// Writes `bytes` after what is there, without copying them, and
    /// hands the buffer back for reuse.
    pub async fn append(&mut self, bytes: Vec<u8>) -> std::io::Result<Vec<u8>> {
        let (file, at, len) = (self.file.clone(), self.len, bytes.len());
        let bytes =
            tokio::task::spawn_blocking(move || file.write_all_at(&bytes, at).map(|()| bytes))
                .await
                .map_err(std::io::Error::other)??;
        self.len += len as u64;
        crate::metrics::body_spilled(len);
        Ok(bytes)
    }

    /// The whole body, on disk: what was spilled and the `tail` received
    /// after it.
    pub async fn finish(mut self, tail: Vec<u8>) -> std::io::Result<Body> {
        drop(self.append(tail).await?);
        let file = Arc::try_unwrap(self.file)
            .map_err(|_| std::io::Error::other("the spill file is still being written"))?;
        Ok(Body::spilled(Vec::new(), file, self.len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_spilled_body_reads_back_whole_and_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let config = SpillConfig {
            dir: dir.path().join("incoming"),
            threshold: 10,
        };
        config.check().unwrap();
        let mut spill = Spill::create(&config.dir).await.unwrap();
        let mut expected = Vec::new();
        for n in 0..2000u32 {
            let line = format!("line {n} of a message that goes to disk\r\n");
            spill.append(line.clone().into_bytes()).await.unwrap();
            expected.extend_from_slice(line.as_bytes());
        }
        expected.extend_from_slice(b"the end\r\n");
        let body = spill.finish(b"the end\r\n".to_vec()).await.unwrap();
        assert!(body.rest().is_some(), "spilled");
        assert_eq!(body.len(), expected.len() as u64);
        assert_eq!(body.to_vec().unwrap(), expected);
        let mut chunks = 0;
        let mut gathered = Vec::new();
        body.for_each_chunk(|chunk| {
            chunks += 1;
            gathered.extend_from_slice(chunk);
            Ok(())
        })
        .unwrap();
        assert_eq!(gathered, expected);
        assert!(chunks >= 2, "read in chunks");
        let left: Vec<_> = std::fs::read_dir(&config.dir).unwrap().collect();
        assert!(left.is_empty(), "the file has no name: {left:?}");
    }

    #[test]
    fn a_directory_that_cannot_be_written_is_refused_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"x").unwrap();
        let config = SpillConfig {
            dir: file.join("incoming"),
            threshold: 10,
        };
        let error = config.check().unwrap_err();
        assert!(
            error.starts_with("smtp.body_spill_dir: cannot write"),
            "{error}"
        );
    }
}
