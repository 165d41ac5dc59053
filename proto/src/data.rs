//! The DATA phase: an incremental reader for the dot-terminated message.
//!
//! Only `<CRLF>.<CRLF>` ends the data. Any bare CR or bare LF marks the
//! message bad but never ends it: other servers disagree on where such
//! variants end a message, and that disagreement is what SMTP smuggling
//! exploits. The reader goes on to the real end and the message is refused
//! there, so both sides stay in step.
//!
//! A NUL octet anywhere (RFC 5321 allows none outside BINARYMIME, which is
//! not offered) is handled the same way: read to the end, then refused.
//! Many programs that handle mail after us cut strings at a NUL, so a
//! message with one could read differently to each of them.

/// Longest line allowed in the message, CRLF included (RFC 5321 4.5.3.1.6).
pub const MAX_DATA_LINE: usize = 1000;

/// Why a message that reached its end is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DataError {
    #[error("bare CR or LF in message data")]
    BareLineEnding,
    #[error("NUL octet in message data")]
    Nul,
    #[error("line longer than {MAX_DATA_LINE} octets")]
    LineTooLong,
    #[error("message larger than the size limit")]
    TooBig,
    /// The shell had no memory left for it ([`DataReader::discard`]).
    #[error("no memory left for the message")]
    OverBudget,
}

/// How far one call to [`DataReader::feed`] got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Bytes taken from the input; the rest belongs to the commands after.
    pub consumed: usize,
    /// `<CRLF>.<CRLF>` was seen.
    pub done: bool,
}

/// A message read to its end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceivedData {
    /// Unstuffed, CRLF line endings, without the final `.CRLF`.
    pub body: Vec<u8>,
    /// `Received:` fields in the header section, for loop detection.
    pub received_headers: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// At the start of a line (right after CRLF, or at the very start).
    LineStart,
    InLine,
    /// A CR that may start a CRLF.
    Cr,
    /// A line that began with a dot.
    Dot,
    /// `.CR` at the start of a line: one LF away from the end.
    DotCr,
    Done,
}

const RECEIVED: &[u8] = b"received:";

/// The `Received:` fields in the header section of a whole message (CRLF
/// line ends), counted as [`DataReader`] counts them in DATA: for the hop
/// limit of mail that did not come over SMTP.
pub fn received_fields(message: &[u8]) -> usize {
    message
        .split(|&b| b == b'\n')
        .take_while(|line| !line.is_empty() && *line != b"\r")
        .filter(|line| {
            line.len() > RECEIVED.len() && line[..RECEIVED.len()].eq_ignore_ascii_case(RECEIVED)
        })
        .count()
}

/// The number (from 1) of the first line of a whole message (CRLF line
/// ends) that DATA would refuse as too long: over [`MAX_DATA_LINE`]
/// octets with its CRLF, so over 998 without. For mail that did not come
/// over SMTP.
pub fn first_long_line(message: &[u8]) -> Option<usize> {
    message
        .split(|&b| b == b'\n')
        .position(|line| line.strip_suffix(b"\r").unwrap_or(line).len() + 2 > MAX_DATA_LINE)
        .map(|index| index + 1)
}

/// Reads the message after `354`, in fragments of any size.
#[derive(Debug)]
pub struct DataReader {
    state: State,
    body: Vec<u8>,
    max_size: u64,
    /// Octets of the unstuffed message, including those not kept.
    size: u64,
    line_len: usize,
    /// The first bytes of the current line, to spot `Received:`.
    prefix: [u8; RECEIVED.len()],
    in_headers: bool,
    received: usize,
    bare_line_ending: bool,
    nul: bool,
    line_too_long: bool,
    /// Read on to the end, keep nothing: the message will be refused.
    discarded: bool,
}

impl DataReader {
    /// A reader that keeps at most `max_size` octets of message.
    pub fn new(max_size: u64) -> Self {
        DataReader {
            state: State::LineStart,
            body: Vec::new(),
            max_size,
            size: 0,
            line_len: 0,
            prefix: [0; RECEIVED.len()],
            in_headers: true,
            received: 0,
            bare_line_ending: false,
            nul: false,
            line_too_long: false,
            discarded: false,
        }
    }

    /// [`Self::new`], keeping the message after `prefix` (our trace
    /// header) in the same buffer. The prefix counts against no limit and
    /// is no `Received:` line of the client's.
    pub fn after(prefix: Vec<u8>, max_size: u64) -> Self {
        let mut reader = DataReader::new(max_size);
        reader.body = prefix;
        reader
    }

    /// Takes bytes up to and including the terminating `.CRLF`.
    pub fn feed(&mut self, input: &[u8]) -> Progress {
        let mut i = 0;
        while i < input.len() {
            if self.state == State::Done {
                return Progress {
                    consumed: i,
                    done: true,
                };
            }
            // Past the header section, whole lines with nothing to undo
            // or refuse in them are taken in one go.
            if self.state == State::LineStart && !self.in_headers {
                let lines = plain_lines(&input[i..]);
                if lines > 0 {
                    self.store(&input[i..i + lines]);
                    i += lines;
                    continue;
                }
            }
            // Inside a line, everything up to the next CR, LF or NUL is
            // plain text: taken in one go rather than byte by byte.
            if self.state == State::InLine {
                let run = memchr::memchr3(b'\r', b'\n', 0, &input[i..]).unwrap_or(input.len() - i);
                if run > 0 {
                    self.keep_text(&input[i..i + run]);
                    i += run;
                    continue;
                }
            }
            self.step(input[i]);
            i += 1;
        }
        Progress {
            consumed: input.len(),
            done: self.state == State::Done,
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Octets of message received so far, stored or not.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Octets kept in memory now: received, not yet taken by
    /// [`Self::take_kept`].
    pub fn kept_len(&self) -> usize {
        self.body.len()
    }

    /// Hands over the octets kept so far, so that a large message can go
    /// to disk while it arrives instead of being held whole; what
    /// [`Self::finish`] returns is then only what came after the last take.
    pub fn take_kept(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.body)
    }

    /// Takes back the buffer [`Self::take_kept`] handed over, emptied, to
    /// keep the next bytes in: a message going to disk in pieces then
    /// reuses one buffer instead of growing a new one for each piece.
    pub fn reuse(&mut self, mut buffer: Vec<u8>) {
        if self.body.is_empty() && !self.discarded {
            buffer.clear();
            self.body = buffer;
        }
    }

    /// Lets go of the body kept so far and keeps no more; the message is
    /// still read to its end, where [`Self::finish`] refuses it with
    /// [`DataError::OverBudget`] (after any error about its content).
    pub fn discard(&mut self) {
        self.discarded = true;
        self.body = Vec::new();
    }

    /// The message, or why it must be refused. Call once [`Self::is_done`].
    pub fn finish(self) -> Result<ReceivedData, DataError> {
        if self.bare_line_ending {
            Err(DataError::BareLineEnding)
        } else if self.nul {
            Err(DataError::Nul)
        } else if self.line_too_long {
            Err(DataError::LineTooLong)
        } else if self.size > self.max_size {
            Err(DataError::TooBig)
        } else if self.discarded {
            Err(DataError::OverBudget)
        } else {
            Ok(ReceivedData {
                body: self.body,
                received_headers: self.received,
            })
        }
    }

    fn step(&mut self, b: u8) {
        if b == 0 {
            self.nul = true;
        }
        self.line_len += 1;
        if self.line_len > MAX_DATA_LINE {
            self.line_too_long = true;
        }
        if self.in_headers && self.line_len <= self.prefix.len() {
            self.prefix[self.line_len - 1] = b;
        }
        self.state = match (self.state, b) {
            (State::LineStart, b'.') => State::Dot,
            (State::LineStart | State::InLine, b'\r') => State::Cr,
            (State::LineStart | State::InLine, b'\n') => self.bare(b"\n"),
            (State::LineStart | State::InLine, _) => self.keep(&[b]),
            (State::Cr, b'\n') => {
                self.keep(b"\r\n");
                self.end_of_line();
                State::LineStart
            }
            (State::Cr, b'\r') => {
                self.bare(b"\r");
                State::Cr
            }
            (State::Cr, _) => {
                self.bare(b"\r");
                self.keep(&[b])
            }
            // A stuffed dot: `..` at the start of a line stands for `.`,
            // and the added dot does not count against the line's length
            // (RFC 5321 4.5.3.1.6).
            (State::Dot, b'.') => {
                self.line_len -= 1;
                self.keep(b".")
            }
            (State::Dot, b'\r') => State::DotCr,
            (State::Dot, b'\n') => self.bare(b".\n"),
            // A lone leading dot before text is dropped (RFC 5321 4.5.2).
            (State::Dot, _) => self.keep(&[b]),
            (State::DotCr, b'\n') => State::Done,
            (State::DotCr, b'\r') => {
                self.bare(b".\r");
                State::Cr
            }
            (State::DotCr, _) => {
                self.bare(b".\r");
                self.keep(&[b])
            }
            (State::Done, _) => State::Done,
        };
    }

    /// Records a bare CR or LF; the line goes on (a bare LF is no line end).
    fn bare(&mut self, bytes: &[u8]) -> State {
        self.bare_line_ending = true;
        self.keep(bytes)
    }

    fn keep(&mut self, bytes: &[u8]) -> State {
        for &b in bytes {
            self.size += 1;
            if self.size <= self.max_size && !self.discarded {
                grow_to_hold(&mut self.body, 1);
                self.body.push(b);
            }
        }
        State::InLine
    }

    /// What [`Self::step`] does for each byte of `text` inside a line
    /// when none is CR, LF or NUL, for all of them at once.
    fn keep_text(&mut self, text: &[u8]) {
        let start = self.line_len;
        if self.in_headers && start < self.prefix.len() {
            let n = (self.prefix.len() - start).min(text.len());
            self.prefix[start..start + n].copy_from_slice(&text[..n]);
        }
        self.line_len += text.len();
        if self.line_len > MAX_DATA_LINE {
            self.line_too_long = true;
        }
        self.store(text);
    }

    /// Counts `text` into the message and keeps what fits.
    fn store(&mut self, text: &[u8]) {
        if !self.discarded {
            let room = self.max_size.saturating_sub(self.size);
            let kept = (text.len() as u64).min(room) as usize;
            grow_to_hold(&mut self.body, kept);
            self.body.extend_from_slice(&text[..kept]);
        }
        self.size += text.len() as u64;
    }

    fn end_of_line(&mut self) {
        if self.in_headers {
            if self.line_len == 2 {
                self.in_headers = false;
            } else if self.line_len > RECEIVED.len() && self.prefix.eq_ignore_ascii_case(RECEIVED) {
                self.received += 1;
            }
        }
        self.line_len = 0;
    }
}

/// How many bytes at the start of `input` are whole lines that
/// [`DataReader::step`] would keep as they are: none starting with a dot,
/// none with a CR, LF or NUL before its CRLF, none too long. The body
/// encoder of outgoing DATA writes such lines as they are, too.
pub(crate) fn plain_lines(input: &[u8]) -> usize {
    let mut taken = 0;
    while let Some(&first) = input.get(taken) {
        if first == b'.' {
            break;
        }
        let line = &input[taken..];
        let Some(end) = memchr::memchr3(b'\r', b'\n', 0, line) else {
            break;
        };
        if line[end] != b'\r' || line.get(end + 1) != Some(&b'\n') || end + 2 > MAX_DATA_LINE {
            break;
        }
        taken += end + 2;
    }
    taken
}

/// Makes room for `more` octets in steps of powers of two, so that the
/// buffer never holds more than twice what it keeps and never more than
/// the next power of two: a body the shell takes at 256 KiB then never
/// grows a 512 KiB block, as `Vec`'s own doubling from an odd first size
/// would.
fn grow_to_hold(body: &mut Vec<u8>, more: usize) {
    let needed = body.len() + more;
    if needed > body.capacity() {
        body.reserve_exact(needed.next_power_of_two() - body.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `chunk` bytes; returns the reader and how
    /// many bytes it took in all.
    fn run(input: &[u8], chunk: usize, max: u64) -> (DataReader, usize) {
        let mut r = DataReader::new(max);
        let mut used = 0;
        for piece in input.chunks(chunk.max(1)) {
            let p = r.feed(piece);
            used += p.consumed;
            if p.done {
                break;
            }
            assert_eq!(p.consumed, piece.len());
        }
        (r, used)
    }

    const CHUNKS: &[usize] = &[1, 2, 3, 5, 7, 64, 100_000];

    /// The reader fed one byte at a time through [`DataReader::step`]
    /// alone: what the fast path of `feed` must agree with.
    fn by_steps(input: &[u8], max: u64) -> (DataReader, usize) {
        let mut r = DataReader::new(max);
        let mut used = 0;
        for &b in input {
            if r.is_done() {
                break;
            }
            r.step(b);
            used += 1;
        }
        (r, used)
    }

    proptest::proptest! {
        /// Whatever the input and however it is cut, `feed` ends in the
        /// same state as stepping byte by byte: body, size, flags, line
        /// length and `Received:` count alike.
        #[test]
        fn feeding_runs_of_text_agrees_with_stepping_byte_by_byte(
            pieces in proptest::collection::vec(
                proptest::sample::select(vec![
                    &b"a"[..], b"text ", b"\r\n", b"\r", b"\n", b".", b"..", b"\0",
                    b"Received: x", b"RECEIVED:", b"\r\n.\r\n", b"\r\n\r\n",
                    &[b'x'; 300][..], &[b'y'; 997][..],
                ]),
                0..80,
            ),
            chunk in 1usize..200,
            max in proptest::sample::select(vec![0u64, 10, 1000, 1 << 20]),
        ) {
            let input: Vec<u8> = pieces.concat();
            let (expected, expected_used) = by_steps(&input, max);
            let (got, used) = run(&input, chunk, max);
            proptest::prop_assert_eq!(used, expected_used);
            proptest::prop_assert_eq!(format!("{got:?}"), format!("{expected:?}"));
        }
    }

    #[test]
    fn the_buffer_never_grows_past_the_next_power_of_two_of_what_it_keeps() {
        let line = b"a line of odd length in a message body, 57 octets long\r\n";
        // A first piece of 1,500 octets is where `Vec`'s doubling goes
        // 192,000 -> 384,000 for 193,500 kept.
        for &chunk in CHUNKS.iter().chain(&[1500]) {
            let mut r = DataReader::new(1 << 20);
            let mut input = Vec::new();
            while input.len() < 300_000 {
                input.extend_from_slice(line);
            }
            for piece in input.chunks(chunk) {
                r.feed(piece);
                let (kept, capacity) = (r.kept_len(), r.body.capacity());
                assert!(
                    capacity <= kept.next_power_of_two().max(8),
                    "by {chunk}: {capacity} held for {kept}"
                );
            }
            assert_eq!(r.kept_len(), input.len());
        }
    }

    #[test]
    fn what_is_taken_on_the_way_and_what_is_left_make_the_whole_body() {
        let mut input = Vec::new();
        for n in 0..500 {
            input.extend_from_slice(format!("..line {n} of the message\r\n").as_bytes());
        }
        input.extend_from_slice(b".\r\n");
        let (whole, _) = run(&input, 100_000, 1 << 20);
        let whole = whole.finish().unwrap().body;
        for &chunk in CHUNKS {
            let mut r = DataReader::new(1 << 20);
            let mut taken = Vec::new();
            for piece in input.chunks(chunk) {
                if r.feed(piece).done {
                    break;
                }
                if r.kept_len() >= 1000 {
                    let piece = r.take_kept();
                    taken.extend_from_slice(&piece);
                    let capacity = piece.capacity();
                    r.reuse(piece);
                    assert_eq!(r.kept_len(), 0);
                    assert_eq!(r.body.capacity(), capacity, "the buffer is reused");
                }
            }
            assert!(
                r.size() > taken.len() as u64,
                "by {chunk}: the size counts what was taken"
            );
            taken.extend_from_slice(&r.finish().unwrap().body);
            assert_eq!(taken, whole, "by {chunk}");
        }
    }

    #[test]
    fn ends_only_at_crlf_dot_crlf() {
        // (input, bytes consumed when done or None, body)
        let table: &[(&[u8], Option<usize>, &[u8])] = &[
            (b".\r\n", Some(3), b""),
            (b".\r\nNEXT", Some(3), b""),
            (b"a\r\n.\r\n", Some(6), b"a\r\n"),
            (
                b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n",
                Some(23),
                b"Subject: x\r\n\r\nbody\r\n",
            ),
            (b"..\r\n.\r\n", Some(7), b".\r\n"),
            (b"...x\r\n.\r\n", Some(9), b"..x\r\n"),
            (b".x\r\n.\r\n", Some(7), b"x\r\n"),
            (b"a\r\n..\r\n.\r\n", Some(10), b"a\r\n.\r\n"),
            (b"a\r\n", None, b""),
            (b"a\r\n.", None, b""),
            (b"a\r\n.\r", None, b""),
            (b"a.\r\n", None, b""),
            (b"a\r\n .\r\n", None, b""),
        ];
        for &chunk in CHUNKS {
            for &(input, done_at, body) in table {
                let (r, used) = run(input, chunk, 1 << 20);
                match done_at {
                    Some(n) => {
                        assert!(r.is_done(), "{input:?} by {chunk}");
                        assert_eq!(used, n, "{input:?} by {chunk}");
                        let data = r.finish().unwrap();
                        assert_eq!(data.body, body, "{input:?} by {chunk}");
                    }
                    None => assert!(!r.is_done(), "{input:?} by {chunk}"),
                }
            }
        }
    }

    #[test]
    fn smuggling_variants_never_end_data_and_taint_the_message() {
        let variants: &[&[u8]] = &[
            b"a\n.\nb",
            b"a\n.\r\nb",
            b"a\r.\rb",
            b"a\r.\r\nb",
            b"a\r\n.\nb",
            b"a\r\n.\rb",
            b"a\r\n.\r.\r\nb",
            b"\n.\r\nb",
            b".\nb",
            b".\rb",
            b"a\rb",
            b"a\nb",
            b"a\r\r\nb",
        ];
        for &chunk in CHUNKS {
            for &v in variants {
                let (r, _) = run(v, chunk, 1 << 20);
                assert!(!r.is_done(), "{v:?} ended data (chunks of {chunk})");
                // The real end still ends it, and the message is refused.
                let mut full = v.to_vec();
                full.extend_from_slice(b"\r\n.\r\nMAIL FROM:<>\r\n");
                let (r, used) = run(&full, chunk, 1 << 20);
                assert!(r.is_done(), "{v:?} by {chunk}");
                assert_eq!(used, v.len() + 5, "{v:?} by {chunk}");
                assert_eq!(r.finish(), Err(DataError::BareLineEnding), "{v:?}");
            }
        }
    }

    #[test]
    fn nul_never_ends_data_and_the_message_is_refused_at_its_end() {
        // (input without the final end, bytes of it that end data)
        let variants: &[&[u8]] = &[
            b"\0",
            b"a\0b\r\n",
            b"Subject: x\0\r\n\r\nbody\r\n",
            b"\0.\0\r\n",
            b"a\r\n\0.\0\r\nb\r\n",
            b"a\r\n.\0\r\n",
            b"a\r\n\0.\r\n",
            b"a\r\n.\r\0\n",
            b"..\0\r\n",
            b"body\r\n\0",
        ];
        for &chunk in CHUNKS {
            for &v in variants {
                let mut full = v.to_vec();
                if !full.ends_with(b"\r\n") {
                    full.extend_from_slice(b"\r\n");
                }
                let before_end = full.len();
                full.extend_from_slice(b".\r\nMAIL FROM:<>\r\n");
                let (r, used) = run(&full, chunk, 1 << 20);
                assert!(r.is_done(), "{v:?} by {chunk}");
                assert_eq!(used, before_end + 3, "{v:?} by {chunk}");
                let want = if v == b"a\r\n.\r\0\n" {
                    // The CR there is bare too: smuggling is named first.
                    DataError::BareLineEnding
                } else {
                    DataError::Nul
                };
                assert_eq!(r.finish(), Err(want), "{v:?} by {chunk}");
            }
        }
        // 8-bit text without NUL is fine.
        let (r, _) = run(
            "Subject: é\r\n\r\n\u{80}\u{ff}\r\n.\r\n".as_bytes(),
            1,
            1 << 20,
        );
        assert!(r.finish().is_ok());
    }

    #[test]
    fn whole_body_lines_taken_at_once_are_checked_like_any_other() {
        let head = b"Subject: x\r\n\r\nplain\r\n".to_vec();
        let finish = |middle: &[u8]| {
            let input = [&head[..], middle, b"plain\r\n..dot\r\nend\r\n.\r\n"].concat();
            let mut r = DataReader::new(1 << 20);
            let p = r.feed(&input);
            assert_eq!(
                p,
                Progress {
                    consumed: input.len(),
                    done: true
                }
            );
            r.finish()
        };
        let body = finish(b"").unwrap().body;
        assert_eq!(body, b"Subject: x\r\n\r\nplain\r\nplain\r\n.dot\r\nend\r\n");
        let longest = [&[b'y'; MAX_DATA_LINE - 2][..], b"\r\n"].concat();
        assert!(finish(&longest).is_ok(), "998 octets and CRLF fit");
        let too_long = [&[b'y'; MAX_DATA_LINE - 1][..], b"\r\n"].concat();
        assert_eq!(finish(&too_long), Err(DataError::LineTooLong));
        assert_eq!(finish(b"a\nb\r\n"), Err(DataError::BareLineEnding));
        assert_eq!(finish(b"a\rb\r\n"), Err(DataError::BareLineEnding));
        assert_eq!(finish(b"a\0b\r\n"), Err(DataError::Nul));
    }

    #[test]
    fn long_lines_are_refused_at_the_end() {
        let mut ok = vec![b'x'; MAX_DATA_LINE - 2];
        ok.extend_from_slice(b"\r\n.\r\n");
        assert!(run(&ok, 7, 1 << 20).0.finish().is_ok());
        let mut long = vec![b'x'; MAX_DATA_LINE - 1];
        long.extend_from_slice(b"\r\n.\r\n");
        for &chunk in CHUNKS {
            let (r, _) = run(&long, chunk, 1 << 20);
            assert!(r.is_done());
            assert_eq!(r.finish(), Err(DataError::LineTooLong));
        }
        // A line that starts with a dot is sent with one more: the longest
        // line is still taken, one octet more is still refused.
        let mut dotted = b"..".to_vec();
        dotted.extend(vec![b'x'; MAX_DATA_LINE - 3]);
        dotted.extend_from_slice(b"\r\n.\r\n");
        let mut too_long = b"..".to_vec();
        too_long.extend(vec![b'x'; MAX_DATA_LINE - 2]);
        too_long.extend_from_slice(b"\r\n.\r\n");
        for &chunk in CHUNKS {
            let body = run(&dotted, chunk, 1 << 20)
                .0
                .finish()
                .expect("998 octets")
                .body;
            assert_eq!(body.len(), MAX_DATA_LINE, "{chunk}: the line and its CRLF");
            assert!(body.starts_with(b".x"));
            let (r, _) = run(&too_long, chunk, 1 << 20);
            assert_eq!(r.finish(), Err(DataError::LineTooLong), "{chunk}");
        }
        // The same limit on a whole message, as a pickup file holds it.
        assert_eq!(first_long_line(&ok[..ok.len() - 3]), None);
        assert_eq!(first_long_line(&long[..long.len() - 3]), Some(1));
        let mut message = b"Subject: x\r\n\r\n".to_vec();
        message.extend_from_slice(&ok[..ok.len() - 3]);
        message.extend_from_slice(&long[..long.len() - 5]);
        assert_eq!(first_long_line(&message), Some(4), "the last line, unended");
        assert_eq!(first_long_line(b""), None);
    }

    #[test]
    fn oversize_messages_are_read_to_the_end_but_not_kept() {
        let mut input = Vec::new();
        for _ in 0..100 {
            input.extend_from_slice(b"0123456789\r\n");
        }
        input.extend_from_slice(b".\r\n");
        for &chunk in CHUNKS {
            let (r, used) = run(&input, chunk, 100);
            assert!(r.is_done());
            assert_eq!(used, input.len());
            assert_eq!(r.size(), 1200);
            assert!(r.body.len() <= 100);
            assert_eq!(r.finish(), Err(DataError::TooBig));
        }
        // Exactly at the limit is fine.
        let (r, _) = run(b"12345678\r\n.\r\n", 1, 10);
        assert_eq!(r.finish().unwrap().body, b"12345678\r\n");
    }

    #[test]
    fn a_discarded_message_is_read_to_its_end_and_refused_there() {
        let mut input = b"Subject: x\r\n\r\n".to_vec();
        for _ in 0..100 {
            input.extend_from_slice(b"0123456789\r\n");
        }
        input.extend_from_slice(b".\r\nQUIT\r\n");
        for at in [0, 1, 17, 500, input.len() - 9] {
            let mut r = DataReader::new(1 << 20);
            let first = r.feed(&input[..at]);
            assert!(!first.done);
            r.discard();
            assert!(r.body.is_empty() && r.body.capacity() == 0);
            let rest = r.feed(&input[at..]);
            assert!(rest.done, "discarded at {at}");
            assert_eq!(at + rest.consumed, input.len() - 6, "QUIT is left");
            assert!(r.body.is_empty(), "nothing kept after discard");
            assert_eq!(r.size(), input.len() as u64 - 9);
            assert_eq!(r.finish(), Err(DataError::OverBudget));
        }
        // An error about the content is named first.
        let mut r = DataReader::new(1 << 20);
        r.feed(b"a\0\r\n");
        r.discard();
        r.feed(b".\r\n");
        assert_eq!(r.finish(), Err(DataError::Nul));
    }

    #[test]
    fn received_fields_are_counted_in_the_header_section_only() {
        let input = b"Received: from a\r\n\tby b\r\nRECEIVED:x\r\nX-Received: no\r\nreceived:\r\nReceived : old\r\n\r\nReceived: in the body\r\n.\r\n";
        for &chunk in CHUNKS {
            let (r, _) = run(input, chunk, 1 << 20);
            assert_eq!(r.finish().unwrap().received_headers, 3);
        }
        // The same count of a whole message, as a pickup file holds it.
        assert_eq!(received_fields(&input[..input.len() - 3]), 3);
        assert_eq!(received_fields(b"Received: a\r\n"), 1);
        assert_eq!(received_fields(b"Subject: x\r\n\r\nReceived: a\r\n"), 0);
    }
}
