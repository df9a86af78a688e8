//! Weight storage formats and the CPU kernels that multiply by them.
//!
//! A [`WeightMatrix`] is `rows × cols` (output × input, the Hugging Face layout), stored as f32 or
//! in one of ggml's formats exactly as a GGUF file holds it (f16, bf16, Q8_0, Q4_0, Q4_1, Q5_0,
//! Q5_1 in rows of 32-element blocks, Q4_K and Q6_K in blocks of 256; no dequantization pass). Two products:
//! - [`gemv`]: batch-1 `y = W·x`, memory-bound; rows are split across the persistent [`pool`] and
//!   each row is one SIMD dot product ([`dot`]). Several matrices sharing an input (q/k/v,
//!   gate/up) run as one job over their concatenated rows.
//! - [`WeightMatrix::matmul`]: `n > 1` rows of activations (prefill), compute-bound; each thread
//!   takes a range of weight rows, dequantizes a tile of them to f32 and multiplies it with faer.

pub mod dot;
pub mod lowbit;
pub mod ops;
pub mod pool;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::borrow::Cow;
use std::cell::RefCell;

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use half::{bf16, f16};

use crate::error::ModelError;
use crate::quant::{dequantize, GgmlType};
use dot::{dot_rows, Acts, QuantizedActs, Rows, BLOCK};

/// How a [`WeightMatrix`] stores its values.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightFormat {
    /// IEEE f32.
    F32,
    /// IEEE f16.
    F16,
    /// bfloat16.
    BF16,
    /// ggml Q8_0: 32 × i8 with an f16 scale (8.5 bits per weight).
    Q8_0,
    /// ggml Q4_0: 32 × 4-bit with an f16 scale (4.5 bits per weight).
    Q4_0,
    /// ggml Q4_1: 32 × 4-bit with an f16 scale and minimum (5 bits per weight).
    Q4_1,
    /// ggml Q5_0: 32 × 5-bit with an f16 scale (5.5 bits per weight).
    Q5_0,
    /// ggml Q5_1: 32 × 5-bit with an f16 scale and minimum (6 bits per weight).
    Q5_1,
    /// ggml Q4_K: 256 × 4-bit in 8 sub-blocks of 32 with 6-bit scales and minimums under f16
    /// super-scales (4.5 bits per weight).
    Q4_K,
    /// ggml Q6_K: 256 × 6-bit in 16 sub-blocks of 16 with int8 scales under an f16 super-scale
    /// (6.5625 bits per weight).
    Q6_K,
    /// S2LC 2-bit groups of 32 with log-coded scales ([`lowbit`]; 2.56 bits per weight at 576
    /// columns). No ggml equivalent.
    Sq2,
    /// S2LC 3-bit groups of 32 ([`lowbit`]; 3.56 bits per weight at 576 columns).
    Sq3,
    /// S2LC 4-bit groups of 32 ([`lowbit`]; 4.56 bits per weight at 576 columns).
    Sq4,
}

impl WeightFormat {
    /// The ggml type with the same layout (`None` for S2LC's own low-bit rows).
    pub fn ggml(self) -> Option<GgmlType> {
        Some(match self {
            WeightFormat::F32 => GgmlType::F32,
            WeightFormat::F16 => GgmlType::F16,
            WeightFormat::BF16 => GgmlType::BF16,
            WeightFormat::Q8_0 => GgmlType::Q8_0,
            WeightFormat::Q4_0 => GgmlType::Q4_0,
            WeightFormat::Q4_1 => GgmlType::Q4_1,
            WeightFormat::Q5_0 => GgmlType::Q5_0,
            WeightFormat::Q5_1 => GgmlType::Q5_1,
            WeightFormat::Q4_K => GgmlType::Q4_K,
            WeightFormat::Q6_K => GgmlType::Q6_K,
            WeightFormat::Sq2 | WeightFormat::Sq3 | WeightFormat::Sq4 => return None,
        })
    }

    /// Bits per code of S2LC's low-bit rows (`None` for the other formats).
    pub fn lowbit_bits(self) -> Option<usize> {
        match self {
            WeightFormat::Sq2 => Some(2),
            WeightFormat::Sq3 => Some(3),
            WeightFormat::Sq4 => Some(4),
            _ => None,
        }
    }

    /// The low-bit row format of `bits` (2, 3 or 4).
    pub fn lowbit(bits: usize) -> Option<Self> {
        match bits {
            2 => Some(WeightFormat::Sq2),
            3 => Some(WeightFormat::Sq3),
            4 => Some(WeightFormat::Sq4),
            _ => None,
        }
    }

    /// The format with kernels for ggml type `t`, if any.
    pub fn from_ggml(t: GgmlType) -> Option<Self> {
        Some(match t {
            GgmlType::F32 => WeightFormat::F32,
            GgmlType::F16 => WeightFormat::F16,
            GgmlType::BF16 => WeightFormat::BF16,
            GgmlType::Q8_0 => WeightFormat::Q8_0,
            GgmlType::Q4_0 => WeightFormat::Q4_0,
            GgmlType::Q4_1 => WeightFormat::Q4_1,
            GgmlType::Q5_0 => WeightFormat::Q5_0,
            GgmlType::Q5_1 => WeightFormat::Q5_1,
            GgmlType::Q4_K => WeightFormat::Q4_K,
            GgmlType::Q6_K => WeightFormat::Q6_K,
            _ => return None,
        })
    }

    /// Elements per block (1 for the float formats, a group of 32 for the low-bit rows).
    pub fn block_size(self) -> usize {
        match (self.ggml(), self.lowbit_bits()) {
            (Some(t), _) => t.block_size(),
            (None, _) => lowbit::GROUP,
        }
    }

    /// Bytes per block (for the low-bit rows: per group, without the 4-byte row header).
    pub fn block_bytes(self) -> usize {
        match (self.ggml(), self.lowbit_bits()) {
            (Some(t), _) => t.type_size(),
            (None, bits) => lowbit::group_bytes(bits.unwrap_or(0)),
        }
    }

    /// Bytes of one row of `cols` elements (`cols` a multiple of the block size).
    pub fn row_bytes(self, cols: usize) -> usize {
        match self.lowbit_bits() {
            Some(bits) => lowbit::row_bytes(bits, cols),
            None => cols / self.block_size() * self.block_bytes(),
        }
    }

    /// Whether products take the activation quantized per block of 32 ([`QuantizedActs`]): every
    /// block format (a K-quant's sub-blocks and the low-bit rows' groups are blocks of 32 too).
    fn quantizes_acts(self) -> bool {
        self.block_size() % BLOCK == 0
    }

    /// Lower-case name as used on the command line (`f32`, `q4_1`, ...).
    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::F32 => "f32",
            WeightFormat::F16 => "f16",
            WeightFormat::BF16 => "bf16",
            WeightFormat::Q8_0 => "q8_0",
            WeightFormat::Q4_0 => "q4_0",
            WeightFormat::Q4_1 => "q4_1",
            WeightFormat::Q5_0 => "q5_0",
            WeightFormat::Q5_1 => "q5_1",
            WeightFormat::Q4_K => "q4_k",
            WeightFormat::Q6_K => "q6_k",
            WeightFormat::Sq2 => "sq2",
            WeightFormat::Sq3 => "sq3",
            WeightFormat::Sq4 => "sq4",
        }
    }
}

impl std::fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone)]
enum Storage {
    F32(Vec<f32>),
    Blocks(WeightFormat, Vec<u8>),
}

/// A `rows × cols` weight matrix (output × input), row-major, in one [`WeightFormat`].
#[derive(Debug, Clone)]
pub struct WeightMatrix {
    rows: usize,
    cols: usize,
    storage: Storage,
}

impl WeightMatrix {
    /// Wraps `rows × cols` row-major f32 values.
    ///
    /// # Panics
    /// If `data.len() != rows · cols` (callers load through shape-checked [`crate::source::Weights`]).
    pub fn from_f32(data: Vec<f32>, rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * cols, "weight is not rows × cols");
        WeightMatrix {
            rows,
            cols,
            storage: Storage::F32(data),
        }
    }

    /// Wraps raw little-endian blocks of `format` (a GGUF tensor's bytes), checking the length.
    pub fn from_blocks(
        format: WeightFormat,
        bytes: Vec<u8>,
        rows: usize,
        cols: usize,
    ) -> Result<Self, ModelError> {
        if format == WeightFormat::F32 {
            let data = bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect::<Vec<_>>();
            check_len(format, rows, cols, bytes.len())?;
            return Ok(WeightMatrix::from_f32(data, rows, cols));
        }
        check_len(format, rows, cols, bytes.len())?;
        Ok(WeightMatrix {
            rows,
            cols,
            storage: Storage::Blocks(format, bytes),
        })
    }

    /// Converts f32 values to `format`: f16/bf16 round to nearest, Q8_0 as llama.cpp quantizes
    /// it (`d = max|x|/127` per block, stored as f16), Q4_0 likewise (`d = −m/8` for the block's
    /// value `m` of largest magnitude, so `m` itself is exact at code 0 and the rest round to
    /// nearest within codes 0..=15). The other block formats are only loaded, never produced
    /// here.
    pub fn quantize(
        data: &[f32],
        rows: usize,
        cols: usize,
        format: WeightFormat,
    ) -> Result<Self, ModelError> {
        assert_eq!(data.len(), rows * cols, "weight is not rows × cols");
        let bytes: Vec<u8> = match format {
            WeightFormat::F32 => return Ok(WeightMatrix::from_f32(data.to_vec(), rows, cols)),
            WeightFormat::F16 => data
                .iter()
                .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                .collect(),
            WeightFormat::BF16 => data
                .iter()
                .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                .collect(),
            WeightFormat::Q8_0 => {
                if cols % BLOCK != 0 {
                    return Err(layout_error(format, cols));
                }
                let mut out = Vec::with_capacity(format.row_bytes(cols) * rows);
                for block in data.chunks_exact(BLOCK) {
                    let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                    let d = amax / 127.0;
                    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
                    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                    out.extend(block.iter().map(|v| (v * id).round() as i8 as u8));
                }
                out
            }
            WeightFormat::Q4_0 => {
                if cols % BLOCK != 0 {
                    return Err(layout_error(format, cols));
                }
                let mut out = Vec::with_capacity(format.row_bytes(cols) * rows);
                for block in data.chunks_exact(BLOCK) {
                    let m = block
                        .iter()
                        .fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                    let d = m / -8.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    let code = |v: f32| (v * id + 8.5).clamp(0.0, 15.0) as u8;
                    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                    let (lo, hi) = block.split_at(BLOCK / 2);
                    out.extend(lo.iter().zip(hi).map(|(&l, &h)| code(l) | (code(h) << 4)));
                }
                out
            }
            WeightFormat::Sq2 | WeightFormat::Sq3 | WeightFormat::Sq4 => {
                if cols % lowbit::GROUP != 0 {
                    return Err(layout_error(format, cols));
                }
                lowbit::quantize_rtn(data, cols, format.lowbit_bits().unwrap_or(4))
            }
            other => {
                return Err(ModelError::WeightFormat(format!(
                    "converting to {other} is not supported (only f32, f16, bf16, q8_0, q4_0 and \
                     sq2/sq3/sq4 are produced)"
                )))
            }
        };
        WeightMatrix::from_blocks(format, bytes, rows, cols)
    }

    /// `data` (`rows × cols`, row-major) in `format`, or in f16 when `format` is a block format
    /// and the rows are not whole blocks (a LoRA factor or pack basis of an odd size).
    pub fn quantize_or_f16(
        data: &[f32],
        rows: usize,
        cols: usize,
        format: WeightFormat,
    ) -> Result<Self, ModelError> {
        let format = if cols % format.block_size() == 0 {
            format
        } else {
            WeightFormat::F16
        };
        WeightMatrix::quantize(data, rows, cols, format)
    }

    /// Output features (rows).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features (columns).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The storage format.
    pub fn format(&self) -> WeightFormat {
        match &self.storage {
            Storage::F32(_) => WeightFormat::F32,
            Storage::Blocks(f, _) => *f,
        }
    }

    /// Bytes held (what a product reads from memory).
    pub fn bytes(&self) -> usize {
        match &self.storage {
            Storage::F32(v) => v.len() * 4,
            Storage::Blocks(_, b) => b.len(),
        }
    }

    /// The encoded rows when stored in a non-f32 format (`rows × format.row_bytes(cols)`).
    pub fn encoded(&self) -> Option<&[u8]> {
        match &self.storage {
            Storage::F32(_) => None,
            Storage::Blocks(_, b) => Some(b),
        }
    }

    /// The f32 values, mutable, when stored as f32 (merging a delta into the weight).
    pub fn as_f32_mut(&mut self) -> Option<&mut [f32]> {
        match &mut self.storage {
            Storage::F32(v) => Some(v),
            Storage::Blocks(..) => None,
        }
    }

    /// The f32 values when stored as f32.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.storage {
            Storage::F32(v) => Some(v),
            Storage::Blocks(..) => None,
        }
    }

    /// All values as f32 (borrowed when stored as f32, dequantized otherwise).
    pub fn to_f32(&self) -> Cow<'_, [f32]> {
        match &self.storage {
            Storage::F32(v) => Cow::Borrowed(v),
            Storage::Blocks(..) => {
                let mut out = vec![0.0; self.rows * self.cols];
                self.dequantize_rows(0, self.rows, &mut out);
                Cow::Owned(out)
            }
        }
    }

    /// Rows `r0..r1` as f32 into `out` (`(r1 − r0) × cols`).
    pub fn dequantize_rows(&self, r0: usize, r1: usize, out: &mut [f32]) {
        let c = self.cols;
        match &self.storage {
            Storage::F32(v) => out.copy_from_slice(&v[r0 * c..r1 * c]),
            Storage::Blocks(f, b) => {
                let rb = f.row_bytes(c);
                let bytes = &b[r0 * rb..r1 * rb];
                if let Some(bits) = f.lowbit_bits() {
                    lowbit::dequantize(bits, bytes, c, out);
                } else if !dot::dequantize_fast(*f, bytes, out) {
                    // The layout was checked on construction, so decoding cannot fail.
                    let r = f.ggml().map(|t| dequantize(t, bytes, out));
                    debug_assert!(matches!(r, Some(Ok(()))), "{r:?}");
                }
            }
        }
    }

    /// `y (n × cols) += c (n × rows) · W`: each output row is a combination of `W`'s rows. This
    /// is the product with `W` transposed, for a matrix held with its long side along the rows
    /// (a block-quantized `Bᵀ` of a LoRA delta, a pack's `Uᵀ`), where the block kernels cannot
    /// run `Wᵀ·x` directly. For fewer than [`AXPY_GEMM_ROWS`] rows, each row of `W` is decoded
    /// once (into `row`, reused across calls) and added to every output row while it sits in L1;
    /// zero coefficients are skipped. For more, `W` is decoded whole into `row` (it is a thin
    /// matrix: a rank times a width) and multiplied with faer's GEMM, the output's columns split
    /// across the pool's threads: streaming `y` once per row of `W` is what the small path costs,
    /// and it grows with `n`.
    ///
    /// # Panics
    /// If `c` is not `n × rows` or `y` not `n × cols`.
    pub fn axpy_rows(&self, c: &[f32], n: usize, y: &mut [f32], row: &mut Vec<f32>) {
        let (r, k) = (self.rows, self.cols);
        assert!(
            n.checked_mul(r) == Some(c.len()) && n.checked_mul(k) == Some(y.len()),
            "axpy_rows of {n} rows by {r} × {k}: c has {} values, y {}",
            c.len(),
            y.len()
        );
        if n >= AXPY_GEMM_ROWS && r > 0 && k > 0 {
            let w: &[f32] = match self.as_f32() {
                Some(v) => v,
                None => {
                    row.resize(r * k, 0.0);
                    self.dequantize_rows(0, r, row);
                    &row[..]
                }
            };
            let y_ptr = SyncPtr(y.as_mut_ptr());
            let job = |part: usize, parts: usize| {
                let cols = pool::split_range(k, part, parts, 16);
                if cols.is_empty() {
                    return;
                }
                let cm = MatRef::from_row_major_slice(c, n, r);
                let wm = MatRef::from_row_major_slice(w, r, k).subcols(cols.start, cols.len());
                // SAFETY: `y` is n × k row-major (asserted above); this part writes only its
                // columns `cols` ⊆ 0..k, disjoint from every other part's; `y` outlives the job.
                let out = unsafe {
                    MatMut::from_raw_parts_mut(
                        y_ptr.get().add(cols.start),
                        n,
                        cols.len(),
                        k as isize,
                        1,
                    )
                };
                matmul(out, Accum::Add, cm, wm, 1.0f32, Par::Seq);
            };
            run_sized(n * r * k, &job);
            return;
        }
        if let Some(w) = self.as_f32() {
            for (yi, ci) in y.chunks_exact_mut(k).zip(c.chunks_exact(r)) {
                for (j, wj) in w.chunks_exact(k).enumerate() {
                    if ci[j] != 0.0 {
                        ops::axpy(yi, ci[j], wj);
                    }
                }
            }
            return;
        }
        row.resize(k, 0.0);
        for j in 0..r {
            if (0..n).all(|i| c[i * r + j] == 0.0) {
                continue;
            }
            self.dequantize_rows(j, j + 1, row);
            for (i, yi) in y.chunks_exact_mut(k).enumerate() {
                let cij = c[i * r + j];
                if cij != 0.0 {
                    ops::axpy(yi, cij, row);
                }
            }
        }
    }

    fn rows_ref(&self, r0: usize, r1: usize) -> Rows<'_> {
        let c = self.cols;
        match &self.storage {
            Storage::F32(v) => Rows::F32(&v[r0 * c..r1 * c]),
            Storage::Blocks(f, b) => {
                let rb = f.row_bytes(c);
                Rows::Blocks(*f, &b[r0 * rb..r1 * rb])
            }
        }
    }

    /// `y (n × rows) = [y +] x (n × cols) · Wᵀ`, both row-major: [`gemv`] for `n ≤`
    /// [`SMALL_BATCH`] (decode steps), otherwise
    /// tiles of `W` dequantized to f32 and multiplied with faer, weight rows split across threads.
    ///
    /// # Panics
    /// If `x` is not `n × cols` or `y` not `n × rows`.
    pub fn matmul(
        &self,
        x: &[f32],
        n: usize,
        y: &mut [f32],
        accum: Accum,
        acts: &mut QuantizedActs,
    ) {
        assert!(
            n.checked_mul(self.cols) == Some(x.len()) && n.checked_mul(self.rows) == Some(y.len()),
            "matmul of {n} rows by {} × {}: x has {} values, y {}",
            self.rows,
            self.cols,
            x.len(),
            y.len()
        );
        if n <= SMALL_BATCH {
            gemv(&mut [GemvTask::new(self, y, accum == Accum::Add)], x, acts);
            return;
        }
        let (m, k) = (self.rows, self.cols);
        // Weight rows per dequantized tile: ~128 KB of f32, at least 8.
        let tile = (32 * 1024 / k.max(1)).clamp(8, 256) / 8 * 8;
        let y_ptr = SyncPtr(y.as_mut_ptr());
        let job = |part: usize, parts: usize| {
            let rows = pool::split_range(m, part, parts, 8);
            let xm = MatRef::from_row_major_slice(x, n, k);
            TILE.with_borrow_mut(|buf| {
                for r0 in rows.clone().step_by(tile) {
                    let r1 = (r0 + tile).min(rows.end);
                    let w = match self.as_f32() {
                        Some(v) => &v[r0 * k..r1 * k],
                        None => {
                            buf.resize((r1 - r0) * k, 0.0);
                            self.dequantize_rows(r0, r1, buf);
                            &buf[..]
                        }
                    };
                    let wt = MatRef::from_row_major_slice(w, r1 - r0, k).transpose();
                    // SAFETY: `y` is n × m row-major (asserted above); this part writes only its
                    // columns r0..r1 ⊆ 0..m, disjoint from every other part's; `y` outlives the
                    // job.
                    let out = unsafe {
                        MatMut::from_raw_parts_mut(y_ptr.get().add(r0), n, r1 - r0, m as isize, 1)
                    };
                    matmul(out, accum, xm, wt, 1.0f32, Par::Seq);
                }
            });
        };
        run_sized(n * m * k, &job);
    }
}

/// Fewest multiply-adds of a GEMM worth splitting over the pool's threads: waking them and
/// waiting for the slowest costs more than a product below this (a pack's stacked cores, a
/// rank-8 factor) takes on one thread.
const PAR_MIN_FMAS: usize = 1 << 18;

/// Runs a pool job of `fmas` multiply-adds on the pool, or on this thread alone when it is
/// too small to split ([`PAR_MIN_FMAS`]).
fn run_sized(fmas: usize, job: &(dyn Fn(usize, usize) + Sync)) {
    if fmas < PAR_MIN_FMAS {
        job(0, 1);
    } else {
        pool::global().run(job);
    }
}

thread_local! {
    /// Per-thread dequantized weight tile of [`WeightMatrix::matmul`], reused across calls.
    static TILE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// A raw output pointer shared by the parts of a pool job, each writing a disjoint range.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr(pub(crate) *mut f32);

// SAFETY: parts write disjoint elements (each use states its partition) and the job ends before
// the buffer is used again.
unsafe impl Send for SyncPtr {}
// SAFETY: as for `Send`: shared between the parts of one job, each writing its own elements.
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    /// The pointer (a method, so closures capture the `Sync` wrapper, not the raw field).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

fn layout_error(format: WeightFormat, cols: usize) -> ModelError {
    ModelError::WeightFormat(format!(
        "{format} stores rows in blocks of {}, but a row has {cols} values",
        format.block_size()
    ))
}

fn check_len(format: WeightFormat, rows: usize, cols: usize, len: usize) -> Result<(), ModelError> {
    if cols % format.block_size() != 0 {
        return Err(layout_error(format, cols));
    }
    let want = format.row_bytes(cols) * rows;
    if len != want {
        return Err(ModelError::WeightFormat(format!(
            "{rows} × {cols} {format} needs {want} bytes, got {len}"
        )));
    }
    Ok(())
}

/// Most activation rows a product runs through the GEMV kernels (several sequences decoding
/// together). Each chunk of weight rows is read from memory once and dotted with every
/// activation row while it sits in L1; the results are bit for bit those of one row alone.
/// Beyond this, dequantized tiles and faer's GEMM are faster.
pub const SMALL_BATCH: usize = 8;

/// Fewest output rows for which [`WeightMatrix::axpy_rows`] runs as a GEMM over the whole
/// decoded matrix instead of one row of it at a time.
pub const AXPY_GEMM_ROWS: usize = 4;

/// One matrix of a fused [`gemv`]: `out (+)= W·x` for each of the `n` input rows.
pub struct GemvTask<'a> {
    weight: &'a WeightMatrix,
    out: SyncPtr,
    len: usize,
    add: bool,
    _out: std::marker::PhantomData<&'a mut [f32]>,
}

impl<'a> GemvTask<'a> {
    /// `out` (`n × weight.rows()` values, row-major, for `n` input rows) is overwritten, or added
    /// to when `add`.
    pub fn new(weight: &'a WeightMatrix, out: &'a mut [f32], add: bool) -> Self {
        assert!(
            weight.rows() > 0 && out.len() % weight.rows() == 0,
            "gemv output is not a whole number of rows"
        );
        GemvTask {
            weight,
            len: out.len(),
            out: SyncPtr(out.as_mut_ptr()),
            add,
            _out: std::marker::PhantomData,
        }
    }
}

/// `out_i (+)= W_i·x` for every task, all sharing the input `x` (`n` rows of `cols` values,
/// `n ≤` [`SMALL_BATCH`] in practice), as one pool job over the concatenated weight rows (so
/// q/k/v or gate/up cost one hand-off, not three). `acts` is scratch for `x` quantized per block,
/// filled only when some format needs it.
pub fn gemv(tasks: &mut [GemvTask<'_>], x: &[f32], acts: &mut QuantizedActs) {
    let Some(cols) = tasks.first().map(|t| t.weight.cols()) else {
        return;
    };
    assert!(
        cols > 0 && x.len() % cols == 0,
        "gemv input is not a whole number of rows"
    );
    let n = x.len() / cols;
    for t in tasks.iter() {
        assert_eq!(t.weight.cols(), cols, "gemv tasks differ in input width");
        assert_eq!(t.len, n * t.weight.rows(), "gemv output is not n × rows");
    }
    let quantized = tasks.iter().any(|t| t.weight.format().quantizes_acts());
    if quantized {
        acts.quantize(x);
    }
    let acts = &*acts;
    let total: usize = tasks.iter().map(|t| t.weight.rows()).sum();
    let tasks = &*tasks;
    let job = |part: usize, parts: usize| {
        // Rows in units of 4 so no two parts split a cache line of f32 outputs finely.
        let mine = pool::split_range(total, part, parts, 4);
        let mut base = 0;
        for t in tasks {
            let rows = t.weight.rows();
            let (lo, hi) = (mine.start.max(base), mine.end.min(base + rows));
            // Chunks of ~8 KB of weights stay in L1 while every input row passes over them.
            let chunk = if n == 1 {
                hi.saturating_sub(lo).max(1)
            } else {
                (8192 / t.weight.format().row_bytes(cols).max(1)).max(4)
            };
            let row_acts = |i: usize| {
                if quantized {
                    acts.row(i, cols)
                } else {
                    Acts::default()
                }
            };
            for c0 in (lo..hi).step_by(chunk) {
                let (r0, r1) = (c0 - base, (c0 + chunk).min(hi) - base);
                let w = t.weight.rows_ref(r0, r1);
                let mut i = 0;
                while i < n {
                    // Four or two activation rows per pass where a multi-row kernel exists.
                    let m = if n - i >= 4 { 4 } else { 2 };
                    if n - i >= 2 && quantized {
                        let group: [Acts<'_>; 4] =
                            std::array::from_fn(|k| row_acts(i + k.min(m - 1)));
                        // SAFETY: the task's output is n × rows (`t.len`, asserted above) and
                        // i + m ≤ n; the kernel writes columns r0..r1 (the r1 − r0 weight rows
                        // of `w`) of output rows i..i + m, which belong to this part alone.
                        let done = unsafe {
                            let base_out = t.out.get().add(i * rows + r0);
                            dot::dot_rows_multi(w, cols, &group[..m], base_out, rows, t.add)
                        };
                        if done {
                            i += m;
                            continue;
                        }
                    }
                    // SAFETY: columns r0..r1 of output row i < n (the output is n × rows,
                    // asserted above) belong to this part alone; the slice lives as long as the
                    // task's borrow, which outlives the job.
                    let out = unsafe {
                        std::slice::from_raw_parts_mut(t.out.get().add(i * rows + r0), r1 - r0)
                    };
                    dot_rows(w, &x[i * cols..(i + 1) * cols], row_acts(i), out, t.add);
                    i += 1;
                }
            }
            base += rows;
        }
    };
    // Tiny products (a few KB of weights) are not worth waking the other threads.
    let bytes: usize = tasks.iter().map(|t| t.weight.bytes()).sum();
    if bytes * n < 64 * 1024 {
        job(0, 1);
    } else {
        pool::global().run(&job);
    }
}

#[cfg(test)]
mod tests;
