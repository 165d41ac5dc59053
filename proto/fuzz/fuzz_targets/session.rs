//! Feeds arbitrary bytes to a session, cut where the input says, and
//! answers its questions from the input too. Run: `cargo fuzz run session`.

#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use smarthost_proto::envelope::MessageId;
use smarthost_proto::session::{
    Action, PeerInfo, Session, SessionConfig, StoreFailure, MAX_COMMAND_LINE,
};

fuzz_target!(|input: &[u8]| {
    // The first byte picks the configuration and the shell's answers.
    let Some((&knobs, mut rest)) = input.split_first() else {
        return;
    };
    let config = SessionConfig {
        hostname: "mx.example.net".into(),
        max_message_size: 4_096,
        max_session_size: 16_384,
        max_recipients: 8,
        max_hop_count: 5,
        junk_command_limit: u32::from(knobs >> 4),
        require_tls: knobs & 1 != 0,
        tls_available: knobs & 2 != 0,
        auth_available: knobs & 4 != 0,
        allow_plaintext_auth: knobs & 8 != 0,
        local_domains: vec!["example.net".into()],
        postmaster: None,
    };
    let peer = PeerInfo {
        ip: "192.0.2.1".parse().unwrap(),
        relay_allowed: knobs & 16 != 0,
    };
    let mut session = Session::new(Arc::new(config), peer);
    let mut answer = knobs;
    while let Some((&len, tail)) = rest.split_first() {
        let n = (len as usize % 64 + 1).min(tail.len());
        let (piece, after) = tail.split_at(n);
        rest = after;
        session.push_input(piece);
        while let Some(action) = session.next_action() {
            answer = answer.rotate_left(1);
            match action {
                Action::Reply(_) | Action::Close(_) => {}
                Action::StartTls(_) => session.tls_established(),
                Action::Authenticate { .. } => {
                    session.auth_result(answer & 1 != 0);
                }
                Action::ReserveBody { .. } => {
                    if answer & 1 != 0 {
                        session.body_reserved(&MessageId::new(1, 2), 0);
                    } else {
                        session.body_refused();
                    }
                }
                Action::Message(m) => {
                    // The message, after our trace header (a command
                    // line's HELO name and recipient at most).
                    assert!(m.data.len() <= 4_096 + 2_048);
                    let result = if answer & 1 != 0 {
                        Ok(MessageId::new(1, 2))
                    } else {
                        Err(StoreFailure::Unavailable)
                    };
                    session.message_stored(result);
                }
            }
        }
        assert!(session.buffered_len() <= MAX_COMMAND_LINE);
        if session.is_closed() {
            break;
        }
    }
});
