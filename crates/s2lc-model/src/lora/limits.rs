//! What an adapter read from untrusted storage may declare, and the capped file read.

use std::path::Path;

use crate::config::ModelConfig;

/// Caps on what an adapter read from untrusted storage (an Adapter Store entry, a pushed pack)
/// may declare, checked before anything is allocated for it. [`AdapterLimits::for_model`] derives
/// them from the base model's shapes; [`AdapterLimits::GENEROUS`] is for loaders without a model
/// (the CLI on local files), where only absurd sizes are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdapterLimits {
    /// Layers an adapter may adapt (a layer index is below this).
    pub max_layers: usize,
    /// Largest input or output width of an adapted matrix.
    pub max_dim: usize,
    /// Largest rank of a delta, and width of a shared basis.
    pub max_rank: usize,
    /// Values all the matrices of one artifact may hold once decoded (f32 each).
    pub max_values: usize,
    /// Largest file of an artifact, in bytes.
    pub max_file_bytes: u64,
}

impl AdapterLimits {
    /// Caps for a loader without a base model: far above any adapter of a real model.
    pub const GENEROUS: AdapterLimits = AdapterLimits {
        max_layers: 1 << 12,
        max_dim: 1 << 18,
        max_rank: 1 << 16,
        max_values: 1 << 33,
        max_file_bytes: 1 << 36,
    };

    /// Caps for adapters of a model of `cfg`: its layers, its widest projection, ranks up to the
    /// full rank of its widest target, and values of a pack of full-rank deltas of every target
    /// (bases and cores: twice those of a full-rank PEFT adapter).
    pub fn for_model(cfg: &ModelConfig) -> Self {
        let (d, q, kv, ff) = (
            cfg.hidden_size,
            cfg.n_heads * cfg.head_dim,
            cfg.n_kv_heads * cfg.head_dim,
            cfg.intermediate_size,
        );
        // (in, out) of each target in [`TARGETS`] order.
        let shapes = [(d, q), (d, kv), (d, kv), (q, d), (d, ff), (d, ff), (ff, d)];
        let full_rank = |(i, o): (usize, usize)| (i + o).saturating_mul(i.min(o));
        let per_layer = shapes
            .iter()
            .fold(0usize, |acc, &s| acc.saturating_add(full_rank(s)));
        let max_values = per_layer
            .saturating_mul(cfg.n_layers)
            .saturating_mul(2)
            .max(1);
        AdapterLimits {
            max_layers: cfg.n_layers,
            max_dim: d.max(q).max(kv).max(ff),
            max_rank: shapes.iter().map(|&(i, o)| i.min(o)).max().unwrap_or(0),
            max_values,
            max_file_bytes: (max_values as u64)
                .saturating_mul(4)
                .saturating_add(1 << 24),
        }
    }

    /// These caps with at most `values` values per artifact (e.g. a cache's budget in f32s).
    pub fn with_max_values(self, values: usize) -> Self {
        AdapterLimits {
            max_values: self.max_values.min(values),
            ..self
        }
    }
}

impl Default for AdapterLimits {
    fn default() -> Self {
        AdapterLimits::GENEROUS
    }
}

/// Reads the file `path` of an untrusted artifact: a regular file (not a device, FIFO or
/// directory, which could be endless or block) of at most `max_bytes`, read no further than that.
pub fn read_artifact_file(path: &Path, max_bytes: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Error, ErrorKind, Read};
    let file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(Error::new(ErrorKind::InvalidData, "not a regular file"));
    }
    let too_large = |n: u64| {
        Error::new(
            ErrorKind::InvalidData,
            format!("{n} bytes, more than the {max_bytes} accepted"),
        )
    };
    if meta.len() > max_bytes {
        return Err(too_large(meta.len()));
    }
    // The length can change under us: read at most one byte past the cap to notice.
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max_bytes {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// Largest `adapter_config.json` read (real ones are a few KB).
pub(super) const MAX_CONFIG_BYTES: u64 = 1 << 24;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_within_the_cap_are_read() {
        let err = read_artifact_file(Path::new("/dev/zero"), 1 << 20).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        let dir = std::env::temp_dir().join(format!("s2lc-lora-cap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("f");
        std::fs::write(&f, [7u8; 100]).unwrap();
        assert_eq!(read_artifact_file(&f, 100).unwrap().len(), 100);
        let err = read_artifact_file(&f, 99).unwrap_err();
        assert!(err.to_string().contains("more than the 99"), "{err}");
        assert!(read_artifact_file(&dir, 1 << 20).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn model_limits_follow_its_shapes() {
        let cfg = ModelConfig::smollm2_135m();
        let l = AdapterLimits::for_model(&cfg);
        assert_eq!((l.max_layers, l.max_dim, l.max_rank), (30, 1536, 576));
        assert!(l.max_values > 30 * 7 * 2 * 576 * 64);
        assert_eq!(l.with_max_values(10).max_values, 10);
    }
}
