//! Times Step 1 and GPTQ on LLaMA-like layer shapes: `cargo run --release -p potptq-quant --example timing`.
use std::time::Instant;

use potptq_quant::{gptq, quantize_pot_step1, quantize_rtn, Format, GptqOptions, Grid, GroupLayout, Hessian};

fn synthetic(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 40) as f32 / (1u64 << 24) as f32
    };
    (0..n).map(|_| ((0..4).map(|_| next()).sum::<f32>() - 2.0) * 0.035).collect()
}

/// CPU time of the calling thread (Linux), so that timings hold on a busy machine.
fn thread_cpu_seconds() -> f64 {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    s.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(f64::NAN) / 1e9
}

/// CPU time of the whole process, all threads (user + system, from /proc/self/stat in ticks).
fn process_cpu_seconds() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses): utime and stime are the 12th and 13th.
    let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(f64::NAN);
    (field(11) + field(12)) / 100.0
}

/// Single-thread Step-1 throughput by CPU time: `search_scale` on every group of `w`.
fn step1_single_thread(w: &[f32], layout: GroupLayout, bits: u8, grid: &Grid) -> f64 {
    let mut search = potptq_quant::step1::ScaleSearch::new(bits, grid);
    let mut sink = 0f32;
    let t = thread_cpu_seconds();
    for row in w.chunks(layout.cols) {
        for g in 0..layout.groups_per_row() {
            sink += search.search(&row[layout.group_cols(g)]);
        }
    }
    let dt = thread_cpu_seconds() - t;
    assert!(sink.is_finite());
    w.len() as f64 / dt
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let shapes: Vec<(usize, usize)> = if args.is_empty() {
        vec![(576, 576), (1536, 576), (4096, 4096)]
    } else {
        args.iter().map(|s| { let (a, b) = s.split_once('x').unwrap(); (a.parse().unwrap(), b.parse().unwrap()) }).collect()
    };
    let grid = Grid::default();
    for (rows, cols) in shapes {
        let layout = GroupLayout::new(rows, cols, 128)?;
        let w = synthetic(rows * cols, (rows * 31 + cols) as u64);
        let n = (rows * cols) as f64;
        for bits in [2u8, 3, 4] {
            let t = Instant::now();
            quantize_pot_step1("t", &w, layout, bits, &grid)?;
            let s1 = t.elapsed().as_secs_f64();
            let t = Instant::now();
            quantize_rtn("t", &w, layout, Format::Pot, bits)?;
            let rtn = t.elapsed().as_secs_f64();
            let one = step1_single_thread(&w, layout, bits, &grid);
            println!(
                "{rows}x{cols} bits {bits}: step1 {:.1} Mw/s wall ({s1:.3}s), one thread {:.1} Mw/s of CPU time; pot-rtn {:.1} Mw/s wall",
                n / s1 / 1e6,
                one / 1e6,
                n / rtn / 1e6
            );
        }
        let tokens = 2048;
        let z = synthetic(tokens * 64, 7);
        let mix = synthetic(64 * cols, 8);
        let mut x = vec![0f32; tokens * cols];
        for t in 0..tokens {
            for f in 0..64 {
                let zf = z[t * 64 + f];
                x[t * cols..(t + 1) * cols].iter_mut().zip(&mix[f * cols..(f + 1) * cols]).for_each(|(a, m)| *a += zf * m);
            }
        }
        let t = Instant::now();
        let mut h = Hessian::new(cols);
        h.add(&x, tokens);
        println!("{rows}x{cols}: hessian of {tokens} tokens {:.3}s", t.elapsed().as_secs_f64());
        for (format, act_order) in [(Format::IntAsym, false), (Format::Pot, false), (Format::Pot, true)] {
            let opts = GptqOptions { act_order, ..Default::default() };
            let (t, cpu) = (Instant::now(), process_cpu_seconds());
            gptq("t", &w, layout, &h, format, 3, &grid, &opts)?;
            println!(
                "{rows}x{cols}: gptq {format:?} 3-bit act_order={act_order} {:.2}s wall, {:.2}s CPU (all threads)",
                t.elapsed().as_secs_f64(),
                process_cpu_seconds() - cpu
            );
        }
    }
    Ok(())
}
