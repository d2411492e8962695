//! Single-file checkpoints in the original Stable Diffusion key layout (what A1111 reads from
//! models/Stable-diffusion/): `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE),
//! `cond_stage_model.transformer.*` (SD 1.x CLIP) or `cond_stage_model.model.*` (SD 2.x
//! OpenCLIP with packed q/k/v). Keys are renamed to diffusers' names on the fly, the
//! architecture is inferred from tensor shapes, and anything we do not use (EMA copies,
//! noise-schedule buffers, OpenCLIP's unused last layer, logit_scale) is ignored.
//!
//! The key correspondence is a fact of the two formats (as diffusers' and A1111's converters
//! document it); the code is ours.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::engine::config::{Activation, ClipConfig, JsonConfig, UNetConfig, VaeConfig};
use crate::engine::error::{Error, Result};
use crate::engine::schedulers::SchedulerConfig;

const UNET: &str = "model.diffusion_model.";
const VAE: &str = "first_stage_model.";
const CLIP_L: &str = "cond_stage_model.transformer.";
const OPEN_CLIP: &str = "cond_stage_model.model.";
/// SDXL (SGM layout): CLIP ViT-L in transformers' names, OpenCLIP ViT-bigG in its own.
const SDXL_CLIP_L: &str = "conditioner.embedders.0.transformer.";
const SDXL_OPEN_CLIP: &str = "conditioner.embedders.1.model.";

/// Where a diffusers-named tensor comes from.
#[derive(Debug, Clone)]
enum Src {
    Same(String),
    /// Rows `part`/3 of a packed q/k/v tensor (OpenCLIP's `in_proj_*`).
    Third(String, usize),
    /// A matrix stored the other way round (OpenCLIP's `text_projection`, used as x @ P).
    Transposed(String),
}

/// The VAE architecture from an original-layout VAE's tensor shapes (`prefix` is
/// `first_stage_model.` inside a checkpoint, empty in a standalone VAE file), and its number
/// of resolution levels.
fn vae_config_from(
    shapes: &HashMap<String, Vec<usize>>,
    prefix: &str,
    path: &Path,
) -> Result<(VaeConfig, usize)> {
    let shape = |k: &str| -> Result<&Vec<usize>> {
        shapes.get(k).ok_or_else(|| Error::Weights {
            component: "vae",
            path: path.to_path_buf(),
            reason: format!("missing tensor {k}"),
        })
    };
    let levels = (0..8)
        .take_while(|i| {
            shapes.contains_key(&format!("{prefix}encoder.down.{i}.block.0.conv1.weight"))
        })
        .count();
    if levels == 0 {
        return Err(Error::Weights {
            component: "vae",
            path: path.to_path_buf(),
            reason: format!("missing tensor {prefix}encoder.down.0.block.0.conv1.weight"),
        });
    }
    let blocks: Vec<usize> = (0..levels)
        .map(|i| shape(&format!("{prefix}encoder.down.{i}.block.0.conv1.weight")).map(|s| s[0]))
        .collect::<Result<_>>()?;
    let lpb = (0..8)
        .take_while(|j| {
            shapes.contains_key(&format!("{prefix}encoder.down.0.block.{j}.conv1.weight"))
        })
        .count();
    let config = VaeConfig {
        in_channels: shape(&format!("{prefix}encoder.conv_in.weight"))?[1],
        out_channels: shape(&format!("{prefix}decoder.conv_out.weight"))?[0],
        block_out_channels: blocks,
        layers_per_block: lpb,
        latent_channels: shape(&format!("{prefix}decoder.conv_in.weight"))?[1],
        norm_num_groups: 32,
        scaling_factor: 0.18215,
        shift_factor: 0.0,
        sample_size: 512,
        use_quant_conv: shapes.contains_key(&format!("{prefix}quant_conv.weight")),
        use_post_quant_conv: shapes.contains_key(&format!("{prefix}post_quant_conv.weight")),
    };
    Ok((config, levels))
}

/// A standalone VAE file (what A1111 reads from models/VAE/): the original layout
/// (`encoder.down.0.block…`, with or without `first_stage_model.`) or diffusers' own names.
pub struct VaeFile {
    pub path: PathBuf,
    st: Arc<MmapedSafetensors>,
    map: HashMap<String, Src>,
    pub config: VaeConfig,
}

impl VaeFile {
    pub fn open(path: &Path) -> Result<Self> {
        crate::engine::weights::read_header(path)?;
        // SAFETY: read-only map; the files are never written while loaded.
        #[allow(unsafe_code)]
        let st = unsafe { MmapedSafetensors::new(path) }
            .map_err(|e| Error::read(path, crate::engine::model::candle_msg(&e)))?;
        let shapes: HashMap<String, Vec<usize>> = st
            .tensors()
            .into_iter()
            .map(|(n, v)| (n, v.shape().to_vec()))
            .collect();
        if shapes.keys().any(|k| k.starts_with(UNET)) {
            return Err(Error::invalid(
                "vae",
                format!(
                    "{} is a whole checkpoint, not a VAE (give it as the model instead)",
                    path.display()
                ),
            ));
        }
        let mut map = HashMap::new();
        let config = if shapes.contains_key("encoder.down_blocks.0.resnets.0.conv1.weight") {
            // Diffusers names already: the architecture still comes from the shapes.
            for k in shapes.keys() {
                map.insert(k.clone(), Src::Same(k.clone()));
            }
            let mut c = vae_config_from(&diffusers_as_original(&shapes), "", path)?.0;
            c.use_quant_conv = shapes.contains_key("quant_conv.weight");
            c.use_post_quant_conv = shapes.contains_key("post_quant_conv.weight");
            c
        } else {
            let prefix = if shapes.keys().any(|k| k.starts_with(VAE)) {
                VAE
            } else {
                ""
            };
            let (config, levels) = vae_config_from(&shapes, prefix, path)?;
            for k in shapes.keys() {
                if let Some(r) = k.strip_prefix(prefix) {
                    if let Some(n) = vae_name(r, levels) {
                        map.insert(n, Src::Same(k.clone()));
                    }
                }
            }
            config
        };
        Ok(Self {
            path: path.to_path_buf(),
            st: Arc::new(st),
            map,
            config,
        })
    }

    pub fn vb(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        let backend = Renamed {
            st: self.st.clone(),
            map: self.map.clone(),
            path: self.path.clone(),
        };
        VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
    }
}

/// The few diffusers VAE shapes `vae_config_from` reads, under their original names.
fn diffusers_as_original(shapes: &HashMap<String, Vec<usize>>) -> HashMap<String, Vec<usize>> {
    let mut out = HashMap::new();
    for (k, v) in shapes {
        let renamed = if let Some(r) = k.strip_prefix("encoder.down_blocks.") {
            r.split_once(".resnets.")
                .map(|(i, rest)| format!("encoder.down.{i}.block.{rest}"))
        } else {
            Some(k.clone())
        };
        if let Some(n) = renamed {
            out.insert(n, v.clone());
        }
    }
    out
}

/// An opened checkpoint.
pub struct SingleFile {
    pub path: PathBuf,
    st: Arc<MmapedSafetensors>,
    shapes: HashMap<String, Vec<usize>>,
    unet: HashMap<String, Src>,
    vae: HashMap<String, Src>,
    text: HashMap<String, Src>,
    /// SDXL's OpenCLIP ViT-bigG.
    text2: HashMap<String, Src>,
    pub unet_config: UNetConfig,
    pub vae_config: VaeConfig,
    pub clip_config: ClipConfig,
    pub clip2_config: Option<ClipConfig>,
    pub is_sd2: bool,
    pub is_sdxl: bool,
}

fn resnet_rename(rest: &str) -> String {
    for (a, b) in [
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("emb_layers.1.", "time_emb_proj."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("skip_connection.", "conv_shortcut."),
    ] {
        if let Some(r) = rest.strip_prefix(a) {
            return format!("{b}{r}");
        }
    }
    rest.to_string()
}

/// `input_blocks.4.1.proj_in.weight` → ("4", "1", "proj_in.weight").
fn split3(k: &str) -> Option<(usize, usize, &str)> {
    let mut it = k.splitn(3, '.');
    let a = it.next()?.parse().ok()?;
    let b = it.next()?.parse().ok()?;
    Some((a, b, it.next()?))
}

/// An original (SGM/LDM) UNet weight name, without `model.diffusion_model.`, as diffusers
/// names it (`lpb`: the UNet's layers per block). LoRA files in the original layout use it too.
pub(crate) fn unet_name(k: &str, lpb: usize) -> Option<String> {
    let per = lpb + 1;
    // Layers renamed whole (SDXL's label_emb is diffusers' add_embedding).
    for (from, to) in [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("label_emb.0.0.", "add_embedding.linear_1."),
        ("label_emb.0.2.", "add_embedding.linear_2."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
        ("input_blocks.0.0.", "conv_in."),
    ] {
        if let Some(r) = k.strip_prefix(from) {
            return Some(format!("{to}{r}"));
        }
    }
    if let Some(r) = k.strip_prefix("input_blocks.") {
        let (b, s, rest) = split3(r)?;
        let (level, pos) = ((b - 1) / per, (b - 1) % per);
        return Some(match (pos < lpb, s) {
            (true, 0) => format!("down_blocks.{level}.resnets.{pos}.{}", resnet_rename(rest)),
            (true, 1) => format!("down_blocks.{level}.attentions.{pos}.{rest}"),
            (false, 0) => format!(
                "down_blocks.{level}.downsamplers.0.conv.{}",
                rest.strip_prefix("op.")?
            ),
            _ => return None,
        });
    }
    if let Some(r) = k.strip_prefix("middle_block.") {
        let (s, rest) = r.split_once('.')?;
        return Some(match s {
            "0" => format!("mid_block.resnets.0.{}", resnet_rename(rest)),
            "1" => format!("mid_block.attentions.0.{rest}"),
            "2" => format!("mid_block.resnets.1.{}", resnet_rename(rest)),
            _ => return None,
        });
    }
    if let Some(r) = k.strip_prefix("output_blocks.") {
        let (b, s, rest) = split3(r)?;
        let (level, pos) = (b / per, b % per);
        return Some(match s {
            0 => format!("up_blocks.{level}.resnets.{pos}.{}", resnet_rename(rest)),
            1 if !rest.starts_with("conv.") => format!("up_blocks.{level}.attentions.{pos}.{rest}"),
            1 | 2 => format!("up_blocks.{level}.upsamplers.0.{rest}"),
            _ => return None,
        });
    }
    None
}

fn vae_name(k: &str, levels: usize) -> Option<String> {
    let (half, rest) = k.split_once('.')?;
    if half != "encoder" && half != "decoder" {
        return Some(k.to_string()); // quant_conv, post_quant_conv
    }
    let block = |r: &str| -> String {
        match r.strip_prefix("nin_shortcut.") {
            Some(x) => format!("conv_shortcut.{x}"),
            None => r.to_string(),
        }
    };
    let attn = |r: &str| -> String {
        for (a, b) in [
            ("norm.", "group_norm."),
            ("q.", "to_q."),
            ("k.", "to_k."),
            ("v.", "to_v."),
            ("proj_out.", "to_out.0."),
        ] {
            if let Some(x) = r.strip_prefix(a) {
                return format!("{b}{x}");
            }
        }
        r.to_string()
    };
    let mapped = if let Some(r) = rest.strip_prefix("mid.block_1.") {
        format!("mid_block.resnets.0.{}", block(r))
    } else if let Some(r) = rest.strip_prefix("mid.block_2.") {
        format!("mid_block.resnets.1.{}", block(r))
    } else if let Some(r) = rest.strip_prefix("mid.attn_1.") {
        format!("mid_block.attentions.0.{}", attn(r))
    } else if let Some(r) = rest.strip_prefix("norm_out.") {
        format!("conv_norm_out.{r}")
    } else if let Some(r) = rest.strip_prefix("down.") {
        let (i, r) = r.split_once('.')?;
        if let Some(r) = r.strip_prefix("block.") {
            let (j, r) = r.split_once('.')?;
            format!("down_blocks.{i}.resnets.{j}.{}", block(r))
        } else {
            format!(
                "down_blocks.{i}.downsamplers.0.conv.{}",
                r.strip_prefix("downsample.conv.")?
            )
        }
    } else if let Some(r) = rest.strip_prefix("up.") {
        let (i, r) = r.split_once('.')?;
        let i = levels - 1 - i.parse::<usize>().ok()?; // the decoder counts up from the bottom
        if let Some(r) = r.strip_prefix("block.") {
            let (j, r) = r.split_once('.')?;
            format!("up_blocks.{i}.resnets.{j}.{}", block(r))
        } else {
            format!(
                "up_blocks.{i}.upsamplers.0.conv.{}",
                r.strip_prefix("upsample.conv.")?
            )
        }
    } else {
        rest.to_string() // conv_in, conv_out
    };
    Some(format!("{half}.{mapped}"))
}

/// OpenCLIP names (under `prefix`) → transformers' CLIP names; q/k/v come packed. Layers
/// from `layers` on are left out (SD 2.x conditions on the penultimate one; SDXL keeps all
/// for its pooled output, and its `text_projection`).
fn open_clip_names(prefix: &str, k: &str, layers: usize) -> Vec<(String, Src)> {
    let src = format!("{prefix}{k}");
    let same = |n: String| vec![(n, Src::Same(src.clone()))];
    match k {
        "token_embedding.weight" => {
            return same("text_model.embeddings.token_embedding.weight".into())
        }
        "positional_embedding" => {
            return same("text_model.embeddings.position_embedding.weight".into())
        }
        _ => {}
    }
    if let Some(r) = k.strip_prefix("ln_final.") {
        return same(format!("text_model.final_layer_norm.{r}"));
    }
    if k == "text_projection" {
        return vec![("text_projection.weight".into(), Src::Transposed(src))];
    }
    let Some(r) = k.strip_prefix("transformer.resblocks.") else {
        return vec![];
    };
    let Some((i, r)) = r.split_once('.') else {
        return vec![];
    };
    let Ok(i) = i.parse::<usize>() else {
        return vec![];
    };
    if i >= layers {
        return vec![]; // the last layer: SD 2.x conditions on the penultimate one
    }
    let p = format!("text_model.encoder.layers.{i}.");
    match r {
        "attn.in_proj_weight" | "attn.in_proj_bias" => {
            let kind = if r.ends_with("weight") {
                "weight"
            } else {
                "bias"
            };
            ["q_proj", "k_proj", "v_proj"]
                .iter()
                .enumerate()
                .map(|(j, n)| {
                    (
                        format!("{p}self_attn.{n}.{kind}"),
                        Src::Third(src.clone(), j),
                    )
                })
                .collect()
        }
        _ => {
            for (a, b) in [
                ("attn.out_proj.", "self_attn.out_proj."),
                ("ln_1.", "layer_norm1."),
                ("ln_2.", "layer_norm2."),
                ("mlp.c_fc.", "mlp.fc1."),
                ("mlp.c_proj.", "mlp.fc2."),
            ] {
                if let Some(x) = r.strip_prefix(a) {
                    return same(format!("{p}{b}{x}"));
                }
            }
            vec![]
        }
    }
}

/// CLIP ViT-L's architecture from its tensors (transformers' names under `prefix`, with or
/// without `text_model.`): heads 64 wide.
fn clip_l_config<'a>(
    shape: &dyn Fn(&str) -> Result<&'a Vec<usize>>,
    prefix: &str,
    shapes: &HashMap<String, Vec<usize>>,
) -> Result<ClipConfig> {
    let p = if shapes.contains_key(&format!(
        "{prefix}text_model.embeddings.token_embedding.weight"
    )) {
        "text_model."
    } else {
        ""
    };
    let emb = shape(&format!("{prefix}{p}embeddings.token_embedding.weight"))?;
    let layers = (0..64)
        .take_while(|i| {
            shapes.contains_key(&format!("{prefix}{p}encoder.layers.{i}.layer_norm1.weight"))
        })
        .count();
    Ok(ClipConfig {
        vocab_size: emb[0],
        hidden_size: emb[1],
        intermediate_size: shape(&format!("{prefix}{p}encoder.layers.0.mlp.fc1.weight"))?[0],
        num_hidden_layers: layers,
        num_attention_heads: (emb[1] / 64).max(1),
        max_position_embeddings: shape(&format!(
            "{prefix}{p}embeddings.position_embedding.weight"
        ))?[0],
        activation: Activation::QuickGelu,
        layer_norm_eps: 1e-5,
    })
}

/// An OpenCLIP text tower's architecture (ViT-H for SD 2.x, ViT-bigG for SDXL) from its
/// tensors under `prefix`, `layers` of them used: heads 64 wide, exact GELU.
fn open_clip_config<'a>(
    shape: &dyn Fn(&str) -> Result<&'a Vec<usize>>,
    prefix: &str,
    layers: usize,
) -> Result<ClipConfig> {
    let emb = shape(&format!("{prefix}token_embedding.weight"))?;
    Ok(ClipConfig {
        vocab_size: emb[0],
        hidden_size: emb[1],
        intermediate_size: shape(&format!("{prefix}transformer.resblocks.0.mlp.c_fc.weight"))?[0],
        num_hidden_layers: layers,
        num_attention_heads: (emb[1] / 64).max(1),
        max_position_embeddings: shape(&format!("{prefix}positional_embedding"))?[0],
        activation: Activation::Gelu,
        layer_norm_eps: 1e-5,
    })
}

impl SingleFile {
    pub fn open(path: &Path, v_prediction: Option<bool>) -> Result<(Self, SchedulerConfig)> {
        crate::engine::weights::read_header(path)?;
        // SAFETY: read-only map; the files are never written while loaded.
        #[allow(unsafe_code)]
        let st = unsafe { MmapedSafetensors::new(path) }
            .map_err(|e| Error::read(path, crate::engine::model::candle_msg(&e)))?;
        let shapes: HashMap<String, Vec<usize>> = st
            .tensors()
            .into_iter()
            .map(|(n, v)| (n, v.shape().to_vec()))
            .collect();
        let shape = |k: &str| -> Result<&Vec<usize>> {
            shapes.get(k).ok_or_else(|| Error::Weights {
                component: "checkpoint",
                path: path.to_path_buf(),
                reason: format!("missing tensor {k}"),
            })
        };

        let sdxl_text = shapes.contains_key(&format!("{SDXL_OPEN_CLIP}positional_embedding"));
        let pooled = shapes
            .get(&format!("{SDXL_OPEN_CLIP}text_projection"))
            .map(|s| s[1]);
        let (unet_config, lpb, is_sd2, is_sdxl) =
            infer_unet(&shapes, UNET, path, sdxl_text, pooled, v_prediction)?;
        shape(&format!("{UNET}out.2.weight"))?;

        // VAE.
        let (vae_config, vae_levels) = vae_config_from(&shapes, VAE, path)?;

        // Renaming maps.
        let mut unet = HashMap::new();
        let mut vae = HashMap::new();
        let mut text = HashMap::new();
        let mut text2 = HashMap::new();
        let count_layers = |prefix: &str| {
            (0..128)
                .take_while(|i| {
                    shapes.contains_key(&format!("{prefix}transformer.resblocks.{i}.ln_1.weight"))
                })
                .count()
        };
        let open_clip_layers = count_layers(OPEN_CLIP);
        let big_g_layers = count_layers(SDXL_OPEN_CLIP);
        for k in shapes.keys() {
            if let Some(r) = k.strip_prefix(UNET) {
                if let Some(n) = unet_name(r, lpb) {
                    unet.insert(n, Src::Same(k.clone()));
                }
            } else if let Some(r) = k.strip_prefix(VAE) {
                if let Some(n) = vae_name(r, vae_levels) {
                    vae.insert(n, Src::Same(k.clone()));
                }
            } else if let Some(r) = k.strip_prefix(CLIP_L) {
                text.insert(r.to_string(), Src::Same(k.clone()));
            } else if let Some(r) = k.strip_prefix(OPEN_CLIP) {
                for (n, s) in open_clip_names(OPEN_CLIP, r, open_clip_layers.saturating_sub(1)) {
                    text.insert(n, s);
                }
            } else if let Some(r) = k.strip_prefix(SDXL_CLIP_L) {
                text.insert(r.to_string(), Src::Same(k.clone()));
            } else if let Some(r) = k.strip_prefix(SDXL_OPEN_CLIP) {
                for (n, s) in open_clip_names(SDXL_OPEN_CLIP, r, big_g_layers) {
                    text2.insert(n, s);
                }
            }
        }

        // Text encoder(s).
        let (clip_config, clip2_config) = if is_sdxl {
            (
                clip_l_config(&shape, SDXL_CLIP_L, &shapes)?,
                Some(open_clip_config(&shape, SDXL_OPEN_CLIP, big_g_layers)?),
            )
        } else if open_clip_layers > 0 {
            (
                open_clip_config(&shape, OPEN_CLIP, open_clip_layers - 1)?,
                None,
            )
        } else {
            (clip_l_config(&shape, CLIP_L, &shapes)?, None)
        };

        // v-prediction: the flag, else an A1111-style .yaml beside the file, else SD 2.x at 768.
        let v = v_prediction.unwrap_or_else(|| {
            let yaml = path.with_extension("yaml");
            std::fs::read_to_string(yaml)
                .map(|t| t.contains("parameterization: \"v\"") || t.contains("parameterization: v"))
                .unwrap_or(false)
        });
        let sched = if is_sdxl {
            // SDXL base's scheduler_config.json.
            serde_json::json!({
                "_class_name": "EulerDiscreteScheduler",
                "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "num_train_timesteps": 1000, "steps_offset": 1, "timestep_spacing": "leading",
                "interpolation_type": "linear", "use_karras_sigmas": false,
                "prediction_type": if v { "v_prediction" } else { "epsilon" },
            })
        } else {
            serde_json::json!({
            "_class_name": if is_sd2 { "DDIMScheduler" } else { "PNDMScheduler" },
            "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "num_train_timesteps": 1000, "set_alpha_to_one": false, "skip_prk_steps": true,
            "steps_offset": 1, "clip_sample": false,
            "prediction_type": if v { "v_prediction" } else { "epsilon" },
            })
        };
        let sched = SchedulerConfig::from_json(JsonConfig::from_value(path.to_path_buf(), sched))?;
        let file = Self {
            path: path.to_path_buf(),
            st: Arc::new(st),
            shapes,
            unet,
            vae,
            text,
            text2,
            unet_config,
            vae_config,
            clip_config,
            clip2_config,
            is_sd2,
            is_sdxl,
        };
        Ok((file, sched))
    }

    fn builder(
        &self,
        map: &HashMap<String, Src>,
        dtype: DType,
        device: &Device,
    ) -> VarBuilder<'static> {
        let backend = Renamed {
            st: self.st.clone(),
            map: map.clone(),
            path: self.path.clone(),
        };
        VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
    }

    pub fn unet_vb(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        self.builder(&self.unet, dtype, device)
    }
    pub fn vae_vb(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        self.builder(&self.vae, dtype, device)
    }
    pub fn text_vb(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        self.builder(&self.text, dtype, device)
    }
    pub fn text2_vb(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        self.builder(&self.text2, dtype, device)
    }

    /// Tensors in the file that no component used (for diagnostics).
    pub fn tensor_count(&self) -> usize {
        self.shapes.len()
    }
}

/// The UNet architecture of an original-layout UNet (or ControlNet copy of one) from its
/// tensor shapes under `prefix`: (config, layers per block, SD 2.x, SDXL). `sdxl_text`: the
/// file has SDXL's text towers; `pooled`: their pooled width, when known.
pub(crate) fn infer_unet(
    shapes: &HashMap<String, Vec<usize>>,
    prefix: &str,
    path: &Path,
    sdxl_text: bool,
    pooled: Option<usize>,
    v_prediction: Option<bool>,
) -> Result<(UNetConfig, usize, bool, bool)> {
    let shape = |k: &str| -> Result<&Vec<usize>> {
        shapes.get(k).ok_or_else(|| Error::Weights {
            component: "checkpoint",
            path: path.to_path_buf(),
            reason: format!("missing tensor {k}"),
        })
    };
    // UNet architecture from shapes.
    let conv_in = shape(&format!("{prefix}input_blocks.0.0.weight"))?;
    let (c0, in_channels) = (conv_in[0], conv_in[1]);
    let downs: Vec<usize> = {
        let mut v: Vec<usize> = shapes
            .keys()
            .filter_map(|k| k.strip_prefix(&format!("{prefix}input_blocks.")))
            .filter(|r| r.contains(".0.op.weight"))
            .filter_map(|r| r.split('.').next()?.parse().ok())
            .collect();
        v.sort();
        v
    };
    let lpb = downs.first().map(|d| d - 1).unwrap_or(2);
    let levels = downs.len() + 1;
    let mut block_out = Vec::new();
    let mut cross = Vec::new();
    for i in 0..levels {
        let b = i * (lpb + 1) + 1;
        block_out.push(shape(&format!("{prefix}input_blocks.{b}.0.out_layers.3.weight"))?[0]);
        cross.push(shapes.contains_key(&format!("{prefix}input_blocks.{b}.1.proj_in.weight")));
    }
    let ctx_key = shapes
        .keys()
        .find(|k| k.starts_with(prefix) && k.ends_with("attn2.to_k.weight"))
        .cloned();
    let ctx_dim = match &ctx_key {
        Some(k) => shape(k)?[1],
        None => return Err(Error::Weights {
            component: "checkpoint",
            path: path.to_path_buf(),
            reason:
                "no UNet cross-attention found: not a Stable Diffusion 1.x/2.x or SDXL checkpoint"
                    .into(),
        }),
    };
    let is_sdxl = sdxl_text || shapes.contains_key(&format!("{prefix}label_emb.0.0.weight"));
    let is_sd2 = !is_sdxl && ctx_dim == 1024;
    let linear = shapes
        .iter()
        .any(|(k, s)| k.starts_with(prefix) && k.ends_with("proj_in.weight") && s.len() == 2);
    // Heads 64 wide (SD 2.x, SDXL), or 8 per block (SD 1.x).
    let heads: Vec<usize> = block_out
        .iter()
        .map(|&c| {
            if is_sd2 || is_sdxl {
                (c / 64).max(1)
            } else {
                8
            }
        })
        .collect();
    // Transformer layers per level, counted in each level's first attention.
    let transformer_layers: Vec<usize> = (0..levels)
        .map(|i| {
            let b = i * (lpb + 1) + 1;
            (0..64)
                .take_while(|t| {
                    shapes.contains_key(&format!(
                        "{prefix}input_blocks.{b}.1.transformer_blocks.{t}.attn1.to_q.weight"
                    ))
                })
                .count()
                .max(1)
        })
        .collect();
    let added = if is_sdxl {
        let emb = shape(&format!("{prefix}label_emb.0.0.weight"))?;
        let in_dim = emb[1];
        // Without a text tower to ask (ControlNet files), SDXL's 6 × 256 size features.
        let pooled = match pooled {
            Some(p) => p,
            None => in_dim.saturating_sub(6 * 256),
        };
        if in_dim <= pooled || (in_dim - pooled) % 6 != 0 {
            return Err(Error::Weights {
                component: "unet",
                path: path.to_path_buf(),
                reason: format!(
                    "label_emb takes {in_dim} inputs, not the pooled {pooled} + 6 size features"
                ),
            });
        }
        Some(crate::engine::config::AddedConditions {
            time_dim: (in_dim - pooled) / 6,
            in_dim,
        })
    } else {
        None
    };
    let unet_config = UNetConfig {
        in_channels,
        out_channels: shapes
            .get(&format!("{prefix}out.2.weight"))
            .map_or(in_channels, |s| s[0]),
        block_out_channels: block_out.clone(),
        cross_attn: cross,
        layers_per_block: lpb,
        num_heads: heads,
        transformer_layers,
        cross_attention_dim: ctx_dim,
        use_linear_projection: linear,
        norm_num_groups: 32,
        norm_eps: 1e-5,
        flip_sin_to_cos: true,
        freq_shift: 0.0,
        center_input_sample: false,
        downsample_padding: 1,
        mid_block_scale_factor: 1.0,
        sample_size: if is_sdxl {
            128
        } else if is_sd2 && v_prediction.unwrap_or(false) {
            96
        } else {
            64
        },
        added,
    };
    if c0 != block_out[0] {
        return Err(Error::Weights {
            component: "unet",
            path: path.to_path_buf(),
            reason: "unexpected conv_in width".into(),
        });
    }

    Ok((unet_config, lpb, is_sd2, is_sdxl))
}

/// A VarBuilder serving diffusers names (`map`: diffusers name → the file's name) from a
/// mapped original-layout file (ControlNet files use it).
pub(crate) fn renamed_vb(
    st: Arc<MmapedSafetensors>,
    map: HashMap<String, String>,
    path: &Path,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    let backend = Renamed {
        st,
        map: map.into_iter().map(|(k, v)| (k, Src::Same(v))).collect(),
        path: path.to_path_buf(),
    };
    VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
}

/// A VarBuilder backend serving diffusers names from the checkpoint's tensors.
struct Renamed {
    st: Arc<MmapedSafetensors>,
    map: HashMap<String, Src>,
    path: PathBuf,
}

impl Renamed {
    fn load(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match self.map.get(name) {
            None => candle_core::bail!(
                "{}: missing weight {name} (not in this checkpoint)",
                self.path.display()
            ),
            Some(Src::Same(s)) => {
                crate::engine::weights::load_as(&self.st, &self.path, s, dtype, dev)
            }
            Some(Src::Third(s, part)) => {
                let t = crate::engine::weights::load_as(&self.st, &self.path, s, dtype, dev)?;
                let rows = t.dim(0)? / 3;
                t.narrow(0, part * rows, rows)
            }
            Some(Src::Transposed(s)) => {
                crate::engine::weights::load_as(&self.st, &self.path, s, dtype, dev)?
                    .t()?
                    .contiguous()
            }
        }
    }
}

impl SimpleBackend for Renamed {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.load(name, dtype, dev)?;
        // 1×1 convolutions stored where diffusers has linear layers (VAE attention).
        let t = if t.dims() != s.dims() && t.elem_count() == s.elem_count() {
            t.reshape(s.clone())?
        } else {
            t
        };
        crate::engine::weights::expect_shape(&self.path, name, t, &s)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dtype, dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }
}
