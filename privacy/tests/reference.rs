//! Checks the RDP accountant against numbers produced by Google's dp-accounting (testdata/, made by tools/reference.py).
//!
//! Tolerances: epsilon and delta within 1e-6 relative, every RDP value within
//! 1e-9 relative (an order dp-accounting reports as non-convergent, `null` in
//! the file, must be `+inf` here too). Integer-order RDP values are also
//! checked against an independent 60-digit mpmath evaluation, which tells
//! whether a deviation is rounding noise or a real disagreement.
//! Run with `--nocapture` to see the largest deviations observed.

use nanofleet_privacy::rdp::{default_orders, rdp_sampled_gaussian, RdpAccountant};
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Deserialize)]
struct Reference {
    dp_accounting_version: String,
    delta: f64,
    epsilon_for_delta: f64,
    orders: Vec<f64>,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    q: f64,
    sigma: f64,
    steps: u64,
    epsilon: f64,
    epsilon_order: f64,
    delta_at_epsilon: f64,
    delta_order: f64,
    rdp: Vec<Option<f64>>,
    exact_rdp_one_step_integer_orders: BTreeMap<String, String>,
}

fn load() -> Reference {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/testdata/dp_accounting_reference.json"
    );
    let text = std::fs::read_to_string(path).expect("read testdata/dp_accounting_reference.json");
    serde_json::from_str(&text).expect("parse reference data")
}

fn rel(a: f64, b: f64) -> f64 {
    if a == b {
        0.0
    } else {
        (a - b).abs() / b.abs()
    }
}

/// `d <= tol`, false for NaN.
fn within(d: f64, tol: f64) -> bool {
    d <= tol
}

#[derive(Default, Debug)]
struct Worst {
    value: f64,
    what: String,
}

impl Worst {
    fn see(&mut self, value: f64, what: impl FnOnce() -> String) {
        if value > self.value {
            self.value = value;
            self.what = what();
        }
    }
}

#[test]
fn matches_dp_accounting() {
    let reference = load();
    assert!(reference.cases.len() >= 12);
    let orders = default_orders();
    assert_eq!(
        reference
            .orders
            .iter()
            .map(|o| o.to_bits())
            .collect::<Vec<_>>(),
        orders.iter().map(|o| o.to_bits()).collect::<Vec<_>>(),
        "default orders differ from dp-accounting's"
    );

    let mut one_step: BTreeMap<(u64, u64), Vec<f64>> = BTreeMap::new();
    let mut worst_eps = Worst::default();
    let mut worst_delta = Worst::default();
    let mut worst_rdp = Worst::default();
    let mut worst_ours_vs_exact = Worst::default();
    let mut worst_ref_vs_exact = Worst::default();
    let mut failures = Vec::new();
    let mut infinite_orders = 0;

    for c in &reference.cases {
        let per = one_step
            .entry((c.q.to_bits(), c.sigma.to_bits()))
            .or_insert_with(|| rdp_sampled_gaussian(c.q, c.sigma, &orders).unwrap())
            .clone();
        let mut acc = RdpAccountant::new();
        acc.compose_rdp(&per, c.steps).unwrap();
        let label = format!("q={} sigma={} steps={}", c.q, c.sigma, c.steps);

        for ((&order, ours), theirs) in orders.iter().zip(acc.rdp()).zip(&c.rdp) {
            match theirs {
                None => {
                    infinite_orders += 1;
                    if ours.is_finite() {
                        failures.push(format!(
                            "{label}: order {order}: dp-accounting did not converge, we got {ours}"
                        ));
                    }
                }
                Some(t) => {
                    let d = rel(*ours, *t);
                    worst_rdp.see(d, || format!("{label} order {order}: ours {ours} ref {t}"));
                    if !within(d, 1e-9) {
                        failures.push(format!(
                            "{label}: order {order}: rdp {ours} vs {t} (rel {d:e})"
                        ));
                    }
                }
            }
        }

        let (eps, eps_order) = acc.epsilon_and_order(reference.delta).unwrap();
        let d = rel(eps, c.epsilon);
        worst_eps.see(d, || format!("{label}: ours {eps} ref {}", c.epsilon));
        if !within(d, 1e-6) {
            failures.push(format!(
                "{label}: epsilon {eps} vs {} (rel {d:e})",
                c.epsilon
            ));
        }
        if eps_order != c.epsilon_order {
            failures.push(format!(
                "{label}: optimal order {eps_order} vs {}",
                c.epsilon_order
            ));
        }

        let (delta, delta_order) = acc.delta_and_order(reference.epsilon_for_delta).unwrap();
        let d = rel(delta, c.delta_at_epsilon);
        worst_delta.see(d, || {
            format!("{label}: ours {delta:e} ref {:e}", c.delta_at_epsilon)
        });
        if !within(d, 1e-6) {
            failures.push(format!(
                "{label}: delta {delta} vs {} (rel {d:e})",
                c.delta_at_epsilon
            ));
        }
        if delta < 1.0 && delta_order != c.delta_order {
            failures.push(format!(
                "{label}: delta's optimal order {delta_order} vs {}",
                c.delta_order
            ));
        }

        if c.steps == 1 {
            for (i, &order) in orders.iter().enumerate() {
                let Some(exact) = c
                    .exact_rdp_one_step_integer_orders
                    .get(&format!("{}", order as u64))
                else {
                    continue;
                };
                if order.fract() != 0.0 {
                    continue;
                }
                let exact: f64 = exact.parse().unwrap();
                let d_ours = rel(per[i], exact);
                worst_ours_vs_exact.see(d_ours, || {
                    format!("{label} order {order}: ours {} exact {exact}", per[i])
                });
                if let Some(t) = c.rdp[i] {
                    worst_ref_vs_exact.see(rel(t, exact), || {
                        format!("{label} order {order}: ref {t} exact {exact}")
                    });
                }
                if !within(d_ours, 1e-9) {
                    failures.push(format!(
                        "{label}: order {order}: rdp {} vs exact {exact} (rel {d_ours:e})",
                        per[i]
                    ));
                }
            }
        }
    }

    println!(
        "dp-accounting {}: {} cases, {} (case, order) pairs non-convergent in both",
        reference.dp_accounting_version,
        reference.cases.len(),
        infinite_orders
    );
    println!(
        "max rel. deviation, epsilon:          {:e}  ({})",
        worst_eps.value, worst_eps.what
    );
    println!(
        "max rel. deviation, delta:            {:e}  ({})",
        worst_delta.value, worst_delta.what
    );
    println!(
        "max rel. deviation, RDP:              {:e}  ({})",
        worst_rdp.value, worst_rdp.what
    );
    println!(
        "max rel. error vs mpmath, ours:       {:e}  ({})",
        worst_ours_vs_exact.value, worst_ours_vs_exact.what
    );
    println!(
        "max rel. error vs mpmath, reference:  {:e}  ({})",
        worst_ref_vs_exact.value, worst_ref_vs_exact.what
    );
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
