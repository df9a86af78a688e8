//! How `push` and `gc` run at the same time without `gc` deleting an object a push uses.
//!
//! A push re-uses every blob (and manifest) already in the store, orphaned ones included, so
//! "gc deletes only old unreachable objects" is not enough: gc may have judged an orphan old,
//! a push then finds it present and skips uploading it, and gc deletes it — and the push writes
//! a ref to a missing object. Refreshing the orphan's mtime does not close that window (gc
//! decided before the refresh). Instead the two coordinate through two kinds of small objects:
//!
//! ```text
//! leases/<id>   a push in flight: the objects it will reference ({"push", "objects": [keys]})
//! gc/<id>       a gc in flight: once it has read the leases, the ids of those it honours
//! ```
//!
//! **Push** P: (P1) hashes its files and builds its manifest, so it knows every key it will
//! reference, D; (P2) writes its lease naming D; (P3) lists `gc/` until every gc lock younger than
//! the lease TTL names P's lease among those it honours, or is gone; (P4) checks or uploads each
//! blob, the manifest, then writes the ref; (P5) deletes its lease. Before each step of P4 it
//! *holds* the lease: rewritten when older than TTL/4; if TTL/2 has passed since the last write
//! the lease may have looked expired to someone, so P redoes P2–P3 — under a new id, since a gc
//! that judged the old one expired deletes it by name — and every check of P4.
//!
//! **Gc** G: (G1) writes its lock, honouring nothing yet; (G2) lists and reads every lease younger
//! than the TTL and keeps the union of their objects; (G3) rewrites its lock with their ids;
//! (G4) reads refs and manifests for what is reachable; (G5) deletes unreachable, unleased objects
//! older than the grace period, rewriting its lock when older than TTL/4 and stopping if TTL/2
//! has passed since its last write; (G6) sweeps staging files, expired leases and expired gc
//! locks, and deletes its lock.
//!
//! **Why gc never deletes an object a push relies on.** Assume (A) the backend is linearizable
//! for single objects and listings — a get or list that starts after a put or delete returned
//! sees it: true of a local directory, of AWS S3 since 2020 (strong read-after-write and list
//! consistency) and of s3s-fs; and (B) clock skew plus one request's latency stay below TTL/2
//! (default TTL 5 min), so a lease or lock its owner holds never looks expired (a lease counts as
//! expired only at TTL + 1 s, as S3 servers may stamp times to the second). Take an object d
//! in D that P checks in its last pass of P4, after its lease was last written at t_l and its last
//! listing of `gc/` at t_w > t_l; and any gc G, listing leases at t_r.
//! - t_r > t_l: G sees P's lease, fresh (B), and keeps d — or the lease is already gone, so P
//!   wrote its ref before t_r and G4, later, finds d reachable (A).
//! - t_r < t_l: G's lock was written before t_r < t_w, so P's listing at t_w saw it (A) unless G
//!   had finished, and P went on only once it honoured P's lease (then d is kept) or was gone;
//!   a finished G deleted nothing after t_w, so P's check of d sees the store after G's deletes
//!   and uploads d if it is missing.
//!
//! After P5, d is reachable from P's ref until someone removes that version. Nothing here needs
//! an atomic rename or a conditional put: leases and locks have unique names and are written
//! whole, so the argument holds on S3 as on a local directory. Staging files of a leased key are
//! kept by the same rule. A crashed push's lease expires after the TTL; a crashed gc's lock makes
//! pushes wait until it expires. A blob written with [`crate::Store::put_blob`] outside a push
//! has no lease: gc may collect it once it is older than the grace period.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::local::unique_id;
use crate::{Result, Store, StoreError};

/// Where leases are.
pub(crate) const LEASES: &str = "leases";
/// Where gc locks are.
pub(crate) const GC_LOCKS: &str = "gc";

#[derive(Serialize, Deserialize)]
struct LeaseBody {
    push: String,
    objects: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct GcBody {
    honours: Option<Vec<String>>,
}

/// Whether `key` names a content-addressed object (`blobs/<hex>` or `manifests/<hex>`).
fn is_content_key(key: &str) -> bool {
    key.split_once('/')
        .is_some_and(|(dir, d)| (dir == "blobs" || dir == "manifests") && crate::is_digest(d))
}

/// A push's lease.
pub(crate) struct Lease<'a> {
    store: &'a Store,
    id: String,
    body: Vec<u8>,
    written: Instant,
    /// Re-establishments in a row with no step done in between.
    stalls: usize,
    steps: usize,
}

impl<'a> Lease<'a> {
    /// Writes a lease naming `objects` for the push `what` (P2) and waits for the gcs that
    /// may not honour it (P3).
    pub fn acquire(store: &'a Store, what: &str, objects: Vec<String>) -> Result<Lease<'a>> {
        let body = serde_json::to_vec(&LeaseBody {
            push: what.to_string(),
            objects,
        })
        .map_err(|e| StoreError::Invalid(e.to_string()))?;
        let mut lease = Lease {
            store,
            id: unique_id(),
            body,
            written: Instant::now(),
            stalls: 0,
            steps: 0,
        };
        store.put_raw(&lease.rel(), lease.body.clone(), false)?;
        match lease.wait_for_gcs() {
            Ok(()) => Ok(lease),
            Err(e) => {
                lease.release();
                Err(e)
            }
        }
    }

    fn rel(&self) -> String {
        format!("{LEASES}/{}", self.id)
    }

    /// Writes the lease (again). One that may have looked expired gets a new id: a gc that
    /// judged the old one expired deletes it by name, and must not delete the renewed lease.
    fn write(&mut self) -> Result<()> {
        let t = Instant::now();
        let lapsed = self.written.elapsed() > self.store.lease_ttl / 2;
        let old = lapsed.then(|| self.rel());
        if lapsed {
            self.id = unique_id();
        }
        self.store.put_raw(&self.rel(), self.body.clone(), false)?;
        self.written = t;
        if let Some(old) = old {
            let _ = self.store.delete_raw(&old);
        }
        Ok(())
    }

    /// P3: returns once every live gc lock honours this lease or is gone, the lease rewritten
    /// before each listing that finds it older than TTL/4.
    fn wait_for_gcs(&mut self) -> Result<()> {
        let ttl = self.store.lease_ttl;
        let mut pause = Duration::from_millis(1);
        loop {
            if self.written.elapsed() > ttl / 4 {
                self.write()?;
            }
            let mut blocked = false;
            for m in self.store.list_raw(GC_LOCKS)? {
                if self.store.expired(m.modified) {
                    continue;
                }
                let Some(bytes) = self.store.get_raw(&m.rel)? else {
                    continue;
                };
                let honours = serde_json::from_slice::<GcBody>(&bytes)
                    .ok()
                    .and_then(|b| b.honours);
                if !honours.is_some_and(|ids| ids.contains(&self.id)) {
                    blocked = true;
                    break;
                }
            }
            if !blocked {
                return Ok(());
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(25));
        }
    }

    /// Holds the lease before a step that relies on what the store holds. `Ok(true)`: the lease
    /// may have lapsed and was re-established, so every earlier check must be redone.
    pub fn hold(&mut self) -> Result<bool> {
        let ttl = self.store.lease_ttl;
        let elapsed = self.written.elapsed();
        if elapsed <= ttl / 4 {
            self.steps += 1;
            return Ok(false);
        }
        if elapsed <= ttl / 2 {
            self.write()?;
            self.steps += 1;
            return Ok(false);
        }
        self.stalls = if self.steps == 0 { self.stalls + 1 } else { 0 };
        if self.stalls > 3 {
            return Err(StoreError::Invalid(format!(
                "the push could not hold its lease: no step finished within half the lease TTL \
                 ({} ms)",
                ttl.as_millis()
            )));
        }
        self.steps = 0;
        self.write()?;
        self.wait_for_gcs()?;
        Ok(true)
    }

    /// P5 (best effort: a lease left behind expires).
    pub fn release(self) {
        let _ = self.store.delete_raw(&self.rel());
    }
}

/// A gc's lock.
pub(crate) struct GcLock<'a> {
    store: &'a Store,
    id: String,
    body: Vec<u8>,
    written: Instant,
}

/// What the leases protect (G2).
pub(crate) struct Leased {
    /// Keys named by live leases.
    pub objects: BTreeSet<String>,
    /// Leases older than the TTL (their pushes died), to sweep.
    pub expired: Vec<String>,
}

impl<'a> GcLock<'a> {
    /// G1.
    pub fn acquire(store: &'a Store) -> Result<GcLock<'a>> {
        let mut lock = GcLock {
            store,
            id: unique_id(),
            body: Vec::new(),
            written: Instant::now(),
        };
        lock.set(None)?;
        Ok(lock)
    }

    fn rel(&self) -> String {
        format!("{GC_LOCKS}/{}", self.id)
    }

    fn set(&mut self, honours: Option<Vec<String>>) -> Result<()> {
        self.body = serde_json::to_vec(&GcBody { honours })
            .map_err(|e| StoreError::Invalid(e.to_string()))?;
        self.write()
    }

    fn write(&mut self) -> Result<()> {
        let t = Instant::now();
        self.store.put_raw(&self.rel(), self.body.clone(), false)?;
        self.written = t;
        Ok(())
    }

    /// G2 and G3: reads the live leases and publishes which it honours.
    pub fn read_leases(&mut self) -> Result<Leased> {
        let mut leased = Leased {
            objects: BTreeSet::new(),
            expired: Vec::new(),
        };
        let mut ids = Vec::new();
        for m in self.store.list_raw(LEASES)? {
            if self.store.expired(m.modified) {
                leased.expired.push(m.rel);
                continue;
            }
            // Gone since the listing: its push finished, and its ref is visible to G4.
            let Some(bytes) = self.store.get_raw(&m.rel)? else {
                continue;
            };
            let body: LeaseBody = serde_json::from_slice(&bytes).map_err(|e| {
                StoreError::Invalid(format!("gc refused: lease {} is malformed: {e}", m.rel))
            })?;
            if let Some(bad) = body.objects.iter().find(|k| !is_content_key(k)) {
                return Err(StoreError::Invalid(format!(
                    "gc refused: lease {} names '{bad}', not a blob or manifest",
                    m.rel
                )));
            }
            leased.objects.extend(body.objects);
            ids.push(m.rel.rsplit('/').next().unwrap_or_default().to_string());
        }
        self.set(Some(ids))?;
        Ok(leased)
    }

    /// Before each delete (G5): the lock must not have been able to look expired.
    pub fn hold(&mut self) -> Result<()> {
        let ttl = self.store.lease_ttl;
        let elapsed = self.written.elapsed();
        if elapsed > ttl / 2 {
            return Err(StoreError::Invalid(format!(
                "gc stopped: {} ms passed since it last renewed its lock (half the lease TTL is \
                 {} ms), so a push may have taken it for a dead gc's",
                elapsed.as_millis(),
                (ttl / 2).as_millis()
            )));
        }
        if elapsed > ttl / 4 {
            self.write()?;
        }
        Ok(())
    }

    /// Whether `rel` (under `gc/`) is this lock.
    pub fn is(&self, rel: &str) -> bool {
        rel == self.rel()
    }

    /// G6 (best effort: a lock left behind expires).
    pub fn release(self) {
        let _ = self.store.delete_raw(&self.rel());
    }
}
