//! The audience: the team's contacts, properties and lists in memory, and the writes, finds
//! and deletes of `loops-api.md` over them (identity, upsert, mailing lists), using the rules.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::{EmailMatch, Settings, SettingsError, UnknownLists, UnknownProperties};

use super::*;

/// A mailing list, as `GET /v1/lists` returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MailingList {
    pub id: String,
    pub name: String,
    /// Loops' OpenAPI 1.8.0 makes it a required string: a list without one is answered with
    /// `""`, never `null`.
    #[serde(default, serialize_with = "empty_when_none")]
    pub description: Option<String>,
    #[serde(default)]
    pub is_public: bool,
}

/// A description the list does not have, as the OpenAPI spec types it: an empty string.
fn empty_when_none<S: serde::Serializer>(
    description: &Option<String>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(description.as_deref().unwrap_or_default())
}

/// One stored contact.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredContact {
    pub id: String,
    /// As sent; matched as `Settings::email_match` says.
    pub email: String,
    pub user_id: Option<String>,
    /// Every property but email and userId, in stored form (dates as ISO-8601 strings).
    pub props: BTreeMap<String, Value>,
    /// The lists the contact is subscribed to.
    pub lists: BTreeSet<String>,
}

/// What a contact write asks for, validated.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ContactWrite {
    pub email: Option<String>,
    pub user_id: Option<String>,
    pub props: Vec<(String, Value)>,
    pub lists: Vec<(String, bool)>,
    /// Unknown properties to create first (only with `unknown_properties = "create"`).
    pub new_properties: Vec<String>,
}

/// What a write did, for the workflow-trigger log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteOutcome {
    pub id: String,
    pub email: String,
    pub user_id: Option<String>,
    pub created: bool,
    /// Properties whose value really changed (email and userId included).
    pub changed: Vec<String>,
    /// Lists the contact was added to (false or absent before, true now).
    pub added_to_lists: Vec<String>,
}

/// How identifiers are resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `contacts/create`: a new contact or 409.
    Create,
    /// `contacts/update` and `events/send`: update or create (§2.3).
    Upsert,
}

/// The team's contacts, properties and lists.
#[derive(Debug, Default)]
pub struct Audience {
    contacts: BTreeMap<u64, StoredContact>,
    by_email: HashMap<String, u64>,
    by_user_id: HashMap<String, u64>,
    next_seq: u64,
    /// Custom properties in creation order.
    custom: Vec<(String, PropertyType)>,
    pub lists: Vec<MailingList>,
    /// What `by_email` is keyed by.
    email_match: EmailMatch,
}

impl Audience {
    pub fn new(
        lists: Vec<MailingList>,
        properties: Vec<(String, PropertyType)>,
        email_match: EmailMatch,
    ) -> Audience {
        Audience {
            lists,
            custom: properties,
            email_match,
            ..Default::default()
        }
    }

    fn email_key(&self, email: &str) -> String {
        email_key(email, self.email_match)
    }

    /// Re-keys the email index for `matching`. Refused, with nothing changed, when two contacts
    /// would become one: their emails differ only in case and matching becomes case-insensitive.
    pub fn set_email_match(&mut self, matching: EmailMatch) -> Result<(), SettingsError> {
        if matching == self.email_match {
            return Ok(());
        }
        let mut index: HashMap<String, u64> = HashMap::with_capacity(self.contacts.len());
        for (seq, contact) in &self.contacts {
            if let Some(other) = index.insert(email_key(&contact.email, matching), *seq) {
                return Err(SettingsError::EmailsCollide {
                    first: self.contacts[&other].email.clone(),
                    second: contact.email.clone(),
                });
            }
        }
        self.by_email = index;
        self.email_match = matching;
        Ok(())
    }

    #[cfg(test)]
    pub fn contact_count(&self) -> usize {
        self.contacts.len()
    }

    fn custom_type(&self, key: &str) -> Option<PropertyType> {
        self.custom.iter().find(|(k, _)| k == key).map(|(_, t)| *t)
    }

    /// Every property, defaults first: `(key, label, type, is_custom)`.
    pub fn properties(&self) -> Vec<(String, String, PropertyType, bool)> {
        let defaults = DEFAULT_PROPERTIES
            .iter()
            .map(|(k, l, t)| ((*k).to_owned(), (*l).to_owned(), *t, false));
        let custom = self
            .custom
            .iter()
            .map(|(k, t)| (k.clone(), label_for(k), *t, true));
        defaults.chain(custom).collect()
    }

    /// `POST /v1/contacts/properties`.
    pub fn create_property(&mut self, name: &str, kind: PropertyType) -> Result<(), ApiError> {
        check_length("name", name)?;
        if RESERVED_NAMES.contains(&name) {
            return Err(ApiError::bad(format!("\"{name}\" is a reserved name.")));
        }
        if !is_camel_case(name) {
            return Err(ApiError::bad(format!(
                "Property name \"{name}\" must be in camelCase, e.g. planName."
            )));
        }
        if DEFAULT_PROPERTIES.iter().any(|(k, _, _)| *k == name) || self.custom_type(name).is_some()
        {
            return Err(ApiError::bad(format!(
                "A property with the name \"{name}\" already exists."
            )));
        }
        self.custom.push((name.to_owned(), kind));
        Ok(())
    }

    /// Validates the properties and lists of a contact write (create, update, event). Every
    /// top-level key that is not an identifier or a request key is a property.
    pub fn parse_write(
        &self,
        body: &Map<String, Value>,
        settings: &Settings,
    ) -> Result<ContactWrite, ApiError> {
        let (email, user_id) = identifiers(body)?;
        let numeric = settings.numeric_dates;
        let mut write = ContactWrite {
            email,
            user_id,
            ..Default::default()
        };
        for (key, value) in body {
            if REQUEST_KEYS.contains(&key.as_str()) {
                continue;
            }
            if RESERVED_NAMES.contains(&key.as_str()) {
                return Err(ApiError::bad(format!(
                    "\"{key}\" is a reserved name and cannot be set."
                )));
            }
            let stored = match key.as_str() {
                "notes" => {
                    return Err(ApiError::bad("notes cannot be set through the API."));
                }
                "optInStatus" => {
                    return Err(ApiError::bad("optInStatus cannot be set through the API."));
                }
                "subscribed" => match value {
                    Value::Bool(_) => value.clone(),
                    _ => return Err(ApiError::bad("subscribed must be a boolean.")),
                },
                "userGroup" => match value {
                    Value::Null => Value::String(String::new()),
                    _ => coerce(key, PropertyType::String, value, numeric)?,
                },
                "firstName" | "lastName" | "source" => {
                    coerce(key, PropertyType::String, value, numeric)?
                }
                "createdAt" => coerce(key, PropertyType::Date, value, numeric)?,
                _ => match self.custom_type(key) {
                    Some(kind) => coerce(key, kind, value, numeric)?,
                    None => match settings.unknown_properties {
                        UnknownProperties::Reject => {
                            return Err(ApiError::bad(format!(
                                "Contact property \"{key}\" does not exist. Create it first."
                            )));
                        }
                        UnknownProperties::Create => {
                            if !is_camel_case(key) {
                                return Err(ApiError::bad(format!(
                                    "Property name \"{key}\" must be in camelCase."
                                )));
                            }
                            write.new_properties.push(key.clone());
                            coerce(key, PropertyType::String, value, numeric)?
                        }
                    },
                },
            };
            write.props.push((key.clone(), stored));
        }
        write.lists = self.parse_lists(body.get("mailingLists"), settings)?;
        Ok(write)
    }

    /// `mailingLists`: an object of `listId → boolean`; `[]` (PHP's empty object) and `null`
    /// mean none.
    fn parse_lists(
        &self,
        value: Option<&Value>,
        settings: &Settings,
    ) -> Result<Vec<(String, bool)>, ApiError> {
        let map = match value {
            None | Some(Value::Null) => return Ok(Vec::new()),
            Some(Value::Array(items)) if items.is_empty() => return Ok(Vec::new()),
            Some(Value::Object(map)) => map,
            Some(_) => {
                return Err(ApiError::bad(
                    "mailingLists must be an object of list IDs and booleans.",
                ));
            }
        };
        let mut lists = Vec::new();
        for (id, on) in map {
            let Value::Bool(on) = on else {
                return Err(ApiError::bad(format!(
                    "mailingLists.{id} must be true or false."
                )));
            };
            if settings.unknown_lists == UnknownLists::Reject
                && !self.lists.iter().any(|l| &l.id == id)
            {
                return Err(ApiError::bad(format!("Mailing list {id} does not exist.")));
            }
            lists.push((id.clone(), *on));
        }
        Ok(lists)
    }

    fn find_email(&self, email: &str) -> Option<u64> {
        self.by_email.get(&self.email_key(email)).copied()
    }

    fn find_user_id(&self, user_id: &str) -> Option<u64> {
        self.by_user_id.get(user_id).copied()
    }

    /// The contact a find would return.
    pub fn find(&self, email: Option<&str>, user_id: Option<&str>) -> Option<&StoredContact> {
        let seq = match (email, user_id) {
            (Some(e), _) => self.find_email(e),
            (None, Some(u)) => self.find_user_id(u),
            (None, None) => None,
        }?;
        self.contacts.get(&seq)
    }

    /// Resolves the identifiers of a write to an existing contact (`Some`) or a new one (`None`).
    pub fn resolve(
        &self,
        email: Option<&str>,
        user_id: Option<&str>,
        mode: Mode,
    ) -> Result<Option<u64>, ApiError> {
        let by_email = email.and_then(|e| self.find_email(e));
        let by_user = user_id.and_then(|u| self.find_user_id(u));
        match mode {
            Mode::Create => {
                if email.is_none() {
                    return Err(ApiError::bad("email is required to create a contact."));
                }
                if by_email.is_some() {
                    return Err(ApiError::conflict(
                        "An audience member with this email already exists.",
                    ));
                }
                if by_user.is_some() {
                    return Err(ApiError::conflict(
                        "An audience member with this userId already exists.",
                    ));
                }
                Ok(None)
            }
            Mode::Upsert => match (by_email, by_user) {
                (Some(a), Some(b)) if a != b => Err(ApiError::bad(
                    "Multiple contacts found for the given criteria",
                )),
                (Some(seq), _) | (None, Some(seq)) => Ok(Some(seq)),
                (None, None) => match (email, user_id) {
                    (Some(_), _) => Ok(None),
                    (None, Some(_)) => Err(ApiError::bad(
                        "No contact found with this userId. A new contact needs an email.",
                    )),
                    (None, None) => Err(ApiError::bad("Provide an email or a userId.")),
                },
            },
        }
    }

    /// Applies a validated write to the contact `target` (or a new contact when `None`).
    pub fn apply(
        &mut self,
        target: Option<u64>,
        write: ContactWrite,
        new_id: String,
    ) -> WriteOutcome {
        for name in &write.new_properties {
            if self.custom_type(name).is_none() {
                self.custom.push((name.clone(), PropertyType::String));
            }
        }
        let (seq, created) = match target {
            Some(seq) => (seq, false),
            None => {
                let seq = self.next_seq;
                self.next_seq += 1;
                let email = write.email.clone().expect("a new contact has an email");
                let mut props = BTreeMap::new();
                props.insert("firstName".into(), Value::Null);
                props.insert("lastName".into(), Value::Null);
                props.insert("source".into(), Value::String("API".into()));
                props.insert("subscribed".into(), Value::Bool(true));
                props.insert("userGroup".into(), Value::String(String::new()));
                self.by_email.insert(self.email_key(&email), seq);
                self.contacts.insert(
                    seq,
                    StoredContact {
                        id: new_id,
                        email,
                        user_id: None,
                        props,
                        lists: BTreeSet::new(),
                    },
                );
                (seq, true)
            }
        };
        let contact = self
            .contacts
            .get_mut(&seq)
            .expect("resolved contact exists");
        let mut changed = Vec::new();
        if let Some(email) = write.email
            && email != contact.email
        {
            let (old_key, new_key) = (
                email_key(&contact.email, self.email_match),
                email_key(&email, self.email_match),
            );
            self.by_email.remove(&old_key);
            self.by_email.insert(new_key, seq);
            contact.email = email;
            changed.push("email".to_owned());
        }
        if let Some(user_id) = write.user_id
            && contact.user_id.as_deref() != Some(user_id.as_str())
        {
            if let Some(old) = &contact.user_id {
                self.by_user_id.remove(old);
            }
            self.by_user_id.insert(user_id.clone(), seq);
            contact.user_id = Some(user_id);
            changed.push("userId".to_owned());
        }
        for (key, value) in write.props {
            let before = contact.props.get(&key).unwrap_or(&Value::Null);
            if *before != value {
                contact.props.insert(key.clone(), value);
                changed.push(key);
            }
        }
        let mut added_to_lists = Vec::new();
        for (id, on) in write.lists {
            if on {
                if contact.lists.insert(id.clone()) {
                    added_to_lists.push(id);
                }
            } else {
                contact.lists.remove(&id);
            }
        }
        WriteOutcome {
            id: contact.id.clone(),
            email: contact.email.clone(),
            user_id: contact.user_id.clone(),
            created,
            changed: if created { Vec::new() } else { changed },
            added_to_lists,
        }
    }

    /// Deletes the contact with this identifier.
    pub fn delete(&mut self, email: Option<&str>, user_id: Option<&str>) -> Result<(), ApiError> {
        let seq = match (email, user_id) {
            (Some(e), None) => self.find_email(e),
            (None, Some(u)) => self.find_user_id(u),
            _ => {
                return Err(ApiError::bad(
                    "Provide either an email or a userId, not both.",
                ));
            }
        }
        .ok_or_else(|| ApiError::not_found("Contact not found."))?;
        let contact = self.contacts.remove(&seq).expect("indexed contact exists");
        self.by_email.remove(&self.email_key(&contact.email));
        if let Some(u) = &contact.user_id {
            self.by_user_id.remove(u);
        }
        Ok(())
    }

    /// A contact as `contacts/find` returns it: default properties, `mailingLists` with only
    /// `true` entries, and every custom property (null when unset).
    pub fn to_json(&self, contact: &StoredContact) -> Value {
        let get = |k: &str| contact.props.get(k).cloned().unwrap_or(Value::Null);
        let mut map = Map::new();
        map.insert("id".into(), Value::String(contact.id.clone()));
        map.insert("email".into(), Value::String(contact.email.clone()));
        map.insert("firstName".into(), get("firstName"));
        map.insert("lastName".into(), get("lastName"));
        map.insert("source".into(), get("source"));
        map.insert("subscribed".into(), get("subscribed"));
        map.insert("userGroup".into(), get("userGroup"));
        map.insert(
            "userId".into(),
            contact.user_id.clone().map_or(Value::Null, Value::String),
        );
        let lists = contact
            .lists
            .iter()
            .map(|id| (id.clone(), Value::Bool(true)))
            .collect();
        map.insert("mailingLists".into(), Value::Object(lists));
        map.insert("optInStatus".into(), Value::Null);
        if let Some(created_at) = contact.props.get("createdAt") {
            map.insert("createdAt".into(), created_at.clone());
        }
        for (key, _) in &self.custom {
            map.insert(key.clone(), get(key));
        }
        Value::Object(map)
    }

    /// The contact `seq` (from [`Audience::resolve`]).
    pub fn get(&self, seq: u64) -> Option<&StoredContact> {
        self.contacts.get(&seq)
    }

    /// Every contact in creation order.
    pub fn all(&self) -> impl Iterator<Item = &StoredContact> {
        self.contacts.values()
    }
}
