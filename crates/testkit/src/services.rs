//! The services tests run against, found from the environment, and the names tests make on
//! them: random, and dropped when the test ends.
//!
//! A test that needs a service that is not configured fails, unless the run explicitly asks to
//! skip (`LOOPSYNC_SKIP_SERVICES=1`): then it returns early, says so on stderr, and appends a
//! line to the file named by `LOOPSYNC_SKIP_LOG` (if set) so that `scripts/test.sh` can say how
//! many tests were skipped.

use std::io::Write;
use std::sync::atomic::{AtomicU32, Ordering};

/// The environment variable that lets tests skip when a service is missing.
pub const SKIP_VAR: &str = "LOOPSYNC_SKIP_SERVICES";

pub(crate) fn skipping_allowed() -> bool {
    std::env::var(SKIP_VAR).is_ok_and(|v| v == "1")
}

/// Notes that the current test is skipped because `var` is not set.
pub(crate) fn note_skip(var: &str) {
    note_skip_because(&format!("{var} is not set and {SKIP_VAR}=1"));
}

/// Notes that the current test is skipped, and why: on stderr, and as a line of the file named
/// by `LOOPSYNC_SKIP_LOG` (the test's name, a tab, the reason), which `scripts/test.sh` lists.
pub fn note_skip_because(reason: &str) {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("a test");
    eprintln!("skipped: {test}: {reason}");
    if let Some(path) = std::env::var_os("LOOPSYNC_SKIP_LOG")
        && let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    {
        let _ = writeln!(file, "{test}\t{reason}");
    }
}

/// Whether the tests were built with DuckDB (the `duckdb` feature). Without it, a test that
/// needs DuckDB notes its skip and its reason (`scripts/test.sh` lists it as dropped) rather
/// than vanishing from the build.
pub fn duckdb_built() -> bool {
    if cfg!(feature = "duckdb") {
        return true;
    }
    note_skip_because(
        "built without the duckdb feature (LOOPSYNC_TEST_DUCKDB=0, or cargo test without \
         --all-features)",
    );
    false
}

/// The URL in `var`; without one, a failure — or `None` when skipping was asked for.
pub fn service(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => Some(url),
        _ if skipping_allowed() => {
            note_skip(var);
            None
        }
        _ => panic!(
            "{var} is not set, so this test cannot run. Run scripts/test.sh (it starts throwaway \
             servers), set {var} to a server of yours, or set {SKIP_VAR}=1 to skip the tests \
             that need it"
        ),
    }
}

/// The NATS server to test against (`LOOPSYNC_TEST_NATS_URL`).
pub fn nats_url() -> Option<String> {
    service("LOOPSYNC_TEST_NATS_URL")
}

/// The PostgreSQL server to test against (`LOOPSYNC_TEST_PG_URL`: a URL whose user may create
/// databases).
pub fn pg_url() -> Option<String> {
    service("LOOPSYNC_TEST_PG_URL")
}

/// A name no other test uses, on this server or any other run sharing it: `prefix`, 8 random
/// hex digits, and a counter. Lower case letters, digits and `x` after the prefix, so it is a
/// valid database name, NATS namespace and file name.
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{:08x}x{}",
        rand::random::<u32>(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs `work` to completion on a runtime of its own, on a thread of its own: for cleanup in
/// `Drop`, which may run inside or outside a runtime.
fn block_on_own_runtime(work: impl std::future::Future<Output = ()> + Send + 'static) {
    let _ = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a cleanup runtime");
        runtime.block_on(async move {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(20), work).await;
        });
    })
    .join();
}

/// An empty database on the test PostgreSQL server, dropped (with its connections) on drop.
#[derive(Debug)]
pub struct TestDatabase {
    /// The database's URL.
    pub url: String,
    base: String,
    name: String,
}

impl TestDatabase {
    /// Creates one; `None` when PostgreSQL is not configured and skipping was asked for.
    pub async fn create() -> Option<TestDatabase> {
        let base = pg_url()?;
        let (client, connection) = tokio_postgres::connect(&base, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect to the test PostgreSQL ({base}): {e}"));
        tokio::spawn(connection);
        let name = unique("loopsync_t");
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create a test database");
        Some(TestDatabase {
            url: with_database(&base, &name),
            base,
            name,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if std::env::var_os("LOOPSYNC_TEST_KEEP").is_some() {
            eprintln!("kept database {}", self.name);
            return;
        }
        let (base, name) = (self.base.clone(), self.name.clone());
        block_on_own_runtime(async move {
            if let Ok((client, connection)) =
                tokio_postgres::connect(&base, tokio_postgres::NoTls).await
            {
                tokio::spawn(connection);
                let _ = client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await;
            }
        });
    }
}

/// `base` with its database replaced by `name`.
/// The MySQL or MariaDB server to test against (`LOOPSYNC_TEST_MYSQL_URL`: a URL whose user may
/// create databases).
pub fn mysql_url() -> Option<String> {
    service("LOOPSYNC_TEST_MYSQL_URL")
}

/// An empty database on the test MySQL server, dropped on drop.
#[derive(Debug)]
pub struct TestMySql {
    /// The database's URL.
    pub url: String,
    base: String,
    name: String,
}

impl TestMySql {
    /// Creates one; `None` when MySQL is not configured and skipping was asked for.
    pub async fn create() -> Option<TestMySql> {
        use mysql_async::prelude::Queryable;
        let base = mysql_url()?;
        let mut connection = mysql_async::Conn::from_url(&base)
            .await
            .unwrap_or_else(|e| panic!("connect to the test MySQL ({base}): {e}"));
        let name = unique("loopsync_t");
        connection
            .query_drop(format!("CREATE DATABASE {name}"))
            .await
            .expect("create a test database");
        let _ = connection.disconnect().await;
        Some(TestMySql {
            url: with_database(&base, &name),
            base,
            name,
        })
    }

    /// Runs statements on the database (several, separated by `;`).
    pub async fn exec(&self, sql: &str) {
        use mysql_async::prelude::Queryable;
        let mut connection = mysql_async::Conn::from_url(&self.url)
            .await
            .expect("connect to the test database");
        connection
            .query_drop(sql)
            .await
            .unwrap_or_else(|e| panic!("test SQL on MySQL: {e}\n{sql}"));
        let _ = connection.disconnect().await;
    }

    /// The first column of the first row, as a number.
    pub async fn count(&self, sql: &str) -> i64 {
        use mysql_async::prelude::Queryable;
        let mut connection = mysql_async::Conn::from_url(&self.url)
            .await
            .expect("connect to the test database");
        let n: Option<i64> = connection.query_first(sql).await.expect("count on MySQL");
        let _ = connection.disconnect().await;
        n.unwrap_or(0)
    }
}

impl Drop for TestMySql {
    fn drop(&mut self) {
        if std::env::var_os("LOOPSYNC_TEST_KEEP").is_some() {
            eprintln!("kept database {}", self.name);
            return;
        }
        let (base, name) = (self.base.clone(), self.name.clone());
        block_on_own_runtime(async move {
            use mysql_async::prelude::Queryable;
            if let Ok(mut connection) = mysql_async::Conn::from_url(&base).await {
                let _ = connection
                    .query_drop(format!("DROP DATABASE IF EXISTS {name}"))
                    .await;
                let _ = connection.disconnect().await;
            }
        });
    }
}

pub fn with_database(base: &str, name: &str) -> String {
    let (before_query, query) = match base.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (base, String::new()),
    };
    let scheme_end = before_query.find("://").map_or(0, |i| i + 3);
    let host_part = match before_query[scheme_end..].find('/') {
        Some(i) => &before_query[..scheme_end + i],
        None => before_query,
    };
    format!("{host_part}/{name}{query}")
}

/// A NATS namespace of a test: every stream whose name carries it (work queues, dead letters,
/// advisories, key-value buckets) is deleted on drop.
#[derive(Debug)]
pub struct TestNamespace {
    pub url: String,
    pub namespace: String,
}

impl TestNamespace {
    /// A fresh namespace on the test NATS server; `None` when NATS is not configured and
    /// skipping was asked for.
    pub fn create(prefix: &str) -> Option<TestNamespace> {
        Some(TestNamespace::on(&nats_url()?, prefix))
    }

    /// A fresh namespace on the NATS server at `url`.
    pub fn on(url: &str, prefix: &str) -> TestNamespace {
        TestNamespace {
            url: url.to_owned(),
            namespace: unique(prefix),
        }
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if std::env::var_os("LOOPSYNC_TEST_KEEP").is_some() {
            return;
        }
        let url = self.url.clone();
        let marker = self.namespace.to_uppercase().replace('-', "_");
        block_on_own_runtime(async move {
            use futures::TryStreamExt;
            let Ok(client) = async_nats::connect(&url).await else {
                return;
            };
            let js = async_nats::jetstream::new(client);
            let Ok(names) = js.stream_names().try_collect::<Vec<String>>().await else {
                return;
            };
            for name in names {
                if name.to_uppercase().contains(&marker) {
                    let _ = js.delete_stream(&name).await;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_in_url_is_replaced() {
        assert_eq!(
            with_database("postgres://u@127.0.0.1:5432/test", "x"),
            "postgres://u@127.0.0.1:5432/x"
        );
        assert_eq!(
            with_database("postgres://u@h:1/test?sslmode=disable", "x"),
            "postgres://u@h:1/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://u@h:1", "x"), "postgres://u@h:1/x");
    }

    /// What a test makes on the shared servers is gone when its guard is dropped.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn databases_and_namespaces_are_dropped() {
        let Some(database) = TestDatabase::create().await else {
            return;
        };
        let name = database.name().to_owned();
        let exists = |name: String| async move {
            let base = pg_url().unwrap();
            let (client, connection) = tokio_postgres::connect(&base, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(connection);
            client
                .query_one(
                    "SELECT count(*) FROM pg_database WHERE datname = $1",
                    &[&name],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
        };
        assert_eq!(exists(name.clone()).await, 1);
        drop(database);
        assert_eq!(exists(name).await, 0);

        let Some(ns) = TestNamespace::create("t") else {
            return;
        };
        let js = async_nats::jetstream::new(async_nats::connect(&ns.url).await.unwrap());
        let stream = format!("{}_OPS", ns.namespace.to_uppercase());
        js.create_stream(async_nats::jetstream::stream::Config {
            name: stream.clone(),
            subjects: vec![format!("{}.ops.>", ns.namespace)],
            ..Default::default()
        })
        .await
        .unwrap();
        assert!(js.get_stream(&stream).await.is_ok());
        drop(ns);
        assert!(js.get_stream(&stream).await.is_err(), "{stream} is gone");
    }

    #[test]
    fn unique_names_differ_and_are_valid_identifiers() {
        let (a, b) = (unique("t_"), unique("t_"));
        assert_ne!(a, b);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        );
        // Two processes with the same counter still differ (the random part).
        assert_ne!(&a[..10], &b[..10]);
    }
}
