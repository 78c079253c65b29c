//! Operator commands beside the request path (SPEC §11): `warm` renders versions of many ids into the
//! result store through the same pipeline as a request; `purge` deletes an id's stored variants and
//! tells running servers to drop their memory entries.

use std::process::ExitCode;

use crate::cli::{PurgeArgs, WarmArgs};
use crate::config::Config;

/// `image-server warm`.
pub async fn warm(_config: Config, _args: WarmArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("warm is not available in this build yet")
}

/// `image-server purge`.
pub async fn purge(_config: Config, _args: PurgeArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("purge is not available in this build yet")
}
