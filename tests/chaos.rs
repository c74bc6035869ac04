//! Chaos under load, bounded in time: clients read a page set through a three-node fleet with
//! disk tiers, over a two-origin pool, while origins are killed and restarted, backend nodes
//! are killed with -9 in the middle of fills and restarted, nats-server is stopped and
//! started, and pages are edited and purged at node A. Every response is checked: its body is
//! exactly some version the origins served for that URL, or the request failed cleanly; a
//! node never answers 5xx for a page it had served from its cache since its last restart,
//! once the page's last purge had reached it; and once everything is back, every node serves
//! the latest version of every edited page (no purge lost).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::*;

const PAGES: usize = 60;
const HOST: (&str, &str) = ("host", "wiki.test");

fn body(path: &str, version: u64) -> String {
    format!("{path} v{version};").repeat(200)
}

#[derive(Default, Debug)]
struct Tally {
    requests: u64,
    ok: u64,
    /// Clean failures at a node that was down (killed, not yet listening again).
    failed_node_down: u64,
    /// Clean failures at a node that was up: no connection, a 502/503/504, or a body cut off
    /// (its origin killed mid-response).
    failed_node_up: u64,
    /// Answers no client should get: any status but 200 and 5xx (a 4xx for a page that
    /// exists), or a 5xx that is not a gateway error.
    unclean: u64,
    wrong_bodies: u64,
    cached_5xx: u64,
}

/// How long a purge may take to reach every node with the bus up (and connected), and how
/// long a restarted node takes to catch up on the bus.
const PURGE_TRAVEL: Duration = Duration::from_secs(2);
const CATCH_UP: Duration = Duration::from_secs(3);

/// The pages each node has served from its cache while no purge of them could still be on its
/// way to it, since it last restarted: a 5xx for one of them is a failure to serve a servable
/// copy. A hit seen while a purge travels proves nothing: the purge arrives after it and
/// removes the copy, as it should.
struct Served {
    pages: [HashSet<String>; 3],
    /// Hits that made a page count as servable: the 5xx check means something only if many.
    recorded: u64,
    /// Bumped when a node is killed and when a page is edited: a hit whose request began
    /// before either says nothing about the copy there now.
    node_epoch: [u64; 3],
    page_epoch: HashMap<String, u64>,
    /// Until when a purge may still be on its way: to every node after a page's purge, for
    /// every page while the bus is away and a while after, to a node after its restart.
    page_settles: HashMap<String, Instant>,
    bus_settles: Instant,
    node_settles: [Instant; 3],
}

impl Served {
    fn new() -> Served {
        let now = Instant::now();
        Served {
            pages: Default::default(),
            recorded: 0,
            node_epoch: [0; 3],
            page_epoch: HashMap::new(),
            page_settles: HashMap::new(),
            bus_settles: now,
            node_settles: [now; 3],
        }
    }

    fn ticket(&self, node: usize, page: &str) -> (u64, u64) {
        let page_epoch = self.page_epoch.get(page).copied().unwrap_or(0);
        (self.node_epoch[node], page_epoch)
    }

    fn hit(&mut self, node: usize, page: &str, ticket: (u64, u64)) {
        let now = Instant::now();
        let settled = now >= self.bus_settles
            && now >= self.node_settles[node]
            && self.page_settles.get(page).is_none_or(|at| now >= *at);
        if settled && ticket == self.ticket(node, page) {
            self.pages[node].insert(page.to_string());
            self.recorded += 1;
        }
    }

    fn edited(&mut self, page: &str) {
        *self.page_epoch.entry(page.to_string()).or_insert(0) += 1;
        self.page_settles
            .insert(page.to_string(), Instant::now() + PURGE_TRAVEL);
        for pages in &mut self.pages {
            pages.remove(page);
        }
    }

    fn node_killed(&mut self, node: usize) {
        self.node_epoch[node] += 1;
        self.pages[node].clear();
        self.node_settles[node] = Instant::now() + Duration::from_secs(3600);
    }

    fn node_started(&mut self, node: usize) {
        self.node_settles[node] = Instant::now() + CATCH_UP;
    }

    fn bus_away(&mut self) {
        self.bus_settles = Instant::now() + Duration::from_secs(3600);
    }

    /// The purges queued while the bus was away have been published and every node is
    /// connected again: they reach every node within the travel time.
    fn bus_drained(&mut self) {
        self.bus_settles = Instant::now() + PURGE_TRAVEL;
    }
}

async fn versioned(versions: Arc<Mutex<HashMap<String, u64>>>) -> Origin {
    Origin::start(move |seen| {
        let v = *versions.lock().unwrap().get(&seen.path).unwrap_or(&0);
        // Fills take a while, so a node killed with -9 is killed in the middle of some.
        Reply::ok(body(&seen.path, v))
            .header("cache-control", "max-age=600")
            .header("etag", format!("\"v{v}\""))
            .delay(Duration::from_millis(40))
    })
    .await
}

/// Node A (which takes every purge) has nothing left to publish and every node is connected
/// to the bus.
async fn bus_drained(nodes: &[Option<Skua>]) -> bool {
    for node in nodes.iter().flatten() {
        if node.metric("skua_purge_bus_connected").await != 1.0 {
            return false;
        }
    }
    match &nodes[0] {
        Some(a) => a.metric("skua_purge_bus_unpublished").await == 0.0,
        None => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_under_load_serves_no_wrong_body_and_loses_no_purge() {
    let versions: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let origins = [
        versioned(versions.clone()).await,
        versioned(versions.clone()).await,
    ];
    let addrs = [origins[0].addr, origins[1].addr];
    let mut nats = Nats::start().await;
    let disks: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let ports: Vec<Port> = (0..3).map(|_| Port::reserve()).collect();
    let names = ["a", "b", "c"];
    let buses: Vec<String> = (0..3)
        .map(|i| nats.bus(names[i], "catch_up_timeout = \"1s\""))
        .collect();
    let bus = |i: usize| buses[i].clone();
    let mut nodes = Vec::new();
    for i in 0..3 {
        let node = Skua::start_disk_on(&ports[i], &addrs, disks[i].path(), "", &bus(i)).await;
        node.wait_ready().await;
        nodes.push(Some(node));
    }

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let served = Arc::new(Mutex::new(Served::new()));
    let seq = Arc::new(AtomicU64::new(0));
    // Whether each node is down: from just before it is killed until it listens again.
    let down: Arc<[AtomicBool; 3]> = Arc::new(Default::default());
    // The clients' failures and the driver's events share this clock, so a failure can be
    // placed among the kills, outages and purges around it.
    let start = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (stop, tally, served, versions, seq, down) = (
            stop.clone(),
            tally.clone(),
            served.clone(),
            versions.clone(),
            seq.clone(),
            down.clone(),
        );
        let ports = ports.clone();
        clients.push(tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap();
            while !stop.load(Ordering::Relaxed) {
                let n = seq.fetch_add(1, Ordering::Relaxed) as usize;
                let (node, page) = (n % 3, (n / 3) % PAGES);
                let path = format!("/wiki/Page_{page}");
                let url = format!("http://127.0.0.1:{}{path}", ports[node].number);
                let was_down = down[node].load(Ordering::SeqCst);
                let ticket = served.lock().unwrap().ticket(node, &path);
                let result = http.get(&url).header(HOST.0, HOST.1).send().await;
                let node_down = was_down || down[node].load(Ordering::SeqCst);
                let failed = |t: &mut Tally| {
                    if node_down {
                        t.failed_node_down += 1;
                    } else {
                        t.failed_node_up += 1;
                    }
                };
                tally.lock().unwrap().requests += 1;
                let Ok(resp) = result else {
                    failed(&mut tally.lock().unwrap());
                    continue;
                };
                let status = resp.status().as_u16();
                let hit = resp
                    .headers()
                    .get("x-cache-status")
                    .is_some_and(|v| v.as_bytes().starts_with(b"hit"));
                let text = resp.text().await;
                let mut t = tally.lock().unwrap();
                match (status, text) {
                    (200, Ok(text)) => {
                        let newest = *versions.lock().unwrap().get(&path).unwrap_or(&0);
                        if (0..=newest).any(|v| text == body(&path, v)) {
                            t.ok += 1;
                            if hit {
                                served.lock().unwrap().hit(node, &path, ticket);
                            }
                        } else {
                            t.wrong_bodies += 1;
                            eprintln!("wrong body for {path} at node {node}: {} bytes", text.len());
                        }
                    }
                    (500..=599, _) if served.lock().unwrap().pages[node].contains(&path) => {
                        t.cached_5xx += 1;
                        eprintln!(
                            "{:>6} ms: {status} at node {node} for cached {path}",
                            start.elapsed().as_millis()
                        );
                    }
                    // A cut body, a miss whose origin died mid-response: failed cleanly.
                    (200 | 502 | 503 | 504, _) => failed(&mut t),
                    (other, _) => {
                        t.unclean += 1;
                        eprintln!("{other} at node {node} for {path}");
                    }
                }
            }
        }));
    }

    let (mut origin_kills, mut node_kills, mut bus_outages, mut purges) = (0, 0, 0, 0);
    // From each kill -9 until the node listens again.
    let mut node_downtime = Duration::ZERO;
    let mut edited = HashSet::new();
    let mut origin_down = None;
    let mut bus_down = false;
    // After the bus is back, until node A has published what it queued meanwhile and every
    // node is connected: no fixed time bounds that (a publish cut off by the outage is retried
    // after its acknowledgement's timeout, 5 s), so the fleet's own gauges say when.
    let mut draining = false;
    // What happened when, for the message of a failure.
    let mut events: Vec<String> = Vec::new();
    let mut step = 0u64;
    while start.elapsed() < Duration::from_secs(30) {
        step += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
        // Asked before this step's purge, which node A has yet to publish when its PURGE is
        // answered. (The test failed on too few counted hits, 0 of 89,945 requests in 1 run
        // of 3: node A's queue emptied only 4-5 s after each outage, the next outage came
        // first, and hits never counted again. That was the bus waiting out acknowledgements
        // lost with the connection: `fleet::purges_made_through_a_bus_outage_reach_the_
        // others_soon_after_it_returns`.)
        if draining && bus_drained(&nodes).await {
            draining = false;
            served.lock().unwrap().bus_drained();
            events.push(format!(
                "{:>6} ms: purges queued while nats was away are published",
                start.elapsed().as_millis()
            ));
        }
        // An edit and its purge at node A, which is never killed.
        let page = format!("/wiki/Page_{}", (step * 7) % PAGES as u64);
        *versions.lock().unwrap().entry(page.clone()).or_insert(0) += 1;
        served.lock().unwrap().edited(&page);
        let purge = send(
            &client(),
            "PURGE",
            &format!("http://127.0.0.1:{}{page}", ports[0].number),
            &[HOST],
        )
        .await;
        assert!(matches!(purge.status, 204 | 404), "{}", purge.status);
        let newest = versions.lock().unwrap()[&page];
        events.push(format!(
            "{:>6} ms: {page} v{newest} purged at a ({})",
            start.elapsed().as_millis(),
            purge.status
        ));
        purges += 1;
        edited.insert(page);
        match step % 12 {
            // One origin down for a second and a half; the other takes every miss.
            2 => {
                let i = (step / 12 % 2) as usize;
                origins[i].stop();
                origin_down = Some(i);
                events.push(format!(
                    "{:>6} ms: origin {i} stopped",
                    start.elapsed().as_millis()
                ));
                origin_kills += 1;
            }
            8 => {
                if let Some(i) = origin_down.take() {
                    origins[i].restart().await;
                    events.push(format!(
                        "{:>6} ms: origin {i} restarted",
                        start.elapsed().as_millis()
                    ));
                }
            }
            // kill -9 of node B or C in the middle of whatever it is filling.
            4 => {
                let i = 1 + (step / 12 % 2) as usize;
                let killed_at = Instant::now();
                down[i].store(true, Ordering::SeqCst);
                served.lock().unwrap().node_killed(i);
                if let Some(mut node) = nodes[i].take() {
                    node.kill9();
                }
                node_kills += 1;
                events.push(format!(
                    "{:>6} ms: node {} killed",
                    start.elapsed().as_millis(),
                    names[i]
                ));
                let node =
                    Skua::start_disk_on(&ports[i], &addrs, disks[i].path(), "", &bus(i)).await;
                nodes[i] = Some(node);
                served.lock().unwrap().node_started(i);
                down[i].store(false, Ordering::SeqCst);
                node_downtime += killed_at.elapsed();
                events.push(format!(
                    "{:>6} ms: node {} restarted",
                    start.elapsed().as_millis(),
                    names[i]
                ));
            }
            // The bus away for two seconds, purges keep coming.
            6 if step % 24 == 6 => {
                served.lock().unwrap().bus_away();
                nats.stop();
                bus_down = true;
                events.push(format!(
                    "{:>6} ms: nats stopped",
                    start.elapsed().as_millis()
                ));
                bus_outages += 1;
            }
            10 if step % 24 == 10 => {
                nats.restart().await;
                bus_down = false;
                draining = true;
                events.push(format!(
                    "{:>6} ms: nats restarted",
                    start.elapsed().as_millis()
                ));
            }
            _ => {}
        }
    }
    if bus_down {
        nats.restart().await;
    }
    if let Some(i) = origin_down.take() {
        origins[i].restart().await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }

    // Every purge reached every node: each serves the newest version of every edited page.
    let mut lost = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    for (i, node) in nodes.iter().enumerate() {
        let node = node.as_ref().unwrap();
        node.wait_ready().await;
        for page in &edited {
            let newest = *versions.lock().unwrap().get(page).unwrap();
            loop {
                let got = get(&node.url(page), &[HOST]).await;
                if got.status == 200 && got.text() == body(page, newest) {
                    break;
                }
                if Instant::now() > deadline {
                    lost.push(format!(
                        "node {} serves {page} as {} {} ({}, {}) where v{newest} is the newest",
                        names[i],
                        got.status,
                        got.text().split(';').next().unwrap_or(""),
                        got.header("x-cache-status"),
                        got.header("cache-status"),
                    ));
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let t = tally.lock().unwrap();
    let recorded = served.lock().unwrap().recorded;
    eprintln!(
        "chaos summary: {} requests: {} ok, failed cleanly {} at a node that was down and {} \
         at one that was up; {origin_kills} origin kills, {node_kills} node kills (-9), \
         {bus_outages} bus outages, {purges} purges; unclean answers {}, wrong bodies {}, \
         5xx on cached pages {} (of {} hits that made a page servable), purges lost {}",
        t.requests,
        t.ok,
        t.failed_node_down,
        t.failed_node_up,
        t.unclean,
        t.wrong_bodies,
        t.cached_5xx,
        recorded,
        lost.len()
    );
    assert!(t.ok > 1000, "too little load to mean anything: {t:?}");
    assert!(
        recorded > 1000,
        "too few hits made a page servable for the 5xx check to mean anything: {recorded}"
    );
    assert_eq!(
        t.ok + t.failed_node_down + t.failed_node_up + t.unclean + t.wrong_bodies + t.cached_5xx,
        t.requests,
        "every request accounted for: {t:?}"
    );
    assert_eq!(t.unclean, 0, "{t:?}");
    assert_eq!(t.wrong_bodies, 0, "{t:?}");
    assert_eq!(t.cached_5xx, 0, "{t:?}\n{}", events.join("\n"));
    // One origin of two is down at a time, so a node that is up fails a request only when an
    // origin dies mid-response: at most one per client per origin kill.
    assert!(
        t.failed_node_up <= 4 * origin_kills,
        "too many failures at nodes that were up: {t:?}"
    );
    // A killed node refuses connections until it listens again: about a second here. Bounded
    // by the time itself, not by the requests refused meanwhile, which grow with however
    // fast the clients go (regression: a busy CI machine took 1.3 s a restart and the
    // refusals passed a bound set on their count).
    let per_restart = node_downtime / node_kills.max(1);
    assert!(
        per_restart <= Duration::from_secs(3),
        "nodes took too long to come back: {per_restart:?} a restart, {t:?}"
    );
    assert!(
        lost.is_empty(),
        "purges lost:\n{}\nwhat happened:\n{}",
        lost.join("\n"),
        events.join("\n")
    );
}
