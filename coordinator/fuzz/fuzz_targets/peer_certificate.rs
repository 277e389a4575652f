//! Client certificates: the role the coordinator reads from a certificate's URI SAN.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = nanofleet_coordinator::identity::principal_of_der(data);
});
