//! Model picker: hub id, folder or single file, Browse… (system dialog), recent models,
//! device, dtype, and the VAE (Automatic, one found by the folder scan, or free text).

use super::app::ModelStatus;
use super::commands::UiCommand;
use super::models_folder::ScanState;
use super::state::Persisted;
use crate::engine::memory::{MemoryMode, MemoryOptions, Slicing, Tiling};

/// What the VAE dropdown shows for the setting.
pub fn vae_label(vae: &str) -> String {
    if vae.trim().is_empty() {
        "Automatic".into()
    } else {
        super::compare::model_label(vae)
    }
}

/// The models dropdown: recent models first, then the well-known hub models (SD 1.5, SDXL
/// base, SDXL-Turbo: a first run can Load without knowing a hub id), then what the
/// models-folder scan found. (spec, text)
pub fn model_choices(state: &Persisted, scan: &ScanState) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = state
        .recent_models
        .iter()
        .map(|m| (m.clone(), m.clone()))
        .collect();
    for (id, text) in [
        (
            crate::engine::model::DEFAULT_MODEL,
            "Stable Diffusion 1.5 (stable-diffusion-v1-5/stable-diffusion-v1-5, downloads 5 GB)",
        ),
        (
            "stabilityai/stable-diffusion-xl-base-1.0",
            "SDXL 1.0 base (stabilityai/stable-diffusion-xl-base-1.0, downloads 7 GB)",
        ),
        (
            "stabilityai/sdxl-turbo",
            "SDXL-Turbo (stabilityai/sdxl-turbo, 1 step, downloads 7 GB)",
        ),
    ] {
        if !state.recent_models.iter().any(|m| m == id) {
            out.push((id.to_string(), text.to_string()));
        }
    }
    for m in scan
        .models
        .iter()
        .filter(|m| m.loadable && !super::models_folder::is_vae(m))
    {
        let spec = m.path.to_string_lossy().into_owned();
        if !out.iter().any(|(s, _)| *s == spec) {
            out.push((spec, format!("{} ({})", m.name, m.kind)));
        }
    }
    out
}

/// What the memory dropdown shows.
pub fn memory_label(m: MemoryMode) -> &'static str {
    match m {
        MemoryMode::Auto => "memory: auto",
        MemoryMode::Full => "memory: full",
        MemoryMode::Medvram => "medvram",
        MemoryMode::Lowvram => "lowvram",
    }
}

/// Memory mode (next load), attention slicing and tiled VAE decode (next job).
fn memory_ui(ui: &mut egui::Ui, m: &mut MemoryOptions) {
    egui::ComboBox::from_id_salt("memory")
        .selected_text(memory_label(m.mode))
        .width(110.0)
        .show_ui(ui, |ui| {
            for (mode, hint) in [
                (
                    MemoryMode::Auto,
                    "Full when the model fits in free VRAM, else medvram, else lowvram",
                ),
                (MemoryMode::Full, "Everything on the GPU: fastest"),
                (
                    MemoryMode::Medvram,
                    "One of text encoder / UNet / VAE on the GPU at a time (A1111 --medvram)",
                ),
                (
                    MemoryMode::Lowvram,
                    "The UNet one block at a time: least VRAM, slowest (A1111 --lowvram)",
                ),
            ] {
                ui.selectable_value(&mut m.mode, mode, memory_label(mode))
                    .on_hover_text(hint);
            }
        })
        .response
        .on_hover_text("Where the weights live; applies when the model is (re)loaded")
        .widget_info(|| egui::WidgetInfo::labeled(egui::Role::ComboBox, true, "Memory mode"));
    let slicing = |s: Slicing| match s {
        Slicing::Auto => "slicing: auto".to_string(),
        Slicing::Off => "slicing: off".to_string(),
        Slicing::Queries(q) => format!("slicing: {q}"),
    };
    egui::ComboBox::from_id_salt("attention_slicing")
        .selected_text(slicing(m.attention))
        .width(100.0)
        .show_ui(ui, |ui| {
            for s in [Slicing::Auto, Slicing::Off, Slicing::Queries(1024), Slicing::Queries(256)] {
                ui.selectable_value(&mut m.attention, s, slicing(s));
            }
        })
        .response
        .on_hover_text("Attention slicing: the score matrix for a slice of queries at a time (same image, less memory)")
        .widget_info(|| egui::WidgetInfo::labeled(egui::Role::ComboBox, true, "Attention slicing"));
    let tiling = |t: Tiling| match t {
        Tiling::Auto => "tiled VAE: auto",
        Tiling::On => "tiled VAE: on",
        Tiling::Off => "tiled VAE: off",
    };
    egui::ComboBox::from_id_salt("vae_tiling")
        .selected_text(tiling(m.vae_tiling))
        .width(110.0)
        .show_ui(ui, |ui| {
            for t in [Tiling::Auto, Tiling::On, Tiling::Off] {
                ui.selectable_value(&mut m.vae_tiling, t, tiling(t));
            }
        })
        .response
        .on_hover_text("Decode in overlapping tiles (diffusers' enable_tiling): for large images; auto tiles only when a whole decode would not fit")
        .widget_info(|| egui::WidgetInfo::labeled(egui::Role::ComboBox, true, "Tiled VAE decode"));
}

/// Model field and buttons, then the VAE row.
pub fn model_picker_ui(
    ui: &mut egui::Ui,
    input: &mut String,
    vae_input: &mut String,
    state: &mut Persisted,
    model: &ModelStatus,
    scan: &ScanState,
) -> Vec<UiCommand> {
    let mut out = Vec::new();
    ui.horizontal(|ui| {
        let label = ui.strong("Model");
        let r = ui
            .add(
                egui::TextEdit::singleline(input)
                    .hint_text(
                        "hub id (owner/name), diffusers folder or .safetensors (or pick from Models)",
                    )
                    .desired_width(320.0),
            )
            .labelled_by(label.id);
        let enter = r.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
        if ui.button("Load").clicked() || enter {
            out.push(UiCommand::LoadModel(input.clone()));
        }
        if ui
            .button("Browse…")
            .on_hover_text("Choose a diffusers model folder")
            .clicked()
        {
            out.push(UiCommand::BrowseModel);
        }
        if ui
            .button("File…")
            .on_hover_text("Choose a single-file checkpoint (.safetensors)")
            .clicked()
        {
            out.push(UiCommand::BrowseModelFile);
        }
        egui::ComboBox::from_id_salt("recent")
            .selected_text("Models")
            .show_ui(ui, |ui| {
                for (spec, text) in model_choices(state, scan) {
                    if ui.selectable_label(false, text).clicked() {
                        *input = spec.clone();
                        out.push(UiCommand::LoadModel(spec));
                    }
                }
            })
            .response
            .on_hover_text("The default model, recent models and the models folder's checkpoints")
            .widget_info(|| egui::WidgetInfo::labeled(egui::Role::ComboBox, true, "Models"));
        ui.separator();
        egui::ComboBox::from_id_salt("device")
            .selected_text(format!("device: {}", state.settings.device))
            .width(100.0)
            .show_ui(ui, |ui| {
                for d in ["auto", "cpu", "cuda"] {
                    ui.selectable_value(&mut state.settings.device, d.to_string(), d);
                }
            })
            .response
            .widget_info(|| egui::WidgetInfo::labeled(egui::Role::ComboBox, true, "Device"));
        egui::ComboBox::from_id_salt("dtype")
            .selected_text(format!("precision: {}", state.settings.dtype))
            .width(110.0)
            .show_ui(ui, |ui| {
                for d in ["auto", "f32", "f16", "bf16"] {
                    ui.selectable_value(&mut state.settings.dtype, d.to_string(), d);
                }
            })
            .response
            .widget_info(|| egui::WidgetInfo::labeled(egui::Role::ComboBox, true, "Precision"));
        memory_ui(ui, &mut state.settings.memory);
        if model.loading.is_some() {
            ui.spinner();
        }
    });
    ui.horizontal(|ui| {
        let label = ui.strong("VAE");
        let current = state.settings.vae.trim().to_string();
        egui::ComboBox::from_id_salt("vae")
            .selected_text(vae_label(&current))
            .width(200.0)
            .show_ui(ui, |ui| {
                if ui
                    .selectable_label(current.is_empty(), "Automatic")
                    .on_hover_text("The model's own VAE")
                    .clicked()
                    && !current.is_empty()
                {
                    out.push(UiCommand::SetVae(None));
                }
                for v in scan.vaes() {
                    let path = v.path.display().to_string();
                    if ui
                        .selectable_label(current == path, &v.name)
                        .on_hover_text(&path)
                        .clicked()
                        && current != path
                    {
                        out.push(UiCommand::SetVae(Some(path)));
                    }
                }
                let listed = scan.vaes().any(|v| v.path.display().to_string() == current);
                if !current.is_empty() && !listed {
                    let _ = ui.selectable_label(true, vae_label(&current));
                }
            })
            .response
            .labelled_by(label.id);
        let r = ui.add(
            egui::TextEdit::singleline(vae_input)
                .hint_text("stabilityai/sd-vae-ft-mse, folder or file")
                .desired_width(240.0),
        );
        r.widget_info(|| {
            egui::WidgetInfo::labeled(egui::Role::TextInput, true, "VAE hub id, folder or file")
        });
        let enter = r.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
        if ui
            .button("Use VAE")
            .on_hover_text("Reload the model with this VAE")
            .clicked()
            || enter
        {
            let v = vae_input.trim().to_string();
            out.push(UiCommand::SetVae((!v.is_empty()).then_some(v)));
        }
        if ui
            .button("VAE file…")
            .on_hover_text("Choose a VAE .safetensors file")
            .clicked()
        {
            out.push(UiCommand::BrowseVae);
        }
    });
    out
}
