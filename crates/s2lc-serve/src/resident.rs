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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{CacheError, JitCache};
    use s2lc_adapters::pack::pack;
    use s2lc_adapters::{Member, PackParams};
    use s2lc_model::lora::LoraDelta;
    use s2lc_spectral::rng::SplitMix64;

    /// A rank-4 adapter on layer 0's q_proj (64 × 64), random (a unit test, not a quality claim).
    fn adapter(seed: u64) -> LoraAdapter {
        let mut rng = SplitMix64::new(seed);
        let mut layers: Vec<[Option<LoraDelta>; 7]> = vec![Default::default()];
        layers[0][0] = Some(LoraDelta::new(
            rng.centered_vec(4 * 64),
            rng.centered_vec(64 * 4),
            4,
            64,
            64,
            1.0,
        ));
        LoraAdapter {
            path: format!("a{seed}").into(),
            rank: 4,
            alpha: 4.0,
            scale: 1.0,
            base_model: None,
            layers,
        }
    }

    /// A pack's bases and cores stay resident while a view of them exists (in the cache or in
    /// a batch row): a load that would need their bytes is refused instead, and once the last
    /// view is gone they are evicted like any entry.
    #[test]
    fn pack_parts_are_never_evicted_while_a_view_uses_them() {
        let set = pack(
            &[Member::from_lora("m0", &adapter(1))],
            PackParams::default(),
        )
        .unwrap();
        let (b, c) = (
            ResidentBases::new(&set).unwrap(),
            ResidentCores::new(&set).unwrap(),
        );
        let parts = b.bytes() + c.bytes();
        let cache: JitCache<Resident, String> = JitCache::with_busy(parts, Resident::busy);
        let bases = cache
            .get_or_load_part("bases", || {
                Ok((Resident::Bases(Arc::new(b)), parts - c.bytes()))
            })
            .unwrap();
        let cores = cache
            .get_or_load_part("cores", || {
                let c = ResidentCores::new(&set).map_err(|e| e.to_string())?;
                let n = c.bytes();
                Ok((Resident::Cores(Arc::new(c)), n))
            })
            .unwrap();
        let (Resident::Bases(bs), Resident::Cores(cs)) = (&*bases, &*cores) else {
            unreachable!()
        };
        let view = PackView::new("m0", bs.clone(), cs.clone(), &[("m0", 1.0)]).unwrap();
        drop((bases, cores));
        // A batch row holds the view (not the cache): the parts are still busy.
        let row: Arc<dyn AdapterDeltas> = Arc::new(Resident::View(view));
        let big = |cache: &JitCache<Resident, String>| {
            cache.get_or_load("peft", || Ok((Resident::Lora(adapter(2)), parts)))
        };
        let Err(CacheError::OverBudget { .. }) = big(&cache) else {
            panic!("a pack part in use was evicted");
        };
        assert!(cache.contains("bases") && cache.contains("cores"));
        drop(row);
        big(&cache).unwrap();
        assert!(!cache.contains("bases") && !cache.contains("cores"));
        assert_eq!(cache.stats().resident_bytes, parts);
    }
}
