//! AES-256-GCM sealing with a ring of named keys: the site key (protected telemetry and
//! contributions travel the fabric unreadable to nodes off the site) and the at-rest key
//! (sensitive sled trees).
//!
//! A sealed value is `TMS1 | id length (u8) | key id | 12-byte nonce | ciphertext+tag`.
//! The key id travels with every value, so a ring can hold old keys for reading while
//! new values are sealed with the newest one: keys rotate without rewriting anything.
//! The associated data binds a value to where it belongs (a frame's key, a tree and
//! key), so a ciphertext moved elsewhere does not open either.
//!
//! Key files are text: one `KEY_ID HEX64` per line (`#` comments); the last line is the
//! key new values are sealed with.

use std::fmt;

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};

use twinmesh_twins::privacy::valid_key_id;

const MAGIC: &[u8; 4] = b"TMS1";
const NONCE_LEN: usize = 12;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("not a sealed value")]
    NotSealed,
    #[error("sealed with unknown key {0:?}")]
    UnknownKey(String),
    #[error("sealed value failed authentication (tampered, or the wrong key or context)")]
    Tampered,
    #[error("invalid key file: {0}")]
    KeyFile(String),
}

/// Named AES-256 keys; the last one seals.
#[derive(Clone)]
pub struct KeyRing {
    keys: Vec<(String, Aes256Gcm)>,
    /// HMAC keys derived from each key, oldest first (proofs on the fabric:
    /// [`crate::trust`]); never the AES keys themselves.
    mac_keys: Vec<[u8; 32]>,
    /// Pseudonyms of identifiers (site keys): derived from the newest key.
    pseudonymiser: twinmesh_twins::privacy::Pseudonymiser,
}

impl fmt::Debug for KeyRing {
    // Never print key material.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|(id, _)| id.as_str()).collect();
        f.debug_struct("KeyRing").field("key_ids", &ids).finish()
    }
}

impl KeyRing {
    pub fn new(keys: Vec<(String, [u8; 32])>) -> Result<Self, SealError> {
        if keys.is_empty() {
            return Err(SealError::KeyFile("no keys".to_owned()));
        }
        let mut ring = Vec::with_capacity(keys.len());
        let mac_keys = keys.iter().map(|(_, k)| derive_mac_key(k)).collect();
        let (newest_id, newest) = keys.last().expect("not empty");
        let pseudonymiser = twinmesh_twins::privacy::Pseudonymiser::derive(newest_id, newest);
        for (id, k) in keys {
            if !valid_key_id(&id) {
                return Err(SealError::KeyFile(format!(
                    "key id {id:?}: expected 1 to 64 of [A-Za-z0-9._-]"
                )));
            }
            if ring.iter().any(|(i, _)| i == &id) {
                return Err(SealError::KeyFile(format!("key id {id:?} appears twice")));
            }
            ring.push((id, Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&k))));
        }
        Ok(KeyRing {
            keys: ring,
            mac_keys,
            pseudonymiser,
        })
    }

    /// Keyed pseudonyms with the newest key (its id prefixes every pseudonym, so a
    /// rotation starts new pseudonyms without confusing them with old ones).
    pub fn pseudonymiser(&self) -> &twinmesh_twins::privacy::Pseudonymiser {
        &self.pseudonymiser
    }

    /// Parses a key file's text (errors name the line, never the key).
    pub fn parse(text: &str) -> Result<Self, SealError> {
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |why: &str| SealError::KeyFile(format!("line {}: {why}", n + 1));
            let mut parts = line.split_whitespace();
            let (Some(id), Some(hex), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(bad("expected KEY_ID HEX64"));
            };
            let bytes = decode_hex(hex).ok_or_else(|| bad("key is not 64 hex digits"))?;
            keys.push((id.to_owned(), bytes));
        }
        KeyRing::new(keys)
    }

    /// A new random key, as one key file line.
    pub fn generate_line(key_id: &str) -> Result<String, SealError> {
        if !valid_key_id(key_id) {
            return Err(SealError::KeyFile(format!(
                "key id {key_id:?}: expected 1 to 64 of [A-Za-z0-9._-]"
            )));
        }
        let key = Aes256Gcm::generate_key(&mut OsRng);
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        Ok(format!("{key_id} {hex}\n"))
    }

    /// The HMAC keys derived from the ring, oldest first: the last one makes proofs, any
    /// of them checks one (so keys rotate as for sealing).
    pub fn mac_keys(&self) -> &[[u8; 32]] {
        &self.mac_keys
    }

    /// The id of the key new values are sealed with.
    pub fn current_id(&self) -> &str {
        &self.keys.last().expect("a ring has keys").0
    }

    pub fn key_ids(&self) -> Vec<String> {
        self.keys.iter().map(|(id, _)| id.clone()).collect()
    }

    /// Seals `plain` with the current key, bound to `context`.
    pub fn seal(&self, context: &[u8], plain: &[u8]) -> Vec<u8> {
        let (id, cipher) = self.keys.last().expect("a ring has keys");
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let ct = cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plain,
                    aad: context,
                },
            )
            .expect("AES-GCM encryption of an in-memory buffer");
        let mut out = Vec::with_capacity(5 + id.len() + NONCE_LEN + ct.len());
        out.extend_from_slice(MAGIC);
        out.push(id.len() as u8);
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    /// Opens a sealed value; a flipped byte, another context or a foreign key is an error.
    pub fn open(&self, context: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        let id = sealed_key_id(sealed).ok_or(SealError::NotSealed)?;
        let rest = &sealed[5 + id.len()..];
        if rest.len() < NONCE_LEN + 16 {
            return Err(SealError::NotSealed);
        }
        let cipher = self
            .keys
            .iter()
            .find(|(k, _)| k == id)
            .map(|(_, c)| c)
            .ok_or_else(|| SealError::UnknownKey(id.to_owned()))?;
        let (nonce, ct) = rest.split_at(NONCE_LEN);
        cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: context,
                },
            )
            .map_err(|_| SealError::Tampered)
    }
}

/// An HMAC key for proofs, derived from an AES key so one key file serves both and
/// neither use reveals the other.
fn derive_mac_key(key: &[u8; 32]) -> [u8; 32] {
    use hmac::{Hmac, Mac};
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(key).expect("any key length");
    mac.update(b"twinmesh/mac-key/v1");
    mac.finalize().into_bytes().into()
}

/// The key id of a sealed value, if it is one.
pub fn sealed_key_id(sealed: &[u8]) -> Option<&str> {
    if sealed.len() < 5 || &sealed[..4] != MAGIC {
        return None;
    }
    let n = sealed[4] as usize;
    std::str::from_utf8(sealed.get(5..5 + n)?).ok()
}

fn decode_hex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
        let pair = std::str::from_utf8(chunk).ok()?;
        out[i] = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(lines: &str) -> KeyRing {
        KeyRing::parse(lines).unwrap()
    }

    #[test]
    fn seals_and_opens_with_rotation() {
        let old = KeyRing::generate_line("k1").unwrap();
        let new = KeyRing::generate_line("k2").unwrap();
        let r1 = ring(&old);
        let sealed = r1.seal(b"ctx", b"secret 4242.5");
        assert_eq!(sealed_key_id(&sealed), Some("k1"));
        assert!(!sealed.windows(6).any(|w| w == b"4242.5"));
        // After rotation old values still open; new ones use k2.
        let r2 = ring(&format!("# rotated\n{old}{new}"));
        assert_eq!(r2.open(b"ctx", &sealed).unwrap(), b"secret 4242.5");
        assert_eq!(r2.current_id(), "k2");
        let sealed2 = r2.seal(b"ctx", b"x");
        assert_eq!(sealed_key_id(&sealed2), Some("k2"));
        assert_eq!(
            r1.open(b"ctx", &sealed2).unwrap_err(),
            SealError::UnknownKey("k2".into())
        );
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let r = ring(&KeyRing::generate_line("k1").unwrap());
        let sealed = r.seal(b"tree/key", b"household energy 12.5 kWh");
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            assert!(r.open(b"tree/key", &bad).is_err(), "byte {i} not detected");
        }
        assert_eq!(
            r.open(b"other/key", &sealed).unwrap_err(),
            SealError::Tampered
        );
        assert_eq!(r.open(b"", b"plain").unwrap_err(), SealError::NotSealed);
    }

    #[test]
    fn key_files_are_checked_without_echoing_keys() {
        let e = KeyRing::parse("k1 abcd\n").unwrap_err().to_string();
        assert!(e.contains("line 1") && !e.contains("abcd"), "{e}");
        assert!(KeyRing::parse("# nothing\n").is_err());
        let line = KeyRing::generate_line("k1").unwrap();
        assert!(KeyRing::parse(&format!("{line}{line}")).is_err());
        let r = ring(&line);
        let dbg = format!("{r:?}");
        assert!(dbg.contains("k1") && !dbg.contains(line.split(' ').nth(1).unwrap().trim()));
        assert!(KeyRing::generate_line("bad id").is_err());
    }
}
