//! Identity tokens: the verification matrix (valid tokens, and each way a
//! token can be bad, including hand-made attack tokens), SPIRE trust bundles,
//! issuer key files, and `mesh-agent token` run as a user runs it.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::EncodingKey;
use mesh_agent::identity::{
    Algorithm, BundleError, InvalidBundle, IssuerKey, KeyError, LEEWAY, TokenError, TrustBundle,
    VerifiedToken, Verifier,
};
use p256::pkcs8::EncodePrivateKey as _;
use serde_json::{Value, json};

const DOMAIN: &str = "acme.internal";
const BOT: &str = "spiffe://acme.internal/agent/invoice-bot";
const AUDIENCE: &str = "mesh";

/// A fixed "now", 2027-01-15T08:00:00Z, so that times are exact.
fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

fn unix(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/spire")
        .join(name)
}

/// A fresh folder for one test; `name` must be unique to the test.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("tokens")
        .join(name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn verifier(bundle: &str) -> Verifier {
    Verifier::new(
        TrustBundle::from_json(bundle.as_bytes()).unwrap(),
        DOMAIN.parse().unwrap(),
        AUDIENCE,
    )
}

fn issue(key: &IssuerKey, id: &str, ttl: Duration, at: SystemTime) -> String {
    key.issue(&id.parse().unwrap(), AUDIENCE, ttl, at).unwrap()
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// `header.claims`, each part base64url JSON, as a token is signed.
fn signing_input(header: &Value, claims: &Value) -> String {
    format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    )
}

/// Makes tokens by hand, with any header and claims, using the private half
/// of a JWK file: the tests' stand-in for a foreign issuer or an attacker.
struct Signer {
    kid: String,
    alg: jsonwebtoken::Algorithm,
    key: EncodingKey,
}

impl Signer {
    fn from_jwk_file(path: &Path) -> Self {
        let jwk: Value = serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap();
        let d = URL_SAFE_NO_PAD.decode(jwk["d"].as_str().unwrap()).unwrap();
        let (alg, key) = match jwk["alg"].as_str().unwrap() {
            "EdDSA" => {
                let key = ed25519_dalek::SigningKey::from_bytes(&d.try_into().unwrap());
                let der = key.to_pkcs8_der().unwrap();
                (
                    jsonwebtoken::Algorithm::EdDSA,
                    EncodingKey::from_ed_der(der.as_bytes()),
                )
            }
            "ES256" => {
                let der = p256::SecretKey::from_slice(&d)
                    .unwrap()
                    .to_pkcs8_der()
                    .unwrap();
                (
                    jsonwebtoken::Algorithm::ES256,
                    EncodingKey::from_ec_der(der.as_bytes()),
                )
            }
            other => panic!("no test signer for {other}"),
        };
        Self {
            kid: jwk["kid"].as_str().unwrap().to_owned(),
            alg,
            key,
        }
    }

    /// Saves `key` and reads its private half back.
    fn of(key: &IssuerKey, dir: &str) -> Self {
        let saved = key.save(&scratch(dir)).unwrap();
        Self::from_jwk_file(&saved.key)
    }

    fn header(&self) -> Value {
        json!({"alg": format!("{:?}", self.alg), "kid": self.kid, "typ": "JWT"})
    }

    fn sign(&self, header: &Value, claims: &Value) -> String {
        let input = signing_input(header, claims);
        let signature = jsonwebtoken::crypto::sign(input.as_bytes(), &self.key, self.alg).unwrap();
        format!("{input}.{signature}")
    }

    /// A token with this signer's usual header.
    fn token(&self, claims: &Value) -> String {
        self.sign(&self.header(), claims)
    }
}

/// Good claims at [`now`], to spoil one at a time.
fn claims() -> Value {
    let iat = unix(now()) - 10;
    json!({"sub": BOT, "aud": [AUDIENCE], "iat": iat, "exp": iat + 900, "jti": "t-1"})
}

fn with(mut claims: Value, name: &str, value: Value) -> Value {
    claims[name] = value;
    claims
}

fn without(mut claims: Value, name: &str) -> Value {
    claims.as_object_mut().unwrap().remove(name);
    claims
}

/// An EdDSA issuer, its verifier, and a hand signer with its private key.
fn eddsa_setup(dir: &str) -> (IssuerKey, Verifier, Signer) {
    let key = IssuerKey::generate(Algorithm::EdDsa, Some("ed-1".into())).unwrap();
    let verifier = verifier(&key.bundle_json());
    let signer = Signer::of(&key, dir);
    (key, verifier, signer)
}

// ---- Valid tokens -------------------------------------------------------

fn assert_valid(key: &IssuerKey) {
    let verifier = verifier(&key.bundle_json());
    let token = issue(key, BOT, Duration::from_secs(3_600), now());
    let valid = verifier.verify(&token, now()).unwrap();
    let VerifiedToken {
        spiffe_id,
        audience,
        issued_at,
        expires_at,
        jti,
        kid,
        algorithm,
    } = valid;
    assert_eq!(spiffe_id.as_str(), BOT);
    assert_eq!(audience, [AUDIENCE]);
    assert_eq!(issued_at, now());
    assert_eq!(expires_at, now() + Duration::from_secs(3_600));
    assert_eq!(jti.unwrap().len(), 22, "16 random bytes, base64url");
    assert_eq!(kid, key.kid());
    assert_eq!(algorithm, key.algorithm());
}

#[test]
fn a_valid_eddsa_token_verifies() {
    let key = IssuerKey::generate(Algorithm::EdDsa, None).unwrap();
    assert_valid(&key);
    // The default key ID is the RFC 7638 thumbprint: 32 bytes, base64url.
    assert_eq!(key.kid().len(), 43);
}

#[test]
fn a_valid_es256_token_verifies() {
    let key = IssuerKey::generate(Algorithm::Es256, Some("ec-1".into())).unwrap();
    assert_valid(&key);
}

#[test]
fn issued_tokens_are_jwt_svids_with_a_fresh_jti_each() {
    let key = IssuerKey::generate(Algorithm::EdDsa, Some("ed-1".into())).unwrap();
    let token = issue(&key, BOT, Duration::from_secs(60), now());
    let parts = mesh_agent::identity::decode_unverified(&token).unwrap();
    assert_eq!(
        parts.header,
        json!({"alg": "EdDSA", "kid": "ed-1", "typ": "JWT"})
    );
    let iat = unix(now());
    assert_eq!(
        without(parts.claims.clone(), "jti"),
        json!({"sub": BOT, "aud": ["mesh"], "iat": iat, "exp": iat + 60})
    );
    let again =
        mesh_agent::identity::decode_unverified(&issue(&key, BOT, Duration::from_secs(60), now()))
            .unwrap();
    assert_ne!(parts.claims["jti"], again.claims["jti"]);
}

#[test]
fn a_single_string_audience_counts_too() {
    let (_, verifier, signer) = eddsa_setup("single-aud");
    let token = signer.token(&with(claims(), "aud", json!(AUDIENCE)));
    assert_eq!(verifier.verify(&token, now()).unwrap().audience, [AUDIENCE]);
    let token = signer.token(&with(claims(), "aud", json!(["other", AUDIENCE])));
    assert!(verifier.verify(&token, now()).is_ok());
}

// ---- Time ---------------------------------------------------------------

#[test]
fn a_token_is_expired_from_exp_on() {
    let key = IssuerKey::generate(Algorithm::EdDsa, None).unwrap();
    let verifier = verifier(&key.bundle_json());
    let token = issue(&key, BOT, Duration::from_secs(3_600), now());
    let exp = now() + Duration::from_secs(3_600);
    assert!(
        verifier
            .verify(&token, exp - Duration::from_secs(1))
            .is_ok()
    );
    let expired = TokenError::Expired {
        expired_at: unix(exp),
        now: unix(exp),
    };
    assert_eq!(verifier.verify(&token, exp), Err(expired));
    let error = verifier
        .verify(&token, exp + Duration::from_secs(7_200))
        .unwrap_err();
    assert_eq!(error.reason(), "expired");
    assert_eq!(
        error.to_string(),
        "expired at 2027-01-15T09:00:00Z (7200 s ago)"
    );
}

#[test]
fn a_token_from_the_future_is_not_yet_valid_beyond_the_leeway() {
    let key = IssuerKey::generate(Algorithm::Es256, None).unwrap();
    let verifier = verifier(&key.bundle_json());
    // Issued by a clock that runs ahead of ours.
    let within = issue(&key, BOT, Duration::from_secs(600), now() + LEEWAY);
    assert!(verifier.verify(&within, now()).is_ok());
    let beyond = issue(
        &key,
        BOT,
        Duration::from_secs(600),
        now() + LEEWAY + Duration::from_secs(1),
    );
    let error = verifier.verify(&beyond, now()).unwrap_err();
    assert_eq!(
        error,
        TokenError::NotYetValid {
            claim: "iat",
            at: unix(now()) + 61,
            now: unix(now()),
        }
    );
    assert_eq!(
        error.to_string(),
        "not yet valid: `iat` is 2027-01-15T08:01:01Z, 61 s from now, more than the 60 s leeway"
    );
}

#[test]
fn nbf_in_the_future_is_not_yet_valid() {
    let (_, verifier, signer) = eddsa_setup("nbf");
    let at = unix(now()) + 300;
    let token = signer.token(&with(claims(), "nbf", json!(at)));
    assert_eq!(
        verifier.verify(&token, now()),
        Err(TokenError::NotYetValid {
            claim: "nbf",
            at,
            now: unix(now()),
        })
    );
    let token = signer.token(&with(claims(), "nbf", json!(unix(now()))));
    assert!(verifier.verify(&token, now()).is_ok());
}

// ---- Identity and audience ----------------------------------------------

#[test]
fn a_token_for_another_audience_is_refused() {
    let key = IssuerKey::generate(Algorithm::EdDsa, None).unwrap();
    let token = key
        .issue(
            &BOT.parse().unwrap(),
            "billing-api",
            Duration::from_secs(60),
            now(),
        )
        .unwrap();
    let error = verifier(&key.bundle_json())
        .verify(&token, now())
        .unwrap_err();
    assert_eq!(
        error,
        TokenError::WrongAudience {
            expected: AUDIENCE.into(),
            found: vec!["billing-api".into()],
        }
    );
    assert_eq!(error.reason(), "wrong_audience");
}

#[test]
fn an_identity_of_another_trust_domain_is_refused() {
    let key = IssuerKey::generate(Algorithm::EdDsa, None).unwrap();
    let token = issue(
        &key,
        "spiffe://evil.example/agent/invoice-bot",
        Duration::from_secs(60),
        now(),
    );
    let error = verifier(&key.bundle_json())
        .verify(&token, now())
        .unwrap_err();
    assert_eq!(error.reason(), "foreign_trust_domain");
    assert_eq!(
        error.to_string(),
        "spiffe://evil.example/agent/invoice-bot is in trust domain `evil.example`, not `acme.internal`"
    );
}

#[test]
fn a_subject_that_is_no_spiffe_id_is_refused() {
    let (_, verifier, signer) = eddsa_setup("bad-sub");
    for sub in [
        "invoice-bot",
        "spiffe://acme.internal",
        "spiffe://acme.internal/a/../admin",
    ] {
        let error = verifier
            .verify(&signer.token(&with(claims(), "sub", json!(sub))), now())
            .unwrap_err();
        assert!(
            matches!(error, TokenError::InvalidClaim { claim: "sub", .. }),
            "{sub}: {error}"
        );
    }
}

#[test]
fn each_required_claim_must_be_there() {
    let (_, verifier, signer) = eddsa_setup("missing-claims");
    for claim in ["sub", "aud", "exp", "iat"] {
        let token = signer.token(&without(claims(), claim));
        assert_eq!(
            verifier.verify(&token, now()),
            Err(TokenError::MissingClaim(claim))
        );
    }
    // `jti` is optional: SPIRE's JWT-SVIDs have none.
    let token = signer.token(&without(claims(), "jti"));
    assert_eq!(verifier.verify(&token, now()).unwrap().jti, None);
}

#[test]
fn claims_of_the_wrong_type_are_malformed() {
    let (_, verifier, signer) = eddsa_setup("claim-types");
    for (claim, value) in [
        ("exp", json!("tomorrow")),
        ("exp", json!(-1)),
        ("exp", json!(1.5e9)),
        ("iat", json!(null)),
        ("sub", json!(["spiffe://acme.internal/a"])),
        ("aud", json!(42)),
        ("jti", json!(7)),
    ] {
        let error = verifier
            .verify(&signer.token(&with(claims(), claim, value.clone())), now())
            .unwrap_err();
        let expected = if value.is_null() {
            TokenError::MissingClaim("iat").reason()
        } else {
            "malformed"
        };
        assert_eq!(error.reason(), expected, "{claim}: {value}: {error}");
    }
}

#[test]
fn a_repeated_claim_is_malformed_rather_than_read_two_ways() {
    let (_, verifier, signer) = eddsa_setup("duplicate-claim");
    let iat = unix(now());
    let claims = format!(
        r#"{{"sub":"{BOT}","sub":"spiffe://acme.internal/admin","aud":"mesh","iat":{iat},"exp":{}}}"#,
        iat + 60
    );
    let input = format!(
        "{}.{}",
        b64(signer.header().to_string().as_bytes()),
        b64(claims.as_bytes())
    );
    let signature = jsonwebtoken::crypto::sign(input.as_bytes(), &signer.key, signer.alg).unwrap();
    let error = verifier
        .verify(&format!("{input}.{signature}"), now())
        .unwrap_err();
    assert!(
        error.to_string().contains("duplicate field `sub`"),
        "{error}"
    );
}

// ---- Keys and signatures --------------------------------------------------

#[test]
fn a_key_id_not_in_the_bundle_is_refused() {
    let key = IssuerKey::generate(Algorithm::EdDsa, Some("old".into())).unwrap();
    let other = IssuerKey::generate(Algorithm::EdDsa, Some("new".into())).unwrap();
    let token = issue(&key, BOT, Duration::from_secs(60), now());
    let error = verifier(&other.bundle_json())
        .verify(&token, now())
        .unwrap_err();
    assert_eq!(error, TokenError::UnknownKeyId("old".into()));
    assert_eq!(error.reason(), "unknown_key_id");
}

#[test]
fn a_token_without_a_key_id_is_refused() {
    let (_, verifier, signer) = eddsa_setup("no-kid");
    let token = signer.sign(&json!({"alg": "EdDSA", "typ": "JWT"}), &claims());
    assert_eq!(
        verifier.verify(&token, now()),
        Err(TokenError::MissingKeyId)
    );
}

#[test]
fn a_token_signed_by_another_key_with_the_same_id_is_refused() {
    let trusted = IssuerKey::generate(Algorithm::Es256, Some("k1".into())).unwrap();
    let impostor = IssuerKey::generate(Algorithm::Es256, Some("k1".into())).unwrap();
    let token = issue(&impostor, BOT, Duration::from_secs(60), now());
    assert_eq!(
        verifier(&trusted.bundle_json()).verify(&token, now()),
        Err(TokenError::BadSignature("k1".into()))
    );
}

#[test]
fn changing_any_claim_breaks_the_signature() {
    let (key, verifier, _) = eddsa_setup("tamper");
    let token = issue(&key, BOT, Duration::from_secs(60), now());
    let [header, _, signature]: [&str; 3] =
        token.split('.').collect::<Vec<_>>().try_into().unwrap();
    let forged = with(claims(), "sub", json!("spiffe://acme.internal/admin"));
    let token = format!(
        "{header}.{}.{signature}",
        b64(forged.to_string().as_bytes())
    );
    assert_eq!(
        verifier.verify(&token, now()),
        Err(TokenError::BadSignature("ed-1".into()))
    );
}

#[test]
fn an_algorithm_that_does_not_fit_the_key_is_refused() {
    // ES256 named in the header of a token for an Ed25519 key.
    let key = IssuerKey::generate(Algorithm::EdDsa, Some("ed-1".into())).unwrap();
    let verifier = verifier(&key.bundle_json());
    let header = json!({"alg": "ES256", "kid": "ed-1", "typ": "JWT"});
    let token = format!("{}.{}", signing_input(&header, &claims()), b64(&[0; 64]));
    let error = verifier.verify(&token, now()).unwrap_err();
    assert_eq!(
        error,
        TokenError::AlgorithmMismatch {
            algorithm: Algorithm::Es256,
            kid: "ed-1".into(),
            key: "EdDSA".into(),
        }
    );
}

// ---- Attack tokens, made by hand ----------------------------------------

#[test]
fn alg_none_is_refused() {
    let (_, verifier, _) = eddsa_setup("alg-none");
    for alg in ["none", "None", "NONE", "nOnE"] {
        for header in [
            json!({"alg": alg, "typ": "JWT"}),
            json!({"alg": alg, "kid": "ed-1", "typ": "JWT"}),
        ] {
            // Unsigned: the signature part is empty, or left in place.
            for signature in ["", "c2lnbmF0dXJl"] {
                let token = format!("{}.{signature}", signing_input(&header, &claims()));
                assert_eq!(
                    verifier.verify(&token, now()),
                    Err(TokenError::DisallowedAlgorithm(alg.into())),
                    "{token}"
                );
            }
        }
    }
}

/// HMAC over the token with `secret`, as an attacker who hopes the verifier
/// uses the public key as an HMAC secret would sign it.
fn hmac_token(alg: jsonwebtoken::Algorithm, kid: &str, secret: &[u8]) -> String {
    let header = json!({"alg": format!("{alg:?}"), "kid": kid, "typ": "JWT"});
    let input = signing_input(&header, &claims());
    let key = EncodingKey::from_secret(secret).unwrap();
    let signature = jsonwebtoken::crypto::sign(input.as_bytes(), &key, alg).unwrap();
    format!("{input}.{signature}")
}

#[test]
fn hs256_signed_with_the_public_key_is_refused() {
    let key = IssuerKey::generate(Algorithm::EdDsa, Some("ed-1".into())).unwrap();
    let bundle = key.bundle_json();
    let verifier = verifier(&bundle);
    let jwk: Value = serde_json::from_str::<Value>(&bundle).unwrap()["keys"][0].clone();
    let x = URL_SAFE_NO_PAD.decode(jwk["x"].as_str().unwrap()).unwrap();
    // The public key in each form a confused verifier might use as secret:
    // raw bytes, its base64url, its JWK, the bundle, and SPKI PEM.
    let spki = [
        &[
            0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
        ][..],
        &x,
    ]
    .concat();
    let pem = format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        base64::engine::general_purpose::STANDARD.encode(&spki)
    );
    let secrets: [&[u8]; 5] = [
        &x,
        jwk["x"].as_str().unwrap().as_bytes(),
        &serde_json::to_vec(&jwk).unwrap(),
        bundle.as_bytes(),
        pem.as_bytes(),
    ];
    for secret in secrets {
        for alg in [
            jsonwebtoken::Algorithm::HS256,
            jsonwebtoken::Algorithm::HS384,
            jsonwebtoken::Algorithm::HS512,
        ] {
            let token = hmac_token(alg, "ed-1", secret);
            let error = verifier.verify(&token, now()).unwrap_err();
            assert_eq!(error, TokenError::DisallowedAlgorithm(format!("{alg:?}")));
            assert_eq!(error.reason(), "disallowed_algorithm");
        }
    }
}

#[test]
fn other_algorithms_are_refused() {
    let (_, verifier, _) = eddsa_setup("other-algs");
    for alg in [
        "RS256", "PS256", "ES384", "ES512", "Ed25519", "eddsa", "EdDSA ", "",
    ] {
        let header = json!({"alg": alg, "kid": "ed-1"});
        let token = format!("{}.{}", signing_input(&header, &claims()), b64(&[0; 64]));
        assert_eq!(
            verifier.verify(&token, now()),
            Err(TokenError::DisallowedAlgorithm(alg.into()))
        );
    }
}

#[test]
fn unknown_critical_extensions_and_types_are_refused() {
    let (_, verifier, signer) = eddsa_setup("crit");
    let token = signer.sign(
        &json!({"alg": "EdDSA", "kid": "ed-1", "crit": ["b64"], "b64": false}),
        &claims(),
    );
    assert_eq!(
        verifier.verify(&token, now()).unwrap_err().reason(),
        "malformed"
    );
    let token = signer.sign(
        &json!({"alg": "EdDSA", "kid": "ed-1", "typ": "at+jwt"}),
        &claims(),
    );
    assert_eq!(
        verifier.verify(&token, now()).unwrap_err().reason(),
        "malformed"
    );
    let token = signer.sign(
        &json!({"alg": "EdDSA", "kid": "ed-1", "typ": "JOSE"}),
        &claims(),
    );
    assert!(verifier.verify(&token, now()).is_ok());
}

// ---- Broken tokens --------------------------------------------------------

#[test]
fn every_truncation_of_a_token_is_refused() {
    let key = IssuerKey::generate(Algorithm::Es256, Some("ec-1".into())).unwrap();
    let verifier = verifier(&key.bundle_json());
    let token = issue(&key, BOT, Duration::from_secs(60), now());
    assert!(verifier.verify(&token, now()).is_ok());
    for len in 0..token.len() {
        let error = verifier.verify(&token[..len], now()).unwrap_err();
        assert!(
            matches!(
                error,
                TokenError::Malformed(_) | TokenError::BadSignature(_)
            ),
            "{len}: {error}"
        );
    }
    // Without its signature: a JWS, not a JWT with two parts.
    let unsigned = &token[..token.rfind('.').unwrap()];
    assert_eq!(
        verifier.verify(unsigned, now()),
        Err(TokenError::Malformed(
            "expected 3 parts separated by `.` (header.claims.signature), found 2".into()
        ))
    );
}

#[test]
fn garbage_is_malformed() {
    let (key, verifier, _) = eddsa_setup("garbage");
    let token = issue(&key, BOT, Duration::from_secs(60), now());
    let long = format!("{token}{}", "A".repeat(9_000));
    let inputs = [
        "",
        "garbage",
        "..",
        "a.b.c",
        "a.b.c.d.e",
        "e30.e30.",
        "W10.e30.AA",
        "bnVsbA.e30.AA",
        "\u{0}\u{ff}.\u{7f}.x",
        "eyJhbGciOiJFZERTQSJ9=.e30.AA",
        &long,
    ];
    for input in inputs {
        let error = verifier.verify(input, now()).unwrap_err();
        assert_eq!(error.reason(), "malformed", "{input:?}: {error}");
    }
    // Valid header, claims that are not JSON: refused at the signature,
    // which is checked before the claims are read.
    let header = b64(br#"{"alg":"EdDSA","kid":"ed-1"}"#);
    let error = verifier
        .verify(&format!("{header}.bm90IGpzb24.{}", b64(&[0; 64])), now())
        .unwrap_err();
    assert_eq!(error, TokenError::BadSignature("ed-1".into()));
    // A signature of the wrong length.
    let short = format!(
        "{}.{}",
        signing_input(&json!({"alg": "EdDSA", "kid": "ed-1"}), &claims()),
        b64(&[0; 63])
    );
    assert_eq!(
        verifier.verify(&short, now()).unwrap_err().reason(),
        "malformed"
    );
}

// ---- SPIRE bundles ----------------------------------------------------------

fn spire_bundle() -> String {
    fs::read_to_string(fixture("bundle.json")).unwrap()
}

fn spire_verifier() -> Verifier {
    Verifier::new(
        TrustBundle::load(&fixture("bundle.json")).unwrap(),
        DOMAIN.parse().unwrap(),
        AUDIENCE,
    )
}

/// Claims as SPIRE puts them in a JWT-SVID: `aud` an array, no `jti`.
fn spire_claims() -> Value {
    without(claims(), "jti")
}

#[test]
fn a_spire_bundle_serves_as_trust_bundle() {
    let bundle = TrustBundle::load(&fixture("bundle.json")).unwrap();
    // In key ID order.
    assert_eq!(
        bundle.keys().collect::<Vec<_>>(),
        [
            ("1v0B5NkS3Ya00vtJg6fUD2nzCFJkxBuh", Algorithm::Es256),
            ("Zm2vCbsSrVjKnatFfLQpU1yocEbsnwuu", Algorithm::Es256),
        ]
    );
    let verifier = spire_verifier();
    for key in ["jwt-signer.jwk", "jwt-next.jwk"] {
        let signer = Signer::from_jwk_file(&fixture(key));
        let valid = verifier
            .verify(&signer.token(&spire_claims()), now())
            .unwrap();
        assert_eq!(valid.spiffe_id.as_str(), BOT);
        assert_eq!(valid.kid, signer.kid);
        assert_eq!(valid.jti, None);
    }
}

#[test]
fn the_x509_authority_of_a_spire_bundle_signs_no_tokens() {
    let ca = Signer::from_jwk_file(&fixture("x509-ca.jwk"));
    // Under a key ID of its own, even one written into its bundle entry...
    let mut bundle: Value = serde_json::from_str(&spire_bundle()).unwrap();
    assert_eq!(bundle["keys"][0]["use"], "x509-svid");
    bundle["keys"][0]["kid"] = json!(ca.kid);
    let verifier = Verifier::new(
        TrustBundle::from_json(bundle.to_string().as_bytes()).unwrap(),
        DOMAIN.parse().unwrap(),
        AUDIENCE,
    );
    assert_eq!(
        verifier.verify(&ca.token(&spire_claims()), now()),
        Err(TokenError::UnknownKeyId("x509-ca".into()))
    );
    // ...or under the ID of a JWT key.
    let kid = "Zm2vCbsSrVjKnatFfLQpU1yocEbsnwuu";
    let token = ca.sign(
        &json!({"alg": "ES256", "kid": kid, "typ": "JWT"}),
        &spire_claims(),
    );
    assert_eq!(
        verifier.verify(&token, now()),
        Err(TokenError::BadSignature(kid.into()))
    );
}

fn bundle_error(json: &str) -> InvalidBundle {
    match TrustBundle::from_json(json.as_bytes()) {
        Ok(_) => panic!("accepted: {json}"),
        Err(error) => error,
    }
}

#[test]
fn a_bundle_without_usable_jwt_keys_is_refused() {
    let mut bundle: Value = serde_json::from_str(&spire_bundle()).unwrap();
    bundle["keys"].as_array_mut().unwrap().truncate(1);
    let error = bundle_error(&bundle.to_string());
    assert!(matches!(
        error,
        InvalidBundle::NoUsableKey { unsupported: 0 }
    ));
    assert_eq!(
        error.to_string(),
        "no EdDSA (OKP Ed25519) or ES256 (EC P-256) key with \"use\": \"jwt-svid\""
    );
    // Keys with another `use`, or none, are not JWT-SVID keys.
    let jwk = serde_json::from_str::<Value>(&spire_bundle()).unwrap()["keys"][1].clone();
    for key_use in [json!("sig"), json!(null)] {
        let bundle = json!({"keys": [with(jwk.clone(), "use", key_use)]});
        assert!(matches!(
            bundle_error(&bundle.to_string()),
            InvalidBundle::NoUsableKey { .. }
        ));
    }
    assert!(matches!(
        bundle_error(r#"{"keys": []}"#),
        InvalidBundle::NoUsableKey { .. }
    ));
    assert!(matches!(
        bundle_error(r#"{"kty": "EC"}"#),
        InvalidBundle::NotJwks(_)
    ));
    assert!(matches!(
        bundle_error("not json"),
        InvalidBundle::NotJwks(_)
    ));
}

/// A SPIRE server whose JWT keys are RSA, with one EC key beside.
fn rsa_bundle() -> Value {
    let mut bundle: Value = serde_json::from_str(&spire_bundle()).unwrap();
    let rsa = json!({"use": "jwt-svid", "kty": "RSA", "kid": "rsa-1", "n": b64(&[0xc5; 256]), "e": "AQAB"});
    bundle["keys"].as_array_mut().unwrap().push(rsa);
    bundle
}

#[test]
fn jwt_keys_of_other_types_are_kept_out_of_use() {
    let verifier = Verifier::new(
        TrustBundle::from_json(rsa_bundle().to_string().as_bytes()).unwrap(),
        DOMAIN.parse().unwrap(),
        AUDIENCE,
    );
    let header = json!({"alg": "RS256", "kid": "rsa-1"});
    let token = format!("{}.{}", signing_input(&header, &claims()), b64(&[1; 256]));
    assert_eq!(
        verifier.verify(&token, now()),
        Err(TokenError::DisallowedAlgorithm("RS256".into()))
    );
    let header = json!({"alg": "ES256", "kid": "rsa-1"});
    let token = format!("{}.{}", signing_input(&header, &claims()), b64(&[1; 64]));
    assert_eq!(
        verifier.verify(&token, now()).unwrap_err().reason(),
        "algorithm_mismatch"
    );
    let mut only_rsa = rsa_bundle();
    only_rsa["keys"].as_array_mut().unwrap().drain(..3);
    assert!(matches!(
        bundle_error(&only_rsa.to_string()),
        InvalidBundle::NoUsableKey { unsupported: 1 }
    ));
}

#[test]
fn bad_jwt_keys_make_the_bundle_invalid() {
    let jwk = serde_json::from_str::<Value>(&spire_bundle()).unwrap()["keys"][1].clone();
    let one = |key: Value| json!({"keys": [key]}).to_string();
    let reason = |key: Value| match bundle_error(&one(key)) {
        InvalidBundle::BadKey { index: 0, reason } => reason,
        other => panic!("{other}"),
    };
    assert!(reason(without(jwk.clone(), "kid")).contains("no `kid`"));
    assert!(reason(with(jwk.clone(), "kid", json!(""))).contains("no `kid`"));
    assert!(reason(with(jwk.clone(), "d", json!("AAAA"))).contains("private key material"));
    assert!(reason(with(jwk.clone(), "x", json!("AAAA"))).contains("`x` is not 32 bytes"));
    let off_curve = with(jwk.clone(), "y", json!(b64(&[1; 32])));
    assert!(reason(off_curve).contains("not a point on P-256"));
    assert!(reason(with(jwk.clone(), "alg", json!("EdDSA"))).contains("`alg` is EdDSA"));
    let weak = json!({"use": "jwt-svid", "kty": "OKP", "crv": "Ed25519", "kid": "w", "x": b64(&[[1].as_slice(), &[0; 31]].concat())});
    assert!(reason(weak).contains("weak"));
    let twice = json!({"keys": [jwk, jwk]}).to_string();
    assert!(matches!(
        bundle_error(&twice),
        InvalidBundle::DuplicateKeyId(kid) if kid == "Zm2vCbsSrVjKnatFfLQpU1yocEbsnwuu"
    ));
}

#[test]
fn a_bundle_file_that_cannot_be_read_is_named() {
    let Err(error) = TrustBundle::load(Path::new("no/such/bundle.json")) else {
        panic!("loaded a missing file");
    };
    assert!(matches!(error, BundleError::Read { .. }));
    assert_eq!(error.to_string(), "no/such/bundle.json: cannot read");
}

// ---- Issuer keys ------------------------------------------------------------

#[test]
fn keys_survive_saving_and_loading() {
    for algorithm in [Algorithm::EdDsa, Algorithm::Es256] {
        let key = IssuerKey::generate(algorithm, None).unwrap();
        let dir = scratch(&format!("roundtrip-{algorithm}"));
        let saved = key.save(&dir).unwrap();
        assert_eq!(saved.key, dir.join("issuer.jwk"));
        assert_eq!(saved.bundle, dir.join("bundle.json"));
        let loaded = IssuerKey::load(&saved.key).unwrap();
        assert_eq!((loaded.kid(), loaded.algorithm()), (key.kid(), algorithm));
        let verifier = Verifier::new(
            TrustBundle::load(&saved.bundle).unwrap(),
            DOMAIN.parse().unwrap(),
            AUDIENCE,
        );
        let token = issue(&loaded, BOT, Duration::from_secs(60), now());
        assert!(verifier.verify(&token, now()).is_ok());
    }
    // A private JWK made elsewhere loads too.
    let ca = IssuerKey::load(&fixture("x509-ca.jwk")).unwrap();
    assert_eq!((ca.kid(), ca.algorithm()), ("x509-ca", Algorithm::Es256));
}

#[test]
fn saving_never_replaces_a_key() {
    let dir = scratch("no-replace");
    let first = IssuerKey::generate(Algorithm::EdDsa, None).unwrap();
    first.save(&dir).unwrap();
    let before = fs::read(dir.join("issuer.jwk")).unwrap();
    let second = IssuerKey::generate(Algorithm::EdDsa, None).unwrap();
    let error = second.save(&dir).unwrap_err();
    assert!(matches!(error, KeyError::Write { .. }), "{error}");
    assert_eq!(fs::read(dir.join("issuer.jwk")).unwrap(), before);
    // Nor leaves a key without its bundle.
    let dir = scratch("no-half");
    fs::write(dir.join("bundle.json"), "{}").unwrap();
    assert!(second.save(&dir).is_err());
    assert!(!dir.join("issuer.jwk").exists());
}

#[test]
fn broken_key_files_are_refused_without_quoting_the_secret() {
    let dir = scratch("broken-keys");
    let key = IssuerKey::generate(Algorithm::Es256, Some("k".into())).unwrap();
    let saved = key.save(&dir.join("good")).unwrap();
    let good: Value = serde_json::from_str(&fs::read_to_string(&saved.key).unwrap()).unwrap();
    let d = good["d"].as_str().unwrap().to_owned();
    let other = IssuerKey::generate(Algorithm::Es256, None).unwrap();
    let other_x =
        serde_json::from_str::<Value>(&other.bundle_json()).unwrap()["keys"][0]["x"].clone();
    let cases = [
        (without(good.clone(), "d"), "no private key"),
        (
            with(good.clone(), "d", json!(format!("{d}AA"))),
            "`d` is not 32 bytes",
        ),
        (
            with(good.clone(), "d", json!(format!("{}!", &d[1..]))),
            "`d` is not 32 bytes",
        ),
        (with(good.clone(), "x", other_x), "is not that of `d`"),
        (
            with(good.clone(), "alg", json!("HS256")),
            "`alg` is not EdDSA or ES256",
        ),
        (without(good.clone(), "kid"), "no key ID"),
        (
            with(good.clone(), "kid", json!("two words")),
            "invalid key ID",
        ),
        (json!([d.clone()]), "no private key"),
    ];
    for (index, (file, expected)) in cases.into_iter().enumerate() {
        let path = dir.join(format!("{index}.jwk"));
        fs::write(&path, file.to_string()).unwrap();
        let error = IssuerKey::load(&path).unwrap_err().to_string();
        assert!(error.contains(expected), "{index}: {error}");
        assert!(!error.contains(&d[..8]), "{index} quotes the key: {error}");
    }
    assert!(!format!("{key:?}").contains(&d[..8]));
}

#[test]
fn key_ids_are_printable() {
    for kid in ["", "two words", "tab\t", "é", &"k".repeat(256)] {
        let error = IssuerKey::generate(Algorithm::EdDsa, Some(kid.into())).unwrap_err();
        assert!(matches!(error, KeyError::KeyId(_)), "{kid:?}");
    }
}

#[test]
fn lifetimes_are_bounded() {
    let key = IssuerKey::generate(Algorithm::EdDsa, None).unwrap();
    let id = BOT.parse().unwrap();
    for ttl in [
        Duration::ZERO,
        Duration::from_millis(999),
        Duration::from_secs(366 * 86_400),
    ] {
        assert!(matches!(
            key.issue(&id, AUDIENCE, ttl, now()),
            Err(KeyError::Ttl(_))
        ));
    }
}

// ---- The command line -------------------------------------------------------

fn mesh_agent(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mesh-agent"))
        .args(args)
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).unwrap()
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// `keygen` into a fresh folder, under umask 000 so that only the modes the
/// agent asks for count.
fn keygen(name: &str, args: &[&str]) -> (PathBuf, Output) {
    let dir = scratch(name).join("keys");
    let output = Command::new("sh")
        .arg("-c")
        .arg(r#"umask 000; exec "$0" "$@""#)
        .arg(env!("CARGO_BIN_EXE_mesh-agent"))
        .args(["token", "keygen", "--out", dir.to_str().unwrap()])
        .args(args)
        .output()
        .unwrap();
    (dir, output)
}

fn private_d(dir: &Path) -> String {
    let jwk: Value =
        serde_json::from_str(&fs::read_to_string(dir.join("issuer.jwk")).unwrap()).unwrap();
    jwk["d"].as_str().unwrap().to_owned()
}

#[test]
fn keygen_writes_a_private_key_only_its_owner_can_read() {
    let (dir, output) = keygen("cli-keygen", &["--alg", "es256", "--kid", "node-1"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert_eq!(mode(&dir.join("issuer.jwk")), 0o600);
    assert_eq!(mode(&dir.join("bundle.json")), 0o644);
    assert_eq!(mode(&dir), 0o700);
    let stdout = text(&output.stdout);
    assert_eq!(
        stdout,
        format!(
            "private key: {0}/issuer.jwk (mode 0600; keep it secret)\n\
             trust bundle: {0}/bundle.json\n\
             key ID: node-1 (ES256)\n",
            dir.display()
        )
    );
    assert!(!stdout.contains(&private_d(&dir)));
    let bundle = TrustBundle::load(&dir.join("bundle.json")).unwrap();
    assert_eq!(
        bundle.keys().collect::<Vec<_>>(),
        [("node-1", Algorithm::Es256)]
    );

    // Run again: refused, and the key is untouched.
    let before = fs::read(dir.join("issuer.jwk")).unwrap();
    let again = mesh_agent(&["token", "keygen", "--out", dir.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(1));
    assert_eq!(
        text(&again.stderr),
        format!(
            "{}/issuer.jwk: cannot write: File exists (os error 17)\n",
            dir.display()
        )
    );
    assert_eq!(fs::read(dir.join("issuer.jwk")).unwrap(), before);
}

#[test]
fn issue_then_inspect_a_valid_token() {
    let (dir, output) = keygen("cli-valid", &["--kid", "node-1"]);
    assert_eq!(output.status.code(), Some(0));
    let key = dir.join("issuer.jwk");
    let bundle = dir.join("bundle.json");
    let issued = mesh_agent(&[
        "token",
        "issue",
        "--key",
        key.to_str().unwrap(),
        "--id",
        BOT,
        "--ttl",
        "15m",
    ]);
    assert_eq!(issued.status.code(), Some(0), "{}", text(&issued.stderr));
    let token = text(&issued.stdout).trim_end().to_owned();
    assert_eq!(token.split('.').count(), 3);
    assert!(!text(&issued.stdout).contains(&private_d(&dir)));

    let token_file = dir.join("token");
    fs::write(&token_file, format!("{token}\n")).unwrap();
    let at_file = format!("@{}", token_file.display());
    for arg in [token.as_str(), at_file.as_str()] {
        let output = mesh_agent(&[
            "token",
            "inspect",
            arg,
            "--bundle",
            bundle.to_str().unwrap(),
            "--trust-domain",
            DOMAIN,
        ]);
        assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
        let stdout = text(&output.stdout);
        assert!(
            stdout.starts_with("header: {\n  \"alg\": \"EdDSA\",\n  \"kid\": \"node-1\""),
            "{stdout}"
        );
        assert!(stdout.contains(&format!("\"sub\": \"{BOT}\"")), "{stdout}");
        assert!(
            stdout.contains(&format!("valid: {BOT}\n  audience: mesh\n")),
            "{stdout}"
        );
        let left = stdout
            .split_once("(in ")
            .and_then(|(_, rest)| rest.split_once(" s)\n"))
            .map(|(secs, _)| secs.parse::<u64>().unwrap());
        assert!(matches!(left, Some(890..=900)), "{stdout}");
        assert!(stdout.contains("  key:      node-1 (EdDSA)\n"), "{stdout}");
        assert_eq!(text(&output.stderr), "");
    }

    // From stdin, with the trust domain taken from a policy.
    let mut child = Command::new(env!("CARGO_BIN_EXE_mesh-agent"))
        .args([
            "token",
            "inspect",
            "-",
            "--bundle",
            bundle.to_str().unwrap(),
            "--policy",
        ])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policy.toml"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(token.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
}

#[test]
fn inspect_explains_why_a_token_is_invalid() {
    let (dir, _) = keygen("cli-invalid", &["--kid", "node-1"]);
    let key = IssuerKey::load(&dir.join("issuer.jwk")).unwrap();
    let bundle = dir.join("bundle.json");
    let hour = Duration::from_secs(3_600);
    let expired = issue(&key, BOT, hour, SystemTime::now() - 2 * hour);
    let fresh = issue(&key, BOT, hour, SystemTime::now());
    let none = format!(
        "{}.",
        signing_input(&json!({"alg": "none", "kid": "node-1"}), &claims())
    );
    let cases: [(&str, &[&str], &str); 5] = [
        (&expired, &[], "invalid token (expired): expired at "),
        (
            &fresh,
            &["--aud", "billing-api"],
            "invalid token (wrong_audience): wrong audience: the token is for [\"mesh\"], not `billing-api`\n",
        ),
        (
            &fresh,
            &["--trust-domain", "other.internal"],
            "invalid token (foreign_trust_domain): ",
        ),
        (
            &none,
            &[],
            "invalid token (disallowed_algorithm): algorithm `none` is not allowed; expected EdDSA or ES256\n",
        ),
        (
            "garbage",
            &[],
            "invalid token (malformed): malformed: expected 3 parts separated by `.` (header.claims.signature), found 1\n",
        ),
    ];
    for (token, extra, reason) in cases {
        let mut args = vec![
            "token",
            "inspect",
            token,
            "--bundle",
            bundle.to_str().unwrap(),
        ];
        if !extra.contains(&"--trust-domain") {
            args.extend(["--trust-domain", DOMAIN]);
        }
        args.extend(extra);
        let output = mesh_agent(&args);
        assert_eq!(output.status.code(), Some(1), "{reason}");
        assert!(
            text(&output.stderr).starts_with(reason),
            "{}",
            text(&output.stderr)
        );
        assert!(!text(&output.stdout).contains("valid:"));
    }
}

#[test]
fn inspect_needs_a_trust_domain_and_a_readable_bundle() {
    let output = mesh_agent(&["token", "inspect", "x.y.z", "--bundle", "b.json"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output.stderr).contains("--trust-domain <NAME>"));
    let output = mesh_agent(&[
        "token",
        "inspect",
        "x.y.z",
        "--bundle",
        "no/such/bundle.json",
        "--trust-domain",
        DOMAIN,
    ]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        text(&output.stderr),
        "no/such/bundle.json: cannot read: No such file or directory (os error 2)\n"
    );
}

#[test]
fn issue_refuses_bad_arguments() {
    let (dir, _) = keygen("cli-issue-args", &[]);
    let key = dir.join("issuer.jwk");
    let bundle = dir.join("bundle.json");
    for (args, message) in [
        (["--id", BOT, "--ttl", "1w"], "is not a lifetime"),
        (["--id", BOT, "--ttl", "0s"], "never valid"),
        (
            ["--id", "spiffe://acme.internal/", "--ttl", "1h"],
            "a trailing `/` is not allowed",
        ),
    ] {
        let mut all = vec!["token", "issue", "--key", key.to_str().unwrap()];
        all.extend(args);
        let output = mesh_agent(&all);
        assert_eq!(output.status.code(), Some(2));
        assert!(
            text(&output.stderr).contains(message),
            "{}",
            text(&output.stderr)
        );
    }
    // The bundle is no key.
    let output = mesh_agent(&[
        "token",
        "issue",
        "--key",
        bundle.to_str().unwrap(),
        "--id",
        BOT,
        "--ttl",
        "1h",
    ]);
    assert_eq!(output.status.code(), Some(1));
    assert!(text(&output.stderr).contains("not an issuer key: no private key (`d`)"));
}

// ---- The documentation ------------------------------------------------------

/// The `sh` blocks of docs/identity.md, run in order in one shell, in an
/// empty folder with the agent on the PATH: the examples work as written.
#[test]
fn the_documented_commands_run() {
    let doc = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/identity.md"))
        .unwrap();
    let mut script = String::new();
    let mut in_sh = false;
    for line in doc.lines() {
        match line.strip_prefix("```") {
            Some("sh") => in_sh = true,
            Some(_) => in_sh = false,
            None if in_sh => {
                script.push_str(line);
                script.push('\n');
            }
            None => {}
        }
    }
    assert!(script.contains("mesh-agent token inspect"), "{script}");
    let bin = Path::new(env!("CARGO_BIN_EXE_mesh-agent"))
        .parent()
        .unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let dir = scratch("docs");
    fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policy.toml"),
        dir.join("policy.toml"),
    )
    .unwrap();
    let output = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(&dir)
        .env("PATH", path)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{script}\nstdout:\n{}\nstderr:\n{}",
        text(&output.stdout),
        text(&output.stderr)
    );
}
