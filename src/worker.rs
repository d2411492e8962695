//! The generation thread: owns the loaded model, runs queued jobs one after another, saves
//! every finished image, and reports through [`crate::protocol`]. Between denoising steps it
//! reads new commands, so a Stop takes effect within one step and new jobs queue while one
//! runs. A panic inside a job becomes a `Failed` event and the thread starts over (the model
//! is reloaded), so the window never loses its engine.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::engine::metadata::{encode_png, output_path, write_atomic, Parameters};
use crate::engine::model::{self, ModelFiles};
use crate::engine::pipeline::{GenerateRequest, StableDiffusion};
use crate::engine::rng::RngKind;
use crate::engine::taesd::{self, Previewer, TaesdDecoder};
use crate::engine::{self as eng, Error};
use crate::protocol::{
    Command, Event, JobId, JobRequest, ModelSpec, PreviewMode, RgbImage, TokenCounter, WorkerLink,
    GRID_CELLS,
};

/// A loaded model and its preview decoders.
struct Loaded {
    sd: StableDiffusion,
    taesd: Option<TaesdDecoder>,
    label: String,
}

/// The thread's state between commands.
pub struct Worker {
    link: WorkerLink,
    model: Option<Loaded>,
    spec: Option<ModelSpec>,
    queue: VecDeque<JobRequest>,
    pending_load: Option<ModelSpec>,
    running: Option<JobId>,
    cancel_running: bool,
    shutdown: bool,
}

/// Starts the generation thread (supervised: a panic restarts it). Ends on
/// [`Command::Shutdown`] or when the window's end of the channel is dropped.
pub fn spawn(link: WorkerLink) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("sd-worker".into())
        .spawn(move || {
            let mut w = Worker::new(link);
            supervise(
                &mut w,
                |w| w.run(),
                |w, msg| {
                    let job = w.running.take();
                    w.model = None;
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

fn model_label(spec: &str) -> String {
    let p = Path::new(spec);
    if p.exists() {
        p.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or(spec)
            .to_string()
    } else {
        spec.to_string()
    }
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
            model: None,
            spec: None,
            queue: VecDeque::new(),
            pending_load: None,
            running: None,
            cancel_running: false,
            shutdown: false,
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
            Command::Shutdown => {
                self.shutdown = true;
                self.cancel_running = true;
            }
        }
    }

    fn load(&mut self, spec: ModelSpec) {
        self.model = None; // free the old weights first
        self.spec = Some(spec.clone());
        self.link.send(Event::ModelLoading {
            message: format!("loading {}", spec.model),
            progress: None,
        });
        let loaded = (|| -> eng::Result<Loaded> {
            let dtype = eng::dtype(&spec.dtype)?;
            let device = eng::device(&spec.device)?;
            let fp16 = dtype != candle_core::DType::F32;
            let root = model::resolve(&spec.model, fp16)?;
            let files = ModelFiles::from_dir(&root, fp16)?;
            let sd = StableDiffusion::load(files, device.clone(), dtype)?;
            Ok(Loaded {
                sd,
                taesd: None,
                label: model_label(&spec.model),
            })
        })();
        let mut loaded = match loaded {
            Ok(l) => l,
            Err(e) => {
                self.spec = None;
                self.link.send(Event::ModelFailed {
                    message: e.to_string(),
                });
                return;
            }
        };
        if let Some(t) = &spec.taesd {
            self.link.send(Event::ModelLoading {
                message: format!("loading TAESD previews ({t})"),
                progress: None,
            });
            let dec = taesd::resolve(t)
                .and_then(|dir| TaesdDecoder::load(&dir, loaded.sd.dtype, &loaded.sd.device));
            match dec {
                Ok(d) => loaded.taesd = Some(d),
                Err(e) => self.link.send(Event::Warning {
                    message: format!(
                        "TAESD unavailable ({e}); previews use the linear approximation"
                    ),
                }),
            }
        }
        let tokens = loaded
            .sd
            .files
            .load_tokenizer()
            .ok()
            .map(|t| TokenCounter(std::sync::Arc::new(t)));
        self.link.send(Event::ModelReady {
            name: loaded.label.clone(),
            device: if loaded.sd.device.is_cuda() {
                "cuda".into()
            } else if loaded.sd.device.is_metal() {
                "metal".into()
            } else {
                "cpu".into()
            },
            dtype: format!("{:?}", loaded.sd.dtype).to_lowercase(),
            previewer: if loaded.taesd.is_some() {
                "TAESD"
            } else {
                "linear"
            }
            .into(),
            tokens,
        });
        self.model = Some(loaded);
    }

    fn run_job(&mut self, job: JobRequest) {
        let Some(mut m) = self.model.take() else {
            self.queue.push_front(job);
            return;
        };
        self.running = Some(job.id);
        self.cancel_running = false;
        self.link.send(Event::Started { job: job.id });
        let start = Instant::now();
        let result = self.run_runs(&mut m, &job, start);
        self.model = Some(m);
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

    fn run_runs(&mut self, m: &mut Loaded, job: &JobRequest, start: Instant) -> eng::Result<()> {
        let runs = seed_runs(&job.seeds);
        // UNet calls per run: the sampler's timesteps (PNDM adds one, Heun/DPM2 double).
        let per_run = job
            .scheduler
            .build(&m.sd.files.scheduler_config, job.steps)
            .map(|s| s.timesteps().len())
            .unwrap_or(job.steps);
        let total = runs.len() * per_run;
        let previewer = match (job.preview, m.taesd.take()) {
            (PreviewMode::Off, t) => (None, t),
            (PreviewMode::Linear, t) => (Some(Previewer::Linear), t),
            (PreviewMode::Taesd, Some(t)) => (Some(Previewer::Taesd(t)), None),
            (PreviewMode::Taesd, None) => (Some(Previewer::Linear), None),
        };
        let (previewer, kept) = previewer;
        let result = self.run_with(m, job, start, &runs, (per_run, total), previewer.as_ref());
        m.taesd = match previewer {
            Some(Previewer::Taesd(t)) => Some(t),
            _ => kept,
        };
        result
    }

    fn run_with(
        &mut self,
        m: &mut Loaded,
        job: &JobRequest,
        start: Instant,
        runs: &[(usize, usize)],
        (per_run, total): (usize, usize),
        previewer: Option<&Previewer>,
    ) -> eng::Result<()> {
        let (sampler, schedule_type) = job.scheduler.a1111_name();
        let every = job.preview_every.max(1);
        let mut preview_warned = false;
        for (r, &(first, len)) in runs.iter().enumerate() {
            let cells = &job.cells[first..first + len];
            let req = GenerateRequest {
                prompt: job.prompt.clone(),
                negative_prompt: job.negative_prompt.clone(),
                seed: job.seeds[first],
                batch: len,
                steps: job.steps,
                guidance: job.guidance,
                scheduler: job.scheduler,
                width: job.width,
                height: job.height,
                // A1111's default "GPU" noise, so seeds match images made there.
                rng: RngKind::TorchCuda,
                ..Default::default()
            };
            let offset = r * per_run;
            let images = m.sd.generate(&req, &mut |info| {
                // Commands that arrived during the step: Stop, new jobs, ...
                while let Ok(c) = self.link.commands.try_recv() {
                    self.handle(c);
                }
                if self.cancel_running {
                    return Err(Error::Cancelled);
                }
                let step = offset + info.step;
                self.link.send(Event::Step {
                    job: job.id,
                    step,
                    total,
                    elapsed: start.elapsed(),
                });
                let due = info.step % every == 0 && info.step < info.total;
                if let (Some(p), Some(x0), true) = (previewer, info.pred_original, due) {
                    let t0 = Instant::now();
                    match p.previews(x0) {
                        Ok(imgs) => {
                            let decode_time = t0.elapsed();
                            for (img, &cell) in imgs.into_iter().zip(cells) {
                                self.link.send(Event::Preview {
                                    job: job.id,
                                    cell,
                                    step,
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
                if self.cancel_running {
                    return Err(Error::Cancelled);
                }
                Ok(())
            })?;
            for (img, &cell) in images.into_iter().zip(cells) {
                self.link.previews.clear(cell);
                let params = Parameters {
                    prompt: job.prompt.clone(),
                    negative_prompt: job.negative_prompt.clone(),
                    steps: job.steps,
                    sampler: sampler.into(),
                    schedule_type: schedule_type.map(str::to_string),
                    cfg_scale: job.guidance,
                    seed: img.seed,
                    width: img.width,
                    height: img.height,
                    model: m.label.clone(),
                    variation: None,
                    denoising_strength: None,
                    clip_skip: None,
                    rng: RngKind::TorchCuda.a1111_name().map(str::to_string),
                };
                let path = match save(&job.output_dir, &params, &img.rgb) {
                    Ok(p) => Some(p),
                    Err(e) => {
                        self.link.send(Event::Warning {
                            message: format!("image not saved: {e}"),
                        });
                        None
                    }
                };
                self.link.send(Event::CellDone {
                    job: job.id,
                    cell,
                    seed: img.seed,
                    model: m.label.clone(),
                    image: rgb(img.width, img.height, img.rgb),
                    path,
                });
            }
        }
        Ok(())
    }
}

/// Writes one image with its A1111 parameters into `dir` (atomically), named by its seed.
pub fn save(dir: &Path, params: &Parameters, rgb: &[u8]) -> eng::Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| Error::Write {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    })?;
    let png = encode_png(rgb, params.width, params.height, &params.to_a1111())?;
    let path = output_path(dir, &params.seed.to_string());
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
