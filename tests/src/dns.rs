//! A real DNS server for MX routing tests: `dnsmasq` on a free port of
//! 127.0.0.1, answering only from the records a test gives it.
//!
//! Every name it has no record for gets NXDOMAIN (`--local=/#/`: no
//! upstream is ever asked), so a test sees the answers a real authoritative
//! server would give. A null MX (RFC 7505, `MX 0 .`) is expressible:
//! `--mx-host=domain,.,0` serves exactly that record.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::relay::free_port;

const START_TIMEOUT: Duration = Duration::from_secs(10);

/// One record the server answers with.
#[derive(Clone, Debug)]
pub enum DnsRecord {
    /// `domain MX preference host`.
    Mx {
        domain: String,
        host: String,
        preference: u16,
    },
    /// `domain MX 0 .`: the domain takes no mail (RFC 7505).
    NullMx { domain: String },
    /// `host A ip`.
    A { host: String, ip: Ipv4Addr },
}

impl DnsRecord {
    pub fn mx(domain: &str, host: &str, preference: u16) -> Self {
        DnsRecord::Mx {
            domain: domain.to_string(),
            host: host.to_string(),
            preference,
        }
    }

    pub fn null_mx(domain: &str) -> Self {
        DnsRecord::NullMx {
            domain: domain.to_string(),
        }
    }

    pub fn a(host: &str, ip: Ipv4Addr) -> Self {
        DnsRecord::A {
            host: host.to_string(),
            ip,
        }
    }

    fn dnsmasq_arg(&self) -> String {
        match self {
            DnsRecord::Mx {
                domain,
                host,
                preference,
            } => format!("--mx-host={domain},{host},{preference}"),
            DnsRecord::NullMx { domain } => format!("--mx-host={domain},.,0"),
            DnsRecord::A { host, ip } => format!("--host-record={host},{ip}"),
        }
    }
}

pub struct DnsServer {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl DnsServer {
    /// Starts dnsmasq with `records` and waits (at most 10 s) until it
    /// answers on UDP.
    pub fn start(records: &[DnsRecord]) -> DnsServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("dnsmasq.log");
        let port = free_port();
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let stderr = std::fs::File::create(&log).expect("dnsmasq log");
        let child = Command::new("dnsmasq")
            .args([
                "--no-daemon",
                // Nothing from the machine: no dnsmasq.conf, resolv.conf or
                // /etc/hosts, no upstream servers.
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--local=/#/",
                &format!("--port={port}"),
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                "--pid-file=",
                "--user=root",
                "--log-queries",
                "--log-facility=-",
            ])
            .args(records.iter().map(DnsRecord::dnsmasq_arg))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start dnsmasq: {e}; scripts/test.sh installs the dnsmasq package")
            });
        let mut server = DnsServer {
            child,
            addr,
            log,
            _dir: dir,
        };
        server.wait_ready();
        server
    }

    /// `127.0.0.1:PORT`, the form of a `dns_servers` entry.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// dnsmasq's own log, with every query it answered.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_ready(&mut self) {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("UDP socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let query = probe_query();
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("dnsmasq exited with {status} at start:\n{}", self.log());
            }
            let _ = socket.send_to(&query, self.addr);
            let mut answer = [0u8; 512];
            if let Ok((n, _)) = socket.recv_from(&mut answer) {
                if n >= 4 && answer[..2] == query[..2] {
                    return;
                }
            }
        }
        panic!(
            "dnsmasq did not answer on {} within {START_TIMEOUT:?}:\n{}",
            self.addr,
            self.log()
        );
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- dnsmasq log ---\n{}", self.log());
        }
    }
}

/// A DNS query for `ready.invalid. A` (any answer, NXDOMAIN included, means
/// the server is up).
fn probe_query() -> Vec<u8> {
    let mut query = vec![0x5e, 0xad, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in ["ready", "invalid"] {
        query.push(label.len() as u8);
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]);
    query
}
