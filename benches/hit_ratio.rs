//! Hit ratio of the memory tier under a Zipf key mix, at several sizes. Answers: how much of
//! a wiki's traffic (page popularity is close to Zipf with s ≈ 1) a memory tier of a given
//! size absorbs with its W-TinyLFU admission (`src/cache/tinylfu.rs`). `cargo bench --bench hit_ratio`.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use pingora::cache::CacheMeta;
use pingora::http::{RequestHeader, ResponseHeader};
use rand::prelude::*;
use rand_distr::Zipf;
use skua::cache::memory::{MemoryTier, StoredObject};
use skua::cache::meta::StoredMeta;

const KEYS: u64 = 100_000;
const REQUESTS: usize = 1_000_000;
const OBJECT: usize = 4096;

fn main() {
    let now = SystemTime::now();
    let header = ResponseHeader::build(200, None).unwrap();
    let meta = CacheMeta::new(now + Duration::from_secs(3600), now, 0, 0, header);
    let req = RequestHeader::build("GET", b"/", None).unwrap();
    let body = Bytes::from(vec![b'x'; OBJECT]);
    println!("Zipf hit ratio, {KEYS} keys of {OBJECT} bytes, {REQUESTS} requests");
    println!(
        "{:>8} {:>10} {:>10} {:>10}",
        "size %", "s=0.8", "s=1.0", "s=1.2"
    );
    for percent in [0.5f64, 1.0, 5.0, 10.0, 25.0] {
        let mut row = format!("{percent:>8}");
        for s in [0.8, 1.0, 1.2] {
            let bytes = (KEYS as f64 * percent / 100.0) as u64 * (OBJECT as u64 + 600);
            let tier: &'static MemoryTier = Box::leak(Box::new(MemoryTier::new(bytes, 32, None)));
            let zipf = Zipf::new(KEYS, s).unwrap();
            let mut rng = StdRng::seed_from_u64(7);
            let mut hits = 0usize;
            for _ in 0..REQUESTS {
                let k = zipf.sample(&mut rng) as u64;
                let mut primary = [0u8; 16];
                primary[..8].copy_from_slice(&k.to_le_bytes());
                if tier.fresh_object(&primary, &req.headers, now).is_some() {
                    hits += 1;
                } else {
                    let stored = StoredMeta::from_meta(&meta);
                    tier.insert(primary, StoredObject::new(None, stored, body.clone()));
                }
            }
            row.push_str(&format!(" {:>9.1}%", 100.0 * hits as f64 / REQUESTS as f64));
        }
        println!("{row}");
    }
}
