//! Typed views of the diffusers config files (`unet/config.json`, `vae/config.json`,
//! `text_encoder/config.json`, `scheduler/scheduler_config.json`, `model_index.json`).
//!
//! Architecture comes from these files, never from presets. Each field is read with the
//! default diffusers/transformers use when it is absent; a value we cannot run is an
//! error naming the file and the field.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::engine::error::{Error, Result};

/// A parsed JSON object plus the file it came from, with typed getters whose errors name both.
#[derive(Debug, Clone)]
pub struct JsonConfig {
    pub path: PathBuf,
    pub map: Map<String, Value>,
}

impl JsonConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::NotFound {
                    what: "config file".into(),
                    path: path.to_path_buf(),
                }
            } else {
                Error::read(path, e)
            }
        })?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| Error::read(path, format!("invalid JSON: {e}")))?;
        match value {
            Value::Object(map) => Ok(Self {
                path: path.to_path_buf(),
                map,
            }),
            _ => Err(Error::read(path, "expected a JSON object")),
        }
    }

    pub fn from_value(path: PathBuf, value: Value) -> Self {
        let map = match value {
            Value::Object(map) => map,
            _ => Map::new(),
        };
        Self { path, map }
    }

    pub fn err(&self, field: &str, reason: impl Into<String>) -> Error {
        Error::Config {
            path: self.path.clone(),
            field: field.to_string(),
            reason: reason.into(),
        }
    }

    /// The value, with JSON null treated as absent.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    pub fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_u64().map(|x| x as usize).ok_or_else(|| {
                self.err(key, format!("expected a non-negative integer, found {v}"))
            }),
        }
    }

    pub fn usize_req(&self, key: &str) -> Result<usize> {
        match self.get(key) {
            None => Err(self.err(key, "missing")),
            Some(_) => self.usize_or(key, 0),
        }
    }

    pub fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.err(key, format!("expected a number, found {v}"))),
        }
    }

    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(key, format!("expected true or false, found {v}"))),
        }
    }

    pub fn str_or<'a>(&'a self, key: &str, default: &'a str) -> Result<&'a str> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_str()
                .ok_or_else(|| self.err(key, format!("expected a string, found {v}"))),
        }
    }

    /// A list of integers, or one integer repeated `n` times (diffusers accepts both).
    pub fn usize_list_or_int(
        &self,
        key: &str,
        n: usize,
        default: Option<usize>,
    ) -> Result<Vec<usize>> {
        match self.get(key) {
            None => match default {
                Some(d) => Ok(vec![d; n]),
                None => Err(self.err(key, "missing")),
            },
            Some(Value::Array(items)) => {
                let list = items
                    .iter()
                    .map(|v| v.as_u64().map(|x| x as usize))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| self.err(key, "expected a list of integers"))?;
                if list.len() != n {
                    return Err(self.err(
                        key,
                        format!("expected {n} entries (one per block), found {}", list.len()),
                    ));
                }
                Ok(list)
            }
            Some(v) => v
                .as_u64()
                .map(|x| vec![x as usize; n])
                .ok_or_else(|| self.err(key, format!("expected an integer or a list, found {v}"))),
        }
    }

    /// A list of integers (`default` when absent).
    pub fn usize_list(&self, key: &str, default: &[usize]) -> Result<Vec<usize>> {
        match self.get(key) {
            None => Ok(default.to_vec()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_u64().map(|x| x as usize))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| self.err(key, "expected a list of integers")),
            Some(v) => Err(self.err(key, format!("expected a list of integers, found {v}"))),
        }
    }

    pub fn str_list(&self, key: &str) -> Result<Vec<String>> {
        match self.get(key) {
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| self.err(key, "expected a list of strings")),
            Some(v) => Err(self.err(key, format!("expected a list of strings, found {v}"))),
            None => Err(self.err(key, "missing")),
        }
    }

    /// Fails unless the field is absent, null, or one of `allowed`.
    pub fn expect_str_in(&self, key: &str, allowed: &[&str]) -> Result<()> {
        if let Some(v) = self.get(key) {
            let s = v.as_str().unwrap_or("");
            if !allowed.contains(&s) {
                return Err(self.err(
                    key,
                    format!("{v} is not supported (supported: {})", allowed.join(", ")),
                ));
            }
        }
        Ok(())
    }

    /// Fails if the field holds anything but null/absent (features we do not implement).
    pub fn expect_absent(&self, key: &str) -> Result<()> {
        match self.get(key) {
            None => Ok(()),
            Some(v) => Err(self.err(key, format!("{v} is not supported"))),
        }
    }
}

/// `unet/config.json` of a UNet2DConditionModel.
#[derive(Debug, Clone)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    /// Per down block: does it have cross-attention transformers?
    pub cross_attn: Vec<bool>,
    pub layers_per_block: usize,
    /// Attention heads per block (diffusers' `attention_head_dim` is, in practice, the head count).
    pub num_heads: Vec<usize>,
    pub transformer_layers: Vec<usize>,
    pub cross_attention_dim: usize,
    pub use_linear_projection: bool,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub center_input_sample: bool,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub sample_size: usize,
    /// SDXL's added conditions (`addition_embed_type: "text_time"`).
    pub added: Option<AddedConditions>,
}

/// SDXL's `text_time` added conditions: six size/crop numbers, each through sinusoidal
/// features of `time_dim`, concatenated with the pooled text embedding (`in_dim` in all)
/// and projected into the timestep embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddedConditions {
    pub time_dim: usize,
    pub in_dim: usize,
}

impl UNetConfig {
    pub fn from_json(c: &JsonConfig) -> Result<Self> {
        let block_out_channels = c.usize_list("block_out_channels", &[320, 640, 1280, 1280])?;
        let n = block_out_channels.len();
        if n == 0 {
            return Err(c.err("block_out_channels", "empty"));
        }
        let down = c.str_list("down_block_types")?;
        let up = c.str_list("up_block_types")?;
        if down.len() != n {
            return Err(c.err(
                "down_block_types",
                format!("{} entries but block_out_channels has {n}", down.len()),
            ));
        }
        if up.len() != n {
            return Err(c.err(
                "up_block_types",
                format!("{} entries but block_out_channels has {n}", up.len()),
            ));
        }
        let mut cross_attn = Vec::with_capacity(n);
        for (i, t) in down.iter().enumerate() {
            cross_attn.push(match t.as_str() {
                "CrossAttnDownBlock2D" => true,
                "DownBlock2D" => false,
                other => {
                    return Err(c.err(
                        "down_block_types",
                        format!("block type {other:?} is not supported"),
                    ))
                }
            });
            let up_t = &up[n - 1 - i];
            let up_cross = match up_t.as_str() {
                "CrossAttnUpBlock2D" => true,
                "UpBlock2D" => false,
                other => {
                    return Err(c.err(
                        "up_block_types",
                        format!("block type {other:?} is not supported"),
                    ))
                }
            };
            if up_cross != cross_attn[i] {
                return Err(c.err(
                    "up_block_types",
                    "must mirror down_block_types (cross-attention in the same levels)",
                ));
            }
        }
        c.expect_str_in("mid_block_type", &["UNetMidBlock2DCrossAttn"])?;
        c.expect_str_in("time_embedding_type", &["positional"])?;
        c.expect_str_in("act_fn", &["silu"])?;
        c.expect_str_in("resnet_time_scale_shift", &["default"])?;
        c.expect_absent("class_embed_type")?;
        let added = match c.get("addition_embed_type").and_then(|v| v.as_str()) {
            None => None,
            Some("text_time") => Some(AddedConditions {
                time_dim: c.usize_req("addition_time_embed_dim")?,
                in_dim: c.usize_req("projection_class_embeddings_input_dim")?,
            }),
            Some(other) => {
                return Err(c.err(
                    "addition_embed_type",
                    format!("{other:?} is not supported (text_time: SDXL)"),
                ))
            }
        };
        c.expect_absent("encoder_hid_dim")?;
        c.expect_absent("time_cond_proj_dim")?;
        if c.bool_or("dual_cross_attention", false)? {
            return Err(c.err("dual_cross_attention", "true is not supported"));
        }
        if matches!(
            c.get("only_cross_attention"),
            Some(Value::Bool(true)) | Some(Value::Array(_))
        ) {
            let any = match c.get("only_cross_attention") {
                Some(Value::Array(a)) => a.iter().any(|v| v.as_bool() == Some(true)),
                _ => true,
            };
            if any {
                return Err(c.err("only_cross_attention", "true is not supported"));
            }
        }
        let layers_per_block = match c.get("layers_per_block") {
            Some(Value::Array(_)) => {
                return Err(c.err("layers_per_block", "a per-block list is not supported"))
            }
            _ => c.usize_or("layers_per_block", 2)?,
        };
        // diffusers: num_attention_heads defaults to attention_head_dim (a historical naming quirk).
        let num_heads = if c.get("num_attention_heads").is_some() {
            c.usize_list_or_int("num_attention_heads", n, None)?
        } else {
            c.usize_list_or_int("attention_head_dim", n, Some(8))?
        };
        for (i, (&h, &ch)) in num_heads.iter().zip(&block_out_channels).enumerate() {
            if h == 0 || ch % h != 0 {
                return Err(c.err(
                    "attention_head_dim",
                    format!("block {i}: {ch} channels do not split into {h} heads"),
                ));
            }
        }
        let transformer_layers = c.usize_list_or_int("transformer_layers_per_block", n, Some(1))?;
        let cross_attention_dim = match c.get("cross_attention_dim") {
            Some(Value::Array(_)) => {
                return Err(c.err("cross_attention_dim", "a per-block list is not supported"))
            }
            _ => c.usize_or("cross_attention_dim", 1280)?,
        };
        let norm_num_groups = c.usize_or("norm_num_groups", 32)?;
        for &ch in &block_out_channels {
            if norm_num_groups == 0 || ch % norm_num_groups != 0 {
                return Err(c.err(
                    "norm_num_groups",
                    format!("{norm_num_groups} groups do not divide {ch} channels"),
                ));
            }
        }
        Ok(Self {
            in_channels: c.usize_or("in_channels", 4)?,
            out_channels: c.usize_or("out_channels", 4)?,
            block_out_channels,
            cross_attn,
            layers_per_block,
            num_heads,
            transformer_layers,
            cross_attention_dim,
            use_linear_projection: c.bool_or("use_linear_projection", false)?,
            norm_num_groups,
            norm_eps: c.f64_or("norm_eps", 1e-5)?,
            flip_sin_to_cos: c.bool_or("flip_sin_to_cos", true)?,
            freq_shift: c.f64_or("freq_shift", 0.0)?,
            center_input_sample: c.bool_or("center_input_sample", false)?,
            downsample_padding: c.usize_or("downsample_padding", 1)?,
            mid_block_scale_factor: c.f64_or("mid_block_scale_factor", 1.0)?,
            sample_size: c.usize_or("sample_size", 64)?,
            added,
        })
    }
}

/// `vae/config.json` of an AutoencoderKL.
#[derive(Debug, Clone)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub scaling_factor: f64,
    pub shift_factor: f64,
    /// Pixels per side of a tile in tiled decode (diffusers' `tile_sample_min_size`).
    pub sample_size: usize,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
}

impl VaeConfig {
    pub fn from_json(c: &JsonConfig) -> Result<Self> {
        let block_out_channels = c.usize_list("block_out_channels", &[64])?;
        if block_out_channels.is_empty() {
            return Err(c.err("block_out_channels", "empty"));
        }
        if let Some(Value::Array(types)) = c.get("down_block_types") {
            if types
                .iter()
                .any(|t| t.as_str() != Some("DownEncoderBlock2D"))
            {
                return Err(c.err("down_block_types", "only DownEncoderBlock2D is supported"));
            }
        }
        if let Some(Value::Array(types)) = c.get("up_block_types") {
            if types.iter().any(|t| t.as_str() != Some("UpDecoderBlock2D")) {
                return Err(c.err("up_block_types", "only UpDecoderBlock2D is supported"));
            }
        }
        c.expect_str_in("act_fn", &["silu"])?;
        let norm_num_groups = c.usize_or("norm_num_groups", 32)?;
        for &ch in &block_out_channels {
            if norm_num_groups == 0 || ch % norm_num_groups != 0 {
                return Err(c.err(
                    "norm_num_groups",
                    format!("{norm_num_groups} groups do not divide {ch} channels"),
                ));
            }
        }
        Ok(Self {
            in_channels: c.usize_or("in_channels", 3)?,
            out_channels: c.usize_or("out_channels", 3)?,
            block_out_channels,
            layers_per_block: c.usize_or("layers_per_block", 1)?,
            latent_channels: c.usize_or("latent_channels", 4)?,
            norm_num_groups,
            scaling_factor: c.f64_or("scaling_factor", 0.18215)?,
            shift_factor: c.f64_or("shift_factor", 0.0)?,
            sample_size: match c.get("sample_size") {
                // Some configs give [height, width]; diffusers tiles by the first.
                Some(Value::Array(v)) => v
                    .first()
                    .and_then(|x| x.as_u64())
                    .map(|x| x as usize)
                    .ok_or_else(|| c.err("sample_size", "expected an integer or a list of them"))?,
                _ => c.usize_or("sample_size", 512)?,
            },
            use_quant_conv: c.bool_or("use_quant_conv", true)?,
            use_post_quant_conv: c.bool_or("use_post_quant_conv", true)?,
        })
    }

    /// Tiled decode's tile: (latent cells, pixels) per side, as diffusers.
    pub fn tile(&self) -> (usize, usize) {
        let px = self.sample_size.max(self.scale_factor());
        (px / self.scale_factor(), px)
    }

    /// Pixels per latent: 2^(levels - 1), as diffusers' `vae_scale_factor`.
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// CLIP text model activation (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    QuickGelu,
    Gelu,
}

/// `text_encoder/config.json` of a CLIPTextModel.
#[derive(Debug, Clone)]
pub struct ClipConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub activation: Activation,
    pub layer_norm_eps: f64,
}

impl ClipConfig {
    pub fn from_json(c: &JsonConfig) -> Result<Self> {
        // Some configs nest the text settings under "text_config" (full CLIPModel configs).
        let nested;
        let c = match c.get("text_config") {
            Some(v @ Value::Object(_)) => {
                nested = JsonConfig::from_value(c.path.clone(), v.clone());
                &nested
            }
            _ => c,
        };
        let activation = match c.str_or("hidden_act", "quick_gelu")? {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            other => {
                return Err(c.err(
                    "hidden_act",
                    format!("{other:?} is not supported (quick_gelu, gelu)"),
                ))
            }
        };
        let hidden_size = c.usize_or("hidden_size", 512)?;
        let num_attention_heads = c.usize_or("num_attention_heads", 8)?;
        if num_attention_heads == 0 || hidden_size % num_attention_heads != 0 {
            return Err(c.err(
                "num_attention_heads",
                format!("{hidden_size} does not split into {num_attention_heads} heads"),
            ));
        }
        Ok(Self {
            vocab_size: c.usize_or("vocab_size", 49408)?,
            hidden_size,
            intermediate_size: c.usize_or("intermediate_size", 2048)?,
            num_hidden_layers: c.usize_or("num_hidden_layers", 12)?,
            num_attention_heads,
            max_position_embeddings: c.usize_or("max_position_embeddings", 77)?,
            activation,
            layer_norm_eps: c.f64_or("layer_norm_eps", 1e-5)?,
        })
    }
}
