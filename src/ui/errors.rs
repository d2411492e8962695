//! Dismissible error and warning messages at the top of the grid.

use super::commands::UiCommand;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub text: String,
    pub severity: Severity,
}

pub fn messages_ui(ui: &mut egui::Ui, messages: &[Message]) -> Vec<UiCommand> {
    let mut out = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let (color, tag) = match m.severity {
            Severity::Error => (ui.visuals().error_fg_color, "Error"),
            Severity::Warning => (ui.visuals().warn_fg_color, "Warning"),
        };
        egui::Frame::group(ui.style())
            .stroke(egui::Stroke::new(1.0, color))
            .show(ui, |ui| {
                ui.horizontal_wrapped(|ui| {
                    ui.colored_label(color, format!("{tag}: {}", m.text));
                    if ui.small_button("Dismiss").clicked() {
                        out.push(UiCommand::Dismiss(i));
                    }
                });
            });
    }
    out
}
