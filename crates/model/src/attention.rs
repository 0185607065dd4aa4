//! Causal grouped-query attention for inference on the CPU.
//!
//! One task per (sequence, head, block of queries), spread over the cores: the block's scores
//! against only the keys it may see (the masked half of the square is never computed), a
//! softmax in place, and the weighted sum of values. Scores stay in cache, and no mask tensor
//! or score tensor of the whole square is ever made. `reference_attention` below is the plain
//! formula it is tested against.

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

/// Queries per task: a block's scores (`QUERY_BLOCK × keys`) fit in L2 at 2048 keys.
const QUERY_BLOCK: usize = 64;

/// Shapes of one attention call; all buffers are row-major.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    /// New queries; they sit at positions `keys - queries .. keys`.
    pub queries: usize,
    pub keys: usize,
    /// Rows the key and value buffers hold per head (`keys` when they are contiguous; more in
    /// a KV cache with room to grow: `[batch, kv_heads, key_capacity, head_dim]`, the first
    /// `keys` rows of each head used).
    pub key_capacity: usize,
    pub head_dim: usize,
}

impl AttnShape {
    fn check(&self, q: &[f32], k: &[f32], v: &[f32]) -> Result<()> {
        let s = self;
        ensure!(s.kv_heads > 0 && s.heads.is_multiple_of(s.kv_heads), "heads must be a multiple of kv heads");
        ensure!(s.queries <= s.keys, "more queries than keys");
        ensure!(s.keys <= s.key_capacity, "more keys than the buffers hold");
        ensure!(q.len() == s.batch * s.heads * s.queries * s.head_dim, "query buffer size");
        ensure!(k.len() == s.batch * s.kv_heads * s.key_capacity * s.head_dim, "key buffer size");
        ensure!(v.len() == k.len(), "value buffer size");
        Ok(())
    }
}

/// `c[m×n] = a[m×k] · b` where `b[p][j]` sits at `b[p * b_rs + j * b_cs]`.
fn matmul(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], b_rs: usize, b_cs: usize, c: &mut [f32]) {
    assert!(a.len() >= m * k && c.len() >= m * n);
    assert!(k == 0 || n == 0 || b.len() > (k - 1) * b_rs + (n - 1) * b_cs);
    // SAFETY: the asserts above bound every index the strides reach.
    unsafe {
        gemm::gemm(
            m, n, k,
            c.as_mut_ptr(), 1, n as isize, false,
            a.as_ptr(), 1, k as isize,
            b.as_ptr(), b_cs as isize, b_rs as isize,
            0.0, 1.0, false, false, false,
            gemm::Parallelism::None,
        );
    }
}

/// Softmax of `row[..visible]` in place; the rest (future keys) becomes 0.
fn masked_softmax(row: &mut [f32], visible: usize) {
    let (seen, future) = row.split_at_mut(visible);
    let max = seen.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for x in seen.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    let inv = 1.0 / sum;
    seen.iter_mut().for_each(|x| *x *= inv);
    future.iter_mut().for_each(|x| *x = 0.0);
}

/// Causal attention: `q` `[batch, heads, queries, head_dim]` (rotary already applied),
/// `k`, `v` `[batch, kv_heads, key_capacity, head_dim]` → `[batch, heads, queries, head_dim]`.
pub fn causal_attention(s: AttnShape, q: &[f32], k: &[f32], v: &[f32]) -> Result<Vec<f32>> {
    s.check(q, k, v)?;
    let (t, n, d, cap) = (s.queries, s.keys, s.head_dim, s.key_capacity);
    let past = n - t;
    let rep = s.heads / s.kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0f32; q.len()];
    // Split per head first so that the last block of each head may be short.
    out.par_chunks_mut(t * d).enumerate().for_each(|(bh, out_head)| {
        let (b, h) = (bh / s.heads, bh % s.heads);
        let kv = b * s.kv_heads + h / rep;
        let k_head = &k[kv * cap * d..(kv * cap + n) * d];
        let v_head = &v[kv * cap * d..(kv * cap + n) * d];
        let q_head = &q[bh * t * d..(bh + 1) * t * d];
        out_head.par_chunks_mut(QUERY_BLOCK * d).enumerate().for_each(|(blk, out_blk)| {
            let r0 = blk * QUERY_BLOCK;
            let rows = out_blk.len() / d;
            // Keys this block may see: up to the position of its last query.
            let visible = past + r0 + rows;
            let mut scores = vec![0f32; rows * visible];
            matmul(rows, visible, d, &q_head[r0 * d..(r0 + rows) * d], k_head, 1, d, &mut scores);
            for (i, row) in scores.chunks_mut(visible).enumerate() {
                row.iter_mut().for_each(|x| *x *= scale);
                masked_softmax(row, past + r0 + i + 1);
            }
            matmul(rows, d, visible, &scores, v_head, d, 1, out_blk);
        });
    });
    Ok(out)
}

/// Causal grouped-query attention from tensor ops, on any device (the GPU inference path):
/// `q` `[batch, heads, queries, head_dim]` (rotary
/// applied), `k`, `v` `[batch, kv_heads, keys, head_dim]`, the queries at the last positions
/// of the keys → `[batch, heads, queries, head_dim]`.
///
/// The query heads that share a KV head are stacked along the query axis, so one batched
/// product per KV head serves them all without copying keys and values. The causal mask is
/// built for more than one query (a single query sees every key).
pub fn grouped_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (b, nh, t, d) = q.dims4()?;
    let (_, nkv, n, _) = k.dims4()?;
    ensure!(nkv > 0 && nh % nkv == 0, "{nh} query heads are not a multiple of {nkv} KV heads");
    ensure!(t <= n, "more queries ({t}) than keys ({n})");
    let group = nh / nkv;
    let q = q.contiguous()?.reshape((b, nkv, group * t, d))?;
    let scores = (q.matmul(&rows_contiguous(k)?.t()?)? / (d as f64).sqrt())?;
    let scores = if t > 1 { scores.broadcast_add(&causal_mask(group, t, n, scores.dtype(), scores.device())?)? } else { scores };
    // candle's fused softmax has no gradient: graphs that train use `potptq_calib::ops::softmax`.
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    Ok(probs.matmul(&rows_contiguous(v)?)?.reshape((b, nh, t, d))?)
}

/// `x` `[batch, heads, rows, dim]` as it is when each head's rows are contiguous (the first
/// rows of a KV cache with room to grow: the batched products take any stride between
/// heads), else a contiguous copy.
fn rows_contiguous(x: &Tensor) -> Result<Tensor> {
    let (b, h, _, d) = x.dims4()?;
    let st = x.stride();
    let heads_regular = b == 1 || st[0] == h * st[1];
    Ok(if st[3] == 1 && st[2] == d && heads_regular { x.clone() } else { x.contiguous()? })
}

/// The additive mask of `grouped_attention`: `[group · queries, keys]`, 0 where a query may
/// see a key and −∞ after it, repeated for each query head of a KV group.
/// Made on `device` by comparing positions there: a GPU gets no host-sized copy.
pub fn causal_mask(group: usize, queries: usize, keys: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    ensure!(queries <= keys, "more queries ({queries}) than keys ({keys})");
    let query_pos = Tensor::arange((keys - queries) as u32, keys as u32, device)?.repeat(group)?.unsqueeze(1)?;
    let key_pos = Tensor::arange(0u32, keys as u32, device)?.unsqueeze(0)?;
    let future = key_pos.broadcast_gt(&query_pos)?;
    let shape = (group * queries, keys);
    let mask = future.where_cond(&Tensor::full(f32::NEG_INFINITY, shape, device)?, &Tensor::zeros(shape, DType::F32, device)?)?;
    Ok(mask.to_dtype(dtype)?)
}

/// The plain formula, one query at a time: the reference the fast path is tested against.
pub fn reference_attention(s: AttnShape, q: &[f32], k: &[f32], v: &[f32]) -> Result<Vec<f32>> {
    s.check(q, k, v)?;
    let (t, n, d, cap) = (s.queries, s.keys, s.head_dim, s.key_capacity);
    let rep = s.heads / s.kv_heads;
    let mut out = vec![0f32; q.len()];
    for b in 0..s.batch {
        for h in 0..s.heads {
            let kv = b * s.kv_heads + h / rep;
            for i in 0..t {
                let qi = &q[((b * s.heads + h) * t + i) * d..][..d];
                let visible = n - t + i + 1;
                let mut w: Vec<f64> = (0..visible)
                    .map(|j| {
                        let kj = &k[(kv * cap + j) * d..][..d];
                        qi.iter().zip(kj).map(|(a, b)| (*a as f64) * (*b as f64)).sum::<f64>() / (d as f64).sqrt()
                    })
                    .collect();
                let max = w.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                w.iter_mut().for_each(|x| *x = (*x - max).exp());
                let sum: f64 = w.iter().sum();
                let o = &mut out[((b * s.heads + h) * t + i) * d..][..d];
                for (j, wj) in w.iter().enumerate() {
                    let vj = &v[(kv * cap + j) * d..][..d];
                    for (oc, vc) in o.iter_mut().zip(vj) {
                        *oc += (wj / sum * *vc as f64) as f32;
                    }
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((x >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn matches_reference_on_odd_shapes() {
        // Query counts around the block size, a KV-cache offset, GQA and MHA.
        for &(batch, heads, kv_heads, queries, keys, head_dim) in &[
            (1, 4, 2, 1, 1, 8),
            (2, 6, 3, 70, 70, 16),
            (1, 4, 4, 65, 100, 12),
            (1, 9, 3, 129, 129, 64),
            (1, 2, 1, 1, 37, 8),
        ] {
            let s = AttnShape { batch, heads, kv_heads, queries, keys, key_capacity: keys, head_dim };
            let q = pseudo_random(batch * heads * queries * head_dim, 1);
            let k = pseudo_random(batch * kv_heads * keys * head_dim, 2);
            let v = pseudo_random(batch * kv_heads * keys * head_dim, 3);
            let fast = causal_attention(s, &q, &k, &v).unwrap();
            let slow = reference_attention(s, &q, &k, &v).unwrap();
            let err = fast.iter().zip(&slow).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(err < 1e-5, "{s:?}: max error {err}");

            let t = |x: Vec<f32>, h: usize, n: usize| Tensor::from_vec(x, (batch, h, n, head_dim), &Device::Cpu).unwrap();
            let ops = grouped_attention(&t(q, heads, queries), &t(k, kv_heads, keys), &t(v, kv_heads, keys)).unwrap();
            let ops = ops.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let err = ops.iter().zip(&slow).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(err < 1e-5, "{s:?}: tensor-op attention, max error {err}");
        }
    }

    /// Keys and values in buffers with room to grow (a KV cache): the rows past `keys` are
    /// never read, whatever they hold.
    #[test]
    fn spare_rows_are_not_read() {
        let (batch, heads, kv_heads, queries, keys, head_dim, capacity) = (2, 4, 2, 3, 21, 8, 32);
        let q = pseudo_random(batch * heads * queries * head_dim, 4);
        let k = pseudo_random(batch * kv_heads * keys * head_dim, 5);
        let v = pseudo_random(batch * kv_heads * keys * head_dim, 6);
        let roomy = |x: &[f32]| -> Vec<f32> {
            let mut out = vec![f32::NAN; batch * kv_heads * capacity * head_dim];
            for (h, rows) in x.chunks(keys * head_dim).enumerate() {
                out[h * capacity * head_dim..][..keys * head_dim].copy_from_slice(rows);
            }
            out
        };
        let dense = AttnShape { batch, heads, kv_heads, queries, keys, key_capacity: keys, head_dim };
        let want = reference_attention(dense, &q, &k, &v).unwrap();
        let s = AttnShape { key_capacity: capacity, ..dense };
        for got in [causal_attention(s, &q, &roomy(&k), &roomy(&v)).unwrap(), reference_attention(s, &q, &roomy(&k), &roomy(&v)).unwrap()] {
            let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(err < 1e-5, "max error {err}");
        }
        assert!(causal_attention(AttnShape { keys: capacity + 1, ..s }, &q, &roomy(&k), &roomy(&v)).is_err());
    }

    /// Keys and values as the first rows of bigger per-head buffers (a KV cache on a GPU) give
    /// the tensor-op attention the same result as contiguous ones.
    #[test]
    fn tensor_op_attention_reads_the_first_rows_of_a_cache() {
        let (heads, kv_heads, queries, keys, capacity, d) = (4, 2, 1, 5, 16, 8);
        let t = |x: Vec<f32>, h: usize, n: usize| Tensor::from_vec(x, (1, h, n, d), &Device::Cpu).unwrap();
        let q = t(pseudo_random(heads * queries * d, 7), heads, queries);
        let (kb, vb) = (t(pseudo_random(kv_heads * capacity * d, 8), kv_heads, capacity), t(pseudo_random(kv_heads * capacity * d, 9), kv_heads, capacity));
        let (k, v) = (kb.narrow(2, 0, keys).unwrap(), vb.narrow(2, 0, keys).unwrap());
        assert!(!k.is_contiguous());
        let flat = |x: Tensor| x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let got = flat(grouped_attention(&q, &k, &v).unwrap());
        let want = flat(grouped_attention(&q, &k.contiguous().unwrap(), &v.contiguous().unwrap()).unwrap());
        let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(err < 1e-6, "max error {err}");
    }

    #[test]
    fn tensor_op_attention_rejects_bad_shapes() {
        let t = |h: usize, n: usize| Tensor::zeros((1, h, n, 8), DType::F32, &Device::Cpu).unwrap();
        let e = grouped_attention(&t(3, 2), &t(2, 2), &t(2, 2)).unwrap_err();
        assert!(e.to_string().contains("3 query heads are not a multiple of 2 KV heads"), "{e}");
        let e = grouped_attention(&t(2, 5), &t(1, 4), &t(1, 4)).unwrap_err();
        assert!(e.to_string().contains("more queries (5) than keys (4)"), "{e}");
        let e = causal_mask(1, 5, 4, DType::F32, &Device::Cpu).unwrap_err();
        assert!(e.to_string().contains("more queries (5) than keys (4)"), "{e}");
    }

    #[test]
    fn rejects_mismatched_buffers() {
        let s = AttnShape { batch: 1, heads: 2, kv_heads: 1, queries: 2, keys: 2, key_capacity: 2, head_dim: 4 };
        assert!(causal_attention(s, &[0.0; 15], &[0.0; 8], &[0.0; 8]).is_err());
    }
}
