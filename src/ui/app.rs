//! The studio: owns the persisted state, the grid and the engine link; drains engine events
//! every frame, draws the panels and applies the commands they return.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use egui::{Key, Modifiers};

use super::commands::UiCommand;
use super::compare::{self, GridLayout};
use super::control::{self, ControlPanel};
use super::errors::{Message, Severity};
use super::img2img::{self, InitState};
use super::loras::{self, LoraPanel};
use super::models_folder::{self, ScanState};
use super::screenshot::ScreenshotPlan;
use super::state::{HistoryEntry, Params, Persisted, SeedMode};
use super::{
    errors, grid, history, model_picker, prompt, queue, sampling, seed, status_bar, viewer,
};
use crate::engine::metadata::Parameters;
use crate::engine::metadata::{encode_png, parse_a1111, read_png_parameters, write_atomic};
use crate::engine::schedulers::SchedulerKind;
use crate::protocol::{
    Command, EngineLink, Event, JobId, JobRequest, ModelSpec, RgbImage, TokenCounter, GRID_CELLS,
};

/// How the studio was started.
#[derive(Debug, Clone, Default)]
pub struct StudioOptions {
    /// Load this model at start (else the last one used, if any).
    pub model: Option<String>,
    pub device: Option<String>,
    pub dtype: Option<String>,
    /// Where the persisted state lives (default: [`Persisted::default_path`]); `None` in
    /// tests that must not touch the user's files when `no_persist` is set.
    pub state_file: Option<PathBuf>,
    /// Do not read or write the state file.
    pub no_persist: bool,
    /// Screenshot mode: save PNGs of the window here, then close.
    pub screenshot_dir: Option<PathBuf>,
    /// Generate once the model is ready (with `prompt` when given).
    pub auto_generate: bool,
    pub prompt: Option<String>,
    /// `wgpu` (default) or `glow`.
    pub renderer: String,
    /// TAESD weights (folder or hub id) instead of the remembered setting.
    pub taesd: Option<String>,
    /// Output folder instead of the remembered setting.
    pub out: Option<PathBuf>,
}

/// What a grid cell shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CellStatus {
    Empty,
    /// Its job is queued or encoding the prompt.
    Waiting,
    /// Denoising; the image is the latest preview.
    Running {
        step: usize,
        total: usize,
    },
    /// Steps done, the VAE is decoding.
    Decoding,
    Done,
    Cancelled,
    Failed,
}

/// One of the eight grid cells.
pub struct Cell {
    pub job: Option<JobId>,
    pub seed: Option<u64>,
    pub status: CellStatus,
    pub texture: Option<egui::TextureHandle>,
    /// The final image, for Save as….
    pub image: Option<RgbImage>,
    pub path: Option<PathBuf>,
    /// The parameters that made it (for Copy parameters / Regenerate).
    pub params: Option<Params>,
    /// The model that drew it (compare mode: the row's model).
    pub model: Option<String>,
    /// img2img: the denoising strength it was drawn with.
    pub denoise: Option<f64>,
    /// Its A1111 parameters text, as the engine wrote (or would write) it.
    pub parameters: Option<String>,
}

impl Default for Cell {
    fn default() -> Self {
        Self {
            job: None,
            seed: None,
            status: CellStatus::Empty,
            texture: None,
            image: None,
            path: None,
            parameters: None,
            params: None,
            model: None,
            denoise: None,
        }
    }
}

/// A job the window sent, as the queue panel shows it.
#[derive(Debug, Clone)]
pub struct JobView {
    pub request: JobRequest,
    pub params: Params,
    pub running: bool,
    pub step: usize,
    pub total: usize,
    pub elapsed: Duration,
    pub paths: Vec<PathBuf>,
    /// The grid layout the job brings when it starts (`None`: keep the current one).
    pub layout: Option<GridLayout>,
    /// Queued by live mode (replaced by the next edit; in the history only if saved).
    pub live: bool,
}

/// Live mode's debounce: what the editor looked like last frame and since when.
#[derive(Default)]
pub struct LiveState {
    last: Option<String>,
    changed_at: Option<Instant>,
    warned: bool,
    /// When the last live job was queued (for the latency measurement).
    pub queued_at: Option<Instant>,
}

/// Typing pause after which live mode regenerates.
pub const LIVE_DEBOUNCE: Duration = Duration::from_millis(150);

/// The loaded model, as the status bar shows it.
#[derive(Debug, Clone, Default)]
pub struct ModelStatus {
    pub name: String,
    pub device: String,
    pub dtype: String,
    pub previewer: String,
    /// Where the weights live ("full", "medvram (auto: …)", …).
    pub memory: String,
    /// `Some(message)` while loading.
    pub loading: Option<String>,
    /// Loading progress 0..1, when the worker knows it.
    pub progress: Option<f32>,
    pub ready: bool,
}

/// Frame and preview timings (for the benchmark).
#[derive(Debug, Clone, Default)]
pub struct Timings {
    /// CPU time of each `ui()` call while a job ran.
    pub frame_cpu: Vec<Duration>,
    /// eframe's CPU time for the previous frame (ui, tessellation, paint submission).
    pub frame_eframe: Vec<Duration>,
    /// Time between consecutive frames while a job ran.
    pub frame_interval: Vec<Duration>,
    /// Worker-side preview decode time per step (all cells).
    pub preview_decode: Vec<Duration>,
    /// From a step's event arriving to its previews arriving.
    pub preview_lag: Vec<Duration>,
    /// Step durations seen by the window.
    pub step: Vec<Duration>,
    last_frame: Option<Instant>,
    step_arrived: Option<(usize, Instant, Duration)>,
}

pub struct StudioApp {
    pub state: Persisted,
    pub engine: EngineLink,
    pub cells: Vec<Cell>,
    pub jobs: Vec<JobView>,
    pub messages: Vec<Message>,
    pub model: ModelStatus,
    pub tokens: Option<TokenCounter>,
    /// The model field's text (what Load will load).
    pub model_input: String,
    /// The cell open in the large view, with its zoom and pan.
    pub viewer: Option<viewer::ViewerState>,
    /// How the grid is laid out (plain, or one row per compared model).
    pub layout: GridLayout,
    /// The models folder's last scan.
    pub scan: ScanState,
    /// The LoRA folders' last scan.
    pub loras: LoraPanel,
    /// The prompt cursor's byte offset (kept while other widgets have focus).
    pub prompt_cursor: Option<usize>,
    /// The img2img init image and its mask.
    pub init: Option<InitState>,
    /// The VAE free-text field.
    pub vae_input: String,
    /// Open the Image input panel on the next frame.
    img2img_open: bool,
    /// Where the Image input panel was last drawn (files dropped there become the init image).
    init_drop_rect: Option<egui::Rect>,
    /// The ControlNet panel's pictures and the ControlNets found.
    pub control: ControlPanel,
    /// The history panel's comparison.
    pub history_view: history::HistoryView,
    /// Live mode's debounce.
    pub live: LiveState,
    /// Where the ControlNet panel was last drawn (files dropped there become its picture).
    control_drop_rect: Option<egui::Rect>,
    /// The saved control picture, read on the first frame.
    pending_control_image: Option<PathBuf>,
    pub next_job: JobId,
    pub timings: Timings,
    pub options: StudioOptions,
    state_file: Option<PathBuf>,
    screenshots: Option<ScreenshotPlan>,
    engine_gone: bool,
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish() & 0xffff_ffff
}

/// The system dialog for a `.safetensors` file.
fn pick_safetensors(title: &str) -> Option<PathBuf> {
    rfd::FileDialog::new()
        .set_title(title)
        .add_filter("safetensors", &["safetensors"])
        .pick_file()
}

/// The system dialog for a picture (PNG, JPEG, WebP).
fn pick_image(title: &str) -> Option<PathBuf> {
    rfd::FileDialog::new()
        .set_title(title)
        .add_filter("Images", &["png", "jpg", "jpeg", "webp"])
        .pick_file()
}

/// A file's name for display (the whole path when it has none).
fn file_label(path: &std::path::Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// What live mode watches: every parameter of the editor (an edit changes it).
fn live_signature(p: &Params) -> String {
    serde_json::to_string(p).unwrap_or_default()
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl StudioApp {
    /// A studio talking to `engine` (the real worker, or a fake one in tests).
    pub fn new(engine: EngineLink, options: StudioOptions) -> Self {
        let state_file = if options.no_persist {
            None
        } else {
            Some(
                options
                    .state_file
                    .clone()
                    .unwrap_or_else(Persisted::default_path),
            )
        };
        let (mut state, load_err) = match &state_file {
            Some(p) => Persisted::load(p),
            None => (Persisted::default(), None),
        };
        if let Some(d) = &options.device {
            state.settings.device = d.clone();
        }
        if let Some(d) = &options.dtype {
            state.settings.dtype = d.clone();
        }
        if let Some(t) = &options.taesd {
            state.settings.taesd = t.clone();
        }
        if let Some(o) = &options.out {
            state.settings.output_dir = o.clone();
        }
        if let Some(p) = &options.prompt {
            state.params.prompt = p.clone();
        }
        let model = options.model.clone().unwrap_or_else(|| state.model.clone());
        let pending_control_image = state.params.control.image.clone();
        let mut app = Self {
            model_input: model.clone(),
            state,
            engine,
            cells: (0..GRID_CELLS).map(|_| Cell::default()).collect(),
            jobs: Vec::new(),
            messages: Vec::new(),
            model: ModelStatus::default(),
            tokens: None,
            viewer: None,
            layout: GridLayout::plain(),
            scan: ScanState::default(),
            loras: LoraPanel::default(),
            prompt_cursor: None,
            init: None,
            vae_input: String::new(),
            img2img_open: false,
            init_drop_rect: None,
            control: ControlPanel::default(),
            history_view: history::HistoryView::default(),
            live: LiveState::default(),
            control_drop_rect: None,
            pending_control_image,
            next_job: 1,
            timings: Timings::default(),
            screenshots: options.screenshot_dir.clone().map(ScreenshotPlan::new),
            options,
            state_file,
            engine_gone: false,
        };
        if let Some(e) = load_err {
            app.warn(e);
        }
        if !model.is_empty() {
            app.load_model(model);
        }
        app.scan_loras();
        app.scan_controlnets();
        app
    }

    /// Lists the models folder's ControlNet folders (names only; nothing is read).
    fn scan_controlnets(&mut self) {
        let dir = &self.state.settings.models_dir;
        self.control.found = if dir.as_os_str().is_empty() {
            Vec::new()
        } else {
            crate::engine::controlnet_files::list(&crate::engine::controlnet_files::folders_in(dir))
        };
    }

    fn set_control_from_file(&mut self, ctx: &egui::Context, path: &std::path::Path) {
        match img2img::load_image_file(path) {
            Ok(img) => {
                self.control.set_image(ctx, file_label(path), img);
                self.state.params.control.image = Some(path.to_path_buf());
            }
            Err(e) => self.error(format!("ControlNet picture: {e}")),
        }
    }

    /// Asks for the LoRA folders' contents (nothing to ask when none is set).
    fn scan_loras(&mut self) {
        let (dirs, _) = self.state.settings.adapter_dirs();
        if dirs.is_empty() {
            self.loras.found(Vec::new());
            return;
        }
        self.loras.scanning = true;
        self.send(Command::ScanLoras(dirs));
    }

    pub fn error(&mut self, text: impl Into<String>) {
        self.messages.push(Message {
            text: text.into(),
            severity: Severity::Error,
        });
    }

    pub fn warn(&mut self, text: impl Into<String>) {
        self.messages.push(Message {
            text: text.into(),
            severity: Severity::Warning,
        });
    }

    fn send(&mut self, c: Command) {
        if !self.engine.send(c) && !self.engine_gone {
            self.engine_gone = true;
            self.error("the generation thread has stopped; restart the studio");
        }
    }

    fn load_model(&mut self, model: String) {
        let model = model.trim().to_string();
        if model.is_empty() {
            self.error("enter a model: a diffusers folder or a hub id like owner/name");
            return;
        }
        self.model_input = model.clone();
        self.model.loading = Some(format!("loading {model}"));
        self.model.ready = false;
        let s = &self.state.settings;
        let spec = ModelSpec {
            model: model.clone(),
            device: s.device.clone(),
            dtype: s.dtype.clone(),
            taesd: (!s.taesd.trim().is_empty()).then(|| s.taesd.trim().to_string()),
            vae: (!s.vae.trim().is_empty()).then(|| s.vae.trim().to_string()),
            memory: s.memory.mode,
            cache_bytes: (s.cache_gib > 0.0).then_some((s.cache_gib * (1u64 << 30) as f64) as u64),
        };
        self.state.model = model.clone();
        self.state.remember_model(&model);
        self.send(Command::LoadModel(spec));
    }

    /// The running job, if any.
    pub fn running(&self) -> Option<&JobView> {
        self.jobs.iter().find(|j| j.running)
    }

    fn scheduler(&self) -> Result<SchedulerKind, String> {
        SchedulerKind::parse(&self.state.params.sampler).map_err(|e| e.to_string())
    }

    /// Builds a job from the editor for the given (seed, cell) pairs and queues it; with
    /// `models`, image i is drawn by `models[model_of[i]]` (compare mode).
    fn queue_job(
        &mut self,
        seeds: Vec<u64>,
        cells: Vec<usize>,
        models: Vec<String>,
        model_of: Vec<usize>,
        layout: Option<GridLayout>,
    ) {
        self.queue_job_as(seeds, cells, models, model_of, layout, false)
    }

    /// [`Self::queue_job`], as a live job when `live` (saved only with "save live images").
    fn queue_job_as(
        &mut self,
        seeds: Vec<u64>,
        cells: Vec<usize>,
        models: Vec<String>,
        model_of: Vec<usize>,
        layout: Option<GridLayout>,
        live: bool,
    ) {
        let scheduler = match self.scheduler() {
            Ok(s) => s,
            Err(e) => return self.error(e),
        };
        let hires = match super::hires::job_hires(
            &self.state.params.hires,
            (self.state.params.width, self.state.params.height),
        ) {
            Ok(h) => h,
            Err(e) => return self.error(format!("Hires. fix: {e}")),
        };
        let control = match self.control.input(
            &self.state.params.control,
            self.state.params.width,
            self.state.params.height,
        ) {
            Ok(c) => c,
            Err(e) => return self.error(e),
        };
        let p = &self.state.params;
        let s = &self.state.settings;
        let request_cells = cells.clone();
        let (lora_dirs, embedding_dirs) = s.adapter_dirs();
        let request = JobRequest {
            save: !live || s.live_save,
            control,
            hires,
            lora_dirs,
            embedding_dirs,
            id: self.next_job,
            prompt: p.prompt.clone(),
            negative_prompt: p.negative_prompt.clone(),
            seeds,
            cells,
            steps: p.steps,
            guidance: p.cfg,
            scheduler,
            width: p.width,
            height: p.height,
            preview: s.preview,
            preview_every: s.preview_every.max(1),
            output_dir: s.output_dir.clone(),
            models,
            model_of,
            clip_skip: p.clip_skip.max(1),
            attention_slicing: s.memory.attention,
            vae_tiling: s.memory.vae_tiling,
            init: self
                .init
                .as_ref()
                .map(|i| i.input(p.denoising_strength.clamp(0.0, 1.0))),
            // A1111: image i's variation seed is the variation seed + i (i: the cell's
            // column in compare mode, so every row shares them).
            variation: (p.variation_strength > 0.0).then(|| {
                let layout = layout.as_ref().unwrap_or(&self.layout);
                crate::protocol::JobVariation {
                    seeds: request_cells
                        .iter()
                        .map(|&c| {
                            let offset = if layout.is_compare() {
                                layout.row_col(c).1
                            } else {
                                c
                            };
                            p.variation_seed.wrapping_add(offset as u64)
                        })
                        .collect(),
                    strength: p.variation_strength.clamp(0.0, 1.0),
                }
            }),
        };
        if let Err(e) = crate::worker::check_job(&request) {
            return self.error(e);
        }
        self.next_job += 1;
        self.jobs.push(JobView {
            request: request.clone(),
            params: p.clone(),
            running: false,
            step: 0,
            total: 0,
            elapsed: Duration::ZERO,
            paths: Vec::new(),
            layout,
            live,
        });
        self.send(Command::Generate(request));
    }

    /// Queues the editor's grid (compare mode: a row per model) with its seed as it is.
    fn queue_grid(&mut self, live: bool) {
        let p = &self.state.params;
        if self.state.compare.enabled {
            match compare::plan(&self.state.compare, p.count, p.seed, p.seed_mode) {
                Ok(c) => {
                    self.queue_job_as(c.seeds, c.cells, c.models, c.model_of, Some(c.layout), live)
                }
                Err(e) => self.error(e),
            }
            return;
        }
        let n = p.count.clamp(1, GRID_CELLS);
        let seeds = (0..n as u64)
            .map(|i| match p.seed_mode {
                SeedMode::Increment => p.seed.wrapping_add(i),
                SeedMode::Same => p.seed,
            })
            .collect();
        let layout = Some(GridLayout::plain());
        self.queue_job_as(
            seeds,
            (0..n).collect(),
            Vec::new(),
            Vec::new(),
            layout,
            live,
        );
    }

    /// Live mode, once per frame: an edit starts the debounce; when typing pauses, the stale
    /// live jobs are cancelled (the running one at its next step, queued ones at once) and
    /// the grid is queued again with the seed as it is.
    fn live_tick(&mut self, ctx: &egui::Context) {
        if !self.state.settings.live {
            self.live.last = None;
            self.live.changed_at = None;
            self.live.warned = false;
            return;
        }
        let sig = live_signature(&self.state.params);
        let now = Instant::now();
        if self.live.last.as_deref() != Some(sig.as_str()) {
            self.live.last = Some(sig);
            self.live.changed_at = Some(now);
        }
        let Some(at) = self.live.changed_at else {
            return;
        };
        let waited = now.duration_since(at);
        if waited < LIVE_DEBOUNCE {
            ctx.request_repaint_after(LIVE_DEBOUNCE - waited);
            return;
        }
        self.live.changed_at = None;
        if self.model.name.is_empty() {
            return;
        }
        if !self.live.warned && self.state.params.steps > 8 {
            self.live.warned = true;
            self.warn(format!(
                "Live: {} steps per image; live mode is made for 1–4-step models (SD-Turbo, SDXL-Turbo, LCM, Lightning LoRAs). It still works: the newest edit wins.",
                self.state.params.steps
            ));
        }
        let stale: Vec<JobId> = self
            .jobs
            .iter()
            .filter(|j| j.live)
            .map(|j| j.request.id)
            .collect();
        for id in stale {
            self.send(Command::Cancel(id));
        }
        self.live.queued_at = Some(now);
        self.queue_grid(true);
    }

    /// Saves a cell's image into the output folder (a live image, or again) and records it
    /// in the history.
    fn keep(&mut self, i: usize) {
        let (Some(text), Some(c)) = (self.cell_parameters_text(i), self.cells.get(i)) else {
            return self.error(format!("cell {} has no finished image", i + 1));
        };
        let (Some(img), Some(seed)) = (c.image.clone(), c.seed) else {
            return self.error(format!("cell {} has no finished image", i + 1));
        };
        if let Some(p) = &c.path {
            return self.warn(format!("cell {} is saved already: {}", i + 1, p.display()));
        }
        let dir = self.state.settings.output_dir.clone();
        let path = crate::engine::metadata::output_path(&dir, &seed.to_string());
        let r = std::fs::create_dir_all(&dir)
            .map_err(|e| e.to_string())
            .and_then(|_| {
                encode_png(&img.rgb, img.width, img.height, &text)
                    .and_then(|png| write_atomic(&path, &png))
                    .map_err(|e| e.to_string())
            });
        if let Err(e) = r {
            return self.error(format!("keeping cell {}: {e}", i + 1));
        }
        let params = c
            .params
            .clone()
            .unwrap_or_else(|| self.state.params.clone());
        let model = c.model.clone().unwrap_or_else(|| self.model.name.clone());
        if let Some(c) = self.cells.get_mut(i) {
            c.path = Some(path.clone());
        }
        self.state.push_history(HistoryEntry {
            params,
            model,
            compare_models: Vec::new(),
            seeds: vec![seed],
            images: vec![path],
            time: now_secs(),
        });
        self.save_state();
    }

    /// Applies one user action.
    pub fn apply(&mut self, ctx: &egui::Context, c: UiCommand) {
        match c {
            UiCommand::Generate => {
                if !self.state.params.seed_locked {
                    self.state.params.seed = random_seed();
                }
                self.queue_grid(false);
                // A Generate is not an edit, and it covers any edit pending: live mode does
                // not queue it again.
                self.live.last = Some(live_signature(&self.state.params));
                self.live.changed_at = None;
            }
            UiCommand::Keep(i) => self.keep(i),
            UiCommand::VaryAround(i) => match self.cells.get(i).and_then(|c| c.seed) {
                Some(seed) => {
                    let p = &mut self.state.params;
                    p.seed = seed;
                    p.seed_locked = true;
                    p.seed_mode = SeedMode::Same;
                    // Cell 0's variation seed is its own seed: the chosen image, unchanged.
                    p.variation_seed = seed;
                    if p.variation_strength <= 0.0 {
                        p.variation_strength = 0.2;
                    }
                    self.viewer = None;
                    self.apply(ctx, UiCommand::Generate);
                }
                None => self.error("that cell has no image yet"),
            },
            UiCommand::RegenerateCell(i) => match self.cells.get(i).and_then(|c| c.seed) {
                Some(seed) => {
                    // In compare mode the cell's row keeps its model.
                    let (row, _) = self.layout.row_col(i);
                    match self.layout.models.get(row).cloned() {
                        Some(m) => self.queue_job(vec![seed], vec![i], vec![m], vec![0], None),
                        None => self.queue_job(vec![seed], vec![i], Vec::new(), Vec::new(), None),
                    }
                }
                None => self.error(format!("cell {} has no seed yet", i + 1)),
            },
            UiCommand::Stop => {
                if let Some(id) = self.running().map(|j| j.request.id) {
                    self.send(Command::Cancel(id));
                }
            }
            UiCommand::UseSeed(seed) => {
                self.state.params.seed = seed;
                self.state.params.seed_locked = true;
            }
            UiCommand::LoadModel(m) => self.load_model(m),
            UiCommand::BrowseModel => {
                if let Some(dir) = rfd::FileDialog::new()
                    .set_title("Choose a diffusers model folder")
                    .pick_folder()
                {
                    self.load_model(dir.display().to_string());
                }
            }
            UiCommand::BrowseModelFile => {
                if let Some(file) = pick_safetensors("Choose a checkpoint") {
                    self.load_model(file.display().to_string());
                }
            }
            UiCommand::SetVae(v) => self.set_vae(v),
            UiCommand::BrowseVae => {
                if let Some(file) = pick_safetensors("Choose a VAE") {
                    self.set_vae(Some(file.display().to_string()));
                }
            }
            UiCommand::ScanModels => {
                self.scan_models();
                self.scan_loras();
            }
            UiCommand::ScanLoras => {
                self.save_state();
                self.scan_loras();
            }
            UiCommand::InsertLora(name) => {
                let p = &mut self.state.params;
                let (text, cursor) = loras::insert_tag(&p.prompt, &name, self.prompt_cursor);
                p.prompt = text;
                // The new tag is under the cursor: its weight slider shows.
                self.prompt_cursor = Some(cursor);
            }
            UiCommand::SetLoraWeight { start, end, text } => {
                let p = &mut self.state.params;
                if start <= end
                    && end <= p.prompt.len()
                    && p.prompt.is_char_boundary(start)
                    && p.prompt.is_char_boundary(end)
                {
                    p.prompt.replace_range(start..end, &text);
                    self.prompt_cursor = Some(start + 1);
                }
            }
            UiCommand::BrowseModelsDir => {
                if let Some(dir) = rfd::FileDialog::new()
                    .set_title("Choose the folder with your checkpoints")
                    .pick_folder()
                {
                    self.state.settings.models_dir = dir;
                    self.scan_models();
                }
            }
            UiCommand::AddToCompare(m) => self.add_to_compare(m),
            UiCommand::BrowseCompareModel { row, folder } => {
                let picked = if folder {
                    rfd::FileDialog::new()
                        .set_title("Choose a diffusers model folder")
                        .pick_folder()
                } else {
                    pick_safetensors("Choose a checkpoint")
                };
                if let (Some(p), Some(slot)) = (picked, self.state.compare.models.get_mut(row)) {
                    *slot = p.display().to_string();
                }
            }
            UiCommand::PickInitImage => {
                if let Some(file) = pick_image("Choose the init image") {
                    self.set_init_from_file(ctx, &file);
                }
            }
            UiCommand::SetInitImage(path) => self.set_init_from_file(ctx, &path),
            UiCommand::SendToImg2img(i) => match self.cells.get(i).and_then(|c| c.image.clone()) {
                Some(img) => {
                    let name = match self.cells.get(i).and_then(|c| c.seed) {
                        Some(s) => format!("cell {} (seed {s})", i + 1),
                        None => format!("cell {}", i + 1),
                    };
                    self.init = Some(InitState::new(ctx, name, img));
                    self.img2img_open = true;
                }
                None => self.error(format!("cell {} has no finished image", i + 1)),
            },
            UiCommand::ClearInit => self.init = None,
            UiCommand::PickControlImage => {
                if let Some(f) = pick_image("Choose the ControlNet's picture") {
                    self.set_control_from_file(ctx, &f);
                }
            }
            UiCommand::SetControlImage(path) => self.set_control_from_file(ctx, &path),
            UiCommand::ClearControlImage => {
                self.control.clear_image();
                self.state.params.control.image = None;
            }
            UiCommand::BrowseControlNet => {
                if let Some(f) = pick_safetensors("Choose a ControlNet") {
                    self.state.params.control.model = f.display().to_string();
                }
            }
            UiCommand::ScanControlNets => {
                self.scan_controlnets();
                if self.control.found.is_empty() {
                    self.warn(if self.state.settings.models_dir.as_os_str().is_empty() {
                        "choose a models folder first: its ControlNet folder is listed".to_string()
                    } else {
                        format!(
                            "no ControlNets found near {} (looked for ControlNet/ and controlnet/)",
                            self.state.settings.models_dir.display()
                        )
                    });
                }
            }
            UiCommand::BrowseOutput => {
                if let Some(dir) = rfd::FileDialog::new()
                    .set_title("Choose where images are saved")
                    .pick_folder()
                {
                    self.state.settings.output_dir = dir;
                }
            }
            UiCommand::CancelJob(id) => self.send(Command::Cancel(id)),
            UiCommand::EditJob(id) => {
                if let Some(j) = self.jobs.iter().find(|j| j.request.id == id && !j.running) {
                    self.state.params = j.params.clone();
                    self.state.params.seed_locked = true;
                    self.send(Command::Cancel(id));
                }
            }
            UiCommand::View(i) => {
                self.viewer = i.map(|i| viewer::ViewerState::new(i, &self.layout));
            }
            UiCommand::SaveAs(i) => self.save_as(i),
            UiCommand::CopyParameters(i) => match self.cell_parameters_text(i) {
                Some(text) => ctx.copy_text(text),
                None => self.error(format!("cell {} has no finished image", i + 1)),
            },
            UiCommand::RestoreFromPng(path) => match read_png_parameters(&path) {
                Ok(Some(_)) => {
                    if let Err(e) = self.restore_from_png(&path) {
                        self.error(format!("{}: {e}", path.display()));
                    }
                }
                // Any other image becomes the init image (it has nothing to restore).
                _ => {
                    self.set_init_from_file(ctx, &path);
                    if self.init.is_some() {
                        self.warn(format!(
                            "{} has no generation parameters; it is now the img2img init \
                             image (Clear under Image input goes back to txt2img)",
                            path.display()
                        ));
                    }
                }
            },
            UiCommand::RestoreHistory(i) => {
                if let Some(h) = self.state.history.get(i) {
                    let seed = h.seeds.first().copied().unwrap_or(h.params.seed);
                    self.state.params = h.params.clone();
                    self.state.params.seed = seed;
                    if !h.compare_models.is_empty() {
                        self.state.compare.models = h.compare_models.clone();
                        self.state.compare.enabled = true;
                    }
                    self.state.params.seed_locked = true;
                }
            }
            UiCommand::SelectHistory(i) => self.history_view.toggle(i),
            UiCommand::RestoreHistoryFields { entry, fields } => {
                if let Some(h) = self.state.history.get(entry) {
                    let from = history::Side::of_entry(h);
                    let before = self.state.model.clone();
                    let mut model = before.clone();
                    history::restore_fields(&mut self.state.params, &mut model, &from, &fields);
                    if model != before && !model.is_empty() {
                        self.model_input = model.clone();
                        self.load_model(model);
                    }
                    self.history_view.chosen.clear();
                }
            }
            UiCommand::Dismiss(i) => {
                if i < self.messages.len() {
                    self.messages.remove(i);
                }
            }
        }
    }

    /// A finished cell's A1111 parameters text: what its saved PNG holds (with the LoRA,
    /// ControlNet and model hashes the engine wrote), else made from its job's parameters.
    pub fn cell_parameters_text(&self, i: usize) -> Option<String> {
        let c = self.cells.get(i)?;
        c.image.as_ref()?;
        if let Some(Ok(Some(text))) = c.path.as_deref().map(read_png_parameters) {
            return Some(text);
        }
        if let Some(t) = &c.parameters {
            return Some(t.clone());
        }
        self.cell_parameters(i).map(|p| p.to_a1111())
    }

    /// A finished cell's A1111 parameters, from its job's parameters.
    pub fn cell_parameters(&self, i: usize) -> Option<Parameters> {
        let c = self.cells.get(i)?;
        let p = c.params.as_ref()?;
        let seed = c.seed?;
        c.image.as_ref()?;
        let kind = SchedulerKind::parse(&p.sampler).ok()?;
        let (sampler, schedule) = kind.a1111_name();
        Some(Parameters {
            prompt: p.prompt.clone(),
            negative_prompt: p.negative_prompt.clone(),
            steps: p.steps,
            sampler: sampler.into(),
            schedule_type: schedule.map(str::to_string),
            cfg_scale: p.cfg,
            seed,
            width: p.width,
            height: p.height,
            model: c.model.clone().unwrap_or_else(|| self.model.name.clone()),
            variation: None,
            denoising_strength: c.denoise.or_else(|| {
                p.hires
                    .enabled
                    .then_some((p.hires.strength * 100.0).round() / 100.0)
            }),
            clip_skip: (p.clip_skip > 1).then_some(p.clip_skip),
            rng: None,
            hires: super::hires::job_hires(&p.hires, (p.width, p.height))
                .ok()
                .flatten()
                .map(|h| crate::engine::metadata::HiresParams {
                    scale: h.scale,
                    resize: (h.width, h.height),
                    steps: h.steps,
                    upscaler: crate::engine::pipeline::HiresUpscaler::parse(&h.upscaler)
                        .map(|u| u.a1111_name().to_string())
                        .unwrap_or(h.upscaler),
                }),
            ..Default::default()
        })
    }

    /// Sets the VAE (`None`: the model's own) and reloads the model with it.
    fn set_vae(&mut self, vae: Option<String>) {
        let vae = vae.map(|v| v.trim().to_string()).unwrap_or_default();
        self.state.settings.vae = vae;
        let model = self.state.model.clone();
        if model.trim().is_empty() {
            self.save_state();
        } else {
            self.load_model(model);
        }
    }

    fn scan_models(&mut self) {
        let dir = self.state.settings.models_dir.clone();
        if dir.as_os_str().is_empty() {
            return self.error(
                "choose a models folder to scan (e.g. stable-diffusion-webui/models/Stable-diffusion)",
            );
        }
        self.scan.scanning = true;
        self.save_state();
        self.send(Command::ScanModels(dir));
    }

    /// Puts a model in the first empty compare row (or a new one) and turns compare mode on.
    fn add_to_compare(&mut self, model: String) {
        let c = &mut self.state.compare;
        if c.models.iter().any(|m| m.trim() == model) {
            c.enabled = true;
            return;
        }
        if let Some(slot) = c.models.iter_mut().find(|m| m.trim().is_empty()) {
            *slot = model;
        } else if c.models.len() < compare::MAX_MODELS {
            c.models.push(model);
        } else {
            return self.error(format!(
                "compare mode takes at most {} models; remove one first",
                compare::MAX_MODELS
            ));
        }
        c.enabled = true;
    }

    fn set_init_from_file(&mut self, ctx: &egui::Context, path: &std::path::Path) {
        match img2img::load_image_file(path) {
            Ok(img) => {
                self.init = Some(InitState::new(ctx, file_label(path), img));
                self.img2img_open = true;
            }
            Err(e) => self.error(e),
        }
    }

    fn save_as(&mut self, i: usize) {
        let (Some(params), Some(img)) = (
            self.cell_parameters(i),
            self.cells.get(i).and_then(|c| c.image.clone()),
        ) else {
            return self.error(format!("cell {} has no finished image", i + 1));
        };
        let Some(path) = rfd::FileDialog::new()
            .set_file_name(format!("{}.png", params.seed))
            .add_filter("PNG", &["png"])
            .save_file()
        else {
            return;
        };
        let text = self
            .cell_parameters_text(i)
            .unwrap_or_else(|| params.to_a1111());
        let r = encode_png(&img.rgb, img.width, img.height, &text)
            .and_then(|png| write_atomic(&path, &png));
        if let Err(e) = r {
            self.error(e.to_string());
        }
    }

    /// Restores prompt, negative prompt, seed, sampler, steps, CFG and size from a PNG.
    pub fn restore_from_png(&mut self, path: &std::path::Path) -> Result<(), String> {
        let text = read_png_parameters(path)
            .map_err(|e| e.to_string())?
            .ok_or("this PNG has no generation parameters (no `parameters` text chunk)")?;
        let parsed = parse_a1111(&text).map_err(|e| e.to_string())?;
        let missing = self.loras.missing(&parsed.prompt);
        if !missing.is_empty() {
            self.warn(format!(
                "this image used LoRAs that are not in the LoRA folder: {} (the prompt keeps their tags; generating needs them)",
                missing.join(", ")
            ));
        }
        let p = &mut self.state.params;
        p.prompt = parsed.prompt.clone();
        p.negative_prompt = parsed.negative_prompt.clone();
        if let Some(s) = parsed.seed {
            p.seed = s;
            p.seed_locked = true;
        }
        if let Some(s) = parsed.steps {
            p.steps = s.clamp(1, 150);
        }
        if let Some(c) = parsed.cfg_scale {
            p.cfg = c;
        }
        if let (Some(w), Some(h)) = (parsed.width, parsed.height) {
            p.width = w;
            p.height = h;
        }
        let other = |key: &str| {
            parsed
                .other
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.trim().to_string())
        };
        // A1111 writes "Clip skip" only above 1.
        p.clip_skip = 1;
        if let Some(v) = other("Clip skip") {
            match v.parse::<usize>() {
                Ok(n) if (1..=12).contains(&n) => p.clip_skip = n,
                _ => self.warn(format!("Clip skip {v:?} is not 1–12; kept 1")),
            }
        }
        let p = &mut self.state.params;
        // A1111 writes the variation seed and strength only when one was used.
        p.variation_strength = 0.0;
        if let (Some(v), Some(s)) = (
            other("Variation seed").and_then(|v| v.parse::<u64>().ok()),
            other("Variation seed strength").and_then(|v| v.parse::<f64>().ok()),
        ) {
            if (0.0..=1.0).contains(&s) {
                p.variation_seed = v;
                p.variation_strength = s;
            }
        }
        let strength = other("Denoising strength")
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|v| (0.0..=1.0).contains(v));
        // With Hires. fix fields, "Denoising strength" is the second pass's.
        match parsed.hires() {
            None => {
                p.hires.enabled = false;
                if let Some(v) = strength {
                    p.denoising_strength = v;
                }
            }
            Some(h) => {
                p.hires.enabled = true;
                if let Some(v) = strength {
                    p.hires.strength = v;
                }
                p.hires.steps = h.steps.unwrap_or(0);
                p.hires.scale = match (h.scale, parsed.width) {
                    (Some(s), _) => s,
                    (None, Some(w)) if w > 0 => h.resize.0 as f64 / w as f64,
                    _ => p.hires.scale,
                }
                .clamp(1.0, 4.0);
                match crate::engine::pipeline::HiresUpscaler::parse(&h.upscaler) {
                    Ok(u) => p.hires.upscaler = u.cli_name().into(),
                    Err(_) => {
                        let kept = p.hires.upscaler.clone();
                        self.warn(format!(
                            "Hires upscaler {:?} is not available here (Latent, Latent (nearest), Lanczos); kept {kept}",
                            h.upscaler
                        ));
                    }
                }
            }
        }
        // A1111's ControlNet extension writes "ControlNet 0", "ControlNet 1", …; the picture
        // itself is not in the PNG.
        let units = parsed.controlnets();
        let mut notes = Vec::new();
        match units.first() {
            None => self.state.params.control.enabled = false,
            Some(u) => {
                if self.control.found.is_empty() {
                    self.scan_controlnets();
                }
                let c = &mut self.state.params.control;
                c.enabled = true;
                c.scale = u.weight;
                c.start = u.guidance_start;
                c.end = u.guidance_end;
                c.preprocess = match u.module.as_str() {
                    "none" | "canny" => u.module.clone(),
                    other => {
                        notes.push(format!(
                            "ControlNet preprocessor {other:?} is not available here (none, canny): set to none, give the map itself"
                        ));
                        "none".into()
                    }
                };
                let name = u.model_name();
                match self
                    .control
                    .found
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case(name))
                {
                    Some((_, path)) => c.model = path.display().to_string(),
                    None => notes.push(format!(
                        "this image used ControlNet {name}, which is not in the models folder's ControlNet folder"
                    )),
                }
                if !self.control.has_image() {
                    notes.push(
                        "a PNG does not hold the ControlNet's picture: drop it on the ControlNet panel"
                            .into(),
                    );
                }
                if units.len() > 1 {
                    notes.push(format!(
                        "this image used {} ControlNets; the studio runs one (the first), the CLI runs several",
                        units.len()
                    ));
                }
                self.control.open = true;
            }
        }
        for n in notes {
            self.warn(n);
        }
        let p = &mut self.state.params;
        match parsed.scheduler() {
            Some(k) => p.sampler = k.cli_name().into(),
            None => {
                if let Some(s) = &parsed.sampler {
                    let full = match &parsed.schedule_type {
                        Some(t) => format!("{s} ({t})"),
                        None => s.clone(),
                    };
                    self.warn(format!(
                        "sampler {full} is not available here; kept {}",
                        self.state.params.sampler
                    ));
                }
            }
        }
        Ok(())
    }

    fn set_texture(ctx: &egui::Context, cell: &mut Cell, name: String, img: &RgbImage) {
        if img.rgb.len() != img.width * img.height * 3 {
            return;
        }
        let color = egui::ColorImage::from_rgb([img.width, img.height], &img.rgb);
        match &mut cell.texture {
            Some(t) => t.set(color, egui::TextureOptions::LINEAR),
            None => {
                cell.texture = Some(ctx.load_texture(name, color, egui::TextureOptions::LINEAR))
            }
        }
    }

    /// Applies one engine event to the window's state.
    pub fn handle_event(&mut self, ctx: &egui::Context, e: Event) {
        match e {
            Event::ModelLoading { message, progress } => {
                self.model.loading = Some(message);
                self.model.progress = progress;
            }
            Event::ModelReady {
                name,
                device,
                dtype,
                previewer,
                memory,
                tokens,
            } => {
                self.model = ModelStatus {
                    name,
                    device,
                    dtype,
                    previewer,
                    memory,
                    loading: None,
                    progress: None,
                    ready: true,
                };
                self.tokens = tokens;
                self.save_state();
                // Whether each LoRA fits depends on the model.
                self.scan_loras();
                if let Some(plan) = &mut self.screenshots {
                    plan.model_ready = true;
                }
                if self.options.auto_generate {
                    self.options.auto_generate = false;
                    self.apply(ctx, UiCommand::Generate);
                }
            }
            Event::LorasFound { loras } => self.loras.found(loras),
            Event::ModelFailed { message } => {
                self.model.loading = None;
                self.model.progress = None;
                self.model.ready = false;
                self.error(format!("could not load the model: {message}"));
            }
            Event::Queued { .. } => {}
            Event::Started { job } => {
                if let Some(j) = self.jobs.iter_mut().find(|j| j.request.id == job) {
                    j.running = true;
                    let r = &j.request;
                    let params = j.params.clone();
                    let denoise = r.init.as_ref().map(|i| i.strength);
                    if let Some(l) = &j.layout {
                        if *l != self.layout {
                            self.viewer = None;
                        }
                        self.layout = l.clone();
                    }
                    let labels = crate::protocol::distinct_labels(&r.models, compare::model_label);
                    for (k, (&seed, &cell)) in r.seeds.iter().zip(&r.cells).enumerate() {
                        let model = r.model_of.get(k).and_then(|&m| labels.get(m)).cloned();
                        if let Some(c) = self.cells.get_mut(cell) {
                            *c = Cell {
                                job: Some(job),
                                seed: Some(seed),
                                status: CellStatus::Waiting,
                                texture: c.texture.take(),
                                image: None,
                                path: None,
                                params: Some(params.clone()),
                                model,
                                denoise,
                                parameters: None,
                            };
                        }
                    }
                }
            }
            Event::Step {
                job,
                step,
                total,
                elapsed,
                cells,
                cell_step,
                cell_total,
            } => {
                // Compare mode loads its models inside the job: once steps run, they are in.
                if self.model.ready {
                    self.model.loading = None;
                    self.model.progress = None;
                }
                let now = Instant::now();
                if let Some(j) = self.jobs.iter_mut().find(|j| j.request.id == job) {
                    if step > j.step && j.step > 0 {
                        let per = elapsed.saturating_sub(j.elapsed) / (step - j.step) as u32;
                        self.timings.step.push(per);
                    }
                    j.step = step;
                    j.total = total;
                    j.elapsed = elapsed;
                }
                self.timings.step_arrived = Some((step, now, elapsed));
                // Each cell shows its own lane's progress (a compare row has fewer steps
                // than the whole job).
                let (own_step, own_total) = if cells.is_empty() {
                    (step, total)
                } else {
                    (cell_step, cell_total)
                };
                for (i, c) in self.cells.iter_mut().enumerate() {
                    if c.job != Some(job) || !(cells.is_empty() || cells.contains(&i)) {
                        continue;
                    }
                    if matches!(c.status, CellStatus::Waiting | CellStatus::Running { .. }) {
                        c.status = if own_step >= own_total.max(1) {
                            CellStatus::Decoding
                        } else {
                            CellStatus::Running {
                                step: own_step,
                                total: own_total,
                            }
                        };
                    }
                }
            }
            Event::Preview {
                job,
                cell,
                step,
                image,
                decode_time,
            } => {
                if let Some((s, at, _)) = self.timings.step_arrived {
                    if s == step {
                        self.timings.preview_lag.push(at.elapsed());
                        self.timings.preview_decode.push(decode_time);
                        self.timings.step_arrived = None;
                    }
                }
                if let Some(c) = self.cells.get_mut(cell) {
                    // A late preview never replaces a final image.
                    if c.job == Some(job) && !matches!(c.status, CellStatus::Done) {
                        Self::set_texture(ctx, c, format!("cell{cell}"), &image);
                    }
                }
            }
            Event::CellDone {
                job,
                cell,
                seed,
                model,
                image,
                path,
                parameters,
            } => {
                if let Some(c) = self.cells.get_mut(cell) {
                    c.parameters = Some(parameters);
                    Self::set_texture(ctx, c, format!("cell{cell}"), &image);
                    c.job = Some(job);
                    c.seed = Some(seed);
                    if !model.is_empty() {
                        c.model = Some(model);
                    }
                    c.status = CellStatus::Done;
                    c.image = Some(image);
                    c.path = path.clone();
                }
                if let (Some(j), Some(p)) =
                    (self.jobs.iter_mut().find(|j| j.request.id == job), path)
                {
                    j.paths.push(p);
                }
                if let Some(plan) = &mut self.screenshots {
                    plan.cells_done += 1;
                }
            }
            Event::JobDone { job, .. } => {
                if let Some(pos) = self.jobs.iter().position(|j| j.request.id == job) {
                    let j = self.jobs.remove(pos);
                    if !j.request.save {
                        // Live images not saved: only kept cells enter the history.
                        if let Some(plan) = &mut self.screenshots {
                            plan.jobs_done += 1;
                        }
                        return;
                    }
                    let model = if j.request.models.is_empty() {
                        self.model.name.clone()
                    } else {
                        let names = crate::protocol::distinct_labels(
                            &j.request.models,
                            compare::model_label,
                        );
                        format!("compare: {}", names.join(", "))
                    };
                    self.state.push_history(HistoryEntry {
                        params: j.params,
                        model,
                        compare_models: j.request.models,
                        seeds: j.request.seeds,
                        images: j.paths,
                        time: now_secs(),
                    });
                    self.save_state();
                }
                if let Some(plan) = &mut self.screenshots {
                    plan.jobs_done += 1;
                }
            }
            Event::Failed { job, message } => {
                self.finish_job(job, CellStatus::Failed);
                self.error(message);
            }
            Event::Cancelled { job } => self.finish_job(Some(job), CellStatus::Cancelled),
            Event::Warning { message } => self.warn(message),
            Event::ModelsFound { dir, models, error } => {
                if let Some(e) = &error {
                    self.error(format!("cannot scan {}: {e}", dir.display()));
                }
                self.scan = ScanState {
                    scanning: false,
                    dir: Some(dir),
                    models,
                    error,
                };
            }
        }
    }

    fn finish_job(&mut self, job: Option<JobId>, status: CellStatus) {
        let Some(job) = job else { return };
        self.jobs.retain(|j| j.request.id != job);
        for c in self.cells.iter_mut().filter(|c| c.job == Some(job)) {
            if c.status != CellStatus::Done {
                c.status = status;
            }
        }
    }

    pub fn save_state(&mut self) {
        if let Some(p) = &self.state_file {
            if let Err(e) = self.state.save(p) {
                self.warn(format!("settings not saved: {e}"));
            }
        }
    }

    /// Keyboard shortcuts: Ctrl+Enter generates, Esc closes the large view or stops.
    fn shortcuts(&mut self, ctx: &egui::Context) -> Vec<UiCommand> {
        let mut out = Vec::new();
        ctx.input_mut(|i| {
            if i.consume_key(Modifiers::COMMAND, Key::Enter) {
                out.push(UiCommand::Generate);
            }
            if i.consume_key(Modifiers::NONE, Key::Escape) {
                out.push(if self.viewer.is_some() {
                    UiCommand::View(None)
                } else {
                    UiCommand::Stop
                });
            }
            // A file dropped on Image input becomes the init image; elsewhere a PNG's
            // parameters are restored.
            let on_init = match (self.init_drop_rect, i.pointer.latest_pos()) {
                (Some(r), Some(p)) => r.contains(p),
                _ => false,
            };
            let on_control = match (self.control_drop_rect, i.pointer.latest_pos()) {
                (Some(r), Some(p)) => r.contains(p),
                _ => false,
            };
            for f in &i.raw.dropped_files {
                let path = f.path().to_path_buf();
                out.push(if on_init {
                    UiCommand::SetInitImage(path)
                } else if on_control {
                    UiCommand::SetControlImage(path)
                } else {
                    UiCommand::RestoreFromPng(path)
                });
            }
        });
        out
    }

    /// One frame: events, panels, commands.
    pub fn frame(&mut self, ui: &mut egui::Ui) {
        let t0 = Instant::now();
        let ctx = ui.ctx().clone();
        for e in self.engine.drain() {
            self.handle_event(&ctx, e);
        }
        let mut cmds = self.shortcuts(&ctx);
        if let Some(path) = self.pending_control_image.take() {
            if path.is_file() {
                self.set_control_from_file(&ctx, &path);
                // Opened at start only when it is on (then it steers every cell: show it).
                self.control.open = self.state.params.control.enabled;
            } else {
                self.warn(format!(
                    "the ControlNet picture {} is gone; pick it again",
                    path.display()
                ));
                self.state.params.control.image = None;
            }
        }

        egui::Panel::top("model").show(ui, |ui| {
            cmds.extend(model_picker::model_picker_ui(
                ui,
                &mut self.model_input,
                &mut self.vae_input,
                &mut self.state,
                &self.model,
                &self.scan,
            ));
        });
        egui::Panel::bottom("status").show(ui, |ui| {
            status_bar::status_bar_ui(ui, &self.model, self.running(), self.jobs.len());
        });
        egui::Panel::left("controls")
            .default_size(360.0)
            .resizable(true)
            .show(ui, |ui| {
                egui::ScrollArea::vertical().show(ui, |ui| {
                    cmds.extend(prompt::prompt_ui(
                        ui,
                        &mut self.state.params,
                        self.tokens.as_ref(),
                        &mut self.prompt_cursor,
                        (
                            &mut self.state.settings.live,
                            &mut self.state.settings.live_save,
                        ),
                    ));
                    ui.separator();
                    cmds.extend(loras::loras_ui(
                        ui,
                        &mut self.loras,
                        &mut self.state.settings,
                        &self.state.params.prompt,
                        self.prompt_cursor,
                    ));
                    ui.separator();
                    cmds.extend(seed::seed_ui(ui, &mut self.state.params));
                    ui.separator();
                    sampling::sampling_ui(ui, &mut self.state.params);
                    ui.separator();
                    super::hires::hires_ui(
                        ui,
                        &mut self.state.params.hires,
                        (self.state.params.width, self.state.params.height),
                    );
                    ui.separator();
                    let hovering = ui.input(|i| !i.raw.hovered_files.is_empty());
                    cmds.extend(img2img::img2img_ui(
                        ui,
                        &mut self.init,
                        &mut self.state.params,
                        &mut self.state.settings,
                        &mut self.img2img_open,
                        hovering,
                        &mut self.init_drop_rect,
                    ));
                    ui.separator();
                    cmds.extend(control::control_ui(
                        ui,
                        &mut self.control,
                        &mut self.state.params.control,
                        (self.state.params.width, self.state.params.height),
                        hovering,
                        &mut self.control_drop_rect,
                    ));
                    ui.separator();
                    cmds.extend(compare::compare_ui(
                        ui,
                        &mut self.state.compare,
                        self.state.params.count,
                    ));
                    ui.separator();
                    cmds.extend(models_folder::models_folder_ui(
                        ui,
                        &mut self.state.settings,
                        &self.scan,
                    ));
                    ui.separator();
                    cmds.extend(sampling::preview_settings_ui(ui, &mut self.state.settings));
                    ui.separator();
                    cmds.extend(queue::queue_ui(ui, &self.jobs));
                    ui.separator();
                    let editor = history::Side {
                        params: self.state.params.clone(),
                        model: self.state.model.clone(),
                        seed: self.state.params.seed,
                    };
                    cmds.extend(history::history_ui(
                        ui,
                        &self.state.history,
                        &mut self.history_view,
                        &editor,
                    ));
                });
            });
        egui::CentralPanel::default_margins().show(ui, |ui| {
            cmds.extend(errors::messages_ui(ui, &self.messages));
            cmds.extend(grid::grid_ui(ui, &self.cells, &self.layout));
        });
        if let Some(v) = &mut self.viewer {
            cmds.extend(viewer::viewer_ui(&ctx, v, &self.cells, &self.layout));
        }
        for c in cmds {
            self.apply(&ctx, c);
        }
        self.live_tick(&ctx);
        if let Some(plan) = &mut self.screenshots {
            for c in plan.tick(&ctx, &self.cells) {
                self.apply(&ctx, c);
            }
        }
        if self.running().is_some() {
            let now = Instant::now();
            if let Some(last) = self.timings.last_frame {
                self.timings.frame_interval.push(now - last);
            }
            self.timings.last_frame = Some(now);
            self.timings.frame_cpu.push(t0.elapsed());
        } else {
            self.timings.last_frame = None;
        }
    }
}

impl eframe::App for StudioApp {
    fn ui(&mut self, ui: &mut egui::Ui, frame: &mut eframe::Frame) {
        if self.running().is_some() {
            if let Some(cpu) = frame.info().cpu_usage {
                self.timings
                    .frame_eframe
                    .push(Duration::from_secs_f32(cpu.max(0.0)));
            }
        }
        self.frame(ui);
    }

    fn on_exit(&mut self, _gl: Option<&eframe::glow::Context>) {
        let _ = self.engine.send(Command::Shutdown);
        self.save_state();
        if self.screenshots.is_some() {
            super::screenshot::print_timings(&self.timings);
        }
    }
}
