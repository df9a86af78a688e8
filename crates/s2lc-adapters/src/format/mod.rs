//! The packed-artifact format: a directory other tools can read with any safetensors reader.
//!
//! ```text
//! pack.json                     format, parameters, target matrices, members and their files
//! basis.safetensors             per matrix: the shared bases U and V
//! members/NAME.safetensors      per matrix: the member's core factors (and orthogonal residual)
//! ```
//!
//! A block-quantized matrix `X` is three tensors: `X.data` (U8, the kept blocks' codes: int8 bytes,
//! or int4 / int3 / int2 bit fields packed little-endian), `X.scales` (F16, one per kept block) and `X.kept` (U8, the bitmap as little-endian
//! 64-bit words); its rows, columns, bits and block size are in the file's `__metadata__` under
//! `s2lc` as JSON. Tensor prefixes are `L{layer}.{target}.u|v|core_b|core_a|extra_b|extra_a`. The bases
//! file is shared by every member, so a content-addressed store keeps it once.
//!
//! A basis of mixed widths is several column groups side by side: the first at `…u`, the next at
//! `…u.1`, `…u.2`, …; such packs are [`FORMAT_MIXED`], since a reader of [`FORMAT`] would see only
//! the first group.
//!
//! Those plain files name three tensors per matrix, and with hundreds of small matrices their
//! header outweighs the codes (a rank-8 SmolLM2 adapter packed alone: 0.42 MB of headers for 0.29 MB
//! of codes). A coded pack ([`FORMAT_CODED`], [`PackParams::entropy`]) stores each file as a few
//! tensors instead, its metadata under `s2lc_coded` as `{"matrices": N}`. Each coded stream `X` is
//! two tensors: `X.freqs` (U16, `k × 2`: symbol and frequency of every symbol that occurs, the
//! frequencies summing to 2^14) and `X.stream` (U8, the rANS stream, [`s2lc_spectral::ans`]):
//! - `index`: N records of 18 bytes: layer (u16), target, part (`u v core_b core_a extra_b
//!   extra_a`), column group, bits (u8 each), rows, columns, block size (u32 each), little-endian;
//! - `kept`: each matrix's block bitmap in turn, `⌈blocks/8⌉` bytes, block `i` at bit `i mod 8` of
//!   byte `i/8`;
//! - `scales.hi`, with `scales.lo` (U8, not coded): the high and low bytes of every kept block's
//!   f16 scale, matrix by matrix;
//! - per width present, `ans.int3` etc.: the codes of every matrix of that width in index order,
//!   each value the two's-complement bit field of its code.
//!
//! [`save`] writes a pack (the files' bytes are encoded beside the pack's types, where
//! [`PackedSet::bytes`] counts them); [`load_with`] reads one back as untrusted input, each file
//! parsed and checked against limits before anything is allocated for it.
//!
//! [`PackParams::entropy`]: crate::pack::PackParams::entropy
//! [`PackedSet::bytes`]: crate::pack::PackedSet::bytes

mod load;
mod read;
mod save;

use crate::artifact::check_file_name;
use crate::pack::PackError;

pub use load::{load, load_files, load_with};
pub use save::{basis_bytes, member_bytes, save, save_member};

/// Format tag written to `pack.json`.
pub const FORMAT: &str = "s2lc-pack/1";

/// Format tag of a pack whose bases have column groups of several widths.
pub const FORMAT_MIXED: &str = "s2lc-pack/2";

/// Format tag of a pack whose codes are entropy-coded ([`PackParams::entropy`]).
///
/// [`PackParams::entropy`]: crate::pack::PackParams::entropy
pub const FORMAT_CODED: &str = "s2lc-pack/3";

/// A member name usable as a file name.
fn check_name(name: &str) -> Result<(), PackError> {
    check_file_name(name).map_err(|e| PackError::Invalid(format!("member name: {e}")))
}

#[cfg(test)]
mod tests {
    use s2lc_spectral::QuantBits;

    use super::{load, save, FORMAT_CODED, FORMAT_MIXED};
    use crate::pack::testing::{members, skewed_inputs, steep_members};
    use crate::pack::{pack, pack_with, PackParams, PackedMember, PackedSet};

    #[test]
    fn saved_packs_load_back_identically_and_corruption_is_named() {
        let ms = members(3, 24, 20, 4, 2, 11);
        let set = pack(
            &ms,
            PackParams {
                bits: QuantBits::Int4,
                drop_energy: 0.01,
                energy: 0.9,
                ..PackParams::default()
            },
        )
        .unwrap();
        let dir = std::env::temp_dir().join(format!("s2lc-pack-{}", std::process::id()));
        save(&set, &dir).unwrap();
        let back = load(&dir).unwrap();
        assert_eq!(back, set);
        // A truncated member file is reported with its path.
        let file = dir.join("members/m1.safetensors");
        let bytes = std::fs::read(&file).unwrap();
        std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
        let err = load(&dir).unwrap_err().to_string();
        assert!(err.contains("m1.safetensors"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
        let mut bad = set.clone();
        bad.members[0].name = "../evil".into();
        assert!(save(&bad, &dir).is_err());
    }

    #[test]
    fn entropy_coded_packs_are_smaller_load_back_identically_and_detect_corruption() {
        let ms = members(3, 576, 576, 8, 2, 21);
        let params = PackParams {
            energy: 0.99,
            bits: QuantBits::Int4,
            basis_bits: QuantBits::Int3,
            ..PackParams::default()
        };
        let raw = pack(&ms, params).unwrap();
        let coded = pack(
            &ms,
            PackParams {
                entropy: true,
                ..params
            },
        )
        .unwrap();
        // With one width, the same quantization, only stored differently.
        assert!(raw.modules == coded.modules && raw.members == coded.members);
        // Plain files hold the codes, scales and bitmaps plus a header naming three tensors per
        // matrix; coded files are smaller than those codes alone.
        let qbytes = |set: &PackedSet| {
            set.modules
                .values()
                .map(|m| m.u.bytes() + m.v.bytes())
                .sum::<usize>()
                + set.members.iter().map(PackedMember::bytes).sum::<usize>()
        };
        assert!(raw.bytes() > qbytes(&raw));
        assert!(
            coded.bytes() < qbytes(&raw),
            "{} vs {}",
            coded.bytes(),
            qbytes(&raw)
        );
        let dir = std::env::temp_dir().join(format!("s2lc-ans-{}", std::process::id()));
        // The sizes reported are the files' sizes.
        for set in [&raw, &coded] {
            save(set, &dir).unwrap();
            let on_disk: u64 = [
                "basis.safetensors",
                "members/m0.safetensors",
                "members/m1.safetensors",
                "members/m2.safetensors",
            ]
            .iter()
            .map(|f| std::fs::metadata(dir.join(f)).unwrap().len())
            .sum();
            assert_eq!(on_disk as usize, set.bytes());
            std::fs::remove_dir_all(&dir).unwrap();
        }
        // Mixed widths: several code streams, and every column group comes back.
        let mixed = pack(
            &ms,
            PackParams {
                entropy: true,
                mixed_bases: true,
                ..params
            },
        )
        .unwrap();
        save(&mixed, &dir).unwrap();
        let manifest = std::fs::read_to_string(dir.join("pack.json")).unwrap();
        assert!(manifest.contains(FORMAT_CODED), "{manifest}");
        assert!(load(&dir).unwrap() == mixed);
        let groups: usize = mixed
            .modules
            .values()
            .map(|m| m.u.groups.len() + m.v.groups.len())
            .sum();
        assert!(groups > 2 * mixed.modules.len(), "{groups} column groups");
        // A flipped byte inside a stream is caught by the decoder's end-state check.
        let file = dir.join("basis.safetensors");
        let mut bytes = std::fs::read(&file).unwrap();
        let (at, len) = {
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let stream = st.tensor("ans.int3.stream").unwrap().data();
            (
                stream.as_ptr() as usize - bytes.as_ptr() as usize,
                stream.len(),
            )
        };
        bytes[at + len / 2] ^= 0x5a;
        std::fs::write(&file, &bytes).unwrap();
        let err = load(&dir).unwrap_err().to_string();
        assert!(
            err.contains("basis.safetensors") && err.contains("ans.int3.stream"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    /// Mixed-width bases keep their column groups through the files, under the format that
    /// names them.
    #[test]
    fn mixed_width_bases_survive_the_files_under_their_format() {
        let params = PackParams {
            energy: 0.999,
            basis_bits: QuantBits::Int3,
            mixed_bases: true,
            ..PackParams::default()
        };
        let mixed = pack(&steep_members(), params).unwrap();
        let dir = std::env::temp_dir().join(format!("s2lc-mixed-{}", std::process::id()));
        save(&mixed, &dir).unwrap();
        let manifest = std::fs::read_to_string(dir.join("pack.json")).unwrap();
        assert!(manifest.contains(FORMAT_MIXED), "{manifest}");
        assert_eq!(load(&dir).unwrap(), mixed);
        std::fs::remove_dir_all(&dir).ok();
    }

    /// An activation-aware pack, with a member added under its calibration, loads back as saved,
    /// flag included.
    #[test]
    fn whitened_packs_keep_their_flag_through_the_files() {
        let (_, whitening) = skewed_inputs(32);
        let ms = members(2, 24, 32, 4, 1, 3);
        let params = PackParams {
            energy: 0.95,
            ..PackParams::default()
        };
        let mut set = pack_with(&ms[..1], params, Some(&whitening)).unwrap();
        set.add_with(&ms[1], Some(&whitening)).unwrap();
        assert!(set.params.whitened);
        let dir = std::env::temp_dir().join(format!("s2lc-wpack-{}", std::process::id()));
        save(&set, &dir).unwrap();
        assert_eq!(load(&dir).unwrap(), set);
        std::fs::remove_dir_all(&dir).ok();
    }
}
