//! `nanobot serve --checkpoint FILE`: the policy over HTTP.
//!
//! - `POST /v1/act`: an Observation — JSON (the JSON view of the message, image bytes in
//!   base64; or an array of Observations, oldest first, for the policy's history), or a NanoBot
//!   envelope (`Content-Type: application/x-nanobot`) — answered with an ActionChunk in the same
//!   form. A malformed body gets 400 and the reason.
//!   With a session (`X-Nanobot-Session: NAME`, or the envelope's robot id), the server keeps
//!   that client's history (a `Rollout`: the last `n_obs_steps` observations and their vision
//!   tokens), so a client sends one observation per request, numbered by its `frame_index` (or
//!   the envelope's seq); a new `episode`, or a number that goes back, starts it afresh.
//!   Sessions are bounded (`--max-sessions`, least recently used dropped first).
//! - Inference runs on one thread; at most `--queue` requests wait for it, and beyond that the
//!   answer is 503 with `Retry-After` (counted), never an unbounded backlog.
//! - `GET /v1/model`: config, version, adapter, format, parameter count.
//! - `GET /healthz`, `GET /metrics` (Prometheus text format).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use clap::Args;
use nanobot_messages::{codec, ActionChunk, ActionSource, Observation};
use nanobot_policy::preprocess::step_of_within;
use nanobot_policy::rollout::Rollout;
use nanobot_policy::runner::{Runner, RunnerError};
use serde_json::json;

pub const ENVELOPE_TYPE: &str = "application/x-nanobot";

#[derive(Args)]
pub struct ServeArgs {
    /// A safetensors base checkpoint, or a GGUF export.
    #[arg(long)]
    checkpoint: PathBuf,
    /// A LoRA adapter for the base.
    #[arg(long)]
    adapter: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1:8470")]
    listen: String,
    /// The robots' control rate: an answer's `dt_ns` is its period.
    #[arg(long, default_value_t = 20.0)]
    rate_hz: f64,
    /// Requests that may wait for inference; more get 503 with Retry-After.
    #[arg(long, default_value_t = 8)]
    queue: usize,
    /// Client sessions kept (least recently used dropped first).
    #[arg(long, default_value_t = 256)]
    max_sessions: usize,
    /// Bearer token every request but /healthz must carry (`Authorization: Bearer T`);
    /// required when --listen is beyond loopback. Default: $NANOBOT_SERVE_TOKEN.
    #[arg(long)]
    token: Option<String>,
    /// Serve HTTPS with this certificate (PEM; e.g. `nanobot keys init --node serve` makes
    /// `state/nb/keys/tls/node.serve.pem`, and clients trust the fleet's `ca.pem`). Required,
    /// with --tls-key, when --listen is beyond loopback.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

/// Serving limits and the control rate.
#[derive(Clone, Copy, Debug)]
pub struct ServeLimits {
    pub rate_hz: f64,
    pub queue: usize,
    pub max_sessions: usize,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            rate_hz: 20.0,
            queue: 8,
            max_sessions: 256,
        }
    }
}

/// Latency histogram bucket bounds, seconds.
const BUCKETS: [f64; 8] = [0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0];

#[derive(Default)]
struct Metrics {
    ok: AtomicU64,
    bad: AtomicU64,
    failed: AtomicU64,
    busy: AtomicU64,
    latency_us_sum: AtomicU64,
    buckets: [AtomicU64; BUCKETS.len()],
    /// Observations whose image was refused, by reason (`width`, `height`, `bytes`, `jpeg`,
    /// ...: a handful of fixed names).
    images_refused: std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>,
    /// TLS handshakes that failed, timed out or found no room (the listener counts them).
    tls_refused: Arc<AtomicU64>,
}

impl Metrics {
    fn refuse_image(&self, reason: &'static str) {
        *self
            .images_refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(reason)
            .or_default() += 1;
    }
}

struct App {
    runner: Runner,
    limits: ServeLimits,
    /// Permits to wait for inference: `queue` of them.
    slots: Arc<tokio::sync::Semaphore>,
    sessions: std::sync::Mutex<Sessions>,
    /// Small models run fastest in a one-thread pool (candle hands tiny ops to rayon otherwise).
    pool: rayon::ThreadPool,
    params: usize,
    metrics: Metrics,
    started: Instant,
}

fn bad(reason: impl std::fmt::Display) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({"error": reason.to_string()})),
    )
        .into_response()
}

/// Client sessions: a rollout per client, least recently used dropped first.
#[derive(Default)]
struct Sessions {
    by_name: std::collections::HashMap<String, (u64, Arc<std::sync::Mutex<Rollout>>)>,
    clock: u64,
}

impl Sessions {
    fn get(&mut self, name: &str, runner: &Runner, max: usize) -> Result<Arc<std::sync::Mutex<Rollout>>, String> {
        self.clock += 1;
        let now = self.clock;
        if let Some((used, r)) = self.by_name.get_mut(name) {
            *used = now;
            return Ok(r.clone());
        }
        if self.by_name.len() >= max.max(1) {
            if let Some(oldest) = self.by_name.iter().min_by_key(|(_, (u, _))| *u).map(|(k, _)| k.clone()) {
                self.by_name.remove(&oldest);
            }
        }
        let r = Arc::new(std::sync::Mutex::new(
            Rollout::new(runner, None, 0, 0).map_err(|e| e.to_string())?,
        ));
        self.by_name.insert(name.to_string(), (now, r.clone()));
        Ok(r)
    }
}

/// A parsed request.
struct Request {
    obs: Vec<Observation>,
    seq: u64,
    /// The robot id of an envelope request (answered in the reply's envelope).
    robot: String,
    envelope: bool,
    session: Option<String>,
}

/// The observations of a request, and whether the answer goes back as an envelope.
fn parse(headers: &HeaderMap, body: &Bytes) -> Result<Request, String> {
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    let session = headers
        .get("x-nanobot-session")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if ctype.starts_with(ENVELOPE_TYPE) || ctype.starts_with("application/octet-stream") {
        let (h, o) = codec::decode::<Observation>(body.clone()).map_err(|e| format!("envelope: {e}"))?;
        let session = session.or_else(|| (!h.robot.is_empty()).then(|| h.robot.clone()));
        return Ok(Request {
            obs: vec![o],
            seq: h.seq,
            robot: h.robot,
            envelope: true,
            session,
        });
    }
    let obs = nanobot_policy::preprocess::observations_from_json(body)?;
    if session.is_some() && obs.len() > 1 {
        return Err("a session request carries one observation (the server keeps the history)".into());
    }
    Ok(Request {
        obs,
        seq: 0,
        robot: String::new(),
        envelope: false,
        session,
    })
}

async fn act(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    let t0 = Instant::now();
    let req = match parse(&headers, &body) {
        Ok(v) => v,
        Err(e) => {
            app.metrics.bad.fetch_add(1, Ordering::Relaxed);
            return bad(e);
        }
    };
    // A bounded wait for the one inference thread: a full queue answers 503 at once.
    let Ok(_slot) = app.slots.clone().try_acquire_owned() else {
        app.metrics.busy.fetch_add(1, Ordering::Relaxed);
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            axum::Json(json!({"error": format!("{} requests already wait for inference; retry", app.limits.queue)})),
        )
            .into_response();
    };
    let rollout = match &req.session {
        Some(name) => {
            let got =
                app.sessions
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(name, &app.runner, app.limits.max_sessions);
            match got {
                Ok(r) => Some(r),
                Err(e) => {
                    app.metrics.failed.fetch_add(1, Ordering::Relaxed);
                    return (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(json!({"error": e}))).into_response();
                }
            }
        }
        None => None,
    };
    let (seq, task, envelope) = (req.seq, req.obs.last().map(|o| o.task).unwrap_or(0), req.envelope);
    let a = app.clone();
    let obs = req.obs;
    // JPEG decoding and inference off the async runtime, on the server's one-thread pool.
    let result = tokio::task::spawn_blocking(move || -> Result<Vec<f32>, RunnerError> {
        // A JPEG larger than the policy's own image is refused before it is decoded.
        let limits = a.runner.jpeg_limits();
        let steps = obs
            .iter()
            .map(|o| step_of_within(o, &limits))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                a.metrics.refuse_image(e.reason());
                RunnerError::Input(e.to_string())
            })?;
        a.pool.install(|| match rollout {
            Some(r) => {
                let mut r = r.lock().unwrap_or_else(|e| e.into_inner());
                let o = obs.last().expect("parse refuses an empty request");
                let step = steps.into_iter().next_back().expect("one step per observation");
                a.runner.check(&step)?;
                // The client's step number: the envelope's seq, or the observation's frame_index.
                let at = if envelope { seq } else { o.frame_index };
                r.observe(o.episode, at, task, step);
                r.infer(&a.runner, seq)
            }
            None => a.runner.act(&steps, task, seq),
        })
    })
    .await;
    let actions = match result {
        Ok(Ok(actions)) => actions,
        Ok(Err(RunnerError::Input(e))) => {
            app.metrics.bad.fetch_add(1, Ordering::Relaxed);
            return bad(e);
        }
        Ok(Err(e)) => {
            app.metrics.failed.fetch_add(1, Ordering::Relaxed);
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                axum::Json(json!({"error": e.to_string()})),
            )
                .into_response();
        }
        Err(e) => {
            app.metrics.failed.fetch_add(1, Ordering::Relaxed);
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                axum::Json(json!({"error": e.to_string()})),
            )
                .into_response();
        }
    };
    let c = app.runner.config();
    let chunk = ActionChunk {
        obs_seq: seq,
        dt_ns: (1e9 / app.limits.rate_hz) as u64,
        horizon: c.head.horizon as u32,
        action_dim: c.head.action_dim as u32,
        actions,
        source: ActionSource::Policy,
        policy_version: app.runner.meta.version.clone(),
        adapter_version: app.runner.adapter_version(),
    };
    let secs = t0.elapsed().as_secs_f64();
    let m = &app.metrics;
    m.ok.fetch_add(1, Ordering::Relaxed);
    m.latency_us_sum.fetch_add((secs * 1e6) as u64, Ordering::Relaxed);
    for (i, b) in BUCKETS.iter().enumerate() {
        if secs <= *b {
            m.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
    }
    if req.envelope {
        match codec::encode(&req.robot, seq, codec::now_ns(), &chunk) {
            Ok(e) => {
                let mut out = e.head.to_vec();
                for b in e.blobs {
                    out.extend_from_slice(&b);
                }
                ([(header::CONTENT_TYPE, ENVELOPE_TYPE)], out).into_response()
            }
            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
        }
    } else {
        axum::Json(chunk).into_response()
    }
}

async fn model(State(app): State<Arc<App>>) -> Response {
    let r = &app.runner;
    axum::Json(json!({
        "version": r.meta.version,
        "adapter_version": r.adapter_version(),
        "format": r.format,
        "source": r.source.display().to_string(),
        "parameters": app.params,
        "config": r.meta.config,
        "norm": r.meta.norm,
    }))
    .into_response()
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let m = &app.metrics;
    let ok = m.ok.load(Ordering::Relaxed);
    let mut s = String::new();
    s.push_str("# HELP nanobot_act_requests_total POST /v1/act requests by outcome.\n# TYPE nanobot_act_requests_total counter\n");
    for (code, n) in [
        ("200", ok),
        ("400", m.bad.load(Ordering::Relaxed)),
        ("500", m.failed.load(Ordering::Relaxed)),
        ("503", m.busy.load(Ordering::Relaxed)),
    ] {
        s.push_str(&format!("nanobot_act_requests_total{{code=\"{code}\"}} {n}\n"));
    }
    s.push_str("# HELP nanobot_act_images_refused_total Observations whose image was refused, by reason.\n# TYPE nanobot_act_images_refused_total counter\n");
    for (reason, n) in m.images_refused.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        s.push_str(&format!(
            "nanobot_act_images_refused_total{{reason=\"{reason}\"}} {n}\n"
        ));
    }
    s.push_str("# HELP nanobot_act_latency_seconds Time to answer a good /v1/act request.\n# TYPE nanobot_act_latency_seconds histogram\n");
    for (i, b) in BUCKETS.iter().enumerate() {
        s.push_str(&format!(
            "nanobot_act_latency_seconds_bucket{{le=\"{b}\"}} {}\n",
            m.buckets[i].load(Ordering::Relaxed)
        ));
    }
    s.push_str(&format!("nanobot_act_latency_seconds_bucket{{le=\"+Inf\"}} {ok}\n"));
    s.push_str(&format!(
        "nanobot_act_latency_seconds_sum {}\nnanobot_act_latency_seconds_count {ok}\n",
        m.latency_us_sum.load(Ordering::Relaxed) as f64 / 1e6
    ));
    s.push_str(&format!(
        "# HELP nanobot_policy_parameters Parameters of the served policy.\n# TYPE nanobot_policy_parameters gauge\nnanobot_policy_parameters {}\n",
        app.params
    ));
    s.push_str(&format!(
        "# HELP nanobot_tls_handshakes_refused_total TLS handshakes that failed, timed out or found no room.\n# TYPE nanobot_tls_handshakes_refused_total counter\nnanobot_tls_handshakes_refused_total {}\n",
        m.tls_refused.load(Ordering::Relaxed)
    ));
    s.push_str(&format!(
        "# HELP nanobot_uptime_seconds Seconds since the server started.\n# TYPE nanobot_uptime_seconds gauge\nnanobot_uptime_seconds {:.1}\n",
        app.started.elapsed().as_secs_f64()
    ));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s).into_response()
}

#[cfg(test)]
pub fn router(runner: Runner, limits: ServeLimits, token: Option<String>) -> anyhow::Result<Router> {
    router_counting(runner, limits, token, Arc::default())
}

/// [`router`], whose `/metrics` reports the TLS listener's refusals from `tls_refused`.
pub fn router_counting(
    runner: Runner,
    limits: ServeLimits,
    token: Option<String>,
    tls_refused: Arc<AtomicU64>,
) -> anyhow::Result<Router> {
    let token: Option<Arc<str>> = token.map(Arc::from);
    Ok(Router::new()
        .route("/v1/act", post(act))
        .route("/v1/model", get(model))
        .route("/metrics", get(metrics))
        .layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                let token = token.clone();
                async move {
                    match token {
                        Some(want) if !bearer_is(&req, &want) => (
                            StatusCode::UNAUTHORIZED,
                            [(header::WWW_AUTHENTICATE, "Bearer")],
                            "a token is required: Authorization: Bearer T\n",
                        )
                            .into_response(),
                        _ => next.run(req).await,
                    }
                }
            },
        ))
        // Liveness for orchestrators, with no token.
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(app(runner, limits, tls_refused)?))
}

/// The request's `Authorization: Bearer …` is `want`, compared in constant time.
fn bearer_is(req: &axum::extract::Request, want: &str) -> bool {
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| subtle::ConstantTimeEq::ct_eq(t.as_bytes(), want.as_bytes()).into())
}

fn app(runner: Runner, limits: ServeLimits, tls_refused: Arc<AtomicU64>) -> anyhow::Result<Arc<App>> {
    anyhow::ensure!(
        limits.rate_hz > 0.0 && limits.queue > 0,
        "--rate-hz and --queue must be positive"
    );
    let params = runner.base.all_vars().iter().map(|v| v.elem_count()).sum();
    let app = Arc::new(App {
        runner,
        limits,
        slots: Arc::new(tokio::sync::Semaphore::new(limits.queue)),
        sessions: Default::default(),
        pool: rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .thread_name(|_| "nb-serve".into())
            .build()?,
        params,
        metrics: Metrics {
            tls_refused,
            ..Metrics::default()
        },
        started: Instant::now(),
    });
    Ok(app)
}

pub async fn serve(a: ServeArgs) -> anyhow::Result<u8> {
    let runner = Runner::load(&a.checkpoint, a.adapter.as_deref())?;
    let version = runner.meta.version.clone();
    let listener = tokio::net::TcpListener::bind(&a.listen)
        .await
        .map_err(|e| anyhow::anyhow!("listen {}: {e}", a.listen))?;
    let addr: SocketAddr = listener.local_addr()?;
    let token = a
        .token
        .or_else(|| std::env::var("NANOBOT_SERVE_TOKEN").ok())
        .filter(|t| !t.is_empty());
    anyhow::ensure!(
        addr.ip().is_loopback() || (token.is_some() && a.tls_cert.is_some()),
        "serve listens on {addr}, beyond loopback: give it a token (--token or $NANOBOT_SERVE_TOKEN), \
         which every request must send as Authorization: Bearer T, and a certificate (--tls-cert, --tls-key), \
         so that the token and the observations travel encrypted"
    );
    let tls = match (&a.tls_cert, &a.tls_key) {
        (Some(cert), Some(key)) => Some(crate::tls::server_config(cert, key)?),
        _ => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(%addr, version, format = %runner.format, "serving the policy on {scheme}://{addr}/v1/act");
    let limits = ServeLimits {
        rate_hz: a.rate_hz,
        queue: a.queue,
        max_sessions: a.max_sessions,
    };
    let tls_refused: Arc<AtomicU64> = Arc::default();
    let router = router_counting(runner, limits, token, tls_refused.clone())?;
    let stop = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    match tls {
        Some(config) => {
            axum::serve(crate::tls::TlsListener::new(listener, config, tls_refused)?, router)
                .with_graceful_shutdown(stop)
                .await?
        }
        None => axum::serve(listener, router).with_graceful_shutdown(stop).await?,
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};
    use nanobot_messages::{Blob, Encoding, Grid, Image};
    use nanobot_policy::checkpoint::{self, Meta, NormStats, Role};
    use nanobot_policy::PolicyConfig;

    fn tiny_runner() -> Runner {
        // One directory per call (the tests run in parallel), removed when dropped.
        let scratch = tempfile::Builder::new().prefix("nb-serve-test-").tempdir().unwrap();
        let dir = scratch.path();
        let cfg =
            PolicyConfig::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/policy/tiny.toml"))
                .unwrap();
        let vars = VarMap::new();
        nanobot_policy::Policy::new(&cfg, VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu), None).unwrap();
        nanobot_policy::model::seeded_init(&vars, 1).unwrap();
        let meta = Meta {
            kind: Role::Base,
            version: "t".into(),
            norm: NormStats::fit(&[vec![0.0; cfg.inputs.state_dim]], &[vec![0.0; cfg.head.action_dim]]),
            config: cfg,
        };
        let path = dir.join("tiny.safetensors");
        checkpoint::save(&path, &vars, &meta).unwrap();
        Runner::load(&path, None).unwrap()
    }

    fn observation() -> Observation {
        let sim = nanobot_sim::SimRobot::new(nanobot_sim::SimConfig::default()).unwrap();
        Observation {
            episode: 0,
            frame_index: 0,
            task: 0,
            image: Image {
                width: 64,
                height: 64,
                encoding: Encoding::Jpeg,
                data: Blob::new(sim.render_jpeg(90)),
            },
            state: sim.state().to_vec(),
            surface: Grid {
                rows: 8,
                cols: 8,
                cells: sim.surface(),
            },
            action: vec![],
        }
    }

    #[tokio::test]
    async fn a_full_queue_answers_503_with_retry_after_and_counts_it() {
        let limits = ServeLimits {
            queue: 2,
            ..ServeLimits::default()
        };
        let app = app(tiny_runner(), limits, Arc::default()).unwrap();
        let body = Bytes::from(serde_json::to_vec(&observation()).unwrap());
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        // Two requests already wait for inference.
        let held = app.slots.clone().try_acquire_many_owned(2).unwrap();
        let r = act(State(app.clone()), headers.clone(), body.clone()).await;
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers().get(header::RETRY_AFTER).unwrap(), "1");
        assert_eq!(app.metrics.busy.load(Ordering::Relaxed), 1);
        drop(held);
        let r = act(State(app.clone()), headers, body).await;
        assert_eq!(r.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn a_jpeg_bomb_is_refused_with_400_counted_by_reason_and_the_server_goes_on() {
        let app = app(tiny_runner(), ServeLimits::default(), Arc::default()).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        let mut bomb = observation();
        bomb.image.data = Blob::new(nanobot_policy::preprocess::jpeg_header_declaring(65_535, 65_535));
        let r = act(
            State(app.clone()),
            headers.clone(),
            Bytes::from(serde_json::to_vec(&bomb).unwrap()),
        )
        .await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let body = axum::body::to_bytes(r.into_body(), 1 << 16).await.unwrap();
        assert!(String::from_utf8_lossy(&body).contains("65535"), "{body:?}");
        let text = axum::body::to_bytes(metrics(State(app.clone())).await.into_body(), 1 << 20)
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&text);
        assert!(
            text.contains("nanobot_act_images_refused_total{reason=\"width\"} 1"),
            "{text}"
        );
        let good = Bytes::from(serde_json::to_vec(&observation()).unwrap());
        assert_eq!(act(State(app), headers, good).await.status(), StatusCode::OK);
    }

    /// One HTTP/1.0 request to a local port: the status code.
    fn status_of(port: u16, req: String) -> u16 {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        reply
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_a_token_every_route_but_healthz_wants_it_in_the_header() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let router = router(tiny_runner(), ServeLimits::default(), Some("s3cret".into())).unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, router).await });
        let get = |path: &str, auth: &str| format!("GET {path} HTTP/1.0\r\nHost: x\r\n{auth}\r\n");
        let codes = tokio::task::spawn_blocking(move || {
            [
                status_of(port, get("/v1/model", "")),
                status_of(port, get("/v1/model", "Authorization: Bearer s3creT\r\n")),
                status_of(port, get("/v1/model?token=s3cret", "")),
                status_of(port, get("/metrics", "")),
                status_of(port, get("/v1/model", "Authorization: Bearer s3cret\r\n")),
                status_of(port, get("/healthz", "")),
            ]
        })
        .await
        .unwrap();
        assert_eq!(codes, [401, 401, 401, 401, 200, 200]);
        server.abort();
    }

    #[test]
    fn sessions_are_bounded_least_recently_used_first() {
        let runner = tiny_runner();
        let mut s = Sessions::default();
        let a = s.get("a", &runner, 2).unwrap();
        s.get("b", &runner, 2).unwrap();
        s.get("a", &runner, 2).unwrap();
        s.get("c", &runner, 2).unwrap();
        assert_eq!(s.by_name.len(), 2);
        assert!(
            s.by_name.contains_key("a") && s.by_name.contains_key("c"),
            "b was least recently used"
        );
        assert!(
            Arc::ptr_eq(&a, &s.get("a", &runner, 2).unwrap()),
            "a session keeps its rollout"
        );
    }
}
