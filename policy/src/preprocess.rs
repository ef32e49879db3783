//! Preprocessing: what stands between a robot's observation and the model's input (LeRobot
//! keeps this in a processor file per policy). JPEG → RGB8, RGB8 → channel-major floats, and an
//! Observation message → one decoded [`Step`]. `nanobot train`, `nanobot serve`, the policy
//! actor and the online trainer all go through here, so the model sees the same input
//! everywhere.

use nanobot_messages::{Encoding, Observation};
use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum PreprocessError {
    #[error("image: JPEG does not decode: {0}")]
    Jpeg(String),
    #[error("image: JPEG pixel format {0} is not RGB or grayscale")]
    PixelFormat(String),
    #[error("image encoding {0}: send Jpeg or Rgb8")]
    Encoding(String),
}

/// One decoded observation step.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    /// RGB8, row-major, `image_size²·3` bytes.
    pub rgb: Vec<u8>,
    pub state: Vec<f32>,
    /// `rows·cols` cells, row-major.
    pub surface: Vec<f32>,
}

/// Decode a JPEG to RGB8 (grayscale is widened): `(width, height, pixels)`.
pub fn decode_jpeg_rgb(jpeg: &[u8]) -> Result<(u32, u32, Vec<u8>), PreprocessError> {
    let mut d = jpeg_decoder::Decoder::new(jpeg);
    let px = d.decode().map_err(|e| PreprocessError::Jpeg(e.to_string()))?;
    let info = d.info().ok_or_else(|| PreprocessError::Jpeg("no header".into()))?;
    let rgb = match info.pixel_format {
        jpeg_decoder::PixelFormat::RGB24 => px,
        jpeg_decoder::PixelFormat::L8 => px.iter().flat_map(|&v| [v, v, v]).collect(),
        other => return Err(PreprocessError::PixelFormat(format!("{other:?}"))),
    };
    Ok((info.width as u32, info.height as u32, rgb))
}

/// Append RGB8 pixels (row-major, interleaved) as the model's input: channel-major floats in
/// [0, 1].
pub fn rgb_to_chw(rgb: &[u8], out: &mut Vec<f32>) {
    for ch in 0..3 {
        out.extend(rgb.iter().skip(ch).step_by(3).map(|&v| v as f32 / 255.0));
    }
}

/// An observation as the policy's input step: the image decoded to RGB8. Its sizes are checked
/// against the model by `Runner::check`.
pub fn step_of(o: &Observation) -> Result<Step, PreprocessError> {
    let bytes = o.image.data.to_bytes();
    let rgb = match o.image.encoding {
        Encoding::Jpeg => decode_jpeg_rgb(&bytes)?.2,
        Encoding::Rgb8 => bytes.to_vec(),
        other => return Err(PreprocessError::Encoding(format!("{other:?}"))),
    };
    Ok(Step {
        rgb,
        state: o.state.clone(),
        surface: o.surface.cells.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chw_is_channel_major_in_unit_range() {
        let rgb = [255u8, 0, 51, 0, 255, 102];
        let mut out = Vec::new();
        rgb_to_chw(&rgb, &mut out);
        assert_eq!(out, [1.0, 0.0, 0.0, 1.0, 0.2, 0.4]);
    }

    #[test]
    fn a_broken_jpeg_is_an_error_naming_the_image() {
        let e = decode_jpeg_rgb(&[0xFF, 0xD8, 0xFF, 0x00]).unwrap_err();
        assert!(e.to_string().starts_with("image: JPEG"), "{e}");
    }
}
