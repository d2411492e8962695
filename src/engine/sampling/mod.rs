//! Making an image: the pipeline, the samplers, seeded noise, memory modes, presets and the
//! step profiler.
pub mod memory;
pub mod pipeline;
pub mod presets;
pub mod profile;
pub mod rng;
pub mod schedulers;
