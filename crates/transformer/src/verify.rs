//! What `loopsync verify` reasons with, as pure functions: what Loops confirmed for a record,
//! how that compares with what `GET /v1/contacts/find` returns, and which records a sample
//! takes. No HTTP, no warehouse.
//!
//! The state keeps fingerprints, not values. For a record whose model row is still at the
//! fingerprint Loops confirmed, [`transform`] of that row is exactly the write Loops confirmed:
//! [`confirmed`] rebuilds it, and [`compare`] holds it against the contact Loops returns, by
//! the rules of how Loops returns values (`loops-api.md` §2):
//!
//! * dates come back as ISO-8601 strings (the sync sends Unix milliseconds): compared as
//!   instants, to the millisecond;
//! * numbers as numbers: `12` and `12.0` are one number;
//! * booleans as booleans;
//! * `mailingLists` holds only the lists the contact is on (`{id: true}`): a list the sync set
//!   to `true` must be there, one it set to `false` must not; a list it left alone (a NULL
//!   column) is not compared;
//! * emails are compared trimmed and lower-cased, as the product sends them;
//! * a property the sync sends as `null` (clearing it) must be absent or `null` in Loops
//!   (`userGroup` may also be `""`, Loops' documented "unset");
//! * properties Loops has that the sync does not map are ignored, and so are identifiers the
//!   sync did not send.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap};

use loopsync_core::envelope::{Action, ChangeKind, RowChange, VERSION};
use loopsync_core::keys;
use loopsync_core::spec::{IdentifyBy, SyncSpec, default_property_kind};
use loopsync_core::value::{
    PropertyKind, coerce, millis_to_rfc3339, normalize_email, parse_date_millis,
};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::{Invalid, transform};

/// The contact write Loops confirmed for a record: identifiers, properties (`null` clears one)
/// and the mailing lists the sync set.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Confirmed {
    pub email: Option<String>,
    pub user_id: Option<String>,
    pub properties: Map<String, Value>,
    pub mailing_lists: BTreeMap<String, bool>,
}

/// How to find a record's contact in Loops: by the identifier the sync identifies it by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Email(String),
    UserId(String),
}

impl Confirmed {
    /// The write of an operation: an upsert, an event's contact write, or a re-key's write.
    /// `None` for a removal.
    pub fn from_action(action: &Action) -> Option<Confirmed> {
        match action {
            Action::Upsert {
                email,
                user_id,
                properties,
                mailing_lists,
            }
            | Action::Event {
                email,
                user_id,
                properties,
                mailing_lists,
                ..
            } => Some(Confirmed {
                email: email.clone(),
                user_id: user_id.clone(),
                properties: properties.clone(),
                mailing_lists: mailing_lists.clone(),
            }),
            Action::Rekey { write, .. } => Confirmed::from_action(write),
            Action::Delete { .. } | Action::Unsubscribe { .. } => None,
        }
    }

    /// The `contacts/find` query for this record: by userId when the sync identifies contacts
    /// by userId, else by email.
    pub fn lookup(&self, identify_by: IdentifyBy) -> Option<Lookup> {
        match (identify_by, &self.email, &self.user_id) {
            (IdentifyBy::UserId, _, Some(u)) => Some(Lookup::UserId(u.clone())),
            (_, Some(e), _) => Some(Lookup::Email(e.clone())),
            (_, None, Some(u)) => Some(Lookup::UserId(u.clone())),
            (_, None, None) => None,
        }
    }
}

/// What Loops confirmed for a record whose model row (`values`) is at the confirmed
/// `fingerprint`: the write a run makes of that row, with the identifiers the state holds.
pub fn confirmed(
    spec: &SyncSpec,
    key: &str,
    fingerprint: &str,
    values: BTreeMap<String, Option<String>>,
    confirmed_email: Option<String>,
    confirmed_user_id: Option<String>,
) -> Result<Confirmed, Invalid> {
    let change = RowChange {
        v: VERSION,
        sync: spec.name.clone(),
        run_id: 0,
        key: key.to_owned(),
        fingerprint: fingerprint.to_owned(),
        // Confirmed before: a change, never an addition (which would need an email under
        // `identify_by = "userId"`).
        kind: ChangeKind::Changed,
        values,
        confirmed_email,
        confirmed_user_id,
        installation: String::new(),
        generation: 0,
        keep_old_contact: false,
        resubscribe: false,
        possibly_applied: Vec::new(),
    };
    let op = transform(spec, &change)?;
    Confirmed::from_action(&op.action)
        .ok_or_else(|| Invalid(format!("{} is no contact write", op.action.name())))
}

/// What kind of difference a [`Drift`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DriftKind {
    /// `contacts/find` found no contact: deleted in Loops, or the write never landed.
    Missing,
    /// A mapped property, the email or the userId differs.
    Property,
    /// A mapped mailing list's subscription differs.
    List,
}

/// One difference between what Loops confirmed and what it holds now.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Drift {
    pub kind: DriftKind,
    /// The property (`planName`, `email`, `userId`) or list (`mailingLists.<id>`); `None` when
    /// the contact is missing.
    pub field: Option<String>,
    /// What Loops holds: `None` when the field is absent (or the contact missing).
    pub loops: Option<Value>,
    /// What Loops confirmed (dates as ISO-8601, as Loops shows them); `None` for a missing
    /// contact.
    pub confirmed: Option<Value>,
}

impl Drift {
    fn missing() -> Drift {
        Drift {
            kind: DriftKind::Missing,
            field: None,
            loops: None,
            confirmed: None,
        }
    }

    /// In words: `planName is "gold" in Loops, "pro" confirmed`, `not in Loops`.
    pub fn describe(&self) -> String {
        let field = self.field.as_deref().unwrap_or("contact");
        match self.kind {
            DriftKind::Missing => "not in Loops".to_owned(),
            DriftKind::List => {
                let on = |v: &Option<Value>| {
                    if v.as_ref().and_then(Value::as_bool) == Some(true) {
                        "subscribed"
                    } else {
                        "not subscribed"
                    }
                };
                format!(
                    "{field} is {} in Loops, {} confirmed",
                    on(&self.loops),
                    on(&self.confirmed)
                )
            }
            DriftKind::Property => {
                let shown = |v: &Option<Value>| match v {
                    None => "absent".to_owned(),
                    Some(v) => v.to_string(),
                };
                format!(
                    "{field} is {} in Loops, {} confirmed",
                    shown(&self.loops),
                    shown(&self.confirmed)
                )
            }
        }
    }
}

/// Compares what Loops confirmed for a record with the contact `contacts/find` returned
/// (`None`: it returned `[]`). Empty when they agree.
pub fn compare(
    spec: &SyncSpec,
    confirmed: &Confirmed,
    found: Option<&Map<String, Value>>,
) -> Vec<Drift> {
    let Some(found) = found else {
        return vec![Drift::missing()];
    };
    let mut drifts = Vec::new();
    let mut property = |field: &str, loops: Option<&Value>, confirmed: Value| {
        drifts.push(Drift {
            kind: DriftKind::Property,
            field: Some(field.to_owned()),
            loops: loops.cloned(),
            confirmed: Some(confirmed),
        })
    };
    if let Some(email) = &confirmed.email {
        let loops = found.get("email");
        let same = loops
            .and_then(Value::as_str)
            .is_some_and(|e| normalize_email(e) == normalize_email(email));
        if !same {
            property("email", loops, Value::String(email.clone()));
        }
    }
    if let Some(user_id) = &confirmed.user_id {
        let loops = found.get("userId");
        let same = match loops {
            Some(Value::String(u)) => u.trim() == user_id.trim(),
            Some(Value::Number(n)) => n.to_string() == user_id.trim(),
            _ => false,
        };
        if !same {
            property("userId", loops, Value::String(user_id.clone()));
        }
    }
    for (name, value) in &confirmed.properties {
        let kind = spec
            .property(name)
            .map(|p| p.kind)
            .or_else(|| default_property_kind(name))
            .unwrap_or(PropertyKind::String);
        let loops = found.get(name);
        if !same_value(name, kind, value, loops) {
            property(name, loops, shown(kind, value));
        }
    }
    let lists = found.get("mailingLists").and_then(Value::as_object);
    for (id, on) in &confirmed.mailing_lists {
        let in_loops = lists
            .and_then(|l| l.get(id))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if in_loops != *on {
            drifts.push(Drift {
                kind: DriftKind::List,
                field: Some(format!("mailingLists.{id}")),
                loops: Some(Value::Bool(in_loops)),
                confirmed: Some(Value::Bool(*on)),
            });
        }
    }
    drifts
}

/// A confirmed value as Loops shows it: a date (sent as Unix milliseconds) as ISO-8601.
fn shown(kind: PropertyKind, value: &Value) -> Value {
    match (kind, value.as_i64()) {
        (PropertyKind::Date, Some(millis)) => Value::String(millis_to_rfc3339(millis)),
        _ => value.clone(),
    }
}

/// Whether Loops' `loops` (absent: `None`) is the value the sync sent, `confirmed`.
fn same_value(name: &str, kind: PropertyKind, confirmed: &Value, loops: Option<&Value>) -> bool {
    let loops = match loops {
        None | Some(Value::Null) => return confirmed.is_null(),
        Some(v) => v,
    };
    if confirmed.is_null() {
        // Cleared: absent or null in Loops; `userGroup` reads "" when unset (§2.1).
        return name == "userGroup" && loops.as_str() == Some("");
    }
    match kind {
        PropertyKind::String => loops.as_str() == confirmed.as_str(),
        PropertyKind::Number => match (number(confirmed), number(loops)) {
            (Some(a), Some(b)) => a == b,
            _ => false,
        },
        PropertyKind::Boolean => {
            let loops = match loops {
                Value::String(s) => coerce(PropertyKind::Boolean, s).ok(),
                v => Some(v.clone()),
            };
            loops.as_ref().and_then(Value::as_bool) == confirmed.as_bool()
        }
        PropertyKind::Date => match (date_millis(confirmed), date_millis(loops)) {
            (Some(a), Some(b)) => a == b,
            _ => false,
        },
    }
}

/// A number as Loops may return it: a JSON number, or the text of one.
#[derive(Debug, PartialEq)]
enum Number {
    Int(i64),
    Float(f64),
}

fn number(value: &Value) -> Option<Number> {
    let n = match value {
        Value::Number(n) => n.clone(),
        Value::String(s) => match coerce(PropertyKind::Number, s).ok()? {
            Value::Number(n) => n,
            _ => return None,
        },
        _ => return None,
    };
    // 12 and 12.0 are one number: integral values compare as integers (exact beyond 2^53).
    match (n.as_i64(), n.as_f64()) {
        (Some(i), _) => Some(Number::Int(i)),
        (None, Some(f)) if f.fract() == 0.0 && f.abs() < 9.0e15 => Some(Number::Int(f as i64)),
        (None, Some(f)) => Some(Number::Float(f)),
        (None, None) => None,
    }
}

/// An instant as Unix milliseconds: the sync's milliseconds, or Loops' ISO-8601 string (or a
/// Unix number, seconds below 10^11).
fn date_millis(value: &Value) -> Option<i64> {
    match value {
        Value::String(s) => parse_date_millis(s),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => parse_date_millis(&i.to_string()),
            (None, Some(f)) if f.abs() < 1.0e11 => Some((f * 1000.0).round() as i64),
            (None, Some(f)) => Some(f.round() as i64),
            (None, None) => None,
        },
        _ => None,
    }
}

/// A record's place in the sample of `seed`: a hash of (seed, sync, key), so samples spread
/// over the key space and the same seed picks the same records.
pub fn rank(seed: u64, sync: &str, key: &str) -> u64 {
    let digest = keys::fingerprint(&["verify-sample", &seed.to_string(), sync, key]);
    u64::from_str_radix(&digest[..16], 16).expect("a hex digest")
}

/// The records of lowest [`rank`]: at most `limit` of them (all with `None`), holding only
/// those in memory.
#[derive(Debug)]
pub struct Sample<T> {
    limit: Option<usize>,
    heap: BinaryHeap<Ranked<T>>,
}

#[derive(Debug)]
struct Ranked<T> {
    rank: u64,
    key: String,
    item: T,
}

impl<T> PartialEq for Ranked<T> {
    fn eq(&self, other: &Self) -> bool {
        (self.rank, &self.key) == (other.rank, &other.key)
    }
}

impl<T> Eq for Ranked<T> {}

impl<T> PartialOrd for Ranked<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<T> Ord for Ranked<T> {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.rank, &self.key).cmp(&(other.rank, &other.key))
    }
}

impl<T> Sample<T> {
    /// `None`: every record offered.
    pub fn new(limit: Option<usize>) -> Sample<T> {
        Sample {
            limit,
            heap: BinaryHeap::new(),
        }
    }

    /// Offers a record.
    pub fn offer(&mut self, rank: u64, key: String, item: T) {
        let ranked = Ranked { rank, key, item };
        match self.limit {
            None => self.heap.push(ranked),
            Some(0) => {}
            Some(limit) if self.heap.len() < limit => self.heap.push(ranked),
            Some(_) => {
                if self.heap.peek().is_some_and(|worst| ranked < *worst) {
                    self.heap.pop();
                    self.heap.push(ranked);
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// The records taken, ordered by key.
    pub fn into_sorted(self) -> Vec<(String, T)> {
        let mut taken: Vec<(String, T)> = self.heap.into_iter().map(|r| (r.key, r.item)).collect();
        taken.sort_by(|a, b| a.0.cmp(&b.0));
        taken
    }
}

#[cfg(test)]
mod tests {
    use loopsync_core::spec::{Behavior, MappedList, MappedProperty, OnRemove};
    use serde_json::json;

    use super::*;

    fn spec() -> SyncSpec {
        let p = |property: &str, column: &str, kind| MappedProperty {
            property: property.into(),
            column: column.into(),
            kind,
        };
        SyncSpec {
            name: "users".into(),
            model: "select * from users".into(),
            primary_key: "id".into(),
            identify_by: IdentifyBy::Email,
            behavior: Behavior::Upsert,
            on_remove: OnRemove::Delete,
            trigger_workflows: false,
            event_on_create: "c".into(),
            event_on_update: "u".into(),
            properties: vec![
                p("email", "email", PropertyKind::String),
                p("firstName", "first_name", PropertyKind::String),
                p("planName", "plan", PropertyKind::String),
                p("seats", "seats", PropertyKind::Number),
                p("signedUpAt", "signed_up_at", PropertyKind::Date),
                p("trial", "trial", PropertyKind::Boolean),
                p("userGroup", "grp", PropertyKind::String),
            ],
            lists: vec![
                MappedList {
                    list_id: "news".into(),
                    column: "newsletter".into(),
                },
                MappedList {
                    list_id: "beta".into(),
                    column: "beta".into(),
                },
            ],
            max_removal_share: loopsync_core::spec::DEFAULT_MAX_REMOVAL_SHARE,
            append: None,
            incremental: None,
        }
    }

    /// What the state confirmed for a row of `spec()`.
    fn row(pairs: &[(&str, Option<&str>)]) -> Confirmed {
        let mut values: BTreeMap<String, Option<String>> = [
            ("email", Some("Ada@Example.com ")),
            ("first_name", Some("Ada")),
            ("plan", Some("pro")),
            ("seats", Some("12")),
            ("signed_up_at", Some("2024-01-08 11:31:06+00")),
            ("trial", Some("f")),
            ("grp", None),
            ("newsletter", Some("t")),
            ("beta", Some("false")),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.map(str::to_owned)))
        .collect();
        for (k, v) in pairs {
            values.insert(k.to_string(), v.map(str::to_owned));
        }
        confirmed(
            &spec(),
            "42",
            "fp",
            values,
            Some("ada@example.com".into()),
            None,
        )
        .unwrap()
    }

    /// The contact as the simulator (and Loops, per loops-api.md §2.1) returns it.
    fn loops(changes: Value) -> Map<String, Value> {
        let mut contact = json!({
            "id": "c1", "email": "ada@example.com", "firstName": "Ada", "lastName": null,
            "source": "API", "subscribed": true, "userGroup": "", "userId": null,
            "mailingLists": {"news": true, "other": true}, "optInStatus": null,
            "planName": "pro", "seats": 12, "signedUpAt": "2024-01-08T11:31:06.000Z",
            "trial": false, "unmapped": "whatever"
        });
        for (k, v) in changes.as_object().unwrap() {
            contact[k] = v.clone();
        }
        contact.as_object().unwrap().clone()
    }

    fn fields(drifts: &[Drift]) -> Vec<String> {
        drifts
            .iter()
            .map(|d| d.field.clone().unwrap_or_else(|| "(missing)".into()))
            .collect()
    }

    #[test]
    fn a_contact_as_loops_returns_it_is_no_drift() {
        let c = row(&[]);
        assert_eq!(c.email.as_deref(), Some("ada@example.com"));
        assert_eq!(compare(&spec(), &c, Some(&loops(json!({})))), vec![]);
    }

    #[test]
    fn dates_are_compared_as_instants() {
        let c = row(&[]);
        for same in [
            json!("2024-01-08T11:31:06Z"),
            json!("2024-01-08T12:31:06.000+01:00"),
            json!(1_704_713_466_000i64),
            json!(1_704_713_466),
        ] {
            let found = loops(json!({ "signedUpAt": same }));
            assert_eq!(compare(&spec(), &c, Some(&found)), vec![], "{same}");
        }
        let found = loops(json!({"signedUpAt": "2024-01-08T11:31:07.000Z"}));
        let drifts = compare(&spec(), &c, Some(&found));
        assert_eq!(
            drifts[0].describe(),
            "signedUpAt is \"2024-01-08T11:31:07.000Z\" in Loops, \"2024-01-08T11:31:06.000Z\" confirmed"
        );
        let found = loops(json!({"signedUpAt": "not a date"}));
        assert_eq!(fields(&compare(&spec(), &c, Some(&found))), ["signedUpAt"]);
    }

    #[test]
    fn numbers_twelve_and_twelve_point_zero_are_one() {
        let c = row(&[("seats", Some("12.0"))]);
        for same in [json!(12), json!(12.0), json!("12")] {
            let found = loops(json!({ "seats": same }));
            assert_eq!(compare(&spec(), &c, Some(&found)), vec![], "{same}");
        }
        let found = loops(json!({"seats": 12.5}));
        assert_eq!(fields(&compare(&spec(), &c, Some(&found))), ["seats"]);
        let c = row(&[("seats", Some("2.5"))]);
        assert_eq!(
            compare(&spec(), &c, Some(&loops(json!({"seats": 2.5})))),
            vec![]
        );
        assert_eq!(
            fields(&compare(&spec(), &c, Some(&loops(json!({"seats": 2}))))),
            ["seats"]
        );
    }

    #[test]
    fn booleans() {
        let c = row(&[("trial", Some("yes"))]);
        let found = loops(json!({"trial": true}));
        assert_eq!(compare(&spec(), &c, Some(&found)), vec![]);
        let drifts = compare(&spec(), &c, Some(&loops(json!({"trial": false}))));
        assert_eq!(
            drifts[0].describe(),
            "trial is false in Loops, true confirmed"
        );
        assert_eq!(
            fields(&compare(&spec(), &c, Some(&loops(json!({"trial": "no"}))))),
            ["trial"]
        );
    }

    #[test]
    fn a_cleared_value_must_be_absent_or_null() {
        let c = row(&[("first_name", None)]);
        assert_eq!(c.properties["firstName"], Value::Null);
        assert_eq!(
            compare(&spec(), &c, Some(&loops(json!({"firstName": null})))),
            vec![]
        );
        let mut absent = loops(json!({}));
        absent.remove("firstName");
        assert_eq!(compare(&spec(), &c, Some(&absent)), vec![]);
        let drifts = compare(&spec(), &c, Some(&loops(json!({"firstName": "Bob"}))));
        assert_eq!(
            drifts[0].describe(),
            "firstName is \"Bob\" in Loops, null confirmed"
        );
        // "" is a value, not a cleared one — except userGroup's documented unset "".
        let drifts = compare(&spec(), &c, Some(&loops(json!({"firstName": ""}))));
        assert_eq!(fields(&drifts), ["firstName"]);
        assert_eq!(c.properties["userGroup"], Value::Null);
        let found = loops(json!({"firstName": null, "userGroup": ""}));
        assert_eq!(compare(&spec(), &c, Some(&found)), vec![]);
        // A value confirmed, absent or null in Loops.
        let c = row(&[]);
        let mut absent = loops(json!({}));
        absent.remove("planName");
        let drifts = compare(&spec(), &c, Some(&absent));
        assert_eq!(
            drifts[0].describe(),
            "planName is absent in Loops, \"pro\" confirmed"
        );
        let drifts = compare(&spec(), &c, Some(&loops(json!({"planName": null}))));
        assert_eq!(
            drifts[0].describe(),
            "planName is null in Loops, \"pro\" confirmed"
        );
    }

    #[test]
    fn lists_true_must_be_there_false_must_not_null_is_not_compared() {
        let c = row(&[]);
        assert_eq!(
            c.mailing_lists,
            BTreeMap::from([("beta".into(), false), ("news".into(), true)])
        );
        let left = loops(json!({"mailingLists": {"other": true}}));
        let drifts = compare(&spec(), &c, Some(&left));
        assert_eq!(fields(&drifts), ["mailingLists.news"]);
        assert_eq!(drifts[0].kind, DriftKind::List);
        assert_eq!(
            drifts[0].describe(),
            "mailingLists.news is not subscribed in Loops, subscribed confirmed"
        );
        let joined = loops(json!({"mailingLists": {"news": true, "beta": true}}));
        assert_eq!(
            fields(&compare(&spec(), &c, Some(&joined))),
            ["mailingLists.beta"]
        );
        // A NULL column leaves the list alone: whatever Loops has is no drift.
        let c = row(&[("beta", None)]);
        assert_eq!(
            compare(&spec(), &c, Some(&joined)),
            vec![],
            "beta is not the sync's to compare"
        );
    }

    #[test]
    fn emails_are_compared_normalised_and_user_ids_trimmed() {
        let c = row(&[]);
        let found = loops(json!({"email": "ADA@example.com"}));
        assert_eq!(compare(&spec(), &c, Some(&found)), vec![]);
        let found = loops(json!({"email": "ada@example.org"}));
        let drifts = compare(&spec(), &c, Some(&found));
        assert_eq!(
            drifts[0].describe(),
            "email is \"ada@example.org\" in Loops, \"ada@example.com\" confirmed"
        );
        let mut s = spec();
        s.identify_by = IdentifyBy::UserId;
        s.properties.push(MappedProperty {
            property: "userId".into(),
            column: "id".into(),
            kind: PropertyKind::String,
        });
        let values = [
            ("email", Some("a@x.co")),
            ("id", Some(" 42 ")),
            ("newsletter", None),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.map(str::to_owned)))
        .collect();
        let c = confirmed(&s, "42", "fp", values, None, None).unwrap();
        assert_eq!(
            c.lookup(IdentifyBy::UserId),
            Some(Lookup::UserId("42".into()))
        );
        // Every other column is NULL here: cleared, so absent in Loops is no drift.
        let found = json!({"email": "A@x.co", "userId": "42"});
        assert_eq!(compare(&s, &c, found.as_object()), vec![]);
        let found = json!({"email": "a@x.co", "userId": "43", "planName": "pro"});
        assert_eq!(
            fields(&compare(&s, &c, found.as_object())),
            ["userId", "planName"]
        );
        let found = json!({"email": "a@x.co", "userId": null});
        assert_eq!(fields(&compare(&s, &c, found.as_object())), ["userId"]);
    }

    #[test]
    fn unmapped_properties_are_ignored_and_a_missing_contact_is_one_drift() {
        let c = row(&[]);
        let found = loops(json!({"unmapped": "changed", "lastName": "L", "subscribed": false}));
        assert_eq!(compare(&spec(), &c, Some(&found)), vec![]);
        let drifts = compare(&spec(), &c, None);
        assert_eq!(drifts.len(), 1);
        assert_eq!(drifts[0].kind, DriftKind::Missing);
        assert_eq!(drifts[0].describe(), "not in Loops");
        assert_eq!(
            c.lookup(IdentifyBy::Email),
            Some(Lookup::Email("ada@example.com".into()))
        );
    }

    #[test]
    fn an_event_sync_confirms_the_same_contact_write() {
        let mut s = spec();
        s.trigger_workflows = true;
        let values = [("email", Some("a@x.co")), ("plan", Some("pro"))]
            .iter()
            .map(|(k, v)| (k.to_string(), v.map(str::to_owned)))
            .collect();
        let c = confirmed(&s, "1", "fp", values, None, None).unwrap();
        assert_eq!(c.properties["planName"], json!("pro"));
        let invalid = confirmed(&s, "1", "fp", BTreeMap::new(), None, None);
        assert!(invalid.is_err(), "no email: what a run would refuse");
    }

    #[test]
    fn samples_are_deterministic_spread_and_bounded() {
        let keys: Vec<String> = (0..1000).map(|i| i.to_string()).collect();
        let take = |seed: u64, limit: Option<usize>| {
            let mut sample = Sample::new(limit);
            for k in &keys {
                sample.offer(rank(seed, "users", k), k.clone(), ());
            }
            sample
                .into_sorted()
                .into_iter()
                .map(|(k, ())| k)
                .collect::<Vec<_>>()
        };
        let a = take(0, Some(100));
        assert_eq!(a.len(), 100);
        assert_eq!(a, take(0, Some(100)), "the same seed, the same records");
        assert_ne!(a, take(1, Some(100)), "another seed, another sample");
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(a, sorted, "ordered by key");
        // Spread: every tenth of the key space holds some of them.
        let numbers: Vec<usize> = a.iter().map(|k| k.parse().unwrap()).collect();
        for decile in 0..10 {
            assert!(
                numbers.iter().any(|n| n / 100 == decile),
                "decile {decile}: {numbers:?}"
            );
        }
        // A larger sample contains the smaller one: adding records never reshuffles.
        let larger = take(0, Some(200));
        assert!(a.iter().all(|k| larger.contains(k)));
        assert_eq!(take(0, None).len(), 1000);
        assert!(take(0, Some(0)).is_empty());
        assert_eq!(take(0, Some(5000)).len(), 1000);
    }
}
