//! GPT-2 in Hugging Face layout, mapped onto the Llama-family runtime: its `config.json` and its
//! tensor names.
//!
//! The runtime runs GPT-2 as a configuration of the one decoder ([`crate::config::Arch::Gpt2`]:
//! LayerNorm with bias, learned positions, a GELU MLP without gate, biases everywhere, tied head),
//! so it reads GPT-2's tensors under the runtime's names. [`Gpt2Source`] presents them that way:
//!
//! | runtime name | GPT-2 name (`transformer.` prefix optional) |
//! |---|---|
//! | `model.embed_tokens.weight` | `wte.weight` |
//! | `model.embed_positions.weight` | `wpe.weight` (`n_positions × d`) |
//! | `model.layers.N.input_layernorm.{weight,bias}` | `h.N.ln_1.{weight,bias}` |
//! | `model.layers.N.self_attn.{q,k,v}_proj.{weight,bias}` | thirds of `h.N.attn.c_attn` |
//! | `model.layers.N.self_attn.o_proj.{weight,bias}` | `h.N.attn.c_proj` |
//! | `model.layers.N.post_attention_layernorm.{weight,bias}` | `h.N.ln_2.{weight,bias}` |
//! | `model.layers.N.mlp.up_proj.{weight,bias}` | `h.N.mlp.c_fc` |
//! | `model.layers.N.mlp.down_proj.{weight,bias}` | `h.N.mlp.c_proj` |
//! | `model.norm.{weight,bias}` | `ln_f.{weight,bias}` |
//!
//! GPT-2's linears are `Conv1D` modules, whose weight is stored `[in, out]` (the transpose of a
//! `Linear`'s `[out, in]`): every matrix is transposed on load. `c_attn` is `[d, 3d]`; transposed,
//! its rows `0..d`, `d..2d`, `2d..3d` are the query, key and value projections (and its bias splits
//! the same way). A name the directory holds as it is (a model the runtime saved, which writes its
//! own names) is read directly, so a saved GPT-2, dense or compressed, loads through the same path.

use serde::Deserialize;

use crate::config::{Arch, ModelConfig};
use crate::error::ModelError;
use crate::source::{Tensor, TensorDesc, TensorSource};

/// `config.json` of a Hugging Face GPT-2 (`model_type: "gpt2"`), as transformers writes it.
/// Fields the runtime does not need are ignored; absent ones get the transformers defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct Gpt2Config {
    /// `gpt2`.
    pub model_type: String,
    /// Width of the residual stream.
    #[serde(default = "defaults::n_embd")]
    pub n_embd: usize,
    /// Number of blocks.
    #[serde(default = "defaults::n_layer")]
    pub n_layer: usize,
    /// Attention heads (no grouped-query attention: keys and values have as many).
    #[serde(default = "defaults::n_head")]
    pub n_head: usize,
    /// Rows of the learned position table: the longest sequence the model runs.
    #[serde(default = "defaults::n_positions")]
    pub n_positions: usize,
    /// Width of the MLP's hidden layer; `None` means `4 · n_embd`.
    pub n_inner: Option<usize>,
    /// LayerNorm epsilon.
    #[serde(default = "defaults::layer_norm_epsilon")]
    pub layer_norm_epsilon: f32,
    /// Vocabulary size.
    #[serde(default = "defaults::vocab_size")]
    pub vocab_size: usize,
    /// The MLP's activation; the runtime runs the tanh approximation of GELU (`gelu_new`, the
    /// GPT-2 default, or its alias `gelu_pytorch_tanh`).
    #[serde(default = "defaults::activation_function")]
    pub activation_function: String,
    /// Whether the head reuses `wte` (transformers' default: yes).
    pub tie_word_embeddings: Option<bool>,
    /// Scores scaled by `1/√head_dim` (the default); unscaled attention is not supported.
    pub scale_attn_weights: Option<bool>,
    /// Scores further scaled by `1/(layer + 1)` (an option of some GPT-2 trainings); not supported.
    pub scale_attn_by_inverse_layer_idx: Option<bool>,
    /// Beginning-of-sequence token id.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token id.
    pub eos_token_id: Option<u32>,
}

/// transformers' `GPT2Config` defaults (GPT-2 small).
mod defaults {
    pub fn n_embd() -> usize {
        768
    }
    pub fn n_layer() -> usize {
        12
    }
    pub fn n_head() -> usize {
        12
    }
    pub fn n_positions() -> usize {
        1024
    }
    pub fn layer_norm_epsilon() -> f32 {
        1e-5
    }
    pub fn vocab_size() -> usize {
        50257
    }
    pub fn activation_function() -> String {
        "gelu_new".into()
    }
}

impl Gpt2Config {
    /// The runtime configuration: `head_dim = n_embd / n_head`, as many key/value heads as query
    /// heads, context limit `n_positions`. Options the runtime does not run are refused by name.
    pub fn to_runtime(&self) -> Result<ModelConfig, ModelError> {
        let bad = |why: String| Err(ModelError::InvalidConfig(format!("GPT-2 config: {why}")));
        if !matches!(
            self.activation_function.as_str(),
            "gelu_new" | "gelu_pytorch_tanh"
        ) {
            return bad(format!(
                "activation_function '{}' is not supported (the runtime runs gelu_new)",
                self.activation_function
            ));
        }
        if self.scale_attn_weights == Some(false)
            || self.scale_attn_by_inverse_layer_idx == Some(true)
        {
            return bad(
                "attention scaled other than by 1/√head_dim is not supported (scale_attn_weights, scale_attn_by_inverse_layer_idx)".into(),
            );
        }
        if self.n_head == 0 || self.n_embd % self.n_head != 0 {
            return bad(format!(
                "n_embd {} is not a multiple of n_head {}",
                self.n_embd, self.n_head
            ));
        }
        ModelConfig {
            arch: Arch::Gpt2,
            hidden_size: self.n_embd,
            intermediate_size: self.n_inner.unwrap_or(4 * self.n_embd),
            n_layers: self.n_layer,
            n_heads: self.n_head,
            n_kv_heads: self.n_head,
            head_dim: self.n_embd / self.n_head,
            vocab_size: self.vocab_size,
            // Unused: positions are learned.
            rope_theta: 10_000.0,
            rms_eps: self.layer_norm_epsilon,
            max_seq_len: self.n_positions,
            tie_embeddings: self.tie_word_embeddings.unwrap_or(true),
        }
        .validate()
    }

    /// The GPT-2 configuration of a runtime configuration (of [`Arch::Gpt2`]).
    pub fn from_runtime(cfg: &ModelConfig) -> Self {
        Gpt2Config {
            model_type: Arch::Gpt2.name().into(),
            n_embd: cfg.hidden_size,
            n_layer: cfg.n_layers,
            n_head: cfg.n_heads,
            n_positions: cfg.max_seq_len,
            n_inner: Some(cfg.intermediate_size),
            layer_norm_epsilon: cfg.rms_eps,
            vocab_size: cfg.vocab_size,
            activation_function: defaults::activation_function(),
            tie_word_embeddings: Some(cfg.tie_embeddings),
            scale_attn_weights: Some(true),
            scale_attn_by_inverse_layer_idx: Some(false),
            bos_token_id: None,
            eos_token_id: None,
        }
    }

    /// The `config.json` transformers writes for this configuration.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": self.model_type,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_positions": self.n_positions,
            "n_inner": self.n_inner,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "vocab_size": self.vocab_size,
            "activation_function": self.activation_function,
            "tie_word_embeddings": self.tie_word_embeddings,
            "scale_attn_weights": true,
            "scale_attn_by_inverse_layer_idx": false,
            "torch_dtype": "float32",
        })
    }
}

/// How a runtime name is made from the file's tensors.
#[derive(Debug, PartialEq)]
enum Derived {
    /// The tensor as stored.
    Same(String),
    /// A `Conv1D` weight `[in, out]`, transposed to `[out, in]`.
    Transposed(String),
    /// Third `part` (0 query, 1 key, 2 value) of `c_attn`: rows of the transposed weight, or
    /// entries of the bias.
    Third {
        name: String,
        part: usize,
        weight: bool,
    },
}

/// A GPT-2 safetensors directory under the runtime's tensor names (see the module table).
pub struct Gpt2Source {
    inner: Box<dyn TensorSource>,
    /// `transformer.` when the file holds `GPT2LMHeadModel` names, empty for `GPT2Model` ones.
    prefix: &'static str,
}

impl Gpt2Source {
    /// Wraps the tensors of a GPT-2 directory.
    pub fn new(inner: Box<dyn TensorSource>) -> Self {
        let prefix = if inner.contains("transformer.wte.weight") {
            "transformer."
        } else {
            ""
        };
        Gpt2Source { inner, prefix }
    }

    /// Where runtime tensor `name` comes from in the file, or `None` for names outside the map.
    fn derive(&self, name: &str) -> Option<Derived> {
        let p = self.prefix;
        let global = match name {
            "model.embed_tokens.weight" => Some("wte.weight"),
            "model.embed_positions.weight" => Some("wpe.weight"),
            "model.norm.weight" => Some("ln_f.weight"),
            "model.norm.bias" => Some("ln_f.bias"),
            _ => None,
        };
        if let Some(g) = global {
            return Some(Derived::Same(format!("{p}{g}")));
        }
        let rest = name.strip_prefix("model.layers.")?;
        let (layer, leaf) = rest.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        let h = format!("{p}h.{layer}");
        let (module, field) = leaf.rsplit_once('.')?;
        let weight = match field {
            "weight" => true,
            "bias" => false,
            _ => return None,
        };
        let norm = |ln: &str| Some(Derived::Same(format!("{h}.{ln}.{field}")));
        let conv = |m: &str| {
            let name = format!("{h}.{m}.{field}");
            Some(if weight {
                Derived::Transposed(name)
            } else {
                Derived::Same(name)
            })
        };
        let third = |part| {
            Some(Derived::Third {
                name: format!("{h}.attn.c_attn.{field}"),
                part,
                weight,
            })
        };
        match module {
            "input_layernorm" => norm("ln_1"),
            "post_attention_layernorm" => norm("ln_2"),
            "self_attn.q_proj" => third(0),
            "self_attn.k_proj" => third(1),
            "self_attn.v_proj" => third(2),
            "self_attn.o_proj" => conv("attn.c_proj"),
            "mlp.up_proj" => conv("mlp.c_fc"),
            "mlp.down_proj" => conv("mlp.c_proj"),
            _ => None,
        }
    }
}

/// `[rows, cols]` of a 2-D shape, or a shape error naming `name`.
fn matrix_dims(name: &str, shape: &[usize]) -> Result<(usize, usize), ModelError> {
    match *shape {
        [rows, cols] => Ok((rows, cols)),
        _ => Err(ModelError::ShapeMismatch {
            name: name.to_string(),
            expected: vec![0, 0],
            got: shape.to_vec(),
        }),
    }
}

/// Rows `r0..r0 + n` of the transpose of the row-major `rows × cols` matrix `data`
/// (`n × rows`, row-major): `out[i][j] = data[j][r0 + i]`.
fn transposed_rows(data: &[f32], rows: usize, cols: usize, r0: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0.0; n * rows];
    for (j, row) in data.chunks_exact(cols).enumerate() {
        for (i, &v) in row[r0..r0 + n].iter().enumerate() {
            out[i * rows + j] = v;
        }
    }
    out
}

impl TensorSource for Gpt2Source {
    fn load(&self, name: &str) -> Result<Tensor, ModelError> {
        if self.inner.contains(name) {
            return self.inner.load(name);
        }
        let missing = || ModelError::MissingTensor(name.to_string());
        // A missing source tensor is named by the runtime name asked for (the one layer code and
        // error messages use); any other failure is the file's.
        let source = |n: &str| {
            if self.inner.contains(n) {
                self.inner.load(n)
            } else {
                Err(missing())
            }
        };
        match self.derive(name).ok_or_else(missing)? {
            Derived::Same(n) => source(&n),
            Derived::Transposed(n) => {
                let t = source(&n)?;
                let (rows, cols) = matrix_dims(&n, &t.shape)?;
                Ok(Tensor {
                    shape: vec![cols, rows],
                    data: transposed_rows(&t.data, rows, cols, 0, cols),
                })
            }
            Derived::Third {
                name: n,
                part,
                weight,
            } => {
                let t = source(&n)?;
                if weight {
                    let (rows, cols) = matrix_dims(&n, &t.shape)?;
                    let w = cols / 3;
                    Ok(Tensor {
                        shape: vec![w, rows],
                        data: transposed_rows(&t.data, rows, cols, part * w, w),
                    })
                } else {
                    let w = t.data.len() / 3;
                    Ok(Tensor {
                        shape: vec![w],
                        data: t.data[part * w..(part + 1) * w].to_vec(),
                    })
                }
            }
        }
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        if let Some(s) = self.inner.shape(name) {
            return Some(s);
        }
        match self.derive(name)? {
            Derived::Same(n) => self.inner.shape(&n),
            Derived::Transposed(n) => match *self.inner.shape(&n)?.as_slice() {
                [rows, cols] => Some(vec![cols, rows]),
                _ => None,
            },
            Derived::Third {
                name: n, weight, ..
            } => match *self.inner.shape(&n)?.as_slice() {
                [rows, cols] if weight => Some(vec![cols / 3, rows]),
                [len] if !weight => Some(vec![len / 3]),
                _ => None,
            },
        }
    }

    /// The tensors as the file names them (what `s2lc info` lists).
    fn describe(&self) -> Vec<TensorDesc> {
        self.inner.describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::MemorySource;

    #[test]
    fn conv1d_weights_are_transposed_and_c_attn_split_in_thirds() {
        let (d, f) = (2, 3);
        let mut src = MemorySource::new();
        // c_attn [d, 3d]: entry (i, o) = 10·i + o.
        let c_attn: Vec<f32> = (0..d * 3 * d)
            .map(|k| (10 * (k / (3 * d)) + k % (3 * d)) as f32)
            .collect();
        src.insert("transformer.h.0.attn.c_attn.weight", vec![d, 3 * d], c_attn);
        src.insert(
            "transformer.h.0.attn.c_attn.bias",
            vec![3 * d],
            (0..3 * d).map(|k| k as f32).collect(),
        );
        src.insert(
            "transformer.h.0.mlp.c_fc.weight",
            vec![d, f],
            (0..d * f).map(|k| k as f32).collect(),
        );
        src.insert("transformer.wte.weight", vec![4, d], vec![0.5; 4 * d]);
        let s = Gpt2Source::new(Box::new(src));
        // k_proj = rows d..2d of c_attnᵀ: k[o][i] = c_attn[i][d + o] = 10·i + d + o.
        let k = s.load("model.layers.0.self_attn.k_proj.weight").unwrap();
        assert_eq!(k.shape, vec![d, d]);
        assert_eq!(k.data, vec![2.0, 12.0, 3.0, 13.0]);
        assert_eq!(
            s.shape("model.layers.0.self_attn.v_proj.weight"),
            Some(vec![d, d])
        );
        let vb = s.load("model.layers.0.self_attn.v_proj.bias").unwrap();
        assert_eq!(vb.data, vec![4.0, 5.0]);
        // up_proj = c_fcᵀ, [f, d].
        let up = s.load("model.layers.0.mlp.up_proj.weight").unwrap();
        assert_eq!(up.shape, vec![f, d]);
        assert_eq!(up.data, vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        assert_eq!(
            s.shape("model.layers.0.mlp.up_proj.weight"),
            Some(vec![f, d])
        );
        assert!(s.contains("model.embed_tokens.weight"));
        assert!(!s.contains("model.layers.0.mlp.gate_proj.weight"));
        assert!(matches!(
            s.load("model.layers.1.self_attn.q_proj.weight"),
            Err(ModelError::MissingTensor(n)) if n == "model.layers.1.self_attn.q_proj.weight"
        ));
    }

    #[test]
    fn config_defaults_and_refusals() {
        let json = r#"{"model_type":"gpt2","n_embd":64,"n_layer":2,"n_head":4,"n_positions":64,
            "n_inner":null,"vocab_size":512,"activation_function":"gelu_new"}"#;
        let hf: Gpt2Config = serde_json::from_str(json).unwrap();
        let cfg = hf.to_runtime().unwrap();
        assert_eq!(cfg.intermediate_size, 256);
        assert_eq!((cfg.n_kv_heads, cfg.head_dim), (4, 16));
        assert_eq!(cfg.max_seq_len, 64);
        assert!(cfg.tie_embeddings);
        let again: Gpt2Config = serde_json::from_value(cfg.to_hf_json()).unwrap();
        assert_eq!(again.to_runtime().unwrap(), cfg);
        let relu = r#"{"model_type":"gpt2","activation_function":"relu"}"#;
        let err = serde_json::from_str::<Gpt2Config>(relu)
            .unwrap()
            .to_runtime()
            .unwrap_err()
            .to_string();
        assert!(err.contains("relu"), "{err}");
    }
}
