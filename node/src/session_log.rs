//! The SMTP session log in the W3C Extended Log File Format, as the IIS
//! SMTP Service wrote it: one line per command and its final reply, one
//! file per UTC day (`smtp-YYYYMMDD.log` in `log.session_log_dir`), each
//! starting with the `#Software`, `#Version`, `#Date` and `#Fields`
//! directives. Sessions hand lines to one writer task through a bounded
//! channel and never wait for the disk; lines that find it full are
//! counted and dropped, which the writer reports.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;

/// The fields of every line, in order.
pub const FIELDS: &str = "date time c-ip cs-username s-sitename s-computername s-ip s-port \
                          cs-method cs-uri-query sc-status sc-bytes cs-bytes time-taken";

/// `s-sitename`: IIS named its SMTP virtual servers `SMTPSVC1`, ….
const SITE: &str = "smarthost";

/// Lines waiting for the writer; more are dropped.
const QUEUE: usize = 10_000;

/// One command and its final reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub at: SystemTime,
    pub client: IpAddr,
    pub user: Option<String>,
    pub server: SocketAddr,
    pub verb: String,
    pub args: String,
    pub status: u16,
    /// Octets of the reply.
    pub sent: u64,
    /// Octets of the command (of the message, for DATA).
    pub received: u64,
    pub took: Duration,
}

/// `YYYY-MM-DD` and `HH:MM:SS` of `at`, in UTC.
fn date_and_time(at: SystemTime) -> (String, String) {
    let stamp = humantime::format_rfc3339_seconds(at).to_string();
    let (date, time) = stamp.split_once('T').unwrap_or((&stamp, "00:00:00Z"));
    (date.to_string(), time.trim_end_matches('Z').to_string())
}

/// A field value: `-` when empty, a space as `+` (as IIS wrote them), and
/// every other octet outside printable ASCII as `%XX`, so that a client
/// can neither split a field nor forge a line.
fn field(text: &str) -> String {
    if text.is_empty() {
        return "-".to_string();
    }
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b' ' => out.push('+'),
            b'%' | b'+' => out.push_str(&format!("%{byte:02X}")),
            0x21..=0x7e => out.push(byte as char),
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

/// The line of `entry`, with its line ending.
pub fn line(entry: &Entry, computer: &str) -> String {
    let (date, time) = date_and_time(entry.at);
    format!(
        "{date} {time} {} {} {SITE} {} {} {} {} {} {} {} {} {}\r\n",
        entry.client,
        field(entry.user.as_deref().unwrap_or_default()),
        field(computer),
        entry.server.ip(),
        entry.server.port(),
        field(&entry.verb),
        field(&entry.args),
        entry.status,
        entry.sent,
        entry.received,
        entry.took.as_millis(),
    )
}

/// The directives that open a file created at `at`.
pub fn header(at: SystemTime) -> String {
    let (date, time) = date_and_time(at);
    format!(
        "#Software: smarthost {}\r\n#Version: 1.0\r\n#Date: {date} {time}\r\n#Fields: {FIELDS}\r\n",
        env!("CARGO_PKG_VERSION")
    )
}

/// The file of the UTC day of `at`.
pub fn file_name(at: SystemTime) -> String {
    let (date, _) = date_and_time(at);
    format!("smtp-{}.log", date.replace('-', ""))
}

/// Where sessions hand their lines.
#[derive(Clone)]
pub struct SessionLog {
    lines: mpsc::Sender<Entry>,
    dropped: Arc<AtomicU64>,
}

impl SessionLog {
    /// Starts the writer task for `dir` (created if missing) on the
    /// current runtime; `computer` is `s-computername`.
    pub fn start(dir: &Path, computer: &str) -> std::io::Result<SessionLog> {
        std::fs::create_dir_all(dir)?;
        let (lines, received) = mpsc::channel(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let writer = Writer {
            dir: dir.to_path_buf(),
            computer: computer.to_string(),
            file: None,
            dropped: dropped.clone(),
        };
        tokio::spawn(writer.run(received));
        Ok(SessionLog { lines, dropped })
    }

    /// Queues `entry` for the file; never waits.
    pub fn record(&self, entry: Entry) {
        if self.lines.try_send(entry).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The one task that writes the files.
struct Writer {
    dir: PathBuf,
    computer: String,
    /// The open file and its name.
    file: Option<(String, BufWriter<File>)>,
    dropped: Arc<AtomicU64>,
}

impl Writer {
    async fn run(mut self, mut received: mpsc::Receiver<Entry>) {
        let mut batch = Vec::new();
        while received.recv_many(&mut batch, 256).await > 0 {
            let lines = std::mem::take(&mut batch);
            // Files are small writes to a buffered file: the blocking pool
            // keeps them off the sessions' threads.
            let dir = self.dir.clone();
            self = match tokio::task::spawn_blocking(move || {
                let mut writer = self;
                if let Err(error) = writer.write(&lines) {
                    tracing::warn!(dir = %dir.display(), %error, "cannot write the SMTP session log");
                    writer.file = None;
                }
                writer
            })
            .await
            {
                Ok(writer) => writer,
                Err(_) => return,
            };
            let dropped = self.dropped.swap(0, Ordering::Relaxed);
            if dropped > 0 {
                tracing::warn!(
                    lines = dropped,
                    "SMTP session log lines dropped: the writer fell behind"
                );
            }
        }
    }

    fn write(&mut self, entries: &[Entry]) -> std::io::Result<()> {
        for entry in entries {
            let name = file_name(entry.at);
            if self.file.as_ref().is_none_or(|(open, _)| *open != name) {
                self.open(name, entry.at)?;
            }
            let (_, file) = self.file.as_mut().expect("opened above");
            file.write_all(line(entry, &self.computer).as_bytes())?;
        }
        if let Some((_, file)) = &mut self.file {
            file.flush()?;
        }
        Ok(())
    }

    /// Opens (appends to) the day's file; a new file gets the directives.
    fn open(&mut self, name: String, at: SystemTime) -> std::io::Result<()> {
        if let Some((_, mut old)) = self.file.take() {
            old.flush()?;
        }
        let path = self.dir.join(&name);
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let mut file = BufWriter::new(file);
        if file.get_ref().metadata()?.len() == 0 {
            file.write_all(header(at).as_bytes())?;
        }
        self.file = Some((name, file));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(verb: &str, args: &str) -> Entry {
        Entry {
            // 2026-12-02 23:59:58 UTC
            at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_255_998),
            client: "192.0.2.7".parse().unwrap(),
            user: None,
            server: "198.51.100.1:25".parse().unwrap(),
            verb: verb.into(),
            args: args.into(),
            status: 250,
            sent: 30,
            received: 24,
            took: Duration::from_millis(12),
        }
    }

    #[test]
    fn lines_have_every_field_and_no_client_can_split_or_forge_one() {
        let table = [
            (
                entry("MAIL", "FROM:<a@b.example> SIZE=10"),
                "2026-12-02 23:59:58 192.0.2.7 - smarthost relay.test 198.51.100.1 25 \
                 MAIL FROM:<a@b.example>+SIZE=10 250 30 24 12\r\n",
            ),
            (
                Entry {
                    user: Some("app user".into()),
                    ..entry("QUIT", "")
                },
                "2026-12-02 23:59:58 192.0.2.7 app+user smarthost relay.test 198.51.100.1 25 \
                 QUIT - 250 30 24 12\r\n",
            ),
            (
                entry("RCPT", "TO:<x>\r\n2026-12-02 fake 100%+"),
                "2026-12-02 23:59:58 192.0.2.7 - smarthost relay.test 198.51.100.1 25 \
                 RCPT TO:<x>%0D%0A2026-12-02+fake+100%25%2B 250 30 24 12\r\n",
            ),
            (
                entry("EHLO", "jörg"),
                "2026-12-02 23:59:58 192.0.2.7 - smarthost relay.test 198.51.100.1 25 \
                 EHLO j%C3%B6rg 250 30 24 12\r\n",
            ),
        ];
        for (entry, want) in table {
            let got = line(&entry, "relay.test");
            assert_eq!(got, want);
            assert_eq!(got.split(' ').count(), FIELDS.split(' ').count(), "{got}");
        }
    }

    #[test]
    fn a_file_per_utc_day_opens_with_the_directives() {
        let at = entry("QUIT", "").at;
        assert_eq!(file_name(at), "smtp-20261202.log");
        assert_eq!(file_name(at + Duration::from_secs(2)), "smtp-20261203.log");
        let header = header(at);
        let lines: Vec<&str> = header.split("\r\n").collect();
        assert!(lines[0].starts_with("#Software: smarthost "));
        assert_eq!(lines[1], "#Version: 1.0");
        assert_eq!(lines[2], "#Date: 2026-12-02 23:59:58");
        assert_eq!(lines[3], format!("#Fields: {FIELDS}"));
    }

    #[tokio::test]
    async fn the_writer_rolls_over_at_midnight_and_appends_to_an_existing_day() {
        let dir = tempfile::tempdir().unwrap();
        let log = SessionLog::start(dir.path(), "relay.test").unwrap();
        let before = entry("EHLO", "a.example");
        let after = Entry {
            at: before.at + Duration::from_secs(5),
            ..entry("QUIT", "")
        };
        log.record(before.clone());
        log.record(after.clone());
        // A second writer (a restart) appends below the same directives.
        let again = SessionLog::start(dir.path(), "relay.test").unwrap();
        let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap_or_default();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !read("smtp-20261203.log").contains("QUIT") {
            assert!(std::time::Instant::now() < deadline, "never written");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        again.record(before.clone());
        while read("smtp-20261202.log").matches("EHLO").count() < 2 {
            assert!(std::time::Instant::now() < deadline, "never appended");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let first = read("smtp-20261202.log");
        assert_eq!(first.matches("#Fields:").count(), 1, "{first}");
        assert!(first.starts_with("#Software: smarthost "), "{first}");
        let second = read("smtp-20261203.log");
        assert!(second.starts_with("#Software: smarthost "), "{second}");
        assert!(second.ends_with("QUIT - 250 30 24 12\r\n"), "{second}");
    }
}
