//! `potptq bench kernels`: packed PoT and INT products against the dense f32 one, on the layer
//! shapes of SmolLM2-135M and Llama-2-7B, with the machine's memory bandwidth measured in the
//! same run.
//!
//! Each timed call reads a different copy of the weights, cycling through enough copies to
//! fill `--working-set-mb`: a decode step reads every layer once, so the weights come from
//! memory, not from a cache that a loop over one matrix would keep warm.

use std::time::Instant;

use anyhow::Result;
use potptq_kernels::{cpu::GEMV_MAX_TOKENS, matmul_f32, matmul_with, Isa, Kernel, PackedMatrix, PotDecode};
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

/// Median seconds of `call(copy)`, cycling through `copies` (one untimed pass first).
fn time_cycling(copies: usize, reps: usize, mut call: impl FnMut(usize) -> Result<()>) -> Result<f64> {
    for i in 0..copies {
        call(i)?;
    }
    let mut times = Vec::new();
    for i in 0..reps.max(copies) {
        let t = Instant::now();
        call(i % copies)?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(median(times))
}

fn copies_for(bytes: usize, working_set_mb: usize) -> usize {
    ((working_set_mb << 20) / bytes.max(1)).clamp(1, 4096)
}

struct Timed {
    seconds: f64,
    bytes: usize,
}

fn time_packed(m: &PackedMatrix, decodes: &[Option<PotDecode>], x: &[f32], tokens: usize, args: &KernelArgs) -> Result<Vec<Timed>> {
    let copies: Vec<PackedMatrix> = (0..copies_for(m.weight_bytes(), args.working_set_mb)).map(|_| m.clone()).collect();
    let mut y = vec![0f32; tokens * m.rows()];
    decodes
        .iter()
        .map(|&pot_decode| {
            let kernel = Kernel { isa: Isa::best(), pot_decode };
            let seconds = time_cycling(copies.len(), args.reps, |i| matmul_with(kernel, &copies[i], x, tokens, &mut y))?;
            Ok(Timed { seconds, bytes: m.weight_bytes() })
        })
        .collect()
}

fn time_f32(w: &[f32], rows: usize, cols: usize, x: &[f32], tokens: usize, args: &KernelArgs) -> Result<Timed> {
    let bytes = w.len() * 4;
    let copies: Vec<Vec<f32>> = (0..copies_for(bytes, args.working_set_mb)).map(|_| w.to_vec()).collect();
    let mut y = vec![0f32; tokens * rows];
    let seconds = time_cycling(copies.len(), args.reps, |i| matmul_f32(Isa::best(), &copies[i], rows, cols, x, tokens, &mut y))?;
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
        "{:>11} {:>4} {:>5} {:>10} {:>10} {:>10} {:>10} {:>10} {:>7} {:>8} {:>6} {:>7} {:>7}",
        "shape", "bits", "batch", "f32 µs", "INT µs", "PoT µs", "lut µs", "bitadd µs", "chosen", "PoT GB/s", "%copy", "PoT/INT", "PoT/f32"
    );
    let mut rows_json = Vec::new();
    for spec in &args.shapes {
        let (rows, cols) = parse_shape(spec)?;
        let layout = GroupLayout::new(rows, cols, args.group_size)?;
        let w = synthetic(rows * cols, (rows * 31 + cols) as u64);
        for &tokens in &args.batch {
            let x = synthetic(tokens * cols, 99).iter().map(|v| v * 30.0).collect::<Vec<_>>();
            let dense = time_f32(&w, rows, cols, &x, tokens, &args)?;
            for &bits in &args.bits {
                let pot = PackedMatrix::from_qtensor(&quantize_rtn("bench", &w, layout, Format::Pot, bits)?)?;
                let int = PackedMatrix::from_qtensor(&quantize_rtn("bench", &w, layout, Format::IntAsym, bits)?)?;
                let pot_t = time_packed(&pot, &[Some(PotDecode::Lut), Some(PotDecode::BitAdd)], &x, tokens, &args)?;
                let int_t = time_packed(&int, &[None], &x, tokens, &args)?.remove(0);
                let chosen = PotDecode::chosen(bits);
                let (lut, bitadd) = (&pot_t[0], &pot_t[1]);
                // GEMM decodes with the table either way; the choice matters for GEMV.
                let pot_s = if tokens > GEMV_MAX_TOKENS || chosen == PotDecode::Lut { lut.seconds } else { bitadd.seconds };
                let gbs = lut.bytes as f64 / pot_s / 1e9;
                let (vs_int, vs_f32) = (int_t.seconds / pot_s, dense.seconds / pot_s);
                // A GEMM decodes its panels by lookup whatever the choice: only GEMV compares.
                let gemv = tokens <= GEMV_MAX_TOKENS;
                let show = |t: &Timed| if gemv { format!("{:.1}", t.seconds * 1e6) } else { "—".to_string() };
                println!(
                    "{spec:>11} {bits:>4} {tokens:>5} {:>10.1} {:>10.1} {:>10.1} {:>10} {:>10} {:>7} {gbs:>8.2} {:>5.0}% {vs_int:>7.2} {vs_f32:>7.2}",
                    dense.seconds * 1e6,
                    int_t.seconds * 1e6,
                    pot_s * 1e6,
                    show(lut),
                    show(bitadd),
                    if gemv { chosen.name() } else { "lut" },
                    100.0 * gbs / copy_gbs,
                );
                rows_json.push(json!({
                    "shape": [rows, cols], "bits": bits, "batch": tokens,
                    "f32_seconds": dense.seconds, "int_seconds": int_t.seconds, "pot_seconds": pot_s,
                    "pot_lut_seconds": lut.seconds, "pot_bitadd_seconds": bitadd.seconds, "pot_decode": chosen.name(),
                    "pot_weight_bytes": lut.bytes, "int_weight_bytes": int_t.bytes, "f32_weight_bytes": dense.bytes,
                    "pot_weight_gbs": gbs, "int_weight_gbs": int_t.bytes as f64 / int_t.seconds / 1e9,
                    "f32_weight_gbs": dense.bytes as f64 / dense.seconds / 1e9,
                    "pot_fraction_of_copy_bandwidth": gbs / copy_gbs,
                    "pot_over_int_speed": vs_int, "pot_over_f32_speed": vs_f32,
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
