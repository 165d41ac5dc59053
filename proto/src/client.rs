//! The client side of SMTP, without I/O.
//!
//! - [`ReplyParser`] takes the server's bytes in fragments of any size and
//!   hands back whole (multi-line) replies, or a typed error for input that
//!   is not a reply.
//! - [`Capabilities`] reads the EHLO reply.
//! - [`Transaction`] plans one message: it refuses what the server cannot
//!   take, writes MAIL, RCPT and DATA (all at once under PIPELINING), reads
//!   the replies and keeps one result per recipient.
//! - [`BodyEncoder`] turns a stored message into DATA lines: CRLF line
//!   endings, dot-stuffing, the final `.CRLF`.
//! - [`AuthClient`] runs AUTH PLAIN or AUTH LOGIN.
//!
//! The node's outbound connection owns the socket, the timeouts and TLS,
//! and drives these types.

use std::fmt;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;

use crate::address::Mailbox;
use crate::envelope::{Envelope, Notify, Recipient, Ret};
use crate::reply::{EnhancedStatus, Reply};

/// Longest reply line accepted, CRLF included. RFC 5321 4.5.3.1.5 allows
/// 512 octets; servers that write longer lines exist, so some room is left.
pub const MAX_REPLY_LINE: usize = 2048;
/// Most lines in one reply (an EHLO reply has one per extension).
pub const MAX_REPLY_LINES: usize = 100;

/// Input that is not an SMTP reply. The connection cannot go on after one.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("reply line longer than {MAX_REPLY_LINE} octets")]
    LineTooLong,
    #[error("reply with more than {MAX_REPLY_LINES} lines")]
    TooManyLines,
    #[error("malformed reply line {0:?}")]
    Malformed(String),
    #[error("reply line {line:?} does not continue reply code {code}")]
    CodeMismatch { code: u16, line: String },
}

/// Reads replies from the server's byte stream, in fragments of any size.
#[derive(Debug, Default)]
pub struct ReplyParser {
    buffer: Vec<u8>,
    /// The code and lines of a multi-line reply read so far.
    code: Option<u16>,
    lines: Vec<String>,
}

impl ReplyParser {
    pub fn new() -> Self {
        ReplyParser::default()
    }

    /// Adds bytes read from the server.
    pub fn feed(&mut self, input: &[u8]) {
        self.buffer.extend_from_slice(input);
    }

    /// The next whole reply, `Ok(None)` when more bytes are needed.
    pub fn next_reply(&mut self) -> Result<Option<Reply>, ReplyError> {
        loop {
            let Some(end) = self.buffer.iter().position(|&b| b == b'\n') else {
                if self.buffer.len() >= MAX_REPLY_LINE {
                    return Err(ReplyError::LineTooLong);
                }
                return Ok(None);
            };
            if end + 1 > MAX_REPLY_LINE {
                return Err(ReplyError::LineTooLong);
            }
            let raw: Vec<u8> = self.buffer.drain(..=end).collect();
            let line = raw
                .strip_suffix(b"\n")
                .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
                .unwrap_or(&raw);
            let (code, last, text) = split_line(line)?;
            match self.code {
                Some(expected) if expected != code => {
                    return Err(ReplyError::CodeMismatch {
                        code: expected,
                        line: String::from_utf8_lossy(line).into_owned(),
                    })
                }
                _ => self.code = Some(code),
            }
            if self.lines.len() == MAX_REPLY_LINES {
                return Err(ReplyError::TooManyLines);
            }
            self.lines.push(text);
            if last {
                self.code = None;
                let lines = std::mem::take(&mut self.lines);
                return Ok(Some(reply_from_lines(code, lines)));
            }
        }
    }

    /// Bytes received and not yet part of a reply.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// Forgets everything buffered. After `220` to STARTTLS, whatever the
    /// server sent before the handshake must not be read as protected.
    pub fn discard_buffered(&mut self) {
        self.buffer.clear();
        self.code = None;
        self.lines.clear();
    }
}

/// `250-text` into (250, false, "text").
fn split_line(line: &[u8]) -> Result<(u16, bool, String), ReplyError> {
    let malformed = || ReplyError::Malformed(String::from_utf8_lossy(line).into_owned());
    if line.len() < 3 || !line[..3].iter().all(u8::is_ascii_digit) {
        return Err(malformed());
    }
    if !(b'2'..=b'5').contains(&line[0]) || line[1] > b'5' {
        return Err(malformed());
    }
    let code =
        (line[0] - b'0') as u16 * 100 + (line[1] - b'0') as u16 * 10 + (line[2] - b'0') as u16;
    let (last, text) = match line.get(3) {
        None => (true, &[][..]),
        Some(b' ') => (true, &line[4..]),
        Some(b'-') => (false, &line[4..]),
        Some(_) => return Err(malformed()),
    };
    Ok((code, last, String::from_utf8_lossy(text).into_owned()))
}

/// Takes an RFC 3463 enhanced status code off the front of the lines when
/// the first one carries one of the reply's class.
fn reply_from_lines(code: u16, mut lines: Vec<String>) -> Reply {
    let status = lines.first().and_then(|first| {
        let word = first.split(' ').next()?;
        let status = parse_enhanced_status(word)?;
        (u16::from(status.0) == code / 100).then_some((status, word.len()))
    });
    match status {
        Some((status, len)) => {
            let prefix = lines[0][..len].to_string();
            for line in &mut lines {
                if let Some(rest) = line.strip_prefix(&prefix) {
                    *line = rest.trim_start_matches(' ').to_string();
                }
            }
            Reply {
                code,
                status: Some(status),
                lines,
            }
        }
        None => Reply::plain(code, lines),
    }
}

fn parse_enhanced_status(word: &str) -> Option<EnhancedStatus> {
    let mut parts = word.split('.');
    let class = parts.next()?;
    let subject = parts.next()?;
    let detail = parts.next()?;
    if parts.next().is_some() {
        return None;
    }
    let digits = |s: &str, max: usize| {
        !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_digit())
    };
    if class.len() != 1 || !digits(class, 1) || !digits(subject, 3) || !digits(detail, 3) {
        return None;
    }
    let class: u8 = class.parse().ok()?;
    if !matches!(class, 2 | 4 | 5) {
        return None;
    }
    Some(EnhancedStatus(
        class,
        subject.parse().ok()?,
        detail.parse().ok()?,
    ))
}

/// What the server offers in its EHLO reply.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub pipelining: bool,
    /// `SIZE n`: the largest message the server takes; `Some(0)` means
    /// SIZE without a limit.
    pub size: Option<u64>,
    pub eight_bit_mime: bool,
    pub smtputf8: bool,
    pub starttls: bool,
    /// AUTH mechanisms, upper case.
    pub auth: Vec<String>,
    pub enhanced_status_codes: bool,
    pub dsn: bool,
}

impl Capabilities {
    /// Reads the extension lines of an EHLO reply (every line after the
    /// first, which is the server's name). Unknown extensions are ignored.
    pub fn from_ehlo(reply: &Reply) -> Capabilities {
        let mut caps = Capabilities::default();
        // A reply with an enhanced status on its first line would have had
        // it taken off every line; EHLO replies carry none, so the wire
        // form is the lines as they are.
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_ascii_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            let keyword = keyword.to_ascii_uppercase();
            match keyword.as_str() {
                "PIPELINING" => caps.pipelining = true,
                "SIZE" => {
                    caps.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0));
                }
                "8BITMIME" => caps.eight_bit_mime = true,
                "SMTPUTF8" => caps.smtputf8 = true,
                "STARTTLS" => caps.starttls = true,
                "ENHANCEDSTATUSCODES" => caps.enhanced_status_codes = true,
                "DSN" => caps.dsn = true,
                "AUTH" => add_mechanisms(&mut caps.auth, words),
                other => {
                    // The pre-RFC 2554 form `AUTH=LOGIN PLAIN`.
                    if let Some(first) = other.strip_prefix("AUTH=") {
                        add_mechanisms(&mut caps.auth, std::iter::once(first).chain(words));
                    }
                }
            }
        }
        caps
    }

    /// The server's size limit, when it announced one.
    pub fn size_limit(&self) -> Option<u64> {
        self.size.filter(|&n| n > 0)
    }
}

fn add_mechanisms<'a>(list: &mut Vec<String>, words: impl Iterator<Item = &'a str>) {
    for word in words {
        let word = word.to_ascii_uppercase();
        if !list.contains(&word) {
            list.push(word);
        }
    }
}

/// The command lines the client sends outside a transaction.
pub fn ehlo(name: &str) -> Vec<u8> {
    format!("EHLO {name}\r\n").into_bytes()
}

pub fn helo(name: &str) -> Vec<u8> {
    format!("HELO {name}\r\n").into_bytes()
}

pub const STARTTLS: &[u8] = b"STARTTLS\r\n";
pub const RSET: &[u8] = b"RSET\r\n";
pub const QUIT: &[u8] = b"QUIT\r\n";

/// What became of one recipient.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    Delivered,
    /// Temporary: try again later.
    Deferred,
    /// Permanent: report to the sender.
    Failed,
}

impl Disposition {
    /// 2xx delivered, 5xx failed, anything else (4xx, or a code that makes
    /// no sense at that point) deferred.
    pub fn of(reply: &Reply) -> Disposition {
        match reply.code {
            200..=299 => Disposition::Delivered,
            500..=599 => Disposition::Failed,
            _ => Disposition::Deferred,
        }
    }
}

/// One recipient's result, with the reply (or text) that decided it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecipientResult {
    /// Index into the envelope's recipients.
    pub recipient: u32,
    pub disposition: Disposition,
    pub reply: String,
}

/// Converts an 8-bit message for a server without 8BITMIME (RFC 6152),
/// for instance to quoted-printable. The caller provides it; a body that
/// cannot be converted makes the delivery fail permanently (5.6.3).
pub trait EightBitPolicy: Send + Sync {
    fn downgrade(&self, body: &[u8]) -> Result<Vec<u8>, String>;
}

/// An [`EightBitPolicy`] from a plain function such as
/// `smarthost_proto::mime8::downgrade`.
#[derive(Clone, Copy)]
pub struct DowngradeWith(pub fn(&[u8]) -> Result<Vec<u8>, String>);

impl EightBitPolicy for DowngradeWith {
    fn downgrade(&self, body: &[u8]) -> Result<Vec<u8>, String> {
        (self.0)(body)
    }
}

impl fmt::Debug for DowngradeWith {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DowngradeWith(..)")
    }
}

/// The policy when no conversion is available: every 8-bit message to a
/// 7-bit server fails.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoDowngrade;

impl EightBitPolicy for NoDowngrade {
    fn downgrade(&self, _body: &[u8]) -> Result<Vec<u8>, String> {
        Err("no 8-bit to 7-bit conversion is available".to_string())
    }
}

/// A message the server cannot take, found before anything was sent.
/// The reply is permanent and names the reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reply}")]
pub struct Refusal {
    pub reply: Reply,
}

impl Refusal {
    fn new(code: u16, status: EnhancedStatus, text: String) -> Self {
        Refusal {
            reply: Reply::new(code, status, text),
        }
    }
}

/// What the connection should do next for a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Write these bytes, then read replies: one [`Transaction::on_reply`]
    /// per reply until another step is asked for.
    Write(Vec<u8>),
    /// Read the next reply.
    Read,
    /// Write the message body through a [`BodyEncoder`], ending with `.CRLF`,
    /// then read the reply to it.
    WriteBody,
    /// The transaction is over; take [`Transaction::into_results`].
    Done,
}

/// The command whose reply the transaction waits for, to name it when the
/// connection breaks (`connection lost after DATA`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Mail,
    Rcpt,
    Data,
    /// The message data and its final dot.
    Body,
    Rset,
    /// A lone dot ending the empty data that a server asked for with 354
    /// although no recipient was accepted (RFC 2920 3.1).
    EmptyBody,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Mail => "MAIL FROM",
            Stage::Rcpt => "RCPT TO",
            Stage::Data => "DATA",
            Stage::Body | Stage::EmptyBody => "end of data",
            Stage::Rset => "RSET",
        })
    }
}

/// One message to one server: the commands to send and a result per
/// recipient.
#[derive(Debug)]
pub struct Transaction {
    pipelining: bool,
    mail: Vec<u8>,
    rcpts: Vec<Vec<u8>>,
    results: Vec<Option<RecipientResult>>,
    /// Recipients accepted with 2xx to RCPT, waiting for the final reply.
    accepted: Vec<bool>,
    indices: Vec<u32>,
    /// The reply to MAIL when it was not positive.
    mail_failed: Option<Reply>,
    /// Replies still to come for commands already written, in order.
    pending: std::collections::VecDeque<Stage>,
    /// The next RCPT to write (no pipelining).
    next_rcpt: usize,
    stage: Stage,
    downgraded: Option<Vec<u8>>,
    done: bool,
}

impl Transaction {
    /// Plans the delivery of `body` to `recipients` (indices into the
    /// envelope), for a server with `caps`. Refuses, before anything is
    /// sent, a message the server cannot take: non-ASCII addresses without
    /// SMTPUTF8 (5.6.7), more octets than its SIZE (5.3.4), an 8-bit body
    /// without 8BITMIME that `eight_bit` cannot convert (5.6.3).
    pub fn new(
        caps: &Capabilities,
        envelope: &Envelope,
        recipients: &[u32],
        body: &[u8],
        eight_bit: &dyn EightBitPolicy,
    ) -> Result<Transaction, Refusal> {
        let eight_bit_body = crate::mime8::is_8bit(body);
        if !eight_bit_body || caps.eight_bit_mime {
            return Transaction::planned(
                caps,
                envelope,
                recipients,
                body.len() as u64,
                eight_bit_body,
            );
        }
        let converted = eight_bit.downgrade(body).map_err(|why| {
            let text = format!("8-bit message, no 8BITMIME, cannot convert: {why}");
            Refusal::new(554, EnhancedStatus(5, 6, 3), text)
        })?;
        let mut tx =
            Transaction::planned(caps, envelope, recipients, converted.len() as u64, false)?;
        tx.downgraded = Some(converted);
        Ok(tx)
    }

    /// [`Transaction::new`] for a body of `size` octets that is sent as
    /// it is, without being held here: `eight_bit` when it has 8-bit
    /// octets, which a server without 8BITMIME is not sent (5.6.3; a body
    /// to convert goes through [`Transaction::new`]).
    pub fn planned(
        caps: &Capabilities,
        envelope: &Envelope,
        recipients: &[u32],
        size: u64,
        eight_bit: bool,
    ) -> Result<Transaction, Refusal> {
        // Indices outside the envelope are skipped, in both lists alike.
        let (indices, rcpts): (Vec<u32>, Vec<&Recipient>) = recipients
            .iter()
            .filter_map(|&i| Some((i, envelope.recipients.get(i as usize)?)))
            .unzip();
        let needs_utf8 = envelope
            .sender
            .as_ref()
            .is_some_and(Mailbox::needs_smtputf8)
            || rcpts.iter().any(|r| r.address.needs_smtputf8());
        if needs_utf8 && !caps.smtputf8 {
            return Err(Refusal::new(
                553,
                EnhancedStatus(5, 6, 7),
                "the message has non-ASCII addresses and the server does not offer SMTPUTF8"
                    .to_string(),
            ));
        }
        if eight_bit && !caps.eight_bit_mime {
            return Err(Refusal::new(
                554,
                EnhancedStatus(5, 6, 3),
                "8-bit message and the server does not offer 8BITMIME".to_string(),
            ));
        }
        if let Some(limit) = caps.size_limit() {
            if size > limit {
                return Err(Refusal::new(
                    552,
                    EnhancedStatus(5, 3, 4),
                    format!(
                        "message of {size} octets is larger than the server's limit of {limit}"
                    ),
                ));
            }
        }

        let mut mail = String::from("MAIL FROM:<");
        if let Some(sender) = &envelope.sender {
            mail.push_str(&sender.to_string());
        }
        mail.push('>');
        if caps.size.is_some() {
            mail.push_str(&format!(" SIZE={size}"));
        }
        if eight_bit {
            mail.push_str(" BODY=8BITMIME");
        }
        if caps.smtputf8 && (needs_utf8 || envelope.smtputf8) {
            mail.push_str(" SMTPUTF8");
        }
        if caps.dsn {
            if let Some(ret) = envelope.ret {
                mail.push_str(match ret {
                    Ret::Full => " RET=FULL",
                    Ret::Headers => " RET=HDRS",
                });
            }
            if let Some(envid) = &envelope.envid {
                mail.push_str(&format!(" ENVID={envid}"));
            }
        }
        mail.push_str("\r\n");

        let rcpt_lines = rcpts
            .iter()
            .map(|r| {
                let mut line = format!("RCPT TO:<{}>", r.address);
                if caps.dsn {
                    if let Some(notify) = r.notify.and_then(notify_param) {
                        line.push_str(&format!(" NOTIFY={notify}"));
                    }
                    if let Some(orcpt) = &r.orcpt {
                        line.push_str(&format!(" ORCPT={orcpt}"));
                    }
                }
                line.push_str("\r\n");
                line.into_bytes()
            })
            .collect::<Vec<_>>();
        Ok(Transaction {
            pipelining: caps.pipelining,
            mail: mail.into_bytes(),
            results: vec![None; rcpt_lines.len()],
            accepted: vec![false; rcpt_lines.len()],
            rcpts: rcpt_lines,
            indices,
            mail_failed: None,
            pending: Default::default(),
            next_rcpt: 0,
            stage: Stage::Mail,
            downgraded: None,
            done: false,
        })
    }

    /// The body made 7-bit, when it had to be: what is sent instead of
    /// the stored one.
    pub fn converted(&self) -> Option<&[u8]> {
        self.downgraded.as_deref()
    }

    /// The first step: MAIL alone, or MAIL, every RCPT and DATA in one
    /// write under PIPELINING.
    pub fn start(&mut self) -> Step {
        let mut out = self.mail.clone();
        self.pending.push_back(Stage::Mail);
        if self.pipelining {
            for rcpt in &self.rcpts {
                out.extend_from_slice(rcpt);
                self.pending.push_back(Stage::Rcpt);
            }
            self.next_rcpt = self.rcpts.len();
            out.extend_from_slice(b"DATA\r\n");
            self.pending.push_back(Stage::Data);
        }
        self.stage = Stage::Mail;
        Step::Write(out)
    }

    /// The command whose reply is awaited (or the last one written).
    pub fn stage(&self) -> Stage {
        self.pending.front().copied().unwrap_or(self.stage)
    }

    /// Takes the reply to the oldest command still waiting for one.
    pub fn on_reply(&mut self, reply: &Reply) -> Step {
        let Some(stage) = self.pending.pop_front() else {
            // A reply nobody asked for: the server is out of step.
            return self.finish();
        };
        self.stage = stage;
        match stage {
            Stage::Mail => {
                if reply.code / 100 != 2 {
                    self.mail_failed = Some(reply.clone());
                    let disposition = Disposition::of(reply);
                    for i in 0..self.results.len() {
                        self.set(i, disposition, reply.to_string());
                    }
                    if self.pipelining {
                        return Step::Read;
                    }
                    // No transaction is open: nothing to reset.
                    return self.finish();
                }
                if self.pipelining {
                    Step::Read
                } else {
                    self.next_command()
                }
            }
            Stage::Rcpt => {
                let i = self.next_rcpt_reply();
                if self.mail_failed.is_none() {
                    match Disposition::of(reply) {
                        Disposition::Delivered => self.accepted[i] = true,
                        other => self.set(i, other, reply.to_string()),
                    }
                }
                if self.pipelining {
                    Step::Read
                } else {
                    self.next_command()
                }
            }
            Stage::Data => {
                let any = self.accepted.iter().any(|&a| a);
                if reply.code == 354 {
                    if any && self.mail_failed.is_none() {
                        self.stage = Stage::Body;
                        self.pending.push_back(Stage::Body);
                        return Step::WriteBody;
                    }
                    // Nobody to send to, yet the server waits for data: end
                    // it with an empty message, then reset.
                    self.pending.push_back(Stage::EmptyBody);
                    return Step::Write(b".\r\n".to_vec());
                }
                if any && self.mail_failed.is_none() {
                    let disposition = match Disposition::of(reply) {
                        Disposition::Delivered => Disposition::Deferred,
                        other => other,
                    };
                    for i in 0..self.accepted.len() {
                        if self.accepted[i] {
                            self.set(i, disposition, reply.to_string());
                        }
                    }
                }
                self.rset()
            }
            Stage::Body => {
                let disposition = Disposition::of(reply);
                for i in 0..self.accepted.len() {
                    if self.accepted[i] {
                        self.set(i, disposition, reply.to_string());
                    }
                }
                self.finish()
            }
            Stage::EmptyBody => self.rset(),
            Stage::Rset => self.finish(),
        }
    }

    /// Whether the transaction has ended with every result known.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Ends a transaction whose connection broke: every recipient without a
    /// result gets `disposition` and `text`.
    pub fn abort(&mut self, disposition: Disposition, text: &str) {
        for i in 0..self.results.len() {
            if self.results[i].is_none() {
                self.set(i, disposition, text.to_string());
            }
        }
        self.done = true;
    }

    /// One result per recipient, in the order given to [`Transaction::new`].
    /// Recipients left without one (a transaction not driven to its end)
    /// are deferred.
    pub fn into_results(mut self) -> Vec<RecipientResult> {
        self.abort(Disposition::Deferred, "transaction not completed");
        self.results.into_iter().flatten().collect()
    }

    fn set(&mut self, i: usize, disposition: Disposition, reply: String) {
        self.results[i] = Some(RecipientResult {
            recipient: self.indices[i],
            disposition,
            reply,
        });
    }

    /// Which recipient the RCPT reply just read belongs to.
    fn next_rcpt_reply(&mut self) -> usize {
        let waiting = self.pending.iter().filter(|s| **s == Stage::Rcpt).count();
        self.next_rcpt - waiting - 1
    }

    /// Without pipelining: the next RCPT, then DATA or RSET.
    fn next_command(&mut self) -> Step {
        if self.next_rcpt < self.rcpts.len() {
            let line = self.rcpts[self.next_rcpt].clone();
            self.next_rcpt += 1;
            self.pending.push_back(Stage::Rcpt);
            return Step::Write(line);
        }
        if self.accepted.iter().any(|&a| a) {
            self.pending.push_back(Stage::Data);
            Step::Write(b"DATA\r\n".to_vec())
        } else {
            self.rset()
        }
    }

    fn rset(&mut self) -> Step {
        self.pending.push_back(Stage::Rset);
        Step::Write(RSET.to_vec())
    }

    fn finish(&mut self) -> Step {
        self.done = true;
        self.pending.clear();
        Step::Done
    }
}

/// `SUCCESS,FAILURE,DELAY` or `NEVER`; `None` when nothing is set.
fn notify_param(notify: Notify) -> Option<String> {
    if notify.never {
        return Some("NEVER".to_string());
    }
    let words: Vec<&str> = [
        (notify.success, "SUCCESS"),
        (notify.failure, "FAILURE"),
        (notify.delay, "DELAY"),
    ]
    .into_iter()
    .filter_map(|(on, word)| on.then_some(word))
    .collect();
    (!words.is_empty()).then(|| words.join(","))
}

/// Writes a stored message as DATA lines, in chunks of any size: every
/// line ending (CRLF, bare LF, bare CR) becomes CRLF, a line that starts
/// with `.` gets a second one, and [`BodyEncoder::finish`] ends the last
/// line and adds `.CRLF`.
#[derive(Clone, Debug)]
pub struct BodyEncoder {
    line_start: bool,
    /// The last byte was a CR, already written as CRLF: an LF right after
    /// it belongs to the same line ending.
    after_cr: bool,
}

impl Default for BodyEncoder {
    fn default() -> Self {
        BodyEncoder {
            line_start: true,
            after_cr: false,
        }
    }
}

impl BodyEncoder {
    pub fn new() -> Self {
        BodyEncoder::default()
    }

    /// Appends the encoded form of `chunk` to `out`. Runs of bytes that
    /// are neither CR nor LF are copied whole: this is the hot path of
    /// every delivery.
    pub fn encode(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        out.reserve(chunk.len() + chunk.len() / 32);
        let mut rest = chunk;
        while !rest.is_empty() {
            if self.line_start {
                let lines = crate::data::plain_lines(rest);
                if lines > 0 {
                    out.extend_from_slice(&rest[..lines]);
                    self.after_cr = false;
                    rest = &rest[lines..];
                    continue;
                }
            }
            let run = memchr::memchr2(b'\r', b'\n', rest).unwrap_or(rest.len());
            if run > 0 {
                if self.line_start && rest[0] == b'.' {
                    out.push(b'.');
                }
                out.extend_from_slice(&rest[..run]);
                self.line_start = false;
                self.after_cr = false;
            }
            let Some(&end) = rest.get(run) else { break };
            if end == b'\r' {
                out.extend_from_slice(b"\r\n");
                self.line_start = true;
                self.after_cr = true;
            } else {
                if !self.after_cr {
                    out.extend_from_slice(b"\r\n");
                    self.line_start = true;
                }
                self.after_cr = false;
            }
            rest = &rest[run + 1..];
        }
    }

    /// Ends the last line if it was not ended, then writes `.CRLF`.
    pub fn finish(self, out: &mut Vec<u8>) {
        if !self.line_start {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
    }
}

/// The whole body as DATA lines, final dot included.
pub fn encode_body(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 16);
    let mut encoder = BodyEncoder::new();
    encoder.encode(body, &mut out);
    encoder.finish(&mut out);
    out
}

/// An AUTH mechanism the client can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthMechanism {
    Plain,
    Login,
}

impl AuthMechanism {
    /// PLAIN if offered (one round trip), else LOGIN.
    pub fn choose(caps: &Capabilities) -> Option<AuthMechanism> {
        if caps.auth.iter().any(|m| m == "PLAIN") {
            Some(AuthMechanism::Plain)
        } else if caps.auth.iter().any(|m| m == "LOGIN") {
            Some(AuthMechanism::Login)
        } else {
            None
        }
    }
}

/// AUTH did not succeed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("authentication refused: {0}")]
    Refused(Reply),
    #[error("unexpected reply during authentication: {0}")]
    Unexpected(Reply),
}

impl AuthError {
    /// A 4xx refusal may succeed later.
    pub fn is_transient(&self) -> bool {
        match self {
            AuthError::Refused(reply) | AuthError::Unexpected(reply) => reply.is_transient(),
        }
    }
}

/// What to do after a reply during AUTH.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthStep {
    /// Write these bytes and read the next reply.
    Write(Vec<u8>),
    /// Authenticated.
    Done,
}

/// The client half of AUTH PLAIN (RFC 4616) and AUTH LOGIN.
#[derive(Clone)]
pub struct AuthClient {
    mechanism: AuthMechanism,
    user: String,
    password: String,
    /// Challenges answered so far.
    answered: u8,
}

impl fmt::Debug for AuthClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthClient")
            .field("mechanism", &self.mechanism)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl AuthClient {
    pub fn new(mechanism: AuthMechanism, user: &str, password: &str) -> Self {
        AuthClient {
            mechanism,
            user: user.to_string(),
            password: password.to_string(),
            answered: 0,
        }
    }

    /// The AUTH command; PLAIN sends its credentials as the initial response.
    pub fn start(&mut self) -> Vec<u8> {
        match self.mechanism {
            AuthMechanism::Plain => {
                format!("AUTH PLAIN {}\r\n", self.plain_response()).into_bytes()
            }
            AuthMechanism::Login => b"AUTH LOGIN\r\n".to_vec(),
        }
    }

    /// The PLAIN credentials (RFC 4616: no authorization identity), sent
    /// as the initial response or after an empty challenge.
    fn plain_response(&self) -> String {
        BASE64.encode(format!("\0{}\0{}", self.user, self.password))
    }

    /// Takes the server's reply: 235 ends it, 334 asks for the next answer.
    pub fn on_reply(&mut self, reply: &Reply) -> Result<AuthStep, AuthError> {
        match reply.code {
            235 => Ok(AuthStep::Done),
            334 => {
                let answer = match (self.mechanism, self.answered) {
                    // An empty challenge to PLAIN: send the response again.
                    (AuthMechanism::Plain, 0) => self.plain_response(),
                    (AuthMechanism::Login, 0) => BASE64.encode(&self.user),
                    (AuthMechanism::Login, 1) => BASE64.encode(&self.password),
                    _ => return Err(AuthError::Unexpected(reply.clone())),
                };
                self.answered += 1;
                Ok(AuthStep::Write(format!("{answer}\r\n").into_bytes()))
            }
            400..=599 => Err(AuthError::Refused(reply.clone())),
            _ => Err(AuthError::Unexpected(reply.clone())),
        }
    }
}

#[cfg(test)]
mod tests;
