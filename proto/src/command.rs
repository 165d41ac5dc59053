//! SMTP command lines and their ESMTP parameters.
//!
//! [`parse`] takes one line as the client sent it and returns a typed
//! [`Command`]; the errors keep the verb and the part at fault, because the
//! reply a server owes depends on both (a bad sender is `501 5.1.7`, an
//! unknown MAIL parameter `555 5.5.4`).

use crate::address::{self, AddressError, Path, PathMailbox};
use crate::envelope::{BodyType, Notify, Ret};

/// The verbs this server understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    Helo,
    Ehlo,
    Mail,
    Rcpt,
    Data,
    Rset,
    Noop,
    Quit,
    Help,
    Vrfy,
    Expn,
    StartTls,
    Auth,
}

impl Verb {
    /// Looks a verb up case-insensitively. BDAT is deliberately unknown:
    /// CHUNKING is not offered.
    pub fn from_bytes(word: &[u8]) -> Option<Verb> {
        const VERBS: &[(&[u8], Verb)] = &[
            (b"HELO", Verb::Helo),
            (b"EHLO", Verb::Ehlo),
            (b"MAIL", Verb::Mail),
            (b"RCPT", Verb::Rcpt),
            (b"DATA", Verb::Data),
            (b"RSET", Verb::Rset),
            (b"NOOP", Verb::Noop),
            (b"QUIT", Verb::Quit),
            (b"HELP", Verb::Help),
            (b"VRFY", Verb::Vrfy),
            (b"EXPN", Verb::Expn),
            (b"STARTTLS", Verb::StartTls),
            (b"AUTH", Verb::Auth),
        ];
        VERBS
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(word))
            .map(|&(_, verb)| verb)
    }
}

/// The parameters of MAIL FROM this server understands.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MailParams {
    /// `SIZE=` (RFC 1870); absurd values saturate, they are refused anyway.
    pub size: Option<u64>,
    pub body: Option<BodyType>,
    pub smtputf8: bool,
    pub ret: Option<Ret>,
    /// `ENVID=`, still xtext-encoded.
    pub envid: Option<String>,
    /// `AUTH=` (RFC 4954): accepted and not trusted, so never used.
    pub auth: Option<String>,
}

/// The parameters of RCPT TO this server understands.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RcptParams {
    pub notify: Option<Notify>,
    /// `ORCPT=` as received: `addr-type;xtext`.
    pub orcpt: Option<String>,
}

/// One parsed command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Helo(String),
    Ehlo(String),
    Mail {
        /// `None` is the null reverse path.
        sender: Option<PathMailbox>,
        params: MailParams,
    },
    Rcpt {
        recipient: Path,
        params: RcptParams,
    },
    Data,
    Rset,
    Noop,
    Quit,
    Help,
    Vrfy(String),
    Expn(String),
    StartTls,
    Auth {
        /// Upper case.
        mechanism: String,
        /// Still base64; `=` stands for an empty response.
        initial_response: Option<String>,
    },
}

impl Command {
    pub fn verb(&self) -> Verb {
        match self {
            Command::Helo(_) => Verb::Helo,
            Command::Ehlo(_) => Verb::Ehlo,
            Command::Mail { .. } => Verb::Mail,
            Command::Rcpt { .. } => Verb::Rcpt,
            Command::Data => Verb::Data,
            Command::Rset => Verb::Rset,
            Command::Noop => Verb::Noop,
            Command::Quit => Verb::Quit,
            Command::Help => Verb::Help,
            Command::Vrfy(_) => Verb::Vrfy,
            Command::Expn(_) => Verb::Expn,
            Command::StartTls => Verb::StartTls,
            Command::Auth { .. } => Verb::Auth,
        }
    }
}

/// What is wrong with one ESMTP parameter.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    #[error("unknown parameter {0}")]
    Unknown(String),
    #[error("parameter {0} given twice")]
    Duplicate(String),
    #[error("bad value for parameter {0}")]
    BadValue(String),
}

/// Why a command line was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("unknown command")]
    UnknownVerb,
    #[error("syntax error in {0:?} arguments")]
    Syntax(Verb),
    #[error("bad sender address: {0}")]
    BadSender(AddressError),
    #[error("bad recipient address: {0}")]
    BadRecipient(AddressError),
    #[error("{1}")]
    Param(Verb, ParamError),
}

impl CommandError {
    /// The verb the line started with, when it was one we know.
    pub fn verb(&self) -> Option<Verb> {
        match self {
            CommandError::UnknownVerb => None,
            CommandError::Syntax(v) | CommandError::Param(v, _) => Some(*v),
            CommandError::BadSender(_) => Some(Verb::Mail),
            CommandError::BadRecipient(_) => Some(Verb::Rcpt),
        }
    }
}

/// Parses one command line, with or without its line ending.
pub fn parse(line: &[u8]) -> Result<Command, CommandError> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let end = line
        .iter()
        .rposition(|b| *b != b' ' && *b != b'\t')
        .map_or(0, |i| i + 1);
    let line = &line[..end];
    let (word, args) = match line.iter().position(|b| *b == b' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, &line[line.len()..]),
    };
    let verb = Verb::from_bytes(word).ok_or(CommandError::UnknownVerb)?;
    let args = std::str::from_utf8(args).map_err(|_| CommandError::Syntax(verb))?;
    let no_args = |cmd: Command| {
        if args.is_empty() {
            Ok(cmd)
        } else {
            Err(CommandError::Syntax(verb))
        }
    };
    match verb {
        Verb::Helo => Ok(Command::Helo(client_name(verb, args)?)),
        Verb::Ehlo => Ok(Command::Ehlo(client_name(verb, args)?)),
        Verb::Mail => parse_mail(args),
        Verb::Rcpt => parse_rcpt(args),
        Verb::Data => no_args(Command::Data),
        Verb::Rset => no_args(Command::Rset),
        Verb::Quit => no_args(Command::Quit),
        Verb::StartTls => no_args(Command::StartTls),
        Verb::Noop => Ok(Command::Noop),
        Verb::Help => Ok(Command::Help),
        Verb::Vrfy if !args.trim().is_empty() => Ok(Command::Vrfy(args.trim().to_string())),
        Verb::Expn if !args.trim().is_empty() => Ok(Command::Expn(args.trim().to_string())),
        Verb::Vrfy | Verb::Expn => Err(CommandError::Syntax(verb)),
        Verb::Auth => parse_auth(args),
    }
}

/// The HELO/EHLO argument: its first word, printable, as the client wrote it
/// (it only ends up in trace headers, never used for routing).
fn client_name(verb: Verb, args: &str) -> Result<String, CommandError> {
    let name = args.split(' ').find(|w| !w.is_empty()).unwrap_or("");
    if name.is_empty() || name.chars().any(|c| c.is_control()) {
        return Err(CommandError::Syntax(verb));
    }
    Ok(name.to_string())
}

/// Strips `FROM:`/`TO:` and the blanks that many clients put after it.
fn after_keyword<'a>(args: &'a str, keyword: &str, verb: Verb) -> Result<&'a str, CommandError> {
    let n = keyword.len();
    if args.len() < n || !args.is_char_boundary(n) || !args[..n].eq_ignore_ascii_case(keyword) {
        return Err(CommandError::Syntax(verb));
    }
    Ok(args[n..].trim_start_matches(' '))
}

fn params(rest: &str, verb: Verb) -> Result<Vec<(&str, Option<&str>)>, CommandError> {
    if !rest.is_empty() && !rest.starts_with(' ') {
        return Err(CommandError::Syntax(verb));
    }
    let mut out = Vec::new();
    for word in rest.split(' ').filter(|w| !w.is_empty()) {
        let (key, value) = match word.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (word, None),
        };
        let key_ok = key
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
            && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !key_ok {
            return Err(CommandError::Syntax(verb));
        }
        if out
            .iter()
            .any(|(k, _): &(&str, _)| k.eq_ignore_ascii_case(key))
        {
            return Err(CommandError::Param(
                verb,
                ParamError::Duplicate(key.to_ascii_uppercase()),
            ));
        }
        out.push((key, value));
    }
    Ok(out)
}

fn parse_mail(args: &str) -> Result<Command, CommandError> {
    let verb = Verb::Mail;
    let path = after_keyword(args, "FROM:", verb)?;
    let (path, rest) = address::parse_path(path).map_err(CommandError::BadSender)?;
    let sender = match path {
        Path::Null => None,
        Path::Postmaster => {
            return Err(CommandError::BadSender(AddressError::PostmasterNotAllowed))
        }
        Path::Mailbox(m) => Some(m),
    };
    let mut p = MailParams::default();
    for (key, value) in params(rest, verb)? {
        let name = key.to_ascii_uppercase();
        let bad = || CommandError::Param(verb, ParamError::BadValue(name.clone()));
        match (name.as_str(), value) {
            ("SIZE", Some(v))
                if !v.is_empty() && v.len() <= 20 && v.bytes().all(|b| b.is_ascii_digit()) =>
            {
                p.size = Some(v.parse().unwrap_or(u64::MAX));
            }
            ("BODY", Some(v)) => {
                p.body = Some(match v.to_ascii_uppercase().as_str() {
                    "7BIT" => BodyType::SevenBit,
                    "8BITMIME" => BodyType::EightBitMime,
                    "BINARYMIME" => BodyType::BinaryMime,
                    _ => return Err(bad()),
                })
            }
            ("SMTPUTF8", None) => p.smtputf8 = true,
            ("RET", Some(v)) => {
                p.ret = Some(match v.to_ascii_uppercase().as_str() {
                    "FULL" => Ret::Full,
                    "HDRS" => Ret::Headers,
                    _ => return Err(bad()),
                })
            }
            ("ENVID", Some(v)) if v.len() <= 100 && is_xtext(v) => p.envid = Some(v.to_string()),
            ("AUTH", Some(v)) if v == "<>" || is_xtext(v) => p.auth = Some(v.to_string()),
            ("SIZE" | "BODY" | "SMTPUTF8" | "RET" | "ENVID" | "AUTH", _) => return Err(bad()),
            _ => return Err(CommandError::Param(verb, ParamError::Unknown(name))),
        }
    }
    Ok(Command::Mail { sender, params: p })
}

fn parse_rcpt(args: &str) -> Result<Command, CommandError> {
    let verb = Verb::Rcpt;
    let path = after_keyword(args, "TO:", verb)?;
    let (recipient, rest) = address::parse_path(path).map_err(CommandError::BadRecipient)?;
    if recipient == Path::Null {
        return Err(CommandError::BadRecipient(AddressError::NullNotAllowed));
    }
    let mut p = RcptParams::default();
    for (key, value) in params(rest, verb)? {
        let name = key.to_ascii_uppercase();
        let bad = || CommandError::Param(verb, ParamError::BadValue(name.clone()));
        match (name.as_str(), value) {
            ("NOTIFY", Some(v)) => p.notify = Some(parse_notify(v).ok_or_else(bad)?),
            ("ORCPT", Some(v)) if is_orcpt(v) => p.orcpt = Some(v.to_string()),
            ("NOTIFY" | "ORCPT", _) => return Err(bad()),
            _ => return Err(CommandError::Param(verb, ParamError::Unknown(name))),
        }
    }
    Ok(Command::Rcpt {
        recipient,
        params: p,
    })
}

/// `AUTH mechanism [initial-response]` (RFC 4954).
fn parse_auth(args: &str) -> Result<Command, CommandError> {
    let mut words = args.split(' ').filter(|w| !w.is_empty());
    let mechanism = words.next().ok_or(CommandError::Syntax(Verb::Auth))?;
    let initial_response = words.next().map(str::to_string);
    let mech_ok = mechanism.len() <= 20
        && mechanism
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if words.next().is_some() || !mech_ok {
        return Err(CommandError::Syntax(Verb::Auth));
    }
    Ok(Command::Auth {
        mechanism: mechanism.to_ascii_uppercase(),
        initial_response,
    })
}

/// `NEVER`, or a list of `SUCCESS`, `FAILURE`, `DELAY` without repeats.
fn parse_notify(value: &str) -> Option<Notify> {
    let mut n = Notify::default();
    for word in value.split(',') {
        let flag = match word.to_ascii_uppercase().as_str() {
            "NEVER" => &mut n.never,
            "SUCCESS" => &mut n.success,
            "FAILURE" => &mut n.failure,
            "DELAY" => &mut n.delay,
            _ => return None,
        };
        if *flag {
            return None;
        }
        *flag = true;
    }
    if n.never && (n.success || n.failure || n.delay) {
        return None;
    }
    Some(n)
}

/// `addr-type ";" xtext` (RFC 3461 section 4.2), at most 500 characters.
fn is_orcpt(value: &str) -> bool {
    match value.split_once(';') {
        Some((kind, addr)) => {
            value.len() <= 500
                && !kind.is_empty()
                && kind
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b))
                && !addr.is_empty()
                && is_xtext(addr)
        }
        None => false,
    }
}

/// RFC 3461 xtext: printable ASCII except `+` and `=`, with `+XX` hex
/// escapes. Lower-case hex is accepted too: decoding is unambiguous and
/// some clients send it.
pub fn is_xtext(value: &str) -> bool {
    let b = value.as_bytes();
    if b.is_empty() {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => {
                if i + 2 >= b.len()
                    || !(b[i + 1].is_ascii_hexdigit() && b[i + 2].is_ascii_hexdigit())
                {
                    return false;
                }
                i += 3;
            }
            b'!'..=b'~' if b[i] != b'=' => i += 1,
            _ => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::address::Mailbox;

    fn pm(local: &str, domain: &str) -> PathMailbox {
        PathMailbox {
            mailbox: Mailbox {
                local_part: local.into(),
                domain: domain.into(),
            },
            source_route: false,
            smtputf8: false,
        }
    }

    fn mail(sender: Option<PathMailbox>, params: MailParams) -> Command {
        Command::Mail { sender, params }
    }

    fn rcpt(local: &str, domain: &str, params: RcptParams) -> Command {
        Command::Rcpt {
            recipient: Path::Mailbox(pm(local, domain)),
            params,
        }
    }

    #[test]
    fn valid_commands() {
        let table: Vec<(&str, Command)> = vec![
            ("HELO client.example\r\n", Command::Helo("client.example".into())),
            ("helo client.example", Command::Helo("client.example".into())),
            ("EHLO [192.0.2.1]\r\n", Command::Ehlo("[192.0.2.1]".into())),
            ("ehlo client.example extra words\r\n", Command::Ehlo("client.example".into())),
            ("MAIL FROM:<a@b.example>\r\n", mail(Some(pm("a", "b.example")), MailParams::default())),
            ("mail from:<a@b.example>\n", mail(Some(pm("a", "b.example")), MailParams::default())),
            ("MAIL FROM: <a@b.example>  \r\n", mail(Some(pm("a", "b.example")), MailParams::default())),
            ("MAIL FROM:<>\r\n", mail(None, MailParams::default())),
            (
                "MAIL FROM:<a@b.example> SIZE=1000 BODY=8bitmime SMTPUTF8 RET=HDRS ENVID=QQ+2B1 AUTH=<>\r\n",
                mail(
                    Some(pm("a", "b.example")),
                    MailParams {
                        size: Some(1000),
                        body: Some(BodyType::EightBitMime),
                        smtputf8: true,
                        ret: Some(Ret::Headers),
                        envid: Some("QQ+2B1".into()),
                        auth: Some("<>".into()),
                    },
                ),
            ),
            (
                "MAIL FROM:<> size=99999999999999999999 BODY=BINARYMIME RET=full AUTH=u+40x",
                mail(
                    None,
                    MailParams {
                        size: Some(u64::MAX),
                        body: Some(BodyType::BinaryMime),
                        ret: Some(Ret::Full),
                        auth: Some("u+40x".into()),
                        ..MailParams::default()
                    },
                ),
            ),
            ("RCPT TO:<c@d.example>\r\n", rcpt("c", "d.example", RcptParams::default())),
            ("rcpt to: <c@d.example>\r\n", rcpt("c", "d.example", RcptParams::default())),
            (
                "RCPT TO:<Postmaster>\r\n",
                Command::Rcpt {
                    recipient: Path::Postmaster,
                    params: RcptParams::default(),
                },
            ),
            (
                "RCPT TO:<c@d.example> NOTIFY=SUCCESS,failure,DELAY ORCPT=rfc822;c+40d.example\r\n",
                rcpt(
                    "c",
                    "d.example",
                    RcptParams {
                        notify: Some(Notify {
                            never: false,
                            success: true,
                            failure: true,
                            delay: true,
                        }),
                        orcpt: Some("rfc822;c+40d.example".into()),
                    },
                ),
            ),
            (
                "RCPT TO:<c@d.example> NOTIFY=NEVER",
                rcpt(
                    "c",
                    "d.example",
                    RcptParams {
                        notify: Some(Notify {
                            never: true,
                            ..Notify::default()
                        }),
                        orcpt: None,
                    },
                ),
            ),
            ("DATA\r\n", Command::Data),
            ("data", Command::Data),
            ("RSET\r\n", Command::Rset),
            ("NOOP\r\n", Command::Noop),
            ("NOOP anything at all\r\n", Command::Noop),
            ("QUIT\r\n", Command::Quit),
            ("HELP\r\n", Command::Help),
            ("HELP MAIL\r\n", Command::Help),
            ("VRFY postmaster\r\n", Command::Vrfy("postmaster".into())),
            ("EXPN staff\r\n", Command::Expn("staff".into())),
            ("STARTTLS\r\n", Command::StartTls),
            ("starttls \r\n", Command::StartTls),
            (
                "AUTH PLAIN\r\n",
                Command::Auth {
                    mechanism: "PLAIN".into(),
                    initial_response: None,
                },
            ),
            (
                "auth plain AHVzZXIAcGFzcw==\r\n",
                Command::Auth {
                    mechanism: "PLAIN".into(),
                    initial_response: Some("AHVzZXIAcGFzcw==".into()),
                },
            ),
            (
                "AUTH LOGIN =\r\n",
                Command::Auth {
                    mechanism: "LOGIN".into(),
                    initial_response: Some("=".into()),
                },
            ),
        ];
        for (line, want) in table {
            let got = parse(line.as_bytes()).unwrap_or_else(|e| panic!("{line:?}: {e}"));
            assert_eq!(got, want, "{line:?}");
            assert_eq!(got.verb(), want.verb());
        }
    }

    #[test]
    fn invalid_commands() {
        use CommandError::*;
        use ParamError::*;
        let table: Vec<(&[u8], CommandError)> = vec![
            (b"BDAT 10 LAST\r\n", UnknownVerb),
            (b"XYZZY\r\n", UnknownVerb),
            (b"\r\n", UnknownVerb),
            (b" HELO x\r\n", UnknownVerb),
            (b"HELO\r\n", Syntax(Verb::Helo)),
            (b"EHLO \r\n", Syntax(Verb::Ehlo)),
            (b"EHLO a\x01b\r\n", Syntax(Verb::Ehlo)),
            (b"MAIL <a@b.example>\r\n", Syntax(Verb::Mail)),
            (b"MAIL FROM:<a@b.example>SIZE=1\r\n", Syntax(Verb::Mail)),
            (b"MAIL FROM:<a@b.example> =1\r\n", Syntax(Verb::Mail)),
            (b"MAIL FROM:<\xff@b.example>\r\n", Syntax(Verb::Mail)),
            (
                b"MAIL FROM:a@b.example\r\n",
                BadSender(AddressError::MissingBrackets),
            ),
            (
                b"MAIL FROM:<postmaster>\r\n",
                BadSender(AddressError::PostmasterNotAllowed),
            ),
            (
                b"MAIL FROM:<a@b..example>\r\n",
                BadSender(AddressError::BadDomain),
            ),
            (
                b"MAIL FROM:<> FOO=1\r\n",
                Param(Verb::Mail, Unknown("FOO".into())),
            ),
            (
                b"MAIL FROM:<> SIZE=1 size=2\r\n",
                Param(Verb::Mail, Duplicate("SIZE".into())),
            ),
            (
                b"MAIL FROM:<> SIZE=abc\r\n",
                Param(Verb::Mail, BadValue("SIZE".into())),
            ),
            (
                b"MAIL FROM:<> SIZE\r\n",
                Param(Verb::Mail, BadValue("SIZE".into())),
            ),
            (
                b"MAIL FROM:<> BODY=9BIT\r\n",
                Param(Verb::Mail, BadValue("BODY".into())),
            ),
            (
                b"MAIL FROM:<> SMTPUTF8=yes\r\n",
                Param(Verb::Mail, BadValue("SMTPUTF8".into())),
            ),
            (
                b"MAIL FROM:<> RET=SOME\r\n",
                Param(Verb::Mail, BadValue("RET".into())),
            ),
            (
                b"MAIL FROM:<> ENVID=a+2\r\n",
                Param(Verb::Mail, BadValue("ENVID".into())),
            ),
            (
                b"MAIL FROM:<> ENVID=a+zz\r\n",
                Param(Verb::Mail, BadValue("ENVID".into())),
            ),
            (
                b"MAIL FROM:<> ENVID=\r\n",
                Param(Verb::Mail, BadValue("ENVID".into())),
            ),
            (
                b"MAIL FROM:<> NOTIFY=NEVER\r\n",
                Param(Verb::Mail, Unknown("NOTIFY".into())),
            ),
            (b"RCPT <c@d.example>\r\n", Syntax(Verb::Rcpt)),
            (
                b"RCPT TO:<>\r\n",
                BadRecipient(AddressError::NullNotAllowed),
            ),
            (b"RCPT TO:<c@>\r\n", BadRecipient(AddressError::BadDomain)),
            (
                b"RCPT TO:<c@d.example> NOTIFY=NEVER,DELAY\r\n",
                Param(Verb::Rcpt, BadValue("NOTIFY".into())),
            ),
            (
                b"RCPT TO:<c@d.example> NOTIFY=DELAY,DELAY\r\n",
                Param(Verb::Rcpt, BadValue("NOTIFY".into())),
            ),
            (
                b"RCPT TO:<c@d.example> NOTIFY=SOMETIMES\r\n",
                Param(Verb::Rcpt, BadValue("NOTIFY".into())),
            ),
            (
                b"RCPT TO:<c@d.example> ORCPT=c@d.example\r\n",
                Param(Verb::Rcpt, BadValue("ORCPT".into())),
            ),
            (
                b"RCPT TO:<c@d.example> ORCPT=rfc822;a=b\r\n",
                Param(Verb::Rcpt, BadValue("ORCPT".into())),
            ),
            (
                b"RCPT TO:<c@d.example> SIZE=1\r\n",
                Param(Verb::Rcpt, Unknown("SIZE".into())),
            ),
            (
                b"RCPT TO:<c@d.example> NOTIFY=NEVER NOTIFY=NEVER\r\n",
                Param(Verb::Rcpt, Duplicate("NOTIFY".into())),
            ),
            (b"DATA now\r\n", Syntax(Verb::Data)),
            (b"RSET x\r\n", Syntax(Verb::Rset)),
            (b"QUIT x\r\n", Syntax(Verb::Quit)),
            (b"STARTTLS x\r\n", Syntax(Verb::StartTls)),
            (b"VRFY\r\n", Syntax(Verb::Vrfy)),
            (b"EXPN \r\n", Syntax(Verb::Expn)),
            (b"AUTH\r\n", Syntax(Verb::Auth)),
            (b"AUTH PLAIN a b\r\n", Syntax(Verb::Auth)),
            (b"AUTH PL@IN\r\n", Syntax(Verb::Auth)),
        ];
        for (line, want) in table {
            let got = parse(line);
            assert_eq!(
                got.as_ref().err(),
                Some(&want),
                "{:?}",
                String::from_utf8_lossy(line)
            );
            assert_eq!(want.verb(), got.unwrap_err().verb());
        }
    }

    #[test]
    fn xtext() {
        for ok in ["abc", "a+2Bb", "+3D", "~!", "a+2b"] {
            assert!(is_xtext(ok), "{ok}");
        }
        for bad in ["", "a b", "a=b", "+", "+2", "+G0", "é"] {
            assert!(!is_xtext(bad), "{bad}");
        }
    }
}
