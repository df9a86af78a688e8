//! Tests of the decoders: type sizes, length checks, every format decoded by hand, and exact
//! agreement with gguf-py on the committed fixtures.

use super::*;

fn h(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_le_bytes()
}

fn deq(dtype: GgmlType, bytes: &[u8]) -> Vec<f32> {
    let n = bytes.len() / dtype.type_size() * dtype.block_size();
    let mut out = vec![f32::NAN; n];
    dequantize(dtype, bytes, &mut out).unwrap();
    out
}

#[test]
fn ids_round_trip_and_sizes_match_ggml() {
    for t in GgmlType::ALL {
        assert_eq!(GgmlType::from_id(t.id()), Some(t));
    }
    for id in [4, 5, 31, 32, 33, 36, 37, 38, 40, 1000, u32::MAX] {
        assert_eq!(GgmlType::from_id(id), None, "id {id}");
    }
    let sizes = [
        (GgmlType::Q4_0, 32, 18),
        (GgmlType::Q4_1, 32, 20),
        (GgmlType::Q5_0, 32, 22),
        (GgmlType::Q5_1, 32, 24),
        (GgmlType::Q8_0, 32, 34),
        (GgmlType::Q2_K, 256, 84),
        (GgmlType::Q3_K, 256, 110),
        (GgmlType::Q4_K, 256, 144),
        (GgmlType::Q5_K, 256, 176),
        (GgmlType::Q6_K, 256, 210),
        (GgmlType::Q8_K, 256, 292),
        (GgmlType::BF16, 1, 2),
    ];
    for (t, bs, ts) in sizes {
        assert_eq!((t.block_size(), t.type_size()), (bs, ts), "{t}");
    }
    assert_eq!(GgmlType::Q4_K.row_bytes(512), Some(288));
    assert_eq!(GgmlType::Q4_K.row_bytes(100), None);
    assert_eq!(GgmlType::F32.row_bytes(usize::MAX), None);
}

#[test]
fn length_checks() {
    let mut out = vec![0.0; 32];
    assert_eq!(
        dequantize(GgmlType::Q8_0, &[0; 33], &mut out),
        Err(QuantError::ByteLength {
            dtype: GgmlType::Q8_0,
            n: 32,
            expected: 34,
            got: 33
        })
    );
    assert!(matches!(
        dequantize(GgmlType::Q8_0, &[0; 34], &mut out[..31]),
        Err(QuantError::NotBlockMultiple { n: 31, .. })
    ));
    assert_eq!(
        dequantize(GgmlType::IQ2_XXS, &[], &mut []),
        Err(QuantError::Unsupported(GgmlType::IQ2_XXS))
    );
    let msg = QuantError::Unsupported(GgmlType::IQ4_XS).to_string();
    assert!(msg.contains("IQ4_XS"), "{msg}");
    // Zero elements are fine.
    dequantize(GgmlType::Q4_K, &[], &mut []).unwrap();
}

#[test]
fn plain_types() {
    let mut b = Vec::new();
    for x in [1.5f32, -0.0, 3.25e-3] {
        b.extend_from_slice(&x.to_le_bytes());
    }
    assert_eq!(deq(GgmlType::F32, &b), [1.5, -0.0, 3.25e-3]);
    assert_eq!(
        deq(GgmlType::F16, &[0x00, 0x3C, 0x00, 0xC0, 0x01, 0x00]),
        [1.0, -2.0, 2f32.powi(-24)]
    );
    // bf16 0x3FC0 = 1.5, 0xC040 = -3.0.
    assert_eq!(deq(GgmlType::BF16, &[0xC0, 0x3F, 0x40, 0xC0]), [1.5, -3.0]);
    assert_eq!(deq(GgmlType::F64, &0.1f64.to_le_bytes()), [0.1f32]);
}

#[test]
fn q4_0_by_hand() {
    // d = 0.5; qs[j] = (15 - j) << 4 | j: element j = j, element j + 16 = 15 - j.
    let mut b = h(0.5).to_vec();
    b.extend((0..16u8).map(|j| ((15 - j) << 4) | j));
    let y = deq(GgmlType::Q4_0, &b);
    for j in 0..16 {
        assert_eq!(y[j], 0.5 * (j as f32 - 8.0));
        assert_eq!(y[j + 16], 0.5 * (7.0 - j as f32));
    }
}

#[test]
fn q4_1_by_hand() {
    let mut b = [h(0.25), h(-1.0)].concat();
    b.extend((0..16u8).map(|j| ((15 - j) << 4) | j));
    let y = deq(GgmlType::Q4_1, &b);
    for j in 0..16 {
        assert_eq!(y[j], 0.25 * j as f32 - 1.0);
        assert_eq!(y[j + 16], 0.25 * (15 - j) as f32 - 1.0);
    }
}

#[test]
fn q5_by_hand() {
    // High bits set for the odd elements: q = (j & 15) + 16·(j odd) with nibble j & 15.
    let qh: u32 = 0xAAAA_AAAA;
    let qs: Vec<u8> = (0..16u8).map(|j| (j << 4) | j).collect();
    let expect_q = |j: usize| (j % 16) as i32 + if j % 2 == 1 { 16 } else { 0 };

    let mut b = h(2.0).to_vec();
    b.extend_from_slice(&qh.to_le_bytes());
    b.extend_from_slice(&qs);
    let y = deq(GgmlType::Q5_0, &b);
    for (j, &v) in y.iter().enumerate() {
        assert_eq!(v, 2.0 * (expect_q(j) - 16) as f32, "element {j}");
    }

    let mut b = [h(0.5), h(3.0)].concat();
    b.extend_from_slice(&qh.to_le_bytes());
    b.extend_from_slice(&qs);
    let y = deq(GgmlType::Q5_1, &b);
    for (j, &v) in y.iter().enumerate() {
        assert_eq!(v, 0.5 * expect_q(j) as f32 + 3.0, "element {j}");
    }
}

#[test]
fn q8_0_by_hand() {
    let mut b = h(0.125).to_vec();
    b.extend((0..32i32).map(|j| (j * 8 - 128) as i8 as u8));
    let y = deq(GgmlType::Q8_0, &b);
    for (j, &v) in y.iter().enumerate() {
        assert_eq!(v, 0.125 * (j as f32 * 8.0 - 128.0));
    }
}

#[test]
fn q8_k_by_hand() {
    let mut b = 0.5f32.to_le_bytes().to_vec();
    b.extend((0..256i32).map(|j| (j - 128) as i8 as u8));
    b.extend([0xFF; 32]); // bsums: ignored
    let y = deq(GgmlType::Q8_K, &b);
    for (j, &v) in y.iter().enumerate() {
        assert_eq!(v, 0.5 * (j as f32 - 128.0));
    }
}

/// Packs 8 six-bit (scale, min) pairs the way `get_scale_min_k4` unpacks them.
fn pack_k4(sc: [u8; 8], m: [u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..4 {
        s[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6);
        s[j + 4] = (m[j] & 63) | ((m[j + 4] >> 4) << 6);
        s[j + 8] = (sc[j + 4] & 0x0F) | ((m[j + 4] & 0x0F) << 4);
    }
    s
}

#[test]
fn k4_scales_unpack() {
    let sc = [1, 63, 17, 32, 45, 7, 60, 33];
    let m = [0, 5, 62, 31, 16, 48, 3, 63];
    let s = pack_k4(sc, m);
    for j in 0..8 {
        assert_eq!(scale_min_k4(j, &s), (sc[j], m[j]), "sub-block {j}");
    }
}

#[test]
fn q4_k_by_hand() {
    let sc = [1, 2, 3, 4, 40, 50, 60, 63];
    let m = [9, 8, 7, 6, 33, 44, 55, 62];
    let mut b = [h(0.5), h(0.25)].concat();
    b.extend_from_slice(&pack_k4(sc, m));
    // qs byte (32g + l): low nibble l % 16, high nibble 15 - l % 16.
    b.extend((0..128usize).map(|i| ((15 - (i % 16) as u8) << 4) | (i % 16) as u8));
    let y = deq(GgmlType::Q4_K, &b);
    for (e, &v) in y.iter().enumerate() {
        let s = e / 32;
        let l = e % 32;
        let q = if s % 2 == 0 { l % 16 } else { 15 - l % 16 };
        let want = 0.5 * sc[s] as f32 * q as f32 - 0.25 * m[s] as f32;
        assert_eq!(v, want, "element {e}");
    }
}

#[test]
fn q5_k_by_hand() {
    let sc = [3, 1, 4, 1, 59, 26, 53, 58];
    let m = [2, 7, 1, 8, 28, 18, 28, 45];
    let mut b = [h(0.125), h(-0.5)].concat();
    b.extend_from_slice(&pack_k4(sc, m));
    // qh[l] = l as u8: bit s of l says whether element 32s + l has bit 4 set.
    b.extend(0..32u8);
    b.extend((0..128usize).map(|i| ((15 - (i % 16) as u8) << 4) | (i % 16) as u8));
    let y = deq(GgmlType::Q5_K, &b);
    for (e, &v) in y.iter().enumerate() {
        let s = e / 32;
        let l = e % 32;
        let nib = if s % 2 == 0 { l % 16 } else { 15 - l % 16 };
        let q = nib + 16 * ((l >> s) & 1);
        let want = 0.125 * sc[s] as f32 * q as f32 - -0.5 * m[s] as f32;
        assert_eq!(v, want, "element {e}");
    }
}

#[test]
fn q6_k_by_hand() {
    // Choose quants q(e) = e % 64 and scales sc[i] = i - 8, then pack them per the layout.
    let q = |e: usize| (e % 64) as u8;
    let mut ql = [0u8; 128];
    let mut qh = [0u8; 64];
    for e in 0..256 {
        let (hh, k, l) = (e / 128, (e % 128) / 32, e % 32);
        let byte = 64 * hh + l + if k % 2 == 1 { 32 } else { 0 };
        ql[byte] |= (q(e) & 0x0F) << if k >= 2 { 4 } else { 0 };
        qh[32 * hh + l] |= (q(e) >> 4) << (2 * k);
    }
    let scales: Vec<u8> = (0..16i32).map(|i| (i - 8) as i8 as u8).collect();
    let mut b = ql.to_vec();
    b.extend_from_slice(&qh);
    b.extend_from_slice(&scales);
    b.extend_from_slice(&h(0.25));
    let y = deq(GgmlType::Q6_K, &b);
    for (e, &v) in y.iter().enumerate() {
        let want = 0.25 * ((e / 16) as f32 - 8.0) * (q(e) as f32 - 32.0);
        assert_eq!(v, want, "element {e}");
    }
}

#[test]
fn q2_k_by_hand() {
    // q(e) = (e / 7) % 4; scales[i] = (15 - i) << 4 | i.
    let q = |e: usize| ((e / 7) % 4) as u8;
    let mut qs = [0u8; 64];
    for e in 0..256 {
        let (hh, k, l) = (e / 128, (e % 128) / 32, e % 32);
        qs[32 * hh + l] |= q(e) << (2 * k);
    }
    let scales: Vec<u8> = (0..16u8).map(|i| ((15 - i) << 4) | i).collect();
    let mut b = scales.clone();
    b.extend_from_slice(&qs);
    b.extend_from_slice(&h(0.5));
    b.extend_from_slice(&h(0.125));
    let y = deq(GgmlType::Q2_K, &b);
    for (e, &v) in y.iter().enumerate() {
        let i = e / 16;
        let want = 0.5 * i as f32 * q(e) as f32 - 0.125 * (15 - i) as f32;
        assert_eq!(v, want, "element {e}");
    }
}

#[test]
fn q3_k_by_hand() {
    // Signed quants q(e) in -4..4 (3 bits), 6-bit scales sc[i] = 4i - 32 (+32 stored).
    let q = |e: usize| ((e * 5) % 8) as i32 - 4;
    let sc = |i: usize| 4 * i as i32 - 30;
    let mut hmask = [0u8; 32];
    let mut qs = [0u8; 64];
    for e in 0..256 {
        let (hh, k, l) = (e / 128, (e % 128) / 32, e % 32);
        let stored = (q(e) + 4) as u8; // 0..8: bit 2 is the "high bit set" flag
        qs[32 * hh + l] |= (stored & 3) << (2 * k);
        hmask[l] |= ((stored >> 2) & 1) << (e / 32);
    }
    let mut scales = [0u8; 12];
    for i in 0..16 {
        let u = (sc(i) + 32) as u8;
        scales[i % 8] |= (u & 0x0F) << (4 * (i / 8));
        scales[8 + i % 4] |= (u >> 4) << (2 * (i / 4));
    }
    let mut b = hmask.to_vec();
    b.extend_from_slice(&qs);
    b.extend_from_slice(&scales);
    b.extend_from_slice(&h(0.5));
    let y = deq(GgmlType::Q3_K, &b);
    for (e, &v) in y.iter().enumerate() {
        let want = 0.5 * sc(e / 16) as f32 * q(e) as f32;
        assert_eq!(v, want, "element {e}");
    }
}

/// Exact agreement with gguf-py's `gguf.quants.dequantize` on the committed fixtures
/// (`scripts/reference/gguf_dequant_fixture.py`): real blocks from SmolLM2 and synthetic blocks
/// for the types absent from it.
#[test]
fn matches_gguf_py_fixtures() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gguf");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    let cases = index["cases"].as_array().unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let dtype = GgmlType::from_id(case["type_id"].as_u64().unwrap() as u32).unwrap();
        assert_eq!(dtype.name(), case["type"].as_str().unwrap());
        let bytes = std::fs::read(dir.join(case["bytes"].as_str().unwrap())).unwrap();
        let want: Vec<f32> = std::fs::read(dir.join(case["values"].as_str().unwrap()))
            .unwrap()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(want.len() as u64, case["n_elements"].as_u64().unwrap());
        let mut got = vec![f32::NAN; want.len()];
        dequantize(dtype, &bytes, &mut got).unwrap_or_else(|e| panic!("{name}: {e}"));
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                g.to_bits() == w.to_bits(),
                "{name} ({dtype}) element {i}: got {g:e}, gguf-py {w:e}"
            );
        }
        seen.insert(dtype);
    }
    for t in [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ] {
        assert!(seen.contains(&t), "no fixture for {t}");
    }
}
