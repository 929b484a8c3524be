//! Hash maps keyed by one u64 (a table's file offset, a guest cluster),
//! looked up on every allocating write.
//!
//! std's SipHash cost more than the lookups it served (`perf`: about 90 ns
//! per allocating write). SplitMix64's finaliser (two multiplies, three
//! shifts) mixes a u64 well enough for hashbrown, which takes both the low
//! bits (bucket) and the high ones (tag), also for cluster-aligned keys.
//! The key XORed in first is random per map, so an image or a guest cannot
//! pick keys that collide; the maps are bounded besides (a cache's
//! capacity, the requests in flight).

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};

pub(crate) type U64Map<V> = HashMap<u64, V, Keyed>;

#[derive(Clone, Copy)]
pub(crate) struct Keyed {
    key: u64,
}

impl Default for Keyed {
    fn default() -> Self {
        Keyed {
            key: RandomState::new().hash_one(0u64),
        }
    }
}

impl BuildHasher for Keyed {
    type Hasher = Fold;
    fn build_hasher(&self) -> Fold {
        Fold {
            key: self.key,
            hash: 0,
        }
    }
}

pub(crate) struct Fold {
    key: u64,
    hash: u64,
}

impl Hasher for Fold {
    fn finish(&self) -> u64 {
        self.hash
    }
    fn write_u64(&mut self, v: u64) {
        let mut x = v ^ self.hash ^ self.key;
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        self.hash = x ^ (x >> 31);
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are hashed here; anything else still hashes right.
        for c in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..c.len()].copy_from_slice(c);
            self.write_u64(u64::from_le_bytes(b));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_offsets_spread_over_the_low_bits() {
        // Table offsets are multiples of the cluster size: their hashes must
        // still differ in the bits hashbrown picks buckets with.
        let k = Keyed::default();
        let mut seen = std::collections::HashSet::new();
        for i in 0..1024u64 {
            seen.insert(k.hash_one(i << 16) & 1023);
        }
        assert!(seen.len() > 600, "only {} of 1024 buckets used", seen.len());
    }

    #[test]
    fn a_map_finds_what_it_holds() {
        let mut m = U64Map::default();
        for i in 0..10_000u64 {
            m.insert(i * 4096, i);
        }
        assert!((0..10_000u64).all(|i| m.get(&(i * 4096)) == Some(&i)));
        assert_eq!(m.get(&1), None);
    }
}
