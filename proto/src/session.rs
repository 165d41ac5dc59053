//! The SMTP server session as a state machine, apart from the socket.
//!
//! The shell (the node crate) owns the connection: it writes
//! [`Session::greeting`], then pushes what it reads with
//! [`Session::push_input`] and carries out every [`Action`] that
//! [`Session::next_action`] hands back until it returns `None`. Work that
//! needs the outside world (TLS, password checks, durable storage) is asked
//! for with an action and answered with [`Session::tls_established`],
//! [`Session::auth_result`] or [`Session::message_stored`]; until then the
//! session waits and keeps pipelined input buffered.
//!
//! Memory stays bounded as long as the shell drains `next_action` after
//! each push: command lines are cut at [`MAX_COMMAND_LINE`] octets and a
//! message body at `max_message_size`. What bodies take across all
//! sessions is the shell's to bound: it is asked for memory before `354`
//! ([`Action::ReserveBody`]) and can make the session let go of a body
//! under way ([`Session::discard_body`], answered with `452 4.3.1`).

use std::net::IpAddr;
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;

use crate::address::{Mailbox, Path, SenderRule};
use crate::command::{self, Command, CommandError, ParamError, Verb};
use crate::data::{DataError, DataReader};
use crate::envelope::{BodyType, Envelope, MessageId, Recipient};
use crate::received;
use crate::reply::{EnhancedStatus, Reply};

/// Longest command line kept, CRLF included; longer lines get `500 5.5.2`.
pub const MAX_COMMAND_LINE: usize = 1000;
/// Error replies after which the session gives up on the client.
pub const MAX_ERRORS: u32 = 20;

/// The command a final reply answers, for the session log: its verb, its
/// arguments (an AUTH's credentials left out) and the octets it took
/// (for DATA, the message).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Logged {
    pub verb: String,
    pub args: String,
    pub bytes: u64,
}

/// The longest argument text kept for the log.
const LOGGED_ARGS: usize = 256;

/// What the node decided for this listener, shared by its sessions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionConfig {
    pub hostname: String,
    pub max_message_size: u64,
    pub max_session_size: u64,
    pub max_recipients: usize,
    pub max_hop_count: usize,
    /// NOOP, RSET, VRFY and HELP commands a client may send before each
    /// further one counts as an error (Postfix's
    /// `smtpd_junk_command_limit`); a stored message starts the count again.
    pub junk_command_limit: u32,
    pub require_tls: bool,
    /// STARTTLS may be offered.
    pub tls_available: bool,
    /// Users are configured.
    pub auth_available: bool,
    /// AUTH allowed without TLS.
    pub allow_plaintext_auth: bool,
    /// Routing form (lowercase A-labels).
    pub local_domains: Vec<String>,
    /// Where mail for `postmaster` and `postmaster@<hostname>` goes
    /// (RFC 5321 4.5.1: it must be accepted from anyone). `None`: such
    /// mail is refused with `550 5.1.1`, unless the hostname is a local
    /// domain, whose own `postmaster` mailbox then takes it.
    pub postmaster: Option<Mailbox>,
}

/// The client at the other end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    pub ip: IpAddr,
    /// The client may relay to any domain without authenticating.
    pub relay_allowed: bool,
}

/// What the shell must do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Write it.
    Reply(Reply),
    /// Write it, then close the connection.
    Close(Reply),
    /// Write this 220, then do the TLS handshake, then call
    /// [`Session::tls_established`].
    StartTls(Reply),
    /// Verify the credentials, then call [`Session::auth_result`].
    Authenticate { username: String, password: String },
    /// Find memory for a message body of `declared` octets (the client's
    /// `SIZE=`, if it gave one), then call [`Session::body_reserved`] (or
    /// [`Session::body_refused`]). While
    /// the body arrives, [`Session::data_size`] says how much is held;
    /// when no more memory can be had, call [`Session::discard_body`].
    ReserveBody { declared: Option<u64> },
    /// Store the message durably, then call [`Session::message_stored`].
    Message(IncomingMessage),
}

/// A message read to its end and accepted so far, waiting to be stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IncomingMessage {
    pub envelope: Envelope,
    pub helo: String,
    pub auth_user: Option<String>,
    pub tls: bool,
    /// Our `Received:` line, then the message as received: unstuffed,
    /// CRLF line endings; without what the shell took with
    /// [`Session::take_body_so_far`].
    pub data: Vec<u8>,
}

/// Why the shell refused to check credentials ([`Session::auth_refused`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthRefusal {
    /// Every password check slot is taken and the wait ran out.
    Busy,
    /// Failed logins for this user name are blocked for a while (from this
    /// address).
    UserBlocked,
    /// Failed logins from this address are blocked for a while.
    AddressBlocked,
}

/// Why the shell did not store a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreFailure {
    /// The queue could not take it (`451 4.3.0`).
    Unavailable,
    /// The logged-in user has sent its quota of messages; one more passes
    /// in this many seconds (`450 4.7.1`).
    OverQuota { retry_after_secs: u64 },
}

#[derive(Debug)]
enum State {
    Command,
    /// `AUTH PLAIN` sent without an initial response: the next line is it.
    AuthPlain,
    AuthLoginUser,
    AuthLoginPass(String),
    AwaitAuth(String),
    /// `DATA` accepted so far; waiting for [`Session::body_reserved`].
    AwaitBody,
    Data(Box<DataReader>),
    AwaitStore,
    AwaitTls,
    Closed,
}

/// One SMTP server session.
#[derive(Debug)]
pub struct Session {
    config: Arc<SessionConfig>,
    peer: PeerInfo,
    state: State,
    /// Pipelined input not yet handled: complete lines, then at most one
    /// partial line of up to [`MAX_COMMAND_LINE`] octets.
    input: Vec<u8>,
    /// Octets after the last LF in `input`.
    tail_len: usize,
    helo: Option<String>,
    esmtp: bool,
    tls: bool,
    auth_user: Option<String>,
    /// The senders the logged-in user may use; `None`: any.
    sender_rules: Option<Vec<SenderRule>>,
    transaction: Option<Envelope>,
    /// `SIZE=` of the current transaction's MAIL command.
    declared_size: Option<u64>,
    session_bytes: u64,
    errors: u32,
    /// NOOP, RSET, VRFY and HELP since the session began or the last
    /// stored message.
    junk: u32,
    /// The command the next final reply answers.
    logged: Option<Logged>,
}

/// A command line as the log keeps it: the verb upper-cased, the rest as
/// sent (lossy UTF-8, cut at [`LOGGED_ARGS`]), but for AUTH only its
/// mechanism.
fn logged(line: &[u8], auth: bool) -> Logged {
    let text = String::from_utf8_lossy(line);
    let (verb, args) = text.trim().split_once(' ').unwrap_or((text.trim(), ""));
    let args = args.trim();
    let args = if auth {
        args.split(' ').next().unwrap_or_default()
    } else {
        args
    };
    Logged {
        verb: verb
            .chars()
            .take(16)
            .collect::<String>()
            .to_ascii_uppercase(),
        args: args.chars().take(LOGGED_ARGS).collect(),
        bytes: line.len() as u64 + 2,
    }
}

fn status(class: u8, subject: u16, detail: u16) -> EnhancedStatus {
    EnhancedStatus(class, subject, detail)
}

fn reply(code: u16, class: u8, subject: u16, detail: u16, text: impl Into<String>) -> Reply {
    Reply::new(code, status(class, subject, detail), text)
}

fn bad_sequence(text: &str) -> Reply {
    reply(503, 5, 5, 1, text)
}

impl Session {
    pub fn new(config: Arc<SessionConfig>, peer: PeerInfo) -> Session {
        Session {
            config,
            peer,
            state: State::Command,
            input: Vec::new(),
            tail_len: 0,
            helo: None,
            esmtp: false,
            tls: false,
            auth_user: None,
            sender_rules: None,
            transaction: None,
            declared_size: None,
            session_bytes: 0,
            errors: 0,
            junk: 0,
            logged: None,
        }
    }

    /// `220 <hostname> ESMTP smarthost`.
    pub fn greeting(&self) -> Reply {
        Reply::plain(
            220,
            vec![format!("{} ESMTP smarthost", self.config.hostname)],
        )
    }

    /// `421 4.4.2`, for the shell to write before it drops an idle client.
    pub fn timeout_reply(&self) -> Reply {
        reply(
            421,
            4,
            4,
            2,
            format!("{} Error: timeout exceeded", self.config.hostname),
        )
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// `true` between transactions with nothing pending: the moment a
    /// shutting-down node may close the session without cutting a message.
    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::Command) && self.transaction.is_none() && self.input.is_empty()
    }

    /// `true` after `354` until the message has ended: the shell holds
    /// the transfer to its own deadlines (overall and minimum rate).
    pub fn is_receiving_data(&self) -> bool {
        matches!(&self.state, State::Data(reader) if !reader.is_done())
    }

    /// `421 4.3.2`, for the shell to write when the node shuts down.
    pub fn shutdown_reply(&mut self) -> Reply {
        self.state = State::Closed;
        reply(
            421,
            4,
            3,
            2,
            format!(
                "{} Service shutting down, try again later",
                self.config.hostname
            ),
        )
    }

    /// Octets of input held right now (tests use it to check the bound).
    pub fn buffered_len(&self) -> usize {
        self.input.len()
    }

    /// Takes bytes read from the client. In DATA they go straight to the
    /// message reader; otherwise they wait, cut to line length, for
    /// [`Self::next_action`].
    pub fn push_input(&mut self, mut bytes: &[u8]) {
        match &mut self.state {
            // Plaintext after STARTTLS is dropped, never executed.
            State::Closed | State::AwaitTls => return,
            State::Data(reader) if !reader.is_done() => {
                if !self.input.is_empty() {
                    let p = reader.feed(&self.input);
                    self.input.drain(..p.consumed);
                    if self.input.is_empty() {
                        self.tail_len = 0;
                    }
                }
                if !reader.is_done() {
                    let p = reader.feed(bytes);
                    bytes = &bytes[p.consumed..];
                }
            }
            _ => {}
        }
        self.buffer(bytes);
    }

    /// Appends to `input`, keeping at most `MAX_COMMAND_LINE` octets of any
    /// line: past that the last kept octet is overwritten, so a CR before
    /// the LF survives and the line still reads as too long.
    fn buffer(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let (segment, lf) = match bytes.iter().position(|b| *b == b'\n') {
                Some(i) => (&bytes[..i], true),
                None => (bytes, false),
            };
            let room = MAX_COMMAND_LINE.saturating_sub(self.tail_len);
            if segment.len() <= room {
                self.input.extend_from_slice(segment);
                self.tail_len += segment.len();
            } else {
                self.input.extend_from_slice(&segment[..room]);
                self.tail_len += room;
                if let (Some(last), Some(&b)) = (self.input.last_mut(), segment.last()) {
                    *last = b;
                }
            }
            bytes = &bytes[segment.len()..];
            if lf {
                self.input.push(b'\n');
                self.tail_len = 0;
                bytes = &bytes[1..];
            }
        }
    }

    /// Removes and returns the next complete line, without its LF.
    fn take_line(&mut self) -> Option<Vec<u8>> {
        let lf = self.input.iter().position(|b| *b == b'\n')?;
        let mut line: Vec<u8> = self.input.drain(..=lf).collect();
        line.pop();
        if self.input.is_empty() {
            self.tail_len = 0;
        }
        Some(line)
    }

    /// The next thing to do, or `None` when more input (or an answer from
    /// the shell) is needed.
    pub fn next_action(&mut self) -> Option<Action> {
        match &mut self.state {
            State::Closed
            | State::AwaitTls
            | State::AwaitAuth(_)
            | State::AwaitBody
            | State::AwaitStore => return None,
            State::Data(reader) => {
                if !reader.is_done() {
                    let p = reader.feed(&self.input);
                    self.input.drain(..p.consumed);
                    if self.input.is_empty() {
                        self.tail_len = 0;
                    }
                    if !p.done {
                        return None;
                    }
                }
                return Some(self.end_of_data());
            }
            _ => {}
        }
        if self.errors >= MAX_ERRORS {
            return Some(self.close(reply(421, 4, 7, 0, "Too many errors")));
        }
        let line = self.take_line()?;
        if line.len() >= MAX_COMMAND_LINE {
            // Also ends an AUTH exchange that was waiting for this line.
            self.state = State::Command;
            return Some(self.answer(reply(500, 5, 5, 2, "Line too long")));
        }
        let line = line.strip_suffix(b"\r").unwrap_or(&line);
        match std::mem::replace(&mut self.state, State::Command) {
            State::AuthPlain => Some(self.auth_plain_response(line)),
            State::AuthLoginUser => Some(self.auth_login_user(line)),
            State::AuthLoginPass(user) => Some(self.auth_login_pass(user, line)),
            _ => Some(self.command(line)),
        }
    }

    /// The TLS handshake is done: start over as RFC 3207 requires (no
    /// HELO, no login, no transaction, nothing buffered). A listener with
    /// implicit TLS calls it once before the first input.
    pub fn tls_established(&mut self) {
        if self.is_closed() {
            return;
        }
        self.state = State::Command;
        self.input.clear();
        self.tail_len = 0;
        self.helo = None;
        self.esmtp = false;
        self.auth_user = None;
        self.transaction = None;
        self.tls = true;
    }

    /// The shell's verdict on the credentials of [`Action::Authenticate`].
    pub fn auth_result(&mut self, ok: bool) -> Reply {
        let user = match std::mem::replace(&mut self.state, State::Command) {
            State::AwaitAuth(user) => user,
            other => {
                self.state = other;
                return bad_sequence("No authentication in progress");
            }
        };
        if ok {
            self.auth_user = Some(user);
            reply(235, 2, 7, 0, "Authentication successful")
        } else {
            self.errors += 1;
            reply(535, 5, 7, 8, "Authentication credentials invalid")
        }
    }

    /// The user who just logged in may send only as these senders
    /// (`[[smtp.users]] senders`): any other `MAIL FROM`, the null sender
    /// too, gets `550 5.7.1`, so a leaked password cannot send as anyone.
    pub fn restrict_senders(&mut self, rules: Vec<SenderRule>) {
        if self.auth_user.is_some() {
            self.sender_rules = Some(rules);
        }
    }

    /// The shell did not check the credentials of [`Action::Authenticate`]:
    /// too many checks are running, or failed logins blocked the user name
    /// or the client's address for a while. A blocked address ends the
    /// session (`421`); the others may try again later (`454`, RFC 4954).
    pub fn auth_refused(&mut self, why: AuthRefusal) -> Reply {
        if !matches!(self.state, State::AwaitAuth(_)) {
            return bad_sequence("No authentication in progress");
        }
        self.state = State::Command;
        match why {
            AuthRefusal::Busy => {
                reply(454, 4, 7, 0, "Too many logins in progress, try again later")
            }
            AuthRefusal::UserBlocked => {
                self.errors += 1;
                reply(
                    454,
                    4,
                    7,
                    0,
                    "Too many failed logins for this user, try again later",
                )
            }
            AuthRefusal::AddressBlocked => {
                self.state = State::Closed;
                self.input.clear();
                self.tail_len = 0;
                reply(
                    421,
                    4,
                    7,
                    0,
                    "Too many failed logins from your address, try again later",
                )
            }
        }
    }

    /// The shell's answer to [`Action::ReserveBody`] when it has the
    /// memory: `354` and on to the message, which starts with our
    /// `Received:` line for message `id` received at `unix_secs`. Written
    /// first, it needs no copy of the body to put it in front later.
    pub fn body_reserved(&mut self, id: &MessageId, unix_secs: u64) -> Reply {
        if !matches!(self.state, State::AwaitBody) {
            return bad_sequence("No DATA waiting for memory");
        }
        let for_rcpt = match self.transaction.as_ref().map(|t| t.recipients.as_slice()) {
            Some([only]) => Some(&only.address),
            _ => None,
        };
        let trace = received::received_header(
            &self.config.hostname,
            self.helo.as_deref().unwrap_or_default(),
            self.peer.ip,
            received::with_protocol(true, self.tls, self.auth_user.is_some()),
            id,
            for_rcpt,
            unix_secs,
        );
        let reader = DataReader::after(trace.into_bytes(), self.config.max_message_size);
        self.state = State::Data(Box::new(reader));
        Reply::plain(354, vec!["End data with <CR><LF>.<CR><LF>".to_string()])
    }

    /// The shell's answer to [`Action::ReserveBody`] when no memory could
    /// be had: `452 4.3.1` (the transaction stays; the client may try
    /// DATA again later).
    pub fn body_refused(&mut self) -> Reply {
        if !matches!(self.state, State::AwaitBody) {
            return bad_sequence("No DATA waiting for memory");
        }
        self.state = State::Command;
        self.errors += 1;
        insufficient_storage()
    }

    /// Octets of the message under way received so far (`None` outside
    /// DATA): what the shell must have memory for.
    pub fn data_size(&self) -> Option<u64> {
        match &self.state {
            State::Data(reader) => Some(reader.size()),
            _ => None,
        }
    }

    /// Octets of the message under way held in memory (`None` outside
    /// DATA).
    pub fn kept_body_len(&self) -> Option<usize> {
        match &self.state {
            State::Data(reader) => Some(reader.kept_len()),
            _ => None,
        }
    }

    /// Takes the octets of the message under way received so far, for the
    /// shell to write to disk; the message's [`IncomingMessage::data`] is
    /// then only what arrives after. Empty outside DATA.
    pub fn take_body_so_far(&mut self) -> Vec<u8> {
        match &mut self.state {
            State::Data(reader) => reader.take_kept(),
            _ => Vec::new(),
        }
    }

    /// Gives back the buffer [`Session::take_body_so_far`] handed over,
    /// once its bytes are on disk, for the next ones (see
    /// [`crate::data::DataReader::reuse`]).
    pub fn reuse_body_buffer(&mut self, buffer: Vec<u8>) {
        if let State::Data(reader) = &mut self.state {
            reader.reuse(buffer);
        }
    }

    /// No more memory for the message under way: what it holds is freed,
    /// the rest is read without being kept, and its end is answered with
    /// `452 4.3.1` (so client and server stay in step).
    pub fn discard_body(&mut self) {
        if let State::Data(reader) = &mut self.state {
            reader.discard();
        }
    }

    /// The command a final reply (not `334` or `354`) answers, once: the
    /// shell logs the pair. `None` for replies to no command (greeting,
    /// timeouts) and for the lines inside an AUTH exchange.
    pub fn take_logged(&mut self) -> Option<Logged> {
        self.logged.take()
    }

    /// The user that logged in, if one did.
    pub fn auth_user(&self) -> Option<&str> {
        self.auth_user.as_deref()
    }

    /// The name the client gave in its last HELO or EHLO.
    pub fn helo(&self) -> Option<&str> {
        self.helo.as_deref()
    }

    /// The session runs over TLS.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// The shell's answer to [`Action::Message`]; ends the transaction.
    pub fn message_stored(&mut self, result: Result<MessageId, StoreFailure>) -> Reply {
        if !matches!(self.state, State::AwaitStore) {
            return bad_sequence("No message waiting to be stored");
        }
        self.state = State::Command;
        self.transaction = None;
        match result {
            Ok(id) => {
                self.junk = 0;
                reply(250, 2, 0, 0, format!("Ok: queued as {id}"))
            }
            Err(StoreFailure::Unavailable) => {
                self.errors += 1;
                reply(451, 4, 3, 0, "Temporary failure, please try again later")
            }
            Err(StoreFailure::OverQuota { retry_after_secs }) => {
                self.errors += 1;
                reply(
                    450,
                    4,
                    7,
                    1,
                    format!("Sending quota reached, try again in {retry_after_secs} s"),
                )
            }
        }
    }

    fn close(&mut self, r: Reply) -> Action {
        self.state = State::Closed;
        self.input.clear();
        self.tail_len = 0;
        Action::Close(r)
    }

    /// Every reply to a command goes through here so errors are counted.
    fn answer(&mut self, r: Reply) -> Action {
        if r.code >= 400 {
            self.errors += 1;
        }
        Action::Reply(r)
    }

    fn command(&mut self, line: &[u8]) -> Action {
        let parsed = command::parse(line);
        let verb = match &parsed {
            Ok(c) => Some(c.verb()),
            Err(e) => e.verb(),
        };
        self.logged = Some(logged(line, matches!(parsed, Ok(Command::Auth { .. }))));
        let exempt = matches!(
            verb,
            None | Some(
                Verb::Ehlo | Verb::Helo | Verb::StartTls | Verb::Noop | Verb::Rset | Verb::Quit
            )
        );
        if self.config.require_tls && !self.tls && !exempt {
            return self.answer(reply(530, 5, 7, 0, "Must issue a STARTTLS command first"));
        }
        let cmd = match parsed {
            Ok(cmd) => cmd,
            Err(e) => return self.answer(command_error_reply(&e)),
        };
        if matches!(
            cmd,
            Command::Noop | Command::Rset | Command::Vrfy(_) | Command::Help
        ) {
            // Commands that move no mail: past the limit each is an error,
            // so a client cannot hold its slot with them for ever.
            self.junk += 1;
            if self.junk > self.config.junk_command_limit {
                self.errors += 1;
            }
        }
        match cmd {
            Command::Helo(name) => self.hello(name, false),
            Command::Ehlo(name) => self.hello(name, true),
            Command::Mail { sender, params } => {
                let r = self.mail(sender.map(|s| (s.mailbox, s.smtputf8)), params);
                self.answer(r)
            }
            Command::Rcpt { recipient, params } => {
                let r = self.rcpt(recipient, params);
                self.answer(r)
            }
            Command::Data => self.data(),
            Command::Rset => {
                self.transaction = None;
                self.answer(reply(250, 2, 0, 0, "Ok"))
            }
            Command::Noop => self.answer(reply(250, 2, 0, 0, "Ok")),
            Command::Help => self.answer(reply(214, 2, 0, 0, "See RFC 5321")),
            Command::Vrfy(_) => self.answer(reply(
                252,
                2,
                5,
                0,
                "Cannot VRFY user, but will accept message and attempt delivery",
            )),
            Command::Expn(_) => self.answer(reply(502, 5, 5, 1, "EXPN not available")),
            Command::Quit => self.close(reply(221, 2, 0, 0, "Bye")),
            Command::StartTls => self.starttls(),
            Command::Auth {
                mechanism,
                initial_response,
            } => self.auth(&mechanism, initial_response.as_deref()),
        }
    }

    fn hello(&mut self, name: String, esmtp: bool) -> Action {
        self.transaction = None;
        self.helo = Some(name);
        self.esmtp = esmtp;
        let host = self.config.hostname.clone();
        if !esmtp {
            return self.answer(reply(250, 2, 0, 0, host));
        }
        let mut lines = vec![
            host,
            "PIPELINING".to_string(),
            format!("SIZE {}", self.config.max_message_size),
            "8BITMIME".to_string(),
            "SMTPUTF8".to_string(),
            "ENHANCEDSTATUSCODES".to_string(),
            "DSN".to_string(),
        ];
        if self.config.tls_available && !self.tls {
            lines.push("STARTTLS".to_string());
        }
        if self.auth_offered() {
            lines.push("AUTH PLAIN LOGIN".to_string());
        }
        Action::Reply(Reply::plain(250, lines))
    }

    fn auth_offered(&self) -> bool {
        self.config.auth_available && (self.tls || self.config.allow_plaintext_auth)
    }

    fn mail(&mut self, sender: Option<(Mailbox, bool)>, params: command::MailParams) -> Reply {
        if self.helo.is_none() {
            return bad_sequence("Send HELO/EHLO first");
        }
        if self.transaction.is_some() {
            return bad_sequence("Nested MAIL command");
        }
        if self.session_bytes > self.config.max_session_size {
            return reply(552, 5, 3, 4, "Session size limit exceeded");
        }
        if params.body == Some(BodyType::BinaryMime) {
            return reply(
                555,
                5,
                5,
                4,
                "BODY=BINARYMIME needs CHUNKING, which is not offered",
            );
        }
        if params
            .size
            .is_some_and(|s| s > self.config.max_message_size)
        {
            return reply(
                552,
                5,
                3,
                4,
                "Message size exceeds fixed maximum message size",
            );
        }
        if sender.as_ref().is_some_and(|(_, utf8)| *utf8) && !params.smtputf8 {
            return reply(553, 5, 6, 7, "Address needs SMTPUTF8");
        }
        if let Some(rules) = &self.sender_rules {
            let allowed = sender
                .as_ref()
                .is_some_and(|(mailbox, _)| rules.iter().any(|rule| rule.allows(mailbox)));
            if !allowed {
                let who = sender
                    .as_ref()
                    .map(|(m, _)| m.to_string())
                    .unwrap_or_default();
                return reply(
                    550,
                    5,
                    7,
                    1,
                    format!("Sender <{who}> not allowed for this user"),
                );
            }
        }
        self.declared_size = params.size;
        self.transaction = Some(Envelope {
            sender: sender.map(|(m, _)| m),
            recipients: Vec::new(),
            body: params.body.unwrap_or_default(),
            smtputf8: params.smtputf8,
            ret: params.ret,
            envid: params.envid,
        });
        reply(250, 2, 1, 0, "Ok")
    }

    fn rcpt(&mut self, path: Path, params: command::RcptParams) -> Reply {
        let Some(envelope) = &self.transaction else {
            return bad_sequence("Need MAIL command first");
        };
        let (address, smtputf8, check_relay) = match path {
            Path::Postmaster => match self.postmaster() {
                Ok(postmaster) => (postmaster, false, false),
                Err(refusal) => return refusal,
            },
            Path::Mailbox(p) if self.is_our_postmaster(&p.mailbox) => match self.postmaster() {
                Ok(postmaster) => (postmaster, false, false),
                Err(refusal) => return refusal,
            },
            Path::Mailbox(p) => (p.mailbox, p.smtputf8, true),
            Path::Null => return reply(501, 5, 1, 3, "Bad recipient address syntax"),
        };
        if smtputf8 && !envelope.smtputf8 {
            return reply(553, 5, 6, 7, "Address needs SMTPUTF8");
        }
        if envelope.recipients.len() >= self.config.max_recipients {
            return reply(452, 4, 5, 3, "Too many recipients");
        }
        if check_relay && !self.may_relay_to(&address) {
            return reply(550, 5, 7, 1, "Relaying denied");
        }
        if let Some(envelope) = &mut self.transaction {
            envelope.recipients.push(Recipient {
                address,
                notify: params.notify,
                orcpt: params.orcpt,
            });
        }
        reply(250, 2, 1, 5, "Ok")
    }

    /// `postmaster@<our hostname>`, in any case: the same mailbox as the
    /// bare `postmaster`, which must never be relayed to another host.
    fn is_our_postmaster(&self, mailbox: &Mailbox) -> bool {
        mailbox.local_part.eq_ignore_ascii_case("postmaster")
            && mailbox.domain.eq_ignore_ascii_case(&self.config.hostname)
    }

    /// The mailbox that takes mail for this host's postmaster: the
    /// configured one, else `postmaster@<hostname>` when the hostname is a
    /// local domain (delivered there), else none (`550 5.1.1`). Mail to it
    /// is taken from anyone, without relay rights: its destination is the
    /// operator's choice, not the client's.
    fn postmaster(&self) -> Result<Mailbox, Reply> {
        if let Some(postmaster) = &self.config.postmaster {
            return Ok(postmaster.clone());
        }
        let hostname = self.config.hostname.to_ascii_lowercase();
        if self.config.local_domains.contains(&hostname) {
            return Ok(Mailbox {
                local_part: "postmaster".to_string(),
                domain: hostname,
            });
        }
        Err(reply(
            550,
            5,
            1,
            1,
            "No postmaster mailbox is configured on this host",
        ))
    }

    /// Local domains take mail from anyone; everything else needs a trusted
    /// peer or a login. The old relay tricks through a local domain
    /// (`user%remote@local`, `remote!user@local`, `"user@remote"@local`)
    /// count as relaying; a source route was already cut down to its final
    /// mailbox, so it is judged by where it really goes.
    fn may_relay_to(&self, mailbox: &Mailbox) -> bool {
        if self.peer.relay_allowed || self.auth_user.is_some() {
            return true;
        }
        let local = self
            .config
            .local_domains
            .iter()
            .any(|d| d.eq_ignore_ascii_case(&mailbox.domain));
        local && !mailbox.local_part.contains(['%', '!', '@'])
    }

    fn data(&mut self) -> Action {
        match &self.transaction {
            None => self.answer(bad_sequence("Need MAIL command first")),
            Some(e) if e.recipients.is_empty() => {
                self.answer(reply(554, 5, 5, 1, "No valid recipients"))
            }
            Some(_) => {
                self.state = State::AwaitBody;
                Action::ReserveBody {
                    declared: self.declared_size,
                }
            }
        }
    }

    fn end_of_data(&mut self) -> Action {
        let State::Data(reader) = std::mem::replace(&mut self.state, State::Command) else {
            unreachable!("end_of_data is only called in the DATA state");
        };
        let envelope = self.transaction.take().unwrap_or_default();
        self.session_bytes = self.session_bytes.saturating_add(reader.size());
        self.logged = Some(Logged {
            verb: "DATA".into(),
            args: String::new(),
            bytes: reader.size(),
        });
        let data = match reader.finish() {
            Ok(data) => data,
            Err(DataError::BareLineEnding) => {
                return self.answer(reply(554, 5, 6, 0, "Bare CR or LF in message data"))
            }
            Err(DataError::Nul) => {
                return self.answer(reply(554, 5, 6, 0, "Message contains NUL characters"))
            }
            Err(DataError::LineTooLong) => {
                return self.answer(reply(500, 5, 5, 2, "Line too long"))
            }
            Err(DataError::TooBig) => {
                return self.answer(reply(
                    552,
                    5,
                    3,
                    4,
                    "Message size exceeds fixed maximum message size",
                ))
            }
            Err(DataError::OverBudget) => return self.answer(insufficient_storage()),
        };
        if data.received_headers > self.config.max_hop_count {
            return self.answer(reply(554, 5, 4, 6, "Too many hops (mail loop?)"));
        }
        if self.session_bytes > self.config.max_session_size {
            return self.answer(reply(552, 5, 3, 4, "Session size limit exceeded"));
        }
        self.state = State::AwaitStore;
        Action::Message(IncomingMessage {
            envelope,
            helo: self.helo.clone().unwrap_or_default(),
            auth_user: self.auth_user.clone(),
            tls: self.tls,
            data: data.body,
        })
    }

    fn starttls(&mut self) -> Action {
        if self.tls {
            return self.answer(bad_sequence("TLS already active"));
        }
        if !self.config.tls_available {
            return self.answer(reply(454, 4, 7, 0, "TLS not available"));
        }
        self.state = State::AwaitTls;
        self.input.clear();
        self.tail_len = 0;
        Action::StartTls(reply(220, 2, 0, 0, "Ready to start TLS"))
    }

    fn auth(&mut self, mechanism: &str, initial: Option<&str>) -> Action {
        if self.auth_user.is_some() {
            return self.answer(bad_sequence("Already authenticated"));
        }
        if !self.config.auth_available || !self.esmtp {
            return self.answer(bad_sequence("AUTH not available"));
        }
        if !self.auth_offered() {
            return self.answer(reply(
                538,
                5,
                7,
                11,
                "Encryption required for requested authentication mechanism",
            ));
        }
        if self.transaction.is_some() {
            return self.answer(bad_sequence("AUTH not allowed during a mail transaction"));
        }
        match (mechanism, initial) {
            ("PLAIN", Some(ir)) => self.auth_plain_response(ir.as_bytes()),
            ("PLAIN", None) => {
                self.state = State::AuthPlain;
                Action::Reply(Reply::plain(334, vec![String::new()]))
            }
            ("LOGIN", Some(ir)) => self.auth_login_user(ir.as_bytes()),
            ("LOGIN", None) => {
                self.state = State::AuthLoginUser;
                Action::Reply(Reply::plain(334, vec!["VXNlcm5hbWU6".to_string()]))
            }
            _ => self.answer(reply(504, 5, 5, 4, "Unrecognized authentication mechanism")),
        }
    }

    /// Decodes one SASL response line; `*` cancels the exchange.
    fn sasl_decode(line: &[u8]) -> Result<Vec<u8>, Reply> {
        let line = line.trim_ascii();
        if line == b"*" {
            return Err(reply(501, 5, 0, 0, "Authentication cancelled"));
        }
        if line.is_empty() || line == b"=" {
            return Ok(Vec::new());
        }
        BASE64
            .decode(line)
            .map_err(|_| reply(501, 5, 5, 2, "Invalid base64 data"))
    }

    fn auth_plain_response(&mut self, line: &[u8]) -> Action {
        let decoded = match Self::sasl_decode(line) {
            Ok(d) => d,
            Err(r) => return self.answer(r),
        };
        let parts: Vec<&[u8]> = decoded.split(|b| *b == 0).collect();
        let (authzid, user, pass) = match parts.as_slice() {
            [z, u, p] => match (
                std::str::from_utf8(z),
                std::str::from_utf8(u),
                std::str::from_utf8(p),
            ) {
                (Ok(z), Ok(u), Ok(p)) if !u.is_empty() => (z, u, p),
                _ => return self.answer(reply(501, 5, 5, 2, "Malformed PLAIN response")),
            },
            _ => return self.answer(reply(501, 5, 5, 2, "Malformed PLAIN response")),
        };
        // Acting for someone else is not supported.
        if !authzid.is_empty() && authzid != user {
            return self.answer(reply(535, 5, 7, 8, "Authentication credentials invalid"));
        }
        self.authenticate(user.to_string(), pass.to_string())
    }

    fn auth_login_user(&mut self, line: &[u8]) -> Action {
        let decoded = match Self::sasl_decode(line) {
            Ok(d) => d,
            Err(r) => return self.answer(r),
        };
        match String::from_utf8(decoded) {
            Ok(user) if !user.is_empty() => {
                self.state = State::AuthLoginPass(user);
                Action::Reply(Reply::plain(334, vec!["UGFzc3dvcmQ6".to_string()]))
            }
            _ => self.answer(reply(501, 5, 5, 2, "Malformed LOGIN response")),
        }
    }

    fn auth_login_pass(&mut self, user: String, line: &[u8]) -> Action {
        let decoded = match Self::sasl_decode(line) {
            Ok(d) => d,
            Err(r) => return self.answer(r),
        };
        match String::from_utf8(decoded) {
            Ok(pass) => self.authenticate(user, pass),
            Err(_) => self.answer(reply(501, 5, 5, 2, "Malformed LOGIN response")),
        }
    }

    fn authenticate(&mut self, username: String, password: String) -> Action {
        self.state = State::AwaitAuth(username.clone());
        Action::Authenticate { username, password }
    }
}

/// `452 4.3.1`: the node has no memory left for message bodies now.
fn insufficient_storage() -> Reply {
    reply(452, 4, 3, 1, "Insufficient system storage")
}

fn command_error_reply(e: &CommandError) -> Reply {
    match e {
        CommandError::UnknownVerb => reply(500, 5, 5, 1, "Command unrecognized"),
        CommandError::Syntax(_) => reply(501, 5, 5, 4, "Syntax error in parameters or arguments"),
        CommandError::BadSender(err) => {
            reply(501, 5, 1, 7, format!("Bad sender address syntax: {err}"))
        }
        CommandError::BadRecipient(err) => {
            reply(501, 5, 1, 3, format!("Bad recipient address syntax: {err}"))
        }
        CommandError::Param(_, ParamError::Unknown(name)) => {
            reply(555, 5, 5, 4, format!("Unsupported parameter {name}"))
        }
        CommandError::Param(_, err) => reply(501, 5, 5, 4, err.to_string()),
    }
}

#[cfg(test)]
mod tests;
