//! Signing keys: `NAME:BASE64` lines. A secret key file holds the ed25519 seed and the
//! public key (64 bytes: a public key can never be taken for it, and a damaged one is
//! seen), a public key file and a trusted key the public key (32 bytes); a signature is
//! `NAME:BASE64` of the 64-byte signature. The name only says which key to try. Secret
//! key files of the earlier form hold the seed alone (32 bytes, like a public key): one is
//! taken only with its `.pub` file beside it, holding the public key of that seed.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{bail, Context, Result};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};

/// A key's name: what a signature says it was made with.
pub fn check_name(name: &str) -> Result<()> {
    let ok =
        !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if !ok {
        bail!("key name {name:?} must be 1 to 64 of A-Z a-z 0-9 - _ .");
    }
    Ok(())
}

fn split(text: &str, what: &str) -> Result<(String, Vec<u8>)> {
    let (name, b64) = text.trim().split_once(':').with_context(|| format!("{what} is not NAME:BASE64"))?;
    check_name(name).with_context(|| format!("in {what}"))?;
    let bytes = STANDARD.decode(b64).with_context(|| format!("{what}: not base64"))?;
    Ok((name.to_string(), bytes))
}

pub fn generate(name: &str, secret: &Path, public: &Path) -> Result<()> {
    check_name(name)?;
    let mut seed = [0u8; 32];
    getrandom(&mut seed)?;
    let key = SigningKey::from_bytes(&seed);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(secret)
        .with_context(|| format!("creating `{}`", secret.display()))?;
    writeln!(f, "{name}:{}", STANDARD.encode(key.to_keypair_bytes()))
        .with_context(|| format!("writing `{}`", secret.display()))?;
    std::fs::write(public, format!("{name}:{}\n", STANDARD.encode(key.verifying_key().as_bytes())))
        .with_context(|| format!("writing `{}`", public.display()))?;
    Ok(())
}

fn getrandom(buf: &mut [u8]) -> Result<()> {
    use rand_core::{OsRng, RngCore};
    OsRng.try_fill_bytes(buf).map_err(|e| anyhow::anyhow!("reading random bytes: {e}"))
}

/// A secret key, with its name.
pub struct Secret {
    name: String,
    key: SigningKey,
}

impl Secret {
    /// `NAME:BASE64` of the signature over `message`.
    pub fn sign(&self, message: &[u8]) -> String {
        format!("{}:{}", self.name, STANDARD.encode(self.key.sign(message).to_bytes()))
    }
}

impl Secret {
    /// The public key, as a trusted key is written (`NAME:BASE64`).
    pub fn public(&self) -> String {
        format!("{}:{}", self.name, STANDARD.encode(self.key.verifying_key().as_bytes()))
    }
}

pub fn read_secret(path: &Path) -> Result<Secret> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading the signing key `{}`", path.display()))?;
    let (name, bytes) = split(&text, &format!("the signing key `{}`", path.display()))?;
    match bytes.len() {
        64 => {
            let pair: [u8; 64] = bytes.try_into().expect("64 bytes");
            let key = SigningKey::from_keypair_bytes(&pair).map_err(|_| {
                anyhow::anyhow!("`{}` is not a signing key: its public half is not its secret's", path.display())
            })?;
            Ok(Secret { name, key })
        }
        32 => {
            // The earlier form, which a public key also has: taken only when its `.pub`
            // beside it holds the public key of these bytes taken as a seed.
            let key = SigningKey::from_bytes(&bytes.try_into().expect("32 bytes"));
            let secret = Secret { name, key };
            let public = Path::new(&format!("{}.pub", path.display())).to_path_buf();
            let beside = std::fs::read_to_string(&public).unwrap_or_default();
            if beside.trim() != secret.public() {
                bail!(
                    "`{}` holds a public key (32 bytes), not a signing key: give the secret key `store keygen` \
                     wrote (the file without `.pub`); a secret key of the earlier form is taken only with its \
                     `.pub` file beside it",
                    path.display()
                );
            }
            Ok(secret)
        }
        n => bail!("`{}` is not a signing key ({n} bytes; `store keygen` writes 64)", path.display()),
    }
}

pub fn parse_trusted(keys: &[String]) -> Result<Vec<(String, VerifyingKey)>> {
    keys.iter()
        .map(|k| {
            let (name, bytes) = split(k, &format!("trusted key {k:?}"))?;
            let bytes: [u8; 32] =
                bytes.try_into().map_err(|_| anyhow::anyhow!("trusted key `{name}` is not 32 bytes"))?;
            Ok((name.clone(), VerifyingKey::from_bytes(&bytes).with_context(|| format!("trusted key `{name}`"))?))
        })
        .collect()
}

/// Why a signature is refused.
pub enum Refused {
    UnknownKey(String),
    Invalid(String),
}

/// The name of the trusted key whose signature `signature` is over `message`.
pub fn verify(trusted: &[(String, VerifyingKey)], signature: &str, message: &[u8]) -> Result<String, Refused> {
    let (name, bytes) = split(signature, "the signature").map_err(|e| Refused::Invalid(format!("{e:#}")))?;
    let keys: Vec<&VerifyingKey> = trusted.iter().filter(|(n, _)| *n == name).map(|(_, k)| k).collect();
    if keys.is_empty() {
        return Err(Refused::UnknownKey(name));
    }
    let signature = Signature::from_slice(&bytes).map_err(|e| Refused::Invalid(e.to_string()))?;
    if keys.iter().any(|k| k.verify(message, &signature).is_ok()) {
        Ok(name)
    } else {
        Err(Refused::Invalid(format!("not made by the trusted key `{name}`")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_trusted_key_of_the_signatures_name_verifies_the_signed_message() {
        let dir = tempfile::tempdir().unwrap();
        let pair = |name: &str, file: &str| {
            let (secret, public) = (dir.path().join(file), dir.path().join(format!("{file}.pub")));
            generate(name, &secret, &public).unwrap();
            (read_secret(&secret).unwrap(), std::fs::read_to_string(&public).unwrap().trim().to_string())
        };
        let (team, team_pub) = pair("team", "a");
        let (impostor, _) = pair("team", "b");
        let (stranger, stranger_pub) = pair("stranger", "c");
        let trusted = parse_trusted(&[team_pub]).unwrap();
        let signature = team.sign(b"message");
        assert_eq!(verify(&trusted, &signature, b"message").ok(), Some("team".to_string()));
        assert!(matches!(verify(&trusted, &signature, b"messagf"), Err(Refused::Invalid(_))));
        assert!(matches!(verify(&trusted, &impostor.sign(b"message"), b"message"), Err(Refused::Invalid(_))));
        assert!(matches!(verify(&trusted, &stranger.sign(b"message"), b"message"), Err(Refused::UnknownKey(_))));
        assert!(matches!(verify(&trusted, "team:bm90IGEgc2lnbmF0dXJl", b"message"), Err(Refused::Invalid(_))));
        assert!(matches!(verify(&trusted, "garbage", b"message"), Err(Refused::Invalid(_))));
        assert!(parse_trusted(&[stranger_pub, "x y:AAAA".into()]).is_err());
        // The secret key file is the owner's alone, and is never overwritten.
        let mode = std::fs::metadata(dir.path().join("a")).unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
        assert!(generate("team", &dir.path().join("a"), &dir.path().join("d")).is_err());
    }

    #[test]
    fn a_public_key_is_never_taken_for_a_secret_one() {
        let dir = tempfile::tempdir().unwrap();
        let (secret, public) = (dir.path().join("k"), dir.path().join("k.pub"));
        generate("team", &secret, &public).unwrap();
        let key = read_secret(&secret).unwrap();
        assert_eq!(format!("{}\n", key.public()), std::fs::read_to_string(&public).unwrap());
        let err = format!("{:#}", read_secret(&public).err().expect("a public key was taken as a secret key"));
        assert!(err.contains("holds a public key"), "{err}");
        // A secret key file of the earlier form (the seed alone) with its `.pub`: taken;
        // alone it cannot be told from a public key, and is refused.
        let text = std::fs::read_to_string(&secret).unwrap();
        let (name, b64) = text.trim().split_once(':').unwrap();
        let seed = &STANDARD.decode(b64).unwrap()[..32];
        let old = dir.path().join("old");
        std::fs::write(&old, format!("{name}:{}\n", STANDARD.encode(seed))).unwrap();
        assert!(read_secret(&old).is_err());
        std::fs::copy(&public, dir.path().join("old.pub")).unwrap();
        assert_eq!(read_secret(&old).unwrap().public(), key.public());
        // A damaged pair is refused.
        let mut pair = STANDARD.decode(b64).unwrap();
        pair[40] ^= 1;
        std::fs::write(&secret, format!("{name}:{}\n", STANDARD.encode(&pair))).unwrap();
        assert!(read_secret(&secret).is_err());
    }
}
