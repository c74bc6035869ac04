//! One record in a segment, as bytes: an object (its head, then its body) or an invalidation
//! (a purge or a soft purge of a URL, which a restart's scan applies in order). The layout is
//! in `docs/disk-format.md`; this file is the one place that reads or writes it.
//!
//! A reader trusts nothing it has not checked: the fixed part and the object's metadata are
//! covered by one CRC-32 at the end of the head, and the body by one CRC-32 per [`BLOCK`],
//! kept in the head, so a hit checks each block as it reads it and never sends a byte of a
//! damaged one.

use pingora::cache::key::HashBinary;

use crate::cache::meta::{AgeWhenHeard, FieldNames, MetaTimes, ObjectMeta, Stamp};

/// Every record starts with these bytes; the `2` is the format (the first format kept two
/// files per object).
pub const MAGIC: [u8; 8] = *b"SKUAREC2";
/// The fixed part: magic, kind, flags, an object's age when heard (zero in the records of
/// Skua before it, as in invalidations), head length, body length, primary key, variant slot,
/// time.
pub const FIXED: usize = 8 + 1 + 1 + 2 + 4 + 8 + 16 + 16 + 8;
/// The body is checked in blocks of this size: a hit reads and checks a block before it sends
/// any of it, so this is also the unit a large body is streamed in.
pub const BLOCK: usize = 64 * 1024;
/// Records start at multiples of this, so a scan can tell a record's start from its length.
pub const ALIGN: u64 = 8;
/// A head larger than this is not one of ours (a real one is a response header and a CRC per
/// block of the largest body).
pub const HEAD_MAX: usize = 4 << 20;
/// Where an object's [`AgeWhenHeard`] is, in the fixed part: two bytes the first records of
/// this format left zero, which reads as a copy heard without `Age`.
const AGE_WHEN_HEARD: std::ops::Range<usize> = 10..12;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Object = 1,
    /// Every variant of the URL written before this record is gone.
    Delete = 2,
    /// Every variant of the URL written before this record is stale from `at` on.
    Expire = 3,
}

/// The fixed part of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fixed {
    pub kind: Kind,
    pub head_len: u32,
    pub body_len: u64,
    pub primary: HashBinary,
    pub slot: Option<HashBinary>,
    /// Unix nanoseconds: when an object was written, when an invalidation happened.
    pub at: u64,
}

impl Fixed {
    /// Bytes from the record's start to the next record's.
    pub fn total_len(&self) -> u64 {
        aligned(u64::from(self.head_len) + self.body_len)
    }
}

pub fn aligned(len: u64) -> u64 {
    len.div_ceil(ALIGN) * ALIGN
}

/// How many body blocks (and CRCs) a body of `len` bytes has.
pub fn blocks(len: u64) -> usize {
    usize::try_from(len.div_ceil(BLOCK as u64)).unwrap_or(usize::MAX)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Damage {
    #[error("not a record")]
    NotARecord,
    #[error("record head checksum mismatch")]
    HeadChecksum,
    #[error("record head does not decode")]
    HeadLayout,
    #[error("record cut short")]
    Truncated,
    #[error("body block checksum mismatch")]
    BodyChecksum,
    #[error("record names another object")]
    OtherObject,
}

/// Parses the fixed part (the first [`FIXED`] bytes) without checking the head's CRC, which
/// needs the whole head: enough for a scan to step to the next record.
pub fn parse_fixed(bytes: &[u8]) -> Result<Fixed, Damage> {
    let b = bytes.get(..FIXED).ok_or(Damage::Truncated)?;
    if b[..8] != MAGIC {
        return Err(Damage::NotARecord);
    }
    let kind = match b[8] {
        1 => Kind::Object,
        2 => Kind::Delete,
        3 => Kind::Expire,
        _ => return Err(Damage::NotARecord),
    };
    let has_slot = b[9] & 1 != 0;
    let head_len = u32_at(b, 12);
    let body_len = u64_at(b, 16);
    let mut primary = [0u8; 16];
    primary.copy_from_slice(&b[24..40]);
    let mut slot = [0u8; 16];
    slot.copy_from_slice(&b[40..56]);
    let at = u64_at(b, 56);
    let head = head_len as usize;
    if !(FIXED + 4..=HEAD_MAX).contains(&head) || (kind != Kind::Object && body_len != 0) {
        return Err(Damage::NotARecord);
    }
    Ok(Fixed {
        kind,
        head_len,
        body_len,
        primary,
        slot: has_slot.then_some(slot),
        at,
    })
}

/// An object's head as read back: its metadata and its body's block CRCs.
#[derive(Debug)]
pub struct Head {
    pub fixed: Fixed,
    pub meta: ObjectMeta,
    pub block_crcs: Vec<u32>,
}

/// Checks and decodes a whole head (`bytes` holds at least `head_len` bytes).
pub fn parse_head(bytes: &[u8]) -> Result<Head, Damage> {
    let fixed = parse_fixed(bytes)?;
    let head = bytes
        .get(..fixed.head_len as usize)
        .ok_or(Damage::Truncated)?;
    let (covered, crc) = head.split_at(head.len() - 4);
    if crc32fast::hash(covered) != u32_at(crc, 0) {
        return Err(Damage::HeadChecksum);
    }
    if fixed.kind != Kind::Object {
        return Ok(Head {
            fixed,
            meta: ObjectMeta::from_parts(empty_times(), Box::new([]), Vec::new(), None),
            block_crcs: Vec::new(),
        });
    }
    let mut r = Reader {
        bytes: covered,
        at: FIXED,
    };
    let meta = read_meta(&mut r).ok_or(Damage::HeadLayout)?;
    let count = blocks(fixed.body_len);
    if r.bytes.len() - r.at != count * 4 {
        return Err(Damage::HeadLayout);
    }
    let block_crcs = (0..count).filter_map(|_| r.u32()).collect();
    Ok(Head {
        fixed,
        meta,
        block_crcs,
    })
}

fn empty_times() -> MetaTimes {
    let zero = Stamp::from_nanos(0);
    MetaTimes {
        fresh_until: zero,
        created: zero,
        provenance: zero,
        epoch: zero,
        age_when_heard: AgeWhenHeard::NONE,
        stale_while_revalidate_sec: 0,
        stale_if_error_sec: 0,
        variance: None,
        content_coded: false,
        field_names: FieldNames::ANY,
        brotli_declined: false,
    }
}

/// Checks body block `index` (`data` is the whole block, or the body's tail for the last).
pub fn check_block(crcs: &[u32], index: usize, data: &[u8]) -> Result<(), Damage> {
    match crcs.get(index) {
        Some(&crc) if crc32fast::hash(data) == crc => Ok(()),
        _ => Err(Damage::BodyChecksum),
    }
}

/// Writes an object's head: the fixed part, the metadata, the body's block CRCs and the head's
/// CRC. The body follows it (and padding to [`ALIGN`]).
pub fn object_head(
    primary: &HashBinary,
    slot: Option<&HashBinary>,
    at: u64,
    meta: &ObjectMeta,
    body_len: u64,
    block_crcs: &[u32],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(FIXED + 128 + meta.head.len() + block_crcs.len() * 4);
    let age_when_heard = meta.times.age_when_heard;
    write_fixed(
        &mut out,
        Kind::Object,
        age_when_heard,
        primary,
        slot,
        at,
        body_len,
    );
    write_meta(&mut out, meta);
    for crc in block_crcs {
        out.extend_from_slice(&crc.to_le_bytes());
    }
    finish_head(out)
}

/// A purge (`Delete`) or soft purge (`Expire`) of every variant of `primary`, at `at`.
pub fn invalidation(kind: Kind, primary: &HashBinary, at: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(FIXED + 4 + ALIGN as usize);
    write_fixed(&mut out, kind, AgeWhenHeard::NONE, primary, None, at, 0);
    let mut out = finish_head(out);
    out.resize(aligned(out.len() as u64) as usize, 0);
    out
}

fn write_fixed(
    out: &mut Vec<u8>,
    kind: Kind,
    age_when_heard: AgeWhenHeard,
    primary: &HashBinary,
    slot: Option<&HashBinary>,
    at: u64,
    body_len: u64,
) {
    out.extend_from_slice(&MAGIC);
    out.push(kind as u8);
    out.push(u8::from(slot.is_some()));
    out.extend_from_slice(&age_when_heard.bits().to_le_bytes());
    out.extend_from_slice(&[0; 4]); // head length, set by finish_head
    out.extend_from_slice(&body_len.to_le_bytes());
    out.extend_from_slice(primary);
    out.extend_from_slice(slot.unwrap_or(&[0; 16]));
    out.extend_from_slice(&at.to_le_bytes());
}

fn finish_head(mut out: Vec<u8>) -> Vec<u8> {
    let head_len = (out.len() + 4) as u32;
    out[12..16].copy_from_slice(&head_len.to_le_bytes());
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// The metadata section: the times, then length-prefixed parts.
fn write_meta(out: &mut Vec<u8>, meta: &ObjectMeta) {
    let t = meta.times();
    for stamp in [t.fresh_until, t.created, t.provenance, t.epoch] {
        out.extend_from_slice(&stamp.nanos().to_le_bytes());
    }
    out.extend_from_slice(&t.stale_while_revalidate_sec.to_le_bytes());
    out.extend_from_slice(&t.stale_if_error_sec.to_le_bytes());
    out.extend_from_slice(&t.field_names.bits().to_le_bytes());
    out.push(
        u8::from(t.content_coded)
            | (u8::from(t.variance.is_some()) << 1)
            | (u8::from(t.brotli_declined) << 2),
    );
    out.extend_from_slice(&t.variance.unwrap_or([0; 16]));
    let upstream = meta
        .upstream_cache_status()
        .map_or(&[][..], |v| v.as_bytes());
    put_bytes(out, upstream);
    let vary = meta.vary();
    out.extend_from_slice(&(vary.len() as u32).to_le_bytes());
    for name in vary {
        put_bytes(out, name.as_bytes());
    }
    out.extend_from_slice(&(meta.head.len() as u32).to_le_bytes());
    meta.head.write_to(out);
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn read_meta(r: &mut Reader<'_>) -> Option<ObjectMeta> {
    let age_when_heard = r
        .bytes
        .get(AGE_WHEN_HEARD)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))?;
    let mut stamp = || r.u64().map(Stamp::from_nanos);
    let (fresh_until, created, provenance, epoch) = (stamp()?, stamp()?, stamp()?, stamp()?);
    let swr = r.u32()?;
    let sie = r.u32()?;
    let field_names = FieldNames::from_bits(r.u32()?);
    let flags = r.take(1)?[0];
    let mut variance = [0u8; 16];
    variance.copy_from_slice(r.take(16)?);
    let upstream = r.bytes()?;
    let upstream = if upstream.is_empty() {
        None
    } else {
        Some(http::HeaderValue::from_bytes(upstream).ok()?)
    };
    let count = r.u32()? as usize;
    let mut vary = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        vary.push(String::from_utf8(r.bytes()?.to_vec()).ok()?);
    }
    let head: Box<[u8]> = r.bytes()?.into();
    let times = MetaTimes {
        fresh_until,
        created,
        provenance,
        epoch,
        age_when_heard: AgeWhenHeard::from_bits(age_when_heard),
        stale_while_revalidate_sec: swr,
        stale_if_error_sec: sie,
        variance: (flags & 2 != 0).then_some(variance),
        content_coded: flags & 1 != 0,
        field_names,
        brotli_declined: flags & 4 != 0,
    };
    Some(ObjectMeta::from_parts(times, head, vary, upstream))
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let out = self.bytes.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(out)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32_at(b, 0))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|b| u64_at(b, 0))
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// The CRC of each [`BLOCK`] of a body given as chunks of any sizes.
#[derive(Default)]
pub struct BlockCrcs {
    done: Vec<u32>,
    current: crc32fast::Hasher,
    in_block: usize,
}

impl BlockCrcs {
    pub fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let n = (BLOCK - self.in_block).min(data.len());
            self.current.update(&data[..n]);
            self.in_block += n;
            data = &data[n..];
            if self.in_block == BLOCK {
                let full = std::mem::take(&mut self.current);
                self.done.push(full.finalize());
                self.in_block = 0;
            }
        }
    }

    pub fn finish(mut self) -> Vec<u32> {
        if self.in_block > 0 {
            self.done.push(self.current.finalize());
        }
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn meta() -> ObjectMeta {
        let mut header = pingora::http::ResponseHeader::build(200, None).unwrap();
        header.insert_header("cache-control", "max-age=60").unwrap();
        header.insert_header("vary", "Accept-Encoding").unwrap();
        header
            .insert_header("cache-status", "upstream; hit")
            .unwrap();
        let mut cache_meta = pingora::cache::CacheMeta::new(
            std::time::SystemTime::now() + std::time::Duration::from_secs(60),
            std::time::SystemTime::now(),
            5,
            7,
            header,
        );
        (cache_meta.extensions_mut()).insert(AgeWhenHeard::of(Duration::from_secs(86_400)));
        ObjectMeta::encode_cache_meta(&cache_meta)
    }

    fn body(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    fn crcs(body: &[u8], chunk: usize) -> Vec<u32> {
        let mut c = BlockCrcs::default();
        for piece in body.chunks(chunk.max(1)) {
            c.update(piece);
        }
        c.finish()
    }

    #[test]
    fn an_object_head_round_trips_and_every_flipped_bit_is_caught() {
        let m = meta();
        let b = body(BLOCK * 2 + 10);
        let block_crcs = crcs(&b, 1000);
        assert_eq!(block_crcs.len(), 3);
        let head = object_head(
            &[1; 16],
            Some(&[2; 16]),
            42,
            &m,
            b.len() as u64,
            &block_crcs,
        );
        let back = parse_head(&head).unwrap();
        assert_eq!(back.fixed.kind, Kind::Object);
        assert_eq!(back.fixed.slot, Some([2; 16]));
        assert_eq!(back.fixed.at, 42);
        assert_eq!(back.block_crcs, block_crcs);
        assert_eq!(back.meta.head.to_vec(), m.head.to_vec());
        assert_eq!(back.meta.vary(), m.vary());
        assert_eq!(back.meta.upstream_cache_status(), m.upstream_cache_status());
        assert_eq!(back.meta.times.fresh_until, m.times.fresh_until);
        assert_eq!(back.meta.times.stale_if_error_sec, 7);
        assert_eq!(
            back.meta.times.age_when_heard.age(),
            Duration::from_secs(86_400)
        );
        for i in 0..head.len() {
            let mut flipped = head.clone();
            flipped[i] ^= 0x04;
            assert!(parse_head(&flipped).is_err(), "flip at {i} undetected");
        }
        assert_eq!(
            parse_head(&head[..head.len() - 1]).unwrap_err(),
            Damage::Truncated
        );
        for (i, block) in b.chunks(BLOCK).enumerate() {
            check_block(&back.block_crcs, i, block).unwrap();
            let mut bad = block.to_vec();
            bad[block.len() / 2] ^= 1;
            assert_eq!(
                check_block(&back.block_crcs, i, &bad),
                Err(Damage::BodyChecksum)
            );
        }
    }

    #[test]
    fn block_crcs_do_not_depend_on_how_the_body_arrived() {
        let b = body(BLOCK * 3 + 1);
        let whole = crcs(&b, b.len());
        for chunk in [1, 100, BLOCK - 1, BLOCK, BLOCK + 1] {
            assert_eq!(crcs(&b, chunk), whole);
        }
        assert!(crcs(&[], 10).is_empty());
    }

    #[test]
    fn invalidations_are_aligned_and_checked() {
        let rec = invalidation(Kind::Delete, &[9; 16], 7);
        assert_eq!(rec.len() as u64 % ALIGN, 0);
        let head = parse_head(&rec).unwrap();
        assert_eq!(
            (head.fixed.kind, head.fixed.at, head.fixed.total_len()),
            (Kind::Delete, 7, rec.len() as u64)
        );
        let mut bad = rec.clone();
        bad[30] ^= 1;
        assert!(parse_head(&bad).is_err());
    }
}
