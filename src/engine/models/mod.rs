//! The networks: CLIP text encoder, UNet, VAE decoder and encoder, TAESD previews, and the
//! CPU convolutions (columns, Winograd), blocked attention and fused GroupNorm they are
//! built from.
pub mod attention;
#[cfg(feature = "cuda")]
pub mod attention_cuda;
pub mod clip;
pub mod controlnet;
pub mod conv;
#[cfg(feature = "cuda")]
pub(crate) mod cuda_kernels;
pub mod fused;
pub mod linear;
pub mod taesd;
pub mod unet;
pub mod vae_decoder;
pub mod vae_encoder;
pub mod winograd;
