//! The VAE's encoder half (diffusers' `AutoencoderKL.encode`): image → the mean and
//! log-variance of the latent distribution. Ours because candle's `encode` samples with its
//! own generator, and img2img must draw that sample from the image's seed the way diffusers
//! does; built from the decoder's parts (ResNet blocks, single-head attention, the CPU
//! column convolution and the fused GroupNorm).

use candle_core::{Module, Tensor, D};
use candle_nn::VarBuilder;

use crate::engine::config::VaeConfig;
use crate::engine::conv::Conv2d;
use crate::engine::fused::{group_norm_layer, GroupNorm};
use crate::engine::vae_decoder::{Attention, Resnet};

struct Down {
    resnets: Vec<Resnet>,
    /// Stride-2 convolution after padding right and bottom by one (diffusers' VAE
    /// `Downsample2D` with padding 0).
    downsample: Option<Conv2d>,
}

pub struct VaeEncoder {
    conv_in: Conv2d,
    down: Vec<Down>,
    mid: (Resnet, Attention, Resnet),
    norm_out: GroupNorm,
    conv_out: Conv2d,
    quant_conv: Option<Conv2d>,
}

impl VaeEncoder {
    /// `vb` is the VAE's root (weights under `encoder.` and `quant_conv.`).
    pub fn new(vb: VarBuilder, c: &VaeConfig) -> candle_core::Result<Self> {
        let e = vb.pp("encoder");
        let ch = &c.block_out_channels;
        let g = c.norm_num_groups;
        let mut down = Vec::with_capacity(ch.len());
        for (i, &out) in ch.iter().enumerate() {
            let cin = if i == 0 { ch[0] } else { ch[i - 1] };
            let d = e.pp("down_blocks").pp(i);
            down.push(Down {
                resnets: (0..c.layers_per_block)
                    .map(|j| {
                        Resnet::new(
                            d.pp("resnets").pp(j),
                            if j == 0 { cin } else { out },
                            out,
                            g,
                        )
                    })
                    .collect::<candle_core::Result<_>>()?,
                downsample: if i + 1 < ch.len() {
                    Some(Conv2d::new(
                        out,
                        out,
                        3,
                        2,
                        0,
                        d.pp("downsamplers").pp(0).pp("conv"),
                    )?)
                } else {
                    None
                },
            });
        }
        let last = ch[ch.len() - 1];
        let m = e.pp("mid_block");
        let latent2 = 2 * c.latent_channels;
        Ok(Self {
            conv_in: Conv2d::new(c.in_channels, ch[0], 3, 1, 1, e.pp("conv_in"))?,
            down,
            mid: (
                Resnet::new(m.pp("resnets").pp(0), last, last, g)?,
                Attention::new(m.pp("attentions").pp(0), last, g)?,
                Resnet::new(m.pp("resnets").pp(1), last, last, g)?,
            ),
            norm_out: group_norm_layer(g, last, 1e-6, e.pp("conv_norm_out"))?,
            conv_out: Conv2d::new(last, latent2, 3, 1, 1, e.pp("conv_out"))?,
            quant_conv: if c.use_quant_conv {
                Some(Conv2d::new(latent2, latent2, 1, 1, 0, vb.pp("quant_conv"))?)
            } else {
                None
            },
        })
    }

    /// Image [b, 3, h, w] in [-1, 1] → (mean, std) of the latent distribution, each
    /// [b, latent, h/8, w/8], with the log-variance clamped to [-30, 20] as diffusers does.
    pub fn encode(&self, image: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let mut x = self.conv_in.forward(image)?;
        for block in &self.down {
            for r in &block.resnets {
                x = r.forward(&x)?;
            }
            if let Some(conv) = &block.downsample {
                let padded = x
                    .pad_with_zeros(D::Minus1, 0, 1)?
                    .pad_with_zeros(D::Minus2, 0, 1)?;
                x = conv.forward(&padded)?;
            }
        }
        x = self.mid.0.forward(&x)?;
        x = self.mid.1.forward(&x)?;
        x = self.mid.2.forward(&x)?;
        x = self.conv_out.forward(&self.norm_out.forward_silu(&x)?)?;
        if let Some(q) = &self.quant_conv {
            x = q.forward(&x)?;
        }
        let half = x.dim(1)? / 2;
        let mean = x.narrow(1, 0, half)?;
        let logvar = x.narrow(1, half, half)?.clamp(-30f32, 20f32)?;
        let std = (logvar * 0.5)?.exp()?;
        Ok((mean, std))
    }
}
