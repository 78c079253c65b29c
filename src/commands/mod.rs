//! Operator commands beside the request path (docs/operations.md): [`warm`] renders versions of many
//! ids into the result store through the same pipeline as a request; [`purge`] deletes an id's stored
//! variants and tells running servers to drop their memory entries; [`restart`] has a running server
//! hand its sockets to a successor and waits until that one serves.
//!
//! Neither command opens a listener; both start from the same [`crate::app::App`] a server builds.
//! Exit status: 0 when everything succeeded, 1 when anything failed, 2 when the command cannot start
//! (nothing to work on, no result store, no admin token for `--status-url`), 130 when interrupted.

mod purge;
mod restart;
mod warm;

pub use purge::purge;
pub use restart::restart;
pub use warm::warm;

use crate::request::{ImageRequest, Rules};

/// Exit status when the command cannot start (usage or configuration), as for a bad config in `main`.
const EXIT_USAGE: u8 = 2;
/// Exit status after Ctrl-C / SIGTERM (128 + SIGINT, the shell convention).
const EXIT_INTERRUPTED: u8 = 130;

/// The ids named on the command line, with `-` replaced by stdin's lines (read once, however often
/// `-` appears). Blank lines and `#` comments are skipped; surrounding slashes are tolerated.
async fn read_ids(args: &[String]) -> std::io::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stdin_read = false;
    for arg in args {
        if arg == "-" {
            if stdin_read {
                continue;
            }
            stdin_read = true;
            let text = tokio::task::spawn_blocking(|| std::io::read_to_string(std::io::stdin()))
                .await
                .map_err(std::io::Error::other)??;
            out.extend(text.lines().filter_map(clean_id));
        } else if let Some(id) = clean_id(arg) {
            out.push(id);
        }
    }
    Ok(out)
}

fn clean_id(line: &str) -> Option<String> {
    let id = line.trim().trim_matches('/');
    (!id.is_empty() && !id.starts_with('#')).then(|| id.to_owned())
}

/// `model/type/id` when it names an original the URL grammar accepts (the same check as the status
/// port's purge endpoint), else `None`.
fn original_id(id: &str) -> Option<String> {
    ImageRequest::parse(&format!("/{id}/full_size.jpg"), &Rules::default())
        .ok()
        .map(|r| r.original_id())
}

/// An operator-supplied name made safe for a terminal: control characters and the like escaped.
fn shown(s: &str) -> String {
    if s.bytes().all(|b| b.is_ascii_graphic()) {
        s.to_owned()
    } else {
        format!("{s:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_cleaned_and_validated() {
        assert_eq!(
            clean_id("  /product/image/1/ \r"),
            Some("product/image/1".into())
        );
        assert_eq!(clean_id("# comment"), None);
        assert_eq!(clean_id("   "), None);
        assert_eq!(
            original_id("product/image/1").as_deref(),
            Some("product/image/1")
        );
        for bad in [
            "product/image",
            "product/image/1/w200.jpg",
            "p/i/a.b",
            "P/i/1",
            "p/i/%2e",
        ] {
            assert_eq!(original_id(bad), None, "{bad}");
        }
        assert_eq!(shown("p/i/1"), "p/i/1");
        assert_eq!(shown("p/i/\x1b[2J"), "\"p/i/\\u{1b}[2J\"");
    }
}
