//! #21 "Why was this a miss?": `Skua-Debug: 1` from a client the purge rules allow gets a
//! `Skua-Debug` field explaining the cache's decision; from any other client it is ignored.

use std::time::Duration;

use crate::support::*;

const ASK: (&str, &str) = ("skua-debug", "1");

async fn origin() -> Origin {
    Origin::start(|req| match req.path.as_str() {
        "/short" => Reply::ok("short-lived").header("cache-control", "max-age=1"),
        "/nostore" => Reply::ok("private").header("cache-control", "no-store"),
        "/big" => Reply::ok("x".repeat(4096)).header("cache-control", "max-age=600"),
        _ => Reply::ok("page").header("cache-control", "max-age=600"),
    })
    .await
}

fn explanation(got: &Got) -> String {
    got.header("skua-debug").to_string()
}

#[tokio::test]
async fn the_explanation_says_what_the_cache_did_and_why() {
    let origin = origin().await;
    // Lifetimes exactly as the origin gives them (`ttl_jitter` is shown below).
    let skua = Skua::start_with(&[origin.addr], "ttl_jitter = 0", "").await;
    let key = format!("key=http://{}/page", skua.addr);

    // A miss, stored for the lifetime max-age gave it.
    let miss = explanation(&get(&skua.url("/page"), &[ASK]).await);
    for part in [
        &key,
        "answer=miss",
        "stored=yes",
        "lifetime=600s",
        "from=max-age",
        "purged=none",
    ] {
        assert!(miss.contains(part), "{part} in {miss}");
    }
    // A hit: its age and what is left of its lifetime.
    let hit = explanation(&get(&skua.url("/page"), &[ASK]).await);
    for part in [
        &key,
        "answer=hit-front",
        "phase=hit",
        "lifetime=600s",
        "fresh_for=",
        "from=max-age",
    ] {
        assert!(hit.contains(part), "{part} in {hit}");
    }
    // A pass by cookie.
    let cookie = [ASK, ("cookie", "wikiSession=abc")];
    let pass = explanation(&get(&skua.url("/page"), &cookie).await);
    assert!(
        pass.contains("answer=pass") && pass.contains("pass=cookie"),
        "{pass}"
    );
    // A response that may not be stored, and why.
    let unstorable = explanation(&get(&skua.url("/nostore"), &[ASK]).await);
    assert!(unstorable.contains("stored=no (no-store)"), "{unstorable}");
    // A purged object: a miss, with the purge on record.
    let purged = send(&client(), "PURGE", &skua.url("/page"), &[]).await;
    assert_eq!(purged.status, 204);
    let after = explanation(&get(&skua.url("/page"), &[ASK]).await);
    for part in ["answer=miss", "purged=0s_ago"] {
        assert!(after.contains(part), "{part} in {after}");
    }
    // Without the request field, nothing is explained.
    assert_eq!(get(&skua.url("/page"), &[]).await.header("skua-debug"), "");
}

/// A copy served stale (within its grace, while it is fetched again) says how stale it is.
#[tokio::test]
async fn a_stale_hit_says_how_stale() {
    let origin = origin().await;
    let skua = Skua::start_with(&[origin.addr], "default_grace = \"30s\"\n", "").await;
    get(&skua.url("/short"), &[]).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let stale = explanation(&get(&skua.url("/short"), &[ASK]).await);
    for part in [
        "answer=hit-front",
        "phase=stale",
        "lifetime=1s",
        "stale_by=",
        "from=max-age",
    ] {
        assert!(stale.contains(part), "{part} in {stale}");
    }
}

/// A response larger than the largest object streams through unstored, and says so.
#[tokio::test]
async fn a_response_too_large_to_store_says_so() {
    let origin = origin().await;
    let skua = Skua::start_with(&[origin.addr], "max_object_size = 1024\n", "").await;
    for _ in 0..2 {
        let big = explanation(&get(&skua.url("/big"), &[ASK]).await);
        assert!(
            big.contains("answer=miss") && big.contains("stored=no (too-large)"),
            "{big}"
        );
    }
    assert_eq!(origin.count("/big"), 2);
}

#[tokio::test]
async fn a_client_outside_the_purge_rules_gets_no_explanation() {
    let origin = origin().await;
    let skua = Skua::start(&[origin.addr], "[purge]\nallow = [\"192.0.2.0/24\"]\n").await;
    for _ in 0..2 {
        let got = get(&skua.url("/page"), &[ASK]).await;
        assert_eq!(got.status, 200);
        assert_eq!(got.header("skua-debug"), "", "{:?}", got.headers);
    }
}

#[tokio::test]
async fn the_explanation_names_the_rules_that_decided() {
    let origin = origin().await;
    let rules = r#"
[[rule]]
name = "diffs for a day"
match = { path_prefix = ["/page"] }
ttl = "1d"
"#;
    let skua = Skua::start(&[origin.addr], rules).await;
    let miss = explanation(&get(&skua.url("/page"), &[ASK]).await);
    for part in [
        "rules=\"cache:diffs for a day\"",
        "lifetime=86400s",
        "from=rule",
    ] {
        assert!(miss.contains(part), "{part} in {miss}");
    }
}
