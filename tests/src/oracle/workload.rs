//! The seeded workload: messages with 1–N recipients over many domains,
//! each recipient's fate at the receiving server written into its local
//! part (`r12x3.t2@d7.test`: message 12, recipient 3, two `451`s then
//! `250`), so the scripted receivers need no shared plan and the oracle
//! reads the expected result from the address alone.

use std::fmt;

use super::rng::Rng;

/// The domain of the senders; its receiver takes every report (DSN).
pub const SENDER_DOMAIN: &str = "bounce.test";

/// Where the relay sends double bounces (`bounce.double_bounce_to`): the
/// failures of messages from `<>`, reports among them.
pub const POSTMASTER: &str = "postmaster@bounce.test";

/// What the receiving server does with one recipient.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// `250` at once.
    Ok,
    /// `250` after a pause of this many milliseconds.
    Slow(u32),
    /// `451` this many times, then `250`.
    Temp(u32),
    /// `451` for ever: the relay must give up after `max_lifetime`.
    TempForever,
    /// `550`: the relay must bounce at once.
    Perm,
    /// `421` and the connection closed, this many times; then `250`.
    Close(u32),
    /// The connection closed in the middle of DATA, this many times.
    MidData(u32),
    /// `451` to the end of DATA, this many times.
    DataTemp(u32),
}

impl Fate {
    /// Whether the recipient ends delivered (else: failed, with a report
    /// unless the sender is `<>`).
    pub fn delivers(self) -> bool {
        !matches!(self, Fate::TempForever | Fate::Perm)
    }

    /// Parses the fate part of a local part (`ok`, `s300`, `t2`, ...).
    pub fn parse(code: &str) -> Option<Fate> {
        let count = |rest: &str| rest.parse::<u32>().ok();
        Some(match code {
            "ok" => Fate::Ok,
            "tf" => Fate::TempForever,
            "p" => Fate::Perm,
            _ => {
                let (kind, rest) = code.split_at(1);
                match kind {
                    "s" => Fate::Slow(count(rest)?),
                    "t" => Fate::Temp(count(rest)?),
                    "c" => Fate::Close(count(rest)?),
                    "m" => Fate::MidData(count(rest)?),
                    "d" => Fate::DataTemp(count(rest)?),
                    _ => return None,
                }
            }
        })
    }

    fn draw(rng: &mut Rng) -> Fate {
        let n = rng.range(1, 3) as u32;
        match rng.weighted(&[
            (58, 0u8),
            (5, 1),
            (10, 2),
            (4, 3),
            (8, 4),
            (5, 5),
            (5, 6),
            (5, 7),
        ]) {
            0 => Fate::Ok,
            1 => Fate::Slow(rng.range(100, 1500) as u32),
            2 => Fate::Temp(n),
            3 => Fate::TempForever,
            4 => Fate::Perm,
            5 => Fate::Close(1),
            6 => Fate::MidData(1),
            _ => Fate::DataTemp(n),
        }
    }
}

impl fmt::Display for Fate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fate::Ok => write!(f, "ok"),
            Fate::Slow(ms) => write!(f, "s{ms}"),
            Fate::Temp(n) => write!(f, "t{n}"),
            Fate::TempForever => write!(f, "tf"),
            Fate::Perm => write!(f, "p"),
            Fate::Close(n) => write!(f, "c{n}"),
            Fate::MidData(n) => write!(f, "m{n}"),
            Fate::DataTemp(n) => write!(f, "d{n}"),
        }
    }
}

/// The fate written in a recipient address, if it is one of ours.
pub fn fate_of(address: &str) -> Option<Fate> {
    let local = address.rsplit_once('@')?.0;
    let (_, code) = local.split_once('.')?;
    Fate::parse(code)
}

/// The name of domain `k`.
pub fn domain(k: usize) -> String {
    format!("d{k}.test")
}

/// How the body is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Text {
    Ascii,
    /// UTF-8 in the header and the body (`SMTPUTF8`, `BODY=8BITMIME`).
    Utf8,
    /// Latin-1 bytes in the body (`BODY=8BITMIME`).
    Latin1,
}

/// One message of the workload.
#[derive(Clone, Debug)]
pub struct Message {
    pub n: usize,
    /// `<seed>-<n>`: the `X-Oracle-Id` header and the `ENVID`.
    pub oracle_id: String,
    /// `None`: `MAIL FROM:<>`.
    pub sender: Option<String>,
    pub recipients: Vec<String>,
    pub text: Text,
    /// `RET=HDRS` (else no `RET`: the relay's default applies).
    pub ret_headers: bool,
    /// The content, CRLF line ends, not dot-stuffed.
    pub content: Vec<u8>,
}

impl Message {
    /// The `MAIL FROM` command.
    pub fn mail_from(&self) -> String {
        let mut line = format!("MAIL FROM:<{}>", self.sender.as_deref().unwrap_or(""));
        match self.text {
            Text::Ascii => {}
            Text::Utf8 => line.push_str(" BODY=8BITMIME SMTPUTF8"),
            Text::Latin1 => line.push_str(" BODY=8BITMIME"),
        }
        if self.ret_headers {
            line.push_str(" RET=HDRS");
        }
        line.push_str(&format!(" ENVID={}", self.oracle_id));
        line
    }
}

/// The shape of a workload.
#[derive(Clone, Debug)]
pub struct Shape {
    pub messages: usize,
    pub domains: usize,
    pub max_recipients: usize,
    /// The largest message; the sizes run from 1 KB up to it, most small.
    pub max_size: usize,
}

/// Message `n` of `seed` in `shape`. Each message has its own stream, so
/// a long run generates them one at a time and keeps none.
pub fn message(seed: u64, n: usize, shape: &Shape) -> Message {
    let mut rng = Rng::new(seed).fork(1 + n as u64);
    let rng = &mut rng;
    let oracle_id = format!("{seed}-{n}");
    let sender = (!rng.chance(8)).then(|| format!("s{n}@{SENDER_DOMAIN}"));
    let count = rng.range(1, shape.max_recipients as u64 + 1) as usize;
    // A few hot domains get most of the mail, as in life.
    let hot = shape.domains.div_ceil(5).max(1);
    let recipients = (0..count)
        .map(|i| {
            let k = if rng.chance(50) {
                rng.range(0, hot as u64)
            } else {
                rng.range(0, shape.domains as u64)
            } as usize;
            format!("r{n}x{i}.{}@{}", Fate::draw(rng), domain(k))
        })
        .collect();
    let text = rng.weighted(&[(60, Text::Ascii), (25, Text::Utf8), (15, Text::Latin1)]);
    let ret_headers = rng.chance(70);
    let (low, high) = rng.weighted(&[
        (70, (1_000, 8_000)),
        (22, (8_000, 100_000)),
        (6, (100_000, 1_000_000)),
        (2, (1_000_000, 3_000_000)),
    ]);
    let high = high.min(shape.max_size as u64).max(1_001);
    let size = rng.range(low.min(high - 1), high) as usize;
    let content = content(&oracle_id, n, sender.as_deref(), text, size, rng);
    Message {
        n,
        oracle_id,
        sender,
        recipients,
        text,
        ret_headers,
        content,
    }
}

const ASCII_LINES: [&str; 4] = [
    "The quick brown fox jumps over the lazy dog 0123456789.",
    ".A line that starts with a dot, stuffed on the wire.",
    "..two dots, and a lone dot follows on the next line:",
    ".",
];
const UTF8_LINES: [&str; 3] = [
    "Grüße aus Köln, ça va? Ελληνικά, русский, 日本語のテキスト.",
    "Emoji 🚀📬 and a line that ends in a non-ASCII letter é",
    ".Ünïcödé after a leading dot",
];

fn content(
    oracle_id: &str,
    n: usize,
    sender: Option<&str>,
    text: Text,
    size: usize,
    rng: &mut Rng,
) -> Vec<u8> {
    let from = sender.unwrap_or("mailer-daemon@bounce.test");
    let (display, subject, charset) = match text {
        Text::Ascii => ("Oracle Sender", format!("oracle message {n}"), "us-ascii"),
        Text::Utf8 => (
            "Öracle Sénder",
            format!("Nachricht {n} — ünïcödé ✓"),
            "utf-8",
        ),
        Text::Latin1 => (
            "Oracle Sender",
            format!("latin-1 message {n}"),
            "iso-8859-1",
        ),
    };
    let mut out = format!(
        "From: \"{display}\" <{from}>\r\nTo: undisclosed-recipients:;\r\nSubject: {subject}\r\n\
         Date: Thu, 05 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{oracle_id}@oracle.test>\r\n\
         X-Oracle-Id: {oracle_id}\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset={charset}\r\nContent-Transfer-Encoding: {}\r\n\r\n",
        if text == Text::Ascii { "7bit" } else { "8bit" }
    )
    .into_bytes();
    while out.len() < size {
        let line: Vec<u8> = match text {
            Text::Ascii => ASCII_LINES[rng.range(0, 4) as usize].as_bytes().to_vec(),
            Text::Utf8 if rng.chance(50) => {
                UTF8_LINES[rng.range(0, 3) as usize].as_bytes().to_vec()
            }
            // "Café crème, naïve façade" in ISO-8859-1.
            Text::Latin1 if rng.chance(50) => {
                b"Caf\xe9 cr\xe8me, na\xefve fa\xe7ade \xa9 \xbd".to_vec()
            }
            _ => ASCII_LINES[rng.range(0, 3) as usize].as_bytes().to_vec(),
        };
        out.extend_from_slice(&line);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// RFC 5321 4.5.2: a line that starts with a dot gets one more.
pub fn dot_stuff(content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 64);
    let mut at_line_start = true;
    for &b in content {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    out
}

/// A stable 64-bit digest (FNV-1a) of a message body, to compare what
/// arrived with what was sent without keeping megabytes around.
pub fn digest(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fates_read_back_from_the_address() {
        for fate in [
            Fate::Ok,
            Fate::Slow(250),
            Fate::Temp(2),
            Fate::TempForever,
            Fate::Perm,
            Fate::Close(1),
            Fate::MidData(1),
            Fate::DataTemp(2),
        ] {
            let address = format!("r3x1.{fate}@d4.test");
            assert_eq!(fate_of(&address), Some(fate), "{address}");
        }
        assert_eq!(fate_of("s3@bounce.test"), None);
        assert_eq!(fate_of("r1x0.zz@d1.test"), None);
    }

    #[test]
    fn a_seed_gives_the_same_workload_within_its_sizes() {
        let shape = Shape {
            messages: 200,
            domains: 40,
            max_recipients: 6,
            max_size: 2_000_000,
        };
        let generate = |seed| {
            (0..200)
                .map(|n| message(seed, n, &shape))
                .collect::<Vec<_>>()
        };
        let a = generate(42);
        let b = generate(42);
        for (x, y) in a.iter().zip(&b) {
            assert_eq!((&x.recipients, &x.content), (&y.recipients, &y.content));
        }
        assert!(a.iter().all(|m| m.content.len() <= 2_000_000 + 200));
        assert!(a.iter().any(|m| m.content.len() > 100_000));
        assert!(a.iter().any(|m| m.sender.is_none()));
        assert!(a.iter().any(|m| m.text == Text::Latin1));
        assert!(a
            .iter()
            .all(|m| m.recipients.iter().all(|r| fate_of(r).is_some())));
        assert_ne!(
            generate(43)[0].recipients,
            a[0].recipients,
            "another seed, another workload"
        );
    }

    #[test]
    fn dot_stuffing_doubles_leading_dots_only() {
        assert_eq!(dot_stuff(b".a\r\nb.\r\n.\r\n"), b"..a\r\nb.\r\n..\r\n");
    }
}
