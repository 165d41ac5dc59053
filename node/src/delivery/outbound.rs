//! One outbound SMTP connection: connect to the first next hop that
//! answers, say EHLO, start TLS by policy, log in when configured, then
//! carry messages with the transaction planner of `proto::client`.
//!
//! The protocol decisions live in `smarthost_proto::client`; this file
//! owns the socket, the timeouts and TLS.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use smarthost_proto::client::{
    self, AuthClient, AuthMechanism, AuthStep, Capabilities, Disposition, DowngradeWith,
    EightBitPolicy, Refusal, ReplyError, ReplyParser, Stage, Step, Transaction,
};
use smarthost_proto::mime8;
use smarthost_proto::reply::Reply;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::route::NextHop;
use super::{DomainPolicy, Job, MessageOutcome, RcptOutcome, RcptResult, RemoteInfo};
use crate::config::{Config, DeliveryConfig, TlsPolicy};
use crate::spool::{Body, SpoolError};

/// The two TLS client configurations, built once from the configuration
/// and shared by every connection.
#[derive(Clone, Debug)]
pub struct TlsClients {
    /// Verifies the server's certificate and name (`tls = "required"`).
    pub verified: Arc<ClientConfig>,
    /// Encrypts without verifying (`tls = "opportunistic"`, RFC 7435).
    pub opportunistic: Arc<ClientConfig>,
}

/// The TLS client configurations could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("delivery.tls_ca_file: cannot read {path}: {reason}")]
    CaFile { path: String, reason: String },
    #[error("TLS client set-up failed: {0}")]
    Rustls(#[from] rustls::Error),
}

impl TlsClients {
    /// Trust roots for verified TLS are the system's certificate store
    /// (`rustls-native-certs`: the roots the operator manages with the
    /// distribution's ca-certificates, the same that other mail software on
    /// the host trusts, updated without rebuilding smarthost) plus
    /// `delivery.tls_ca_file`.
    pub fn new(config: &DeliveryConfig) -> Result<TlsClients, TlsSetupError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());

        let mut roots = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for error in &native.errors {
            tracing::warn!(%error, "cannot load a system trust root");
        }
        roots.add_parsable_certificates(native.certs);
        if let Some(path) = &config.tls_ca_file {
            let ca_error = |reason: String| TlsSetupError::CaFile {
                path: path.display().to_string(),
                reason,
            };
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .and_then(|iter| iter.collect())
                .map_err(|e| ca_error(e.to_string()))?;
            if certs.is_empty() {
                return Err(ca_error("no certificate in the file".into()));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| ca_error(e.to_string()))?;
            }
        }
        let verified = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let opportunistic = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth();
        Ok(TlsClients {
            verified: Arc::new(verified),
            opportunistic: Arc::new(opportunistic),
        })
    }
}

/// Accepts any certificate but still checks the handshake signatures:
/// opportunistic TLS protects against passive eavesdropping only.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Everything one connection to one domain needs.
#[derive(Clone)]
pub struct OutboundSettings {
    /// The name in EHLO/HELO (`node.hostname`).
    pub ehlo_name: String,
    pub tls: TlsPolicy,
    /// User and password for AUTH, sent only over TLS.
    pub auth: Option<(String, String)>,
    pub verified_tls: Arc<ClientConfig>,
    pub opportunistic_tls: Arc<ClientConfig>,
    pub connect_timeout: Duration,
    pub greeting_timeout: Duration,
    pub command_timeout: Duration,
    pub data_timeout: Duration,
    /// Converts 8-bit messages for servers without 8BITMIME.
    pub eight_bit: Arc<dyn EightBitPolicy>,
}

impl fmt::Debug for OutboundSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutboundSettings")
            .field("ehlo_name", &self.ehlo_name)
            .field("tls", &self.tls)
            .field("auth_user", &self.auth.as_ref().map(|(user, _)| user))
            .field("connect_timeout", &self.connect_timeout)
            .field("greeting_timeout", &self.greeting_timeout)
            .field("command_timeout", &self.command_timeout)
            .field("data_timeout", &self.data_timeout)
            .finish_non_exhaustive()
    }
}

impl OutboundSettings {
    /// Settings for `policy`, building the TLS configurations. Callers that
    /// open many connections build [`TlsClients`] once and use
    /// [`OutboundSettings::with_tls`].
    pub fn new(config: &Config, policy: &DomainPolicy) -> Result<Self, TlsSetupError> {
        let tls = TlsClients::new(&config.delivery)?;
        Ok(OutboundSettings::with_tls(config, policy, &tls))
    }

    /// Settings for `policy` with shared TLS configurations. 8-bit messages
    /// to servers without 8BITMIME are converted to 7-bit MIME (RFC 6152);
    /// what cannot be converted fails with 5.6.3.
    pub fn with_tls(config: &Config, policy: &DomainPolicy, tls: &TlsClients) -> Self {
        let delivery = &config.delivery;
        OutboundSettings {
            ehlo_name: config.node.hostname.clone(),
            tls: policy.tls,
            auth: policy.auth.clone(),
            verified_tls: tls.verified.clone(),
            opportunistic_tls: tls.opportunistic.clone(),
            connect_timeout: delivery.connect_timeout,
            greeting_timeout: delivery.greeting_timeout,
            command_timeout: delivery.command_timeout,
            data_timeout: delivery.data_timeout,
            eight_bit: Arc::new(DowngradeWith(|body| {
                mime8::downgrade(body).map_err(|e| e.to_string())
            })),
        }
    }
}

/// No connection could be made. The text names the hosts and what
/// went wrong. Failing hosts, a 5xx greeting included, are skipped for the
/// next one, and a delivery is deferred when none is left (as Postfix does
/// by default): [`Outbound::connect`] only gives `Temporary`. `Permanent`
/// is for callers that know more (a policy that can never be met).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Temporary(String),
    #[error("{0}")]
    Permanent(String),
}

impl ConnectError {
    pub fn is_permanent(&self) -> bool {
        matches!(self, ConnectError::Permanent(_))
    }

    /// What becomes of the recipients of a job that could not be sent.
    pub fn result(&self) -> RcptResult {
        if self.is_permanent() {
            RcptResult::Failed
        } else {
            RcptResult::Deferred
        }
    }
}

/// Why one exchange on an open connection failed; the connection is
/// unusable after it.
#[derive(Debug)]
enum IoFailure {
    Io(io::Error),
    Timeout(Duration),
    Closed,
    Reply(ReplyError),
    /// The body could not be read on while it was sent: the data was cut
    /// off without its end, so the server takes none of it.
    Spool(SpoolError),
}

impl fmt::Display for IoFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IoFailure::Io(e) => write!(f, "{e}"),
            IoFailure::Timeout(limit) => {
                write!(f, "timed out after {}", humantime::format_duration(*limit))
            }
            IoFailure::Closed => f.write_str("the server closed the connection"),
            IoFailure::Reply(e) => write!(f, "{e}"),
            IoFailure::Spool(e) => write!(f, "{e}"),
        }
    }
}

/// How much of a body is encoded and written at once.
const BODY_CHUNK: usize = 64 * 1024;

enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// A socket with the reply parser that reads it.
struct Connection {
    stream: Stream,
    parser: ReplyParser,
    buffer: Vec<u8>,
}

impl Connection {
    fn new(stream: Stream) -> Self {
        Connection {
            stream,
            parser: ReplyParser::new(),
            buffer: vec![0; 16 * 1024],
        }
    }

    async fn read_reply(&mut self, limit: Duration) -> Result<Reply, IoFailure> {
        let read = async {
            loop {
                if let Some(reply) = self.parser.next_reply().map_err(IoFailure::Reply)? {
                    return Ok(reply);
                }
                let n = match &mut self.stream {
                    Stream::Plain(s) => s.read(&mut self.buffer).await,
                    Stream::Tls(s) => s.read(&mut self.buffer).await,
                }
                .map_err(IoFailure::Io)?;
                if n == 0 {
                    return Err(IoFailure::Closed);
                }
                self.parser.feed(&self.buffer[..n]);
            }
        };
        tokio::time::timeout(limit, read)
            .await
            .map_err(|_| IoFailure::Timeout(limit))?
    }

    async fn write(&mut self, bytes: &[u8], limit: Duration) -> Result<(), IoFailure> {
        let write = async {
            match &mut self.stream {
                Stream::Plain(s) => s.write_all(bytes).await,
                Stream::Tls(s) => {
                    s.write_all(bytes).await?;
                    s.flush().await
                }
            }
        };
        tokio::time::timeout(limit, write)
            .await
            .map_err(|_| IoFailure::Timeout(limit))?
            .map_err(IoFailure::Io)
    }

    async fn command(&mut self, bytes: &[u8], limit: Duration) -> Result<Reply, IoFailure> {
        self.write(bytes, limit).await?;
        self.read_reply(limit).await
    }

    /// Writes the body as DATA lines (`.CRLF` included), all within `limit`:
    /// `converted` when the body had to be made 7-bit, else `body`, whose
    /// part on disk is read a chunk at a time as it goes. Each chunk is
    /// written once the next is encoded, so the end of data goes out with
    /// the last: one write, one segment for a small message.
    async fn write_body(
        &mut self,
        body: &Body,
        converted: Option<&[u8]>,
        limit: Duration,
    ) -> Result<(), IoFailure> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut encoder = client::BodyEncoder::new();
        let mut out = Vec::with_capacity(BODY_CHUNK + BODY_CHUNK / 8);
        let in_memory = converted.unwrap_or(body.head());
        for chunk in in_memory.chunks(BODY_CHUNK) {
            self.write_pending(&mut out, deadline, limit).await?;
            encoder.encode(chunk, &mut out);
        }
        if let Some(rest) = body.rest().filter(|_| converted.is_none()) {
            let mut at = 0;
            while at < rest.len() {
                let part = rest.clone();
                let chunk = tokio::task::spawn_blocking(move || part.chunk_at(at, BODY_CHUNK))
                    .await
                    .map_err(|e| IoFailure::Spool(SpoolError::Unavailable(e.to_string())))?
                    .map_err(IoFailure::Spool)?;
                at += chunk.len() as u64;
                self.write_pending(&mut out, deadline, limit).await?;
                encoder.encode(&chunk, &mut out);
            }
        }
        encoder.finish(&mut out);
        self.write_by(&out, deadline, limit).await
    }

    /// Writes what `out` holds, if anything, and empties it.
    async fn write_pending(
        &mut self,
        out: &mut Vec<u8>,
        deadline: tokio::time::Instant,
        limit: Duration,
    ) -> Result<(), IoFailure> {
        if !out.is_empty() {
            self.write_by(out, deadline, limit).await?;
            out.clear();
        }
        Ok(())
    }

    /// Writes `bytes` by `deadline`; a timeout names the whole `limit`
    /// the deadline was set from, not what was left of it.
    async fn write_by(
        &mut self,
        bytes: &[u8],
        deadline: tokio::time::Instant,
        limit: Duration,
    ) -> Result<(), IoFailure> {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        self.write(bytes, left).await.map_err(|e| match e {
            IoFailure::Timeout(_) => IoFailure::Timeout(limit),
            other => other,
        })
    }

    /// QUIT, waiting for the answer at most `command_timeout` and never
    /// longer than [`QUIT_WAIT`].
    async fn quit(mut self, command_timeout: Duration) {
        if self
            .command(client::QUIT, command_timeout.min(QUIT_WAIT))
            .await
            .is_ok()
        {
            let _ = match &mut self.stream {
                Stream::Plain(s) => s.shutdown().await,
                Stream::Tls(s) => s.shutdown().await,
            };
        }
    }
}

/// Why one host could not be used.
enum HostError {
    /// Try the next address.
    Failed(String),
    /// The TLS handshake failed under opportunistic TLS: try this host
    /// again without TLS.
    Handshake(String),
}

/// One open SMTP connection, greeted, with TLS and AUTH done as the
/// policy asks.
pub struct Outbound {
    conn: Connection,
    /// Counts this connection as open until it is dropped.
    _open: crate::metrics::OutboundOpen,
    caps: Capabilities,
    remote: RemoteInfo,
    settings: OutboundSettings,
    usable: bool,
}

impl fmt::Debug for Outbound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outbound")
            .field("remote", &self.remote)
            .field("caps", &self.caps)
            .field("usable", &self.usable)
            .finish_non_exhaustive()
    }
}

impl Outbound {
    /// Tries every address of every hop in order until one greets with 220
    /// and takes EHLO (and STARTTLS and AUTH as the settings ask). When
    /// none does, the error is temporary and lists what each host did.
    pub async fn connect(
        hops: &[NextHop],
        settings: &OutboundSettings,
    ) -> Result<Outbound, ConnectError> {
        let mut failures = Vec::new();
        for hop in hops {
            for &addr in &hop.addrs {
                let attempt = match Outbound::open(hop, addr, settings, true).await {
                    Err(HostError::Handshake(why)) => {
                        tracing::info!(host = %hop.name, %addr, %why,
                            "TLS handshake failed; trying again without TLS");
                        Outbound::open(hop, addr, settings, false).await
                    }
                    other => other,
                };
                match attempt {
                    Ok(outbound) => return Ok(outbound),
                    Err(HostError::Failed(why) | HostError::Handshake(why)) => {
                        tracing::debug!(host = %hop.name, %addr, %why, "host failed");
                        failures.push(why);
                    }
                }
            }
        }
        if failures.is_empty() {
            return Err(ConnectError::Temporary(
                "451 4.4.4 no address to connect to".to_string(),
            ));
        }
        Err(ConnectError::Temporary(format!(
            "451 4.4.1 all hosts failed: {}",
            failures.join("; ")
        )))
    }

    async fn open(
        hop: &NextHop,
        addr: SocketAddr,
        settings: &OutboundSettings,
        tls_allowed: bool,
    ) -> Result<Outbound, HostError> {
        let host = format!("{}[{}]", hop.name, addr);
        let failed = |what: &str, why: &dyn fmt::Display| {
            HostError::Failed(format!("{host}: {what}: {why}"))
        };

        let tcp =
            match tokio::time::timeout(settings.connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(tcp)) => tcp,
                Ok(Err(e)) => return Err(failed("connect", &e)),
                Err(_) => {
                    return Err(failed(
                        "connect",
                        &IoFailure::Timeout(settings.connect_timeout),
                    ))
                }
            };
        let _ = tcp.set_nodelay(true);
        let mut conn = Connection::new(Stream::Plain(tcp));
        let greeting = conn
            .read_reply(settings.greeting_timeout)
            .await
            .map_err(|e| failed("greeting", &e))?;
        if greeting.code != 220 {
            conn.quit(settings.command_timeout).await;
            return Err(failed("greeting", &greeting));
        }
        let mut caps = hello(&mut conn, settings, true)
            .await
            .map_err(|why| failed("EHLO", &why))?;

        let mut tls_version = None;
        let start_tls = match settings.tls {
            TlsPolicy::Disabled => false,
            TlsPolicy::Opportunistic => tls_allowed && caps.starttls,
            TlsPolicy::Required if !caps.starttls => {
                conn.quit(settings.command_timeout).await;
                return Err(HostError::Failed(format!(
                    "{host}: TLS is required but the server does not offer STARTTLS"
                )));
            }
            TlsPolicy::Required => true,
        };
        if start_tls {
            let reply = conn
                .command(client::STARTTLS, settings.command_timeout)
                .await
                .map_err(|e| failed("STARTTLS", &e))?;
            if reply.code != 220 {
                if settings.tls == TlsPolicy::Required {
                    conn.quit(settings.command_timeout).await;
                    return Err(failed("STARTTLS", &reply));
                }
                // Opportunistic: go on in clear on the same connection.
            } else {
                // Whatever the server sent after its 220 came before the
                // handshake and must never be read as protected: the old
                // connection and its parser are dropped with it.
                let Stream::Plain(tcp) = conn.stream else {
                    return Err(HostError::Failed(format!("{host}: TLS already active")));
                };
                let verified = settings.tls == TlsPolicy::Required;
                let config = if verified {
                    settings.verified_tls.clone()
                } else {
                    settings.opportunistic_tls.clone()
                };
                let name = hop.name.trim_end_matches('.').to_string();
                let server_name =
                    ServerName::try_from(name).map_err(|e| failed("TLS server name", &e))?;
                let handshake = tokio::time::timeout(
                    settings.command_timeout,
                    TlsConnector::from(config).connect(server_name, tcp),
                )
                .await
                .map_err(|_| IoFailure::Timeout(settings.command_timeout).to_string())
                .and_then(|done| done.map_err(|e| e.to_string()));
                let tls = match handshake {
                    Ok(tls) => tls,
                    Err(e) => {
                        let why = format!("{host}: TLS handshake: {e}");
                        return Err(if verified {
                            HostError::Failed(why)
                        } else {
                            HostError::Handshake(why)
                        });
                    }
                };
                tls_version = tls.get_ref().1.protocol_version().map(|v| format!("{v:?}"));
                conn = Connection::new(Stream::Tls(Box::new(tls)));
                caps = hello(&mut conn, settings, false)
                    .await
                    .map_err(|why| failed("EHLO after STARTTLS", &why))?;
            }
        }

        if let Some((user, password)) = &settings.auth {
            if tls_version.is_none() {
                conn.quit(settings.command_timeout).await;
                return Err(HostError::Failed(format!(
                    "{host}: AUTH is configured, but the connection is not encrypted"
                )));
            }
            match AuthMechanism::choose(&caps) {
                Some(mechanism) => {
                    authenticate(
                        &mut conn,
                        mechanism,
                        user,
                        password,
                        settings.command_timeout,
                    )
                    .await
                    .map_err(|why| failed("AUTH", &why))?;
                }
                None if caps.auth.is_empty() => {
                    tracing::info!(%host, "AUTH configured but not offered; sending without it");
                }
                None => {
                    conn.quit(settings.command_timeout).await;
                    return Err(HostError::Failed(format!(
                        "{host}: AUTH offers {}, none of PLAIN and LOGIN",
                        caps.auth.join(" ")
                    )));
                }
            }
        }

        Ok(Outbound {
            conn,
            _open: crate::metrics::OutboundOpen::new(),
            caps,
            remote: RemoteInfo {
                host: hop.name.clone(),
                ip: Some(addr.ip()),
                tls: tls_version,
            },
            settings: settings.clone(),
            usable: true,
        })
    }

    /// Sends one job and gives a result for each of its recipients. After
    /// an I/O error or a timeout the connection is unusable and the
    /// recipients without an answer are deferred.
    pub async fn send(&mut self, job: &Job) -> MessageOutcome {
        let started = Instant::now();
        if !self.usable {
            let mut outcome = MessageOutcome::all(
                job,
                RcptResult::Deferred,
                "451 4.4.2 connection no longer usable",
                started.elapsed(),
            );
            outcome.remote = Some(self.remote.clone());
            return outcome;
        }
        let indices: Vec<u32> = job.recipients().map(|(i, _)| i).collect();
        let mut tx = match plan(&self.caps, job, &indices, &*self.settings.eight_bit).await {
            Ok(tx) => tx,
            Err((result, text)) => {
                let mut outcome = MessageOutcome::all(job, result, text, started.elapsed());
                outcome.remote = Some(self.remote.clone());
                return outcome;
            }
        };
        if let Err(failure) = self.drive(&mut tx, &job.body).await {
            self.usable = false;
            let text = match &failure {
                IoFailure::Spool(error) => {
                    format!("451 4.3.0 cannot read the message from the spool: {error}")
                }
                _ => format!("451 4.4.2 connection lost after {}: {failure}", tx.stage()),
            };
            tracing::info!(host = %self.remote.host, %text, "connection lost");
            tx.abort(Disposition::Deferred, &text);
        }
        MessageOutcome {
            recipients: tx
                .into_results()
                .into_iter()
                .map(|r| RcptOutcome {
                    recipient: r.recipient,
                    result: match r.disposition {
                        Disposition::Delivered => RcptResult::Delivered,
                        Disposition::Deferred => RcptResult::Deferred,
                        Disposition::Failed => RcptResult::Failed,
                    },
                    reply: r.reply,
                })
                .collect(),
            remote: Some(self.remote.clone()),
            latency: started.elapsed(),
        }
    }

    async fn drive(&mut self, tx: &mut Transaction, body: &Body) -> Result<(), IoFailure> {
        let settings = &self.settings;
        let mut step = tx.start();
        loop {
            match step {
                Step::Write(bytes) => self.conn.write(&bytes, settings.command_timeout).await?,
                Step::WriteBody => {
                    self.conn
                        .write_body(body, tx.converted(), settings.data_timeout)
                        .await?
                }
                Step::Read => {}
                Step::Done => return Ok(()),
            }
            let limit = match tx.stage() {
                Stage::Body | Stage::EmptyBody => settings.data_timeout,
                _ => settings.command_timeout,
            };
            let reply = self.conn.read_reply(limit).await?;
            if reply.code == 421 {
                // The server is closing the connection.
                self.usable = false;
            }
            step = tx.on_reply(&reply);
        }
    }

    /// Whether another message may be sent on this connection.
    pub fn is_usable(&self) -> bool {
        self.usable
    }

    pub fn remote(&self) -> &RemoteInfo {
        &self.remote
    }

    /// What the server offered in its (last) EHLO reply.
    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    /// Says QUIT and closes the connection.
    pub async fn quit(self) {
        if self.usable {
            self.conn.quit(self.settings.command_timeout).await;
        }
    }
}

/// The transaction for `job` on a server with `caps`, or the result and
/// reply for all its recipients when it cannot be sent there. A body with
/// a part on disk is looked through on disk for 8-bit octets, and read
/// whole only when it has them and must be converted.
async fn plan(
    caps: &Capabilities,
    job: &Job,
    indices: &[u32],
    eight_bit: &dyn EightBitPolicy,
) -> Result<Transaction, (RcptResult, String)> {
    let refused = |refusal: Refusal| (RcptResult::Failed, refusal.to_string());
    if job.body.rest().is_none() {
        return Transaction::new(
            caps,
            &job.record.envelope,
            indices,
            job.body.head(),
            eight_bit,
        )
        .map_err(refused);
    }
    let unreadable = |error: SpoolError| {
        let text = format!("451 4.3.0 cannot read the message from the spool: {error}");
        (RcptResult::Deferred, text)
    };
    let body = job.body.clone();
    let has_8bit = tokio::task::spawn_blocking(move || {
        let mut found = false;
        body.for_each_chunk(|chunk| {
            found |= mime8::is_8bit(chunk);
            Ok(())
        })
        .map(|()| found)
    })
    .await
    .map_err(|e| unreadable(SpoolError::Unavailable(e.to_string())))?
    .map_err(unreadable)?;
    if has_8bit && !caps.eight_bit_mime {
        let body = job.body.clone();
        let whole = tokio::task::spawn_blocking(move || body.to_vec())
            .await
            .map_err(|e| unreadable(SpoolError::Unavailable(e.to_string())))?
            .map_err(unreadable)?;
        return Transaction::new(caps, &job.record.envelope, indices, &whole, eight_bit)
            .map_err(refused);
    }
    let size = job.body.len();
    Transaction::planned(caps, &job.record.envelope, indices, size, has_8bit).map_err(refused)
}

/// The longest wait for the answer to QUIT: nothing depends on it.
const QUIT_WAIT: Duration = Duration::from_secs(30);

/// EHLO, and HELO when EHLO is refused with 5xx (only before TLS: after
/// STARTTLS the server has shown it speaks ESMTP).
async fn hello(
    conn: &mut Connection,
    settings: &OutboundSettings,
    helo_fallback: bool,
) -> Result<Capabilities, String> {
    let limit = settings.command_timeout;
    let reply = conn
        .command(&client::ehlo(&settings.ehlo_name), limit)
        .await
        .map_err(|e| e.to_string())?;
    match reply.code {
        250 => Ok(Capabilities::from_ehlo(&reply)),
        500..=599 if helo_fallback => {
            let reply = conn
                .command(&client::helo(&settings.ehlo_name), limit)
                .await
                .map_err(|e| e.to_string())?;
            if reply.code == 250 {
                Ok(Capabilities::default())
            } else {
                Err(reply.to_string())
            }
        }
        _ => Err(reply.to_string()),
    }
}

async fn authenticate(
    conn: &mut Connection,
    mechanism: AuthMechanism,
    user: &str,
    password: &str,
    limit: Duration,
) -> Result<(), String> {
    let mut auth = AuthClient::new(mechanism, user, password);
    let mut reply = conn
        .command(&auth.start(), limit)
        .await
        .map_err(|e| e.to_string())?;
    loop {
        match auth.on_reply(&reply).map_err(|e| e.to_string())? {
            AuthStep::Done => return Ok(()),
            AuthStep::Write(bytes) => {
                reply = conn
                    .command(&bytes, limit)
                    .await
                    .map_err(|e| e.to_string())?
            }
        }
    }
}

#[cfg(test)]
mod tests;
