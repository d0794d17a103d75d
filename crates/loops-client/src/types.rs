//! Request and answer types of the Loops API (`loops-api.md` §2–§3).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::LoopsError;
pub use loopsync_core::secret::ApiKey;
pub use loopsync_core::value::PropertyKind;

/// An `Idempotency-Key`: 1 to 100 characters (`loops-api.md` §5).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// The longest key Loops accepts.
    pub const MAX_CHARS: usize = 100;

    pub fn new(key: impl Into<String>) -> Result<IdempotencyKey, LoopsError> {
        let key = key.into();
        let chars = key.chars().count();
        if chars == 0 || chars > Self::MAX_CHARS {
            return Err(LoopsError::Usage(format!(
                "an Idempotency-Key has 1 to {} characters, this one has {chars}",
                Self::MAX_CHARS
            )));
        }
        Ok(IdempotencyKey(key))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `GET /v1/api-key`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeyInfo {
    pub success: bool,
    /// Older answers did not carry it.
    #[serde(default)]
    pub team_name: Option<String>,
}

/// How a single contact is identified (find, delete).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContactIdentity {
    Email(String),
    UserId(String),
}

impl ContactIdentity {
    pub(crate) fn query(&self) -> (&'static str, &str) {
        match self {
            ContactIdentity::Email(e) => ("email", e),
            ContactIdentity::UserId(u) => ("userId", u),
        }
    }
}

/// The body of `contacts/create` and `contacts/update`: identifiers, properties at top level
/// (`Value::Null` clears one), and mailing-list subscriptions.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ContactPayload {
    pub email: Option<String>,
    pub user_id: Option<String>,
    /// Default and custom properties, sent as top-level keys.
    pub properties: Map<String, Value>,
    /// `listId → subscribed`; omitted from the body when empty.
    pub mailing_lists: BTreeMap<String, bool>,
}

impl ContactPayload {
    /// The JSON body. Named identifiers win over same-named keys in `properties`, as in loops-go.
    pub fn to_json(&self) -> Value {
        let mut body = self.properties.clone();
        if let Some(email) = &self.email {
            body.insert("email".into(), Value::String(email.clone()));
        }
        if let Some(user_id) = &self.user_id {
            body.insert("userId".into(), Value::String(user_id.clone()));
        }
        if !self.mailing_lists.is_empty() {
            let lists = self
                .mailing_lists
                .iter()
                .map(|(id, on)| (id.clone(), Value::Bool(*on)))
                .collect();
            body.insert("mailingLists".into(), Value::Object(lists));
        }
        Value::Object(body)
    }
}

/// The body of `events/send`: contact properties go at top level, event properties under
/// `eventProperties`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventPayload {
    pub event_name: String,
    pub contact: ContactPayload,
    pub event_properties: Map<String, Value>,
}

impl EventPayload {
    pub fn to_json(&self) -> Value {
        let mut body = match self.contact.to_json() {
            Value::Object(map) => map,
            _ => Map::new(),
        };
        body.insert("eventName".into(), Value::String(self.event_name.clone()));
        if !self.event_properties.is_empty() {
            body.insert(
                "eventProperties".into(),
                Value::Object(self.event_properties.clone()),
            );
        }
        Value::Object(body)
    }
}

/// A contact as `contacts/find` returns it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Contact {
    pub id: String,
    pub email: String,
    #[serde(default)]
    pub first_name: Option<String>,
    #[serde(default)]
    pub last_name: Option<String>,
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub subscribed: Option<bool>,
    #[serde(default)]
    pub user_group: Option<String>,
    #[serde(default)]
    pub user_id: Option<String>,
    /// Only the lists the contact is subscribed to.
    #[serde(default)]
    pub mailing_lists: BTreeMap<String, bool>,
    #[serde(default)]
    pub opt_in_status: Option<String>,
    /// Custom properties (every other top-level key).
    #[serde(flatten)]
    pub properties: Map<String, Value>,
}

/// One entry of `GET /v1/contacts/properties`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct ContactProperty {
    pub key: String,
    pub label: String,
    #[serde(rename = "type")]
    pub kind: PropertyKind,
}

/// One entry of `GET /v1/lists`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct MailingList {
    pub id: String,
    pub name: String,
    /// A string in Loops' OpenAPI 1.8.0 (`""` when the list has none); `null` in its JS README
    /// and in older answers, so `null` and a missing field are read as `None` too.
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub is_public: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn api_key_is_redacted() {
        let key = ApiKey::new("secret-key-123").unwrap();
        assert_eq!(format!("{key:?}"), "ApiKey(<redacted>)");
        assert_eq!(key.to_string(), "<redacted>");
        assert!(ApiKey::new("  ").is_err());
    }

    #[test]
    fn idempotency_key_length() {
        assert!(IdempotencyKey::new("a".repeat(100)).is_ok());
        assert!(IdempotencyKey::new("a".repeat(101)).is_err());
        assert!(IdempotencyKey::new("").is_err());
        // Characters, not bytes.
        assert!(IdempotencyKey::new("é".repeat(100)).is_ok());
    }

    #[test]
    fn contact_payload_puts_properties_at_top_level_and_identifiers_win() {
        let mut properties = Map::new();
        properties.insert("email".into(), json!("wrong@example.com"));
        properties.insert("planName".into(), json!("pro"));
        properties.insert("lastName".into(), Value::Null);
        let payload = ContactPayload {
            email: Some("right@example.com".into()),
            user_id: Some("42".into()),
            properties,
            mailing_lists: [("list1".to_owned(), true)].into(),
        };
        assert_eq!(
            payload.to_json(),
            json!({"email": "right@example.com", "userId": "42", "planName": "pro",
                   "lastName": null, "mailingLists": {"list1": true}})
        );
    }

    #[test]
    fn empty_lists_and_event_properties_are_omitted() {
        let event = EventPayload {
            event_name: "signup".into(),
            contact: ContactPayload {
                email: Some("a@b.co".into()),
                ..Default::default()
            },
            event_properties: Map::new(),
        };
        assert_eq!(
            event.to_json(),
            json!({"eventName": "signup", "email": "a@b.co"})
        );
    }

    /// A list's description as the spec types it (a string), as the JS README shows it
    /// (`null`), or left out: all three are read.
    #[test]
    fn a_list_description_may_be_a_string_null_or_missing() {
        let lists: Vec<MailingList> = serde_json::from_value(json!([
            {"id": "a", "name": "A", "description": "Monthly", "isPublic": true},
            {"id": "b", "name": "B", "description": "", "isPublic": false},
            {"id": "c", "name": "C", "description": null, "isPublic": true},
            {"id": "d", "name": "D", "isPublic": true},
        ]))
        .unwrap();
        let descriptions: Vec<Option<&str>> =
            lists.iter().map(|l| l.description.as_deref()).collect();
        assert_eq!(descriptions, [Some("Monthly"), Some(""), None, None]);
        assert_eq!(
            lists.iter().map(|l| l.is_public).collect::<Vec<_>>(),
            [true, false, true, true]
        );
    }

    #[test]
    fn contact_deserializes_custom_properties() {
        let contact: Contact = serde_json::from_value(json!({
            "id": "c1", "email": "a@b.co", "firstName": null, "lastName": null,
            "source": "API", "subscribed": true, "userGroup": "", "userId": null,
            "mailingLists": {"l1": true}, "optInStatus": null, "planName": "pro"
        }))
        .unwrap();
        assert_eq!(contact.properties.get("planName"), Some(&json!("pro")));
        assert_eq!(contact.mailing_lists.get("l1"), Some(&true));
        assert_eq!(contact.subscribed, Some(true));
    }
}
