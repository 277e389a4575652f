//! An adapter, or one node's update to it, as PEFT-named f32 matrices in Hugging Face layout,
//! and its wire form: safetensors bytes, decoded with limits and strict names.

use std::collections::BTreeMap;

use safetensors::{Dtype, SafeTensors};

use crate::spec::Target;

/// Most matrices one adapter may hold: 7 targets × 2 halves × 256 layers.
pub const MAX_MATRICES: usize = 7 * 2 * 256;

/// Which half of a LoRA pair a matrix is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Half {
    /// (rank, in): the down projection.
    A,
    /// (out, rank): the up projection.
    B,
}

/// PEFT's name for one matrix: `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`.
pub fn peft_name(layer: usize, target: Target, half: Half) -> String {
    let block = match target {
        Target::Q | Target::K | Target::V | Target::O => "self_attn",
        Target::Gate | Target::Up | Target::Down => "mlp",
    };
    let half = match half {
        Half::A => "lora_A",
        Half::B => "lora_B",
    };
    format!(
        "base_model.model.model.layers.{layer}.{block}.{}.{half}.weight",
        target.peft_module()
    )
}

/// The inverse of [`peft_name`]; `None` for anything else.
pub fn parse_peft_name(name: &str) -> Option<(usize, Target, Half)> {
    let rest = name.strip_prefix("base_model.model.model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) || layer.len() > 4 {
        return None;
    }
    let layer: usize = layer.parse().ok()?;
    let mut parts = rest.split('.');
    let block = parts.next()?;
    let target = Target::ALL
        .into_iter()
        .find(|t| Some(t.peft_module()) == parts.clone().next())?;
    parts.next();
    let half = match parts.next()? {
        "lora_A" => Half::A,
        "lora_B" => Half::B,
        _ => return None,
    };
    if parts.next()? != "weight" || parts.next().is_some() {
        return None;
    }
    (peft_name(layer, target, half) == name && !block.is_empty()).then_some((layer, target, half))
}

/// A dense row-major f32 matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Matrix {
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Self {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TensorError {
    #[error("not a safetensors adapter: {0}")]
    Format(String),
    #[error("tensor `{0}` is not a LoRA A or B matrix of a llama layer")]
    Name(String),
    #[error("tensor `{name}` is {dtype}; adapters carry F32")]
    Dtype { name: String, dtype: String },
    #[error("tensor `{name}` has shape {shape:?}; LoRA matrices are 2-D")]
    Rank { name: String, shape: Vec<usize> },
    #[error("the adapter has {0} tensors; at most {MAX_MATRICES} are accepted")]
    TooMany(usize),
    #[error("tensor `{0}` holds a value that is not finite")]
    NotFinite(String),
    #[error("tensor `{name}` is {got:?} here and {want:?} in the reference")]
    Shape {
        name: String,
        got: (usize, usize),
        want: (usize, usize),
    },
    #[error("tensor `{0}` is missing")]
    Missing(String),
    #[error("tensor `{0}` is not in the reference adapter")]
    Unexpected(String),
}

/// PEFT-named matrices, sorted by name (the order of every flat view).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AdapterTensors {
    pub matrices: BTreeMap<String, Matrix>,
}

impl AdapterTensors {
    pub fn insert(&mut self, name: String, matrix: Matrix) -> Result<(), TensorError> {
        if parse_peft_name(&name).is_none() {
            return Err(TensorError::Name(name));
        }
        if matrix.data.iter().any(|v| !v.is_finite()) {
            return Err(TensorError::NotFinite(name));
        }
        self.matrices.insert(name, matrix);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.matrices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.matrices.is_empty()
    }

    /// Number of f32 values in all matrices.
    pub fn element_count(&self) -> usize {
        self.matrices.values().map(|m| m.data.len()).sum()
    }

    /// Keeps the matrices for which `keep` holds (e.g. only the B halves in exact mode).
    pub fn retain(&mut self, mut keep: impl FnMut(Half) -> bool) {
        self.matrices
            .retain(|name, _| parse_peft_name(name).is_some_and(|(_, _, half)| keep(half)));
    }

    /// `self - reference`, matrix by matrix; both must hold the same names and shapes.
    pub fn minus(&self, reference: &AdapterTensors) -> Result<AdapterTensors, TensorError> {
        self.check_same_layout(reference)?;
        let mut out = AdapterTensors::default();
        for (name, m) in &self.matrices {
            let r = &reference.matrices[name];
            let data = m.data.iter().zip(&r.data).map(|(a, b)| a - b).collect();
            out.matrices.insert(
                name.clone(),
                Matrix {
                    rows: m.rows,
                    cols: m.cols,
                    data,
                },
            );
        }
        Ok(out)
    }

    /// Checks that every matrix of `self` is in `reference` with the same shape, and the
    /// reverse.
    pub fn check_same_layout(&self, reference: &AdapterTensors) -> Result<(), TensorError> {
        self.check_subset_of(reference)?;
        match reference
            .matrices
            .keys()
            .find(|name| !self.matrices.contains_key(*name))
        {
            Some(name) => Err(TensorError::Missing(name.clone())),
            None => Ok(()),
        }
    }

    /// Checks that every matrix of `self` is in `reference` with the same shape.
    pub fn check_subset_of(&self, reference: &AdapterTensors) -> Result<(), TensorError> {
        for (name, m) in &self.matrices {
            let Some(r) = reference.matrices.get(name) else {
                return Err(TensorError::Unexpected(name.clone()));
            };
            if (m.rows, m.cols) != (r.rows, r.cols) {
                return Err(TensorError::Shape {
                    name: name.clone(),
                    got: (m.rows, m.cols),
                    want: (r.rows, r.cols),
                });
            }
        }
        Ok(())
    }

    /// All values in name order: the vector that clipping and secure aggregation see.
    pub fn flatten(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.element_count());
        for m in self.matrices.values() {
            out.extend_from_slice(&m.data);
        }
        out
    }

    /// Replaces every value from `flat`, in name order (the inverse of [`Self::flatten`]).
    pub fn unflatten_from(&mut self, flat: &[f32]) -> Result<(), TensorError> {
        if flat.len() != self.element_count() {
            return Err(TensorError::Format(format!(
                "{} values for an adapter of {}",
                flat.len(),
                self.element_count()
            )));
        }
        let mut at = 0;
        for m in self.matrices.values_mut() {
            let n = m.data.len();
            m.data.copy_from_slice(&flat[at..at + n]);
            at += n;
        }
        Ok(())
    }

    /// Name → values, the form the trainer takes and gives.
    pub fn to_vectors(&self) -> std::collections::HashMap<String, Vec<f32>> {
        self.matrices
            .iter()
            .map(|(name, m)| (name.clone(), m.data.clone()))
            .collect()
    }

    /// The inverse of [`Self::to_vectors`]: the matrices of `layout` (name, (rows, cols))
    /// from `vectors`; every name of the layout must be there with its length.
    pub fn from_vectors(
        mut vectors: std::collections::HashMap<String, Vec<f32>>,
        layout: &[(String, (usize, usize))],
    ) -> Result<Self, TensorError> {
        let mut out = AdapterTensors::default();
        for (name, (rows, cols)) in layout {
            let data = vectors
                .remove(name)
                .ok_or_else(|| TensorError::Missing(name.clone()))?;
            if data.len() != rows * cols {
                return Err(TensorError::Shape {
                    name: name.clone(),
                    got: (data.len(), 1),
                    want: (*rows, *cols),
                });
            }
            out.insert(
                name.clone(),
                Matrix {
                    rows: *rows,
                    cols: *cols,
                    data,
                },
            )?;
        }
        Ok(out)
    }

    /// safetensors bytes (F32, little-endian), with `metadata` in the header.
    pub fn to_safetensors(&self, metadata: Option<BTreeMap<String, String>>) -> Vec<u8> {
        let bytes: Vec<(&String, Vec<u8>, Vec<usize>)> = self
            .matrices
            .iter()
            .map(|(name, m)| {
                let raw = m.data.iter().flat_map(|v| v.to_le_bytes()).collect();
                (name, raw, vec![m.rows, m.cols])
            })
            .collect();
        let views = bytes.iter().map(|(name, raw, shape)| {
            let view = safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), raw)
                .expect("the byte length follows from the shape");
            (name.as_str(), view)
        });
        safetensors::serialize(views, metadata.map(|m| m.into_iter().collect()))
            .expect("F32 matrices with valid names always serialize")
    }

    /// Decodes safetensors bytes: F32 2-D matrices with PEFT LoRA names, finite values, at
    /// most [`MAX_MATRICES`].
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self, TensorError> {
        let file =
            SafeTensors::deserialize(bytes).map_err(|e| TensorError::Format(e.to_string()))?;
        let names = file.names();
        if names.len() > MAX_MATRICES {
            return Err(TensorError::TooMany(names.len()));
        }
        let mut out = AdapterTensors::default();
        for (name, view) in file.tensors() {
            if view.dtype() != Dtype::F32 {
                return Err(TensorError::Dtype {
                    name,
                    dtype: format!("{:?}", view.dtype()),
                });
            }
            let &[rows, cols] = view.shape() else {
                return Err(TensorError::Rank {
                    shape: view.shape().to_vec(),
                    name,
                });
            };
            let data = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            out.insert(name, Matrix { rows, cols, data })?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> AdapterTensors {
        let mut t = AdapterTensors::default();
        t.insert(
            peft_name(0, Target::Q, Half::A),
            Matrix {
                rows: 2,
                cols: 3,
                data: vec![1., 2., 3., 4., 5., 6.],
            },
        )
        .unwrap();
        t.insert(
            peft_name(0, Target::Q, Half::B),
            Matrix {
                rows: 4,
                cols: 2,
                data: vec![0.5; 8],
            },
        )
        .unwrap();
        t
    }

    #[test]
    fn names_round_trip() {
        for target in Target::ALL {
            for half in [Half::A, Half::B] {
                let name = peft_name(12, target, half);
                assert_eq!(parse_peft_name(&name), Some((12, target, half)));
            }
        }
        assert_eq!(
            parse_peft_name("base_model.model.model.layers.0.mlp.q_proj.lora_A.weight"),
            None,
            "q_proj lives in self_attn"
        );
        assert_eq!(parse_peft_name("base_model.model.lm_head.weight"), None);
        assert_eq!(
            parse_peft_name("base_model.model.model.layers.+1.self_attn.q_proj.lora_A.weight"),
            None
        );
    }

    #[test]
    fn safetensors_round_trip_with_metadata() {
        let t = sample();
        let meta = BTreeMap::from([("round".to_string(), "3".to_string())]);
        let bytes = t.to_safetensors(Some(meta));
        assert_eq!(AdapterTensors::from_safetensors(&bytes).unwrap(), t);
    }

    #[test]
    fn bad_bytes_are_refused_with_a_reason() {
        assert!(matches!(
            AdapterTensors::from_safetensors(b"junk"),
            Err(TensorError::Format(_))
        ));
        let mut bytes = sample().to_safetensors(None);
        bytes.truncate(bytes.len() - 4);
        assert!(AdapterTensors::from_safetensors(&bytes).is_err());
        // A tensor that is not a LoRA matrix.
        let raw = [0u8; 4];
        let view = safetensors::tensor::TensorView::new(Dtype::F32, vec![1, 1], &raw).unwrap();
        let bytes = safetensors::serialize([("lm_head.weight", view)], None).unwrap();
        assert!(matches!(
            AdapterTensors::from_safetensors(&bytes),
            Err(TensorError::Name(_))
        ));
        // NaN values.
        let raw = f32::NAN.to_le_bytes();
        let view = safetensors::tensor::TensorView::new(Dtype::F32, vec![1, 1], &raw).unwrap();
        let name = peft_name(0, Target::V, Half::B);
        let bytes = safetensors::serialize([(name.as_str(), view)], None).unwrap();
        assert!(matches!(
            AdapterTensors::from_safetensors(&bytes),
            Err(TensorError::NotFinite(_))
        ));
    }

    #[test]
    fn vectors_round_trip_against_a_layout() {
        let t = sample();
        let layout: Vec<(String, (usize, usize))> = t
            .matrices
            .iter()
            .map(|(n, m)| (n.clone(), (m.rows, m.cols)))
            .collect();
        assert_eq!(
            AdapterTensors::from_vectors(t.to_vectors(), &layout).unwrap(),
            t
        );
        let mut short = t.to_vectors();
        short.values_mut().next().unwrap().pop();
        assert!(AdapterTensors::from_vectors(short, &layout).is_err());
        let mut missing = t.to_vectors();
        missing.remove(&layout[0].0);
        assert!(matches!(
            AdapterTensors::from_vectors(missing, &layout),
            Err(TensorError::Missing(_))
        ));
    }

    #[test]
    fn minus_checks_layout_and_flatten_round_trips() {
        let a = sample();
        let mut b = sample();
        let d = a.minus(&b).unwrap();
        assert!(d.flatten().iter().all(|v| *v == 0.0));
        b.retain(|half| half == Half::B);
        assert!(matches!(a.minus(&b), Err(TensorError::Unexpected(_))));
        assert!(b.check_subset_of(&a).is_ok());
        let mut c = sample();
        let flat: Vec<f32> = (0..c.element_count()).map(|i| i as f32).collect();
        c.unflatten_from(&flat).unwrap();
        assert_eq!(c.flatten(), flat);
    }
}
