//! The dashboard in a real browser: headless Chromium (Debian's
//! `chromium`, driven by WebDriver through Debian's `chromedriver`) loads
//! the page the admin server ships, signs in with an operator token, sees
//! the queue, suspends and resumes a domain and finds messages; a viewer
//! gets no buttons. A screenshot is kept in `target/artifacts/`.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use smarthost_tests::http;
use smarthost_tests::relay::{free_port, Relay};
use smarthost_tests::smtp::{queued_id, Client as Smtp};

const WAIT: Duration = Duration::from_secs(20);

/// `chromedriver` on a free loopback port, killed when dropped.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    fn start() -> Driver {
        let port = free_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "chromedriver (Debian package chromium-driver) is required by the dashboard test; \
                 scripts/test.sh installs it",
            );
        let deadline = Instant::now() + WAIT;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "chromedriver never listened on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Driver { child, port }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn token_hash(token: &str) -> String {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let salt = SaltString::encode_b64(b"dashboard-salt!!").unwrap();
    argon2::Argon2::default()
        .hash_password(token.as_bytes(), &salt)
        .unwrap()
        .to_string()
}

/// The words of a rendered text (table cells come tab-separated).
fn words(text: &str) -> Vec<&str> {
    text.split_whitespace().collect()
}

/// Waits until the text of the element `css` satisfies `want`.
async fn text_of(browser: &Client, css: &str, want: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    let mut last = String::new();
    loop {
        if let Ok(element) = browser.find(Locator::Css(css)).await {
            if let Ok(text) = element.text().await {
                if want(&text) {
                    return text;
                }
                last = text;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{css} never as wanted; last text: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How many elements match `css`, once it is `want`.
async fn count_of(browser: &Client, css: &str, want: usize) {
    let deadline = Instant::now() + WAIT;
    loop {
        let n = browser
            .find_all(Locator::Css(css))
            .await
            .map_or(0, |found| found.len());
        if n == want {
            return;
        }
        assert!(Instant::now() < deadline, "{css}: {n} elements, not {want}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn sign_in(browser: &Client, token: &str) {
    let field = browser.find(Locator::Id("token")).await.unwrap();
    field.send_keys(token).await.unwrap();
    browser
        .find(Locator::Id("signin"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

async fn click(browser: &Client, css: &str) {
    browser
        .wait()
        .at_most(WAIT)
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .click()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_signs_in_shows_the_queue_and_acts_as_the_role_allows() {
    let dead = free_port();
    let relay = Relay::start_with_env(
        "",
        &format!(
            "[[domains]]\nname = \"held.test\"\nsmart_host = \"[127.0.0.1]:{dead}\"\n\n\
             [[admin.operators]]\nname = \"ops\"\ntoken_hash = \"{}\"\nrole = \"operator\"\n\n\
             [[admin.operators]]\nname = \"noc\"\ntoken_hash = \"{}\"\nrole = \"viewer\"\n",
            token_hash("operator-secret-token"),
            token_hash("viewer-secret-token"),
        ),
        &[("SMARTHOST__QUEUE__RETRY_INTERVALS", "1h")],
    );
    let admin = relay.admin_addr();
    let mut ids = Vec::new();
    for n in 0..3 {
        let (mut c, _) = Smtp::connect(relay.smtp);
        c.expect("EHLO app.example", 250);
        let reply = c.send_message(
            "alice@app.test",
            &[&format!("user{n}@held.test")],
            &format!("Subject: held {n}\r\n\r\nHello.\r\n"),
        );
        ids.push(queued_id(&reply));
        c.expect("QUIT", 221);
    }
    // Every attempt failed: deferred for an hour.
    let deadline = Instant::now() + WAIT;
    while http::get(admin, "/api/v1/queue", Some("viewer-secret-token")).json()["deferred"] != 3 {
        assert!(Instant::now() < deadline, "never deferred");
        std::thread::sleep(Duration::from_millis(100));
    }

    let driver = Driver::start();
    // A profile of the test's own, removed with it.
    let profile = tempfile::tempdir().unwrap();
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1280,1100",
                     format!("--user-data-dir={}", profile.path().display())]
        }),
    );
    let browser = ClientBuilder::rustls()
        .unwrap()
        .capabilities(capabilities)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("a Chromium session through chromedriver");
    browser.goto(&format!("http://{admin}/")).await.unwrap();

    // A wrong token is refused and nothing is shown.
    sign_in(&browser, "wrong-token").await;
    text_of(&browser, "#message", |t| t.starts_with("Not signed in")).await;
    assert!(!browser
        .find(Locator::Id("panels"))
        .await
        .unwrap()
        .is_displayed()
        .await
        .unwrap());

    // The operator sees the queue: three messages for held.test.
    sign_in(&browser, "operator-secret-token").await;
    text_of(&browser, "#whoami", |t| t == "ops (operator)").await;
    text_of(&browser, "tr[data-domain='held.test']", |t| {
        words(t).starts_with(&["held.test", "3"]) && t.contains("active")
    })
    .await;

    // Suspend, then resume, held.test from its row.
    click(
        &browser,
        "tr[data-domain='held.test'] button[data-action='suspend']",
    )
    .await;
    text_of(&browser, "tr[data-domain='held.test']", |t| {
        t.contains("suspended")
    })
    .await;
    let stats = http::get(admin, "/api/v1/queue", Some("viewer-secret-token")).json();
    assert_eq!(stats["suspended"], serde_json::json!(["held.test"]));
    click(
        &browser,
        "tr[data-domain='held.test'] button[data-action='resume']",
    )
    .await;
    text_of(&browser, "tr[data-domain='held.test']", |t| {
        t.contains("active")
    })
    .await;
    let stats = http::get(admin, "/api/v1/queue", Some("viewer-secret-token")).json();
    assert_eq!(stats["suspended"], serde_json::json!([]));

    // Find a message by its id, then all of the sender's.
    let search = browser.find(Locator::Id("search")).await.unwrap();
    search.send_keys(&ids[1]).await.unwrap();
    click(&browser, "#search-go").await;
    text_of(
        &browser,
        &format!("#results tr[data-id='{}']", ids[1]),
        |t| t.contains("alice@app.test") && t.contains("user1@held.test"),
    )
    .await;
    search.clear().await.unwrap();
    search.send_keys("alice@app.test").await.unwrap();
    click(&browser, "#search-go").await;
    count_of(&browser, "#results tr[data-id]", 3).await;
    count_of(&browser, "#results button[data-action='retry']", 3).await;

    let shot = browser.screenshot().await.unwrap();
    // Beside the build: <target>/debug/deps/<test> → <target>/artifacts.
    let exe = std::env::current_exe().unwrap();
    let target = exe.ancestors().nth(3).expect("the target directory");
    let dir = target.join("artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("dashboard.png"), &shot).unwrap();
    assert!(shot.starts_with(b"\x89PNG"), "a PNG screenshot");

    // A viewer sees the same queue without a button to press.
    click(&browser, "#signout").await;
    sign_in(&browser, "viewer-secret-token").await;
    text_of(&browser, "#whoami", |t| t == "noc (viewer)").await;
    text_of(&browser, "tr[data-domain='held.test']", |t| {
        words(t).starts_with(&["held.test", "3"])
    })
    .await;
    count_of(&browser, "#domains button", 0).await;

    browser.close().await.unwrap();
}
