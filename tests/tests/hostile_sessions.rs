//! Hostile clients against the real binary over real sockets: slow clients
//! in every phase, clients that talk before the greeting, an idle flood
//! from several addresses, and a node out of file descriptors
//! (`docs/security.md`). Durations are configured short; every loop is
//! bounded in count and time.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use smarthost_tests::ca::TestCa;
use smarthost_tests::relay::{free_port, Relay};
use smarthost_tests::smarthost_bin;
use smarthost_tests::smtp::{message_of_size, Client};

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// A raw connection that writes what the test says, when it says, and
/// reads reply lines.
struct Raw {
    reader: BufReader<TcpStream>,
    tcp: TcpStream,
}

impl Raw {
    fn connect(addr: SocketAddr) -> Raw {
        let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
        tcp.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        tcp.set_nodelay(true).unwrap();
        Raw {
            reader: BufReader::new(tcp.try_clone().unwrap()),
            tcp,
        }
    }

    /// The last line of the next reply, as sent (`"250 2.0.0 Ok"`).
    fn reply(&mut self) -> String {
        for _ in 0..100 {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).expect("read a reply");
            assert!(n > 0, "the connection closed instead of replying");
            let line = line.trim_end().to_string();
            if line.as_bytes().get(3) != Some(&b'-') {
                return line;
            }
        }
        panic!("a reply of more than 100 lines");
    }

    fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.tcp.write_all(bytes)
    }

    /// Sends a command and asserts the reply starts with `code`.
    #[track_caller]
    fn expect(&mut self, line: &str, code: &str) {
        self.send(format!("{line}\r\n").as_bytes()).unwrap();
        let reply = self.reply();
        assert!(reply.starts_with(code), "{line:?} got {reply:?}");
    }

    /// Writes `bytes` in `piece`-sized parts every `every` (at most
    /// `limit` in all) until the server answers; returns the reply and
    /// the time it took from the first byte.
    fn trickle(
        &mut self,
        bytes: &[u8],
        piece: usize,
        every: Duration,
        limit: Duration,
    ) -> (String, Duration) {
        let writer = self.tcp.try_clone().unwrap();
        let data = bytes.to_vec();
        let start = Instant::now();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let feeder = thread::spawn(move || {
            let mut writer = writer;
            for part in data.chunks(piece.max(1)).cycle() {
                if stopped.load(std::sync::atomic::Ordering::Relaxed)
                    || start.elapsed() > limit
                    || writer.write_all(part).is_err()
                {
                    return;
                }
                thread::sleep(every);
            }
        });
        let reply = self.reply();
        let took = start.elapsed();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        feeder.join().unwrap();
        (reply, took)
    }

    /// `true` once the server has closed the connection (within 5 s).
    fn closed(&mut self) -> bool {
        self.tcp
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut rest = Vec::new();
        match self.reader.read_to_end(&mut rest) {
            Ok(_) => true,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        }
    }
}

#[track_caller]
fn assert_within(took: Duration, low: f64, high: f64) {
    assert!(
        took >= Duration::from_secs_f64(low) && took <= Duration::from_secs_f64(high),
        "took {took:?}, expected {low} s to {high} s"
    );
}

/// A command line trickled one byte every 200 ms never completes within
/// `command_timeout`, though every byte comes well within the idle timeout:
/// before the first command and inside a transaction alike.
#[test]
fn slow_command_lines_end_with_421_at_the_command_deadline() {
    let relay = Relay::start(
        "connection_timeout = \"3s\"\ncommand_timeout = \"1500ms\"",
        "",
    );
    let phases = [
        ("greeting", Vec::<&str>::new()),
        (
            "transaction",
            vec!["EHLO slow.example", "MAIL FROM:<a@example.com>"],
        ),
    ];
    let handles: Vec<_> = phases
        .into_iter()
        .map(|(phase, before)| {
            let smtp = relay.smtp;
            thread::spawn(move || {
                let mut c = Raw::connect(smtp);
                assert!(c.reply().starts_with("220 "));
                for line in before {
                    c.expect(line, "250");
                }
                let (reply, took) = c.trickle(
                    b"RCPT TO:<someone@example.org>\r\n",
                    1,
                    Duration::from_millis(200),
                    Duration::from_secs(10),
                );
                assert_eq!(
                    reply, "421 4.4.2 relay.test Error: command not completed in time",
                    "{phase}"
                );
                assert_within(took, 1.3, 2.8);
                assert!(c.closed(), "{phase}: closed after the 421");
            })
        })
        .collect();
    for handle in handles {
        handle.join().unwrap();
    }
    let log = relay.log();
    assert!(log.contains("client too slow, session closed"), "{log}");
}

/// After `354` a message must keep `min_data_rate` (after the idle
/// timeout's worth of credit) and end within `data_timeout`.
#[test]
fn slow_message_transfers_end_with_421() {
    let relay = Relay::start(
        "connection_timeout = \"1s\"\nmin_data_rate = 100\ndata_timeout = \"3s\"",
        "",
    );
    // (case, piece, every, expected reply text, from, to seconds)
    let cases = [
        (
            "below the minimum rate: 20 bytes/s",
            5,
            250,
            "421 4.4.2 relay.test Error: message transfer too slow",
            1.0,
            2.5,
        ),
        (
            "fast enough but longer than data_timeout: 2 KB/s",
            500,
            250,
            "421 4.4.2 relay.test Error: message transfer took too long",
            2.8,
            4.5,
        ),
    ];
    let handles: Vec<_> = cases
        .into_iter()
        .map(|(case, piece, every, want, low, high)| {
            let smtp = relay.smtp;
            thread::spawn(move || {
                let mut c = Raw::connect(smtp);
                assert!(c.reply().starts_with("220 "));
                c.expect("EHLO slow.example", "250");
                c.expect("MAIL FROM:<a@example.com>", "250");
                c.expect("RCPT TO:<b@example.org>", "250");
                c.expect("DATA", "354");
                let body = message_of_size("slow", 60_000);
                let (reply, took) = c.trickle(
                    body.as_bytes(),
                    piece,
                    Duration::from_millis(every),
                    Duration::from_secs(10),
                );
                assert_eq!(reply, want, "{case}");
                assert_within(took, low, high);
                assert!(c.closed(), "{case}: closed after the 421");
            })
        })
        .collect();
    for handle in handles {
        handle.join().unwrap();
    }
}

/// A client that starts TLS and then trickles its handshake is dropped at
/// `tls_handshake_timeout` (no SMTP reply is possible inside a handshake).
#[test]
fn a_trickled_tls_handshake_is_dropped_at_its_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::create(dir.path());
    let relay = Relay::start(
        &format!(
            "connection_timeout = \"5s\"\ntls_handshake_timeout = \"1s\"\n\n{}",
            ca.smtp_tls_section()
        ),
        "",
    );
    let mut c = Raw::connect(relay.smtp);
    assert!(c.reply().starts_with("220 "));
    c.expect("EHLO slow.example", "250");
    c.expect("STARTTLS", "220");
    // The first bytes of a TLS record header, one every 300 ms.
    let start = Instant::now();
    let mut writer = c.tcp.try_clone().unwrap();
    let feeder = thread::spawn(move || {
        for byte in [
            0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00,
        ] {
            if writer.write_all(&[byte]).is_err() {
                return;
            }
            thread::sleep(Duration::from_millis(300));
        }
    });
    let mut rest = Vec::new();
    let _ = c.reader.read_to_end(&mut rest);
    let took = start.elapsed();
    feeder.join().unwrap();
    assert!(
        rest.is_empty(),
        "no plain text inside the handshake: {rest:?}"
    );
    assert_within(took, 0.8, 2.5);
}

/// A client outside `relay_networks` that talks before the greeting is
/// refused; one that waits gets the greeting after `greeting_delay`; a
/// client in `relay_networks` does not wait.
#[test]
fn early_talkers_are_refused_and_trusted_clients_do_not_wait() {
    let relay = Relay::start(
        "relay_networks = [\"127.0.0.1/32\"]\ngreeting_delay = \"800ms\"",
        "",
    );
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::new(ip("127.0.0.7"), 0).into())
        .unwrap();
    socket.connect(&relay.smtp.into()).unwrap();
    let tcp: TcpStream = socket.into();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut early = Raw {
        reader: BufReader::new(tcp.try_clone().unwrap()),
        tcp,
    };
    early.send(b"EHLO early.example\r\n").unwrap();
    assert_eq!(
        early.reply(),
        "554 5.5.0 relay.test Error: talked before the greeting; wait for the server"
    );
    assert!(early.closed());

    let start = Instant::now();
    let (mut patient, greeting) = Client::connect_from(ip("127.0.0.7"), relay.smtp);
    assert_eq!(greeting.code, 220);
    assert_within(start.elapsed(), 0.7, 3.0);
    patient.expect("EHLO patient.example", 250);

    let start = Instant::now();
    let (_trusted, greeting) = Client::connect_from(ip("127.0.0.1"), relay.smtp);
    assert_eq!(greeting.code, 220);
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "{:?}",
        start.elapsed()
    );
}

/// JSON log lines whose message is `message`.
fn log_lines(relay: &Relay, message: &str) -> Vec<serde_json::Value> {
    relay
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == message)
        .collect()
}

/// 40 idle connections from four addresses against a node of 30 slots,
/// half of them for anonymous clients: a client in `relay_networks` and a
/// client that authenticates still get in and get their mail accepted,
/// while the flood evicts its own oldest members; refusals and evictions
/// are logged as counts, not one line each.
#[test]
fn an_idle_flood_cannot_lock_out_trusted_or_authenticated_clients() {
    let hash = smarthost_node::auth::hash_password("s3cret");
    let relay = Relay::start(
        &format!(
            "relay_networks = [\"127.0.0.1/32\"]\nmax_connections = 30\nmax_connections_per_ip = 10\n\
             anonymous_connection_share = 0.5\ngreeting_delay = \"0s\"\nallow_plaintext_auth = true\n\n\
             [[smtp.users]]\nname = \"app\"\npassword_hash = {hash:?}\n"
        ),
        "",
    );
    let flood = |round: usize| -> Vec<TcpStream> {
        let mut sockets = Vec::new();
        for i in 0..40 {
            let source = ip(&format!("127.0.0.{}", 2 + (i + round) % 4));
            let socket =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            socket.bind(&SocketAddr::new(source, 0).into()).unwrap();
            socket
                .connect_timeout(&relay.smtp.into(), Duration::from_secs(5))
                .unwrap();
            sockets.push(socket.into());
            thread::sleep(Duration::from_millis(5));
        }
        sockets
    };
    let first = flood(0);

    // Trusted: in relay_networks, relays without AUTH.
    let (mut trusted, greeting) = Client::connect_from(ip("127.0.0.1"), relay.smtp);
    assert_eq!(greeting.code, 220, "{greeting:?}");
    trusted.expect("EHLO app.example", 250);
    let reply = trusted.send_message(
        "app@example.com",
        &["user@example.org"],
        &message_of_size("trusted", 500),
    );
    assert_eq!(reply.code, 250, "{reply:?}");

    // Authenticated: arrives anonymous, logs in, survives the next wave.
    let (mut app, greeting) = Client::connect_from(ip("127.0.0.9"), relay.smtp);
    assert_eq!(greeting.code, 220, "{greeting:?}");
    app.expect("EHLO app.example", 250);
    app.expect("AUTH PLAIN AGFwcABzM2NyZXQ=", 235);
    let second = flood(1);
    thread::sleep(Duration::from_millis(300));
    let reply = app.send_message(
        "app@example.com",
        &["user@example.org"],
        &message_of_size("authenticated", 500),
    );
    assert_eq!(reply.code, 250, "{reply:?}");

    // Of the 80 flood connections, at most 15 hold a slot; the rest were
    // told why and closed.
    let mut evicted = 0;
    for mut socket in first.into_iter().chain(second) {
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut bytes = Vec::new();
        let _ = socket.read_to_end(&mut bytes);
        if String::from_utf8_lossy(&bytes)
            .contains("421 4.7.0 relay.test Too many connections, closing idle session")
        {
            evicted += 1;
        }
    }
    assert!(evicted >= 65, "{evicted} of 80 flood connections evicted");

    // One line per interval with the counts.
    let deadline = Instant::now() + Duration::from_secs(8);
    let counted = loop {
        let total: u64 = log_lines(&relay, "connections refused or evicted")
            .iter()
            .map(|l| l["fields"]["evicted"].as_u64().unwrap_or(0))
            .sum();
        if total >= 65 || Instant::now() > deadline {
            break total;
        }
        thread::sleep(Duration::from_millis(200));
    };
    assert!(
        counted >= 65,
        "evictions logged: {counted}\n{}",
        relay.log()
    );
    let lines = log_lines(&relay, "connections refused or evicted").len();
    assert!(lines <= 3, "{lines} aggregate lines");
    assert!(log_lines(&relay, "connection refused").is_empty());
}

/// The open-file limit of `pid` (soft, hard).
fn nofile(pid: u32) -> (u64, u64) {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit with no new limit only reads into `old`.
    let rc = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    (old.rlim_cur, old.rlim_max)
}

fn set_nofile(pid: u32, soft: u64, hard: u64) {
    let new = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: prlimit reads `new`; the process is our child.
    let rc = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// User plus system CPU time of `pid` in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5), 12 and 13 here.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks as f64 / hz
}

/// Out of file descriptors, `accept()` fails with EMFILE while clients
/// wait in the backlog: the listener pauses instead of spinning, logs a
/// count at most once per interval, and serves again once descriptors are
/// free.
#[test]
fn out_of_file_descriptors_the_listener_backs_off_and_recovers() {
    let relay = Relay::start(
        "max_connections = 200",
        "[delivery]\nmax_connections = 10\n",
    );
    let pid = relay.pid();
    let (soft, hard) = nofile(pid);
    assert!(
        soft >= 310,
        "the node raised its soft limit: {soft} of {hard}"
    );
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as u64;
    set_nofile(pid, open + 4, hard);

    let mut clients = Vec::new();
    for _ in 0..30 {
        clients.push(TcpStream::connect_timeout(&relay.smtp, Duration::from_secs(5)).unwrap());
    }
    let cpu_before = cpu_seconds(pid);
    let window = Duration::from_secs(3);
    thread::sleep(window);
    let cpu = cpu_seconds(pid) - cpu_before;
    let failures = log_lines(
        &relay,
        "accept failed; pausing accepts (failures counted since the last report)",
    );
    eprintln!(
        "EMFILE for {window:?}: {} log lines, {cpu:.2} s of CPU",
        failures.len()
    );
    assert!(
        !failures.is_empty(),
        "the failure is logged:\n{}",
        relay.log()
    );
    assert!(
        failures.len() <= 2,
        "{} lines in {window:?}",
        failures.len()
    );
    assert!(cpu < 0.5, "{cpu} s of CPU in {window:?}");
    assert!(
        failures[0]["fields"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("Too many open files")),
        "{:?}",
        failures[0]
    );

    // Descriptors come free when the waiting clients leave.
    drop(clients);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut probe = TcpStream::connect_timeout(&relay.smtp, Duration::from_secs(5)).unwrap();
        probe
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let mut greeting = [0u8; 4];
        if probe.read_exact(&mut greeting).is_ok() && &greeting == b"220 " {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no greeting after the clients left:\n{}",
            relay.log()
        );
        thread::sleep(Duration::from_millis(200));
    }
    let (mut c, _) = Client::connect(relay.smtp);
    c.expect("EHLO back.example", 250);
    let failures = log_lines(
        &relay,
        "accept failed; pausing accepts (failures counted since the last report)",
    );
    assert!(failures.len() <= 4, "{} lines", failures.len());
}

/// Limits that cannot fit in the open-file limit stop the node at start
/// with a message that names the keys.
#[test]
fn limits_that_cannot_fit_the_open_file_limit_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("smarthost.toml");
    std::fs::write(
        &config,
        format!(
            "[smtp]\nlisten = [\"127.0.0.1:{}\"]\n[queue]\npath = {:?}\n[admin]\nlisten = \"127.0.0.1:{}\"\n\
             [delivery]\nlog_file = {:?}\n",
            free_port(),
            dir.path().join("spool").display().to_string(),
            free_port(),
            dir.path().join("delivery.log").display().to_string(),
        ),
    )
    .unwrap();
    let mut command = Command::new(smarthost_bin());
    command
        .args(["run", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: only setrlimit, which is async-signal-safe, between fork and exec.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 256,
                rlim_max: 256,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("smarthost did not stop at start");
        }
        thread::sleep(Duration::from_millis(50));
    };
    let output = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!status.success(), "{text}");
    assert!(
        text.contains("smtp.max_connections (1000) + delivery.max_connections (500)"),
        "{text}"
    );
    assert!(text.contains("need 1600 open files"), "{text}");
    assert!(
        text.contains("(RLIMIT_NOFILE) is 256 (hard limit 256)"),
        "{text}"
    );
}

/// A trusted client that only sends commands that move no mail holds its
/// slot for `junk_command_limit` of them and twenty more (each an error),
/// then gets `421 4.7.0` and the connection closes; a stored message starts
/// the count again, so a client that sends mail between them is never cut.
#[test]
fn commands_that_move_no_mail_end_the_session_past_the_junk_limit() {
    let relay = Relay::start("junk_command_limit = 5", "");
    let (mut client, greeting) = Client::connect(relay.smtp);
    assert_eq!(greeting.code, 220);
    client.expect("EHLO junk.example", 250);
    for _ in 0..5 {
        client.expect("NOOP", 250);
    }
    let reply = client.send_message(
        "app@sender.test",
        &["user@dest.test"],
        "Subject: real mail\r\n\r\nBetween the NOOPs.\r\n",
    );
    assert_eq!(reply.code, 250, "{reply:?}");
    for verb in ["NOOP", "RSET", "HELP", "NOOP", "RSET"] {
        client.expect(verb, if verb == "HELP" { 214 } else { 250 });
    }
    // Past the limit each one still gets its answer, and counts as an error.
    for _ in 0..20 {
        client.expect("NOOP", 250);
    }
    let reply = client.cmd("NOOP");
    assert_eq!(
        (reply.code, reply.status()),
        (421, Some("4.7.0")),
        "{reply:?}"
    );
    assert!(client.is_closed());
}
