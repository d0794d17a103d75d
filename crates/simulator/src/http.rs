//! The HTTP face of the simulator: the Loops API under `/api`, inspection under `/_sim`.
//!
//! Every API request passes one gate, in this order: counted in the stats, key checked (401),
//! faults rolled (a fault "before effect" answers here), rate limit taken (429), handler, added
//! latency, faults "after effect" (the effect happened, the answer is lost), rate-limit headers.
//!
//! `Idempotency-Key`: the handler checks and consumes a key under the same lock as the effect.
//! The gate consumes it, with `keys_consumed_on_failure` only, where the handler never saw it: a
//! 5xx or dropped connection before the effect, a body refused before the handler (413). A 401
//! or a 429 (real or injected) never consumes a key: the request was not taken.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, Query, Request, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use bytes::Bytes;
use serde_json::{Map, Value, json};
use tokio::sync::Notify;

use crate::config::Settings;
use crate::faults::{Fault, FaultDice, Faults, When};
use crate::model::{ApiError, MailingList};
use crate::state::{SimState, Stats, idempotency_scope, is_valid_idempotency_key};

const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// State shared by every connection.
#[derive(Debug)]
pub struct Shared {
    pub state: Mutex<SimState>,
    /// Every key the team accepts.
    pub api_keys: Vec<String>,
    /// Requests to the API received and not yet answered (outside the state: a reset while one
    /// is in flight does not lose it).
    pub in_flight: AtomicU64,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, SimState> {
        // A handler never panics while holding the lock; recover the data if one ever does.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What `/_sim/stats` answers.
    pub fn stats(&self) -> Stats {
        let mut stats = self.lock().stats();
        stats.in_flight = self.in_flight.load(Ordering::SeqCst);
        stats
    }
}

/// One request in flight, from the moment the API receives it until it is answered (or its
/// connection dropped): counted in [`Shared::in_flight`] while it lives.
struct InFlight(Arc<Shared>);

impl InFlight {
    fn enter(shared: &Arc<Shared>) -> InFlight {
        shared.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(shared.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Put on each request by the accept loop: notifying it closes the connection at once.
#[derive(Clone, Debug)]
pub struct ConnectionDropper(pub Arc<Notify>);

/// The whole application.
pub fn router(shared: Arc<Shared>, max_body_bytes: usize) -> Router {
    let api = Router::new()
        .route("/v1/api-key", get(api_key))
        .route("/v1/contacts/create", post(create_contact))
        .route("/v1/contacts/update", put(update_contact))
        .route("/v1/contacts/find", get(find_contact))
        .route("/v1/contacts/delete", post(delete_contact))
        .route(
            "/v1/contacts/properties",
            get(list_properties).post(create_property),
        )
        .route("/v1/lists", get(lists))
        .route("/v1/events/send", post(send_event))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(middleware::from_fn_with_state(shared.clone(), gate));
    let sim = Router::new()
        .route("/contacts", get(sim_contacts))
        .route("/events", get(sim_events))
        .route("/workflows", get(sim_workflows))
        .route("/stats", get(sim_stats))
        .route("/faults", get(sim_faults_get).post(sim_faults))
        .route("/settings", get(sim_settings_get).post(sim_settings))
        .route("/lists", post(sim_add_list))
        .route("/reset", post(sim_reset))
        // An upload is a whole audience: no body limit.
        .route(
            "/import",
            post(sim_import).layer(DefaultBodyLimit::disable()),
        )
        .route("/export", get(sim_export));
    Router::new()
        .nest("/api", api)
        .nest("/_sim", sim)
        .fallback(not_found)
        .with_state(shared)
}

fn failure(status: u16, message: impl Into<String>) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
    (
        status,
        Json(json!({"success": false, "message": message.into()})),
    )
        .into_response()
}

fn answer(result: Result<Value, ApiError>) -> Response {
    match result {
        Ok(value) => Json(value).into_response(),
        Err(e) => failure(e.status, e.message),
    }
}

fn fault_response(fault: Fault) -> Response {
    match fault {
        Fault::Status500 => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        Fault::Status502 => (
            StatusCode::BAD_GATEWAY,
            [(CONTENT_TYPE, "text/html")],
            "<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1></center></body></html>",
        )
            .into_response(),
        Fault::Status503 => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(CONTENT_TYPE, "text/plain")],
            "Service Unavailable",
        )
            .into_response(),
        Fault::Status429 => failure(429, "Rate limit exceeded"),
        Fault::Drop => unreachable!("a dropped connection has no response"),
    }
}

/// Errors raised by axum itself (405, 413, a bad query string) come as text; Loops answers JSON.
fn as_loops_error(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if status.is_success() || is_json {
        return response;
    }
    let message = match status.as_u16() {
        404 => "Not found.".to_owned(),
        405 => "Method not allowed.".to_owned(),
        413 => "Request body too large.".to_owned(),
        400 => "Invalid request.".to_owned(),
        _ => status.canonical_reason().unwrap_or("Error").to_owned(),
    };
    // 415 and 422 are axum's; Loops says "all other errors are 400".
    let status = match status.as_u16() {
        415 | 422 => 400,
        s => s,
    };
    failure(status, message)
}

fn set_rate_headers(response: &mut Response, limit: u32, remaining: u32) {
    let headers = response.headers_mut();
    headers.insert("x-ratelimit-limit", HeaderValue::from(limit));
    headers.insert("x-ratelimit-remaining", HeaderValue::from(remaining));
}

/// Waits for the connection to be closed under this request.
async fn drop_connection(dropper: Option<ConnectionDropper>) -> Response {
    if let Some(d) = dropper {
        d.0.notify_one();
        std::future::pending::<()>().await;
    }
    // Only reached when served without the accept loop: the closest thing is an empty 502.
    StatusCode::BAD_GATEWAY.into_response()
}

/// What the gate decided before the handler runs.
enum Admission {
    /// Answer now, without running the handler.
    Answer(Response),
    /// Close the connection without an answer.
    Drop,
    /// Run the handler; then maybe a fault after the effect, after some latency.
    Pass {
        limit: u32,
        after_fault: Option<Fault>,
        latency_ms: u64,
    },
}

/// The scope and key of a request to an idempotent endpoint that carried a valid key.
type KeyedRequest = Option<(&'static str, String)>;

fn admit(shared: &Shared, endpoint: &str, authorized: bool, keyed: &KeyedRequest) -> Admission {
    let mut st = shared.lock();
    let limit = st.settings.rate_limit;
    let window = st.settings.window;
    if !authorized {
        st.count(endpoint, "401");
        let remaining = st.limiter.remaining(Instant::now(), limit, window);
        // loops-js reads `error`, loops-go prefers it: send both, as Loops' examples do.
        let mut r = (
            StatusCode::UNAUTHORIZED,
            Json(
                json!({"success": false, "message": "Invalid API key", "error": "Invalid API key"}),
            ),
        )
            .into_response();
        set_rate_headers(&mut r, limit, remaining);
        return Admission::Answer(r);
    }
    let roll = st.dice.roll(endpoint);
    if let Some((fault, When::BeforeEffect)) = roll {
        // A 5xx or a drop before the effect is a failed request; an injected 429 is not taken.
        if fault != Fault::Status429
            && let Some((scope, key)) = keyed
        {
            st.request_failed_with_key(scope, key);
        }
        if fault == Fault::Drop {
            st.count(endpoint, "dropped");
            return Admission::Drop;
        }
        let mut r = fault_response(fault);
        st.count(endpoint, r.status().as_str());
        if fault == Fault::Status429 {
            st.stats.rate_limited += 1;
            let remaining = st.limiter.remaining(Instant::now(), limit, window);
            set_rate_headers(&mut r, limit, remaining);
        }
        return Admission::Answer(r);
    }
    let decision = st.limiter.acquire(Instant::now(), limit, window);
    if !decision.accepted {
        st.stats.rate_limited += 1;
        st.count(endpoint, "429");
        let mut r = failure(429, "Rate limit exceeded");
        set_rate_headers(&mut r, limit, decision.remaining);
        if st.settings.retry_after {
            let seconds = decision.retry_in.as_secs_f64().ceil().max(1.0) as u64;
            r.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(seconds));
        }
        return Admission::Answer(r);
    }
    Admission::Pass {
        limit,
        after_fault: roll.map(|(f, _)| f),
        latency_ms: st.dice.faults.latency_ms,
    }
}

/// Counts the handler's answer (or replaces it with a fault after the effect) and adds the
/// rate-limit headers. `None`: drop the connection.
///
/// A fault after the effect does not change what the handler did with the request's key (it
/// consumed it if the request succeeded, or failed with `keys_consumed_on_failure`). A failure
/// the handler never saw (413) consumes it here, with `keys_consumed_on_failure`; on any other
/// answer this repeats what the handler did, which changes nothing.
fn finish(
    shared: &Shared,
    endpoint: &str,
    limit: u32,
    after_fault: Option<Fault>,
    keyed: &KeyedRequest,
    mut response: Response,
) -> Option<Response> {
    let mut st = shared.lock();
    if let Some((scope, key)) = keyed
        && !response.status().is_success()
    {
        st.request_failed_with_key(scope, key);
    }
    if let Some(fault) = after_fault {
        if fault == Fault::Drop {
            st.count(endpoint, "dropped");
            return None;
        }
        let r = fault_response(fault);
        st.count(endpoint, r.status().as_str());
        return Some(r);
    }
    st.count(endpoint, response.status().as_str());
    let window = st.settings.window;
    let remaining = st.limiter.remaining(Instant::now(), limit, window);
    set_rate_headers(&mut response, limit, remaining);
    Some(response)
}

async fn gate(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let _in_flight = InFlight::enter(&shared);
    let endpoint = format!("{} {}", request.method(), request.uri().path());
    let dropper = request.extensions().get::<ConnectionDropper>().cloned();
    let authorized = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|key| shared.api_keys.iter().any(|k| k == key.trim()));
    let keyed: KeyedRequest = idempotency_scope(&endpoint).and_then(|scope| {
        let key = request.headers().get(IDEMPOTENCY_KEY)?.to_str().ok()?;
        is_valid_idempotency_key(key).then(|| (scope, key.to_owned()))
    });
    let (limit, after_fault, latency_ms) = match admit(&shared, &endpoint, authorized, &keyed) {
        Admission::Answer(r) => return r,
        Admission::Drop => return drop_connection(dropper).await,
        Admission::Pass {
            limit,
            after_fault,
            latency_ms,
        } => (limit, after_fault, latency_ms),
    };
    let response = as_loops_error(next.run(request).await);
    if latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(latency_ms)).await;
    }
    match finish(&shared, &endpoint, limit, after_fault, &keyed, response) {
        Some(r) => r,
        None => drop_connection(dropper).await,
    }
}

/// A JSON object body, or the 400 Loops would give.
fn json_object(headers: &HeaderMap, body: &Bytes) -> Result<Map<String, Value>, ApiError> {
    let content_type = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !content_type
        .to_ascii_lowercase()
        .starts_with("application/json")
    {
        return Err(ApiError::bad("Content-Type must be application/json."));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::bad("The request body must be a JSON object.")),
        Err(e) => Err(ApiError::bad(format!(
            "Invalid JSON in the request body: {e}"
        ))),
    }
}

async fn not_found() -> Response {
    failure(404, "Not found.")
}

async fn api_key(State(shared): State<Arc<Shared>>) -> Response {
    answer(Ok(shared.lock().api_key()))
}

async fn create_contact(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    answer(json_object(&headers, &body).and_then(|b| shared.lock().create_contact(&b)))
}

async fn update_contact(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    answer(json_object(&headers, &body).and_then(|b| shared.lock().update_contact(&b)))
}

async fn find_contact(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    answer(shared.lock().find_contact(&query))
}

async fn delete_contact(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    answer(json_object(&headers, &body).and_then(|b| shared.lock().delete_contact(&b)))
}

async fn list_properties(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    answer(shared.lock().list_properties(&query))
}

async fn create_property(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    answer(json_object(&headers, &body).and_then(|b| shared.lock().create_property(&b)))
}

async fn lists(State(shared): State<Arc<Shared>>) -> Response {
    answer(Ok(shared.lock().lists()))
}

async fn send_event(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let key = match headers.get(IDEMPOTENCY_KEY).map(|v| v.to_str()) {
        None => None,
        Some(Ok(k)) => Some(k.to_owned()),
        Some(Err(_)) => return failure(400, "Idempotency-Key must be text."),
    };
    answer(json_object(&headers, &body).and_then(|b| shared.lock().send_event(&b, key.as_deref())))
}

async fn sim_contacts(State(shared): State<Arc<Shared>>) -> Json<Value> {
    Json(shared.lock().contacts_json())
}

async fn sim_events(State(shared): State<Arc<Shared>>) -> Json<Value> {
    Json(serde_json::to_value(&shared.lock().events).expect("events serialize"))
}

async fn sim_workflows(State(shared): State<Arc<Shared>>) -> Json<Value> {
    Json(serde_json::to_value(&shared.lock().workflows).expect("workflows serialize"))
}

async fn sim_stats(State(shared): State<Arc<Shared>>) -> Json<Value> {
    Json(serde_json::to_value(shared.stats()).expect("stats serialize"))
}

async fn sim_faults_get(State(shared): State<Arc<Shared>>) -> Json<Faults> {
    Json(shared.lock().dice.faults.clone())
}

async fn sim_faults(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let faults: Faults = match serde_json::from_slice(&body) {
        Ok(f) => f,
        Err(e) => return failure(400, format!("Invalid faults: {e}")),
    };
    if let Err(e) = faults.validate() {
        return failure(400, e);
    }
    shared.lock().dice = FaultDice::new(faults.clone());
    Json(json!({"success": true, "faults": faults})).into_response()
}

async fn sim_settings_get(State(shared): State<Arc<Shared>>) -> Json<Settings> {
    Json(shared.lock().settings.clone())
}

async fn sim_settings(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let settings: Settings = match serde_json::from_slice(&body) {
        Ok(s) => s,
        Err(e) => return failure(400, format!("Invalid settings: {e}")),
    };
    if let Err(e) = shared.lock().set_settings(settings.clone()) {
        return failure(409, e.to_string());
    }
    Json(json!({"success": true, "settings": settings})).into_response()
}

async fn sim_add_list(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let list: MailingList = match serde_json::from_slice(&body) {
        Ok(l) => l,
        Err(e) => return failure(400, format!("Invalid list: {e}")),
    };
    let mut st = shared.lock();
    if st.audience.lists.iter().any(|l| l.id == list.id) {
        return failure(409, format!("List {} exists already.", list.id));
    }
    st.audience.lists.push(list.clone());
    Json(json!({"success": true, "list": list})).into_response()
}

async fn sim_reset(State(shared): State<Arc<Shared>>) -> Json<Value> {
    shared.lock().reset();
    Json(json!({"success": true}))
}

/// `POST /_sim/import?lists=a,b&trigger_loops=true`: a CSV upload (`bulk.rs`).
async fn sim_import(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let lists: Vec<String> = query
        .get("lists")
        .map(|l| loopsync_loops_csv::cell::read_lists(l))
        .unwrap_or_default();
    let trigger = match query.get("trigger_loops").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return failure(400, "trigger_loops must be true or false."),
    };
    match shared.lock().import(&body, &lists, trigger) {
        Ok(report) => {
            let mut answer = serde_json::to_value(report).expect("report serializes");
            answer["success"] = Value::Bool(true);
            Json(answer).into_response()
        }
        Err(e) => failure(e.status, e.message),
    }
}

/// `GET /_sim/export`: the audience as CSV (`bulk.rs`).
async fn sim_export(State(shared): State<Arc<Shared>>) -> Response {
    match shared.lock().export() {
        Ok(csv) => ([(CONTENT_TYPE, "text/csv; charset=utf-8")], csv).into_response(),
        Err(e) => failure(e.status, e.message),
    }
}
