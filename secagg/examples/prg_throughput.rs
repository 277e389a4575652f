//! Measures keystream throughput of the shipped mask PRG and of the stream-cipher
//! candidates it was chosen from.
use aes::{Aes128, Aes256};
use ctr::cipher::{KeyIvInit, StreamCipher};
use nanofleet_secagg::prg::{MaskKey, MaskPrg};
use std::time::Instant;

/// Runs `keystream` over a 64 KiB buffer until 1 GiB has gone through it.
fn measure(name: &str, mut keystream: impl FnMut(&mut [u8])) {
    let mut buf = vec![0u8; 64 * 1024];
    let total = 1usize << 30;
    let start = Instant::now();
    let mut n = 0;
    while n < total {
        keystream(&mut buf);
        n += buf.len();
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{name:<16} {:>6.2} GB/s  (checksum {})",
        total as f64 / secs / 1e9,
        buf[7]
    );
}

fn cipher(mut c: impl StreamCipher) -> impl FnMut(&mut [u8]) {
    move |buf| c.apply_keystream(buf)
}

fn main() {
    let key = [7u8; 32];
    let mut shipped = MaskPrg::new(&MaskKey::from_bytes(key));
    measure("mask prg", |buf| shipped.fill(buf));
    measure(
        "aes256-ctr64le",
        cipher(ctr::Ctr64LE::<Aes256>::new(&key.into(), &[0u8; 16].into())),
    );
    measure(
        "aes256-ctr128be",
        cipher(ctr::Ctr128BE::<Aes256>::new(&key.into(), &[0u8; 16].into())),
    );
    measure(
        "aes128-ctr64le",
        cipher(ctr::Ctr64LE::<Aes128>::new(
            &[7u8; 16].into(),
            &[0u8; 16].into(),
        )),
    );
    measure(
        "chacha20",
        cipher(chacha20::ChaCha20::new(&key.into(), &[0u8; 12].into())),
    );
    measure(
        "chacha12",
        cipher(chacha20::ChaCha12::new(&key.into(), &[0u8; 12].into())),
    );
}
