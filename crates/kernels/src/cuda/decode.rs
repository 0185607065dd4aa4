//! Host side of `decode.cu`: the kernels around a block's linear layers when decoding one
//! token at a time (see `potptq_model::gpu_decoder`). Arguments are raw device pointers on
//! this stream, 0 for an absent optional one.

use std::ffi::c_void;
use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig};
use candle_core::cuda_backend::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};

use super::gpu::{arg, launch, target};

/// The kernels, compiled at run time by NVRTC: `common.cuh` (what `qgemm.cu` shares) in
/// front of `decode.cu`.
pub const SOURCE: &str = concat!(include_str!("common.cuh"), include_str!("decode.cu"));

/// Threads of the attention's blocks (one block per query head and run of keys): 8 warps.
const ATTENTION_THREADS: u32 = 256;
/// Keys per attention block beyond which a head's keys are split over more blocks, and the
/// most blocks a head gets: 32 heads then fill 256 blocks from 3584 positions.
const KEYS_PER_RUN: usize = 512;
const MAX_RUNS: usize = 8;

/// The blocks each query head's keys are split over, for caches of `capacity` positions.
pub fn attention_runs(capacity: usize) -> usize {
    capacity.div_ceil(KEYS_PER_RUN).clamp(1, MAX_RUNS)
}

/// The largest head dimension the attention takes (`MAX_DIMS` f32 a lane in `decode.cu`).
pub const MAX_HEAD_DIM: usize = 256;
/// Threads of the single-block RMS norm.
const NORM_THREADS: u32 = 1024;

pub struct DecodeKernels {
    stream: Arc<CudaStream>,
    embed: CudaFunction,
    norm: CudaFunction,
    rope: CudaFunction,
    attention: CudaFunction,
    silu_mul: CudaFunction,
    /// The heads and caches every launch works on; the attention's shared memory is sized for
    /// `capacity` keys in `attention_runs(capacity)` runs.
    heads: Heads,
    /// Each run's max, sum and output (f32 `[heads, runs, 2 + head_dim]`) and each head's
    /// count of finished runs (always back to 0), when a head's keys are split.
    partials: CudaSlice<f32>,
    done: CudaSlice<u32>,
    /// Kernels launch allowed to start before the previous one ends (sm_90 and newer): they
    /// wait for it inside (`decode.cu`), their launch hidden behind its end.
    dependent_launch: bool,
}

/// Where `rope_append` reads and writes: f16 `q` `[heads, head_dim]` (rotated in place), `k`
/// and `v` `[kv_heads, head_dim]`, f32 biases or 0, f32 rotary tables `[positions,
/// head_dim / 2]`, the position (an i32), and the f16 caches `[kv_heads, capacity, head_dim]`.
pub struct RopeAppend {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub q_bias: u64,
    pub k_bias: u64,
    pub v_bias: u64,
    pub cos: u64,
    pub sin: u64,
    pub position: u64,
    pub k_cache: u64,
    pub v_cache: u64,
}

/// The shape of the attention and its caches.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Positions the caches hold.
    pub capacity: usize,
}

fn grid_for(n: usize) -> u32 {
    n.div_ceil(256).clamp(1, 1024) as u32
}

impl DecodeKernels {
    /// Compiles `decode.cu` for the GPU of `stream`, for the heads and caches of `s` (the
    /// attention's scores sit in shared memory).
    pub fn new(stream: Arc<CudaStream>, s: Heads) -> Result<Self> {
        use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN;
        let ctx = stream.context();
        let (capacity, head_dim, runs) = (s.capacity, s.head_dim, attention_runs(s.capacity));
        let (arch, dependent_launch) = target(&stream)?;
        let opts = CompileOptions { arch: Some(arch), name: Some("decode.cu".into()), ..Default::default() };
        let ptx = compile_ptx_with_opts(SOURCE, opts).map_err(|e| anyhow::anyhow!("NVRTC: {e:?}"))?;
        let module = ctx.load_module(ptx).context("loading decode PTX")?;
        let f = |name: &str| module.load_function(name).with_context(|| format!("kernel {name}"));
        ensure!(head_dim.is_multiple_of(2) && head_dim <= MAX_HEAD_DIM, "the GPU decoder takes even head dimensions up to {MAX_HEAD_DIM}, not {head_dim}");
        ensure!(s.kv_heads > 0 && s.heads.is_multiple_of(s.kv_heads), "{} heads over {} KV heads", s.heads, s.kv_heads);
        let attention = f("attention")?;
        let shared = Self::attention_shared(capacity, head_dim, runs);
        let limit = ctx.attribute(CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN).context("shared memory per block")? as usize;
        ensure!(shared <= limit, "the GPU attention holds at most {} positions of head dimension {head_dim}, not {capacity}", (limit - Self::attention_shared(0, head_dim, 1)) / 4 * MAX_RUNS);
        if shared > 48 * 1024 {
            attention.set_attribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, shared as i32).context("attention's shared memory")?;
        }
        let partials = stream.alloc_zeros::<f32>(if runs > 1 { s.heads * runs * (2 + head_dim) } else { 1 })?;
        let done = stream.alloc_zeros::<u32>(s.heads.max(1))?;
        Ok(Self { embed: f("embed")?, norm: f("residual_rms_norm")?, rope: f("rope_append")?, attention, silu_mul: f("silu_mul")?, stream, heads: s, partials, done, dependent_launch })
    }

    /// Launches `f` on this stream, dependently when `dependent` and the GPU can.
    ///
    /// # Safety
    /// `args` must point to `f`'s arguments, in order and of its types.
    unsafe fn launch(&self, f: &CudaFunction, grid: (u32, u32), block: u32, shared: u32, dependent: bool, args: &mut [*mut c_void]) -> Result<()> {
        let cfg = LaunchConfig { grid_dim: (grid.0, grid.1, 1), block_dim: (block, 1, 1), shared_mem_bytes: shared };
        launch(&self.stream, f, cfg, dependent && self.dependent_launch, args)
    }

    /// The query, a run's scores, and each warp's partial output, in f32.
    fn attention_shared(capacity: usize, head_dim: usize, runs: usize) -> usize {
        4 * (head_dim + capacity.div_ceil(runs) + (ATTENTION_THREADS as usize / 32) * head_dim)
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// `x` (f32 `[d]`) = row `*token` of `table` (`[vocab, d]`, f32 or f16).
    ///
    /// # Safety
    /// `table` must hold the row, `token` one i32, `x` d f32, on this device.
    pub unsafe fn embed(&self, table: u64, table_f32: bool, token: u64, x: u64, d: usize) -> Result<()> {
        let (f32_flag, di) = (table_f32 as i32, d as i32);
        // The step's first kernel follows the copy of the token: launched plainly.
        self.launch(&self.embed, (grid_for(d), 1), 256, 0, false, &mut [arg(&table), arg(&f32_flag), arg(&token), arg(&x), arg(&di)])
    }

    /// `x += delta` (f16, when not 0), then `out` (f16) = the RMS norm of `x` times `w` (f32).
    ///
    /// # Safety
    /// `x`, `w` d f32, `delta` and `out` d f16, on this device.
    pub unsafe fn residual_rms_norm(&self, x: u64, delta: u64, w: u64, out: u64, d: usize, eps: f32) -> Result<()> {
        let d = d as i32;
        self.launch(&self.norm, (1, 1), NORM_THREADS, 0, true, &mut [arg(&x), arg(&delta), arg(&w), arg(&out), arg(&d), arg(&eps)])
    }

    /// Biases and rotates the new query and key, and writes key and value at the position.
    ///
    /// # Safety
    /// Every pointer of `a` as its doc says, for this decoder's heads; the position below their
    /// capacity and the rotary tables' length.
    pub unsafe fn rope_append(&self, a: &RopeAppend) -> Result<()> {
        let s = self.heads;
        let (heads, head_dim, capacity) = (s.heads as i32, s.head_dim as i32, s.capacity as i32);
        let threads = (s.head_dim / 2).next_multiple_of(32) as u32;
        let mut args = [
            arg(&a.q), arg(&a.k), arg(&a.v), arg(&a.q_bias), arg(&a.k_bias), arg(&a.v_bias), arg(&a.cos), arg(&a.sin),
            arg(&a.position), arg(&a.k_cache), arg(&a.v_cache), arg(&heads), arg(&head_dim), arg(&capacity),
        ];
        self.launch(&self.rope, ((s.heads + s.kv_heads) as u32, 1), threads, 0, true, &mut args)
    }

    /// `out` (f16 `[heads, head_dim]`) = each query head's softmax-weighted sum of its KV
    /// head's values over positions 0..=`*position`, scores scaled by `1/√head_dim`; the keys
    /// split over `attention_runs(capacity)` blocks a head.
    ///
    /// # Safety
    /// `q` and `out` heads·head_dim f16, the caches as `rope_append` writes them, the position
    /// below the capacity.
    pub unsafe fn attention(&self, q: u64, k_cache: u64, v_cache: u64, position: u64, out: u64) -> Result<()> {
        let (s, runs) = (self.heads, attention_runs(self.heads.capacity));
        let scale = 1.0 / (s.head_dim as f32).sqrt();
        let (heads, kv_heads, head_dim, capacity) = (s.heads as i32, s.kv_heads as i32, s.head_dim as i32, s.capacity as i32);
        let shared = Self::attention_shared(s.capacity, s.head_dim, runs) as u32;
        let (partials, _g1) = self.partials.device_ptr(&self.stream);
        let (done, _g2) = self.done.device_ptr(&self.stream);
        let mut args = [
            arg(&q), arg(&k_cache), arg(&v_cache), arg(&position), arg(&out), arg(&partials), arg(&done),
            arg(&heads), arg(&kv_heads), arg(&head_dim), arg(&capacity), arg(&scale),
        ];
        self.launch(&self.attention, (s.heads as u32, runs as u32), ATTENTION_THREADS, shared, true, &mut args)
    }

    /// `out = silu(gate) · up`, n f16 each.
    ///
    /// # Safety
    /// Each pointer n f16 on this device.
    pub unsafe fn silu_mul(&self, gate: u64, up: u64, out: u64, n: usize) -> Result<()> {
        let ni = n as i32;
        self.launch(&self.silu_mul, (grid_for(n), 1), 256, 0, true, &mut [arg(&gate), arg(&up), arg(&out), arg(&ni)])
    }
}
