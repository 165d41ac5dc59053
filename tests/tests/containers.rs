//! The image as a cluster runs it, started through testcontainers on
//! Docker: a Redis container and, from the built smarthost image, one
//! coordinator and two nodes, all on a Docker network that the test
//! creates (testcontainers removes it with its last container). Mail goes
//! in over the nodes' SMTP ports, published on 127.0.0.1 alone, to a local
//! domain whose drop directory is a host directory mounted into both
//! nodes; the drop directory and the pods' `/metrics` tell what happened.
//!
//! The image is `smarthost-test/smarthost:local` (or
//! `SMARTHOST_TEST_IMAGE`): `scripts/test.sh` builds it with
//! `scripts/kube-test.sh` and hands it to Docker with
//! `scripts/docker-smarthost.sh`; the Redis image comes from
//! `scripts/docker-redis.sh`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use smarthost_testkit::container::{image_from_env, publish_on_loopback};
use smarthost_tests::http;
use smarthost_tests::relay::free_port;
use smarthost_tests::scenario::{message, submit_to};
use testcontainers::core::{Mount, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage, ImageExt};

const SMTP_PORT: u16 = 2525;
const ADMIN_PORT: u16 = 8025;
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// The configuration of every smarthost container: the shared queue on
/// the Redis container, `drop.test` delivered into `/drop`.
fn config(redis: &str) -> String {
    format!(
        "[node]\nhostname = \"relay.test\"\n\n\
         [smtp]\nlisten = [\"0.0.0.0:{SMTP_PORT}\"]\ngreeting_delay = \"0s\"\n\n\
         [queue]\nbackend = \"redis\"\nredis_url = \"redis://{redis}:6379\"\n\
         retry_intervals = [\"1s\"]\n\n\
         [admin]\nlisten = \"0.0.0.0:{ADMIN_PORT}\"\n\n\
         [log]\nformat = \"json\"\n\n\
         [[domains]]\nname = \"drop.test\"\nkind = \"local\"\ndrop_dir = \"/drop\"\n"
    )
}

struct Smarthost {
    container: ContainerAsync<GenericImage>,
    smtp: SocketAddr,
    admin: SocketAddr,
}

/// `smarthost COMMAND` from the image, as node `id`, on `network`.
async fn smarthost(command: &str, id: &str, network: &str, config: &str, drop: &Path) -> Smarthost {
    let (name, tag) = image_from_env("SMARTHOST_TEST_IMAGE", "smarthost-test/smarthost:local");
    let ready = if command == "coordinator" {
        "coordinator running"
    } else {
        "smarthost ready"
    };
    let (smtp, admin) = (free_port(), free_port());
    let request = GenericImage::new(name.clone(), tag.clone())
        .with_wait_for(WaitFor::message_on_stderr(ready))
        .with_cmd([command, "--config", "/etc/smarthost/test.toml"])
        .with_env_var("SMARTHOST__NODE__ID", id)
        .with_copy_to("/etc/smarthost/test.toml", config.as_bytes().to_vec())
        .with_mount(Mount::bind_mount(drop.display().to_string(), "/drop"))
        .with_network(network)
        .with_startup_timeout(START_TIMEOUT);
    let request = publish_on_loopback(request, &[(SMTP_PORT, smtp), (ADMIN_PORT, admin)]);
    let container = request.start().await.unwrap_or_else(|e| {
        panic!(
            "cannot start smarthost {command} from {name}:{tag}: {e}\n\
             (these tests need a running Docker engine and that image: \
             run scripts/docker-redis.sh, scripts/kube-test.sh, scripts/docker-smarthost.sh)"
        )
    });
    Smarthost {
        container,
        smtp: format!("127.0.0.1:{smtp}").parse().unwrap(),
        admin: format!("127.0.0.1:{admin}").parse().unwrap(),
    }
}

async fn redis(network: &str, name: &str) -> ContainerAsync<GenericImage> {
    let (image, tag) = image_from_env(
        "SMARTHOST_TEST_REDIS_IMAGE",
        smarthost_testkit::container::DEFAULT_IMAGE,
    );
    GenericImage::new(image.clone(), tag.clone())
        .with_wait_for(WaitFor::message_on_stdout("Ready to accept connections"))
        .with_cmd([
            "redis-server",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--protected-mode",
            "no",
        ])
        .with_network(network)
        .with_container_name(name)
        .with_startup_timeout(START_TIMEOUT)
        .start()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "cannot start Redis from {image}:{tag}: {e}\n\
                 (run scripts/docker-redis.sh: it starts the engine and builds the image)"
            )
        })
}

async fn scrape(admin: SocketAddr) -> BTreeMap<String, f64> {
    tokio::task::spawn_blocking(move || {
        let page = http::get(admin, "/metrics", None);
        assert_eq!(page.status, 200, "{page:?}");
        page.samples()
    })
    .await
    .unwrap()
}

async fn logs(container: &ContainerAsync<GenericImage>) -> String {
    let err = container.stderr_to_vec().await.unwrap_or_default();
    String::from_utf8_lossy(&err).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_and_two_nodes_from_the_image_share_a_redis_container() {
    let suffix = format!("{:08x}", rand_suffix());
    let network = format!("smarthost-test-{suffix}");
    let redis_name = format!("smarthost-test-redis-{suffix}");
    // The nodes run as user 10001 and write into the host's directory.
    let drop = tempfile::tempdir().unwrap();
    std::fs::set_permissions(drop.path(), std::fs::Permissions::from_mode(0o777)).unwrap();

    let _redis = redis(&network, &redis_name).await;
    let config = config(&redis_name);
    let coordinator = smarthost("coordinator", "coord", &network, &config, drop.path()).await;
    let nodes = [
        smarthost("node", "node-a", &network, &config, drop.path()).await,
        smarthost("node", "node-b", &network, &config, drop.path()).await,
    ];

    // Twenty messages, alternating between the nodes.
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.smtp).collect();
    let subjects: Vec<String> = tokio::task::spawn_blocking(move || {
        (0..20)
            .map(|n| {
                let subject = format!("container {n}");
                let to = format!("user{n}@drop.test");
                submit_to(
                    addrs[n % 2],
                    "app@sender.test",
                    &[&to],
                    &message(&to, &subject, "Through the image.\r\n"),
                );
                subject
            })
            .collect()
    })
    .await
    .unwrap();

    // Every message lands in the drop directory, once.
    let deadline = Instant::now() + Duration::from_secs(60);
    let arrived = loop {
        let arrived = drop_subjects(drop.path());
        if arrived.len() >= subjects.len() {
            break arrived;
        }
        if Instant::now() > deadline {
            let mut log = String::new();
            for node in &nodes {
                log.push_str(&logs(&node.container).await);
            }
            panic!(
                "{} of {} arrived within 60 s: {arrived:?}\n{log}",
                arrived.len(),
                subjects.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut wanted = subjects.clone();
    wanted.sort();
    assert_eq!(arrived, wanted, "each message once in the drop directory");

    // The coordinator leads and shows the shared queue, empty; the nodes
    // count what they took and delivered.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let samples = scrape(coordinator.admin).await;
        if samples.get("smarthost_coordinator_leader") == Some(&1.0)
            && samples.get("smarthost_queue_messages") == Some(&0.0)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the coordinator never led an empty queue: {samples:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (mut received, mut delivered) = (0.0, 0.0);
    for node in &nodes {
        let samples = scrape(node.admin).await;
        assert_eq!(samples.get("smarthost_coordinator_leader"), Some(&0.0));
        let took = samples["smarthost_messages_received_total"];
        assert_eq!(took, 10.0, "each node took half");
        received += took;
        delivered += samples["smarthost_recipient_outcomes_total{outcome=\"delivered\"}"];
    }
    assert_eq!(received, 20.0);
    assert_eq!(delivered, 20.0);
}

/// The `Subject:` of every message in the drop directory's `new/`, sorted.
fn drop_subjects(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir.join("new")) else {
        return Vec::new();
    };
    let mut subjects: Vec<String> = entries
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .filter_map(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("Subject: ").map(str::to_string))
        })
        .collect();
    subjects.sort();
    subjects
}

/// A suffix that keeps the names of this run's network and containers
/// apart from another run's.
fn rand_suffix() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    nanos ^ std::process::id()
}
