//! The W3C SMTP session log (`log.session_log_dir`) against the real relay:
//! a client's commands, each with its final reply, in the format IIS wrote.

use std::time::{Duration, Instant};

use smarthost_tests::relay::Relay;
use smarthost_tests::smtp::{queued_id, Client};

/// The day's file and its data lines split into fields, once `done`
/// says they are all there.
fn lines(
    dir: &std::path::Path,
    done: impl Fn(&[Vec<String>]) -> bool,
) -> (String, Vec<Vec<String>>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let files: Vec<_> = std::fs::read_dir(dir)
            .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default();
        if let [file] = files.as_slice() {
            let text = std::fs::read_to_string(file).unwrap();
            let rows: Vec<Vec<String>> = text
                .split("\r\n")
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(|l| l.split(' ').map(str::to_string).collect())
                .collect();
            if done(&rows) {
                let name = file.file_name().unwrap().to_string_lossy().into_owned();
                return (name + "\n" + &text, rows);
            }
        }
        assert!(
            Instant::now() < deadline,
            "the log never had every line: {files:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn each_command_is_logged_with_its_final_reply_in_w3c_format() {
    let dir = tempfile::tempdir().unwrap();
    let log_dir = dir.path().join("smtp-logs");
    let relay = Relay::start_with_env(
        "",
        "",
        &[("SMARTHOST__LOG__SESSION_LOG_DIR", log_dir.to_str().unwrap())],
    );
    let (mut c, _) = Client::connect(relay.smtp);
    c.expect("EHLO app.example", 250);
    c.expect("MAIL FROM:<app@sender.test>", 250);
    c.expect("RCPT TO:<user@dest.test>", 250);
    let body = format!(
        "Subject: logged\r\n\r\n{}",
        format!("{}\r\n", "x".repeat(98)).repeat(10)
    );
    let id = queued_id(&c.send_data(&body));
    // A command out of sequence.
    c.expect("RCPT TO:<x@y.test>", 503);
    c.expect("QUIT", 221);

    // The harness's own readiness probe (a QUIT) may come first.
    let (text, rows) = lines(&log_dir, |rows| {
        rows.len() >= 6
            && rows.iter().any(|r| r[9] == "TO:<x@y.test>")
            && rows.last().unwrap()[8] == "QUIT"
    });
    let rows = &rows[rows.len() - 6..];
    let today = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let name = format!("smtp-{}.log", today[..10].replace('-', ""));
    assert!(
        text.starts_with(&format!("{name}\n#Software: smarthost ")),
        "{text}"
    );
    assert!(
        text.contains(
            "#Fields: date time c-ip cs-username s-sitename s-computername s-ip s-port \
             cs-method cs-uri-query sc-status sc-bytes cs-bytes time-taken\r\n"
        ),
        "{text}"
    );
    assert!(rows.iter().all(|r| r.len() == 14), "{text}");
    let port = relay.smtp.port().to_string();
    for row in rows {
        assert_eq!(row[2], "127.0.0.1", "{text}");
        assert_eq!(
            (row[4].as_str(), row[5].as_str()),
            ("smarthost", "relay.test"),
            "{text}"
        );
        assert_eq!(
            (row[6].as_str(), row[7].as_str()),
            ("127.0.0.1", port.as_str()),
            "{text}"
        );
    }
    let commands: Vec<(&str, &str, &str)> = rows
        .iter()
        .map(|r| (r[8].as_str(), r[9].as_str(), r[10].as_str()))
        .collect();
    assert_eq!(
        commands,
        [
            ("EHLO", "app.example", "250"),
            ("MAIL", "FROM:<app@sender.test>", "250"),
            ("RCPT", "TO:<user@dest.test>", "250"),
            ("DATA", "-", "250"),
            ("RCPT", "TO:<x@y.test>", "503"),
            ("QUIT", "-", "221"),
        ],
        "{text}"
    );
    // DATA counts the message's octets, its reply names the queue id.
    let data = &rows[3];
    let received: u64 = data[12].parse().unwrap();
    assert!((1000..1100).contains(&received), "{text}");
    let sent: u64 = data[11].parse().unwrap();
    assert!(sent > id.len() as u64, "{text}");
}
