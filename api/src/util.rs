//! Small helpers: request and revision ids, Lambda's timestamp formats, base64 of sha256.

use base64::Engine as _;
use rand::RngCore as _;
use sha2::{Digest, Sha256};

/// `n` random bytes as lowercase hex.
pub fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// A random (version 4) UUID, as Lambda's request and revision ids look.
pub fn uuid_v4() -> String {
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = crate::auth::hex_lower(&b);
    let mut id = String::with_capacity(36);
    for (i, part) in [0..8, 8..12, 12..16, 16..20, 20..32]
        .into_iter()
        .enumerate()
    {
        if i > 0 {
            id.push('-');
        }
        id.push_str(&h[part]);
    }
    id
}

/// Now, as Lambda writes `LastModified` in a function configuration: `2026-11-28T17:32:25.123+0000`.
pub fn lambda_timestamp_now() -> String {
    let now = time::OffsetDateTime::now_utc();
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]+0000"
    );
    now.format(&format)
        .unwrap_or_else(|_| "1970-01-01T00:00:00.000+0000".to_string())
}

/// Now as seconds since the epoch with milliseconds (the JSON `timestamp` of rest-json).
pub fn epoch_seconds_now() -> f64 {
    let now = time::OffsetDateTime::now_utc();
    (now.unix_timestamp_nanos() / 1_000_000) as f64 / 1000.0
}

/// The sha256 of `bytes`, base64 (Lambda's `CodeSha256`) and hex (our file names).
pub fn sha256_b64_hex(bytes: &[u8]) -> (String, String) {
    let digest = Sha256::digest(bytes);
    (
        base64::engine::general_purpose::STANDARD.encode(digest),
        hex::encode(digest),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        let id = uuid_v4();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        for dash in [8, 13, 18, 23] {
            assert_eq!(&id[dash..dash + 1], "-", "{id}");
        }
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"), "{id}");
        assert_eq!(id.chars().filter(char::is_ascii_hexdigit).count(), 32);
        let ts = lambda_timestamp_now();
        assert!(ts.ends_with("+0000") && ts.len() == 28, "{ts}");
        let (b64, hex) = sha256_b64_hex(b"");
        assert_eq!(b64, "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=");
        assert_eq!(hex.len(), 64);
    }
}
