//! Wall time per part of a forward pass, charged by a stopwatch that is a no-op when not
//! profiling.

/// The parts of a forward pass a [`Profile`] times separately (the discriminant is the index into
/// [`Profile::secs`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Fused q/k/v projections.
    Qkv,
    /// Attention over the KV cache (including the cache append).
    Attention,
    /// Attention output projection.
    Output,
    /// Fused gate/up projections.
    GateUp,
    /// Down projection.
    Down,
    /// Output head (logits).
    Head,
    /// Norms, RoPE, SwiGLU and the rest.
    Other,
}

impl Part {
    /// Every part, in [`Profile::secs`] order.
    pub const ALL: [Part; 7] = [
        Part::Qkv,
        Part::Attention,
        Part::Output,
        Part::GateUp,
        Part::Down,
        Part::Head,
        Part::Other,
    ];

    /// Short label.
    pub fn name(self) -> &'static str {
        match self {
            Part::Qkv => "q/k/v",
            Part::Attention => "attention",
            Part::Output => "o_proj",
            Part::GateUp => "gate/up",
            Part::Down => "down",
            Part::Head => "head",
            Part::Other => "norms/rope/act",
        }
    }
}

/// Accumulated wall time per [`Part`] (seconds, in [`Part::ALL`] order).
#[derive(Debug, Default, Clone)]
pub struct Profile {
    /// Seconds per part.
    pub secs: [f64; 7],
}

/// A stopwatch that charges the time since its last mark to a part (no-op when not profiling).
pub(super) struct Lap<'a> {
    profile: Option<&'a mut Profile>,
    at: std::time::Instant,
}

impl<'a> Lap<'a> {
    pub(super) fn start(profile: &'a mut Option<Profile>) -> Self {
        Lap {
            profile: profile.as_mut(),
            at: std::time::Instant::now(),
        }
    }

    pub(super) fn mark(&mut self, part: Part) {
        if let Some(p) = self.profile.as_deref_mut() {
            let now = std::time::Instant::now();
            p.secs[part as usize] += (now - self.at).as_secs_f64();
            self.at = now;
        }
    }
}
