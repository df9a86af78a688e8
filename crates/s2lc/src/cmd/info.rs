//! `s2lc info`: architecture, tensor table, dtypes and parameter counts of a model.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

use s2lc_model::config::PositionKind;
use s2lc_model::ModelSource;

/// Runs `s2lc info` on the model at `path`.
pub fn run(path: &Path) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let source = ModelSource::open(path).context("opening the model")?;
    writeln!(out, "model:        {}", path.display())?;
    writeln!(out, "format:       {}", source.format_name())?;
    writeln!(out, "architecture: {}", source.architecture()?)?;
    match source.config() {
        Ok(cfg) => {
            let positions = match cfg.positions() {
                PositionKind::Rope => format!("rope_theta={}", cfg.rope_theta),
                PositionKind::Learned => format!("positions=learned({})", cfg.max_seq_len),
            };
            writeln!(
                out,
                "config:       d={} ffn={} layers={} heads={}/{} head_dim={} vocab={} {positions} tied={}",
                cfg.hidden_size,
                cfg.intermediate_size,
                cfg.n_layers,
                cfg.n_heads,
                cfg.n_kv_heads,
                cfg.head_dim,
                cfg.vocab_size,
                cfg.tie_embeddings
            )?
        }
        Err(e) => writeln!(out, "config:       not runnable here ({e})")?,
    }
    let tensors = source.tensors().describe();
    let mut by_dtype: std::collections::BTreeMap<String, (usize, u64, u64)> = Default::default();
    writeln!(
        out,
        "\n{:<48} {:>16} {:>6} {:>12}",
        "tensor", "shape", "dtype", "bytes"
    )?;
    for t in &tensors {
        let n: u64 = t.shape.iter().map(|&d| d as u64).product();
        let e = by_dtype.entry(t.dtype.clone()).or_default();
        e.0 += 1;
        e.1 += n;
        e.2 += t.bytes;
        writeln!(
            out,
            "{:<48} {:>16} {:>6} {:>12}",
            t.name,
            format!("{:?}", t.shape),
            t.dtype,
            t.bytes
        )?;
    }
    writeln!(out)?;
    let (mut params, mut bytes) = (0u64, 0u64);
    for (dtype, (count, n, b)) in &by_dtype {
        writeln!(
            out,
            "{dtype:>6}: {count:>4} tensors, {n:>12} parameters, {b:>12} bytes"
        )?;
        params += n;
        bytes += b;
    }
    writeln!(
        out,
        " total: {:>4} tensors, {params:>12} parameters, {bytes:>12} bytes ({:.2} bits/parameter)",
        tensors.len(),
        8.0 * bytes as f64 / params.max(1) as f64
    )?;
    Ok(())
}
