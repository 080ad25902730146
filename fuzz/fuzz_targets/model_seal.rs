//! Fuzz the model-seal-record decoder: strict decoding must never panic, and whatever it accepts must
//! re-encode to exactly the same bytes (the encoding is canonical: one record, one byte string).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vram_residency::ModelSealRecord;

fuzz_target!(|data: &[u8]| {
    if let Ok(record) = ModelSealRecord::decode(data) {
        let again = record.encode().expect("a decoded model seal record must encode");
        assert_eq!(again, data, "decode/encode is not canonical");
    }
});
