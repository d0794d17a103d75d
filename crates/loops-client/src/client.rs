//! The HTTP client itself.

use std::sync::Mutex;
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, USER_AGENT};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::Value;

use loopsync_core::tuning::{LOOPS_SLOW_ANSWER, LOOPS_SLOW_ANSWER_EVERY, MAX_LOOPS_BODY_BYTES};

use crate::LoopsError;
use crate::error::classify;
use crate::rate_limit::RateLimitInfo;
use crate::types::{
    ApiKey, ApiKeyInfo, Contact, ContactIdentity, ContactPayload, ContactProperty, EventPayload,
    IdempotencyKey, MailingList, PropertyKind,
};

/// Where and how to reach Loops.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The API root, without `/v1`: `https://app.loops.so/api`, or a simulator's
    /// `http://127.0.0.1:PORT/api`.
    pub base_url: String,
    pub api_key: ApiKey,
    /// Per request, connection included. loops-go uses 5 s; we default to 10 s.
    pub timeout: Duration,
}

impl ClientConfig {
    pub const DEFAULT_BASE_URL: &'static str = "https://app.loops.so/api";
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

    pub fn new(base_url: impl Into<String>, api_key: ApiKey) -> ClientConfig {
        ClientConfig {
            base_url: base_url.into(),
            api_key,
            timeout: Self::DEFAULT_TIMEOUT,
        }
    }
}

/// A Loops API client. Cheap to clone; clones share the connection pool.
#[derive(Debug, Clone)]
pub struct LoopsClient {
    http: reqwest::Client,
    base_url: String,
    api_key: ApiKey,
    timeout: Duration,
    last_rate_limit: std::sync::Arc<Mutex<RateLimitInfo>>,
}

impl LoopsClient {
    pub fn new(config: ClientConfig) -> Result<LoopsClient, LoopsError> {
        // reqwest is built without a bundled crypto provider; use ring, which async-nats uses
        // too, so the binary carries one TLS stack. Installing twice is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(5)))
            // A redirect would re-send the body (contacts' data) and the key elsewhere: a 3xx
            // is an answer of its own, classified as such (`LoopsError::Redirected`).
            .redirect(reqwest::redirect::Policy::none())
            // Nothing tells another host which request led to it (`contacts/find?email=…`).
            .referer(false)
            .build()
            .map_err(|e| LoopsError::Usage(format!("cannot build the HTTP client: {e}")))?;
        Ok(LoopsClient {
            http,
            base_url: config.base_url.trim_end_matches('/').to_owned(),
            api_key: config.api_key,
            timeout: config.timeout,
            last_rate_limit: Default::default(),
        })
    }

    /// How long one request may go without an answer.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The API root this client sends to (`https://app.loops.so/api`), without a trailing slash.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The rate-limit headers of the most recent answer.
    pub fn last_rate_limit(&self) -> RateLimitInfo {
        *self.last_rate_limit.lock().expect("rate-limit mutex")
    }

    /// `GET /v1/api-key`: is the key valid, and for which team.
    pub async fn test_api_key(&self) -> Result<ApiKeyInfo, LoopsError> {
        let body = self
            .send(Method::GET, "/v1/api-key", &[], None, None)
            .await?;
        decode(StatusCode::OK, &body)
    }

    /// `POST /v1/contacts/create`; returns the new contact's id. 409 if the email or userId exists.
    pub async fn create_contact(&self, contact: &ContactPayload) -> Result<String, LoopsError> {
        if contact.email.is_none() {
            return Err(LoopsError::Usage(
                "creating a contact needs an email".into(),
            ));
        }
        let body = contact.to_json();
        let answer = self
            .send(Method::POST, "/v1/contacts/create", &[], Some(&body), None)
            .await?;
        contact_id(&answer)
    }

    /// `PUT /v1/contacts/update`: update, or create when the email is new; returns the contact id.
    pub async fn update_contact(&self, contact: &ContactPayload) -> Result<String, LoopsError> {
        if contact.email.is_none() && contact.user_id.is_none() {
            return Err(LoopsError::Usage(
                "updating a contact needs an email or a userId".into(),
            ));
        }
        let body = contact.to_json();
        let answer = self
            .send(Method::PUT, "/v1/contacts/update", &[], Some(&body), None)
            .await?;
        contact_id(&answer)
    }

    /// `GET /v1/contacts/find`: the contact, or `None`.
    pub async fn find_contact(
        &self,
        identity: &ContactIdentity,
    ) -> Result<Option<Contact>, LoopsError> {
        let (name, value) = identity.query();
        let answer = self
            .send(
                Method::GET,
                "/v1/contacts/find",
                &[(name, value)],
                None,
                None,
            )
            .await?;
        let mut contacts: Vec<Contact> = decode(StatusCode::OK, &answer)?;
        Ok(if contacts.is_empty() {
            None
        } else {
            Some(contacts.swap_remove(0))
        })
    }

    /// `POST /v1/contacts/delete` by one identifier. A missing contact is [`LoopsError::NotFound`].
    pub async fn delete_contact(&self, identity: &ContactIdentity) -> Result<(), LoopsError> {
        let (name, value) = identity.query();
        let body = serde_json::json!({ name: value });
        self.send(Method::POST, "/v1/contacts/delete", &[], Some(&body), None)
            .await?;
        Ok(())
    }

    /// `GET /v1/contacts/properties?list=all|custom`.
    pub async fn list_properties(
        &self,
        custom_only: bool,
    ) -> Result<Vec<ContactProperty>, LoopsError> {
        let list = if custom_only { "custom" } else { "all" };
        let answer = self
            .send(
                Method::GET,
                "/v1/contacts/properties",
                &[("list", list)],
                None,
                None,
            )
            .await?;
        decode(StatusCode::OK, &answer)
    }

    /// `POST /v1/contacts/properties`: creates a custom property (camelCase name).
    pub async fn create_property(&self, name: &str, kind: PropertyKind) -> Result<(), LoopsError> {
        let body = serde_json::json!({ "name": name, "type": kind.as_str() });
        self.send(
            Method::POST,
            "/v1/contacts/properties",
            &[],
            Some(&body),
            None,
        )
        .await?;
        Ok(())
    }

    /// `GET /v1/lists`.
    pub async fn list_mailing_lists(&self) -> Result<Vec<MailingList>, LoopsError> {
        let answer = self.send(Method::GET, "/v1/lists", &[], None, None).await?;
        decode(StatusCode::OK, &answer)
    }

    /// `POST /v1/events/send`. With a key, a repeat within 24 h is answered 409 and not applied.
    pub async fn send_event(
        &self,
        event: &EventPayload,
        idempotency_key: Option<&IdempotencyKey>,
    ) -> Result<(), LoopsError> {
        if event.event_name.is_empty() {
            return Err(LoopsError::Usage("an event needs a name".into()));
        }
        if event.contact.email.is_none() && event.contact.user_id.is_none() {
            return Err(LoopsError::Usage(
                "an event needs an email or a userId".into(),
            ));
        }
        let body = event.to_json();
        self.send(
            Method::POST,
            "/v1/events/send",
            &[],
            Some(&body),
            idempotency_key,
        )
        .await?;
        Ok(())
    }

    /// Sends one request and classifies the answer; the body of a success comes back as text.
    async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&Value>,
        idempotency_key: Option<&IdempotencyKey>,
    ) -> Result<String, LoopsError> {
        let endpoint = format!("{method} {path}");
        let mut request = self
            .http
            .request(method, format!("{}{}", self.base_url, path))
            .header(AUTHORIZATION, format!("Bearer {}", self.api_key.expose()))
            .header(USER_AGENT, concat!("loopsync/", env!("CARGO_PKG_VERSION")));
        if !query.is_empty() {
            request = request.query(query);
        }
        if let Some(body) = body {
            request = request
                .header(CONTENT_TYPE, "application/json")
                .body(body.to_string());
        }
        if let Some(key) = idempotency_key {
            request = request.header("Idempotency-Key", key.as_str());
        }
        let sending = request.send();
        tokio::pin!(sending);
        let sent = tokio::select! {
            sent = &mut sending => sent,
            () = tokio::time::sleep(LOOPS_SLOW_ANSWER) => {
                self.slow_answer(&endpoint);
                sending.await
            }
        };
        let response = match sent {
            Ok(response) => response,
            Err(e) => {
                metrics::counter!("loopsync_loops_requests_total", "endpoint" => endpoint, "status" => "transport_error")
                    .increment(1);
                return Err(LoopsError::from_reqwest(e, self.timeout));
            }
        };
        let status = response.status();
        metrics::counter!("loopsync_loops_requests_total", "endpoint" => endpoint, "status" => status.as_str().to_owned())
            .increment(1);
        if status == StatusCode::TOO_MANY_REQUESTS {
            metrics::counter!("loopsync_loops_rate_limited_total").increment(1);
        }
        let headers = response.headers().clone();
        *self.last_rate_limit.lock().expect("rate-limit mutex") =
            RateLimitInfo::from_headers(&headers);
        let text = self.read_body(response).await?;
        classify(status, &headers, &text)?;
        Ok(text)
    }

    /// A request has had no answer for [`LOOPS_SLOW_ANSWER`]: the user is told what is waited
    /// for (at most once per [`LOOPS_SLOW_ANSWER_EVERY`] per process).
    fn slow_answer(&self, endpoint: &str) {
        static LAST: Mutex<Option<std::time::Instant>> = Mutex::new(None);
        let mut last = LAST.lock().expect("slow-answer mutex");
        if last.is_some_and(|t| t.elapsed() < LOOPS_SLOW_ANSWER_EVERY) {
            return;
        }
        *last = Some(std::time::Instant::now());
        tracing::warn!(
            endpoint,
            "waiting for Loops at {}: no answer after {} s (the request gives up after {} s, \
             then is retried)",
            loopsync_core::url::redact(&self.base_url),
            LOOPS_SLOW_ANSWER.as_secs(),
            self.timeout.as_secs_f64()
        );
    }

    /// The answer's body as text, read chunk by chunk: a body longer than
    /// [`MAX_LOOPS_BODY_BYTES`] is [`LoopsError::TooLarge`], found before it is held whole.
    async fn read_body(&self, mut response: reqwest::Response) -> Result<String, LoopsError> {
        let too_large = LoopsError::TooLarge {
            status: response.status().as_u16(),
            limit: MAX_LOOPS_BODY_BYTES,
        };
        let limit = MAX_LOOPS_BODY_BYTES as u64;
        if response.content_length().is_some_and(|n| n > limit) {
            return Err(too_large);
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| LoopsError::from_reqwest(e, self.timeout))?
        {
            if body.len() + chunk.len() > MAX_LOOPS_BODY_BYTES {
                return Err(too_large);
            }
            body.extend_from_slice(&chunk);
        }
        Ok(String::from_utf8_lossy(&body).into_owned())
    }
}

fn decode<T: DeserializeOwned>(status: StatusCode, body: &str) -> Result<T, LoopsError> {
    serde_json::from_str(body).map_err(|source| LoopsError::Decode {
        status: status.as_u16(),
        source,
    })
}

fn contact_id(body: &str) -> Result<String, LoopsError> {
    #[derive(serde::Deserialize)]
    struct Answer {
        id: String,
    }
    decode::<Answer>(StatusCode::OK, body).map(|a| a.id)
}
