//! ControlNet files: a diffusers `ControlNetModel` folder (`config.json` + weights), a hub id
//! (`lllyasviel/control_v11p_sd15_canny`), or one `.safetensors` in the layout A1111's
//! ControlNet extension reads (`control_model.` + the original UNet names, `zero_convs.*`,
//! `input_hint_block.*`, `middle_block_out.*`; the prefix may be absent), its architecture
//! inferred from the shapes. Pickles (`.pth`, `.ckpt`) are refused.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use sha2::{Digest, Sha256};

use crate::engine::config::{JsonConfig, UNetConfig};
use crate::engine::controlnet::{ControlNet, ControlNetConfig};
use crate::engine::error::{Error, Result};
use crate::engine::memory::{self, Offload, Part};
use crate::engine::model::{self, candle_msg};
use crate::engine::patch::WeightTable;
use crate::engine::single_file::{infer_unet, renamed_vb, unet_name};

/// Where the weights are.
enum Source {
    Folder(Vec<PathBuf>),
    /// A mapped single file and diffusers name → its name.
    Single(Arc<MmapedSafetensors>, HashMap<String, String>),
}

/// A ControlNet found and parsed, not yet loaded.
pub struct ControlNetFiles {
    /// A1111's model name: the file's stem, the folder's or the repository's name.
    pub name: String,
    /// The file or folder (messages, cache keys).
    pub path: PathBuf,
    /// The weight file hashed for the metadata.
    pub weights: PathBuf,
    pub config: ControlNetConfig,
    source: Source,
}

/// The family a UNet context width belongs to, for messages.
fn family_of(c: &UNetConfig) -> &'static str {
    match (c.added.is_some(), c.cross_attention_dim) {
        (true, _) | (_, 2048) => "SDXL",
        (_, 1024) => "SD 2.x",
        (_, 768) => "SD 1.x",
        _ => "SD 1.x/2.x",
    }
}

impl ControlNetFiles {
    /// `--controlnet`: a folder, a `.safetensors` file or a hub id.
    pub fn open(spec: &str, prefer_fp16: bool) -> Result<Self> {
        let path = Path::new(spec);
        if path.is_file() {
            if model::is_pickle(path) {
                return Err(Error::Pickle {
                    path: path.to_path_buf(),
                });
            }
            return Self::single(path);
        }
        let (dir, name) = if path.is_dir() {
            (path.to_path_buf(), dir_name(path))
        } else if model::looks_like_repo_id(spec) {
            let dir = model::resolve_hub_component(spec, prefer_fp16, "ControlNet")?;
            (dir, spec.rsplit('/').next().unwrap_or(spec).to_string())
        } else {
            return Err(Error::NotFound {
                what: "ControlNet".into(),
                path: path.to_path_buf(),
            });
        };
        Self::folder(&dir, name, prefer_fp16)
    }

    fn folder(dir: &Path, name: String, prefer_fp16: bool) -> Result<Self> {
        let json = JsonConfig::load(&dir.join("config.json"))?;
        let class = json.str_or("_class_name", "ControlNetModel")?;
        if class != "ControlNetModel" {
            return Err(json.err(
                "_class_name",
                format!("{class} is not a ControlNetModel (only diffusers' ControlNetModel is supported)"),
            ));
        }
        let config = config_from_json(json)?;
        let weights = model::find_weights(dir, prefer_fp16)?;
        Ok(Self {
            name,
            path: dir.to_path_buf(),
            weights: weights.first().cloned().unwrap_or_default(),
            config,
            source: Source::Folder(weights),
        })
    }

    fn single(path: &Path) -> Result<Self> {
        let bad = |reason: String| Error::Weights {
            component: "controlnet",
            path: path.to_path_buf(),
            reason,
        };
        if !path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
        {
            return Err(bad("not a .safetensors file".into()));
        }
        crate::engine::weights::read_header(path)?;
        // SAFETY: read-only map; the files are never written while loaded.
        #[allow(unsafe_code)]
        let st = unsafe { MmapedSafetensors::new(path) }
            .map_err(|e| Error::read(path, candle_msg(&e)))?;
        let shapes: HashMap<String, Vec<usize>> = st
            .tensors()
            .into_iter()
            .map(|(n, v)| (n, v.shape().to_vec()))
            .collect();
        let prefix = if shapes.keys().any(|k| k.starts_with("control_model.")) {
            "control_model."
        } else {
            ""
        };
        let has = |k: &str| shapes.contains_key(&format!("{prefix}{k}"));
        if !has("zero_convs.0.0.weight") || !has("input_hint_block.0.weight") {
            let what = if shapes
                .keys()
                .any(|k| k.starts_with("model.diffusion_model."))
            {
                "a Stable Diffusion checkpoint, not a ControlNet"
            } else if shapes
                .keys()
                .any(|k| k.starts_with("body.") || k.starts_with("adapter."))
            {
                "a T2I-Adapter, not a ControlNet"
            } else if shapes
                .keys()
                .any(|k| k.starts_with("controlnet_cond_embedding."))
            {
                "a diffusers ControlNet's weights without its config.json: give the folder"
            } else {
                "not a ControlNet (no zero_convs / input_hint_block tensors)"
            };
            return Err(bad(what.into()));
        }
        let (unet, lpb, _, _) = infer_unet(&shapes, prefix, path, false, None, None)
            .map_err(|e| bad(format!("its UNet copy: {e}")))?;
        // The hint CNN: convolutions at even indices (SiLU between), first = conv_in,
        // last = conv_out, the pairs between = blocks.
        let mut hint: Vec<usize> = shapes
            .keys()
            .filter_map(|k| k.strip_prefix(&format!("{prefix}input_hint_block.")))
            .filter_map(|r| r.strip_suffix(".weight")?.parse().ok())
            .collect();
        hint.sort_unstable();
        if hint.len() < 2 || !(hint.len() - 2).is_multiple_of(2) {
            return Err(bad(format!(
                "input_hint_block has {} convolutions; expected conv_in, pairs, conv_out",
                hint.len()
            )));
        }
        let out_of = |i: usize| -> Result<&Vec<usize>> {
            shapes
                .get(&format!("{prefix}input_hint_block.{i}.weight"))
                .ok_or_else(|| bad(format!("missing input_hint_block.{i}.weight")))
        };
        let first = out_of(hint[0])?;
        let mut embedding_channels = vec![first[0]];
        let mut map = HashMap::new();
        let last = hint.len() - 1;
        for (pos, &idx) in hint.iter().enumerate() {
            let to = if pos == 0 {
                "conv_in".to_string()
            } else if pos == last {
                "conv_out".to_string()
            } else {
                if pos % 2 == 0 {
                    embedding_channels.push(out_of(idx)?[0]);
                }
                format!("blocks.{}", pos - 1)
            };
            for w in ["weight", "bias"] {
                map.insert(
                    format!("controlnet_cond_embedding.{to}.{w}"),
                    format!("{prefix}input_hint_block.{idx}.{w}"),
                );
            }
        }
        for k in shapes.keys() {
            let Some(r) = k.strip_prefix(prefix) else {
                continue;
            };
            let name = if let Some(z) = r.strip_prefix("zero_convs.") {
                z.split_once(".0.")
                    .map(|(i, w)| format!("controlnet_down_blocks.{i}.{w}"))
            } else if let Some(w) = r.strip_prefix("middle_block_out.0.") {
                Some(format!("controlnet_mid_block.{w}"))
            } else {
                unet_name(r, lpb)
            };
            if let Some(n) = name {
                map.insert(n, k.clone());
            }
        }
        // A1111 reads shuffle models' pooling from the .yaml beside the file.
        let global_pool = std::fs::read_to_string(path.with_extension("yaml"))
            .map(|t| {
                t.to_ascii_lowercase()
                    .contains("global_average_pooling: true")
            })
            .unwrap_or(false);
        let config = ControlNetConfig {
            unet,
            embedding_channels,
            conditioning_channels: first[1],
            bgr: false,
            global_pool,
        };
        Ok(Self {
            name: path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("controlnet")
                .to_string(),
            path: path.to_path_buf(),
            weights: path.to_path_buf(),
            config,
            source: Source::Single(Arc::new(st), map),
        })
    }

    /// Refuses a ControlNet made for another architecture than `unet` (a UNet with
    /// `scale_factor` pixels per latent cell), in one line.
    pub fn check_fits(&self, unet: &UNetConfig, scale_factor: usize) -> Result<()> {
        let c = &self.config.unet;
        let mismatch = |what: String| Error::Invalid {
            what: "controlnet",
            reason: format!(
                "{} is a ControlNet for {} and the model is {} ({what})",
                self.path.display(),
                family_of(c),
                family_of(unet),
            ),
        };
        if c.cross_attention_dim != unet.cross_attention_dim {
            return Err(mismatch(format!(
                "text context {} vs {}",
                c.cross_attention_dim, unet.cross_attention_dim
            )));
        }
        if c.block_out_channels != unet.block_out_channels
            || c.layers_per_block != unet.layers_per_block
            || c.added.is_some() != unet.added.is_some()
        {
            return Err(mismatch(format!(
                "block widths {:?} vs {:?}",
                c.block_out_channels, unet.block_out_channels
            )));
        }
        if self.config.scale_factor() != scale_factor {
            return Err(mismatch(format!(
                "its hint embedding downsamples {}×, the VAE {}×",
                self.config.scale_factor(),
                scale_factor
            )));
        }
        if c.in_channels != 4 && c.in_channels != unet.in_channels {
            return Err(mismatch(format!("{} latent channels", c.in_channels)));
        }
        Ok(())
    }

    /// A single file's settings that shapes cannot tell (group-norm groups, attention heads,
    /// time-embedding layout) taken from the UNet it will steer, of which it is a copy: what
    /// A1111 does by building it from its family's config. A folder keeps its config.
    pub fn adapt_to(&mut self, unet: &UNetConfig) {
        if let Source::Single(..) = self.source {
            let c = &mut self.config.unet;
            c.norm_num_groups = unet.norm_num_groups;
            c.norm_eps = unet.norm_eps;
            c.num_heads = unet.num_heads.clone();
            c.flip_sin_to_cos = unet.flip_sin_to_cos;
            c.freq_shift = unet.freq_shift;
            c.downsample_padding = unet.downsample_padding;
            c.mid_block_scale_factor = unet.mid_block_scale_factor;
            if c.added.is_some() {
                c.added = unet.added;
            }
        }
    }

    fn vb(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        match &self.source {
            Source::Folder(files) => model::var_builder(files, dtype, device, "controlnet"),
            Source::Single(st, map) => Ok(renamed_vb(
                st.clone(),
                map.clone(),
                &self.path,
                dtype,
                device,
            )),
        }
    }

    /// The ControlNet placed as `offload` says: on the device, or staged in RAM and built on
    /// the device while denoising (medvram, lowvram: it lives with the UNet).
    pub fn load(
        &self,
        dtype: DType,
        device: &Device,
        offload: Offload,
    ) -> Result<Part<ControlNet>> {
        let weights = WeightTable::new();
        let (config, path) = (self.config.clone(), self.path.clone());
        let build = move |vb: VarBuilder<'static>| -> Result<ControlNet> {
            ControlNet::new(vb, &config).map_err(|e| Error::Weights {
                component: "controlnet",
                path: path.clone(),
                reason: candle_msg(&e),
            })
        };
        match offload {
            Offload::Full => {
                let m = build(weights.recorder(self.vb(dtype, device)?))?;
                Ok(Part::resident(m, weights))
            }
            _ => Part::staged(
                memory::staged(
                    weights.recorder(self.vb(dtype, &Device::Cpu)?),
                    dtype,
                    device,
                ),
                Box::new(build),
                weights,
            ),
        }
    }

    /// Bytes its weights take in `dtype` once loaded (from the headers; the memory check
    /// before loading).
    pub fn loaded_bytes(&self, dtype: DType) -> Result<u64> {
        let files: Vec<PathBuf> = match &self.source {
            Source::Folder(files) => files.clone(),
            Source::Single(..) => vec![self.path.clone()],
        };
        let mut elements = 0u64;
        for f in &files {
            for t in crate::engine::weights::read_header(f)? {
                if t.name.starts_with("model.diffusion_model.")
                    || t.name.starts_with("first_stage_model.")
                    || t.name.starts_with("cond_stage_model.")
                {
                    continue; // a full checkpoint bundled with the ControlNet
                }
                elements += t.shape.iter().product::<usize>() as u64;
            }
        }
        Ok(elements * dtype.size_in_bytes() as u64)
    }
}

fn dir_name(p: &Path) -> String {
    p.canonicalize()
        .ok()
        .as_deref()
        .unwrap_or(p)
        .file_name()
        .and_then(|s| s.to_str())
        .unwrap_or("controlnet")
        .to_string()
}

/// A diffusers ControlNet `config.json`: the UNet half (its up path mirrored from the down
/// path, which the file does not list) and the hint embedding.
fn config_from_json(mut json: JsonConfig) -> Result<ControlNetConfig> {
    if json.get("up_block_types").is_none() {
        let down = json.str_list("down_block_types")?;
        let up: Vec<serde_json::Value> = down
            .iter()
            .rev()
            .map(|d| serde_json::Value::String(d.replace("Down", "Up")))
            .collect();
        json.map
            .insert("up_block_types".into(), serde_json::Value::Array(up));
    }
    let unet = UNetConfig::from_json(&json)?;
    let order = json.str_or("controlnet_conditioning_channel_order", "rgb")?;
    let bgr = match order {
        "rgb" => false,
        "bgr" => true,
        other => {
            return Err(json.err(
                "controlnet_conditioning_channel_order",
                format!("{other:?} is neither \"rgb\" nor \"bgr\""),
            ))
        }
    };
    let embedding_channels =
        json.usize_list("conditioning_embedding_out_channels", &[16, 32, 96, 256])?;
    if embedding_channels.is_empty() {
        return Err(json.err("conditioning_embedding_out_channels", "empty"));
    }
    Ok(ControlNetConfig {
        unet,
        embedding_channels,
        conditioning_channels: json.usize_or("conditioning_channels", 3)?,
        bgr,
        global_pool: json.bool_or("global_pool_conditions", false)?,
    })
}

/// A1111's short model hash (`sd_models.model_hash`, what the ControlNet extension shows in
/// `name [hash]`): sha256 of the 64 KiB at 1 MiB into the file, first 8 hex digits.
pub fn legacy_hash(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::read(path, e))?;
    f.seek(SeekFrom::Start(0x100000))
        .map_err(|e| Error::read(path, e))?;
    let mut buf = Vec::with_capacity(0x10000);
    f.take(0x10000)
        .read_to_end(&mut buf)
        .map_err(|e| Error::read(path, e))?;
    let digest = Sha256::digest(&buf);
    Ok(digest.iter().take(4).map(|b| format!("{b:02x}")).collect())
}

/// The ControlNet folders of an A1111 or ComfyUI install (given as its root, its `models`
/// folder or its checkpoint folder), those that exist: A1111's `models/ControlNet`,
/// ComfyUI's `models/controlnet`.
pub fn folders_in(dir: &Path) -> Vec<PathBuf> {
    let up = dir.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut out: Vec<PathBuf> = Vec::new();
    for base in [dir.to_path_buf(), dir.join("models"), up] {
        for name in ["ControlNet", "controlnet"] {
            let p = base.join(name);
            if p.is_dir() && !out.iter().any(|o| same_dir(o, &p)) {
                out.push(p);
            }
        }
    }
    out
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// The ControlNets in `dirs` by name, without reading any weights: `.safetensors` files
/// (name = stem) and folders holding a `config.json` (name = folder), sorted by name; a
/// name found twice keeps the first folder's.
pub fn list(dirs: &[PathBuf]) -> Vec<(String, PathBuf)> {
    let mut out: Vec<(String, PathBuf)> = Vec::new();
    for d in dirs {
        let Ok(entries) = std::fs::read_dir(d) else {
            continue;
        };
        let mut found: Vec<(String, PathBuf)> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter_map(|p| {
                let name = if p.is_dir() && p.join("config.json").is_file() {
                    p.file_name()?.to_str()?.to_string()
                } else if p
                    .extension()
                    .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
                {
                    p.file_stem()?.to_str()?.to_string()
                } else {
                    return None;
                };
                Some((name, p))
            })
            .collect();
        found.sort();
        for (n, p) in found {
            if !out.iter().any(|(m, _)| *m == n) {
                out.push((n, p));
            }
        }
    }
    out.sort_by_key(|a| a.0.to_lowercase());
    out
}
