//! Identifiers: `TwinId` = `{site}/{asset}`, node ids and tiers.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// `TryFrom<String>` through `FromStr` and `From<T> for String` through `Display`: what
/// `#[serde(try_from = "String", into = "String")]` needs of a type written as one string
/// (the ids here, the `--simulate` and `--fault` specs of a node).
#[macro_export]
macro_rules! string_conversions {
    ($t:ty) => {
        impl TryFrom<String> for $t {
            type Error = <$t as std::str::FromStr>::Err;
            fn try_from(s: String) -> std::result::Result<Self, Self::Error> {
                s.parse()
            }
        }

        impl From<$t> for String {
            fn from(v: $t) -> String {
                v.to_string()
            }
        }
    };
}

/// Maximum length of one id segment (`[a-z0-9][a-z0-9_-]{0,62}`).
pub const MAX_SEGMENT_LEN: usize = 63;

/// True when `s` matches `[a-z0-9][a-z0-9_-]{0,62}`.
pub fn is_valid_segment(s: &str) -> bool {
    let bytes = s.as_bytes();
    match bytes.first() {
        Some(b) if b.is_ascii_lowercase() || b.is_ascii_digit() => {}
        _ => return false,
    }
    bytes.len() <= MAX_SEGMENT_LEN
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_' || *b == b'-')
}

/// The identity of a twin: the site it belongs to and the asset's name on that site.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TwinId {
    site: String,
    asset: String,
}

impl TwinId {
    pub fn new(site: &str, asset: &str) -> Result<Self> {
        if is_valid_segment(site) && is_valid_segment(asset) {
            Ok(TwinId {
                site: site.to_owned(),
                asset: asset.to_owned(),
            })
        } else {
            Err(Error::InvalidTwinId(format!("{site}/{asset}")))
        }
    }

    pub fn site(&self) -> &str {
        &self.site
    }

    pub fn asset(&self) -> &str {
        &self.asset
    }
}

impl FromStr for TwinId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.split_once('/') {
            Some((site, asset)) if !asset.contains('/') => {
                TwinId::new(site, asset).map_err(|_| Error::InvalidTwinId(s.to_owned()))
            }
            _ => Err(Error::InvalidTwinId(s.to_owned())),
        }
    }
}

crate::string_conversions!(TwinId);

impl fmt::Display for TwinId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.site, self.asset)
    }
}

/// The name of a node (one `twinmesh node` process).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeId(String);

impl NodeId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for NodeId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if is_valid_segment(s) {
            Ok(NodeId(s.to_owned()))
        } else {
            Err(Error::InvalidNodeId(s.to_owned()))
        }
    }
}

crate::string_conversions!(NodeId);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Validates a site name (same rule as an id segment).
pub fn validate_site(site: &str) -> Result<()> {
    if is_valid_segment(site) {
        Ok(())
    } else {
        Err(Error::InvalidSite(site.to_owned()))
    }
}

/// The tier of the IoT → edge → cloud continuum a node runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Iot,
    Edge,
    Cloud,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Iot => "iot",
            Tier::Edge => "edge",
            Tier::Cloud => "cloud",
        }
    }
}

impl FromStr for Tier {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "iot" => Ok(Tier::Iot),
            "edge" => Ok(Tier::Edge),
            "cloud" => Ok(Tier::Cloud),
            _ => Err(Error::InvalidTier(s.to_owned())),
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_valid_twin_ids() {
        let id: TwinId = "site-a/wt-01".parse().unwrap();
        assert_eq!(id.site(), "site-a");
        assert_eq!(id.asset(), "wt-01");
        assert_eq!(id.to_string(), "site-a/wt-01");
    }

    #[test]
    fn rejects_malformed_twin_ids() {
        for bad in [
            "",
            "site-a",
            "site-a/",
            "/wt-01",
            "Site/wt",
            "site/wt/x",
            "-site/wt",
            "site/_wt",
            "site/wt 1",
            "site/wt*",
            "site/**",
        ] {
            let err = bad.parse::<TwinId>().unwrap_err();
            assert_eq!(err, Error::InvalidTwinId(bad.to_owned()), "{bad}");
            assert!(err.to_string().contains(&format!("{bad:?}")));
        }
        let long = format!("s/{}", "a".repeat(64));
        assert!(long.parse::<TwinId>().is_err());
        let ok = format!("s/{}", "a".repeat(63));
        assert!(ok.parse::<TwinId>().is_ok());
    }

    #[test]
    fn tiers_round_trip() {
        for t in [Tier::Iot, Tier::Edge, Tier::Cloud] {
            assert_eq!(t.as_str().parse::<Tier>().unwrap(), t);
        }
        assert_eq!(
            "fog".parse::<Tier>().unwrap_err().to_string(),
            "invalid tier \"fog\": expected iot, edge or cloud"
        );
    }

    proptest! {
        #[test]
        fn valid_ids_round_trip(site in "[a-z0-9][a-z0-9_-]{0,62}", asset in "[a-z0-9][a-z0-9_-]{0,62}") {
            let id = TwinId::new(&site, &asset).unwrap();
            let back: TwinId = id.to_string().parse().unwrap();
            prop_assert_eq!(back, id);
        }

        #[test]
        fn arbitrary_strings_never_panic(s in ".{0,80}") {
            if let Ok(id) = s.parse::<TwinId>() {
                prop_assert_eq!(id.to_string(), s);
            }
        }
    }
}
