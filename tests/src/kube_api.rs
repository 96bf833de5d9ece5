//! A stand-in for the Kubernetes API server's Node endpoints, serving recorded objects in the
//! API's own JSON (`tests/fixtures/k8s/`): `GET /api/v1/nodes` (a `NodeList`),
//! `GET /api/v1/nodes/NAME`, and `GET /api/v1/nodes?watch=true&resourceVersion=N` (a stream of
//! watch events, one JSON object per line, as the API server writes them). No API server can
//! run on these machines; this is what the agent's Kubernetes datastore is tested against.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use nat_plumbing::netns;
use serde_json::{Value, json};

#[derive(Default)]
struct Store {
    /// The list's `resourceVersion`.
    version: u64,
    nodes: Vec<Value>,
    /// Watch events with the version they happened at.
    events: Vec<(u64, Value)>,
}

/// The fake API server; stops when dropped.
pub struct KubeApi {
    store: Arc<Mutex<Store>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    pub addr: SocketAddr,
}

/// The recorded fixtures' directory.
#[must_use]
pub fn fixtures() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/k8s")
}

impl KubeApi {
    /// Serve `list` (a recorded `NodeList`) on `addr` inside namespace `ns`.
    pub fn start(ns: &Path, addr: SocketAddr, list: &Value) -> Result<Self> {
        let listener = netns::run_in(ns, move || {
            TcpListener::bind(addr).with_context(|| format!("bind {addr}"))
        })?;
        listener.set_nonblocking(true)?;
        let store = Arc::new(Mutex::new(Store {
            version: list["metadata"]["resourceVersion"]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or(1),
            nodes: list["items"].as_array().cloned().unwrap_or_default(),
            events: Vec::new(),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (store.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !sp.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let (st, sp) = (st.clone(), sp.clone());
                        std::thread::spawn(move || {
                            let _ = serve(s, &st, &sp);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(Self {
            store,
            stop,
            thread: Some(thread),
            addr,
        })
    }

    /// Play recorded watch events (`{"type", "object"}` per line): each changes the list as
    /// the API server's would, and open watches receive it.
    pub fn play(&self, events: &str) -> Result<()> {
        let mut st = self.store.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        for line in events.lines().filter(|l| !l.trim().is_empty()) {
            let ev: Value = serde_json::from_str(line).context("a watch event")?;
            let obj = &ev["object"];
            let name = obj["metadata"]["name"].clone();
            let version = obj["metadata"]["resourceVersion"]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or(st.version + 1);
            match ev["type"].as_str() {
                Some("ADDED" | "MODIFIED") => {
                    st.nodes.retain(|n| n["metadata"]["name"] != name);
                    st.nodes.push(obj.clone());
                }
                Some("DELETED") => st.nodes.retain(|n| n["metadata"]["name"] != name),
                _ => {}
            }
            st.version = st.version.max(version);
            st.events.push((version, ev));
        }
        Ok(())
    }

    /// A kubeconfig for this server (plain HTTP, a bearer token it ignores).
    #[must_use]
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: http://{}\ncontexts:\n- name: lab\n  context:\n    cluster: lab\n    user: agent\ncurrent-context: lab\nusers:\n- name: agent\n  user:\n    token: lab-token\n",
            self.addr
        )
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn respond(s: &mut TcpStream, code: &str, body: &Value) -> Result<()> {
    let body = body.to_string();
    write!(
        s,
        "HTTP/1.1 {code}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    Ok(())
}

fn serve(mut s: TcpStream, store: &Mutex<Store>, stop: &AtomicBool) -> Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let target = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
    }
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let param = |k: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
            .map(str::to_owned)
    };
    let lock = || store.lock().map_err(|_| anyhow::anyhow!("poisoned"));
    if path == "/api/v1/nodes" && param("watch").as_deref() == Some("true") {
        let from: u64 = param("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let secs: u64 = param("timeoutSeconds")
            .and_then(|v| v.parse().ok())
            .unwrap_or(5);
        write!(
            s,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n"
        )?;
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut sent = from;
        while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
            let new: Vec<(u64, Value)> = lock()?
                .events
                .iter()
                .filter(|(v, _)| *v > sent)
                .cloned()
                .collect();
            for (v, ev) in new {
                writeln!(s, "{ev}")?;
                sent = v;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        return Ok(());
    }
    if path == "/api/v1/nodes" {
        let st = lock()?;
        let list = json!({
            "apiVersion": "v1", "kind": "NodeList",
            "metadata": {"resourceVersion": st.version.to_string()},
            "items": st.nodes,
        });
        drop(st);
        return respond(&mut s, "200 OK", &list);
    }
    if let Some(name) = path.strip_prefix("/api/v1/nodes/") {
        let node = lock()?
            .nodes
            .iter()
            .find(|n| n["metadata"]["name"] == name)
            .cloned();
        return match node {
            Some(n) => respond(&mut s, "200 OK", &n),
            None => respond(
                &mut s,
                "404 Not Found",
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "message": format!("nodes \"{name}\" not found"), "reason": "NotFound",
                        "details": {"name": name, "kind": "nodes"}, "code": 404}),
            ),
        };
    }
    respond(
        &mut s,
        "404 Not Found",
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}),
    )
}
