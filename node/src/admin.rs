//! The admin HTTP server on `admin.listen`: probes for Kubernetes and the
//! operator API.
//!
//! - `GET /healthz`: 200 while the process runs.
//! - `GET /readyz`: 200 while SMTP is accepted, 503 once shutdown began.
//! - `GET /metrics`: Prometheus metrics ([`crate::metrics`]); open, like
//!   the probes.
//! - `GET /api/v1/queue`: the queue counts ([`QueueStats`]) as JSON.
//! - `GET /api/v1/messages?domain=&state=&cursor=&limit=`: a page of the
//!   queued messages ([`MessagePage`]), of one domain or of all.
//! - `GET /api/v1/messages/{id}`: one queued message ([`MessageView`]).
//! - `POST /api/v1/messages/{id}/retry`: its deferred deliveries due now.
//! - `DELETE /api/v1/messages/{id}?notify=bounce|silent`: out of the queue.
//! - `POST /api/v1/messages/retry?domain=&cursor=&limit=` and
//!   `DELETE /api/v1/messages?domain=&notify=&cursor=&limit=`: the same
//!   for one domain's deliveries, a page of the domain's listing per call
//!   ([`BulkRetried`], [`BulkDeleted`]); the caller follows `next_cursor`.
//! - `POST /api/v1/domains/{domain}/suspend` and `…/resume`: hold or
//!   release a domain's deliveries.
//! - `GET /api/v1/sessions`: the live SMTP sessions ([`SessionView`]) of
//!   this node, and on the Redis backend of the whole cluster.
//! - `GET /api/v1/quarantine?limit=N`: what the spool set aside as
//!   unreadable (at most `N`, default 1000, oldest first), as JSON;
//!   `POST /api/v1/quarantine/{location}/replay` takes a message back once
//!   it reads again, `DELETE /api/v1/quarantine/{location}` drops it.
//! - `GET /api/v1/badmail?limit=N`: what could neither be delivered nor
//!   bounced ([`crate::badmail`]), oldest first, with its reason;
//!   `POST /api/v1/badmail/{name}/replay` queues it again,
//!   `DELETE /api/v1/badmail/{name}` drops it.
//! - `GET /api/v1/cluster`: on the Redis backend, the live and dead nodes
//!   and the node that leads, as this node's coordinator last saw them.
//!
//! `docs/openapi.json` describes them. The same routes answer under
//! `/api/` without the version, as in earlier releases.
//!
//! With `[[admin.operators]]` configured every `/api/*` request needs
//! `Authorization: Bearer <token>` of one of them (the probes and
//! `/metrics` stay open); viewers may read, admins
//! may also write. Tokens are checked with argon2 on the blocking pool, a
//! few at a time (`admin.max_token_checks`; more wait briefly or get `503`),
//! and not kept. Wrong tokens from one address wait a growing delay before
//! their `401`, and enough of them block the address for a while: `429`
//! with `Retry-After`, without a check. Without operators the API is open.

use std::net::SocketAddr;
use std::sync::Arc;

use actix::Recipient;
use actix_web::dev::ServerHandle;
use actix_web::http::{header, StatusCode};
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer, ResponseError};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::auth::{Access, Memory, Operator, OperatorDb};
use crate::auth_guard::GuardStats;
use crate::auth_guard::{AuthGuard, GuardSettings, PasswordChecks, Policy, Refusal};
use crate::badmail::{Badmail, Entry as BadmailEntry, Source as BadmailSource};
use crate::config::check_domain_name;
use crate::metrics::Scrape;
use crate::pickup::{Intake, Refused};
use crate::queue::{
    DeleteMessage, Deleted, Index, IndexedMessages, ListMessages, Listing, MessagePage,
    MessageView, PageCursor, QueueStats, ReplayQuarantined, Replayed, RetryIn, RetryMessage,
    ShowMessage, Stats, Suspend, LISTED_STATES,
};
use crate::sessions::{Board, SessionView, Sessions};
use crate::spool::{Quarantined, Spool, SpoolError};
use smarthost_coordinator::{GetStatus, Status};
use smarthost_proto::envelope::MessageId;

/// Token checks that may wait for a slot (`admin.max_token_checks` run).
pub const TOKEN_CHECK_QUEUE: usize = 16;
/// The longest wait for a slot before `503`.
pub const TOKEN_CHECK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
/// The delay before the `401` of the first wrong token in the window; it
/// doubles with each further one.
pub const TOKEN_FAILURE_DELAY: std::time::Duration = std::time::Duration::from_millis(250);

/// The queue's answers about single messages.
mod suppressions;

pub use suppressions::{
    Added as SuppressionsAdded, Page as SuppressionPage, Removed as SuppressionRemoved,
};

#[derive(Clone)]
pub struct MessageQueue {
    pub replay: Recipient<ReplayQuarantined>,
    pub list: Recipient<ListMessages>,
    pub indexed_ids: Recipient<IndexedMessages>,
    pub show: Recipient<ShowMessage>,
    pub retry: Recipient<RetryMessage>,
    pub retry_in: Recipient<RetryIn>,
    pub delete: Recipient<DeleteMessage>,
}

/// What the handlers share.
#[derive(Clone)]
pub struct AdminEnv {
    pub stats: Recipient<Stats>,
    pub suspend: Recipient<Suspend>,
    /// The queue, for one message; `None`: no message is found.
    pub messages: Option<MessageQueue>,
    pub operators: Arc<OperatorDb>,
    /// This node's coordinator; `None` on the local backend.
    pub cluster: Option<Recipient<GetStatus>>,
    /// The spool, for what it set aside; `None`: nothing to list.
    pub spool: Option<Arc<dyn Spool>>,
    /// True while SMTP is accepted.
    pub ready: watch::Receiver<bool>,
    /// The bound on token checks running at once.
    checks: Arc<PasswordChecks>,
    /// Wrong tokens per address: delays and blocks.
    guard: Arc<AuthGuard>,
    /// The process's recorder, rendered at `/metrics`.
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// The SMTP login counters, shown at `/metrics`.
    smtp_logins: Option<Arc<GuardStats>>,
    /// This node's live SMTP sessions; `None`: no listener here.
    sessions: Option<Sessions>,
    /// Every node's sessions, on the Redis backend.
    board: Option<Board>,
    /// The send API; `None` where no queue runs (a coordinator alone).
    send: Option<crate::send_api::SendEnv>,
    /// Badmail and a way to queue its entries again; `None` where no queue
    /// runs.
    badmail: Option<BadmailEnv>,
}

/// What the badmail routes work with.
#[derive(Clone)]
pub struct BadmailEnv {
    pub store: Arc<Badmail>,
    pub intake: Arc<Intake>,
}

impl AdminEnv {
    pub fn new(
        stats: Recipient<Stats>,
        suspend: Recipient<Suspend>,
        operators: OperatorDb,
        ready: watch::Receiver<bool>,
    ) -> Self {
        AdminEnv {
            stats,
            suspend,
            messages: None,
            operators: Arc::new(operators),
            cluster: None,
            spool: None,
            ready,
            checks: Arc::new(PasswordChecks::new(
                2,
                TOKEN_CHECK_QUEUE,
                TOKEN_CHECK_WAIT,
                Default::default(),
            )),
            guard: Arc::new(AuthGuard::local(
                GuardSettings {
                    scope: "admin",
                    address: Policy {
                        max_failures: 10,
                        window: std::time::Duration::from_secs(900),
                        block_for: std::time::Duration::from_secs(900),
                    },
                    user: None,
                    trust_for: std::time::Duration::from_secs(900),
                    failure_delay: TOKEN_FAILURE_DELAY,
                },
                Default::default(),
            )),
            metrics: crate::metrics::install(),
            smtp_logins: None,
            sessions: None,
            board: None,
            send: None,
            badmail: None,
        }
    }
}

impl AdminEnv {
    /// Checks tokens in these slots and throttles wrong ones with this
    /// guard (the configured ones; [`AdminEnv::new`] has defaults).
    pub fn with_guard(mut self, checks: PasswordChecks, guard: AuthGuard) -> Self {
        self.checks = Arc::new(checks);
        self.guard = Arc::new(guard);
        self
    }

    /// Serves `POST /api/v1/send` into this queue.
    pub fn with_send(mut self, send: crate::send_api::SendEnv) -> Self {
        self.send = Some(send);
        self
    }

    /// Answers `/api/v1/badmail` from this store, replaying into `intake`.
    pub fn with_badmail(mut self, badmail: BadmailEnv) -> Self {
        self.badmail = Some(badmail);
        self
    }

    /// Answers `/api/v1/cluster` from this coordinator.
    pub fn with_cluster(mut self, coordinator: Recipient<GetStatus>) -> Self {
        self.cluster = Some(coordinator);
        self
    }

    /// Shows these SMTP login counters at `/metrics`.
    pub fn with_smtp_logins(mut self, stats: Arc<GuardStats>) -> Self {
        self.smtp_logins = Some(stats);
        self
    }

    /// Answers `/api/v1/messages/…` from this queue.
    pub fn with_messages(mut self, queue: MessageQueue) -> Self {
        self.messages = Some(queue);
        self
    }

    /// Answers `/api/v1/quarantine` from this spool.
    pub fn with_spool(mut self, spool: Arc<dyn Spool>) -> Self {
        self.spool = Some(spool);
        self
    }

    /// Answers `/api/v1/sessions` from this node's listener.
    pub fn with_sessions(mut self, sessions: Sessions) -> Self {
        self.sessions = Some(sessions);
        self
    }

    /// Answers `/api/v1/sessions` for the whole cluster: this node's own
    /// and the other live nodes' from the board.
    pub fn with_board(mut self, board: Board) -> Self {
        self.board = Some(board);
        self
    }
}

/// The admin server, and the open routes' own on `admin.metrics_listen`.
pub struct Servers {
    pub api: ServerHandle,
    pub open: Option<ServerHandle>,
}

impl Servers {
    /// Stops both, `graceful`ly or not.
    pub async fn stop(&self, graceful: bool) {
        if let Some(open) = &self.open {
            open.stop(graceful).await;
        }
        self.api.stop(graceful).await;
    }
}

/// Binds `listen` and serves the admin API in the current actix system
/// until the returned handle stops it. Signals are left to the caller.
pub fn start(listen: SocketAddr, env: AdminEnv) -> std::io::Result<ServerHandle> {
    serve(listen, env, routes, "the admin server stopped")
}

/// Binds `listen` (`admin.metrics_listen`) and serves the open routes
/// alone there, until the returned handle stops it.
pub fn start_open(listen: SocketAddr, env: AdminEnv) -> std::io::Result<ServerHandle> {
    serve(listen, env, open_routes, "the metrics server stopped")
}

/// Serves `configure`'s routes on `listen` with one worker, leaving
/// signals to the caller.
fn serve(
    listen: SocketAddr,
    env: AdminEnv,
    configure: fn(&mut web::ServiceConfig),
    stopped: &'static str,
) -> std::io::Result<ServerHandle> {
    let env = web::Data::new(env);
    let server = HttpServer::new(move || App::new().app_data(env.clone()).configure(configure))
        .workers(1)
        .disable_signals()
        .shutdown_timeout(1)
        .bind(listen)?
        .run();
    let handle = server.handle();
    actix::spawn(async move {
        if let Err(error) = server.await {
            tracing::error!(%error, "{stopped}");
        }
    });
    Ok(handle)
}

/// The routes that need no token: the probes and the metrics.
pub fn open_routes(config: &mut web::ServiceConfig) {
    // Resources rather than bare routes: another method gets 405, not 404.
    config
        .service(web::resource("/healthz").get(healthz))
        .service(web::resource("/readyz").get(readyz))
        .service(web::resource("/metrics").get(metrics_page));
}

/// The dashboard: a static page and its script, shipped in the binary.
/// They hold no data; the script asks the API with the operator's token.
fn dashboard(config: &mut web::ServiceConfig) {
    config
        .service(web::resource("/").get(dashboard_page))
        .service(web::resource("/dashboard.js").get(dashboard_script));
}

const DASHBOARD_HTML: &str = include_str!("dashboard/index.html");
const DASHBOARD_JS: &str = include_str!("dashboard/dashboard.js");

/// Headers for the dashboard's files: nothing but its own script runs,
/// nothing frames it, no token leaves in a referrer.
fn dashboard_file(content_type: &str, body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(content_type)
        .insert_header((
            "Content-Security-Policy",
            "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
             connect-src 'self'; img-src 'self'; frame-ancestors 'none'; base-uri 'none'; \
             form-action 'none'",
        ))
        .insert_header(("X-Frame-Options", "DENY"))
        .insert_header(("Referrer-Policy", "no-referrer"))
        .insert_header(("X-Content-Type-Options", "nosniff"))
        .insert_header(("Cache-Control", "no-cache"))
        .body(body)
}

async fn dashboard_page() -> HttpResponse {
    dashboard_file("text/html; charset=utf-8", DASHBOARD_HTML)
}

async fn dashboard_script() -> HttpResponse {
    dashboard_file("text/javascript; charset=utf-8", DASHBOARD_JS)
}

/// The routes, on an app whose data holds an [`AdminEnv`].
pub fn routes(config: &mut web::ServiceConfig) {
    open_routes(config);
    dashboard(config);
    config
        // The versioned API first: a scope takes every path under it.
        .service(web::scope(API_V1).configure(api))
        // The paths of earlier releases, for their scripts.
        .service(web::scope("/api").configure(api));
}

/// Where the current API lives.
pub const API_V1: &str = "/api/v1";

/// The operator API, under [`API_V1`] (and `/api`).
fn api(config: &mut web::ServiceConfig) {
    config
        .service(web::resource("/whoami").get(whoami))
        .service(web::resource("/queue").get(queue))
        .service(web::resource("/send").post(send_message))
        .service(
            web::resource("/suppressions")
                .get(suppressions::list)
                .post(suppressions::add),
        )
        .service(web::resource("/suppressions/{address}").delete(suppressions::remove))
        .service(
            web::resource("/messages")
                .get(messages)
                .delete(delete_messages),
        )
        // Before `/messages/{id}`, which would take its path.
        .service(web::resource("/messages/retry").post(retry_messages))
        .service(
            web::resource("/messages/{id}")
                .get(message)
                .delete(delete_message),
        )
        .service(web::resource("/messages/{id}/retry").post(retry))
        .service(web::resource("/sessions").get(sessions))
        .service(web::resource("/cluster").get(cluster))
        // The name the CLI's `queue nodes` goes by; the same view.
        .service(web::resource("/nodes").get(cluster))
        .service(web::resource("/quarantine").get(quarantine))
        .service(web::resource("/quarantine/{location}").delete(delete_quarantined))
        .service(web::resource("/quarantine/{location}/replay").post(replay_quarantined))
        .service(web::resource("/badmail").get(badmail))
        .service(web::resource("/badmail/{name}").delete(delete_badmail))
        .service(web::resource("/badmail/{name}/replay").post(replay_badmail))
        .service(web::resource("/domains/{domain}/suspend").post(suspend))
        .service(web::resource("/domains/{domain}/resume").post(resume));
}

/// The body of a suspend or resume answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainState {
    /// The routing form: lower case, IDNA A-labels.
    pub domain: String,
    pub suspended: bool,
}

/// The body of `/api/v1/cluster`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterView {
    /// The node that answered.
    pub node: String,
    /// The node whose coordinator leads (`None`: nobody does).
    pub leader: Option<String>,
    /// Node ids by liveness (heartbeat within `queue.node_timeout`).
    pub live: Vec<String>,
    pub dead: Vec<String>,
    /// The answering coordinator's last Redis failure, until it recovers.
    pub last_error: Option<String>,
}

impl From<Status> for ClusterView {
    fn from(status: Status) -> Self {
        ClusterView {
            node: status.node_id,
            leader: status.leader_node,
            live: status.live,
            dead: status.dead,
            last_error: status.last_error,
        }
    }
}

/// Who a token belongs to, for the dashboard to show what the role may do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Whoami {
    /// The operator's name; `null` when the API is open (no operators).
    pub name: Option<String>,
    /// `viewer`, `operator` or `admin` (an open API allows everything).
    pub role: String,
}

async fn whoami(
    request: HttpRequest,
    env: web::Data<AdminEnv>,
) -> Result<web::Json<Whoami>, ApiError> {
    let operator = authorize(&env, &request, Access::Read).await?;
    Ok(web::Json(match operator {
        Some(operator) => Whoami {
            name: Some(operator.name),
            role: operator.role.name().to_string(),
        },
        None => Whoami {
            name: None,
            role: "admin".to_string(),
        },
    }))
}

/// The body of every error answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// Why a request is refused.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("operator {name:?} has the {role} role, which may not do this ({allowed})")]
    Forbidden {
        name: String,
        role: &'static str,
        allowed: &'static str,
    },
    #[error("{0}")]
    BadDomain(String),
    #[error("the queue is not running")]
    QueueGone,
    #[error("this node runs on the local backend: it is not part of a cluster")]
    NoCluster,
    #[error("too many token checks in progress, try again later")]
    Busy,
    #[error("too many wrong tokens from this address, try again in {0} s")]
    Blocked(u64),
    #[error("{0}")]
    Spool(String),
    #[error("{0:?} is not a message id (28 lower-case hex digits)")]
    BadMessageId(String),
    #[error("message {0} is not in the queue")]
    NoMessage(String),
    #[error("notify={0:?}: expected bounce or silent")]
    BadNotify(String),
    #[error("{0}")]
    BadQuery(String),
    #[error("nothing is set aside as {0:?}")]
    NotQuarantined(String),
    #[error("{0} is not on this suppression list")]
    NotSuppressed(String),
    #[error("{0:?} is not a badmail entry's name (letters, digits, - and _)")]
    BadName(String),
    #[error("badmail holds no entry {0:?}")]
    NotInBadmail(String),
    /// The request is understood but cannot be done as things are.
    #[error("{0}")]
    Conflict(String),
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden { .. } => StatusCode::FORBIDDEN,
            ApiError::BadDomain(_) => StatusCode::BAD_REQUEST,
            ApiError::QueueGone => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::NoCluster => StatusCode::NOT_FOUND,
            ApiError::Busy => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Blocked(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Spool(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::BadMessageId(_) => StatusCode::BAD_REQUEST,
            ApiError::NoMessage(_) => StatusCode::NOT_FOUND,
            ApiError::BadNotify(_) => StatusCode::BAD_REQUEST,
            ApiError::BadQuery(_) => StatusCode::BAD_REQUEST,
            ApiError::NotQuarantined(_) => StatusCode::NOT_FOUND,
            ApiError::NotSuppressed(_) => StatusCode::NOT_FOUND,
            ApiError::BadName(_) => StatusCode::BAD_REQUEST,
            ApiError::NotInBadmail(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        match self {
            ApiError::Unauthorized(_) => {
                response.insert_header((header::WWW_AUTHENTICATE, "Bearer realm=\"smarthost\""));
            }
            ApiError::Busy => {
                response.insert_header((header::RETRY_AFTER, "1"));
            }
            ApiError::Blocked(seconds) => {
                response.insert_header((header::RETRY_AFTER, seconds.to_string()));
            }
            _ => {}
        }
        response.json(ErrorBody {
            error: self.to_string(),
        })
    }
}

/// The token of an `Authorization: Bearer <token>` header value.
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Whose bearer token this request carries, by `lookup` (argon2 checks,
/// run in the bounded slots and throttled per address like SMTP logins).
pub(crate) async fn identify<T: Send + 'static>(
    env: &AdminEnv,
    request: &HttpRequest,
    lookup: impl FnOnce(&str, &mut Memory) -> Option<T> + Send + 'static,
) -> Result<T, ApiError> {
    let Some(header) = request.headers().get(header::AUTHORIZATION) else {
        return Err(ApiError::Unauthorized("a bearer token is required"));
    };
    let token = header
        .to_str()
        .ok()
        .and_then(bearer_token)
        .ok_or(ApiError::Unauthorized(
            "the Authorization header is not \"Bearer <token>\"",
        ))?
        .to_string();
    let ip = client_ip(request);
    let (found, _) = env
        .guard
        .check(&env.checks, ip, None, move |memory| lookup(&token, memory))
        .await
        .map_err(|refusal| match refusal {
            Refusal::Busy => ApiError::Busy,
            Refusal::AddressBlocked { for_ms } | Refusal::UserBlocked { for_ms } => {
                ApiError::Blocked(for_ms.div_ceil(1000))
            }
        })?;
    match found {
        Some(found) => Ok(found),
        None => {
            tracing::warn!(peer = ?request.peer_addr(), "admin API: unknown token");
            let delay = env.guard.failed(ip, None, false).await;
            tokio::time::sleep(delay).await;
            Err(ApiError::Unauthorized("the token is not valid"))
        }
    }
}

/// The client's address (unspecified if unknown).
pub(crate) fn client_ip(request: &HttpRequest) -> std::net::IpAddr {
    request
        .peer_addr()
        .map_or(std::net::Ipv4Addr::UNSPECIFIED.into(), |peer| {
            peer.ip().to_canonical()
        })
}

/// Lets the request through when no operator is configured, or when its
/// token belongs to an operator whose role allows `access`; answers the
/// operator (none for an open API).
async fn authorize(
    env: &AdminEnv,
    request: &HttpRequest,
    access: Access,
) -> Result<Option<Operator>, ApiError> {
    if env.operators.is_empty() {
        return Ok(None);
    }
    let operators = env.operators.clone();
    let operator = identify(env, request, move |token, memory| {
        operators.identify_in(token, memory)
    })
    .await?;
    if !operator.role.allows(access) {
        return Err(ApiError::Forbidden {
            role: operator.role.name(),
            allowed: match access {
                Access::Admin => "admins only",
                _ => "a viewer may only read",
            },
            name: operator.name,
        });
    }
    Ok(Some(operator))
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "alive" }))
}

async fn readyz(env: web::Data<AdminEnv>) -> HttpResponse {
    if *env.ready.borrow() {
        HttpResponse::Ok().json(serde_json::json!({ "status": "ready" }))
    } else {
        HttpResponse::ServiceUnavailable().json(serde_json::json!({ "status": "not ready" }))
    }
}

/// The Prometheus page. The queue is shown by the process that answers
/// for it: always on the local backend, on Redis only while this node's
/// coordinator leads, so that a sum over the pods counts it once.
async fn metrics_page(env: web::Data<AdminEnv>) -> HttpResponse {
    let leader = match &env.cluster {
        Some(coordinator) => Some(
            coordinator
                .send(GetStatus)
                .await
                .is_ok_and(|status| status.leader),
        ),
        None => None,
    };
    let queue = match leader {
        Some(false) => None,
        _ => env.stats.send(Stats).await.ok(),
    };
    let mut logins = Vec::with_capacity(2);
    if let Some(smtp) = &env.smtp_logins {
        logins.push(("smtp", smtp.snapshot()));
    }
    logins.push(("admin", env.guard.stats().snapshot()));
    let page = Scrape {
        queue,
        leader,
        logins,
    }
    .render(&env.metrics);
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(page)
}

async fn queue(
    request: HttpRequest,
    env: web::Data<AdminEnv>,
) -> Result<web::Json<QueueStats>, ApiError> {
    authorize(&env, &request, Access::Read).await?;
    let stats = env
        .stats
        .send(Stats)
        .await
        .map_err(|_| ApiError::QueueGone)?;
    Ok(web::Json(stats))
}

/// `POST /send`: a message from an application's JSON, with its key.
async fn send_message(
    request: HttpRequest,
    mut payload: web::Payload,
    env: web::Data<AdminEnv>,
) -> Result<HttpResponse, ApiError> {
    let Some(send) = env.send.clone() else {
        return Err(ApiError::QueueGone);
    };
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)
        .map(str::to_string);
    let now = std::time::Instant::now();
    let holder = match token.as_deref().and_then(|t| send.keys.trusted(t, now)) {
        Some(holder) => holder,
        None => {
            let keys = send.keys.clone();
            let holder = identify(&env, &request, move |token, memory| {
                keys.identify_in(token, memory)
            })
            .await?;
            if let Some(token) = &token {
                send.keys.trust(token, &holder, now);
            }
            holder
        }
    };
    let fault = |fault: crate::send_api::SendFault| {
        let status = StatusCode::from_u16(fault.status).unwrap_or(StatusCode::BAD_REQUEST);
        let mut response = HttpResponse::build(status);
        if let Some(secs) = fault.retry_after {
            response.insert_header((header::RETRY_AFTER, secs.to_string()));
        }
        response.json(fault)
    };
    let media_type = media_type(&request);
    let raw = match media_type.as_str() {
        "application/json" => false,
        "message/rfc822" => true,
        _ => {
            return Ok(fault(crate::send_api::SendFault {
                status: 415,
                code: "unsupported_media_type",
                field: None,
                message: "send application/json or message/rfc822".into(),
                retry_after: None,
            }))
        }
    };
    // Read only once the key is known, and only up to what a message of
    // the largest size takes in base64 within JSON.
    let limit = (send.max_message_size as usize / 3 + 1) * 4 + 64 * 1024;
    let Some(body) = read_limited(&mut payload, limit).await? else {
        return Ok(fault(crate::send_api::SendFault {
            status: 413,
            code: "message_too_large",
            field: None,
            message: format!("a request over {limit} octets (smtp.max_message_size in base64)"),
            retry_after: None,
        }));
    };
    let message = if raw {
        crate::send_api::Message::Raw(body.to_vec())
    } else {
        match crate::send_api::parse_request(&body) {
            Ok(parts) => crate::send_api::Message::Parts(Box::new(parts)),
            Err(f) => return Ok(fault(f)),
        }
    };
    let retried = match request.headers().get("idempotency-key") {
        None => None,
        Some(value) => {
            let key = value
                .to_str()
                .map_err(|e| e.to_string())
                .and_then(|key| crate::idempotency::check_key(key).map(|()| key));
            match key {
                Ok(key) => Some(crate::send_api::Retried {
                    key,
                    fingerprint: crate::idempotency::sha256_hex(&[media_type.as_bytes(), &body]),
                }),
                Err(e) => {
                    return Ok(fault(crate::send_api::SendFault {
                        status: 400,
                        code: "invalid_field",
                        field: Some("Idempotency-Key".into()),
                        message: e,
                        retry_after: None,
                    }))
                }
            }
        }
    };
    let ip = client_ip(&request);
    match crate::send_api::send_once(&send, &holder, ip, message, retried).await {
        Ok(sent) => {
            let mut response = HttpResponse::Ok();
            if sent.replayed {
                response.insert_header(("Idempotent-Replayed", "true"));
            }
            let mut json = serde_json::json!({
                "id": sent.id,
                "recipients": sent.recipients,
            });
            if !sent.suppressed.is_empty() {
                json["suppressed"] = serde_json::json!(sent.suppressed);
            }
            Ok(response.json(json))
        }
        Err(f) => Ok(fault(f)),
    }
}

/// The request's media type, lower case, without parameters.
fn media_type(request: &HttpRequest) -> String {
    request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_default()
}

/// The body of a request, read only up to `limit` octets: `None` past it.
async fn read_limited(
    payload: &mut web::Payload,
    limit: usize,
) -> Result<Option<web::BytesMut>, ApiError> {
    use futures_util::StreamExt as _;
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadQuery(format!("reading the request: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

/// A message id as the relay makes them ([`MessageId::new`]); nothing
/// else reaches the queue's keys.
fn message_id(text: &str) -> Result<MessageId, ApiError> {
    MessageId::parse(text).ok_or_else(|| ApiError::BadMessageId(cut(text)))
}

/// Messages per page unless `limit` says otherwise.
pub const DEFAULT_PAGE: usize = 100;
/// The largest page.
pub const MAX_PAGE: usize = 1000;

/// The query of a listing.
#[derive(Debug, Deserialize)]
struct ListQuery {
    domain: Option<String>,
    sender: Option<String>,
    state: Option<String>,
    cursor: Option<String>,
    limit: Option<usize>,
}

impl ListQuery {
    /// The listing and the page size it asks for, or what is wrong with it.
    fn listing(self) -> Result<(Listing, usize), ApiError> {
        let domain = match self.domain.as_deref() {
            None | Some("") => None,
            Some(domain) => Some(check_domain_name(domain).map_err(ApiError::BadDomain)?),
        };
        let sender = match self.sender.as_deref() {
            None | Some("") => None,
            Some(sender) => Some(sender_filter(sender)?),
        };
        let indexed = domain.is_some() || sender.is_some();
        let state = match self.state {
            Some(state) if !LISTED_STATES.contains(&state.as_str()) => {
                return Err(ApiError::BadQuery(format!(
                    "state={:?}: expected one of {}",
                    cut(&state),
                    LISTED_STATES.join(", ")
                )))
            }
            state => state,
        };
        let after = match self.cursor.as_deref() {
            None | Some("") => None,
            Some(token) => Some(PageCursor::parse(token, indexed).ok_or_else(|| {
                ApiError::BadQuery(format!(
                    "cursor={:?} is not a cursor of this listing (pass next_cursor back as it \
                     came, with the same domain and sender)",
                    cut(token)
                ))
            })?),
        };
        let limit = self.limit.unwrap_or(DEFAULT_PAGE);
        if !(1..=MAX_PAGE).contains(&limit) {
            return Err(ApiError::BadQuery(format!(
                "limit={limit}: expected 1 to {MAX_PAGE}"
            )));
        }
        Ok((
            Listing {
                domain,
                sender,
                state,
                after,
            },
            limit,
        ))
    }
}

async fn messages(
    request: HttpRequest,
    query: web::Query<ListQuery>,
    env: web::Data<AdminEnv>,
) -> Result<web::Json<MessagePage>, ApiError> {
    authorize(&env, &request, Access::Read).await?;
    let (listing, limit) = query.into_inner().listing()?;
    let queue = env.messages.as_ref().ok_or(ApiError::QueueGone)?;
    let page = answered(queue.list.send(ListMessages { listing, limit }).await)?;
    Ok(web::Json(page))
}

async fn message(
    request: HttpRequest,
    id: web::Path<String>,
    env: web::Data<AdminEnv>,
) -> Result<web::Json<MessageView>, ApiError> {
    authorize(&env, &request, Access::Read).await?;
    let id = message_id(&id)?;
    let queue = env.messages.as_ref().ok_or(ApiError::QueueGone)?;
    let view = queue_answer(&id, queue.show.send(ShowMessage(id.clone())).await)?;
    Ok(web::Json(view))
}

/// The queue's answer: its spool's failure is `503`, as is a queue that
/// stopped.
fn answered<T>(answer: Result<Result<T, SpoolError>, actix::MailboxError>) -> Result<T, ApiError> {
    match answer {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(ApiError::Spool(error.to_string())),
        Err(_) => Err(ApiError::QueueGone),
    }
}

/// The queue's answer about one message: `None` (not queued) is `404`.
fn queue_answer<T>(
    id: &MessageId,
    answer: Result<Result<Option<T>, SpoolError>, actix::MailboxError>,
) -> Result<T, ApiError> {
    answered(answer)?.ok_or_else(|| ApiError::NoMessage(id.to_string()))
}

/// The operator a request came from, for the log (`-`: an open API).
fn who(operator: &Option<Operator>) -> &str {
    operator.as_ref().map_or("-", |o| o.name.as_str())
}

/// The query of a delete.
#[derive(Debug, Deserialize)]
struct DeleteQuery {
    notify: Option<String>,
}

async fn delete_message(
    request: HttpRequest,
    id: web::Path<String>,
    query: web::Query<DeleteQuery>,
    env: web::Data<AdminEnv>,
) -> Result<web::Json<Deleted>, ApiError> {
    let operator = authorize(&env, &request, Access::Write).await?;
    let id = message_id(&id)?;
    let notify = notify(query.notify.as_deref())?;
    let queue = env.messages.as_ref().ok_or(ApiError::QueueGone)?;
    let message = DeleteMessage {
        id: id.clone(),
        notify,
        only: None,
    };
    let deleted = queue_answer(&id, queue.delete.send(message).await)?;
    tracing::info!(
        operator = who(&operator),
        message_id = %id,
        recipients = deleted.recipients,
        notify,
        "admin API: message deleted"
    );
    Ok(web::Json(deleted))
}

/// The body of a retry answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retried {
    pub id: String,
    /// Deferred deliveries (one per destination domain) made due now;
    /// those in flight, ready or suspended are left as they are.
    pub deliveries: usize,
}

async fn retry(
    request: HttpRequest,
    id: web::Path<String>,
    env: web::Data<AdminEnv>,
) -> Result<web::Json<Retried>, ApiError> {
    let operator = authorize(&env, &request, Access::Write).await?;
    let id = message_id(&id)?;
    let queue = env.messages.as_ref().ok_or(ApiError::QueueGone)?;
    let deliveries = queue_answer(&id, queue.retry.send(RetryMessage(id.clone())).await)?;
    tracing::info!(
        operator = who(&operator),
        message_id = %id,
        deliveries,
        "admin API: message retried"
    );
    Ok(web::Json(Retried {
        id: id.to_string(),
        deliveries,
    }))
}

/// `sender=` of a listing: an address (with or without its angle
/// brackets), or `<>` for the null reverse path; as the listing indexes it.
fn sender_filter(value: &str) -> Result<String, ApiError> {
    let path = if value.starts_with('<') {
        value.to_string()
    } else {
        format!("<{value}>")
    };
    match smarthost_proto::address::parse_reverse_path(&path) {
        Ok(sender) => Ok(smarthost_proto::envelope::sender_key(
            sender.as_ref().map(|p| &p.mailbox),
        )),
        Err(error) => Err(ApiError::BadQuery(format!(
            "sender={:?}: {error}",
            cut(value)
        ))),
    }
}

/// The query of a retry or delete by domain or sender: one page of its
/// listing per call.
#[derive(Debug, Deserialize)]
struct BulkQuery {
    domain: Option<String>,
    sender: Option<String>,
    notify: Option<String>,
    cursor: Option<String>,
    limit: Option<usize>,
}

impl BulkQuery {
    /// The page of the domain's or the sender's listing to work on, and
    /// whether to notify.
    fn page(self) -> Result<(IndexedMessages, bool), ApiError> {
        let notify = notify(self.notify.as_deref())?;
        let (listing, limit) = ListQuery {
            domain: self.domain,
            sender: self.sender,
            state: None,
            cursor: self.cursor,
            limit: self.limit,
        }
        .listing()?;
        let index =
            match (listing.domain, listing.sender) {
                (Some(domain), None) => Index::Domain(domain),
                (None, Some(sender)) => Index::Sender(sender),
                (Some(_), Some(_)) => return Err(ApiError::BadQuery(
                    "domain= and sender= together: a retry or delete of many messages works on \
                     one domain or one sender"
                        .into(),
                )),
                (None, None) => {
                    return Err(ApiError::BadQuery(
                        "domain= or sender= is required: a retry or delete of many messages works \
                     on one domain or one sender"
                            .into(),
                    ))
                }
            };
        let after = match listing.after {
            Some(PageCursor::Indexed(id)) => Some(id),
            _ => None,
        };
        Ok((
            IndexedMessages {
                index,
                after,
                limit,
            },
            notify,
        ))
    }
}

/// `notify=` of a delete: a report to the sender unless `silent`.
fn notify(value: Option<&str>) -> Result<bool, ApiError> {
    match value {
        None | Some("bounce") => Ok(true),
        Some("silent") => Ok(false),
        Some(other) => Err(ApiError::BadNotify(other.chars().take(32).collect())),
    }
}

/// The ids of one page of the domain's or sender's listing (the
/// schedule's index; no record is read), and the cursor of the next page.
async fn indexed_page(
    queue: &MessageQueue,
    page: IndexedMessages,
) -> Result<(Vec<MessageId>, Option<String>), ApiError> {
    let limit = page.limit;
    let ids = answered(queue.indexed_ids.send(page).await)?;
    let next = (ids.len() == limit)
        .then(|| ids.last().map(|id| PageCursor::Indexed(id.clone()).token()))
        .flatten();
    Ok((ids, next))
}

/// The domain or sender a bulk answer is about.
fn index_fields(index: &Index) -> (Option<String>, Option<String>) {
    match index {
        Index::Domain(domain) => (Some(domain.clone()), None),
        Index::Sender(sender) => (None, Some(sender.clone())),
    }
}

/// The body of a retry by domain or sender: what one page did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BulkRetried {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender: Option<String>,
    /// Messages of the page looked at.
    pub examined: usize,
    /// Deferred deliveries made due now: to the domain, or (by sender) to
    /// any of the messages' domains.
    pub deliveries: usize,
    /// The next page's cursor; `null`: the listing is done.
    pub next_cursor: Option<String>,
}

async fn retry_messages(
    request: HttpRequest,
    query: web::Query<BulkQuery>,
    env: web::Data<AdminEnv>,
) -> Result<web::Json<BulkRetried>, ApiError> {
    let operator = authorize(&env, &request, Access::Write).await?;
    let (page, _) = query.into_inner().page()?;
    let index = page.index.clone();
    let queue = env.messages.as_ref().ok_or(ApiError::QueueGone)?;
    let (ids, next_cursor) = indexed_page(queue, page).await?;
    let examined = ids.len();
    let deliveries = match &index {
        Index::Domain(domain) => {
            let retry = RetryIn {
                domain: domain.clone(),
                ids,
            };
            answered(queue.retry_in.send(retry).await)?
        }
        Index::Sender(_) => {
            let mut deliveries = 0;
            for id in ids {
                // `None`: done since it was listed.
                deliveries += answered(queue.retry.send(RetryMessage(id)).await)?.unwrap_or(0);
            }
            deliveries
        }
    };
    let (domain, sender) = index_fields(&index);
    tracing::info!(
        operator = who(&operator),
        domain = domain.as_deref(),
        sender = sender.as_deref(),
        examined,
        deliveries,
        "admin API: messages retried"
    );
    Ok(web::Json(BulkRetried {
        domain,
        sender,
        examined,
        deliveries,
        next_cursor,
    }))
}

/// The body of a delete by domain or sender: what one page did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BulkDeleted {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender: Option<String>,
    /// Messages of the page looked at.
    pub examined: usize,
    /// Recipients failed now: at the domain, or (by sender) all of the
    /// messages' pending ones.
    pub recipients: usize,
    /// Deliveries left to the attempt under way.
    pub in_flight: usize,
    /// Whether the senders get reports of the deleted recipients.
    pub notified: bool,
    /// The next page's cursor; `null`: the listing is done.
    pub next_cursor: Option<String>,
}

/// Fails the pending deliveries of one page of messages, each like
/// `DELETE /messages/{id}`: by domain restricted to that domain (a
/// message's other domains are left as they are), by sender whole.
async fn delete_messages(
    request: HttpRequest,
    query: web::Query<BulkQuery>,
    env: web::Data<AdminEnv>,
) -> Result<web::Json<BulkDeleted>, ApiError> {
    let operator = authorize(&env, &request, Access::Write).await?;
    let (page, notify) = query.into_inner().page()?;
    let index = page.index.clone();
    let queue = env.messages.as_ref().ok_or(ApiError::QueueGone)?;
    let (ids, next_cursor) = indexed_page(queue, page).await?;
    let (domain, sender) = index_fields(&index);
    let mut deleted = BulkDeleted {
        domain: domain.clone(),
        sender: sender.clone(),
        examined: ids.len(),
        recipients: 0,
        in_flight: 0,
        notified: notify,
        next_cursor,
    };
    for id in ids {
        let message = DeleteMessage {
            id,
            notify,
            only: domain.clone(),
        };
        // `None`: done since it was listed.
        if let Some(one) = answered(queue.delete.send(message).await)? {
            deleted.recipients += one.recipients;
            deleted.in_flight += one.in_flight;
        }
    }
    tracing::info!(
        operator = who(&operator),
        domain = domain.as_deref(),
        sender = sender.as_deref(),
        examined = deleted.examined,
        recipients = deleted.recipients,
        in_flight = deleted.in_flight,
        notify,
        "admin API: messages deleted"
    );
    Ok(web::Json(deleted))
}

/// The live SMTP sessions, the longest connected first: of this node,
/// and on the Redis backend of every other live node (as each last
/// published them, at most [`crate::sessions::PUBLISH_EVERY`] ago).
async fn sessions(
    request: HttpRequest,
    env: web::Data<AdminEnv>,
) -> Result<web::Json<Vec<SessionView>>, ApiError> {
    authorize(&env, &request, Access::Read).await?;
    let mut views = env
        .sessions
        .as_ref()
        .map(Sessions::snapshot)
        .unwrap_or_default();
    if let (Some(board), Some(coordinator)) = (&env.board, &env.cluster) {
        let status = coordinator
            .send(GetStatus)
            .await
            .map_err(|_| ApiError::QueueGone)?;
        let others: Vec<String> = status
            .live
            .into_iter()
            .filter(|node| node != &status.node_id || env.sessions.is_none())
            .collect();
        let published = board.read(&others).await.map_err(ApiError::Spool)?;
        views.extend(published);
        crate::sessions::sort(&mut views);
    }
    Ok(web::Json(views))
}

async fn cluster(
    request: HttpRequest,
    env: web::Data<AdminEnv>,
) -> Result<web::Json<ClusterView>, ApiError> {
    authorize(&env, &request, Access::Read).await?;
    let coordinator = env.cluster.as_ref().ok_or(ApiError::NoCluster)?;
    let status = coordinator
        .send(GetStatus)
        .await
        .map_err(|_| ApiError::QueueGone)?;
    Ok(web::Json(status.into()))
}

/// The query of `/api/v1/quarantine`.
#[derive(Debug, Deserialize)]
struct QuarantineQuery {
    limit: Option<usize>,
}

/// The most entries `/api/v1/quarantine` lists when no limit is given.
const QUARANTINE_LIMIT: usize = 1000;

async fn quarantine(
    request: HttpRequest,
    query: web::Query<QuarantineQuery>,
    env: web::Data<AdminEnv>,
) -> Result<web::Json<Vec<Quarantined>>, ApiError> {
    authorize(&env, &request, Access::Read).await?;
    let Some(spool) = &env.spool else {
        return Ok(web::Json(Vec::new()));
    };
    let listed = spool
        .quarantined(query.limit.unwrap_or(QUARANTINE_LIMIT))
        .await
        .map_err(|e| ApiError::Spool(e.to_string()))?;
    Ok(web::Json(listed))
}

/// Takes a quarantined message back into the queue once it reads again
/// (after an upgrade); `409` with the reason when it still does not, or
/// when the spool keeps no message there (the local spool's damaged
/// journal bytes).
async fn replay_quarantined(
    request: HttpRequest,
    location: web::Path<String>,
    env: web::Data<AdminEnv>,
) -> Result<web::Json<Replayed>, ApiError> {
    let operator = authorize(&env, &request, Access::Write).await?;
    let location = location.into_inner();
    let queue = env.messages.as_ref().ok_or(ApiError::QueueGone)?;
    let replayed = match queue.replay.send(ReplayQuarantined(location.clone())).await {
        Ok(Err(SpoolError::Corrupt(why))) => return Err(ApiError::Conflict(why)),
        answer => answered(answer)?.ok_or_else(|| ApiError::NotQuarantined(cut(&location)))?,
    };
    tracing::info!(
        operator = who(&operator),
        %location,
        message_id = %replayed.id,
        "admin API: quarantined message taken back"
    );
    Ok(web::Json(replayed))
}

/// The body of a quarantine delete.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineDeleted {
    pub location: String,
    pub deleted: bool,
}

/// Drops what was set aside for good: the message in it is lost.
async fn delete_quarantined(
    request: HttpRequest,
    location: web::Path<String>,
    env: web::Data<AdminEnv>,
) -> Result<web::Json<QuarantineDeleted>, ApiError> {
    let operator = authorize(&env, &request, Access::Admin).await?;
    let location = location.into_inner();
    let spool = env.spool.as_ref().ok_or(ApiError::QueueGone)?;
    let deleted = spool
        .delete_quarantined(&location)
        .await
        .map_err(|e| ApiError::Spool(e.to_string()))?;
    if !deleted {
        return Err(ApiError::NotQuarantined(cut(&location)));
    }
    tracing::warn!(
        operator = who(&operator),
        %location,
        "admin API: a quarantined entry was deleted; what it held is gone"
    );
    Ok(web::Json(QuarantineDeleted { location, deleted }))
}

/// The query of `/api/v1/badmail`.
#[derive(Debug, Deserialize)]
struct BadmailQuery {
    limit: Option<usize>,
}

/// The body of `/api/v1/badmail`: the oldest entries, and how many there
/// are in all.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadmailList {
    pub total: usize,
    pub entries: Vec<BadmailEntry>,
}

/// The body of a badmail replay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadmailReplayed {
    pub name: String,
    /// The queue id of the message queued again.
    pub id: String,
}

/// The body of a badmail delete.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadmailDeleted {
    pub name: String,
    pub deleted: bool,
}

/// `name` if it is one badmail makes, never a path.
fn badmail_name(name: web::Path<String>) -> Result<String, ApiError> {
    let name = name.into_inner();
    if crate::badmail::valid_name(&name) {
        Ok(name)
    } else {
        Err(ApiError::BadName(cut(&name)))
    }
}

/// Runs `work` on the store, on the blocking pool.
async fn on_badmail<T: Send + 'static>(
    env: &AdminEnv,
    work: impl FnOnce(&Badmail) -> std::io::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    let badmail = env.badmail.as_ref().ok_or(ApiError::QueueGone)?;
    let store = badmail.store.clone();
    web::block(move || work(&store))
        .await
        .map_err(|_| ApiError::QueueGone)?
        .map_err(|e| ApiError::Spool(format!("badmail: {e}")))
}

async fn badmail(
    request: HttpRequest,
    query: web::Query<BadmailQuery>,
    env: web::Data<AdminEnv>,
) -> Result<web::Json<BadmailList>, ApiError> {
    authorize(&env, &request, Access::Read).await?;
    let limit = query.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::BadQuery(format!(
            "limit={limit}: expected 1 to {MAX_PAGE}"
        )));
    }
    if env.badmail.is_none() {
        return Ok(web::Json(BadmailList {
            total: 0,
            entries: Vec::new(),
        }));
    }
    let (entries, total) = on_badmail(&env, move |store| store.list(limit)).await?;
    Ok(web::Json(BadmailList { total, entries }))
}

/// Queues an entry again and drops it once the queue has the message: a
/// pickup file is read again as one, a report goes with its envelope.
/// `409` with the reason when it still cannot be queued.
async fn replay_badmail(
    request: HttpRequest,
    name: web::Path<String>,
    env: web::Data<AdminEnv>,
) -> Result<web::Json<BadmailReplayed>, ApiError> {
    let operator = authorize(&env, &request, Access::Write).await?;
    let name = badmail_name(name)?;
    let wanted = name.clone();
    let (entry, message) = on_badmail(&env, move |store| store.read(&wanted))
        .await?
        .ok_or_else(|| ApiError::NotInBadmail(name.clone()))?;
    let intake = &env.badmail.as_ref().ok_or(ApiError::QueueGone)?.intake;
    let queued = match (entry.source, &entry.envelope) {
        (BadmailSource::Pickup, _) => intake.queue_file(&message).await,
        (BadmailSource::Report, Some(kept)) => match kept.to_envelope(&message) {
            Ok(envelope) => intake.queue_as_is(envelope, message).await,
            Err(reason) => Err(Refused::Bad {
                reason,
                envelope: None,
            }),
        },
        (BadmailSource::Report, None) => Err(Refused::Bad {
            reason: "the entry's envelope is not known".into(),
            envelope: None,
        }),
    };
    let id = match queued {
        Ok(id) => id,
        Err(Refused::Bad { reason, .. }) => {
            return Err(ApiError::Conflict(format!(
                "still cannot be queued: {reason}"
            )))
        }
        Err(Refused::Unavailable) => {
            return Err(ApiError::Spool(
                "the queue cannot take the message now; try again".into(),
            ))
        }
    };
    let done = name.clone();
    if let Err(error) = on_badmail(&env, move |store| store.delete(&done)).await {
        tracing::error!(badmail = %name, message_id = %id, %error,
            "badmail entry queued again but not removed");
    }
    tracing::info!(
        operator = who(&operator),
        badmail = %name,
        message_id = %id,
        "admin API: badmail entry queued again"
    );
    Ok(web::Json(BadmailReplayed {
        name,
        id: id.to_string(),
    }))
}

/// Drops a badmail entry for good: no report names it.
async fn delete_badmail(
    request: HttpRequest,
    name: web::Path<String>,
    env: web::Data<AdminEnv>,
) -> Result<web::Json<BadmailDeleted>, ApiError> {
    let operator = authorize(&env, &request, Access::Admin).await?;
    let name = badmail_name(name)?;
    let wanted = name.clone();
    if !on_badmail(&env, move |store| store.delete(&wanted)).await? {
        return Err(ApiError::NotInBadmail(name));
    }
    tracing::warn!(
        operator = who(&operator),
        badmail = %name,
        "admin API: a badmail entry was deleted"
    );
    Ok(web::Json(BadmailDeleted {
        name,
        deleted: true,
    }))
}

/// At most 64 characters of what a client sent, for an error.
fn cut(text: &str) -> String {
    text.chars().take(64).collect()
}

async fn suspend(
    request: HttpRequest,
    domain: web::Path<String>,
    env: web::Data<AdminEnv>,
) -> Result<web::Json<DomainState>, ApiError> {
    set_suspended(request, &domain, env, true).await
}

async fn resume(
    request: HttpRequest,
    domain: web::Path<String>,
    env: web::Data<AdminEnv>,
) -> Result<web::Json<DomainState>, ApiError> {
    set_suspended(request, &domain, env, false).await
}

async fn set_suspended(
    request: HttpRequest,
    domain: &str,
    env: web::Data<AdminEnv>,
    suspended: bool,
) -> Result<web::Json<DomainState>, ApiError> {
    let operator = authorize(&env, &request, Access::Write).await?;
    let domain = check_domain_name(domain).map_err(ApiError::BadDomain)?;
    env.suspend
        .send(Suspend {
            domain: domain.clone(),
            suspended,
        })
        .await
        .map_err(|_| ApiError::QueueGone)?;
    tracing::info!(
        operator = who(&operator),
        %domain,
        suspended,
        "admin API: domain {}",
        if suspended { "suspended" } else { "resumed" }
    );
    Ok(web::Json(DomainState { domain, suspended }))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use actix::prelude::*;
    use actix_web::test as http;

    use super::*;
    use crate::auth::cheap_hash;
    use crate::config::{AdminOperator, OperatorRole};

    /// What the fake queue was told: (domain, suspended).
    type Seen = Arc<Mutex<Vec<(String, bool)>>>;

    /// Stands in for the queue: fixed counts, remembers suspensions.
    #[derive(Default)]
    struct FakeQueue {
        suspended: Seen,
    }

    impl Actor for FakeQueue {
        type Context = Context<Self>;
    }

    impl Handler<Stats> for FakeQueue {
        type Result = MessageResult<Stats>;

        fn handle(&mut self, _: Stats, _: &mut Context<Self>) -> Self::Result {
            MessageResult(QueueStats {
                messages: 2,
                ..QueueStats::default()
            })
        }
    }

    impl Handler<Suspend> for FakeQueue {
        type Result = ();

        fn handle(&mut self, msg: Suspend, _: &mut Context<Self>) {
            self.suspended
                .lock()
                .unwrap()
                .push((msg.domain, msg.suspended));
        }
    }

    fn env(operators: &[AdminOperator], ready: bool) -> (AdminEnv, Seen) {
        let fake = FakeQueue::default();
        let seen = fake.suspended.clone();
        let addr = fake.start();
        let (_, ready) = watch::channel(ready);
        let env = AdminEnv::new(
            addr.clone().recipient(),
            addr.recipient(),
            OperatorDb::new(operators),
            ready,
        );
        (env, seen)
    }

    fn operators() -> Vec<AdminOperator> {
        vec![
            AdminOperator {
                name: "ops".into(),
                token_hash: cheap_hash("admin-token"),
                role: OperatorRole::Admin,
            },
            AdminOperator {
                name: "noc".into(),
                token_hash: cheap_hash("viewer-token"),
                role: OperatorRole::Viewer,
            },
        ]
    }

    fn request(method: &str, path: &str, token: Option<&str>) -> http::TestRequest {
        let request = match method {
            "GET" => http::TestRequest::get(),
            _ => http::TestRequest::post(),
        }
        .uri(path);
        match token {
            Some(token) => {
                request.insert_header((header::AUTHORIZATION, format!("Bearer {token}")))
            }
            None => request,
        }
    }

    /// The status the app answers `method path` with.
    macro_rules! status {
        ($app:expr, $method:expr, $path:expr, $token:expr) => {
            http::call_service(&$app, request($method, $path, $token).to_request())
                .await
                .status()
                .as_u16()
        };
    }

    #[test]
    fn bearer_tokens() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("Bearer"), None);
        assert_eq!(bearer_token(""), None);
    }

    #[actix_web::test]
    async fn tokens_and_roles_decide_who_may_do_what() {
        let (env, seen) = env(&operators(), true);
        let app =
            http::init_service(App::new().app_data(web::Data::new(env)).configure(routes)).await;
        let suspend = "/api/v1/domains/Held.Test/suspend";
        assert_eq!(status!(app, "GET", "/api/v1/queue", None), 401);
        assert_eq!(status!(app, "GET", "/api/v1/queue", Some("wrong")), 401);
        assert_eq!(
            status!(app, "GET", "/api/v1/queue", Some("viewer-token")),
            200
        );
        assert_eq!(
            status!(app, "GET", "/api/v1/queue", Some("admin-token")),
            200
        );
        assert_eq!(status!(app, "POST", suspend, None), 401);
        assert_eq!(status!(app, "POST", suspend, Some("wrong")), 401);
        assert_eq!(status!(app, "POST", suspend, Some("viewer-token")), 403);
        assert_eq!(status!(app, "POST", suspend, Some("admin-token")), 200);
        assert_eq!(
            status!(
                app,
                "POST",
                "/api/v1/domains/a_b/resume",
                Some("admin-token")
            ),
            400
        );
        assert_eq!(
            status!(app, "POST", "/api/v1/queue", Some("admin-token")),
            405
        );
        assert_eq!(status!(app, "GET", "/healthz", None), 200);
        assert_eq!(status!(app, "GET", "/readyz", None), 200);
        // A node on the local backend is no cluster: a viewer hears so.
        assert_eq!(status!(app, "GET", "/api/v1/cluster", None), 401);
        assert_eq!(
            status!(app, "GET", "/api/v1/cluster", Some("viewer-token")),
            404
        );
        // Only the admin's valid request reached the queue, normalised.
        assert_eq!(*seen.lock().unwrap(), [("held.test".to_string(), true)]);
    }

    #[actix_web::test]
    async fn without_operators_the_api_is_open() {
        let (env, seen) = env(&[], false);
        let app =
            http::init_service(App::new().app_data(web::Data::new(env)).configure(routes)).await;
        let request = http::TestRequest::get().uri("/api/v1/queue").to_request();
        let stats: serde_json::Value = http::call_and_read_body_json(&app, request).await;
        assert_eq!(stats["messages"], 2);
        let request = http::TestRequest::post()
            .uri("/api/v1/domains/b%C3%BCcher.example/resume")
            .to_request();
        let state: DomainState = http::call_and_read_body_json(&app, request).await;
        assert_eq!(
            state,
            DomainState {
                domain: "xn--bcher-kva.example".into(),
                suspended: false
            }
        );
        assert_eq!(seen.lock().unwrap().len(), 1);
        assert_eq!(status!(app, "GET", "/readyz", None), 503);
    }
}
