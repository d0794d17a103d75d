//! The status page's pages. `/`: every sync's status (`loopsync_engine::status`, as `loopsync
//! status` has it) with its run history as charts: counts only, no key, email or value.
//! `/sync/NAME/rejections` and `/record/SYNC/KEY` show records: only to a request with the token
//! (see [`super::auth`]); any other gets the sign-in form. Everything is read from the state.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::header::{CONTENT_TYPE, LOCATION, SET_COOKIE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use loopsync_engine::record::RecordReport;
use loopsync_engine::status::{HistoryRun, SyncStatus, history, status};

use super::App;
use super::auth::COOKIE_NAME;
use super::charts::{self, Series};
use super::html::{Html, page};

/// Runs charted per sync.
const HISTORY: i64 = 30;
/// Reasons charted per sync; the others are one row.
const REASON_ROWS: usize = 8;

fn html(status: StatusCode, body: String) -> Response {
    let mut response = (status, body).into_response();
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    response
}

/// A page that says what went wrong.
fn trouble(status: StatusCode, title: &str, what: &str, signed_in: bool) -> Response {
    let mut body = Html::default();
    body.raw("<h1>")
        .text(title)
        .raw("</h1><p class=\"error\">")
        .text(what)
        .raw("</p>");
    html(status, page(title, signed_in, false, body))
}

/// `segments` as a path, each percent-encoded.
pub fn path(segments: &[&str]) -> String {
    let mut url = url::Url::parse("http://x/").expect("a base URL");
    url.path_segments_mut()
        .expect("a base URL has a path")
        .extend(segments);
    url.path().to_owned()
}

/// `/`: every sync's status and charts.
pub async fn index(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let signed_in = app.auth.allows(&headers);
    let now = chrono::Utc::now();
    let status = match status(&*app.warehouse, &app.syncs, None, now).await {
        Ok(status) => status,
        Err(e) => {
            return trouble(
                StatusCode::INTERNAL_SERVER_ERROR,
                "status",
                &format!("the state could not be read: {e}"),
                signed_in,
            );
        }
    };
    let mut body = Html::default();
    body.raw("<h1>Syncs</h1><p class=\"muted\">as of ")
        .text(&status.at)
        .raw(" · read from the state, every 30 s");
    if app.auth.has_token() && !signed_in {
        body.raw(" · <a href=\"/login\">sign in</a> to see records");
    }
    body.raw("</p>");
    for sync in &status.syncs {
        let runs = match history(&*app.warehouse, &sync.sync, HISTORY).await {
            Ok(runs) => runs,
            Err(e) => {
                return trouble(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "status",
                    &format!("the runs of sync {} could not be read: {e}", sync.sync),
                    signed_in,
                );
            }
        };
        sync_section(&mut body, sync, &runs, signed_in);
    }
    if status.syncs.is_empty() {
        body.raw("<p>The config has no sync.</p>");
    }
    html(StatusCode::OK, page("status", signed_in, true, body))
}

/// One sync's status and charts. A run's error may quote the warehouse or Loops (a value, an
/// email): it is shown only to a request with the token.
fn sync_section(h: &mut Html, s: &SyncStatus, runs: &[HistoryRun], signed_in: bool) {
    h.raw("<section class=\"sync\" data-sync=\"")
        .text(&s.sync)
        .raw("\"><h2>")
        .text(&s.sync)
        .raw("</h2><dl class=\"status\"><dt>behavior</dt><dd>")
        .text(&s.behavior)
        .raw("</dd><dt>schedule</dt><dd class=\"schedule\">");
    match (&s.schedule, &s.next_run_at) {
        (Some(schedule), Some(next)) => {
            h.text(schedule).raw(" · next run ").text(next);
        }
        (Some(schedule), None) => {
            h.text(schedule).raw(" · fires no more");
        }
        (None, _) => {
            h.raw("none");
        }
    }
    h.raw("</dd><dt>last run</dt><dd class=\"last-run\">");
    match &s.last_run {
        None => {
            h.raw("none yet");
        }
        Some(run) => {
            h.raw("run ")
                .num(run.id)
                .raw(" · <span class=\"run-status st-")
                .raw(run.status.as_str())
                .raw("\">")
                .raw(run.status.as_str())
                .raw("</span> · requested ")
                .text(&run.requested_at);
            if let Some(ms) = run.duration_ms {
                h.raw(" · ").dec(ms as f64 / 1000.0).raw(" s");
            }
            h.raw("<br>added ")
                .num(run.added)
                .raw(" · changed ")
                .num(run.changed)
                .raw(" · removed ")
                .num(run.removed)
                .raw(" · unchanged ")
                .num(run.unchanged)
                .raw(" · invalid ")
                .num(run.invalid)
                .raw(" · rejected ")
                .num(run.rejected)
                .raw(" · dead-lettered ")
                .num(run.dead_lettered)
                .raw(" · ")
                .num(run.requests)
                .raw(" requests");
            match &run.error {
                Some(error) if signed_in => {
                    h.raw("<br><span class=\"error\">")
                        .text(error)
                        .raw("</span>");
                }
                Some(_) => {
                    h.raw(
                        "<br><span class=\"error\">an error, shown with the token (or by \
                         loopsync runs)</span>",
                    );
                }
                None => {}
            }
        }
    }
    let p = &s.pending;
    h.raw("</dd><dt>pending</dt><dd class=\"pending\">")
        .num(p.records)
        .raw(" records · to retry ")
        .num(p.retried)
        .raw(" (invalid ")
        .num(p.invalid)
        .raw(" · rejected ")
        .num(p.rejected)
        .raw(" · dead-lettered ")
        .num(p.dead_lettered)
        .raw(") · in flight ")
        .num(p.in_flight)
        .raw("</dd><dt>dead letters</dt><dd class=\"dead-letters\">")
        .num(s.dead_letters.records)
        .raw(" · parked ")
        .num(s.dead_letters.parked)
        .raw("</dd>");
    if let Some(d) = &s.degraded {
        h.raw("<dt>why degraded</dt><dd class=\"degraded\">run ")
            .num(d.run_id)
            .raw(": invalid ")
            .num(d.invalid)
            .raw(" · rejected ")
            .num(d.rejected)
            .raw(" · dead-lettered ")
            .num(d.dead_lettered)
            .raw("<ul>");
        for r in &d.reasons {
            h.raw("<li>")
                .num(r.records)
                .raw(" ")
                .text(&r.outcome.replace('_', "-"))
                .raw(": ")
                .text(&r.reason)
                .raw("</li>");
        }
        h.raw("</ul></dd>");
    }
    h.raw("</dl><p><a class=\"rejections\" href=\"")
        .text(&path(&["sync", &s.sync, "rejections"]))
        .raw("\">records that did not go through</a> <span class=\"muted\">(token)</span></p>");
    charts_of(h, runs);
    h.raw("</section>");
}

/// The four charts of a sync's runs.
fn charts_of(h: &mut Html, runs: &[HistoryRun]) {
    let ids: Vec<i64> = runs.iter().map(|r| r.run.id).collect();
    let of = |f: fn(&HistoryRun) -> i64| runs.iter().map(f).collect::<Vec<i64>>();
    let series = |label: &str, class: &'static str, values: Vec<i64>| Series {
        label: label.to_owned(),
        class,
        values,
    };
    let records = [
        series("added", "s-added", of(|r| r.run.added)),
        series("changed", "s-changed", of(|r| r.run.changed)),
        series("removed", "s-removed", of(|r| r.run.removed)),
        series("unchanged", "s-unchanged", of(|r| r.run.unchanged)),
        series("invalid", "s-invalid", of(|r| r.run.invalid)),
        series("rejected", "s-rejected", of(|r| r.run.rejected)),
        series(
            "dead-lettered",
            "s-dead_lettered",
            of(|r| r.run.dead_lettered),
        ),
    ];
    let requests = [
        series("requests", "s-requests", of(|r| r.run.requests)),
        series("retries", "s-retries", of(|r| r.run.retries)),
        series(
            "rate-limited (429)",
            "s-rate_limited",
            of(|r| r.run.rate_limited),
        ),
    ];
    let seconds: Vec<Option<f64>> = runs
        .iter()
        .map(|r| r.run.duration_ms.map(|ms| ms as f64 / 1000.0))
        .collect();
    h.raw("<div class=\"charts\"><figure><figcaption>records per run</figcaption>");
    charts::bars(h, "records", &ids, &records, "records");
    h.raw("</figure><figure><figcaption>requests to Loops per run</figcaption>");
    charts::bars(h, "requests", &ids, &requests, "requests");
    h.raw("</figure><figure><figcaption>duration per run</figcaption>");
    charts::line(h, "durations", &ids, &seconds);
    h.raw("</figure><figure><figcaption>failed records per run, by reason</figcaption>");
    charts::bars(h, "reasons", &ids, &reason_series(runs), "records");
    h.raw("</figure></div>");
}

/// One series per kind of reason (the most frequent first), the rest as one.
fn reason_series(runs: &[HistoryRun]) -> Vec<Series> {
    let mut totals: BTreeMap<String, i64> = BTreeMap::new();
    for run in runs {
        for r in &run.reasons {
            *totals.entry(label(&r.outcome, &r.reason)).or_default() += r.records;
        }
    }
    let mut order: Vec<(String, i64)> = totals.into_iter().collect();
    order.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let shown: Vec<String> = order
        .iter()
        .take(REASON_ROWS)
        .map(|(l, _)| l.clone())
        .collect();
    let mut series: Vec<Series> = shown
        .iter()
        .map(|l| Series {
            label: l.clone(),
            class: "s-reason",
            values: runs
                .iter()
                .map(|run| {
                    run.reasons
                        .iter()
                        .filter(|r| label(&r.outcome, &r.reason) == *l)
                        .map(|r| r.records)
                        .sum()
                })
                .collect(),
        })
        .collect();
    if order.len() > REASON_ROWS {
        series.push(Series {
            label: "other reasons".into(),
            class: "s-reason",
            values: runs
                .iter()
                .map(|run| {
                    run.reasons
                        .iter()
                        .filter(|r| !shown.contains(&label(&r.outcome, &r.reason)))
                        .map(|r| r.records)
                        .sum()
                })
                .collect(),
        });
    }
    series
}

fn label(outcome: &str, reason: &str) -> String {
    format!("{}: {reason}", outcome.replace('_', "-"))
}

/// Whether `name` is a sync of the config.
fn known(app: &App, name: &str) -> bool {
    app.syncs.iter().any(|s| s.spec.name == name)
}

/// The sign-in form, for a request without the token to a page of records (`next`).
fn sign_in(app: &App, next: &str, wrong: bool) -> Response {
    let mut body = Html::default();
    body.raw("<h1>Sign in</h1>");
    if !app.auth.has_token() {
        body.raw(
            "<p class=\"error\">Records (keys, emails, values) are shown only when loopsync \
             run is started with --http-token-file FILE.</p>",
        );
        return html(StatusCode::FORBIDDEN, page("sign in", false, false, body));
    }
    body.raw(
        "<p>This page shows records: keys, emails and values. Give the token of \
         --http-token-file.</p>",
    );
    if wrong {
        body.raw("<p class=\"error wrong-token\">That is not the token.</p>");
    }
    body.raw("<form class=\"token\" method=\"post\" action=\"/login\"><input type=\"hidden\" name=\"next\" value=\"")
        .text(next)
        .raw(
            "\"><label>token <input type=\"password\" name=\"token\" \
             autocomplete=\"current-password\" required autofocus></label> \
             <button type=\"submit\">sign in</button></form>",
        );
    html(
        StatusCode::UNAUTHORIZED,
        page("sign in", false, false, body),
    )
}

/// `next` if it is a path of this site, else `/` (no redirect elsewhere).
fn local(next: &str) -> &str {
    if next.starts_with('/') && !next.starts_with("//") && !next.contains('\\') {
        next
    } else {
        "/"
    }
}

#[derive(Debug, serde::Deserialize)]
pub struct Next {
    next: Option<String>,
}

/// `GET /login`: the form.
pub async fn login_form(State(app): State<Arc<App>>, Query(q): Query<Next>) -> Response {
    sign_in(&app, local(q.next.as_deref().unwrap_or("/")), false)
}

/// `POST /login`: the token, from the form; the session cookie and back to `next`, or the form
/// again.
pub async fn login(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let mut token = String::new();
    let mut next = "/".to_owned();
    for (name, value) in url::form_urlencoded::parse(&body) {
        match &*name {
            "token" => token = value.into_owned(),
            "next" => next = value.into_owned(),
            _ => {}
        }
    }
    let next = local(&next).to_owned();
    let Some(session) = app.auth.session().filter(|_| app.auth.is_token(&token)) else {
        // A wrong token costs a moment: guessing is slow.
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        return sign_in(&app, &next, app.auth.has_token());
    };
    let mut response = StatusCode::SEE_OTHER.into_response();
    let headers = response.headers_mut();
    if let Ok(location) = HeaderValue::from_str(&next) {
        headers.insert(LOCATION, location);
    }
    headers.insert(
        SET_COOKIE,
        HeaderValue::from_str(&format!(
            "{COOKIE_NAME}={session}; Path=/; HttpOnly; SameSite=Strict"
        ))
        .expect("hex digits"),
    );
    response
}

/// `POST /logout`: the session cookie forgotten.
pub async fn logout() -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    let headers = response.headers_mut();
    headers.insert(LOCATION, HeaderValue::from_static("/"));
    headers.insert(
        SET_COOKIE,
        HeaderValue::from_static("loopsync_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    response
}

/// `/sync/NAME/rejections`: the sync's invalid, rejected and dead-lettered records (token).
pub async fn rejections(
    State(app): State<Arc<App>>,
    Path(sync): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !known(&app, &sync) {
        return trouble(StatusCode::NOT_FOUND, "not found", "no such sync", false);
    }
    let here = path(&["sync", &sync, "rejections"]);
    if !app.auth.allows(&headers) {
        return sign_in(&app, &here, false);
    }
    let (mut records, parked) = match (
        app.warehouse.rejections(Some(&sync)).await,
        app.warehouse.parked(Some(&sync)).await,
    ) {
        (Ok(records), Ok(parked)) => (records, parked),
        (Err(e), _) | (_, Err(e)) => {
            return trouble(
                StatusCode::INTERNAL_SERVER_ERROR,
                "rejections",
                &format!("the state could not be read: {e}"),
                true,
            );
        }
    };
    records.sort_by(|a, b| crate::output::key_order(&a.key, &b.key));
    let mut body = Html::default();
    body.raw("<h1>Records of ")
        .text(&sync)
        .raw(" that did not go through</h1><p class=\"muted\">Each record whose latest outcome is \
              invalid, rejected or dead-lettered, with its reason. The next run tries each \
              again, unless it is parked.</p>")
        .raw("<form class=\"lookup\" method=\"get\" action=\"/record\"><input type=\"hidden\" name=\"sync\" value=\"")
        .text(&sync)
        .raw(
            "\"><label>a record by its key <input name=\"key\" required></label> \
             <button type=\"submit\">show</button></form>",
        );
    if records.is_empty() {
        body.raw("<p>None.</p>");
    } else {
        body.raw(
            "<table class=\"rejections\"><thead><tr><th>key</th><th>outcome</th><th>run</th>\
             <th>at</th><th>reason</th></tr></thead><tbody>",
        );
        for r in &records {
            body.raw("<tr><td class=\"key\"><a href=\"")
                .text(&path(&["record", &sync, &r.key]))
                .raw("\">")
                .text(&r.key)
                .raw("</a></td><td>")
                .raw(r.outcome.as_str());
            if parked.iter().any(|(_, k)| *k == r.key) {
                body.raw(" (parked)");
            }
            body.raw("</td><td>")
                .num(r.run_id)
                .raw("</td><td>")
                .text(&r.at)
                .raw("</td><td>")
                .opt(r.reason.as_deref())
                .raw("</td></tr>");
        }
        body.raw("</tbody></table>");
    }
    html(StatusCode::OK, page("rejections", true, false, body))
}

#[derive(Debug, serde::Deserialize)]
pub struct Lookup {
    sync: String,
    key: String,
}

/// `/record?sync=S&key=K` (the lookup form): to `/record/S/K`.
pub async fn lookup(Query(q): Query<Lookup>) -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    if let Ok(location) = HeaderValue::from_str(&path(&["record", &q.sync, q.key.trim()])) {
        response.headers_mut().insert(LOCATION, location);
    }
    response
}

/// `/record/SYNC/KEY`: one record, as `loopsync record` shows it (token).
pub async fn record(
    State(app): State<Arc<App>>,
    Path((sync, key)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let Some(spec) = app
        .syncs
        .iter()
        .find(|s| s.spec.name == sync)
        .map(|s| &s.spec)
    else {
        return trouble(StatusCode::NOT_FOUND, "not found", "no such sync", false);
    };
    if !app.auth.allows(&headers) {
        return sign_in(&app, &path(&["record", &sync, &key]), false);
    }
    match loopsync_engine::record::record(&*app.warehouse, spec, &key).await {
        Ok(Some(report)) => html(
            StatusCode::OK,
            page("record", true, false, record_body(&report)),
        ),
        Ok(None) => trouble(
            StatusCode::NOT_FOUND,
            "no such record",
            "this sync has no such record: not in its model, its state or its results",
            true,
        ),
        Err(e) => trouble(
            StatusCode::INTERNAL_SERVER_ERROR,
            "record",
            &format!("the record could not be read: {e}"),
            true,
        ),
    }
}

fn json(value: &impl serde::Serialize) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

fn record_body(r: &RecordReport) -> Html {
    let mut h = Html::default();
    h.raw("<h1>Record <span class=\"key\">")
        .text(&r.key)
        .raw("</span> of ")
        .text(&r.sync)
        .raw("</h1><dl class=\"status\"><dt>state</dt><dd class=\"state\">");
    match &r.state {
        None => {
            h.raw("nothing kept (never sent, or forgotten)");
        }
        Some(s) => {
            if s.confirmed {
                h.raw("confirmed by Loops in run ")
                    .num(s.confirmed_run.unwrap_or_default())
                    .raw(" at ")
                    .opt(s.confirmed_at.as_deref())
                    .raw("<br>email ")
                    .opt(s.confirmed_email.as_deref())
                    .raw(" · userId ")
                    .opt(s.confirmed_user_id.as_deref())
                    .raw(" · contact ")
                    .opt(s.contact_id.as_deref());
            } else if s.removed {
                h.raw("its contact was removed from Loops in run ")
                    .num(s.confirmed_run.unwrap_or_default());
            } else {
                h.raw("never confirmed by Loops");
            }
            if s.repaired {
                h.raw("<br>forgotten by verify --repair: the next run sends it again");
            }
            if s.parked {
                h.raw("<br>parked");
            }
            if s.sent_unconfirmed {
                h.raw("<br>the version of run ")
                    .num(s.sent_run.unwrap_or_default())
                    .raw(" has not been confirmed by Loops");
            }
        }
    }
    h.raw("</dd>");
    if let Some(v) = &r.confirmed_values {
        h.raw("<dt>confirmed values</dt><dd class=\"confirmed-values\">email ")
            .opt(v.email.as_deref())
            .raw(" · userId ")
            .opt(v.user_id.as_deref())
            .raw("<br>properties ")
            .text(&json(&v.properties))
            .raw("<br>mailing lists ")
            .text(&json(&v.mailing_lists))
            .raw("</dd>");
    }
    if let Some(d) = &r.dead_letter {
        h.raw("<dt>dead letter</dt><dd>run ").num(d.run_id);
        if d.parked {
            h.raw(" (parked)");
        }
        h.raw("</dd>");
    }
    h.raw("<dt>next run</dt><dd class=\"next\">")
        .text(&r.next.change)
        .raw(" · ")
        .text(&r.next.operation);
    if let Some(action) = &r.next.action {
        h.raw("<br><code>").text(&json(action)).raw("</code>");
    }
    if let Some(reason) = &r.next.reason {
        h.raw("<br>").text(reason);
    }
    h.raw("</dd></dl><h2>Outcomes</h2>");
    if r.outcomes.is_empty() {
        h.raw("<p>None kept.</p>");
    } else {
        h.raw(
            "<table class=\"outcomes\"><thead><tr><th>run</th><th>at</th><th>change</th>\
             <th>operation</th><th>outcome</th><th>answer</th><th>requests</th>\
             <th>contact</th><th>reason</th></tr></thead><tbody>",
        );
        for o in &r.outcomes {
            let x = &o.outcome.result;
            h.raw("<tr><td>")
                .num(x.run_id)
                .raw("</td><td>")
                .text(&x.at)
                .raw("</td><td>")
                .opt(o.outcome.change.as_deref())
                .raw("</td><td>")
                .text(&x.operation)
                .raw("</td><td>")
                .raw(x.outcome.as_str())
                .raw("</td><td>");
            match o.status {
                Some(s) => h.num(s),
                None => h.raw("-"),
            };
            h.raw("</td><td>")
                .num(x.requests)
                .raw("</td><td>")
                .opt(x.contact_id.as_deref())
                .raw("</td><td>")
                .opt(x.reason.as_deref())
                .raw("</td></tr>");
        }
        h.raw("</tbody></table>");
    }
    if !r.attempts.is_empty() {
        h.raw(
            "<h2>Failed attempts</h2><table class=\"attempts\"><thead><tr><th>run</th>\
             <th>at</th><th>attempt</th><th>requests</th><th>answer</th><th>reason</th></tr>\
             </thead><tbody>",
        );
        for a in &r.attempts {
            let x = &a.attempt;
            h.raw("<tr><td>")
                .num(x.run_id)
                .raw("</td><td>")
                .text(&x.at)
                .raw("</td><td>")
                .text(&x.attempt)
                .raw("</td><td>")
                .num(x.requests)
                .raw("</td><td>");
            match a.status {
                Some(s) => h.num(s),
                None => h.raw("-"),
            };
            h.raw("</td><td>")
                .opt(x.reason.as_deref())
                .raw("</td></tr>");
        }
        h.raw("</tbody></table>");
    }
    h
}

/// `/style.css`.
pub async fn style() -> Response {
    let mut response = super::html::STYLE.into_response();
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/css; charset=utf-8"),
    );
    response
}

/// Any other path.
pub async fn not_found() -> Response {
    trouble(StatusCode::NOT_FOUND, "not found", "no such page", false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_encoded_and_redirects_stay_here() {
        assert_eq!(
            path(&["record", "users", "a/b c?#%"]),
            "/record/users/a%2Fb%20c%3F%23%25"
        );
        assert_eq!(local("/sync/users/rejections"), "/sync/users/rejections");
        for elsewhere in ["//evil.example/x", "https://evil.example/", "/\\evil", "x"] {
            assert_eq!(local(elsewhere), "/", "{elsewhere}");
        }
    }
}
