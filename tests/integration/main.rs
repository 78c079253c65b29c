//! The one integration test binary: every test starts the real server on 127.0.0.1:0 (see
//! `support.rs`) and talks to it over loopback HTTP. Nothing here sends a packet off this machine.

// The test modules share helpers with `pub`; nothing here is a public API.
#![allow(unreachable_pub)]

mod attack;
mod caching;
mod cdn;
mod docs;
mod faults;
mod fleet;
mod hostile;
mod migration;
mod operations;
mod prerender;
mod restart;
mod seaweed;
mod seed_config;
mod serve;
mod source_override;
mod support;
mod telemetry;
mod upload;
