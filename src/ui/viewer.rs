//! The large view of one cell: zoom (scroll), pan (drag), double-click to fit, and actions.

use super::app::{Cell, CellStatus};
use super::commands::UiCommand;

/// Which cell is open and how it is zoomed.
#[derive(Debug, Clone, PartialEq)]
pub struct ViewerState {
    pub cell: usize,
    pub zoom: f32,
    pub pan: egui::Vec2,
}

impl ViewerState {
    pub fn new(cell: usize) -> Self {
        Self {
            cell,
            zoom: 1.0,
            pan: egui::Vec2::ZERO,
        }
    }
}

pub fn viewer_ui(ctx: &egui::Context, v: &mut ViewerState, cells: &[Cell]) -> Vec<UiCommand> {
    let mut out = Vec::new();
    let Some(c) = cells.get(v.cell) else {
        out.push(UiCommand::View(None));
        return out;
    };
    let modal = egui::Modal::new(egui::Id::unique("sd-studio viewer")).show(ctx, |ui| {
        let screen = ui.ctx().content_rect().size();
        ui.set_width((screen.x * 0.8).max(300.0));
        ui.horizontal(|ui| {
            ui.strong(super::grid::cell_caption(v.cell, c));
            ui.label(format!("zoom {:.0}%", v.zoom * 100.0));
        });
        let side = (screen.y * 0.7).max(200.0);
        let (rect, resp) = ui.allocate_exact_size(
            egui::vec2(ui.available_width(), side),
            egui::Sense::click_and_drag(),
        );
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
        let painter = ui.painter_at(rect);
        painter.rect_filled(rect, 0.0, ui.visuals().extreme_bg_color);
        if let Some(t) = &c.texture {
            let [w, h] = t.size();
            let fit = (rect.width() / w as f32).min(rect.height() / h as f32);
            let size = egui::vec2(w as f32, h as f32) * fit * v.zoom;
            let r = egui::Rect::from_center_size(rect.center() + v.pan, size);
            painter.image(
                t.id(),
                r,
                egui::Rect::from_min_max(egui::pos2(0.0, 0.0), egui::pos2(1.0, 1.0)),
                egui::Color32::WHITE,
            );
        }
        let done = c.status == CellStatus::Done;
        ui.horizontal(|ui| {
            if let Some(seed) = c.seed {
                if ui.button("Use this seed").clicked() {
                    out.push(UiCommand::UseSeed(seed));
                }
                if ui.button("Regenerate this cell").clicked() {
                    out.push(UiCommand::RegenerateCell(v.cell));
                }
            }
            if ui
                .add_enabled(done, egui::Button::new("Save as…"))
                .clicked()
            {
                out.push(UiCommand::SaveAs(v.cell));
            }
            if ui
                .add_enabled(done, egui::Button::new("Copy parameters"))
                .clicked()
            {
                out.push(UiCommand::CopyParameters(v.cell));
            }
            if let Some(p) = &c.path {
                ui.label(egui::RichText::new(p.display().to_string()).small());
            }
            if ui.button("Close").clicked() {
                out.push(UiCommand::View(None));
            }
        });
    });
    if modal.should_close() && !out.contains(&UiCommand::View(None)) {
        out.push(UiCommand::View(None));
    }
    out
}
