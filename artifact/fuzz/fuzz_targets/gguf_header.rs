//! Arbitrary bytes as the start of a GGUF file: the parser must never panic, never
//! allocate beyond its limits, and everything it accepts must survive the size check
//! and the summary.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nanofleet_artifact::gguf::{GgufHeader, Limits, ParseOutcome};

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    if let Ok(ParseOutcome::Complete(header)) = GgufHeader::parse_prefix(data, &limits) {
        let _ = header.summary();
        let _ = header.validate_against_size(data.len() as u64);
        // The incremental reader must agree with the one-shot parse. Compared as Debug
        // text because metadata may hold NaN floats, which are never equal to themselves.
        let read = GgufHeader::read_from(data, &limits).expect("a complete prefix reads");
        assert_eq!(format!("{read:?}"), format!("{header:?}"));
    }
});
