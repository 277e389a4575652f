//! Typed reads of GGUF metadata values, tolerant of the integer widths different converters write.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;

use crate::error::{InferenceError, Result};

/// The key/value metadata of one GGUF file.
pub(crate) struct Metadata<'a> {
    values: &'a HashMap<String, Value>,
}

fn bad(key: &str, detail: impl Into<String>) -> InferenceError {
    InferenceError::BadMetadata {
        key: key.to_string(),
        detail: detail.into(),
    }
}

fn missing(key: &str) -> InferenceError {
    InferenceError::MissingMetadata {
        key: key.to_string(),
    }
}

/// Any GGUF integer as i64: converters disagree on u32/i32/u64 for the same key.
fn integer(value: &Value) -> Option<i64> {
    Some(match value {
        Value::U8(v) => i64::from(*v),
        Value::I8(v) => i64::from(*v),
        Value::U16(v) => i64::from(*v),
        Value::I16(v) => i64::from(*v),
        Value::U32(v) => i64::from(*v),
        Value::I32(v) => i64::from(*v),
        Value::U64(v) => i64::try_from(*v).ok()?,
        Value::I64(v) => *v,
        _ => return None,
    })
}

impl<'a> Metadata<'a> {
    pub(crate) fn new(values: &'a HashMap<String, Value>) -> Self {
        Self { values }
    }

    pub(crate) fn string(&self, key: &str) -> Result<Option<&'a str>> {
        match self.values.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(other) => Err(bad(
                key,
                format!("expected a string, found {:?}", other.value_type()),
            )),
        }
    }

    pub(crate) fn required_string(&self, key: &str) -> Result<&'a str> {
        self.string(key)?.ok_or_else(|| missing(key))
    }

    pub(crate) fn unsigned(&self, key: &str) -> Result<Option<u64>> {
        match self.values.get(key) {
            None => Ok(None),
            Some(value) => integer(value)
                .and_then(|v| u64::try_from(v).ok())
                .map(Some)
                .ok_or_else(|| {
                    bad(
                        key,
                        format!("expected a non-negative integer, found {value:?}"),
                    )
                }),
        }
    }

    pub(crate) fn required_unsigned(&self, key: &str) -> Result<u64> {
        self.unsigned(key)?.ok_or_else(|| missing(key))
    }

    pub(crate) fn boolean(&self, key: &str) -> Result<Option<bool>> {
        match self.values.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(value) => integer(value)
                .map(|v| Some(v != 0))
                .ok_or_else(|| bad(key, format!("expected a boolean, found {value:?}"))),
        }
    }

    fn array(&self, key: &str) -> Result<Option<&'a [Value]>> {
        match self.values.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => Ok(Some(items.as_slice())),
            Some(other) => Err(bad(
                key,
                format!("expected an array, found {:?}", other.value_type()),
            )),
        }
    }

    /// The array at `key` with every item converted by `convert` (`None`: not a `what`).
    fn typed_array<T>(
        &self,
        key: &str,
        what: &str,
        convert: impl Fn(&'a Value) -> Option<T>,
    ) -> Result<Option<Vec<T>>> {
        let Some(items) = self.array(key)? else {
            return Ok(None);
        };
        items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                convert(item).ok_or_else(|| bad(key, format!("item {i} is not {what}")))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    pub(crate) fn string_array(&self, key: &str) -> Result<Option<Vec<&'a str>>> {
        self.typed_array(key, "a string", |item| match item {
            Value::String(s) => Some(s.as_str()),
            _ => None,
        })
    }

    pub(crate) fn integer_array(&self, key: &str) -> Result<Option<Vec<i64>>> {
        self.typed_array(key, "an integer", integer)
    }

    pub(crate) fn float_array(&self, key: &str) -> Result<Option<Vec<f32>>> {
        self.typed_array(key, "a number", |item| match item {
            Value::F32(v) => Some(*v),
            Value::F64(v) => Some(*v as f32),
            other => integer(other).map(|v| v as f32),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_of_any_width_read_as_unsigned() {
        let mut values = HashMap::new();
        values.insert("a".to_string(), Value::I32(7));
        values.insert("b".to_string(), Value::U64(8));
        values.insert("c".to_string(), Value::I32(-1));
        values.insert("d".to_string(), Value::String("x".into()));
        let md = Metadata::new(&values);
        assert_eq!(md.unsigned("a").unwrap(), Some(7));
        assert_eq!(md.unsigned("b").unwrap(), Some(8));
        assert!(md.unsigned("c").is_err());
        assert!(md.unsigned("d").is_err());
        assert_eq!(md.unsigned("absent").unwrap(), None);
        assert!(matches!(
            md.required_unsigned("absent"),
            Err(InferenceError::MissingMetadata { .. })
        ));
    }

    #[test]
    fn arrays_are_checked_item_by_item() {
        let mut values = HashMap::new();
        values.insert(
            "s".to_string(),
            Value::Array(vec![Value::String("a".into()), Value::U8(1)]),
        );
        values.insert(
            "f".to_string(),
            Value::Array(vec![Value::F32(0.5), Value::I32(2)]),
        );
        let md = Metadata::new(&values);
        assert!(md.string_array("s").is_err());
        assert_eq!(md.float_array("f").unwrap(), Some(vec![0.5, 2.0]));
        assert_eq!(md.integer_array("f").ok(), None);
    }
}
