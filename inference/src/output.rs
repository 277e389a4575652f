//! Turning a stream of token bytes into released text: UTF-8 characters split across tokens are
//! held until complete, and text that could be the start of a stop sequence is held until it is
//! known not to be one, so a stop sequence is never shown even when it spans several tokens.

/// Text released after one token, and whether a stop sequence was reached.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Released {
    pub text: String,
    pub stopped: bool,
}

pub(crate) struct TextOutput {
    stop: Vec<String>,
    /// Bytes of an unfinished UTF-8 character.
    partial: Vec<u8>,
    /// Text not yet released because it may begin a stop sequence.
    held: String,
}

impl TextOutput {
    pub(crate) fn new(stop: &[String]) -> Self {
        Self {
            stop: stop.iter().filter(|s| !s.is_empty()).cloned().collect(),
            partial: Vec::new(),
            held: String::new(),
        }
    }

    /// Adds one token's bytes and returns what can be shown now.
    pub(crate) fn push(&mut self, piece: &[u8]) -> Released {
        self.partial.extend_from_slice(piece);
        self.held.push_str(&take_complete_utf8(&mut self.partial));
        if let Some(at) = self
            .stop
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            self.held.truncate(at);
            return Released {
                text: std::mem::take(&mut self.held),
                stopped: true,
            };
        }
        let keep = self.longest_stop_prefix_at_end();
        let text = self.held[..self.held.len() - keep].to_string();
        self.held.drain(..self.held.len() - keep);
        Released {
            text,
            stopped: false,
        }
    }

    /// Everything still held, when generation ends without a stop sequence.
    pub(crate) fn finish(&mut self) -> String {
        let mut text = std::mem::take(&mut self.held);
        text.push_str(&String::from_utf8_lossy(&std::mem::take(&mut self.partial)));
        text
    }

    /// Length in bytes of the longest end of `held` that is a proper prefix of a stop sequence.
    fn longest_stop_prefix_at_end(&self) -> usize {
        let held = self.held.as_str();
        self.stop
            .iter()
            .flat_map(|stop| {
                (1..stop.len().min(held.len() + 1))
                    .filter(|&n| stop.is_char_boundary(n) && held.ends_with(&stop[..n]))
                    .max()
            })
            .max()
            .unwrap_or(0)
    }
}

/// Removes and returns the complete characters at the front of `bytes`; an incomplete character
/// at the end stays, invalid bytes become U+FFFD.
fn take_complete_utf8(bytes: &mut Vec<u8>) -> String {
    let mut text = String::new();
    let mut rest: &[u8] = bytes;
    loop {
        match std::str::from_utf8(rest) {
            Ok(valid) => {
                text.push_str(valid);
                rest = &[];
                break;
            }
            Err(e) => {
                let (valid, after) = rest.split_at(e.valid_up_to());
                text.push_str(std::str::from_utf8(valid).expect("checked by valid_up_to"));
                match e.error_len() {
                    Some(bad) => {
                        text.push(char::REPLACEMENT_CHARACTER);
                        rest = &after[bad..];
                    }
                    None => {
                        rest = after;
                        break;
                    }
                }
            }
        }
    }
    let consumed = bytes.len() - rest.len();
    bytes.drain(..consumed);
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stop: &[&str], pieces: &[&[u8]]) -> (Vec<String>, bool, String) {
        let stop: Vec<String> = stop.iter().map(|s| s.to_string()).collect();
        let mut out = TextOutput::new(&stop);
        let mut released = Vec::new();
        for piece in pieces {
            let r = out.push(piece);
            released.push(r.text);
            if r.stopped {
                return (released, true, String::new());
            }
        }
        (released, false, out.finish())
    }

    #[test]
    fn stop_sequence_across_tokens_is_not_shown() {
        let (released, stopped, _) = run(&["\nUser:"], &[b"Hi", b" there\n", b"Us", b"er: more"]);
        assert!(stopped);
        assert_eq!(released.concat(), "Hi there");
        // The newline was held back while it could start the stop sequence.
        assert_eq!(released[1], " there");
    }

    #[test]
    fn false_alarm_is_released_later() {
        let (released, stopped, rest) = run(&["END"], &[b"the E", b"ND", b"x"]);
        assert!(stopped);
        assert_eq!(released, vec!["the ", ""]);
        assert_eq!(rest, "");
        let (released, stopped, rest) = run(&["END"], &[b"the E", b"nd"]);
        assert!(!stopped);
        assert_eq!(released.concat() + &rest, "the End");
    }

    #[test]
    fn characters_split_across_tokens_wait_until_complete() {
        let euro = "€".as_bytes();
        let (released, _, rest) = run(&[], &[&euro[..1], &euro[1..], b"!"]);
        assert_eq!(released, vec!["", "€", "!"]);
        assert_eq!(rest, "");
        let (released, _, rest) = run(&[], &[b"a\xff", &euro[..2]]);
        assert_eq!(released, vec!["a\u{fffd}", ""]);
        assert_eq!(rest, "\u{fffd}");
    }
}
