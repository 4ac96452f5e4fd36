//! Bounded-memory inference for the Enformer's convolutional levels (the stem and the tower).
//!
//! With the batchnorms on their running statistics every operation of a level is local in position: the
//! convolution reads `width/2` neighbours on each side, batchnorm, GELU and the residual add are pointwise,
//! and attention pooling reads pairs of positions. So a level is computed in tiles of positions: each tile
//! reads its input with a halo of `width/2` positions, runs the convolution (block), the residual block and
//! the add on tile-sized buffers, and writes its pooled rows straight into the level's output. Only the
//! pooled output of each level is ever whole, so the peak is the stem's pooled output plus the first tower
//! level's (about 0.5 GB at 196,608 bp) instead of several tensors of the stem's full size (4 GB).
//!
//! A tile's convolution sees its own haloed span as the whole sequence; its zero padding then only matters
//! at the true ends of the sequence, where it is the padding the whole-sequence convolution uses. Interior
//! outputs read only real neighbours, so they equal the whole-sequence ones.

use super::forward::{conv_block, ensure, BatchNormMode, ConvBlockActs, EnformerActivations};
use super::{ConvBlock, EnformerTrunk};
use crate::backend::{Backend, Conv1dDims, PoolDims, Role, Tensor, View};
use crate::{Error, Result};

/// Elements per tile buffer, about 8 MiB of f32: large enough for efficient GEMMs, small enough to stay
/// out of the peak.
pub(super) const TILE_ELEMENTS: usize = 1 << 21;

/// The tile-sized buffers, shared by every level (planned on the first call of a shape, reused after).
pub(super) struct TileActs<B: Backend> {
    /// The level's first convolution over the haloed span.
    y: Tensor<B>,
    first: ConvBlockActs<B>,
    residual: ConvBlockActs<B>,
    temp: Tensor<B>,
    z: Tensor<B>,
    logits: Tensor<B>,
}

impl<B: Backend> TileActs<B> {
    fn new(b: &B) -> Result<Self> {
        Ok(TileActs {
            y: Tensor::new(b, Role::Activation, 0)?,
            first: ConvBlockActs::new(b, 0, 0)?,
            residual: ConvBlockActs::new(b, 0, 0)?,
            temp: Tensor::new(b, Role::Activation, 0)?,
            z: Tensor::new(b, Role::Activation, 0)?,
            logits: Tensor::new(b, Role::Exact, 0)?,
        })
    }
}

/// One level: its first convolution, residual block and pool.
struct Level<'a> {
    /// `None`: the stem's plain 15-wide convolution of the one-hot input.
    first: Option<&'a ConvBlock>,
    residual: &'a ConvBlock,
    pool: usize,
    c_in: usize,
    channels: usize,
    halo: usize,
}

/// Positions per tile for a level of `channels` (even, so pooling pairs never straddle two tiles).
fn tile_positions(elements: usize, widest: usize, halo: usize, len: usize) -> usize {
    let rows = (elements / widest.max(1)).saturating_sub(2 * halo).max(2) & !1;
    rows.min(len)
}

impl EnformerTrunk {
    /// The stem and tower on one-hot `acts.input`, tile by tile; returns the stream holding the last
    /// level's pooled output and the next free stream number. Only for inference with running statistics.
    pub(super) fn tiled_levels<B: Backend>(
        &self,
        b: &B,
        p: &[View<'_, B>],
        acts: &mut EnformerActivations<B>,
        batch: usize,
        seq_len: usize,
    ) -> Result<(usize, usize)> {
        let half = self.cfg.dim / 2;
        let mut levels = vec![Level {
            first: None,
            residual: &self.stem_residual,
            pool: self.stem_pool,
            c_in: 4,
            channels: half,
            halo: 7,
        }];
        levels.extend(self.tower.iter().map(|tb| Level {
            first: Some(&tb.conv),
            residual: &tb.residual,
            pool: tb.pool,
            c_in: tb.conv.c_in,
            channels: tb.channels,
            halo: tb.conv.width / 2,
        }));
        if acts.tiles.is_none() {
            acts.tiles = Some(Box::new(TileActs::new(b)?));
        }
        // Every tile buffer at its largest over the levels first: made once per forward, never grown
        // from one level to the next. Sizes: y, the first block (values, channels), the residual
        // block (values, channels), and temp, z and logits.
        let mut most = [0usize; 6];
        let mut len = seq_len;
        for level in &levels {
            let c = level.channels;
            let tile = tile_positions(self.tile_elements, level.c_in.max(c), level.halo, len);
            let span_max = (tile + 2 * level.halo).min(len);
            let first = if level.first.is_some() {
                (span_max * level.c_in, level.c_in)
            } else {
                (0, 0)
            };
            let sizes = [span_max * c, first.0, first.1, tile * c, c, tile * c];
            for (m, s) in most.iter_mut().zip(sizes) {
                *m = (*m).max(s);
            }
            len /= 2;
        }
        let t = acts.tiles.as_mut().expect("made above");
        let [y, first_values, first_channels, tile_values, channels, tile_c] = most;
        for (tensor, role, n) in [
            (&mut t.y, Role::Activation, y),
            (&mut t.temp, Role::Activation, tile_c),
            (&mut t.z, Role::Activation, tile_c),
            (&mut t.logits, Role::Exact, tile_c),
        ] {
            if tensor.numel() < n {
                tensor.ensure(b, role, n)?;
            }
        }
        t.first.reserve(b, first_values, first_channels)?;
        t.residual.reserve(b, tile_values, channels)?;
        let mut len = seq_len;
        let mut input: Option<usize> = None;
        for (next, level) in levels.iter().enumerate() {
            if !len.is_multiple_of(2) {
                return Err(Error::invalid(
                    "enformer",
                    format!("level {next} has an odd length {len}"),
                ));
            }
            let c = level.channels;
            let out = acts.stream(b, next, batch * (len / 2) * c, false)?;
            let tile = tile_positions(self.tile_elements, level.c_in.max(c), level.halo, len);
            self.level_tiles(b, p, acts, level, input, out, batch, len, tile)?;
            input = Some(out);
            len /= 2;
        }
        Ok((input.expect("the stem is a level"), levels.len()))
    }

    /// Every tile of one level, from `input` (a stream, or the one-hot input) into stream `out`.
    #[allow(clippy::too_many_arguments)]
    fn level_tiles<B: Backend>(
        &self,
        b: &B,
        p: &[View<'_, B>],
        acts: &mut EnformerActivations<B>,
        level: &Level<'_>,
        input: Option<usize>,
        out: usize,
        batch: usize,
        len: usize,
        tile: usize,
    ) -> Result<()> {
        let (c_in, c, halo) = (level.c_in, level.channels, level.halo);
        let span_max = (tile + 2 * halo).min(len);
        let t = acts.tiles.as_mut().expect("planned");
        // The largest sizes first, so a warm call of the same shape allocates nothing.
        t.y.ensure(b, Role::Activation, span_max * c)?;
        if level.first.is_some() {
            t.first.ensure(b, span_max, c_in)?;
        }
        t.residual.ensure(b, tile, c)?;
        t.temp.ensure(b, Role::Activation, tile * c)?;
        t.z.ensure(b, Role::Activation, tile * c)?;
        t.logits.ensure(b, Role::Exact, tile * c)?;
        let EnformerActivations {
            input: one_hot,
            streams,
            tiles,
            ..
        } = acts;
        let t = tiles.as_mut().expect("planned");
        let (src, dst): (View<'_, B>, _) = match input {
            None => (
                one_hot.as_ref().expect("uploaded").view(),
                &mut streams[out],
            ),
            Some(i) => {
                let [s, d] = streams
                    .get_disjoint_mut([i, out])
                    .map_err(|_| Error::invalid("enformer", "stream plan overlaps"))?;
                (s.view(), d)
            }
        };
        let mut dst = dst.view_mut();
        for bb in 0..batch {
            let mut p0 = 0;
            while p0 < len {
                let p1 = (p0 + tile).min(len);
                let (a, e) = (p0.saturating_sub(halo), (p1 + halo).min(len));
                let (span, rows) = (e - a, p1 - p0);
                let x = src.slice((bb * len + a) * c_in, span * c_in)?;
                t.y.ensure(b, Role::Activation, span * c)?;
                match level.first {
                    None => b.conv1d(
                        t.y.view_mut(),
                        x,
                        p[self.stem_conv.0],
                        Some(p[self.stem_conv.1]),
                        &Conv1dDims {
                            batch: 1,
                            len: span,
                            c_in,
                            c_out: c,
                            width: 15,
                        },
                    )?,
                    Some(cb) => {
                        t.first.ensure(b, span, c_in)?;
                        conv_block(
                            b,
                            p,
                            cb,
                            &mut t.first,
                            x,
                            t.y.view_mut(),
                            1,
                            span,
                            BatchNormMode::Eval,
                        )?;
                    }
                }
                for buf in [&mut t.temp, &mut t.z] {
                    buf.ensure(b, Role::Activation, rows * c)?;
                }
                t.residual.ensure(b, rows, c)?;
                t.logits.ensure(b, Role::Exact, rows * c)?;
                let y = t.y.view().slice((p0 - a) * c, rows * c)?;
                conv_block(
                    b,
                    p,
                    level.residual,
                    &mut t.residual,
                    y,
                    t.temp.view_mut(),
                    1,
                    rows,
                    BatchNormMode::Eval,
                )?;
                b.add(t.z.view_mut(), y, t.temp.view())?;
                b.attention_pool(
                    dst.rb()
                        .slice_mut((bb * len / 2 + p0 / 2) * c, rows / 2 * c)?,
                    t.logits.view_mut(),
                    t.z.view(),
                    p[level.pool],
                    &PoolDims {
                        batch: 1,
                        len: rows,
                        channels: c,
                    },
                )?;
                p0 = p1;
            }
        }
        Ok(())
    }
}

/// Whether a forward can run tiled: inference on the running statistics.
pub(super) fn tiles_apply(keep: bool, mode: BatchNormMode) -> bool {
    !keep && mode == BatchNormMode::Eval
}

/// The shared temporary for the tiled path: only the transformer and the heads use it, at their sizes.
pub(super) fn plan_temp<B: Backend>(
    b: &B,
    acts: &mut EnformerActivations<B>,
    numel: usize,
) -> Result<()> {
    ensure(b, &mut acts.temp, Role::Activation, numel)
}
