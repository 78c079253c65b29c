//! Caches (being written).
