//! The two products of the bf16 attention forward ([`super::bf16`]) as `vdpbf16ps` vector code, for CPUs
//! with AVX512-BF16 but no AMX tiles (AMD Zen 4 and Zen 5): the same operands in the same layouts as the
//! tiles read, so the rest of the kernel (packing, online softmax, output) is shared and the results
//! agree with the tiles' to f32 summation order.
//!
//! A block's 32 query rows lie in the lanes of two vectors. Each `vdpbf16ps` adds two bf16 products into
//! every f32 lane: a pair of head-dim entries for the scores, a pair of keys for `P·V`. So a key's
//! scores over a head dim of `Dk` take `Dk` instructions for the 32 rows (`Dk / 2` pairs, two vectors),
//! against `2·Dk` f32 FMAs in the f32 lane kernel. The values enter in the two bf16 parts the tiles use
//! (`v ≈ hi + lo`), so `P·V` takes as many instructions as in f32: rounded once, as PyTorch's bf16 SDPA
//! does, the op ran 1.4× faster at NT-v2 shapes, but the tiny NT-v2 fixture's hidden states moved 1.09·10⁻²
//! from f32, past the 10⁻² that `tests/embed.rs` holds the bf16 backend to (9.9·10⁻³ with two parts).

use std::arch::x86_64::*;

/// Query rows of a block: the lanes of two vectors.
const ROWS: usize = 32;
/// f32 lanes of a vector.
const LANES: usize = 16;
/// Keys scored together: 16 independent accumulators, enough to cover `vdpbf16ps`'s latency.
const KEYS: usize = 8;

/// `s[j·32 + r] = Σ_p q[p·32 + r] ⊙ k[j·stride + p]` for keys `j < len` and rows `r < 32`: `q` holds the
/// block's queries as `pairs` lines of 32 words (rows in lanes, a pair of head-dim entries per word),
/// `k` each key's head-dim entries as pair words, `stride` words apart.
///
/// # Safety
/// AVX-512F and AVX512-BF16; `q` holds `32·pairs` words, `k` `(len − 1)·stride + pairs` words, `s`
/// `32·len` values.
#[target_feature(enable = "avx512f,avx512bf16")]
pub(super) unsafe fn scores(
    q: *const u32,
    k: *const u32,
    stride: usize,
    pairs: usize,
    len: usize,
    s: *mut f32,
) {
    // SAFETY (this function): every address is inside the caller's buffers by its contract.
    unsafe {
        let query = |p: usize, v: usize| -> __m512bh {
            std::mem::transmute(_mm512_loadu_si512(q.add(p * ROWS + v * LANES).cast()))
        };
        let key = |j: usize, p: usize| -> __m512bh {
            std::mem::transmute(_mm512_set1_epi32(*k.add(j * stride + p) as i32))
        };
        let full = len - len % KEYS;
        for j0 in (0..full).step_by(KEYS) {
            let mut acc = [[_mm512_setzero_ps(); 2]; KEYS];
            for p in 0..pairs {
                let (q0, q1) = (query(p, 0), query(p, 1));
                for (t, a) in acc.iter_mut().enumerate() {
                    let kp = key(j0 + t, p);
                    a[0] = _mm512_dpbf16_ps(a[0], q0, kp);
                    a[1] = _mm512_dpbf16_ps(a[1], q1, kp);
                }
            }
            for (t, a) in acc.iter().enumerate() {
                let dst = s.add((j0 + t) * ROWS);
                _mm512_storeu_ps(dst, a[0]);
                _mm512_storeu_ps(dst.add(LANES), a[1]);
            }
        }
        for j in full..len {
            let mut a = [_mm512_setzero_ps(); 2];
            for p in 0..pairs {
                let kp = key(j, p);
                a[0] = _mm512_dpbf16_ps(a[0], query(p, 0), kp);
                a[1] = _mm512_dpbf16_ps(a[1], query(p, 1), kp);
            }
            _mm512_storeu_ps(s.add(j * ROWS), a[0]);
            _mm512_storeu_ps(s.add(j * ROWS + LANES), a[1]);
        }
    }
}

/// `o[c·32 + r] (+)= Σ_l p[l·32 + r] ⊙ (hi + lo)[c·stride + l]` for value dims `c < dv` and rows `r < 32`,
/// over `lines` pair lines of probabilities (two keys a word, rows in lanes) and the two bf16 parts of
/// `Vᵀ`, rows `stride` words apart whose word `l` holds the same two keys. `o` is overwritten where
/// `first`, added to otherwise.
///
/// # Safety
/// AVX-512F and AVX512-BF16; `p` holds `32·lines` words, `hi` and `lo` `(dv − 1)·stride + lines` words
/// each, `o` `32·dv` values.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bf16")]
pub(super) unsafe fn values(
    p: *const u32,
    lines: usize,
    hi: *const u32,
    lo: *const u32,
    stride: usize,
    dv: usize,
    o: *mut f32,
    first: bool,
) {
    let mut c0 = 0;
    while c0 < dv {
        // SAFETY: columns c0.. of at most dv (caller's contract).
        c0 += unsafe {
            match dv - c0 {
                w if w >= 8 => values_columns::<8>(p, lines, hi, lo, stride, c0, o, first),
                w if w >= 4 => values_columns::<4>(p, lines, hi, lo, stride, c0, o, first),
                _ => values_columns::<1>(p, lines, hi, lo, stride, c0, o, first),
            }
        };
    }
}

/// [`values`] for the `W` value dims from `c0`, their `2·W` accumulators in registers. Returns `W`. Eight
/// dims at most: each reads two rows of `Vᵀ`, and with twelve (24 row addresses) the loop spilled them to
/// the stack (NT-v2 shapes: the op 66 ms with twelve, 60 ms with eight).
///
/// # Safety
/// As [`values`], with `c0 + W ≤ dv`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn values_columns<const W: usize>(
    p: *const u32,
    lines: usize,
    hi: *const u32,
    lo: *const u32,
    stride: usize,
    c0: usize,
    o: *mut f32,
    first: bool,
) -> usize {
    // SAFETY (this function): every address is inside the caller's buffers by its contract.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 2]; W];
        if !first {
            for (c, a) in acc.iter_mut().enumerate() {
                a[0] = _mm512_loadu_ps(o.add((c0 + c) * ROWS));
                a[1] = _mm512_loadu_ps(o.add((c0 + c) * ROWS + LANES));
            }
        }
        let word = |part: *const u32, c: usize, l: usize| -> __m512bh {
            std::mem::transmute(_mm512_set1_epi32(*part.add((c0 + c) * stride + l) as i32))
        };
        for l in 0..lines {
            let p0: __m512bh = std::mem::transmute(_mm512_loadu_si512(p.add(l * ROWS).cast()));
            let p1: __m512bh =
                std::mem::transmute(_mm512_loadu_si512(p.add(l * ROWS + LANES).cast()));
            for (c, a) in acc.iter_mut().enumerate() {
                for part in [hi, lo] {
                    let vc = word(part, c, l);
                    a[0] = _mm512_dpbf16_ps(a[0], p0, vc);
                    a[1] = _mm512_dpbf16_ps(a[1], p1, vc);
                }
            }
        }
        for (c, a) in acc.iter().enumerate() {
            _mm512_storeu_ps(o.add((c0 + c) * ROWS), a[0]);
            _mm512_storeu_ps(o.add((c0 + c) * ROWS + LANES), a[1]);
        }
    }
    W
}
