//! Images given by URL (`type: url`, legacy `?image=`): fetched by the front end, when
//! ALLOW_URL_INPUT permits, with size and time limits, and handed to the engine as bytes.
//! Destinations are checked against server-side request forgery: loopback, private,
//! link-local (cloud metadata), multicast and other special addresses are refused unless
//! allow-listed (URL_ALLOW_HOSTS) or URL_DENY_PRIVATE=false, on the URL's host, on every
//! address it resolves to (the resolver only hands allowed addresses to the connector), and
//! again on every redirect.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::budget::{body_memory_full, BodyLease};
use super::error::ApiError;

/// Fetches image URLs for the server: its client (when ALLOW_URL_INPUT is on), where URLs
/// may point (URL_DENY_PRIVATE, URL_ALLOW_HOSTS), and the largest image (URL_MAX_BYTES).
pub struct UrlFetcher {
    /// `None` when ALLOW_URL_INPUT is off.
    pub client: Option<reqwest::Client>,
    pub policy: UrlPolicy,
    pub max_bytes: usize,
}

/// Fetches an image URL, when ALLOW_URL_INPUT permits: http(s) only, size- and time-limited,
/// its bytes counted against the body budget through `lease` as they arrive; the returned
/// lease holds them.
pub async fn fetch_url(
    fetcher: &UrlFetcher,
    url: &str,
    mut lease: BodyLease,
    request_held: &std::sync::atomic::AtomicUsize,
) -> Result<(Bytes, BodyLease), ApiError> {
    let Some(client) = &fetcher.client else {
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
    if let Err(why) = fetcher.policy.check_url(&parsed) {
        return Err(cause(why));
    }
    let max = fetcher.max_bytes;
    let mut resp = client
        .get(parsed)
        .send()
        .await
        .map_err(|e| cause(format!("fetching {url} failed: {}", with_sources(&e))))?;
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
        // What the whole request (its body and every lease of its fetches) would hold: more
        // than one client may hold means no retry can pass. No await between the lease
        // growing and the request's count following it, so the count never lags.
        use std::sync::atomic::Ordering::Relaxed;
        let before = lease.held_bytes();
        let wanted = lease.held_bytes_for(body.len() + chunk.len());
        if let Err(why) = lease.cover(body.len() + chunk.len()) {
            let most = lease.per_peer_bytes();
            if request_held.load(Relaxed) + wanted - before > most {
                return Err(ApiError::new(
                    hyper::StatusCode::PAYLOAD_TOO_LARGE,
                    format!("The images this request names by URL are larger than one client may hold at once ({most} bytes: BODY_MEMORY_PEER_SHARE of MAX_BODY_MEMORY_BYTES); send fewer per request"),
                ));
            }
            return Err(body_memory_full(why));
        }
        request_held.fetch_add(wanted - before, Relaxed);
        body.extend_from_slice(&chunk);
    }
    Ok((Bytes::from(body), lease))
}

/// An error and its causes, outermost first (reqwest's own message hides why).
fn with_sources(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = s.source();
    }
    msg
}

/// Which URL destinations may be fetched.
#[derive(Debug, Clone)]
pub struct UrlPolicy {
    /// Refuse special-purpose addresses (URL_DENY_PRIVATE).
    pub deny_private: bool,
    /// Host names and IP addresses allowed even when special (URL_ALLOW_HOSTS).
    pub allow: Vec<String>,
}

impl UrlPolicy {
    pub fn new(deny_private: bool, allow_hosts: &str) -> Self {
        Self {
            deny_private,
            allow: allow_hosts
                .split(',')
                .map(|h| h.trim().trim_matches(['[', ']']).to_ascii_lowercase())
                .filter(|h| !h.is_empty())
                .collect(),
        }
    }

    fn allowed_host(&self, host: &str) -> bool {
        let host = host.trim_matches(['[', ']']).to_ascii_lowercase();
        self.allow.contains(&host)
    }

    /// Whether `ip` may be connected to for a URL whose host is `host`.
    pub fn check_ip(&self, host: &str, ip: IpAddr) -> Result<(), String> {
        if !self.deny_private
            || self.allowed_host(host)
            || self.allowed_host(&ip.to_string())
            || is_public(ip)
        {
            Ok(())
        } else {
            Err(format!(
                "'{host}' is (or resolves to) {ip}, a loopback, private, link-local or otherwise special address, which this server does not fetch from (URL_DENY_PRIVATE; allow it with URL_ALLOW_HOSTS)"
            ))
        }
    }

    /// Checks a URL whose host is an IP address (names are checked when resolved).
    pub fn check_url(&self, url: &reqwest::Url) -> Result<(), String> {
        match url.host() {
            Some(url::Host::Ipv4(ip)) => self.check_ip(&ip.to_string(), ip.into()),
            Some(url::Host::Ipv6(ip)) => self.check_ip(&ip.to_string(), ip.into()),
            Some(url::Host::Domain(_)) => Ok(()),
            None => Err("the URL has no host".into()),
        }
    }

    /// The HTTP client for URL images: every address it connects to, first request and
    /// redirects alike, passes this policy; no proxy from the environment (a proxy would
    /// resolve names where this policy cannot see them).
    pub fn client(self, timeout: Duration) -> reqwest::Result<reqwest::Client> {
        let policy = Arc::new(self);
        let redirects = Arc::clone(&policy);
        crate::model::download::http_client()
            .timeout(timeout)
            .dns_resolver(Arc::new(GuardedResolver(Arc::clone(&policy))))
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() >= 3 {
                    return attempt.error("more than 3 redirects");
                }
                if !matches!(attempt.url().scheme(), "http" | "https") {
                    let why = format!("redirect to a '{}' URL", attempt.url().scheme());
                    return attempt.error(why);
                }
                match redirects.check_url(attempt.url()) {
                    Ok(()) => attempt.follow(),
                    Err(why) => attempt.error(format!("redirect refused: {why}")),
                }
            }))
            .build()
    }
}

/// Not loopback, private, link-local, shared, documentation, benchmarking, multicast,
/// broadcast, unspecified or reserved (IPv4, IPv6 and IPv4-mapped IPv6).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_broadcast()
                || v4.is_documentation()
                || v4.is_unspecified()
                || v4.is_multicast()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1])) // shared (CGNAT)
                || (o[0] == 192 && o[1] == 0 && o[2] == 0) // IETF protocol assignments
                || (o[0] == 198 && (18..20).contains(&o[1])) // benchmarking
                || o[0] >= 240) // reserved
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            // Forms that carry an IPv4 address a gateway may forward to: NAT64
            // (64:ff9b::/96 and the local-use 64:ff9b:1::/48), 6to4 (2002::/16) and the
            // deprecated IPv4-compatible ::a.b.c.d (::/96). They are refused whole: the IPv4
            // inside may be private, and a public one can be named directly.
            let embeds_ipv4 =
                (s[0] == 0x64 && s[1] == 0xff9b) || s[0] == 0x2002 || s[..6] == [0; 6];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || embeds_ipv4
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated)
                || (s[0] == 0x2001 && s[1] == 0xdb8) // documentation
                || (s[0] == 0x2001 && s[1] < 0x200) // Teredo, benchmarking, ORCHID (2001::/23)
                || s[0] == 0x100 && s[1..4] == [0; 3]) // discard-only 100::/64
        }
    }
}

/// Resolves with the system resolver, then keeps only the addresses the policy allows.
struct GuardedResolver(Arc<UrlPolicy>);

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = Arc::clone(&self.0);
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refused = None;
            let allowed: Vec<SocketAddr> = addrs
                .into_iter()
                .filter(|a| match policy.check_ip(&host, a.ip()) {
                    Ok(()) => true,
                    Err(why) => {
                        refused = Some(why);
                        false
                    }
                })
                .collect();
            if allowed.is_empty() {
                let why = refused.unwrap_or_else(|| format!("'{host}' does not resolve"));
                return Err(why.into());
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_addresses_are_not_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "ff02::1",
            // NAT64 of the metadata address and of loopback, the local-use NAT64 prefix
            "64:ff9b::a9fe:a9fe",
            "64:ff9b::7f00:1",
            "64:ff9b:1::a00:1",
            // 6to4 of the metadata address, of a private and of a public address
            "2002:a9fe:a9fe::1",
            "2002:0a00:0001::",
            "2002:0808:0808::1",
            // IPv4-compatible (deprecated) forms
            "::169.254.169.254",
            "::127.0.0.1",
            "::10.0.0.1",
            // Teredo, site-local, discard-only
            "2001::1",
            "fec0::1",
            "100::1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "8.8.8.8",
            "151.101.1.1",
            "2606:4700::1111",
            "2a00:1450:4001::200e",
        ] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn allow_list_and_switch_open_exactly_what_they_name() {
        let p = UrlPolicy::new(true, "images.internal, 10.0.0.5");
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(p.check_ip("images.internal", ip("10.9.9.9")).is_ok());
        assert!(p.check_ip("other", ip("10.0.0.5")).is_ok());
        assert!(p.check_ip("other", ip("10.0.0.6")).is_err());
        assert!(p.check_ip("metadata", ip("169.254.169.254")).is_err());
        assert!(UrlPolicy::new(false, "")
            .check_ip("x", ip("127.0.0.1"))
            .is_ok());
        let url = |s: &str| reqwest::Url::parse(s).unwrap();
        assert!(p.check_url(&url("http://[::1]:8080/x.jpg")).is_err());
        assert!(p.check_url(&url("http://127.0.0.1/x.jpg")).is_err());
        for form in [
            "http://[64:ff9b::a9fe:a9fe]/latest/meta-data/",
            "http://[64:ff9b::169.254.169.254]/",
            "http://[2002:a9fe:a9fe::]/",
            "http://[::169.254.169.254]/",
            "http://[::a9fe:a9fe]/",
        ] {
            assert!(p.check_url(&url(form)).is_err(), "{form}");
        }
        assert!(p.check_url(&url("http://example.com/x.jpg")).is_ok());
    }
}
