//! The client against a hostile "Loops" on loopback (a few lines of TCP, no simulator): a
//! redirect elsewhere is not followed, no `Referer` is sent, an endless body is refused.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use loopsync_core::tuning::MAX_LOOPS_BODY_BYTES;
use loopsync_core::{Classified, ErrorClass};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::{ApiKey, ClientConfig, ContactIdentity, ContactPayload, LoopsClient, LoopsError};

/// A server that records the head (request line and headers) of every request it is sent and
/// answers each with what `answer` makes of its address and that head.
struct Hostile {
    addr: std::net::SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
}

impl Hostile {
    async fn start(
        answer: impl Fn(std::net::SocketAddr, &str) -> Vec<u8> + Send + Sync + 'static,
    ) -> Hostile {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (seen, answer) = (heads.clone(), Arc::new(answer));
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let (seen, answer) = (seen.clone(), answer.clone());
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 4096];
                    let end = loop {
                        if let Some(i) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&request[..end]).into_owned();
                    // The body is read too, so that closing does not reset the connection.
                    let length: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|n| n.trim().parse().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    while request.len() < end + length {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    seen.lock().unwrap().push(head.clone());
                    let _ = stream.write_all(&answer(addr, &head)).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        Hostile { addr, heads }
    }

    fn base_url(&self) -> String {
        format!("http://{}/api", self.addr)
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

fn client(base_url: &str) -> LoopsClient {
    let mut config = ClientConfig::new(base_url, ApiKey::new("test-key").unwrap());
    config.timeout = Duration::from_secs(5);
    LoopsClient::new(config).unwrap()
}

fn redirect(status: &str, location: &str) -> Vec<u8> {
    format!("HTTP/1.1 {status}\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .into_bytes()
}

fn contact() -> ContactPayload {
    ContactPayload {
        email: Some("ann@x.co".into()),
        user_id: None,
        properties: Default::default(),
        mailing_lists: Default::default(),
    }
}

/// A 307 or 308 to another host is an error of its own, permanent; the other host never
/// hears of the request (its body, the contact's data, and the key stay where they were sent).
#[tokio::test]
async fn redirects_are_not_followed() {
    let elsewhere = Hostile::start(|_, _| {
        b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n{\"id\":\"c1\"}\n".to_vec()
    })
    .await;
    for status in ["307 Temporary Redirect", "308 Permanent Redirect"] {
        let target = format!("{}/v1/contacts/update", elsewhere.base_url());
        let loops = Hostile::start(move |_, _| redirect(status, &target)).await;
        let error = client(&loops.base_url())
            .update_contact(&contact())
            .await
            .unwrap_err();
        assert!(
            matches!(&error, LoopsError::Redirected { status: s, location: Some(l) }
                if status.starts_with(&s.to_string()) && l.contains(&elsewhere.addr.to_string())),
            "{error:?}"
        );
        assert_eq!(error.class(), ErrorClass::Permanent);
        assert!(error.to_string().contains("not followed"), "{error}");
        assert_eq!(loops.heads().len(), 1);
    }
    assert_eq!(
        elsewhere.heads(),
        Vec::<String>::new(),
        "nothing arrived elsewhere"
    );
}

/// No request carries a `Referer`, not even one sent where a redirect pointed (the URL of
/// `contacts/find` holds an email); and a redirect to the same server is not followed either.
#[tokio::test]
async fn no_referer_is_sent() {
    let loops = Hostile::start(|addr, head| {
        if head.starts_with("GET /api/v1/contacts/find") {
            redirect("307 Temporary Redirect", &format!("http://{addr}/landed"))
        } else {
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]".to_vec()
        }
    })
    .await;
    let found = client(&loops.base_url())
        .find_contact(&ContactIdentity::Email("ann@x.co".into()))
        .await;
    let heads = loops.heads();
    for head in &heads {
        assert!(
            !head.to_ascii_lowercase().contains("\r\nreferer:"),
            "{head}"
        );
    }
    assert_eq!(heads.len(), 1, "one request, not followed: {heads:?}");
    assert!(
        matches!(found, Err(LoopsError::Redirected { .. })),
        "{found:?}"
    );
}

/// A body over the cap (2 MiB, with or without a `Content-Length`) is refused, not read
/// whole; one under it is read.
#[tokio::test]
async fn an_over_long_body_is_refused() {
    let big = 2 * 1024 * 1024;
    for declared in [true, false] {
        let loops = Hostile::start(move |_, _| {
            let mut answer = if declared {
                format!("HTTP/1.1 200 OK\r\nContent-Length: {big}\r\n\r\n").into_bytes()
            } else {
                b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".to_vec()
            };
            answer.extend(std::iter::repeat_n(b' ', big - 2));
            answer.extend_from_slice(b"[]");
            answer
        })
        .await;
        let error = client(&loops.base_url())
            .list_mailing_lists()
            .await
            .unwrap_err();
        assert!(
            matches!(error, LoopsError::TooLarge { status: 200, limit } if limit == MAX_LOOPS_BODY_BYTES),
            "declared {declared}: {error:?}"
        );
        assert_eq!(error.class(), ErrorClass::Permanent);
    }
    let small = Hostile::start(|_, _| {
        let mut answer = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".to_vec();
        answer.extend(std::iter::repeat_n(b' ', 512 * 1024));
        answer.extend_from_slice(b"[]");
        answer
    })
    .await;
    assert!(
        client(&small.base_url())
            .list_mailing_lists()
            .await
            .unwrap()
            .is_empty()
    );
}
