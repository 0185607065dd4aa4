//! Host side of `qgemm.cu`: NVRTC compilation at run time, uploads, launches.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};

use super::layout::GpuLayout;

pub const SOURCE: &str = include_str!("qgemm.cu");
/// Tokens per launch; more are done in chunks.
pub const MAX_TOKENS: usize = 64;

/// One instantiation of a kernel template: `mr` row tiles of 16 per block, `nt` token tiles
/// of 8, `ks` warps splitting K, `u` K tiles in flight per warp; held in registers, or with
/// `smem`, copied by `cp.async` into a ring of `u` stages in shared memory (one token tile).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    pub mr: usize,
    pub nt: usize,
    pub ks: usize,
    pub u: usize,
    pub smem: bool,
}

const fn c(mr: usize, nt: usize, ks: usize, u: usize) -> Config {
    Config { mr, nt, ks, u, smem: false }
}

const fn ring(mr: usize, ks: usize, stages: usize) -> Config {
    Config { mr, nt: 1, ks, u: stages, smem: true }
}

impl Config {
    /// Dynamic shared memory of a block at `bits` (`qgemv_async_body`): per warp, stage, row
    /// tile and lane, the codes and two scales; then the reduction.
    pub fn shared_bytes(&self, bits: u8) -> usize {
        if !self.smem {
            return 0;
        }
        4 * (self.ks * self.u * self.mr * 32 * (bits as usize + 2) + self.ks * self.mr * 4 * 32)
    }
}

/// The instantiations in `qgemm.cu` (`QGEMV_ASYNC_CONFIGS`, `QGEMM_CONFIGS`).
pub const CONFIGS: [Config; 18] = [
    ring(1, 8, 8),
    ring(1, 8, 16),
    ring(1, 16, 4),
    ring(1, 16, 8),
    ring(2, 8, 8),
    ring(2, 16, 4),
    c(1, 1, 8, 4),
    c(1, 1, 8, 8),
    c(1, 1, 16, 2),
    c(1, 1, 16, 4),
    c(1, 1, 32, 2),
    c(2, 1, 8, 4),
    c(2, 1, 16, 2),
    c(1, 2, 8, 4),
    c(1, 4, 8, 2),
    c(1, 8, 8, 2),
    c(2, 4, 4, 2),
    c(2, 8, 4, 2),
];

/// The single-token-tile (1–8 tokens) instantiations, which `bench cuda --sweep` compares.
pub fn single_tile_configs() -> impl Iterator<Item = Config> {
    CONFIGS.into_iter().filter(|c| c.nt == 1)
}

/// The configuration for `tokens` (≤ 64) tokens at `bits`: one token tile per 8 tokens. One
/// token tile (decode), by `bench cuda --sweep` on the H200: 16 warps with two tiles in flight
/// each, on one row tile per block, up to 4096 rows; from 8192 rows two row tiles per block
/// (2-bit: registers; 3- and 4-bit from 16384 rows: a ring of 4 shared-memory stages). Two row
/// tiles per block from 17 tokens on (the activations are then re-read less).
pub fn config_for(tokens: usize, rows: usize, bits: u8) -> Config {
    let nt = [1, 2, 4, 8].into_iter().find(|&n| n * 8 >= tokens).unwrap_or(8);
    let pairs = rows % 32 == 0;
    if nt == 1 {
        return match bits {
            2 if pairs && rows >= 8192 => c(2, 1, 16, 2),
            3 | 4 if pairs && rows >= 16384 => ring(2, 16, 4),
            _ => c(1, 1, 16, 2),
        };
    }
    let mr = if nt >= 4 && pairs { 2 } else { 1 };
    *CONFIGS.iter().find(|c| c.nt == nt && c.mr == mr).expect("an instantiated configuration")
}

pub fn kernel_name(pot: bool, bits: u8, c: Config) -> String {
    let depth = if c.smem { 's' } else { 'u' };
    format!("{}_b{bits}_m{}_n{}_k{}_{depth}{}", if pot { "pot" } else { "int" }, c.mr, c.nt, c.ks, c.u)
}

fn dequant_name(pot: bool, bits: u8) -> String {
    format!("{}_dequant_b{bits}", if pot { "pot" } else { "int" })
}

/// `qgemm.cu` compiled for the GPU of `stream`.
pub struct Kernels {
    stream: Arc<CudaStream>,
    funcs: HashMap<String, CudaFunction>,
    copy: CudaFunction,
}

/// A quantized matrix on the GPU (see `layout::GpuLayout`).
pub struct GpuMatrix {
    pub pot: bool,
    pub bits: u8,
    pub rows: usize,
    pub cols: usize,
    pub group: usize,
    pub words: CudaSlice<u32>,
    pub meta: CudaSlice<u32>,
    pub weight_bytes: usize,
}

/// PTX of `qgemm.cu` (compute_80: mma.sync m16n8k16 and the L1 cache hints).
pub fn compile() -> Result<candle_core::cuda_backend::cudarc::nvrtc::Ptx> {
    let opts = CompileOptions { arch: Some("compute_80"), name: Some("qgemm.cu".into()), ..Default::default() };
    compile_ptx_with_opts(SOURCE, opts).map_err(|e| anyhow::anyhow!("NVRTC: {e:?}"))
}

impl Kernels {
    pub fn new(stream: Arc<CudaStream>) -> Result<Self> {
        let ptx = compile()?;
        let module = stream.context().load_module(ptx).context("loading qgemm PTX")?;
        let mut funcs = HashMap::new();
        for pot in [true, false] {
            for bits in 2..=4u8 {
                for c in CONFIGS {
                    let name = kernel_name(pot, bits, c);
                    let f = module.load_function(&name).with_context(|| format!("kernel {name}"))?;
                    let shared = c.shared_bytes(bits);
                    if shared > 48 * 1024 {
                        use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
                        f.set_attribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, shared as i32).with_context(|| format!("{name}: {shared} bytes of shared memory"))?;
                    }
                    funcs.insert(name, f);
                }
            }
        }
        for pot in [true, false] {
            for bits in 2..=4u8 {
                let name = dequant_name(pot, bits);
                let f = module.load_function(&name).with_context(|| format!("kernel {name}"))?;
                funcs.insert(name, f);
            }
        }
        let copy = module.load_function("copy_u4").context("kernel copy_u4")?;
        Ok(Self { stream, funcs, copy })
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn upload(&self, m: &GpuLayout) -> Result<GpuMatrix> {
        Ok(GpuMatrix {
            pot: m.is_pot(),
            bits: m.bits,
            rows: m.rows,
            cols: m.cols,
            group: m.group,
            words: self.stream.clone_htod(&m.words)?,
            meta: self.stream.clone_htod(&m.meta)?,
            weight_bytes: m.weight_bytes(),
        })
    }

    /// A second copy of `m` on the device (benchmarks cycle through copies to defeat the L2).
    pub fn duplicate(&self, m: &GpuMatrix) -> Result<GpuMatrix> {
        let mut words = unsafe { self.stream.alloc::<u32>(m.words.len())? };
        let mut meta = unsafe { self.stream.alloc::<u32>(m.meta.len())? };
        self.stream.memcpy_dtod(&m.words, &mut words)?;
        self.stream.memcpy_dtod(&m.meta, &mut meta)?;
        Ok(GpuMatrix { words, meta, ..*m })
    }

    /// `y[t][r] = Σ_k w(r, k)·x[t][k]` for `tokens` tokens: `x` f16 `[tokens, cols]`, `y` f16
    /// `[tokens, rows]`, as raw device pointers on this stream.
    ///
    /// # Safety
    /// `x` and `y` must point to at least `tokens·cols` and `tokens·rows` f16 on this device.
    pub unsafe fn matmul_raw(&self, w: &GpuMatrix, x: u64, y: u64, tokens: usize) -> Result<()> {
        self.matmul_raw_with(w, x, y, tokens, None)
    }

    /// `matmul_raw` with a chosen configuration for every chunk (`None`: `config_for`).
    ///
    /// # Safety
    /// As `matmul_raw`.
    pub unsafe fn matmul_raw_with(&self, w: &GpuMatrix, x: u64, y: u64, tokens: usize, config: Option<Config>) -> Result<()> {
        ensure!(tokens > 0, "no tokens");
        let (wp, _g1) = w.words.device_ptr(&self.stream);
        let (mp, _g2) = w.meta.device_ptr(&self.stream);
        let (n, k, tpg) = (w.rows as i32, w.cols as i32, (w.group / super::layout::TILE_COLS) as i32);
        let mut done = 0;
        while done < tokens {
            let b = (tokens - done).min(config.map_or(MAX_TOKENS, |c| c.nt * 8));
            let c = config.unwrap_or_else(|| config_for(b, w.rows, w.bits));
            ensure!(w.rows % (16 * c.mr) == 0, "configuration {c:?} needs rows in multiples of {}", 16 * c.mr);
            let f = &self.funcs[&kernel_name(w.pot, w.bits, c)];
            let (xp, yp) = (x + (done * w.cols * 2) as u64, y + (done * w.rows * 2) as u64);
            let bi = b as i32;
            let cfg = LaunchConfig { grid_dim: ((w.rows / 16 / c.mr) as u32, 1, 1), block_dim: ((32 * c.ks) as u32, 1, 1), shared_mem_bytes: c.shared_bytes(w.bits) as u32 };
            let mut l = self.stream.launch_builder(f);
            l.arg(&wp).arg(&mp).arg(&xp).arg(&yp).arg(&n).arg(&k).arg(&bi).arg(&tpg);
            l.launch(cfg)?;
            done += b;
        }
        Ok(())
    }

    /// Writes `w` as f16 `[rows, cols]` (row-major) to `out`, each weight rounded once from
    /// its f32 value: for many tokens, a dense product (cuBLAS) then beats the fused kernels.
    ///
    /// # Safety
    /// `out` must point to at least `rows·cols` f16 on this device.
    pub unsafe fn dequantize_raw(&self, w: &GpuMatrix, out: u64) -> Result<()> {
        let (wp, _g1) = w.words.device_ptr(&self.stream);
        let (mp, _g2) = w.meta.device_ptr(&self.stream);
        let (n, k, tpg) = (w.rows as i32, w.cols as i32, (w.group / super::layout::TILE_COLS) as i32);
        let tiles = (w.rows / 16) * (w.cols / 64);
        let blocks = tiles.div_ceil(8).clamp(1, 132 * 16) as u32;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let mut l = self.stream.launch_builder(&self.funcs[&dequant_name(w.pot, w.bits)]);
        l.arg(&wp).arg(&mp).arg(&out).arg(&n).arg(&k).arg(&tpg);
        l.launch(cfg)?;
        Ok(())
    }

    pub fn matmul(&self, w: &GpuMatrix, x: &CudaSlice<u16>, y: &mut CudaSlice<u16>, tokens: usize) -> Result<()> {
        ensure!(x.len() >= tokens * w.cols && y.len() >= tokens * w.rows, "activation or output buffer too short");
        let (xp, _g1) = x.device_ptr(&self.stream);
        let (yp, _g2) = y.device_ptr(&self.stream);
        unsafe { self.matmul_raw(w, xp, yp, tokens) }
    }

    /// Copies `src` into `dst` (16-byte elements) with a plain kernel: the device's copy
    /// bandwidth, measured beside the products.
    pub fn copy(&self, src: &CudaSlice<u32>, dst: &mut CudaSlice<u32>) -> Result<()> {
        ensure!(src.len() == dst.len() && src.len() % 4 == 0, "copy: lengths");
        let (sp, _g1) = src.device_ptr(&self.stream);
        let (dp, _g2) = dst.device_ptr(&self.stream);
        let n = (src.len() / 4) as u64;
        let cfg = LaunchConfig { grid_dim: (132 * 8, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let mut l = self.stream.launch_builder(&self.copy);
        l.arg(&sp).arg(&dp).arg(&n);
        unsafe { l.launch(cfg)? };
        Ok(())
    }
}
