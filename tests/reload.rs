//! SIGHUP reloads the configuration in place: under load, without failing a request, and a bad
//! file changes nothing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::*;

/// The ttl a fresh fill of `path` is stored with, from its Cache-Status.
async fn stored_ttl(skua: &Skua, path: &str) -> i64 {
    let r = get(&skua.url(path), &[]).await;
    let status = r.header("cache-status").to_string();
    status
        .split("ttl=")
        .nth(1)
        .and_then(|v| v.split(';').next())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no ttl in {status:?}"))
}

#[tokio::test]
async fn reload_under_load_changes_the_ttl_cap_and_a_bad_file_changes_nothing() {
    let origin = Origin::start(|_| Reply::ok("page").header("cache-control", "max-age=600")).await;
    let mut skua = Skua::start(&[origin.addr], "").await;
    assert!(stored_ttl(&skua, "/before").await > 500);

    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn({
        let (stop, base, client) = (stop.clone(), skua.url("/load/"), client());
        async move {
            let (mut ok, mut failed) = (0u64, 0u64);
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match client.get(format!("{base}{}", i % 20)).send().await {
                    Ok(r) if r.status() == 200 => ok += 1,
                    _ => failed += 1,
                }
                i += 1;
            }
            (ok, failed)
        }
    });

    let applied = skua
        .reload_and_wait(|text| {
            text.replace(
                "memory_size = 16777216",
                "memory_size = 16777216\nttl_cap = \"5s\"",
            )
        })
        .await;
    assert!(applied);
    let ttl = stored_ttl(&skua, "/after/1").await;
    assert!(ttl <= 5, "the new TTL cap applies to new fills: ttl={ttl}");

    // A file that does not validate: logged and ignored, the 5 s cap stays.
    let applied = skua
        .reload_and_wait(|text| text.replace("ttl_cap = \"5s\"", "ttl_cap = \"soon\""))
        .await;
    assert!(!applied);
    assert!(skua.alive());
    assert!(stored_ttl(&skua, "/after-bad").await <= 5);

    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = load.await.unwrap();
    assert_eq!(
        failed, 0,
        "no request failed across the reloads ({ok} succeeded)"
    );
    assert!(ok > 0);
}

#[tokio::test]
async fn zero_downtime_upgrade_hands_over_the_sockets_without_failing_a_request() {
    let origin = Origin::start(|_| Reply::ok("page").header("cache-control", "max-age=600")).await;
    let mut old = Skua::start(&[origin.addr], "").await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn({
        let (stop, base, client) = (stop.clone(), old.url("/u/"), client());
        async move {
            let (mut ok, mut failed) = (0u64, 0u64);
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let url = format!("{base}{}", i % 20);
                // A keep-alive connection the old process closes as it drains can lose the
                // request just sent on it; clients retry an idempotent request once on a
                // fresh connection (RFC 9112 §9.3.1), and so does this one.
                let mut result = client.get(&url).send().await;
                if matches!(&result, Err(e) if e.is_request() || e.is_connect()) {
                    result = client.get(&url).send().await;
                }
                match result {
                    Ok(r) if r.status() == 200 => ok += 1,
                    _ => failed += 1,
                }
                i += 1;
            }
            (ok, failed)
        }
    });
    let mut new = old.upgrade_in_place().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = load.await.unwrap();
    let after = get(&old.url("/after-upgrade"), &[]).await;
    let _ = new.kill();
    let _ = new.wait();
    assert_eq!(
        failed, 0,
        "no request failed across the upgrade ({ok} succeeded)"
    );
    assert_eq!(after.status, 200, "the new process serves on the same port");
}

#[tokio::test]
async fn reload_moves_misses_to_the_new_origins_and_keeps_the_cache() {
    let old =
        Origin::start(|_| Reply::ok("old origin").header("cache-control", "max-age=600")).await;
    let new =
        Origin::start(|_| Reply::ok("new origin").header("cache-control", "max-age=600")).await;
    let skua = Skua::start(&[old.addr], "").await;
    assert_eq!(get(&skua.url("/cached"), &[]).await.text(), "old origin");
    assert!(
        skua.reload_and_wait(|text| text.replace(&old.addr.to_string(), &new.addr.to_string()))
            .await
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut n = 0;
    loop {
        n += 1;
        let got = get(&skua.url(&format!("/fresh/{n}")), &[]).await;
        assert_eq!(got.status, 200);
        if got.text() == "new origin" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "misses still go to the old origin"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cached = get(&skua.url("/cached"), &[]).await;
    assert_eq!(
        (cached.cache(), cached.text().as_str()),
        ("hit-front", "old origin")
    );
    // The new pool's health checks run: stopping its origin takes it out of /stats.
    new.stop();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stats = skua.stats().await;
        let origins = stats["origins"].as_array().unwrap().clone();
        assert_eq!(origins.len(), 1);
        assert_eq!(origins[0]["address"], new.addr.to_string());
        if origins[0]["healthy"] == false {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new origin's health is never checked"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Regression: a file that passed validation but failed to build its origin pools (a health
/// check path with a space) had its `ttl_cap` applied and its origins not, and was logged as
/// reloaded; one with a control character in the health check's host killed the reload loop,
/// so every later SIGHUP was ignored.
#[tokio::test]
async fn a_reload_that_fails_late_changes_nothing_and_later_reloads_still_run() {
    let old =
        Origin::start(|_| Reply::ok("old origin").header("cache-control", "max-age=600")).await;
    let new =
        Origin::start(|_| Reply::ok("new origin").header("cache-control", "max-age=600")).await;
    let mut skua = Skua::start(&[old.addr], "").await;
    assert!(stored_ttl(&skua, "/before").await > 500);

    let original = std::fs::read_to_string(skua.config_path()).unwrap();
    let health = "path = \"/_health\"";
    for bad in [
        "path = \"/a b\"",
        "path = \"/_health\"\nhost = \"wiki\\u0001.test\"",
    ] {
        let applied = skua
            .reload_and_wait(|text| {
                text.replace(&old.addr.to_string(), &new.addr.to_string())
                    .replace(
                        "memory_size = 16777216",
                        "memory_size = 16777216\nttl_cap = \"5s\"",
                    )
                    .replace(health, bad)
            })
            .await;
        assert!(!applied, "{bad}: rejected");
        assert!(skua.alive());
        let got = get(&skua.url(&format!("/after/{}", bad.len())), &[]).await;
        assert_eq!(got.text(), "old origin", "{bad}: the origins stay");
        assert!(
            stored_ttl(&skua, &format!("/ttl/{}", bad.len())).await > 500,
            "{bad}: the ttl cap stays"
        );
        std::fs::write(skua.config_path(), &original).unwrap();
    }

    // The reload loop survived: a good file applies.
    let applied = skua
        .reload_and_wait(|text| text.replace(&old.addr.to_string(), &new.addr.to_string()))
        .await;
    assert!(applied);
    assert_eq!(
        get(&skua.url("/after-good"), &[]).await.text(),
        "new origin"
    );
}

/// The purge rules follow a reload on both ports that take purges: a token added by SIGHUP
/// refuses a PURGE and an admin purge without it, and one with it purges.
#[tokio::test]
async fn a_reloaded_purge_token_applies_to_purge_and_to_the_admin_purge() {
    let origin = Origin::start(|_| Reply::ok("page").header("cache-control", "max-age=600")).await;
    let skua = Skua::start(&[origin.addr], "").await;
    let url = skua.url("/wiki/Page");
    let admin = format!(
        "http://{}/purge?url={}",
        skua.admin,
        url.replace(':', "%3A").replace('/', "%2F")
    );
    get(&url, &[]).await;
    assert_eq!(send(&client(), "PURGE", &url, &[]).await.status, 204);
    get(&url, &[]).await;
    assert_eq!(
        send(&client(), "POST", &admin, &[("skua-purge", "1")])
            .await
            .status,
        200
    );

    let applied = skua
        .reload_and_wait(|text| format!("{text}\n[purge]\ntoken = \"s3cret\"\n"))
        .await;
    assert!(applied);
    get(&url, &[]).await;
    assert_eq!(get(&url, &[]).await.cache(), "hit-front");
    assert_eq!(send(&client(), "PURGE", &url, &[]).await.status, 403);
    let admin_refused = send(&client(), "POST", &admin, &[("skua-purge", "1")]).await;
    assert_eq!(admin_refused.status, 403);
    assert_eq!(get(&url, &[]).await.cache(), "hit-front", "nothing purged");
    let bearer = [("authorization", "Bearer s3cret")];
    assert_eq!(send(&client(), "PURGE", &url, &bearer).await.status, 204);
    assert_eq!(get(&url, &[]).await.cache(), "miss");
    assert_eq!(send(&client(), "POST", &admin, &bearer).await.status, 200);
    assert_eq!(get(&url, &[]).await.cache(), "miss");
}

/// A node whose processes each take 300 ms to apply a purge the other relays, so that a purge
/// answered before the other applied it shows.
fn slow_relay() -> String {
    format!("{CAPTURE_LOG}\n{ENV_LINE}SKUA_TEST_RELAY_APPLY_DELAY_MS=300")
}

/// Regression: for five seconds after SIGQUIT pingora's old process accepts connections beside
/// the new one, then drains those it holds; a purge that reached it (on a purge client's
/// kept-alive connection, or a new one) was applied to its own cache alone, and the new
/// process served the pre-edit page it had fetched until its TTL. With a disk tier, the purge
/// must also outlive a `kill -9` of the new process (its disk trusted at restart).
#[tokio::test]
async fn a_purge_taken_by_the_old_process_during_an_upgrade_reaches_the_new_one() {
    for disk in [false, true] {
        purge_during_an_upgrade(disk).await;
    }
}

async fn purge_during_an_upgrade(disk: bool) {
    let version = Arc::new(std::sync::atomic::AtomicU64::new(1));
    let v = version.clone();
    let origin = Origin::start(move |seen| {
        revision(seen, v.load(Ordering::SeqCst)).header("cache-control", "max-age=600")
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let disk_lines = "after_restart = \"serve\"";
    let start = |port: &Port| {
        let port = port.clone();
        let dir = dir.path().to_path_buf();
        let origin = origin.addr;
        async move {
            if disk {
                Skua::start_disk_on(&port, &[origin], &dir, disk_lines, &slow_relay()).await
            } else {
                Skua::start(&[origin], &slow_relay()).await
            }
        }
    };
    let mut old = start(&Port::reserve()).await;
    assert_eq!(get(&old.url("/wiki/A"), &[]).await.text(), "/wiki/A v1");
    if disk {
        old.wait_disk_writes().await;
    }
    // A purge client's connection, open before the upgrade.
    let mut purger = tokio::net::TcpStream::connect(old.addr).await.unwrap();
    let request =
        |method: &str| format!("{method} /wiki/Kept HTTP/1.1\r\nHost: {}\r\n\r\n", old.addr);
    let first = exchange(&mut purger, &request("GET")).await;
    assert!(first.starts_with("HTTP/1.1 200 "), "{first}");

    let mut new = old.hand_over().await;
    // The new process serves the page as it is before the edit (from the origin, or from the
    // disk tier); the old one, from its memory.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = get_fresh(&old.url("/wiki/A")).await;
        assert_eq!(got.text(), "/wiki/A v1");
        if got.cache() != "hit-front" {
            break;
        }
        assert!(Instant::now() < deadline, "the new process never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The page is edited; its purge reaches the old process, on the connection it drains.
    version.store(2, Ordering::SeqCst);
    let purge = format!("PURGE /wiki/A HTTP/1.1\r\nHost: {}\r\n\r\n", old.addr);
    let purged = exchange(&mut purger, &purge).await;
    assert!(purged.starts_with("HTTP/1.1 204 "), "{purged}");
    assert!(old.alive(), "the old process answered the purge");

    // The new process applied it before the old one answered (regression: the relay was not
    // waited for, and for a few milliseconds the new process served the page from before the
    // edit). Both processes accept on the listeners for a while: every answer, from either,
    // is the edited page.
    for _ in 0..20 {
        let got = get_fresh(&old.url("/wiki/A")).await;
        assert_eq!(got.text(), "/wiki/A v2", "disk {disk}: {}", got.cache());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(old.alive(), "still handing over");
    drop(purger);
    let _ = new.kill();
    let _ = new.wait();
    if disk {
        // The purge the new process applied is on its disk: the old copy is not served again.
        version.store(3, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(15);
        while old.alive() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let again = start(&old.port()).await;
        let got = get(&again.url("/wiki/A"), &[]).await;
        assert_ne!(got.text(), "/wiki/A v1", "{}", again.log());
    }
}

/// Regression: for five seconds after SIGQUIT the old process still takes connections beside
/// the new one, and serves the ones it holds; a purge the new one took did not reach it, so a
/// reader whose connection the old process served kept getting the pre-edit page from its
/// memory while the new process served the edit.
#[tokio::test]
async fn a_purge_taken_by_the_new_process_during_an_upgrade_reaches_the_old_one() {
    let version = Arc::new(std::sync::atomic::AtomicU64::new(1));
    let v = version.clone();
    let origin = Origin::start(move |seen| {
        revision(seen, v.load(Ordering::SeqCst)).header("cache-control", "max-age=600")
    })
    .await;
    let mut old = Skua::start(&[origin.addr], &slow_relay()).await;
    let addr = old.addr;
    let request =
        |method: &str, path: &str| format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    // A reader's keep-alive connection, which the old process serves while it hands over.
    let mut reader = tokio::net::TcpStream::connect(addr).await.unwrap();
    let first = exchange(&mut reader, &request("GET", "/wiki/A")).await;
    assert!(first.contains("/wiki/A v1"), "{first}");
    cache_markers(&old, &[]).await;

    let mut new = old.hand_over().await;
    let mut on_new = connection_to_another_process(addr, &addr.to_string()).await;

    // The page is edited; its purge reaches the new process.
    version.store(2, Ordering::SeqCst);
    let purged = exchange(&mut on_new, &request("PURGE", "/wiki/A")).await;
    assert!(
        purged.starts_with("HTTP/1.1 204 ") || purged.starts_with("HTTP/1.1 404 "),
        "{purged}"
    );
    // The old process, still serving the reader, applied it before the new one answered
    // (regression: the relay was not waited for, and the old process served the page from
    // before the edit for a few milliseconds more).
    let got = exchange(&mut reader, &request("GET", "/wiki/A")).await;
    assert!(
        got.contains("/wiki/A v2"),
        "the old process kept the pre-edit page: {got}"
    );
    assert!(old.alive(), "the old process was still handing over");
    let _ = new.kill();
    let _ = new.wait();
}

/// Regression: each process of an upgrade relays the purges it takes to the one before it, at
/// one socket path; a second upgrade within seconds of the first made that path the second
/// old process's, and the first, still serving the connections it held (and accepting for five
/// seconds after its SIGQUIT), got no purge from then on: it served pages from before their
/// edit from its memory (`tests/purge-checker/run.sh fleet` with `UPGRADES=1`). Told that it is
/// cut off, it now asks the origin before it serves anything it holds.
#[tokio::test]
async fn a_process_two_upgrades_back_serves_nothing_purged_after_the_second() {
    let version = Arc::new(std::sync::atomic::AtomicU64::new(1));
    let v = version.clone();
    let origin = Origin::start(move |seen| {
        revision(seen, v.load(Ordering::SeqCst)).header("cache-control", "max-age=600")
    })
    .await;
    let mut first = Skua::start(&[origin.addr], "").await;
    let addr = first.addr;
    let request =
        |method: &str, path: &str| format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    // A reader's keep-alive connection, which the first process serves through both upgrades.
    let mut reader = tokio::net::TcpStream::connect(addr).await.unwrap();
    let first_answer = exchange(&mut reader, &request("GET", "/wiki/A")).await;
    assert!(first_answer.contains("/wiki/A v1"), "{first_answer}");
    cache_markers(&first, &[]).await;

    let second = first.hand_over().await;
    let mut on_second = connection_to_another_process(addr, &addr.to_string()).await;
    // It serves, so it has its signal handlers: SIGQUIT before them would end it.
    let third = first.upgrade_from(second.id()).await;
    // It takes SIGQUIT in a moment; from then on it relays to the third process alone.
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The page is edited; its purge reaches the second process, and from it the third.
    version.store(2, Ordering::SeqCst);
    let purged = exchange(&mut on_second, &request("PURGE", "/wiki/A")).await;
    assert!(
        purged.starts_with("HTTP/1.1 204 ") || purged.starts_with("HTTP/1.1 404 "),
        "{purged}"
    );
    let got = exchange(&mut reader, &request("GET", "/wiki/A")).await;
    assert!(
        got.contains("/wiki/A v2"),
        "the first process kept the pre-edit page: {got}"
    );
    assert!(first.alive(), "the first process was still handing over");
    drop((second, third));
}

/// Regression: Skua remembers each purge for as long as anything it stores may stay fresh, the
/// TTL cap, to refuse a fill the purge overtook (the old page, fetched before the edit, arriving
/// after its purge). The cap a reload raised applied to what was stored, but purges were still
/// forgotten after the cap Skua started with: a fill arriving later than that after its purge
/// stored the old page, fresh for the new cap.
#[tokio::test]
async fn a_fill_a_purge_overtook_is_not_stored_after_a_reload_raised_the_ttl_cap() {
    let revision = Arc::new(std::sync::atomic::AtomicUsize::new(1));
    let current = revision.clone();
    let origin = Origin::start(move |_| {
        let v = current.load(Ordering::SeqCst);
        Reply::ok(format!("revision {v}"))
            .header("cache-control", "max-age=3600")
            .delay(Duration::from_millis(2500))
    })
    .await;
    let skua = Skua::start_with(&[origin.addr], "ttl_cap = \"1s\"", "").await;
    assert!(
        skua.reload_and_wait(|text| text.replace("ttl_cap = \"1s\"", "ttl_cap = \"1h\""))
            .await
    );
    let url = skua.url("/wiki/Page");
    let old = get_in_flight(&url, &[]);
    wait_until("the fill reached the origin", || {
        origin.count("/wiki/Page") == 1
    })
    .await;
    revision.store(2, Ordering::SeqCst);
    assert_eq!(send(&client(), "PURGE", &url, &[]).await.status, 404);
    assert_eq!(old.await.unwrap().text(), "revision 1");
    let next = get(&url, &[]).await;
    assert_eq!(next.text(), "revision 2", "{}", next.cache());
}
