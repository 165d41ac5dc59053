//! RFC 5321 mailboxes and the paths of MAIL and RCPT.
//!
//! The parser reads one path (`<...>`) and hands back what follows it, so
//! the command parser can go on with the ESMTP parameters: a quoted local
//! part may hold spaces, so the path cannot be cut at the first blank.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

/// Longest local part, in octets (RFC 5321 section 4.5.3.1.1).
pub const MAX_LOCAL_PART: usize = 64;
/// Longest domain, in octets (RFC 5321 section 4.5.3.1.2).
pub const MAX_DOMAIN: usize = 255;
/// Longest DNS label, in octets.
const MAX_LABEL: usize = 63;

/// A mailbox as it travels in an envelope.
///
/// The domain is kept in its routing form: lower case, IDNA A-labels for
/// names, or a bracketed address literal (`[192.0.2.1]`, `[IPv6:2001:db8::1]`).
/// The local part is kept exactly as the client sent it, without quotes
/// (it may hold UTF-8 when SMTPUTF8 was used).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Mailbox {
    pub local_part: String,
    pub domain: String,
}

impl Mailbox {
    /// Whether the mailbox can only travel with SMTPUTF8 (RFC 6531): the
    /// domain is already ASCII, so only the local part can need it.
    pub fn needs_smtputf8(&self) -> bool {
        !self.local_part.is_ascii() || !self.domain.is_ascii()
    }
}

/// Writes `local@domain`, quoting the local part when it is not a
/// dot-string, so the text can be sent back on the wire as is.
impl fmt::Display for Mailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if is_dot_string(&self.local_part) {
            f.write_str(&self.local_part)?;
        } else {
            f.write_str("\"")?;
            for c in self.local_part.chars() {
                if c == '"' || c == '\\' {
                    f.write_str("\\")?;
                }
                write!(f, "{c}")?;
            }
            f.write_str("\"")?;
        }
        write!(f, "@{}", self.domain)
    }
}

/// A sender an application key or an SMTP user may use: one address, or
/// every address of a domain (not its subdomains).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SenderRule {
    Address(Mailbox),
    Domain(String),
}

impl SenderRule {
    pub fn parse(text: &str) -> Result<SenderRule, String> {
        let text = text.trim();
        if text.contains('@') {
            let (local, domain) = text.rsplit_once('@').unwrap_or_default();
            let (domain, _) = parse_domain(domain).map_err(|e| format!("{text:?}: {e}"))?;
            if local.is_empty() {
                return Err(format!("{text:?}: no local part"));
            }
            Ok(SenderRule::Address(Mailbox {
                local_part: local.to_string(),
                domain,
            }))
        } else {
            let (domain, _) = parse_domain(text).map_err(|e| format!("{text:?}: {e}"))?;
            Ok(SenderRule::Domain(domain))
        }
    }

    /// The rules of a configured list; one that does not parse (refused
    /// by validation before) is left out.
    pub fn parse_list(texts: &[String]) -> Vec<SenderRule> {
        texts
            .iter()
            .filter_map(|t| SenderRule::parse(t).ok())
            .collect()
    }

    /// Local parts compare without regard to case, as almost every
    /// mailbox does; domains are in routing form already.
    pub fn allows(&self, sender: &Mailbox) -> bool {
        match self {
            SenderRule::Domain(domain) => sender.domain == *domain,
            SenderRule::Address(address) => {
                address.domain == sender.domain
                    && address.local_part.eq_ignore_ascii_case(&sender.local_part)
            }
        }
    }
}

/// A mailbox read from a path, with what the path told us besides it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathMailbox {
    pub mailbox: Mailbox,
    /// The client wrote a source route (`<@a,@b:user@c>`); it was dropped,
    /// as RFC 5321 appendix C allows, and only the final mailbox is kept.
    pub source_route: bool,
    /// The local part or the domain as written held UTF-8 (needs SMTPUTF8).
    pub smtputf8: bool,
}

/// One path of MAIL or RCPT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Path {
    /// `<>`: the null reverse path of bounces.
    Null,
    /// `<Postmaster>` without a domain, which every server must accept as a
    /// recipient (RFC 5321 section 4.5.1).
    Postmaster,
    Mailbox(PathMailbox),
}

/// Why a path was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("path must be enclosed in angle brackets")]
    MissingBrackets,
    #[error("null path not allowed here")]
    NullNotAllowed,
    #[error("<Postmaster> not allowed here")]
    PostmasterNotAllowed,
    #[error("bad source route")]
    BadRoute,
    #[error("bad local part")]
    BadLocalPart,
    #[error("local part longer than {MAX_LOCAL_PART} octets")]
    LocalPartTooLong,
    #[error("missing @domain")]
    MissingDomain,
    #[error("bad domain")]
    BadDomain,
    #[error("domain longer than {MAX_DOMAIN} octets")]
    DomainTooLong,
    #[error("bad address literal")]
    BadAddressLiteral,
    #[error("unexpected text after the path")]
    TrailingText,
}

/// Reads one path at the start of `input` and returns it with the text that
/// follows the closing `>`.
pub fn parse_path(input: &str) -> Result<(Path, &str), AddressError> {
    let rest = input
        .strip_prefix('<')
        .ok_or(AddressError::MissingBrackets)?;
    if let Some(after) = rest.strip_prefix('>') {
        return Ok((Path::Null, after));
    }
    if rest.len() >= 11
        && rest.is_char_boundary(11)
        && rest[..11].eq_ignore_ascii_case("postmaster>")
    {
        return Ok((Path::Postmaster, &rest[11..]));
    }
    let (source_route, rest) = skip_source_route(rest)?;
    let (local_part, rest) = parse_local_part(rest)?;
    if local_part.len() > MAX_LOCAL_PART {
        return Err(AddressError::LocalPartTooLong);
    }
    let rest = rest.strip_prefix('@').ok_or(AddressError::MissingDomain)?;
    let end = rest.find('>').ok_or(AddressError::MissingBrackets)?;
    let (domain, domain_utf8) = parse_domain_or_literal(&rest[..end])?;
    let smtputf8 = domain_utf8 || !local_part.is_ascii();
    let mailbox = Mailbox { local_part, domain };
    let path = Path::Mailbox(PathMailbox {
        mailbox,
        source_route,
        smtputf8,
    });
    Ok((path, &rest[end + 1..]))
}

/// Parses a whole reverse path (MAIL FROM): `<>` or a mailbox.
pub fn parse_reverse_path(input: &str) -> Result<Option<PathMailbox>, AddressError> {
    match parse_whole(input)? {
        Path::Null => Ok(None),
        Path::Postmaster => Err(AddressError::PostmasterNotAllowed),
        Path::Mailbox(m) => Ok(Some(m)),
    }
}

/// Parses a whole forward path (RCPT TO): a mailbox or `<Postmaster>`.
pub fn parse_forward_path(input: &str) -> Result<Path, AddressError> {
    match parse_whole(input)? {
        Path::Null => Err(AddressError::NullNotAllowed),
        other => Ok(other),
    }
}

fn parse_whole(input: &str) -> Result<Path, AddressError> {
    let (path, rest) = parse_path(input)?;
    if !rest.is_empty() {
        return Err(AddressError::TrailingText);
    }
    Ok(path)
}

/// Skips `@a.example,@b.example:` if present; the hops are checked as
/// domains so that garbage is not waved through under cover of a route.
fn skip_source_route(input: &str) -> Result<(bool, &str), AddressError> {
    if !input.starts_with('@') {
        return Ok((false, input));
    }
    let colon = input.find(':').ok_or(AddressError::BadRoute)?;
    for hop in input[..colon].split(',') {
        let domain = hop.strip_prefix('@').ok_or(AddressError::BadRoute)?;
        parse_domain_or_literal(domain).map_err(|_| AddressError::BadRoute)?;
    }
    Ok((true, &input[colon + 1..]))
}

/// atext of RFC 5322, plus any non-ASCII character (RFC 6531).
fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii()
}

/// Whether `s` can be written without quotes.
fn is_dot_string(s: &str) -> bool {
    !s.is_empty()
        && s.split('.')
            .all(|atom| !atom.is_empty() && atom.chars().all(is_atext))
}

/// Reads a dot-string or quoted-string local part, returning it unquoted.
fn parse_local_part(input: &str) -> Result<(String, &str), AddressError> {
    if let Some(quoted) = input.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = quoted.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => return Ok((out, &quoted[i + 1..])),
                '\\' => match chars.next() {
                    Some((_, e)) if (' '..='~').contains(&e) => out.push(e),
                    _ => return Err(AddressError::BadLocalPart),
                },
                ' ' | '!' | '#'..='[' | ']'..='~' => out.push(c),
                c if !c.is_ascii() => out.push(c),
                _ => return Err(AddressError::BadLocalPart),
            }
        }
        Err(AddressError::BadLocalPart)
    } else {
        let end = input
            .find(|c: char| !(is_atext(c) || c == '.'))
            .unwrap_or(input.len());
        let local = &input[..end];
        if !is_dot_string(local) {
            return Err(AddressError::BadLocalPart);
        }
        Ok((local.to_string(), &input[end..]))
    }
}

/// Turns a domain or an address literal into its routing form; the flag
/// says whether it was written with U-labels.
pub fn parse_domain_or_literal(input: &str) -> Result<(String, bool), AddressError> {
    if let Some(inner) = input.strip_prefix('[') {
        let inner = inner
            .strip_suffix(']')
            .ok_or(AddressError::BadAddressLiteral)?;
        return parse_address_literal(inner).map(|d| (d, false));
    }
    parse_domain(input)
}

fn parse_address_literal(inner: &str) -> Result<String, AddressError> {
    if inner.len() > 5 && inner.is_char_boundary(5) && inner[..5].eq_ignore_ascii_case("IPv6:") {
        let ip: Ipv6Addr = inner[5..]
            .parse()
            .map_err(|_| AddressError::BadAddressLiteral)?;
        return Ok(format!("[IPv6:{ip}]"));
    }
    let ip: Ipv4Addr = inner.parse().map_err(|_| AddressError::BadAddressLiteral)?;
    Ok(format!("[{ip}]"))
}

/// A domain name in routing form: LDH labels, lower case, U-labels turned
/// into A-labels. The flag says whether the input held U-labels.
pub fn parse_domain(input: &str) -> Result<(String, bool), AddressError> {
    if input.is_empty() {
        return Err(AddressError::BadDomain);
    }
    let (ascii, utf8) = if input.is_ascii() {
        (input.to_ascii_lowercase(), false)
    } else {
        let a = idna::domain_to_ascii(input).map_err(|_| AddressError::BadDomain)?;
        (a, true)
    };
    if ascii.len() > MAX_DOMAIN {
        return Err(AddressError::DomainTooLong);
    }
    for label in ascii.split('.') {
        let bytes = label.as_bytes();
        let ok = !bytes.is_empty()
            && bytes.len() <= MAX_LABEL
            && bytes[0].is_ascii_alphanumeric()
            && bytes[bytes.len() - 1].is_ascii_alphanumeric()
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-');
        if !ok {
            return Err(AddressError::BadDomain);
        }
    }
    Ok((ascii, utf8))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mbox(local: &str, domain: &str) -> Mailbox {
        Mailbox {
            local_part: local.into(),
            domain: domain.into(),
        }
    }

    #[test]
    fn valid_paths() {
        // (input, local part, domain, source route, smtputf8, rest)
        let table: &[(&str, &str, &str, bool, bool, &str)] = &[
            (
                "<user@example.com>",
                "user",
                "example.com",
                false,
                false,
                "",
            ),
            (
                "<User.Name+tag@Example.COM>",
                "User.Name+tag",
                "example.com",
                false,
                false,
                "",
            ),
            (
                "<\"john doe\"@example.com>",
                "john doe",
                "example.com",
                false,
                false,
                "",
            ),
            (
                "<\"a\\\"b\\\\c\"@example.com>",
                "a\"b\\c",
                "example.com",
                false,
                false,
                "",
            ),
            (
                "<\"a>b\"@example.com> SIZE=10",
                "a>b",
                "example.com",
                false,
                false,
                " SIZE=10",
            ),
            ("<u@[192.0.2.1]>", "u", "[192.0.2.1]", false, false, ""),
            (
                "<u@[IPv6:2001:DB8:0:0::1]>",
                "u",
                "[IPv6:2001:db8::1]",
                false,
                false,
                "",
            ),
            ("<u@[ipv6:::1]>", "u", "[IPv6:::1]", false, false, ""),
            (
                "<u@bücher.example>",
                "u",
                "xn--bcher-kva.example",
                false,
                true,
                "",
            ),
            ("<jörg@example.com>", "jörg", "example.com", false, true, ""),
            (
                "<@a.example,@b.example:user@c.example>",
                "user",
                "c.example",
                true,
                false,
                "",
            ),
            (
                "<@[192.0.2.1]:user@c.example>",
                "user",
                "c.example",
                true,
                false,
                "",
            ),
            (
                "<a-b_c!#$%&'*/=?^`{|}~@x-1.example>",
                "a-b_c!#$%&'*/=?^`{|}~",
                "x-1.example",
                false,
                false,
                "",
            ),
        ];
        for &(input, local, domain, route, utf8, rest) in table {
            let (path, r) = parse_path(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(
                path,
                Path::Mailbox(PathMailbox {
                    mailbox: mbox(local, domain),
                    source_route: route,
                    smtputf8: utf8,
                }),
                "{input}"
            );
            assert_eq!(r, rest, "{input}");
        }
    }

    #[test]
    fn special_paths() {
        assert_eq!(parse_path("<>").unwrap(), (Path::Null, ""));
        assert_eq!(
            parse_path("<> BODY=8BITMIME").unwrap(),
            (Path::Null, " BODY=8BITMIME")
        );
        assert_eq!(parse_path("<PostMaster>").unwrap(), (Path::Postmaster, ""));
        assert_eq!(parse_reverse_path("<>").unwrap(), None);
        assert_eq!(
            parse_reverse_path("<postmaster>"),
            Err(AddressError::PostmasterNotAllowed)
        );
        assert_eq!(parse_forward_path("<>"), Err(AddressError::NullNotAllowed));
        assert_eq!(
            parse_forward_path("<postmaster>").unwrap(),
            Path::Postmaster
        );
        assert!(matches!(
            parse_forward_path("<postmaster@example.com>").unwrap(),
            Path::Mailbox(_)
        ));
    }

    #[test]
    fn invalid_paths() {
        let long_local = format!("<{}@example.com>", "a".repeat(65));
        let long_label = format!("<u@{}.example>", "a".repeat(64));
        let long_domain = format!("<u@{}example>", "abcdefghi.".repeat(25));
        let table: &[(&str, AddressError)] = &[
            ("user@example.com", AddressError::MissingBrackets),
            ("<user@example.com", AddressError::MissingBrackets),
            ("<user>", AddressError::MissingDomain),
            ("<@example.com>", AddressError::BadRoute),
            ("<@a.example:>", AddressError::BadLocalPart),
            ("<@a.example,b.example:u@c.example>", AddressError::BadRoute),
            ("<@a..example:u@c.example>", AddressError::BadRoute),
            ("<.user@example.com>", AddressError::BadLocalPart),
            ("<user.@example.com>", AddressError::BadLocalPart),
            ("<us..er@example.com>", AddressError::BadLocalPart),
            ("<us er@example.com>", AddressError::MissingDomain),
            ("<\"unterminated@example.com>", AddressError::BadLocalPart),
            ("<\"tab\there\"@example.com>", AddressError::BadLocalPart),
            ("<u@>", AddressError::BadDomain),
            ("<u@example..com>", AddressError::BadDomain),
            ("<u@-example.com>", AddressError::BadDomain),
            ("<u@example-.com>", AddressError::BadDomain),
            ("<u@exa_mple.com>", AddressError::BadDomain),
            ("<u@example.com.>", AddressError::BadDomain),
            ("<u@exa mple.com>", AddressError::BadDomain),
            ("<u@[192.0.2.256]>", AddressError::BadAddressLiteral),
            ("<u@[192.0.2]>", AddressError::BadAddressLiteral),
            ("<u@[IPv6:2001:db8::g]>", AddressError::BadAddressLiteral),
            ("<u@[2001:db8::1]>", AddressError::BadAddressLiteral),
            ("<u@[x-tag:foo]>", AddressError::BadAddressLiteral),
            ("<u@[192.0.2.1>", AddressError::BadAddressLiteral),
            (&long_local, AddressError::LocalPartTooLong),
            (&long_label, AddressError::BadDomain),
            (&long_domain, AddressError::DomainTooLong),
        ];
        for (input, want) in table {
            assert_eq!(parse_path(input).err().as_ref(), Some(want), "{input}");
        }
        assert_eq!(
            parse_reverse_path("<a@b.example> x"),
            Err(AddressError::TrailingText)
        );
    }

    #[test]
    fn display_requotes_when_needed() {
        let table = [
            (mbox("user", "example.com"), "user@example.com"),
            (mbox("john doe", "example.com"), "\"john doe\"@example.com"),
            (
                mbox("a\"b\\c", "example.com"),
                "\"a\\\"b\\\\c\"@example.com",
            ),
            (mbox(".lead", "example.com"), "\".lead\"@example.com"),
            (mbox("jörg", "example.com"), "jörg@example.com"),
        ];
        for (m, text) in table {
            assert_eq!(m.to_string(), text);
            // What Display writes parses back to the same mailbox.
            let (path, _) = parse_path(&format!("<{text}>")).unwrap();
            match path {
                Path::Mailbox(p) => assert_eq!(p.mailbox, m),
                other => panic!("{other:?}"),
            }
        }
    }
}
