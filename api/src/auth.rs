//! SigV4 verification of requests signed by the AWS SDKs and CLI (header form,
//! `Authorization: AWS4-HMAC-SHA256 Credential=..., SignedHeaders=..., Signature=...`).
//!
//! The check runs in two steps: `precheck` before the body is read (header syntax, known access
//! key, clock skew), `verify` once the body's sha256 is known.

use std::collections::HashMap;
use std::path::Path;

use axum::http::{HeaderMap, Method, Uri};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq as _;

use crate::error::ApiError;

/// The largest clock difference accepted between the client's `X-Amz-Date` and ours.
pub const MAX_SKEW_SECONDS: i64 = 5 * 60;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read the credentials file {path}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("credentials file {path}: {problems}")]
    Parse {
        path: std::path::PathBuf,
        problems: String,
    },
}

/// Which requests are accepted.
#[derive(Clone)]
pub enum Auth {
    /// Only requests signed with one of these access keys (key id -> secret).
    Keys(HashMap<String, String>),
    /// Any well-formed SigV4 request, whatever its key: for local development only.
    AcceptAnySigned,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Keys(keys) => write!(f, "Keys({} access keys)", keys.len()),
            Self::AcceptAnySigned => f.write_str("AcceptAnySigned"),
        }
    }
}

impl Auth {
    /// Reads `ACCESS_KEY_ID SECRET` pairs, one a line; blank lines and `#` comments are skipped.
    /// Every bad line is reported, not only the first.
    pub fn from_file(path: &Path) -> Result<Self, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(&text).map_err(|problems| AuthError::Parse {
            path: path.into(),
            problems,
        })
    }

    fn parse(text: &str) -> Result<Self, String> {
        let mut keys = HashMap::new();
        let mut problems = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields.as_slice() {
                [id, secret] if id.chars().all(|c| c.is_ascii_alphanumeric()) => {
                    if keys.insert(id.to_string(), secret.to_string()).is_some() {
                        problems.push(format!("line {}: access key {id} appears twice", i + 1));
                    }
                }
                _ => problems.push(format!("line {}: expected `ACCESS_KEY_ID SECRET`", i + 1)),
            }
        }
        if keys.is_empty() && problems.is_empty() {
            problems.push("no access keys".to_string());
        }
        if problems.is_empty() {
            Ok(Self::Keys(keys))
        } else {
            Err(problems.join("; "))
        }
    }
}

/// The parts of an `Authorization` header, checked before the body is read; they borrow the
/// request's headers and the configured secret.
#[derive(Debug)]
pub struct Prechecked<'a> {
    access_key: &'a str,
    secret: Option<&'a str>,
    scope: &'a str,
    amz_date: &'a str,
    /// `SignedHeaders` as sent: header names separated by `;`.
    signed_headers: &'a str,
    signature: &'a str,
}

fn incomplete(msg: &str) -> ApiError {
    ApiError::IncompleteSignature(msg.to_string())
}

/// Parses `yyyymmddThhmmssZ` into seconds since the epoch.
fn parse_amz_date(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let number = |range: std::ops::Range<usize>| -> Option<u32> {
        b.get(range)?.iter().try_fold(0u32, |n, &d| {
            d.is_ascii_digit().then(|| n * 10 + u32::from(d - b'0'))
        })
    };
    let month = time::Month::try_from(u8::try_from(number(4..6)?).ok()?).ok()?;
    let date = time::Date::from_calendar_date(
        i32::try_from(number(0..4)?).ok()?,
        month,
        u8::try_from(number(6..8)?).ok()?,
    )
    .ok()?;
    let time = time::Time::from_hms(
        u8::try_from(number(9..11)?).ok()?,
        u8::try_from(number(11..13)?).ok()?,
        u8::try_from(number(13..15)?).ok()?,
    )
    .ok()?;
    Some(
        time::PrimitiveDateTime::new(date, time)
            .assume_utc()
            .unix_timestamp(),
    )
}

fn format_amz_date(t: i64) -> String {
    let format = time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|t| t.format(&format).ok())
        .unwrap_or_default()
}

/// Step one: header syntax, the access key, the clock skew.
pub fn precheck<'a>(
    auth: &'a Auth,
    headers: &'a HeaderMap,
    now: i64,
) -> Result<Prechecked<'a>, ApiError> {
    let Some(value) = headers.get("authorization") else {
        return Err(ApiError::MissingAuthenticationToken(
            "Missing Authentication Token".into(),
        ));
    };
    let value = value
        .to_str()
        .map_err(|_| incomplete("Authorization header is not ASCII"))?;
    let Some(rest) = value.strip_prefix("AWS4-HMAC-SHA256 ") else {
        return Err(incomplete(
            "Authorization header requires the AWS4-HMAC-SHA256 algorithm",
        ));
    };
    let (mut credential, mut signed, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let part = part.trim();
        if let Some(v) = part.strip_prefix("Credential=") {
            credential = Some(v);
        } else if let Some(v) = part.strip_prefix("SignedHeaders=") {
            signed = Some(v);
        } else if let Some(v) = part.strip_prefix("Signature=") {
            signature = Some(v);
        }
    }
    let (Some(credential), Some(signed), Some(signature)) = (credential, signed, signature) else {
        return Err(incomplete(
            "Authorization header requires 'Credential', 'SignedHeaders' and 'Signature' parameters",
        ));
    };
    let Some((access_key, scope)) = credential.split_once('/') else {
        return Err(incomplete(
            "Credential must have the form KEY/date/region/service/aws4_request",
        ));
    };
    let mut scope_parts = scope.split('/');
    let (Some(scope_date), Some(_region), Some(service), Some("aws4_request"), None) = (
        scope_parts.next(),
        scope_parts.next(),
        scope_parts.next(),
        scope_parts.next(),
        scope_parts.next(),
    ) else {
        return Err(incomplete(
            "Credential must have the form KEY/date/region/service/aws4_request",
        ));
    };
    if service != "lambda" {
        return Err(ApiError::InvalidSignature(format!(
            "Credential should be scoped to correct service: 'lambda', not '{service}'"
        )));
    }
    if !signed.split(';').any(|h| h == "host") {
        return Err(ApiError::InvalidSignature(
            "'Host' must be a 'SignedHeader' in the AWS Authorization.".into(),
        ));
    }
    let secret = match auth {
        Auth::Keys(keys) => match keys.get(access_key) {
            Some(secret) => Some(secret.as_str()),
            None => {
                return Err(ApiError::UnrecognizedClient(
                    "The security token included in the request is invalid.".into(),
                ));
            }
        },
        Auth::AcceptAnySigned => None,
    };
    let amz_date = headers
        .get("x-amz-date")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| incomplete("Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' header"))?;
    let Some(t) = parse_amz_date(amz_date) else {
        return Err(incomplete(
            "X-Amz-Date must be in the ISO8601 basic format yyyyMMdd'T'HHmmss'Z'",
        ));
    };
    if !amz_date.starts_with(scope_date) {
        return Err(ApiError::InvalidSignature(format!(
            "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP: '{scope_date}' != '{}'",
            &amz_date[..8]
        )));
    }
    if t < now - MAX_SKEW_SECONDS {
        return Err(ApiError::InvalidSignature(format!(
            "Signature expired: {amz_date} is now earlier than {} ({} - 5 min.)",
            format_amz_date(now - MAX_SKEW_SECONDS),
            format_amz_date(now)
        )));
    }
    if t > now + MAX_SKEW_SECONDS {
        return Err(ApiError::InvalidSignature(format!(
            "Signature not yet current: {amz_date} is still later than {} ({} + 5 min.)",
            format_amz_date(now + MAX_SKEW_SECONDS),
            format_amz_date(now)
        )));
    }
    Ok(Prechecked {
        access_key,
        secret,
        scope,
        amz_date,
        signed_headers: signed,
        signature,
    })
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~')
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

fn uri_encode(out: &mut Vec<u8>, bytes: &[u8], keep_slash: bool) {
    for &b in bytes {
        if is_unreserved(b) || (keep_slash && b == b'/') {
            out.push(b);
        } else {
            out.extend_from_slice(&[
                b'%',
                HEX_UPPER[usize::from(b >> 4)],
                HEX_UPPER[usize::from(b & 0xf)],
            ]);
        }
    }
}

/// The canonical URI: the path as sent, encoded once more (SigV4's double encoding for every
/// service but S3).
fn canonical_uri(out: &mut Vec<u8>, uri: &Uri) {
    let path = uri.path();
    if path.is_empty() {
        out.push(b'/');
    } else {
        uri_encode(out, path.as_bytes(), true);
    }
}

/// The canonical query: every pair decoded, encoded strictly, sorted.
fn canonical_query(out: &mut Vec<u8>, uri: &Uri) {
    let Some(query) = uri.query() else {
        return;
    };
    let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let mut ek = Vec::new();
            let mut ev = Vec::new();
            uri_encode(
                &mut ek,
                &percent_encoding::percent_decode_str(k).collect::<Vec<u8>>(),
                false,
            );
            uri_encode(
                &mut ev,
                &percent_encoding::percent_decode_str(v).collect::<Vec<u8>>(),
                false,
            );
            (ek, ev)
        })
        .collect();
    pairs.sort();
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push(b'&');
        }
        out.extend_from_slice(k);
        out.push(b'=');
        out.extend_from_slice(v);
    }
}

/// Appends a header's values as SigV4 canonicalizes them: each trimmed, each run of spaces as
/// one, joined by `,`; `false` when the request has no such header.
fn canonical_header_value(out: &mut Vec<u8>, headers: &HeaderMap, name: &str) -> bool {
    let mut any = false;
    for value in headers.get_all(name) {
        if any {
            out.push(b',');
        }
        any = true;
        let mut words = value
            .as_bytes()
            .split(|&b| b == b' ' || b == b'\t')
            .filter(|word| !word.is_empty());
        if let Some(first) = words.next() {
            out.extend_from_slice(first);
            for word in words {
                out.push(b' ');
                out.extend_from_slice(word);
            }
        }
    }
    any
}

const HEX_LOWER: &[u8; 16] = b"0123456789abcdef";

/// The two lower-case hex digits of `b`.
fn hex_pair(b: u8) -> [u8; 2] {
    [
        HEX_LOWER[usize::from(b >> 4)],
        HEX_LOWER[usize::from(b & 0xf)],
    ]
}

/// Lower-case hex of `bytes` (SigV4's hashes and signatures).
pub fn hex_lower(bytes: &[u8]) -> String {
    let out: Vec<u8> = bytes.iter().flat_map(|&b| hex_pair(b)).collect();
    // Only ASCII digits were written.
    String::from_utf8(out).unwrap_or_default()
}

/// Lower-case hex of a SHA-256 value, without allocating.
fn hex32(bytes: &[u8]) -> [u8; 64] {
    let mut out = [0u8; 64];
    for (pair, &b) in out.chunks_exact_mut(2).zip(bytes) {
        pair.copy_from_slice(&hex_pair(b));
    }
    out
}

type HmacSha256 = Hmac<Sha256>;

/// HMAC-SHA256 keyed with `key`.
fn keyed(key: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length; new_from_slice cannot fail for it.
    HmacSha256::new_from_slice(key).unwrap_or_else(|_| HmacSha256::new(&Default::default()))
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = keyed(key);
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// Signing keys derived on this thread, by secret and scope, as HMACs already keyed: a key
/// changes once a day per scope, so four of the five HMACs of a verification, and the keying of
/// the fifth, are done once, not per request.
const SIGNING_KEYS_KEPT: usize = 16;

thread_local! {
    static SIGNING_KEYS: std::cell::RefCell<Vec<(String, String, HmacSha256)>> =
        const { std::cell::RefCell::new(Vec::new()) };
    /// The canonical request being hashed, reused so that a verification allocates nothing.
    static CANONICAL: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The HMAC keyed with SigV4's signing key of `secret` for `scope`
/// (`date/region/service/aws4_request`).
fn signing_hmac(secret: &str, scope: &str) -> HmacSha256 {
    let cached = SIGNING_KEYS.with(|keys| {
        keys.borrow()
            .iter()
            .find(|(s, c, _)| s == secret && c == scope)
            .map(|(_, _, mac)| mac.clone())
    });
    if let Some(mac) = cached {
        return mac;
    }
    let mut parts = scope.split('/');
    let (date, region, service) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    let k_date = hmac(format!("AWS4{secret}").as_bytes(), date.as_bytes());
    let k_region = hmac(&k_date, region.as_bytes());
    let k_service = hmac(&k_region, service.as_bytes());
    let mac = keyed(&hmac(&k_service, b"aws4_request"));
    SIGNING_KEYS.with(|keys| {
        let mut keys = keys.borrow_mut();
        if keys.len() >= SIGNING_KEYS_KEPT {
            keys.remove(0);
        }
        keys.push((secret.to_string(), scope.to_string(), mac.clone()));
    });
    mac
}

/// Writes the canonical request of SigV4 for this request into `out`.
fn write_canonical_request(
    out: &mut Vec<u8>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    signed_headers: &str,
    payload_sha256_hex: &str,
) -> Result<(), ApiError> {
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b'\n');
    canonical_uri(out, uri);
    out.push(b'\n');
    canonical_query(out, uri);
    out.push(b'\n');
    for name in signed_headers.split(';') {
        out.extend_from_slice(name.as_bytes());
        out.push(b':');
        if !canonical_header_value(out, headers, name) {
            return Err(ApiError::InvalidSignature(format!(
                "The request signature we calculated does not match the signature you provided: signed header '{name}' is missing"
            )));
        }
        out.push(b'\n');
    }
    out.push(b'\n');
    out.extend_from_slice(signed_headers.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(payload_sha256_hex.as_bytes());
    Ok(())
}

/// The canonical request of SigV4 for this request.
pub fn canonical_request(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    signed_headers: &str,
    payload_sha256_hex: &str,
) -> Result<String, ApiError> {
    let mut out = Vec::with_capacity(512);
    write_canonical_request(
        &mut out,
        method,
        uri,
        headers,
        signed_headers,
        payload_sha256_hex,
    )?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Step two: recompute the signature over the request and its body hash, compare in constant time.
pub fn verify(
    pre: &Prechecked<'_>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    payload_sha256_hex: &str,
) -> Result<(), ApiError> {
    let Some(secret) = pre.secret else {
        // AcceptAnySigned: the header was well formed; no secret to check it against.
        return Ok(());
    };
    let creq_hash = CANONICAL.with(|buffer| {
        let mut buffer = buffer.borrow_mut();
        buffer.clear();
        let written = write_canonical_request(
            &mut buffer,
            method,
            uri,
            headers,
            pre.signed_headers,
            payload_sha256_hex,
        );
        written.map(|()| Sha256::digest(buffer.as_slice()))
    })?;
    let mut mac = signing_hmac(secret, pre.scope);
    mac.update(b"AWS4-HMAC-SHA256\n");
    mac.update(pre.amz_date.as_bytes());
    mac.update(b"\n");
    mac.update(pre.scope.as_bytes());
    mac.update(b"\n");
    mac.update(&hex32(&creq_hash));
    let expected = hex32(&mac.finalize().into_bytes());
    if bool::from(expected.as_slice().ct_eq(pre.signature.as_bytes())) {
        Ok(())
    } else {
        if tracing::enabled!(tracing::Level::DEBUG) {
            let creq =
                canonical_request(method, uri, headers, pre.signed_headers, payload_sha256_hex)
                    .unwrap_or_default();
            tracing::debug!(access_key = %pre.access_key, canonical_request = %creq, "signature mismatch");
        }
        Err(ApiError::InvalidSignature(
            "The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method. Consult the service documentation for details.".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_file_reports_every_bad_line() {
        let err = Auth::parse("# c\nAKID SECRET\nbad\nAKID OTHER\n").unwrap_err();
        assert!(err.contains("line 3") && err.contains("line 4"), "{err}");
        assert!(matches!(Auth::parse("A S\n\nB T"), Ok(Auth::Keys(k)) if k.len() == 2));
        assert!(Auth::parse("").is_err());
    }

    #[test]
    fn canonical_forms() {
        let uri: Uri = "/2015-03-31/functions/arn%3Aaws%3Alambda%3Aus-east-1%3A1%3Afunction%3Af/invocations?b=2&a=%24LATEST&a=1"
            .parse()
            .unwrap();
        let mut out = Vec::new();
        canonical_uri(&mut out, &uri);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "/2015-03-31/functions/arn%253Aaws%253Alambda%253Aus-east-1%253A1%253Afunction%253Af/invocations"
        );
        let mut out = Vec::new();
        canonical_query(&mut out, &uri);
        assert_eq!(String::from_utf8(out).unwrap(), "a=%24LATEST&a=1&b=2");
    }

    proptest::proptest! {
        #[test]
        fn precheck_never_panics(value in "\\PC{0,300}", date in "\\PC{0,20}") {
            let mut headers = HeaderMap::new();
            if let Ok(v) = axum::http::HeaderValue::from_str(&format!("AWS4-HMAC-SHA256 {value}")) {
                headers.insert("authorization", v);
            }
            if let Ok(v) = axum::http::HeaderValue::from_str(&date) {
                headers.insert("x-amz-date", v);
            }
            let auth = Auth::parse("AKID SECRET").unwrap();
            let _ = precheck(&auth, &headers, 1_800_000_000);
        }

        #[test]
        fn canonical_query_never_panics(query in "[ -~]{0,200}") {
            if let Ok(uri) = format!("/p?{query}").parse::<Uri>() {
                canonical_query(&mut Vec::new(), &uri);
            }
        }
    }

    /// Signs a request with the AWS SDK's own signer.
    fn sdk_signed(path_and_query: &str, headers: &[(String, String)], body: &[u8]) -> HeaderMap {
        use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
        let identity =
            aws_credential_types::Credentials::new("AKID", "SECRET", None, None, "t").into();
        let params = aws_sigv4::sign::v4::SigningParams::builder()
            .identity(&identity)
            .region("us-east-1")
            .name("lambda")
            .time(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000))
            .settings(SigningSettings::default())
            .build()
            .unwrap()
            .into();
        let uri = format!("http://localhost{path_and_query}");
        let signable = SignableRequest::new(
            "POST",
            uri,
            headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            SignableBody::Bytes(body),
        )
        .unwrap();
        let (instructions, _) = sign(signable, &params).unwrap().into_parts();
        let mut out = HeaderMap::new();
        for (k, v) in headers {
            out.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                axum::http::HeaderValue::from_str(v).unwrap(),
            );
        }
        for (k, v) in instructions.headers() {
            out.insert(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                axum::http::HeaderValue::from_str(v).unwrap(),
            );
        }
        out
    }

    proptest::proptest! {
        /// What the AWS SDK's signer signs verifies, and a changed body, header or path does not.
        #[test]
        fn sdk_signatures_verify(
            name in "([a-zA-Z0-9_-]|%3A){1,40}",
            query in proptest::option::of("[a-zA-Z0-9]{1,8}=([a-zA-Z0-9]|%24|%3A){0,12}(&[a-zA-Z]{1,5}=[a-z0-9]{0,5}){0,3}"),
            extra in proptest::collection::vec(("x-[a-z]{1,12}", "[!-~]([ -~]{0,30}[!-~])?"), 0..4),
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
        ) {
            let path = match &query {
                Some(q) => format!("/2015-03-31/functions/{name}/invocations?{q}"),
                None => format!("/2015-03-31/functions/{name}/invocations"),
            };
            let Ok(uri) = path.parse::<Uri>() else { return Ok(()); };
            let mut headers: Vec<(String, String)> = vec![("host".into(), "localhost".into())];
            headers.extend(extra.iter().cloned());
            let signed = sdk_signed(&path, &headers, &body);
            let auth = Auth::parse("AKID SECRET").unwrap();
            let pre = precheck(&auth, &signed, 1_800_000_000).unwrap();
            let sha = hex_lower(&Sha256::digest(&body));
            proptest::prop_assert!(verify(&pre, &Method::POST, &uri, &signed, &sha).is_ok(), "{path} {headers:?}");
            let other_sha = hex_lower(&Sha256::digest(b"other"));
            proptest::prop_assert!(verify(&pre, &Method::POST, &uri, &signed, &other_sha).is_err());
            let moved: Uri = format!("{path}x").parse().unwrap();
            proptest::prop_assert!(verify(&pre, &Method::POST, &moved, &signed, &sha).is_err());
            let mut changed = signed.clone();
            changed.insert("host", axum::http::HeaderValue::from_static("elsewhere"));
            proptest::prop_assert!(verify(&pre, &Method::POST, &uri, &changed, &sha).is_err());
        }
    }

    #[test]
    fn dates() {
        let t = parse_amz_date("20261128T173000Z").unwrap();
        assert_eq!(format_amz_date(t), "20261128T173000Z");
        assert!(parse_amz_date("2026-11-28").is_none());
        assert_eq!(parse_amz_date("19700101T000001Z"), Some(1));
        for bad in [
            "20261328T173000Z",
            "20260230T173000Z",
            "20261128T243000Z",
            "20261128T176000Z",
            "20261128 173000Z",
            "20261128T173000",
            "2026112xT173000Z",
            "+0261128T173000Z",
            "20261128T173000Zz",
        ] {
            assert!(parse_amz_date(bad).is_none(), "{bad}");
        }
        assert_eq!(
            hex_lower(&[0x00, 0x0f, 0xa5, 0xff]),
            hex::encode([0x00, 0x0f, 0xa5, 0xff])
        );
    }
}
