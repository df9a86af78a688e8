//! Continuous batching: one thread owns the decode loop over the base model, and requests join
//! and leave it between steps.
//!
//! Each step runs the next token of every active sequence as one batched forward pass
//! ([`LlamaModel::decode_batch`]): the base weights are read once for all rows, while attention
//! (each sequence has its own KV cache) and the LoRA deltas (each sequence its own adapter) run
//! per row. A new request is prefilled alone between two steps, then decodes with the others.
//! At most `max_batch` sequences decode at once; the rest wait in arrival order, holding no
//! cache.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use s2lc_model::generate::{Sampler, SamplingParams};
use s2lc_model::kv::DenseKvCache;
use s2lc_model::llama::{BatchRow, ForwardScratch, LlamaModel};
use s2lc_model::lora::LoraAdapter;

/// One generation request for the batcher.
pub struct Submission {
    /// Prompt token ids (not empty; prompt + `max_tokens` fit the context).
    pub prompt: Vec<u32>,
    /// Most tokens to generate (the stop token, when reached, is the last one sent).
    pub max_tokens: usize,
    /// How tokens are picked.
    pub sampling: SamplingParams,
    /// The sequence's adapter, if any.
    pub adapter: Option<Arc<LoraAdapter>>,
    /// Where the sequence's tokens go; dropping the receiver cancels the sequence.
    pub events: Sender<Event>,
}

/// What a sequence reports, in order: its tokens, then exactly one `Done`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The next generated token id.
    Token(u32),
    /// Generation ended: a stop token or `max_tokens` (`Ok`), or a failure named in `Err`.
    Done(Result<(), String>),
}

/// The handle requests submit through; the decode thread ends when the handle is dropped and the
/// last sequence finishes.
#[derive(Debug)]
pub struct Batcher {
    tx: Option<Sender<Submission>>,
    thread: Option<JoinHandle<()>>,
}

impl Batcher {
    /// Starts the decode thread over `model`, ending sequences at any id in `stop`.
    ///
    /// # Panics
    /// If `max_batch` is 0 or the thread cannot be spawned.
    pub fn start(model: LlamaModel, stop: Vec<u32>, max_batch: usize) -> Self {
        assert!(max_batch > 0, "a batch needs at least one row");
        let (tx, rx) = channel();
        let thread = std::thread::Builder::new()
            .name("s2lc-decode".into())
            .spawn(move || decode_loop(model, stop, max_batch, rx))
            .expect("spawning the decode thread");
        Batcher {
            tx: Some(tx),
            thread: Some(thread),
        }
    }

    /// Queues a request; `false` if the decode thread is gone (then nothing will be sent).
    pub fn submit(&self, submission: Submission) -> bool {
        self.tx
            .as_ref()
            .is_some_and(|tx| tx.send(submission).is_ok())
    }
}

impl Drop for Batcher {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A sequence being decoded.
struct Seq {
    cache: DenseKvCache,
    sampler: Sampler,
    adapter: Option<Arc<LoraAdapter>>,
    events: Sender<Event>,
    /// The last sampled token: sent, and the input of the next step.
    next: u32,
    produced: usize,
    max_tokens: usize,
}

impl Seq {
    /// Sends the token just sampled; `true` while the sequence should go on (not stopped, not
    /// at its limit, the client still listening). A finished sequence has sent `Done`.
    fn deliver(&mut self, token: u32, stop: &[u32]) -> bool {
        self.next = token;
        self.produced += 1;
        if self.events.send(Event::Token(token)).is_err() {
            return false;
        }
        if stop.contains(&token) || self.produced >= self.max_tokens {
            let _ = self.events.send(Event::Done(Ok(())));
            return false;
        }
        true
    }

    /// Ends the sequence with an error.
    fn fail(&self, message: String) {
        let _ = self.events.send(Event::Done(Err(message)));
    }
}

/// The loop of the decode thread: admit, prefill, step, until the handle is dropped and nothing
/// is left.
fn decode_loop(model: LlamaModel, stop: Vec<u32>, max_batch: usize, rx: Receiver<Submission>) {
    let vocab = model.config().vocab_size;
    let mut scratch = ForwardScratch::default();
    let mut logits = Vec::new();
    let mut waiting: VecDeque<Submission> = VecDeque::new();
    let mut active: Vec<Seq> = Vec::new();
    let mut open = true;
    loop {
        if active.is_empty() && waiting.is_empty() {
            if !open {
                return;
            }
            match rx.recv() {
                Ok(s) => waiting.push_back(s),
                Err(_) => return,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(s) => waiting.push_back(s),
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        while active.len() < max_batch {
            let Some(sub) = waiting.pop_front() else {
                break;
            };
            if let Some(seq) = prefill(&model, sub, &stop, &mut scratch, &mut logits) {
                active.push(seq);
            }
        }
        if active.is_empty() {
            continue;
        }
        // Rows with the same adapter next to each other share one delta product.
        active.sort_by_key(|s| s.adapter.as_ref().map_or(0, |a| Arc::as_ptr(a) as usize));
        let step = catch_unwind(AssertUnwindSafe(|| {
            let mut rows: Vec<BatchRow<'_>> = active
                .iter_mut()
                .map(|s| BatchRow {
                    token: s.next,
                    cache: &mut s.cache,
                    adapter: s.adapter.as_deref(),
                })
                .collect();
            model.decode_batch(&mut rows, &mut scratch, &mut logits)
        }));
        match step {
            Ok(Ok(())) => {
                let mut i = 0;
                active.retain_mut(|s| {
                    let row = &logits[i * vocab..(i + 1) * vocab];
                    i += 1;
                    let token = s.sampler.sample(row);
                    s.deliver(token, &stop)
                });
            }
            Ok(Err(e)) => {
                for s in active.drain(..) {
                    s.fail(format!("decoding failed: {e}"));
                }
            }
            Err(_) => {
                for s in active.drain(..) {
                    s.fail("decoding failed: internal error (a panic in the decode step)".into());
                }
                scratch = ForwardScratch::default();
            }
        }
    }
}

/// Runs a new sequence's prompt and sends its first token; the sequence if it goes on.
fn prefill(
    model: &LlamaModel,
    sub: Submission,
    stop: &[u32],
    scratch: &mut ForwardScratch,
    logits: &mut Vec<f32>,
) -> Option<Seq> {
    let mut seq = Seq {
        cache: model.dense_cache(sub.prompt.len() + sub.max_tokens),
        sampler: Sampler::new(sub.sampling),
        adapter: sub.adapter,
        events: sub.events,
        next: 0,
        produced: 0,
        max_tokens: sub.max_tokens,
    };
    if sub.max_tokens == 0 {
        let _ = seq.events.send(Event::Done(Ok(())));
        return None;
    }
    let run = catch_unwind(AssertUnwindSafe(|| {
        model.forward_last_adapted(
            &sub.prompt,
            &mut seq.cache,
            seq.adapter.as_deref(),
            scratch,
            logits,
        )
    }));
    match run {
        Ok(Ok(())) => {
            let token = seq.sampler.sample(logits);
            seq.deliver(token, stop).then_some(seq)
        }
        Ok(Err(e)) => {
            seq.fail(format!("prefill failed: {e}"));
            None
        }
        Err(_) => {
            seq.fail("prefill failed: internal error (a panic in the forward pass)".into());
            *scratch = ForwardScratch::default();
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use s2lc_model::generate::generate;

    /// The SmolLM2 asset is not needed: a small random model shows the scheduling.
    fn model() -> LlamaModel {
        s2lc_model::llama::random_model(16, 24, 2, (2, 1), 11, 5)
    }

    fn collect(rx: Receiver<Event>) -> (Vec<u32>, Result<(), String>) {
        let mut tokens = Vec::new();
        for e in rx {
            match e {
                Event::Token(t) => tokens.push(t),
                Event::Done(r) => return (tokens, r),
            }
        }
        panic!("no Done event");
    }

    #[test]
    fn concurrent_sequences_get_what_they_would_get_alone() {
        let m = model();
        let stop = vec![10u32];
        let prompts: Vec<Vec<u32>> = vec![vec![1, 2, 3], vec![4], vec![5, 6, 7, 8, 9], vec![2, 2]];
        let sampling = |seed| SamplingParams {
            temperature: 0.8,
            top_p: 0.9,
            seed,
        };
        let want: Vec<Vec<u32>> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let mut cache = m.dense_cache(64);
                let mut sampler = Sampler::new(sampling(i as u64));
                generate(&m, &mut cache, p, 12, &mut sampler, &stop, |_| true)
                    .unwrap()
                    .generated
            })
            .collect();
        // Batches of 3: the fourth waits for a free row, then joins mid-flight.
        let batcher = Batcher::start(m, stop, 3);
        let receivers: Vec<Receiver<Event>> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let (tx, rx) = channel();
                assert!(batcher.submit(Submission {
                    prompt: p.clone(),
                    max_tokens: 12,
                    sampling: sampling(i as u64),
                    adapter: None,
                    events: tx,
                }));
                rx
            })
            .collect();
        for (rx, want) in receivers.into_iter().zip(&want) {
            let (got, done) = collect(rx);
            assert_eq!(done, Ok(()));
            assert_eq!(&got, want);
        }
    }

    #[test]
    fn a_cancelled_or_failing_sequence_leaves_the_others_running() {
        let m = model();
        let limit = m.config().max_seq_len;
        let batcher = Batcher::start(m, vec![], 4);
        let submit = |prompt: Vec<u32>, max_tokens: usize| {
            let (tx, rx) = channel();
            assert!(batcher.submit(Submission {
                prompt,
                max_tokens,
                sampling: SamplingParams::default(),
                adapter: None,
                events: tx,
            }));
            rx
        };
        let cancelled = submit(vec![1, 2], 50);
        drop(cancelled);
        // A prompt past the context fails alone, with the reason.
        let too_long = submit(vec![1; limit + 1], 1);
        let fine = submit(vec![3, 4], 20);
        let (_, err) = collect(too_long);
        assert!(err.unwrap_err().contains("context"));
        let (tokens, done) = collect(fine);
        assert_eq!((tokens.len(), done), (20, Ok(())));
        let zero = submit(vec![3], 0);
        assert_eq!(collect(zero), (vec![], Ok(())));
    }
}
