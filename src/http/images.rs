//! Image intake: an [`ImageSource`] (base64 text, raw bytes, or a URL) in, a
//! [`DecodedImage`] in a ring slot out. The slot is taken first (none free: 429 at once); the
//! base64 and pixel decoding run on the decode pool, off the async reactor.

use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine;
use bytes::Bytes;
use tokio::sync::oneshot;

use super::error::ApiError;
use super::request::ImageSource;
use super::AppState;
use crate::pipeline::decode::{decode_into, DecodeError, DecodeOptions, DecodedImage};

/// Standard alphabet, padding optional (clients differ).
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Decodes base64 text, accepting a `data:image/...;base64,` prefix and line breaks.
pub fn base64_bytes(text: &str) -> Result<Vec<u8>, DecodeError> {
    let text = text.trim();
    let text = match text.strip_prefix("data:") {
        Some(rest) => rest
            .split_once(',')
            .map(|(_, b)| b)
            .ok_or(DecodeError::Base64)?,
        None => text,
    };
    let decoded = if text.bytes().any(|b| b.is_ascii_whitespace()) {
        let compact: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        BASE64.decode(compact)
    } else {
        BASE64.decode(text)
    };
    decoded.map_err(|_| DecodeError::Base64)
}

enum Payload {
    Base64(String),
    Bytes(Bytes),
}

/// Gets the image's bytes and decodes them into a ring slot.
pub async fn decode_image(
    state: &AppState,
    source: ImageSource,
    opts: DecodeOptions,
) -> Result<DecodedImage, ApiError> {
    let payload = match source {
        ImageSource::Base64(s) => Payload::Base64(s),
        ImageSource::Bytes(b) => Payload::Bytes(b),
        ImageSource::Url(u) => Payload::Bytes(fetch_url(state, &u).await?),
    };
    let slot = state.ring.try_acquire().ok_or_else(|| {
        ApiError::overloaded(
            "Server overloaded: every image slot is in use (RING_SLOTS); retry shortly",
        )
    })?;
    let (tx, rx) = oneshot::channel();
    state.pools.decode.spawn(move || {
        let result = match payload {
            Payload::Base64(text) => {
                base64_bytes(&text).and_then(|bytes| decode_into(&bytes, slot, &opts))
            }
            Payload::Bytes(bytes) => decode_into(&bytes, slot, &opts),
        };
        let _ = tx.send(result);
    });
    rx.await
        .map_err(|_| ApiError::internal("Internal error: the decode stage failed"))?
        .map_err(ApiError::from)
}

/// Fetches an image URL, when ALLOW_URL_INPUT permits: http(s) only, size- and time-limited.
async fn fetch_url(state: &AppState, url: &str) -> Result<Bytes, ApiError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_accepts_data_urls_missing_padding_and_line_breaks() {
        assert_eq!(base64_bytes("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_bytes("aGVsbG8").unwrap(), b"hello");
        assert_eq!(
            base64_bytes("data:image/jpeg;base64,aGVsbG8=").unwrap(),
            b"hello"
        );
        assert_eq!(base64_bytes("aGVs\nbG8=\n").unwrap(), b"hello");
        assert_eq!(
            base64_bytes("not base64!").unwrap_err(),
            DecodeError::Base64
        );
        assert_eq!(
            base64_bytes("data:nocomma").unwrap_err(),
            DecodeError::Base64
        );
    }
}
