//! The batcher against a random model: scheduling, prefill chunks, KV memory and faults.
use super::*;
use s2lc_model::generate::generate;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

/// The SmolLM2 asset is not needed: a small random model shows the scheduling.
fn model() -> LlamaModel {
    s2lc_model::llama::random_model(16, 24, 2, (2, 1), 11, 5)
}

fn collect(mut rx: UnboundedReceiver<Event>) -> (Vec<u32>, Result<(), String>) {
    let mut tokens = Vec::new();
    while let Some(e) = rx.blocking_recv() {
        match e {
            Event::Token(t, _) => tokens.push(t),
            Event::Done(r) => return (tokens, r),
        }
    }
    panic!("no Done event");
}

fn submission(prompt: Vec<u32>, max_tokens: usize) -> (Submission, UnboundedReceiver<Event>) {
    let (tx, rx) = unbounded_channel();
    let sub = Submission {
        prompt,
        max_tokens,
        sampling: SamplingParams::default(),
        penalties: Penalties::default(),
        logprobs: None,
        adapter: None,
        events: tx,
    };
    (sub, rx)
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
    // Batches of 3 with prompts fed two tokens at a time: the fourth waits for a free row,
    // then joins mid-flight, and chunked prompts give the same tokens as whole ones.
    let config = BatchConfig {
        max_batch: 3,
        prefill_chunk: 2,
        ..BatchConfig::default()
    };
    let batcher = Batcher::start(m, stop, config);
    let receivers: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let (mut sub, rx) = submission(p.clone(), 12);
            sub.sampling = sampling(i as u64);
            assert!(batcher.submit(sub));
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
    let batcher = Batcher::start(m, vec![], BatchConfig::default());
    let submit = |prompt: Vec<u32>, max_tokens: usize| {
        let (sub, rx) = submission(prompt, max_tokens);
        assert!(batcher.submit(sub));
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

#[test]
fn a_row_that_fails_mid_batch_ends_alone() {
    // Row A's cache is sized for 3 new tokens but it asks for 40, so its fourth decode step
    // overflows its cache while B and C keep decoding in the same batch.
    let m = model();
    let mut want_b = m.dense_cache(64);
    let mut sampler = Sampler::new(SamplingParams::default());
    let want_b = generate(&m, &mut want_b, &[4, 5], 30, &mut sampler, &[], |_| true)
        .unwrap()
        .generated;
    let limit = m.config().max_seq_len;
    let batcher = Batcher::start(m, vec![], BatchConfig::default());
    // A fills the context: its prompt leaves room for 2 tokens only, so a later step fails.
    let (a, rx_a) = submission(vec![1; limit - 2], 2 + 10);
    let (b, rx_b) = submission(vec![4, 5], 30);
    assert!(batcher.submit(a));
    assert!(batcher.submit(b));
    let (got_a, done_a) = collect(rx_a);
    assert!(done_a.unwrap_err().contains("context"), "{got_a:?}");
    let (got_b, done_b) = collect(rx_b);
    assert_eq!((got_b, done_b), (want_b, Ok(())));
}

#[test]
fn a_long_prompt_is_prefilled_between_decode_steps() {
    // B's 40-token prompt is fed 2 tokens per turn, round robin with A's 2-token prompt, and
    // A decodes a token every turn once its prompt is in: by B's first token A has had about
    // 19 (B's 20 chunks less A's own turn). Prefilled whole, B's first token would come
    // before any of A's.
    let m = model();
    let config = BatchConfig {
        max_batch: 4,
        prefill_chunk: 2,
        ..BatchConfig::default()
    };
    let batcher = Batcher::start(m, vec![], config);
    let (b, mut rx_b) = submission((0..40).map(|i| i % 9).collect(), 1);
    let (a, mut rx_a) = submission(vec![1, 2], 100);
    assert!(batcher.submit(b));
    assert!(batcher.submit(a));
    assert!(matches!(rx_b.blocking_recv(), Some(Event::Token(..))));
    // Every token of A sent before B's first one is already in A's channel.
    let mut a_tokens = 0;
    while let Ok(Event::Token(..)) = rx_a.try_recv() {
        a_tokens += 1;
    }
    assert!(a_tokens >= 15, "A got {a_tokens} tokens during B's prefill");
}

/// The bound holds what each kind of cache holds after a generation, keys ranked by
/// attention error (which keep the queries' second moments) included.
#[test]
fn the_kv_bound_holds_every_cache_kind() {
    let m = s2lc_model::llama::random_model(64, 96, 2, (2, 1), 11, 7);
    let shape = m.attn_shape();
    let n_layers = m.config().n_layers;
    for spec in [
        "dense",
        "q8",
        "q8:recent=f32",
        "q4:block=32",
        "q4",
        "spectral",
        "spectral:block=32,window=16,recent=q8",
        "spectral:kscore=0.05",
        "spectral:kbits=2",
    ] {
        let kv = KvSpec::parse(spec).unwrap();
        kv.check(shape).unwrap();
        for limit in [8, 80] {
            let mut cache = kv.cache(n_layers, shape, limit).unwrap();
            let mut sampler = Sampler::new(SamplingParams::default());
            generate(
                &m,
                cache.as_mut(),
                &[1, 2, 3],
                limit - 3,
                &mut sampler,
                &[],
                |_| true,
            )
            .unwrap();
            let bound = kv_bytes_bound(&kv, n_layers, shape, limit);
            assert!(
                cache.bytes() <= bound,
                "{spec} at {limit}: {} > {bound}",
                cache.bytes()
            );
        }
    }
}

/// The default q8 cache admits at least 3.5x the sequences of a dense f32 cache in the same
/// memory, short sequences included: its partial block is held at int8 like the rest.
#[test]
fn q8_admits_over_three_and_a_half_times_the_dense_sequences() {
    // SmolLM2-135M's attention: 3 KV heads of 64.
    let shape = AttnShape {
        n_heads: 9,
        n_kv_heads: 3,
        head_dim: 64,
    };
    let q8 = KvSpec::parse("q8").unwrap();
    for tokens in [1, 31, 33, 160, 4096] {
        let dense = kv_bytes_bound(&KvSpec::Dense, 30, shape, tokens);
        let ours = kv_bytes_bound(&q8, 30, shape, tokens);
        assert!(2 * dense >= 7 * ours, "{tokens} tokens: {dense} / {ours}");
    }
}

#[test]
fn sequences_decode_through_the_configured_kv_cache_within_its_memory() {
    // q4 keys and values need heads of a multiple of 32: a random model with 32-wide heads.
    let m = s2lc_model::llama::random_model(64, 96, 2, (2, 1), 11, 7);
    let kv = KvSpec::parse("q4").unwrap();
    let shape = m.attn_shape();
    kv.check(shape).unwrap();
    let (n_layers, limit) = (m.config().n_layers, 3 + 100);
    let want = {
        let mut cache = kv.cache(n_layers, shape, limit).unwrap();
        let mut sampler = Sampler::new(SamplingParams::default());
        generate(
            &m,
            cache.as_mut(),
            &[1, 2, 3],
            100,
            &mut sampler,
            &[],
            |_| true,
        )
        .unwrap()
        .generated
    };
    let need = kv_bytes_bound(&kv, n_layers, shape, limit);
    // 103 tokens in the block being filled, at int8: 34 of 128 bytes per group of 32.
    assert!(need < kv_bytes_bound(&KvSpec::Dense, n_layers, shape, limit) / 3);
    let config = BatchConfig {
        kv: kv.clone(),
        // Room for two sequences at a time.
        kv_memory: 2 * need + need / 2,
        ..BatchConfig::default()
    };
    let batcher = Batcher::start(m.clone(), vec![], config.clone());
    let receivers: Vec<_> = (0..4)
        .map(|_| {
            let (sub, rx) = submission(vec![1, 2, 3], 100);
            assert!(batcher.submit(sub));
            rx
        })
        .collect();
    for rx in receivers {
        assert_eq!(collect(rx), (want.clone(), Ok(())));
    }
    // A request whose cache alone is over the memory is refused with the reason.
    let small = BatchConfig {
        kv_memory: need - 1,
        ..config
    };
    let batcher = Batcher::start(m, vec![], small);
    let (sub, rx) = submission(vec![1, 2, 3], 100);
    assert!(batcher.submit(sub));
    let (_, done) = collect(rx);
    assert!(done.unwrap_err().contains("--kv-memory"));
}

#[test]
fn penalties_and_logprobs_follow_their_definitions() {
    let row = [1.0f32, 3.0, 2.0, -1.0];
    let t = token_logprobs(&row, 2, 2);
    let z: f32 = row.iter().map(|l| l.exp()).sum();
    assert!((t.logprob - (2.0f32.exp() / z).ln()).abs() < 1e-5);
    assert_eq!(t.top.iter().map(|p| p.0).collect::<Vec<_>>(), vec![1, 2]);
    assert!((t.top[0].1 - (3.0f32.exp() / z).ln()).abs() < 1e-5);
    // Greedy with a presence penalty larger than any logit gap never repeats a token.
    let m = model();
    let batcher = Batcher::start(m, vec![], BatchConfig::default());
    let (mut sub, rx) = submission(vec![1, 2, 3], 11);
    sub.penalties = Penalties {
        presence: 1e4,
        frequency: 0.0,
    };
    sub.logprobs = Some(3);
    assert!(batcher.submit(sub));
    let mut rx = rx;
    let mut seen = std::collections::HashSet::new();
    while let Some(e) = rx.blocking_recv() {
        match e {
            Event::Token(id, lp) => {
                assert!(seen.insert(id), "token {id} repeated");
                let lp = lp.expect("logprobs asked for");
                assert_eq!(lp.top.len(), 3);
                assert!(lp.logprob <= 0.0 && lp.top[0].1 >= lp.top[2].1);
            }
            Event::Done(r) => {
                assert_eq!(r, Ok(()));
                break;
            }
        }
    }
    assert_eq!(seen.len(), 11);
}
