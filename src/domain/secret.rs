//! Secrets as types: generation, the `pcs_`/`pcm_` format with its CRC32 checksum,
//! and the SHA-256 hash that is all we ever store.

use std::fmt;

use sha2::{Digest, Sha256};

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const RANDOM_LEN: usize = 32;
const CHECKSUM_LEN: usize = 6;
/// How many leading characters identify a key in lists.
pub const DISPLAY_PREFIX_LEN: usize = 12;

/// What a secret is for; decides its prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecretKind {
    /// An API key clients send through Envoy.
    ApiKey,
    /// A management token for the admin API.
    AccessToken,
}

impl SecretKind {
    pub const fn prefix(self) -> &'static str {
        match self {
            SecretKind::ApiKey => "pcs_",
            SecretKind::AccessToken => "pcm_",
        }
    }

    /// Total length of a generated secret of this kind.
    pub const fn secret_len(self) -> usize {
        self.prefix().len() + RANDOM_LEN + CHECKSUM_LEN
    }
}

/// A plaintext secret. `Debug` and `Display` never print it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Secret {
    /// Wraps a secret that came from outside (a bootstrap variable, an imported legacy key).
    pub fn from_plaintext(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// A new random secret: prefix + 32 base62 characters + 6-character base62 CRC32.
    pub fn generate(kind: SecretKind) -> Self {
        let mut s = String::with_capacity(kind.secret_len());
        s.push_str(kind.prefix());
        let mut buf = [0u8; 64];
        let mut filled = 0;
        while filled < RANDOM_LEN {
            getrandom::fill(&mut buf).expect("the operating system's random source is unavailable");
            for &b in &buf {
                // Rejection sampling keeps the alphabet uniform (248 = 4 * 62).
                if b < 248 && filled < RANDOM_LEN {
                    s.push(BASE62[(b % 62) as usize] as char);
                    filled += 1;
                }
            }
        }
        let checksum = checksum(&s[kind.prefix().len()..]);
        s.push_str(&checksum);
        Secret(s)
    }

    /// The plaintext, for the one response that returns it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn hash(&self) -> SecretHash {
        SecretHash::of(&self.0)
    }

    /// The first characters shown in lists.
    pub fn display_prefix(&self) -> String {
        self.0.chars().take(DISPLAY_PREFIX_LEN).collect()
    }
}

fn checksum(random: &str) -> String {
    let mut n = crc32fast::hash(random.as_bytes()) as u64;
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What a presented string looks like before any lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// Has our prefix, length and a matching checksum.
    Valid,
    /// Has our prefix but is mistyped: refuse without a lookup.
    BadChecksum,
    /// Not one of ours (e.g. an imported legacy key): look it up by hash.
    Foreign,
}

/// Classifies a presented secret of `kind`.
pub fn shape(presented: &str, kind: SecretKind) -> Shape {
    let Some(rest) = presented.strip_prefix(kind.prefix()) else {
        return Shape::Foreign;
    };
    if rest.len() != RANDOM_LEN + CHECKSUM_LEN || !rest.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Shape::BadChecksum;
    }
    let (random, sum) = rest.split_at(RANDOM_LEN);
    if checksum(random) == sum { Shape::Valid } else { Shape::BadChecksum }
}

/// SHA-256 of a secret: the only form we store or index.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SecretHash(pub [u8; 32]);

impl SecretHash {
    pub fn of(plaintext: &str) -> Self {
        SecretHash(Sha256::digest(plaintext.as_bytes()).into())
    }

    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        <[u8; 32]>::try_from(bytes).ok().map(SecretHash)
    }
}

impl fmt::Debug for SecretHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretHash({:02x}{:02x}{:02x}{:02x}..)", self.0[0], self.0[1], self.0[2], self.0[3])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_have_the_documented_shape() {
        for kind in [SecretKind::ApiKey, SecretKind::AccessToken] {
            let s = Secret::generate(kind);
            let text = s.expose();
            assert_eq!(text.len(), 42);
            assert!(text.starts_with(kind.prefix()));
            assert!(text[4..].bytes().all(|b| b.is_ascii_alphanumeric()));
            assert_eq!(shape(text, kind), Shape::Valid);
            assert_eq!(s.display_prefix(), &text[..12]);
        }
    }

    #[test]
    fn generated_secrets_differ() {
        let a = Secret::generate(SecretKind::ApiKey);
        let b = Secret::generate(SecretKind::ApiKey);
        assert_ne!(a, b);
        assert_ne!(a.hash(), b.hash());
    }

    #[test]
    fn a_single_typo_fails_the_checksum() {
        let s = Secret::generate(SecretKind::ApiKey);
        let text = s.expose();
        for i in 4..text.len() {
            let mut bytes = text.as_bytes().to_vec();
            bytes[i] = if bytes[i] == b'a' { b'b' } else { b'a' };
            let typo = String::from_utf8(bytes).unwrap();
            assert_eq!(shape(&typo, SecretKind::ApiKey), Shape::BadChecksum, "position {i}");
        }
        assert_eq!(shape(&text[..41], SecretKind::ApiKey), Shape::BadChecksum);
        assert_eq!(shape("pcs_short", SecretKind::ApiKey), Shape::BadChecksum);
    }

    #[test]
    fn other_strings_are_foreign() {
        assert_eq!(shape("sk-legacy-0123456789abcdef", SecretKind::ApiKey), Shape::Foreign);
        let token = Secret::generate(SecretKind::AccessToken);
        assert_eq!(shape(token.expose(), SecretKind::ApiKey), Shape::Foreign);
    }

    #[test]
    fn checksum_is_crc32_in_base62() {
        // crc32("") == 0 -> all zeros; crc32("a") == 0xe8b7be43 == 3904355907.
        assert_eq!(checksum(""), "000000");
        let mut n = 3_904_355_907u64;
        let mut expect = Vec::new();
        for _ in 0..6 {
            expect.push(BASE62[(n % 62) as usize]);
            n /= 62;
        }
        expect.reverse();
        assert_eq!(checksum("a").as_bytes(), &expect[..]);
    }

    #[test]
    fn debug_never_prints_the_secret() {
        let s = Secret::generate(SecretKind::ApiKey);
        assert!(!format!("{s:?}").contains(&s.expose()[4..]));
        assert_eq!(SecretHash::of("abc"), SecretHash::of("abc"));
        let h = format!("{:?}", SecretHash::of("abc"));
        assert!(h.starts_with("SecretHash(ba7816bf"));
    }
}
