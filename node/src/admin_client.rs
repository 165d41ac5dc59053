//! The client side of the admin API, for `smarthost queue …`: the calls of
//! [`crate::admin`] over HTTP with `awc`, answers decoded, failures typed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use actix_web::http::StatusCode;
use serde::de::DeserializeOwned;

use crate::admin::{
    BadmailDeleted, BadmailList, BadmailReplayed, BulkDeleted, BulkRetried, ClusterView,
    DomainState, ErrorBody, QuarantineDeleted, Retried, API_V1,
};
use crate::queue::{Deleted, MessagePage, MessageView, QueueStats, Replayed};
use crate::sessions::SessionView;
use crate::spool::Quarantined;

pub use crate::admin::{SuppressionPage, SuppressionRemoved, SuppressionsAdded};

/// A path segment with everything but unreserved characters and `@`
/// percent-encoded.
fn encode_path(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'@' => {
                (b as char).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}

const TIMEOUT: Duration = Duration::from_secs(30);

/// Which messages a listing or a bulk call is about.
#[derive(Clone, Copy, Debug, Default)]
pub struct Filter<'a> {
    pub domain: Option<&'a str>,
    pub sender: Option<&'a str>,
}

impl Filter<'_> {
    fn query(&self) -> Vec<(&str, Option<&str>)> {
        vec![("domain", self.domain), ("sender", self.sender)]
    }
}

/// Why a call did not give an answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answered at the address, or the connection broke.
    #[error("cannot reach the admin API at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    /// The server answered with an error status.
    #[error("HTTP {status}: {message}")]
    Status { status: StatusCode, message: String },
    /// The server answered 2xx with a body this client does not understand.
    #[error("unexpected answer from {url}: {reason}")]
    Body { url: String, reason: String },
}

/// Talks to the admin API of one node.
pub struct AdminClient {
    base: String,
    token: Option<String>,
    http: awc::Client,
}

impl AdminClient {
    /// A client for the server listening on `listen` (an unspecified
    /// address such as `0.0.0.0` is reached on loopback). Must be created
    /// and used inside an actix system.
    pub fn new(listen: SocketAddr, token: Option<String>) -> Self {
        AdminClient {
            base: format!("http://{}", reachable(listen)),
            token,
            http: awc::Client::builder().timeout(TIMEOUT).finish(),
        }
    }

    pub async fn queue_stats(&self) -> Result<QueueStats, ClientError> {
        self.call(self.http.get(self.url("/queue"))).await
    }

    /// One page of the queued messages, of `domain` (the routing form),
    /// of `sender`, or of all, with a delivery in `state` if given, after
    /// `cursor`.
    pub async fn messages(
        &self,
        filter: &Filter<'_>,
        state: Option<&str>,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<MessagePage, ClientError> {
        let limit = limit.to_string();
        let mut query = filter.query();
        query.extend([
            ("state", state),
            ("cursor", cursor),
            ("limit", Some(&limit)),
        ]);
        let request = self.with_query(self.http.get(self.url("/messages")), &query)?;
        self.call(request).await
    }

    /// `request` with the given parameters as its query, escaped.
    fn with_query(
        &self,
        request: awc::ClientRequest,
        params: &[(&str, Option<&str>)],
    ) -> Result<awc::ClientRequest, ClientError> {
        let given: Vec<(&str, &str)> = params
            .iter()
            .filter_map(|(name, value)| value.map(|v| (*name, v)))
            .collect();
        let url = request.get_uri().to_string();
        request.query(&given).map_err(|e| ClientError::Body {
            url,
            reason: format!("cannot encode the query: {e}"),
        })
    }

    /// One queued message; a message not in the queue is `HTTP 404`.
    pub async fn message(&self, id: &str) -> Result<MessageView, ClientError> {
        self.call(self.http.get(self.url(&format!("/messages/{id}"))))
            .await
    }

    /// Makes a queued message's deferred deliveries due now.
    pub async fn retry(&self, id: &str) -> Result<Retried, ClientError> {
        self.call(self.http.post(self.url(&format!("/messages/{id}/retry"))))
            .await
    }

    /// Deletes a queued message; `notify`: its sender gets a report.
    pub async fn delete(&self, id: &str, notify: bool) -> Result<Deleted, ClientError> {
        let notify = if notify { "bounce" } else { "silent" };
        let path = format!("/messages/{id}?notify={notify}");
        self.call(self.http.delete(self.url(&path))).await
    }

    /// One page of a retry of a domain's or a sender's messages, from
    /// `cursor`.
    pub async fn retry_many(
        &self,
        filter: &Filter<'_>,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<BulkRetried, ClientError> {
        let limit = limit.to_string();
        let mut query = filter.query();
        query.extend([("cursor", cursor), ("limit", Some(&limit))]);
        let request = self.with_query(self.http.post(self.url("/messages/retry")), &query)?;
        self.call(request).await
    }

    /// One page of a delete of a domain's deliveries or a sender's
    /// messages, from `cursor`.
    pub async fn delete_many(
        &self,
        filter: &Filter<'_>,
        notify: bool,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<BulkDeleted, ClientError> {
        let notify = if notify { "bounce" } else { "silent" };
        let limit = limit.to_string();
        let mut query = filter.query();
        query.extend([
            ("notify", Some(notify)),
            ("cursor", cursor),
            ("limit", Some(&limit)),
        ]);
        let request = self.with_query(self.http.delete(self.url("/messages")), &query)?;
        self.call(request).await
    }

    /// The live SMTP sessions.
    pub async fn sessions(&self) -> Result<Vec<SessionView>, ClientError> {
        self.call(self.http.get(self.url("/sessions"))).await
    }

    pub async fn cluster(&self) -> Result<ClusterView, ClientError> {
        self.call(self.http.get(self.url("/cluster"))).await
    }

    /// What the spool set aside as unreadable, at most `limit`.
    pub async fn quarantined(&self, limit: usize) -> Result<Vec<Quarantined>, ClientError> {
        let path = format!("/quarantine?limit={limit}");
        self.call(self.http.get(self.url(&path))).await
    }

    /// Takes a quarantined message back into the queue; `location` as
    /// listed (letters, digits and dots: no escaping needed).
    pub async fn replay_quarantined(&self, location: &str) -> Result<Replayed, ClientError> {
        let path = format!("/quarantine/{location}/replay");
        self.call(self.http.post(self.url(&path))).await
    }

    /// Drops a quarantined entry for good.
    pub async fn delete_quarantined(
        &self,
        location: &str,
    ) -> Result<QuarantineDeleted, ClientError> {
        let path = format!("/quarantine/{location}");
        self.call(self.http.delete(self.url(&path))).await
    }

    /// A page of the suppression list of `account` (the global one when
    /// `None`), after `cursor`.
    pub async fn suppressions(
        &self,
        account: Option<&str>,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<SuppressionPage, ClientError> {
        let limit = limit.to_string();
        let query = [
            ("account", account),
            ("cursor", cursor),
            ("limit", Some(limit.as_str())),
        ];
        let request = self.with_query(self.http.get(self.url("/suppressions")), &query)?;
        self.call(request).await
    }

    /// Adds `text` (one address per line) to the suppression list of
    /// `account`, as an import.
    pub async fn suppress(
        &self,
        account: Option<&str>,
        reason: Option<&str>,
        text: String,
    ) -> Result<SuppressionsAdded, ClientError> {
        let query = [("account", account), ("reason", reason)];
        let request = self.with_query(self.http.post(self.url("/suppressions")), &query)?;
        self.call_with(request, Some(("text/plain", text.into_bytes())))
            .await
    }

    /// Takes `address` off the suppression list of `account`.
    pub async fn unsuppress(
        &self,
        account: Option<&str>,
        address: &str,
    ) -> Result<SuppressionRemoved, ClientError> {
        let path = format!("/suppressions/{}", encode_path(address));
        let request =
            self.with_query(self.http.delete(self.url(&path)), &[("account", account)])?;
        self.call(request).await
    }

    /// The oldest `limit` badmail entries, and how many there are.
    pub async fn badmail(&self, limit: usize) -> Result<BadmailList, ClientError> {
        let path = format!("/badmail?limit={limit}");
        self.call(self.http.get(self.url(&path))).await
    }

    /// Queues a badmail entry again; `name` as listed (letters, digits,
    /// `-` and `_`: no escaping needed).
    pub async fn replay_badmail(&self, name: &str) -> Result<BadmailReplayed, ClientError> {
        let path = format!("/badmail/{name}/replay");
        self.call(self.http.post(self.url(&path))).await
    }

    /// Drops a badmail entry for good.
    pub async fn delete_badmail(&self, name: &str) -> Result<BadmailDeleted, ClientError> {
        let path = format!("/badmail/{name}");
        self.call(self.http.delete(self.url(&path))).await
    }

    /// Suspends (`true`) or resumes a domain, given in its routing form.
    pub async fn set_suspended(
        &self,
        domain: &str,
        suspended: bool,
    ) -> Result<DomainState, ClientError> {
        let action = if suspended { "suspend" } else { "resume" };
        let path = format!("/domains/{domain}/{action}");
        self.call(self.http.post(self.url(&path))).await
    }

    /// The URL of `path` under the current API version.
    fn url(&self, path: &str) -> String {
        format!("{}{API_V1}{path}", self.base)
    }

    async fn call<T: DeserializeOwned>(
        &self,
        request: awc::ClientRequest,
    ) -> Result<T, ClientError> {
        self.call_with(request, None).await
    }

    /// [`AdminClient::call`] with a body of the given media type.
    async fn call_with<T: DeserializeOwned>(
        &self,
        request: awc::ClientRequest,
        body: Option<(&'static str, Vec<u8>)>,
    ) -> Result<T, ClientError> {
        let request = match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        let url = request.get_uri().to_string();
        let sent = match body {
            Some((media_type, bytes)) => request
                .insert_header((actix_web::http::header::CONTENT_TYPE, media_type))
                .send_body(bytes),
            None => request.send(),
        };
        let mut response = sent.await.map_err(|e| ClientError::Unreachable {
            url: url.clone(),
            reason: e.to_string(),
        })?;
        let body = response
            .body()
            .await
            .map_err(|e| ClientError::Unreachable {
                url: url.clone(),
                reason: e.to_string(),
            })?;
        let status = response.status();
        if !status.is_success() {
            let message = match serde_json::from_slice::<ErrorBody>(&body) {
                Ok(error) => error.error,
                Err(_) => String::from_utf8_lossy(&body).trim().to_string(),
            };
            return Err(ClientError::Status { status, message });
        }
        serde_json::from_slice(&body).map_err(|e| ClientError::Body {
            url,
            reason: e.to_string(),
        })
    }
}

/// Where a client reaches a server listening on `listen`.
fn reachable(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_addresses_are_reached_on_loopback() {
        let at = |s: &str| reachable(s.parse().unwrap()).to_string();
        assert_eq!(at("0.0.0.0:8025"), "127.0.0.1:8025");
        assert_eq!(at("[::]:8025"), "[::1]:8025");
        assert_eq!(at("10.1.2.3:8025"), "10.1.2.3:8025");
    }
}
