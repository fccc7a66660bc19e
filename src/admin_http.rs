//! The admin HTTP port: `/livez`, `/readyz` and `/metrics`.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};

use crate::{calendar::now_ts, flush::Flusher, meter::Meter, metrics::Metrics};

/// What the admin routes read.
pub struct AdminState {
    pub meter: Arc<Meter>,
    pub flusher: Arc<Flusher>,
    pub metrics: Arc<Metrics>,
    /// Readiness latch: set once serving starts, cleared when shutdown
    /// begins, never set again.
    pub ready: AtomicBool,
}

pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
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
    let up = matches!(
        tokio::time::timeout(Duration::from_secs(1), s.meter.store().ping()).await,
        Ok(Ok(()))
    );
    s.metrics.set_store_up(up);
    let age = s
        .flusher
        .oldest_unflushed_age(now_ts())
        .map_or(0.0, |d| d.as_secs_f64());
    let body = s
        .metrics
        .render(age, s.meter.resident(), s.meter.dirty_len());
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
}
