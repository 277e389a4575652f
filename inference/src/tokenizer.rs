//! The tokenizer rebuilt from GGUF metadata: GPT-2 byte-level BPE (`gpt2`) and SentencePiece (`llama`),
//! special tokens, BOS/EOS and end-of-generation tokens, and byte-exact decoding for streaming.

use std::collections::{BinaryHeap, HashMap};

use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::error::{InferenceError, Result};
use crate::metadata::Metadata;

/// `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    fn from_gguf(value: i64) -> Self {
        match value {
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Normal,
        }
    }
}

/// Texts of control tokens that end a turn in common chat formats; llama.cpp treats them as
/// end-of-generation too, so a model that emits `<|endoftext|>` instead of its EOS still stops.
const END_OF_TURN_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
];

/// GPT-2's regex with digits split one by one comes from Digits + ByteLevel; these are the
/// Split regexes of the other pre-tokenizers llama.cpp names in `tokenizer.ggml.pre`.
const LLAMA3_SPLIT: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// SentencePiece's visible space.
const SPM_SPACE: &str = "\u{2581}";

enum Encoder {
    ByteLevelBpe(Box<tokenizers::Tokenizer>),
    SentencePiece(Box<SentencePiece>),
}

/// A tokenizer that gives the same ids as llama.cpp for the same GGUF file.
pub struct Tokenizer {
    tokens: Vec<String>,
    types: Vec<TokenType>,
    /// What each token contributes to the output text, as bytes (a token may hold part of a
    /// UTF-8 character); empty for control tokens, which are never shown.
    pieces: Vec<Vec<u8>>,
    encoder: Encoder,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    end_of_generation: Vec<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.tokens.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .finish_non_exhaustive()
    }
}

fn build_err(detail: impl std::fmt::Display) -> InferenceError {
    InferenceError::TokenizerBuild(detail.to_string())
}

impl Tokenizer {
    /// Builds the tokenizer that `tokenizer.ggml.*` describes.
    pub(crate) fn from_metadata(md: &Metadata<'_>) -> Result<Self> {
        let model = md.required_string("tokenizer.ggml.model")?;
        let tokens: Vec<String> = md
            .string_array("tokenizer.ggml.tokens")?
            .ok_or_else(|| InferenceError::MissingMetadata {
                key: "tokenizer.ggml.tokens".into(),
            })?
            .into_iter()
            .map(str::to_string)
            .collect();
        let types: Vec<TokenType> = match md.integer_array("tokenizer.ggml.token_type")? {
            Some(values) if values.len() == tokens.len() => {
                values.into_iter().map(TokenType::from_gguf).collect()
            }
            Some(values) => {
                return Err(InferenceError::BadMetadata {
                    key: "tokenizer.ggml.token_type".into(),
                    detail: format!("{} types for {} tokens", values.len(), tokens.len()),
                })
            }
            None => vec![TokenType::Normal; tokens.len()],
        };
        let token_id = |key: &str| -> Result<Option<u32>> {
            match md.unsigned(key)? {
                Some(id) if (id as usize) < tokens.len() => Ok(Some(id as u32)),
                Some(id) => Err(InferenceError::BadMetadata {
                    key: key.into(),
                    detail: format!(
                        "token id {id} is outside the vocabulary of {}",
                        tokens.len()
                    ),
                }),
                None => Ok(None),
            }
        };
        let bos = token_id("tokenizer.ggml.bos_token_id")?;
        let eos = token_id("tokenizer.ggml.eos_token_id")?;
        let (encoder, pieces, default_add_bos) = match model {
            "gpt2" => {
                let encoder = byte_level_bpe(md, &tokens, &types)?;
                let pieces = tokens
                    .iter()
                    .zip(&types)
                    .map(|(text, kind)| byte_level_piece(text, *kind))
                    .collect();
                (Encoder::ByteLevelBpe(Box::new(encoder)), pieces, false)
            }
            "llama" => {
                let scores = md
                    .float_array("tokenizer.ggml.scores")?
                    .unwrap_or_else(|| vec![0.0; tokens.len()]);
                let add_space_prefix = md
                    .boolean("tokenizer.ggml.add_space_prefix")?
                    .unwrap_or(true);
                let unknown = token_id("tokenizer.ggml.unknown_token_id")?;
                let encoder =
                    SentencePiece::new(&tokens, &types, scores, unknown, add_space_prefix);
                let pieces = tokens
                    .iter()
                    .zip(&types)
                    .map(|(text, kind)| sentencepiece_piece(text, *kind))
                    .collect();
                (Encoder::SentencePiece(Box::new(encoder)), pieces, true)
            }
            other => return Err(InferenceError::UnsupportedTokenizer(other.to_string())),
        };
        let mut end_of_generation: Vec<u32> = eos.into_iter().collect();
        for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            end_of_generation.extend(token_id(key)?);
        }
        for (id, (text, kind)) in tokens.iter().zip(&types).enumerate() {
            if *kind == TokenType::Control && END_OF_TURN_TEXTS.contains(&text.as_str()) {
                end_of_generation.push(id as u32);
            }
        }
        end_of_generation.sort_unstable();
        end_of_generation.dedup();
        Ok(Self {
            add_bos: md
                .boolean("tokenizer.ggml.add_bos_token")?
                .unwrap_or(default_add_bos)
                && bos.is_some(),
            add_eos: md.boolean("tokenizer.ggml.add_eos_token")?.unwrap_or(false) && eos.is_some(),
            tokens,
            types,
            pieces,
            encoder,
            bos,
            eos,
            end_of_generation,
        })
    }

    /// Token ids for `text`. Special tokens written in the text (such as `<|im_start|>`) become
    /// their ids, as in llama.cpp; `add_special` adds BOS/EOS where the model's metadata asks.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        if add_special && self.add_bos {
            ids.extend(self.bos);
        }
        match &self.encoder {
            Encoder::ByteLevelBpe(tokenizer) => {
                let encoding = tokenizer
                    .encode(text, false)
                    .map_err(|e| InferenceError::Tokenize(e.to_string()))?;
                ids.extend_from_slice(encoding.get_ids());
            }
            Encoder::SentencePiece(spm) => spm.encode(text, &mut ids),
        }
        if add_special && self.add_eos {
            ids.extend(self.eos);
        }
        Ok(ids)
    }

    /// The text of `ids`, control tokens left out; bytes that do not form UTF-8 become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let mut bytes = Vec::new();
        for &id in ids {
            bytes.extend_from_slice(self.piece(id)?);
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The bytes one token adds to the output text (may be part of a UTF-8 character).
    pub fn piece(&self, id: u32) -> Result<&[u8]> {
        self.pieces
            .get(id as usize)
            .map(Vec::as_slice)
            .ok_or(InferenceError::UnknownToken {
                id,
                vocab_size: self.tokens.len(),
            })
    }

    /// The token's text as stored in the vocabulary (`Ġ`/`▁` markers and all).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        self.types.get(id as usize).copied()
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    pub fn bos_token(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos_token(&self) -> Option<u32> {
        self.eos
    }

    /// Whether `encode(.., add_special = true)` puts BOS in front.
    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }

    /// Tokens after which generation stops: EOS, EOT/EOM and the end-of-turn control tokens.
    pub fn end_of_generation(&self) -> &[u32] {
        &self.end_of_generation
    }

    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.end_of_generation.binary_search(&id).is_ok()
    }
}

/// GPT-2's reversible map from bytes to printable characters, inverted: the character each
/// byte-level token uses for a byte back to that byte.
fn byte_level_char_to_byte() -> HashMap<char, u8> {
    let mut printable: Vec<u32> = (u32::from(b'!')..=u32::from(b'~')).collect();
    printable.extend(0xA1..=0xAC);
    printable.extend(0xAE..=0xFF);
    let mut map = HashMap::with_capacity(256);
    let mut shifted = 0u32;
    for byte in 0u32..=255 {
        let ch = if printable.contains(&byte) {
            byte
        } else {
            shifted += 1;
            255 + shifted
        };
        map.insert(
            char::from_u32(ch).expect("GPT-2 byte chars are valid"),
            byte as u8,
        );
    }
    map
}

static BYTE_LEVEL_DECODE: std::sync::LazyLock<HashMap<char, u8>> =
    std::sync::LazyLock::new(byte_level_char_to_byte);

/// The character a byte-level BPE vocabulary uses for `byte`.
pub(crate) fn byte_level_char(byte: u8) -> char {
    BYTE_LEVEL_DECODE
        .iter()
        .find_map(|(ch, b)| (*b == byte).then_some(*ch))
        .expect("every byte has a character")
}

fn byte_level_piece(text: &str, kind: TokenType) -> Vec<u8> {
    match kind {
        TokenType::Control | TokenType::Unused => Vec::new(),
        TokenType::UserDefined => text.as_bytes().to_vec(),
        _ => {
            let mut bytes = Vec::with_capacity(text.len());
            for ch in text.chars() {
                match BYTE_LEVEL_DECODE.get(&ch) {
                    Some(b) => bytes.push(*b),
                    None => bytes.extend_from_slice(ch.encode_utf8(&mut [0; 4]).as_bytes()),
                }
            }
            bytes
        }
    }
}

fn sentencepiece_piece(text: &str, kind: TokenType) -> Vec<u8> {
    match kind {
        TokenType::Control | TokenType::Unused => Vec::new(),
        TokenType::Byte => parse_byte_token(text).map(|b| vec![b]).unwrap_or_default(),
        TokenType::UserDefined => text.as_bytes().to_vec(),
        _ => text.replace(SPM_SPACE, " ").into_bytes(),
    }
}

/// `<0x41>` → 0x41.
fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    u8::from_str_radix(hex, 16).ok()
}

fn byte_level_bpe(
    md: &Metadata<'_>,
    tokens: &[String],
    types: &[TokenType],
) -> Result<tokenizers::Tokenizer> {
    let mut vocab = Vocab::default();
    for (id, text) in tokens.iter().enumerate() {
        // A text listed twice keeps its first id, as llama.cpp's lookup does.
        vocab.entry(text.clone()).or_insert(id as u32);
    }
    let merges = md
        .string_array("tokenizer.ggml.merges")?
        .ok_or_else(|| InferenceError::MissingMetadata {
            key: "tokenizer.ggml.merges".into(),
        })?
        .into_iter()
        .map(|merge| {
            merge
                .split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| {
                    build_err(format!(
                        "merge `{merge}` is not two tokens separated by a space"
                    ))
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let pre = md.string("tokenizer.ggml.pre")?.unwrap_or("default");
    let byte_level = ByteLevel::new(false, true, true);
    let split = |pattern: &str| -> Result<PreTokenizerWrapper> {
        let split = Split::new(
            SplitPattern::Regex(pattern.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(build_err)?;
        Ok(PreTokenizerWrapper::Split(split))
    };
    let (pre_tokenizer, ignore_merges) = match pre {
        "default" | "gpt2" => (PreTokenizerWrapper::ByteLevel(byte_level), false),
        "smollm" => (
            PreTokenizerWrapper::Sequence(Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                PreTokenizerWrapper::ByteLevel(byte_level),
            ])),
            false,
        ),
        "llama-bpe" | "llama3" => (
            PreTokenizerWrapper::Sequence(Sequence::new(vec![
                split(LLAMA3_SPLIT)?,
                PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
            ])),
            true,
        ),
        "qwen2" => (
            PreTokenizerWrapper::Sequence(Sequence::new(vec![
                split(QWEN2_SPLIT)?,
                PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
            ])),
            false,
        ),
        other => return Err(InferenceError::UnsupportedPreTokenizer(other.to_string())),
    };
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(build_err)?;
    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    let special: Vec<AddedToken> = tokens
        .iter()
        .zip(types)
        .filter(|(_, kind)| matches!(kind, TokenType::Control | TokenType::UserDefined))
        .map(|(text, _)| AddedToken::from(text.clone(), true))
        .collect();
    tokenizer.add_special_tokens(&special);
    Ok(tokenizer)
}

/// llama.cpp's SentencePiece tokenizer: special tokens split out first, then per text fragment
/// the highest-scoring adjacent pair is merged until none is in the vocabulary, and whatever is
/// left outside the vocabulary falls back to `<0xXX>` byte tokens.
struct SentencePiece {
    ids: HashMap<String, u32>,
    scores: Vec<f32>,
    bytes: [Option<u32>; 256],
    unknown: Option<u32>,
    add_space_prefix: bool,
    /// Control and user-defined tokens, longest first so that a longer match wins.
    specials: Vec<(String, u32)>,
}

#[derive(PartialEq)]
struct Bigram {
    score: f32,
    left: usize,
    size: usize,
}

impl Eq for Bigram {}

impl Ord for Bigram {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // Highest score first; on a tie the leftmost pair, as llama.cpp's queue orders them.
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

impl SentencePiece {
    fn new(
        tokens: &[String],
        types: &[TokenType],
        scores: Vec<f32>,
        unknown: Option<u32>,
        add_space_prefix: bool,
    ) -> Self {
        let mut ids = HashMap::with_capacity(tokens.len());
        let mut bytes = [None; 256];
        let mut specials = Vec::new();
        for (id, (text, kind)) in tokens.iter().zip(types).enumerate() {
            let id = id as u32;
            ids.entry(text.clone()).or_insert(id);
            match kind {
                TokenType::Byte => {
                    if let Some(b) = parse_byte_token(text) {
                        bytes[b as usize] = Some(id);
                    }
                }
                TokenType::Control | TokenType::UserDefined if !text.is_empty() => {
                    specials.push((text.clone(), id));
                }
                _ => {}
            }
        }
        specials.sort_by_key(|(text, _)| std::cmp::Reverse(text.len()));
        Self {
            ids,
            scores,
            bytes,
            unknown,
            add_space_prefix,
            specials,
        }
    }

    fn encode(&self, text: &str, out: &mut Vec<u32>) {
        let mut previous_was_special = true;
        let mut rest = text;
        while !rest.is_empty() {
            let next_special = self
                .specials
                .iter()
                .filter_map(|(special, id)| {
                    rest.find(special.as_str())
                        .map(|at| (at, special.len(), *id))
                })
                .min_by_key(|(at, _, _)| *at);
            let (raw, special) = match next_special {
                Some((at, len, id)) => (&rest[..at], Some((len, id, at))),
                None => (rest, None),
            };
            if !raw.is_empty() {
                let mut fragment = String::new();
                if self.add_space_prefix && previous_was_special {
                    fragment.push(' ');
                }
                fragment.push_str(raw);
                self.encode_fragment(&fragment.replace(' ', SPM_SPACE), out);
                previous_was_special = false;
            }
            match special {
                Some((len, id, at)) => {
                    out.push(id);
                    previous_was_special = true;
                    rest = &rest[at + len..];
                }
                None => rest = "",
            }
        }
    }

    fn encode_fragment(&self, text: &str, out: &mut Vec<u32>) {
        let mut symbols: Vec<Symbol> = Vec::new();
        for (start, ch) in text.char_indices() {
            let index = symbols.len();
            symbols.push(Symbol {
                start,
                len: ch.len_utf8(),
                prev: index.checked_sub(1),
                next: None,
            });
            if index > 0 {
                symbols[index - 1].next = Some(index);
            }
        }
        let mut queue = BinaryHeap::new();
        let push_pair =
            |queue: &mut BinaryHeap<Bigram>, symbols: &[Symbol], left: usize, right: usize| {
                let start = symbols[left].start;
                let end = symbols[right].start + symbols[right].len;
                if let Some(&id) = self.ids.get(&text[start..end]) {
                    queue.push(Bigram {
                        score: self.scores.get(id as usize).copied().unwrap_or(0.0),
                        left,
                        size: end - start,
                    });
                }
            };
        for right in 1..symbols.len() {
            push_pair(&mut queue, &symbols, right - 1, right);
        }
        while let Some(bigram) = queue.pop() {
            let left = bigram.left;
            let Some(right) = symbols[left].next else {
                continue;
            };
            // A pair queued before one of its symbols merged elsewhere is stale.
            if symbols[left].len == 0 || symbols[left].len + symbols[right].len != bigram.size {
                continue;
            }
            symbols[left].len += symbols[right].len;
            symbols[right].len = 0;
            symbols[left].next = symbols[right].next;
            if let Some(after) = symbols[right].next {
                symbols[after].prev = Some(left);
            }
            if let Some(before) = symbols[left].prev {
                push_pair(&mut queue, &symbols, before, left);
            }
            if let Some(after) = symbols[left].next {
                push_pair(&mut queue, &symbols, left, after);
            }
        }
        let mut index = if symbols.is_empty() { None } else { Some(0) };
        while let Some(i) = index {
            let piece = &text[symbols[i].start..symbols[i].start + symbols[i].len];
            match self.ids.get(piece) {
                Some(&id) => out.push(id),
                None => {
                    for b in piece.bytes() {
                        out.extend(self.bytes[b as usize].or(self.unknown));
                    }
                }
            }
            index = symbols[i].next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::Value;

    fn strings(items: &[&str]) -> Value {
        Value::Array(items.iter().map(|s| Value::String(s.to_string())).collect())
    }

    /// A SentencePiece vocabulary small enough to reason about by hand.
    fn sentencepiece_metadata() -> HashMap<String, Value> {
        let mut tokens = vec!["<unk>", "<s>", "</s>"];
        let byte_tokens: Vec<String> = (0..=255u8).map(|b| format!("<0x{b:02X}>")).collect();
        tokens.extend(byte_tokens.iter().map(String::as_str));
        tokens.extend([
            "▁", "h", "e", "l", "o", "he", "ll", "▁he", "llo", "▁hello", "<|user|>",
        ]);
        let mut types = vec![Value::I32(2), Value::I32(3), Value::I32(3)];
        types.extend((0..256).map(|_| Value::I32(6)));
        types.extend((0..10).map(|_| Value::I32(1)));
        types.push(Value::I32(3));
        let scores: Vec<Value> = (0..tokens.len())
            .map(|i| Value::F32(if i < 259 { 0.0 } else { i as f32 }))
            .collect();
        let mut md = HashMap::new();
        md.insert("tokenizer.ggml.model".into(), Value::String("llama".into()));
        md.insert("tokenizer.ggml.tokens".into(), strings(&tokens));
        md.insert("tokenizer.ggml.token_type".into(), Value::Array(types));
        md.insert("tokenizer.ggml.scores".into(), Value::Array(scores));
        md.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(1));
        md.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(2));
        md
    }

    #[test]
    fn sentencepiece_merges_by_score_and_falls_back_to_bytes() {
        let md = sentencepiece_metadata();
        let tok = Tokenizer::from_metadata(&Metadata::new(&md)).unwrap();
        let id = |t: &str| tok.tokens.iter().position(|x| x == t).unwrap() as u32;
        // BOS by default for SentencePiece, a space prefix, then the best merges.
        assert_eq!(tok.encode("hello", true).unwrap(), vec![1, id("▁hello")]);
        // `!` is not in the vocabulary: byte fallback, and decoding restores it.
        let ids = tok.encode("hello!", false).unwrap();
        assert_eq!(ids, vec![id("▁hello"), id("<0x21>")]);
        assert_eq!(tok.decode(&ids).unwrap(), " hello!");
        // A special token splits the text and is followed by a fresh space prefix.
        let ids = tok.encode("<|user|>hello", false).unwrap();
        assert_eq!(ids, vec![id("<|user|>"), id("▁hello")]);
        // Control tokens are never shown.
        assert_eq!(tok.decode(&[1, id("▁he")]).unwrap(), " he");
        // Multi-byte characters fall back to several byte tokens.
        let ids = tok.encode("é", false).unwrap();
        assert_eq!(ids, vec![id("▁"), id("<0xC3>"), id("<0xA9>")]);
        assert_eq!(tok.decode(&ids).unwrap(), " é");
        assert!(tok.is_end_of_generation(2));
    }

    #[test]
    fn byte_level_chars_round_trip_every_byte() {
        let map = byte_level_char_to_byte();
        assert_eq!(map.len(), 256);
        assert_eq!(map[&'Ġ'], b' ');
        assert_eq!(map[&'Ċ'], b'\n');
        assert_eq!(map[&'A'], b'A');
    }

    #[test]
    fn unknown_tokenizer_and_pre_tokenizer_are_refused_by_name() {
        let mut md = sentencepiece_metadata();
        md.insert("tokenizer.ggml.model".into(), Value::String("bert".into()));
        let err = Tokenizer::from_metadata(&Metadata::new(&md)).unwrap_err();
        assert!(err.to_string().contains("bert"), "{err}");
        md.insert("tokenizer.ggml.model".into(), Value::String("gpt2".into()));
        md.insert("tokenizer.ggml.merges".into(), strings(&["h e"]));
        md.insert("tokenizer.ggml.pre".into(), Value::String("mystery".into()));
        let err = Tokenizer::from_metadata(&Metadata::new(&md)).unwrap_err();
        assert!(matches!(err, InferenceError::UnsupportedPreTokenizer(ref p) if p == "mystery"));
    }
}
