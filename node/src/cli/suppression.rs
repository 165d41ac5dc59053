//! `smarthost suppression …`: the suppression list of a running node,
//! through its admin API.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};

use super::{config_failed, json_or, print_result};
use crate::admin_client::{AdminClient, ClientError, SuppressionPage};
use crate::config::Config;

#[derive(Debug, Args)]
pub struct SuppressionArgs {
    /// The bearer token of an operator in [[admin.operators]].
    #[arg(long, env = "SMARTHOST_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// The list of this application key or SMTP user (default: the
    /// global list, which holds for all mail).
    #[arg(long, global = true)]
    account: Option<String>,
    #[command(subcommand)]
    action: SuppressionAction,
}

#[derive(Debug, Subcommand)]
enum SuppressionAction {
    /// The suppressed addresses, in address order.
    List {
        /// Start after this address (the `next` a page printed).
        #[arg(long)]
        after: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// The answer of the admin API, as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Suppress addresses.
    Add {
        #[arg(value_name = "ADDRESS", required = true)]
        addresses: Vec<String>,
        /// Why (shown in the listing).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Suppress the addresses of a file: one per line, or the first column
    /// of a CSV file; `-` reads standard input.
    Import {
        #[arg(value_name = "FILE")]
        file: PathBuf,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Take an address off the list.
    Remove {
        #[arg(value_name = "ADDRESS")]
        address: String,
    },
}

pub fn suppression(path: Option<&Path>, args: SuppressionArgs) -> ExitCode {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => return config_failed(path, &e),
    };
    let client = AdminClient::new(config.admin.listen, args.token.filter(|t| !t.is_empty()));
    let account = args.account.filter(|a| !a.is_empty());
    let text = match &args.action {
        SuppressionAction::Import { file, .. } => {
            let read = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())
            } else {
                std::fs::read_to_string(file)
            };
            match read {
                Ok(text) => text,
                Err(e) => {
                    eprintln!("error: {}: {e}", file.display());
                    return ExitCode::from(2);
                }
            }
        }
        _ => String::new(),
    };
    let result = actix::System::new().block_on(async move {
        let account = account.as_deref();
        Ok::<_, ClientError>(match args.action {
            SuppressionAction::List { after, limit, json } => {
                let page = client
                    .suppressions(account, after.as_deref(), limit)
                    .await?;
                json_or(json, &page, format_page)
            }
            SuppressionAction::Add { addresses, reason } => {
                let added = client
                    .suppress(account, reason.as_deref(), addresses.join("\n"))
                    .await?;
                format_added(&added)
            }
            SuppressionAction::Import { reason, .. } => {
                let added = client.suppress(account, reason.as_deref(), text).await?;
                format_added(&added)
            }
            SuppressionAction::Remove { address } => {
                let removed = client.unsuppress(account, &address).await?;
                format!("{} taken off the list\n", removed.address)
            }
        })
    });
    print_result(result)
}

fn format_page(page: &SuppressionPage) -> String {
    let mut out = String::new();
    for entry in &page.entries {
        let source = serde_json::to_value(entry.source)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        out.push_str(&format!(
            "{}\t{}\t{}\t{}\n",
            entry.address,
            source,
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(entry.at_ms)
            ),
            entry.reason
        ));
    }
    if page.entries.is_empty() {
        out.push_str("no suppressed addresses\n");
    }
    if let Some(next) = &page.next_cursor {
        out.push_str(&format!("more: --after {next}\n"));
    }
    out
}

fn format_added(added: &crate::admin_client::SuppressionsAdded) -> String {
    let mut out = format!("{} suppressed ({} new)\n", added.listed, added.added);
    for refused in &added.invalid {
        out.push_str(&format!(
            "not an address: {} ({})\n",
            refused.address, refused.error
        ));
    }
    out
}
