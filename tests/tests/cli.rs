//! The `smarthost` command line, run as a real process: `check-config` on
//! good and bad files, environment overrides, `hash-password`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use smarthost_tests::smarthost_bin;

/// Runs `smarthost` with `args` and `env`, without any `SMARTHOST__`
/// variables of the calling environment.
fn smarthost(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(smarthost_bin());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("SMARTHOST__") {
            command.env_remove(key);
        }
    }
    command
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

struct Dir(tempfile::TempDir);

impl Dir {
    fn new() -> Self {
        Dir(tempfile::tempdir().unwrap())
    }

    fn file(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.path().join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    /// A self-signed certificate and its key, as PEM files.
    fn tls_files(&self) -> (PathBuf, PathBuf) {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        (
            self.file("cert.pem", &certified.cert.pem()),
            self.file("key.pem", &certified.signing_key.serialize_pem()),
        )
    }
}

const GOOD: &str = r#"
[node]
id = "node-1"
hostname = "relay.example.com"

[smtp]
listen = ["127.0.0.1:2525"]
max_message_size = "10MB"
max_recipients = 100
relay_networks = ["127.0.0.0/8", "10.0.0.0/8"]

[queue]
path = "./spool"
retry_intervals = ["15m", "30m", "1h", "4h"]

[[domains]]
name = "example.org"
rate = "50/s"
"#;

/// `check-config` on `toml` must fail with exit code 2 and name `key`.
fn assert_rejected(toml: &str, key: &str) {
    let dir = Dir::new();
    let path = dir.file("smarthost.toml", toml);
    let output = smarthost(&["check-config", path.to_str().unwrap()], &[]);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    assert!(
        text(&output).contains(key),
        "`{key}` not named in:\n{}",
        text(&output)
    );
}

#[test]
fn a_good_file_passes() {
    let dir = Dir::new();
    let path = dir.file("smarthost.toml", GOOD);
    let output = smarthost(&["check-config", path.to_str().unwrap()], &[]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        format!("configuration OK: {}", path.display())
    );
}

#[test]
fn the_file_may_also_come_with_config() {
    let dir = Dir::new();
    let path = dir.file("smarthost.toml", GOOD);
    let output = smarthost(&["check-config", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
}

#[test]
fn a_bad_size_is_rejected() {
    assert_rejected(
        &GOOD.replace("\"10MB\"", "\"10 megs\""),
        "smtp.max_message_size: unknown size unit",
    );
}

#[test]
fn an_unknown_key_is_rejected_with_the_allowed_keys() {
    assert_rejected(
        &GOOD.replace("max_recipients", "max_rcpt"),
        "smtp.max_rcpt: unknown key in [smtp]",
    );
    assert_rejected(
        &GOOD.replace("max_recipients", "max_rcpt"),
        "max_recipients",
    );
}

#[test]
fn an_unknown_section_is_rejected() {
    assert_rejected(
        &format!("{GOOD}\n[smpt]\nlisten = []\n"),
        "smpt: unknown section",
    );
}

#[test]
fn a_bad_duration_is_rejected() {
    assert_rejected(
        &GOOD.replace("\"30m\"", "\"30 minutes or so\""),
        "queue.retry_intervals",
    );
}

#[test]
fn a_missing_tls_file_is_rejected() {
    let dir = Dir::new();
    let (cert, _) = dir.tls_files();
    let toml = format!(
        "{GOOD}\n[smtp.tls]\ncert = {cert:?}\nkey = {:?}\n",
        dir.0.path().join("missing-key.pem")
    );
    assert_rejected(&toml, "smtp.tls.key: cannot read");
}

#[test]
fn a_local_domain_without_drop_dir_is_rejected() {
    assert_rejected(
        &format!("{GOOD}\n[[domains]]\nname = \"internal.example\"\nkind = \"local\"\n"),
        "domains[1].drop_dir",
    );
}

#[test]
fn every_problem_is_reported_at_once() {
    let toml = GOOD
        .replace("max_recipients = 100", "max_recipients = 0")
        .replace("\"50/s\"", "\"lots\"");
    let dir = Dir::new();
    let path = dir.file("smarthost.toml", &toml);
    let output = smarthost(&["check-config", path.to_str().unwrap()], &[]);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    assert!(text(&output).contains("smtp.max_recipients: must be greater than 0"));
    assert!(text(&output).contains("domains[0].rate: "));
}

#[test]
fn an_environment_override_can_make_a_good_file_bad() {
    let dir = Dir::new();
    let path = dir.file("smarthost.toml", GOOD);
    for (key, value, named) in [
        (
            "SMARTHOST__SMTP__MAX_RECIPIENTS",
            "0",
            "smtp.max_recipients",
        ),
        (
            "SMARTHOST__SMTP__MAX_MESSAGE_SIZE",
            "1TB",
            "smtp.max_message_size",
        ),
        ("SMARTHOST__QUEUE__BACKEND", "postgres", "queue.backend"),
        (
            "SMARTHOST__SMTP__LISTEN",
            "127.0.0.1:2525,nowhere",
            "smtp.listen",
        ),
    ] {
        let output = smarthost(&["check-config", path.to_str().unwrap()], &[(key, value)]);
        assert_eq!(output.status.code(), Some(2), "{key}: {}", text(&output));
        assert!(
            text(&output).contains(named),
            "{key}: `{named}` not in {}",
            text(&output)
        );
    }
    let output = smarthost(
        &["check-config", path.to_str().unwrap()],
        &[("SMARTHOST__SMTP__MAX_MESSAGE_SIZE", "1MB")],
    );
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
}

#[test]
fn run_refuses_a_bad_configuration() {
    let dir = Dir::new();
    let path = dir.file("smarthost.toml", &GOOD.replace("\"10MB\"", "\"10XB\""));
    let output = smarthost(&["run", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    assert!(text(&output).contains("smtp.max_message_size"));
}

#[test]
fn hash_password_output_verifies() {
    let output = smarthost(&["hash-password", "correct horse"], &[]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    let phc = String::from_utf8(output.stdout).unwrap();
    let phc = phc.trim();
    assert!(smarthost_node::auth::verify_password(phc, "correct horse"));
    assert!(!smarthost_node::auth::verify_password(
        phc,
        "correct horse "
    ));
}

#[test]
fn hash_password_reads_standard_input() {
    let mut child = Command::new(smarthost_bin())
        .args(["hash-password", "--stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"from stdin\n")
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    let phc = String::from_utf8(output.stdout).unwrap();
    assert!(smarthost_node::auth::verify_password(
        phc.trim(),
        "from stdin"
    ));
}

/// The shipped example must pass as it is, with its TLS files put where the
/// environment says.
#[test]
fn the_example_configuration_passes() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/smarthost.example.toml");
    let dir = Dir::new();
    let (cert, key) = dir.tls_files();
    let output = smarthost(
        &["check-config", example.to_str().unwrap()],
        &[
            ("SMARTHOST__SMTP__TLS__CERT", cert.to_str().unwrap()),
            ("SMARTHOST__SMTP__TLS__KEY", key.to_str().unwrap()),
        ],
    );
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
}

/// The complete example at the end of the configuration reference passes too.
#[test]
fn the_documented_example_passes() {
    let reference = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/configuration.md"),
    )
    .unwrap();
    let (_, example) = reference
        .rsplit_once("## A complete example")
        .expect("the reference ends with a complete example");
    let toml = example
        .split("```toml\n")
        .nth(1)
        .and_then(|block| block.split("```").next())
        .expect("a toml block");
    let dir = Dir::new();
    let path = dir.file("smarthost.toml", toml);
    let (cert, key) = dir.tls_files();
    let output = smarthost(
        &["check-config", path.to_str().unwrap()],
        &[
            ("SMARTHOST__SMTP__TLS__CERT", cert.to_str().unwrap()),
            ("SMARTHOST__SMTP__TLS__KEY", key.to_str().unwrap()),
        ],
    );
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
}
