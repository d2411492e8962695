//! The VAE decoder (diffusers' `AutoencoderKL.decode`: `post_quant_conv`, then the decoder's
//! input convolution, middle block with one single-head attention, up blocks of ResNet blocks
//! with nearest-neighbour upsampling, output norm and convolution). Built from our own parts
//! so it uses the UNet's fast paths: [`crate::engine::conv`] on the CPU and the fused GroupNorm. The
//! encoder is not loaded (img2img builds [`crate::engine::vae_encoder`] on demand). Weight names
//! follow diffusers, with the older `query`/`key`/`value`/`proj_attn` attention names and
//! 1×1-convolution-shaped attention weights also accepted.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::linear::Linear;

use crate::engine::config::VaeConfig;
use crate::engine::conv::Conv2d;
use crate::engine::fused::{group_norm_layer, GroupNorm};
use crate::engine::profile::scope;

const EPS: f64 = 1e-6;

pub(crate) struct Resnet {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

impl Resnet {
    pub(crate) fn new(vb: VarBuilder, cin: usize, cout: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            norm1: group_norm_layer(groups, cin, EPS, vb.pp("norm1"))?,
            conv1: Conv2d::new(cin, cout, 3, 1, 1, vb.pp("conv1"))?,
            norm2: group_norm_layer(groups, cout, EPS, vb.pp("norm2"))?,
            conv2: Conv2d::new(cout, cout, 3, 1, 1, vb.pp("conv2"))?,
            shortcut: if cin != cout {
                Some(Conv2d::new(cin, cout, 1, 1, 0, vb.pp("conv_shortcut"))?)
            } else {
                None
            },
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dev = x.device();
        let h = scope("vae groupnorm+silu", dev, || self.norm1.forward_silu(x))?;
        let h = scope("vae conv 3x3", dev, || self.conv1.forward(&h))?;
        let h = scope("vae groupnorm+silu", dev, || self.norm2.forward_silu(&h))?;
        let h = scope("vae conv 3x3", dev, || self.conv2.forward(&h))?;
        let skip = match &self.shortcut {
            Some(c) => scope("vae conv 1x1", dev, || c.forward(x))?,
            None => x.clone(),
        };
        skip + h
    }
}

/// A `channels`×`channels` projection stored as a linear layer or a 1×1 convolution.
fn projection(vb: VarBuilder, channels: usize) -> Result<Linear> {
    let w = match vb.get((channels, channels), "weight") {
        Ok(w) => w,
        Err(_) => vb
            .get((channels, channels, 1, 1), "weight")?
            .reshape((channels, channels))?,
    };
    Ok(Linear::new(w, Some(vb.get(channels, "bias")?)))
}

/// The middle block's attention: one head over every position, in f32 (as diffusers upcasts
/// it), residual added.
pub(crate) struct Attention {
    norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
}

impl Attention {
    pub(crate) fn new(vb: VarBuilder, channels: usize, groups: usize) -> Result<Self> {
        let (q, k, v, o) = if vb.contains_tensor("to_q.weight") {
            ("to_q", "to_k", "to_v", "to_out.0")
        } else {
            ("query", "key", "value", "proj_attn")
        };
        Ok(Self {
            norm: group_norm_layer(groups, channels, EPS, vb.pp("group_norm"))?,
            q: projection(vb.pp(q), channels)?,
            k: projection(vb.pp(k), channels)?,
            v: projection(vb.pp(v), channels)?,
            out: projection(vb.pp(o), channels)?,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let dtype = x.dtype();
        let t = self
            .norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?;
        let f32 = |y: Tensor| y.to_dtype(DType::F32);
        let (q, k, v) = (
            f32(self.q.forward(&t)?)?,
            f32(self.k.forward(&t)?)?,
            f32(self.v.forward(&t)?)?,
        );
        let scale = (c as f64).powf(-0.5);
        let y = super::attention::attention(&(q * scale)?, &k, &v)?.to_dtype(dtype)?;
        let y = self
            .out
            .forward(&y)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        y + x
    }
}

struct Up {
    resnets: Vec<Resnet>,
    upsample: Option<Conv2d>,
}

/// `AutoencoderKL`'s decoding half.
pub struct VaeDecoder {
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid: (Resnet, Attention, Resnet),
    up: Vec<Up>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl VaeDecoder {
    /// `vb` at the VAE's root (`post_quant_conv.*`, `decoder.*`).
    pub fn new(vb: VarBuilder, c: &VaeConfig) -> Result<Self> {
        let ch = &c.block_out_channels;
        let n = ch.len();
        let g = c.norm_num_groups;
        let top = ch[n - 1];
        let d = vb.pp("decoder");
        let m = d.pp("mid_block");
        let mut up = Vec::with_capacity(n);
        for i in 0..n {
            let out = ch[n - 1 - i];
            let cin = if i == 0 { top } else { ch[n - i] };
            let u = d.pp("up_blocks").pp(i);
            up.push(Up {
                resnets: (0..=c.layers_per_block)
                    .map(|j| {
                        Resnet::new(
                            u.pp("resnets").pp(j),
                            if j == 0 { cin } else { out },
                            out,
                            g,
                        )
                    })
                    .collect::<Result<_>>()?,
                upsample: if i + 1 < n {
                    Some(Conv2d::new(
                        out,
                        out,
                        3,
                        1,
                        1,
                        u.pp("upsamplers").pp(0).pp("conv"),
                    )?)
                } else {
                    None
                },
            });
        }
        Ok(Self {
            post_quant_conv: if c.use_post_quant_conv {
                let l = c.latent_channels;
                Some(Conv2d::new(l, l, 1, 1, 0, vb.pp("post_quant_conv"))?)
            } else {
                None
            },
            conv_in: Conv2d::new(c.latent_channels, top, 3, 1, 1, d.pp("conv_in"))?,
            mid: (
                Resnet::new(m.pp("resnets").pp(0), top, top, g)?,
                Attention::new(m.pp("attentions").pp(0), top, g)?,
                Resnet::new(m.pp("resnets").pp(1), top, top, g)?,
            ),
            up,
            norm_out: group_norm_layer(g, ch[0], EPS, d.pp("conv_norm_out"))?,
            conv_out: Conv2d::new(ch[0], c.out_channels, 3, 1, 1, d.pp("conv_out"))?,
        })
    }

    /// Latents [b, c, h, w] (already unscaled) → pixels [b, 3, h·f, w·f] in about [-1, 1].
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let dev = z.device();
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(z)?,
            None => z.clone(),
        };
        let mut x = scope("vae conv 3x3", dev, || self.conv_in.forward(&z))?;
        x = self.mid.0.forward(&x)?;
        x = scope("vae attention", dev, || self.mid.1.forward(&x))?;
        x = self.mid.2.forward(&x)?;
        for u in &self.up {
            for r in &u.resnets {
                x = r.forward(&x)?;
            }
            if let Some(conv) = &u.upsample {
                let (_, _, h, w) = x.dims4()?;
                x = scope("vae upsampling", dev, || {
                    conv.forward(&crate::engine::conv::upsample_nearest2d(&x, 2 * h, 2 * w)?)
                })?;
            }
        }
        let x = scope("vae groupnorm+silu", dev, || self.norm_out.forward_silu(&x))?;
        scope("vae conv 3x3", dev, || self.conv_out.forward(&x))
    }
}
