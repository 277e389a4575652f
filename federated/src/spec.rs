//! What a federation trains and how each round trains it, checked against limits a device
//! can honour.

use serde::{Deserialize, Serialize};

/// The linear layers of a llama block an adapter may target, by their PEFT module names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Target {
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];

    /// The short name operators type (`q`, `gate`, ...).
    pub fn short_name(self) -> &'static str {
        match self {
            Target::Q => "q",
            Target::K => "k",
            Target::V => "v",
            Target::O => "o",
            Target::Gate => "gate",
            Target::Up => "up",
            Target::Down => "down",
        }
    }

    /// PEFT's module name (`q_proj`, ...), as in `adapter_config.json`.
    pub fn peft_module(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    /// Accepts the short name or PEFT's module name.
    pub fn parse(name: &str) -> Result<Self, SpecError> {
        Target::ALL
            .into_iter()
            .find(|t| t.short_name() == name || t.peft_module() == name)
            .ok_or_else(|| SpecError::UnknownTarget(name.to_owned()))
    }
}

/// How the round's updates become the next global adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AggregationMode {
    /// Average of A and B deltas weighted by example count (McMahan et al.).
    FedAvg,
    /// FFA-LoRA: A frozen from the shared seed, only B trained and averaged; the aggregate
    /// of the low-rank products is then exactly the product of the aggregate.
    Exact,
}

/// The adapter a federation trains.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterSpec {
    pub rank: u32,
    pub alpha: f64,
    pub dropout: f64,
    pub targets: Vec<Target>,
    pub mode: AggregationMode,
    /// Seeds the initial A (and, in exact mode, the frozen A) on every node alike.
    pub init_seed: u64,
}

/// One round's local training, as sent to every selected node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingPlan {
    pub steps: u32,
    pub learning_rate: f64,
    pub batch_size: u32,
    pub max_seq_len: u32,
    /// L2 bound each node clips its update to before it leaves the device.
    pub clip_norm: f64,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SpecError {
    #[error("unknown LoRA target `{0}`: expected one of q, k, v, o, gate, up, down")]
    UnknownTarget(String),
    #[error("{field} is {value}; it must be {range}")]
    OutOfRange {
        field: &'static str,
        value: String,
        range: &'static str,
    },
    #[error("an adapter needs at least one target module")]
    NoTargets,
}

fn check<T: PartialOrd + std::fmt::Display>(
    field: &'static str,
    value: T,
    ok: bool,
    range: &'static str,
) -> Result<(), SpecError> {
    if ok {
        Ok(())
    } else {
        Err(SpecError::OutOfRange {
            field,
            value: value.to_string(),
            range,
        })
    }
}

impl AdapterSpec {
    pub fn validate(&self) -> Result<(), SpecError> {
        check("rank", self.rank, (1..=256).contains(&self.rank), "1..=256")?;
        check(
            "alpha",
            self.alpha,
            self.alpha.is_finite() && self.alpha > 0.0 && self.alpha <= 4096.0,
            "in (0, 4096]",
        )?;
        check(
            "dropout",
            self.dropout,
            (0.0..1.0).contains(&self.dropout),
            "in [0, 1)",
        )?;
        if self.targets.is_empty() {
            return Err(SpecError::NoTargets);
        }
        Ok(())
    }

    /// PEFT's `adapter_config.json` for this adapter on `base_model`.
    pub fn peft_config(&self, base_model: &str) -> serde_json::Value {
        let mut targets: Vec<&str> = self.targets.iter().map(|t| t.peft_module()).collect();
        targets.sort_unstable();
        targets.dedup();
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": targets,
            "bias": "none",
            "fan_in_fan_out": false,
            "use_rslora": false,
            "inference_mode": true,
        })
    }
}

impl TrainingPlan {
    pub fn validate(&self) -> Result<(), SpecError> {
        check(
            "steps",
            self.steps,
            self.steps <= 100_000,
            "at most 100000 (0 evaluates only)",
        )?;
        check(
            "learning_rate",
            self.learning_rate,
            self.learning_rate.is_finite() && self.learning_rate > 0.0 && self.learning_rate < 1.0,
            "in (0, 1)",
        )?;
        check(
            "batch_size",
            self.batch_size,
            (1..=256).contains(&self.batch_size),
            "1..=256",
        )?;
        check(
            "max_seq_len",
            self.max_seq_len,
            (8..=8192).contains(&self.max_seq_len),
            "8..=8192",
        )?;
        check(
            "clip_norm",
            self.clip_norm,
            self.clip_norm.is_finite() && self.clip_norm > 0.0,
            "positive",
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> AdapterSpec {
        AdapterSpec {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: vec![Target::Q, Target::V],
            mode: AggregationMode::Exact,
            init_seed: 7,
        }
    }

    #[test]
    fn targets_parse_both_spellings() {
        assert_eq!(Target::parse("q").unwrap(), Target::Q);
        assert_eq!(Target::parse("down_proj").unwrap(), Target::Down);
        assert!(matches!(
            Target::parse("lm_head"),
            Err(SpecError::UnknownTarget(_))
        ));
    }

    #[test]
    fn limits_are_enforced() {
        assert!(spec().validate().is_ok());
        let zero_rank = AdapterSpec { rank: 0, ..spec() };
        assert!(zero_rank
            .validate()
            .unwrap_err()
            .to_string()
            .contains("rank"));
        let no_targets = AdapterSpec {
            targets: vec![],
            ..spec()
        };
        assert_eq!(no_targets.validate(), Err(SpecError::NoTargets));
        let plan = TrainingPlan {
            steps: 10,
            learning_rate: f64::NAN,
            batch_size: 4,
            max_seq_len: 256,
            clip_norm: 1.0,
        };
        assert!(plan
            .validate()
            .unwrap_err()
            .to_string()
            .contains("learning_rate"));
    }

    #[test]
    fn peft_config_names_the_modules() {
        let config = spec().peft_config("HuggingFaceTB/SmolLM2-135M-Instruct");
        assert_eq!(config["r"], 8);
        assert_eq!(
            config["target_modules"],
            serde_json::json!(["q_proj", "v_proj"])
        );
    }
}
