//! A `redis-server` in a Docker container, started through testcontainers:
//! the back end of [`crate::redis::RedisServer`] when
//! `SMARTHOST_TEST_REDIS=container`.
//!
//! The image (`smarthost-test/redis:7.0` unless
//! `SMARTHOST_TEST_REDIS_IMAGE` names another) is made from Debian
//! packages by `scripts/docker-redis.sh`, which also starts the engine; no
//! registry is asked for it. The container's port 6379 is published on
//! 127.0.0.1 alone, at a host port chosen once, so that a stopped and
//! started container answers where it did before. The container sits on a
//! Docker network of its own that testcontainers creates (and removes with
//! the last container on it): a replica joins its primary's network and
//! replicates over it, and nothing else shares it. Its data directory
//! lives in the container and survives a stop and a start, as the process
//! server's data directory does.
//!
//! The test helpers are synchronous and are called from inside the tests'
//! own tokio runtimes, where no runtime may be blocked on; so every
//! container operation runs on a thread of its own, on a runtime that
//! only this module uses and that lives as long as the test binary.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::OnceLock;
use std::time::Duration;

use testcontainers::bollard::models::PortBinding;
use testcontainers::core::ContainerRequest;
use testcontainers::core::{IntoContainerPort, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage, ImageExt};

/// The image the tests use unless `SMARTHOST_TEST_REDIS_IMAGE` says
/// otherwise.
pub const DEFAULT_IMAGE: &str = "smarthost-test/redis:7.0";

/// The port Redis listens on inside the container.
const REDIS_PORT: u16 = 6379;

/// How long creating and starting a container may take, AOF replay
/// included.
const CONTAINER_START_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `future` to its end on this module's runtime, from a thread of its
/// own: the caller may be inside a runtime (a `#[tokio::test]`) where
/// blocking on another one would panic.
fn block<F>(future: F) -> F::Output
where
    F: Future + Send,
    F::Output: Send,
{
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    let runtime = RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("testkit-docker")
            .enable_all()
            .build()
            .expect("a runtime for the Docker client")
    });
    std::thread::scope(|scope| {
        scope
            .spawn(|| runtime.block_on(future))
            .join()
            .expect("the Docker client thread panicked")
    })
}

/// The image that the environment variable `variable` names, else
/// `default`, as (name, tag); no tag is `latest`.
pub fn image_from_env(variable: &str, default: &str) -> (String, String) {
    let image = std::env::var(variable).unwrap_or(default.into());
    match image.rsplit_once(':') {
        Some((name, tag)) if !name.is_empty() && !tag.contains('/') => (name.into(), tag.into()),
        _ => (image, "latest".into()),
    }
}

/// Publishes each `(container port, host port)` of `request` on 127.0.0.1
/// alone: testcontainers would publish on every address.
pub fn publish_on_loopback(
    request: ContainerRequest<GenericImage>,
    ports: &[(u16, u16)],
) -> ContainerRequest<GenericImage> {
    let bindings: HashMap<String, Option<Vec<PortBinding>>> = ports
        .iter()
        .map(|&(inside, host)| {
            let binding = PortBinding {
                host_ip: Some("127.0.0.1".into()),
                host_port: Some(host.to_string()),
            };
            (format!("{inside}/tcp"), Some(vec![binding]))
        })
        .collect();
    ports
        .iter()
        .fold(request, |r, &(inside, host)| {
            r.with_mapped_port(host, inside.tcp())
        })
        .with_host_config_modifier(move |config| config.port_bindings = Some(bindings.clone()))
}

/// One `redis-server` container; removed (with its data) when dropped.
pub(crate) struct RedisContainer {
    container: Option<ContainerAsync<GenericImage>>,
}

impl RedisContainer {
    /// Starts `redis-server` with `args` in a new container whose port
    /// 6379 is published at `127.0.0.1:host_port`; returns once it logged
    /// "Ready to accept connections"; on the Docker network `network`,
    /// created if it does not exist. Panics with what to run when the
    /// engine or the image is missing.
    pub(crate) fn start(host_port: u16, args: &[String], network: &str) -> RedisContainer {
        let (name, tag) = image_from_env("SMARTHOST_TEST_REDIS_IMAGE", DEFAULT_IMAGE);
        let mut cmd = vec!["redis-server".to_string()];
        cmd.extend(args.iter().cloned());
        let request = GenericImage::new(name.clone(), tag.clone())
            .with_wait_for(WaitFor::message_on_stdout("Ready to accept connections"))
            .with_cmd(cmd)
            .with_network(network)
            .with_startup_timeout(CONTAINER_START_TIMEOUT);
        let request = publish_on_loopback(request, &[(REDIS_PORT, host_port)]);
        let container = block(request.start()).unwrap_or_else(|e| {
            panic!(
                "cannot start a Redis container from {name}:{tag} on 127.0.0.1:{host_port}: {e}\n\
                 (SMARTHOST_TEST_REDIS=container needs a running Docker engine and that image: \
                 run scripts/docker-redis.sh)"
            )
        });
        RedisContainer {
            container: Some(container),
        }
    }

    fn container(&self) -> &ContainerAsync<GenericImage> {
        self.container
            .as_ref()
            .expect("a container not yet removed")
    }

    /// Kills `redis-server` at once (`docker stop` with no grace period,
    /// so SIGKILL): what it had not written to its AOF is lost. The
    /// container and its data stay for [`RedisContainer::start_again`].
    pub(crate) fn kill(&self) {
        let container = self.container();
        // A paused container cannot be stopped.
        let _ = block(container.unpause());
        block(container.stop_with_timeout(Some(0)))
            .unwrap_or_else(|e| panic!("docker stop {}: {e}", container.id()));
    }

    /// Starts the stopped container again: same data, same published
    /// port. The caller waits for `PING`.
    pub(crate) fn start_again(&self) {
        let container = self.container();
        block(container.start()).unwrap_or_else(|e| panic!("docker start {}: {e}", container.id()));
    }

    /// Freezes every process of the container (`docker pause`): its
    /// connections stay open and nothing is answered.
    pub(crate) fn pause(&self) {
        let container = self.container();
        block(container.pause()).unwrap_or_else(|e| panic!("docker pause {}: {e}", container.id()));
    }

    pub(crate) fn resume(&self) {
        let container = self.container();
        block(container.unpause())
            .unwrap_or_else(|e| panic!("docker unpause {}: {e}", container.id()));
    }

    /// The container's address on its network, where other containers on
    /// it (a replica) reach it at port 6379.
    pub(crate) fn bridge_address(&self) -> (IpAddr, u16) {
        let container = self.container();
        let ip = block(container.get_bridge_ip_address())
            .unwrap_or_else(|e| panic!("the bridge address of {}: {e}", container.id()));
        (ip, REDIS_PORT)
    }

    /// What `redis-server` wrote to stdout and stderr, for failure
    /// messages.
    pub(crate) fn log(&self) -> String {
        let container = self.container();
        let (out, err) = block(async {
            (
                container.stdout_to_vec().await.unwrap_or_default(),
                container.stderr_to_vec().await.unwrap_or_default(),
            )
        });
        format!(
            "{}{}",
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(&err)
        )
    }
}

impl Drop for RedisContainer {
    fn drop(&mut self) {
        if let Some(container) = self.container.take() {
            // `rm` forces the removal of a running container and marks it
            // removed, so that its own drop has nothing left to do.
            let id = container.id().to_string();
            if let Err(e) = block(container.rm()) {
                eprintln!("cannot remove the Redis container {id}: {e}");
            }
        }
    }
}
