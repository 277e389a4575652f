//! The compliance dashboard: a web page and read-only JSON views of the fleet, rollouts,
//! federations and audit trail, served over HTTPS behind operator login.
//!
//! TLS uses the coordinator's server certificate and never asks for a client certificate,
//! so node (or operator) certificates grant nothing here: every `/api/*` call needs a login
//! session (`auth`). The page is plain HTML, JavaScript and CSS embedded in the binary
//! (`assets/`), with SVG plots drawn in the browser; nothing needs a Node toolchain.

mod audit;
pub mod auth;
mod views;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::artifacts::ArtifactStore;
use crate::audit_log::AuditLog;
use crate::federations::Federations;
use crate::pki::Pki;
use crate::registry::Registry;
use crate::rollouts::Rollouts;
use auth::{Accounts, Sessions, MAX_PASSWORD_BYTES};

/// The session cookie. `__Host-` makes browsers insist on Secure, Path=/ and no Domain.
const COOKIE: &str = "__Host-nanofleet-session";
/// Added to every refused login, on top of argon2's own cost, to slow guessing.
const REFUSAL_DELAY: Duration = Duration::from_millis(500);
/// A TLS handshake that takes longer than this is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum DashboardError {
    #[error("the dashboard's TLS configuration is not usable: {0}")]
    Tls(String),
}

/// What the dashboard reads, and its logins.
pub struct Dashboard {
    pub registry: Registry,
    pub rollouts: Rollouts,
    pub federations: Federations,
    pub artifacts: ArtifactStore,
    pub audit: AuditLog,
    pub accounts: Accounts,
    pub sessions: Sessions,
    pub heartbeat_interval_secs: u32,
}

/// rustls server configuration from the coordinator's server certificate and key. No
/// client authentication: a certificate is not a way into the dashboard.
pub fn tls_config(pki: &Pki) -> Result<rustls::ServerConfig, DashboardError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let (chain_pem, key_pem) = pki.server_identity();
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| DashboardError::Tls(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| DashboardError::Tls(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| DashboardError::Tls(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .map_err(|e| DashboardError::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Completed TLS connections for `axum::serve`. Handshakes run in their own tasks, so a
/// slow or silent client never holds up the others.
struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<(tokio_rustls::server::TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    acceptor_task: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    fn new(listener: TcpListener, config: rustls::ServerConfig) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let (tx, ready) = tokio::sync::mpsc::channel(64);
        let acceptor_task = tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors and the like: wait, do not spin.
                        tracing::warn!(%error, "dashboard accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(error)) => {
                            tracing::debug!(%peer, %error, "dashboard TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(%peer, "dashboard TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self {
            ready,
            local,
            acceptor_task,
        })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(connection) => connection,
            // The acceptor task only ends with the runtime.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.acceptor_task.abort();
    }
}

/// Serves the dashboard on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    tls: rustls::ServerConfig,
    dashboard: Arc<Dashboard>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(TlsListener::new(listener, tls)?, router(dashboard))
        .with_graceful_shutdown(shutdown)
        .await
}

pub fn router(dashboard: Arc<Dashboard>) -> Router {
    let api = views::routes()
        .merge(audit::routes())
        .layer(axum::middleware::from_fn_with_state(
            dashboard.clone(),
            require_session,
        ));
    Router::new()
        .route("/", get(|| asset("text/html; charset=utf-8", INDEX_HTML)))
        .route(
            "/app.js",
            get(|| asset("text/javascript; charset=utf-8", APP_JS)),
        )
        .route(
            "/style.css",
            get(|| asset("text/css; charset=utf-8", STYLE_CSS)),
        )
        .route("/login", post(login))
        .route("/logout", post(logout))
        .nest("/api", api)
        .layer(axum::middleware::from_fn(security_headers))
        .with_state(dashboard)
}

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");

async fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// Headers every answer carries: only this origin's scripts and styles run, the page is
/// never framed, nothing is cached, and browsers stay on HTTPS.
async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    let set = |headers: &mut HeaderMap, name: &'static str, value: &'static str| {
        headers.insert(name, HeaderValue::from_static(value));
    };
    set(
        headers,
        "content-security-policy",
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
         connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    );
    set(headers, "x-content-type-options", "nosniff");
    set(headers, "referrer-policy", "no-referrer");
    set(headers, "cache-control", "no-store");
    set(headers, "strict-transport-security", "max-age=31536000");
    response
}

/// A JSON error body `{"error": ...}` with `status`.
fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

fn session_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_owned())
}

/// Lets a request through only with a live session; puts the session in its extensions.
async fn require_session(
    State(dashboard): State<Arc<Dashboard>>,
    mut request: Request,
    next: Next,
) -> Response {
    let session = session_token(request.headers())
        .and_then(|t| dashboard.sessions.get(&t))
        .filter(|s| dashboard.accounts.exists(&s.user).unwrap_or(false));
    match session {
        Some(session) => {
            request.extensions_mut().insert(session);
            next.run(request).await
        }
        None => error(
            StatusCode::UNAUTHORIZED,
            "log in first: the dashboard's data needs an operator session",
        ),
    }
}

#[derive(Deserialize)]
struct LoginRequest {
    user: String,
    password: String,
}

fn cookie(value: &str, max_age_secs: u64) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{COOKIE}={value}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age={max_age_secs}"
    ))
    .expect("cookie is ASCII")
}

async fn login(
    State(dashboard): State<Arc<Dashboard>>,
    Json(body): Json<LoginRequest>,
) -> Response {
    let LoginRequest { user, password } = body;
    // Only names an account could have reach the log; others are recorded as such.
    let name_ok = auth::valid_name(&user);
    let subject = if name_ok {
        user.clone()
    } else {
        "(invalid user name)".to_owned()
    };
    if let Some(wait) = dashboard.sessions.locked_for(&subject) {
        return error(
            StatusCode::TOO_MANY_REQUESTS,
            format!("too many failed logins for this user; try again in {wait} s"),
        );
    }
    let checked = {
        let dashboard = dashboard.clone();
        let (user, subject) = (user.clone(), subject.clone());
        tokio::task::spawn_blocking(move || {
            let ok = name_ok
                && password.len() <= MAX_PASSWORD_BYTES
                && dashboard.accounts.verify(&user, &password)?;
            // An attempt is recorded in the name it was made in; a name no account can
            // have is recorded as the coordinator's refusal.
            let actor = if name_ok {
                format!("operator:{user}")
            } else {
                "coordinator".to_owned()
            };
            let action = if ok {
                "dashboard.login"
            } else {
                "dashboard.login_refused"
            };
            if let Err(error) = dashboard.audit.append(&actor, action, &subject, "") {
                tracing::error!(%error, "cannot record a dashboard login");
            }
            Ok::<bool, auth::AccountError>(ok)
        })
        .await
    };
    match checked {
        Ok(Ok(true)) => {
            dashboard.sessions.clear_failures(&subject);
            let token = dashboard.sessions.create(&user);
            tracing::info!(user = %user, "dashboard login");
            let mut response = Json(serde_json::json!({ "user": user })).into_response();
            response.headers_mut().insert(
                header::SET_COOKIE,
                cookie(&token, auth::SESSION_TTL.as_secs()),
            );
            response
        }
        Ok(Ok(false)) => {
            dashboard.sessions.record_failure(&subject);
            tracing::warn!(user = %subject, "dashboard login refused");
            tokio::time::sleep(REFUSAL_DELAY).await;
            error(StatusCode::UNAUTHORIZED, "wrong user name or password")
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "dashboard accounts unusable");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the accounts file cannot be read; see the coordinator's log",
            )
        }
        Err(e) => {
            tracing::error!(error = %e, "login check panicked");
            error(StatusCode::INTERNAL_SERVER_ERROR, "login failed")
        }
    }
}

async fn logout(State(dashboard): State<Arc<Dashboard>>, headers: HeaderMap) -> Response {
    if let Some(token) = session_token(&headers) {
        dashboard.sessions.end(&token);
    }
    let mut response = StatusCode::NO_CONTENT.into_response();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, cookie("", 0));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;
    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    const PASSWORD: &str = "correct horse battery staple";

    fn dashboard(dir: &std::path::Path) -> Arc<Dashboard> {
        let store: Arc<dyn crate::store::KvStore> =
            Arc::new(SledStore::open(&dir.join("state")).unwrap());
        let registry = Registry::new(store.clone());
        let artifacts = ArtifactStore::open(store.clone(), dir).unwrap();
        let audit = AuditLog::open(store.clone(), dir).unwrap();
        let federations = Federations::open(
            store.clone(),
            registry.clone(),
            artifacts.clone(),
            audit.clone(),
            dir,
            1 << 20,
        )
        .unwrap();
        let rollouts = Rollouts::new(
            store,
            registry.clone(),
            artifacts.clone(),
            audit.clone(),
            Duration::from_secs(60),
            10,
        );
        Arc::new(Dashboard {
            registry,
            rollouts,
            federations,
            artifacts,
            audit,
            accounts: Accounts::new(dir),
            sessions: Sessions::default(),
            heartbeat_interval_secs: 10,
        })
    }

    async fn call(
        dashboard: &Arc<Dashboard>,
        method: &str,
        uri: &str,
        cookie: Option<&str>,
        body: Option<serde_json::Value>,
    ) -> (StatusCode, HeaderMap, serde_json::Value) {
        let mut request = axum::http::Request::builder().method(method).uri(uri);
        if let Some(cookie) = cookie {
            request = request.header(header::COOKIE, cookie);
        }
        let body = match body {
            Some(json) => {
                request = request.header(header::CONTENT_TYPE, "application/json");
                Body::from(json.to_string())
            }
            None => Body::empty(),
        };
        let response = router(dashboard.clone())
            .oneshot(request.body(body).unwrap())
            .await
            .unwrap();
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        (parts.status, parts.headers, json)
    }

    fn login(password: &str) -> Option<serde_json::Value> {
        Some(serde_json::json!({ "user": "alice", "password": password }))
    }

    #[tokio::test]
    async fn data_needs_a_session_and_logins_are_in_the_audit_log_with_proofs() {
        let dir = tempfile::tempdir().unwrap();
        let d = dashboard(dir.path());
        d.accounts.set("alice", PASSWORD).unwrap();

        let (status, _, body) = call(&d, "GET", "/api/nodes", None, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        let forged = format!("{COOKIE}=AAAA");
        let (status, _, _) = call(&d, "GET", "/api/nodes", Some(&forged), None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, _, body) = call(&d, "POST", "/login", None, login("not it at all")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body["error"], "wrong user name or password");

        let (status, headers, _) = call(&d, "POST", "/login", None, login(PASSWORD)).await;
        assert_eq!(status, StatusCode::OK);
        let set_cookie = headers[header::SET_COOKIE].to_str().unwrap().to_owned();
        for attribute in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
            assert!(set_cookie.contains(attribute), "{set_cookie}");
        }
        let cookie = set_cookie.split(';').next().unwrap().to_owned();
        let (status, headers, body) = call(&d, "GET", "/api/nodes", Some(&cookie), None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["nodes"], serde_json::json!([]));
        assert!(headers.contains_key("content-security-policy"));

        // Both attempts are entries, newest first, and neither holds a password.
        let (_, _, audit) = call(
            &d,
            "GET",
            "/api/audit?action=dashboard.",
            Some(&cookie),
            None,
        )
        .await;
        let entries = audit["entries"].as_array().unwrap();
        let actions: Vec<_> = entries
            .iter()
            .map(|e| e["action"].as_str().unwrap())
            .collect();
        assert_eq!(actions, ["dashboard.login", "dashboard.login_refused"]);
        assert!(!audit.to_string().contains(PASSWORD));

        // The proof the page checks verifies here too.
        let (_, _, head) = call(&d, "GET", "/api/audit/head", Some(&cookie), None).await;
        let size = head["size"].as_u64().unwrap();
        let index = entries[0]["index"].as_u64().unwrap();
        let uri = format!("/api/audit/proof?index={index}&size={size}");
        let (status, _, proof) = call(&d, "GET", &uri, Some(&cookie), None).await;
        assert_eq!(status, StatusCode::OK, "{proof}");
        let hash = |v: &serde_json::Value| -> [u8; 32] {
            hex::decode(v.as_str().unwrap())
                .unwrap()
                .try_into()
                .unwrap()
        };
        let leaf =
            nanofleet_audit::leaf_hash(&hex::decode(proof["leaf"].as_str().unwrap()).unwrap());
        let path: Vec<[u8; 32]> = proof["proof"]
            .as_array()
            .unwrap()
            .iter()
            .map(hash)
            .collect();
        nanofleet_audit::verify_inclusion(&leaf, index, size, &path, &hash(&head["root"])).unwrap();
        let uri = format!("/api/audit/proof?index={size}&size={size}");
        let (status, _, _) = call(&d, "GET", &uri, Some(&cookie), None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);

        // Logging out, or losing the account, ends the session.
        let (status, _, _) = call(&d, "POST", "/logout", Some(&cookie), None).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (status, _, _) = call(&d, "GET", "/api/nodes", Some(&cookie), None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (_, headers, _) = call(&d, "POST", "/login", None, login(PASSWORD)).await;
        let cookie = headers[header::SET_COOKIE]
            .to_str()
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_owned();
        d.accounts.remove("alice").unwrap();
        let (status, _, _) = call(&d, "GET", "/api/me", Some(&cookie), None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
}
