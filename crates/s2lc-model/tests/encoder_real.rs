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
