//! Fuzz the safetensors header reader: a table that fits the file, or a typed error; never a panic.
#![no_main]

#[path = "check.rs"]
mod check;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(table) = vram_residency::format::read_tensor_table_from_bytes(data) {
        check::check_table(&table, data.len() as u64);
    }
});
