//! Host side of `qgemm.cu`: NVRTC compilation at run time, uploads, launches.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use anyhow::{ensure, Context, Result};
use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};

pub use super::config::{config_for, kernel_name, sweep_configs, Config, CONFIGS, MAX_TOKENS, X_SHARED_MAX_COLS};
use super::layout::{GpuLayout, TILE_COLS, TILE_ROWS};
use super::SOURCE;

fn dequant_name(pot: bool, bits: u8) -> String {
    format!("{}_dequant_b{bits}", if pot { "pot" } else { "int" })
}

/// `qgemm.cu` compiled for the GPU of `stream`.
pub struct Kernels {
    stream: Arc<CudaStream>,
    /// The virtual architecture the kernels are compiled for.
    arch: &'static str,
    /// The GPU has programmatic dependent launch (sm_90 and newer), and the kernels were
    /// compiled for it.
    can_launch_dependent: bool,
    /// Products launch with it (`qgemm.cu`).
    dependent_launch: bool,
    /// Each code format's kernels (PoT or INT, and bits), compiled on first use (`prepare`).
    formats: Mutex<HashMap<(bool, u8), Arc<Functions>>>,
    copy: CudaFunction,
    read: CudaFunction,
    /// Where `read` would write (it never does with real data).
    sink: CudaSlice<u32>,
}

/// Blocks of 256 threads for the bandwidth references: eight per SM of the H100/H200, or as
/// many as the elements need.
fn reference_grid(elements: usize) -> u32 {
    elements.div_ceil(256).clamp(1, 132 * 8) as u32
}

/// The element type of a product's activations and outputs (`qgemm.cu`'s `Io` flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Io {
    F16,
    F32,
}

impl Io {
    fn bytes(self) -> usize {
        match self {
            Io::F16 => 2,
            Io::F32 => 4,
        }
    }

    fn flags(self) -> i32 {
        match self {
            Io::F16 => 0,
            Io::F32 => 3,
        }
    }
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

/// The kernels of one code format, by name.
type Functions = HashMap<String, CudaFunction>;

fn function<'a>(funcs: &'a Functions, name: &str) -> Result<&'a CudaFunction> {
    funcs.get(name).with_context(|| format!("no kernel {name}"))
}

/// PTX of all of `qgemm.cu` for compute_80 (mma.sync m16n8k16 and the L1 cache hints).
pub fn compile() -> Result<candle_core::cuda_backend::cudarc::nvrtc::Ptx> {
    compile_for("compute_80", Some(None))
}

/// PTX of `qgemm.cu` for `arch` (compute_90 adds the dependent-launch instructions): with
/// `formats` `Some(Some((pot, bits)))` one code format's kernels, `Some(None)` every format's,
/// `None` only the bandwidth references. The driver turns each kernel of a module into
/// machine code when it loads it (half a minute for all of them on a machine that has not
/// cached them), so a model loads only its format's.
pub fn compile_for(arch: &'static str, formats: Option<Option<(bool, u8)>>) -> Result<candle_core::cuda_backend::cudarc::nvrtc::Ptx> {
    let options = match formats {
        Some(None) => vec![],
        Some(Some((pot, bits))) => vec![format!("-DONLY_POT={}", pot as u8), format!("-DONLY_BITS={bits}")],
        None => vec!["-DONLY_POT=0".into(), "-DONLY_BITS=0".into()],
    };
    let opts = CompileOptions { arch: Some(arch), name: Some("qgemm.cu".into()), options, ..Default::default() };
    compile_ptx_with_opts(SOURCE, opts).map_err(|e| anyhow::anyhow!("NVRTC: {e:?}"))
}

/// The virtual architecture to compile for on the GPU of `stream`, and whether that GPU has
/// programmatic dependent launch (sm_90 and newer; compute_90 has its instructions).
pub(crate) fn target(stream: &CudaStream) -> Result<(&'static str, bool)> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR;
    let major = stream.context().attribute(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR).context("compute capability")?;
    Ok(if major >= 9 { ("compute_90", true) } else { ("compute_80", false) })
}

/// A kernel argument as `cuLaunchKernelEx` takes it.
pub(crate) fn arg<T>(v: &T) -> *mut c_void {
    v as *const T as *mut c_void
}

/// Launches `f` on `stream`; with `dependent`, allowed to start before the previous launch
/// ends (programmatic stream serialization): the kernel then waits for it before reading what
/// it may have written (`qgemm.cu`, `decode.cu`).
///
/// # Safety
/// `args` must point to `f`'s arguments, in order and of its types; `dependent` only on a GPU
/// that has dependent launch (`target`).
pub(crate) unsafe fn launch(stream: &CudaStream, f: &CudaFunction, cfg: LaunchConfig, dependent: bool, args: &mut [*mut c_void]) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let mut attr: sys::CUlaunchAttribute = std::mem::zeroed();
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    let config = sys::CUlaunchConfig {
        gridDimX: cfg.grid_dim.0,
        gridDimY: cfg.grid_dim.1,
        gridDimZ: cfg.grid_dim.2,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: stream.cu_stream(),
        attrs: &mut attr,
        numAttrs: dependent as u32,
    };
    stream.context().bind_to_thread()?;
    sys::cuLaunchKernelEx(&config, f.cu_function(), args.as_mut_ptr(), std::ptr::null_mut()).result().context("cuLaunchKernelEx")?;
    Ok(())
}

impl Kernels {
    pub fn new(stream: Arc<CudaStream>) -> Result<Self> {
        let (arch, can_launch_dependent) = target(&stream)?;
        let module = stream.context().load_module(compile_for(arch, None)?).context("loading qgemm PTX")?;
        let copy = module.load_function("copy_u4").context("kernel copy_u4")?;
        let read = module.load_function("read_u4").context("kernel read_u4")?;
        let sink = stream.alloc_zeros::<u32>(4 * reference_grid(usize::MAX) as usize)?;
        let formats = Mutex::new(HashMap::new());
        Ok(Self { stream, arch, can_launch_dependent, dependent_launch: can_launch_dependent, formats, copy, read, sink })
    }

    /// Compiles and loads the kernels of PoT (`pot`) or INT codes at `bits`, unless done
    /// before: products of that format do it on first use, this does it ahead.
    pub fn prepare(&self, pot: bool, bits: u8) -> Result<Arc<Functions>> {
        ensure!((2..=4).contains(&bits), "no kernels for {bits}-bit codes");
        let mut formats = self.formats.lock().map_err(|_| anyhow::anyhow!("kernel table poisoned"))?;
        if let Some(f) = formats.get(&(pot, bits)) {
            return Ok(f.clone());
        }
        let ptx = compile_for(self.arch, Some(Some((pot, bits))))?;
        let module = self.stream.context().load_module(ptx).context("loading qgemm PTX")?;
        let mut funcs = HashMap::new();
        for c in CONFIGS {
            let name = kernel_name(pot, bits, c);
            let f = module.load_function(&name).with_context(|| format!("kernel {name}"))?;
            let shared = c.shared_bytes(bits, X_SHARED_MAX_COLS);
            if shared > 48 * 1024 {
                use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
                f.set_attribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, shared as i32).with_context(|| format!("{name}: {shared} bytes of shared memory"))?;
            }
            funcs.insert(name, f);
        }
        let name = dequant_name(pot, bits);
        funcs.insert(name.clone(), module.load_function(&name).with_context(|| format!("kernel {name}"))?);
        let funcs = Arc::new(funcs);
        formats.insert((pot, bits), funcs.clone());
        Ok(funcs)
    }

    /// Whether products launch with programmatic dependent launch (on by default on sm_90 and
    /// newer; off, each product waits for the previous launch to end before it starts).
    pub fn dependent_launch(&self) -> bool {
        self.dependent_launch
    }

    /// Turns dependent launch off (or back on, where the GPU has it), for comparisons.
    pub fn set_dependent_launch(&mut self, on: bool) -> Result<()> {
        ensure!(!on || self.can_launch_dependent, "dependent launch needs sm_90 or newer");
        self.dependent_launch = on;
        Ok(())
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

    /// `y[t][r] = Σ_k w(r, k)·x[t][k]` for `tokens` tokens: `x` `[tokens, cols]` and `y`
    /// `[tokens, rows]` in `io`'s type (the products take the activations as f16 either way),
    /// as raw device pointers on this stream.
    ///
    /// # Safety
    /// `x` and `y` must point to at least `tokens·cols` and `tokens·rows` elements of `io`'s
    /// type on this device.
    pub unsafe fn matmul_raw(&self, w: &GpuMatrix, x: u64, y: u64, tokens: usize, io: Io) -> Result<()> {
        self.matmul_raw_with(w, x, y, tokens, io, None)
    }

    /// `matmul_raw` with a chosen configuration for every chunk (`None`: `config_for`).
    ///
    /// # Safety
    /// As `matmul_raw`.
    pub unsafe fn matmul_raw_with(&self, w: &GpuMatrix, x: u64, y: u64, tokens: usize, io: Io, config: Option<Config>) -> Result<()> {
        ensure!(tokens > 0, "no tokens");
        let (wp, _g1) = w.words.device_ptr(&self.stream);
        let (mp, _g2) = w.meta.device_ptr(&self.stream);
        let (n, k, tpg) = (w.rows as i32, w.cols as i32, (w.group / TILE_COLS) as i32);
        let funcs = self.prepare(w.pot, w.bits)?;
        let mut done = 0;
        while done < tokens {
            let b = (tokens - done).min(config.map_or(MAX_TOKENS, |c| c.max_tokens()));
            let c = config.unwrap_or_else(|| config_for(b, w.rows, w.cols, w.bits, w.pot));
            ensure!(w.rows.is_multiple_of(TILE_ROWS * c.mr), "configuration {c:?} needs rows in multiples of {}", TILE_ROWS * c.mr);
            ensure!(c.fits(b, w.cols), "configuration {c:?} cannot take {b} tokens of {} columns", w.cols);
            let f = function(&funcs, &kernel_name(w.pot, w.bits, c))?;
            let (xp, yp) = (x + (done * w.cols * io.bytes()) as u64, y + (done * w.rows * io.bytes()) as u64);
            let (bi, flags) = (b as i32, io.flags());
            let cfg = LaunchConfig { grid_dim: ((w.rows / TILE_ROWS / c.mr) as u32, 1, 1), block_dim: ((32 * c.ks) as u32, 1, 1), shared_mem_bytes: c.shared_bytes(w.bits, w.cols) as u32 };
            // One token tile only: a block of many tokens is one of several an SM holds, and a
            // launch started early took SMs unevenly (measured slower at 16 tokens).
            if self.dependent_launch && c.nt == 1 {
                let mut args = [arg(&wp), arg(&mp), arg(&xp), arg(&yp), arg(&n), arg(&k), arg(&bi), arg(&tpg), arg(&flags)];
                launch(&self.stream, f, cfg, true, &mut args)?;
            } else {
                let mut l = self.stream.launch_builder(f);
                l.arg(&wp).arg(&mp).arg(&xp).arg(&yp).arg(&n).arg(&k).arg(&bi).arg(&tpg).arg(&flags);
                l.launch(cfg)?;
            }
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
        let (n, k, tpg) = (w.rows as i32, w.cols as i32, (w.group / TILE_COLS) as i32);
        let tiles = (w.rows / TILE_ROWS) * (w.cols / TILE_COLS);
        let blocks = tiles.div_ceil(8).clamp(1, 132 * 16) as u32;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let funcs = self.prepare(w.pot, w.bits)?;
        let mut l = self.stream.launch_builder(function(&funcs, &dequant_name(w.pot, w.bits))?);
        l.arg(&wp).arg(&mp).arg(&out).arg(&n).arg(&k).arg(&tpg);
        l.launch(cfg)?;
        Ok(())
    }

    /// Copies `src` into `dst` (16-byte elements) with a plain kernel: the device's copy
    /// bandwidth, measured beside the products.
    pub fn copy(&self, src: &CudaSlice<u32>, dst: &mut CudaSlice<u32>) -> Result<()> {
        ensure!(src.len() == dst.len(), "copy: lengths");
        let (dp, _g) = dst.device_ptr(&self.stream);
        self.reference(&self.copy, src, dp)
    }

    /// Reads `src` (16-byte elements, as the products read their codes) and writes nothing:
    /// the device's read bandwidth, and for a matrix's codes the time any kernel needs just
    /// to read them once.
    pub fn read(&self, src: &CudaSlice<u32>) -> Result<()> {
        let (kp, _g) = self.sink.device_ptr(&self.stream);
        self.reference(&self.read, src, kp)
    }

    /// Launches a bandwidth reference, `f(src, dst, n)` over `src`'s n 16-byte elements.
    fn reference(&self, f: &CudaFunction, src: &CudaSlice<u32>, dst: u64) -> Result<()> {
        ensure!(src.len().is_multiple_of(4), "whole 16-byte elements");
        let (sp, _g) = src.device_ptr(&self.stream);
        let n = (src.len() / 4) as u64;
        let cfg = LaunchConfig { grid_dim: (reference_grid(n as usize), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let mut l = self.stream.launch_builder(f);
        l.arg(&sp).arg(&dst).arg(&n);
        unsafe { l.launch(cfg)? };
        Ok(())
    }
}
