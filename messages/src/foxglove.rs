//! Camera frames as Foxglove's well-known image schemas, in their JSON encoding: what a
//! recording adds beside each camera message, and what the Foxglove bridge sends, so that
//! Foxglove shows the picture.

use crate::codec::Header;
use crate::types::{AnyMessage, Encoding};
use base64::Engine as _;
use serde_json::{json, Value};

pub const COMPRESSED_IMAGE: &str = "foxglove.CompressedImage";
pub const RAW_IMAGE: &str = "foxglove.RawImage";

fn time_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "sec": {"type": "integer", "minimum": 0},
            "nsec": {"type": "integer", "minimum": 0, "maximum": 999_999_999},
        },
    })
}

/// The JSON Schema of `foxglove.CompressedImage` or `foxglove.RawImage`.
pub fn image_schema(name: &str) -> Value {
    let mut properties = json!({
        "timestamp": time_schema(),
        "frame_id": {"type": "string"},
        "data": {"type": "string", "contentEncoding": "base64"},
    });
    let p = properties.as_object_mut().expect("an object");
    if name == RAW_IMAGE {
        p.insert("width".into(), json!({"type": "integer", "minimum": 0}));
        p.insert("height".into(), json!({"type": "integer", "minimum": 0}));
        p.insert("encoding".into(), json!({"type": "string"}));
        p.insert("step".into(), json!({"type": "integer", "minimum": 0}));
    } else {
        p.insert("format".into(), json!({"type": "string"}));
    }
    json!({"title": name, "type": "object", "properties": properties})
}

/// The camera picture of a message as a Foxglove image (schema name and JSON), if it holds one:
/// an observation's image, or a raw frame in JPEG or RGB8.
pub fn camera_image(header: &Header, msg: &AnyMessage) -> Option<(&'static str, Value)> {
    let (encoding, width, height, data) = match msg {
        AnyMessage::Observation(o) => (o.image.encoding, o.image.width, o.image.height, &o.image.data),
        AnyMessage::RawFrame(f) => {
            let (h, w) = match f.shape.as_slice() {
                [h, w, ..] => (*h, *w),
                _ => (0, 0),
            };
            (f.encoding, w, h, &f.data)
        }
        _ => return None,
    };
    if data.is_empty() {
        return None;
    }
    let timestamp = json!({
        "sec": header.stamp_ns / 1_000_000_000,
        "nsec": header.stamp_ns % 1_000_000_000,
    });
    let b64 = base64::engine::general_purpose::STANDARD.encode(data.to_bytes());
    match encoding {
        Encoding::Jpeg => Some((
            COMPRESSED_IMAGE,
            json!({"timestamp": timestamp, "frame_id": header.robot, "format": "jpeg", "data": b64}),
        )),
        Encoding::Rgb8 if width > 0 && data.len() == (width * height * 3) as usize => Some((
            RAW_IMAGE,
            json!({
                "timestamp": timestamp, "frame_id": header.robot, "width": width, "height": height,
                "encoding": "rgb8", "step": width * 3, "data": b64,
            }),
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Kind, RawFrame};

    fn header(kind: Kind) -> Header {
        Header {
            version: 1,
            kind,
            robot: "r0".into(),
            seq: 1,
            stamp_ns: 3_000_000_007,
        }
    }

    #[test]
    fn jpeg_and_rgb_frames_become_foxglove_images_and_vectors_do_not() {
        let jpeg = AnyMessage::RawFrame(RawFrame {
            sensor: "camera".into(),
            encoding: Encoding::Jpeg,
            shape: vec![2, 2, 3],
            data: vec![0xff, 0xd8, 0xff].into(),
        });
        let (schema, v) = camera_image(&header(Kind::RawFrame), &jpeg).unwrap();
        assert_eq!(schema, COMPRESSED_IMAGE);
        assert_eq!(v["format"], "jpeg");
        assert_eq!(v["data"], "/9j/");
        assert_eq!(v["timestamp"], json!({"sec": 3, "nsec": 7}));
        assert_eq!(v["frame_id"], "r0");
        let rgb = AnyMessage::RawFrame(RawFrame {
            sensor: "camera".into(),
            encoding: Encoding::Rgb8,
            shape: vec![1, 2, 3],
            data: vec![1, 2, 3, 4, 5, 6].into(),
        });
        let (schema, v) = camera_image(&header(Kind::RawFrame), &rgb).unwrap();
        assert_eq!(
            (schema, v["width"].as_u64(), v["step"].as_u64()),
            (RAW_IMAGE, Some(2), Some(6))
        );
        // A ragged RGB buffer and a state vector are not pictures.
        let ragged = AnyMessage::RawFrame(RawFrame {
            data: vec![1, 2].into(),
            ..match rgb {
                AnyMessage::RawFrame(f) => f,
                _ => unreachable!(),
            }
        });
        assert!(camera_image(&header(Kind::RawFrame), &ragged).is_none());
        let state = AnyMessage::RawFrame(RawFrame::f32_vector("state", &[1.0]));
        assert!(camera_image(&header(Kind::RawFrame), &state).is_none());
        assert_eq!(image_schema(RAW_IMAGE)["properties"]["step"]["type"], "integer");
        assert!(image_schema(COMPRESSED_IMAGE)["properties"].get("format").is_some());
    }
}
