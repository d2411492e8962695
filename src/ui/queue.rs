//! The job queue: the running job and those waiting, each removable or editable.

use super::app::JobView;
use super::commands::UiCommand;

fn summary(j: &JobView) -> String {
    let prompt: String = j.request.prompt.chars().take(40).collect();
    let n = j.request.seeds.len();
    format!(
        "#{} {n} image{} · {} steps · \"{prompt}\"",
        j.request.id,
        if n == 1 { "" } else { "s" },
        j.request.steps
    )
}

pub fn queue_ui(ui: &mut egui::Ui, jobs: &[JobView]) -> Vec<UiCommand> {
    let mut out = Vec::new();
    let waiting = jobs.iter().filter(|j| !j.running).count();
    ui.strong(format!("Queue ({waiting} waiting)"));
    if jobs.is_empty() {
        ui.label(egui::RichText::new("nothing queued").weak());
    }
    for j in jobs {
        ui.horizontal(|ui| {
            if j.running {
                ui.label(format!("Running: {}", summary(j)));
                if ui.small_button(format!("Stop #{}", j.request.id)).clicked() {
                    out.push(UiCommand::Stop);
                }
            } else {
                ui.label(summary(j));
                if ui
                    .small_button("Edit")
                    .on_hover_text("Take it out of the queue and back into the editor")
                    .clicked()
                {
                    out.push(UiCommand::EditJob(j.request.id));
                }
                if ui
                    .small_button(format!("Remove #{}", j.request.id))
                    .clicked()
                {
                    out.push(UiCommand::CancelJob(j.request.id));
                }
            }
        });
    }
    out
}
