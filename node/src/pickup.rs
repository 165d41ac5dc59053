//! The pickup directory (`[pickup] dir`): applications that cannot speak
//! SMTP drop a whole message as a `.eml` file and the node queues it, as
//! the IIS SMTP Service did.
//!
//! The envelope comes from `X-Sender:` / `X-Receiver:` lines at the top of
//! the file (the IIS form; they are taken out of the message) or else from
//! the headers, as the send API reads a raw message ([`from_raw`]). A file
//! that cannot be queued (no recipient, a bad address, NUL octets, a line
//! longer than SMTP allows, too large) goes to badmail with its reason
//! ([`crate::badmail`]).
//!
//! Writers should write `name.tmp` and rename it to `name.eml` when done;
//! a file modified in the last [`SETTLE`] is left for a later pass anyway.
//! Several nodes may watch one directory: a node claims a file by renaming
//! it into `.taking/<node id>/` first, so one node takes it, and takes what
//! it had claimed again after a restart. The file is removed only once the
//! queue has the message durably; when the queue fails it goes back in
//! place for the next pass (at-least-once, as for SMTP).

use std::io::Read as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use smarthost_proto::address::{parse_forward_path, parse_reverse_path, Mailbox, Path as SmtpPath};
use smarthost_proto::envelope::{ClientInfo, Envelope, MessageId};
use smarthost_proto::{data, received};

use crate::badmail::{Badmail, KeptEnvelope, Note, Source};
use crate::compose::{crlf, fault, from_raw, ComposeError};
use crate::queue::Enqueue;
use crate::spool::Body;

/// Look at the directory now (the actor sends it to itself).
#[derive(Message)]
#[rtype(result = "()")]
struct Poll;

/// Start no further pass: the node is shutting down. A pass under way
/// finishes its file.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopPolling;

/// A file younger than this may still be written to.
pub const SETTLE: Duration = Duration::from_secs(1);

/// Files taken per pass, so that a directory of 100 000 files does not
/// hold the node; a full pass is followed by the next at once.
pub const MAX_FILES_PER_PASS: usize = 100;

/// Directory entries looked at per pass, young and foreign files included.
const MAX_SCANNED_PER_PASS: usize = 10 * MAX_FILES_PER_PASS;

/// Where claimed files wait while they are taken.
pub const CLAIMED_DIR: &str = ".taking";

// ---------------------------------------------------------------------
// The pure part: what a file says.

/// A pickup file read: the envelope and the message to queue (CRLF line
/// ends, without the `X-Sender`/`X-Receiver` lines).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Picked {
    /// `None`: `X-Sender: <>`.
    pub sender: Option<Mailbox>,
    pub recipients: Vec<Mailbox>,
    pub message: Vec<u8>,
}

/// Reads a pickup file. `hostname`, `now_secs` and `unique` are what
/// [`from_raw`] adds a `Date` and `Message-ID` with, when the envelope
/// comes from the headers.
pub fn parse_pickup(
    raw: &[u8],
    hostname: &str,
    now_secs: u64,
    unique: &str,
) -> Result<Picked, ComposeError> {
    if raw.contains(&0) {
        return Err(fault("message", "NUL octets are not allowed"));
    }
    // Line ends as they will be queued (CR, LF or CRLF), so the number is
    // the line in the file.
    let raw = &crlf(raw);
    if let Some(line) = data::first_long_line(raw) {
        return Err(fault(
            "message",
            format!(
                "line {line} is longer than {} octets",
                data::MAX_DATA_LINE - 2
            ),
        ));
    }
    match iis_envelope(raw)? {
        Some(IisEnvelope {
            sender,
            recipients,
            message_at,
        }) => {
            let message = crlf(&raw[message_at..]);
            if message.iter().all(u8::is_ascii_whitespace) {
                return Err(fault("message", "no message after the X-Receiver lines"));
            }
            Ok(Picked {
                sender,
                recipients,
                message,
            })
        }
        None => {
            let composed = from_raw(raw, hostname, now_secs, unique)?;
            Ok(Picked {
                sender: Some(composed.sender),
                recipients: composed.recipients,
                message: composed.message,
            })
        }
    }
}

/// The envelope lines at the top of a file in the IIS form.
struct IisEnvelope {
    sender: Option<Mailbox>,
    recipients: Vec<Mailbox>,
    /// Where the message starts, after the lines.
    message_at: usize,
}

/// The IIS envelope at the top of `raw`: one `X-Sender:` and one or more
/// `X-Receiver:` lines, in any order, before the message. `None` when
/// the first line is neither.
fn iis_envelope(raw: &[u8]) -> Result<Option<IisEnvelope>, ComposeError> {
    let mut senders: Vec<Option<Mailbox>> = Vec::new();
    let mut recipients: Vec<Mailbox> = Vec::new();
    let mut receivers = 0;
    let mut at = 0;
    while at < raw.len() {
        let end = raw[at..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(raw.len(), |i| at + i + 1);
        let line = String::from_utf8_lossy(&raw[at..end]);
        let Some((name, value)) = line.split_once(':') else {
            break;
        };
        let value = value.trim();
        let path = if value.starts_with('<') {
            value.to_string()
        } else {
            format!("<{value}>")
        };
        if name.eq_ignore_ascii_case("x-sender") {
            let sender = parse_reverse_path(&path)
                .map_err(|e| fault("X-Sender", format!("{e}: {value:?}")))?;
            senders.push(sender.map(|s| s.mailbox));
        } else if name.eq_ignore_ascii_case("x-receiver") {
            let field = format!("X-Receiver[{receivers}]");
            receivers += 1;
            let mailbox = match parse_forward_path(&path) {
                Ok(SmtpPath::Mailbox(m)) => m.mailbox,
                Ok(_) => return Err(fault(field, format!("needs a domain: {value:?}"))),
                Err(e) => return Err(fault(field, format!("{e}: {value:?}"))),
            };
            if !recipients.contains(&mailbox) {
                recipients.push(mailbox);
            }
        } else {
            break;
        }
        at = end;
    }
    if senders.is_empty() && receivers == 0 {
        return Ok(None);
    }
    let sender = match senders.len() {
        1 => senders.pop().expect("one"),
        0 => {
            return Err(fault(
                "X-Sender",
                "an X-Sender line is required with X-Receiver",
            ))
        }
        n => {
            return Err(fault(
                "X-Sender",
                format!("{n} X-Sender lines; one is allowed"),
            ))
        }
    };
    if recipients.is_empty() {
        return Err(fault(
            "X-Receiver",
            "at least one X-Receiver line is required",
        ));
    }
    Ok(Some(IisEnvelope {
        sender,
        recipients,
        message_at: at,
    }))
}

/// Whether a file called `name` is one to take: `*.eml` in any case, not
/// hidden.
pub fn is_pickup_name(name: &str) -> bool {
    !name.starts_with('.')
        && name.len() > 4
        && name.is_char_boundary(name.len() - 4)
        && name[name.len() - 4..].eq_ignore_ascii_case(".eml")
}

/// `node.id` as a directory name: anything but letters, digits, `-`, `_`
/// and `.` made `_`, so an id cannot name another path.
pub fn claim_dir_name(node_id: &str) -> String {
    let name: String = node_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    match name.trim_matches('.') {
        "" => "_".to_string(),
        _ => name,
    }
}

// ---------------------------------------------------------------------
// Queueing a whole message, for a pickup file and for a badmail replay.

/// Why a message was not queued.
#[derive(Debug)]
pub enum Refused {
    /// It never will be as it is: badmail, with this reason.
    Bad {
        reason: String,
        envelope: Option<KeptEnvelope>,
    },
    /// The queue cannot take it now: try again later.
    Unavailable,
}

/// Queues whole messages as SMTP does: a `Received:` line, the limits of
/// `[smtp]`, [`crate::submit::enqueue`].
pub struct Intake {
    pub queue: Recipient<Enqueue>,
    pub hostname: String,
    pub max_message_size: u64,
    pub max_recipients: usize,
    /// `smtp.max_hop_count`: more `Received:` fields is a loop.
    pub max_hop_count: usize,
    pub webhooks: crate::webhooks::Webhooks,
}

impl Intake {
    /// Reads `raw` as a pickup file and queues it; answers once the spool
    /// has it.
    pub async fn queue_file(&self, raw: &[u8]) -> Result<MessageId, Refused> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let id = MessageId::new(now.as_millis() as u64, rand::random());
        let picked =
            parse_pickup(raw, &self.hostname, now.as_secs(), &id.to_string()).map_err(|e| {
                Refused::Bad {
                    reason: e.to_string(),
                    envelope: None,
                }
            })?;
        let bad = |reason: String, picked: &Picked| Refused::Bad {
            reason,
            envelope: Some(KeptEnvelope {
                sender: smarthost_proto::envelope::sender_key(picked.sender.as_ref()),
                recipients: picked.recipients.iter().map(ToString::to_string).collect(),
            }),
        };
        let hops = data::received_fields(&picked.message);
        if hops > self.max_hop_count {
            return Err(bad(
                format!(
                    "{hops} Received: fields, more than smtp.max_hop_count ({}): a mail loop?",
                    self.max_hop_count
                ),
                &picked,
            ));
        }
        if picked.recipients.len() > self.max_recipients {
            return Err(bad(
                format!(
                    "{} recipients, more than smtp.max_recipients ({})",
                    picked.recipients.len(),
                    self.max_recipients
                ),
                &picked,
            ));
        }
        let for_rcpt = match picked.recipients.as_slice() {
            [only] => Some(only),
            _ => None,
        };
        let mut body = received::received_header(
            &self.hostname,
            "pickup",
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            "pickup",
            &id,
            for_rcpt,
            now.as_secs(),
        )
        .into_bytes();
        body.extend_from_slice(&picked.message);
        if body.len() as u64 > self.max_message_size {
            return Err(bad(
                too_large(body.len() as u64, self.max_message_size),
                &picked,
            ));
        }
        let envelope = crate::submit::envelope_of(picked.sender, picked.recipients, &body);
        self.queue(id, now, envelope, body).await
    }

    /// Queues `body` as it is, with `envelope`: a message replayed whole.
    pub async fn queue_as_is(
        &self,
        envelope: Envelope,
        body: Vec<u8>,
    ) -> Result<MessageId, Refused> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let id = MessageId::new(now.as_millis() as u64, rand::random());
        self.queue(id, now, envelope, body).await
    }

    async fn queue(
        &self,
        id: MessageId,
        now: Duration,
        envelope: Envelope,
        body: Vec<u8>,
    ) -> Result<MessageId, Refused> {
        let client = ClientInfo {
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            helo: "pickup".into(),
            auth_user: None,
            tls: false,
        };
        crate::submit::enqueue(
            &self.queue,
            &self.webhooks,
            id,
            now.as_millis() as u64,
            client,
            envelope,
            Body::from(body),
            Instant::now(),
        )
        .await
        .map_err(|_| Refused::Unavailable)
    }
}

fn too_large(size: u64, max: u64) -> String {
    format!("{size} octets, more than smtp.max_message_size ({max})")
}

// ---------------------------------------------------------------------
// The actor: polls the directory.

/// What the passes work with.
pub struct PickupEnv {
    pub dir: PathBuf,
    /// `.taking/<node id>` in `dir`: this node's claimed files.
    pub claimed: PathBuf,
    pub intake: Arc<Intake>,
    pub badmail: Arc<Badmail>,
}

impl PickupEnv {
    /// Makes the directory and this node's claim directory.
    pub fn new(
        dir: &Path,
        node_id: &str,
        intake: Arc<Intake>,
        badmail: Arc<Badmail>,
    ) -> std::io::Result<PickupEnv> {
        let claimed = dir.join(CLAIMED_DIR).join(claim_dir_name(node_id));
        std::fs::create_dir_all(&claimed)?;
        Ok(PickupEnv {
            dir: dir.to_path_buf(),
            claimed,
            intake,
            badmail,
        })
    }
}

/// The Pickup actor: one pass over the directory every `poll_interval`.
pub struct Pickup {
    env: Arc<PickupEnv>,
    interval: Duration,
    stopped: bool,
}

impl Pickup {
    pub fn new(env: PickupEnv, interval: Duration) -> Self {
        Pickup {
            env: Arc::new(env),
            interval,
            stopped: false,
        }
    }
}

impl Actor for Pickup {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        tracing::info!(dir = %self.env.dir.display(), "watching the pickup directory");
        ctx.notify(Poll);
    }
}

impl Handler<Poll> for Pickup {
    type Result = ResponseActFuture<Self, ()>;

    /// One pass; the next follows at once when this one was full, else
    /// after the interval.
    fn handle(&mut self, _: Poll, _: &mut Context<Self>) -> Self::Result {
        let env = self.env.clone();
        Box::pin(pass(env).into_actor(self).map(|full, pickup, ctx| {
            if !pickup.stopped {
                let wait = if full {
                    Duration::ZERO
                } else {
                    pickup.interval
                };
                ctx.notify_later(Poll, wait);
            }
        }))
    }
}

impl Handler<StopPolling> for Pickup {
    type Result = ();

    fn handle(&mut self, _: StopPolling, _: &mut Context<Self>) {
        self.stopped = true;
    }
}

/// A file to take: already claimed (left from an earlier pass or
/// process), or one to claim.
#[derive(Debug, PartialEq, Eq)]
enum Candidate {
    Claimed(String),
    InPlace(String),
}

/// One pass: this node's claimed files, then settled `.eml` files of the
/// directory, at most [`MAX_FILES_PER_PASS`] in all. Answers whether it
/// was full. Stops early when the queue fails.
async fn pass(env: Arc<PickupEnv>) -> bool {
    let scan = env.clone();
    let found = tokio::task::spawn_blocking(move || candidates(&scan.dir, &scan.claimed)).await;
    let candidates = match found {
        Ok(Ok(candidates)) => candidates,
        Ok(Err(error)) => {
            tracing::warn!(dir = %env.dir.display(), %error, "cannot read the pickup directory");
            return false;
        }
        Err(_) => return false,
    };
    let full = candidates.len() >= MAX_FILES_PER_PASS;
    for candidate in candidates {
        if !take(&env, candidate).await {
            return false;
        }
    }
    full
}

/// What to take this pass from `dir`, this node's `claimed` files first.
fn candidates(dir: &Path, claimed: &Path) -> std::io::Result<Vec<Candidate>> {
    let mut out = Vec::new();
    for item in std::fs::read_dir(claimed)? {
        if out.len() >= MAX_FILES_PER_PASS {
            return Ok(out);
        }
        if let Some(name) = item?.file_name().to_str() {
            out.push(Candidate::Claimed(name.to_string()));
        }
    }
    let settled = SystemTime::now() - SETTLE;
    for item in std::fs::read_dir(dir)?.take(MAX_SCANNED_PER_PASS) {
        if out.len() >= MAX_FILES_PER_PASS {
            break;
        }
        let item = item?;
        let Some(name) = item.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if !is_pickup_name(&name) {
            continue;
        }
        // Not followed: a symbolic link is not a file of the directory.
        let Ok(meta) = item.metadata() else { continue };
        if meta.is_file() && meta.modified().is_ok_and(|at| at <= settled) {
            out.push(Candidate::InPlace(name));
        }
    }
    Ok(out)
}

/// Takes one file; `false` when the queue failed and the pass should end.
async fn take(env: &Arc<PickupEnv>, candidate: Candidate) -> bool {
    let claim = env.clone();
    let read = tokio::task::spawn_blocking(move || claim_and_read(&claim, candidate)).await;
    let (name, raw) = match read {
        Ok(Claimed::Read { name, raw }) => (name, raw),
        Ok(Claimed::Bad { name, reason }) => {
            to_badmail(env, name, reason, None).await;
            return true;
        }
        Ok(Claimed::Skipped) | Err(_) => return true,
    };
    match env.intake.queue_file(&raw).await {
        Ok(id) => {
            let path = env.claimed.join(&name);
            let removed = tokio::task::spawn_blocking(move || std::fs::remove_file(path)).await;
            match removed {
                Ok(Ok(())) => tracing::info!(file = %name, message_id = %id, "pickup file queued"),
                Ok(Err(error)) => tracing::error!(file = %name, message_id = %id, %error,
                    "pickup file queued but not removed; it will be queued again"),
                Err(_) => {}
            }
            true
        }
        Err(Refused::Bad { reason, envelope }) => {
            to_badmail(env, name, reason, envelope).await;
            true
        }
        Err(Refused::Unavailable) => {
            let back = env.clone();
            let _ = tokio::task::spawn_blocking(move || put_back(&back, &name)).await;
            false
        }
    }
}

/// What claiming and reading a file gave.
enum Claimed {
    Read {
        name: String,
        raw: Vec<u8>,
    },
    /// For badmail, with why.
    Bad {
        name: String,
        reason: String,
    },
    /// Another node took it, or it is not a regular file.
    Skipped,
}

/// Claims the file if it is not yet, and reads it.
fn claim_and_read(env: &PickupEnv, candidate: Candidate) -> Claimed {
    let name = match candidate {
        Candidate::Claimed(name) => name,
        Candidate::InPlace(name) => {
            let target = env.claimed.join(&name);
            if target.exists() {
                // The same name is still claimed from before: that first.
                return Claimed::Skipped;
            }
            match std::fs::rename(env.dir.join(&name), &target) {
                Ok(()) => name,
                // Another node was first.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Claimed::Skipped,
                Err(error) => {
                    tracing::warn!(file = %name, %error, "cannot claim a pickup file");
                    return Claimed::Skipped;
                }
            }
        }
    };
    let path = env.claimed.join(&name);
    let max = env.intake.max_message_size;
    let read = (|| {
        let file = std::fs::File::open(&path)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Ok(None);
        }
        if meta.len() > max {
            return Ok(Some(Err(too_large(meta.len(), max))));
        }
        let mut raw = Vec::with_capacity(meta.len() as usize);
        file.take(max + 1).read_to_end(&mut raw)?;
        if raw.len() as u64 > max {
            return Ok(Some(Err(too_large(raw.len() as u64, max))));
        }
        Ok::<_, std::io::Error>(Some(Ok(raw)))
    })();
    match read {
        Ok(Some(Ok(raw))) => Claimed::Read { name, raw },
        Ok(Some(Err(reason))) => Claimed::Bad { name, reason },
        Ok(None) => Claimed::Skipped,
        Err(e) => Claimed::Bad {
            name,
            reason: format!("cannot read the file: {e}"),
        },
    }
}

/// Keeps a claimed file in badmail; one that cannot be kept stays claimed
/// and is tried again next pass.
async fn to_badmail(
    env: &Arc<PickupEnv>,
    name: String,
    reason: String,
    envelope: Option<KeptEnvelope>,
) {
    let keep = env.clone();
    let note = Note {
        source: Source::Pickup,
        reason,
        file: Some(name.clone()),
        envelope,
    };
    let path = env.claimed.join(&name);
    match tokio::task::spawn_blocking(move || keep.badmail.keep_file(&path, note)).await {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => {
            tracing::error!(file = %name, %error, "cannot move a bad pickup file to badmail")
        }
        Err(_) => {}
    }
}

/// Puts a claimed file back in the directory for any node's next pass;
/// if a new file took its name meanwhile it stays claimed.
fn put_back(env: &PickupEnv, name: &str) {
    let place = env.dir.join(name);
    if !place.exists() {
        if let Err(error) = std::fs::rename(env.claimed.join(name), &place) {
            tracing::warn!(file = %name, %error, "a claimed pickup file stays claimed");
        }
    }
    tracing::warn!(file = %name, "the queue did not take a pickup file; it is tried again");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addresses(mailboxes: &[Mailbox]) -> Vec<String> {
        mailboxes.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn iis_envelope_lines_give_the_envelope_and_leave_the_message() {
        // (file, sender, recipients, message as queued)
        type Case = (
            &'static [u8],
            Option<&'static str>,
            &'static [&'static str],
            &'static str,
        );
        let table: &[Case] = &[
            (
                b"X-Sender: app@shop.example\r\nX-Receiver: a@example.org\r\n\
                  Subject: hi\r\n\r\nbody\r\n",
                Some("app@shop.example"),
                &["a@example.org"],
                "Subject: hi\r\n\r\nbody\r\n",
            ),
            (
                // Any case, brackets or not, any order, LF line ends,
                // repeated recipients once.
                b"x-receiver: <B@Example.ORG>\nx-sender:<app@shop.example>\n\
                  X-RECEIVER: c@example.net\nx-receiver: B@example.org\nSubject: x\n\nbody\n",
                Some("app@shop.example"),
                &["B@example.org", "c@example.net"],
                "Subject: x\r\n\r\nbody\r\n",
            ),
            (
                b"X-Sender: <>\r\nX-Receiver: postmaster@example.org\r\n\r\nreport\r\n",
                None,
                &["postmaster@example.org"],
                "\r\nreport\r\n",
            ),
        ];
        for (i, (raw, sender, recipients, message)) in table.iter().enumerate() {
            let picked = parse_pickup(raw, "relay.test", 0, "u").unwrap();
            assert_eq!(
                picked.sender.as_ref().map(ToString::to_string).as_deref(),
                *sender,
                "case {i}"
            );
            assert_eq!(addresses(&picked.recipients), *recipients, "case {i}");
            assert_eq!(
                String::from_utf8(picked.message).unwrap(),
                *message,
                "case {i}"
            );
        }
    }

    #[test]
    fn without_envelope_lines_the_headers_give_it() {
        let raw = b"From: App <app@shop.example>\nTo: a@example.org\nBcc: hidden@example.org\n\
                    X-Sender: not at the top, a header\n\nbody\n";
        let picked = parse_pickup(raw, "relay.test", 1_700_000_000, "u1").unwrap();
        assert_eq!(picked.sender.unwrap().to_string(), "app@shop.example");
        assert_eq!(
            addresses(&picked.recipients),
            ["a@example.org", "hidden@example.org"]
        );
        let text = String::from_utf8(picked.message).unwrap();
        assert!(text.contains("Message-ID: <u1@relay.test>\r\n"), "{text}");
        assert!(!text.contains("hidden@"), "{text}");
        assert!(text.contains("X-Sender: not at the top"), "{text}");
    }

    #[test]
    fn bad_files_name_what_is_wrong() {
        let table: &[(&[u8], &str)] = &[
            (b"X-Sender: a@example.org\r\nSubject: x\r\n\r\nbody", "X-Receiver"),
            (b"X-Receiver: b@example.org\r\n\r\nbody", "X-Sender"),
            (
                b"X-Sender: a@example.org\r\nX-Sender: c@example.org\r\nX-Receiver: b@example.org\r\n\r\nx",
                "X-Sender",
            ),
            (b"X-Sender: a@\r\nX-Receiver: b@example.org\r\n\r\nx", "X-Sender"),
            (
                b"X-Sender: a@example.org\r\nX-Receiver: b@example.org\r\nX-Receiver: <>\r\n\r\nx",
                "X-Receiver[1]",
            ),
            (
                b"X-Sender: a@example.org\r\nX-Receiver: postmaster\r\n\r\nx",
                "X-Receiver[0]",
            ),
            (b"X-Sender: a@example.org\r\nX-Receiver: b@example.org\r\n", "message"),
            (b"X-Sender: a@example.org\r\nX-Receiver: b@example.org\r\n\r\nx\0", "message"),
            (b"From: a@example.org\r\nSubject: no one\r\n\r\nx", "To"),
            (b"To: b@example.org\r\n\r\nx", "From"),
            (b"From: a@example.org\r\nTo: b@\r\n\r\nx", "To[0]"),
            (b"", "message"),
        ];
        for (raw, field) in table {
            let error = parse_pickup(raw, "relay.test", 0, "u").unwrap_err();
            assert_eq!(
                error.field,
                *field,
                "{:?}: {error}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn a_line_longer_than_998_octets_is_named_by_its_number_in_the_file() {
        let line = |n: usize| "x".repeat(n);
        // 998 octets and a line end, in any form, pass.
        for end in ["\r\n", "\n", "\r"] {
            let raw = format!(
                "X-Sender: a@example.org{end}X-Receiver: b@example.org{end}{end}{}{end}",
                line(998)
            );
            assert!(
                parse_pickup(raw.as_bytes(), "relay.test", 0, "u").is_ok(),
                "{end:?}"
            );
        }
        for end in ["\r\n", "\n", "\r"] {
            let raw = format!(
                "From: a@example.org{end}To: b@example.org{end}{end}one{end}{}{end}three{end}",
                line(999)
            );
            let error = parse_pickup(raw.as_bytes(), "relay.test", 0, "u").unwrap_err();
            assert_eq!(
                error.to_string(),
                "message: line 5 is longer than 998 octets",
                "{end:?}"
            );
        }
        // The last line, without a line end, and in the envelope lines.
        let raw = format!(
            "X-Sender: a@example.org\nX-Receiver: b@example.org\n\n{}",
            line(1200)
        );
        assert_eq!(
            parse_pickup(raw.as_bytes(), "relay.test", 0, "u")
                .unwrap_err()
                .message,
            "line 4 is longer than 998 octets"
        );
        let raw = format!("X-Sender: {}@example.org\n\nx\n", line(990));
        assert_eq!(
            parse_pickup(raw.as_bytes(), "relay.test", 0, "u")
                .unwrap_err()
                .message,
            "line 1 is longer than 998 octets"
        );
    }

    #[test]
    fn a_pass_takes_claimed_files_first_settled_eml_files_only_and_a_bounded_number() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path();
        let claimed = dir.join(CLAIMED_DIR).join("node-1");
        std::fs::create_dir_all(&claimed).unwrap();
        let old = SystemTime::now() - Duration::from_secs(60);
        let write = |path: &Path, settled: bool| {
            std::fs::write(path, b"x").unwrap();
            if settled {
                let file = std::fs::File::options().write(true).open(path).unwrap();
                file.set_modified(old).unwrap();
            }
        };
        write(&claimed.join("left.eml"), true);
        write(&dir.join("ready.eml"), true);
        write(&dir.join("READY2.EML"), true);
        write(&dir.join("young.eml"), false);
        write(&dir.join("writing.eml.tmp"), true);
        write(&dir.join(".hidden.eml"), true);
        std::fs::create_dir(dir.join("folder.eml")).unwrap();
        std::os::unix::fs::symlink(dir.join("ready.eml"), dir.join("link.eml")).unwrap();
        let found = candidates(dir, &claimed).unwrap();
        assert_eq!(found[0], Candidate::Claimed("left.eml".into()));
        let mut rest: Vec<String> = found[1..]
            .iter()
            .map(|c| match c {
                Candidate::InPlace(name) => name.clone(),
                Candidate::Claimed(name) => panic!("claimed twice: {name}"),
            })
            .collect();
        rest.sort();
        assert_eq!(rest, ["READY2.EML", "ready.eml"]);

        for n in 0..MAX_FILES_PER_PASS + 20 {
            write(&dir.join(format!("bulk-{n}.eml")), true);
        }
        let found = candidates(dir, &claimed).unwrap();
        assert_eq!(found.len(), MAX_FILES_PER_PASS, "bounded");
        assert_eq!(found[0], Candidate::Claimed("left.eml".into()));
    }

    #[test]
    fn only_eml_files_are_taken_and_node_ids_stay_one_directory() {
        for yes in ["a.eml", "A.EML", "order 1.Eml", "x.y.eml"] {
            assert!(is_pickup_name(yes), "{yes}");
        }
        for no in [
            ".eml",
            ".a.eml",
            "a.eml.tmp",
            "a.tmp",
            "eml",
            "a.emlx",
            "aé.em",
        ] {
            assert!(!is_pickup_name(no), "{no}");
        }
        assert_eq!(claim_dir_name("node-1"), "node-1");
        assert_eq!(claim_dir_name("../../etc"), ".._.._etc");
        assert_eq!(claim_dir_name(".."), "_");
        assert_eq!(claim_dir_name("a/b c"), "a_b_c");
    }
}
