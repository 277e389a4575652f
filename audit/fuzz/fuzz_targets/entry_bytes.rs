//! Leaf data read back from the store: the canonical entry decoder. What it accepts must
//! encode back to the very same bytes, so a leaf has exactly one entry.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nanofleet_audit::AuditEntry;

fuzz_target!(|data: &[u8]| {
    if let Ok(entry) = AuditEntry::from_canonical_bytes(data) {
        assert_eq!(entry.canonical_bytes(), data);
    }
});
