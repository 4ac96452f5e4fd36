//! AMX tiles (Intel Sapphire Rapids and later), shared by the bf16 GEMM and the bf16 attention: detection,
//! the tile configuration, and one product, a 32×32 f32 block of `C += A·B` on four tiles (and its upper
//! half on two, for an odd last strip of A).
//!
//! `tdpbf16ps` multiplies a 16×32 bf16 tile of A by a 32×16 bf16 tile of B (stored as 16 rows of k pairs)
//! into a 16×16 f32 tile, 16,384 flops an instruction, 16 times an AVX-512 `vdpbf16ps`. Operands are laid
//! out so that every tile is read as 16 rows of one 64-byte cache line each:
//! - **A** ([`ATiles`]): rows of bf16 values, 32 k per tile row, at any row stride;
//! - **B**: 32-column strips of k pairs, one 128-byte line a pair (`(b[2p][j], b[2p+1][j])` for the 32
//!   columns j, the layout the AVX-512 `vdpbf16ps` kernel packs too); columns 0–15 of a strip are the first
//!   64 bytes of each pair's line, columns 16–31 the second, and a step of 32 k is 16 lines (2 KiB).
//!
//! Linux hands tile state to a process only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM)`); where that is
//! refused, or the CPU lacks AMX-BF16, [`available`] is false and callers use their AVX-512 paths.

use std::arch::asm;
use std::sync::OnceLock;

/// Rows of an A tile (and of a C tile).
pub(crate) const TILE_ROWS: usize = 16;
/// k values per step: one A tile row of 64 bytes.
pub(crate) const TILE_K: usize = 32;
/// Rows and columns of the C block of [`block_32x32`].
pub(crate) const BLOCK: usize = 2 * TILE_ROWS;
/// Bytes of B per step of 32 k: 16 pair lines of 128 bytes.
const B_STEP_BYTES: usize = TILE_K / 2 * BLOCK * 4;

/// Whether this CPU has AMX-BF16 and the OS lets this process use the tile registers.
pub(crate) fn available() -> bool {
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
pub(crate) struct Tiles;

impl Tiles {
    /// # Safety
    /// [`available`] must be true.
    pub(crate) unsafe fn configure() -> Tiles {
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
pub(crate) struct ATiles {
    pub(crate) base: *const u8,
    pub(crate) strip_bytes: usize,
    pub(crate) step_bytes: usize,
    pub(crate) row_bytes: usize,
}

impl ATiles {
    /// The packed tiles of [`pack_a`]: 1 KiB each, a strip's steps one after another.
    pub(crate) fn packed(packed: &[u16], steps: usize) -> Self {
        let tile_bytes = TILE_ROWS * TILE_K * 2;
        ATiles {
            base: packed.as_ptr().cast(),
            strip_bytes: steps * tile_bytes,
            step_bytes: tile_bytes,
            row_bytes: TILE_K * 2,
        }
    }

    pub(crate) fn tile(&self, strip: usize, step: usize) -> *const u8 {
        self.base
            .wrapping_add(strip * self.strip_bytes + step * self.step_bytes)
    }
}

// SAFETY: the tiles are only read, while the caller keeps the operand they point into borrowed.
unsafe impl Send for ATiles {}
unsafe impl Sync for ATiles {}

/// Each step of the blocks below also prefetches the next step's 32 lines of B into L1, in two halves spread
/// over the step's tile loads: B streams from L2, and a tile load that misses L1 stalls the tile unit
/// (without it the kernel ran 3–39% slower, most when the neighbours of this VM were busy). A prefetch past
/// the end of the pack is harmless: prefetches never fault.
macro_rules! prefetch_next_b_first_half {
    () => {
        concat!(
            "prefetcht0 [{b0} + {pfd}]\n",
            "prefetcht0 [{b0} + {pfd} + 64]\n",
            "prefetcht0 [{b0} + {pfd} + 128]\n",
            "prefetcht0 [{b0} + {pfd} + 192]\n",
            "prefetcht0 [{b0} + {pfd} + 256]\n",
            "prefetcht0 [{b0} + {pfd} + 320]\n",
            "prefetcht0 [{b0} + {pfd} + 384]\n",
            "prefetcht0 [{b0} + {pfd} + 448]\n",
            "prefetcht0 [{b0} + {pfd} + 512]\n",
            "prefetcht0 [{b0} + {pfd} + 576]\n",
            "prefetcht0 [{b0} + {pfd} + 640]\n",
            "prefetcht0 [{b0} + {pfd} + 704]\n",
            "prefetcht0 [{b0} + {pfd} + 768]\n",
            "prefetcht0 [{b0} + {pfd} + 832]\n",
            "prefetcht0 [{b0} + {pfd} + 896]\n",
            "prefetcht0 [{b0} + {pfd} + 960]\n",
        )
    };
}

/// The second half of [`prefetch_next_b_first_half`]'s lines.
macro_rules! prefetch_next_b_second_half {
    () => {
        concat!(
            "prefetcht0 [{b0} + {pfd} + 1024]\n",
            "prefetcht0 [{b0} + {pfd} + 1088]\n",
            "prefetcht0 [{b0} + {pfd} + 1152]\n",
            "prefetcht0 [{b0} + {pfd} + 1216]\n",
            "prefetcht0 [{b0} + {pfd} + 1280]\n",
            "prefetcht0 [{b0} + {pfd} + 1344]\n",
            "prefetcht0 [{b0} + {pfd} + 1408]\n",
            "prefetcht0 [{b0} + {pfd} + 1472]\n",
            "prefetcht0 [{b0} + {pfd} + 1536]\n",
            "prefetcht0 [{b0} + {pfd} + 1600]\n",
            "prefetcht0 [{b0} + {pfd} + 1664]\n",
            "prefetcht0 [{b0} + {pfd} + 1728]\n",
            "prefetcht0 [{b0} + {pfd} + 1792]\n",
            "prefetcht0 [{b0} + {pfd} + 1856]\n",
            "prefetcht0 [{b0} + {pfd} + 1920]\n",
            "prefetcht0 [{b0} + {pfd} + 1984]\n",
        )
    };
}

/// What a 32×32 block of C starts from before [`block_32x32`] adds its product.
#[derive(Clone, Copy)]
pub(crate) enum Init {
    /// Zero.
    Zero,
    /// The values in `c`.
    Load,
    /// The same 32 values in every row (a bias): row stride 0 from this address, 32 f32 values.
    Broadcast(*const f32),
}

impl Init {
    /// The same start for the block `columns` further right.
    pub(crate) fn at_column(self, columns: usize) -> Init {
        match self {
            Init::Broadcast(row) => Init::Broadcast(row.wrapping_add(columns)),
            other => other,
        }
    }
}

/// Starts the accumulator tiles `$left` and `$right` (16 rows each, columns 0–15 and 16–31 of C from `$c`,
/// row stride `$ldc` bytes) as [`Init`] says.
macro_rules! start_tiles {
    ($init:expr, $left:literal, $right:literal, $c:expr, $ldc:expr) => {
        match $init {
            Init::Zero => asm!(
                concat!("tilezero ", $left),
                concat!("tilezero ", $right),
                options(nostack, nomem)
            ),
            Init::Load => asm!(
                concat!("tileloadd ", $left, ", [{left} + {ldc}]"),
                concat!("tileloadd ", $right, ", [{right} + {ldc}]"),
                left = in(reg) $c, right = in(reg) $c.add(16), ldc = in(reg) $ldc,
                options(nostack, readonly)
            ),
            // A row stride of zero loads the same 16 values into each of a tile's 16 rows.
            Init::Broadcast(row) => asm!(
                concat!("tileloadd ", $left, ", [{left} + {zero}]"),
                concat!("tileloadd ", $right, ", [{right} + {zero}]"),
                left = in(reg) row, right = in(reg) row.add(16), zero = in(reg) 0usize,
                options(nostack, readonly)
            ),
        }
    };
}

/// A 32×32 block of C over `steps` steps of 32 k: `c = init + A·B`, with `c` an f32 block of row stride
/// `ldc`.
///
/// # Safety
/// Tiles configured ([`Tiles`]); `a0` and `a1` are A tiles of [`ATiles`] `a` with `steps` steps from
/// them inside the operand; `b` holds `steps` packed pair-lines of 16 pairs (2 KiB each); `c` addresses 32
/// rows of 32 values at stride `ldc`; an [`Init::Broadcast`] address holds 32 values. B is 64-byte
/// aligned; C is at least 4-byte aligned (a C row that straddles cache lines costs time, not
/// correctness).
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn block_32x32(
    steps: usize,
    a: &ATiles,
    a0: *const u8,
    a1: *const u8,
    b: *const u16,
    c: *mut f32,
    ldc: usize,
    init: Init,
) {
    let ldc_bytes = ldc * 4;
    // SAFETY: (caller) every address below is inside the buffers described above.
    unsafe {
        let (c01, c10, c11) = (c.add(16), c.add(16 * ldc), c.add(16 * ldc + 16));
        start_tiles!(init, "tmm0", "tmm1", c, ldc_bytes);
        start_tiles!(init, "tmm2", "tmm3", c10, ldc_bytes);
        asm!(
            "2:",
            prefetch_next_b_first_half!(),
            "tileloadd tmm4, [{a0} + {a_stride}]",
            "tileloadd tmm6, [{b0} + {b_stride}]",
            "tileloadd tmm7, [{b1} + {b_stride}]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tileloadd tmm5, [{a1} + {a_stride}]",
            prefetch_next_b_second_half!(),
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {a0}, {a_step}",
            "add {a1}, {a_step}",
            "add {b0}, {b_step}",
            "add {b1}, {b_step}",
            "dec {steps}",
            "jnz 2b",
            "tilestored [{c00} + {ldc}], tmm0",
            "tilestored [{c01} + {ldc}], tmm1",
            "tilestored [{c10} + {ldc}], tmm2",
            "tilestored [{c11} + {ldc}], tmm3",
            a0 = inout(reg) a0 => _,
            a1 = inout(reg) a1 => _,
            b0 = inout(reg) b => _,
            b1 = inout(reg) b.add(BLOCK) => _,
            steps = inout(reg) steps => _,
            a_stride = in(reg) a.row_bytes,
            a_step = in(reg) a.step_bytes,
            b_step = in(reg) B_STEP_BYTES,
            b_stride = in(reg) 4 * BLOCK,
            c00 = in(reg) c, c01 = in(reg) c01, c10 = in(reg) c10, c11 = in(reg) c11,
            ldc = in(reg) ldc_bytes,
            pfd = const B_STEP_BYTES,
            options(nostack)
        );
    }
}

/// The upper half of [`block_32x32`]: a 16×32 block of C from one strip of A, for an odd last strip (a
/// head dim of 48 in the attention's `Vᵀ·Pᵀ`), where the second strip would multiply zeros.
///
/// # Safety
/// As [`block_32x32`], for the 16 rows of `c` and the one A tile `a0`.
pub(crate) unsafe fn block_16x32(
    steps: usize,
    a: &ATiles,
    a0: *const u8,
    b: *const u16,
    c: *mut f32,
    ldc: usize,
    init: Init,
) {
    let ldc_bytes = ldc * 4;
    // SAFETY: (caller) every address below is inside the buffers described above.
    unsafe {
        let c01 = c.add(16);
        start_tiles!(init, "tmm0", "tmm1", c, ldc_bytes);
        asm!(
            "2:",
            prefetch_next_b_first_half!(),
            "tileloadd tmm4, [{a0} + {a_stride}]",
            "tileloadd tmm6, [{b0} + {b_stride}]",
            "tileloadd tmm7, [{b1} + {b_stride}]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            prefetch_next_b_second_half!(),
            "tdpbf16ps tmm1, tmm4, tmm7",
            "add {a0}, {a_step}",
            "add {b0}, {b_step}",
            "add {b1}, {b_step}",
            "dec {steps}",
            "jnz 2b",
            "tilestored [{c00} + {ldc}], tmm0",
            "tilestored [{c01} + {ldc}], tmm1",
            a0 = inout(reg) a0 => _,
            b0 = inout(reg) b => _,
            b1 = inout(reg) b.add(BLOCK) => _,
            steps = inout(reg) steps => _,
            a_stride = in(reg) a.row_bytes,
            a_step = in(reg) a.step_bytes,
            b_step = in(reg) B_STEP_BYTES,
            b_stride = in(reg) 4 * BLOCK,
            c00 = in(reg) c, c01 = in(reg) c01,
            ldc = in(reg) ldc_bytes,
            pfd = const B_STEP_BYTES,
            options(nostack)
        );
    }
}
