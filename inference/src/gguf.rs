//! A GGUF file's header read into candle's `Content` by nanofleet-artifact's parser: the
//! bounded, fuzzed one the agent checks downloads with, in one pass over the mapped file
//! (candle's reader takes several times as long over a tokenizer's 100,000 strings).

use std::collections::HashMap;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value, VersionedMagic};
use candle_core::quantized::GgmlDType;
use nanofleet_artifact::gguf::{
    GgmlType, GgufError, GgufHeader, Limits, MetadataArray, MetadataValue, ParseOutcome,
};

use crate::error::{InferenceError, Result};

/// candle's `Content` of the GGUF file `file` (at `path`, for errors): its header parsed
/// from `mapped` (the whole file in memory) where given, else read from the file's start.
pub fn read_content(path: &Path, file: &std::fs::File, mapped: Option<&[u8]>) -> Result<Content> {
    let header = match mapped {
        Some(bytes) => parse(bytes),
        None => read(file),
    }
    .map_err(|source| InferenceError::Gguf {
        path: path.to_path_buf(),
        source,
    })?;
    into_content(header)
}

/// The header of a file held in memory whole (mapped), checked against the file's size.
fn parse(file: &[u8]) -> std::result::Result<GgufHeader, GgufError> {
    let header = match GgufHeader::parse_prefix(file, &Limits::default())? {
        ParseOutcome::Complete(header) => header,
        ParseOutcome::NeedMore { at_least } => {
            return Err(GgufError::Truncated {
                needed: at_least,
                available: file.len() as u64,
            })
        }
    };
    header.validate_against_size(file.len() as u64)?;
    Ok(header)
}

/// The header of `file`, read from its start and checked against its size.
fn read(file: &std::fs::File) -> std::result::Result<GgufHeader, GgufError> {
    let header = GgufHeader::read_from(BufReader::new(file), &Limits::default())?;
    header.validate_against_size(file.metadata()?.len())?;
    Ok(header)
}

/// candle's form of a parsed header, for its loaders.
fn into_content(header: GgufHeader) -> Result<Content> {
    let magic = match header.version() {
        1 => VersionedMagic::GgufV1,
        2 => VersionedMagic::GgufV2,
        _ => VersionedMagic::GgufV3,
    };
    let tensor_data_offset = header.data_offset();
    let (metadata, tensors) = header.into_parts();
    let metadata = metadata
        .into_iter()
        .map(|(key, value)| (key, value_of(value)))
        .collect();
    let tensor_infos = tensors
        .into_iter()
        .map(|info| {
            let ggml_dtype =
                dtype_of(info.ggml_type).ok_or_else(|| InferenceError::UnsupportedTensorType {
                    tensor: info.name.clone(),
                    type_name: info.ggml_type.name().into_owned(),
                })?;
            // ggml lists dimensions innermost first; candle's shapes outermost first.
            let shape: Vec<usize> = info.dims.iter().rev().map(|&d| d as usize).collect();
            let tensor = TensorInfo {
                ggml_dtype,
                shape: shape.into(),
                offset: info.offset,
            };
            Ok((info.name, tensor))
        })
        .collect::<Result<HashMap<_, _>>>()?;
    Ok(Content {
        magic,
        metadata,
        tensor_infos,
        tensor_data_offset,
    })
}

/// The tensor types candle loads (its `GgmlDType` numbering is ggml's).
fn dtype_of(ggml_type: GgmlType) -> Option<GgmlDType> {
    Some(match ggml_type.0 {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

fn value_of(value: MetadataValue) -> Value {
    match value {
        MetadataValue::U8(v) => Value::U8(v),
        MetadataValue::I8(v) => Value::I8(v),
        MetadataValue::U16(v) => Value::U16(v),
        MetadataValue::I16(v) => Value::I16(v),
        MetadataValue::U32(v) => Value::U32(v),
        MetadataValue::I32(v) => Value::I32(v),
        MetadataValue::U64(v) => Value::U64(v),
        MetadataValue::I64(v) => Value::I64(v),
        MetadataValue::F32(v) => Value::F32(v),
        MetadataValue::F64(v) => Value::F64(v),
        MetadataValue::Bool(v) => Value::Bool(v),
        MetadataValue::String(v) => Value::String(v),
        MetadataValue::Array(v) => Value::Array(array_of(v)),
    }
}

fn array_of(array: MetadataArray) -> Vec<Value> {
    fn each<T>(values: Vec<T>, wrap: fn(T) -> Value) -> Vec<Value> {
        values.into_iter().map(wrap).collect()
    }
    match array {
        MetadataArray::U8(v) => each(v, Value::U8),
        MetadataArray::I8(v) => each(v, Value::I8),
        MetadataArray::U16(v) => each(v, Value::U16),
        MetadataArray::I16(v) => each(v, Value::I16),
        MetadataArray::U32(v) => each(v, Value::U32),
        MetadataArray::I32(v) => each(v, Value::I32),
        MetadataArray::U64(v) => each(v, Value::U64),
        MetadataArray::I64(v) => each(v, Value::I64),
        MetadataArray::F32(v) => each(v, Value::F32),
        MetadataArray::F64(v) => each(v, Value::F64),
        MetadataArray::Bool(v) => each(v, Value::Bool),
        MetadataArray::String(v) => each(v, Value::String),
        MetadataArray::Array(v) => v.into_iter().map(|a| Value::Array(array_of(a))).collect(),
    }
}
