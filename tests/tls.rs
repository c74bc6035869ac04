//! HTTPS and HTTP/2 at the edge (`[server.tls]`): Skua terminates TLS itself, with the
//! certificate a client's name selects, and an https request is an https resource (its own
//! cache key, `X-Forwarded-Proto: https` at the origin).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// A certificate's files in `dir`: (chain path, key path).
fn write_certificate(
    dir: &std::path::Path,
    name: &str,
    pem: &(String, String),
) -> (String, String) {
    let chain = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&chain, &pem.0).unwrap();
    std::fs::write(&key, &pem.1).unwrap();
    (chain.display().to_string(), key.display().to_string())
}

/// `[server.tls]` lines on `port` with the given certificates (chain, key).
fn tls_lines(port: &Port, certificates: &[(String, String)], more: &str) -> String {
    let mut lines = format!(
        "\n[server.tls]\nlisten = [\"127.0.0.1:{}\"]\nhandshake_timeout = \"1s\"\n{more}\n",
        port.number
    );
    for (chain, key) in certificates {
        lines.push_str(&format!(
            "[[server.tls.certificate]]\nchain = \"{chain}\"\nkey = \"{key}\"\n"
        ));
    }
    lines
}

/// A client that trusts `ca` and reaches every name at `addr`.
fn https_client(ca: &TestCa, names: &[&str], addr: SocketAddr) -> reqwest::ClientBuilder {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.pem.as_bytes()).unwrap())
        .tls_info(true)
        .timeout(Duration::from_secs(10));
    for name in names {
        builder = builder.resolve(name, addr);
    }
    builder
}

/// The DER of the certificate a response's connection was served with.
fn served_certificate(resp: &reqwest::Response) -> Vec<u8> {
    resp.extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|i| i.peer_certificate())
        .expect("TLS info on the response")
        .to_vec()
}

fn der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

/// Skua in front of `origin` with HTTPS on a port of its own and one certificate (`pem`:
/// chain and key), `more` lines in `[server.tls]` and `extra` tables: the proxy, the HTTPS
/// port and address, and the directory holding the certificate files.
async fn https_skua(
    origin: &Origin,
    pem: &(String, String),
    more: &str,
    extra: &str,
) -> (Skua, Port, SocketAddr, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let cert = write_certificate(dir.path(), "wiki", pem);
    let tls_port = Port::reserve();
    let lines = tls_lines(&tls_port, &[cert], more);
    let skua = Skua::start_tables(&[origin.addr], [&lines, "", ""], extra).await;
    let tls_addr: SocketAddr = format!("127.0.0.1:{}", tls_port.number).parse().unwrap();
    wait_listening(tls_addr).await;
    (skua, tls_port, tls_addr, dir)
}

/// Whether the `openssl` command is missing (said here, and a failure on CI).
fn openssl_missing() -> bool {
    let command = std::process::Command::new("openssl")
        .arg("version")
        .output();
    if command.is_err() {
        prerequisite_missing("openssl (apt-get install openssl)");
    }
    command.is_err()
}

async fn origin_reporting_the_scheme() -> Origin {
    Origin::start(|seen| {
        Reply::ok(format!(
            "proto {}",
            seen.header("x-forwarded-proto").unwrap_or("-")
        ))
        .header("cache-control", "max-age=600")
    })
    .await
}

/// The header section of a hit as a client compares it: every field but `Date` (pingora's
/// HTTP/2 session writes the time of sending, RFC 9110 §6.6.1, on every response) and with
/// `Age` and `Cache-Status`'s `ttl` left out, which may move on by a second between two
/// requests.
fn hit_fields(resp: &reqwest::Response) -> Vec<(String, String)> {
    let mut fields: Vec<(String, String)> = (resp.headers().iter())
        .filter(|(name, _)| !["date", "age"].contains(&name.as_str()))
        .map(|(name, value)| {
            let value = value.to_str().unwrap();
            let value = match name.as_str() {
                "cache-status" => value.split(';').filter(|p| !p.contains("ttl=")).collect(),
                _ => value.to_string(),
            };
            (name.to_string(), value)
        })
        .collect();
    fields.sort();
    fields
}

/// #19: "a hit over HTTP/2 or over TLS uses the same hit code as plain HTTP/1.1 and carries
/// the same headers": an HTTP/2 hit is answered by the front door, as an HTTP/1.1 one is,
/// field for field alike, for `GET` and `HEAD`; a request the front door declines (a
/// precondition) still gets pingora's answer on the same connection.
#[tokio::test]
async fn http2_hits_take_the_front_door_with_the_http11_hit_fields() {
    let origin = Origin::start(|_| {
        Reply::ok("<p>page</p>")
            .header("cache-control", "max-age=600")
            .header("etag", "\"v1\"")
            .header("content-type", "text/html; charset=utf-8")
            .header("vary", "Accept-Encoding")
            .header("x-origin", "app1")
    })
    .await;
    let ca = TestCa::new();
    let pem = ca.issue(&["wiki.test"]);
    let (skua, tls_port, tls_addr, _dir) = https_skua(&origin, &pem, "", "").await;
    let url = format!("https://wiki.test:{}/wiki/Same", tls_port.number);
    let h1 = https_client(&ca, &["wiki.test"], tls_addr)
        .http1_only()
        .build()
        .unwrap();
    let h2 = https_client(&ca, &["wiki.test"], tls_addr).build().unwrap();
    assert_eq!(
        h1.get(&url).send().await.unwrap().headers()["x-cache-status"],
        "miss"
    );

    let before = skua.hit_paths().await;
    let over_h1 = h1.get(&url).send().await.unwrap();
    let over_h2 = h2.get(&url).send().await.unwrap();
    assert_eq!(over_h2.version(), reqwest::Version::HTTP_2);
    assert_eq!(over_h2.headers()["x-cache-status"], "hit-front");
    assert!(over_h2.headers().contains_key("age"));
    assert_eq!(hit_fields(&over_h2), hit_fields(&over_h1));
    assert_eq!(over_h2.text().await.unwrap(), "<p>page</p>");
    let head = h2.head(&url).send().await.unwrap();
    assert_eq!(head.headers()["x-cache-status"], "hit-front");
    assert_eq!(head.headers()["content-length"], "11");
    assert_eq!(hit_fields(&head), hit_fields(&over_h1));
    assert_eq!(head.bytes().await.unwrap().len(), 0);
    let after = skua.hit_paths().await;
    assert_eq!(
        after,
        [before[0] + 3, before[1], before[2]],
        "the front door answered the HTTP/1.1 hit and both HTTP/2 ones"
    );

    let revalidated = (h2.get(&url))
        .header("if-none-match", "\"v1\"")
        .send()
        .await
        .unwrap();
    assert_eq!(revalidated.status(), 304);
    assert_eq!(revalidated.headers()["x-cache-status"], "hit-front");
    assert_eq!(
        skua.hit_paths().await[2],
        before[2] + 1,
        "pingora's cache answered the 304"
    );
    assert_eq!(origin.count("/wiki/Same"), 1);
}

/// #19: a miss then a hit over HTTPS, on HTTP/2 and on HTTP/1.1 (which the front door
/// answers, as it does plain HTTP); the origin hears `X-Forwarded-Proto: https`, and the http
/// URL is another resource with its own copy.
#[tokio::test]
async fn https_serves_hits_over_http2_and_http11_and_keys_on_the_scheme() {
    let origin = origin_reporting_the_scheme().await;
    let ca = TestCa::new();
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("access.log");
    let log_table = format!("[log]\naccess = \"{}\"\nformat = \"json\"\n", log.display());
    let pem = ca.issue(&["wiki.test", "*.wiki.test"]);
    let (skua, tls_port, tls_addr, _dir) = https_skua(&origin, &pem, "", &log_table).await;
    let url = format!("https://en.wiki.test:{}/wiki/Page", tls_port.number);

    let h2 = https_client(&ca, &["en.wiki.test"], tls_addr)
        .build()
        .unwrap();
    let first = h2.get(&url).send().await.unwrap();
    assert_eq!(first.version(), reqwest::Version::HTTP_2);
    assert_eq!(first.headers()["x-cache-status"], "miss");
    assert_eq!(first.text().await.unwrap(), "proto https");
    let again = h2.get(&url).send().await.unwrap();
    assert_eq!(again.version(), reqwest::Version::HTTP_2);
    assert_eq!(again.headers()["x-cache-status"], "hit-front");
    assert_eq!(again.text().await.unwrap(), "proto https");
    // An HTTP/2 GET's body (its DATA frames) is withheld from the origin as an HTTP/1.1 one's
    // is (`edge::a_get_body_never_shapes_an_answer_that_is_stored`).
    let fat = format!("https://en.wiki.test:{}/wiki/Fat", tls_port.number);
    let resp = h2.get(&fat).body("action=evil").send().await.unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    let seen = &origin.requests("/wiki/Fat")[0];
    assert!(seen.body.is_empty(), "the origin got {:?}", seen.body);
    // A POST's body over HTTP/2, read whole before the origin is asked, reaches it whole.
    let form = "x".repeat(10_000);
    let posted = h2.post(&fat).body(form.clone()).send().await.unwrap();
    assert_eq!(posted.status(), 200);
    let seen = origin.requests("/wiki/Fat");
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].method, "POST");
    assert_eq!(seen[1].body, form.as_bytes());

    let before = skua.hit_paths().await;
    let h1 = https_client(&ca, &["en.wiki.test"], tls_addr)
        .http1_only()
        .build()
        .unwrap();
    let hit = h1.get(&url).send().await.unwrap();
    assert_eq!(hit.version(), reqwest::Version::HTTP_11);
    assert_eq!(hit.headers()["x-cache-status"], "hit-front");
    assert_eq!(hit.text().await.unwrap(), "proto https");
    let after = skua.hit_paths().await;
    assert_eq!(
        after[0],
        before[0] + 1,
        "the front door answered the HTTPS/1.1 hit"
    );
    assert_eq!(origin.count("/wiki/Page"), 1);
    // A miss over HTTPS/1.1 goes through pingora's HTTP/1.1 session on the TLS connection.
    let other = format!("https://en.wiki.test:{}/wiki/Other", tls_port.number);
    for expected in ["miss", "hit-front"] {
        let resp = h1.get(&other).send().await.unwrap();
        assert_eq!(resp.version(), reqwest::Version::HTTP_11);
        assert_eq!(resp.headers()["x-cache-status"], expected);
        assert_eq!(resp.text().await.unwrap(), "proto https");
    }
    assert_eq!(origin.count("/wiki/Other"), 1);

    // The same path over plain HTTP is the http resource: fetched once for itself.
    let plain = get(
        &format!("http://{}/wiki/Page", skua.addr),
        &[("host", &format!("en.wiki.test:{}", tls_port.number))],
    )
    .await;
    assert_eq!(plain.cache(), "miss");
    assert_eq!(plain.text(), "proto -");
    assert_eq!(origin.count("/wiki/Page"), 2);

    assert_eq!(
        skua.metric("skua_tls_handshakes_total{result=\"full\"}")
            .await,
        2.0
    );
    assert_eq!(
        skua.metric("skua_tls_connections_total{version=\"TLSv1.3\"}")
            .await,
        2.0
    );
    assert_eq!(skua.metric("skua_tls_http2_connections_total").await, 1.0);

    // The access log says which requests were https, and over which protocol.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut lines = Vec::new();
    while lines.len() < 6 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        lines = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .collect();
    }
    // In the order they were logged, which a miss may reach after the hit that followed it.
    let mut seen: Vec<(String, String, String)> = lines
        .iter()
        .map(|l| {
            let field = |k: &str| l[k].as_str().unwrap_or("").to_string();
            (field("scheme"), field("protocol"), field("cache_status"))
        })
        .collect();
    let expected = [
        ("https", "HTTP/2.0", "miss"),
        ("https", "HTTP/2.0", "hit-front"),
        ("https", "HTTP/2.0", "miss"),
        ("https", "HTTP/2.0", "pass"),
        ("https", "HTTP/1.1", "hit-front"),
        ("https", "HTTP/1.1", "miss"),
        ("https", "HTTP/1.1", "hit-front"),
        ("http", "HTTP/1.1", "miss"),
    ];
    let mut expected: Vec<(String, String, String)> = expected
        .iter()
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
        .collect();
    seen.sort();
    expected.sort();
    assert_eq!(seen, expected);
}

/// Each certificate is served for the names it covers (SNI), wildcards included; a client that
/// names none of them gets the default one.
#[tokio::test]
async fn sni_selects_the_certificate_and_the_default_answers_other_names() {
    let origin = origin_reporting_the_scheme().await;
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let wiki_pem = ca.issue(&["wiki.test", "*.wiki.test"]);
    let other_pem = ca.issue(&["other.test"]);
    let wiki = write_certificate(dir.path(), "wiki", &wiki_pem);
    let other = write_certificate(dir.path(), "other", &other_pem);
    let tls_port = Port::reserve();
    let _skua = Skua::start_tables(
        &[origin.addr],
        [&tls_lines(&tls_port, &[wiki, other], ""), "", ""],
        "",
    )
    .await;
    let tls_addr: SocketAddr = format!("127.0.0.1:{}", tls_port.number).parse().unwrap();
    wait_listening(tls_addr).await;
    for (name, expected) in [
        ("wiki.test", &wiki_pem),
        ("de.wiki.test", &wiki_pem),
        ("other.test", &other_pem),
    ] {
        let client = https_client(&ca, &[name], tls_addr).build().unwrap();
        let url = format!("https://{name}:{}/", tls_port.number);
        let resp = client.get(&url).send().await.unwrap();
        assert_eq!(served_certificate(&resp), der(&expected.0), "{name}");
    }
    // A name no certificate covers gets the default (the first), which its client rejects.
    let client = https_client(&ca, &["unknown.test"], tls_addr)
        .build()
        .unwrap();
    let url = format!("https://unknown.test:{}/", tls_port.number);
    let err = client.get(&url).send().await.unwrap_err();
    assert!(format!("{err:?}").contains("NotValidForName"), "{err:?}");
}

/// A client that opens a connection and sends nothing, or half a handshake, is closed after
/// `handshake_timeout`, and counted.
#[tokio::test]
async fn a_stalled_handshake_is_cut_off_after_the_deadline() {
    let origin = origin_reporting_the_scheme().await;
    let ca = TestCa::new();
    let (skua, _tls_port, tls_addr, _dir) =
        https_skua(&origin, &ca.issue(&["wiki.test"]), "", "").await;
    // A TLS record header announcing a ClientHello of 512 bytes, then 5 of them.
    let half_hello: &[u8] = &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03];
    for sent in [&[][..], half_hello] {
        let started = Instant::now();
        let mut conn = TcpStream::connect(tls_addr).await.unwrap();
        conn.write_all(sent).await.unwrap();
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await;
        let elapsed = started.elapsed();
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "closed, not left open: {read:?}"
        );
        assert!(
            elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(4),
            "closed after the 1 s deadline, not at once nor much later: {elapsed:?}"
        );
    }
    assert_eq!(
        skua.metric("skua_tls_handshakes_total{result=\"timeout\"}")
            .await,
        2.0
    );
}

/// SIGHUP gives new handshakes the certificate now in the files, while requests go on without
/// a failure; a key file that no longer matches is refused and the certificate in use stays.
#[tokio::test]
async fn reload_swaps_the_certificate_under_load_and_a_bad_one_keeps_the_old() {
    let origin = origin_reporting_the_scheme().await;
    let ca = TestCa::new();
    let first_pem = ca.issue(&["wiki.test"]);
    let (skua, tls_port, tls_addr, dir) = https_skua(&origin, &first_pem, "", "").await;
    let url = format!("https://wiki.test:{}/page", tls_port.number);
    let fresh_connection = || {
        https_client(&ca, &["wiki.test"], tls_addr)
            .pool_max_idle_per_host(0)
            .build()
            .unwrap()
    };
    let resp = fresh_connection().get(&url).send().await.unwrap();
    assert_eq!(served_certificate(&resp), der(&first_pem.0));

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = tokio::spawn({
        let (stop, url, client) = (stop.clone(), url.clone(), fresh_connection());
        async move {
            let (mut ok, mut failed) = (0u32, 0u32);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match client.get(&url).send().await {
                    Ok(r) if r.status() == 200 => ok += 1,
                    _ => failed += 1,
                }
            }
            (ok, failed)
        }
    });
    let second_pem = ca.issue(&["wiki.test"]);
    write_certificate(dir.path(), "wiki", &second_pem);
    assert!(
        skua.reload_and_wait(|text| text).await,
        "the reload applied"
    );
    let resp = fresh_connection().get(&url).send().await.unwrap();
    assert_eq!(served_certificate(&resp), der(&second_pem.0));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = load.await.unwrap();
    assert!(ok > 0);
    assert_eq!(
        failed, 0,
        "no request failed across the reload ({ok} succeeded)"
    );

    // Another certificate with the old key: refused, and the second one stays in use.
    let third_pem = ca.issue(&["wiki.test"]);
    std::fs::write(dir.path().join("wiki.pem"), &third_pem.0).unwrap();
    assert!(
        !skua.reload_and_wait(|text| text).await,
        "the reload was refused"
    );
    let resp = fresh_connection().get(&url).send().await.unwrap();
    assert_eq!(served_certificate(&resp), der(&second_pem.0));
}

/// `skua check` refuses what would fail at a handshake or in a browser, naming the key and
/// line: an unreadable file, a key that is not the certificate's, an expired certificate, a
/// configured name the certificate does not cover, and a served host no certificate covers.
#[test]
fn skua_check_names_each_certificate_problem_with_its_key_and_line() {
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let (chain, key) = write_certificate(dir.path(), "good", &ca.issue(&["wiki.test"]));
    let (_, other_key) = write_certificate(dir.path(), "other", &ca.issue(&["wiki.test"]));
    let expired = ca.issue_with(&["wiki.test"], |p| {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    });
    let (expired_chain, expired_key) = write_certificate(dir.path(), "expired", &expired);
    let missing = dir.path().join("missing.pem").display().to_string();
    let cases = [
        (
            &missing,
            &key,
            "",
            "chain",
            "server.tls.certificate[0].chain",
            "cannot read",
        ),
        (
            &chain,
            &other_key,
            "",
            "key",
            "server.tls.certificate[0].key",
            "is not the key of",
        ),
        (
            &expired_chain,
            &expired_key,
            "",
            "chain",
            "server.tls.certificate[0].chain",
            "expired on",
        ),
        (
            &chain,
            &key,
            "names = [\"wiki.test\", \"other.test\"]",
            "names",
            "server.tls.certificate[0].names[1]",
            "\"other.test\" is not a name the certificate covers",
        ),
    ];
    for (chain, key, names, line_of, expected_key, expected) in cases {
        let text = format!(
            "[server]\nlisten = [\"127.0.0.1:{}\"]\n\n[server.tls]\nlisten = [\"127.0.0.1:{}\"]\n\n[[server.tls.certificate]]\nchain = \"{chain}\"\nkey = \"{key}\"\n{names}\n",
            free_port(),
            free_port()
        );
        let line = 1 + text
            .lines()
            .position(|l| l.starts_with(&format!("{line_of} =")))
            .unwrap();
        let (code, stderr) = check(dir.path(), &text);
        assert_eq!(code, Some(78), "{expected_key}: {stderr}");
        assert!(
            stderr.contains(&format!(":{line}: {expected_key}: ")) && stderr.contains(expected),
            "{expected_key} at line {line}, saying {expected:?}:\n{stderr}"
        );
    }
    // A host the cache serves over TLS that no certificate covers.
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:{}\"]\nhosts = [\"wiki.test\", \"other.test\"]\n\n[server.tls]\nlisten = [\"127.0.0.1:{}\"]\n\n[[server.tls.certificate]]\nchain = \"{chain}\"\nkey = \"{key}\"\n",
        free_port(),
        free_port()
    );
    let (code, stderr) = check(dir.path(), &text);
    assert_eq!(code, Some(78), "{stderr}");
    assert!(
        stderr.contains(":3: server.hosts[1]: ") && stderr.contains("no certificate covers it"),
        "{stderr}"
    );
    // An origin pool's CA file that is not there.
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:{}\"]\n\n[[origin]]\nname = \"o\"\naddresses = [\"127.0.0.1:1\"]\n\n[origin.tls]\nca_file = \"{missing}\"\n",
        free_port()
    );
    let (code, stderr) = check(dir.path(), &text);
    assert_eq!(code, Some(78), "{stderr}");
    assert!(
        stderr.contains(":9: origin[0].tls.ca_file: ") && stderr.contains("cannot read"),
        "{stderr}"
    );
    // And the good certificate passes.
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:{}\"]\n\n[server.tls]\nlisten = [\"127.0.0.1:{}\"]\n\n[[server.tls.certificate]]\nchain = \"{chain}\"\nkey = \"{key}\"\n",
        free_port(),
        free_port()
    );
    let (code, stderr) = check(dir.path(), &text);
    assert_eq!(code, Some(0), "{stderr}");
}

/// `skua check --config` on `text` written in `dir`: the exit code and stderr.
fn check(dir: &std::path::Path, text: &str) -> (Option<i32>, String) {
    let path = dir.join("skua.toml");
    std::fs::write(&path, text).unwrap();
    let out = std::process::Command::new(skua_bin())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// TLS 1.2 and 1.3 only, with AEAD suites: a client offering only TLS 1.1, or only a CBC suite,
/// is refused (and counted), while TLS 1.2 and 1.3 clients get through. The refusing side is
/// Skua's: the client is told to offer the old protocol at security level 0.
#[tokio::test]
async fn old_protocols_and_weak_suites_are_refused() {
    if openssl_missing() {
        return;
    }
    let origin = origin_reporting_the_scheme().await;
    let ca = TestCa::new();
    let (skua, _tls_port, tls_addr, _dir) =
        https_skua(&origin, &ca.issue(&["wiki.test"]), "", "").await;
    let s_client = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(["s_client", "-brief", "-connect", &tls_addr.to_string()])
            .args(["-servername", "wiki.test"])
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    };
    let failed = "skua_tls_handshakes_total{result=\"failed\"}";
    let closed = "skua_tls_handshakes_total{result=\"closed\"}";
    // The readiness probe (`wait_listening`: a connection closed without a handshake) is
    // counted as closed, not failed, perhaps a moment later.
    let deadline = Instant::now() + Duration::from_secs(5);
    while skua.metric(closed).await < 1.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(skua.metric(closed).await, 1.0);
    assert_eq!(skua.metric(failed).await, 0.0);
    for (offer, args) in [
        (
            "TLS 1.1",
            &["-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"][..],
        ),
        (
            "a CBC suite",
            &["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA:@SECLEVEL=0"],
        ),
    ] {
        let before = skua.metric(failed).await;
        let (ok, text) = s_client(args);
        assert!(!ok, "{offer} was accepted:\n{text}");
        // The client may be gone before Skua has counted the handshake it refused.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut counted = skua.metric(failed).await;
        while counted < before + 1.0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            counted = skua.metric(failed).await;
        }
        assert_eq!(counted, before + 1.0, "{offer}:\n{text}");
    }
    for (version, flag) in [("TLSv1.2", "-tls1_2"), ("TLSv1.3", "-tls1_3")] {
        let (ok, text) = s_client(&[flag]);
        assert!(
            ok && text.contains(&format!("Protocol version: {version}")),
            "{text}"
        );
    }
}

/// `redirect_http`: a plain-HTTP GET for a listed host is sent to the same path over https
/// (301; 308 for other methods, which keep their body), other hosts are served as before, and
/// MediaWiki's `PURGE http://...` is never redirected: it removes the https copy too.
#[tokio::test]
async fn http_is_redirected_to_https_per_host_and_purges_still_reach_the_https_copy() {
    let origin = origin_reporting_the_scheme().await;
    let ca = TestCa::new();
    let redirect = "redirect_http = [\"wiki.test\"]";
    let (skua, tls_port, tls_addr, _dir) =
        https_skua(&origin, &ca.issue(&["wiki.test"]), redirect, "").await;
    let plain = format!("http://{}/wiki/Page?action=view", skua.addr);
    let to = format!(
        "https://wiki.test:{}/wiki/Page?action=view",
        tls_port.number
    );

    for _ in 0..2 {
        let moved = get(&plain, &[("host", "wiki.test")]).await;
        assert_eq!(moved.status, 301);
        assert_eq!(moved.header("location"), to);
    }
    let posted = send(&client(), "POST", &plain, &[("host", "wiki.test")]).await;
    assert_eq!(posted.status, 308);
    assert_eq!(posted.header("location"), to);
    let other = get(&plain, &[("host", "other.test")]).await;
    assert_eq!(other.status, 200, "hosts not listed are served over http");
    assert_eq!(origin.count("/wiki/Page?action=view"), 1);

    let https = https_client(&ca, &["wiki.test"], tls_addr)
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    assert_eq!(
        https.get(&to).send().await.unwrap().headers()["x-cache-status"],
        "miss"
    );
    assert_eq!(
        https.get(&to).send().await.unwrap().headers()["x-cache-status"],
        "hit-front"
    );
    // The https copy's host has the HTTPS listener's port, as the plain URL must to name it
    // (on 80 and 443 both are plain `wiki.test`).
    let host = format!("wiki.test:{}", tls_port.number);
    let purged = send(&client(), "PURGE", &plain, &[("host", &host)]).await;
    assert_eq!(purged.status, 204, "{}", purged.text());
    assert_eq!(
        https.get(&to).send().await.unwrap().headers()["x-cache-status"],
        "miss"
    );
    assert_eq!(origin.count("/wiki/Page?action=view"), 3);

    // Every request above opened a connection; all but the first resumed its session.
    assert_eq!(
        skua.metric("skua_tls_handshakes_total{result=\"full\"}")
            .await,
        1.0
    );
    assert_eq!(
        skua.metric("skua_tls_handshakes_total{result=\"resumed\"}")
            .await,
        2.0
    );
}

/// An HTTP/2 connection over TLS to `addr` for `name`, trusting `ca`: the request handle, and
/// the task driving the connection (which ends with the connection's error, if any).
async fn h2_connection(
    ca: &TestCa,
    addr: SocketAddr,
    name: &str,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der(&ca.pem).into()).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let server_name = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
    let tls = connector.connect(server_name, tcp).await.unwrap();
    let (send, connection) = h2::client::handshake(tls).await.unwrap();
    (send, tokio::spawn(connection))
}

fn h2_get(url: &str, extra: &[(&str, String)]) -> http::Request<()> {
    let mut req = http::Request::get(url);
    for (name, value) in extra {
        req = req.header(*name, value.as_str());
    }
    req.body(()).unwrap()
}

/// The most streams the server behind `send` lets it open at once, as its SETTINGS say, read
/// after one request has been answered on the connection.
async fn h2_streams_allowed(send: h2::client::SendRequest<bytes::Bytes>, url: &str) -> usize {
    let mut send = send.ready().await.unwrap();
    let (answer, _) = send.send_request(h2_get(url, &[]), true).unwrap();
    assert_eq!(answer.await.unwrap().status(), 200);
    send.current_max_send_streams()
}

/// Regression: `[server.tls] h2_max_concurrent_streams` (and the other HTTP/2 limits) held on
/// the HTTPS listener alone; a client speaking HTTP/2 with prior knowledge to the plain one
/// got pingora's own limits, whatever the configuration said.
#[tokio::test]
async fn http2_limits_hold_on_a_plain_listener_too() {
    let origin = origin_reporting_the_scheme().await;
    let ca = TestCa::new();
    let more = "h2_max_concurrent_streams = 3";
    let (skua, tls_port, tls_addr, _dir) =
        https_skua(&origin, &ca.issue(&["wiki.test"]), more, "").await;
    let (send, _tls_driver) = h2_connection(&ca, tls_addr, "wiki.test").await;
    let url = format!("https://wiki.test:{}/wiki/Streams", tls_port.number);
    assert_eq!(h2_streams_allowed(send, &url).await, 3);
    let tcp = TcpStream::connect(skua.addr).await.unwrap();
    let (send, plain) = h2::client::handshake(tcp).await.unwrap();
    let _plain_driver = tokio::spawn(plain);
    let url = format!("http://wiki.test:{}/wiki/Streams", skua.addr.port());
    assert_eq!(h2_streams_allowed(send, &url).await, 3);
}

/// RFC 9113 §8.2.3: an HTTP/2 client may send each cookie as a field of its own (browsers
/// do, for header compression); an HTTP/1.1 origin must get them as one field joined with
/// "; ". Regression: they went to the origin as two lines, which Apache and PHP join with
/// ", ", so MediaWiki read its session cookie as "abc, theme=dark" and a logged-in reader
/// over HTTP/2 was logged out; and they counted towards `max_headers` one by one.
#[tokio::test]
async fn cookies_sent_as_separate_http2_fields_reach_the_origin_as_one() {
    let origin = Origin::start(|_| Reply::ok("page").header("cache-control", "private")).await;
    let skua = Skua::start(&[origin.addr], "").await;
    let tcp = TcpStream::connect(skua.addr).await.unwrap();
    let (send, plain) = h2::client::handshake(tcp).await.unwrap();
    let _driver = tokio::spawn(plain);
    let mut send = send.ready().await.unwrap();
    let url = format!("http://wiki.test:{}/w/index.php?title=A", skua.addr.port());
    let cookies = [
        ("cookie", "enwiki_session=abc".to_string()),
        ("cookie", "theme=dark".to_string()),
    ];
    let (answer, _) = send.send_request(h2_get(&url, &cookies), true).unwrap();
    assert_eq!(answer.await.unwrap().status(), 200);
    let seen = origin.all_requests();
    let sent: Vec<_> = seen[0].headers.get_all("cookie").iter().collect();
    assert_eq!(sent, ["enwiki_session=abc; theme=dark"]);
    // They count as the one field they become: 150 cookies are not "more than 100 header
    // fields" (regression: 431, where the same request over HTTP/1.1 was served).
    let crumbs = (1..150).map(|i| format!("c{i}=v"));
    let many: Vec<_> = (std::iter::once("enwiki_session=abc".to_string()).chain(crumbs))
        .map(|c| ("cookie", c))
        .collect();
    let mut send = send.ready().await.unwrap();
    let (answer, _) = send.send_request(h2_get(&url, &many), true).unwrap();
    assert_eq!(answer.await.unwrap().status(), 200);
    let seen = origin.all_requests();
    let sent: Vec<_> = seen[1].headers.get_all("cookie").iter().collect();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].as_bytes().split(|b| *b == b';').count(), 150);
}

/// RFC 9110 §9.3.2 and §15.4.5: the answer to HEAD, and a 304, have no content. Regression:
/// over HTTP/2, a HEAD, or a GET whose `If-None-Match` matched, for a page not yet cached
/// (pingora asks the origin with GET and without the client's conditions, to fill the cache)
/// had the page sent after its head as DATA, and the client reset the stream: `curl -I` on an
/// HTTPS page failed with "PROTOCOL_ERROR" until the page was cached.
#[tokio::test]
async fn head_over_http2_is_answered_without_content_and_fills_the_cache() {
    let origin = Origin::start(|_| {
        Reply::ok("the page body")
            .header("cache-control", "max-age=600")
            .header("etag", "\"v1\"")
    })
    .await;
    let skua = Skua::start(&[origin.addr], "").await;
    let tcp = TcpStream::connect(skua.addr).await.unwrap();
    let (send, connection) = h2::client::handshake(tcp).await.unwrap();
    let driver = tokio::spawn(connection);
    let url = |path: &str| format!("http://wiki.test:{}{path}", skua.addr.port());
    let mut answers = Vec::new();
    let (head, get) = (http::Method::HEAD, http::Method::GET);
    for (method, path, condition) in [
        (&head, "/wiki/Head", None),
        (&head, "/wiki/Head", None),
        (&get, "/wiki/Head", None),
        (&get, "/wiki/Cond", Some("\"v1\"")),
        (&get, "/wiki/Cond", None),
    ] {
        let mut req = http::Request::builder().method(method).uri(url(path));
        if let Some(tag) = condition {
            req = req.header("if-none-match", tag);
        }
        let mut send = send.clone().ready().await.unwrap();
        let (answer, _) = send.send_request(req.body(()).unwrap(), true).unwrap();
        let answer = answer.await.unwrap();
        let status = answer.status().as_u16();
        let mut body = answer.into_body();
        let mut content = Vec::new();
        while let Some(chunk) = body.data().await {
            content.extend_from_slice(&chunk.unwrap());
        }
        answers.push((
            method.clone(),
            path,
            status,
            String::from_utf8(content).unwrap(),
        ));
    }
    assert_eq!(
        answers,
        [
            (head.clone(), "/wiki/Head", 200, String::new()),
            (head.clone(), "/wiki/Head", 200, String::new()),
            (get.clone(), "/wiki/Head", 200, "the page body".into()),
            (get.clone(), "/wiki/Cond", 304, String::new()),
            (get.clone(), "/wiki/Cond", 200, "the page body".into()),
        ]
    );
    // The first HEAD, and the conditional GET, filled the cache: the GETs after were hits.
    assert_eq!(origin.count("/wiki/Head"), 1);
    assert_eq!(origin.count("/wiki/Cond"), 1);
    assert!(!driver.is_finished(), "the connection was closed");
}

/// A HEAD for a gzip page not yet cached, from a client that takes no encoding: the GET's
/// head, decoded (no `Content-Encoding`), and no content, over HTTP/2 and HTTP/1.1 (through
/// pingora's path: the front door fills GETs only). Regression (of the fix above, before it
/// landed): the body was dropped before the decoder, which then found the gzip stream cut
/// short and answered 502.
#[tokio::test]
async fn head_for_a_gzip_page_not_yet_cached_is_answered_decoded_without_content() {
    let page = gzip(&"<p>A wiki page.</p>\n".repeat(100));
    let origin = Origin::start(move |_| {
        Reply::ok(page.clone())
            .header("cache-control", "max-age=600")
            .header("content-type", "text/html")
            .header("content-encoding", "gzip")
            .header("vary", "Accept-Encoding")
    })
    .await;
    let skua = Skua::start(&[origin.addr], "").await;
    let tcp = TcpStream::connect(skua.addr).await.unwrap();
    let (send, connection) = h2::client::handshake(tcp).await.unwrap();
    let _driver = tokio::spawn(connection);
    let req = http::Request::head(format!("http://wiki.test:{}/wiki/Gz2", skua.addr.port()))
        .header("accept-encoding", "identity")
        .body(())
        .unwrap();
    let mut send = send.ready().await.unwrap();
    let (answer, _) = send.send_request(req, true).unwrap();
    let answer = answer.await.unwrap();
    assert_eq!(answer.status(), 200);
    assert!(!answer.headers().contains_key("content-encoding"));
    let mut body = answer.into_body();
    while let Some(chunk) = body.data().await {
        assert!(chunk.unwrap().is_empty(), "content in a HEAD answer");
    }
    let answer = raw(
        skua.addr,
        "HEAD /wiki/Gz1 HTTP/1.1\r\nHost: wiki.test\r\nAccept-Encoding: identity\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert!(
        !answer.to_ascii_lowercase().contains("content-encoding"),
        "{answer}"
    );
    assert!(answer.ends_with("\r\n\r\n"), "{answer}");
    // What the HEAD filled is the whole page: a GET is a hit, decoded.
    let got = raw(
        skua.addr,
        // HTTP/1.0: the decoded body unframed, to compare.
        "GET /wiki/Gz1 HTTP/1.0\r\nHost: wiki.test\r\nAccept-Encoding: identity\r\n\r\n",
    )
    .await;
    assert!(got.contains("x-cache-status: hit"), "{got}");
    assert!(got.ends_with(&"<p>A wiki page.</p>\n".repeat(100)), "{got}");
    assert_eq!(origin.count("/wiki/Gz1"), 1);
}

/// The 2023 "rapid reset" attack (CVE-2023-44487): a client opens streams and cancels each at
/// once, as fast as it can. Skua closes such a connection (the streams it had to reset pass
/// the per-connection limit, `H2_MAX_LOCAL_RESETS` in `server.rs`), hardly any cancelled
/// request reaches the origin, and another client's requests are answered meanwhile, promptly.
#[tokio::test]
async fn http2_rapid_reset_is_cut_off_without_harm_to_other_clients() {
    let origin = origin_reporting_the_scheme().await;
    let ca = TestCa::new();
    let (skua, tls_port, tls_addr, _dir) =
        https_skua(&origin, &ca.issue(&["wiki.test"]), "", "").await;
    let url = format!("https://wiki.test:{}/wiki/Reset", tls_port.number);

    let attack = tokio::spawn({
        let (ca_pem, url) = (ca.pem.clone(), url.clone());
        async move {
            let ca = TestCa::from_pem(&ca_pem);
            let (mut send, driver) = h2_connection(&ca, tls_addr, "wiki.test").await;
            let mut opened = 0u32;
            for i in 0..20_000u32 {
                let ready = match send.ready().await {
                    Ok(ready) => ready,
                    Err(_) => break,
                };
                send = ready;
                let req = h2_get(&format!("{url}?{i}"), &[]);
                match send.send_request(req, true) {
                    Ok((_, mut stream)) => {
                        stream.send_reset(h2::Reason::CANCEL);
                        opened += 1;
                    }
                    Err(_) => break,
                }
            }
            let ended = tokio::time::timeout(Duration::from_secs(10), driver).await;
            (opened, ended)
        }
    });
    let started = Instant::now();
    let client = https_client(&ca, &["wiki.test"], tls_addr).build().unwrap();
    let mut slowest = Duration::ZERO;
    while !attack.is_finished() && started.elapsed() < Duration::from_secs(20) {
        let asked = Instant::now();
        let resp = client.get(&url).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        slowest = slowest.max(asked.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (opened, ended) = attack.await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let reached = origin.count_starting("/wiki/Reset?");
    // The client queues its 20,000 streams faster than any server can answer; Skua's side ends
    // the connection (GOAWAY, then close), rather than serving them.
    assert!(
        matches!(ended, Ok(Ok(Err(_)))),
        "Skua closed the attacking connection ({opened} streams sent): {ended:?}"
    );
    // Streams whose reset Skua has read before their turn never start; those that started
    // before it (up to about a hundred, what one read of the connection brings) may reach the
    // origin first.
    assert!(
        reached < 256,
        "{reached} cancelled requests reached the origin"
    );
    assert!(
        slowest < Duration::from_secs(1),
        "another client waited {slowest:?}"
    );
    // Nor does the attack fill the operator's log: a line per cancelled stream would let any
    // client write to it as fast as it can send.
    let logged = skua.log();
    let errors = logged.lines().filter(|l| l.contains("ERROR")).count();
    assert!(errors < 5, "{errors} error lines:\n{logged}");
}

/// Regression: a client could cancel each request just after Skua took it up and send the
/// next, on one HTTP/2 connection. A cancelled request's origin work goes on (an origin does
/// not stop rendering a page when its client leaves), so one connection kept any number of
/// requests working at the origins, whatever `h2_max_concurrent_streams` says (release
/// build: 488 at once from 500 requests). Now a connection that cancels more than
/// `[server.tls] h2_max_rapid_resets` (default 100) before their answers began is closed
/// with ENHANCE_YOUR_CALM, counted; a client that reads its answers is never closed, and the
/// attacker's next connection is served.
#[tokio::test]
async fn an_http2_client_cancelling_requests_it_sent_is_closed_past_h2_max_rapid_resets() {
    let origin = Origin::start(|seen| {
        let reply = Reply::ok("page").header("cache-control", "max-age=600");
        if seen.path.starts_with("/slow/") {
            reply.delay(Duration::from_secs(3))
        } else {
            reply
        }
    })
    .await;
    let skua = Skua::start(&[origin.addr], "").await;
    let connect = || async {
        let tcp = TcpStream::connect(skua.addr).await.unwrap();
        let (send, connection) = h2::client::handshake(tcp).await.unwrap();
        (send, tokio::spawn(connection))
    };
    let url = |path: String| format!("http://wiki.test:{}{path}", skua.addr.port());
    let get = |path: String| http::Request::get(url(path)).body(()).unwrap();
    // More requests than the limit, each answered and read: nothing to count.
    let (mut send, reader) = connect().await;
    for i in 0..150 {
        send = send.ready().await.unwrap();
        let (answer, _) = send.send_request(get(format!("/read/{i}")), true).unwrap();
        let mut body = answer.await.unwrap().into_body();
        while let Some(chunk) = body.data().await {
            chunk.unwrap();
        }
    }
    assert!(
        !reader.is_finished(),
        "a client reading its answers was closed"
    );
    // Each request cancelled once the origin has it.
    let (mut send, attacker) = connect().await;
    let mut sent = 0;
    let mut refused = None;
    for i in 0..300 {
        send = match send.ready().await {
            Ok(send) => send,
            Err(e) => {
                refused = Some(e);
                break;
            }
        };
        let path = format!("/slow/{i}");
        let (_answer, mut stream) = match send.send_request(get(path.clone()), true) {
            Ok(sent) => sent,
            Err(e) => {
                refused = Some(e);
                break;
            }
        };
        sent += 1;
        wait_until("the origin has the request, or Skua closed", || {
            origin.count(&path) == 1 || attacker.is_finished()
        })
        .await;
        stream.send_reset(h2::Reason::CANCEL);
    }
    let reason = refused.as_ref().and_then(|e| e.reason());
    assert_eq!(
        reason,
        Some(h2::Reason::ENHANCE_YOUR_CALM),
        "{sent} requests sent and cancelled: {refused:?}"
    );
    let reached = origin.count_starting("/slow/");
    assert!(
        reached <= 110,
        "{reached} cancelled requests reached the origin"
    );
    assert_eq!(
        skua.metric(r#"skua_connections_refused_total{reason="h2_rapid_resets"}"#)
            .await,
        1.0
    );
    let (mut send, _) = connect().await;
    send = send.ready().await.unwrap();
    let (answer, _) = send.send_request(get("/read/again".into()), true).unwrap();
    assert_eq!(answer.await.unwrap().status(), 200);
}

/// The same when the origin is at its `max_connections`: a cancelled request waits for a place
/// (Skua cannot see the cancel meanwhile), then reaches the origin all the same. Regression:
/// only cancels seen within a second of the request counted, so while the origin was busy
/// (when its work matters most) a client could cancel without end.
#[tokio::test]
async fn requests_cancelled_while_waiting_for_a_busy_origin_count_as_rapid_resets() {
    let origin = Origin::start(|seen| {
        let reply = Reply::ok("page").header("cache-control", "no-store");
        reply.delay(Duration::from_millis(if seen.path == "/hold" {
            4000
        } else {
            300
        }))
    })
    .await;
    let skua = Skua::start_tables(
        &[origin.addr],
        ["", "max_connections = 1\nconnect_timeout = \"20s\"", ""],
        "",
    )
    .await;
    // A reader holds the origin's one place for 4 s.
    let hold = skua.url("/hold");
    let held = tokio::spawn(async move { get(&hold, &[]).await });
    wait_until("the origin has the reader's request", || {
        origin.count("/hold") == 1
    })
    .await;
    let tcp = TcpStream::connect(skua.addr).await.unwrap();
    let (mut send, connection) = h2::client::handshake(tcp).await.unwrap();
    let attacker = tokio::spawn(connection);
    let get_slow = |i: usize| {
        let url = format!("http://wiki.test:{}/slow/{i}", skua.addr.port());
        http::Request::get(url).body(()).unwrap()
    };
    // 200 requests, each cancelled once Skua has taken it up (a loaded machine may take one up
    // after its cancel: it then costs nothing and is not counted); they wait for the place.
    for i in 0..200 {
        send = send.ready().await.unwrap();
        let (_answer, mut stream) = send.send_request(get_slow(i), true).unwrap();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            stream.send_reset(h2::Reason::CANCEL);
        });
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(held.await.unwrap().status, 200);
    // One at a time (a loaded machine takes a while), longer than `wait_until` allows.
    let reached = tokio::time::timeout(Duration::from_secs(60), async {
        while origin.count_starting("/slow/") <= 100 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        reached.is_ok(),
        "{} cancelled requests reached the origin",
        origin.count_starting("/slow/")
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Each of them reached the origin more than a second after it was sent.
    let next = async {
        let mut send = send.ready().await?;
        let (answer, _) = send.send_request(get_slow(1000), true)?;
        answer.await.map(|_| ())
    };
    let refused = tokio::time::timeout(Duration::from_secs(5), next).await;
    assert!(matches!(refused, Ok(Err(_))), "{refused:?}");
    let closed = tokio::time::timeout(Duration::from_secs(5), attacker).await;
    let reason = match &closed {
        Ok(Ok(Err(e))) => e.reason(),
        _ => None,
    };
    assert_eq!(reason, Some(h2::Reason::ENHANCE_YOUR_CALM), "{closed:?}");
    assert_eq!(
        skua.metric(r#"skua_connections_refused_total{reason="h2_rapid_resets"}"#)
            .await,
        1.0
    );
}

/// A request whose header list is larger than `[server] max_header_bytes` allows is refused
/// over HTTP/2 as over HTTP/1.1 (431, or the stream reset), never reaches the origin, and the
/// next requests are served.
#[tokio::test]
async fn http2_refuses_an_oversized_header_list() {
    let origin = origin_reporting_the_scheme().await;
    let ca = TestCa::new();
    let (_skua, tls_port, tls_addr, _dir) =
        https_skua(&origin, &ca.issue(&["wiki.test"]), "", "").await;
    let url = format!("https://wiki.test:{}/wiki/Big", tls_port.number);
    let (send, _driver) = h2_connection(&ca, tls_addr, "wiki.test").await;
    let mut send = send.ready().await.unwrap();
    let big = [("x-big", "a".repeat(100_000))];
    let (resp, _) = send.send_request(h2_get(&url, &big), true).unwrap();
    match resp.await {
        Ok(resp) => assert_eq!(resp.status(), 431),
        Err(e) => assert!(e.is_reset() || e.is_go_away(), "{e:?}"),
    }
    assert_eq!(origin.count("/wiki/Big"), 0);
    let client = https_client(&ca, &["wiki.test"], tls_addr).build().unwrap();
    let resp = client.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(origin.count("/wiki/Big"), 1);
}

/// `[origin.tls]`: an HTTPS origin (here another Skua terminating TLS in front of a plain one)
/// is reached with the request's host as its name, verified against `ca_file`, over HTTP/2
/// when it offers it. A certificate for another name is a clear 502 and a counted origin
/// error, never a plain-HTTP retry; `verify = false`, said explicitly, accepts it.
#[tokio::test]
async fn https_origins_are_verified_and_a_wrong_certificate_is_a_502() {
    let origin = origin_reporting_the_scheme().await;
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let front_of = |addr: SocketAddr, tls: String| async move {
        Skua::start_tables(&[addr], ["", &format!("[origin.tls]\n{tls}"), ""], "").await
    };
    let ca_line = format!("ca_file = \"{}\"\n", ca_file.display());

    let (right, _, right_addr, _right_dir) =
        https_skua(&origin, &ca.issue(&["wiki.test"]), "", "").await;
    let front = front_of(right_addr, ca_line.clone()).await;
    let got = get(&front.url("/wiki/Secure"), &[("host", "wiki.test")]).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.text(), "proto https");
    assert_eq!(
        right.metric("skua_tls_http2_connections_total").await,
        1.0,
        "the origin was reached over HTTP/2"
    );
    assert_eq!(origin.count("/wiki/Secure"), 1);

    let (_wrong, _, wrong_addr, _wrong_dir) =
        https_skua(&origin, &ca.issue(&["other.test"]), "", "").await;
    let front = front_of(wrong_addr, ca_line.clone()).await;
    let got = get(&front.url("/wiki/Wrong"), &[("host", "wiki.test")]).await;
    assert_eq!(got.status, 502);
    assert!(
        got.text().contains("TLS to the origin failed"),
        "{}",
        got.text()
    );
    assert_eq!(
        origin.count("/wiki/Wrong"),
        0,
        "nothing went out in plain text"
    );
    let errors = front.metrics().await;
    assert!(
        errors.lines().any(|l| l
            .starts_with("skua_origin_errors_total{kind=\"InvalidCert\",pool=\"test\"}")
            || l.starts_with(
                "skua_origin_errors_total{kind=\"TLSHandshakeFailure\",pool=\"test\"}"
            )),
        "{errors}"
    );

    let front = front_of(wrong_addr, format!("{ca_line}verify = false\n")).await;
    let got = get(&front.url("/wiki/Unverified"), &[("host", "wiki.test")]).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(origin.count("/wiki/Unverified"), 1);
}

/// Over HTTP/2, what a client does over HTTP/1.1: a miss, a hit, HEAD, a Range request, and a
/// PURGE (sent over HTTP/2 too) after which the next request is a miss.
#[tokio::test]
async fn http2_serves_head_range_and_purge_like_http11() {
    let origin = Origin::start(|_| {
        Reply::ok("0123456789 a page of the wiki")
            .header("cache-control", "max-age=600")
            .header("etag", "\"v1\"")
    })
    .await;
    let ca = TestCa::new();
    let (_skua, tls_port, tls_addr, _dir) =
        https_skua(&origin, &ca.issue(&["wiki.test"]), "", "").await;
    let url = format!("https://wiki.test:{}/wiki/H2", tls_port.number);
    let h2 = https_client(&ca, &["wiki.test"], tls_addr).build().unwrap();
    let send = |method: &str, headers: &[(&str, &str)]| {
        let mut req = h2.request(
            reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
            &url,
        );
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send()
    };
    let miss = send("GET", &[]).await.unwrap();
    assert_eq!(miss.version(), reqwest::Version::HTTP_2);
    assert_eq!(miss.headers()["x-cache-status"], "miss");
    assert_eq!(miss.text().await.unwrap(), "0123456789 a page of the wiki");
    let head = send("HEAD", &[]).await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["x-cache-status"], "hit-front");
    assert_eq!(head.headers()["content-length"], "29");
    assert_eq!(head.text().await.unwrap(), "");
    let range = send("GET", &[("range", "bytes=0-3")]).await.unwrap();
    assert_eq!(range.status(), 206);
    assert_eq!(range.headers()["content-range"], "bytes 0-3/29");
    assert_eq!(range.text().await.unwrap(), "0123");
    let purge = send("PURGE", &[]).await.unwrap();
    assert_eq!(purge.status(), 204);
    let after = send("GET", &[]).await.unwrap();
    assert_eq!(after.headers()["x-cache-status"], "miss");
    assert_eq!(origin.count("/wiki/H2"), 2);
}

/// A second Skua whose HTTPS address is taken does not start, and says which key.
#[tokio::test]
async fn a_taken_https_address_is_refused_naming_its_key() {
    let origin = origin_reporting_the_scheme().await;
    let ca = TestCa::new();
    let pem = ca.issue(&["wiki.test"]);
    let (_skua, _tls_port, tls_addr, dir) = https_skua(&origin, &pem, "", "").await;
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:{}\"]\nadmin = \"\"\n\n[server.tls]\nlisten = [\"{tls_addr}\"]\n\n[[server.tls.certificate]]\nchain = \"{}\"\nkey = \"{}\"\n",
        free_port(),
        dir.path().join("wiki.pem").display(),
        dir.path().join("wiki.key").display(),
    );
    let path = dir.path().join("second.toml");
    std::fs::write(&path, text).unwrap();
    let stderr = serve_refused(&path);
    assert!(
        stderr.contains(&format!("server.tls.listen: cannot listen on {tls_addr}")),
        "{stderr}"
    );
}

/// Regression: a hit the front door answered with `Connection: close` ended the TLS connection
/// without close_notify, which OpenSSL clients report as "unexpected eof" (RFC 8446 §6.1).
#[tokio::test]
async fn a_closed_https_connection_ends_with_close_notify() {
    if openssl_missing() {
        return;
    }
    let origin = origin_reporting_the_scheme().await;
    let ca = TestCa::new();
    let (_skua, _tls_port, tls_addr, _dir) =
        https_skua(&origin, &ca.issue(&["wiki.test"]), "", "").await;
    let request = "GET /wiki/Closing HTTP/1.1\r\nHost: wiki.test\r\nConnection: close\r\n\r\n";
    for expected in ["miss", "hit-front"] {
        // Off the test's runtime thread, which the origin runs on.
        let out = tokio::task::spawn_blocking(move || {
            let mut child = std::process::Command::new("openssl")
                .args([
                    "s_client",
                    "-quiet",
                    "-ign_eof",
                    "-connect",
                    &tls_addr.to_string(),
                ])
                .args(["-servername", "wiki.test"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let mut stdin = child.stdin.take().unwrap();
            std::io::Write::write_all(&mut stdin, request.as_bytes()).unwrap();
            drop(stdin);
            child.wait_with_output().unwrap()
        })
        .await
        .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            text.contains(&format!("x-cache-status: {expected}")),
            "{text}"
        );
        assert!(!text.contains("unexpected eof"), "{expected}:\n{text}");
    }
}

/// An HTTP/2 connection with no stream running is closed after `[server] keepalive_timeout`,
/// as an HTTP/1.1 one is (pingora's own HTTP/2 loop kept it open forever); one whose stream
/// outlasts the timeout is not cut while the stream runs.
#[tokio::test]
async fn an_idle_http2_connection_is_closed_after_the_keepalive_timeout() {
    let origin = Origin::start(|seen| {
        let reply = Reply::ok("page").header("cache-control", "max-age=600");
        if seen.path.contains("slow") {
            reply.delay(Duration::from_millis(1800))
        } else {
            reply
        }
    })
    .await;
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let cert = write_certificate(dir.path(), "wiki", &ca.issue(&["wiki.test"]));
    let tls_port = Port::reserve();
    let server = format!(
        "keepalive_timeout = \"1s\"\n{}",
        tls_lines(&tls_port, &[cert], "")
    );
    let _skua = Skua::start_tables(&[origin.addr], [&server, "", ""], "").await;
    let tls_addr: SocketAddr = format!("127.0.0.1:{}", tls_port.number).parse().unwrap();
    wait_listening(tls_addr).await;

    let (mut send, driver) = h2_connection(&ca, tls_addr, "wiki.test").await;
    let slow = format!("https://wiki.test:{}/wiki/slow", tls_port.number);
    let (response, _) = send.send_request(h2_get(&slow, &[]), true).unwrap();
    let response = response
        .await
        .expect("a stream running past the timeout is answered");
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    assert_eq!(body.data().await.unwrap().unwrap(), "page");

    let idle_from = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(5), driver).await;
    assert!(ended.is_ok(), "the idle connection was closed");
    let idle = idle_from.elapsed();
    assert!(
        idle >= Duration::from_millis(800),
        "closed after {idle:?} idle, before the 1 s timeout"
    );
}

/// `skua serve --upgrade` hands the HTTPS listener over with the plain one, and the new
/// process serves the certificate now in the files: how an operator deploys a renewed
/// certificate together with a new binary.
#[tokio::test]
async fn an_upgrade_hands_over_the_https_listener_with_the_certificate_now_in_the_files() {
    let origin = origin_reporting_the_scheme().await;
    let ca = TestCa::new();
    let first = ca.issue(&["wiki.test"]);
    let (mut old, tls_port, tls_addr, dir) = https_skua(&origin, &first, "", "").await;
    let url = format!("https://wiki.test:{}/wiki/Page", tls_port.number);
    let fresh_client = || {
        https_client(&ca, &["wiki.test"], tls_addr)
            .pool_max_idle_per_host(0)
            .build()
            .unwrap()
    };
    let before = fresh_client().get(&url).send().await.unwrap();
    assert_eq!(served_certificate(&before), der(&first.0));

    let renewed = ca.issue(&["wiki.test"]);
    write_certificate(dir.path(), "wiki", &renewed);
    let mut new = old.upgrade_in_place().await;

    let after = fresh_client().get(&url).send().await;
    let _ = new.kill();
    let _ = new.wait();
    let after = after.expect("the new process answers on the HTTPS port");
    assert_eq!(after.status(), 200);
    assert_eq!(served_certificate(&after), der(&renewed.0));
}

/// Over HTTP/2 as over HTTP/1.1 (`fill::a_hit_is_answered_alike_by_the_front_door_and_pingoras_path`):
/// a stored object answers a request alike whether the front door takes the stream at accept
/// or pingora's HTTP/2 session does (`TE: trailers`, the one `TE` HTTP/2 allows, sends a
/// stream there) — same status, fields and body, and the same requests at the origin.
#[tokio::test]
async fn an_http2_hit_is_answered_alike_by_the_front_door_and_pingoras_path() {
    let origin = Origin::start(|seen| {
        let kind = seen.path.split('/').nth(1).unwrap_or("");
        match kind {
            "page" => Reply::ok("0123456789")
                .header("cache-control", "max-age=600")
                .header("etag", "\"v1\"")
                .header("last-modified", "Thu, 01 Jan 2026 00:00:00 GMT")
                .header("x-multi", "a")
                .header("x-multi", "b"),
            "html" => Reply::ok("<p>wiki wiki wiki wiki wiki wiki wiki</p>")
                .header("cache-control", "max-age=600")
                .header("etag", "\"h1\"")
                .header("content-type", "text/html; charset=utf-8"),
            "vary" => Reply::ok("page")
                .header("cache-control", "max-age=600")
                .header("vary", "Accept-Language")
                .header("etag", "\"l1\""),
            _ => Reply::ok("").status(404),
        }
    })
    .await;
    let ca = TestCa::new();
    let (skua, tls_port, tls_addr, _dir) =
        https_skua(&origin, &ca.issue(&["wiki.test"]), "", "").await;
    let (mut send, _connection) = h2_connection(&ca, tls_addr, "wiki.test").await;
    // (object kind, method, request fields)
    type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)]);
    let cases: &[Case] = &[
        ("page", "GET", &[]),
        ("page", "HEAD", &[]),
        ("page", "GET", &[("if-none-match", "\"v1\"")]),
        ("page", "HEAD", &[("if-none-match", "\"v1\"")]),
        ("page", "GET", &[("if-none-match", "W/\"v1\"")]),
        ("page", "GET", &[("if-none-match", "\"v0\"")]),
        ("page", "GET", &[("if-none-match", "*")]),
        (
            "page",
            "GET",
            &[("if-modified-since", "Fri, 02 Jan 2026 00:00:00 GMT")],
        ),
        (
            "page",
            "GET",
            &[("if-modified-since", "Wed, 31 Dec 2025 00:00:00 GMT")],
        ),
        ("page", "GET", &[("range", "bytes=0-3")]),
        ("page", "HEAD", &[("range", "bytes=0-3")]),
        ("page", "GET", &[("range", "bytes=-3")]),
        ("page", "GET", &[("range", "bytes=20-30")]),
        ("page", "GET", &[("range", "bytes=x")]),
        (
            "page",
            "GET",
            &[("range", "bytes=0-3"), ("if-range", "\"v0\"")],
        ),
        ("page", "GET", &[("cache-control", "no-cache")]),
        ("page", "GET", &[("cache-control", "max-age=0")]),
        ("page", "GET", &[("pragma", "no-cache")]),
        ("page", "GET", &[("cache-control", "only-if-cached")]),
        ("page", "GET", &[("authorization", "Bearer secret")]),
        ("page", "GET", &[("cookie", "session=1")]),
        ("html", "GET", &[("accept-encoding", "gzip")]),
        ("html", "GET", &[("accept-encoding", "gzip, br")]),
        ("vary", "GET", &[]),
        ("vary", "GET", &[("accept-language", "fr")]),
        ("vary", "GET", &[("if-none-match", "\"l1\"")]),
    ];
    let mut differences = Vec::new();
    for (i, (kind, method, fields)) in cases.iter().enumerate() {
        let mut answers = Vec::new();
        for which in ["front", "full"] {
            let url = format!("https://wiki.test:{}/{kind}/{i}/{which}", tls_port.number);
            let path = format!("/{kind}/{i}/{which}");
            let mut requests: Vec<(&str, Vec<(&str, &str)>)> = vec![("GET", vec![])];
            let mut asked = fields.to_vec();
            if which == "full" {
                asked.push(("te", "trailers"));
            }
            requests.push((method, asked));
            let mut last = None;
            let mut front_door_hits = 0;
            for (method, fields) in requests {
                front_door_hits = skua.hit_paths().await[0];
                let mut req = http::Request::builder().method(method).uri(&url);
                for (name, value) in fields {
                    req = req.header(name, value);
                }
                let (response, _) = send.send_request(req.body(()).unwrap(), true).unwrap();
                let response = response.await.unwrap();
                let status = response.status().as_u16();
                let fields: Vec<String> = (response.headers().iter())
                    .filter(|(name, _)| !matches!(name.as_str(), "date" | "age"))
                    .map(|(name, value)| {
                        // `ttl=599` or `ttl=600`, by when the second turned.
                        let value = String::from_utf8_lossy(value.as_bytes());
                        let value: Vec<&str> = value
                            .split("; ")
                            .filter(|p| !p.starts_with("ttl="))
                            .collect();
                        format!("{name}: {}", value.join("; "))
                    })
                    .collect();
                let mut body = response.into_body();
                let mut bytes = Vec::new();
                while let Some(chunk) = body.data().await {
                    let chunk = chunk.unwrap();
                    let _ = body.flow_control().release_capacity(chunk.len());
                    bytes.extend_from_slice(&chunk);
                }
                last = Some((status, fields, bytes));
            }
            let front_door_answered = skua.hit_paths().await[0] > front_door_hits;
            assert!(
                !(which == "full" && front_door_answered)
                    && (i > 0 || which == "full" || front_door_answered),
                "{i} {which}: the front door answered? {front_door_answered}"
            );
            answers.push((last.unwrap(), origin.count(&path)));
        }
        if answers[0] != answers[1] {
            differences.push(format!(
                "{i}: {kind} {method} {fields:?}\n  front door {:?}\n  pingora    {:?}",
                answers[0], answers[1]
            ));
        }
    }
    assert!(differences.is_empty(), "{}", differences.join("\n"));
}

/// `[server.tls] proxy_protocol_listen`: a balancer that passes TLS through (an AWS Network
/// Load Balancer, HAProxy in TCP mode) opens the connection with a PROXY header, then the
/// client's own handshake follows; Skua terminates it and takes the header's client.
#[tokio::test]
async fn https_behind_a_balancer_takes_the_proxy_headers_client() {
    let origin = origin_reporting_the_scheme().await;
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let cert = write_certificate(dir.path(), "wiki", &ca.issue(&["wiki.test"]));
    let (tls_port, balanced_port) = (Port::reserve(), Port::reserve());
    let more = format!(
        "proxy_protocol_listen = [\"127.0.0.1:{}\"]",
        balanced_port.number
    );
    let lines = format!(
        "trusted_proxies = [\"127.0.0.1/32\"]\n{}",
        tls_lines(&tls_port, &[cert], &more)
    );
    let _skua = Skua::start_tables(&[origin.addr], [&lines, "", ""], "").await;
    let balanced: SocketAddr = format!("127.0.0.1:{}", balanced_port.number)
        .parse()
        .unwrap();
    wait_listening(balanced).await;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(der(&ca.pem).into()).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let mut tcp = TcpStream::connect(balanced).await.unwrap();
    tcp.write_all(b"PROXY TCP4 203.0.113.9 127.0.0.1 40001 443\r\n")
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("wiki.test").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(b"GET /wiki/Page HTTP/1.1\r\nHost: wiki.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.contains(" 200 OK\r\n"), "{answer}");
    assert!(answer.ends_with("proto https"), "{answer}");
    let seen = &origin.requests("/wiki/Page")[0];
    assert_eq!(seen.header("x-forwarded-for"), Some("203.0.113.9"));
}

/// `[server] max_body_bytes` over HTTP/2: a declared length over it gets 413 before the
/// origin is asked, and a stream whose DATA frames pass it is answered 413 as they arrive; the
/// connection's other streams go on.
#[tokio::test]
async fn http2_bodies_over_max_body_bytes_get_413() {
    let origin = Origin::start(|_| Reply::ok("stored").header("cache-control", "no-store")).await;
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let cert = write_certificate(dir.path(), "wiki", &ca.issue(&["wiki.test"]));
    let tls_port = Port::reserve();
    let lines = format!(
        "max_body_bytes = 1000\n{}",
        tls_lines(&tls_port, &[cert], "")
    );
    let _skua = Skua::start_tables(&[origin.addr], [&lines, "", ""], "").await;
    let tls_addr: SocketAddr = format!("127.0.0.1:{}", tls_port.number).parse().unwrap();
    wait_listening(tls_addr).await;
    let url = format!("https://wiki.test:{}/upload", tls_port.number);
    let (send, _connection) = h2_connection(&ca, tls_addr, "wiki.test").await;
    let mut send = send.ready().await.unwrap();

    let declared = http::Request::post(&url)
        .header("content-length", "5000")
        .body(())
        .unwrap();
    let (response, mut body) = send.send_request(declared, false).unwrap();
    let _ = body.send_data(bytes::Bytes::from(vec![b'd'; 1000]), false);
    assert_eq!(response.await.unwrap().status(), 413);

    let mut send = send.ready().await.unwrap();
    let streamed = http::Request::post(&url).body(()).unwrap();
    let (response, mut body) = send.send_request(streamed, false).unwrap();
    for _ in 0..3 {
        let _ = body.send_data(bytes::Bytes::from(vec![b's'; 600]), false);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = body.send_data(bytes::Bytes::new(), true);
    assert_eq!(response.await.unwrap().status(), 413);

    let mut send = send.ready().await.unwrap();
    let small = http::Request::post(&url).body(()).unwrap();
    let (response, mut body) = send.send_request(small, false).unwrap();
    body.send_data(bytes::Bytes::from(vec![b'k'; 900]), true)
        .unwrap();
    assert_eq!(
        response.await.unwrap().status(),
        200,
        "the same connection goes on"
    );
    let seen = origin.requests("/upload");
    assert!(
        seen.iter().all(|s| s.body.len() < 1200),
        "a body over the limit reached the origin whole"
    );
    assert!(seen.iter().any(|s| s.body.len() == 900));
}

/// A large hit read slowly over HTTP/2 arrives whole, however long it takes past the idle
/// (keep-alive) timeout, while the client keeps reading; a client that stops reading one is
/// closed after the idle timeout and `send_timeout`. Regression: the slow reader's answer was
/// cut off at the idle timeout (60 s by default), because the front door hands HTTP/2 answers
/// to the `h2` crate whole and the connection looked idle.
#[tokio::test]
async fn a_slow_http2_download_of_a_hit_is_not_cut_by_the_idle_timeout() {
    const SIZE: usize = 2 << 20;
    let origin =
        Origin::start(|_| Reply::ok(vec![b'h'; SIZE]).header("cache-control", "max-age=600")).await;
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let cert = write_certificate(dir.path(), "wiki", &ca.issue(&["wiki.test"]));
    let tls_port = Port::reserve();
    let lines = format!(
        "keepalive_timeout = \"1s\"\nsend_timeout = \"1s\"\n{}",
        tls_lines(&tls_port, &[cert], "")
    );
    let _skua = Skua::start_tables(&[origin.addr], [&lines, "", ""], "").await;
    let tls_addr: SocketAddr = format!("127.0.0.1:{}", tls_port.number).parse().unwrap();
    wait_listening(tls_addr).await;
    let url = format!("https://wiki.test:{}/big", tls_port.number);
    let (send, _connection) = h2_connection(&ca, tls_addr, "wiki.test").await;
    for round in 0..2 {
        let mut send = send.clone().ready().await.unwrap();
        let (response, _) = send.send_request(h2_get(&url, &[]), true).unwrap();
        let response = response.await.unwrap();
        assert_eq!(response.status(), 200);
        let hit = response.headers()["x-cache-status"]
            .to_str()
            .unwrap()
            .to_string();
        let mut body = response.into_body();
        let mut got = 0;
        let started = std::time::Instant::now();
        while let Some(chunk) = body.data().await {
            let chunk = chunk
                .unwrap_or_else(|e| panic!("round {round} ({hit}): cut after {got} bytes: {e}"));
            got += chunk.len();
            let _ = body.flow_control().release_capacity(chunk.len());
            if round == 1 {
                tokio::time::sleep(Duration::from_millis(60)).await;
            }
        }
        assert_eq!(got, SIZE, "round {round} ({hit})");
        if round == 1 {
            assert_eq!(hit, "hit-front");
            assert!(
                started.elapsed() > Duration::from_secs(2),
                "{:?}",
                started.elapsed()
            );
        }
    }

    let (stopped, connection) = h2_connection(&ca, tls_addr, "wiki.test").await;
    let mut stopped = stopped.ready().await.unwrap();
    let (response, _) = stopped.send_request(h2_get(&url, &[]), true).unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.headers()["x-cache-status"], "hit-front");
    let _unread = response.into_body();
    let closed = tokio::time::timeout(Duration::from_secs(6), connection).await;
    assert!(
        closed.is_ok(),
        "a client that stopped reading kept its connection"
    );
}

/// A drained node (`POST /drain` on the admin port) answers an HTTP/2 client's stream and
/// then sends GOAWAY, so that the client's next requests go through its load balancer to
/// another node (the HTTP/1.1 side, `Connection: close`, is in `purge::an_operator_drains…`).
#[tokio::test]
async fn a_drained_node_answers_then_ends_an_http2_connection() {
    let origin = Origin::start(|_| Reply::ok("page").header("cache-control", "max-age=600")).await;
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let cert = write_certificate(dir.path(), "wiki", &ca.issue(&["wiki.test"]));
    let tls_port = Port::reserve();
    let server = tls_lines(&tls_port, &[cert], "");
    let skua = Skua::start_tables(&[origin.addr], [&server, "", ""], "").await;
    let tls_addr: SocketAddr = format!("127.0.0.1:{}", tls_port.number).parse().unwrap();
    wait_listening(tls_addr).await;
    let (mut h2, driver) = h2_connection(&ca, tls_addr, "wiki.test").await;
    let page = format!("https://wiki.test:{}/wiki/Page", tls_port.number);
    let (response, _) = h2.send_request(h2_get(&page, &[]), true).unwrap();
    assert_eq!(response.await.unwrap().status(), 200);

    let drain = format!("http://{}/drain", skua.admin);
    let r = send(&client(), "POST", &drain, &[("skua-purge", "1")]).await;
    assert_eq!(r.status, 200);
    let (response, _) = h2.send_request(h2_get(&page, &[]), true).unwrap();
    let response = response
        .await
        .expect("the stream after the drain is answered");
    assert_eq!(response.status(), 200);
    let ended = tokio::time::timeout(Duration::from_secs(5), driver).await;
    assert!(ended.is_ok(), "the connection was ended after its stream");
}

/// Regression: `body_timeout` held for an HTTP/1.1 request body alone (pingora bounds its reads
/// by the session's read timeout; its HTTP/2 session has none). An HTTP/2 client that declared
/// a body and sent none of it held the stream for ever when Skua reads the body before asking
/// the origin (up to 64 KiB), and the origin's connection and worker, waiting for the body
/// Skua streams to it, until the origin's `read_timeout`.
#[tokio::test]
async fn an_http2_request_body_that_stops_coming_is_cut_after_body_timeout() {
    let origin = Origin::start(|_| Reply::ok("saved").header("cache-control", "no-store")).await;
    let skua = Skua::start_tables(&[origin.addr], ["body_timeout = \"1s\"", "", ""], "").await;
    let tcp = TcpStream::connect(skua.addr).await.unwrap();
    let (send, plain) = h2::client::handshake(tcp).await.unwrap();
    let _driver = tokio::spawn(plain);
    let base = format!("http://wiki.test:{}", skua.addr.port());
    let declared = |path: &str, length: usize| {
        http::Request::post(format!("{base}{path}"))
            .header("content-length", length.to_string())
            .body(())
            .unwrap()
    };
    let eight_seconds = Duration::from_secs(8);

    // An edit's form, read before the origin is asked: 408.
    let mut send = send.ready().await.unwrap();
    let (answer, _body) = send
        .send_request(declared("/w/index.php", 5000), false)
        .unwrap();
    let answer = tokio::time::timeout(eight_seconds, answer).await;
    let answer = answer.expect("an answer within body_timeout").unwrap();
    assert_eq!(answer.status(), 408);
    assert_eq!(origin.count("/w/index.php"), 0, "the origin is never asked");

    // An upload streamed to the origin as it comes: cut, and the origin's connection closed.
    let mut send = send.ready().await.unwrap();
    let (answer, mut body) = send
        .send_request(declared("/upload", 200_000), false)
        .unwrap();
    body.send_data(bytes::Bytes::from(vec![b'u'; 1000]), false)
        .unwrap();
    let cut = tokio::time::timeout(eight_seconds, answer).await;
    let cut = cut.expect("the stream cut within body_timeout");
    assert!(cut.is_err(), "reset, not answered: {cut:?}");

    // The connection goes on.
    let mut send = send.ready().await.unwrap();
    let (answer, mut body) = send.send_request(declared("/upload", 10), false).unwrap();
    body.send_data(bytes::Bytes::from_static(b"0123456789"), true)
        .unwrap();
    assert_eq!(answer.await.unwrap().status(), 200);
    let series = "skua_requests_total{cache_status=\"pass\",status_class=\"4xx\"}";
    let deadline = Instant::now() + Duration::from_secs(5);
    while skua.metric(series).await < 1.0 {
        assert!(Instant::now() < deadline, "the cut request was not counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
