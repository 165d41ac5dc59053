//! The `smarthost` command line.
//!
//! Exit codes: 0 on success, 1 when the server stops with an error or an
//! admin API call fails, 2 for a configuration that does not load or
//! validate (and for usage errors).

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::admin::{BadmailList, ClusterView};
use crate::admin_client::{AdminClient, ClientError, Filter};
use crate::config::{Config, ConfigError};
use crate::queue::{Deleted, MessageView, QueueStats};
use crate::server::Role;
use crate::sessions::SessionView;
use crate::spool::Quarantined;

mod send;
mod suppression;

#[derive(Debug, Parser)]
#[command(name = "smarthost", version, about = "An SMTP relay for applications")]
struct Cli {
    /// Configuration file (TOML). SMARTHOST__SECTION__KEY environment
    /// variables override its values.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a node: listener, queue and delivery in one process (with a
    /// coordinator on the Redis backend). Without --config it starts with
    /// safe defaults on 127.0.0.1:2525.
    Run,
    /// Run the data plane only: on the Redis backend it heartbeats to the
    /// cluster but leaves leading to the coordinators.
    Node,
    /// Run the control plane only: cluster membership and the leader lease
    /// (queue.backend = "redis").
    Coordinator,
    /// Load and validate a configuration file, then report every problem.
    CheckConfig {
        /// The file to check (or give it with --config).
        #[arg(value_name = "FILE")]
        file: Option<PathBuf>,
    },
    /// Look at and steer the queue of a running node through its admin API
    /// (at admin.listen of the configuration).
    Queue {
        /// The bearer token of an operator in [[admin.operators]].
        #[arg(long, env = "SMARTHOST_TOKEN", hide_env_values = true, global = true)]
        token: Option<String>,
        #[command(subcommand)]
        action: QueueAction,
    },
    /// What a running node could neither deliver nor bounce (bad pickup
    /// files, failed reports from <>), through its admin API: list, queue
    /// again, delete.
    Badmail {
        /// The bearer token of an operator in [[admin.operators]].
        #[arg(long, env = "SMARTHOST_TOKEN", hide_env_values = true, global = true)]
        token: Option<String>,
        #[command(subcommand)]
        action: BadmailAction,
    },
    /// The live SMTP sessions of a running node (through its admin API):
    /// client, HELO, user, TLS, how long connected, messages accepted.
    Sessions {
        /// The bearer token of an operator in [[admin.operators]].
        #[arg(long, env = "SMARTHOST_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// The answer of the admin API, as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Send one message to a running node over SMTP: the body from a file
    /// or standard input, with attachments. Prints the queue id.
    Send(send::SendArgs),
    /// The suppression list of a running node (through its admin API):
    /// addresses mail is no longer sent to, globally or per application
    /// key or SMTP user.
    Suppression(suppression::SuppressionArgs),
    /// Print the argon2id hash of a password or token, for [[smtp.users]]
    /// and [[admin.operators]].
    HashPassword {
        /// The password. Prefer --stdin: arguments end up in shell history.
        #[arg(value_name = "SECRET", required_unless_present = "stdin")]
        secret: Option<String>,
        /// Read the password from the first line of standard input.
        #[arg(long, conflicts_with = "secret")]
        stdin: bool,
    },
}

/// What a retry or a delete works on: one message, every message with a
/// delivery to a domain, or every message of a sender.
#[derive(Debug, clap::Args)]
struct Target {
    /// The queue id (`queued as …` in the reply to the message).
    #[arg(
        value_name = "ID",
        required_unless_present_any = ["domain", "sender"],
        conflicts_with_all = ["domain", "sender"]
    )]
    id: Option<String>,
    /// Every message with a delivery to this domain, a page at a time,
    /// with progress on stderr.
    #[arg(long, value_name = "DOMAIN", conflicts_with = "sender")]
    domain: Option<String>,
    /// Every message of this sender (`<>` for bounces), a page at a time,
    /// with progress on stderr.
    #[arg(long, value_name = "ADDRESS")]
    sender: Option<String>,
    /// Messages per page with --domain or --sender.
    #[arg(long, value_name = "N", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(1..=1000))]
    batch: u64,
    /// The answer of the admin API, as JSON (with --domain or --sender:
    /// each page's, one per line).
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum QueueAction {
    /// Counts of messages and deliveries, by state and by domain.
    Summary {
        /// The answer of the admin API, as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The queued messages, oldest first: each with its sender and where
    /// each recipient stands. Fetched a page at a time.
    List {
        /// Only messages with a delivery pending in this domain.
        #[arg(long, value_name = "DOMAIN")]
        domain: Option<String>,
        /// Only messages of this sender (`<>` for bounces).
        #[arg(long, value_name = "ADDRESS")]
        sender: Option<String>,
        /// Only messages with a delivery (in --domain, if given) in this
        /// state.
        #[arg(long, value_parser = crate::queue::LISTED_STATES)]
        state: Option<String>,
        /// List at most this many messages (default: all).
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
        /// One JSON object per message and line (the admin API's message
        /// view), instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// One queued message: its envelope, and where each recipient stands.
    Show {
        /// The queue id (`queued as …` in the reply to the message).
        #[arg(value_name = "ID")]
        id: String,
        /// The answer of the admin API, as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The nodes of the cluster (Redis backend): which are alive, which are
    /// dead, and which leads.
    Nodes {
        /// The answer of the admin API, as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Try a message's deferred deliveries now instead of at their next
    /// retry time; or, with --domain, every deferred delivery to a domain.
    Retry {
        #[command(flatten)]
        target: Target,
    },
    /// Delete a message from the queue; or, with --domain, every
    /// recipient at a domain (a message's other domains stay queued). The
    /// senders get non-delivery reports for the recipients deleted, unless
    /// --silent.
    Delete {
        #[command(flatten)]
        target: Target,
        /// No report to the sender.
        #[arg(long)]
        silent: bool,
    },
    /// Hold the deliveries of a domain (they stay queued and still expire).
    Suspend {
        #[arg(value_name = "DOMAIN")]
        domain: String,
        /// The answer of the admin API, as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Release the deliveries of a suspended domain.
    Resume {
        #[arg(value_name = "DOMAIN")]
        domain: String,
        /// The answer of the admin API, as JSON.
        #[arg(long)]
        json: bool,
    },
    /// What the spool set aside as unreadable (a record of a newer
    /// release, a damaged journal frame), oldest first.
    #[command(args_conflicts_with_subcommands = true)]
    Quarantine {
        #[command(subcommand)]
        action: Option<QuarantineAction>,
        /// List at most this many.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        /// The answer of the admin API, as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// What to do with one quarantined entry (without one: list them).
#[derive(Debug, Subcommand)]
enum QuarantineAction {
    /// Take a quarantined message back into the queue, once this release
    /// reads it (a record written by a newer release, after the upgrade).
    Replay {
        /// The entry as `smarthost queue quarantine` lists it.
        #[arg(value_name = "LOCATION")]
        location: String,
    },
    /// Drop a quarantined entry for good: the message in it is lost.
    Delete {
        #[arg(value_name = "LOCATION")]
        location: String,
    },
}

#[derive(Debug, Subcommand)]
enum BadmailAction {
    /// The entries, oldest first: when, source, size, name and reason.
    List {
        /// List at most this many.
        #[arg(long, default_value_t = 100,
              value_parser = clap::value_parser!(u64).range(1..=crate::admin::MAX_PAGE as u64))]
        limit: u64,
        /// The answer of the admin API, as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Queue an entry again (a pickup file is read again as one), and drop
    /// it once queued.
    Replay {
        /// The entry as `smarthost badmail list` shows it.
        #[arg(value_name = "NAME")]
        name: String,
    },
    /// Drop an entry for good.
    Delete {
        #[arg(value_name = "NAME")]
        name: String,
    },
}

/// The entry point of the `smarthost` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run => run(cli.config.as_deref(), Role::All),
        Command::Node => run(cli.config.as_deref(), Role::Node),
        Command::Coordinator => run(cli.config.as_deref(), Role::Coordinator),
        Command::CheckConfig { file } => match (file, cli.config) {
            (Some(file), Some(config)) if file != config => {
                eprintln!(
                    "error: two files given ({} and {}); check one at a time",
                    file.display(),
                    config.display()
                );
                ExitCode::from(2)
            }
            (file, config) => check_config(file.or(config).as_deref()),
        },
        Command::Queue { token, action } => queue(cli.config.as_deref(), token, action),
        Command::Badmail { token, action } => badmail(cli.config.as_deref(), token, action),
        Command::Sessions { token, json } => sessions(cli.config.as_deref(), token, json),
        Command::Send(args) => send::send(cli.config.as_deref(), args),
        Command::Suppression(args) => suppression::suppression(cli.config.as_deref(), args),
        Command::HashPassword { secret, stdin } => hash_password(secret, stdin),
    }
}

fn sessions(path: Option<&Path>, token: Option<String>, json: bool) -> ExitCode {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => return config_failed(path, &e),
    };
    let client = AdminClient::new(config.admin.listen, token.filter(|t| !t.is_empty()));
    let result = actix::System::new().block_on(async move {
        let views = client.sessions().await?;
        let now = crate::now_ms();
        Ok::<_, ClientError>(json_or(json, &views, |v: &Vec<_>| format_sessions(v, now)))
    });
    print_result(result)
}

fn badmail(path: Option<&Path>, token: Option<String>, action: BadmailAction) -> ExitCode {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => return config_failed(path, &e),
    };
    let client_of = move || AdminClient::new(config.admin.listen, token.filter(|t| !t.is_empty()));
    if let BadmailAction::Replay { name } | BadmailAction::Delete { name } = &action {
        if !crate::badmail::valid_name(name) {
            eprintln!("error: {name:?} is not an entry `smarthost badmail list` shows");
            return ExitCode::from(2);
        }
    }
    let result = actix::System::new().block_on(async move {
        let client = client_of();
        Ok::<_, ClientError>(match action {
            BadmailAction::List { limit, json } => {
                let listed = client.badmail(limit as usize).await?;
                json_or(json, &listed, format_badmail)
            }
            BadmailAction::Replay { name } => {
                let replayed = client.replay_badmail(&name).await?;
                format!("{name}: queued again as {}\n", replayed.id)
            }
            BadmailAction::Delete { name } => {
                client.delete_badmail(&name).await?;
                format!("{name}: deleted\n")
            }
        })
    });
    print_result(result)
}

fn queue(path: Option<&Path>, token: Option<String>, action: QueueAction) -> ExitCode {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => return config_failed(path, &e),
    };
    let listen = config.admin.listen;
    let token = token.filter(|t| !t.is_empty());
    let (domain, suspended, json) = match action {
        QueueAction::Summary { json } => {
            let result = actix::System::new().block_on(async move {
                let stats = AdminClient::new(listen, token).queue_stats().await?;
                Ok::<_, ClientError>(json_or(json, &stats, format_summary))
            });
            return print_result(result);
        }
        QueueAction::List {
            domain,
            sender,
            state,
            limit,
            json,
        } => {
            let domain = match domain.as_deref().map(routing_form) {
                None => None,
                Some(Some(domain)) => Some(domain),
                Some(None) => return ExitCode::from(2),
            };
            let result = actix::System::new().block_on(async move {
                let client = AdminClient::new(listen, token);
                let mut left = limit.unwrap_or(usize::MAX);
                let mut cursor: Option<String> = None;
                let mut shown = 0;
                let stdout = std::io::stdout();
                while left > 0 {
                    let size = left.min(crate::admin::MAX_PAGE);
                    let filter = Filter {
                        domain: domain.as_deref(),
                        sender: sender.as_deref(),
                    };
                    let page = client
                        .messages(&filter, state.as_deref(), cursor.as_deref(), size)
                        .await?;
                    // Printed page by page: a long queue is never held whole.
                    let mut out = stdout.lock();
                    for view in &page.messages {
                        let text = if json {
                            serde_json::to_string(view).expect("plain data") + "\n"
                        } else {
                            format_listed(view, shown == 0)
                        };
                        let _ = out.write_all(text.as_bytes());
                        shown += 1;
                    }
                    left = left.saturating_sub(page.messages.len());
                    match page.next_cursor {
                        Some(next) => cursor = Some(next),
                        None => break,
                    }
                }
                Ok::<_, ClientError>(if json || shown > 0 {
                    String::new()
                } else {
                    "no messages\n".to_string()
                })
            });
            return print_result(result);
        }
        QueueAction::Show { id, json } => {
            let result = actix::System::new().block_on(async move {
                let view = AdminClient::new(listen, token).message(&id).await?;
                Ok::<_, ClientError>(json_or(json, &view, format_message))
            });
            return print_result(result);
        }
        QueueAction::Retry {
            target:
                Target {
                    id: None,
                    domain,
                    sender,
                    batch,
                    json,
                },
        } => {
            let Some((label, domain)) = bulk_target(domain, sender.as_deref()) else {
                return ExitCode::from(2);
            };
            let result = actix::System::new().block_on(async move {
                let client = AdminClient::new(listen, token);
                let filter = Filter {
                    domain: domain.as_deref(),
                    sender: sender.as_deref(),
                };
                let (mut examined, mut deliveries) = (0, 0);
                let mut cursor: Option<String> = None;
                loop {
                    let page = client
                        .retry_many(&filter, cursor.as_deref(), batch as usize)
                        .await?;
                    json_line(json, &page);
                    examined += page.examined;
                    deliveries += page.deliveries;
                    eprintln!(
                        "{label}: {examined} messages looked at, {deliveries} deferred deliveries due now"
                    );
                    match page.next_cursor {
                        Some(next) => cursor = Some(next),
                        None => break,
                    }
                }
                if json {
                    return Ok(String::new());
                }
                let of = if filter.domain.is_some() {
                    "for the domain"
                } else {
                    "from the sender"
                };
                Ok::<_, ClientError>(format!(
                    "{label}: {} due now, of {} queued {of}\n",
                    plural(deliveries, "deferred delivery", "deferred deliveries"),
                    plural(examined, "message", "messages"),
                ))
            });
            return print_result(result);
        }
        QueueAction::Delete {
            target:
                Target {
                    id: None,
                    domain,
                    sender,
                    batch,
                    json,
                },
            silent,
        } => {
            let Some((label, domain)) = bulk_target(domain, sender.as_deref()) else {
                return ExitCode::from(2);
            };
            let result = actix::System::new().block_on(async move {
                let client = AdminClient::new(listen, token);
                let filter = Filter {
                    domain: domain.as_deref(),
                    sender: sender.as_deref(),
                };
                let (mut examined, mut recipients, mut in_flight) = (0, 0, 0);
                let mut cursor: Option<String> = None;
                loop {
                    let page = client
                        .delete_many(&filter, !silent, cursor.as_deref(), batch as usize)
                        .await?;
                    json_line(json, &page);
                    examined += page.examined;
                    recipients += page.recipients;
                    in_flight += page.in_flight;
                    eprintln!(
                        "{label}: {examined} messages looked at, {recipients} recipients deleted"
                    );
                    match page.next_cursor {
                        Some(next) => cursor = Some(next),
                        None => break,
                    }
                }
                if json {
                    return Ok(String::new());
                }
                let mut out = format!(
                    "{label}: {} deleted from {}{}",
                    plural(recipients, "recipient", "recipients"),
                    plural(examined, "message", "messages"),
                    if silent {
                        ", silently"
                    } else {
                        ", the senders get reports"
                    }
                );
                if in_flight > 0 {
                    out.push_str(&format!(
                        "; {in_flight} under way, left to finish (delivery attempts in flight)"
                    ));
                }
                out.push('\n');
                Ok::<_, ClientError>(out)
            });
            return print_result(result);
        }
        QueueAction::Retry {
            target: Target {
                id: Some(id), json, ..
            },
        } => {
            let result = actix::System::new().block_on(async move {
                let retried = AdminClient::new(listen, token).retry(&id).await?;
                Ok::<_, ClientError>(json_or(json, &retried, |retried| {
                    match retried.deliveries {
                        0 => format!(
                            "{}: nothing deferred to retry (its deliveries are due, in flight or suspended)\n",
                            retried.id
                        ),
                        1 => format!("{}: 1 deferred delivery is due now\n", retried.id),
                        n => format!("{}: {n} deferred deliveries are due now\n", retried.id),
                    }
                }))
            });
            return print_result(result);
        }
        QueueAction::Delete {
            target: Target {
                id: Some(id), json, ..
            },
            silent,
        } => {
            let result = actix::System::new().block_on(async move {
                let deleted = AdminClient::new(listen, token).delete(&id, !silent).await?;
                Ok::<_, ClientError>(json_or(json, &deleted, format_deleted))
            });
            return print_result(result);
        }
        QueueAction::Nodes { json } => {
            let result = actix::System::new().block_on(async move {
                let view = AdminClient::new(listen, token).cluster().await?;
                Ok::<_, ClientError>(json_or(json, &view, format_nodes))
            });
            return print_result(result);
        }
        QueueAction::Quarantine {
            action: Some(mut action),
            ..
        } => {
            let (QuarantineAction::Replay { location } | QuarantineAction::Delete { location }) =
                &mut action;
            // The local spool lists its files under `quarantine/`.
            if let Some(name) = location.strip_prefix("quarantine/") {
                *location = name.to_string();
            }
            if location.is_empty()
                || !location
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.')
            {
                eprintln!("error: {location:?} is not an entry `smarthost queue quarantine` lists");
                return ExitCode::from(2);
            }
            let result = actix::System::new().block_on(async move {
                let client = AdminClient::new(listen, token);
                Ok::<_, ClientError>(match action {
                    QuarantineAction::Replay { location } => {
                        let replayed = client.replay_quarantined(&location).await?;
                        format!(
                            "{location}: message {} is queued again ({})\n",
                            replayed.id,
                            plural(replayed.deliveries, "delivery", "deliveries")
                        )
                    }
                    QuarantineAction::Delete { location } => {
                        client.delete_quarantined(&location).await?;
                        format!("{location}: deleted\n")
                    }
                })
            });
            return print_result(result);
        }
        QueueAction::Quarantine {
            action: None,
            limit,
            json,
        } => {
            let result = actix::System::new().block_on(async move {
                let listed = AdminClient::new(listen, token).quarantined(limit).await?;
                Ok::<_, ClientError>(json_or(json, &listed, |l: &Vec<_>| format_quarantine(l)))
            });
            return print_result(result);
        }
        QueueAction::Suspend { domain, json } => (domain, true, json),
        QueueAction::Resume { domain, json } => (domain, false, json),
    };
    let Some(domain) = routing_form(&domain) else {
        return ExitCode::from(2);
    };
    let result = actix::System::new().block_on(async move {
        let state = AdminClient::new(listen, token)
            .set_suspended(&domain, suspended)
            .await?;
        Ok(json_or(json, &state, |state| {
            let verb = if state.suspended {
                "suspended: its deliveries are held"
            } else {
                "resumed: its deliveries go out again"
            };
            format!("{} {verb}\n", state.domain)
        }))
    });
    print_result(result)
}

fn print_result(result: Result<String, ClientError>) -> ExitCode {
    match result {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(path: Option<&Path>, role: Role) -> ExitCode {
    crate::malloc::tune_at_start();
    let config = match Config::load_validated(path) {
        Ok(config) => config,
        Err(e) => return config_failed(path, &e),
    };
    crate::telemetry::init(&config.log);
    // Fails only when a provider is already installed, which is as good.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    match crate::server::run(config, role) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One line per node, in id order: live or dead, and which leads.
fn format_nodes(view: &ClusterView) -> String {
    let mut nodes: Vec<(&String, &str)> = view
        .live
        .iter()
        .map(|id| (id, "alive"))
        .chain(view.dead.iter().map(|id| (id, "dead")))
        .collect();
    nodes.sort();
    let width = nodes.iter().map(|(id, _)| id.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (id, state) in nodes {
        let leads = if view.leader.as_ref() == Some(id) {
            "  leader"
        } else {
            ""
        };
        out.push_str(&format!("{id:<width$}  {state}{leads}\n"));
    }
    if view.leader.is_none() {
        out.push_str("no coordinator leads: retries are not promoted\n");
    }
    if let Some(error) = &view.last_error {
        out.push_str(&format!(
            "as seen by {}, whose last Redis error was: {error}\n",
            view.node
        ));
    }
    out
}

/// What was set aside, one line each: when (UTC), size, where, why.
fn format_quarantine(listed: &[Quarantined]) -> String {
    if listed.is_empty() {
        return "quarantine: empty\n".to_string();
    }
    let width = listed.iter().map(|q| q.location.len()).max().unwrap_or(0);
    let mut out = String::new();
    for q in listed {
        let at = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(q.at_ms),
        );
        out.push_str(&format!(
            "{at}  {:>9} B  {:<width$}  {}\n",
            q.bytes, q.location, q.reason
        ));
    }
    out
}

/// One line per entry: when (UTC), source, size, name, reason; and how
/// many are not shown.
fn format_badmail(listed: &BadmailList) -> String {
    if listed.entries.is_empty() {
        return "badmail: empty\n".to_string();
    }
    let width = listed
        .entries
        .iter()
        .map(|e| e.name.len())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for entry in &listed.entries {
        let at = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(entry.at_ms),
        );
        out.push_str(&format!(
            "{at}  {:<6}  {:>9} B  {:<width$}  {}\n",
            entry.source.name(),
            entry.bytes,
            entry.name,
            entry.reason
        ));
    }
    if listed.total > listed.entries.len() {
        out.push_str(&format!(
            "… and {} more (--limit)\n",
            listed.total - listed.entries.len()
        ));
    }
    out
}

/// With `json`, prints one page of a bulk operation's answers as a line
/// of JSON at once (a long run shows its progress).
fn json_line<T: serde::Serialize>(json: bool, page: &T) {
    if json {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}", serde_json::to_string(page).expect("plain data"));
        let _ = out.flush();
    }
}

/// `value` as the API gave it (pretty JSON) with `json`, else `table` of it.
fn json_or<T: serde::Serialize>(json: bool, value: &T, table: impl FnOnce(&T) -> String) -> String {
    if json {
        serde_json::to_string_pretty(value).expect("plain data") + "\n"
    } else {
        table(value)
    }
}

/// The live sessions as a table, one line each.
fn format_sessions(views: &[SessionView], now_ms: u64) -> String {
    if views.is_empty() {
        return "no SMTP sessions\n".to_string();
    }
    let rows: Vec<[String; 7]> = views
        .iter()
        .map(|v| {
            let connected =
                std::time::Duration::from_secs(now_ms.saturating_sub(v.connected_ms) / 1000);
            [
                v.node.clone(),
                v.client.clone(),
                v.helo.clone().unwrap_or_else(|| "-".into()),
                v.user.clone().unwrap_or_else(|| "-".into()),
                if v.tls { "yes" } else { "no" }.into(),
                humantime::format_duration(connected).to_string(),
                v.messages.to_string(),
            ]
        })
        .collect();
    let head = [
        "NODE",
        "CLIENT",
        "HELO",
        "USER",
        "TLS",
        "CONNECTED",
        "MESSAGES",
    ];
    let mut widths = head.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; 7]| {
        let mut out = String::new();
        for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$}  "));
            }
        }
        out.push('\n');
        out
    };
    let mut out = line(head);
    for row in &rows {
        out.push_str(&line(row.each_ref().map(String::as_str)));
    }
    out
}

/// `domain` in its routing form, or `None` after saying what is wrong.
fn routing_form(domain: &str) -> Option<String> {
    match crate::config::check_domain_name(domain) {
        Ok(domain) => Some(domain),
        Err(why) => {
            eprintln!("error: {why}");
            None
        }
    }
}

/// What a bulk retry or delete works on: its name for the progress lines,
/// and the domain in its routing form (`None`: by sender). `None` after
/// an error message when the domain is not one.
fn bulk_target(domain: Option<String>, sender: Option<&str>) -> Option<(String, Option<String>)> {
    match (domain, sender) {
        (Some(domain), _) => {
            let domain = routing_form(&domain)?;
            Some((domain.clone(), Some(domain)))
        }
        (None, Some(sender)) => Some((sender.to_string(), None)),
        // Clap asks for an id, a domain or a sender.
        (None, None) => None,
    }
}

/// `n` and the noun that goes with it.
fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// What a delete did, in a sentence.
fn format_deleted(deleted: &Deleted) -> String {
    let mut out = format!(
        "{}: {} recipient{} deleted{}",
        deleted.id,
        deleted.recipients,
        if deleted.recipients == 1 { "" } else { "s" },
        if deleted.notified {
            ", the sender gets a report"
        } else {
            ", silently"
        }
    );
    if deleted.in_flight > 0 {
        out.push_str(&format!(
            "; {} under way, left to finish (delivery attempts in flight)",
            deleted.in_flight
        ));
    }
    out.push('\n');
    out
}

/// A message as a header block and a table of its recipients.
fn format_message(view: &MessageView) -> String {
    let time = |ms: u64| {
        humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms),
        )
        .to_string()
    };
    let sender = if view.sender.is_empty() {
        "<>"
    } else {
        &view.sender
    };
    let mut out = format!(
        "message   {}\nreceived  {}\nsize      {} B\nsender    {sender}\nclient    {} ({}{}{})\n",
        view.id,
        time(view.received_ms),
        view.size,
        view.client.ip,
        view.client.helo,
        view.client
            .user
            .as_ref()
            .map_or(String::new(), |u| format!(", user {u}")),
        if view.client.tls { ", TLS" } else { "" },
    );
    if let Some(envid) = &view.envid {
        out.push_str(&format!("envid     {envid}\n"));
    }
    out.push('\n');
    let width = view
        .recipients
        .iter()
        .map(|r| r.address.len())
        .max()
        .unwrap_or(0)
        .max("RECIPIENT".len());
    out.push_str(&format!(
        "{:<width$}  {:<9}  {:>8}  {:<20}  LAST REPLY\n",
        "RECIPIENT", "STATE", "ATTEMPTS", "NEXT ATTEMPT"
    ));
    for r in &view.recipients {
        out.push_str(&format!(
            "{:<width$}  {:<9}  {:>8}  {:<20}  {}\n",
            r.address,
            r.state,
            r.attempts,
            r.next_attempt_ms.map_or("-".to_string(), time),
            r.last_reply.as_deref().unwrap_or("-"),
        ));
    }
    out
}

/// One message of `queue list`, as `mailq` shows it: a line with its id,
/// arrival, size and sender, then one indented line per recipient with
/// its state and last reply. `first`: a header line goes before it.
fn format_listed(view: &MessageView, first: bool) -> String {
    let arrival = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(view.received_ms),
    );
    let sender = if view.sender.is_empty() {
        "<>"
    } else {
        &view.sender
    };
    let mut out = String::new();
    if first {
        out.push_str(&format!(
            "{:<28}  {:<20}  {:>10}  SENDER / RECIPIENTS\n",
            "ID", "ARRIVAL", "SIZE"
        ));
    }
    out.push_str(&format!(
        "{:<28}  {arrival:<20}  {:>10}  {sender}\n",
        view.id, view.size
    ));
    for r in &view.recipients {
        out.push_str(&format!("    {}  {}", r.address, r.state));
        if let Some(reply) = &r.last_reply {
            out.push_str(&format!("  ({reply})"));
        }
        out.push('\n');
    }
    out
}

/// The queue counts as an aligned table, domains in name order.
fn format_summary(stats: &QueueStats) -> String {
    let mut rows = vec![
        ("messages".to_string(), stats.messages),
        ("ready".to_string(), stats.ready),
        ("deferred".to_string(), stats.deferred),
        ("in flight".to_string(), stats.in_flight),
        ("waiting".to_string(), stats.waiting),
        ("store calls".to_string(), stats.store_calls as usize),
        ("pending reports".to_string(), stats.pending_reports),
    ];
    let head = rows.len();
    rows.extend(
        stats
            .deliveries_by_domain
            .iter()
            .map(|(domain, count)| (format!("  {domain}"), *count)),
    );
    let width = rows.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (i, (name, count)) in rows.iter().enumerate() {
        if i == head {
            out.push_str("deliveries by domain\n");
        }
        out.push_str(&format!("{name:<width$}  {count}\n"));
    }
    if stats.deliveries_by_domain.is_empty() {
        out.push_str("deliveries by domain: none\n");
    }
    keyed_block(
        &mut out,
        "oldest waiting, by domain",
        &stats.oldest_age_by_domain,
        |age| humantime::format_duration(std::time::Duration::from_secs(*age)).to_string(),
    );
    keyed_block(
        &mut out,
        "in flight, by node",
        &stats.in_flight_by_node,
        usize::to_string,
    );
    let suspended: Vec<&str> = stats.suspended.iter().map(String::as_str).collect();
    match suspended.as_slice() {
        [] => out.push_str("suspended domains: none\n"),
        names => out.push_str(&format!("suspended domains: {}\n", names.join(", "))),
    }
    out
}

/// `title`, then one aligned line per entry; nothing when there is none.
fn keyed_block<V>(
    out: &mut String,
    title: &str,
    entries: &std::collections::BTreeMap<String, V>,
    show: impl Fn(&V) -> String,
) {
    if entries.is_empty() {
        return;
    }
    out.push_str(title);
    out.push('\n');
    let width = entries.keys().map(String::len).max().unwrap_or(0);
    for (key, value) in entries {
        out.push_str(&format!("  {key:<width$}  {}\n", show(value)));
    }
}

fn check_config(path: Option<&Path>) -> ExitCode {
    match Config::load_validated(path) {
        Ok(_) => {
            println!("configuration OK: {}", describe(path));
            ExitCode::SUCCESS
        }
        Err(e) => config_failed(path, &e),
    }
}

/// Prints every configuration problem, one per line, and returns exit code 2.
fn config_failed(path: Option<&Path>, err: &ConfigError) -> ExitCode {
    let messages = err.messages();
    let mut stderr = std::io::stderr().lock();
    for message in &messages {
        let _ = writeln!(stderr, "error: {message}");
    }
    let _ = writeln!(
        stderr,
        "configuration not usable: {} ({} problem{})",
        describe(path),
        messages.len(),
        if messages.len() == 1 { "" } else { "s" }
    );
    ExitCode::from(2)
}

fn describe(path: Option<&Path>) -> String {
    match path {
        Some(path) => path.display().to_string(),
        None => "defaults and environment".to_string(),
    }
}

fn hash_password(secret: Option<String>, stdin: bool) -> ExitCode {
    let secret = if stdin {
        let mut line = String::new();
        if let Err(e) = std::io::stdin().lock().read_line(&mut line) {
            eprintln!("error: cannot read the password from standard input: {e}");
            return ExitCode::from(2);
        }
        line.trim_end_matches(['\r', '\n']).to_string()
    } else {
        secret.unwrap_or_default()
    };
    if secret.is_empty() {
        eprintln!("error: the password is empty");
        return ExitCode::from(2);
    }
    println!("{}", crate::auth::hash_password(&secret));
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn config_is_accepted_on_every_command() {
        for args in [
            &["smarthost", "run", "--config", "a.toml"][..],
            &["smarthost", "--config", "a.toml", "run"],
            &["smarthost", "check-config", "--config", "a.toml"],
            &["smarthost", "hash-password", "--config", "a.toml", "x"],
            &["smarthost", "queue", "summary", "--config", "a.toml"],
            &[
                "smarthost",
                "queue",
                "--config",
                "a.toml",
                "suspend",
                "a.example",
            ],
        ] {
            let cli = Cli::try_parse_from(args).unwrap();
            assert_eq!(cli.config.as_deref(), Some(Path::new("a.toml")), "{args:?}");
        }
    }

    #[test]
    fn hash_password_needs_a_secret_or_stdin() {
        assert!(Cli::try_parse_from(["smarthost", "hash-password"]).is_err());
        assert!(Cli::try_parse_from(["smarthost", "hash-password", "--stdin"]).is_ok());
        assert!(Cli::try_parse_from(["smarthost", "hash-password", "--stdin", "x"]).is_err());
    }

    #[test]
    fn queue_commands_take_a_domain_and_a_token() {
        let cli =
            Cli::try_parse_from(["smarthost", "queue", "resume", "a.example", "--token", "t"])
                .unwrap();
        match cli.command {
            Command::Queue {
                token,
                action: QueueAction::Resume { domain, .. },
            } => assert_eq!(
                (token.as_deref(), domain.as_str()),
                (Some("t"), "a.example")
            ),
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["smarthost", "queue", "suspend"]).is_err());
        assert!(Cli::try_parse_from(["smarthost", "queue"]).is_err());
    }

    #[test]
    fn a_message_is_shown_as_a_header_and_a_recipient_table() {
        let view: MessageView = serde_json::from_value(serde_json::json!({
            "id": "0192f3a1b2c3d4e5f60718293a4b",
            "received_ms": 1_795_888_842_000u64,
            "size": 2048,
            "sender": "",
            "envid": null,
            "client": {"ip": "10.0.0.5", "helo": "app.example", "user": "app", "tls": true},
            "recipients": [
                {"address": "a@now.example", "domain": "now.example", "state": "done",
                 "attempts": 0, "next_attempt_ms": null, "last_reply": null},
                {"address": "b@later.example", "domain": "later.example", "state": "deferred",
                 "attempts": 2, "next_attempt_ms": 1_795_889_742_000u64,
                 "last_reply": "451 4.3.0 try again later"}
            ]
        }))
        .unwrap();
        assert_eq!(
            format_message(&view),
            "message   0192f3a1b2c3d4e5f60718293a4b\n\
             received  2026-11-28T18:00:42Z\n\
             size      2048 B\n\
             sender    <>\n\
             client    10.0.0.5 (app.example, user app, TLS)\n\
             \n\
             RECIPIENT        STATE      ATTEMPTS  NEXT ATTEMPT          LAST REPLY\n\
             a@now.example    done              0  -                     -\n\
             b@later.example  deferred          2  2026-11-28T18:15:42Z  451 4.3.0 try again later\n"
        );
    }

    #[test]
    fn a_listed_message_is_a_line_and_its_recipients_under_it() {
        let view: MessageView = serde_json::from_value(serde_json::json!({
            "id": "0192f3a1b2c3d4e5f60718293a4b",
            "received_ms": 1_795_888_842_000u64,
            "size": 2048,
            "sender": "app@sender.example",
            "envid": null,
            "client": {"ip": "10.0.0.5", "helo": "app.example", "user": null, "tls": false},
            "recipients": [
                {"address": "a@now.example", "domain": "now.example", "state": "queued",
                 "attempts": 0, "next_attempt_ms": 1_795_888_842_000u64, "last_reply": null},
                {"address": "b@later.example", "domain": "later.example", "state": "deferred",
                 "attempts": 2, "next_attempt_ms": 1_795_889_742_000u64,
                 "last_reply": "451 4.3.0 try again later"}
            ]
        }))
        .unwrap();
        assert_eq!(
            format_listed(&view, true),
            "ID                            ARRIVAL                     SIZE  SENDER / RECIPIENTS\n\
             0192f3a1b2c3d4e5f60718293a4b  2026-11-28T18:00:42Z        2048  app@sender.example\n    \
             a@now.example  queued\n    \
             b@later.example  deferred  (451 4.3.0 try again later)\n"
        );
        assert!(format_listed(&view, false).starts_with("0192f3a1b2c3d4e5f60718293a4b  "));
    }

    #[test]
    fn sessions_are_a_table_with_a_line_each() {
        let session =
            |client: &str, helo: Option<&str>, user: Option<&str>, messages| SessionView {
                node: "node-a".into(),
                client: client.into(),
                server: "127.0.0.1:2525".into(),
                helo: helo.map(str::to_string),
                user: user.map(str::to_string),
                tls: user.is_some(),
                connected_ms: 1_000_000,
                messages,
            };
        let views = [
            session("10.0.0.5:40000", Some("app.example"), Some("app"), 3),
            session("[2001:db8::1]:40001", None, None, 0),
        ];
        assert_eq!(
            format_sessions(&views, 1_000_000 + 125_000),
            "NODE    CLIENT               HELO         USER  TLS  CONNECTED  MESSAGES\n\
             node-a  10.0.0.5:40000       app.example  app   yes  2m 5s      3\n\
             node-a  [2001:db8::1]:40001  -            -     no   2m 5s      0\n"
        );
        assert_eq!(format_sessions(&[], 0), "no SMTP sessions\n");
    }

    #[test]
    fn the_nodes_are_listed_with_the_leader() {
        let view = ClusterView {
            node: "node-a".into(),
            leader: Some("coord".into()),
            live: vec!["node-a".into(), "coord".into()],
            dead: vec!["node-b".into()],
            last_error: None,
        };
        assert_eq!(
            format_nodes(&view),
            "coord   alive  leader\nnode-a  alive\nnode-b  dead\n"
        );
        let view = ClusterView {
            leader: None,
            last_error: Some("redis unavailable: timed out".into()),
            ..view
        };
        assert_eq!(
            format_nodes(&view),
            "coord   alive\nnode-a  alive\nnode-b  dead\n\
             no coordinator leads: retries are not promoted\n\
             as seen by node-a, whose last Redis error was: redis unavailable: timed out\n"
        );
    }

    #[test]
    fn the_summary_lists_counts_and_domains() {
        let stats = QueueStats {
            messages: 3,
            deliveries_by_domain: [("held.test".to_string(), 3)].into_iter().collect(),
            oldest_age_by_domain: [("held.test".to_string(), 7500)].into_iter().collect(),
            deferred: 3,
            in_flight: 3,
            in_flight_by_node: [("node-a".to_string(), 1), ("smarthost-1".to_string(), 2)]
                .into_iter()
                .collect(),
            suspended: ["held.test".to_string(), "idle.test".to_string()]
                .into_iter()
                .collect(),
            ..QueueStats::default()
        };
        let text = format_summary(&stats);
        assert!(text.starts_with("messages         3\n"), "{text}");
        assert!(text.contains("deferred         3\n"), "{text}");
        assert!(text.contains("pending reports  0\n"), "{text}");
        assert!(
            text.contains("deliveries by domain\n  held.test      3\n"),
            "{text}"
        );
        assert!(
            text.contains("oldest waiting, by domain\n  held.test  2h 5m\n"),
            "{text}"
        );
        assert!(
            text.contains("in flight, by node\n  node-a       1\n  smarthost-1  2\n"),
            "{text}"
        );
        assert!(
            text.ends_with("suspended domains: held.test, idle.test\n"),
            "{text}"
        );
        let none = format_summary(&QueueStats::default());
        assert!(none.ends_with("suspended domains: none\n"), "{none}");
    }
}
