//! Starts the real `smarthost` binary on a free loopback port with its own
//! spool directory, and stops it the way an operator or a crash would.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use smarthost_node::spool::{LocalSpool, LocalSpoolOptions, Spool};
use smarthost_proto::envelope::{MessageId, MessageRecord};

use crate::smarthost_bin;

pub use smarthost_testkit::free_port;

/// Keeps a test relay's outbound traffic on this machine and its files in
/// its own directory: unless the test says otherwise, DNS questions go to a
/// loopback port where nothing answers (so mail for real domains is only
/// deferred, never sent) and the delivery log is written beside the spool.
fn contain_delivery(sections: &str, dir: &std::path::Path) -> String {
    let log = format!("{:?}", dir.join("delivery.log").display().to_string());
    let dns = format!("[\"127.0.0.1:{}\"]", free_port());
    with_defaults(
        sections,
        "delivery",
        &[("log_file", log), ("dns_servers", dns)],
    )
}

/// Gives every relay its own admin port unless the test chose one; returns
/// the sections and the admin address.
fn contain_admin(sections: &str) -> (String, SocketAddr) {
    let ours = format!("\"127.0.0.1:{}\"", free_port());
    let text = with_defaults(sections, "admin", &[("listen", ours)]);
    let (start, end) = table_body(&text, "admin").expect("just written");
    let listen = text[start..end]
        .lines()
        .find_map(|line| {
            let (key, value) = line.split_once('=')?;
            (key.trim() == "listen").then(|| value.trim().trim_matches('"').parse().ok())?
        })
        .expect("admin.listen is an address");
    (text, listen)
}

/// Where the lines of `[table]` are in `sections`.
fn table_body(sections: &str, table: &str) -> Option<(usize, usize)> {
    let header = format!("[{table}]\n");
    let start = sections.find(&header)? + header.len();
    let end = sections[start..]
        .find("\n[")
        .map_or(sections.len(), |i| start + i);
    Some((start, end))
}

/// The address in the last "cannot listen on ADDR: …" of `log`.
fn taken_address(log: &str) -> Option<SocketAddr> {
    let (_, rest) = log.rsplit_once("cannot listen on ")?;
    let (addr, why) = rest.split_once(": ")?;
    why.contains("in use").then(|| addr.parse().ok())?
}

/// `sections` with `key = value` added to `[table]` for every key the test
/// did not set (the table is added when missing).
fn with_defaults(sections: &str, table: &str, defaults: &[(&str, String)]) -> String {
    let Some((start, end)) = table_body(sections, table) else {
        let lines: String = defaults
            .iter()
            .map(|(key, value)| format!("{key} = {value}\n"))
            .collect();
        return format!("[{table}]\n{lines}\n{sections}");
    };
    let body = &sections[start..end];
    let missing: String = defaults
        .iter()
        .filter(|(key, _)| !body.contains(key))
        .map(|(key, value)| format!("{key} = {value}\n"))
        .collect();
    format!("{}{missing}{}", &sections[..start], &sections[start..])
}

pub struct Relay {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub smtp: SocketAddr,
    admin: SocketAddr,
    pub config: PathBuf,
    pub spool: PathBuf,
    log: PathBuf,
    env: Vec<(String, String)>,
    /// The subcommand: `run`, `node` or `coordinator`.
    command: &'static str,
}

impl Relay {
    /// Starts a relay whose `[smtp]` section holds `listen` plus
    /// `smtp_lines`, followed by the other `sections` (TOML text).
    pub fn start(smtp_lines: &str, sections: &str) -> Relay {
        Self::start_with_env(smtp_lines, sections, &[])
    }

    pub fn start_with_env(smtp_lines: &str, sections: &str, env: &[(&str, &str)]) -> Relay {
        Self::start_as("run", smtp_lines, sections, env)
    }

    /// [`Relay::start_with_env`] running `smarthost COMMAND` (`run`, `node`
    /// or `coordinator`, which listens for no mail: it is ready once it
    /// says it runs).
    pub fn start_as(
        command: &'static str,
        smtp_lines: &str,
        sections: &str,
        env: &[(&str, &str)],
    ) -> Relay {
        let dir = tempfile::tempdir().expect("temp dir");
        let smtp: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let spool = dir.path().join("spool");
        let config = dir.path().join("smarthost.toml");
        let sections = contain_delivery(sections, dir.path());
        let (sections, admin) = contain_admin(&sections);
        let text = format!(
            "[node]\nhostname = \"relay.test\"\n\n[smtp]\nlisten = [\"{smtp}\"]\n{smtp_lines}\n\n\
             [queue]\npath = {spool:?}\n\n[log]\nformat = \"json\"\nlevel = \"info\"\n\n{sections}\n",
            spool = spool.display().to_string()
        );
        std::fs::write(&config, text).expect("write config");
        // The environment overrides the file, as it does for the relay.
        let spool_in_use = env
            .iter()
            .find(|(k, _)| *k == "SMARTHOST__QUEUE__PATH")
            .map(|(_, v)| PathBuf::from(v))
            .unwrap_or_else(|| spool.clone());
        let admin = env
            .iter()
            .find(|(k, _)| *k == "SMARTHOST__ADMIN__LISTEN")
            .map(|(_, v)| v.parse().expect("SMARTHOST__ADMIN__LISTEN is an address"))
            .unwrap_or(admin);
        let mut relay = Relay {
            child: None,
            log: dir.path().join("smarthost.log"),
            dir,
            smtp,
            admin,
            config,
            spool: spool_in_use,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            command,
        };
        relay.launch();
        relay
    }

    /// Starts the process (again) on the same configuration and spool.
    /// A port taken by someone else between choosing it and binding it (the
    /// tests run in parallel) is swapped for another free one, at most
    /// twice.
    pub fn launch(&mut self) {
        assert!(self.child.is_none(), "relay already running");
        for attempt in 0..3 {
            let ready_before = self.log().matches(self.ready_line()).count();
            let log = File::options()
                .create(true)
                .append(true)
                .open(&self.log)
                .expect("log file");
            let child = Command::new(smarthost_bin())
                .arg(self.command)
                .arg("--config")
                .arg(&self.config)
                .envs(self.env.iter().map(|(k, v)| (k, v)))
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("start smarthost");
            self.child = Some(child);
            match self.wait_ready(ready_before) {
                Ok(()) => return,
                Err(taken) if attempt < 2 => self.move_off(taken),
                Err(taken) => panic!("{taken} stays taken:\n{}", self.log()),
            }
        }
    }

    /// The log line that says this process is up: its SMTP listener is
    /// bound (a coordinator listens for no mail).
    fn ready_line(&self) -> &'static str {
        match self.command {
            "coordinator" => "coordinator running",
            _ => "listening for SMTP",
        }
    }

    /// Waits (at most 30 s) until this process logs that it is up, and
    /// then until its SMTP port answers. `Err`: it could not bind an
    /// address that someone else took meanwhile.
    fn wait_ready(&mut self, ready_before: usize) -> Result<(), SocketAddr> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                let log = self.log();
                if let Some(taken) = taken_address(&log) {
                    return Err(taken);
                }
                panic!("smarthost exited with {status} at start:\n{log}");
            }
            if self.log().matches(self.ready_line()).count() <= ready_before {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            if self.command == "coordinator" {
                return Ok(());
            }
            if let Ok(mut probe) =
                TcpStream::connect_timeout(&self.smtp, Duration::from_millis(200))
            {
                // Say goodbye properly and wait for the close, so the probe
                // no longer counts against connection limits in the test.
                let _ = probe.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = probe.write_all(b"QUIT\r\n");
                let _ = probe.read_to_end(&mut Vec::new());
                std::thread::sleep(Duration::from_millis(100));
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("smarthost did not listen within 30 s:\n{}", self.log());
    }

    /// Moves the SMTP or admin address `taken` to a free port in the
    /// configuration file.
    fn move_off(&mut self, taken: SocketAddr) {
        let fresh: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let text = std::fs::read_to_string(&self.config).expect("read config");
        let quoted = format!("\"{taken}\"");
        assert!(
            text.contains(&quoted),
            "{taken} is taken and not in the file (set in the environment?)"
        );
        let text = text.replace(&quoted, &format!("\"{fresh}\""));
        std::fs::write(&self.config, text).expect("write config");
        if self.smtp == taken {
            self.smtp = fresh;
        }
        if self.admin == taken {
            self.admin = fresh;
        }
    }

    /// Where the relay's admin API listens (`[admin] listen`).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// Runs `smarthost ARGS --config <this relay's file>` (with the relay's
    /// environment plus `env`) and waits for it.
    pub fn cli(&self, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
        Command::new(smarthost_bin())
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .env_remove("SMARTHOST_TOKEN")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .output()
            .expect("run smarthost")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("relay running").id()
    }

    /// SIGKILL: a crash, nothing is flushed.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then wait (at most `limit`) for the process to exit.
    pub fn terminate(&mut self, limit: Duration) -> ExitStatus {
        self.send_sigterm();
        self.wait_exit(limit)
    }

    /// Asks the relay to shut down, as an operator or Kubernetes would.
    pub fn send_sigterm(&self) {
        self.send_signal(libc::SIGTERM);
    }

    /// Sends `signal` (such as `libc::SIGHUP`) to the relay process.
    pub fn send_signal(&self, signal: libc::c_int) {
        let pid = self.pid() as i32;
        // SAFETY: kill(2) with a pid we own and a valid signal number.
        unsafe {
            libc::kill(pid, signal);
        }
    }

    /// The process has not exited yet.
    pub fn is_running(&mut self) -> bool {
        let child = self.child.as_mut().expect("relay started");
        child.try_wait().unwrap().is_none()
    }

    /// Waits (at most `limit`) for the process to exit; kills it and
    /// panics if it does not.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("relay running");
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("smarthost did not stop within {limit:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything the process logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The records in the spool; the relay must be stopped (the spool is
    /// locked while a relay runs).
    pub fn spool_records(&self) -> Vec<MessageRecord> {
        self.with_spool(|spool| async move { spool.list().await.expect("list the spool") })
    }

    /// The body of one spooled message (relay stopped).
    pub fn spool_body(&self, id: &MessageId) -> Vec<u8> {
        let id = id.clone();
        self.with_spool(|spool| async move {
            let body = spool.read_body(&id).await.expect("read a body");
            body.to_vec().expect("read the part on disk")
        })
    }

    fn with_spool<T, F: std::future::Future<Output = T>>(
        &self,
        f: impl FnOnce(LocalSpool) -> F,
    ) -> T {
        assert!(
            self.child.is_none(),
            "stop the relay before reading its spool"
        );
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let spool =
            LocalSpool::open(&self.spool, LocalSpoolOptions::default()).expect("open the spool");
        runtime.block_on(f(spool))
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- smarthost log ---\n{}", self.log());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_taken_address_is_read_from_the_log() {
        let log = "{\"message\":\"admin API listening\"}\n\
                   error: cannot listen on 127.0.0.1:43273: Address already in use (os error 98)\n";
        assert_eq!(taken_address(log), Some("127.0.0.1:43273".parse().unwrap()));
        let admin =
            "error: admin.listen: cannot listen on 127.0.0.1:8025: Address already in use\n";
        assert_eq!(
            taken_address(admin),
            Some("127.0.0.1:8025".parse().unwrap())
        );
        assert_eq!(
            taken_address("error: cannot listen on 10.0.0.1:25: Cannot assign requested address"),
            None
        );
        assert_eq!(taken_address("error: queue.redis_url: refused"), None);
    }
}
