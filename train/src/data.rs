//! Training examples: reading them from JSON Lines and splitting off a held-out set.

use std::path::Path;

use nanofleet_inference::ChatMessage;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::{Result, TrainError};

/// One conversation to learn from: the prompt turns and the assistant's answer to them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// The turns before the answer (system, user, earlier assistant turns).
    pub messages: Vec<ChatMessage>,
    /// The answer the model should give; the loss is on its tokens only.
    pub response: String,
}

/// The two line shapes `load_jsonl` accepts; unknown fields are refused so that a typo in a
/// field name is an error instead of a silently empty example.
#[derive(Deserialize)]
#[serde(untagged)]
enum Line {
    Pair(PairLine),
    Chat(ChatLine),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PairLine {
    prompt: String,
    response: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatLine {
    messages: Vec<ChatMessage>,
}

fn line_to_example(line: &str) -> std::result::Result<Example, String> {
    let parsed: Line = serde_json::from_str(line).map_err(|_| {
        "expected {\"prompt\": \"...\", \"response\": \"...\"} or {\"messages\": [{\"role\": \"...\", \"content\": \"...\"}, ...]}".to_string()
    })?;
    match parsed {
        Line::Pair(PairLine { prompt, response }) => Ok(Example {
            messages: vec![ChatMessage::new("user", prompt)],
            response,
        }),
        Line::Chat(ChatLine { mut messages }) => match messages.pop() {
            Some(last) if last.role == "assistant" && !messages.is_empty() => Ok(Example {
                messages,
                response: last.content,
            }),
            Some(_) => Err(
                "the last message must have role \"assistant\" and follow at least one other message".into(),
            ),
            None => Err("`messages` is empty".into()),
        },
    }
}

/// Reads examples from a JSON Lines file: each non-blank line is either
/// `{"prompt": …, "response": …}` or `{"messages": [{"role", "content"}, …]}` whose last
/// message is the assistant's response. The first malformed line is an error naming it.
pub fn load_jsonl(path: &Path) -> Result<Vec<Example>> {
    let text = std::fs::read_to_string(path).map_err(|source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(index, line)| {
            line_to_example(line).map_err(|detail| TrainError::Data {
                path: path.to_path_buf(),
                line: index + 1,
                detail,
            })
        })
        .collect()
}

/// Where an example falls in [0, 1), from a hash of its content alone, so that the split is
/// the same whatever the order of the file or the machine that computes it.
fn example_position(example: &Example) -> f64 {
    let mut hasher = Sha256::new();
    for message in &example.messages {
        // Lengths before contents keep ("ab","c") and ("a","bc") apart.
        for field in [&message.role, &message.content] {
            hasher.update((field.len() as u64).to_le_bytes());
            hasher.update(field.as_bytes());
        }
    }
    hasher.update((example.response.len() as u64).to_le_bytes());
    hasher.update(example.response.as_bytes());
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    // 53 bits: exactly representable as f64.
    (u64::from_le_bytes(first) >> 11) as f64 / (1u64 << 53) as f64
}

/// Splits `examples` into (train, held out): an example is held out when its content hash
/// falls below `fraction`, so about `fraction` of them are, and each always lands on the same
/// side. Order within each part is kept.
pub fn split_holdout(examples: Vec<Example>, fraction: f64) -> (Vec<Example>, Vec<Example>) {
    examples
        .into_iter()
        .partition(|example| example_position(example) >= fraction)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(lines: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), lines).unwrap();
        file
    }

    #[test]
    fn both_shapes_are_read() {
        let file = write(concat!(
            "{\"prompt\": \"2+2?\", \"response\": \"4\"}\n",
            "\n",
            "{\"messages\": [{\"role\": \"system\", \"content\": \"Be brief.\"}, {\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Hello\"}]}\n",
        ));
        let examples = load_jsonl(file.path()).unwrap();
        assert_eq!(
            examples,
            vec![
                Example {
                    messages: vec![ChatMessage::new("user", "2+2?")],
                    response: "4".into()
                },
                Example {
                    messages: vec![
                        ChatMessage::new("system", "Be brief."),
                        ChatMessage::new("user", "Hi")
                    ],
                    response: "Hello".into()
                },
            ]
        );
    }

    #[test]
    fn malformed_lines_are_named() {
        let cases = [
            "not json",
            "{\"prompt\": \"x\"}",
            "{\"prompt\": \"x\", \"response\": \"y\", \"extra\": 1}",
            "{\"messages\": []}",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}",
            "{\"messages\": [{\"role\": \"assistant\", \"content\": \"x\"}, {\"role\": \"user\", \"content\": \"y\"}]}",
        ];
        for case in cases {
            let file = write(&format!(
                "{{\"prompt\": \"a\", \"response\": \"b\"}}\n\n{case}\n"
            ));
            match load_jsonl(file.path()) {
                Err(TrainError::Data { line, .. }) => assert_eq!(line, 3, "{case}"),
                other => panic!("{case}: {other:?}"),
            }
        }
    }

    #[test]
    fn holdout_is_by_content_not_order() {
        let examples: Vec<Example> = (0..200)
            .map(|i| Example {
                messages: vec![ChatMessage::new("user", format!("question {i}"))],
                response: format!("answer {i}"),
            })
            .collect();
        let (train, held) = split_holdout(examples.clone(), 0.2);
        assert_eq!(train.len() + held.len(), 200);
        assert!((20..=60).contains(&held.len()), "{}", held.len());
        let mut reversed = examples.clone();
        reversed.reverse();
        let (_, held_reversed) = split_holdout(reversed, 0.2);
        let mut a: Vec<_> = held.iter().map(|e| e.response.clone()).collect();
        let mut b: Vec<_> = held_reversed.iter().map(|e| e.response.clone()).collect();
        a.sort();
        b.sort();
        assert_eq!(a, b);
        assert_eq!(split_holdout(examples.clone(), 0.0).1.len(), 0);
        assert_eq!(split_holdout(examples, 1.0).0.len(), 0);
    }
}
