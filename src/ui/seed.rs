//! Seed field, dice, lock, the per-cell seed mode, and A1111's variation seed and strength.

use super::commands::UiCommand;
use super::state::{Params, SeedMode};

/// Seed controls. Unlocked, every Generate rolls a new seed; locked, it stays.
pub fn seed_ui(ui: &mut egui::Ui, p: &mut Params) -> Vec<UiCommand> {
    let out = Vec::new();
    ui.horizontal(|ui| {
        let label = ui.label("Seed");
        ui.add(
            egui::DragValue::new(&mut p.seed)
                .range(0..=u32::MAX as u64)
                .speed(1.0),
        )
        .labelled_by(label.id);
        if ui.button("Dice").on_hover_text("Random seed").clicked() {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(p.seed);
            p.seed = h.finish() & 0xffff_ffff;
        }
        ui.checkbox(&mut p.seed_locked, "Lock seed").on_hover_text(
            "Locked: keep this seed for every Generate. Unlocked: a new random seed each time.",
        );
    });
    ui.horizontal(|ui| {
        ui.label("Cells:");
        ui.radio_value(&mut p.seed_mode, SeedMode::Increment, "seed + i");
        ui.radio_value(&mut p.seed_mode, SeedMode::Same, "same seed");
    });
    ui.horizontal(|ui| {
        let label = ui.label("Variation seed");
        ui.add(
            egui::DragValue::new(&mut p.variation_seed)
                .range(0..=u32::MAX as u64)
                .speed(1.0),
        )
        .labelled_by(label.id)
        .on_hover_text("A1111's variation seed: cell i blends in seed + i's noise");
        let label = ui.label("strength");
        ui.add(egui::Slider::new(&mut p.variation_strength, 0.0..=1.0).fixed_decimals(2))
            .labelled_by(label.id)
            .on_hover_text("0: off (the main seed alone); 1: the variation seed's image");
    });
    out
}
