//! An orthogonal rotation of the residual stream, folded into the weights before quantizing.
//!
//! A few residual channels of small llama models carry massive activations, and the weights
//! reading them have outlier columns; a log-spaced PoT grid with one scale per group spends its
//! levels on them. With `Q` orthogonal, every block computes the same function on `x·Q` if the
//! RMS-norm weights are first folded into the linears after them (RMS-norm commutes with a
//! rotation only when its weight is uniform): embeddings `E → E·Q`; linears that read the
//! residual (q, k, v, gate, up, lm_head) `W → W·Q`; linears that write it (o, down) `W → Qᵀ·W`.
//! The model stays a plain llama/qwen2 (norm weights of one, output projection untied), so
//! checkpoints and kernels need nothing new, and each group of a rotated weight row mixes all
//! channels: near-Gaussian, no outliers. `Q` is a Hadamard matrix with random signs where one
//! of the hidden size exists, else a random orthogonal matrix.

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};
use potptq_model::llama::Model;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The rotated model: same function, weights in the rotated basis.
pub fn rotate_model(model: &Model, seed: u64) -> Result<Model> {
    let d = model.config.hidden_size;
    let q = Tensor::from_vec(rotation(d, seed), (d, d), &Device::Cpu)?;
    let mut out = model.clone();
    let fold = |w: &Tensor, norm: &Tensor| -> Result<Tensor> { Ok(w.broadcast_mul(&norm.unsqueeze(0)?)?) };
    let reads = |w: &Tensor| -> Result<Tensor> { Ok(w.matmul(&q)?) };
    let writes = |w: &Tensor| -> Result<Tensor> { Ok(q.t()?.matmul(w)?) };
    let ones = Tensor::ones(d, DType::F32, &Device::Cpu)?;
    for block in &mut out.blocks {
        for l in [&mut block.q_proj, &mut block.k_proj, &mut block.v_proj] {
            l.set_weight(reads(&fold(l.weight()?, &block.attn_norm)?)?);
        }
        for l in [&mut block.gate_proj, &mut block.up_proj] {
            l.set_weight(reads(&fold(l.weight()?, &block.mlp_norm)?)?);
        }
        block.o_proj.set_weight(writes(block.o_proj.weight()?)?);
        block.down_proj.set_weight(writes(block.down_proj.weight()?)?);
        block.attn_norm = ones.clone();
        block.mlp_norm = ones.clone();
    }
    out.lm_head = Some(reads(&fold(model.output_weight(), &model.norm)?)?);
    out.config.tie_word_embeddings = false;
    out.norm = ones;
    out.embed_tokens = model.embed_tokens.matmul(&q)?;
    Ok(out)
}

/// An orthogonal `n × n` matrix, row-major: a Hadamard matrix with randomly signed rows when
/// one of order `n` can be built, else a random orthogonal matrix.
pub fn rotation(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    match hadamard(n) {
        Some(h) => {
            let norm = 1.0 / (n as f32).sqrt();
            let signs: Vec<f32> = (0..n).map(|_| if rng.random::<bool>() { norm } else { -norm }).collect();
            h.chunks(n).zip(&signs).flat_map(|(row, s)| row.iter().map(move |&v| v as f32 * s)).collect()
        }
        None => random_orthogonal(n, &mut rng),
    }
}

/// A ±1 Hadamard matrix of order `n` (row-major), as a Kronecker product of Sylvester's
/// power-of-two matrices and one Paley matrix of order `p + 1` for a prime `p ≡ 3 (mod 4)`;
/// `None` when `n` has no such factorization.
pub fn hadamard(n: usize) -> Option<Vec<i8>> {
    let twos = n.trailing_zeros() as usize;
    // Try every split n = 2^k · m with m = 1 or m − 1 a prime ≡ 3 (mod 4).
    for k in (0..=twos).rev() {
        let m = n >> k;
        let base = if m == 1 {
            Some(vec![1i8])
        } else if is_prime(m - 1) && (m - 1) % 4 == 3 {
            Some(paley(m - 1))
        } else {
            None
        };
        if let Some(mut h) = base {
            let mut order = m;
            for _ in 0..k {
                h = kron(&[1, 1, 1, -1], 2, &h, order);
                order *= 2;
            }
            return Some(h);
        }
    }
    None
}

fn is_prime(p: usize) -> bool {
    p >= 2 && (2..).take_while(|d| d * d <= p).all(|d| !p.is_multiple_of(d))
}

/// Paley's construction I: a Hadamard matrix of order `p + 1` from the quadratic residues mod `p`.
fn paley(p: usize) -> Vec<i8> {
    let n = p + 1;
    let mut residue = vec![false; p];
    for x in 1..p {
        residue[x * x % p] = true;
    }
    let chi = |a: usize| -> i8 {
        if a == 0 {
            0
        } else if residue[a] {
            1
        } else {
            -1
        }
    };
    // Q (p × p Jacobsthal), then H = I + [[0, 1ᵀ], [−1, Q]].
    let mut h = vec![0i8; n * n];
    for j in 1..n {
        h[j] = 1;
        h[j * n] = -1;
    }
    for i in 0..p {
        for j in 0..p {
            h[(i + 1) * n + j + 1] = chi((j + p - i) % p);
        }
    }
    for i in 0..n {
        h[i * n + i] += 1;
    }
    h
}

fn kron(a: &[i8], na: usize, b: &[i8], nb: usize) -> Vec<i8> {
    let n = na * nb;
    let mut out = vec![0i8; n * n];
    for i in 0..n {
        for j in 0..n {
            out[i * n + j] = a[(i / nb) * na + j / nb] * b[(i % nb) * nb + j % nb];
        }
    }
    out
}

/// Gram–Schmidt (twice, for orthogonality to f64 precision) on Gaussian rows.
fn random_orthogonal(n: usize, rng: &mut StdRng) -> Vec<f32> {
    let mut rows: Vec<Vec<f64>> = Vec::with_capacity(n);
    while rows.len() < n {
        let mut v: Vec<f64> = (0..n)
            .map(|_| {
                // Box–Muller.
                let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-300), rng.random());
                (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
            })
            .collect();
        for _ in 0..2 {
            for r in &rows {
                let dot: f64 = r.iter().zip(&v).map(|(a, b)| a * b).sum();
                v.iter_mut().zip(r).for_each(|(x, a)| *x -= dot * a);
            }
        }
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm > 1e-6 {
            rows.push(v.into_iter().map(|x| x / norm).collect());
        }
    }
    rows.into_iter().flatten().map(|x| x as f32).collect()
}

/// Checks `q` (`n × n`, row-major) is orthogonal to `tol`.
pub fn check_orthogonal(q: &[f32], n: usize, tol: f64) -> Result<()> {
    for i in 0..n {
        for j in 0..n {
            let dot: f64 = (0..n).map(|k| q[i * n + k] as f64 * q[j * n + k] as f64).sum();
            let want = if i == j { 1.0 } else { 0.0 };
            ensure!((dot - want).abs() <= tol, "rows {i} and {j}: {dot}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::tests::tiny_model;

    #[test]
    fn hadamard_orders_of_llama_models() {
        for n in [4, 12, 64, 72, 576, 1024] {
            let h = hadamard(n).unwrap_or_else(|| panic!("order {n}"));
            let f: Vec<f32> = h.iter().map(|&v| v as f32 / (n as f32).sqrt()).collect();
            check_orthogonal(&f, n, 1e-5).unwrap();
        }
        assert!(hadamard(6).is_none());
        check_orthogonal(&rotation(6, 1), 6, 1e-6).unwrap();
        check_orthogonal(&rotation(96, 2), 96, 1e-5).unwrap();
    }

    #[test]
    fn rotated_model_computes_the_same_logits() {
        let model = tiny_model();
        let rotated = rotate_model(&model, 7).unwrap();
        let ids = Tensor::from_vec((0..24u32).map(|i| (i * 5 + 1) % 100).collect::<Vec<_>>(), (2, 12), &Device::Cpu).unwrap();
        let a = model.forward(&ids, None).unwrap();
        let b = rotated.forward(&ids, None).unwrap();
        let scale = a.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff <= 1e-4 * scale, "logits differ by {diff} (scale {scale})");
        // The weights did change.
        let w0 = model.blocks[0].q_proj.weight().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let w1 = rotated.blocks[0].q_proj.weight().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(w0.iter().zip(&w1).any(|(x, y)| (x - y).abs() > 1e-3));
    }
}
