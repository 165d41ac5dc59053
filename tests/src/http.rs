//! A raw blocking HTTP/1.1 client for the admin API: one request per
//! connection, so a test sees exactly the status and body the relay sends.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// What the server answered.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The samples of a Prometheus text page, `name{labels}` → value.
    pub fn samples(&self) -> std::collections::BTreeMap<String, f64> {
        self.body
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| {
                let (key, value) = l
                    .rsplit_once(' ')
                    .unwrap_or_else(|| panic!("not a sample: {l:?}"));
                let value = value
                    .parse()
                    .unwrap_or_else(|e| panic!("not a number ({e}): {l:?}"));
                (key.to_string(), value)
            })
            .collect()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

/// Sends `method path` with an empty body (and `Authorization: Bearer
/// <token>` when given) and reads the whole answer.
pub fn request(addr: SocketAddr, method: &str, path: &str, token: Option<&str>) -> Response {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    exchange(stream, addr, (method, path, &[]), token, None)
}

/// Sends `method path` with `body` of `content_type` (and the token when
/// given) and reads the whole answer.
pub fn send_body(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    content_type: &str,
    body: &[u8],
) -> Response {
    send_with(addr, method, path, token, &[], content_type, body)
}

/// [`send_body`] with more request headers.
pub fn send_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    content_type: &str,
    body: &[u8],
) -> Response {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    exchange(
        stream,
        addr,
        (method, path, headers),
        token,
        Some((content_type, body)),
    )
}

/// An argon2id hash of `token` at the lowest cost, so that debug builds
/// check it fast; for `[[admin.operators]]` and `[[api.keys]]`.
pub fn token_hash(token: &str) -> String {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let salt = SaltString::encode_b64(b"a test salt, 16").unwrap();
    let params = argon2::Params::new(argon2::Params::MIN_M_COST, 1, 1, None).unwrap();
    argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password(token.as_bytes(), &salt)
        .unwrap()
        .to_string()
}

/// [`request`] from a chosen loopback source address (127.0.0.0/8 all
/// belongs to `lo`), to test per-address rules.
pub fn request_from(
    source: std::net::IpAddr,
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> Response {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket
        .bind(&SocketAddr::new(source, 0).into())
        .expect("bind the source address");
    socket
        .connect_timeout(&addr.into(), Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    exchange(socket.into(), addr, (method, path, &[]), token, None)
}

/// One request: `(method, path, extra headers)`.
fn exchange(
    mut stream: TcpStream,
    addr: SocketAddr,
    (method, path, headers): (&str, &str, &[(&str, &str)]),
    token: Option<&str>,
    body: Option<(&str, &[u8])>,
) -> Response {
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let length = body.map_or(0, |(_, bytes)| bytes.len());
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {length}\r\n"
    );
    if let Some((content_type, _)) = body {
        head.push_str(&format!("Content-Type: {content_type}\r\n"));
    }
    if let Some(token) = token {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    if let Some((_, bytes)) = body {
        stream.write_all(bytes).unwrap();
    }
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read the answer");
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of headers in {text:?}"));
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    Response {
        status,
        headers,
        body: body.to_string(),
    }
}

pub fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> Response {
    request(addr, "GET", path, token)
}

pub fn post(addr: SocketAddr, path: &str, token: Option<&str>) -> Response {
    request(addr, "POST", path, token)
}
