//! A PostgreSQL database per test, on the server `PACKMETER_TEST_POSTGRES_URL`
//! names (default: the local one, user `postgres`, trust authentication).
//! Each test creates its own database with a random name and drops it when
//! done, so tests run in parallel. When no server answers, a test prints
//! `SKIPPED: …` and passes, except under `CI=true`, where it fails.

use packmeter::store::postgres::PgUrl;

pub const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The server's administrative URL (a database the tests may connect to,
/// by a user who may create databases).
pub fn admin_url() -> String {
    std::env::var("PACKMETER_TEST_POSTGRES_URL")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| DEFAULT_URL.to_string())
}

/// `url` naming database `name` instead of its own.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let (scheme, rest) = base.split_once("://").expect("a URL with ://");
    let authority = rest.split('/').next().unwrap_or(rest);
    let mut out = format!("{scheme}://{authority}/{name}");
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// `url` with `key=value` added to its query.
pub fn with_param(url: &str, key: &str, value: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{key}={value}")
}

/// One connection to `url`, or why not.
pub async fn connect(url: &str) -> Result<tokio_postgres::Client, String> {
    let parsed = PgUrl::parse(url).map_err(|e| e.0)?;
    match tokio::time::timeout(std::time::Duration::from_secs(10), parsed.connect()).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(e.message),
        Err(_) => Err("no answer within 10 s".into()),
    }
}

/// A database of its own for one test; dropped with it.
pub struct TestDb {
    pub name: String,
    /// The database's URL, as `--store` takes it.
    pub url: String,
    admin: String,
}

impl TestDb {
    /// Creates a fresh database; `None` (after printing `SKIPPED`) when no
    /// server answers outside CI. Panics under `CI=true`.
    pub async fn create() -> Option<TestDb> {
        let admin = admin_url();
        let client = match connect(&admin).await {
            Ok(c) => c,
            Err(e) => {
                let shown = packmeter::store::redact(&admin);
                assert!(
                    !super::required(),
                    "PostgreSQL is required under CI=true, but {shown} did not answer: {e}"
                );
                eprintln!(
                    "SKIPPED: no PostgreSQL at {shown} ({e}); start one, or point \
                     PACKMETER_TEST_POSTGRES_URL at one; set CI=true to make this a failure"
                );
                return None;
            }
        };
        let name = format!("pm_test_{:016x}", packmeter::flush::random_u64());
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e:?}"));
        Some(TestDb {
            url: with_database(&admin, &name),
            name,
            admin,
        })
    }

    /// A connection to this test's database.
    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url)
            .await
            .expect("connect to the test database")
    }

    /// Runs SQL on the test database, for checks and set-up.
    pub async fn execute(&self, sql: &str) {
        self.client()
            .await
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        // Drop may run inside a runtime: use a thread with its own.
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let client = connect(&admin).await?;
                client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
                    .map_err(|e| format!("{e:?}"))
            })
        })
        .join();
        if let Ok(Err(e)) = dropped {
            eprintln!("could not drop test database {}: {e}", self.name);
        }
    }
}

/// The TCP address of the server `url` names (its first host), for a
/// [`super::proxy::Proxy`] to forward to; `None` for a Unix socket.
pub async fn tcp_addr(url: &str) -> Option<std::net::SocketAddr> {
    let config: tokio_postgres::Config = url.parse().ok()?;
    let port = config.get_ports().first().copied().unwrap_or(5432);
    match config.get_hosts().first()? {
        tokio_postgres::config::Host::Tcp(host) => tokio::net::lookup_host((host.as_str(), port))
            .await
            .ok()?
            .next(),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

/// `url` with its host and port replaced by `addr` (user, database and
/// parameters kept): the same database, reached through a proxy.
pub fn via(url: &str, addr: std::net::SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL with ://");
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let user = authority.rsplit_once('@').map(|(u, _)| format!("{u}@"));
    format!("{scheme}://{}{addr}{tail}", user.unwrap_or_default())
}
