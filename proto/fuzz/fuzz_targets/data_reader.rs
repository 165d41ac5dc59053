//! Feeds the DATA reader the same bytes whole and in two pieces, cut where
//! the first input byte says, and checks that both ways agree. Run:
//! `cargo fuzz run data_reader`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use smarthost_proto::data::{DataReader, MAX_DATA_LINE};

/// Small enough that the size limit is hit often.
const MAX_SIZE: u64 = 256;

/// Feeds `pieces` in turn until the end of data; returns the reader and
/// how many bytes it took in all.
fn read(pieces: &[&[u8]]) -> (DataReader, usize) {
    let mut reader = DataReader::new(MAX_SIZE);
    let mut used = 0;
    for piece in pieces {
        let p = reader.feed(piece);
        assert!(p.consumed <= piece.len());
        assert_eq!(p.done, reader.is_done());
        used += p.consumed;
        if p.done {
            break;
        }
        assert_eq!(p.consumed, piece.len(), "stopped before the end of data");
    }
    (reader, used)
}

fuzz_target!(|input: &[u8]| {
    let Some((&cut, data)) = input.split_first() else {
        return;
    };
    let cut = usize::from(cut) % (data.len() + 1);
    let (head, tail) = data.split_at(cut);

    let (whole, whole_used) = read(&[data]);
    let (split, split_used) = read(&[head, tail]);
    assert_eq!(whole_used, split_used);
    assert_eq!(whole.is_done(), split.is_done());
    assert_eq!(whole.size(), split.size());

    let done = whole.is_done();
    let consumed = &data[..whole_used];
    if done {
        // Only `<CRLF>.<CRLF>` (or `.<CRLF>` at the very start) ends it.
        assert!(consumed == b".\r\n" || consumed.ends_with(b"\r\n.\r\n"));
    } else {
        assert_eq!(whole_used, data.len());
    }
    // The size counts unstuffed octets, so never more than were read.
    assert!(whole.size() <= whole_used as u64);

    let whole = whole.finish();
    assert_eq!(whole, split.finish());
    if let (true, Ok(message)) = (done, whole) {
        let body = message.body;
        assert!(body.len() as u64 <= MAX_SIZE);
        assert!(body.is_empty() || body.ends_with(b"\r\n"));
        for line in body.split_inclusive(|b| *b == b'\n') {
            assert!(line.len() <= MAX_DATA_LINE);
            let text = &line[..line.len() - 2];
            assert!(line.ends_with(b"\r\n"));
            assert!(!text.contains(&b'\r') && !text.contains(&b'\n'));
        }
    }
});
