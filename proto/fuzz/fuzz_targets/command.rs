//! Parses arbitrary bytes as one command line and checks what a parsed
//! command claims about itself. Run: `cargo fuzz run command`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use smarthost_proto::address::{parse_path, Path, PathMailbox};
use smarthost_proto::command::{parse, Command};

/// A mailbox written back out as a path reads back as the same mailbox.
fn round_trip(m: &PathMailbox) {
    let text = format!("<{}>", m.mailbox);
    match parse_path(&text) {
        Ok((Path::Mailbox(again), "")) => assert_eq!(again.mailbox, m.mailbox, "{text}"),
        other => panic!("{text} read back as {other:?}"),
    }
}

fuzz_target!(|line: &[u8]| {
    let Ok(command) = parse(line) else {
        return;
    };
    // A command that parses is the one its first word names.
    let trimmed = line.strip_suffix(b"\n").unwrap_or(line);
    let trimmed = trimmed.strip_suffix(b"\r").unwrap_or(trimmed);
    let word = trimmed.split(|b| *b == b' ').next().unwrap_or_default();
    let word = word.trim_ascii_end();
    let verb = format!("{:?}", command.verb()).to_ascii_uppercase();
    assert!(word.eq_ignore_ascii_case(verb.as_bytes()), "{command:?}");
    // The line ending makes no difference.
    let mut crlf = trimmed.to_vec();
    crlf.extend_from_slice(b"\r\n");
    assert_eq!(parse(&crlf).as_ref(), Ok(&command));
    match &command {
        Command::Mail {
            sender: Some(m), ..
        }
        | Command::Rcpt {
            recipient: Path::Mailbox(m),
            ..
        } => round_trip(m),
        _ => {}
    }
});
