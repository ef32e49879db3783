//! `nanobot dashboard`: the fleet in a browser. Nodes and actors (liveliness and their Stats),
//! per-topic rates, each robot's camera, state, actions, episodes and rejected frames, the
//! learning actors' metrics (training loss, replay) over time, the promoter's ledger, and the
//! episode success rate over time with the policy version that drove each episode.
//!
//! One Zenoh subscription on `{fleet}/**` and one on the actors' liveliness tokens feed a
//! bounded queue (a full one drops and counts); one task folds arrivals into a [`FleetView`].
//! The page (`assets/index.html`, embedded: no CDN, it works on a robot's LAN) reads
//! `GET /api/state` and then `GET /api/stream` (server-sent events, one snapshot every
//! 500 ms); `GET /api/camera/{robot}` is the latest JPEG. Loopback by default; listening
//! elsewhere needs a bearer token (`Authorization: Bearer T`, or `?token=T` for the page's own
//! requests).

pub mod view;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use nanobot_messages::{codec, decode_any, topics, CkptCommand, CkptReply};
use nanobot_tap::{payload_bytes, Tap, TapCounters, TapError};
use serde_json::Value;

pub use view::FleetView;

const INDEX: &str = include_str!("../assets/index.html");
/// How often the stream sends a snapshot.
pub const STREAM_EVERY: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum DashboardError {
    #[error("listening on {0} (not loopback) needs a token: --token or $NANOBOT_DASHBOARD_TOKEN")]
    NeedsToken(SocketAddr),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("key expression {key}: {reason}")]
    Zenoh { key: String, reason: String },
}

#[derive(Clone, Debug)]
pub struct DashboardOptions {
    pub listen: SocketAddr,
    /// Required on every request when set (and required to listen beyond loopback).
    pub token: Option<String>,
    /// How often the promoter's ledger is asked for.
    pub ledger_every: Duration,
    /// Arrivals that may wait for the view.
    pub queue: usize,
}

impl Default for DashboardOptions {
    fn default() -> Self {
        DashboardOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            token: None,
            ledger_every: Duration::from_secs(2),
            queue: 8192,
        }
    }
}

enum Arrival {
    Message(String, Bytes),
    Alive(String, bool),
}

#[derive(Clone)]
struct App {
    view: Arc<Mutex<FleetView>>,
    token: Option<Arc<str>>,
    /// Messages the full queue refused (the tap's count).
    tapped: Arc<TapCounters>,
    /// Liveliness changes the full queue refused.
    dropped: Arc<AtomicU64>,
}

impl App {
    fn snapshot(&self) -> Value {
        let mut v = self.view.lock().unwrap_or_else(|e| e.into_inner());
        v.dropped = self.tapped.dropped() + self.dropped.load(Ordering::Relaxed);
        v.snapshot()
    }
}

/// A running dashboard.
pub struct Dashboard {
    addr: SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _tap: Tap,
    _liveliness: zenoh::pubsub::Subscriber<()>,
}

impl Dashboard {
    /// Where it listens (the port is the real one when asked for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stop(self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Start serving the dashboard of `fleet` as seen from `session`.
pub async fn start(
    session: &zenoh::Session,
    fleet: &str,
    opts: &DashboardOptions,
) -> Result<Dashboard, DashboardError> {
    if !opts.listen.ip().is_loopback() && opts.token.is_none() {
        return Err(DashboardError::NeedsToken(opts.listen));
    }
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .map_err(|source| DashboardError::Listen {
            addr: opts.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| DashboardError::Listen {
        addr: opts.listen,
        source,
    })?;
    let (tx, rx) = flume::bounded::<Arrival>(opts.queue.max(1));
    let dropped = Arc::new(AtomicU64::new(0));
    let zerr = |key: &str, e: zenoh::Error| DashboardError::Zenoh {
        key: key.to_string(),
        reason: e.to_string(),
    };
    let all = format!("{fleet}/**");
    let tap = Tap::open(session, std::slice::from_ref(&all), tx.clone(), |_, s| {
        Arrival::Message(s.key_expr().as_str().to_string(), payload_bytes(s.payload()))
    })
    .await
    .map_err(|TapError::Subscribe { key, reason }| DashboardError::Zenoh { key, reason })?;
    let actors = topics::node_actor(fleet, "*", "*");
    let (t, d) = (tx, dropped.clone());
    let liveliness = session
        .liveliness()
        .declare_subscriber(actors.clone())
        .history(true)
        .callback(move |s| {
            let alive = s.kind() == zenoh::sample::SampleKind::Put;
            if t.try_send(Arrival::Alive(s.key_expr().as_str().to_string(), alive))
                .is_err()
            {
                d.fetch_add(1, Ordering::Relaxed);
            }
        })
        .await
        .map_err(|e| zerr(&actors, e))?;

    let view = Arc::new(Mutex::new(FleetView::new(fleet)));
    let v = view.clone();
    let fold = tokio::spawn(async move {
        while let Ok(a) = rx.recv_async().await {
            match a {
                Arrival::Message(key, bytes) => {
                    let len = bytes.len();
                    // Decoded before the view is locked: the page's readers wait only for the fold.
                    let decoded = decode_any(bytes).ok();
                    v.lock().unwrap_or_else(|e| e.into_inner()).message(&key, len, decoded);
                }
                Arrival::Alive(key, alive) => v.lock().unwrap_or_else(|e| e.into_inner()).liveliness(&key, alive),
            }
        }
    });
    let ledger = tokio::spawn(poll_ledger(
        session.clone(),
        topics::ckpt_control(fleet, "list"),
        view.clone(),
        opts.ledger_every,
    ));
    let app = App {
        view,
        token: opts.token.as_deref().map(Arc::from),
        tapped: tap.counters.clone(),
        dropped,
    };
    let router = Router::new()
        .route("/", get(|| async { Html(INDEX) }))
        .route("/api/login", axum::routing::post(login))
        .route("/api/state", get(state))
        .route("/api/stream", get(stream))
        .route("/api/camera/{robot}", get(camera))
        .layer(axum::middleware::from_fn_with_state(app.clone(), authorize))
        .with_state(app);
    let serve = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!(error = %e, "dashboard server stopped");
        }
    });
    Ok(Dashboard {
        addr,
        tasks: vec![fold, ledger, serve],
        _tap: tap,
        _liveliness: liveliness,
    })
}

/// Ask the promoter for its ledger now and then (no promoter: the ledger stays empty).
async fn poll_ledger(session: zenoh::Session, key: String, view: Arc<Mutex<FleetView>>, every: Duration) {
    let cmd = CkptCommand::read("list", "");
    loop {
        if let Ok(req) = codec::encode("dashboard", 0, codec::now_ns(), &cmd) {
            if let Ok(replies) = session.get(key.clone()).payload(req.to_vec()).timeout(every).await {
                while let Ok(reply) = replies.recv_async().await {
                    let Ok(sample) = reply.result() else { continue };
                    let bytes = Bytes::from(sample.payload().to_bytes().into_owned());
                    if let Ok((_, r)) = codec::decode::<CkptReply>(bytes) {
                        if let (true, Ok(v)) = (r.ok, serde_json::from_str::<Value>(&r.json)) {
                            view.lock().unwrap_or_else(|e| e.into_inner()).ledger = v;
                        }
                    }
                }
            }
        }
        tokio::time::sleep(every).await;
    }
}

/// The cookie `POST /api/login` sets, for the page's own requests (a browser's EventSource
/// cannot send an Authorization header).
const SESSION_COOKIE: &str = "nb_dashboard";

/// Equal bytes, in a time that does not depend on where they first differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    subtle::ConstantTimeEq::ct_eq(a, b).into()
}

/// The token a request carries: `Authorization: Bearer T`, or the login cookie. Never a URL's
/// query: URLs end up in logs, histories and Referer headers.
fn given_token(req: &Request) -> Option<&str> {
    let h = req.headers();
    let bearer = h
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    bearer.or_else(|| {
        h.get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|c| c.trim().strip_prefix(SESSION_COOKIE)?.strip_prefix('='))
    })
}

/// With a token configured, every request but the page itself (static, no data) and its login
/// form must carry it.
async fn authorize(State(app): State<App>, req: Request, next: Next) -> Response {
    if let Some(want) = &app.token {
        let open = req.method() == axum::http::Method::GET && req.uri().path() == "/";
        let ok = given_token(&req).is_some_and(|t| same_secret(t.as_bytes(), want.as_bytes()));
        if !open && !ok {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "a token is required: Authorization: Bearer T (or the cookie POST /api/login sets)",
            )
                .into_response();
        }
    }
    next.run(req).await
}

/// `POST /api/login` with `Authorization: Bearer T` (checked by [`authorize`]): the token as an
/// HttpOnly, same-site cookie, so that the page's requests and event stream carry it.
async fn login(State(app): State<App>) -> Response {
    let Some(token) = &app.token else {
        return StatusCode::NO_CONTENT.into_response();
    };
    let cookie = format!("{SESSION_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/");
    (StatusCode::NO_CONTENT, [(header::SET_COOKIE, cookie)]).into_response()
}

async fn state(State(app): State<App>) -> impl IntoResponse {
    axum::Json(app.snapshot())
}

async fn stream(State(app): State<App>) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let ticks = futures_util::stream::unfold((app, true), |(app, first)| async move {
        if !first {
            tokio::time::sleep(STREAM_EVERY).await;
        }
        let event = Event::default().event("state").data(app.snapshot().to_string());
        Some((Ok(event), (app, false)))
    });
    Sse::new(ticks).keep_alive(KeepAlive::default())
}

async fn camera(State(app): State<App>, Path(robot): Path<String>) -> Response {
    let jpeg = app.view.lock().unwrap_or_else(|e| e.into_inner()).camera(&robot);
    match jpeg {
        Some(b) => (
            [
                (header::CONTENT_TYPE, "image/jpeg"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            b,
        )
            .into_response(),
        None => (
            StatusCode::NOT_FOUND,
            format!("no camera frame from robot {robot:?} yet"),
        )
            .into_response(),
    }
}
