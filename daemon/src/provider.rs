//! Providers: where the agent runs and how bytes reach it.
//!
//! A provider (1) makes sure an agent runs somewhere, (2) hands the daemon a
//! bidirectional byte stream to it, on which gRPC runs, and (3) tears it down.
//! Transport, auth and reconnection are written once, above this trait.
//!
//! - [`local`]: an agent process on this machine, over a Unix socket (the default).

pub mod local;

use std::future::Future;
use std::pin::Pin;

use tonic::transport::Channel;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A provider failure; `retryable` tells the connection manager whether to try
/// again with backoff or to stop and report.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ProviderError {
    pub message: String,
    pub retryable: bool,
}

impl ProviderError {
    pub fn retryable(message: impl Into<String>) -> Self {
        ProviderError {
            message: message.into(),
            retryable: true,
        }
    }

    pub fn fatal(message: impl Into<String>) -> Self {
        ProviderError {
            message: message.into(),
            retryable: false,
        }
    }
}

pub trait Provider: Send + Sync {
    /// Short name for status ("local", "ssh", …).
    fn name(&self) -> &'static str;

    /// Where the agent is, for people.
    fn address(&self) -> String;

    /// Starts the agent unless one is already serving.
    fn ensure_agent(&self) -> BoxFuture<'_, Result<(), ProviderError>>;

    /// A gRPC channel over a fresh byte stream to the agent.
    fn connect(&self) -> BoxFuture<'_, Result<Channel, ProviderError>>;

    /// Stops the agent this provider started.
    fn teardown(&self) -> BoxFuture<'_, Result<(), ProviderError>>;

    /// True when the link is faster than compression (then chunks go raw).
    fn link_is_fast(&self) -> bool;
}
