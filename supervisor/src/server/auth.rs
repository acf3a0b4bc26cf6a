//! Tokens: random, shown once, stored only as their SHA-256.

use sha2::{Digest, Sha256};

/// The longest bearer token the API will hash (longer ones are refused unread).
pub const TOKEN_BYTES_MAX: usize = 256;

pub fn sha256_hex(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// A new token: 32 random bytes from the operating system, hex encoded.
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the operating system provides randomness");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
