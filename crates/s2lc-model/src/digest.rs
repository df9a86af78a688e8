//! The identity of a base model as a content hash, so an adapter made for one base model can be
//! refused on another (the Adapter Store records it at push and checks it at pull and serve).

use std::path::{Path, PathBuf};

use crate::error::ModelError;

/// BLAKE3 (lowercase hex) of a base model: of the file itself (GGUF), or of a Hugging Face
/// directory's `config.json` and `*.safetensors` files, each preceded by its name, in name order.
///
/// Tokenizer and README files are left out on purpose: they do not change the weights an adapter
/// was trained against, and editing them must not orphan every adapter of the store.
pub fn model_digest(path: &Path) -> Result<String, ModelError> {
    let mut h = blake3::Hasher::new();
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| ModelError::io(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name().is_some_and(|n| n == "config.json")
                    || p.extension().is_some_and(|e| e == "safetensors")
            })
            .collect();
        files.sort();
        for f in files {
            h.update(f.file_name().unwrap_or_default().as_encoded_bytes());
            h.update_mmap(&f).map_err(|e| ModelError::io(&f, e))?;
        }
    } else {
        h.update_mmap(path).map_err(|e| ModelError::io(path, e))?;
    }
    Ok(h.finalize().to_hex().to_string())
}

#[cfg(test)]
mod tests {
    use super::model_digest;

    #[test]
    fn a_directory_digest_covers_config_and_weights_only() {
        let dir = std::env::temp_dir().join(format!("s2lc-digest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::write(dir.join("config.json"), b"{}").expect("config");
        std::fs::write(dir.join("model.safetensors"), b"weights").expect("weights");
        let first = model_digest(&dir).expect("digest");
        assert_eq!(first.len(), 64, "hex BLAKE3");
        // A tokenizer edit leaves the identity alone ...
        std::fs::write(dir.join("tokenizer.json"), b"{\"v\":1}").expect("tokenizer");
        assert_eq!(model_digest(&dir).expect("digest"), first);
        // ... a weight edit does not.
        std::fs::write(dir.join("model.safetensors"), b"weights2").expect("weights");
        assert_ne!(model_digest(&dir).expect("digest"), first);
        // A file hashes as its bytes.
        let file = dir.join("model.safetensors");
        assert_eq!(
            model_digest(&file).expect("digest"),
            blake3::hash(b"weights2").to_hex().to_string()
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_missing_model_is_an_io_error_naming_it() {
        let err = model_digest(std::path::Path::new("no-such-model.gguf")).unwrap_err();
        assert!(err.to_string().contains("no-such-model.gguf"), "{err}");
    }
}
