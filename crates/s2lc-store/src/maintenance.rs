//! Maintenance: `verify` (re-hash everything, report problems and leftovers) and `gc` (collect
//! unreachable objects under the gc side of the lease protocol), with their reports.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::lease::{GcLock, GC_LOCKS, LEASES};
use crate::local::{self, Meta};
use crate::{Manifest, Result, Store, StoreError};

/// What [`Store::verify`] found.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct VerifyReport {
    /// Objects re-hashed.
    pub checked: usize,
    /// Problems, one line each (corrupt blobs, manifests or refs pointing at missing objects).
    pub problems: Vec<String>,
    /// Traces of writers in flight or killed, one line each: staging files of unfinished writes,
    /// leases of pushes and locks of gcs. Not problems: `gc` sweeps them once they are old.
    pub leftovers: Vec<String>,
}

/// What [`Store::gc`] did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct GcReport {
    /// Objects (blobs and manifests) removed.
    pub removed: usize,
    /// Bytes freed (objects and staging files).
    pub freed: u64,
    /// Unreachable objects kept because they are younger than the grace period.
    pub young: usize,
    /// Unreachable objects kept because a push in flight holds a lease on them.
    pub leased: usize,
    /// Staging files of unfinished writes removed.
    pub staging: usize,
    /// Expired leases and gc locks (of killed pushes and gcs) removed.
    pub expired: usize,
}

impl Store {
    /// Digests of the manifests and blobs every ref reaches.
    fn reachable(&self, problems: &mut Vec<String>) -> Result<BTreeSet<String>> {
        let mut keep = BTreeSet::new();
        for Meta { rel, .. } in self.list_raw("refs")? {
            let Some(md) = self.get_raw(&rel)? else {
                continue;
            };
            let md = String::from_utf8_lossy(&md).trim().to_string();
            keep.insert(format!("manifests/{md}"));
            match self.get_verified("manifests", &md) {
                Ok(text) => match serde_json::from_slice::<Manifest>(&text) {
                    Ok(m) => keep.extend(m.files.iter().map(|f| format!("blobs/{}", f.digest))),
                    Err(e) => problems.push(format!("{rel}: manifest {md} is malformed: {e}")),
                },
                Err(e) => problems.push(format!("{rel}: {e}")),
            }
        }
        Ok(keep)
    }

    /// Re-hashes every blob and manifest, checks that every ref reaches existing objects, and
    /// lists staging files, leases and gc locks as leftovers.
    pub fn verify(&self) -> Result<VerifyReport> {
        let mut report = VerifyReport::default();
        let reachable = self.reachable(&mut report.problems)?;
        let mut present = BTreeSet::new();
        for dir in ["blobs", "manifests"] {
            for m in self.list_raw(dir)? {
                let name = m.rel.rsplit('/').next().unwrap_or_default().to_string();
                report.checked += 1;
                match self.get_verified(dir, &name) {
                    Ok(_) => {}
                    Err(e) => report.problems.push(e.to_string()),
                }
                present.insert(m.rel);
            }
        }
        for missing in reachable.difference(&present) {
            report
                .problems
                .push(format!("{missing} is referenced but missing"));
        }
        for m in self.objects.staging(&self.fault)? {
            report.leftovers.push(format!(
                "staging file {} ({} bytes, {} s old): an unfinished write; gc removes it",
                m.rel,
                m.size,
                self.age(m.modified).as_secs()
            ));
        }
        for (dir, what) in [(LEASES, "lease of a push"), (GC_LOCKS, "lock of a gc")] {
            for m in self.list_raw(dir)? {
                let age = self.age(m.modified);
                let state = if self.expired(m.modified) {
                    "expired: its owner died; gc removes it"
                } else {
                    "in flight"
                };
                report.leftovers.push(format!(
                    "{what} {} ({} s old, {state})",
                    m.rel,
                    age.as_secs()
                ));
            }
        }
        Ok(report)
    }

    /// Removes blobs and manifests that no ref reaches, no push in flight has leased and that
    /// are older than `grace`; then staging files of unfinished writes older than `grace`
    /// (those of leased objects are kept; others outside `blobs/` and `manifests/` are kept for
    /// a lease TTL too, as they may be a live ref, tag or lease write), and expired leases and
    /// gc locks. Runs the gc side of the protocol in [`lease`](crate::lease), so it never deletes
    /// an object a concurrent push relies on.
    pub fn gc(&self, grace: Duration) -> Result<GcReport> {
        let mut lock = GcLock::acquire(self)?;
        let result = self.gc_locked(&mut lock, grace);
        lock.release();
        result
    }

    fn gc_locked(&self, lock: &mut GcLock<'_>, grace: Duration) -> Result<GcReport> {
        // G2-G3 before G4: a lease that is gone by the time it is read belongs to a push that
        // wrote its ref first.
        let leased = lock.read_leases()?;
        let mut problems = Vec::new();
        let keep = self.reachable(&mut problems)?;
        if !problems.is_empty() {
            return Err(StoreError::Invalid(format!(
                "gc refused: the store has problems (run verify): {}",
                problems.join("; ")
            )));
        }
        let mut report = GcReport::default();
        for dir in ["blobs", "manifests"] {
            for m in self.list_raw(dir)? {
                if keep.contains(&m.rel) {
                    continue;
                }
                if leased.objects.contains(&m.rel) {
                    report.leased += 1;
                    continue;
                }
                if self.age(m.modified) < grace {
                    report.young += 1;
                    continue;
                }
                lock.hold()?;
                self.delete_raw(&m.rel)?;
                report.removed += 1;
                report.freed += m.size;
            }
        }
        for m in self.objects.staging(&self.fault)? {
            let (dir, file) = m.rel.rsplit_once('/').unwrap_or(("", &m.rel));
            let target = format!("{dir}/{}", local::staging_target(file).unwrap_or_default());
            let content = dir == "blobs" || dir == "manifests";
            let min_age = if content {
                grace
            } else {
                grace.max(self.lease_ttl)
            };
            if leased.objects.contains(&target) || self.age(m.modified) < min_age {
                continue;
            }
            lock.hold()?;
            self.objects.delete(&self.fault, &m.rel, true)?;
            report.staging += 1;
            report.freed += m.size;
        }
        for rel in &leased.expired {
            self.delete_raw(rel)?;
            report.expired += 1;
        }
        for m in self.list_raw(GC_LOCKS)? {
            if !lock.is(&m.rel) && self.expired(m.modified) {
                self.delete_raw(&m.rel)?;
                report.expired += 1;
            }
        }
        Ok(report)
    }
}
