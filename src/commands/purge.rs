//! `image-server purge`: deletes every stored variant of each id, then asks each `--status-url`
//! server to drop its memory entries. The store goes first: the other order would let a request
//! between the two steps refill a server's memory from the still-present stored object.

use std::collections::HashSet;
use std::process::ExitCode;

use futures::{stream, StreamExt};

use super::{original_id, read_ids, shown, EXIT_USAGE};
use crate::app::App;
use crate::cli::PurgeArgs;
use crate::config::Config;

/// Servers and store deletions `purge` runs at once: a handful of status ports, no need for more.
const PURGE_CONCURRENCY: usize = 8;

/// `image-server purge`: deletes every stored variant of each id, then asks each `--status-url`
/// server to drop its memory entries (variants, original bytes, negative entry) for it.
pub async fn purge(config: Config, args: PurgeArgs) -> anyhow::Result<ExitCode> {
    let raw = match read_ids(&args.ids).await {
        Ok(ids) if ids.is_empty() => {
            eprintln!("image-server purge: no ids given");
            return Ok(ExitCode::from(EXIT_USAGE));
        }
        Ok(ids) => ids,
        Err(e) => {
            eprintln!("image-server purge: cannot read ids from stdin: {e}");
            return Ok(ExitCode::from(EXIT_USAGE));
        }
    };
    if config.caching.result_store.is_none() && args.status_urls.is_empty() {
        eprintln!(
            "image-server purge: nothing to purge from: no result_store configured and no --status-url given"
        );
        return Ok(ExitCode::from(EXIT_USAGE));
    }
    let token = match (&config.security.admin_token, args.status_urls.is_empty()) {
        (Some(t), _) => Some(t.expose().to_owned()),
        (None, true) => None,
        (None, false) => {
            eprintln!(
                "image-server purge: --status-url needs admin_token (the servers' bearer token) in the configuration"
            );
            return Ok(ExitCode::from(EXIT_USAGE));
        }
    };
    let mut failures = 0usize;
    let mut ids = Vec::new();
    for id in raw {
        match original_id(&id) {
            Some(valid) => ids.push(valid),
            None => {
                failures += 1;
                eprintln!("failed {}: bad id (expected model/type/id)", shown(&id));
            }
        }
    }
    let mut seen = HashSet::new();
    ids.retain(|id| seen.insert(id.clone()));
    let timeout = config.timeouts.request_timeout;
    let connect_timeout = config.timeouts.connect_timeout;
    let app = App::new(config)?;

    let mut deleted = 0usize;
    if let Some(remote) = app.pipeline.remote() {
        let mut deletions = stream::iter(ids.iter())
            .map(|id| async move { (id, remote.delete_original(id).await) })
            .buffer_unordered(PURGE_CONCURRENCY);
        while let Some((id, result)) = deletions.next().await {
            match result {
                Ok(keys) => {
                    for key in &keys {
                        println!("deleted {key}");
                    }
                    if keys.is_empty() {
                        println!("{id}: nothing stored");
                    }
                    deleted += keys.len();
                }
                Err(e) => {
                    failures += 1;
                    eprintln!("failed {id}: {e}");
                }
            }
        }
    }

    let mut acknowledged = 0usize;
    if let Some(token) = token.filter(|_| !args.status_urls.is_empty()) {
        let client = reqwest::Client::builder()
            // Status ports are internal addresses: a proxy from the environment would be wrong.
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(connect_timeout)
            .timeout(timeout)
            .build()?;
        let pairs: Vec<(&url::Url, &String)> = args
            .status_urls
            .iter()
            .flat_map(|u| ids.iter().map(move |id| (u, id)))
            .collect();
        let client = &client;
        let token = token.as_str();
        let mut calls = stream::iter(pairs)
            .map(
                |(base, id)| async move { (base, id, purge_server(client, base, id, token).await) },
            )
            .buffer_unordered(PURGE_CONCURRENCY);
        while let Some((base, id, result)) = calls.next().await {
            let base = base.as_str().trim_end_matches('/');
            match result {
                Ok(()) => {
                    acknowledged += 1;
                    println!("{base} purged {id}");
                }
                Err(why) => {
                    failures += 1;
                    eprintln!("failed {base} {id}: {why}");
                }
            }
        }
    }
    println!(
        "purge: {} ids, {deleted} stored objects deleted, {acknowledged}/{} server purges acknowledged, {failures} failed",
        ids.len(),
        ids.len() * args.status_urls.len(),
    );
    Ok(if failures > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// `POST {base}/purge/{id}` with the bearer token; `Err` says why in a short phrase.
async fn purge_server(
    client: &reqwest::Client,
    base: &url::Url,
    id: &str,
    token: &str,
) -> Result<(), String> {
    let url = format!("{}/purge/{id}", base.as_str().trim_end_matches('/'));
    let resp = client
        .post(url)
        .bearer_auth(token)
        .send()
        .await
        .map_err(|e| {
            if e.is_timeout() {
                "timed out".to_owned()
            } else if e.is_connect() {
                "cannot connect".to_owned()
            } else {
                format!("request failed: {e}")
            }
        })?;
    match resp.status().as_u16() {
        200 => Ok(()),
        401 => Err("401 unauthorized (admin_token differs from the server's)".to_owned()),
        404 => Err(
            "404 (purge disabled on that server: no admin_token, or not a status port)".to_owned(),
        ),
        400 => Err("400 bad id".to_owned()),
        s => Err(format!("status {s}")),
    }
}
