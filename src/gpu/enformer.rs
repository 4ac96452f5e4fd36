//! The Enformer trunk on a [`KernelDevice`] (inference, bf16 activations): the same parameters and layout as
//! [`EnformerTrunk`], run with the GPU kernels: im2col + GEMM convolutions, batchnorm, GELUσ, attention
//! pooling, the relative-position transformer (its bias computed by a kernel, attention by the flash
//! kernel), the crop and the final pointwise block.

// Kernel-style helpers pass buffers and geometry explicitly.
#![allow(clippy::too_many_arguments)]

use std::collections::HashMap;

use half::bf16;

use super::{ops, KernelDevice, KernelDeviceExt, MatmulDims};
use crate::models::enformer::{crop_range, EnformerTrunk};
use crate::models::weights::ModelParams;
use crate::ops::conv::Conv1dDims;
use crate::ops::pool::PoolDims;
use crate::{Error, Result};

const EPS: f32 = 1e-5;

pub struct DeviceEnformer<D: KernelDevice> {
    dev: D,
    trunk: EnformerTrunk,
    /// Weights by layout name: bf16, except batchnorm running statistics (f32).
    w: HashMap<String, D::Buffer>,
}

impl<D: KernelDevice> DeviceEnformer<D> {
    pub fn upload(dev: D, trunk: &EnformerTrunk, p: &ModelParams) -> Result<Self> {
        let mut w = HashMap::new();
        for (i, e) in trunk.layout().entries().iter().enumerate() {
            let name = &e.spec.name;
            let buf = if name.ends_with("running_mean") || name.ends_with("running_var") {
                dev.upload_f32(p.get(i))?
            } else {
                dev.upload_bf16(
                    &p.get(i)
                        .iter()
                        .map(|&x| bf16::from_f32(x))
                        .collect::<Vec<_>>(),
                )?
            };
            w.insert(name.clone(), buf);
        }
        Ok(DeviceEnformer {
            dev,
            trunk: trunk.clone(),
            w,
        })
    }

    fn get(&self, name: &str) -> Result<&D::Buffer> {
        self.w.get(name).ok_or_else(|| Error::Tensor {
            name: name.into(),
            msg: "not uploaded".into(),
        })
    }

    fn bf(&self, n: usize) -> Result<D::Buffer> {
        self.dev.alloc_zeroed(n * 2)
    }

    /// ConvBlock = BatchNorm (running statistics) → GELUσ → conv (width `k`).
    fn conv_block(
        &self,
        prefix: &str,
        x: &D::Buffer,
        batch: usize,
        len: usize,
        c_in: usize,
        c_out: usize,
        k: usize,
    ) -> Result<D::Buffer> {
        let dev = &self.dev;
        let rows = batch * len;
        let normed = self.bf(rows * c_in)?;
        let g = |s: &str| self.get(&format!("{prefix}0.{s}"));
        ops::batchnorm_forward(
            dev,
            &normed,
            x,
            g("running_mean")?,
            g("running_var")?,
            g("weight")?,
            g("bias")?,
            rows,
            c_in,
            EPS,
        )?;
        let act = self.bf(rows * c_in)?;
        ops::act_forward(dev, &act, &normed, rows * c_in, ops::Act::GeluSigmoid)?;
        let out = self.bf(rows * c_out)?;
        let (w, b) = (
            self.get(&format!("{prefix}2.weight"))?,
            self.get(&format!("{prefix}2.bias"))?,
        );
        if k == 1 {
            dev.linear_bias(&out, &act, w, b, rows, c_in, c_out, false)?;
        } else {
            let d = Conv1dDims {
                batch,
                len,
                c_in,
                c_out,
                width: k,
            };
            let cols = dev.alloc_zeroed(ops::conv1d_scratch_bytes(&d))?;
            ops::conv1d_forward(dev, &out, &cols, &act, w, b, d)?;
        }
        Ok(out)
    }

    fn pool(
        &self,
        name: &str,
        x: &D::Buffer,
        batch: usize,
        len: usize,
        c: usize,
    ) -> Result<D::Buffer> {
        let d = PoolDims {
            batch,
            len,
            channels: c,
        };
        let (out, logits) = (
            self.bf(batch * d.out_len() * c)?,
            self.dev.alloc_zeroed(batch * len * c * 4)?,
        );
        ops::attention_pool_forward(&self.dev, &out, &logits, x, self.get(name)?, d)?;
        Ok(out)
    }

    /// Embeddings `[batch, target, 2·dim]` (f32, from the device's bf16) of one-hot DNA `[batch, seq_len, 4]`.
    pub fn forward(
        &self,
        one_hot: &[f32],
        batch: usize,
        seq_len: usize,
    ) -> Result<(Vec<f32>, usize)> {
        let cfg = &self.trunk.cfg;
        let dev = &self.dev;
        let ds = self.trunk.downsample();
        if one_hot.len() != batch * seq_len * 4
            || seq_len % ds != 0
            || seq_len / ds < cfg.target_length
        {
            return Err(Error::invalid(
                "DNA length",
                format!(
                    "{seq_len} bp: Enformer needs a multiple of {ds} giving at least {} bins",
                    cfg.target_length
                ),
            ));
        }
        let filters = cfg.filters();
        let (dim, half, heads, dk) = (cfg.dim, cfg.dim / 2, cfg.heads, cfg.attn_dim_key);
        let x0 = dev.upload_bf16(
            &one_hot
                .iter()
                .map(|&v| bf16::from_f32(v))
                .collect::<Vec<_>>(),
        )?;
        let mut len = seq_len;
        // Stem: conv15, residual ConvBlock₁, pool.
        let stem = self.bf(batch * len * half)?;
        let d = Conv1dDims {
            batch,
            len,
            c_in: 4,
            c_out: half,
            width: 15,
        };
        let cols = dev.alloc_zeroed(ops::conv1d_scratch_bytes(&d))?;
        ops::conv1d_forward(
            dev,
            &stem,
            &cols,
            &x0,
            self.get("stem.0.weight")?,
            self.get("stem.0.bias")?,
            d,
        )?;
        drop(cols);
        let r = self.conv_block("stem.1.fn.", &stem, batch, len, half, half, 1)?;
        ops::bias_add(dev, &r, &stem, 1, batch * len * half)?;
        let mut x = self.pool("stem.2.to_attn_logits.weight", &r, batch, len, half)?;
        len /= 2;
        // Tower.
        for (t, w) in filters.windows(2).enumerate() {
            let y =
                self.conv_block(&format!("conv_tower.{t}.0."), &x, batch, len, w[0], w[1], 5)?;
            let z = self.conv_block(
                &format!("conv_tower.{t}.1.fn."),
                &y,
                batch,
                len,
                w[1],
                w[1],
                1,
            )?;
            ops::bias_add(dev, &z, &y, 1, batch * len * w[1])?;
            x = self.pool(
                &format!("conv_tower.{t}.2.to_attn_logits.weight"),
                &z,
                batch,
                len,
                w[1],
            )?;
            len /= 2;
        }
        // Transformer.
        let n = len;
        let rows = batch * n;
        let positions = self.trunk.positional_table(n)?;
        let pos = dev.upload_bf16(
            &positions
                .iter()
                .map(|&v| bf16::from_f32(v))
                .collect::<Vec<_>>(),
        )?;
        let scales = dev.upload_f32(&vec![(dk as f32).powf(-0.5); rows])?;
        let lens: Vec<i32> = vec![n as i32; batch];
        let blens = dev.upload(bytemuck::cast_slice(&lens))?;
        for l in 0..cfg.depth {
            let (a, f) = (
                format!("transformer.{l}.0.fn."),
                format!("transformer.{l}.1.fn."),
            );
            let g = |s: &str| self.get(&format!("{a}{s}"));
            let (ln, mean, rstd) = (
                self.bf(rows * dim)?,
                dev.alloc_zeroed(rows * 4)?,
                dev.alloc_zeroed(rows * 4)?,
            );
            ops::layernorm_forward(
                dev,
                &ln,
                &mean,
                &rstd,
                &x,
                g("0.weight")?,
                g("0.bias")?,
                rows,
                dim,
                EPS,
            )?;
            let (q, k, v) = (
                self.bf(rows * heads * dk)?,
                self.bf(rows * heads * dk)?,
                self.bf(rows * dim)?,
            );
            let proj = |out: &D::Buffer, wname: &str, d_out: usize| {
                dev.gemm(
                    out,
                    false,
                    &ln,
                    g(wname)?,
                    MatmulDims {
                        batch: 1,
                        m: rows,
                        n: d_out,
                        k: dim,
                        trans_a: false,
                        trans_b: true,
                    },
                    false,
                )
            };
            proj(&q, "1.to_q.weight", heads * dk)?;
            proj(&k, "1.to_k.weight", heads * dk)?;
            proj(&v, "1.to_v.weight", dim)?;
            ops::scale_rows(dev, &q, &scales, rows, heads * dk)?;
            let (qc, qp) = (self.bf(rows * heads * dk)?, self.bf(rows * heads * dk)?);
            for (dst, bias_name) in [(&qc, "1.rel_content_bias"), (&qp, "1.rel_pos_bias")] {
                ops::copy_at(dev, dst, 0, &q, 0, rows * heads * dk)?;
                ops::bias_add(dev, dst, g(bias_name)?, rows, heads * dk)?;
            }
            let rel_k = self.bf((2 * n - 1) * heads * dk)?;
            dev.gemm(
                &rel_k,
                false,
                &pos,
                g("1.to_rel_k.weight")?,
                MatmulDims {
                    batch: 1,
                    m: 2 * n - 1,
                    n: heads * dk,
                    k: dim / heads,
                    trans_a: false,
                    trans_b: true,
                },
                false,
            )?;
            let bias = dev.alloc_zeroed(batch * heads * n * n * 4)?;
            ops::relative_logits(dev, &bias, &qp, &rel_k, batch, heads, n, dk)?;
            let ad = ops::AttentionDims {
                batch,
                heads,
                q_len: n,
                kv_len: n,
                head_dim: dk,
                v_head_dim: dim / heads,
                scale: 1.0,
            };
            let (attn, lse) = (
                self.bf(rows * dim)?,
                dev.alloc_zeroed(batch * heads * n * 4)?,
            );
            ops::flash_attention_forward(
                dev,
                &attn,
                &lse,
                &qc,
                &k,
                &v,
                Some(&blens),
                Some((&bias, true)),
                &ad,
            )?;
            let mid = self.bf(rows * dim)?;
            dev.linear_bias(
                &mid,
                &attn,
                g("1.to_out.weight")?,
                g("1.to_out.bias")?,
                rows,
                dim,
                dim,
                false,
            )?;
            ops::bias_add(dev, &mid, &x, 1, rows * dim)?;
            let gf = |s: &str| self.get(&format!("{f}{s}"));
            let ln2 = self.bf(rows * dim)?;
            ops::layernorm_forward(
                dev,
                &ln2,
                &mean,
                &rstd,
                &mid,
                gf("0.weight")?,
                gf("0.bias")?,
                rows,
                dim,
                EPS,
            )?;
            let hidden = self.bf(rows * 2 * dim)?;
            dev.linear_bias(
                &hidden,
                &ln2,
                gf("1.weight")?,
                gf("1.bias")?,
                rows,
                dim,
                2 * dim,
                true,
            )?;
            let out = self.bf(rows * dim)?;
            dev.linear_bias(
                &out,
                &hidden,
                gf("4.weight")?,
                gf("4.bias")?,
                rows,
                2 * dim,
                dim,
                false,
            )?;
            ops::bias_add(dev, &out, &mid, 1, rows * dim)?;
            x = out;
        }
        // Crop, then the final pointwise block and GELUσ.
        let (start, out_len) = crop_range(n, cfg.target_length);
        let cropped = self.bf(batch * out_len * dim)?;
        for b in 0..batch {
            ops::copy_at(
                dev,
                &cropped,
                b * out_len * dim,
                &x,
                (b * n + start) * dim,
                out_len * dim,
            )?;
        }
        let last = *filters.last().expect("filters");
        let pre = self.conv_block(
            "final_pointwise.1.",
            &cropped,
            batch,
            out_len,
            last,
            2 * dim,
            1,
        )?;
        let emb = self.bf(batch * out_len * 2 * dim)?;
        ops::act_forward(
            dev,
            &emb,
            &pre,
            batch * out_len * 2 * dim,
            ops::Act::GeluSigmoid,
        )?;
        Ok((
            dev.download_bf16(&emb)?
                .iter()
                .map(|v| v.to_f32())
                .collect(),
            out_len,
        ))
    }
}
