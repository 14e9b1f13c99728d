//! Provider credentials at rest: sealed with ChaCha20-Poly1305 when
//! `PORTCULLIS_ENCRYPTION_KEY` is set. Stored as `enc:v1:<hex(nonce || ciphertext)>`.

use std::fmt;

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};

use super::StoreError;

const PREFIX: &str = "enc:v1:";
const NONCE_LEN: usize = 12;

/// Seals and opens stored secrets. Without a key, values are stored as given.
#[derive(Clone, Default)]
pub struct Sealer {
    cipher: Option<ChaCha20Poly1305>,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sealer({})", if self.cipher.is_some() { "key set" } else { "no key" })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

impl Sealer {
    /// From `PORTCULLIS_ENCRYPTION_KEY`: 64 hex characters (32 bytes), e.g. `openssl rand -hex 32`.
    pub fn from_key(hex_key: Option<&str>) -> Result<Self, String> {
        let Some(k) = hex_key else { return Ok(Sealer::default()) };
        let bytes = unhex(k.trim()).filter(|b| b.len() == 32).ok_or(
            "PORTCULLIS_ENCRYPTION_KEY must be 64 hex characters (32 bytes), e.g. from `openssl rand -hex 32`",
        )?;
        Ok(Sealer { cipher: Some(ChaCha20Poly1305::new(Key::from_slice(&bytes))) })
    }

    pub fn seal(&self, plaintext: &str) -> Result<String, StoreError> {
        let Some(cipher) = &self.cipher else { return Ok(plaintext.to_string()) };
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| StoreError::Corrupt(format!("no randomness for a nonce: {e}")))?;
        let sealed = cipher
            .encrypt(Nonce::from_slice(&nonce), plaintext.as_bytes())
            .map_err(|_| StoreError::Corrupt("sealing a credential failed".into()))?;
        Ok(format!("{PREFIX}{}{}", hex(&nonce), hex(&sealed)))
    }

    pub fn open(&self, stored: &str) -> Result<String, StoreError> {
        let Some(body) = stored.strip_prefix(PREFIX) else { return Ok(stored.to_string()) };
        let cipher = self.cipher.as_ref().ok_or_else(|| {
            StoreError::Config("a provider credential is encrypted but PORTCULLIS_ENCRYPTION_KEY is not set".into())
        })?;
        let bytes =
            unhex(body).filter(|b| b.len() > NONCE_LEN).ok_or_else(|| StoreError::Corrupt("sealed value".into()))?;
        let (nonce, sealed) = bytes.split_at(NONCE_LEN);
        let plain = cipher.decrypt(Nonce::from_slice(nonce), sealed).map_err(|_| {
            StoreError::Config("a provider credential does not open with PORTCULLIS_ENCRYPTION_KEY (wrong key?)".into())
        })?;
        String::from_utf8(plain).map_err(|_| StoreError::Corrupt("sealed value is not UTF-8".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    #[test]
    fn seals_and_opens() {
        let s = Sealer::from_key(Some(KEY)).unwrap();
        let sealed = s.seal("Bearer sk-provider").unwrap();
        assert!(sealed.starts_with("enc:v1:"));
        assert!(!sealed.contains("sk-provider"));
        assert_ne!(sealed, s.seal("Bearer sk-provider").unwrap(), "a fresh nonce each time");
        assert_eq!(s.open(&sealed).unwrap(), "Bearer sk-provider");
    }

    #[test]
    fn without_a_key_values_pass_through_and_sealed_ones_refuse() {
        let plain = Sealer::default();
        assert_eq!(plain.seal("v").unwrap(), "v");
        let sealed = Sealer::from_key(Some(KEY)).unwrap().seal("v").unwrap();
        assert!(plain.open(&sealed).unwrap_err().to_string().contains("PORTCULLIS_ENCRYPTION_KEY is not set"));
        let other = Sealer::from_key(Some(&KEY.replace("00", "ff"))).unwrap();
        assert!(other.open(&sealed).unwrap_err().to_string().contains("wrong key"));
        // Plaintext rows written before a key was set still read.
        assert_eq!(Sealer::from_key(Some(KEY)).unwrap().open("Bearer old").unwrap(), "Bearer old");
    }

    #[test]
    fn key_format_is_checked() {
        assert!(Sealer::from_key(Some("short")).is_err());
        assert!(Sealer::from_key(Some(&"zz".repeat(32))).is_err());
        assert!(!format!("{:?}", Sealer::from_key(Some(KEY)).unwrap()).contains("0102"));
    }
}
