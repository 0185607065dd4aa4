//! The quantization methods a run can compare, by the names reports use.

use anyhow::{bail, Result};
use potptq_quant::Format;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Asymmetric min-max INT with zero-points (the GPTQ/AutoGPTQ default), round to nearest.
    RtnInt,
    /// GPTQ with the INT quantizer of `RtnInt`.
    GptqInt,
    /// Symmetric INT (GPTQ's `sym=True`), round to nearest.
    RtnIntSym,
    /// GPTQ with the symmetric INT quantizer.
    GptqIntSym,
    /// PoT with `s0` scales, no search: the paper's "neither step".
    PotRtn,
    /// PoT with Step-1 grid-searched scales.
    PotS1,
    /// GPTQ error feedback with the PoT quantizer and Step-1 scales per group.
    PotGptq,
}

impl Method {
    pub const ALL: [Method; 7] =
        [Method::RtnInt, Method::GptqInt, Method::RtnIntSym, Method::GptqIntSym, Method::PotRtn, Method::PotS1, Method::PotGptq];

    pub fn name(self) -> &'static str {
        match self {
            Method::RtnInt => "rtn-int",
            Method::GptqInt => "gptq-int",
            Method::RtnIntSym => "rtn-int-sym",
            Method::GptqIntSym => "gptq-int-sym",
            Method::PotRtn => "pot-rtn",
            Method::PotS1 => "pot-s1",
            Method::PotGptq => "pot-gptq",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match Self::ALL.iter().find(|m| m.name() == s) {
            Some(m) => Ok(*m),
            None => bail!(
                "unknown method `{s}` (known: {})",
                Self::ALL.iter().map(|m| m.name()).collect::<Vec<_>>().join(", ")
            ),
        }
    }

    pub fn format(self) -> Format {
        match self {
            Method::RtnInt | Method::GptqInt => Format::IntAsym,
            Method::RtnIntSym | Method::GptqIntSym => Format::IntSym,
            Method::PotRtn | Method::PotS1 | Method::PotGptq => Format::Pot,
        }
    }

    /// Needs calibration activations.
    pub fn uses_data(self) -> bool {
        matches!(self, Method::GptqInt | Method::GptqIntSym | Method::PotGptq)
    }

    /// What produced the scales, for `quantization_config.steps`.
    pub fn steps(self) -> Vec<String> {
        let s: &[&str] = match self {
            Method::RtnInt => &["minmax"],
            Method::GptqInt => &["minmax", "gptq"],
            Method::RtnIntSym => &["minmax-sym"],
            Method::GptqIntSym => &["minmax-sym", "gptq"],
            Method::PotRtn => &["s0"],
            Method::PotS1 => &["step1"],
            Method::PotGptq => &["step1", "gptq"],
        };
        s.iter().map(|x| x.to_string()).collect()
    }
}
