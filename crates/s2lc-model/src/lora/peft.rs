//! Reading and writing adapters in Hugging Face PEFT's layout (`adapter_config.json` +
//! `adapter_model.safetensors`), with every size checked before it is allocated.

use std::collections::HashMap;
use std::path::Path;

use safetensors::SafeTensors;
use serde_json::{json, Map, Value};

use super::limits::{read_artifact_file, AdapterLimits, MAX_CONFIG_BYTES};
use super::{module_name, LoraAdapter, LoraDelta, TARGETS};
use crate::atomic::write_file_atomic;
use crate::error::ModelError;
use crate::source::{bytes_to_f32, write_safetensors, Tensor};

/// One tensor of an adapter file, checked but not yet converted.
struct PendingTensor<'a> {
    name: String,
    view: safetensors::tensor::TensorView<'a>,
}

/// The `lora_A` and `lora_B` tensors of one layer while an adapter is read.
#[derive(Default)]
struct LoraPair<'a> {
    a: Option<PendingTensor<'a>>,
    b: Option<PendingTensor<'a>>,
}

impl LoraAdapter {
    /// Reads a PEFT adapter directory. Shapes are checked against the model by
    /// [`crate::llama::LlamaModel::attach_adapter`]; sizes only against
    /// [`AdapterLimits::GENEROUS`] (see [`LoraAdapter::load_with`]).
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        Self::load_with(dir, &AdapterLimits::GENEROUS)
    }

    /// Reads a PEFT adapter directory from untrusted storage: both files must be regular files
    /// within `limits`, and every layer, shape and rank is checked against `limits` before its
    /// values are converted.
    pub fn load_with(dir: &Path, limits: &AdapterLimits) -> Result<Self, ModelError> {
        let config_path = dir.join("adapter_config.json");
        let text = read_artifact_file(&config_path, MAX_CONFIG_BYTES)
            .map_err(|source| ModelError::io(&config_path, source))?;
        let weights_path = dir.join("adapter_model.safetensors");
        let bytes = read_artifact_file(&weights_path, limits.max_file_bytes)
            .map_err(|source| ModelError::io(&weights_path, source))?;
        Self::from_bytes(dir, &text, &bytes, limits)
    }

    /// An adapter from the bytes of its `adapter_config.json` and `adapter_model.safetensors`;
    /// errors and [`LoraAdapter::path`] name `dir`.
    pub fn from_bytes(
        dir: &Path,
        config: &[u8],
        weights: &[u8],
        limits: &AdapterLimits,
    ) -> Result<Self, ModelError> {
        let config_path = dir.join("adapter_config.json");
        let weights_path = dir.join("adapter_model.safetensors");
        let bad = |msg: String| ModelError::InvalidConfig(format!("{}: {msg}", dir.display()));
        let config: Value =
            serde_json::from_slice(config).map_err(|source| ModelError::Config {
                path: config_path.clone(),
                source,
            })?;
        let rank = match config["r"].as_u64() {
            Some(0) => return Err(bad("LoRA rank r is 0".into())),
            Some(r) if r <= limits.max_rank as u64 => r as usize,
            Some(r) => {
                return Err(bad(format!(
                    "LoRA rank r is {r}, above the {} accepted",
                    limits.max_rank
                )))
            }
            None => return Err(bad("adapter_config.json has no integer 'r'".into())),
        };
        let alpha = match &config["lora_alpha"] {
            Value::Null => rank as f32,
            v => v
                .as_f64()
                .map(|a| a as f32)
                .filter(|a| a.is_finite())
                .ok_or_else(|| bad(format!("lora_alpha {v} is not a finite number")))?,
        };
        let rslora = config["use_rslora"].as_bool().unwrap_or(false);
        let scale_of = |alpha: f32, rank: usize| {
            if rslora {
                alpha / (rank as f32).sqrt()
            } else {
                alpha / rank as f32
            }
        };
        let rank_pattern =
            Pattern::read(&config, "rank_pattern", Some(limits.max_rank)).map_err(bad)?;
        let alpha_pattern = Pattern::read(&config, "alpha_pattern", None).map_err(bad)?;
        let targets: Vec<String> = match &config["target_modules"] {
            Value::String(s) => vec![s.clone()],
            Value::Array(a) => a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            _ => return Err(bad("adapter_config.json has no target_modules".into())),
        };
        for t in &targets {
            if !TARGETS.contains(&t.as_str()) {
                return Err(bad(format!(
                    "unknown target module '{t}' (S2LC adapts {})",
                    TARGETS.join(", ")
                )));
            }
        }
        let corrupt = |message: String| ModelError::Safetensors {
            path: weights_path.clone(),
            message,
        };
        let st = SafeTensors::deserialize(weights).map_err(|e| corrupt(e.to_string()))?;
        // (layer, target) → the A and B tensors, as they are found: only names and shapes are
        // looked at until every pair has been checked against the limits.
        let mut pending: HashMap<(usize, usize), LoraPair<'_>> = HashMap::new();
        for (name, view) in st.tensors() {
            let (layer, target, is_a) = parse_name(&name).ok_or_else(|| {
                bad(format!(
                    "unexpected tensor '{name}' (not a PEFT LoRA A/B weight)"
                ))
            })?;
            if layer >= limits.max_layers {
                return Err(bad(format!(
                    "tensor '{name}' adapts layer {layer}, but at most {} layers are accepted",
                    limits.max_layers
                )));
            }
            let entry = pending.entry((layer, target)).or_default();
            let side = if is_a { &mut entry.a } else { &mut entry.b };
            if side.is_some() {
                return Err(bad(format!(
                    "{}: lora_{} is given twice",
                    module_name(layer, target),
                    if is_a { "A" } else { "B" }
                )));
            }
            *side = Some(PendingTensor { name, view });
        }
        if pending.is_empty() {
            return Err(bad("adapter_model.safetensors holds no LoRA weights".into()));
        }
        let mut shapes = Vec::with_capacity(pending.len());
        let mut values = 0usize;
        for (&(layer, target), pair) in &pending {
            let module = module_name(layer, target);
            let (Some(a), Some(b)) = (&pair.a, &pair.b) else {
                return Err(bad(format!("{module}: lora_A or lora_B is missing")));
            };
            let r = rank_pattern.lookup(&module).map_or(rank, |v| v as usize);
            let (a_shape, b_shape) = (a.view.shape(), b.view.shape());
            let [a_rows, inp] = a_shape[..] else {
                return Err(bad(format!("{module}: lora_A has shape {a_shape:?}")));
            };
            let [out, b_cols] = b_shape[..] else {
                return Err(bad(format!("{module}: lora_B has shape {b_shape:?}")));
            };
            if a_rows != r || b_cols != r {
                return Err(bad(format!(
                    "{module}: lora_A {a_shape:?} and lora_B {b_shape:?} do not have rank {r}"
                )));
            }
            if inp == 0 || out == 0 || inp > limits.max_dim || out > limits.max_dim {
                return Err(bad(format!(
                    "{module}: {out}×{inp} (B·A), outside 1..={} per side",
                    limits.max_dim
                )));
            }
            values = r
                .checked_mul(inp + out)
                .and_then(|n| values.checked_add(n))
                .filter(|&n| n <= limits.max_values)
                .ok_or_else(|| {
                    bad(format!(
                        "more than the {} values accepted (at {module})",
                        limits.max_values
                    ))
                })?;
            let alpha = alpha_pattern.lookup(&module).map_or(alpha, |v| v as f32);
            shapes.push(((layer, target), r, inp, out, scale_of(alpha, r)));
        }
        let n_layers = pending.keys().map(|&(l, _)| l + 1).max().unwrap_or(0);
        let mut layers: Vec<[Option<LoraDelta>; 7]> = Vec::new();
        layers.resize_with(n_layers, Default::default);
        for (key, r, inp, out, scale) in shapes {
            let pair = pending.remove(&key).expect("every pair was checked");
            let (Some(a), Some(b)) = (pair.a, pair.b) else {
                unreachable!("both sides were checked")
            };
            let a = bytes_to_f32(&a.name, a.view.dtype(), a.view.data())?;
            let b = bytes_to_f32(&b.name, b.view.dtype(), b.view.data())?;
            layers[key.0][key.1] = Some(LoraDelta::new(a, b, r, inp, out, scale));
        }
        Ok(LoraAdapter {
            path: dir.to_path_buf(),
            rank,
            alpha,
            scale: scale_of(alpha, rank),
            base_model: config["base_model_name_or_path"]
                .as_str()
                .map(str::to_string),
            layers,
        })
    }

    /// Writes the adapter as PEFT does: `adapter_config.json` and `adapter_model.safetensors` (f32)
    /// in `dir` (created if needed; files written under temporary names and renamed). The scales
    /// are folded into `B`, so `lora_alpha` equals each module's rank; `r` is the largest rank and
    /// modules of another rank are listed in `rank_pattern` / `alpha_pattern` by full module name.
    pub fn save(&self, dir: &Path) -> Result<(), ModelError> {
        let max_rank = self
            .deltas()
            .map(|(_, _, d)| d.rank())
            .max()
            .ok_or_else(|| {
                ModelError::EmptyInput(format!("adapter {} has no deltas", self.path.display()))
            })?;
        let (mut rank_pattern, mut alpha_pattern) = (Map::new(), Map::new());
        let mut present = [false; 7];
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for (layer, target, delta) in self.deltas() {
            present[target] = true;
            let (a, b) = delta.factors();
            let (r, inp, out) = (delta.rank(), delta.in_dim(), delta.out_dim());
            let module = module_name(layer, target);
            if r != max_rank {
                rank_pattern.insert(module.clone(), json!(r));
                alpha_pattern.insert(module.clone(), json!(r));
            }
            for (side, shape, data) in [("A", vec![r, inp], a), ("B", vec![out, r], b)] {
                let name = format!("base_model.model.{module}.lora_{side}.weight");
                let data = data.into_owned();
                tensors.push((name, Tensor { shape, data }));
            }
        }
        let targets: Vec<&str> = TARGETS
            .iter()
            .zip(present)
            .filter_map(|(t, p)| p.then_some(*t))
            .collect();
        let config = json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model,
            "r": max_rank,
            "lora_alpha": max_rank,
            "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern,
            "target_modules": targets,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": false,
            "use_rslora": false,
            "use_dora": false,
            "init_lora_weights": true,
            "inference_mode": true,
            "modules_to_save": null,
            "layers_to_transform": null,
            "revision": null,
        });
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        write_safetensors(
            &dir.join("adapter_model.safetensors"),
            tensors.iter().map(|(n, t)| (n.as_str(), t)),
            Some(HashMap::from([("format".to_string(), "pt".to_string())])),
        )?;
        let text = serde_json::to_string_pretty(&config).unwrap_or_default();
        write_file_atomic(&dir.join("adapter_config.json"), text.as_bytes())
    }
}

/// PEFT's `rank_pattern` / `alpha_pattern`: per-module overrides keyed by a module name or a
/// suffix of one (PEFT matches `(.*\.)?KEY$` as a regular expression; S2LC accepts the literal
/// keys PEFT and S2LC write, with `\.` read as `.`, and refuses other regular expressions).
struct Pattern(Vec<(String, f64)>);

impl Pattern {
    /// The pattern `field` of `config`; with `max_rank`, a rank pattern, whose values must be
    /// whole numbers in `1..=max_rank` (`0.5` would otherwise truncate to rank 0).
    fn read(config: &Value, field: &str, max_rank: Option<usize>) -> Result<Self, String> {
        let Some(map) = config[field].as_object() else {
            return Ok(Pattern(Vec::new()));
        };
        let mut keys = Vec::new();
        for (key, value) in map {
            let literal = key.replace("\\.", ".");
            if literal.contains(|c: char| "^$*+?()[]{}|\\".contains(c)) {
                return Err(format!(
                    "{field} key '{key}' is a regular expression; S2LC matches module names literally"
                ));
            }
            let v = match max_rank {
                Some(max) => value
                    .as_u64()
                    .filter(|v| (1..=max as u64).contains(v))
                    .map(|v| v as f64)
                    .ok_or_else(|| {
                        format!("{field}['{key}'] is {value}, not a whole rank in 1..={max}")
                    })?,
                None => value
                    .as_f64()
                    .filter(|v| *v > 0.0 && v.is_finite())
                    .ok_or_else(|| format!("{field}['{key}'] is not a positive number"))?,
            };
            keys.push((literal, v));
        }
        Ok(Pattern(keys))
    }

    /// The value of the longest key naming `module` or a dotted suffix of it (PEFT takes the
    /// first matching key in file order; they agree unless two keys match one module).
    fn lookup(&self, module: &str) -> Option<f64> {
        self.0
            .iter()
            .filter(|(key, _)| {
                module == key
                    || module
                        .strip_suffix(key.as_str())
                        .is_some_and(|head| head.ends_with('.'))
            })
            .max_by_key(|(key, _)| key.len())
            .map(|(_, v)| *v)
    }
}

/// `(layer, target index, is_A)` of a PEFT tensor name such as
/// `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` (an adapter name between
/// `lora_A` and `weight`, as PEFT uses in memory, is accepted too).
pub fn parse_name(name: &str) -> Option<(usize, usize, bool)> {
    let rest = name.strip_prefix("base_model.model.model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let rest = rest
        .strip_prefix("self_attn.")
        .or_else(|| rest.strip_prefix("mlp."))?;
    let (target, rest) = rest.split_once('.')?;
    let target = TARGETS.iter().position(|t| *t == target)?;
    let (which, rest) = rest.split_once('.')?;
    let is_a = match which {
        "lora_A" => true,
        "lora_B" => false,
        _ => return None,
    };
    (rest == "weight" || rest.ends_with(".weight") && rest.matches('.').count() == 1)
        .then_some((layer, target, is_a))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_names_map_to_layers_and_targets() {
        assert_eq!(
            parse_name("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"),
            Some((3, 0, true))
        );
        assert_eq!(
            parse_name("base_model.model.model.layers.29.mlp.down_proj.lora_B.weight"),
            Some((29, 6, false))
        );
        assert_eq!(
            parse_name("base_model.model.model.layers.0.mlp.up_proj.lora_B.default.weight"),
            Some((0, 5, false))
        );
        for bad in [
            "base_model.model.model.layers.x.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.1.self_attn.qkv.lora_A.weight",
            "base_model.model.model.layers.1.self_attn.q_proj.lora_C.weight",
            "model.layers.1.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.1.self_attn.q_proj.lora_A.bias",
        ] {
            assert_eq!(parse_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn rank_patterns_match_module_suffixes_and_refuse_regexes() {
        let config = json!({"rank_pattern": {"q_proj": 2, "model.layers.1.self_attn.q_proj": 5}});
        let p = Pattern::read(&config, "rank_pattern", Some(64)).unwrap();
        assert_eq!(p.lookup("model.layers.0.self_attn.q_proj"), Some(2.0));
        assert_eq!(p.lookup("model.layers.1.self_attn.q_proj"), Some(5.0));
        assert_eq!(p.lookup("model.layers.1.self_attn.qq_proj"), None);
        let escaped = json!({"alpha_pattern": {"model\\.layers\\.3\\.mlp\\.up_proj": 7}});
        let p = Pattern::read(&escaped, "alpha_pattern", None).unwrap();
        assert_eq!(p.lookup("model.layers.3.mlp.up_proj"), Some(7.0));
        let err = Pattern::read(
            &json!({"rank_pattern": {"^model.*q_proj": 2}}),
            "rank_pattern",
            Some(64),
        )
        .err()
        .unwrap();
        assert!(err.contains("regular expression"), "{err}");
        for bad in [
            json!(0),
            json!(0.5),
            json!(2.5),
            json!(65),
            json!("4"),
            json!(-1),
        ] {
            let err = Pattern::read(
                &json!({"rank_pattern": {"q_proj": bad}}),
                "rank_pattern",
                Some(64),
            )
            .err()
            .unwrap();
            assert!(err.contains("not a whole rank"), "{err}");
        }
        let err = Pattern::read(
            &json!({"alpha_pattern": {"q_proj": 0}}),
            "alpha_pattern",
            None,
        )
        .err()
        .unwrap();
        assert!(err.contains("positive"), "{err}");
    }

    /// The bytes of an adapter file holding `tensors` (name, shape) of zeros, f32.
    fn weights(tensors: &[(&str, Vec<usize>)]) -> Vec<u8> {
        let data: Vec<Vec<u8>> = tensors
            .iter()
            .map(|(_, shape)| vec![0u8; 4 * shape.iter().product::<usize>()])
            .collect();
        let views: Vec<_> = tensors
            .iter()
            .zip(&data)
            .map(|((name, shape), bytes)| {
                let view = safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    shape.clone(),
                    bytes,
                )
                .unwrap();
                (name.to_string(), view)
            })
            .collect();
        safetensors::serialize(views, None).unwrap()
    }

    const QA: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    const QB: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";

    fn config(extra: Value) -> Vec<u8> {
        let mut c = json!({"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]});
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::to_vec(&c).unwrap()
    }

    fn load(config: &[u8], weights: &[u8]) -> Result<LoraAdapter, String> {
        let limits = AdapterLimits {
            max_layers: 4,
            max_dim: 64,
            max_rank: 8,
            max_values: 3_000,
            max_file_bytes: 1 << 20,
        };
        LoraAdapter::from_bytes(Path::new("adapter"), config, weights, &limits)
            .map_err(|e| e.to_string())
    }

    /// Issue 22: a `rank_pattern` of 0.5 became rank 0 (with rank-0 tensors it passed every
    /// check and panicked in `gemv`); now it is refused at load, as is any non-integer rank.
    #[test]
    fn fractional_or_zero_ranks_are_refused_at_load() {
        let zero = weights(&[(QA, vec![0, 8]), (QB, vec![8, 0])]);
        for pattern in [json!(0.5), json!(0), json!(1.5), json!(-2)] {
            let err =
                load(&config(json!({"rank_pattern": {"q_proj": pattern}})), &zero).unwrap_err();
            assert!(err.contains("not a whole rank"), "{err}");
        }
        for r in [json!(0), json!(0.5), json!(2.0), json!("2")] {
            let err = load(&config(json!({ "r": r })), &zero).unwrap_err();
            assert!(err.contains("'r'") || err.contains("rank r is 0"), "{err}");
        }
        // The rank-0 tensors themselves do not have the config's rank.
        let err = load(&config(json!({})), &zero).unwrap_err();
        assert!(err.contains("do not have rank 2"), "{err}");
        let ok = weights(&[(QA, vec![2, 8]), (QB, vec![8, 2])]);
        let a = load(&config(json!({"rank_pattern": {"q_proj": 2}})), &ok).unwrap();
        assert_eq!(a.layers[0][0].as_ref().unwrap().rank(), 2);
    }

    /// Issue 22: the layer index of a tensor name drove `resize_with(layer + 1)` unbounded.
    #[test]
    fn layer_index_and_sizes_are_capped_before_allocation() {
        let far = "base_model.model.model.layers.4000000000.self_attn.q_proj.lora_A.weight";
        let err = load(&config(json!({})), &weights(&[(far, vec![2, 8])])).unwrap_err();
        assert!(err.contains("at most 4 layers"), "{err}");
        let wide = weights(&[(QA, vec![2, 65]), (QB, vec![8, 2])]);
        let err = load(&config(json!({})), &wide).unwrap_err();
        assert!(err.contains("outside 1..=64"), "{err}");
        let err = load(&config(json!({"r": 9})), &wide).unwrap_err();
        assert!(err.contains("above the 8 accepted"), "{err}");
        // Four layers of 2·(64 + 64) values fit 3 000; at rank 8 (4·8·128 values) they do not.
        let names: Vec<(String, String)> = (0..4)
            .map(|l| {
                (
                    QA.replace("layers.0", &format!("layers.{l}")),
                    QB.replace("layers.0", &format!("layers.{l}")),
                )
            })
            .collect();
        let tensors = |r: usize| -> Vec<(&str, Vec<usize>)> {
            names
                .iter()
                .flat_map(|(a, b)| [(a.as_str(), vec![r, 64]), (b.as_str(), vec![64, r])])
                .collect()
        };
        assert!(load(&config(json!({})), &weights(&tensors(2))).is_ok());
        let err = load(&config(json!({"r": 8})), &weights(&tensors(8)))
            .map(|_| ())
            .unwrap_err();
        assert!(err.contains("values accepted"), "{err}");
        let twice = weights(&[
            (QA, vec![2, 8]),
            (QB, vec![8, 2]),
            (
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
                vec![2, 8],
            ),
        ]);
        let err = load(&config(json!({})), &twice).unwrap_err();
        assert!(err.contains("given twice"), "{err}");
    }
}
