//! DuckDB (its files, and CSV and Parquet files read by the model): a source only.

mod source;

pub use source::DuckDbSource;
