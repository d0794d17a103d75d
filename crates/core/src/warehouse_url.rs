//! The warehouse URLs loopsync knows, decided once for the config's checks and the warehouse
//! crate that opens them: which schemes name a warehouse, which are only read (a source beside
//! a state store), and which can keep the syncs' state.

/// A warehouse URL's scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheme {
    /// As the URL starts: `postgres`.
    pub name: &'static str,
    /// It can keep the syncs' state (a state store); if not, it is only read.
    pub keeps_state: bool,
}

/// Every scheme: PostgreSQL and SQLite hold a model and can keep state; MySQL (and MariaDB)
/// and DuckDB are only read.
pub const SCHEMES: &[Scheme] = &[
    Scheme {
        name: "postgres",
        keeps_state: true,
    },
    Scheme {
        name: "postgresql",
        keeps_state: true,
    },
    Scheme {
        name: "sqlite",
        keeps_state: true,
    },
    Scheme {
        name: "mysql",
        keeps_state: false,
    },
    Scheme {
        name: "duckdb",
        keeps_state: false,
    },
];

/// The scheme of `url`, if loopsync knows it.
pub fn scheme(url: &str) -> Option<&'static Scheme> {
    let (name, _) = url.split_once("://")?;
    SCHEMES.iter().find(|s| s.name == name)
}

/// `url` names a warehouse that can keep the syncs' state.
pub fn keeps_state(url: &str) -> bool {
    scheme(url).is_some_and(|s| s.keeps_state)
}

/// `url` names a warehouse loopsync only reads: its state is kept in a store beside it.
pub fn is_read_only(url: &str) -> bool {
    scheme(url).is_some_and(|s| !s.keeps_state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_say_what_each_warehouse_can_do() {
        assert!(keeps_state("postgres://h/db") && keeps_state("sqlite:///w.db"));
        assert!(is_read_only("mysql://h/db") && is_read_only("duckdb://"));
        assert!(!keeps_state("mysql://h/db") && !is_read_only("sqlite:///w.db"));
        assert_eq!(scheme("oracle://h"), None);
        assert_eq!(scheme("postgres"), None);
    }
}
