//! Deliveries to a real SMTP server on loopback: aiosmtpd from Debian's
//! `python3-aiosmtpd`, driven by the black-box tests' sink `tests/peers/sink.py`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use smarthost_proto::address::Mailbox;
use smarthost_proto::envelope::{ClientInfo, Envelope, MessageId, MessageRecord, Recipient};
use smarthost_testkit::free_port;

use super::*;
use crate::delivery::Route;

const PYTHON: &str = "/usr/bin/python3";

#[derive(Default)]
struct SinkOptions {
    pipelining: bool,
    no_8bitmime: bool,
    tls: Option<(PathBuf, PathBuf)>,
    /// (address, reply) for RCPT TO.
    replies: Vec<(&'static str, &'static str)>,
}

/// The aiosmtpd sink of the black-box tests (`tests/peers/sink.py`);
/// stopped when dropped.
struct Sink {
    child: Child,
    port: u16,
    out: tempfile::TempDir,
}

impl Sink {
    fn start(options: SinkOptions) -> Sink {
        let out = tempfile::tempdir().unwrap();
        let port = free_port();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/peers/sink.py");
        let mut command = Command::new(PYTHON);
        command
            .arg(script)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--dir")
            .arg(out.path());
        if options.pipelining {
            command.arg("--pipelining");
        }
        if options.no_8bitmime {
            command.arg("--no-8bitmime");
        }
        if let Some((cert, key)) = &options.tls {
            command
                .arg("--tls-cert")
                .arg(cert)
                .arg("--tls-key")
                .arg(key);
        }
        if !options.replies.is_empty() {
            let rcpt: serde_json::Map<String, serde_json::Value> = options
                .replies
                .iter()
                .map(|(address, reply)| (address.to_string(), (*reply).into()))
                .collect();
            let path = out.path().join("script.json");
            std::fs::write(&path, serde_json::json!({ "rcpt": rcpt }).to_string()).unwrap();
            command.arg("--script").arg(path);
        }
        // Its complaints (clients that abort a handshake on purpose) go to
        // a file next to the messages.
        let log = std::fs::File::create(out.path().join("peer.log")).unwrap();
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start /usr/bin/python3 (apt-get install -y python3-aiosmtpd)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(
            line.trim(),
            "READY",
            "the SMTP peer did not start (is python3-aiosmtpd installed?): {}",
            std::fs::read_to_string(out.path().join("peer.log")).unwrap_or_default()
        );
        Sink { child, port, out }
    }

    fn hop(&self) -> NextHop {
        NextHop {
            name: "localhost".into(),
            addrs: vec![SocketAddr::from(([127, 0, 0, 1], self.port))],
        }
    }

    /// The n-th message received (from 1): its envelope record and its data.
    fn message(&self, n: usize) -> (serde_json::Value, Vec<u8>) {
        let base = self.out.path().join(n.to_string());
        let record = std::fs::read_to_string(base.with_extension("json"))
            .unwrap_or_else(|e| panic!("message {n} not received: {e}"));
        (
            serde_json::from_str(&record).unwrap(),
            std::fs::read(base.with_extension("eml")).unwrap(),
        )
    }

    /// Messages received so far (`N.eml`).
    fn received(&self) -> usize {
        std::fs::read_dir(self.out.path())
            .unwrap()
            .filter(|e| {
                let path = e.as_ref().unwrap().path();
                path.extension().is_some_and(|x| x == "eml")
            })
            .count()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mailbox(text: &str) -> Mailbox {
    let (local_part, domain) = text.rsplit_once('@').unwrap();
    Mailbox {
        local_part: local_part.into(),
        domain: domain.into(),
    }
}

/// A job for recipients that share one domain.
fn job(recipients: &[&str], body: &[u8]) -> Job {
    let envelope = Envelope {
        sender: Some(mailbox("app@sender.test")),
        recipients: recipients
            .iter()
            .map(|r| Recipient {
                address: mailbox(r),
                notify: None,
                orcpt: None,
            })
            .collect(),
        ..Envelope::default()
    };
    let client = ClientInfo {
        ip: "127.0.0.1".parse().unwrap(),
        helo: "app".into(),
        auth_user: None,
        tls: false,
    };
    let record = MessageRecord::new(MessageId::new(1, 2), 0, body.len() as u64, client, envelope);
    assert_eq!(record.deliveries.len(), 1);
    Job {
        record: Arc::new(record),
        delivery: 0,
        body: Arc::new(Body::from(body.to_vec())),
    }
}

fn settings(tls: TlsPolicy, ca_file: Option<PathBuf>) -> OutboundSettings {
    let mut config = Config::default();
    config.node.hostname = "relay.test".into();
    config.delivery.tls_ca_file = ca_file;
    config.delivery.connect_timeout = Duration::from_secs(5);
    config.delivery.greeting_timeout = Duration::from_secs(10);
    config.delivery.command_timeout = Duration::from_secs(10);
    config.delivery.data_timeout = Duration::from_secs(10);
    let policy = DomainPolicy {
        domain: "example.test".into(),
        route: Route::Mx,
        tls,
        auth: None,
        max_connections: 1,
        rate: None,
        max_messages_per_connection: 10,
    };
    OutboundSettings::new(&config, &policy).unwrap()
}

fn results(outcome: &MessageOutcome) -> Vec<(u32, RcptResult)> {
    outcome
        .recipients
        .iter()
        .map(|r| (r.recipient, r.result))
        .collect()
}

/// A CA and a server certificate for `localhost` and 127.0.0.1.
struct TestCa {
    dir: tempfile::TempDir,
}

impl TestCa {
    fn create() -> TestCa {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
        let dir = tempfile::tempdir().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "delivery test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &ca).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.path().join("server.pem"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("server.key"), key.serialize_pem()).unwrap();
        TestCa { dir }
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn server(&self) -> (PathBuf, PathBuf) {
        (
            self.dir.path().join("server.pem"),
            self.dir.path().join("server.key"),
        )
    }
}

#[tokio::test]
async fn messages_with_dot_lines_arrive_byte_exact() {
    let sink = Sink::start(SinkOptions::default());
    let settings = settings(TlsPolicy::Disabled, None);
    let mut outbound = Outbound::connect(&[sink.hop()], &settings).await.unwrap();
    assert!(!outbound.capabilities().pipelining);
    assert_eq!(outbound.remote().host, "localhost");
    assert_eq!(outbound.remote().tls, None);

    let body = b"Subject: dots\r\n\r\n.\r\n..x\r\n.leading\r\n.\r\nend\r\n";
    let outcome = outbound.send(&job(&["a@example.test"], body)).await;
    assert_eq!(results(&outcome), vec![(0, RcptResult::Delivered)]);
    assert!(
        outcome.recipients[0].reply.starts_with("250 2.0.0"),
        "{outcome:?}"
    );
    assert!(outbound.is_usable());

    // A second message on the same connection; a stored body with bare
    // LF line endings and no final line ending goes out as CRLF lines.
    let outcome = outbound
        .send(&job(&["b@example.test"], b"Subject: lf\n\n.\nlast"))
        .await;
    assert_eq!(results(&outcome), vec![(0, RcptResult::Delivered)]);
    outbound.quit().await;

    let (record, data) = sink.message(1);
    assert_eq!(data, body);
    assert!(record["mail_from"] == "app@sender.test", "{record}");
    assert_eq!(record["helo"], "relay.test", "{record}");
    let (_, data) = sink.message(2);
    assert_eq!(data, b"Subject: lf\r\n\r\n.\r\nlast\r\n");
}

/// A body of `len` bytes in lines of many lengths, with a dot-line at
/// the start of each 64 KiB of it (where the chunks it is read and sent
/// in begin) and, with `eight_bit`, one 8-bit line near its end.
fn long_body(len: usize, eight_bit: bool) -> Vec<u8> {
    let mut body = b"Subject: long\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n".to_vec();
    let mut n = 0usize;
    while body.len() < len {
        n += 1;
        if body.len() % (64 * 1024) > 64 * 1024 - 80 {
            // The next line starts at a chunk boundary or just past it.
            let pad = 64 * 1024 - body.len() % (64 * 1024);
            body.extend(std::iter::repeat_n(b'p', pad.saturating_sub(2)));
            body.extend_from_slice(b"\r\n.\r\n..dots\r\n");
            continue;
        }
        body.extend(std::iter::repeat_n(b'a' + (n % 26) as u8, n % 77));
        body.extend_from_slice(b"\r\n");
    }
    if eight_bit {
        body.extend_from_slice("caf\u{e9} cr\u{e8}me\r\n".as_bytes());
    }
    body.extend_from_slice(b"end\r\n");
    body
}

/// `bytes` as a body with its first `head` bytes in memory and the rest
/// in a file, as a spool gives a large one.
fn body_on_disk(bytes: &[u8], head: usize) -> Body {
    use std::io::Write;
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(&bytes[head..]).unwrap();
    Body::spilled(bytes[..head].to_vec(), file, (bytes.len() - head) as u64)
}

fn job_with_body(recipient: &str, body: Body) -> Job {
    let mut job = job(&[recipient], b"");
    job.body = Arc::new(body);
    job
}

#[tokio::test]
async fn a_body_on_disk_goes_out_a_chunk_at_a_time_byte_exact() {
    let sink = Sink::start(SinkOptions::default());
    let mut outbound = Outbound::connect(&[sink.hop()], &settings(TlsPolicy::Disabled, None))
        .await
        .unwrap();
    let plain = long_body(700_000, false);
    let eight_bit = long_body(300_000, true);
    for (n, bytes) in [&plain, &eight_bit].into_iter().enumerate() {
        let job = job_with_body("a@example.test", body_on_disk(bytes, 64 * 1024));
        let outcome = outbound.send(&job).await;
        assert_eq!(
            results(&outcome),
            vec![(0, RcptResult::Delivered)],
            "{n}: {outcome:?}"
        );
    }
    outbound.quit().await;
    let (record, data) = sink.message(1);
    assert!(data == plain, "the 7-bit body changed on the way");
    assert!(
        !record["mail_options"].to_string().contains("8BITMIME"),
        "{record}"
    );
    let (record, data) = sink.message(2);
    assert!(data == eight_bit, "the 8-bit body changed on the way");
    assert!(
        record["mail_options"].to_string().contains("BODY=8BITMIME"),
        "{record}"
    );
}

#[tokio::test]
async fn an_8bit_body_on_disk_is_converted_for_a_server_without_8bitmime() {
    let sink = Sink::start(SinkOptions {
        no_8bitmime: true,
        ..SinkOptions::default()
    });
    let mut outbound = Outbound::connect(&[sink.hop()], &settings(TlsPolicy::Disabled, None))
        .await
        .unwrap();
    let bytes = long_body(300_000, true);
    let job = job_with_body("a@example.test", body_on_disk(&bytes, 1000));
    let outcome = outbound.send(&job).await;
    assert_eq!(
        results(&outcome),
        vec![(0, RcptResult::Delivered)],
        "{outcome:?}"
    );
    outbound.quit().await;
    let (_, data) = sink.message(1);
    assert!(data.is_ascii(), "sent as 7-bit");
    assert_eq!(data, mime8::downgrade(&bytes).unwrap());
}

#[tokio::test]
async fn a_body_that_cannot_be_read_to_its_end_is_not_sent() {
    use std::io::Write;
    let sink = Sink::start(SinkOptions::default());
    let mut outbound = Outbound::connect(&[sink.hop()], &settings(TlsPolicy::Disabled, None))
        .await
        .unwrap();
    let bytes = long_body(300_000, false);
    // The file holds less than the body says: reading on fails part way.
    let short = || {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&bytes[1000..200_000]).unwrap();
        Body::spilled(bytes[..1000].to_vec(), file, (bytes.len() - 1000) as u64)
    };
    // Found when the body is looked through before MAIL: deferred, and
    // the connection stays good for the next message.
    let outcome = outbound
        .send(&job_with_body("a@example.test", short()))
        .await;
    assert_eq!(
        results(&outcome),
        vec![(0, RcptResult::Deferred)],
        "{outcome:?}"
    );
    assert!(
        outcome.recipients[0]
            .reply
            .starts_with("451 4.3.0 cannot read the message from the spool"),
        "{outcome:?}"
    );
    assert!(outbound.is_usable());

    // Failing while the data is on its way (the file changed after it was
    // looked through): the data is cut off without its end.
    let job = job_with_body("a@example.test", short());
    let mut tx = Transaction::planned(
        &outbound.caps,
        &job.record.envelope,
        &[0],
        job.body.len(),
        false,
    )
    .unwrap();
    let failure = outbound.drive(&mut tx, &job.body).await.unwrap_err();
    assert!(matches!(failure, IoFailure::Spool(_)), "{failure}");
    drop(outbound);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.received(), 0, "the server took none of it");
}

#[tokio::test]
async fn pipelined_transaction_with_mixed_recipient_replies() {
    let sink = Sink::start(SinkOptions {
        pipelining: true,
        replies: vec![
            ("later@example.test", "451 4.2.0 try later"),
            ("nobody@example.test", "550 5.1.1 no such user"),
        ],
        ..SinkOptions::default()
    });
    let mut outbound = Outbound::connect(&[sink.hop()], &settings(TlsPolicy::Disabled, None))
        .await
        .unwrap();
    assert!(outbound.capabilities().pipelining);
    let job = job(
        &[
            "one@example.test",
            "later@example.test",
            "nobody@example.test",
            "two@example.test",
        ],
        b"Subject: mixed\r\n\r\nhello\r\n",
    );
    let outcome = outbound.send(&job).await;
    assert_eq!(
        results(&outcome),
        vec![
            (0, RcptResult::Delivered),
            (1, RcptResult::Deferred),
            (2, RcptResult::Failed),
            (3, RcptResult::Delivered),
        ]
    );
    assert_eq!(outcome.recipients[1].reply, "451 4.2.0 try later");
    assert_eq!(outcome.recipients[2].reply, "550 5.1.1 no such user");
    assert_eq!(outcome.remote.as_ref().unwrap().host, "localhost");

    // Nobody accepted: RSET instead of the data, and the connection goes on.
    let outcome = outbound.send(&job_for(&["nobody@example.test"])).await;
    assert_eq!(results(&outcome), vec![(0, RcptResult::Failed)]);
    assert!(outbound.is_usable());
    let outcome = outbound.send(&job_for(&["three@example.test"])).await;
    assert_eq!(results(&outcome), vec![(0, RcptResult::Delivered)]);
    outbound.quit().await;

    let (record, data) = sink.message(1);
    assert!(
        record["rcpt_tos"] == serde_json::json!(["one@example.test", "two@example.test"]),
        "{record}"
    );
    assert_eq!(data, b"Subject: mixed\r\n\r\nhello\r\n");
    assert_eq!(sink.received(), 2);
}

fn job_for(recipients: &[&str]) -> Job {
    job(recipients, b"Subject: t\r\n\r\nbody\r\n")
}

#[tokio::test]
async fn mixed_replies_without_pipelining() {
    let sink = Sink::start(SinkOptions {
        replies: vec![
            ("later@example.test", "451 4.2.0 try later"),
            ("nobody@example.test", "550 5.1.1 no such user"),
        ],
        ..SinkOptions::default()
    });
    let mut outbound = Outbound::connect(&[sink.hop()], &settings(TlsPolicy::Disabled, None))
        .await
        .unwrap();
    let outcome = outbound
        .send(&job_for(&[
            "nobody@example.test",
            "one@example.test",
            "later@example.test",
        ]))
        .await;
    assert_eq!(
        results(&outcome),
        vec![
            (0, RcptResult::Failed),
            (1, RcptResult::Delivered),
            (2, RcptResult::Deferred),
        ]
    );
    outbound.quit().await;
    assert_eq!(sink.received(), 1);
}

#[tokio::test]
async fn a_refused_first_host_falls_through_to_the_next_hop() {
    let sink = Sink::start(SinkOptions::default());
    let dead = NextHop {
        name: "dead.example.test".into(),
        addrs: vec![SocketAddr::from(([127, 0, 0, 1], free_port()))],
    };
    let settings = settings(TlsPolicy::Disabled, None);
    let mut outbound = Outbound::connect(&[dead.clone(), sink.hop()], &settings)
        .await
        .unwrap();
    assert_eq!(outbound.remote().host, "localhost");
    let outcome = outbound.send(&job_for(&["a@example.test"])).await;
    assert_eq!(results(&outcome), vec![(0, RcptResult::Delivered)]);
    outbound.quit().await;

    let err = Outbound::connect(&[dead], &settings).await.unwrap_err();
    assert!(!err.is_permanent());
    assert!(err.to_string().contains("all hosts failed"), "{err}");
    assert!(err.to_string().contains("dead.example.test"), "{err}");
}

#[tokio::test]
async fn required_tls_defers_an_untrusted_server_and_trusts_the_configured_ca() {
    let ca = TestCa::create();
    let sink = Sink::start(SinkOptions {
        tls: Some(ca.server()),
        ..SinkOptions::default()
    });

    let err = Outbound::connect(&[sink.hop()], &settings(TlsPolicy::Required, None))
        .await
        .unwrap_err();
    assert_eq!(err.result(), RcptResult::Deferred);
    assert!(err.to_string().contains("TLS handshake"), "{err}");

    let settings = settings(TlsPolicy::Required, Some(ca.ca()));
    let mut outbound = Outbound::connect(&[sink.hop()], &settings).await.unwrap();
    assert!(outbound.remote().tls.is_some());
    assert!(!outbound.capabilities().starttls, "EHLO again after TLS");
    let outcome = outbound.send(&job_for(&["a@example.test"])).await;
    assert_eq!(results(&outcome), vec![(0, RcptResult::Delivered)]);
    outbound.quit().await;
    let (record, _) = sink.message(1);
    assert_eq!(record["tls"], true, "{record}");
}

#[tokio::test]
async fn required_tls_defers_a_server_without_starttls() {
    let sink = Sink::start(SinkOptions::default());
    let err = Outbound::connect(&[sink.hop()], &settings(TlsPolicy::Required, None))
        .await
        .unwrap_err();
    assert_eq!(err.result(), RcptResult::Deferred);
    assert!(err.to_string().contains("does not offer STARTTLS"), "{err}");
}

#[tokio::test]
async fn opportunistic_tls_is_used_when_offered() {
    let ca = TestCa::create();
    let sink = Sink::start(SinkOptions {
        tls: Some(ca.server()),
        pipelining: true,
        ..SinkOptions::default()
    });
    // The certificate is not trusted, and need not be.
    let settings = settings(TlsPolicy::Opportunistic, None);
    let mut outbound = Outbound::connect(&[sink.hop()], &settings).await.unwrap();
    assert!(outbound
        .remote()
        .tls
        .as_deref()
        .unwrap()
        .starts_with("TLSv1_"));
    let outcome = outbound.send(&job_for(&["a@example.test"])).await;
    assert_eq!(results(&outcome), vec![(0, RcptResult::Delivered)]);
    outbound.quit().await;
    let (record, _) = sink.message(1);
    assert_eq!(record["tls"], true, "{record}");

    // Without STARTTLS on offer, the message goes in clear.
    let plain = Sink::start(SinkOptions::default());
    let mut outbound = Outbound::connect(&[plain.hop()], &settings).await.unwrap();
    assert_eq!(outbound.remote().tls, None);
    let outcome = outbound.send(&job_for(&["a@example.test"])).await;
    assert_eq!(results(&outcome), vec![(0, RcptResult::Delivered)]);
}

#[tokio::test]
async fn a_server_that_goes_silent_makes_the_connection_unusable() {
    // A server that greets, answers EHLO and MAIL, then says nothing.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        socket.write_all(b"220 silent ESMTP\r\n").await.unwrap();
        let mut buf = vec![0; 4096];
        let mut seen = Vec::new();
        for reply in [&b"250 silent\r\n"[..], b"250 2.1.0 ok\r\n"] {
            loop {
                let n = socket.read(&mut buf).await.unwrap();
                seen.extend_from_slice(&buf[..n]);
                if seen.ends_with(b"\r\n") {
                    break;
                }
            }
            seen.clear();
            socket.write_all(reply).await.unwrap();
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    });
    let mut settings = settings(TlsPolicy::Disabled, None);
    settings.command_timeout = Duration::from_millis(300);
    let hop = NextHop {
        name: "silent.test".into(),
        addrs: vec![addr],
    };
    let mut outbound = Outbound::connect(&[hop], &settings).await.unwrap();
    let outcome = outbound.send(&job_for(&["a@example.test"])).await;
    assert_eq!(results(&outcome), vec![(0, RcptResult::Deferred)]);
    assert!(
        outcome.recipients[0]
            .reply
            .starts_with("451 4.4.2 connection lost after RCPT TO: timed out"),
        "{outcome:?}"
    );
    assert!(!outbound.is_usable());
    let again = outbound.send(&job_for(&["a@example.test"])).await;
    assert_eq!(results(&again), vec![(0, RcptResult::Deferred)]);
    server.abort();
}

/// Reads one command line from a scripted server's socket.
async fn read_line(socket: &mut tokio::net::TcpStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\r\n") {
        if socket.read(&mut byte).await.unwrap() == 0 {
            break;
        }
        line.push(byte[0]);
    }
    String::from_utf8_lossy(&line).into_owned()
}

#[tokio::test]
async fn a_failed_opportunistic_handshake_retries_the_host_in_clear() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        // First connection: STARTTLS is accepted, then plain text follows
        // the 220 where the handshake should be; it must not be read as
        // a reply, and the handshake fails.
        let (mut socket, _) = listener.accept().await.unwrap();
        socket.write_all(b"220 odd ESMTP\r\n").await.unwrap();
        assert!(read_line(&mut socket).await.starts_with("EHLO relay.test"));
        socket
            .write_all(b"250-odd\r\n250 STARTTLS\r\n")
            .await
            .unwrap();
        assert_eq!(read_line(&mut socket).await, "STARTTLS\r\n");
        socket
            .write_all(b"220 go ahead\r\n250 injected\r\n")
            .await
            .unwrap();
        let mut hello = vec![0; 4096];
        let _ = socket.read(&mut hello).await;
        drop(socket);
        // Second connection: no TLS this time.
        let (mut socket, _) = listener.accept().await.unwrap();
        socket.write_all(b"220 odd ESMTP\r\n").await.unwrap();
        assert!(read_line(&mut socket).await.starts_with("EHLO relay.test"));
        socket
            .write_all(b"250-odd\r\n250 STARTTLS\r\n")
            .await
            .unwrap();
        let quit = read_line(&mut socket).await;
        socket.write_all(b"221 bye\r\n").await.unwrap();
        quit
    });
    let hop = NextHop {
        name: "odd.test".into(),
        addrs: vec![addr],
    };
    let outbound = Outbound::connect(&[hop], &settings(TlsPolicy::Opportunistic, None))
        .await
        .unwrap();
    assert_eq!(outbound.remote().tls, None);
    assert!(outbound.capabilities().starttls);
    outbound.quit().await;
    assert_eq!(server.await.unwrap(), "QUIT\r\n");
}
