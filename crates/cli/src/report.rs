//! The comparison report: `report.json` (everything) and `report.md` (the table).

use std::path::Path;

use anyhow::Result;
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
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

pub fn write(dir: &Path, settings: &serde_json::Value, rows: &[Row], table: &str) -> Result<()> {
    let json = serde_json::json!({ "settings": settings, "rows": rows });
    potptq_model::atomic_write(&dir.join("report.json"), |w| {
        serde_json::to_writer_pretty(&mut *w, &json)?;
        Ok(())
    })?;
    let md = format!(
        "# potptq report\n\n```json\n{}\n```\n\n{table}",
        serde_json::to_string_pretty(settings)?
    );
    potptq_model::atomic_write(&dir.join("report.md"), |w| {
        use std::io::Write;
        w.write_all(md.as_bytes())?;
        Ok(())
    })
}
