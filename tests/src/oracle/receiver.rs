//! The scripted receivers: one real SMTP server per domain on a loopback
//! port, answering each recipient as its address says (see
//! [`super::workload::Fate`]), and one for the senders' domain that takes
//! every report. Each keeps what it accepted: the message's `X-Oracle-Id`,
//! the accepted recipients and a digest of the bytes, and for reports the
//! parsed delivery status. Plain threads and blocking sockets: exact
//! control over when a reply is sent or the connection is dropped.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use mail_parser::{MessageParser, MimeHeaders, PartType};

use super::workload::{digest, fate_of, Fate, SENDER_DOMAIN};
use crate::sink::strip_first_received;

/// A session idle this long is dropped.
const IDLE: Duration = Duration::from_secs(60);
/// The longest command or DATA line read.
const MAX_LINE: usize = 64 * 1024;

/// One message a receiver accepted (the `250` to the final dot is sent
/// after it is recorded, so a lost `250` shows as a duplicate).
#[derive(Clone, Debug)]
pub struct Arrival {
    /// The domain the receiver serves.
    pub domain: String,
    /// `""` for `<>`.
    pub mail_from: String,
    /// The recipients this transaction accepted, lower case.
    pub rcpts: Vec<String>,
    pub oracle_id: Option<String>,
    /// [`digest`] of the bytes without the relay's `Received:` field.
    pub digest: u64,
    pub size: usize,
    /// When it arrived, from the start of the run.
    pub at: Duration,
    /// For the senders' domain: the report, parsed.
    pub report: Option<Result<Report, String>>,
}

/// What a delivery status notification says.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// `Original-Envelope-Id`.
    pub envid: Option<String>,
    /// `X-Oracle-Id` in the returned header section.
    pub oracle_id: Option<String>,
    /// `(final recipient, action, status)`, lower case.
    pub recipients: Vec<(String, String, String)>,
    /// In a double bounce (a notice to the postmaster), the failed report
    /// it returns, when it returns one.
    pub inner: Option<Box<Report>>,
}

/// A recipient the relay sent that no fate can be read from.
#[derive(Clone, Debug)]
pub struct Stray {
    pub domain: String,
    pub line: String,
}

#[derive(Default)]
struct Counters {
    rcpt: u32,
    close: u32,
    mid: u32,
    data: u32,
}

struct Shared {
    start: Instant,
    counters: Mutex<HashMap<String, Counters>>,
    arrivals: Mutex<Vec<Arrival>>,
    strays: Mutex<Vec<Stray>>,
    stopping: AtomicBool,
    open: Mutex<Vec<TcpStream>>,
    connections: AtomicU64,
}

/// The receivers of one run.
pub struct Receivers {
    shared: Arc<Shared>,
    addrs: Vec<(String, SocketAddr)>,
    accepting: Vec<thread::JoinHandle<()>>,
}

impl Receivers {
    /// A receiver for each of `domains` and one for the senders' domain,
    /// each on a free port of 127.0.0.1.
    pub fn start(domains: &[String], start: Instant) -> Receivers {
        let shared = Arc::new(Shared {
            start,
            counters: Mutex::default(),
            arrivals: Mutex::default(),
            strays: Mutex::default(),
            stopping: AtomicBool::new(false),
            open: Mutex::default(),
            connections: AtomicU64::new(0),
        });
        let mut addrs = Vec::new();
        let mut accepting = Vec::new();
        for domain in domains.iter().cloned().chain([SENDER_DOMAIN.to_string()]) {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind a receiver");
            addrs.push((domain.clone(), listener.local_addr().unwrap()));
            let shared = shared.clone();
            accepting.push(thread::spawn(move || accept_loop(listener, domain, shared)));
        }
        Receivers {
            shared,
            addrs,
            accepting,
        }
    }

    /// `(domain, address)` of every receiver, the senders' domain last.
    pub fn addrs(&self) -> &[(String, SocketAddr)] {
        &self.addrs
    }

    pub fn arrivals(&self) -> Vec<Arrival> {
        self.shared.arrivals.lock().unwrap().clone()
    }

    pub fn strays(&self) -> Vec<Stray> {
        self.shared.strays.lock().unwrap().clone()
    }

    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::Relaxed)
    }
}

impl Drop for Receivers {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        for (_, addr) in &self.addrs {
            let _ = TcpStream::connect_timeout(addr, Duration::from_secs(1));
        }
        for socket in self.shared.open.lock().unwrap().drain(..) {
            let _ = socket.shutdown(Shutdown::Both);
        }
        for handle in self.accepting.drain(..) {
            let _ = handle.join();
        }
    }
}

fn accept_loop(listener: TcpListener, domain: String, shared: Arc<Shared>) {
    for socket in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(socket) = socket else { continue };
        shared.connections.fetch_add(1, Ordering::Relaxed);
        if let Ok(clone) = socket.try_clone() {
            let mut open = shared.open.lock().unwrap();
            open.retain(|s| s.peer_addr().is_ok());
            open.push(clone);
        }
        let shared = shared.clone();
        let domain = domain.clone();
        thread::spawn(move || {
            let _ = Session::new(socket, domain, shared).and_then(Session::run);
        });
    }
}

struct Session {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    domain: String,
    shared: Arc<Shared>,
    mail_from: Option<String>,
    rcpts: Vec<String>,
}

/// Why a session ended early: the connection broke or was closed on purpose.
type Ended = std::io::Result<()>;

impl Session {
    fn new(socket: TcpStream, domain: String, shared: Arc<Shared>) -> std::io::Result<Session> {
        socket.set_read_timeout(Some(IDLE))?;
        socket.set_nodelay(true)?;
        Ok(Session {
            reader: BufReader::new(socket.try_clone()?),
            writer: socket,
            domain,
            shared,
            mail_from: None,
            rcpts: Vec::new(),
        })
    }

    fn reply(&mut self, line: &str) -> std::io::Result<()> {
        self.writer.write_all(format!("{line}\r\n").as_bytes())
    }

    fn close(&mut self) -> Ended {
        let _ = self.writer.shutdown(Shutdown::Both);
        Ok(())
    }

    fn read_line(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        let mut line = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut line)?;
        Ok((n > 0).then_some(line))
    }

    fn run(mut self) -> Ended {
        self.reply(&format!("220 {} ESMTP oracle receiver", self.domain))?;
        while let Some(line) = self.read_line()? {
            let text = String::from_utf8_lossy(&line).trim_end().to_string();
            let verb = text
                .split([' ', ':'])
                .next()
                .unwrap_or("")
                .to_ascii_uppercase();
            match verb.as_str() {
                "EHLO" => self.reply(&format!(
                    "250-{}\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 SIZE 50000000",
                    self.domain
                ))?,
                "HELO" => self.reply(&format!("250 {}", self.domain))?,
                "MAIL" => {
                    self.mail_from = Some(path_of(&text).to_string());
                    self.rcpts.clear();
                    self.reply("250 2.1.0 OK")?;
                }
                "RCPT" => {
                    if self.rcpt(&text)? {
                        return self.close();
                    }
                }
                "DATA" => {
                    if self.data()? {
                        return self.close();
                    }
                }
                "RSET" => {
                    self.mail_from = None;
                    self.rcpts.clear();
                    self.reply("250 2.0.0 OK")?;
                }
                "NOOP" => self.reply("250 2.0.0 OK")?,
                "QUIT" => {
                    self.reply("221 2.0.0 Bye")?;
                    return self.close();
                }
                _ => self.reply("502 5.5.2 Not implemented")?,
            }
        }
        Ok(())
    }

    /// Answers one RCPT by the address's fate; `true`: close now.
    fn rcpt(&mut self, text: &str) -> std::io::Result<bool> {
        let address = path_of(text).to_ascii_lowercase();
        if self.mail_from.is_none() {
            self.reply("503 5.5.1 MAIL first")?;
            return Ok(false);
        }
        if self.domain == SENDER_DOMAIN {
            self.rcpts.push(address);
            self.reply("250 2.1.5 OK")?;
            return Ok(false);
        }
        let ours = address.ends_with(&format!("@{}", self.domain));
        let Some(fate) = fate_of(&address).filter(|_| ours) else {
            self.shared.strays.lock().unwrap().push(Stray {
                domain: self.domain.clone(),
                line: text.to_string(),
            });
            self.reply("550 5.1.1 No such recipient here")?;
            return Ok(false);
        };
        let (rcpts, closes) = {
            let mut counters = self.shared.counters.lock().unwrap();
            let c = counters.entry(address.clone()).or_default();
            c.rcpt += 1;
            let closes = matches!(fate, Fate::Close(n) if c.close < n);
            if closes {
                c.close += 1;
            }
            (c.rcpt, closes)
        };
        let reply = match fate {
            _ if closes => {
                self.reply("421 4.3.2 Closing for now (scripted)")?;
                return Ok(true);
            }
            Fate::Slow(ms) => {
                thread::sleep(Duration::from_millis(ms as u64));
                "250 2.1.5 OK, slowly"
            }
            Fate::Temp(n) if rcpts <= n => "451 4.3.0 Try again later (scripted)",
            Fate::TempForever => "451 4.3.0 Try again later, for ever (scripted)",
            Fate::Perm => "550 5.1.1 No such mailbox (scripted)",
            _ => "250 2.1.5 OK",
        };
        if reply.starts_with('2') {
            self.rcpts.push(address);
        }
        self.reply(reply)?;
        Ok(false)
    }

    /// Takes DATA; `true`: close now (a scripted break mid-DATA).
    fn data(&mut self) -> std::io::Result<bool> {
        if self.mail_from.is_none() || self.rcpts.is_empty() {
            self.reply("554 5.5.1 No valid recipients")?;
            return Ok(false);
        }
        let (breaks, refuses) = {
            let mut counters = self.shared.counters.lock().unwrap();
            let mut breaks = false;
            let mut refuses = false;
            for rcpt in &self.rcpts {
                let c = counters.entry(rcpt.clone()).or_default();
                match fate_of(rcpt) {
                    Some(Fate::MidData(n)) if c.mid < n => {
                        c.mid += 1;
                        breaks = true;
                    }
                    Some(Fate::DataTemp(n)) if c.data < n => {
                        c.data += 1;
                        refuses = true;
                    }
                    _ => {}
                }
            }
            (breaks, refuses)
        };
        self.reply("354 Go ahead")?;
        if breaks {
            // Take a little of the message, then drop the connection.
            let _ = self.read_line()?;
            return Ok(true);
        }
        let mut body = Vec::new();
        loop {
            let Some(line) = self.read_line()? else {
                return Ok(true); // the relay went away mid-DATA
            };
            if line == b".\r\n" {
                break;
            }
            let line = line.strip_prefix(b".").unwrap_or(&line);
            body.extend_from_slice(line);
        }
        if refuses {
            self.reply("451 4.3.0 Not now (scripted)")?;
        } else {
            self.record(&body);
            self.reply("250 2.0.0 OK: kept")?;
        }
        self.mail_from = None;
        self.rcpts.clear();
        Ok(false)
    }

    fn record(&self, body: &[u8]) {
        let content = strip_first_received(body);
        let arrival = Arrival {
            domain: self.domain.clone(),
            mail_from: self.mail_from.clone().unwrap_or_default(),
            rcpts: self.rcpts.clone(),
            oracle_id: header(content, "X-Oracle-Id"),
            digest: digest(content),
            size: body.len(),
            at: self.shared.start.elapsed(),
            report: (self.domain == SENDER_DOMAIN).then(|| parse_report(body)),
        };
        self.shared.arrivals.lock().unwrap().push(arrival);
    }
}

/// The path of `MAIL FROM:<...>` or `RCPT TO:<...>`, without brackets.
fn path_of(line: &str) -> &str {
    let start = line.find('<').map_or(0, |i| i + 1);
    let end = line[start..].find('>').map_or(line.len(), |i| start + i);
    &line[start..end]
}

/// The first `name:` field of the header section of `data` (unfolded).
fn header(data: &[u8], name: &str) -> Option<String> {
    let text = String::from_utf8_lossy(data);
    let head = text.split("\r\n\r\n").next()?;
    head.split("\r\n").find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
    })
}

/// Reads a report: its `message/delivery-status` part and the
/// `X-Oracle-Id` of the returned header section.
pub fn parse_report(body: &[u8]) -> Result<Report, String> {
    let parsed = MessageParser::default()
        .parse(body)
        .ok_or("not a parsable message")?;
    let status = parsed
        .parts
        .iter()
        .find(|p| {
            p.content_type().is_some_and(|c| {
                c.ctype().eq_ignore_ascii_case("message")
                    && c.subtype()
                        .is_some_and(|s| s.eq_ignore_ascii_case("delivery-status"))
            })
        })
        .ok_or("no message/delivery-status part")?;
    let text = String::from_utf8_lossy(status.contents()).replace("\r\n", "\n");
    let mut report = Report {
        inner: parsed.parts.iter().find_map(|p| match &p.body {
            PartType::Message(returned) => parse_report(returned.raw_message()).ok().map(Box::new),
            _ => None,
        }),
        ..Report::default()
    };
    for (i, block) in text.split("\n\n").enumerate() {
        let mut fields: HashMap<String, String> = HashMap::new();
        for line in block.lines() {
            if let Some((k, v)) = line.split_once(':') {
                fields.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        if i == 0 {
            report.envid = fields.get("original-envelope-id").cloned();
            continue;
        }
        let Some(recipient) = fields.get("final-recipient") else {
            continue;
        };
        let address = recipient
            .split_once(';')
            .map_or(recipient.as_str(), |(_, a)| a)
            .trim()
            .to_ascii_lowercase();
        report.recipients.push((
            address,
            fields
                .get("action")
                .cloned()
                .unwrap_or_default()
                .to_ascii_lowercase(),
            fields.get("status").cloned().unwrap_or_default(),
        ));
    }
    // The returned header section follows the status part.
    let raw = String::from_utf8_lossy(body);
    report.oracle_id = raw.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("X-Oracle-Id")
            .then(|| value.trim().to_string())
    });
    if report.recipients.is_empty() {
        return Err("a report without recipients".into());
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_names_its_message_and_recipients() {
        let body = "From: <>\r\nTo: s1@bounce.test\r\nMIME-Version: 1.0\r\n\
            Content-Type: multipart/report; report-type=delivery-status; boundary=\"b\"\r\n\r\n\
            --b\r\nContent-Type: text/plain\r\n\r\nSorry.\r\n\
            --b\r\nContent-Type: message/delivery-status\r\n\r\n\
            Reporting-MTA: dns; relay.test\r\nOriginal-Envelope-Id: 7-1\r\n\r\n\
            Final-Recipient: rfc822; R1X0.p@d1.test\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n\
            Final-Recipient: rfc822; r1x2.tf@d3.test\r\nAction: failed\r\nStatus: 5.4.7\r\n\r\n\
            --b\r\nContent-Type: text/rfc822-headers\r\n\r\nSubject: x\r\nX-Oracle-Id: 7-1\r\n\r\n\
            --b--\r\n";
        let report = parse_report(body.as_bytes()).unwrap();
        assert_eq!(report.envid.as_deref(), Some("7-1"));
        assert_eq!(report.oracle_id.as_deref(), Some("7-1"));
        assert_eq!(
            report.recipients,
            [
                ("r1x0.p@d1.test".into(), "failed".into(), "5.1.1".into()),
                ("r1x2.tf@d3.test".into(), "failed".into(), "5.4.7".into()),
            ]
        );
        assert!(parse_report(b"Subject: hi\r\n\r\nno report\r\n").is_err());
    }

    /// A notice to the postmaster as the relay builds it: a report about
    /// a failed report, which names the original failure.
    #[test]
    fn a_notice_returns_the_failed_report_it_is_about() {
        use smarthost_proto::address::Mailbox;
        use smarthost_proto::dsn::{build, DsnAction, DsnRecipient, DsnReport};
        use smarthost_proto::envelope::{Envelope, Recipient};
        use smarthost_proto::reply::EnhancedStatus;

        let mailbox = |text: &str| {
            let (local_part, domain) = text.split_once('@').unwrap();
            Mailbox {
                local_part: local_part.into(),
                domain: domain.into(),
            }
        };
        let recipient = |text: &str| Recipient {
            address: mailbox(text),
            notify: None,
            orcpt: None,
        };
        let report = |envelope: &Envelope, original: &[u8], postmaster: Option<&Mailbox>| {
            build(&DsnReport {
                reporting_mta: "relay.test",
                dsn_id: "0192f3a1b2c3d4e5f60718293a4b",
                date_unix: 1_795_888_950,
                envelope,
                arrival_unix: 1_795_888_842,
                original,
                recipients: envelope
                    .recipients
                    .iter()
                    .map(|r| DsnRecipient::new(r, DsnAction::Failed, EnhancedStatus(5, 4, 7)))
                    .collect(),
                return_cap: 1 << 20,
                postmaster,
            })
        };
        let original = b"Subject: hi\r\nX-Oracle-Id: 4-2\r\n\r\nbody\r\n";
        let message = Envelope {
            sender: Some(mailbox("s2@bounce.test")),
            recipients: vec![recipient("r2x0.tf@d1.test")],
            envid: Some("4-2".into()),
            ..Envelope::default()
        };
        let failed_report = report(&message, original, None);
        let from_null = Envelope {
            sender: None,
            recipients: vec![recipient("s2@bounce.test")],
            ..Envelope::default()
        };
        let postmaster = mailbox(super::super::workload::POSTMASTER);
        let notice = parse_report(&report(&from_null, &failed_report, Some(&postmaster))).unwrap();
        assert_eq!(
            notice.recipients,
            [("s2@bounce.test".into(), "failed".into(), "5.4.7".into())]
        );
        let inner = notice.inner.expect("the failed report, returned");
        assert_eq!(inner.envid.as_deref(), Some("4-2"));
        assert_eq!(inner.oracle_id.as_deref(), Some("4-2"));
        assert_eq!(
            inner.recipients,
            [("r2x0.tf@d1.test".into(), "failed".into(), "5.4.7".into())]
        );
        assert!(inner.inner.is_none(), "the original is no report");
    }

    #[test]
    fn paths_and_headers_are_read() {
        assert_eq!(path_of("RCPT TO:<a@b.test> NOTIFY=FAILURE"), "a@b.test");
        assert_eq!(path_of("MAIL FROM:<>"), "");
        let data = b"Subject: s\r\nX-Oracle-Id:  9-3 \r\n\r\nX-Oracle-Id: no\r\n";
        assert_eq!(header(data, "x-oracle-id").as_deref(), Some("9-3"));
    }
}
