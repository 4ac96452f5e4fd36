//! The ESM-2 / NT-v2 encoder on a [`KernelDevice`] (inference): weights uploaded once as bf16, then
//! embedding → token-dropout/padding row scales → the device blocks → final LayerNorm, all with the GPU
//! kernels. It reads the same [`ModelParams`] as the CPU encoder, so `embed --device emu|cuda` needs no
//! other weights.

use half::bf16;

use super::block::{self, BlockActs, BlockDims, BlockParams, Linear, Norm};
use super::{ops, KernelDevice, KernelDeviceExt};
use crate::models::transformer::{FeedForward, TransformerEncoder};
use crate::models::weights::ModelParams;
use crate::ops::rotary::RotaryTable;
use crate::Result;

pub struct DeviceEncoder<D: KernelDevice> {
    dev: D,
    host: TransformerEncoder,
    embed: D::Buffer,
    blocks: Vec<BlockParams<D::Buffer>>,
    final_ln: Norm<D::Buffer>,
    rotary_len: usize,
}

impl<D: KernelDevice> DeviceEncoder<D> {
    /// Uploads the encoder's weights (rotary tables for up to `max_len` positions).
    pub fn upload(
        dev: D,
        enc: &TransformerEncoder,
        p: &ModelParams,
        max_len: usize,
    ) -> Result<Self> {
        let cfg = &enc.cfg;
        let layout = enc.layout().clone();
        let up = |name: &str| -> Result<D::Buffer> {
            let v: Vec<bf16> = p
                .get(layout.position(name)?)
                .iter()
                .map(|&x| bf16::from_f32(x))
                .collect();
            dev.upload_bf16(&v)
        };
        let placeholder = || dev.alloc_zeroed(4);
        let h = cfg.hidden;
        let table = RotaryTable::new(max_len.max(64), cfg.head_dim(), 10_000.0)?;
        let mut blocks = Vec::with_capacity(cfg.layers);
        for l in 0..cfg.layers {
            let pre = format!("encoder.layer.{l}.");
            let lin =
                |name: &str, d_in: usize, d_out: usize, bias: bool| -> Result<Linear<D::Buffer>> {
                    Ok(Linear {
                        w: up(&format!("{pre}{name}.weight"))?,
                        b: if bias {
                            Some(up(&format!("{pre}{name}.bias"))?)
                        } else {
                            None
                        },
                        dw: placeholder()?,
                        db: None,
                        d_in,
                        d_out,
                    })
                };
            let norm = |name: &str| -> Result<Norm<D::Buffer>> {
                Ok(Norm {
                    gamma: up(&format!("{pre}{name}.weight"))?,
                    beta: up(&format!("{pre}{name}.bias"))?,
                    dgamma_dbeta: placeholder()?,
                })
            };
            let biased_ffn = cfg.ffn == FeedForward::Gelu;
            let ffn_in = if biased_ffn {
                cfg.ffn_dim
            } else {
                2 * cfg.ffn_dim
            };
            blocks.push(BlockParams {
                ln1: norm("attention.LayerNorm")?,
                q: lin("attention.self.query", h, h, true)?,
                k: lin("attention.self.key", h, h, true)?,
                v: lin("attention.self.value", h, h, true)?,
                o: lin("attention.output.dense", h, h, true)?,
                ln2: norm("LayerNorm")?,
                ff1: lin("intermediate.dense", h, ffn_in, biased_ffn)?,
                ff2: lin("output.dense", cfg.ffn_dim, h, biased_ffn)?,
                cos: dev.upload_f32(table.cos())?,
                sin: dev.upload_f32(table.sin())?,
            });
        }
        let final_ln = Norm {
            gamma: up("encoder.emb_layer_norm_after.weight")?,
            beta: up("encoder.emb_layer_norm_after.bias")?,
            dgamma_dbeta: placeholder()?,
        };
        let embed = up("embeddings.word_embeddings.weight")?;
        Ok(DeviceEncoder {
            host: enc.clone(),
            embed,
            blocks,
            final_ln,
            rotary_len: table.max_len(),
            dev,
        })
    }

    pub fn device(&self) -> &D {
        &self.dev
    }

    /// The last hidden state `[batch, len, hidden]` (f32, from the device's bf16) for right-padded `ids`.
    pub fn forward(&self, ids: &[u32], lens: &[usize], len: usize) -> Result<Vec<f32>> {
        let cfg = &self.host.cfg;
        if len > self.rotary_len {
            return Err(crate::Error::invalid(
                "sequence length",
                format!(
                    "{len} tokens, the device encoder was set up for {}",
                    self.rotary_len
                ),
            ));
        }
        let (batch, h) = (lens.len(), cfg.hidden);
        let n = batch * len;
        let d = BlockDims {
            batch,
            len,
            hidden: h,
            heads: cfg.heads,
            ffn: cfg.ffn_dim,
            ffn_kind: cfg.ffn,
            eps: cfg.ln_eps,
        };
        let dev = &self.dev;
        let bids = ops::upload_ids(dev, ids, cfg.vocab)?;
        let lens_i32: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
        let blens = dev.upload(bytemuck::cast_slice(&lens_i32))?;
        let scales = dev.upload_f32(&self.host.embedding_row_scales(ids, lens, len))?;
        let mut acts = BlockActs::new(dev, &d)?;
        ops::embedding_forward(dev, &acts.x, &bids, &self.embed, n, h, cfg.vocab)?;
        ops::scale_rows(dev, &acts.x, &scales, n, h)?;
        for p in &self.blocks {
            block::forward(dev, p, &acts, &blens, &d)?;
            std::mem::swap(&mut acts.x, &mut acts.out);
        }
        let (hidden, mean, rstd) = (
            dev.alloc_zeroed(n * h * 2)?,
            dev.alloc_zeroed(n * 4)?,
            dev.alloc_zeroed(n * 4)?,
        );
        ops::layernorm_forward(
            dev,
            &hidden,
            &mean,
            &rstd,
            &acts.x,
            &self.final_ln.gamma,
            &self.final_ln.beta,
            n,
            h,
            cfg.ln_eps,
        )?;
        Ok(dev
            .download_bf16(&hidden)?
            .iter()
            .map(|v| v.to_f32())
            .collect())
    }
}
