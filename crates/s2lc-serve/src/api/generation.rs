//! Generating for a job: the tokens from the batcher turned into text pieces, cut at stop
//! strings, with their log-probabilities; and the JSON of answers and stream chunks.
//!
//! Waiting for tokens is asynchronous (no thread is held per request), and dropping a
//! [`Generation`] (the client left, the deadline passed, a stop string was met) takes its
//! sequence out of the batch at the next step.

use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use s2lc_model::lora::AdapterDeltas;
use s2lc_model::tokenizer::{StreamDecoder, Tokenizer};

use super::error::ApiError;
use super::prepare::Job;
use super::AppState;
use crate::batch::{Event, Submission, TokenLogprobs};

/// Finds stop strings in streamed text: text is released only once no stop string can begin in
/// it, so a stop string split across pieces is still cut, and no text after it is ever sent.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text not yet released: it ends with what may be the start of a stop string.
    held: String,
}

impl StopMatcher {
    /// A matcher for `stops` (none: every piece passes through).
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops,
            held: String::new(),
        }
    }

    /// Adds a piece; returns the text that can be released and whether a stop string was met
    /// (then the released text ends just before it, and what follows is dropped).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        if self.stops.is_empty() {
            return (piece.to_string(), false);
        }
        self.held.push_str(piece);
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = first {
            let out = self.held[..at].to_string();
            self.held.clear();
            return (out, true);
        }
        // Hold back the longest tail that is a proper prefix of some stop string.
        let keep = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.held[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.held.len());
        let out = self.held[..keep].to_string();
        self.held.drain(..keep);
        (out, false)
    }

    /// The end of the text: whatever was held back.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// What a generation yields next.
#[derive(Debug)]
pub enum Step {
    /// Text (possibly empty when only log-probabilities are new) and the log-probabilities of
    /// the tokens read since the last step (when asked for).
    Piece(String, Vec<(u32, TokenLogprobs)>),
    /// The end, with OpenAI's finish reason (`stop` or `length`).
    Finished(&'static str),
}

/// A job's sequence in the batch, read as text.
pub struct Generation<'a> {
    rx: Option<UnboundedReceiver<Event>>,
    decoder: StreamDecoder<'a>,
    stops: StopMatcher,
    stop_ids: &'a [u32],
    logprobs: Vec<(u32, TokenLogprobs)>,
    /// Tokens generated so far.
    pub tokens: usize,
    finished: Option<&'static str>,
    stop_token: bool,
}

impl<'a> Generation<'a> {
    /// Submits a job to the batcher.
    pub fn start(s: &'a AppState, job: &Job) -> Result<Self, ApiError> {
        let e = &s.engine;
        let (tx, rx) = unbounded_channel();
        let p = &job.plan.params;
        let submitted = e.batcher.submit(Submission {
            prompt: job.plan.prompt.clone(),
            max_tokens: p.max_tokens,
            sampling: p.sampling,
            penalties: p.penalties,
            logprobs: p.logprobs,
            adapter: job
                .adapter
                .clone()
                .map(|a| a as std::sync::Arc<dyn AdapterDeltas>),
            events: tx,
        });
        if !submitted {
            return Err(ApiError::internal("the decode loop has stopped"));
        }
        Ok(Generation {
            rx: Some(rx),
            decoder: e.tokenizer.stream_decoder(),
            stops: StopMatcher::new(p.stop.clone()),
            stop_ids: &e.stop,
            logprobs: Vec::new(),
            tokens: 0,
            finished: None,
            stop_token: false,
        })
    }

    /// The next piece of text, or the end.
    pub async fn next(&mut self) -> Result<Step, ApiError> {
        loop {
            if let Some(reason) = self.finished {
                return Ok(Step::Finished(reason));
            }
            let event = match self.rx.as_mut() {
                Some(rx) => rx.recv().await,
                None => None,
            };
            let (id, lp) = match event {
                Some(Event::Token(id, lp)) => (id, lp),
                Some(Event::Done(Ok(()))) => {
                    self.rx = None;
                    let mut rest = match self.decoder.flush().map_err(ApiError::internal)? {
                        Some(tail) => self.stops.push(&tail).0,
                        None => String::new(),
                    };
                    rest.push_str(&self.stops.finish());
                    self.finished = Some(if self.stop_token { "stop" } else { "length" });
                    if rest.is_empty() && self.logprobs.is_empty() {
                        continue;
                    }
                    return Ok(Step::Piece(rest, std::mem::take(&mut self.logprobs)));
                }
                Some(Event::Done(Err(message))) => return Err(ApiError::internal(message)),
                None => return Err(ApiError::internal("the decode loop has stopped")),
            };
            self.tokens += 1;
            if let Some(lp) = lp {
                self.logprobs.push((id, lp));
            }
            if self.stop_ids.contains(&id) {
                self.stop_token = true;
                continue;
            }
            let Some(piece) = self.decoder.push(id).map_err(ApiError::internal)? else {
                continue;
            };
            let (text, hit) = self.stops.push(&piece);
            if hit {
                // Dropping the receiver takes the sequence out of the batch.
                self.rx = None;
                self.finished = Some("stop");
            }
            if !text.is_empty() || hit {
                return Ok(Step::Piece(text, std::mem::take(&mut self.logprobs)));
            }
        }
    }
}

/// A token as text (its bytes decoded on their own; a piece of a character shows as U+FFFD).
fn token_text(tokenizer: &Tokenizer, id: u32) -> String {
    tokenizer.decode(&[id], false).unwrap_or_default()
}

/// The `logprobs` object of a completions choice: tokens, their log-probabilities, the top
/// alternatives and each token's offset in the text.
pub fn completion_logprobs(
    tokenizer: &Tokenizer,
    records: &[(u32, TokenLogprobs)],
    offset0: usize,
) -> Value {
    let mut offset = offset0;
    let (mut tokens, mut lps, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
    for (id, lp) in records {
        let t = token_text(tokenizer, *id);
        offsets.push(offset);
        offset += t.len();
        tokens.push(t);
        lps.push(lp.logprob);
        let top: serde_json::Map<String, Value> = lp
            .top
            .iter()
            .map(|(alt, l)| (token_text(tokenizer, *alt), json!(l)))
            .collect();
        tops.push(Value::Object(top));
    }
    json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}

/// The `logprobs` object of a chat choice: `{"content": [{token, logprob, bytes, top_logprobs}]}`.
pub fn chat_logprobs(tokenizer: &Tokenizer, records: &[(u32, TokenLogprobs)]) -> Value {
    let entry = |id: u32, logprob: f32| {
        let t = token_text(tokenizer, id);
        json!({"token": t, "logprob": logprob, "bytes": t.as_bytes()})
    };
    let content: Vec<Value> = records
        .iter()
        .map(|(id, lp)| {
            let mut e = entry(*id, lp.logprob);
            e["top_logprobs"] = lp.top.iter().map(|(a, l)| entry(*a, *l)).collect();
            e
        })
        .collect();
    json!({ "content": content })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let (text, hit) = m.push(p);
            out.push_str(&text);
            if hit {
                return (out, true);
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn stop_strings_are_cut_even_across_pieces() {
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
        assert_eq!(
            run(&["END"], &["hello E", "N", "D more"]),
            ("hello ".into(), true)
        );
        assert_eq!(run(&["\n\n"], &["one\n", "\ntwo"]), ("one".into(), true));
        // A partial match that does not complete is released at the end.
        assert_eq!(run(&["END"], &["hello EN"]), ("hello EN".into(), false));
        // The earliest of several stop strings wins.
        assert_eq!(run(&["cd", "b"], &["abcd"]), ("a".into(), true));
        // Multi-byte characters are held and released whole.
        assert_eq!(run(&["é!"], &["café", " ok"]), ("café ok".into(), false));
    }

    #[test]
    fn released_text_never_contains_a_stop_string() {
        // Every split of a text into two pieces gives the same cut as the whole text at once.
        let text = "the quick brown fox jumps over the lazy dog";
        let stops = ["fox j", "lazy"];
        let whole = run(&stops, &[text]);
        assert_eq!(whole, ("the quick brown ".into(), true));
        for i in 1..text.len() {
            assert_eq!(
                run(&stops, &[&text[..i], &text[i..]]),
                whole,
                "split at {i}"
            );
        }
    }
}
