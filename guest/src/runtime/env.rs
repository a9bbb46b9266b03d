//! The environment Lambda gives a `provided` runtime, plus the function's own variables.

use std::collections::BTreeMap;

use crate::protocol::function::Bundle;

/// Names a function may not set (Lambda refuses them at configuration time).
pub const RESERVED: &[&str] = &[
    "_HANDLER",
    "_X_AMZN_TRACE_ID",
    "AWS_ACCESS_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_DEFAULT_REGION",
    "AWS_EXECUTION_ENV",
    "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
    "AWS_LAMBDA_FUNCTION_NAME",
    "AWS_LAMBDA_FUNCTION_VERSION",
    "AWS_LAMBDA_INITIALIZATION_TYPE",
    "AWS_LAMBDA_LOG_GROUP_NAME",
    "AWS_LAMBDA_LOG_STREAM_NAME",
    "AWS_LAMBDA_MAX_CONCURRENCY",
    "AWS_LAMBDA_RUNTIME_API",
    "AWS_REGION",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "LAMBDA_RUNTIME_DIR",
    "LAMBDA_TASK_ROOT",
];

/// A function variable that may not be set.
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    #[error(
        "Lambda was unable to configure your environment variables because the environment variables \
         you have provided contains reserved keys that are currently not supported for modification. \
         Reserved keys used in this request: {0}"
    )]
    Reserved(String),
    #[error("Lambda was unable to configure your environment variables: invalid name {0:?}")]
    InvalidName(String),
}

/// Where things are inside the sandbox.
#[derive(Debug, Clone)]
pub struct Paths {
    pub task_root: String,
    pub runtime_dir: String,
    /// `host:port` of the Runtime API.
    pub runtime_api: String,
}

/// Builds the runtime's full environment (nothing is inherited from the init).
pub fn build(bundle: &Bundle, paths: &Paths) -> Result<BTreeMap<String, String>, EnvError> {
    let mut reserved_used = Vec::new();
    for (k, _) in &bundle.env {
        if RESERVED.contains(&k.as_str()) {
            reserved_used.push(k.clone());
        } else if k.is_empty()
            || k.contains('=')
            || k.contains('\0')
            || !k.starts_with(|c: char| c.is_ascii_alphabetic())
        {
            return Err(EnvError::InvalidName(k.clone()));
        }
    }
    if !reserved_used.is_empty() {
        return Err(EnvError::Reserved(reserved_used.join(",")));
    }
    let mut env = BTreeMap::new();
    let mut set = |k: &str, v: String| {
        env.insert(k.to_string(), v);
    };
    let t = &paths.task_root;
    let r = &paths.runtime_dir;
    set("PATH", "/usr/local/bin:/usr/bin/:/bin:/opt/bin".into());
    set(
        "LD_LIBRARY_PATH",
        format!("/lib64:/usr/lib64:{r}:{r}/lib:{t}:{t}/lib:/opt/lib"),
    );
    set("LANG", "en_US.UTF-8".into());
    set("TZ", ":UTC".into());
    set("LAMBDA_TASK_ROOT", t.clone());
    set("LAMBDA_RUNTIME_DIR", r.clone());
    set("_HANDLER", bundle.handler.clone());
    set("AWS_LAMBDA_FUNCTION_NAME", bundle.function_name.clone());
    set(
        "AWS_LAMBDA_FUNCTION_VERSION",
        bundle.function_version.clone(),
    );
    set(
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
        bundle.memory_mb.to_string(),
    );
    set("AWS_LAMBDA_RUNTIME_API", paths.runtime_api.clone());
    set("AWS_LAMBDA_LOG_GROUP_NAME", bundle.log_group.clone());
    set("AWS_LAMBDA_LOG_STREAM_NAME", bundle.log_stream.clone());
    set("AWS_LAMBDA_INITIALIZATION_TYPE", "on-demand".into());
    set("AWS_REGION", bundle.region.clone());
    set("AWS_DEFAULT_REGION", bundle.region.clone());
    if bundle.max_concurrency > 1 {
        set(
            "AWS_LAMBDA_MAX_CONCURRENCY",
            bundle.max_concurrency.to_string(),
        );
    }
    if let Some(c) = &bundle.credentials {
        set("AWS_ACCESS_KEY_ID", c.access_key_id.clone());
        set("AWS_SECRET_ACCESS_KEY", c.secret_access_key.clone());
        if let Some(token) = &c.session_token {
            set("AWS_SESSION_TOKEN", token.clone());
        }
    }
    // The function's own variables may override PATH, LANG, TZ, LD_LIBRARY_PATH and the like.
    for (k, v) in &bundle.env {
        env.insert(k.clone(), v.clone());
    }
    Ok(env)
}

/// A bundle for tests.
#[cfg(test)]
pub(crate) fn tests_bundle(env: Vec<(&str, &str)>) -> Bundle {
    tests::bundle(env)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn bundle(env: Vec<(&str, &str)>) -> Bundle {
        Bundle {
            function_name: "f".into(),
            function_version: "$LATEST".into(),
            function_arn: "arn:aws:lambda:us-east-1:000000000000:function:f".into(),
            runtime: "provided.al2023".into(),
            handler: "bootstrap".into(),
            memory_mb: 128,
            timeout_ms: 3000,
            region: "us-east-1".into(),
            log_group: "/aws/lambda/f".into(),
            log_stream: "s".into(),
            env: env
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            credentials: None,
            max_concurrency: 1,
            code_len: 0,
        }
    }

    fn paths() -> Paths {
        Paths {
            task_root: "/var/task".into(),
            runtime_dir: "/var/runtime".into(),
            runtime_api: "127.0.0.1:9001".into(),
        }
    }

    #[test]
    fn gives_lambdas_variables_and_the_functions_own() {
        let env = build(
            &bundle(vec![("GREETING", "hi"), ("TZ", "Europe/Paris")]),
            &paths(),
        )
        .unwrap();
        assert_eq!(env["AWS_LAMBDA_RUNTIME_API"], "127.0.0.1:9001");
        assert_eq!(env["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"], "128");
        assert_eq!(env["LAMBDA_TASK_ROOT"], "/var/task");
        assert_eq!(env["GREETING"], "hi");
        assert_eq!(env["TZ"], "Europe/Paris");
        assert!(!env.contains_key("AWS_LAMBDA_MAX_CONCURRENCY"));
    }

    #[test]
    fn gives_credentials_and_concurrency_when_configured() {
        let mut b = bundle(vec![]);
        b.credentials = Some(crate::protocol::function::Credentials {
            access_key_id: "AKID".into(),
            secret_access_key: "secret".into(),
            session_token: Some("token".into()),
        });
        b.max_concurrency = 4;
        let env = build(&b, &paths()).unwrap();
        assert_eq!(env["AWS_ACCESS_KEY_ID"], "AKID");
        assert_eq!(env["AWS_SECRET_ACCESS_KEY"], "secret");
        assert_eq!(env["AWS_SESSION_TOKEN"], "token");
        assert_eq!(env["AWS_LAMBDA_MAX_CONCURRENCY"], "4");
    }

    #[test]
    fn refuses_reserved_names() {
        let err = build(
            &bundle(vec![("AWS_REGION", "x"), ("_HANDLER", "y")]),
            &paths(),
        )
        .unwrap_err();
        assert!(err.to_string().ends_with("AWS_REGION,_HANDLER"), "{err}");
        assert!(build(&bundle(vec![("A=B", "x")]), &paths()).is_err());
    }
}
