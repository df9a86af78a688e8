//! From a validated request to a job: the prompt's tokens, the adapter it names (by model name,
//! adapter field, tag rules or the semantic router), the morph weights, and the adapter itself
//! from the cache.

use std::sync::Arc;
use std::time::Instant;

use axum::http::StatusCode;
use serde_json::{json, Value};

use s2lc_adapters::pack::{PackView, PackedSet, ResidentBases, ResidentCores};
use s2lc_model::model::{chatml, uses_chatml};

use super::error::ApiError;
use super::request::{CompletionRequest, Message, Params};
use super::AppState;
use crate::cache::CacheError;
use crate::resident::Resident;
use crate::router::{first_match, parse_tags, SemanticRouter};
use crate::source::{Loaded, SourceError};

/// Temperature of router-chosen morph weights (`"morph": "auto"`), in cosine-score units: a
/// route 0.05 behind the best gets e⁻¹ of its weight.
const MORPH_TEMPERATURE: f32 = 0.05;

/// Morph weights are rounded to `1/MORPH_RESOLUTION` (and members whose weight rounds to 0
/// dropped), so nearby blends share one cache entry and the cache key says exactly what is
/// computed.
pub const MORPH_RESOLUTION: f64 = 100.0;

/// A request after its prompt and adapter choice, before its adapter is loaded.
pub struct Planned {
    /// Whether it came through `/v1/chat/completions`.
    pub chat: bool,
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Generation settings.
    pub params: Params,
    /// The adapter spec (`name@requirement`), if any.
    pub spec: Option<String>,
    /// Morph weights over the pack the spec names (empty: no morph).
    pub morph: Vec<(String, f32)>,
    /// How the router chose the adapter, if it did.
    pub route: Option<Value>,
    /// The member weights as shown in answers.
    pub morph_shown: Option<Value>,
}

/// A job ready to generate.
pub struct Job {
    /// The request's number.
    pub id: u64,
    /// The plan it came from.
    pub plan: Planned,
    /// The adapter, if any, as the cache holds it.
    pub adapter: Option<Arc<Resident>>,
    /// `name@version` of the adapter.
    pub key: Option<String>,
    /// `none`, `hit` or `miss`.
    pub cache: &'static str,
}

/// Validates a request, tokenizes its prompt and chooses its adapter. Blocking (tokenizing, and
/// routing embeds the prompt).
pub fn plan(s: &AppState, req: CompletionRequest, chat: bool) -> Result<Planned, ApiError> {
    let base = &s.config.model_id;
    let (model_base, model_adapter) = match req.model.as_deref() {
        None => (base.as_str(), None),
        Some(m) => match m.split_once(':') {
            Some((b, a)) => (b, Some(a)),
            None => (m, None),
        },
    };
    if model_base != base {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("model '{model_base}' is not served here (the base is '{base}')"),
        ));
    }
    let spec = match (model_adapter, req.adapter.as_deref()) {
        (Some(a), Some(b)) if a != b => {
            return Err(ApiError::bad(format!(
                "the model names adapter '{a}' but the adapter field names '{b}'"
            )))
        }
        (a, b) => a.or(b),
    };
    let params = req.params(chat, s.config.max_tokens)?;
    let e = &s.engine;
    let text = if chat {
        chat_prompt(e.chat_template.as_deref(), req.messages.as_deref())?
    } else {
        match &req.prompt {
            Some(Value::String(p)) => p.clone(),
            Some(_) => return Err(ApiError::bad("prompt must be one string")),
            None => return Err(ApiError::bad("prompt is missing")),
        }
    };
    let prompt = e
        .tokenizer
        .encode(&text, true)
        .map_err(|err| ApiError::bad(format!("tokenizing the prompt: {err}")))?;
    if prompt.is_empty() {
        return Err(ApiError::bad("the prompt is empty"));
    }
    if prompt.len() + params.max_tokens > e.max_seq_len {
        return Err(ApiError::bad(format!(
            "the prompt has {} tokens; with max_tokens {} that is over the context of {} tokens",
            prompt.len(),
            params.max_tokens,
            e.max_seq_len
        )));
    }
    // For chat, the router reads the last user message.
    let query = match (chat, req.messages.as_deref()) {
        (true, Some(m)) => m
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map_or(text.as_str(), |m| m.content.as_str()),
        _ => text.as_str(),
    };
    // Cheap checks first: routing may embed the prompt.
    let auto_morph = req.morph.as_ref().and_then(Value::as_str) == Some("auto");
    let mut morph = if auto_morph {
        Vec::new()
    } else {
        morph_weights(req.morph.as_ref())?
    };
    let (spec, mut route) = choose_adapter(s, spec, req.route.as_ref(), query)?;
    if auto_morph {
        if spec.is_none() {
            return Err(ApiError::bad(
                "morph 'auto' needs an adapter that names a pack (adapter or model base:pack@version)",
            ));
        }
        let router = router_for(s, "morph 'auto'")?;
        let (weights, scores) = router
            .morph(query, MORPH_TEMPERATURE)
            .map_err(ApiError::internal)?;
        let scores: serde_json::Map<String, Value> =
            scores.into_iter().map(|(m, v)| (m, json!(v))).collect();
        route = Some(json!({"by": "embedding", "morph": "auto", "scores": scores}));
        morph = weights;
    }
    if !morph.is_empty() && spec.is_none() {
        return Err(ApiError::bad(
            "morph needs an adapter that names a pack (adapter or model base:pack@version)",
        ));
    }
    // Weights are shown as the decimals they were rounded to, not as their f32 approximations.
    let morph_shown = (!morph.is_empty()).then(|| {
        let shown = |w: f32| json!((f64::from(w) * MORPH_RESOLUTION).round() / MORPH_RESOLUTION);
        Value::Object(morph.iter().map(|(m, w)| (m.clone(), shown(*w))).collect())
    });
    Ok(Planned {
        chat,
        prompt,
        params,
        spec,
        morph,
        route,
        morph_shown,
    })
}

/// Loads the planned adapter through the cache. Entries are keyed by content, not by name: the
/// same files under two names are resident once, and a morph is cached under its pack's content
/// and its weights. A pack member or morph is a weight vector over the pack's bases and cores,
/// each resident once (a miss on another member or blend of a resident pack reads nothing).
/// Blocking: a cold adapter is fetched, and requests for the same cold content wait for that
/// one load.
pub fn load(s: &AppState, plan: Planned, id: u64) -> Result<Job, ApiError> {
    let Some(spec) = plan.spec.clone() else {
        return Ok(Job {
            id,
            plan,
            adapter: None,
            key: None,
            cache: "none",
        });
    };
    let r = resolve(s, &spec)?;
    let cache_key = if plan.morph.is_empty() {
        r.content.clone()
    } else {
        let w: Vec<String> = plan.morph.iter().map(|(m, w)| format!("{m}={w}")).collect();
        format!("{}#morph({})", r.content, w.join(","))
    };
    let mut loaded = false;
    let a = s.cache.get_or_load(&cache_key, || {
        loaded = true;
        load_entry(s, &r, &plan.morph)
    })?;
    Ok(Job {
        id,
        plan,
        adapter: Some(a),
        key: Some(r.key),
        cache: if loaded { "miss" } else { "hit" },
    })
}

/// Builds one resident part of a pack (its bases or its cores) and its bytes.
type PartBuilder = dyn Fn(&PackedSet) -> Result<(Resident, usize), String>;

/// A cache miss: a PEFT adapter read whole, or a view of a pack over its bases and cores, each
/// taken from the cache or read once and put there. Returns the entry and the bytes it holds
/// of its own.
pub fn load_entry(
    s: &AppState,
    r: &Resolved,
    morph: &[(String, f32)],
) -> Result<(Resident, usize), SourceError> {
    let cores_key = format!("cores:{}", r.content);
    let bases_key = format!("bases:{}", r.bases.as_deref().unwrap_or(&r.content));
    let resident_part = |key: &str| s.cache.peek(key);
    let (mut bases, mut cores) = (resident_part(&bases_key), resident_part(&cores_key));
    if bases.is_none() || cores.is_none() {
        let set = match s.source.load(&r.key)? {
            Loaded::Lora(a) => {
                if !morph.is_empty() {
                    return Err(SourceError::BadRequest(format!(
                        "{} is a PEFT adapter, not an S2LC pack: it has no members to morph",
                        r.key
                    )));
                }
                let bytes = a.resident_bytes();
                return Ok((Resident::Lora(a), bytes));
            }
            Loaded::Pack(set) => set,
        };
        let part = |key: &str, build: &PartBuilder| {
            s.cache
                .get_or_load_part(key, || {
                    build(&set).map_err(|e| SourceError::Unusable(format!("{}: {e}", r.key)))
                })
                .map_err(|e| match e {
                    CacheError::Load(e) => e,
                    other => SourceError::Unavailable(other.to_string()),
                })
        };
        bases = Some(part(&bases_key, &|set| {
            let b = ResidentBases::new(set).map_err(|e| e.to_string())?;
            let bytes = b.bytes();
            Ok((Resident::Bases(Arc::new(b)), bytes))
        })?);
        cores = Some(part(&cores_key, &|set| {
            let c = ResidentCores::new(set).map_err(|e| e.to_string())?;
            let bytes = c.bytes();
            Ok((Resident::Cores(Arc::new(c)), bytes))
        })?);
    }
    let (Some(Resident::Bases(bases)), Some(Resident::Cores(cores))) =
        (bases.as_deref(), cores.as_deref())
    else {
        return Err(SourceError::Unusable(format!(
            "{}: the cache holds another kind of entry under its pack's parts",
            r.key
        )));
    };
    let members = cores.members();
    let weights: Vec<(&str, f32)> = if morph.is_empty() {
        match members {
            [one] => vec![(one.as_str(), 1.0)],
            _ => {
                return Err(SourceError::BadRequest(format!(
                    "{} is a pack of {} members: blend them with 'morph', or push one with \
                     `s2lc store push --member`",
                    r.key,
                    members.len()
                )))
            }
        }
    } else {
        if let Some((missing, _)) = morph.iter().find(|(m, _)| !members.contains(m)) {
            return Err(SourceError::NotFound(format!(
                "{} has no member '{missing}' (members: {})",
                r.key,
                members.join(", ")
            )));
        }
        morph.iter().map(|(m, w)| (m.as_str(), *w)).collect()
    };
    let view = PackView::new(&r.key, bases.clone(), cores.clone(), &weights)
        .map_err(|e| SourceError::BadRequest(format!("{}: {e}", r.key)))?;
    let bytes = view.own_bytes();
    Ok((Resident::View(view), bytes))
}

/// What an adapter spec resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// `name@version`: what responses and errors name.
    pub key: String,
    /// Its content id ([`crate::source::AdapterSource::content`]): what the cache holds it
    /// under.
    pub content: String,
    /// For a pack, what identifies its shared bases.
    pub bases: Option<String>,
}

/// The version an adapter spec names, and its content. A spec resolved within the last
/// `resolve_ttl` is answered from memory (the store is not listed for every request). When the
/// store is unreachable, a spec that resolved before and whose adapter is still resident is
/// served from the cache; a cold one gets 503.
pub fn resolve(s: &AppState, spec: &str) -> Result<Resolved, ApiError> {
    {
        let resolved = s.resolved.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((r, at)) = resolved.get(spec) {
            if at.elapsed() < s.config.resolve_ttl {
                return Ok(r.clone());
            }
        }
    }
    // The store is asked without the lock held: a slow store delays only this request.
    let result = s.source.resolve(spec).and_then(|key| {
        let content = s.source.content(&key)?;
        Ok(Resolved {
            key,
            content: content.id,
            bases: content.bases,
        })
    });
    let mut resolved = s.resolved.lock().unwrap_or_else(|p| p.into_inner());
    match result {
        Ok(r) => {
            resolved.insert(spec.to_string(), (r.clone(), Instant::now()));
            Ok(r)
        }
        Err(SourceError::Unavailable(msg)) => resolved
            .get(spec)
            .map(|(r, _)| r)
            .filter(|r| s.cache.contains(&r.content))
            .cloned()
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the adapter store is unreachable and {spec} is not resident: {msg}"),
                )
                .retry_after(5)
            }),
        Err(e) => Err(e.into()),
    }
}

/// The server's semantic router, or a 400 saying that `what` needs one.
fn router_for<'a>(s: &'a AppState, what: &str) -> Result<&'a SemanticRouter, ApiError> {
    s.router
        .as_ref()
        .ok_or_else(|| ApiError::bad(format!("{what} needs a server started with --router")))
}

/// The adapter spec of a request and how it was chosen: named explicitly; by the first tag rule
/// its `route` tags meet (or, if none does and the server has a router, by embedding); or, for
/// `auto`, by the embedding of `query`.
fn choose_adapter(
    s: &AppState,
    named: Option<&str>,
    route: Option<&Value>,
    query: &str,
) -> Result<(Option<String>, Option<Value>), ApiError> {
    let tags = match route {
        None | Some(Value::Null) => None,
        Some(Value::String(t)) => {
            Some(parse_tags(t).map_err(|e| ApiError::bad(format!("route: {e}")))?)
        }
        Some(Value::Object(o)) => Some(
            o.iter()
                .map(|(k, v)| match v {
                    Value::String(v) => Ok((k.clone(), v.clone())),
                    other => Err(ApiError::bad(format!(
                        "route: the value of '{k}' must be a string, not {other}"
                    ))),
                })
                .collect::<Result<_, _>>()?,
        ),
        Some(other) => {
            return Err(ApiError::bad(format!(
                "route must be \"key=value,...\" or an object of strings, not {other}"
            )))
        }
    };
    // By embedding: for `auto`, or for tags no rule matched (then recorded in the answer).
    let by_embedding = |tags: Option<Value>| -> Result<(Option<String>, Option<Value>), ApiError> {
        let router = router_for(s, "adapter 'auto'")?;
        let (adapter, d) = router.route(query).map_err(ApiError::internal)?;
        let mut info = json!({"by": "embedding", "score": d.score, "margin": d.margin});
        if let Some(tags) = tags {
            info["tags"] = tags;
        }
        Ok((Some(adapter.to_string()), Some(info)))
    };
    match (named, tags) {
        (Some(a), Some(_)) if a != "auto" => Err(ApiError::bad(format!(
            "the request names adapter '{a}' and route tags: give one of them"
        ))),
        (_, Some(tags)) => match first_match(&s.config.rules, &tags) {
            Some((i, rule)) => Ok((
                Some(rule.adapter.clone()),
                Some(json!({"by": "rule", "rule": i, "when": rule.when})),
            )),
            None if s.router.is_some() => by_embedding(Some(json!(tags))),
            None => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "no tag rule matches {} and the server has no router to fall back on ({} rules)",
                    serde_json::to_string(&tags).unwrap_or_default(),
                    s.config.rules.len()
                ),
            )),
        },
        (Some("auto"), None) => by_embedding(None),
        (named, None) => Ok((named.map(str::to_string), None)),
    }
}

/// Morph weights from the request: an object of finite numbers, each rounded to
/// `1/`[`MORPH_RESOLUTION`] (members that round to 0 are dropped), summing to a positive number, sorted by
/// member (so equal blends share one cache entry). Absent or `null`: none.
fn morph_weights(morph: Option<&Value>) -> Result<Vec<(String, f32)>, ApiError> {
    let o = match morph {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Object(o)) if !o.is_empty() => o,
        Some(other) => {
            return Err(ApiError::bad(format!(
                "morph must be a non-empty object of member weights or \"auto\", not {other}"
            )))
        }
    };
    let mut weights = Vec::with_capacity(o.len());
    for (m, w) in o {
        let w = w.as_f64().filter(|w| w.is_finite()).ok_or_else(|| {
            ApiError::bad(format!(
                "morph: the weight of '{m}' must be a finite number, not {w}"
            ))
        })?;
        if w < 0.0 {
            return Err(ApiError::bad(format!(
                "morph: the weight of '{m}' is negative ({w}); a blend takes weights of 0 or more"
            )));
        }
        let steps = (w * MORPH_RESOLUTION).round();
        if steps > 1e6 {
            return Err(ApiError::bad(format!(
                "morph: the weight of '{m}' is out of range ({w})"
            )));
        }
        if steps != 0.0 {
            weights.push((m.clone(), (steps / MORPH_RESOLUTION) as f32));
        }
    }
    let sum: f32 = weights.iter().map(|(_, w)| w).sum();
    if sum <= 0.0 || !sum.is_finite() {
        return Err(ApiError::bad(format!(
            "morph weights must sum to a positive number (rounded to hundredths, they sum to {sum})"
        )));
    }
    weights.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(weights)
}

/// The prompt of a chat request: every message in ChatML when the model's template uses it
/// (SmolLM2, Qwen2), else the single user message as is.
fn chat_prompt(template: Option<&str>, messages: Option<&[Message]>) -> Result<String, ApiError> {
    let messages = messages
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ApiError::bad("messages is missing or empty"))?;
    for m in messages {
        if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
            return Err(ApiError::bad(format!(
                "unknown message role '{}' (system, user, assistant)",
                m.role
            )));
        }
    }
    if uses_chatml(template) {
        Ok(chatml(
            messages
                .iter()
                .map(|m| (m.role.as_str(), m.content.as_str())),
        ))
    } else {
        match messages {
            [m] if m.role == "user" => Ok(m.content.clone()),
            _ => Err(ApiError::bad(
                "this model has no chat template: send one user message",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn morph_weights_are_rounded_so_near_blends_share_a_key() {
        let w = |v: Value| morph_weights(Some(&v));
        let a = w(json!({"b": 0.301, "a": 0.7})).unwrap();
        let b = w(json!({"a": 0.6999999, "b": 0.2951, "c": 0.004})).unwrap();
        assert_eq!(a, b);
        assert_eq!(a, vec![("a".to_string(), 0.7), ("b".to_string(), 0.3)]);
        for (v, needle) in [
            (json!({"a": 0.004}), "sum to a positive"),
            (json!({"a": -1.0}), "'a' is negative"),
            (json!({"a": 1.0, "b": -0.5}), "'b' is negative"),
            (json!({"a": 1e300}), "out of range"),
            (json!({"a": "x"}), "finite number"),
            (json!([]), "non-empty object"),
        ] {
            let err = w(v).unwrap_err().message;
            assert!(err.contains(needle), "{err}");
        }
    }
}
