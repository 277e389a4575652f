//! `nanofleet-fleetsim`: many lightweight simulated agents in one process against a real
//! coordinator. Each simulated agent has its own device key, enrolls with its own
//! token, holds its own mutual-TLS connection with a command stream, and heartbeats on
//! the coordinator's interval. No inference runs.
//!
//! With `--rollout`, the simulator then acts as the operator: after the steady phase it
//! rolls a published artifact out to every simulated agent, in waves that the
//! coordinator starts as the previous one reports healthy. Each agent hands its
//! assignment to the agent's own artifact worker, as a store-only agent does: the signed
//! manifest is verified against the agent's trust policy, the chunks are fetched and
//! checked, the version is activated on disk and its health reported. Heartbeats go on
//! throughout. The run ends with a table of what was measured, the benchmark's targets
//! beside the values; `sample-model` writes a small file to publish for the rollout.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use nanofleet_agent::artifacts::ArtifactManager;
use nanofleet_agent::identity::Identity;
use nanofleet_agent::session::artifact_worker;
use nanofleet_artifact::trust::TrustPolicy;
use nanofleet_proto::v1 as pb;
use nanofleet_proto::v1::node_service_client::NodeServiceClient;
use nanofleet_proto::v1::operator_service_client::OperatorServiceClient;
use nanofleet_transport::ClientTls;
use rand::Rng;
use tokio::sync::{mpsc, watch};
use tonic::transport::Channel;

/// The benchmark's targets (issue 8), printed beside what was measured.
const TARGET_HEARTBEAT_P99_MS: f64 = 100.0;
const TARGET_ALL_ASSIGNED_SECS: f64 = 60.0;
const TARGET_PEAK_RSS_BYTES: u64 = 1_000_000_000;

/// How often the driver asks the coordinator how the rollout stands.
const ROLLOUT_POLL: Duration = Duration::from_secs(2);

#[derive(Parser)]
#[command(
    name = "nanofleet-fleetsim",
    about = "Simulate a fleet of agents against a coordinator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Enroll the simulated fleet, heartbeat, optionally roll an artifact out to it, and
    /// print what was measured.
    Run(RunArgs),
    /// Write a small well-formed GGUF file (not a model that loads) to publish for a
    /// rollout to the simulated fleet, whose agents keep artifacts without serving them.
    SampleModel {
        out: PathBuf,
        /// Rows of each of its two tensors, 34 bytes a row.
        #[arg(long, default_value_t = 64)]
        rows: u64,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Coordinator gRPC URL.
    #[arg(long)]
    coordinator: String,
    /// Operator credentials directory (ca.crt, operator.crt, operator.key), used to
    /// create one bootstrap token per simulated agent and to run the rollout.
    #[arg(long)]
    operator_dir: PathBuf,
    /// Number of simulated agents.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// How long to heartbeat before the rollout (or alone), seconds, counted from one
    /// heartbeat interval after every command stream is open.
    #[arg(long, default_value_t = 60)]
    duration_secs: u64,
    /// Enrollments in flight at once.
    #[arg(long, default_value_t = 16)]
    enroll_concurrency: usize,
    /// Coordinator process id, to report its CPU time and peak RSS from /proc.
    #[arg(long)]
    coordinator_pid: Option<u32>,
    /// A published artifact, NAME@VERSION, to roll out to the simulated fleet after the
    /// steady phase.
    #[arg(long, requires_all = ["trust_policy", "artifact_dir"])]
    rollout: Option<String>,
    /// Cumulative wave sizes of the rollout in percent of the fleet, ending at 100.
    #[arg(long, value_delimiter = ',', default_value = "1,10,100")]
    waves: Vec<u32>,
    /// The rollout's pace: at most this many agents of a wave assigned per second
    /// (`nanofleet rollout create --max-per-second`); 0 = each wave at once.
    #[arg(long, default_value_t = 0)]
    max_per_second: u32,
    /// The simulated agents' trust policy (JSON, as `nanofleet-coordinator trust` writes
    /// it): the keys whose signed manifests they accept.
    #[arg(long)]
    trust_policy: Option<PathBuf>,
    /// Where the simulated agents keep the artifacts they fetch, one directory each.
    #[arg(long)]
    artifact_dir: Option<PathBuf>,
    /// How long to wait for the rollout to complete, seconds.
    #[arg(long, default_value_t = 300)]
    rollout_timeout_secs: u64,
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

/// The `p` quantile of sorted latencies in microseconds, in milliseconds.
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

/// One heartbeat call of a simulated agent.
struct Heartbeat {
    started: Instant,
    micros: u32,
    ok: bool,
}

/// Assignments applied at once across the simulated fleet. Real devices each have their own
/// disk and descriptor table; here one process shares a descriptor limit (commonly 20,000
/// hard, with one socket per agent already), so the file work of a 10,000-node wave is
/// queued. The time an assignment arrives is recorded before this queue.
const CONCURRENT_APPLIES: usize = 512;

/// What the simulated agents record, shared with the driver.
struct Fleet {
    heartbeats: Mutex<Vec<Heartbeat>>,
    /// Agents whose command stream is open.
    connected: AtomicUsize,
    /// The heartbeat interval the coordinator's welcome named, seconds.
    interval_secs: AtomicU64,
    /// When each agent received its first assignment, in arrival order.
    assigned: Mutex<Vec<Instant>>,
    /// Permits to apply an assignment (see [`CONCURRENT_APPLIES`]).
    applying: Arc<tokio::sync::Semaphore>,
}

impl Default for Fleet {
    fn default() -> Self {
        Self {
            heartbeats: Mutex::default(),
            connected: AtomicUsize::default(),
            interval_secs: AtomicU64::default(),
            assigned: Mutex::default(),
            applying: Arc::new(tokio::sync::Semaphore::new(CONCURRENT_APPLIES)),
        }
    }
}

/// One simulated agent: opens its command stream, hands each assignment to the agent's
/// artifact worker (`artifacts` is `None` without a rollout), and heartbeats until
/// `stop` changes.
async fn simulate(
    index: usize,
    identity: Identity,
    artifacts: Option<Arc<ArtifactManager>>,
    fleet: Arc<Fleet>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let channel =
        nanofleet_transport::connect(&identity.coordinator, &identity.client_tls()).await?;
    let mut client = NodeServiceClient::new(channel)
        .max_decoding_message_size(nanofleet_transport::MAX_COMMAND_BYTES);
    let mut stream = client
        .subscribe(pb::SubscribeRequest {})
        .await?
        .into_inner();
    let interval = match stream.message().await?.and_then(|c| c.body) {
        Some(pb::command::Body::Welcome(w)) => u64::from(w.heartbeat_interval_secs.max(1)),
        _ => anyhow::bail!("no welcome on the command stream"),
    };
    fleet.interval_secs.store(interval, Ordering::Relaxed);
    fleet.connected.fetch_add(1, Ordering::Relaxed);
    let interval = Duration::from_secs(interval);

    let (worker_client, receiving) = (client.clone(), fleet.clone());
    tokio::spawn(async move {
        let mut first = true;
        while let Ok(Some(command)) = stream.message().await {
            if let Some(pb::command::Body::Assign(assign)) = command.body {
                if std::mem::take(&mut first) {
                    receiving.assigned.lock().unwrap().push(Instant::now());
                }
                // Without artifacts (no rollout asked for) the assignment is dropped.
                let Some(artifacts) = artifacts.clone() else {
                    continue;
                };
                let Ok(_permit) = receiving.applying.clone().acquire_owned().await else {
                    return;
                };
                // The agent's own worker, for this one job: it ends when the queue closes.
                let (jobs, queue) = mpsc::channel(1);
                let _ = jobs.send((assign, worker_client.clone())).await;
                drop(jobs);
                artifact_worker(artifacts, queue).await;
            }
        }
    });

    // Spread agents over the interval, as a real fleet's clocks would be.
    let phase = rand::thread_rng().gen_range(Duration::ZERO..interval);
    let mut next = tokio::time::Instant::now() + phase;
    let mut sequence = 0;
    let facts = simulated_facts(index);
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = stop.changed() => return Ok(()),
        }
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
        fleet.heartbeats.lock().unwrap().push(Heartbeat {
            started,
            micros,
            ok: result.is_ok(),
        });
    }
}

/// Latencies of the successful heartbeats that started in `from..to`, sorted, and the
/// number that failed there.
fn heartbeat_window(heartbeats: &[Heartbeat], from: Instant, to: Instant) -> (Vec<u32>, usize) {
    let in_window = || {
        heartbeats
            .iter()
            .filter(move |h| h.started >= from && h.started < to)
    };
    let mut micros: Vec<u32> = in_window().filter(|h| h.ok).map(|h| h.micros).collect();
    micros.sort_unstable();
    (micros, in_window().filter(|h| !h.ok).count())
}

/// The rollout to the simulated fleet, as it went.
struct RolloutOutcome {
    id: String,
    /// The artifact and its size, for the table.
    artifact: String,
    targets: usize,
    /// When CreateRollout was sent, and when the driver saw the rollout end (or gave up).
    started: Instant,
    ended: Instant,
    /// Agents that received the assignment, and when the last of them did.
    assigned: usize,
    last_assigned: Option<Instant>,
    state: String,
    reason: String,
    /// Bytes of the artifact the agents fetched, as they reported.
    bytes_fetched: u64,
    /// From CreateRollout to the coordinator's record that the rollout completed.
    completed_after: Option<Duration>,
}

/// Creates the rollout to the nodes `selector` picks (the simulated fleet) and waits
/// until it is no longer running or the timeout has passed.
async fn roll_out(
    operator: &mut OperatorServiceClient<Channel>,
    artifact: &str,
    selector: &str,
    args: &RunArgs,
    fleet: &Fleet,
) -> anyhow::Result<RolloutOutcome> {
    let (name, version) = artifact
        .split_once('@')
        .context("give the rollout's artifact as NAME@VERSION")?;
    let published = operator
        .get_artifact(pb::GetArtifactRequest {
            name: name.to_owned(),
            version: version.to_owned(),
        })
        .await
        .with_context(|| format!("looking up {artifact}"))?
        .into_inner();
    let started = Instant::now();
    let started_unix_ms = nanofleet_agent::now_unix_ms();
    let mut rollout = operator
        .create_rollout(pb::CreateRolloutRequest {
            artifact: artifact.to_owned(),
            selector: selector.to_owned(),
            waves: args.waves.clone(),
            // Store-only agents answer no smoke prompt; the coordinator's wave timeout.
            gate: None,
            max_per_second: args.max_per_second,
        })
        .await
        .context("creating the rollout")?
        .into_inner();
    let deadline = started + Duration::from_secs(args.rollout_timeout_secs);
    while rollout.state == "running" && Instant::now() < deadline {
        tokio::time::sleep(ROLLOUT_POLL.min(deadline - Instant::now())).await;
        rollout = operator
            .get_rollout(pb::RolloutRef {
                id: rollout.id.clone(),
            })
            .await
            .context("asking how the rollout stands")?
            .into_inner();
    }
    let ended = Instant::now();
    // The coordinator's own record dates the completion more finely than the polling.
    let completed_after = if rollout.state == "completed" {
        let record = format!("rollout {}", rollout.id);
        operator
            .list_events(pb::ListEventsRequest {
                action_prefix: "rollout.complete".to_owned(),
            })
            .await
            .context("reading the rollout's completion record")?
            .into_inner()
            .events
            .iter()
            .find(|event| event.reason == record)
            .map(
                |event| Duration::from_millis((event.time_unix_ms - started_unix_ms).max(0) as u64),
            )
    } else {
        None
    };
    let assigned = fleet.assigned.lock().unwrap();
    Ok(RolloutOutcome {
        id: rollout.id,
        artifact: format!(
            "{artifact} ({} bytes in {} chunks)",
            published.size, published.chunk_count
        ),
        targets: rollout.waves.iter().map(|w| w.nodes.len()).sum(),
        bytes_fetched: rollout
            .waves
            .iter()
            .flat_map(|w| &w.nodes)
            .map(|n| n.bytes_fetched)
            .sum(),
        started,
        ended,
        assigned: assigned.len(),
        last_assigned: assigned.iter().max().copied(),
        state: rollout.state,
        reason: rollout.reason,
        completed_after,
    })
}

/// Where each phase of the run began, with the coordinator's CPU time then.
struct Phases {
    coordinator_pid: Option<u32>,
    marks: Vec<(&'static str, Instant, Option<f64>)>,
}

impl Phases {
    fn new(coordinator_pid: Option<u32>) -> Self {
        Self {
            coordinator_pid,
            marks: Vec::new(),
        }
    }

    /// Ends the phase before (if any) and begins `phase`.
    fn begin(&mut self, phase: &'static str) -> Instant {
        let now = Instant::now();
        let cpu = self.coordinator_pid.and_then(cpu_seconds);
        self.marks.push((phase, now, cpu));
        now
    }

    /// Each phase that has ended: its name, length in seconds, and the coordinator's
    /// CPU seconds in it.
    fn ended(&self) -> impl Iterator<Item = (&'static str, f64, Option<f64>)> + '_ {
        self.marks.windows(2).map(|pair| {
            let ((phase, start, cpu_start), (_, end, cpu_end)) = (pair[0], pair[1]);
            let cpu = cpu_end.zip(cpu_start).map(|(end, start)| end - start);
            (phase, end.duration_since(start).as_secs_f64(), cpu)
        })
    }
}

/// The printed result: one row per measurement, with the target where the benchmark
/// sets one and whether it was met.
#[derive(Default)]
struct Table {
    rows: Vec<[String; 4]>,
    /// Targets not met.
    missed: Vec<String>,
    /// What went wrong besides: failed agents or heartbeats, a rollout that did not end.
    problems: Vec<String>,
}

impl Table {
    fn row(&mut self, metric: &str, value: String) {
        self.rows
            .push([metric.to_owned(), value, String::new(), String::new()]);
    }

    fn target(&mut self, metric: &str, value: String, target: &str, met: bool) {
        if !met {
            self.missed.push(metric.to_owned());
        }
        let verdict = if met { "pass" } else { "FAIL" };
        self.rows
            .push([metric.to_owned(), value, target.to_owned(), verdict.into()]);
    }

    fn print(&self) {
        println!("| metric | value | target | |");
        println!("|---|---|---|---|");
        for [metric, value, target, verdict] in &self.rows {
            println!("| {metric} | {value} | {target} | {verdict} |");
        }
    }

    /// Ok when nothing went wrong and every target was met.
    fn verdict(&self) -> anyhow::Result<()> {
        if !self.problems.is_empty() {
            anyhow::bail!("{}", self.problems.join("; "));
        }
        if !self.missed.is_empty() {
            anyhow::bail!("targets missed: {}", self.missed.join(", "));
        }
        Ok(())
    }
}

/// Creates one bootstrap token per agent (with `labels`) and enrolls each with a fresh
/// device key, `concurrency` at a time.
async fn enroll_fleet(
    operator: &mut OperatorServiceClient<Channel>,
    args: &RunArgs,
    ca_pem: &[u8],
    labels: HashMap<String, String>,
) -> anyhow::Result<Vec<Identity>> {
    let semaphore = Arc::new(tokio::sync::Semaphore::new(args.enroll_concurrency));
    let mut enrollments = Vec::with_capacity(args.agents);
    for index in 0..args.agents {
        let token = operator
            .create_token(pb::CreateTokenRequest {
                ttl_secs: 3600,
                labels: labels.clone(),
            })
            .await?
            .into_inner()
            .token;
        let permit = semaphore.clone().acquire_owned().await?;
        let coordinator = args.coordinator.clone();
        let ca_pem = ca_pem.to_vec();
        enrollments.push(tokio::spawn(async move {
            let _permit = permit;
            nanofleet_agent::enroll::enroll(&coordinator, ca_pem, &token, simulated_facts(index))
                .await
        }));
    }
    let mut identities = Vec::with_capacity(args.agents);
    for enrollment in enrollments {
        identities.push(enrollment.await??);
    }
    Ok(identities)
}

/// What a run measured.
struct Measured {
    enroll_secs: f64,
    connected: usize,
    connect_secs: f64,
    interval: u64,
    failed_agents: usize,
    heartbeats: Vec<Heartbeat>,
    /// The measured window: from the end of the warm-up to the end of the run.
    measure_from: Instant,
    end: Instant,
    rollout: Option<RolloutOutcome>,
    phases: Phases,
    simulator_cpu: Option<f64>,
}

impl Measured {
    fn table(&self, args: &RunArgs) -> Table {
        let Measured {
            enroll_secs,
            connected,
            connect_secs,
            interval,
            failed_agents,
            measure_from,
            end,
            ref rollout,
            ref phases,
            simulator_cpu,
            ..
        } = *self;
        let (all, errors) = heartbeat_window(&self.heartbeats, measure_from, end);
        let mut table = Table::default();
        table.row("simulated agents", args.agents.to_string());
        table.row(
            "enrollment",
            format!(
                "{enroll_secs:.1} s ({:.0} agents/s)",
                args.agents as f64 / enroll_secs
            ),
        );
        table.row(
            "command streams open",
            format!("{connected} after {connect_secs:.1} s"),
        );
        table.row(
            "heartbeats measured",
            format!(
                "{} ok, {errors} failed, over {:.0} s at a {interval} s interval",
                all.len(),
                end.duration_since(measure_from).as_secs_f64()
            ),
        );
        table.row("agents failed", failed_agents.to_string());
        if failed_agents > 0 || errors > 0 {
            table.problems.push(format!(
                "{failed_agents} agents failed and {errors} heartbeats errored"
            ));
        }
        table.row("heartbeat p50", format!("{:.2} ms", percentile(&all, 0.50)));
        let p99_target = format!("< {TARGET_HEARTBEAT_P99_MS:.0} ms");
        let p99 = percentile(&all, 0.99);
        table.target(
            "heartbeat p99",
            format!("{p99:.2} ms"),
            &p99_target,
            p99 < TARGET_HEARTBEAT_P99_MS,
        );
        if let Some(rollout) = &rollout {
            let (during, _) = heartbeat_window(&self.heartbeats, rollout.started, rollout.ended);
            let p99 = percentile(&during, 0.99);
            table.target(
                "heartbeat p99 during the rollout",
                format!("{p99:.2} ms ({} heartbeats)", during.len()),
                &p99_target,
                p99 < TARGET_HEARTBEAT_P99_MS,
            );
        }
        table.row("heartbeat max", format!("{:.2} ms", percentile(&all, 1.0)));
        if let Some(rollout) = &rollout {
            table.row(
                "rollout",
                format!(
                    "{} to {} agents in waves of {}, {}",
                    rollout.artifact,
                    rollout.targets,
                    args.waves
                        .iter()
                        .map(|percent| format!("{percent}%"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    match args.max_per_second {
                        0 => "each wave at once".to_owned(),
                        rate => format!("at most {rate} agents assigned per second"),
                    }
                ),
            );
            let all_assigned = rollout
                .last_assigned
                .filter(|_| rollout.assigned >= args.agents)
                .map(|last| last.duration_since(rollout.started).as_secs_f64());
            table.target(
                "time until every agent has the assignment",
                match all_assigned {
                    Some(secs) => format!("{secs:.2} s"),
                    None => format!("{} of {} assigned", rollout.assigned, args.agents),
                },
                &format!("< {TARGET_ALL_ASSIGNED_SECS:.0} s"),
                all_assigned.is_some_and(|secs| secs < TARGET_ALL_ASSIGNED_SECS),
            );
            table.row(
                "time until the rollout is complete",
                match rollout.completed_after {
                    Some(after) => format!(
                        "{:.2} s (every agent reported healthy)",
                        after.as_secs_f64()
                    ),
                    None => format!("{} {}", rollout.state, rollout.reason),
                },
            );
            table.row(
                "bytes the agents fetched",
                rollout.bytes_fetched.to_string(),
            );
            if rollout.state != "completed" {
                table.problems.push(format!(
                    "rollout {} did not complete: {} {}",
                    rollout.id, rollout.state, rollout.reason
                ));
            }
        }
        for (phase, secs, cpu) in phases.ended() {
            if let Some(cpu) = cpu {
                table.row(
                    &format!("coordinator CPU, {phase}"),
                    format!(
                        "{:.1}% of one core ({cpu:.2} s over {secs:.1} s)",
                        100.0 * cpu / secs
                    ),
                );
            }
        }
        if let Some(peak) = args
            .coordinator_pid
            .and_then(|pid| status_kib(pid, "VmHWM"))
        {
            table.target(
                "coordinator peak RSS",
                format!("{:.1} MiB", peak as f64 / 1024.0),
                "< 1 GB",
                peak * 1024 < TARGET_PEAK_RSS_BYTES,
            );
        }
        if let Some(cpu) = simulator_cpu {
            table.row(
                "simulator CPU, whole run",
                format!("{cpu:.1} s, on the same cores as the coordinator"),
            );
        }
        table
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    nanofleet_transport::raise_open_file_limit();
    let read = |name: &str| {
        let path = args.operator_dir.join(name);
        std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
    };
    let ca_pem = read("ca.crt")?;
    let operator_tls = ClientTls {
        ca_pem: ca_pem.clone(),
        identity: Some((read("operator.crt")?, read("operator.key")?)),
    };
    let operator_channel = nanofleet_transport::connect(&args.coordinator, &operator_tls).await?;
    let mut operator = OperatorServiceClient::new(operator_channel);
    let trust = match &args.trust_policy {
        Some(path) => Some(
            TrustPolicy::from_json(
                &std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
            )
            .with_context(|| format!("{} is not a trust policy", path.display()))?,
        ),
        None => None,
    };
    let simulator_cpu = cpu_seconds(std::process::id());
    let mut phases = Phases::new(args.coordinator_pid);

    // This run's own label keeps the rollout to this run's agents on a coordinator that
    // has seen others.
    let run_label = format!("{:08x}", rand::random::<u32>());
    let selector = format!("fleet=sim,fleetsim-run={run_label}");
    let labels = [
        ("fleet".to_owned(), "sim".to_owned()),
        ("fleetsim-run".to_owned(), run_label),
    ]
    .into();
    let enroll_started = phases.begin("enrollment");
    let identities = enroll_fleet(&mut operator, &args, &ca_pem, labels).await?;
    let enroll_secs = enroll_started.elapsed().as_secs_f64();

    // Every agent opens its command stream, then heartbeats. The first interval after
    // the last stream opened is warm-up; measuring starts after it.
    let connect_started = phases.begin("connections and warm-up");
    let fleet = Arc::new(Fleet::default());
    let (stop, stopped) = watch::channel(false);
    let mut agents = Vec::with_capacity(identities.len());
    for (index, identity) in identities.into_iter().enumerate() {
        let artifacts = match (&args.artifact_dir, &trust) {
            (Some(dir), Some(trust)) => Some(Arc::new(ArtifactManager::new(
                &dir.join(format!("agent-{index}")),
                Some(trust.clone()),
                0,
            ))),
            _ => None,
        };
        agents.push(tokio::spawn(simulate(
            index,
            identity,
            artifacts,
            fleet.clone(),
            stopped.clone(),
        )));
    }
    let settled = |agents: &[tokio::task::JoinHandle<_>]| {
        fleet.connected.load(Ordering::Relaxed) + agents.iter().filter(|a| a.is_finished()).count()
    };
    while settled(&agents) < args.agents {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let connect_secs = connect_started.elapsed().as_secs_f64();
    let interval = fleet.interval_secs.load(Ordering::Relaxed).max(1);
    tokio::time::sleep(Duration::from_secs(interval + 2)).await;

    let measure_from = phases.begin("steady heartbeats");
    tokio::time::sleep(Duration::from_secs(args.duration_secs)).await;
    let rollout = match &args.rollout {
        Some(artifact) => {
            phases.begin("the rollout");
            Some(roll_out(&mut operator, artifact, &selector, &args, &fleet).await?)
        }
        None => None,
    };
    let end = phases.begin("end");
    let _ = stop.send(true);
    let mut failed_agents = 0;
    for agent in agents {
        if !matches!(agent.await, Ok(Ok(()))) {
            failed_agents += 1;
        }
    }
    let simulator_cpu = cpu_seconds(std::process::id())
        .zip(simulator_cpu)
        .map(|(end, start)| end - start);

    let measured = Measured {
        enroll_secs,
        connected: fleet.connected.load(Ordering::Relaxed),
        connect_secs,
        interval,
        failed_agents,
        heartbeats: std::mem::take(&mut *fleet.heartbeats.lock().unwrap()),
        measure_from,
        end,
        rollout,
        phases,
        simulator_cpu,
    };
    let table = measured.table(&args);
    table.print();
    table.verdict()
}

fn main() {
    let result = match Cli::parse().command {
        Command::SampleModel { out, rows } => {
            let bytes = nanofleet_artifact::gguf::sample_gguf("llama", 1, rows);
            std::fs::write(&out, bytes).with_context(|| format!("writing {}", out.display()))
        }
        Command::Run(args) => {
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime starts");
            runtime.block_on(run(args))
        }
    };
    if let Err(error) = result {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}
