//! The JSON view of messages, for the CLI (`topic echo --json`, `topic pub`) and for engineers.
//!
//! Shape: `{"schema":1,"kind":"ActionChunk","robot":"r0","seq":3,"stamp_ns":…,"msg":{…}}`.
//! Blobs are base64 strings.

use serde_json::{json, Value};

use crate::codec::Header;
use crate::types::AnyMessage;

/// The JSON view of a decoded message.
pub fn to_json(header: &Header, msg: &AnyMessage) -> Value {
    let body = serde_json::to_value(msg).unwrap_or(Value::Null);
    json!({
        "schema": header.version,
        "kind": header.kind.name(),
        "robot": header.robot,
        "seq": header.seq,
        "stamp_ns": header.stamp_ns,
        "msg": body.get("msg").cloned().unwrap_or(Value::Null),
    })
}

/// A message read back from its JSON view; `robot` and `seq` are optional there.
#[derive(Debug, Clone, PartialEq)]
pub struct JsonMessage {
    pub robot: Option<String>,
    pub seq: Option<u64>,
    pub msg: AnyMessage,
}

/// Parse the JSON view (`kind` and `msg` required).
pub fn from_json(value: &Value) -> Result<JsonMessage, String> {
    let kind = value
        .get("kind")
        .and_then(Value::as_str)
        .ok_or("field \"kind\" is missing (e.g. \"ActionChunk\")")?;
    let body = value.get("msg").ok_or("field \"msg\" is missing")?;
    let msg: AnyMessage =
        serde_json::from_value(json!({"kind": kind, "msg": body})).map_err(|e| format!("{kind}: {e}"))?;
    Ok(JsonMessage {
        robot: value.get("robot").and_then(Value::as_str).map(str::to_string),
        seq: value.get("seq").and_then(Value::as_u64),
        msg,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::*;

    #[test]
    fn json_view_round_trips_with_base64_blobs() {
        let msg = AnyMessage::RawFrame(RawFrame::f32_vector("state", &[1.0, 2.5]));
        let header = Header {
            version: 1,
            kind: Kind::RawFrame,
            robot: "r0".into(),
            seq: 4,
            stamp_ns: 9,
        };
        let v = to_json(&header, &msg);
        assert_eq!(v["kind"], "RawFrame");
        assert_eq!(v["robot"], "r0");
        assert_eq!(v["msg"]["sensor"], "state");
        assert_eq!(v["msg"]["data"], "AACAPwAAIEA=");
        let back = from_json(&v).unwrap();
        assert_eq!(back.msg, msg);
        assert_eq!(back.seq, Some(4));
        let err = from_json(&json!({"kind": "ActionChunk", "msg": {"obs_seq": 1}})).unwrap_err();
        assert!(err.contains("ActionChunk") && err.contains("missing field"), "{err}");
    }
}
