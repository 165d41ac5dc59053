//! What Redis did to the keys of a message, read back from the servers'
//! append-only files after a failed run: every command that names one of
//! the given message ids, with the time it ran and the server it ran on.
//! A lost recipient is then explained by its keys' history rather than
//! guessed at from the node logs (which a kill can cut short).
//!
//! The servers must keep their whole history
//! ([`smarthost_testkit::redis::HISTORY_ARGS`]): no rewrite folds it into
//! a snapshot, and `#TS:<unix seconds>` lines date the commands after them.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

/// How much of one argument is shown: ids and key names, not bodies.
const SHOWN: usize = 160;

/// How much of one argument is kept and searched: the files of a long run
/// hold gigabytes of bodies, and ids sit in keys and short values.
const KEPT: usize = 4096;

/// One command read back from an append-only file.
#[derive(Debug, PartialEq, Eq)]
struct Command {
    /// The last `#TS:` annotation before it, in Unix seconds.
    at: Option<u64>,
    /// Each argument's first [`KEPT`] bytes.
    args: Vec<Vec<u8>>,
    /// Each argument's whole length.
    lens: Vec<usize>,
}

/// The commands of one append-only file in RESP form, in order. A base
/// file in RDB form, or a torn tail, ends the reading there.
fn commands(bytes: &[u8]) -> Vec<Command> {
    let mut out = Vec::new();
    let mut at = None;
    let mut pos = 0;
    while pos < bytes.len() {
        let Some(line) = line_at(bytes, pos) else {
            break;
        };
        pos += line.len() + 2;
        if let Some(ts) = line.strip_prefix(b"#TS:") {
            at = std::str::from_utf8(ts).ok().and_then(|t| t.parse().ok());
            continue;
        }
        let Some(count) = number_after(line, b'*') else {
            break;
        };
        let mut args = Vec::with_capacity(count);
        let mut lens = Vec::with_capacity(count);
        for _ in 0..count {
            let Some(len) = line_at(bytes, pos).and_then(|l| number_after(l, b'$')) else {
                return out;
            };
            let start = pos + line_at(bytes, pos).map_or(0, |l| l.len() + 2);
            let Some(arg) = bytes.get(start..start + len) else {
                return out;
            };
            args.push(arg[..len.min(KEPT)].to_vec());
            lens.push(len);
            pos = start + len + 2;
        }
        out.push(Command { at, args, lens });
    }
    out
}

/// The line starting at `pos`, without its CRLF.
fn line_at(bytes: &[u8], pos: usize) -> Option<&[u8]> {
    let rest = bytes.get(pos..)?;
    let end = rest.windows(2).position(|w| w == b"\r\n")?;
    Some(&rest[..end])
}

fn number_after(line: &[u8], tag: u8) -> Option<usize> {
    let (first, digits) = line.split_first()?;
    (*first == tag)
        .then(|| std::str::from_utf8(digits).ok()?.parse().ok())
        .flatten()
}

/// The files of an `appendonlydir` in the order the server wrote them:
/// the base file, then the increments by sequence number.
fn files_in_order(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<(u8, u64, PathBuf)> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?.to_string();
            let kind = if name.contains(".base.") {
                0
            } else if name.ends_with(".incr.aof") {
                1
            } else {
                return None;
            };
            let seq = name.split('.').filter_map(|s| s.parse().ok()).next_back()?;
            Some((kind, seq, p))
        })
        .collect();
    files.sort();
    files.into_iter().map(|(_, _, p)| p).collect()
}

fn mentions(args: &[Vec<u8>], id: &str) -> bool {
    let id = id.as_bytes();
    args.iter().any(|a| a.windows(id.len()).any(|w| w == id))
}

/// The ids of reports kept with a record of one of `ids`: a report's own
/// message has keys of its own, so its history is wanted too.
fn reports_of(commands: &[&Command], ids: &BTreeSet<String>) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for c in commands {
        for arg in &c.args {
            let text = String::from_utf8_lossy(arg);
            for id in ids {
                for sep in [format!("{{m:{id}}}:report:"), format!("{id}:")] {
                    for (i, _) in text.match_indices(&sep) {
                        let tail = &text[i + sep.len()..];
                        let report: String =
                            tail.chars().take_while(|c| c.is_ascii_hexdigit()).collect();
                        if report.len() >= 16 {
                            found.insert(report);
                        }
                    }
                }
            }
        }
    }
    found
}

fn render(c: &Command) -> String {
    c.args
        .iter()
        .zip(&c.lens)
        .map(|(a, len)| {
            // Records are binary: control bytes are shown escaped, so the
            // trace stays one line per command and plain text.
            let text: String = String::from_utf8_lossy(a)
                .chars()
                .flat_map(|c| match c.is_control() {
                    true => c.escape_default().collect::<Vec<_>>(),
                    false => vec![c],
                })
                .collect();
            if *len > a.len() || text.chars().count() > SHOWN {
                let cut: String = text.chars().take(SHOWN).collect();
                format!("{cut}…({len} bytes)")
            } else {
                text
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Every command of the servers' append-only files (`(name, appendonlydir)`)
/// that names one of `ids` or a report kept with one of them, one line each:
/// `<unix seconds> <server> <command>`, ordered per server as written.
pub fn trace(servers: &[(String, PathBuf)], ids: &[String]) -> String {
    let mut out = String::new();
    let per_server: Vec<(&String, Vec<Command>)> = servers
        .iter()
        .map(|(name, dir)| {
            let commands = files_in_order(dir)
                .iter()
                .filter_map(|f| fs::read(f).ok())
                .flat_map(|bytes| commands(&bytes))
                .collect();
            (name, commands)
        })
        .collect();
    let mut wanted: BTreeSet<String> = ids.iter().cloned().collect();
    let matching = |wanted: &BTreeSet<String>| -> Vec<(&String, &Command)> {
        per_server
            .iter()
            .flat_map(|(name, cs)| cs.iter().map(move |c| (*name, c)))
            .filter(|(_, c)| wanted.iter().any(|id| mentions(&c.args, id)))
            .collect()
    };
    let first: Vec<&Command> = matching(&wanted).into_iter().map(|(_, c)| c).collect();
    wanted.extend(reports_of(&first, &wanted));
    for (name, c) in matching(&wanted) {
        let at = c.at.map_or("?".to_string(), |t| t.to_string());
        out.push_str(&format!("{at} {name} {}\n", render(c)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(args: &[&str]) -> String {
        let mut s = format!("*{}\r\n", args.len());
        for a in args {
            s.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s
    }

    #[test]
    fn commands_carry_the_time_of_the_last_annotation_and_a_torn_tail_ends_them() {
        let text = format!(
            "{}#TS:1700000000\r\n{}{}*2\r\n$3\r\nDEL\r\n$10\r\nabc",
            resp(&["SELECT", "0"]),
            resp(&["ZADD", "smarthost:{index}", "1", "id1"]),
            resp(&["DEL", "x"]),
        );
        let cs = commands(text.as_bytes());
        assert_eq!(cs.len(), 3, "the torn DEL is not read: {cs:?}");
        assert_eq!(cs[0].at, None);
        assert_eq!(cs[1].at, Some(1_700_000_000));
        assert_eq!(cs[2].args, vec![b"DEL".to_vec(), b"x".to_vec()]);
    }

    #[test]
    fn a_trace_follows_a_message_and_the_reports_kept_with_it_across_files() {
        let dir = tempfile::tempdir().unwrap();
        let aof = dir.path();
        fs::write(aof.join("appendonly.aof.1.base.rdb"), b"REDIS0011\xfa...").unwrap();
        fs::write(
            aof.join("appendonly.aof.1.incr.aof"),
            format!(
                "#TS:100\r\n{}{}{}",
                resp(&["ZADD", "smarthost:{index}", "5", "aaaa1111"]),
                resp(&["SET", "smarthost:{m:bbbb2222}:record", "other"]),
                resp(&[
                    "SET",
                    "smarthost:{m:aaaa1111}:report:cccc3333dddd4444",
                    "report",
                ]),
            ),
        )
        .unwrap();
        fs::write(
            aof.join("appendonly.aof.2.incr.aof"),
            format!(
                "#TS:200\r\n{}{}",
                resp(&["ZREM", "smarthost:{index}", "cccc3333dddd4444"]),
                resp(&["DEL", "smarthost:{m:aaaa1111}:record"]),
            ),
        )
        .unwrap();
        let trace = trace(
            &[("7001".to_string(), aof.to_path_buf())],
            &["aaaa1111".to_string()],
        );
        let lines: Vec<&str> = trace.lines().collect();
        assert_eq!(
            lines,
            vec![
                "100 7001 ZADD smarthost:{index} 5 aaaa1111",
                "100 7001 SET smarthost:{m:aaaa1111}:report:cccc3333dddd4444 report",
                "200 7001 ZREM smarthost:{index} cccc3333dddd4444",
                "200 7001 DEL smarthost:{m:aaaa1111}:record",
            ]
        );
    }

    /// The files a real server writes, across a restart, read back.
    #[test]
    fn a_real_servers_history_is_traced_with_times_across_a_restart() {
        use smarthost_testkit::redis::{command, RedisServer, HISTORY_ARGS};
        let mut redis = RedisServer::start_with(&HISTORY_ARGS);
        let port = redis.port();
        let set = ["SET", "smarthost:{m:aaaa1111}:record", "r1"];
        assert_eq!(command(port, &set).as_deref(), Some("+OK"));
        let zadd = ["ZADD", "smarthost:{index}", "5", "aaaa1111"];
        assert_eq!(command(port, &zadd).as_deref(), Some(":1"));
        command(port, &["SET", "unrelated", "x"]);
        redis.restart();
        let del = ["DEL", "smarthost:{m:aaaa1111}:record"];
        assert_eq!(command(port, &del).as_deref(), Some(":1"));
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let trace = trace(
            &[("one".to_string(), redis.append_only_dir())],
            &["aaaa1111".to_string()],
        );
        let lines: Vec<(u64, &str)> = trace
            .lines()
            .map(|l| {
                let (at, rest) = l.split_once(' ').unwrap();
                (at.parse().expect("every command dated"), rest)
            })
            .collect();
        let commands: Vec<&str> = lines.iter().map(|(_, c)| *c).collect();
        assert_eq!(
            commands,
            vec![
                "one SET smarthost:{m:aaaa1111}:record r1",
                "one ZADD smarthost:{index} 5 aaaa1111",
                "one DEL smarthost:{m:aaaa1111}:record",
            ],
            "{trace}"
        );
        assert!(
            lines.iter().all(|(at, _)| at.abs_diff(before) < 60),
            "{trace}"
        );
    }
}
