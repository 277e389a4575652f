//! Examples turned into token sequences with the model's chat template, padded micro-batches,
//! and the summed cross-entropy on their response tokens.

use candle_core::{Device, Tensor, D};
use nanofleet_inference::ModelText;

use crate::data::Example;
use crate::error::{tensor_err, Result};
use crate::lora::Mode;
use crate::model::TrainModel;

/// One example's tokens: prompt (as the engine would be given it) then response, with the
/// loss on `tokens[prompt_len..]`.
#[derive(Debug, Clone)]
pub(crate) struct Sequence {
    pub(crate) tokens: Vec<u32>,
    pub(crate) prompt_len: usize,
}

impl Sequence {
    /// Response tokens the loss covers.
    pub(crate) fn targets(&self) -> usize {
        self.tokens.len().saturating_sub(self.prompt_len.max(1))
    }
}

/// The prompt is rendered with the generation prompt opened and tokenized as the engine does
/// (`add_special`), the response tokenized on its own and closed by `end_token`: exactly the
/// tokens a served model sees and must produce. Truncated to `max_len` tokens.
pub(crate) fn encode(
    text: &ModelText,
    example: &Example,
    end_token: u32,
    max_len: usize,
) -> Result<Sequence> {
    let prompt = text.template.render(&example.messages, true)?;
    let mut tokens = text.tokenizer.encode(&prompt, true)?;
    let prompt_len = tokens.len();
    tokens.extend(text.tokenizer.encode(&example.response, false)?);
    tokens.push(end_token);
    tokens.truncate(max_len);
    Ok(Sequence { tokens, prompt_len })
}

/// A padded micro-batch: inputs, and the flat positions whose next token is a target.
pub(crate) struct Batch {
    inputs: Tensor,
    positions: Tensor,
    targets: Tensor,
    pub(crate) target_count: usize,
}

/// Right-pads the inputs (all tokens but the last) to the longest in `sequences`; the loss
/// positions are `row · width + column` of the tokens that precede each response token.
pub(crate) fn make_batch(sequences: &[&Sequence], device: &Device) -> Result<Batch> {
    let width = sequences
        .iter()
        .map(|s| s.tokens.len().saturating_sub(1))
        .max()
        .unwrap_or(0)
        .max(1);
    let mut inputs = Vec::with_capacity(sequences.len() * width);
    let mut positions = Vec::new();
    let mut targets = Vec::new();
    for (row, sequence) in sequences.iter().enumerate() {
        let input = &sequence.tokens[..sequence.tokens.len().saturating_sub(1)];
        inputs.extend_from_slice(input);
        // Any id works as padding: no real token attends to it and no loss reads it.
        inputs.resize((row + 1) * width, 0);
        for column in sequence.prompt_len.max(1) - 1..input.len() {
            positions.push((row * width + column) as u32);
            targets.push(sequence.tokens[column + 1]);
        }
    }
    let build = tensor_err("building a batch");
    Ok(Batch {
        target_count: targets.len(),
        inputs: Tensor::from_vec(inputs, (sequences.len(), width), device).map_err(build)?,
        positions: Tensor::new(positions.as_slice(), device)
            .map_err(tensor_err("building a batch"))?,
        targets: Tensor::new(targets.as_slice(), device).map_err(tensor_err("building a batch"))?,
    })
}

/// Sum over the batch's target tokens of −log p(target): a scalar tensor.
pub(crate) fn loss_sum(model: &TrainModel, batch: &Batch, mode: &mut Mode<'_>) -> Result<Tensor> {
    negative_log_likelihood(model, batch, mode).map_err(tensor_err("running the forward pass"))
}

fn negative_log_likelihood(
    model: &TrainModel,
    batch: &Batch,
    mode: &mut Mode<'_>,
) -> candle_core::Result<Tensor> {
    let logits = model.logits_at(&batch.inputs, &batch.positions, mode)?;
    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    log_probs
        .gather(&batch.targets.unsqueeze(1)?, 1)?
        .sum_all()?
        .neg()
}
