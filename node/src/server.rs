//! Starts the actors of a node and runs them until SIGTERM or Ctrl-C.
//!
//! Shutdown: the listener closes its sockets, idle sessions get `421` at
//! once, sessions inside a transaction may finish it within the grace
//! period; every message already answered with `250` is in the spool.

use std::error::Error;
use std::sync::Arc;

use actix::prelude::*;
use smarthost_proto::session::SessionConfig;
use tokio::sync::oneshot;

use crate::auth::UserDb;
use crate::config::{check_domain_name, Config, DomainKind};
use crate::listener::{ConnectionLimits, Listener, OpenSessions, StopAccepting, WaitDrained};
use crate::queue::{Queue, Recover};
use crate::session::SessionEnv;
use crate::spool::{LocalSpool, LocalSpoolOptions, Spool};
use crate::tls;

pub fn run(config: Config) -> Result<(), Box<dyn Error>> {
    actix::System::new().block_on(serve(config))
}

async fn serve(config: Config) -> Result<(), Box<dyn Error>> {
    let path = config.queue.path.clone();
    let spool =
        tokio::task::spawn_blocking(move || LocalSpool::open(&path, LocalSpoolOptions::default()))
            .await??;
    let spool: Arc<dyn Spool> = Arc::new(spool);
    let queue = Queue::new(spool).start();
    let recovered = queue.send(Recover).await??;
    tracing::info!(
        messages = recovered.len(),
        path = %config.queue.path.display(),
        "spool opened"
    );

    let listener = Listener::bind(
        &config.smtp.listen,
        ConnectionLimits::new(
            config.smtp.max_connections,
            config.smtp.max_connections_per_ip,
        ),
        Arc::new(session_env(&config, queue.recipient())?),
    )
    .await?
    .start();
    tracing::info!(hostname = %config.node.hostname, "smarthost ready");

    wait_for_signal().await;
    listener.send(StopAccepting).await?;
    let (drained, is_drained) = oneshot::channel();
    listener.send(WaitDrained(drained)).await?;
    if tokio::time::timeout(config.node.shutdown_grace, is_drained)
        .await
        .is_err()
    {
        let open = listener.send(OpenSessions).await.unwrap_or(0);
        tracing::warn!(
            open_sessions = open,
            "grace period over, closing open sessions"
        );
    }
    tracing::info!("stopped");
    Ok(())
}

fn session_env(
    config: &Config,
    queue: Recipient<crate::queue::Enqueue>,
) -> Result<SessionEnv, Box<dyn Error>> {
    let smtp = &config.smtp;
    let tls = smtp.tls.as_ref().map(tls::acceptor).transpose()?;
    let local_domains = config
        .domains
        .iter()
        .filter(|d| d.kind == DomainKind::Local)
        // Validated at load; the routing form is lower case with A-labels.
        .map(|d| check_domain_name(&d.name).unwrap_or_else(|_| d.name.to_ascii_lowercase()))
        .collect();
    let session = SessionConfig {
        hostname: config.node.hostname.clone(),
        max_message_size: smtp.max_message_size,
        max_session_size: smtp.max_session_size,
        max_recipients: smtp.max_recipients,
        max_hop_count: smtp.max_hop_count,
        require_tls: smtp.require_tls,
        tls_available: tls.is_some(),
        auth_available: !smtp.users.is_empty(),
        allow_plaintext_auth: smtp.allow_plaintext_auth,
        local_domains,
    };
    Ok(SessionEnv {
        config: Arc::new(session),
        relay_networks: smtp.relay_networks.clone(),
        tls,
        users: Arc::new(UserDb::new(&smtp.users)),
        auth_failure_delay: smtp.auth_failure_delay,
        idle_timeout: smtp.connection_timeout,
        queue,
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = tokio::signal::ctrl_c() => tracing::info!("interrupt received"),
            }
        }
        Err(error) => {
            tracing::warn!(%error, "cannot watch SIGTERM; Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
