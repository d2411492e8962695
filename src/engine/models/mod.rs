//! The networks: CLIP text encoder, UNet, VAE decoder and encoder, TAESD previews, and the
//! CPU convolutions (columns, Winograd), blocked attention and fused GroupNorm they are
//! built from.
pub mod attention;
pub mod clip;
pub mod controlnet;
pub mod conv;
pub mod fused;
pub mod taesd;
pub mod unet;
pub mod vae_decoder;
pub mod vae_encoder;
pub mod winograd;
