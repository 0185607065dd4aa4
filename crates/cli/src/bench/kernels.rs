//! `potptq bench kernels`: packed PoT and INT products against the dense f32 one, on the layer
//! shapes of SmolLM2-135M and Llama-2-7B, with the machine's memory bandwidth measured in the
//! same run.
//!
//! Each timed call reads a different copy of the weights, cycling through enough copies to
//! fill `--working-set-mb`: a decode step reads every layer once, so the weights come from
//! memory, not from a cache that a loop over one matrix would keep warm. The packed kernels of
//! one shape and width run in turn, call by call, so that their ratios do not depend on when
//! the machine was busy.

use std::time::Instant;

use anyhow::Result;
use potptq_kernels::{cpu::GEMV_MAX_TOKENS, matmul_f32, matmul_with, Activations, Isa, Kernel, PackedMatrix, PotDecode};
use potptq_quant::{quantize_rtn, Format, GroupLayout};
use rayon::prelude::*;
use serde_json::json;

use super::{median, parse_shape, synthetic};
use crate::common::print_json;

#[derive(clap::Args)]
pub struct KernelArgs {
    /// Layer shapes as OUTxIN (rows × cols).
    #[arg(long, value_delimiter = ',', default_value = "576x576,1536x576,576x1536,4096x4096,11008x4096,4096x11008")]
    shapes: Vec<String>,
    #[arg(long, value_delimiter = ',', default_value = "2,3,4")]
    bits: Vec<u8>,
    /// Tokens per product: 1 is a decode step (GEMV), more a prefill (GEMM).
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    batch: Vec<usize>,
    #[arg(long, default_value_t = 128)]
    group_size: usize,
    /// Timed calls per measurement (at least one per weight copy); the median is reported.
    #[arg(long, default_value_t = 15)]
    reps: usize,
    /// Weight copies cycled through per measurement, in MiB.
    #[arg(long, default_value_t = 512)]
    working_set_mb: usize,
    #[arg(long)]
    json: bool,
}

/// Memory bandwidth of this machine, all threads: STREAM's copy (bytes read + written) and a
/// read-only sum, over buffers far larger than the caches. Medians of 5.
fn memory_bandwidth() -> (f64, f64) {
    let n = 256 << 20 >> 2; // 256 MiB of f32 per buffer
    let src: Vec<f32> = (0..n).into_par_iter().map(|i| i as f32).collect();
    let mut dst = vec![0f32; n];
    let chunk = n / rayon::current_num_threads().max(1) / 8;
    let mut copy = Vec::new();
    let mut read = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        dst.par_chunks_mut(chunk).zip(src.par_chunks(chunk)).for_each(|(d, s)| d.copy_from_slice(s));
        copy.push(2.0 * 4.0 * n as f64 / t.elapsed().as_secs_f64() / 1e9);
        let t = Instant::now();
        let s: f32 = dst.par_chunks(chunk).map(|c| c.chunks_exact(16).fold([0f32; 16], |mut a, v| {
            a.iter_mut().zip(v).for_each(|(a, v)| *a += v);
            a
        }).iter().sum::<f32>()).sum();
        read.push(4.0 * n as f64 / t.elapsed().as_secs_f64() / 1e9);
        std::hint::black_box(s);
    }
    (median(copy), median(read))
}

/// Median seconds of each variant `v` of `call(v, copy)`, variant `v` cycling through
/// `copies[v]` copies (one untimed pass over them first). The variants run call by call in
/// turn, so load changing during the run lands on all of them alike.
fn time_in_turn(copies: &[usize], reps: usize, mut call: impl FnMut(usize, usize) -> Result<()>) -> Result<Vec<f64>> {
    for (v, &n) in copies.iter().enumerate() {
        for i in 0..n {
            call(v, i)?;
        }
    }
    let calls = copies.iter().copied().fold(reps, usize::max);
    let mut times = vec![Vec::with_capacity(calls); copies.len()];
    for i in 0..calls {
        for (v, t) in times.iter_mut().enumerate() {
            let start = Instant::now();
            call(v, i % copies[v])?;
            t.push(start.elapsed().as_secs_f64());
        }
    }
    Ok(times.into_iter().map(median).collect())
}

fn copies_for(bytes: usize, working_set_mb: usize) -> usize {
    ((working_set_mb << 20) / bytes.max(1)).clamp(1, 4096)
}

struct Timed {
    seconds: f64,
    bytes: usize,
}

/// PoT and INT kernels on `pot` and `int` timed call by call in turn, so that load changing
/// during the run lands on every kernel alike and their ratios stay fair: seconds per kernel,
/// PoT's then INT's, medians.
fn time_packed(pot: &PackedMatrix, int: &PackedMatrix, pot_kernels: &[(Option<PotDecode>, Activations)], int_kernels: &[(Option<PotDecode>, Activations)], x: &[f32], tokens: usize, args: &KernelArgs) -> Result<(Vec<Timed>, Vec<Timed>)> {
    let copies = |m: &PackedMatrix| -> Vec<PackedMatrix> { (0..copies_for(m.weight_bytes(), args.working_set_mb)).map(|_| m.clone()).collect() };
    let (pot_copies, int_copies) = (copies(pot), copies(int));
    let variants: Vec<(&[PackedMatrix], Kernel)> = pot_kernels
        .iter()
        .map(|&(pot_decode, activations)| (&pot_copies[..], Kernel { isa: Isa::best(), pot_decode, activations }))
        .chain(int_kernels.iter().map(|&(pot_decode, activations)| (&int_copies[..], Kernel { isa: Isa::best(), pot_decode, activations })))
        .collect();
    let mut y = vec![0f32; tokens * pot.rows()];
    let counts: Vec<usize> = variants.iter().map(|(ms, _)| ms.len()).collect();
    let seconds = time_in_turn(&counts, args.reps, |v, i| matmul_with(variants[v].1, &variants[v].0[i], x, tokens, &mut y))?;
    let mut timed: Vec<Timed> = seconds.into_iter().zip(&variants).map(|(seconds, (ms, _))| Timed { seconds, bytes: ms[0].weight_bytes() }).collect();
    let int_timed = timed.split_off(pot_kernels.len());
    Ok((timed, int_timed))
}

fn time_f32(w: &[f32], rows: usize, cols: usize, x: &[f32], tokens: usize, args: &KernelArgs) -> Result<Timed> {
    let bytes = w.len() * 4;
    let copies: Vec<Vec<f32>> = (0..copies_for(bytes, args.working_set_mb)).map(|_| w.to_vec()).collect();
    let mut y = vec![0f32; tokens * rows];
    let seconds = time_in_turn(&[copies.len()], args.reps, |_, i| matmul_f32(Isa::best(), &copies[i], rows, cols, x, tokens, &mut y))?[0];
    Ok(Timed { seconds, bytes })
}

pub fn run(args: KernelArgs) -> Result<()> {
    for &b in &args.bits {
        potptq_quant::check_bits(Format::Pot, b)?;
    }
    if args.batch.contains(&0) {
        anyhow::bail!("--batch values must be at least 1");
    }
    let threads = rayon::current_num_threads();
    let (copy_gbs, read_gbs) = memory_bandwidth();
    println!(
        "{} kernels, {threads} threads; memory bandwidth: copy {copy_gbs:.1} GB/s (read + write), read {read_gbs:.1} GB/s; \
         group {}; medians of ≥ {} calls over a {} MiB working set; GEMV up to {GEMV_MAX_TOKENS} tokens",
        Isa::best().name(),
        args.group_size,
        args.reps,
        args.working_set_mb
    );
    println!(
        "{:>11} {:>4} {:>5} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7} {:>8} {:>6} {:>6} {:>7} {:>7} | {:>9} {:>9} {:>8} {:>6} {:>6} {:>7} {:>7}",
        "shape", "bits", "batch", "f32 µs", "INT µs", "PoT µs", "lut µs", "bitadd µs", "chosen", "PoT GB/s", "%copy", "%read", "PoT/INT", "PoT/f32",
        "INTq8 µs", "PoTq8 µs", "q8 GB/s", "%copy", "%read", "q8P/I", "q8P/f32"
    );
    let mut rows_json = Vec::new();
    for spec in &args.shapes {
        let (rows, cols) = parse_shape(spec)?;
        let layout = GroupLayout::new(rows, cols, args.group_size)?;
        let w = synthetic(rows * cols, (rows * 31 + cols) as u64);
        for &tokens in &args.batch {
            let x = synthetic(tokens * cols, 99).iter().map(|v| v * 30.0).collect::<Vec<_>>();
            let dense = time_f32(&w, rows, cols, &x, tokens, &args)?;
            // A GEMM decodes its panels by lookup whatever the choice, and its Q8 form is the
            // same product of rounded activations: only GEMV compares decodes and Q8.
            let gemv = tokens <= GEMV_MAX_TOKENS;
            for &bits in &args.bits {
                let pot = PackedMatrix::from_qtensor(&quantize_rtn("bench", &w, layout, Format::Pot, bits)?)?;
                let int = PackedMatrix::from_qtensor(&quantize_rtn("bench", &w, layout, Format::IntAsym, bits)?)?;
                let f = Activations::F32;
                let pot_kernels: Vec<_> = if gemv {
                    vec![(Some(PotDecode::Lut), f), (Some(PotDecode::BitAdd), f), (None, Activations::Q8)]
                } else {
                    vec![(Some(PotDecode::Lut), f)]
                };
                let int_kernels: Vec<_> = if gemv { vec![(None, f), (None, Activations::Q8)] } else { vec![(None, f)] };
                let (pot_t, int_t) = time_packed(&pot, &int, &pot_kernels, &int_kernels, &x, tokens, &args)?;
                let chosen = PotDecode::chosen(bits);
                let lut = &pot_t[0];
                let bitadd = pot_t.get(1);
                let pot_s = match (chosen, bitadd) {
                    (PotDecode::BitAdd, Some(b)) => b.seconds,
                    _ => lut.seconds,
                };
                let gbs = lut.bytes as f64 / pot_s / 1e9;
                let (vs_int, vs_f32) = (int_t[0].seconds / pot_s, dense.seconds / pot_s);
                let us = |t: Option<&Timed>| t.map_or("—".to_string(), |t| format!("{:.1}", t.seconds * 1e6));
                let (pot_q8, int_q8) = (pot_t.get(2), int_t.get(1));
                let q8_gbs = pot_q8.map(|t| t.bytes as f64 / t.seconds / 1e9);
                let opt = |v: Option<f64>, pct: bool| v.map_or("—".to_string(), |v| if pct { format!("{:.0}%", 100.0 * v) } else { format!("{v:.2}") });
                println!(
                    "{spec:>11} {bits:>4} {tokens:>5} {:>9.1} {:>9.1} {:>9.1} {:>9} {:>9} {:>7} {gbs:>8.2} {:>5.0}% {:>5.0}% {vs_int:>7.2} {vs_f32:>7.2} | {:>9} {:>9} {:>8} {:>6} {:>6} {:>7} {:>7}",
                    dense.seconds * 1e6,
                    int_t[0].seconds * 1e6,
                    pot_s * 1e6,
                    if gemv { us(Some(lut)) } else { "—".into() },
                    us(bitadd),
                    if gemv { chosen.name() } else { "lut" },
                    100.0 * gbs / copy_gbs,
                    100.0 * gbs / read_gbs,
                    us(int_q8),
                    us(pot_q8),
                    opt(q8_gbs, false),
                    opt(q8_gbs.map(|g| g / copy_gbs), true),
                    opt(q8_gbs.map(|g| g / read_gbs), true),
                    opt(pot_q8.zip(int_q8).map(|(p, i)| i.seconds / p.seconds), false),
                    opt(pot_q8.map(|p| dense.seconds / p.seconds), false),
                );
                rows_json.push(json!({
                    "shape": [rows, cols], "bits": bits, "batch": tokens,
                    "f32_seconds": dense.seconds, "int_seconds": int_t[0].seconds, "pot_seconds": pot_s,
                    "pot_lut_seconds": lut.seconds, "pot_bitadd_seconds": bitadd.map(|t| t.seconds), "pot_decode": chosen.name(),
                    "pot_weight_bytes": lut.bytes, "int_weight_bytes": int_t[0].bytes, "f32_weight_bytes": dense.bytes,
                    "pot_weight_gbs": gbs, "int_weight_gbs": int_t[0].bytes as f64 / int_t[0].seconds / 1e9,
                    "f32_weight_gbs": dense.bytes as f64 / dense.seconds / 1e9,
                    "pot_fraction_of_copy_bandwidth": gbs / copy_gbs, "pot_fraction_of_read_bandwidth": gbs / read_gbs,
                    "pot_over_int_speed": vs_int, "pot_over_f32_speed": vs_f32,
                    "q8_pot_seconds": pot_q8.map(|t| t.seconds), "q8_int_seconds": int_q8.map(|t| t.seconds),
                    "q8_pot_weight_gbs": q8_gbs,
                    "q8_pot_fraction_of_copy_bandwidth": q8_gbs.map(|g| g / copy_gbs),
                    "q8_pot_fraction_of_read_bandwidth": q8_gbs.map(|g| g / read_gbs),
                    "q8_pot_over_int_speed": pot_q8.zip(int_q8).map(|(p, i)| i.seconds / p.seconds),
                    "q8_pot_over_f32_speed": pot_q8.map(|p| dense.seconds / p.seconds),
                }));
            }
        }
    }
    if args.json {
        print_json(&json!({
            "bench": "kernels", "isa": Isa::best().name(), "threads": threads,
            "copy_bandwidth_gbs": copy_gbs, "read_bandwidth_gbs": read_gbs,
            "group_size": args.group_size, "reps": args.reps, "working_set_mb": args.working_set_mb,
            "gemv_max_tokens": GEMV_MAX_TOKENS, "results": rows_json,
        }));
    }
    Ok(())
}
