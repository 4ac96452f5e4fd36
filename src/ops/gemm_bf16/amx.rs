//! The AMX kernel (Intel Sapphire Rapids and later): `tdpbf16ps` multiplies a 16×32 bf16 tile of A by a
//! 32×16 bf16 tile of B (stored as 16 rows of k pairs) into a 16×16 f32 tile, 16,384 flops an instruction,
//! 16 times an AVX-512 `vdpbf16ps`.
//!
//! Eight tile registers hold a 32×32 block of C (four tiles), two tiles of A and two of B; each step of 32
//! k loads the four operand tiles and runs four products. The operands are packed so that every tile is
//! read as 16 rows of one 64-byte cache line each:
//! - **A** in strips of 16 rows, each `[k / 32][16 rows][32 k]` (one KiB a tile), zero-padded;
//! - **B** as the AVX-512 kernel packs it (32-column strips of k pairs, 128 bytes a pair): columns 0–15 of
//!   a strip are the first 64 bytes of each pair's line, columns 16–31 the second.
//!
//! The loops are BLIS-like: tasks own [`MC`]×[`NC`] blocks of C; within one, k runs in blocks of [`KC`]
//! and, for each 32-row pair of A strips (16 KiB at KC = 256, kept in L1), the 32-column strips of B stream
//! from L2. Partial sums across k-blocks go to an aligned f32 scratch block, so a bf16 output is rounded
//! once. Each element's summation order is fixed, so results do not depend on the thread count.
//!
//! Linux hands tile state to a process only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM)`); where that is
//! refused, or the CPU lacks AMX-BF16, [`available`] is false and the AVX-512 kernel runs instead.

use std::arch::asm;
use std::sync::OnceLock;

use half::bf16;
use rayon::prelude::*;

use super::shared::{for_each_block, pack_b, zero_product, Block, Output, NR, PACKED_A, PACKED_B};
use super::{GemmOut, Lhs, View};

/// Rows of an A tile (and of a C tile).
const TILE_ROWS: usize = 16;
/// k values per step: one A tile row of 64 bytes.
const TILE_K: usize = 32;
/// Rows of C per kernel call: two A tiles.
const MR: usize = 2 * TILE_ROWS;
/// k values per block.
const KC: usize = 256;
/// Rows per task (a multiple of [`MR`]).
const MC: usize = 256;
/// Columns per task (a multiple of [`NR`]).
const NC: usize = 256;

/// Whether this CPU has AMX-BF16 and the OS lets this process use the tile registers.
pub(super) fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| cpu_has_amx_bf16() && os_grants_tile_data())
}

fn cpu_has_amx_bf16() -> bool {
    use std::arch::x86_64::__cpuid_count;
    let (leaf1, leaf7) = (__cpuid_count(1, 0), __cpuid_count(7, 0));
    let amx_bf16 = leaf7.edx & (1 << 22) != 0;
    let amx_tile = leaf7.edx & (1 << 24) != 0;
    let osxsave = leaf1.ecx & (1 << 27) != 0;
    if !(amx_bf16 && amx_tile && osxsave) {
        return false;
    }
    let xcr0_low: u32;
    // SAFETY: XGETBV with ECX = 0 is valid when OSXSAVE is set (checked above).
    unsafe {
        asm!("xgetbv", in("ecx") 0u32, lateout("eax") xcr0_low, lateout("edx") _, options(nomem, nostack));
    }
    // XTILECFG (bit 17) and XTILEDATA (bit 18) enabled by the OS.
    xcr0_low & (0b11 << 17) == 0b11 << 17
}

#[cfg(target_os = "linux")]
fn os_grants_tile_data() -> bool {
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let ret: i64;
    // SAFETY: arch_prctl(ARCH_REQ_XCOMP_PERM) only asks the kernel for a permission; it reads and writes
    // no user memory. The syscall instruction clobbers rcx and r11.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret == 0
}

#[cfg(not(target_os = "linux"))]
fn os_grants_tile_data() -> bool {
    false
}

/// The tile configuration (palette 1): all eight tiles 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

const TILE_CONFIG: TileConfig = {
    let mut c = [0u8; 64];
    c[0] = 1;
    let mut t = 0;
    while t < 8 {
        c[16 + 2 * t] = 64; // bytes per row
        c[48 + t] = TILE_ROWS as u8;
        t += 1;
    }
    TileConfig(c)
};

/// Holds the tile configuration on this thread while alive.
struct Tiles;

impl Tiles {
    /// # Safety
    /// [`available`] must be true.
    unsafe fn configure() -> Tiles {
        // SAFETY: (caller) AMX is present and permitted; the configuration is valid for palette 1.
        unsafe {
            asm!("ldtilecfg [{}]", in(reg) TILE_CONFIG.0.as_ptr(), options(nostack, readonly))
        };
        Tiles
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: tiles were configured by `configure`, so AMX is present.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// Where the A tiles lie: tile `(strip, step)` (rows `16·strip..`, k `32·step..`) starts at
/// `base + strip·strip_bytes + step·step_bytes`, its 16 rows `row_bytes` apart.
#[derive(Clone, Copy)]
struct ATiles {
    base: *const u8,
    strip_bytes: usize,
    step_bytes: usize,
    row_bytes: usize,
}

impl ATiles {
    /// The packed tiles of [`pack_a`]: 1 KiB each, a strip's steps one after another.
    fn packed(packed: &[u16], steps: usize) -> Self {
        let tile_bytes = TILE_ROWS * TILE_K * 2;
        ATiles {
            base: packed.as_ptr().cast(),
            strip_bytes: steps * tile_bytes,
            step_bytes: tile_bytes,
            row_bytes: TILE_K * 2,
        }
    }

    /// The tiles read in place from contiguous bf16 rows, where no tile needs padding (m and k multiples
    /// of 32) and every tile row is one cache line (64-byte aligned start and row stride); None otherwise.
    fn in_place(a: Lhs<'_>, av: View) -> Option<Self> {
        let Lhs::Bf16(values) = a else { return None };
        let row_bytes = av.rs as usize * 2;
        let aligned = (values.as_ptr() as usize).is_multiple_of(64) && row_bytes.is_multiple_of(64);
        (av.cs == 1 && aligned && av.rows.is_multiple_of(MR) && av.cols.is_multiple_of(TILE_K))
            .then(|| ATiles {
                base: values.as_ptr().cast(),
                strip_bytes: TILE_ROWS * row_bytes,
                step_bytes: TILE_K * 2,
                row_bytes,
            })
    }

    fn tile(&self, strip: usize, step: usize) -> *const u8 {
        self.base
            .wrapping_add(strip * self.strip_bytes + step * self.step_bytes)
    }
}

// SAFETY: the tiles are only read, while the operand they point into is borrowed by the GEMM call.
unsafe impl Send for ATiles {}
unsafe impl Sync for ATiles {}

/// A 32×32 block of C over `steps` steps of 32 k: `c = (first ? 0 : c) + A·B`, with `c` an f32 block of
/// row stride `ldc`.
///
/// # Safety
/// Tiles configured ([`Tiles`]); `a0` and `a1` are A tiles of [`ATiles`] `a` with `steps` steps from
/// them inside the operand; `b` holds `steps` packed pair-lines of 16 pairs (2 KiB each); `c` addresses 32
/// rows of 32 values at stride `ldc`. B and C are 64-byte aligned.
#[allow(clippy::too_many_arguments)]
unsafe fn kernel(
    steps: usize,
    a: &ATiles,
    a0: *const u8,
    a1: *const u8,
    b: *const u16,
    c: *mut f32,
    ldc: usize,
    first: bool,
) {
    let ldc_bytes = ldc * 4;
    // SAFETY: (caller) every address below is inside the buffers described above.
    unsafe {
        let (c01, c10, c11) = (c.add(16), c.add(16 * ldc), c.add(16 * ldc + 16));
        if first {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
        } else {
            asm!(
                "tileloadd tmm0, [{c00} + {ldc}]",
                "tileloadd tmm1, [{c01} + {ldc}]",
                "tileloadd tmm2, [{c10} + {ldc}]",
                "tileloadd tmm3, [{c11} + {ldc}]",
                c00 = in(reg) c, c01 = in(reg) c01, c10 = in(reg) c10, c11 = in(reg) c11,
                ldc = in(reg) ldc_bytes,
                options(nostack, readonly)
            );
        }
        asm!(
            "2:",
            "tileloadd tmm4, [{a0} + {a_stride}]",
            "tileloadd tmm6, [{b0} + {b_stride}]",
            "tileloadd tmm7, [{b1} + {b_stride}]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tileloadd tmm5, [{a1} + {a_stride}]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {a0}, {a_step}",
            "add {a1}, {a_step}",
            "add {b0}, 2048",
            "add {b1}, 2048",
            "dec {steps}",
            "jnz 2b",
            "tilestored [{c00} + {ldc}], tmm0",
            "tilestored [{c01} + {ldc}], tmm1",
            "tilestored [{c10} + {ldc}], tmm2",
            "tilestored [{c11} + {ldc}], tmm3",
            a0 = inout(reg) a0 => _,
            a1 = inout(reg) a1 => _,
            b0 = inout(reg) b => _,
            b1 = inout(reg) b.add(NR) => _,
            steps = inout(reg) steps => _,
            a_stride = in(reg) a.row_bytes,
            a_step = in(reg) a.step_bytes,
            b_stride = in(reg) 4 * NR,
            c00 = in(reg) c, c01 = in(reg) c01, c10 = in(reg) c10, c11 = in(reg) c11,
            ldc = in(reg) ldc_bytes,
            options(nostack)
        );
    }
}

/// Packs all of A into tiles: strip `s` (rows `16s..16s+16`, zero past m) is `steps` tiles of 16 rows ×
/// 32 k (zero past k), f32 values rounded to bf16.
fn pack_a(packed: &mut [u16], a: Lhs<'_>, av: View, steps: usize) {
    packed
        .par_chunks_mut(steps * TILE_ROWS * TILE_K)
        .take(av.rows.div_ceil(MR) * MR / TILE_ROWS)
        .enumerate()
        // SAFETY: AMX implies the AVX-512 features (checked with it, `has_native_bf16`).
        .for_each(|(s, strip)| unsafe { pack_a_strip(strip, s, a, av, steps) });
}

/// Strip `s` of [`pack_a`], compiled for AVX-512 so that the copies and roundings vectorise.
///
/// # Safety
/// AVX-512F, BW, VL and DQ.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
unsafe fn pack_a_strip(strip: &mut [u16], s: usize, a: Lhs<'_>, av: View, steps: usize) {
    let (m, k) = (av.rows, av.cols);
    let tile = TILE_ROWS * TILE_K;
    for r in 0..TILE_ROWS {
        let i = s * TILE_ROWS + r;
        let row_at = i * av.rs as usize;
        for st in 0..steps {
            let out = &mut strip[st * tile + r * TILE_K..][..TILE_K];
            let (k0, k1) = (st * TILE_K, ((st + 1) * TILE_K).min(k));
            if i >= m || k0 >= k {
                out.fill(0);
                continue;
            }
            let width = k1 - k0;
            match a {
                Lhs::Bf16(a) if av.cs == 1 => {
                    let src = &a[row_at + k0..][..width];
                    out.iter_mut().zip(src).for_each(|(o, v)| *o = v.to_bits());
                }
                Lhs::F32(a) if av.cs == 1 => {
                    let src = &a[row_at + k0..][..width];
                    let round = crate::ops::simd::bf16_bits;
                    out.iter_mut().zip(src).for_each(|(o, v)| *o = round(*v));
                }
                _ => {
                    for (kk, o) in out[..width].iter_mut().enumerate() {
                        *o = a.bits(row_at + (k0 + kk) * av.cs as usize);
                    }
                }
            }
            out[width..].fill(0);
        }
    }
}

/// # Safety
/// [`available`] must be true.
pub(super) unsafe fn gemm(out: GemmOut<'_>, a: Lhs<'_>, av: View, b: &[bf16], bv: View) {
    let (m, n, k) = (av.rows, bv.cols, av.cols);
    if k == 0 {
        return zero_product(out, n);
    }
    let steps = k.div_ceil(TILE_K);
    let pairs = steps * TILE_K / 2;
    let mut packed_b = PACKED_B.take(n.div_ceil(NR) * pairs * NR * 2 * 2);
    pack_b(bytemuck::cast_slice_mut(&mut packed_b), b, bv, pairs);
    // Contiguous bf16 rows that need no padding are read in place; anything else is packed.
    let in_place = ATiles::in_place(a, av);
    let a_tiles = m.div_ceil(MR) * MR / TILE_ROWS * steps;
    let mut packed_a = PACKED_A.take(if in_place.is_some() {
        0
    } else {
        a_tiles * TILE_ROWS * TILE_K * 2
    });
    let a_tiles = in_place.unwrap_or_else(|| {
        let packed: &mut [u16] = bytemuck::cast_slice_mut(&mut packed_a);
        pack_a(packed, a, av, steps);
        ATiles::packed(packed, steps)
    });
    let b_values: &[u16] = bytemuck::cast_slice(&packed_b);
    let output = Output::new(out, n);
    let fill = |block: &Block, sums: &mut [f32]| {
        let Block {
            r0,
            c0,
            rows_pad,
            cols_pad,
        } = *block;
        // SAFETY: (caller) AMX is available. The tiles are released when `_tiles` drops, before the
        // sums are moved out.
        let _tiles = unsafe { Tiles::configure() };
        // Every sum is written by the first k-block's kernels (`first`).
        let mut s0 = 0;
        while s0 < steps {
            let ns = (steps - s0).min(KC / TILE_K);
            for is in 0..rows_pad / MR {
                let strip = (r0 + is * MR) / TILE_ROWS;
                for js in 0..cols_pad / NR {
                    let b_at = ((c0 / NR + js) * pairs + s0 * TILE_K / 2) * NR * 2;
                    // SAFETY: tiles are configured; A strips `strip` and `strip + 1` exist (A is
                    // padded, or in place, to a multiple of 32 rows) and hold `steps` tiles, B
                    // strips hold `pairs` pairs, so `ns` steps from `s0` are inside both; the 32×32
                    // block lies inside `sums`; the B pack and `sums` start on cache lines, and the
                    // offsets are multiples of 64 bytes.
                    unsafe {
                        kernel(
                            ns,
                            &a_tiles,
                            a_tiles.tile(strip, s0),
                            a_tiles.tile(strip + 1, s0),
                            b_values.as_ptr().add(b_at),
                            sums.as_mut_ptr().add(is * MR * cols_pad + js * NR),
                            cols_pad,
                            s0 == 0,
                        )
                    }
                }
            }
            s0 += ns;
        }
    };
    // SAFETY: AMX implies the AVX-512 features (checked with it, `has_native_bf16`).
    unsafe { for_each_block(&output, (m, n), (MC, NC), (MR, NR), fill) };
    PACKED_A.give_back(packed_a);
    PACKED_B.give_back(packed_b);
}
