//! What leaves the engine: PNGs with A1111 parameters, comparison grids, and the image fits
//! (crop and resize) shared with the inputs.
pub mod grid;
pub mod image_ops;
pub mod metadata;
