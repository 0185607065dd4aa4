//! The comparison report: `report.json` (everything) and `report.md` (the table).

use std::path::Path;

use anyhow::Result;
use potptq_calib::BlockSummary;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    pub method: String,
    pub bits: Option<u8>,
    /// Codes + f16 scales (+ INT zero-points), real group counts.
    pub bits_per_weight: Option<f64>,
    /// The paper's accounting: bits + 32/G.
    pub paper_bits_per_weight: Option<f64>,
    pub file_bytes: u64,
    pub ppl: f64,
    pub delta_ppl: f64,
    pub seconds: f64,
    pub clamped_scales: usize,
    pub checkpoint: Option<String>,
    /// Step 2's loss and Γ per block, for the methods that refine.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocks: Vec<BlockSummary>,
}

impl Row {
    pub fn fp(ppl: f64, file_bytes: u64) -> Self {
        Row {
            method: "fp".into(),
            bits: None,
            bits_per_weight: None,
            paper_bits_per_weight: None,
            file_bytes,
            ppl,
            delta_ppl: 0.0,
            seconds: 0.0,
            clamped_scales: 0,
            checkpoint: None,
            blocks: Vec::new(),
        }
    }
}

pub fn markdown_table(rows: &[Row]) -> String {
    let mut s = String::from("| method | bits | bits/weight | file MB | PPL | ΔPPL vs FP | time s |\n|---|---|---|---|---|---|---|\n");
    for r in rows {
        let opt = |v: Option<f64>| v.map_or("—".to_string(), |x| format!("{x:.3}"));
        s.push_str(&format!(
            "| {} | {} | {} | {:.1} | {:.3} | {:+.3} | {:.1} |\n",
            r.method,
            r.bits.map_or("—".into(), |b| b.to_string()),
            opt(r.bits_per_weight),
            r.file_bytes as f64 / 1e6,
            r.ppl,
            r.delta_ppl,
            r.seconds
        ));
    }
    s
}

/// Step 2 per block, for each method that ran it: the block-output MSE before and after, the
/// loss of each epoch, and the distribution of the learned `Γ`.
pub fn step2_tables(rows: &[Row]) -> String {
    let mut s = String::new();
    for r in rows.iter().filter(|r| !r.blocks.is_empty()) {
        s.push_str(&format!(
            "\n## Step 2: {} ({} bits)\n\n| block | MSE before | MSE after | loss per epoch | Γ mean | Γ std | Γ min | Γ max | s |\n|---|---|---|---|---|---|---|---|---|\n",
            r.method,
            r.bits.unwrap_or(0)
        ));
        for b in &r.blocks {
            let Some(x) = &b.refine else { continue };
            let epochs: Vec<String> = x.epoch_losses.iter().map(|l| format!("{l:.3e}")).collect();
            s.push_str(&format!(
                "| {} | {:.4e} | {:.4e} | {} | {:+.4} | {:.4} | {:+.4} | {:+.4} | {:.1} |\n",
                b.block,
                x.loss_before,
                x.loss_after,
                epochs.join(" "),
                x.gamma.mean,
                x.gamma.std,
                x.gamma.min,
                x.gamma.max,
                x.seconds
            ));
        }
    }
    s
}

pub fn write(dir: &Path, settings: &serde_json::Value, rows: &[Row], table: &str) -> Result<()> {
    let json = serde_json::json!({ "settings": settings, "rows": rows });
    potptq_model::atomic_write(&dir.join("report.json"), |w| {
        serde_json::to_writer_pretty(&mut *w, &json)?;
        Ok(())
    })?;
    let md = format!(
        "# potptq report\n\n```json\n{}\n```\n\n{table}{}",
        serde_json::to_string_pretty(settings)?,
        step2_tables(rows)
    );
    potptq_model::atomic_write_bytes(&dir.join("report.md"), md.as_bytes())
}

/// Fonts tried, in order, for the plot's text (plotters draws text with a font it is given).
const FONT_FILES: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

fn register_font() -> Result<()> {
    use std::sync::OnceLock;
    static FONT: OnceLock<Option<&'static [u8]>> = OnceLock::new();
    let font = FONT.get_or_init(|| {
        let mut candidates: Vec<String> = std::env::var("POTPTQ_FONT").ok().into_iter().collect();
        candidates.extend(FONT_FILES.iter().map(|s| s.to_string()));
        let bytes = candidates.iter().find_map(|p| std::fs::read(p).ok())?;
        Some(&*Box::leak(bytes.into_boxed_slice()))
    });
    match font {
        Some(bytes) => {
            plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, bytes)
                .map_err(|_| anyhow::anyhow!("the font file is not a usable TrueType font"))?;
            Ok(())
        }
        None => anyhow::bail!("no TrueType font found (install fonts-dejavu-core or set POTPTQ_FONT)"),
    }
}

/// `report.png`: perplexity by bit width, one line per method, log scale, FP as a line.
pub fn plot(path: &Path, rows: &[Row], title: &str) -> Result<()> {
    use plotters::prelude::*;
    register_font()?;
    let fp = rows.iter().find(|r| r.method == "fp").map(|r| r.ppl);
    let quant: Vec<&Row> = rows.iter().filter(|r| r.bits.is_some()).collect();
    if quant.is_empty() {
        return Ok(());
    }
    let bits: Vec<u8> = quant.iter().filter_map(|r| r.bits).collect();
    let (bmin, bmax) = (*bits.iter().min().unwrap() as f64, *bits.iter().max().unwrap() as f64);
    let ppls: Vec<f64> = quant.iter().map(|r| r.ppl).chain(fp).filter(|p| p.is_finite() && *p > 0.0).collect();
    let (pmin, pmax) = ppls.iter().fold((f64::MAX, f64::MIN), |(a, b), &p| (a.min(p), b.max(p)));
    if bmin == bmax {
        return plot_bars(path, &quant, fp, (pmin, pmax), &format!("{title}, {bmin} bits"));
    }
    // The encoder picks the format from the extension: keep `.png` on the temporary name.
    let tmp = path.with_extension("partial.png");
    {
        let root = BitMapBackend::new(&tmp, (900, 600)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d((bmin - 0.3)..(bmax + 0.3), (pmin * 0.8..pmax * 1.25).log_scale())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .x_desc("bits per weight (codes)")
            .y_desc("perplexity (log scale)")
            .x_labels(((bmax - bmin) as usize + 1).max(2))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| if *y >= 1e4 { format!("{y:.0e}") } else { format!("{y:.0}") })
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut methods: Vec<&str> = quant.iter().map(|r| r.method.as_str()).collect();
        methods.dedup();
        methods.sort();
        methods.dedup();
        for (i, m) in methods.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let mut pts: Vec<(f64, f64)> = quant.iter().filter(|r| r.method == *m).map(|r| (r.bits.unwrap() as f64, r.ppl)).collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .label(m.to_string())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        if let Some(fp) = fp {
            chart
                .draw_series(LineSeries::new(vec![(bmin - 0.3, fp), (bmax + 0.3, fp)], BLACK.stroke_width(1)))
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .label("fp")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// One bit width (an ablation): one horizontal bar per method, log scale, FP as a line.
fn plot_bars(path: &Path, rows: &[&Row], fp: Option<f64>, (pmin, pmax): (f64, f64), title: &str) -> Result<()> {
    use plotters::prelude::*;
    let n = rows.len();
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("{e}");
    let tmp = path.with_extension("partial.png");
    {
        let root = BitMapBackend::new(&tmp, (900, 120 + 50 * n as u32)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(200)
            .build_cartesian_2d((pmin * 0.5..pmax * 2.0).log_scale(), (0..n).into_segmented())
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("perplexity (log scale)")
            .y_labels(n)
            .y_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) if *i < n => rows[n - 1 - *i].method.clone(),
                _ => String::new(),
            })
            .x_label_formatter(&|y| if *y >= 1e4 { format!("{y:.0e}") } else { format!("{y:.0}") })
            .draw()
            .map_err(|e| err(&e))?;
        chart
            .draw_series(rows.iter().rev().enumerate().map(|(i, r)| {
                let color = Palette99::pick(i).filled();
                Rectangle::new([(pmin * 0.5, SegmentValue::Exact(i)), (r.ppl, SegmentValue::Exact(i + 1))], color)
            }))
            .map_err(|e| err(&e))?;
        if let Some(fp) = fp {
            chart
                .draw_series(LineSeries::new(vec![(fp, SegmentValue::Exact(0)), (fp, SegmentValue::Exact(n))], BLACK.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(format!("fp {fp:.2}"))
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
            chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(|e| err(&e))?;
        }
        root.present().map_err(|e| err(&e))?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(())
}
