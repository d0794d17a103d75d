//! `loopsync forget --sync NAME (--key K | --email E) [--in-loops]`: erases one person from
//! everything loopsync keeps for a sync (an erasure request): the state, results and attempts,
//! over NATS the installation's streams and the loader's ledger, and with `--in-loops` the
//! contact in Loops. Prints what it erased, per place, and nothing of the person beyond what
//! was typed; exit 1 when nothing of the person was found.
//!
//! What forget does is `loopsync_engine::forget`; this module parses the flags, connects, and
//! prints.

use std::path::Path;
use std::process::ExitCode;

use clap::Args;
use loopsync_engine::forget::{self, Forgotten, InLoops, OnBus};
use loopsync_engine::pipeline::Pipeline;

use crate::common::{EXIT_FAILED, UsageError, load_config_for, load_config_for_warehouse};

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("person").required(true).args(["key", "email"])))]
pub struct ForgetArgs {
    #[command(flatten)]
    pub config: crate::ConfigArg,
    /// The sync whose records to erase the person from.
    #[arg(long)]
    sync: String,
    /// The person's record: its primary key in the model.
    #[arg(long)]
    key: Option<String>,
    /// The person's email (any case, blanks around): every record whose confirmed, model or
    /// sent email it is.
    #[arg(long)]
    email: Option<String>,
    /// Delete the contact in Loops too (by email or userId, as the sync identifies contacts).
    #[arg(long)]
    in_loops: bool,
    /// Print what was erased as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(config_path: &Path, args: ForgetArgs) -> anyhow::Result<ExitCode> {
    // Only `--in-loops` needs Loops' secret.
    let config = if args.in_loops {
        load_config_for(config_path, Some(&args.sync))?
    } else {
        load_config_for_warehouse(config_path, Some(&args.sync))?
    };
    let person = forget::person(args.key.as_deref(), args.email.as_deref())
        .ok_or_else(|| UsageError("give --key or --email, not both".into()))?;
    let spec = config
        .sync(&args.sync)
        .map(|s| s.spec.clone())
        .ok_or_else(|| UsageError(format!("no sync named \"{}\" in the config", args.sync)))?;
    let over_nats = config.nats.is_some();
    let pipeline = Pipeline::connect(config, crate::stop::token()).await?;
    let result = async {
        let installation = pipeline.warehouse.installation().await?;
        let client = if args.in_loops {
            Some(pipeline.loops_client()?)
        } else {
            None
        };
        let loops = client.as_ref().map(|client| InLoops {
            client,
            budget: &pipeline.budget,
            attempts: pipeline.config.loops.max_attempts,
            other_syncs: pipeline
                .config
                .syncs
                .iter()
                .map(|s| s.spec.name.clone())
                .filter(|name| *name != spec.name)
                .collect(),
        });
        // Without NATS the bus lives in each process's memory: nothing of it outlives a run.
        let bus = over_nats.then(|| OnBus {
            messaging: &*pipeline.bus,
            coordination: &*pipeline.coordination,
            installation: &installation,
        });
        anyhow::Ok(forget::forget(&*pipeline.warehouse, bus, loops, &spec, &person).await?)
    }
    .await;
    pipeline.stop().await;
    let forgotten = result?;
    let typed = match (&args.key, &args.email) {
        (Some(key), _) => format!("key {key}"),
        (_, Some(email)) => format!("email {email}"),
        _ => unreachable!("clap requires one"),
    };
    if args.json {
        let mut value = serde_json::to_value(&forgotten)?;
        value["found"] = forgotten.found().into();
        crate::output::json("forget", &value)?;
    } else {
        print_text(&forgotten, &typed);
    }
    if !forgotten.found() {
        crate::logs::error(&format!(
            "nothing of {typed} was found in sync {}: nothing was erased",
            forgotten.sync
        ));
        return Ok(ExitCode::from(EXIT_FAILED));
    }
    Ok(ExitCode::SUCCESS)
}

fn print_text(f: &Forgotten, typed: &str) {
    if !f.found() {
        return;
    }
    crate::say!("sync {}: forgot {typed} ({} records)", f.sync, f.records);
    crate::say!(
        "  state: {} rows; results: {} rows; attempts: {} rows; texts that named it: {}",
        f.state.state,
        f.state.records,
        f.state.attempts,
        f.state.texts
    );
    if let Some(m) = f.messages {
        crate::say!(
            "  NATS: {} messages of the work queues, {} dead letters, {} ledger entries",
            m.work_queues,
            m.dead_letters,
            f.ledger
        );
    }
    if let Some(l) = f.loops {
        crate::say!(
            "  Loops: {} contacts deleted, {} identities not in Loops",
            l.deleted,
            l.not_in_loops
        );
        if l.held_by_another_sync > 0 {
            crate::say!(
                "  Loops: {} contacts kept: another sync holds them (forget the person there \
                 too, with --in-loops)",
                l.held_by_another_sync
            );
        }
    }
    crate::say!(
        "  A row of the model that is still this person is new to the next run, which sends it \
         again: remove it from the warehouse too."
    );
}
