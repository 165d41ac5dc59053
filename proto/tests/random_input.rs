//! Random input, randomly cut, must never panic the parsers or the session,
//! never grow their buffers past the limits, and (without STARTTLS, whose
//! discarding depends on where a read ends) never change the replies.

use std::sync::Arc;

use proptest::prelude::*;
use smarthost_proto::address;
use smarthost_proto::command;
use smarthost_proto::data::DataReader;
use smarthost_proto::envelope::MessageId;
use smarthost_proto::session::{
    Action, PeerInfo, Session, SessionConfig, StoreFailure, MAX_COMMAND_LINE,
};

const MAX_MESSAGE: u64 = 2_000;

fn config(tls_available: bool) -> SessionConfig {
    SessionConfig {
        hostname: "mx.example.net".into(),
        max_message_size: MAX_MESSAGE,
        max_session_size: 6_000,
        max_recipients: 4,
        max_hop_count: 3,
        junk_command_limit: 100,
        require_tls: false,
        tls_available,
        auth_available: true,
        allow_plaintext_auth: true,
        local_domains: vec!["example.net".into()],
        postmaster: None,
    }
}

/// Pieces of plausible SMTP mixed with raw bytes, so that random runs get
/// past the greeting and into AUTH and DATA.
fn input() -> impl Strategy<Value = Vec<u8>> {
    let words = prop::sample::select(vec![
        &b"EHLO c\r\n"[..],
        b"HELO c\r\n",
        b"MAIL FROM:<a@remote.example>\r\n",
        b"MAIL FROM:<> SIZE=100 BODY=8BITMIME\r\n",
        b"RCPT TO:<u@example.net>\r\n",
        b"RCPT TO:<Postmaster>\r\n",
        b"DATA\r\n",
        b"Received: x\r\n",
        b".\r\n",
        b"\r\n.\r\n",
        b"..\r\n",
        b"\n.\n",
        b"\r",
        b"\n",
        b"RSET\r\n",
        b"STARTTLS\r\n",
        b"AUTH PLAIN\r\n",
        b"AUTH LOGIN\r\n",
        b"AHVzZXIAc2VjcmV0\r\n",
        b"dXNlcg==\r\n",
        b"*\r\n",
        b"QUIT\r\n",
    ]);
    let piece = prop_oneof![
        words.prop_map(|w| w.to_vec()),
        prop::collection::vec(any::<u8>(), 0..40),
        (0usize..1500).prop_map(|n| vec![b'x'; n]),
    ];
    prop::collection::vec(piece, 0..40).prop_map(|v| v.concat())
}

/// Cuts `input` at the given points.
fn fragments(input: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    points.push(0);
    points.push(input.len());
    points.sort_unstable();
    points
        .windows(2)
        .map(|w| input[w[0]..w[1]].to_vec())
        .collect()
}

/// Drives a session like a shell; returns a transcript of what it did.
fn drive(config: SessionConfig, pieces: &[Vec<u8>], answers: &[bool]) -> Vec<String> {
    let mut s = Session::new(
        Arc::new(config),
        PeerInfo {
            ip: "192.0.2.1".parse().unwrap(),
            relay_allowed: false,
        },
    );
    let mut answers = answers.iter().copied().cycle();
    let mut log = Vec::new();
    for piece in pieces {
        s.push_input(piece);
        while let Some(action) = s.next_action() {
            let entry = match action {
                Action::Reply(r) => r.to_string(),
                Action::Close(r) => format!("close {r}"),
                Action::StartTls(r) => {
                    s.tls_established();
                    format!("tls {r}")
                }
                Action::Authenticate { username, password } => {
                    let r = s.auth_result(answers.next().unwrap_or(true));
                    format!("auth {username} {password} {r}")
                }
                Action::ReserveBody { declared } => {
                    let r = if answers.next().unwrap_or(true) {
                        s.body_reserved(&MessageId::new(1, 2), 0)
                    } else {
                        s.body_refused()
                    };
                    format!("reserve {declared:?} {r}")
                }
                Action::Message(m) => {
                    // The message, after our trace header (a command
                    // line's HELO name and recipient at most).
                    assert!(m.data.len() as u64 <= MAX_MESSAGE + 2_048);
                    let result = if answers.next().unwrap_or(true) {
                        Ok(MessageId::new(1, 2))
                    } else {
                        Err(StoreFailure::Unavailable)
                    };
                    format!("message {} {}", m.data.len(), s.message_stored(result))
                }
            };
            log.push(entry);
        }
        assert!(s.buffered_len() <= MAX_COMMAND_LINE, "{}", s.buffered_len());
    }
    log
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn session_survives_anything(
        input in input(),
        cuts in prop::collection::vec(any::<usize>(), 0..30),
        answers in prop::collection::vec(any::<bool>(), 1..8),
        tls in any::<bool>(),
    ) {
        drive(config(tls), &fragments(&input, &cuts), &answers);
    }

    #[test]
    fn session_replies_do_not_depend_on_fragmentation(
        input in input(),
        cuts in prop::collection::vec(any::<usize>(), 0..30),
        answers in prop::collection::vec(any::<bool>(), 1..8),
    ) {
        let whole = drive(config(false), std::slice::from_ref(&input), &answers);
        let bytes: Vec<Vec<u8>> = input.iter().map(|b| vec![*b]).collect();
        prop_assert_eq!(&whole, &drive(config(false), &bytes, &answers));
        prop_assert_eq!(&whole, &drive(config(false), &fragments(&input, &cuts), &answers));
    }

    #[test]
    fn data_reader_is_fragmentation_blind(
        input in input(),
        cuts in prop::collection::vec(any::<usize>(), 0..30),
    ) {
        let read = |pieces: Vec<Vec<u8>>| {
            let mut r = DataReader::new(MAX_MESSAGE);
            let mut used = 0;
            for piece in pieces {
                let p = r.feed(&piece);
                assert!(p.consumed <= piece.len());
                used += p.consumed;
                if p.done {
                    break;
                }
            }
            let done = r.is_done();
            let size = r.size();
            (used, done, size, done.then(|| r.finish()))
        };
        let whole = read(vec![input.clone()]);
        if let (_, _, _, Some(Ok(data))) = &whole {
            prop_assert!(data.body.len() as u64 <= MAX_MESSAGE);
        }
        prop_assert_eq!(&whole, &read(fragments(&input, &cuts)));
    }

    #[test]
    fn command_parser_never_panics(line in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = command::parse(&line);
    }

    #[test]
    fn command_parser_on_near_misses(
        verb in prop::sample::select(vec!["MAIL FROM:", "RCPT TO:", "AUTH ", "EHLO ", "VRFY "]),
        rest in "[<>@\"\\\\.:,; =a-zA-Z0-9\u{e9}\\[\\]+-]{0,80}",
    ) {
        let _ = command::parse(format!("{verb}{rest}\r\n").as_bytes());
    }

    #[test]
    fn address_parser_never_panics(text in "\\PC{0,100}", shaped in "<[@\"\\\\.:,a-z0-9\u{fc}\\[\\]IPv6]{0,60}>") {
        let _ = address::parse_path(&text);
        if let Ok((address::Path::Mailbox(m), _)) = address::parse_path(&shaped) {
            // What Display writes parses back to the same mailbox. (Only
            // the mailbox: a U-label domain is written as its A-label, so
            // the reparsed path may no longer need SMTPUTF8.)
            let again = address::parse_forward_path(&format!("<{}>", m.mailbox)).unwrap();
            let address::Path::Mailbox(again) = again else {
                panic!("a mailbox came back as {again:?}");
            };
            prop_assert_eq!(&again.mailbox, &m.mailbox);
            prop_assert!(!again.source_route);
        }
    }
}
