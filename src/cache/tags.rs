//! Surrogate keys (tags): which stored URLs carry which tags, so one purge can name a whole
//! group (`Surrogate-Key`, Varnish's `xkey`). The index maps a tag to the primary keys of the
//! URLs whose stored responses listed it; it is filled when an object is stored (in memory or
//! on disk) and when the disk index is rebuilt, so it survives restarts wherever the objects
//! do. It follows the objects out as well: a URL is dropped from its tags when it has left
//! every tier (evicted, expired or purged), and the whole index is bounded by
//! `[purge] tag_index_size`. When it is full, a tagged response is not stored at all rather
//! than stored where a tag purge could not find it.
//!
//! What a tier evicts, and when, belongs to the tiers; they report it here.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use http::HeaderName;
use pingora::cache::key::HashBinary;
use pingora::http::ResponseHeader;

use super::meta::{FieldNames, ObjectMeta};

const SHARDS: usize = 16;

/// Estimated bytes of bookkeeping for one distinct tag, beside its text: its shared string
/// header, its set of URLs and its slot in the tag map.
const TAG_OVERHEAD: usize = 96;
/// Estimated bytes per (tag, URL) pair: the URL's key in the tag's set and the tag's pointer
/// in the URL's list, with hash-table slack.
const PAIR_OVERHEAD: usize = 48;
/// Estimated bytes per tagged URL: its key, tiers and list in the reverse map.
const URL_OVERHEAD: usize = 80;

/// A tier that can hold a tagged object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Memory = 1,
    Disk = 2,
}

/// The tags of one URL, and the tiers holding a copy of it.
struct Tagged {
    tiers: u8,
    tags: Vec<Arc<str>>,
}

pub struct TagIndex {
    /// Response headers whose space-separated values are tags.
    headers: Vec<HeaderName>,
    /// Tag → URLs, sharded by tag.
    by_tag: Vec<Mutex<HashMap<Arc<str>, HashSet<HashBinary>>>>,
    /// URL → its tags and tiers, sharded by URL: how an eviction finds what to clean.
    by_url: Vec<Mutex<HashMap<HashBinary, Tagged>>>,
    /// Estimated bytes held, against `limit`.
    bytes: AtomicUsize,
    limit: usize,
    /// Tagged responses not stored because the index was full.
    pub refused: AtomicU64,
}

impl TagIndex {
    pub fn new(headers: Vec<HeaderName>, limit_bytes: usize) -> TagIndex {
        TagIndex {
            headers,
            by_tag: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            by_url: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            bytes: AtomicUsize::new(0),
            limit: limit_bytes,
            refused: AtomicU64::new(0),
        }
    }

    /// The response fields that carry tags.
    pub fn header_names(&self) -> &[HeaderName] {
        &self.headers
    }

    /// The tags of a stored object; its header is decoded only when it may hold a field
    /// that carries them (most objects have none).
    pub fn tags_of_stored(&self, meta: &ObjectMeta, body_len: usize) -> Vec<String> {
        if !meta.times.field_names.may_have(self.field_bits()) {
            return Vec::new();
        }
        self.tags_of(&meta.header(body_len))
    }

    /// The [`FieldNames`] bits of the fields that carry tags.
    pub fn field_bits(&self) -> u32 {
        (self.headers.iter()).fold(0, |bits, name| bits | FieldNames::bit(name))
    }

    /// Whether any header is configured to carry tags.
    pub fn is_enabled(&self) -> bool {
        !self.headers.is_empty()
    }

    /// Estimated bytes the index holds now.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn limit_bytes(&self) -> usize {
        self.limit
    }

    /// Distinct tags indexed now.
    pub fn tag_count(&self) -> usize {
        self.by_tag
            .iter()
            .filter_map(|s| s.lock().ok().map(|s| s.len()))
            .sum()
    }

    fn tag_shard(&self, tag: &str) -> &Mutex<HashMap<Arc<str>, HashSet<HashBinary>>> {
        let h = tag.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        &self.by_tag[(h % SHARDS as u64) as usize]
    }

    fn url_shard(&self, primary: &HashBinary) -> &Mutex<HashMap<HashBinary, Tagged>> {
        // The key is already a cryptographic hash: any byte spreads evenly.
        &self.by_url[primary[0] as usize % SHARDS]
    }

    /// The tags a response carries.
    pub fn tags_of(&self, header: &ResponseHeader) -> Vec<String> {
        let mut tags = Vec::new();
        for name in &self.headers {
            for value in header.headers.get_all(name) {
                if let Ok(v) = value.to_str() {
                    tags.extend(v.split_ascii_whitespace().map(str::to_string));
                }
            }
        }
        tags
    }

    /// Records that `tier` holds a copy of the URL `primary`, carrying the tags in `header`.
    /// `false`: the index is full and nothing was recorded; the copy must not be kept.
    #[must_use]
    pub fn record(&self, primary: HashBinary, tier: Tier, header: &ResponseHeader) -> bool {
        self.record_tags(primary, tier, &self.tags_of(header))
    }

    /// Records that `tier` holds a copy of the URL `primary`, which carries `tags`. `false`:
    /// the index is full and nothing was recorded; the copy must not be kept.
    #[must_use]
    pub fn record_tags(&self, primary: HashBinary, tier: Tier, tags: &[String]) -> bool {
        if tags.is_empty() {
            return true;
        }
        let Ok(mut urls) = self.url_shard(&primary).lock() else {
            return false;
        };
        let entry = urls.get_mut(&primary);
        let new: Vec<&String> = match &entry {
            Some(t) => tags
                .iter()
                .filter(|tag| !t.tags.iter().any(|have| have.as_ref() == tag.as_str()))
                .collect(),
            None => tags.iter().collect(),
        };
        let cost = new
            .iter()
            .map(|t| t.len() + TAG_OVERHEAD + PAIR_OVERHEAD)
            .sum::<usize>()
            + if entry.is_none() { URL_OVERHEAD } else { 0 };
        if cost > 0 && self.bytes.load(Ordering::Relaxed) + cost > self.limit {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let mut added = Vec::with_capacity(new.len());
        let mut spent = if entry.is_none() { URL_OVERHEAD } else { 0 };
        for tag in new {
            let Ok(mut shard) = self.tag_shard(tag).lock() else {
                continue;
            };
            let shared = match shard.get_key_value(tag.as_str()) {
                Some((k, _)) => k.clone(),
                None => {
                    spent += tag.len() + TAG_OVERHEAD;
                    Arc::from(tag.as_str())
                }
            };
            shard.entry(shared.clone()).or_default().insert(primary);
            spent += PAIR_OVERHEAD;
            added.push(shared);
        }
        self.bytes.fetch_add(spent, Ordering::Relaxed);
        let tagged = urls.entry(primary).or_insert(Tagged {
            tiers: 0,
            tags: Vec::new(),
        });
        tagged.tiers |= tier as u8;
        tagged.tags.extend(added);
        true
    }

    /// `tier` no longer holds the URL `primary` (evicted or expired there). Once no tier does,
    /// the URL leaves the index.
    pub fn forget(&self, primary: &HashBinary, tier: Tier) {
        let Ok(mut urls) = self.url_shard(primary).lock() else {
            return;
        };
        let Some(tagged) = urls.get_mut(primary) else {
            return;
        };
        tagged.tiers &= !(tier as u8);
        if tagged.tiers == 0 {
            if let Some(gone) = urls.remove(primary) {
                self.unlink(primary, &gone.tags);
            }
        }
    }

    /// The URL `primary` was removed from every tier (purged).
    pub fn forget_everywhere(&self, primary: &HashBinary) {
        let gone = self
            .url_shard(primary)
            .lock()
            .ok()
            .and_then(|mut urls| urls.remove(primary));
        if let Some(gone) = gone {
            self.unlink(primary, &gone.tags);
        }
    }

    /// Removes `primary` from each of `tags`, and a tag left without URLs.
    fn unlink(&self, primary: &HashBinary, tags: &[Arc<str>]) {
        let mut freed = URL_OVERHEAD;
        for tag in tags {
            let Ok(mut shard) = self.tag_shard(tag).lock() else {
                continue;
            };
            if let Some(urls) = shard.get_mut(tag) {
                if urls.remove(primary) {
                    freed += PAIR_OVERHEAD;
                }
                if urls.is_empty() {
                    shard.remove(tag);
                    freed += tag.len() + TAG_OVERHEAD;
                }
            }
        }
        self.sub_bytes(freed);
    }

    fn sub_bytes(&self, n: usize) {
        let _ = self
            .bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some(b.saturating_sub(n))
            });
    }

    /// Removes and returns every URL carrying `tag` (a hard purge removes them from every
    /// tier, so their other tags let go of them too).
    pub fn take(&self, tag: &str) -> Vec<HashBinary> {
        let taken = match self.tag_shard(tag).lock() {
            Ok(mut shard) => shard.remove(tag),
            Err(_) => None,
        };
        let Some(urls) = taken else {
            return Vec::new();
        };
        self.sub_bytes(tag.len() + TAG_OVERHEAD + urls.len() * PAIR_OVERHEAD);
        let urls: Vec<HashBinary> = urls.into_iter().collect();
        for primary in &urls {
            self.forget_everywhere(primary);
        }
        urls
    }

    /// Every URL carrying `tag`, leaving the index as it is (soft purges keep the objects).
    pub fn peek(&self, tag: &str) -> Vec<HashBinary> {
        match self.tag_shard(tag).lock() {
            Ok(shard) => shard
                .get(tag)
                .map(|s| s.iter().copied().collect())
                .unwrap_or_default(),
            Err(_) => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index() -> TagIndex {
        TagIndex::new(
            vec![
                HeaderName::from_static("surrogate-key"),
                HeaderName::from_static("xkey"),
            ],
            1 << 20,
        )
    }

    fn tags(t: &[&str]) -> Vec<String> {
        t.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn tags_from_both_headers() {
        let index = index();
        let mut h = ResponseHeader::build(200, None).unwrap();
        h.append_header("Surrogate-Key", "wiki  page:Main_Page")
            .unwrap();
        h.append_header("xkey", "skin").unwrap();
        assert!(index.record([1; 16], Tier::Memory, &h));
        assert!(index.record([2; 16], Tier::Memory, &h));
        assert_eq!(index.tags_of(&h), vec!["wiki", "page:Main_Page", "skin"]);
        assert_eq!(index.peek("skin").len(), 2);
        let mut taken = index.take("wiki");
        taken.sort();
        assert_eq!(taken, vec![[1; 16], [2; 16]]);
        assert!(index.take("wiki").is_empty());
        // Purged everywhere: their other tags let go of them too.
        assert!(index.peek("skin").is_empty());
        assert_eq!(index.bytes(), 0);
    }

    #[test]
    fn a_url_leaves_its_tags_only_when_no_tier_holds_it() {
        let index = index();
        assert!(index.record_tags([1; 16], Tier::Memory, &tags(&["a", "b"])));
        assert!(index.record_tags([1; 16], Tier::Disk, &tags(&["a", "b"])));
        assert!(index.record_tags([2; 16], Tier::Memory, &tags(&["b"])));
        index.forget(&[1; 16], Tier::Memory);
        assert_eq!(index.peek("a"), vec![[1; 16]], "still on disk");
        index.forget(&[1; 16], Tier::Disk);
        assert!(index.peek("a").is_empty());
        assert_eq!(index.peek("b"), vec![[2; 16]]);
        assert_eq!(index.tag_count(), 1);
        index.forget(&[2; 16], Tier::Memory);
        assert_eq!((index.tag_count(), index.bytes()), (0, 0));
    }

    #[test]
    fn a_full_index_refuses_new_tags_and_frees_room_as_urls_leave() {
        let index = TagIndex::new(vec![HeaderName::from_static("xkey")], 4096);
        let mut kept = 0;
        for i in 0..1000u32 {
            let mut key = [0; 16];
            key[..4].copy_from_slice(&i.to_le_bytes());
            if index.record_tags(key, Tier::Memory, &tags(&[&format!("page:{i}")])) {
                kept += 1;
            }
        }
        assert!(kept > 5 && kept < 1000, "{kept} kept");
        assert!(index.bytes() <= 4096);
        assert_eq!(index.refused.load(Ordering::Relaxed), 1000 - kept);
        // Already-indexed tags cost nothing more.
        assert!(index.record_tags([0; 16], Tier::Disk, &tags(&["page:0"])));
        for i in 0..kept {
            let mut key = [0; 16];
            key[..4].copy_from_slice(&(i as u32).to_le_bytes());
            index.forget(&key, Tier::Memory);
        }
        index.forget(&[0; 16], Tier::Disk);
        assert_eq!(index.bytes(), 0);
        assert!(index.record_tags([9; 16], Tier::Memory, &tags(&["page:new"])));
    }
}
