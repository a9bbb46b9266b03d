//! Function code: a base64 zip (or an object read from a bucket, see [`crate::buckets`]) is
//! checked, its central directory read (never extracted) to sum the unzipped size, then stored
//! content-addressed.

use std::io::Cursor;

use base64::Engine as _;

use crate::error::ApiError;
use crate::store::Store;

/// The largest zip accepted (50 MB).
pub const MAX_ZIPPED: usize = 50 * 1024 * 1024;
/// The largest sum of uncompressed sizes accepted (250 MB).
pub const MAX_UNZIPPED: u64 = 262_144_000;

#[derive(Debug, thiserror::Error)]
pub enum CodeError {
    #[error("the code is not valid base64")]
    Base64(#[source] base64::DecodeError),
    #[error("the code is not a readable zip")]
    Zip(#[source] zip::result::ZipError),
    #[error("the zip is larger than {MAX_ZIPPED} bytes")]
    ZippedTooLarge,
    #[error("the unzipped code would be larger than {MAX_UNZIPPED} bytes")]
    UnzippedTooLarge,
}

impl From<CodeError> for ApiError {
    fn from(err: CodeError) -> Self {
        match err {
            CodeError::Base64(_) | CodeError::Zip(_) => ApiError::InvalidParameterValue(
                "Could not unzip uploaded file. Please check your file, then try to upload again."
                    .into(),
            ),
            CodeError::ZippedTooLarge => ApiError::RequestEntityTooLarge(format!(
                "Zipped size must be smaller than {MAX_ZIPPED} bytes"
            )),
            CodeError::UnzippedTooLarge => ApiError::InvalidParameterValue(format!(
                "Unzipped size must be smaller than {MAX_UNZIPPED} bytes"
            )),
        }
    }
}

/// A stored code zip.
#[derive(Clone, Debug)]
pub struct CodeInfo {
    /// Base64 sha256, Lambda's `CodeSha256`.
    pub sha256_b64: String,
    /// Hex sha256, the code object's name.
    pub sha256_hex: String,
    /// Zip size in bytes, Lambda's `CodeSize`.
    pub size: u64,
    /// The sum of the entries' uncompressed sizes from the central directory.
    pub unzipped_size: u64,
}

/// Sums the uncompressed sizes the central directory declares.
pub fn unzipped_size(zip_bytes: &[u8]) -> Result<u64, CodeError> {
    let mut archive = zip::ZipArchive::new(Cursor::new(zip_bytes)).map_err(CodeError::Zip)?;
    let mut total: u64 = 0;
    for i in 0..archive.len() {
        let entry = archive.by_index_raw(i).map_err(CodeError::Zip)?;
        total = total.saturating_add(entry.size());
        if total > MAX_UNZIPPED {
            return Err(CodeError::UnzippedTooLarge);
        }
    }
    Ok(total)
}

/// Checks a zip's size, structure and unzipped size, without storing it.
pub fn inspect(zip_bytes: &[u8]) -> Result<CodeInfo, CodeError> {
    if zip_bytes.len() > MAX_ZIPPED {
        return Err(CodeError::ZippedTooLarge);
    }
    let unzipped_size = unzipped_size(zip_bytes)?;
    let (sha256_b64, sha256_hex) = crate::util::sha256_b64_hex(zip_bytes);
    Ok(CodeInfo {
        sha256_b64,
        sha256_hex,
        size: zip_bytes.len() as u64,
        unzipped_size,
    })
}

/// Decodes `ZipFile` (base64), checks it, and stores it unless `dry_run`. Blocking: run it off
/// the async threads.
pub fn accept_zip(store: &Store, zip_b64: &str, dry_run: bool) -> Result<CodeInfo, ApiError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(zip_b64.as_bytes())
        .map_err(CodeError::Base64)?;
    accept_bytes(store, &bytes, dry_run)
}

/// Checks a zip (size, structure, unzipped size) and stores it unless `dry_run`. Blocking.
pub fn accept_bytes(store: &Store, bytes: &[u8], dry_run: bool) -> Result<CodeInfo, ApiError> {
    let info = inspect(bytes)?;
    if !dry_run {
        store
            .put_code(&info.sha256_hex, bytes)
            .map_err(|e| ApiError::internal("storing the function code failed", &e))?;
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Write;

    fn zip_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        for (name, data) in files {
            w.start_file(
                *name,
                zip::write::SimpleFileOptions::default()
                    .compression_method(zip::CompressionMethod::Stored),
            )
            .unwrap();
            w.write_all(data).unwrap();
        }
        w.finish().unwrap().into_inner()
    }

    #[test]
    fn sums_central_directory_sizes() {
        let z = zip_of(&[("bootstrap", b"abc"), ("lib/x", &[0u8; 100])]);
        assert_eq!(inspect(&z).unwrap().unzipped_size, 103);
        assert!(matches!(inspect(b"not a zip"), Err(CodeError::Zip(_))));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = inspect(&bytes);
        }
    }
}
