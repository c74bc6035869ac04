//! A real MediaWiki (Debian's `mediawiki` package, SQLite, PHP's built-in server) behind the
//! real Skua, configured as README's "In front of MediaWiki" says, used as readers and editors
//! would: views are cached, an API edit purges, the edit is credited to the reader, a
//! logged-in reader passes without polluting the shared copy, a template edit purges the pages
//! using it once the job queue runs, and HTCP routing works.
//!
//! Needs `php`, `php-sqlite3` and `mediawiki` (`.ci/run` installs them); elsewhere the test
//! says what is missing and passes.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

const MEDIAWIKI: &str = "/usr/share/mediawiki";
const HOST: (&str, &str) = ("host", "wiki.test");

/// A MediaWiki installed into a temporary directory and served by `php -S`.
struct Wiki {
    dir: tempfile::TempDir,
    php: Child,
    addr: std::net::SocketAddr,
}

impl Wiki {
    /// Installs a fresh wiki (SQLite) and serves it; `None` when PHP or MediaWiki is missing.
    async fn start() -> Option<Wiki> {
        let php = Command::new("php").arg("--version").output();
        if php.is_err()
            || !Path::new(MEDIAWIKI)
                .join("maintenance/install.php")
                .exists()
        {
            prerequisite_missing(
                "MediaWiki (apt-get install --no-install-recommends mediawiki php-sqlite3 php-cli)",
            );
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("data")).unwrap();
        let installed = Command::new("php")
            .current_dir(MEDIAWIKI)
            .args([
                "maintenance/install.php",
                "--dbtype",
                "sqlite",
                "--dbname",
                "wiki",
            ])
            .arg("--dbpath")
            .arg(dir.path().join("data"))
            .args([
                "--server",
                "http://wiki.test",
                "--scriptpath",
                "",
                "--lang",
                "en",
            ])
            .arg("--confpath")
            .arg(dir.path())
            .args(["--pass", "Skua-test-pass-123", "Skua Test Wiki", "Admin"])
            .output()
            .unwrap();
        assert!(
            installed.status.success(),
            "install.php: {}{}",
            String::from_utf8_lossy(&installed.stdout),
            String::from_utf8_lossy(&installed.stderr)
        );
        // The health checks of Skua's test config ask for /_health; everything else is
        // MediaWiki's.
        let router = dir.path().join("router.php");
        std::fs::write(
            &router,
            "<?php\nif (parse_url($_SERVER['REQUEST_URI'], PHP_URL_PATH) === '/_health') { echo \"ok\\n\"; return true; }\nreturn false;\n",
        )
        .unwrap();
        let port = free_port();
        let php = Command::new("php")
            .current_dir(MEDIAWIKI)
            .env("MW_CONFIG_FILE", dir.path().join("LocalSettings.php"))
            .env("PHP_CLI_SERVER_WORKERS", "4")
            // The settings file changes during the test: have opcache look at it every time.
            .args(["-d", "opcache.revalidate_freq=0"])
            .args(["-S", &format!("127.0.0.1:{port}"), "-t", MEDIAWIKI])
            .arg(&router)
            // Its own process group: `php -S` forks its workers, which must go with it.
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        wait_listening(addr).await;
        // MediaWiki's first request builds its caches (localisation, opcache): seconds on a
        // busy machine, once. Made here, directly, it cannot run into Skua's origin timeout.
        let warm = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .unwrap()
            .get(format!("http://{addr}/index.php?title=Main_Page"))
            .header("host", "wiki.test")
            .send()
            .await;
        assert!(
            warm.is_ok_and(|r| r.status().is_success()),
            "MediaWiki does not answer"
        );
        Some(Wiki { dir, php, addr })
    }

    fn settings_file(&self) -> PathBuf {
        self.dir.path().join("LocalSettings.php")
    }

    /// Appends README's CDN settings for a Skua on `skua_port`, plus `extra` PHP. PHP reads
    /// the file on every request, so a later call replaces what an earlier one set.
    fn configure(&self, skua_port: u16, extra: &str) {
        let path = self.settings_file();
        let text = std::fs::read_to_string(&path).unwrap();
        let base = text
            .split("// skua test settings")
            .next()
            .unwrap()
            .to_string();
        let settings = format!(
            "{base}// skua test settings\n\
             $wgUseCdn = true;\n\
             $wgCdnServers = [ '127.0.0.1:{skua_port}' ];\n\
             $wgCdnServersNoPurge = [ '127.0.0.1' ];\n\
             $wgInternalServer = 'http://wiki.test';\n\
             $wgCdnMaxAge = 86400;\n\
             $wgAllowExternalReqID = true;\n\
             $wgJobRunRate = 0;\n\
             // The test rewrites this file; MediaWiki would otherwise answer no 304 after.\n\
             $wgInvalidateCacheOnLocalSettingsChange = false;\n\
             {extra}\n"
        );
        std::fs::write(&path, settings).unwrap();
    }

    fn run_jobs(&self) {
        let ran = Command::new("php")
            .current_dir(MEDIAWIKI)
            .env("MW_CONFIG_FILE", self.settings_file())
            .arg("maintenance/runJobs.php")
            .output()
            .unwrap();
        assert!(
            ran.status.success(),
            "{}",
            String::from_utf8_lossy(&ran.stderr)
        );
    }
}

/// The first JSON access-log line at `log` with `cache_status`, once written (a writer thread
/// writes them; up to 10 s).
async fn wait_until_logged(log: &Path, cache_status: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let line = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|l| l["cache_status"] == cache_status);
        if let Some(line) = line {
            return line;
        }
        assert!(Instant::now() < deadline, "no {cache_status} line: {text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Regression: killing `php -S` alone left its forked workers listening on the test's port
/// after the test, where a later benchmark found the port taken. The whole group goes.
impl Drop for Wiki {
    fn drop(&mut self) {
        let group = format!("-{}", self.php.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.php.kill();
        let _ = self.php.wait();
    }
}

fn form(fields: &[(&str, &str)]) -> String {
    let encode = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    fields
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// A reader or editor of the wiki through Skua, from its own loopback address, keeping the
/// cookies the wiki sets.
struct Browser {
    client: reqwest::Client,
    skua: std::net::SocketAddr,
    cookies: BTreeMap<String, String>,
}

impl Browser {
    fn new(skua: std::net::SocketAddr, from: [u8; 4]) -> Browser {
        Browser {
            client: reqwest::Client::builder()
                .local_address(std::net::IpAddr::from(from))
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            skua,
            cookies: BTreeMap::new(),
        }
    }

    async fn request(&mut self, method: &str, path: &str, body: Option<String>) -> Got {
        let mut req = self
            .client
            .request(
                method.parse().unwrap(),
                format!("http://{}{path}", self.skua),
            )
            .header(HOST.0, HOST.1);
        if !self.cookies.is_empty() {
            let jar: Vec<String> = self
                .cookies
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            req = req.header("cookie", jar.join("; "));
        }
        if let Some(body) = body {
            req = req
                .header("content-type", "application/x-www-form-urlencoded")
                .body(body);
        }
        let resp = req.send().await.unwrap();
        for set in resp.headers().get_all("set-cookie") {
            let Some((pair, _)) = set.to_str().unwrap_or("").split_once(';') else {
                continue;
            };
            if let Some((k, v)) = pair.split_once('=') {
                if v == "deleted" {
                    self.cookies.remove(k);
                } else {
                    self.cookies.insert(k.to_string(), v.to_string());
                }
            }
        }
        Got {
            status: resp.status().as_u16(),
            headers: resp.headers().clone(),
            body: resp.bytes().await.unwrap(),
        }
    }

    /// A view of `title` with each cookie in a `Cookie` field of its own, as an HTTP/2 browser
    /// sends them (RFC 9113 §8.2.3), which Skua must join before MediaWiki reads them.
    async fn view_with_cookies_apart(&self, title: &str) -> Got {
        let mut req = (self.client)
            .get(format!("http://{}/index.php/{title}", self.skua))
            .header(HOST.0, HOST.1);
        for (k, v) in &self.cookies {
            req = req.header("cookie", format!("{k}={v}"));
        }
        let resp = req.send().await.unwrap();
        Got {
            status: resp.status().as_u16(),
            headers: resp.headers().clone(),
            body: resp.bytes().await.unwrap(),
        }
    }

    async fn view(&mut self, title: &str) -> Got {
        self.request("GET", &format!("/index.php/{title}"), None)
            .await
    }

    async fn api(&mut self, fields: &[(&str, &str)]) -> serde_json::Value {
        let mut all = fields.to_vec();
        all.push(("format", "json"));
        let got = self.request("POST", "/api.php", Some(form(&all))).await;
        assert_eq!(got.status, 200, "{}", got.text());
        serde_json::from_slice(&got.body).unwrap()
    }

    async fn edit(&mut self, title: &str, text: &str) {
        let tokens = self.api(&[("action", "query"), ("meta", "tokens")]).await;
        let token = tokens["query"]["tokens"]["csrftoken"]
            .as_str()
            .unwrap()
            .to_string();
        let edit = self
            .api(&[
                ("action", "edit"),
                ("title", title),
                ("text", text),
                ("token", &token),
            ])
            .await;
        assert_eq!(edit["edit"]["result"], "Success", "{edit}");
    }

    async fn log_in(&mut self) {
        let tokens = self
            .api(&[("action", "query"), ("meta", "tokens"), ("type", "login")])
            .await;
        let token = tokens["query"]["tokens"]["logintoken"]
            .as_str()
            .unwrap()
            .to_string();
        let login = self
            .api(&[
                ("action", "clientlogin"),
                ("username", "Admin"),
                ("password", "Skua-test-pass-123"),
                ("loginreturnurl", "http://wiki.test/"),
                ("logintoken", &token),
            ])
            .await;
        assert_eq!(login["clientlogin"]["status"], "PASS", "{login}");
    }
}

/// Views `title` until its text holds `wanted`: purges travel after the edit's response.
async fn wait_for_text(reader: &mut Browser, title: &str, wanted: &str) -> Got {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = reader.view(title).await;
        if got.text().contains(wanted) {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "{title} never showed {wanted:?} (still {}: {})",
            got.cache(),
            got.header("cache-status")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_real_mediawiki_behind_skua_purges_credits_and_passes_as_promised() {
    let Some(wiki) = Wiki::start().await else {
        return;
    };
    let htcp = free_port();
    let disk = tempfile::tempdir().unwrap();
    let port = Port::reserve();
    // README's rule for the wiki's article path (here `/index.php/Title`).
    let log = disk.path().join("access.log");
    let extra = format!(
        "[purge.htcp]\nlisten = \"127.0.0.1:{htcp}\"\n\n\
         [[rule]]\nname = \"page titles\"\nmatch = {{ path_prefix = [\"/index.php/\"] }}\n\
         normalize_path = \"mediawiki\"\n\n\
         [log]\naccess = \"{}\"\nformat = \"json\"\n",
        log.display()
    );
    // The default: what the disk holds from before a restart is revalidated first.
    let disk_lines = "after_restart = \"revalidate\"";
    let mut skua = Skua::start_disk_on(&port, &[wiki.addr], disk.path(), disk_lines, &extra).await;
    wiki.configure(skua.addr.port(), "");
    let mut reader = Browser::new(skua.addr, [127, 0, 0, 2]);

    // Anonymous views: a miss, then a hit.
    let first = reader.view("Main_Page").await;
    assert_eq!(
        (first.status, first.cache()),
        (200, "miss"),
        "{}",
        first.text()
    );
    assert!(first.header("cache-status").contains("stored"));
    // MediaWiki took Skua's `X-Request-Id` for its own request id (README's
    // `$wgAllowExternalReqID`): the page's `wgRequestId` is the access log's `request_id`.
    let page = first.text();
    let at = page.find("\"wgRequestId\":\"").expect("wgRequestId") + 15;
    let mw_id = &page[at..at + page[at..].find('"').unwrap()];
    let logged = wait_until_logged(&log, "miss").await;
    assert_eq!(logged["request_id"].as_str(), Some(mw_id), "{logged}");
    assert_eq!(reader.view("Main_Page").await.cache(), "hit-front");
    // MediaWiki sends pages uncompressed here: a browser gets them brotli-compressed by Skua.
    let compressed = reqwest::Client::new()
        .get(format!("http://{}/index.php/Main_Page", skua.addr))
        .header(HOST.0, HOST.1)
        .header("accept-encoding", "gzip, deflate, br")
        .send()
        .await
        .unwrap();
    assert_eq!(
        compressed
            .headers()
            .get("content-encoding")
            .map(|v| v.as_bytes()),
        Some(&b"br"[..])
    );
    let size = compressed.bytes().await.unwrap().len();
    assert!(
        size * 2 < first.body.len(),
        "{size} of {} bytes",
        first.body.len()
    );

    // An API edit through Skua purges the page, and is credited to the reader's address.
    let mut editor = Browser::new(skua.addr, [127, 0, 0, 3]);
    editor
        .edit("Main_Page", "Edited through Skua, revision two.")
        .await;
    let after = wait_for_text(&mut reader, "Main_Page", "revision two").await;
    assert_eq!(after.cache(), "miss");
    let changes = reader
        .api(&[
            ("action", "query"),
            ("list", "recentchanges"),
            ("rcprop", "user|title"),
        ])
        .await;
    assert_eq!(
        changes["query"]["recentchanges"][0]["user"], "127.0.0.3",
        "the edit was not credited to its author: {changes}"
    );

    // A title with an apostrophe and parentheses. MediaWiki's links and purges spell it as
    // `wfUrlencode` does, `Rock_%27n%27_roll_(music)`; an address typed into a browser
    // arrives as `Rock_'n'_roll_(music)`, and a link made by other software (Python's
    // `quote`, many feed readers) as `Rock_%27n%27_roll_%28music%29`. Regression: each was
    // an object of its own, and the edit's purge removed the first alone, so the others
    // served the old text until their TTL (a day).
    let spellings = [
        "Rock_%27n%27_roll_(music)",
        "Rock_'n'_roll_(music)",
        "Rock_%27n%27_roll_%28music%29",
        "Rock_%27n%27_roll_%28music)",
    ];
    editor.edit("Rock_'n'_roll_(music)", "First take.").await;
    for (i, spelling) in spellings.iter().enumerate() {
        let view = reader.view(spelling).await;
        assert!(view.text().contains("First take"), "{spelling}");
        let expected = if i == 0 { "miss" } else { "hit-front" };
        assert_eq!(
            view.cache(),
            expected,
            "{spelling}: one object for every spelling"
        );
    }
    editor.edit("Rock_'n'_roll_(music)", "Second take.").await;
    for spelling in spellings {
        wait_for_text(&mut reader, spelling, "Second take").await;
    }

    // A logged-in reader passes; the shared copy stays the anonymous one.
    let mut member = Browser::new(skua.addr, [127, 0, 0, 4]);
    member.log_in().await;
    let own = member.view("Main_Page").await;
    assert_eq!(own.cache(), "pass");
    assert!(own.text().contains("Admin"), "not the logged-in page");
    // Regression: cookies in fields of their own reached MediaWiki as several lines, which
    // PHP joined with ", " into one session cookie it could not read: logged out.
    assert!(member.cookies.len() > 1, "{:?}", member.cookies);
    let apart = member.view_with_cookies_apart("Main_Page").await;
    assert_eq!(apart.cache(), "pass");
    assert!(
        apart.text().contains("\"wgUserName\":\"Admin\""),
        "cookies sent apart lost the session"
    );
    let shared = reader.view("Main_Page").await;
    assert_eq!(shared.cache(), "hit-front");
    assert!(
        !shared.text().contains("\"wgUserName\":\"Admin\""),
        "a logged-in page was shared"
    );

    // A template edit purges the pages using it once the job queue runs. MediaWiki skips
    // pages touched in the same second as the edit, as it should: wait a second first.
    editor
        .edit("Template:Greeting", "Hello, first version")
        .await;
    editor
        .edit("Uses_template", "Before {{Greeting}} after")
        .await;
    reader.view("Uses_template").await;
    let cached = reader.view("Uses_template").await;
    assert_eq!(cached.cache(), "hit-front");
    assert!(cached.text().contains("Hello, first version"));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    editor
        .edit("Template:Greeting", "Hello, second version")
        .await;
    assert!(
        reader
            .view("Uses_template")
            .await
            .text()
            .contains("first version"),
        "purged before the job ran"
    );
    wiki.run_jobs();
    wait_for_text(&mut reader, "Uses_template", "second version").await;

    // HTCP routing alone (no HTTP purges): an edit still reaches Skua.
    wiki.configure(
        skua.addr.port(),
        &format!(
            "$wgCdnServers = [];\n$wgHTCPRouting = [ '' => [ 'host' => '127.0.0.1', 'port' => {htcp} ] ];"
        ),
    );
    let purged_before = skua
        .metric(r#"skua_purges_total{result="purged",source="htcp"}"#)
        .await;
    reader.view("Main_Page").await;
    assert_eq!(reader.view("Main_Page").await.cache(), "hit-front");
    editor
        .edit("Main_Page", "Edited again, revision three.")
        .await;
    wait_for_text(&mut reader, "Main_Page", "revision three").await;
    let purged_after = skua
        .metric(r#"skua_purges_total{result="purged",source="htcp"}"#)
        .await;
    assert!(
        purged_after > purged_before,
        "no HTCP purge applied ({purged_before} before, {purged_after} after):\n{}",
        skua.metrics()
            .await
            .lines()
            .filter(|l| l.starts_with("skua_purges_total"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // Skua restarts while an edit is made: the edit's purge finds nobody, and the page from
    // before the restart must not come back from disk.
    let unchanged = reader.view("Uses_template").await;
    assert!(unchanged.cache().starts_with("hit-"));
    skua.stop();
    // Last-Modified and If-Modified-Since count whole seconds: an edit in the second the copy
    // was fetched would look unmodified to MediaWiki.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut direct = Browser::new(wiki.addr, [127, 0, 0, 3]);
    direct
        .edit("Main_Page", "Edited while Skua was down, revision four.")
        .await;
    let _restarted =
        Skua::start_disk_on(&port, &[wiki.addr], disk.path(), disk_lines, &extra).await;
    let page = reader.view("Main_Page").await;
    assert!(
        page.text().contains("revision four"),
        "the pre-restart copy was served: {} {} {:?}",
        page.cache(),
        page.header("cache-status"),
        page.headers
    );
    // An unchanged page costs MediaWiki a 304, and is served from disk.
    let same = reader.view("Uses_template").await;
    assert_eq!(
        same.cache(),
        "revalidated",
        "{}",
        same.header("cache-status")
    );
    assert!(same.text().contains("second version"));
}
