//! Test harness: starts a real coordinator and real agents as processes on loopback,
//! each with its own data directory, and drives them through the operator CLI and
//! raw gRPC clients. Processes are killed when their handles drop.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nanofleet_transport::ClientTls;

pub mod federation;
pub mod fleet;

/// Path of a workspace binary. The test command builds them first
/// (`cargo build --bins`); they sit next to the test's `deps` directory.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --bins` before the end-to-end tests",
        path.display()
    );
    path
}

/// A loopback port that was free a moment ago, for a server a test starts next.
///
/// Ports come from below Linux's ephemeral range (32768 and up), where the kernel picks
/// the local ports of outgoing connections and of `bind(0)`: a port taken from there
/// could go to some connection between this check and the server's bind. No port is
/// handed out twice by one test process, whose tests run in parallel.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Test binaries run one after another, but a process's leftovers may still listen.
    let start = std::process::id().wrapping_mul(7_919);
    for _ in 0..COUNT {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (FIRST + start.wrapping_add(n) % COUNT) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {FIRST}..{}", FIRST + COUNT)
}

/// Polls `check` until it holds or `timeout` passes; true when it held.
pub fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn spawn_logged(mut command: Command, log: &Path) -> Child {
    let file = std::fs::File::create(log).expect("log file");
    command
        .stdout(Stdio::from(file.try_clone().expect("log handle")))
        .stderr(Stdio::from(file))
        .env("RUST_LOG", "info")
        .spawn()
        .expect("process starts")
}

fn kill(child: &mut Child, signal: i32) {
    // SAFETY: sending a signal to a child we own; no memory is touched.
    unsafe {
        libc::kill(child.id() as i32, signal);
    }
    let _ = child.wait();
}

/// A coordinator process with its own data directory and ports.
pub struct Coordinator {
    pub dir: PathBuf,
    pub grpc_port: u16,
    pub http_port: u16,
    pub heartbeat_secs: u32,
    /// Extra `serve` flags, e.g. a download rate limit.
    pub serve_flags: Vec<String>,
    child: Option<Child>,
    starts: u32,
}

impl Coordinator {
    /// Initializes a data directory under `root` and starts serving.
    pub fn start(root: &Path) -> Self {
        Self::start_with(root, &[])
    }

    /// Like [`Coordinator::start`], with extra `serve` flags.
    pub fn start_with(root: &Path, serve_flags: &[&str]) -> Self {
        let mut coordinator = Self {
            dir: root.join("coordinator"),
            grpc_port: free_port(),
            http_port: free_port(),
            heartbeat_secs: 1,
            serve_flags: serve_flags.iter().map(|f| f.to_string()).collect(),
            child: None,
            starts: 0,
        };
        let output = Command::new(bin("nanofleet-coordinator"))
            .args(coordinator.flags())
            .arg("init")
            .output()
            .expect("init runs");
        assert!(output.status.success(), "init failed: {output:?}");
        coordinator.restart();
        coordinator
    }

    fn flags(&self) -> Vec<String> {
        vec![
            "--data-dir".into(),
            self.dir.display().to_string(),
            "--grpc-listen".into(),
            format!("127.0.0.1:{}", self.grpc_port),
            "--http-listen".into(),
            format!("127.0.0.1:{}", self.http_port),
            "--heartbeat-interval-secs".into(),
            self.heartbeat_secs.to_string(),
        ]
    }

    /// Starts the serving process (again) and waits for `/healthz`.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "coordinator already running");
        self.starts += 1;
        let mut command = Command::new(bin("nanofleet-coordinator"));
        command
            .args(self.flags())
            .args(&self.serve_flags)
            .arg("serve");
        let log = self.dir.join(format!("serve-{}.log", self.starts));
        self.child = Some(spawn_logged(command, &log));
        let ready = wait_until(Duration::from_secs(20), || {
            self.healthy() || !self.is_running()
        });
        assert!(
            ready && self.is_running(),
            "coordinator did not become healthy; see {}:\n{}",
            log.display(),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    pub fn healthy(&self) -> bool {
        self.http_get("/healthz")
            .is_some_and(|body| body.contains("ok"))
    }

    /// A plain HTTP/1.0 GET on the coordinator's HTTP port.
    pub fn http_get(&self, path: &str) -> Option<String> {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.http_port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let (head, body) = response.split_once("\r\n\r\n")?;
        head.split(' ').nth(1).filter(|code| *code == "200")?;
        Some(body.to_owned())
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill(&mut child, libc::SIGKILL);
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.grpc_port)
    }

    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    pub fn cli_config(&self) -> PathBuf {
        self.dir.join("operator").join("cli.toml")
    }

    /// Runs the operator CLI with this coordinator's operator credentials.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin("nanofleet"))
            .env("NANOFLEET_CLI_CONFIG", self.cli_config())
            .args(args)
            .output()
            .expect("nanofleet runs")
    }

    /// Runs `nanofleet-coordinator` commands that act on the data directory (trust, ...).
    pub fn admin(&self, args: &[&str]) -> Output {
        Command::new(bin("nanofleet-coordinator"))
            .args(["--data-dir", &self.dir.display().to_string()])
            .args(args)
            .output()
            .expect("nanofleet-coordinator runs")
    }

    /// Like [`Coordinator::admin`], writing `stdin` to the command's standard input (for
    /// secrets that never go on a command line).
    pub fn admin_with_stdin(&self, args: &[&str], stdin: &str) -> Output {
        use std::io::Write;
        let mut child = Command::new(bin("nanofleet-coordinator"))
            .args(["--data-dir", &self.dir.display().to_string()])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nanofleet-coordinator runs");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin.as_bytes())
            .expect("writes stdin");
        child
            .wait_with_output()
            .expect("nanofleet-coordinator ends")
    }

    /// Runs the CLI with `--json` and parses its output; panics on failure.
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.push("--json");
        let output = self.cli(&all);
        assert!(
            output.status.success(),
            "nanofleet {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("CLI prints JSON")
    }

    pub fn create_token(&self, ttl: &str, labels: &str) -> String {
        let created = self.cli_json(&["token", "create", "--ttl", ttl, "--labels", labels]);
        created["token"].as_str().expect("token").to_owned()
    }

    pub fn nodes(&self) -> Vec<serde_json::Value> {
        self.cli_json(&["nodes", "list"])
            .as_array()
            .expect("node list")
            .clone()
    }

    pub fn operator_tls(&self) -> ClientTls {
        let dir = self.dir.join("operator");
        ClientTls {
            ca_pem: std::fs::read(dir.join("ca.crt")).expect("ca"),
            identity: Some((
                std::fs::read(dir.join("operator.crt")).expect("operator cert"),
                std::fs::read(dir.join("operator.key")).expect("operator key"),
            )),
        }
    }

    /// TLS that trusts this fleet's CA and presents no certificate.
    pub fn anonymous_tls(&self) -> ClientTls {
        ClientTls {
            ca_pem: std::fs::read(self.ca_cert()).expect("ca"),
            identity: None,
        }
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill(&mut child, libc::SIGTERM);
        }
    }
}

/// The agent binary to start: this build's, or a cross-built one run through an emulator
/// (`NANOFLEET_E2E_AGENT` and `NANOFLEET_E2E_AGENT_RUNNER`, e.g.
/// `qemu-aarch64 -L /usr/aarch64-linux-gnu`; see deploy/cross-build.sh).
pub fn agent_command() -> Command {
    let agent = std::env::var_os("NANOFLEET_E2E_AGENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| bin("nanofleet-agent"));
    match std::env::var("NANOFLEET_E2E_AGENT_RUNNER") {
        Ok(runner) if !runner.trim().is_empty() => {
            let mut words = runner.split_whitespace();
            let mut command = Command::new(words.next().expect("a runner"));
            command.args(words).arg(agent);
            command
        }
        _ => Command::new(agent),
    }
}

/// The architecture the agents under test report: this machine's, or the cross-built
/// agent's (`NANOFLEET_E2E_AGENT_ARCH`).
pub fn agent_arch() -> String {
    std::env::var("NANOFLEET_E2E_AGENT_ARCH").unwrap_or_else(|_| std::env::consts::ARCH.into())
}

/// An agent process with its own data directory.
pub struct Agent {
    pub dir: PathBuf,
    child: Option<Child>,
    log: PathBuf,
    args: Vec<String>,
    /// The subcommand and its arguments: `run`, or `serve --model FILE`.
    subcommand: Vec<String>,
    starts: u32,
}

impl Agent {
    /// Starts `nanofleet-agent run`, enrolling with `token`.
    pub fn start(root: &Path, name: &str, coordinator: &Coordinator, token: &str) -> Self {
        Self::start_with(root, name, coordinator, token, &[])
    }

    /// Like [`Agent::start`], with extra flags (a trust policy, a rate limit, ...).
    pub fn start_with(
        root: &Path,
        name: &str,
        coordinator: &Coordinator,
        token: &str,
        extra: &[&str],
    ) -> Self {
        let mut args: Vec<String> = vec![
            "--coordinator".into(),
            coordinator.url(),
            "--ca-cert".into(),
            coordinator.ca_cert().display().to_string(),
            "--token".into(),
            token.into(),
            "--label".into(),
            format!("agent={name}"),
            "--reconnect-max-ms".into(),
            "1000".into(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        Self::spawn(root, name, args, vec!["run".into()])
    }

    /// Starts `nanofleet-agent serve --model FILE`: one local model on the local API, no
    /// coordinator.
    pub fn serve_local(root: &Path, name: &str, model: &Path) -> Self {
        Self::spawn(
            root,
            name,
            Vec::new(),
            vec!["serve".into(), "--model".into(), path(model)],
        )
    }

    fn spawn(root: &Path, name: &str, mut args: Vec<String>, subcommand: Vec<String>) -> Self {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).expect("agent dir");
        args.extend([
            "--data-dir".into(),
            dir.display().to_string(),
            // Several agents share the machine: each API on a free port, one thread each.
            "--api-listen".into(),
            "127.0.0.1:0".into(),
            "--inference-threads".into(),
            "1".into(),
        ]);
        let mut agent = Self {
            dir,
            child: None,
            log: root.join(format!("{name}.log")),
            args,
            subcommand,
            starts: 0,
        };
        agent.restart();
        agent
    }

    /// Starts the process (again) with the same data directory and flags.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "agent already running");
        self.starts += 1;
        let mut command = agent_command();
        command.args(&self.args).args(&self.subcommand);
        if self.starts > 1 {
            self.log = self.log.with_extension(format!("{}.log", self.starts));
        }
        self.child = Some(spawn_logged(command, &self.log));
    }

    /// SIGKILL, as a power cut would.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill(&mut child, libc::SIGKILL);
        }
    }

    /// SIGSTOP: the process hangs with its connections open, as a wedged device would.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT after [`Agent::pause`].
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, signal: i32) {
        if let Some(child) = &self.child {
            // SAFETY: sending a signal to a child we own; no memory is touched.
            unsafe {
                libc::kill(child.id() as i32, signal);
            }
        }
    }

    /// The node id, once enrollment has written the identity.
    pub fn node_id(&self) -> Option<String> {
        let text = std::fs::read_to_string(self.dir.join("identity.json")).ok()?;
        let meta: serde_json::Value = serde_json::from_str(&text).ok()?;
        meta["node_id"].as_str().map(str::to_owned)
    }

    pub fn wait_enrolled(&self) -> String {
        let mut id = None;
        let enrolled = wait_until(Duration::from_secs(20), || {
            id = self.node_id();
            id.is_some()
        });
        assert!(enrolled, "agent did not enroll; see {}", self.log.display());
        id.expect("node id")
    }

    pub fn tls(&self, ca_pem: Vec<u8>) -> ClientTls {
        ClientTls {
            ca_pem,
            identity: Some((
                std::fs::read(self.dir.join("node.crt")).expect("node cert"),
                std::fs::read(self.dir.join("node.key")).expect("node key"),
            )),
        }
    }

    /// The exit code once the process ended, `None` while it runs.
    pub fn exit_code(&mut self) -> Option<i32> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
            .and_then(|status| status.code())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Where the agent's local API listens (`host:port`), once it does.
    pub fn api_address(&self) -> String {
        let file = self.dir.join("api.addr");
        let mut address = None;
        let listening = wait_until(Duration::from_secs(20), || {
            address = std::fs::read_to_string(&file)
                .ok()
                .map(|text| text.trim().to_owned())
                .filter(|text| !text.is_empty());
            address.is_some()
        });
        assert!(
            listening,
            "the local API never listened; see {}",
            self.log.display()
        );
        address.expect("api address")
    }
}

/// An HTTP response as the tests see it.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub body: String,
}

impl HttpResponse {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// Sends one HTTP/1.0 request (so the answer is delimited by the connection closing, with
/// no chunked framing) and returns a reader positioned at the body, with the status.
fn http_send(
    address: &str,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, std::io::BufReader<std::net::TcpStream>) {
    use std::io::{BufRead, Write};
    let mut stream = std::net::TcpStream::connect(address).expect("connects to the API");
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("sends the request");
    let mut reader = std::io::BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line).expect("status line");
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).expect("header line");
        if line.trim().is_empty() {
            break;
        }
    }
    (status, reader)
}

/// A whole HTTP request to the agent's local API.
pub fn http(address: &str, method: &str, path: &str, body: &str) -> HttpResponse {
    use std::io::Read;
    let (status, mut reader) = http_send(address, method, path, body);
    let mut body = String::new();
    reader.read_to_string(&mut body).expect("reads the body");
    HttpResponse { status, body }
}

/// A streaming request: `on_data` gets each SSE `data:` payload as it arrives.
pub fn http_sse(address: &str, path: &str, body: &str, mut on_data: impl FnMut(&str)) -> u16 {
    use std::io::BufRead;
    let (status, reader) = http_send(address, "POST", path, body);
    for line in reader.lines() {
        let line = line.expect("reads the stream");
        if let Some(data) = line.strip_prefix("data: ") {
            on_data(data);
        }
    }
    status
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill(&mut child, libc::SIGTERM);
        }
    }
}

/// A tokio runtime for the raw gRPC parts of a test.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A gRPC codec that sends and receives raw bytes, to put malformed messages on the
/// wire the way a broken or hostile client would.
#[derive(Default, Clone, Copy)]
pub struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Self::Error> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, Self::Error> {
        use bytes::Buf;
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

/// Sends `body` as the request message of `path` (e.g. "/nanofleet.v1.Enrollment/Enroll").
pub async fn raw_unary(
    channel: tonic::transport::Channel,
    path: &'static str,
    body: Vec<u8>,
) -> Result<Vec<u8>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel).max_encoding_message_size(64 * 1024 * 1024);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    grpc.unary(
        tonic::Request::new(body),
        http::uri::PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .map(tonic::Response::into_inner)
}

/// The reference model (SmolLM2-135M-Instruct GGUF) that tests/run.sh fetches and names in
/// `NANOFLEET_TEST_GGUF`.
pub fn reference_model() -> PathBuf {
    std::env::var_os("NANOFLEET_TEST_GGUF")
        .map(PathBuf::from)
        .expect("NANOFLEET_TEST_GGUF must name the reference model: run the tests with tests/run.sh, or set it to deploy/fetch-model.sh's output")
}

/// A tiny random model that loads and answers (llama architecture, byte-level tokenizer,
/// ChatML), about 150 KiB; `seed` picks the weights, so different seeds are different files.
pub fn tiny_gguf(seed: u8) -> Vec<u8> {
    model_bytes(seed, |path, architecture, tokenizer, seed| {
        nanofleet_inference::tiny::write_tiny_model(path, architecture, tokenizer, seed)
    })
}

/// Like [`tiny_gguf`], but its weights are broken (NaN): signed and well-formed, it loads
/// and fails the smoke prompt.
pub fn broken_tiny_gguf(seed: u8) -> Vec<u8> {
    model_bytes(seed, |path, architecture, tokenizer, seed| {
        nanofleet_inference::tiny::write_broken_tiny_model(path, architecture, tokenizer, seed)
    })
}

fn model_bytes(
    seed: u8,
    write: fn(
        &Path,
        nanofleet_inference::Architecture,
        nanofleet_inference::tiny::TinyTokenizer,
        u64,
    ) -> nanofleet_inference::Result<()>,
) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("model.gguf");
    write(
        &file,
        nanofleet_inference::Architecture::Llama,
        nanofleet_inference::tiny::TinyTokenizer::ByteLevel,
        u64::from(seed),
    )
    .expect("writes the tiny model");
    std::fs::read(&file).expect("reads the tiny model")
}

/// An operator-service client that presents `tls` (for checking who may call it).
pub async fn connect_node_operator_client(
    coordinator: &Coordinator,
    tls: ClientTls,
) -> nanofleet_proto::v1::operator_service_client::OperatorServiceClient<tonic::transport::Channel>
{
    let channel = nanofleet_transport::connect(&coordinator.url(), &tls)
        .await
        .expect("connects");
    nanofleet_proto::v1::operator_service_client::OperatorServiceClient::new(channel)
}

/// The stdout of a command that must succeed; panics with its stderr otherwise.
pub fn ok(output: &Output) -> String {
    assert!(
        output.status.success(),
        "command failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A path as a command-line argument.
pub fn path(p: &Path) -> String {
    p.display().to_string()
}
