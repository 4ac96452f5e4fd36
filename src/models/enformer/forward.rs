//! The Enformer trunk's forward over the backend trait, and the activations it keeps.
//!
//! Memory: the tensors between modules ("streams") are numbered in forward order. With `keep` (training,
//! gradient checks) each has its own tensor, as does every module's saved state. For inference they
//! rotate through three tensors (stream i is only read while streams i+1 and i+2 are made), and every
//! module of a kind shares one set of buffers, so the peak is a few tensors of the stem's size rather than
//! the whole network's activations. Either way the tensors are planned on the first call of a shape and
//! reused after it.

use std::collections::HashMap;
use std::sync::Arc;

use super::tiled::{plan_temp, tiles_apply};
use super::{crop_range, AttnLayer, ConvBlock, EnformerTrunk, BN_EPS, LN_EPS};
use crate::backend::{
    Act, AttentionDims, Backend, BatchNormStats, Conv1dDims, LinearDims, PoolDims, Role, Tensor,
    View, ViewMut,
};
use crate::models::recompute::Recompute;
use crate::{Error, Result};

/// Which statistics the batchnorms use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchNormMode {
    /// The running statistics (inference, frozen fine-tuning).
    Eval,
    /// The batch's own statistics (training); [`EnformerTrunk::update_running_stats`] then folds them
    /// into the running ones.
    Train,
}

/// A ConvBlock's saved state; its input and output are streams (or the shared temporary).
pub(super) struct ConvBlockActs<B: Backend> {
    pub normed: Tensor<B>,
    pub mean: Tensor<B>,
    pub var: Tensor<B>,
    pub gelu: Tensor<B>,
    /// Rows of the latest forward (for the running-statistics update).
    pub rows: usize,
}

/// One transformer layer's saved state.
pub(super) struct AttnActs<B: Backend> {
    pub ln1: Tensor<B>,
    pub mean1: Tensor<B>,
    pub rstd1: Tensor<B>,
    /// `q·dk^−½`.
    pub q: Tensor<B>,
    pub q_content: Tensor<B>,
    pub q_pos: Tensor<B>,
    pub k: Tensor<B>,
    pub v: Tensor<B>,
    /// `R = P·W_rᵀ`, `[2n−1, H·dk]`.
    pub rel_k: Tensor<B>,
    pub attn: Tensor<B>,
    pub lse: Tensor<B>,
    pub ln2: Tensor<B>,
    pub mean2: Tensor<B>,
    pub rstd2: Tensor<B>,
    pub ff_pre: Tensor<B>,
    pub ff_act: Tensor<B>,
}

/// Where each tensor of one convolutional level lives: streams (indices into `streams`), its
/// ConvBlocks' buffers (into `blocks`) and its pool's logits (into `pool_logits`).
#[derive(Default, Clone, Copy)]
pub(super) struct LevelTrace {
    /// The level's input: the one-hot input for the stem, the previous level's pooled stream otherwise.
    pub x_in: usize,
    /// The stem: `x0 = conv15(one-hot)`; the tower: `y = ConvBlock₅(x_in)`.
    pub y: usize,
    /// `z = y + ConvBlock₁(y)`.
    pub z: usize,
    pub pooled: usize,
    /// Buffers of the first ConvBlock (the tower's) and of the residual one.
    pub first_block: usize,
    pub residual_block: usize,
    pub pool: usize,
    /// Positions at the level's input.
    pub len: usize,
}

/// Where each tensor of the latest forward lives.
#[derive(Default, Clone)]
pub(super) struct Trace {
    pub stem: LevelTrace,
    pub tower: Vec<LevelTrace>,
    /// Per layer: (input, mid, output, saved-activations slot).
    pub layers: Vec<(usize, usize, usize, usize)>,
    pub cropped: usize,
    pub pre: usize,
    pub emb: usize,
    /// The buffers of every ConvBlock, in forward order.
    pub blocks: Vec<usize>,
}

/// Activations of the latest forward on backend `B`.
pub struct EnformerActivations<B: Backend> {
    pub(super) batch: usize,
    pub(super) seq_len: usize,
    pub(super) keep: bool,
    /// Per-block checkpointing ([`Recompute::Blocks`]): with `keep`, only each block's input is kept,
    /// and the backward recomputes the block (a stem or tower level, a transformer layer).
    pub(super) checkpoints: bool,
    /// With checkpoints, each ConvBlock's batch statistics as the forward made them (its buffers are
    /// shared with the other blocks of its kind), for the running-statistics update.
    saved_stats: Vec<(Tensor<B>, Tensor<B>, usize)>,
    pub(super) mode: BatchNormMode,
    /// Transformer length n and output bins T.
    pub transformer_len: usize,
    pub out_len: usize,
    pub(super) input: Option<Tensor<B>>,
    pub(super) streams: Vec<Tensor<B>>,
    /// Outputs of residual convolutions, projections and FFNs, read once right after.
    pub(super) temp: Option<Tensor<B>>,
    pub(super) blocks: Vec<ConvBlockActs<B>>,
    pub(super) pool_logits: Vec<Tensor<B>>,
    pub(super) layers: Vec<AttnActs<B>>,
    /// `dk^−½` per row (f32), the query scale.
    pub(super) q_scale: Option<Tensor<B>>,
    pub(super) positions: Option<Tensor<B>>,
    /// Relative-position logits `[B, H, n, n]` (f32) of the layer being run: score-sized, so one buffer
    /// serves every layer and the backward recomputes a layer's from its kept `q_pos` and `rel_k`.
    pub(super) rel_bias: Option<Tensor<B>>,
    positions_src: Option<Arc<Vec<f32>>>,
    heads: HashMap<String, Tensor<B>>,
    pub(super) trace: Trace,
    pub(super) backward: Option<super::backward::Grads<B>>,
    /// Tile buffers of the bounded-memory inference path ([`super::tiled`]).
    pub(super) tiles: Option<Box<super::tiled::TileActs<B>>>,
}

impl<B: Backend> Default for EnformerActivations<B> {
    fn default() -> Self {
        EnformerActivations {
            batch: 0,
            seq_len: 0,
            keep: false,
            checkpoints: false,
            saved_stats: Vec::new(),
            mode: BatchNormMode::Eval,
            transformer_len: 0,
            out_len: 0,
            input: None,
            streams: Vec::new(),
            temp: None,
            blocks: Vec::new(),
            pool_logits: Vec::new(),
            layers: Vec::new(),
            q_scale: None,
            positions: None,
            rel_bias: None,
            positions_src: None,
            heads: HashMap::new(),
            trace: Trace::default(),
            backward: None,
            tiles: None,
        }
    }
}

/// Makes `slot` hold a tensor of `numel` elements of `role`, allocating only when it must.
pub(super) fn ensure<B: Backend>(
    b: &B,
    slot: &mut Option<Tensor<B>>,
    role: Role,
    numel: usize,
) -> Result<()> {
    match slot {
        Some(t) => t.ensure(b, role, numel),
        None => {
            *slot = Some(Tensor::new(b, role, numel)?);
            Ok(())
        }
    }
}

/// The same for an element of a growing list (slots skipped on the way stay empty).
pub(super) fn ensure_at<B: Backend>(
    b: &B,
    list: &mut Vec<Tensor<B>>,
    i: usize,
    role: Role,
    numel: usize,
) -> Result<()> {
    while list.len() < i {
        list.push(Tensor::new(b, role, 0)?);
    }
    if i == list.len() {
        list.push(Tensor::new(b, role, numel)?);
        Ok(())
    } else {
        list[i].ensure(b, role, numel)
    }
}

impl<B: Backend> ConvBlockActs<B> {
    pub(super) fn new(b: &B, rows: usize, c: usize) -> Result<Self> {
        Ok(ConvBlockActs {
            normed: Tensor::new(b, Role::Activation, rows * c)?,
            mean: Tensor::new(b, Role::Exact, c)?,
            var: Tensor::new(b, Role::Exact, c)?,
            gelu: Tensor::new(b, Role::LinearInput, rows * c)?,
            rows,
        })
    }

    /// Grows the buffers (never shrinks them) to hold `numel` values of up to `c` channels, so that
    /// the blocks that share them later fit without growing them.
    pub(super) fn reserve(&mut self, b: &B, numel: usize, c: usize) -> Result<()> {
        for (t, role, n) in [
            (&mut self.normed, Role::Activation, numel),
            (&mut self.gelu, Role::LinearInput, numel),
            (&mut self.mean, Role::Exact, c),
            (&mut self.var, Role::Exact, c),
        ] {
            if t.numel() < n {
                t.ensure(b, role, n)?;
            }
        }
        Ok(())
    }

    pub(super) fn ensure(&mut self, b: &B, rows: usize, c: usize) -> Result<()> {
        self.normed.ensure(b, Role::Activation, rows * c)?;
        self.mean.ensure(b, Role::Exact, c)?;
        self.var.ensure(b, Role::Exact, c)?;
        self.gelu.ensure(b, Role::LinearInput, rows * c)?;
        self.rows = rows;
        Ok(())
    }
}

impl<B: Backend> AttnActs<B> {
    /// Role and size of each buffer, in field order, for `batch` sequences of `n` positions.
    fn shapes(t: &EnformerTrunk, batch: usize, n: usize) -> [(Role, usize); 16] {
        let (dim, heads, dk) = (t.cfg.dim, t.cfg.heads, t.cfg.attn_dim_key);
        let (rows, hk) = (batch * n, heads * dk);
        let (a, e) = (Role::Activation, Role::Exact);
        [
            (a, rows * dim),
            (e, rows),
            (e, rows),
            (a, rows * hk),
            (a, rows * hk),
            (a, rows * hk),
            (a, rows * hk),
            (a, rows * dim),
            (a, (2 * n - 1) * hk),
            (a, rows * dim),
            (e, batch * heads * n),
            (a, rows * dim),
            (e, rows),
            (e, rows),
            (a, rows * 2 * dim),
            (a, rows * 2 * dim),
        ]
    }

    fn fields_mut(&mut self) -> [&mut Tensor<B>; 16] {
        [
            &mut self.ln1,
            &mut self.mean1,
            &mut self.rstd1,
            &mut self.q,
            &mut self.q_content,
            &mut self.q_pos,
            &mut self.k,
            &mut self.v,
            &mut self.rel_k,
            &mut self.attn,
            &mut self.lse,
            &mut self.ln2,
            &mut self.mean2,
            &mut self.rstd2,
            &mut self.ff_pre,
            &mut self.ff_act,
        ]
    }

    fn new(b: &B, t: &EnformerTrunk, batch: usize, n: usize) -> Result<Self> {
        let [ln1, mean1, rstd1, q, q_content, q_pos, k, v, rel_k, attn, lse, ln2, mean2, rstd2, ff_pre, ff_act] =
            Self::shapes(t, batch, n).map(|(role, numel)| Tensor::new(b, role, numel));
        Ok(AttnActs {
            ln1: ln1?,
            mean1: mean1?,
            rstd1: rstd1?,
            q: q?,
            q_content: q_content?,
            q_pos: q_pos?,
            k: k?,
            v: v?,
            rel_k: rel_k?,
            attn: attn?,
            lse: lse?,
            ln2: ln2?,
            mean2: mean2?,
            rstd2: rstd2?,
            ff_pre: ff_pre?,
            ff_act: ff_act?,
        })
    }

    /// Resizes every buffer for `batch` sequences of `n` positions (growing only when it must).
    fn fit(&mut self, b: &B, t: &EnformerTrunk, batch: usize, n: usize) -> Result<()> {
        for (tensor, (role, numel)) in self.fields_mut().into_iter().zip(Self::shapes(t, batch, n))
        {
            tensor.ensure(b, role, numel)?;
        }
        Ok(())
    }
}

impl<B: Backend> EnformerActivations<B> {
    /// The embeddings `[B, T, 2·dim]` of the latest forward.
    pub fn embeddings(&self) -> Result<View<'_, B>> {
        self.streams
            .get(self.trace.emb)
            .filter(|_| self.out_len > 0)
            .map(|t| t.view())
            .ok_or_else(|| Error::invalid("enformer", "no forward has run"))
    }

    /// Output head `name` (`[B, T, width]`, softplus), when the trunk has it.
    pub fn head(&self, name: &str) -> Option<View<'_, B>> {
        self.heads.get(name).map(|t| t.view())
    }

    /// Stream `i` of this forward: its own tensor when keeping activations, else one of three. With
    /// checkpoints, a stream inside a block that the backward `recomputes` is one of two shared ones.
    pub(super) fn stream(
        &mut self,
        b: &B,
        i: usize,
        numel: usize,
        recomputed: bool,
    ) -> Result<usize> {
        let slot = match (self.keep, self.checkpoints, recomputed) {
            (false, _, _) => i % 3,
            (true, true, true) => i % 2,
            (true, true, false) => i + 2,
            (true, false, _) => i,
        };
        ensure_at(b, &mut self.streams, slot, Role::Activation, numel)?;
        Ok(slot)
    }

    /// Grows the two shared ConvBlock buffer sets of a checkpointed forward to `numel` values and `c`
    /// channels.
    fn reserve_shared_blocks(&mut self, b: &B, numel: usize, c: usize) -> Result<()> {
        while self.blocks.len() < 2 {
            self.blocks.push(ConvBlockActs::new(b, 0, 0)?);
        }
        for blk in &mut self.blocks[..2] {
            blk.reserve(b, numel, c)?;
        }
        Ok(())
    }

    /// Buffers of ConvBlock `i` (forward order): their own when keeping activations, else shared; with
    /// checkpoints, blocks the backward `recomputes` share two sets (a level's first and residual block).
    fn block(&mut self, b: &B, i: usize, rows: usize, c: usize, recomputed: bool) -> Result<usize> {
        let slot = match (self.keep, self.checkpoints, recomputed) {
            (false, _, _) => 0,
            (true, true, true) => (i + 1) % 2,
            (true, true, false) => i + 2,
            (true, false, _) => i,
        };
        while self.blocks.len() < slot {
            self.blocks.push(ConvBlockActs::new(b, 0, 0)?);
        }
        if slot == self.blocks.len() {
            self.blocks.push(ConvBlockActs::new(b, rows, c)?);
        } else {
            self.blocks[slot].ensure(b, rows, c)?;
        }
        if self.trace.blocks.len() != i {
            return Err(Error::invalid("enformer", "ConvBlocks out of order"));
        }
        self.trace.blocks.push(slot);
        Ok(slot)
    }

    fn pool(&mut self, b: &B, i: usize, numel: usize) -> Result<usize> {
        let slot = if self.keep && !self.checkpoints { i } else { 0 };
        ensure_at(b, &mut self.pool_logits, slot, Role::Exact, numel)?;
        Ok(slot)
    }

    /// Sizes the buffers of a level for its shape (`c` channels out, `first_c_in` into the first ConvBlock
    /// of a tower level; the stem has none): shared ones were last
    /// sized by another level when the backward recomputes this one. Allocates nothing once planned.
    fn size_level(
        &mut self,
        b: &B,
        lv: &LevelTrace,
        batch: usize,
        first_c_in: Option<usize>,
        c: usize,
    ) -> Result<()> {
        let rows = batch * lv.len;
        self.streams[lv.y].ensure(b, Role::Activation, rows * c)?;
        self.streams[lv.z].ensure(b, Role::Activation, rows * c)?;
        self.streams[lv.pooled].ensure(b, Role::Activation, batch * lv.len.div_ceil(2) * c)?;
        if let Some(c_in) = first_c_in {
            self.blocks[lv.first_block].ensure(b, rows, c_in)?;
        }
        self.blocks[lv.residual_block].ensure(b, rows, c)?;
        self.pool_logits[lv.pool].ensure(b, Role::Exact, rows * c)
    }

    /// The saved-activations slot of transformer layer `l`.
    fn attention_slot(&self, l: usize) -> usize {
        if self.keep && !self.checkpoints {
            l
        } else {
            0
        }
    }

    /// With checkpoints, keeps ConvBlock `i`'s batch statistics (its buffers are shared).
    fn save_stats(&mut self, b: &B, i: usize) -> Result<()> {
        if !self.checkpoints {
            return Ok(());
        }
        let blk = &self.blocks[self.trace.blocks[i]];
        let c = blk.mean.numel();
        if i == self.saved_stats.len() {
            self.saved_stats.push((
                Tensor::new(b, Role::Exact, c)?,
                Tensor::new(b, Role::Exact, c)?,
                0,
            ));
        }
        let (mean, var, rows) = &mut self.saved_stats[i];
        *rows = blk.rows;
        mean.ensure(b, Role::Exact, c)?;
        var.ensure(b, Role::Exact, c)?;
        b.copy(mean.view_mut(), blk.mean.view())?;
        b.copy(var.view_mut(), blk.var.view())
    }

    /// ConvBlock `i`'s batch statistics (mean, variance) and rows, as its forward made them.
    fn block_stats(&self, i: usize) -> (View<'_, B>, View<'_, B>, usize) {
        let blk = &self.blocks[self.trace.blocks[i]];
        match self.saved_stats.get(i) {
            Some((mean, var, rows)) if self.checkpoints => (mean.view(), var.view(), *rows),
            _ => (blk.mean.view(), blk.var.view(), blk.rows),
        }
    }
}

/// `out = conv(GELUσ(BN(x)))`, saving BN's statistics and both intermediates in `blk`.
pub(super) fn conv_block<B: Backend>(
    b: &B,
    p: &[View<'_, B>],
    cb: &ConvBlock,
    blk: &mut ConvBlockActs<B>,
    x: View<'_, B>,
    out: ViewMut<'_, B>,
    batch: usize,
    len: usize,
    mode: BatchNormMode,
) -> Result<()> {
    let stats = match mode {
        BatchNormMode::Eval => BatchNormStats::Running {
            mean: p[cb.bn[2]],
            var: p[cb.bn[3]],
        },
        BatchNormMode::Train => BatchNormStats::Batch,
    };
    b.batchnorm(
        blk.normed.view_mut(),
        blk.mean.view_mut(),
        blk.var.view_mut(),
        x,
        p[cb.bn[0]],
        p[cb.bn[1]],
        stats,
        BN_EPS,
    )?;
    b.activation(blk.gelu.view_mut(), blk.normed.view(), Act::GeluSigmoid)?;
    b.conv1d(
        out,
        blk.gelu.view(),
        p[cb.conv_w],
        Some(p[cb.conv_b]),
        &cb.dims(batch, len),
    )
}

impl ConvBlock {
    pub(super) fn dims(&self, batch: usize, len: usize) -> Conv1dDims {
        Conv1dDims {
            batch,
            len,
            c_in: self.c_in,
            c_out: self.c_out,
            width: self.width,
        }
    }
}

impl EnformerTrunk {
    /// Of one sample's ConvBlocks (the stem's at `seq_len`, each tower level's at twice its output
    /// length, the final one at the transformer's length): the most input values (positions × input
    /// channels) and the most input channels.
    pub(super) fn conv_block_extent(
        &self,
        transformer_len: usize,
        seq_len: usize,
    ) -> (usize, usize) {
        let fin = &self.final_block;
        let (mut widest, mut channels) = (fin.c_in * transformer_len, fin.c_in);
        let mut len = transformer_len;
        for tb in self.tower.iter().rev() {
            len *= 2;
            let c = tb.conv.c_in.max(tb.residual.c_in);
            widest = widest.max(len * c);
            channels = channels.max(c);
        }
        let stem = self.stem_residual.c_in;
        (widest.max(seq_len * stem), channels.max(stem))
    }

    /// Checks the input geometry: `(transformer length n, output bins T)`.
    /// The output bins of a `seq_len` bp input, or the error the forward would give.
    pub fn output_bins(&self, seq_len: usize) -> Result<usize> {
        Ok(self.geometry(1, seq_len)?.1)
    }

    pub(super) fn geometry(&self, batch: usize, seq_len: usize) -> Result<(usize, usize)> {
        let ds = self.downsample();
        if batch == 0 {
            return Err(Error::invalid("enformer", "empty batch"));
        }
        if !seq_len.is_multiple_of(ds) || seq_len / ds < self.cfg.target_length {
            return Err(Error::invalid(
                "DNA length",
                format!(
                    "{seq_len} bp: Enformer needs a multiple of {ds} giving at least {} bins ({} bp)",
                    self.cfg.target_length,
                    ds * self.cfg.target_length
                ),
            ));
        }
        let n = seq_len / ds;
        Ok((n, crop_range(n, self.cfg.target_length).1))
    }

    /// Forward on one-hot DNA `[batch, seq_len, 4]` with parameters `p` (one view per layout entry).
    /// With `keep`, saves what [`Self::backward`] needs. `mode` picks the batchnorm statistics.
    pub fn forward<B: Backend>(
        &self,
        b: &B,
        p: &[View<'_, B>],
        one_hot: &[f32],
        batch: usize,
        seq_len: usize,
        acts: &mut EnformerActivations<B>,
        keep: bool,
        mode: BatchNormMode,
    ) -> Result<()> {
        if p.len() != self.layout.entries().len() {
            return Err(Error::shape(
                "enformer",
                format!(
                    "{} parameter views for a layout of {}",
                    p.len(),
                    self.layout.entries().len()
                ),
            ));
        }
        if Some(one_hot.len()) != batch.checked_mul(seq_len).and_then(|n| n.checked_mul(4)) {
            return Err(Error::shape(
                "enformer",
                format!(
                    "{} values for one-hot [{batch}, {seq_len}, 4]",
                    one_hot.len()
                ),
            ));
        }
        let (n, out_len) = self.geometry(batch, seq_len)?;
        let checkpoints = keep && self.recompute == Recompute::Blocks;
        // Another batch size keeps the buffers (they grow to the largest, and a planned arena gives
        // them its places once); another window or saving plan starts afresh.
        let reshaped =
            acts.seq_len != seq_len || acts.keep != keep || acts.checkpoints != checkpoints;
        if reshaped {
            // Buffers of the old plan go.
            *acts = EnformerActivations::default();
        }
        if checkpoints {
            // The two ConvBlock buffer sets that recomputed blocks share, at the largest block's sizes:
            // made once per step, not grown level by level.
            let (widest, channels) = self.conv_block_extent(n, seq_len);
            acts.reserve_shared_blocks(b, batch.saturating_mul(widest), channels)?;
        }
        acts.batch = batch;
        acts.seq_len = seq_len;
        acts.keep = keep;
        acts.checkpoints = checkpoints;
        acts.mode = mode;
        acts.transformer_len = n;
        acts.out_len = out_len;
        acts.trace = Trace::default();
        ensure(b, &mut acts.input, Role::Activation, one_hot.len())?;
        b.write_f32(acts.input.as_mut().expect("ensured").view_mut(), one_hot)?;
        let (pooled, next, block) = if tiles_apply(keep, mode) {
            // Inference on running statistics: the convolutional levels tile by tile.
            plan_temp(b, acts, 0)?;
            let (pooled, next) = self.tiled_levels(b, p, acts, batch, seq_len)?;
            (pooled, next, 0)
        } else {
            self.whole_levels(b, p, acts, batch, seq_len, mode)?
        };
        self.transformer_and_output(b, p, acts, pooled, next, block, batch, n, out_len)
    }

    /// The stem and tower over whole sequences, keeping what the backward reads when `acts.keep`; returns
    /// the last pooled stream, the next free stream and the next ConvBlock.
    fn whole_levels<B: Backend>(
        &self,
        b: &B,
        p: &[View<'_, B>],
        acts: &mut EnformerActivations<B>,
        batch: usize,
        seq_len: usize,
        mode: BatchNormMode,
    ) -> Result<(usize, usize, usize)> {
        let half = self.cfg.dim / 2;
        ensure(b, &mut acts.temp, Role::Activation, batch * seq_len * half)?;
        // Stem: x0 = conv15(one-hot); r = x0 + ConvBlock₁(x0); pooled = AttentionPool(r).
        let mut len = seq_len;
        let stem = LevelTrace {
            x_in: 0,
            y: acts.stream(b, 0, batch * len * half, true)?,
            z: acts.stream(b, 1, batch * len * half, true)?,
            pooled: acts.stream(b, 2, batch * len.div_ceil(2) * half, false)?,
            first_block: 0,
            residual_block: acts.block(b, 0, batch * len, half, true)?,
            pool: acts.pool(b, 0, batch * len * half)?,
            len,
        };
        acts.trace.stem = stem;
        self.stem_forward(b, p, acts, batch, mode)?;
        acts.save_stats(b, 0)?;
        let (mut next, mut block, mut pooled) = (3, 1, stem.pooled);
        len /= 2;

        // Tower: y = ConvBlock₅(x); z = y + ConvBlock₁(y); pooled = AttentionPool(z).
        for (t, tb) in self.tower.iter().enumerate() {
            let c = tb.channels;
            let level = LevelTrace {
                x_in: pooled,
                y: acts.stream(b, next, batch * len * c, true)?,
                z: acts.stream(b, next + 1, batch * len * c, true)?,
                pooled: acts.stream(b, next + 2, batch * len.div_ceil(2) * c, false)?,
                first_block: acts.block(b, block, batch * len, tb.conv.c_in, true)?,
                residual_block: acts.block(b, block + 1, batch * len, c, true)?,
                pool: acts.pool(b, t + 1, batch * len * c)?,
                len,
            };
            acts.trace.tower.push(level);
            self.tower_forward(b, p, acts, t, batch, mode)?;
            acts.save_stats(b, block)?;
            acts.save_stats(b, block + 1)?;
            (next, block, pooled) = (next + 3, block + 2, level.pooled);
            len /= 2;
        }
        Ok((pooled, next, block))
    }

    /// The stem over the streams and buffers of `acts.trace.stem` (the forward, or its recompute in the
    /// backward).
    pub(super) fn stem_forward<B: Backend>(
        &self,
        b: &B,
        p: &[View<'_, B>],
        acts: &mut EnformerActivations<B>,
        batch: usize,
        mode: BatchNormMode,
    ) -> Result<()> {
        let (half, s) = (self.cfg.dim / 2, acts.trace.stem);
        acts.size_level(b, &s, batch, None, half)?;
        b.conv1d(
            acts.streams[s.y].view_mut(),
            acts.input.as_ref().expect("ensured").view(),
            p[self.stem_conv.0],
            Some(p[self.stem_conv.1]),
            &Conv1dDims {
                batch,
                len: s.len,
                c_in: 4,
                c_out: half,
                width: 15,
            },
        )?;
        let rows_c = batch * s.len * half;
        self.residual_block(
            b,
            p,
            acts,
            &self.stem_residual,
            s.residual_block,
            s.y,
            batch,
            s.len,
            mode,
        )?;
        self.add_temp(b, acts, s.z, s.y, rows_c)?;
        self.pool(
            b,
            p,
            acts,
            s.pool,
            self.stem_pool,
            s.z,
            s.pooled,
            batch,
            s.len,
            half,
        )
    }

    /// Tower level `t` over the streams and buffers of `acts.trace.tower[t]`.
    pub(super) fn tower_forward<B: Backend>(
        &self,
        b: &B,
        p: &[View<'_, B>],
        acts: &mut EnformerActivations<B>,
        t: usize,
        batch: usize,
        mode: BatchNormMode,
    ) -> Result<()> {
        let (tb, lv) = (&self.tower[t], acts.trace.tower[t]);
        let c = tb.channels;
        acts.size_level(b, &lv, batch, Some(tb.conv.c_in), c)?;
        {
            let [xs, ys] = acts
                .streams
                .get_disjoint_mut([lv.x_in, lv.y])
                .map_err(|_| Error::invalid("enformer", "stream plan overlaps"))?;
            conv_block(
                b,
                p,
                &tb.conv,
                &mut acts.blocks[lv.first_block],
                xs.view(),
                ys.view_mut(),
                batch,
                lv.len,
                mode,
            )?;
        }
        self.residual_block(
            b,
            p,
            acts,
            &tb.residual,
            lv.residual_block,
            lv.y,
            batch,
            lv.len,
            mode,
        )?;
        self.add_temp(b, acts, lv.z, lv.y, batch * lv.len * c)?;
        self.pool(
            b, p, acts, lv.pool, tb.pool, lv.z, lv.pooled, batch, lv.len, c,
        )
    }

    /// The transformer on the last pooled stream, the crop, the final pointwise block and the heads.
    #[allow(clippy::too_many_arguments)]
    fn transformer_and_output<B: Backend>(
        &self,
        b: &B,
        p: &[View<'_, B>],
        acts: &mut EnformerActivations<B>,
        pooled: usize,
        mut next: usize,
        block: usize,
        batch: usize,
        n: usize,
        out_len: usize,
    ) -> Result<()> {
        let dim = self.cfg.dim;
        let mode = acts.mode;
        self.prepare_attention(b, acts, batch, n)?;
        let mut x = pooled;
        for (l, layer) in self.layers.iter().enumerate() {
            let mid = acts.stream(b, next, batch * n * dim, true)?;
            let out = acts.stream(b, next + 1, batch * n * dim, false)?;
            next += 2;
            let slot = acts.attention_slot(l);
            if slot == acts.layers.len() {
                acts.layers.push(AttnActs::new(b, self, batch, n)?);
            } else {
                acts.layers[slot].fit(b, self, batch, n)?;
            }
            self.attention_layer(b, p, acts, layer, slot, x, mid, out, batch, n)?;
            acts.trace.layers.push((x, mid, out, slot));
            x = out;
        }

        // Crop to the target bins, final pointwise block, GELU.
        let (start, _) = crop_range(n, self.cfg.target_length);
        let cropped = acts.stream(b, next, batch * out_len * dim, false)?;
        next += 1;
        {
            let [src, dst] = acts
                .streams
                .get_disjoint_mut([x, cropped])
                .map_err(|_| Error::invalid("enformer", "stream plan overlaps"))?;
            let (src, mut dst) = (src.view(), dst.view_mut());
            for bb in 0..batch {
                b.copy(
                    dst.rb().slice_mut(bb * out_len * dim, out_len * dim)?,
                    src.slice((bb * n + start) * dim, out_len * dim)?,
                )?;
            }
        }
        let pre = acts.stream(b, next, batch * out_len * 2 * dim, false)?;
        let emb = acts.stream(b, next + 1, batch * out_len * 2 * dim, false)?;
        let bi = acts.block(b, block, batch * out_len, dim, false)?;
        {
            let [cs, ps] = acts
                .streams
                .get_disjoint_mut([cropped, pre])
                .map_err(|_| Error::invalid("enformer", "stream plan overlaps"))?;
            conv_block(
                b,
                p,
                &self.final_block,
                &mut acts.blocks[bi],
                cs.view(),
                ps.view_mut(),
                batch,
                out_len,
                mode,
            )?;
        }
        {
            let [ps, es] = acts
                .streams
                .get_disjoint_mut([pre, emb])
                .map_err(|_| Error::invalid("enformer", "stream plan overlaps"))?;
            b.activation(es.view_mut(), ps.view(), Act::GeluSigmoid)?;
        }
        acts.trace.cropped = cropped;
        acts.trace.pre = pre;
        acts.trace.emb = emb;

        // Heads: softplus(emb·Wᵀ + b).
        for (name, w, bias, width) in &self.heads {
            let rows = batch * out_len;
            let temp = acts.temp.as_mut().expect("ensured");
            temp.ensure(b, Role::Activation, rows * width)?;
            b.linear(
                temp.view_mut(),
                acts.streams[emb].view(),
                p[*w],
                Some(p[*bias]),
                LinearDims {
                    rows,
                    d_in: 2 * dim,
                    d_out: *width,
                },
            )?;
            let mut slot = acts.heads.remove(name);
            ensure(b, &mut slot, Role::Activation, rows * width)?;
            let head = slot.expect("ensured");
            let mut head = head;
            b.activation(
                head.view_mut(),
                acts.temp.as_ref().expect("ensured").view(),
                Act::Softplus,
            )?;
            acts.heads.insert(name.clone(), head);
        }
        Ok(())
    }

    /// `temp = ConvBlock(stream x)` with block slot `bi`.
    fn residual_block<B: Backend>(
        &self,
        b: &B,
        p: &[View<'_, B>],
        acts: &mut EnformerActivations<B>,
        cb: &ConvBlock,
        bi: usize,
        x: usize,
        batch: usize,
        len: usize,
        mode: BatchNormMode,
    ) -> Result<()> {
        let temp = acts.temp.as_mut().expect("planned");
        temp.ensure(b, Role::Activation, batch * len * cb.c_out)?;
        conv_block(
            b,
            p,
            cb,
            &mut acts.blocks[bi],
            acts.streams[x].view(),
            temp.view_mut(),
            batch,
            len,
            mode,
        )
    }

    /// `stream out = stream x + temp`.
    fn add_temp<B: Backend>(
        &self,
        b: &B,
        acts: &mut EnformerActivations<B>,
        out: usize,
        x: usize,
        numel: usize,
    ) -> Result<()> {
        let temp = acts.temp.as_ref().expect("planned");
        let [o, xs] = acts
            .streams
            .get_disjoint_mut([out, x])
            .map_err(|_| Error::invalid("enformer", "stream plan overlaps"))?;
        if temp.numel() != numel {
            return Err(Error::shape("enformer", "residual sizes differ"));
        }
        b.add(o.view_mut(), xs.view(), temp.view())
    }

    /// `stream out = AttentionPool(stream x)`, logits in pool slot `i`.
    fn pool<B: Backend>(
        &self,
        b: &B,
        p: &[View<'_, B>],
        acts: &mut EnformerActivations<B>,
        i: usize,
        w: usize,
        x: usize,
        out: usize,
        batch: usize,
        len: usize,
        channels: usize,
    ) -> Result<()> {
        let pi = acts.pool(b, i, batch * len * channels)?;
        let [xs, os] = acts
            .streams
            .get_disjoint_mut([x, out])
            .map_err(|_| Error::invalid("enformer", "stream plan overlaps"))?;
        b.attention_pool(
            os.view_mut(),
            acts.pool_logits[pi].view_mut(),
            xs.view(),
            p[w],
            &PoolDims {
                batch,
                len,
                channels,
            },
        )
    }

    /// The positional features for length `n` (uploaded when they change) and the query scale.
    fn prepare_attention<B: Backend>(
        &self,
        b: &B,
        acts: &mut EnformerActivations<B>,
        batch: usize,
        n: usize,
    ) -> Result<()> {
        let table = self.positional_table(n)?;
        let fresh = acts
            .positions_src
            .as_ref()
            .is_some_and(|old| Arc::ptr_eq(old, &table) || **old == *table);
        if !fresh {
            ensure(b, &mut acts.positions, Role::Activation, table.len())?;
            b.write_f32(acts.positions.as_mut().expect("ensured").view_mut(), &table)?;
            acts.positions_src = Some(table);
        }
        let rows = batch * n;
        ensure(
            b,
            &mut acts.rel_bias,
            Role::Exact,
            batch * self.cfg.heads * n * n,
        )?;
        let scale = (self.cfg.attn_dim_key as f32).powf(-0.5);
        if acts.q_scale.as_ref().is_none_or(|t| t.numel() != rows) {
            ensure(b, &mut acts.q_scale, Role::Exact, rows)?;
            let q_scale = acts.q_scale.as_mut().expect("ensured");
            b.write_f32(q_scale.view_mut(), &vec![scale; rows])?;
        }
        Ok(())
    }

    /// One transformer layer: `mid = x + MHA_rel(LN(x))`, `out = mid + FFN(LN(mid))`.
    pub(super) fn attention_layer<B: Backend>(
        &self,
        b: &B,
        p: &[View<'_, B>],
        acts: &mut EnformerActivations<B>,
        l: &AttnLayer,
        slot: usize,
        x: usize,
        mid: usize,
        out: usize,
        batch: usize,
        n: usize,
    ) -> Result<()> {
        let (dim, heads, dk) = (self.cfg.dim, self.cfg.heads, self.cfg.attn_dim_key);
        let (rows, hk, rel) = (batch * n, heads * dk, dim / heads);
        let lin = |d_in: usize, d_out: usize| LinearDims { rows, d_in, d_out };
        let a = &mut acts.layers[slot];
        let positions = acts.positions.as_ref().expect("prepared").view();
        let q_scale = acts.q_scale.as_ref().expect("prepared").view();
        let bias = acts.rel_bias.as_mut().expect("prepared");
        let temp = acts.temp.as_mut().expect("planned");
        let [xs, ms, os] = acts
            .streams
            .get_disjoint_mut([x, mid, out])
            .map_err(|_| Error::invalid("enformer", "stream plan overlaps"))?;
        let x_in = xs.view();
        b.layernorm(
            a.ln1.view_mut(),
            a.mean1.view_mut(),
            a.rstd1.view_mut(),
            x_in,
            p[l.ln1.0],
            p[l.ln1.1],
            LN_EPS,
        )?;
        b.linear(a.q.view_mut(), a.ln1.view(), p[l.q], None, lin(dim, hk))?;
        b.scale_rows(a.q.view_mut(), q_scale)?;
        b.copy(a.q_content.view_mut(), a.q.view())?;
        b.add_row_bias(a.q_content.view_mut(), p[l.content_bias])?;
        b.copy(a.q_pos.view_mut(), a.q.view())?;
        b.add_row_bias(a.q_pos.view_mut(), p[l.pos_bias])?;
        b.linear(a.k.view_mut(), a.ln1.view(), p[l.k], None, lin(dim, hk))?;
        b.linear(a.v.view_mut(), a.ln1.view(), p[l.v], None, lin(dim, dim))?;
        b.linear(
            a.rel_k.view_mut(),
            positions,
            p[l.rel_k],
            None,
            LinearDims {
                rows: 2 * n - 1,
                d_in: rel,
                d_out: hk,
            },
        )?;
        b.relative_logits(
            bias.view_mut(),
            a.q_pos.view(),
            a.rel_k.view(),
            batch,
            heads,
            n,
        )?;
        let dims = self.attention_dims(batch, n);
        b.attention(
            a.attn.view_mut(),
            a.lse.view_mut(),
            a.q_content.view(),
            a.k.view(),
            a.v.view(),
            None,
            Some((bias.view(), true)),
            &dims,
        )?;
        temp.ensure(b, Role::Activation, rows * dim)?;
        b.linear(
            temp.view_mut(),
            a.attn.view(),
            p[l.out.0],
            Some(p[l.out.1]),
            lin(dim, dim),
        )?;
        b.add(ms.view_mut(), x_in, temp.view())?;
        b.layernorm(
            a.ln2.view_mut(),
            a.mean2.view_mut(),
            a.rstd2.view_mut(),
            ms.view(),
            p[l.ln2.0],
            p[l.ln2.1],
            LN_EPS,
        )?;
        b.linear_act(
            a.ff_pre.view_mut(),
            a.ff_act.view_mut(),
            a.ln2.view(),
            p[l.ff1.0],
            p[l.ff1.1],
            Act::Relu,
            lin(dim, 2 * dim),
            true,
        )?;
        b.linear(
            temp.view_mut(),
            a.ff_act.view(),
            p[l.ff2.0],
            Some(p[l.ff2.1]),
            lin(2 * dim, dim),
        )?;
        b.add(os.view_mut(), ms.view(), temp.view())
    }

    /// Recomputes the relative-position logits of the layer saved in `slot` into the shared buffer (the
    /// backward's copy of what its forward made).
    pub(super) fn relative_bias<B: Backend>(
        &self,
        b: &B,
        acts: &mut EnformerActivations<B>,
        slot: usize,
        batch: usize,
        n: usize,
    ) -> Result<()> {
        let a = &acts.layers[slot];
        let bias = acts
            .rel_bias
            .as_mut()
            .ok_or_else(|| Error::invalid("enformer backward", "no forward has run"))?;
        b.relative_logits(
            bias.view_mut(),
            a.q_pos.view(),
            a.rel_k.view(),
            batch,
            self.cfg.heads,
            n,
        )
    }

    pub(super) fn attention_dims(&self, batch: usize, n: usize) -> AttentionDims {
        AttentionDims {
            batch,
            heads: self.cfg.heads,
            q_len: n,
            kv_len: n,
            head_dim: self.cfg.attn_dim_key,
            v_head_dim: self.cfg.dim / self.cfg.heads,
            scale: 1.0,
        }
    }

    /// After a training-mode forward (and its optimiser step): folds each batchnorm's batch statistics
    /// into its running ones. `running` holds, per ConvBlock in forward order, mutable views of the running
    /// mean and variance (see [`Self::running_stat_entries`]).
    pub fn update_running_stats<B: Backend>(
        &self,
        b: &B,
        acts: &EnformerActivations<B>,
        running: &mut [(ViewMut<'_, B>, ViewMut<'_, B>)],
    ) -> Result<()> {
        if acts.mode != BatchNormMode::Train || !acts.keep {
            return Err(Error::invalid(
                "batchnorm running statistics",
                "they are updated after a training-mode forward that kept its activations",
            ));
        }
        if running.len() != acts.trace.blocks.len() {
            return Err(Error::shape(
                "batchnorm running statistics",
                "one (mean, var) pair per ConvBlock",
            ));
        }
        for (i, (rm, rv)) in running.iter_mut().enumerate() {
            let (mean, var, rows) = acts.block_stats(i);
            b.batchnorm_running_update(rm.rb(), rv.rb(), mean, var, rows, super::BN_MOMENTUM)?;
        }
        Ok(())
    }
}
