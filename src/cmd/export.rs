//! `nanobot export`: a checkpoint (with its LoRA adapter merged, if given) to safetensors or
//! GGUF v3 (f32, f16, q8_0 or MXFP4 weights), the model config and normalization statistics
//! carried as metadata.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use nanobot_policy::checkpoint::{self, Meta, Role};
use nanobot_policy::export::{to_gguf, weight_bytes};
use nanobot_policy::quant::DType as Q;
use nanobot_policy::runner::Runner;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Format {
    Safetensors,
    Gguf,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Quant {
    F32,
    F16,
    #[value(name = "q8_0")]
    Q8_0,
    Mxfp4,
}

#[derive(Args)]
pub struct ExportArgs {
    #[arg(long)]
    checkpoint: PathBuf,
    /// A LoRA adapter checkpoint to merge into the base first.
    #[arg(long)]
    adapter: Option<PathBuf>,
    #[arg(long, value_enum)]
    format: Format,
    /// Weight precision (GGUF only).
    #[arg(long, value_enum, default_value = "f32")]
    quant: Quant,
    /// Output file (default: the checkpoint's name with the format's extension).
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn export(a: ExportArgs) -> anyhow::Result<u8> {
    let runner = Runner::load(&a.checkpoint, a.adapter.as_deref())?;
    let merged = runner.merged_base()?;
    let version = match &runner.adapter_meta {
        Some(ad) => format!("{}+{}", runner.meta.version, ad.version),
        None => runner.meta.version.clone(),
    };
    let meta = Meta {
        kind: Role::Base,
        version,
        ..runner.meta.clone()
    };
    let q = match a.quant {
        Quant::F32 => Q::F32,
        Quant::F16 => Q::F16,
        Quant::Q8_0 => Q::Q8_0,
        Quant::Mxfp4 => Q::Mxfp4,
    };
    let (ext, tag) = match a.format {
        Format::Safetensors => ("safetensors", String::new()),
        Format::Gguf => ("gguf", format!(".{}", q.name())),
    };
    let out = a.out.clone().unwrap_or_else(|| {
        let stem = a
            .checkpoint
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        a.checkpoint.with_file_name(format!("{stem}.export{tag}.{ext}"))
    });
    if out == a.checkpoint {
        bail!(
            "{}: the export would overwrite its checkpoint; give --out",
            out.display()
        );
    }
    match a.format {
        Format::Safetensors => {
            if !matches!(a.quant, Quant::F32) {
                bail!("--quant {:?} applies to GGUF; safetensors exports are f32", a.quant);
            }
            checkpoint::save(&out, &merged, &meta)?;
        }
        Format::Gguf => {
            let g = to_gguf(&merged, &meta, q)?;
            let bytes = g.to_bytes()?;
            std::fs::write(&out, bytes).with_context(|| format!("{}", out.display()))?;
        }
    }
    let (f32_bytes, q_bytes) = weight_bytes(&merged, if matches!(a.format, Format::Gguf) { q } else { Q::F32 });
    eprintln!(
        "export: {} ({}{}) → {}: weights {:.2} MB ({:.2} MB as f32)",
        a.checkpoint.display(),
        meta.version,
        if runner.adapter_meta.is_some() {
            ", adapter merged"
        } else {
            ""
        },
        out.display(),
        q_bytes as f64 / 1e6,
        f32_bytes as f64 / 1e6
    );
    println!("{}", out.display());
    Ok(0)
}
