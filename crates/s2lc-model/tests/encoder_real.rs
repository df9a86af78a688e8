//! S2LC's BERT sentence encoder against PyTorch + transformers on the real all-MiniLM-L6-v2
//! (fixture from `scripts/reference/minilm_embeddings.py`), including a text over 256 tokens.

use s2lc_model::encoder::SentenceEncoder;

#[test]
fn minilm_embeddings_match_pytorch() {
    let dir = s2lc_model::assets::minilm();
    if !dir.join("model.safetensors").exists() {
        eprintln!(
            "skipped: {} absent (run scripts/fetch-assets)",
            dir.display()
        );
        return;
    }
    let enc = SentenceEncoder::load(&dir).unwrap();
    assert_eq!(enc.dim(), 384);
    let fixture: serde_json::Value = serde_json::from_str(include_str!(
        "../../../tests/fixtures/minilm_embeddings.json"
    ))
    .unwrap();
    let items = fixture["items"].as_array().unwrap();
    let texts: Vec<&str> = items.iter().map(|i| i["text"].as_str().unwrap()).collect();
    let ours = enc.embed_all(&texts).unwrap();
    for (item, e) in items.iter().zip(&ours) {
        let want: Vec<f32> = item["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let cos: f32 = want.iter().zip(e).map(|(a, b)| a * b).sum();
        let max = want
            .iter()
            .zip(e)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        eprintln!("{} tokens: cos {cos}, max |diff| {max:.2e}", item["tokens"]);
        assert!(
            cos > 0.99999 && max < 1e-4,
            "{} tokens: cos {cos}, max diff {max}",
            item["tokens"]
        );
    }
    // Different texts are told apart: cosines between them are well below 1.
    let c: f32 = ours[0].iter().zip(&ours[2]).map(|(a, b)| a * b).sum();
    assert!(c < 0.5, "{c}");
}

/// Paragraphs of about 500 characters from `text`, whole words.
fn paragraphs(text: &str, count: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    while out.len() < count && start < text.len() {
        let mut end = (start + 500).min(text.len());
        while !text.is_char_boundary(end) {
            end += 1;
        }
        let end = text[end..].find(' ').map_or(text.len(), |i| end + i);
        out.push(text[start..end].trim());
        start = end;
    }
    out
}

fn mean_and_worst_cosine(a: &[Vec<f32>], b: &[Vec<f32>]) -> (f32, f32) {
    let cos: Vec<f32> = a
        .iter()
        .zip(b)
        .map(|(x, y)| x.iter().zip(y).map(|(p, q)| p * q).sum())
        .collect();
    let mean = cos.iter().sum::<f32>() / cos.len() as f32;
    (mean, cos.iter().copied().fold(f32::INFINITY, f32::min))
}

/// Compression of the real encoder: a budget is met, whitening with calibration text beats
/// plain SVD at the same budget on other text, and a threshold that keeps everything changes
/// nothing.
#[test]
fn compressed_minilm_keeps_its_embeddings() {
    use s2lc_model::compress::{Method, RankPolicy};
    let dir = s2lc_model::assets::minilm();
    let carroll = s2lc_model::assets::home().join("text/canterbury/alice29.txt");
    let report = s2lc_model::assets::home().join("text/canterbury/lcet10.txt");
    if !dir.join("model.safetensors").exists() || !carroll.exists() || !report.exists() {
        eprintln!("skipped: MiniLM or the Canterbury texts absent (run scripts/fetch-assets)");
        return;
    }
    let calib_text = std::fs::read_to_string(&carroll).unwrap();
    let eval_text = std::fs::read_to_string(&report).unwrap();
    let calibration = paragraphs(&calib_text, 24);
    let held_out = paragraphs(&eval_text[eval_text.len() / 2..], 24);
    let dense = SentenceEncoder::load(&dir).unwrap();
    let want = dense.embed_all(&held_out).unwrap();

    let mut all = SentenceEncoder::load(&dir).unwrap();
    let r = all
        .compress(RankPolicy::Energy(1.0), Method::Svd, false, &[])
        .unwrap();
    assert!(r.matrices.iter().all(|m| m.rank.is_none()));
    assert_eq!(all.embed_all(&held_out).unwrap(), want);

    let mut cos = Vec::new();
    for method in [Method::Svd, Method::Whitened] {
        let mut enc = SentenceEncoder::load(&dir).unwrap();
        let r = enc
            .compress(RankPolicy::KeepParams(0.7), method, true, &calibration)
            .unwrap();
        assert_eq!(r.params_before, dense.linear_params());
        let kept = r.params_after as f64 / r.params_before as f64;
        assert!(kept <= 0.7 && kept > 0.6, "{method:?}: kept {kept}");
        assert_eq!(r.matrices.len(), 36);
        let (mean, worst) = mean_and_worst_cosine(&enc.embed_all(&held_out).unwrap(), &want);
        eprintln!("{method:?} keep 0.7: cosine mean {mean:.4}, worst {worst:.4}");
        assert!(worst <= mean && mean < 1.0);
        cos.push(mean);
    }
    assert!(cos[1] > cos[0], "whitened {} vs svd {}", cos[1], cos[0]);
    // Bad input is refused before anything changes.
    let mut enc = SentenceEncoder::load(&dir).unwrap();
    assert!(enc
        .compress(RankPolicy::Energy(1.5), Method::Svd, false, &[])
        .is_err());
    assert!(enc
        .compress(RankPolicy::KeepParams(0.5), Method::Whitened, true, &[])
        .is_err());
    assert_eq!(enc.linear_params(), dense.linear_params());
}
