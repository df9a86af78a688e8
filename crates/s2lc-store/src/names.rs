//! Adapter names, tags and versions as users write them: their checks, `name@version` for a
//! push and `name[@selector]` (a [`Selector`]) for a pull.

use semver::{Version, VersionReq};

use crate::{Result, StoreError};

/// A reference to an adapter in a pull: `name@REQ` where REQ is an exact version (`1.2.0`), a
/// requirement (`^1.2`, `>=1, <2`, `*`) or a tag (`prod`); a bare `name` means `name@*`.
#[derive(Debug, Clone, PartialEq)]
pub enum Selector {
    /// Exactly this version.
    Exact(Version),
    /// The highest version matching.
    Req(VersionReq),
    /// The version a tag points at.
    Tag(String),
}

/// Checks an adapter name: lowercase letters, digits, `.`, `_`, `-`, starting with a letter or
/// digit (it becomes part of object keys).
pub fn check_name(name: &str) -> Result<()> {
    let ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
        && name.len() <= 128;
    if ok {
        Ok(())
    } else {
        Err(StoreError::BadName(format!(
            "bad adapter name '{name}' (lowercase letters, digits, '.', '_', '-'; at most 128)"
        )))
    }
}

/// Checks a tag name: a lowercase letter, then letters, digits, `_`, `-`; and not something
/// [`parse_selector`] reads as a version or requirement first (`x` is the requirement `*`), which
/// could never select the tag.
pub fn check_tag(tag: &str) -> Result<()> {
    let ok = tag.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && tag
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_-".contains(c))
        && tag.len() <= 128;
    if !ok {
        return Err(StoreError::BadName(format!(
            "bad tag '{tag}' (a lowercase letter, then letters, digits, '_', '-'; at most 128)"
        )));
    }
    if Version::parse(tag).is_ok() || VersionReq::parse(tag).is_ok() {
        return Err(StoreError::BadName(format!(
            "bad tag '{tag}': it reads as a version requirement, so NAME@{tag} would never \
             select the tag"
        )));
    }
    Ok(())
}

/// Splits `name@version` (exact semantic version) for a push.
pub fn parse_versioned(s: &str) -> Result<(String, Version)> {
    let (name, version) = s.split_once('@').ok_or_else(|| {
        StoreError::BadName(format!("'{s}' needs a version: NAME@MAJOR.MINOR.PATCH"))
    })?;
    check_name(name)?;
    let version = Version::parse(version).map_err(|e| {
        StoreError::BadName(format!(
            "bad version '{version}' in '{s}': {e} (expected e.g. 1.2.0)"
        ))
    })?;
    Ok((name.to_string(), version))
}

/// Splits `name[@selector]` for a pull.
pub fn parse_selector(s: &str) -> Result<(String, Selector)> {
    let (name, sel) = s.split_once('@').unwrap_or((s, "*"));
    check_name(name)?;
    let sel = if let Ok(v) = Version::parse(sel) {
        Selector::Exact(v)
    } else if let Ok(r) = VersionReq::parse(sel) {
        Selector::Req(r)
    } else if check_tag(sel).is_ok() {
        Selector::Tag(sel.to_string())
    } else {
        return Err(StoreError::BadName(format!(
            "bad version requirement '{sel}' in '{s}' (e.g. 1.2.0, ^1.2, >=1.0, <2, or a tag)"
        )));
    };
    Ok((name.to_string(), sel))
}
