//! Trace headers: the `Received:` field this server adds to each message
//! it accepts (RFC 5321 section 4.4) and the RFC 5322 date in it.
//!
//! Pure builders: the caller passes the clock, so the output is testable.

use std::net::IpAddr;

use crate::address::Mailbox;
use crate::envelope::MessageId;

/// The `with` protocol name of RFC 3848 for how the message came in.
pub fn with_protocol(esmtp: bool, tls: bool, auth: bool) -> &'static str {
    match (esmtp, tls, auth) {
        (false, _, _) => "SMTP",
        (true, false, false) => "ESMTP",
        (true, true, false) => "ESMTPS",
        (true, false, true) => "ESMTPA",
        (true, true, true) => "ESMTPSA",
    }
}

/// `Received: from helo ([ip]) by host with X id Y for <r>; date`, folded
/// before `by` and `for` so each line stays short.
///
/// The HELO name is the client's claim; it is written as a plain word with
/// anything that could break the header syntax replaced by `?`.
pub fn received_header(
    by_hostname: &str,
    helo: &str,
    peer_ip: IpAddr,
    with: &str,
    id: &MessageId,
    for_rcpt: Option<&Mailbox>,
    unix_secs: u64,
) -> String {
    let helo: String = helo
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && !"()<>;\\\"".contains(c) {
                c
            } else {
                '?'
            }
        })
        .collect();
    let helo = if helo.is_empty() { "unknown" } else { &helo };
    let ip = match peer_ip {
        IpAddr::V4(v4) => format!("[{v4}]"),
        IpAddr::V6(v6) => format!("[IPv6:{v6}]"),
    };
    let mut out = format!("Received: from {helo} ({ip})\r\n\tby {by_hostname} with {with} id {id}");
    if let Some(rcpt) = for_rcpt {
        out.push_str(&format!("\r\n\tfor <{rcpt}>"));
    }
    out.push_str(&format!("; {}\r\n", rfc5322_date(unix_secs)));
    out
}

/// `Sat, 28 Nov 2026 18:00:42 +0000` for a Unix time, always in UTC.
pub fn rfc5322_date(unix_secs: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = unix_secs / 86_400;
    let secs = unix_secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{}, {} {} {} {:02}:{:02}:{:02} +0000",
        DAYS[(days % 7) as usize],
        day,
        MONTHS[(month - 1) as usize],
        year,
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// Year, month (1-12) and day (1-31) of a day count since 1970-01-01, by
/// the proleptic Gregorian calendar (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    // Shift the epoch to 0000-03-01 so leap days fall at the end of a year.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        let table = [
            (0, "Thu, 1 Jan 1970 00:00:00 +0000"),
            (951_782_400, "Tue, 29 Feb 2000 00:00:00 +0000"),
            (1_709_251_199, "Thu, 29 Feb 2024 23:59:59 +0000"),
            (1_709_251_200, "Fri, 1 Mar 2024 00:00:00 +0000"),
            (1_735_689_599, "Tue, 31 Dec 2024 23:59:59 +0000"),
            (1_795_888_842, "Sat, 28 Nov 2026 18:00:42 +0000"),
            (4_102_444_800, "Fri, 1 Jan 2100 00:00:00 +0000"),
            (4_107_542_400, "Mon, 1 Mar 2100 00:00:00 +0000"),
        ];
        for (secs, text) in table {
            assert_eq!(rfc5322_date(secs), text, "{secs}");
        }
    }

    #[test]
    fn protocols() {
        assert_eq!(with_protocol(false, true, true), "SMTP");
        assert_eq!(with_protocol(true, false, false), "ESMTP");
        assert_eq!(with_protocol(true, true, false), "ESMTPS");
        assert_eq!(with_protocol(true, false, true), "ESMTPA");
        assert_eq!(with_protocol(true, true, true), "ESMTPSA");
    }

    #[test]
    fn received_fields() {
        let id = MessageId("0123abc".into());
        let rcpt = Mailbox {
            local_part: "john doe".into(),
            domain: "example.net".into(),
        };
        let h = received_header(
            "mx.example.net",
            "client.example",
            "192.0.2.1".parse().unwrap(),
            "ESMTPS",
            &id,
            Some(&rcpt),
            1_795_888_842,
        );
        assert_eq!(
            h,
            "Received: from client.example ([192.0.2.1])\r\n\tby mx.example.net with ESMTPS id 0123abc\r\n\tfor <\"john doe\"@example.net>; Sat, 28 Nov 2026 18:00:42 +0000\r\n"
        );
        let h = received_header(
            "mx.example.net",
            "bad (helo);\u{e9}",
            "2001:db8::1".parse().unwrap(),
            "SMTP",
            &id,
            None,
            0,
        );
        assert_eq!(
            h,
            "Received: from bad??helo??? ([IPv6:2001:db8::1])\r\n\tby mx.example.net with SMTP id 0123abc; Thu, 1 Jan 1970 00:00:00 +0000\r\n"
        );
        assert!(
            received_header("h", "", "::1".parse().unwrap(), "SMTP", &id, None, 0)
                .starts_with("Received: from unknown (")
        );
    }
}
