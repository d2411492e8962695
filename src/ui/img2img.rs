//! Image input (img2img / inpainting): the init image (dropped on the panel, picked, or sent
//! from a cell), A1111's "Denoising strength", and a mask brush painted over the picture
//! (white = repaint) at the picture's own resolution, shown as a red translucent overlay.

use std::path::Path;

use super::commands::UiCommand;
use super::state::{Params, Settings};
use crate::protocol::{InitInput, MaskImage, RgbImage};

/// Largest side kept for an init image (the worker resizes to the job's size anyway).
pub const MAX_SIDE: usize = 2048;

/// The init image, its texture and the painted mask.
pub struct InitState {
    /// Where it came from, for display: a file name or "cell 3".
    pub name: String,
    pub image: RgbImage,
    pub texture: egui::TextureHandle,
    /// Same size as `image`; 0 = keep, 255 = repaint.
    pub mask: MaskImage,
    overlay: Option<egui::TextureHandle>,
    overlay_dirty: bool,
    /// The previous brush position (image pixels) while a stroke is in progress.
    last: Option<egui::Pos2>,
    /// Erase instead of paint.
    pub erase: bool,
}

impl InitState {
    pub fn new(ctx: &egui::Context, name: String, image: RgbImage) -> Self {
        let color = egui::ColorImage::from_rgb([image.width, image.height], &image.rgb);
        let texture = ctx.load_texture("init image", color, egui::TextureOptions::LINEAR);
        let mask = MaskImage {
            width: image.width,
            height: image.height,
            data: vec![0; image.width * image.height],
        };
        Self {
            name,
            image,
            texture,
            mask,
            overlay: None,
            overlay_dirty: false,
            last: None,
            erase: false,
        }
    }

    /// Whether any pixel is marked for repainting.
    pub fn has_mask(&self) -> bool {
        self.mask.data.iter().any(|&v| v > 0)
    }

    pub fn clear_mask(&mut self) {
        self.mask.data.fill(0);
        self.overlay_dirty = true;
    }

    /// What the job gets: the picture, the strength, and the mask when something is painted.
    pub fn input(&self, strength: f64) -> InitInput {
        InitInput {
            image: self.image.clone(),
            strength,
            mask: self.has_mask().then(|| self.mask.clone()),
        }
    }

    fn overlay(&mut self, ctx: &egui::Context) -> Option<egui::TextureId> {
        if !self.has_mask() {
            return None;
        }
        if self.overlay.is_none() || self.overlay_dirty {
            let rgba: Vec<u8> = self
                .mask
                .data
                .iter()
                .flat_map(|&m| [255, 0, 0, (m as u32 * 140 / 255) as u8])
                .collect();
            let color = egui::ColorImage::from_rgba_unmultiplied(
                [self.mask.width, self.mask.height],
                &rgba,
            );
            match &mut self.overlay {
                Some(t) => t.set(color, egui::TextureOptions::NEAREST),
                None => {
                    self.overlay =
                        Some(ctx.load_texture("init mask", color, egui::TextureOptions::NEAREST))
                }
            }
            self.overlay_dirty = false;
        }
        self.overlay.as_ref().map(|t| t.id())
    }
}

/// Reads an image file (PNG, JPEG, WebP) as RGB, scaled down to [`MAX_SIDE`] if larger; the
/// error names the file.
pub fn load_image_file(path: &Path) -> Result<RgbImage, String> {
    let name = path.display();
    let img = image::ImageReader::open(path)
        .map_err(|e| format!("cannot open {name}: {e}"))?
        .with_guessed_format()
        .map_err(|e| format!("cannot read {name}: {e}"))?
        .decode()
        .map_err(|e| format!("{name} is not an image sd-studio can read (PNG, JPEG, WebP): {e}"))?;
    let mut rgb = img.to_rgb8();
    let (w, h) = rgb.dimensions();
    if w == 0 || h == 0 {
        return Err(format!("{name} is empty (0 pixels)"));
    }
    let long = w.max(h) as usize;
    if long > MAX_SIDE {
        let s = MAX_SIDE as f64 / long as f64;
        let (nw, nh) = (
            ((w as f64 * s).round() as u32).max(1),
            ((h as f64 * s).round() as u32).max(1),
        );
        rgb = image::imageops::resize(&rgb, nw, nh, image::imageops::FilterType::Triangle);
    }
    let (w, h) = rgb.dimensions();
    Ok(RgbImage {
        width: w as usize,
        height: h as usize,
        rgb: rgb.into_raw(),
    })
}

/// The job size for a picture: its own, scaled so the long side is at most 1024, in
/// multiples of 8 (at least 64).
pub fn size_from_image(w: usize, h: usize) -> (usize, usize) {
    let long = w.max(h).max(1) as f64;
    let s = (1024.0 / long).min(1.0);
    let fit = |v: usize| (((v as f64 * s) / 8.0).round() as usize * 8).clamp(64, 2048);
    (fit(w), fit(h))
}

/// Stamps discs of `radius` (image pixels) along the segment a→b with `value`.
pub fn paint_line(mask: &mut MaskImage, a: egui::Pos2, b: egui::Pos2, radius: f32, value: u8) {
    let radius = radius.max(0.5);
    let len = a.distance(b);
    let steps = (len / (radius * 0.5)).ceil().max(1.0) as usize;
    for i in 0..=steps {
        let p = a.lerp(b, i as f32 / steps as f32);
        stamp(mask, p, radius, value);
    }
}

fn stamp(mask: &mut MaskImage, c: egui::Pos2, r: f32, value: u8) {
    let (w, h) = (mask.width as i64, mask.height as i64);
    let x0 = ((c.x - r).floor() as i64).max(0);
    let x1 = ((c.x + r).ceil() as i64).min(w - 1);
    let y0 = ((c.y - r).floor() as i64).max(0);
    let y1 = ((c.y + r).ceil() as i64).min(h - 1);
    for y in y0..=y1 {
        for x in x0..=x1 {
            let (dx, dy) = (x as f32 + 0.5 - c.x, y as f32 + 0.5 - c.y);
            if dx * dx + dy * dy <= r * r {
                mask.data[(y * w + x) as usize] = value;
            }
        }
    }
}

/// The panel. `drop_rect` receives its area (a file dropped there becomes the init image);
/// `files_hovering` highlights it while files are dragged over the window.
pub fn img2img_ui(
    ui: &mut egui::Ui,
    init: &mut Option<InitState>,
    p: &mut Params,
    s: &mut Settings,
    open: &mut bool,
    files_hovering: bool,
    drop_rect: &mut Option<egui::Rect>,
) -> Vec<UiCommand> {
    let mut out = Vec::new();
    let title = match init {
        Some(i) if i.has_mask() => "Image input (inpainting)",
        Some(_) => "Image input (img2img)",
        None => "Image input (img2img)",
    };
    let scope = ui.scope(|ui| {
        let header = egui::CollapsingHeader::new(title)
            .id_salt("img2img")
            .open((*open).then_some(true))
            .show(ui, |ui| body_ui(ui, init, p, s, &mut out));
        *open = false;
        header.header_response
    });
    drop_target(ui, scope.response.rect, files_hovering, drop_rect);
    out
}

/// A panel that takes dropped files: remembers its area and outlines it while files are
/// dragged over the window.
pub fn drop_target(
    ui: &egui::Ui,
    rect: egui::Rect,
    files_hovering: bool,
    drop_rect: &mut Option<egui::Rect>,
) {
    *drop_rect = Some(rect);
    if files_hovering {
        ui.painter().rect_stroke(
            rect,
            4.0,
            egui::Stroke::new(2.0, ui.visuals().selection.stroke.color),
            egui::StrokeKind::Outside,
        );
    }
}

fn body_ui(
    ui: &mut egui::Ui,
    init: &mut Option<InitState>,
    p: &mut Params,
    s: &mut Settings,
    out: &mut Vec<UiCommand>,
) {
    ui.horizontal(|ui| {
        if ui
            .button("Pick…")
            .on_hover_text("Choose the init image (or drop one on this panel)")
            .clicked()
        {
            out.push(UiCommand::PickInitImage);
        }
        if ui
            .add_enabled(init.is_some(), egui::Button::new("Clear"))
            .on_hover_text("Back to txt2img")
            .clicked()
        {
            out.push(UiCommand::ClearInit);
        }
        if let Some(i) = init {
            if ui
                .button("Size from image")
                .on_hover_text("Set width and height to the picture's (multiples of 8)")
                .clicked()
            {
                (p.width, p.height) = size_from_image(i.image.width, i.image.height);
            }
        }
        match init {
            Some(i) => ui.label(format!("{} · {}×{}", i.name, i.image.width, i.image.height)),
            None => ui.label(egui::RichText::new("drop an image here").weak()),
        };
    });
    ui.horizontal(|ui| {
        let label = ui.label("Denoising strength");
        ui.add(egui::Slider::new(&mut p.denoising_strength, 0.0..=1.0).step_by(0.01))
            .labelled_by(label.id)
            .on_hover_text("0 keeps the picture, 1 ignores it");
    });
    let Some(i) = init else { return };
    ui.horizontal(|ui| {
        let label = ui.label("Brush");
        ui.add(egui::Slider::new(&mut s.brush_size, 2.0..=200.0).logarithmic(true))
            .labelled_by(label.id);
    });
    ui.horizontal(|ui| {
        ui.radio_value(&mut i.erase, false, "Paint");
        ui.radio_value(&mut i.erase, true, "Erase");
        if ui
            .add_enabled(i.has_mask(), egui::Button::new("Clear mask"))
            .clicked()
        {
            i.clear_mask();
        }
    });
    canvas_ui(ui, i, s.brush_size);
    ui.label(
        egui::RichText::new(if i.has_mask() {
            "inpainting: red areas are repainted"
        } else {
            "paint a mask to inpaint only part of the picture"
        })
        .small()
        .weak(),
    );
}

/// The picture with the mask overlay; dragging paints (or erases).
fn canvas_ui(ui: &mut egui::Ui, i: &mut InitState, brush: f32) {
    let (w, h) = (i.image.width as f32, i.image.height as f32);
    let width = ui.available_width().clamp(64.0, 400.0);
    let scale = (width / w).min(360.0 / h);
    let (rect, resp) =
        ui.allocate_exact_size(egui::vec2(w * scale, h * scale), egui::Sense::drag());
    resp.widget_info(|| egui::WidgetInfo::labeled(egui::Role::Image, true, "Mask canvas"));
    let uv = egui::Rect::from_min_max(egui::pos2(0.0, 0.0), egui::pos2(1.0, 1.0));
    let painter = ui.painter_at(rect);
    painter.image(i.texture.id(), rect, uv, egui::Color32::WHITE);
    let to_image = |pos: egui::Pos2| {
        let v = (pos - rect.min) / scale;
        egui::pos2(v.x, v.y)
    };
    let radius = brush * 0.5 / scale;
    if resp.dragged() || resp.drag_started() {
        if let Some(pos) = resp.interact_pointer_pos() {
            let here = to_image(pos);
            // A new stroke starts where the button went down.
            let origin = ui
                .input(|inp| inp.pointer.press_origin())
                .filter(|o| rect.contains(*o))
                .map(to_image);
            let from = i.last.or(origin).unwrap_or(here);
            let value = if i.erase { 0 } else { 255 };
            paint_line(&mut i.mask, from, here, radius, value);
            i.last = Some(here);
            i.overlay_dirty = true;
        }
    } else {
        i.last = None;
    }
    if let Some(id) = i.overlay(ui.ctx()) {
        painter.image(id, rect, uv, egui::Color32::WHITE);
    }
    if let Some(pos) = resp.hover_pos() {
        painter.circle_stroke(
            pos,
            brush * 0.5,
            egui::Stroke::new(1.0, egui::Color32::from_white_alpha(200)),
        );
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_stroke_paints_the_pixels_it_crosses_and_nothing_far_away() {
        let mut m = MaskImage {
            width: 40,
            height: 20,
            data: vec![0; 800],
        };
        paint_line(
            &mut m,
            egui::pos2(5.0, 10.0),
            egui::pos2(35.0, 10.0),
            3.0,
            255,
        );
        for x in 5..35 {
            assert_eq!(m.data[10 * 40 + x], 255, "x={x}");
        }
        assert_eq!(m.data[0], 0);
        assert_eq!(m.data[19 * 40 + 39], 0);
        paint_line(
            &mut m,
            egui::pos2(20.0, 10.0),
            egui::pos2(20.0, 10.0),
            2.0,
            0,
        );
        assert_eq!(m.data[10 * 40 + 20], 0, "erase");
        assert_eq!(m.data[10 * 40 + 30], 255);
    }

    #[test]
    fn size_from_image_keeps_the_aspect_in_multiples_of_8() {
        assert_eq!(size_from_image(640, 427), (640, 424));
        assert_eq!(size_from_image(4000, 3000), (1024, 768));
        assert_eq!(size_from_image(10, 10), (64, 64));
    }
}
