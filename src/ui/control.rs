//! ControlNet panel (A1111's ControlNet unit): the ControlNet (typed, picked, or one of the
//! models folder's `ControlNet`), the control picture (dropped on the panel or picked), the
//! preprocessor (none, canny), scale and start/end; the map the job will use is shown beside
//! the picture. Every cell (and every compare row) uses the same map.

use std::path::PathBuf;

use super::commands::UiCommand;
use super::state::ControlSettings;
use crate::engine::control::{fit, Preprocess};
use crate::protocol::{ControlInput, RgbImage};

/// What the map was made from.
#[derive(Debug, Clone, PartialEq)]
struct MapKey {
    image: u64,
    preprocess: String,
    width: usize,
    height: usize,
}

/// The panel's pictures and the ControlNets found.
#[derive(Default)]
pub struct ControlPanel {
    /// The picture: its name, pixels and texture.
    image: Option<(String, RgbImage, egui::TextureHandle)>,
    /// Bumped when the picture changes.
    image_id: u64,
    map: Option<(MapKey, RgbImage, egui::TextureHandle)>,
    /// (name, path) of the ControlNets in the models folder's ControlNet folders.
    pub found: Vec<(String, PathBuf)>,
    /// Open the panel on the next frame (a picture arrived, a PNG restored it).
    pub open: bool,
    ctx: Option<egui::Context>,
}

impl ControlPanel {
    pub fn set_image(&mut self, ctx: &egui::Context, name: String, image: RgbImage) {
        let color = egui::ColorImage::from_rgb([image.width, image.height], &image.rgb);
        let texture = ctx.load_texture("control image", color, egui::TextureOptions::LINEAR);
        self.image = Some((name, image, texture));
        self.ctx = Some(ctx.clone());
        self.image_id += 1;
        self.map = None;
        self.open = true;
    }

    pub fn clear_image(&mut self) {
        self.image = None;
        self.map = None;
        self.image_id += 1;
    }

    pub fn has_image(&self) -> bool {
        self.image.is_some()
    }

    /// The map for a `width`×`height` job (made now if the picture, preprocessor or size
    /// changed): the picture fitted as diffusers does, then preprocessed.
    fn ensure_map(
        &mut self,
        preprocess: &str,
        width: usize,
        height: usize,
    ) -> Result<&RgbImage, String> {
        let Some((_, img, _)) = &self.image else {
            return Err("no control picture: drop one on the ControlNet panel or pick it".into());
        };
        let key = MapKey {
            image: self.image_id,
            preprocess: preprocess.to_string(),
            width,
            height,
        };
        if self.map.as_ref().map(|m| &m.0) != Some(&key) {
            let pre = Preprocess::parse(preprocess).map_err(|e| e.to_string())?;
            let fitted =
                fit(&img.rgb, img.width, img.height, width, height).map_err(|e| e.to_string())?;
            let map = RgbImage {
                width,
                height,
                rgb: pre.apply(&fitted, width, height),
            };
            let color = egui::ColorImage::from_rgb([width, height], &map.rgb);
            let ctx = self
                .ctx
                .as_ref()
                .ok_or("no window to show the control map in")?;
            let texture = ctx.load_texture("control map", color, egui::TextureOptions::LINEAR);
            self.map = Some((key, map, texture));
        }
        self.map
            .as_ref()
            .map(|m| &m.1)
            .ok_or_else(|| "the control map could not be made".to_string())
    }

    /// What a `width`×`height` job gets, or why it cannot have it (`None`: ControlNet off).
    pub fn input(
        &mut self,
        c: &ControlSettings,
        width: usize,
        height: usize,
    ) -> Result<Option<ControlInput>, String> {
        if !c.enabled {
            return Ok(None);
        }
        if c.model.trim().is_empty() {
            return Err("ControlNet is on but no ControlNet model is chosen".into());
        }
        if !c.scale.is_finite() || c.start >= c.end {
            return Err(format!(
                "ControlNet: start {} must be below end {}",
                c.start, c.end
            ));
        }
        let map = self.ensure_map(&c.preprocess, width, height)?.clone();
        Ok(Some(ControlInput {
            model: c.model.trim().to_string(),
            map,
            module: c.preprocess.clone(),
            scale: c.scale,
            start: c.start,
            end: c.end,
        }))
    }
}

/// The panel. `drop_rect` receives its area (a file dropped there becomes the control
/// picture); `files_hovering` highlights it while files are dragged over the window.
pub fn control_ui(
    ui: &mut egui::Ui,
    panel: &mut ControlPanel,
    c: &mut ControlSettings,
    size: (usize, usize),
    files_hovering: bool,
    drop_rect: &mut Option<egui::Rect>,
) -> Vec<UiCommand> {
    let mut out = Vec::new();
    let title = if c.enabled {
        "ControlNet (on)"
    } else {
        "ControlNet"
    };
    let open = std::mem::take(&mut panel.open);
    let scope = ui.scope(|ui| {
        egui::CollapsingHeader::new(title)
            .id_salt("controlnet")
            .open(open.then_some(true))
            .show(ui, |ui| body_ui(ui, panel, c, size, &mut out))
            .header_response
    });
    super::img2img::drop_target(ui, scope.response.rect, files_hovering, drop_rect);
    out
}

fn body_ui(
    ui: &mut egui::Ui,
    panel: &mut ControlPanel,
    c: &mut ControlSettings,
    size: (usize, usize),
    out: &mut Vec<UiCommand>,
) {
    ui.checkbox(&mut c.enabled, "Use ControlNet")
        .on_hover_text("Steer every cell with the map below");
    ui.horizontal(|ui| {
        match &panel.image {
            Some((name, img, _)) => ui.label(format!("{name} ({}×{})", img.width, img.height)),
            None => ui.weak("Drop a picture here"),
        };
        if ui.button("Pick…").clicked() {
            out.push(UiCommand::PickControlImage);
        }
        if panel.image.is_some() && ui.button("Clear").clicked() {
            out.push(UiCommand::ClearControlImage);
        }
    });
    let map = panel.ensure_map(&c.preprocess, size.0, size.1).map(|_| ());
    if let (Some((_, img, tex)), Ok(())) = (&panel.image, &map) {
        let side = ((ui.available_width() - 12.0) / 2.0).clamp(60.0, 140.0);
        let fit_size = |w: usize, h: usize| {
            let s = side / w.max(h) as f32;
            egui::vec2(w as f32 * s, h as f32 * s)
        };
        ui.horizontal(|ui| {
            ui.add(egui::Image::new((
                tex.id(),
                fit_size(img.width, img.height),
            )))
            .on_hover_text("control picture");
            if let Some((key, _, mtex)) = &panel.map {
                ui.add(egui::Image::new((
                    mtex.id(),
                    fit_size(key.width, key.height),
                )))
                .on_hover_text(format!(
                    "control map ({}, {}×{}): what every cell is steered by",
                    key.preprocess, key.width, key.height
                ));
            }
        });
    } else if let Err(e) = map {
        if panel.image.is_some() {
            ui.colored_label(ui.visuals().warn_fg_color, e);
        }
    }
    ui.horizontal(|ui| {
        ui.label("Model");
        ui.add(
            egui::TextEdit::singleline(&mut c.model)
                .hint_text("ControlNet folder, .safetensors or hub id")
                .desired_width(170.0),
        );
        if ui.button("File…").clicked() {
            out.push(UiCommand::BrowseControlNet);
        }
    });
    ui.horizontal(|ui| {
        let current = panel
            .found
            .iter()
            .find(|(_, p)| p.display().to_string() == c.model)
            .map(|(n, _)| n.clone())
            .unwrap_or_else(|| format!("{} found", panel.found.len()));
        egui::ComboBox::from_id_salt("controlnet found")
            .selected_text(current)
            .width(190.0)
            .show_ui(ui, |ui| {
                for (name, path) in &panel.found {
                    let p = path.display().to_string();
                    if ui.selectable_label(c.model == p, name).clicked() {
                        c.model = p;
                    }
                }
            });
        if ui
            .button("Scan ControlNets")
            .on_hover_text("List the models folder's ControlNet folder (A1111 models/ControlNet, ComfyUI models/controlnet)")
            .clicked()
        {
            out.push(UiCommand::ScanControlNets);
        }
    });
    ui.horizontal(|ui| {
        ui.label("Preprocessor");
        egui::ComboBox::from_id_salt("control preprocess")
            .selected_text(c.preprocess.as_str())
            .show_ui(ui, |ui| {
                for (name, tip) in [
                    ("canny", "Canny edges (low 100, high 200), as A1111"),
                    ("none", "The picture is already a map"),
                ] {
                    ui.selectable_value(&mut c.preprocess, name.to_string(), name)
                        .on_hover_text(tip);
                }
            });
    });
    ui.add(egui::Slider::new(&mut c.scale, 0.0..=2.0).text("Control weight"));
    ui.add(egui::Slider::new(&mut c.start, 0.0..=1.0).text("Starting step"));
    ui.add(egui::Slider::new(&mut c.end, 0.0..=1.0).text("Ending step"));
    if c.start >= c.end {
        ui.colored_label(
            ui.visuals().warn_fg_color,
            "the starting step must be before the ending step",
        );
    }
}
