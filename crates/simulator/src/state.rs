//! Everything the simulator remembers, and one method per API operation. Handlers lock the
//! state, call one of these, and unlock: each request is applied atomically.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use chrono::Utc;
use rand::Rng;
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::config::{Settings, SettingsError, SimConfig};
use crate::faults::FaultDice;
use crate::limiter::RateLimiter;
use crate::model::{
    ApiError, Audience, MAX_STRING_CHARS, Mode, PropertyType, WriteOutcome, identifiers,
    is_valid_email,
};

/// The endpoints that honour `Idempotency-Key` (§5), by the name the gate gives a request, and
/// the scope their keys are remembered under (per team and endpoint, §9).
pub fn idempotency_scope(endpoint: &str) -> Option<&'static str> {
    match endpoint {
        "POST /v1/events/send" => Some(EVENTS_SEND),
        _ => None,
    }
}

const EVENTS_SEND: &str = "events/send";

/// Whether an `Idempotency-Key` value is one Loops takes: 1 to 100 characters (§5). An invalid
/// key is answered 400 and never remembered.
pub fn is_valid_idempotency_key(key: &str) -> bool {
    (1..=100).contains(&key.chars().count())
}

/// One accepted event, as `/_sim/events` lists it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EventRecord {
    pub event_name: String,
    pub email: String,
    pub user_id: Option<String>,
    pub event_properties: Map<String, Value>,
    pub idempotency_key: Option<String>,
    pub at: String,
}

/// One workflow trigger that would have fired, as `/_sim/workflows` lists it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkflowTrigger {
    /// `contact_added`, `contact_updated`, `added_to_list` or `event_received`.
    pub kind: &'static str,
    pub contact_id: String,
    pub email: String,
    pub at: String,
    /// For `added_to_list`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub list_id: Option<String>,
    /// For `event_received`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_name: Option<String>,
    /// For `contact_updated`: the properties that changed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub properties: Vec<String>,
}

/// Request counters for `/_sim/stats`.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Stats {
    pub total_requests: u64,
    pub rate_limited: u64,
    pub max_accepted_in_one_second: u32,
    pub first_request_at: Option<String>,
    pub last_request_at: Option<String>,
    /// `"PUT /v1/contacts/update" → {"200": n, "400": n}`.
    pub by_endpoint: BTreeMap<String, BTreeMap<String, u64>>,
    /// Requests received and not yet answered: a test waits on it to know that a request
    /// it holds up (with added latency) has been sent.
    pub in_flight: u64,
}

/// The whole simulated team.
#[derive(Debug)]
pub struct SimState {
    pub settings: Settings,
    pub audience: Audience,
    pub events: Vec<EventRecord>,
    pub workflows: Vec<WorkflowTrigger>,
    /// `endpoint key` → when first accepted.
    idempotency: HashMap<String, Instant>,
    pub limiter: RateLimiter,
    pub dice: FaultDice,
    pub stats: Stats,
    initial: SimConfig,
}

fn now_text() -> String {
    crate::model::format_date(Utc::now())
}

/// A cuid-like contact id: `c` and 24 lower-case letters and digits.
pub(crate) fn new_contact_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let mut id = String::with_capacity(25);
    id.push('c');
    for _ in 0..24 {
        id.push(ALPHABET[rng.random_range(0..ALPHABET.len())] as char);
    }
    id
}

fn ok_id(id: &str) -> Value {
    json!({"success": true, "id": id})
}

impl SimState {
    pub fn new(config: &SimConfig) -> SimState {
        SimState {
            settings: config.settings.clone(),
            audience: Audience::new(
                config.lists.clone(),
                config.properties.clone(),
                config.settings.email_match,
            ),
            events: Vec::new(),
            workflows: Vec::new(),
            idempotency: HashMap::new(),
            limiter: RateLimiter::new(Instant::now(), config.settings.rate_limit),
            dice: FaultDice::default(),
            stats: Stats::default(),
            initial: config.clone(),
        }
    }

    /// `POST /_sim/reset`: back to how the simulator started.
    pub fn reset(&mut self) {
        *self = SimState::new(&self.initial.clone());
    }

    /// `POST /_sim/settings`: replaces every setting. Refused, with nothing changed, when the
    /// audience cannot follow (see [`SettingsError`]).
    pub fn set_settings(&mut self, settings: Settings) -> Result<(), SettingsError> {
        self.audience.set_email_match(settings.email_match)?;
        self.settings = settings;
        Ok(())
    }

    /// Counts one request that reached the API.
    pub fn count(&mut self, endpoint: &str, status: &str) {
        let now = now_text();
        self.stats.total_requests += 1;
        if self.stats.first_request_at.is_none() {
            self.stats.first_request_at = Some(now.clone());
        }
        self.stats.last_request_at = Some(now);
        *self
            .stats
            .by_endpoint
            .entry(endpoint.to_owned())
            .or_default()
            .entry(status.to_owned())
            .or_default() += 1;
    }

    pub fn stats(&self) -> Stats {
        let mut stats = self.stats.clone();
        stats.max_accepted_in_one_second = self.limiter.max_in_one_second();
        stats
    }

    fn trigger(&mut self, kind: &'static str, outcome: &WriteOutcome) -> WorkflowTrigger {
        WorkflowTrigger {
            kind,
            contact_id: outcome.id.clone(),
            email: outcome.email.clone(),
            at: now_text(),
            list_id: None,
            event_name: None,
            properties: Vec::new(),
        }
    }

    /// Logs the contact-level triggers of a write.
    pub(crate) fn log_write(&mut self, outcome: &WriteOutcome) {
        if outcome.created {
            let t = self.trigger("contact_added", outcome);
            self.workflows.push(t);
        } else if !outcome.changed.is_empty() {
            let mut t = self.trigger("contact_updated", outcome);
            t.properties = outcome.changed.clone();
            self.workflows.push(t);
        }
        for list in &outcome.added_to_lists {
            let mut t = self.trigger("added_to_list", outcome);
            t.list_id = Some(list.clone());
            self.workflows.push(t);
        }
    }

    /// `GET /v1/api-key`.
    pub fn api_key(&self) -> Value {
        json!({"success": true, "teamName": self.settings.team_name})
    }

    /// `POST /v1/contacts/create`.
    pub fn create_contact(&mut self, body: &Map<String, Value>) -> Result<Value, ApiError> {
        let write = self.audience.parse_write(body, &self.settings)?;
        if write.email.is_none() {
            return Err(ApiError::bad("email is required to create a contact."));
        }
        let target = self.audience.resolve(
            write.email.as_deref(),
            write.user_id.as_deref(),
            Mode::Create,
        )?;
        let outcome = self.audience.apply(target, write, new_contact_id());
        self.log_write(&outcome);
        Ok(ok_id(&outcome.id))
    }

    /// `PUT /v1/contacts/update`.
    pub fn update_contact(&mut self, body: &Map<String, Value>) -> Result<Value, ApiError> {
        let outcome = self.upsert(body)?;
        self.log_write(&outcome);
        Ok(ok_id(&outcome.id))
    }

    fn upsert(&mut self, body: &Map<String, Value>) -> Result<WriteOutcome, ApiError> {
        let write = self.audience.parse_write(body, &self.settings)?;
        if write.email.is_none() && write.user_id.is_none() {
            return Err(ApiError::bad("Provide an email or a userId."));
        }
        let target = self.audience.resolve(
            write.email.as_deref(),
            write.user_id.as_deref(),
            Mode::Upsert,
        )?;
        Ok(self.audience.apply(target, write, new_contact_id()))
    }

    /// `GET /v1/contacts/find`: exactly one of `email` and `userId`.
    pub fn find_contact(&self, query: &HashMap<String, String>) -> Result<Value, ApiError> {
        let email = query.get("email").filter(|s| !s.is_empty());
        let user_id = query.get("userId").filter(|s| !s.is_empty());
        let found = match (email, user_id) {
            (Some(e), None) => {
                if !is_valid_email(e) {
                    return Err(ApiError::bad(format!("Invalid email address: {e}")));
                }
                self.audience.find(Some(e), None)
            }
            (None, Some(u)) => self.audience.find(None, Some(u)),
            _ => {
                return Err(ApiError::bad(
                    "Provide exactly one of the email or userId parameters.",
                ));
            }
        };
        Ok(Value::Array(
            found
                .map(|c| self.audience.to_json(c))
                .into_iter()
                .collect(),
        ))
    }

    /// `POST /v1/contacts/delete`.
    pub fn delete_contact(&mut self, body: &Map<String, Value>) -> Result<Value, ApiError> {
        let (email, user_id) = identifiers(body)?;
        self.audience.delete(email.as_deref(), user_id.as_deref())?;
        Ok(json!({"success": true, "message": "Contact deleted."}))
    }

    /// `GET /v1/contacts/properties?list=all|custom`.
    pub fn list_properties(&self, query: &HashMap<String, String>) -> Result<Value, ApiError> {
        let custom_only = match query.get("list").map(String::as_str) {
            None | Some("all") => false,
            Some("custom") => true,
            Some(other) => {
                return Err(ApiError::bad(format!(
                    "list must be \"all\" or \"custom\", not \"{other}\"."
                )));
            }
        };
        let list = self
            .audience
            .properties()
            .into_iter()
            .filter(|(_, _, _, custom)| *custom || !custom_only)
            .map(|(key, label, kind, _)| json!({"key": key, "label": label, "type": kind}))
            .collect();
        Ok(Value::Array(list))
    }

    /// `POST /v1/contacts/properties`.
    pub fn create_property(&mut self, body: &Map<String, Value>) -> Result<Value, ApiError> {
        let name = match body.get("name") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => return Err(ApiError::bad("name is required.")),
        };
        let kind: PropertyType = match body.get("type") {
            Some(Value::String(s)) => s.parse().map_err(|_| {
                ApiError::bad("type must be one of string, number, boolean or date.")
            })?,
            _ => return Err(ApiError::bad("type is required.")),
        };
        self.audience.create_property(&name, kind)?;
        Ok(json!({"success": true}))
    }

    /// `GET /v1/lists`.
    pub fn lists(&self) -> Value {
        serde_json::to_value(&self.audience.lists).expect("lists serialize")
    }

    /// How long a key is remembered (`idempotency_ttl_seconds`; Loops: 24 h).
    fn idempotency_ttl(&self) -> Duration {
        Duration::from_secs(self.settings.idempotency_ttl_seconds)
    }

    /// Whether this idempotency key was accepted on this endpoint within the keys' lifetime
    /// (`idempotency_ttl_seconds`: 24 h, as Loops).
    pub fn idempotency_seen(&mut self, endpoint: &str, key: &str) -> bool {
        let now = Instant::now();
        let ttl = self.idempotency_ttl();
        if self.idempotency.len() > 100_000 {
            self.idempotency
                .retain(|_, at| now.duration_since(*at) < ttl);
        }
        let scoped = format!("{endpoint}\n{key}");
        matches!(self.idempotency.get(&scoped), Some(at) if now.duration_since(*at) < ttl)
    }

    /// Remembers a key as used from now, unless it is already remembered (its 24 h then still
    /// run from its first use).
    pub fn consume_idempotency(&mut self, endpoint: &str, key: &str) {
        if !self.idempotency_seen(endpoint, key) {
            // Inserted anew: a key remembered once and forgotten since starts again.
            self.idempotency
                .insert(format!("{endpoint}\n{key}"), Instant::now());
        }
    }

    /// A request that carried `key` to the idempotent endpoint `endpoint` failed — in its
    /// handler (400), or where the handler never saw it (a 5xx or a drop before the effect, a
    /// body refused before parsing): it consumes the key only with `keys_consumed_on_failure`.
    pub fn request_failed_with_key(&mut self, endpoint: &str, key: &str) {
        if self.settings.keys_consumed_on_failure {
            self.consume_idempotency(endpoint, key);
        }
    }

    /// `POST /v1/events/send`. The key is checked and consumed here, under the same lock as the
    /// effect, so a concurrent duplicate sees the first one's key and gets 409. A request that
    /// succeeds consumes its key; one that fails (400) consumes it only with
    /// `keys_consumed_on_failure`. A repeat (409) and an invalid key (400) change nothing.
    pub fn send_event(
        &mut self,
        body: &Map<String, Value>,
        idempotency_key: Option<&str>,
    ) -> Result<Value, ApiError> {
        let Some(key) = idempotency_key else {
            return self.apply_event(body, None);
        };
        if !is_valid_idempotency_key(key) {
            return Err(ApiError::bad(
                "Idempotency-Key must be between 1 and 100 characters.",
            ));
        }
        if self.idempotency_seen(EVENTS_SEND, key) {
            return Err(ApiError::conflict(
                "A request with this Idempotency-Key has already been processed.",
            ));
        }
        let result = self.apply_event(body, Some(key));
        if result.is_ok() {
            self.consume_idempotency(EVENTS_SEND, key);
        } else {
            self.request_failed_with_key(EVENTS_SEND, key);
        }
        result
    }

    /// The effect of an event: validation, the contact write, the event and its triggers.
    fn apply_event(
        &mut self,
        body: &Map<String, Value>,
        idempotency_key: Option<&str>,
    ) -> Result<Value, ApiError> {
        let event_name = match body.get("eventName") {
            Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
            _ => return Err(ApiError::bad("eventName is required.")),
        };
        if event_name.contains(':') {
            return Err(ApiError::bad("eventName cannot contain a colon (:)."));
        }
        if event_name.chars().count() > MAX_STRING_CHARS {
            return Err(ApiError::bad(format!(
                "eventName must be {MAX_STRING_CHARS} characters or fewer."
            )));
        }
        let event_properties = parse_event_properties(body.get("eventProperties"))?;
        let outcome = self.upsert(body)?;
        self.log_write(&outcome);
        let mut received = self.trigger("event_received", &outcome);
        received.event_name = Some(event_name.clone());
        self.workflows.push(received);
        self.events.push(EventRecord {
            event_name,
            email: outcome.email,
            user_id: outcome.user_id,
            event_properties,
            idempotency_key: idempotency_key.map(str::to_owned),
            at: now_text(),
        });
        Ok(json!({"success": true}))
    }

    /// `/_sim/contacts`.
    pub fn contacts_json(&self) -> Value {
        Value::Array(
            self.audience
                .all()
                .map(|c| self.audience.to_json(c))
                .collect(),
        )
    }
}

/// `eventProperties`: an object (or `[]`, or absent) of strings, numbers, booleans or dates.
fn parse_event_properties(value: Option<&Value>) -> Result<Map<String, Value>, ApiError> {
    let map = match value {
        None | Some(Value::Null) => return Ok(Map::new()),
        Some(Value::Array(items)) if items.is_empty() => return Ok(Map::new()),
        Some(Value::Object(map)) => map,
        Some(_) => return Err(ApiError::bad("eventProperties must be an object.")),
    };
    let mut clean = Map::new();
    for (key, value) in map {
        let key = key.trim();
        match value {
            Value::String(s) if s.chars().count() > MAX_STRING_CHARS => {
                return Err(ApiError::bad(format!(
                    "eventProperties.{key} must be {MAX_STRING_CHARS} characters or fewer."
                )));
            }
            Value::String(_) | Value::Number(_) | Value::Bool(_) | Value::Null => {}
            _ => {
                return Err(ApiError::bad(format!(
                    "eventProperties.{key} must be a string, number, boolean or date."
                )));
            }
        }
        clean.insert(key.to_owned(), value.clone());
    }
    Ok(clean)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> SimState {
        SimState::new(&SimConfig::default())
    }

    fn body(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn idempotency_key_repeat_is_409_and_applied_once() {
        let mut s = state();
        let b = body(json!({"eventName": "signup", "email": "a@x.co"}));
        assert!(s.send_event(&b, Some("k1")).is_ok());
        assert_eq!(s.send_event(&b, Some("k1")).unwrap_err().status, 409);
        assert_eq!(s.events.len(), 1);
        assert!(s.send_event(&b, Some("k2")).is_ok());
        assert!(s.send_event(&b, None).is_ok());
        assert_eq!(s.events.len(), 3);
    }

    #[test]
    fn failed_request_does_not_consume_its_key() {
        let mut s = state();
        let bad = body(json!({"eventName": "signup", "userId": "unknown"}));
        assert_eq!(s.send_event(&bad, Some("k")).unwrap_err().status, 400);
        let good = body(json!({"eventName": "signup", "email": "a@x.co"}));
        assert!(s.send_event(&good, Some("k")).is_ok());
    }

    #[test]
    fn with_keys_consumed_on_failure_a_failed_request_consumes_its_key() {
        let mut s = state();
        s.set_settings(Settings {
            keys_consumed_on_failure: true,
            ..Settings::default()
        })
        .unwrap();
        let bad = body(json!({"eventName": "signup", "userId": "unknown"}));
        assert_eq!(s.send_event(&bad, Some("k")).unwrap_err().status, 400);
        let good = body(json!({"eventName": "signup", "email": "a@x.co"}));
        assert_eq!(s.send_event(&good, Some("k")).unwrap_err().status, 409);
        assert!(s.events.is_empty());
        assert_eq!(s.audience.contact_count(), 0);
        // A request without a key is not affected, and another key is free.
        assert!(s.send_event(&good, None).is_ok());
        assert!(s.send_event(&good, Some("k2")).is_ok());
        assert_eq!(s.events.len(), 2);
    }

    #[test]
    fn an_invalid_key_is_never_remembered() {
        for consumed in [false, true] {
            let mut s = state();
            s.set_settings(Settings {
                keys_consumed_on_failure: consumed,
                ..Settings::default()
            })
            .unwrap();
            let long = "k".repeat(101);
            s.request_failed_with_key("events/send", "k");
            let b = body(json!({"eventName": "signup", "email": "a@x.co"}));
            assert_eq!(s.send_event(&b, Some(&long)).unwrap_err().status, 400);
            assert!(!s.idempotency_seen("events/send", &long));
            assert_eq!(s.idempotency_seen("events/send", "k"), consumed);
        }
    }

    #[test]
    fn idempotency_key_over_100_characters_is_400() {
        let mut s = state();
        let b = body(json!({"eventName": "signup", "email": "a@x.co"}));
        assert_eq!(
            s.send_event(&b, Some(&"k".repeat(101))).unwrap_err().status,
            400
        );
        assert!(s.send_event(&b, Some(&"k".repeat(100))).is_ok());
    }

    #[test]
    fn event_creates_contact_and_fires_added_then_received() {
        let mut s = state();
        let b = body(
            json!({"eventName": "signup", "email": "a@x.co", "firstName": "Ann",
                            "eventProperties": {"plan": "pro", "at": "2024-03-07T10:09:23Z"}}),
        );
        s.send_event(&b, None).unwrap();
        let kinds: Vec<_> = s.workflows.iter().map(|w| w.kind).collect();
        assert_eq!(kinds, ["contact_added", "event_received"]);
        assert_eq!(s.audience.contact_count(), 1);
        assert_eq!(s.events[0].event_properties["plan"], "pro");
        assert_eq!(s.events[0].email, "a@x.co");
    }

    #[test]
    fn event_rules() {
        let mut s = state();
        for (b, needle) in [
            (json!({"email": "a@x.co"}), "eventName"),
            (json!({"eventName": "a:b", "email": "a@x.co"}), "colon"),
            (
                json!({"eventName": "e", "email": "a@x.co", "eventProperties": {"x": {"y": 1}}}),
                "eventProperties.x",
            ),
            (json!({"eventName": "e"}), "email or a userId"),
        ] {
            let e = s.send_event(&body(b), None).unwrap_err();
            assert_eq!(e.status, 400);
            assert!(e.message.contains(needle), "{}", e.message);
        }
        assert!(
            s.send_event(
                &body(json!({"eventName": "e", "email": "a@x.co", "eventProperties": []})),
                None
            )
            .is_ok()
        );
    }

    #[test]
    fn contact_updated_fires_only_on_a_real_change() {
        let mut s = state();
        s.update_contact(&body(json!({"email": "a@x.co", "firstName": "Ann"})))
            .unwrap();
        s.update_contact(&body(json!({"email": "a@x.co", "firstName": "Ann"})))
            .unwrap();
        s.update_contact(&body(json!({"email": "a@x.co", "firstName": "Anne"})))
            .unwrap();
        let kinds: Vec<_> = s.workflows.iter().map(|w| w.kind).collect();
        assert_eq!(kinds, ["contact_added", "contact_updated"]);
        assert_eq!(s.workflows[1].properties, ["firstName"]);
    }

    #[test]
    fn create_needs_email_and_conflicts_409() {
        let mut s = state();
        assert_eq!(
            s.create_contact(&body(json!({"userId": "u"})))
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(
            s.create_contact(&body(json!({"email": "bad"})))
                .unwrap_err()
                .status,
            400
        );
        s.create_contact(&body(json!({"email": "a@x.co"}))).unwrap();
        assert_eq!(
            s.create_contact(&body(json!({"email": "a@x.co"})))
                .unwrap_err()
                .status,
            409
        );
    }

    #[test]
    fn find_needs_exactly_one_parameter() {
        let s = state();
        let q = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>()
        };
        assert_eq!(s.find_contact(&q(&[])).unwrap_err().status, 400);
        assert_eq!(
            s.find_contact(&q(&[("email", "a@x.co"), ("userId", "u")]))
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(
            s.find_contact(&q(&[("email", "nope")])).unwrap_err().status,
            400
        );
        assert_eq!(
            s.find_contact(&q(&[("email", "a@x.co")])).unwrap(),
            json!([])
        );
    }

    #[test]
    fn reset_forgets_everything() {
        let mut s = state();
        s.update_contact(&body(json!({"email": "a@x.co"}))).unwrap();
        s.count("PUT /v1/contacts/update", "200");
        s.reset();
        assert_eq!(s.audience.contact_count(), 0);
        assert!(s.workflows.is_empty());
        assert_eq!(s.stats().total_requests, 0);
    }
}
