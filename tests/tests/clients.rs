//! Real SMTP clients — swaks, Python's smtplib and lettre — hand mail to the
//! real binary over plain TCP and STARTTLS; the spool must hold what they sent.

use std::process::Command;
use std::time::Duration;

use smarthost_tests::ca::TestCa;
use smarthost_tests::relay::Relay;

struct TlsRelay {
    relay: Relay,
    ca: TestCa,
    _dir: tempfile::TempDir,
}

/// A relay with STARTTLS and one user `app` / `s3cret`.
fn tls_relay() -> TlsRelay {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::create(dir.path());
    let hash = smarthost_node::auth::hash_password("s3cret");
    let relay = Relay::start(
        "relay_networks = []",
        &format!(
            "{}[[smtp.users]]\nname = \"app\"\npassword_hash = \"{hash}\"\n",
            ca.smtp_tls_section()
        ),
    );
    TlsRelay {
        relay,
        ca,
        _dir: dir,
    }
}

/// Stops the relay and returns the spooled bodies as text.
fn spooled_bodies(relay: &mut Relay) -> Vec<String> {
    relay.terminate(Duration::from_secs(20));
    relay
        .spool_records()
        .iter()
        .map(|r| String::from_utf8_lossy(&relay.spool_body(&r.id)).into_owned())
        .collect()
}

fn run(command: &mut Command) -> String {
    let output = command.output().unwrap_or_else(|e| {
        panic!("cannot run {command:?}: {e} (scripts/test.sh installs the test dependencies)")
    });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{command:?} failed:\n{text}");
    text
}

#[test]
fn swaks_plain_and_starttls_with_auth() {
    let mut plain = Relay::start("", "");
    let out = run(Command::new("swaks")
        .args([
            "--server",
            &plain.smtp.to_string(),
            "--ehlo",
            "swaks.example",
        ])
        .args(["--from", "app@example.com", "--to", "user@example.org"])
        .args(["--header", "Subject: swaks plain", "--body", "plain body"]));
    assert!(out.contains("250 2.0.0"), "{out}");
    let bodies = spooled_bodies(&mut plain);
    assert_eq!(bodies.len(), 1);
    assert!(bodies[0].contains("Subject: swaks plain") && bodies[0].contains("plain body"));

    let mut tls = tls_relay();
    let out = run(Command::new("swaks")
        .args([
            "--server",
            &tls.relay.smtp.to_string(),
            "--ehlo",
            "swaks.example",
        ])
        .args(["--tls", "--tls-verify", "--tls-ca-path"])
        .arg(&tls.ca.ca_cert)
        .args([
            "--auth",
            "PLAIN",
            "--auth-user",
            "app",
            "--auth-password",
            "s3cret",
        ])
        .args(["--from", "app@example.com", "--to", "user@example.org"])
        .args(["--header", "Subject: swaks tls", "--body", "secret body"]));
    assert!(out.contains("235 2.7.0"), "{out}");
    let bodies = spooled_bodies(&mut tls.relay);
    assert_eq!(bodies.len(), 1);
    assert!(bodies[0].contains("Subject: swaks tls"));
    assert!(bodies[0].contains("with ESMTPSA"), "{}", bodies[0]);
}

const PYTHON_CLIENT: &str = r#"
import smtplib, ssl, sys
port, mode = int(sys.argv[1]), sys.argv[2]
msg = "From: app@example.com\r\nTo: user@example.org\r\nSubject: python " + mode + "\r\n\r\nline one\r\n.leading dot\r\n"
with smtplib.SMTP("127.0.0.1", port, local_hostname="python.example", timeout=15) as s:
    if mode == "tls":
        s.starttls(context=ssl.create_default_context(cafile=sys.argv[3]))
        s.login("app", "s3cret")
        # smtplib takes 503 "already authenticated" as success.
        print("second login:", s.login("app", "s3cret")[0])
    refused = s.sendmail("app@example.com", ["user@example.org", "other@example.net"], msg)
    assert refused == {}, refused
    try:
        if mode == "plain":
            s.sendmail("app@example.com", ["x@example.org"], "Subject: big\r\n\r\n" + ("x" * 70 + "\r\n") * 300)
    except (smtplib.SMTPDataError, smtplib.SMTPSenderRefused) as e:
        print("too big:", e.smtp_code)
"#;

#[test]
fn python_smtplib_plain_and_starttls_with_login() {
    let mut plain = Relay::start("max_message_size = \"10KB\"", "");
    let out = run(Command::new("python3").args([
        "-c",
        PYTHON_CLIENT,
        &plain.smtp.port().to_string(),
        "plain",
    ]));
    assert!(out.contains("too big: 552"), "{out}");
    let bodies = spooled_bodies(&mut plain);
    assert_eq!(bodies.len(), 1);
    assert!(bodies[0].contains("Subject: python plain"));
    assert!(
        bodies[0].contains("\r\n.leading dot\r\n"),
        "dot-unstuffed: {}",
        bodies[0]
    );

    let mut tls = tls_relay();
    let out = run(Command::new("python3").args([
        "-c",
        PYTHON_CLIENT,
        &tls.relay.smtp.port().to_string(),
        "tls",
        &tls.ca.ca_cert.display().to_string(),
    ]));
    assert!(out.contains("second login: 503"), "{out}");
    let bodies = spooled_bodies(&mut tls.relay);
    assert_eq!(bodies.len(), 1);
    assert!(bodies[0].contains("Subject: python tls"));
}

#[tokio::test]
async fn lettre_plain_and_starttls() {
    use lettre::message::Mailbox;
    use lettre::transport::smtp::authentication::Credentials;
    use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
    use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let message = |subject: &str| {
        Message::builder()
            .from("app@example.com".parse::<Mailbox>().unwrap())
            .to("user@example.org".parse::<Mailbox>().unwrap())
            .subject(subject)
            .body(String::from("Grüße aus lettre\n"))
            .unwrap()
    };

    let mut plain = tokio::task::spawn_blocking(|| Relay::start("", ""))
        .await
        .unwrap();
    let transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(plain.smtp.port())
        .build();
    let response = transport
        .send(message("lettre plain"))
        .await
        .expect("plain send");
    assert_eq!(response.code().to_string(), "250");

    let mut tls = tokio::task::spawn_blocking(tls_relay).await.unwrap();
    let params = TlsParameters::builder("localhost".to_string())
        .add_root_certificate(Certificate::from_pem(tls.ca.ca_pem().as_bytes()).unwrap())
        .build_rustls()
        .unwrap();
    let transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(tls.relay.smtp.port())
        .tls(Tls::Required(params))
        .credentials(Credentials::new("app".into(), "s3cret".into()))
        .build();
    transport
        .send(message("lettre tls"))
        .await
        .expect("STARTTLS send");

    let plain_bodies = tokio::task::spawn_blocking(move || spooled_bodies(&mut plain))
        .await
        .unwrap();
    assert_eq!(plain_bodies.len(), 1);
    assert!(plain_bodies[0].contains("Subject: lettre plain"));
    let tls_bodies = tokio::task::spawn_blocking(move || spooled_bodies(&mut tls.relay))
        .await
        .unwrap();
    assert_eq!(tls_bodies.len(), 1);
    assert!(tls_bodies[0].contains("Subject: lettre tls"));
    assert!(tls_bodies[0].contains("with ESMTPSA"));
}

/// Logs in as `shop` over STARTTLS and tries each sender, printing the
/// code each MAIL FROM gets.
const SENDER_TRIES: &str = r#"
import smtplib, ssl, sys
port, cafile = int(sys.argv[1]), sys.argv[2]
with smtplib.SMTP("127.0.0.1", port, local_hostname="shop.example", timeout=15) as s:
    s.starttls(context=ssl.create_default_context(cafile=cafile))
    s.login("shop", "s3cret")
    for sender in sys.argv[3:]:
        code, text = s.mail(sender)
        print(sender, code, text.decode())
        s.rset()
"#;

#[test]
fn a_user_limited_to_its_senders_cannot_send_as_others() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::create(dir.path());
    let hash = smarthost_node::auth::hash_password("s3cret");
    let mut relay = Relay::start(
        "relay_networks = []",
        &format!(
            "{}[[smtp.users]]\nname = \"shop\"\npassword_hash = \"{hash}\"\n\
             senders = [\"shop.example\", \"alerts@ops.example\"]\n",
            ca.smtp_tls_section()
        ),
    );
    let out = run(Command::new("python3").args([
        "-c",
        SENDER_TRIES,
        &relay.smtp.port().to_string(),
        &ca.ca_cert.display().to_string(),
        "orders@shop.example",
        "alerts@ops.example",
        "ceo@ops.example",
        "someone@bank.example",
        "",
    ]));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            "orders@shop.example 250 2.1.0 Ok",
            "alerts@ops.example 250 2.1.0 Ok",
            "ceo@ops.example 550 5.7.1 Sender <ceo@ops.example> not allowed for this user",
            "someone@bank.example 550 5.7.1 Sender <someone@bank.example> not allowed for this user",
            " 550 5.7.1 Sender <> not allowed for this user",
        ],
        "{out}"
    );
    relay.terminate(Duration::from_secs(20));
    assert!(relay.spool_records().is_empty());
}
