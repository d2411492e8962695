//! sd-studio: a desktop studio for Stable Diffusion. The engine (candle) lives in
//! [`engine`]; the generation thread in [`worker`], speaking [`protocol`]; the window in
//! `ui` (feature `gui`); the command line in [`cli`].

pub mod cli;
pub mod engine;
pub mod protocol;
#[cfg(feature = "gui")]
pub mod ui;
pub mod worker;
