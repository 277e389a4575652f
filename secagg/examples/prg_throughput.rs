//! Measures keystream throughput of the stream-cipher candidates for the mask PRG.
use aes::{Aes128, Aes256};
use ctr::cipher::{KeyIvInit, StreamCipher};
use std::time::Instant;

fn measure<C: StreamCipher>(name: &str, mut cipher: C) {
    let mut buf = vec![0u8; 64 * 1024];
    let total = 1usize << 30;
    let start = Instant::now();
    let mut n = 0;
    while n < total {
        cipher.apply_keystream(&mut buf);
        n += buf.len();
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{name:<16} {:>6.2} GB/s  (checksum {})",
        total as f64 / secs / 1e9,
        buf[7]
    );
}

fn main() {
    let key = [7u8; 32];
    measure(
        "aes256-ctr64le",
        ctr::Ctr64LE::<Aes256>::new(&key.into(), &[0u8; 16].into()),
    );
    measure(
        "aes256-ctr128be",
        ctr::Ctr128BE::<Aes256>::new(&key.into(), &[0u8; 16].into()),
    );
    measure(
        "aes128-ctr64le",
        ctr::Ctr64LE::<Aes128>::new(&[7u8; 16].into(), &[0u8; 16].into()),
    );
    measure(
        "chacha20",
        chacha20::ChaCha20::new(&key.into(), &[0u8; 12].into()),
    );
    measure(
        "chacha12",
        chacha20::ChaCha12::new(&key.into(), &[0u8; 12].into()),
    );
}
