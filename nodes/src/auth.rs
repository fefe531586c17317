//! Callers of the gRPC API (DESIGN §10): bearer JWTs, OIDC-compatible.
//!
//! A node configured with keys (an HS256 secret, an RS256/ES256 public key in PEM, or a
//! JWKS document) checks every call's `authorization: Bearer …` token: signature,
//! expiry, issuer and audience when configured, and the roles claim (a string or a list,
//! at a dotted path such as `realm_access.roles`); the highest known role counts. Each
//! RPC states its least role ([`require`]): missing or invalid token →
//! `UNAUTHENTICATED`, too low a role → `PERMISSION_DENIED`. A node without keys lets
//! every caller in as `data_owner` (a trusted network, e.g. `twinmesh up`); the twins
//! still gate what crosses their site.
//!
//! Tokens and keys never appear in logs or errors.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use tonic::{Request, Status};

use twinmesh_twins::ErrorCode;

use twinmesh_twins::privacy::Role;

/// How a node checks callers (all optional: none → no authentication).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// File holding the HS256 shared secret (its bytes, trailing newline trimmed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hs256_secret_file: Option<PathBuf>,
    /// PEM public key (RSA for RS256, EC P-256 for ES256).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key_file: Option<PathBuf>,
    /// JWKS document (an OIDC issuer's `jwks_uri` content, saved to a file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_file: Option<PathBuf>,
    /// Required `iss`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// Required `aud`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    /// Claim holding the role(s); dotted for nested claims.
    #[serde(default = "default_roles_claim")]
    pub roles_claim: String,
    /// Claim listing the sites the role holds on (dotted; absent: every site).
    #[serde(default = "default_sites_claim")]
    pub sites_claim: String,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            hs256_secret_file: None,
            public_key_file: None,
            jwks_file: None,
            issuer: None,
            audience: None,
            roles_claim: default_roles_claim(),
            sites_claim: default_sites_claim(),
        }
    }
}

fn default_roles_claim() -> String {
    "roles".to_owned()
}

fn default_sites_claim() -> String {
    "twinmesh_sites".to_owned()
}

impl AuthConfig {
    pub fn enabled(&self) -> bool {
        self.hs256_secret_file.is_some()
            || self.public_key_file.is_some()
            || self.jwks_file.is_some()
    }
}

/// Why a caller is turned away: no valid credentials (`UNAUTHENTICATED`) or too low a
/// role (`PERMISSION_DENIED`). Messages never echo the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("{0}")]
    Unauthenticated(String),
    #[error("token carries no twinmesh role in claim {0:?} (viewer, data_operator, data_manager or data_owner)")]
    NoRole(String),
    #[error("this call needs the {} role, the caller has {}", least.as_str(), has.as_str())]
    RoleTooLow { least: Role, has: Role },
    #[error("the caller's role holds on {} only, not on {site}", held.join(", "))]
    OtherSite { site: String, held: Vec<String> },
    #[error("claim {0:?} is not a list of valid site names")]
    BadSites(String),
}

impl AuthError {
    pub fn code(&self) -> ErrorCode {
        match self {
            AuthError::Unauthenticated(_) => ErrorCode::Unauthenticated,
            AuthError::NoRole(_)
            | AuthError::RoleTooLow { .. }
            | AuthError::OtherSite { .. }
            | AuthError::BadSites(_) => ErrorCode::PermissionDenied,
        }
    }

    fn unauthenticated(why: impl Into<String>) -> Self {
        AuthError::Unauthenticated(why.into())
    }
}

/// Who is calling, as established by the token (or the default without auth).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub subject: String,
    pub role: Role,
    /// The sites the role holds on (the token's sites claim); empty: every site.
    pub sites: Vec<String>,
}

impl Identity {
    /// The caller of a node without authentication: every role on every site.
    pub fn trusted() -> Self {
        Identity {
            subject: String::new(),
            role: Role::DataOwner,
            sites: Vec::new(),
        }
    }

    /// Refuses (`PERMISSION_DENIED`) a caller below `least`.
    pub fn require_role(&self, least: Role) -> Result<(), AuthError> {
        if self.role < least {
            return Err(AuthError::RoleTooLow {
                least,
                has: self.role,
            });
        }
        Ok(())
    }

    /// Whether the caller's role holds on `site`.
    pub fn covers(&self, site: &str) -> bool {
        self.sites.is_empty() || self.sites.iter().any(|s| s == site)
    }

    /// Refuses (`PERMISSION_DENIED`) an act of the node itself on `site` by a caller
    /// whose role is scoped to other sites.
    pub fn require_site(&self, site: &str) -> Result<(), AuthError> {
        if self.covers(site) {
            return Ok(());
        }
        Err(AuthError::OtherSite {
            site: site.to_owned(),
            held: self.sites.clone(),
        })
    }
}

struct Key {
    kid: Option<String>,
    algorithms: Vec<Algorithm>,
    key: DecodingKey,
}

/// Checks bearer tokens against the configured keys.
pub struct Authenticator {
    keys: Vec<Key>,
    issuer: Option<String>,
    audience: Option<String>,
    roles_claim: String,
    sites_claim: String,
}

/// The value at a dotted claim path (`realm_access.roles`), or null.
fn claim<'a>(claims: &'a serde_json::Value, path: &str) -> &'a serde_json::Value {
    let mut v = claims;
    for part in path.split('.') {
        v = v.get(part).unwrap_or(&serde_json::Value::Null);
    }
    v
}

fn read(path: &Path, what: &str) -> crate::Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| crate::Error::config(format!("cannot read {what} {}: {e}", path.display())))
}

impl Authenticator {
    pub fn load(cfg: &AuthConfig) -> crate::Result<Option<Arc<Authenticator>>> {
        if !cfg.enabled() {
            return Ok(None);
        }
        let mut keys = Vec::new();
        if let Some(p) = &cfg.hs256_secret_file {
            let mut secret = read(p, "hs256 secret file")?;
            while secret.last().is_some_and(|b| b.is_ascii_whitespace()) {
                secret.pop();
            }
            if secret.len() < 32 {
                return Err(crate::Error::config(format!(
                    "hs256 secret file {}: at least 32 bytes needed, {} found",
                    p.display(),
                    secret.len()
                )));
            }
            keys.push(Key {
                kid: None,
                algorithms: vec![Algorithm::HS256],
                key: DecodingKey::from_secret(&secret)?,
            });
        }
        if let Some(p) = &cfg.public_key_file {
            let pem = read(p, "public key file")?;
            let key = if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
                Key {
                    kid: None,
                    algorithms: vec![Algorithm::RS256],
                    key: k,
                }
            } else if let Ok(k) = DecodingKey::from_ec_pem(&pem) {
                Key {
                    kid: None,
                    algorithms: vec![Algorithm::ES256],
                    key: k,
                }
            } else {
                return Err(crate::Error::config(format!(
                    "public key file {}: not an RSA or EC public key in PEM",
                    p.display()
                )));
            };
            keys.push(key);
        }
        if let Some(p) = &cfg.jwks_file {
            let text = read(p, "jwks file")?;
            let set: JwkSet = serde_json::from_slice(&text)
                .map_err(|e| crate::Error::config(format!("jwks file {}: {e}", p.display())))?;
            for jwk in &set.keys {
                let key = DecodingKey::from_jwk(jwk)
                    .map_err(|e| crate::Error::config(format!("jwks file {}: {e}", p.display())))?;
                let algorithms = match jwk.common.key_algorithm {
                    Some(a) => vec![a.to_string().parse::<Algorithm>().map_err(|e| {
                        crate::Error::config(format!("jwks file {}: {e}", p.display()))
                    })?],
                    None => match &jwk.algorithm {
                        jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => vec![Algorithm::RS256],
                        jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_) => {
                            vec![Algorithm::ES256]
                        }
                        _ => {
                            return Err(crate::Error::config(format!(
                                "jwks file {}: key without alg of an unsupported type",
                                p.display()
                            )))
                        }
                    },
                };
                keys.push(Key {
                    kid: jwk.common.key_id.clone(),
                    algorithms,
                    key,
                });
            }
            if set.keys.is_empty() {
                return Err(crate::Error::config(format!(
                    "jwks file {}: no keys",
                    p.display()
                )));
            }
        }
        Ok(Some(Arc::new(Authenticator {
            keys,
            issuer: cfg.issuer.clone(),
            audience: cfg.audience.clone(),
            roles_claim: cfg.roles_claim.clone(),
            sites_claim: cfg.sites_claim.clone(),
        })))
    }

    /// Checks an `authorization` header's value (`Bearer TOKEN`), the same for gRPC
    /// metadata and HTTP headers.
    pub fn authenticate_header(&self, header: Option<&str>) -> Result<Identity, AuthError> {
        let h = header.ok_or_else(|| AuthError::unauthenticated("missing bearer token"))?;
        match h
            .strip_prefix("Bearer ")
            .or_else(|| h.strip_prefix("bearer "))
        {
            Some(token) => self.authenticate(token.trim()),
            None => Err(AuthError::unauthenticated(
                "authorization header is not a bearer token",
            )),
        }
    }

    /// Checks one token; errors say what is wrong without echoing it.
    pub fn authenticate(&self, token: &str) -> Result<Identity, AuthError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| AuthError::unauthenticated("malformed bearer token"))?;
        let mut last = AuthError::unauthenticated(format!(
            "no configured key accepts tokens signed with {:?}",
            header.alg
        ));
        for k in &self.keys {
            if !k.algorithms.contains(&header.alg) {
                continue;
            }
            if let (Some(want), Some(got)) = (&k.kid, &header.kid) {
                if want != got {
                    continue;
                }
            }
            let mut v = Validation::new(header.alg);
            v.leeway = 30;
            // A token issued for later is not valid yet (jsonwebtoken skips nbf by default).
            v.validate_nbf = true;
            v.set_required_spec_claims(&["exp"]);
            match &self.issuer {
                Some(i) => v.set_issuer(&[i]),
                None => v.iss = None,
            }
            match &self.audience {
                Some(a) => v.set_audience(&[a]),
                None => v.validate_aud = false,
            }
            match jsonwebtoken::decode::<serde_json::Value>(token, &k.key, &v) {
                Ok(data) => return self.identity(&data.claims),
                Err(e) => {
                    use jsonwebtoken::errors::ErrorKind as K;
                    let why = match e.kind() {
                        K::ExpiredSignature => "expired token",
                        K::InvalidIssuer => "wrong token issuer",
                        K::InvalidAudience => "wrong token audience",
                        K::InvalidSignature => "invalid token signature",
                        K::MissingRequiredClaim(_) => "token without exp",
                        K::ImmatureSignature => "token not yet valid",
                        _ => "invalid bearer token",
                    };
                    last = AuthError::unauthenticated(why);
                }
            }
        }
        Err(last)
    }

    fn identity(&self, claims: &serde_json::Value) -> Result<Identity, AuthError> {
        let names: Vec<&str> = match claim(claims, &self.roles_claim) {
            serde_json::Value::String(s) => vec![s.as_str()],
            serde_json::Value::Array(a) => a.iter().filter_map(|x| x.as_str()).collect(),
            _ => Vec::new(),
        };
        let role = names
            .into_iter()
            .filter_map(Role::parse)
            .max()
            .ok_or_else(|| AuthError::NoRole(self.roles_claim.clone()))?;
        // Absent: every site. Anything but a non-empty list of site names is refused
        // rather than read as "every site".
        let bad_sites = || AuthError::BadSites(self.sites_claim.clone());
        let sites = match claim(claims, &self.sites_claim) {
            serde_json::Value::Null => Vec::new(),
            serde_json::Value::String(s) => vec![s.clone()],
            serde_json::Value::Array(a) if !a.is_empty() => a
                .iter()
                .map(|x| x.as_str().map(str::to_owned).ok_or_else(bad_sites))
                .collect::<Result<Vec<_>, _>>()?,
            _ => return Err(bad_sites()),
        };
        if sites
            .iter()
            .any(|s| twinmesh_twins::id::validate_site(s).is_err())
        {
            return Err(bad_sites());
        }
        Ok(Identity {
            sites,
            subject: claims
                .get("sub")
                .and_then(|s| s.as_str())
                .unwrap_or_default()
                .to_owned(),
            role,
        })
    }
}

/// Puts the caller's [`Identity`] into each request's extensions (or refuses it).
#[derive(Clone)]
pub struct AuthInterceptor {
    pub auth: Option<Arc<Authenticator>>,
}

/// A failed authentication, kept for [`require`] to report (so an RPC that needs no
/// token could still run; every twinmesh RPC needs at least `viewer`).
#[derive(Clone)]
struct Refused(AuthError);

impl tonic::service::Interceptor for AuthInterceptor {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let Some(auth) = &self.auth else {
            req.extensions_mut().insert(Identity::trusted());
            return Ok(req);
        };
        let header = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        match auth.authenticate_header(header.as_deref()) {
            Ok(id) => {
                req.extensions_mut().insert(id);
            }
            Err(s) => {
                req.extensions_mut().insert(Refused(s));
            }
        }
        Ok(req)
    }
}

/// The caller of `req` if it holds at least `least`.
pub fn require<T>(req: &Request<T>, least: Role) -> Result<Identity, AuthError> {
    if let Some(Refused(s)) = req.extensions().get::<Refused>() {
        return Err(s.clone());
    }
    let id = req
        .extensions()
        .get::<Identity>()
        .cloned()
        .ok_or_else(|| AuthError::unauthenticated("missing bearer token"))?;
    id.require_role(least)?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn hs_auth(dir: &Path, issuer: Option<&str>, audience: Option<&str>) -> Arc<Authenticator> {
        let p = dir.join("secret");
        std::fs::write(&p, "0123456789abcdef0123456789abcdef\n").unwrap();
        Authenticator::load(&AuthConfig {
            hs256_secret_file: Some(p),
            issuer: issuer.map(Into::into),
            audience: audience.map(Into::into),
            roles_claim: "realm_access.roles".into(),
            ..Default::default()
        })
        .unwrap()
        .unwrap()
    }

    fn token(secret: &[u8], claims: serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn hs256_tokens_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let a = hs_auth(dir.path(), Some("https://idp"), Some("twinmesh"));
        let good = serde_json::json!({"sub": "ops-1", "iss": "https://idp", "aud": "twinmesh",
            "exp": now() + 600, "realm_access": {"roles": ["viewer", "data_operator", "other"]}});
        let secret = b"0123456789abcdef0123456789abcdef";
        let id = a.authenticate(&token(secret, good.clone())).unwrap();
        assert_eq!(id.role, Role::DataOperator);
        assert_eq!(id.subject, "ops-1");
        let check = |claims: serde_json::Value, key: &[u8], want: &str| {
            let e = a.authenticate(&token(key, claims)).unwrap_err();
            assert!(e.to_string().contains(want), "{}", e.to_string());
            e.code()
        };
        let mut expired = good.clone();
        expired["exp"] = (now() - 3600).into();
        assert_eq!(
            check(expired, secret, "expired"),
            ErrorCode::Unauthenticated
        );
        let mut aud = good.clone();
        aud["aud"] = "someone-else".into();
        check(aud, secret, "audience");
        let mut iss = good.clone();
        iss["iss"] = "https://evil".into();
        check(iss, secret, "issuer");
        check(
            good.clone(),
            b"another-secret-another-secret-xx",
            "signature",
        );
        let mut no_role = good.clone();
        no_role["realm_access"]["roles"] = serde_json::json!(["admin"]);
        assert_eq!(
            check(no_role, secret, "no twinmesh role"),
            ErrorCode::PermissionDenied
        );
        let e = a.authenticate("not.a.token").unwrap_err();
        assert_eq!(e.code(), ErrorCode::Unauthenticated);
        assert!(!e.to_string().contains("not.a.token"));
    }

    #[test]
    fn a_token_is_not_valid_before_its_nbf() {
        let dir = tempfile::tempdir().unwrap();
        let a = hs_auth(dir.path(), None, None);
        let secret = b"0123456789abcdef0123456789abcdef";
        let claims = |nbf: u64| {
            serde_json::json!({"exp": now() + 7200, "nbf": nbf,
                "realm_access": {"roles": ["data_owner"]}})
        };
        let e = a
            .authenticate(&token(secret, claims(now() + 3600)))
            .unwrap_err();
        assert_eq!(e, AuthError::unauthenticated("token not yet valid"));
        assert_eq!(e.code(), ErrorCode::Unauthenticated);
        // Within the leeway, or in the past: valid.
        let id = a.authenticate(&token(secret, claims(now() + 10))).unwrap();
        assert_eq!(id.role, Role::DataOwner);
        assert!(a.authenticate(&token(secret, claims(now() - 60))).is_ok());
    }

    #[test]
    fn roles_may_be_scoped_to_sites() {
        let dir = tempfile::tempdir().unwrap();
        let a = hs_auth(dir.path(), None, None);
        let secret = b"0123456789abcdef0123456789abcdef";
        let with_sites = |sites: serde_json::Value| {
            let mut c = serde_json::json!({"sub": "owner-b", "exp": now() + 600,
                "realm_access": {"roles": ["data_owner"]}});
            if !sites.is_null() {
                c["twinmesh_sites"] = sites;
            }
            a.authenticate(&token(secret, c))
        };
        let everywhere = with_sites(serde_json::Value::Null).unwrap();
        assert!(everywhere.sites.is_empty());
        assert!(everywhere.covers("site-a") && everywhere.require_site("cloud").is_ok());
        let b = with_sites(serde_json::json!(["site-b", "site-c"])).unwrap();
        assert_eq!(b.sites, vec!["site-b".to_owned(), "site-c".to_owned()]);
        assert!(b.covers("site-b") && b.covers("site-c") && !b.covers("site-a"));
        let e = b.require_site("site-a").unwrap_err();
        assert_eq!(e.code(), ErrorCode::PermissionDenied);
        assert_eq!(
            e.to_string(),
            "the caller's role holds on site-b, site-c only, not on site-a"
        );
        assert_eq!(
            with_sites(serde_json::json!("site-b")).unwrap().sites,
            vec!["site-b".to_owned()]
        );
        // A claim that is there but names no valid site never means "every site".
        for bad in [
            serde_json::json!([]),
            serde_json::json!(["Site A"]),
            serde_json::json!([7]),
            serde_json::json!({"site": "site-b"}),
        ] {
            let e = with_sites(bad.clone()).unwrap_err();
            assert_eq!(e.code(), ErrorCode::PermissionDenied, "{bad}");
        }
        // The claim's name is configurable (dotted, like the roles claim).
        let p = dir.path().join("secret");
        let nested = Authenticator::load(&AuthConfig {
            hs256_secret_file: Some(p),
            roles_claim: "roles".into(),
            sites_claim: "ext.sites".into(),
            ..Default::default()
        })
        .unwrap()
        .unwrap();
        let t = token(
            secret,
            serde_json::json!({"exp": now() + 600, "roles": "viewer", "ext": {"sites": ["site-a"]}}),
        );
        assert_eq!(
            nested.authenticate(&t).unwrap().sites,
            vec!["site-a".to_owned()]
        );
    }

    #[test]
    fn least_roles_are_enforced() {
        let mut i = AuthInterceptor { auth: None };
        use tonic::service::Interceptor;
        let req = i.call(Request::new(())).unwrap();
        assert_eq!(
            require(&req, Role::DataOwner).unwrap().role,
            Role::DataOwner
        );
        let dir = tempfile::tempdir().unwrap();
        let mut i = AuthInterceptor {
            auth: Some(hs_auth(dir.path(), None, None)),
        };
        let req = i.call(Request::new(())).unwrap();
        assert_eq!(
            require(&req, Role::Viewer).unwrap_err().code(),
            ErrorCode::Unauthenticated
        );
        let t = token(
            b"0123456789abcdef0123456789abcdef",
            serde_json::json!({"exp": now() + 60, "realm_access": {"roles": "viewer"}}),
        );
        let mut r = Request::new(());
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
        let req = i.call(r).unwrap();
        assert!(require(&req, Role::Viewer).is_ok());
        let e = require(&req, Role::DataOperator).unwrap_err();
        assert_eq!(e.code(), ErrorCode::PermissionDenied);
        assert!(e.to_string().contains("needs the data_operator role"));
    }

    #[test]
    fn short_secrets_and_bad_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        std::fs::write(&p, "short").unwrap();
        let e = Authenticator::load(&AuthConfig {
            hs256_secret_file: Some(p.clone()),
            ..Default::default()
        })
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.contains("at least 32 bytes") && !e.contains("short\""),
            "{e}"
        );
        std::fs::write(
            &p,
            "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
        )
        .unwrap();
        assert!(Authenticator::load(&AuthConfig {
            public_key_file: Some(p),
            ..Default::default()
        })
        .is_err());
        assert!(Authenticator::load(&AuthConfig::default())
            .unwrap()
            .is_none());
    }
}
