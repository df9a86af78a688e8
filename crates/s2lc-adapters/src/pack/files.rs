//! The safetensors files a pack is stored as (their layout is described in [`crate::format`]):
//! which matrices each file holds, their tensor names, and their encoding, plain or entropy-coded.
//! A pack's sizes ([`PackedSet::bytes`]) are these files' sizes; [`crate::format`] writes them and
//! reads them back.

use std::collections::{BTreeMap, HashMap};

use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde::{Deserialize, Serialize};
use serde_json::json;

use s2lc_model::lora::TARGETS;
use s2lc_spectral::{AnsTable, QuantBits};

use crate::qbasis::QBasis;
use crate::qmat::QMat;

use super::member::ModuleKey;
use super::set::{PackedMember, PackedSet};

/// Metadata key of a plain file: its matrices' shapes and codings as JSON.
pub(crate) const PLAIN_KEY: &str = "s2lc";
/// Metadata key of a coded file: `{"matrices": N}`.
pub(crate) const CODED_KEY: &str = "s2lc_coded";

/// Shape and coding of one quantized matrix, as kept in a plain file's metadata.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct QMatHeader {
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) bits: QuantBits,
    pub(crate) block: usize,
}

/// The parts of a target matrix a file holds, numbered as in a coded file's index.
pub(crate) const PARTS: [&str; 6] = ["u", "v", "core_b", "core_a", "extra_b", "extra_a"];

/// Where a quantized matrix belongs: target matrix, part (index into [`PARTS`]) and column
/// group (of a mixed-width basis).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Slot {
    pub(crate) key: ModuleKey,
    pub(crate) part: usize,
    pub(crate) group: usize,
}

impl Slot {
    /// The matrix's tensor prefix: `L{layer}.{target}.{part}`, then `.{group}` after the first.
    pub(crate) fn name(&self) -> String {
        let base = prefix(&self.key, PARTS[self.part]);
        match self.group {
            0 => base,
            g => format!("{base}.{g}"),
        }
    }
}

/// The tensor prefix of `part` of `key`'s matrix: `L{layer}.{target}.{part}`.
pub(crate) fn prefix(key: &ModuleKey, part: &str) -> String {
    format!("L{}.{}.{part}", key.layer, TARGETS[key.target])
}

/// Bytes of one record of a coded file's index.
pub(crate) const RECORD: usize = 18;

/// One safetensors file being written: its matrices in order.
struct Writer<'a> {
    entropy: bool,
    mats: Vec<(Slot, &'a QMat)>,
}

/// A file's tensors (name, dtype, shape, bytes) and metadata, ready to serialize.
pub(crate) struct Sealed {
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

    /// The coded layout (see [`crate::format`]): an rANS-coded index, every matrix's bitmap and
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
    pub(crate) fn serialize(&self) -> Vec<u8> {
        let views = self.tensors.iter().map(|(n, d, s, b)| {
            let view = TensorView::new(*d, s.clone(), b).expect("shapes match their bytes");
            (n.as_str(), view)
        });
        safetensors::serialize(views, Some(self.meta.clone())).expect("a valid file")
    }
}

/// The bases file of `set`.
pub(crate) fn basis_file(set: &PackedSet) -> Sealed {
    let mut w = Writer::new(set.params.entropy);
    for (key, module) in &set.modules {
        w.put_basis(*key, 0, &module.u);
        w.put_basis(*key, 1, &module.v);
    }
    w.seal()
}

/// The file of member `m` of `set`.
pub(crate) fn member_file(set: &PackedSet, m: &PackedMember) -> Sealed {
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

/// Position of `bits` in [`QuantBits::ALL`]: the number of its code stream.
pub(crate) fn width_index(bits: QuantBits) -> usize {
    QuantBits::ALL
        .iter()
        .position(|&b| b == bits)
        .expect("every width is in the list")
}

impl PackedSet {
    /// Bytes the shared bases' file stores (entropy-coded when [`PackParams::entropy`]).
    ///
    /// [`PackParams::entropy`]: super::PackParams::entropy
    pub fn basis_bytes(&self) -> usize {
        basis_file(self).serialize().len()
    }

    /// Bytes the file of `member` stores: its cores and residuals (entropy-coded when
    /// [`PackParams::entropy`]).
    ///
    /// [`PackParams::entropy`]: super::PackParams::entropy
    pub fn member_bytes(&self, member: &PackedMember) -> usize {
        member_file(self, member).serialize().len()
    }

    /// Bytes of everything: bases and every member.
    pub fn bytes(&self) -> usize {
        self.basis_bytes()
            + self
                .members
                .iter()
                .map(|m| self.member_bytes(m))
                .sum::<usize>()
    }
}
