//! Embedders: text to unit vectors. The local model (all-MiniLM-L6-v2 on candle,
//! on a pool of its own threads) by default, or an OpenAI-compatible
//! `/v1/embeddings` server by configuration. Every vector an embedder returns is
//! finite, of its dimensions and of length 1, or the call fails: nothing else
//! reaches the index.

mod local;
mod remote;

pub use local::LocalModel;
pub use remote::RemoteModel;

use bbx_component::Pending;
use bbx_core::{Error, Result};

/// Text to vectors.
pub trait Embedder: Send + Sync {
    /// The model's id, recorded with each memory it embeds: vectors of two ids
    /// are never compared.
    fn model(&self) -> &str;

    fn dimensions(&self) -> usize;

    /// One unit vector per text, in order.
    fn embed<'a>(&'a self, texts: Vec<String>) -> Pending<'a, Vec<Vec<f32>>>;
}

/// `vector` scaled to length 1; an error if it has the wrong dimensions or is
/// not finite (NaN from a remote server) or zero.
pub fn unit(mut vector: Vec<f32>, dimensions: usize, model: &str) -> Result<Vec<f32>> {
    if vector.len() != dimensions {
        return Err(Error::internal(format!(
            "the model {model} returned a vector of {} dimensions, not {dimensions}",
            vector.len()
        )));
    }
    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
    if !norm.is_finite() || norm == 0.0 {
        return Err(Error::internal(format!(
            "the model {model} returned a vector that is not finite or is zero"
        )));
    }
    vector.iter_mut().for_each(|x| *x /= norm);
    Ok(vector)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_are_checked_and_made_unit() {
        let v = unit(vec![3.0, 4.0], 2, "m").unwrap();
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6);
        assert!(unit(vec![1.0], 2, "m").is_err());
        assert!(unit(vec![f32::NAN, 1.0], 2, "m").is_err());
        assert!(unit(vec![0.0, 0.0], 2, "m").is_err());
        assert!(unit(vec![f32::INFINITY, 1.0], 2, "m").is_err());
    }
}
