//! Block digests: which algorithm, and a fixed-size digest value that is cheap to move.

use sha2::Digest as _;
use std::fmt;
use std::str::FromStr;

/// The digest algorithm used to compare blocks that are not on the same machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashKind {
    /// BLAKE3, 256 bits: cryptographic and fast (the default).
    Blake3,
    /// XXH3, 128 bits: faster, not cryptographic (fine against accidents, not attackers).
    Xxh3,
    /// SHA-256: slow, for users whose policy demands it.
    Sha256,
}

/// Longest digest any [`HashKind`] produces, in bytes.
pub const MAX_DIGEST: usize = 32;

/// Bytes of a block digest as compared and sent: 128 bits. Why that is enough: an
/// accidental match of two different blocks has probability 2^-128 per comparison, so
/// even 2^40 block comparisons (a petabyte in 1 KiB blocks) leave it near 2^-88, far below
/// the odds of an undetected disk or memory error. With BLAKE3 (the default), making a
/// different block that matches a given one is a second-preimage attack on 128 bits, out
/// of reach; XXH3 is not cryptographic, so it only guards against accidents. `--verify`
/// compares the whole devices at full strength.
pub const BLOCK_DIGEST: usize = 16;

/// One block's digest. Shorter algorithms leave the tail zero, so equality is plain
/// byte equality.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Digest(pub [u8; MAX_DIGEST]);

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        f.write_str("…")
    }
}

impl HashKind {
    /// The name used on the command line and in the protocol.
    pub fn name(self) -> &'static str {
        match self {
            HashKind::Blake3 => "blake3",
            HashKind::Xxh3 => "xxh3",
            HashKind::Sha256 => "sha256",
        }
    }

    /// Digest length in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            HashKind::Blake3 | HashKind::Sha256 => 32,
            HashKind::Xxh3 => 16,
        }
    }

    /// A stable number for the protocol.
    pub fn id(self) -> u8 {
        match self {
            HashKind::Blake3 => 1,
            HashKind::Xxh3 => 2,
            HashKind::Sha256 => 3,
        }
    }

    /// The kind for a protocol number.
    pub fn from_id(id: u8) -> Option<Self> {
        match id {
            1 => Some(HashKind::Blake3),
            2 => Some(HashKind::Xxh3),
            3 => Some(HashKind::Sha256),
            _ => None,
        }
    }

    /// The digest used to compare blocks: [`HashKind::digest`] cut to
    /// [`BLOCK_DIGEST`] bytes (the rest zero).
    pub fn block_digest(self, data: &[u8]) -> Digest {
        let mut d = self.digest(data);
        d.0[BLOCK_DIGEST..].fill(0);
        d
    }

    /// The full-strength digest of `data`.
    pub fn digest(self, data: &[u8]) -> Digest {
        let mut out = [0u8; MAX_DIGEST];
        match self {
            HashKind::Blake3 => out.copy_from_slice(blake3::hash(data).as_bytes()),
            HashKind::Xxh3 => {
                out[..16].copy_from_slice(&xxhash_rust::xxh3::xxh3_128(data).to_le_bytes())
            }
            HashKind::Sha256 => out.copy_from_slice(&sha2::Sha256::digest(data)),
        }
        Digest(out)
    }
}

impl FromStr for HashKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "blake3" => Ok(HashKind::Blake3),
            "xxh3" | "xxh3-128" | "xxh128" => Ok(HashKind::Xxh3),
            "sha256" => Ok(HashKind::Sha256),
            _ => Err(format!(
                "unknown hash '{s}'; use blake3 (default), xxh3 (fast) or sha256"
            )),
        }
    }
}

/// The hash for a `-1`/`-2` name, and a note when it is not the one named: blocksync.py
/// passed any hashlib name (its default `sha512`, `md5`, ...); blocksync offers three.
/// The SHA-2 family maps to SHA-256 (a policy that names SHA-2 is met), every other
/// cryptographic name to BLAKE3 (at least as strong for comparing blocks, and faster).
pub fn resolve(name: &str) -> Result<(HashKind, Option<String>), String> {
    if let Ok(k) = name.parse::<HashKind>() {
        return Ok((k, None));
    }
    let key = name.to_ascii_lowercase().replace('-', "_");
    let kind = match key.as_str() {
        "sha224" | "sha384" | "sha512" | "sha512_224" | "sha512_256" => HashKind::Sha256,
        "md5" | "sha1" | "blake2b" | "blake2s" | "sha3_224" | "sha3_256" | "sha3_384"
        | "sha3_512" | "shake_128" | "shake_256" | "sm3" | "ripemd160" => HashKind::Blake3,
        _ => {
            return Err(format!(
                "unknown hash '{name}'; use blake3 (default), xxh3 (fast) or sha256 (blocksync.py's hashlib names, such as sha512 and md5, are taken too)"
            ));
        }
    };
    let note = format!(
        "hash '{name}' (a blocksync.py name) is not offered; {} is used instead: both sides compare with the same one",
        kind.name()
    );
    Ok((kind, Some(note)))
}

/// What one side knows of one block without sending its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockInfo {
    /// Not (wholly) there: the destination ends inside or before it.
    Missing,
    /// All zero: a hole, an all-zero block, or past the end of a sparse file destination.
    Zero,
    /// Data with this digest.
    Digest(Digest),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        // BLAKE3 and SHA-256 of the empty input.
        let b = HashKind::Blake3.digest(b"");
        assert_eq!(b.0[..4], [0xaf, 0x13, 0x49, 0xb9]);
        let s = HashKind::Sha256.digest(b"");
        assert_eq!(s.0[..4], [0xe3, 0xb0, 0xc4, 0x42]);
        let x = HashKind::Xxh3.digest(b"abc");
        assert_eq!(x.0[16..], [0u8; 16]);
    }

    #[test]
    fn names_round_trip() {
        for k in [HashKind::Blake3, HashKind::Xxh3, HashKind::Sha256] {
            assert_eq!(k.name().parse::<HashKind>().unwrap(), k);
            assert_eq!(HashKind::from_id(k.id()), Some(k));
            assert!(k.digest_len() <= MAX_DIGEST);
        }
        assert!("md5".parse::<HashKind>().is_err());
        for (name, kind) in [
            ("sha512", HashKind::Sha256),
            ("SHA384", HashKind::Sha256),
            ("sha224", HashKind::Sha256),
            ("md5", HashKind::Blake3),
            ("sha1", HashKind::Blake3),
            ("blake2b", HashKind::Blake3),
            ("sha3-256", HashKind::Blake3),
        ] {
            let (k, note) = resolve(name).unwrap();
            assert_eq!(k, kind, "{name}");
            assert!(note.unwrap().contains(name), "{name}");
        }
        assert_eq!(resolve("xxh3").unwrap(), (HashKind::Xxh3, None));
        assert!(resolve("crc32").unwrap_err().contains("unknown hash"));
        assert_eq!(HashKind::from_id(0), None);
    }

    #[test]
    fn different_data_different_digest() {
        for k in [HashKind::Blake3, HashKind::Xxh3, HashKind::Sha256] {
            assert_ne!(k.digest(&[0u8; 4096]), k.digest(&[1u8; 4096]));
        }
    }
}
