//! An OpenAI-compatible `/v1/embeddings` server (Ollama, vLLM, TEI, OpenAI):
//! texts go in batches, vectors come back by index, and each is checked (its
//! dimensions, finite) before it is used. A server that cannot be reached or
//! answers 5xx or 429 is `unavailable`, which the ring retries.

use super::{Embedder, unit};
use bbx_component::Pending;
use bbx_core::config::RemoteEmbedder;
use bbx_core::{Error, ErrorCode, Result};
use serde::Deserialize;
use std::time::Duration;

pub struct RemoteModel {
    config: RemoteEmbedder,
    /// `remote:MODEL@HOST/DIMENSIONS`, so vectors of two servers' models (or of
    /// one model asked for other dimensions) never mix.
    id: String,
    url: url::Url,
    client: reqwest::Client,
    batch: usize,
}

impl RemoteModel {
    pub fn new(config: &RemoteEmbedder, batch: usize) -> Result<Self> {
        let base = config.url.trim_end_matches('/');
        let url = url::Url::parse(&format!("{base}/embeddings"))
            .map_err(|e| Error::invalid_field("memory.remote.url", format!("{:?} is not a URL: {e}", config.url)))?;
        let host = url.host_str().unwrap_or_default().to_owned();
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| Error::internal(format!("cannot build an HTTP client: {e}")))?;
        Ok(Self {
            id: format!("remote:{}@{host}/{}", config.model, config.dimensions),
            config: config.clone(),
            url,
            client,
            batch: batch.max(1),
        })
    }

    async fn embed_batch(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        let unavailable = |why: String| {
            Error::new(
                ErrorCode::Unavailable,
                format!("the embedding server {}: {why}", self.url),
            )
        };
        let mut request = self.client.post(self.url.clone()).json(&serde_json::json!({
            "model": self.config.model,
            "input": texts,
        }));
        if let Some(var) = &self.config.api_key_env {
            let key = std::env::var(var).map_err(|_| {
                Error::new(
                    ErrorCode::FailedPrecondition,
                    format!("memory.remote.api_key_env names {var}, which is not set"),
                )
            })?;
            request = request.bearer_auth(key);
        }
        let response = request
            .send()
            .await
            .map_err(|e| unavailable(format!("cannot be reached: {e}")))?;
        let status = response.status();
        if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            return Err(unavailable(format!("answered {status}")));
        }
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            return Err(Error::internal(format!(
                "the embedding server {} refused the request ({status}): {}",
                self.url,
                body.chars().take(300).collect::<String>()
            )));
        }
        #[derive(Deserialize)]
        struct Answer {
            data: Vec<Item>,
        }
        #[derive(Deserialize)]
        struct Item {
            #[serde(default)]
            index: Option<usize>,
            embedding: Vec<Option<f32>>,
        }
        let answer: Answer = response
            .json()
            .await
            .map_err(|e| unavailable(format!("sent an answer that does not parse: {e}")))?;
        if answer.data.len() != texts.len() {
            return Err(Error::internal(format!(
                "the embedding server {} returned {} vectors for {} texts",
                self.url,
                answer.data.len(),
                texts.len()
            )));
        }
        let mut vectors = vec![None; texts.len()];
        for (position, item) in answer.data.into_iter().enumerate() {
            let at = item.index.unwrap_or(position);
            // A null (NaN encoded by a lenient server) fails the vector's check.
            let vector = item.embedding.into_iter().map(|x| x.unwrap_or(f32::NAN)).collect();
            let slot = vectors
                .get_mut(at)
                .ok_or_else(|| Error::internal(format!("the embedding server {} returned index {at}", self.url)))?;
            *slot = Some(unit(vector, self.config.dimensions, &self.id)?);
        }
        vectors
            .into_iter()
            .map(|v| v.ok_or_else(|| Error::internal(format!("the embedding server {} left out a vector", self.url))))
            .collect()
    }
}

impl Embedder for RemoteModel {
    fn model(&self) -> &str {
        &self.id
    }

    fn dimensions(&self) -> usize {
        self.config.dimensions
    }

    fn embed<'a>(&'a self, texts: Vec<String>) -> Pending<'a, Vec<Vec<f32>>> {
        Box::pin(async move {
            let mut vectors = Vec::with_capacity(texts.len());
            for batch in texts.chunks(self.batch) {
                vectors.extend(self.embed_batch(batch).await?);
            }
            Ok(vectors)
        })
    }
}
