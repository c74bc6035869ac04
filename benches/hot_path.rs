//! Criterion benchmarks of the pieces every cache hit runs: building and hashing the cache
//! key, the storage policy (Cache-Control parsing), the memory-tier lookup and the response
//! header a fast-path hit clones and fills in, the ban check, and MediaWiki's spelling of a
//! title (`normalize_path`). `cargo bench --bench hot_path`.

use std::hint::black_box;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use pingora::cache::CacheMeta;
use pingora::http::{RequestHeader, ResponseHeader};
use skua::cache::bans::Invalidations;
use skua::cache::key::{CacheUrl, Scheme};
use skua::cache::memory::{MemoryTier, StoredObject};
use skua::cache::meta::StoredMeta;
use skua::cache::policy::StoragePolicy;

fn wiki_response() -> ResponseHeader {
    let mut r = ResponseHeader::build(200, None).unwrap();
    for (k, v) in [
        ("Date", "Wed, 25 Nov 2026 20:00:00 GMT"),
        ("Content-Type", "text/html; charset=UTF-8"),
        ("Content-Length", "4096"),
        ("Cache-Control", "s-maxage=300, must-revalidate, max-age=0"),
        ("Vary", "Accept-Encoding, Cookie"),
        ("ETag", "\"r1\""),
        ("Last-Modified", "Wed, 25 Nov 2026 19:00:00 GMT"),
        ("Server", "mw1234"),
    ] {
        r.append_header(k, v).unwrap();
    }
    r
}

fn policy() -> StoragePolicy {
    StoragePolicy {
        ttl_cap: Duration::from_secs(86400),
        ttl_cap_404: Duration::from_secs(600),
        ttl_jitter: 0.0,
        default_grace: Duration::ZERO,
        stale_if_error: Duration::from_secs(300),
        store_server_errors: true,
        honor_must_revalidate: true,
        heuristic_freshness: true,
        heuristic_max: Duration::from_secs(86400),
    }
}

fn bench(c: &mut Criterion) {
    c.bench_function("cache key: build and hash", |b| {
        b.iter(|| {
            let url = CacheUrl::new(
                Scheme::Http,
                black_box("En.Wikipedia.org:80"),
                black_box("/wiki/Main_Page"),
            )
            .unwrap();
            black_box(url.primary_hash())
        })
    });

    // `normalize_path = "mediawiki"` on every request its rule matches: a title MediaWiki's
    // link spelled (left as it is), and one to respell.
    for (case, target) in [
        ("as MediaWiki spells it", "/wiki/Rock_%27n%27_roll_(music)"),
        ("respelled", "/wiki/Rock_'n'_roll_%28music%29"),
    ] {
        c.bench_function(&format!("cache key: a title {case}"), |b| {
            b.iter(|| black_box(skua::rules::path::mediawiki(black_box(target)).len()))
        });
    }

    let p = policy();
    let resp = wiki_response();
    c.bench_function("storage policy: decide (Cache-Control parse)", |b| {
        b.iter(|| {
            let mut r = resp.clone();
            black_box(p.decide(&mut r, false, SystemTime::now(), None).ok())
        })
    });

    let tier: &'static MemoryTier = Box::leak(Box::new(MemoryTier::new(64 << 20, 32, None)));
    let now = SystemTime::now();
    let url = CacheUrl::new(Scheme::Http, "en.wikipedia.org", "/wiki/Main_Page").unwrap();
    let primary = url.primary_hash();
    let meta = CacheMeta::new(now + Duration::from_secs(300), now, 0, 0, resp.clone());
    let stored = StoredMeta::from_meta(&meta);
    tier.insert(
        primary,
        StoredObject::new(None, stored, Bytes::from(vec![b'x'; 4096])),
    );
    let req = RequestHeader::build("GET", b"/wiki/Main_Page", None).unwrap();
    c.bench_function("memory tier: fresh lookup", |b| {
        b.iter(|| black_box(tier.fresh_object(black_box(&primary), &req.headers, now)))
    });

    let obj = tier.fresh_object(&primary, &req.headers, now).unwrap();
    c.bench_function("response head: stored head plus a hit's fields", |b| {
        b.iter(|| {
            let mut out = Vec::with_capacity(obj.meta.head.len() + 160);
            skua::proxy::hit::write_head(
                &mut out,
                &obj,
                now,
                "skua; hit; ttl=258",
                false,
                None,
                skua::proxy::hit::HitFlags {
                    ttl_rule: false,
                    from_disk: false,
                    server_timing: false,
                },
            );
            black_box(out)
        })
    });

    // Every hit asks whether a ban covers it; 10,000 prefix bans on the page's own host, none
    // covering it, over 40 prefix lengths (benches/bans.py measures the same under wrk).
    let url = CacheUrl::new(Scheme::Http, "wiki.test", "/wiki/Main_Page").unwrap();
    let created = SystemTime::now() - Duration::from_secs(1);
    for bans in [0, 10_000] {
        let invalidations = Invalidations::new(Duration::from_secs(86400), None);
        for i in 0..bans {
            invalidations.ban(
                "wiki.test",
                &format!("/wiki/Page_{i}/{}", "s".repeat(i % 40)),
            );
        }
        c.bench_function(&format!("bans: check a hit against {bans} bans"), |b| {
            b.iter(|| black_box(invalidations.banned(black_box(&url), created)))
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
