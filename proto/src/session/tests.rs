//! Sessions driven by scripts of client input. Every step is sent whole,
//! then one octet at a time, then in threes; the replies must not change.

use super::*;

fn config() -> SessionConfig {
    SessionConfig {
        hostname: "mx.example.net".into(),
        max_message_size: 10_000,
        max_session_size: 50_000,
        max_recipients: 3,
        max_hop_count: 5,
        junk_command_limit: 10,
        require_tls: false,
        tls_available: true,
        auth_available: true,
        allow_plaintext_auth: false,
        local_domains: vec!["example.net".into(), "xn--bcher-kva.example".into()],
        postmaster: Some(Mailbox {
            local_part: "ops".into(),
            domain: "remote.example".into(),
        }),
    }
}

fn stranger() -> PeerInfo {
    PeerInfo {
        ip: "192.0.2.10".parse().unwrap(),
        relay_allowed: false,
    }
}

fn trusted() -> PeerInfo {
    PeerInfo {
        relay_allowed: true,
        ..stranger()
    }
}

/// Memory for the body: the message starts with our trace header.
fn reserved(s: &mut Session) -> Reply {
    s.body_reserved(&MessageId::new(1_700_000_000_000, 7), 1_700_000_000)
}

/// The message without the `Received:` line we put first: up to the
/// first line ending not followed by a fold.
fn content(m: &IncomingMessage) -> &[u8] {
    assert!(
        m.data.starts_with(b"Received: from "),
        "no trace header first"
    );
    let end = m
        .data
        .windows(3)
        .position(|w| w[..2] == *b"\r\n" && w[2] != b'\t')
        .map_or(m.data.len(), |at| at + 2);
    &m.data[end..]
}

#[test]
fn the_message_starts_with_our_received_line() {
    let mut s = Session::new(Arc::new(config()), stranger());
    s.push_input(b"EHLO client.example\r\nMAIL FROM:<>\r\nRCPT TO:<u@example.net>\r\nDATA\r\n");
    replies(&mut s, 3);
    assert!(matches!(s.next_action(), Some(Action::ReserveBody { .. })));
    assert_eq!(reserved(&mut s).code, 354);
    s.push_input(b"Received: by an.earlier.hop\r\nSubject: x\r\n\r\nhi\r\n.\r\n");
    let Some(Action::Message(m)) = s.next_action() else {
        panic!("no message");
    };
    let id = MessageId::new(1_700_000_000_000, 7);
    let expected = format!(
        "Received: from client.example ([192.0.2.10])\r\n\tby mx.example.net with ESMTP id {id}\r\n\tfor <u@example.net>; Tue, 14 Nov 2023 22:13:20 +0000\r\n\
         Received: by an.earlier.hop\r\nSubject: x\r\n\r\nhi\r\n"
    );
    assert_eq!(String::from_utf8(m.data).unwrap(), expected);
}

fn code(r: &Reply) -> String {
    match r.status {
        Some(s) => format!("{} {}", r.code, s),
        None => r.code.to_string(),
    }
}

/// Carries out every action like a shell would: TLS always succeeds, the
/// password "secret" is right, storage works.
fn drain(s: &mut Session, out: &mut Vec<String>, messages: &mut Vec<IncomingMessage>) {
    while let Some(action) = s.next_action() {
        match action {
            Action::Reply(r) => out.push(code(&r)),
            Action::Close(r) => out.push(format!("close {}", code(&r))),
            Action::StartTls(r) => {
                out.push(format!("starttls {}", code(&r)));
                s.tls_established();
            }
            Action::Authenticate { username, password } => {
                out.push(format!("auth {username}:{password}"));
                let r = s.auth_result(password == "secret");
                out.push(code(&r));
            }
            Action::ReserveBody { .. } => {
                let r = reserved(s);
                out.push(code(&r));
            }
            Action::Message(m) => {
                out.push("message".into());
                messages.push(m);
                let r = s.message_stored(Ok(MessageId::new(1, 2)));
                out.push(code(&r));
            }
        }
    }
}

/// Takes the replies to `n` commands; memory for a body is always found.
fn replies(s: &mut Session, n: usize) {
    for i in 0..n {
        match s.next_action() {
            Some(Action::Reply(_)) => {}
            Some(Action::ReserveBody { .. }) => assert_eq!(reserved(s).code, 354),
            other => panic!("reply {i}: {other:?}"),
        }
    }
}

type Step<'a> = (&'a str, &'a [&'a str]);

/// Runs `steps` in every fragmentation; returns the messages of the last run.
fn run(config: SessionConfig, peer: PeerInfo, steps: &[Step]) -> Vec<IncomingMessage> {
    let config = Arc::new(config);
    let mut messages = Vec::new();
    for chunk in [usize::MAX, 1, 3] {
        let mut s = Session::new(config.clone(), peer.clone());
        messages.clear();
        for (input, want) in steps {
            let mut out = Vec::new();
            for piece in input.as_bytes().chunks(chunk.min(input.len()).max(1)) {
                s.push_input(piece);
                drain(&mut s, &mut out, &mut messages);
                assert!(s.buffered_len() <= MAX_COMMAND_LINE + 1);
            }
            assert_eq!(&out, want, "after {input:?} sent in chunks of {chunk}");
        }
    }
    messages
}

const EHLO: Step = ("EHLO client.example\r\n", &["250"]);

#[test]
fn greeting_and_timeout() {
    let s = Session::new(Arc::new(config()), stranger());
    assert_eq!(
        s.greeting().to_wire(),
        b"220 mx.example.net ESMTP smarthost\r\n"
    );
    assert_eq!(
        s.timeout_reply().to_wire(),
        b"421 4.4.2 mx.example.net Error: timeout exceeded\r\n"
    );
    assert!(!s.is_closed());
}

#[test]
fn ehlo_lists_what_is_offered_now() {
    let ehlo = |config: SessionConfig, tls: bool| {
        let mut s = Session::new(Arc::new(config), stranger());
        if tls {
            s.tls_established();
        }
        s.push_input(b"EHLO c\r\n");
        match s.next_action() {
            Some(Action::Reply(r)) => r.lines,
            other => panic!("{other:?}"),
        }
    };
    let base = [
        "mx.example.net",
        "PIPELINING",
        "SIZE 10000",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "DSN",
    ];
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    assert_eq!(ehlo(config(), false), with(&["STARTTLS"]));
    assert_eq!(ehlo(config(), true), with(&["AUTH PLAIN LOGIN"]));
    let plain_ok = SessionConfig {
        allow_plaintext_auth: true,
        ..config()
    };
    assert_eq!(
        ehlo(plain_ok, false),
        with(&["STARTTLS", "AUTH PLAIN LOGIN"])
    );
    let bare = SessionConfig {
        tls_available: false,
        auth_available: false,
        ..config()
    };
    assert_eq!(ehlo(bare.clone(), false), with(&[]));
    assert_eq!(ehlo(bare, true), with(&[]));
}

#[test]
fn a_whole_transaction() {
    let messages = run(
        config(),
        stranger(),
        &[
            EHLO,
            (
                "MAIL FROM:<app@remote.example> SIZE=100 BODY=8BITMIME RET=HDRS ENVID=x+2By\r\n",
                &["250 2.1.0"],
            ),
            (
                "RCPT TO:<User@Example.NET> NOTIFY=FAILURE ORCPT=rfc822;User@example.net\r\n",
                &["250 2.1.5"],
            ),
            ("RCPT TO:<Postmaster>\r\n", &["250 2.1.5"]),
            ("DATA\r\n", &["354"]),
            (
                "Subject: hi\r\n\r\nbody\r\n..dot\r\n.\r\n",
                &["message", "250 2.0.0"],
            ),
            ("QUIT\r\n", &["close 221 2.0.0"]),
        ],
    );
    assert_eq!(messages.len(), 1);
    let m = &messages[0];
    assert_eq!(content(m), b"Subject: hi\r\n\r\nbody\r\n.dot\r\n");
    assert_eq!(m.helo, "client.example");
    assert_eq!(m.auth_user, None);
    assert!(!m.tls);
    let e = &m.envelope;
    assert_eq!(e.sender.as_ref().unwrap().to_string(), "app@remote.example");
    assert_eq!(e.body, BodyType::EightBitMime);
    assert_eq!(e.ret, Some(crate::envelope::Ret::Headers));
    assert_eq!(e.envid.as_deref(), Some("x+2By"));
    let rcpts: Vec<String> = e.recipients.iter().map(|r| r.address.to_string()).collect();
    assert_eq!(rcpts, ["User@example.net", "ops@remote.example"]);
    assert!(e.recipients[0].notify.unwrap().failure);
    assert_eq!(
        e.recipients[0].orcpt.as_deref(),
        Some("rfc822;User@example.net")
    );
}

#[test]
fn postmaster_is_taken_from_anyone_and_goes_to_the_configured_mailbox() {
    let rcpt = |config: SessionConfig, peer: PeerInfo, line: &str| -> (String, Option<String>) {
        let mut s = Session::new(Arc::new(config), peer);
        s.push_input(
            format!("EHLO c\r\nMAIL FROM:<a@remote.example>\r\n{line}\r\nDATA\r\n.\r\n").as_bytes(),
        );
        let mut out = Vec::new();
        let mut messages = Vec::new();
        drain(&mut s, &mut out, &mut messages);
        let to = messages
            .first()
            .map(|m| m.envelope.recipients[0].address.to_string());
        (out[2].clone(), to)
    };
    let none = || SessionConfig {
        postmaster: None,
        ..config()
    };
    let hostname_local = || SessionConfig {
        postmaster: None,
        local_domains: vec!["mx.example.net".into()],
        ..config()
    };
    let ops = Some("ops@remote.example".to_string());
    let ours = Some("postmaster@mx.example.net".to_string());
    let cases: &[(SessionConfig, PeerInfo, &str, &str, Option<String>)] = &[
        (
            config(),
            stranger(),
            "RCPT TO:<postmaster>",
            "250 2.1.5",
            ops.clone(),
        ),
        (
            config(),
            stranger(),
            "RCPT TO:<PostMaster>",
            "250 2.1.5",
            ops.clone(),
        ),
        (
            config(),
            stranger(),
            "RCPT TO:<postmaster@mx.example.net>",
            "250 2.1.5",
            ops.clone(),
        ),
        (
            config(),
            stranger(),
            "RCPT TO:<POSTMASTER@MX.Example.NET>",
            "250 2.1.5",
            ops.clone(),
        ),
        (
            config(),
            trusted(),
            "RCPT TO:<postmaster@mx.example.net>",
            "250 2.1.5",
            ops.clone(),
        ),
        // Another host's postmaster is an ordinary remote mailbox.
        (
            config(),
            stranger(),
            "RCPT TO:<postmaster@remote.example>",
            "550 5.7.1",
            None,
        ),
        (
            config(),
            trusted(),
            "RCPT TO:<postmaster@remote.example>",
            "250 2.1.5",
            Some("postmaster@remote.example".into()),
        ),
        // A local domain's postmaster is that domain's.
        (
            config(),
            stranger(),
            "RCPT TO:<postmaster@example.net>",
            "250 2.1.5",
            Some("postmaster@example.net".into()),
        ),
        // None configured: refused, never relayed, for everyone.
        (
            none(),
            stranger(),
            "RCPT TO:<postmaster>",
            "550 5.1.1",
            None,
        ),
        (none(), trusted(), "RCPT TO:<postmaster>", "550 5.1.1", None),
        (
            none(),
            trusted(),
            "RCPT TO:<postmaster@mx.example.net>",
            "550 5.1.1",
            None,
        ),
        (
            hostname_local(),
            stranger(),
            "RCPT TO:<postmaster>",
            "250 2.1.5",
            ours.clone(),
        ),
        (
            hostname_local(),
            stranger(),
            "RCPT TO:<Postmaster@mx.example.net>",
            "250 2.1.5",
            ours,
        ),
    ];
    for (config, peer, line, want, to) in cases {
        let (got, delivered_to) = rcpt(config.clone(), peer.clone(), line);
        assert_eq!(&got, want, "{line} from {peer:?}");
        assert_eq!(&delivered_to, to, "{line} from {peer:?}");
    }
    let mut s = Session::new(Arc::new(none()), stranger());
    s.push_input(b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<postmaster>\r\n");
    s.next_action();
    s.next_action();
    let Some(Action::Reply(r)) = s.next_action() else {
        panic!("a reply to RCPT")
    };
    assert_eq!(
        r.to_wire(),
        b"550 5.1.1 No postmaster mailbox is configured on this host\r\n"
    );
}

#[test]
fn queued_reply_names_the_id() {
    let mut s = Session::new(Arc::new(config()), stranger());
    s.push_input(b"HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<u@example.net>\r\nDATA\r\n.\r\n");
    replies(&mut s, 4);
    let Some(Action::Message(m)) = s.next_action() else {
        panic!("no message");
    };
    assert_eq!(m.envelope.sender, None);
    assert!(content(&m).is_empty());
    assert_eq!(s.next_action(), None, "waits for the store");
    let r = s.message_stored(Ok(MessageId("0123abc".into())));
    assert_eq!(r.to_wire(), b"250 2.0.0 Ok: queued as 0123abc\r\n");
}

#[test]
fn a_pipelined_transaction_in_one_write() {
    run(
        config(),
        stranger(),
        &[(
            "EHLO c\r\nMAIL FROM:<a@remote.example>\r\nRCPT TO:<b@example.net>\r\nRCPT TO:<c@remote.example>\r\nDATA\r\nx\r\n.\r\nQUIT\r\n",
            &["250", "250 2.1.0", "250 2.1.5", "550 5.7.1", "354", "message", "250 2.0.0", "close 221 2.0.0"],
        )],
    );
}

#[test]
fn commands_out_of_sequence() {
    run(
        config(),
        stranger(),
        &[
            ("MAIL FROM:<a@remote.example>\r\n", &["503 5.5.1"]),
            ("RCPT TO:<b@example.net>\r\n", &["503 5.5.1"]),
            ("DATA\r\n", &["503 5.5.1"]),
            EHLO,
            ("RCPT TO:<b@example.net>\r\n", &["503 5.5.1"]),
            ("DATA\r\n", &["503 5.5.1"]),
            ("MAIL FROM:<a@remote.example>\r\n", &["250 2.1.0"]),
            ("MAIL FROM:<a@remote.example>\r\n", &["503 5.5.1"]),
            ("DATA\r\n", &["554 5.5.1"]),
            ("RCPT TO:<b@example.net>\r\n", &["250 2.1.5"]),
            // HELO and EHLO reset the transaction.
            ("HELO client.example\r\n", &["250 2.0.0"]),
            ("RCPT TO:<b@example.net>\r\n", &["503 5.5.1"]),
            ("MAIL FROM:<a@remote.example>\r\n", &["250 2.1.0"]),
            ("RSET\r\n", &["250 2.0.0"]),
            ("DATA\r\n", &["503 5.5.1"]),
            ("MAIL FROM:<a@remote.example>\r\n", &["250 2.1.0"]),
        ],
    );
}

#[test]
fn mail_from_replies() {
    let cases: &[(&str, &str)] = &[
        ("MAIL FROM:<a@remote.example>", "250 2.1.0"),
        ("mail from: <a@remote.example>", "250 2.1.0"),
        ("MAIL FROM:<>", "250 2.1.0"),
        ("MAIL FROM:<@hop.example:a@remote.example>", "250 2.1.0"),
        ("MAIL FROM:<a@remote.example> SIZE=10000", "250 2.1.0"),
        ("MAIL FROM:<a@remote.example> SIZE=10001", "552 5.3.4"),
        ("MAIL FROM:<a@remote.example> BODY=7BIT", "250 2.1.0"),
        ("MAIL FROM:<a@remote.example> BODY=BINARYMIME", "555 5.5.4"),
        ("MAIL FROM:<a@remote.example> AUTH=<>", "250 2.1.0"),
        ("MAIL FROM:<jörg@remote.example>", "553 5.6.7"),
        ("MAIL FROM:<a@bücher.example>", "553 5.6.7"),
        ("MAIL FROM:<jörg@remote.example> SMTPUTF8", "250 2.1.0"),
        ("MAIL FROM:<a@remote..example>", "501 5.1.7"),
        ("MAIL FROM:a@remote.example", "501 5.1.7"),
        ("MAIL FROM:<postmaster>", "501 5.1.7"),
        ("MAIL FROM:<a@remote.example> SIZE=big", "501 5.5.4"),
        ("MAIL FROM:<a@remote.example> ENVID=a=b", "501 5.5.4"),
        (
            "MAIL FROM:<a@remote.example> RET=FULL RET=FULL",
            "501 5.5.4",
        ),
        ("MAIL FROM:<a@remote.example> XFOO=1", "555 5.5.4"),
        ("MAIL TO:<a@remote.example>", "501 5.5.4"),
    ];
    for (line, want) in cases {
        let line = format!("{line}\r\n");
        run(config(), stranger(), &[EHLO, (&line, &[want])]);
    }
}

#[test]
fn rcpt_to_replies_for_a_stranger() {
    let cases: &[(&str, &str)] = &[
        ("RCPT TO:<u@example.net>", "250 2.1.5"),
        ("RCPT TO: <u@EXAMPLE.net>", "250 2.1.5"),
        ("RCPT TO:<\"john doe\"@example.net>", "250 2.1.5"),
        ("RCPT TO:<Postmaster>", "250 2.1.5"),
        ("RCPT TO:<postmaster@example.net>", "250 2.1.5"),
        ("RCPT TO:<u@remote.example>", "550 5.7.1"),
        ("RCPT TO:<u@[192.0.2.1]>", "550 5.7.1"),
        ("RCPT TO:<user%remote.example@example.net>", "550 5.7.1"),
        ("RCPT TO:<remote.example!user@example.net>", "550 5.7.1"),
        ("RCPT TO:<\"user@remote.example\"@example.net>", "550 5.7.1"),
        ("RCPT TO:<@example.net:user@remote.example>", "550 5.7.1"),
        ("RCPT TO:<@remote.example:user@example.net>", "250 2.1.5"),
        ("RCPT TO:<u@bücher.example>", "553 5.6.7"),
        ("RCPT TO:<>", "501 5.1.3"),
        ("RCPT TO:<u@example..net>", "501 5.1.3"),
        ("RCPT TO:u@example.net", "501 5.1.3"),
        ("RCPT TO:<u@example.net> NOTIFY=NEVER,SUCCESS", "501 5.5.4"),
        ("RCPT TO:<u@example.net> NOTIFY=SUCCESS,DELAY", "250 2.1.5"),
        ("RCPT TO:<u@example.net> FOO=BAR", "555 5.5.4"),
        ("RCPT FROM:<u@example.net>", "501 5.5.4"),
    ];
    for (line, want) in cases {
        let line = format!("{line}\r\n");
        run(
            config(),
            stranger(),
            &[
                EHLO,
                ("MAIL FROM:<a@remote.example>\r\n", &["250 2.1.0"]),
                (&line, &[want]),
            ],
        );
    }
    // With SMTPUTF8 a U-label local domain is fine.
    run(
        config(),
        stranger(),
        &[
            EHLO,
            ("MAIL FROM:<a@remote.example> SMTPUTF8\r\n", &["250 2.1.0"]),
            ("RCPT TO:<jörg@bücher.example>\r\n", &["250 2.1.5"]),
        ],
    );
}

#[test]
fn trusted_peers_and_logged_in_users_may_relay() {
    run(
        config(),
        trusted(),
        &[
            EHLO,
            ("MAIL FROM:<a@remote.example>\r\n", &["250 2.1.0"]),
            ("RCPT TO:<u@remote.example>\r\n", &["250 2.1.5"]),
            ("RCPT TO:<user%far.example@example.net>\r\n", &["250 2.1.5"]),
        ],
    );
    let messages = run(
        config(),
        stranger(),
        &[
            EHLO,
            ("STARTTLS\r\n", &["starttls 220 2.0.0"]),
            EHLO,
            (
                "AUTH PLAIN AHVzZXIAc2VjcmV0\r\n",
                &["auth user:secret", "235 2.7.0"],
            ),
            ("MAIL FROM:<a@remote.example>\r\n", &["250 2.1.0"]),
            ("RCPT TO:<u@remote.example>\r\n", &["250 2.1.5"]),
            ("DATA\r\n", &["354"]),
            ("x\r\n.\r\n", &["message", "250 2.0.0"]),
        ],
    );
    assert_eq!(messages[0].auth_user.as_deref(), Some("user"));
    assert!(messages[0].tls);
}

#[test]
fn recipient_limit() {
    run(
        config(),
        trusted(),
        &[
            EHLO,
            ("MAIL FROM:<a@remote.example>\r\n", &["250 2.1.0"]),
            ("RCPT TO:<a@example.net>\r\n", &["250 2.1.5"]),
            ("RCPT TO:<b@example.net>\r\n", &["250 2.1.5"]),
            ("RCPT TO:<Postmaster>\r\n", &["250 2.1.5"]),
            ("RCPT TO:<d@example.net>\r\n", &["452 4.5.3"]),
            ("RCPT TO:<Postmaster>\r\n", &["452 4.5.3"]),
            ("DATA\r\n", &["354"]),
        ],
    );
}

#[test]
fn simple_commands() {
    run(
        config(),
        stranger(),
        &[
            ("RSET\r\n", &["250 2.0.0"]),
            ("NOOP\r\n", &["250 2.0.0"]),
            ("NOOP hello\r\n", &["250 2.0.0"]),
            ("HELP\r\n", &["214 2.0.0"]),
            ("VRFY postmaster\r\n", &["252 2.5.0"]),
            ("VRFY\r\n", &["501 5.5.4"]),
            ("EXPN staff\r\n", &["502 5.5.1"]),
            ("XYZZY\r\n", &["500 5.5.1"]),
            ("BDAT 10 LAST\r\n", &["500 5.5.1"]),
            ("\x01\x02é\r\n", &["500 5.5.1"]),
            ("\r\n", &["500 5.5.1"]),
            ("HELO\r\n", &["501 5.5.4"]),
            ("EHLO\r\n", &["501 5.5.4"]),
            ("RSET now\r\n", &["501 5.5.4"]),
            ("DATA now\r\n", &["501 5.5.4"]),
            ("quit\r\n", &["close 221 2.0.0"]),
            ("NOOP\r\n", &[]),
        ],
    );
}

#[test]
fn bare_lf_ends_command_lines_too() {
    run(
        config(),
        stranger(),
        &[("EHLO c\nNOOP\n", &["250", "250 2.0.0"])],
    );
}

#[test]
fn starttls_replies() {
    let no_tls = SessionConfig {
        tls_available: false,
        ..config()
    };
    run(
        no_tls,
        stranger(),
        &[EHLO, ("STARTTLS\r\n", &["454 4.7.0"])],
    );
    run(
        config(),
        stranger(),
        &[
            EHLO,
            ("STARTTLS now\r\n", &["501 5.5.4"]),
            ("MAIL FROM:<a@remote.example>\r\n", &["250 2.1.0"]),
            ("STARTTLS\r\n", &["starttls 220 2.0.0"]),
            // Everything was forgotten: no EHLO, no transaction.
            ("MAIL FROM:<a@remote.example>\r\n", &["503 5.5.1"]),
            EHLO,
            ("STARTTLS\r\n", &["503 5.5.1"]),
            ("MAIL FROM:<a@remote.example>\r\n", &["250 2.1.0"]),
        ],
    );
}

#[test]
fn plaintext_pipelined_after_starttls_is_discarded() {
    let mut s = Session::new(Arc::new(config()), stranger());
    s.push_input(
        b"EHLO c\r\nSTARTTLS\r\nMAIL FROM:<evil@remote.example>\r\nRCPT TO:<u@example.net>\r\n",
    );
    assert!(matches!(s.next_action(), Some(Action::Reply(_))));
    let Some(Action::StartTls(r)) = s.next_action() else {
        panic!("no STARTTLS");
    };
    assert_eq!(r.to_wire(), b"220 2.0.0 Ready to start TLS\r\n");
    assert_eq!(s.buffered_len(), 0);
    // Bytes that still arrive before the handshake is over are dropped too.
    s.push_input(b"QUIT\r\n");
    assert_eq!(s.next_action(), None);
    s.tls_established();
    let mut out = Vec::new();
    s.push_input(b"EHLO c\r\nMAIL FROM:<a@remote.example>\r\n");
    drain(&mut s, &mut out, &mut Vec::new());
    assert_eq!(out, ["250", "250 2.1.0"]);
}

#[test]
fn require_tls_refuses_all_but_a_few_commands() {
    let config = SessionConfig {
        require_tls: true,
        ..config()
    };
    run(
        config,
        stranger(),
        &[
            ("HELP\r\n", &["530 5.7.0"]),
            EHLO,
            ("HELO c\r\n", &["250 2.0.0"]),
            ("NOOP\r\n", &["250 2.0.0"]),
            ("RSET\r\n", &["250 2.0.0"]),
            ("MAIL FROM:<a@remote.example>\r\n", &["530 5.7.0"]),
            ("MAIL FROM:bad\r\n", &["530 5.7.0"]),
            ("RCPT TO:<u@example.net>\r\n", &["530 5.7.0"]),
            ("DATA\r\n", &["530 5.7.0"]),
            ("VRFY u\r\n", &["530 5.7.0"]),
            ("EXPN u\r\n", &["530 5.7.0"]),
            ("AUTH PLAIN AHVzZXIAc2VjcmV0\r\n", &["530 5.7.0"]),
            ("XYZZY\r\n", &["500 5.5.1"]),
            ("STARTTLS\r\n", &["starttls 220 2.0.0"]),
            EHLO,
            ("MAIL FROM:<a@remote.example>\r\n", &["250 2.1.0"]),
            ("QUIT\r\n", &["close 221 2.0.0"]),
        ],
    );
}

const TLS: [Step; 3] = [EHLO, ("STARTTLS\r\n", &["starttls 220 2.0.0"]), EHLO];

fn with_tls<'a>(steps: &[Step<'a>]) -> Vec<Step<'a>> {
    TLS.iter().chain(steps).copied().collect()
}

#[test]
fn auth_replies() {
    let cases: &[&[Step]] = &[
        &[(
            "AUTH PLAIN AHVzZXIAc2VjcmV0\r\n",
            &["auth user:secret", "235 2.7.0"],
        )],
        &[(
            "auth plain AHVzZXIAd3Jvbmc=\r\n",
            &["auth user:wrong", "535 5.7.8"],
        )],
        &[
            ("AUTH PLAIN\r\n", &["334"]),
            ("AHVzZXIAc2VjcmV0\r\n", &["auth user:secret", "235 2.7.0"]),
        ],
        &[(
            "AUTH PLAIN dXNlcgB1c2VyAHNlY3JldA==\r\n",
            &["auth user:secret", "235 2.7.0"],
        )],
        &[("AUTH PLAIN b3RoZXIAdXNlcgBzZWNyZXQ=\r\n", &["535 5.7.8"])],
        &[("AUTH PLAIN bm9udWw=\r\n", &["501 5.5.2"])],
        &[("AUTH PLAIN !!!!\r\n", &["501 5.5.2"])],
        &[
            ("AUTH PLAIN\r\n", &["334"]),
            ("*\r\n", &["501 5.0.0"]),
            ("NOOP\r\n", &["250 2.0.0"]),
        ],
        &[
            ("AUTH PLAIN\r\n", &["334"]),
            ("not base64\r\n", &["501 5.5.2"]),
        ],
        &[
            ("AUTH LOGIN\r\n", &["334"]),
            ("dXNlcg==\r\n", &["334"]),
            ("c2VjcmV0\r\n", &["auth user:secret", "235 2.7.0"]),
        ],
        &[
            ("AUTH LOGIN dXNlcg==\r\n", &["334"]),
            ("c2VjcmV0\r\n", &["auth user:secret", "235 2.7.0"]),
        ],
        &[
            ("AUTH LOGIN\r\n", &["334"]),
            ("dXNlcg==\r\n", &["334"]),
            ("*\r\n", &["501 5.0.0"]),
        ],
        &[("AUTH CRAM-MD5\r\n", &["504 5.5.4"])],
        &[
            (
                "AUTH PLAIN AHVzZXIAc2VjcmV0\r\n",
                &["auth user:secret", "235 2.7.0"],
            ),
            ("AUTH PLAIN AHVzZXIAc2VjcmV0\r\n", &["503 5.5.1"]),
        ],
        &[
            ("MAIL FROM:<a@remote.example>\r\n", &["250 2.1.0"]),
            ("AUTH PLAIN AHVzZXIAc2VjcmV0\r\n", &["503 5.5.1"]),
        ],
        &[("AUTH PLAIN a b\r\n", &["501 5.5.4"])],
    ];
    for steps in cases {
        run(config(), stranger(), &with_tls(steps));
    }
}

#[test]
fn auth_is_refused_when_not_offered() {
    // No TLS and plaintext AUTH not allowed: only TLS is missing.
    run(
        config(),
        stranger(),
        &[EHLO, ("AUTH PLAIN AHVzZXIAc2VjcmV0\r\n", &["538 5.7.11"])],
    );
    // Before EHLO, after HELO, or with no users at all.
    run(config(), stranger(), &[("AUTH PLAIN\r\n", &["503 5.5.1"])]);
    run(
        config(),
        stranger(),
        &[
            ("HELO c\r\n", &["250 2.0.0"]),
            ("AUTH PLAIN\r\n", &["503 5.5.1"]),
        ],
    );
    let no_users = SessionConfig {
        auth_available: false,
        allow_plaintext_auth: true,
        ..config()
    };
    run(
        no_users,
        stranger(),
        &[EHLO, ("AUTH PLAIN\r\n", &["503 5.5.1"])],
    );
    // Plaintext AUTH when the operator allows it.
    let plain = SessionConfig {
        allow_plaintext_auth: true,
        ..config()
    };
    run(
        plain,
        stranger(),
        &[
            EHLO,
            (
                "AUTH PLAIN AHVzZXIAc2VjcmV0\r\n",
                &["auth user:secret", "235 2.7.0"],
            ),
        ],
    );
}

#[test]
fn sasl_challenges_on_the_wire() {
    let mut s = Session::new(Arc::new(config()), stranger());
    s.tls_established();
    s.push_input(b"EHLO c\r\nAUTH LOGIN\r\n");
    s.next_action();
    let Some(Action::Reply(r)) = s.next_action() else {
        panic!()
    };
    assert_eq!(r.to_wire(), b"334 VXNlcm5hbWU6\r\n");
    s.push_input(b"dXNlcg==\r\n");
    let Some(Action::Reply(r)) = s.next_action() else {
        panic!()
    };
    assert_eq!(r.to_wire(), b"334 UGFzc3dvcmQ6\r\n");
    s.push_input(b"\r\n");
    assert_eq!(
        s.next_action(),
        Some(Action::Authenticate {
            username: "user".into(),
            password: String::new()
        })
    );
    // Pipelined input waits for the verdict.
    s.push_input(b"NOOP\r\n");
    assert_eq!(s.next_action(), None);
    assert_eq!(
        s.auth_result(false).to_wire(),
        b"535 5.7.8 Authentication credentials invalid\r\n"
    );
    assert!(matches!(s.next_action(), Some(Action::Reply(r)) if r.code == 250));
    s.push_input(b"AUTH PLAIN\r\n");
    let Some(Action::Reply(r)) = s.next_action() else {
        panic!()
    };
    assert_eq!(r.to_wire(), b"334 \r\n");
}

/// A session waiting for the verdict on `AUTH PLAIN user:secret`.
fn awaiting_auth() -> Session {
    let mut s = Session::new(Arc::new(config()), stranger());
    s.tls_established();
    s.push_input(b"EHLO c\r\nAUTH PLAIN AHVzZXIAc2VjcmV0\r\n");
    assert!(matches!(s.next_action(), Some(Action::Reply(r)) if r.code == 250));
    assert!(matches!(s.next_action(), Some(Action::Authenticate { .. })));
    s
}

#[test]
fn refused_logins_have_precise_replies() {
    let table: [(AuthRefusal, &[u8], bool); 3] = [
        (
            AuthRefusal::Busy,
            b"454 4.7.0 Too many logins in progress, try again later\r\n",
            false,
        ),
        (
            AuthRefusal::UserBlocked,
            b"454 4.7.0 Too many failed logins for this user, try again later\r\n",
            false,
        ),
        (
            AuthRefusal::AddressBlocked,
            b"421 4.7.0 Too many failed logins from your address, try again later\r\n",
            true,
        ),
    ];
    for (why, wire, closes) in table {
        let mut s = awaiting_auth();
        // Pipelined input waits for the verdict, and a blocked address
        // ends the session with it unread.
        s.push_input(b"NOOP\r\n");
        assert_eq!(s.auth_refused(why).to_wire(), wire, "{why:?}");
        assert_eq!(s.is_closed(), closes, "{why:?}");
        if closes {
            assert_eq!(s.next_action(), None);
        } else {
            assert!(matches!(s.next_action(), Some(Action::Reply(r)) if r.code == 250));
        }
    }
    let mut s = Session::new(Arc::new(config()), stranger());
    assert_eq!(s.auth_refused(AuthRefusal::AddressBlocked).code, 503);
    assert!(!s.is_closed());
}

#[test]
fn answers_nobody_asked_for_change_nothing() {
    let mut s = Session::new(Arc::new(config()), stranger());
    assert_eq!(s.auth_result(true).code, 503);
    assert_eq!(s.message_stored(Ok(MessageId::new(1, 1))).code, 503);
    s.push_input(b"EHLO c\r\nMAIL FROM:<>\r\n");
    let mut out = Vec::new();
    drain(&mut s, &mut out, &mut Vec::new());
    assert_eq!(out, ["250", "250 2.1.0"]);
}

fn transaction<'a>(data: &'a str, want: &'a [&'a str]) -> Vec<Step<'a>> {
    vec![
        EHLO,
        ("MAIL FROM:<a@remote.example>\r\n", &["250 2.1.0"]),
        ("RCPT TO:<u@example.net>\r\n", &["250 2.1.5"]),
        ("DATA\r\n", &["354"]),
        (data, want),
        // The transaction is over either way.
        ("RCPT TO:<u@example.net>\r\n", &["503 5.5.1"]),
        ("MAIL FROM:<a@remote.example>\r\n", &["250 2.1.0"]),
    ]
}

#[test]
fn end_of_data_replies() {
    let long_line = format!("{}\r\n.\r\n", "x".repeat(1000));
    let big = format!(
        "{}.\r\n",
        "0123456789abcdefghijklmnopqrstuvwxyz\r\n".repeat(300)
    );
    let hops = |n: usize| format!("{}\r\nbody\r\n.\r\n", "Received: from a by b\r\n".repeat(n));
    let (five, six) = (hops(5), hops(6));
    let cases: &[(&str, &[&str])] = &[
        (".\r\n", &["message", "250 2.0.0"]),
        ("a\nb\r\n.\r\n", &["554 5.6.0"]),
        ("a\r\n.\nMAIL FROM:<x@y.example>\r\n.\r\n", &["554 5.6.0"]),
        ("a\r\n.\r.\r\n.\r\n", &["554 5.6.0"]),
        ("a\rb\r\n.\r\n", &["554 5.6.0"]),
        (&long_line, &["500 5.5.2"]),
        (&big, &["552 5.3.4"]),
        (&five, &["message", "250 2.0.0"]),
        (&six, &["554 5.4.6"]),
        ("a\0b\r\n.\r\n", &["554 5.6.0"]),
        ("\0.\0\r\n.\r\n", &["554 5.6.0"]),
        (
            "a\r\n\0.\0\r\nMAIL FROM:<x@y.example>\r\n.\r\n",
            &["554 5.6.0"],
        ),
        ("é 8-bit\r\n.\r\n", &["message", "250 2.0.0"]),
    ];
    for (data, want) in cases {
        run(config(), stranger(), &transaction(data, want));
    }
}

#[test]
fn nul_in_data_is_refused_at_the_end_with_its_own_text() {
    let mut s = Session::new(Arc::new(config()), stranger());
    s.push_input(b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<u@example.net>\r\nDATA\r\n");
    replies(&mut s, 4);
    // `\0.\0` at the start of a line neither ends the data nor hides a
    // command: the whole message, up to the real end, is refused.
    s.push_input(b"Subject: x\r\n\r\n\0.\0\r\nQUIT\r\n");
    assert_eq!(s.next_action(), None);
    s.push_input(b".\r\nNOOP\r\n");
    let Some(Action::Reply(r)) = s.next_action() else {
        panic!("a reply to the end of data")
    };
    assert_eq!(
        r.to_wire(),
        b"554 5.6.0 Message contains NUL characters\r\n"
    );
    assert!(matches!(s.next_action(), Some(Action::Reply(r)) if code(&r) == "250 2.0.0"));
    assert!(!s.is_closed());
}

#[test]
fn smuggled_commands_are_never_executed() {
    // `<LF>.<LF>` does not end the data, so the MAIL after it is message
    // text; the real end comes later and the whole message is refused.
    let steps = [
        EHLO,
        ("MAIL FROM:<a@remote.example>\r\n", &["250 2.1.0"][..]),
        ("RCPT TO:<u@example.net>\r\n", &["250 2.1.5"]),
        ("DATA\r\n", &["354"]),
        (
            "x\n.\nMAIL FROM:<admin@example.net>\nRCPT TO:<victim@remote.example>\nDATA\nforged\n.\n",
            &[],
        ),
        ("\r\n.\r\n", &["554 5.6.0"]),
    ];
    let messages = run(config(), trusted(), &steps);
    assert!(messages.is_empty());
}

#[test]
fn store_failure_is_a_temporary_error() {
    let mut s = Session::new(Arc::new(config()), stranger());
    s.push_input(b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<u@example.net>\r\nDATA\r\nx\r\n.\r\nRCPT TO:<u@example.net>\r\n");
    replies(&mut s, 4);
    assert!(matches!(s.next_action(), Some(Action::Message(_))));
    let r = s.message_stored(Err(StoreFailure::Unavailable));
    assert_eq!(code(&r), "451 4.3.0");
    assert!(matches!(s.next_action(), Some(Action::Reply(r)) if code(&r) == "503 5.5.1"));
}

#[test]
fn a_spent_quota_is_a_temporary_error_that_says_when() {
    let mut s = Session::new(Arc::new(config()), trusted());
    s.push_input(b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<u@example.net>\r\nDATA\r\nx\r\n.\r\n");
    replies(&mut s, 4);
    assert!(matches!(s.next_action(), Some(Action::Message(_))));
    let r = s.message_stored(Err(StoreFailure::OverQuota {
        retry_after_secs: 12,
    }));
    assert_eq!(code(&r), "450 4.7.1");
    assert!(r.to_string().contains("try again in 12 s"), "{r}");
    // The transaction is over; the session goes on.
    s.push_input(b"MAIL FROM:<>\r\n");
    assert!(matches!(s.next_action(), Some(Action::Reply(r)) if code(&r) == "250 2.1.0"));
}

#[test]
fn session_size_limit() {
    let config = SessionConfig {
        max_message_size: 100,
        max_session_size: 250,
        ..config()
    };
    let body = format!("{}\r\n.\r\n", "x".repeat(88));
    let one = |want: &'static [&'static str]| -> [Step; 4] {
        [
            ("MAIL FROM:<a@remote.example>\r\n", &["250 2.1.0"]),
            ("RCPT TO:<u@example.net>\r\n", &["250 2.1.5"]),
            ("DATA\r\n", &["354"]),
            ("", want),
        ]
    };
    let mut steps = vec![EHLO];
    for want in [
        &["message", "250 2.0.0"][..],
        &["message", "250 2.0.0"],
        &["552 5.3.4"],
    ] {
        let mut s = one(want).to_vec();
        s[3].0 = &body;
        steps.extend(s);
    }
    steps.push(("MAIL FROM:<a@remote.example>\r\n", &["552 5.3.4"]));
    run(config, stranger(), &steps);
}

#[test]
fn long_command_lines_are_cut_and_refused() {
    let long = format!("NOOP {}\r\nNOOP\r\n", "x".repeat(2000));
    let limit = format!("NOOP {}\r\n", "x".repeat(MAX_COMMAND_LINE - 7));
    let over = format!("NOOP {}\r\n", "x".repeat(MAX_COMMAND_LINE - 6));
    run(
        config(),
        stranger(),
        &[
            (&long, &["500 5.5.2", "250 2.0.0"]),
            (&limit, &["250 2.0.0"]),
            (&over, &["500 5.5.2"]),
        ],
    );
    // A line with no end never grows the buffer past the limit.
    let mut s = Session::new(Arc::new(config()), stranger());
    s.push_input(&vec![b'A'; 1 << 20]);
    assert_eq!(s.next_action(), None);
    assert!(s.buffered_len() <= MAX_COMMAND_LINE);
    s.push_input(b"\r\nNOOP\r\n");
    assert!(matches!(s.next_action(), Some(Action::Reply(r)) if code(&r) == "500 5.5.2"));
    assert!(matches!(s.next_action(), Some(Action::Reply(r)) if code(&r) == "250 2.0.0"));
}

#[test]
fn a_long_auth_line_ends_the_exchange() {
    let long = format!("{}\r\n", "A".repeat(1500));
    run(
        config(),
        stranger(),
        &with_tls(&[
            ("AUTH PLAIN\r\n", &["334"]),
            (&long, &["500 5.5.2"]),
            ("NOOP\r\n", &["250 2.0.0"]),
        ]),
    );
}

#[test]
fn too_many_errors_close_the_session() {
    let input = "XYZZY\r\n".repeat(25);
    let mut want = vec!["500 5.5.1"; 20];
    want.push("close 421 4.7.0");
    run(config(), stranger(), &[(&input, &want)]);
    // Failed logins count too.
    let bad = "AUTH PLAIN AHVzZXIAd3Jvbmc=\r\n".repeat(20);
    let mut want = Vec::new();
    for _ in 0..20 {
        want.extend(["auth user:wrong", "535 5.7.8"]);
    }
    want.push("close 421 4.7.0");
    run(config(), stranger(), &with_tls(&[(&bad, &want)]));
}

#[test]
fn commands_that_move_no_mail_count_as_errors_past_the_junk_limit() {
    // The limit is 10 here: ten of them are free, twenty more are the
    // twenty errors, and the session closes.
    let junk = ["NOOP\r\n", "RSET\r\n", "VRFY u\r\n", "HELP\r\n"]
        .repeat(8)
        .concat();
    let mut want: Vec<&str> = ["250 2.0.0", "250 2.0.0", "252 2.5.0", "214 2.0.0"]
        .repeat(8)
        .into_iter()
        .take(30)
        .collect();
    want.push("close 421 4.7.0");
    run(config(), stranger(), &[EHLO, (&junk, &want)]);
    // A stored message starts the count again.
    let nine = "NOOP\r\n".repeat(9);
    let message = "MAIL FROM:<a@b.example>\r\nRCPT TO:<u@example.net>\r\nDATA\r\nhi\r\n.\r\n";
    let mut steps: Vec<Step> = vec![EHLO];
    for _ in 0..5 {
        steps.push((&nine, &["250 2.0.0"; 9]));
        steps.push((
            message,
            &["250 2.1.0", "250 2.1.5", "354", "message", "250 2.0.0"],
        ));
    }
    steps.push(("XYZZY\r\n", &["500 5.5.1"]));
    run(config(), stranger(), &steps);
}

#[test]
fn a_large_message_in_one_push_is_not_buffered() {
    let mut s = Session::new(Arc::new(config()), stranger());
    s.push_input(b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<u@example.net>\r\nDATA\r\n");
    replies(&mut s, 4);
    let mut body = b"x\r\n".repeat(1 << 18);
    body.extend_from_slice(b".\r\nNOOP\r\n");
    s.push_input(&body);
    assert!(s.buffered_len() <= 6);
    assert!(matches!(s.next_action(), Some(Action::Reply(r)) if code(&r) == "552 5.3.4"));
    assert!(matches!(s.next_action(), Some(Action::Reply(r)) if code(&r) == "250 2.0.0"));
}

#[test]
fn idle_only_between_transactions_and_shutdown_closes() {
    let mut s = Session::new(Arc::new(config()), trusted());
    let (mut out, mut messages) = (Vec::new(), Vec::new());
    assert!(s.is_idle());
    s.push_input(b"EHLO client.example\r\nMAIL FROM:<a@example.org>\r\n");
    drain(&mut s, &mut out, &mut messages);
    assert!(!s.is_idle(), "a transaction is open");
    s.push_input(b"RCPT TO:<b@example.net>\r\nDATA\r\nSubject: x\r\n");
    drain(&mut s, &mut out, &mut messages);
    assert!(!s.is_idle(), "inside DATA");
    s.push_input(b"\r\nbody\r\n.\r\n");
    drain(&mut s, &mut out, &mut messages);
    assert_eq!(messages.len(), 1);
    assert!(s.is_idle());
    assert_eq!(code(&s.shutdown_reply()), "421 4.3.2");
    assert!(s.is_closed());
}

#[test]
fn data_asks_for_memory_first_and_a_refusal_keeps_the_transaction() {
    let mut s = Session::new(Arc::new(config()), stranger());
    s.push_input(
        b"EHLO c\r\nMAIL FROM:<a@remote.example> SIZE=5000\r\nRCPT TO:<u@example.net>\r\nDATA\r\n",
    );
    replies(&mut s, 3);
    assert_eq!(
        s.next_action(),
        Some(Action::ReserveBody {
            declared: Some(5000)
        })
    );
    assert_eq!(s.next_action(), None, "waits for the answer");
    assert_eq!(s.data_size(), None);
    assert_eq!(
        s.body_refused().to_wire(),
        b"452 4.3.1 Insufficient system storage\r\n"
    );
    assert_eq!(code(&reserved(&mut s)), "503 5.5.1", "nothing waits");
    assert_eq!(code(&s.body_refused()), "503 5.5.1", "nothing waits");
    // The transaction stays: DATA again, and this time there is memory.
    s.push_input(b"DATA\r\n");
    assert_eq!(
        s.next_action(),
        Some(Action::ReserveBody {
            declared: Some(5000)
        })
    );
    assert_eq!(reserved(&mut s).code, 354);
    assert_eq!(s.data_size(), Some(0));
    s.push_input(b"Subject: x\r\n\r\nbody\r\n");
    assert_eq!(s.data_size(), Some(20));
    s.push_input(b".\r\nMAIL FROM:<>\r\n");
    assert!(matches!(s.next_action(), Some(Action::Message(m)) if content(&m).len() == 20));
    s.message_stored(Ok(MessageId::new(1, 2)));
    assert_eq!(s.data_size(), None);
    // A MAIL without SIZE declares nothing.
    s.push_input(b"RCPT TO:<u@example.net>\r\nDATA\r\n");
    replies(&mut s, 2);
    assert_eq!(
        s.next_action(),
        Some(Action::ReserveBody { declared: None })
    );
}

#[test]
fn a_body_discarded_half_way_is_read_to_its_end_and_refused_with_452() {
    let mut s = Session::new(Arc::new(config()), trusted());
    s.push_input(b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<u@example.net>\r\nDATA\r\n");
    replies(&mut s, 4);
    s.push_input(b"Subject: x\r\n\r\nfirst part\r\n");
    assert_eq!(s.next_action(), None);
    s.discard_body();
    // Looks like commands, but it is message text.
    s.push_input(b"RSET\r\nMAIL FROM:<x@y.example>\r\n");
    assert_eq!(s.next_action(), None);
    s.push_input(b".\r\nNOOP\r\n");
    let Some(Action::Reply(r)) = s.next_action() else {
        panic!("a reply to the end of data")
    };
    assert_eq!(r.to_wire(), b"452 4.3.1 Insufficient system storage\r\n");
    assert!(matches!(s.next_action(), Some(Action::Reply(r)) if code(&r) == "250 2.0.0"));
    assert!(s.is_idle());
}

#[test]
fn receiving_data_lasts_from_354_to_the_final_dot() {
    let mut s = Session::new(Arc::new(config()), trusted());
    let (mut out, mut messages) = (Vec::new(), Vec::new());
    let steps: &[(&str, bool)] = &[
        ("EHLO c.example\r\nMAIL FROM:<a@b.example>\r\n", false),
        ("RCPT TO:<x@example.net>\r\n", false),
        ("DATA\r\n", true),
        ("Subject: x\r\n\r\nbody\r\n", true),
        (".", true),
        ("\r\n", false),
    ];
    for (input, receiving) in steps {
        s.push_input(input.as_bytes());
        drain(&mut s, &mut out, &mut messages);
        assert_eq!(
            s.is_receiving_data(),
            *receiving,
            "after {input:?}: {out:?}"
        );
    }
    assert_eq!(messages.len(), 1);
}

#[test]
fn each_final_reply_names_its_command_once_and_never_a_password() {
    let mut s = Session::new(Arc::new(config()), trusted());
    s.tls_established();
    let mut log = Vec::new();
    let mut step = |s: &mut Session, input: &[u8]| {
        s.push_input(input);
        while let Some(action) = s.next_action() {
            let code = match action {
                Action::Reply(r) | Action::Close(r) => r.code,
                Action::Authenticate { .. } => s.auth_result(false).code,
                Action::ReserveBody { .. } => reserved(s).code,
                Action::Message(_) => s.message_stored(Ok(MessageId::new(1, 2))).code,
                Action::StartTls(r) => r.code,
            };
            if !matches!(code, 334 | 354) {
                log.push((s.take_logged(), code));
            }
        }
    };
    step(&mut s, b"ehlo client.example\r\n");
    step(&mut s, b"AUTH PLAIN AHVzZXIAc2VjcmV0\r\n");
    step(&mut s, b"AUTH LOGIN\r\n");
    step(&mut s, b"dXNlcg==\r\n");
    step(&mut s, b"c2VjcmV0\r\n");
    step(
        &mut s,
        b"MAIL FROM:<a@b.example> SIZE=10\r\nRCPT TO:<u@example.net>\r\nDATA\r\n",
    );
    step(&mut s, b"hello\r\n.\r\n");
    let seen: Vec<(String, String, u64, u16)> = log
        .into_iter()
        .map(|(l, code)| {
            let l = l.expect("a command for every final reply");
            (l.verb, l.args, l.bytes, code)
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("EHLO".into(), "client.example".into(), 21, 250),
            ("AUTH".into(), "PLAIN".into(), 29, 535),
            ("AUTH".into(), "LOGIN".into(), 12, 535),
            ("MAIL".into(), "FROM:<a@b.example> SIZE=10".into(), 33, 250),
            ("RCPT".into(), "TO:<u@example.net>".into(), 25, 250),
            ("DATA".into(), "".into(), 7, 250),
        ]
    );
    assert_eq!(s.take_logged(), None, "taken once");
}

#[test]
fn a_user_limited_to_some_senders_may_use_only_those() {
    let mut s = awaiting_auth();
    assert_eq!(s.auth_result(true).code, 235);
    s.restrict_senders(vec![
        SenderRule::parse("app@shop.example").unwrap(),
        SenderRule::parse("news.example").unwrap(),
    ]);
    // (MAIL FROM, reply): allowed ones open a transaction, RSET ends it.
    let table: &[(&str, &[u8])] = &[
        ("<App@shop.example>", b"250 2.1.0 Ok\r\n"),
        ("<anyone@news.example>", b"250 2.1.0 Ok\r\n"),
        (
            "<ceo@shop.example>",
            b"550 5.7.1 Sender <ceo@shop.example> not allowed for this user\r\n",
        ),
        (
            "<x@sub.news.example>",
            b"550 5.7.1 Sender <x@sub.news.example> not allowed for this user\r\n",
        ),
        ("<>", b"550 5.7.1 Sender <> not allowed for this user\r\n"),
    ];
    for (sender, expected) in table {
        s.push_input(format!("MAIL FROM:{sender}\r\nRSET\r\n").as_bytes());
        let Some(Action::Reply(r)) = s.next_action() else {
            panic!("{sender}: no reply")
        };
        assert_eq!(
            String::from_utf8_lossy(&r.to_wire()),
            String::from_utf8_lossy(expected),
            "{sender}"
        );
        assert!(matches!(s.next_action(), Some(Action::Reply(r)) if r.code == 250));
    }
    // Without a login, restrictions are not taken.
    let mut anonymous = Session::new(Arc::new(config()), trusted());
    anonymous.restrict_senders(vec![SenderRule::parse("shop.example").unwrap()]);
    anonymous.push_input(b"EHLO c\r\nMAIL FROM:<a@elsewhere.example>\r\n");
    assert!(matches!(anonymous.next_action(), Some(Action::Reply(r)) if r.code == 250));
    assert!(matches!(anonymous.next_action(), Some(Action::Reply(r)) if r.code == 250));
}
