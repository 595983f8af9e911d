//! `xtask-registry`: the OCI registry client behind `cargo xtask store push/pull` and
//! substitutes. It keeps oci-client, tokio and ed25519 out of xtask's own build: xtask
//! builds it on first use and drives it over stdin/stdout, one JSON request per line, one
//! JSON answer per line (see [`Request`] and [`Answer`]).
//!
//! A store item is one OCI artifact: its tag is the item's recipe hash, its config blob
//! the item's `.meta` (exactly the bytes signed), its one layer a deterministic tar
//! (gzip) of the item under the name `item`. The manifest's annotations carry the item's
//! file name, its content sha256 and the signature: `KEYNAME:BASE64` of an ed25519
//! signature over [`signed_message`], which covers the layer's digest and size too. A
//! pull reads the manifest with a small cap ([`http::MAX_ANSWER`]), verifies the
//! signature against the trusted keys it is given before it downloads the layer, and
//! then takes at most the signed size, within the request's deadline; xtask then checks
//! the rest (the recipe hash of the `.meta`, the content hash of what it ingests) before
//! anything enters the store.

mod http;
mod keys;
mod tarball;

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::manifest::{OciDescriptor, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use http::Session;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The config blob's media type: the item's `.meta`.
pub const META_MEDIA_TYPE: &str = "application/vnd.vmstore.item.meta.v1+json";
/// The artifact type of an item's manifest.
pub const ARTIFACT_TYPE: &str = "application/vnd.vmstore.item.v1";
/// The layer's media type.
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Manifest annotations.
pub const ITEM_ANNOTATION: &str = "org.vmstore.item";
pub const CONTENT_ANNOTATION: &str = "org.vmstore.content-sha256";
pub const SIGNATURE_ANNOTATION: &str = "org.vmstore.signature";
/// The largest `.meta` accepted.
const MAX_META: u64 = 4 << 20;
/// Environment variables with the registry's basic-auth credentials.
pub const USERNAME_ENV: &str = "XTASK_REGISTRY_USERNAME";
pub const PASSWORD_ENV: &str = "XTASK_REGISTRY_PASSWORD";

/// The bytes a signature covers: the item's file name (`<recipe hash>-<name>`), its
/// content sha256, the sha256 of its `.meta`, and its layer's digest and size (so a
/// registry cannot make a pull fetch more than the signer sent), each on a line after a
/// version line.
pub fn signed_message(item: &str, content_sha256: &str, meta: &[u8], layer: &OciDescriptor) -> Vec<u8> {
    format!(
        "vmstore-item-signature-v2\n{item}\n{content_sha256}\n{}\n{}\n{}\n",
        hex(&Sha256::digest(meta)),
        layer.digest,
        layer.size
    )
    .into_bytes()
}

/// What signatures of the first form covered (not the layer): such a signature is
/// refused, with a message saying to push the item again.
fn signed_message_v1(item: &str, content_sha256: &str, meta: &[u8]) -> Vec<u8> {
    format!("vmstore-item-signature-v1\n{item}\n{content_sha256}\n{}\n", hex(&Sha256::digest(meta))).into_bytes()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A request, one JSON object per line on stdin.
#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
enum Request {
    /// Makes a key pair: `secret` (mode 0600) and `public`, each `NAME:BASE64`.
    Keygen { name: String, secret: PathBuf, public: PathBuf },
    /// Reads the secret key file `key`: an error if it is not one (a public key, say).
    CheckKey { key: PathBuf },
    /// Pushes an item unless its tag is there already with a signature that verifies
    /// (by the pushing key, or one of `trusted` that is not `revoked`); a tag whose
    /// signature does not verify is replaced.
    Push {
        #[serde(flatten)]
        at: At,
        /// `<hash>-<name>`.
        item: String,
        path: PathBuf,
        /// The `.meta`, as stored.
        meta: String,
        content_sha256: String,
        /// The secret key file.
        key: PathBuf,
        #[serde(default)]
        trusted: Vec<String>,
        #[serde(default)]
        revoked: Vec<String>,
    },
    /// Fetches an item's manifest and `.meta`, verifies its signature against `trusted`,
    /// and with `dir` downloads its layer and unpacks it as `dir/item`.
    Pull {
        #[serde(flatten)]
        at: At,
        item: String,
        trusted: Vec<String>,
        /// Keys whose signatures are refused, even if also trusted.
        #[serde(default)]
        revoked: Vec<String>,
        dir: Option<PathBuf>,
        max_bytes: u64,
    },
}

/// Where: `registry/repository`, the tag, plain HTTP or not, the read timeout, and the
/// deadline of the whole request (a pull's; none by default).
#[derive(Debug, Deserialize)]
struct At {
    registry: String,
    repository: String,
    tag: String,
    insecure: bool,
    timeout_ms: u64,
    #[serde(default)]
    deadline_ms: Option<u64>,
}

/// Why a request failed, for xtask to say and decide on.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
enum Why {
    /// The registry has no such tag.
    Missing,
    /// The registry cannot be reached, or answered too slowly.
    Unreachable,
    /// The manifest carries no signature.
    Unsigned,
    /// Signed by a key not in the trusted list.
    UnknownKey,
    /// The signature does not verify: the content or the `.meta` was altered.
    BadSignature,
    /// Signed by a key revoked in the configuration.
    Revoked,
    /// A blob does not match its digest, or the artifact is malformed or too large.
    Altered,
    /// An answer (a manifest, a token) is larger than the cap on it.
    Oversized,
    /// Anything else (a local error: a key file, a path).
    Error,
}

#[derive(Debug, Serialize, Default)]
struct Answer {
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    why: Option<Why>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// Push: whether it was pushed (false: it was there already).
    #[serde(skip_serializing_if = "Option::is_none")]
    pushed: Option<bool>,
    /// Bytes sent or received (compressed layer, `.meta` and manifest).
    bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    meta: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content_sha256: Option<String>,
    /// Pull: the trusted key that signed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    /// Pull: the size of the layer, as signed.
    #[serde(skip_serializing_if = "Option::is_none")]
    layer_bytes: Option<u64>,
}

#[derive(Debug)]
struct Failure(Why, String);

impl Failure {
    fn from_oci(e: oci_client::errors::OciDistributionError, doing: &str) -> Failure {
        use oci_client::errors::OciDistributionError as E;
        let why = match &e {
            E::ImageManifestNotFoundError(_) => Why::Missing,
            E::ServerError { code: 404, .. } => Why::Missing,
            E::RegistryError { envelope, .. }
                if envelope.errors.iter().any(|e| format!("{:?}", e.code).contains("Unknown")) =>
            {
                Why::Missing
            }
            E::DigestError(_) => Why::Altered,
            E::AuthenticationFailure(_) | E::UnauthorizedError { .. } => Why::Error,
            _ => Why::Unreachable,
        };
        Failure(why, format!("{doing}: {e}"))
    }
}

type Outcome<T> = std::result::Result<T, Failure>;

fn local<T>(r: Result<T>) -> Outcome<T> {
    r.map_err(|e| Failure(Why::Error, format!("{e:#}")))
}

fn main() {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("xtask-registry: starting the runtime: {e}");
            std::process::exit(1);
        }
    };
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        if line.trim().is_empty() {
            continue;
        }
        let answer = match serde_json::from_str::<Request>(&line) {
            Ok(request) => match runtime.block_on(handle(request)) {
                Ok(answer) => Answer { ok: true, ..answer },
                Err(Failure(why, error)) => {
                    Answer { ok: false, why: Some(why), error: Some(error), ..Answer::default() }
                }
            },
            Err(e) => Answer {
                ok: false,
                why: Some(Why::Error),
                error: Some(format!("bad request: {e}")),
                ..Answer::default()
            },
        };
        let mut out = std::io::stdout().lock();
        let written = serde_json::to_writer(&mut out, &answer).is_ok() && writeln!(out).is_ok() && out.flush().is_ok();
        if !written {
            break;
        }
    }
}

async fn handle(request: Request) -> Outcome<Answer> {
    match request {
        Request::Keygen { name, secret, public } => {
            local(keys::generate(&name, &secret, &public))?;
            Ok(Answer::default())
        }
        Request::CheckKey { key } => {
            local(keys::read_secret(&key))?;
            Ok(Answer::default())
        }
        Request::Push { at, item, path, meta, content_sha256, key, trusted, revoked } => {
            push(&at, &item, &path, &meta, &content_sha256, &key, (&trusted, &revoked)).await
        }
        Request::Pull { at, item, trusted, revoked, dir, max_bytes } => {
            let Some(ms) = at.deadline_ms else { return pull(&at, &item, (&trusted, &revoked), dir, max_bytes).await };
            // However the registry answers (a byte a second, say), the pull ends here: the
            // layer file it was writing is closed, and xtask removes its scratch.
            tokio::time::timeout(Duration::from_millis(ms), pull(&at, &item, (&trusted, &revoked), dir, max_bytes))
                .await
                .unwrap_or_else(|_| {
                    Err(Failure(Why::Unreachable, format!("no answer within {} s (the pull's deadline)", ms / 1000)))
                })
        }
    }
}

fn client(at: &At) -> (Client, Reference) {
    let config = ClientConfig {
        protocol: if at.insecure { ClientProtocol::Http } else { ClientProtocol::Https },
        connect_timeout: Some(Duration::from_millis(at.timeout_ms)),
        read_timeout: Some(Duration::from_millis(at.timeout_ms)),
        ..ClientConfig::default()
    };
    let reference = Reference::with_tag(at.registry.clone(), at.repository.clone(), at.tag.clone());
    (Client::new(config), reference)
}

async fn push(
    at: &At,
    item: &str,
    path: &std::path::Path,
    meta: &str,
    content: &str,
    key: &std::path::Path,
    (trusted, revoked): (&[String], &[String]),
) -> Outcome<Answer> {
    let signing = local(keys::read_secret(key))?;
    // The token (if the registry asks for one) is got with a capped read, then handed
    // to oci-client, which would read its answer whole.
    let session = Session::open(at, true).await?;
    let (client, reference) = client(at);
    let auth = match &session.auth {
        http::Auth::Anonymous => RegistryAuth::Anonymous,
        http::Auth::Basic(user, password) => RegistryAuth::Basic(user.clone(), password.clone()),
        http::Auth::Bearer(token) => RegistryAuth::Bearer(token.clone()),
    };
    let op = oci_client::RegistryOperation::Push;
    client.auth(&reference, &auth, op).await.map_err(|e| Failure::from_oci(e, "authenticating"))?;
    // Kept only if it is this item, signed by this key or a trusted one; anything else
    // there (unsigned, tampered, signed in the earlier form, by a revoked or unknown key)
    // is replaced.
    let mut keys = trusted.to_vec();
    keys.push(signing.public());
    match verified(&session, &at.tag, item, (&keys, revoked)).await {
        Ok(_) => return Ok(Answer { pushed: Some(false), ..Answer::default() }),
        Err(Failure(Why::Unreachable, e)) => return Err(Failure(Why::Unreachable, e)),
        Err(_) => {}
    }
    let tar = local(tarball::pack(path))?;
    let layer = ImageLayer::new(tar, LAYER_MEDIA_TYPE.to_string(), None);
    let config = Config::new(meta.as_bytes().to_vec(), META_MEDIA_TYPE.to_string(), None);
    let descriptor = OciDescriptor {
        media_type: LAYER_MEDIA_TYPE.to_string(),
        digest: layer.sha256_digest(),
        size: layer.data.len() as i64,
        ..OciDescriptor::default()
    };
    let signature = signing.sign(&signed_message(item, content, meta.as_bytes(), &descriptor));
    let annotations = BTreeMap::from([
        (ITEM_ANNOTATION.to_string(), item.to_string()),
        (CONTENT_ANNOTATION.to_string(), content.to_string()),
        (SIGNATURE_ANNOTATION.to_string(), signature),
    ]);
    let mut manifest = OciImageManifest::build(std::slice::from_ref(&layer), &config, Some(annotations));
    manifest.artifact_type = Some(ARTIFACT_TYPE.to_string());
    let bytes = (layer.data.len() + config.data.len()) as u64;
    client
        .push(&reference, &[layer], config, &auth, Some(manifest))
        .await
        .map_err(|e| Failure::from_oci(e, "pushing"))?;
    Ok(Answer { pushed: Some(true), bytes, ..Answer::default() })
}

async fn pull(
    at: &At,
    item: &str,
    keys: (&[String], &[String]),
    dir: Option<PathBuf>,
    max_bytes: u64,
) -> Outcome<Answer> {
    let session = Session::open(at, false).await?;
    let Verified { manifest, meta, content, key, mut bytes } = verified(&session, &at.tag, item, keys).await?;
    let altered = |what: String| Failure(Why::Altered, what);
    if let Some(dir) = dir {
        let layer = &manifest.layers[0];
        if layer.media_type != LAYER_MEDIA_TYPE {
            return Err(altered(format!("the layer's media type is {:?}", layer.media_type)));
        }
        let file = dir.join("layer.tar.gz");
        fetch(&session, layer, max_bytes, Some(&file), &mut bytes).await?;
        tarball::unpack(&file, &dir.join("item"), max_bytes).map_err(|e| altered(format!("unpacking: {e:#}")))?;
        let _ = std::fs::remove_file(&file);
    }
    // Signed: what a deadline for fetching it may be based on.
    let layer_bytes = Some(manifest.layers[0].size.max(0) as u64);
    Ok(Answer {
        meta: Some(meta),
        content_sha256: Some(content),
        key: Some(key),
        bytes,
        layer_bytes,
        ..Answer::default()
    })
}

/// An item's manifest and `.meta` whose signature verified.
struct Verified {
    manifest: OciImageManifest,
    meta: String,
    content: String,
    /// The trusted key that signed it.
    key: String,
    /// Bytes received.
    bytes: u64,
}

/// Fetches `item`'s manifest and `.meta` and verifies the signature: by one of `trusted`,
/// and by none of `revoked`.
async fn verified(
    session: &Session,
    tag: &str,
    item: &str,
    (trusted, revoked): (&[String], &[String]),
) -> Outcome<Verified> {
    let trusted = local(keys::parse_trusted(trusted))?;
    let revoked = local(keys::parse_trusted(revoked))?;
    let raw = session.manifest(tag).await?;
    let manifest: OciImageManifest = serde_json::from_slice(&raw)
        .map_err(|e| Failure(Why::Altered, format!("the manifest is not an OCI image manifest: {e}")))?;
    let annotation = |key: &str| manifest.annotations.as_ref().and_then(|a| a.get(key)).cloned();
    let altered = |what: String| Failure(Why::Altered, what);
    if manifest.config.media_type != META_MEDIA_TYPE || manifest.layers.len() != 1 {
        return Err(altered(format!("the artifact is not a store item (config {:?})", manifest.config.media_type)));
    }
    if annotation(ITEM_ANNOTATION).as_deref() != Some(item) {
        return Err(altered(format!("the artifact is of {:?}, not of `{item}`", annotation(ITEM_ANNOTATION))));
    }
    let content = annotation(CONTENT_ANNOTATION)
        .filter(|c| c.len() == 64 && c.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| altered("the artifact has no valid content sha256".into()))?;
    let Some(signature) = annotation(SIGNATURE_ANNOTATION) else {
        return Err(Failure(Why::Unsigned, format!("`{item}` is not signed")));
    };
    let mut bytes = raw.len() as u64;
    let meta = fetch(session, &manifest.config, MAX_META, None, &mut bytes).await?;
    let message = signed_message(item, &content, &meta, &manifest.layers[0]);
    if let Ok(name) = keys::verify(&revoked, &signature, &message) {
        return Err(Failure(
            Why::Revoked,
            format!("`{item}` is signed by `{name}`, a key revoked in the configuration"),
        ));
    }
    let key = keys::verify(&trusted, &signature, &message).map_err(|e| match e {
        keys::Refused::UnknownKey(name) => {
            Failure(Why::UnknownKey, format!("`{item}` is signed by `{name}`, which is not a trusted key"))
        }
        keys::Refused::Invalid(_)
            if keys::verify(&trusted, &signature, &signed_message_v1(item, &content, &meta)).is_ok() =>
        {
            Failure(
                Why::BadSignature,
                format!(
                    "`{item}` is signed in the earlier form, which does not cover its layer: \
                     push it again (`store push` replaces it)"
                ),
            )
        }
        keys::Refused::Invalid(why) => Failure(
            Why::BadSignature,
            format!("the signature of `{item}` does not verify ({why}): its content or record was altered"),
        ),
    })?;
    let meta = String::from_utf8(meta).map_err(|_| altered("the `.meta` is not UTF-8".into()))?;
    Ok(Verified { manifest, meta, content, key, bytes })
}

/// Downloads a blob (into memory, or into `file`), at most `max` bytes, checking its
/// sha256 against the descriptor's digest.
async fn fetch(
    session: &Session,
    blob: &OciDescriptor,
    max: u64,
    file: Option<&std::path::Path>,
    total: &mut u64,
) -> Outcome<Vec<u8>> {
    let expected = blob
        .digest
        .strip_prefix("sha256:")
        .filter(|d| d.len() == 64)
        .ok_or_else(|| Failure(Why::Altered, format!("digest {:?} is not a sha256", blob.digest)))?
        .to_string();
    if blob.size < 0 || blob.size as u64 > max {
        return Err(Failure(
            Why::Altered,
            format!("blob {} is {} bytes, over the limit of {max}", blob.digest, blob.size),
        ));
    }
    let mut res = session.blob(&blob.digest).await?;
    if res.content_length().is_some_and(|n| n > blob.size as u64) {
        return Err(Failure(Why::Altered, format!("blob {} is longer than its {} bytes", blob.digest, blob.size)));
    }
    let mut out = match file {
        Some(f) => Some(local(std::fs::File::create_new(f).with_context(|| format!("creating `{}`", f.display())))?),
        None => None,
    };
    let (mut memory, mut hasher, mut got) = (Vec::new(), Sha256::new(), 0u64);
    while let Some(chunk) =
        res.chunk().await.map_err(|e| Failure(Why::Unreachable, format!("fetching blob {}: {e}", blob.digest)))?
    {
        got += chunk.len() as u64;
        if got > blob.size as u64 {
            return Err(Failure(Why::Altered, format!("blob {} is longer than its {} bytes", blob.digest, blob.size)));
        }
        hasher.update(&chunk);
        match &mut out {
            Some(f) => local(f.write_all(&chunk).context("writing the layer"))?,
            None => memory.extend_from_slice(&chunk),
        }
    }
    *total += got;
    if hex(&hasher.finalize()) != expected || got != blob.size as u64 {
        return Err(Failure(Why::Altered, format!("blob {} does not match its digest", blob.digest)));
    }
    Ok(memory)
}
