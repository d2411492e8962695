//! Compare mode: 2–4 models draw the same prompt and seeds, one grid row per model, one
//! column per seed (2 models × 4 seeds, 3–4 models × 2 seeds). The panel edits the model
//! list; [`plan`] turns it into one job's seeds, cells and `model_of`.

use super::commands::UiCommand;
use super::state::{CompareSettings, SeedMode};
use crate::protocol::GRID_CELLS;

/// Fewest and most models compared at once.
pub const MIN_MODELS: usize = 2;
pub const MAX_MODELS: usize = 4;

/// How the grid is laid out: plain 2×4, or one labelled row per compared model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GridLayout {
    /// The models of the rows (as sent in `JobRequest::models`); empty: plain grid.
    pub models: Vec<String>,
    /// Cells per row (cell = row × cols + col).
    pub cols: usize,
}

impl Default for GridLayout {
    fn default() -> Self {
        Self::plain()
    }
}

impl GridLayout {
    /// The plain 2×4 grid.
    pub fn plain() -> Self {
        Self {
            models: Vec::new(),
            cols: 4,
        }
    }

    pub fn is_compare(&self) -> bool {
        !self.models.is_empty()
    }

    /// Rows shown.
    pub fn rows(&self) -> usize {
        if self.is_compare() {
            self.models.len()
        } else {
            GRID_CELLS / self.cols.max(1)
        }
    }

    /// (row, column) of a cell.
    pub fn row_col(&self, cell: usize) -> (usize, usize) {
        let cols = self.cols.max(1);
        (cell / cols, cell % cols)
    }

    /// The cell at (row, column), if the layout has it.
    pub fn cell(&self, row: usize, col: usize) -> Option<usize> {
        (row < self.rows() && col < self.cols).then_some(row * self.cols + col)
    }

    /// The row's label: "Row 1: sd15.safetensors"; `None` in the plain grid.
    pub fn row_label(&self, row: usize) -> Option<String> {
        let labels = crate::protocol::distinct_labels(&self.models, model_label);
        labels.get(row).map(|m| format!("Row {}: {m}", row + 1))
    }
}

/// A short name for a model spec: the file or folder name, or the hub id as it is.
pub fn model_label(spec: &str) -> String {
    let spec = spec.trim().trim_end_matches(['/', '\\']);
    let path = std::path::Path::new(spec);
    // Hub ids are `owner/name`; anything else with a separator is a path (no disk access:
    // this runs every frame).
    let looks_like_path = spec.starts_with(['/', '.', '~'])
        || spec.contains('\\')
        || spec.contains(':')
        || spec.matches('/').count() > 1
        || [".safetensors", ".ckpt", ".pt", ".bin"]
            .iter()
            .any(|e| spec.to_ascii_lowercase().ends_with(e));
    if looks_like_path {
        if let Some(name) = path.file_name() {
            return name.to_string_lossy().into_owned();
        }
    }
    spec.to_string()
}

/// One compare job: which model, seed and cell each image has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComparePlan {
    pub models: Vec<String>,
    pub seeds: Vec<u64>,
    pub cells: Vec<usize>,
    pub model_of: Vec<usize>,
    pub layout: GridLayout,
}

/// Seeds per model: up to `count`, as many as fit in the grid (4 for 2 models, else 2).
pub fn columns(models: usize, count: usize) -> usize {
    (GRID_CELLS / models.max(1)).min(count.max(1)).max(1)
}

/// Plans a compare job: row r draws `models[r]`, column c uses `seed + c` (or `seed` in
/// same-seed mode). Blank rows are skipped; fewer than 2 or more than 4 models is an error.
pub fn plan(
    settings: &CompareSettings,
    count: usize,
    seed: u64,
    mode: SeedMode,
) -> Result<ComparePlan, String> {
    let models: Vec<String> = settings
        .models
        .iter()
        .map(|m| m.trim().to_string())
        .filter(|m| !m.is_empty())
        .collect();
    if models.len() < MIN_MODELS || models.len() > MAX_MODELS {
        return Err(format!(
            "compare mode needs {MIN_MODELS} to {MAX_MODELS} models (hub id, folder or \
             .safetensors file), not {}; fill in the rows under Compare models or turn \
             compare mode off",
            models.len()
        ));
    }
    let cols = columns(models.len(), count);
    let mut plan = ComparePlan {
        models: models.clone(),
        seeds: Vec::new(),
        cells: Vec::new(),
        model_of: Vec::new(),
        layout: GridLayout { models, cols },
    };
    for row in 0..plan.models.len() {
        for col in 0..cols {
            plan.seeds.push(match mode {
                SeedMode::Increment => seed.wrapping_add(col as u64),
                SeedMode::Same => seed,
            });
            plan.cells.push(row * cols + col);
            plan.model_of.push(row);
        }
    }
    Ok(plan)
}

/// The compare panel: on/off, one field per model with File… / Folder…, add and remove rows.
pub fn compare_ui(ui: &mut egui::Ui, c: &mut CompareSettings, count: usize) -> Vec<UiCommand> {
    let mut out = Vec::new();
    egui::CollapsingHeader::new("Compare models")
        .id_salt("compare")
        .show(ui, |ui| {
            ui.checkbox(&mut c.enabled, "Compare mode").on_hover_text(
                "Generate draws the same prompt and seeds with each model: one row per model",
            );
            while c.models.len() < MIN_MODELS {
                c.models.push(String::new());
            }
            let mut remove = None;
            let rows = c.models.len();
            for (i, m) in c.models.iter_mut().enumerate() {
                ui.horizontal(|ui| {
                    let label = ui.label(format!("Model {}", i + 1));
                    ui.add(
                        egui::TextEdit::singleline(m)
                            .hint_text("hub id, folder or .safetensors")
                            .desired_width(150.0),
                    )
                    .labelled_by(label.id);
                    if ui
                        .small_button("File…")
                        .on_hover_text("Choose a .safetensors checkpoint")
                        .clicked()
                    {
                        out.push(UiCommand::BrowseCompareModel {
                            row: i,
                            folder: false,
                        });
                    }
                    if ui
                        .small_button("Folder…")
                        .on_hover_text("Choose a diffusers model folder")
                        .clicked()
                    {
                        out.push(UiCommand::BrowseCompareModel {
                            row: i,
                            folder: true,
                        });
                    }
                    if rows > MIN_MODELS {
                        let r = ui.small_button("Remove").on_hover_text("Remove this row");
                        let name = format!("Remove model {}", i + 1);
                        r.widget_info(|| {
                            egui::WidgetInfo::labeled(egui::Role::Button, true, &name)
                        });
                        if r.clicked() {
                            remove = Some(i);
                        }
                    }
                });
            }
            if let Some(i) = remove {
                c.models.remove(i);
            }
            ui.horizontal(|ui| {
                if ui
                    .add_enabled(
                        c.models.len() < MAX_MODELS,
                        egui::Button::new("Add model").small(),
                    )
                    .clicked()
                {
                    c.models.push(String::new());
                }
                let n = c.models.iter().filter(|m| !m.trim().is_empty()).count();
                let cols = columns(n.max(MIN_MODELS), count);
                ui.label(
                    egui::RichText::new(format!(
                        "{} models × {cols} seed{}",
                        n,
                        if cols == 1 { "" } else { "s" }
                    ))
                    .weak(),
                );
            });
        });
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_file_names_for_paths_and_hub_ids_as_they_are() {
        assert_eq!(
            model_label("runwayml/stable-diffusion-v1-5"),
            "runwayml/stable-diffusion-v1-5"
        );
        assert_eq!(
            model_label("/sd/models/dreamshaper_8.safetensors"),
            "dreamshaper_8.safetensors"
        );
        assert_eq!(model_label("models/sd15.safetensors"), "sd15.safetensors");
        assert_eq!(model_label("./tiny-sd15/"), "tiny-sd15");
    }

    #[test]
    fn plans_fill_one_row_per_model_within_the_grid() {
        let s = |m: &[&str]| CompareSettings {
            enabled: true,
            models: m.iter().map(|x| x.to_string()).collect(),
        };
        let p = plan(
            &s(&["a/b", "", "c/d", "e/f", "g/h"]),
            8,
            7,
            SeedMode::Increment,
        );
        assert_eq!(p.unwrap().models.len(), 4, "blank rows are skipped");
        let five = plan(
            &s(&["a/b", "c/d", "e/f", "g/h", "i/j"]),
            8,
            7,
            SeedMode::Same,
        );
        assert!(five.unwrap_err().contains("2 to 4 models"));
        let p = plan(&s(&["a/b", "c/d", "e/f", "g/h"]), 8, 7, SeedMode::Same).unwrap();
        assert_eq!(p.cells, (0..8).collect::<Vec<_>>());
        assert_eq!(p.model_of, vec![0, 0, 1, 1, 2, 2, 3, 3]);
        assert!(p.seeds.iter().all(|&s| s == 7));
        let p = plan(&s(&["a/b", "c/d"]), 3, 7, SeedMode::Increment).unwrap();
        assert_eq!(p.seeds, vec![7, 8, 9, 7, 8, 9]);
        assert_eq!(p.cells, vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(p.layout.cell(1, 0), Some(3));
        assert!(plan(&s(&["a/b", " "]), 8, 7, SeedMode::Increment).is_err());
    }
}
