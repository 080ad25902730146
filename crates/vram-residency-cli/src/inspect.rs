//! `vram-residency inspect MODEL`: the model's format and tensor table, read from its header only.

use std::io::BufReader;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use vram_residency::format::{FormatChoice, ModelFormat, TensorTable, read_tensor_table_as};

/// Reads and prints the header of `path`. A rejected header is an error naming the field and byte
/// offset (exit status 1); no weights are read.
pub fn run(path: &Path, json: bool, format: FormatChoice) -> anyhow::Result<ExitCode> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = file
        .metadata()
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    let name = path.file_name().and_then(|n| n.to_str());
    let table = read_tensor_table_as(&mut BufReader::new(file), len, format, name)
        .with_context(|| format!("{} was rejected", path.display()))?;
    if json {
        // Everything the human output shows, with the same flat `format` and prefixed digest as
        // the seal record's JSON.
        let (format, version) = match table.format {
            ModelFormat::Raw => ("raw", None),
            ModelFormat::Gguf { version } => ("gguf", Some(version)),
            ModelFormat::Safetensors => ("safetensors", None),
        };
        let document = serde_json::json!({
            "file": path.display().to_string(),
            "size": len,
            "format": format,
            "format_version": version,
            "data_offset": table.data_offset,
            "tensor_table_digest": format!("sha256:{}", hex_string(&table.digest()?)),
            "tensors": table.tensors,
            "metadata": table.metadata,
        });
        println!("{}", serde_json::to_string_pretty(&document)?);
    } else {
        print_table(path, len, &table)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `gguf v3`, `safetensors` or `raw`.
pub fn format_name(format: ModelFormat) -> String {
    match format {
        ModelFormat::Gguf { version } => format!("gguf v{version}"),
        ModelFormat::Safetensors => "safetensors".to_owned(),
        ModelFormat::Raw => "raw (not a recognised container: one tensor named `raw`)".to_owned(),
    }
}

fn print_table(path: &Path, len: u64, table: &TensorTable) -> anyhow::Result<()> {
    println!("file: {}", path.display());
    println!("size: {}", vram_residency::ids::bytes(len));
    println!("format: {}", format_name(table.format));
    println!("data section starts at: byte {}", table.data_offset);
    println!(
        "tensor table digest: sha256:{}",
        hex_string(&table.digest()?)
    );
    println!("tensors: {}", table.tensors.len());
    let name_width = table
        .tensors
        .iter()
        .map(|t| t.name.chars().count())
        .max()
        .unwrap_or(4)
        .clamp(4, 60);
    println!(
        "  {:<name_width$}  {:<8}  {:<24}  {:>14}  {:>14}",
        "name", "dtype", "shape", "offset", "bytes"
    );
    for t in &table.tensors {
        let shape = format!(
            "[{}]",
            t.shape
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!(
            "  {:<name_width$}  {:<8}  {:<24}  {:>14}  {:>14}",
            t.name, t.dtype, shape, t.offset, t.bytes
        );
    }
    if !table.metadata.is_empty() {
        println!("metadata: {} entries", table.metadata.len());
        for entry in &table.metadata {
            println!("  {} = {}", entry.key, entry.summary);
        }
    }
    Ok(())
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
