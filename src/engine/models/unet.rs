//! The denoising UNet (diffusers' `UNet2DConditionModel`) for SD 1.x/2.x, built from
//! `unet/config.json`: ResNet blocks with timestep conditioning, spatial transformers with
//! self- and cross-attention in the levels the config names, skip connections between the
//! down and up paths. Weight names follow diffusers exactly.

use super::attention;
use candle_core::{DType, Module, Tensor, D};
use candle_nn::{layer_norm, LayerNorm, VarBuilder};

use super::linear::{linear, linear_no_bias, Linear};

use crate::engine::config::UNetConfig;
use crate::engine::conv::Conv2d;
use crate::engine::fused::{group_norm_layer as group_norm, GroupNorm};
use crate::engine::profile::scope;

type R<T> = candle_core::Result<T>;

fn conv(
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> R<Conv2d> {
    Conv2d::new(cin, cout, k, stride, padding, vb)
}

/// Sinusoidal timestep features, as diffusers' `get_timestep_embedding` (computed in f32).
fn timestep_features(
    t: f64,
    batch: usize,
    dim: usize,
    flip: bool,
    shift: f64,
    dev: &candle_core::Device,
) -> R<Tensor> {
    Tensor::from_vec(sinusoid(t as f32, dim, flip, shift), (1, dim), dev)?.repeat((batch, 1))
}

/// One value's sinusoidal features (`dim` of them; odd `dim` ends in a zero, as diffusers pads).
fn sinusoid(t: f32, dim: usize, flip: bool, shift: f64) -> Vec<f32> {
    let half = dim / 2;
    let mut row = vec![0f32; dim];
    for i in 0..half {
        let exponent = (-(10000f32.ln()) * i as f32) / (half as f32 - shift as f32);
        let arg = t * exponent.exp();
        let (s, c) = (arg.sin(), arg.cos());
        if flip {
            row[i] = c;
            row[half + i] = s;
        } else {
            row[i] = s;
            row[half + i] = c;
        }
    }
    row
}

struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
    output_scale: f64,
}

impl ResnetBlock {
    fn new(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        temb: usize,
        groups: usize,
        eps: f64,
        output_scale: f64,
    ) -> R<Self> {
        Ok(Self {
            norm1: group_norm(groups, cin, eps, vb.pp("norm1"))?,
            conv1: conv(cin, cout, 3, 1, 1, vb.pp("conv1"))?,
            time_emb_proj: linear(temb, cout, vb.pp("time_emb_proj"))?,
            norm2: group_norm(groups, cout, eps, vb.pp("norm2"))?,
            conv2: conv(cout, cout, 3, 1, 1, vb.pp("conv2"))?,
            shortcut: if cin != cout {
                Some(conv(cin, cout, 1, 1, 0, vb.pp("conv_shortcut"))?)
            } else {
                None
            },
            output_scale,
        })
    }

    fn forward(&self, xs: &Tensor, temb: &Tensor) -> R<Tensor> {
        let dev = xs.device();
        let h = scope("groupnorm+silu", dev, || self.norm1.forward_silu(xs))?;
        let h = scope("conv 3x3", dev, || self.conv1.forward(&h))?;
        let h = scope("resnet time embedding", dev, || {
            let t = self
                .time_emb_proj
                .forward(&candle_nn::ops::silu(temb)?)?
                .unsqueeze(2)?
                .unsqueeze(3)?;
            h.broadcast_add(&t)
        })?;
        let h = scope("groupnorm+silu", dev, || self.norm2.forward_silu(&h))?;
        let h = scope("conv 3x3", dev, || self.conv2.forward(&h))?;
        let skip = match &self.shortcut {
            Some(c) => scope("conv 1x1", dev, || c.forward(xs))?,
            None => xs.clone(),
        };
        scope("residual add", dev, || {
            let out = (skip + h)?;
            if self.output_scale == 1.0 {
                Ok(out)
            } else {
                out / self.output_scale
            }
        })
    }
}

/// Multi-head attention; `context` None means self-attention.
struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
}

impl Attention {
    fn new(
        vb: VarBuilder,
        dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
    ) -> R<Self> {
        let inner = heads * head_dim;
        Ok(Self {
            to_q: linear_no_bias(dim, inner, vb.pp("to_q"))?,
            to_k: linear_no_bias(context_dim, inner, vb.pp("to_k"))?,
            to_v: linear_no_bias(context_dim, inner, vb.pp("to_v"))?,
            to_out: linear(inner, dim, vb.pp("to_out").pp("0"))?,
            heads,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    fn split_heads(&self, x: Tensor) -> R<Tensor> {
        let (b, t, inner) = x.dims3()?;
        x.reshape((b, t, self.heads, inner / self.heads))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// `slice`: at most this many queries per score matrix (the same result, bounded memory).
    fn forward(&self, xs: &Tensor, context: Option<&Tensor>, slice: Option<usize>) -> R<Tensor> {
        let ctx = context.unwrap_or(xs);
        let dev = xs.device();
        let (b, t, _) = xs.dims3()?;
        let (q, k, v) = scope("attention q/k/v projections", dev, || {
            Ok((
                self.split_heads((self.to_q.forward(xs)? * self.scale)?)?,
                self.split_heads(self.to_k.forward(ctx)?)?,
                self.split_heads(self.to_v.forward(ctx)?)?,
            ))
        })?;
        let core = if context.is_some() {
            "cross-attention core (QK^T, softmax, PV)"
        } else {
            "self-attention core (QK^T, softmax, PV)"
        };
        let ys = scope(core, dev, || self.core(&q, &k, &v, slice))?;
        scope("attention out projection", dev, || {
            let ys = ys.transpose(1, 2)?;
            let inner = ys.dim(2)? * ys.dim(3)?;
            self.to_out.forward(&ys.reshape((b, t, inner))?)
        })
    }

    /// softmax(q kᵀ) v over [b, heads, t, d]: without the score matrix where
    /// [`attention::score_free_on`] says so; elsewhere the plain path, `slice` queries at a
    /// time.
    fn core(&self, q: &Tensor, k: &Tensor, v: &Tensor, slice: Option<usize>) -> R<Tensor> {
        let (b, h, t, d) = q.dims4()?;
        if attention::score_free_on(q.device(), q.dtype()) {
            let s = k.dim(2)?;
            let y = attention::attention(
                &q.reshape((b * h, t, d))?,
                &k.reshape((b * h, s, d))?,
                &v.reshape((b * h, s, d))?,
            )?;
            return y.reshape((b, h, t, d));
        }
        let kt = k.t()?;
        let attend = |q: &Tensor| -> R<Tensor> {
            let probs = candle_nn::ops::softmax_last_dim(&q.matmul(&kt)?)?;
            probs.matmul(v)
        };
        match slice {
            Some(n) if n < t => {
                let mut parts = Vec::with_capacity(t.div_ceil(n));
                for start in (0..t).step_by(n) {
                    parts.push(attend(&q.narrow(2, start, n.min(t - start))?)?);
                }
                Tensor::cat(&parts, 2)
            }
            _ => attend(q),
        }
    }
}

struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
}

impl TransformerBlock {
    fn new(
        vb: VarBuilder,
        dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
    ) -> R<Self> {
        let ff_inner = dim * 4;
        Ok(Self {
            norm1: layer_norm(dim, 1e-5, vb.pp("norm1"))?,
            attn1: Attention::new(vb.pp("attn1"), dim, dim, heads, head_dim)?,
            norm2: layer_norm(dim, 1e-5, vb.pp("norm2"))?,
            attn2: Attention::new(vb.pp("attn2"), dim, context_dim, heads, head_dim)?,
            norm3: layer_norm(dim, 1e-5, vb.pp("norm3"))?,
            ff_in: linear(dim, ff_inner * 2, vb.pp("ff").pp("net").pp("0").pp("proj"))?,
            ff_out: linear(ff_inner, dim, vb.pp("ff").pp("net").pp("2"))?,
        })
    }

    fn forward(&self, xs: &Tensor, context: &Tensor, slice: Option<usize>) -> R<Tensor> {
        let dev = xs.device();
        let n1 = scope("layernorm", dev, || self.norm1.forward(xs))?;
        let a1 = self.attn1.forward(&n1, None, slice)?;
        let xs = scope("residual add", dev, || a1 + xs)?;
        let n2 = scope("layernorm", dev, || self.norm2.forward(&xs))?;
        let a2 = self.attn2.forward(&n2, Some(context), slice)?;
        let xs = scope("residual add", dev, || a2 + &xs)?;
        let n3 = scope("layernorm", dev, || self.norm3.forward(&xs))?;
        // GEGLU feed-forward with exact (erf) GELU, as diffusers.
        let h = scope("feed-forward linear", dev, || self.ff_in.forward(&n3))?;
        let gated = scope("feed-forward GEGLU gate", dev, || super::linear::geglu(&h))?;
        let out = scope("feed-forward linear", dev, || self.ff_out.forward(&gated))?;
        scope("residual add", dev, || out + xs)
    }
}

enum Proj {
    Conv(Conv2d),
    Linear(Linear),
}

/// diffusers' `Transformer2DModel`: group norm, projection in, transformer blocks, projection out.
struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Proj,
    blocks: Vec<TransformerBlock>,
    proj_out: Proj,
}

impl SpatialTransformer {
    fn new(
        vb: VarBuilder,
        channels: usize,
        heads: usize,
        depth: usize,
        context_dim: usize,
        groups: usize,
        linear_proj: bool,
    ) -> R<Self> {
        let head_dim = channels / heads;
        let proj = |name: &str| -> R<Proj> {
            Ok(if linear_proj {
                Proj::Linear(linear(channels, channels, vb.pp(name))?)
            } else {
                Proj::Conv(conv(channels, channels, 1, 1, 0, vb.pp(name))?)
            })
        };
        Ok(Self {
            norm: group_norm(groups, channels, 1e-6, vb.pp("norm"))?,
            proj_in: proj("proj_in")?,
            blocks: (0..depth)
                .map(|i| {
                    TransformerBlock::new(
                        vb.pp("transformer_blocks").pp(i),
                        channels,
                        context_dim,
                        heads,
                        head_dim,
                    )
                })
                .collect::<R<Vec<_>>>()?,
            proj_out: proj("proj_out")?,
        })
    }

    fn forward(&self, xs: &Tensor, context: &Tensor, slice: Option<usize>) -> R<Tensor> {
        let dev = xs.device();
        let (b, c, h, w) = xs.dims4()?;
        let to_tokens =
            |x: Tensor| -> R<Tensor> { x.permute((0, 2, 3, 1))?.reshape((b, h * w, c)) };
        let normed = scope("groupnorm", dev, || self.norm.forward(xs))?;
        let mut x = scope("transformer projections and layout", dev, || {
            match &self.proj_in {
                Proj::Conv(p) => to_tokens(p.forward(&normed)?),
                Proj::Linear(p) => p.forward(&to_tokens(normed)?),
            }
        })?;
        for block in &self.blocks {
            x = block.forward(&x, context, slice)?;
        }
        let to_image = |x: Tensor| -> R<Tensor> {
            x.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous()
        };
        let out = scope("transformer projections and layout", dev, || {
            match &self.proj_out {
                Proj::Conv(p) => p.forward(&to_image(x)?),
                Proj::Linear(p) => to_image(p.forward(&x)?),
            }
        })?;
        scope("residual add", dev, || out + xs)
    }
}

pub(crate) struct Level {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
    /// Downsampler (down path) or upsampler (up path) convolution.
    sampler: Option<Conv2d>,
}

/// Input convolution and timestep embedding (plus SDXL's added-condition embedding).
pub(crate) struct Head {
    conv_in: Conv2d,
    time_linear_1: Linear,
    time_linear_2: Linear,
    add_linear: Option<(Linear, Linear)>,
}

pub(crate) struct Mid {
    resnets: [ResnetBlock; 2],
    attention: SpatialTransformer,
}

impl Head {
    /// The timestep embedding (plus SDXL's added conditions) for a batch of `b`.
    pub(crate) fn embed(
        &self,
        c: &UNetConfig,
        timestep: f64,
        b: usize,
        dtype: DType,
        dev: &candle_core::Device,
        added: Option<(&Tensor, &Tensor)>,
    ) -> R<Tensor> {
        let t = timestep_features(
            timestep,
            b,
            c.block_out_channels[0],
            c.flip_sin_to_cos,
            c.freq_shift,
            dev,
        )?
        .to_dtype(dtype)?;
        let temb = scope("time embedding", dev, || {
            self.time_linear_2
                .forward(&candle_nn::ops::silu(&self.time_linear_1.forward(&t)?)?)
        })?;
        match (&self.add_linear, c.added, added) {
            (Some((l1, l2)), Some(a), Some((text, time_ids))) => {
                let ids = time_ids.to_dtype(DType::F32)?.to_vec2::<f32>()?;
                let feats: Vec<f32> = ids
                    .iter()
                    .flat_map(|row| {
                        row.iter()
                            .flat_map(|&v| sinusoid(v, a.time_dim, c.flip_sin_to_cos, c.freq_shift))
                    })
                    .collect();
                let time = Tensor::from_vec(feats, (b, 6 * a.time_dim), dev)?.to_dtype(dtype)?;
                let x = Tensor::cat(&[&text.to_dtype(dtype)?, &time], 1)?;
                let aug = l2.forward(&candle_nn::ops::silu(&l1.forward(&x)?)?)?;
                temb + aug
            }
            (None, None, None) => Ok(temb),
            (Some(_), _, None) => candle_core::bail!(
                "this UNet (SDXL) needs the pooled text embedding and size conditions"
            ),
            _ => candle_core::bail!("this UNet takes no added conditions"),
        }
    }

    pub(crate) fn conv_in(&self, x: &Tensor) -> R<Tensor> {
        scope("conv 3x3", x.device(), || self.conv_in.forward(x))
    }
}

impl Level {
    /// One down-path level: its resnets (and transformers), then its downsampler; every
    /// output is pushed to `skips`.
    pub(crate) fn down(
        &self,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        slice: Option<usize>,
        c: &UNetConfig,
        skips: &mut Vec<Tensor>,
    ) -> R<Tensor> {
        let dev = x.device();
        let mut x = x.clone();
        for (j, resnet) in self.resnets.iter().enumerate() {
            x = resnet.forward(&x, temb)?;
            if let Some(attn) = self.attentions.get(j) {
                x = attn.forward(&x, context, slice)?;
            }
            skips.push(x.clone());
        }
        if let Some(ds) = &self.sampler {
            if c.downsample_padding == 0 {
                x = x
                    .pad_with_zeros(D::Minus1, 0, 1)?
                    .pad_with_zeros(D::Minus2, 0, 1)?;
            }
            x = scope("down/upsampling", dev, || ds.forward(&x))?;
            skips.push(x.clone());
        }
        Ok(x)
    }
}

impl Mid {
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        slice: Option<usize>,
    ) -> R<Tensor> {
        let x = self.resnets[0].forward(x, temb)?;
        let x = self.attention.forward(&x, context, slice)?;
        self.resnets[1].forward(&x, temb)
    }
}

/// Output norm and convolution.
struct Tail {
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

/// Where the UNet's parts are: all built on the device, or built part by part from a
/// (RAM-backed) VarBuilder for each use and dropped after it (lowvram).
enum Parts {
    Resident(Box<Resident>),
    Streamed(VarBuilder<'static>),
}

struct Resident {
    head: Head,
    down: Vec<Level>,
    mid: Mid,
    up: Vec<Level>,
    tail: Tail,
}

/// A part borrowed from a resident UNet or built for one use.
enum Held<'a, T> {
    Ref(&'a T),
    Own(T),
}

impl<T> std::ops::Deref for Held<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        match self {
            Held::Ref(t) => t,
            Held::Own(t) => t,
        }
    }
}

/// Per-call options.
#[derive(Debug, Clone, Copy, Default)]
pub struct Forward<'a> {
    /// Attention slicing: queries per score matrix.
    pub attention_slice: Option<usize>,
    /// SDXL's added conditions: the pooled text embedding [b, p] and the six time ids
    /// [b, 6] (original size, crop top-left, target size, each as (height, width)).
    pub added: Option<(&'a Tensor, &'a Tensor)>,
    /// ControlNet residuals added to the skip connections and the middle block's output
    /// (diffusers' `down_block_additional_residuals` / `mid_block_additional_residual`).
    pub control: Option<&'a Residuals>,
}

/// What a ControlNet adds to a UNet pass: one tensor per skip connection (the input
/// convolution's output, then every down-path resnet/attention and downsampler output) and
/// one for the middle block, each the shape of what it is added to.
#[derive(Debug, Clone)]
pub struct Residuals {
    pub down: Vec<Tensor>,
    pub mid: Tensor,
}

impl Residuals {
    /// The element-wise sum of two ControlNets' residuals (diffusers' MultiControlNet).
    pub fn add(&self, other: &Residuals) -> R<Residuals> {
        if self.down.len() != other.down.len() {
            candle_core::bail!(
                "controlnet residuals: {} and {} skip connections",
                self.down.len(),
                other.down.len()
            );
        }
        Ok(Residuals {
            down: self
                .down
                .iter()
                .zip(&other.down)
                .map(|(a, b)| a + b)
                .collect::<R<_>>()?,
            mid: (&self.mid + &other.mid)?,
        })
    }
}

/// The whole UNet.
pub struct UNet {
    parts: Parts,
    config: UNetConfig,
}

fn spatial(vb: VarBuilder, c: &UNetConfig, channels: usize, i: usize) -> R<SpatialTransformer> {
    SpatialTransformer::new(
        vb,
        channels,
        c.num_heads[i],
        c.transformer_layers[i],
        c.cross_attention_dim,
        c.norm_num_groups,
        c.use_linear_projection,
    )
}

fn temb_dim(c: &UNetConfig) -> usize {
    c.block_out_channels[0] * 4
}

pub(crate) fn build_head(vb: &VarBuilder, c: &UNetConfig) -> R<Head> {
    let ch0 = c.block_out_channels[0];
    let temb = temb_dim(c);
    Ok(Head {
        conv_in: conv(c.in_channels, ch0, 3, 1, 1, vb.pp("conv_in"))?,
        time_linear_1: linear(ch0, temb, vb.pp("time_embedding").pp("linear_1"))?,
        time_linear_2: linear(temb, temb, vb.pp("time_embedding").pp("linear_2"))?,
        add_linear: match c.added {
            None => None,
            Some(a) => Some((
                linear(a.in_dim, temb, vb.pp("add_embedding").pp("linear_1"))?,
                linear(temb, temb, vb.pp("add_embedding").pp("linear_2"))?,
            )),
        },
    })
}

pub(crate) fn build_down(vb: &VarBuilder, c: &UNetConfig, i: usize) -> R<Level> {
    let ch = &c.block_out_channels;
    let n = ch.len();
    let (g, eps, temb) = (c.norm_num_groups, c.norm_eps, temb_dim(c));
    let vb = vb.pp("down_blocks").pp(i);
    let cin = if i == 0 { ch[0] } else { ch[i - 1] };
    let mut resnets = Vec::new();
    let mut attentions = Vec::new();
    for j in 0..c.layers_per_block {
        let rin = if j == 0 { cin } else { ch[i] };
        resnets.push(ResnetBlock::new(
            vb.pp("resnets").pp(j),
            rin,
            ch[i],
            temb,
            g,
            eps,
            1.0,
        )?);
        if c.cross_attn[i] {
            attentions.push(spatial(vb.pp("attentions").pp(j), c, ch[i], i)?);
        }
    }
    let sampler = if i + 1 < n {
        Some(conv(
            ch[i],
            ch[i],
            3,
            2,
            c.downsample_padding,
            vb.pp("downsamplers").pp(0).pp("conv"),
        )?)
    } else {
        None
    };
    Ok(Level {
        resnets,
        attentions,
        sampler,
    })
}

pub(crate) fn build_mid(vb: &VarBuilder, c: &UNetConfig) -> R<Mid> {
    let n = c.block_out_channels.len();
    let last = c.block_out_channels[n - 1];
    let (g, eps, temb) = (c.norm_num_groups, c.norm_eps, temb_dim(c));
    let mvb = vb.pp("mid_block");
    let resnet = |j: usize| {
        ResnetBlock::new(
            mvb.pp("resnets").pp(j),
            last,
            last,
            temb,
            g,
            eps,
            c.mid_block_scale_factor,
        )
    };
    Ok(Mid {
        resnets: [resnet(0)?, resnet(1)?],
        attention: spatial(mvb.pp("attentions").pp(0), c, last, n - 1)?,
    })
}

fn build_up(vb: &VarBuilder, c: &UNetConfig, i: usize) -> R<Level> {
    let ch = &c.block_out_channels;
    let n = ch.len();
    let (g, eps, temb) = (c.norm_num_groups, c.norm_eps, temb_dim(c));
    let vb = vb.pp("up_blocks").pp(i);
    let level = n - 1 - i;
    let out = ch[level];
    let prev_out = if i == 0 { ch[n - 1] } else { ch[level + 1] };
    let skip_in = ch[level.saturating_sub(1)];
    let layers = c.layers_per_block + 1;
    let mut resnets = Vec::new();
    let mut attentions = Vec::new();
    for j in 0..layers {
        let res_skip = if j == layers - 1 { skip_in } else { out };
        let rin = if j == 0 { prev_out } else { out };
        resnets.push(ResnetBlock::new(
            vb.pp("resnets").pp(j),
            rin + res_skip,
            out,
            temb,
            g,
            eps,
            1.0,
        )?);
        if c.cross_attn[level] {
            attentions.push(spatial(vb.pp("attentions").pp(j), c, out, level)?);
        }
    }
    let sampler = if i + 1 < n {
        Some(conv(
            out,
            out,
            3,
            1,
            1,
            vb.pp("upsamplers").pp(0).pp("conv"),
        )?)
    } else {
        None
    };
    Ok(Level {
        resnets,
        attentions,
        sampler,
    })
}

fn build_tail(vb: &VarBuilder, c: &UNetConfig) -> R<Tail> {
    let ch0 = c.block_out_channels[0];
    Ok(Tail {
        norm_out: group_norm(c.norm_num_groups, ch0, c.norm_eps, vb.pp("conv_norm_out"))?,
        conv_out: conv(ch0, c.out_channels, 3, 1, 1, vb.pp("conv_out"))?,
    })
}

impl UNet {
    /// Every part built now on `vb`'s device.
    pub fn new(vb: VarBuilder, c: &UNetConfig) -> R<Self> {
        let n = c.block_out_channels.len();
        Ok(Self {
            parts: Parts::Resident(Box::new(Resident {
                head: build_head(&vb, c)?,
                down: (0..n).map(|i| build_down(&vb, c, i)).collect::<R<_>>()?,
                mid: build_mid(&vb, c)?,
                up: (0..n).map(|i| build_up(&vb, c, i)).collect::<R<_>>()?,
                tail: build_tail(&vb, c)?,
            })),
            config: c.clone(),
        })
    }

    /// Parts built from `vb` for each forward pass, one at a time, and dropped after use
    /// (lowvram: `vb` serves weights kept in RAM). Every part is built once here, so
    /// missing or misshapen weights fail at load time.
    pub fn streamed(vb: VarBuilder<'static>, c: &UNetConfig) -> R<Self> {
        let n = c.block_out_channels.len();
        build_head(&vb, c)?;
        for i in 0..n {
            build_down(&vb, c, i)?;
        }
        build_mid(&vb, c)?;
        for i in 0..n {
            build_up(&vb, c, i)?;
        }
        build_tail(&vb, c)?;
        Ok(Self {
            parts: Parts::Streamed(vb),
            config: c.clone(),
        })
    }

    pub fn is_streamed(&self) -> bool {
        matches!(self.parts, Parts::Streamed(_))
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// A part: borrowed when resident, built from the weights when streamed.
    fn part<'a, T>(
        &'a self,
        resident: impl FnOnce(&'a Resident) -> &'a T,
        build: impl FnOnce(&VarBuilder<'static>, &UNetConfig) -> R<T>,
    ) -> R<Held<'a, T>> {
        match &self.parts {
            Parts::Resident(r) => Ok(Held::Ref(resident(r))),
            Parts::Streamed(vb) => Ok(Held::Own(build(vb, &self.config)?)),
        }
    }

    /// Predicts noise (or v) for `sample` [b, c, h, w] at `timestep` given `context` [b, tokens, dim].
    pub fn forward(&self, sample: &Tensor, timestep: f64, context: &Tensor) -> R<Tensor> {
        self.forward_with(sample, timestep, context, Forward::default())
    }

    pub fn forward_with(
        &self,
        sample: &Tensor,
        timestep: f64,
        context: &Tensor,
        opts: Forward<'_>,
    ) -> R<Tensor> {
        let c = &self.config;
        let slice = opts.attention_slice;
        let (b, _, h, w) = sample.dims4()?;
        let dtype = sample.dtype();
        let n = c.block_out_channels.len();
        let factor = 1usize << (n - 1);
        let odd_size = h % factor != 0 || w % factor != 0;

        let sample = if c.center_input_sample {
            ((sample * 2.0)? - 1.0)?
        } else {
            sample.clone()
        };
        let dev = sample.device();
        let (temb, mut x) = {
            let head = scope("weights to device (lowvram)", dev, || {
                self.part(|r| &r.head, build_head)
            })?;
            let temb = head.embed(c, timestep, b, dtype, dev, opts.added)?;
            (
                temb,
                scope("conv 3x3", dev, || head.conv_in.forward(&sample))?,
            )
        };

        let mut skips = vec![x.clone()];
        for i in 0..n {
            let level = scope("weights to device (lowvram)", dev, || {
                self.part(|r| &r.down[i], |vb, c| build_down(vb, c, i))
            })?;
            x = level.down(&x, &temb, context, slice, c, &mut skips)?;
        }
        if let Some(control) = opts.control {
            if control.down.len() != skips.len() {
                candle_core::bail!(
                    "the ControlNet gives {} residuals, the UNet has {} skip connections",
                    control.down.len(),
                    skips.len()
                );
            }
            skips = scope("controlnet residuals", dev, || {
                skips
                    .iter()
                    .zip(&control.down)
                    .map(|(s, r)| s.broadcast_add(r))
                    .collect::<R<Vec<_>>>()
            })?;
        }

        {
            let mid = scope("weights to device (lowvram)", dev, || {
                self.part(|r| &r.mid, build_mid)
            })?;
            x = mid.forward(&x, &temb, context, slice)?;
        }
        if let Some(control) = opts.control {
            x = scope("controlnet residuals", dev, || {
                x.broadcast_add(&control.mid)
            })?;
        }

        for i in 0..n {
            let level = scope("weights to device (lowvram)", dev, || {
                self.part(|r| &r.up[i], |vb, c| build_up(vb, c, i))
            })?;
            for (j, resnet) in level.resnets.iter().enumerate() {
                let skip = skips.pop().ok_or_else(|| {
                    candle_core::Error::Msg("unet: skip connections exhausted".into())
                })?;
                x = scope("skip concat", dev, || Tensor::cat(&[&x, &skip], 1))?;
                x = resnet.forward(&x, &temb)?;
                if let Some(attn) = level.attentions.get(j) {
                    x = attn.forward(&x, context, slice)?;
                }
            }
            if let Some(us) = &level.sampler {
                let (_, _, xh, xw) = x.dims4()?;
                let (th, tw) = match (odd_size, skips.last()) {
                    (true, Some(s)) => (s.dim(2)?, s.dim(3)?),
                    _ => (xh * 2, xw * 2),
                };
                x = scope("down/upsampling", dev, || {
                    us.forward(&crate::engine::conv::upsample_nearest2d(&x, th, tw)?)
                })?;
            }
        }

        let tail = scope("weights to device (lowvram)", dev, || {
            self.part(|r| &r.tail, build_tail)
        })?;
        let x = scope("groupnorm+silu", dev, || tail.norm_out.forward_silu(&x))?;
        let out = scope("conv 3x3", dev, || tail.conv_out.forward(&x))?;
        if out.dtype() != dtype {
            out.to_dtype(dtype)
        } else {
            Ok(out)
        }
    }
}
