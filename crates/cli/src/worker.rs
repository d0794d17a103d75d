//! `loopsync worker extractor|transformer|loader`.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use loopsync_core::stage::Stage;
use loopsync_engine::pipeline::Pipeline;

use crate::common::{UsageError, load_config};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum StageArg {
    /// Runs the models and publishes changes; also applies outcomes to the sync's state.
    Extractor,
    /// Maps changes to Loops operations.
    Transformer,
    /// Applies operations to Loops.
    Loader,
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub config: crate::ConfigArg,
    /// The stage this worker runs (the extractor also records the outcomes).
    #[arg(value_enum)]
    stage: StageArg,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics (docs/operations.md, Metrics).
    #[arg(long, value_name = "HOST:PORT")]
    metrics_addr: Option<std::net::SocketAddr>,
}

pub async fn run(config_path: &Path, args: WorkerArgs) -> anyhow::Result<ExitCode> {
    let config = load_config(config_path)?;
    if config.nats.is_none() {
        return Err(UsageError(
            "`loopsync worker` needs a [nats] section: workers share the stages over NATS".into(),
        )
        .into());
    }
    if let Some(addr) = args.metrics_addr {
        crate::prometheus::serve_metrics(addr)?;
    }
    let mut pipeline = Pipeline::connect(config, crate::stop::token()).await?;
    let name = match args.stage {
        StageArg::Extractor => {
            pipeline.spawn(Stage::Extractor)?;
            // The state lives in the warehouse: whoever runs models applies outcomes too.
            pipeline.spawn(Stage::Checkpointer)?;
            "extractor"
        }
        StageArg::Transformer => {
            pipeline.spawn(Stage::Transformer)?;
            "transformer"
        }
        StageArg::Loader => {
            pipeline.spawn(Stage::Loader)?;
            "loader"
        }
    };
    crate::say!("loopsync worker {name} ready");
    std::io::stdout().flush()?;
    let served = pipeline.serve_until(crate::common::shutdown_signal()).await;
    pipeline.stop().await;
    served?;
    Ok(ExitCode::SUCCESS)
}
