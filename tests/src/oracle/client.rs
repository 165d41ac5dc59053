//! Submission over SMTP and the ledger of what the relay answered: a
//! recipient enters the ledger only when its `RCPT` got `250` and the
//! message's final dot got `250` — the relay's promise.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use super::workload::{digest, dot_stuff, Message};

const CONNECT: Duration = Duration::from_secs(5);
/// Generous: a debug build storing a 3 MB message on a busy machine.
const REPLY: Duration = Duration::from_secs(60);

/// What became of one submission.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// `250` to the final dot: every recipient in `accepted` is promised.
    Accepted { queue_id: String },
    /// The message may or may not be stored: no reply to the final dot
    /// (connection lost), or a `4xx` to it (the Redis backend documents
    /// that a store it stopped waiting for may still land).
    Uncertain { why: String },
    /// Refused before the final dot, or with `5xx` to it: never stored.
    Refused { why: String },
}

/// One line of the ledger.
#[derive(Clone, Debug)]
pub struct Entry {
    pub n: usize,
    pub oracle_id: String,
    pub sender: Option<String>,
    /// Recipients whose `RCPT` got `250`, lower case.
    pub accepted: Vec<String>,
    /// Recipients refused at `RCPT` (`(address, reply)`).
    pub refused: Vec<(String, String)>,
    pub answer: Answer,
    /// [`digest`] of the content as submitted.
    pub digest: u64,
    /// The node it was submitted to.
    pub node: usize,
    /// When the answer came, from the start of the run.
    pub at: Duration,
}

struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Conn {
    /// One reply: `(code, text of the last line)`.
    fn reply(&mut self) -> Result<(u16, String), String> {
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) => return Err("connection closed".into()),
                Ok(_) => {}
                Err(e) => return Err(format!("read: {e}")),
            }
            let code = line
                .get(..3)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| format!("bad reply {line:?}"))?;
            if line.as_bytes().get(3) != Some(&b'-') {
                return Ok((code, line.get(4..).unwrap_or("").trim_end().to_string()));
            }
        }
    }

    fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.writer
            .write_all(bytes)
            .map_err(|e| format!("write: {e}"))
    }

    fn command(&mut self, line: &str) -> Result<(u16, String), String> {
        self.send(format!("{line}\r\n").as_bytes())?;
        self.reply()
    }
}

/// Submits `message` to `addr` and returns what the relay answered.
pub fn submit(addr: SocketAddr, message: &Message) -> (Vec<String>, Vec<(String, String)>, Answer) {
    let refused = |why: String| (Vec::new(), Vec::new(), Answer::Refused { why });
    let socket = match TcpStream::connect_timeout(&addr, CONNECT) {
        Ok(s) => s,
        Err(e) => return refused(format!("connect: {e}")),
    };
    let _ = socket.set_read_timeout(Some(REPLY));
    let _ = socket.set_nodelay(true);
    let Ok(reader) = socket.try_clone() else {
        return refused("clone".into());
    };
    let mut c = Conn {
        reader: BufReader::new(reader),
        writer: socket,
    };
    let step = |c: &mut Conn, line: Option<&str>, want: u16| -> Result<(), String> {
        let (code, text) = match line {
            Some(line) => c.command(line)?,
            None => c.reply()?,
        };
        if code == want {
            Ok(())
        } else {
            Err(format!("{} got {code} {text}", line.unwrap_or("greeting")))
        }
    };
    if let Err(why) = step(&mut c, None, 220)
        .and_then(|_| step(&mut c, Some("EHLO oracle.client.test"), 250))
        .and_then(|_| step(&mut c, Some(&message.mail_from()), 250))
    {
        return refused(why);
    }
    let mut accepted = Vec::new();
    let mut refused_rcpts = Vec::new();
    for rcpt in &message.recipients {
        match c.command(&format!("RCPT TO:<{rcpt}>")) {
            Ok((250, _)) => accepted.push(rcpt.to_ascii_lowercase()),
            Ok((code, text)) => refused_rcpts.push((rcpt.clone(), format!("{code} {text}"))),
            Err(why) => return (Vec::new(), Vec::new(), Answer::Refused { why }),
        }
    }
    if accepted.is_empty() {
        let _ = c.command("QUIT");
        return (
            Vec::new(),
            refused_rcpts,
            Answer::Refused {
                why: "every recipient refused".into(),
            },
        );
    }
    if let Err(why) = step(&mut c, Some("DATA"), 354) {
        return (accepted, refused_rcpts, Answer::Refused { why });
    }
    let mut data = dot_stuff(&message.content);
    data.extend_from_slice(b".\r\n");
    if let Err(why) = c.send(&data) {
        // The final dot may have gone out with the last bytes written.
        return (accepted, refused_rcpts, Answer::Uncertain { why });
    }
    let answer = match c.reply() {
        Ok((250, text)) => Answer::Accepted {
            queue_id: text.rsplit(' ').next().unwrap_or("").to_string(),
        },
        Ok((code, text)) if (400..500).contains(&code) => Answer::Uncertain {
            why: format!("{code} {text}"),
        },
        Ok((code, text)) => Answer::Refused {
            why: format!("{code} {text}"),
        },
        Err(why) => Answer::Uncertain { why },
    };
    let _ = c.command("QUIT");
    (accepted, refused_rcpts, answer)
}

/// Submits `message` and writes its ledger entry.
pub fn submit_entry(
    addr: SocketAddr,
    node: usize,
    message: &Message,
    at: impl Fn() -> Duration,
) -> Entry {
    let (accepted, refused, answer) = submit(addr, message);
    Entry {
        n: message.n,
        oracle_id: message.oracle_id.clone(),
        sender: message.sender.clone(),
        accepted,
        refused,
        answer,
        digest: digest(&message.content),
        node,
        at: at(),
    }
}
