//! Writes one of the crate's tiny random GGUF models, e.g. for llama.cpp to read in
//! tools/make-testdata.sh.
//! Usage: cargo run --release -p nanofleet-inference --example write_tiny_model -- OUT.gguf ARCH (byte-level|sentencepiece) SEED

use nanofleet_inference::tiny::{write_tiny_model, TinyTokenizer};
use nanofleet_inference::Architecture;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [out, arch, tokenizer, seed] = args.as_slice() else {
        return Err("usage: write_tiny_model OUT.gguf ARCH (byte-level|sentencepiece) SEED".into());
    };
    let tokenizer = match tokenizer.as_str() {
        "byte-level" => TinyTokenizer::ByteLevel,
        "sentencepiece" => TinyTokenizer::SentencePiece,
        other => return Err(format!("unknown tokenizer {other}").into()),
    };
    write_tiny_model(
        out,
        Architecture::from_gguf_name(arch)?,
        tokenizer,
        seed.parse()?,
    )?;
    Ok(())
}
