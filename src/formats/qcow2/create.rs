//! Making new qcow2 images (`ringblk create`), laid out as qemu-img lays
//! them out: header, refcount table, refcount block, L1 table.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::cache::Encoding;
use super::header::{MAGIC, MAX_BACKING_NAME, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS};

pub const DEFAULT_CLUSTER_SIZE: u64 = 65536;
const HEADER_LENGTH: u32 = 112;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;

pub struct CreateOptions<'a> {
    pub size: u64,
    pub cluster_size: u64,
    /// Backing file name as stored (relative names resolve against the
    /// new image's folder) and its format.
    pub backing: Option<(&'a str, &'a str)>,
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what)
}

/// The image's bytes up to the end of its metadata (the rest is sparse).
pub fn layout(o: &CreateOptions) -> io::Result<Vec<u8>> {
    let cs = o.cluster_size;
    if !cs.is_power_of_two()
        || !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cs.trailing_zeros())
    {
        return Err(invalid(format!(
            "cluster size {cs} must be a power of two from 512 to 2M"
        )));
    }
    let bits = cs.trailing_zeros();
    let l1_entries = o.size.div_ceil(cs * (cs / 8));
    if l1_entries * 8 > super::header::MAX_L1_BYTES {
        return Err(invalid(format!(
            "{} bytes is too large for {cs}-byte clusters",
            o.size
        )));
    }
    let l1_clusters = (l1_entries * 8).div_ceil(cs).max(1);
    // Cluster 0: header; 1: refcount table; 2..: refcount blocks; then L1.
    let per_block = cs * 8 / 16;
    let mut blocks = 1;
    while blocks * per_block < 2 + blocks + l1_clusters {
        blocks += 1;
    }
    let total = 2 + blocks + l1_clusters;
    if blocks > cs / 8 {
        return Err(invalid(
            "image metadata does not fit one refcount table cluster".into(),
        ));
    }
    let mut img = vec![0u8; (total * cs) as usize];
    let h = &mut img[..cs as usize];
    h[0..4].copy_from_slice(&MAGIC);
    put32(h, 4, 3);
    put32(h, 20, bits);
    put64(h, 24, o.size);
    put32(h, 36, l1_entries as u32);
    put64(h, 40, (2 + blocks) * cs);
    put64(h, 48, cs);
    put32(h, 56, 1);
    put32(h, 96, 4);
    put32(h, 100, HEADER_LENGTH);
    // Extensions: backing format, feature names, end.
    let mut at = HEADER_LENGTH as usize;
    if let Some((_, fmt)) = o.backing {
        put32(h, at, EXT_BACKING_FORMAT);
        put32(h, at + 4, fmt.len() as u32);
        h[at + 8..at + 8 + fmt.len()].copy_from_slice(fmt.as_bytes());
        at += 8 + fmt.len().div_ceil(8) * 8;
    }
    let features: [(u8, u8, &str); 5] = [
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
    ];
    put32(h, at, EXT_FEATURE_TABLE);
    put32(h, at + 4, (features.len() * 48) as u32);
    for (k, (kind, bit, name)) in features.iter().enumerate() {
        let e = at + 8 + k * 48;
        h[e] = *kind;
        h[e + 1] = *bit;
        h[e + 2..e + 2 + name.len()].copy_from_slice(name.as_bytes());
    }
    at += 8 + features.len() * 48;
    at += 8; // end-of-extensions marker (zeros)
    if let Some((name, _)) = o.backing {
        if name.is_empty()
            || name.len() > MAX_BACKING_NAME as usize
            || at + name.len() > cs as usize
        {
            return Err(invalid(format!("backing file name '{name}' is too long")));
        }
        put64(h, 8, at as u64);
        put32(h, 16, name.len() as u32);
        h[at..at + name.len()].copy_from_slice(name.as_bytes());
    }
    // The compression_type field (byte 104) stays 0: zlib.
    // Refcount table and blocks: every metadata cluster has refcount 1.
    let table: Vec<u64> = (0..blocks).map(|b| (2 + b) * cs).collect();
    Encoding::Be64.encode(&table, &mut img[cs as usize..2 * cs as usize]);
    let enc = Encoding::Refcounts { order: 4 };
    for b in 0..blocks {
        let counts: Vec<u64> = (0..per_block)
            .map(|i| u64::from(b * per_block + i < total))
            .collect();
        let start = ((2 + b) * cs) as usize;
        enc.encode(&counts, &mut img[start..start + cs as usize]);
    }
    Ok(img)
}

/// Create a qcow2 image at `path` (which must not exist).
pub fn create(path: &Path, o: &CreateOptions) -> io::Result<()> {
    let img = layout(o)?;
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)?;
    f.write_all(&img)?;
    f.sync_all()?;
    // The new name must survive a crash too: a live snapshot sends guest
    // writes here from now on.
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

/// Create a raw image (sparse) at `path`.
pub fn create_raw(path: &Path, size: u64) -> io::Result<()> {
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)?;
    f.set_len(size)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::super::header::Header;
    use super::*;

    #[test]
    fn created_headers_parse_back() {
        for cs in [512u64, 4096, 65536, 2 << 20] {
            let img = layout(&CreateOptions {
                size: 10 << 30,
                cluster_size: cs,
                backing: Some(("base.raw", "raw")),
            })
            .unwrap();
            let h = Header::parse(&img, img.len() as u64).unwrap();
            assert_eq!(h.size, 10 << 30);
            assert_eq!(h.cluster_size(), cs);
            assert_eq!(h.backing_file.as_deref(), Some("base.raw"));
            assert_eq!(h.backing_format.as_deref(), Some("raw"));
            assert!(h.check_features(true).is_ok());
        }
    }

    #[test]
    fn refuses_bad_cluster_sizes() {
        for cs in [0u64, 256, 3000, 4 << 20] {
            assert!(layout(&CreateOptions {
                size: 1 << 20,
                cluster_size: cs,
                backing: None
            })
            .is_err());
        }
    }
}
