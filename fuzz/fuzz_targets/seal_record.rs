//! Fuzz the seal-record decoder: strict decoding must never panic, and whatever it accepts must
//! re-encode to exactly the same bytes (the encoding is canonical: one record, one byte string).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vram_residency::SealRecord;

fuzz_target!(|data: &[u8]| {
    if let Ok(record) = SealRecord::decode(data) {
        let again = record.encode().expect("a decoded record must encode");
        assert_eq!(again, data, "decode/encode is not canonical");
    }
});
