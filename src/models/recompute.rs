//! Recompute policies: what a training forward keeps for the backward, and what the backward recomputes.
//!
//! - [`Recompute::None`]: every block's activations are kept (fastest, most memory).
//! - [`Recompute::Blocks`]: per-block checkpointing. Only the input of each block is kept (the transformer
//!   layers of ESM-2/NT-v2; the stem, every conv-tower level and every transformer layer of Enformer); the
//!   backward re-runs each block's forward from that input, into one block's worth of buffers, just before
//!   differentiating it. Costs about one extra forward; the gradients are bit-identical to [`Recompute::None`]
//!   because the recomputed forward is the same deterministic code on the same inputs.
//!
//! Attention never keeps its score matrix under either policy: only its output and the log-sum-exp (the
//! FlashAttention-2 contract of every backend).

use crate::{Error, Result};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Recompute {
    #[default]
    None,
    Blocks,
}

impl Recompute {
    /// Every policy, cheapest in compute first.
    pub const ALL: [Recompute; 2] = [Recompute::None, Recompute::Blocks];

    pub fn name(self) -> &'static str {
        match self {
            Recompute::None => "none",
            Recompute::Blocks => "blocks",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Recompute::None),
            "blocks" => Ok(Recompute::Blocks),
            other => Err(Error::invalid(
                "recompute",
                format!("'{other}' is not a policy (none, blocks)"),
            )),
        }
    }
}

impl std::fmt::Display for Recompute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
