//! The Context Router's rules. Tag rules: a request's tags (`domain=python`) pick the adapter of
//! the first rule whose conditions they all meet. Semantic rule: each adapter has a centroid, the
//! normalized mean embedding of pieces of its training text; a prompt goes to the adapter whose
//! centroid is most similar (cosine) to the prompt's embedding. Explicit names are handled by
//! the API.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use s2lc_model::encoder::SentenceEncoder;
use s2lc_model::ModelError;

/// One routable adapter.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Route {
    /// The adapter, `name@requirement`.
    pub adapter: String,
    /// Unit-norm centroid of its training text's embeddings.
    pub centroid: Vec<f32>,
    /// Pieces of text the centroid was built from.
    pub pieces: usize,
}

/// Centroids by adapter (the file `s2lc router build` writes).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RouteTable {
    /// The encoder the centroids were built with (a directory name, for the record).
    pub encoder: String,
    /// The routes.
    pub routes: Vec<Route>,
}

/// A routing decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Index into the table's routes.
    pub index: usize,
    /// Cosine similarity to the chosen centroid.
    pub score: f32,
    /// Its lead over the second best (0 with one route).
    pub margin: f32,
}

/// The encoder with its table: routes prompts.
#[derive(Debug)]
pub struct SemanticRouter {
    /// The sentence encoder.
    pub encoder: SentenceEncoder,
    /// The centroids.
    pub table: RouteTable,
}

impl SemanticRouter {
    /// The adapter for `text` and the decision behind it.
    pub fn route(&self, text: &str) -> Result<(&str, Decision), RouterError> {
        let d = self.table.decide(&self.encoder.embed(text)?);
        Ok((self.table.routes[d.index].adapter.as_str(), d))
    }

    /// Morph weights for `text` over the routes' adapters (each named without its version
    /// requirement, as a pack member): `exp((s_i − s_max)/τ)` of the cosine scores `s_i`,
    /// normalized, rounded to tenths (so similar prompts share one cached blend) and without the
    /// zeros. Returns the weights and every route's score.
    pub fn morph(
        &self,
        text: &str,
        temperature: f32,
    ) -> Result<(MemberWeights, MemberWeights), RouterError> {
        let embedding = self.encoder.embed(text)?;
        let scores: Vec<(String, f32)> = self
            .table
            .routes
            .iter()
            .map(|r| {
                let name = r.adapter.split('@').next().unwrap_or(&r.adapter);
                let score = r.centroid.iter().zip(&embedding).map(|(a, b)| a * b).sum();
                (name.to_string(), score)
            })
            .collect();
        Ok((morph_from_scores(&scores, temperature), scores))
    }
}

/// A value per pack member (or route), by name.
pub type MemberWeights = Vec<(String, f32)>;

/// The blend [`SemanticRouter::morph`] makes of route scores (sorted by name).
pub fn morph_from_scores(scores: &[(String, f32)], temperature: f32) -> MemberWeights {
    let max = scores.iter().map(|s| s.1).fold(f32::NEG_INFINITY, f32::max);
    let t = temperature.max(1e-6);
    let raw: Vec<f32> = scores.iter().map(|s| ((s.1 - max) / t).exp()).collect();
    let total: f32 = raw.iter().sum();
    let mut weights: Vec<(String, f32)> = scores
        .iter()
        .zip(&raw)
        .map(|(s, w)| (s.0.clone(), (10.0 * w / total).round() / 10.0))
        .filter(|(_, w)| *w > 0.0)
        .collect();
    weights.sort_by(|a, b| a.0.cmp(&b.0));
    weights
}

/// Why routing failed.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// Encoding failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The table is unusable.
    #[error("{0}")]
    Invalid(String),
}

/// A tag rule: requests whose tags include every `key = value` of `when` go to `adapter`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TagRule {
    /// The conditions, all of which must hold.
    pub when: BTreeMap<String, String>,
    /// The adapter, `name@requirement`.
    pub adapter: String,
}

impl TagRule {
    /// Parses `key=value[,key=value…]:adapter` (the `--rule` flag), e.g.
    /// `domain=python:python-r8@^1`.
    pub fn parse(s: &str) -> Result<Self, RouterError> {
        let bad = |why: &str| {
            RouterError::Invalid(format!(
                "rule '{s}': {why} (expected key=value[,key=value...]:adapter)"
            ))
        };
        let (when, adapter) = s.split_once(':').ok_or_else(|| bad("no ':'"))?;
        let adapter = adapter.trim();
        if adapter.is_empty() {
            return Err(bad("no adapter"));
        }
        let rule = TagRule {
            when: parse_tags(when).map_err(|e| bad(&e))?,
            adapter: adapter.to_string(),
        };
        Ok(rule)
    }

    /// Whether `tags` meet every condition.
    pub fn matches(&self, tags: &BTreeMap<String, String>) -> bool {
        self.when.iter().all(|(k, v)| tags.get(k) == Some(v))
    }
}

/// Parses `key=value[,key=value…]` into tags; keys and values are trimmed and must be
/// non-empty, and a key may appear once.
pub fn parse_tags(s: &str) -> Result<BTreeMap<String, String>, String> {
    let mut tags = BTreeMap::new();
    for pair in s.split(',') {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| format!("'{}' is not key=value", pair.trim()))?;
        let (k, v) = (k.trim(), v.trim());
        if k.is_empty() || v.is_empty() {
            return Err(format!("'{}' has an empty key or value", pair.trim()));
        }
        if tags.insert(k.to_string(), v.to_string()).is_some() {
            return Err(format!("'{k}' is given twice"));
        }
    }
    Ok(tags)
}

/// The first rule (and its index) that `tags` meet.
pub fn first_match<'a>(
    rules: &'a [TagRule],
    tags: &BTreeMap<String, String>,
) -> Option<(usize, &'a TagRule)> {
    rules.iter().enumerate().find(|(_, r)| r.matches(tags))
}

/// Pieces of about `chars` characters (cut at whitespace), `count` of them spread evenly over
/// `text` (all of them if there are fewer).
pub fn pieces(text: &str, chars: usize, count: usize) -> Vec<&str> {
    let mut all = Vec::new();
    let mut start = 0;
    while start < text.len() {
        let mut end = (start + chars).min(text.len());
        while !text.is_char_boundary(end) {
            end += 1;
        }
        // Cut at the last whitespace inside the window, so words stay whole.
        if end < text.len() {
            if let Some(ws) = text[start..end].rfind(char::is_whitespace) {
                if ws > chars / 2 {
                    end = start + ws;
                }
            }
        }
        let piece = text[start..end].trim();
        if piece.len() > chars / 4 {
            all.push(piece);
        }
        start = end;
    }
    if all.len() <= count || count == 0 {
        return all;
    }
    (0..count).map(|i| all[i * all.len() / count]).collect()
}

impl RouteTable {
    /// Builds the centroids: for each `(adapter, text)`, `count` pieces of `chars` characters
    /// embedded and averaged.
    pub fn build(
        encoder: &SentenceEncoder,
        encoder_name: &str,
        adapters: &[(String, &str)],
        chars: usize,
        count: usize,
    ) -> Result<Self, RouterError> {
        let mut routes = Vec::new();
        for (adapter, text) in adapters {
            let ps = pieces(text, chars, count);
            if ps.is_empty() {
                return Err(RouterError::Invalid(format!(
                    "the text for {adapter} is empty"
                )));
            }
            let embs = encoder.embed_all(&ps)?;
            let mut c = vec![0.0f32; encoder.dim()];
            for e in &embs {
                for (a, b) in c.iter_mut().zip(e) {
                    *a += b;
                }
            }
            let norm = c.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
            c.iter_mut().for_each(|v| *v /= norm);
            routes.push(Route {
                adapter: adapter.clone(),
                centroid: c,
                pieces: ps.len(),
            });
        }
        Ok(RouteTable {
            encoder: encoder_name.to_string(),
            routes,
        })
    }

    /// Reads a table written by [`RouteTable::save`], checking it is usable with `dim`-wide
    /// embeddings.
    pub fn load(path: &Path, dim: usize) -> Result<Self, RouterError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| RouterError::Invalid(format!("{}: {e}", path.display())))?;
        let t: RouteTable = serde_json::from_str(&text)
            .map_err(|e| RouterError::Invalid(format!("{}: {e}", path.display())))?;
        if t.routes.is_empty() {
            return Err(RouterError::Invalid(format!(
                "{}: no routes",
                path.display()
            )));
        }
        if let Some(r) = t.routes.iter().find(|r| r.centroid.len() != dim) {
            return Err(RouterError::Invalid(format!(
                "{}: the centroid of {} has {} values but the encoder gives {dim}",
                path.display(),
                r.adapter,
                r.centroid.len()
            )));
        }
        Ok(t)
    }

    /// Writes the table as JSON.
    pub fn save(&self, path: &Path) -> Result<(), RouterError> {
        let json = serde_json::to_string(self).map_err(|e| RouterError::Invalid(e.to_string()))?;
        s2lc_model::atomic::write_file_atomic(path, json.as_bytes())?;
        Ok(())
    }

    /// The route of an embedding.
    pub fn decide(&self, embedding: &[f32]) -> Decision {
        let mut scores: Vec<(f32, usize)> = self
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| {
                (
                    r.centroid.iter().zip(embedding).map(|(a, b)| a * b).sum(),
                    i,
                )
            })
            .collect();
        scores.sort_by(|a, b| b.0.total_cmp(&a.0));
        Decision {
            index: scores[0].1,
            score: scores[0].0,
            margin: scores.get(1).map_or(0.0, |s| scores[0].0 - s.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn router_morphs_weigh_the_nearer_routes_in_tenths() {
        let scores = |v: &[(&str, f32)]| -> Vec<(String, f32)> {
            v.iter().map(|(n, s)| (n.to_string(), *s)).collect()
        };
        // A clear winner takes everything; a near tie splits; far routes vanish.
        let w = morph_from_scores(&scores(&[("python", 0.6), ("linux", 0.3)]), 0.05);
        assert_eq!(w, vec![("python".to_string(), 1.0)]);
        let w = morph_from_scores(
            &scores(&[("python", 0.50), ("linux", 0.48), ("milton", 0.1)]),
            0.05,
        );
        assert_eq!(
            w,
            vec![("linux".to_string(), 0.4), ("python".to_string(), 0.6)]
        );
        let sum: f32 = w.iter().map(|x| x.1).sum();
        assert!((sum - 1.0).abs() < 1e-6);
    }

    #[test]
    fn pieces_are_whole_words_and_spread() {
        let text = "alpha beta gamma delta ".repeat(100);
        let ps = pieces(&text, 50, 5);
        assert_eq!(ps.len(), 5);
        for p in &ps {
            assert!(p.len() <= 50 && !p.ends_with(' '));
            assert!(p
                .split(' ')
                .all(|w| ["alpha", "beta", "gamma", "delta"].contains(&w)));
        }
        assert!(pieces("", 50, 5).is_empty());
        // Multi-byte text cuts on character boundaries.
        assert!(!pieces(&"é ".repeat(500), 33, 3).is_empty());
    }

    #[test]
    fn tag_rules_parse_and_match_in_order() {
        let rules = [
            TagRule::parse("domain=python, tier=gold : python-gold@^2").unwrap(),
            TagRule::parse("domain=python:python-r8@^1").unwrap(),
        ];
        assert_eq!(rules[0].adapter, "python-gold@^2");
        assert_eq!(rules[0].when.len(), 2);
        let tags = |s: &str| parse_tags(s).unwrap();
        assert_eq!(first_match(&rules, &tags("domain=python")).unwrap().0, 1);
        assert_eq!(
            first_match(&rules, &tags("tier=gold,domain=python"))
                .unwrap()
                .0,
            0
        );
        assert!(first_match(&rules, &tags("domain=linux")).is_none());
        for bad in [
            "domain=python",
            "domain=python:",
            "domain:python-r8",
            "=python:a",
            "a=1,a=2:x",
        ] {
            let e = TagRule::parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
        assert!(parse_tags("domain").is_err());
    }

    #[test]
    fn decide_picks_the_nearest_centroid() {
        let t = RouteTable {
            encoder: "test".into(),
            routes: vec![
                Route {
                    adapter: "a@1".into(),
                    centroid: vec![1.0, 0.0],
                    pieces: 1,
                },
                Route {
                    adapter: "b@1".into(),
                    centroid: vec![0.0, 1.0],
                    pieces: 1,
                },
            ],
        };
        let d = t.decide(&[0.6, 0.8]);
        assert_eq!(d.index, 1);
        assert!((d.score - 0.8).abs() < 1e-6 && (d.margin - 0.2).abs() < 1e-6);
    }
}
