//! Fitting input pictures to the job's size, as A1111's "crop and resize": scale to cover
//! the target, then cut the middle. Masks get the same geometry (nearest neighbour, so
//! they stay two-valued), so a mask painted over a picture still lines up after the fit.

use image::imageops::{self, FilterType};
use image::{GrayImage, RgbImage};

fn cover_geometry(iw: u32, ih: u32, w: usize, h: usize) -> (u32, u32, u32, u32) {
    let (fw, fh) = (iw as f64, ih as f64);
    let scale = (w as f64 / fw).max(h as f64 / fh);
    let rw = ((fw * scale).round() as u32).max(w as u32);
    let rh = ((fh * scale).round() as u32).max(h as u32);
    (rw, rh, (rw - w as u32) / 2, (rh - h as u32) / 2)
}

/// The picture scaled (Lanczos) to cover `w`×`h` and centre-cropped; RGB8 row-major. A
/// picture already at that size is used as it is.
pub fn cover_crop(img: RgbImage, w: usize, h: usize) -> Vec<u8> {
    if (img.width() as usize, img.height() as usize) == (w, h) {
        return img.into_raw();
    }
    let (rw, rh, x, y) = cover_geometry(img.width(), img.height(), w, h);
    let resized = imageops::resize(&img, rw, rh, FilterType::Lanczos3);
    imageops::crop_imm(&resized, x, y, w as u32, h as u32)
        .to_image()
        .into_raw()
}

/// A mask given the same fit as its picture (nearest neighbour).
pub fn cover_crop_mask(mask: GrayImage, w: usize, h: usize) -> Vec<u8> {
    if (mask.width() as usize, mask.height() as usize) == (w, h) {
        return mask.into_raw();
    }
    let (rw, rh, x, y) = cover_geometry(mask.width(), mask.height(), w, h);
    let resized = imageops::resize(&mask, rw, rh, FilterType::Nearest);
    imageops::crop_imm(&resized, x, y, w as u32, h as u32)
        .to_image()
        .into_raw()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_wide_picture_and_its_mask_keep_their_middle() {
        // 16x8, left half black, right half white; the mask marks the right quarter.
        let img = RgbImage::from_fn(16, 8, |x, _| image::Rgb([if x < 8 { 0 } else { 255 }; 3]));
        let mask = GrayImage::from_fn(16, 8, |x, _| image::Luma([if x >= 12 { 255 } else { 0 }]));
        let rgb = cover_crop(img, 8, 8);
        let m = cover_crop_mask(mask, 8, 8);
        assert_eq!(rgb.len(), 8 * 8 * 3);
        // The middle 8 columns: 4 black then 4 white; the mask's right quarter became the
        // last 0 columns of the crop (columns 12..16 of 16 are outside the middle 4..12).
        assert!(rgb[0] < 20 && rgb[(8 - 1) * 3] > 235);
        assert!(m.iter().all(|&v| v == 0));
        let mask = GrayImage::from_fn(16, 8, |x, _| image::Luma([if x >= 10 { 255 } else { 0 }]));
        let m = cover_crop_mask(mask, 8, 8);
        assert_eq!(&m[..8], &[0, 0, 0, 0, 0, 0, 255, 255]);
    }
}
