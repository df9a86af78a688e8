//! The packed-artifact format: a directory other tools can read with any safetensors reader.
//!
//! ```text
//! pack.json                     format, parameters, target matrices, members and their files
//! basis.safetensors             per matrix: the shared bases U and V
//! members/NAME.safetensors      per matrix: the member's core factors (and orthogonal residual)
//! ```
//!
//! A block-quantized matrix `X` is three tensors: `X.data` (U8, the kept blocks' codes: int8 bytes,
//! or int4 / int3 / int2 bit fields packed little-endian), `X.scales` (F16, one per kept block) and `X.kept` (U8, the bitmap as little-endian
//! 64-bit words); its rows, columns, bits and block size are in the file's `__metadata__` under
//! `s2lc` as JSON. Tensor prefixes are `L{layer}.{target}.u|v|core_b|core_a|extra_b|extra_a`. The bases
//! file is shared by every member, so a content-addressed store keeps it once.
//!
//! A basis of mixed widths is several column groups side by side: the first at `…u`, the next at
//! `…u.1`, `…u.2`, …; such packs are [`FORMAT_MIXED`], since a reader of [`FORMAT`] would see only
//! the first group.
//!
//! Those plain files name three tensors per matrix, and with hundreds of small matrices their
//! header outweighs the codes (a rank-8 SmolLM2 adapter packed alone: 0.42 MB of headers for 0.29 MB
//! of codes). A coded pack ([`FORMAT_CODED`], [`PackParams::entropy`]) stores each file as a few
//! tensors instead, its metadata under `s2lc_coded` as `{"matrices": N}`. Each coded stream `X` is
//! two tensors: `X.freqs` (U16, `k × 2`: symbol and frequency of every symbol that occurs, the
//! frequencies summing to 2^14) and `X.stream` (U8, the rANS stream, [`s2lc_spectral::ans`]):
//! - `index`: N records of 18 bytes: layer (u16), target, part (`u v core_b core_a extra_b
//!   extra_a`), column group, bits (u8 each), rows, columns, block size (u32 each), little-endian;
//! - `kept`: each matrix's block bitmap in turn, `⌈blocks/8⌉` bytes, block `i` at bit `i mod 8` of
//!   byte `i/8`;
//! - `scales.hi`, with `scales.lo` (U8, not coded): the high and low bytes of every kept block's
//!   f16 scale, matrix by matrix;
//! - per width present, `ans.int3` etc.: the codes of every matrix of that width in index order,
//!   each value the two's-complement bit field of its code.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use half::f16;
use rayon::prelude::*;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use s2lc_model::lora::TARGETS;
use s2lc_model::source::write_file_atomic;
use s2lc_spectral::{AnsTable, BlockQuant, QuantBits};

use crate::artifact::{check_file_name, AdapterLimits, ArtifactFiles, DirFiles};
use crate::pack::{
    ModuleKey, PackError, PackParams, PackedCore, PackedMember, PackedModule, PackedSet, QMat,
};
use crate::qbasis::QBasis;

/// Format tag written to `pack.json`.
pub const FORMAT: &str = "s2lc-pack/1";

/// Format tag of a pack whose bases have column groups of several widths.
pub const FORMAT_MIXED: &str = "s2lc-pack/2";

/// Format tag of a pack whose codes are entropy-coded ([`PackParams::entropy`]).
pub const FORMAT_CODED: &str = "s2lc-pack/3";

/// Metadata key of a plain file: its matrices' shapes and codings as JSON.
const PLAIN_KEY: &str = "s2lc";
/// Metadata key of a coded file: `{"matrices": N}`.
const CODED_KEY: &str = "s2lc_coded";

/// Shape and coding of one quantized matrix, as kept in a plain file's metadata.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct QMatHeader {
    rows: usize,
    cols: usize,
    bits: QuantBits,
    block: usize,
}

/// The parts of a target matrix a file holds, numbered as in a coded file's index.
const PARTS: [&str; 6] = ["u", "v", "core_b", "core_a", "extra_b", "extra_a"];

/// Where a quantized matrix belongs: target matrix, part (index into [`PARTS`]) and column
/// group (of a mixed-width basis).
#[derive(Debug, Clone, Copy)]
struct Slot {
    key: ModuleKey,
    part: usize,
    group: usize,
}

impl Slot {
    /// The matrix's tensor prefix: `L{layer}.{target}.{part}`, then `.{group}` after the first.
    fn name(&self) -> String {
        let base = prefix(&self.key, PARTS[self.part]);
        match self.group {
            0 => base,
            g => format!("{base}.{g}"),
        }
    }
}

fn prefix(key: &ModuleKey, part: &str) -> String {
    format!("L{}.{}.{part}", key.layer, TARGETS[key.target])
}

/// Bytes of one record of a coded file's index.
const RECORD: usize = 18;

/// Largest block size a file may declare (a guard against a corrupt header's allocation).
const MAX_BLOCK: usize = 1 << 16;

/// One safetensors file being written: its matrices in order.
struct Writer<'a> {
    entropy: bool,
    mats: Vec<(Slot, &'a QMat)>,
}

/// A file's tensors (name, dtype, shape, bytes) and metadata, ready to serialize.
struct Sealed {
    tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
    meta: HashMap<String, String>,
}

impl<'a> Writer<'a> {
    /// A writer of a plain file (with `entropy`, of a coded one).
    fn new(entropy: bool) -> Self {
        Writer {
            entropy,
            mats: Vec::new(),
        }
    }

    fn put(&mut self, key: ModuleKey, part: usize, m: &'a QMat) {
        self.mats.push((
            Slot {
                key,
                part,
                group: 0,
            },
            m,
        ));
    }

    /// A basis: one matrix per column group.
    fn put_basis(&mut self, key: ModuleKey, part: usize, b: &'a QBasis) {
        for (group, m) in b.groups.iter().enumerate() {
            self.mats.push((Slot { key, part, group }, m));
        }
    }

    fn seal(self) -> Sealed {
        if self.entropy {
            self.seal_coded()
        } else {
            self.seal_plain()
        }
    }

    /// Three tensors per matrix (`X.data`, `X.scales`, `X.kept`) and the shapes as JSON.
    fn seal_plain(self) -> Sealed {
        let mut tensors = Vec::new();
        let mut headers = BTreeMap::new();
        for (slot, m) in &self.mats {
            let (name, q) = (slot.name(), &m.q);
            let scales: Vec<u8> = q.scales.iter().flat_map(|s| s.to_le_bytes()).collect();
            let kept: Vec<u8> = q.kept.iter().flat_map(|w| w.to_le_bytes()).collect();
            tensors.push((
                format!("{name}.data"),
                Dtype::U8,
                vec![q.data.len()],
                q.data.clone(),
            ));
            tensors.push((
                format!("{name}.scales"),
                Dtype::F16,
                vec![q.scales.len()],
                scales,
            ));
            tensors.push((format!("{name}.kept"), Dtype::U8, vec![kept.len()], kept));
            let header = QMatHeader {
                rows: m.rows,
                cols: m.cols,
                bits: q.bits,
                block: q.block,
            };
            headers.insert(name, header);
        }
        let headers = serde_json::to_string(&headers).expect("headers serialize");
        Sealed {
            tensors,
            meta: HashMap::from([(PLAIN_KEY.to_string(), headers)]),
        }
    }

    /// The coded layout (see the module docs): an rANS-coded index, every matrix's bitmap and
    /// scales concatenated, and per width one rANS stream of codes.
    fn seal_coded(self) -> Sealed {
        let mut index = Vec::with_capacity(self.mats.len() * RECORD);
        let (mut kept, mut scales) = (Vec::new(), Vec::new());
        let mut codes: Vec<Vec<u8>> = vec![Vec::new(); QuantBits::ALL.len()];
        for (slot, m) in &self.mats {
            let q = &m.q;
            let u32_of = |v: usize| u32::try_from(v).expect("matrix dimensions fit in u32");
            index.extend_from_slice(&(slot.key.layer as u16).to_le_bytes());
            index.extend([slot.key.target as u8, slot.part as u8, slot.group as u8]);
            index.push(q.bits.bits() as u8);
            for v in [m.rows, m.cols, q.block] {
                index.extend_from_slice(&u32_of(v).to_le_bytes());
            }
            let n_blocks = q.len.div_ceil(q.block);
            kept.extend((0..n_blocks.div_ceil(8)).map(|i| (q.kept[i / 8] >> (8 * (i % 8))) as u8));
            scales.extend(q.scales.iter().flat_map(|s| s.to_le_bytes()));
            codes[width_index(q.bits)].extend(q.codes());
        }
        let mut tensors = Vec::new();
        let mut push_coded = |name: &str, symbols: &[u8], alphabet: usize| {
            let table = AnsTable::fit(symbols, alphabet);
            // The table sparse: (symbol, frequency) for every symbol that occurs.
            let pairs: Vec<u8> = (0u16..)
                .zip(table.freqs())
                .filter(|(_, &f)| f > 0)
                .flat_map(|(s, &f)| [s.to_le_bytes(), f.to_le_bytes()].concat())
                .collect();
            tensors.push((
                format!("{name}.freqs"),
                Dtype::U16,
                vec![pairs.len() / 4, 2],
                pairs,
            ));
            let stream = table.encode(symbols);
            tensors.push((
                format!("{name}.stream"),
                Dtype::U8,
                vec![stream.len()],
                stream,
            ));
        };
        push_coded("index", &index, 256);
        push_coded("kept", &kept, 256);
        // An f16 scale's high byte (sign, exponent, top of the mantissa) repeats; its low byte
        // does not and is stored as it is.
        let (lo, hi): (Vec<u8>, Vec<u8>) = scales.chunks_exact(2).map(|b| (b[0], b[1])).unzip();
        push_coded("scales.hi", &hi, 256);
        for (bits, symbols) in QuantBits::ALL.iter().zip(&codes) {
            if !symbols.is_empty() {
                push_coded(&format!("ans.{}", bits.name()), symbols, 1 << bits.bits());
            }
        }
        tensors.push(("scales.lo".into(), Dtype::U8, vec![lo.len()], lo));
        let meta = json!({ "matrices": self.mats.len() }).to_string();
        Sealed {
            tensors,
            meta: HashMap::from([(CODED_KEY.to_string(), meta)]),
        }
    }
}

impl Sealed {
    /// The file's bytes.
    fn serialize(&self) -> Vec<u8> {
        let views = self.tensors.iter().map(|(n, d, s, b)| {
            let view = TensorView::new(*d, s.clone(), b).expect("shapes match their bytes");
            (n.as_str(), view)
        });
        safetensors::serialize(views, Some(self.meta.clone())).expect("a valid file")
    }
}

/// The bases file of `set`.
fn basis_file(set: &PackedSet) -> Sealed {
    let mut w = Writer::new(set.params.entropy);
    for (key, module) in &set.modules {
        w.put_basis(*key, 0, &module.u);
        w.put_basis(*key, 1, &module.v);
    }
    w.seal()
}

/// The file of member `m` of `set`.
fn member_file(set: &PackedSet, m: &PackedMember) -> Sealed {
    let mut w = Writer::new(set.params.entropy);
    for (key, core) in &m.cores {
        w.put(*key, 2, &core.core_b);
        w.put(*key, 3, &core.core_a);
        if let Some((b, a)) = &core.extra {
            w.put(*key, 4, b);
            w.put(*key, 5, a);
        }
    }
    w.seal()
}

/// Bytes of the bases file of `set`: the whole file, header included, as a store keeps it.
pub fn basis_bytes(set: &PackedSet) -> usize {
    basis_file(set).serialize().len()
}

/// Bytes of the file of member `m` of `set`, header included.
pub fn member_bytes(set: &PackedSet, m: &PackedMember) -> usize {
    member_file(set, m).serialize().len()
}

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
struct Budget<'a> {
    limits: &'a AdapterLimits,
    /// The pack's block size (`params.block`): every matrix's.
    block: usize,
    values_left: usize,
}

impl<'a> Budget<'a> {
    fn new(limits: &'a AdapterLimits, block: usize) -> Self {
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

/// The matrices of a coded file (see the module docs). Every count is checked before it is
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

/// Position of `bits` in [`QuantBits::ALL`]: the number of its code stream.
fn width_index(bits: QuantBits) -> usize {
    QuantBits::ALL
        .iter()
        .position(|&b| b == bits)
        .expect("every width is in the list")
}

/// A parsed pack file: its matrices by tensor prefix, each taken once.
struct Reader {
    /// The file's name in the pack.
    path: PathBuf,
    mats: HashMap<String, QMat>,
}

impl Reader {
    /// Parses the file `name` of a pack, its matrices admitted by `budget`.
    fn new(name: &str, bytes: &[u8], budget: &mut Budget<'_>) -> Result<Self, PackError> {
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

    fn fail(&self, message: String) -> PackError {
        PackError::Format {
            path: self.path.clone(),
            message,
        }
    }

    fn has(&self, prefix: &str) -> bool {
        self.mats.contains_key(prefix)
    }

    fn get(&mut self, prefix: &str) -> Result<QMat, PackError> {
        self.mats
            .remove(prefix)
            .ok_or_else(|| self.fail(format!("matrix {prefix} is missing")))
    }

    /// A basis: its column groups at `prefix`, `prefix.1`, `prefix.2`, ….
    fn get_basis(&mut self, prefix: &str, max_rank: usize) -> Result<QBasis, PackError> {
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

/// A member name usable as a file name.
fn check_name(name: &str) -> Result<(), PackError> {
    check_file_name(name).map_err(|e| PackError::Invalid(format!("member name: {e}")))
}

/// Writes `set` into `dir` (created if needed). Every file goes through a temporary name, and
/// `pack.json` is written last, so a reader never sees a pack whose files are incomplete.
pub fn save(set: &PackedSet, dir: &Path) -> Result<(), PackError> {
    for m in &set.members {
        check_name(&m.name)?;
    }
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| PackError::Io { path: p, source }
    };
    std::fs::create_dir_all(dir.join("members")).map_err(io(dir))?;
    let basis = basis_file(set).serialize();
    write_file_atomic(&dir.join("basis.safetensors"), &basis)?;
    let mut members = Vec::new();
    for m in &set.members {
        let file = format!("members/{}.safetensors", m.name);
        let bytes = member_file(set, m).serialize();
        write_file_atomic(&dir.join(&file), &bytes)?;
        members.push(json!({"name": m.name, "file": file, "bytes": bytes.len()}));
    }
    let mixed = set
        .modules
        .values()
        .any(|m| m.u.groups.len() > 1 || m.v.groups.len() > 1);
    let format = if set.params.entropy {
        FORMAT_CODED
    } else if mixed {
        FORMAT_MIXED
    } else {
        FORMAT
    };
    let manifest = json!({
        "format": format,
        "params": set.params,
        "modules": set.modules.keys().collect::<Vec<_>>(),
        "basis_file": "basis.safetensors",
        "basis_bytes": basis.len(),
        "members": members,
    });
    let text = serde_json::to_string_pretty(&manifest).map_err(|e| PackError::Format {
        path: dir.join("pack.json"),
        message: e.to_string(),
    })?;
    Ok(write_file_atomic(&dir.join("pack.json"), text.as_bytes())?)
}

/// Writes a pack holding only the member `name` (same bases, byte for byte: a content-addressed
/// store keeps them once however many members are pushed).
pub fn save_member(set: &PackedSet, name: &str, dir: &Path) -> Result<(), PackError> {
    let member = set.member(name)?.clone();
    let single = PackedSet {
        params: set.params,
        modules: set.modules.clone(),
        members: vec![member],
    };
    save(&single, dir)
}

/// Largest `pack.json` read (a pack of hundreds of members and matrices takes some 100 KB).
const MAX_MANIFEST_BYTES: u64 = 1 << 24;

/// Reads a pack written by [`save`]; every matrix is checked for consistency. Sizes are checked
/// against [`AdapterLimits::GENEROUS`] only: a pack from untrusted storage is read with
/// [`load_with`] and the limits of the model it is for.
pub fn load(dir: &Path) -> Result<PackedSet, PackError> {
    load_with(dir, &AdapterLimits::GENEROUS)
}

/// Reads the pack in `dir` as untrusted input (see [`crate::artifact`]): only the files the
/// format names (`basis_file` a plain file name, each member's file
/// `members/NAME.safetensors`), each a regular file of the size `pack.json` declares; every
/// matrix within `limits`. Errors name files relative to the pack, never `dir`.
pub fn load_with(dir: &Path, limits: &AdapterLimits) -> Result<PackedSet, PackError> {
    load_files(&DirFiles(dir), limits)
}

/// [`load_with`] over any source of the pack's files.
pub fn load_files(
    files: &dyn ArtifactFiles,
    limits: &AdapterLimits,
) -> Result<PackedSet, PackError> {
    let fail = |message: String| PackError::Format {
        path: PathBuf::from("pack.json"),
        message,
    };
    // A file of the pack: its declared size (if `pack.json` gives one) is the most read, and
    // must be its size.
    let read = |name: &str, declared: &Value| -> Result<Vec<u8>, PackError> {
        let fail = |message: String| PackError::Format {
            path: PathBuf::from(name),
            message,
        };
        let declared = match declared {
            Value::Null => None,
            v => Some(
                v.as_u64()
                    .ok_or_else(|| fail(format!("declared size {v}")))?,
            ),
        };
        let cap = declared.map_or(limits.max_file_bytes, |d| d.min(limits.max_file_bytes));
        let bytes = files.read(name, cap).map_err(|e| fail(e.to_string()))?;
        match declared {
            Some(d) if d != bytes.len() as u64 => Err(fail(format!(
                "{} bytes, but pack.json declares {d}",
                bytes.len()
            ))),
            _ => Ok(bytes),
        }
    };
    let text = files
        .read("pack.json", MAX_MANIFEST_BYTES)
        .map_err(|e| fail(e.to_string()))?;
    let manifest: Value = serde_json::from_slice(&text).map_err(|e| fail(e.to_string()))?;
    drop(text);
    if ![FORMAT, FORMAT_MIXED, FORMAT_CODED]
        .iter()
        .any(|f| manifest["format"] == *f)
    {
        return Err(fail(format!(
            "format {} is not {FORMAT}, {FORMAT_MIXED} or {FORMAT_CODED}",
            manifest["format"]
        )));
    }
    let params: PackParams =
        serde_json::from_value(manifest["params"].clone()).map_err(|e| fail(e.to_string()))?;
    params
        .validate()
        .map_err(|e| fail(format!("params: {e}")))?;
    if params.block > MAX_BLOCK {
        return Err(fail(format!(
            "block size {} (at most {MAX_BLOCK})",
            params.block
        )));
    }
    let keys: Vec<ModuleKey> =
        serde_json::from_value(manifest["modules"].clone()).map_err(|e| fail(e.to_string()))?;
    let mut seen = HashSet::new();
    for key in &keys {
        if key.target >= TARGETS.len() || key.layer >= limits.max_layers {
            return Err(fail(format!(
                "module of layer {} target {} (at most {} layers, {} targets)",
                key.layer,
                key.target,
                limits.max_layers,
                TARGETS.len()
            )));
        }
        if !seen.insert(*key) {
            return Err(fail(format!("module {} listed twice", key.name())));
        }
    }
    let basis_name = manifest["basis_file"]
        .as_str()
        .ok_or_else(|| fail("no basis_file".into()))?;
    check_file_name(basis_name).map_err(|e| fail(format!("basis_file: {e}")))?;
    let members_list = manifest["members"]
        .as_array()
        .ok_or_else(|| fail("no members list".into()))?;
    // Every name is checked before any file is read.
    let mut member_files = Vec::with_capacity(members_list.len());
    let mut names = HashSet::new();
    for m in members_list {
        let name = m["name"]
            .as_str()
            .ok_or_else(|| fail("a member has no name".into()))?;
        check_name(name)?;
        if !names.insert(name) {
            return Err(fail(format!("member {name} listed twice")));
        }
        // The file is where `save` puts it, or nowhere: the name is never used as a path.
        let file = format!("members/{name}.safetensors");
        if m["file"].as_str() != Some(file.as_str()) {
            return Err(fail(format!(
                "member {name}: file {} is not {file}",
                m["file"]
            )));
        }
        member_files.push((name, file, &m["bytes"]));
    }
    let mut budget = Budget::new(limits, params.block);
    let basis_bytes = read(basis_name, &manifest["basis_bytes"])?;
    let mut basis = Reader::new(basis_name, &basis_bytes, &mut budget)?;
    drop(basis_bytes);
    let mut modules = BTreeMap::new();
    for key in &keys {
        let module = PackedModule {
            u: basis.get_basis(&prefix(key, "u"), limits.max_rank)?,
            v: basis.get_basis(&prefix(key, "v"), limits.max_rank)?,
        };
        modules.insert(*key, module);
    }
    let mut members = Vec::new();
    for (name, file, declared) in member_files {
        let bytes = read(&file, declared)?;
        let mut r = Reader::new(&file, &bytes, &mut budget)?;
        drop(bytes);
        let mut cores = BTreeMap::new();
        for key in &keys {
            let core_prefix = prefix(key, "core_b");
            if !r.has(&core_prefix) {
                continue;
            }
            let module = &modules[key];
            let (core_b, core_a) = (r.get(&core_prefix)?, r.get(&prefix(key, "core_a"))?);
            if core_b.rows != module.u.cols
                || core_a.cols != module.v.cols
                || core_b.cols != core_a.rows
            {
                return Err(r.fail(format!(
                    "{core_prefix}: core factors {}×{} and {}×{} do not fit bases of {} and {} vectors",
                    core_b.rows, core_b.cols, core_a.rows, core_a.cols, module.u.cols, module.v.cols
                )));
            }
            let extra = if r.has(&prefix(key, "extra_b")) {
                let (b, a) = (
                    r.get(&prefix(key, "extra_b"))?,
                    r.get(&prefix(key, "extra_a"))?,
                );
                if b.rows != module.u.rows || a.cols != module.v.rows || b.cols != a.rows {
                    return Err(r.fail(format!("{core_prefix}: residual factors do not fit")));
                }
                Some((b, a))
            } else {
                None
            };
            cores.insert(
                *key,
                PackedCore {
                    core_b,
                    core_a,
                    extra,
                },
            );
        }
        members.push(PackedMember {
            name: name.to_string(),
            cores,
        });
    }
    Ok(PackedSet {
        params,
        modules,
        members,
    })
}
