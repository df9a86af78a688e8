//! The forward pass: embedding, the decoder blocks over one sequence or a batch of sequences
//! (with per-sequence LoRA deltas), the final norm and the output head.

use faer::Accum;

use super::profile::Lap;
use super::{layer_norm, rms_norm, LinearInput, LlamaModel, Part, Profile};
use crate::error::ModelError;
use crate::kernels::dot::QuantizedActs;
use crate::kv::KvCache;
use crate::linear::{Linear, LinearScratch};
use crate::lora::{same_adapter, AdapterDeltas, DeltaScratch};

/// Sees the inputs of linear layers during [`LlamaModel::run_block`] (`x` is `n × width`, row-major).
pub trait ActivationObserver {
    /// Called once per input kind per block run.
    fn observe(&mut self, layer: usize, input: LinearInput, x: &[f32], n: usize);
}

/// One sequence of a batched decode step ([`LlamaModel::decode_batch`]): its next token, its KV
/// cache, and the adapter whose deltas apply to it alone (on top of any attached to the model).
pub struct BatchRow<'a> {
    /// The token to run, at position `cache.len()`.
    pub token: u32,
    /// The sequence's own cache; the token is committed to it.
    pub cache: &'a mut dyn KvCache,
    /// This sequence's adapter, if any (a PEFT adapter, or a pack member or blend running from
    /// the pack's bases).
    pub adapter: Option<&'a dyn AdapterDeltas>,
}

/// What a forward pass runs over: `n` consecutive tokens of one sequence (prefill, or one decode
/// step), or one token of each of `n` sequences (a batched decode step).
enum Seqs<'c, 'r> {
    /// One sequence, with its own adapter (if any) on top of the attached ones.
    One(&'c mut dyn KvCache, Option<&'r dyn AdapterDeltas>),
    Batch(&'c mut [BatchRow<'r>]),
}

/// Buffers reused across forward passes (sized on first use, then only re-used).
#[derive(Debug, Default)]
pub struct ForwardScratch {
    x: Vec<f32>,
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    tokens: Vec<u32>,
    linear: LinearScratch,
    deltas: DeltaScratch,
    /// When set, wall time per part of the forward pass accumulates here.
    pub profile: Option<Profile>,
}

/// Adds each sequence's own adapter delta for linear `j` of `layer`: `out_i += Δᵢ·x_i`, one call
/// per run of consecutive batch rows sharing an adapter, or sharing resident state (the bases of
/// one pack: [`AdapterDeltas::apply_rows`] then projects those rows through them together).
fn row_deltas(
    seqs: &Seqs<'_, '_>,
    layer: usize,
    j: usize,
    x: &[f32],
    out: &mut [f32],
    scratch: &mut DeltaScratch,
    acts: &mut QuantizedActs,
) {
    let rows = match seqs {
        Seqs::One(_, Some(adapter)) => {
            if let Some((_, inp)) = adapter.shape(layer, j) {
                adapter.apply(layer, j, x, x.len() / inp, out, scratch, acts);
            }
            return;
        }
        Seqs::One(_, None) => return,
        Seqs::Batch(rows) => rows,
    };
    let n = rows.len();
    let (xw, ow) = (x.len() / n, out.len() / n);
    let mut start = 0;
    while start < n {
        let Some(first) = rows[start].adapter else {
            start += 1;
            continue;
        };
        let key = first.shared_state();
        let together = |r: &BatchRow<'_>| match r.adapter {
            Some(a) => same_adapter(a, first) || (key.is_some() && a.shared_state() == key),
            None => false,
        };
        let end = start + rows[start..].iter().take_while(|r| together(r)).count();
        let (x, out) = (&x[start * xw..end * xw], &mut out[start * ow..end * ow]);
        let alike = rows[start..end]
            .iter()
            .all(|r| r.adapter.is_some_and(|a| same_adapter(a, first)));
        if alike {
            if first.shape(layer, j).is_some() {
                first.apply(layer, j, x, end - start, out, scratch, acts);
            }
        } else {
            // The group's adapters, on the stack for the usual batch sizes (no allocation per step).
            let mut stack = [first; 32];
            let mut heap = Vec::new();
            let group: &[&dyn AdapterDeltas] = if end - start <= stack.len() {
                for (slot, r) in stack.iter_mut().zip(&rows[start..end]) {
                    *slot = r.adapter.unwrap_or(first);
                }
                &stack[..end - start]
            } else {
                heap.extend(rows[start..end].iter().filter_map(|r| r.adapter));
                &heap
            };
            first.apply_rows(group, layer, j, x, out, scratch, acts);
        }
        start = end;
    }
}

impl LlamaModel {
    /// Writes the input of the first block for `tokens` at positions `0..n` (`n × d`, row-major)
    /// into `out`: their embeddings, plus the learned position embeddings when the model has them
    /// (GPT-2). What a sequence starting from an empty cache feeds the blocks (calibration).
    pub fn embed(&self, tokens: &[u32], out: &mut Vec<f32>) -> Result<(), ModelError> {
        self.embed_at(tokens, 0..tokens.len(), out)
    }

    /// [`LlamaModel::embed`] with token `i` at `positions[i]` (one position per sequence of a
    /// batch, or consecutive ones). A position past the learned table is
    /// [`ModelError::ContextOverflow`].
    fn embed_at(
        &self,
        tokens: &[u32],
        positions: impl ExactSizeIterator<Item = usize>,
        out: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        let (d, v) = (self.cfg.hidden_size, self.cfg.vocab_size);
        out.resize(tokens.len() * d, 0.0);
        for (row, &t) in out.chunks_exact_mut(d).zip(tokens) {
            if t as usize >= v {
                return Err(ModelError::TokenOutOfRange { id: t, vocab: v });
            }
            self.embed.dequantize_rows(t as usize, t as usize + 1, row);
        }
        if let Some(table) = &self.positions {
            debug_assert_eq!(positions.len(), tokens.len());
            let limit = table.len() / d;
            for (row, p) in out.chunks_exact_mut(d).zip(positions) {
                if p >= limit {
                    return Err(ModelError::ContextOverflow {
                        needed: p + 1,
                        limit,
                    });
                }
                row.iter_mut()
                    .zip(&table[p * d..][..d])
                    .for_each(|(x, e)| *x += e);
            }
        }
        Ok(())
    }

    /// The block norm with `weight`: LayerNorm when it has a `bias` (GPT-2), RMSNorm otherwise.
    fn norm(&self, x: &[f32], weight: &[f32], bias: Option<&[f32]>, out: &mut [f32]) {
        match bias {
            Some(b) => layer_norm(x, weight, b, self.cfg.rms_eps, out),
            None => rms_norm(x, weight, self.cfg.rms_eps, out),
        }
    }

    /// Whether queries and keys are rotated (RoPE) rather than positions added to the input.
    fn uses_rope(&self) -> bool {
        self.positions.is_none()
    }

    /// Runs `tokens` (positions `cache.len()..`) through the decoder, commits them to `cache`, and
    /// returns the final-normed hidden states (`n × d`, row-major) held in `scratch`.
    pub fn forward_hidden<'s>(
        &self,
        tokens: &[u32],
        cache: &mut dyn KvCache,
        scratch: &'s mut ForwardScratch,
    ) -> Result<&'s [f32], ModelError> {
        self.forward_hidden_adapted(tokens, cache, None, scratch)
    }

    /// [`LlamaModel::forward_hidden`] with `adapter`'s deltas for this call only (the model is not
    /// changed, so sequences with different adapters can share it).
    pub fn forward_hidden_adapted<'s>(
        &self,
        tokens: &[u32],
        cache: &mut dyn KvCache,
        adapter: Option<&dyn AdapterDeltas>,
        scratch: &'s mut ForwardScratch,
    ) -> Result<&'s [f32], ModelError> {
        if let Some(a) = adapter {
            self.check_adapter(a)?;
        }
        let n = tokens.len();
        if n == 0 {
            return Err(ModelError::EmptyInput("no tokens to run".into()));
        }
        self.check_context(cache.len(), n)?;
        self.run_seqs(tokens, &mut Seqs::One(cache, adapter), scratch)?;
        Ok(&scratch.h)
    }

    /// Runs `tokens` through every block over `seqs` (the next `n` tokens of one sequence, or one
    /// token per batch row), commits them to the caches, and leaves the final-normed hidden
    /// states (`n × d`) in `scratch.h`. The caller has checked the context and the adapters.
    fn run_seqs(
        &self,
        tokens: &[u32],
        seqs: &mut Seqs<'_, '_>,
        scratch: &mut ForwardScratch,
    ) -> Result<(), ModelError> {
        let n = tokens.len();
        let mut x = std::mem::take(&mut scratch.x);
        let embedded = match seqs {
            Seqs::One(cache, _) => self.embed_at(tokens, cache.len()..cache.len() + n, &mut x),
            Seqs::Batch(rows) => self.embed_at(tokens, rows.iter().map(|r| r.cache.len()), &mut x),
        };
        if let Err(e) = embedded {
            scratch.x = x;
            return Err(e);
        }
        let (cos, sin) = (&mut scratch.cos, &mut scratch.sin);
        match seqs {
            _ if !self.uses_rope() => {}
            Seqs::One(cache, _) => self.rope.tables(cache.len(), n, cos, sin),
            Seqs::Batch(rows) => self
                .rope
                .tables_at(rows.iter().map(|r| r.cache.len()), cos, sin),
        }
        for layer in 0..self.blocks.len() {
            self.block_step(layer, &mut x, n, seqs, scratch, None);
        }
        match seqs {
            Seqs::One(cache, _) => cache.commit(n),
            Seqs::Batch(rows) => rows.iter_mut().for_each(|r| r.cache.commit(1)),
        }
        scratch.h.resize(x.len(), 0.0);
        self.norm(&x, &self.norm, self.norm_bias.as_deref(), &mut scratch.h);
        scratch.x = x;
        Ok(())
    }

    fn check_context(&self, p0: usize, n: usize) -> Result<(), ModelError> {
        if p0 + n > self.cfg.max_seq_len {
            return Err(ModelError::ContextOverflow {
                needed: p0 + n,
                limit: self.cfg.max_seq_len,
            });
        }
        Ok(())
    }

    /// Runs block `layer` in place on the residual stream `x` (`n × d`, positions
    /// `cache.len()..`), showing the inputs of its linear layers to `observer`. The caller commits
    /// the tokens to `cache` after the last block it runs. For calibration, not decoding.
    pub fn run_block(
        &self,
        layer: usize,
        x: &mut [f32],
        cache: &mut dyn KvCache,
        scratch: &mut ForwardScratch,
        observer: Option<&mut dyn ActivationObserver>,
    ) -> Result<(), ModelError> {
        let n = x.len() / self.cfg.hidden_size;
        self.check_context(cache.len(), n)?;
        if self.uses_rope() {
            self.rope
                .tables(cache.len(), n, &mut scratch.cos, &mut scratch.sin);
        }
        self.block_step(layer, x, n, &mut Seqs::One(cache, None), scratch, observer);
        Ok(())
    }

    /// One decoder block on `x` with RoPE tables for the current positions already in `s` (when
    /// the model rotates; learned positions are already in `x`).
    fn block_step(
        &self,
        layer: usize,
        x: &mut [f32],
        n: usize,
        seqs: &mut Seqs<'_, '_>,
        s: &mut ForwardScratch,
        mut observer: Option<&mut dyn ActivationObserver>,
    ) {
        let cfg = &self.cfg;
        let b = &self.blocks[layer];
        let (d, f, qd, kd) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.q_dim(),
            cfg.kv_dim(),
        );
        s.h.resize(n * d, 0.0);
        s.q.resize(n * qd, 0.0);
        s.attn.resize(n * qd, 0.0);
        s.k.resize(n * kd, 0.0);
        s.v.resize(n * kd, 0.0);
        s.gate.resize(n * f, 0.0);
        s.up.resize(n * f, 0.0);
        let mut observe = |input: LinearInput, v: &[f32]| {
            if let Some(o) = observer.as_deref_mut() {
                o.observe(layer, input, v, n);
            }
        };

        let mut lap = Lap::start(&mut s.profile);
        self.norm(x, &b.attn_norm, b.attn_norm_bias.as_deref(), &mut s.h);
        observe(LinearInput::Attention, &s.h);
        lap.mark(Part::Other);
        let ls = &mut s.linear;
        Linear::forward_shared(
            &[&b.q_proj, &b.k_proj, &b.v_proj],
            &s.h,
            n,
            &mut [&mut s.q, &mut s.k, &mut s.v],
            ls,
        );
        for (j, out) in [&mut s.q, &mut s.k, &mut s.v].into_iter().enumerate() {
            for delta in &b.lora[j] {
                delta.apply(&s.h, n, out, &mut s.deltas, ls.acts_mut());
            }
            row_deltas(seqs, layer, j, &s.h, out, &mut s.deltas, ls.acts_mut());
        }
        lap.mark(Part::Qkv);
        if self.uses_rope() {
            self.rope.apply(&mut s.q, qd, &s.cos, &s.sin);
            self.rope.apply(&mut s.k, kd, &s.cos, &s.sin);
        }
        lap.mark(Part::Other);
        match seqs {
            Seqs::One(cache, _) => cache.attend(layer, &s.q, &s.k, &s.v, n, &mut s.attn),
            Seqs::Batch(rows) => {
                for (i, row) in rows.iter_mut().enumerate() {
                    let (q, k, v) = (&s.q[i * qd..][..qd], &s.k[i * kd..][..kd], &s.v[i * kd..]);
                    let out = &mut s.attn[i * qd..][..qd];
                    row.cache.attend(layer, q, k, &v[..kd], 1, out);
                }
            }
        }
        observe(LinearInput::AttentionOutput, &s.attn);
        lap.mark(Part::Attention);
        b.o_proj.forward(&s.attn, n, x, Accum::Add, ls);
        for delta in &b.lora[3] {
            delta.apply(&s.attn, n, x, &mut s.deltas, ls.acts_mut());
        }
        row_deltas(seqs, layer, 3, &s.attn, x, &mut s.deltas, ls.acts_mut());
        lap.mark(Part::Output);

        self.norm(x, &b.ffn_norm, b.ffn_norm_bias.as_deref(), &mut s.h);
        observe(LinearInput::FeedForward, &s.h);
        lap.mark(Part::Other);
        // The hidden activation ends in `s.gate` either way: silu(gate)·up, or gelu_tanh(up).
        match &b.gate_proj {
            Some(gate_proj) => {
                Linear::forward_shared(
                    &[gate_proj, &b.up_proj],
                    &s.h,
                    n,
                    &mut [&mut s.gate, &mut s.up],
                    ls,
                );
                for (j, out) in [(4, &mut s.gate), (5, &mut s.up)] {
                    for delta in &b.lora[j] {
                        delta.apply(&s.h, n, out, &mut s.deltas, ls.acts_mut());
                    }
                    row_deltas(seqs, layer, j, &s.h, out, &mut s.deltas, ls.acts_mut());
                }
                lap.mark(Part::GateUp);
                crate::kernels::ops::silu_mul(&mut s.gate, &s.up);
            }
            None => {
                b.up_proj.forward(&s.h, n, &mut s.gate, Accum::Replace, ls);
                for delta in &b.lora[5] {
                    delta.apply(&s.h, n, &mut s.gate, &mut s.deltas, ls.acts_mut());
                }
                row_deltas(
                    seqs,
                    layer,
                    5,
                    &s.h,
                    &mut s.gate,
                    &mut s.deltas,
                    ls.acts_mut(),
                );
                lap.mark(Part::GateUp);
                crate::kernels::ops::gelu_tanh(&mut s.gate);
            }
        }
        observe(LinearInput::FeedForwardHidden, &s.gate);
        lap.mark(Part::Other);
        b.down_proj.forward(&s.gate, n, x, Accum::Add, ls);
        for delta in &b.lora[6] {
            delta.apply(&s.gate, n, x, &mut s.deltas, ls.acts_mut());
        }
        row_deltas(seqs, layer, 6, &s.gate, x, &mut s.deltas, ls.acts_mut());
        lap.mark(Part::Down);
    }

    /// One decode step of several sequences at once: row `i` runs `rows[i].token` at the next
    /// position of its own cache, with its own adapter, and gets `vocab` logits in row `i` of
    /// `out`. The weights are read once for all rows (batched products); attention and adapter
    /// deltas run per row (consecutive rows with the same adapter share one product). Every
    /// row's context and adapter are checked first; on error nothing is committed.
    pub fn decode_batch(
        &self,
        rows: &mut [BatchRow<'_>],
        scratch: &mut ForwardScratch,
        out: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        if rows.is_empty() {
            return Err(ModelError::EmptyInput("no sequences to run".into()));
        }
        for row in rows.iter() {
            self.check_context(row.cache.len(), 1)?;
            if let Some(a) = row.adapter {
                self.check_adapter(a)?;
            }
        }
        // The token buffer is reused across steps; it is out of `scratch` while the step runs.
        let mut tokens = std::mem::take(&mut scratch.tokens);
        tokens.clear();
        tokens.extend(rows.iter().map(|r| r.token));
        let run = self.run_seqs(&tokens, &mut Seqs::Batch(rows), scratch);
        scratch.tokens = tokens;
        run?;
        let s = scratch;
        let mut lap = Lap::start(&mut s.profile);
        self.head(&s.h, out, &mut s.linear);
        lap.mark(Part::Head);
        Ok(())
    }

    /// Output logits (`n × vocab`, row-major) for `n` final-normed hidden rows (`n × d`).
    pub fn logits(&self, hidden: &[f32], out: &mut Vec<f32>) {
        self.head(hidden, out, &mut LinearScratch::default());
    }

    fn head(&self, hidden: &[f32], out: &mut Vec<f32>, scratch: &mut LinearScratch) {
        let (d, v) = (self.cfg.hidden_size, self.cfg.vocab_size);
        let n = hidden.len() / d;
        out.resize(n * v, 0.0);
        match &self.lm_head {
            Some(head) => head.forward(hidden, n, out, Accum::Replace, scratch),
            None => self
                .embed
                .matmul(hidden, n, out, Accum::Replace, scratch.acts_mut()),
        }
    }

    /// Runs `tokens` and writes the logits of the last position (`vocab` values) into `out`.
    pub fn forward_last(
        &self,
        tokens: &[u32],
        cache: &mut dyn KvCache,
        scratch: &mut ForwardScratch,
        out: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        self.forward_last_adapted(tokens, cache, None, scratch, out)
    }

    /// [`LlamaModel::forward_last`] with `adapter`'s deltas for this call only.
    pub fn forward_last_adapted(
        &self,
        tokens: &[u32],
        cache: &mut dyn KvCache,
        adapter: Option<&dyn AdapterDeltas>,
        scratch: &mut ForwardScratch,
        out: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        let d = self.cfg.hidden_size;
        self.forward_hidden_adapted(tokens, cache, adapter, scratch)?;
        let mut lap = Lap::start(&mut scratch.profile);
        let last = &scratch.h[scratch.h.len() - d..];
        self.head(last, out, &mut scratch.linear);
        lap.mark(Part::Head);
        Ok(())
    }
}
