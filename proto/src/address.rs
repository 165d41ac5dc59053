//! RFC 5321 mailboxes.

use serde::{Deserialize, Serialize};

/// A mailbox as it travels in an envelope.
///
/// The domain is kept in its routing form: lower case, IDNA A-labels for
/// names, or a bracketed address literal (`[192.0.2.1]`, `[IPv6:2001:db8::1]`).
/// The local part is kept exactly as the client sent it, without quotes
/// (it may hold UTF-8 when SMTPUTF8 was used).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Mailbox {
    pub local_part: String,
    pub domain: String,
}
