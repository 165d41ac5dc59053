//! Replies fed whole, one octet at a time and in threes; transactions
//! driven by scripted server replies.

use super::*;
use crate::data::DataReader;

/// Feeds `input` in pieces of `size` octets and collects every reply, or
/// the first error.
fn parse_in(input: &[u8], size: usize) -> Result<Vec<Reply>, ReplyError> {
    let mut parser = ReplyParser::new();
    let mut replies = Vec::new();
    for chunk in input.chunks(size.max(1)) {
        parser.feed(chunk);
        while let Some(reply) = parser.next_reply()? {
            replies.push(reply);
        }
    }
    Ok(replies)
}

/// The same result whole, byte by byte and in threes.
fn parse(input: &[u8]) -> Result<Vec<Reply>, ReplyError> {
    let whole = parse_in(input, input.len());
    assert_eq!(parse_in(input, 1), whole, "byte by byte: {input:?}");
    assert_eq!(parse_in(input, 3), whole, "in threes: {input:?}");
    whole
}

fn wire(replies: &[Reply]) -> Vec<String> {
    replies.iter().map(|r| r.to_string()).collect()
}

/// An input and the replies (in their wire form) or the error it gives.
type ReplyCase<'a> = (&'a [u8], Result<&'a [&'a str], ReplyError>);

#[test]
fn reply_table() {
    let long = format!("250 {}\r\n", "x".repeat(MAX_REPLY_LINE));
    let cases: &[ReplyCase] = &[
        (b"220 mx.example ESMTP\r\n", Ok(&["220 mx.example ESMTP"])),
        (b"250 ok\r\n", Ok(&["250 ok"])),
        (b"250\r\n", Ok(&["250"])),
        (
            b"250-mx.example\r\n250-PIPELINING\r\n250 SIZE 100\r\n",
            Ok(&["250-mx.example\r\n250-PIPELINING\r\n250 SIZE 100"]),
        ),
        (
            b"550 5.1.1 no such user\r\n",
            Ok(&["550 5.1.1 no such user"]),
        ),
        // Two replies in one read (pipelining).
        (
            b"250 2.1.0 ok\r\n451 4.3.0 later\r\n",
            Ok(&["250 2.1.0 ok", "451 4.3.0 later"]),
        ),
        // Bare LF line endings are read too.
        (b"250-a\n250 b\n", Ok(&["250-a\r\n250 b"])),
        // An incomplete reply is not a reply yet.
        (b"250-a\r\n250 b", Ok(&[])),
        // A status of another class is text.
        (b"250 5.1.1 odd\r\n", Ok(&["250 5.1.1 odd"])),
        (b"hello\r\n", Err(ReplyError::Malformed("hello".into()))),
        (b"25\r\n", Err(ReplyError::Malformed("25".into()))),
        (b"250x\r\n", Err(ReplyError::Malformed("250x".into()))),
        (b"650 no\r\n", Err(ReplyError::Malformed("650 no".into()))),
        (b"190 no\r\n", Err(ReplyError::Malformed("190 no".into()))),
        (
            b"250-a\r\n550 b\r\n",
            Err(ReplyError::CodeMismatch {
                code: 250,
                line: "550 b".into(),
            }),
        ),
        (long.as_bytes(), Err(ReplyError::LineTooLong)),
    ];
    for (input, expected) in cases {
        let got = parse(input).map(|r| wire(&r));
        let expected = expected
            .clone()
            .map(|lines| lines.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(got, expected, "input {:?}", String::from_utf8_lossy(input));
    }
}

#[test]
fn an_endless_line_is_refused_before_its_end() {
    let mut parser = ReplyParser::new();
    parser.feed(&vec![b'2'; MAX_REPLY_LINE]);
    assert_eq!(parser.next_reply(), Err(ReplyError::LineTooLong));
}

#[test]
fn too_many_lines_are_refused() {
    let mut input = Vec::new();
    for _ in 0..=MAX_REPLY_LINES {
        input.extend_from_slice(b"250-x\r\n");
    }
    assert_eq!(parse(&input), Err(ReplyError::TooManyLines));
}

#[test]
fn enhanced_status_is_split_off_every_line() {
    let replies = parse(b"550-5.7.1 first\r\n550 5.7.1 second\r\n").unwrap();
    assert_eq!(replies[0].status, Some(EnhancedStatus(5, 7, 1)));
    assert_eq!(replies[0].lines, vec!["first", "second"]);
}

#[test]
fn discarding_forgets_bytes_sent_before_tls() {
    let mut parser = ReplyParser::new();
    parser.feed(b"220 go ahead\r\n250 injected\r\n");
    assert_eq!(parser.next_reply().unwrap().unwrap().code, 220);
    assert_eq!(parser.buffered(), 14);
    parser.discard_buffered();
    assert_eq!(parser.next_reply(), Ok(None));
}

fn ehlo_reply(lines: &[&str]) -> Reply {
    let mut input = String::new();
    for (i, line) in lines.iter().enumerate() {
        let sep = if i + 1 == lines.len() { ' ' } else { '-' };
        input.push_str(&format!("250{sep}{line}\r\n"));
    }
    parse(input.as_bytes()).unwrap().remove(0)
}

#[test]
fn capabilities_table() {
    let caps = Capabilities::from_ehlo(&ehlo_reply(&[
        "mx.example greets you",
        "PIPELINING",
        "SIZE 35882577",
        "8BITMIME",
        "smtputf8",
        "STARTTLS",
        "AUTH PLAIN login",
        "AUTH=CRAM-MD5 PLAIN",
        "ENHANCEDSTATUSCODES",
        "DSN",
        "CHUNKING",
    ]));
    assert_eq!(
        caps,
        Capabilities {
            pipelining: true,
            size: Some(35882577),
            eight_bit_mime: true,
            smtputf8: true,
            starttls: true,
            auth: vec!["PLAIN".into(), "LOGIN".into(), "CRAM-MD5".into()],
            enhanced_status_codes: true,
            dsn: true,
        }
    );
    assert_eq!(caps.size_limit(), Some(35882577));

    let bare = Capabilities::from_ehlo(&ehlo_reply(&["mx.example", "SIZE"]));
    assert_eq!(bare.size, Some(0));
    assert_eq!(bare.size_limit(), None);
    assert!(!bare.pipelining && !bare.starttls && bare.auth.is_empty());

    // The greeting line is a name, never an extension.
    let named = Capabilities::from_ehlo(&ehlo_reply(&["PIPELINING"]));
    assert!(!named.pipelining);
}

fn mailbox(text: &str) -> Mailbox {
    let (local_part, domain) = text.rsplit_once('@').unwrap();
    Mailbox {
        local_part: local_part.into(),
        domain: domain.into(),
    }
}

fn envelope(sender: Option<&str>, recipients: &[&str]) -> Envelope {
    Envelope {
        sender: sender.map(mailbox),
        recipients: recipients
            .iter()
            .map(|r| Recipient {
                address: mailbox(r),
                notify: None,
                orcpt: None,
            })
            .collect(),
        ..Envelope::default()
    }
}

fn reply(text: &str) -> Reply {
    parse(format!("{text}\r\n").as_bytes()).unwrap().remove(0)
}

/// Drives a transaction against scripted replies, one per command, and
/// returns what was written (the body as `<body>`) and the results.
fn run(mut tx: Transaction, replies: &[&str]) -> (String, Vec<(u32, Disposition, String)>) {
    let mut written = String::new();
    let mut replies = replies.iter();
    let mut step = tx.start();
    loop {
        match step {
            Step::Write(bytes) => written.push_str(&String::from_utf8(bytes).unwrap()),
            Step::WriteBody => written.push_str("<body>"),
            Step::Read => {}
            Step::Done => break,
        }
        let Some(next) = replies.next() else {
            panic!("no reply scripted after {written:?}");
        };
        step = tx.on_reply(&reply(next));
    }
    assert!(
        replies.next().is_none(),
        "replies left over after {written:?}"
    );
    assert!(tx.is_done());
    let results = tx
        .into_results()
        .into_iter()
        .map(|r| (r.recipient, r.disposition, r.reply))
        .collect();
    (written, results)
}

fn caps(pipelining: bool) -> Capabilities {
    Capabilities {
        pipelining,
        enhanced_status_codes: true,
        ..Capabilities::default()
    }
}

use Disposition::{Deferred, Delivered, Failed};

#[test]
fn one_command_at_a_time_without_pipelining() {
    let env = envelope(
        Some("a@example.com"),
        &["x@d.example", "y@d.example", "z@d.example"],
    );
    let tx = Transaction::new(&caps(false), &env, &[0, 1, 2], b"hi\r\n", &NoDowngrade).unwrap();
    let (written, results) = run(
        tx,
        &[
            "250 2.1.0 ok",
            "250 2.1.5 ok",
            "451 4.2.0 try later",
            "550 5.1.1 no such user",
            "354 go ahead",
            "250 2.0.0 queued as 1",
        ],
    );
    assert_eq!(
        written,
        "MAIL FROM:<a@example.com>\r\nRCPT TO:<x@d.example>\r\nRCPT TO:<y@d.example>\r\n\
         RCPT TO:<z@d.example>\r\nDATA\r\n<body>"
    );
    assert_eq!(
        results,
        vec![
            (0, Delivered, "250 2.0.0 queued as 1".into()),
            (1, Deferred, "451 4.2.0 try later".into()),
            (2, Failed, "550 5.1.1 no such user".into()),
        ]
    );
}

#[test]
fn pipelining_writes_mail_rcpt_and_data_at_once() {
    let env = envelope(None, &["x@d.example", "y@d.example"]);
    let tx = Transaction::new(&caps(true), &env, &[1, 0], b"hi\r\n", &NoDowngrade).unwrap();
    let (written, results) = run(
        tx,
        &[
            "250 ok",
            "550 5.1.1 unknown",
            "250 ok",
            "354 go",
            "451 4.3.0 disk full",
        ],
    );
    assert_eq!(
        written,
        "MAIL FROM:<>\r\nRCPT TO:<y@d.example>\r\nRCPT TO:<x@d.example>\r\nDATA\r\n<body>"
    );
    assert_eq!(
        results,
        vec![
            (1, Failed, "550 5.1.1 unknown".into()),
            (0, Deferred, "451 4.3.0 disk full".into()),
        ]
    );
}

#[test]
fn no_recipient_accepted_means_rset_instead_of_data() {
    let env = envelope(Some("a@b.example"), &["x@d.example"]);
    let tx = Transaction::new(&caps(false), &env, &[0], b"", &NoDowngrade).unwrap();
    let (written, results) = run(tx, &["250 ok", "550 5.1.1 no", "250 reset"]);
    assert_eq!(
        written,
        "MAIL FROM:<a@b.example>\r\nRCPT TO:<x@d.example>\r\nRSET\r\n"
    );
    assert_eq!(results, vec![(0, Failed, "550 5.1.1 no".into())]);

    // Pipelined: the refused DATA is ignored, then RSET.
    let tx = Transaction::new(&caps(true), &env, &[0], b"", &NoDowngrade).unwrap();
    let (written, results) = run(
        tx,
        &[
            "250 ok",
            "450 4.2.1 busy",
            "554 5.5.1 no valid recipients",
            "250 ok",
        ],
    );
    assert!(written.ends_with("DATA\r\nRSET\r\n"), "{written}");
    assert_eq!(results, vec![(0, Deferred, "450 4.2.1 busy".into())]);

    // Pipelined, and the server says 354 anyway: a lone dot, then RSET.
    let tx = Transaction::new(&caps(true), &env, &[0], b"", &NoDowngrade).unwrap();
    let (written, results) = run(tx, &["250 ok", "550 no", "354 go", "554 no data", "250 ok"]);
    assert!(written.ends_with("DATA\r\n.\r\nRSET\r\n"), "{written}");
    assert_eq!(results, vec![(0, Failed, "550 no".into())]);
}

#[test]
fn a_refused_mail_from_decides_every_recipient() {
    let env = envelope(Some("a@b.example"), &["x@d.example", "y@d.example"]);
    let tx = Transaction::new(&caps(false), &env, &[0, 1], b"", &NoDowngrade).unwrap();
    let (written, results) = run(tx, &["451 4.7.1 greylisted"]);
    assert_eq!(written, "MAIL FROM:<a@b.example>\r\n");
    assert_eq!(
        results,
        vec![
            (0, Deferred, "451 4.7.1 greylisted".into()),
            (1, Deferred, "451 4.7.1 greylisted".into()),
        ]
    );

    let tx = Transaction::new(&caps(true), &env, &[0, 1], b"", &NoDowngrade).unwrap();
    let (written, results) = run(
        tx,
        &[
            "553 5.7.1 sender refused",
            "503 need MAIL",
            "503 need MAIL",
            "503 need RCPT",
            "250 ok",
        ],
    );
    assert!(written.ends_with("DATA\r\nRSET\r\n"));
    assert_eq!(results[0], (0, Failed, "553 5.7.1 sender refused".into()));
    assert_eq!(results[1], (1, Failed, "553 5.7.1 sender refused".into()));
}

#[test]
fn a_refused_data_command_decides_the_accepted_recipients() {
    let env = envelope(Some("a@b.example"), &["x@d.example", "y@d.example"]);
    let tx = Transaction::new(&caps(false), &env, &[0, 1], b"", &NoDowngrade).unwrap();
    let (written, results) = run(
        tx,
        &["250 ok", "250 ok", "550 no", "554 5.3.0 no", "250 ok"],
    );
    assert!(written.ends_with("DATA\r\nRSET\r\n"));
    assert_eq!(
        results,
        vec![
            (0, Failed, "554 5.3.0 no".into()),
            (1, Failed, "550 no".into())
        ]
    );
}

#[test]
fn a_broken_connection_defers_recipients_without_a_result() {
    let env = envelope(Some("a@b.example"), &["x@d.example", "y@d.example"]);
    let mut tx = Transaction::new(&caps(true), &env, &[0, 1], b"", &NoDowngrade).unwrap();
    tx.start();
    tx.on_reply(&reply("250 ok"));
    tx.on_reply(&reply("550 5.1.1 no"));
    assert_eq!(tx.stage(), Stage::Rcpt);
    let text = format!("connection lost after {}", tx.stage());
    tx.abort(Disposition::Deferred, &text);
    let results = tx.into_results();
    assert_eq!(results[0].disposition, Failed);
    assert_eq!(results[1].disposition, Deferred);
    assert_eq!(results[1].reply, "connection lost after RCPT TO");
}

#[test]
fn mail_parameters_follow_the_capabilities() {
    let mut env = envelope(Some("a@b.example"), &["x@d.example"]);
    env.ret = Some(Ret::Headers);
    env.envid = Some("QQ314159".into());
    env.recipients[0].notify = Some(Notify {
        failure: true,
        delay: true,
        ..Notify::default()
    });
    env.recipients[0].orcpt = Some("rfc822;x@d.example".into());
    let body = "caf\u{e9}\r\n".as_bytes();

    let full = Capabilities {
        size: Some(1000),
        eight_bit_mime: true,
        smtputf8: true,
        dsn: true,
        ..caps(false)
    };
    let mut tx = Transaction::new(&full, &env, &[0], body, &NoDowngrade).unwrap();
    assert_eq!(
        tx.start(),
        Step::Write(
            b"MAIL FROM:<a@b.example> SIZE=7 BODY=8BITMIME RET=HDRS ENVID=QQ314159\r\n".to_vec()
        )
    );
    assert_eq!(
        tx.on_reply(&reply("250 ok")),
        Step::Write(
            b"RCPT TO:<x@d.example> NOTIFY=FAILURE,DELAY ORCPT=rfc822;x@d.example\r\n".to_vec()
        )
    );

    // Without DSN the DSN parameters stay home; NEVER stands alone.
    env.recipients[0].notify = Some(Notify {
        never: true,
        ..Notify::default()
    });
    let plain = Capabilities {
        eight_bit_mime: true,
        ..caps(false)
    };
    let mut tx = Transaction::new(&plain, &env, &[0], b"ascii", &NoDowngrade).unwrap();
    assert_eq!(
        tx.start(),
        Step::Write(b"MAIL FROM:<a@b.example>\r\n".to_vec())
    );
    assert_eq!(
        tx.on_reply(&reply("250 ok")),
        Step::Write(b"RCPT TO:<x@d.example>\r\n".to_vec())
    );
    let mut tx = Transaction::new(&full, &env, &[0], b"ascii", &NoDowngrade).unwrap();
    tx.start();
    assert_eq!(
        tx.on_reply(&reply("250 ok")),
        Step::Write(b"RCPT TO:<x@d.example> NOTIFY=NEVER ORCPT=rfc822;x@d.example\r\n".to_vec())
    );
}

#[test]
fn smtputf8_is_asked_for_when_an_address_needs_it() {
    let env = envelope(Some("j\u{f6}rg@b.example"), &["x@d.example"]);
    let utf8 = Capabilities {
        smtputf8: true,
        ..caps(false)
    };
    let mut tx = Transaction::new(&utf8, &env, &[0], b"", &NoDowngrade).unwrap();
    assert_eq!(
        tx.start(),
        Step::Write(
            "MAIL FROM:<j\u{f6}rg@b.example> SMTPUTF8\r\n"
                .as_bytes()
                .to_vec()
        )
    );
    let refused = Transaction::new(&caps(false), &env, &[0], b"", &NoDowngrade).unwrap_err();
    assert_eq!(refused.reply.code, 553);
    assert_eq!(refused.reply.status, Some(EnhancedStatus(5, 6, 7)));
}

#[test]
fn a_message_over_the_size_limit_is_refused_before_sending() {
    let env = envelope(Some("a@b.example"), &["x@d.example"]);
    let small = Capabilities {
        size: Some(10),
        ..caps(false)
    };
    let refused = Transaction::new(&small, &env, &[0], &[b'x'; 11], &NoDowngrade).unwrap_err();
    assert_eq!(refused.reply.status, Some(EnhancedStatus(5, 3, 4)));
    assert!(refused.to_string().starts_with("552 5.3.4 "), "{refused}");
    assert!(Transaction::new(&small, &env, &[0], &[b'x'; 10], &NoDowngrade).is_ok());
}

#[test]
fn an_eight_bit_body_goes_through_the_policy_for_a_seven_bit_server() {
    let env = envelope(Some("a@b.example"), &["x@d.example"]);
    let body = b"\xe9t\xe9\r\n";
    let refused = Transaction::new(&caps(false), &env, &[0], body, &NoDowngrade).unwrap_err();
    assert_eq!(refused.reply.status, Some(EnhancedStatus(5, 6, 3)));
    assert_eq!(refused.reply.code, 554);

    fn to_qp(_: &[u8]) -> Result<Vec<u8>, String> {
        Ok(b"=E9t=E9\r\n".to_vec())
    }
    let mut tx = Transaction::new(&caps(false), &env, &[0], body, &DowngradeWith(to_qp)).unwrap();
    assert_eq!(tx.converted(), Some(&b"=E9t=E9\r\n"[..]));
    assert_eq!(
        tx.start(),
        Step::Write(b"MAIL FROM:<a@b.example>\r\n".to_vec())
    );

    let eight = Capabilities {
        eight_bit_mime: true,
        ..caps(false)
    };
    let tx = Transaction::new(&eight, &env, &[0], body, &NoDowngrade).unwrap();
    assert_eq!(tx.converted(), None);
}

#[test]
fn a_planned_body_is_described_by_its_size_and_whether_it_is_eight_bit() {
    let env = envelope(Some("a@b.example"), &["x@d.example"]);
    let eight = Capabilities {
        size: Some(5_000_000),
        eight_bit_mime: true,
        ..caps(false)
    };
    let mut tx = Transaction::planned(&eight, &env, &[0], 4_000_000, true).unwrap();
    assert_eq!(tx.converted(), None);
    assert_eq!(
        tx.start(),
        Step::Write(b"MAIL FROM:<a@b.example> SIZE=4000000 BODY=8BITMIME\r\n".to_vec())
    );
    let refused = Transaction::planned(&eight, &env, &[0], 5_000_001, false).unwrap_err();
    assert_eq!(refused.reply.status, Some(EnhancedStatus(5, 3, 4)));
    // What must be converted is not planned without its bytes.
    let refused = Transaction::planned(&caps(false), &env, &[0], 10, true).unwrap_err();
    assert_eq!(refused.reply.status, Some(EnhancedStatus(5, 6, 3)));
    assert!(Transaction::planned(&caps(false), &env, &[0], 10, false).is_ok());
}

#[test]
fn body_encoding_table() {
    let cases: &[(&[u8], &[u8])] = &[
        (b"", b".\r\n"),
        (b"a\r\nb\r\n", b"a\r\nb\r\n.\r\n"),
        (b"a\nb", b"a\r\nb\r\n.\r\n"),
        (b"a\rb\r", b"a\r\nb\r\n.\r\n"),
        (b".\r\n", b"..\r\n.\r\n"),
        (b"x\r\n.\r\n..y\r\n", b"x\r\n..\r\n...y\r\n.\r\n"),
        (b".lead\n.", b"..lead\r\n..\r\n.\r\n"),
        (b"a.\r\n", b"a.\r\n.\r\n"),
        (b"a\r\r\nb", b"a\r\n\r\nb\r\n.\r\n"),
    ];
    for (body, expected) in cases {
        // Any chunking gives the same bytes.
        for size in [1, 2, 3, body.len().max(1)] {
            let mut out = Vec::new();
            let mut encoder = BodyEncoder::new();
            for chunk in body.chunks(size) {
                encoder.encode(chunk, &mut out);
            }
            encoder.finish(&mut out);
            assert_eq!(
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(expected),
                "body {:?} in chunks of {size}",
                String::from_utf8_lossy(body)
            );
        }
    }
}

/// What the server's DATA reader makes of the encoded body is the body
/// with CRLF line endings, its last line ended.
#[test]
fn dot_stuffing_round_trips_through_the_data_reader() {
    let bodies: &[&[u8]] = &[
        b"Subject: dots\r\n\r\n.\r\n..x\r\n.\r\nend\r\n",
        b".\r\n",
        b"..\r\n",
        b"no final line ending",
        b"lf only\n.\n..x\n",
        b"",
    ];
    for body in bodies {
        let encoded = encode_body(body);
        let mut reader = DataReader::new(1_000_000);
        let progress = reader.feed(&encoded);
        assert!(
            progress.done && progress.consumed == encoded.len(),
            "{body:?}"
        );
        let received = reader.finish().unwrap().body;
        let mut expected = String::from_utf8(body.to_vec())
            .unwrap()
            .replace("\r\n", "\n")
            .replace('\n', "\r\n");
        if !expected.is_empty() && !expected.ends_with("\r\n") {
            expected.push_str("\r\n");
        }
        assert_eq!(String::from_utf8(received).unwrap(), expected);
    }
}

#[test]
fn auth_plain_sends_one_line() {
    let mut auth = AuthClient::new(AuthMechanism::Plain, "user", "pass");
    assert_eq!(auth.start(), b"AUTH PLAIN AHVzZXIAcGFzcw==\r\n");
    assert_eq!(auth.on_reply(&reply("235 2.7.0 ok")), Ok(AuthStep::Done));
    let mut auth = AuthClient::new(AuthMechanism::Plain, "user", "pass");
    auth.start();
    let refused = auth
        .on_reply(&reply("535 5.7.8 bad credentials"))
        .unwrap_err();
    assert!(!refused.is_transient());
}

#[test]
fn auth_login_answers_two_challenges() {
    let mut auth = AuthClient::new(AuthMechanism::Login, "user", "pass");
    assert_eq!(auth.start(), b"AUTH LOGIN\r\n");
    assert_eq!(
        auth.on_reply(&reply("334 VXNlcm5hbWU6")),
        Ok(AuthStep::Write(b"dXNlcg==\r\n".to_vec()))
    );
    assert_eq!(
        auth.on_reply(&reply("334 UGFzc3dvcmQ6")),
        Ok(AuthStep::Write(b"cGFzcw==\r\n".to_vec()))
    );
    assert_eq!(auth.on_reply(&reply("235 ok")), Ok(AuthStep::Done));
    let mut again = AuthClient::new(AuthMechanism::Login, "u", "p");
    again.start();
    again.on_reply(&reply("334 x")).unwrap();
    again.on_reply(&reply("334 x")).unwrap();
    assert!(matches!(
        again.on_reply(&reply("334 x")),
        Err(AuthError::Unexpected(_))
    ));
}

#[test]
fn plain_is_preferred_over_login() {
    let mut caps = Capabilities {
        auth: vec!["LOGIN".into(), "PLAIN".into()],
        ..Capabilities::default()
    };
    assert_eq!(AuthMechanism::choose(&caps), Some(AuthMechanism::Plain));
    caps.auth = vec!["LOGIN".into()];
    assert_eq!(AuthMechanism::choose(&caps), Some(AuthMechanism::Login));
    caps.auth = vec!["CRAM-MD5".into()];
    assert_eq!(AuthMechanism::choose(&caps), None);
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any bytes in any cuts: replies or a typed error, never a panic,
        /// and never more than the limits allow buffered.
        #[test]
        fn the_reply_parser_never_panics(
            input in proptest::collection::vec(any::<u8>(), 0..4096),
            cuts in proptest::collection::vec(1usize..64, 1..32),
        ) {
            let mut parser = ReplyParser::new();
            let mut rest = &input[..];
            let mut cuts = cuts.iter().cycle();
            while !rest.is_empty() {
                let n = (*cuts.next().unwrap()).min(rest.len());
                parser.feed(&rest[..n]);
                rest = &rest[n..];
                match parser.next_reply() {
                    Ok(Some(reply)) => prop_assert!((200..600).contains(&reply.code)),
                    Ok(None) => prop_assert!(parser.buffered() < MAX_REPLY_LINE + 64),
                    Err(_) => return Ok(()),
                }
            }
        }

        /// Text of reply-like lines, cut anywhere, reads back the same.
        #[test]
        fn reply_lines_read_back(
            class in 2u16..6,
            subject in 0u16..6,
            detail in 0u16..10,
            lines in proptest::collection::vec("[a-zA-Z][ -~]{0,60}", 1..5),
            cut in 1usize..20,
        ) {
            let reply = Reply::plain(class * 100 + subject * 10 + detail, lines);
            let wire = reply.to_wire();
            let parsed = parse_in(&wire, cut).unwrap();
            prop_assert_eq!(parsed.len(), 1);
            prop_assert_eq!(parsed[0].to_string(), reply.to_string());
        }

        /// Encoding runs at once gives what the rule, byte by byte, gives,
        /// however the body is cut.
        #[test]
        fn encoding_runs_agrees_with_the_byte_by_byte_rule(
            body in proptest::collection::vec(prop_oneof![
                Just(b'.'), Just(b'\r'), Just(b'\n'), Just(b'a'), Just(0xe9u8)], 0..300),
            cut in 1usize..40,
        ) {
            let mut out = Vec::new();
            let mut encoder = BodyEncoder::new();
            for chunk in body.chunks(cut) {
                encoder.encode(chunk, &mut out);
            }
            encoder.finish(&mut out);
            prop_assert_eq!(out, encoded_byte_by_byte(&body));
        }

        /// Whatever the body, the server reads back its CRLF form.
        #[test]
        fn encoded_bodies_round_trip(body in proptest::collection::vec(
            prop_oneof![Just(b'.'), Just(b'\r'), Just(b'\n'), Just(b'a')], 0..200)) {
            let encoded = encode_body(&body);
            let mut reader = DataReader::new(1_000_000);
            let progress = reader.feed(&encoded);
            prop_assert!(progress.done);
            prop_assert_eq!(progress.consumed, encoded.len());
            prop_assert!(reader.finish().is_ok());
        }
    }
}

/// The encoding rule one byte at a time: CR, LF and CRLF each end a line
/// with CRLF, a dot that starts a line is doubled, `.CRLF` ends it all.
fn encoded_byte_by_byte(body: &[u8]) -> Vec<u8> {
    let (mut out, mut line_start, mut after_cr) = (Vec::new(), true, false);
    for &b in body {
        match b {
            b'\r' => {
                out.extend_from_slice(b"\r\n");
                (line_start, after_cr) = (true, true);
            }
            b'\n' if after_cr => after_cr = false,
            b'\n' => {
                out.extend_from_slice(b"\r\n");
                line_start = true;
            }
            _ => {
                if line_start && b == b'.' {
                    out.push(b'.');
                }
                out.push(b);
                (line_start, after_cr) = (false, false);
            }
        }
    }
    if !line_start {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}
