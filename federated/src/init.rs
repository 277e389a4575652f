//! The initial adapter, derived from the federation's seed alike on every node and on the
//! coordinator: A uniform in ±1/√in (PEFT's `kaiming_uniform_(a=√5)`), B zero, so the first
//! global adapter changes nothing and round 1 sends no adapter bytes.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use sha2::{Digest, Sha256};

use crate::tensors::{parse_peft_name, AdapterTensors, Half, Matrix, TensorError};

/// The adapter for `layout` (PEFT names with (rows, cols)) from `seed`. Each matrix has its
/// own stream, keyed by the seed and its name, so the result does not depend on order.
pub fn initial_adapter(
    layout: &[(String, (usize, usize))],
    seed: u64,
) -> Result<AdapterTensors, TensorError> {
    let mut out = AdapterTensors::default();
    for (name, (rows, cols)) in layout {
        let (rows, cols) = (*rows, *cols);
        let (_, _, half) = parse_peft_name(name).ok_or_else(|| TensorError::Name(name.clone()))?;
        let matrix = match half {
            Half::B => Matrix::zeros(rows, cols),
            Half::A => {
                let key: [u8; 32] = Sha256::new()
                    .chain_update(b"nanofleet lora init v1")
                    .chain_update(seed.to_le_bytes())
                    .chain_update(name.as_bytes())
                    .finalize()
                    .into();
                let mut rng = ChaCha20Rng::from_seed(key);
                let bound = 1.0 / (cols.max(1) as f32).sqrt();
                let data = (0..rows * cols)
                    .map(|_| rng.gen_range(-bound..bound))
                    .collect();
                Matrix { rows, cols, data }
            }
        };
        out.insert(name.clone(), matrix)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Target;
    use crate::tensors::peft_name;

    fn layout() -> Vec<(String, (usize, usize))> {
        vec![
            (peft_name(0, Target::Q, Half::A), (4, 16)),
            (peft_name(0, Target::Q, Half::B), (16, 4)),
            (peft_name(1, Target::V, Half::A), (4, 16)),
        ]
    }

    #[test]
    fn same_seed_same_adapter_in_any_order() {
        let a = initial_adapter(&layout(), 5).unwrap();
        let mut reversed = layout();
        reversed.reverse();
        assert_eq!(a, initial_adapter(&reversed, 5).unwrap());
        assert_ne!(a, initial_adapter(&layout(), 6).unwrap());
    }

    #[test]
    fn a_is_bounded_and_b_is_zero() {
        let a = initial_adapter(&layout(), 1).unwrap();
        let qa = &a.matrices[&peft_name(0, Target::Q, Half::A)];
        assert!(qa.data.iter().all(|v| v.abs() < 0.25));
        assert!(qa.data.iter().any(|v| *v != 0.0));
        let qb = &a.matrices[&peft_name(0, Target::Q, Half::B)];
        assert!(qb.data.iter().all(|v| *v == 0.0));
        // Two A matrices of the same shape differ (their streams are keyed by name).
        assert_ne!(qa, &a.matrices[&peft_name(1, Target::V, Half::A)]);
    }

    #[test]
    fn bad_names_are_refused() {
        assert!(initial_adapter(&[("x".into(), (1, 1))], 0).is_err());
    }
}
