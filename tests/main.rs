//! loopsync's end-to-end tests: real processes, NATS, PostgreSQL, MariaDB, SQLite, DuckDB and
//! the Loops simulator on loopback. One binary, a module per concern (`cargo nextest run -p
//! loopsync-e2e -E 'test(/^pipeline::/)'` runs one); each test runs in a process of its own
//! under nextest.

mod adversarial;
mod bulk;
mod destination;
mod events;
mod exactly_once;
mod failures;
mod forget;
mod history;
mod incremental;
mod neighbours;
mod operable;
mod outage;
mod pipeline;
mod printing;
mod privacy;
mod process_faults;
mod protocol;
mod rate;
mod record;
mod report;
mod semantics;
mod signals;
mod sim_cli;
mod sources;
mod status;
mod verify;
mod web;
mod workers;
