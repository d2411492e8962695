//! sd-studio: a desktop studio for Stable Diffusion. The engine (candle) lives in
//! [`engine`]; the command line in [`cli`].

pub mod cli;
pub mod engine;
