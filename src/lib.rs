//! Wires the roles of a chat node together: the log, the history store, the
//! projector, the fan-out and the gateway, in one process.
//!
//! The binary (`src/main.rs`) only parses the command line, sets up tracing
//! and metrics, binds, and calls [`serve`].

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use eventlog::embedded::EmbeddedLog;
use eventlog::EventLog;
use fanout::{Fanout, FanoutConfig};
use ingest::{Gateway, GatewayConfig};
use metrics_exporter_prometheus::PrometheusHandle;
use projector::embedded::EmbeddedStore;
use projector::{HistoryStore, Projector, ProjectorConfig, DLQ_TOPIC};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Name of the message topic.
pub const MESSAGES_TOPIC: &str = "chat.messages";
/// Projection version the embedded store serves.
pub const STORE_NAMESPACE: &str = "v1";

/// Settings of `chat serve`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    pub partitions: u32,
    pub gateway: GatewayConfig,
}

/// Runs every role on the embedded backends until `shutdown` is cancelled,
/// then drains and stops each of them.
pub async fn serve(
    listener: TcpListener,
    config: ServeConfig,
    metrics: Option<PrometheusHandle>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let log_dir = config.data_dir.join("log");
    let log: Arc<dyn EventLog> = Arc::new(
        EmbeddedLog::open(&log_dir, MESSAGES_TOPIC, config.partitions)
            .with_context(|| format!("opening the log in {}", log_dir.display()))?,
    );
    let dlq: Arc<dyn EventLog> =
        Arc::new(EmbeddedLog::open(&log_dir, DLQ_TOPIC, 1).context("opening the dead-letter log")?);
    let store_dir = config.data_dir.join("history");
    let store: Arc<dyn HistoryStore> = Arc::new(
        EmbeddedStore::open(&store_dir, STORE_NAMESPACE)
            .with_context(|| format!("opening the history store in {}", store_dir.display()))?,
    );
    tracing::info!(
        epoch = log.epoch(),
        partitions = log.partitions(),
        data_dir = %config.data_dir.display(),
        "log open"
    );

    let projector = Projector::new(
        log.clone(),
        store.clone(),
        Some(dlq),
        ProjectorConfig::all(log.partitions()),
    );
    let projector_stop = CancellationToken::new();
    let projector_task = tokio::spawn(projector.run(projector_stop.clone()));

    let fanout = Fanout::new(log.clone(), FanoutConfig::default());
    let gateway = Gateway {
        log,
        fanout: Some(fanout.clone()),
        store: Some(store),
        metrics,
        config: config.gateway,
    };
    let served = ingest::serve(listener, gateway, shutdown).await;

    fanout.shutdown().await;
    projector_stop.cancel();
    projector_task.await.context("projector task")?;
    served.context("serving")?;
    tracing::info!("stopped");
    Ok(())
}
