//! Which versions each class of image (`{model}/{type}`) is asked for: a bounded, decaying count
//! per class, read by the background pre-render (docs/architecture.md) and shown on the status port.
//!
//! Each class keeps at most [`PER_CLASS`] versions (a canonical file name such as `w300.jpg`) with a
//! score. A request adds 1 to its version; every score halves each `popular_halflife`, so a size that
//! went out of use fades away. When a class is full, a new version takes the place of the lowest
//! score and starts from it plus one (the "space-saving" rule: a version that is really frequent
//! cannot be pushed out by a stream of one-off junk, and a newcomer's score over-counts by at most
//! what it replaced). At most [`MAX_CLASSES`] classes are kept; a new one replaces the class with
//! the lowest total. So memory is bounded whatever the traffic: at most
//! `MAX_CLASSES × PER_CLASS` names of at most 32 bytes, about 400 KB.
//!
//! Only answered requests count (the caller records after a 200), and background renders and
//! `warm` never do.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

/// Versions kept per class.
pub const PER_CLASS: usize = 32;

/// Classes kept.
pub const MAX_CLASSES: usize = 256;

/// The versions asked for, per class.
#[derive(Debug)]
pub struct Popularity {
    halflife: Duration,
    classes: Mutex<HashMap<String, Class>>,
}

#[derive(Debug)]
struct Class {
    /// When the scores were last brought up to date.
    at: Instant,
    versions: Vec<(String, f64)>,
}

impl Class {
    fn decay_to(&mut self, now: Instant, halflife: Duration) {
        let elapsed = now.saturating_duration_since(self.at);
        if elapsed.is_zero() {
            return;
        }
        let factor = 0.5f64.powf(elapsed.as_secs_f64() / halflife.as_secs_f64().max(1e-3));
        for (_, score) in &mut self.versions {
            *score *= factor;
        }
        self.at = now;
    }

    fn total(&self) -> f64 {
        self.versions.iter().map(|(_, s)| s).sum()
    }
}

/// One version of a class and its decayed score.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Ranked {
    /// The canonical file name (`w300.jpg`, `300x400-q60.webp`).
    pub version: String,
    /// The decayed count.
    pub score: f64,
}

/// How much the table holds (the status page's summary).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Classes tracked.
    pub classes: usize,
    /// Versions tracked over all classes.
    pub versions: usize,
}

impl Popularity {
    /// An empty table whose scores halve every `halflife`.
    pub fn new(halflife: Duration) -> Popularity {
        Popularity {
            halflife,
            classes: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one request of `version` in `class` at `now`.
    pub fn record(&self, class: &str, version: &str, now: Instant) {
        let mut classes = self.classes.lock().unwrap_or_else(|e| e.into_inner());
        if !classes.contains_key(class) && classes.len() >= MAX_CLASSES {
            // Make room: the class with the lowest (decayed) total goes.
            let halflife = self.halflife;
            let weakest = classes
                .iter_mut()
                .map(|(name, c)| {
                    c.decay_to(now, halflife);
                    (c.total(), name.clone())
                })
                .min_by(|a, b| a.0.total_cmp(&b.0))
                .map(|(_, name)| name);
            if let Some(name) = weakest {
                classes.remove(&name);
            }
        }
        let c = classes.entry(class.to_owned()).or_insert_with(|| Class {
            at: now,
            versions: Vec::with_capacity(4),
        });
        c.decay_to(now, self.halflife);
        if let Some((_, score)) = c.versions.iter_mut().find(|(v, _)| v == version) {
            *score += 1.0;
        } else if c.versions.len() < PER_CLASS {
            c.versions.push((version.to_owned(), 1.0));
        } else if let Some(min) = c.versions.iter_mut().min_by(|a, b| a.1.total_cmp(&b.1)) {
            *min = (version.to_owned(), min.1 + 1.0);
        }
    }

    /// The `n` most requested versions of `class` at `now`, best first, leaving out `except`.
    pub fn top(&self, class: &str, n: usize, except: &str, now: Instant) -> Vec<Ranked> {
        let mut classes = self.classes.lock().unwrap_or_else(|e| e.into_inner());
        let Some(c) = classes.get_mut(class) else {
            return Vec::new();
        };
        c.decay_to(now, self.halflife);
        let mut ranked: Vec<Ranked> = c
            .versions
            .iter()
            .filter(|(v, _)| v != except)
            .map(|(v, s)| Ranked {
                version: v.clone(),
                score: *s,
            })
            .collect();
        ranked.sort_by(|a, b| {
            b.score
                .total_cmp(&a.score)
                .then_with(|| a.version.cmp(&b.version))
        });
        ranked.truncate(n);
        ranked
    }

    /// Every class with its versions, best first (`/versions` on the status port).
    pub fn table(&self, now: Instant) -> Vec<(String, Vec<Ranked>)> {
        let names: Vec<String> = {
            let classes = self.classes.lock().unwrap_or_else(|e| e.into_inner());
            classes.keys().cloned().collect()
        };
        let mut table: Vec<(String, Vec<Ranked>)> = names
            .into_iter()
            .map(|name| {
                let ranked = self.top(&name, PER_CLASS, "", now);
                (name, ranked)
            })
            .collect();
        table.sort_by(|a, b| a.0.cmp(&b.0));
        table
    }

    /// How much is tracked.
    pub fn summary(&self) -> Summary {
        let classes = self.classes.lock().unwrap_or_else(|e| e.into_inner());
        Summary {
            classes: classes.len(),
            versions: classes.values().map(|c| c.versions.len()).sum(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn names(r: &[Ranked]) -> Vec<&str> {
        r.iter().map(|r| r.version.as_str()).collect()
    }

    #[test]
    fn ranks_by_count_and_leaves_out_the_one_just_served() {
        let p = Popularity::new(HOUR);
        let now = Instant::now();
        for (version, times) in [
            ("w300.jpg", 7),
            ("w200.jpg", 5),
            ("x150.jpg", 2),
            ("w600.webp", 1),
        ] {
            for _ in 0..times {
                p.record("product/image", version, now);
            }
        }
        p.record("user/avatar", "w50.jpg", now);
        assert_eq!(
            names(&p.top("product/image", 3, "", now)),
            ["w300.jpg", "w200.jpg", "x150.jpg"]
        );
        assert_eq!(
            names(&p.top("product/image", 2, "w300.jpg", now)),
            ["w200.jpg", "x150.jpg"]
        );
        assert_eq!(names(&p.top("user/avatar", 3, "", now)), ["w50.jpg"]);
        assert!(p.top("no/such", 3, "", now).is_empty());
        assert_eq!(
            p.summary(),
            Summary {
                classes: 2,
                versions: 5
            }
        );
    }

    #[test]
    fn scores_halve_every_halflife_so_old_favourites_fade() {
        let p = Popularity::new(HOUR);
        let start = Instant::now();
        for _ in 0..8 {
            p.record("p/i", "old.jpg", start);
        }
        let later = start + 2 * HOUR;
        let old = p.top("p/i", 1, "", later);
        assert!((old[0].score - 2.0).abs() < 1e-9, "{old:?}");
        for _ in 0..3 {
            p.record("p/i", "new.jpg", later);
        }
        assert_eq!(names(&p.top("p/i", 2, "", later)), ["new.jpg", "old.jpg"]);
    }

    /// 100,000 distinct junk versions over 100,000 junk classes: the table stays at its bounds, and
    /// a version asked for more often than one request in [`PER_CLASS`] (here one in ten) survives
    /// the junk sent to its class: the space-saving guarantee.
    #[test]
    fn bounded_under_a_flood_of_distinct_junk() {
        let p = Popularity::new(HOUR);
        let now = Instant::now();
        for i in 0..100_000u32 {
            if i % 10 == 0 {
                p.record("product/image", "w300.jpg", now);
            }
            p.record("product/image", &format!("w{i}.jpg"), now);
            p.record(&format!("junk{i}/x"), "w1.jpg", now);
        }
        let s = p.summary();
        assert!(s.classes <= MAX_CLASSES, "{s:?}");
        assert!(s.versions <= MAX_CLASSES * PER_CLASS, "{s:?}");
        assert_eq!(
            names(&p.top("product/image", 1, "", now)),
            ["w300.jpg"],
            "a real favourite is not pushed out by junk"
        );
        // The busiest class survives a flood of one-request classes.
        assert_eq!(p.top("product/image", PER_CLASS, "", now).len(), PER_CLASS);
    }
}
