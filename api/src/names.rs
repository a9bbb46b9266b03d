//! Function names, qualifiers and ARNs: Lambda accepts a bare name, a partial ARN
//! (`123456789012:function:name`) or a full ARN, each optionally with `:qualifier`.

use crate::error::{ApiError, pattern_error};

const NAME_PATTERN: &str = "(arn:(aws[a-zA-Z-]*)?:lambda:)?([a-z]{2}(-gov)?-[a-z]+-\\d{1}:)?(\\d{12}:)?(function:)?([a-zA-Z0-9-_]+)(:(\\$LATEST|[a-zA-Z0-9-_]+))?";
const QUALIFIER_PATTERN: &str = "(|[a-zA-Z0-9$_-]+)";

/// The longest function name Lambda accepts.
pub const MAX_NAME_LEN: usize = 64;

/// Where ARNs point: the region and account this server plays.
#[derive(Clone, Debug)]
pub struct Partition {
    pub region: String,
    pub account: String,
}

impl Partition {
    /// `arn:aws:lambda:<region>:<account>:function:<name>`.
    pub fn function_arn(&self, name: &str) -> String {
        format!(
            "arn:aws:lambda:{}:{}:function:{name}",
            self.region, self.account
        )
    }

    /// The function ARN with `:<qualifier>`.
    pub fn qualified_arn(&self, name: &str, qualifier: &str) -> String {
        format!("{}:{qualifier}", self.function_arn(name))
    }
}

/// A function reference taken from a path: its bare name and the qualifier the name carried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FunctionRef {
    pub name: String,
    pub qualifier: Option<String>,
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

/// A bare function name: 1 to 64 of `[a-zA-Z0-9-_]`.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_NAME_LEN && name.chars().all(is_name_char)
}

/// A qualifier: `$LATEST`, a version number or an alias name.
pub fn is_valid_qualifier(q: &str) -> bool {
    q == "$LATEST" || (!q.is_empty() && q.len() <= 128 && q.chars().all(is_name_char))
}

/// An alias name: `[a-zA-Z0-9-_]+`, 1 to 128 long, not all digits.
pub fn is_valid_alias_name(alias: &str) -> bool {
    !alias.is_empty()
        && alias.len() <= 128
        && alias.chars().all(is_name_char)
        && !alias.chars().all(|c| c.is_ascii_digit())
}

/// True for a published version number (`1`, `2`, ...).
pub fn is_version_number(q: &str) -> bool {
    !q.is_empty() && q.len() <= 10 && q.chars().all(|c| c.is_ascii_digit()) && !q.starts_with('0')
}

fn is_account(s: &str) -> bool {
    s.len() == 12 && s.chars().all(|c| c.is_ascii_digit())
}

fn is_region(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() >= 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric()))
        && parts
            .last()
            .is_some_and(|p| p.len() == 1 && p.chars().all(|c| c.is_ascii_digit()))
}

/// Parses a `FunctionName` path parameter. ARNs that name another region or account are not
/// found here.
pub fn parse_function_ref(input: &str, partition: &Partition) -> Result<FunctionRef, ApiError> {
    let invalid = || pattern_error("functionName", input, NAME_PATTERN);
    if input.is_empty() || input.len() > 256 {
        return Err(invalid());
    }
    let parts: Vec<&str> = input.split(':').collect();
    let (region, account, rest): (Option<&str>, Option<&str>, &[&str]) = match parts.as_slice() {
        [
            "arn",
            partition_name,
            "lambda",
            region,
            account,
            "function",
            rest @ ..,
        ] => {
            if !partition_name.starts_with("aws") || !is_region(region) || !is_account(account) {
                return Err(invalid());
            }
            (Some(*region), Some(*account), rest)
        }
        [account, "function", rest @ ..] => {
            if !is_account(account) {
                return Err(invalid());
            }
            (None, Some(*account), rest)
        }
        rest => (None, None, rest),
    };
    let (name, qualifier) = match rest {
        [name] => (*name, None),
        [name, qualifier] => (*name, Some(*qualifier)),
        _ => return Err(invalid()),
    };
    if !is_valid_name(name) || qualifier.is_some_and(|q| !is_valid_qualifier(q)) {
        return Err(invalid());
    }
    if region.is_some_and(|r| r != partition.region)
        || account.is_some_and(|a| a != partition.account)
    {
        return Err(ApiError::ResourceNotFound(format!(
            "Function not found: {input} (this server serves region {} account {})",
            partition.region, partition.account
        )));
    }
    Ok(FunctionRef {
        name: name.to_string(),
        qualifier: qualifier.map(str::to_string),
    })
}

/// The unqualified ARN of the function an Invoke names, read from the first bytes of an HTTP
/// request (its request line, `POST /2015-03-31/functions/{name}/invocations...`), so a new
/// connection can be served where that function runs (`hearth_agent::cores::Steer`). `None` for
/// anything else: another route, a partial line, a name that does not parse.
pub fn invoked_function_arn(first: &[u8], partition: &Partition) -> Option<String> {
    let line = first.strip_prefix(b"POST ")?;
    let target = &line[..line.iter().position(|&b| b == b' ')?];
    let path = target.split(|&b| b == b'?').next()?;
    let name = invoke_path_name(std::str::from_utf8(path).ok()?)?;
    let fref = parse_function_ref(&name, partition).ok()?;
    Some(partition.function_arn(&fref.name))
}

/// The function-name segment of an Invoke path (`/2015-03-31/functions/{name}/invocations`),
/// percent-decoded as the router's path parameter is; `None` for any other path, or a name that
/// does not decode (the router then answers it).
pub fn invoke_path_name(path: &str) -> Option<String> {
    let name = path
        .strip_prefix("/2015-03-31/functions/")?
        .strip_suffix("/invocations")?;
    if name.is_empty() || name.contains('/') {
        return None;
    }
    percent_encoding::percent_decode_str(name)
        .decode_utf8()
        .ok()
        .map(|name| name.into_owned())
}

/// Merges the qualifier carried by the name with the `Qualifier` query parameter.
pub fn merge_qualifier(
    fref: &FunctionRef,
    query: Option<&str>,
) -> Result<Option<String>, ApiError> {
    if let Some(q) = query
        && !is_valid_qualifier(q)
    {
        return Err(pattern_error("qualifier", q, QUALIFIER_PATTERN));
    }
    match (fref.qualifier.as_deref(), query) {
        (Some(a), Some(b)) if a != b => Err(ApiError::InvalidParameterValue(
            "The derived qualifier from the function name does not match the specified qualifier."
                .into(),
        )),
        (Some(a), _) => Ok(Some(a.to_string())),
        (None, b) => Ok(b.map(str::to_string)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn partition() -> Partition {
        Partition {
            region: "us-east-1".into(),
            account: "123456789012".into(),
        }
    }

    #[test]
    fn invoke_request_lines_name_their_function() {
        let p = partition();
        let arn = "arn:aws:lambda:us-east-1:123456789012:function:echo";
        for line in [
            "POST /2015-03-31/functions/echo/invocations HTTP/1.1\r\nhost: x\r\n",
            "POST /2015-03-31/functions/echo/invocations?Qualifier=7 HTTP/1.1\r\n",
            "POST /2015-03-31/functions/echo%3Aprod/invocations HTTP/1.1\r\n",
            "POST /2015-03-31/functions/arn%3Aaws%3Alambda%3Aus-east-1%3A123456789012%3Afunction%3Aecho/invocations HTTP/1.1",
            "POST /2015-03-31/functions/123456789012:function:echo:3/invocations HTTP/1.1",
        ] {
            assert_eq!(
                invoked_function_arn(line.as_bytes(), &p).as_deref(),
                Some(arn),
                "{line}"
            );
        }
        for line in [
            "GET /2015-03-31/functions/echo HTTP/1.1\r\n",
            "POST /2015-03-31/functions HTTP/1.1\r\n",
            "POST /2015-03-31/functions/echo/invocationsX HTTP/1.1",
            "POST /2015-03-31/functions/echo/invocations",
            "POST /2015-03-31/functions/ec",
            "POST /2015-03-31/functions/bad%20name/invocations HTTP/1.1",
            "POST /2015-03-31/functions/arn%3Aaws%3Alambda%3Aeu-west-1%3A123456789012%3Afunction%3Aecho/invocations HTTP/1.1",
            "",
        ] {
            assert_eq!(invoked_function_arn(line.as_bytes(), &p), None, "{line}");
        }
    }

    proptest! {
        #[test]
        fn invoked_function_arn_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut line = b"POST /2015-03-31/functions/".to_vec();
            line.extend_from_slice(&bytes);
            let _ = invoked_function_arn(&line, &partition());
            let _ = invoked_function_arn(&bytes, &partition());
        }
    }

    #[test]
    fn accepts_every_form() {
        let p = partition();
        let want = FunctionRef {
            name: "my-fn".into(),
            qualifier: None,
        };
        assert_eq!(parse_function_ref("my-fn", &p).unwrap(), want);
        assert_eq!(
            parse_function_ref("123456789012:function:my-fn", &p).unwrap(),
            want
        );
        assert_eq!(
            parse_function_ref("arn:aws:lambda:us-east-1:123456789012:function:my-fn", &p).unwrap(),
            want
        );
        let q = parse_function_ref(
            "arn:aws:lambda:us-east-1:123456789012:function:my-fn:live",
            &p,
        )
        .unwrap();
        assert_eq!(q.qualifier.as_deref(), Some("live"));
        assert_eq!(
            parse_function_ref("my-fn:$LATEST", &p)
                .unwrap()
                .qualifier
                .as_deref(),
            Some("$LATEST")
        );
    }

    #[test]
    fn rejects_bad_names() {
        let p = partition();
        for bad in [
            "",
            "a b",
            "a:b:c",
            "x/y",
            &"a".repeat(65),
            "arn:aws:lambda:nowhere:123456789012:function:f",
        ] {
            assert!(
                matches!(parse_function_ref(bad, &p), Err(ApiError::Validation(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_function_ref("arn:aws:lambda:eu-west-1:123456789012:function:f", &p),
            Err(ApiError::ResourceNotFound(_))
        ));
    }

    #[test]
    fn qualifiers_merge() {
        let r = FunctionRef {
            name: "f".into(),
            qualifier: Some("1".into()),
        };
        assert_eq!(
            merge_qualifier(&r, Some("1")).unwrap().as_deref(),
            Some("1")
        );
        assert!(merge_qualifier(&r, Some("2")).is_err());
        assert!(is_valid_alias_name("live") && !is_valid_alias_name("123"));
        assert!(
            is_version_number("12") && !is_version_number("012") && !is_version_number("$LATEST")
        );
    }

    proptest! {
        #[test]
        fn never_panics(s in ".{0,300}") {
            let _ = parse_function_ref(&s, &partition());
        }

        #[test]
        fn valid_names_round_trip(name in "[a-zA-Z0-9_-]{1,64}") {
            let r = parse_function_ref(&name, &partition()).unwrap();
            prop_assert_eq!(r.name, name);
        }
    }
}
