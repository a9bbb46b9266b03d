//! `hearth-api`: the AWS Lambda HTTP API (control plane and Invoke) that Hearth serves.
//!
//! Owns: the HTTP frontend (axum and hyper; a connection's Invoke requests are served by
//! [`invoke_connection`] without hyper until its first other request), SigV4 authentication,
//! Lambda-shaped errors, the embedded metadata store of functions, versions, aliases and
//! settings, and reading `S3Bucket`/`S3Key` code from the configured object store ([`buckets`]).
//!
//! Relies on: the agent for every invoke, through the [`Invoker`] trait: `invoker::LocalInvoker`
//! hands the invoke-proxy requests to the cores of the agent `hearth serve` starts in the same
//! process, `invoker::ProxyInvoker` sends them over the agent's invoke-proxy socket
//! (`--invoke-path socket`); [`NoAgent`] answers every invoke with a `ServiceException` where no
//! agent runs.
//! Event invokes answer a clear `ServiceException` until the agent's durable async queue exists.
//!
//! Must not touch: sandboxes or VMs directly; every invoke goes through the agent.
#![forbid(unsafe_code)]

pub mod auth;
pub mod body;
pub mod buckets;
pub mod cli;
pub mod code;
pub mod error;
pub mod invoke_connection;
pub mod invoker;
pub mod model;
pub mod names;
pub mod routes;
pub mod server;
pub mod service;
pub mod store;
pub mod util;

use std::sync::Arc;

use axum::Router;

pub use auth::Auth;
pub use error::ApiError;
pub use invoker::{InvocationType, InvokeRequest, InvokeResponse, Invoker, NoAgent};
pub use names::Partition;
pub use service::ApiService;
pub use store::Store;

/// Everything the handlers share.
#[derive(Clone, Debug)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    auth: Auth,
    partition: Partition,
    invoker: Arc<dyn Invoker>,
    /// Bounds the code uploads held in memory at once.
    code_uploads: tokio::sync::Semaphore,
    /// Resolved invoke targets, tagged with the store generation they were read at.
    invoke_cache: routes::invoke::InvokeCache,
    /// Where `S3Bucket`/`S3Key` code is read from; set once by [`AppState::with_buckets`].
    buckets: std::sync::OnceLock<buckets::Buckets>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("store", &self.store)
            .field("auth", &self.auth)
            .field("partition", &self.partition)
            .finish_non_exhaustive()
    }
}

impl AppState {
    /// Builds the state from an open store, the access policy, the region/account the ARNs
    /// name, and the invoke path.
    pub fn new(store: Store, auth: Auth, partition: Partition, invoker: Arc<dyn Invoker>) -> Self {
        let code_uploads = tokio::sync::Semaphore::new(body::CONCURRENT_CODE_UPLOADS);
        Self {
            inner: Arc::new(Inner {
                store,
                auth,
                partition,
                invoker,
                code_uploads,
                invoke_cache: routes::invoke::InvokeCache::default(),
                buckets: std::sync::OnceLock::new(),
            }),
        }
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn partition(&self) -> &Partition {
        &self.inner.partition
    }

    /// Serves `S3Bucket`/`S3Key` code from `buckets` (without it, such code is refused). Set it
    /// once, before serving; a second call is ignored.
    pub fn with_buckets(self, buckets: buckets::Buckets) -> Self {
        if self.inner.buckets.set(buckets).is_err() {
            tracing::warn!("the object store was already set; keeping the first");
        }
        self
    }

    /// The object store `S3Bucket`/`S3Key` name, when one is configured.
    pub fn buckets(&self) -> Option<&buckets::Buckets> {
        self.inner.buckets.get()
    }

    /// Brings every function left `Pending` or `InProgress` (by a crash or restart) to its final
    /// state. Called once at start-up.
    pub fn finish_pending(&self) {
        routes::functions::finish_all_pending(self);
    }

    /// Deletes code objects that no function or version uses any more (a deleted function's
    /// code stays on disk until then). Call it at start-up, before serving.
    pub fn collect_garbage(&self) {
        routes::functions::collect_unreferenced_code(self);
    }
}

/// The whole Lambda API as one router: every route group, the unknown-route fallback, request
/// ids, body limits and SigV4.
pub fn app(state: AppState) -> Router {
    routes::router()
        .fallback(body::unknown_operation)
        .method_not_allowed_fallback(body::unknown_operation)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            body::authenticate,
        ))
        .layer(axum::middleware::from_fn(body::request_id))
        .with_state(state)
}
