//! service (being written).
