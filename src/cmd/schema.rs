//! `nanobot schema [KIND] [--json]`: the body layout of every message kind (or one), traced
//! from the message types: field order, types, widths, enum variant numbers. `--json` gives
//! the machine-readable registry a decoder in another language can follow
//! (`tests/python/decode_with_schema.py` does, for every kind).

use clap::Args;
use nanobot_messages::schema;
use nanobot_messages::Kind;

#[derive(Args)]
pub struct SchemaArgs {
    /// One message kind (e.g. Observation); default: all.
    kind: Option<String>,
    /// The registry as JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn schema_cmd(a: SchemaArgs) -> anyhow::Result<u8> {
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&schema::registry_json().map_err(anyhow::Error::msg)?)?
        );
        return Ok(0);
    }
    let kinds: Vec<Kind> = match &a.kind {
        None => Kind::ALL.to_vec(),
        Some(name) => match Kind::from_name(name) {
            Some(k) => vec![k],
            None => {
                let known: Vec<&str> = Kind::ALL.iter().map(|k| k.name()).collect();
                anyhow::bail!("unknown message kind {name:?} (known: {})", known.join(", "));
            }
        },
    };
    let registry = schema::registry().map_err(anyhow::Error::msg)?;
    let mut text = String::from(
        "Envelope: magic \"NB\", version, kind u8, body length u32, seq u64, stamp_ns u64, robot (u16 length + UTF-8), then the body, then the blobs' bytes in field order. Integers little-endian, fixed width.\n",
    );
    for k in kinds {
        text.push('\n');
        text.push_str(&schema::describe(k, &registry));
    }
    // A reader that stops early (`| head`) is not an error.
    match std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(0),
    }
}
