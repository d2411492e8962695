//! Sampler, steps, CFG, clip skip, size, image count, and preview/output settings.

use super::commands::UiCommand;
use super::state::{Params, Settings};
use crate::engine::schedulers::SchedulerKind;
use crate::protocol::PreviewMode;

/// Common SD sizes (multiples of 64).
pub const SIZE_PRESETS: [usize; 9] = [256, 384, 512, 576, 640, 768, 832, 896, 1024];

/// A1111's label for a sampler: "DPM++ 2M Karras".
pub fn sampler_label(k: SchedulerKind) -> String {
    match k.a1111_name() {
        (n, Some(s)) => format!("{n} {s}"),
        (n, None) => n.to_string(),
    }
}

fn size_ui(ui: &mut egui::Ui, name: &str, v: &mut usize) {
    ui.horizontal(|ui| {
        let label = ui.label(name);
        ui.add(egui::DragValue::new(v).range(64..=2048).speed(8.0))
            .labelled_by(label.id);
        *v = (*v / 8).max(8) * 8;
        egui::ComboBox::from_id_salt(format!("{name} presets"))
            .selected_text("presets")
            .width(70.0)
            .show_ui(ui, |ui| {
                for s in SIZE_PRESETS {
                    ui.selectable_value(v, s, s.to_string());
                }
            })
            .response
            .widget_info(|| {
                egui::WidgetInfo::labeled(egui::Role::ComboBox, true, format!("{name} presets"))
            });
    });
}

/// Sampler dropdown, steps, CFG, width/height, image count.
pub fn sampling_ui(ui: &mut egui::Ui, p: &mut Params) {
    let current = SchedulerKind::parse(&p.sampler)
        .map(sampler_label)
        .unwrap_or_else(|_| p.sampler.clone());
    ui.horizontal(|ui| {
        let label = ui.label("Sampler");
        egui::ComboBox::from_id_salt("sampler")
            .selected_text(current)
            .show_ui(ui, |ui| {
                for k in SchedulerKind::ALL {
                    ui.selectable_value(&mut p.sampler, k.cli_name().to_string(), sampler_label(k))
                        .on_hover_text(k.description());
                }
            })
            .response
            .labelled_by(label.id);
    });
    ui.horizontal(|ui| {
        let label = ui.label("Steps");
        ui.add(egui::Slider::new(&mut p.steps, 1..=150))
            .labelled_by(label.id);
    });
    ui.horizontal(|ui| {
        let label = ui.label("CFG");
        ui.add(egui::Slider::new(&mut p.cfg, 0.0..=30.0).step_by(0.5))
            .labelled_by(label.id);
    });
    ui.horizontal(|ui| {
        let label = ui.label("Clip skip");
        ui.add(egui::Slider::new(&mut p.clip_skip, 1..=12))
            .labelled_by(label.id)
            .on_hover_text(
                "1 = the last CLIP layer; 2 = the penultimate (common for anime models)",
            );
    });
    size_ui(ui, "Width", &mut p.width);
    size_ui(ui, "Height", &mut p.height);
    ui.horizontal(|ui| {
        let label = ui.label("Images");
        ui.add(egui::Slider::new(&mut p.count, 1..=8))
            .labelled_by(label.id);
    });
}

/// Preview mode and frequency, output folder.
pub fn preview_settings_ui(ui: &mut egui::Ui, s: &mut Settings) -> Vec<UiCommand> {
    let mut out = Vec::new();
    ui.horizontal(|ui| {
        ui.label("Previews");
        ui.radio_value(&mut s.preview, PreviewMode::Taesd, "TAESD")
            .on_hover_text(
                "Tiny decoder; the linear approximation when no TAESD weights are found",
            );
        ui.radio_value(&mut s.preview, PreviewMode::Linear, "cheap");
        ui.radio_value(&mut s.preview, PreviewMode::Off, "off");
    });
    if s.preview != PreviewMode::Off {
        ui.horizontal(|ui| {
            let label = ui.label("every");
            ui.add(egui::DragValue::new(&mut s.preview_every).range(1..=50))
                .labelled_by(label.id);
            ui.label("steps");
        });
    }
    ui.horizontal(|ui| {
        let label = ui.label("Output");
        let mut text = s.output_dir.display().to_string();
        if ui
            .add(egui::TextEdit::singleline(&mut text).desired_width(180.0))
            .labelled_by(label.id)
            .changed()
        {
            s.output_dir = text.into();
        }
        if ui
            .button("…")
            .on_hover_text("Choose the output folder")
            .clicked()
        {
            out.push(UiCommand::BrowseOutput);
        }
    });
    out
}
