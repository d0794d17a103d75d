//! MySQL and MariaDB: a source only (the state is kept in a state store beside it).

mod source;

pub use source::MySqlSource;
