//! One file of a pack read as untrusted input: its matrices parsed, plain or entropy-coded, each
//! checked against the limits before anything is allocated for it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;

use half::f16;
use rayon::prelude::*;
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use s2lc_model::lora::TARGETS;
use s2lc_spectral::{AnsTable, BlockQuant, QuantBits};

use crate::artifact::AdapterLimits;
use crate::pack::files::{width_index, QMatHeader, Slot, CODED_KEY, PARTS, PLAIN_KEY, RECORD};
use crate::pack::{ModuleKey, PackError, QMat};
use crate::qbasis::QBasis;

/// Largest block size a file may declare (a guard against a corrupt header's allocation).
pub(super) const MAX_BLOCK: usize = 1 << 16;

/// The tensor `name` of `st` as bytes, checked to be of `dtype`.
fn tensor<'a>(st: &SafeTensors<'a>, name: &str, dtype: Dtype) -> Result<&'a [u8], String> {
    let view = st
        .tensor(name)
        .map_err(|_| format!("tensor {name} is missing"))?;
    if view.dtype() != dtype {
        return Err(format!(
            "tensor {name} is {:?}, not {dtype:?}",
            view.dtype()
        ));
    }
    Ok(view.data())
}

/// Little-endian f16 values.
fn f16s(bytes: &[u8]) -> Vec<f16> {
    bytes
        .chunks_exact(2)
        .map(|b| f16::from_le_bytes([b[0], b[1]]))
        .collect()
}

/// The frequency table `name.freqs` (pairs of symbol and frequency, symbols below `alphabet`).
fn read_table(st: &SafeTensors<'_>, name: &str, alphabet: usize) -> Result<AnsTable, String> {
    let mut freqs = vec![0u16; alphabet];
    let pairs = tensor(st, &format!("{name}.freqs"), Dtype::U16)?;
    if pairs.len() % 4 != 0 {
        return Err(format!(
            "{name}.freqs is not whole (symbol, frequency) pairs"
        ));
    }
    for pair in pairs.chunks_exact(4) {
        let symbol = u16::from_le_bytes([pair[0], pair[1]]) as usize;
        let freq = u16::from_le_bytes([pair[2], pair[3]]);
        match freqs.get_mut(symbol) {
            Some(f) if *f == 0 && freq > 0 => *f = freq,
            _ => return Err(format!("{name}.freqs: symbol {symbol} of {alphabet} (frequency {freq}, given twice or out of range)")),
        }
    }
    AnsTable::from_freqs(freqs).map_err(|e| format!("{name}: {e}"))
}

/// The stream `name` (table `name.freqs`, symbols `name.stream`) decoded into `out`: exactly
/// `out.len()` symbols, a length the caller has checked against its limits.
fn decode_stream(
    st: &SafeTensors<'_>,
    name: &str,
    alphabet: usize,
    out: &mut [u8],
) -> Result<(), String> {
    read_table(st, name, alphabet)?
        .decode_into(tensor(st, &format!("{name}.stream"), Dtype::U8)?, out)
        .map_err(|e| format!("{name}.stream: {e}"))
}

/// Values charged to the budget for every matrix besides its own, so that a file cannot declare
/// unboundedly many empty ones.
const MATRIX_COST: usize = 64;

/// What the matrices of one artifact may still declare: every matrix is checked against the
/// limits and charged its values (rounded up to whole blocks) before anything is allocated
/// for it, so all the files of a pack together decode to at most `max_values` values.
pub(super) struct Budget<'a> {
    limits: &'a AdapterLimits,
    /// The pack's block size (`params.block`): every matrix's.
    block: usize,
    values_left: usize,
}

impl<'a> Budget<'a> {
    pub(super) fn new(limits: &'a AdapterLimits, block: usize) -> Self {
        Budget {
            limits,
            block,
            values_left: limits.max_values,
        }
    }

    /// Admits the `rows × cols` matrix at `slot` in blocks of `block`: returns its values.
    fn admit(
        &mut self,
        slot: &Slot,
        rows: usize,
        cols: usize,
        block: usize,
    ) -> Result<usize, String> {
        let (l, name) = (self.limits, slot.name());
        if slot.key.layer >= l.max_layers {
            return Err(format!(
                "matrix {name}: layer {}, but at most {} layers are accepted",
                slot.key.layer, l.max_layers
            ));
        }
        if slot.group > 0 && slot.part > 1 {
            return Err(format!("matrix {name}: a column group of a core"));
        }
        if block != self.block {
            return Err(format!(
                "matrix {name}: block size {block}, not the pack's {}",
                self.block
            ));
        }
        // Bases are `dim × rank`, cores `rank × rank`, residual factors `dim × r` and `r × dim`.
        let (dim, rank) = (l.max_dim, l.max_rank);
        let (max_rows, max_cols) = match slot.part {
            0 | 1 | 4 => (dim, rank),
            2 | 3 => (rank, rank),
            _ => (rank, dim),
        };
        if rows > max_rows || cols > max_cols {
            return Err(format!(
                "matrix {name}: {rows}×{cols}, more than the {max_rows}×{max_cols} accepted"
            ));
        }
        let len = rows
            .checked_mul(cols)
            .ok_or_else(|| format!("matrix {name}: {rows}×{cols} values"))?;
        let charged = len
            .div_ceil(block)
            .saturating_mul(block)
            .saturating_add(MATRIX_COST);
        self.values_left = self.values_left.checked_sub(charged).ok_or_else(|| {
            format!(
                "matrix {name}: the pack declares more than the {} values accepted",
                l.max_values
            )
        })?;
        Ok(len)
    }
}

/// The slot of a tensor prefix `L{layer}.{target}.{part}[.{group}]` (as [`Slot::name`] writes).
fn parse_slot(name: &str) -> Option<Slot> {
    let rest = name.strip_prefix('L')?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (target, rest) = rest.split_once('.')?;
    let target = TARGETS.iter().position(|t| *t == target)?;
    let (part, group) = match rest.rsplit_once('.') {
        Some((part, group)) if !group.starts_with('0') => (part, group.parse().ok()?),
        _ => (rest, 0),
    };
    let part = PARTS.iter().position(|p| *p == part)?;
    let slot = Slot {
        key: ModuleKey { layer, target },
        part,
        group,
    };
    // One spelling per slot (no leading zeros, no `.0` group), so names cannot alias.
    (slot.name() == name).then_some(slot)
}

/// The matrices of a plain file: three tensors each, shapes in the `s2lc` metadata.
fn read_plain(
    st: &SafeTensors<'_>,
    headers: &str,
    budget: &mut Budget<'_>,
) -> Result<HashMap<String, QMat>, String> {
    let headers: BTreeMap<String, QMatHeader> =
        serde_json::from_str(headers).map_err(|e| e.to_string())?;
    if headers.len() > st.len() / 3 {
        return Err(format!(
            "{} matrices declared but {} tensors present (three per matrix)",
            headers.len(),
            st.len()
        ));
    }
    let mut mats = HashMap::with_capacity(headers.len());
    for (name, h) in headers {
        let slot = parse_slot(&name).ok_or_else(|| format!("matrix name {name}"))?;
        let len = budget.admit(&slot, h.rows, h.cols, h.block)?;
        let kept_bytes = tensor(st, &format!("{name}.kept"), Dtype::U8)?;
        if kept_bytes.len() != len.div_ceil(h.block).div_ceil(64) * 8 {
            return Err(format!(
                "{name}.kept: {} bytes for {} blocks",
                kept_bytes.len(),
                len.div_ceil(h.block)
            ));
        }
        let q = BlockQuant {
            bits: h.bits,
            block: h.block,
            len,
            kept: kept_bytes
                .chunks_exact(8)
                .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect(),
            scales: f16s(tensor(st, &format!("{name}.scales"), Dtype::F16)?),
            data: tensor(st, &format!("{name}.data"), Dtype::U8)?.to_vec(),
        };
        q.validate().map_err(|e| format!("matrix {name}: {e}"))?;
        let (rows, cols) = (h.rows, h.cols);
        mats.insert(name, QMat { rows, cols, q });
    }
    Ok(mats)
}

/// One matrix of a coded file's index: name, width (index into [`QuantBits::ALL`]), rows,
/// columns, block size, values.
type Record = (String, usize, usize, usize, usize, usize);

/// The matrices of a coded file (see [`crate::format`]). Every count is checked before it is
/// allocated: the records one at a time as they are decoded, then the bitmaps, scales and codes
/// they declare, whose sizes the budget has admitted.
fn read_coded(
    st: &SafeTensors<'_>,
    meta: &str,
    budget: &mut Budget<'_>,
) -> Result<HashMap<String, QMat>, String> {
    #[derive(Deserialize)]
    struct Meta {
        matrices: usize,
    }
    let n = serde_json::from_str::<Meta>(meta)
        .map_err(|e| e.to_string())?
        .matrices;
    if n > 1 << 24 {
        return Err(format!("{n} matrices"));
    }
    // The records, decoded one by one: a stream can decode to any length (a one-symbol table
    // decodes it from 16 bytes), so nothing is sized by `n` before its records are admitted.
    let table = read_table(st, "index", 256)?;
    let mut index = table
        .decoder(tensor(st, "index.stream", Dtype::U8)?)
        .map_err(|e| format!("index.stream: {e}"))?;
    let mut records: Vec<Record> = Vec::new();
    let mut names = HashSet::new();
    let mut r = [0u8; RECORD];
    for _ in 0..n {
        index
            .decode(&mut r)
            .map_err(|e| format!("index.stream: {e}"))?;
        let u32_at =
            |i: usize| u32::from_le_bytes(r[i..i + 4].try_into().expect("4 bytes")) as usize;
        let key = ModuleKey {
            layer: u16::from_le_bytes([r[0], r[1]]) as usize,
            target: r[2] as usize,
        };
        let (part, group) = (r[3] as usize, r[4] as usize);
        if key.target >= TARGETS.len() || part >= PARTS.len() {
            return Err(format!("index record of target {} part {part}", key.target));
        }
        let slot = Slot { key, part, group };
        let name = slot.name();
        if !names.insert(name.clone()) {
            return Err(format!("matrix {name} appears twice"));
        }
        let w = QuantBits::ALL
            .iter()
            .position(|b| b.bits() == r[5] as usize)
            .ok_or_else(|| format!("matrix {name}: {} bits", r[5]))?;
        let (rows, cols, block) = (u32_at(6), u32_at(10), u32_at(14));
        if block == 0 || block > MAX_BLOCK {
            return Err(format!("matrix {name}: block size {block}"));
        }
        let len = budget.admit(&slot, rows, cols, block)?;
        records.push((name, w, rows, cols, block, len));
    }
    index.finish().map_err(|e| format!("index.stream: {e}"))?;
    let bitmap_len = |&(.., block, len): &Record| len.div_ceil(block).div_ceil(8);
    let mut kept_bytes = vec![0u8; records.iter().map(bitmap_len).sum()];
    decode_stream(st, "kept", 256, &mut kept_bytes)?;
    let mut bitmaps = Vec::with_capacity(records.len());
    let mut at = 0;
    for rec in &records {
        let bytes = &kept_bytes[at..at + bitmap_len(rec)];
        at += bytes.len();
        let mut kept = vec![0u64; bytes.len().div_ceil(8)];
        for (i, &b) in bytes.iter().enumerate() {
            kept[i / 8] |= (b as u64) << (8 * (i % 8));
        }
        bitmaps.push(kept);
    }
    drop(kept_bytes);
    let n_kept: usize = bitmaps
        .iter()
        .flatten()
        .map(|w| w.count_ones() as usize)
        .sum();
    // The low bytes are stored as they are: one per kept block must be present.
    let lo = tensor(st, "scales.lo", Dtype::U8)?;
    if lo.len() != n_kept {
        return Err(format!("{} scales for {n_kept} kept blocks", lo.len()));
    }
    let mut hi = vec![0u8; n_kept];
    decode_stream(st, "scales.hi", 256, &mut hi)?;
    let mut scales = lo
        .iter()
        .zip(&hi)
        .map(|(&l, &h)| f16::from_le_bytes([l, h]));
    let mut code_counts = vec![0usize; QuantBits::ALL.len()];
    let mut mats = Vec::with_capacity(records.len());
    for ((name, w, rows, cols, block, len), kept) in records.into_iter().zip(bitmaps) {
        let n_kept: usize = kept.iter().map(|w| w.count_ones() as usize).sum();
        // At most the matrix's blocks (bits past the end are refused by `validate` below), so
        // the codes are within what the budget admitted.
        code_counts[w] += n_kept * block;
        let q = BlockQuant {
            bits: QuantBits::ALL[w],
            block,
            len,
            kept,
            scales: scales.by_ref().take(n_kept).collect(),
            data: Vec::new(),
        };
        mats.push((name, QMat { rows, cols, q }));
    }
    // A bitmap marking blocks past a matrix's end would claim codes no budget admitted.
    for (name, m) in &mats {
        let n_blocks = m.q.len.div_ceil(m.q.block);
        if (n_blocks..m.q.kept.len() * 64).any(|i| m.q.kept[i / 64] >> (i % 64) & 1 == 1) {
            return Err(format!("matrix {name}: bitmap marks blocks past the end"));
        }
    }
    // The streams of the different widths are independent: decode them side by side, then
    // hand each matrix its run of codes.
    let codes: Vec<Vec<u8>> = (QuantBits::ALL.par_iter().zip(&code_counts))
        .map(|(bits, &count)| {
            let mut symbols = vec![0u8; count];
            if count > 0 {
                let name = format!("ans.{}", bits.name());
                decode_stream(st, &name, 1 << bits.bits(), &mut symbols)?;
            }
            Ok(symbols)
        })
        .collect::<Result<_, String>>()?;
    let mut at = vec![0usize; codes.len()];
    let runs: Vec<&[u8]> = mats
        .iter()
        .map(|(_, m)| {
            let w = width_index(m.q.bits);
            let run = &codes[w][at[w]..at[w] + m.q.code_count()];
            at[w] += run.len();
            run
        })
        .collect();
    mats.par_iter_mut()
        .zip(runs)
        .try_for_each(|((name, m), run)| {
            m.q.set_codes(run);
            m.q.validate().map_err(|e| format!("matrix {name}: {e}"))
        })?;
    Ok(mats.into_iter().collect())
}

/// A parsed pack file: its matrices by tensor prefix, each taken once.
pub(super) struct Reader {
    /// The file's name in the pack.
    path: PathBuf,
    mats: HashMap<String, QMat>,
}

impl Reader {
    /// Parses the file `name` of a pack, its matrices admitted by `budget`.
    pub(super) fn new(
        name: &str,
        bytes: &[u8],
        budget: &mut Budget<'_>,
    ) -> Result<Self, PackError> {
        let fail = |message: String| PackError::Format {
            path: PathBuf::from(name),
            message,
        };
        let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| fail(e.to_string()))?;
        let meta = meta.metadata().clone().unwrap_or_default();
        let st = SafeTensors::deserialize(bytes).map_err(|e| fail(e.to_string()))?;
        let mats = match (meta.get(PLAIN_KEY), meta.get(CODED_KEY)) {
            (Some(headers), None) => read_plain(&st, headers, budget),
            (None, Some(coded)) => read_coded(&st, coded, budget),
            _ => Err("no s2lc metadata (not an S2LC pack file)".into()),
        }
        .map_err(fail)?;
        Ok(Reader {
            path: PathBuf::from(name),
            mats,
        })
    }

    pub(super) fn fail(&self, message: String) -> PackError {
        PackError::Format {
            path: self.path.clone(),
            message,
        }
    }

    pub(super) fn has(&self, prefix: &str) -> bool {
        self.mats.contains_key(prefix)
    }

    pub(super) fn get(&mut self, prefix: &str) -> Result<QMat, PackError> {
        self.mats
            .remove(prefix)
            .ok_or_else(|| self.fail(format!("matrix {prefix} is missing")))
    }

    /// A basis: its column groups at `prefix`, `prefix.1`, `prefix.2`, ….
    pub(super) fn get_basis(&mut self, prefix: &str, max_rank: usize) -> Result<QBasis, PackError> {
        let mut groups = vec![self.get(prefix)?];
        while self.has(&format!("{prefix}.{}", groups.len())) {
            groups.push(self.get(&format!("{prefix}.{}", groups.len()))?);
        }
        let basis = QBasis::from_groups(groups).map_err(|e| self.fail(format!("{prefix}: {e}")))?;
        if basis.cols > max_rank {
            return Err(self.fail(format!(
                "{prefix}: a basis of {} vectors, more than the {max_rank} accepted",
                basis.cols
            )));
        }
        Ok(basis)
    }
}
