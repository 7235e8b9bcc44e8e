//! A mutation fuzzer for runs without libFuzzer (CI): not coverage-guided, but seeded with
//! valid frames and biased to the edits that matter for a framed protocol.

use super::targets::*;
use blocksync::testing::{MAX_BLOCK, MAX_DIGESTS, MAX_FRAME, MAX_TEXT, MIN_BLOCK};

/// A small deterministic generator (xorshift64), so any failure reproduces from its seed.
pub struct Rng(u64);

impl Rng {
    /// Seeded; any seed works.
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 random bits.
    pub fn bits(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform-ish in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.bits() % n as u64) as usize
    }
}

/// Length and count values at the edges of what decoders accept.
fn edge_u32(rng: &mut Rng, near: usize) -> u32 {
    let edges = [
        0,
        1,
        5,
        MAX_TEXT,
        MAX_TEXT + 1,
        MAX_DIGESTS,
        MAX_DIGESTS + 1,
        MAX_FRAME,
        MAX_FRAME + 1,
        u32::MAX as usize,
        near.saturating_sub(1),
        near + 1,
    ];
    edges[rng.below(edges.len())] as u32
}

/// Offsets, sizes and block sizes at the edges of what decoders and the link accept.
fn edge_u64(rng: &mut Rng) -> u64 {
    let edges = [
        0,
        1,
        MIN_BLOCK - 1,
        MIN_BLOCK,
        MAX_BLOCK,
        MAX_BLOCK + 1,
        1 << 20,
        i64::MAX as u64,
        1 << 63,
        u64::MAX - 1,
        u64::MAX,
        rng.bits(),
    ];
    edges[rng.below(edges.len())]
}

/// Applies one to four random edits to `input`: bit flips, byte changes, truncation,
/// insertion and deletion, length and number fields set to edge values, splices from
/// `pool` and repeated ranges.
pub fn mutate(rng: &mut Rng, input: &mut Vec<u8>, pool: &[Vec<u8>]) {
    for _ in 0..1 + rng.below(4) {
        let n = input.len();
        let at = if n == 0 { 0 } else { rng.below(n) };
        match rng.below(10) {
            0 if n > 0 => input[at] ^= 1 << rng.below(8),
            1 if n > 0 => input[at] = [0, 1, 2, 0x7f, 0x80, 0xff, rng.bits() as u8][rng.below(7)],
            2 => input.truncate(at),
            3 => {
                for _ in 0..1 + rng.below(16) {
                    input.insert(at, rng.bits() as u8);
                }
            }
            4 if n > 0 => {
                let end = (at + 1 + rng.below(16)).min(n);
                input.drain(at..end);
            }
            5 if n >= 4 => {
                let at = rng.below(n - 3);
                let v = edge_u32(rng, n - at);
                input[at..at + 4].copy_from_slice(&v.to_le_bytes());
            }
            6 if n >= 8 => {
                let at = rng.below(n - 7);
                let v = edge_u64(rng);
                input[at..at + 8].copy_from_slice(&v.to_le_bytes());
            }
            7 if !pool.is_empty() => {
                let other = &pool[rng.below(pool.len())];
                if !other.is_empty() {
                    let from = rng.below(other.len());
                    let to = from + rng.below(other.len() - from) + 1;
                    let cut = (at + rng.below(n - at + 1)).min(n);
                    input.splice(at..cut, other[from..to].iter().copied());
                }
            }
            8 if n > 0 => {
                let end = (at + 1 + rng.below(64)).min(n);
                let piece = input[at..end].to_vec();
                input.splice(end..end, piece);
            }
            _ => {
                let extra: Vec<u8> = (0..rng.below(32)).map(|_| rng.bits() as u8).collect();
                input.extend(extra);
            }
        }
    }
}

/// Runs `target` on its seeds and `iterations` mutated inputs (one in eight starts from
/// random bytes instead of a seed); returns the executions. On a failing input, panics
/// with the target, the input in hex, and the failure.
pub fn mutation_run(target: &Target, iterations: u64, seed: u64) -> u64 {
    let seeds = (target.seeds)();
    let mut rng = Rng::new(seed);
    let mut runs = 0;
    let mut run = |input: &[u8]| {
        if let Err(e) = std::panic::catch_unwind(|| (target.check)(input)) {
            let why = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            let hex: String = input.iter().map(|b| format!("{b:02x}")).collect();
            panic!("{} failed on input {hex}: {why}", target.name);
        }
        runs += 1;
    };
    for s in &seeds {
        run(s);
    }
    for _ in 0..iterations {
        let mut input = if rng.below(8) == 0 || seeds.is_empty() {
            (0..rng.below(64)).map(|_| rng.bits() as u8).collect()
        } else {
            seeds[rng.below(seeds.len())].clone()
        };
        mutate(&mut rng, &mut input, &seeds);
        run(&input);
    }
    runs
}
