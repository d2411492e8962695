//! The 2×4 grid (or one row per model in compare mode): each cell shows its live preview, then the final image, with its seed and
//! progress. Clicking a cell opens the large view.

use super::app::{Cell, CellStatus};
use super::commands::UiCommand;
use super::compare::GridLayout;

/// The caption under a cell, also its accessible label: "Cell 3: seed 1002, step 5/20".
pub fn cell_caption(i: usize, c: &Cell) -> String {
    let seed = c
        .seed
        .map(|s| format!("seed {s}"))
        .unwrap_or_else(|| "no seed".into());
    let status = match c.status {
        CellStatus::Empty => "empty".to_string(),
        CellStatus::Waiting => "waiting".to_string(),
        CellStatus::Running { step, total } => format!("step {step}/{total}"),
        CellStatus::Decoding => "decoding".to_string(),
        CellStatus::Done => "done".to_string(),
        CellStatus::Cancelled => "stopped".to_string(),
        CellStatus::Failed => "failed".to_string(),
    };
    format!("Cell {}: {seed}, {status}", i + 1)
}

/// The grid: 2×4, or in compare mode one row per model (labelled "Row 1: <model>") and one
/// column per seed. Right-click a finished cell for its actions.
pub fn grid_ui(ui: &mut egui::Ui, cells: &[Cell], layout: &GridLayout) -> Vec<UiCommand> {
    let mut out = Vec::new();
    let avail = ui.available_size();
    let gap = 6.0;
    let caption = 18.0;
    let rows = layout.rows().max(1);
    let cols = layout.cols.max(1);
    let row_label = if layout.is_compare() { 20.0 } else { 0.0 };
    let side = ((avail.x - (cols as f32 - 1.0) * gap) / cols as f32)
        .min((avail.y - rows as f32 * (caption + row_label + gap)) / rows as f32)
        .max(48.0);
    for row in 0..rows {
        if let Some(label) = layout.row_label(row) {
            ui.label(egui::RichText::new(label).strong())
                .on_hover_text(layout.models.get(row).cloned().unwrap_or_default());
        }
        ui.horizontal(|ui| {
            ui.spacing_mut().item_spacing.x = gap;
            for col in 0..cols {
                let Some(i) = layout.cell(row, col) else {
                    continue;
                };
                let Some(c) = cells.get(i) else { continue };
                ui.vertical(|ui| {
                    ui.set_width(side);
                    cell_ui(ui, i, c, side, &mut out);
                });
            }
        });
        ui.add_space(gap);
    }
    out
}

fn cell_ui(ui: &mut egui::Ui, i: usize, c: &Cell, side: f32, out: &mut Vec<UiCommand>) {
    let (rect, resp) = ui.allocate_exact_size(egui::vec2(side, side), egui::Sense::click());
    let label = cell_caption(i, c);
    resp.widget_info(|| egui::WidgetInfo::labeled(egui::Role::Button, true, &label));
    let painter = ui.painter_at(rect);
    painter.rect_filled(rect, 4.0, ui.visuals().extreme_bg_color);
    if let Some(t) = &c.texture {
        let [w, h] = t.size();
        let s = (side / w as f32).min(side / h as f32);
        let r = egui::Rect::from_center_size(rect.center(), egui::vec2(w as f32 * s, h as f32 * s));
        painter.image(
            t.id(),
            r,
            egui::Rect::from_min_max(egui::pos2(0.0, 0.0), egui::pos2(1.0, 1.0)),
            egui::Color32::WHITE,
        );
    }
    if let CellStatus::Running { step, total } = c.status {
        let frac = step as f32 / total.max(1) as f32;
        let bar = egui::Rect::from_min_size(
            rect.left_bottom() - egui::vec2(0.0, 4.0),
            egui::vec2(rect.width() * frac, 4.0),
        );
        painter.rect_filled(bar, 0.0, ui.visuals().selection.bg_fill);
    }
    if resp.hovered() {
        painter.rect_stroke(
            rect,
            4.0,
            ui.visuals().selection.stroke,
            egui::StrokeKind::Inside,
        );
    }
    if resp.clicked() && c.seed.is_some() {
        out.push(UiCommand::View(Some(i)));
    }
    if c.status == CellStatus::Done {
        resp.context_menu(|ui| {
            if ui.button("Send to img2img").clicked() {
                out.push(UiCommand::SendToImg2img(i));
                ui.close();
            }
            if let Some(seed) = c.seed {
                if ui.button("Use this seed").clicked() {
                    out.push(UiCommand::UseSeed(seed));
                    ui.close();
                }
                if ui
                    .button("Vary around this")
                    .on_hover_text("This image in the first cell, close variations around it")
                    .clicked()
                {
                    out.push(UiCommand::VaryAround(i));
                    ui.close();
                }
            }
            if c.path.is_none()
                && ui
                    .button("Keep")
                    .on_hover_text("Save this live image into the output folder and the history")
                    .clicked()
            {
                out.push(UiCommand::Keep(i));
                ui.close();
            }
            if ui.button("Save as…").clicked() {
                out.push(UiCommand::SaveAs(i));
                ui.close();
            }
            if ui.button("Copy parameters").clicked() {
                out.push(UiCommand::CopyParameters(i));
                ui.close();
            }
        });
    }
    ui.label(egui::RichText::new(label).small());
}
