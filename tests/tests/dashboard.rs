//! End to end: the compliance dashboard in headless Chromium (Debian's chromium and
//! chromium-driver, driven over WebDriver with fantoccini) against a coordinator with three
//! agents, a finished federated round and a rollout in three waves. The test logs in (after
//! a refused wrong password), finds the nodes, the waves and the loss plot, verifies an
//! audit entry's inclusion proof in the page, and saves screenshots. Outside the browser, a
//! node certificate without a session and a wrong password both get 401.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use fantoccini::{Client, Locator};
use nanofleet_e2e::federation::{fleet_with, run_federation, schedule};
use nanofleet_e2e::fleet::{create_rollout, publish, wait_state};
use nanofleet_e2e::{free_port, ok, path, tiny_gguf, wait_until, Coordinator};
use serde_json::json;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const USER: &str = "auditor";
const PASSWORD: &str = "correct horse battery staple";

/// Where screenshots go: `<target dir>/dashboard-screenshots/`.
fn screenshot_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let target = exe
        .ancestors()
        .nth(3)
        .expect("target directory above the test binary");
    let dir = target.join("dashboard-screenshots");
    std::fs::create_dir_all(&dir).expect("screenshot directory");
    dir
}

/// base64(SHA-256(SubjectPublicKeyInfo)) of the coordinator's server certificate: what
/// Chromium's `--ignore-certificate-errors-spki-list` pins. The browser then trusts this
/// one key (the fleet CA is private and not in Chromium's store), and nothing else.
fn server_spki_pin(coordinator: &Coordinator) -> String {
    use base64::Engine;
    use rustls_pki_types::pem::PemObject;
    use sha2::Digest;
    let pem = std::fs::read(coordinator.dir.join("server.crt")).expect("server certificate");
    let leaf = rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
        .next()
        .expect("a certificate")
        .expect("PEM parses");
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).expect("X.509 parses");
    let spki = cert.tbs_certificate.subject_pki.raw;
    base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(spki))
}

/// chromedriver as a child process, killed on drop.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    fn start(log: &Path) -> Self {
        for tool in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                Path::new(tool).exists(),
                "{tool} is missing: install Debian's chromium and chromium-driver \
                 (tests/run.sh does: apt-get install chromium chromium-driver)"
            );
        }
        let port = free_port();
        let file = std::fs::File::create(log).expect("driver log");
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::from(file.try_clone().expect("log handle")))
            .stderr(Stdio::from(file))
            .spawn()
            .expect("chromedriver starts");
        let up = wait_until(Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        assert!(up, "chromedriver did not listen; see {}", log.display());
        Self { child, port }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn browser(driver: &Driver, profile: &Path, spki_pin: &str) -> Client {
    let capabilities = json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": CHROMIUM,
            "args": [
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--window-size=1400,1100",
                format!("--user-data-dir={}", profile.display()),
                format!("--ignore-certificate-errors-spki-list={spki_pin}"),
            ],
        },
    });
    let serde_json::Value::Object(capabilities) = capabilities else {
        unreachable!("capabilities are an object")
    };
    fantoccini::ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(capabilities)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("a WebDriver session with headless Chromium")
}

async fn screenshot(client: &Client, name: &str) {
    let png = client.screenshot().await.expect("screenshot");
    let file = screenshot_dir().join(name);
    std::fs::write(&file, png).expect("writes the screenshot");
    eprintln!("screenshot: {}", file.display());
}

/// Waits until `script` (a JavaScript expression) is truthy in the page; panics with
/// `what` and the page's text otherwise.
async fn wait_js(client: &Client, what: &str, script: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let value = client
            .execute(&format!("return Boolean({script});"), vec![])
            .await
            .expect("script runs");
        if value == json!(true) {
            return;
        }
        if std::time::Instant::now() > deadline {
            let text = client
                .execute("return document.body.innerText;", vec![])
                .await
                .unwrap_or_default();
            panic!("{what}: never became true. The page says:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn text_of(client: &Client, css: &str) -> String {
    client
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .text()
        .await
        .expect("element text")
}

async fn log_in(client: &Client, password: &str) {
    let user = client.find(Locator::Css("#login-user")).await.unwrap();
    user.clear().await.unwrap();
    user.send_keys(USER).await.unwrap();
    let field = client.find(Locator::Css("#login-password")).await.unwrap();
    field.clear().await.unwrap();
    field.send_keys(password).await.unwrap();
    client
        .find(Locator::Css("#login-submit"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

async fn open_tab(client: &Client, view: &str) {
    client
        .find(Locator::Css(&format!("nav .tab[data-view={view}]")))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

/// One HTTP/1.1 request over TLS that trusts the fleet CA and offers `identity` (a client
/// certificate) if the server asks; returns (status, headers and body as text).
async fn https(
    coordinator: &Coordinator,
    port: u16,
    identity: Option<(Vec<u8>, Vec<u8>)>,
    request: &str,
) -> (u16, String) {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(coordinator.ca_cert()).unwrap();
    for cert in CertificateDer::pem_slice_iter(&ca) {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let mut config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(&cert)
                    .collect::<Result<_, _>>()
                    .unwrap(),
                PrivateKeyDer::from_pem_slice(&key).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .expect("TLS with the coordinator's server certificate");
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    // The server may close without close_notify; what arrived is the answer.
    let _ = tls.read_to_end(&mut response).await;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    (status, text)
}

fn get(path: &str, cookie: Option<&str>) -> String {
    let cookie = cookie.map_or(String::new(), |c| format!("Cookie: {c}\r\n"));
    format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{cookie}Connection: close\r\n\r\n")
}

fn login_request(password: &str) -> String {
    let body = json!({ "user": USER, "password": password }).to_string();
    format!(
        "POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[test]
fn operators_log_in_and_see_nodes_waves_loss_plot_and_a_verified_audit_entry() {
    let dashboard_port = free_port();
    let listen = format!("127.0.0.1:{dashboard_port}");
    // Three agents with local data and the tiny base model rolled out to them.
    let fleet = fleet_with(&[24, 24, 24], &["--dashboard-listen", &listen]);
    let c = &fleet.coordinator;
    run_federation(
        c,
        "valves",
        schedule("fedavg", 3, 3, 1, "120s"),
        Duration::from_secs(600),
    );
    // A rollout in three waves (one node each) of a second version of the model.
    let model = fleet.root.path().join("tiny-2.gguf");
    std::fs::write(&model, tiny_gguf(4)).unwrap();
    let key = fleet.root.path().join("publisher/publisher.key");
    publish(c, &model, "tiny-llama", "1.1.0", &key, "65536");
    let rollout = create_rollout(c, "tiny-llama@1.1.0", "33,66,100");
    wait_state(c, &rollout, "completed", Duration::from_secs(120));

    // An account, its password from stdin; a short one is refused.
    let short = c.admin_with_stdin(&["dashboard-user", "add", USER], "short\n");
    assert!(!short.status.success(), "a short password is refused");
    ok(&c.admin_with_stdin(&["dashboard-user", "add", USER], &format!("{PASSWORD}\n")));
    let users = std::fs::read_to_string(c.dir.join("dashboard-users.json")).unwrap();
    assert!(!users.contains(PASSWORD) && users.contains("$argon2id$"));

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        // A node's certificate reaches nothing: no session, 401.
        let node = &fleet.agents[0];
        let identity = (
            std::fs::read(node.dir.join("node.crt")).unwrap(),
            std::fs::read(node.dir.join("node.key")).unwrap(),
        );
        let (status, body) = https(
            c,
            dashboard_port,
            Some(identity.clone()),
            &get("/api/nodes", None),
        )
        .await;
        assert_eq!(status, 401, "{body}");
        let (status, body) = https(
            c,
            dashboard_port,
            Some(identity),
            &login_request("wrong password!!"),
        )
        .await;
        assert_eq!(status, 401, "{body}");
        assert!(body.contains("wrong user name or password"), "{body}");
        // The control: the right password yields a session cookie that reads the data.
        let (status, body) = https(c, dashboard_port, None, &login_request(PASSWORD)).await;
        assert_eq!(status, 200, "{body}");
        let cookie = body
            .lines()
            .find_map(|l| {
                l.strip_prefix("set-cookie: ")
                    .or_else(|| l.strip_prefix("Set-Cookie: "))
            })
            .and_then(|c| c.split(';').next())
            .expect("a session cookie")
            .to_owned();
        let set_cookie = body.to_ascii_lowercase();
        for attribute in ["httponly", "secure", "samesite=strict"] {
            assert!(
                set_cookie.contains(attribute),
                "cookie lacks {attribute}: {body}"
            );
        }
        let (status, body) =
            https(c, dashboard_port, None, &get("/api/nodes", Some(&cookie))).await;
        assert_eq!(status, 200, "{body}");
        // The page's export of the login entries checks offline with the CLI, proofs and all.
        let (status, response) = https(
            c,
            dashboard_port,
            None,
            &get(
                "/api/audit/export?format=jsonl&action=dashboard.",
                Some(&cookie),
            ),
        )
        .await;
        assert_eq!(status, 200, "{response}");
        let (_, jsonl) = response.split_once("\r\n\r\n").expect("a body");
        assert!(jsonl.contains("dashboard.login_refused"), "{jsonl}");
        let export = fleet.root.path().join("dashboard-export.jsonl");
        std::fs::write(&export, jsonl).unwrap();
        let key = c.dir.join("audit-signing.pub");
        ok(&c.cli(&["audit", "verify", &path(&export), "--key", &path(&key)]));

        let driver = Driver::start(&fleet.root.path().join("chromedriver.log"));
        let profile = fleet.root.path().join("chromium-profile");
        let client = browser(&driver, &profile, &server_spki_pin(c)).await;
        let result = browse(&client, dashboard_port, &fleet).await;
        let _ = client.close().await;
        result
    });
    // Both logins of the browser and the raw client are on the record, the refused ones too.
    let events = c.cli_json(&["events"]);
    let text = events.to_string();
    assert!(text.contains("dashboard.login_refused"), "{text}");
    assert!(text.contains("dashboard.login"), "{text}");
    assert!(!text.contains(PASSWORD));
}

async fn browse(client: &Client, port: u16, fleet: &nanofleet_e2e::federation::Fleet) {
    let url = format!("https://127.0.0.1:{port}/");
    client
        .goto(&url)
        .await
        .expect("the dashboard loads over HTTPS");
    wait_js(
        client,
        "login form shown",
        "!document.querySelector('#login-view').hidden",
    )
    .await;

    // A wrong password is refused, with a message.
    log_in(client, "not the password").await;
    wait_js(
        client,
        "refusal shown",
        "document.querySelector('#login-error').textContent.includes('Login refused')",
    )
    .await;
    assert!(text_of(client, "#login-error")
        .await
        .contains("wrong user name or password"));
    screenshot(client, "01-login-refused.png").await;

    // Logged in, the fleet view lists the three nodes.
    log_in(client, PASSWORD).await;
    wait_js(
        client,
        "three nodes listed",
        "document.querySelectorAll('#fleet-table tbody tr.node').length === 3",
    )
    .await;
    let table = text_of(client, "#fleet-table").await;
    for agent in &fleet.agents {
        let id = agent.node_id().unwrap();
        assert!(table.contains(&id), "node {id} missing from:\n{table}");
    }
    assert!(table.contains("tiny-llama"), "{table}");
    screenshot(client, "02-fleet.png").await;

    // The three-wave rollout with its waves passed.
    open_tab(client, "rollouts").await;
    wait_js(
        client,
        "rollout waves shown",
        "[...document.querySelectorAll('.rollout')].some(r => r.querySelectorAll('.wave').length === 3)",
    )
    .await;
    let rollouts = text_of(client, "#rollouts-list").await;
    for wave in ["Wave 1 (33%)", "Wave 2 (66%)", "Wave 3 (100%)"] {
        assert!(rollouts.contains(wave), "{wave} missing from:\n{rollouts}");
    }
    assert!(rollouts.contains("tiny-llama@1.1.0"), "{rollouts}");
    screenshot(client, "03-rollouts.png").await;

    // The finished round's held-out loss as a line with a point per measured round.
    open_tab(client, "federations").await;
    wait_js(
        client,
        "loss plot drawn",
        "document.querySelectorAll('svg.loss-plot path.line').length === 1 \
         && document.querySelectorAll('svg.loss-plot circle.point').length >= 2",
    )
    .await;
    let path = client
        .find(Locator::Css("svg.loss-plot path.line"))
        .await
        .unwrap()
        .attr("d")
        .await
        .unwrap()
        .unwrap_or_default();
    assert!(path.starts_with('M') && path.contains('L'), "{path}");
    assert!(text_of(client, "#federations-list")
        .await
        .contains("finished"));
    screenshot(client, "04-federations.png").await;

    // The audit trail: verify the rollout's completion entry in the page.
    open_tab(client, "audit").await;
    wait_js(
        client,
        "audit entries listed",
        "document.querySelectorAll('#audit-table tbody tr.entry').length > 0",
    )
    .await;
    client
        .execute(
            "const row = [...document.querySelectorAll('#audit-table tr.entry')]
                 .find(r => r.textContent.includes('rollout.complete'));
             row.scrollIntoView({ block: 'center' }); row.querySelector('button.verify').click();",
            vec![],
        )
        .await
        .expect("clicks verify");
    wait_js(
        client,
        "entry verified",
        "[...document.querySelectorAll('#audit-table tr.entry')]
             .find(r => r.textContent.includes('rollout.complete'))
             .querySelector('.result').textContent.startsWith('verified ✓')",
    )
    .await;
    screenshot(client, "05-audit-verified.png").await;

    // The same checks in the page refuse an edited entry, a changed proof hash and a
    // changed tree head signature.
    let refusals = client
        .execute(
            "return (async () => {
                 const { entries } = await api('/api/audit?limit=500');
                 const entry = entries.find(e => e.action === 'rollout.complete');
                 const outcome = (promise) => promise.then(() => 'accepted', e => e.message);
                 const edited = await outcome(verifyEntry({ ...entry, details: entry.details + ' (edited)' }));
                 const head = await api('/api/audit/head');
                 const p = await api(`/api/audit/proof?index=${entry.index}&size=${head.size}`);
                 const proof = p.proof.map(fromHex);
                 proof[0][0] ^= 1;
                 const badProof = await outcome(verifyInclusion(await leafHash(fromHex(p.leaf)),
                     BigInt(entry.index), BigInt(head.size), proof, fromHex(head.root)));
                 const badSignature = await outcome(verifyHeadSignature(
                     { ...head, signature: head.signature.replace(/^./, c => (c === '0' ? '1' : '0')) }, head.public_key));
                 return [edited, badProof, badSignature];
             })()",
            vec![],
        )
        .await
        .expect("the page's checks run");
    let refusals: Vec<String> = serde_json::from_value(refusals).expect("three outcomes");
    assert!(refusals[0].contains("differs from the row"), "{refusals:?}");
    assert!(
        refusals[1].contains("does not lead to the signed root"),
        "{refusals:?}"
    );
    assert!(
        refusals[2].contains("signature does not verify"),
        "{refusals:?}"
    );
}
