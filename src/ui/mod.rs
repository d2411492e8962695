//! The studio window (eframe/egui). Never imports candle: it talks to the generation thread
//! only through [`crate::protocol`]. One file per panel; each `*_ui` function draws and
//! returns the [`UiCommand`]s the user asked for, which [`app::StudioApp`] applies once per
//! frame.

pub mod app;
pub mod commands;
pub mod compare;
pub mod control;
pub mod errors;
pub mod grid;
pub mod hires;
pub mod history;
pub mod img2img;
pub mod loras;
pub mod model_picker;
pub mod models_folder;
pub mod prompt;
pub mod queue;
pub mod sampling;
pub mod screenshot;
pub mod seed;
pub mod state;
pub mod status_bar;
pub mod viewer;

pub use app::{StudioApp, StudioOptions};
pub use commands::UiCommand;

/// Opens the studio window and returns when it closes.
pub fn run(options: StudioOptions) -> Result<(), String> {
    // Leave one core to the window so it never waits on candle's CPU kernels.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", n.saturating_sub(1).max(1).to_string());
    }
    let renderer = match options.renderer.as_str() {
        "glow" => eframe::Renderer::Glow,
        "wgpu" => eframe::Renderer::Wgpu,
        other => return Err(format!("renderer {other:?} is not wgpu or glow")),
    };
    let native = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("sd-studio")
            .with_inner_size([1280.0, 860.0])
            .with_min_inner_size([720.0, 480.0])
            .with_drag_and_drop(true),
        renderer,
        ..Default::default()
    };
    eframe::run_native(
        "sd-studio",
        native,
        Box::new(move |cc| {
            let ctx = cc.egui_ctx.clone();
            let waker: crate::protocol::Waker = std::sync::Arc::new(move || ctx.request_repaint());
            let (engine, worker) = crate::protocol::link(waker);
            crate::worker::spawn(worker)?;
            Ok(Box::new(StudioApp::new(engine, options)))
        }),
    )
    .map_err(|e| format!("cannot open the window: {e}"))
}
