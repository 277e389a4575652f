//! Picking the next token from logits: greedy, or seeded sampling with temperature, top-k, top-p
//! and a windowed repetition penalty.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{InferenceError, Result};

/// How the next token is chosen. The defaults are greedy decoding without a penalty.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// 0 picks the most likely token (greedy); higher values flatten the distribution.
    pub temperature: f32,
    /// Keep only the k most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability adds up to at least this; 1 keeps all.
    pub top_p: f32,
    /// Divides positive logits and multiplies negative ones of recently seen tokens; 1 is off.
    pub repetition_penalty: f32,
    /// How many of the latest tokens (prompt included) the penalty looks at.
    pub repetition_window: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            repetition_window: 64,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self::default()
    }

    /// Refuses values that would make sampling meaningless (NaN, negative temperature, ...).
    pub fn validate(&self) -> Result<()> {
        let invalid = |detail: String| Err(InferenceError::InvalidSampling(detail));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return invalid(format!(
                "temperature must be 0 or more, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return invalid(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return invalid(format!(
                "repetition_penalty must be above 0 (1 is off), got {}",
                self.repetition_penalty
            ));
        }
        Ok(())
    }

    fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }
}

/// Samples tokens for one request; the same seed and logits always give the same tokens.
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams, seed: u64) -> Result<Self> {
        params.validate()?;
        Ok(Self {
            params,
            rng: ChaCha8Rng::seed_from_u64(seed),
        })
    }

    /// The next token after `history` (prompt and generated tokens so far). `logits` is
    /// changed in place by the penalty.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        self.apply_repetition_penalty(logits, history);
        if self.params.is_greedy() {
            return argmax(logits);
        }
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(id, &logit)| (id as u32, logit / self.params.temperature))
            .collect();
        // Most likely first; ties by id so that the order never depends on the sort algorithm.
        candidates.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.params.top_k > 0 {
            candidates.truncate(self.params.top_k);
        }
        let max = candidates[0].1;
        let mut probs: Vec<f32> = candidates.iter().map(|(_, l)| (l - max).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if self.params.top_p < 1.0 {
            let mut cumulative = 0.0;
            let keep = probs
                .iter()
                .position(|p| {
                    cumulative += p;
                    cumulative >= self.params.top_p
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let mut draw = self.rng.gen::<f32>() * total;
        for (i, p) in probs.iter().enumerate() {
            if draw < *p {
                return candidates[i].0;
            }
            draw -= p;
        }
        candidates[probs.len() - 1].0
    }

    fn apply_repetition_penalty(&self, logits: &mut [f32], history: &[u32]) {
        let penalty = self.params.repetition_penalty;
        if penalty == 1.0 || self.params.repetition_window == 0 {
            return;
        }
        let window = &history[history.len().saturating_sub(self.params.repetition_window)..];
        let mut seen = window.to_vec();
        seen.sort_unstable();
        seen.dedup();
        for id in seen {
            if let Some(logit) = logits.get_mut(id as usize) {
                *logit = if *logit > 0.0 {
                    *logit / penalty
                } else {
                    *logit * penalty
                };
            }
        }
    }
}

/// Index of the largest logit, the first one on a tie (as llama.cpp's greedy sampler).
pub(crate) fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &logit) in logits.iter().enumerate() {
        if logit > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draw_many(params: SamplingParams, seed: u64, logits: &[f32]) -> Vec<u32> {
        let mut sampler = Sampler::new(params, seed).unwrap();
        (0..200)
            .map(|_| sampler.sample(&mut logits.to_vec(), &[]))
            .collect()
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut sampler = Sampler::new(SamplingParams::greedy(), 0).unwrap();
        assert_eq!(sampler.sample(&mut [0.1, 3.0, 3.0, -1.0], &[]), 1);
    }

    #[test]
    fn same_seed_same_draws_other_seed_other_draws() {
        let params = SamplingParams {
            temperature: 1.0,
            ..SamplingParams::default()
        };
        let logits = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0];
        assert_eq!(
            draw_many(params.clone(), 7, &logits),
            draw_many(params.clone(), 7, &logits)
        );
        assert_ne!(
            draw_many(params.clone(), 7, &logits),
            draw_many(params, 8, &logits)
        );
    }

    #[test]
    fn top_k_and_top_p_cut_the_tail() {
        let logits = [5.0, 4.0, 0.0, -1.0, -2.0];
        let top_k = SamplingParams {
            temperature: 1.0,
            top_k: 2,
            ..SamplingParams::default()
        };
        assert!(draw_many(top_k, 1, &logits).iter().all(|&t| t < 2));
        // p(0) ≈ 0.72, p(0) + p(1) ≈ 0.99: top_p 0.9 keeps exactly tokens 0 and 1.
        let top_p = SamplingParams {
            temperature: 1.0,
            top_p: 0.9,
            ..SamplingParams::default()
        };
        let draws = draw_many(top_p, 1, &logits);
        assert!(draws.iter().all(|&t| t < 2));
        assert!(draws.contains(&1));
    }

    #[test]
    fn repetition_penalty_only_inside_the_window() {
        let params = SamplingParams {
            repetition_penalty: 4.0,
            repetition_window: 1,
            ..SamplingParams::default()
        };
        let mut sampler = Sampler::new(params, 0).unwrap();
        // Token 0 was seen last: 2.0 / 4 < 1.5, so token 1 wins.
        assert_eq!(sampler.sample(&mut [2.0, 1.5, -1.0], &[0]), 1);
        // Token 0 fell out of the one-token window: it wins again.
        assert_eq!(sampler.sample(&mut [2.0, 1.5, -1.0], &[0, 2]), 0);
    }

    #[test]
    fn nonsense_parameters_are_refused() {
        for params in [
            SamplingParams {
                temperature: -1.0,
                ..SamplingParams::default()
            },
            SamplingParams {
                top_p: 0.0,
                ..SamplingParams::default()
            },
            SamplingParams {
                repetition_penalty: f32::NAN,
                ..SamplingParams::default()
            },
        ] {
            assert!(matches!(
                Sampler::new(params, 0),
                Err(InferenceError::InvalidSampling(_))
            ));
        }
    }
}
