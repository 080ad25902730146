//! Fuzz the GGUF header reader: any input must give a table that fits the file, or a typed error;
//! never a panic, never an allocation larger than the input allows.
#![no_main]

#[path = "check.rs"]
mod check;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Keep inputs GGUF: prepend the magic when the fuzzer dropped it.
    let owned;
    let input = if data.starts_with(b"GGUF") {
        data
    } else {
        owned = [b"GGUF".as_slice(), data].concat();
        &owned
    };
    if let Ok(table) = vram_residency::format::read_tensor_table_from_bytes(input) {
        check::check_table(&table, input.len() as u64);
    }
});
