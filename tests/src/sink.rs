//! A real SMTP server for the relay to deliver to: `tests/peers/sink.py`
//! (aiosmtpd) started on a loopback port, keeping every message it accepts
//! byte for byte, with scripted failures and connection counts.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde::Deserialize;

/// The Debian interpreter: python3-aiosmtpd imports only under it.
const PYTHON: &str = "/usr/bin/python3";
const START_TIMEOUT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(50);

/// How to start a sink. `SinkOptions::default()` is a plain sink on a free
/// port of 127.0.0.1 that accepts everything at once.
#[derive(Clone, Debug, Default)]
pub struct SinkOptions {
    /// The loopback address to listen on (127.0.0.x); 127.0.0.1 by default.
    pub ip: Option<Ipv4Addr>,
    /// The port; a free one by default.
    pub port: Option<u16>,
    /// Certificate and key (PEM): the sink offers STARTTLS.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Hide 8BITMIME from EHLO and refuse `BODY=8BITMIME`.
    pub no_8bitmime: bool,
    /// Hide SMTPUTF8 from EHLO and refuse the `SMTPUTF8` parameter.
    pub no_smtputf8: bool,
    /// Scripted replies (see `tests/peers/sink.py`), for example
    /// `json!({"rcpt": {"later@x.test": [451, 250]}, "data": [451, 250]})`.
    pub script: Option<serde_json::Value>,
    /// A pause before every reply, to hold connections open.
    pub delay: Duration,
    /// A pause before the reply to each message's end of data: a slow
    /// receiver, whose time goes to messages, not to commands.
    pub data_delay: Duration,
}

impl SinkOptions {
    pub fn ip(mut self, ip: Ipv4Addr) -> Self {
        self.ip = Some(ip);
        self
    }

    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    pub fn tls(mut self, cert: &Path, key: &Path) -> Self {
        self.tls = Some((cert.to_path_buf(), key.to_path_buf()));
        self
    }

    pub fn no_8bitmime(mut self) -> Self {
        self.no_8bitmime = true;
        self
    }

    pub fn no_smtputf8(mut self) -> Self {
        self.no_smtputf8 = true;
        self
    }

    pub fn script(mut self, script: serde_json::Value) -> Self {
        self.script = Some(script);
        self
    }

    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    pub fn data_delay(mut self, delay: Duration) -> Self {
        self.data_delay = delay;
        self
    }
}

/// One message the sink accepted.
#[derive(Clone, Debug, Deserialize)]
pub struct ReceivedMessage {
    /// The reverse path, `""` for `MAIL FROM:<>`.
    pub mail_from: String,
    pub rcpt_tos: Vec<String>,
    /// `ip:port` of the client.
    pub peer: String,
    /// Whether the message came over STARTTLS.
    pub tls: bool,
    /// The name the client gave in EHLO/HELO.
    pub helo: Option<String>,
    /// MAIL parameters as sent, upper-cased (`BODY=8BITMIME`, `SIZE=…`).
    pub mail_options: Vec<String>,
    /// RCPT parameters by recipient.
    pub rcpt_options: BTreeMap<String, Vec<String>>,
    /// The DATA bytes, dot-unstuffed, CRLF line ends as received.
    #[serde(skip)]
    pub body: Vec<u8>,
    eml: String,
}

impl ReceivedMessage {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The value of the first header `name` (unfolded), if any.
    pub fn header(&self, name: &str) -> Option<String> {
        let text = self.text();
        let head = text.split("\r\n\r\n").next().unwrap_or("");
        let mut value: Option<String> = None;
        for line in head.split("\r\n") {
            match &mut value {
                Some(v) if line.starts_with([' ', '\t']) => v.push_str(line),
                Some(_) => break,
                None => {
                    if let Some((n, v)) = line.split_once(':') {
                        if n.eq_ignore_ascii_case(name) {
                            value = Some(v.trim_start().to_string());
                        }
                    }
                }
            }
        }
        value.map(|v| v.trim_end().to_string())
    }

    /// The body without its first `Received:` header field (with its
    /// continuation lines): what the relay was handed, when the relay only
    /// prepends its trace header.
    pub fn without_first_received(&self) -> &[u8] {
        strip_first_received(&self.body)
    }
}

/// `data` without the first `Received:` header field and its folded lines;
/// `data` unchanged when its header has none.
pub fn strip_first_received(data: &[u8]) -> &[u8] {
    let mut start = 0;
    while start < data.len() {
        let end = find_crlf(data, start).map_or(data.len(), |i| i + 2);
        let line = &data[start..end];
        if line == b"\r\n" {
            return data; // end of the header: no Received: field
        }
        if line.len() >= 9 && line[..9].eq_ignore_ascii_case(b"received:") {
            let mut next = end;
            while next < data.len() && matches!(data[next], b' ' | b'\t') {
                next = find_crlf(data, next).map_or(data.len(), |i| i + 2);
            }
            // Only the relay's own field is expected first; keep the rest.
            return if start == 0 { &data[next..] } else { data };
        }
        start = end;
    }
    data
}

fn find_crlf(data: &[u8], from: usize) -> Option<usize> {
    data[from..]
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|i| from + i)
}

/// The sink's connection counts (`DIR/stats.json`).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct SinkStats {
    pub connections_total: u64,
    pub connections_open: u64,
    pub peak_concurrent: u64,
    /// By the domain of each connection's first RCPT.
    pub peak_concurrent_by_domain: BTreeMap<String, u64>,
    pub messages: u64,
}

pub struct Sink {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Sink {
    /// Starts a sink and waits (at most 20 s) until it listens.
    pub fn start(options: SinkOptions) -> Sink {
        check_python();
        let dir = tempfile::tempdir().expect("temp dir");
        let ip = options.ip.unwrap_or(Ipv4Addr::LOCALHOST);
        assert!(ip.is_loopback(), "sinks listen on 127.0.0.0/8 only");
        let port = options.port.unwrap_or_else(|| free_port_on(ip));
        let addr = SocketAddr::from((ip, port));
        let messages = dir.path().join("messages");

        let mut command = Command::new(PYTHON);
        command
            .arg(script_path())
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--dir")
            .arg(&messages);
        if let Some((cert, key)) = &options.tls {
            command
                .arg("--tls-cert")
                .arg(cert)
                .arg("--tls-key")
                .arg(key);
        }
        if options.no_8bitmime {
            command.arg("--no-8bitmime");
        }
        if options.no_smtputf8 {
            command.arg("--no-smtputf8");
        }
        if let Some(script) = &options.script {
            let file = dir.path().join("script.json");
            std::fs::write(&file, script.to_string()).expect("write the sink script");
            command.arg("--script").arg(file);
        }
        if !options.delay.is_zero() {
            command.arg(format!("--delay-ms={}", options.delay.as_millis()));
        }
        if !options.data_delay.is_zero() {
            command.arg(format!(
                "--data-delay-ms={}",
                options.data_delay.as_millis()
            ));
        }
        let stderr = std::fs::File::create(dir.path().join("stderr")).expect("sink log");
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {PYTHON} {}: {e}", script_path().display()));

        let stdout = child.stdout.take().expect("sink stdout");
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                match line {
                    Ok(line) if line.trim() == "READY" => {
                        let _ = ready_tx.send(());
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        });
        let sink = Sink { child, addr, dir };
        if ready_rx.recv_timeout(START_TIMEOUT).is_err() {
            panic!(
                "the SMTP sink did not print READY on {addr} within {START_TIMEOUT:?}:\n{}",
                sink.log()
            );
        }
        sink
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `"[127.0.0.1]:PORT"`, the form of a `smart_host` setting.
    pub fn smart_host(&self) -> String {
        format!("[{}]:{}", self.addr.ip(), self.addr.port())
    }

    /// Every message accepted so far, in the order they were accepted.
    pub fn messages(&self) -> Vec<ReceivedMessage> {
        let dir = self.dir.path().join("messages");
        let mut numbered: Vec<(u64, PathBuf)> = std::fs::read_dir(&dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "json"))
                    .filter_map(|p| Some((p.file_stem()?.to_str()?.parse().ok()?, p)))
                    .collect()
            })
            .unwrap_or_default();
        numbered.sort();
        numbered
            .into_iter()
            .map(|(_, path)| {
                let text = std::fs::read_to_string(&path).expect("read a message record");
                let mut message: ReceivedMessage =
                    serde_json::from_str(&text).expect("a message record");
                message.body = std::fs::read(dir.join(&message.eml)).expect("read a message");
                message
            })
            .collect()
    }

    /// Waits (polling, at most `timeout`) until at least `n` messages
    /// arrived and returns them all; panics with what did arrive otherwise.
    #[track_caller]
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Vec<ReceivedMessage> {
        let deadline = Instant::now() + timeout;
        loop {
            let messages = self.messages();
            if messages.len() >= n {
                return messages;
            }
            if Instant::now() >= deadline {
                panic!(
                    "the sink on {} got {} of {n} messages within {timeout:?}; stats {:?}",
                    self.addr,
                    messages.len(),
                    self.stats()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits (at most `timeout`) for `count` messages, then a second more
    /// for late duplicates; panics unless each subject arrived exactly once.
    #[track_caller]
    pub fn assert_each_subject_once(&self, count: usize, timeout: Duration) {
        self.wait_for(count, timeout);
        // A message sent twice would arrive soon after the last one.
        std::thread::sleep(Duration::from_secs(1));
        let subjects: Vec<String> = self
            .messages()
            .iter()
            .filter_map(|m| m.header("Subject"))
            .collect();
        let unique: std::collections::BTreeSet<&String> = subjects.iter().collect();
        assert_eq!(unique.len(), count, "every message arrives: {subjects:?}");
        assert_eq!(subjects.len(), count, "and only once: {subjects:?}");
    }

    /// Connection counts so far.
    pub fn stats(&self) -> SinkStats {
        let path = self.dir.path().join("messages").join("stats.json");
        std::fs::read_to_string(path)
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default()
    }

    /// What the sink wrote to stderr (aiosmtpd logs, tracebacks).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log();
            if !log.is_empty() {
                eprintln!("--- sink {} log ---\n{log}", self.addr);
            }
        }
    }
}

/// `tests/peers/sink.py` in this crate.
pub fn script_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/sink.py")
}

pub use smarthost_testkit::free_port_on;

fn check_python() {
    static CHECKED: OnceLock<Result<(), String>> = OnceLock::new();
    let result = CHECKED.get_or_init(|| {
        let output = Command::new(PYTHON)
            .args(["-c", "import aiosmtpd"])
            .output()
            .map_err(|e| format!("cannot run {PYTHON}: {e}"))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&output.stderr).trim().to_string())
        }
    });
    if let Err(e) = result {
        panic!(
            "the SMTP sink needs aiosmtpd under {PYTHON} ({e}); \
             scripts/test.sh installs python3-aiosmtpd"
        );
    }
}
