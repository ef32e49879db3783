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

use serde_reflection::{ContainerFormat, Format, Named, Registry, Tracer, TracerConfig, VariantFormat};

use crate::types::{ActionSource, DType, Encoding, EventKind, Kind, KindVisitor, Message};

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
}
