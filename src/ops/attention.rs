//! Multi-head scaled dot-product attention, self or cross (`q_len ≠ kv_len`), with per-batch key padding and
//! an optional additive score bias (Enformer's relative positions). It follows FlashAttention-2's contract,
//! so the CUDA kernel is checked against it directly:
//! - forward saves only the output and the per-row log-sum-exp (`lse`), never the probabilities;
//! - backward recomputes `P = exp(S − lse)` block by block and uses `D = rowsum(dO ∘ O)`.
//!
//! Layouts (row-major): `q [B, Lq, H, Dk]`, `k [B, Lk, H, Dk]`, `v [B, Lk, H, Dv]`, `out [B, Lq, H, Dv]`,
//! `lse [B, H, Lq]`, `bias [1 or B, H, Lq, Lk]`. Scores are `S = scale·q·kᵀ + bias`; keys at or past
//! `kv_lens[b]` are masked. A query row with no visible key (length 0, or a bias of −∞ on every key) gets
//! a zero output, `lse = −∞`, and no gradient.

use rayon::prelude::*;

use super::matmul::{gemm_raw, View};
use super::simd::dispatch;
use super::softmax::exp_row_in_place;
use crate::error::{check_len, checked_product};
use crate::{Error, Result};

#[cfg(target_arch = "x86_64")]
mod bf16;
#[cfg(target_arch = "x86_64")]
mod dot;

/// Query rows processed together at most; bounds the scratch to `Q_BLOCK × Lk` per task.
const Q_BLOCK: usize = 256;

/// The precision of attention's two matrix products, `Q·Kᵀ` and `P·V`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Products {
    /// f32 operands (the reference).
    F32,
    /// bf16 operands with f32 accumulation (the bf16 backend, as PyTorch's bf16 SDPA computes them): on
    /// AMX tiles where the CPU has them, as `vdpbf16ps` vector code where it has AVX512-BF16 without AMX
    /// (the values split in two bf16 parts either way); elsewhere the f32 products run.
    Bf16,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionDims {
    pub batch: usize,
    pub heads: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub head_dim: usize,
    pub v_head_dim: usize,
    pub scale: f32,
}

impl AttentionDims {
    /// Standard attention: `Dv = Dk`, `scale = Dk^−½`.
    pub fn new(batch: usize, heads: usize, q_len: usize, kv_len: usize, head_dim: usize) -> Self {
        AttentionDims {
            batch,
            heads,
            q_len,
            kv_len,
            head_dim,
            v_head_dim: head_dim,
            scale: (head_dim as f32).powf(-0.5),
        }
    }

    /// Element counts of every operand, or an error when a product overflows (checked before any
    /// indexing or unsafe GEMM relies on them).
    pub fn checked_sizes(&self, op: &'static str) -> Result<AttentionSizes> {
        let (b, h) = (self.batch, self.heads);
        let bias_broadcast = checked_product(op, &[h, self.q_len, self.kv_len])?;
        Ok(AttentionSizes {
            q: checked_product(op, &[b, self.q_len, h, self.head_dim])?,
            k: checked_product(op, &[b, self.kv_len, h, self.head_dim])?,
            v: checked_product(op, &[b, self.kv_len, h, self.v_head_dim])?,
            out: checked_product(op, &[b, self.q_len, h, self.v_head_dim])?,
            lse: checked_product(op, &[b, h, self.q_len])?,
            bias_per_batch: checked_product(op, &[b, bias_broadcast])?,
            bias_broadcast,
        })
    }

    /// f32 elements of scratch that [`attention`] and [`attention_backward`] need with `threads` workers
    /// (`usize::MAX` where that overflows; [`Self::checked_workspace_len`] says so).
    pub fn workspace_len(&self, threads: usize) -> usize {
        self.slot_len()
            .and_then(|s| s.checked_mul(threads.max(1)))
            .unwrap_or(usize::MAX)
    }

    /// [`Self::workspace_len`], or an error when it or an operand's size overflows.
    pub fn checked_workspace_len(&self, op: &'static str, threads: usize) -> Result<usize> {
        self.checked_sizes(op)?;
        self.slot_len()
            .and_then(|s| s.checked_mul(threads.max(1)))
            .ok_or_else(|| Error::invalid(op, format!("the workspace of {self:?} overflows")))
    }

    /// f32 elements of scratch one worker needs, for either product precision.
    fn slot_len(&self) -> Option<usize> {
        let f32_products = (2 * Q_BLOCK).checked_mul(self.kv_len.max(1))?;
        #[cfg(target_arch = "x86_64")]
        let f32_products = f32_products.max(bf16::workspace_len(self)?);
        Some(f32_products)
    }

    fn q_view(&self) -> View {
        View::strided(self.q_len, self.head_dim, self.heads * self.head_dim)
    }
    fn k_view(&self, n: usize) -> View {
        View::strided(n, self.head_dim, self.heads * self.head_dim)
    }
    fn v_view(&self, n: usize) -> View {
        View::strided(n, self.v_head_dim, self.heads * self.v_head_dim)
    }
    fn o_view(&self) -> View {
        View::strided(self.q_len, self.v_head_dim, self.heads * self.v_head_dim)
    }
    /// Element offsets of head `h` of batch `b` in q, k, v and out.
    fn offsets(&self, b: usize, h: usize) -> (usize, usize, usize, usize) {
        let (dk, dv, nh) = (self.head_dim, self.v_head_dim, self.heads);
        (
            (b * self.q_len * nh + h) * dk,
            (b * self.kv_len * nh + h) * dk,
            (b * self.kv_len * nh + h) * dv,
            (b * self.q_len * nh + h) * dv,
        )
    }
}

/// Element counts of attention's operands ([`AttentionDims::checked_sizes`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionSizes {
    pub q: usize,
    pub k: usize,
    pub v: usize,
    pub out: usize,
    pub lse: usize,
    pub bias_per_batch: usize,
    pub bias_broadcast: usize,
}

/// Where one head's rows of q, k and v start and how far apart they are (element offset, row stride).
#[derive(Clone, Copy, Debug)]
pub(crate) struct HeadRowsAt {
    pub(crate) q: (usize, usize),
    pub(crate) k: (usize, usize),
    pub(crate) v: (usize, usize),
}

/// An additive score bias, broadcast over the batch unless `per_batch`.
#[derive(Clone, Copy, Debug)]
pub struct AttentionBias<'a> {
    pub data: &'a [f32],
    pub per_batch: bool,
}

/// Split-half rotary embeddings that the attention applies to `q` and `k` itself, with the rotary op's
/// arithmetic ([`crate::ops::rotary`]; the same bits as rotating them first): query row `i` and key `j` of
/// every sequence turn by the angles of positions `i` and `j`, from `[positions, head_dim/2]` cos and sin
/// tables. Only the bf16 products take it ([`writes_bf16`]), which rotate each head's rows as they round
/// them, so that an inference forward reads `q` and `k` once rather than first writing rotated copies of
/// them in a pass of their own; the other kernels and the backward refuse it.
#[derive(Clone, Copy, Debug)]
pub struct AttentionRope<'a> {
    pub cos: &'a [f32],
    pub sin: &'a [f32],
}

impl<'a> AttentionRope<'a> {
    /// The cos and sin of `position`'s `half` angles.
    fn angles(&self, position: usize, half: usize) -> (&'a [f32], &'a [f32]) {
        let at = position * half;
        (&self.cos[at..at + half], &self.sin[at..at + half])
    }
}

/// Everything both passes read: inputs, masking and bias.
#[derive(Clone, Copy)]
pub struct AttentionInputs<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    /// Visible keys per batch entry (`None`: all `kv_len`).
    pub kv_lens: Option<&'a [usize]>,
    pub bias: Option<AttentionBias<'a>>,
    /// Rotary embeddings of `q` and `k` to apply first (`None`: they are used as they are).
    pub rope: Option<AttentionRope<'a>>,
    /// `q`, `k` and `v` head-major, `[B, H, L, D]` (each head's rows contiguous, as
    /// [`crate::ops::gemm_bf16::GemmOut::F32Heads`] writes them), rather than `[B, L, H, D]`; the output
    /// stays `[B, L, H, Dv]`. Only the bf16 products' forward reads them so: with a head's rows 3 KiB apart
    /// (NT-v2) it ran about 9% slower (more of it came back with huge pages: TLB misses). The other kernels
    /// refuse it.
    pub head_major: bool,
}

impl AttentionInputs<'_> {
    fn check(&self, op: &'static str, d: &AttentionDims) -> Result<()> {
        let s = d.checked_sizes(op)?;
        check_len(op, "q", self.q.len(), s.q)?;
        check_len(op, "k", self.k.len(), s.k)?;
        check_len(op, "v", self.v.len(), s.v)?;
        let b = d.batch;
        if let Some(lens) = self.kv_lens {
            check_len(op, "kv_lens", lens.len(), b)?;
            if let Some((i, l)) = lens.iter().enumerate().find(|(_, &l)| l > d.kv_len) {
                return Err(Error::invalid(
                    "kv_lens",
                    format!("entry {i} is {l}, more than kv_len {}", d.kv_len),
                ));
            }
        }
        if let Some(bias) = self.bias {
            check_len(
                op,
                "bias",
                bias.data.len(),
                if bias.per_batch {
                    s.bias_per_batch
                } else {
                    s.bias_broadcast
                },
            )?;
        }
        if let Some(rope) = self.rope {
            if d.head_dim == 0 || !d.head_dim.is_multiple_of(2) {
                return Err(Error::invalid(
                    op,
                    format!(
                        "rotary embeddings need an even head dim, not {}",
                        d.head_dim
                    ),
                ));
            }
            let positions = d.q_len.max(d.kv_len);
            let need = positions.checked_mul(d.head_dim / 2);
            if rope.sin.len() != rope.cos.len() || need.is_none_or(|n| rope.cos.len() < n) {
                return Err(Error::shape(
                    op,
                    format!(
                        "rotary cos/sin tables of {} and {} values do not cover {positions} positions \
                         of {} angles",
                        rope.cos.len(),
                        rope.sin.len(),
                        d.head_dim / 2
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Refuses rotary embeddings and head-major rows for a kernel that does not read them.
    fn check_no_rope(&self, op: &'static str) -> Result<()> {
        if self.head_major {
            return Err(Error::invalid(
                op,
                "head-major q, k and v are read only by the bf16 products' forward",
            ));
        }
        match self.rope {
            Some(_) => Err(Error::invalid(
                op,
                "rotary embeddings inside the attention run only in the bf16 products' forward",
            )),
            None => Ok(()),
        }
    }

    /// Element offsets of head `h` of batch `b` in q, k and v, and their row strides, for this layout.
    fn head_rows(&self, d: &AttentionDims, b: usize, h: usize) -> HeadRowsAt {
        let (dk, dv, nh) = (d.head_dim, d.v_head_dim, d.heads);
        if self.head_major {
            let bh = b * nh + h;
            HeadRowsAt {
                q: (bh * d.q_len * dk, dk),
                k: (bh * d.kv_len * dk, dk),
                v: (bh * d.kv_len * dv, dv),
            }
        } else {
            let (oq, ok, ov, _) = d.offsets(b, h);
            HeadRowsAt {
                q: (oq, nh * dk),
                k: (ok, nh * dk),
                v: (ov, nh * dv),
            }
        }
    }

    fn visible(&self, d: &AttentionDims, b: usize) -> usize {
        self.kv_lens.map_or(d.kv_len, |l| l[b])
    }

    fn bias_rows(&self, d: &AttentionDims, b: usize, h: usize) -> Option<&[f32]> {
        self.bias.map(|bias| {
            let bb = if bias.per_batch { b } else { 0 };
            let start = (bb * d.heads + h) * d.q_len * d.kv_len;
            &bias.data[start..start + d.q_len * d.kv_len]
        })
    }

    /// Scores of query rows `i0..i0+rows` against the first `n` keys, into `s [rows, n]`.
    fn scores(
        &self,
        s: &mut [f32],
        d: &AttentionDims,
        b: usize,
        h: usize,
        i0: usize,
        rows: usize,
        n: usize,
    ) {
        let (oq, ok, _, _) = d.offsets(b, h);
        let qv = View { rows, ..d.q_view() };
        // SAFETY: q/k views of head h stay inside q and k (sizes checked by `check`); `s` is task-private.
        unsafe {
            gemm_raw(
                s.as_mut_ptr(),
                View::strided(rows, n, n),
                false,
                self.q.as_ptr().add(oq + i0 * d.heads * d.head_dim),
                qv,
                self.k.as_ptr().add(ok),
                d.k_view(n).t(),
                d.scale,
                Some(gemm::Parallelism::None),
            );
        }
        if let Some(bias) = self.bias_rows(d, b, h) {
            for (r, srow) in s.chunks_mut(n).enumerate() {
                let brow = &bias[(i0 + r) * d.kv_len..(i0 + r) * d.kv_len + n];
                srow.iter_mut().zip(brow).for_each(|(s, b)| *s += b);
            }
        }
    }
}

/// The forward for small head dims without a score bias, with query rows in vector lanes.
mod lane_kernel {
    use super::{AttentionDims, AttentionInputs};
    #[cfg(target_arch = "x86_64")]
    use crate::ops::simd::exp2_16;
    use crate::ops::simd::{prefetch_row, ROWS_AHEAD};

    /// f32 lanes of a 512-bit vector.
    const LANES: usize = 16;
    /// Query rows per block: two vectors.
    pub(super) const ROWS: usize = 2 * LANES;
    /// Largest head dim of the query tile kept on the stack.
    const MAX_DK: usize = 64;
    /// Keys scored together (independent FMA chains).
    #[cfg(target_arch = "x86_64")]
    const KEYS: usize = 8;
    /// Keys per chunk of the online softmax: the chunk's scores (16 KiB), keys and values stay in L1.
    #[cfg(target_arch = "x86_64")]
    const KEY_CHUNK: usize = 128;

    /// Whether the lane kernel runs: no score bias (ESM-2, NT-v2 and the cross-attentions), a head dim up
    /// to 64, and AVX-512 with FMA on this CPU (elsewhere the blocked GEMM path serves).
    pub(super) fn applies(inp: &AttentionInputs<'_>, d: &AttentionDims) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            inp.bias.is_none()
                && d.head_dim <= MAX_DK
                && d.v_head_dim <= MAX_DK
                // The scores and the packed keys and values share the workspace slot.
                && ROWS + d.head_dim + d.v_head_dim <= 2 * super::Q_BLOCK
                && std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (inp, d);
            false
        }
    }

    /// One head's first `len` keys `[len, Dk]` and values `[len, Dv]`, each contiguous.
    #[derive(Clone, Copy)]
    pub(super) struct PackedHead<'a> {
        pub keys: &'a [f32],
        pub values: &'a [f32],
        pub len: usize,
    }

    /// Elements of the workspace [`pack_head`] uses for `n` keys.
    pub(super) fn packed_len(d: &AttentionDims, n: usize) -> usize {
        n * (d.head_dim + d.v_head_dim)
    }

    /// Copies head `h` of batch `b`'s first `n` keys and values out of the interleaved `[B, L, H, D]`
    /// layout into `dst`: the kernel then streams them (one head's rows lie `H·D` apart, so reading them
    /// in place touches a cache line per key and misses the caches at long lengths).
    pub(super) fn pack_head<'a>(
        inp: &AttentionInputs<'_>,
        d: &AttentionDims,
        (b, h): (usize, usize),
        n: usize,
        dst: &'a mut [f32],
    ) -> PackedHead<'a> {
        let (nh, dk, dv) = (d.heads, d.head_dim, d.v_head_dim);
        let (_, ok, ov, _) = d.offsets(b, h);
        let (keys, rest) = dst.split_at_mut(n * dk);
        let values = &mut rest[..n * dv];
        for (j, row) in keys.chunks_exact_mut(dk.max(1)).enumerate().take(n) {
            if j + ROWS_AHEAD < n {
                prefetch_row(&inp.k[ok + (j + ROWS_AHEAD) * nh * dk..][..dk]);
            }
            row.copy_from_slice(&inp.k[ok + j * nh * dk..][..dk]);
        }
        for (j, row) in values.chunks_exact_mut(dv.max(1)).enumerate().take(n) {
            if j + ROWS_AHEAD < n {
                prefetch_row(&inp.v[ov + (j + ROWS_AHEAD) * nh * dv..][..dv]);
            }
            row.copy_from_slice(&inp.v[ov + j * nh * dv..][..dv]);
        }
        PackedHead {
            keys,
            values,
            len: n,
        }
    }

    /// Rows `i0..i0+rows` (`rows ≤ 32`) of head `h` of batch `b` against the first `n` keys. The scores
    /// are kept transposed, `st[j][row]` (32 rows: two vectors per key), so each row's maximum and sum are
    /// lane-wise (no horizontal reductions) and P·V accumulates 16 rows per FMA whatever the head dim (24
    /// for ESM-2 35M, where a GEMM over the head dim would pad its vectors or use thin tiles). Two vectors
    /// of rows per key halve the key and value traffic per FMA. Writes the rows of `out` and
    /// `lse[0..rows]`.
    ///
    /// `head` is this head's keys and values, packed contiguous by [`pack_head`]. Keys are taken in
    /// chunks of [`KEY_CHUNK`] with an online softmax, so a block's working set (the chunk's scores,
    /// keys and values) stays in L1 whatever the sequence length.
    ///
    /// # Safety
    /// AVX-512F and FMA must be present ([`applies`]); `out` must hold the attention output and `lse` at
    /// least `rows` entries, none of them written by anyone else meanwhile; `ws` needs
    /// `32·min(n, KEY_CHUNK)` elements.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn forward_block(
        inp: &AttentionInputs<'_>,
        d: &AttentionDims,
        (b, h): (usize, usize),
        head: PackedHead<'_>,
        i0: usize,
        rows: usize,
        ws: &mut [f32],
        out: *mut f32,
        lse: *mut f32,
    ) {
        use std::arch::x86_64::*;
        let (nh, dk, dv) = (d.heads, d.head_dim, d.v_head_dim);
        let (oq, _, _, oo) = d.offsets(b, h);
        let n = head.len;
        if n == 0 {
            for l in 0..rows {
                let dst = oo + (i0 + l) * nh * dv;
                // SAFETY: this task's output row and lse entry (caller's contract).
                unsafe {
                    std::slice::from_raw_parts_mut(out.add(dst), dv).fill(0.0);
                    *lse.add(l) = f32::NEG_INFINITY;
                }
            }
            return;
        }
        // qt[c][row] = scale · q[i0 + row, c]; rows past `rows` stay zero (their results are unused).
        // The scores are kept in base 2 (`log₂e` folded into the scale): `eˢ⁻ᵐ = 2^(s₂ − m₂)`, one
        // multiply fewer per exponential.
        let scale = d.scale * std::f32::consts::LOG2_E;
        // Row by row: each query row is contiguous, while one column of the block touches a cache line
        // per row (6% of the kernel's samples at ESM-2 shapes when it went column by column).
        let mut qt = [[0.0f32; ROWS]; MAX_DK];
        for l in 0..rows {
            let row = &inp.q[oq + (i0 + l) * nh * dk..][..dk];
            for (qc, x) in qt.iter_mut().zip(row) {
                qc[l] = x * scale;
            }
        }
        let keys = &head.keys[..n * dk];
        let values = &head.values[..n * dv];
        // Keys in chunks whose scores stay in L1, with FlashAttention's online softmax: a running maximum
        // `m` and sum `l` per row, and the unnormalised output `acc` rescaled by `e^(m_old − m_new)`
        // whenever a chunk raises the maximum.
        let st = &mut ws[..KEY_CHUNK.min(n) * ROWS];
        let mut acc = [[0.0f32; ROWS]; MAX_DK];
        // SAFETY (this block): AVX-512F/FMA are enabled for this function; every pointer below stays
        // inside `qt`, `keys`, `values`, `st` or `acc` by the loop bounds.
        unsafe {
            let mut m = [_mm512_set1_ps(f32::NEG_INFINITY); 2];
            let mut l = [_mm512_setzero_ps(); 2];
            for j0 in (0..n).step_by(KEY_CHUNK) {
                let len = KEY_CHUNK.min(n - j0);
                let chunk = &mut st[..len * ROWS];
                let chunk_max = scores(&qt, dk, &keys[j0 * dk..(j0 + len) * dk], chunk);
                let m_new = [
                    _mm512_max_ps(m[0], chunk_max[0]),
                    _mm512_max_ps(m[1], chunk_max[1]),
                ];
                // 2^(−∞) = 0 on the first chunk, where nothing has accumulated yet.
                let alpha = [
                    exp2_16(_mm512_sub_ps(m[0], m_new[0])),
                    exp2_16(_mm512_sub_ps(m[1], m_new[1])),
                ];
                if j0 > 0 {
                    for col in acc.iter_mut().take(dv) {
                        for (v, a) in alpha.iter().enumerate() {
                            let ptr = col.as_mut_ptr().add(v * LANES);
                            _mm512_storeu_ps(ptr, _mm512_mul_ps(_mm512_loadu_ps(ptr), *a));
                        }
                    }
                }
                m = m_new;
                // Two sums per row vector: a single loop-carried sum is kept in memory otherwise.
                let mut sum = [_mm512_setzero_ps(); 2];
                for key in chunk.chunks_exact_mut(ROWS) {
                    let ptr = key.as_mut_ptr();
                    for v in 0..2 {
                        let p = exp2_16(_mm512_sub_ps(_mm512_loadu_ps(ptr.add(v * LANES)), m[v]));
                        _mm512_storeu_ps(ptr.add(v * LANES), p);
                        sum[v] = _mm512_add_ps(sum[v], p);
                    }
                }
                for v in 0..2 {
                    l[v] = _mm512_add_ps(_mm512_mul_ps(l[v], alpha[v]), sum[v]);
                }
                let chunk_values = &values[j0 * dv..(j0 + len) * dv];
                let mut c0 = 0;
                while c0 < dv {
                    c0 += match dv - c0 {
                        w if w >= 12 => pv_chunk::<12>(chunk_values, dv, c0, chunk, &mut acc),
                        w if w >= 8 => pv_chunk::<8>(chunk_values, dv, c0, chunk, &mut acc),
                        _ => pv_chunk::<1>(chunk_values, dv, c0, chunk, &mut acc),
                    };
                }
            }
            let mut sums = [0.0f32; ROWS];
            let mut maxes = [0.0f32; ROWS];
            for v in 0..2 {
                _mm512_storeu_ps(sums.as_mut_ptr().add(v * LANES), l[v]);
                _mm512_storeu_ps(maxes.as_mut_ptr().add(v * LANES), m[v]);
            }
            let out_base = oo + i0 * nh * dv;
            for r in 0..rows {
                let inv = 1.0 / sums[r];
                let row = out.add(out_base + r * nh * dv);
                for (c, col) in acc.iter().take(dv).enumerate() {
                    *row.add(c) = col[r] * inv;
                }
                *lse.add(r) = maxes[r] * std::f32::consts::LN_2 + sums[r].ln();
            }
        }
    }

    /// Scores of the block's rows against the keys `[len, dk]` into `st[j][row]` (32 rows per key), and
    /// each row's maximum. `KEYS` keys at a time: independent FMA chains, one broadcast per key and
    /// head-dim entry.
    ///
    /// # Safety
    /// AVX-512F and FMA must be present; `st` holds `32·len` elements.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn scores(
        qt: &[[f32; ROWS]; MAX_DK],
        dk: usize,
        keys: &[f32],
        st: &mut [f32],
    ) -> [std::arch::x86_64::__m512; 2] {
        use std::arch::x86_64::*;
        let len = st.len() / ROWS;
        let mut max = [_mm512_set1_ps(f32::NEG_INFINITY); 2];
        let full = len - len % KEYS;
        // SAFETY: key j's entries are keys[j·dk..(j+1)·dk] and its scores st[j·32..(j+1)·32], j < len.
        unsafe {
            for j0 in (0..full).step_by(KEYS) {
                let mut acc = [[_mm512_setzero_ps(); 2]; KEYS];
                for (c, qc) in qt.iter().take(dk).enumerate() {
                    let q0 = _mm512_loadu_ps(qc.as_ptr());
                    let q1 = _mm512_loadu_ps(qc.as_ptr().add(LANES));
                    for (t, a) in acc.iter_mut().enumerate() {
                        let kc = _mm512_set1_ps(*keys.get_unchecked((j0 + t) * dk + c));
                        a[0] = _mm512_fmadd_ps(kc, q0, a[0]);
                        a[1] = _mm512_fmadd_ps(kc, q1, a[1]);
                    }
                }
                for (t, a) in acc.iter().enumerate() {
                    let dst = st.as_mut_ptr().add((j0 + t) * ROWS);
                    _mm512_storeu_ps(dst, a[0]);
                    _mm512_storeu_ps(dst.add(LANES), a[1]);
                    max[0] = _mm512_max_ps(max[0], a[0]);
                    max[1] = _mm512_max_ps(max[1], a[1]);
                }
            }
            for j in full..len {
                let mut a = [_mm512_setzero_ps(); 2];
                for (c, qc) in qt.iter().take(dk).enumerate() {
                    let kc = _mm512_set1_ps(*keys.get_unchecked(j * dk + c));
                    a[0] = _mm512_fmadd_ps(kc, _mm512_loadu_ps(qc.as_ptr()), a[0]);
                    a[1] = _mm512_fmadd_ps(kc, _mm512_loadu_ps(qc.as_ptr().add(LANES)), a[1]);
                }
                let dst = st.as_mut_ptr().add(j * ROWS);
                _mm512_storeu_ps(dst, a[0]);
                _mm512_storeu_ps(dst.add(LANES), a[1]);
                max[0] = _mm512_max_ps(max[0], a[0]);
                max[1] = _mm512_max_ps(max[1], a[1]);
            }
        }
        max
    }

    /// Output columns `c0..c0+W` of the block over one chunk of keys: `acc[c][row] += Σ_j p[j][row]·v[j, c]`,
    /// with the `2·W` accumulators of 16 rows each held in registers. Returns `W`.
    ///
    /// # Safety
    /// As [`forward_block`]; `values` holds the chunk's value rows `dv` apart, `st` its probabilities.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn pv_chunk<const W: usize>(
        values: &[f32],
        dv: usize,
        c0: usize,
        st: &[f32],
        acc: &mut [[f32; ROWS]; MAX_DK],
    ) -> usize {
        use std::arch::x86_64::*;
        let mut regs = [[_mm512_setzero_ps(); 2]; W];
        // SAFETY: rows of `st` and value entries c0..c0+W of each key are in bounds by construction.
        unsafe {
            for (r, col) in regs.iter_mut().zip(&acc[c0..c0 + W]) {
                r[0] = _mm512_loadu_ps(col.as_ptr());
                r[1] = _mm512_loadu_ps(col.as_ptr().add(LANES));
            }
            for j in 0..st.len() / ROWS {
                let p0 = _mm512_loadu_ps(st.as_ptr().add(j * ROWS));
                let p1 = _mm512_loadu_ps(st.as_ptr().add(j * ROWS + LANES));
                let v = values.as_ptr().add(j * dv + c0);
                for (c, a) in regs.iter_mut().enumerate() {
                    let vc = _mm512_set1_ps(*v.add(c));
                    a[0] = _mm512_fmadd_ps(vc, p0, a[0]);
                    a[1] = _mm512_fmadd_ps(vc, p1, a[1]);
                }
            }
            for (r, col) in regs.iter().zip(&mut acc[c0..c0 + W]) {
                _mm512_storeu_ps(col.as_mut_ptr(), r[0]);
                _mm512_storeu_ps(col.as_mut_ptr().add(LANES), r[1]);
            }
        }
        W
    }

    #[cfg(not(target_arch = "x86_64"))]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn forward_block(
        _: &AttentionInputs<'_>,
        _: &AttentionDims,
        _: (usize, usize),
        _: PackedHead<'_>,
        _: usize,
        _: usize,
        _: &mut [f32],
        _: *mut f32,
        _: *mut f32,
    ) {
        unreachable!("the lane kernel is only chosen on x86-64")
    }
}

use lane_kernel::{pack_head, packed_len, ROWS};

/// A pointer that tasks share to write disjoint elements of one buffer.
struct SharedMut<T>(*mut T);
impl<T> Clone for SharedMut<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SharedMut<T> {}
// SAFETY: only used to write element sets that the task partition keeps disjoint.
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

/// Splits `tasks` over the workspace slots and runs each slot's tasks in order with its own scratch.
fn run_tasks<T: Sync>(
    tasks: &[T],
    workspace: &mut [f32],
    per_slot: usize,
    f: impl Fn(&T, &mut [f32]) + Sync,
) -> Result<()> {
    let slots = (workspace.len() / per_slot.max(1)).min(tasks.len()).max(1);
    if workspace.len() < per_slot {
        return Err(Error::shape(
            "attention",
            format!(
                "workspace of {} elements, need at least {per_slot}",
                workspace.len()
            ),
        ));
    }
    let per = tasks.len().div_ceil(slots);
    workspace[..slots * per_slot]
        .par_chunks_mut(per_slot)
        .zip(tasks.par_chunks(per.max(1)))
        .for_each(|(ws, group)| {
            for t in group {
                f(t, ws);
            }
        });
    Ok(())
}

/// Runs `f` on every `(batch, head)` of a forward, over the workspace slots (one worker's share of the
/// workspace checked first: an error rather than an overflow).
fn run_heads(
    op: &'static str,
    d: &AttentionDims,
    workspace: &mut [f32],
    f: impl Fn((usize, usize), &mut [f32]) + Sync,
) -> Result<()> {
    let tasks: Vec<(usize, usize)> = (0..d.batch)
        .flat_map(|b| (0..d.heads).map(move |h| (b, h)))
        .collect();
    let slot = d.checked_workspace_len(op, 1)?;
    run_tasks(&tasks, workspace, slot, |&head, ws| f(head, ws))
}

/// Forward pass with f32 products (the reference). `workspace` needs [`AttentionDims::workspace_len`]
/// elements (for any thread count ≥ 1; more slots run more heads in parallel).
pub fn attention(
    out: &mut [f32],
    lse: &mut [f32],
    inp: AttentionInputs<'_>,
    d: &AttentionDims,
    workspace: &mut [f32],
) -> Result<()> {
    attention_with(out, lse, inp, d, workspace, Products::F32)
}

/// Forward pass with the products in `products` precision; otherwise as [`attention`].
pub fn attention_with(
    out: &mut [f32],
    lse: &mut [f32],
    inp: AttentionInputs<'_>,
    d: &AttentionDims,
    workspace: &mut [f32],
    products: Products,
) -> Result<()> {
    inp.check("attention", d)?;
    check_len(
        "attention",
        "out",
        out.len(),
        d.batch * d.q_len * d.heads * d.v_head_dim,
    )?;
    check_len("attention", "lse", lse.len(), d.batch * d.heads * d.q_len)?;
    let (out_ptr, lse_ptr) = (SharedMut(out.as_mut_ptr()), SharedMut(lse.as_mut_ptr()));
    #[cfg(target_arch = "x86_64")]
    let tiles = (products == Products::Bf16)
        .then(|| bf16::plan(&inp, d))
        .flatten();
    #[cfg(not(target_arch = "x86_64"))]
    let (_, tiles) = (products, None::<()>);
    if tiles.is_none() {
        inp.check_no_rope("attention")?;
    }
    let lanes = lane_kernel::applies(&inp, d);
    run_heads("attention", d, workspace, |(b, h), ws| {
        let n = inp.visible(d, b);
        let (_, _, ov, oo) = d.offsets(b, h);
        let (out_ptr, lse_ptr) = (out_ptr, lse_ptr);
        #[cfg(target_arch = "x86_64")]
        if let Some(layout) = &tiles {
            // SAFETY: the kernel's features were detected and its layout made (`plan`), the inputs
            // checked above, the slot holds `slot_len ≥ bf16::workspace_len` elements, and head h of
            // batch b's output rows and lse entries belong to this task only.
            unsafe {
                bf16::forward_head(
                    layout,
                    &inp,
                    d,
                    (b, h),
                    ws,
                    bf16::Out::F32(out_ptr.0),
                    lse_ptr.0.add((b * d.heads + h) * d.q_len),
                )
            };
            return;
        }
        if lanes {
            // The scores take 32·n of the slot's 512·n elements, this head's keys and values
            // (Dk + Dv ≤ 128) some of the rest.
            let (st, rest) = ws.split_at_mut(ROWS * n);
            let head = pack_head(&inp, d, (b, h), n, &mut rest[..packed_len(d, n)]);
            for i0 in (0..d.q_len).step_by(ROWS) {
                let rows = ROWS.min(d.q_len - i0);
                let pos = (b * d.heads + h) * d.q_len + i0;
                // SAFETY: rows i0..i0+rows of head h of batch b in `out` and their lse entries belong
                // to this (b, h) task only; the kernel's features were detected.
                unsafe {
                    lane_kernel::forward_block(
                        &inp,
                        d,
                        (b, h),
                        head,
                        i0,
                        rows,
                        st,
                        out_ptr.0,
                        lse_ptr.0.add(pos),
                    )
                };
            }
            return;
        }
        let mut inv_sum = [0.0f32; Q_BLOCK];
        for i0 in (0..d.q_len).step_by(Q_BLOCK) {
            let rows = Q_BLOCK.min(d.q_len - i0);
            let s = &mut ws[..rows * n];
            inp.scores(s, d, b, h, i0, rows, n);
            // Unnormalised probabilities: each output row is divided by its sum after P·V (Dv values
            // per row rather than Lk).
            let inv_sums = &mut inv_sum[..rows];
            for (r, inv) in inv_sums.iter_mut().enumerate() {
                let (max, sum) = if n == 0 {
                    (f32::NEG_INFINITY, 0.0)
                } else {
                    exp_row_in_place(&mut s[r * n..(r + 1) * n])
                };
                let l = if sum > 0.0 {
                    max + sum.ln()
                } else {
                    f32::NEG_INFINITY
                };
                *inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
                // SAFETY: lse[b, h, i0+r] belongs to this (b, h) task only.
                unsafe { *lse_ptr.0.add((b * d.heads + h) * d.q_len + i0 + r) = l };
            }
            // SAFETY: rows i0.. of head h of batch b in `out` belong to this task; v's view is in bounds.
            unsafe {
                gemm_raw(
                    out_ptr.0.add(oo + i0 * d.heads * d.v_head_dim),
                    View { rows, ..d.o_view() },
                    false,
                    s.as_ptr(),
                    View::strided(rows, n, n),
                    inp.v.as_ptr().add(ov),
                    d.v_view(n),
                    1.0,
                    Some(gemm::Parallelism::None),
                );
            }
            for (r, &inv) in inv_sums.iter().enumerate() {
                let row = oo + (i0 + r) * d.heads * d.v_head_dim;
                // SAFETY: as for the GEMM above: this task's rows of `out`.
                let o = unsafe { std::slice::from_raw_parts_mut(out_ptr.0.add(row), d.v_head_dim) };
                o.iter_mut().for_each(|v| *v *= inv);
            }
        }
    })
}

/// Whether [`attention_bf16_out`] runs for these inputs on this CPU: bf16 products (no score bias,
/// AVX512-BF16 present, on AMX tiles where the CPU has them).
pub fn writes_bf16(inp: &AttentionInputs<'_>, d: &AttentionDims) -> bool {
    #[cfg(target_arch = "x86_64")]
    return bf16::plan(inp, d).is_some();
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (inp, d);
        false
    }
}

/// Whether the bf16 products run for inputs of these sizes without a score bias on this CPU, and with them
/// [`AttentionRope`]: where [`writes_bf16`] would hold.
pub fn rotates_inside(d: &AttentionDims) -> bool {
    #[cfg(target_arch = "x86_64")]
    return bf16::plan_unbiased(d).is_some();
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = d;
        false
    }
}

/// [`attention_with`] in bf16 products, writing the output as bf16 (each value rounded once) rather than
/// as f32 that is rounded in a second pass: the bf16 backend's attention, where [`writes_bf16`] holds.
/// Elsewhere an error.
pub fn attention_bf16_out(
    out: &mut [half::bf16],
    lse: &mut [f32],
    inp: AttentionInputs<'_>,
    d: &AttentionDims,
    workspace: &mut [f32],
) -> Result<()> {
    const OP: &str = "attention";
    inp.check(OP, d)?;
    check_len(
        OP,
        "out",
        out.len(),
        d.batch * d.q_len * d.heads * d.v_head_dim,
    )?;
    check_len(OP, "lse", lse.len(), d.batch * d.heads * d.q_len)?;
    #[cfg(target_arch = "x86_64")]
    if let Some(layout) = bf16::plan(&inp, d) {
        let out_ptr = SharedMut(out.as_mut_ptr().cast::<u16>());
        let lse_ptr = SharedMut(lse.as_mut_ptr());
        return run_heads(OP, d, workspace, |(b, h), ws| {
            let (out_ptr, lse_ptr) = (out_ptr, lse_ptr);
            // SAFETY: as in `attention_with`: the layout is `plan`'s, the inputs and `out` were
            // checked above, the slot holds `bf16::workspace_len` elements (`run_heads`), and head h
            // of batch b's output values and lse entries belong to this task only.
            unsafe {
                bf16::forward_head(
                    &layout,
                    &inp,
                    d,
                    (b, h),
                    ws,
                    bf16::Out::Bf16(out_ptr.0),
                    lse_ptr.0.add((b * d.heads + h) * d.q_len),
                )
            };
        });
    }
    Err(Error::invalid(
        OP,
        "a bf16 output needs the bf16 products (AVX512-BF16, no score bias), which do not run here",
    ))
}

/// Gradients with respect to q, k, v and (optionally) the bias, added into the given buffers.
/// `dbias` has the bias's layout (broadcast bias: summed over the batch).
pub fn attention_backward(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dbias: Option<&mut [f32]>,
    dout: &[f32],
    out: &[f32],
    lse: &[f32],
    inp: AttentionInputs<'_>,
    d: &AttentionDims,
    workspace: &mut [f32],
) -> Result<()> {
    inp.check("attention_backward", d)?;
    inp.check_no_rope("attention_backward")?;
    check_len("attention_backward", "dq", dq.len(), inp.q.len())?;
    check_len("attention_backward", "dk", dk.len(), inp.k.len())?;
    check_len("attention_backward", "dv", dv.len(), inp.v.len())?;
    check_len(
        "attention_backward",
        "dout",
        dout.len(),
        d.batch * d.q_len * d.heads * d.v_head_dim,
    )?;
    check_len("attention_backward", "out", out.len(), dout.len())?;
    check_len(
        "attention_backward",
        "lse",
        lse.len(),
        d.batch * d.heads * d.q_len,
    )?;
    let broadcast_bias = inp.bias.is_some_and(|b| !b.per_batch);
    if let Some(db) = dbias.as_deref() {
        let Some(bias) = inp.bias else {
            return Err(Error::invalid(
                "attention_backward",
                "dbias given without a bias",
            ));
        };
        check_len("attention_backward", "dbias", db.len(), bias.data.len())?;
    }
    let with_dbias = dbias.is_some();
    let dbias_ptr = SharedMut(dbias.map_or(std::ptr::null_mut(), |b| b.as_mut_ptr()));
    let (dq_ptr, dk_ptr, dv_ptr) = (
        SharedMut(dq.as_mut_ptr()),
        SharedMut(dk.as_mut_ptr()),
        SharedMut(dv.as_mut_ptr()),
    );
    // A broadcast bias gradient sums over the batch, so one task owns a head across all batch entries
    // (and visits them in order, keeping the sum deterministic).
    let tasks: Vec<(usize, Vec<usize>)> = if broadcast_bias && with_dbias {
        (0..d.heads).map(|h| (h, (0..d.batch).collect())).collect()
    } else {
        (0..d.batch)
            .flat_map(|b| (0..d.heads).map(move |h| (h, vec![b])))
            .collect()
    };
    let (nh, dk_, dv_) = (d.heads, d.head_dim, d.v_head_dim);
    run_tasks(
        &tasks,
        workspace,
        2 * Q_BLOCK * d.kv_len.max(1),
        |(h, batches), ws| {
            let h = *h;
            let (dq_ptr, dk_ptr, dv_ptr, dbias_ptr) = (dq_ptr, dk_ptr, dv_ptr, dbias_ptr);
            for &b in batches {
                let n = inp.visible(d, b);
                if n == 0 {
                    continue;
                }
                let (oq, ok, ov, oo) = d.offsets(b, h);
                for i0 in (0..d.q_len).step_by(Q_BLOCK) {
                    let rows = Q_BLOCK.min(d.q_len - i0);
                    let (p, dp) = ws.split_at_mut(Q_BLOCK * d.kv_len.max(1));
                    let (p, dp) = (&mut p[..rows * n], &mut dp[..rows * n]);
                    inp.scores(p, d, b, h, i0, rows, n);
                    let lse_row = &lse[(b * nh + h) * d.q_len + i0..];
                    dispatch(
                        #[inline(always)]
                        || {
                            for (r, prow) in p.chunks_mut(n).enumerate() {
                                let l = lse_row[r];
                                if l == f32::NEG_INFINITY {
                                    prow.iter_mut().for_each(|v| *v = 0.0);
                                } else {
                                    prow.iter_mut().for_each(|v| {
                                        *v = crate::ops::elementwise::fast_exp(*v - l)
                                    });
                                }
                            }
                        },
                    );
                    let (do_blk, o_blk) = (oo + i0 * nh * dv_, oo + i0 * nh * dv_);
                    let ov_rows = View { rows, ..d.o_view() };
                    // SAFETY (this block): every view stays inside its buffer (sizes checked above), and the
                    // written views (dv, dq, dk of head h, batch b; dbias rows of this task) belong to this task.
                    unsafe {
                        // dV += Pᵀ · dO
                        gemm_raw(
                            dv_ptr.0.add(ov),
                            d.v_view(n),
                            true,
                            p.as_ptr(),
                            View::strided(rows, n, n).t(),
                            dout.as_ptr().add(do_blk),
                            ov_rows,
                            1.0,
                            Some(gemm::Parallelism::None),
                        );
                        // dP = dO · Vᵀ
                        gemm_raw(
                            dp.as_mut_ptr(),
                            View::strided(rows, n, n),
                            false,
                            dout.as_ptr().add(do_blk),
                            ov_rows,
                            inp.v.as_ptr().add(ov),
                            d.v_view(n).t(),
                            1.0,
                            Some(gemm::Parallelism::None),
                        );
                    }
                    // dS = P ∘ (dP − D), D = rowsum(dO ∘ O); dS overwrites dP.
                    for r in 0..rows {
                        let base = o_blk + r * nh * dv_;
                        let dsum = dispatch(|| {
                            super::simd::dot(&dout[base..base + dv_], &out[base..base + dv_])
                        });
                        let (prow, dprow) = (&p[r * n..(r + 1) * n], &mut dp[r * n..(r + 1) * n]);
                        for (ds, &pv) in dprow.iter_mut().zip(prow) {
                            *ds = pv * (*ds - dsum);
                        }
                    }
                    if with_dbias {
                        let bb = if broadcast_bias { 0 } else { b };
                        let start = (bb * nh + h) * d.q_len * d.kv_len;
                        for r in 0..rows {
                            for (j, ds) in dp[r * n..(r + 1) * n].iter().enumerate() {
                                unsafe { *dbias_ptr.0.add(start + (i0 + r) * d.kv_len + j) += ds };
                            }
                        }
                    }
                    unsafe {
                        // dQ = scale · dS · K
                        let dq_view = View { rows, ..d.q_view() };
                        gemm_raw(
                            dq_ptr.0.add(oq + i0 * nh * dk_),
                            dq_view,
                            true,
                            dp.as_ptr(),
                            View::strided(rows, n, n),
                            inp.k.as_ptr().add(ok),
                            d.k_view(n),
                            d.scale,
                            Some(gemm::Parallelism::None),
                        );
                        // dK += scale · dSᵀ · Q
                        gemm_raw(
                            dk_ptr.0.add(ok),
                            d.k_view(n),
                            true,
                            dp.as_ptr(),
                            View::strided(rows, n, n).t(),
                            inp.q.as_ptr().add(oq + i0 * nh * dk_),
                            dq_view,
                            d.scale,
                            Some(gemm::Parallelism::None),
                        );
                    }
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;

    /// Direct f64 attention: full score matrix, masked keys dropped, fully masked rows zero.
    fn naive(
        q: &[f64],
        k: &[f64],
        v: &[f64],
        bias: Option<(&[f64], bool)>,
        lens: &[usize],
        d: &AttentionDims,
    ) -> Vec<f64> {
        let (nh, dk, dv) = (d.heads, d.head_dim, d.v_head_dim);
        let mut out = vec![0.0; d.batch * d.q_len * nh * dv];
        for b in 0..d.batch {
            for h in 0..nh {
                for i in 0..d.q_len {
                    let mut s: Vec<f64> = (0..lens[b])
                        .map(|j| {
                            let dot: f64 = (0..dk)
                                .map(|c| {
                                    q[((b * d.q_len + i) * nh + h) * dk + c]
                                        * k[((b * d.kv_len + j) * nh + h) * dk + c]
                                })
                                .sum();
                            let bv = bias.map_or(0.0, |(bias, per_batch)| {
                                let bb = if per_batch { b } else { 0 };
                                bias[((bb * nh + h) * d.q_len + i) * d.kv_len + j]
                            });
                            dot * d.scale as f64 + bv
                        })
                        .collect();
                    if s.is_empty() {
                        continue;
                    }
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    s.iter_mut().for_each(|x| *x = (*x - m).exp());
                    let z: f64 = s.iter().sum();
                    for c in 0..dv {
                        out[((b * d.q_len + i) * nh + h) * dv + c] = (0..lens[b])
                            .map(|j| s[j] / z * v[((b * d.kv_len + j) * nh + h) * dv + c])
                            .sum();
                    }
                }
            }
        }
        out
    }

    fn run_case(
        d: AttentionDims,
        lens: Vec<usize>,
        bias_mode: Option<bool>,
        seed: u64,
        check_grads: bool,
    ) {
        let mut r = rng(seed);
        let q = uniform(&mut r, d.batch * d.q_len * d.heads * d.head_dim, -1.0, 1.0);
        let k = uniform(&mut r, d.batch * d.kv_len * d.heads * d.head_dim, -1.0, 1.0);
        let v = uniform(
            &mut r,
            d.batch * d.kv_len * d.heads * d.v_head_dim,
            -1.0,
            1.0,
        );
        let bias_len = bias_mode.map_or(
            0,
            |pb| if pb { d.batch } else { 1 } * d.heads * d.q_len * d.kv_len,
        );
        let bias_data = uniform(&mut r, bias_len, -1.0, 1.0);
        let inp = AttentionInputs {
            head_major: false,
            q: &q,
            k: &k,
            v: &v,
            kv_lens: Some(&lens),
            bias: bias_mode.map(|per_batch| AttentionBias {
                data: &bias_data,
                per_batch,
            }),
            rope: None,
        };
        let mut ws = vec![0.0; d.workspace_len(3)];
        let mut out = vec![0.0; d.batch * d.q_len * d.heads * d.v_head_dim];
        let mut lse = vec![0.0; d.batch * d.heads * d.q_len];
        attention(&mut out, &mut lse, inp, &d, &mut ws).unwrap();
        let nv = |x: &[Vec<f64>]| {
            naive(
                &x[0],
                &x[1],
                &x[2],
                bias_mode.map(|pb| (&x[3][..], pb)),
                &lens,
                &d,
            )
        };
        let x64 = [to_f64(&q), to_f64(&k), to_f64(&v), to_f64(&bias_data)];
        assert_close(&format!("attention {d:?}"), &out, &nv(&x64), 1e-5);
        for (b, &l) in lens.iter().enumerate() {
            if l == 0 {
                let rows = &out[b * d.q_len * d.heads * d.v_head_dim
                    ..(b + 1) * d.q_len * d.heads * d.v_head_dim];
                assert!(
                    rows.iter().all(|&x| x == 0.0),
                    "fully masked rows must be zero"
                );
                assert!(lse[b * d.heads * d.q_len..(b + 1) * d.heads * d.q_len]
                    .iter()
                    .all(|&x| x == f32::NEG_INFINITY));
            }
        }
        if !check_grads {
            return;
        }
        let dout = uniform(&mut r, out.len(), -1.0, 1.0);
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        let mut dbias = vec![0.0; bias_len];
        let dbias_arg = bias_mode.map(|_| &mut dbias[..]);
        attention_backward(
            &mut dq, &mut dk, &mut dv, dbias_arg, &dout, &out, &lse, inp, &d, &mut ws,
        )
        .unwrap();
        let grads: Vec<Option<&[f32]>> = vec![
            Some(&dq),
            Some(&dk),
            Some(&dv),
            bias_mode.map(|_| &dbias[..]),
        ];
        check_gradients(
            &format!("attention {d:?}"),
            &[&q, &k, &v, &bias_data],
            &grads,
            &dout,
            nv,
            2e-4,
        );
        if lens.contains(&0) {
            let b = lens.iter().position(|&l| l == 0).unwrap();
            let span = d.q_len * d.heads * d.head_dim;
            assert!(dq[b * span..(b + 1) * span].iter().all(|&x| x == 0.0));
        }
    }

    #[test]
    fn self_attention_with_padding_and_a_fully_masked_row() {
        run_case(
            AttentionDims::new(3, 2, 7, 7, 5),
            vec![7, 4, 0],
            None,
            41,
            true,
        );
    }

    #[test]
    fn cross_attention_with_different_value_width() {
        let d = AttentionDims {
            v_head_dim: 6,
            ..AttentionDims::new(2, 3, 5, 9, 4)
        };
        run_case(d, vec![9, 3], None, 42, true);
    }

    #[test]
    fn additive_bias_broadcast_and_per_batch() {
        run_case(
            AttentionDims::new(2, 2, 6, 5, 3),
            vec![5, 2],
            Some(false),
            43,
            true,
        );
        run_case(
            AttentionDims::new(2, 2, 6, 5, 3),
            vec![5, 5],
            Some(true),
            44,
            true,
        );
    }

    #[test]
    fn several_query_blocks_and_model_head_dims() {
        // q_len past one block; head dims 32, 48 and Enformer's 64/192 split.
        run_case(
            AttentionDims::new(1, 2, 150, 97, 32),
            vec![90],
            None,
            45,
            false,
        );
        run_case(
            AttentionDims::new(2, 1, 70, 33, 48),
            vec![33, 20],
            Some(false),
            46,
            false,
        );
        let d = AttentionDims {
            v_head_dim: 192,
            ..AttentionDims::new(1, 2, 67, 67, 64)
        };
        run_case(d, vec![67], Some(false), 47, false);
    }

    #[test]
    fn keys_over_several_chunks_of_the_online_softmax() {
        // ESM-2 35M's head dim 24 over keys spanning three chunks (ragged last chunk and key groups),
        // the second batch entry ending just past the first chunk.
        run_case(
            AttentionDims::new(2, 2, 40, 301, 24),
            vec![301, 129],
            None,
            48,
            false,
        );
        // Peaked scores (a large scale): the running maximum jumps between chunks, so the accumulated
        // output is rescaled by factors far from 1.
        let d = AttentionDims {
            scale: 3.0,
            ..AttentionDims::new(1, 3, 33, 270, 16)
        };
        run_case(d, vec![270], None, 49, false);
        // Gradients through a two-chunk forward's log-sum-exp (small, for the finite differences).
        let d = AttentionDims {
            scale: 3.0,
            ..AttentionDims::new(1, 1, 3, 131, 4)
        };
        run_case(d, vec![131], None, 50, true);
    }

    /// The bf16 products (AMX tiles or `vdpbf16ps`, whichever the CPU has) against f64 attention on the
    /// same bf16-rounded q and k (the values are split into two bf16 parts, so they enter unrounded):
    /// what remains is the rounding of the probabilities to bf16 (2⁻⁹ relative each) and f32 sums, so the
    /// output is held to 2⁻⁸ of the values' scale and the log-sum-exp to 1e-5. Lengths cross the online
    /// softmax's chunks and the 32-key tiles; head dims pad to the tiles' 32 (24, 48, 80) or fill them;
    /// value widths differ; query blocks are ragged; one batch entry has no visible key.
    #[test]
    fn bf16_products_match_f64_on_the_rounded_operands() {
        bf16_products_match_f64(false);
    }

    /// The same on the `vdpbf16ps` vector products, which CPUs without AMX run: forced here, so that a
    /// machine with AMX checks both paths (they share the keys, queries, probabilities and softmax).
    #[test]
    fn bf16_vector_products_match_f64_on_the_rounded_operands() {
        bf16_products_match_f64(true);
    }

    fn bf16_products_match_f64(vector_products_only: bool) {
        bf16::VECTOR_PRODUCTS_ONLY.with(|only| only.set(vector_products_only));
        let dims = |b, h, lq, lk, dk, dv, scale: Option<f32>| AttentionDims {
            v_head_dim: dv,
            scale: scale.unwrap_or((dk as f32).powf(-0.5)),
            ..AttentionDims::new(b, h, lq, lk, dk)
        };
        let cases = [
            (dims(2, 3, 45, 301, 24, 24, None), vec![301, 129]),
            (dims(1, 2, 70, 200, 48, 48, None), vec![200]),
            (dims(2, 2, 33, 100, 64, 192, None), vec![100, 0]),
            (dims(1, 1, 9, 40, 384, 384, None), vec![40]),
            (dims(1, 2, 64, 257, 80, 16, Some(3.0)), vec![257]),
            (dims(1, 1, 1, 1, 8, 8, None), vec![1]),
            // Keys over three chunks of the online softmax (1,024 keys each), peaked so that the running
            // maximum moves between chunks.
            (dims(2, 1, 35, 2300, 24, 40, Some(2.0)), vec![2300, 1500]),
        ];
        let bf = |x: &[f32]| -> Vec<f32> {
            x.iter()
                .map(|&v| half::bf16::from_f32(v).to_f32())
                .collect()
        };
        for (seed, (d, lens)) in cases.into_iter().enumerate() {
            let mut r = rng(60 + seed as u64);
            let (nq, nk) = (d.batch * d.q_len * d.heads, d.batch * d.kv_len * d.heads);
            let q = bf(&uniform(&mut r, nq * d.head_dim, -1.0, 1.0));
            let k = bf(&uniform(&mut r, nk * d.head_dim, -1.0, 1.0));
            let v = uniform(&mut r, nk * d.v_head_dim, -1.0, 1.0);
            let inp = AttentionInputs {
                head_major: false,
                q: &q,
                k: &k,
                v: &v,
                kv_lens: Some(&lens),
                bias: None,
                rope: None,
            };
            let mut ws = vec![0.0; d.workspace_len(2)];
            let mut out = vec![f32::NAN; nq * d.v_head_dim];
            let mut lse = vec![f32::NAN; d.batch * d.heads * d.q_len];
            attention_with(&mut out, &mut lse, inp, &d, &mut ws, Products::Bf16).unwrap();
            let name = format!("bf16 products {d:?}");
            // The bf16 output, where the bf16 products run: the f32 output rounded once, value for value,
            // and the same log-sum-exp; elsewhere an error, never a silent fallback.
            let mut out16 = vec![half::bf16::NAN; out.len()];
            let mut lse16 = vec![f32::NAN; lse.len()];
            let direct = attention_bf16_out(&mut out16, &mut lse16, inp, &d, &mut ws);
            if writes_bf16(&inp, &d) {
                direct.unwrap();
                for (i, (g, w)) in out16.iter().zip(&out).enumerate() {
                    assert_eq!(
                        g.to_bits(),
                        half::bf16::from_f32(*w).to_bits(),
                        "{name}: bf16 out[{i}]"
                    );
                }
                let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&lse16), bits(&lse), "{name}: lse of the bf16 output");
            } else {
                assert!(direct.is_err(), "{name}: bf16 output without tiles");
            }
            let (q64, k64, v64) = (to_f64(&q), to_f64(&k), to_f64(&v));
            let want = naive(&q64, &k64, &v64, None, &lens, &d);
            let scale = v.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            for (i, (g, w)) in out.iter().zip(&want).enumerate() {
                assert!(
                    ((*g as f64) - w).abs() <= scale as f64 / 256.0,
                    "{name}: out[{i}] = {g}, want {w}"
                );
            }
            let (nh, dk) = (d.heads, d.head_dim);
            for b in 0..d.batch {
                for h in 0..nh {
                    for i in 0..d.q_len {
                        let got = lse[(b * nh + h) * d.q_len + i];
                        if lens[b] == 0 {
                            assert_eq!(got, f32::NEG_INFINITY, "{name}: lse of a masked row");
                            continue;
                        }
                        let s: Vec<f64> = (0..lens[b])
                            .map(|j| {
                                let qi = ((b * d.q_len + i) * nh + h) * dk;
                                let kj = ((b * d.kv_len + j) * nh + h) * dk;
                                (0..dk).map(|c| q64[qi + c] * k64[kj + c]).sum::<f64>()
                                    * d.scale as f64
                            })
                            .collect();
                        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        let want = m + s.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
                        assert!(
                            ((got as f64) - want).abs() <= 1e-5 * want.abs().max(1.0),
                            "{name}: lse {got}, want {want}"
                        );
                    }
                }
            }
        }
    }

    /// Rotary embeddings inside the bf16 products ([`AttentionRope`]) give the bits of rotating `q` and `k`
    /// first with the rotary op: outputs (f32 and bf16) and log-sum-exps, on the tiles and on the vector
    /// products, over ragged query blocks, keys over several chunks, padded head dims and masked keys.
    /// The same with q, k and v head-major (`AttentionInputs::head_major`). The f32 kernels and the
    /// backward refuse rotary tables and head-major rows.
    #[test]
    fn rotary_inside_the_bf16_products_matches_the_rotary_op() {
        for vector_products_only in [false, true] {
            bf16::VECTOR_PRODUCTS_ONLY.with(|only| only.set(vector_products_only));
            let cases = [
                (AttentionDims::new(2, 3, 45, 45, 48), vec![45, 30]),
                (AttentionDims::new(3, 2, 70, 70, 24), vec![70, 1, 33]),
                (AttentionDims::new(1, 2, 1100, 1100, 64), vec![1100]),
                (AttentionDims::new(2, 1, 40, 40, 80), vec![40, 0]),
            ];
            for (seed, (d, lens)) in cases.into_iter().enumerate() {
                let mut r = rng(90 + seed as u64);
                let table =
                    crate::ops::rotary::RotaryTable::new(d.q_len + 5, d.head_dim, 1e4).unwrap();
                let (nq, nk) = (d.batch * d.q_len * d.heads, d.batch * d.kv_len * d.heads);
                let q = uniform(&mut r, nq * d.head_dim, -2.0, 2.0);
                let k = uniform(&mut r, nk * d.head_dim, -2.0, 2.0);
                let v = uniform(&mut r, nk * d.v_head_dim, -1.0, 1.0);
                let rotated = |x: &[f32], len| {
                    let mut out = vec![0.0; x.len()];
                    crate::ops::rotary::rotary(&mut out, x, &table, len, d.heads).unwrap();
                    out
                };
                let (q_rot, k_rot) = (rotated(&q, d.q_len), rotated(&k, d.kv_len));
                let first = AttentionInputs {
                    head_major: false,
                    q: &q_rot,
                    k: &k_rot,
                    v: &v,
                    kv_lens: Some(&lens),
                    bias: None,
                    rope: None,
                };
                let inside = AttentionInputs {
                    head_major: false,
                    q: &q,
                    k: &k,
                    rope: Some(AttentionRope {
                        cos: table.cos(),
                        sin: table.sin(),
                    }),
                    ..first
                };
                let mut ws = vec![0.0; d.workspace_len(2)];
                if !rotates_inside(&d) {
                    // No bf16 products on this CPU: the rope is refused, never ignored.
                    let mut out = vec![0.0; nq * d.v_head_dim];
                    let mut lse = vec![0.0; d.batch * d.heads * d.q_len];
                    let run =
                        attention_with(&mut out, &mut lse, inside, &d, &mut ws, Products::Bf16);
                    assert!(run.unwrap_err().to_string().contains("rotary"));
                    continue;
                }
                let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                let run = |inp: AttentionInputs<'_>, ws: &mut [f32]| {
                    let mut out = vec![f32::NAN; nq * d.v_head_dim];
                    let mut lse = vec![f32::NAN; d.batch * d.heads * d.q_len];
                    attention_with(&mut out, &mut lse, inp, &d, ws, Products::Bf16).unwrap();
                    let mut out16 = vec![half::bf16::NAN; out.len()];
                    let mut lse16 = vec![f32::NAN; lse.len()];
                    attention_bf16_out(&mut out16, &mut lse16, inp, &d, ws).unwrap();
                    let out16: Vec<u16> = out16.iter().map(|v| v.to_bits()).collect();
                    (bits(&out), bits(&lse), out16, bits(&lse16))
                };
                let name = format!("{d:?} vector products {vector_products_only}");
                let (want, got) = (run(first, &mut ws), run(inside, &mut ws));
                assert!(want.0 == got.0, "{name}: f32 output");
                assert!(want.1 == got.1, "{name}: log-sum-exp");
                assert!(want.2 == got.2, "{name}: bf16 output");
                assert!(want.3 == got.3, "{name}: log-sum-exp of the bf16 output");
                // The same inputs laid out head-major give the same bits.
                let heads_first = |x: &[f32], len: usize, dim: usize| {
                    let mut out = vec![f32::NAN; x.len()];
                    for (row, values) in x.chunks(d.heads * dim).enumerate() {
                        let (b, l) = (row / len, row % len);
                        for (h, head) in values.chunks(dim).enumerate() {
                            let at = ((b * d.heads + h) * len + l) * dim;
                            out[at..at + dim].copy_from_slice(head);
                        }
                    }
                    out
                };
                let (qh, kh) = (
                    heads_first(&q, d.q_len, d.head_dim),
                    heads_first(&k, d.kv_len, d.head_dim),
                );
                let vh = heads_first(&v, d.kv_len, d.v_head_dim);
                let head_major = AttentionInputs {
                    q: &qh,
                    k: &kh,
                    v: &vh,
                    head_major: true,
                    ..inside
                };
                assert!(run(head_major, &mut ws) == want, "{name}: head-major rows");
                // Not a test that cannot fail: unrotated inputs give other outputs, and so do
                // head-major rows read as token-major ones.
                let misread = AttentionInputs {
                    head_major: false,
                    ..head_major
                };
                // (With one head both layouts are the same.)
                assert!(
                    d.heads == 1 || run(misread, &mut ws).0 != want.0,
                    "{name}: the layout matters"
                );
                let err = attention(
                    &mut vec![0.0; nq * d.v_head_dim],
                    &mut vec![0.0; d.batch * d.heads * d.q_len],
                    head_major,
                    &d,
                    &mut ws,
                )
                .unwrap_err();
                assert!(err.to_string().contains("head-major"), "{err}");
                let unrotated = AttentionInputs {
                    head_major: false,
                    rope: None,
                    ..inside
                };
                assert!(
                    run(unrotated, &mut ws).0 != want.0,
                    "{name}: rotation matters"
                );
                let mut out = vec![0.0; nq * d.v_head_dim];
                let mut lse = vec![0.0; d.batch * d.heads * d.q_len];
                let err = attention(&mut out, &mut lse, inside, &d, &mut ws).unwrap_err();
                assert!(err.to_string().contains("rotary"), "{err}");
                let (mut dq, mut dk, mut dv) =
                    (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
                let err = attention_backward(
                    &mut dq, &mut dk, &mut dv, None, &out, &out, &lse, inside, &d, &mut ws,
                )
                .unwrap_err();
                assert!(err.to_string().contains("rotary"), "{err}");
            }
        }
        bf16::VECTOR_PRODUCTS_ONLY.with(|only| only.set(false));
    }

    /// Tables that do not cover the positions, or an odd head dim, are errors naming the tables.
    #[test]
    fn rotary_tables_too_short_are_errors() {
        let d = AttentionDims::new(1, 1, 8, 8, 4);
        let x = vec![0.5; 8 * 4];
        let table = crate::ops::rotary::RotaryTable::new(7, 4, 1e4).unwrap();
        let inp = AttentionInputs {
            head_major: false,
            q: &x,
            k: &x,
            v: &x,
            kv_lens: None,
            bias: None,
            rope: Some(AttentionRope {
                cos: table.cos(),
                sin: table.sin(),
            }),
        };
        let (mut out, mut lse) = (vec![0.0; 8 * 4], vec![0.0; 8]);
        let mut ws = vec![0.0; d.workspace_len(1)];
        let err = attention_with(&mut out, &mut lse, inp, &d, &mut ws, Products::Bf16).unwrap_err();
        assert!(err.to_string().contains("cover 8 positions"), "{err}");
        let odd = AttentionDims::new(1, 1, 8, 8, 3);
        let y = vec![0.5; 8 * 3];
        let inp = AttentionInputs {
            head_major: false,
            q: &y,
            k: &y,
            v: &y,
            ..inp
        };
        let err = attention_with(&mut out[..24], &mut lse, inp, &odd, &mut ws, Products::Bf16)
            .unwrap_err();
        assert!(err.to_string().contains("even head dim"), "{err}");
    }

    /// A score bias keeps the f32 products, so a bf16 output is refused rather than written another way.
    #[test]
    fn bf16_output_with_a_bias_is_an_error() {
        let d = AttentionDims::new(1, 2, 3, 4, 8);
        let x = vec![0.5; 2 * 4 * 8];
        let bias = vec![0.0; 2 * 3 * 4];
        let inp = AttentionInputs {
            head_major: false,
            q: &x[..2 * 3 * 8],
            k: &x,
            v: &x,
            kv_lens: None,
            bias: Some(AttentionBias {
                data: &bias,
                per_batch: false,
            }),
            rope: None,
        };
        assert!(!writes_bf16(&inp, &d));
        let (mut out, mut lse) = (vec![half::bf16::ZERO; 2 * 3 * 8], vec![0.0; 2 * 3]);
        let mut ws = vec![0.0; d.workspace_len(1)];
        let err = attention_bf16_out(&mut out, &mut lse, inp, &d, &mut ws).unwrap_err();
        assert!(err.to_string().contains("attention"), "{err}");
    }

    #[test]
    fn bad_sizes_are_errors() {
        let d = AttentionDims::new(1, 1, 2, 2, 2);
        let x = vec![0.0; 4];
        let inp = AttentionInputs {
            head_major: false,
            q: &x,
            k: &x,
            v: &x,
            kv_lens: Some(&[3]),
            bias: None,
            rope: None,
        };
        let (mut out, mut lse, mut ws) =
            (vec![0.0; 4], vec![0.0; 2], vec![0.0; d.workspace_len(1)]);
        assert!(
            attention(&mut out, &mut lse, inp, &d, &mut ws).is_err(),
            "kv_lens past kv_len"
        );
        let inp = AttentionInputs {
            head_major: false,
            kv_lens: None,
            ..inp
        };
        assert!(
            attention(&mut out, &mut lse, inp, &d, &mut ws[..1]).is_err(),
            "workspace too small"
        );
        assert!(attention(&mut out, &mut lse, inp, &d, &mut ws).is_ok());
    }
}
