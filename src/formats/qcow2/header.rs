//! The qcow2 header and its extensions: parsed from untrusted bytes, every
//! field validated before anything trusts it.

use super::Qcow2Error;

pub(crate) const MAGIC: [u8; 4] = *b"QFI\xfb";
pub(crate) const V2_HEADER_LEN: u32 = 72;
pub(crate) const V3_HEADER_LEN: u32 = 104;

pub(crate) const INCOMPAT_DIRTY: u64 = 1 << 0;
pub(crate) const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub(crate) const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub(crate) const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub(crate) const INCOMPAT_EXTL2: u64 = 1 << 4;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
const EXT_DATA_FILE: u32 = 0x4441_5441;
const EXT_CRYPTO: u32 = 0x0537_be77;

/// Largest cluster we accept (QEMU's limit too).
pub(crate) const MAX_CLUSTER_BITS: u32 = 21;
pub(crate) const MIN_CLUSTER_BITS: u32 = 9;
/// Table size limits (QEMU's): bound what a hostile image can make us allocate.
pub(crate) const MAX_L1_BYTES: u64 = 32 << 20;
pub(crate) const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Highest offset a table entry may use (bits 9-55).
pub(crate) const MAX_HOST_OFFSET: u64 = (1 << 56) - 1;
pub(crate) const MAX_BACKING_NAME: u32 = 1023;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    /// From the extensions.
    pub backing_format: Option<String>,
    pub backing_file: Option<String>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// L2 entries per table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8
    }

    /// L1 entries needed to map `size` bytes.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        let per_l1 = self.cluster_size() * self.l2_entries();
        size.div_ceil(per_l1)
    }

    /// Parse and validate the first cluster of an image (`buf` holds at
    /// least min(cluster, file) bytes; `file_len` bounds every table).
    pub fn parse(buf: &[u8], file_len: u64) -> Result<Header, Qcow2Error> {
        let bad = |what: String| Err(Qcow2Error::Corrupt(what));
        if buf.len() < V2_HEADER_LEN as usize || buf[0..4] != MAGIC {
            return Err(Qcow2Error::NotQcow2);
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(Qcow2Error::Unsupported(format!("qcow2 version {version}")));
        }
        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits: be32(buf, 20),
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            backing_format: None,
            backing_file: None,
        };
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&h.cluster_bits) {
            return bad(format!("cluster_bits {} (must be 9 to 21)", h.cluster_bits));
        }
        let cs = h.cluster_size();
        if version == 3 {
            if buf.len() < V3_HEADER_LEN as usize {
                return bad("truncated version 3 header".into());
            }
            h.incompatible_features = be64(buf, 72);
            h.compatible_features = be64(buf, 80);
            h.autoclear_features = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < V3_HEADER_LEN
                || !h.header_length.is_multiple_of(8)
                || h.header_length as u64 > cs
            {
                return bad(format!("header_length {}", h.header_length));
            }
        }
        if h.refcount_order > 6 {
            return bad(format!("refcount_order {} (at most 6)", h.refcount_order));
        }
        if h.crypt_method != 0 {
            return Err(Qcow2Error::Unsupported("encryption".into()));
        }
        let aligned = |off: u64| off.is_multiple_of(cs);
        // L1 table: big enough for the virtual size, bounded, inside the file,
        // clear of the header cluster.
        if h.size > MAX_HOST_OFFSET {
            return bad(format!("virtual size {} is too large", h.size));
        }
        let l1_bytes = h.l1_size as u64 * 8;
        if l1_bytes > MAX_L1_BYTES {
            return bad(format!("L1 table of {} entries is too large", h.l1_size));
        }
        if (h.l1_size as u64) < h.l1_entries_for(h.size) {
            return bad(format!(
                "L1 table of {} entries cannot map {} bytes",
                h.l1_size, h.size
            ));
        }
        if h.l1_size > 0
            && (h.l1_table_offset < cs
                || !aligned(h.l1_table_offset)
                || h.l1_table_offset.saturating_add(l1_bytes) > file_len)
        {
            return bad(format!("L1 table offset {:#x}", h.l1_table_offset));
        }
        let rt_bytes = h.refcount_table_clusters as u64 * cs;
        if h.refcount_table_clusters == 0 || rt_bytes > MAX_REFTABLE_BYTES {
            return bad(format!(
                "refcount table of {} clusters",
                h.refcount_table_clusters
            ));
        }
        if h.refcount_table_offset < cs
            || !aligned(h.refcount_table_offset)
            || h.refcount_table_offset.saturating_add(rt_bytes) > file_len
        {
            return bad(format!(
                "refcount table offset {:#x}",
                h.refcount_table_offset
            ));
        }
        if h.nb_snapshots > 0 && !aligned(h.snapshots_offset) {
            return bad(format!("snapshot table offset {:#x}", h.snapshots_offset));
        }
        if h.backing_file_offset != 0 {
            let end = h
                .backing_file_offset
                .saturating_add(h.backing_file_size as u64);
            if h.backing_file_size == 0
                || h.backing_file_size > MAX_BACKING_NAME
                || end > cs.min(buf.len() as u64)
            {
                return bad(format!(
                    "backing file name at {:#x} length {}",
                    h.backing_file_offset, h.backing_file_size
                ));
            }
            let name = &buf[h.backing_file_offset as usize..end as usize];
            h.backing_file = Some(
                String::from_utf8(name.to_vec())
                    .map_err(|_| Qcow2Error::Corrupt("backing file name is not UTF-8".into()))?,
            );
        }
        h.parse_extensions(buf)?;
        Ok(h)
    }

    fn parse_extensions(&mut self, buf: &[u8]) -> Result<(), Qcow2Error> {
        if self.version < 3 && self.backing_file_offset == V2_HEADER_LEN as u64 {
            return Ok(()); // no room for extensions before the name
        }
        let limit = if self.backing_file_offset != 0 {
            self.backing_file_offset as usize
        } else {
            buf.len().min(self.cluster_size() as usize)
        };
        let mut at = self.header_length as usize;
        let mut seen_backing_format = false;
        while at + 8 <= limit {
            let kind = be32(buf, at);
            let len = be32(buf, at + 4) as usize;
            let data_start = at + 8;
            let Some(data_end) = data_start.checked_add(len).filter(|&e| e <= limit) else {
                return Err(Qcow2Error::Corrupt(format!(
                    "header extension {kind:#x} overruns the header"
                )));
            };
            let data = &buf[data_start..data_end];
            match kind {
                EXT_END => return Ok(()),
                EXT_BACKING_FORMAT => {
                    if seen_backing_format {
                        return Err(Qcow2Error::Corrupt("two backing format extensions".into()));
                    }
                    seen_backing_format = true;
                    let f = String::from_utf8(data.to_vec())
                        .map_err(|_| Qcow2Error::Corrupt("backing format is not UTF-8".into()))?;
                    self.backing_format = Some(f);
                }
                EXT_DATA_FILE => {
                    return Err(Qcow2Error::Unsupported("an external data file".into()))
                }
                EXT_CRYPTO => return Err(Qcow2Error::Unsupported("encryption".into())),
                EXT_FEATURE_TABLE => {}
                _ => {} // unknown extensions are safe to ignore
            }
            at = data_start + len.div_ceil(8) * 8;
        }
        Ok(())
    }

    /// Feature checks that depend on how the image is opened.
    pub fn check_features(&self, writable: bool) -> Result<(), Qcow2Error> {
        let inc = self.incompatible_features;
        let known = INCOMPAT_DIRTY
            | INCOMPAT_CORRUPT
            | INCOMPAT_DATA_FILE
            | INCOMPAT_COMPRESSION
            | INCOMPAT_EXTL2;
        if inc & !known != 0 {
            return Err(Qcow2Error::Unsupported(format!(
                "unknown incompatible feature bits {:#x}",
                inc & !known
            )));
        }
        if inc & INCOMPAT_DATA_FILE != 0 {
            return Err(Qcow2Error::Unsupported("an external data file".into()));
        }
        if inc & INCOMPAT_EXTL2 != 0 {
            return Err(Qcow2Error::Unsupported(
                "extended L2 entries (subclusters)".into(),
            ));
        }
        if inc & INCOMPAT_COMPRESSION != 0 {
            return Err(Qcow2Error::Unsupported(
                "a compression type other than zlib".into(),
            ));
        }
        if writable {
            if inc & INCOMPAT_CORRUPT != 0 {
                return Err(Qcow2Error::Unsupported(
                    "the corrupt bit (QEMU found inconsistent metadata); repair it with `qemu-img check -r all` or open it read-only".into(),
                ));
            }
            if inc & INCOMPAT_DIRTY != 0 {
                return Err(Qcow2Error::Unsupported(
                    "the dirty bit (refcounts may be stale); repair it with `qemu-img check -r all`".into(),
                ));
            }
            if self.nb_snapshots > 0 {
                return Err(Qcow2Error::Unsupported(format!(
                    "{} internal snapshot(s) on a writable open; open it read-only or delete them with `qemu-img snapshot -d`",
                    self.nb_snapshots
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal valid v3 header: 64 KiB clusters, 1 GiB, L1 at cluster 3,
    /// refcount table at cluster 1.
    pub(crate) fn v3() -> Vec<u8> {
        let mut b = vec![0u8; 65536];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&16u32.to_be_bytes());
        b[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        b[36..40].copy_from_slice(&2u32.to_be_bytes());
        b[40..48].copy_from_slice(&(3u64 << 16).to_be_bytes());
        b[48..56].copy_from_slice(&(1u64 << 16).to_be_bytes());
        b[56..60].copy_from_slice(&1u32.to_be_bytes());
        b[96..100].copy_from_slice(&4u32.to_be_bytes());
        b[100..104].copy_from_slice(&104u32.to_be_bytes());
        b
    }

    const FILE: u64 = 1 << 20;

    fn with(f: impl FnOnce(&mut Vec<u8>)) -> Result<Header, Qcow2Error> {
        let mut b = v3();
        f(&mut b);
        Header::parse(&b, FILE)
    }

    #[test]
    fn valid_header_parses() {
        let h = with(|_| {}).unwrap();
        assert_eq!(
            (h.version, h.cluster_size(), h.size, h.l1_size),
            (3, 65536, 1 << 30, 2)
        );
    }

    #[test]
    fn every_bad_field_is_refused() {
        type Mutation = Box<dyn Fn(&mut Vec<u8>)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("magic", Box::new(|b| b[0] = b'X')),
            (
                "version",
                Box::new(|b| b[4..8].copy_from_slice(&4u32.to_be_bytes())),
            ),
            (
                "cluster bits low",
                Box::new(|b| b[20..24].copy_from_slice(&8u32.to_be_bytes())),
            ),
            (
                "cluster bits high",
                Box::new(|b| b[20..24].copy_from_slice(&30u32.to_be_bytes())),
            ),
            (
                "encryption",
                Box::new(|b| b[32..36].copy_from_slice(&2u32.to_be_bytes())),
            ),
            (
                "l1 too small",
                Box::new(|b| b[36..40].copy_from_slice(&1u32.to_be_bytes())),
            ),
            (
                "l1 huge",
                Box::new(|b| b[36..40].copy_from_slice(&u32::MAX.to_be_bytes())),
            ),
            (
                "l1 unaligned",
                Box::new(|b| b[40..48].copy_from_slice(&0x30001u64.to_be_bytes())),
            ),
            (
                "l1 in header",
                Box::new(|b| b[40..48].copy_from_slice(&0u64.to_be_bytes())),
            ),
            (
                "l1 past eof",
                Box::new(|b| b[40..48].copy_from_slice(&(FILE).to_be_bytes())),
            ),
            (
                "l1 overflow",
                Box::new(|b| b[40..48].copy_from_slice(&(!0xffffu64).to_be_bytes())),
            ),
            (
                "reftable zero",
                Box::new(|b| b[56..60].copy_from_slice(&0u32.to_be_bytes())),
            ),
            (
                "reftable huge",
                Box::new(|b| b[56..60].copy_from_slice(&1000u32.to_be_bytes())),
            ),
            (
                "reftable past eof",
                Box::new(|b| b[48..56].copy_from_slice(&(FILE).to_be_bytes())),
            ),
            (
                "refcount order",
                Box::new(|b| b[96..100].copy_from_slice(&7u32.to_be_bytes())),
            ),
            (
                "header length",
                Box::new(|b| b[100..104].copy_from_slice(&100u32.to_be_bytes())),
            ),
            (
                "header length huge",
                Box::new(|b| b[100..104].copy_from_slice(&u32::MAX.to_be_bytes())),
            ),
            (
                "size huge",
                Box::new(|b| b[24..32].copy_from_slice(&u64::MAX.to_be_bytes())),
            ),
            (
                "backing name long",
                Box::new(|b| {
                    b[8..16].copy_from_slice(&512u64.to_be_bytes());
                    b[16..20].copy_from_slice(&5000u32.to_be_bytes());
                }),
            ),
            (
                "backing name past cluster",
                Box::new(|b| {
                    b[8..16].copy_from_slice(&65530u64.to_be_bytes());
                    b[16..20].copy_from_slice(&100u32.to_be_bytes());
                }),
            ),
            (
                "extension overrun",
                Box::new(|b| {
                    b[104..108].copy_from_slice(&0x1234u32.to_be_bytes());
                    b[108..112].copy_from_slice(&u32::MAX.to_be_bytes());
                }),
            ),
            (
                "data file extension",
                Box::new(|b| {
                    b[104..108].copy_from_slice(&EXT_DATA_FILE.to_be_bytes());
                    b[108..112].copy_from_slice(&4u32.to_be_bytes());
                }),
            ),
        ];
        for (name, f) in cases {
            assert!(with(f).is_err(), "{name} was accepted");
        }
    }

    #[test]
    fn feature_bits_are_refused_with_reasons() {
        let h = |inc: u64, snaps: u32| {
            let mut h = with(|_| {}).unwrap();
            h.incompatible_features = inc;
            h.nb_snapshots = snaps;
            h
        };
        let msg = |r: Result<(), Qcow2Error>| r.unwrap_err().to_string();
        assert!(msg(h(INCOMPAT_DIRTY, 0).check_features(true)).contains("qemu-img check -r all"));
        assert!(h(INCOMPAT_DIRTY, 0).check_features(false).is_ok());
        assert!(msg(h(INCOMPAT_CORRUPT, 0).check_features(true)).contains("corrupt"));
        assert!(msg(h(INCOMPAT_EXTL2, 0).check_features(false)).contains("extended L2"));
        assert!(msg(h(INCOMPAT_DATA_FILE, 0).check_features(false)).contains("external data file"));
        assert!(msg(h(1 << 40, 0).check_features(false)).contains("unknown incompatible"));
        assert!(msg(h(0, 2).check_features(true)).contains("snapshot"));
        assert!(h(0, 2).check_features(false).is_ok());
    }

    #[test]
    fn backing_name_and_format_extension() {
        let h = with(|b| {
            b[104..108].copy_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
            b[108..112].copy_from_slice(&3u32.to_be_bytes());
            b[112..115].copy_from_slice(b"raw");
            b[8..16].copy_from_slice(&512u64.to_be_bytes());
            b[16..20].copy_from_slice(&8u32.to_be_bytes());
            b[512..520].copy_from_slice(b"base.img");
        })
        .unwrap();
        assert_eq!(h.backing_file.as_deref(), Some("base.img"));
        assert_eq!(h.backing_format.as_deref(), Some("raw"));
    }
}
