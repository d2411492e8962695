//! Canny edge detection with OpenCV's `cv2.Canny(image, low, high)` semantics (the detector
//! A1111's ControlNet "canny" preprocessor and diffusers' examples call): 3×3 Sobel
//! gradients with replicated borders, the L1 magnitude |dx| + |dy| (on a colour image, per
//! pixel the channel with the largest magnitude), non-maximum suppression along the
//! gradient quantised to four directions in OpenCV's fixed-point test, then hysteresis:
//! a pixel above `low` that survives suppression is an edge when it is 8-connected to one
//! above `high`.

/// tan(22.5°) in OpenCV's 15-bit fixed point.
const TG22: i64 = 13573;
const SHIFT: u32 = 15;

/// Edges of a `channels`-channel u8 image (row-major, `w`×`h`): 255 on edges, 0 elsewhere,
/// one byte per pixel. `low`/`high` as OpenCV takes them (swapped when given the other way).
pub fn canny(pixels: &[u8], w: usize, h: usize, channels: usize, low: f64, high: f64) -> Vec<u8> {
    assert_eq!(pixels.len(), w * h * channels, "canny: buffer size");
    if w == 0 || h == 0 {
        return Vec::new();
    }
    let (low, high) = if low > high { (high, low) } else { (low, high) };
    let (low, high) = (low.floor() as i32, high.floor() as i32);
    // Gradients of the strongest channel per pixel.
    let mut dx = vec![0i32; w * h];
    let mut dy = vec![0i32; w * h];
    let mut mag = vec![0i32; w * h];
    let at = |x: isize, y: isize, c: usize| -> i32 {
        let x = x.clamp(0, w as isize - 1) as usize;
        let y = y.clamp(0, h as isize - 1) as usize;
        pixels[(y * w + x) * channels + c] as i32
    };
    for y in 0..h as isize {
        for x in 0..w as isize {
            let i = y as usize * w + x as usize;
            for c in 0..channels {
                let gx = (at(x + 1, y - 1, c) + 2 * at(x + 1, y, c) + at(x + 1, y + 1, c))
                    - (at(x - 1, y - 1, c) + 2 * at(x - 1, y, c) + at(x - 1, y + 1, c));
                let gy = (at(x - 1, y + 1, c) + 2 * at(x, y + 1, c) + at(x + 1, y + 1, c))
                    - (at(x - 1, y - 1, c) + 2 * at(x, y - 1, c) + at(x + 1, y - 1, c));
                let m = gx.abs() + gy.abs();
                if c == 0 || m > mag[i] {
                    mag[i] = m;
                    dx[i] = gx;
                    dy[i] = gy;
                }
            }
        }
    }
    let m_at = |x: isize, y: isize| -> i32 {
        if x < 0 || y < 0 || x >= w as isize || y >= h as isize {
            0
        } else {
            mag[y as usize * w + x as usize]
        }
    };
    // 0: not an edge, 1: weak (above low, a local maximum), 2: edge.
    let mut map = vec![0u8; w * h];
    let mut stack = Vec::new();
    for y in 0..h as isize {
        for x in 0..w as isize {
            let i = y as usize * w + x as usize;
            let m = mag[i];
            if m <= low {
                continue;
            }
            let xs = dx[i].unsigned_abs() as i64;
            let ys = (dy[i].unsigned_abs() as i64) << SHIFT;
            let tg22x = xs * TG22;
            let local_max = if ys < tg22x {
                m > m_at(x - 1, y) && m >= m_at(x + 1, y)
            } else {
                let tg67x = tg22x + (xs << (SHIFT + 1));
                if ys > tg67x {
                    m > m_at(x, y - 1) && m >= m_at(x, y + 1)
                } else {
                    let s = if (dx[i] ^ dy[i]) < 0 { -1 } else { 1 };
                    m > m_at(x - s, y - 1) && m > m_at(x + s, y + 1)
                }
            };
            if !local_max {
                continue;
            }
            if m > high {
                map[i] = 2;
                stack.push(i);
            } else {
                map[i] = 1;
            }
        }
    }
    while let Some(i) = stack.pop() {
        let (x, y) = ((i % w) as isize, (i / w) as isize);
        for (ox, oy) in [
            (-1, -1),
            (0, -1),
            (1, -1),
            (-1, 0),
            (1, 0),
            (-1, 1),
            (0, 1),
            (1, 1),
        ] {
            let (nx, ny) = (x + ox, y + oy);
            if nx < 0 || ny < 0 || nx >= w as isize || ny >= h as isize {
                continue;
            }
            let j = ny as usize * w + nx as usize;
            if map[j] == 1 {
                map[j] = 2;
                stack.push(j);
            }
        }
    }
    map.into_iter()
        .map(|v| if v == 2 { 255 } else { 0 })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_square_has_a_closed_outline_and_flat_regions_none() {
        let (w, h) = (32, 32);
        let mut img = vec![0u8; w * h];
        for y in 8..24 {
            for x in 8..24 {
                img[y * w + x] = 200;
            }
        }
        let e = canny(&img, w, h, 1, 100.0, 200.0);
        // Nothing far from the square's border.
        for y in 0..h {
            for x in 0..w {
                let near = [7usize, 8, 23, 24]
                    .iter()
                    .any(|&b| x.abs_diff(b) <= 1 && (7..=24).contains(&y))
                    || [7usize, 8, 23, 24]
                        .iter()
                        .any(|&b| y.abs_diff(b) <= 1 && (7..=24).contains(&x));
                if !near {
                    assert_eq!(e[y * w + x], 0, "edge at ({x}, {y}) far from the square");
                }
            }
        }
        // Every side is found along its middle.
        for t in 10..22 {
            assert!(
                (7..=8).any(|xx| e[t * w + xx] == 255),
                "left side at row {t}"
            );
            assert!(
                (23..=24).any(|xx| e[t * w + xx] == 255),
                "right side at row {t}"
            );
            assert!(
                (7..=8).any(|yy| e[yy * w + t] == 255),
                "top side at column {t}"
            );
            assert!(
                (23..=24).any(|yy| e[yy * w + t] == 255),
                "bottom side at column {t}"
            );
        }
        assert!(canny(&vec![90u8; w * h], w, h, 1, 100.0, 200.0)
            .iter()
            .all(|&v| v == 0));
    }

    #[test]
    fn weak_edges_need_a_strong_neighbour() {
        // A step of 30 gives |dx| = 4·30 = 120: above low 100, below high 200.
        let (w, h) = (16, 8);
        let img: Vec<u8> = (0..w * h)
            .map(|i| if i % w >= 8 { 30 } else { 0 })
            .collect();
        assert!(canny(&img, w, h, 1, 100.0, 200.0).iter().all(|&v| v == 0));
        // With high below 120 the same step is an edge.
        assert!(canny(&img, w, h, 1, 100.0, 110.0).contains(&255));
    }
}
