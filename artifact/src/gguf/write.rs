//! A small GGUF (version 3) writer, for tests here and in other crates that need tiny
//! model files with chosen metadata and tensors, and [`sample_gguf`], a ready-made file
//! of any size.

use super::{
    alignment_of, GgmlType, GgufError, MetadataArray, MetadataValue, TensorInfo, ValueType,
};

/// Builds a GGUF file in memory.
///
/// ```
/// use nanofleet_artifact::gguf::{GgmlType, GgufWriter, MetadataValue};
/// let bytes = GgufWriter::new()
///     .metadata("general.architecture", MetadataValue::String("llama".into()))
///     .tensor("output.weight", GgmlType::Q8_0, &[32, 2], vec![0; 68])
///     .to_bytes()
///     .unwrap();
/// assert_eq!(&bytes[..4], b"GGUF");
/// ```
#[derive(Clone, Debug, Default)]
pub struct GgufWriter {
    metadata: Vec<(String, MetadataValue)>,
    tensors: Vec<(TensorInfo, Vec<u8>)>,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a metadata entry. `general.alignment` (a `U32`) sets the data alignment.
    pub fn metadata(mut self, key: impl Into<String>, value: MetadataValue) -> Self {
        self.metadata.push((key.into(), value));
        self
    }

    /// Adds a tensor; `data` must be exactly [`super::tensor_data_bytes`] long.
    pub fn tensor(
        mut self,
        name: impl Into<String>,
        ggml_type: GgmlType,
        dims: &[u64],
        data: Vec<u8>,
    ) -> Self {
        let info = TensorInfo {
            name: name.into(),
            dims: dims.to_vec(),
            ggml_type,
            offset: 0,
        };
        self.tensors.push((info, data));
        self
    }

    /// The file: header, padding to the alignment, then each tensor's data at its
    /// aligned offset.
    pub fn to_bytes(&self) -> Result<Vec<u8>, GgufError> {
        let alignment = alignment_of(&self.metadata)?;
        let mut infos = Vec::with_capacity(self.tensors.len());
        let mut next_offset = 0u64;
        for (info, data) in &self.tensors {
            let expected = info.data_bytes()?;
            if expected != data.len() as u64 {
                return Err(GgufError::TensorDataLength {
                    tensor: info.name.clone(),
                    expected,
                    got: data.len() as u64,
                });
            }
            infos.push(TensorInfo {
                offset: next_offset,
                ..info.clone()
            });
            next_offset = (next_offset + expected).next_multiple_of(alignment);
        }

        let mut out = b"GGUF".to_vec();
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(infos.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            write_string(&mut out, key);
            out.extend_from_slice(&(value_type(value) as u32).to_le_bytes());
            write_value(&mut out, value);
        }
        for info in &infos {
            write_string(&mut out, &info.name);
            out.extend_from_slice(&(info.dims.len() as u32).to_le_bytes());
            for dim in &info.dims {
                out.extend_from_slice(&dim.to_le_bytes());
            }
            out.extend_from_slice(&info.ggml_type.0.to_le_bytes());
            out.extend_from_slice(&info.offset.to_le_bytes());
        }
        let data_start = (out.len() as u64).next_multiple_of(alignment);
        for (info, (_, data)) in infos.iter().zip(&self.tensors) {
            out.resize((data_start + info.offset) as usize, 0);
            out.extend_from_slice(data);
        }
        out.resize(out.len().max(data_start as usize), 0);
        Ok(out)
    }
}

/// A well-formed GGUF file with two Q8_0 tensors of `rows` rows each (34 bytes a row):
/// as big or small as wanted, but not a model that loads. For store-only agents, the
/// coordinator's checks, and the fleet simulator's rollouts; `seed` varies the bytes.
pub fn sample_gguf(architecture: &str, seed: u8, rows: u64) -> Vec<u8> {
    let block = |i: usize| -> Vec<u8> {
        // Q8_0 block: f16 scale (1.0) then 32 int8 quants.
        let mut b = vec![0x00, 0x3c];
        b.extend((0..32).map(|j| {
            (i as u8)
                .wrapping_mul(31)
                .wrapping_add(j as u8)
                .wrapping_add(seed)
        }));
        b
    };
    let tensor = |rows: usize| (0..rows).flat_map(block).collect::<Vec<u8>>();
    GgufWriter::new()
        .metadata(
            "general.architecture",
            MetadataValue::String(architecture.into()),
        )
        .metadata(
            "general.name",
            MetadataValue::String("tiny test model".into()),
        )
        .tensor(
            "blk.0.attn_q.weight",
            GgmlType::Q8_0,
            &[32, rows],
            tensor(rows as usize),
        )
        .tensor(
            "blk.0.ffn_up.weight",
            GgmlType::Q8_0,
            &[32, rows],
            tensor(rows as usize),
        )
        .to_bytes()
        .expect("the sample's tensors match their shapes")
}

fn write_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn value_type(value: &MetadataValue) -> ValueType {
    match value {
        MetadataValue::U8(_) => ValueType::U8,
        MetadataValue::I8(_) => ValueType::I8,
        MetadataValue::U16(_) => ValueType::U16,
        MetadataValue::I16(_) => ValueType::I16,
        MetadataValue::U32(_) => ValueType::U32,
        MetadataValue::I32(_) => ValueType::I32,
        MetadataValue::F32(_) => ValueType::F32,
        MetadataValue::Bool(_) => ValueType::Bool,
        MetadataValue::String(_) => ValueType::String,
        MetadataValue::Array(_) => ValueType::Array,
        MetadataValue::U64(_) => ValueType::U64,
        MetadataValue::I64(_) => ValueType::I64,
        MetadataValue::F64(_) => ValueType::F64,
    }
}

fn write_value(out: &mut Vec<u8>, value: &MetadataValue) {
    match value {
        MetadataValue::U8(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::Bool(v) => out.push(u8::from(*v)),
        MetadataValue::String(v) => write_string(out, v),
        MetadataValue::Array(v) => write_array(out, v),
        MetadataValue::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
    }
}

/// Writes an array's element type and length, then `encode` of each element.
fn write_elements<T>(
    out: &mut Vec<u8>,
    element_type: ValueType,
    elements: &[T],
    encode: impl Fn(&mut Vec<u8>, &T),
) {
    out.extend_from_slice(&(element_type as u32).to_le_bytes());
    out.extend_from_slice(&(elements.len() as u64).to_le_bytes());
    for element in elements {
        encode(out, element);
    }
}

fn write_array(out: &mut Vec<u8>, array: &MetadataArray) {
    match array {
        MetadataArray::U8(v) => write_elements(out, ValueType::U8, v, |o, e| {
            o.extend_from_slice(&e.to_le_bytes())
        }),
        MetadataArray::I8(v) => write_elements(out, ValueType::I8, v, |o, e| {
            o.extend_from_slice(&e.to_le_bytes())
        }),
        MetadataArray::U16(v) => write_elements(out, ValueType::U16, v, |o, e| {
            o.extend_from_slice(&e.to_le_bytes())
        }),
        MetadataArray::I16(v) => write_elements(out, ValueType::I16, v, |o, e| {
            o.extend_from_slice(&e.to_le_bytes())
        }),
        MetadataArray::U32(v) => write_elements(out, ValueType::U32, v, |o, e| {
            o.extend_from_slice(&e.to_le_bytes())
        }),
        MetadataArray::I32(v) => write_elements(out, ValueType::I32, v, |o, e| {
            o.extend_from_slice(&e.to_le_bytes())
        }),
        MetadataArray::F32(v) => write_elements(out, ValueType::F32, v, |o, e| {
            o.extend_from_slice(&e.to_le_bytes())
        }),
        MetadataArray::Bool(v) => {
            write_elements(out, ValueType::Bool, v, |o, e| o.push(u8::from(*e)))
        }
        MetadataArray::String(v) => {
            write_elements(out, ValueType::String, v, |o, e| write_string(o, e))
        }
        MetadataArray::Array(v) => write_elements(out, ValueType::Array, v, write_array),
        MetadataArray::U64(v) => write_elements(out, ValueType::U64, v, |o, e| {
            o.extend_from_slice(&e.to_le_bytes())
        }),
        MetadataArray::I64(v) => write_elements(out, ValueType::I64, v, |o, e| {
            o.extend_from_slice(&e.to_le_bytes())
        }),
        MetadataArray::F64(v) => write_elements(out, ValueType::F64, v, |o, e| {
            o.extend_from_slice(&e.to_le_bytes())
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_data_of_the_wrong_length_is_refused() {
        let err = GgufWriter::new()
            .tensor("w", GgmlType::Q4_0, &[32], vec![0; 17])
            .to_bytes()
            .unwrap_err();
        assert!(
            matches!(
                err,
                GgufError::TensorDataLength {
                    expected: 18,
                    got: 17,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_file_without_tensors_is_padded_to_the_data_start() {
        let bytes = GgufWriter::new().to_bytes().unwrap();
        assert_eq!(bytes.len(), 32);
    }

    #[test]
    fn the_sample_is_a_well_formed_file_of_the_size_asked() {
        let bytes = sample_gguf("llama", 1, 100);
        let header = crate::gguf::GgufHeader::read_from(&bytes[..], &Default::default()).unwrap();
        header.validate_against_size(bytes.len() as u64).unwrap();
        assert_eq!(header.summary().architecture.as_deref(), Some("llama"));
        assert!(bytes.len() > 2 * 100 * 34);
        assert_ne!(bytes, sample_gguf("llama", 2, 100));
    }
}
