//! Who may call the API and how: API keys (`Authorization: Bearer KEY`, every route but
//! `/health`), the JSON content type on POSTs (so a browser's `text/plain` form post, which needs
//! no CORS preflight, is refused), and an explicit CORS policy (none unless origins are given).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tower_http::cors::{AllowOrigin, CorsLayer};

use super::error::ApiError;
use super::AppState;

/// Equality that takes the same time wherever the first difference is (for secrets).
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether `headers` carry one of `keys` as a bearer token.
pub fn authorized(keys: &[String], headers: &HeaderMap) -> bool {
    let Some(token) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    // Every key is compared, so the time does not tell which (if any) matched.
    keys.iter().fold(false, |ok, k| {
        same_secret(k.as_bytes(), token.trim().as_bytes()) | ok
    })
}

/// Middleware: with API keys configured, every route but `/health` needs one (401 otherwise).
pub async fn require_key(State(s): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let keys = &s.config.api_keys;
    if keys.is_empty() || req.uri().path() == "/health" || authorized(keys, req.headers()) {
        return next.run(req).await;
    }
    s.metrics.unauthorized.inc();
    let mut r = ApiError::new(
        StatusCode::UNAUTHORIZED,
        "missing or wrong API key (send Authorization: Bearer KEY)",
    )
    .into_response();
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

/// A 415 unless the request says its body is JSON (`application/json`, parameters allowed).
pub fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = ct.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "the body must be JSON with Content-Type: application/json (got '{}')",
                ct.chars().take(80).collect::<String>()
            ),
        ))
    }
}

/// The CORS layer for `origins` (`*` allows any), or `None` for no CORS headers at all: browsers
/// then refuse cross-origin reads, which is the safe default for an API that spends compute.
pub fn cors(origins: &[String]) -> Result<Option<CorsLayer>, String> {
    if origins.is_empty() {
        return Ok(None);
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        let values = origins
            .iter()
            .map(|o| HeaderValue::from_str(o).map_err(|_| format!("bad CORS origin '{o}'")))
            .collect::<Result<Vec<_>, _>>()?;
        AllowOrigin::list(values)
    };
    Ok(Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE]),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_keys_and_json_content_type() {
        let keys = vec!["k1".to_string(), "secret-2".to_string()];
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
            h
        };
        assert!(authorized(&keys, &with("Bearer secret-2")));
        assert!(authorized(&keys, &with("Bearer k1")));
        for bad in ["Bearer k", "Bearer secret-3", "Basic k1", "k1", "Bearer "] {
            assert!(!authorized(&keys, &with(bad)), "{bad}");
        }
        assert!(!authorized(&keys, &HeaderMap::new()));
        let ct = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_str(v).unwrap());
            h
        };
        assert!(require_json(&ct("application/json")).is_ok());
        assert!(require_json(&ct("Application/JSON; charset=utf-8")).is_ok());
        for bad in ["text/plain", "application/x-www-form-urlencoded", ""] {
            assert_eq!(
                require_json(&ct(bad)).unwrap_err().status,
                StatusCode::UNSUPPORTED_MEDIA_TYPE
            );
        }
        assert!(require_json(&HeaderMap::new()).is_err());
        assert!(cors(&[]).unwrap().is_none());
        assert!(cors(&["https://app.example".into()]).unwrap().is_some());
        assert!(cors(&["bad\norigin".into()]).is_err());
    }
}
