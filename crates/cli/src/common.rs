//! What the subcommands share: default assets, text loading, progress bars, JSON output.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use potptq_model::corpus::{self, Split};

/// Where `scripts/fetch-assets.sh` puts the default model and text.
pub fn assets_dir() -> PathBuf {
    std::env::var_os("POTPTQ_ASSETS").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("assets"))
}

pub const DEFAULT_MODEL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// `--model`, or the default model fetched by `scripts/fetch-assets.sh`.
pub fn model_path(arg: Option<PathBuf>) -> Result<PathBuf> {
    match arg {
        Some(p) => Ok(p),
        None => {
            let p = assets_dir().join(DEFAULT_MODEL);
            if !p.exists() {
                anyhow::bail!("model not found: {} (run scripts/fetch-assets.sh, or pass --model)", p.display());
            }
            Ok(p)
        }
    }
}

/// A text to evaluate on, with a name for reports.
pub struct Text {
    pub name: String,
    pub content: String,
}

impl Text {
    pub fn sha256(&self) -> String {
        corpus::sha256_hex(self.content.as_bytes())
    }
}

/// `--text FILE`, or the Brown test split.
pub fn load_text(arg: Option<&Path>) -> Result<Text> {
    match arg {
        Some(path) => {
            let bytes = std::fs::read(path).with_context(|| format!("cannot read text {}", path.display()))?;
            let content = String::from_utf8(bytes).with_context(|| format!("{} is not UTF-8 text", path.display()))?;
            Ok(Text { name: path.display().to_string(), content })
        }
        None => Ok(Text {
            name: "brown-test".into(),
            content: corpus::brown_split(&assets_dir().join("brown"), Split::Test)?,
        }),
    }
}

pub fn progress_bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}")
            .expect("valid progress template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

/// A line of progress on stderr: above the bar on a terminal, plain otherwise (logs).
pub fn say(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        eprintln!("{line}");
    } else {
        bar.println(line);
    }
}

/// Prints `value` as one JSON line: the last line of stdout for scripts.
pub fn print_json(value: &serde_json::Value) {
    println!("{value}");
}

/// `--device`: where the model runs.
#[derive(Clone, Copy, Debug, clap::ValueEnum, PartialEq, Eq)]
pub enum DeviceArg {
    Cpu,
    /// The first NVIDIA GPU (a build with the `cuda` feature); packed linears run through the
    /// fused GPU kernels.
    Cuda,
}

impl DeviceArg {
    pub fn device(self) -> Result<candle_core::Device> {
        match self {
            DeviceArg::Cpu => Ok(candle_core::Device::Cpu),
            DeviceArg::Cuda if candle_core::utils::cuda_is_available() => Ok(candle_core::Device::new_cuda(0)?),
            DeviceArg::Cuda => anyhow::bail!("--device cuda needs a build with the `cuda` feature (scripts/build-cuda.sh) and a GPU"),
        }
    }

    /// The device for running a model (`eval`, `generate`). On a GPU, everything they launch
    /// runs on the device's one stream, so the events that order a tensor's uses across
    /// streams are pure overhead, per operation and per token: they are switched off.
    pub fn inference_device(self) -> Result<candle_core::Device> {
        let device = self.device()?;
        #[cfg(feature = "cuda")]
        if let candle_core::Device::Cuda(d) = &device {
            // SAFETY: one stream: no tensor is used on another stream.
            unsafe { d.disable_event_tracking() }
        }
        Ok(device)
    }

    pub fn name(self) -> &'static str {
        match self {
            DeviceArg::Cpu => "cpu",
            DeviceArg::Cuda => "cuda",
        }
    }
}

/// How many of `model`'s packed linears run through the fused GPU kernels, of how many packed.
pub fn gpu_kernel_linears(model: &potptq_model::Model) -> (usize, usize) {
    let linears = || model.blocks.iter().flat_map(|b| potptq_model::llama::BLOCK_LINEARS.map(|n| b.linear(n).expect("block linear")));
    (linears().filter(|l| l.on_gpu_kernels()).count(), linears().filter(|l| l.packed().is_some()).count())
}
