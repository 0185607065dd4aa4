//! `potptq bench cuda`: the fused PoT and INT dequant-GEMV/GEMM kernels (`potptq_kernels::cuda`)
//! against cuBLAS f16 (cublasGemmEx, f32 accumulation) on Llama-2 layer shapes, with the
//! device's copy and read bandwidths, and the time to read each matrix's codes once, measured in
//! the same run; and the linear layers of one decode step of a Llama-2-7B-shaped model.
//!
//! Every measurement captures `--calls` products into a CUDA graph (so host launch overhead
//! does not hide kernels of a microsecond or two), each call reading a different copy of the
//! weights, cycling through enough copies to fill `--working-set-mb` (four times the H200's
//! L2), and times graph launches with CUDA events. Medians of `--reps`.

use anyhow::Result;

#[derive(clap::Args)]
pub struct CudaArgs {
    /// Layer shapes as OUTxIN (rows × cols): Llama-2-7B's and Llama-2-70B's.
    #[arg(long, value_delimiter = ',', default_value = "4096x4096,11008x4096,4096x11008,8192x8192,28672x8192")]
    shapes: Vec<String>,
    #[arg(long, value_delimiter = ',', default_value = "2,3,4")]
    bits: Vec<u8>,
    /// Tokens per product: 1 is a decode step (GEMV), more a batch (GEMM).
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    batch: Vec<usize>,
    #[arg(long, default_value_t = 128)]
    group_size: usize,
    /// Products per timed graph.
    #[arg(long, default_value_t = 20)]
    calls: usize,
    /// Timed graph launches per measurement; the median is reported.
    #[arg(long, default_value_t = 7)]
    reps: usize,
    /// Weight copies cycled through per measurement, in MiB.
    #[arg(long, default_value_t = 256)]
    working_set_mb: usize,
    /// Also time the linear layers of a decode step of a Llama-2-7B-shaped model (32 blocks,
    /// f16 output projection) with random PoT weights at these bits, against all-f16.
    #[arg(long, value_delimiter = ',', default_value = "2,3,4")]
    decode_bits: Vec<u8>,
    /// Launch each product only after the previous one has ended (no programmatic dependent
    /// launch, which lets a product load its weights while the previous one finishes).
    #[arg(long)]
    no_dependent_launch: bool,
    /// Skip the decode-step measurement.
    #[arg(long)]
    no_decode: bool,
    /// Also time, at each batch size (up to 64 tokens), every kernel configuration with the
    /// fewest token tiles that hold it or twice as many (`sweep` in the JSON): the data behind
    /// the configuration `config_for` picks.
    #[arg(long)]
    sweep: bool,
    #[arg(long)]
    json: bool,
}

pub fn run(a: CudaArgs) -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        imp::run(a)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = a;
        anyhow::bail!("bench cuda needs a build with the `cuda` feature (scripts/build-cuda.sh)")
    }
}

#[cfg(feature = "cuda")]
mod imp {
use super::CudaArgs;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::cuda_backend::cudarc::cublas::{result as cublas_result, sys as cublas_sys, CudaBlas};
use candle_core::cuda_backend::cudarc::driver::{sys, CudaSlice, CudaStream, DevicePtr};
use half::f16;
use potptq_kernels::cuda::gpu::{kernel_name, sweep_configs, GpuMatrix, Io, Kernels, MAX_TOKENS};
use potptq_kernels::cuda::GpuLayout;
use potptq_quant::Format;
use serde_json::json;

use super::super::{median, parse_shape, xorshift_fill};
use crate::common::print_json;


struct Timer {
    stream: Arc<CudaStream>,
    calls: usize,
    reps: usize,
}

impl Timer {
    /// Median seconds per call of `f(i)` for `i` in `0..calls`, captured into one graph.
    fn time(&self, mut f: impl FnMut(usize) -> Result<()>) -> Result<f64> {
        let s = &self.stream;
        s.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)?;
        let captured = (0..self.calls).try_for_each(&mut f);
        let graph = s.end_capture(sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH)?;
        captured?;
        let graph = graph.context("empty graph")?;
        graph.launch()?;
        s.synchronize()?;
        let mut times = Vec::with_capacity(self.reps);
        for _ in 0..self.reps {
            let a = s.record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
            graph.launch()?;
            let b = s.record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
            times.push(a.elapsed_ms(&b)? as f64 * 1e-3 / self.calls as f64);
        }
        Ok(median(times))
    }
}

/// A random quantized matrix: random words are random codes (the tile layout is a bijection
/// on bits); scales uniform in log between 2^-9 and 2^-5, zero-points random.
fn random_layout(format: Format, bits: u8, rows: usize, cols: usize, group: usize, seed: u64) -> Result<GpuLayout> {
    let words = xorshift_fill(rows * cols * bits as usize / 32, seed, |x| (x >> 32) as u32);
    let groups = rows * cols / group;
    let scales: Vec<f16> = xorshift_fill(groups, seed + 1, |x| (x >> 40) as u32).iter().map(|&v| f16::from_f32((2f32).powf(-9.0 + 4.0 * v as f32 / (1u32 << 24) as f32))).collect();
    let zeros: Vec<u8> = if format == Format::Pot { Vec::new() } else { xorshift_fill(groups, seed + 2, |x| (x >> 60) as u32).iter().map(|&v| (v % (1 << bits)) as u8).collect() };
    GpuLayout::from_parts(format, bits, rows, cols, group, words, &scales, &zeros)
}

/// Random f16 values of magnitude ≲ 0.03 (weights) or ≲ 1 (activations).
fn random_f16(n: usize, seed: u64, scale: f32) -> Vec<u16> {
    xorshift_fill(n, seed, |x| f16::from_f32(((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale).to_bits() as u32).into_iter().map(|v| v as u16).collect()
}

fn ptr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    s.device_ptr(stream).0
}

/// `y[B][N] = x[B][K] · w[N][K]ᵀ`, all f16, f32 accumulation: cuBLAS's dense baseline.
/// # Safety
/// Pointers must hold the sizes named.
unsafe fn cublas_f16(blas: &CudaBlas, w: u64, x: u64, y: u64, n: usize, k: usize, b: usize) -> Result<()> {
    let (alpha, beta) = (1f32, 0f32);
    cublas_result::gemm_ex(
        *blas.handle(),
        cublas_sys::cublasOperation_t::CUBLAS_OP_T,
        cublas_sys::cublasOperation_t::CUBLAS_OP_N,
        n as i32,
        b as i32,
        k as i32,
        &alpha as *const f32 as *const _,
        w as *const _,
        cublas_sys::cudaDataType::CUDA_R_16F,
        k as i32,
        x as *const _,
        cublas_sys::cudaDataType::CUDA_R_16F,
        k as i32,
        &beta as *const f32 as *const _,
        y as *mut _,
        cublas_sys::cudaDataType::CUDA_R_16F,
        n as i32,
        cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        cublas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
    )
    .map_err(|e| anyhow::anyhow!("cublasGemmEx: {e:?}"))
}

fn copies_for(bytes: usize, working_set: usize) -> usize {
    working_set.div_ceil(bytes).clamp(1, 64)
}

pub(super) fn run(a: CudaArgs) -> Result<()> {
    if !candle_core::utils::cuda_is_available() {
        bail!("bench cuda needs a build with the `cuda` feature (scripts/build-cuda.sh)");
    }
    let dev = match candle_core::Device::new_cuda(0)? {
        candle_core::Device::Cuda(d) => d,
        _ => unreachable!(),
    };
    // One stream, raw pointers: no per-launch event bookkeeping.
    unsafe { dev.disable_event_tracking() };
    let stream = dev.cuda_stream();
    let ctx = stream.context().clone();
    let name = ctx.name().unwrap_or_else(|_| "unknown CUDA device".into());
    let (maj, min) = (
        ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
        ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
    );
    let t0 = std::time::Instant::now();
    let mut kernels = Kernels::new(stream.clone())?;
    // Compiled here, not in the first timed product: both formats at `--bits`, PoT at
    // `--decode-bits`.
    for &bits in &a.bits {
        kernels.prepare(false, bits)?;
    }
    for &bits in a.bits.iter().chain(&a.decode_bits) {
        kernels.prepare(true, bits)?;
    }
    if a.no_dependent_launch {
        kernels.set_dependent_launch(false)?;
    }
    let compile_s = t0.elapsed().as_secs_f64();
    let blas = CudaBlas::new(stream.clone()).map_err(|e| anyhow::anyhow!("cuBLAS: {e:?}"))?;
    let timer = Timer { stream: stream.clone(), calls: a.calls, reps: a.reps };
    let working_set = a.working_set_mb << 20;

    // Copy bandwidth: 1 GiB → 1 GiB, bytes read + written; read bandwidth: 1 GiB read.
    let (copy_gbs, read_gbs) = {
        let n = 1usize << 28;
        let src = stream.alloc_zeros::<u32>(n)?;
        let mut dst = stream.alloc_zeros::<u32>(n)?;
        let t = Timer { stream: stream.clone(), calls: 4, reps: a.reps };
        let s = t.time(|_| kernels.copy(&src, &mut dst))?;
        let r = t.time(|_| kernels.read(&src))?;
        (2.0 * 4.0 * n as f64 / s / 1e9, 4.0 * n as f64 / r / 1e9)
    };
    if !a.json {
        println!("device: {name} (sm_{maj}{min}); NVRTC compile {compile_s:.1} s; copy bandwidth {copy_gbs:.0} GB/s (read + write), read bandwidth {read_gbs:.0} GB/s; dependent launch {}", if kernels.dependent_launch() { "on" } else { "off" });
    }

    if !a.json {
        println!("| shape | bits | batch | f16 µs | INT µs | PoT µs | PoT GB/s | % copy | % read | codes read once / PoT | PoT/f16 | PoT/INT |");
    }
    let max_b = a.batch.iter().copied().max().unwrap_or(1);
    let mut rows_out = Vec::new();
    let mut sweep = Vec::new();
    for (si, shape) in a.shapes.iter().enumerate() {
        let (n, k) = parse_shape(shape)?;
        let x = stream.clone_htod(&random_f16(max_b * k, 7 + si as u64, 1.0))?;
        let y = stream.alloc_zeros::<u16>(max_b * n)?;
        let (xp, yp) = (ptr(&x, &stream), ptr(&y, &stream));
        // cuBLAS f16 baseline.
        let wf = stream.clone_htod(&random_f16(n * k, 11 + si as u64, 0.03))?;
        let fcopies: Vec<CudaSlice<u16>> = (1..copies_for(n * k * 2, working_set))
            .map(|_| -> Result<CudaSlice<u16>> {
                let mut c = unsafe { stream.alloc::<u16>(n * k)? };
                stream.memcpy_dtod(&wf, &mut c)?;
                Ok(c)
            })
            .collect::<Result<_>>()?;
        let fptrs: Vec<u64> = std::iter::once(ptr(&wf, &stream)).chain(fcopies.iter().map(|c| ptr(c, &stream))).collect();
        let mut f16_s = Vec::new();
        for &b in &a.batch {
            f16_s.push(timer.time(|i| unsafe { cublas_f16(&blas, fptrs[i % fptrs.len()], xp, yp, n, k, b) })?);
        }
        drop(fcopies);
        drop(wf);
        // Scratch for the f16 weights that products of more than 64 tokens multiply (cuBLAS).
        let dense = stream.alloc_zeros::<u16>(n * k)?;
        let dense_p = ptr(&dense, &stream);
        for &bits in &a.bits {
            let mut quant = Vec::new();
            for format in [Format::IntAsym, Format::Pot] {
                let l = random_layout(format, bits, n, k, a.group_size, 100 + si as u64 * 10 + bits as u64)?;
                let m = kernels.upload(&l)?;
                let mut ms: Vec<GpuMatrix> = vec![];
                for _ in 1..copies_for(m.weight_bytes, working_set) {
                    ms.push(kernels.duplicate(&m)?);
                }
                ms.insert(0, m);
                let mut t = Vec::new();
                for &b in &a.batch {
                    t.push(timer.time(|i| unsafe { kernels.matmul_raw(&ms[i % ms.len()], xp, yp, b, Io::F16) })?);
                }
                for &b in a.batch.iter().filter(|_| a.sweep) {
                    let tokens = b.min(MAX_TOKENS);
                    for c in sweep_configs(tokens).filter(|c| n.is_multiple_of(16 * c.mr) && c.fits(tokens, k)) {
                        let s = timer.time(|i| unsafe { kernels.matmul_raw_with(&ms[i % ms.len()], xp, yp, tokens, Io::F16, Some(c)) })?;
                        let name = kernel_name(format == Format::Pot, bits, c);
                        if !a.json {
                            println!("sweep {shape} {tokens} tokens {name}: {:.2} µs, {:.0} GB/s", s * 1e6, l.weight_bytes() as f64 / s / 1e9);
                        }
                        sweep.push(json!({"shape": shape, "bits": bits, "tokens": tokens, "kernel": name, "us": s * 1e6, "gbs": l.weight_bytes() as f64 / s / 1e9}));
                    }
                }
                let dequant_s = timer.time(|i| unsafe { kernels.dequantize_raw(&ms[i % ms.len()], dense_p) })?;
                // The floor for this size: reading the codes once, launches and all.
                let read_s = timer.time(|i| kernels.read(&ms[i % ms.len()].words))?;
                quant.push((l.weight_bytes(), t, dequant_s, read_s));
            }
            let (int_bytes, int_t, int_dq, _) = &quant[0];
            let (pot_bytes, pot_t, pot_dq, pot_read) = &quant[1];
            if !a.json {
                println!("read {shape} {bits}-bit PoT codes once: {:.1} µs", pot_read * 1e6);
                println!("dequantize {shape} {bits}-bit to f16 (for more than 64 tokens): PoT {:.1} µs, INT {:.1} µs", pot_dq * 1e6, int_dq * 1e6);
            }
            for (bi, &b) in a.batch.iter().enumerate() {
                let gbs = *pot_bytes as f64 / pot_t[bi] / 1e9;
                let row = json!({
                    "shape": shape, "rows": n, "cols": k, "bits": bits, "batch": b,
                    "f16_us": f16_s[bi] * 1e6, "int_us": int_t[bi] * 1e6, "pot_us": pot_t[bi] * 1e6,
                    "pot_bytes": pot_bytes, "int_bytes": int_bytes, "f16_bytes": n * k * 2,
                    "pot_gbs": gbs, "int_gbs": *int_bytes as f64 / int_t[bi] / 1e9, "f16_gbs": (n * k * 2) as f64 / f16_s[bi] / 1e9,
                    "pot_pct_copy": 100.0 * gbs / copy_gbs, "pot_pct_read": 100.0 * gbs / read_gbs,
                    "codes_read_us": pot_read * 1e6, "pot_pct_codes_read": 100.0 * pot_read / pot_t[bi],
                    "pot_vs_f16": f16_s[bi] / pot_t[bi], "pot_vs_int": int_t[bi] / pot_t[bi],
                    "pot_dequant_us": pot_dq * 1e6, "int_dequant_us": int_dq * 1e6,
                });
                if !a.json {
                    println!(
                        "| {shape} | {bits} | {b} | {:.1} | {:.1} | {:.1} | {:.0} | {:.0}% | {:.0}% | {:.0}% | {:.2} | {:.2} |",
                        f16_s[bi] * 1e6,
                        int_t[bi] * 1e6,
                        pot_t[bi] * 1e6,
                        gbs,
                        100.0 * gbs / copy_gbs,
                        100.0 * gbs / read_gbs,
                        100.0 * pot_read / pot_t[bi],
                        f16_s[bi] / pot_t[bi],
                        int_t[bi] / pot_t[bi]
                    );
                }
                rows_out.push(row);
            }
        }
    }

    let decode = if a.no_decode { serde_json::Value::Null } else { decode_step(&a, &kernels, &blas, &stream)? };
    print_json(&json!({
        "device": name, "compute_capability": format!("{maj}.{min}"), "nvrtc_compile_s": compile_s,
        "copy_gbs": copy_gbs, "read_gbs": read_gbs, "dependent_launch": kernels.dependent_launch(), "group_size": a.group_size, "calls_per_graph": a.calls, "reps": a.reps,
        "working_set_mb": a.working_set_mb, "products": rows_out, "decode": decode, "sweep": sweep,
    }));
    Ok(())
}

/// The linear layers of one decode token of a Llama-2-7B-shaped model (32 blocks of q, k, v,
/// o 4096×4096, gate and up 11008×4096, down 4096×11008, then the f16 32000×4096 output
/// projection): all-f16 through cuBLAS against PoT through the fused kernel. Attention, norms
/// and activations are not included (the same for both).
fn decode_step(a: &CudaArgs, kernels: &Kernels, blas: &CudaBlas, stream: &Arc<CudaStream>) -> Result<serde_json::Value> {
    const H: usize = 4096;
    const I: usize = 11008;
    const V: usize = 32000;
    const BLOCKS: usize = 32;
    let shapes = [(H, H), (H, H), (H, H), (H, H), (I, H), (I, H), (H, I)];
    let x = stream.clone_htod(&random_f16(I, 3, 1.0))?;
    let y = stream.alloc_zeros::<u16>(V)?;
    let (xp, yp) = (ptr(&x, stream), ptr(&y, stream));
    let head = stream.clone_htod(&random_f16(V * H, 5, 0.03))?;
    let hp = ptr(&head, stream);
    let timer = Timer { stream: stream.clone(), calls: 1, reps: a.reps };
    let mut out = serde_json::Map::new();
    // f16: one random matrix per shape, copied per block.
    let f16_s = {
        let proto: Vec<CudaSlice<u16>> = [(H, H), (I, H), (H, I)].iter().enumerate().map(|(i, &(n, k))| stream.clone_htod(&random_f16(n * k, 20 + i as u64, 0.03))).collect::<std::result::Result<_, _>>()?;
        let mut layers = Vec::new();
        for _ in 0..BLOCKS {
            for &(n, k) in &shapes {
                let p = &proto[if (n, k) == (H, H) { 0 } else if n == I { 1 } else { 2 }];
                let mut c = unsafe { stream.alloc::<u16>(n * k)? };
                stream.memcpy_dtod(p, &mut c)?;
                layers.push((c, n, k));
            }
        }
        let s = timer.time(|_| {
            for (w, n, k) in &layers {
                unsafe { cublas_f16(blas, ptr(w, stream), xp, yp, *n, *k, 1)? };
            }
            unsafe { cublas_f16(blas, hp, xp, yp, V, H, 1) }
        })?;
        let bytes: usize = layers.iter().map(|(_, n, k)| n * k * 2).sum::<usize>() + V * H * 2;
        out.insert("f16".into(), json!({"ms_per_token": s * 1e3, "tokens_per_s": 1.0 / s, "weight_bytes": bytes}));
        s
    };
    for &bits in &a.decode_bits {
        let proto: Vec<GpuMatrix> = [(H, H), (I, H), (H, I)]
            .iter()
            .enumerate()
            .map(|(i, &(n, k))| kernels.upload(&random_layout(Format::Pot, bits, n, k, a.group_size, 30 + i as u64)?))
            .collect::<Result<_>>()?;
        let mut layers = Vec::new();
        for _ in 0..BLOCKS {
            for &(n, k) in &shapes {
                layers.push(kernels.duplicate(&proto[if (n, k) == (H, H) { 0 } else if n == I { 1 } else { 2 }])?);
            }
        }
        let s = timer.time(|_| {
            for w in &layers {
                unsafe { kernels.matmul_raw(w, xp, yp, 1, Io::F16)? };
            }
            unsafe { cublas_f16(blas, hp, xp, yp, V, H, 1) }
        })?;
        let bytes: usize = layers.iter().map(|m| m.weight_bytes).sum::<usize>() + V * H * 2;
        if !a.json {
            println!("decode step (linear layers, 7B shape): PoT {bits}-bit {:.3} ms/token ({:.0} tokens/s) vs f16 {:.3} ms ({:.0} tokens/s): {:.2}×", s * 1e3, 1.0 / s, f16_s * 1e3, 1.0 / f16_s, f16_s / s);
        }
        out.insert(format!("pot{bits}"), json!({"ms_per_token": s * 1e3, "tokens_per_s": 1.0 / s, "weight_bytes": bytes, "speedup_vs_f16": f16_s / s}));
    }
    Ok(serde_json::Value::Object(out))
}
}
