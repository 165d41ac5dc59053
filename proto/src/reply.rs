//! SMTP replies with RFC 3463 enhanced status codes.

use std::fmt;

/// An RFC 3463 enhanced status code, `class.subject.detail`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EnhancedStatus(pub u8, pub u16, pub u16);

impl fmt::Display for EnhancedStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// One SMTP reply: a code, an optional enhanced status and one or more lines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub status: Option<EnhancedStatus>,
    pub lines: Vec<String>,
}

impl Reply {
    /// A one-line reply with an enhanced status code.
    pub fn new(code: u16, status: EnhancedStatus, text: impl Into<String>) -> Self {
        Reply {
            code,
            status: Some(status),
            lines: vec![text.into()],
        }
    }

    /// A reply without an enhanced status code (greeting, EHLO, 354, 334).
    pub fn plain(code: u16, lines: Vec<String>) -> Self {
        Reply {
            code,
            status: None,
            lines,
        }
    }

    pub fn is_positive(&self) -> bool {
        self.code < 400
    }

    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }

    /// The reply as sent on the wire: `250-first\r\n250 last\r\n`.
    pub fn to_wire(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let last = self.lines.len().saturating_sub(1);
        for (i, line) in self.lines.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            let text = match self.status {
                Some(status) => format!("{} {}", status, line),
                None => line.clone(),
            };
            out.extend_from_slice(format!("{}{}{}\r\n", self.code, sep, text).as_bytes());
        }
        if self.lines.is_empty() {
            out.extend_from_slice(format!("{}\r\n", self.code).as_bytes());
        }
        out
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(String::from_utf8_lossy(&self.to_wire()).trim_end())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_line_with_status() {
        let r = Reply::new(250, EnhancedStatus(2, 1, 0), "Sender OK");
        assert_eq!(r.to_wire(), b"250 2.1.0 Sender OK\r\n");
    }

    #[test]
    fn multi_line_uses_dashes_until_the_last() {
        let r = Reply::plain(
            250,
            vec![
                "relay.example".into(),
                "PIPELINING".into(),
                "SIZE 100".into(),
            ],
        );
        assert_eq!(
            r.to_wire(),
            b"250-relay.example\r\n250-PIPELINING\r\n250 SIZE 100\r\n".to_vec()
        );
    }

    #[test]
    fn status_repeats_on_every_line() {
        let r = Reply {
            code: 550,
            status: Some(EnhancedStatus(5, 7, 1)),
            lines: vec!["a".into(), "b".into()],
        };
        assert_eq!(r.to_wire(), b"550-5.7.1 a\r\n550 5.7.1 b\r\n".to_vec());
        assert!(r.is_permanent() && !r.is_transient() && !r.is_positive());
    }
}
