//! The command line (docs/operations.md): `image-server [serve] | check-config | warm | purge`.
//!
//! Parsed once in `main`, before anything else. [`GlobalOpts`] are accepted by every command
//! (clap `global = true`) because every command reads the same configuration: they choose the
//! config file and override keys, and [`crate::config::load`] turns them into a
//! [`crate::config::Config`]. Flags are the top layer of the configuration precedence.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// `image-server`: an on-the-fly resizing image proxy.
#[derive(Debug, Clone, Parser)]
#[command(name = "image-server", version, about, long_about = None)]
pub struct Cli {
    /// Options every command accepts.
    #[command(flatten)]
    pub global: GlobalOpts,
    /// What to do; the server when absent.
    #[command(subcommand)]
    pub command: Option<Command>,
}

impl Cli {
    /// The command to run, `serve` when none was named.
    pub fn subcommand(&self) -> Command {
        self.command.clone().unwrap_or(Command::Serve)
    }
}

/// Configuration choice and overrides, global to every command.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct GlobalOpts {
    /// Environment: reads `{config-dir}/{ENV}.toml` (or `.json`, seed format).
    #[arg(
        short = 'e',
        long,
        global = true,
        value_name = "ENV",
        default_value = "development",
        env = "IMAGE_SERVER_ENVIRONMENT"
    )]
    pub environment: String,

    /// Read this config file (.toml or .json) instead of the environment's.
    #[arg(long, global = true, value_name = "FILE", env = "IMAGE_SERVER_CONFIG")]
    pub config: Option<PathBuf>,

    /// Directory holding `{ENV}.toml` files.
    #[arg(
        long,
        global = true,
        value_name = "DIR",
        default_value = "config",
        env = "IMAGE_SERVER_CONFIG_DIR"
    )]
    pub config_dir: PathBuf,

    /// Override `server_port`.
    #[arg(long, global = true, value_name = "PORT")]
    pub server_port: Option<u16>,

    /// Override `status_port`.
    #[arg(long, global = true, value_name = "PORT")]
    pub status_port: Option<u16>,

    /// Override `listen_address`.
    #[arg(long, global = true, value_name = "IP")]
    pub listen_address: Option<String>,

    /// Override `source_domain` (clears a `source_store` set by a lower layer).
    #[arg(long, global = true, value_name = "URL")]
    pub source_domain: Option<String>,

    /// Override `source_store` (clears a `source_domain` set by a lower layer).
    #[arg(long, global = true, value_name = "URL")]
    pub source_store: Option<String>,

    /// Override `result_store` (`none` to disable).
    #[arg(long, global = true, value_name = "URL")]
    pub result_store: Option<String>,

    /// Override `log_level`.
    #[arg(long, global = true, value_name = "FILTER")]
    pub log_level: Option<String>,

    /// Override any key (repeatable), e.g. `--set maximum_width=1000`. The named flags above win.
    #[arg(
        long = "set",
        global = true,
        value_name = "KEY=VALUE",
        value_parser = parse_key_value
    )]
    pub set: Vec<(String, String)>,
}

impl Default for GlobalOpts {
    /// The options of a bare `image-server`: environment `development`, directory `config`.
    fn default() -> Self {
        GlobalOpts {
            environment: "development".to_owned(),
            config: None,
            config_dir: PathBuf::from("config"),
            server_port: None,
            status_port: None,
            listen_address: None,
            source_domain: None,
            source_store: None,
            result_store: None,
            log_level: None,
            set: Vec::new(),
        }
    }
}

impl GlobalOpts {
    /// The command-line configuration layer as `(key, value)` pairs, in the order they apply:
    /// `--set` pairs first, then the named flags.
    pub fn overrides(&self) -> Vec<(String, String)> {
        self.flag_overrides()
            .into_iter()
            .map(|(_, key, value)| (key, value))
            .collect()
    }

    /// [`GlobalOpts::overrides`] with the flag that set each key (`--set maximum_width`,
    /// `--server-port`), for messages: `(flag, key, value)`.
    pub fn flag_overrides(&self) -> Vec<(String, String, String)> {
        let mut out: Vec<(String, String, String)> = self
            .set
            .iter()
            .map(|(k, v)| (format!("--set {k}"), k.clone(), v.clone()))
            .collect();
        let named = [
            ("server_port", self.server_port.map(|p| p.to_string())),
            ("status_port", self.status_port.map(|p| p.to_string())),
            ("listen_address", self.listen_address.clone()),
            ("source_domain", self.source_domain.clone()),
            ("source_store", self.source_store.clone()),
            ("result_store", self.result_store.clone()),
            ("log_level", self.log_level.clone()),
        ];
        out.extend(named.into_iter().filter_map(|(k, v)| {
            v.map(|v| (format!("--{}", k.replace('_', "-")), k.to_owned(), v))
        }));
        out
    }
}

/// `KEY=VALUE` for `--set`; the key is lower-cased so `--set SERVER_PORT=1` works too.
fn parse_key_value(s: &str) -> Result<(String, String), String> {
    let (key, value) = s
        .split_once('=')
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))?;
    let key = key.trim();
    if key.is_empty() {
        return Err(format!("expected KEY=VALUE, got {s:?}"));
    }
    Ok((key.to_ascii_lowercase(), value.to_owned()))
}

/// Options of `check-config`.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct CheckConfigArgs {
    /// Also print the settings in force as JSON (secrets only as whether they are set).
    #[arg(long)]
    pub print: bool,
}

/// The commands.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Run the server (the default).
    Serve,
    /// Load and validate the configuration and build what start-up builds (source, result store,
    /// `?source=` guard) without serving; exit 2 with the reason when something is wrong.
    CheckConfig(CheckConfigArgs),
    /// Render versions of many originals into the result store.
    Warm(WarmArgs),
    /// Delete every stored variant of some originals, and the memory entries of running servers.
    Purge(PurgeArgs),
    /// Restart a running server without refusing a connection: check the configuration, send the
    /// process named by the PID file SIGHUP, and wait until its successor has taken over.
    Restart(RestartArgs),
}

/// `image-server warm --versions w200.jpg,x400.webp ID…|-`.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct WarmArgs {
    /// Version file names to render for every id, comma-separated (e.g. `w200.jpg,x400.webp`).
    #[arg(long, value_name = "LIST", value_delimiter = ',', required = true)]
    pub versions: Vec<String>,

    /// Variants worked on at once (0 = `processing_concurrency`, the number of cores by default;
    /// capped at what the processing pool and its queue admit).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub jobs: usize,

    /// Render even when the result store already holds the variant.
    #[arg(long)]
    pub force: bool,

    /// Originals as `model/type/id`; `-` reads them from stdin, one per line.
    #[arg(value_name = "ID", required = true)]
    pub ids: Vec<String>,
}

/// `image-server purge ID… [--status-url URL]…`.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct PurgeArgs {
    /// Originals as `model/type/id`; `-` reads them from stdin, one per line.
    #[arg(value_name = "ID", required = true)]
    pub ids: Vec<String>,

    /// Status-port base URL of a running server whose memory entries to purge (repeatable),
    /// e.g. `http://10.0.0.5:7001`.
    #[arg(long = "status-url", value_name = "URL")]
    pub status_urls: Vec<url::Url>,
}

/// `image-server restart [--pid-file FILE] [--timeout 45s]`.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct RestartArgs {
    /// The running server's PID file (default: the `pid_file` key).
    #[arg(long, value_name = "FILE")]
    pub pid_file: Option<PathBuf>,

    /// How long to wait for the successor to take over (a duration such as `45s`).
    #[arg(long, value_name = "DURATION", default_value = "45s", value_parser = parse_duration)]
    pub timeout: std::time::Duration,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("expected a duration such as 45s: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Cli {
        let mut argv = vec!["image-server"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv) {
            Ok(cli) => cli,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn bare_command_serves_development() {
        let cli = parse(&[]);
        assert_eq!(cli.subcommand(), Command::Serve);
        assert_eq!(cli.global, GlobalOpts::default());
        assert!(cli.global.overrides().is_empty());
    }

    #[test]
    fn globals_are_accepted_after_the_subcommand() {
        let cli = parse(&[
            "check-config",
            "-e",
            "production",
            "--server-port",
            "8080",
            "--set",
            "MAXIMUM_WIDTH=1000",
            "--set",
            "cache_control=public, max-age=60",
        ]);
        assert_eq!(
            cli.subcommand(),
            Command::CheckConfig(CheckConfigArgs { print: false })
        );
        assert_eq!(cli.global.environment, "production");
        assert_eq!(
            cli.global.overrides(),
            vec![
                ("maximum_width".to_owned(), "1000".to_owned()),
                ("cache_control".to_owned(), "public, max-age=60".to_owned()),
                ("server_port".to_owned(), "8080".to_owned()),
            ]
        );
        let flags: Vec<String> = cli
            .global
            .flag_overrides()
            .into_iter()
            .map(|f| f.0)
            .collect();
        assert_eq!(
            flags,
            [
                "--set maximum_width",
                "--set cache_control",
                "--server-port"
            ]
        );
    }

    #[test]
    fn set_needs_key_and_value() {
        assert!(Cli::try_parse_from(["image-server", "--set", "novalue"]).is_err());
        assert!(Cli::try_parse_from(["image-server", "--set", "=1"]).is_err());
        let cli = parse(&["--set", "statsd_host="]);
        assert_eq!(
            cli.global.set,
            vec![("statsd_host".to_owned(), String::new())]
        );
    }

    #[test]
    fn warm_and_purge_arguments() {
        let cli = parse(&[
            "warm",
            "--versions",
            "w200.jpg,x400.webp",
            "--jobs",
            "3",
            "--force",
            "product/image/1",
            "-",
        ]);
        let Some(Command::Warm(w)) = cli.command else {
            panic!("not warm")
        };
        assert_eq!(w.versions, ["w200.jpg", "x400.webp"]);
        assert_eq!((w.jobs, w.force), (3, true));
        assert_eq!(w.ids, ["product/image/1", "-"]);
        assert!(Cli::try_parse_from(["image-server", "warm", "product/image/1"]).is_err());

        let cli = parse(&[
            "purge",
            "product/image/1",
            "--status-url",
            "http://10.0.0.5:7001",
            "--status-url",
            "http://10.0.0.6:7001",
        ]);
        let Some(Command::Purge(p)) = cli.command else {
            panic!("not purge")
        };
        assert_eq!(p.ids, ["product/image/1"]);
        assert_eq!(p.status_urls.len(), 2);
        assert!(
            Cli::try_parse_from(["image-server", "purge", "x", "--status-url", "nope"]).is_err()
        );
    }
}
