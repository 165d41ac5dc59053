//! `smarthost send`: one message from the command line, submitted over SMTP
//! to a running node (the first `smtp.listen` address of the
//! configuration unless `--server` says otherwise), for scripts and for a
//! first test after install.

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use lettre::address::Envelope;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{SmtpTransport, Transport};

use crate::compose::{compose, Attachment, Named, Parts};
use crate::config::Config;

/// The message and where it goes.
#[derive(Debug, clap::Args)]
pub struct SendArgs {
    /// The sender: the envelope's and the From header's.
    #[arg(long, value_name = "ADDRESS")]
    from: String,
    /// A recipient (repeat, or separate with commas).
    #[arg(long, value_name = "ADDRESS", value_delimiter = ',')]
    to: Vec<String>,
    #[arg(long, value_name = "ADDRESS", value_delimiter = ',')]
    cc: Vec<String>,
    /// A recipient left out of the headers.
    #[arg(long, value_name = "ADDRESS", value_delimiter = ',')]
    bcc: Vec<String>,
    #[arg(long, value_name = "ADDRESS")]
    reply_to: Option<String>,
    #[arg(long, default_value = "")]
    subject: String,
    /// The plain text body: a file, or `-` for standard input (the
    /// default when no --html is given).
    #[arg(long, value_name = "FILE")]
    body: Option<PathBuf>,
    /// An HTML body, from a file.
    #[arg(long, value_name = "FILE")]
    html: Option<PathBuf>,
    /// A file to attach (repeat); its type comes from its extension.
    #[arg(long, value_name = "FILE")]
    attach: Vec<PathBuf>,
    /// A further header line, `Name: value` (repeat).
    #[arg(long, value_name = "HEADER")]
    header: Vec<String>,
    /// The SMTP server, host:port (default: the first smtp.listen of the
    /// configuration, a wildcard address taken as loopback).
    #[arg(long, value_name = "HOST:PORT")]
    server: Option<String>,
    /// Log in as this user (AUTH PLAIN/LOGIN); the password comes from
    /// SMARTHOST_PASSWORD.
    #[arg(long, value_name = "USER")]
    user: Option<String>,
    #[arg(long, env = "SMARTHOST_PASSWORD", hide_env_values = true, hide = true)]
    password: Option<String>,
    /// Require STARTTLS, with the server's certificate checked against
    /// the host name of --server.
    #[arg(long)]
    starttls: bool,
}

/// Exit codes: 0 when the server took the message (its queue id is
/// printed), 1 when it refused it or could not be reached, 2 for a message
/// that cannot be built or a configuration that does not load.
pub fn send(path: Option<&Path>, args: SendArgs) -> ExitCode {
    let server = match &args.server {
        Some(server) => server.clone(),
        None => match Config::load(path) {
            Ok(config) => match config.smtp.listen.first() {
                Some(addr) => reachable(*addr).to_string(),
                None => return usage("smtp.listen is empty: give --server"),
            },
            Err(e) => return super::config_failed(path, &e),
        },
    };
    let Some((host, port)) = server
        .rsplit_once(':')
        .and_then(|(host, port)| Some((host.trim_matches(['[', ']']), port.parse().ok()?)))
    else {
        return usage(&format!("--server {server}: not host:port"));
    };
    let parts = match parts(&args) {
        Ok(parts) => parts,
        Err(message) => return usage(&message),
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let unique = format!("{:x}.{:016x}", now.as_millis(), rand::random::<u64>());
    let hostname = host_name_for_ids();
    let composed = match compose(&parts, &hostname, now.as_secs(), &unique) {
        Ok(composed) => composed,
        Err(e) => return usage(&e.to_string()),
    };
    let address = |m: &smarthost_proto::address::Mailbox| m.to_string().parse().ok();
    let recipients: Option<Vec<_>> = composed.recipients.iter().map(address).collect();
    let envelope = recipients.and_then(|to| Envelope::new(address(&composed.sender), to).ok());
    let Some(envelope) = envelope else {
        return usage("an address lettre cannot send (quoted or non-ASCII local part)");
    };
    let mut transport = SmtpTransport::builder_dangerous(host).port(port);
    if args.starttls {
        match TlsParameters::new(host.to_string()) {
            Ok(tls) => transport = transport.tls(Tls::Required(tls)),
            Err(e) => return failed(&format!("TLS: {e}")),
        }
    }
    if let Some(user) = &args.user {
        let password = args.password.clone().unwrap_or_default();
        transport = transport.credentials(Credentials::new(user.clone(), password));
    }
    match transport.build().send_raw(&envelope, &composed.message) {
        Ok(response) => {
            println!("{}", response.message().collect::<Vec<_>>().join(" "));
            ExitCode::SUCCESS
        }
        Err(e) => failed(&e.to_string()),
    }
}

/// The address a client on this machine reaches a listener on.
fn reachable(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, listen.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, listen.port()).into(),
        _ => listen,
    }
}

fn host_name_for_ids() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

fn parts(args: &SendArgs) -> Result<Parts, String> {
    let read = |path: &Path| -> Result<Vec<u8>, String> {
        if path == Path::new("-") {
            let mut bytes = Vec::new();
            std::io::stdin()
                .read_to_end(&mut bytes)
                .map_err(|e| format!("reading standard input: {e}"))?;
            Ok(bytes)
        } else {
            std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
        }
    };
    let text_of = |path: &Path| -> Result<String, String> {
        String::from_utf8(read(path)?).map_err(|_| format!("{}: not UTF-8 text", path.display()))
    };
    let body = match (&args.body, &args.html) {
        (Some(path), _) => Some(text_of(path)?),
        (None, None) => Some(text_of(Path::new("-"))?),
        (None, Some(_)) => None,
    };
    let html = args.html.as_deref().map(text_of).transpose()?;
    let mut attachments = Vec::new();
    for path in &args.attach {
        let filename = path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        attachments.push(Attachment {
            content_type: media_type(&filename).to_string(),
            filename,
            content: read(path)?,
            content_id: None,
        });
    }
    let mut headers = Vec::new();
    for line in &args.header {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("--header {line:?}: not \"Name: value\""))?;
        headers.push((name.trim().to_string(), value.trim().to_string()));
    }
    let list = |addresses: &[String]| addresses.iter().map(|a| Named::from(a.as_str())).collect();
    Ok(Parts {
        from: Some(args.from.as_str().into()),
        to: list(&args.to),
        cc: list(&args.cc),
        bcc: list(&args.bcc),
        reply_to: args.reply_to.as_deref().map(Named::from),
        subject: args.subject.clone(),
        text: body,
        html,
        headers,
        attachments,
    })
}

/// The media type of common attachments by extension; anything else is
/// sent as `application/octet-stream`, which every client can save.
fn media_type(filename: &str) -> &'static str {
    let extension = filename
        .rsplit_once('.')
        .map(|(_, ext)| ext.to_ascii_lowercase())
        .unwrap_or_default();
    match extension.as_str() {
        "txt" | "log" => "text/plain",
        "csv" => "text/csv",
        "html" | "htm" => "text/html",
        "pdf" => "application/pdf",
        "json" => "application/json",
        "xml" => "application/xml",
        "zip" => "application/zip",
        "gz" => "application/gzip",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "svg" => "image/svg+xml",
        "ics" => "text/calendar",
        _ => "application/octet-stream",
    }
}

fn usage(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(2)
}

fn failed(message: &str) -> ExitCode {
    eprintln!("error: not sent: {message}");
    ExitCode::FAILURE
}
