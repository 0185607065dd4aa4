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
    /// Step 2 from `s0` scales: the paper's "Step 2 only".
    PotS2,
    /// Step 1, then Step 2: PoTPTQ as the paper runs it.
    PotS1S2,
    /// PoT-GPTQ, then Step 2 on its scales (its codes stay GPTQ's).
    PotGptqS2,
}

/// How a method quantizes a block before any Step 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    /// From the weights alone: min-max INT, or PoT with `s0` scales.
    Rtn,
    /// PoT with Step 1's grid-searched scales.
    Step1,
    /// GPTQ on the calibration activations.
    Gptq,
}

impl Method {
    pub const ALL: [Method; 10] = [
        Method::RtnInt,
        Method::GptqInt,
        Method::RtnIntSym,
        Method::GptqIntSym,
        Method::PotRtn,
        Method::PotS1,
        Method::PotGptq,
        Method::PotS2,
        Method::PotS1S2,
        Method::PotGptqS2,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Method::RtnInt => "rtn-int",
            Method::GptqInt => "gptq-int",
            Method::RtnIntSym => "rtn-int-sym",
            Method::GptqIntSym => "gptq-int-sym",
            Method::PotRtn => "pot-rtn",
            Method::PotS1 => "pot-s1",
            Method::PotGptq => "pot-gptq",
            Method::PotS2 => "pot-s2",
            Method::PotS1S2 => "pot-s1-s2",
            Method::PotGptqS2 => "pot-gptq-s2",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        if s == "potptq" {
            return Ok(Method::PotS1S2);
        }
        match Self::ALL.iter().find(|m| m.name() == s) {
            Some(m) => Ok(*m),
            None => bail!(
                "unknown method `{s}` (known: {}, and potptq = pot-s1-s2)",
                Self::ALL.iter().map(|m| m.name()).collect::<Vec<_>>().join(", ")
            ),
        }
    }

    pub fn format(self) -> Format {
        match self {
            Method::RtnInt | Method::GptqInt => Format::IntAsym,
            Method::RtnIntSym | Method::GptqIntSym => Format::IntSym,
            _ => Format::Pot,
        }
    }

    pub fn init(self) -> Init {
        match self {
            Method::RtnInt | Method::RtnIntSym | Method::PotRtn | Method::PotS2 => Init::Rtn,
            Method::PotS1 | Method::PotS1S2 => Init::Step1,
            Method::GptqInt | Method::GptqIntSym | Method::PotGptq | Method::PotGptqS2 => Init::Gptq,
        }
    }

    /// Refines the scales with Step 2.
    pub fn refines(self) -> bool {
        matches!(self, Method::PotS2 | Method::PotS1S2 | Method::PotGptqS2)
    }

    /// Needs calibration activations.
    pub fn uses_data(self) -> bool {
        self.init() == Init::Gptq || self.refines()
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
            Method::PotS2 => &["s0", "step2"],
            Method::PotS1S2 => &["step1", "step2"],
            Method::PotGptqS2 => &["step1", "gptq", "step2"],
        };
        s.iter().map(|x| x.to_string()).collect()
    }
}

/// A method with the options that change what it produces, written `method[+option…]`:
/// `+rot` rotates the residual stream first (`rotate.rs`), `+hw` weights Step 1's scale search
/// (alone or inside GPTQ) by the input's second moments (GPTQ's Hessian diagonal), `+tw` lets
/// Step 2 train the weights the codes are rounded from, beside the scales.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Variant {
    pub method: Method,
    pub rotate: bool,
    pub weighted_step1: bool,
    pub train_weights: bool,
}

impl Variant {
    pub fn parse(s: &str) -> Result<Self> {
        let mut parts = s.split('+');
        let method = Method::parse(parts.next().unwrap_or_default())?;
        let mut v = Variant { method, rotate: false, weighted_step1: false, train_weights: false };
        for option in parts {
            match option {
                "rot" => v.rotate = true,
                "hw" if method.format() == Format::Pot && method.init() != Init::Rtn => v.weighted_step1 = true,
                "hw" => bail!("`+hw` weights Step 1's scale search: it applies to pot-s1, pot-s1-s2 and the PoT GPTQ methods, not {}", method.name()),
                "tw" if method.refines() => v.train_weights = true,
                "tw" => bail!("`+tw` trains the weights in Step 2: it applies to pot-s2, pot-s1-s2 and pot-gptq-s2, not {}", method.name()),
                other => bail!("unknown option `+{other}` in `{s}` (known: +rot, +hw, +tw)"),
            }
        }
        Ok(v)
    }

    pub fn label(&self) -> String {
        let mut l = self.method.name().to_string();
        if self.weighted_step1 {
            l.push_str("+hw");
        }
        if self.train_weights {
            l.push_str("+tw");
        }
        if self.rotate {
            l.push_str("+rot");
        }
        l
    }

    pub fn uses_data(&self) -> bool {
        self.method.uses_data() || self.weighted_step1
    }

    /// What produced the weights, for `quantization_config.steps`.
    pub fn steps(&self) -> Vec<String> {
        let mut steps = Vec::new();
        if self.rotate {
            steps.push("rotate".to_string());
        }
        for s in self.method.steps() {
            steps.push(match s.as_str() {
                "step1" if self.weighted_step1 => "step1-weighted".to_string(),
                "step2" if self.train_weights => "step2-weights".to_string(),
                _ => s,
            });
        }
        steps
    }
}
