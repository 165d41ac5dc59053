//! Downgrading 8-bit messages for servers without 8BITMIME (RFC 6152
//! section 3).
//!
//! Each 8-bit leaf part is re-encoded, `text/*` as quoted-printable and
//! everything else as base64, and its `Content-Transfer-Encoding` set to
//! match; `multipart/*` bodies are walked by boundary, nested ones too.
//! Parts that are already 7-bit are copied byte for byte. What cannot be
//! converted is an error, and the caller bounces with 5.6.3: 8-bit header
//! fields (they would need SMTPUTF8) and 8-bit `message/*` parts, which
//! RFC 2046 forbids to encode.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;

/// Deeper nesting than this is refused rather than walked.
const MAX_DEPTH: usize = 32;
/// Base64 lines are this long (RFC 2045 allows at most 76).
const BASE64_LINE: usize = 76;

/// Why a message cannot be sent to a 7-bit server.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DowngradeError {
    #[error("8-bit octets in a header section")]
    EightBitHeader,
    #[error("8-bit content in a {0} part, which cannot be re-encoded")]
    EightBitMessagePart(String),
    #[error("8-bit octets in a part already declared {0}")]
    EightBitEncodedPart(String),
    #[error("multipart part without a boundary")]
    MissingBoundary,
    #[error("MIME parts nested more than {MAX_DEPTH} deep")]
    TooDeep,
}

/// Whether any octet has the high bit set.
pub fn is_8bit(body: &[u8]) -> bool {
    !body.is_ascii()
}

/// A message with only 7-bit octets that says the same, or the message
/// unchanged when it is already 7-bit. The message uses CRLF line ends, as
/// the DATA reader stores it.
pub fn downgrade(message: &[u8]) -> Result<Vec<u8>, DowngradeError> {
    let (header, body) = split_entity(message);
    if is_8bit(header) {
        return Err(DowngradeError::EightBitHeader);
    }
    if !is_8bit(body) {
        return Ok(message.to_vec());
    }
    let fields = Fields::parse(header);
    let mut added = Vec::new();
    if fields.get("MIME-Version").is_none() {
        added.push("MIME-Version: 1.0".to_string());
        if fields.get("Content-Type").is_none() {
            added.push("Content-Type: text/plain; charset=utf-8".to_string());
        }
    }
    let header: Vec<u8> = if added.is_empty() {
        header.to_vec()
    } else {
        let mut h = header.to_vec();
        for field in added {
            h.extend_from_slice(field.as_bytes());
            h.extend_from_slice(b"\r\n");
        }
        h
    };
    let (header, body) = convert(&header, body, ContentType::text_plain(), 0)?;
    let mut out = header;
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&body);
    Ok(out)
}

/// One entity (header section and body) made 7-bit.
fn convert(
    header: &[u8],
    body: &[u8],
    default: ContentType,
    depth: usize,
) -> Result<(Vec<u8>, Vec<u8>), DowngradeError> {
    if depth > MAX_DEPTH {
        return Err(DowngradeError::TooDeep);
    }
    if is_8bit(header) {
        return Err(DowngradeError::EightBitHeader);
    }
    if !is_8bit(body) {
        return Ok((header.to_vec(), body.to_vec()));
    }
    let fields = Fields::parse(header);
    let ctype = fields
        .get("Content-Type")
        .and_then(|v| ContentType::parse(&v))
        .unwrap_or(default);
    let encoding = fields
        .get("Content-Transfer-Encoding")
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_default();

    match ctype.kind.as_str() {
        "multipart" => {
            let boundary = ctype.boundary.ok_or(DowngradeError::MissingBoundary)?;
            let inner_default = if ctype.subtype == "digest" {
                ContentType::message_rfc822()
            } else {
                ContentType::text_plain()
            };
            let body = convert_multipart(body, boundary.as_bytes(), inner_default, depth)?;
            // The body is 7-bit now; say so if it claimed otherwise.
            let header = if matches!(encoding.as_str(), "8bit" | "binary") {
                fields.replace_encoding("7bit")
            } else {
                header.to_vec()
            };
            Ok((header, body))
        }
        "message" => Err(DowngradeError::EightBitMessagePart(format!(
            "message/{}",
            ctype.subtype
        ))),
        _ => {
            if matches!(encoding.as_str(), "quoted-printable" | "base64") {
                return Err(DowngradeError::EightBitEncodedPart(encoding));
            }
            if ctype.kind == "text" {
                let header = fields.replace_encoding("quoted-printable");
                Ok((header, quoted_printable::encode(body)))
            } else {
                let header = fields.replace_encoding("base64");
                Ok((header, base64_lines(body)))
            }
        }
    }
}

/// The body of a multipart entity with each part converted; preamble,
/// delimiter lines and epilogue are kept as they are, except that an
/// 8-bit preamble or epilogue (which readers ignore) is dropped.
fn convert_multipart(
    body: &[u8],
    boundary: &[u8],
    default: ContentType,
    depth: usize,
) -> Result<Vec<u8>, DowngradeError> {
    // Each delimiter line: where its preceding CRLF starts, where the line
    // starts, where it ends (after its CRLF), and whether it closes.
    let mut delimiters = Vec::new();
    let mut pos = 0;
    while pos < body.len() {
        let end = line_end(body, pos);
        let line = &body[pos..end];
        if let Some(close) = delimiter(line, boundary) {
            let before = if pos >= 2 { pos - 2 } else { pos };
            delimiters.push((before, end, close));
            if close {
                break;
            }
        }
        pos = end;
    }
    let Some(&(first, _, _)) = delimiters.first() else {
        // No parts at all: nothing readable to convert.
        return Err(DowngradeError::MissingBoundary);
    };

    let mut out = Vec::with_capacity(body.len() * 4 / 3);
    let preamble = &body[..first];
    if !is_8bit(preamble) {
        out.extend_from_slice(preamble);
    }
    // How far `body` has been written out: an empty part shares its CRLF
    // with the next delimiter, which must not be written twice.
    let mut written = first;
    for (i, &(before, line_end, close)) in delimiters.iter().enumerate() {
        out.extend_from_slice(&body[before.max(written)..line_end]);
        if close {
            let epilogue = &body[line_end..];
            if !is_8bit(epilogue) {
                out.extend_from_slice(epilogue);
            }
            return Ok(out);
        }
        // An unclosed multipart: the last part runs to the end.
        let part_end = delimiters
            .get(i + 1)
            .map_or(body.len(), |d| d.0)
            .max(line_end);
        let part = &body[line_end..part_end];
        written = part_end;
        if !is_8bit(part) {
            out.extend_from_slice(part);
            continue;
        }
        let (header, content) = split_entity(part);
        let (header, content) = convert(header, content, default.clone(), depth + 1)?;
        out.extend_from_slice(&header);
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&content);
    }
    Ok(out)
}

/// `Some(closes)` when the line is `--boundary` or `--boundary--`, with
/// optional trailing white space.
fn delimiter(line: &[u8], boundary: &[u8]) -> Option<bool> {
    let rest = line.strip_prefix(b"--")?.strip_prefix(boundary)?;
    let (close, rest) = match rest.strip_prefix(b"--") {
        Some(rest) => (true, rest),
        None => (false, rest),
    };
    rest.iter()
        .all(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
        .then_some(close)
}

/// Where the line that starts at `pos` ends: after its CRLF, or at the
/// end of `bytes` for a last line without one.
fn line_end(bytes: &[u8], pos: usize) -> usize {
    bytes[pos..]
        .windows(2)
        .position(|w| w == b"\r\n")
        .map_or(bytes.len(), |i| pos + i + 2)
}

/// Header section (with the CRLF ending its last field) and body of an
/// entity. An entity that starts with an empty line has no header fields;
/// one without an empty line is all header.
fn split_entity(entity: &[u8]) -> (&[u8], &[u8]) {
    if let Some(body) = entity.strip_prefix(b"\r\n") {
        return (&[], body);
    }
    match entity.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(pos) => (&entity[..pos + 2], &entity[pos + 4..]),
        None => (entity, &[]),
    }
}

/// Base64 in lines of [`BASE64_LINE`] characters, each ending in CRLF.
fn base64_lines(data: &[u8]) -> Vec<u8> {
    let encoded = BASE64.encode(data);
    let mut out = Vec::with_capacity(encoded.len() + encoded.len() / BASE64_LINE * 2 + 2);
    for line in encoded.as_bytes().chunks(BASE64_LINE) {
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// The fields of a header section, each with its raw bytes (folded lines
/// included) so untouched fields are written back as they were.
struct Fields<'a> {
    fields: Vec<&'a [u8]>,
}

impl<'a> Fields<'a> {
    fn parse(header: &'a [u8]) -> Self {
        let mut fields: Vec<&'a [u8]> = Vec::new();
        let mut start = 0;
        let mut pos = 0;
        while pos < header.len() {
            let end = line_end(header, pos);
            let continues = matches!(header[pos], b' ' | b'\t');
            if !continues && pos > start {
                fields.push(&header[start..pos]);
                start = pos;
            }
            pos = end;
        }
        if pos > start {
            fields.push(&header[start..pos]);
        }
        Fields { fields }
    }

    fn name(field: &[u8]) -> &[u8] {
        let colon = field.iter().position(|&b| b == b':').unwrap_or(0);
        field[..colon].trim_ascii()
    }

    /// The unfolded value of the first field called `name`.
    fn get(&self, name: &str) -> Option<String> {
        let field = self
            .fields
            .iter()
            .find(|f| Self::name(f).eq_ignore_ascii_case(name.as_bytes()))?;
        let colon = field.iter().position(|&b| b == b':')?;
        let value = String::from_utf8_lossy(&field[colon + 1..]);
        Some(value.replace("\r\n", "").trim().to_string())
    }

    /// The header section without its `Content-Transfer-Encoding` fields
    /// and with a new one at the end.
    fn replace_encoding(&self, encoding: &str) -> Vec<u8> {
        let mut out = Vec::new();
        for field in &self.fields {
            if !Self::name(field).eq_ignore_ascii_case(b"Content-Transfer-Encoding") {
                out.extend_from_slice(field);
                if !field.ends_with(b"\r\n") {
                    out.extend_from_slice(b"\r\n");
                }
            }
        }
        out.extend_from_slice(format!("Content-Transfer-Encoding: {encoding}\r\n").as_bytes());
        out
    }
}

/// The parts of a `Content-Type` value this module needs.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ContentType {
    /// Lower case: `text`, `multipart`, `message`, ...
    kind: String,
    subtype: String,
    boundary: Option<String>,
}

impl ContentType {
    fn text_plain() -> Self {
        ContentType {
            kind: "text".into(),
            subtype: "plain".into(),
            boundary: None,
        }
    }

    fn message_rfc822() -> Self {
        ContentType {
            kind: "message".into(),
            subtype: "rfc822".into(),
            boundary: None,
        }
    }

    /// `type/subtype; name=value; name="quoted value"` with comments left
    /// out; `None` when there is no `type/subtype`.
    fn parse(value: &str) -> Option<Self> {
        let value = strip_comments(value);
        let mut rest = value.as_str();
        let end = rest.find(';').unwrap_or(rest.len());
        let (kind, subtype) = rest[..end].split_once('/')?;
        let (kind, subtype) = (kind.trim(), subtype.trim());
        if kind.is_empty() || subtype.is_empty() {
            return None;
        }
        let mut ctype = ContentType {
            kind: kind.to_ascii_lowercase(),
            subtype: subtype.to_ascii_lowercase(),
            boundary: None,
        };
        rest = &rest[end..];
        while let Some(after) = rest.strip_prefix(';') {
            let after = after.trim_start();
            let Some(eq) = after.find('=') else { break };
            let name = after[..eq].trim();
            let after = after[eq + 1..].trim_start();
            let (param, next) = if let Some(quoted) = after.strip_prefix('"') {
                let mut value = String::new();
                let mut chars = quoted.char_indices();
                let mut end = quoted.len();
                while let Some((i, c)) = chars.next() {
                    match c {
                        '\\' => {
                            if let Some((_, c)) = chars.next() {
                                value.push(c);
                            }
                        }
                        '"' => {
                            end = i + 1;
                            break;
                        }
                        c => value.push(c),
                    }
                }
                let next = quoted[end..].find(';').map_or("", |i| &quoted[end + i..]);
                (value, next)
            } else {
                let end = after.find(';').unwrap_or(after.len());
                (after[..end].trim().to_string(), &after[end..])
            };
            if name.eq_ignore_ascii_case("boundary") && !param.is_empty() {
                ctype.boundary = Some(param);
            }
            rest = next;
        }
        Some(ctype)
    }
}

/// The value with `(comments)` outside quoted strings removed.
fn strip_comments(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut depth = 0usize;
    let mut quoted = false;
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' if quoted || depth > 0 => {
                let next = chars.next();
                if depth == 0 {
                    out.push(c);
                    out.extend(next);
                }
            }
            '"' if depth == 0 => {
                quoted = !quoted;
                out.push(c);
            }
            '(' if !quoted => depth += 1,
            ')' if !quoted && depth > 0 => depth -= 1,
            c if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use mail_parser::{MessageParser, MimeHeaders, PartType};

    use super::*;

    /// Pure 7-bit, CRLF only, no line over 998 octets.
    fn assert_7bit(message: &[u8]) {
        assert!(!is_8bit(message));
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
    }

    /// Every leaf part as the reader sees it: content type and decoded bytes.
    fn leaves(message: &[u8]) -> Vec<(String, Vec<u8>)> {
        let msg = MessageParser::default().parse(message).unwrap();
        msg.parts
            .iter()
            .filter(|p| !matches!(p.body, PartType::Multipart(_) | PartType::Message(_)))
            .map(|p| {
                let ct = p
                    .content_type()
                    .map(|c| format!("{}/{}", c.ctype(), c.subtype().unwrap_or("")))
                    .unwrap_or_else(|| "text/plain".into());
                (ct, p.contents().to_vec())
            })
            .collect()
    }

    fn cte(message: &[u8], part: usize) -> Option<String> {
        let msg = MessageParser::default().parse(message).unwrap();
        msg.parts[part]
            .content_transfer_encoding()
            .map(|s| s.to_string())
    }

    const PLAIN_8BIT: &str = "From: a@example.com\r\nSubject: hi\r\n\r\n\
        Gr\u{fc}\u{df}e aus K\u{f6}ln \u{2014} caf\u{e9}\r\nsecond line\r\n";

    const MULTIPART: &str = "From: a@example.com\r\n\
        MIME-Version: 1.0\r\n\
        Content-Type: multipart/mixed;\r\n boundary=\"outer b\"\r\n\
        Content-Transfer-Encoding: 8bit\r\n\
        \r\n\
        preamble\r\n\
        --outer b\r\n\
        Content-Type: text/plain; charset=us-ascii\r\n\
        \r\n\
        seven bit part\r\n\
        \r\n\
        --outer b\r\n\
        Content-Type: text/plain; charset=utf-8\r\n\
        Content-Transfer-Encoding: 8bit\r\n\
        \r\n\
        na\u{ef}ve r\u{e9}sum\u{e9} = fine\r\n\
        --outer b\r\n\
        Content-Type: application/octet-stream\r\n\
        Content-Transfer-Encoding: binary\r\n\
        \r\n\
        \u{ff}\u{fe}binary\u{80}data\r\n\
        --outer b--\r\n\
        epilogue\r\n";

    const NESTED: &str = "MIME-Version: 1.0\r\n\
        Content-Type: multipart/mixed; boundary=outer\r\n\
        \r\n\
        --outer\r\n\
        Content-Type: multipart/alternative; boundary=\"inner\"\r\n\
        \r\n\
        --inner\r\n\
        Content-Type: text/plain; charset=utf-8\r\n\
        \r\n\
        \u{3053}\u{3093}\u{306b}\u{3061}\u{306f}\r\n\
        --inner\r\n\
        Content-Type: text/html; charset=utf-8\r\n\
        \r\n\
        <p>\u{3053}\u{3093}\u{306b}\u{3061}\u{306f}</p>\r\n\
        --inner--\r\n\
        \r\n\
        --outer\r\n\
        Content-Type: text/plain\r\n\
        \r\n\
        ascii tail\r\n\
        --outer--\r\n";

    const SEVEN_BIT: &str = "From: a@example.com\r\n\
        MIME-Version: 1.0\r\n\
        Content-Type: multipart/mixed; boundary=b\r\n\
        \r\n\
        --b\r\n\
        Content-Type: text/plain\r\n\
        Content-Transfer-Encoding: 8bit\r\n\
        \r\n\
        nothing to do\r\n\
        --b--\r\n";

    #[test]
    fn eight_bit_messages_become_seven_bit_and_read_the_same() {
        let long_line = format!("Subject: long\r\n\r\n{}\r\n", "\u{e9}t\u{e9} ".repeat(400));
        let table: [(&str, &str, usize); 4] = [
            ("plain", PLAIN_8BIT, 1),
            ("multipart", MULTIPART, 3),
            ("nested", NESTED, 3),
            ("long line", &long_line, 1),
        ];
        for (name, message, leaf_count) in table {
            let message = message.as_bytes();
            assert!(is_8bit(message), "{name}");
            let out = downgrade(message).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_7bit(&out);
            let before = leaves(message);
            let after = leaves(&out);
            assert_eq!(before.len(), leaf_count, "{name}");
            assert_eq!(after, before, "{name}: {}", String::from_utf8_lossy(&out));
            assert_eq!(
                downgrade(&out).unwrap(),
                out,
                "{name}: a second pass changes nothing"
            );
        }
    }

    #[test]
    fn a_message_without_mime_fields_gets_them() {
        let out = downgrade(PLAIN_8BIT.as_bytes()).unwrap();
        let text = String::from_utf8(out.clone()).unwrap();
        assert!(text.starts_with(
            "From: a@example.com\r\nSubject: hi\r\nMIME-Version: 1.0\r\n\
             Content-Type: text/plain; charset=utf-8\r\n\
             Content-Transfer-Encoding: quoted-printable\r\n\r\n"
        ));
        assert!(text.ends_with("\r\nsecond line\r\n"), "{text}");
        let msg = MessageParser::default().parse(&out).unwrap();
        assert_eq!(
            msg.body_text(0).unwrap(),
            "Gr\u{fc}\u{df}e aus K\u{f6}ln \u{2014} caf\u{e9}\r\nsecond line\r\n"
        );

        // An existing Content-Type is kept.
        let out = downgrade(
            "Content-Type: text/plain; charset=iso-8859-1\r\n\r\nd\u{e9}j\u{e0}\r\n".as_bytes(),
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "Content-Type: text/plain; charset=iso-8859-1\r\nMIME-Version: 1.0\r\n\
             Content-Transfer-Encoding: quoted-printable\r\n\r\nd=C3=A9j=C3=A0\r\n"
        );
    }

    #[test]
    fn seven_bit_parts_are_kept_byte_for_byte() {
        assert_eq!(
            downgrade(SEVEN_BIT.as_bytes()).unwrap(),
            SEVEN_BIT.as_bytes()
        );
        let out = downgrade(MULTIPART.as_bytes()).unwrap();
        let text = String::from_utf8(out.clone()).unwrap();
        assert!(text.contains(
            "preamble\r\n--outer b\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n\
             seven bit part\r\n\r\n--outer b\r\n"
        ));
        assert!(text.ends_with("--outer b--\r\nepilogue\r\n"));
        // The multipart's own 8bit label is now 7bit; the leaves say what
        // they were encoded with.
        assert_eq!(cte(&out, 0).as_deref(), Some("7bit"));
        assert_eq!(cte(&out, 1), None);
        assert_eq!(cte(&out, 2).as_deref(), Some("quoted-printable"));
        assert_eq!(cte(&out, 3).as_deref(), Some("base64"));
        assert!(text.contains("na=C3=AFve r=C3=A9sum=C3=A9 =3D fine\r\n--outer b\r\n"));
        assert_eq!(text.matches("Content-Transfer-Encoding").count(), 3);
    }

    #[test]
    fn what_cannot_be_converted_is_an_error() {
        let table: [(&str, DowngradeError); 6] = [
            (
                "Subject: caf\u{e9}\r\n\r\nbody\r\n",
                DowngradeError::EightBitHeader,
            ),
            (
                // An 8-bit header field inside a part.
                "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n\
                 --b\r\nContent-Description: caf\u{e9}\r\n\r\nx\r\n--b--\r\n",
                DowngradeError::EightBitHeader,
            ),
            (
                "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n\
                 --b\r\nContent-Type: message/rfc822\r\n\r\nSubject: x\r\n\r\nd\u{e9}j\u{e0}\r\n--b--\r\n",
                DowngradeError::EightBitMessagePart("message/rfc822".into()),
            ),
            (
                "MIME-Version: 1.0\r\nContent-Type: multipart/digest; boundary=b\r\n\r\n\
                 --b\r\n\r\nSubject: x\r\n\r\nd\u{e9}j\u{e0}\r\n--b--\r\n",
                DowngradeError::EightBitMessagePart("message/rfc822".into()),
            ),
            (
                "MIME-Version: 1.0\r\nContent-Type: multipart/mixed\r\n\r\nd\u{e9}j\u{e0}\r\n",
                DowngradeError::MissingBoundary,
            ),
            (
                "MIME-Version: 1.0\r\nContent-Transfer-Encoding: base64\r\n\r\nd\u{e9}j\u{e0}\r\n",
                DowngradeError::EightBitEncodedPart("base64".into()),
            ),
        ];
        for (message, error) in table {
            assert_eq!(downgrade(message.as_bytes()), Err(error), "{message}");
        }
    }

    #[test]
    fn nesting_is_limited() {
        let mut message = String::from("MIME-Version: 1.0\r\n");
        for i in 0..40 {
            message.push_str(&format!(
                "Content-Type: multipart/mixed; boundary=b{i}\r\n\r\n--b{i}\r\n"
            ));
        }
        message.push_str("\r\n\u{e9}\r\n");
        assert_eq!(downgrade(message.as_bytes()), Err(DowngradeError::TooDeep));
    }

    #[test]
    fn content_types_are_parsed_with_quotes_and_comments() {
        let table = [
            ("text/plain", Some(("text", "plain", None))),
            (
                "Multipart/Mixed; boundary=\"a \\\"b\\\" c\"; x=y",
                Some(("multipart", "mixed", Some("a \"b\" c"))),
            ),
            (
                "multipart/related (comment; boundary=no); type=x; BOUNDARY=yes",
                Some(("multipart", "related", Some("yes"))),
            ),
            ("text", None),
            ("/plain", None),
        ];
        for (value, expected) in table {
            let got = ContentType::parse(value);
            let got = got
                .as_ref()
                .map(|c| (c.kind.as_str(), c.subtype.as_str(), c.boundary.as_deref()));
            assert_eq!(got, expected, "{value}");
        }
    }

    #[test]
    fn quoted_printable_lines_stay_short() {
        let message = format!("Subject: long\r\n\r\n{}\r\n", "\u{e9}t\u{e9} ".repeat(400));
        let out = downgrade(message.as_bytes()).unwrap();
        let (_, body) = split_entity(&out);
        for line in body.split(|&b| b == b'\n') {
            assert!(line.len() <= 77, "{}", String::from_utf8_lossy(line));
        }
        assert!(body.len() > 2400);
    }

    proptest::proptest! {
        /// Plausible MIME pieces and 8-bit bytes in any order: never a
        /// panic, and whatever comes back is 7-bit.
        #[test]
        fn random_messages_never_panic(pieces in proptest::collection::vec(
            proptest::sample::select(vec![
                &b"Content-Type: multipart/mixed; boundary=b\r\n"[..],
                b"Content-Type: text/plain\r\n",
                b"Content-Type: message/rfc822\r\n",
                b"Content-Transfer-Encoding: 8bit\r\n",
                b"MIME-Version: 1.0\r\n",
                b"\r\n",
                b"--b\r\n",
                b"--b--\r\n",
                b"--b",
                b"text\r\n",
                b"\xc3\xa9",
                b"\xff\r\n",
                b"\r",
                b"\n",
            ]),
            0..40,
        )) {
            let message = pieces.concat();
            if let Ok(out) = downgrade(&message) {
                proptest::prop_assert!(!is_8bit(&out));
            }
        }
    }

    #[test]
    fn eight_bit_detection() {
        assert!(!is_8bit(b"plain ascii\r\n"));
        assert!(is_8bit("caf\u{e9}".as_bytes()));
        assert!(is_8bit(&[0x80]));
        assert!(!is_8bit(&[]));
    }
}
