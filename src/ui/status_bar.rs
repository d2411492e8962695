//! Model, device, dtype, loading progress, step i/N, it/s and ETA.

use super::app::{JobView, ModelStatus};

/// The status line's text.
pub fn status_text(model: &ModelStatus, running: Option<&JobView>, jobs: usize) -> String {
    let mut parts = Vec::new();
    if let Some(l) = &model.loading {
        parts.push(l.clone());
    } else if model.ready {
        let memory = if model.memory.is_empty() || model.memory == "full" {
            String::new()
        } else {
            format!(" · memory: {}", model.memory)
        };
        parts.push(format!(
            "{} · {} · {}{memory} · previews: {}",
            model.name, model.device, model.dtype, model.previewer
        ));
    } else {
        parts.push("no model loaded".into());
    }
    if let Some(j) = running {
        let secs = j.elapsed.as_secs_f64();
        if j.total > 0 && j.step > 0 && secs > 0.0 {
            let its = j.step as f64 / secs;
            let eta = (j.total - j.step.min(j.total)) as f64 / its;
            parts.push(format!(
                "step {}/{} · {its:.2} it/s · ETA {eta:.1} s",
                j.step, j.total
            ));
        } else {
            parts.push("starting…".into());
        }
    }
    let waiting = jobs.saturating_sub(usize::from(running.is_some()));
    if waiting > 0 {
        parts.push(format!("{waiting} queued"));
    }
    parts.join("   |   ")
}

pub fn status_bar_ui(
    ui: &mut egui::Ui,
    model: &ModelStatus,
    running: Option<&JobView>,
    jobs: usize,
) {
    ui.horizontal(|ui| {
        if let (Some(p), Some(_)) = (model.progress, &model.loading) {
            ui.add(
                egui::ProgressBar::new(p.clamp(0.0, 1.0))
                    .desired_width(140.0)
                    .text(format!("{:.0}%", p.clamp(0.0, 1.0) * 100.0)),
            );
        }
        ui.label(status_text(model, running, jobs));
    });
}
