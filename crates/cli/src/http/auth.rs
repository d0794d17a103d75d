//! The status page's token (`--http-token-file`): read once at start from a file only its owner
//! (and group) may read, kept as a SHA-256 digest. A browser gives it once, through the sign-in
//! form, and gets a session cookie (HttpOnly, SameSite=Strict) whose value is derived from the
//! token and a secret made at start, so a restart ends every session; a program may send it as
//! `Authorization: Bearer TOKEN`. Every comparison is in constant time.

use std::path::Path;

use hyper::header::{AUTHORIZATION, COOKIE, HeaderMap};
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::common::UsageError;

/// The session cookie's name.
pub const COOKIE_NAME: &str = "loopsync_session";

/// The shortest token taken, in characters: a short one could be guessed.
pub const MIN_TOKEN_CHARS: usize = 16;

/// Who may see records.
pub struct Auth {
    /// SHA-256 of the token; `None`: no token file, records are never shown.
    token: Option<[u8; 32]>,
    /// Made at start: the session cookie's value is derived from it and the token.
    secret: [u8; 32],
}

impl Auth {
    /// No token: the page shows summary counts only.
    pub fn none() -> Auth {
        Auth::with(None)
    }

    fn with(token: Option<&str>) -> Auth {
        let mut secret = [0u8; 32];
        rand::rng().fill_bytes(&mut secret);
        Auth {
            token: token.map(|t| Sha256::digest(t.as_bytes()).into()),
            secret,
        }
    }

    /// The token of `path`: its content, trimmed. A file that others may read is refused, one
    /// that its group may read is warned about (on stderr); an empty or short token is refused.
    pub fn from_file(path: &Path) -> Result<Auth, UsageError> {
        let shown = path.display();
        let usage = |why: String| UsageError(format!("--http-token-file {shown}: {why}"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path)
                .map_err(|e| usage(e.to_string()))?
                .permissions()
                .mode()
                & 0o777;
            if mode & 0o004 != 0 {
                return Err(usage(format!(
                    "anyone on this machine can read it (mode {mode:04o}): chmod 600 {shown}, so \
                     that only loopsync's user reads the token"
                )));
            }
            if let Some(warning) =
                loopsync_config::too_open("--http-token-file", &path.display().to_string())
            {
                eprintln!("warning: {warning}");
            }
        }
        let text = std::fs::read_to_string(path).map_err(|e| usage(e.to_string()))?;
        let token = text.trim();
        if token.chars().count() < MIN_TOKEN_CHARS {
            return Err(usage(format!(
                "the token must be at least {MIN_TOKEN_CHARS} characters (it is {}); make one \
                 with `openssl rand -hex 32`",
                token.chars().count()
            )));
        }
        Ok(Auth::with(Some(token)))
    }

    /// Whether a token was given: without one, records are never shown.
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// Whether `given` is the token.
    pub fn is_token(&self, given: &str) -> bool {
        let Some(token) = &self.token else {
            return false;
        };
        let given: [u8; 32] = Sha256::digest(given.trim().as_bytes()).into();
        bool::from(given.ct_eq(token))
    }

    /// The session cookie's value for a browser that gave the token.
    pub fn session(&self) -> Option<String> {
        let token = self.token.as_ref()?;
        let mut digest = Sha256::new();
        digest.update(b"loopsync status page session\0");
        digest.update(self.secret);
        digest.update(token);
        Some(
            digest
                .finalize()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
        )
    }

    /// Whether the request carries the token: a valid session cookie, or the token as a
    /// bearer token.
    pub fn allows(&self, headers: &HeaderMap) -> bool {
        let Some(session) = self.session() else {
            return false;
        };
        let by_cookie = headers
            .get_all(COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .any(|(name, value)| {
                name == COOKIE_NAME && bool::from(value.as_bytes().ct_eq(session.as_bytes()))
            });
        let by_bearer = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|given| self.is_token(given));
        by_cookie || by_bearer
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use hyper::header::HeaderValue;

    use super::*;

    const TOKEN: &str = "0123456789abcdef-token";

    fn file(dir: &Path, text: &str, mode: u32) -> std::path::PathBuf {
        let path = dir.join("token");
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    /// A token file anyone may read, an empty one and a short one are refused; a private one
    /// is read, trimmed.
    #[test]
    fn the_token_file_is_private_and_the_token_long() {
        let dir = tempfile::tempdir().unwrap();
        let open = Auth::from_file(&file(dir.path(), TOKEN, 0o644))
            .err()
            .unwrap();
        assert!(open.0.contains("mode 0644): chmod 600"), "{}", open.0);
        let short = Auth::from_file(&file(dir.path(), "short\n", 0o600))
            .err()
            .unwrap();
        assert!(short.0.contains("at least 16 characters"), "{}", short.0);
        assert!(Auth::from_file(&file(dir.path(), "", 0o600)).is_err());
        assert!(Auth::from_file(&dir.path().join("missing")).is_err());
        let auth = Auth::from_file(&file(dir.path(), &format!("{TOKEN}\n"), 0o640)).unwrap();
        assert!(auth.is_token(TOKEN));
        assert!(!auth.is_token("0123456789abcdef-tokeN"));
    }

    /// The token lets a request through as the session cookie derived from it, or as a bearer
    /// token; anything else does not, and without a token nothing does.
    #[test]
    fn a_request_needs_the_session_or_the_token() {
        let auth = Auth::with(Some(TOKEN));
        let session = auth.session().unwrap();
        assert_eq!(session.len(), 64);
        assert!(!session.contains(TOKEN));
        let request = |name: hyper::header::HeaderName, value: String| {
            let mut headers = HeaderMap::new();
            headers.insert(name, HeaderValue::from_str(&value).unwrap());
            auth.allows(&headers)
        };
        assert!(request(COOKIE, format!("a=b; {COOKIE_NAME}={session}")));
        assert!(request(AUTHORIZATION, format!("Bearer {TOKEN}")));
        assert!(!request(COOKIE, format!("{COOKIE_NAME}={TOKEN}")));
        assert!(!request(
            COOKIE,
            format!("{COOKIE_NAME}={}", &session[..63])
        ));
        assert!(!request(AUTHORIZATION, "Bearer wrong-token-0123456".into()));
        assert!(!auth.allows(&HeaderMap::new()));
        // Another process (a restart) makes another session from the same token.
        assert_ne!(Auth::with(Some(TOKEN)).session(), Some(session));
        let none = Auth::none();
        assert!(!none.has_token() && !none.is_token(TOKEN) && none.session().is_none());
    }
}
