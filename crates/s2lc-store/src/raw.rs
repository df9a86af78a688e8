//! The store's object primitives: get, put, list and delete by key through the backend (and its
//! fault injection), content-addressed put-once and hash-checked get, and the key of a ref.

use semver::Version;

use crate::local::Meta;
use crate::{digest, is_digest, Result, Store, StoreError};

impl Store {
    pub(crate) fn get_raw(&self, rel: &str) -> Result<Option<Vec<u8>>> {
        self.objects.get(&self.fault, rel)
    }

    /// Writes `bytes` at `rel`; with `create`, fails with `Ok(false)` if it exists.
    pub(crate) fn put_raw(&self, rel: &str, bytes: Vec<u8>, create: bool) -> Result<bool> {
        self.objects.put(&self.fault, rel, bytes, create)
    }

    /// Every object under `rel/`.
    pub(crate) fn list_raw(&self, rel: &str) -> Result<Vec<Meta>> {
        self.objects.list(&self.fault, rel)
    }

    pub(crate) fn delete_raw(&self, rel: &str) -> Result<()> {
        self.objects.delete(&self.fault, rel, false)
    }

    /// Stores a content-addressed object once. A present one is seen with a HEAD and its bytes
    /// are not sent: that saves the upload, and some S3 servers (s3s-fs 0.14.1) answer a
    /// create-if-absent put of an existing object by closing the connection before reading the
    /// body, which the client sees as a broken pipe rather than "already exists". Within a push,
    /// the lease makes relying on a present object safe against gc.
    pub(crate) fn put_once(
        &self,
        rel: &str,
        bytes: impl FnOnce() -> Result<Vec<u8>>,
    ) -> Result<()> {
        if !self.objects.exists(&self.fault, rel)? {
            self.put_raw(rel, bytes()?, true)?;
        }
        Ok(())
    }
    /// Reads the object `dir/digest` and checks its hash.
    pub(crate) fn get_verified(&self, dir: &str, d: &str) -> Result<Vec<u8>> {
        let rel = format!("{dir}/{d}");
        if !is_digest(d) {
            return Err(StoreError::Invalid(format!(
                "'{rel}' is not a BLAKE3 digest"
            )));
        }
        let bytes = self
            .get_raw(&rel)?
            .ok_or_else(|| StoreError::NotFound(format!("{rel} is missing from the store")))?;
        let actual = digest(&bytes);
        if actual != d {
            return Err(StoreError::Corrupt { key: rel, actual });
        }
        Ok(bytes)
    }
}

/// The key of the ref of `name@version`.
pub(crate) fn ref_key(name: &str, version: &Version) -> String {
    format!("refs/{name}/{version}")
}
