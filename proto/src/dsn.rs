//! Delivery status notifications (RFC 3464, requested per RFC 3461).
//!
//! [`build`] writes a complete `multipart/report` message: a short text for
//! people, the `message/delivery-status` part for programs, and the original
//! message or its header section, as the sender's `RET=` asked.
//!
//! Who gets a report is decided here too: [`should_notify`] applies a
//! recipient's `NOTIFY=` parameter, and [`may_send_dsn`] holds the rule that
//! a message with the null reverse path `<>` (itself a report) is never
//! answered with another. The caller checks both before calling [`build`].
//!
//! Everything is pure: the caller passes the clock, the host name and the
//! stored message, so the output is the same bytes on every run.

use crate::address::Mailbox;
use crate::envelope::{Envelope, Recipient, Ret};
use crate::received::rfc5322_date;
use crate::reply::EnhancedStatus;

/// The default largest original returned in full when the sender gave no
/// `RET=`: beyond it only the header section goes back.
pub const DEFAULT_RETURN_CAP: usize = 1024 * 1024;

/// Folded lines are wrapped near this width.
const WRAP: usize = 76;
/// A word longer than this is cut so that no line exceeds 998 octets.
const MAX_WORD: usize = 900;

/// What happened to one recipient (the `Action:` field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DsnAction {
    /// Permanently undeliverable; no further attempts.
    Failed,
    /// Not delivered yet; attempts go on.
    Delayed,
    /// Delivered to the next hop or the drop directory.
    Delivered,
}

impl DsnAction {
    pub fn as_str(self) -> &'static str {
        match self {
            DsnAction::Failed => "failed",
            DsnAction::Delayed => "delayed",
            DsnAction::Delivered => "delivered",
        }
    }
}

/// One recipient's block of a report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DsnRecipient {
    pub address: Mailbox,
    /// `ORCPT=` as received (`addr-type;xtext`).
    pub orcpt: Option<String>,
    pub action: DsnAction,
    pub status: EnhancedStatus,
    /// The host that answered, when one did (`mx1.example.net`).
    pub remote_mta: Option<String>,
    /// The remote server's reply (`550 5.1.1 no such user`), written as
    /// `Diagnostic-Code: smtp; ...`. Multi-line replies are joined.
    pub diagnostic: Option<String>,
    /// What went wrong when no server replied (`connection refused`): shown
    /// to the reader only, since `Diagnostic-Code` is for SMTP replies.
    pub reason: Option<String>,
    pub last_attempt_unix: Option<u64>,
    /// For [`DsnAction::Delayed`]: when the queue gives up.
    pub will_retry_until_unix: Option<u64>,
}

impl DsnRecipient {
    /// A block for an envelope recipient, with its address and `ORCPT=`
    /// copied and every optional field empty.
    pub fn new(recipient: &Recipient, action: DsnAction, status: EnhancedStatus) -> Self {
        DsnRecipient {
            address: recipient.address.clone(),
            orcpt: recipient.orcpt.clone(),
            action,
            status,
            remote_mta: None,
            diagnostic: None,
            reason: None,
            last_attempt_unix: None,
            will_retry_until_unix: None,
        }
    }
}

/// Everything one report says.
#[derive(Clone, Debug)]
pub struct DsnReport<'a> {
    /// This server's host name (`Reporting-MTA`, the `From:` domain).
    pub reporting_mta: &'a str,
    /// The report's own unique id, used for its `Message-ID` and boundary.
    pub dsn_id: &'a str,
    pub date_unix: u64,
    /// The original envelope: the report goes to its sender.
    pub envelope: &'a Envelope,
    pub arrival_unix: u64,
    /// The stored original message (header section, blank line, body).
    pub original: &'a [u8],
    pub recipients: Vec<DsnRecipient>,
    /// When the sender gave no `RET=`, an original larger than this is
    /// returned as its header section only ([`DEFAULT_RETURN_CAP`]).
    pub return_cap: usize,
    /// Set for a double bounce: the original came from `<>`, so the report
    /// goes to this postmaster instead, and says so.
    pub postmaster: Option<&'a Mailbox>,
}

/// Whether the recipient asked (or by default gets) a report of `action`.
///
/// Without `NOTIFY=`, failures and delays are reported and successes are
/// not; `NOTIFY=NEVER` turns every report off.
pub fn should_notify(recipient: &Recipient, action: DsnAction) -> bool {
    match recipient.notify {
        None => matches!(action, DsnAction::Failed | DsnAction::Delayed),
        Some(n) if n.never => false,
        Some(n) => match action {
            DsnAction::Failed => n.failure,
            DsnAction::Delayed => n.delay,
            DsnAction::Delivered => n.success,
        },
    }
}

/// Whether any report may be sent for a message: never when its sender is
/// the null reverse path `<>` (RFC 5321 section 4.5.5), which marks reports
/// themselves, so that two servers cannot bounce a message back and forth.
pub fn may_send_dsn(envelope: &Envelope) -> bool {
    envelope.sender.is_some()
}

/// The enhanced status code in an SMTP reply (`550 5.1.1 no such user` →
/// 5.1.1), or, when the reply carries none, the class of its code with
/// `x.0.0`; `fallback` when the text is not a reply at all.
pub fn status_of_reply(reply: &str, fallback: EnhancedStatus) -> EnhancedStatus {
    let reply = reply.trim_start();
    let code = reply
        .get(..3)
        .filter(|c| c.bytes().all(|b| b.is_ascii_digit()));
    let Some(code) = code else {
        return fallback;
    };
    let class = code.as_bytes()[0] - b'0';
    if !matches!(class, 2 | 4 | 5) {
        return fallback;
    }
    let rest = reply[3..].trim_start_matches([' ', '-']);
    let word = rest.split_whitespace().next().unwrap_or("");
    let mut numbers = word.split('.').map(|n| {
        if (1..=3).contains(&n.len()) && n.bytes().all(|b| b.is_ascii_digit()) {
            n.parse::<u16>().ok()
        } else {
            None
        }
    });
    if let (Some(Some(c)), Some(Some(s)), Some(Some(d)), None) = (
        numbers.next(),
        numbers.next(),
        numbers.next(),
        numbers.next(),
    ) {
        if c == u16::from(class) {
            return EnhancedStatus(class, s, d);
        }
    }
    EnhancedStatus(class, 0, 0)
}

/// Writes the report: an RFC 5322 message with CRLF line ends and no line
/// longer than 998 octets, ready to be queued from `<>` to the sender.
///
/// The report is 7-bit unless the original is 8-bit (then it needs
/// `BODY=8BITMIME`) or the sender's address is UTF-8 (then it needs
/// SMTPUTF8 anyway). With no sender ([`may_send_dsn`] is false) the `To:`
/// field is left out.
pub fn build(report: &DsnReport) -> Vec<u8> {
    let any_failed = report
        .recipients
        .iter()
        .any(|r| r.action == DsnAction::Failed);
    let any_delayed = report
        .recipients
        .iter()
        .any(|r| r.action == DsnAction::Delayed);
    let subject = if report.postmaster.is_some() {
        "Postmaster Notice: Undeliverable Mail From <>"
    } else if any_failed {
        "Undelivered Mail Returned to Sender"
    } else if any_delayed {
        "Delayed Mail (still being retried)"
    } else {
        "Successful Mail Delivery Report"
    };

    let notification = notification_part(report, any_failed, any_delayed);
    let status = status_part(report);
    let returned = returned_part(report, any_failed);
    let boundary = choose_boundary(report.dsn_id, &[&notification, &status, &returned]);

    let host = one_line(report.reporting_mta);
    let mut out = Vec::new();
    let mut field = |name: &str, value: &str| out.extend_from_slice(fold(name, value).as_bytes());
    field(
        "From",
        &format!("Mail Delivery System <MAILER-DAEMON@{host}>"),
    );
    if let Some(to) = report.postmaster.or(report.envelope.sender.as_ref()) {
        field("To", &format!("<{to}>"));
    }
    field("Subject", subject);
    field("Date", &rfc5322_date(report.date_unix));
    field(
        "Message-ID",
        &format!("<{}@{host}>", one_line(report.dsn_id).replace(' ', "")),
    );
    field("Auto-Submitted", "auto-replied");
    field("MIME-Version", "1.0");
    field(
        "Content-Type",
        &format!("multipart/report; report-type=delivery-status; boundary=\"{boundary}\""),
    );
    out.extend_from_slice(b"\r\nThis is a MIME-encapsulated message.\r\n");
    for part in [&notification, &status, &returned] {
        out.extend_from_slice(format!("\r\n--{boundary}\r\n").as_bytes());
        out.extend_from_slice(part);
    }
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

/// Part 1: what happened, for people.
fn notification_part(report: &DsnReport, any_failed: bool, any_delayed: bool) -> Vec<u8> {
    let host = one_line(report.reporting_mta);
    let mut text = format!("This is the mail system at host {host}.\r\n\r\n");
    let intro = if report.postmaster.is_some() {
        "A message from the null sender <> could not be delivered to one or more \
         recipients. It has no return address (it is most often a delivery report \
         itself), so it comes to the postmaster instead of being returned. The \
         reasons are given below; the message is attached."
            .to_string()
    } else if any_failed {
        "Your message could not be delivered to one or more recipients. \
         The reasons are given below; the message is attached."
            .to_string()
    } else if any_delayed {
        let until = report
            .recipients
            .iter()
            .filter_map(|r| r.will_retry_until_unix)
            .max();
        match until {
            Some(t) => format!(
                "Your message has not been delivered yet to the recipients below. \
                 Delivery will be retried until {}; you do not need to send it again.",
                rfc5322_date(t)
            ),
            None => "Your message has not been delivered yet to the recipients below. \
                     Delivery will be retried; you do not need to send it again."
                .to_string(),
        }
    } else {
        "Your message was delivered to the recipients below.".to_string()
    };
    text.push_str(&wrap(&intro));
    for action in [DsnAction::Failed, DsnAction::Delayed, DsnAction::Delivered] {
        for r in report.recipients.iter().filter(|r| r.action == action) {
            let detail = match (&r.diagnostic, &r.reason, &r.remote_mta) {
                (Some(d), _, Some(mta)) => format!("host {} said: {}", one_line(mta), one_line(d)),
                (Some(d), _, None) => format!("the server said: {}", one_line(d)),
                (None, Some(reason), _) => one_line(reason),
                (None, None, _) => match action {
                    DsnAction::Failed => "delivery failed".to_string(),
                    DsnAction::Delayed => "delivery delayed".to_string(),
                    DsnAction::Delivered => "delivered".to_string(),
                },
            };
            let line = format!("<{}>: {} (status {})", r.address, detail, r.status);
            text.push_str("\r\n");
            text.push_str(&wrap(&line));
        }
    }
    let mut part = Vec::new();
    if text.is_ascii() {
        part.extend_from_slice(
            b"Content-Type: text/plain; charset=us-ascii\r\n\
              Content-Description: Notification\r\n\
              Content-Transfer-Encoding: 7bit\r\n\r\n",
        );
        part.extend_from_slice(text.as_bytes());
    } else {
        part.extend_from_slice(
            b"Content-Type: text/plain; charset=utf-8\r\n\
              Content-Description: Notification\r\n\
              Content-Transfer-Encoding: quoted-printable\r\n\r\n",
        );
        part.extend_from_slice(&quoted_printable::encode(text.as_bytes()));
    }
    part
}

/// Part 2: the `message/delivery-status` fields.
fn status_part(report: &DsnReport) -> Vec<u8> {
    let mut body = String::new();
    body.push_str(&fold(
        "Reporting-MTA",
        &format!("dns; {}", one_line(report.reporting_mta)),
    ));
    if let Some(envid) = &report.envelope.envid {
        body.push_str(&fold("Original-Envelope-Id", &xtext_for_display(envid)));
    }
    body.push_str(&fold("Arrival-Date", &rfc5322_date(report.arrival_unix)));
    for r in &report.recipients {
        body.push_str("\r\n");
        if let Some(orcpt) = &r.orcpt {
            body.push_str(&fold("Original-Recipient", &original_recipient(orcpt)));
        }
        body.push_str(&fold("Final-Recipient", &typed_address(&r.address)));
        body.push_str(&fold("Action", r.action.as_str()));
        body.push_str(&fold("Status", &r.status.to_string()));
        if let Some(mta) = &r.remote_mta {
            body.push_str(&fold("Remote-MTA", &format!("dns; {}", one_line(mta))));
        }
        if let Some(diagnostic) = &r.diagnostic {
            body.push_str(&fold(
                "Diagnostic-Code",
                &format!("smtp; {}", one_line(diagnostic)),
            ));
        }
        if let Some(t) = r.last_attempt_unix {
            body.push_str(&fold("Last-Attempt-Date", &rfc5322_date(t)));
        }
        if r.action == DsnAction::Delayed {
            if let Some(t) = r.will_retry_until_unix {
                body.push_str(&fold("Will-Retry-Until", &rfc5322_date(t)));
            }
        }
    }
    let mut part = b"Content-Type: message/delivery-status\r\n\
                     Content-Description: Delivery report\r\n\r\n"
        .to_vec();
    part.extend_from_slice(body.as_bytes());
    // The delimiter's own CRLF ends the last field's line.
    if part.ends_with(b"\r\n") {
        part.truncate(part.len() - 2);
    }
    part
}

/// Part 3: the original, or its header section (RFC 3461 section 4.3).
fn returned_part(report: &DsnReport, any_failed: bool) -> Vec<u8> {
    let original = report.original;
    let header_end = header_section_len(original);
    let headers_utf8 = !original[..header_end].is_ascii();
    // The whole message goes back only in a failure report, and only if
    // asked for (RET=FULL) or by default when it is not too large.
    let full = any_failed
        && match report.envelope.ret {
            Some(Ret::Full) => true,
            Some(Ret::Headers) => false,
            None => original.len() <= report.return_cap,
        };
    let mut part = Vec::new();
    if full {
        let kind = if headers_utf8 {
            "message/global"
        } else {
            "message/rfc822"
        };
        part.extend_from_slice(
            format!("Content-Type: {kind}\r\nContent-Description: Undelivered message\r\n\r\n")
                .as_bytes(),
        );
        part.extend_from_slice(original);
    } else {
        let kind = if headers_utf8 {
            "message/global-headers"
        } else {
            "text/rfc822-headers"
        };
        part.extend_from_slice(
            format!("Content-Type: {kind}\r\nContent-Description: Message headers\r\n\r\n")
                .as_bytes(),
        );
        part.extend_from_slice(&original[..header_end]);
    }
    // The delimiter that follows brings its own CRLF; one ending the
    // original stays part of it.
    part
}

/// The length of the header section, with the CRLF that ends its last
/// field but without the empty line after it.
fn header_section_len(message: &[u8]) -> usize {
    if message.starts_with(b"\r\n") {
        return 0;
    }
    match message.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(pos) => pos + 2,
        None => message.len(),
    }
}

/// A boundary that occurs in none of the parts: derived from the report's
/// id, with a counter that goes up until it is unique. It starts with `=_`,
/// which no quoted-printable or base64 text can contain.
fn choose_boundary(dsn_id: &str, parts: &[&[u8]]) -> String {
    let id: String = dsn_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(40)
        .collect();
    (0u32..)
        .map(|n| format!("=_dsn_{id}_{n}"))
        .find(|b| !parts.iter().any(|p| contains(p, b.as_bytes())))
        .expect("a finite message cannot contain every boundary")
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// `rfc822; addr`, or `utf-8; addr` with non-ASCII characters written as
/// `\x{HEX}` (RFC 6533 utf-8-addr-xtext) so the field stays 7-bit.
fn typed_address(mailbox: &Mailbox) -> String {
    let text = mailbox.to_string();
    if !mailbox.needs_smtputf8() {
        return format!("rfc822; {text}");
    }
    let mut out = String::from("utf-8; ");
    for c in text.chars() {
        if ('!'..='~').contains(&c) && !matches!(c, '+' | '=' | '\\') {
            out.push(c);
        } else {
            out.push_str(&format!("\\x{{{:X}}}", c as u32));
        }
    }
    out
}

/// `Original-Recipient` from `ORCPT=` (`rfc822;a+2Bb@x` → `rfc822; a+b@x`).
/// The xtext is decoded when that yields printable ASCII; a `utf-8`
/// address keeps its 7-bit form, which is the one this field uses.
fn original_recipient(orcpt: &str) -> String {
    let orcpt = one_line(orcpt);
    match orcpt.split_once(';') {
        Some((kind, addr)) => {
            let addr = addr.trim();
            let addr = if kind.trim().eq_ignore_ascii_case("utf-8") {
                addr.to_string()
            } else {
                xtext_for_display(addr)
            };
            format!("{}; {}", kind.trim(), addr)
        }
        None => orcpt,
    }
}

/// Decodes RFC 3461 xtext (`+2B` → `+`); returns the text unchanged when
/// it is not valid xtext or would decode to something unprintable.
fn xtext_for_display(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'+' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok());
            match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                Some(b) if hex.is_some_and(|h| h.bytes().all(|c| c.is_ascii_hexdigit())) => {
                    out.push(b)
                }
                _ => return one_line(value),
            }
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    if out.iter().all(|b| (b' '..=b'~').contains(b)) {
        String::from_utf8(out).expect("printable ASCII")
    } else {
        one_line(value)
    }
}

/// Text on one line: line breaks, tabs and other controls become spaces,
/// runs of spaces one space, no space at either end.
fn one_line(text: &str) -> String {
    text.split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// `Name: value` folded before spaces so lines stay near 78 characters,
/// ending in CRLF. A word too long for any line is cut (a space appears
/// where it was cut when the field is unfolded).
fn fold(name: &str, value: &str) -> String {
    let mut out = format!("{name}:");
    let mut line_len = out.len();
    for word in words(value) {
        if line_len + 1 + word.len() > WRAP + 2 && line_len > name.len() + 1 {
            out.push_str("\r\n");
            line_len = 0;
        }
        out.push(' ');
        out.push_str(word);
        line_len += 1 + word.len();
    }
    out.push_str("\r\n");
    out
}

/// Free text wrapped at spaces to lines near 76 characters, CRLF between
/// lines and after the last.
fn wrap(text: &str) -> String {
    let mut out = String::new();
    let mut line_len = 0;
    for word in words(text) {
        if line_len > 0 && line_len + 1 + word.len() > WRAP {
            out.push_str("\r\n");
            line_len = 0;
        }
        if line_len > 0 {
            out.push(' ');
            line_len += 1;
        }
        out.push_str(word);
        line_len += word.len();
    }
    out.push_str("\r\n");
    out
}

/// The words of a text, each cut to at most [`MAX_WORD`] octets (at
/// character boundaries).
fn words(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|w| !w.is_empty())
        .flat_map(|mut word| {
            let mut pieces = Vec::new();
            while word.len() > MAX_WORD {
                let mut cut = MAX_WORD;
                while !word.is_char_boundary(cut) {
                    cut -= 1;
                }
                pieces.push(&word[..cut]);
                word = &word[cut..];
            }
            pieces.push(word);
            pieces
        })
}

#[cfg(test)]
mod tests {
    use mail_parser::{MessageParser, MimeHeaders, PartType};

    use super::*;
    use crate::envelope::Notify;

    const ORIGINAL: &[u8] = b"From: App <app@example.com>\r\n\
        To: a@example.org\r\n\
        Subject: Invoice 42\r\n\
        Message-ID: <orig-1@example.com>\r\n\
        \r\n\
        Hello,\r\n\
        the invoice is attached.\r\n";

    fn mailbox(local: &str, domain: &str) -> Mailbox {
        Mailbox {
            local_part: local.into(),
            domain: domain.into(),
        }
    }

    fn recipient(local: &str, domain: &str) -> Recipient {
        Recipient {
            address: mailbox(local, domain),
            notify: None,
            orcpt: None,
        }
    }

    fn envelope(ret: Option<Ret>) -> Envelope {
        Envelope {
            sender: Some(mailbox("app", "example.com")),
            recipients: vec![recipient("a", "example.org"), recipient("b", "example.net")],
            ret,
            ..Envelope::default()
        }
    }

    fn failed(r: &Recipient) -> DsnRecipient {
        DsnRecipient {
            remote_mta: Some("mx.example.org".into()),
            diagnostic: Some("550 5.1.1 <a@example.org>: no such user".into()),
            last_attempt_unix: Some(1_795_888_900),
            ..DsnRecipient::new(r, DsnAction::Failed, EnhancedStatus(5, 1, 1))
        }
    }

    fn delayed(r: &Recipient) -> DsnRecipient {
        DsnRecipient {
            reason: Some("connection refused".into()),
            last_attempt_unix: Some(1_795_888_900),
            will_retry_until_unix: Some(1_796_320_842),
            ..DsnRecipient::new(r, DsnAction::Delayed, EnhancedStatus(4, 4, 1))
        }
    }

    fn report<'a>(envelope: &'a Envelope, recipients: Vec<DsnRecipient>) -> DsnReport<'a> {
        DsnReport {
            reporting_mta: "relay.example.net",
            dsn_id: "0192f3a1b2c3d4e5f60718293a4b",
            date_unix: 1_795_888_950,
            envelope,
            arrival_unix: 1_795_888_842,
            original: ORIGINAL,
            recipients,
            return_cap: DEFAULT_RETURN_CAP,
            postmaster: None,
        }
    }

    /// CRLF only, no line over 998 octets.
    fn assert_well_formed(message: &[u8]) {
        for (i, &b) in message.iter().enumerate() {
            match b {
                b'\r' => assert_eq!(message.get(i + 1), Some(&b'\n'), "bare CR at {i}"),
                b'\n' => assert!(i > 0 && message[i - 1] == b'\r', "bare LF at {i}"),
                _ => {}
            }
        }
        for line in message.split(|&b| b == b'\n') {
            assert!(line.len() <= 999, "line of {} octets", line.len());
        }
        assert!(message.ends_with(b"\r\n"));
    }

    /// The groups of a `message/delivery-status` body, each a list of
    /// unfolded `(name, value)` fields.
    fn status_groups(body: &[u8]) -> Vec<Vec<(String, String)>> {
        let text = std::str::from_utf8(body).unwrap().replace("\r\n ", " ");
        text.split("\r\n\r\n")
            .map(|group| {
                group
                    .lines()
                    .filter(|l| !l.is_empty())
                    .map(|l| {
                        let (name, value) = l.split_once(':').unwrap();
                        (name.to_string(), value.trim().to_string())
                    })
                    .collect::<Vec<_>>()
            })
            .filter(|g| !g.is_empty())
            .collect()
    }

    fn field<'a>(group: &'a [(String, String)], name: &str) -> Option<&'a str> {
        group
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn content_type(part: &mail_parser::MessagePart) -> String {
        let ct = part.content_type().expect("a content type");
        format!("{}/{}", ct.ctype(), ct.subtype().unwrap_or(""))
    }

    #[test]
    fn failure_report_has_every_part_and_field() {
        let mut env = envelope(None);
        env.envid = Some("batch+2B7".into());
        env.recipients[0].orcpt = Some("rfc822;a+2Bold@example.org".into());
        let r = report(&env, vec![failed(&env.recipients[0])]);
        let bytes = build(&r);
        assert_well_formed(&bytes);

        let msg = MessageParser::default().parse(&bytes).unwrap();
        assert_eq!(msg.subject(), Some("Undelivered Mail Returned to Sender"));
        let from = msg.from().unwrap().first().unwrap();
        assert_eq!(from.name(), Some("Mail Delivery System"));
        assert_eq!(from.address(), Some("MAILER-DAEMON@relay.example.net"));
        assert_eq!(
            msg.to().unwrap().first().unwrap().address(),
            Some("app@example.com")
        );
        assert_eq!(
            msg.message_id(),
            Some("0192f3a1b2c3d4e5f60718293a4b@relay.example.net")
        );
        assert_eq!(
            msg.date().unwrap().to_timestamp(),
            1_795_888_950,
            "the Date field"
        );
        assert_eq!(
            msg.header_raw("Auto-Submitted").unwrap().trim(),
            "auto-replied"
        );
        assert_eq!(msg.header_raw("MIME-Version").unwrap().trim(), "1.0");
        let root = msg.root_part();
        let ct = root.content_type().unwrap();
        assert_eq!((ct.ctype(), ct.subtype()), ("multipart", Some("report")));
        assert_eq!(ct.attribute("report-type"), Some("delivery-status"));
        let Some(parts) = root.sub_parts() else {
            panic!("not multipart")
        };
        assert_eq!(parts.len(), 3);
        let part = |i: usize| msg.part(parts[i]).unwrap();

        assert_eq!(content_type(part(0)), "text/plain");
        let text = one_line(part(0).text_contents().unwrap());
        assert!(text.contains("relay.example.net"), "{text}");
        assert!(
            text.contains(
                "<a@example.org>: host mx.example.org said: 550 5.1.1 <a@example.org>: no such user (status 5.1.1)"
            ),
            "{text}"
        );

        assert_eq!(content_type(part(1)), "message/delivery-status");
        let groups = status_groups(part(1).contents());
        assert_eq!(groups.len(), 2, "{groups:?}");
        let per_message = &groups[0];
        assert_eq!(
            field(per_message, "Reporting-MTA"),
            Some("dns; relay.example.net")
        );
        assert_eq!(field(per_message, "Original-Envelope-Id"), Some("batch+7"));
        assert_eq!(
            field(per_message, "Arrival-Date"),
            Some("Sat, 28 Nov 2026 18:00:42 +0000")
        );
        let rcpt = &groups[1];
        assert_eq!(
            field(rcpt, "Original-Recipient"),
            Some("rfc822; a+old@example.org")
        );
        assert_eq!(
            field(rcpt, "Final-Recipient"),
            Some("rfc822; a@example.org")
        );
        assert_eq!(field(rcpt, "Action"), Some("failed"));
        assert_eq!(field(rcpt, "Status"), Some("5.1.1"));
        assert_eq!(field(rcpt, "Remote-MTA"), Some("dns; mx.example.org"));
        assert_eq!(
            field(rcpt, "Diagnostic-Code"),
            Some("smtp; 550 5.1.1 <a@example.org>: no such user")
        );
        assert_eq!(
            field(rcpt, "Last-Attempt-Date"),
            Some("Sat, 28 Nov 2026 18:01:40 +0000")
        );
        assert_eq!(field(rcpt, "Will-Retry-Until"), None);

        assert_eq!(content_type(part(2)), "message/rfc822");
        let PartType::Message(original) = &part(2).body else {
            panic!("not a message")
        };
        assert_eq!(original.subject(), Some("Invoice 42"));
        assert_eq!(original.message_id(), Some("orig-1@example.com"));
        assert_eq!(
            original.body_text(0).unwrap(),
            "Hello,\r\nthe invoice is attached.\r\n"
        );
    }

    #[test]
    fn delay_report_names_the_retry_limit_and_returns_headers_only() {
        let env = envelope(Some(Ret::Full));
        let r = report(
            &env,
            vec![delayed(&env.recipients[0]), delayed(&env.recipients[1])],
        );
        let bytes = build(&r);
        assert_well_formed(&bytes);
        let msg = MessageParser::default().parse(&bytes).unwrap();
        assert_eq!(msg.subject(), Some("Delayed Mail (still being retried)"));
        let parts = msg.root_part().sub_parts().unwrap();
        let text = one_line(msg.part(parts[0]).unwrap().text_contents().unwrap());
        assert!(text.contains("Thu, 3 Dec 2026 18:00:42 +0000"), "{text}");
        assert!(text.contains("<b@example.net>: connection refused (status 4.4.1)"));
        let groups = status_groups(msg.part(parts[1]).unwrap().contents());
        assert_eq!(groups.len(), 3);
        assert_eq!(field(&groups[0], "Original-Envelope-Id"), None);
        for rcpt in &groups[1..] {
            assert_eq!(field(rcpt, "Action"), Some("delayed"));
            assert_eq!(field(rcpt, "Status"), Some("4.4.1"));
            assert_eq!(field(rcpt, "Original-Recipient"), None);
            assert_eq!(field(rcpt, "Remote-MTA"), None);
            assert_eq!(field(rcpt, "Diagnostic-Code"), None);
            assert_eq!(
                field(rcpt, "Will-Retry-Until"),
                Some("Thu, 3 Dec 2026 18:00:42 +0000")
            );
        }
        // RET=FULL applies to failures only (RFC 3461 section 4.3).
        assert_eq!(
            content_type(msg.part(parts[2]).unwrap()),
            "text/rfc822-headers"
        );
    }

    /// The third part: its content type and its bytes as written.
    fn returned(bytes: &[u8]) -> (String, Vec<u8>) {
        let msg = MessageParser::default().parse(bytes).unwrap();
        let parts = msg.root_part().sub_parts().unwrap();
        let part = msg.part(parts[2]).unwrap();
        let raw = bytes[part.raw_body_offset() as usize..part.raw_end_offset() as usize].to_vec();
        (content_type(part), raw)
    }

    #[test]
    fn ret_chooses_the_whole_message_or_its_headers() {
        let headers = &ORIGINAL[..header_section_len(ORIGINAL)];
        assert!(headers.ends_with(b"<orig-1@example.com>\r\n"));
        let table: [(Option<Ret>, usize, &str, &[u8]); 4] = [
            (
                Some(Ret::Headers),
                DEFAULT_RETURN_CAP,
                "text/rfc822-headers",
                headers,
            ),
            (Some(Ret::Full), 10, "message/rfc822", ORIGINAL),
            (None, DEFAULT_RETURN_CAP, "message/rfc822", ORIGINAL),
            // Without RET=, a message over the cap goes back as headers.
            (None, ORIGINAL.len() - 1, "text/rfc822-headers", headers),
        ];
        for (ret, cap, kind, content) in table {
            let env = envelope(ret);
            let mut r = report(&env, vec![failed(&env.recipients[0])]);
            r.return_cap = cap;
            let bytes = build(&r);
            assert_well_formed(&bytes);
            let (got_kind, raw) = returned(&bytes);
            assert_eq!(got_kind, kind, "{ret:?} cap {cap}");
            assert!(
                raw.starts_with(content),
                "{ret:?}: {}",
                String::from_utf8_lossy(&raw)
            );
            assert!(raw.len() <= content.len() + 2, "{ret:?}");
        }
    }

    #[test]
    fn the_boundary_never_occurs_in_the_original() {
        let env = envelope(None);
        let first = build(&report(&env, vec![failed(&env.recipients[0])]));
        assert!(contains(
            &first,
            b"boundary=\"=_dsn_0192f3a1b2c3d4e5f60718293a4b_0\""
        ));

        let mut original = ORIGINAL.to_vec();
        original.extend_from_slice(b"--=_dsn_0192f3a1b2c3d4e5f60718293a4b_0\r\n");
        original.extend_from_slice(b"=_dsn_0192f3a1b2c3d4e5f60718293a4b_1--\r\n");
        let mut r = report(&env, vec![failed(&env.recipients[0])]);
        r.original = &original;
        let bytes = build(&r);
        assert_well_formed(&bytes);
        let boundary = "=_dsn_0192f3a1b2c3d4e5f60718293a4b_2";
        assert!(contains(
            &bytes,
            format!("boundary=\"{boundary}\"").as_bytes()
        ));
        assert_eq!(bytes, build(&r), "the same report gives the same bytes");

        let msg = MessageParser::default().parse(&bytes).unwrap();
        let parts = msg.root_part().sub_parts().unwrap();
        assert_eq!(parts.len(), 3);
        let (kind, raw) = returned(&bytes);
        assert_eq!(kind, "message/rfc822");
        assert!(raw.starts_with(&original));
    }

    #[test]
    fn long_diagnostics_are_folded_and_cut() {
        let env = envelope(None);
        let mut rcpt = failed(&env.recipients[0]);
        let words: Vec<String> = (0..300).map(|i| format!("word{i}")).collect();
        let token = "x".repeat(2500);
        rcpt.diagnostic = Some(format!(
            "550-5.7.1 {}\r\n550 5.7.1 {token} end",
            words.join(" ")
        ));
        let bytes = build(&report(&env, vec![rcpt]));
        assert_well_formed(&bytes);
        for line in bytes.split(|&b| b == b'\n') {
            assert!(line.len() <= 999);
        }
        let msg = MessageParser::default().parse(&bytes).unwrap();
        let parts = msg.root_part().sub_parts().unwrap();
        let groups = status_groups(msg.part(parts[1]).unwrap().contents());
        let diag = field(&groups[1], "Diagnostic-Code").unwrap();
        assert!(
            diag.starts_with("smtp; 550-5.7.1 word0 word1 word2"),
            "{diag}"
        );
        assert!(diag.contains("word298 word299 550 5.7.1 xxx"), "{diag}");
        assert!(diag.ends_with("xxx end"), "{diag}");
        assert_eq!(diag.matches('x').count(), 2500);
        let text = one_line(msg.part(parts[0]).unwrap().text_contents().unwrap());
        assert!(text.contains("word150 word151"));
    }

    #[test]
    fn utf8_addresses_use_the_utf8_address_type() {
        let mut env = envelope(None);
        env.smtputf8 = true;
        env.recipients[0] = recipient("j\u{e9}r\u{f4}me+x", "example.org");
        env.recipients[0].orcpt = Some("utf-8;j\\x{E9}r\\x{F4}me\\x{2B}x@example.org".into());
        let r = report(&env, vec![failed(&env.recipients[0])]);
        let bytes = build(&r);
        assert_well_formed(&bytes);
        let msg = MessageParser::default().parse(&bytes).unwrap();
        let parts = msg.root_part().sub_parts().unwrap();
        let text = msg.part(parts[0]).unwrap().text_contents().unwrap();
        assert!(text.contains("<j\u{e9}r\u{f4}me+x@example.org>"), "{text}");
        let status = msg.part(parts[1]).unwrap().contents();
        assert!(status.is_ascii());
        let groups = status_groups(status);
        assert_eq!(
            field(&groups[1], "Final-Recipient"),
            Some("utf-8; j\\x{E9}r\\x{F4}me\\x{2B}x@example.org")
        );
        assert_eq!(
            field(&groups[1], "Original-Recipient"),
            Some("utf-8; j\\x{E9}r\\x{F4}me\\x{2B}x@example.org")
        );
        // The report as a whole stays 7-bit: only the sender could make it 8-bit.
        assert!(bytes.is_ascii());
    }

    #[test]
    fn notify_decides_which_reports_go_out() {
        use DsnAction::*;
        let mut r = recipient("a", "example.org");
        let table = [
            (None, [true, true, false]),
            (
                Some(Notify {
                    never: true,
                    ..Notify::default()
                }),
                [false, false, false],
            ),
            (
                Some(Notify {
                    success: true,
                    ..Notify::default()
                }),
                [false, false, true],
            ),
            (
                Some(Notify {
                    failure: true,
                    ..Notify::default()
                }),
                [true, false, false],
            ),
            (
                Some(Notify {
                    failure: true,
                    delay: true,
                    success: true,
                    never: false,
                }),
                [true, true, true],
            ),
        ];
        for (notify, expected) in table {
            r.notify = notify;
            let got = [Failed, Delayed, Delivered].map(|a| should_notify(&r, a));
            assert_eq!(got, expected, "{notify:?}");
        }
        let mut env = envelope(None);
        assert!(may_send_dsn(&env));
        env.sender = None;
        assert!(!may_send_dsn(&env));
    }

    #[test]
    fn statuses_come_from_replies() {
        let fallback = EnhancedStatus(4, 4, 1);
        let table = [
            ("550 5.1.1 no such user", EnhancedStatus(5, 1, 1)),
            ("452-4.2.2 mailbox full", EnhancedStatus(4, 2, 2)),
            ("550 no such user", EnhancedStatus(5, 0, 0)),
            ("421 too busy", EnhancedStatus(4, 0, 0)),
            ("550 4.1.1 class does not match", EnhancedStatus(5, 0, 0)),
            ("554 5.7.1000 too long", EnhancedStatus(5, 0, 0)),
            ("connection refused", fallback),
            ("350 odd", fallback),
            ("", fallback),
        ];
        for (reply, status) in table {
            assert_eq!(status_of_reply(reply, fallback), status, "{reply}");
        }
    }

    #[test]
    fn success_reports_and_reports_without_sender() {
        let mut env = envelope(Some(Ret::Full));
        env.sender = None;
        let rcpt = DsnRecipient::new(
            &env.recipients[0],
            DsnAction::Delivered,
            EnhancedStatus(2, 0, 0),
        );
        let bytes = build(&report(&env, vec![rcpt]));
        assert_well_formed(&bytes);
        let msg = MessageParser::default().parse(&bytes).unwrap();
        assert_eq!(msg.subject(), Some("Successful Mail Delivery Report"));
        assert!(msg.to().is_none());
        let (kind, _) = returned(&bytes);
        assert_eq!(kind, "text/rfc822-headers");
    }

    #[test]
    fn folding_keeps_short_values_on_one_line() {
        assert_eq!(fold("Action", "failed"), "Action: failed\r\n");
        let long = fold("Diagnostic-Code", &"ab ".repeat(60));
        assert!(long.lines().all(|l| l.len() <= 78), "{long}");
        assert_eq!(
            long.replace("\r\n ", " "),
            format!("Diagnostic-Code: {}\r\n", "ab ".repeat(60).trim())
        );
        assert_eq!(xtext_for_display("a+2Bb+3Dc"), "a+b=c");
        assert_eq!(xtext_for_display("bad+2"), "bad+2");
        assert_eq!(xtext_for_display("ctl+0A"), "ctl+0A");
        assert_eq!(original_recipient("rfc822;x+40y@z"), "rfc822; x@y@z");
    }
}
