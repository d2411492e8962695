//! Model families, the one place that says what each needs: its text encoders, whether its
//! UNet takes added conditions, its native size. Detection reads the files once; the rest
//! of the engine asks the family, never the keys (ComfyUI's `supported_models.py` and
//! stable-diffusion.cpp's `SDVersion` have the same shape).

use super::config::{Activation, ClipConfig, JsonConfig, UNetConfig};

/// The architectures sd-studio runs. Inpainting variants are the same family with a
/// 9-channel UNet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// Stable Diffusion 1.x: CLIP ViT-L/14, 512².
    Sd1,
    /// Stable Diffusion 2.x: OpenCLIP ViT-H/14, 512² or 768² (v-prediction).
    Sd2,
    /// SDXL: CLIP ViT-L and OpenCLIP ViT-bigG (penultimate layers concatenated, pooled
    /// bigG embedding and size conditions added to the timestep embedding), 1024².
    Sdxl,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Self::Sd1 => "SD 1.x",
            Self::Sd2 => "SD 2.x",
            Self::Sdxl => "SDXL",
        }
    }

    /// Whether the family conditions on two text encoders (and a pooled embedding).
    pub fn dual_text_encoders(self) -> bool {
        self == Self::Sdxl
    }

    /// The side length the family was trained at.
    pub fn native_size(self) -> usize {
        match self {
            Self::Sd1 | Self::Sd2 => 512,
            Self::Sdxl => 1024,
        }
    }

    /// A diffusers folder's family: `model_index.json`'s pipeline class, else the UNet's
    /// added conditions, else the text encoder (OpenCLIP ViT-H: 1024 wide, exact GELU;
    /// OpenAI's CLIP ViT-L uses quick GELU).
    pub fn of_folder(index: Option<&JsonConfig>, unet: &UNetConfig, clip: &ClipConfig) -> Self {
        let class = index
            .and_then(|c| c.str_or("_class_name", "").ok())
            .unwrap_or("");
        if class.contains("XL") || unet.added.is_some() {
            Self::Sdxl
        } else if clip.hidden_size == 1024 || clip.activation == Activation::Gelu {
            Self::Sd2
        } else {
            Self::Sd1
        }
    }
}
