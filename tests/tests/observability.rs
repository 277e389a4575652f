//! End to end: the coordinator's telemetry reaches real receivers. An OTLP/gRPC receiver
//! in the test (opentelemetry-proto's service definitions) gets its spans and metrics;
//! Prometheus from the Debian package (tests/run.sh installs it) scrapes `/metrics`.

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nanofleet_e2e::{free_port, http, wait_until, Agent, Coordinator};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    metrics_service_server::{MetricsService, MetricsServiceServer},
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    trace_service_server::{TraceService, TraceServiceServer},
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value::Value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;

/// What the in-test collector received, kept as sent.
#[derive(Clone, Default)]
struct Collector {
    traces: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
    metrics: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.traces.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.metrics.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

/// One received span, flattened: its resource's service.name, name, attributes, and
/// the attributes of its events.
#[derive(Debug)]
struct SeenSpan {
    service: String,
    name: String,
    attributes: Vec<(String, String)>,
    event_attributes: Vec<(String, String)>,
}

impl SeenSpan {
    fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn text(value: &Option<AnyValue>) -> String {
    match value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn pairs(attributes: &[KeyValue]) -> Vec<(String, String)> {
    attributes
        .iter()
        .map(|kv| (kv.key.clone(), text(&kv.value)))
        .collect()
}

fn service_name(resource: &Option<Resource>) -> String {
    resource
        .as_ref()
        .map(|r| pairs(&r.attributes))
        .unwrap_or_default()
        .into_iter()
        .find(|(k, _)| k == "service.name")
        .map(|(_, v)| v)
        .unwrap_or_default()
}

impl Collector {
    fn spans(&self) -> Vec<SeenSpan> {
        let mut out = Vec::new();
        for request in self.traces.lock().unwrap().iter() {
            for resource_spans in &request.resource_spans {
                let service = service_name(&resource_spans.resource);
                for span in resource_spans.scope_spans.iter().flat_map(|s| &s.spans) {
                    out.push(SeenSpan {
                        service: service.clone(),
                        name: span.name.clone(),
                        attributes: pairs(&span.attributes),
                        event_attributes: span
                            .events
                            .iter()
                            .flat_map(|e| pairs(&e.attributes))
                            .collect(),
                    });
                }
            }
        }
        out
    }

    /// (service.name, metric name) of every metric received.
    fn metric_names(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for request in self.metrics.lock().unwrap().iter() {
            for resource_metrics in &request.resource_metrics {
                let service = service_name(&resource_metrics.resource);
                for metric in resource_metrics
                    .scope_metrics
                    .iter()
                    .flat_map(|s| &s.metrics)
                {
                    out.push((service.clone(), metric.name.clone()));
                }
            }
        }
        out
    }

    fn has_rpc(&self, method: &str) -> bool {
        self.spans()
            .iter()
            .any(|s| s.name == "rpc" && s.attribute("method") == Some(method))
    }
}

/// Serves the OTLP trace and metrics services on a loopback port, on its own runtime.
fn start_collector() -> (Collector, String, tokio::runtime::Runtime) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let collector = Collector::default();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("collector port");
    let endpoint = format!("http://{}", listener.local_addr().expect("address"));
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(collector.clone()))
        .add_service(MetricsServiceServer::new(collector.clone()))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    runtime.spawn(server);
    (collector, endpoint, runtime)
}

const LIST_NODES: &str = "/nanofleet.v1.OperatorService/ListNodes";
const CREATE_TOKEN: &str = "/nanofleet.v1.OperatorService/CreateToken";
const LIST_EVENTS: &str = "/nanofleet.v1.OperatorService/ListEvents";

#[test]
fn an_otlp_receiver_gets_the_coordinators_spans_and_metrics() {
    let (collector, endpoint, _runtime) = start_collector();
    let root = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start_with(root.path(), &["--otlp-endpoint", &endpoint]);

    let token = coordinator.create_token("10m", "zone=a");
    assert!(coordinator.nodes().is_empty());

    // The batch exporter sends on its schedule (5 s) while the coordinator runs.
    assert!(
        wait_until(Duration::from_secs(30), || collector.has_rpc(LIST_NODES)
            && collector.has_rpc(CREATE_TOKEN)),
        "no rpc spans for ListNodes and CreateToken arrived: {:#?}",
        collector.spans()
    );
    let spans = collector.spans();
    let rpc: Vec<&SeenSpan> = spans.iter().filter(|s| s.name == "rpc").collect();
    for span in &rpc {
        assert_eq!(span.service, "nanofleet-coordinator", "{span:#?}");
    }
    let list = rpc
        .iter()
        .find(|s| s.attribute("method") == Some(LIST_NODES))
        .expect("ListNodes span");
    assert_eq!(list.attribute("principal"), Some("admin"), "{list:#?}");
    // The bootstrap token was in the response, and must be in no span or event.
    for span in &spans {
        for (key, value) in span.attributes.iter().chain(&span.event_attributes) {
            assert!(
                !value.contains(&token),
                "the token leaked into {key} of {span:#?}"
            );
        }
    }

    // A call right before a graceful stop: its span goes out in the shutdown flush,
    // well before the next scheduled export, and so do the metrics.
    nanofleet_e2e::ok(&coordinator.cli(&["events"]));
    drop(coordinator);
    assert!(
        wait_until(Duration::from_secs(5), || collector.has_rpc(LIST_EVENTS)),
        "the last span was lost at shutdown: {:#?}",
        collector.spans()
    );
    let metrics = collector.metric_names();
    for name in ["nanofleet_nodes", "nanofleet_connected_nodes"] {
        assert!(
            metrics
                .iter()
                .any(|(service, metric)| service == "nanofleet-coordinator" && metric == name),
            "{name} not exported over OTLP: {metrics:?}"
        );
    }
}

#[test]
fn an_unreachable_otlp_endpoint_changes_nothing() {
    let root = tempfile::tempdir().unwrap();
    // Nothing listens there.
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    let mut coordinator = Coordinator::start_with(root.path(), &["--otlp-endpoint", &endpoint]);
    let started = Instant::now();
    coordinator.create_token("10m", "zone=a");
    assert!(coordinator.nodes().is_empty());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(coordinator.is_running());
    let log = coordinator.dir.join("serve-1.log");
    let warned = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("OTLP collector unreachable")
    };
    assert!(
        wait_until(Duration::from_secs(10), warned),
        "no warning about the collector: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // The shutdown flush gives up in bounded time.
    let stopping = Instant::now();
    drop(coordinator);
    assert!(
        stopping.elapsed() < Duration::from_secs(15),
        "shutdown took {:?}",
        stopping.elapsed()
    );
}

/// A Prometheus server from the system's package, killed on drop.
struct Prometheus {
    child: Child,
    address: String,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Scrapes `target`'s `/metrics` every second as job `nanofleet`.
    fn start(target: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: nanofleet\n    scrape_interval: 1s\n    \
                 static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let address = format!("127.0.0.1:{}", free_port());
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let binary = std::env::var("NANOFLEET_TEST_PROMETHEUS").unwrap_or("prometheus".into());
        let child = Command::new(&binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={address}"))
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {binary:?} ({e}): this test needs Prometheus; tests/run.sh \
                     installs Debian's `prometheus` package (apt-get install prometheus)"
                )
            });
        let prometheus = Self {
            child,
            address,
            dir,
        };
        assert!(
            wait_until(Duration::from_secs(30), || prometheus.ready()),
            "prometheus did not become ready: {}",
            prometheus.log()
        );
        prometheus
    }

    fn ready(&self) -> bool {
        std::net::TcpStream::connect(&self.address).is_ok()
            && http(&self.address, "GET", "/-/ready", "").status == 200
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// An instant query's result vector: (labels, value) per series.
    fn query(&self, promql: &str) -> Vec<(serde_json::Value, String)> {
        let path = format!("/api/v1/query?query={}", percent_encode(promql));
        let response = http(&self.address, "GET", &path, "").json();
        assert_eq!(response["status"], "success", "{response}");
        response["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|series| {
                let value = series["value"][1].as_str().unwrap_or_default().to_owned();
                (series["metric"].clone(), value)
            })
            .collect()
    }

    /// The value of a query that selects one series, once it has one.
    fn value(&self, promql: &str) -> Option<String> {
        match self.query(promql).as_slice() {
            [(_, value)] => Some(value.clone()),
            _ => None,
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The value of an unlabelled-or-exactly-labelled line in the coordinator's `/metrics`.
fn scraped_value(metrics: &str, series: &str) -> Option<String> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().to_owned())
}

#[test]
fn prometheus_scrapes_the_coordinator() {
    let root = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(root.path());
    let token = coordinator.create_token("10m", "zone=a");
    let agent = Agent::start(root.path(), "agent", &coordinator, &token);
    agent.wait_enrolled();
    let prometheus = Prometheus::start(&format!("127.0.0.1:{}", coordinator.http_port));

    let online = r#"nanofleet_nodes{job="nanofleet",state="online"}"#;
    assert!(
        wait_until(Duration::from_secs(60), || prometheus
            .value(online)
            .as_deref()
            == Some("1")),
        "prometheus has no online node: {:?}\n{}",
        prometheus.query(online),
        prometheus.log()
    );
    assert_eq!(
        prometheus.value(r#"up{job="nanofleet"}"#).as_deref(),
        Some("1")
    );
    let accepted = r#"nanofleet_enrollments_total{job="nanofleet",result="accepted"}"#;
    let metrics = coordinator.http_get("/metrics").expect("metrics");
    assert_eq!(
        prometheus.value(accepted),
        scraped_value(
            &metrics,
            r#"nanofleet_enrollments_total{result="accepted"}"#
        ),
        "{metrics}"
    );
    assert_eq!(prometheus.value(accepted).as_deref(), Some("1"));
    // The node gauge per state, connected nodes, enrollments and heartbeats.
    let names = prometheus.query(r#"{job="nanofleet",__name__=~"nanofleet_.+"}"#);
    assert!(names.len() >= 4, "{names:?}");
}
