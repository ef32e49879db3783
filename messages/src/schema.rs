//! The body layout of every message kind, traced from the types themselves (so it cannot drift
//! from the code): what `nanobot schema` prints, and what a decoder in another language needs
//! beyond the envelope header.
//!
//! Bodies are bincode 2 with fixed-width little-endian integers: a field of a struct follows the
//! one before it; integers and floats at their width; `bool` one byte; a string or a sequence
//! is a u64 count then the items; an `Option` a u8 tag (0 none, 1 some) then the value; an enum
//! a u32 variant index then the variant's fields; a `Blob` its u64 length, its bytes following
//! the body in field order.

use std::collections::BTreeMap;
use std::fmt::Write as _;

pub use serde_reflection::Registry;
use serde_reflection::{ContainerFormat, Format, Named, Tracer, TracerConfig, VariantFormat};

use crate::types::{ActionSource, DType, Encoding, EventKind, Kind, KindVisitor, Message, SpoolStream};

/// Every message kind's types, by name: structs (fields in order), enums (variants by index),
/// and `Blob`.
pub fn registry() -> Result<Registry, String> {
    struct Trace<'a>(&'a mut Tracer);
    impl KindVisitor for Trace<'_> {
        type Out = Result<(), String>;
        fn visit<T: Message>(self) -> Self::Out {
            self.0
                .trace_simple_type::<T>()
                .map(|_| ())
                .map_err(|e| format!("{}: {e}", T::KIND))
        }
    }
    let mut tracer = Tracer::new(TracerConfig::default().is_human_readable(false));
    // Enums inside messages are traced on their own too, so that every variant is known (a
    // message's trace meets only the first variant of the enums it holds).
    let err = |e: serde_reflection::Error| e.to_string();
    tracer.trace_simple_type::<EventKind>().map_err(err)?;
    tracer.trace_simple_type::<Encoding>().map_err(err)?;
    tracer.trace_simple_type::<ActionSource>().map_err(err)?;
    tracer.trace_simple_type::<DType>().map_err(err)?;
    tracer.trace_simple_type::<SpoolStream>().map_err(err)?;
    for k in Kind::ALL {
        k.visit(Trace(&mut tracer))?;
    }
    tracer.registry().map_err(|e| e.to_string())
}

/// The registry as JSON: `{"kinds": {"Observation": 2, ...}, "types": {name: format}}`, for
/// decoders in other languages (serde-reflection's format: STRUCT, ENUM, NEWTYPESTRUCT, SEQ,
/// OPTION, TYPENAME, U64, F32, STR, ...).
pub fn registry_json() -> Result<serde_json::Value, String> {
    let r = registry()?;
    let kinds: BTreeMap<&str, u8> = Kind::ALL.iter().map(|k| (k.name(), *k as u8)).collect();
    Ok(serde_json::json!({
        "kinds": kinds,
        "types": serde_json::to_value(&r).map_err(|e| e.to_string())?,
    }))
}

fn format_name(f: &Format) -> String {
    match f {
        Format::TypeName(n) if n == "Blob" => "blob".into(),
        Format::TypeName(n) => n.clone(),
        Format::Unit => "()".into(),
        Format::Bool => "bool".into(),
        Format::I8 => "i8".into(),
        Format::I16 => "i16".into(),
        Format::I32 => "i32".into(),
        Format::I64 => "i64".into(),
        Format::I128 => "i128".into(),
        Format::U8 => "u8".into(),
        Format::U16 => "u16".into(),
        Format::U32 => "u32".into(),
        Format::U64 => "u64".into(),
        Format::U128 => "u128".into(),
        Format::F32 => "f32".into(),
        Format::F64 => "f64".into(),
        Format::Char => "char".into(),
        Format::Str => "string".into(),
        Format::Bytes => "bytes".into(),
        Format::Option(f) => format!("option<{}>", format_name(f)),
        Format::Seq(f) => format!("seq<{}>", format_name(f)),
        Format::Map { key, value } => format!("map<{}, {}>", format_name(key), format_name(value)),
        Format::Tuple(fs) => format!("({})", fs.iter().map(format_name).collect::<Vec<_>>().join(", ")),
        Format::TupleArray { content, size } => format!("[{}; {size}]", format_name(content)),
        Format::Variable(_) => "?".into(),
    }
}

/// What the field takes on the wire.
fn width(f: &Format) -> String {
    match f {
        Format::Bool | Format::U8 | Format::I8 => "1".into(),
        Format::U16 | Format::I16 => "2".into(),
        Format::U32 | Format::I32 | Format::F32 | Format::Char => "4".into(),
        Format::U64 | Format::I64 | Format::F64 => "8".into(),
        Format::U128 | Format::I128 => "16".into(),
        Format::Str | Format::Bytes => "8 + n bytes (u64 count, UTF-8)".into(),
        Format::Seq(inner) => format!("8 + n × ({})", width(inner)),
        Format::Option(inner) => format!("1 + ({}) if the tag is 1", width(inner)),
        Format::TypeName(n) if n == "Blob" => "8 (u64 length; the bytes follow the body)".into(),
        Format::TypeName(_) => "see below".into(),
        _ => "-".into(),
    }
}

fn type_names(f: &Format, out: &mut Vec<String>) {
    match f {
        Format::TypeName(n) if n != "Blob" => out.push(n.clone()),
        Format::Option(i) | Format::Seq(i) => type_names(i, out),
        Format::Tuple(fs) => fs.iter().for_each(|f| type_names(f, out)),
        Format::TupleArray { content, .. } => type_names(content, out),
        Format::Map { key, value } => {
            type_names(key, out);
            type_names(value, out);
        }
        _ => {}
    }
}

fn fields(out: &mut String, fs: &[Named<Format>], indent: &str, refs: &mut Vec<String>) {
    for f in fs {
        let _ = writeln!(
            out,
            "{indent}{:<18} {:<16} {}",
            f.name,
            format_name(&f.value),
            width(&f.value)
        );
        type_names(&f.value, refs);
    }
}

/// The body layout of one kind as text: its fields in wire order with their types and widths,
/// then every struct and enum it refers to (enum variants with their u32 index).
pub fn describe(kind: Kind, registry: &Registry) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{} (kind {}): body fields in wire order", kind.name(), kind as u8);
    let mut pending = vec![kind.name().to_string()];
    let mut done: Vec<String> = Vec::new();
    while let Some(name) = pending.first().cloned() {
        pending.remove(0);
        if done.contains(&name) {
            continue;
        }
        done.push(name.clone());
        let mut refs = Vec::new();
        match registry.get(&name) {
            Some(ContainerFormat::Struct(fs)) => {
                if name != kind.name() {
                    let _ = writeln!(out, "  {name} (struct):");
                }
                fields(&mut out, fs, "    ", &mut refs);
            }
            Some(ContainerFormat::Enum(variants)) => {
                let _ = writeln!(out, "  {name} (enum: u32 variant index, then its fields):");
                for (i, v) in variants {
                    match &v.value {
                        VariantFormat::Unit => {
                            let _ = writeln!(out, "    {i} {}", v.name);
                        }
                        VariantFormat::Struct(fs) => {
                            let _ = writeln!(out, "    {i} {}:", v.name);
                            fields(&mut out, fs, "        ", &mut refs);
                        }
                        VariantFormat::NewType(f) => {
                            let _ = writeln!(out, "    {i} {}({})", v.name, format_name(f));
                            type_names(f, &mut refs);
                        }
                        VariantFormat::Tuple(fs) => {
                            let _ = writeln!(
                                out,
                                "    {i} {}({})",
                                v.name,
                                fs.iter().map(format_name).collect::<Vec<_>>().join(", ")
                            );
                            fs.iter().for_each(|f| type_names(f, &mut refs));
                        }
                        VariantFormat::Variable(_) => {}
                    }
                }
            }
            Some(ContainerFormat::NewTypeStruct(f)) => {
                let _ = writeln!(out, "  {name}: {}", format_name(f));
            }
            _ => {}
        }
        pending.extend(refs);
    }
    out
}

/// The JSON Schema of one kind's JSON view (what [`crate::json::to_json`] writes: the envelope
/// fields and the body under `msg`), for readers that decode by schema: MCAP channels with
/// `jsonschema` schemas, Foxglove. Nested types are written inline (none is recursive); blobs are
/// base64 strings, enums serde's external tagging (a unit variant is its name, another variant
/// an object with its name as the only key).
pub fn json_schema(kind: Kind, registry: &Registry) -> serde_json::Value {
    use serde_json::json;
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": kind.name(),
        "type": "object",
        "properties": {
            "schema": {"type": "integer", "description": "envelope schema version"},
            "kind": {"const": kind.name()},
            "robot": {"type": "string"},
            "seq": {"type": "integer", "minimum": 0},
            "stamp_ns": {"type": "integer", "minimum": 0, "description": "ns since the Unix epoch"},
            "msg": container_schema(kind.name(), registry),
        },
        "required": ["kind", "msg"],
    })
}

/// Every kind's JSON Schema as text, for writers that declare one schema per kind (MCAP
/// recordings, the Foxglove bridge).
pub fn json_schemas() -> Result<std::collections::HashMap<Kind, String>, String> {
    let registry = registry()?;
    Ok(Kind::ALL
        .iter()
        .map(|k| (*k, json_schema(*k, &registry).to_string()))
        .collect())
}

fn container_schema(name: &str, registry: &Registry) -> serde_json::Value {
    use serde_json::json;
    match registry.get(name) {
        Some(ContainerFormat::Struct(fs)) => struct_schema(name, fs, registry),
        Some(ContainerFormat::NewTypeStruct(f)) => format_schema(f, registry),
        Some(ContainerFormat::Enum(variants)) => {
            let alternatives: Vec<serde_json::Value> = variants
                .values()
                .map(|v| match &v.value {
                    VariantFormat::Unit => json!({"const": v.name}),
                    VariantFormat::Struct(fs) => variant(&v.name, struct_schema(&v.name, fs, registry)),
                    VariantFormat::NewType(f) => variant(&v.name, format_schema(f, registry)),
                    VariantFormat::Tuple(fs) => variant(
                        &v.name,
                        json!({"type": "array", "prefixItems": fs.iter().map(|f| format_schema(f, registry)).collect::<Vec<_>>()}),
                    ),
                    VariantFormat::Variable(_) => json!({}),
                })
                .collect();
            json!({"title": name, "oneOf": alternatives})
        }
        _ => json!({"title": name}),
    }
}

fn variant(name: &str, value: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "type": "object",
        "properties": {name: value},
        "required": [name],
        "additionalProperties": false,
    })
}

fn struct_schema(name: &str, fs: &[Named<Format>], registry: &Registry) -> serde_json::Value {
    let properties: serde_json::Map<String, serde_json::Value> = fs
        .iter()
        .map(|f| (f.name.clone(), format_schema(&f.value, registry)))
        .collect();
    let required: Vec<&str> = fs.iter().map(|f| f.name.as_str()).collect();
    serde_json::json!({"title": name, "type": "object", "properties": properties, "required": required})
}

fn format_schema(f: &Format, registry: &Registry) -> serde_json::Value {
    use serde_json::json;
    match f {
        Format::TypeName(n) if n == "Blob" => json!({"type": "string", "contentEncoding": "base64"}),
        Format::TypeName(n) => container_schema(n, registry),
        Format::Unit => json!({"type": "null"}),
        Format::Bool => json!({"type": "boolean"}),
        Format::I8 | Format::I16 | Format::I32 | Format::I64 | Format::I128 => json!({"type": "integer"}),
        Format::U8 | Format::U16 | Format::U32 | Format::U64 | Format::U128 => {
            json!({"type": "integer", "minimum": 0})
        }
        Format::F32 | Format::F64 => json!({"type": "number"}),
        Format::Char | Format::Str => json!({"type": "string"}),
        Format::Bytes => json!({"type": "string", "contentEncoding": "base64"}),
        Format::Option(inner) => json!({"anyOf": [format_schema(inner, registry), {"type": "null"}]}),
        Format::Seq(inner) => json!({"type": "array", "items": format_schema(inner, registry)}),
        Format::Map { value, .. } => json!({"type": "object", "additionalProperties": format_schema(value, registry)}),
        Format::Tuple(fs) => {
            json!({"type": "array", "prefixItems": fs.iter().map(|f| format_schema(f, registry)).collect::<Vec<_>>()})
        }
        Format::TupleArray { content, size } => {
            json!({"type": "array", "items": format_schema(content, registry), "minItems": size, "maxItems": size})
        }
        Format::Variable(_) => json!({}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_is_described_with_its_nested_types() {
        let r = registry().unwrap();
        for k in Kind::ALL {
            assert!(r.contains_key(k.name()), "{k}");
        }
        let obs = describe(Kind::Observation, &r);
        // The fields an outside decoder cannot guess: where task sits, Image's field order, the
        // blob, and the encoding's variant numbers.
        let task = obs.find("task").unwrap();
        let image = obs.find("image").unwrap();
        assert!(task < image, "{obs}");
        assert!(obs.contains("Image (struct):"), "{obs}");
        assert!(obs.contains("blob"), "{obs}");
        assert!(obs.contains("0 Jpeg") && obs.contains("2 F32Le"), "{obs}");
        let ev = describe(Kind::Event, &r);
        for v in ["EpisodeStart", "EpisodeEnd", "Intervention", "Reward", "Preference"] {
            assert!(ev.contains(v), "every variant traced: {ev}");
        }
        assert!(describe(Kind::ActionChunk, &r).contains("2 Operator"));
    }

    #[test]
    fn the_json_schema_describes_the_json_view() {
        let r = registry().unwrap();
        let obs = json_schema(Kind::Observation, &r);
        assert_eq!(obs["properties"]["kind"]["const"], "Observation");
        let msg = &obs["properties"]["msg"];
        assert_eq!(msg["properties"]["state"]["items"]["type"], "number");
        assert_eq!(
            msg["properties"]["image"]["properties"]["data"]["contentEncoding"],
            "base64"
        );
        let encodings = msg["properties"]["image"]["properties"]["encoding"]["oneOf"]
            .as_array()
            .unwrap();
        assert!(
            encodings.contains(&serde_json::json!({"const": "Jpeg"})),
            "{encodings:?}"
        );
        // A struct variant is an object keyed by its name, as serde_json writes it.
        let ev = json_schema(Kind::Event, &r);
        let text = ev.to_string();
        assert!(text.contains("\"required\":[\"EpisodeEnd\"]"), "{text}");
        for k in Kind::ALL {
            assert_eq!(json_schema(*k, &r)["title"], k.name());
        }
    }
}
