//! PostgreSQL as the model's source: the model checked (prepared, not run), its errors said
//! where they are.

use super::*;

/// A model error, said where it is (see [`crate::explain_model_error`]): the model as written
/// is prepared alone on `client` (parsed and planned, not run).
pub(super) async fn model_error(
    client: &Client,
    spec: &SyncSpec,
    e: &tokio_postgres::Error,
) -> WarehouseError {
    let own = match client.prepare(&spec.model).await {
        Ok(statement) => Ok(statement
            .columns()
            .iter()
            .map(|c| c.name().to_owned())
            .collect()),
        Err(own) => Err(match own.as_db_error() {
            Some(db) => match db.position() {
                Some(tokio_postgres::error::ErrorPosition::Original(at)) => format!(
                    "{} at {}",
                    db.message(),
                    crate::point_at(&spec.model, *at as usize)
                ),
                _ => db.message().to_owned(),
            },
            None => own.to_string(),
        }),
    };
    WarehouseError::Model {
        sync: spec.name.clone(),
        detail: crate::explain_model_error(spec, own, describe(e)),
    }
}

impl Pg {
    pub(super) async fn probe_model(&self, spec: &SyncSpec) -> Result<(), WarehouseError> {
        let client = self.client().await?;
        let probe = client
            .query(
                &*self.sql(&probe_sql(
                    spec,
                    cursor_check(spec, |c| at_or_after(c, &format!("'{EARLIEST_CURSOR}'"))),
                )),
                &[],
            )
            .await;
        match probe {
            Ok(_) => Ok(()),
            Err(e) => Err(model_error(&client, spec, &e).await),
        }
    }
}
