//! `nanofleet federation|round|adapter`: federated LoRA training from the operator's side.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use nanofleet_proto::v1 as pb;
use serde_json::json;

use crate::{client, status_error, time_text, Cli};

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub enum FederationCommand {
    /// Define a federation: base model, adapter, who may train, how rounds run.
    Create {
        name: String,
        /// The base model artifact, name@version; nodes must hold it.
        #[arg(long)]
        base: String,
        #[arg(long, default_value_t = 8)]
        rank: u32,
        #[arg(long, default_value_t = 16.0)]
        alpha: f64,
        #[arg(long, default_value_t = 0.0)]
        dropout: f64,
        /// Target modules: q, k, v, o, gate, up, down.
        #[arg(long, default_value = "q,v", value_delimiter = ',')]
        targets: Vec<String>,
        /// fedavg (A and B averaged by example count) or exact (FFA-LoRA: A frozen).
        #[arg(long, default_value = "fedavg")]
        mode: String,
        /// Seeds the initial adapter on every node; random when not given.
        #[arg(long)]
        seed: Option<u64>,
        #[arg(long, default_value_t = 2)]
        min_clients: u32,
        #[arg(long, default_value_t = 100)]
        max_clients: u32,
        #[arg(long, default_value_t = 0)]
        min_free_memory_mib: u64,
        /// Battery nodes train only while charging at or above this percentage.
        #[arg(long, default_value_t = 50.0)]
        min_battery: f32,
        /// Optimizer steps per node and round.
        #[arg(long, default_value_t = 20)]
        steps: u32,
        #[arg(long, default_value_t = 1e-3)]
        learning_rate: f64,
        #[arg(long, default_value_t = 4)]
        batch_size: u32,
        #[arg(long, default_value_t = 256)]
        max_seq_len: u32,
        /// L2 bound each node clips its update to.
        #[arg(long, default_value_t = 10.0)]
        clip_norm: f64,
        /// Successful training rounds to run.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Deadline of each round, e.g. 10m.
        #[arg(long, default_value = "10m")]
        round_timeout: humantime::Duration,
        #[arg(long, default_value_t = 3)]
        max_failed_rounds: u32,
        /// Aggregate in the clear instead of by SecAgg+ (control runs, single-node tests).
        #[arg(long)]
        plaintext: bool,
        /// SecAgg+ neighbourhood size; 0 = every selected node (full SecAgg).
        #[arg(long, default_value_t = 0)]
        group_size: u32,
        /// Deadline of each secure-aggregation stage after training, e.g. 60s.
        #[arg(long, default_value = "60s")]
        stage_timeout: humantime::Duration,
        /// A node's weight is min(examples, weight_cap) / weight_cap.
        #[arg(long, default_value_t = 1000)]
        weight_cap: u64,
        /// Differential privacy: Gaussian noise multiplier z (std z × clip_norm on the sum); 0 = none.
        #[arg(long, default_value_t = 0.0)]
        noise_multiplier: f64,
        /// Nodes add the noise in shares (distributed DP) instead of the coordinator once.
        #[arg(long)]
        distributed_noise: bool,
        /// Stop before a round that would bring total epsilon above this; 0 = no budget.
        #[arg(long, default_value_t = 0.0)]
        epsilon_budget: f64,
        #[arg(long, default_value_t = 1e-5)]
        delta: f64,
    },
    List,
    Show {
        name: String,
    },
}

#[derive(Subcommand)]
pub enum RoundCommand {
    /// Start the federation's rounds; they follow one another until the schedule is done.
    Start { federation: String },
    /// The federation's rounds: participants, held-out loss, exact match.
    Status { federation: String },
}

#[derive(Subcommand)]
pub enum AdapterCommand {
    /// Sign a global adapter with the coordinator's adapter key and publish it as an
    /// artifact (roll it out with `rollout create`).
    Publish {
        /// FEDERATION (latest global adapter) or FEDERATION@ROUND.
        adapter: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        version: String,
        #[arg(long, default_value = "apache-2.0")]
        license: String,
        /// Refuse unless the nodes' held-out loss of this adapter is at most this.
        #[arg(long)]
        max_eval_loss: Option<f64>,
        /// Refuse unless its held-out exact match is at least this (0 to 1).
        #[arg(long)]
        min_exact_match: Option<f64>,
    },
    /// Write a global adapter where Hugging Face PEFT loads it.
    Export {
        /// FEDERATION (latest global adapter) or FEDERATION@ROUND.
        adapter: String,
        #[arg(long, default_value = "peft")]
        format: String,
        dir: PathBuf,
    },
}

pub async fn federation(cli: &Cli, command: &FederationCommand) -> anyhow::Result<()> {
    let mut client = client(cli).await?;
    let fed = match command {
        FederationCommand::Create {
            name,
            base,
            rank,
            alpha,
            dropout,
            targets,
            mode,
            seed,
            min_clients,
            max_clients,
            min_free_memory_mib,
            min_battery,
            steps,
            learning_rate,
            batch_size,
            max_seq_len,
            clip_norm,
            rounds,
            round_timeout,
            max_failed_rounds,
            plaintext,
            group_size,
            stage_timeout,
            weight_cap,
            noise_multiplier,
            distributed_noise,
            epsilon_budget,
            delta,
        } => {
            let (base_name, base_version) = base
                .split_once('@')
                .context("give the base model as name@version")?;
            let mode = match mode.as_str() {
                "fedavg" => pb::AggregationMode::Fedavg,
                "exact" => pb::AggregationMode::Exact,
                other => anyhow::bail!("mode {other:?}: use fedavg or exact"),
            };
            client
                .create_federation(pb::CreateFederationRequest {
                    name: name.clone(),
                    base_name: base_name.to_owned(),
                    base_version: base_version.to_owned(),
                    adapter: Some(pb::AdapterSpec {
                        rank: *rank,
                        alpha: *alpha,
                        dropout: *dropout,
                        targets: targets.clone(),
                        mode: mode as i32,
                        init_seed: seed.unwrap_or_else(rand::random),
                    }),
                    selection: Some(pb::SelectionPolicy {
                        min_clients: *min_clients,
                        max_clients: *max_clients,
                        min_free_memory_bytes: min_free_memory_mib * 1024 * 1024,
                        min_battery_percent: *min_battery,
                    }),
                    plan: Some(pb::TrainingPlan {
                        steps: *steps,
                        learning_rate: *learning_rate,
                        batch_size: *batch_size,
                        max_seq_len: *max_seq_len,
                        clip_norm: *clip_norm,
                    }),
                    rounds: *rounds,
                    round_timeout_secs: round_timeout.as_secs() as u32,
                    max_failed_rounds: *max_failed_rounds,
                    plaintext: *plaintext,
                    secagg: Some(pb::SecAggOptions {
                        group_size: *group_size,
                        stage_timeout_secs: stage_timeout.as_secs() as u32,
                        weight_cap: *weight_cap,
                    }),
                    privacy: Some(pb::PrivacyOptions {
                        noise_multiplier: *noise_multiplier,
                        distributed: *distributed_noise,
                        epsilon_budget: *epsilon_budget,
                        delta: *delta,
                    }),
                })
                .await
        }
        FederationCommand::Show { name } => {
            client
                .get_federation(pb::FederationRef { name: name.clone() })
                .await
        }
        FederationCommand::List => {
            let feds = client
                .list_federations(pb::ListFederationsRequest {})
                .await
                .map_err(status_error)?
                .into_inner()
                .federations;
            if cli.json {
                let list: Vec<_> = feds.iter().map(federation_json).collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                for f in &feds {
                    println!(
                        "{:<24} {:<10} base {}@{}  global round {}  {}",
                        f.name,
                        state_name(f.state),
                        f.base_name,
                        f.base_version,
                        f.global_round,
                        f.reason
                    );
                }
            }
            return Ok(());
        }
    };
    print_federation(&fed.map_err(status_error)?.into_inner(), cli.json)
}

pub async fn round(cli: &Cli, command: &RoundCommand) -> anyhow::Result<()> {
    let mut client = client(cli).await?;
    let fed = match command {
        RoundCommand::Start { federation } => {
            client
                .start_round(pb::FederationRef {
                    name: federation.clone(),
                })
                .await
        }
        RoundCommand::Status { federation } => {
            client
                .get_federation(pb::FederationRef {
                    name: federation.clone(),
                })
                .await
        }
    };
    print_federation(&fed.map_err(status_error)?.into_inner(), cli.json)
}

/// `FEDERATION` or `FEDERATION@ROUND` (0 = the latest global adapter).
fn federation_round(adapter: &str) -> anyhow::Result<(&str, u32)> {
    Ok(match adapter.split_once('@') {
        Some((f, r)) => (f, r.parse().context("the round after @ must be a number")?),
        None => (adapter, 0),
    })
}

pub async fn adapter(cli: &Cli, command: &AdapterCommand) -> anyhow::Result<()> {
    let (adapter, format, dir) = match command {
        AdapterCommand::Export {
            adapter,
            format,
            dir,
        } => (adapter, format, dir),
        AdapterCommand::Publish {
            adapter,
            name,
            version,
            license,
            max_eval_loss,
            min_exact_match,
        } => {
            let (federation, round) = federation_round(adapter)?;
            let artifact = client(cli)
                .await?
                .publish_adapter(pb::PublishAdapterRequest {
                    federation: federation.to_owned(),
                    round,
                    name: name.clone(),
                    version: version.clone(),
                    license: license.clone(),
                    max_eval_loss: *max_eval_loss,
                    min_exact_match: *min_exact_match,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            return crate::print_artifact(&artifact, cli.json);
        }
    };
    anyhow::ensure!(
        format == "peft",
        "format {format:?}: only peft is supported"
    );
    let (federation, round) = federation_round(adapter)?;
    let blob = client(cli)
        .await?
        .get_adapter(pb::GetAdapterRequest {
            federation: federation.to_owned(),
            round,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let weights = dir.join("adapter_model.safetensors");
    std::fs::write(&weights, &blob.safetensors)
        .with_context(|| format!("writing {}", weights.display()))?;
    let config: serde_json::Value = serde_json::from_str(&blob.peft_config_json)?;
    let config_path = dir.join("adapter_config.json");
    std::fs::write(&config_path, serde_json::to_string_pretty(&config)?)
        .with_context(|| format!("writing {}", config_path.display()))?;
    if cli.json {
        println!(
            "{}",
            json!({"federation": federation, "round": blob.round, "dir": dir})
        );
    } else {
        println!(
            "{federation} round {} written to {} (adapter_model.safetensors, adapter_config.json)",
            blob.round,
            dir.display()
        );
    }
    Ok(())
}

fn state_name(state: i32) -> &'static str {
    match pb::FederationState::try_from(state) {
        Ok(pb::FederationState::Idle) => "idle",
        Ok(pb::FederationState::Running) => "running",
        Ok(pb::FederationState::Finished) => "finished",
        Ok(pb::FederationState::Failed) => "failed",
        _ => "unknown",
    }
}

fn round_state_name(state: i32) -> &'static str {
    match pb::RoundState::try_from(state) {
        Ok(pb::RoundState::Collecting) => "collecting",
        Ok(pb::RoundState::Aggregated) => "aggregated",
        Ok(pb::RoundState::Evaluated) => "evaluated",
        Ok(pb::RoundState::Failed) => "failed",
        _ => "unknown",
    }
}

fn federation_json(f: &pb::Federation) -> serde_json::Value {
    let adapter = f.adapter.clone().unwrap_or_default();
    let plan = f.plan.unwrap_or_default();
    json!({
        "name": f.name,
        "state": state_name(f.state),
        "reason": f.reason,
        "base": format!("{}@{}", f.base_name, f.base_version),
        "adapter": {
            "rank": adapter.rank, "alpha": adapter.alpha, "dropout": adapter.dropout,
            "targets": adapter.targets,
            "mode": if adapter.mode == pb::AggregationMode::Exact as i32 { "exact" } else { "fedavg" },
        },
        "plan": {
            "steps": plan.steps, "learning_rate": plan.learning_rate,
            "batch_size": plan.batch_size, "max_seq_len": plan.max_seq_len,
            "clip_norm": plan.clip_norm,
        },
        "rounds": f.rounds,
        "global_round": f.global_round,
        "aggregation": if f.plaintext { "plaintext" } else { "secagg+" },
        "privacy": f.privacy.map(|p| json!({
            "noise_multiplier": p.noise_multiplier, "distributed": p.distributed,
            "epsilon_budget": p.epsilon_budget, "delta": p.delta,
        })),
        "epsilon_spent": f.epsilon_spent,
        "history": f.history.iter().map(|r| {
            let eval = r.eval.unwrap_or_default();
            json!({
                "round": r.number,
                "evaluation": r.evaluation,
                "state": round_state_name(r.state),
                "selected": r.selected, "reported": r.reported,
                "contributors": r.contributors, "declined": r.declined,
                "examples": r.examples,
                "started": time_text(r.started_unix_ms),
                "finished": time_text(r.finished_unix_ms),
                "reason": r.reason,
                "eval": {"examples": eval.examples, "loss": eval.loss, "exact_match": eval.exact_match},
                "train_loss_first": r.train_loss_first,
                "train_loss_last": r.train_loss_last,
                "secure": r.secure,
                "epsilon": r.epsilon,
                "epsilon_total": r.epsilon_total,
            })
        }).collect::<Vec<_>>(),
    })
}

fn print_federation(f: &pb::Federation, json_output: bool) -> anyhow::Result<()> {
    if json_output {
        println!("{}", serde_json::to_string_pretty(&federation_json(f))?);
        return Ok(());
    }
    println!(
        "{}  {}  base {}@{}  {}  global round {}  epsilon spent {:.4}  {}",
        f.name,
        state_name(f.state),
        f.base_name,
        f.base_version,
        if f.plaintext { "plaintext" } else { "SecAgg+" },
        f.global_round,
        f.epsilon_spent,
        f.reason
    );
    println!("round  kind        state       nodes  updates  examples  held-out loss  exact match  epsilon  train loss");
    for r in &f.history {
        let eval = r.eval.unwrap_or_default();
        println!(
            "{:>5}  {:<10}  {:<10}  {:>2}/{:<2}  {:>7}  {:>8}  {:>13.4}  {:>11.3}  {:>7.3}  {:.4} -> {:.4}  {}",
            r.number,
            if r.evaluation { "evaluation" } else { "training" },
            round_state_name(r.state),
            r.reported,
            r.selected,
            r.contributors,
            r.examples,
            eval.loss,
            eval.exact_match,
            r.epsilon,
            r.train_loss_first,
            r.train_loss_last,
            r.reason
        );
    }
    Ok(())
}
