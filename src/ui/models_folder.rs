//! The models folder (e.g. A1111's `models/Stable-diffusion`): Scan lists its checkpoints
//! (name, kind, size); loadable ones can be loaded or added to compare mode, VAEs used as
//! the VAE, the rest are shown greyed with the reason.

use std::path::PathBuf;

use super::commands::UiCommand;
use super::state::Settings;
use crate::protocol::FoundModel;

/// The last scan's answer.
#[derive(Debug, Clone, Default)]
pub struct ScanState {
    /// A scan was sent and not answered yet.
    pub scanning: bool,
    pub dir: Option<PathBuf>,
    pub models: Vec<FoundModel>,
    pub error: Option<String>,
}

impl ScanState {
    /// The VAEs the scan found (for the VAE dropdown).
    pub fn vaes(&self) -> impl Iterator<Item = &FoundModel> {
        self.models.iter().filter(|m| m.loadable && is_vae(m))
    }
}

/// Whether a scanned entry is a VAE rather than a checkpoint.
pub fn is_vae(m: &FoundModel) -> bool {
    m.kind.eq_ignore_ascii_case("vae")
}

/// "2.1 GB", "335 MB", "12 KB".
pub fn human_size(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.1} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.0} MB", b / 1e6)
    } else {
        format!("{:.0} KB", (b / 1e3).ceil())
    }
}

pub fn models_folder_ui(ui: &mut egui::Ui, s: &mut Settings, scan: &ScanState) -> Vec<UiCommand> {
    let mut out = Vec::new();
    egui::CollapsingHeader::new("Models folder")
        .id_salt("models folder")
        .show(ui, |ui| {
            ui.horizontal(|ui| {
                let label = ui.label("Folder");
                let mut text = s.models_dir.display().to_string();
                let r = ui
                    .add(
                        egui::TextEdit::singleline(&mut text)
                            .hint_text("…/stable-diffusion-webui/models/Stable-diffusion")
                            .desired_width(170.0),
                    )
                    .labelled_by(label.id);
                if r.changed() {
                    s.models_dir = text.into();
                }
                let enter = r.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
                if ui
                    .small_button("…")
                    .on_hover_text("Choose the folder")
                    .clicked()
                {
                    out.push(UiCommand::BrowseModelsDir);
                }
                if ui.button("Scan").clicked() || enter {
                    out.push(UiCommand::ScanModels);
                }
                if scan.scanning {
                    ui.spinner();
                }
            });
            ui.horizontal(|ui| {
                let label = ui.label("Keep loaded");
                ui.add(
                    egui::DragValue::new(&mut s.cache_gib)
                        .range(0.0..=512.0)
                        .speed(0.5)
                        .custom_formatter(|v, _| {
                            if v <= 0.0 {
                                "auto".into()
                            } else {
                                format!("{v:.1} GiB")
                            }
                        }),
                )
                .labelled_by(label.id)
                .on_hover_text(
                    "Recently used models stay loaded up to this size together (0 = auto: half \
                     the free RAM for CPU models, 16 GiB on a GPU); applies at the next load",
                );
            });
            if let Some(e) = &scan.error {
                ui.colored_label(ui.visuals().error_fg_color, e);
            }
            if scan.dir.is_some() && scan.models.is_empty() && scan.error.is_none() {
                ui.label(egui::RichText::new("no checkpoints found in this folder").weak());
            }
            for m in &scan.models {
                found_row_ui(ui, m, &mut out);
            }
        });
    out
}

fn found_row_ui(ui: &mut egui::Ui, m: &FoundModel, out: &mut Vec<UiCommand>) {
    let path = m.path.display().to_string();
    ui.horizontal_wrapped(|ui| {
        let text = format!("{} · {} · {}", m.name, m.kind, human_size(m.bytes));
        if !m.loadable {
            ui.add_enabled(false, egui::Label::new(text))
                .on_disabled_hover_text(format!("{path}: {}", m.kind));
            return;
        }
        ui.label(text).on_hover_text(&path);
        let button = |ui: &mut egui::Ui, text: &str, name: String, hover: &str| {
            let r = ui.small_button(text).on_hover_text(hover);
            r.widget_info(|| egui::WidgetInfo::labeled(egui::Role::Button, true, &name));
            r.clicked()
        };
        if is_vae(m) {
            if button(
                ui,
                "Use as VAE",
                format!("Use {} as VAE", m.name),
                "Decode with this VAE instead of the model's own",
            ) {
                out.push(UiCommand::SetVae(Some(path.clone())));
            }
        } else {
            if button(ui, "Load", format!("Load {}", m.name), "Load this model") {
                out.push(UiCommand::LoadModel(path.clone()));
            }
            if button(
                ui,
                "Compare",
                format!("Compare {}", m.name),
                "Add it as a row of compare mode",
            ) {
                out.push(UiCommand::AddToCompare(path.clone()));
            }
        }
    });
}
