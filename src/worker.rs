//! The generation thread: owns the loaded model, runs queued jobs one after another, saves
//! every finished image, and reports through [`crate::protocol`]. Between denoising steps it
//! reads new commands, so a Stop takes effect within one step and new jobs queue while one
//! runs. A panic inside a job becomes a `Failed` event and the thread starts over (the model
//! is reloaded), so the window never loses its engine.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::engine::apply::Networks;
use crate::engine::cache::{CachedModel, LoadOptions, ModelCache};
use crate::engine::image_ops::{cover_crop, cover_crop_mask};
use crate::engine::memory::MemoryOptions;
use crate::engine::metadata::{encode_png, output_path, write_atomic, Parameters};
use crate::engine::pipeline::{GenerateRequest, InitImage, Run, Variation};
use crate::engine::rng::RngKind;
use crate::engine::taesd::{self, Previewer, TaesdDecoder};
use crate::engine::{self as eng, Error};
use crate::protocol::{
    Command, Event, FoundLora, InitInput, JobId, JobRequest, ModelSpec, PreviewMode, RgbImage,
    TokenCounter, WorkerLink, GRID_CELLS,
};

/// The thread's state between commands.
pub struct Worker {
    link: WorkerLink,
    /// Recently used models (compare mode loads several).
    cache: ModelCache,
    /// The model jobs without their own `models` use.
    model: Option<Arc<CachedModel>>,
    /// TAESD for the current device and dtype.
    taesd: Option<TaesdDecoder>,
    spec: Option<ModelSpec>,
    queue: VecDeque<JobRequest>,
    pending_load: Option<ModelSpec>,
    running: Option<JobId>,
    cancel_running: bool,
    shutdown: bool,
    /// Output folders already rid of a killed run's temporary files.
    cleaned: std::collections::HashSet<PathBuf>,
    faults: Faults,
}

/// One batched run inside a job: a model, its seeds' cells, and the run between steps.
struct Lane {
    model: Arc<CachedModel>,
    /// The model's name in this job (told apart from the other compared models').
    label: String,
    cells: Vec<usize>,
    run: Run,
}

/// Starts the generation thread (supervised: a panic restarts it). Ends on
/// [`Command::Shutdown`] or when the window's end of the channel is dropped.
pub fn spawn(link: WorkerLink) -> std::io::Result<std::thread::JoinHandle<()>> {
    spawn_with(link, Faults::default())
}

/// Faults to inject, for the tests of the supervisor (never set by the studio or the CLI).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    /// Panic inside this job, after its first denoising step.
    pub panic_in_job: Option<JobId>,
    /// Treat at most this many bytes as free (a small machine, for the memory guard).
    pub free_memory: Option<u64>,
}

/// [`spawn`] with injected faults (tests only).
#[doc(hidden)]
pub fn spawn_with(
    link: WorkerLink,
    faults: Faults,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("sd-worker".into())
        .spawn(move || {
            let mut w = Worker::new(link);
            w.faults = faults;
            supervise(
                &mut w,
                |w| w.run(),
                |w, msg| {
                    let job = w.running.take();
                    w.model = None;
                    w.cache.clear();
                    w.cancel_running = false;
                    w.pending_load = w.spec.clone();
                    w.link.send(Event::Failed {
                        job,
                        message: format!("the engine crashed ({msg}); it was restarted"),
                    });
                },
            )
        })
}

/// Runs `body` until it returns; if it panics, calls `on_panic` with the panic message and
/// runs it again (at most 20 times in a row, so a crash loop ends).
pub fn supervise<S>(state: &mut S, body: impl Fn(&mut S), on_panic: impl Fn(&mut S, String)) {
    for _ in 0..20 {
        match catch_unwind(AssertUnwindSafe(|| body(state))) {
            Ok(()) => return,
            Err(p) => {
                let msg = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                on_panic(state, msg);
            }
        }
    }
}

fn rgb(width: usize, height: usize, rgb: Vec<u8>) -> RgbImage {
    RgbImage { width, height, rgb }
}

/// Splits a job's seeds into runs of consecutive seeds: each run is one batched call
/// (image i of a batch uses seed + i). Returns (start index, length) pairs.
pub fn seed_runs(seeds: &[u64]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, &s) in seeds.iter().enumerate() {
        match runs.last_mut() {
            Some((start, len)) if seeds[*start].wrapping_add(*len as u64) == s => *len += 1,
            _ => runs.push((i, 1)),
        }
    }
    runs
}

/// Checks a job before it runs: every problem as one sentence.
pub fn check_job(job: &JobRequest) -> Result<(), String> {
    if job.seeds.is_empty() || job.seeds.len() > GRID_CELLS {
        return Err(format!(
            "a job needs 1 to {GRID_CELLS} images, not {}",
            job.seeds.len()
        ));
    }
    if job.cells.len() != job.seeds.len() || job.cells.iter().any(|&c| c >= GRID_CELLS) {
        return Err("each image needs a grid cell 0–7".into());
    }
    if let Some(v) = &job.variation {
        if v.seeds.len() != job.seeds.len() {
            return Err("each image needs one variation seed".into());
        }
        if !(0.0..=1.0).contains(&v.strength) {
            return Err(format!("variation strength {} is outside 0..1", v.strength));
        }
    }
    if !job.models.is_empty() {
        if job.model_of.len() != job.seeds.len()
            || job.model_of.iter().any(|&m| m >= job.models.len())
        {
            return Err("compare mode: each image needs one of the job's models".into());
        }
        if job.models.iter().any(|m| m.trim().is_empty()) {
            return Err("compare mode: a model field is empty".into());
        }
    }
    if let Some(init) = &job.init {
        if !(0.0..=1.0).contains(&init.strength) {
            return Err(format!(
                "denoising strength must be 0–1, not {}",
                init.strength
            ));
        }
        let i = &init.image;
        if i.width == 0 || i.height == 0 || i.rgb.len() != i.width * i.height * 3 {
            return Err("the init image is empty or damaged".into());
        }
        if let Some(m) = &init.mask {
            if m.width == 0 || m.height == 0 || m.data.len() != m.width * m.height {
                return Err("the mask is empty or damaged".into());
            }
        }
    }
    if job.steps == 0 || job.steps > 1000 {
        return Err(format!("steps must be 1–1000, not {}", job.steps));
    }
    if !job.guidance.is_finite() || job.guidance < 0.0 {
        return Err(format!("CFG scale must be ≥ 0, not {}", job.guidance));
    }
    for (what, v) in [("width", job.width), ("height", job.height)] {
        if v == 0 || v % 8 != 0 || v > 4096 {
            return Err(format!(
                "{what} must be a multiple of 8 up to 4096, not {v}"
            ));
        }
    }
    Ok(())
}

impl Worker {
    pub fn new(link: WorkerLink) -> Self {
        Self {
            link,
            cache: ModelCache::new(ModelCache::default_budget("cpu")),
            model: None,
            taesd: None,
            spec: None,
            queue: VecDeque::new(),
            pending_load: None,
            running: None,
            cancel_running: false,
            shutdown: false,
            cleaned: Default::default(),
            faults: Faults::default(),
        }
    }

    /// The main loop: load when asked, run queued jobs, else wait for a command.
    pub fn run(&mut self) {
        loop {
            if self.shutdown {
                return;
            }
            if let Some(spec) = self.pending_load.take() {
                self.load(spec);
                continue;
            }
            if self.model.is_some() {
                if let Some(job) = self.queue.pop_front() {
                    self.run_job(job);
                    continue;
                }
            }
            match self.link.commands.recv() {
                Ok(c) => self.handle(c),
                Err(_) => return, // the window is gone
            }
        }
    }

    fn handle(&mut self, c: Command) {
        match c {
            Command::Generate(job) => {
                if let Err(message) = check_job(&job) {
                    self.link.send(Event::Failed {
                        job: Some(job.id),
                        message,
                    });
                    return;
                }
                let ahead = self.queue.len() + usize::from(self.running.is_some());
                let id = job.id;
                self.queue.push_back(job);
                self.link.send(Event::Queued { job: id, ahead });
                if self.model.is_none() && self.pending_load.is_none() && self.spec.is_none() {
                    self.link.send(Event::Warning {
                        message: "no model loaded: pick one to start the queue".into(),
                    });
                }
            }
            Command::Cancel(id) => {
                if self.running == Some(id) {
                    self.cancel_running = true;
                } else if let Some(pos) = self.queue.iter().position(|j| j.id == id) {
                    self.queue.remove(pos);
                    self.link.send(Event::Cancelled { job: id });
                }
            }
            Command::LoadModel(spec) => self.pending_load = Some(spec),
            Command::ScanModels(dir) => {
                let (models, error) = match crate::engine::scan::scan(&dir) {
                    Ok(m) => (m, None),
                    Err(e) => (Vec::new(), Some(e.to_string())),
                };
                self.link.send(Event::ModelsFound { dir, models, error });
            }
            Command::ScanLoras(dirs) => {
                let family = self.model.as_ref().map(|m| m.sd.files.family);
                self.link.send(Event::LorasFound {
                    loras: scan_loras(&dirs, family),
                });
            }
            Command::Shutdown => {
                self.shutdown = true;
                self.cancel_running = true;
            }
        }
    }

    fn load_options(spec: &ModelSpec, model: &str) -> LoadOptions {
        LoadOptions {
            vae: spec.vae.clone().filter(|v| !v.trim().is_empty()),
            memory: spec.memory,
            ..LoadOptions::new(model, &spec.device, &spec.dtype)
        }
    }

    /// A model from the cache (loading it if needed), reporting progress.
    fn get_model(&mut self, opts: &LoadOptions) -> eng::Result<Arc<CachedModel>> {
        let link = &self.link;
        let name = opts.model.clone();
        let mut last = (String::new(), -1.0f32);
        self.cache.get(opts, &mut |msg, progress| {
            // Hashing reports every MB: pass on whole percents only.
            let p = progress.unwrap_or(-1.0);
            if msg != last.0 || (p - last.1).abs() >= 0.01 {
                last = (msg.to_string(), p);
                link.send(Event::ModelLoading {
                    message: format!("{name}: {msg}"),
                    progress,
                });
            }
        })
    }

    fn load(&mut self, spec: ModelSpec) {
        if self.spec.as_ref().is_some_and(|s| {
            s.device != spec.device || s.dtype != spec.dtype || s.memory != spec.memory
        }) {
            // Another device, precision or memory mode: nothing cached is reusable (and a
            // mode chosen to save memory must not sit beside the old copies); free it first.
            self.cache.clear();
            self.taesd = None;
        }
        self.model = None;
        self.spec = Some(spec.clone());
        self.cache.set_budget(match spec.cache_bytes {
            Some(b) if b > 0 => b,
            _ => ModelCache::default_budget(&spec.device),
        });
        self.link.send(Event::ModelLoading {
            message: format!("loading {}", spec.model),
            progress: None,
        });
        let m = match self.get_model(&Self::load_options(&spec, &spec.model)) {
            Ok(m) => m,
            Err(e) => {
                self.spec = None;
                self.link.send(Event::ModelFailed {
                    message: e.to_string(),
                });
                return;
            }
        };
        let family = m.sd.files.family;
        // A TAESD for another latent space (SD beside SDXL) is replaced by this model's.
        if self
            .taesd
            .as_ref()
            .is_some_and(|t| !taesd::same_latents(t.family, family))
        {
            self.taesd = None;
        }
        match (&spec.taesd, &self.taesd) {
            (Some(t), None) => {
                let t = taesd::repo_for(t, family);
                self.link.send(Event::ModelLoading {
                    message: format!("loading TAESD previews ({t})"),
                    progress: None,
                });
                let dec = taesd::resolve(t)
                    .and_then(|dir| TaesdDecoder::load(&dir, m.sd.dtype, &m.sd.device));
                match dec {
                    Ok(mut d) => {
                        d.family = family;
                        self.taesd = Some(d)
                    }
                    Err(e) => self.link.send(Event::Warning {
                        message: format!(
                            "TAESD unavailable ({e}); previews use the linear approximation"
                        ),
                    }),
                }
            }
            (None, Some(_)) => self.taesd = None,
            _ => {}
        }
        let tokens =
            m.sd.files
                .load_tokenizer()
                .ok()
                .map(|t| TokenCounter(Arc::new(t)));
        self.link.send(Event::ModelReady {
            name: m.label.clone(),
            device: eng::device_name(&m.sd.device).into(),
            dtype: format!("{:?}", m.sd.dtype).to_lowercase(),
            previewer: if self.taesd.is_some() {
                "TAESD"
            } else {
                "linear"
            }
            .into(),
            memory: m.placement.clone(),
            tokens,
        });
        self.model = Some(m);
    }

    fn run_job(&mut self, job: JobRequest) {
        let Some(current) = self.model.clone() else {
            self.queue.push_front(job);
            return;
        };
        self.running = Some(job.id);
        self.cancel_running = false;
        if self.cleaned.insert(job.output_dir.clone()) {
            crate::engine::metadata::clean_stale_temps(&job.output_dir);
        }
        self.link.send(Event::Started { job: job.id });
        let start = Instant::now();
        let previewer = match (job.preview, self.taesd.take()) {
            (PreviewMode::Off, t) => (None, t),
            (PreviewMode::Linear, t) => (Some(Previewer::Linear), t),
            (PreviewMode::Taesd, Some(t)) => (Some(Previewer::Taesd(t)), None),
            (PreviewMode::Taesd, None) => (Some(Previewer::Linear), None),
        };
        let (previewer, kept) = previewer;
        let result = self.run_lanes(current, &job, start, previewer.as_ref());
        self.taesd = match previewer {
            Some(Previewer::Taesd(t)) => Some(t),
            _ => kept,
        };
        self.running = None;
        match result {
            Ok(()) => self.link.send(Event::JobDone {
                job: job.id,
                elapsed: start.elapsed(),
            }),
            Err(Error::Cancelled) => self.link.send(Event::Cancelled { job: job.id }),
            Err(e) => self.link.send(Event::Failed {
                job: Some(job.id),
                message: e.to_string(),
            }),
        }
        self.cancel_running = false;
    }

    /// Commands that arrived meanwhile (Stop, new jobs, ...); `Err(Cancelled)` on Stop.
    fn poll(&mut self) -> eng::Result<()> {
        while let Ok(c) = self.link.commands.try_recv() {
            self.handle(c);
        }
        if self.cancel_running {
            Err(Error::Cancelled)
        } else {
            Ok(())
        }
    }

    /// Runs a job as lanes (one per model and run of consecutive seeds), stepping them in
    /// turn so every cell's preview advances together; each lane is decoded and saved as
    /// soon as its last step is done.
    fn run_lanes(
        &mut self,
        current: Arc<CachedModel>,
        job: &JobRequest,
        start: Instant,
        previewer: Option<&Previewer>,
    ) -> eng::Result<()> {
        let init = prepare_init(job)?;
        let controls = prepare_control(job)?;
        let hires = job
            .hires
            .as_ref()
            .map(|h| {
                Ok::<_, Error>(crate::engine::pipeline::Hires {
                    width: h.width,
                    height: h.height,
                    steps: h.steps,
                    strength: h.strength,
                    upscaler: crate::engine::pipeline::HiresUpscaler::parse(&h.upscaler)?,
                    scale: h.scale,
                })
            })
            .transpose()?;
        // Which model draws each image.
        let mut models: Vec<Arc<CachedModel>> = Vec::new();
        if job.models.is_empty() {
            models.push(current);
        } else {
            let spec = self.spec.clone().ok_or_else(|| {
                Error::invalid("model", "load a model first (compare mode uses its device)")
            })?;
            for m in &job.models {
                let cached = self.get_model(&Self::load_options(&spec, m))?;
                models.push(cached);
                self.poll()?;
            }
        }
        let model_of = |i: usize| {
            if job.models.is_empty() {
                0
            } else {
                job.model_of[i]
            }
        };
        for m in &models {
            m.sd.set_memory_options(MemoryOptions {
                attention: job.attention_slicing,
                vae_tiling: job.vae_tiling,
                ..m.sd.memory_options()
            });
            m.sd.set_free_memory_limit(self.faults.free_memory);
        }
        let labels: Vec<String> = if job.models.is_empty() {
            models.iter().map(|m| m.label.clone()).collect()
        } else {
            crate::protocol::distinct_labels(&job.models, eng::cache::model_label)
        };
        // Compare mode shares one size: say when it is far from a row's native size (SD 1.5
        // beside SDXL: 512² is small for SDXL, 1024² large for SD 1.5).
        if models.len() > 1 {
            for (m, label) in models.iter().zip(&labels) {
                let f = &m.sd.files;
                let native = f.unet_config.sample_size * f.vae_config.scale_factor();
                let area = (job.width * job.height) as f64 / (native * native) as f64;
                if !(0.5..=2.0).contains(&area) {
                    self.link.send(Event::Warning {
                        message: format!(
                            "compare: {label} ({}) is made for {native}x{native}; every row runs at {}x{}",
                            f.family.name(),
                            job.width,
                            job.height
                        ),
                    });
                }
            }
        }
        let mut lanes: Vec<Lane> = Vec::new();
        let mut warned: Vec<String> = Vec::new();
        for (mi, model) in models.iter().enumerate() {
            let idx: Vec<usize> = (0..job.seeds.len())
                .filter(|&i| model_of(i) == mi)
                .collect();
            let seeds: Vec<u64> = idx.iter().map(|&i| job.seeds[i]).collect();
            // With variation seeds every image is its own run (its two seeds need not
            // follow its neighbours').
            let runs = match &job.variation {
                Some(_) => (0..seeds.len()).map(|i| (i, 1)).collect(),
                None => seed_runs(&seeds),
            };
            for (first, len) in runs {
                let req = GenerateRequest {
                    prompt: job.prompt.clone(),
                    negative_prompt: job.negative_prompt.clone(),
                    seed: seeds[first],
                    batch: len,
                    steps: job.steps,
                    guidance: job.guidance,
                    scheduler: job.scheduler,
                    width: job.width,
                    height: job.height,
                    // A1111's default "GPU" noise, so seeds match images made there.
                    rng: RngKind::TorchCuda,
                    clip_skip: job.clip_skip.max(1),
                    init_image: init.clone(),
                    variation: job.variation.as_ref().map(|v| Variation {
                        seed: v.seeds[idx[first]],
                        strength: v.strength,
                    }),
                    networks: Networks {
                        loras: Vec::new(),
                        lora_dirs: job.lora_dirs.clone(),
                        embedding_dirs: job.embedding_dirs.clone(),
                    },
                    controls: controls.clone(),
                    hires,
                    ..Default::default()
                };
                let run = model.sd.begin(&req)?;
                for w in &run.adapters.warnings {
                    if !warned.contains(w) {
                        warned.push(w.clone());
                        self.link.send(Event::Warning { message: w.clone() });
                    }
                }
                lanes.push(Lane {
                    model: model.clone(),
                    label: labels[mi].clone(),
                    cells: idx[first..first + len]
                        .iter()
                        .map(|&i| job.cells[i])
                        .collect(),
                    run,
                });
                self.poll()?;
            }
        }
        let total: usize = lanes.iter().map(|l| l.run.total()).sum();
        let every = job.preview_every.max(1);
        let mut preview_warned = false;
        let mut done = 0;
        while lanes.iter().any(|l| !l.run.is_done()) {
            for lane in lanes.iter_mut().filter(|l| !l.run.is_done()) {
                let out = lane.model.sd.step(&mut lane.run)?;
                done += 1;
                if self.faults.panic_in_job == Some(job.id) {
                    panic!("injected fault in job {}", job.id);
                }
                self.poll()?;
                self.link.send(Event::Step {
                    job: job.id,
                    step: done,
                    total,
                    elapsed: start.elapsed(),
                    cells: lane.cells.clone(),
                    cell_step: out.step,
                    cell_total: out.total,
                });
                let due = out.step % every == 0 && out.step < out.total;
                if let (Some(p), Some(x0), true) = (previewer, &out.pred_original, due) {
                    let t0 = Instant::now();
                    match p.previews_for(x0, lane.model.sd.files.family) {
                        Ok(imgs) => {
                            let decode_time = t0.elapsed();
                            for (img, &cell) in imgs.into_iter().zip(&lane.cells) {
                                self.link.send(Event::Preview {
                                    job: job.id,
                                    cell,
                                    step: done,
                                    image: rgb(img.width, img.height, img.rgb),
                                    decode_time,
                                });
                            }
                        }
                        Err(e) if !preview_warned => {
                            preview_warned = true;
                            self.link.send(Event::Warning {
                                message: format!("previews failed: {e}"),
                            });
                        }
                        Err(_) => {}
                    }
                }
                // Stop asked while this step ran: stop now rather than after the next one.
                self.poll()?;
            }
            // Lanes that just finished: decode and save now.
            let mut i = 0;
            while i < lanes.len() {
                if lanes[i].run.is_done() {
                    let lane = lanes.remove(i);
                    self.finish_lane(job, lane)?;
                } else {
                    i += 1;
                }
            }
        }
        for lane in lanes {
            self.finish_lane(job, lane)?; // zero-step runs (strength 0)
        }
        Ok(())
    }

    fn finish_lane(&mut self, job: &JobRequest, lane: Lane) -> eng::Result<()> {
        let Lane {
            model,
            label,
            cells,
            run,
        } = lane;
        let req = run.request().clone();
        let (images, _) = model.sd.finish(run)?;
        for (img, &cell) in images.into_iter().zip(&cells) {
            self.link.previews.clear(cell);
            let params = model.parameters(&req, &img);
            // Compare mode: several models draw each seed, so the file name says which.
            let seeds = match img.variation_seed {
                Some(v) => format!("{}-{v}", img.seed),
                None => img.seed.to_string(),
            };
            let stem = if job.models.is_empty() {
                seeds
            } else {
                format!("{}-{seeds}", file_safe(&label))
            };
            // A write that fails (read-only folder, disk full) fails the job: the cell still
            // shows its image, the images saved before it stay, the next job runs.
            let saved = if job.save {
                save(
                    &job.output_dir,
                    &stem,
                    &params,
                    &img.rgb,
                    (img.width, img.height),
                )
                .map(Some)
            } else {
                Ok(None)
            };
            self.link.send(Event::CellDone {
                job: job.id,
                cell,
                seed: img.seed,
                model: label.clone(),
                image: rgb(img.width, img.height, img.rgb),
                path: saved.as_ref().ok().cloned().flatten(),
                parameters: params.to_a1111(),
            });
            saved?;
        }
        Ok(())
    }
}

/// The studio's init image and mask, fitted to the job's size (A1111's crop and resize).
fn prepare_init(job: &JobRequest) -> eng::Result<Option<InitImage>> {
    let Some(InitInput {
        image,
        strength,
        mask,
    }) = &job.init
    else {
        return Ok(None);
    };
    let damaged = || Error::invalid("init image", "its pixels do not match its size");
    let rgb = image::RgbImage::from_raw(image.width as u32, image.height as u32, image.rgb.clone())
        .ok_or_else(damaged)?;
    let mask = match mask {
        None => None,
        Some(m) => {
            let g = image::GrayImage::from_raw(m.width as u32, m.height as u32, m.data.clone())
                .ok_or_else(|| Error::invalid("mask", "its pixels do not match its size"))?;
            // A mask painted at another size than its picture: bring it to the picture's
            // size first, so both get the same fit.
            let g = if (m.width, m.height) != (image.width, image.height) {
                image::imageops::resize(
                    &g,
                    image.width as u32,
                    image.height as u32,
                    image::imageops::FilterType::Nearest,
                )
            } else {
                g
            };
            Some(cover_crop_mask(g, job.width, job.height))
        }
    };
    Ok(Some(InitImage {
        rgb: cover_crop(rgb, job.width, job.height),
        strength: *strength,
        mask,
    }))
}

/// The job's ControlNet with its map at the job's size.
fn prepare_control(job: &JobRequest) -> eng::Result<Vec<crate::engine::control::ControlUse>> {
    let Some(c) = &job.control else {
        return Ok(Vec::new());
    };
    let image =
        crate::engine::control::fit(&c.map.rgb, c.map.width, c.map.height, job.width, job.height)?;
    Ok(vec![crate::engine::control::ControlUse {
        model: c.model.clone(),
        image,
        module: c.module.clone(),
        scale: c.scale,
        start: c.start,
        end: c.end,
    }])
}

/// A model label as part of a file name.
pub fn file_safe(label: &str) -> String {
    label
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Writes one `width`×`height` image with its A1111 parameters into `dir` (atomically) as
/// `{stem}.png` (with Hires. fix the parameters' "Size" is the first pass's, not the image's).
pub fn save(
    dir: &Path,
    stem: &str,
    params: &Parameters,
    rgb: &[u8],
    (width, height): (usize, usize),
) -> eng::Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| Error::Write {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    })?;
    let png = encode_png(rgb, width, height, &params.to_a1111())?;
    let path = output_path(dir, stem);
    write_atomic(&path, &png)?;
    Ok(path)
}

/// Waits up to `timeout` for an event matching `pred` (helper for tests and tools).
pub fn wait_for(
    events: &crossbeam_channel::Receiver<Event>,
    timeout: Duration,
    mut pred: impl FnMut(&Event) -> bool,
) -> Option<Event> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        match events.recv_timeout(left) {
            Ok(e) if pred(&e) => return Some(e),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
}

/// The LoRAs in `dirs` (subfolders searched), each described from its header and checked
/// against `family` (the loaded model's).
pub fn scan_loras(
    dirs: &[PathBuf],
    family: Option<crate::engine::family::Family>,
) -> Vec<FoundLora> {
    use crate::engine::lora;
    let files: Vec<PathBuf> = crate::engine::adapters::files_under(dirs)
        .into_iter()
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
        })
        .collect();
    let mut out: Vec<FoundLora> = Vec::new();
    for path in files {
        let name = lora::stem(&path);
        if out.iter().any(|l| l.name == name) {
            continue; // the first folder wins, as tags resolve
        }
        let preview = path.with_file_name(format!("{name}.preview.png"));
        let (family_name, parts, fits, error) = match lora::describe(&path) {
            Ok(i) => (
                i.family.map(|f| f.name().to_string()).unwrap_or_default(),
                match (i.unet, i.text) {
                    (true, true) => "UNet + text encoder",
                    (true, false) => "UNet",
                    _ => "text encoder",
                }
                .to_string(),
                family.and_then(|f| i.fits(f)),
                None,
            ),
            Err(e) => (
                String::new(),
                String::new(),
                Some(false),
                Some(e.to_string()),
            ),
        };
        out.push(FoundLora {
            name,
            path,
            family: family_name,
            parts,
            fits,
            preview: preview.is_file().then_some(preview),
            error,
        });
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_seeds_share_a_batch() {
        assert_eq!(seed_runs(&[5, 6, 7, 8]), vec![(0, 4)]);
        assert_eq!(seed_runs(&[5, 5, 5]), vec![(0, 1), (1, 1), (2, 1)]);
        assert_eq!(seed_runs(&[1, 2, 9, 10, 3]), vec![(0, 2), (2, 2), (4, 1)]);
        assert!(seed_runs(&[]).is_empty());
    }

    #[test]
    fn supervisor_restarts_after_a_panic_and_reports_it() {
        let mut state = (0usize, Vec::<String>::new());
        supervise(
            &mut state,
            |s| {
                s.0 += 1;
                if s.0 < 3 {
                    panic!("boom {}", s.0);
                }
            },
            |s, msg| s.1.push(msg),
        );
        assert_eq!(state.0, 3);
        assert_eq!(state.1, vec!["boom 1".to_string(), "boom 2".to_string()]);
    }
}
