//! Hires. fix panel (A1111's): upscaler, "Upscale by", "Hires steps" (0 = the job's),
//! "Denoising strength" of the second pass, and the final size it gives.

use super::state::HiresSettings;
use crate::engine::pipeline::{Hires, HiresUpscaler};
use crate::protocol::JobHires;

/// The final size for a base size, or why there is none.
pub fn target(h: &HiresSettings, base: (usize, usize)) -> Result<(usize, usize), String> {
    let scale = (h.scale * 100.0).round() / 100.0;
    Hires::target(base, Some(scale), None, None, 8).map_err(|e| e.to_string())
}

/// What a job of `base` size gets (None when off).
pub fn job_hires(h: &HiresSettings, base: (usize, usize)) -> Result<Option<JobHires>, String> {
    if !h.enabled {
        return Ok(None);
    }
    HiresUpscaler::parse(&h.upscaler).map_err(|e| e.to_string())?;
    let (width, height) = target(h, base)?;
    Ok(Some(JobHires {
        width,
        height,
        steps: (h.steps > 0).then_some(h.steps),
        // The slider's value to A1111's two decimals (0.7, not 0.7000000000000001).
        strength: (h.strength.clamp(0.0, 1.0) * 100.0).round() / 100.0,
        upscaler: h.upscaler.clone(),
        scale: Some((h.scale * 100.0).round() / 100.0),
    }))
}

pub fn hires_ui(ui: &mut egui::Ui, h: &mut HiresSettings, base: (usize, usize)) {
    let title = if h.enabled {
        "Hires. fix (on)"
    } else {
        "Hires. fix"
    };
    egui::CollapsingHeader::new(title)
        .id_salt("hires")
        .default_open(h.enabled)
        .show(ui, |ui| {
            ui.checkbox(&mut h.enabled, "Upscale and denoise again")
                .on_hover_text(
                    "A1111's Hires. fix: generate at the size above, upscale, then an img2img pass",
                );
            let current = HiresUpscaler::parse(&h.upscaler)
                .map(|u| u.a1111_name())
                .unwrap_or("?");
            ui.horizontal(|ui| {
                let label = ui.label("Upscaler");
                egui::ComboBox::from_id_salt("hires upscaler")
                    .selected_text(current)
                    .show_ui(ui, |ui| {
                        for u in HiresUpscaler::ALL {
                            ui.selectable_value(
                                &mut h.upscaler,
                                u.cli_name().to_string(),
                                u.a1111_name(),
                            );
                        }
                    })
                    .response
                    .labelled_by(label.id);
            });
            ui.horizontal(|ui| {
                let label = ui.label("Upscale by");
                ui.add(egui::Slider::new(&mut h.scale, 1.0..=4.0).fixed_decimals(2))
                    .labelled_by(label.id);
            });
            ui.horizontal(|ui| {
                let label = ui.label("Hires steps");
                ui.add(egui::Slider::new(&mut h.steps, 0..=150))
                    .labelled_by(label.id)
                    .on_hover_text("0: as many as the first pass");
            });
            ui.horizontal(|ui| {
                let label = ui.label("Denoising strength");
                ui.add(egui::Slider::new(&mut h.strength, 0.0..=1.0).fixed_decimals(2))
                    .labelled_by(label.id);
            });
            match target(h, base) {
                Ok((w, hh)) => ui.weak(format!("{}×{} upscaled to {w}×{hh}", base.0, base.1)),
                Err(e) => ui.colored_label(ui.visuals().warn_fg_color, e),
            };
        });
}
