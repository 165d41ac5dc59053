//! Builds a MIME message from its parts: what an application hands over
//! instead of a message of its own (`smarthost send`).
//!
//! Pure: the parts in, the envelope and the message's bytes out, or the
//! field at fault. Addresses are checked as SMTP checks them, and nothing
//! a caller gives can add a header line of its own (no CR, LF or other
//! control characters in names, subject or header values). The MIME
//! structure and its encodings are `mail-builder`'s: text and HTML as
//! `multipart/alternative`, attachments and inline parts in a
//! `multipart/mixed` around it.

use std::borrow::Cow;

use mail_builder::headers::address::Address;
use mail_builder::headers::text::Text;
use mail_builder::MessageBuilder;
use smarthost_proto::address::{parse_reverse_path, Mailbox};

/// An address with an optional display name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Named {
    pub name: Option<String>,
    pub email: String,
}

impl From<&str> for Named {
    fn from(email: &str) -> Named {
        Named {
            name: None,
            email: email.to_string(),
        }
    }
}

/// A file carried with the message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub filename: String,
    pub content_type: String,
    pub content: Vec<u8>,
    /// Shown in the HTML body (`cid:`) rather than as a file.
    pub content_id: Option<String>,
}

/// What a message is made of.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Parts {
    pub from: Option<Named>,
    pub to: Vec<Named>,
    pub cc: Vec<Named>,
    /// Recipients not named in the headers.
    pub bcc: Vec<Named>,
    pub reply_to: Option<Named>,
    pub subject: String,
    pub text: Option<String>,
    pub html: Option<String>,
    /// Further header lines, in order.
    pub headers: Vec<(String, String)>,
    pub attachments: Vec<Attachment>,
}

/// A message ready to queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Composed {
    pub sender: Mailbox,
    /// To, Cc and Bcc, each address once.
    pub recipients: Vec<Mailbox>,
    /// RFC 5322, CRLF line ends.
    pub message: Vec<u8>,
}

/// What is wrong, and where (`to[1]`, `headers[0].name`, ...).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ComposeError {
    pub field: String,
    pub message: String,
}

pub(crate) fn fault(field: impl Into<String>, message: impl Into<String>) -> ComposeError {
    ComposeError {
        field: field.into(),
        message: message.into(),
    }
}

/// Header fields the parts set, or the relay does: a caller's header may
/// not name them.
const RESERVED_HEADERS: &[&str] = &[
    "from",
    "to",
    "cc",
    "bcc",
    "reply-to",
    "subject",
    "date",
    "message-id",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "content-disposition",
    "received",
    "return-path",
    "sender",
];

/// Builds the message. `hostname` goes into the `Message-ID`; `now_secs`
/// (seconds since the epoch) is the `Date`; `unique` makes the
/// `Message-ID` unique (the queue id of the message, say).
pub fn compose(
    parts: &Parts,
    hostname: &str,
    now_secs: u64,
    unique: &str,
) -> Result<Composed, ComposeError> {
    let from = parts
        .from
        .as_ref()
        .ok_or_else(|| fault("from", "a sender is required"))?;
    let sender = mailbox("from", from)?;
    let recipients = recipients(
        [("to", &parts.to), ("cc", &parts.cc), ("bcc", &parts.bcc)]
            .map(|(list, named)| (list, named.clone())),
    )?;
    if let Some(reply_to) = &parts.reply_to {
        mailbox("reply_to", reply_to)?;
    }
    one_line("subject", &parts.subject)?;
    for (i, (name, value)) in parts.headers.iter().enumerate() {
        header_name(&format!("headers[{i}].name"), name)?;
        one_line(&format!("headers[{i}].value"), value)?;
    }
    for (i, attachment) in parts.attachments.iter().enumerate() {
        check_attachment(i, attachment)?;
    }

    let mut builder = MessageBuilder::new()
        .from(address(from))
        .subject(parts.subject.as_str())
        .date(now_secs as i64)
        .message_id(format!("{unique}@{hostname}"));
    if !parts.to.is_empty() {
        builder = builder.to(Address::new_list(parts.to.iter().map(address).collect()));
    }
    if !parts.cc.is_empty() {
        builder = builder.cc(Address::new_list(parts.cc.iter().map(address).collect()));
    }
    if let Some(reply_to) = &parts.reply_to {
        builder = builder.reply_to(address(reply_to));
    }
    for (name, value) in &parts.headers {
        builder = builder.header(name.as_str(), Text::new(value.as_str()));
    }
    match (&parts.text, &parts.html) {
        (None, None) => builder = builder.text_body(""),
        (text, html) => {
            if let Some(text) = text {
                builder = builder.text_body(text.as_str());
            }
            if let Some(html) = html {
                builder = builder.html_body(html.as_str());
            }
        }
    }
    for attachment in &parts.attachments {
        let content = attachment.content.as_slice();
        let content_type = attachment.content_type.as_str();
        builder = match &attachment.content_id {
            Some(cid) => builder.inline(content_type, cid.as_str(), content),
            None => builder.attachment(content_type, attachment.filename.as_str(), content),
        };
    }
    let message = builder
        .write_to_vec()
        .map_err(|e| fault("message", e.to_string()))?;
    Ok(Composed {
        sender,
        recipients,
        message,
    })
}

/// A message the caller wrote whole (RFC 5322): its envelope comes from
/// its headers, the sender from `From`, the recipients from `To`, `Cc` and
/// `Bcc`; `Bcc` lines are taken out, line ends made CRLF, and a `Date` and
/// a `Message-ID` added when it has none. NUL is refused, as in DATA.
pub fn from_raw(
    raw: &[u8],
    hostname: &str,
    now_secs: u64,
    unique: &str,
) -> Result<Composed, ComposeError> {
    if raw.contains(&0) {
        return Err(fault("message", "NUL octets are not allowed"));
    }
    let message = crlf(raw);
    let parsed = mail_parser::MessageParser::default()
        .parse_headers(&message)
        .ok_or_else(|| fault("message", "no header fields"))?;
    let named = |a: &mail_parser::Addr<'_>| Named {
        name: None,
        email: a.address().unwrap_or_default().to_string(),
    };
    let from = parsed
        .from()
        .and_then(|from| from.first())
        .map(named)
        .ok_or_else(|| fault("From", "a From header with an address is required"))?;
    let sender = mailbox("From", &from)?;
    let recipients = recipients(
        [
            ("To", parsed.to()),
            ("Cc", parsed.cc()),
            ("Bcc", parsed.bcc()),
        ]
        .map(|(header, list)| {
            let named: Vec<Named> = list.into_iter().flat_map(|l| l.iter()).map(named).collect();
            (header, named)
        }),
    )?;
    let mut added = String::new();
    if parsed.date().is_none() {
        let date = mail_builder::headers::date::Date::new(now_secs as i64).to_rfc822();
        added.push_str(&format!("Date: {date}\r\n"));
    }
    if parsed.message_id().is_none() {
        added.push_str(&format!("Message-ID: <{unique}@{hostname}>\r\n"));
    }
    let mut out = added.into_bytes();
    out.extend_from_slice(&without_field(&message, "bcc"));
    Ok(Composed {
        sender,
        recipients,
        message: out,
    })
}

/// The recipients of three lists (To, Cc, Bcc, named as the caller names
/// them), each address once; at least one.
fn recipients(lists: [(&str, Vec<Named>); 3]) -> Result<Vec<Mailbox>, ComposeError> {
    let mut recipients: Vec<Mailbox> = Vec::new();
    for (list, named) in &lists {
        for (i, address) in named.iter().enumerate() {
            let mailbox = mailbox(&format!("{list}[{i}]"), address)?;
            if !recipients.contains(&mailbox) {
                recipients.push(mailbox);
            }
        }
    }
    if recipients.is_empty() {
        let [(first, _), (second, _), (third, _)] = &lists;
        return Err(fault(
            *first,
            format!("at least one recipient ({first}, {second} or {third}) is required"),
        ));
    }
    Ok(recipients)
}

/// `bytes` with every CR and LF that is not part of a CRLF made a CRLF.
pub(crate) fn crlf(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + bytes.len() / 32);
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\r' if bytes.get(i + 1) == Some(&b'\n') => {
                out.extend_from_slice(b"\r\n");
                i += 1;
            }
            b'\r' | b'\n' => out.extend_from_slice(b"\r\n"),
            b => out.push(b),
        }
        i += 1;
    }
    out
}

/// The message without the header fields called `name` (any case), their
/// folded lines included; the body is left as it is.
fn without_field(message: &[u8], name: &str) -> Vec<u8> {
    let head_len = message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(message.len(), |at| at + 2);
    let mut out = Vec::with_capacity(message.len());
    let mut dropping = false;
    for line in message[..head_len].split_inclusive(|&b| b == b'\n') {
        if !line.starts_with(b" ") && !line.starts_with(b"\t") {
            let field = line.split(|&b| b == b':').next().unwrap_or_default();
            dropping = field.trim_ascii().eq_ignore_ascii_case(name.as_bytes());
        }
        if !dropping {
            out.extend_from_slice(line);
        }
    }
    out.extend_from_slice(&message[head_len..]);
    out
}

fn address(named: &Named) -> Address<'_> {
    Address::new_address(
        named.name.as_deref().map(Cow::Borrowed),
        named.email.as_str(),
    )
}

/// The address as SMTP would take it in `MAIL FROM`/`RCPT TO`, and a
/// display name that stays on one line.
fn mailbox(field: &str, named: &Named) -> Result<Mailbox, ComposeError> {
    if let Some(name) = &named.name {
        one_line(&format!("{field}.name"), name)?;
    }
    let email = named.email.trim();
    if email.is_empty() || email.contains(['<', '>']) {
        return Err(fault(field, format!("not an address: {:?}", named.email)));
    }
    match parse_reverse_path(&format!("<{email}>")) {
        Ok(Some(path)) => Ok(path.mailbox),
        Ok(None) => Err(fault(field, "an address is required")),
        Err(e) => Err(fault(field, format!("{e}: {email:?}"))),
    }
}

/// Text for one header line: no control characters but tab.
fn one_line(field: &str, text: &str) -> Result<(), ComposeError> {
    match text.chars().find(|c| c.is_control() && *c != '\t') {
        Some(c) => Err(fault(
            field,
            format!("control character {c:?} not allowed in a header"),
        )),
        None => Ok(()),
    }
}

/// A header field name (RFC 5322 `ftext`) the parts do not set already.
fn header_name(field: &str, name: &str) -> Result<(), ComposeError> {
    if name.is_empty() || !name.bytes().all(|b| (33..=126).contains(&b) && b != b':') {
        return Err(fault(field, format!("not a header field name: {name:?}")));
    }
    if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
        return Err(fault(
            field,
            format!("{name} is set from the message's fields, not as a header"),
        ));
    }
    Ok(())
}

fn check_attachment(i: usize, attachment: &Attachment) -> Result<(), ComposeError> {
    let field = |name: &str| format!("attachments[{i}].{name}");
    if attachment.filename.trim().is_empty() && attachment.content_id.is_none() {
        return Err(fault(field("filename"), "a file name is required"));
    }
    one_line(&field("filename"), &attachment.filename)?;
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    match attachment.content_type.split_once('/') {
        Some((kind, subtype)) if token(kind) && token(subtype) => {}
        _ => {
            return Err(fault(
                field("content_type"),
                format!("not a media type: {:?}", attachment.content_type),
            ))
        }
    }
    if let Some(cid) = &attachment.content_id {
        if cid.is_empty() || cid.contains(['<', '>']) || cid.chars().any(char::is_control) {
            return Err(fault(
                field("content_id"),
                format!("not a content id: {cid:?}"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use mail_parser::MimeHeaders;

    use super::*;

    fn parts() -> Parts {
        Parts {
            from: Some(Named {
                name: Some("Shop Café".into()),
                email: "shop@app.example".into(),
            }),
            to: vec!["Alice@Example.ORG".into(), "bob@example.net".into()],
            cc: vec!["carol@example.com".into()],
            bcc: vec!["audit@app.example".into(), "bob@example.net".into()],
            subject: "Your order ✓".into(),
            text: Some("Thank you.\n".into()),
            html: Some("<p>Thank you.</p><img src=\"cid:logo\">".into()),
            headers: vec![("X-Order".into(), "1234".into())],
            attachments: vec![
                Attachment {
                    filename: "invoice.pdf".into(),
                    content_type: "application/pdf".into(),
                    content: (0..=255u8).cycle().take(5000).collect(),
                    content_id: None,
                },
                Attachment {
                    filename: "logo.png".into(),
                    content_type: "image/png".into(),
                    content: vec![0x89, b'P', b'N', b'G', 0, 1, 2],
                    content_id: Some("logo".into()),
                },
            ],
            ..Parts::default()
        }
    }

    #[test]
    fn a_message_with_every_part_parses_back() {
        let composed = compose(&parts(), "relay.test", 1_700_000_000, "abc123").unwrap();
        assert_eq!(composed.sender.to_string(), "shop@app.example");
        let recipients: Vec<String> = composed
            .recipients
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            recipients,
            [
                "Alice@example.org",
                "bob@example.net",
                "carol@example.com",
                "audit@app.example"
            ],
            "once each, domains in routing form"
        );
        let message = mail_parser::MessageParser::default()
            .parse(&composed.message)
            .expect("parses");
        assert_eq!(message.subject(), Some("Your order ✓"));
        assert_eq!(message.message_id(), Some("abc123@relay.test"));
        assert_eq!(
            message.date().map(|d| d.to_timestamp()),
            Some(1_700_000_000)
        );
        assert_eq!(
            message
                .from()
                .and_then(|a| a.first())
                .and_then(|a| a.name()),
            Some("Shop Café")
        );
        assert_eq!(message.to().map(|a| a.iter().count()), Some(2));
        assert!(message.bcc().is_none(), "Bcc stays out of the headers");
        assert_eq!(message.header_raw("X-Order").map(str::trim), Some("1234"));
        // Line ends go out as CRLF.
        assert_eq!(message.body_text(0).as_deref(), Some("Thank you.\r\n"));
        assert!(message.body_html(0).unwrap().contains("cid:logo"));
        let invoice = message
            .attachments()
            .find(|a| a.attachment_name() == Some("invoice.pdf"))
            .expect("the invoice");
        assert_eq!(
            invoice.contents(),
            parts().attachments[0].content.as_slice()
        );
        let logo = message
            .attachments()
            .find(|a| a.content_id() == Some("logo"))
            .expect("the inline logo");
        assert_eq!(logo.contents(), parts().attachments[1].content.as_slice());
        let text = String::from_utf8_lossy(&composed.message);
        assert!(!text.contains("audit@"), "{text}");
        assert!(text.lines().all(|l| l.len() <= 998), "line length");
    }

    #[test]
    fn bad_parts_name_their_field() {
        type Change = fn(&mut Parts);
        let table: &[(Change, &str)] = &[
            (|p| p.from = None, "from"),
            (|p| p.from = Some("not an address".into()), "from"),
            (|p| p.to[1] = "bob@".into(), "to[1]"),
            (|p| p.cc = vec!["<carol@example.com>".into()], "cc[0]"),
            (
                |p| {
                    p.to.clear();
                    p.cc.clear();
                    p.bcc.clear();
                },
                "to",
            ),
            (
                |p| p.subject = "hi\r\nBcc: victim@example.org".into(),
                "subject",
            ),
            (
                |p| {
                    p.to[0] = Named {
                        name: Some("A\nB".into()),
                        email: "a@example.org".into(),
                    }
                },
                "to[0].name",
            ),
            (
                |p| p.headers = vec![("X Bad".into(), "v".into())],
                "headers[0].name",
            ),
            (
                |p| p.headers = vec![("Bcc".into(), "x@example.org".into())],
                "headers[0].name",
            ),
            (
                |p| p.headers = vec![("X-Ok".into(), "a\rb".into())],
                "headers[0].value",
            ),
            (
                |p| p.attachments[0].content_type = "pdf".into(),
                "attachments[0].content_type",
            ),
            (
                |p| p.attachments[0].filename = " ".into(),
                "attachments[0].filename",
            ),
            (
                |p| p.attachments[1].content_id = Some("<x>".into()),
                "attachments[1].content_id",
            ),
        ];
        for (i, (change, field)) in table.iter().enumerate() {
            let mut p = parts();
            change(&mut p);
            let error = compose(&p, "relay.test", 0, "x").unwrap_err();
            assert_eq!(error.field, *field, "case {i}: {error}");
        }
    }

    #[test]
    fn a_raw_message_gives_its_envelope_and_loses_its_bcc() {
        let raw = b"From: Shop <shop@app.example>\nTo: a@example.org, B <b@example.net>\n\
Bcc: audit@app.example,\n  second@app.example\nSubject: hi\n\nbody\nBcc: in the body stays\n";
        let composed = from_raw(raw, "relay.test", 1_700_000_000, "u1").unwrap();
        assert_eq!(composed.sender.to_string(), "shop@app.example");
        let recipients: Vec<String> = composed
            .recipients
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            recipients,
            [
                "a@example.org",
                "b@example.net",
                "audit@app.example",
                "second@app.example"
            ]
        );
        let text = String::from_utf8(composed.message).unwrap();
        assert!(text.starts_with("Date: "), "{text}");
        assert!(text.contains("Message-ID: <u1@relay.test>\r\n"), "{text}");
        assert!(
            !text.contains("audit@") && !text.contains("second@"),
            "{text}"
        );
        assert!(
            text.ends_with("\r\n\r\nbody\r\nBcc: in the body stays\r\n"),
            "{text}"
        );
        assert!(!text.replace("\r\n", "").contains('\n'), "CRLF only");

        let table: &[(&[u8], &str)] = &[
            (b"To: a@example.org\r\n\r\nx", "From"),
            (b"From: a@example.org\r\n\r\nx", "To"),
            (b"From: a@example.org\r\nTo: b@\r\n\r\nx", "To[0]"),
            (
                b"From: a@example.org\r\nTo: b@example.org\r\n\r\nx\0",
                "message",
            ),
        ];
        for (raw, field) in table {
            let error = from_raw(raw, "relay.test", 0, "u").unwrap_err();
            assert_eq!(error.field, *field, "{error}");
        }
    }

    proptest::proptest! {
        /// Whatever the header lines and line ends, the result has CRLF
        /// line ends only, no Bcc field in its head, and the body as sent.
        #[test]
        fn bcc_never_survives_and_line_ends_are_crlf(
            fields in proptest::collection::vec(
                proptest::sample::select(vec![
                    "Bcc: x@example.org", "BCC:y@example.org", "bcc :z@example.org",
                    " ,folded@example.org", "\t, folded2@example.org", "X-Bcc: kept", "Subject: s",
                    "Cc: c@example.org",
                ]),
                0..8,
            ),
            ends in proptest::collection::vec(
                proptest::sample::select(vec!["\r\n", "\n", "\r"]), 12),
            body in "[a-z .\r\n]{0,40}",
        ) {
            let mut raw = String::from("From: a@example.org\r\nTo: b@example.org");
            for (i, field) in fields.iter().enumerate() {
                raw.push_str(ends[i % ends.len()]);
                raw.push_str(field);
            }
            raw.push_str("\r\n\r\n");
            raw.push_str(&body);
            let out = from_raw(raw.as_bytes(), "relay.test", 0, "u").unwrap().message;
            let text = String::from_utf8(out).unwrap();
            proptest::prop_assert!(!text.replace("\r\n", "").contains(['\r', '\n']));
            let (head, rest) = text.split_once("\r\n\r\n").unwrap();
            for line in head.split("\r\n") {
                let name = line.split(':').next().unwrap().trim().to_ascii_lowercase();
                proptest::prop_assert!(name != "bcc", "{}", text);
                for hidden in ["x@example.org", "y@example.org", "z@example.org"] {
                    proptest::prop_assert!(!line.contains(hidden), "{}", text);
                }
            }
            proptest::prop_assert_eq!(rest, String::from_utf8(crlf(body.as_bytes())).unwrap());
        }
    }

    #[test]
    fn no_body_gives_an_empty_text_part() {
        let p = Parts {
            from: Some("a@example.org".into()),
            to: vec!["b@example.org".into()],
            ..Parts::default()
        };
        let composed = compose(&p, "relay.test", 0, "x").unwrap();
        let message = mail_parser::MessageParser::default()
            .parse(&composed.message)
            .unwrap();
        assert_eq!(message.body_text(0).as_deref().map(str::trim), Some(""));
    }
}
