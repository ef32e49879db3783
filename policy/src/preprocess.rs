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
    #[error("image: JPEG {what} {value} is over the limit of {limit}")]
    TooLarge { what: ImageLimit, value: u64, limit: u64 },
}

impl PreprocessError {
    /// A short name for counting refusals by reason: `jpeg`, `pixel_format`, `encoding`, or the
    /// limit a JPEG broke (`bytes`, `width`, `height`).
    pub fn reason(&self) -> &'static str {
        match self {
            PreprocessError::Jpeg(_) => "jpeg",
            PreprocessError::PixelFormat(_) => "pixel_format",
            PreprocessError::Encoding(_) => "encoding",
            PreprocessError::TooLarge { what, .. } => what.as_str(),
        }
    }
}

/// Which of [`JpegLimits`] a JPEG broke.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageLimit {
    Bytes,
    Width,
    Height,
}

impl ImageLimit {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageLimit::Bytes => "bytes",
            ImageLimit::Width => "width",
            ImageLimit::Height => "height",
        }
    }
}

impl std::fmt::Display for ImageLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The largest JPEG a decoder here accepts. The compressed size is checked first, then the
/// dimensions its header declares, before any pixel buffer is allocated: a 100-byte JPEG that
/// declares 65,535 × 65,535 pixels (12 GiB of RGB) is refused with a counted reason instead of
/// taking the process down. The defaults hold any camera this project feeds a 64–256 px policy
/// with a wide margin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JpegLimits {
    pub max_width: u32,
    pub max_height: u32,
    pub max_bytes: usize,
}

impl Default for JpegLimits {
    fn default() -> Self {
        JpegLimits {
            max_width: 1024,
            max_height: 1024,
            max_bytes: 4 << 20,
        }
    }
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
/// Within [`JpegLimits::default`]; see [`decode_jpeg_rgb_within`].
pub fn decode_jpeg_rgb(jpeg: &[u8]) -> Result<(u32, u32, Vec<u8>), PreprocessError> {
    decode_jpeg_rgb_within(jpeg, &JpegLimits::default())
}

/// Decode a JPEG to RGB8 (grayscale is widened): `(width, height, pixels)`, refusing one over
/// `limits` before its pixels are allocated.
pub fn decode_jpeg_rgb_within(jpeg: &[u8], limits: &JpegLimits) -> Result<(u32, u32, Vec<u8>), PreprocessError> {
    let over = |what, value: u64, limit: u64| PreprocessError::TooLarge { what, value, limit };
    if jpeg.len() > limits.max_bytes {
        return Err(over(ImageLimit::Bytes, jpeg.len() as u64, limits.max_bytes as u64));
    }
    let mut d = jpeg_decoder::Decoder::new(jpeg);
    d.read_info().map_err(|e| PreprocessError::Jpeg(e.to_string()))?;
    let info = d.info().ok_or_else(|| PreprocessError::Jpeg("no header".into()))?;
    let (w, h) = (info.width as u32, info.height as u32);
    if w > limits.max_width {
        return Err(over(ImageLimit::Width, w.into(), limits.max_width.into()));
    }
    if h > limits.max_height {
        return Err(over(ImageLimit::Height, h.into(), limits.max_height.into()));
    }
    // The decoder's own bound too (its working buffers), at the largest image allowed.
    d.set_max_decoding_buffer_size(limits.max_width as usize * limits.max_height as usize * 4);
    let px = d.decode().map_err(|e| PreprocessError::Jpeg(e.to_string()))?;
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
/// The observations of a JSON request body (`serve`'s `/v1/act`): one Observation object, or an
/// array of them, oldest first. The error says where the JSON or which observation is wrong.
pub fn observations_from_json(body: &[u8]) -> Result<Vec<Observation>, String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("JSON: line {} column {}: {e}", e.line(), e.column()))?;
    let list = match v {
        serde_json::Value::Array(items) => items,
        one => vec![one],
    };
    let obs = list
        .into_iter()
        .enumerate()
        .map(|(i, x)| serde_json::from_value::<Observation>(x).map_err(|e| format!("observation {i}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    if obs.is_empty() {
        return Err("no observation".into());
    }
    Ok(obs)
}

pub fn step_of(o: &Observation) -> Result<Step, PreprocessError> {
    step_of_within(o, &JpegLimits::default())
}

/// [`step_of`] with a JPEG refused over `limits` (a policy passes its own image size: a frame
/// of any other size could not be used anyway).
pub fn step_of_within(o: &Observation, limits: &JpegLimits) -> Result<Step, PreprocessError> {
    let bytes = o.image.data.to_bytes();
    let rgb = match o.image.encoding {
        Encoding::Jpeg => decode_jpeg_rgb_within(&bytes, limits)?.2,
        Encoding::Rgb8 => bytes.to_vec(),
        other => return Err(PreprocessError::Encoding(format!("{other:?}"))),
    };
    Ok(Step {
        rgb,
        state: o.state.clone(),
        surface: o.surface.cells.clone(),
    })
}

/// A baseline JPEG header (SOI, a quantization table, SOF0, a Huffman table, SOS) that
/// declares `w × h` pixels, and no scan data: about 100 bytes. What a decompression bomb
/// looks like on the wire; the tests of every decoder's limits send it.
pub fn jpeg_header_declaring(w: u16, h: u16) -> Vec<u8> {
    let mut j = vec![0xFF, 0xD8];
    // DQT: table 0, 64 ones.
    j.extend([0xFF, 0xDB, 0x00, 0x43, 0x00]);
    j.extend([1u8; 64]);
    // SOF0: 8-bit, h × w, one component (id 1, 1×1, table 0).
    j.extend([0xFF, 0xC0, 0x00, 0x0B, 0x08]);
    j.extend(h.to_be_bytes());
    j.extend(w.to_be_bytes());
    j.extend([0x01, 0x01, 0x11, 0x00]);
    // DHT: DC table 0 with one code of length 1 for the symbol 0.
    j.extend([0xFF, 0xC4, 0x00, 0x14, 0x00, 0x01]);
    j.extend([0u8; 15]);
    j.push(0x00);
    // SOS: one component, tables 0/0.
    j.extend([0xFF, 0xDA, 0x00, 0x08, 0x01, 0x01, 0x00, 0x00, 0x3F, 0x00]);
    j.extend([0xFF, 0xD9]);
    j
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
    fn a_jpeg_over_a_limit_is_refused_by_reason_before_its_pixels_exist() {
        let bomb = jpeg_header_declaring(65_535, 65_535);
        assert!(bomb.len() < 120, "{} bytes", bomb.len());
        let e = decode_jpeg_rgb(&bomb).unwrap_err();
        assert_eq!(e.reason(), "width", "{e}");
        assert!(e.to_string().contains("65535"), "{e}");
        let tall = jpeg_header_declaring(64, 4000);
        assert_eq!(decode_jpeg_rgb(&tall).unwrap_err().reason(), "height");
        let limits = JpegLimits {
            max_bytes: 50,
            ..JpegLimits::default()
        };
        assert_eq!(decode_jpeg_rgb_within(&tall, &limits).unwrap_err().reason(), "bytes");
        // Within the limits the same header is only a broken JPEG (no scan data), not refused.
        assert_eq!(
            decode_jpeg_rgb(&jpeg_header_declaring(64, 64)).unwrap_err().reason(),
            "jpeg"
        );
    }

    #[test]
    fn a_broken_jpeg_is_an_error_naming_the_image() {
        let e = decode_jpeg_rgb(&[0xFF, 0xD8, 0xFF, 0x00]).unwrap_err();
        assert!(e.to_string().starts_with("image: JPEG"), "{e}");
    }
}
