//! Screenshot mode (`sd-studio studio --screenshot-dir DIR --auto-generate`): saves the real
//! window mid-generation, finished, and with the large view open, then closes it and prints
//! frame and preview timings as one JSON line.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::app::{Cell, CellStatus, Timings};
use super::commands::UiCommand;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    WaitMid,
    WaitDone,
    OpenViewer,
    WaitViewer,
    Closing,
}

pub struct ScreenshotPlan {
    dir: PathBuf,
    stage: Stage,
    frames: usize,
    saved: Arc<AtomicUsize>,
    requested: usize,
    started: Instant,
    pub model_ready: bool,
    pub cells_done: usize,
    pub jobs_done: usize,
}

impl ScreenshotPlan {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            stage: Stage::WaitMid,
            frames: 0,
            saved: Arc::new(AtomicUsize::new(0)),
            requested: 0,
            started: Instant::now(),
            model_ready: false,
            cells_done: 0,
            jobs_done: 0,
        }
    }

    fn shoot(&mut self, ctx: &egui::Context, name: &str) {
        let path = self.dir.join(name);
        let saved = self.saved.clone();
        let ctx2 = ctx.clone();
        self.requested += 1;
        ctx.request_screenshot(move |img| {
            let [w, h] = img.size;
            let bytes: Vec<u8> = img.pixels.iter().flat_map(|c| c.to_array()).collect();
            let r = image::RgbaImage::from_raw(w as u32, h as u32, bytes)
                .ok_or_else(|| "bad screenshot size".to_string())
                .and_then(|buf| {
                    let mut png = std::io::Cursor::new(Vec::new());
                    buf.write_to(&mut png, image::ImageFormat::Png)
                        .map_err(|e| e.to_string())?;
                    std::fs::create_dir_all(path.parent().unwrap_or(std::path::Path::new(".")))
                        .map_err(|e| e.to_string())?;
                    crate::engine::metadata::write_atomic(&path, png.get_ref())
                        .map_err(|e| e.to_string())
                });
            match r {
                Ok(()) => eprintln!("screenshot: {}", path.display()),
                Err(e) => eprintln!("screenshot {} failed: {e}", path.display()),
            }
            saved.fetch_add(1, Ordering::SeqCst);
            ctx2.request_repaint();
        });
    }

    /// Advances the plan once per frame; may return commands (open the large view).
    pub fn tick(&mut self, ctx: &egui::Context, cells: &[Cell]) -> Vec<UiCommand> {
        ctx.request_repaint_after(Duration::from_millis(50));
        let mut out = Vec::new();
        self.frames += 1;
        if self.started.elapsed() > Duration::from_secs(600) {
            eprintln!("screenshot mode: timed out");
            ctx.send_viewport_cmd(egui::ViewportCommand::Close);
            return out;
        }
        if self.frames % 100 == 1 {
            eprintln!(
                "screenshot mode: {:?}, frame {}, model ready {}, cells done {}, jobs done {}",
                self.stage, self.frames, self.model_ready, self.cells_done, self.jobs_done
            );
        }
        match self.stage {
            Stage::WaitMid => {
                let mid = cells.iter().any(|c| match c.status {
                    CellStatus::Running { step, total } => {
                        c.texture.is_some() && step * 2 >= total && step < total
                    }
                    _ => false,
                });
                if mid {
                    self.shoot(ctx, "studio-generating.png");
                    self.stage = Stage::WaitDone;
                } else if self.jobs_done > 0 {
                    self.stage = Stage::WaitDone;
                }
            }
            Stage::WaitDone => {
                if self.jobs_done > 0 {
                    self.frames = 0;
                    self.stage = Stage::OpenViewer;
                }
            }
            Stage::OpenViewer => {
                if self.frames == 3 {
                    self.shoot(ctx, "studio-finished.png");
                    out.push(UiCommand::View(Some(0)));
                    self.frames = 0;
                    self.stage = Stage::WaitViewer;
                }
            }
            Stage::WaitViewer => {
                if self.frames == 3 {
                    self.shoot(ctx, "studio-large-view.png");
                    self.stage = Stage::Closing;
                }
            }
            Stage::Closing => {
                if self.saved.load(Ordering::SeqCst) >= self.requested {
                    ctx.send_viewport_cmd(egui::ViewportCommand::Close);
                }
            }
        }
        out
    }
}

fn pct(v: &[Duration], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut ms: Vec<f64> = v.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(|a, b| a.total_cmp(b));
    let i = ((ms.len() - 1) as f64 * p).round() as usize;
    ms[i]
}

/// Prints the timings gathered while jobs ran, as one JSON line on stdout.
pub fn print_timings(t: &Timings) {
    let line = serde_json::json!({
        "frames": t.frame_cpu.len(),
        "frame_cpu_ms_p50": pct(&t.frame_cpu, 0.5),
        "frame_cpu_ms_p99": pct(&t.frame_cpu, 0.99),
        "frame_eframe_cpu_ms_p50": pct(&t.frame_eframe, 0.5),
        "frame_eframe_cpu_ms_p99": pct(&t.frame_eframe, 0.99),
        "frame_interval_ms_p50": pct(&t.frame_interval, 0.5),
        "frame_interval_ms_p99": pct(&t.frame_interval, 0.99),
        "step_ms_p50": pct(&t.step, 0.5),
        "preview_decode_ms_p50": pct(&t.preview_decode, 0.5),
        "preview_decode_ms_p99": pct(&t.preview_decode, 0.99),
        "preview_lag_ms_p50": pct(&t.preview_lag, 0.5),
        "preview_lag_ms_p99": pct(&t.preview_lag, 0.99),
    });
    println!("{line}");
}
