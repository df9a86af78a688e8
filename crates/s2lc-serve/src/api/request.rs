//! The body of `/v1/completions` and `/v1/chat/completions` and its validation.
//!
//! Every field the server reads is listed here; any other field is refused with a 400 that names
//! it, so a client never believes a setting was honoured when it was not. Supported: `model`,
//! `prompt` / `messages`, `max_tokens`, `temperature` (below
//! [`s2lc_model::generate::MIN_TEMPERATURE`] sampling is greedy), `top_p`, `seed`, `stream`,
//! `stop` (up to four strings, also honoured while streaming), `n` (1 only), `logprobs` (an
//! integer 0–20 for completions; `true`/`false` with `top_logprobs` 0–20 for chat),
//! `presence_penalty` and `frequency_penalty` (−2 … 2), `user` (accepted, not used), and S2LC's
//! `adapter`, `route` and `morph`.

use serde::Deserialize;
use serde_json::Value;

use s2lc_model::generate::SamplingParams;

use super::error::ApiError;
use crate::batch::Penalties;

/// Most stop strings a request may give (OpenAI's limit).
pub const MAX_STOP: usize = 4;
/// Most alternatives per token a request may ask for with `logprobs` / `top_logprobs`.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// One chat message.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// A completion request as sent.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletionRequest {
    /// The base id, or `base:adapter@requirement`.
    pub model: Option<String>,
    /// The prompt (completions).
    pub prompt: Option<Value>,
    /// The conversation (chat).
    pub messages: Option<Vec<Message>>,
    /// Most tokens to generate.
    pub max_tokens: Option<usize>,
    /// Sampling temperature in [0, 2].
    pub temperature: Option<f32>,
    /// Nucleus sampling in (0, 1].
    pub top_p: Option<f32>,
    /// Seed of the sampler.
    pub seed: Option<u64>,
    /// Server-sent events.
    pub stream: Option<bool>,
    /// Strings that end the completion (not included in it).
    pub stop: Option<Value>,
    /// Choices per request: 1 only.
    pub n: Option<u64>,
    /// Completions: how many alternatives per token (0–20); chat: whether to report them.
    pub logprobs: Option<Value>,
    /// Chat: how many alternatives per token (0–20).
    pub top_logprobs: Option<usize>,
    /// Lowers the logits of tokens already generated, once.
    pub presence_penalty: Option<f32>,
    /// Lowers the logits of tokens already generated, per appearance.
    pub frequency_penalty: Option<f32>,
    /// An end-user id; accepted for compatibility, not used.
    pub user: Option<String>,
    /// S2LC: the adapter, `name@requirement`, or `auto` to route by the prompt.
    pub adapter: Option<String>,
    /// S2LC: tags for the tag rules, `"key=value,…"` or `{"key": "value"}`.
    pub route: Option<Value>,
    /// S2LC: member weights of the pack named by the adapter, `{"member": weight}`, or `"auto"`.
    pub morph: Option<Value>,
}

/// The generation settings of a validated request.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Temperature, top-p and seed.
    pub sampling: SamplingParams,
    /// Presence and frequency penalties.
    pub penalties: Penalties,
    /// `Some(k)`: report log-probabilities with `k` alternatives per token.
    pub logprobs: Option<usize>,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Whether to stream.
    pub stream: bool,
}

/// Parses a body; a field the server does not know is named in the error.
pub fn parse(body: &[u8]) -> Result<CompletionRequest, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let msg = e.to_string();
        if msg.starts_with("unknown field") {
            ApiError::bad(format!("unsupported field: {msg}"))
        } else {
            ApiError::bad(format!("malformed JSON body: {msg}"))
        }
    })
}

impl CompletionRequest {
    /// Checks the generation settings against the server's `max_tokens` limit.
    pub fn params(&self, chat: bool, limit: usize) -> Result<Params, ApiError> {
        let max_tokens = self.max_tokens.unwrap_or(16);
        if max_tokens > limit {
            return Err(ApiError::bad(format!(
                "max_tokens {max_tokens} is over this server's limit of {limit}"
            )));
        }
        let temperature = self.temperature.unwrap_or(0.0);
        let top_p = self.top_p.unwrap_or(1.0);
        if !((0.0..=2.0).contains(&temperature) && top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::bad(format!(
                "temperature must be in [0, 2] and top_p in (0, 1] (got {temperature}, {top_p})"
            )));
        }
        if let Some(n) = self.n.filter(|&n| n != 1) {
            return Err(ApiError::bad(format!(
                "n = {n} is not supported: the server returns one choice per request (send n \
                 requests with different seeds)"
            )));
        }
        let penalty = |name: &str, v: Option<f32>| match v {
            None => Ok(0.0),
            Some(v) if (-2.0..=2.0).contains(&v) => Ok(v),
            Some(v) => Err(ApiError::bad(format!(
                "{name} must be in [-2, 2] (got {v})"
            ))),
        };
        let penalties = Penalties {
            presence: penalty("presence_penalty", self.presence_penalty)?,
            frequency: penalty("frequency_penalty", self.frequency_penalty)?,
        };
        Ok(Params {
            max_tokens,
            sampling: SamplingParams {
                temperature,
                top_p,
                seed: self.seed.unwrap_or(0),
            },
            penalties,
            logprobs: self.logprobs(chat)?,
            stop: self.stop_strings()?,
            stream: self.stream.unwrap_or(false),
        })
    }

    /// `logprobs` in the completions form (an integer) or the chat form (a boolean, with
    /// `top_logprobs`).
    fn logprobs(&self, chat: bool) -> Result<Option<usize>, ApiError> {
        let top = |k: usize, name: &str| {
            if k > MAX_TOP_LOGPROBS {
                Err(ApiError::bad(format!(
                    "{name} must be at most {MAX_TOP_LOGPROBS} (got {k})"
                )))
            } else {
                Ok(k)
            }
        };
        match (chat, &self.logprobs) {
            (false, _) if self.top_logprobs.is_some() => Err(ApiError::bad(
                "top_logprobs is a chat field: completions take an integer logprobs",
            )),
            (false, None | Some(Value::Null)) => Ok(None),
            (false, Some(v)) => match v.as_u64() {
                Some(k) => top(k as usize, "logprobs").map(Some),
                None => Err(ApiError::bad(format!(
                    "logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS} (got {v})"
                ))),
            },
            (true, None | Some(Value::Null) | Some(Value::Bool(false))) => {
                match self.top_logprobs {
                    Some(_) => Err(ApiError::bad("top_logprobs needs logprobs: true")),
                    None => Ok(None),
                }
            }
            (true, Some(Value::Bool(true))) => {
                top(self.top_logprobs.unwrap_or(0), "top_logprobs").map(Some)
            }
            (true, Some(v)) => Err(ApiError::bad(format!(
                "logprobs must be true or false in a chat request (got {v})"
            ))),
        }
    }

    /// `stop`: one string or up to [`MAX_STOP`] non-empty strings.
    fn stop_strings(&self) -> Result<Vec<String>, ApiError> {
        let bad = || {
            ApiError::bad(format!(
                "stop must be a non-empty string or an array of 1 to {MAX_STOP} non-empty strings"
            ))
        };
        let stop: Vec<String> = match &self.stop {
            None | Some(Value::Null) => return Ok(Vec::new()),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) if !a.is_empty() && a.len() <= MAX_STOP => a
                .iter()
                .map(|v| v.as_str().map(str::to_string).ok_or_else(bad))
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(bad()),
        };
        if stop.iter().any(String::is_empty) {
            return Err(bad());
        }
        Ok(stop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(body: &str, chat: bool) -> Result<Params, String> {
        parse(body.as_bytes())
            .and_then(|r| r.params(chat, 64))
            .map_err(|e| e.message)
    }

    #[test]
    fn unknown_fields_are_named() {
        for field in ["echo", "best_of", "logit_bias", "suffix"] {
            let err = params(&format!(r#"{{"prompt": "a", "{field}": 1}}"#), false).unwrap_err();
            assert!(err.contains(field) && err.contains("unsupported"), "{err}");
        }
    }

    #[test]
    fn settings_are_checked_and_read() {
        let p = params(
            r#"{"prompt": "a", "max_tokens": 5, "temperature": 0.5, "seed": 3, "n": 1,
                "stop": ["\n\n", "END"], "logprobs": 2, "presence_penalty": 0.5,
                "frequency_penalty": -1}"#,
            false,
        )
        .unwrap();
        assert_eq!(p.max_tokens, 5);
        assert_eq!(p.sampling.seed, 3);
        assert_eq!(p.stop, vec!["\n\n".to_string(), "END".to_string()]);
        assert_eq!(p.logprobs, Some(2));
        assert_eq!(
            p.penalties,
            Penalties {
                presence: 0.5,
                frequency: -1.0
            }
        );
        let chat = params(r#"{"logprobs": true, "top_logprobs": 3}"#, true).unwrap();
        assert_eq!(chat.logprobs, Some(3));
        assert_eq!(
            params(r#"{"logprobs": false}"#, true).unwrap().logprobs,
            None
        );
        for (body, chat, needle) in [
            (r#"{"n": 2}"#, false, "n = 2"),
            (r#"{"max_tokens": 65}"#, false, "limit of 64"),
            (r#"{"temperature": 2.5}"#, false, "temperature"),
            (r#"{"top_p": 0}"#, false, "top_p"),
            (r#"{"stop": []}"#, false, "stop"),
            (r#"{"stop": ["a","b","c","d","e"]}"#, false, "stop"),
            (r#"{"stop": [""]}"#, false, "stop"),
            (r#"{"stop": 3}"#, false, "stop"),
            (r#"{"logprobs": 21}"#, false, "at most 20"),
            (r#"{"logprobs": true}"#, false, "integer"),
            (r#"{"top_logprobs": 2}"#, false, "chat field"),
            (r#"{"logprobs": 2}"#, true, "true or false"),
            (r#"{"top_logprobs": 2}"#, true, "needs logprobs"),
            (r#"{"presence_penalty": 3}"#, false, "presence_penalty"),
            (r#"{"frequency_penalty": -2.5}"#, false, "frequency_penalty"),
            (r#"{"temperature": "hot"}"#, false, "malformed"),
        ] {
            let err = params(body, chat).unwrap_err();
            assert!(err.contains(needle), "{body}: {err}");
        }
    }
}
