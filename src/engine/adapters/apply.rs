//! What a job asks of adapters, and its resolution: the prompt's `<lora:…>` tags and the
//! `--lora` files become low-rank terms merged into the model's weights (see
//! [`crate::engine::patch`]); embedding names in the prompts are found in the embeddings
//! folders. Parsed files are kept (keyed by path, size and modification time), so a prompt
//! iteration re-reads nothing and re-merges only what changed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use crate::engine::embedding::{self, Embedding};
use crate::engine::extra_networks::{self, LoraTag};
use crate::engine::lora::{self, Component, KeyMap, LoraFile};
use crate::engine::patch::Delta;
use crate::engine::prompt::EmbeddingWord;
use crate::engine::tokenizer::ClipTokenizer;
use crate::engine::{Error, Result};

/// A LoRA file at A1111's two multipliers.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraUse {
    pub path: PathBuf,
    /// Text-encoder multiplier.
    pub te: f64,
    /// UNet multiplier.
    pub unet: f64,
}

/// The LoRAs and embeddings a job may use.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Networks {
    /// Applied to every image of the job (`--lora FILE[:WEIGHT]`).
    pub loras: Vec<LoraUse>,
    /// Where `<lora:NAME>` tags are looked up (subfolders searched).
    pub lora_dirs: Vec<PathBuf>,
    /// Where embeddings are looked up (subfolders searched).
    pub embedding_dirs: Vec<PathBuf>,
}

/// `FILE[:WEIGHT]` (the weight after the last colon when it parses as a number, so
/// Windows drive letters and colons in names survive).
pub fn parse_lora_arg(s: &str) -> Result<LoraUse> {
    let (path, weight) = match s.rsplit_once(':') {
        Some((p, w)) if !p.is_empty() && !w.contains(['/', '\\']) => {
            match w.trim().parse::<f64>() {
                Ok(x) if x.is_finite() => (p, x),
                _ => {
                    return Err(Error::invalid(
                        "lora",
                        format!("{s:?}: the weight {w:?} is not a number (FILE[:WEIGHT])"),
                    ))
                }
            }
        }
        _ => (s, 1.0),
    };
    Ok(LoraUse {
        path: PathBuf::from(path),
        te: weight,
        unet: weight,
    })
}

/// The LoRA and embeddings folders of an A1111 or ComfyUI folder (given as the install's
/// root, its `models` folder, or its checkpoint folder), those that exist.
pub fn folders_in(dir: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let up = |n: usize| {
        let mut p = dir.to_path_buf();
        for _ in 0..n {
            p = p.parent().map(Path::to_path_buf).unwrap_or_default();
        }
        p
    };
    let lora = [
        dir.join("models/Lora"),
        dir.join("Lora"),
        up(1).join("Lora"),
        dir.join("models/loras"),
        dir.join("loras"),
        up(1).join("loras"),
    ];
    let emb = [
        dir.join("embeddings"),
        up(1).join("embeddings"),
        up(2).join("embeddings"),
        dir.join("models/embeddings"),
    ];
    let keep = |v: &[PathBuf]| {
        let mut out: Vec<PathBuf> = Vec::new();
        for p in v {
            if p.is_dir() && !out.iter().any(|o| o == p) {
                out.push(p.clone());
            }
        }
        out
    };
    (keep(&lora), keep(&emb))
}

/// Identity of a file's contents for the caches.
type Stamp = (u64, Option<SystemTime>);

fn stamp(p: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(p).ok()?;
    Some((m.len(), m.modified().ok()))
}

/// Parsed LoRAs and embeddings, with their A1111 hashes.
#[derive(Default)]
pub struct AdapterCache {
    loras: HashMap<PathBuf, (Stamp, Arc<LoraFile>, String)>,
    embeddings: HashMap<PathBuf, (Stamp, Arc<Embedding>)>,
    ti_hashes: HashMap<PathBuf, (Stamp, String)>,
}

impl AdapterCache {
    /// The LoRA at `path` and its hash, parsed once per version of the file.
    pub fn lora(&mut self, path: &Path) -> Result<(Arc<LoraFile>, String)> {
        let st = stamp(path);
        if let (Some(st), Some((s, f, h))) = (st, self.loras.get(path)) {
            if *s == st {
                return Ok((f.clone(), h.clone()));
            }
        }
        let f = Arc::new(LoraFile::open(path)?);
        let h = lora::addnet_hash(path)?;
        if let Some(st) = st {
            self.loras
                .insert(path.to_path_buf(), (st, f.clone(), h.clone()));
        }
        Ok((f, h))
    }

    fn embedding(&mut self, path: &Path) -> Result<Arc<Embedding>> {
        let st = stamp(path);
        if let (Some(st), Some((s, e))) = (st, self.embeddings.get(path)) {
            if *s == st {
                return Ok(e.clone());
            }
        }
        let e = Arc::new(Embedding::open(path)?);
        if let Some(st) = st {
            self.embeddings.insert(path.to_path_buf(), (st, e.clone()));
        }
        Ok(e)
    }

    fn ti_hash(&mut self, path: &Path) -> Result<String> {
        let st = stamp(path);
        if let (Some(st), Some((s, h))) = (st, self.ti_hashes.get(path)) {
            if *s == st {
                return Ok(h.clone());
            }
        }
        let h = embedding::hash(path)?;
        if let Some(st) = st {
            self.ti_hashes.insert(path.to_path_buf(), (st, h.clone()));
        }
        Ok(h)
    }
}

/// The LoRAs of a job, resolved: the prompt without its tags, each LoRA's file and
/// multipliers, and what to warn about.
#[derive(Debug, Clone, Default)]
pub struct ResolvedLoras {
    pub prompt: String,
    pub uses: Vec<(String, LoraUse)>,
    pub warnings: Vec<String>,
}

/// Reads the prompt's tags (A1111 reads none from the negative prompt) and finds each
/// tag's file.
pub fn resolve_loras(prompt: &str, negative: &str, n: &Networks) -> Result<ResolvedLoras> {
    let (text, tags) = extra_networks::strip_tags(prompt);
    let (loras, other) = extra_networks::lora_tags(&tags)?;
    let mut out = ResolvedLoras {
        prompt: text,
        ..Default::default()
    };
    for kind in other {
        out.warnings.push(format!(
            "<{kind}:…> tags are not supported: removed from the prompt (as A1111 removes them) and not applied"
        ));
    }
    let (_, neg_tags) = extra_networks::strip_tags(negative);
    if neg_tags
        .iter()
        .any(|t| t.kind == "lora" || t.kind == "lyco")
    {
        out.warnings.push(
            "the negative prompt's <lora:…> tags are not applied (A1111 reads LoRA tags from the prompt only); they stay in its text"
                .into(),
        );
    }
    for LoraTag { name, te, unet } in loras {
        let path = lora::find_named(&n.lora_dirs, &name, "LoRA")?;
        out.uses.push((name, LoraUse { path, te, unet }));
    }
    for u in &n.loras {
        out.uses.push((lora::stem(&u.path), u.clone()));
    }
    Ok(out)
}

/// Per component, weight name → the terms the LoRAs add (what the model's weight tables
/// are set to), with each LoRA's A1111 hash and warnings for modules that matched nothing.
#[derive(Default)]
pub struct LoraTerms {
    pub want: HashMap<Component, HashMap<String, Vec<Delta>>>,
    pub hashes: Vec<(String, String)>,
    pub warnings: Vec<String>,
}

pub fn lora_terms(
    cache: &mut AdapterCache,
    uses: &[(String, LoraUse)],
    keys: &KeyMap,
) -> Result<LoraTerms> {
    let mut want = HashMap::new();
    let mut hashes: Vec<(String, String)> = Vec::new();
    let mut warnings = Vec::new();
    for (name, u) in uses {
        let (file, hash) = cache.lora(&u.path)?;
        let unmatched = file.terms(keys, u.te, u.unet, &mut want)?;
        if unmatched > 0 {
            warnings.push(format!(
                "LoRA {name}: {unmatched} of its modules match nothing in this model and were skipped"
            ));
        }
        if !file.unknown.is_empty() {
            warnings.push(format!(
                "LoRA {name}: {} keys are not LoRA weights and were ignored (first: {})",
                file.unknown.len(),
                file.unknown[0]
            ));
        }
        if !hashes.iter().any(|(n, _)| n == name) {
            hashes.push((name.clone(), hash));
        }
    }
    Ok(LoraTerms {
        want,
        hashes,
        warnings,
    })
}

/// The embeddings a job's prompts may use: those of the folders whose names occur in the
/// prompt texts, read, with each tokenizer's view of their names.
pub struct EmbeddingSet {
    names: Vec<String>,
    paths: Vec<PathBuf>,
    loaded: Vec<Option<Arc<Embedding>>>,
    /// Per tokenizer (first, second).
    words: [Vec<EmbeddingWord>; 2],
}

impl EmbeddingSet {
    pub fn empty() -> Self {
        Self {
            names: Vec::new(),
            paths: Vec::new(),
            loaded: Vec::new(),
            words: [Vec::new(), Vec::new()],
        }
    }

    /// Finds the candidates for `texts` in `dirs`.
    pub fn for_prompts(
        cache: &mut AdapterCache,
        dirs: &[PathBuf],
        texts: &[&str],
        tokenizers: [Option<&ClipTokenizer>; 2],
    ) -> Result<Self> {
        let mut set = Self::empty();
        if dirs.is_empty() {
            return Ok(set);
        }
        let lower: Vec<String> = texts.iter().map(|t| t.to_lowercase()).collect();
        for (name, path) in embedding::list(dirs) {
            let n = name.to_lowercase();
            if n.is_empty() || !lower.iter().any(|t| t.contains(&n)) {
                continue;
            }
            let is_st = path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
            // A pickle is refused only if the prompt really uses it (see `check_used`).
            let loaded = if is_st {
                Some(cache.embedding(&path)?)
            } else {
                None
            };
            let vectors = loaded.as_ref().map_or(1, |e| e.len());
            for (i, tok) in tokenizers.iter().enumerate() {
                if let Some(tok) = tok {
                    set.words[i].push(EmbeddingWord {
                        ids: tok.tokenize_raw(&name)?,
                        vectors,
                    });
                }
            }
            set.names.push(name);
            set.paths.push(path);
            set.loaded.push(loaded);
        }
        Ok(set)
    }

    /// The words for tokenizer `which` (0 or 1).
    pub fn words(&self, which: usize) -> &[EmbeddingWord] {
        &self.words[which]
    }

    /// Embedding `i` (as [`crate::engine::prompt::PromptTokens::used`] names it); a pickle
    /// gets its refusal here.
    pub fn get(&self, i: usize) -> Result<&Arc<Embedding>> {
        match self.loaded.get(i) {
            Some(Some(e)) => Ok(e),
            _ => Err(Error::Pickle {
                path: self.paths.get(i).cloned().unwrap_or_default(),
            }),
        }
    }

    /// "TI hashes" for the embeddings `used` (indices).
    pub fn hashes(
        &self,
        cache: &mut AdapterCache,
        used: &[usize],
    ) -> Result<Vec<(String, String)>> {
        let mut out: Vec<(String, String)> = Vec::new();
        for &i in used {
            let name = self.names[i].clone();
            if !out.iter().any(|(n, _)| *n == name) {
                out.push((name, cache.ti_hash(&self.paths[i])?));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_arguments() {
        let u = parse_lora_arg("loras/pixel.safetensors:0.6").unwrap();
        assert_eq!(
            (u.path.to_str(), u.te, u.unet),
            (Some("loras/pixel.safetensors"), 0.6, 0.6)
        );
        let u = parse_lora_arg("x.safetensors:-0.5").unwrap();
        assert_eq!(u.te, -0.5);
        let u = parse_lora_arg("x.safetensors").unwrap();
        assert_eq!(u.te, 1.0);
        let u = parse_lora_arg("C:/loras/x.safetensors").unwrap();
        assert_eq!(u.path, PathBuf::from("C:/loras/x.safetensors"));
        let e = parse_lora_arg("x.safetensors:strong")
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"strong\" is not a number"), "{e}");
        assert!(parse_lora_arg("x.safetensors:nan").is_err());
    }
}
