//! The bounded GGUF header reader behind [`GgufHeader::parse_prefix`].

use std::collections::HashSet;

use super::{
    alignment_of, GgmlType, GgufError, GgufHeader, Limits, MetadataArray, MetadataValue,
    ParseOutcome, TensorInfo, ValueType,
};

/// Why parsing stopped before a complete header.
enum Stop {
    /// The prefix ends early; the header needs at least this many bytes in total.
    NeedMore(u64),
    Invalid(GgufError),
}

impl From<GgufError> for Stop {
    fn from(err: GgufError) -> Self {
        Self::Invalid(err)
    }
}

type Parsed<T> = Result<T, Stop>;

/// Minimum bytes of one metadata entry: empty key (u64 length), value type, one byte.
const MIN_ENTRY_BYTES: u64 = 8 + 4 + 1;
/// Minimum bytes of one tensor info: empty name, n_dims, one dim, type, offset.
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 8 + 4 + 8;

pub(super) fn parse_prefix(prefix: &[u8], limits: &Limits) -> Result<ParseOutcome, GgufError> {
    let mut cursor = Cursor {
        buf: prefix,
        pos: 0,
        limits,
    };
    match cursor.header() {
        Ok(header) => Ok(ParseOutcome::Complete(header)),
        Err(Stop::NeedMore(at_least)) => Ok(ParseOutcome::NeedMore { at_least }),
        Err(Stop::Invalid(err)) => Err(err),
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    limits: &'a Limits,
}

impl<'a> Cursor<'a> {
    fn offset(&self) -> u64 {
        self.pos as u64
    }

    /// Checks that `n` more bytes can be part of the header and are in the prefix.
    fn ensure(&self, n: u64) -> Parsed<()> {
        let end = self.offset().saturating_add(n);
        if end > self.limits.max_header_bytes {
            return Err(Stop::Invalid(GgufError::HeaderTooLarge {
                needed: end,
                limit: self.limits.max_header_bytes,
            }));
        }
        if end > self.buf.len() as u64 {
            return Err(Stop::NeedMore(end));
        }
        Ok(())
    }

    fn take(&mut self, n: u64) -> Parsed<&'a [u8]> {
        self.ensure(n)?;
        // ensure() proved pos + n <= buf.len(), so n fits in usize.
        let n = n as usize;
        let bytes = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Parsed<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N as u64)?);
        Ok(out)
    }

    fn u32(&mut self) -> Parsed<u32> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Parsed<u64> {
        self.array().map(u64::from_le_bytes)
    }

    /// A count or length, refused above `limit`.
    fn bounded_u64(&mut self, what: &'static str, limit: u64) -> Parsed<u64> {
        let value = self.u64()?;
        if value > limit {
            return Err(Stop::Invalid(GgufError::LimitExceeded {
                what,
                value,
                limit,
            }));
        }
        Ok(value)
    }

    fn string(&mut self) -> Parsed<String> {
        let len = self.bounded_u64("string length", self.limits.max_string_bytes)?;
        let offset = self.offset();
        let bytes = self.take(len)?;
        let text = std::str::from_utf8(bytes).map_err(|_| GgufError::InvalidUtf8 { offset })?;
        Ok(text.to_owned())
    }

    fn bool(&mut self) -> Parsed<bool> {
        let offset = self.offset();
        match self.array::<1>()?[0] {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(Stop::Invalid(GgufError::InvalidBool { value, offset })),
        }
    }

    fn value_type(&mut self) -> Parsed<ValueType> {
        let offset = self.offset();
        let type_id = self.u32()?;
        ValueType::from_id(type_id).ok_or(Stop::Invalid(GgufError::UnknownValueType {
            type_id,
            offset,
        }))
    }

    /// Reads `len` elements with `read`, after checking that they can fit in what is
    /// left of the header; the up-front reservation is capped so that a large claimed
    /// length costs nothing until its bytes are actually there.
    fn repeat<T>(
        &mut self,
        len: u64,
        min_bytes_each: u64,
        mut read: impl FnMut(&mut Self) -> Parsed<T>,
    ) -> Parsed<Vec<T>> {
        self.ensure(len.saturating_mul(min_bytes_each))?;
        let mut out = Vec::with_capacity(len.min(1024) as usize);
        for _ in 0..len {
            out.push(read(self)?);
        }
        Ok(out)
    }

    fn value(&mut self, value_type: ValueType, depth: u32) -> Parsed<MetadataValue> {
        Ok(match value_type {
            ValueType::U8 => MetadataValue::U8(u8::from_le_bytes(self.array()?)),
            ValueType::I8 => MetadataValue::I8(i8::from_le_bytes(self.array()?)),
            ValueType::U16 => MetadataValue::U16(u16::from_le_bytes(self.array()?)),
            ValueType::I16 => MetadataValue::I16(i16::from_le_bytes(self.array()?)),
            ValueType::U32 => MetadataValue::U32(self.u32()?),
            ValueType::I32 => MetadataValue::I32(i32::from_le_bytes(self.array()?)),
            ValueType::F32 => MetadataValue::F32(f32::from_le_bytes(self.array()?)),
            ValueType::Bool => MetadataValue::Bool(self.bool()?),
            ValueType::String => MetadataValue::String(self.string()?),
            ValueType::Array => MetadataValue::Array(self.metadata_array(depth + 1)?),
            ValueType::U64 => MetadataValue::U64(self.u64()?),
            ValueType::I64 => MetadataValue::I64(i64::from_le_bytes(self.array()?)),
            ValueType::F64 => MetadataValue::F64(f64::from_le_bytes(self.array()?)),
        })
    }

    fn metadata_array(&mut self, depth: u32) -> Parsed<MetadataArray> {
        if depth > self.limits.max_array_depth {
            return Err(Stop::Invalid(GgufError::LimitExceeded {
                what: "array nesting depth",
                value: depth.into(),
                limit: self.limits.max_array_depth.into(),
            }));
        }
        let element_type = self.value_type()?;
        let len = self.bounded_u64("array length", self.limits.max_array_len)?;
        let min = element_type.min_encoded_bytes();
        Ok(match element_type {
            ValueType::U8 => {
                MetadataArray::U8(self.repeat(len, min, |c| c.array().map(u8::from_le_bytes))?)
            }
            ValueType::I8 => {
                MetadataArray::I8(self.repeat(len, min, |c| c.array().map(i8::from_le_bytes))?)
            }
            ValueType::U16 => {
                MetadataArray::U16(self.repeat(len, min, |c| c.array().map(u16::from_le_bytes))?)
            }
            ValueType::I16 => {
                MetadataArray::I16(self.repeat(len, min, |c| c.array().map(i16::from_le_bytes))?)
            }
            ValueType::U32 => MetadataArray::U32(self.repeat(len, min, Self::u32)?),
            ValueType::I32 => {
                MetadataArray::I32(self.repeat(len, min, |c| c.array().map(i32::from_le_bytes))?)
            }
            ValueType::F32 => {
                MetadataArray::F32(self.repeat(len, min, |c| c.array().map(f32::from_le_bytes))?)
            }
            ValueType::Bool => MetadataArray::Bool(self.repeat(len, min, Self::bool)?),
            ValueType::String => MetadataArray::String(self.repeat(len, min, Self::string)?),
            ValueType::Array => {
                MetadataArray::Array(self.repeat(len, min, |c| c.metadata_array(depth + 1))?)
            }
            ValueType::U64 => MetadataArray::U64(self.repeat(len, min, Self::u64)?),
            ValueType::I64 => {
                MetadataArray::I64(self.repeat(len, min, |c| c.array().map(i64::from_le_bytes))?)
            }
            ValueType::F64 => {
                MetadataArray::F64(self.repeat(len, min, |c| c.array().map(f64::from_le_bytes))?)
            }
        })
    }

    fn tensor_info(&mut self) -> Parsed<TensorInfo> {
        let name = self.string()?;
        let n_dims = self.u32()?;
        if n_dims == 0 || n_dims > self.limits.max_dims {
            return Err(Stop::Invalid(GgufError::BadDimensionCount {
                tensor: name,
                n_dims,
                limit: self.limits.max_dims,
            }));
        }
        let dims = self.repeat(n_dims.into(), 8, Self::u64)?;
        let ggml_type = GgmlType(self.u32()?);
        let offset = self.u64()?;
        Ok(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
        })
    }

    fn header(&mut self) -> Parsed<GgufHeader> {
        let magic: [u8; 4] = self.array()?;
        if &magic != b"GGUF" {
            return Err(Stop::Invalid(GgufError::NotGguf { found: magic }));
        }
        let version = self.u32()?;
        match version {
            2 | 3 => {}
            v if matches!(v.swap_bytes(), 2 | 3) => {
                return Err(Stop::Invalid(GgufError::BigEndian))
            }
            v => return Err(Stop::Invalid(GgufError::UnsupportedVersion(v))),
        }
        let tensor_count = self.bounded_u64("tensor count", self.limits.max_tensors)?;
        let entry_count =
            self.bounded_u64("metadata entry count", self.limits.max_metadata_entries)?;

        let mut keys = HashSet::new();
        let metadata = self.repeat(entry_count, MIN_ENTRY_BYTES, |c| {
            let key = c.string()?;
            if !keys.insert(key.clone()) {
                return Err(Stop::Invalid(GgufError::DuplicateKey(key)));
            }
            let value_type = c.value_type()?;
            Ok((key, c.value(value_type, 0)?))
        })?;
        let alignment = alignment_of(&metadata)?;

        let mut names = HashSet::new();
        let tensors = self.repeat(tensor_count, MIN_TENSOR_INFO_BYTES, |c| {
            let tensor = c.tensor_info()?;
            if !names.insert(tensor.name.clone()) {
                return Err(Stop::Invalid(GgufError::DuplicateTensor(tensor.name)));
            }
            Ok(tensor)
        })?;

        Ok(GgufHeader {
            version,
            metadata,
            tensors,
            alignment,
            header_len: self.offset(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::GgufWriter;

    fn every_value_type() -> Vec<(&'static str, MetadataValue)> {
        vec![
            ("u8", MetadataValue::U8(200)),
            ("i8", MetadataValue::I8(-100)),
            ("u16", MetadataValue::U16(60_000)),
            ("i16", MetadataValue::I16(-30_000)),
            ("u32", MetadataValue::U32(4_000_000_000)),
            ("i32", MetadataValue::I32(-2_000_000_000)),
            ("f32", MetadataValue::F32(1.5)),
            ("bool", MetadataValue::Bool(true)),
            ("string", MetadataValue::String("héllo".into())),
            ("u64", MetadataValue::U64(u64::MAX)),
            ("i64", MetadataValue::I64(i64::MIN)),
            ("f64", MetadataValue::F64(-0.25)),
            (
                "strings",
                MetadataValue::Array(MetadataArray::String(vec!["a".into(), "".into()])),
            ),
            (
                "nested",
                MetadataValue::Array(MetadataArray::Array(vec![
                    MetadataArray::U8(vec![1, 2, 3]),
                    MetadataArray::Array(vec![MetadataArray::F64(vec![0.5])]),
                    MetadataArray::Bool(vec![false, true]),
                ])),
            ),
            (
                "i16s",
                MetadataValue::Array(MetadataArray::I16(vec![-1, 1])),
            ),
            ("empty", MetadataValue::Array(MetadataArray::U64(vec![]))),
        ]
    }

    fn file_with_every_value_type() -> Vec<u8> {
        every_value_type()
            .into_iter()
            .fold(GgufWriter::new(), |w, (key, value)| w.metadata(key, value))
            .tensor("w", GgmlType::F16, &[2, 3], vec![0; 12])
            .to_bytes()
            .unwrap()
    }

    fn parse(bytes: &[u8], limits: &Limits) -> Result<ParseOutcome, GgufError> {
        parse_prefix(bytes, limits)
    }

    fn complete(bytes: &[u8]) -> GgufHeader {
        match parse(bytes, &Limits::default()).unwrap() {
            ParseOutcome::Complete(header) => header,
            ParseOutcome::NeedMore { at_least } => panic!("needs {at_least} bytes"),
        }
    }

    /// A hand-written header: magic, version, counts, then `rest`.
    fn raw_header(version: u32, tensors: u64, entries: u64, rest: &[u8]) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend_from_slice(&version.to_le_bytes());
        out.extend_from_slice(&tensors.to_le_bytes());
        out.extend_from_slice(&entries.to_le_bytes());
        out.extend_from_slice(rest);
        out
    }

    fn gguf_string(s: &str) -> Vec<u8> {
        let mut out = (s.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(s.as_bytes());
        out
    }

    #[test]
    fn every_value_type_round_trips_through_the_writer() {
        let header = complete(&file_with_every_value_type());
        let expected: Vec<(String, MetadataValue)> = every_value_type()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        assert_eq!(header.metadata(), expected.as_slice());
        assert_eq!(header.version(), 3);
        assert_eq!(
            header.tensors(),
            &[TensorInfo {
                name: "w".into(),
                dims: vec![2, 3],
                ggml_type: GgmlType::F16,
                offset: 0,
            }]
        );
    }

    #[test]
    fn version_2_parses_and_others_are_refused() {
        let mut bytes = file_with_every_value_type();
        bytes[4..8].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(complete(&bytes).version(), 2);
        bytes[4..8].copy_from_slice(&1u32.to_le_bytes());
        assert!(matches!(
            parse(&bytes, &Limits::default()),
            Err(GgufError::UnsupportedVersion(1))
        ));
        bytes[4..8].copy_from_slice(&3u32.to_be_bytes());
        assert!(matches!(
            parse(&bytes, &Limits::default()),
            Err(GgufError::BigEndian)
        ));
    }

    #[test]
    fn every_proper_prefix_asks_for_more_and_the_answer_makes_progress() {
        let bytes = file_with_every_value_type();
        let header_len = complete(&bytes).header_len() as usize;
        let mut len = 0;
        let mut parses = 0;
        loop {
            parses += 1;
            match parse(&bytes[..len], &Limits::default()).unwrap() {
                ParseOutcome::Complete(header) => {
                    assert_eq!(header.header_len() as usize, header_len);
                    break;
                }
                ParseOutcome::NeedMore { at_least } => {
                    assert!(at_least as usize > len && at_least as usize <= header_len);
                    len = at_least as usize;
                }
            }
        }
        assert!(parses < 100);
        for cut in 0..header_len {
            assert!(matches!(
                parse(&bytes[..cut], &Limits::default()).unwrap(),
                ParseOutcome::NeedMore { .. }
            ));
        }
    }

    #[test]
    fn wrong_magic_is_refused() {
        let err = parse(b"GGML\x03\0\0\0", &Limits::default()).unwrap_err();
        assert!(err.to_string().contains("not a GGUF file"), "{err}");
    }

    #[test]
    fn huge_counts_are_refused_without_allocating() {
        let bytes = raw_header(3, u64::MAX, 0, &[]);
        assert!(matches!(
            parse(&bytes, &Limits::default()),
            Err(GgufError::LimitExceeded {
                what: "tensor count",
                ..
            })
        ));
        // Within the count limit but more than the header limit can hold.
        let bytes = raw_header(3, 1 << 20, 0, &[]);
        let limits = Limits {
            max_header_bytes: 1 << 20,
            ..Limits::default()
        };
        assert!(matches!(
            parse(&bytes, &limits),
            Err(GgufError::HeaderTooLarge { .. })
        ));
    }

    #[test]
    fn huge_strings_and_arrays_are_refused() {
        let mut entry = gguf_string("k");
        entry.extend_from_slice(&8u32.to_le_bytes());
        entry.extend_from_slice(&u64::MAX.to_le_bytes());
        let err = parse(&raw_header(3, 0, 1, &entry), &Limits::default()).unwrap_err();
        assert!(matches!(
            err,
            GgufError::LimitExceeded {
                what: "string length",
                ..
            }
        ));

        let mut entry = gguf_string("k");
        entry.extend_from_slice(&9u32.to_le_bytes());
        entry.extend_from_slice(&10u32.to_le_bytes()); // u64 elements
        entry.extend_from_slice(&(1u64 << 24).to_le_bytes());
        let err = parse(&raw_header(3, 0, 1, &entry), &Limits::default()).unwrap_err();
        assert!(matches!(err, GgufError::HeaderTooLarge { .. }), "{err}");
    }

    #[test]
    fn deeply_nested_arrays_are_refused() {
        let mut entry = gguf_string("k");
        entry.extend_from_slice(&9u32.to_le_bytes());
        for _ in 0..20 {
            entry.extend_from_slice(&9u32.to_le_bytes());
            entry.extend_from_slice(&1u64.to_le_bytes());
        }
        let err = parse(&raw_header(3, 0, 1, &entry), &Limits::default()).unwrap_err();
        assert!(
            matches!(
                err,
                GgufError::LimitExceeded {
                    what: "array nesting depth",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn malformed_values_are_refused() {
        let mut entry = gguf_string("k");
        entry.extend_from_slice(&13u32.to_le_bytes());
        assert!(matches!(
            parse(&raw_header(3, 0, 1, &entry), &Limits::default()),
            Err(GgufError::UnknownValueType { type_id: 13, .. })
        ));

        let mut entry = gguf_string("k");
        entry.extend_from_slice(&7u32.to_le_bytes());
        entry.push(2);
        assert!(matches!(
            parse(&raw_header(3, 0, 1, &entry), &Limits::default()),
            Err(GgufError::InvalidBool { value: 2, .. })
        ));

        // Key bytes 0xff 0xfe, then a u8 value.
        let mut entry = 2u64.to_le_bytes().to_vec();
        entry.extend_from_slice(&[0xff, 0xfe, 0, 0, 0, 0, 1]);
        assert!(matches!(
            parse(&raw_header(3, 0, 1, &entry), &Limits::default()),
            Err(GgufError::InvalidUtf8 { offset: 32 })
        ));
    }

    #[test]
    fn duplicate_keys_and_tensors_are_refused() {
        let mut entry = gguf_string("k");
        entry.extend_from_slice(&0u32.to_le_bytes());
        entry.push(1);
        let twice = [entry.clone(), entry].concat();
        assert!(matches!(
            parse(&raw_header(3, 0, 2, &twice), &Limits::default()),
            Err(GgufError::DuplicateKey(key)) if key == "k"
        ));

        let mut info = gguf_string("t");
        info.extend_from_slice(&1u32.to_le_bytes());
        info.extend_from_slice(&4u64.to_le_bytes());
        info.extend_from_slice(&0u32.to_le_bytes());
        info.extend_from_slice(&0u64.to_le_bytes());
        let twice = [info.clone(), info].concat();
        assert!(matches!(
            parse(&raw_header(3, 2, 0, &twice), &Limits::default()),
            Err(GgufError::DuplicateTensor(name)) if name == "t"
        ));
    }

    #[test]
    fn bad_dimension_counts_and_alignments_are_refused() {
        let mut info = gguf_string("t");
        info.extend_from_slice(&5u32.to_le_bytes());
        info.resize(64, 0);
        assert!(matches!(
            parse(&raw_header(3, 1, 0, &info), &Limits::default()),
            Err(GgufError::BadDimensionCount { n_dims: 5, .. })
        ));

        // (value type id, value bytes): zero, not a power of two, and the wrong type.
        let bad_alignments = [
            (4u32, 0u32.to_le_bytes().to_vec()),
            (4, 48u32.to_le_bytes().to_vec()),
            (10, 32u64.to_le_bytes().to_vec()),
        ];
        for (value_type, value) in bad_alignments {
            let mut entry = gguf_string("general.alignment");
            entry.extend_from_slice(&value_type.to_le_bytes());
            entry.extend_from_slice(&value);
            assert!(matches!(
                parse(&raw_header(3, 0, 1, &entry), &Limits::default()),
                Err(GgufError::BadAlignment(_))
            ));
        }
    }

    #[test]
    fn random_bytes_after_the_magic_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let valid = file_with_every_value_type();
        for _ in 0..2000 {
            let mut bytes = valid.clone();
            for _ in 0..rng.gen_range(1..8) {
                let i = rng.gen_range(8..bytes.len());
                bytes[i] = rng.gen();
            }
            let _ = parse(&bytes, &Limits::default());
        }
    }
}
