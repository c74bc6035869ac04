//! Test harness: a programmable origin over real TCP that counts what reaches it, the real
//! `skua` binary started on ephemeral ports with a config in a temp dir, and raw-socket
//! helpers for request forms HTTP clients will not send.

#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener as StdListener, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// A request as the origin saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    /// The request target as sent (origin form `/a?b`, or absolute form `http://h/a?b`).
    pub target: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// What the origin answers.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    pub delay: Duration,
}

impl Reply {
    pub fn ok(body: impl Into<Bytes>) -> Reply {
        Reply {
            status: 200,
            headers: vec![],
            body: body.into(),
            delay: Duration::ZERO,
        }
    }
    pub fn status(mut self, status: u16) -> Reply {
        self.status = status;
        self
    }
    pub fn header(mut self, name: &str, value: impl Into<String>) -> Reply {
        self.headers.push((name.to_string(), value.into()));
        self
    }
    pub fn delay(mut self, d: Duration) -> Reply {
        self.delay = d;
        self
    }
}

pub type Handler = Arc<dyn Fn(&Seen) -> Reply + Send + Sync>;

/// An origin server on 127.0.0.1 that records every request.
pub struct Origin {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    tasks: Arc<Mutex<JoinSet<()>>>,
    handler: Handler,
}

impl Origin {
    pub async fn start(handler: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Origin {
        // Outside the ephemeral range, so that `restart` finds the port free.
        let listener = loop {
            if let Ok(l) = TcpListener::bind(("127.0.0.1", free_port())).await {
                break l;
            }
        };
        let addr = listener.local_addr().unwrap();
        let origin = Origin {
            addr,
            seen: Arc::new(Mutex::new(Vec::new())),
            tasks: Arc::new(Mutex::new(JoinSet::new())),
            handler: Arc::new(handler),
        };
        origin.serve(listener);
        origin
    }

    fn serve(&self, listener: TcpListener) {
        let seen = self.seen.clone();
        let handler = self.handler.clone();
        let tasks = self.tasks.clone();
        let accept = async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let seen = seen.clone();
                let handler = handler.clone();
                let conn = async move {
                    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        let handler = handler.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let request = Seen {
                                method: parts.method.to_string(),
                                target: parts.uri.to_string(),
                                path: parts
                                    .uri
                                    .path_and_query()
                                    .map_or("/".into(), |p| p.to_string()),
                                headers: parts.headers,
                                body,
                            };
                            let reply = if request.path == "/_health" {
                                Reply::ok("ok")
                            } else {
                                handler(&request)
                            };
                            if request.path != "/_health" {
                                seen.lock().unwrap().push(request);
                            }
                            if !reply.delay.is_zero() {
                                tokio::time::sleep(reply.delay).await;
                            }
                            let mut resp = hyper::Response::builder().status(reply.status);
                            for (k, v) in &reply.headers {
                                resp = resp.header(k, v);
                            }
                            Ok::<_, Infallible>(resp.body(Full::new(reply.body)).unwrap())
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                };
                tasks.lock().unwrap().spawn(conn);
            }
        };
        self.tasks.lock().unwrap().spawn(accept);
    }

    /// Closes the listener and every open connection: the origin is down.
    pub fn stop(&self) {
        self.tasks.lock().unwrap().abort_all();
    }

    /// Listens again on the same port.
    /// The listener of a just-stopped origin closes when its aborted task is dropped, which
    /// may be a moment after `stop`.
    pub async fn restart(&self) {
        let deadline = Instant::now() + Duration::from_secs(3);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if Instant::now() > deadline => panic!("rebind origin: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        self.serve(listener);
    }

    /// Requests that reached the origin for `path` (path and query), health checks excluded.
    pub fn count(&self, path: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.path == path)
            .count()
    }

    /// Requests that reached the origin for paths starting with `prefix`.
    pub fn count_starting(&self, prefix: &str) -> usize {
        let seen = self.seen.lock().unwrap();
        seen.iter().filter(|r| r.path.starts_with(prefix)).count()
    }

    /// Every request the origin received, in order.
    pub fn all_requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn requests(&self, path: &str) -> Vec<Seen> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A port nothing listens on, below Linux's ephemeral range (32768-60999), for what cannot
/// share a reserved [`Port`]: the test origin (bound here, then rebound by `restart`),
/// nats-server and the demo's command line. A port in the ephemeral range can meanwhile become
/// the source port of some outgoing connection.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    pick_port(&NEXT, |port| StdListener::bind(("127.0.0.1", port)).is_ok())
}

/// The same for a UDP listener (an HTCP receiver): a port picked by binding port 0 could be
/// given to a sending socket before the listener binds it.
pub fn free_udp_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    pick_port(&NEXT, |port| UdpSocket::bind(("127.0.0.1", port)).is_ok())
}

/// Ports [`free_port`] and [`free_udp_port`] pick from.
const PICKED: std::ops::Range<u32> = 20_000..32_000;

fn pick_port(next: &AtomicU32, is_free: impl Fn(u16) -> bool) -> u16 {
    let ephemeral_from = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    assert!(
        ephemeral_from >= PICKED.end,
        "the kernel's ephemeral ports start at {ephemeral_from}, inside the ports tests pick"
    );
    let span = PICKED.end - PICKED.start;
    // Spread concurrent test binaries over the range by process id.
    let base = std::process::id() % 1_000 * 12;
    loop {
        let port = PICKED.start + (base + next.fetch_add(1, Ordering::Relaxed)) % span;
        let port = u16::try_from(port).expect("PICKED is within u16");
        if is_free(port) {
            return port;
        }
    }
}

/// A TCP port reserved for Skua: an ephemeral port the kernel picked, held bound (not
/// listening) with `SO_REUSEPORT` for as long as any clone lives. Skua, started with
/// `reuse_port = true`, listens on it beside the reservation; nothing else can bind it, and
/// the kernel never uses it as the source port of an outgoing connection, so a restarted node
/// finds its port free (regression: a chaos run whose node B could not listen again for 30 s).
#[derive(Clone)]
pub struct Port {
    pub number: u16,
    _held: Arc<socket2::Socket>,
}

impl Port {
    pub fn reserve() -> Port {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("a socket");
        socket.set_reuse_address(true).expect("SO_REUSEADDR");
        socket.set_reuse_port(true).expect("SO_REUSEPORT");
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        socket.bind(&any.into()).expect("bind an ephemeral port");
        let number = socket
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .map(|a| a.port())
            .expect("the bound port");
        Port {
            number,
            _held: Arc::new(socket),
        }
    }
}

pub fn skua_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_skua"))
}

/// `[cache.disk]` lines for a test: what the test gives, and `after_restart = "serve"` unless
/// it says otherwise, so that tests of what a disk keeps across a restart see it served as it
/// is. Tests of the default (revalidate) name it.
fn disk_table(lines: &str) -> String {
    if lines.contains("after_restart") {
        lines.to_string()
    } else {
        format!("after_restart = \"serve\"\n{lines}")
    }
}

/// A line in a test's `extra` config that sends the process's log to [`Skua::log`] instead of
/// the test's output (a TOML comment, so the config is unchanged).
pub const CAPTURE_LOG: &str = "# capture the log";
/// A line `# env NAME=VALUE` in a config's extra text sets that variable for the process
/// (and no other): how a test turns on a fault-injection hook.
pub const ENV_LINE: &str = "# env ";

/// The variables a config's [`ENV_LINE`]s set.
fn env_lines(config: &str) -> impl Iterator<Item = (&str, &str)> {
    config
        .lines()
        .filter_map(|l| l.strip_prefix(ENV_LINE)?.split_once('='))
}
/// A line `# nofile SOFT:HARD` starts the process with that open-file limit (`prlimit`), as a
/// shell's `ulimit -n` would.
pub const NOFILE_LINE: &str = "# nofile ";
/// A line in a config's extra text that has the proxy listen on every address of both
/// families (`[::]:port`, dual-stack: the kernel gives an IPv4 client as `::ffff:a.b.c.d`).
pub const DUAL_STACK: &str = "# listen dual-stack";
const LOG_FILE: &str = "skua.log";

/// The new process of a zero-downtime upgrade, stopped when dropped, so that a test that fails
/// before it stops the process leaves none running (one that holds the test run's output open
/// keeps whatever reads it waiting).
pub struct Upgraded(Option<Child>);

impl Upgraded {
    pub fn into_child(mut self) -> Child {
        self.0.take().expect("an upgrade's process, not yet taken")
    }
}

impl std::ops::Deref for Upgraded {
    type Target = Child;
    fn deref(&self) -> &Child {
        self.0
            .as_ref()
            .expect("an upgrade's process, not yet taken")
    }
}

impl std::ops::DerefMut for Upgraded {
    fn deref_mut(&mut self) -> &mut Child {
        self.0
            .as_mut()
            .expect("an upgrade's process, not yet taken")
    }
}

impl Drop for Upgraded {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The real `skua serve` process.
pub struct Skua {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    /// The reservations of `addr` and `admin`.
    ports: [Port; 2],
    child: Child,
    pub dir: tempfile::TempDir,
}

impl Skua {
    /// Starts Skua in front of `origin` with `extra` TOML appended to a minimal config.
    /// `extra` may hold `[cache]`, `[purge]` or other tables; the origin pool is written here.
    pub async fn start(origins: &[SocketAddr], extra: &str) -> Skua {
        Skua::start_with(origins, "", extra).await
    }

    /// As [`Skua::start`], with `cache` lines placed inside the `[cache]` table.
    pub async fn start_with(origins: &[SocketAddr], cache: &str, extra: &str) -> Skua {
        Skua::start_in(
            tempfile::tempdir().unwrap(),
            Port::reserve(),
            origins,
            cache,
            extra,
        )
        .await
    }

    /// Starts Skua with a disk tier in `disk` (which outlives this process, for restarts).
    pub async fn start_disk(
        origins: &[SocketAddr],
        disk: &std::path::Path,
        disk_lines: &str,
        extra: &str,
    ) -> Skua {
        Skua::start_disk_on(&Port::reserve(), origins, disk, disk_lines, extra).await
    }

    /// As [`Skua::start_disk`], with `cache` lines inside the `[cache]` table.
    pub async fn start_disk_with(
        origins: &[SocketAddr],
        disk: &std::path::Path,
        cache: &str,
        disk_lines: &str,
    ) -> Skua {
        let extra = format!(
            "[cache.disk]\npath = \"{}\"\n{}\n",
            disk.display(),
            disk_table(disk_lines)
        );
        let skua = Skua::start_in(
            tempfile::tempdir().unwrap(),
            Port::reserve(),
            origins,
            cache,
            &extra,
        )
        .await;
        skua.wait_disk_index().await;
        skua
    }

    /// As [`Skua::start_disk`] on a given port: a restarted Skua must listen where the old one
    /// did, since the port is part of every cache key.
    pub async fn start_disk_on(
        port: &Port,
        origins: &[SocketAddr],
        disk: &std::path::Path,
        disk_lines: &str,
        extra: &str,
    ) -> Skua {
        Skua::start_disk_and_memory_on(port, origins, disk, disk_lines, "", extra).await
    }

    /// [`Skua::start_disk_on`] with `memory_lines` in the `[cache]` table (the memory tier).
    pub async fn start_disk_and_memory_on(
        port: &Port,
        origins: &[SocketAddr],
        disk: &std::path::Path,
        disk_lines: &str,
        memory_lines: &str,
        extra: &str,
    ) -> Skua {
        let extra = format!(
            "[cache.disk]\npath = \"{}\"\n{}\n\n{extra}",
            disk.display(),
            disk_table(disk_lines)
        );
        let skua = Skua::start_in(
            tempfile::tempdir().unwrap(),
            port.clone(),
            origins,
            memory_lines,
            &extra,
        )
        .await;
        skua.wait_disk_index().await;
        skua
    }

    /// Waits until the disk index and its tags have loaded (in the background at start-up).
    pub async fn wait_disk_index(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let disk = &self.stats().await["tiers"]["disk"];
            if disk["index_loaded"] == true && disk["tags_loaded"] == true {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("disk index never loaded");
    }

    /// Waits until the disk writer has written every fill handed to it: a fill the memory
    /// tier holds does not wait for the disk.
    pub async fn wait_disk_writes(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.stats().await["tiers"]["disk"]["write_queue_objects"] == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the disk writer never caught up");
    }

    /// SIGTERM: pingora's graceful stop. Waits for the process to exit.
    pub fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// A zero-downtime upgrade (`skua serve --upgrade` on this process's config, then SIGQUIT
    /// here): returns the new process once this one has drained and exited.
    pub async fn upgrade_in_place(&mut self) -> Upgraded {
        let new = self.hand_over().await;
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.alive() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(!self.alive(), "the old process drained and exited");
        new
    }

    /// Takes `new`, the process an upgrade started (the old one has exited), as this node's:
    /// it is stopped with it, whether the test passes or fails.
    pub fn adopt(&mut self, new: Upgraded) {
        self.child = new.into_child();
    }

    /// Starts the new binary of a zero-downtime upgrade and sends this (old) one SIGQUIT: it
    /// hands over its listeners and drains the connections it has open, for up to its
    /// `shutdown_grace`. Returns the new process, listening on this one's addresses.
    pub async fn hand_over(&mut self) -> Upgraded {
        self.upgrade_from(self.pid()).await
    }

    /// A second upgrade: starts another new binary and sends SIGQUIT to `pid`, the process
    /// the last [`Self::hand_over`] started, once it holds the listeners.
    pub async fn upgrade_from(&self, pid: u32) -> Upgraded {
        let new = self.start_upgraded().await;
        let quit = Command::new("kill")
            .args(["-QUIT", &pid.to_string()])
            .status()
            .unwrap();
        assert!(quit.success());
        new
    }

    /// Starts the new binary of an upgrade, once the last upgrade's listeners are handed
    /// over, and returns when it waits for the listeners (it has bound its relay socket).
    pub async fn start_upgraded(&self) -> Upgraded {
        // The process taking the listeners removes the upgrade socket once it has them.
        let upgrade_sock = self.dir.path().join("upgrade.sock");
        wait_until("the last upgrade's listeners are handed over", || {
            !upgrade_sock.exists()
        })
        .await;
        // The new binary waits on the upgrade socket for the old one's listeners; it runs with
        // the config's `# env` lines as the old one does.
        let config = std::fs::read_to_string(self.config_path()).unwrap();
        let new = Upgraded(Some(
            Command::new(skua_bin())
                .args(["serve", "--upgrade", "--config"])
                .arg(self.config_path())
                .envs(env_lines(&config))
                .spawn()
                .unwrap(),
        ));
        wait_until("the new process listens on the upgrade socket", || {
            upgrade_sock.exists()
        })
        .await;
        new
    }

    /// Rewrites the config file with `edit` and sends SIGHUP.
    pub fn reload(&self, edit: impl FnOnce(String) -> String) {
        let path = self.dir.path().join("skua.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, edit(text)).unwrap();
        self.signal("HUP");
    }

    /// Sends the signal `name` (`TERM`, `USR1`, ...) to the process and returns at once.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// As [`Skua::reload`], then waits until the process has dealt with the file: `true` when
    /// it applied it, `false` when it rejected it (the counters in `/stats`, not a sleep).
    pub async fn reload_and_wait(&self, edit: impl FnOnce(String) -> String) -> bool {
        let counts = |s: serde_json::Value| {
            (
                s["config"]["reloads_applied"]
                    .as_u64()
                    .expect("reloads_applied in /stats"),
                s["config"]["reloads_rejected"]
                    .as_u64()
                    .expect("reloads_rejected in /stats"),
            )
        };
        let before = counts(self.stats().await);
        self.reload(edit);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let now = counts(self.stats().await);
            if now != before {
                assert_eq!(
                    (now.0 - before.0) + (now.1 - before.1),
                    1,
                    "one SIGHUP, one reload"
                );
                return now.0 > before.0;
            }
            assert!(Instant::now() < deadline, "the reload never ran");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// What the process logged, when started with [`CAPTURE_LOG`] in its config.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join(LOG_FILE)).unwrap_or_default()
    }

    /// The configuration file this Skua runs with.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("skua.toml")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// kill -9: no chance to clean up.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    async fn start_in(
        dir: tempfile::TempDir,
        port: Port,
        origins: &[SocketAddr],
        cache: &str,
        extra: &str,
    ) -> Skua {
        Skua::start_full(dir, port, origins, ["", "", cache], extra).await
    }

    /// Starts Skua with `server`, `origin` and `cache` lines placed inside those tables.
    pub async fn start_tables(origins: &[SocketAddr], lines: [&str; 3], extra: &str) -> Skua {
        Skua::start_full(
            tempfile::tempdir().unwrap(),
            Port::reserve(),
            origins,
            lines,
            extra,
        )
        .await
    }

    /// As [`Skua::start_tables`], listening on `port` (so that an origin address may name it).
    pub async fn start_tables_on(
        port: &Port,
        origins: &[SocketAddr],
        lines: [&str; 3],
        extra: &str,
    ) -> Skua {
        let dir = tempfile::tempdir().unwrap();
        Skua::start_full(dir, port.clone(), origins, lines, extra).await
    }

    async fn start_full(
        dir: tempfile::TempDir,
        port: Port,
        origins: &[SocketAddr],
        [server, origin, cache]: [&str; 3],
        extra: &str,
    ) -> Skua {
        let admin_port = Port::reserve();
        let addresses: Vec<String> = origins.iter().map(|a| format!("\"{a}\"")).collect();
        let read_timeout = if origin.contains("read_timeout") {
            ""
        } else {
            "read_timeout = \"5s\""
        };
        let connect_timeout = if origin.contains("connect_timeout") {
            ""
        } else {
            "connect_timeout = \"500ms\""
        };
        let memory_size = if cache.contains("memory_size") {
            ""
        } else {
            "memory_size = 16777216"
        };
        let listen_on = if extra.contains(DUAL_STACK) {
            "[::]"
        } else {
            "127.0.0.1"
        };
        let config = format!(
            r#"[server]
listen = ["{listen_on}:{port}"]
admin = "127.0.0.1:{admin_port}"
reuse_port = true
threads = 2
shutdown_grace = "1s"
upgrade_sock = "{upgrade_sock}"
{server}

[[origin]]
name = "test"
addresses = [{addresses}]
{connect_timeout}
{read_timeout}
{origin}
[origin.health_check]
path = "/_health"
interval = "300ms"

[cache]
{memory_size}
{cache}

{extra}
"#,
            addresses = addresses.join(", "),
            port = port.number,
            admin_port = admin_port.number,
            upgrade_sock = dir.path().join("upgrade.sock").display()
        );
        let path = dir.path().join("skua.toml");
        std::fs::write(&path, config).unwrap();
        let vars = env_lines(extra);
        let mut command = match extra.lines().find_map(|l| l.strip_prefix(NOFILE_LINE)) {
            Some(limit) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={limit}")).arg("--").arg(skua_bin());
                c
            }
            None => Command::new(skua_bin()),
        };
        let child = command
            .args(["serve", "--config"])
            .arg(&path)
            .envs(vars)
            .stdout(Stdio::null())
            .stderr(match std::fs::File::create(dir.path().join(LOG_FILE)) {
                Ok(file) if extra.contains(CAPTURE_LOG) => Stdio::from(file),
                _ => Stdio::inherit(),
            })
            .spawn()
            .expect("spawn skua");
        let mut skua = Skua {
            addr: format!("127.0.0.1:{}", port.number).parse().unwrap(),
            admin: format!("127.0.0.1:{}", admin_port.number).parse().unwrap(),
            ports: [port, admin_port],
            child,
            dir,
        };
        wait_listening(skua.addr).await;
        wait_listening(skua.admin).await;
        // The ports are reserved for this child; still, make sure the admin port answering is
        // this child's and not one left from an earlier start.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            assert!(skua.alive(), "skua exited at start-up (its log is above)");
            if let Ok(r) = reqwest::get(format!("http://{}/stats", skua.admin)).await {
                let text = r.text().await.unwrap_or_default();
                let stats: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                assert_eq!(
                    stats["pid"].as_u64(),
                    Some(skua.pid() as u64),
                    "another process answers on {}",
                    skua.admin
                );
                break;
            }
            assert!(Instant::now() < deadline, "no /stats on {}", skua.admin);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        skua
    }

    /// The proxy port's reservation: a restarted Skua must listen where this one did, since
    /// the port is part of every cache key.
    pub fn port(&self) -> Port {
        self.ports[0].clone()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn stats(&self) -> serde_json::Value {
        let body = reqwest::get(format!("http://{}/stats", self.admin))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        serde_json::from_str(&body).unwrap()
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.admin))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

impl Drop for Skua {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident memory of process `pid`, in KiB (`VmRSS`).
pub fn resident_kib(pid: u32) -> i64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

pub async fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("nothing listening on {addr}");
}

/// `text` gzip-compressed (flate2's default level), as an origin that compresses sends it.
pub fn gzip(text: &str) -> Bytes {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, text.as_bytes()).unwrap();
    Bytes::from(gz.finish().unwrap())
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// A response reduced to what the tests look at.
#[derive(Debug)]
pub struct Got {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Bytes,
}

impl Got {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
    pub fn cache(&self) -> &str {
        self.header("x-cache-status")
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub async fn get(url: &str, headers: &[(&str, &str)]) -> Got {
    send(&client(), "GET", url, headers).await
}

/// Revision `v` of the page `seen` asks for, with the ETag `"r<v>"`: a 304 to a request that
/// holds that ETag, else `<path> v<v>`.
pub fn revision(seen: &Seen, v: u64) -> Reply {
    let etag = format!("\"r{v}\"");
    let reply = if seen.header("if-none-match") == Some(etag.as_str()) {
        Reply::ok("").status(304)
    } else {
        Reply::ok(format!("{} v{v}", seen.path))
    };
    reply.header("etag", etag)
}

/// A GET started now and answered later: a request in flight while the test does something
/// else (a purge racing it).
pub fn get_in_flight(
    url: &str,
    headers: &[(&'static str, &'static str)],
) -> tokio::task::JoinHandle<Got> {
    let (url, headers) = (url.to_string(), headers.to_vec());
    tokio::spawn(async move { get(&url, &headers).await })
}

/// GET without reusing a pooled connection: for requests that follow an origin restart.
pub async fn get_fresh(url: &str) -> Got {
    send(&client(), "GET", url, &[]).await
}

pub async fn send(
    client: &reqwest::Client,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
) -> Got {
    let mut req = client.request(reqwest::Method::from_bytes(method.as_bytes()).unwrap(), url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.bytes().await.unwrap_or_default();
    Got {
        status,
        headers,
        body,
    }
}

/// Pages [`cache_markers`] stores, by which [`connection_to_another_process`] tells processes
/// apart during an upgrade.
const MARKERS: usize = 200;

/// Stores the marker pages in the process that serves `skua`'s address now.
pub async fn cache_markers(skua: &Skua, headers: &[(&str, &str)]) {
    for i in 0..MARKERS {
        get(&skua.url(&format!("/wiki/Marker{i}")), headers).await;
    }
}

/// A new connection to `addr` that a process other than the one holding the markers took:
/// one of them misses on it. During an upgrade both processes take connections from the same
/// queue (and the new one may have yet to start).
pub async fn connection_to_another_process(addr: SocketAddr, host: &str) -> TcpStream {
    for i in 0..MARKERS {
        let mut connection = TcpStream::connect(addr).await.unwrap();
        let request = format!("GET /wiki/Marker{i} HTTP/1.1\r\nHost: {host}\r\n\r\n");
        if exchange(&mut connection, &request)
            .await
            .contains("x-cache-status: miss")
        {
            return connection;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no connection reached another process");
}

/// Sends `request` on `stream` every 20 ms until `done` holds for the answer, which it
/// returns; after 3 s fails with `failure` and the last answer.
pub async fn exchange_until(
    stream: &mut TcpStream,
    request: &str,
    failure: &str,
    done: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let got = exchange(stream, request).await;
        if done(&got) {
            return got;
        }
        assert!(Instant::now() < deadline, "{failure}: {got}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Writes `request` on `stream` and reads one response head (and a short body).
pub async fn exchange(stream: &mut TcpStream, request: &str) -> String {
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Sends raw bytes and returns everything the server answers before closing.
pub async fn raw(addr: SocketAddr, request: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).into_owned()
}

/// `skua serve` on `config`, which must refuse to start: what it said on stderr.
pub fn serve_refused(config: &std::path::Path) -> String {
    let out = Command::new(skua_bin())
        .args(["serve", "--config"])
        .arg(config)
        .output()
        .unwrap();
    assert!(!out.status.success(), "the second Skua started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A test's prerequisite (root, a program) is missing. On CI (`CI` set, as `.ci/run` does)
/// that is a failure, so a skipped test cannot stay green there; elsewhere the test is skipped
/// with a note saying what to install.
pub fn prerequisite_missing(what: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "missing on CI: {what} (.ci/run must provide it)"
    );
    eprintln!("skipped: {what}");
}

/// A tmpfs of `size` (`mount -o size=`), unmounted on drop: a file system that runs out of
/// space. None where this user may not mount.
pub struct SmallDisk(tempfile::TempDir);

impl SmallDisk {
    pub fn mount(size: &str) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(SmallDisk(dir))
    }

    pub fn path(&self) -> &std::path::Path {
        self.0.path()
    }

    /// Writes a file of zeros until the file system is full; removing it gives the space back.
    pub fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let ballast = self.path().join("ballast");
        let mut file = std::fs::File::create(&ballast).unwrap();
        let chunk = vec![0u8; 4096];
        while file.write_all(&chunk).is_ok() {}
        ballast
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

/// Waits until `done` holds, polling; panics naming `what` after 20 s.
pub async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A counter map helper for handlers that change their answer over time.
pub fn counter() -> Arc<Mutex<HashMap<String, usize>>> {
    Arc::new(Mutex::new(HashMap::new()))
}

/// A real `nats-server` with JetStream on an ephemeral port and a temp store directory, which
/// outlives `stop` so a restart keeps the stream.
pub struct Nats {
    pub port: u16,
    store: tempfile::TempDir,
    /// A nats-server configuration file (`-c`), for what has no command-line flag.
    config: Option<PathBuf>,
    child: Option<Child>,
}

impl Nats {
    pub async fn start() -> Nats {
        Nats::start_with("").await
    }

    /// Starts with `config` as its configuration file (TLS, authorization).
    pub async fn start_with(config: &str) -> Nats {
        let store = tempfile::tempdir().unwrap();
        let config = (!config.is_empty()).then(|| {
            let path = store.path().join("nats.conf");
            std::fs::write(&path, config).unwrap();
            path
        });
        let mut nats = Nats {
            port: free_port(),
            store,
            config,
            child: None,
        };
        nats.restart().await;
        nats
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// `[purge.bus]` for a node called `node`, plus `lines`.
    pub fn bus(&self, node: &str, lines: &str) -> String {
        format!(
            "[purge.bus]\nservers = [\"{}\"]\nnode = \"{node}\"\n{lines}\n",
            self.url()
        )
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts (again) on the same port and store.
    pub async fn restart(&mut self) {
        self.stop();
        let mut command = Command::new("nats-server");
        if let Some(config) = &self.config {
            command.arg("-c").arg(config);
        }
        let child = command
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server on PATH (apt-get install nats-server)");
        self.child = Some(child);
        wait_listening(format!("127.0.0.1:{}", self.port).parse().unwrap()).await;
    }
}

/// A certificate authority for tests: issues certificates for names and addresses.
pub struct TestCa {
    pub pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    pub fn new() -> TestCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "skua test CA");
        let pem = params.self_signed(&key).unwrap().pem();
        TestCa {
            pem,
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// The same CA's certificate, for a client to trust (it cannot issue).
    pub fn from_pem(pem: &str) -> TestCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        TestCa {
            pem: pem.to_string(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A certificate for `names` (DNS names or IP addresses): (chain PEM, key PEM).
    pub fn issue(&self, names: &[&str]) -> (String, String) {
        self.issue_with(names, |_| {})
    }

    /// As [`TestCa::issue`], with `edit` applied to the certificate's parameters (validity).
    pub fn issue_with(
        &self,
        names: &[&str],
        edit: impl FnOnce(&mut rcgen::CertificateParams),
    ) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        edit(&mut params);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Skua {
    /// Waits until `/readyz` says ready (disk index loaded, purge bus caught up).
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(r) = reqwest::get(format!("http://{}/readyz", self.admin)).await {
                if r.status() == 200 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("skua never became ready");
    }

    /// The value of one exact metric line (`name{labels}`). A series that is not rendered is
    /// an error, so a renamed metric cannot pass a check for zero.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no series {series} in /metrics:\n{text}"))
    }

    /// Hits answered by each code path: front door, pingora's session, pingora's cache.
    pub async fn hit_paths(&self) -> [u64; 3] {
        let mut counts = [0; 3];
        for (count, path) in counts.iter_mut().zip(["front_door", "session", "cache"]) {
            *count = self
                .metric(&format!("skua_hits_by_path_total{{path=\"{path}\"}}"))
                .await as u64;
        }
        counts
    }
}

/// Status line, header fields (lowercased names, in a map) and body of a raw response.
pub fn split(response: &str) -> (String, std::collections::BTreeMap<String, String>, String) {
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((response, ""));
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or("").to_string();
    let fields = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, fields, body.to_string())
}

/// An origin that answers every connection with `response` and closes.
pub async fn raw_origin(response: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(response).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}
