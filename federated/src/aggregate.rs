//! Aggregation of one round's updates into the next global adapter. The aggregator takes
//! each node's (example count, delta) and keeps only the weighted sum, in f64, so the
//! coordinator's memory does not grow with the number of nodes; secure aggregation replaces
//! `add` by one masked sum of the same weighted vectors.

use crate::spec::AggregationMode;
use crate::tensors::{AdapterTensors, Half, TensorError};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AggregateError {
    #[error("the update does not fit the global adapter: {0}")]
    Layout(#[from] TensorError),
    #[error("an update must count at least one training example")]
    NoExamples,
    #[error("no update reached the aggregator")]
    Empty,
}

/// The update layout a round expects, and the running weighted sum.
#[derive(Debug)]
pub struct Aggregator {
    expected: AdapterTensors,
    sum: Vec<f64>,
    weight: f64,
    contributors: usize,
}

impl Aggregator {
    /// Expects updates shaped like `global`: every matrix in FedAvg, the B halves only in
    /// exact mode (A is frozen there, so a node that sends an A delta is refused).
    pub fn new(mode: AggregationMode, global: &AdapterTensors) -> Self {
        let expected = update_layout(mode, global);
        let sum = vec![0.0; expected.element_count()];
        Self {
            expected,
            sum,
            weight: 0.0,
            contributors: 0,
        }
    }

    /// The names and shapes an update must have.
    pub fn expected_layout(&self) -> &AdapterTensors {
        &self.expected
    }

    /// Adds one node's delta, weighted by its example count.
    pub fn add(&mut self, examples: u64, delta: &AdapterTensors) -> Result<(), AggregateError> {
        if examples == 0 {
            return Err(AggregateError::NoExamples);
        }
        delta.check_same_layout(&self.expected)?;
        let w = examples as f64;
        for (acc, v) in self.sum.iter_mut().zip(delta.flatten()) {
            *acc += w * f64::from(v);
        }
        self.weight += w;
        self.contributors += 1;
        Ok(())
    }

    pub fn contributors(&self) -> usize {
        self.contributors
    }

    /// Adds `noise()` to every coordinate of the weighted sum (central differential
    /// privacy; the caller scales it to the sum's sensitivity).
    pub fn add_noise(&mut self, mut noise: impl FnMut() -> f64) {
        for value in &mut self.sum {
            *value += noise();
        }
    }

    /// Total examples behind the aggregate.
    pub fn examples(&self) -> u64 {
        self.weight as u64
    }

    /// The weighted mean delta (shaped like the expected update).
    pub fn mean_delta(&self) -> Result<AdapterTensors, AggregateError> {
        if self.contributors == 0 {
            return Err(AggregateError::Empty);
        }
        let mean: Vec<f32> = self.sum.iter().map(|s| (s / self.weight) as f32).collect();
        let mut delta = self.expected.clone();
        delta.unflatten_from(&mean)?;
        Ok(delta)
    }

    /// `global` plus the weighted mean delta: the next global adapter.
    pub fn finish(&self, global: &AdapterTensors) -> Result<AdapterTensors, AggregateError> {
        apply_delta(global, &self.mean_delta()?)
    }
}

/// `global` plus `delta`, matrix by matrix (`delta` may hold a subset, e.g. B only).
pub fn apply_delta(
    global: &AdapterTensors,
    delta: &AdapterTensors,
) -> Result<AdapterTensors, AggregateError> {
    delta.check_subset_of(global)?;
    let mut next = global.clone();
    for (name, d) in &delta.matrices {
        let m = next
            .matrices
            .get_mut(name)
            .ok_or_else(|| TensorError::Missing(name.clone()))?;
        for (w, dv) in m.data.iter_mut().zip(&d.data) {
            *w += dv;
        }
    }
    Ok(next)
}

/// The layout of one node's update to `global`: every matrix in FedAvg, the B halves in
/// exact mode.
pub fn update_layout(mode: AggregationMode, global: &AdapterTensors) -> AdapterTensors {
    let mut expected = global.clone();
    if mode == AggregationMode::Exact {
        expected.retain(|half| half == Half::B);
    }
    expected
}

/// Values in one node's update for an adapter of `layout` (name, (rows, cols)): every
/// matrix in FedAvg, the B halves in exact mode.
pub fn update_element_count(mode: AggregationMode, layout: &[(String, (usize, usize))]) -> usize {
    layout
        .iter()
        .filter(|(name, _)| {
            mode == AggregationMode::FedAvg
                || crate::tensors::parse_peft_name(name).is_some_and(|(_, _, h)| h == Half::B)
        })
        .map(|(_, (rows, cols))| rows * cols)
        .sum()
}

/// The vector a node puts into secure aggregation: its delta scaled by its weight, then
/// the weight itself, so that the sum yields both the weighted sum and the total weight
/// and no node's example count is seen alone. `weight` is the node's examples over a
/// public cap, in (0, 1].
pub fn weighted_vector(delta: &AdapterTensors, weight: f32) -> Vec<f32> {
    let mut v: Vec<f32> = delta.flatten().iter().map(|x| x * weight).collect();
    v.push(weight);
    v
}

/// The mean delta from the sum of [`weighted_vector`]s, shaped like `layout`.
pub fn mean_from_weighted_sum(
    layout: &AdapterTensors,
    sum: &[f32],
) -> Result<AdapterTensors, AggregateError> {
    let (total, values) = match sum.split_last() {
        Some((total, values)) if *total > 0.0 => (*total, values),
        _ => return Err(AggregateError::Empty),
    };
    let mut mean = layout.clone();
    let scaled: Vec<f32> = values.iter().map(|v| v / total).collect();
    mean.unflatten_from(&scaled)?;
    Ok(mean)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::initial_adapter;
    use crate::spec::Target;
    use crate::tensors::{peft_name, Matrix};
    use proptest::prelude::*;

    fn global() -> AdapterTensors {
        initial_adapter(
            &[
                (peft_name(0, Target::Q, Half::A), (2, 6)),
                (peft_name(0, Target::Q, Half::B), (6, 2)),
            ],
            9,
        )
        .unwrap()
    }

    fn b_delta(values: &[f32]) -> AdapterTensors {
        let mut d = AdapterTensors::default();
        d.insert(
            peft_name(0, Target::Q, Half::B),
            Matrix {
                rows: 6,
                cols: 2,
                data: values.to_vec(),
            },
        )
        .unwrap();
        d
    }

    /// (out, in) product scale·B·A of one layer.
    fn product(b: &Matrix, a: &Matrix) -> Vec<f64> {
        let mut out = vec![0.0; b.rows * a.cols];
        for i in 0..b.rows {
            for j in 0..a.cols {
                for k in 0..b.cols {
                    out[i * a.cols + j] +=
                        f64::from(b.data[i * b.cols + k]) * f64::from(a.data[k * a.cols + j]);
                }
            }
        }
        out
    }

    proptest! {
        /// FFA-LoRA: with A shared and frozen, the aggregate's low-rank product is the
        /// weighted mean of the nodes' products, to float tolerance.
        #[test]
        fn exact_mode_average_of_updates_is_update_of_average(
            updates in prop::collection::vec((1u64..50, prop::collection::vec(-1f32..1.0, 12)), 1..6)
        ) {
            let g = global();
            let mut agg = Aggregator::new(AggregationMode::Exact, &g);
            for (n, values) in &updates {
                agg.add(*n, &b_delta(values)).unwrap();
            }
            let next = agg.finish(&g).unwrap();
            let a = &g.matrices[&peft_name(0, Target::Q, Half::A)];
            let b_name = peft_name(0, Target::Q, Half::B);
            let got = product(&next.matrices[&b_name], a);
            let total: u64 = updates.iter().map(|(n, _)| n).sum();
            let mut want = vec![0.0; got.len()];
            for (n, values) in &updates {
                let b_i = Matrix { rows: 6, cols: 2, data: values.clone() };
                for (w, p) in want.iter_mut().zip(product(&b_i, a)) {
                    *w += *n as f64 / total as f64 * p;
                }
            }
            for (g, w) in got.iter().zip(&want) {
                prop_assert!((g - w).abs() < 1e-5, "{g} vs {w}");
            }
            // A did not move.
            prop_assert_eq!(&next.matrices[&peft_name(0, Target::Q, Half::A)], a);
        }
    }

    #[test]
    fn fedavg_weights_by_examples() {
        let g = global();
        let mut agg = Aggregator::new(AggregationMode::FedAvg, &g);
        let mut one = g.clone();
        one.unflatten_from(&vec![1.0; g.element_count()]).unwrap();
        let mut three = g.clone();
        three.unflatten_from(&vec![3.0; g.element_count()]).unwrap();
        agg.add(3, &one).unwrap();
        agg.add(1, &three).unwrap();
        let mean = agg.mean_delta().unwrap();
        assert!(mean.flatten().iter().all(|v| (*v - 1.5).abs() < 1e-6));
        assert_eq!(agg.contributors(), 2);
        assert_eq!(agg.examples(), 4);
    }

    #[test]
    fn weighted_vectors_sum_to_the_weighted_mean() {
        let g = global();
        let layout = update_layout(AggregationMode::Exact, &g);
        let (a, b) = (b_delta(&[1.0; 12]), b_delta(&[4.0; 12]));
        let (va, vb) = (weighted_vector(&a, 0.5), weighted_vector(&b, 0.25));
        let sum: Vec<f32> = va.iter().zip(&vb).map(|(x, y)| x + y).collect();
        let mean = mean_from_weighted_sum(&layout, &sum).unwrap();
        // (0.5·1 + 0.25·4) / 0.75 = 2
        assert!(mean.flatten().iter().all(|v| (*v - 2.0).abs() < 1e-6));
        assert_eq!(
            mean_from_weighted_sum(&layout, &[0.0; 13]),
            Err(AggregateError::Empty)
        );
        let layout_of = |t: &AdapterTensors| -> Vec<(String, (usize, usize))> {
            t.matrices
                .iter()
                .map(|(n, m)| (n.clone(), (m.rows, m.cols)))
                .collect()
        };
        assert_eq!(
            update_element_count(AggregationMode::Exact, &layout_of(&g)),
            layout.element_count()
        );
        assert_eq!(
            update_element_count(AggregationMode::FedAvg, &layout_of(&g)),
            g.element_count()
        );
        let next = apply_delta(&g, &mean).unwrap();
        assert_eq!(
            next.matrices[&peft_name(0, Target::Q, Half::A)],
            g.matrices[&peft_name(0, Target::Q, Half::A)]
        );
    }

    #[test]
    fn wrong_updates_are_refused_and_leave_the_sum_alone() {
        let g = global();
        let mut agg = Aggregator::new(AggregationMode::Exact, &g);
        // An A delta in exact mode.
        assert!(matches!(agg.add(1, &g), Err(AggregateError::Layout(_))));
        assert_eq!(
            agg.add(0, &b_delta(&[0.0; 12])),
            Err(AggregateError::NoExamples)
        );
        assert_eq!(agg.contributors(), 0);
        assert_eq!(agg.mean_delta(), Err(AggregateError::Empty));
    }
}
