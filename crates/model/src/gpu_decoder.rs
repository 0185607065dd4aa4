//! Decoding on an NVIDIA GPU one token at a time without a tensor library in the loop.
//!
//! Every buffer is allocated once (the KV cache for a fixed number of positions included), and
//! a decode step is a fixed sequence of launches: the fused products for packed linears,
//! cuBLAS f16 for dense ones (q, k, v stacked by rows into one product, as are gate and up),
//! and `decode.cu` around them, reading the token and its position from device memory. So
//! the step is captured once as a CUDA graph and replayed each token: the host issues one
//! launch a token instead of ~30 tensor operations a block, each of which costs it several
//! microseconds (`potptq bench decode`).
//!
//! Numerics: activations between kernels in f16 (the products read f16 either way), the
//! residual stream and all sums in f32, the KV cache in f16. The model's forward on the CPU
//! is the reference (`tests/packed.rs`).

use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use candle_core::cuda_backend::cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use candle_core::cuda_backend::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use candle_core::cuda_backend::cudarc::driver::{CudaGraph, CudaSlice, CudaStream, DevicePtr};
use candle_core::{DType, Device, Tensor};
use half::f16;
use potptq_kernels::cuda::decode::{DecodeKernels, Heads, RopeAppend};
use potptq_kernels::cuda::gpu::{GpuMatrix, Io, Kernels};
use potptq_kernels::cuda::GpuLayout;
use potptq_kernels::PackedMatrix;

use crate::config::Config;
use crate::llama::{Linear, Model};

/// cuBLAS's workspace, given to it so that a captured product never allocates.
const BLAS_WORKSPACE_BYTES: usize = 32 << 20;

/// How many of the model's linears each of a block's products stacks: q k v, o, gate up, down.
const STACKED: [usize; 4] = [3, 1, 2, 1];

/// A linear layer on the GPU: packed codes for the fused kernels, or f16 `[rows, cols]`.
enum GpuLinear {
    Packed(GpuMatrix),
    Dense { w: CudaSlice<f16>, rows: usize, cols: usize },
}

struct GpuBlock {
    attn_norm: CudaSlice<f32>,
    mlp_norm: CudaSlice<f32>,
    /// q, k and v stacked (one product), o, gate and up stacked, down.
    linears: [GpuLinear; 4],
    biases: [Option<CudaSlice<f32>>; 3],
    k_cache: CudaSlice<f16>,
    v_cache: CudaSlice<f16>,
}

/// The token embeddings `[vocab, hidden]`, as the model holds them.
enum EmbedTable {
    F16(CudaSlice<f16>),
    F32(CudaSlice<f32>),
}

/// One token's activations.
struct Buffers {
    /// `[token, position]`, written before each step.
    input: CudaSlice<i32>,
    /// The residual stream.
    x: CudaSlice<f32>,
    normed: CudaSlice<f16>,
    /// q, k, v one after the other.
    qkv: CudaSlice<f16>,
    heads_out: CudaSlice<f16>,
    /// What a block adds to the residual stream (o's or down's output).
    delta: CudaSlice<f16>,
    /// gate, then up.
    gate_up: CudaSlice<f16>,
    act: CudaSlice<f16>,
    logits: CudaSlice<f32>,
}

/// A model's decoder on one GPU, with its own KV cache of `capacity` positions.
pub struct GpuDecoder {
    cfg: Config,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    _blas_workspace: CudaSlice<u8>,
    kernels: Arc<Kernels>,
    decode: DecodeKernels,
    embed: EmbedTable,
    blocks: Vec<GpuBlock>,
    final_norm: CudaSlice<f32>,
    /// The output projection, f16 `[vocab, hidden]`, its logits in f32.
    head: (CudaSlice<f16>, usize, usize),
    cos: CudaSlice<f32>,
    sin: CudaSlice<f32>,
    buf: Buffers,
    capacity: usize,
    position: usize,
    use_graph: bool,
    graph: Option<CudaGraph>,
}

fn host_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

fn host_f16(t: &Tensor) -> Result<Vec<f16>> {
    Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F16)?.flatten_all()?.to_vec1::<f16>()?)
}

fn ptr<T>(s: &CudaSlice<T>, stream: &Arc<CudaStream>) -> u64 {
    s.device_ptr(stream).0
}

impl GpuDecoder {
    /// Uploads `model` (on any device) to the GPU `device`, with a KV cache of `capacity`
    /// positions. Packed linears go to the fused kernels where their layout takes the shape
    /// and are otherwise dequantized to f16, as dense ones are; `graph` replays each step as a
    /// CUDA graph (else the same launches are issued every token).
    pub fn new(model: &Model, device: &Device, capacity: usize, graph: bool) -> Result<Self> {
        let Device::Cuda(dev) = device else { bail!("the GPU decoder needs a CUDA device, not {device:?}") };
        let cfg = model.config.clone();
        ensure!(capacity >= 1 && capacity <= cfg.max_position_embeddings, "a KV cache of {capacity} positions: the model's context is {}", cfg.max_position_embeddings);
        let stream = dev.cuda_stream();
        let kernels = crate::gpu_ops::kernels(dev)?;
        let decode = DecodeKernels::new(stream.clone(), Heads { heads: cfg.num_heads, kv_heads: cfg.num_kv_heads, head_dim: cfg.head_dim, capacity })?;
        let blas = CudaBlas::new(stream.clone()).context("cuBLAS")?;
        let workspace = stream.alloc_zeros::<u8>(BLAS_WORKSPACE_BYTES)?;
        // SAFETY: the workspace lives as long as the handle (both fields of the decoder).
        unsafe { blas_sys::cublasSetWorkspace_v2(*blas.handle(), ptr(&workspace, &stream) as *mut _, BLAS_WORKSPACE_BYTES) }.result().context("cuBLAS workspace")?;

        let f32s = |t: &Tensor| -> Result<CudaSlice<f32>> { Ok(stream.clone_htod(&host_f32(t)?)?) };
        let dense = |t: &Tensor| -> Result<GpuLinear> {
            let (rows, cols) = t.dims2()?;
            Ok(GpuLinear::Dense { w: stream.clone_htod(&host_f16(t)?)?, rows, cols })
        };
        // Linears that read the same input, stacked by rows into one product.
        let stacked = |ls: &[&Linear]| -> Result<GpuLinear> {
            let packed: Option<Vec<&PackedMatrix>> = ls.iter().map(|l| l.packed().map(|m| &**m)).collect();
            if let Some(layout) = packed.and_then(|p| PackedMatrix::stack_rows(&p).ok()).and_then(|m| GpuLayout::from_packed(&m).ok()) {
                let g = kernels.upload(&layout)?;
                kernels.prepare(g.pot, g.bits)?;
                return Ok(GpuLinear::Packed(g));
            }
            dense(&Tensor::cat(&ls.iter().map(|l| l.weight_f32()).collect::<Result<Vec<_>>>()?, 0)?)
        };
        let kv_len = cfg.num_kv_heads * capacity * cfg.head_dim;
        let mut blocks = Vec::with_capacity(model.blocks.len());
        for b in &model.blocks {
            let linears = [
                stacked(&[&b.q_proj, &b.k_proj, &b.v_proj])?,
                stacked(&[&b.o_proj])?,
                stacked(&[&b.gate_proj, &b.up_proj])?,
                stacked(&[&b.down_proj])?,
            ];
            let bias = |l: &Linear| l.bias.as_ref().map(&f32s).transpose();
            blocks.push(GpuBlock {
                attn_norm: f32s(&b.attn_norm)?,
                mlp_norm: f32s(&b.mlp_norm)?,
                linears,
                biases: [bias(&b.q_proj)?, bias(&b.k_proj)?, bias(&b.v_proj)?],
                k_cache: stream.alloc_zeros::<f16>(kv_len)?,
                v_cache: stream.alloc_zeros::<f16>(kv_len)?,
            });
        }
        let embed = match model.embed_tokens.dtype() {
            DType::F16 => EmbedTable::F16(stream.clone_htod(&host_f16(&model.embed_tokens)?)?),
            _ => EmbedTable::F32(stream.clone_htod(&host_f32(&model.embed_tokens)?)?),
        };
        let (cos, sin) = model.rope.tables();
        let (d, ffn) = (cfg.hidden_size, cfg.intermediate_size);
        let (q_dim, kv_dim) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
        let h16 = |n: usize| stream.alloc_zeros::<f16>(n);
        let buf = Buffers {
            input: stream.alloc_zeros::<i32>(2)?,
            x: stream.alloc_zeros::<f32>(d)?,
            normed: h16(d)?,
            qkv: h16(q_dim + 2 * kv_dim)?,
            heads_out: h16(q_dim)?,
            delta: h16(d)?,
            gate_up: h16(2 * ffn)?,
            act: h16(ffn)?,
            logits: stream.alloc_zeros::<f32>(cfg.vocab_size)?,
        };
        Ok(Self {
            head: {
                let (rows, cols) = model.output_weight().dims2()?;
                (stream.clone_htod(&host_f16(model.output_weight())?)?, rows, cols)
            },
            final_norm: f32s(&model.norm)?,
            cos: f32s(cos)?,
            sin: f32s(sin)?,
            embed,
            blocks,
            buf,
            cfg,
            stream,
            blas,
            _blas_workspace: workspace,
            kernels,
            decode,
            capacity,
            position: 0,
            use_graph: graph,
            graph: None,
        })
    }

    /// Positions decoded so far.
    pub fn position(&self) -> usize {
        self.position
    }

    /// Positions the KV cache holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets every position (the cache is overwritten from position 0).
    pub fn reset(&mut self) {
        self.position = 0;
    }

    /// Feeds `token` at the next position and returns the logits that follow it.
    pub fn step(&mut self, token: u32) -> Result<Vec<f32>> {
        self.check(token, 1)?;
        let input = [token as i32, self.position as i32];
        self.stream.memcpy_htod(&input, &mut self.buf.input)?;
        self.run_step()?;
        Ok(self.stream.clone_dtoh(&self.buf.logits)?)
    }

    /// Feeds `tokens` one by one; the logits after the last. The prompt's token and position
    /// pairs go to the GPU at once and each step copies its own there, so the steps queue
    /// without the host waiting; only the last one's logits come back.
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let (&last, rest) = tokens.split_last().context("no tokens")?;
        for (i, &t) in rest.iter().enumerate() {
            self.check(t, tokens.len() - i)?;
        }
        if !rest.is_empty() {
            let pairs: Vec<i32> = rest.iter().enumerate().flat_map(|(i, &t)| [t as i32, (self.position + i) as i32]).collect();
            let pairs = self.stream.clone_htod(&pairs)?;
            for i in 0..rest.len() {
                self.stream.memcpy_dtod(&pairs.slice(2 * i..2 * i + 2), &mut self.buf.input)?;
                self.run_step()?;
            }
        }
        self.step(last)
    }

    /// That `token` is in the vocabulary and `count` more positions fit in the cache.
    fn check(&self, token: u32, count: usize) -> Result<()> {
        ensure!(self.position + count <= self.capacity, "the GPU KV cache is full ({} positions)", self.capacity);
        ensure!((token as usize) < self.cfg.vocab_size, "token {token} is outside the vocabulary of {}", self.cfg.vocab_size);
        Ok(())
    }

    /// Queues one step on the token and position in `buf.input`; its logits land in
    /// `buf.logits`.
    fn run_step(&mut self) -> Result<()> {
        match &self.graph {
            Some(g) => g.launch()?,
            None => {
                self.launch_step()?;
                // The first step also warms what the launches set up lazily; then the graph.
                if self.use_graph {
                    self.graph = Some(self.capture()?);
                }
            }
        }
        self.position += 1;
        Ok(())
    }

    fn capture(&self) -> Result<CudaGraph> {
        self.stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).context("CUDA graph capture")?;
        let launched = self.launch_step();
        let graph = self.stream.end_capture(CUgraphInstantiate_flags(0)).context("CUDA graph instantiation")?;
        launched?;
        graph.context("an empty CUDA graph")
    }

    /// `y = W x` for one token, f16 in and out.
    fn product(&self, l: &GpuLinear, x: u64, y: u64) -> Result<()> {
        match l {
            // SAFETY: x and y hold cols and rows f16 on this stream (the decoder's buffers).
            GpuLinear::Packed(m) => unsafe { self.kernels.matmul_raw(m, x, y, 1, Io::F16) },
            GpuLinear::Dense { w, rows, cols } => self.dense_product(w, *rows, *cols, x, y, blas_sys::cudaDataType_t::CUDA_R_16F),
        }
    }

    /// `y = W x` by cuBLAS for f16 `W` `[rows, cols]` and `x`, f32 sums, `y` of `y_type`.
    fn dense_product(&self, w: &CudaSlice<f16>, rows: usize, cols: usize, x: u64, y: u64, y_type: blas_sys::cudaDataType_t) -> Result<()> {
        // Row-major W is column-major Wᵀ: y = op(A)·x with A = Wᵀ, op = T.
        let (alpha, beta) = (1f32, 0f32);
        let (m, k) = (rows as i32, cols as i32);
        // SAFETY: w holds rows·cols f16, x cols f16, y rows of y_type, on this stream.
        unsafe {
            blas::gemm_ex(
                *self.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                m, 1, k,
                &alpha as *const f32 as *const _,
                ptr(w, &self.stream) as *const _,
                blas_sys::cudaDataType_t::CUDA_R_16F,
                k,
                x as *const _,
                blas_sys::cudaDataType_t::CUDA_R_16F,
                k,
                &beta as *const f32 as *const _,
                y as *mut _,
                y_type,
                m,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .context("cuBLAS f16 product")
    }

    /// One decode step's launches, the token and position read from `buf.input`.
    fn launch_step(&self) -> Result<()> {
        let (c, s, b) = (&self.cfg, &self.stream, &self.buf);
        let p = |x: &CudaSlice<f16>| ptr(x, s);
        let (x, normed, delta) = (ptr(&b.x, s), p(&b.normed), p(&b.delta));
        let (token, position) = (ptr(&b.input, s), ptr(&b.input, s) + std::mem::size_of::<i32>() as u64);
        let eps = c.rms_norm_eps as f32;
        let (q_dim, kv_dim) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let d = &self.decode;
        // SAFETY: every pointer is one of the decoder's buffers, sized for the config at `new`;
        // the position is below the capacity (`step`).
        unsafe {
            match &self.embed {
                EmbedTable::F16(t) => d.embed(ptr(t, s), false, token, x, c.hidden_size)?,
                EmbedTable::F32(t) => d.embed(ptr(t, s), true, token, x, c.hidden_size)?,
            }
            for (i, blk) in self.blocks.iter().enumerate() {
                let residual = if i == 0 { 0 } else { delta };
                d.residual_rms_norm(x, residual, ptr(&blk.attn_norm, s), normed, c.hidden_size, eps)?;
                let [qkv, o, gate_up, down] = &blk.linears;
                self.product(qkv, normed, p(&b.qkv))?;
                let bias = |i: usize| blk.biases[i].as_ref().map_or(0, |t| ptr(t, s));
                let rope = RopeAppend {
                    q: p(&b.qkv), k: p(&b.qkv) + 2 * q_dim as u64, v: p(&b.qkv) + 2 * (q_dim + kv_dim) as u64,
                    q_bias: bias(0), k_bias: bias(1), v_bias: bias(2),
                    cos: ptr(&self.cos, s), sin: ptr(&self.sin, s), position,
                    k_cache: p(&blk.k_cache), v_cache: p(&blk.v_cache),
                };
                d.rope_append(&rope)?;
                d.attention(p(&b.qkv), p(&blk.k_cache), p(&blk.v_cache), position, p(&b.heads_out))?;
                self.product(o, p(&b.heads_out), delta)?;
                d.residual_rms_norm(x, delta, ptr(&blk.mlp_norm, s), normed, c.hidden_size, eps)?;
                self.product(gate_up, normed, p(&b.gate_up))?;
                let ffn = c.intermediate_size;
                d.silu_mul(p(&b.gate_up), p(&b.gate_up) + 2 * ffn as u64, p(&b.act), ffn)?;
                self.product(down, p(&b.act), delta)?;
            }
            let residual = if self.blocks.is_empty() { 0 } else { delta };
            d.residual_rms_norm(x, residual, ptr(&self.final_norm, s), normed, c.hidden_size, eps)?;
        }
        let (w, rows, cols) = &self.head;
        self.dense_product(w, *rows, *cols, normed, ptr(&b.logits, s), blas_sys::cudaDataType_t::CUDA_R_32F)
    }

    /// The blocks' linears (of the model: q, k, v, …) that run through the fused kernels.
    pub fn kernel_linears(&self) -> usize {
        let stacked = self.blocks.iter().flat_map(|b| b.linears.iter().zip(STACKED));
        stacked.filter(|(l, _)| matches!(l, GpuLinear::Packed(_))).map(|(_, n)| n).sum()
    }
}
