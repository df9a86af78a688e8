//! Where tensors come from: one [`TensorSource`] trait over GGUF files, safetensors directories
//! and in-memory maps, all addressed by Hugging Face tensor names and yielding f32 row-major data.
//!
//! Layer code looks weights up through a scoped [`Weights`] (`w.pp("model.layers.3").get(..)`),
//! so it never assembles long name strings and a shape mismatch names the full path.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::config::Arch;
use crate::error::ModelError;
use crate::gguf::GgufFile;
use crate::kernels::{WeightFormat, WeightMatrix};
use crate::quant::GgmlType;

/// An f32 tensor, row-major (`shape[0]` is the slowest axis; a linear weight is `[out, in]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Row-major shape.
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values.
    pub data: Vec<f32>,
}

/// What a source says about one tensor without loading it (for `s2lc info`).
#[derive(Debug, Clone, PartialEq)]
pub struct TensorDesc {
    /// Hugging Face name.
    pub name: String,
    /// Row-major shape.
    pub shape: Vec<usize>,
    /// Storage type as the file names it (`Q4_1`, `F32`, `BF16`, ...).
    pub dtype: String,
    /// Bytes in the file.
    pub bytes: u64,
}

/// A provider of named tensors, dequantized to f32.
pub trait TensorSource: Send + Sync {
    /// Loads tensor `name` (a Hugging Face name) as f32.
    fn load(&self, name: &str) -> Result<Tensor, ModelError>;
    /// Whether the source holds `name`.
    fn contains(&self, name: &str) -> bool {
        self.shape(name).is_some()
    }
    /// The row-major shape of `name` without loading it; `None` when absent.
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    /// Every tensor, by Hugging Face name, in a stable order.
    fn describe(&self) -> Vec<TensorDesc>;
    /// Tensor `name` as stored (ggml type and raw bytes, rows in the runtime's order), when the
    /// source keeps it in a block or half format; `None` means only [`TensorSource::load`] applies.
    fn load_raw(&self, _name: &str) -> Result<Option<RawTensor>, ModelError> {
        Ok(None)
    }
    /// Tensor `name` as raw bytes when the file stores it as `u8` (S2LC's low-bit rows and
    /// block-quantized correction factors, see [`BytesTensor`]); `None` when absent or not `u8`.
    fn load_bytes(&self, _name: &str) -> Result<Option<BytesTensor>, ModelError> {
        Ok(None)
    }
}

/// A `u8` tensor: rows of an encoded matrix (`shape = [rows, row_bytes]`), written by
/// [`write_safetensors_with_bytes`].
#[derive(Debug, Clone, PartialEq)]
pub struct BytesTensor {
    /// Row-major shape of the bytes.
    pub shape: Vec<usize>,
    /// The bytes.
    pub bytes: Vec<u8>,
}

/// A tensor's bytes as a file stores them (see [`TensorSource::load_raw`]).
#[derive(Debug, Clone)]
pub struct RawTensor {
    /// Storage type.
    pub dtype: GgmlType,
    /// Row-major shape.
    pub shape: Vec<usize>,
    /// Little-endian rows of blocks.
    pub bytes: Vec<u8>,
}

/// The storage the runtime keeps weight matrices in (`--weights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightStorage {
    /// Dequantized f32 (the reference; what compression works on).
    F32,
    /// IEEE f16.
    F16,
    /// ggml Q8_0 (8-bit blocks of 32).
    Q8_0,
    /// The file's own blocks when a kernel exists for them (GGUF Q4_0/Q4_1/Q5_0/Q5_1/Q4_K/Q8_0/F16/
    /// BF16); other block types are re-quantized to Q8_0, unquantized tensors stay f32.
    Native,
}

impl WeightStorage {
    /// Every storage, in command-line order.
    pub const ALL: [WeightStorage; 4] = [
        WeightStorage::F32,
        WeightStorage::F16,
        WeightStorage::Q8_0,
        WeightStorage::Native,
    ];

    /// The command-line name: `f32`, `f16`, `q8_0` or `native`.
    pub fn name(self) -> &'static str {
        match self {
            WeightStorage::F32 => "f32",
            WeightStorage::F16 => "f16",
            WeightStorage::Q8_0 => "q8_0",
            WeightStorage::Native => "native",
        }
    }

    /// Parses a command-line name (see [`WeightStorage::name`]).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|w| w.name() == s)
    }
}

/// A scoped view of a [`TensorSource`]: `pp` appends a name component, `get` checks the shape.
#[derive(Clone)]
pub struct Weights<'a> {
    source: &'a dyn TensorSource,
    prefix: String,
}

impl<'a> Weights<'a> {
    /// The source this scope reads.
    pub fn source(&self) -> &'a dyn TensorSource {
        self.source
    }

    /// A root scope over `source`.
    pub fn new(source: &'a dyn TensorSource) -> Self {
        Weights {
            source,
            prefix: String::new(),
        }
    }

    /// A child scope: `w.pp("model").pp("layers.0")` looks up `model.layers.0.<leaf>`.
    pub fn pp(&self, component: impl std::fmt::Display) -> Weights<'a> {
        let prefix = if self.prefix.is_empty() {
            component.to_string()
        } else {
            format!("{}.{component}", self.prefix)
        };
        Weights {
            source: self.source,
            prefix,
        }
    }

    /// The full name of `leaf` in this scope.
    pub fn full(&self, leaf: &str) -> String {
        if self.prefix.is_empty() {
            leaf.to_string()
        } else {
            format!("{}.{leaf}", self.prefix)
        }
    }

    /// Loads `leaf` and checks it has exactly `shape`.
    pub fn get(&self, leaf: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let name = self.full(leaf);
        let t = self.source.load(&name)?;
        if t.shape != shape {
            return Err(ModelError::ShapeMismatch {
                name,
                expected: shape.to_vec(),
                got: t.shape,
            });
        }
        Ok(t.data)
    }

    /// The shape of `leaf`, or `None` when the tensor is absent.
    pub fn shape_of(&self, leaf: &str) -> Option<Vec<usize>> {
        self.source.shape(&self.full(leaf))
    }

    /// Loads the `rows × cols` matrix `leaf` in `storage` (see [`WeightStorage`]); a width that a
    /// block format cannot hold (not a multiple of 32) stays f32.
    pub fn matrix(
        &self,
        leaf: &str,
        rows: usize,
        cols: usize,
        storage: WeightStorage,
    ) -> Result<WeightMatrix, ModelError> {
        let name = self.full(leaf);
        let mut stored_in_blocks = false;
        if storage == WeightStorage::Native {
            if let Some(raw) = self.source.load_raw(&name)? {
                if raw.shape != [rows, cols] {
                    return Err(ModelError::ShapeMismatch {
                        name,
                        expected: vec![rows, cols],
                        got: raw.shape,
                    });
                }
                match WeightFormat::from_ggml(raw.dtype) {
                    Some(format) => {
                        return WeightMatrix::from_blocks(format, raw.bytes, rows, cols)
                    }
                    None => stored_in_blocks = true,
                }
            }
        }
        let data = self.get(leaf, &[rows, cols])?;
        let format = match storage {
            WeightStorage::F32 => WeightFormat::F32,
            WeightStorage::F16 => WeightFormat::F16,
            // Native reaches here for f32 tensors (they stay f32) and block types without a
            // kernel (re-quantized to Q8_0, the closest format with one).
            WeightStorage::Native if !stored_in_blocks => WeightFormat::F32,
            WeightStorage::Q8_0 | WeightStorage::Native if cols % 32 == 0 => WeightFormat::Q8_0,
            WeightStorage::Q8_0 | WeightStorage::Native => WeightFormat::F32,
        };
        WeightMatrix::quantize(&data, rows, cols, format)
    }

    /// Like [`Weights::get`] but `None` when the tensor is absent (optional biases, untied heads).
    pub fn get_opt(&self, leaf: &str, shape: &[usize]) -> Result<Option<Vec<f32>>, ModelError> {
        if self.source.contains(&self.full(leaf)) {
            self.get(leaf, shape).map(Some)
        } else {
            Ok(None)
        }
    }
}

/// Tensor names outside the blocks: (Hugging Face, GGUF).
const GLOBAL_NAMES: &[(&str, &str)] = &[
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
];

/// Tensor names inside block N: (Hugging Face below `model.layers.N.`, GGUF below `blk.N.`).
const BLOCK_NAMES: &[(&str, &str)] = &[
    ("input_layernorm.weight", "attn_norm.weight"),
    ("self_attn.q_proj.weight", "attn_q.weight"),
    ("self_attn.q_proj.bias", "attn_q.bias"),
    ("self_attn.k_proj.weight", "attn_k.weight"),
    ("self_attn.k_proj.bias", "attn_k.bias"),
    ("self_attn.v_proj.weight", "attn_v.weight"),
    ("self_attn.v_proj.bias", "attn_v.bias"),
    ("self_attn.o_proj.weight", "attn_output.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"),
];

/// Maps a GGUF tensor name to its Hugging Face name (`blk.3.attn_q.weight` →
/// `model.layers.3.self_attn.q_proj.weight`); `None` for names outside the table.
pub fn gguf_to_hf(name: &str) -> Option<String> {
    if let Some(&(hf, _)) = GLOBAL_NAMES.iter().find(|(_, g)| *g == name) {
        return Some(hf.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, leaf) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let &(hf, _) = BLOCK_NAMES.iter().find(|(_, g)| *g == leaf)?;
    Some(format!("model.layers.{layer}.{hf}"))
}

/// Maps a Hugging Face tensor name to its GGUF name; the inverse of [`gguf_to_hf`].
pub fn hf_to_gguf(name: &str) -> Option<String> {
    if let Some(&(_, g)) = GLOBAL_NAMES.iter().find(|(hf, _)| *hf == name) {
        return Some(g.to_string());
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, leaf) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let &(_, g) = BLOCK_NAMES.iter().find(|(hf, _)| *hf == leaf)?;
    Some(format!("blk.{layer}.{g}"))
}

/// Undoes llama.cpp's row permutation of Llama q/k projections.
///
/// llama.cpp's converter reorders the rows of each head from the Hugging Face "rotate half" layout
/// `[h][t][i]` (t ∈ {0,1} selects the half, i < head_dim/2) to the interleaved layout `[h][i][t]` its
/// RoPE kernel expects. The runtime uses the Hugging Face layout, so GGUF rows are mapped back:
/// `hf[h·hd + t·hd/2 + i] = gguf[h·hd + 2i + t]`. `data` is `rows × cols` row-major.
/// Works on any element type: raw rows of quantized blocks move the same way (`cols` is then the
/// bytes per row).
pub fn unpermute_rope_rows<T: Copy + Default>(
    data: &[T],
    rows: usize,
    cols: usize,
    n_heads: usize,
) -> Vec<T> {
    let hd = rows / n_heads;
    let half = hd / 2;
    let mut out = vec![T::default(); data.len()];
    for h in 0..n_heads {
        for t in 0..2 {
            for i in 0..half {
                let dst = (h * hd + t * half + i) * cols;
                let src = (h * hd + 2 * i + t) * cols;
                out[dst..dst + cols].copy_from_slice(&data[src..src + cols]);
            }
        }
    }
    out
}

/// Tensors of a GGUF file under Hugging Face names, dequantized to f32 on load.
///
/// For the `llama` architecture the q/k projections are un-permuted to the Hugging Face layout
/// (see [`unpermute_rope_rows`]); [`GgufSource::file`] still gives the raw quantized blocks, in
/// the file's row order.
pub struct GgufSource {
    file: GgufFile,
    /// `(query heads, key/value heads)` when q/k rows must be un-permuted.
    rope_heads: Option<(usize, usize)>,
}

impl GgufSource {
    /// Wraps an open GGUF file.
    pub fn new(file: GgufFile) -> Self {
        let rope_heads = match file.architecture().ok().map(Arch::from_name) {
            Some(Ok(Arch::Llama)) => {
                let heads = file.get_u32("llama.attention.head_count").ok();
                let kv = file.get_u32("llama.attention.head_count_kv").ok().or(heads);
                heads.zip(kv).map(|(h, k)| (h as usize, k as usize))
            }
            _ => None,
        };
        GgufSource { file, rope_heads }
    }

    /// The underlying file (metadata, raw quantized blocks).
    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// The head count whose rows llama.cpp permuted in GGUF tensor `gname`, if any.
    fn permuted_heads(&self, gname: &str, shape: &[usize]) -> Option<usize> {
        let (n_heads, n_kv_heads) = self.rope_heads?;
        if shape.len() != 2 {
            return None;
        }
        if gname.ends_with("attn_q.weight") {
            Some(n_heads)
        } else if gname.ends_with("attn_k.weight") {
            Some(n_kv_heads)
        } else {
            None
        }
    }
}

impl TensorSource for GgufSource {
    fn load(&self, name: &str) -> Result<Tensor, ModelError> {
        let gname = hf_to_gguf(name).ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        let info = self
            .file
            .tensor_info(&gname)
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        let shape = info.shape();
        let mut data = self.file.dequantize(&gname)?;
        if let Some(h) = self.permuted_heads(&gname, &shape) {
            data = unpermute_rope_rows(&data, shape[0], shape[1], h);
        }
        Ok(Tensor { shape, data })
    }

    fn load_raw(&self, name: &str) -> Result<Option<RawTensor>, ModelError> {
        let Some(gname) = hf_to_gguf(name) else {
            return Ok(None);
        };
        let Some(info) = self.file.tensor_info(&gname) else {
            return Ok(None);
        };
        if info.dtype == GgmlType::F32 {
            return Ok(None);
        }
        let shape = info.shape();
        let mut bytes = self.file.tensor_bytes(info).to_vec();
        if let Some(h) = self.permuted_heads(&gname, &shape) {
            let row_bytes = bytes.len() / shape[0];
            bytes = unpermute_rope_rows(&bytes, shape[0], row_bytes, h);
        }
        Ok(Some(RawTensor {
            dtype: info.dtype,
            shape,
            bytes,
        }))
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.file.tensor_info(&hf_to_gguf(name)?).map(|t| t.shape())
    }

    fn describe(&self) -> Vec<TensorDesc> {
        self.file
            .tensors()
            .iter()
            .map(|t| TensorDesc {
                name: gguf_to_hf(&t.name).unwrap_or_else(|| t.name.clone()),
                shape: t.shape(),
                dtype: t.dtype.name().to_string(),
                bytes: t.n_bytes,
            })
            .collect()
    }
}

/// Tensors of the `*.safetensors` files of a directory (memory-mapped), converted to f32 on load.
pub struct SafetensorsSource {
    files: Vec<(PathBuf, Mmap)>,
    /// Tensor name → index into `files`.
    index: BTreeMap<String, usize>,
}

impl SafetensorsSource {
    /// Opens every `*.safetensors` file in `dir` (sorted by name).
    pub fn open_dir(dir: &Path) -> Result<Self, ModelError> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| ModelError::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(ModelError::NotAModel(dir.to_path_buf()));
        }
        let mut files = Vec::with_capacity(paths.len());
        let mut index = BTreeMap::new();
        for path in paths {
            let file = File::open(&path).map_err(|e| ModelError::io(&path, e))?;
            // SAFETY: the map is read-only; the model files are not modified while loaded.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(&path, e))?;
            let st = SafeTensors::deserialize(&map).map_err(|e| ModelError::Safetensors {
                path: path.clone(),
                message: e.to_string(),
            })?;
            for name in st.names() {
                index.insert(name.to_string(), files.len());
            }
            files.push((path, map));
        }
        Ok(SafetensorsSource { files, index })
    }

    fn with_view<T>(
        &self,
        name: &str,
        f: impl FnOnce(&safetensors::tensor::TensorView<'_>) -> Result<T, ModelError>,
    ) -> Result<T, ModelError> {
        let &i = self
            .index
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        let (path, map) = &self.files[i];
        let st = SafeTensors::deserialize(map).map_err(|e| ModelError::Safetensors {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let view = st.tensor(name).map_err(|e| ModelError::Safetensors {
            path: path.clone(),
            message: e.to_string(),
        })?;
        f(&view)
    }
}

/// Converts little-endian f32/f16/bf16 bytes to f32.
pub(crate) fn bytes_to_f32(name: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>, ModelError> {
    let data = match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => {
            return Err(ModelError::UnsupportedDtype {
                name: name.to_string(),
                dtype: format!("{other:?}"),
            })
        }
    };
    Ok(data)
}

impl TensorSource for SafetensorsSource {
    fn load(&self, name: &str) -> Result<Tensor, ModelError> {
        self.with_view(name, |v| {
            Ok(Tensor {
                shape: v.shape().to_vec(),
                data: bytes_to_f32(name, v.dtype(), v.data())?,
            })
        })
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.with_view(name, |v| Ok(v.shape().to_vec())).ok()
    }

    fn load_bytes(&self, name: &str) -> Result<Option<BytesTensor>, ModelError> {
        if !self.index.contains_key(name) {
            return Ok(None);
        }
        self.with_view(name, |v| {
            Ok((v.dtype() == Dtype::U8).then(|| BytesTensor {
                shape: v.shape().to_vec(),
                bytes: v.data().to_vec(),
            }))
        })
    }

    fn describe(&self) -> Vec<TensorDesc> {
        self.index
            .keys()
            .filter_map(|name| {
                self.with_view(name, |v| {
                    Ok(TensorDesc {
                        name: name.clone(),
                        shape: v.shape().to_vec(),
                        dtype: format!("{:?}", v.dtype()),
                        bytes: v.data().len() as u64,
                    })
                })
                .ok()
            })
            .collect()
    }
}

/// Reads every tensor of one safetensors file as f32 (F32, F16 and BF16 are converted), by name.
pub fn read_safetensors(path: &Path) -> Result<BTreeMap<String, Tensor>, ModelError> {
    read_safetensors_where(path, |_| true)
}

/// [`read_safetensors`] of the tensors whose names `keep` accepts (others, such as integer
/// buffers, are not converted).
pub fn read_safetensors_where(
    path: &Path,
    keep: impl Fn(&str) -> bool,
) -> Result<BTreeMap<String, Tensor>, ModelError> {
    let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| ModelError::Safetensors {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    st.tensors()
        .into_iter()
        .filter(|(name, _)| keep(name))
        .map(|(name, view)| {
            let data = bytes_to_f32(&name, view.dtype(), view.data())?;
            let shape = view.shape().to_vec();
            Ok((name, Tensor { shape, data }))
        })
        .collect()
}

pub use crate::atomic::write_file_atomic;

/// Writes f32 tensors (Hugging Face names, row-major) as one safetensors file with `metadata` in
/// its header, crash-safely ([`crate::atomic`]).
pub fn write_safetensors<'a>(
    path: &Path,
    tensors: impl IntoIterator<Item = (&'a str, &'a Tensor)>,
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<(), ModelError> {
    write_safetensors_with_bytes(path, tensors, std::iter::empty(), metadata)
}

/// [`write_safetensors`] plus `u8` tensors (encoded matrices, see [`BytesTensor`]).
pub fn write_safetensors_with_bytes<'a>(
    path: &Path,
    tensors: impl IntoIterator<Item = (&'a str, &'a Tensor)>,
    byte_tensors: impl IntoIterator<Item = (&'a str, &'a BytesTensor)>,
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<(), ModelError> {
    let mut views = Vec::new();
    let floats: Vec<(&str, &[usize], Vec<u8>)> = tensors
        .into_iter()
        .map(|(name, t)| {
            let b = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
            (name, t.shape.as_slice(), b)
        })
        .collect();
    let raw: Vec<(&str, &BytesTensor)> = byte_tensors.into_iter().collect();
    let all = floats
        .iter()
        .map(|(n, s, b)| (*n, Dtype::F32, *s, b.as_slice()))
        .chain(
            raw.iter()
                .map(|(n, t)| (*n, Dtype::U8, t.shape.as_slice(), t.bytes.as_slice())),
        );
    for (name, dtype, shape, b) in all {
        let view = safetensors::tensor::TensorView::new(dtype, shape.to_vec(), b).map_err(|e| {
            ModelError::Safetensors {
                path: path.to_path_buf(),
                message: format!("{name}: {e}"),
            }
        })?;
        views.push((name, view));
    }
    crate::atomic::write_atomic_with(path, |tmp| {
        safetensors::serialize_to_file(views, metadata, tmp).map_err(|e| ModelError::Safetensors {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    })
}

/// Tensors held in memory: for tests and for models built or transformed in-process.
#[derive(Default, Clone)]
pub struct MemorySource {
    tensors: BTreeMap<String, Tensor>,
}

impl MemorySource {
    /// An empty source.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a tensor.
    pub fn insert(&mut self, name: impl Into<String>, shape: Vec<usize>, data: Vec<f32>) {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        self.tensors.insert(name.into(), Tensor { shape, data });
    }
}

impl TensorSource for MemorySource {
    fn load(&self, name: &str) -> Result<Tensor, ModelError> {
        self.tensors
            .get(name)
            .cloned()
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|t| t.shape.clone())
    }

    fn describe(&self) -> Vec<TensorDesc> {
        self.tensors
            .iter()
            .map(|(name, t)| TensorDesc {
                name: name.clone(),
                shape: t.shape.clone(),
                dtype: "F32".into(),
                bytes: 4 * t.data.len() as u64,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_table_round_trips() {
        for g in [
            "token_embd.weight",
            "output_norm.weight",
            "blk.0.attn_q.weight",
            "blk.29.ffn_down.weight",
            "blk.7.attn_k.bias",
        ] {
            let hf = gguf_to_hf(g).unwrap();
            assert_eq!(hf_to_gguf(&hf).as_deref(), Some(g));
        }
        assert_eq!(
            gguf_to_hf("blk.3.attn_q.weight").as_deref(),
            Some("model.layers.3.self_attn.q_proj.weight")
        );
        assert_eq!(gguf_to_hf("blk.x.attn_q.weight"), None);
        assert_eq!(gguf_to_hf("rope_freqs.weight"), None);
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(h, 2, hd/2, cols).swapaxes(1, 2).reshape(rows, cols)
        let (heads, hd, cols) = (3, 8, 2);
        let rows = heads * hd;
        let hf: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        let mut gguf = vec![0.0; hf.len()];
        for h in 0..heads {
            for t in 0..2 {
                for i in 0..hd / 2 {
                    let src = (h * hd + t * hd / 2 + i) * cols;
                    let dst = (h * hd + 2 * i + t) * cols;
                    gguf[dst..dst + cols].copy_from_slice(&hf[src..src + cols]);
                }
            }
        }
        assert_ne!(gguf, hf);
        assert_eq!(unpermute_rope_rows(&gguf, rows, cols, heads), hf);
    }

    #[test]
    fn safetensors_round_trip() {
        let dir = std::env::temp_dir().join(format!("s2lc-st-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = Tensor {
            shape: vec![2, 3],
            data: vec![1.0, -2.0, 3.5, 0.0, 1e-7, f32::MAX],
        };
        let b = Tensor {
            shape: vec![4],
            data: vec![0.25; 4],
        };
        let meta = std::collections::HashMap::from([("method".to_string(), "test".to_string())]);
        write_safetensors(
            &dir.join("model.safetensors"),
            [("a.weight", &a), ("b", &b)],
            Some(meta),
        )
        .unwrap();
        let src = SafetensorsSource::open_dir(&dir).unwrap();
        assert_eq!(src.load("a.weight").unwrap(), a);
        assert_eq!(src.load("b").unwrap(), b);
        assert!(!src.contains("c"));
        assert_eq!(src.describe().len(), 2);
        // A truncated file is a clear error, not a panic.
        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        std::fs::write(dir.join("model.safetensors"), &bytes[..bytes.len() - 3]).unwrap();
        let err = SafetensorsSource::open_dir(&dir).err().unwrap().to_string();
        assert!(err.contains("invalid safetensors"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn weights_scope_checks_shapes() {
        let mut src = MemorySource::new();
        src.insert("model.layers.0.w", vec![2, 3], vec![0.0; 6]);
        let w = Weights::new(&src);
        let layer = w.pp("model").pp("layers.0");
        assert_eq!(layer.get("w", &[2, 3]).unwrap().len(), 6);
        let err = layer.get("w", &[3, 2]).unwrap_err().to_string();
        assert!(err.contains("model.layers.0.w"), "{err}");
        assert!(layer.get_opt("b", &[2]).unwrap().is_none());
        assert!(
            matches!(layer.get("b", &[2]), Err(ModelError::MissingTensor(n)) if n == "model.layers.0.b")
        );
    }
}
