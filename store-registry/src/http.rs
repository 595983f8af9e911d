//! The reading side of the registry protocol, every answer bounded: the `/v2/` check,
//! the token a bearer challenge sends for, manifests (each read with a cap of
//! [`MAX_ANSWER`], refused as soon as it is passed) and blobs (streamed by the caller,
//! against a size the signature vouches for). oci-client reads such answers whole, so a
//! registry could make it hold gigabytes; it is used for pushing only, with the token
//! got here.

use std::time::Duration;

use reqwest::header::{HeaderValue, ACCEPT, WWW_AUTHENTICATE};
use reqwest::{Response, StatusCode};

use crate::{At, Failure, Outcome, Why, PASSWORD_ENV, USERNAME_ENV};

/// The largest manifest, token answer or error text read from a registry.
pub const MAX_ANSWER: usize = 1 << 20;

/// How requests to a registry are authorised.
#[derive(Debug, Clone)]
pub enum Auth {
    Anonymous,
    Basic(String, String),
    Bearer(String),
}

/// A registry and repository, with the authorisation `/v2/` asked for.
pub struct Session {
    client: reqwest::Client,
    base: String,
    repository: String,
    pub auth: Auth,
}

fn unreachable(doing: &str, e: reqwest::Error) -> Failure {
    Failure(Why::Unreachable, format!("{doing}: {e}"))
}

/// Reads `res`'s body, at most `cap` bytes: an error as soon as there are more.
pub async fn read_capped(mut res: Response, cap: usize, what: &str) -> Outcome<Vec<u8>> {
    let too_large = || Failure(Why::Oversized, format!("{what} is over {cap} bytes"));
    if res.content_length().is_some_and(|n| n > cap as u64) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = res.chunk().await.map_err(|e| unreachable(&format!("reading {what}"), e))? {
        if body.len() + chunk.len() > cap {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The `key="value"` parameters of a `Bearer` challenge.
fn challenge_params(challenge: &str) -> Option<Vec<(String, String)>> {
    let rest = challenge.strip_prefix("Bearer ").or_else(|| challenge.strip_prefix("bearer "))?;
    let mut params = Vec::new();
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let after = after.strip_prefix('"')?;
        let (value, after) = after.split_once('"')?;
        params.push((key.trim().to_string(), value.to_string()));
        rest = after.trim_start().trim_start_matches(',').trim_start();
    }
    Some(params)
}

impl Session {
    /// Asks `/v2/` how to authorise, and follows a bearer challenge for a token with the
    /// scope of `push` or pull, basic credentials from the environment given if set.
    pub async fn open(at: &At, push: bool) -> Outcome<Session> {
        let timeout = Duration::from_millis(at.timeout_ms);
        let client = reqwest::Client::builder()
            .connect_timeout(timeout)
            .read_timeout(timeout)
            .build()
            .map_err(|e| Failure(Why::Error, format!("making the HTTP client: {e}")))?;
        let scheme = if at.insecure { "http" } else { "https" };
        let base = format!("{scheme}://{}", at.registry);
        let basic = match (std::env::var(USERNAME_ENV), std::env::var(PASSWORD_ENV)) {
            (Ok(user), Ok(password)) => Some((user, password)),
            _ => None,
        };
        let mut session = Session { client, base, repository: at.repository.clone(), auth: Auth::Anonymous };
        let res = session.client.get(format!("{}/v2/", session.base)).send().await;
        let res = res.map_err(|e| unreachable("asking the registry", e))?;
        let challenge = res.headers().get(WWW_AUTHENTICATE).and_then(|h| h.to_str().ok()).map(str::to_string);
        drop(res);
        let Some(challenge) = challenge else { return Ok(session) };
        let Some(params) = challenge_params(&challenge) else {
            if let Some((user, password)) = basic {
                session.auth = Auth::Basic(user, password);
            }
            return Ok(session);
        };
        let param = |k: &str| params.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
        let realm = param("realm")
            .ok_or_else(|| Failure(Why::Error, format!("a bearer challenge without a realm: {challenge:?}")))?;
        let scope = format!("repository:{}:{}", at.repository, if push { "pull,push" } else { "pull" });
        let mut query = vec![("scope", scope)];
        if let Some(service) = param("service") {
            query.push(("service", service));
        }
        let mut request = session.client.get(&realm).query(&query);
        if let Some((user, password)) = &basic {
            request = request.basic_auth(user, Some(password));
        }
        let res = request.send().await.map_err(|e| unreachable("asking for a token", e))?;
        let status = res.status();
        let body = read_capped(res, MAX_ANSWER, "the token answer").await?;
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body);
            return Err(Failure(Why::Error, format!("authenticating: {status}: {}", text.trim())));
        }
        #[derive(serde::Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let token: Token = serde_json::from_slice(&body)
            .map_err(|e| Failure(Why::Error, format!("authenticating: the token answer is not a token: {e}")))?;
        let token = token
            .token
            .or(token.access_token)
            .ok_or_else(|| Failure(Why::Error, "authenticating: the token answer holds no token".into()))?;
        session.auth = Auth::Bearer(token);
        Ok(session)
    }

    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        let request = self.client.get(format!("{}/v2/{}/{path}", self.base, self.repository));
        match &self.auth {
            Auth::Anonymous => request,
            Auth::Basic(user, password) => request.basic_auth(user, Some(password)),
            Auth::Bearer(token) => request.bearer_auth(token),
        }
    }

    /// The failure an answer that is not a success says.
    async fn failed(res: Response, what: &str) -> Failure {
        let status = res.status();
        let text = read_capped(res, MAX_ANSWER, "an error answer").await.unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let why = match status {
            StatusCode::NOT_FOUND => Why::Missing,
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Why::Error,
            _ => Why::Unreachable,
        };
        Failure(why, format!("{what}: {status}: {}", text.trim()))
    }

    /// The manifest tagged `tag`, at most [`MAX_ANSWER`] bytes.
    pub async fn manifest(&self, tag: &str) -> Outcome<Vec<u8>> {
        let accept = HeaderValue::from_static(oci_client::manifest::OCI_IMAGE_MEDIA_TYPE);
        let res = self.get(&format!("manifests/{tag}")).header(ACCEPT, accept).send().await;
        let res = res.map_err(|e| unreachable("fetching the manifest", e))?;
        if !res.status().is_success() {
            return Err(Self::failed(res, "fetching the manifest").await);
        }
        read_capped(res, MAX_ANSWER, "the manifest").await
    }

    /// The answer to a blob's request, its body still to be read.
    pub async fn blob(&self, digest: &str) -> Outcome<Response> {
        let res = self.get(&format!("blobs/{digest}")).send().await;
        let res = res.map_err(|e| unreachable("fetching a blob", e))?;
        if !res.status().is_success() {
            return Err(Self::failed(res, &format!("fetching blob {digest}")).await);
        }
        Ok(res)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_challenges_are_parsed() {
        let p =
            challenge_params(r#"Bearer realm="https://auth.example/token",service="reg",scope="repository:a:pull""#)
                .unwrap();
        assert_eq!(p[0], ("realm".to_string(), "https://auth.example/token".to_string()));
        assert_eq!(p[1], ("service".to_string(), "reg".to_string()));
        assert_eq!(p.len(), 3);
        assert!(challenge_params(r#"Basic realm="x""#).is_none());
        assert!(challenge_params(r#"Bearer realm=unquoted"#).is_none());
    }
}
