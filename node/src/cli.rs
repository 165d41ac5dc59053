//! The `smarthost` command line.
//!
//! Exit codes: 0 on success, 1 when the server stops with an error, 2 for a
//! configuration that does not load or validate (and for usage errors).

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{Config, ConfigError};

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
    /// Run a node: listener, queue and delivery in one process. Without
    /// --config it starts with safe defaults on 127.0.0.1:2525.
    Run,
    /// Load and validate a configuration file, then report every problem.
    CheckConfig {
        /// The file to check (or give it with --config).
        #[arg(value_name = "FILE")]
        file: Option<PathBuf>,
    },
    /// Print the argon2id hash of a password, for [[smtp.users]].
    HashPassword {
        /// The password. Prefer --stdin: arguments end up in shell history.
        #[arg(value_name = "SECRET", required_unless_present = "stdin")]
        secret: Option<String>,
        /// Read the password from the first line of standard input.
        #[arg(long, conflicts_with = "secret")]
        stdin: bool,
    },
}

/// The entry point of the `smarthost` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run => run(cli.config.as_deref()),
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
        Command::HashPassword { secret, stdin } => hash_password(secret, stdin),
    }
}

fn run(path: Option<&Path>) -> ExitCode {
    let config = match Config::load_validated(path) {
        Ok(config) => config,
        Err(e) => return config_failed(path, &e),
    };
    crate::telemetry::init(&config.log);
    // Fails only when a provider is already installed, which is as good.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    match crate::server::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
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
}
