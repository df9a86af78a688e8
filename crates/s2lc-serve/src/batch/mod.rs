//! Continuous batching: one thread owns the decode loop over the base model, and requests join
//! and leave it between steps.
//!
//! Each step runs the next token of every active sequence as one batched forward pass
//! ([`LlamaModel::decode_batch`]): the base weights are read once for all rows, while attention
//! (each sequence has its own KV cache) and the LoRA deltas (each sequence its own adapter) run
//! per row. A new request's prompt is prefilled in chunks of at most `prefill_chunk` tokens, one
//! chunk between two decode steps, so a long prompt delays the other streams by one chunk per
//! step rather than by its whole prefill. At most `max_batch` sequences hold a KV cache at once
//! (prefilling or decoding); the rest wait in arrival order, holding nothing.
//!
//! Faults stay with their request: a step that fails or panics is re-run row by row, and only the
//! rows that fail alone are ended with the error. A request whose receiver is gone (its client
//! left, or its deadline passed) is dropped before its prefill or at its next token.

use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::mpsc::UnboundedSender;

use s2lc_model::generate::{Sampler, SamplingParams};
use s2lc_model::kv::compressed::{Coding, RecentDtype, GROUP};
use s2lc_model::kv::{AttnShape, KvCache, KvSpec};
use s2lc_model::llama::{BatchRow, ForwardScratch, LlamaModel};
use s2lc_model::lora::AdapterDeltas;

/// OpenAI's presence and frequency penalties: before sampling, the logit of every token already
/// generated `c > 0` times is lowered by `presence + c·frequency`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Penalties {
    /// Subtracted once from every token that has appeared.
    pub presence: f32,
    /// Subtracted per appearance.
    pub frequency: f32,
}

impl Penalties {
    fn is_zero(&self) -> bool {
        self.presence == 0.0 && self.frequency == 0.0
    }
}

/// One generation request for the batcher.
pub struct Submission {
    /// Prompt token ids (not empty; prompt + `max_tokens` fit the context).
    pub prompt: Vec<u32>,
    /// Most tokens to generate (the stop token, when reached, is the last one sent).
    pub max_tokens: usize,
    /// How tokens are picked.
    pub sampling: SamplingParams,
    /// Presence and frequency penalties.
    pub penalties: Penalties,
    /// `Some(k)`: report each token's log-probability and the `k` most likely alternatives.
    pub logprobs: Option<usize>,
    /// The sequence's adapter, if any.
    pub adapter: Option<Arc<dyn AdapterDeltas>>,
    /// Where the sequence's tokens go; dropping the receiver cancels the sequence.
    pub events: UnboundedSender<Event>,
}

/// The log-probability of a generated token (natural log, of the distribution after penalties at
/// temperature 1) and the most likely tokens at that position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// Log-probability of the token that was picked.
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// What a sequence reports, in order: its tokens, then exactly one `Done`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The next generated token id, with its log-probabilities when they were asked for.
    Token(u32, Option<TokenLogprobs>),
    /// Generation ended: a stop token or `max_tokens` (`Ok`), or a failure named in `Err`.
    Done(Result<(), String>),
}

/// How the decode loop schedules.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchConfig {
    /// Sequences holding a KV cache at once (prefilling or decoding); at least 1.
    pub max_batch: usize,
    /// Most prompt tokens run between two decode steps; at least 1.
    pub prefill_chunk: usize,
    /// The KV cache of every sequence (`s2lc bench kv`'s specs: dense, q8, q4, spectral…).
    pub kv: KvSpec,
    /// Bytes the sequences' KV caches may reserve together; a sequence is admitted when its
    /// bound ([`kv_bytes_bound`] at prompt + `max_tokens`) fits beside those running.
    pub kv_memory: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_batch: 8,
            prefill_chunk: 128,
            kv: KvSpec::Dense,
            kv_memory: usize::MAX,
        }
    }
}

/// An upper bound of the bytes a `spec` cache holds at `tokens` tokens, per the layouts of
/// [`s2lc_model::kv`]: dense f32 keys and values; q8 and q4 groups of 32 values with an f16 scale
/// (34 and 18 bytes), behind the sink tokens (f32) and a window plus one partial block held in
/// the spec's `recent` form (int8 groups by default for q8 and q4; f32 rows of a pass in flight
/// are transient and not counted). A
/// spectral side is bounded by f32 (its rank, and so its size, is known only once coded); keys
/// ranked by attention error add the queries' second moments they keep.
pub fn kv_bytes_bound(spec: &KvSpec, n_layers: usize, shape: AttnShape, tokens: usize) -> usize {
    let kv_dim = shape.kv_dim();
    let f32_side = tokens * kv_dim * 4;
    let (per_side, moments) = match spec {
        KvSpec::Dense => return n_layers * 2 * f32_side,
        KvSpec::Compressed(c) => (
            [c.keys, c.values].map(|coding| {
                let sink = c.sink.min(tokens);
                let recent = (c.window + c.block).min(tokens - sink);
                let coded = tokens - sink - recent;
                let groups = kv_dim.div_ceil(GROUP);
                let per_token = match coding {
                    Coding::Q8 => groups * 34,
                    Coding::Q4 => groups * 18,
                    Coding::Spectral { .. } => kv_dim * 4,
                };
                let recent_per_token = match c.recent {
                    RecentDtype::F32 => kv_dim * 4,
                    RecentDtype::F16 => kv_dim * 2,
                    RecentDtype::Q8 => groups * 34,
                };
                sink * kv_dim * 4 + recent * recent_per_token + coded * per_token
            }),
            {
                // Keys ranked by attention error keep each layer's recent queries' second moments
                // (per KV head, an upper triangle), plus one full `d × d` scratch.
                let hd = shape.head_dim;
                if c.needs_query_moments() {
                    4 * (n_layers * shape.n_kv_heads * hd * (hd + 1) / 2 + hd * hd)
                } else {
                    0
                }
            },
        ),
    };
    n_layers * (per_side[0] + per_side[1]) + moments
}

/// The handle requests submit through; the decode thread ends when the handle is dropped and the
/// last sequence finishes.
#[derive(Debug)]
pub struct Batcher {
    tx: Option<Sender<Submission>>,
    thread: Option<JoinHandle<()>>,
    occupancy: Arc<Occupancy>,
}

/// How many sequences the decode loop holds, for `/metrics` (updated once per loop turn).
#[derive(Debug, Default)]
pub struct Occupancy {
    /// Sequences with a KV cache (prefilling or decoding).
    pub running: AtomicUsize,
    /// Sequences waiting for a free row.
    pub waiting: AtomicUsize,
    /// Bytes the running sequences' KV caches hold now.
    pub kv_bytes: AtomicUsize,
    /// Bytes reserved for them (their bounds at their full length).
    pub kv_reserved: AtomicUsize,
}

impl Batcher {
    /// Starts the decode thread over `model`, ending sequences at any id in `stop`.
    ///
    /// # Panics
    /// If `config.max_batch` or `config.prefill_chunk` is 0, the KV spec does not fit the model
    /// (check it first with [`KvSpec::check`]), or the thread cannot be spawned.
    pub fn start(model: LlamaModel, stop: Vec<u32>, config: BatchConfig) -> Self {
        assert!(config.max_batch > 0, "a batch needs at least one row");
        assert!(config.prefill_chunk > 0, "a prefill chunk needs a token");
        if let Err(e) = config.kv.check(model.attn_shape()) {
            panic!("the KV cache spec does not fit the model: {e}");
        }
        let (tx, rx) = channel();
        let occupancy = Arc::new(Occupancy::default());
        let occ = occupancy.clone();
        let thread = std::thread::Builder::new()
            .name("s2lc-decode".into())
            .spawn(move || decode_loop(model, stop, config, rx, &occ))
            .expect("spawning the decode thread");
        Batcher {
            tx: Some(tx),
            thread: Some(thread),
            occupancy,
        }
    }

    /// What the decode loop holds now.
    pub fn occupancy(&self) -> &Occupancy {
        &self.occupancy
    }

    /// Queues a request; `false` if the decode thread is gone (then nothing will be sent). The
    /// queue itself is not bounded here: the server admits at most a bounded number of requests.
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

/// A sequence holding a KV cache: prefilling (`prompt[fed..]` still to run) or decoding.
struct Seq {
    cache: Box<dyn KvCache>,
    /// Bytes reserved for the cache at the sequence's full length.
    reserved: usize,
    sampler: Sampler,
    penalties: Penalties,
    /// How often each token has been generated (only kept when penalties apply).
    counts: HashMap<u32, u32>,
    logprobs: Option<usize>,
    adapter: Option<Arc<dyn AdapterDeltas>>,
    events: UnboundedSender<Event>,
    prompt: Vec<u32>,
    /// Prompt tokens already in the cache.
    fed: usize,
    /// The last sampled token: sent, and the input of the next step.
    next: u32,
    produced: usize,
    max_tokens: usize,
}

impl Seq {
    /// Picks the next token from this sequence's logits row (penalized in place) and sends it;
    /// `true` while the sequence should go on (not stopped, not at its limit, the client still
    /// listening). A finished sequence has sent `Done`.
    fn take_next(&mut self, row: &mut [f32], stop: &[u32]) -> bool {
        if !self.penalties.is_zero() {
            for (&id, &c) in &self.counts {
                if let Some(l) = row.get_mut(id as usize) {
                    *l -= self.penalties.presence + c as f32 * self.penalties.frequency;
                }
            }
        }
        let token = self.sampler.sample(row);
        let logprobs = self.logprobs.map(|k| token_logprobs(row, token, k));
        if !self.penalties.is_zero() {
            *self.counts.entry(token).or_insert(0) += 1;
        }
        self.next = token;
        self.produced += 1;
        if self.events.send(Event::Token(token, logprobs)).is_err() {
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

/// The log-probability of `token` under `softmax(row)` and the `k` most likely tokens.
fn token_logprobs(row: &[f32], token: u32, k: usize) -> TokenLogprobs {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + row.iter().map(|&l| (l - max).exp()).sum::<f32>().ln();
    let lp = |id: u32| row[id as usize] - lse;
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(k);
    if k > 0 {
        // One pass keeping the k best in a small sorted list (k ≤ 20).
        for (i, &l) in row.iter().enumerate() {
            if top.len() < k || l > top[top.len() - 1].1 {
                let at = top.partition_point(|&(_, v)| v >= l);
                top.insert(at, (i as u32, l));
                top.truncate(k);
            }
        }
    }
    TokenLogprobs {
        logprob: lp(token),
        top: top.into_iter().map(|(id, l)| (id, l - lse)).collect(),
    }
}

/// The loop of the decode thread: admit, prefill a chunk, step, until the handle is dropped and
/// nothing is left.
fn decode_loop(
    model: LlamaModel,
    stop: Vec<u32>,
    config: BatchConfig,
    rx: Receiver<Submission>,
    occupancy: &Occupancy,
) {
    let vocab = model.config().vocab_size;
    let mut scratch = ForwardScratch::default();
    let mut logits = Vec::new();
    let mut waiting: VecDeque<Submission> = VecDeque::new();
    let mut prefilling: VecDeque<Seq> = VecDeque::new();
    let mut active: Vec<Seq> = Vec::new();
    let mut open = true;
    let (n_layers, shape) = (model.config().n_layers, model.attn_shape());
    loop {
        let running = active.len() + prefilling.len();
        let held = || active.iter().chain(prefilling.iter());
        let reserved: usize = held().map(|s| s.reserved).sum();
        occupancy.running.store(running, Ordering::Relaxed);
        occupancy.waiting.store(waiting.len(), Ordering::Relaxed);
        occupancy.kv_reserved.store(reserved, Ordering::Relaxed);
        occupancy
            .kv_bytes
            .store(held().map(|s| s.cache.bytes()).sum(), Ordering::Relaxed);
        if active.is_empty() && prefilling.is_empty() && waiting.is_empty() {
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
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        let mut reserved = reserved;
        while active.len() + prefilling.len() < config.max_batch {
            let Some(sub) = waiting.front() else {
                break;
            };
            let need = kv_bytes_bound(
                &config.kv,
                n_layers,
                shape,
                sub.prompt.len() + sub.max_tokens,
            );
            let idle = active.is_empty() && prefilling.is_empty();
            if need > config.kv_memory {
                if let Some(sub) = waiting.pop_front() {
                    let _ = sub.events.send(Event::Done(Err(format!(
                        "the request needs up to {need} bytes of KV cache, over the server's \
                         --kv-memory of {} (ask for fewer tokens)",
                        config.kv_memory
                    ))));
                }
                continue;
            }
            if !idle && reserved + need > config.kv_memory {
                break;
            }
            let Some(sub) = waiting.pop_front() else {
                break;
            };
            if let Some(seq) = admit(&model, &config.kv, sub, need) {
                reserved += need;
                prefilling.push_back(seq);
            }
        }
        if let Some(mut seq) = prefilling.pop_front() {
            match prefill_chunk(
                &model,
                &mut seq,
                config.prefill_chunk,
                &mut scratch,
                &mut logits,
            ) {
                Err(message) => seq.fail(message),
                // Round robin: a short prompt behind a long one waits one chunk, not all of it.
                Ok(false) => prefilling.push_back(seq),
                Ok(true) => {
                    if seq.take_next(&mut logits[..vocab], &stop) {
                        active.push(seq);
                    }
                }
            }
        }
        if !active.is_empty() {
            step(&model, &mut active, &stop, &mut scratch, &mut logits);
        }
    }
}

/// A waiting request becomes a sequence with its KV cache, unless its client has gone or it
/// asks for nothing.
fn admit(model: &LlamaModel, kv: &KvSpec, sub: Submission, reserved: usize) -> Option<Seq> {
    if sub.events.is_closed() {
        return None;
    }
    if sub.max_tokens == 0 {
        let _ = sub.events.send(Event::Done(Ok(())));
        return None;
    }
    if let Some(a) = &sub.adapter {
        if let Err(e) = model.check_adapter(a.as_ref()) {
            let _ = sub
                .events
                .send(Event::Done(Err(format!("the adapter does not fit: {e}"))));
            return None;
        }
    }
    let cfg = model.config();
    let cache = match kv.cache(
        cfg.n_layers,
        model.attn_shape(),
        sub.prompt.len() + sub.max_tokens,
    ) {
        Ok(c) => c,
        Err(e) => {
            let _ = sub
                .events
                .send(Event::Done(Err(format!("the KV cache: {e}"))));
            return None;
        }
    };
    Some(Seq {
        cache,
        reserved,
        sampler: Sampler::new(sub.sampling),
        penalties: sub.penalties,
        counts: HashMap::new(),
        logprobs: sub.logprobs,
        adapter: sub.adapter,
        events: sub.events,
        prompt: sub.prompt,
        fed: 0,
        next: 0,
        produced: 0,
        max_tokens: sub.max_tokens,
    })
}

/// Runs the next chunk of a sequence's prompt into its cache: `Ok(true)` when the prompt is done
/// (the last position's logits are in `logits`), `Ok(false)` when more is left.
fn prefill_chunk(
    model: &LlamaModel,
    seq: &mut Seq,
    chunk: usize,
    scratch: &mut ForwardScratch,
    logits: &mut Vec<f32>,
) -> Result<bool, String> {
    if seq.events.is_closed() {
        return Err("the client has gone".into());
    }
    let end = (seq.fed + chunk).min(seq.prompt.len());
    let last = end == seq.prompt.len();
    let tokens = &seq.prompt[seq.fed..end];
    let run = catch_unwind(AssertUnwindSafe(|| {
        if last {
            model.forward_last_adapted(
                tokens,
                seq.cache.as_mut(),
                seq.adapter.as_deref(),
                scratch,
                logits,
            )
        } else {
            model
                .forward_hidden_adapted(tokens, seq.cache.as_mut(), seq.adapter.as_deref(), scratch)
                .map(|_| ())
        }
    }));
    match run {
        Ok(Ok(())) => {
            seq.fed = end;
            Ok(last)
        }
        Ok(Err(e)) => Err(format!("prefill failed: {e}")),
        Err(_) => {
            *scratch = ForwardScratch::default();
            Err("prefill failed: internal error (a panic in the forward pass)".into())
        }
    }
}

/// Runs one decode step over `rows` (with their adapters' deltas); `Err` names the failure.
fn run_rows(
    model: &LlamaModel,
    rows: &mut [Seq],
    scratch: &mut ForwardScratch,
    logits: &mut Vec<f32>,
) -> Result<(), String> {
    let step = catch_unwind(AssertUnwindSafe(|| {
        let mut batch: Vec<BatchRow<'_>> = rows
            .iter_mut()
            .map(|s| BatchRow {
                token: s.next,
                cache: s.cache.as_mut(),
                adapter: s.adapter.as_deref(),
            })
            .collect();
        model.decode_batch(&mut batch, scratch, logits)
    }));
    match step {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("decoding failed: {e}")),
        Err(_) => {
            *scratch = ForwardScratch::default();
            Err("decoding failed: internal error (a panic in the decode step)".into())
        }
    }
}

/// One decode step of every active sequence, then a token for each. A failed step commits
/// nothing to the caches ([`LlamaModel::decode_batch`] checks every row first and commits at the
/// end), so it is re-run one row at a time and only the rows that fail alone end.
fn step(
    model: &LlamaModel,
    active: &mut Vec<Seq>,
    stop: &[u32],
    scratch: &mut ForwardScratch,
    logits: &mut Vec<f32>,
) {
    let vocab = model.config().vocab_size;
    // Rows with the same adapter, or over the same pack, next to each other share their delta
    // products.
    active.sort_by_key(|s| {
        s.adapter.as_ref().map_or((0, 0), |a| {
            let id = Arc::as_ptr(a) as *const () as usize;
            (a.shared_state().unwrap_or(id), id)
        })
    });
    if run_rows(model, active, scratch, logits).is_ok() {
        let mut rows = logits.chunks_mut(vocab);
        active.retain_mut(|s| rows.next().is_some_and(|row| s.take_next(row, stop)));
        return;
    }
    active.retain_mut(
        |s| match run_rows(model, std::slice::from_mut(s), scratch, logits) {
            Ok(()) => s.take_next(&mut logits[..vocab], stop),
            Err(message) => {
                s.fail(message);
                false
            }
        },
    );
}

#[cfg(test)]
mod tests;
