//! Causal self-attention on the CPU over plain f32 rows, with a per-layer KV cache that
//! grows in place: the rotary embedding, scores, softmax and weighted sum run fused per
//! head and query, so prefill computes only the causal half of the scores, never holds
//! them for every head at once, and generation appends one row to the cache instead of
//! concatenating it anew.

use std::sync::Mutex;

use candle_core::Result;
use nanofleet_quant::Pool;

/// Queries per task of a prefill: enough to pay for a task, few enough to spread a
/// prompt's causal triangle over the threads.
const QUERIES_PER_TASK: usize = 32;

/// The attention's sizes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Rotary embedding tables: row `p` holds the `head_dim / 2` cosines (and sines) of
/// position `p`.
#[derive(Debug)]
pub(crate) struct Rotary {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    /// Positions the tables cover.
    pub positions: usize,
}

/// Keys and values of the positions seen so far, one row of `kv_heads * head_dim` per
/// position.
#[derive(Debug, Clone, Default)]
pub(crate) struct KvCache {
    keys: Vec<f32>,
    values: Vec<f32>,
}

/// Rotates each head's interleaved pairs `(x[2i], x[2i + 1])` of the rows of `x`
/// (`heads * head_dim` wide) by the angles of positions `position..`, as llama.cpp's
/// "norm" rope does.
fn rotate(x: &mut [f32], heads: usize, head_dim: usize, rotary: &Rotary, position: usize) {
    let half = head_dim / 2;
    for (t, row) in x.chunks_exact_mut(heads * head_dim).enumerate() {
        let at = (position + t) * half;
        let (cos, sin) = (&rotary.cos[at..at + half], &rotary.sin[at..at + half]);
        for head in row.chunks_exact_mut(head_dim) {
            for (i, pair) in head.chunks_exact_mut(2).enumerate() {
                let (x0, x1) = (pair[0], pair[1]);
                pair[0] = x0 * cos[i] - x1 * sin[i];
                pair[1] = x0 * sin[i] + x1 * cos[i];
            }
        }
    }
}

/// `sum(a * b)` in eight lanes, so that it vectorizes.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (a_chunks, b_chunks) = (a.chunks_exact(8), b.chunks_exact(8));
    let mut tail = 0f32;
    for (a, b) in a_chunks.remainder().iter().zip(b_chunks.remainder()) {
        tail += a * b;
    }
    for (a, b) in a_chunks.zip(b_chunks) {
        for i in 0..8 {
            lanes[i] += a[i] * b[i];
        }
    }
    let mut sum = tail;
    for lane in lanes {
        sum += lane;
    }
    sum
}

/// `sum(a)` in eight lanes, so that it vectorizes.
#[inline(always)]
fn sum(a: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = a.chunks_exact(8);
    let mut total = 0f32;
    for a in chunks.remainder() {
        total += a;
    }
    for a in chunks {
        for i in 0..8 {
            lanes[i] += a[i];
        }
    }
    for lane in lanes {
        total += lane;
    }
    total
}

/// `e^x` for `x <= 0` to about 2e-7 relative: `2^n e^r` with `|r| <= ln 2 / 2` and a
/// degree-6 polynomial for `e^r`, in operations that vectorize (libm's `expf` does not).
fn exp_nonpositive(x: f32) -> f32 {
    // Below this e^x is under f32's normal range: the weight is zero to softmax.
    let x = x.max(-87.0);
    // Round to nearest by the float adder: 1.5 * 2^23 leaves no fraction bits.
    const ROUND: f32 = 12_582_912.0;
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = (x - n * 0.693_145_75) - n * 1.428_606_8e-6;
    let poly = 1.0
        + r * (1.0
            + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r / 720.0)))));
    poly * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// One query row of one head and what it attends over: keys and values `0..=last` of kv
/// head `kv` in `cache` (rows of `row` values).
struct OneQuery<'a> {
    q: &'a [f32],
    cache: &'a KvCache,
    row: usize,
    kv: usize,
    last: usize,
    scale: f32,
}

/// The softmax-weighted sum of the values for `query` into `out`; `scores` is scratch.
/// Compiled twice: for the baseline CPU and, where the CPU has them, for AVX2 and FMA (the
/// agent ships one binary for every x86-64 CPU, so the wider vectors are chosen at run
/// time).
fn attend_one(query: &OneQuery, scores: &mut Vec<f32>, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features just checked.
        return unsafe { attend_one_avx2(query, scores, out) };
    }
    attend_one_body(query, scores, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_one_avx2(query: &OneQuery, scores: &mut Vec<f32>, out: &mut [f32]) {
    attend_one_body(query, scores, out)
}

#[inline(always)]
fn attend_one_body(query: &OneQuery, scores: &mut Vec<f32>, out: &mut [f32]) {
    let &OneQuery {
        q,
        cache,
        row,
        kv,
        last,
        scale,
    } = query;
    // Plain loops, no closures: a closure is compiled apart, without the caller's target
    // features.
    let d = q.len();
    scores.clear();
    scores.resize(last + 1, 0.0);
    let mut max = f32::NEG_INFINITY;
    for (j, score) in scores.iter_mut().enumerate() {
        let at = j * row + kv * d;
        *score = dot(q, &cache.keys[at..at + d]) * scale;
        max = max.max(*score);
    }
    // Apart from the sum, so that the exponentials vectorize.
    for s in scores.iter_mut() {
        *s = exp_nonpositive(*s - max);
    }
    let sum = sum(scores);
    out.fill(0.0);
    for (j, weight) in scores.iter().enumerate() {
        let at = j * row + kv * d;
        for (o, v) in out.iter_mut().zip(&cache.values[at..at + d]) {
            *o += weight * v;
        }
    }
    let inverse = 1.0 / sum;
    for o in out.iter_mut() {
        *o *= inverse;
    }
}

/// Attention of the rows `q` (`heads * head_dim` each) at positions `position..` over
/// the cache and the new keys `k` and values `v` (`kv_heads * head_dim` each), which
/// join the cache; `q` and `k` are rotated in place. Returns one row of
/// `heads * head_dim` per query. A `position` of 0 starts the cache afresh.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend(
    dims: Dims,
    cache: &mut KvCache,
    q: &mut [f32],
    k: &mut [f32],
    v: &[f32],
    rotary: &Rotary,
    position: usize,
    pool: &Pool,
) -> Result<Vec<f32>> {
    let Dims {
        heads,
        kv_heads,
        head_dim,
    } = dims;
    let (q_row, kv_row) = (heads * head_dim, kv_heads * head_dim);
    let seq = q.len() / q_row;
    if position == 0 {
        cache.keys.clear();
        cache.values.clear();
    }
    let cached = cache.keys.len() / kv_row;
    if cached != position || k.len() != seq * kv_row || v.len() != seq * kv_row {
        candle_core::bail!(
            "attention at position {position} over {cached} cached positions with {seq} new"
        );
    }
    if position + seq > rotary.positions {
        candle_core::bail!(
            "position {} is past the model's {} positions",
            position + seq,
            rotary.positions
        );
    }
    rotate(q, heads, head_dim, rotary, position);
    rotate(k, kv_heads, head_dim, rotary, position);
    cache.keys.extend_from_slice(k);
    cache.values.extend_from_slice(v);

    let scale = 1.0 / (head_dim as f32).sqrt();
    let group = heads / kv_heads;
    let chunks = seq.div_ceil(QUERIES_PER_TASK);
    let cache = &*cache;
    let q = &*q;
    // Task `head * chunks + c`: its head's outputs for queries of chunk `c`.
    let results: Vec<Mutex<Vec<f32>>> = (0..heads * chunks).map(|_| Mutex::default()).collect();
    pool.run(heads * chunks, &|task| {
        let (head, chunk) = (task / chunks, task % chunks);
        let queries = chunk * QUERIES_PER_TASK..((chunk + 1) * QUERIES_PER_TASK).min(seq);
        let mut out = vec![0f32; queries.len() * head_dim];
        let mut scores = Vec::with_capacity(position + seq);
        for (t, out) in queries.zip(out.chunks_exact_mut(head_dim)) {
            let at = t * q_row + head * head_dim;
            let query = OneQuery {
                q: &q[at..at + head_dim],
                cache,
                row: kv_row,
                kv: head / group,
                last: position + t,
                scale,
            };
            attend_one(&query, &mut scores, out);
        }
        *results[task].lock().unwrap_or_else(|e| e.into_inner()) = out;
    });
    let mut y = vec![0f32; seq * q_row];
    for (task, result) in results.into_iter().enumerate() {
        let (head, chunk) = (task / chunks, task % chunks);
        let result = result.into_inner().unwrap_or_else(|e| e.into_inner());
        for (i, values) in result.chunks_exact(head_dim).enumerate() {
            let at = (chunk * QUERIES_PER_TASK + i) * q_row + head * head_dim;
            y[at..at + head_dim].copy_from_slice(values);
        }
    }
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The attention of the definition, in f64, one query at a time: rotate, score every
    /// position up to the query's own, softmax, weigh the values.
    fn reference(dims: Dims, q: &[f32], k: &[f32], v: &[f32], rotary: &Rotary) -> Vec<f32> {
        let Dims {
            heads,
            kv_heads,
            head_dim: d,
        } = dims;
        let (mut q, mut k) = (q.to_vec(), k.to_vec());
        rotate(&mut q, heads, d, rotary, 0);
        rotate(&mut k, kv_heads, d, rotary, 0);
        let seq = q.len() / (heads * d);
        let mut out = vec![0f32; q.len()];
        for t in 0..seq {
            for h in 0..heads {
                let kv = h / (heads / kv_heads);
                let query = &q[(t * heads + h) * d..][..d];
                let scores: Vec<f64> = (0..=t)
                    .map(|j| {
                        let key = &k[(j * kv_heads + kv) * d..][..d];
                        query
                            .iter()
                            .zip(key)
                            .map(|(a, b)| f64::from(a * b))
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = weights.iter().sum();
                for i in 0..d {
                    let value: f64 = (0..=t)
                        .map(|j| weights[j] * f64::from(v[(j * kv_heads + kv) * d + i]))
                        .sum();
                    out[(t * heads + h) * d + i] = (value / sum) as f32;
                }
            }
        }
        out
    }

    #[test]
    fn prefill_then_generation_equal_the_definition() {
        let dims = Dims {
            heads: 6,
            kv_heads: 2,
            head_dim: 16,
        };
        let (seq, extra) = (40, 3);
        let total = seq + extra;
        let angles: Vec<f32> = (0..total * 8)
            .map(|i| (i / 8) as f32 / (1 + i % 8) as f32)
            .collect();
        let rotary = Rotary {
            cos: angles.iter().map(|a| a.cos()).collect(),
            sin: angles.iter().map(|a| a.sin()).collect(),
            positions: total,
        };
        let values = |n: usize, salt: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * 7919 + salt) % 1000) as f32 / 250.0 - 2.0)
                .collect()
        };
        let q = values(total * 6 * 16, 1);
        let k = values(total * 2 * 16, 2);
        let v = values(total * 2 * 16, 3);
        let expected = reference(dims, &q, &k, &v, &rotary);
        let pool = Pool::new(2);
        let mut cache = KvCache::default();
        // Tokens `tokens` placed at `position`.
        let step = |cache: &mut KvCache, tokens: std::ops::Range<usize>, position| {
            attend(
                dims,
                cache,
                &mut q[tokens.start * 96..tokens.end * 96].to_vec(),
                &mut k[tokens.start * 32..tokens.end * 32].to_vec(),
                &v[tokens.start * 32..tokens.end * 32],
                &rotary,
                position,
                &pool,
            )
        };
        // A stale cache from an earlier prompt is dropped at position 0.
        step(&mut cache, 0..1, 0).unwrap();
        let mut got = step(&mut cache, 0..seq, 0).unwrap();
        for t in seq..total {
            got.extend(step(&mut cache, t..t + 1, t).unwrap());
        }
        for (i, (got, expected)) in got.iter().zip(&expected).enumerate() {
            assert!(
                (got - expected).abs() < 1e-4,
                "value {i}: {got} against {expected}"
            );
        }
        assert_eq!(got.len(), expected.len());
        // A gap in the positions is refused, and leaves the cache as it was.
        let error = step(&mut cache, 0..1, total + 1);
        assert!(error.is_err());
        assert_eq!(cache.keys.len(), total * 32);
    }

    #[test]
    fn the_fast_exponential_is_within_a_few_ulps() {
        // Down to -87, below which the weights are all but zero and held at e^-87.
        for i in 0..=17_400 {
            let x = -(i as f32) / 200.0;
            let (got, exact) = (exp_nonpositive(x), x.exp());
            assert!(
                (got - exact).abs() <= 4e-7 * exact + f32::MIN_POSITIVE,
                "e^{x}: {got} against {exact}"
            );
        }
        assert_eq!(exp_nonpositive(-1000.0), exp_nonpositive(-87.0));
    }
}
