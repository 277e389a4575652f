//! The trainer: a llama GGUF with LoRA adapters, their exchange in PEFT layout, the training
//! loop (micro-batches, gradient accumulation, AdamW) and evaluation.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use nanofleet_inference::lora::{LoraConfig, LoraTarget};
use nanofleet_inference::{Engine, EngineOptions, GenerateRequest, LoraSource, ModelText, Prompt};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::batch::{encode, loss_sum, make_batch, Sequence};
use crate::data::Example;
use crate::error::{tensor_err, Result, TrainError};
use crate::lora::{peft_name, permute_rows, LoraSpec, Mode};
use crate::memory::{estimate, MemoryEstimate};
use crate::model::TrainModel;

/// How to train.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOptions {
    /// Optimizer steps.
    pub steps: usize,
    pub learning_rate: f64,
    /// Examples per micro-batch (one forward and backward pass).
    pub batch_size: usize,
    /// Micro-batches whose gradients are summed before each optimizer step.
    pub grad_accumulation: usize,
    /// Longer examples are cut to this many tokens (prompt first).
    pub max_seq_len: usize,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// Seeds the example order and the dropout masks.
    pub seed: u64,
    /// Refuse to start when [`Trainer::memory_estimate`] for (batch_size, longest sequence)
    /// is above this.
    pub memory_budget_bytes: Option<u64>,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            steps: 100,
            learning_rate: 1e-4,
            batch_size: 4,
            grad_accumulation: 1,
            max_seq_len: 512,
            weight_decay: 0.0,
            seed: 0,
            memory_budget_bytes: None,
        }
    }
}

/// What a training run did.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainReport {
    pub steps: usize,
    /// Examples that had response tokens within `max_seq_len` and were trained on.
    pub examples: usize,
    /// Examples left out because truncation left none of their response.
    pub skipped_examples: usize,
    /// Response tokens the loss covered, over all steps.
    pub tokens: usize,
    /// Mean token cross-entropy of the first step's batches (before its update).
    pub first_loss: f64,
    /// The same for the last step.
    pub last_loss: f64,
    /// Mean of the steps' losses.
    pub mean_loss: f64,
    pub seconds_per_step: f64,
}

/// How well the current adapter does on held-out examples.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalReport {
    pub examples: usize,
    /// Mean token cross-entropy on the responses (their end token included).
    pub loss: f64,
    /// Fraction whose greedy answer, stopped at end of generation, equals the reference
    /// response after trimming whitespace.
    pub exact_match: f64,
}

/// A quantized llama base with trainable LoRA adapters (CPU).
#[derive(Debug)]
pub struct Trainer {
    path: PathBuf,
    model: TrainModel,
    text: ModelText,
    spec: LoraSpec,
    /// Closes every response: what the served model must emit to stop.
    end_token: u32,
}

impl Trainer {
    /// Loads the GGUF at `gguf` with all adapters zero; call [`Trainer::set_adapter`] to
    /// initialize them.
    pub fn load(gguf: &Path, spec: LoraSpec) -> Result<Self> {
        spec.validate()?;
        let file = std::fs::File::open(gguf).map_err(|source| TrainError::Io {
            path: gguf.to_path_buf(),
            source,
        })?;
        let content = nanofleet_inference::gguf::read_content(gguf, &file, None)?;
        let text = ModelText::from_gguf_metadata(&content.metadata)?;
        let end_token = text
            .tokenizer
            .eos_token()
            .or_else(|| text.tokenizer.end_of_generation().first().copied())
            .ok_or_else(|| {
                TrainError::Model("the tokenizer has no end-of-generation token".into())
            })?;
        let model = TrainModel::load(gguf, content, &spec)?;
        Ok(Self {
            path: gguf.to_path_buf(),
            model,
            text,
            spec,
            end_token,
        })
    }

    pub fn spec(&self) -> &LoraSpec {
        &self.spec
    }

    /// PEFT tensor names with their HF-layout shapes: A (rank, in), B (out, rank); sorted.
    pub fn adapter_layout(&self) -> Vec<(String, (usize, usize))> {
        let mut layout: Vec<_> = self
            .model
            .lora
            .iter()
            .flat_map(|pair| {
                let (rank, inputs) = (pair.a.dims()[0], pair.a.dims()[1]);
                let out = pair.b.dims()[0];
                [
                    (peft_name(pair.layer, pair.target, "lora_A"), (rank, inputs)),
                    (peft_name(pair.layer, pair.target, "lora_B"), (out, rank)),
                ]
            })
            .collect();
        layout.sort();
        layout
    }

    /// Heads whose rows B's rows follow, for the q/k reorder; `None` for other targets.
    fn permuted_heads(&self, target: LoraTarget) -> Option<usize> {
        match target {
            LoraTarget::Query => Some(self.model.config.heads),
            LoraTarget::Key => Some(self.model.config.kv_heads),
            _ => None,
        }
    }

    /// Sets every A and B from PEFT-named, HF-layout, row-major values. Every name of
    /// [`Trainer::adapter_layout`] must be there with its shape, and no other.
    pub fn set_adapter(&mut self, tensors: &HashMap<String, Vec<f32>>) -> Result<()> {
        let layout = self.adapter_layout();
        let expected: HashSet<&str> = layout.iter().map(|(n, _)| n.as_str()).collect();
        let mut extra: Vec<&String> = tensors
            .keys()
            .filter(|n| !expected.contains(n.as_str()))
            .collect();
        if !extra.is_empty() {
            extra.sort();
            return Err(TrainError::Adapter(format!(
                "names not in this adapter's layout: {extra:?}"
            )));
        }
        for (name, (rows, columns)) in &layout {
            match tensors.get(name) {
                None => return Err(TrainError::Adapter(format!("`{name}` is missing"))),
                Some(values) if values.len() != rows * columns => {
                    return Err(TrainError::Adapter(format!(
                        "`{name}` has {} values, its shape ({rows}, {columns}) needs {}",
                        values.len(),
                        rows * columns
                    )))
                }
                Some(values) if values.iter().any(|v| !v.is_finite()) => {
                    return Err(TrainError::Adapter(format!(
                        "`{name}` holds NaN or infinity"
                    )))
                }
                Some(_) => {}
            }
        }
        let set = |var: &Var, values: Vec<f32>| -> Result<()> {
            let tensor = Tensor::from_vec(values, var.shape(), &Device::Cpu)
                .map_err(tensor_err("setting the adapter"))?;
            var.set(&tensor).map_err(tensor_err("setting the adapter"))
        };
        for pair in &self.model.lora {
            set(
                &pair.a,
                tensors[&peft_name(pair.layer, pair.target, "lora_A")].clone(),
            )?;
            let b = &tensors[&peft_name(pair.layer, pair.target, "lora_B")];
            let b = match self.permuted_heads(pair.target) {
                Some(heads) => permute_rows(b, heads, self.spec.rank, true),
                None => b.clone(),
            };
            set(&pair.b, b)?;
        }
        Ok(())
    }

    /// The current adapter: PEFT names, HF layout, row-major values.
    pub fn adapter(&self) -> Result<HashMap<String, Vec<f32>>> {
        let values = |var: &Var| -> Result<Vec<f32>> {
            var.as_tensor()
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(tensor_err("reading the adapter"))
        };
        let mut out = HashMap::new();
        for pair in &self.model.lora {
            out.insert(
                peft_name(pair.layer, pair.target, "lora_A"),
                values(&pair.a)?,
            );
            let b = values(&pair.b)?;
            let b = match self.permuted_heads(pair.target) {
                Some(heads) => permute_rows(&b, heads, self.spec.rank, false),
                None => b,
            };
            out.insert(peft_name(pair.layer, pair.target, "lora_B"), b);
        }
        Ok(out)
    }

    /// What training micro-batches of `batch` sequences of `seq_len` tokens should need.
    pub fn memory_estimate(&self, batch: usize, seq_len: usize) -> MemoryEstimate {
        estimate(&self.model, batch, seq_len)
    }

    fn sequences(&self, examples: &[Example], max_len: usize) -> Result<Vec<Sequence>> {
        examples
            .iter()
            .map(|example| encode(&self.text, example, self.end_token, max_len))
            .collect()
    }

    /// Trains the adapter on `examples`; the adapter must have been set first.
    pub fn train(&mut self, examples: &[Example], options: &TrainOptions) -> Result<TrainReport> {
        validate(options, self.model.config.max_positions)?;
        let all = self.sequences(examples, options.max_seq_len)?;
        let total = all.len();
        let sequences: Vec<Sequence> = all.into_iter().filter(|s| s.targets() > 0).collect();
        if sequences.is_empty() {
            return Err(TrainError::NothingToLearn(options.max_seq_len));
        }
        let longest = sequences
            .iter()
            .map(|s| s.tokens.len() - 1)
            .max()
            .unwrap_or(1);
        if let Some(budget) = options.memory_budget_bytes {
            let needed = self.memory_estimate(options.batch_size, longest).total();
            if needed > budget {
                return Err(TrainError::MemoryBudget {
                    estimate: needed,
                    budget,
                    batch: options.batch_size,
                    seq_len: longest,
                });
            }
        }
        let trainable: Vec<Var> = self
            .model
            .lora
            .iter()
            .flat_map(|pair| {
                let a = (!self.spec.freeze_a).then(|| pair.a.clone());
                a.into_iter().chain([pair.b.clone()])
            })
            .collect();
        let mut optimizer = AdamW::new(
            trainable.clone(),
            ParamsAdamW {
                lr: options.learning_rate,
                weight_decay: options.weight_decay,
                ..ParamsAdamW::default()
            },
        )
        .map_err(tensor_err("creating the optimizer"))?;
        // One seed, two independent streams: example order and dropout masks.
        let mut order_rng = ChaCha8Rng::seed_from_u64(options.seed);
        let mut dropout_rng = ChaCha8Rng::seed_from_u64(options.seed);
        dropout_rng.set_stream(1);
        let mut order = ExampleOrder::new(sequences.len());
        let mut step_losses = Vec::with_capacity(options.steps);
        let mut tokens = 0;
        let started = Instant::now();
        for _ in 0..options.steps {
            let micro_batches: Vec<Vec<&Sequence>> = (0..options.grad_accumulation)
                .map(|_| {
                    (0..options.batch_size)
                        .map(|_| &sequences[order.next(&mut order_rng)])
                        .collect()
                })
                .collect();
            let step_targets: usize = micro_batches.iter().flatten().map(|s| s.targets()).sum();
            let mut accumulated: Vec<Option<Tensor>> = vec![None; trainable.len()];
            let mut step_loss = 0.0;
            for micro in &micro_batches {
                let batch = make_batch(micro, &Device::Cpu)?;
                let mut mode = Mode::Train {
                    dropout: self.spec.dropout,
                    freeze_a: self.spec.freeze_a,
                    rng: &mut dropout_rng,
                };
                let summed = loss_sum(&self.model, &batch, &mut mode)?;
                // Dividing by the step's token count (not the micro-batch's) makes the summed
                // gradients those of the mean over the whole step, however it is split.
                let loss =
                    (summed / step_targets as f64).map_err(tensor_err("scaling the loss"))?;
                step_loss += loss
                    .to_scalar::<f32>()
                    .map_err(tensor_err("reading the loss"))? as f64;
                let grads = loss
                    .backward()
                    .map_err(tensor_err("running the backward pass"))?;
                for (var, sum) in trainable.iter().zip(accumulated.iter_mut()) {
                    if let Some(grad) = grads.get(var.as_tensor()) {
                        *sum = Some(match sum.take() {
                            None => grad.clone(),
                            Some(previous) => {
                                (previous + grad).map_err(tensor_err("accumulating gradients"))?
                            }
                        });
                    }
                }
            }
            let mut store = GradStore::default();
            for (var, grad) in trainable.iter().zip(accumulated) {
                if let Some(grad) = grad {
                    store.insert(var.as_tensor(), grad);
                }
            }
            optimizer
                .step(&store)
                .map_err(tensor_err("updating the adapter"))?;
            step_losses.push(step_loss);
            tokens += step_targets;
        }
        let elapsed = started.elapsed().as_secs_f64();
        Ok(TrainReport {
            steps: options.steps,
            examples: sequences.len(),
            skipped_examples: total - sequences.len(),
            tokens,
            first_loss: step_losses.first().copied().unwrap_or(f64::NAN),
            last_loss: step_losses.last().copied().unwrap_or(f64::NAN),
            mean_loss: step_losses.iter().sum::<f64>() / step_losses.len() as f64,
            seconds_per_step: elapsed / options.steps as f64,
        })
    }

    /// Loss on the responses of `examples` and exact match of greedy answers of up to
    /// `max_new_tokens`. The answers come from `nanofleet_inference::Engine` loaded with the
    /// current adapter, so they are what a node serving this adapter would say.
    pub fn evaluate(&self, examples: &[Example], max_new_tokens: usize) -> Result<EvalReport> {
        if examples.is_empty() {
            return Err(TrainError::Options("no examples to evaluate".into()));
        }
        let sequences = self.sequences(examples, self.model.config.max_positions)?;
        let mut loss = 0.0;
        let mut targets = 0;
        for sequence in &sequences {
            let batch = make_batch(&[sequence], &Device::Cpu)?;
            loss += loss_sum(&self.model, &batch, &mut Mode::Eval)?
                .to_scalar::<f32>()
                .map_err(tensor_err("reading the loss"))? as f64;
            targets += batch.target_count;
        }
        let engine = self.serving_engine()?;
        let mut matches = 0;
        for (sequence, example) in sequences.iter().zip(examples) {
            let request = GenerateRequest {
                prompt: Prompt::Tokens(sequence.tokens[..sequence.prompt_len].to_vec()),
                ..GenerateRequest::greedy(String::new(), max_new_tokens)
            };
            let completion = engine.generate(&request, |_| std::ops::ControlFlow::Continue(()))?;
            if completion.text.trim() == example.response.trim() {
                matches += 1;
            }
        }
        Ok(EvalReport {
            examples: examples.len(),
            loss: loss / targets.max(1) as f64,
            exact_match: matches as f64 / examples.len() as f64,
        })
    }

    /// The inference engine with this trainer's current adapter.
    pub(crate) fn serving_engine(&self) -> Result<Engine> {
        let shapes: HashMap<String, (usize, usize)> = self.adapter_layout().into_iter().collect();
        let tensors = self
            .adapter()?
            .into_iter()
            .map(|(name, values)| {
                let tensor = Tensor::from_vec(values, shapes[&name], &Device::Cpu)
                    .map_err(tensor_err("handing the adapter to the engine"))?;
                Ok((name, tensor))
            })
            .collect::<Result<HashMap<_, _>>>()?;
        let options = EngineOptions {
            lora: Some(LoraSource::PeftTensors {
                config: LoraConfig {
                    r: self.spec.rank,
                    lora_alpha: self.spec.alpha,
                    use_rslora: false,
                },
                tensors,
            }),
            ..EngineOptions::default()
        };
        Ok(Engine::load(&self.path, options)?)
    }

    #[cfg(test)]
    pub(crate) fn model(&self) -> &TrainModel {
        &self.model
    }

    #[cfg(test)]
    pub(crate) fn model_mut(&mut self) -> &mut TrainModel {
        &mut self.model
    }

    #[cfg(test)]
    pub(crate) fn text(&self) -> &ModelText {
        &self.text
    }
}

fn validate(options: &TrainOptions, max_positions: usize) -> Result<()> {
    let refuse = |detail: String| Err(TrainError::Options(detail));
    if options.steps == 0 || options.batch_size == 0 || options.grad_accumulation == 0 {
        return refuse("steps, batch_size and grad_accumulation must be at least 1".into());
    }
    if !(2..=max_positions).contains(&options.max_seq_len) {
        return refuse(format!(
            "max_seq_len must be between 2 and the model's {max_positions} positions, got {}",
            options.max_seq_len
        ));
    }
    if !options.learning_rate.is_finite() || options.learning_rate <= 0.0 {
        return refuse(format!(
            "learning_rate must be positive, got {}",
            options.learning_rate
        ));
    }
    if !options.weight_decay.is_finite() || options.weight_decay < 0.0 {
        return refuse(format!(
            "weight_decay must be ≥ 0, got {}",
            options.weight_decay
        ));
    }
    Ok(())
}

/// Epochs of shuffled example indices, one after the other.
struct ExampleOrder {
    pending: Vec<usize>,
    count: usize,
}

impl ExampleOrder {
    fn new(count: usize) -> Self {
        Self {
            pending: Vec::new(),
            count,
        }
    }

    fn next(&mut self, rng: &mut ChaCha8Rng) -> usize {
        if self.pending.is_empty() {
            self.pending = (0..self.count).collect();
            self.pending.shuffle(rng);
        }
        self.pending.pop().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{examples, seeded_adapter, spec, tiny_llama, ALL_TARGETS};

    fn options() -> TrainOptions {
        TrainOptions {
            steps: 40,
            learning_rate: 2e-2,
            batch_size: 2,
            grad_accumulation: 2,
            max_seq_len: 64,
            weight_decay: 0.0,
            seed: 5,
            memory_budget_bytes: None,
        }
    }

    #[test]
    fn training_reduces_the_loss() {
        let dir = tempfile::tempdir().unwrap();
        let path = tiny_llama(dir.path());
        for freeze_a in [false, true] {
            let mut spec = spec(
                &[LoraTarget::Query, LoraTarget::Value, LoraTarget::Up],
                freeze_a,
            );
            spec.dropout = 0.1;
            let mut trainer = Trainer::load(&path, spec).unwrap();
            let initial = seeded_adapter(&trainer, 1, 0.0);
            trainer.set_adapter(&initial).unwrap();
            let before = trainer.evaluate(&examples(), 4).unwrap();
            let report = trainer.train(&examples(), &options()).unwrap();
            let after = trainer.evaluate(&examples(), 4).unwrap();
            eprintln!(
                "freeze_a = {freeze_a}: loss {:.3} → {:.3} (eval {:.3} → {:.3}, exact {} → {}), {:.1} ms per step",
                report.first_loss,
                report.last_loss,
                before.loss,
                after.loss,
                before.exact_match,
                after.exact_match,
                report.seconds_per_step * 1e3
            );
            assert_eq!(report.steps, 40);
            assert_eq!(report.examples, 4);
            assert!(report.tokens > 0);
            assert!(report.last_loss < 0.6 * report.first_loss, "{report:?}");
            assert!(after.loss < 0.6 * before.loss, "{before:?} {after:?}");
            let trained = trainer.adapter().unwrap();
            let a_moved = trained
                .iter()
                .filter(|(name, _)| name.contains("lora_A"))
                .any(|(name, values)| values != &initial[name]);
            assert_eq!(a_moved, !freeze_a);
        }
    }

    #[test]
    fn training_is_reproducible() {
        let dir = tempfile::tempdir().unwrap();
        let path = tiny_llama(dir.path());
        let run = || {
            let mut spec = spec(&[LoraTarget::Key, LoraTarget::Down], false);
            spec.dropout = 0.2;
            let mut trainer = Trainer::load(&path, spec).unwrap();
            let initial = seeded_adapter(&trainer, 2, 0.0);
            trainer.set_adapter(&initial).unwrap();
            let options = TrainOptions {
                steps: 3,
                ..options()
            };
            trainer.train(&examples(), &options).unwrap();
            trainer.adapter().unwrap()
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn adapter_round_trips_and_reorders_q_and_k() {
        let dir = tempfile::tempdir().unwrap();
        let mut trainer =
            Trainer::load(&tiny_llama(dir.path()), spec(&ALL_TARGETS, false)).unwrap();
        let layout = trainer.adapter_layout();
        assert_eq!(layout.len(), 2 * 7 * 2);
        assert!(layout.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(layout.contains(&(
            "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight".into(),
            (32, 4)
        )));
        assert!(layout.contains(&(
            "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight".into(),
            (4, 128)
        )));
        let adapter = seeded_adapter(&trainer, 3, 0.5);
        trainer.set_adapter(&adapter).unwrap();
        assert_eq!(trainer.adapter().unwrap(), adapter);
        // Inside, q's B holds its rows in GGUF order; v's is as given.
        let held = |target: LoraTarget| {
            let pair = trainer
                .model
                .lora
                .iter()
                .find(|p| p.layer == 0 && p.target == target)
                .unwrap();
            pair.b
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let q = &adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"];
        assert_eq!(held(LoraTarget::Query), permute_rows(q, 4, 4, true));
        assert_ne!(&held(LoraTarget::Query), q);
        let v = &adapter["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"];
        assert_eq!(&held(LoraTarget::Value), v);
    }

    #[test]
    fn set_adapter_refuses_missing_extra_and_misshapen_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let mut trainer =
            Trainer::load(&tiny_llama(dir.path()), spec(&[LoraTarget::Value], false)).unwrap();
        let good = seeded_adapter(&trainer, 4, 0.0);
        let name = "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight";
        let mut missing = good.clone();
        missing.remove(name);
        let mut extra = good.clone();
        extra.insert(
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".into(),
            vec![0.0; 4 * 64],
        );
        let mut short = good.clone();
        short.get_mut(name).unwrap().pop();
        for bad in [missing, extra, short] {
            assert!(matches!(
                trainer.set_adapter(&bad),
                Err(TrainError::Adapter(_))
            ));
        }
        trainer.set_adapter(&good).unwrap();
    }

    #[test]
    fn memory_budget_is_enforced_before_training() {
        let dir = tempfile::tempdir().unwrap();
        let mut trainer =
            Trainer::load(&tiny_llama(dir.path()), spec(&[LoraTarget::Value], false)).unwrap();
        let initial = seeded_adapter(&trainer, 4, 0.0);
        trainer.set_adapter(&initial).unwrap();
        let estimate = trainer.memory_estimate(2, 64);
        assert!(estimate.weights > 0 && estimate.adapter > 0 && estimate.activations > 0);
        // Quadratic attention: doubling the length more than doubles activations.
        assert!(trainer.memory_estimate(2, 128).activations > 2 * estimate.activations);
        let options = TrainOptions {
            steps: 1,
            memory_budget_bytes: Some(estimate.weights),
            ..options()
        };
        match trainer.train(&examples(), &options) {
            Err(TrainError::MemoryBudget {
                estimate, budget, ..
            }) => assert!(estimate > budget),
            other => panic!("{other:?}"),
        }
        assert_eq!(trainer.adapter().unwrap(), initial, "nothing was trained");
        let roomy = TrainOptions {
            memory_budget_bytes: Some(estimate.total()),
            ..options
        };
        trainer.train(&examples(), &roomy).unwrap();
    }

    #[test]
    fn bad_options_and_truncated_data_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut trainer =
            Trainer::load(&tiny_llama(dir.path()), spec(&[LoraTarget::Value], false)).unwrap();
        for bad in [
            TrainOptions {
                steps: 0,
                ..options()
            },
            TrainOptions {
                max_seq_len: 1,
                ..options()
            },
            TrainOptions {
                learning_rate: -1.0,
                ..options()
            },
        ] {
            assert!(matches!(
                trainer.train(&examples(), &bad),
                Err(TrainError::Options(_))
            ));
        }
        // A 4-token budget holds only part of the prompt.
        let short = TrainOptions {
            max_seq_len: 4,
            ..options()
        };
        assert!(matches!(
            trainer.train(&examples(), &short),
            Err(TrainError::NothingToLearn(4))
        ));
        assert!(matches!(
            Trainer::load(
                &dir.path().join("absent.gguf"),
                spec(&[LoraTarget::Value], false)
            ),
            Err(TrainError::Io { .. })
        ));
        let mut zero_rank = spec(&[LoraTarget::Value], false);
        zero_rank.rank = 0;
        assert!(matches!(
            Trainer::load(&dir.path().join("tiny-llama.gguf"), zero_rank),
            Err(TrainError::Spec(_))
        ));
    }
}
