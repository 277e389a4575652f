//! Wire capture for audits: when `wire_capture_dir` is set, the body of every request the
//! node service receives is written to a file before it is handled, so that an auditor
//! (or a test) can show exactly what devices sent, for example that no training text ever
//! left a site. Off by default. The files hold what nodes sent (round updates are masked
//! vectors in secure rounds); keep the directory as private as the data directory.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use http_body_util::{BodyExt, Full, Limited};
use tonic::body::Body;

/// Requests whose path starts with this are captured.
const NODE_SERVICE: &str = "/nanofleet.v1.NodeService/";

/// Tower layer for the gRPC server; a no-op without a directory.
#[derive(Clone)]
pub struct CaptureLayer {
    target: Option<Arc<Target>>,
}

struct Target {
    dir: PathBuf,
    limit: usize,
    next: AtomicU64,
}

impl CaptureLayer {
    /// Captures into `dir` (created if missing); bodies above `limit` bytes are refused.
    pub fn new(dir: Option<PathBuf>, limit: usize) -> std::io::Result<Self> {
        let target = match dir {
            Some(dir) => {
                std::fs::create_dir_all(&dir)?;
                Some(Arc::new(Target {
                    dir,
                    limit,
                    next: AtomicU64::new(0),
                }))
            }
            None => None,
        };
        Ok(Self { target })
    }
}

impl<S> tower::Layer<S> for CaptureLayer {
    type Service = Capture<S>;

    fn layer(&self, inner: S) -> Capture<S> {
        Capture {
            inner,
            target: self.target.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Capture<S> {
    inner: S,
    target: Option<Arc<Target>>,
}

impl<S> tower::Service<http::Request<Body>> for Capture<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let target = match &self.target {
            Some(target) if request.uri().path().starts_with(NODE_SERVICE) => target.clone(),
            _ => return Box::pin(self.inner.call(request)),
        };
        // The service that was polled ready serves this call; a clone waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let bytes = match Limited::new(body, target.limit).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(error) => {
                    return Ok(tonic::Status::out_of_range(format!(
                        "the request body could not be read for capture: {error}"
                    ))
                    .into_http());
                }
            };
            let method = parts.uri.path().trim_start_matches(NODE_SERVICE).to_owned();
            let n = target.next.fetch_add(1, Ordering::Relaxed);
            let file = target.dir.join(format!("{n:010}-{method}.bin"));
            if let Err(error) = std::fs::write(&file, &bytes) {
                tracing::error!(%error, file = %file.display(), "wire capture failed");
            }
            let request = http::Request::from_parts(parts, Body::new(Full::new(bytes)));
            inner.call(request).await
        })
    }
}
