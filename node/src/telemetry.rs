//! Logs: `tracing` events written to standard error, as text (coloured on a
//! terminal) or JSON lines.
//!
//! Many fields carry what a client chose (the AUTH user name, addresses,
//! remote replies), so no field may write a raw control character: a line
//! feed would start a forged log line, an escape sequence would drive the
//! operator's terminal. The escaping is done here, once, where the lines are
//! written, and not at each call site: in text by [`SafeFields`] (every field
//! value and the message), in JSON by [`SafeJson`] (serde already escapes
//! C0 controls; DEL, C1 controls and the Unicode line and bidi controls are
//! escaped on the way out).

use std::borrow::Cow;
use std::fmt;
use std::io::{self, IsTerminal};

use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::{DefaultFields, Writer};
use tracing_subscriber::fmt::{FormatFields, MakeWriter};
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global log subscriber.
///
/// The filter is `log.level` unless `RUST_LOG` is set, which overrides it
/// while debugging without editing the configuration. When a subscriber
/// is already installed (in tests, for one) it is kept.
pub fn init(log: &LogConfig) {
    let mut rejected = None;
    let filter = match std::env::var("RUST_LOG") {
        Ok(env) if !env.trim().is_empty() => EnvFilter::try_new(&env).unwrap_or_else(|e| {
            rejected = Some(format!("RUST_LOG={env:?} is not a valid filter ({e})"));
            configured_filter(log)
        }),
        _ => configured_filter(log),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let installed = match log.format {
        LogFormat::Text => builder
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .fmt_fields(SafeFields)
            .try_init(),
        LogFormat::Json => builder
            .with_writer(SafeJson(std::io::stderr))
            .with_ansi(false)
            .json()
            .try_init(),
    };
    if let (Ok(()), Some(rejected)) = (installed, rejected) {
        tracing::warn!("{rejected}; using log.level = {:?}", log.level);
    }
}

/// `log.level`, which validation has checked; `info` if it is unusable anyway.
fn configured_filter(log: &LogConfig) -> EnvFilter {
    EnvFilter::try_new(&log.level).unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Characters a log line must not carry raw: the Unicode control characters
/// (C0, DEL, C1), the line and paragraph separators that some viewers break
/// lines at, and the bidirectional overrides that reorder what is shown.
pub fn must_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Writes `text` with every character of [`must_escape`] spelt as Rust
/// writes it (`\n`, `\r`, `\t`, else `\u{1b}`); everything else as is.
pub fn write_escaped(out: &mut dyn fmt::Write, text: &str) -> fmt::Result {
    let mut rest = text;
    while let Some(at) = rest.find(must_escape) {
        out.write_str(&rest[..at])?;
        let c = rest[at..].chars().next().expect("found at a char boundary");
        match c {
            '\n' => out.write_str("\\n")?,
            '\r' => out.write_str("\\r")?,
            '\t' => out.write_str("\\t")?,
            c => write!(out, "\\u{{{:x}}}", c as u32)?,
        }
        rest = &rest[at + c.len_utf8()..];
    }
    out.write_str(rest)
}

/// `text` with [`write_escaped`] applied (borrowed when nothing changes).
pub fn escaped(text: &str) -> Cow<'_, str> {
    if !text.contains(must_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    write_escaped(&mut out, text).expect("writing to a String cannot fail");
    Cow::Owned(out)
}

/// A `fmt::Write` that escapes everything written through it.
struct Escaping<'a>(&'a mut dyn fmt::Write);

impl fmt::Write for Escaping<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_escaped(self.0, s)
    }
}

/// The text format's fields (event fields, the message, span fields), laid
/// out as `tracing-subscriber` does, with every value escaped. Field names
/// lose their italics on a terminal: the escaping writer would escape them.
pub struct SafeFields;

impl<'writer> FormatFields<'writer> for SafeFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        let mut escaping = Escaping(&mut writer);
        DefaultFields::new().format_fields(Writer::new(&mut escaping), fields)
    }
}

/// The JSON format's writer: each line as serde wrote it, with DEL, C1
/// controls and the Unicode line and bidi controls turned into `\uXXXX`.
/// Those can only occur inside JSON strings (the structure is ASCII), where
/// the escape means the same character, so every line stays valid JSON.
pub struct SafeJson<M>(pub M);

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for SafeJson<M> {
    type Writer = SafeJsonWriter<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        SafeJsonWriter(self.0.make_writer())
    }
}

pub struct SafeJsonWriter<W>(W);

impl<W: io::Write> io::Write for SafeJsonWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_all(&escape_json_extras(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// Escapes in serialized JSON what serde leaves raw but [`must_escape`]
/// names: DEL, C1 controls, U+2028/2029 and the bidi controls. C0 controls
/// never reach here raw (JSON forbids them in strings).
pub fn escape_json_extras(json: &[u8]) -> Cow<'_, [u8]> {
    let Ok(text) = std::str::from_utf8(json) else {
        // The formatter writes whole lines of UTF-8; anything else is
        // passed on untouched rather than lost.
        return Cow::Borrowed(json);
    };
    if !text.contains(must_escape) {
        return Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if must_escape(c) && !matches!(c, '\n' | '\r' | '\t') {
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out.into_bytes())
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn control_characters_are_escaped_and_nothing_else() {
        let table: &[(&str, &str)] = &[
            ("app", "app"),
            ("", ""),
            ("bücher 日本 \\n", "bücher 日本 \\n"),
            ("a\nb", "a\\nb"),
            ("a\r\nb", "a\\r\\nb"),
            ("\t", "\\t"),
            ("\0", "\\u{0}"),
            ("\x1b[31mred", "\\u{1b}[31mred"),
            ("\x07\x08\x0c\x7f", "\\u{7}\\u{8}\\u{c}\\u{7f}"),
            ("\u{85}next line", "\\u{85}next line"),
            ("\u{9b}2J", "\\u{9b}2J"),
            ("a\u{2028}b\u{2029}", "a\\u{2028}b\\u{2029}"),
            ("\u{202e}gpj.exe", "\\u{202e}gpj.exe"),
            ("\u{2066}x\u{2069}", "\\u{2066}x\\u{2069}"),
            ("\u{200b}zero width", "\u{200b}zero width"),
        ];
        for (input, want) in table {
            assert_eq!(escaped(input), *want, "{input:?}");
        }
        assert!(matches!(escaped("plain"), Cow::Borrowed(_)));
    }

    #[test]
    fn json_extras_are_escaped_and_the_line_stays_json() {
        let table: &[(&str, &str)] = &[
            (r#"{"u":"app"}"#, r#"{"u":"app"}"#),
            ("{\"u\":\"a\x7fb\"}", r#"{"u":"a\u007fb"}"#),
            ("{\"u\":\"\u{85}\u{9b}\"}", r#"{"u":"\u0085\u009b"}"#),
            ("{\"u\":\"\u{2028}\u{202e}\"}", r#"{"u":"\u2028\u202e"}"#),
            ("{\"u\":\"é\"}\n", "{\"u\":\"é\"}\n"),
        ];
        for (input, want) in table {
            let out = escape_json_extras(input.as_bytes());
            assert_eq!(std::str::from_utf8(&out).unwrap(), *want, "{input:?}");
            let before: serde_json::Value = serde_json::from_str(input).unwrap();
            let after: serde_json::Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(before, after, "{input:?}");
        }
    }

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'a self) -> Buffer {
            self.clone()
        }
    }

    const FORGED: &str =
        "x\n2026-01-01T00:00:00Z  INFO smtp: authenticated user=app\x1b[2J\u{85}\u{7f}";

    /// Logs a client-chosen string every way a field can carry it.
    fn log_hostile() {
        let span = tracing::info_span!("smtp", helo = %FORGED);
        let _in = span.enter();
        tracing::warn!(user = %FORGED, debug = ?FORGED, plain = FORGED, "failed for {FORGED}");
    }

    #[test]
    fn text_lines_carry_no_raw_control_characters() {
        let buffer = Buffer::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(buffer.clone())
            .with_ansi(false)
            .fmt_fields(SafeFields)
            .finish();
        tracing::subscriber::with_default(subscriber, log_hostile);
        let out = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        assert_eq!(out.matches('\n').count(), 1, "{out}");
        assert!(out.ends_with('\n'));
        assert!(!out[..out.len() - 1].contains(must_escape), "{out:?}");
        assert!(out.contains("user=x\\n2026-01-01"), "{out}");
        assert!(out.contains("\\u{1b}[2J"), "{out}");
        assert!(out.contains("helo=x\\n"), "span field: {out}");
    }

    #[test]
    fn json_lines_carry_no_raw_control_characters() {
        let buffer = Buffer::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(SafeJson(buffer.clone()))
            .json()
            .finish();
        tracing::subscriber::with_default(subscriber, log_hostile);
        let out = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        assert_eq!(out.matches('\n').count(), 1, "{out}");
        assert!(!out[..out.len() - 1].contains(must_escape), "{out:?}");
        let line: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(line["fields"]["user"], FORGED, "{out}");
        assert_eq!(line["span"]["helo"], FORGED, "{out}");
    }
}
