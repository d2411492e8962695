//! Model picker: hub id or folder, Browse… (system dialog), recent models, device, dtype.

use super::app::ModelStatus;
use super::commands::UiCommand;
use super::state::Persisted;

pub fn model_picker_ui(
    ui: &mut egui::Ui,
    input: &mut String,
    state: &mut Persisted,
    model: &ModelStatus,
) -> Vec<UiCommand> {
    let mut out = Vec::new();
    ui.horizontal(|ui| {
        let label = ui.strong("Model");
        let r = ui
            .add(
                egui::TextEdit::singleline(input)
                    .hint_text("hub id (owner/name) or diffusers folder")
                    .desired_width(320.0),
            )
            .labelled_by(label.id);
        let enter = r.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
        if ui.button("Load").clicked() || enter {
            out.push(UiCommand::LoadModel(input.clone()));
        }
        if ui.button("Browse…").clicked() {
            out.push(UiCommand::BrowseModel);
        }
        egui::ComboBox::from_id_salt("recent")
            .selected_text("Recent")
            .show_ui(ui, |ui| {
                for m in &state.recent_models {
                    if ui.selectable_label(false, m).clicked() {
                        out.push(UiCommand::LoadModel(m.clone()));
                    }
                }
            })
            .response
            .widget_info(|| egui::WidgetInfo::labeled(egui::Role::ComboBox, true, "Recent models"));
        ui.separator();
        egui::ComboBox::from_id_salt("device")
            .selected_text(state.settings.device.clone())
            .width(60.0)
            .show_ui(ui, |ui| {
                for d in ["cpu", "cuda"] {
                    ui.selectable_value(&mut state.settings.device, d.to_string(), d);
                }
            })
            .response
            .widget_info(|| egui::WidgetInfo::labeled(egui::Role::ComboBox, true, "Device"));
        egui::ComboBox::from_id_salt("dtype")
            .selected_text(state.settings.dtype.clone())
            .width(60.0)
            .show_ui(ui, |ui| {
                for d in ["f32", "f16", "bf16"] {
                    ui.selectable_value(&mut state.settings.dtype, d.to_string(), d);
                }
            })
            .response
            .widget_info(|| egui::WidgetInfo::labeled(egui::Role::ComboBox, true, "Precision"));
        if model.loading.is_some() {
            ui.spinner();
        }
    });
    out
}
