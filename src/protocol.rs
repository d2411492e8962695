//! The messages between the studio window and the generation thread: plain data only (no
//! egui, no candle types), so either side can be replaced — the tests drive the window with
//! a fake engine that speaks this protocol without any weights.
//!
//! Commands and events travel over crossbeam channels. Previews do not: each grid cell has a
//! latest-value slot ([`PreviewSlots`]) that the worker overwrites, so a slow window never
//! makes previews pile up. After every event or preview the worker calls the waker (the
//! window passes one that calls `ctx.request_repaint()`).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::engine::memory::{MemoryMode, Slicing, Tiling};
use crate::engine::schedulers::SchedulerKind;
use crate::engine::tokenizer::ClipTokenizer;

/// The grid has 2 rows of 4 cells.
pub const GRID_CELLS: usize = 8;

/// Identifies a job for its whole life (queued, running, done).
pub type JobId = u64;

/// An RGB8 image, row-major, `width * height * 3` bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<u8>,
}

impl std::fmt::Debug for RgbImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RgbImage({}x{})", self.width, self.height)
    }
}

/// How per-step previews are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum PreviewMode {
    /// TAESD when its weights were found, else the linear approximation.
    #[default]
    Taesd,
    /// The 4×3 latent→RGB matrix at 1/8 resolution: nearly free.
    Linear,
    /// No previews.
    Off,
}

/// Which model to load and how.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModelSpec {
    /// A diffusers folder or a hub id.
    pub model: String,
    /// `cpu` or `cuda`.
    pub device: String,
    /// `f32`, `f16` or `bf16`.
    pub dtype: String,
    /// TAESD weights: a folder or hub id (`madebyollin/taesd`); `None` → linear previews.
    pub taesd: Option<String>,
    /// A VAE to use instead of the model's own: hub id, diffusers folder or single file.
    #[serde(default)]
    pub vae: Option<String>,
    /// Where the weights live: auto, full, medvram or lowvram (a change reloads).
    #[serde(default)]
    pub memory: MemoryMode,
    /// Keep recently used models loaded up to this many bytes together; `None`: automatic
    /// (half the free RAM for CPU models, 16 GiB on a GPU).
    #[serde(default)]
    pub cache_bytes: Option<u64>,
}

/// A single-channel image (0 = keep, 255 = repaint), row-major, `width * height` bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct MaskImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl std::fmt::Debug for MaskImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MaskImage({}x{})", self.width, self.height)
    }
}

/// img2img / inpainting input. The worker resizes and centre-crops the picture (and the
/// mask) to the job's size, as the CLI does.
#[derive(Debug, Clone, PartialEq)]
pub struct InitInput {
    pub image: RgbImage,
    /// 0..1: how much of the schedule runs (1 = ignore the picture's content).
    pub strength: f64,
    /// White = repaint. Any size; resized to the picture's.
    pub mask: Option<MaskImage>,
}

/// The studio's ControlNet for a job: the control map already made (fitted and
/// preprocessed at the job's size by the window, which shows it), and how it steers.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlInput {
    /// A ControlNet folder, `.safetensors` file or hub id.
    pub model: String,
    pub map: RgbImage,
    /// The preprocessor that made the map ("canny", "none"): A1111's "Module".
    pub module: String,
    pub scale: f64,
    pub start: f64,
    pub end: f64,
}

/// One job: up to 8 images sharing prompt and settings, each with its own seed and cell.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct JobRequest {
    pub id: JobId,
    pub prompt: String,
    pub negative_prompt: String,
    /// One seed per image. Consecutive seeds run as one batch (image i = seed + i).
    pub seeds: Vec<u64>,
    /// The grid cell each image fills (same length as `seeds`).
    pub cells: Vec<usize>,
    pub steps: usize,
    pub guidance: f64,
    #[serde(with = "scheduler_serde")]
    pub scheduler: SchedulerKind,
    pub width: usize,
    pub height: usize,
    pub preview: PreviewMode,
    /// Preview every N steps (1 = every step).
    pub preview_every: usize,
    /// Where finished images are saved (created if missing).
    pub output_dir: PathBuf,
    /// Compare mode: the models (hub ids, folders, single files) that draw the rows; they
    /// load with the current model's device, dtype and VAE. Empty → the loaded model draws
    /// every image.
    #[serde(default)]
    pub models: Vec<String>,
    /// With `models`: the index into `models` of each image (same length as `seeds`).
    #[serde(default)]
    pub model_of: Vec<usize>,
    /// 1 = last CLIP layer, 2 = penultimate (A1111's "Clip skip"); 0 counts as 1.
    #[serde(default)]
    pub clip_skip: usize,
    /// Attention slicing for this job.
    #[serde(default)]
    pub attention_slicing: Slicing,
    /// Tiled VAE decode for this job.
    #[serde(default)]
    pub vae_tiling: Tiling,
    /// img2img / inpainting input (not persisted).
    #[serde(skip)]
    pub init: Option<InitInput>,
    /// A1111 variation seeds: image i blends in `seeds[i]`'s noise by `strength`.
    #[serde(default)]
    pub variation: Option<JobVariation>,
    /// Where the prompt's `<lora:NAME>` tags are looked up.
    #[serde(default)]
    pub lora_dirs: Vec<PathBuf>,
    /// Where embeddings named in the prompts are looked up.
    #[serde(default)]
    pub embedding_dirs: Vec<PathBuf>,
    /// A ControlNet steering every image (every row in compare mode; not persisted).
    #[serde(skip)]
    pub control: Option<ControlInput>,
    /// A1111's Hires. fix: a second pass at a larger size.
    #[serde(default)]
    pub hires: Option<JobHires>,
    /// Save the images (false: live mode's throwaway grids, kept only on request).
    #[serde(default = "yes")]
    pub save: bool,
}

fn yes() -> bool {
    true
}

/// Hires. fix for a job: the final size, the second pass's steps (None: the job's),
/// strength and upscaler (`latent`, `latent-nearest`, `lanczos`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct JobHires {
    pub width: usize,
    pub height: usize,
    pub steps: Option<usize>,
    pub strength: f64,
    pub upscaler: String,
    /// The "Upscale by" it came from (the metadata's "Hires upscale").
    pub scale: Option<f64>,
}

/// A1111's "Variation seed" for a job: one per image (same length as the job's seeds).
/// A variation seed equal to the image's own seed leaves the image as it is.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct JobVariation {
    pub seeds: Vec<u64>,
    /// 0..1: how far towards the variation seed's noise.
    pub strength: f64,
}

mod scheduler_serde {
    use crate::engine::schedulers::SchedulerKind;

    pub fn serialize<S: serde::Serializer>(k: &SchedulerKind, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(k.cli_name())
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SchedulerKind, D::Error> {
        let name: String = serde::Deserialize::deserialize(d)?;
        SchedulerKind::parse(&name).map_err(serde::de::Error::custom)
    }
}

/// What the window asks of the generation thread.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // a few per click; boxing would buy nothing
pub enum Command {
    /// Queue a job; it starts when the jobs before it are done.
    Generate(JobRequest),
    /// Stop a job: the running one within one denoising step, a queued one at once.
    Cancel(JobId),
    /// Load (or switch to) a model; a running job finishes first. Recently used models stay
    /// cached, so switching back is quick.
    LoadModel(ModelSpec),
    /// List the checkpoints in a folder (e.g. A1111's models/Stable-diffusion); answered by
    /// [`Event::ModelsFound`].
    ScanModels(PathBuf),
    /// List the LoRAs in these folders (subfolders searched), saying which fit the loaded
    /// model; answered by [`Event::LorasFound`].
    ScanLoras(Vec<PathBuf>),
    /// Finish: cancel everything and end the thread.
    Shutdown,
}

/// A counter for prompt tokens, shared by the worker once a model is loaded.
#[derive(Clone)]
pub struct TokenCounter(pub Arc<ClipTokenizer>);

impl TokenCounter {
    /// Prompt tokens and 75-token chunks, as A1111 counts them (`<lora:…>` tags and weights
    /// syntax stripped, BREAK and comma backtracking applied); `None` when the text cannot be tokenized.
    pub fn count(&self, text: &str) -> Option<(usize, usize)> {
        let (text, _) = crate::engine::extra_networks::strip_tags(text);
        crate::engine::prompt::tokenize(&self.0, &text)
            .ok()
            .map(|t| (t.token_count, t.chunks.len()))
    }
    /// Tokens that fit in one CLIP window (75 for SD).
    pub fn chunk(&self) -> usize {
        self.0.max_length.saturating_sub(2)
    }
    /// Each 75-token chunk's tokens as text (weights syntax stripped), so the window can
    /// show where chunks break; empty when the text cannot be tokenized.
    pub fn chunks(&self, text: &str) -> Vec<ChunkText> {
        let (text, _) = crate::engine::extra_networks::strip_tags(text);
        let Ok(t) = crate::engine::prompt::tokenize(&self.0, &text) else {
            return Vec::new();
        };
        let special = [self.0.bos_id(), self.0.eos_id(), self.0.pad_id()];
        t.chunks
            .iter()
            .map(|c| {
                let ids: Vec<u32> = c
                    .ids
                    .iter()
                    .copied()
                    .filter(|i| !special.contains(i))
                    .collect();
                ChunkText {
                    tokens: ids.len(),
                    text: self.0.decode(&ids),
                }
            })
            .collect()
    }
}

/// One prompt chunk as the text encoder sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkText {
    /// Prompt tokens in this chunk (≤ 75).
    pub tokens: usize,
    /// Those tokens decoded back to text.
    pub text: String,
}

/// A LoRA found by [`Command::ScanLoras`].
#[derive(Debug, Clone, PartialEq)]
pub struct FoundLora {
    /// The name a `<lora:NAME>` tag uses (the file's stem).
    pub name: String,
    pub path: PathBuf,
    /// "SD 1.x", "SD 2.x", "SDXL", or "" when the file does not say.
    pub family: String,
    /// "UNet + text encoder", "UNet", "text encoder".
    pub parts: String,
    /// Whether it fits the loaded model (None: no model loaded, or the file does not say).
    pub fits: Option<bool>,
    /// `NAME.preview.png` beside the file (as civitai helpers save it).
    pub preview: Option<PathBuf>,
    /// Why it cannot be used (a LyCORIS type, a broken header), if so.
    pub error: Option<String>,
}

/// A checkpoint found by a folder scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundModel {
    /// What to load (give this to [`ModelSpec::model`]).
    pub path: PathBuf,
    /// Path relative to the scanned folder, for display.
    pub name: String,
    /// "single file", "diffusers folder", or "pickle (refused: convert to .safetensors)".
    pub kind: String,
    pub bytes: u64,
    /// False for files that cannot be loaded (pickles).
    pub loadable: bool,
}

impl std::fmt::Debug for TokenCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenCounter")
    }
}

/// What the generation thread reports.
#[derive(Debug, Clone)]
pub enum Event {
    /// A model is being loaded (resolving, hashing, reading weights); `progress` 0..1 when
    /// known.
    ModelLoading {
        message: String,
        progress: Option<f32>,
    },
    /// The model is loaded and jobs can run.
    ModelReady {
        name: String,
        device: String,
        dtype: String,
        /// "TAESD" or "linear": what previews will use.
        previewer: String,
        /// Where the weights live: "full", "medvram" or "lowvram", with why when automatic.
        memory: String,
        tokens: Option<TokenCounter>,
    },
    /// Loading a model failed; the previous one (if any) is gone.
    ModelFailed { message: String },
    /// The answer to [`Command::ScanModels`] (or why the folder could not be read).
    ModelsFound {
        dir: PathBuf,
        models: Vec<FoundModel>,
        error: Option<String>,
    },
    /// The answer to [`Command::ScanLoras`].
    LorasFound { loras: Vec<FoundLora> },
    /// A job entered the queue behind `ahead` others.
    Queued { job: JobId, ahead: usize },
    /// A job left the queue and started.
    Started { job: JobId },
    /// A denoising step finished (1-based over the whole job; `elapsed` since the job started).
    Step {
        job: JobId,
        step: usize,
        total: usize,
        elapsed: Duration,
        /// The grid cells this step advanced (one lane: a model and a run of seeds); empty
        /// means every cell of the job.
        cells: Vec<usize>,
        /// Those cells' own progress, 1-based (in compare mode a row has `total / rows`
        /// steps).
        cell_step: usize,
        cell_total: usize,
    },
    /// A preview of one cell (delivered through [`PreviewSlots`], newest only).
    Preview {
        job: JobId,
        cell: usize,
        step: usize,
        image: RgbImage,
        /// Time spent decoding this step's previews (all cells together).
        decode_time: Duration,
    },
    /// One cell's final image (full VAE decode), saved at `path` when saving worked.
    CellDone {
        job: JobId,
        cell: usize,
        seed: u64,
        /// The model that drew it (its label, as in the PNG metadata).
        model: String,
        image: RgbImage,
        /// Where it was saved (None: not saved, e.g. a live job).
        path: Option<PathBuf>,
        /// Its A1111 `parameters` text (what the PNG holds or would hold).
        parameters: String,
    },
    /// Every cell of the job is done.
    JobDone { job: JobId, elapsed: Duration },
    /// The job (or, with `job: None`, the thread itself) failed; the message is for the user.
    Failed { job: Option<JobId>, message: String },
    /// The job stopped on request (queued jobs report this at once).
    Cancelled { job: JobId },
    /// Something the user should know that stopped nothing (e.g. an image could not be saved).
    Warning { message: String },
}

/// The newest preview per grid cell; the worker overwrites, the window takes.
#[derive(Default)]
pub struct PreviewSlots {
    slots: Mutex<Vec<Option<Event>>>,
}

impl PreviewSlots {
    /// Stores a preview event (anything else is ignored), replacing an older one.
    pub fn put(&self, cell: usize, event: Event) {
        if let Ok(mut s) = self.slots.lock() {
            if s.len() <= cell {
                s.resize(cell + 1, None);
            }
            s[cell] = Some(event);
        }
    }
    /// Drops a cell's waiting preview (its final image is on the way).
    pub fn clear(&self, cell: usize) {
        if let Ok(mut s) = self.slots.lock() {
            if let Some(x) = s.get_mut(cell) {
                *x = None;
            }
        }
    }
    /// Takes every waiting preview.
    pub fn take_all(&self) -> Vec<Event> {
        match self.slots.lock() {
            Ok(mut s) => s.iter_mut().filter_map(Option::take).collect(),
            Err(_) => Vec::new(),
        }
    }
}

/// Called after every event so the window wakes up.
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// The window's end: send commands, drain events.
pub struct EngineLink {
    pub commands: Sender<Command>,
    pub events: Receiver<Event>,
    pub previews: Arc<PreviewSlots>,
}

impl EngineLink {
    /// Sends a command; `false` when the thread is gone.
    pub fn send(&self, c: Command) -> bool {
        self.commands.send(c).is_ok()
    }
    /// Everything that arrived since the last call: channel events first, then previews.
    pub fn drain(&self) -> Vec<Event> {
        let mut out: Vec<Event> = self.events.try_iter().collect();
        out.extend(self.previews.take_all());
        out
    }
}

/// The generation thread's end (or a fake engine's, in tests).
pub struct WorkerLink {
    pub commands: Receiver<Command>,
    pub events: Sender<Event>,
    pub previews: Arc<PreviewSlots>,
    pub waker: Waker,
}

impl WorkerLink {
    /// Sends an event and wakes the window.
    pub fn send(&self, e: Event) {
        if let Event::Preview { cell, .. } = &e {
            self.previews.put(*cell, e);
        } else {
            let _ = self.events.send(e);
        }
        (self.waker)();
    }
    /// Waits up to `timeout` for a command.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Command, RecvTimeoutError> {
        self.commands.recv_timeout(timeout)
    }
}

/// A connected pair of ends.
pub fn link(waker: Waker) -> (EngineLink, WorkerLink) {
    let (ctx, crx) = crossbeam_channel::unbounded();
    let (etx, erx) = crossbeam_channel::unbounded();
    let previews = Arc::new(PreviewSlots::default());
    (
        EngineLink {
            commands: ctx,
            events: erx,
            previews: previews.clone(),
        },
        WorkerLink {
            commands: crx,
            events: etx,
            previews,
            waker,
        },
    )
}

/// Names for several models that tell them apart: each model's `base` label (a file's stem,
/// a folder's name, a hub id), and for those that share one, the end of the path they were
/// given, one more folder at a time until they differ (`foo` beside `foo.safetensors`;
/// `a/model.safetensors` beside `b/model.safetensors`). The same spec twice keeps one name.
pub fn distinct_labels(specs: &[String], base: impl Fn(&str) -> String) -> Vec<String> {
    let mut labels: Vec<String> = specs.iter().map(|s| base(s)).collect();
    let parts: Vec<Vec<&str>> = specs
        .iter()
        .map(|s| {
            s.trim()
                .trim_end_matches(['/', '\\'])
                .split(['/', '\\'])
                .filter(|p| !p.is_empty() && *p != ".")
                .collect()
        })
        .collect();
    let tail = |i: usize, k: usize| {
        let p = &parts[i];
        p[p.len().saturating_sub(k)..].join("/")
    };
    for k in 1.. {
        let clash: Vec<usize> = (0..specs.len())
            .filter(|&i| {
                (0..specs.len())
                    .any(|j| j != i && labels[j] == labels[i] && specs[j].trim() != specs[i].trim())
            })
            .collect();
        if clash.is_empty() || clash.iter().all(|&i| k > parts[i].len()) {
            break;
        }
        for &i in &clash {
            labels[i] = tail(i, k);
        }
    }
    labels
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn compare_labels_tell_models_apart() {
        let stem = |s: &str| {
            let p = std::path::Path::new(s.trim_end_matches('/'));
            match p.extension() {
                Some(_) => p.file_stem(),
                None => p.file_name(),
            }
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| s.to_string())
        };
        let v = |xs: &[&str]| xs.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            distinct_labels(&v(&["models/foo", "models/single/foo.safetensors"]), stem),
            v(&["foo", "foo.safetensors"])
        );
        assert_eq!(
            distinct_labels(
                &v(&["a/model.safetensors", "/x/b/model.safetensors/"]),
                stem
            ),
            v(&["a/model.safetensors", "b/model.safetensors"])
        );
        // Different names stay short; one model twice keeps one name.
        assert_eq!(
            distinct_labels(
                &v(&["a/x.safetensors", "owner/repo", "a/x.safetensors"]),
                stem
            ),
            v(&["x", "repo", "x"])
        );
        // Three-way: two share a parent name too.
        assert_eq!(
            distinct_labels(
                &v(&["p/a/m.safetensors", "q/a/m.safetensors", "b/m.safetensors"]),
                stem
            ),
            v(&["p/a/m.safetensors", "q/a/m.safetensors", "b/m.safetensors"])
        );
    }

    fn preview(cell: usize, step: usize) -> Event {
        Event::Preview {
            job: 1,
            cell,
            step,
            image: RgbImage {
                width: 1,
                height: 1,
                rgb: vec![0, 0, 0],
            },
            decode_time: Duration::ZERO,
        }
    }

    #[test]
    fn previews_keep_only_the_newest_per_cell_and_wake_every_time() {
        let wakes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let w = wakes.clone();
        let (ui, worker) = link(Arc::new(move || {
            w.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }));
        for step in 1..=5 {
            worker.send(preview(0, step));
            worker.send(preview(3, step));
        }
        worker.send(Event::Cancelled { job: 1 });
        assert_eq!(wakes.load(std::sync::atomic::Ordering::SeqCst), 11);
        let got = ui.drain();
        assert_eq!(got.len(), 3);
        assert!(matches!(got[0], Event::Cancelled { job: 1 }));
        let steps: Vec<_> = got[1..]
            .iter()
            .map(|e| match e {
                Event::Preview { cell, step, .. } => (*cell, *step),
                _ => (99, 99),
            })
            .collect();
        assert_eq!(steps, vec![(0, 5), (3, 5)]);
        assert!(ui.drain().is_empty());
    }
}
