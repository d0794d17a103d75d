//! The secret files a config names — `loops.api_key_file`, `nats.credentials` — should be
//! readable by loopsync's user alone. One that group or others can read is warned about, not
//! refused: Kubernetes mounts secrets 0644 by default and Docker 0444, and a refusal would stop
//! those deployments on upgrade (there, "others" are the container's own users). The warning
//! says how to close it.

use crate::Config;

/// Why the file at `path`, named by config key `key`, is too open: group or others may read
/// it. `None` when it is not, when its permissions cannot be read (its reader says why), and
/// off Unix.
pub fn too_open(key: &str, path: &str) -> Option<String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
        (mode & 0o044 != 0).then(|| {
            format!(
                "{key}: {path} can be read by group or others (mode {mode:04o}): chmod 600 {path} \
                 (in Kubernetes, defaultMode: 0400), so that only loopsync's user reads the secret"
            )
        })
    }
    #[cfg(not(unix))]
    {
        let _ = (key, path);
        None
    }
}

impl Config {
    /// The config's secret files that others may read ([`too_open`]), each said with its key.
    pub fn open_secret_files(&self) -> Vec<String> {
        let mut files = vec![("loops.api_key_file", self.loops.api_key_file.as_deref())];
        if let Some(nats) = &self.nats {
            files.push(("nats.credentials", nats.credentials.as_deref()));
        }
        files
            .into_iter()
            .filter_map(|(key, path)| too_open(key, path?))
            .collect()
    }

    /// Warns (log level `warn`) about each of [`Config::open_secret_files`].
    pub(crate) fn warn_of_open_secret_files(&self) {
        for warning in self.open_secret_files() {
            tracing::warn!("{warning}");
        }
    }
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// A key file others can read is named, with `chmod 600`; once 0600, it is not.
    #[test]
    fn a_secret_file_others_can_read_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("loops.key");
        std::fs::write(&key, "k\n").unwrap();
        let credentials = dir.path().join("nats.creds");
        std::fs::write(&credentials, "creds").unwrap();
        let text = format!(
            "[warehouse]\nurl = \"sqlite:///w.db\"\n\n[loops]\napi_key_file = \"{}\"\n\n\
             [nats]\nurl = \"nats://127.0.0.1:4222\"\ncredentials = \"{}\"\n",
            key.display(),
            credentials.display()
        );
        let config = Config::parse(&text, |_| None).unwrap();
        let set = |path: &std::path::Path, mode: u32| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        set(&key, 0o644);
        set(&credentials, 0o640);
        let warnings = config.open_secret_files();
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(
            warnings[0].starts_with("loops.api_key_file: ")
                && warnings[0].contains("(mode 0644): chmod 600"),
            "{warnings:?}"
        );
        assert!(
            warnings[1].starts_with("nats.credentials: ") && warnings[1].contains("mode 0640"),
            "{warnings:?}"
        );
        set(&key, 0o600);
        set(&credentials, 0o400);
        assert_eq!(config.open_secret_files(), Vec::<String>::new());
    }
}
