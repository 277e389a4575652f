//! Loads a GGUF, runs one chat prompt greedily and prints the text and the speed figures.
//! Usage: cargo run --release -p nanofleet-inference --example generate -- MODEL.gguf [PROMPT] [MAX_TOKENS]

use std::io::Write;
use std::ops::ControlFlow;

use nanofleet_inference::{ChatMessage, Engine, EngineOptions, GenerateRequest};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or("usage: generate MODEL.gguf [PROMPT] [MAX_TOKENS]")?;
    let prompt = args
        .next()
        .unwrap_or_else(|| "Explain in a few sentences why the sky is blue.".to_string());
    let max_tokens: usize = args.next().map(|n| n.parse()).transpose()?.unwrap_or(128);

    let engine = Engine::load(&path, EngineOptions::default())?;
    let info = engine.model_info();
    eprintln!(
        "loaded {:?} ({:?}) in {:.3} s, context {}",
        info.name,
        info.architecture,
        info.load_time.as_secs_f64(),
        info.context_length
    );
    let text = engine.render_chat(&[ChatMessage::new("user", prompt)])?;
    let completion = engine.generate(&GenerateRequest::greedy(text, max_tokens), |event| {
        print!("{}", event.text);
        let _ = std::io::stdout().flush();
        ControlFlow::Continue(())
    })?;
    let stats = &completion.stats;
    eprintln!(
        "\nprompt {} tokens at {:.1} tok/s; generated {} tokens at {:.1} tok/s; time to first token {:.3} s; finish {:?}",
        stats.prompt_tokens,
        stats.prompt_tokens_per_second(),
        stats.completion_tokens,
        stats.generation_tokens_per_second(),
        stats.time_to_first_token.as_secs_f64(),
        stats.finish_reason
    );
    Ok(())
}
