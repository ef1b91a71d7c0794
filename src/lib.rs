//! smsflow runs SMS conversations for Twilio numbers. Every phone number is a finite state
//! machine (`machine`), driven by events and declared by operators in TOML flows (`flows`).
//!
//! Architecture invariant: `machine` is pure. It takes time and randomness as arguments and
//! returns effects as data; it never touches the network, the disk, the clock or a global RNG.

pub mod app;
pub mod bench;
pub mod cli;
pub mod config;
pub mod engine;
pub mod export;
pub mod flows;
pub mod http;
pub mod ivr;
pub mod machine;
pub mod metrics;
pub mod outbox;
pub mod phone;
pub mod provider;
pub mod reload;
pub mod scheduler;
pub mod sim;
pub mod store;
pub mod transcript;
