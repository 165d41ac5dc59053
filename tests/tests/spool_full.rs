//! A spool that cannot write answers 451 4.3.0, keeps what it had, and
//! takes mail again once there is room. The spool lives on a small tmpfs,
//! which needs root (CI and the test script run as root).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use smarthost_tests::relay::Relay;
use smarthost_tests::smtp::{message_of_size, queued_id, Client};

struct Tmpfs<'a>(&'a Path);

impl Drop for Tmpfs<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0).status();
    }
}

#[test]
fn a_full_spool_answers_451_and_loses_nothing() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(
        root,
        "this test mounts a tmpfs and must run as root (as CI does)"
    );

    let relay_dir = tempfile::tempdir().unwrap();
    let spool = relay_dir.path().join("small");
    std::fs::create_dir(&spool).unwrap();
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&spool)
        .status()
        .expect("run mount");
    assert!(
        status.success(),
        "cannot mount a tmpfs on {}",
        spool.display()
    );
    let _mounted = Tmpfs(&spool);

    let mut relay = Relay::start_with_env(
        "",
        "",
        &[("SMARTHOST__QUEUE__PATH", spool.to_str().unwrap())],
    );
    let (mut c, _) = Client::connect(relay.smtp);
    c.expect("EHLO client.example", 250);
    let body = message_of_size("filler", 100_000);
    let mut accepted = Vec::new();
    let mut refused = None;
    for _ in 0..30 {
        let reply = c.send_message("app@example.com", &["user@example.org"], &body);
        if reply.code == 250 {
            accepted.push(queued_id(&reply));
        } else {
            refused = Some(reply);
            break;
        }
    }
    let refused = refused.expect("a 1 MB spool must fill up within 30 messages of 100 KB");
    assert_eq!(
        (refused.code, refused.status()),
        (451, Some("4.3.0")),
        "{refused:?}"
    );
    assert!(accepted.len() >= 5, "only {} messages fit", accepted.len());
    // The session and the relay go on.
    c.expect("NOOP", 250);
    let small = c.send_message(
        "app@example.com",
        &["user@example.org"],
        "Subject: small\r\n\r\nhi\r\n",
    );
    if small.code == 250 {
        accepted.push(queued_id(&small));
    } else {
        assert_eq!(small.code, 451, "{small:?}");
    }
    c.expect("QUIT", 221);
    relay.terminate(Duration::from_secs(20));

    let spooled: Vec<String> = relay
        .spool_records()
        .iter()
        .map(|r| r.id.to_string())
        .collect();
    for id in &accepted {
        assert!(
            spooled.contains(id),
            "accepted message {id} lost; accepted {accepted:?}, spooled {spooled:?}\n{}",
            relay.log()
        );
    }
    assert_eq!(
        spooled.len(),
        accepted.len(),
        "refused messages must not be spooled"
    );
}
