//! The fused GPU kernels against their CPU reference (`cuda::reference_matmul`). The GPU test
//! runs where a GPU is present and says so where none is; the NVRTC test where the NVRTC
//! library can be loaded.
#![cfg(feature = "cuda")]

use candle_core::Device;
use half::f16;
use potptq_kernels::cuda::gpu::{compile, compile_for, Io, Kernels, CONFIGS};
use potptq_kernels::cuda::{reference_matmul, GpuLayout};
use potptq_kernels::PackedMatrix;
use potptq_quant::{quantize_rtn, Format, GroupLayout};

fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

#[test]
fn nvrtc_compiles_the_kernels() {
    match std::panic::catch_unwind(compile) {
        Ok(ptx) => {
            let ptx = ptx.unwrap().to_src();
            assert!(ptx.contains("mma.sync.aligned.m16n8k16"));
            assert!(ptx.contains(".entry pot_b2_") && ptx.contains(".entry int_b4_"));
            // One format's kernels, or only the bandwidth references.
            let one = compile_for("compute_80", Some(Some((true, 3)))).unwrap().to_src();
            assert!(one.contains(".entry pot_b3_") && one.contains(".entry pot_dequant_b3"));
            assert!(!one.contains(".entry pot_b2_") && !one.contains(".entry int_b3_"));
            let none = compile_for("compute_80", None).unwrap().to_src();
            assert!(none.contains(".entry copy_u4") && !none.contains(".entry pot_"));
        }
        Err(_) => eprintln!("NVRTC library not found: compilation not tested"),
    }
}

#[test]
fn gpu_kernels_match_the_cpu_reference() {
    let dev = match Device::new_cuda(0) {
        Ok(Device::Cuda(d)) => d,
        _ => {
            eprintln!("no CUDA device: GPU kernels not tested");
            return;
        }
    };
    let kernels = Kernels::new(dev.cuda_stream()).unwrap();
    let stream = kernels.stream().clone();
    // 576 columns in groups of 128 end in a short group of 64, as in SmolLM2. 8384 columns
    // give every warp many K tiles (and a ring of stages several rounds) and end in one too.
    for &(rows, cols, group) in &[(64, 256, 128), (48, 384, 64), (32, 1024, 128), (32, 576, 128), (32, 8384, 128)] {
        let w: Vec<f32> = noise(rows * cols, (rows * cols) as u64).iter().map(|v| v * 0.05).collect();
        let layout = GroupLayout::new(rows, cols, group).unwrap();
        for (format, bits) in [(Format::Pot, 2), (Format::Pot, 3), (Format::Pot, 4), (Format::IntAsym, 2), (Format::IntAsym, 3), (Format::IntAsym, 4)] {
            let q = quantize_rtn("w", &w, layout, format, bits).unwrap();
            let m = GpuLayout::from_packed(&PackedMatrix::from_qtensor(&q).unwrap()).unwrap();
            let gm = kernels.upload(&m).unwrap();
            // The f16 weights for dense products: each weight rounded once to f16.
            let wd = stream.alloc_zeros::<u16>(rows * cols).unwrap();
            {
                use candle_core::cuda_backend::cudarc::driver::DevicePtr;
                let (wp, _g) = wd.device_ptr(&stream);
                unsafe { kernels.dequantize_raw(&gm, wp).unwrap() };
            }
            let dense = stream.clone_dtoh(&wd).unwrap();
            for r in 0..rows {
                for c in 0..cols {
                    let (got, want) = (f16::from_bits(dense[r * cols + c]).to_f64(), m.weight(r, c));
                    assert!((got - want).abs() <= 1e-3 * want.abs() + 1e-7, "{format:?} {bits} bits [{rows}, {cols}] g{group}: dequantized ({r}, {c}) = {got} vs {want}");
                }
            }
            for tokens in [1, 3, 8, 16, 17, 33, 64, 70] {
                let x: Vec<f16> = noise(tokens * cols, tokens as u64 + 99).iter().map(|&v| f16::from_f32(v)).collect();
                let xb: Vec<u16> = x.iter().map(|h| h.to_bits()).collect();
                let xd = stream.clone_htod(&xb).unwrap();
                // The same activations as f32 (exactly the f16 values): the kernels' f32 input
                // and output path, which a model in f32 takes.
                let xd32 = stream.clone_htod(&x.iter().map(|h| h.to_f32()).collect::<Vec<f32>>()).unwrap();
                let want = reference_matmul(&m, &x, tokens);
                let abs: Vec<f64> = (0..tokens * rows).map(|i| (0..cols).map(|c| (m.weight(i % rows, c) * x[(i / rows) * cols + c].to_f64()).abs()).sum()).collect();
                // The chosen configuration, then every instantiation that fits the rows.
                let configs = std::iter::once(None).chain(CONFIGS.iter().filter(|c| rows % (16 * c.mr) == 0).map(|&c| Some(c)));
                for config in configs {
                    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
                    let yd = stream.alloc_zeros::<u16>(tokens * rows).unwrap();
                    let yd32 = stream.alloc_zeros::<f32>(tokens * rows).unwrap();
                    {
                        let (xp, _g1) = xd.device_ptr(&stream);
                        let (yp, _g2) = yd.device_ptr(&stream);
                        unsafe { kernels.matmul_raw_with(&gm, xp, yp, tokens, Io::F16, config).unwrap() };
                        let (xp, _g3) = xd32.device_ptr(&stream);
                        let (yp, _g4) = yd32.device_ptr(&stream);
                        unsafe { kernels.matmul_raw_with(&gm, xp, yp, tokens, Io::F32, config).unwrap() };
                    }
                    let y16: Vec<f64> = stream.clone_dtoh(&yd).unwrap().into_iter().map(|b| f16::from_bits(b).to_f64()).collect();
                    let y32: Vec<f64> = stream.clone_dtoh(&yd32).unwrap().into_iter().map(|v| v as f64).collect();
                    for (io, y) in [("f16", &y16), ("f32", &y32)] {
                        for t in 0..tokens {
                            for r in 0..rows {
                                let i = t * rows + r;
                                let err = (y[i] - want[i]).abs();
                                assert!(err <= 2e-3 * abs[i] + 1e-6, "{format:?} {bits} bits [{rows}, {cols}] g{group}, {tokens} tokens, {config:?}, {io}: y[{t}][{r}] = {} vs {} (Σ|wx| {})", y[i], want[i], abs[i]);
                            }
                        }
                    }
                }
            }
        }
    }
}
