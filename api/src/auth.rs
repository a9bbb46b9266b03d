//! SigV4 verification of requests signed by the AWS SDKs and CLI (header form,
//! `Authorization: AWS4-HMAC-SHA256 Credential=..., SignedHeaders=..., Signature=...`).
//!
//! The check runs in two steps: `precheck` before the body is read (header syntax, known access
//! key, clock skew), `verify` once the body's sha256 is known.

use std::collections::HashMap;
use std::fmt::Write as _;
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

/// The parts of an `Authorization` header, checked before the body is read.
#[derive(Debug)]
pub struct Prechecked {
    access_key: String,
    secret: Option<String>,
    scope: String,
    amz_date: String,
    signed_headers: Vec<String>,
    signature: String,
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
pub fn precheck(auth: &Auth, headers: &HeaderMap, now: i64) -> Result<Prechecked, ApiError> {
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
    let scope_parts: Vec<&str> = scope.split('/').collect();
    if scope_parts.len() != 4 || scope_parts[3] != "aws4_request" {
        return Err(incomplete(
            "Credential must have the form KEY/date/region/service/aws4_request",
        ));
    }
    if scope_parts[2] != "lambda" {
        return Err(ApiError::InvalidSignature(format!(
            "Credential should be scoped to correct service: 'lambda', not '{}'",
            scope_parts[2]
        )));
    }
    let signed_headers: Vec<String> = signed.split(';').map(str::to_string).collect();
    if !signed_headers.iter().any(|h| h == "host") {
        return Err(ApiError::InvalidSignature(
            "'Host' must be a 'SignedHeader' in the AWS Authorization.".into(),
        ));
    }
    let secret = match auth {
        Auth::Keys(keys) => match keys.get(access_key) {
            Some(secret) => Some(secret.clone()),
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
    if !amz_date.starts_with(scope_parts[0]) {
        return Err(ApiError::InvalidSignature(format!(
            "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP: '{}' != '{}'",
            scope_parts[0],
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
        access_key: access_key.to_string(),
        secret,
        scope: scope.to_string(),
        amz_date: amz_date.to_string(),
        signed_headers,
        signature: signature.to_string(),
    })
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~')
}

fn uri_encode(out: &mut String, bytes: &[u8], keep_slash: bool) {
    for &b in bytes {
        if is_unreserved(b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

/// The canonical URI: the path as sent, encoded once more (SigV4's double encoding for every
/// service but S3).
fn canonical_uri(uri: &Uri) -> String {
    let path = uri.path();
    let mut out = String::with_capacity(path.len() + 16);
    if path.is_empty() {
        out.push('/');
    } else {
        uri_encode(&mut out, path.as_bytes(), true);
    }
    out
}

/// The canonical query: every pair decoded, encoded strictly, sorted.
fn canonical_query(uri: &Uri) -> String {
    let Some(query) = uri.query() else {
        return String::new();
    };
    let mut pairs: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let mut ek = String::new();
            let mut ev = String::new();
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
    let mut out = String::new();
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(k);
        out.push('=');
        out.push_str(v);
    }
    out
}

fn canonical_header_value(headers: &HeaderMap, name: &str) -> Option<String> {
    let mut values = headers.get_all(name).iter().peekable();
    values.peek()?;
    let mut joined = String::new();
    for (i, v) in values.enumerate() {
        if i > 0 {
            joined.push(',');
        }
        let v = String::from_utf8_lossy(v.as_bytes());
        // Trimmed, with each run of spaces as one; most values are that already.
        let mut words = v.split_whitespace();
        if let Some(first) = words.next() {
            joined.push_str(first);
            for word in words {
                joined.push(' ');
                joined.push_str(word);
            }
        }
    }
    Some(joined)
}

/// Lower-case hex of `bytes` (SigV4's hashes and signatures).
pub fn hex_lower(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = Vec::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(DIGITS[usize::from(b >> 4)]);
        out.push(DIGITS[usize::from(b & 0xf)]);
    }
    // Only ASCII digits were written.
    String::from_utf8(out).unwrap_or_default()
}

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length; new_from_slice cannot fail for it.
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => return [0; 32],
    };
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// Signing keys derived on this thread, by secret and scope: a key changes once a day per
/// scope, so four of the five HMACs of a verification are done once, not per request.
const SIGNING_KEYS_KEPT: usize = 16;

thread_local! {
    static SIGNING_KEYS: std::cell::RefCell<Vec<(String, String, [u8; 32])>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// SigV4's signing key of `secret` for `scope` (`date/region/service/aws4_request`).
fn signing_key(secret: &str, scope: &str) -> [u8; 32] {
    let cached = SIGNING_KEYS.with(|keys| {
        keys.borrow()
            .iter()
            .find(|(s, c, _)| s == secret && c == scope)
            .map(|(_, _, key)| *key)
    });
    if let Some(key) = cached {
        return key;
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
    let key = hmac(&k_service, b"aws4_request");
    SIGNING_KEYS.with(|keys| {
        let mut keys = keys.borrow_mut();
        if keys.len() >= SIGNING_KEYS_KEPT {
            keys.remove(0);
        }
        keys.push((secret.to_string(), scope.to_string(), key));
    });
    key
}

/// The canonical request of SigV4 for this request.
pub fn canonical_request(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    signed_headers: &[String],
    payload_sha256_hex: &str,
) -> Result<String, ApiError> {
    let mut out = String::with_capacity(512);
    out.push_str(method.as_str());
    out.push('\n');
    out.push_str(&canonical_uri(uri));
    out.push('\n');
    out.push_str(&canonical_query(uri));
    out.push('\n');
    for name in signed_headers {
        let value = canonical_header_value(headers, name).ok_or_else(|| {
            ApiError::InvalidSignature(format!("The request signature we calculated does not match the signature you provided: signed header '{name}' is missing"))
        })?;
        out.push_str(name);
        out.push(':');
        out.push_str(&value);
        out.push('\n');
    }
    out.push('\n');
    out.push_str(&signed_headers.join(";"));
    out.push('\n');
    out.push_str(payload_sha256_hex);
    Ok(out)
}

/// Step two: recompute the signature over the request and its body hash, compare in constant time.
pub fn verify(
    pre: &Prechecked,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    payload_sha256_hex: &str,
) -> Result<(), ApiError> {
    let Some(secret) = &pre.secret else {
        // AcceptAnySigned: the header was well formed; no secret to check it against.
        return Ok(());
    };
    let creq = canonical_request(
        method,
        uri,
        headers,
        &pre.signed_headers,
        payload_sha256_hex,
    )?;
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{}\n{}\n{}",
        pre.amz_date,
        pre.scope,
        hex_lower(&Sha256::digest(creq.as_bytes()))
    );
    let k_signing = signing_key(secret, &pre.scope);
    let expected = hex_lower(&hmac(&k_signing, string_to_sign.as_bytes()));
    if bool::from(expected.as_bytes().ct_eq(pre.signature.as_bytes())) {
        Ok(())
    } else {
        tracing::debug!(access_key = %pre.access_key, canonical_request = %creq, "signature mismatch");
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
        assert_eq!(
            canonical_uri(&uri),
            "/2015-03-31/functions/arn%253Aaws%253Alambda%253Aus-east-1%253A1%253Afunction%253Af/invocations"
        );
        assert_eq!(canonical_query(&uri), "a=%24LATEST&a=1&b=2");
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
                let _ = canonical_query(&uri);
            }
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
