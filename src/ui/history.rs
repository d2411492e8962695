//! Past generations (persisted): newest first, each restorable into the editor.

use super::commands::UiCommand;
use super::state::HistoryEntry;

/// Entries shown (the file keeps more).
const SHOWN: usize = 20;

pub fn history_ui(ui: &mut egui::Ui, history: &[HistoryEntry]) -> Vec<UiCommand> {
    let mut out = Vec::new();
    egui::CollapsingHeader::new(format!("History ({})", history.len()))
        .id_salt("history")
        .show(ui, |ui| {
            if history.is_empty() {
                ui.label(egui::RichText::new("no generations yet").weak());
            }
            for (i, h) in history.iter().enumerate().rev().take(SHOWN) {
                let prompt: String = h.params.prompt.chars().take(36).collect();
                let seed = h.seeds.first().copied().unwrap_or(h.params.seed);
                ui.horizontal(|ui| {
                    if ui
                        .small_button(format!("Restore {}", i + 1))
                        .on_hover_text(format!(
                            "{} image(s) in {:?}",
                            h.images.len(),
                            h.images.first()
                        ))
                        .clicked()
                    {
                        out.push(UiCommand::RestoreHistory(i));
                    }
                    ui.label(format!(
                        "seed {seed} · {} steps · \"{prompt}\"",
                        h.params.steps
                    ));
                });
            }
        });
    out
}
