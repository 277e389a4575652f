//! GGUF model files: a header parser written from the format (versions 2 and 3,
//! little-endian) that is safe on hostile input, a summary for manifests, a check that
//! every tensor's data lies inside the file, and a small writer for tests.
//!
//! Layout: magic `GGUF`, `u32` version, `u64` tensor count, `u64` metadata count, the
//! metadata entries (string key, `u32` value type, value), the tensor infos (string name,
//! `u32` n_dims, `u64` dims, `u32` ggml type, `u64` offset), padding to
//! `general.alignment` (default 32), then tensor data; each tensor's offset is relative
//! to that aligned data start. Strings are a `u64` length and UTF-8 bytes.
//!
//! Hostile input: every count and length is checked against [`Limits`] and against the
//! bytes that must follow it before anything is allocated, so a header claiming a
//! billion tensors is refused instead of reserving memory for them.
//!
//! Reading incrementally: [`GgufHeader::parse_prefix`] takes the bytes read so far and
//! either returns the header or says how many bytes it needs at least;
//! [`GgufHeader::read_from`] does that loop over any [`std::io::Read`].

mod ggml;
mod parse;
mod write;

use std::collections::HashMap;
use std::io::Read;

pub use ggml::{file_type_label, BlockLayout, GgmlType};
pub use write::{sample_gguf, GgufWriter};

/// Default `general.alignment` when the file does not set one.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// Bounds applied while parsing. The defaults fit every real model of the sizes
/// nanofleet ships (their headers are a few MiB, mostly the tokenizer vocabulary).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Bytes from the start of the file to the end of the tensor infos.
    pub max_header_bytes: u64,
    pub max_tensors: u64,
    pub max_metadata_entries: u64,
    /// Bytes in one string (keys, values, tensor names).
    pub max_string_bytes: u64,
    /// Elements in one array.
    pub max_array_len: u64,
    /// Arrays inside arrays; 1 means arrays of scalars or strings only.
    pub max_array_depth: u32,
    /// Dimensions of one tensor (ggml supports 4).
    pub max_dims: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 64 << 20,
            max_tensors: 1 << 20,
            max_metadata_entries: 1 << 20,
            max_string_bytes: 16 << 20,
            max_array_len: 16 << 20,
            max_array_depth: 8,
            max_dims: 4,
        }
    }
}

/// Why a tensor's data size cannot be computed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TensorSizeError {
    #[error("ggml type {0} has no block layout known to nanofleet, so its size cannot be checked")]
    UnknownType(GgmlType),
    #[error("first dimension {first_dim} is not a multiple of the {ggml_type} block of {block} elements")]
    PartialBlock {
        ggml_type: GgmlType,
        first_dim: u64,
        block: u64,
    },
    #[error("element count or byte size overflows 64 bits")]
    Overflow,
}

/// A GGUF file that cannot be accepted, or could not be read.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("not a GGUF file: it starts with {found:02x?}, expected the magic \"GGUF\"")]
    NotGguf { found: [u8; 4] },
    #[error("GGUF version {0} is not supported: nanofleet reads versions 2 and 3 (re-convert the model with a current llama.cpp)")]
    UnsupportedVersion(u32),
    #[error(
        "big-endian GGUF files are not supported: convert the model on a little-endian machine"
    )]
    BigEndian,
    #[error("{what} is {value}, above the limit of {limit}")]
    LimitExceeded {
        what: &'static str,
        value: u64,
        limit: u64,
    },
    #[error("the GGUF header needs at least {needed} bytes, above the limit of {limit} bytes")]
    HeaderTooLarge { needed: u64, limit: u64 },
    #[error("file ends after {available} bytes, inside the GGUF header, which needs at least {needed}: the file is truncated")]
    Truncated { needed: u64, available: u64 },
    #[error("string at byte {offset} is not valid UTF-8")]
    InvalidUtf8 { offset: u64 },
    #[error("unknown metadata value type {type_id} at byte {offset}")]
    UnknownValueType { type_id: u32, offset: u64 },
    #[error("bool at byte {offset} is {value}, expected 0 or 1")]
    InvalidBool { value: u8, offset: u64 },
    #[error("metadata key {0:?} appears twice")]
    DuplicateKey(String),
    #[error("tensor {0:?} appears twice")]
    DuplicateTensor(String),
    #[error("general.alignment must be a u32 power of two, got {0}")]
    BadAlignment(String),
    #[error("tensor {tensor:?} has {n_dims} dimensions; 1 to {limit} are allowed")]
    BadDimensionCount {
        tensor: String,
        n_dims: u32,
        limit: u32,
    },
    #[error("tensor {tensor:?}: {source}")]
    TensorSize {
        tensor: String,
        source: TensorSizeError,
    },
    #[error("tensor {tensor:?} offset {offset} is not a multiple of the alignment {alignment}")]
    MisalignedTensor {
        tensor: String,
        offset: u64,
        alignment: u64,
    },
    #[error("tensor {tensor:?} data ends at byte {end}, past the end of the {file_size}-byte file: the file is truncated or the header is wrong")]
    TensorOutOfBounds {
        tensor: String,
        end: u64,
        file_size: u64,
    },
    #[error("tensors {first:?} and {second:?} overlap in the data section")]
    OverlappingTensors { first: String, second: String },
    #[error("tensor {tensor:?} has {got} bytes of data, its type and dimensions need {expected}")]
    TensorDataLength {
        tensor: String,
        expected: u64,
        got: u64,
    },
    #[error("reading the GGUF header failed: {0}")]
    Io(#[from] std::io::Error),
}

/// The value types of GGUF metadata, by their id in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl ValueType {
    fn from_id(id: u32) -> Option<Self> {
        const ALL: [ValueType; 13] = [
            ValueType::U8,
            ValueType::I8,
            ValueType::U16,
            ValueType::I16,
            ValueType::U32,
            ValueType::I32,
            ValueType::F32,
            ValueType::Bool,
            ValueType::String,
            ValueType::Array,
            ValueType::U64,
            ValueType::I64,
            ValueType::F64,
        ];
        ALL.get(usize::try_from(id).ok()?).copied()
    }

    /// The fewest bytes one value of this type takes in the file: what an array of
    /// `len` such values must have left before the parser starts reading them.
    fn min_encoded_bytes(self) -> u64 {
        match self {
            Self::U8 | Self::I8 | Self::Bool => 1,
            Self::U16 | Self::I16 => 2,
            Self::U32 | Self::I32 | Self::F32 => 4,
            Self::U64 | Self::I64 | Self::F64 | Self::String => 8,
            // element type (u32) + length (u64)
            Self::Array => 12,
        }
    }
}

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum MetadataValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(MetadataArray),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// An array value, stored by element type so that memory stays proportional to the
/// bytes in the file (a `Vec<MetadataValue>` would cost 32 bytes per `u8`).
#[derive(Clone, Debug, PartialEq)]
pub enum MetadataArray {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<MetadataArray>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

impl MetadataValue {
    /// The string, for string values.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value of any integer type that is not negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
}

/// One tensor as the header describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions, innermost first (ggml's `ne`).
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Byte offset of the data, relative to the aligned start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Bytes of data this tensor occupies.
    pub fn data_bytes(&self) -> Result<u64, GgufError> {
        tensor_data_bytes(self.ggml_type, &self.dims).map_err(|source| GgufError::TensorSize {
            tensor: self.name.clone(),
            source,
        })
    }
}

/// Bytes of data a tensor of this type and these dimensions occupies: whole blocks
/// along the first dimension, rows times the other dimensions.
pub fn tensor_data_bytes(ggml_type: GgmlType, dims: &[u64]) -> Result<u64, TensorSizeError> {
    let layout = ggml_type
        .block_layout()
        .ok_or(TensorSizeError::UnknownType(ggml_type))?;
    let first_dim = dims.first().copied().unwrap_or(1);
    if first_dim % layout.elements != 0 {
        return Err(TensorSizeError::PartialBlock {
            ggml_type,
            first_dim,
            block: layout.elements,
        });
    }
    // ggml counts elements in i64; a count above that is not a real tensor.
    let elements = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .filter(|&n| i64::try_from(n).is_ok())
        .ok_or(TensorSizeError::Overflow)?;
    (elements / layout.elements)
        .checked_mul(layout.bytes)
        .ok_or(TensorSizeError::Overflow)
}

/// Result of parsing a prefix of a file.
#[derive(Debug)]
pub enum ParseOutcome {
    Complete(GgufHeader),
    /// The prefix ends inside the header: read until the prefix is at least this many
    /// bytes long, then parse again.
    NeedMore {
        at_least: u64,
    },
}

/// A parsed GGUF header: metadata in file order, tensor infos, and where data starts.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufHeader {
    version: u32,
    metadata: Vec<(String, MetadataValue)>,
    tensors: Vec<TensorInfo>,
    alignment: u64,
    header_len: u64,
}

/// What a manifest and an operator need to know about a model file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GgufSummary {
    pub version: u32,
    /// `general.architecture`, e.g. `llama`.
    pub architecture: Option<String>,
    /// `general.name`.
    pub name: Option<String>,
    /// `general.file_type` (llama.cpp's `llama_ftype` number).
    pub file_type: Option<u64>,
    /// From `general.file_type` when present, else the most common type among the 2-D
    /// tensors (the weight matrices); `None` when neither exists.
    pub quantization: Option<String>,
    pub tensor_count: usize,
}

/// First read when reading incrementally: enough for small models' whole header.
const INITIAL_READ_BYTES: u64 = 64 << 10;

impl GgufHeader {
    /// Parses the header from the first bytes of a file.
    pub fn parse_prefix(prefix: &[u8], limits: &Limits) -> Result<ParseOutcome, GgufError> {
        parse::parse_prefix(prefix, limits)
    }

    /// Reads just the header from `reader`, growing the buffer as the parser asks, and
    /// never past `limits.max_header_bytes`.
    pub fn read_from(mut reader: impl Read, limits: &Limits) -> Result<Self, GgufError> {
        let mut buf = Vec::new();
        let mut want = INITIAL_READ_BYTES.min(limits.max_header_bytes);
        loop {
            let have = buf.len() as u64;
            let got = (&mut reader).take(want - have).read_to_end(&mut buf)? as u64;
            let at_eof = have + got < want;
            match Self::parse_prefix(&buf, limits)? {
                ParseOutcome::Complete(header) => return Ok(header),
                ParseOutcome::NeedMore { at_least } if at_eof => {
                    return Err(GgufError::Truncated {
                        needed: at_least,
                        available: buf.len() as u64,
                    })
                }
                // Doubling keeps the number of re-parses logarithmic in the header size.
                ParseOutcome::NeedMore { at_least } => {
                    want = at_least
                        .max(want.saturating_mul(2))
                        .min(limits.max_header_bytes);
                }
            }
        }
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    /// Metadata entries in file order (keys are unique).
    pub fn metadata(&self) -> &[(String, MetadataValue)] {
        &self.metadata
    }

    /// The value of one metadata key.
    pub fn get(&self, key: &str) -> Option<&MetadataValue> {
        find_metadata(&self.metadata, key)
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The metadata (in file order) and tensor infos, moved out.
    pub fn into_parts(self) -> (Vec<(String, MetadataValue)>, Vec<TensorInfo>) {
        (self.metadata, self.tensors)
    }

    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Bytes from the start of the file to the end of the tensor infos.
    pub fn header_len(&self) -> u64 {
        self.header_len
    }

    /// Where the data section starts: the header length rounded up to the alignment.
    pub fn data_offset(&self) -> u64 {
        // Cannot overflow: the header is bounded by Limits::max_header_bytes and the
        // alignment by u32.
        self.header_len.next_multiple_of(self.alignment)
    }

    pub fn summary(&self) -> GgufSummary {
        let text = |key: &str| {
            self.get(key)
                .and_then(MetadataValue::as_str)
                .map(str::to_owned)
        };
        let file_type = self
            .get("general.file_type")
            .and_then(MetadataValue::as_u64);
        let quantization = match file_type {
            Some(file_type) => Some(file_type_label(file_type).into_owned()),
            None => self
                .most_common_matrix_type()
                .map(|t| t.name().into_owned()),
        };
        GgufSummary {
            version: self.version,
            architecture: text("general.architecture"),
            name: text("general.name"),
            file_type,
            quantization,
            tensor_count: self.tensors.len(),
        }
    }

    /// Ties go to the lower type id so the label does not depend on tensor order.
    fn most_common_matrix_type(&self) -> Option<GgmlType> {
        let mut counts: HashMap<GgmlType, usize> = HashMap::new();
        for tensor in self.tensors.iter().filter(|t| t.dims.len() == 2) {
            *counts.entry(tensor.ggml_type).or_default() += 1;
        }
        counts
            .into_iter()
            .max_by(|(type_a, count_a), (type_b, count_b)| {
                count_a.cmp(count_b).then(type_b.cmp(type_a))
            })
            .map(|(ggml_type, _)| ggml_type)
    }

    /// Checks that every tensor is aligned, that its data (from its type and
    /// dimensions) ends inside a file of `file_size` bytes, and that no two tensors
    /// overlap: a truncated or inconsistent file is refused before it is loaded.
    pub fn validate_against_size(&self, file_size: u64) -> Result<(), GgufError> {
        let data_offset = self.data_offset();
        let mut extents = Vec::with_capacity(self.tensors.len());
        for tensor in &self.tensors {
            if tensor.offset % self.alignment != 0 {
                return Err(GgufError::MisalignedTensor {
                    tensor: tensor.name.clone(),
                    offset: tensor.offset,
                    alignment: self.alignment,
                });
            }
            let bytes = tensor.data_bytes()?;
            let end = data_offset
                .checked_add(tensor.offset)
                .and_then(|start| start.checked_add(bytes))
                .filter(|&end| end <= file_size)
                .ok_or_else(|| GgufError::TensorOutOfBounds {
                    tensor: tensor.name.clone(),
                    end: data_offset
                        .saturating_add(tensor.offset)
                        .saturating_add(bytes),
                    file_size,
                })?;
            extents.push((tensor.offset, end - data_offset, &tensor.name));
        }
        extents.sort_unstable();
        for pair in extents.windows(2) {
            let (_, first_end, first) = pair[0];
            let (second_start, _, second) = pair[1];
            if first_end > second_start {
                return Err(GgufError::OverlappingTensors {
                    first: first.clone(),
                    second: second.clone(),
                });
            }
        }
        Ok(())
    }
}

fn find_metadata<'a>(
    metadata: &'a [(String, MetadataValue)],
    key: &str,
) -> Option<&'a MetadataValue> {
    metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
}

/// The alignment that `general.alignment` sets, shared by the parser and the writer.
fn alignment_of(metadata: &[(String, MetadataValue)]) -> Result<u64, GgufError> {
    match find_metadata(metadata, "general.alignment") {
        None => Ok(DEFAULT_ALIGNMENT),
        Some(MetadataValue::U32(a)) if a.is_power_of_two() => Ok(u64::from(*a)),
        Some(other) => Err(GgufError::BadAlignment(format!("{other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_model() -> GgufWriter {
        GgufWriter::new()
            .metadata(
                "general.architecture",
                MetadataValue::String("llama".into()),
            )
            .metadata("general.name", MetadataValue::String("tiny".into()))
            .tensor("token_embd.weight", GgmlType::Q4_1, &[64, 4], vec![1; 160])
            .tensor("blk.0.attn_q.weight", GgmlType::Q4_1, &[64, 2], vec![2; 80])
            .tensor("blk.0.ffn_up.weight", GgmlType::Q8_0, &[32, 2], vec![3; 68])
            .tensor("output_norm.weight", GgmlType::F32, &[64], vec![4; 256])
    }

    fn parse(bytes: &[u8]) -> GgufHeader {
        match GgufHeader::parse_prefix(bytes, &Limits::default()).unwrap() {
            ParseOutcome::Complete(header) => header,
            ParseOutcome::NeedMore { at_least } => panic!("needs {at_least} bytes"),
        }
    }

    #[test]
    fn summary_falls_back_to_the_most_common_matrix_type() {
        let header = parse(&tiny_model().to_bytes().unwrap());
        let summary = header.summary();
        assert_eq!(summary.architecture.as_deref(), Some("llama"));
        assert_eq!(summary.name.as_deref(), Some("tiny"));
        assert_eq!(summary.file_type, None);
        assert_eq!(summary.quantization.as_deref(), Some("Q4_1"));
        assert_eq!(summary.tensor_count, 4);
    }

    #[test]
    fn summary_prefers_general_file_type() {
        let bytes = tiny_model()
            .metadata("general.file_type", MetadataValue::U32(15))
            .to_bytes()
            .unwrap();
        let summary = parse(&bytes).summary();
        assert_eq!(summary.file_type, Some(15));
        assert_eq!(summary.quantization.as_deref(), Some("Q4_K_M"));
    }

    #[test]
    fn matrix_type_ties_go_to_the_lower_type_id() {
        let header = parse(
            &GgufWriter::new()
                .tensor("b", GgmlType::Q8_0, &[32, 1], vec![0; 34])
                .tensor("a", GgmlType::F16, &[1, 1], vec![0; 2])
                .to_bytes()
                .unwrap(),
        );
        assert_eq!(header.summary().quantization.as_deref(), Some("F16"));
    }

    #[test]
    fn a_complete_file_passes_the_size_check_and_a_truncated_one_fails() {
        let bytes = tiny_model().to_bytes().unwrap();
        let header = parse(&bytes);
        header.validate_against_size(bytes.len() as u64).unwrap();
        let err = header
            .validate_against_size(bytes.len() as u64 - 1)
            .unwrap_err();
        assert!(
            matches!(&err, GgufError::TensorOutOfBounds { tensor, .. } if tensor == "output_norm.weight"),
            "{err}"
        );
    }

    #[test]
    fn data_starts_at_the_aligned_header_end_with_custom_alignment() {
        let bytes = tiny_model()
            .metadata("general.alignment", MetadataValue::U32(64))
            .to_bytes()
            .unwrap();
        let header = parse(&bytes);
        assert_eq!(header.alignment(), 64);
        assert_eq!(header.data_offset() % 64, 0);
        assert!(header.data_offset() >= header.header_len());
        for tensor in header.tensors() {
            assert_eq!(tensor.offset % 64, 0);
        }
        header.validate_against_size(bytes.len() as u64).unwrap();
    }

    #[test]
    fn overlapping_and_misaligned_tensors_are_refused() {
        let mut header = parse(&tiny_model().to_bytes().unwrap());
        header.tensors[1].offset = header.tensors[0].offset;
        assert!(matches!(
            header.validate_against_size(1 << 20),
            Err(GgufError::OverlappingTensors { .. })
        ));
        header.tensors[1].offset = 1;
        assert!(matches!(
            header.validate_against_size(1 << 20),
            Err(GgufError::MisalignedTensor { offset: 1, .. })
        ));
    }

    #[test]
    fn unknown_tensor_types_parse_but_fail_the_size_check() {
        let mut header = parse(&tiny_model().to_bytes().unwrap());
        header.tensors[0].ggml_type = GgmlType(23);
        let err = header.validate_against_size(1 << 20).unwrap_err();
        assert!(err.to_string().contains("type 23"), "{err}");
    }

    #[test]
    fn tensor_sizes_follow_block_layouts() {
        assert_eq!(tensor_data_bytes(GgmlType::Q4_0, &[64, 3]), Ok(2 * 18 * 3));
        assert_eq!(tensor_data_bytes(GgmlType::Q6_K, &[256, 2]), Ok(420));
        assert_eq!(tensor_data_bytes(GgmlType::F32, &[5]), Ok(20));
        assert!(matches!(
            tensor_data_bytes(GgmlType::Q4_K, &[100, 2]),
            Err(TensorSizeError::PartialBlock { block: 256, .. })
        ));
        assert_eq!(
            tensor_data_bytes(GgmlType::F32, &[u64::MAX, 2]),
            Err(TensorSizeError::Overflow)
        );
    }

    #[test]
    fn read_from_reads_the_header_incrementally_and_reports_truncation() {
        let long_string = "x".repeat(200_000);
        let bytes = tiny_model()
            .metadata(
                "tokenizer.chat_template",
                MetadataValue::String(long_string.clone()),
            )
            .to_bytes()
            .unwrap();
        let header = GgufHeader::read_from(&bytes[..], &Limits::default()).unwrap();
        assert_eq!(
            header
                .get("tokenizer.chat_template")
                .and_then(MetadataValue::as_str),
            Some(long_string.as_str())
        );
        let cut = &bytes[..100_000];
        assert!(matches!(
            GgufHeader::read_from(cut, &Limits::default()),
            Err(GgufError::Truncated {
                available: 100_000,
                ..
            })
        ));
    }

    #[test]
    fn read_from_never_reads_past_the_header_limit() {
        let bytes = tiny_model()
            .metadata("big", MetadataValue::String("y".repeat(10_000)))
            .to_bytes()
            .unwrap();
        let limits = Limits {
            max_header_bytes: 4096,
            ..Limits::default()
        };
        assert!(matches!(
            GgufHeader::read_from(&bytes[..], &limits),
            Err(GgufError::HeaderTooLarge { limit: 4096, .. })
        ));
    }
}
