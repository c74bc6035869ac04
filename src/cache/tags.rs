//! Surrogate keys (tags): which stored URLs carry which tags, so one purge can name a whole
//! group (`Surrogate-Key`, Varnish's `xkey`). The index maps a tag to the primary keys of the
//! URLs whose stored responses listed it; it is filled when an object is stored (in memory or
//! on disk) and when the disk index is rebuilt, so it survives restarts wherever the objects
//! do. Entries of evicted objects linger until their tag is purged: a purge of a key that is
//! no longer stored is a no-op.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use http::HeaderName;
use pingora::cache::key::HashBinary;
use pingora::http::ResponseHeader;

const SHARDS: usize = 16;

pub struct TagIndex {
    /// Response headers whose space-separated values are tags.
    headers: Vec<HeaderName>,
    shards: Vec<Mutex<HashMap<String, HashSet<HashBinary>>>>,
}

impl TagIndex {
    pub fn new(headers: Vec<HeaderName>) -> TagIndex {
        TagIndex {
            headers,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    /// Whether any header is configured to carry tags.
    pub fn is_enabled(&self) -> bool {
        !self.headers.is_empty()
    }

    fn shard(&self, tag: &str) -> &Mutex<HashMap<String, HashSet<HashBinary>>> {
        let h = tag.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        &self.shards[(h % SHARDS as u64) as usize]
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

    /// Records that the URL `primary` carries the tags in `header`.
    pub fn record(&self, primary: HashBinary, header: &ResponseHeader) {
        for tag in self.tags_of(header) {
            if let Ok(mut shard) = self.shard(&tag).lock() {
                shard.entry(tag).or_default().insert(primary);
            }
        }
    }

    /// Records that the URL `primary` carries `tags`.
    pub fn record_tags(&self, primary: HashBinary, tags: &[String]) {
        for tag in tags {
            if let Ok(mut shard) = self.shard(tag).lock() {
                shard.entry(tag.clone()).or_default().insert(primary);
            }
        }
    }

    /// Removes and returns every URL carrying `tag`.
    pub fn take(&self, tag: &str) -> Vec<HashBinary> {
        match self.shard(tag).lock() {
            Ok(mut shard) => shard
                .remove(tag)
                .map(|s| s.into_iter().collect())
                .unwrap_or_default(),
            Err(_) => Vec::new(),
        }
    }

    /// Every URL carrying `tag`, leaving the index as it is (soft purges keep the objects).
    pub fn peek(&self, tag: &str) -> Vec<HashBinary> {
        match self.shard(tag).lock() {
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

    #[test]
    fn tags_from_both_headers() {
        let index = TagIndex::new(vec![
            HeaderName::from_static("surrogate-key"),
            HeaderName::from_static("xkey"),
        ]);
        let mut h = ResponseHeader::build(200, None).unwrap();
        h.append_header("Surrogate-Key", "wiki  page:Main_Page")
            .unwrap();
        h.append_header("xkey", "skin").unwrap();
        index.record([1; 16], &h);
        index.record([2; 16], &h);
        assert_eq!(index.tags_of(&h), vec!["wiki", "page:Main_Page", "skin"]);
        assert_eq!(index.peek("skin").len(), 2);
        let mut taken = index.take("wiki");
        taken.sort();
        assert_eq!(taken, vec![[1; 16], [2; 16]]);
        assert!(index.take("wiki").is_empty());
    }
}
