//! Comparison grids as A1111's X/Y plot draws them: one row per model, one column per seed,
//! row labels on the left and column labels on top, black text on white. Text is rasterised
//! with `ab_glyph` from the Ubuntu Light font that egui bundles.

use ab_glyph::{Font, FontRef, PxScale, ScaleFont};

use crate::engine::{Error, Result};

/// An RGB8 picture, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Picture {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<u8>,
}

impl Picture {
    fn white(width: usize, height: usize) -> Self {
        Self {
            width,
            height,
            rgb: vec![255; width * height * 3],
        }
    }

    fn blit(&mut self, src: &Picture, x0: usize, y0: usize) {
        for y in 0..src.height.min(self.height.saturating_sub(y0)) {
            let w = src.width.min(self.width.saturating_sub(x0));
            let d = ((y0 + y) * self.width + x0) * 3;
            let s = y * src.width * 3;
            self.rgb[d..d + w * 3].copy_from_slice(&src.rgb[s..s + w * 3]);
        }
    }
}

/// Lays `cells[row][col]` out under `col_labels` and beside `row_labels`. All cells must
/// have one size; a missing cell (shorter row) stays white.
pub fn compose(
    cells: &[Vec<Picture>],
    row_labels: &[String],
    col_labels: &[String],
) -> Result<Picture> {
    let first = cells
        .iter()
        .flatten()
        .next()
        .ok_or_else(|| Error::invalid("grid", "no images to put in a grid"))?;
    let (cw, ch) = (first.width, first.height);
    if cells
        .iter()
        .flatten()
        .any(|c| c.width != cw || c.height != ch)
    {
        return Err(Error::invalid(
            "grid",
            "all images of a grid must have one size",
        ));
    }
    let font = FontRef::try_from_slice(epaint_default_fonts::UBUNTU_LIGHT)
        .map_err(|e| Error::invalid("grid font", e.to_string()))?;
    // Text height follows the cell size, as A1111's grid legends do (within limits).
    let size = (ch.min(cw) as f32 / 10.0).clamp(12.0, 40.0);
    let pad = (size / 2.0) as usize;
    let cols = cells.iter().map(Vec::len).max().unwrap_or(0);
    let label_w = row_labels
        .iter()
        .map(|l| text_width(&font, size, l))
        .max()
        .unwrap_or(0)
        .min(cw * 2);
    let left = if row_labels.is_empty() {
        0
    } else {
        label_w + 2 * pad
    };
    let top = if col_labels.is_empty() {
        0
    } else {
        size as usize + 2 * pad
    };
    let mut out = Picture::white(left + cols * cw, top + cells.len() * ch);
    for (c, label) in col_labels.iter().enumerate().take(cols) {
        let w = text_width(&font, size, label).min(cw);
        draw_text(
            &mut out,
            &font,
            size,
            label,
            left + c * cw + (cw - w) / 2,
            pad,
            cw,
        );
    }
    for (r, row) in cells.iter().enumerate() {
        let y = top + r * ch;
        if let Some(label) = row_labels.get(r) {
            let ty = y + ch / 2 - (size as usize / 2).min(ch / 2);
            draw_text(&mut out, &font, size, label, pad, ty, label_w);
        }
        for (c, cell) in row.iter().enumerate() {
            out.blit(cell, left + c * cw, y);
        }
    }
    Ok(out)
}

fn text_width(font: &FontRef, size: f32, text: &str) -> usize {
    let f = font.as_scaled(PxScale::from(size));
    text.chars()
        .map(|c| f.h_advance(f.glyph_id(c)))
        .sum::<f32>()
        .ceil() as usize
}

/// Draws `text` in black with its top-left at (x, y), clipped to `max_w` pixels of width.
fn draw_text(
    out: &mut Picture,
    font: &FontRef,
    size: f32,
    text: &str,
    x: usize,
    y: usize,
    max_w: usize,
) {
    let scale = PxScale::from(size);
    let f = font.as_scaled(scale);
    let mut caret = x as f32;
    let baseline = y as f32 + f.ascent();
    let right = (x + max_w) as f32;
    for ch in text.chars() {
        let id = f.glyph_id(ch);
        let glyph = id.with_scale_and_position(scale, ab_glyph::point(caret, baseline));
        caret += f.h_advance(id);
        if caret > right {
            break;
        }
        if let Some(g) = font.outline_glyph(glyph) {
            let b = g.px_bounds();
            g.draw(|gx, gy, cov| {
                let px = b.min.x as i64 + gx as i64;
                let py = b.min.y as i64 + gy as i64;
                if px < 0 || py < 0 || px as usize >= out.width || py as usize >= out.height {
                    return;
                }
                let i = (py as usize * out.width + px as usize) * 3;
                for k in 0..3 {
                    let v = out.rgb[i + k] as f32 * (1.0 - cov.clamp(0.0, 1.0));
                    out.rgb[i + k] = v.round() as u8;
                }
            });
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn solid(v: u8) -> Picture {
        Picture {
            width: 64,
            height: 48,
            rgb: vec![v; 64 * 48 * 3],
        }
    }

    #[test]
    fn cells_land_where_the_labels_say_and_text_is_drawn() {
        let cells = vec![vec![solid(10), solid(20)], vec![solid(30), solid(40)]];
        let rows = vec!["model-a".to_string(), "model-b".to_string()];
        let cols = vec!["seed 1".to_string(), "seed 2".to_string()];
        let g = compose(&cells, &rows, &cols).unwrap();
        let left = g.width - 2 * 64;
        let top = g.height - 2 * 48;
        assert!(left > 20 && top > 10, "room for labels: {left}x{top}");
        let at = |x: usize, y: usize| g.rgb[(y * g.width + x) * 3];
        assert_eq!(at(left + 5, top + 5), 10);
        assert_eq!(at(left + 64 + 5, top + 5), 20);
        assert_eq!(at(left + 5, top + 48 + 5), 30);
        assert_eq!(at(left + 127, top + 95), 40);
        // Some dark pixels in the label areas (the text), white elsewhere there.
        let dark_left = (top..g.height).any(|y| (0..left).any(|x| at(x, y) < 128));
        let dark_top = (0..top).any(|y| (left..g.width).any(|x| at(x, y) < 128));
        assert!(dark_left && dark_top);
        assert_eq!(at(0, 0), 255);
    }

    #[test]
    fn mixed_sizes_are_refused() {
        let mut small = solid(0);
        small.width = 32;
        small.rgb.truncate(32 * 48 * 3);
        let e = compose(&[vec![solid(0), small]], &[], &[]).unwrap_err();
        assert!(e.to_string().contains("one size"));
        assert!(compose(&[], &[], &[]).is_err());
    }
}
