//! The Loops rules of `loops-api.md` as plain functions over an in-memory audience: identity and
//! upsert, validation, property types and dates, mailing lists. No HTTP here.
//!
//! `rules` holds what Loops accepts, `audience` the contacts store the rules apply to.

mod audience;
mod rules;

pub use audience::*;
pub use rules::*;

#[cfg(test)]
mod tests {
    use serde_json::{Map, Value};

    use super::*;
    use crate::config::{EmailMatch, NumericDates, Settings, SettingsError, UnknownProperties};
    use serde_json::json;

    fn body(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn audience() -> Audience {
        Audience::new(
            vec![MailingList {
                id: "news".into(),
                name: "News".into(),
                description: None,
                is_public: true,
            }],
            vec![
                ("planName".into(), PropertyType::String),
                ("seats".into(), PropertyType::Number),
                ("trial".into(), PropertyType::Boolean),
                ("signedUpAt".into(), PropertyType::Date),
            ],
            EmailMatch::CaseInsensitive,
        )
    }

    /// One upsert as `contacts/update` does it.
    fn upsert(a: &mut Audience, v: Value) -> Result<WriteOutcome, ApiError> {
        let write = a.parse_write(&body(v), &Settings::default())?;
        let target = a.resolve(
            write.email.as_deref(),
            write.user_id.as_deref(),
            Mode::Upsert,
        )?;
        let id = format!("c{}", a.contact_count());
        Ok(a.apply(target, write, id))
    }

    #[test]
    fn email_validity() {
        for good in ["a@b.co", "first.last+tag@sub.example.com", "A@B.CO"] {
            assert!(is_valid_email(good), "{good}");
        }
        for bad in [
            "", "a", "a@b", "@b.co", "a@.co", "a@b.", "a b@c.co", "a@b..co", " a@b.co",
        ] {
            assert!(!is_valid_email(bad), "{bad}");
        }
    }

    #[test]
    fn dates_in_every_documented_form() {
        let expect = "2024-01-08T11:31:06.000Z";
        for v in [
            json!(1704713466),
            json!(1704713466000u64),
            json!("2024-01-08T11:31:06"),
            json!("2024-01-08T11:31:06.000"),
            json!("2024-01-08T11:31:06Z"),
            json!("2024-01-08 11:31:06"),
            json!("2024-01-08 11:31:06.000"),
            json!("2024-01-08T12:31:06+01:00"),
            json!("2024-01-08 06:31:06-05:00"),
        ] {
            let got = parse_date(&v, NumericDates::Auto).map(format_date);
            assert_eq!(got.as_deref(), Some(expect), "{v}");
        }
        assert_eq!(
            parse_date(&json!("2024-01-08 11:31"), NumericDates::Auto)
                .map(format_date)
                .as_deref(),
            Some("2024-01-08T11:31:00.000Z")
        );
        assert_eq!(
            parse_date(&json!("2024-01-08"), NumericDates::Auto)
                .map(format_date)
                .as_deref(),
            Some("2024-01-08T00:00:00.000Z")
        );
        for bad in [
            json!("yesterday"),
            json!("2024-13-01"),
            json!(true),
            json!([1]),
        ] {
            assert!(parse_date(&bad, NumericDates::Auto).is_none(), "{bad}");
        }
    }

    #[test]
    fn numbers_in_dates_are_seconds_below_1e11_or_always_millis() {
        let at = |v: Value, numeric| parse_date(&v, numeric).map(format_date);
        use NumericDates::{Auto, Millis};
        for (value, auto, millis) in [
            (
                json!(86_400_000),
                "1972-09-27T00:00:00.000Z",
                "1970-01-02T00:00:00.000Z",
            ),
            (
                json!(1000),
                "1970-01-01T00:16:40.000Z",
                "1970-01-01T00:00:01.000Z",
            ),
            (
                json!(1_704_713_466),
                "2024-01-08T11:31:06.000Z",
                "1970-01-20T17:31:53.466Z",
            ),
            (
                json!(-86_400_000),
                "1967-04-07T00:00:00.000Z",
                "1969-12-31T00:00:00.000Z",
            ),
            // Milliseconds from 10^11 on read the same either way.
            (
                json!(1_704_713_466_000u64),
                "2024-01-08T11:31:06.000Z",
                "2024-01-08T11:31:06.000Z",
            ),
            // Strings are not numbers.
            (
                json!("1970-01-02"),
                "1970-01-02T00:00:00.000Z",
                "1970-01-02T00:00:00.000Z",
            ),
        ] {
            assert_eq!(at(value.clone(), Auto).as_deref(), Some(auto), "{value}");
            assert_eq!(
                at(value.clone(), Millis).as_deref(),
                Some(millis),
                "{value}"
            );
        }
        assert_eq!(
            coerce("signedUpAt", PropertyType::Date, &json!(1000), Millis).unwrap(),
            json!("1970-01-01T00:00:01.000Z")
        );
        let e = coerce("signedUpAt", PropertyType::Date, &json!(true), Millis).unwrap_err();
        assert!(e.message.contains("Unix milliseconds"), "{}", e.message);
    }

    #[test]
    fn every_date_property_of_a_write_follows_numeric_dates() {
        let a = audience();
        let b = body(json!({"email": "a@x.co", "signedUpAt": 86_400_000, "createdAt": 1000}));
        let props = |numeric_dates| {
            let settings = Settings {
                numeric_dates,
                ..Default::default()
            };
            a.parse_write(&b, &settings).unwrap().props
        };
        assert_eq!(
            props(NumericDates::Auto),
            [
                ("createdAt".to_owned(), json!("1970-01-01T00:16:40.000Z")),
                ("signedUpAt".to_owned(), json!("1972-09-27T00:00:00.000Z")),
            ]
        );
        assert_eq!(
            props(NumericDates::Millis),
            [
                ("createdAt".to_owned(), json!("1970-01-01T00:00:01.000Z")),
                ("signedUpAt".to_owned(), json!("1970-01-02T00:00:00.000Z")),
            ]
        );
    }

    #[test]
    fn case_sensitive_emails_are_two_contacts() {
        let mut a = audience();
        a.set_email_match(EmailMatch::CaseSensitive).unwrap();
        let upper = upsert(&mut a, json!({"email": "A@x.co", "planName": "upper"})).unwrap();
        let lower = upsert(&mut a, json!({"email": "a@x.co", "planName": "lower"})).unwrap();
        assert!(upper.created && lower.created);
        assert_ne!(upper.id, lower.id);
        assert_eq!(a.contact_count(), 2);
        assert_eq!(a.find(Some("A@x.co"), None).unwrap().id, upper.id);
        assert_eq!(a.find(Some("a@x.co"), None).unwrap().id, lower.id);
        assert!(a.find(Some("A@X.CO"), None).is_none());
        // An update by exact email touches that contact only.
        let out = upsert(&mut a, json!({"email": "A@x.co", "planName": "upper2"})).unwrap();
        assert_eq!(out.id, upper.id);
        assert_eq!(
            a.find(Some("a@x.co"), None).unwrap().props["planName"],
            "lower"
        );
        // Create conflicts on the exact email only.
        assert_eq!(
            a.resolve(Some("a@x.co"), None, Mode::Create)
                .unwrap_err()
                .status,
            409
        );
        assert_eq!(a.resolve(Some("a@X.co"), None, Mode::Create), Ok(None));
        // Delete by exact email.
        assert_eq!(a.delete(Some("A@X.CO"), None).unwrap_err().status, 404);
        a.delete(Some("A@x.co"), None).unwrap();
        assert!(a.find(Some("A@x.co"), None).is_none());
        assert_eq!(a.find(Some("a@x.co"), None).unwrap().id, lower.id);
    }

    #[test]
    fn case_insensitive_emails_are_one_contact() {
        let mut a = audience();
        let upper = upsert(&mut a, json!({"email": "A@x.co"})).unwrap();
        let lower = upsert(&mut a, json!({"email": "a@x.co"})).unwrap();
        assert_eq!(upper.id, lower.id);
        assert_eq!(
            lower.changed,
            ["email"],
            "stored as sent, so a new spelling is a change"
        );
        assert_eq!(a.contact_count(), 1);
        assert_eq!(a.find(Some("A@X.CO"), None).unwrap().email, "a@x.co");
        a.delete(Some("A@X.CO"), None).unwrap();
        assert_eq!(a.contact_count(), 0);
    }

    #[test]
    fn switching_email_match_rekeys_or_refuses_when_contacts_would_merge() {
        let mut a = audience();
        upsert(&mut a, json!({"email": "A@x.co"})).unwrap();
        a.set_email_match(EmailMatch::CaseSensitive).unwrap();
        assert!(a.find(Some("a@x.co"), None).is_none());
        assert!(a.find(Some("A@x.co"), None).is_some());
        upsert(&mut a, json!({"email": "a@x.co"})).unwrap();
        let e = a.set_email_match(EmailMatch::CaseInsensitive).unwrap_err();
        assert_eq!(
            e,
            SettingsError::EmailsCollide {
                first: "A@x.co".into(),
                second: "a@x.co".into()
            }
        );
        // Refused: nothing changed, matching is still exact.
        assert!(a.find(Some("A@X.CO"), None).is_none());
        assert_eq!(a.find(Some("a@x.co"), None).unwrap().email, "a@x.co");
        a.delete(Some("a@x.co"), None).unwrap();
        a.set_email_match(EmailMatch::CaseInsensitive).unwrap();
        assert_eq!(a.find(Some("A@X.CO"), None).unwrap().email, "A@x.co");
    }

    #[test]
    fn types_are_enforced_and_null_clears() {
        assert!(
            coerce(
                "seats",
                PropertyType::Number,
                &json!("3"),
                NumericDates::Auto
            )
            .is_err()
        );
        assert!(
            coerce(
                "trial",
                PropertyType::Boolean,
                &json!("true"),
                NumericDates::Auto
            )
            .is_err()
        );
        assert!(
            coerce(
                "planName",
                PropertyType::String,
                &json!(3),
                NumericDates::Auto
            )
            .is_err()
        );
        assert_eq!(
            coerce("seats", PropertyType::Number, &json!(3), NumericDates::Auto).unwrap(),
            json!(3)
        );
        assert_eq!(
            coerce(
                "seats",
                PropertyType::Number,
                &Value::Null,
                NumericDates::Auto
            )
            .unwrap(),
            Value::Null
        );
        let long = "x".repeat(501);
        let e = coerce(
            "planName",
            PropertyType::String,
            &json!(long),
            NumericDates::Auto,
        )
        .unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.message.contains("planName"), "{}", e.message);
        assert!(
            coerce(
                "planName",
                PropertyType::String,
                &json!("é".repeat(500)),
                NumericDates::Auto
            )
            .is_ok()
        );
    }

    #[test]
    fn update_with_unknown_email_creates_with_defaults() {
        let mut a = audience();
        let out = upsert(&mut a, json!({"email": "new@x.co", "planName": "pro"})).unwrap();
        assert!(out.created);
        let c = a.find(Some("NEW@x.co"), None).unwrap();
        let j = a.to_json(c);
        assert_eq!(j["source"], "API");
        assert_eq!(j["subscribed"], true);
        assert_eq!(j["userGroup"], "");
        assert_eq!(j["firstName"], Value::Null);
        assert_eq!(j["planName"], "pro");
        assert_eq!(j["seats"], Value::Null);
        assert_eq!(j["mailingLists"], json!({}));
    }

    #[test]
    fn user_id_only_update_of_unknown_user_is_400_and_creates_nothing() {
        let mut a = audience();
        let e = upsert(&mut a, json!({"userId": "u1", "planName": "pro"})).unwrap_err();
        assert_eq!(e.status, 400);
        assert_eq!(a.contact_count(), 0);
    }

    #[test]
    fn email_of_one_contact_and_user_id_of_another_is_400() {
        let mut a = audience();
        upsert(&mut a, json!({"email": "a@x.co", "userId": "ua"})).unwrap();
        upsert(&mut a, json!({"email": "b@x.co", "userId": "ub"})).unwrap();
        let e = upsert(&mut a, json!({"email": "a@x.co", "userId": "ub"})).unwrap_err();
        assert_eq!(e.message, "Multiple contacts found for the given criteria");
        assert_eq!(e.status, 400);
    }

    #[test]
    fn email_changes_through_a_known_user_id() {
        let mut a = audience();
        let first = upsert(&mut a, json!({"email": "old@x.co", "userId": "u1"})).unwrap();
        let second = upsert(&mut a, json!({"email": "new@x.co", "userId": "u1"})).unwrap();
        assert_eq!(first.id, second.id);
        assert!(!second.created);
        assert_eq!(second.changed, vec!["email"]);
        assert!(a.find(Some("old@x.co"), None).is_none());
        assert_eq!(a.find(Some("new@x.co"), None).unwrap().id, first.id);
        assert_eq!(a.contact_count(), 1);
    }

    #[test]
    fn one_matching_identifier_writes_the_other() {
        let mut a = audience();
        upsert(&mut a, json!({"email": "a@x.co"})).unwrap();
        let out = upsert(&mut a, json!({"email": "a@x.co", "userId": "u9"})).unwrap();
        assert_eq!(out.changed, vec!["userId"]);
        assert_eq!(a.find(None, Some("u9")).unwrap().email, "a@x.co");
    }

    #[test]
    fn create_conflicts_on_email_any_case_and_on_user_id() {
        let mut a = audience();
        upsert(&mut a, json!({"email": "a@x.co", "userId": "u1"})).unwrap();
        let e = a.resolve(Some("A@X.CO"), None, Mode::Create).unwrap_err();
        assert_eq!(e.status, 409);
        let e = a
            .resolve(Some("b@x.co"), Some("u1"), Mode::Create)
            .unwrap_err();
        assert_eq!(e.status, 409);
        assert_eq!(a.resolve(Some("b@x.co"), None, Mode::Create), Ok(None));
    }

    #[test]
    fn null_identifiers_are_absent_and_null_clears_properties() {
        let mut a = audience();
        upsert(
            &mut a,
            json!({"email": "a@x.co", "userId": null, "firstName": "Ann", "mailingLists": []}),
        )
        .unwrap();
        let out = upsert(
            &mut a,
            json!({"email": "a@x.co", "userId": null, "firstName": null}),
        )
        .unwrap();
        assert_eq!(out.changed, vec!["firstName"]);
        let j = a.to_json(a.find(Some("a@x.co"), None).unwrap());
        assert_eq!(j["firstName"], Value::Null);
        assert_eq!(j["userId"], Value::Null);
    }

    #[test]
    fn identical_update_changes_nothing() {
        let mut a = audience();
        upsert(
            &mut a,
            json!({"email": "a@x.co", "seats": 3, "signedUpAt": 1704713466}),
        )
        .unwrap();
        // The same date in another form is the same value.
        let out = upsert(
            &mut a,
            json!({"email": "a@x.co", "seats": 3, "signedUpAt": "2024-01-08T11:31:06Z"}),
        )
        .unwrap();
        assert!(out.changed.is_empty(), "{:?}", out.changed);
    }

    #[test]
    fn lists_add_remove_and_unknown() {
        let mut a = audience();
        let out = upsert(
            &mut a,
            json!({"email": "a@x.co", "mailingLists": {"news": true}}),
        )
        .unwrap();
        assert_eq!(out.added_to_lists, vec!["news"]);
        let again = upsert(
            &mut a,
            json!({"email": "a@x.co", "mailingLists": {"news": true}}),
        )
        .unwrap();
        assert!(again.added_to_lists.is_empty());
        upsert(
            &mut a,
            json!({"email": "a@x.co", "mailingLists": {"news": false}}),
        )
        .unwrap();
        let back = upsert(
            &mut a,
            json!({"email": "a@x.co", "mailingLists": {"news": true}}),
        )
        .unwrap();
        assert_eq!(back.added_to_lists, vec!["news"], "a re-add fires again");
        let e = upsert(
            &mut a,
            json!({"email": "a@x.co", "mailingLists": {"nope": true}}),
        )
        .unwrap_err();
        assert!(e.message.contains("nope"));
        let e = upsert(
            &mut a,
            json!({"email": "a@x.co", "mailingLists": {"news": "yes"}}),
        )
        .unwrap_err();
        assert_eq!(e.status, 400);
        let e = upsert(&mut a, json!({"email": "a@x.co", "mailingLists": ["news"]})).unwrap_err();
        assert_eq!(e.status, 400);
    }

    #[test]
    fn reserved_unknown_and_unsettable_names_are_400() {
        let mut a = audience();
        for (key, needle) in [
            ("teamId", "reserved"),
            ("notes", "notes"),
            ("favouriteColour", "does not exist"),
        ] {
            let e = upsert(&mut a, json!({"email": "a@x.co", key: "x"})).unwrap_err();
            assert_eq!(e.status, 400);
            assert!(e.message.contains(needle), "{key}: {}", e.message);
        }
        let e = upsert(&mut a, json!({"email": "a@x.co", "subscribed": "true"})).unwrap_err();
        assert_eq!(e.status, 400);
    }

    #[test]
    fn unknown_properties_can_be_created_as_strings() {
        let mut a = audience();
        let settings = Settings {
            unknown_properties: UnknownProperties::Create,
            ..Default::default()
        };
        let write = a
            .parse_write(
                &body(json!({"email": "a@x.co", "colour": "red"})),
                &settings,
            )
            .unwrap();
        a.apply(None, write, "c1".into());
        assert!(
            a.properties()
                .iter()
                .any(|(k, _, t, custom)| k == "colour" && *t == PropertyType::String && *custom)
        );
    }

    #[test]
    fn property_creation_rules() {
        let mut a = audience();
        assert!(
            a.create_property("companyName", PropertyType::String)
                .is_ok()
        );
        for bad in [
            "companyName",
            "firstName",
            "teamId",
            "Company",
            "company_name",
            "2x",
        ] {
            assert_eq!(
                a.create_property(bad, PropertyType::String)
                    .unwrap_err()
                    .status,
                400,
                "{bad}"
            );
        }
        assert_eq!(label_for("companyName"), "Company Name");
    }

    #[test]
    fn delete_by_one_identifier() {
        let mut a = audience();
        upsert(&mut a, json!({"email": "a@x.co", "userId": "u1"})).unwrap();
        assert_eq!(
            a.delete(Some("a@x.co"), Some("u1")).unwrap_err().status,
            400
        );
        assert_eq!(a.delete(None, None).unwrap_err().status, 400);
        assert_eq!(a.delete(None, Some("nobody")).unwrap_err().status, 404);
        assert!(a.delete(None, Some("u1")).is_ok());
        assert!(a.find(Some("a@x.co"), None).is_none());
        assert!(a.find(None, Some("u1")).is_none());
    }

    #[test]
    fn resubscribe_is_a_change() {
        let mut a = audience();
        upsert(&mut a, json!({"email": "a@x.co", "subscribed": false})).unwrap();
        let out = upsert(&mut a, json!({"email": "a@x.co", "subscribed": true})).unwrap();
        assert_eq!(out.changed, vec!["subscribed"]);
    }
}
