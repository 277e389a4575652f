//! `nanofleet-fleetsim`: many lightweight simulated agents in one process against a real
//! coordinator. Each simulated agent has its own device key, enrolls with its own
//! token, holds its own mutual-TLS connection with a command stream, and heartbeats on
//! the coordinator's interval. No inference runs. Prints a table of what it measured.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use nanofleet_proto::v1 as pb;
use nanofleet_proto::v1::node_service_client::NodeServiceClient;
use nanofleet_proto::v1::operator_service_client::OperatorServiceClient;
use nanofleet_transport::ClientTls;
use rand::Rng;
use tokio::sync::Mutex;

#[derive(Parser)]
#[command(
    name = "nanofleet-fleetsim",
    about = "Simulate a fleet of agents against a coordinator"
)]
struct Cli {
    /// Coordinator gRPC URL.
    #[arg(long)]
    coordinator: String,
    /// Operator credentials directory (ca.crt, operator.crt, operator.key), used to
    /// create one bootstrap token per simulated agent.
    #[arg(long)]
    operator_dir: PathBuf,
    /// Number of simulated agents.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// How long to heartbeat after every agent has enrolled, seconds.
    #[arg(long, default_value_t = 60)]
    duration_secs: u64,
    /// Enrollments in flight at once.
    #[arg(long, default_value_t = 16)]
    enroll_concurrency: usize,
    /// Coordinator process id, to report its CPU time and peak RSS from /proc.
    #[arg(long)]
    coordinator_pid: Option<u32>,
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz)
}

/// A `/proc/<pid>/status` field in KiB, e.g. "VmHWM" (peak RSS) or "VmRSS".
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[index]) / 1000.0
}

fn simulated_facts(index: usize) -> pb::DeviceFacts {
    pb::DeviceFacts {
        arch: if index.is_multiple_of(3) {
            "aarch64"
        } else {
            "x86_64"
        }
        .to_owned(),
        cpu_cores: 4,
        memory_total_bytes: 2 << 30,
        memory_available_bytes: 1 << 30,
        power_source: pb::PowerSource::Mains as i32,
        os: "Linux".to_owned(),
        agent_version: concat!(env!("CARGO_PKG_VERSION"), "-sim").to_owned(),
        hostname: format!("sim-{index}"),
        labels: [("fleetsim".to_owned(), "true".to_owned())].into(),
        ..Default::default()
    }
}

#[derive(Default)]
struct Samples {
    heartbeat_micros: Vec<u32>,
    errors: u64,
}

/// One simulated agent: heartbeats until `stop`, recording latencies after `measure_from`.
async fn simulate(
    index: usize,
    identity: nanofleet_agent::identity::Identity,
    measure_from: Instant,
    stop: Instant,
    samples: Arc<Mutex<Samples>>,
) -> anyhow::Result<()> {
    let channel =
        nanofleet_transport::connect(&identity.coordinator, &identity.client_tls()).await?;
    let mut client = NodeServiceClient::new(channel);
    let mut stream = client
        .subscribe(pb::SubscribeRequest {})
        .await?
        .into_inner();
    let interval = match stream.message().await?.and_then(|c| c.body) {
        Some(pb::command::Body::Welcome(w)) => {
            Duration::from_secs(u64::from(w.heartbeat_interval_secs.max(1)))
        }
        _ => anyhow::bail!("no welcome on the command stream"),
    };
    // Keep draining commands so the stream stays healthy.
    tokio::spawn(async move { while let Ok(Some(_)) = stream.message().await {} });
    // Spread agents over the interval, as a real fleet's clocks would be.
    let phase = rand::thread_rng().gen_range(Duration::ZERO..interval);
    let mut next = tokio::time::Instant::now() + phase;
    let mut sequence = 0;
    let facts = simulated_facts(index);
    while Instant::now() < stop {
        tokio::time::sleep_until(next).await;
        next += interval;
        sequence += 1;
        let started = Instant::now();
        let result = client
            .heartbeat(pb::HeartbeatRequest {
                facts: Some(facts.clone()),
                sequence,
            })
            .await;
        let micros = started.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
        if started >= measure_from {
            let mut samples = samples.lock().await;
            match result {
                Ok(_) => samples.heartbeat_micros.push(micros),
                Err(_) => samples.errors += 1,
            }
        }
    }
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    nanofleet_transport::raise_open_file_limit();
    let read = |name: &str| {
        let path = cli.operator_dir.join(name);
        std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
    };
    let ca_pem = read("ca.crt")?;
    let operator_tls = ClientTls {
        ca_pem: ca_pem.clone(),
        identity: Some((read("operator.crt")?, read("operator.key")?)),
    };
    let operator_channel = nanofleet_transport::connect(&cli.coordinator, &operator_tls).await?;
    let mut operator = OperatorServiceClient::new(operator_channel);

    // Enrollment: one token and one fresh device key per agent.
    let enroll_started = Instant::now();
    let semaphore = Arc::new(tokio::sync::Semaphore::new(cli.enroll_concurrency));
    let mut enrollments = Vec::with_capacity(cli.agents);
    for index in 0..cli.agents {
        let token = operator
            .create_token(pb::CreateTokenRequest {
                ttl_secs: 3600,
                labels: [("fleet".to_owned(), "sim".to_owned())].into(),
            })
            .await?
            .into_inner()
            .token;
        let permit = semaphore.clone().acquire_owned().await?;
        let coordinator = cli.coordinator.clone();
        let ca_pem = ca_pem.clone();
        enrollments.push(tokio::spawn(async move {
            let _permit = permit;
            nanofleet_agent::enroll::enroll(&coordinator, ca_pem, &token, simulated_facts(index))
                .await
        }));
    }
    let mut identities = Vec::with_capacity(cli.agents);
    for enrollment in enrollments {
        identities.push(enrollment.await??);
    }
    let enroll_secs = enroll_started.elapsed().as_secs_f64();

    // Heartbeats: the first interval warms up connections; measure after it.
    let samples = Arc::new(Mutex::new(Samples::default()));
    let warmup = Duration::from_secs(12);
    let measure_from = Instant::now() + warmup;
    let stop = measure_from + Duration::from_secs(cli.duration_secs);
    let cpu_start = cli.coordinator_pid.and_then(cpu_seconds);
    let mut agents = Vec::with_capacity(identities.len());
    for (index, identity) in identities.into_iter().enumerate() {
        agents.push(tokio::spawn(simulate(
            index,
            identity,
            measure_from,
            stop,
            samples.clone(),
        )));
    }
    let mut failed_agents = 0;
    for agent in agents {
        if !matches!(agent.await, Ok(Ok(()))) {
            failed_agents += 1;
        }
    }
    let cpu_end = cli.coordinator_pid.and_then(cpu_seconds);

    let mut samples = std::mem::take(&mut *samples.lock().await);
    samples.heartbeat_micros.sort_unstable();
    let measured = stop.saturating_duration_since(measure_from).as_secs_f64();
    println!("| metric | value |");
    println!("|---|---|");
    println!("| simulated agents | {} |", cli.agents);
    println!(
        "| enrollment | {:.1} s ({:.0} agents/s) |",
        enroll_secs,
        cli.agents as f64 / enroll_secs
    );
    println!("| measured window | {measured:.0} s |");
    println!(
        "| heartbeats ok / errors | {} / {} |",
        samples.heartbeat_micros.len(),
        samples.errors
    );
    println!("| agents failed | {failed_agents} |");
    println!(
        "| heartbeat p50 | {:.2} ms |",
        percentile(&samples.heartbeat_micros, 0.50)
    );
    println!(
        "| heartbeat p99 | {:.2} ms |",
        percentile(&samples.heartbeat_micros, 0.99)
    );
    println!(
        "| heartbeat max | {:.2} ms |",
        percentile(&samples.heartbeat_micros, 1.0)
    );
    if let Some(pid) = cli.coordinator_pid {
        if let (Some(start), Some(end)) = (cpu_start, cpu_end) {
            let window = measured + warmup.as_secs_f64();
            println!(
                "| coordinator CPU while heartbeating | {:.1}% of one core ({:.2} s over {:.0} s) |",
                100.0 * (end - start) / window,
                end - start,
                window
            );
        }
        if let Some(peak) = status_kib(pid, "VmHWM") {
            println!("| coordinator peak RSS | {:.1} MiB |", peak as f64 / 1024.0);
        }
    }
    if failed_agents > 0 || samples.errors > 0 {
        anyhow::bail!(
            "{failed_agents} agents failed and {} heartbeats errored",
            samples.errors
        );
    }
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime starts");
    if let Err(error) = runtime.block_on(run(cli)) {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}
