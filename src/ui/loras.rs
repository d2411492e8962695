//! The LoRA panel: what the LoRA folder holds (name, family, whether it fits the loaded
//! model, the `NAME.preview.png` civitai helpers save beside it). Clicking one puts
//! `<lora:NAME:1>` in the prompt; the tag under the prompt's cursor gets a weight slider.

use std::collections::HashMap;
use std::path::PathBuf;

use super::commands::UiCommand;
use super::state::Settings;
use crate::engine::extra_networks;
use crate::protocol::FoundLora;

/// The last LoRA scan and the previews read for it.
#[derive(Default)]
pub struct LoraPanel {
    /// A scan was sent and not answered yet.
    pub scanning: bool,
    pub loras: Vec<FoundLora>,
    /// Preview thumbnails by file (None: could not be read).
    previews: HashMap<PathBuf, Option<egui::TextureHandle>>,
}

impl LoraPanel {
    /// Takes a scan's answer.
    pub fn found(&mut self, loras: Vec<FoundLora>) {
        self.scanning = false;
        self.loras = loras;
    }

    /// Names of `prompt`'s LoRA tags that are not in the folder.
    pub fn missing(&self, prompt: &str) -> Vec<String> {
        let (_, tags) = extra_networks::strip_tags(prompt);
        let mut out: Vec<String> = Vec::new();
        for t in tags.iter().filter(|t| t.kind == "lora" || t.kind == "lyco") {
            if !self.loras.iter().any(|l| l.name == t.name) && !out.contains(&t.name) {
                out.push(t.name.clone());
            }
        }
        out
    }

    fn preview(&mut self, ctx: &egui::Context, path: &PathBuf) -> Option<egui::TextureHandle> {
        self.previews
            .entry(path.clone())
            .or_insert_with(|| {
                let img = image::open(path).ok()?.thumbnail(96, 96).to_rgb8();
                let (w, h) = (img.width() as usize, img.height() as usize);
                let color = egui::ColorImage::from_rgb([w, h], img.as_raw());
                Some(ctx.load_texture(
                    format!("lora preview {}", path.display()),
                    color,
                    egui::TextureOptions::LINEAR,
                ))
            })
            .clone()
    }
}

/// The LoRA panel. `cursor`: the prompt cursor's byte offset, when the prompt has focus
/// or had it last.
pub fn loras_ui(
    ui: &mut egui::Ui,
    panel: &mut LoraPanel,
    settings: &mut Settings,
    prompt: &str,
    cursor: Option<usize>,
) -> Vec<UiCommand> {
    let mut out = Vec::new();
    egui::CollapsingHeader::new(format!("LoRA ({})", panel.loras.len()))
        .id_salt("loras")
        .default_open(true)
        .show(ui, |ui| {
            ui.horizontal(|ui| {
                let label = ui.label("LoRA folder");
                let mut text = settings.lora_dir.display().to_string();
                let r = ui
                    .add(
                        egui::TextEdit::singleline(&mut text)
                            .hint_text("models/Lora (from the models folder)")
                            .desired_width(170.0),
                    )
                    .labelled_by(label.id);
                if r.changed() {
                    settings.lora_dir = text.into();
                }
                if r.lost_focus() || ui.button("Scan LoRAs").clicked() {
                    out.push(UiCommand::ScanLoras);
                }
            });
            if panel.scanning {
                ui.label(egui::RichText::new("scanning…").weak());
            } else if panel.loras.is_empty() {
                ui.label(
                    egui::RichText::new("no LoRAs found (set a models folder or a LoRA folder)")
                        .weak(),
                );
            }
            // The tag under the cursor: its weight.
            if let Some((range, tag)) = cursor.and_then(|c| extra_networks::lora_tag_at(prompt, c))
            {
                ui.horizontal(|ui| {
                    let mut w = tag.te;
                    let label = ui.label(format!("<lora:{}> weight", tag.name));
                    let r = ui
                        .add(egui::Slider::new(&mut w, -2.0..=2.0).step_by(0.05))
                        .labelled_by(label.id);
                    if r.changed() {
                        out.push(UiCommand::SetLoraWeight {
                            start: range.start,
                            end: range.end,
                            text: extra_networks::format_lora_tag(&tag.name, w),
                        });
                    }
                });
            }
            let ctx = ui.ctx().clone();
            let loras = panel.loras.clone();
            egui::ScrollArea::vertical()
                .id_salt("lora list")
                .max_height(220.0)
                .show(ui, |ui| {
                    for l in &loras {
                        ui.horizontal(|ui| {
                            if let Some(t) = l.preview.as_ref().and_then(|p| panel.preview(&ctx, p))
                            {
                                ui.add(
                                    egui::Image::new(&t).fit_to_exact_size(egui::vec2(32.0, 32.0)),
                                );
                            }
                            let usable = l.error.is_none() && l.fits != Some(false);
                            let b = ui
                                .add_enabled(usable, egui::Button::new(&l.name))
                                .on_hover_text(format!("add <lora:{}:1> to the prompt", l.name));
                            if b.clicked() {
                                out.push(UiCommand::InsertLora(l.name.clone()));
                            }
                            let (text, warn) = lora_note(l);
                            let mut rt = egui::RichText::new(text).small();
                            rt = if warn {
                                rt.color(ui.visuals().warn_fg_color)
                            } else {
                                rt.weak()
                            };
                            ui.label(rt).on_hover_text(l.path.display().to_string());
                        });
                    }
                });
        });
    out
}

/// "SD 1.x · UNet + text encoder", or why it cannot be used; and whether that is a warning.
pub fn lora_note(l: &FoundLora) -> (String, bool) {
    if let Some(e) = &l.error {
        return (e.clone(), true);
    }
    let family = match (l.family.is_empty(), l.fits) {
        (false, _) => l.family.as_str(),
        (true, Some(true)) => "fits the loaded model",
        (true, _) => "family not stated",
    };
    match l.fits {
        Some(false) => (format!("{family}: not for the loaded model"), true),
        _ => (format!("{family} · {}", l.parts), false),
    }
}

/// `prompt` with `<lora:NAME:1>` inserted at byte `at` (the end when None), set off by
/// a comma and space from the text before it as people write tags.
pub fn insert_tag(prompt: &str, name: &str, at: Option<usize>) -> (String, usize) {
    let at = at
        .filter(|&a| a <= prompt.len() && prompt.is_char_boundary(a))
        .unwrap_or(prompt.len());
    let (before, after) = prompt.split_at(at);
    let tag = extra_networks::format_lora_tag(name, 1.0);
    let sep = if before.trim_end().is_empty() || before.trim_end().ends_with(',') {
        if before.is_empty() || before.ends_with(' ') {
            ""
        } else {
            " "
        }
    } else {
        ", "
    };
    let text = format!("{before}{sep}{tag}{after}");
    (text, before.len() + sep.len() + tag.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_go_in_where_people_put_them() {
        assert_eq!(insert_tag("", "a", None).0, "<lora:a:1>");
        assert_eq!(insert_tag("a cat", "x", None).0, "a cat, <lora:x:1>");
        assert_eq!(insert_tag("a cat, ", "x", None).0, "a cat, <lora:x:1>");
        assert_eq!(insert_tag("a cat,", "x", None).0, "a cat, <lora:x:1>");
        let (t, end) = insert_tag("a cat red", "x", Some(5));
        assert_eq!(t, "a cat, <lora:x:1> red");
        assert_eq!(&t[..end], "a cat, <lora:x:1>");
    }
}
