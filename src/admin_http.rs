//! The admin HTTP port: `/livez`, `/readyz`, `/metrics`, and the pack page
//! (R11): `/` to look an account up, `/packs?account=ID` to list its packs.
//!
//! The probes and `/metrics` are open. The pack page shows any account's
//! usage, so it is an admin interface: with `--admin-token-file` it needs
//! `Authorization: Bearer TOKEN` (401 and `WWW-Authenticate: Bearer`
//! without), and without a token file it is served to loopback peers only
//! (403 otherwise). See [`crate::auth`].

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use axum::{
    extract::{ConnectInfo, RawQuery, Request, State},
    http::{header, HeaderValue, StatusCode},
    middleware::Next,
    response::{IntoResponse, Redirect, Response},
    routing::get,
    Router,
};

use crate::{
    app::App,
    auth::{AdminAuth, Refusal},
    daily,
    meter::MeterError,
    pack_page,
};

/// What the admin routes read.
pub struct AdminState {
    pub app: Arc<App>,
    /// Readiness latch: set once serving starts, cleared when shutdown
    /// begins, never set again after that. In journal mode it is also
    /// cleared while the journal cannot be written, and set again once it
    /// can (`server::journal_health`), until shutdown.
    pub ready: AtomicBool,
    /// Set once start-up (the replay of the journal and the spill file) is
    /// done, never cleared. Until then the pack page answers 503, as the
    /// gRPC services answer UNAVAILABLE ([`crate::grpc::StartGate`] shares
    /// this flag): the store may still lack acknowledged usage.
    pub started: Arc<AtomicBool>,
    /// Who may see the pack page.
    pub auth: AdminAuth,
}

/// The admin routes. Serve them with
/// `into_make_service_with_connect_info::<SocketAddr>()`: without the peer
/// address the pack page is refused unless a token file is configured.
pub fn router(state: Arc<AdminState>) -> Router {
    let pages = Router::new()
        .route("/", get(index))
        .route("/packs", get(packs))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_admin,
        ));
    Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(pages)
        .fallback(not_found)
        .with_state(state)
}

/// The pack page's gate: the same policy as the `Admin` gRPC service.
async fn require_admin(State(s): State<Arc<AdminState>>, req: Request, next: Next) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes);
    match s.auth.check("http", authorization, peer) {
        Ok(()) => next.run(req).await,
        Err(Refusal::NotLoopback) => error_page(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "The pack page is served only to this machine when no admin token is configured. \
             Start packmeter with --admin-token-file (PACKMETER_ADMIN_TOKEN_FILE) and send \
             `Authorization: Bearer <token>`, or open the page from the server itself.",
            "",
        ),
        Err(refusal) => {
            let mut r = error_page(
                StatusCode::UNAUTHORIZED,
                "Authentication required",
                &format!(
                    "The pack page needs `Authorization: Bearer <token>` with a token from the \
                     server's --admin-token-file. {}",
                    if refusal == Refusal::Wrong {
                        "The token sent is not one of them."
                    } else {
                        "No usable token was sent."
                    }
                ),
                "",
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"packmeter admin\""),
            );
            r
        }
    }
}

async fn readyz(State(s): State<Arc<AdminState>>) -> impl IntoResponse {
    if s.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics(State(s): State<Arc<AdminState>>) -> impl IntoResponse {
    // The store's reachability, checked at scrape time with a short bound.
    let app = &s.app;
    app.metrics().set_store_up(app.store_up().await);
    let age = app
        .flusher()
        .oldest_unflushed_age(app.now())
        .map_or(0.0, |d| d.as_secs_f64());
    let meter = app.meter();
    let body = app.metrics().render(
        age,
        meter.resident(),
        meter.dirty_len(),
        meter.set_aside_accounts().len(),
    );
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
}

// === the pack page ===

/// The pages allow nothing but their own inline style and forms posting back
/// here: no scripts, no frames, no outside requests.
const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'";

/// An HTML response with the headers every page carries.
fn html(status: StatusCode, body: String) -> Response {
    let mut r = (status, body).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // Usage is live: never show a cached page.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn error_page(status: StatusCode, title: &str, message: &str, account: &str) -> Response {
    html(status, pack_page::render_error(title, message, account))
}

async fn index() -> Response {
    html(StatusCode::OK, pack_page::render_index())
}

async fn not_found() -> Response {
    error_page(
        StatusCode::NOT_FOUND,
        "Not found",
        "There is no such page. The admin port serves /, /packs?account=ID, /metrics, /livez and /readyz.",
        "",
    )
}

/// The `account` parameter of a form-encoded query string (`+` is a space).
/// A value whose percent-escapes are not UTF-8 (`%ff%fe`) is refused rather
/// than read with replacement characters, which would look up some other
/// account; so is a repeated `account`. Other parameters are ignored.
fn account_param(query: Option<&str>) -> Result<Option<String>, String> {
    let mut found = None;
    for pair in query.unwrap_or("").split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if percent_decode(key).as_deref() != Ok("account") {
            continue;
        }
        if found.is_some() {
            return Err("`account` is given more than once".into());
        }
        found = Some(percent_decode(value).map_err(|e| format!("`account` {e}"))?);
    }
    Ok(found)
}

/// Decodes `%XX` escapes and `+` as the URL standard's form decoding does
/// (a `%` without two hex digits stays as it is); the bytes must be UTF-8.
fn percent_decode(s: &str) -> Result<String, String> {
    let hex = |b: Option<&u8>| b.and_then(|&b| (b as char).to_digit(16));
    let raw = s.as_bytes();
    let mut bytes = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match (raw[i], hex(raw.get(i + 1)), hex(raw.get(i + 2))) {
            (b'+', _, _) => bytes.push(b' '),
            (b'%', Some(h), Some(l)) => {
                bytes.push((h * 16 + l) as u8);
                i += 2;
            }
            (b, _, _) => bytes.push(b),
        }
        i += 1;
    }
    String::from_utf8(bytes).map_err(|_| "is not UTF-8 once its %-escapes are decoded".into())
}

/// `/packs?account=ID`: the account's packs, read exactly as the gRPC
/// `ListPacks` handler reads them, and its usage by day over the last
/// [`daily::DEFAULT_DAYS`] days, as `Admin.GetDailyUsage` reads it.
async fn packs(State(s): State<Arc<AdminState>>, RawQuery(query): RawQuery) -> Response {
    let account = match account_param(query.as_deref()) {
        Ok(a) => a,
        Err(e) => {
            return error_page(
                StatusCode::BAD_REQUEST,
                "Bad request",
                &format!("The query string cannot be read: {e}."),
                "",
            )
        }
    };
    // No account at all is someone arriving without the form: send them to it.
    let Some(id) = account else {
        return Redirect::to("/").into_response();
    };
    let page = async {
        if !s.started.load(Ordering::Acquire) {
            return Err(MeterError::Starting);
        }
        let views = s.app.list_packs(&id).await?;
        let days = s.app.daily_usage(&id, daily::DEFAULT_DAYS).await?;
        Ok::<_, MeterError>((views, days))
    };
    match page.await {
        Ok((views, days)) => html(
            StatusCode::OK,
            pack_page::render(&id, &views, &days, &s.app.config().zone, s.app.now()),
        ),
        Err(e) => {
            let (status, title) = match &e {
                MeterError::InvalidAccountId(_) => (StatusCode::BAD_REQUEST, "Invalid account ID"),
                MeterError::NotFound(_) => (StatusCode::NOT_FOUND, "Unknown account"),
                // As over gRPC: the store is outside this process and may come back.
                MeterError::Store(_) => (StatusCode::SERVICE_UNAVAILABLE, "Store unavailable"),
                MeterError::Starting => (StatusCode::SERVICE_UNAVAILABLE, "Starting"),
                _ => (StatusCode::INTERNAL_SERVER_ERROR, "Cannot list packs"),
            };
            if status.is_server_error() {
                tracing::warn!(error = %e, "pack page failed");
            }
            error_page(status, title, &e.to_string(), &id)
        }
    }
}
