//! Adapter and update bytes from nodes and uploads: the bounded safetensors decoder. What
//! it accepts must encode back to an equal adapter.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nanofleet_federated::AdapterTensors;

fuzz_target!(|data: &[u8]| {
    if let Ok(adapter) = AdapterTensors::from_safetensors(data) {
        let again = AdapterTensors::from_safetensors(&adapter.to_safetensors(None))
            .expect("what decodes re-encodes");
        assert_eq!(again, adapter);
    }
});
