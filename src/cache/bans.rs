//! Time-stamped invalidations that are checked when an object is used rather than applied to
//! every object when they arrive:
//!
//! - **purge times** per URL: a fill whose origin request started before the URL was last
//!   purged is not stored, which closes the race MediaWiki covers with a delayed second
//!   ("rebound") purge: a purge arriving while a fill of the old page is in flight;
//! - **bans** of a host or a URL prefix: recorded in O(1), and any object under them fetched
//!   before the ban is treated as a miss on its next use. A ban lives as long as any object
//!   stored before it may be served without the origin's word: the TTL cap, or longer where
//!   objects were stored with a stale-while-revalidate / stale-if-error window past it (a
//!   span the bans file keeps across restarts). A hit checks its host's bans
//!   with one hash lookup per distinct prefix length there, whatever the number of bans, and
//!   the bans file grows by one appended line per ban;
//! - **trust in old objects**: a node on a purge bus does not trust objects it cached before it
//!   started until it has applied the purges it missed while down (requests for them wait, or
//!   revalidate); and when the bus no longer holds all it missed, objects cached before then
//!   are revalidated before they are served again.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::RwLock;
use std::time::{Duration, SystemTime};

use pingora::cache::key::HashBinary;

use super::key::CacheUrl;
use super::purge_times::{Lifetime, PurgeTimes};
use crate::config::CatchUpPolicy;

#[derive(Debug, Clone)]
struct Ban {
    host: String,
    path_prefix: String,
    at: SystemTime,
}

/// Purge times remembered per kind (URL purges, deletes, tag purges): past it the oldest go
/// first (`purge_times`; regression test `the_newest_purges_are_remembered_when_the_table_is_full`).
const PURGE_RECORDS: usize = 1 << 20;

/// How often expired bans are swept out of memory.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// Live bans, by host, then by prefix: a ban of a prefix already banned only moves its time.
#[derive(Default)]
struct BanIndex {
    hosts: HashMap<String, HostBans>,
    /// Distinct (host, prefix) pairs.
    count: usize,
    /// Lines in the bans file, live or not: past twice the live bans it is rewritten.
    file_lines: usize,
    /// A ban could not be written (a full file system): the file lacks it, and the next save
    /// rewrites the file whole.
    unsaved: bool,
    last_sweep: Option<SystemTime>,
}

#[derive(Default)]
struct HostBans {
    /// The latest ban of each prefix: an object fetched before it is banned.
    latest: HashMap<String, SystemTime>,
    /// How many prefixes of each length: a path is checked at these lengths only.
    lengths: BTreeMap<usize, usize>,
}

impl BanIndex {
    fn insert(&mut self, ban: Ban) {
        let host = self.hosts.entry(ban.host).or_default();
        let len = ban.path_prefix.len();
        match host.latest.entry(ban.path_prefix) {
            std::collections::hash_map::Entry::Occupied(mut e) => {
                if *e.get() < ban.at {
                    e.insert(ban.at);
                }
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(ban.at);
                *host.lengths.entry(len).or_default() += 1;
                self.count += 1;
            }
        }
    }

    fn banned(&self, url: &CacheUrl, created: SystemTime) -> bool {
        let Some(host) = self.hosts.get(&url.host) else {
            return false;
        };
        let path = url.path_and_query.as_str();
        host.lengths.range(..=path.len()).any(|(len, _)| {
            path.get(..*len)
                .and_then(|prefix| host.latest.get(prefix))
                .is_some_and(|at| *at >= created)
        })
    }

    /// Drops bans older than `lifetime`, at most once per [`SWEEP_INTERVAL`].
    fn sweep(&mut self, now: SystemTime, lifetime: Duration) {
        if self
            .last_sweep
            .is_some_and(|t| now.duration_since(t).unwrap_or_default() < SWEEP_INTERVAL)
        {
            return;
        }
        self.last_sweep = Some(now);
        let current = |at: &SystemTime| now.duration_since(*at).map_or(true, |age| age < lifetime);
        self.hosts.retain(|_, host| {
            host.latest.retain(|_, at| current(at));
            host.lengths.clear();
            for prefix in host.latest.keys() {
                *host.lengths.entry(prefix.len()).or_default() += 1;
            }
            !host.latest.is_empty()
        });
        self.count = self.hosts.values().map(|h| h.latest.len()).sum();
    }

    fn all(&self) -> impl Iterator<Item = Ban> + '_ {
        self.hosts.iter().flat_map(|(host, bans)| {
            bans.latest.iter().map(|(prefix, at)| Ban {
                host: host.clone(),
                path_prefix: prefix.clone(),
                at: *at,
            })
        })
    }
}

pub struct Invalidations {
    /// Where bans are kept across restarts (the disk tier's directory), if anywhere: objects on
    /// disk outlive the process, so the bans that cover them must too.
    file: Option<PathBuf>,
    /// When each URL was last purged, softly or for good.
    purged: PurgeTimes<HashBinary>,
    /// When each URL was last purged for good (not soft): a stored copy from before then is
    /// never served, even one the purge could not see (the disk index still loading).
    deleted: PurgeTimes<HashBinary>,
    /// When each surrogate key was last purged: a fill carrying it that started before then
    /// is not stored (the tag index cannot name a fill that has not finished).
    tags_purged: PurgeTimes<String>,
    bans: RwLock<BanIndex>,
    /// Live bans, readable without the lock: the hit path checks it first.
    ban_count: AtomicUsize,
    /// How long bans last: the longest any object stored meanwhile may be served without
    /// the origin's word (fresh, or stale within its windows).
    lifetime: Lifetime,
    /// The longest such span an object has asked for ([`Self::cover`]) and the bans file
    /// records (zero: none yet): objects on disk keep it across a restart.
    covered: Lifetime,
    /// Unix nanoseconds; objects created before it are revalidated before use (0: none).
    stale_before: AtomicU64,
    /// When this process started: objects created before it may have missed purges.
    started: SystemTime,
    /// Whether objects from before `started` are trusted yet (true without a purge bus).
    caught_up: AtomicBool,
    caught_up_tx: tokio::sync::watch::Sender<bool>,
    /// What to do with an untrusted object before catching up; set once by the purge bus.
    catch_up: std::sync::OnceLock<(CatchUpPolicy, Duration)>,
    /// A zero-downtime upgrade has handed the cache directory to a new process, which writes
    /// the bans file from now on (the bans taken here are relayed to it).
    handed_over: AtomicBool,
}

/// Whether a stored object may be served as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust {
    Yes,
    /// Only after the origin confirms it (a conditional request).
    Revalidate,
    /// Only after the purge bus has caught up: wait at most this long.
    WaitForCatchUp(Duration),
}

impl Invalidations {
    /// `lifetime`: the TTL cap; nothing stored is fresh for longer, so older purge records can
    /// go (bans last longer where what they cover may be served stale: [`Self::cover`]).
    pub fn new(lifetime: Duration, file: Option<PathBuf>) -> Invalidations {
        Invalidations::with_records(lifetime, file, PURGE_RECORDS)
    }

    fn with_records(lifetime: Duration, file: Option<PathBuf>, records: usize) -> Invalidations {
        let (bans, covered) = file
            .as_deref()
            .map(|f| load(f, lifetime))
            .unwrap_or_default();
        Invalidations {
            ban_count: AtomicUsize::new(bans.count),
            bans: RwLock::new(bans),
            file,
            purged: PurgeTimes::new(records, lifetime),
            deleted: PurgeTimes::new(records, lifetime),
            tags_purged: PurgeTimes::new(records, lifetime),
            lifetime: Lifetime::new(lifetime.max(covered)),
            covered: Lifetime::new(covered),
            stale_before: AtomicU64::new(0),
            started: SystemTime::now(),
            caught_up: AtomicBool::new(true),
            caught_up_tx: tokio::sync::watch::channel(true).0,
            catch_up: std::sync::OnceLock::new(),
            handed_over: AtomicBool::new(false),
        }
    }

    /// Leaves the bans file to the process taking over from this one: a rewrite here could
    /// drop the lines it appends.
    pub fn hand_over(&self) {
        self.handed_over.store(true, Ordering::Release);
    }

    /// Whether [`Self::hand_over`] was called.
    pub fn handed_over(&self) -> bool {
        self.handed_over.load(Ordering::Acquire)
    }

    /// Distrusts objects cached before this process started until [`Self::caught_up`] is
    /// called: the purge bus may hold purges for them that this node missed while down.
    pub fn hold_until_caught_up(&self, policy: CatchUpPolicy, timeout: Duration) {
        if self.catch_up.set((policy, timeout)).is_ok() {
            self.caught_up.store(false, Ordering::Release);
            self.caught_up_tx.send_replace(false);
        }
    }

    /// The purge bus has applied everything published before it (re)connected.
    pub fn caught_up(&self) {
        self.caught_up.store(true, Ordering::Release);
        self.caught_up_tx.send_replace(true);
    }

    pub fn is_caught_up(&self) -> bool {
        self.caught_up.load(Ordering::Acquire)
    }

    /// Waits until caught up, at most `timeout`; returns whether it is.
    pub async fn wait_caught_up(&self, timeout: Duration) -> bool {
        let mut rx = self.caught_up_tx.subscribe();
        let waited = tokio::time::timeout(timeout, rx.wait_for(|done| *done)).await;
        waited.is_ok_and(|r| r.is_ok())
    }

    /// No purge can reach this process any more (a later upgrade's process took the socket
    /// its purges were relayed to): every object, whenever stored, is revalidated before it is
    /// served, for as long as the process runs.
    pub fn revalidate_everything(&self) {
        self.stale_before.store(u64::MAX, Ordering::Release);
    }

    /// Every object created before `at` is revalidated before it is served again.
    pub fn revalidate_all_before(&self, at: SystemTime) {
        self.stale_before
            .fetch_max(unix_nanos(at), Ordering::AcqRel);
    }

    /// Whether an object this node last had the origin's word on at `heard` (its fetch, or
    /// its last 304, by this node's clock: not less the `Age` it came with, which dates the
    /// copy at an upstream cache, not here) may be served without asking the origin again.
    pub fn trust(&self, heard: SystemTime) -> Trust {
        let stale_before = self.stale_before.load(Ordering::Acquire);
        if stale_before != 0 && unix_nanos(heard) < stale_before {
            return Trust::Revalidate;
        }
        if !self.caught_up.load(Ordering::Acquire) && heard < self.started {
            return match self.catch_up.get() {
                Some((CatchUpPolicy::Wait, timeout)) => Trust::WaitForCatchUp(*timeout),
                _ => Trust::Revalidate,
            };
        }
        Trust::Yes
    }

    pub fn record_purge(&self, primary: HashBinary, at: SystemTime) {
        self.purged.record(primary, at);
    }

    /// Whether a fill whose origin request started at `fetched` was overtaken by a purge.
    pub fn purged_since(&self, primary: &HashBinary, fetched: SystemTime) -> bool {
        self.purged.get(primary).is_some_and(|at| at >= fetched)
    }

    /// When `primary` was last purged here (softly or for good), while that is remembered.
    pub fn purged_at(&self, primary: &HashBinary) -> Option<SystemTime> {
        let soft = self.purged.get(primary);
        let hard = self.deleted.get(primary);
        soft.into_iter().chain(hard).max()
    }

    pub fn record_delete(&self, primary: HashBinary, at: SystemTime) {
        self.deleted.record(primary, at);
    }

    /// Whether a stored copy of `primary` created at `created` was purged for good since.
    pub fn deleted_since(&self, primary: &HashBinary, created: SystemTime) -> bool {
        self.deleted.get(primary).is_some_and(|at| at >= created)
    }

    pub fn record_tag_purge(&self, tag: &str, at: SystemTime) {
        self.tags_purged.record(tag.to_string(), at);
    }

    /// Whether a fill carrying `tags` whose origin request started at `fetched` was overtaken
    /// by a purge of one of them.
    pub fn tags_purged_since(&self, tags: &[String], fetched: SystemTime) -> bool {
        tags.iter()
            .any(|t| self.tags_purged.get(t).is_some_and(|at| at >= fetched))
    }

    /// Keeps bans and purge records for at least `ttl_cap` (a reload raised the TTL cap: what
    /// is stored from now on may stay fresh that long, and so must what invalidates it).
    pub fn keep_for_at_least(&self, ttl_cap: Duration) {
        self.lifetime.at_least(ttl_cap);
        for times in [&self.purged, &self.deleted] {
            times.keep_for_at_least(ttl_cap);
        }
        self.tags_purged.keep_for_at_least(ttl_cap);
    }

    /// Keeps bans at least `usable_for` from now: an object just stored (or refreshed by a
    /// 304) may be served that long without the origin's word, fresh or stale within its
    /// stale-while-revalidate / stale-if-error window, which may reach past the TTL cap
    /// (regression: a ban forgotten after the TTL cap, at a restart, let a purge bus node
    /// serve the banned page again under the origin's `stale-if-error=3600`). A span longer
    /// than any before is written to the bans file, for the objects on disk; it grows by an
    /// eighth at a time, so that the file takes a line per step, not per object.
    pub fn cover(&self, usable_for: Duration) {
        if usable_for <= self.covered.get() {
            return;
        }
        let span = usable_for.saturating_add(usable_for / 8);
        self.lifetime.at_least(span);
        let Some(file) = &self.file else {
            self.covered.at_least(span);
            return;
        };
        let Ok(mut bans) = self.bans.write() else {
            return;
        };
        if usable_for <= self.covered.get() {
            return;
        }
        self.covered.at_least(span);
        if self.handed_over.load(Ordering::Acquire) || bans.unsaved {
            // The next ban rewrites the whole file, the span with it.
            return;
        }
        match super::files::append(file, lifetime_line(self.covered.get()).as_bytes()) {
            Ok(()) => bans.file_lines += 1,
            Err(e) => {
                self.refused(&mut bans, &e);
            }
        }
    }

    /// The bans file's text: the span covered, then `bans`.
    fn file_text(&self, bans: impl Iterator<Item = Ban>) -> String {
        let covered = self.covered.get();
        let span = (!covered.is_zero()).then(|| lifetime_line(covered));
        span.into_iter().chain(bans.map(|b| line(&b))).collect()
    }

    /// Bans everything under `host` + `path_prefix` fetched before now. False if the bans
    /// file lacks it (or an earlier ban): a restart would not know it.
    pub fn ban(&self, host: &str, path_prefix: &str) -> bool {
        let ban = Ban {
            host: host.to_string(),
            path_prefix: path_prefix.to_string(),
            at: SystemTime::now(),
        };
        let Ok(mut bans) = self.bans.write() else {
            return false;
        };
        bans.sweep(ban.at, self.lifetime.get());
        let saved = match &self.file {
            Some(_) if self.handed_over.load(Ordering::Acquire) => true,
            Some(file) => self.save(file, &mut bans, &ban),
            None => true,
        };
        bans.insert(ban);
        self.ban_count.store(bans.count, Ordering::Release);
        saved
    }

    /// Writes the bans file again if a ban is missing from it. True once none is.
    pub fn save_missing_bans(&self) -> bool {
        let (Some(file), Ok(mut bans)) = (&self.file, self.bans.write()) else {
            return true;
        };
        if !bans.unsaved {
            return true;
        }
        let text = self.file_text(bans.all());
        self.rewrite(file, &mut bans, &text)
    }

    /// Saves `ban`; false (logged) if the file system refused it.
    fn save(&self, file: &Path, bans: &mut BanIndex, ban: &Ban) -> bool {
        // A file that lacks a ban, or holds more than twice as many lines as there are live
        // bans, is rewritten with the live bans and `ban`, so that it stays within a constant
        // factor of what it describes; else a ban costs one small appended line.
        if bans.unsaved || bans.file_lines > 2 * bans.count + 1024 {
            let text = self.file_text(bans.all().chain([ban.clone()]));
            return self.rewrite(file, bans, &text);
        }
        match super::files::append(file, line(ban).as_bytes()) {
            Ok(()) => {
                bans.file_lines += 1;
                true
            }
            Err(e) => self.refused(bans, &e),
        }
    }

    fn rewrite(&self, file: &Path, bans: &mut BanIndex, text: &str) -> bool {
        let temp = file.with_extension(format!("tmp.{}", std::process::id()));
        match super::files::replace(file, &temp, text.as_bytes()) {
            Ok(()) => {
                bans.file_lines = text.lines().count();
                bans.unsaved = false;
                true
            }
            Err(e) => self.refused(bans, &e),
        }
    }

    fn refused(&self, bans: &mut BanIndex, e: &std::io::Error) -> bool {
        tracing::warn!(error = %e, "could not save bans");
        bans.unsaved = true;
        false
    }

    /// Bans everything under `url`'s host and path (its query ignored). False as
    /// [`Self::ban`].
    pub fn ban_url(&self, url: &CacheUrl) -> bool {
        self.ban(&url.host, ban_path(url))
    }

    pub fn has_bans(&self) -> bool {
        self.ban_count.load(Ordering::Acquire) > 0
    }

    /// Whether a response about to be stored for `url`, dated `created` (when its request was
    /// sent, less its `Age`), is covered by a ban already made. One another cache sent (with
    /// `Age`) is taken as up to a second older, as for purges
    /// ([`super::policy::allowing_for_whole_seconds`]): a backend's copy from just before a
    /// ban, sent with `Age: 0` by a backend that had not applied the ban yet, is not stored
    /// past it (regression: a frontend that had applied a prefix purge stored that copy and
    /// served the old page until it expired).
    pub fn banned_before_storing(
        &self,
        url: &CacheUrl,
        created: SystemTime,
        headers: &http::HeaderMap,
    ) -> bool {
        self.has_bans()
            && self.banned(
                url,
                super::policy::allowing_for_whole_seconds(created, headers),
            )
    }

    /// Whether an object for `url` stored at `created` is under a later ban.
    pub fn banned(&self, url: &CacheUrl, created: SystemTime) -> bool {
        if !self.has_bans() {
            return false;
        }
        match self.bans.read() {
            Ok(bans) => bans.banned(url, created),
            Err(_) => false,
        }
    }
}

/// The path prefix a ban of `url` covers: its path without the query.
pub fn ban_path(url: &CacheUrl) -> &str {
    url.path_and_query.split('?').next().unwrap_or("/")
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// How far in the future a saved ban may be dated and still be believed: clocks between a
/// restart and the next may disagree a little, not by years (regression: a ban dated in the
/// year 2540 made every page of its host a miss for good).
const MAX_CLOCK_SKEW: Duration = Duration::from_secs(300);

/// One ban as a line of the bans file: `<nanos> <host> <prefix> <crc32>`, host and prefix
/// percent-escaped so that neither can hold a space or a line break, and a checksum of the
/// rest so that a line damaged or planted by hand is dropped when read.
fn line(b: &Ban) -> String {
    let nanos =
        b.at.duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
    let fields = format!("{nanos} {} {}", escape(&b.host), escape(&b.path_prefix));
    format!("{fields} {:08x}\n", crc32fast::hash(fields.as_bytes()))
}

/// The span covered as a line of the bans file: `lifetime <milliseconds> <crc32>`. A host
/// cannot be `lifetime` and take a ban's place: a ban line has four fields, this one three.
fn lifetime_line(span: Duration) -> String {
    let fields = format!("lifetime {}", span.as_millis());
    format!("{fields} {:08x}\n", crc32fast::hash(fields.as_bytes()))
}

/// Percent-escapes `%`, spaces, controls and non-ASCII bytes.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_graphic() && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn unescape(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

enum Line {
    Ban(Ban),
    Covered(Duration),
}

/// One line of the bans file, if it is whole and believable.
fn parse_line(l: &str, now: SystemTime) -> Option<Line> {
    let (fields, crc) = l.rsplit_once(' ')?;
    if u32::from_str_radix(crc, 16).ok()? != crc32fast::hash(fields.as_bytes()) {
        return None;
    }
    if let Some(millis) = fields.strip_prefix("lifetime ") {
        return Some(Line::Covered(Duration::from_millis(millis.parse().ok()?)));
    }
    let mut parts = fields.split(' ');
    let nanos: u64 = parts.next()?.parse().ok()?;
    let host = unescape(parts.next()?)?;
    let path_prefix = unescape(parts.next()?)?;
    if parts.next().is_some() {
        return None;
    }
    let at = SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos);
    if at > now + MAX_CLOCK_SKEW {
        return None;
    }
    Some(Line::Ban(Ban {
        host,
        path_prefix,
        at,
    }))
}

/// Reads saved bans and the span they must cover, dropping bans older than that span (or
/// `lifetime`, if longer), those dated in the future and lines that do not parse or fail
/// their checksum.
fn load(file: &Path, lifetime: Duration) -> (BanIndex, Duration) {
    let mut bans = BanIndex::default();
    let Ok(text) = super::files::read_regular(file) else {
        return (bans, Duration::ZERO);
    };
    let now = SystemTime::now();
    let mut dropped = 0;
    let mut covered = Duration::ZERO;
    let mut saved = Vec::new();
    for l in text.lines() {
        bans.file_lines += 1;
        match parse_line(l, now) {
            Some(Line::Ban(ban)) => saved.push(ban),
            Some(Line::Covered(span)) => covered = covered.max(span),
            None if !l.is_empty() => dropped += 1,
            None => {}
        }
    }
    let lifetime = lifetime.max(covered);
    for ban in saved {
        if now
            .duration_since(ban.at)
            .map_or(true, |age| age < lifetime)
        {
            bans.insert(ban);
        } else {
            dropped += 1;
        }
    }
    if dropped > 0 {
        tracing::warn!(
            dropped,
            file = %file.display(),
            "ignored saved bans that were expired, damaged or dated in the future"
        );
    }
    (bans, covered)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::key::Scheme;

    #[test]
    fn bans_match_host_and_prefix_and_only_older_objects() {
        let inv = Invalidations::new(Duration::from_secs(3600), None);
        let before = SystemTime::now() - Duration::from_secs(1);
        assert!(!inv.banned(&CacheUrl::new(Scheme::Http, "h", "/p/1").unwrap(), before));
        inv.ban("h", "/p/");
        let after = SystemTime::now() + Duration::from_secs(1);
        assert!(inv.banned(&CacheUrl::new(Scheme::Http, "h", "/p/1").unwrap(), before));
        assert!(inv.banned(
            &CacheUrl::new(Scheme::Https, "h", "/p/x?y").unwrap(),
            before
        ));
        assert!(!inv.banned(&CacheUrl::new(Scheme::Http, "h", "/q/1").unwrap(), before));
        assert!(!inv.banned(
            &CacheUrl::new(Scheme::Http, "other", "/p/1").unwrap(),
            before
        ));
        assert!(!inv.banned(&CacheUrl::new(Scheme::Http, "h", "/p/1").unwrap(), after));
    }

    #[test]
    fn a_prefix_banned_again_keeps_its_latest_time_and_other_prefix_lengths_still_match() {
        let inv = Invalidations::new(Duration::from_secs(3600), None);
        let url = |p: &str| CacheUrl::new(Scheme::Http, "h", p).unwrap();
        for i in 0..10_000 {
            inv.ban("h", &format!("/other/{i}/"));
        }
        let t0 = SystemTime::now();
        inv.ban("h", "/w");
        inv.ban("h", "/wiki/Ma");
        assert!(inv.banned(&url("/wiki/Main_Page"), t0 - Duration::from_millis(1)));
        assert!(inv.banned(&url("/wx"), t0 - Duration::from_millis(1)));
        assert!(!inv.banned(&url("/x"), t0 - Duration::from_millis(1)));
        let t1 = SystemTime::now() + Duration::from_millis(1);
        assert!(!inv.banned(&url("/wiki/Main_Page"), t1));
        std::thread::sleep(Duration::from_millis(2));
        inv.ban("h", "/wiki/Ma");
        assert!(inv.banned(&url("/wiki/Main_Page"), t1));
        assert!(
            !inv.banned(&url("/wx"), t1),
            "only the prefix banned again moved"
        );
        assert_eq!(inv.ban_count.load(Ordering::Acquire), 10_002);
    }

    #[test]
    fn purge_times() {
        let inv = Invalidations::new(Duration::from_secs(3600), None);
        let t0 = SystemTime::now();
        inv.record_purge([1; 16], t0);
        assert!(inv.purged_since(&[1; 16], t0 - Duration::from_millis(5)));
        assert!(!inv.purged_since(&[1; 16], t0 + Duration::from_millis(5)));
        assert!(!inv.purged_since(&[2; 16], t0 - Duration::from_millis(5)));
    }

    /// Regression: moka's default admission (TinyLFU) turns a new key away from a full table
    /// when it has been seen no more often than the entry it would evict, so once a million
    /// URLs had been purged within the TTL cap (a day of edits on a large wiki), the newest
    /// purges were not recorded, and a fill racing one was stored.
    #[test]
    fn the_newest_purges_are_remembered_when_the_table_is_full() {
        let inv = Invalidations::with_records(Duration::from_secs(3600), None, 100);
        let t0 = SystemTime::now();
        let key = |n: u32| {
            let mut k = [0u8; 16];
            k[..4].copy_from_slice(&n.to_be_bytes());
            k
        };
        for n in 0..1_000 {
            inv.record_purge(key(n), t0);
            inv.record_delete(key(n), t0);
            assert!(inv.purged_since(&key(n), t0 - Duration::from_millis(5)));
        }
        let newest = key(5_000);
        inv.record_purge(newest, t0);
        inv.record_delete(newest, t0);
        inv.record_tag_purge("newest", t0);
        assert!(inv.purged_since(&newest, t0 - Duration::from_millis(5)));
        assert!(inv.deleted_since(&newest, t0 - Duration::from_millis(5)));
        let tags = ["newest".to_string()];
        assert!(inv.tags_purged_since(&tags, t0 - Duration::from_millis(5)));
    }

    #[test]
    fn only_hard_purges_count_as_deletes() {
        let inv = Invalidations::new(Duration::from_secs(3600), None);
        let before = SystemTime::now() - Duration::from_millis(5);
        inv.record_purge([3; 16], SystemTime::now());
        assert!(
            !inv.deleted_since(&[3; 16], before),
            "a soft purge keeps the copy"
        );
        inv.record_delete([3; 16], SystemTime::now());
        assert!(inv.deleted_since(&[3; 16], before));
        assert!(!inv.deleted_since(&[3; 16], SystemTime::now() + Duration::from_secs(1)));
    }

    #[test]
    fn tag_purge_times() {
        let inv = Invalidations::new(Duration::from_secs(3600), None);
        let t0 = SystemTime::now();
        inv.record_tag_purge("page:1", t0);
        let tags = |t: &[&str]| t.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let before = t0 - Duration::from_millis(5);
        assert!(inv.tags_purged_since(&tags(&["wiki", "page:1"]), before));
        assert!(!inv.tags_purged_since(&tags(&["page:1"]), t0 + Duration::from_millis(5)));
        assert!(!inv.tags_purged_since(&tags(&["page:2"]), before));
        assert!(!inv.tags_purged_since(&[], before));
    }
}

#[cfg(test)]
mod persistence {
    use super::*;
    use crate::cache::key::Scheme;

    #[test]
    fn a_planted_damaged_or_future_ban_line_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bans");
        let before = SystemTime::now() - Duration::from_secs(1);
        Invalidations::new(Duration::from_secs(3600), Some(file.clone())).ban("h", "/p q/\n");
        let good = std::fs::read_to_string(&file).unwrap();
        assert_eq!(good.lines().count(), 1, "{good:?}");
        let future = Ban {
            host: "h".into(),
            path_prefix: "/".into(),
            at: SystemTime::now() + Duration::from_secs(3600),
        };
        let mut damaged = line(&Ban {
            host: "h".into(),
            path_prefix: "/".into(),
            at: SystemTime::now(),
        });
        damaged.replace_range(0..1, "9");
        // The line the admin API once let a crafted URL plant: old format, year 2540.
        let planted = "18000000000000000000 h /\n";
        std::fs::write(&file, format!("{good}{}{damaged}{planted}", line(&future))).unwrap();
        let again = Invalidations::new(Duration::from_secs(3600), Some(file));
        assert!(
            !again.banned(&CacheUrl::new(Scheme::Http, "h", "/other").unwrap(), before),
            "only the good ban loaded"
        );
        assert_eq!(again.ban_count.load(Ordering::Acquire), 1);
        let bans: Vec<Ban> = again.bans.read().unwrap().all().collect();
        assert_eq!(
            (bans[0].host.as_str(), bans[0].path_prefix.as_str()),
            ("h", "/p q/\n")
        );
    }

    #[test]
    fn the_bans_file_grows_by_a_line_per_ban_and_is_compacted_when_mostly_repeats() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bans");
        let lines = || std::fs::read_to_string(&file).unwrap().lines().count();
        let inv = Invalidations::new(Duration::from_secs(3600), Some(file.clone()));
        for i in 0..10 {
            inv.ban("h", &format!("/p/{i}"));
        }
        assert_eq!(lines(), 10);
        // The same two prefixes over and over: the file is rewritten before it passes
        // twice the live bans plus the slack.
        for i in 0..3000 {
            inv.ban("h", &format!("/q/{}", i % 2));
        }
        assert_eq!(inv.ban_count.load(Ordering::Acquire), 12);
        assert!(lines() <= 2 * 12 + 1025, "{} lines", lines());
        let before = SystemTime::now() - Duration::from_secs(1);
        let again = Invalidations::new(Duration::from_secs(3600), Some(file.clone()));
        assert_eq!(again.ban_count.load(Ordering::Acquire), 12);
        for path in ["/p/0", "/p/9x", "/q/1"] {
            assert!(again.banned(&CacheUrl::new(Scheme::Http, "h", path).unwrap(), before));
        }
        assert!(!again.banned(&CacheUrl::new(Scheme::Http, "h", "/q/2").unwrap(), before));
    }

    #[test]
    fn a_ban_the_file_system_refused_is_saved_with_the_next_attempt() {
        let dir = tempfile::tempdir().unwrap();
        // A directory in the file's place refuses every write, as a full file system would.
        let file = dir.path().join("bans");
        std::fs::create_dir(&file).unwrap();
        let before = SystemTime::now() - Duration::from_secs(1);
        let inv = Invalidations::new(Duration::from_secs(3600), Some(file.clone()));
        assert!(!inv.ban("h", "/a/"));
        assert!(!inv.save_missing_bans());
        std::fs::remove_dir(&file).unwrap();
        assert!(inv.save_missing_bans());
        assert!(inv.ban("h", "/b/"));
        let again = Invalidations::new(Duration::from_secs(3600), Some(file));
        for path in ["/a/1", "/b/1"] {
            let url = CacheUrl::new(Scheme::Http, "h", path).unwrap();
            assert!(again.banned(&url, before), "{path}");
        }
    }

    #[test]
    fn a_ban_lasts_past_its_lifetime_as_long_as_a_stale_window_it_covers_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bans");
        let second = Duration::from_secs(1);
        let stored = SystemTime::now() - Duration::from_secs(3);
        let two_seconds_old = line(&Ban {
            host: "h".into(),
            path_prefix: "/p/".into(),
            at: SystemTime::now() - Duration::from_secs(2),
        });
        let url = CacheUrl::new(Scheme::Http, "h", "/p/1").unwrap();
        std::fs::write(&file, &two_seconds_old).unwrap();
        let uncovered = Invalidations::new(second, Some(file.clone()));
        assert!(!uncovered.banned(&url, stored), "older than its lifetime");

        std::fs::remove_file(&file).unwrap();
        let inv = Invalidations::new(second, Some(file.clone()));
        // Objects stored with windows a millisecond longer each: a line per eighth of growth.
        for ms in 0..1000 {
            inv.cover(Duration::from_millis(3_600_000 + ms));
        }
        let text = std::fs::read_to_string(&file).unwrap();
        assert_eq!(text.lines().count(), 1, "{text:?}");
        std::fs::write(&file, format!("{text}{two_seconds_old}")).unwrap();
        let again = Invalidations::new(second, Some(file.clone()));
        assert!(
            again.banned(&url, stored),
            "the stale window outlived the restart"
        );
        // The file compacted (the same prefix banned over and over) keeps the span.
        for _ in 0..3000 {
            again.ban("h", "/q/");
        }
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(text.lines().count() < 1100, "never compacted");
        let first = text.lines().next().unwrap_or_default();
        assert!(first.starts_with("lifetime 4050000 "), "{first:?}");
        let third = Invalidations::new(second, Some(file));
        assert!(third.banned(&url, stored));
    }

    #[test]
    fn bans_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bans");
        let before = SystemTime::now() - Duration::from_secs(1);
        Invalidations::new(Duration::from_secs(3600), Some(file.clone())).ban("h", "/p/");
        let again = Invalidations::new(Duration::from_secs(3600), Some(file));
        assert!(again.banned(&CacheUrl::new(Scheme::Http, "h", "/p/1").unwrap(), before));
        assert!(!again.banned(&CacheUrl::new(Scheme::Http, "h", "/q").unwrap(), before));
    }
}
