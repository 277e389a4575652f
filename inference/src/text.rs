//! The tokenizer and chat template of a GGUF file, built from its metadata alone, for code that
//! runs its own forward pass (the LoRA trainer) and must tokenize exactly as the engine does.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;

use crate::chat::ChatTemplate;
use crate::error::Result;
use crate::metadata::Metadata;
use crate::tokenizer::Tokenizer;

/// What turns conversations into token ids for one model: the same tokenizer and template that
/// [`crate::Engine::load`] builds from the same metadata.
#[derive(Debug)]
pub struct ModelText {
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
}

impl ModelText {
    /// Builds both from a GGUF file's metadata (`gguf_file::Content::metadata`).
    pub fn from_gguf_metadata(metadata: &HashMap<String, Value>) -> Result<Self> {
        let md = Metadata::new(metadata);
        let tokenizer = Tokenizer::from_metadata(&md)?;
        let token_text = |id: Option<u32>| {
            id.and_then(|id| tokenizer.token_text(id))
                .unwrap_or("")
                .to_string()
        };
        let template = ChatTemplate::new(
            md.string("tokenizer.chat_template")?,
            &token_text(tokenizer.bos_token()),
            &token_text(tokenizer.eos_token()),
        )?;
        Ok(Self {
            tokenizer,
            template,
        })
    }
}
