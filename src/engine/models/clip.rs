//! CLIP text encoder (transformers' `CLIPTextModel`), built from `text_encoder/config.json`.
//!
//! Causal self-attention over the 77 token positions, pre-norm residual blocks, and a final
//! layer norm; `forward` returns `last_hidden_state`, which Stable Diffusion conditions on.
//! Written here rather than taken from candle-transformers because that one cannot be
//! configured from a file and approximates GELU with tanh (transformers uses exact erf GELU).

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{embedding, layer_norm, linear, Embedding, LayerNorm, Linear, VarBuilder};

use crate::engine::config::{Activation, ClipConfig};

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(vb: VarBuilder, c: &ClipConfig) -> candle_core::Result<Self> {
        let d = c.hidden_size;
        Ok(Self {
            q: linear(d, d, vb.pp("q_proj"))?,
            k: linear(d, d, vb.pp("k_proj"))?,
            v: linear(d, d, vb.pp("v_proj"))?,
            out: linear(d, d, vb.pp("out_proj"))?,
            heads: c.num_attention_heads,
            head_dim: d / c.num_attention_heads,
        })
    }

    fn forward(&self, xs: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, d) = xs.dims3()?;
        let split = |x: Tensor| -> candle_core::Result<Tensor> {
            x.reshape((b, t, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let scale = (self.head_dim as f64).powf(-0.5);
        let q = split((self.q.forward(xs)? * scale)?)?;
        let k = split(self.k.forward(xs)?)?;
        let v = split(self.v.forward(xs)?)?;
        let scores = q.matmul(&k.t()?)?.broadcast_add(mask)?;
        // The softmax in f32 whatever the dtype (as PyTorch's attention kernels do).
        let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?
            .to_dtype(scores.dtype())?;
        let ys = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))?;
        self.out.forward(&ys)
    }
}

struct EncoderLayer {
    ln1: LayerNorm,
    attn: Attention,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl EncoderLayer {
    fn new(vb: VarBuilder, c: &ClipConfig) -> candle_core::Result<Self> {
        Ok(Self {
            ln1: layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("layer_norm1"))?,
            attn: Attention::new(vb.pp("self_attn"), c)?,
            ln2: layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: linear(c.hidden_size, c.intermediate_size, vb.pp("mlp").pp("fc1"))?,
            fc2: linear(c.intermediate_size, c.hidden_size, vb.pp("mlp").pp("fc2"))?,
            act: c.activation,
        })
    }

    fn forward(&self, xs: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let h = (xs + self.attn.forward(&self.ln1.forward(xs)?, mask)?)?;
        let m = self.fc1.forward(&self.ln2.forward(&h)?)?;
        let m = match self.act {
            Activation::QuickGelu => (&m * candle_nn::ops::sigmoid(&(&m * 1.702)?)?)?,
            Activation::Gelu => m.gelu_erf()?,
        };
        h + self.fc2.forward(&m)?
    }
}

/// The text transformer. Weights live under `text_model.` in the safetensors file.
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_norm: LayerNorm,
    max_positions: usize,
    /// `CLIPTextModelWithProjection`'s `text_projection` (SDXL's second encoder): pooled
    /// output → text embedding.
    projection: Option<Linear>,
}

impl ClipTextModel {
    pub fn new(vb: VarBuilder, c: &ClipConfig) -> candle_core::Result<Self> {
        let top = vb.clone();
        // Hub checkpoints prefix every weight with `text_model.`; transformers 5 saves without.
        let vb = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb
        };
        let emb = vb.pp("embeddings");
        let token_embedding = embedding(c.vocab_size, c.hidden_size, emb.pp("token_embedding"))?;
        let position_embedding = emb
            .pp("position_embedding")
            .get((c.max_position_embeddings, c.hidden_size), "weight")?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| EncoderLayer::new(vb.pp("encoder").pp("layers").pp(i), c))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let final_norm = layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("final_layer_norm"))?;
        // The projection sits beside `text_model`, at the top of the file.
        let projection = if top.contains_tensor("text_projection.weight") {
            let w = top.get_unchecked("text_projection.weight")?;
            let (out, inp) = w.dims2()?;
            if inp != c.hidden_size {
                candle_core::bail!(
                    "text_projection.weight is [{out}, {inp}], expected [_, {}]",
                    c.hidden_size
                );
            }
            Some(Linear::new(w, None))
        } else {
            None
        };
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_norm,
            max_positions: c.max_position_embeddings,
            projection,
        })
    }

    fn causal_mask(t: usize, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        Tensor::from_vec(mask, (1, 1, t, t), device)?.to_dtype(dtype)
    }

    /// `ids`: u32 [batch, tokens] → `last_hidden_state` [batch, tokens, hidden].
    pub fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_skip(ids, 1)
    }

    /// A1111's "Clip skip": 1 is the last layer, 2 stops one layer earlier, …; the final
    /// layer norm is applied either way.
    pub fn forward_skip(&self, ids: &Tensor, clip_skip: usize) -> candle_core::Result<Tensor> {
        self.forward_skip_fixed(ids, clip_skip, &[])
    }

    /// The token embeddings of `ids` [1, t] with `fixes` written over them: (first
    /// position, vectors [n, hidden]), a textual-inversion embedding's vectors in place of
    /// the placeholder tokens (A1111's `EmbeddingsWithFixes`).
    fn embed(&self, ids: &Tensor, fixes: &[(usize, &Tensor)]) -> candle_core::Result<Tensor> {
        let mut xs = self.token_embedding.forward(ids)?;
        for (at, v) in fixes {
            let v = v
                .to_device(xs.device())?
                .to_dtype(xs.dtype())?
                .unsqueeze(0)?;
            let n = v.dim(1)?;
            let t = xs.dim(1)?;
            if at + n > t || v.dim(2)? != xs.dim(2)? {
                candle_core::bail!(
                    "embedding of {n} vectors at position {at} does not fit {:?}",
                    xs.dims()
                );
            }
            xs = xs.slice_assign(&[0..1, *at..at + n, 0..xs.dim(2)?], &v)?;
        }
        Ok(xs)
    }

    /// [`Self::forward_skip`] with embeddings placed (see [`Self::embed`]).
    pub fn forward_skip_fixed(
        &self,
        ids: &Tensor,
        clip_skip: usize,
        fixes: &[(usize, &Tensor)],
    ) -> candle_core::Result<Tensor> {
        let keep = self
            .layers
            .len()
            .saturating_sub(clip_skip.max(1) - 1)
            .max(1);
        let (_, t) = ids.dims2()?;
        if t > self.max_positions {
            candle_core::bail!(
                "{t} tokens exceed the text encoder's {} positions",
                self.max_positions
            );
        }
        let pos = self.position_embedding.narrow(0, 0, t)?;
        let mut xs = self.embed(ids, fixes)?.broadcast_add(&pos)?;
        let mask = Self::causal_mask(t, xs.dtype(), xs.device())?;
        for layer in &self.layers[..keep] {
            xs = layer.forward(&xs, &mask)?;
        }
        self.final_norm.forward(&xs)
    }

    /// SDXL's use (diffusers' `hidden_states[-(skip + 1)]`): the output of all but the last
    /// `skip` layers, *without* the final layer norm (`skip` 1: the penultimate layer), and,
    /// for an encoder with a projection, the pooled text embedding: the final-normed last
    /// layer at the first end-of-text token (the largest id), projected.
    pub fn forward_hidden(
        &self,
        ids: &Tensor,
        skip: usize,
    ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        self.forward_hidden_fixed(ids, skip, &[])
    }

    /// [`Self::forward_hidden`] with embeddings placed (see [`Self::embed`]).
    pub fn forward_hidden_fixed(
        &self,
        ids: &Tensor,
        skip: usize,
        fixes: &[(usize, &Tensor)],
    ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let (_, t) = ids.dims2()?;
        if t > self.max_positions {
            candle_core::bail!(
                "{t} tokens exceed the text encoder's {} positions",
                self.max_positions
            );
        }
        let keep = self.layers.len().saturating_sub(skip.max(1)).max(1);
        let pos = self.position_embedding.narrow(0, 0, t)?;
        let mut xs = self.embed(ids, fixes)?.broadcast_add(&pos)?;
        let mask = Self::causal_mask(t, xs.dtype(), xs.device())?;
        let mut hidden = None;
        let last = if self.projection.is_some() {
            self.layers.len()
        } else {
            keep
        };
        for (i, layer) in self.layers[..last].iter().enumerate() {
            xs = layer.forward(&xs, &mask)?;
            if i + 1 == keep {
                hidden = Some(xs.clone());
            }
        }
        let hidden = hidden.unwrap_or_else(|| xs.clone());
        let Some(proj) = &self.projection else {
            return Ok((hidden, None));
        };
        let normed = self.final_norm.forward(&xs)?;
        let eos = ids.argmax(D::Minus1)?.to_vec1::<u32>()?;
        let rows = eos
            .iter()
            .enumerate()
            .map(|(i, &p)| normed.get(i)?.get(p as usize)?.unsqueeze(0))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let pooled = proj.forward(&Tensor::cat(&rows, 0)?)?;
        Ok((hidden, Some(pooled)))
    }

    pub fn has_projection(&self) -> bool {
        self.projection.is_some()
    }

    pub fn hidden_size(&self) -> usize {
        self.position_embedding.dim(D::Minus1).unwrap_or(0)
    }
}
