//! The buckets that `Code.S3Bucket`/`S3Key` name: a local directory (a bucket is a folder under
//! it, a key a path inside that) or an S3-compatible server, both through the `object_store`
//! crate. An object is read under the zipped code limit, never past it.

use std::collections::HashMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt as _;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, GetResultPayload, ObjectStore, RetryConfig,
};

use crate::code::MAX_ZIPPED;
use crate::error::{ApiError, pattern_error};

/// Lambda's `S3Bucket` pattern (botocore's model), with its length of 3 to 63.
const BUCKET_PATTERN: &str = "^[0-9A-Za-z\\.\\-_]*(?<!\\.)$";
/// The longest `S3Key` and `S3ObjectVersion` the model allows.
const MAX_KEY_LEN: usize = 1024;
/// How many S3 bucket clients are kept; the cache is emptied when it is full.
const MAX_CACHED_BUCKETS: usize = 64;
/// Bounds one object fetch from an S3 server, retries included.
const S3_TIMEOUT: Duration = Duration::from_secs(60);

/// Where `S3Bucket`/`S3Key` are read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BucketsConfig {
    /// A directory: bucket `b`, key `k/x.zip` is the file `DIR/b/k/x.zip`.
    Local(PathBuf),
    /// An S3-compatible server at this endpoint (path-style requests); credentials and region
    /// from the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
    /// `AWS_REGION`).
    S3 { endpoint: String },
}

#[derive(Debug, thiserror::Error)]
pub enum BucketError {
    #[error("cannot create the object store directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the S3 endpoint {0:?} is not an http:// or https:// URL")]
    BadEndpoint(String),
    #[error("bucket name {0:?} does not match {BUCKET_PATTERN} (3 to 63 characters)")]
    BadBucket(String),
    #[error("S3 key {0:?} must be 1 to {MAX_KEY_LEN} characters")]
    BadKeyLength(String),
    #[error("S3 key {key:?} cannot be read from this object store")]
    BadKey {
        key: String,
        #[source]
        source: object_store::path::Error,
    },
    #[error("S3ObjectVersion must be 1 to {MAX_KEY_LEN} characters")]
    BadVersionLength,
    #[error("S3 key {key:?} leaves its bucket's folder (through a link)")]
    OutsideBucket { key: String },
    #[error("the local object store has no object versions")]
    VersionsUnsupported,
    #[error("the bucket {0} does not exist")]
    NoSuchBucket(String),
    #[error("the key {key} does not exist in {bucket}")]
    NoSuchKey { bucket: String, key: String },
    #[error("access to {bucket}/{key} was denied")]
    AccessDenied {
        bucket: String,
        key: String,
        #[source]
        source: object_store::Error,
    },
    #[error("the object {bucket}/{key} is larger than {MAX_ZIPPED} bytes")]
    TooLarge { bucket: String, key: String },
    #[error("reading {bucket}/{key} failed")]
    Read {
        bucket: String,
        key: String,
        #[source]
        source: object_store::Error,
    },
    #[error("reading {bucket}/{key} from disk failed")]
    ReadFile {
        bucket: String,
        key: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the object store client for {bucket} could not be built")]
    Client {
        bucket: String,
        #[source]
        source: object_store::Error,
    },
    #[error("the object read stopped")]
    Join(#[source] tokio::task::JoinError),
}

/// Lambda's message for a failed GetObject.
fn get_object_error(code: &str, message: &str) -> ApiError {
    ApiError::InvalidParameterValue(format!(
        "Error occurred while GetObject. S3 Error Code: {code}. S3 Error Message: {message}"
    ))
}

impl From<BucketError> for ApiError {
    fn from(err: BucketError) -> Self {
        match err {
            BucketError::BadBucket(bucket) => {
                pattern_error("code.s3Bucket", &bucket, BUCKET_PATTERN)
            }
            BucketError::BadKeyLength(_) => ApiError::Validation(format!(
                "1 validation error detected: Value at 'code.s3Key' failed to satisfy constraint: Member must have length between 1 and {MAX_KEY_LEN}"
            )),
            BucketError::BadVersionLength => ApiError::Validation(format!(
                "1 validation error detected: Value at 'code.s3ObjectVersion' failed to satisfy constraint: Member must have length between 1 and {MAX_KEY_LEN}"
            )),
            BucketError::OutsideBucket { key } => ApiError::InvalidParameterValue(format!(
                "S3Key {key:?} leads outside its bucket."
            )),
            BucketError::BadKey { key, .. } => ApiError::InvalidParameterValue(format!(
                "S3Key {key:?} is not a key Hearth can read: it must not contain empty, '.' or '..' segments or control characters."
            )),
            BucketError::VersionsUnsupported => ApiError::InvalidParameterValue(
                "S3ObjectVersion is not supported by Hearth's local object store, which keeps one version of each object: remove S3ObjectVersion, or serve code from an S3-compatible store (--s3-endpoint).".into(),
            ),
            BucketError::NoSuchBucket(_) => {
                get_object_error("NoSuchBucket", "The specified bucket does not exist")
            }
            BucketError::NoSuchKey { .. } => {
                get_object_error("NoSuchKey", "The specified key does not exist.")
            }
            BucketError::AccessDenied { .. } => get_object_error("AccessDenied", "Access Denied"),
            BucketError::TooLarge { .. } => ApiError::InvalidParameterValue(format!(
                "Zipped size must be smaller than {MAX_ZIPPED} bytes"
            )),
            err @ (BucketError::CreateDir { .. }
            | BucketError::BadEndpoint(_)
            | BucketError::Read { .. }
            | BucketError::ReadFile { .. }
            | BucketError::Client { .. }
            | BucketError::Join(_)) => {
                ApiError::internal("Error occurred while GetObject", &err)
            }
        }
    }
}

/// The configured object store, ready to read function code from.
#[derive(Debug)]
pub struct Buckets {
    backend: Backend,
}

#[derive(Debug)]
enum Backend {
    Local {
        root: PathBuf,
    },
    S3 {
        endpoint: String,
        /// One client per bucket (object_store binds a client to its bucket).
        clients: Mutex<HashMap<String, Arc<dyn ObjectStore>>>,
    },
}

/// Checks `S3Bucket` against Lambda's pattern: 3 to 63 of `[0-9A-Za-z.\-_]`, not ending in `.`.
/// This also keeps a local bucket one plain folder name (never `.`, `..` or a path).
fn check_bucket(bucket: &str) -> Result<(), BucketError> {
    let ok = (3..=63).contains(&bucket.len())
        && bucket
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        && !bucket.ends_with('.');
    if ok {
        Ok(())
    } else {
        Err(BucketError::BadBucket(bucket.to_string()))
    }
}

/// Parses `S3Key` as an object path. `object_store` refuses `.` and `..` segments, empty
/// segments and control characters, so a local key cannot leave its bucket's folder.
fn object_path(key: &str) -> Result<object_store::path::Path, BucketError> {
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(BucketError::BadKeyLength(key.to_string()));
    }
    object_store::path::Path::parse(key).map_err(|source| BucketError::BadKey {
        key: key.to_string(),
        source,
    })
}

impl Buckets {
    /// Opens the configured store: creates the local directory, or checks the endpoint.
    pub fn open(config: &BucketsConfig) -> Result<Self, BucketError> {
        let backend = match config {
            BucketsConfig::Local(dir) => {
                std::fs::create_dir_all(dir).map_err(|source| BucketError::CreateDir {
                    path: dir.clone(),
                    source,
                })?;
                Backend::Local { root: dir.clone() }
            }
            BucketsConfig::S3 { endpoint } => {
                if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                    return Err(BucketError::BadEndpoint(endpoint.clone()));
                }
                Backend::S3 {
                    endpoint: endpoint.trim_end_matches('/').to_string(),
                    clients: Mutex::new(HashMap::new()),
                }
            }
        };
        Ok(Self { backend })
    }

    /// The store `hearth serve` uses: `--s3-endpoint` when given, else `--object-store-dir`,
    /// else `<data-dir>/objects`.
    pub fn open_for_serve(
        data_dir: &Path,
        object_store_dir: Option<&Path>,
        s3_endpoint: Option<&str>,
    ) -> Result<Self, BucketError> {
        let config = match (s3_endpoint, object_store_dir) {
            (Some(endpoint), _) => BucketsConfig::S3 {
                endpoint: endpoint.to_string(),
            },
            (None, Some(dir)) => BucketsConfig::Local(dir.to_path_buf()),
            (None, None) => BucketsConfig::Local(data_dir.join("objects")),
        };
        match &config {
            BucketsConfig::Local(dir) => {
                tracing::info!(dir = %dir.display(), "S3Bucket/S3Key code is read from a local directory");
            }
            BucketsConfig::S3 { endpoint } => {
                tracing::info!(%endpoint, "S3Bucket/S3Key code is read from an S3-compatible server");
            }
        }
        Self::open(&config)
    }

    /// The local directory, when the store is one.
    pub fn local_root(&self) -> Option<&Path> {
        match &self.backend {
            Backend::Local { root } => Some(root),
            Backend::S3 { .. } => None,
        }
    }

    /// Reads one object whole, refusing it once it passes the zipped code limit.
    pub async fn fetch(
        &self,
        bucket: &str,
        key: &str,
        version: Option<&str>,
    ) -> Result<Vec<u8>, BucketError> {
        check_bucket(bucket)?;
        let path = object_path(key)?;
        if version.is_some_and(|v| v.is_empty() || v.len() > MAX_KEY_LEN) {
            return Err(BucketError::BadVersionLength);
        }
        let store = self.client(bucket, version.is_some())?;
        if let Backend::Local { root } = &self.backend {
            check_inside(&root.join(bucket), &path, bucket, key)?;
        }
        let options = GetOptions {
            version: version.map(str::to_string),
            ..GetOptions::default()
        };
        let result = store
            .get_opts(&path, options)
            .await
            .map_err(|e| classify(e, bucket, key))?;
        if result.meta.size > MAX_ZIPPED as u64 {
            return Err(too_large(bucket, key));
        }
        let capacity = usize::try_from(result.meta.size).unwrap_or(0);
        match result.payload {
            GetResultPayload::File(file, _) => {
                let (bucket, key) = (bucket.to_string(), key.to_string());
                tokio::task::spawn_blocking(move || read_file_capped(file, capacity, bucket, key))
                    .await
                    .map_err(BucketError::Join)?
            }
            GetResultPayload::Stream(mut stream) => {
                let mut buf = Vec::with_capacity(capacity);
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.map_err(|e| classify(e, bucket, key))?;
                    if buf.len() + chunk.len() > MAX_ZIPPED {
                        return Err(too_large(bucket, key));
                    }
                    buf.extend_from_slice(&chunk);
                }
                Ok(buf)
            }
        }
    }

    /// The client for one bucket: a local folder (checked to exist), or a cached S3 client.
    fn client(&self, bucket: &str, versioned: bool) -> Result<Arc<dyn ObjectStore>, BucketError> {
        match &self.backend {
            Backend::Local { root } => {
                if versioned {
                    return Err(BucketError::VersionsUnsupported);
                }
                let dir = root.join(bucket);
                if !dir.is_dir() {
                    return Err(BucketError::NoSuchBucket(bucket.to_string()));
                }
                let fs = LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|_| BucketError::NoSuchBucket(bucket.to_string()))?;
                Ok(Arc::new(fs))
            }
            Backend::S3 { endpoint, clients } => {
                let mut clients = clients
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if let Some(client) = clients.get(bucket) {
                    return Ok(client.clone());
                }
                let client: Arc<dyn ObjectStore> = Arc::new(s3_client(endpoint, bucket)?);
                if clients.len() >= MAX_CACHED_BUCKETS {
                    clients.clear();
                }
                clients.insert(bucket.to_string(), client.clone());
                Ok(client)
            }
        }
    }
}

/// An S3 client for one bucket at `endpoint`, credentials and region from the environment.
fn s3_client(endpoint: &str, bucket: &str) -> Result<object_store::aws::AmazonS3, BucketError> {
    let region = std::env::var("AWS_REGION")
        .or_else(|_| std::env::var("AWS_DEFAULT_REGION"))
        .unwrap_or_else(|_| "us-east-1".to_string());
    let retry = RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            base: 2.0,
        },
        max_retries: 3,
        retry_timeout: S3_TIMEOUT,
    };
    let options = ClientOptions::new()
        .with_allow_http(endpoint.starts_with("http://"))
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(S3_TIMEOUT);
    AmazonS3Builder::from_env()
        .with_endpoint(endpoint)
        .with_region(region)
        .with_bucket_name(bucket)
        .with_virtual_hosted_style_request(false)
        .with_retry(retry)
        .with_client_options(options)
        .build()
        .map_err(|source| BucketError::Client {
            bucket: bucket.to_string(),
            source,
        })
}

/// Refuses a local key that a symbolic link leads out of its bucket's folder. A missing object
/// is left to the read, which reports it as `NoSuchKey`.
fn check_inside(
    dir: &Path,
    path: &object_store::path::Path,
    bucket: &str,
    key: &str,
) -> Result<(), BucketError> {
    let file = path
        .parts()
        .fold(dir.to_path_buf(), |p, part| p.join(part.as_ref()));
    let (Ok(dir), Ok(file)) = (std::fs::canonicalize(dir), std::fs::canonicalize(&file)) else {
        return Ok(());
    };
    if file.starts_with(&dir) {
        Ok(())
    } else {
        tracing::warn!(bucket, key, target = %file.display(), "S3Key leads outside its bucket");
        Err(BucketError::OutsideBucket {
            key: key.to_string(),
        })
    }
}

fn too_large(bucket: &str, key: &str) -> BucketError {
    BucketError::TooLarge {
        bucket: bucket.to_string(),
        key: key.to_string(),
    }
}

/// Reads a local object, at most one byte past the limit.
fn read_file_capped(
    file: std::fs::File,
    capacity: usize,
    bucket: String,
    key: String,
) -> Result<Vec<u8>, BucketError> {
    let mut buf = Vec::with_capacity(capacity);
    file.take(MAX_ZIPPED as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|source| BucketError::ReadFile {
            bucket: bucket.clone(),
            key: key.clone(),
            source,
        })?;
    if buf.len() > MAX_ZIPPED {
        return Err(BucketError::TooLarge { bucket, key });
    }
    Ok(buf)
}

/// Sorts an `object_store` failure into the S3 error Lambda would report.
fn classify(err: object_store::Error, bucket: &str, key: &str) -> BucketError {
    let (bucket, key) = (bucket.to_string(), key.to_string());
    match err {
        object_store::Error::NotFound { ref source, .. } => {
            if source.to_string().contains("NoSuchBucket") {
                BucketError::NoSuchBucket(bucket)
            } else {
                BucketError::NoSuchKey { bucket, key }
            }
        }
        source @ (object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. }) => BucketError::AccessDenied {
            bucket,
            key,
            source,
        },
        source => BucketError::Read {
            bucket,
            key,
            source,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_names_follow_lambdas_pattern() {
        for good in ["abc", "my-bucket.v2", "A_b-c", &"x".repeat(63)] {
            assert!(check_bucket(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "ab",
            "..",
            "...",
            "a/b/c",
            "abc.",
            "a b",
            &"x".repeat(64),
            "../x",
        ] {
            assert!(check_bucket(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_cannot_leave_the_bucket() {
        assert_eq!(object_path("a/b.zip").unwrap().as_ref(), "a/b.zip");
        assert_eq!(object_path("/a/b.zip").unwrap().as_ref(), "a/b.zip");
        for bad in ["../x.zip", "a/../../x", "a/./b", "a//b", "x\u{0}y", ""] {
            assert!(object_path(bad).is_err(), "{bad:?}");
        }
        assert!(object_path(&"k".repeat(1025)).is_err());
    }

    #[test]
    fn a_missing_key_is_lambdas_no_such_key() {
        let err: ApiError = BucketError::NoSuchKey {
            bucket: "b".into(),
            key: "k".into(),
        }
        .into();
        assert_eq!(err.type_name(), "InvalidParameterValueException");
        assert_eq!(
            err.to_string(),
            "Error occurred while GetObject. S3 Error Code: NoSuchKey. S3 Error Message: The specified key does not exist."
        );
    }
}
