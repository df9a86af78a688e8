//! What the adapter cache holds: each adapter in the form it is stored. A PEFT adapter is its
//! factors (f16 by default, [`s2lc_model::lora::AdapterDtype`]); a pack is its shared bases and
//! its members' cores, each resident once, and every member or blend (morph) the server runs is
//! a [`PackView`]: a weight vector over them.

use std::any::Any;
use std::sync::Arc;

use s2lc_adapters::pack::{PackView, ResidentBases, ResidentCores};
use s2lc_model::kernels::dot::QuantizedActs;
use s2lc_model::lora::{AdapterDeltas, DeltaScratch, LoraAdapter};

/// One entry of the adapter cache.
#[derive(Debug)]
pub enum Resident {
    /// A PEFT adapter's factors.
    Lora(LoraAdapter),
    /// A pack's shared bases (shared by every view of the pack).
    Bases(Arc<ResidentBases>),
    /// The cores of every member of a pack version (shared by every view of the pack).
    Cores(Arc<ResidentCores>),
    /// A member or blend of a resident pack.
    View(PackView),
}

impl Resident {
    /// Whether other entries or batch rows hold this entry's memory (a pack's bases or cores
    /// while any view of the pack exists): evicting it would free nothing and is not allowed.
    pub fn busy(&self) -> bool {
        match self {
            Resident::Bases(b) => Arc::strong_count(b) > 1,
            Resident::Cores(c) => Arc::strong_count(c) > 1,
            Resident::Lora(_) | Resident::View(_) => false,
        }
    }

    /// The `kind` label of `/metrics`: `peft`, `bases`, `cores` or `views`.
    pub fn kind(&self) -> &'static str {
        match self {
            Resident::Lora(_) => "peft",
            Resident::Bases(_) => "bases",
            Resident::Cores(_) => "cores",
            Resident::View(_) => "views",
        }
    }

    /// The deltas a request runs with, for the entries that are adapters.
    fn deltas(&self) -> Option<&dyn AdapterDeltas> {
        match self {
            Resident::Lora(a) => Some(a),
            Resident::View(v) => Some(v),
            Resident::Bases(_) | Resident::Cores(_) => None,
        }
    }
}

/// An entry runs as the adapter it holds; parts of packs (bases, cores) adapt nothing.
impl AdapterDeltas for Resident {
    fn label(&self) -> String {
        self.deltas()
            .map_or_else(|| self.kind().to_string(), |d| d.label())
    }

    fn n_layers(&self) -> usize {
        self.deltas().map_or(0, |d| d.n_layers())
    }

    fn shape(&self, layer: usize, target: usize) -> Option<(usize, usize)> {
        self.deltas()?.shape(layer, target)
    }

    fn apply(
        &self,
        layer: usize,
        target: usize,
        x: &[f32],
        n: usize,
        out: &mut [f32],
        scratch: &mut DeltaScratch,
        acts: &mut QuantizedActs,
    ) {
        if let Some(d) = self.deltas() {
            d.apply(layer, target, x, n, out, scratch, acts);
        }
    }

    fn shared_state(&self) -> Option<usize> {
        self.deltas()?.shared_state()
    }

    fn apply_rows(
        &self,
        rows: &[&dyn AdapterDeltas],
        layer: usize,
        target: usize,
        x: &[f32],
        out: &mut [f32],
        scratch: &mut DeltaScratch,
        acts: &mut QuantizedActs,
    ) {
        if let Some(d) = self.deltas() {
            d.apply_rows(rows, layer, target, x, out, scratch, acts);
        }
    }

    /// The adapter it holds (so a view running rows together sees the other rows' views).
    fn as_any(&self) -> &dyn Any {
        match self {
            Resident::Lora(a) => a,
            Resident::View(v) => v,
            Resident::Bases(_) | Resident::Cores(_) => self,
        }
    }
}
