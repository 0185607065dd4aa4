//! How one group is quantized: the rule that picks its parameters, and the code of each weight.
//! RTN, Step 1 and GPTQ all go through here, so a format's parameters are computed one way.

use crate::qtensor::{pot_f16_scale, Format};
use crate::step1::{self, Grid, ScaleSearch};
use crate::{int, pot};

/// One group's parameters, as stored.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GroupParams {
    pub scale: f32,
    /// INT zero-point; 0 for PoT.
    pub zero: u8,
    /// The scale was clamped to keep the f16 bit-add precondition.
    pub clamped: bool,
}

/// Picks the parameters of a group and encodes its weights.
pub(crate) struct GroupQuantizer<'g> {
    format: Format,
    bits: u8,
    /// PoT only: Step 1's search; without it PoT uses `s0`.
    search: Option<ScaleSearch<'g>>,
}

impl<'g> GroupQuantizer<'g> {
    /// Round to nearest: PoT with `s0`, INT with min-max.
    pub fn rtn(format: Format, bits: u8) -> Self {
        Self { format, bits, search: None }
    }

    /// PoT with Step 1's scale; INT ignores the grid and uses min-max.
    pub fn searched(format: Format, bits: u8, grid: &'g Grid) -> Self {
        let search = (format == Format::Pot).then(|| ScaleSearch::new(bits, grid));
        Self { format, bits, search }
    }

    pub fn params(&mut self, group: &[f32]) -> GroupParams {
        self.params_weighted(group, None)
    }

    /// With `column_weights`, PoT's scale search minimizes the error weighted per column.
    pub fn params_weighted(&mut self, group: &[f32], column_weights: Option<&[f32]>) -> GroupParams {
        let bits = self.bits;
        let (scale, zero, clamped) = match self.format {
            Format::Pot => {
                let s0 = step1::s0(group, bits);
                // A group counts as clamped when its natural scale s0 lies outside the f16
                // range (for Step 1: the grid around it was cut at the range's edge).
                let (stored_s0, clamped) = pot_f16_scale(s0, bits);
                let scale = match (&mut self.search, column_weights) {
                    (Some(search), Some(c)) => search.search_weighted(group, c),
                    (Some(search), None) => search.search(group),
                    (None, _) => stored_s0,
                };
                (scale, 0, clamped)
            }
            Format::IntAsym => int::asym(group, bits),
            Format::IntSym => int::sym(group, bits),
        };
        GroupParams { scale, zero, clamped }
    }

    #[inline]
    pub fn encode(&self, p: GroupParams, w: f32) -> u8 {
        match self.format {
            Format::Pot => pot::encode(w, p.scale, self.bits),
            _ => int::encode(w, p.scale, p.zero, self.bits),
        }
    }

    #[inline]
    pub fn decode(&self, p: GroupParams, code: u8) -> f32 {
        match self.format {
            Format::Pot => pot::decode(code, p.scale, self.bits),
            _ => int::decode(code, p.scale, p.zero),
        }
    }
}
