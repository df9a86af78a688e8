//! Domain FFN expert sets: the shared base FFN of some layers plus, per text domain, that FFN
//! fine-tuned on the domain (Branch-Train-MiX style; built by `scripts/reference/train_adapters.py
//! --mode experts` from the dense model, not taken from a released MoE). An expert's residual
//! `expert − base` is what S2LC compresses as an MoE residual.
//!
//! Layout of a set directory: `manifest.json` (`layers`, `modules`, `base_file`, `base_model`,
//! `experts: {name: {file, text, ...}}`), the base FFN and one safetensors file per expert, each
//! holding `model.layers.N.mlp.{gate,up,down}_proj.weight` for the listed layers.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::ModelError;
use crate::linear::{DenseLinear, Linear};
use crate::llama::LlamaModel;
use crate::source::{read_safetensors, Tensor};

/// The FFN projections an expert replaces, in this order.
pub const FFN_MODULES: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];

/// One expert of a set, as the manifest lists it.
#[derive(Debug, Clone)]
pub struct ExpertInfo {
    /// Expert name (the domain).
    pub name: String,
    /// Its safetensors file, relative to the set.
    pub file: String,
    /// The training text's file name, if recorded.
    pub text: Option<String>,
}

/// An expert set as described by its `manifest.json`.
#[derive(Debug, Clone)]
pub struct ExpertSet {
    /// The set directory.
    pub dir: PathBuf,
    /// The base model file the experts were trained from.
    pub base_model: Option<String>,
    /// Layers whose FFN the experts replace.
    pub layers: Vec<usize>,
    /// The experts, in manifest order.
    pub experts: Vec<ExpertInfo>,
    base_file: String,
}

/// The FFN weights of a set's layers (base or one expert), by layer then [`FFN_MODULES`].
#[derive(Debug, Clone)]
pub struct FfnWeights {
    /// `(layer, [gate, up, down])`, in the set's layer order.
    pub layers: Vec<(usize, [Tensor; 3])>,
}

impl ExpertSet {
    /// Reads `dir/manifest.json`.
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("manifest.json");
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
        let manifest: Value = serde_json::from_str(&text).map_err(|source| ModelError::Config {
            path: path.clone(),
            source,
        })?;
        let bad = |msg: &str| ModelError::InvalidConfig(format!("{}: {msg}", path.display()));
        let layers = manifest["layers"]
            .as_array()
            .ok_or_else(|| bad("no 'layers' list"))?
            .iter()
            .map(|v| v.as_u64().map(|l| l as usize))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("'layers' holds a non-integer"))?;
        let modules: Vec<&str> = manifest["modules"]
            .as_array()
            .map(|m| m.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if modules != FFN_MODULES {
            return Err(bad("'modules' must be gate_proj, up_proj, down_proj"));
        }
        let base_file = manifest["base_file"]
            .as_str()
            .ok_or_else(|| bad("no 'base_file'"))?
            .to_string();
        let experts = manifest["experts"]
            .as_object()
            .ok_or_else(|| bad("no 'experts' map"))?
            .iter()
            .map(|(name, e)| {
                Ok(ExpertInfo {
                    name: name.clone(),
                    file: e["file"]
                        .as_str()
                        .ok_or_else(|| bad(&format!("expert '{name}' has no 'file'")))?
                        .to_string(),
                    text: e["text"].as_str().map(str::to_string),
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        Ok(ExpertSet {
            dir: dir.to_path_buf(),
            base_model: manifest["base_model"].as_str().map(str::to_string),
            layers,
            experts,
            base_file,
        })
    }

    /// The shared base FFN of the set's layers.
    pub fn base(&self) -> Result<FfnWeights, ModelError> {
        self.read(&self.base_file)
    }

    /// The FFN of the expert `name`.
    pub fn expert(&self, name: &str) -> Result<FfnWeights, ModelError> {
        let info = self
            .experts
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| {
                let names: Vec<&str> = self.experts.iter().map(|e| e.name.as_str()).collect();
                ModelError::InvalidConfig(format!(
                    "{}: no expert '{name}' (the set has {})",
                    self.dir.display(),
                    names.join(", ")
                ))
            })?;
        self.read(&info.file)
    }

    fn read(&self, file: &str) -> Result<FfnWeights, ModelError> {
        let path = self.dir.join(file);
        let mut tensors = read_safetensors(&path)?;
        let mut layers = Vec::with_capacity(self.layers.len());
        for &layer in &self.layers {
            let mut take = |module: &str| {
                let name = format!("model.layers.{layer}.mlp.{module}.weight");
                tensors.remove(&name).ok_or_else(|| {
                    ModelError::MissingTensor(format!("{name} in {}", path.display()))
                })
            };
            layers.push((
                layer,
                [take("gate_proj")?, take("up_proj")?, take("down_proj")?],
            ));
        }
        Ok(FfnWeights { layers })
    }
}

impl FfnWeights {
    /// Replaces the FFN projections of `model`'s layers by these weights (dense f32). Every shape
    /// is checked first; on error the model is unchanged.
    pub fn swap_into(&self, model: &mut LlamaModel) -> Result<(), ModelError> {
        let n_layers = model.blocks().len();
        for (layer, tensors) in &self.layers {
            let block = model.blocks().get(*layer).ok_or_else(|| {
                ModelError::InvalidConfig(format!(
                    "expert layer {layer} is outside the model's {n_layers} layers"
                ))
            })?;
            let Some(gate_proj) = &block.gate_proj else {
                return Err(ModelError::InvalidConfig(format!(
                    "expert sets replace a gated (SwiGLU) feed-forward; this {} model has no gate_proj",
                    model.config().arch.name()
                )));
            };
            let targets = [gate_proj, &block.up_proj, &block.down_proj];
            for ((module, t), linear) in FFN_MODULES.iter().zip(tensors).zip(targets) {
                let expected = vec![linear.out_dim(), linear.in_dim()];
                if t.shape != expected {
                    return Err(ModelError::ShapeMismatch {
                        name: format!("model.layers.{layer}.mlp.{module}.weight"),
                        expected,
                        got: t.shape.clone(),
                    });
                }
            }
        }
        for (layer, [gate, up, down]) in &self.layers {
            let block = &mut model.blocks_mut()[*layer];
            let dense = |t: &Tensor| {
                Linear::Dense(DenseLinear::new(
                    t.data.clone(),
                    t.shape[0],
                    t.shape[1],
                    None,
                ))
            };
            block.gate_proj = Some(dense(gate));
            block.up_proj = dense(up);
            block.down_proj = dense(down);
        }
        Ok(())
    }

    /// `self − base` per matrix (an expert's MoE residual), with the same layout.
    pub fn minus(&self, base: &FfnWeights) -> Result<FfnWeights, ModelError> {
        let mut layers = Vec::with_capacity(self.layers.len());
        for ((layer, mine), (base_layer, theirs)) in self.layers.iter().zip(&base.layers) {
            if layer != base_layer {
                return Err(ModelError::InvalidConfig(format!(
                    "expert layer {layer} vs base layer {base_layer}"
                )));
            }
            let diff = |a: &Tensor, b: &Tensor| -> Result<Tensor, ModelError> {
                if a.shape != b.shape {
                    return Err(ModelError::ShapeMismatch {
                        name: format!("layer {layer} FFN"),
                        expected: b.shape.clone(),
                        got: a.shape.clone(),
                    });
                }
                let data = a.data.iter().zip(&b.data).map(|(x, y)| x - y).collect();
                Ok(Tensor {
                    shape: a.shape.clone(),
                    data,
                })
            };
            layers.push((
                *layer,
                [
                    diff(&mine[0], &theirs[0])?,
                    diff(&mine[1], &theirs[1])?,
                    diff(&mine[2], &theirs[2])?,
                ],
            ));
        }
        Ok(FfnWeights { layers })
    }

    /// `Σ‖W‖²_F` over all matrices.
    pub fn sq_norm(&self) -> f64 {
        self.matrices()
            .flat_map(|(_, _, t)| t.data.iter())
            .map(|&v| (v as f64).powi(2))
            .sum()
    }

    /// Every matrix with its layer and module name.
    pub fn matrices(&self) -> impl Iterator<Item = (usize, &'static str, &Tensor)> {
        self.layers.iter().flat_map(|(layer, ts)| {
            FFN_MODULES
                .iter()
                .zip(ts)
                .map(move |(m, t)| (*layer, *m, t))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llama::random_model;
    use crate::source::write_safetensors;

    /// A set for `model` with one expert whose FFN is the base scaled by `factor`.
    fn write_set(model: &LlamaModel, dir: &Path, layers: &[usize], factor: f32) {
        std::fs::create_dir_all(dir).unwrap();
        for (file, f) in [("base.safetensors", 1.0f32), ("e.safetensors", factor)] {
            let mut tensors = Vec::new();
            for &l in layers {
                let b = &model.blocks()[l];
                for (m, lin) in FFN_MODULES.iter().zip([
                    b.gate_proj.as_ref().unwrap(),
                    &b.up_proj,
                    &b.down_proj,
                ]) {
                    let Linear::Dense(d) = lin else { panic!() };
                    let data = d.weight().iter().map(|v| v * f).collect();
                    let shape = vec![lin.out_dim(), lin.in_dim()];
                    tensors.push((
                        format!("model.layers.{l}.mlp.{m}.weight"),
                        Tensor { shape, data },
                    ));
                }
            }
            write_safetensors(
                &dir.join(file),
                tensors.iter().map(|(n, t)| (n.as_str(), t)),
                None,
            )
            .unwrap();
        }
        let manifest = serde_json::json!({
            "layers": layers, "modules": FFN_MODULES, "base_file": "base.safetensors",
            "experts": {"e": {"file": "e.safetensors", "text": "t.txt"}},
        });
        std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
    }

    #[test]
    fn experts_swap_in_and_residuals_subtract() {
        let model = random_model(8, 12, 3, (2, 1), 11, 5);
        let dir = std::env::temp_dir().join(format!("s2lc-experts-{}", std::process::id()));
        write_set(&model, &dir, &[0, 2], 1.5);
        let set = ExpertSet::open(&dir).unwrap();
        assert_eq!(set.layers, vec![0, 2]);
        assert_eq!(set.experts[0].text.as_deref(), Some("t.txt"));
        let base = set.base().unwrap();
        let expert = set.expert("e").unwrap();
        let residual = expert.minus(&base).unwrap();
        // The residual of a 1.5x expert is half the base.
        assert!((residual.sq_norm() - 0.25 * base.sq_norm()).abs() < 1e-6 * base.sq_norm());

        let mut swapped = model.clone();
        base.swap_into(&mut swapped).unwrap();
        let tokens = [1u32, 4, 2];
        let plain = crate::llama::tests::last_logits(&model, &tokens);
        assert_eq!(crate::llama::tests::last_logits(&swapped, &tokens), plain);
        expert.swap_into(&mut swapped).unwrap();
        assert_ne!(crate::llama::tests::last_logits(&swapped, &tokens), plain);

        let err = set.expert("nope").unwrap_err().to_string();
        assert!(
            err.contains("no expert 'nope'") && err.contains("(the set has e)"),
            "{err}"
        );
        // A set for a deeper model is refused without touching this one.
        let mut small = random_model(8, 12, 2, (2, 1), 11, 5);
        let before = crate::llama::tests::last_logits(&small, &tokens);
        assert!(expert.swap_into(&mut small).is_err());
        assert_eq!(crate::llama::tests::last_logits(&small, &tokens), before);
        std::fs::remove_dir_all(&dir).ok();
    }
}
