//! LoRA files as people download them, read into low-rank terms for the loaded weights:
//!
//! - kohya-ss / A1111: `lora_unet_*`, `lora_te_*` (SD 1.x/2.x), `lora_te1_*` / `lora_te2_*`
//!   (SDXL), each module with `.lora_down.weight`, `.lora_up.weight` and `.alpha` (absent:
//!   alpha = rank). UNet names in diffusers' layout (`lora_unet_down_blocks_0_…`) or the
//!   original one (`lora_unet_input_blocks_4_1_…`, as SDXL LoRAs are trained). LoCon: the
//!   same for convolutions (k×k down, 1×1 up), ResNet convs and down/upsamplers included.
//! - diffusers / PEFT: `unet.….lora_A.weight` / `lora_B.weight`, `text_encoder.…`,
//!   `text_encoder_2.…`, and the older attention-processor names (`…attn1.processor.to_q_lora.down.weight`).
//!
//! A1111's math (`extensions-builtin/Lora/network_lora.py`): each matched weight becomes
//! `W + multiplier · (alpha / rank) · up · down`, the multiplier being the tag's text-encoder
//! or UNet weight. LyCORIS types other than LoCon (LoHa, LoKr, DoRA, …) are refused by name.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::engine::family::Family;
use crate::engine::patch::Delta;
use crate::engine::{weights, Error, Result};

/// A component a LoRA changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    /// The (first) text encoder.
    Text,
    /// SDXL's second text encoder.
    Text2,
    Unet,
}

impl Component {
    pub fn name(self) -> &'static str {
        match self {
            Self::Text => "text encoder",
            Self::Text2 => "text encoder 2",
            Self::Unet => "UNet",
        }
    }
}

/// One module's low-rank pair.
struct Module {
    component: Component,
    /// The module's name in [`KeyMap`] form (underscores for dots).
    key: String,
    /// The name it has in the file (for messages).
    source: String,
    down: Tensor,
    up: Tensor,
    alpha: Option<f64>,
}

/// A LoRA file, read.
pub struct LoraFile {
    pub path: PathBuf,
    modules: Vec<Module>,
    /// Keys that are not LoRA weights we know (reported, not fatal).
    pub unknown: Vec<String>,
    /// Whether it has SDXL's two text encoders' names (None: no text-encoder part).
    dual_text: Option<bool>,
}

/// The LoRA types we refuse, by a key suffix that marks them.
const REFUSED: &[(&str, &str)] = &[
    (".hada_w1_a", "LyCORIS LoHa"),
    (".hada_t1", "LyCORIS LoHa (Tucker)"),
    (".lokr_w1", "LyCORIS LoKr"),
    (".lokr_w1_a", "LyCORIS LoKr"),
    (".lokr_w2", "LyCORIS LoKr"),
    (".lokr_w2_a", "LyCORIS LoKr"),
    (
        ".lora_mid.weight",
        "LyCORIS LoCon with Tucker decomposition (lora_mid)",
    ),
    (".dora_scale", "DoRA"),
    (".diff", "LyCORIS full (diff)"),
    (".oft_blocks", "LyCORIS OFT"),
    (".oft_diag", "LyCORIS OFT"),
    (".on_input", "LyCORIS (IA)³"),
    (".w_norm", "LyCORIS norm"),
];

#[derive(Clone, Copy, PartialEq)]
enum Role {
    Down,
    Up,
    Alpha,
}

/// `key` → (module name in the file, role).
fn split_role(key: &str) -> Option<(&str, Role)> {
    for (suffix, role) in [
        (".lora_down.weight", Role::Down),
        (".lora_up.weight", Role::Up),
        (".lora_A.weight", Role::Down),
        (".lora_B.weight", Role::Up),
        (".lora.down.weight", Role::Down),
        (".lora.up.weight", Role::Up),
        ("_lora.down.weight", Role::Down),
        ("_lora.up.weight", Role::Up),
        (".alpha", Role::Alpha),
    ] {
        if let Some(m) = key.strip_suffix(suffix) {
            return Some((m, role));
        }
    }
    None
}

/// The original (SGM) UNet layout's block names, as they start a kohya module name.
const SGM_BLOCKS: &[&str] = &[
    "input_blocks_",
    "middle_block_",
    "output_blocks_",
    "time_embed_",
    "label_emb_",
    "out_",
];

/// A kohya UNet module name in the original layout (`input_blocks_4_1_proj_in`) in
/// diffusers' layout with underscores (`down_blocks_1_attentions_0_proj_in`).
fn sgm_to_diffusers(name: &str, lpb: usize) -> Option<String> {
    // Put the dots back where the layout has them: after the block indices and inside
    // the ResNet names the renaming understands; the rest maps one to one.
    let (head, rest) = if let Some(r) = name.strip_prefix("input_blocks_") {
        let (b, r) = r.split_once('_')?;
        let (s, r) = r.split_once('_')?;
        (format!("input_blocks.{b}.{s}."), r)
    } else if let Some(r) = name.strip_prefix("output_blocks_") {
        let (b, r) = r.split_once('_')?;
        let (s, r) = r.split_once('_')?;
        (format!("output_blocks.{b}.{s}."), r)
    } else if let Some(r) = name.strip_prefix("middle_block_") {
        let (s, r) = r.split_once('_')?;
        (format!("middle_block.{s}."), r)
    } else if let Some(r) = name.strip_prefix("label_emb_0_") {
        let (s, r) = r.split_once('_').unwrap_or((r, ""));
        (format!("label_emb.0.{s}."), r)
    } else {
        let (blk, r) = ["time_embed_", "out_"]
            .iter()
            .find_map(|b| Some((b.trim_end_matches('_'), name.strip_prefix(b)?)))?;
        let (s, r) = r.split_once('_').unwrap_or((r, ""));
        (format!("{blk}.{s}."), r)
    };
    let rest = match rest {
        "in_layers_0" => "in_layers.0",
        "in_layers_2" => "in_layers.2",
        "emb_layers_1" => "emb_layers.1",
        "out_layers_0" => "out_layers.0",
        "out_layers_3" => "out_layers.3",
        r => r,
    };
    let dotted = if rest.is_empty() {
        format!("{head}weight")
    } else {
        format!("{head}{rest}.weight")
    };
    let mapped = crate::engine::single_file::unet_name(&dotted, lpb)?;
    Some(mapped.strip_suffix(".weight")?.replace('.', "_"))
}

/// A text-encoder module name without the optional `text_model_` prefix.
fn text_key(rest: &str) -> String {
    let k = rest.replace('.', "_");
    k.strip_prefix("text_model_")
        .map(str::to_string)
        .unwrap_or(k)
}

/// A module name of the file → (component, key in [`KeyMap`] form, needs SGM conversion).
fn classify(module: &str) -> Option<(Component, String, bool)> {
    if let Some(r) = module.strip_prefix("lora_unet_") {
        let sgm = SGM_BLOCKS.iter().any(|b| r.starts_with(b));
        return Some((Component::Unet, r.to_string(), sgm));
    }
    for (prefix, c) in [
        ("lora_te1_", Component::Text),
        ("lora_te2_", Component::Text2),
        ("lora_te_", Component::Text),
    ] {
        if let Some(r) = module.strip_prefix(prefix) {
            return Some((c, text_key(r), false));
        }
    }
    // diffusers: the attention processors' old names, then PEFT's.
    let m = module
        .replace(".processor.", ".")
        .replace("to_out_lora", "to_out.0")
        .replace("_lora", "");
    if let Some(r) = m.strip_prefix("unet.") {
        return Some((Component::Unet, r.replace('.', "_"), false));
    }
    if let Some(r) = m.strip_prefix("text_encoder_2.") {
        return Some((Component::Text2, text_key(r), false));
    }
    if let Some(r) = m.strip_prefix("text_encoder.") {
        return Some((Component::Text, text_key(r), false));
    }
    None
}

fn adapter_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::Adapter {
        kind: "LoRA",
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

impl LoraFile {
    /// Reads a LoRA `.safetensors` (its header checked strictly first). Pickles are refused.
    pub fn open(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::NotFound {
                what: "LoRA file".into(),
                path: path.to_path_buf(),
            });
        }
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        if matches!(ext.as_str(), "pt" | "ckpt" | "bin" | "pth") {
            return Err(Error::Pickle {
                path: path.to_path_buf(),
            });
        }
        let header = weights::read_header(path)?;
        if let Some(t) = header.iter().find(|t| !weights::is_float(&t.dtype)) {
            return Err(adapter_err(
                path,
                format!(
                    "tensor {} is stored as {}, not as floating point",
                    t.name, t.dtype
                ),
            ));
        }
        for t in &header {
            if let Some((_, kind)) = REFUSED.iter().find(|(s, _)| t.name.ends_with(s)) {
                return Err(adapter_err(
                    path,
                    format!(
                        "is a {kind} network ({}); sd-studio merges LoRA and LoCon files",
                        t.name
                    ),
                ));
            }
        }
        let tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| Error::read(path, crate::engine::model::candle_msg(&e)))?;
        struct Parts {
            down: Option<Tensor>,
            up: Option<Tensor>,
            alpha: Option<f64>,
        }
        let mut parts: HashMap<String, Parts> = HashMap::new();
        let mut unknown = Vec::new();
        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        for name in names {
            let t = &tensors[name];
            let Some((module, role)) = split_role(name) else {
                unknown.push(name.clone());
                continue;
            };
            let e = parts.entry(module.to_string()).or_insert(Parts {
                down: None,
                up: None,
                alpha: None,
            });
            let f32 = |t: &Tensor| {
                t.to_dtype(DType::F32)
                    .map_err(|e| adapter_err(path, format!("{name}: {e}")))
            };
            match role {
                Role::Down => e.down = Some(f32(t)?),
                Role::Up => e.up = Some(f32(t)?),
                Role::Alpha => {
                    let a = f32(t)?
                        .flatten_all()
                        .and_then(|a| a.to_vec1::<f32>())
                        .map_err(|e| adapter_err(path, format!("{name}: {e}")))?;
                    match a.as_slice() {
                        [a] if a.is_finite() => e.alpha = Some(*a as f64),
                        _ => {
                            return Err(adapter_err(
                                path,
                                format!("{name} is not one finite number"),
                            ))
                        }
                    }
                }
            }
        }
        let mut modules = Vec::new();
        let mut dual_text = None;
        let mut parts: Vec<(String, Parts)> = parts.into_iter().collect();
        parts.sort_by(|a, b| a.0.cmp(&b.0));
        for (source, p) in parts {
            let (Some(down), Some(up)) = (p.down, p.up) else {
                if p.alpha.is_some() {
                    continue; // an alpha for a module the file has no weights for
                }
                return Err(adapter_err(
                    path,
                    format!("module {source} has only one of its two LoRA weights (down/up)"),
                ));
            };
            let Some((component, key, sgm)) = classify(&source) else {
                unknown.push(source);
                continue;
            };
            if down.rank() < 2 || up.rank() < 2 || down.dim(0).ok() != up.dim(1).ok() {
                return Err(adapter_err(
                    path,
                    format!(
                        "module {source}: down {:?} and up {:?} do not share a rank",
                        down.dims(),
                        up.dims()
                    ),
                ));
            }
            if component == Component::Text2
                || source.starts_with("lora_te1_")
                || source.starts_with("text_encoder_2.")
            {
                dual_text = Some(true);
            } else if component == Component::Text {
                dual_text.get_or_insert(false);
            }
            // Original-layout names are converted once the model's layers per block are known.
            let key = if sgm { format!("sgm:{key}") } else { key };
            modules.push(Module {
                component,
                key,
                source,
                down,
                up,
                alpha: p.alpha,
            });
        }
        if modules.is_empty() {
            return Err(adapter_err(
                path,
                "holds no LoRA weights (no lora_down/lora_up or lora_A/lora_B pairs)",
            ));
        }
        Ok(Self {
            path: path.to_path_buf(),
            modules,
            unknown,
            dual_text,
        })
    }

    /// The file's stem, the name a prompt tag uses.
    pub fn name(&self) -> String {
        stem(&self.path)
    }

    /// The family the file's shapes and names say it is for, where they say it: SDXL's
    /// two text encoders; the width of the cross-attention context (768 SD 1.x, 1024
    /// SD 2.x, 2048 SDXL) or of the text encoder.
    pub fn family(&self) -> Option<Family> {
        for m in &self.modules {
            if m.component == Component::Unet && m.key.contains("attn2_to_k") {
                let width = m.down.dims().get(1).copied();
                return match width {
                    Some(768) => Some(Family::Sd1),
                    Some(1024) => Some(Family::Sd2),
                    Some(2048) => Some(Family::Sdxl),
                    _ => self.dual_text.and_then(|d| d.then_some(Family::Sdxl)),
                };
            }
        }
        if self.dual_text == Some(true) {
            return Some(Family::Sdxl);
        }
        self.modules
            .iter()
            .find(|m| m.component == Component::Text && m.key.ends_with("q_proj"))
            .and_then(|m| match m.down.dims().get(1) {
                Some(768) => Some(Family::Sd1),
                Some(1024) => Some(Family::Sd2),
                _ => None,
            })
    }

    /// Whether it has text-encoder weights, UNet weights.
    pub fn parts(&self) -> (bool, bool) {
        let te = self.modules.iter().any(|m| m.component != Component::Unet);
        let unet = self.modules.iter().any(|m| m.component == Component::Unet);
        (te, unet)
    }

    /// The terms this LoRA adds to the model described by `keys`, at `te` (text encoders)
    /// and `unet` multipliers. Refuses a file for another family or whose shapes do not fit;
    /// returns how many modules matched nothing.
    pub fn terms(
        &self,
        keys: &KeyMap,
        te: f64,
        unet: f64,
        out: &mut HashMap<Component, HashMap<String, Vec<Delta>>>,
    ) -> Result<usize> {
        let model = keys.family;
        let claimed = self.family();
        let dual_mismatch = self
            .dual_text
            .is_some_and(|d| d != model.dual_text_encoders());
        if let Some(f) = claimed.filter(|&f| f != model) {
            return Err(adapter_err(
                &self.path,
                format!(
                    "is a LoRA for {}, but the model is {}",
                    f.name(),
                    model.name()
                ),
            ));
        }
        if dual_mismatch {
            let theirs = if model.dual_text_encoders() {
                "SD 1.x/2.x (one text encoder)"
            } else {
                "SDXL (two text encoders)"
            };
            return Err(adapter_err(
                &self.path,
                format!("is a LoRA for {theirs}, but the model is {}", model.name()),
            ));
        }
        let mut unmatched = 0;
        let mut matched = 0;
        for m in &self.modules {
            let key = match m.key.strip_prefix("sgm:") {
                Some(k) => match sgm_to_diffusers(k, keys.layers_per_block) {
                    Some(k) => k,
                    None => {
                        unmatched += 1;
                        continue;
                    }
                },
                None => m.key.clone(),
            };
            let Some((name, shape)) = keys.maps.get(&m.component).and_then(|t| t.get(&key)) else {
                unmatched += 1;
                continue;
            };
            let rank = m.down.dim(0).unwrap_or(1);
            let out_dim = m.up.dim(0).unwrap_or(0);
            let in_elems = m.down.elem_count() / rank.max(1);
            let target: usize = shape.iter().product();
            if shape.first() != Some(&out_dim) || out_dim * in_elems != target {
                return Err(adapter_err(
                    &self.path,
                    format!(
                        "module {} (up {:?}, down {:?}) does not fit the model's {} weight {name} {:?}: a LoRA for another model?",
                        m.source,
                        m.up.dims(),
                        m.down.dims(),
                        m.component.name(),
                        shape
                    ),
                ));
            }
            let multiplier = if m.component == Component::Unet {
                unet
            } else {
                te
            };
            let scale = multiplier * m.alpha.map_or(1.0, |a| a / rank as f64);
            matched += 1;
            if scale == 0.0 {
                continue;
            }
            out.entry(m.component)
                .or_default()
                .entry(name.clone())
                .or_default()
                .push(Delta {
                    id: format!("{}#{}@{:x}", self.path.display(), m.source, scale.to_bits()),
                    up: m.up.clone(),
                    down: m.down.clone(),
                    scale,
                });
        }
        if matched == 0 {
            return Err(adapter_err(
                &self.path,
                format!(
                    "none of its {} modules is in this {} model: a LoRA for another model?",
                    self.modules.len(),
                    model.name()
                ),
            ));
        }
        Ok(unmatched)
    }
}

/// What a LoRA file is, from its header alone (for listing a folder).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraInfo {
    /// The family its shapes or names say, when they say it.
    pub family: Option<Family>,
    /// Whether it has SDXL's two text encoders (None: no text-encoder part).
    pub dual_text: Option<bool>,
    pub text: bool,
    pub unet: bool,
    /// Its modules (down/up pairs).
    pub modules: usize,
}

impl LoraInfo {
    /// Whether it can go on a model of `family`; None when the file does not say.
    pub fn fits(&self, family: Family) -> Option<bool> {
        match (self.family, self.dual_text) {
            (Some(f), _) => Some(f == family),
            (None, Some(d)) => Some(d == family.dual_text_encoders()),
            _ => None,
        }
    }
}

/// Reads a LoRA file's header (strictly) and says what it is; LyCORIS types we refuse and
/// files without LoRA pairs are errors.
pub fn describe(path: &Path) -> Result<LoraInfo> {
    let header = weights::read_header(path)?;
    for t in &header {
        if let Some((_, kind)) = REFUSED.iter().find(|(s, _)| t.name.ends_with(s)) {
            return Err(adapter_err(path, format!("is a {kind} network")));
        }
    }
    let mut info = LoraInfo {
        family: None,
        dual_text: None,
        text: false,
        unet: false,
        modules: 0,
    };
    let mut context = None;
    let mut te_width = None;
    for t in &header {
        let Some((module, Role::Down)) = split_role(&t.name) else {
            continue;
        };
        let Some((c, key, _)) = classify(module) else {
            continue;
        };
        info.modules += 1;
        match c {
            Component::Unet => {
                info.unet = true;
                if key.contains("attn2_to_k") {
                    context = t.shape.get(1).copied();
                }
            }
            Component::Text2 => {
                info.text = true;
                info.dual_text = Some(true);
            }
            Component::Text => {
                info.text = true;
                if module.starts_with("lora_te1_") {
                    info.dual_text = Some(true);
                } else {
                    info.dual_text.get_or_insert(false);
                }
                if key.ends_with("q_proj") {
                    te_width = t.shape.get(1).copied();
                }
            }
        }
    }
    if info.modules == 0 {
        return Err(adapter_err(path, "holds no LoRA weights"));
    }
    info.family = match context {
        Some(768) => Some(Family::Sd1),
        Some(1024) => Some(Family::Sd2),
        Some(2048) => Some(Family::Sdxl),
        _ if info.dual_text == Some(true) => Some(Family::Sdxl),
        _ => match te_width {
            Some(768) => Some(Family::Sd1),
            Some(1024) => Some(Family::Sd2),
            _ => None,
        },
    };
    Ok(info)
}

/// The loaded model's weights by LoRA key: per component, the underscored module name →
/// (weight name, shape).
pub struct KeyMap {
    pub family: Family,
    pub layers_per_block: usize,
    maps: HashMap<Component, HashMap<String, (String, Vec<usize>)>>,
}

impl KeyMap {
    pub fn new(family: Family, layers_per_block: usize) -> Self {
        Self {
            family,
            layers_per_block,
            maps: HashMap::new(),
        }
    }

    /// Adds a component's weights (names as its table recorded them).
    pub fn add(&mut self, c: Component, shapes: HashMap<String, Vec<usize>>) {
        let map = self.maps.entry(c).or_default();
        for (name, shape) in shapes {
            let Some(module) = name.strip_suffix(".weight") else {
                continue;
            };
            if shape.len() != 2 && shape.len() != 4 {
                continue;
            }
            let key = match c {
                Component::Unet => module.replace('.', "_"),
                _ => text_key(module),
            };
            map.insert(key, (name, shape));
        }
    }
}

/// A file's stem as a string.
pub fn stem(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default()
}

/// A1111's LoRA hash ("Lora hashes"): sha256 of a safetensors file's data after the
/// header (kohya's "addnet" hash), first 12 hex digits.
pub fn addnet_hash(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).map_err(|e| Error::read(path, e))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| Error::read(path, e))?;
    f.seek(SeekFrom::Start(8 + u64::from_le_bytes(len)))
        .map_err(|e| Error::read(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::read(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok(hex[..12].to_string())
}

/// The file a tag's `name` means: a `.safetensors` whose stem is `name` in one of `dirs`
/// (subfolders searched, the first folder first). Pickles of that name are refused.
pub fn find_named(dirs: &[PathBuf], name: &str, what: &str) -> Result<PathBuf> {
    let found: Vec<PathBuf> = super::files_under(dirs)
        .into_iter()
        .filter(|p| stem(p) == name)
        .collect();
    let is_st = |p: &PathBuf| {
        p.extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
    };
    if let Some(p) = found.iter().find(|p| is_st(p)) {
        return Ok(p.clone());
    }
    let pickle = |p: &&PathBuf| {
        p.extension().is_some_and(|e| {
            ["pt", "ckpt", "bin", "pth"]
                .iter()
                .any(|x| e.eq_ignore_ascii_case(x))
        })
    };
    if let Some(p) = found.iter().find(pickle) {
        return Err(Error::Pickle { path: p.clone() });
    }
    let where_ = if dirs.is_empty() {
        "no folder set (--lora-dir / --embeddings-dir, or a models folder)".to_string()
    } else {
        dirs.iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    Err(Error::NotFound {
        what: format!("{what} {name:?} (no {name}.safetensors in {where_})"),
        path: dirs.first().cloned().unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_layout_names_map_to_diffusers() {
        let lpb = 2;
        for (sgm, diff) in [
            (
                "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
            ),
            (
                "input_blocks_1_0_in_layers_2",
                "down_blocks_0_resnets_0_conv1",
            ),
            ("input_blocks_3_0_op", "down_blocks_0_downsamplers_0_conv"),
            ("middle_block_1_proj_in", "mid_block_attentions_0_proj_in"),
            (
                "middle_block_2_emb_layers_1",
                "mid_block_resnets_1_time_emb_proj",
            ),
            ("output_blocks_2_2_conv", "up_blocks_0_upsamplers_0_conv"),
            (
                "output_blocks_5_1_proj_out",
                "up_blocks_1_attentions_2_proj_out",
            ),
            (
                "output_blocks_0_0_skip_connection",
                "up_blocks_0_resnets_0_conv_shortcut",
            ),
            ("time_embed_0", "time_embedding_linear_1"),
            ("label_emb_0_2", "add_embedding_linear_2"),
        ] {
            assert_eq!(sgm_to_diffusers(sgm, lpb).as_deref(), Some(diff), "{sgm}");
        }
    }

    #[test]
    fn file_names_classify() {
        let c = classify;
        assert_eq!(
            c("lora_te_text_model_encoder_layers_0_self_attn_q_proj"),
            Some((
                Component::Text,
                "encoder_layers_0_self_attn_q_proj".into(),
                false
            ))
        );
        assert_eq!(
            c("lora_te2_text_model_encoder_layers_1_mlp_fc1"),
            Some((Component::Text2, "encoder_layers_1_mlp_fc1".into(), false))
        );
        assert_eq!(
            c("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora"),
            Some((
                Component::Unet,
                "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0".into(),
                false
            ))
        );
        assert_eq!(
            c("text_encoder.text_model.encoder.layers.0.self_attn.k_proj"),
            Some((
                Component::Text,
                "encoder_layers_0_self_attn_k_proj".into(),
                false
            ))
        );
        assert_eq!(
            c("lora_unet_input_blocks_4_1_proj_in").map(|x| x.2),
            Some(true)
        );
        assert_eq!(c("something_else"), None);
    }
}
