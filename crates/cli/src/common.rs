//! What the commands share: exit statuses, usage errors, reading the config, opening the
//! deployment through the engine, the stop signal.

use std::path::Path;
use std::sync::Arc;

use loopsync_config::Config;
use loopsync_engine::state::Warehouse;

use crate::stop;

/// Exit statuses of PRODUCT.md: 0 done, 1 failed, 2 bad usage or config, 3 degraded.
pub const EXIT_FAILED: u8 = 1;
pub const EXIT_USAGE: u8 = 2;

/// An error in how loopsync was called or configured: exit status 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Reads the config; its errors are usage errors.
pub fn load_config(path: &Path) -> anyhow::Result<Config> {
    Config::load(path).map_err(|e| UsageError(format!("{}: {e}", path.display())).into())
}

/// Reads the config and checks that `--sync NAME`, if given, is one of its syncs.
pub fn load_config_for(path: &Path, sync: Option<&str>) -> anyhow::Result<Config> {
    let config = load_config(path)?;
    if let Some(name) = sync
        && config.sync(name).is_none()
    {
        return Err(UsageError(format!("no sync named \"{name}\" in the config")).into());
    }
    Ok(config)
}

/// Reads the config for a command that needs only the warehouse (PRODUCT.md: never Loops'
/// secrets): a `${VAR}` that is not set is an error only in the warehouse's settings. Checks
/// that `--sync NAME`, if given, is one of its syncs.
pub fn load_config_for_warehouse(path: &Path, sync: Option<&str>) -> anyhow::Result<Config> {
    let config = Config::load_for_warehouse(path)
        .map_err(|e| UsageError(format!("{}: {e}", path.display())))?;
    if let Some(name) = sync
        && config.sync(name).is_none()
    {
        return Err(UsageError(format!("no sync named \"{name}\" in the config")).into());
    }
    Ok(config)
}

/// The config's warehouse for a command that only reads: nothing is made or migrated; a
/// state not made yet reads as empty.
pub async fn open_warehouse_read_only(config: &Config) -> anyhow::Result<Arc<dyn Warehouse>> {
    Ok(loopsync_engine::state::open_read_only(config).await?)
}

/// The config's warehouse, its loopsync tables ready.
pub async fn open_warehouse(config: &Config) -> anyhow::Result<Arc<dyn Warehouse>> {
    Ok(loopsync_engine::state::open(config).await?)
}

/// SIGTERM or SIGINT (Ctrl-C): the first asked the process to stop (see [`stop`]).
pub async fn shutdown_signal() {
    stop::requested().await
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
[warehouse]
url = "${LOOPSYNC_TEST_WAREHOUSE_URL_UNSET}"

[loops]
api_key = "${LOOPSYNC_TEST_KEY_UNSET}"

[[sync]]
name = "users"
model = "select id, email from users"
primary_key = "id"
identify_by = "email"

[sync.mapping]
email = "email"
"#;

    /// A command that needs only the warehouse reads a config whose Loops secret is unset; an
    /// unset variable in the warehouse's settings is still an error naming it.
    #[test]
    fn the_warehouse_alone_needs_no_loops_secret() {
        let dir = std::env::temp_dir().join(format!("loopsync-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("loopsync.toml");
        std::fs::write(
            &path,
            CONFIG.replace("${LOOPSYNC_TEST_WAREHOUSE_URL_UNSET}", "sqlite:///w.db"),
        )
        .unwrap();
        let config = load_config_for_warehouse(&path, Some("users")).unwrap();
        assert_eq!(config.warehouse.url, "sqlite:///w.db");
        // Nor Loops' URL from an unset variable.
        std::fs::write(
            &path,
            CONFIG
                .replace("${LOOPSYNC_TEST_WAREHOUSE_URL_UNSET}", "sqlite:///w.db")
                .replace(
                    "[loops]\n",
                    "[loops]\nbase_url = \"${LOOPSYNC_TEST_BASE_URL_UNSET}\"\n",
                ),
        )
        .unwrap();
        assert!(load_config_for_warehouse(&path, None).is_ok());
        assert!(load_config(&path).is_err());
        std::fs::write(
            &path,
            CONFIG.replace("${LOOPSYNC_TEST_WAREHOUSE_URL_UNSET}", "sqlite:///w.db"),
        )
        .unwrap();
        assert!(load_config(&path).is_err(), "the full config needs the key");
        let unknown = load_config_for_warehouse(&path, Some("nobody")).unwrap_err();
        assert!(unknown.downcast_ref::<UsageError>().is_some());

        std::fs::write(&path, CONFIG).unwrap();
        let error = load_config_for_warehouse(&path, None).unwrap_err();
        assert!(error.downcast_ref::<UsageError>().is_some());
        assert!(
            error.to_string().ends_with(
                "warehouse.url: environment variable LOOPSYNC_TEST_WAREHOUSE_URL_UNSET is not set"
            ),
            "{error}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
