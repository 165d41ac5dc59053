//! Starts the actors of a node and runs until shutdown.

use crate::config::Config;

pub fn run(config: Config) -> Result<(), Box<dyn std::error::Error>> {
    let _ = config;
    Err("the SMTP listener is not wired yet".into())
}
