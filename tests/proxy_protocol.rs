//! Listeners behind a balancer that speaks the PROXY protocol (`[server]
//! proxy_protocol_listen`): each connection opens with a header naming the client, which Skua
//! takes as the client's address everywhere (the origin's `X-Forwarded-For`, the purge ACL,
//! the access log), from a trusted balancer only.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

use crate::support::*;

/// Version 2's signature (HAProxy's proxy-protocol.txt §2.2).
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// A version 2 header for a TCP over IPv4 client at `source`, with `tlvs` after the
/// addresses.
fn v2_header(source: SocketAddr, tlvs: &[u8]) -> Vec<u8> {
    let SocketAddr::V4(source) = source else {
        panic!("an IPv4 source");
    };
    let mut h = V2_SIGNATURE.to_vec();
    h.extend_from_slice(&[0x21, 0x11]);
    h.extend_from_slice(&((12 + tlvs.len()) as u16).to_be_bytes());
    h.extend_from_slice(&source.ip().octets());
    h.extend_from_slice(&[127, 0, 0, 1]);
    h.extend_from_slice(&source.port().to_be_bytes());
    h.extend_from_slice(&443u16.to_be_bytes());
    h.extend_from_slice(tlvs);
    h
}

/// `PP2_TYPE_SSL` with `PP2_CLIENT_SSL` set: the client reached the balancer over TLS.
const CLIENT_USED_TLS: [u8; 8] = [0x20, 0, 5, 0x01, 0, 0, 0, 0];

/// Connects from `from` (an address of the loopback network), writes `bytes`, and returns
/// everything the server answers before it closes.
async fn exchange_from(from: &str, to: SocketAddr, bytes: &[u8]) -> String {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let mut stream = socket.connect(to).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// Skua with a PROXY protocol listener (its address returned) beside its plain one; `server`
/// lines added to `[server]`.
async fn behind_balancer(origin: &Origin, server: &str, extra: &str) -> (Skua, SocketAddr, Port) {
    let port = Port::reserve();
    let lines = format!(
        "proxy_protocol_listen = [\"127.0.0.1:{}\"]\n{server}",
        port.number
    );
    let skua = Skua::start_tables(&[origin.addr], [&lines, "", ""], extra).await;
    let addr: SocketAddr = format!("127.0.0.1:{}", port.number).parse().unwrap();
    wait_listening(addr).await;
    (skua, addr, port)
}

fn get_closing(path: &str, version: &str, more: &str) -> String {
    format!("GET {path} HTTP/{version}\r\nHost: wiki.test\r\n{more}Connection: close\r\n\r\n")
}

#[tokio::test]
async fn a_balancers_proxy_header_is_the_client_for_the_origin_the_purge_acl_and_the_log() {
    let origin = Origin::start(|_| Reply::ok("page").header("cache-control", "max-age=600")).await;
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("access.log");
    let (skua, balanced, _port) = behind_balancer(
        &origin,
        "trusted_proxies = [\"127.0.0.1/32\"]",
        &format!(
            "[purge]\nallow = [\"10.0.0.0/8\"]\n[log]\naccess = \"{}\"\nformat = \"json\"\n",
            log.display()
        ),
    )
    .await;

    // Version 1 (text) and version 2 (binary); a miss filled by the front door (HTTP/1.1) and
    // one on pingora's path (HTTP/1.0). A client's own X-Forwarded-For is not believed.
    let client: SocketAddr = "203.0.113.9:40001".parse().unwrap();
    let spoofed = "X-Forwarded-For: 10.1.2.3\r\n";
    for (path, version, header) in [
        (
            "/v1",
            "1.1",
            b"PROXY TCP4 203.0.113.9 127.0.0.1 40001 80\r\n".to_vec(),
        ),
        ("/v2", "1.0", v2_header(client, &[])),
    ] {
        let request = [header, get_closing(path, version, spoofed).into_bytes()].concat();
        let answer = exchange_from("127.0.0.1", balanced, &request).await;
        assert!(answer.contains(" 200 OK\r\n"), "{path}: {answer}");
        let seen = &origin.requests(path)[0];
        assert_eq!(
            seen.header("x-forwarded-for"),
            Some("203.0.113.9"),
            "{path}"
        );
    }

    // The purge ACL judges the client the header names: a client outside it is refused even
    // when it claims an allowed address; one inside it purges.
    let purge = |header: Vec<u8>, more: &str| {
        let request =
            format!("PURGE /v1 HTTP/1.1\r\nHost: wiki.test\r\n{more}Connection: close\r\n\r\n");
        [header, request.into_bytes()].concat()
    };
    let outsider = purge(v2_header(client, &[]), spoofed);
    let answer = exchange_from("127.0.0.1", balanced, &outsider).await;
    assert!(answer.contains(" 403 "), "{answer}");
    let hit = raw(skua.addr, &get_closing("/v1", "1.1", "")).await;
    assert!(hit.contains("x-cache-status: hit-front"), "{hit}");
    let editor = purge(v2_header("10.1.2.3:5000".parse().unwrap(), &[]), "");
    let answer = exchange_from("127.0.0.1", balanced, &editor).await;
    assert!(answer.contains(" 204 "), "{answer}");
    let refetched = raw(skua.addr, &get_closing("/v1", "1.1", "")).await;
    assert!(refetched.contains("x-cache-status: miss"), "{refetched}");
    assert_eq!(origin.count("/v1"), 2);

    // The balancer's own connection (version 2's LOCAL, its health check) is its own address.
    let mut local = v2_header(client, &[]);
    local[12] = 0x20;
    let request = [local, get_closing("/local", "1.1", "").into_bytes()].concat();
    let answer = exchange_from("127.0.0.1", balanced, &request).await;
    assert!(answer.contains(" 200 OK\r\n"), "{answer}");
    assert_eq!(
        origin.requests("/local")[0].header("x-forwarded-for"),
        Some("127.0.0.1")
    );

    wait_until("the access log lines", || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("/local"))
    })
    .await;
    let lines = std::fs::read_to_string(&log).unwrap();
    let v2_line = lines
        .lines()
        .find(|l| l.contains("\"/v2\""))
        .expect("/v2 logged");
    assert!(v2_line.contains("\"client\":\"203.0.113.9\""), "{v2_line}");
}

/// A PROXY header is believed from `trusted_proxies` only; from anyone else, and a connection
/// that does not open with a valid header, is closed unanswered and counted.
#[tokio::test]
async fn a_proxy_listener_refuses_untrusted_peers_and_connections_without_a_header() {
    let origin = Origin::start(|_| Reply::ok("page").header("cache-control", "max-age=600")).await;
    let (skua, balanced, _port) =
        behind_balancer(&origin, "trusted_proxies = [\"127.0.0.2/32\"]", "").await;
    let header = b"PROXY TCP4 203.0.113.9 127.0.0.1 40001 80\r\n".to_vec();
    let request = [header, get_closing("/p", "1.1", "").into_bytes()].concat();

    let refused = |reason: &str| format!("skua_connections_refused_total{{reason=\"{reason}\"}}");
    // Waiting for the listener connected from 127.0.0.1 once; that refusal is counted by the
    // connection's own task, so it is waited for (regression: read before it was counted, the
    // count later looked one too high).
    let mut untrusted_before = 0.0;
    for _ in 0..100 {
        untrusted_before = skua.metric(&refused("proxy_untrusted")).await;
        if untrusted_before >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        untrusted_before, 1.0,
        "the listener's readiness probe was refused once"
    );
    let untrusted = exchange_from("127.0.0.1", balanced, &request).await;
    assert_eq!(untrusted, "");
    let trusted = exchange_from("127.0.0.2", balanced, &request).await;
    assert!(trusted.contains(" 200 OK\r\n"), "{trusted}");
    assert_eq!(origin.count("/p"), 1);

    for bad in [
        get_closing("/p", "1.1", "").into_bytes(),
        b"PROXY TCP4 203.0.113.9 127.0.0.1 40001\r\nGET /p HTTP/1.1\r\n\r\n".to_vec(),
    ] {
        let answer = exchange_from("127.0.0.2", balanced, &bad).await;
        assert_eq!(answer, "", "{}", String::from_utf8_lossy(&bad));
    }
    // A balancer's TCP health check, which connects and closes, is neither.
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    drop(socket.connect(balanced).await.unwrap());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        skua.metric(&refused("proxy_untrusted")).await,
        untrusted_before + 1.0
    );
    assert_eq!(skua.metric(&refused("bad_proxy_header")).await, 2.0);
    // The plain listener is unchanged: no header expected there.
    let plain = raw(skua.addr, &get_closing("/p", "1.1", "")).await;
    assert!(plain.contains("x-cache-status: hit-front"), "{plain}");
}

/// A balancer that terminated TLS says so in version 2's `PP2_TYPE_SSL`: the request is an
/// https one (its own cache key, `X-Forwarded-Proto: https` at the origin), as on Skua's own
/// HTTPS listener; without it the same URL is the http resource.
#[tokio::test]
async fn a_client_that_reached_the_balancer_over_tls_is_an_https_request() {
    let origin = Origin::start(|seen| {
        Reply::ok(format!(
            "proto {}",
            seen.header("x-forwarded-proto").unwrap_or("-")
        ))
        .header("cache-control", "max-age=600")
    })
    .await;
    let (_skua, balanced, _port) =
        behind_balancer(&origin, "trusted_proxies = [\"127.0.0.1/32\"]", "").await;
    let client: SocketAddr = "203.0.113.9:40001".parse().unwrap();
    for (tlvs, body) in [
        (&CLIENT_USED_TLS[..], "proto https"),
        (&[][..], "proto -"),
        (&CLIENT_USED_TLS[..], "proto https"),
    ] {
        let request = [
            v2_header(client, tlvs),
            get_closing("/wiki/Page", "1.1", "").into_bytes(),
        ]
        .concat();
        let answer = exchange_from("127.0.0.1", balanced, &request).await;
        assert!(answer.ends_with(body), "{answer}");
    }
    // One fetch per scheme; the third request was the https copy's hit.
    assert_eq!(origin.count("/wiki/Page"), 2);
}

#[test]
fn a_proxy_listener_without_trusted_proxies_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("skua.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = [\"127.0.0.1:0\"]\nproxy_protocol_listen = [\"127.0.0.1:1\", \"127.0.0.1:0\"]\n",
    )
    .unwrap();
    let said = serve_refused(&path);
    assert!(
        said.contains("skua.toml:3: server.proxy_protocol_listen: needs [server] trusted_proxies"),
        "{said}"
    );
    assert!(
        said.contains(
            "skua.toml:3: server.proxy_protocol_listen[1]: 127.0.0.1:0 is already server.listen[0]"
        ),
        "{said}"
    );
}

/// A process killed when the test ends, however it ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Interoperation with a real balancer, HAProxy, in each of its modes: HTTP with `send-proxy`
/// (version 1); terminating TLS itself with `send-proxy-v2-ssl` (version 2, saying the client
/// used TLS); and TCP, passing TLS through to Skua's HTTPS PROXY listener with
/// `send-proxy-v2`. Each time the origin and the access log see the client's own address
/// (the client binds a loopback address of its own), and the scheme it used.
#[tokio::test]
async fn haproxy_in_front_names_the_client_in_each_of_its_modes() {
    if std::process::Command::new("haproxy")
        .arg("-v")
        .output()
        .is_err()
    {
        return prerequisite_missing("haproxy (apt-get install haproxy)");
    }
    let origin = Origin::start(|seen| {
        Reply::ok(format!(
            "for {} proto {}",
            seen.header("x-forwarded-for").unwrap_or("-"),
            seen.header("x-forwarded-proto").unwrap_or("-")
        ))
        .header("cache-control", "max-age=600")
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let (chain, key) = ca.issue(&["wiki.test"]);
    let (chain_path, key_path) = (dir.path().join("chain.pem"), dir.path().join("key.pem"));
    std::fs::write(&chain_path, &chain).unwrap();
    std::fs::write(&key_path, &key).unwrap();
    let both = dir.path().join("both.pem");
    std::fs::write(&both, format!("{chain}{key}")).unwrap();
    let log = dir.path().join("access.log");

    let (plain, tls) = (Port::reserve(), Port::reserve());
    let lines = format!(
        "trusted_proxies = [\"127.0.0.1/32\"]\nproxy_protocol_listen = [\"127.0.0.1:{}\"]\n\
         [server.tls]\nproxy_protocol_listen = [\"127.0.0.1:{}\"]\n\
         [[server.tls.certificate]]\nchain = \"{}\"\nkey = \"{}\"\n",
        plain.number,
        tls.number,
        chain_path.display(),
        key_path.display()
    );
    let extra = format!("[log]\naccess = \"{}\"\nformat = \"json\"\n", log.display());
    let _skua = Skua::start_tables(&[origin.addr], [&lines, "", ""], &extra).await;

    let fronts = [free_port(), free_port(), free_port()];
    let config = format!(
        "defaults\n  mode http\n  timeout connect 2s\n  timeout client 10s\n  timeout server 10s\n\
         frontend http_v1\n  bind 127.0.0.1:{f0}\n  default_backend v1\n\
         frontend https_v2_ssl\n  bind 127.0.0.1:{f1} ssl crt {both}\n  default_backend v2ssl\n\
         frontend tcp_v2\n  mode tcp\n  bind 127.0.0.1:{f2}\n  default_backend passthrough\n\
         backend v1\n  server skua 127.0.0.1:{plain} send-proxy\n\
         backend v2ssl\n  server skua 127.0.0.1:{plain} send-proxy-v2-ssl\n\
         backend passthrough\n  mode tcp\n  server skua 127.0.0.1:{tls} send-proxy-v2\n",
        f0 = fronts[0],
        f1 = fronts[1],
        f2 = fronts[2],
        both = both.display(),
        plain = plain.number,
        tls = tls.number,
    );
    let config_path = dir.path().join("haproxy.cfg");
    std::fs::write(&config_path, config).unwrap();
    let _haproxy = Child(
        std::process::Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&config_path)
            .spawn()
            .expect("start haproxy"),
    );
    for port in fronts {
        wait_listening(format!("127.0.0.1:{port}").parse().unwrap()).await;
    }

    let client = |from: &str| {
        reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(ca.pem.as_bytes()).unwrap())
            .local_address(Some(from.parse().unwrap()))
            .resolve("wiki.test", "127.0.0.1:0".parse().unwrap())
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap()
    };
    for (from, url, want) in [
        (
            "127.0.0.5",
            format!("http://wiki.test:{}/v1", fronts[0]),
            "for 127.0.0.5 proto -",
        ),
        (
            "127.0.0.6",
            format!("https://wiki.test:{}/v2-ssl", fronts[1]),
            "for 127.0.0.6 proto https",
        ),
        (
            "127.0.0.7",
            format!("https://wiki.test:{}/passthrough", fronts[2]),
            "for 127.0.0.7 proto https",
        ),
    ] {
        let resp = client(from)
            .get(&url)
            .header("x-forwarded-for", "10.6.6.6")
            .send()
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        assert_eq!(resp.status(), 200, "{url}");
        if url.contains("passthrough") {
            // Skua's own TLS behind the header: HTTP/2 offered and taken, as on its listener.
            assert_eq!(resp.version(), reqwest::Version::HTTP_2, "{url}");
        }
        assert_eq!(resp.text().await.unwrap(), want, "{url}");
    }
    wait_until("three access log lines", || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.lines().count() >= 3)
    })
    .await;
    let logged: Vec<(String, String)> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["client"].to_string(), v["scheme"].to_string())
        })
        .collect();
    assert_eq!(
        logged,
        [
            ("\"127.0.0.5\"".to_string(), "\"http\"".to_string()),
            ("\"127.0.0.6\"".to_string(), "\"https\"".to_string()),
            ("\"127.0.0.7\"".to_string(), "\"https\"".to_string()),
        ]
    );
}

/// On a PROXY protocol listener the client counted for `max_connections_per_client` is the
/// one its header names, not the balancer (which holds every connection).
#[tokio::test]
async fn max_connections_per_client_counts_the_client_the_proxy_header_names() {
    let origin = Origin::start(|_| Reply::ok("page").header("cache-control", "max-age=600")).await;
    let (_skua, balanced, _port) = behind_balancer(
        &origin,
        "trusted_proxies = [\"127.0.0.1/32\"]\nmax_connections_per_client = 2",
        "",
    )
    .await;
    let open_for = |client: &'static str| async move {
        let mut stream = tokio::net::TcpStream::connect(balanced).await.unwrap();
        let mut bytes = v2_header(client.parse().unwrap(), &[]);
        bytes.extend_from_slice(b"GET /held HTTP/1.1\r\nHost: wiki.test\r\n\r\n");
        stream.write_all(&bytes).await.unwrap();
        let mut head = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut head))
            .await
            .unwrap()
            .unwrap();
        (stream, String::from_utf8_lossy(&head[..n]).into_owned())
    };
    let mut held = Vec::new();
    for _ in 0..2 {
        let (stream, answer) = open_for("203.0.113.7:5000").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        held.push(stream);
    }
    let (_third, refused) = open_for("203.0.113.7:5001").await;
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    let (_other, served) = open_for("203.0.113.8:5000").await;
    assert!(served.starts_with("HTTP/1.1 200"), "{served}");
}
