//! A Hugging Face checkpoint directory: which files to seal, and whether they agree with
//! `model.safetensors.index.json`. Every `*.safetensors` file is one shard; other files
//! (`config.json`, tokenizer files...) are not weights and are left alone.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use vram_residency::format::TensorTable;

/// The index file's name.
pub const INDEX: &str = "model.safetensors.index.json";

/// What to seal: the weight files in name order, and the index's tensor -> file map if present.
#[derive(Debug)]
pub struct Plan {
    pub files: Vec<(String, PathBuf)>,
    pub index: Option<BTreeMap<String, String>>,
}

/// `weight_map` entries in file order, duplicates kept (a JSON object may repeat a key; serde's
/// maps would silently keep the last one).
struct Entries(Vec<(String, String)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object mapping tensor names to file names")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry::<String, String>()? {
                    entries.push(entry);
                }
                Ok(Entries(entries))
            }
        }
        deserializer.deserialize_map(V)
    }
}

#[derive(Deserialize)]
struct IndexFile {
    weight_map: Entries,
}

/// Lists the weight files of `dir` and reads its index, if any, checking that the two agree on
/// file names.
///
/// # Errors
/// A message for `CheckpointError`.
pub fn plan(dir: &Path) -> Result<Plan, String> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        if name.ends_with(".safetensors") {
            files.push((name.to_owned(), entry.path()));
        }
    }
    files.sort();
    let index_path = dir.join(INDEX);
    let index = match std::fs::read(&index_path) {
        Ok(bytes) => Some(read_index(&bytes)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(format!("cannot read {INDEX}: {e}")),
    };
    if files.is_empty() {
        return Err(format!("no *.safetensors file in {}", dir.display()));
    }
    if let Some(index) = &index {
        for (tensor, file) in index {
            if !files.iter().any(|(name, _)| name == file) {
                return Err(format!(
                    "{INDEX} places tensor {tensor:?} in {file:?}, which is not a *.safetensors \
                     file of the directory"
                ));
            }
        }
        for (name, _) in &files {
            if !index.values().any(|file| file == name) {
                return Err(format!(
                    "{name} is not named by {INDEX} (a stray or foreign weight file)"
                ));
            }
        }
    }
    Ok(Plan { files, index })
}

fn read_index(bytes: &[u8]) -> Result<BTreeMap<String, String>, String> {
    let parsed: IndexFile =
        serde_json::from_slice(bytes).map_err(|e| format!("{INDEX} does not parse: {e}"))?;
    let mut map = BTreeMap::new();
    for (tensor, file) in parsed.weight_map.0 {
        if let Some(first) = map.insert(tensor.clone(), file.clone()) {
            return Err(format!(
                "{INDEX} names tensor {tensor:?} twice (in {first:?} and {file:?})"
            ));
        }
    }
    Ok(map)
}

/// Checks the sealed tables: no tensor in two files, and with an index, each file holds exactly
/// the tensors the index places in it.
///
/// # Errors
/// A message for `CheckpointError`.
pub fn check_tables(plan: &Plan, tables: &[(&str, Option<&TensorTable>)]) -> Result<(), String> {
    let mut seen: HashMap<&str, &str> = HashMap::new();
    for (file, table) in tables {
        let Some(table) = table else {
            return Err(format!("{file} has no tensor table"));
        };
        for tensor in &table.tensors {
            if let Some(other) = seen.insert(&tensor.name, file) {
                return Err(format!(
                    "tensor {:?} is in both {other} and {file}",
                    tensor.name
                ));
            }
            if let Some(index) = &plan.index {
                match index.get(&tensor.name) {
                    Some(listed) if listed == file => {}
                    Some(listed) => {
                        return Err(format!(
                            "tensor {:?} is in {file} but {INDEX} places it in {listed}",
                            tensor.name
                        ));
                    }
                    None => {
                        return Err(format!(
                            "tensor {:?} of {file} is not in {INDEX}",
                            tensor.name
                        ));
                    }
                }
            }
        }
    }
    if let Some(index) = &plan.index {
        for (tensor, file) in index {
            if !seen.contains_key(tensor.as_str()) {
                return Err(format!(
                    "{INDEX} places tensor {tensor:?} in {file}, which does not hold it"
                ));
            }
        }
    }
    Ok(())
}
