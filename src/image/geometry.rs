//! Pure geometry (stub).
