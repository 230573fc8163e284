//! The local model against sentence-transformers: the reference vectors in
//! `data/minilm_reference.json` were computed once with sentence-transformers
//! (its version is in the file) from the same weights; every sentence (short,
//! long past the 256-token cut, non-Latin, emoji) must come out at cosine ≥
//! 0.9999, embedded alone and in a mixed batch.

use bbx_memory::embed::{Embedder, LocalModel};
use bbx_memory::models::ALL_MINILM_L6_V2;

#[derive(serde::Deserialize)]
struct Reference {
    sentences: Vec<String>,
    vectors: Vec<Vec<f32>>,
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

#[tokio::test]
async fn the_local_model_matches_sentence_transformers() {
    let reference: Reference =
        serde_json::from_str(include_str!("data/minilm_reference.json")).expect("the reference parses");
    let models = bbx_memory::testing::models_with_embedder().await;
    let model = LocalModel::new(&ALL_MINILM_L6_V2, models, 2, 4).unwrap();
    assert_eq!(model.dimensions(), 384);
    let batched = model.embed(reference.sentences.clone()).await.unwrap();
    for (i, (sentence, expected)) in reference.sentences.iter().zip(&reference.vectors).enumerate() {
        let alone = model.embed(vec![sentence.clone()]).await.unwrap().remove(0);
        let norm: f32 = alone.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "sentence {i} is not unit: {norm}");
        for (how, got) in [("alone", &alone), ("in a batch", &batched[i])] {
            let similarity = cosine(got, expected);
            assert!(
                similarity >= 0.9999,
                "sentence {i} ({:?}) {how}: cosine {similarity} to sentence-transformers",
                sentence.chars().take(40).collect::<String>()
            );
        }
    }
    assert!(model.embed(Vec::new()).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_missing_model_says_how_to_get_it() {
    let empty = tempfile::tempdir().unwrap();
    let model = LocalModel::new(&ALL_MINILM_L6_V2, empty.path().to_path_buf(), 1, 8).unwrap();
    let error = model.embed(vec!["hello".into()]).await.unwrap_err();
    assert_eq!(error.code, bbx_core::ErrorCode::FailedPrecondition);
    assert!(
        error.message.contains("bbx models fetch all-minilm-l6-v2"),
        "{}",
        error.message
    );
}
