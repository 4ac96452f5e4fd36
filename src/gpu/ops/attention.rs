//! Attention launchers (`kernels/attention.cu`): flash attention forward and backward, Enformer's relative-position logits and their gradients.

use super::*;

const FA_DVC: usize = 64;

const FA_BC: usize = 32;

const FA_BR: usize = 64;

/// Shape of an attention call on the GPU (same meaning as [`crate::ops::attention::AttentionDims`]).
pub use crate::ops::attention::AttentionDims;

/// Dynamic shared memory of `flash_attention_forward_bf16` for head dim `d`.
pub fn flash_forward_smem_bytes(d: usize) -> usize {
    let d = d.div_ceil(16) * 16;
    (FA_BR * d + FA_BC * d + FA_BC * FA_DVC) * BF16
        + FA_BR * FA_BC * F32
        + FA_BR * FA_BC * BF16
        + FA_BR * FA_DVC * F32
        + 2 * FA_BR * F32
}

/// Flash attention forward. `kv_lens` (i32 per batch) and `bias` (f32 `[1 or B, H, Lq, Lk]`) are optional.
pub fn flash_attention_forward<D: KernelDevice>(
    dev: &D,
    out: &dyn DeviceBuffer,
    lse: &dyn DeviceBuffer,
    q: &dyn DeviceBuffer,
    k: &dyn DeviceBuffer,
    v: &dyn DeviceBuffer,
    kv_lens: Option<&dyn DeviceBuffer>,
    bias: Option<(&dyn DeviceBuffer, bool)>,
    d: &AttentionDims,
) -> Result<()> {
    const OP: &str = "flash_attention_forward";
    if d.head_dim == 0 || d.v_head_dim == 0 {
        return Err(crate::Error::invalid(OP, "head dims must be positive"));
    }
    let (b, h) = (d.batch, d.heads);
    check_bf16(OP, "q", q, b * d.q_len * h * d.head_dim)?;
    check_bf16(OP, "k", k, b * d.kv_len * h * d.head_dim)?;
    check_bf16(OP, "v", v, b * d.kv_len * h * d.v_head_dim)?;
    check_bf16(OP, "out", out, b * d.q_len * h * d.v_head_dim)?;
    check_len(OP, "lse (bytes)", lse.len_bytes(), b * h * d.q_len * F32)?;
    if let Some(l) = kv_lens {
        check_len(OP, "kv_lens (bytes)", l.len_bytes(), b * 4)?;
    }
    if let Some((bias, per_batch)) = bias {
        check_len(
            OP,
            "bias (bytes)",
            bias.len_bytes(),
            if per_batch { b } else { 1 } * h * d.q_len * d.kv_len * F32,
        )?;
    }
    let cfg = LaunchConfig {
        grid: [
            d.q_len.div_ceil(FA_BR).max(1) as u32,
            (b * h) as u32,
            d.v_head_dim.div_ceil(FA_DVC) as u32,
        ],
        block: [128, 1, 1],
        shared_bytes: flash_forward_smem_bytes(d.head_dim) as u32,
    };
    let args = [
        ptr(out),
        ptr(lse),
        ptr(q),
        ptr(k),
        ptr(v),
        Arg::Ptr(kv_lens.map_or(0, |l| l.ptr())),
        Arg::Ptr(bias.map_or(0, |(x, _)| x.ptr())),
        Arg::I32(bias.is_some_and(|(_, p)| p) as i32),
        Arg::I32(h as i32),
        Arg::I32(d.q_len as i32),
        Arg::I32(d.kv_len as i32),
        Arg::I32(d.head_dim as i32),
        Arg::I32(d.v_head_dim as i32),
        Arg::F32(d.scale),
    ];
    launch(dev, "flash_attention_forward_bf16", cfg, &args)
}

/// Scratch bytes [`flash_attention_backward`] needs: the row dots D, and a per-batch dbias when the bias
/// is broadcast over the batch.
pub fn flash_backward_scratch_bytes(d: &AttentionDims, broadcast_dbias: bool) -> usize {
    let rowdot = d.batch * d.heads * d.q_len * F32;
    rowdot
        + if broadcast_dbias {
            d.batch * d.heads * d.q_len * d.kv_len * F32
        } else {
            0
        }
}

/// Flash attention backward: adds into `dq`, `dk`, `dv` (bf16) and, when given, `dbias` (f32, laid out like
/// the bias: per batch, or broadcast and summed over the batch in order).
pub fn flash_attention_backward<D: KernelDevice>(
    dev: &D,
    dq: &dyn DeviceBuffer,
    dk: &dyn DeviceBuffer,
    dv: &dyn DeviceBuffer,
    dbias: Option<&dyn DeviceBuffer>,
    scratch: &dyn DeviceBuffer,
    dout: &dyn DeviceBuffer,
    out: &dyn DeviceBuffer,
    lse: &dyn DeviceBuffer,
    q: &dyn DeviceBuffer,
    k: &dyn DeviceBuffer,
    v: &dyn DeviceBuffer,
    kv_lens: Option<&dyn DeviceBuffer>,
    bias: Option<(&dyn DeviceBuffer, bool)>,
    d: &AttentionDims,
) -> Result<()> {
    const OP: &str = "flash_attention_backward";
    if d.head_dim == 0 || d.v_head_dim == 0 {
        return Err(crate::Error::invalid(OP, "head dims must be positive"));
    }
    let (b, h) = (d.batch, d.heads);
    for (name, buf, n) in [
        ("q", q, b * d.q_len * h * d.head_dim),
        ("dq", dq, b * d.q_len * h * d.head_dim),
        ("k", k, b * d.kv_len * h * d.head_dim),
        ("dk", dk, b * d.kv_len * h * d.head_dim),
        ("v", v, b * d.kv_len * h * d.v_head_dim),
        ("dv", dv, b * d.kv_len * h * d.v_head_dim),
        ("out", out, b * d.q_len * h * d.v_head_dim),
        ("dout", dout, b * d.q_len * h * d.v_head_dim),
    ] {
        check_bf16(OP, name, buf, n)?;
    }
    check_len(OP, "lse (bytes)", lse.len_bytes(), b * h * d.q_len * F32)?;
    let broadcast = bias.is_some_and(|(_, per_batch)| !per_batch);
    if dbias.is_some() && bias.is_none() {
        return Err(crate::Error::invalid(OP, "dbias given without a bias"));
    }
    if let (Some(db), Some((_, per_batch))) = (dbias, bias) {
        check_len(
            OP,
            "dbias (bytes)",
            db.len_bytes(),
            if per_batch { b } else { 1 } * h * d.q_len * d.kv_len * F32,
        )?;
    }
    check_len(
        OP,
        "scratch (bytes)",
        scratch.len_bytes(),
        flash_backward_scratch_bytes(d, broadcast && dbias.is_some()),
    )?;
    let rowdot = scratch.ptr();
    let rows = b * d.q_len * h;
    launch(
        dev,
        "flash_attention_backward_rowdot_bf16",
        LaunchConfig::linear(rows.div_ceil(4).max(1) as u32, 128, 0),
        &[
            Arg::Ptr(rowdot),
            ptr(dout),
            ptr(out),
            Arg::I32(b as i32),
            Arg::I32(h as i32),
            Arg::I32(d.q_len as i32),
            Arg::I32(d.v_head_dim as i32),
        ],
    )?;
    let (dk_dim, dv_dim) = (d.head_dim, d.v_head_dim);
    // Shared-memory tiles are padded to multiples of 16 (the WMMA tile).
    let (dkp, dvp) = (dk_dim.div_ceil(16) * 16, dv_dim.div_ceil(16) * 16);
    let common = [
        ptr(q),
        ptr(k),
        ptr(v),
        ptr(dout),
        ptr(lse),
        Arg::Ptr(rowdot),
        Arg::Ptr(kv_lens.map_or(0, |l| l.ptr())),
        Arg::Ptr(bias.map_or(0, |(x, _)| x.ptr())),
        Arg::I32(bias.is_some_and(|(_, p)| p) as i32),
        Arg::I32(h as i32),
        Arg::I32(d.q_len as i32),
        Arg::I32(d.kv_len as i32),
        Arg::I32(dk_dim as i32),
        Arg::I32(dv_dim as i32),
        Arg::F32(d.scale),
    ];
    let smem_kv = (2 * FB * dkp + 2 * FB * dvp + 4 * FB * FB) * BF16
        + (FB * dkp + FB * dvp + 2 * FB * FB) * F32;
    let cfg = LaunchConfig {
        grid: [d.kv_len.div_ceil(FB).max(1) as u32, (b * h) as u32, 1],
        block: [32, 1, 1],
        shared_bytes: smem_kv as u32,
    };
    let mut args = vec![ptr(dk), ptr(dv)];
    args.extend_from_slice(&common);
    launch(dev, "flash_attention_backward_dkdv_bf16", cfg, &args)?;
    // dbias goes straight to the output when it is per batch; a broadcast bias sums a per-batch scratch.
    let per_batch_scratch = scratch.ptr() + (b * h * d.q_len * F32) as u64;
    let dbias_ptr = match dbias {
        Some(db) if !broadcast => db.ptr(),
        Some(_) => {
            let n = b * h * d.q_len * d.kv_len;
            launch(
                dev,
                "fill_f32",
                elementwise_config(n),
                &[
                    Arg::Ptr(per_batch_scratch),
                    Arg::F32(0.0),
                    Arg::I64(n as i64),
                ],
            )?;
            per_batch_scratch
        }
        None => 0,
    };
    let smem_q =
        (2 * FB * dkp + 2 * FB * dvp + 2 * FB * FB) * BF16 + (FB * dkp + 2 * FB * FB) * F32;
    let cfg = LaunchConfig {
        grid: [d.q_len.div_ceil(FB).max(1) as u32, (b * h) as u32, 1],
        block: [32, 1, 1],
        shared_bytes: smem_q as u32,
    };
    let mut args = vec![ptr(dq), Arg::Ptr(dbias_ptr)];
    args.extend_from_slice(&common);
    launch(dev, "flash_attention_backward_dq_bf16", cfg, &args)?;
    if let (Some(db), true) = (dbias, broadcast) {
        let n = h * d.q_len * d.kv_len;
        launch(
            dev,
            "sum_over_batch_f32",
            elementwise_config(n),
            &[
                ptr(db),
                Arg::Ptr(per_batch_scratch),
                Arg::I32(b as i32),
                Arg::I64(n as i64),
            ],
        )?;
    }
    Ok(())
}

/// Enformer's relative-position attention bias `[B, H, n, n]` (f32) from `q_pos [B, n, H, dk]` and
/// `rel_k [2n−1, H, dk]` (bf16).
pub fn relative_logits<D: KernelDevice>(
    dev: &D,
    bias: &dyn DeviceBuffer,
    q_pos: &dyn DeviceBuffer,
    rel_k: &dyn DeviceBuffer,
    batch: usize,
    heads: usize,
    n: usize,
    dk: usize,
) -> Result<()> {
    check_len(
        "relative_logits",
        "bias (bytes)",
        bias.len_bytes(),
        batch * heads * n * n * F32,
    )?;
    check_bf16("relative_logits", "q_pos", q_pos, batch * n * heads * dk)?;
    check_bf16("relative_logits", "rel_k", rel_k, (2 * n - 1) * heads * dk)?;
    let args = [
        ptr(bias),
        ptr(q_pos),
        ptr(rel_k),
        Arg::I32(batch as i32),
        Arg::I32(heads as i32),
        Arg::I32(n as i32),
        Arg::I32(dk as i32),
    ];
    launch(
        dev,
        "relative_logits_f32",
        elementwise_config(batch * heads * n * n),
        &args,
    )
}

/// `out[j] += Σ_b input[b·n + j]` over `batch` blocks of `n` f32 values, in order (`batch = 1`: `out += input`).
pub fn sum_over_batch<D: KernelDevice>(
    dev: &D,
    out: &dyn DeviceBuffer,
    input: &dyn DeviceBuffer,
    batch: usize,
    n: usize,
) -> Result<()> {
    check_len("sum_over_batch", "out (bytes)", out.len_bytes(), n * F32)?;
    check_len(
        "sum_over_batch",
        "input (bytes)",
        input.len_bytes(),
        batch * n * F32,
    )?;
    launch(
        dev,
        "sum_over_batch_f32",
        elementwise_config(n),
        &[
            ptr(out),
            ptr(input),
            Arg::I32(batch as i32),
            Arg::I64(n as i64),
        ],
    )
}

/// Gradients of [`relative_logits`], added into bf16 `dq_pos [B, n, H, dk]` and `drel_k [2n−1, H, dk]` from
/// the f32 `dbias [B, H, n, n]`.
pub fn relative_logits_backward<D: KernelDevice>(
    dev: &D,
    dq_pos: &dyn DeviceBuffer,
    drel_k: &dyn DeviceBuffer,
    dbias: &dyn DeviceBuffer,
    q_pos: &dyn DeviceBuffer,
    rel_k: &dyn DeviceBuffer,
    batch: usize,
    heads: usize,
    n: usize,
    dk: usize,
) -> Result<()> {
    const OP: &str = "relative_logits_backward";
    if n == 0 {
        return Err(crate::Error::invalid(OP, "empty sequence"));
    }
    check_bf16(OP, "dq_pos", dq_pos, batch * n * heads * dk)?;
    check_bf16(OP, "q_pos", q_pos, batch * n * heads * dk)?;
    check_bf16(OP, "drel_k", drel_k, (2 * n - 1) * heads * dk)?;
    check_bf16(OP, "rel_k", rel_k, (2 * n - 1) * heads * dk)?;
    check_len(
        OP,
        "dbias (bytes)",
        dbias.len_bytes(),
        batch * heads * n * n * F32,
    )?;
    let geo = [
        Arg::I32(batch as i32),
        Arg::I32(heads as i32),
        Arg::I32(n as i32),
        Arg::I32(dk as i32),
    ];
    launch(
        dev,
        "relative_logits_backward_q_bf16",
        elementwise_config(batch * n * heads * dk),
        &[&[ptr(dq_pos), ptr(dbias), ptr(rel_k)][..], &geo].concat(),
    )?;
    launch(
        dev,
        "relative_logits_backward_k_bf16",
        elementwise_config((2 * n - 1) * heads * dk),
        &[&[ptr(drel_k), ptr(dbias), ptr(q_pos)][..], &geo].concat(),
    )
}

const FB: usize = 16;
