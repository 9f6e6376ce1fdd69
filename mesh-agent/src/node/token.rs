//! Join tokens: the admin's signed statement "node NAME may join the mesh
//! and owns PREFIX", made and checked with the machinery of identity tokens
//! (a JWT, EdDSA or ES256, checked against a trust bundle).
//!
//! Claims: `sub` is the node's name, `aud` is [`JOIN_AUDIENCE`],
//! `mesh_prefix` the prefix its agents' addresses come from, and `cnf` (RFC
//! 7800) the node's signing key as an Ed25519 JWK: only records signed with
//! it are the node's. The audience and the `sub`, which is no SPIFFE ID,
//! keep a join token from passing for an identity token and the other way
//! round.

use std::time::{Duration, SystemTime};

use ipnet::IpNet;
use serde::Deserialize;
use serde_json::json;

use super::{NodeName, SigningPublicKey};
use crate::identity::{
    Audience, IssuerKey, KeyError, MAX_TTL, TokenError, TrustBundle, check_times, decode_json,
    system_time, verify_signed,
};

/// The audience of join tokens.
pub const JOIN_AUDIENCE: &str = "mesh-join";
/// The audience of node revocations.
pub const REVOCATION_AUDIENCE: &str = "mesh-node-revocation";

/// What a valid join token grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Join {
    pub node: NodeName,
    pub prefix: IpNet,
    /// The key the node signs its records with.
    pub node_key: SigningPublicKey,
    pub issued_at: SystemTime,
    pub expires_at: SystemTime,
    pub jti: Option<String>,
}

/// The admin's word that every join token of `node` issued at or before
/// `revoked_at` admits it no more. It lasts as long as the longest token
/// it can concern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRevocation {
    pub node: NodeName,
    pub revoked_at: SystemTime,
    pub expires_at: SystemTime,
    pub reason: Option<String>,
}

impl NodeRevocation {
    /// Whether it takes away what `join` grants.
    pub fn revokes(&self, join: &Join) -> bool {
        join.node == self.node && join.issued_at <= self.revoked_at
    }
}

/// Signs the revocation of every join token of `node` issued until `now`.
pub fn revoke(
    key: &IssuerKey,
    node: &NodeName,
    reason: Option<&str>,
    now: SystemTime,
) -> Result<String, KeyError> {
    let mut claims = json!({ "sub": node.as_str(), "aud": [REVOCATION_AUDIENCE] });
    if let Some(reason) = reason {
        claims["reason"] = reason.into();
    }
    key.sign(claims, MAX_TTL, now)
}

/// Signs a join token for `node`, holder of `node_key`, and `prefix` (which
/// must have no host bits set: the token says exactly what it grants).
pub fn issue(
    key: &IssuerKey,
    node: &NodeName,
    prefix: IpNet,
    node_key: &SigningPublicKey,
    ttl: Duration,
    now: SystemTime,
) -> Result<String, KeyError> {
    debug_assert_eq!(prefix, prefix.trunc(), "callers pass canonical prefixes");
    key.sign(
        json!({
            "sub": node.as_str(),
            "aud": [JOIN_AUDIENCE],
            "mesh_prefix": prefix.to_string(),
            "cnf": { "jwk": { "kty": "OKP", "crv": "Ed25519", "x": node_key.to_base64url() } },
        }),
        ttl,
        now,
    )
}

/// Checks join tokens against the admin trust bundle.
#[derive(Debug)]
pub struct JoinVerifier {
    bundle: TrustBundle,
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    aud: Option<Audience>,
    exp: Option<u64>,
    iat: Option<u64>,
    nbf: Option<u64>,
    jti: Option<String>,
    mesh_prefix: Option<String>,
    cnf: Option<Confirmation>,
    reason: Option<String>,
}

/// The claims every admin-signed token of the mesh has, checked: signed by
/// a key of the bundle, for `audience`, current.
struct Checked {
    node: NodeName,
    issued_at: SystemTime,
    expires_at: SystemTime,
    claims: Claims,
}

/// RFC 7800's confirmation claim, with the key as a JWK.
#[derive(Deserialize)]
struct Confirmation {
    jwk: Option<ConfirmationKey>,
}

#[derive(Deserialize)]
struct ConfirmationKey {
    kty: String,
    crv: String,
    x: String,
}
impl JoinVerifier {
    pub fn new(bundle: TrustBundle) -> Self {
        Self { bundle }
    }

    /// The grant of a token, if it is signed by a key of the bundle, for
    /// the join audience, and current.
    pub fn verify(&self, token: &str, now: SystemTime) -> Result<Join, TokenError> {
        let Checked {
            node,
            issued_at,
            expires_at,
            claims,
        } = self.check(token, JOIN_AUDIENCE, now)?;
        let text = claims
            .mesh_prefix
            .ok_or(TokenError::MissingClaim("mesh_prefix"))?;
        let prefix: IpNet = text
            .parse()
            .ok()
            .filter(|prefix: &IpNet| *prefix == prefix.trunc())
            .ok_or_else(|| TokenError::InvalidClaim {
                claim: "mesh_prefix",
                reason: format!("`{text}` is not a prefix without host bits"),
            })?;
        let node_key = claims
            .cnf
            .ok_or(TokenError::MissingClaim("cnf"))?
            .jwk
            .filter(|jwk| jwk.kty == "OKP" && jwk.crv == "Ed25519")
            .and_then(|jwk| jwk.x.parse().ok())
            .ok_or_else(|| TokenError::InvalidClaim {
                claim: "cnf",
                reason: "not an Ed25519 public key as a JWK (`kty` OKP, `crv` Ed25519, `x`)".into(),
            })?;
        Ok(Join {
            node,
            prefix,
            node_key,
            issued_at,
            expires_at,
            jti: claims.jti,
        })
    }

    /// The revocation a token states, if it is signed by a key of the
    /// bundle, for the revocation audience, and current.
    pub fn verify_revocation(
        &self,
        token: &str,
        now: SystemTime,
    ) -> Result<NodeRevocation, TokenError> {
        let checked = self.check(token, REVOCATION_AUDIENCE, now)?;
        Ok(NodeRevocation {
            node: checked.node,
            revoked_at: checked.issued_at,
            expires_at: checked.expires_at,
            reason: checked.claims.reason,
        })
    }

    fn check(&self, token: &str, audience: &str, now: SystemTime) -> Result<Checked, TokenError> {
        let signed = verify_signed(&self.bundle, token)?;
        let mut claims: Claims = decode_json(signed.claims, "claim set")?;
        let sub = claims
            .sub
            .as_deref()
            .ok_or(TokenError::MissingClaim("sub"))?;
        let node: NodeName = sub.parse().map_err(|err| TokenError::InvalidClaim {
            claim: "sub",
            reason: format!("{err}"),
        })?;
        claims
            .aud
            .take()
            .ok_or(TokenError::MissingClaim("aud"))?
            .require(audience)?;
        let exp = claims.exp.ok_or(TokenError::MissingClaim("exp"))?;
        let iat = claims.iat.ok_or(TokenError::MissingClaim("iat"))?;
        check_times(exp, iat, claims.nbf, now)?;
        Ok(Checked {
            node,
            issued_at: system_time(iat, "iat")?,
            expires_at: system_time(exp, "exp")?,
            claims,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        identity::{Algorithm, DEFAULT_AUDIENCE as IDENTITY_AUDIENCE, Verifier},
        policy::{SpiffeId, TrustDomain},
    };

    fn key() -> IssuerKey {
        IssuerKey::generate(Algorithm::EdDsa, Some("admin".into())).unwrap()
    }

    fn verifier(key: &IssuerKey) -> JoinVerifier {
        JoinVerifier::new(TrustBundle::from_json(key.bundle_json().as_bytes()).unwrap())
    }

    const HOUR: Duration = Duration::from_secs(3600);

    fn node_key() -> SigningPublicKey {
        crate::node::SigningKey::generate().unwrap().public()
    }

    #[test]
    fn grants_what_was_signed() {
        let key = key();
        let node: NodeName = "node-a".parse().unwrap();
        let prefix: IpNet = "10.100.1.0/24".parse().unwrap();
        let node_key = node_key();
        let now = SystemTime::now();
        let token = issue(&key, &node, prefix, &node_key, HOUR, now).unwrap();
        let join = verifier(&key).verify(&token, now).unwrap();
        assert_eq!(
            (join.node, join.prefix, join.node_key),
            (node, prefix, node_key)
        );
    }

    #[test]
    fn a_revocation_takes_tokens_issued_until_it_and_is_no_join_token() {
        let key = key();
        let verifier = verifier(&key);
        let node: NodeName = "node-a".parse().unwrap();
        let prefix: IpNet = "10.100.1.0/24".parse().unwrap();
        let node_key = node_key();
        let now = SystemTime::now();
        let revocation = revoke(&key, &node, Some("stolen"), now).unwrap();
        let revoked = verifier.verify_revocation(&revocation, now).unwrap();
        assert_eq!(revoked.reason.as_deref(), Some("stolen"));
        let join = |issued| {
            let token = issue(&key, &node, prefix, &node_key, HOUR, issued).unwrap();
            verifier
                .verify(&token, now + Duration::from_secs(2))
                .unwrap()
        };
        assert!(revoked.revokes(&join(now - HOUR / 2)));
        assert!(
            revoked.revokes(&join(now)),
            "the same second is revoked too"
        );
        assert!(!revoked.revokes(&join(now + Duration::from_secs(2))));
        // Neither passes for the other.
        assert_eq!(
            verifier.verify(&revocation, now).unwrap_err().reason(),
            "wrong_audience"
        );
        let token = issue(&key, &node, prefix, &node_key, HOUR, now).unwrap();
        assert_eq!(
            verifier
                .verify_revocation(&token, now)
                .unwrap_err()
                .reason(),
            "wrong_audience"
        );
    }

    #[test]
    fn refuses_tokens_without_a_node_key() {
        let key = key();
        let now = SystemTime::now();
        let unbound = key
            .sign(
                json!({ "sub": "node-a", "aud": [JOIN_AUDIENCE], "mesh_prefix": "10.100.1.0/24" }),
                HOUR,
                now,
            )
            .unwrap();
        assert_eq!(
            verifier(&key).verify(&unbound, now).unwrap_err().reason(),
            "missing_claim"
        );
        let rsa = key
            .sign(
                json!({ "sub": "node-a", "aud": [JOIN_AUDIENCE], "mesh_prefix": "10.100.1.0/24",
                        "cnf": { "jwk": { "kty": "RSA", "crv": "Ed25519", "x": node_key().to_string() } } }),
                HOUR,
                now,
            )
            .unwrap();
        assert_eq!(
            verifier(&key).verify(&rsa, now).unwrap_err().reason(),
            "invalid_claim"
        );
    }

    #[test]
    fn refuses_foreign_expired_and_identity_tokens() {
        let key = key();
        let node: NodeName = "node-a".parse().unwrap();
        let prefix: IpNet = "10.100.1.0/24".parse().unwrap();
        let now = SystemTime::now();
        let token = issue(&key, &node, prefix, &node_key(), HOUR, now).unwrap();

        let other = verifier(&IssuerKey::generate(Algorithm::EdDsa, Some("admin".into())).unwrap());
        assert_eq!(
            other.verify(&token, now).unwrap_err().reason(),
            "bad_signature"
        );
        assert_eq!(
            verifier(&key)
                .verify(&token, now + HOUR)
                .unwrap_err()
                .reason(),
            "expired"
        );

        let id: SpiffeId = "spiffe://acme.internal/agent/a".parse().unwrap();
        let identity = key.issue(&id, IDENTITY_AUDIENCE, HOUR, now).unwrap();
        assert_eq!(
            verifier(&key).verify(&identity, now).unwrap_err().reason(),
            "invalid_claim"
        );
        // Nor does a join token pass for an identity token.
        let identities = Verifier::new(
            TrustBundle::from_json(key.bundle_json().as_bytes()).unwrap(),
            "acme.internal".parse::<TrustDomain>().unwrap(),
            IDENTITY_AUDIENCE,
        );
        assert!(identities.verify(&token, now).is_err());
    }
}
