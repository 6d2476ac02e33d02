//! Images given by URL (`type: url`, legacy `?image=`): fetched by the front end, when
//! ALLOW_URL_INPUT permits, with size and time limits, and handed to the engine as bytes.

use bytes::Bytes;

use super::error::ApiError;
use super::AppState;

/// Fetches an image URL, when ALLOW_URL_INPUT permits: http(s) only, size- and time-limited.
pub async fn fetch_url(state: &AppState, url: &str) -> Result<Bytes, ApiError> {
    let Some(client) = &state.http_client else {
        return Err(ApiError::bad_request(
            "Could not load input image. Cause: loading images from URLs is disabled on this server (set ALLOW_URL_INPUT=true to enable it).",
        ));
    };
    let cause =
        |m: String| ApiError::bad_request(format!("Could not load input image. Cause: {m}"));
    let parsed =
        reqwest::Url::parse(url).map_err(|e| cause(format!("invalid URL '{url}': {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(cause(format!(
            "only http and https URLs are accepted, not '{}'",
            parsed.scheme()
        )));
    }
    let max = state.cfg.url_max_bytes;
    let mut resp = client
        .get(parsed)
        .send()
        .await
        .map_err(|e| cause(format!("fetching {url} failed: {e}")))?;
    if !resp.status().is_success() {
        return Err(cause(format!(
            "fetching {url} returned HTTP {}",
            resp.status()
        )));
    }
    if resp.content_length().is_some_and(|n| n as usize > max) {
        return Err(cause(format!(
            "the image at {url} is larger than URL_MAX_BYTES ({max} bytes)"
        )));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| cause(format!("fetching {url} failed: {e}")))?
    {
        if body.len() + chunk.len() > max {
            return Err(cause(format!(
                "the image at {url} is larger than URL_MAX_BYTES ({max} bytes)"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(body))
}
