//! What the studio remembers between runs: one serde struct, every field defaulted, written
//! atomically as JSON (`$XDG_CONFIG_HOME/sd-studio/state.json` unless told otherwise).

use crate::engine::memory::MemoryOptions;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::engine::metadata::write_atomic;
use crate::protocol::PreviewMode;

/// Most generations kept in the history.
pub const HISTORY_LEN: usize = 200;

/// How the grid's seeds are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum SeedMode {
    /// Cell i uses seed + i (A1111's batch behaviour).
    #[default]
    Increment,
    /// Every cell uses the same seed.
    Same,
}

/// The generation parameters in the editor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Params {
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: u64,
    /// Locked: the seed stays; unlocked: a fresh random seed for every Generate.
    pub seed_locked: bool,
    pub seed_mode: SeedMode,
    /// `SchedulerKind::cli_name()`.
    pub sampler: String,
    pub steps: usize,
    pub cfg: f64,
    pub width: usize,
    pub height: usize,
    /// Images per job, 1–8.
    pub count: usize,
    /// A1111's "Clip skip": 1 = last CLIP layer, 2 = penultimate.
    pub clip_skip: usize,
    /// img2img "Denoising strength" (0..1): how much of the schedule runs over the picture.
    pub denoising_strength: f64,
    /// A1111's "Variation seed": image i blends in seed `variation_seed + i`'s noise.
    pub variation_seed: u64,
    /// A1111's "Variation strength": 0 = off (the main seed alone), 1 = the variation seed's.
    pub variation_strength: f64,
    /// The ControlNet panel.
    pub control: ControlSettings,
    /// A1111's Hires. fix.
    pub hires: HiresSettings,
}

/// The Hires. fix panel (A1111's names in the window, our CLI names stored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HiresSettings {
    pub enabled: bool,
    /// `latent`, `latent-nearest` or `lanczos`.
    pub upscaler: String,
    /// "Upscale by".
    pub scale: f64,
    /// "Hires steps": 0 = the first pass's.
    pub steps: usize,
    /// "Denoising strength" of the second pass.
    pub strength: f64,
}

impl Default for HiresSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            upscaler: "latent".into(),
            scale: 2.0,
            steps: 0,
            strength: 0.7,
        }
    }
}

/// The ControlNet panel's settings (A1111's ControlNet unit).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ControlSettings {
    pub enabled: bool,
    /// ControlNet folder, `.safetensors` file or hub id.
    pub model: String,
    /// The picture the map is made from (reloaded at start).
    pub image: Option<PathBuf>,
    /// "none" or "canny".
    pub preprocess: String,
    pub scale: f64,
    pub start: f64,
    pub end: f64,
}

impl Default for ControlSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            model: String::new(),
            image: None,
            preprocess: "canny".into(),
            scale: 1.0,
            start: 0.0,
            end: 1.0,
        }
    }
}

impl Default for Params {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            seed: 1,
            seed_locked: false,
            seed_mode: SeedMode::Increment,
            sampler: "dpm++2m-karras".into(),
            steps: 20,
            cfg: 7.0,
            width: 512,
            height: 512,
            count: 8,
            clip_skip: 1,
            denoising_strength: 0.75,
            variation_seed: 0,
            variation_strength: 0.0,
            control: ControlSettings::default(),
            hires: HiresSettings::default(),
        }
    }
}

/// Settings that are not part of an image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub output_dir: PathBuf,
    pub preview: PreviewMode,
    /// Preview every N steps.
    pub preview_every: usize,
    pub device: String,
    pub dtype: String,
    /// TAESD folder or hub id; empty: linear previews only.
    pub taesd: String,
    /// The VAE used instead of the model's own (hub id, folder, file); empty: "Automatic".
    pub vae: String,
    /// Where checkpoints live (e.g. A1111's `models/Stable-diffusion`), for the folder scan.
    pub models_dir: PathBuf,
    /// Mask brush diameter in screen points.
    pub brush_size: f32,
    /// Memory mode (applies at the next load), attention slicing and tiled VAE decode
    /// (apply to the next job).
    pub memory: MemoryOptions,
    /// Model cache size in GiB; 0: automatic.
    pub cache_gib: f64,
    /// LoRA folder; empty: the models folder's (A1111 models/Lora, ComfyUI models/loras).
    pub lora_dir: PathBuf,
    /// Embeddings folder; empty: the models folder's (A1111 embeddings).
    pub embeddings_dir: PathBuf,
    /// Live mode: every edit regenerates the grid (after a short pause in typing).
    pub live: bool,
    /// Save live images too (off: only cells you Keep are saved and enter the history).
    pub live_save: bool,
}

impl Settings {
    /// Where `<lora:…>` tags and embeddings are looked up: the folders set here, then
    /// those of the models folder.
    pub fn adapter_dirs(&self) -> (Vec<PathBuf>, Vec<PathBuf>) {
        let (mut loras, mut embs) = (Vec::new(), Vec::new());
        if !self.lora_dir.as_os_str().is_empty() {
            loras.push(self.lora_dir.clone());
        }
        if !self.embeddings_dir.as_os_str().is_empty() {
            embs.push(self.embeddings_dir.clone());
        }
        if !self.models_dir.as_os_str().is_empty() {
            let (l, e) = crate::engine::apply::folders_in(&self.models_dir);
            loras.extend(
                l.into_iter()
                    .filter(|d| !loras.contains(d))
                    .collect::<Vec<_>>(),
            );
            embs.extend(
                e.into_iter()
                    .filter(|d| !embs.contains(d))
                    .collect::<Vec<_>>(),
            );
        }
        (loras, embs)
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            output_dir: PathBuf::from("outputs"),
            preview: PreviewMode::Taesd,
            preview_every: 1,
            device: "auto".into(),
            dtype: "auto".into(),
            taesd: crate::engine::taesd::TAESD_REPO.into(),
            vae: String::new(),
            models_dir: PathBuf::new(),
            brush_size: 32.0,
            memory: MemoryOptions::default(),
            cache_gib: 0.0,
            lora_dir: PathBuf::new(),
            embeddings_dir: PathBuf::new(),
            live: false,
            live_save: false,
        }
    }
}

/// Compare mode: 2–4 models draw the same seeds, one grid row each.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CompareSettings {
    pub enabled: bool,
    /// One entry per row (hub id, diffusers folder or single file); 2–4 rows.
    pub models: Vec<String>,
}

impl Default for CompareSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            models: vec![String::new(), String::new()],
        }
    }
}

/// One finished generation: its parameters and where its images went.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HistoryEntry {
    pub params: Params,
    pub model: String,
    /// Compare mode: the models of the rows (restored into Compare models).
    pub compare_models: Vec<String>,
    pub seeds: Vec<u64>,
    pub images: Vec<PathBuf>,
    /// Seconds since the Unix epoch.
    pub time: u64,
}

/// Everything persisted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Persisted {
    pub params: Params,
    pub settings: Settings,
    /// The model to load at start (folder or hub id).
    pub model: String,
    /// Most recent first.
    pub recent_models: Vec<String>,
    /// Oldest first, at most [`HISTORY_LEN`].
    pub history: Vec<HistoryEntry>,
    pub compare: CompareSettings,
}

impl Persisted {
    /// The default state file.
    pub fn default_path() -> PathBuf {
        let base = std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
            .unwrap_or_else(|| PathBuf::from("."));
        base.join("sd-studio").join("state.json")
    }

    /// Reads the state; a missing file is a fresh start, an unreadable one is reported and
    /// replaced by defaults (the bad file is left alone until the next save).
    pub fn load(path: &Path) -> (Self, Option<String>) {
        match std::fs::read_to_string(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Self::default(), None),
            Err(e) => (
                Self::default(),
                Some(format!("cannot read {}: {e}", path.display())),
            ),
            Ok(text) => match serde_json::from_str(&text) {
                Ok(s) => (s, None),
                Err(e) => (
                    Self::default(),
                    Some(format!(
                        "{} is not a valid state file ({e}); starting fresh",
                        path.display()
                    )),
                ),
            },
        }
    }

    /// Writes the state atomically, creating the folder.
    pub fn save(&self, path: &Path) -> Result<(), String> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let text = serde_json::to_string_pretty(self).map_err(|e| e.to_string())?;
        write_atomic(path, text.as_bytes()).map_err(|e| e.to_string())
    }

    /// Puts a model first in the recent list (at most 10).
    pub fn remember_model(&mut self, model: &str) {
        self.recent_models.retain(|m| m != model);
        self.recent_models.insert(0, model.to_string());
        self.recent_models.truncate(10);
    }

    pub fn push_history(&mut self, entry: HistoryEntry) {
        self.history.push(entry);
        let over = self.history.len().saturating_sub(HISTORY_LEN);
        self.history.drain(..over);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn state_survives_a_round_trip_and_old_files_fill_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("state.json");
        let mut s = Persisted::default();
        s.params.prompt = "a fox".into();
        s.params.seed_locked = true;
        s.remember_model("tests/fixtures/tiny-sd15");
        s.push_history(HistoryEntry {
            seeds: vec![1, 2],
            images: vec!["outputs/1.png".into()],
            ..Default::default()
        });
        s.save(&path).unwrap();
        let (back, err) = Persisted::load(&path);
        assert!(err.is_none());
        assert_eq!(back, s);
        std::fs::write(&path, r#"{"params": {"prompt": "old"}}"#).unwrap();
        let (old, err) = Persisted::load(&path);
        assert!(err.is_none());
        assert_eq!(old.params.prompt, "old");
        assert_eq!(old.params.steps, 20);
        std::fs::write(&path, "not json").unwrap();
        let (bad, err) = Persisted::load(&path);
        assert_eq!(bad, Persisted::default());
        assert!(err.unwrap().contains("not a valid state file"));
    }
}
