//! `POST /api/v1/send`: an application sends a message in one HTTP call,
//! as JSON parts the relay turns into MIME ([`crate::compose`]), with a key
//! of its own (`[[api.keys]]`) that names the senders it may use. The
//! message is queued like SMTP mail: the answer, with the queue id, comes
//! once the spool has it.

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher as _;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix::Recipient;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use smarthost_proto::address::{Mailbox, SenderRule};
use smarthost_proto::envelope::{ClientInfo, MessageId};
use smarthost_proto::received;

use crate::auth::{verify_password_in, Memory};
use crate::compose::{compose, from_raw, Attachment, Named, Parts};
use crate::config::ApiKey;
use crate::idempotency::{Answer, Claim, Idempotency};
use crate::queue::Enqueue;
use crate::quota::{Quota, Quotas};
use crate::spool::Body;
use crate::suppression::{address_key, Suppressions};

/// An application that may send.
#[derive(Clone, Debug)]
pub struct KeyHolder {
    pub name: String,
    pub senders: Vec<SenderRule>,
    /// Its sending quotas (none: no limit).
    pub quotas: Vec<Quota>,
}

impl KeyHolder {
    pub fn may_send_as(&self, sender: &Mailbox) -> bool {
        self.senders.iter().any(|rule| rule.allows(sender))
    }
}

/// The keys of `[[api.keys]]`: hashes only, as for operators.
pub struct ApiKeys {
    keys: Vec<(KeyHolder, String)>,
    /// Tokens that passed the argon2 check lately, by a keyed hash of the
    /// token (never the token itself), so that an application sending
    /// many messages pays the check once per [`TRUSTED_FOR`], not per send.
    trusted: std::sync::Mutex<HashMap<u64, (KeyHolder, Instant)>>,
    hasher: std::hash::RandomState,
}

/// How long a token that passed is taken without another argon2 check.
pub const TRUSTED_FOR: Duration = Duration::from_secs(300);

/// Tokens remembered at most: more keys than any configuration has.
const MAX_TRUSTED: usize = 1024;

impl ApiKeys {
    /// Keys that passed validation (a sender that does not parse is left
    /// out of its key's rules).
    pub fn new(keys: &[ApiKey]) -> ApiKeys {
        ApiKeys {
            keys: keys
                .iter()
                .map(|key| {
                    let holder = KeyHolder {
                        name: key.name.clone(),
                        senders: SenderRule::parse_list(&key.senders),
                        quotas: Quota::list(key.messages_per_minute, key.messages_per_day),
                    };
                    (holder, key.token_hash.clone())
                })
                .collect(),
            trusted: Default::default(),
            hasher: Default::default(),
        }
    }

    /// The holder of a token that passed within [`TRUSTED_FOR`], if any.
    pub fn trusted(&self, token: &str, now: Instant) -> Option<KeyHolder> {
        let tag = self.hasher.hash_one(token);
        let mut trusted = self.trusted.lock().expect("not poisoned");
        match trusted.get(&tag) {
            Some((holder, since)) if now.duration_since(*since) < TRUSTED_FOR => {
                Some(holder.clone())
            }
            Some(_) => {
                trusted.remove(&tag);
                None
            }
            None => None,
        }
    }

    /// Remembers that `token` passed the check as `holder`'s at `now`.
    pub fn trust(&self, token: &str, holder: &KeyHolder, now: Instant) {
        let tag = self.hasher.hash_one(token);
        let mut trusted = self.trusted.lock().expect("not poisoned");
        if trusted.len() >= MAX_TRUSTED {
            trusted.retain(|_, (_, since)| now.duration_since(*since) < TRUSTED_FOR);
            if trusted.len() >= MAX_TRUSTED {
                return;
            }
        }
        trusted.insert(tag, (holder.clone(), now));
    }

    /// The holder of this token. Every hash is checked, so the time taken
    /// does not tell which matched. Blocking.
    pub fn identify_in(&self, token: &str, memory: &mut Memory) -> Option<KeyHolder> {
        let mut found = None;
        for (holder, phc) in &self.keys {
            if verify_password_in(phc, token, memory) && found.is_none() {
                found = Some(holder.clone());
            }
        }
        found
    }
}

/// Lists names only, never the hashes.
impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.keys.iter().map(|(h, _)| h.name.as_str()).collect();
        f.debug_struct("ApiKeys").field("keys", &names).finish()
    }
}

/// What the send route needs.
#[derive(Clone)]
pub struct SendEnv {
    pub keys: Arc<ApiKeys>,
    pub queue: Recipient<Enqueue>,
    /// Where the `accepted` events go.
    pub webhooks: crate::webhooks::Webhooks,
    /// Where the keys' quotas are counted.
    pub quotas: Arc<dyn Quotas>,
    /// Where `Idempotency-Key`s are kept.
    pub idempotency: Arc<dyn Idempotency>,
    /// Addresses not to send to.
    pub suppressions: Arc<dyn Suppressions>,
    pub hostname: String,
    pub max_recipients: usize,
    pub max_message_size: u64,
}

/// An address as JSON: `"a@example.org"` or `{"name": "A", "email": "a@example.org"}`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Address {
    Plain(String),
    Named { name: Option<String>, email: String },
}

impl From<Address> for Named {
    fn from(address: Address) -> Named {
        match address {
            Address::Plain(email) => Named { name: None, email },
            Address::Named { name, email } => Named { name, email },
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AttachmentRequest {
    #[serde(default)]
    filename: String,
    content_type: String,
    /// Base64.
    content: String,
    #[serde(default)]
    content_id: Option<String>,
}

/// The JSON of a send.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SendRequest {
    from: Address,
    #[serde(default)]
    to: Vec<Address>,
    #[serde(default)]
    cc: Vec<Address>,
    #[serde(default)]
    bcc: Vec<Address>,
    #[serde(default)]
    reply_to: Option<Address>,
    #[serde(default)]
    subject: String,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    html: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    attachments: Vec<AttachmentRequest>,
}

/// Why a send is refused: the HTTP status, a code for programs, the field
/// at fault if one is, and a sentence.
#[derive(Debug, PartialEq, Eq, Serialize)]
pub struct SendFault {
    #[serde(skip)]
    pub status: u16,
    pub code: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    #[serde(rename = "error")]
    pub message: String,
    /// Seconds until a refused send may pass (`429`), also the
    /// `Retry-After` header.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
}

impl SendFault {
    fn new(status: u16, code: &'static str, field: Option<String>, message: String) -> SendFault {
        SendFault {
            status,
            code,
            field,
            message,
            retry_after: None,
        }
    }

    fn unavailable() -> SendFault {
        SendFault::new(
            503,
            "unavailable",
            None,
            "the queue cannot take the message now; try again".into(),
        )
    }
}

/// The parts of a JSON send, or what is wrong with it.
pub fn parse_request(json: &[u8]) -> Result<Parts, SendFault> {
    let request: SendRequest = serde_json::from_slice(json).map_err(|e| {
        SendFault::new(
            400,
            "invalid_json",
            None,
            format!("not a send request: {e}"),
        )
    })?;
    let mut attachments = Vec::with_capacity(request.attachments.len());
    for (i, a) in request.attachments.into_iter().enumerate() {
        let content = base64::engine::general_purpose::STANDARD
            .decode(a.content.trim())
            .map_err(|e| {
                SendFault::new(
                    400,
                    "invalid_field",
                    Some(format!("attachments[{i}].content")),
                    format!("not base64: {e}"),
                )
            })?;
        attachments.push(Attachment {
            filename: a.filename,
            content_type: a.content_type,
            content,
            content_id: a.content_id,
        });
    }
    let list = |addresses: Vec<Address>| addresses.into_iter().map(Named::from).collect();
    Ok(Parts {
        from: Some(request.from.into()),
        to: list(request.to),
        cc: list(request.cc),
        bcc: list(request.bcc),
        reply_to: request.reply_to.map(Named::from),
        subject: request.subject,
        text: request.text,
        html: request.html,
        headers: request.headers.into_iter().collect(),
        attachments,
    })
}

/// What a send carries.
pub enum Message {
    /// JSON parts, built into MIME here.
    Parts(Box<Parts>),
    /// A whole RFC 5322 message (`Content-Type: message/rfc822`), its
    /// envelope from its headers.
    Raw(Vec<u8>),
}

/// A send as it came: its `Idempotency-Key`, if any, and a fingerprint
/// of its media type and body.
pub struct Retried<'a> {
    pub key: &'a str,
    pub fingerprint: String,
}

/// What a send answers: the queue id, the recipients, and whether the
/// answer is that of an earlier request with the same `Idempotency-Key`.
#[derive(Debug)]
pub struct Sent {
    pub id: String,
    pub recipients: usize,
    pub replayed: bool,
    /// Recipients left out because they are on the suppression list.
    pub suppressed: Vec<String>,
}

/// [`send`], once per `Idempotency-Key`: a request with a key that was
/// answered gets the same answer and queues nothing; one while another
/// with its key is under way gets `409`; one with a key used for another
/// request gets `422`.
pub async fn send_once(
    env: &SendEnv,
    holder: &KeyHolder,
    ip: IpAddr,
    message: Message,
    retried: Option<Retried<'_>>,
) -> Result<Sent, SendFault> {
    let Some(Retried { key, fingerprint }) = retried else {
        return send(env, holder, ip, message).await;
    };
    let field = || Some("Idempotency-Key".to_string());
    let scope = holder.name.as_str();
    match env.idempotency.claim(scope, key, &fingerprint).await {
        Ok(Claim::Claimed) => {}
        Ok(Claim::Answered(answer)) if answer.fingerprint == fingerprint => {
            return Ok(Sent {
                id: answer.id,
                recipients: answer.recipients,
                replayed: true,
                suppressed: Vec::new(),
            })
        }
        Ok(Claim::Answered(_)) => {
            return Err(SendFault::new(
                422,
                "idempotency_key_reused",
                field(),
                "this key was used for another request".into(),
            ))
        }
        Ok(Claim::InProgress) => {
            return Err(SendFault {
                retry_after: Some(1),
                ..SendFault::new(
                    409,
                    "idempotency_key_in_use",
                    field(),
                    "a request with this key is under way".into(),
                )
            })
        }
        Err(error) => {
            tracing::warn!(%error, "idempotency key not checked");
            return Err(SendFault::unavailable());
        }
    }
    let result = send(env, holder, ip, message).await;
    let kept = match &result {
        Ok(sent) => {
            let answer = Answer {
                fingerprint,
                id: sent.id.clone(),
                recipients: sent.recipients,
            };
            env.idempotency.answer(scope, key, &answer).await
        }
        Err(_) => env.idempotency.release(scope, key).await,
    };
    if let Err(error) = kept {
        // The claim lapses by itself; until then a retry gets 409.
        tracing::warn!(%error, key = %holder.name, "idempotency key not updated");
    }
    result
}

/// Builds, checks and queues the message `holder` sends from `ip`, without
/// its suppressed recipients; answers its queue id and recipients.
pub async fn send(
    env: &SendEnv,
    holder: &KeyHolder,
    ip: IpAddr,
    message: Message,
) -> Result<Sent, SendFault> {
    let started = Instant::now();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let now_ms = now.as_millis() as u64;
    let id = MessageId::new(now_ms, rand::random());
    let unique = id.to_string();
    let mut composed = match &message {
        Message::Parts(parts) => compose(parts, &env.hostname, now.as_secs(), &unique),
        Message::Raw(raw) => from_raw(raw, &env.hostname, now.as_secs(), &unique),
    }
    .map_err(|e| SendFault::new(400, "invalid_field", Some(e.field), e.message))?;
    drop(message);
    if !holder.may_send_as(&composed.sender) {
        return Err(SendFault::new(
            403,
            "sender_not_allowed",
            Some("from".into()),
            format!("key {:?} may not send as {}", holder.name, composed.sender),
        ));
    }
    let suppressed = leave_out_suppressed(env, &holder.name, &mut composed.recipients).await?;
    let recipients = composed.recipients.len();
    if recipients > env.max_recipients {
        return Err(SendFault::new(
            400,
            "too_many_recipients",
            Some("to".into()),
            format!(
                "{recipients} recipients, more than smtp.max_recipients ({})",
                env.max_recipients
            ),
        ));
    }
    let for_rcpt = match composed.recipients.as_slice() {
        [only] => Some(only),
        _ => None,
    };
    let mut body = received::received_header(
        &env.hostname,
        "api",
        ip,
        "HTTP",
        &id,
        for_rcpt,
        now.as_secs(),
    )
    .into_bytes();
    body.extend_from_slice(&composed.message);
    if body.len() as u64 > env.max_message_size {
        return Err(SendFault::new(
            413,
            "message_too_large",
            None,
            format!(
                "{} octets, more than smtp.max_message_size ({})",
                body.len(),
                env.max_message_size
            ),
        ));
    }
    let envelope = crate::submit::envelope_of(Some(composed.sender), composed.recipients, &body);
    match env
        .quotas
        .take(&format!("key:{}", holder.name), &holder.quotas)
        .await
    {
        Ok(Ok(())) => {}
        Ok(Err(wait)) => {
            let secs = crate::quota::retry_after_secs(wait);
            crate::metrics::quota_refused("api");
            return Err(SendFault {
                retry_after: Some(secs),
                ..SendFault::new(
                    429,
                    "quota_exceeded",
                    None,
                    format!(
                        "key {:?} has sent its quota of messages; try again in {secs} s",
                        holder.name
                    ),
                )
            });
        }
        Err(error) => {
            tracing::warn!(%error, key = %holder.name, "quota not checked");
            return Err(SendFault::unavailable());
        }
    }
    let client = ClientInfo {
        ip,
        helo: "api".into(),
        auth_user: Some(holder.name.clone()),
        tls: false,
    };
    crate::submit::enqueue(
        &env.queue,
        &env.webhooks,
        id,
        now_ms,
        client,
        envelope,
        Body::from(body),
        started,
    )
    .await
    .map(|id| Sent {
        id: id.to_string(),
        recipients,
        replayed: false,
        suppressed,
    })
    .map_err(|_| SendFault::unavailable())
}

/// Takes the recipients on the suppression list (the global one or the
/// key's) out of `recipients` and names them; `422` when none is left. If
/// the list cannot be read the send goes on: delivery looks again.
async fn leave_out_suppressed(
    env: &SendEnv,
    account: &str,
    recipients: &mut Vec<Mailbox>,
) -> Result<Vec<String>, SendFault> {
    let keys: Vec<String> = recipients.iter().map(address_key).collect();
    let found = match env.suppressions.find(Some(account), &keys).await {
        Ok(found) => found,
        Err(error) => {
            tracing::warn!(%error, "suppression list not read; delivery checks it");
            return Ok(Vec::new());
        }
    };
    let mut suppressed = Vec::new();
    let mut hits = found.into_iter();
    recipients.retain(|recipient| {
        let hit = hits.next().unwrap_or(false);
        if hit {
            crate::metrics::recipient_suppressed("api");
            suppressed.push(recipient.to_string());
        }
        !hit
    });
    if recipients.is_empty() && !suppressed.is_empty() {
        return Err(SendFault::new(
            422,
            "recipients_suppressed",
            Some("to".into()),
            format!(
                "every recipient is on the suppression list: {}",
                suppressed.join(", ")
            ),
        ));
    }
    Ok(suppressed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sender_rules_take_addresses_and_domains() {
        let mailbox = |text: &str| {
            let (local_part, domain) = text.split_once('@').unwrap();
            Mailbox {
                local_part: local_part.into(),
                domain: domain.into(),
            }
        };
        let holder = KeyHolder {
            name: "shop".into(),
            senders: vec![
                SenderRule::parse("NoReply@Shop.Example").unwrap(),
                SenderRule::parse("news.example").unwrap(),
            ],
            quotas: Vec::new(),
        };
        assert!(holder.may_send_as(&mailbox("noreply@shop.example")));
        assert!(holder.may_send_as(&mailbox("anyone@news.example")));
        assert!(!holder.may_send_as(&mailbox("sales@shop.example")));
        assert!(!holder.may_send_as(&mailbox("a@sub.news.example")));
        for bad in ["@shop.example", "a@", "not a domain", "a@b@"] {
            assert!(SenderRule::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_token_that_passed_is_trusted_for_a_while_and_only_it() {
        let keys = ApiKeys::new(&[]);
        let holder = KeyHolder {
            name: "shop".into(),
            senders: Vec::new(),
            quotas: Vec::new(),
        };
        let t0 = Instant::now();
        assert!(keys.trusted("secret", t0).is_none());
        keys.trust("secret", &holder, t0);
        assert_eq!(
            keys.trusted("secret", t0 + Duration::from_secs(1))
                .map(|h| h.name),
            Some("shop".into())
        );
        assert!(keys.trusted("secreT", t0).is_none(), "another token");
        assert!(
            keys.trusted("secret", t0 + TRUSTED_FOR).is_none(),
            "expired"
        );
        assert!(keys.trusted("secret", t0).is_none(), "and forgotten");
        // Bounded: past the limit, expired ones make room, fresh ones do not.
        for n in 0..MAX_TRUSTED + 10 {
            keys.trust(&format!("t{n}"), &holder, t0);
        }
        assert!(keys.trusted(&format!("t{}", MAX_TRUSTED + 5), t0).is_none());
        keys.trust("late", &holder, t0 + TRUSTED_FOR);
        assert!(keys.trusted("late", t0 + TRUSTED_FOR).is_some());
    }

    #[test]
    fn json_requests_become_parts_or_name_what_is_wrong() {
        let parts = parse_request(
            br#"{"from": {"name": "Shop", "email": "shop@app.example"},
                 "to": ["a@example.org"], "subject": "Hi", "text": "Hello",
                 "headers": {"X-Order": "1"},
                 "attachments": [{"filename": "a.txt", "content_type": "text/plain",
                                  "content": "aGVsbG8="}]}"#,
        )
        .unwrap();
        assert_eq!(parts.from.unwrap().name.as_deref(), Some("Shop"));
        assert_eq!(parts.attachments[0].content, b"hello");
        assert_eq!(parts.headers, [("X-Order".to_string(), "1".to_string())]);

        let fault = parse_request(br#"{"from": "a@b.example", "to": 5}"#).unwrap_err();
        assert_eq!((fault.status, fault.code), (400, "invalid_json"));
        let fault = parse_request(br#"{"from": "a@b.example", "sender": "x"}"#).unwrap_err();
        assert!(
            fault.message.contains("unknown field `sender`"),
            "{fault:?}"
        );
        let fault = parse_request(
            br#"{"from": "a@b.example", "attachments": [{"content_type": "text/plain", "content": "!!"}]}"#,
        )
        .unwrap_err();
        assert_eq!(fault.field.as_deref(), Some("attachments[0].content"));
    }
}
