//! The large view of one cell: zoom (scroll), pan (drag), double-click to fit, and actions.
//! In compare mode it shows the same seed drawn by two models: side by side with synced zoom
//! and pan, a wipe (a split line between the two), flicker, or their amplified difference.

use super::app::{Cell, CellStatus};
use super::commands::UiCommand;
use super::compare::GridLayout;
use crate::protocol::RgbImage;

/// How two models' images are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareMode {
    SideBySide,
    Wipe,
    Flicker,
    Difference,
}

impl CompareMode {
    pub const ALL: [CompareMode; 4] = [
        CompareMode::SideBySide,
        CompareMode::Wipe,
        CompareMode::Flicker,
        CompareMode::Difference,
    ];

    pub fn label(self) -> &'static str {
        match self {
            CompareMode::SideBySide => "Side by side",
            CompareMode::Wipe => "Wipe",
            CompareMode::Flicker => "Flicker",
            CompareMode::Difference => "Difference",
        }
    }
}

/// |a − b| per channel, times `amplify`, clamped; with the largest and mean difference.
pub fn difference(a: &RgbImage, b: &RgbImage, amplify: f32) -> Option<(RgbImage, u8, f32)> {
    if a.width != b.width || a.height != b.height || a.rgb.len() != b.rgb.len() {
        return None;
    }
    let mut max = 0u8;
    let mut sum = 0u64;
    let rgb = a
        .rgb
        .iter()
        .zip(&b.rgb)
        .map(|(&x, &y)| {
            let d = x.abs_diff(y);
            max = max.max(d);
            sum += u64::from(d);
            (f32::from(d) * amplify).min(255.0) as u8
        })
        .collect();
    let mean = sum as f32 / a.rgb.len().max(1) as f32;
    Some((
        RgbImage {
            width: a.width,
            height: a.height,
            rgb,
        },
        max,
        mean,
    ))
}

struct DiffCache {
    key: (usize, usize, u32),
    texture: Option<egui::TextureHandle>,
    /// "max 37 · mean 4.2", or why there is none.
    text: String,
}

/// The two rows compared and how.
pub struct CompareView {
    pub row_a: usize,
    pub row_b: usize,
    pub mode: CompareMode,
    /// Wipe split, 0 (all B) .. 1 (all A).
    pub wipe: f32,
    pub amplify: f32,
    diff: Option<DiffCache>,
}

/// Which cell is open and how it is zoomed.
pub struct ViewerState {
    pub cell: usize,
    pub zoom: f32,
    pub pan: egui::Vec2,
    pub compare: CompareView,
}

impl ViewerState {
    pub fn new(cell: usize, layout: &GridLayout) -> Self {
        let (row, _) = layout.row_col(cell);
        let row_b = if row == 0 { 1 } else { 0 };
        Self {
            cell,
            zoom: 1.0,
            pan: egui::Vec2::ZERO,
            compare: CompareView {
                row_a: row,
                row_b,
                mode: CompareMode::SideBySide,
                wipe: 0.5,
                amplify: 4.0,
                diff: None,
            },
        }
    }
}

/// The image rectangle for a texture fitted in `area`, zoomed and panned.
fn placed(t: &egui::TextureHandle, area: egui::Rect, zoom: f32, pan: egui::Vec2) -> egui::Rect {
    let [w, h] = t.size();
    let fit = (area.width() / w as f32).min(area.height() / h as f32);
    let size = egui::vec2(w as f32, h as f32) * fit * zoom;
    egui::Rect::from_center_size(area.center() + pan, size)
}

const FULL_UV: egui::Rect = egui::Rect::from_min_max(egui::pos2(0.0, 0.0), egui::pos2(1.0, 1.0));

/// Zoom with the wheel or pinch, pan by dragging, double-click resets.
fn zoom_pan(ui: &egui::Ui, resp: &egui::Response, v: &mut ViewerState) {
    if resp.dragged() {
        v.pan += resp.drag_delta();
    }
    if resp.hovered() {
        let scroll = ui.input(|i| i.smooth_scroll_delta.y);
        let pinch = ui.input(|i| i.zoom_delta());
        let factor = pinch * (scroll / 200.0).exp();
        v.zoom = (v.zoom * factor).clamp(0.1, 16.0);
    }
    if resp.double_clicked() {
        v.zoom = 1.0;
        v.pan = egui::Vec2::ZERO;
    }
}

pub fn viewer_ui(
    ctx: &egui::Context,
    v: &mut ViewerState,
    cells: &[Cell],
    layout: &GridLayout,
) -> Vec<UiCommand> {
    let mut out = Vec::new();
    if cells.get(v.cell).is_none() {
        out.push(UiCommand::View(None));
        return out;
    }
    let compare = layout.is_compare() && layout.rows() >= 2;
    let modal = egui::Modal::new(egui::Id::unique("sd-studio viewer")).show(ctx, |ui| {
        let screen = ui.ctx().content_rect().size();
        ui.set_width((screen.x * 0.8).max(300.0));
        let side = (screen.y * if compare { 0.6 } else { 0.7 }).max(200.0);
        if compare {
            compare_body_ui(ui, v, cells, layout, side);
        } else {
            single_body_ui(ui, v, cells, side);
        }
        if let Some(c) = cells.get(v.cell) {
            actions_ui(ui, v.cell, c, &mut out);
        }
    });
    if modal.should_close() && !out.contains(&UiCommand::View(None)) {
        out.push(UiCommand::View(None));
    }
    out
}

/// The zoomable, pannable area the large view draws in, cleared: its rect, response and
/// painter.
fn canvas(
    ui: &mut egui::Ui,
    v: &mut ViewerState,
    side: f32,
) -> (egui::Rect, egui::Response, egui::Painter) {
    let (rect, resp) = ui.allocate_exact_size(
        egui::vec2(ui.available_width(), side),
        egui::Sense::click_and_drag(),
    );
    zoom_pan(ui, &resp, v);
    let painter = ui.painter_at(rect);
    painter.rect_filled(rect, 0.0, ui.visuals().extreme_bg_color);
    (rect, resp, painter)
}

fn single_body_ui(ui: &mut egui::Ui, v: &mut ViewerState, cells: &[Cell], side: f32) {
    let Some(c) = cells.get(v.cell) else { return };
    ui.horizontal(|ui| {
        ui.strong(super::grid::cell_caption(v.cell, c));
        ui.label(format!("zoom {:.0}%", v.zoom * 100.0));
    });
    let (rect, _, painter) = canvas(ui, v, side);
    if let Some(t) = &c.texture {
        painter.image(
            t.id(),
            placed(t, rect, v.zoom, v.pan),
            FULL_UV,
            egui::Color32::WHITE,
        );
    }
}

fn row_picker_ui(ui: &mut egui::Ui, name: &str, row: &mut usize, layout: &GridLayout) {
    let label = ui.label(name);
    egui::ComboBox::from_id_salt(format!("compare {name}"))
        .selected_text(layout.row_label(*row).unwrap_or_default())
        .show_ui(ui, |ui| {
            for r in 0..layout.rows() {
                ui.selectable_value(row, r, layout.row_label(r).unwrap_or_default());
            }
        })
        .response
        .labelled_by(label.id);
}

fn compare_body_ui(
    ui: &mut egui::Ui,
    v: &mut ViewerState,
    cells: &[Cell],
    layout: &GridLayout,
    side: f32,
) {
    let (_, col) = layout.row_col(v.cell);
    let rows = layout.rows();
    {
        let cv = &mut v.compare;
        cv.row_a = cv.row_a.min(rows - 1);
        cv.row_b = cv.row_b.min(rows - 1);
    }
    let seed = cells.get(v.cell).and_then(|c| c.seed);
    ui.horizontal(|ui| {
        ui.strong(match seed {
            Some(s) => format!("Seed {s} · column {}", col + 1),
            None => format!("Column {}", col + 1),
        });
        ui.label(format!("zoom {:.0}%", v.zoom * 100.0));
    });
    ui.horizontal(|ui| {
        if rows > 2 {
            row_picker_ui(ui, "Left", &mut v.compare.row_a, layout);
            row_picker_ui(ui, "Right", &mut v.compare.row_b, layout);
        } else {
            ui.label(format!(
                "Left: {}   Right: {}",
                layout.row_label(v.compare.row_a).unwrap_or_default(),
                layout.row_label(v.compare.row_b).unwrap_or_default()
            ));
        }
        if ui.button("Swap").clicked() {
            let cv = &mut v.compare;
            std::mem::swap(&mut cv.row_a, &mut cv.row_b);
        }
    });
    ui.horizontal(|ui| {
        for m in CompareMode::ALL {
            ui.radio_value(&mut v.compare.mode, m, m.label());
        }
        match v.compare.mode {
            CompareMode::Wipe => {
                let label = ui.label("Split");
                ui.add(egui::Slider::new(&mut v.compare.wipe, 0.0..=1.0).show_value(false))
                    .labelled_by(label.id);
            }
            CompareMode::Difference => {
                let label = ui.label("Amplify");
                ui.add(egui::Slider::new(&mut v.compare.amplify, 1.0..=32.0).logarithmic(true))
                    .labelled_by(label.id);
            }
            _ => {}
        }
    });
    let (Some(ca), Some(cb)) = (
        layout.cell(v.compare.row_a, col),
        layout.cell(v.compare.row_b, col),
    ) else {
        return;
    };
    // The actions below act on the left image's cell.
    v.cell = ca;
    let (a, b) = (cells.get(ca), cells.get(cb));
    let tex = |c: Option<&Cell>| c.and_then(|c| c.texture.clone());
    let (ta, tb) = (tex(a), tex(b));
    let label_a = layout.row_label(v.compare.row_a).unwrap_or_default();
    let label_b = layout.row_label(v.compare.row_b).unwrap_or_default();
    let (rect, resp, painter) = canvas(ui, v, side);
    let (zoom, pan) = (v.zoom, v.pan);
    let draw = |p: &egui::Painter, t: &Option<egui::TextureHandle>, area: egui::Rect| {
        if let Some(t) = t {
            p.image(
                t.id(),
                placed(t, area, zoom, pan),
                FULL_UV,
                egui::Color32::WHITE,
            );
        }
    };
    // White text on a dark band, readable over any image.
    let caption = |p: &egui::Painter, pos: egui::Pos2, align: egui::Align2, text: &str| {
        let galley = p.layout_no_wrap(
            text.to_string(),
            egui::FontId::proportional(13.0),
            egui::Color32::WHITE,
        );
        let r = align.anchor_size(pos, galley.size()).expand(3.0);
        let r = r.translate(egui::vec2(
            if align.x() == egui::Align::Max {
                -3.0
            } else {
                3.0
            },
            3.0,
        ));
        p.rect_filled(r, 3.0, egui::Color32::from_black_alpha(170));
        p.galley(r.shrink(3.0).min, galley, egui::Color32::WHITE);
    };
    match v.compare.mode {
        CompareMode::SideBySide => {
            let half = rect.width() / 2.0;
            let left = egui::Rect::from_min_size(rect.min, egui::vec2(half - 2.0, rect.height()));
            let right = egui::Rect::from_min_size(
                rect.min + egui::vec2(half + 2.0, 0.0),
                egui::vec2(half - 2.0, rect.height()),
            );
            draw(&ui.painter_at(left), &ta, left);
            draw(&ui.painter_at(right), &tb, right);
            caption(&painter, left.left_top(), egui::Align2::LEFT_TOP, &label_a);
            caption(&painter, right.left_top(), egui::Align2::LEFT_TOP, &label_b);
        }
        CompareMode::Wipe => {
            let split = rect.left() + rect.width() * v.compare.wipe;
            let left = egui::Rect::from_min_max(rect.min, egui::pos2(split, rect.bottom()));
            let right = egui::Rect::from_min_max(egui::pos2(split, rect.top()), rect.max);
            draw(&ui.painter_at(left), &ta, rect);
            draw(&ui.painter_at(right), &tb, rect);
            painter.vline(
                split,
                rect.y_range(),
                egui::Stroke::new(2.0, egui::Color32::WHITE),
            );
            caption(&painter, rect.left_top(), egui::Align2::LEFT_TOP, &label_a);
            caption(
                &painter,
                rect.right_top(),
                egui::Align2::RIGHT_TOP,
                &label_b,
            );
        }
        CompareMode::Flicker => {
            let t = ui.input(|i| i.time);
            let show_b = (t / 0.6) as i64 % 2 == 1;
            ui.ctx()
                .request_repaint_after(std::time::Duration::from_millis(100));
            draw(&painter, if show_b { &tb } else { &ta }, rect);
            let l = if show_b { &label_b } else { &label_a };
            caption(&painter, rect.left_top(), egui::Align2::LEFT_TOP, l);
        }
        CompareMode::Difference => {
            let key = (ca, cb, v.compare.amplify.to_bits());
            let stale = v.compare.diff.as_ref().is_none_or(|d| d.key != key);
            if stale {
                let images = (
                    a.and_then(|c| c.image.as_ref()),
                    b.and_then(|c| c.image.as_ref()),
                );
                v.compare.diff = Some(match images {
                    (Some(ia), Some(ib)) => match difference(ia, ib, v.compare.amplify) {
                        Some((d, max, mean)) => DiffCache {
                            key,
                            texture: Some(ui.ctx().load_texture(
                                "compare difference",
                                egui::ColorImage::from_rgb([d.width, d.height], &d.rgb),
                                egui::TextureOptions::LINEAR,
                            )),
                            text: format!("difference: max {max} · mean {mean:.1}"),
                        },
                        None => DiffCache {
                            key,
                            texture: None,
                            text: "the two images differ in size".into(),
                        },
                    },
                    _ => DiffCache {
                        key: (usize::MAX, usize::MAX, 0),
                        texture: None,
                        text: "both images must be finished".into(),
                    },
                });
            }
            if let Some(d) = &v.compare.diff {
                draw(&painter, &d.texture, rect);
                caption(&painter, rect.left_top(), egui::Align2::LEFT_TOP, &d.text);
                ui.label(&d.text);
            }
        }
    }
    resp.widget_info(|| {
        egui::WidgetInfo::labeled(
            egui::Role::Image,
            true,
            format!("{}: {label_a} | {label_b}", v.compare.mode.label()),
        )
    });
}

fn actions_ui(ui: &mut egui::Ui, i: usize, c: &Cell, out: &mut Vec<UiCommand>) {
    let done = c.status == CellStatus::Done;
    ui.horizontal(|ui| {
        if let Some(seed) = c.seed {
            if ui.button("Use this seed").clicked() {
                out.push(UiCommand::UseSeed(seed));
            }
            if ui.button("Regenerate this cell").clicked() {
                out.push(UiCommand::RegenerateCell(i));
            }
            if ui
                .add_enabled(done, egui::Button::new("Vary around this"))
                .on_hover_text("This image in the first cell, close variations around it")
                .clicked()
            {
                out.push(UiCommand::VaryAround(i));
            }
        }
        if ui
            .add_enabled(done, egui::Button::new("Send to img2img"))
            .on_hover_text("Use this image as the init image")
            .clicked()
        {
            out.push(UiCommand::SendToImg2img(i));
        }
        if ui
            .add_enabled(done, egui::Button::new("Save as…"))
            .clicked()
        {
            out.push(UiCommand::SaveAs(i));
        }
        if ui
            .add_enabled(done, egui::Button::new("Copy parameters"))
            .clicked()
        {
            out.push(UiCommand::CopyParameters(i));
        }
        if let Some(p) = &c.path {
            ui.label(egui::RichText::new(p.display().to_string()).small());
        }
        if ui.button("Close").clicked() {
            out.push(UiCommand::View(None));
        }
    });
}
