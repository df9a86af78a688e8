//! Packing, adding and unpacking members (see the crate docs for the method).
//!
//! Each part uses only those listed before it:
//! - `error`: [`PackError`];
//! - `linalg`: dense-matrix helpers;
//! - `member`: what is packed ([`Member`], [`Delta`], [`ModuleKey`]);
//! - `params`: how ([`PackParams`], [`EnergyScope`], [`InputWhitening`]);
//! - `set`: a pack as data ([`PackedSet`] and its parts, [`QMat`]);
//! - `files`: the files a pack is stored as, and so its sizes ([`PackedSet::bytes`]);
//! - `project`: one member truncated and projected onto bases;
//! - `build`: [`pack`], [`pack_with`], [`pack_separately`];
//! - `add`: [`PackedSet::add`];
//! - `unpack`: [`PackedSet::unpack`], [`Factors`], [`DecodedBases`];
//! - `morph`: [`PackedSet::morph`];
//! - `report`: [`PackedSet::report`], [`MemberReport`];
//! - `resident`: a pack served as stored ([`ResidentBases`], [`ResidentCores`], [`PackView`]).

mod add;
mod build;
mod error;
pub(crate) mod files;
mod linalg;
mod member;
mod morph;
mod params;
mod project;
mod report;
mod resident;
mod set;
#[cfg(test)]
pub(crate) mod testing;
mod unpack;

pub use crate::qmat::QMat;
pub use build::{pack, pack_separately, pack_with};
pub use error::PackError;
pub use member::{Delta, Member, ModuleKey};
pub use params::{EnergyScope, InputWhitening, PackParams};
pub use report::MemberReport;
pub use resident::{PackView, ResidentBases, ResidentCores};
pub use set::{PackedCore, PackedMember, PackedModule, PackedSet};
pub use unpack::{DecodedBases, Factors, Unpacked};
