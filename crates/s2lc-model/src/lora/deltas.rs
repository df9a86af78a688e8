//! What the forward pass asks of a sequence's own adapter, whatever form it is resident in: a
//! PEFT adapter's factors ([`LoraAdapter`]), or a pack member or blend of members running
//! straight from a pack's shared bases (`s2lc_adapters::pack::PackView`). The base weights stay
//! shared by every sequence; each adds its delta `Δ·x` to the outputs of the linear layers it
//! adapts, unmerged.

use std::any::Any;

use crate::kernels::dot::QuantizedActs;

use super::LoraAdapter;

/// Buffers an adapter reuses across calls (sized on first use).
#[derive(Debug, Default)]
pub struct DeltaScratch {
    /// General f32 scratch (`A·x`, and a pack's projections).
    pub mid: Vec<f32>,
    /// A second f32 scratch.
    pub mid2: Vec<f32>,
    /// One decoded weight row ([`crate::kernels::WeightMatrix::axpy_rows`]).
    pub row: Vec<f32>,
}

/// Per-sequence deltas on the linear layers (`target` indexes [`super::TARGETS`]).
pub trait AdapterDeltas: Send + Sync {
    /// What errors call it (its path or store key).
    fn label(&self) -> String;

    /// Layers it may adapt (`0..n_layers`).
    fn n_layers(&self) -> usize;

    /// `(out, in)` of its delta on `target` of `layer`, or `None` where it has none.
    fn shape(&self, layer: usize, target: usize) -> Option<(usize, usize)>;

    /// `out (n × out_dim) += Δ·x` for `x` (`n × in_dim`) on `target` of `layer`; nothing where
    /// it has no delta.
    #[allow(clippy::too_many_arguments)]
    fn apply(
        &self,
        layer: usize,
        target: usize,
        x: &[f32],
        n: usize,
        out: &mut [f32],
        scratch: &mut DeltaScratch,
        acts: &mut QuantizedActs,
    );

    /// An id shared by adapters that run over the same resident state (the bases of one pack),
    /// so that rows using any of them can run as one group ([`AdapterDeltas::apply_rows`]).
    /// `None`: rows group only with rows of the very same adapter.
    fn shared_state(&self) -> Option<usize> {
        None
    }

    /// `out_i += Δᵢ·x_i` for rows `i` that each have their own adapter `rows[i]`, all with
    /// `self`'s [`AdapterDeltas::shared_state`] (`self` is `rows[0]`). By default one call per
    /// run of rows with the same adapter.
    #[allow(clippy::too_many_arguments)]
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
        let n = rows.len();
        if n == 0 {
            return;
        }
        let (xw, ow) = (x.len() / n, out.len() / n);
        let mut start = 0;
        while start < n {
            let a = rows[start];
            let end = start
                + rows[start..]
                    .iter()
                    .take_while(|r| same_adapter(**r, a))
                    .count();
            a.apply(
                layer,
                target,
                &x[start * xw..end * xw],
                end - start,
                &mut out[start * ow..end * ow],
                scratch,
                acts,
            );
            start = end;
        }
    }

    /// Itself, for implementations of [`AdapterDeltas::apply_rows`] that need the concrete type
    /// of the other rows' adapters.
    fn as_any(&self) -> &dyn Any;
}

/// Whether two adapter references are the same object.
pub fn same_adapter(a: &dyn AdapterDeltas, b: &dyn AdapterDeltas) -> bool {
    std::ptr::addr_eq(a as *const dyn AdapterDeltas, b as *const dyn AdapterDeltas)
}

impl AdapterDeltas for LoraAdapter {
    fn label(&self) -> String {
        self.path.display().to_string()
    }

    fn n_layers(&self) -> usize {
        self.layers.len()
    }

    fn shape(&self, layer: usize, target: usize) -> Option<(usize, usize)> {
        let d = self.layers.get(layer)?.get(target)?.as_ref()?;
        Some((d.out_dim(), d.in_dim()))
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
        if let Some(d) = self.layers.get(layer).and_then(|l| l[target].as_ref()) {
            d.apply(x, n, out, scratch, acts);
        }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
