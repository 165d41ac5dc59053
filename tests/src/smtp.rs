//! A plain, blocking SMTP client for asserting exact replies over a real
//! socket: it sends what the test says, byte for byte, and reads replies.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

/// A reply as read from the wire.
#[derive(Debug, Clone)]
pub struct Reply {
    pub code: u16,
    /// Every line's text after `NNN-` / `NNN `, joined by `\n`.
    pub text: String,
}

impl Reply {
    /// The enhanced status code of the first line, if any (`"5.7.1"`).
    pub fn status(&self) -> Option<&str> {
        let first = self.text.split_whitespace().next()?;
        let parts: Vec<_> = first.split('.').collect();
        (parts.len() == 3 && parts.iter().all(|p| p.parse::<u16>().is_ok())).then_some(first)
    }
}

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

pub struct Client {
    reader: BufReader<Box<dyn Stream>>,
    tcp: TcpStream,
}

const READ_TIMEOUT: Duration = Duration::from_secs(15);

impl Client {
    /// Connects and reads the greeting.
    pub fn connect(addr: SocketAddr) -> (Client, Reply) {
        let tcp = TcpStream::connect_timeout(&addr, READ_TIMEOUT).expect("connect to the relay");
        Self::wrap(tcp)
    }

    /// Connects from a chosen loopback source address (127.0.0.0/8 all
    /// belongs to `lo`), to test per-address rules.
    pub fn connect_from(source: IpAddr, addr: SocketAddr) -> (Client, Reply) {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        socket
            .bind(&SocketAddr::new(source, 0).into())
            .expect("bind the source address");
        socket
            .connect_timeout(&addr.into(), READ_TIMEOUT)
            .expect("connect to the relay");
        Self::wrap(socket.into())
    }

    fn wrap(tcp: TcpStream) -> (Client, Reply) {
        tcp.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        tcp.set_nodelay(true).unwrap();
        let mut client = Client {
            reader: BufReader::new(Box::new(tcp.try_clone().unwrap())),
            tcp,
        };
        let greeting = client.read_reply();
        (client, greeting)
    }

    pub fn set_read_timeout(&self, timeout: Duration) {
        self.tcp.set_read_timeout(Some(timeout)).unwrap();
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.reader.get_mut().write_all(bytes).expect("write");
        self.reader.get_mut().flush().expect("flush");
    }

    /// Reads one (possibly multi-line) reply; panics on timeout or EOF.
    pub fn read_reply(&mut self) -> Reply {
        self.try_read_reply()
            .unwrap_or_else(|| panic!("the relay closed the connection instead of replying"))
    }

    /// Reads one reply, or `None` when the connection was closed.
    pub fn try_read_reply(&mut self) -> Option<Reply> {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("reading a reply failed: {e} (after {lines:?})"),
            }
            let line = line.trim_end_matches(['\r', '\n']).to_string();
            assert!(line.len() >= 3, "short reply line {line:?}");
            let code: u16 = line[..3]
                .parse()
                .unwrap_or_else(|_| panic!("bad reply {line:?}"));
            let more = line.as_bytes().get(3) == Some(&b'-');
            lines.push((code, line.get(4..).unwrap_or("").to_string()));
            if !more {
                break;
            }
        }
        Some(Reply {
            code: lines[0].0,
            text: lines
                .into_iter()
                .map(|(_, t)| t)
                .collect::<Vec<_>>()
                .join("\n"),
        })
    }

    /// Sends one command line (CRLF added) and reads its reply.
    pub fn cmd(&mut self, line: &str) -> Reply {
        self.send_raw(format!("{line}\r\n").as_bytes());
        self.read_reply()
    }

    /// Sends a command and asserts the reply code; returns the reply.
    #[track_caller]
    pub fn expect(&mut self, line: &str, code: u16) -> Reply {
        let reply = self.cmd(line);
        assert_eq!(reply.code, code, "{line:?} got {reply:?}");
        reply
    }

    /// `true` once the relay has closed the connection.
    pub fn is_closed(&mut self) -> bool {
        self.set_read_timeout(Duration::from_secs(5));
        let mut byte = [0u8; 1];
        matches!(self.reader.read(&mut byte), Ok(0) | Err(_))
    }

    /// Upgrades to TLS after a `220` to STARTTLS, trusting `config`'s roots.
    pub fn start_tls(self, config: Arc<rustls::ClientConfig>) -> Client {
        assert!(
            self.reader.buffer().is_empty(),
            "bytes after the 220 to STARTTLS must not be read as plain text"
        );
        let tcp = self.tcp;
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let conn = rustls::ClientConnection::new(config, name).expect("TLS client");
        let tls = rustls::StreamOwned::new(conn, tcp.try_clone().unwrap());
        Client {
            reader: BufReader::new(Box::new(tls)),
            tcp,
        }
    }

    /// Sends a whole message through MAIL, RCPT, DATA and returns the final reply.
    pub fn send_message(&mut self, from: &str, to: &[&str], data: &str) -> Reply {
        self.expect(&format!("MAIL FROM:<{from}>"), 250);
        for rcpt in to {
            self.expect(&format!("RCPT TO:<{rcpt}>"), 250);
        }
        self.send_data(data)
    }

    /// Sends DATA, then `data` as it is (already dot-stuffed, ending in
    /// CRLF) and the final dot; returns the reply to the dot.
    pub fn send_data(&mut self, data: &str) -> Reply {
        self.expect("DATA", 354);
        self.send_raw(data.as_bytes());
        self.send_raw(b".\r\n");
        self.read_reply()
    }
}

/// A 2 KB test message body with CRLF line endings (ends with CRLF).
pub fn message_of_size(subject: &str, size: usize) -> String {
    let mut text =
        format!("From: app@example.com\r\nTo: user@example.org\r\nSubject: {subject}\r\n\r\n");
    let line = "The quick brown fox jumps over the lazy dog 0123456789.\r\n";
    while text.len() + line.len() <= size {
        text.push_str(line);
    }
    text
}

/// The queue id in a `250 2.0.0 Ok: queued as <id>` reply.
pub fn queued_id(reply: &Reply) -> String {
    assert_eq!(reply.code, 250, "message not accepted: {reply:?}");
    reply
        .text
        .rsplit(' ')
        .next()
        .expect("queued as <id>")
        .trim()
        .to_string()
}
